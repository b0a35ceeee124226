//! Anonymisation at the edge: no raw personal data reaches the node's disk.

mod common;

use std::path::Path;

use chainsight::pb;
use common::{event, outcome, publish, TestEnv};

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A file's bytes as the node wrote them, and for a segment of the event
/// log also its blocks decompressed (the store compresses the records of
/// a commit of more than 16 events together: a string inside is not in the
/// file's bytes as it is). Parsed here independently of the store's code:
/// a frame is a length word (bit 31 set: a block), a CRC, then the body; a
/// block's body is kind, count (u16), length (u32) and a zstd frame.
/// Also returns how many blocks it decompressed.
fn stored_bytes(file: &Path) -> (Vec<u8>, usize) {
    let mut bytes = std::fs::read(file).unwrap();
    if file.extension().is_none_or(|e| e != "seg") {
        return (bytes, 0);
    }
    let mut plain = Vec::new();
    let mut blocks = 0;
    let mut pos = 0;
    while pos + 8 <= bytes.len() {
        let word = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap());
        if word == 0 {
            break;
        }
        let len = (word & !(1 << 31)) as usize;
        let body = &bytes[pos + 8..pos + 8 + len];
        if word & (1 << 31) != 0 {
            plain.extend(zstd::decode_all(&body[7..]).expect("a block decompresses"));
            blocks += 1;
        }
        pos += 8 + len;
    }
    bytes.extend(plain);
    (bytes, blocks)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `number` occurs in `text` as a number of its own: neither
/// digits, a decimal point nor letters right before or after it.
fn contains_number(text: &str, number: &str) -> bool {
    let part_of_number = |c: char| c.is_ascii_alphanumeric() || c == '.';
    text.match_indices(number).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + number.len()..].chars().next();
        !before.is_some_and(part_of_number) && !after.is_some_and(part_of_number)
    })
}

/// Whether `needle` occurs in a file's bytes; an all-digit needle only
/// where no digit stands right before or after it. The store keeps
/// certificates, whose DER validity times are digit runs
/// ("YYMMDDHHMMSSZ"): one issued at 19:58 holds "1958", at 14:45:56
/// "44556", as digits of a longer run, not as the personal number.
fn stored(bytes: &[u8], needle: &[u8]) -> bool {
    if !needle.iter().all(u8::is_ascii_digit) {
        return contains(bytes, needle);
    }
    bytes.windows(needle.len()).enumerate().any(|(at, w)| {
        w == needle
            && !(at > 0 && bytes[at - 1].is_ascii_digit())
            && !bytes.get(at + needle.len()).is_some_and(u8::is_ascii_digit)
    })
}

