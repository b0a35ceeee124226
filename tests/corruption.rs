//! Corruption is detected, never silent: a byte flipped in a stored event
//! is reported by `chainsight admin verify` (naming the tree and the
//! record, with the repair) and refused by the running node (DATA_LOSS),
//! never served or skipped.

mod common;

use chainsight::pb;
use common::{event_of, publish_all, roles, TestEnv};

/// A stopped node whose store holds 20 reviews from 20 customers, with a
/// client certificate for `reader` (granted `reader_role`); its node.toml.
async fn stopped_node_with_20_events(
    env: &TestEnv,
    reader: &str,
    reader_role: &str,
) -> (
    common::NodeProc,
    chainsight::config::TlsFiles,
    std::path::PathBuf,
) {
    let files = env.issue(reader);
    let eshop = env.issue("retailer-eshop");
    let config = env.node_config(
        "node",
        &roles(&[
            "publishers = [\"retailer-eshop\"]",
            &format!("{reader_role} = [\"{reader}\"]"),
        ]),
    );
    let mut node = env.start("node");
    let events = (0..20)
        .map(|i| {
            event_of(
                &format!("e-{i}"),
                "4740001000017",
                pb::EventKind::Review,
                &format!("c-{i}"),
            )
        })
        .collect();
    publish_all(&mut node.ingest(&eshop).await, events).await;
    node.terminate();
    (node, files, config)
}

