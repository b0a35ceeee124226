//! The bodies of the cargo-fuzz targets in `fuzz/` (issue 7, item 6).
//!
//! Each function takes arbitrary bytes, runs one of the node's parsers or
//! transformations on them, and panics only when an invariant that must
//! hold for every input is broken: a decoded message that does not survive
//! re-encoding, a validated event whose stored form decodes differently, an
//! e-mail address, phone number or the customer's own id left in anonymised
//! text. A panic is a finding; an `Err` for hostile input is the expected
//! outcome. The unit tests below run every body over seeds and seeded
//! mutations, so the targets stay compiled and exercised in `cargo test`
//! even where cargo-fuzz (nightly) is not installed.

use std::sync::LazyLock;

use prost::Message;
use regex::Regex;

use crate::anonymise::Anonymiser;
use crate::domain::UnixNanos;
use crate::{conversions, pb};

/// The fixed "now" validation runs against, so that a finding replays the
/// same way on any day: 2026-11-24T00:00:00Z.
const NOW_SECS: i64 = 1_795_478_400;

/// The targets, by the name `cargo fuzz run` takes.
pub const TARGETS: &[&str] = &[
    "requests",
    "anonymiser",
    "jsonl_import",
    "stored_record",
    "report",
];

fn now() -> UnixNanos {
    UnixNanos(NOW_SECS * 1_000_000_000)
}

static ANONYMISER: LazyLock<Anonymiser> =
    LazyLock::new(|| Anonymiser::new("fuzz-retailer", [7; 32]));

/// `requests`: the first byte picks a request message; the rest is decoded
/// as that message the way tonic would, then validated the way the service
/// does. What validation accepts must survive the node's own encodings.
pub fn requests(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => {
            let Ok(req) = pb::PublishRequest::decode(bytes) else {
                return;
            };
            round_trips(&req);
            for ev in req.events {
                if let Ok(ce) = conversions::customer_event_from_pb(ev, now()) {
                    let event = ANONYMISER.anonymise(ce);
                    stored_form_round_trips(&event);
                }
            }
        }
        1 => {
            let Ok(batch) = pb::ForwardBatch::decode(bytes) else {
                return;
            };
            round_trips(&batch);
            for ev in batch.events {
                if let Ok(event) = conversions::preference_event_from_pb(ev) {
                    stored_form_round_trips(&event);
                    let again = conversions::preference_event_from_pb(
                        conversions::preference_event_to_pb(&event),
                    )
                    .expect("an accepted forwarded event, re-encoded, is accepted again");
                    assert_eq!(again, event, "forwarded event changed on re-encoding");
                }
            }
        }
        2 => {
            let Ok(req) = pb::SubscribeRequest::decode(bytes) else {
                return;
            };
            round_trips(&req);
            if let Ok(filter) = conversions::filter_from_pb(req.filter, "filter") {
                let again =
                    conversions::filter_from_pb(Some(conversions::filter_to_pb(&filter)), "filter")
                        .expect("an accepted filter, re-encoded, is accepted again");
                assert_eq!(again, filter, "filter changed on re-encoding");
            }
        }
        3 => {
            let Ok(q) = pb::InsightQuery::decode(bytes) else {
                return;
            };
            round_trips(&q);
            let _ = conversions::insight_query_from_pb(q);
        }
        4 => {
            if let Ok(req) = pb::EraseRequest::decode(bytes) {
                round_trips(&req);
            }
        }
        5 => {
            if let Ok(req) = pb::ErasureForward::decode(bytes) {
                round_trips(&req);
            }
        }
        _ => {
            if let Ok(req) = pb::AckRequest::decode(bytes) {
                round_trips(&req);
            }
        }
    }
}

/// `anonymiser`: the input, split at NUL characters, supplies the personal
/// fields (customer id, postal code, free text) and an attribute of an
/// otherwise valid event. Whatever the text, no e-mail address, no phone- or
/// card-like digit run and neither the customer's id nor postal code is left
/// in the anonymised text or attribute values, and the pseudonym is a digest.
pub fn anonymiser(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let mut ev = template();
    ev.customer_id = parts.next().unwrap_or_default().to_string();
    ev.postal_code = parts.next().unwrap_or_default().to_string();
    ev.free_text = parts.next().unwrap_or_default().to_string();
    let key = parts.next().unwrap_or("note").to_string();
    let value = parts.next().unwrap_or_default().to_string();
    ev.attributes.insert(key, value);
    let Ok(ce) = conversions::customer_event_from_pb(ev, now()) else {
        return;
    };
    let own: Vec<String> = [&ce.personal.customer_id, &ce.personal.postal_code]
        .into_iter()
        .flatten()
        .map(|v| v.trim().to_string())
        .collect();
    let had_customer = ce.personal.customer_id.is_some();
    let out = ANONYMISER.anonymise(ce);
    for text in std::iter::once(&out.text).chain(out.attributes.values()) {
        assert_scrubbed(text, &own);
    }
    if had_customer {
        assert!(
            out.customer_pseudonym.len() == 32
                && out
                    .customer_pseudonym
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit()),
            "pseudonym {:?} is not a 128-bit hex digest",
            out.customer_pseudonym
        );
    } else {
        assert!(out.customer_pseudonym.is_empty());
    }
    stored_form_round_trips(&out);
}

