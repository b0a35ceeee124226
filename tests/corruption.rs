//! Corruption is detected, never silent: a byte flipped in a stored event
//! is reported by `chainsight admin verify` (naming the tree and the
//! record, with the repair) and refused by the running node (DATA_LOSS),
//! never served or skipped.

mod common;

use chainsight::pb;
use common::{event_of, publish_all, roles, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_an_event_is_reported_offline_and_refused_online() {
    let env = TestEnv::new();
    let reader = env.issue("maker-app");
    let eshop = env.issue("retailer-eshop");
    let config = env.node_config(
        "node",
        &roles(&[
            "publishers = [\"retailer-eshop\"]",
            "subscribers = [\"maker-app\"]",
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

    let verify = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
            .args(["admin", "verify", "--config", config.to_str().unwrap()])
            .output()
            .expect("run chainsight");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = verify();
    println!("intact store: {out}");
    assert!(
        ok && out.contains("20 events") && out.contains("no problem found"),
        "{out}"
    );

    // Flip one byte in the payload of the event at seq 7 (the node is
    // stopped; a test may block on sled here).
    #[allow(clippy::disallowed_methods)]
    {
        let db = sled::open(node.data_dir().join("store")).expect("open sled");
        let events = db.open_tree("events").unwrap();
        let key = 7u64.to_be_bytes();
        let mut value = events.get(key).unwrap().expect("seq 7").to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x40;
        events.insert(key, value).unwrap();
        db.flush().unwrap();
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
    assert!(delivered.iter().all(|&c| c < 7), "{delivered:?}");
    assert!(node.log().contains("corrupt record"), "the node logs it");
}