/// Runs `chainsight <args> --config <config>`: success, and stdout + stderr.
fn chainsight(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run chainsight");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_an_event_is_reported_offline_and_refused_online() {
    let env = TestEnv::new();
    let (mut node, reader, config) =
        stopped_node_with_20_events(&env, "maker-app", "subscribers").await;
    let verify = || chainsight(&config, &["admin", "verify"]);
    let (ok, out) = verify();
    println!("intact store: {out}");
    assert!(
        ok && out.contains("20 events") && out.contains("no problem found"),
        "{out}"
    );

    // Flip one byte in the frame of the event at seq 7, in the event
    // log's segment file: the `events` tree holds where its frame is, in
    // the run of its commit (key: the commit's first seq; value: format
    // byte 3, then per seq a 21-byte location: format byte 2, segment,
    // offset (its top 16 bits: the entry in a block) and length,
    // big-endian). The 20 events came in one request: their commit is in
    // two compressed blocks of 10 (seqs 1-10 and 11-20), so the flip
    // damages every event of the first block. (Not the second: the open
    // reads the last event, and refuses a damaged one.) The node is
    // stopped; a test may block on sled here.
    let damaged = 7u64;
    let block_first;
    {
        let store = node.data_dir().join("store");
        let db = sled::open(&store).expect("open sled");
        let events = db.open_tree("events").unwrap();
        let (first, run) = events
            .range(..=damaged.to_be_bytes())
            .next_back()
            .expect("a run with the damaged seq")
            .unwrap();
        let first = u64::from_be_bytes(first.as_ref().try_into().unwrap());
        assert_eq!(run[0], 3, "a run of locations");
        let slot = |seq: u64| {
            let at = 1 + 21 * (seq - first) as usize;
            let at = &run[at..at + 21];
            assert_eq!(at[0], 2, "a location in the log");
            let segment = u64::from_be_bytes(at[1..9].try_into().unwrap());
            let offset = u64::from_be_bytes(at[9..17].try_into().unwrap());
            let len = u32::from_be_bytes(at[17..21].try_into().unwrap());
            (segment, offset & ((1 << 48) - 1), offset >> 48, len)
        };
        let (segment, offset, entry, len) = slot(damaged);
        assert_eq!(entry, 6, "seq 7 is the 7th entry of its block");
        block_first = (first..=damaged)
            .find(|&s| {
                let (g, o, _, _) = slot(s);
                (g, o) == (segment, offset)
            })
            .unwrap();
        assert_eq!(block_first, 1);
        drop((events, db));
        let path = store.join("log").join(format!("{segment:020}.seg"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(offset + u64::from(len) - 1) as usize] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    }
    let (ok, out) = verify();
    println!("after the flip: {out}");
    assert!(!ok, "a damaged store must fail verification: {out}");
    assert!(
        out.contains("PROBLEM tree events, seq 7: checksum mismatch") && out.contains("restore"),
        "{out}"
    );

    // The running node refuses to serve the damaged record: a backfill
    // ends with DATA_LOSS at it instead of skipping it.
    node.restart();
    let mut stream = common::subscribe(&node, &reader, common::subscription(0, false, ""))
        .await
        .into_inner();
    let mut delivered = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(s)) => delivered.push(s.cursor),
            Ok(None) => {
                panic!("the backfill ended normally, skipping the damaged record: {delivered:?}")
            }
            Err(status) => break status,
        }
    };
    println!("backfill: cursors {delivered:?}, then {status}");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status}");
    // Everything before the damaged block, then the refusal at it.
    assert_eq!(delivered, (1..block_first).collect::<Vec<u64>>());
    assert!(node.log().contains("corrupt record"), "the node logs it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_rollup_cell_is_reported_refused_and_repaired_by_a_rebuild() {
    let env = TestEnv::new();
    let (mut node, analyst, config) =
        stopped_node_with_20_events(&env, "maker-bi", "analysts").await;
    let chainsight = |args: &[&str]| chainsight(&config, args);
    let (ok, out) = chainsight(&["admin", "verify"]);
    assert!(ok && out.contains("no problem found"), "{out}");

    // Flip one byte in the counts of every rollup cell (not the
    // watermark): whichever cells the query reads are damaged.
    #[allow(clippy::disallowed_methods)]
    let flipped = {
        let db = sled::open(node.data_dir().join("store")).expect("open sled");
        let rollups = db.open_tree("rollups").unwrap();
        let cells: Vec<_> = rollups
            .iter()
            .map(Result::unwrap)
            .filter(|(k, _)| !k.starts_with(b"\xff"))
            .collect();
        for (key, value) in &cells {
            let mut value = value.to_vec();
            value[1] ^= 0x01;
            rollups.insert(key, value).unwrap();
        }
        db.flush().unwrap();
        cells.len()
    };
    assert!(flipped > 0, "no rollup cells");
    let (ok, out) = chainsight(&["admin", "verify"]);
    println!("after flipping a byte in each of {flipped} rollup cells: {out}");
    assert!(!ok, "{out}");
    assert!(
        out.contains("PROBLEM tree rollups")
            && out.contains("checksum mismatch")
            && out.contains(&format!("{flipped} problem(s)")),
        "{out}"
    );

    // The node refuses to answer from it rather than count it.
    node.restart();
    let query = pb::InsightQuery {
        group_by: vec![pb::Dimension::Category as i32],
        ..Default::default()
    };
    let mut client =
        pb::insights_client::InsightsClient::new(node.channel(&analyst).await.unwrap());
    let status = client
        .query(query.clone())
        .await
        .expect_err("a query over a damaged cell must fail");
    println!("query over the damaged cell: {status}");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status}");
    node.terminate();

    // The repair the message names.
    let (ok, out) = chainsight(&["admin", "rebuild-rollups"]);
    assert!(ok, "{out}");
    let (ok, out) = chainsight(&["admin", "verify"]);
    assert!(ok && out.contains("no problem found"), "{out}");
    node.restart();
    let mut client =
        pb::insights_client::InsightsClient::new(node.channel(&analyst).await.unwrap());
    let report = client.query(query).await.expect("query").into_inner();
    println!("after admin rebuild-rollups: {:?}", report.rows);
    assert_eq!(report.rows.len(), 1);
    assert_eq!(report.rows[0].events, 20);
    node.terminate();
}