/// `jsonl_import`: every line is parsed the way `chainsight publish` reads
/// a JSON-lines file; a parsed event survives proto3 JSON re-encoding and
/// goes through validation without panicking.
pub fn jsonl_import(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let Some(Ok(ev)) = crate::client::parse_line(line) else {
            continue;
        };
        let json = serde_json::to_string(&ev).expect("a parsed event serialises");
        let again: pb::CustomerEvent =
            serde_json::from_str(&json).expect("the node's own JSON parses");
        assert_eq!(again, ev, "event changed on a JSON round trip: {json}");
        let _ = conversions::customer_event_from_pb(ev, now());
    }
}

/// `stored_record`: a stored record is either refused (bad format byte,
/// checksum, payload) or decodes to an event that encodes back to the same
/// event.
pub fn stored_record(data: &[u8]) {
    if let Ok(event) = crate::store::record::decode(data) {
        stored_form_round_trips(&event);
    }
}

/// `report`: the client's fast insight-report reader agrees with prost on
/// every input, errors included.
pub fn report(data: &[u8]) {
    let fast = crate::wire::decode_report(data);
    let prost = pb::InsightReport::decode(data);
    match (fast, prost) {
        // Compared as encoded bytes: a NaN is not equal to itself, but both
        // readers must have read the same bits.
        (Ok(a), Ok(b)) => assert_eq!(
            a.encode_to_vec(),
            b.encode_to_vec(),
            "the report reader disagrees with prost: {a:?} vs {b:?}"
        ),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("the report reader gave {a:?}, prost {b:?}"),
    }
}

/// A decoded message encodes to bytes that decode to the same message.
fn round_trips<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M) {
    let again = M::decode(msg.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(&again, msg, "message changed on re-encoding");
}

fn stored_form_round_trips(event: &crate::domain::PreferenceEvent) {
    let bytes = crate::store::record::encode(event);
    let back = crate::store::record::decode(&bytes).expect("a stored record decodes");
    assert_eq!(&back, event, "event changed on its way through the store");
}

/// Personal data the anonymiser must have removed from `text`: e-mail
/// addresses, runs of 7 or more digits, and the event's own identifiers
/// (`own`, compared as the anonymiser compares: case-insensitively, from 3
/// characters). The anonymiser's own placeholders are not findings.
fn assert_scrubbed(text: &str, own: &[String]) {
    static PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\[(?:id|postal|email|phone|card|name|removed)\]").expect("valid regex")
    });
    use crate::anonymise::{find_own, EMAIL, NUMBER_RUN};
    for piece in PLACEHOLDER.split(text) {
        assert!(
            !EMAIL.is_match(piece),
            "an e-mail address is left in {text:?}"
        );
        for run in NUMBER_RUN.find_iter(piece) {
            let digits = run.as_str().chars().filter(|c| c.is_numeric()).count();
            assert!(digits < 7, "a {digits}-digit run is left in {text:?}");
        }
        for value in own {
            assert!(
                find_own(piece, value).is_empty(),
                "{value:?} is left in {text:?}"
            );
        }
    }
}

/// A valid customer event for the anonymiser target to fill in.
fn template() -> pb::CustomerEvent {
    crate::workload::Workload::new(1, "fuzz", 1, NOW_SECS).next_event()
}