#[test]
fn a_numeric_canary_counts_only_as_a_number_of_its_own() {
    assert!(stored(b"\x01zip 1958)", b"1958"));
    assert!(!stored(b"\x17\r261206195812Z", b"1958"));
    assert!(stored(b"a Kertu b", b"Kertu"));
    assert!(contains_number("birth_year=1958 ok", "1958"));
    assert!(contains_number("\"1958\"", "1958"));
    assert!(contains_number("1958", "1958"));
    assert!(!contains_number("127.0.0.1:41958", "1958"));
    assert!(!contains_number("took 19583 µs", "1958"));
    assert!(!contains_number("2.1958ms", "1958"));
    assert!(!contains_number("id=a1958b", "1958"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_personal_data_in_any_byte_of_the_data_directory() {
    let env = TestEnv::new();
    // A fixed pseudonym key makes the stored bytes reproducible, so the
    // search below cannot pass or fail by chance.
    let data_dir = env.path().join("retailer").join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("pseudonym.key"), [7u8; 32]).unwrap();
    let mut node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    let mut client = node.ingest(&eshop).await;

    let personal = |id: &str, customer: &str, country: &str, postal: &str| {
        let mut e = event(id);
        e.customer_id = customer.into();
        e.country = country.into();
        e.postal_code = postal.into();
        e.birth_year = 1961;
        // 2026-06-15: the age band is computed at the event's time.
        e.occurred_at = Some(pbjson_types::Timestamp {
            seconds: 1_781_481_600,
            nanos: 0,
        });
        e.attributes
            .insert("note".into(), "reach me: margit.tamm@example.ee".into());
        e.free_text = "Write to margit.tamm@example.ee or call +372 5550 1234, \
                       card 4111-1111-1111-1111. The cheese was great!"
            .into();
        e
    };
    let events = vec![
        personal("p-1", "CUST-Margit-Tamm-7781", "GB", "SW1A 2AA"),
        personal("p-2", "CUST-Margit-Tamm-7781", "LV", "LV-1050"),
        // A postal code no certificate validity time can contain: the
        // store keeps certificates (DER, "YYMMDDHHMMSSZ" times; notBefore
        // an hour before issue), and "10115" was found once in its sled
        // file in a CI run at about 11:11:5x ("…10115xZ").
        personal("p-3", "CUST-Jaan-Kask-1202", "EE", "10189"),
    ];
    let results = publish(&mut client, events).await;
    assert!(
        results
            .iter()
            .all(|r| outcome(r) == pb::PublishOutcome::Accepted),
        "{results:?}"
    );

    node.terminate();
    let needles: [&[u8]; 11] = [
        b"10189",
        b"CUST-Margit-Tamm-7781",
        b"CUST-Jaan-Kask-1202",
        b"Margit",
        b"margit.tamm@example.ee",
        b"example.ee",
        b"5550 1234",
        b"4111-1111",
        b"SW1A 2AA",
        b"LV-1050",
        b"1961",
    ];
    let all = files(&data_dir);
    assert!(all.len() > 1, "expected sled files in {data_dir:?}");
    for file in &all {
        let (bytes, _) = stored_bytes(file);
        for needle in needles {
            assert!(
                !stored(&bytes, needle),
                "{:?} found in {file:?}",
                String::from_utf8_lossy(needle)
            );
        }
    }

    let store = node.open_store();
    let (_, a) = store.get_by_event_id("p-1").unwrap().unwrap();
    let (_, b) = store.get_by_event_id("p-2").unwrap().unwrap();
    let (_, c) = store.get_by_event_id("p-3").unwrap().unwrap();
    assert_eq!(
        a.customer_pseudonym, b.customer_pseudonym,
        "same customer, same pseudonym"
    );
    assert_ne!(
        a.customer_pseudonym, c.customer_pseudonym,
        "different customers differ"
    );
    assert_eq!(a.customer_pseudonym.len(), 32);
    assert_eq!(
        (a.region.as_str(), b.region.as_str(), c.region.as_str()),
        ("GB-SW", "LV-1", "EE-10")
    );
    assert_eq!(a.age_band, "65+", "born 1961, event in 2026");
    assert!(
        a.text.contains("[email]") && a.text.contains("[phone]") && a.text.contains("[card]"),
        "{}",
        a.text
    );
    assert!(a.text.contains("The cheese was great!"));
    assert_eq!(
        a.attributes["note"], "reach me: [email]",
        "attribute values are scrubbed too"
    );
    assert_eq!(a.origin, "retailer");
    assert_eq!(a.path, vec!["retailer".to_string()]);

    // The node log holds no personal data either.
    let log = node.log();
    for needle in needles {
        assert!(
            !log.contains(std::str::from_utf8(needle).unwrap()),
            "personal data in the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pseudonym_key_is_private_and_kept_across_restarts() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    publish(&mut node.ingest(&eshop).await, vec![event("k-1")]).await;
    node.terminate();
    let key_file = node.data_dir().join("pseudonym.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key = std::fs::read(&key_file).unwrap();
    node.restart();
    let mut second = event("k-2");
    second.customer_id = event("k-1").customer_id;
    publish(&mut node.ingest(&eshop).await, vec![second]).await;
    node.terminate();
    assert_eq!(std::fs::read(&key_file).unwrap(), key);
    let store = node.open_store();
    let p1 = store
        .get_by_event_id("k-1")
        .unwrap()
        .unwrap()
        .1
        .customer_pseudonym;
    let p2 = store
        .get_by_event_id("k-2")
        .unwrap()
        .unwrap()
        .1
        .customer_pseudonym;
    assert_eq!(
        p1, p2,
        "the same customer keeps its pseudonym across a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_key_is_lost_refuses_to_start_rather_than_change_pseudonyms() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    publish(&mut node.ingest(&eshop).await, vec![event("lost-1")]).await;
    node.terminate();
    std::fs::remove_file(node.data_dir().join("pseudonym.key")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["node", "--config"])
        .arg(node.dir.join("node.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pseudonym key") && err.contains("restore"),
        "{err}"
    );
    assert!(
        !node.data_dir().join("pseudonym.key").exists(),
        "no new key was made"
    );
}

/// Canary identifiers that must not leave the retailer's edge.
const CANARIES: [&str; 12] = [
    "CANARY-CUST-88412",
    "canary-cust-88412",
    "kertu.kanaar@example.org",
    "example.org",
    "+372 5877 6543",
    "5877 6543",
    "44556",
    "Kertu Kanaar",
    "Kanaar",
    "Kertu",
    "4000 0566 5566 5556",
    "1958",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_leaves_the_retailer_on_any_hop_or_in_any_data_directory() {
    use common::{roles, upstream};
    let env = TestEnv::new();
    // Fixed pseudonym keys make the pseudonyms (hex, per node and link)
    // reproducible: a random one holds a short numeric canary such as
    // "1958" now and then, and the search below would fail by chance.
    for (node, byte) in [("retailer", 7u8), ("distributor", 8), ("manufacturer", 9)] {
        let data_dir = env.path().join(node).join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        std::fs::write(data_dir.join("pseudonym.key"), [byte; 32]).unwrap();
    }
    let operator = env.issue("operator");
    let reader = env.issue("maker-app");
    let (m_port, d_port) = (env.reserve_port(), env.reserve_port());
    env.node_config_on(
        "manufacturer",
        m_port,
        &roles(&[
            "downstream = [\"distributor\"]",
            "subscribers = [\"maker-app\"]",
        ]),
    );
    let mut m = env.start("manufacturer");
    env.node_config_on(
        "distributor",
        d_port,
        &format!(
            "{}{}",
            roles(&[
                "downstream = [\"retailer\"]",
                "subscribers = [\"maker-app\"]"
            ]),
            upstream("manufacturer", m_port, "")
        ),
    );
    let mut d = env.start("distributor");
    env.node_config(
        "retailer",
        &format!(
            "{}{}",
            roles(&["publishers = [\"retailer-eshop\"]"]),
            upstream("distributor", d_port, "")
        ),
    );
    let mut r = env.start("retailer");
    let eshop = env.issue("retailer-eshop");

    let events: Vec<_> = (0..30)
        .map(|i| {
            let mut e = event(&format!("canary-{i}"));
            e.customer_id = "CANARY-CUST-88412".into();
            e.country = "EE".into();
            e.postal_code = "44556".into();
            e.birth_year = 1958;
            e.kind = pb::EventKind::Complaint as i32;
            e.free_text = format!(
                "My name is Kertu Kanaar (customer canary-cust-88412, zip 44556). \
                 Mail kertu.kanaar@example.org, call +372 5877 6543, \
                 card 4000 0566 5566 5556. Complaint #{i}: the lid leaks. Regards, Kertu"
            );
            e.attributes.insert(
                "contact".into(),
                "Kertu Kanaar, kertu.kanaar@example.org".into(),
            );
            e
        })
        .collect();
    let results = publish(&mut r.ingest(&eshop).await, events).await;
    assert!(
        results
            .iter()
            .all(|x| outcome(x) == pb::PublishOutcome::Accepted),
        "{results:?}"
    );
    r.wait_drained(&operator, 30).await;
    d.wait_drained(&operator, 30).await;

    // What the manufacturer's subscriber receives: the events as stored
    // there (what came over both Forward hops).
    let mut stream = common::subscribe(&m, &reader, common::subscription(0, false, ""))
        .await
        .into_inner();
    let mut received = 0;
    while let Some(s) = stream.message().await.unwrap() {
        let ev = s.event.unwrap();
        let wire = prost::Message::encode_to_vec(&ev);
        for canary in CANARIES {
            assert!(
                !contains(&wire, canary.as_bytes()),
                "{canary:?} reached the manufacturer: {ev:?}"
            );
        }
        assert!(
            ev.text.contains("[name]") && ev.text.contains("[email]"),
            "{}",
            ev.text
        );
        received += 1;
    }
    assert_eq!(received, 30);

    for n in [&mut r, &mut d, &mut m] {
        n.terminate();
    }
    // Every byte of every node's data directory, and every log.
    let mut scanned = 0usize;
    let mut blocks = 0usize;
    for n in [&r, &d, &m] {
        for file in files(&n.data_dir()) {
            let (bytes, in_blocks) = stored_bytes(&file);
            scanned += bytes.len();
            blocks += in_blocks;
            for canary in CANARIES {
                assert!(!stored(&bytes, canary.as_bytes()), "{canary:?} in {file:?}");
            }
        }
        let log = n.log();
        for canary in CANARIES {
            // A log is full of numbers (ports, timings, sizes): a short
            // numeric canary ("1958", the birth year) counts as one only
            // where it stands alone, not as digits of another number.
            let found = if canary.bytes().all(|b| b.is_ascii_digit()) {
                contains_number(&log, canary)
            } else {
                log.contains(canary)
            };
            assert!(!found, "{canary:?} in {}'s log", n.id);
        }
    }
    // The retailer stored the 30 events of one request in compressed
    // blocks: the scan above read them decompressed.
    assert!(
        blocks > 0,
        "no compressed block of the event log was scanned"
    );
    // The hops' stores hold the events, scrubbed.
    for n in [&d, &m] {
        let store = n.open_store();
        let (_, ev) = store.get_by_event_id("canary-7").unwrap().unwrap();
        assert!(ev.text.contains("My name is [name]"), "{}", ev.text);
        assert_eq!(ev.region, "EE-44");
    }
    println!(
        "canaries: 30 events through 3 hops, {} canaries absent from {scanned} bytes of 3 data directories ({blocks} blocks of the event log decompressed), 3 logs and 30 delivered signals",
        CANARIES.len()
    );
}
