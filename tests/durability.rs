//! Acknowledged means durable; retries never duplicate.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chainsight::pb;
use common::{event, outcome, publish, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_event_id_is_stored_once_also_across_a_restart() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    let mut client = node.ingest(&eshop).await;

    let r = publish(&mut client, vec![event("dup-1"), event("dup-2")]).await;
    assert!(r.iter().all(|r| outcome(r) == pb::PublishOutcome::Accepted));
    // A retry, and the same id twice within one request.
    let r = publish(
        &mut client,
        vec![event("dup-1"), event("dup-3"), event("dup-3")],
    )
    .await;
    let outcomes: Vec<_> = r.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        [
            pb::PublishOutcome::Duplicate,
            pb::PublishOutcome::Accepted,
            pb::PublishOutcome::Duplicate
        ]
    );

    node.terminate();
    node.restart();
    let mut client = node.ingest(&eshop).await;
    let r = publish(&mut client, vec![event("dup-2"), event("dup-4")]).await;
    let outcomes: Vec<_> = r.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        [pb::PublishOutcome::Duplicate, pb::PublishOutcome::Accepted]
    );

    node.terminate();
    let store = node.open_store();
    assert_eq!(store.len().unwrap(), 4);
    let seqs: Vec<u64> = store.scan_after(0).map(|r| r.unwrap().0).collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 4],
        "sequence numbers continue after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_kill_9() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let eshop = env.issue("retailer-eshop");

    // Four publishers keep publishing batches; the node is killed while they
    // are busy. Whatever was acknowledged before the kill must be on disk.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (first_acks_tx, mut first_acks) = tokio::sync::mpsc::channel::<()>(64);
    let mut tasks = Vec::new();
    for p in 0..4 {
        let mut client = node.ingest(&eshop).await;
        let acked = acked.clone();
        let first_acks_tx = first_acks_tx.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0.. {
                let events: Vec<_> = (0..50)
                    .map(|i| event(&format!("k9-{p}-{batch}-{i}")))
                    .collect();
                let ids: Vec<_> = events.iter().map(|e| e.event_id.clone()).collect();
                match client.publish(pb::PublishRequest { events }).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        assert!(resp
                            .results
                            .iter()
                            .all(|r| outcome(r) == pb::PublishOutcome::Accepted));
                        acked.lock().unwrap().extend(ids);
                        let _ = first_acks_tx.try_send(());
                    }
                    Err(_) => return batch,
                }
            }
            unreachable!()
        }));
    }
    // Kill once a good number of batches were acknowledged, mid-stream.
    for _ in 0..20 {
        first_acks.recv().await.unwrap();
    }
    node.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 1000, "only {} acknowledged", acked.len());

    node.restart();
    node.terminate();
    let store = node.open_store();
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| store.get_by_event_id(id).unwrap().is_none())
        .collect();
    println!(
        "acknowledged {}, stored {}, lost {}",
        acked.len(),
        store.len().unwrap(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    // Stored events are readable and each id is stored once.
    let mut ids = HashSet::new();
    for item in store.scan_after(0) {
        let (_, ev) = item.unwrap();
        assert!(
            ids.insert(ev.event_id.clone()),
            "{} stored twice",
            ev.event_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_stream_finish_then_exits_cleanly() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    let mut client = node.ingest(&eshop).await;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = client
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::PublishRequest {
        events: vec![event("term-1")],
    })
    .await
    .unwrap();
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!(outcome(&first.results[0]), pb::PublishOutcome::Accepted);

    // Shutdown is asked while the stream is open: the node stops accepting
    // new work but lets this request run to its end.
    node.send_sigterm();
    common::wait_for(
        || node.log().contains("shutting down"),
        "the node to begin shutdown",
    );
    tx.send(pb::PublishRequest {
        events: vec![event("term-2")],
    })
    .await
    .unwrap();
    let second = responses.message().await.unwrap().unwrap();
    assert_eq!(outcome(&second.results[0]), pb::PublishOutcome::Accepted);
    assert!(!node.has_exited(), "the node must wait for the open stream");
    drop(tx);
    assert!(responses.message().await.unwrap().is_none());
    node.wait_clean_exit();
    assert!(node.log().contains("store flushed; node stopped"));

    let store = node.open_store();
    assert!(store.get_by_event_id("term-1").unwrap().is_some());
    assert!(store.get_by_event_id("term-2").unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flush_serves_many_concurrent_publishers() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    let (publishers, requests_each) = (16, 25);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let mut client = node.ingest(&eshop).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..requests_each {
                let r = publish(&mut client, vec![event(&format!("gc-{p}-{i}"))]).await;
                assert_eq!(outcome(&r[0]), pb::PublishOutcome::Accepted);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    node.terminate();
    let log = node.log();
    let flushes: u64 = log
        .rsplit("flushes=")
        .next()
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("the node logs its flush count at shutdown");
    let requests = (publishers * requests_each) as u64;
    println!("{requests} acknowledged publish requests, {flushes} flushes");
    assert!(
        flushes < requests,
        "group commit: {flushes} flushes for {requests} requests"
    );
    assert_eq!(node.open_store().len().unwrap() as u64, requests);
}