/// Seed inputs for `target`: valid and nearly valid examples of what it
/// parses, so that a fuzzer (and the unit test) starts from the shapes the
/// node sees.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut work = crate::workload::Workload::new(42, "seed", 20, NOW_SECS);
    let events: Vec<pb::CustomerEvent> = (0..8).map(|_| work.next_event()).collect();
    let anonymised: Vec<pb::PreferenceEvent> = events
        .iter()
        .filter_map(|e| conversions::customer_event_from_pb(e.clone(), now()).ok())
        .map(|ce| conversions::preference_event_to_pb(&ANONYMISER.anonymise(ce)))
        .collect();
    let tagged = |tag: u8, msg: Vec<u8>| [vec![tag], msg].concat();
    match target {
        "requests" => vec![
            tagged(0, pb::PublishRequest { events: events.clone() }.encode_to_vec()),
            tagged(
                1,
                pb::ForwardBatch {
                    batch_id: 1,
                    events: anonymised.clone(),
                    certificates: vec![],
                }
                .encode_to_vec(),
            ),
            tagged(
                2,
                pb::SubscribeRequest {
                    filter: Some(pb::Filter {
                        gtin_prefixes: vec!["4740001".into()],
                        ..Default::default()
                    }),
                    after_cursor: 10,
                    follow: true,
                    name: "feed".into(),
                }
                .encode_to_vec(),
            ),
            tagged(
                3,
                pb::InsightQuery {
                    group_by: vec![2, 4, 10],
                    bucket: 3,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            tagged(4, pb::EraseRequest { customer_id: "cust-1".into() }.encode_to_vec()),
        ],
        "anonymiser" => vec![
            b"cust-7781\x0010115\0Mail jane.doe@example.com or call +372 5123 4567, I am Margit Tamm, CUST-7781\0contact\0jaan@tahti.ee".to_vec(),
            b"c-1\0LV-1050\0card 4111 1111 1111 1111; size 42\0size\0M".to_vec(),
            "k\u{fc}lli\0\0\u{ff14}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11} 1111 1111".as_bytes().to_vec(),
            // Found by cargo-fuzz: placeholders longer than what they
            // replace pushed an attribute value past its limit, and the
            // stored event no longer read back.
            include_bytes!("../fuzz/regressions/anonymiser-placeholder-growth").to_vec(),
        ],
        "jsonl_import" => {
            let mut lines: Vec<u8> = Vec::new();
            for e in &events {
                lines.extend(serde_json::to_vec(e).expect("serialises"));
                lines.push(b'\n');
            }
            lines.extend_from_slice(b"{\"kind\":\"EVENT_KIND_NOT_A_KIND\"}\n\n not json\n");
            vec![lines]
        }
        "stored_record" => anonymised
            .iter()
            .filter_map(|e| conversions::preference_event_from_pb(e.clone()).ok())
            .map(|e| crate::store::record::encode(&e))
            .collect(),
        "report" => vec![pb::InsightReport {
            rows: vec![pb::InsightRow {
                key: vec!["dairy".into(), "EE-10".into()],
                bucket_start: Some(pbjson_types::Timestamp {
                    seconds: NOW_SECS - 7 * 86_400,
                    nanos: 0,
                }),
                events: 120,
                customers: 40,
                avg_score: Some(4.2),
                nps: Some(31.0),
                return_rate: Some(0.05),
                share: 0.25,
            }],
            suppressed_groups: 3,
            k_min: 5,
            epsilon: 0.0,
        }
        .encode_to_vec()],
        other => panic!("no fuzz target {other:?}; the targets are {TARGETS:?}"),
    }
}

/// Runs `target`'s body on `data` (the dispatcher the fuzz crate and the
/// tests share).
pub fn run(target: &str, data: &[u8]) {
    match target {
        "requests" => requests(data),
        "anonymiser" => anonymiser(data),
        "jsonl_import" => jsonl_import(data),
        "stored_record" => stored_record(data),
        "report" => report(data),
        other => panic!("no fuzz target {other:?}; the targets are {TARGETS:?}"),
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A few thousand seeded mutations per target: byte flips, insertions,
    /// deletions, truncations and splices of the seeds. Not a substitute for
    /// coverage-guided fuzzing, but every body runs on hostile input in
    /// every `cargo test`.
    #[test]
    fn every_target_survives_its_seeds_and_seeded_mutations() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for target in TARGETS {
            let seeds = seeds(target);
            assert!(!seeds.is_empty(), "{target} has no seeds");
            let mut runs = 0;
            for seed in &seeds {
                run(target, seed);
                runs += 1;
            }
            for _ in 0..3000 {
                let mut input = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..6) {
                    mutate(&mut input, &mut rng, &seeds);
                }
                run(target, &input);
                runs += 1;
            }
            println!("fuzz target {target}: {runs} inputs, no invariant broken");
        }
    }

    /// Writes the seeds into `fuzz/seeds/<target>/` (committed), where
    /// `.ci/run` and `cargo fuzz run` read them:
    /// `cargo test --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/seeds; run after changing the seeds"]
    fn write_fuzz_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for target in TARGETS {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds(target).iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), seed).unwrap();
            }
        }
    }

    fn mutate(input: &mut Vec<u8>, rng: &mut StdRng, seeds: &[Vec<u8>]) {
        let len = input.len();
        match rng.random_range(0..5) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let i = rng.random_range(0..=len);
                input.insert(i, rng.random());
            }
            2 if len > 0 => {
                input.remove(rng.random_range(0..len));
            }
            3 if len > 0 => input.truncate(rng.random_range(0..len)),
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    let at = rng.random_range(0..=len);
                    let piece = other[from..other.len().min(from + 16)].to_vec();
                    input.splice(at..at, piece);
                }
            }
        }
    }

    #[test]
    fn the_anonymiser_target_catches_what_the_anonymiser_must_remove() {
        // The invariant itself can fail: text the anonymiser did not touch.
        let left = std::panic::catch_unwind(|| assert_scrubbed("call 5123 4567", &[]));
        assert!(left.is_err(), "a phone number passed the check");
        let left = std::panic::catch_unwind(|| {
            assert_scrubbed("I am CUST-7781", &["cust-7781".to_string()])
        });
        assert!(left.is_err(), "the customer's id passed the check");
        assert_scrubbed("size 42 [phone] [id]", &["cust-7781".to_string()]);
    }
}
