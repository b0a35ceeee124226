//! Crash consistency under load: a retailer node is killed with kill -9 at
//! random moments while two publishers and its upstream link are busy, and
//! restarted; after every cycle every acknowledged event is stored, none
//! twice, the rollups agree with the events and a named subscription's
//! acknowledged cursor survived; at the end the upstream
//! node holds exactly the retailer's events.
//!
//! The short form (10 cycles) runs with `cargo test`; the long form (100
//! cycles) with `cargo test --test crash -- --ignored`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chainsight::config::TlsFiles;
use chainsight::pb;
use common::{event_of, roles, stored, upstream, NodeProc, TestEnv};

const DAIRY: &str = "4740001000017";

/// Events in the node's insight feed (read from the rollups only).
async fn feed_events(node: &NodeProc, as_: &TlsFiles) -> u64 {
    pb::insights_client::InsightsClient::new(node.channel(as_).await.expect("connect"))
        .query(pb::InsightQuery {
            group_by: vec![pb::Dimension::Kind as i32],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner()
        .rows
        .iter()
        .map(|r| r.events)
        .sum()
}

/// What the publishers know: ids acknowledged (stored or duplicate), and
/// batches whose answer was lost in a crash (to be sent again).
#[derive(Default)]
struct Ledger {
    acknowledged: HashSet<String>,
    unanswered: Vec<Vec<pb::CustomerEvent>>,
    next: u64,
}

/// Publishes batches to `node` until a request fails (the node was
/// killed); batches sent again first. Publisher 0 sends batches of 3 (the
/// store writes small commits key by key), the others batches of 50 (one
/// sled batch per tree).
async fn publish_until_failure(
    node_addr: String,
    files: TlsFiles,
    ledger: Arc<Mutex<Ledger>>,
    who: usize,
) {
    let Ok(channel) =
        chainsight::tls::connect(&format!("https://{node_addr}"), "retailer", &files).await
    else {
        return;
    };
    let mut client = pb::ingest_client::IngestClient::new(channel);
    loop {
        let batch = {
            let mut l = ledger.lock().unwrap();
            match l.unanswered.pop() {
                Some(b) => b,
                None => {
                    let size = if who == 0 { 3 } else { 50 };
                    let first = l.next;
                    l.next += size;
                    (first..first + size)
                        .map(|i| {
                            event_of(
                                &format!("p{who}-{i}"),
                                DAIRY,
                                pb::EventKind::Purchase,
                                &format!("c-{}", i % 97),
                            )
                        })
                        .collect()
                }
            }
        };
        match client
            .publish(pb::PublishRequest {
                events: batch.clone(),
            })
            .await
        {
            Ok(resp) => {
                let mut l = ledger.lock().unwrap();
                for r in resp.into_inner().results {
                    let outcome = common::outcome(&r);
                    assert!(
                        matches!(
                            outcome,
                            pb::PublishOutcome::Accepted | pb::PublishOutcome::Duplicate
                        ),
                        "{r:?}"
                    );
                    l.acknowledged.insert(r.event_id);
                }
            }
            Err(_) => {
                ledger.lock().unwrap().unanswered.push(batch);
                return;
            }
        }
    }
}

async fn crash_cycles(cycles: usize) {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let reader = env.issue("maker-app");
    let analyst = env.issue("analyst");
    let d_port = env.reserve_port();
    env.node_config_on(
        "distributor",
        d_port,
        &roles(&[
            "downstream = [\"retailer\"]",
            "subscribers = [\"maker-app\"]",
        ]),
    );
    let d = env.start("distributor");
    let r_port = env.reserve_port();
    env.node_config_on(
        "retailer",
        r_port,
        // Event ids are packed every 200 new ones (default 100,000), so
        // that kills land in passes of the id packer too.
        &format!(
            "{}[privacy]\nk_min = 1\n[storage]\nid_pack_min = 200\n{}",
            roles(&[
                "publishers = [\"retailer-eshop\"]",
                "subscribers = [\"maker-app\"]",
                "analysts = [\"analyst\"]",
            ]),
            upstream("distributor", d_port, "")
        ),
    );
    let eshop = env.issue("retailer-eshop");
    let mut r = env.start("retailer");
    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..2).map(|_| Arc::default()).collect();
    // A xorshift generator: random kill moments, reproducible by seed.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let mut state = seed;
    let mut next_random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    println!("crash test: {cycles} cycles, seed {seed}");
    let started = Instant::now();
    let mut worst_duplicates = 0usize;
    let mut acked_cursor = 0u64;
    for cycle in 0..cycles {
        let publishers: Vec<_> = ledgers
            .iter()
            .enumerate()
            .map(|(who, ledger)| {
                tokio::spawn(publish_until_failure(
                    r.addr.to_string(),
                    eshop.clone(),
                    ledger.clone(),
                    who,
                ))
            })
            .collect();
        let delay = Duration::from_millis(100 + next_random() % 400);
        tokio::time::sleep(delay).await;
        r.kill9();
        for p in publishers {
            p.await.expect("publisher");
        }
        r.restart();

        // Every acknowledged event is stored, none twice; the rollups
        // (refolded after the crash) count the same events.
        let ids = stored(&r, &reader).await;
        let unique: HashSet<&String> = ids.iter().map(|(_, id)| id).collect();
        let duplicated = ids.len() - unique.len();
        worst_duplicates = worst_duplicates.max(duplicated);
        let mut lost = 0;
        let mut acknowledged = 0;
        for l in &ledgers {
            let l = l.lock().unwrap();
            acknowledged += l.acknowledged.len();
            lost += l
                .acknowledged
                .iter()
                .filter(|id| !unique.contains(id))
                .count();
        }
        let mut unanswered_stored = 0;
        for l in &ledgers {
            let l = l.lock().unwrap();
            unanswered_stored += l
                .unanswered
                .iter()
                .flatten()
                .filter(|e| unique.contains(&e.event_id))
                .count();
        }
        let feed = feed_events(&r, &analyst).await;
        println!(
            "cycle {}: killed after {delay:?}; stored {}, acknowledged {acknowledged} (+{unanswered_stored} stored whose answer the kill lost), lost {lost}, duplicated {duplicated}, feed {feed}",
            cycle + 1,
            ids.len(),
        );
        assert_eq!(lost, 0, "acknowledged events lost in cycle {}", cycle + 1);
        assert_eq!(duplicated, 0, "events stored twice in cycle {}", cycle + 1);
        assert_eq!(
            feed,
            ids.len() as u64,
            "the rollups disagree with the events after cycle {}",
            cycle + 1
        );
        // The named cursor acknowledged in the cycle before survived the
        // kill; acknowledge the newest one for the next cycle.
        let resumed = common::subscribe(&r, &reader, common::subscription(0, false, "reader"))
            .await
            .metadata()
            .get("x-start-cursor")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .expect("x-start-cursor");
        assert_eq!(
            resumed,
            acked_cursor,
            "the named cursor after cycle {}",
            cycle + 1
        );
        acked_cursor = ids.last().map_or(0, |(c, _)| *c);
        pb::signals_client::SignalsClient::new(r.channel(&reader).await.expect("connect"))
            .ack(pb::AckRequest {
                name: "reader".into(),
                cursor: acked_cursor,
            })
            .await
            .expect("ack");
    }

    // Finally: the batches whose answer was lost are sent again (they come
    // back stored or duplicate), the link drains, and the upstream node
    // holds exactly the retailer's events, once each.
    let mut ingest = r.ingest(&eshop).await;
    let (mut resent, mut came_back_duplicate) = (0, 0);
    for l in &ledgers {
        let pending: Vec<_> = std::mem::take(&mut l.lock().unwrap().unanswered);
        for batch in pending {
            let results = common::publish(&mut ingest, batch).await;
            let mut l = l.lock().unwrap();
            for res in results {
                resent += 1;
                if common::outcome(&res) == pb::PublishOutcome::Duplicate {
                    came_back_duplicate += 1;
                }
                l.acknowledged.insert(res.event_id);
            }
        }
    }
    println!(
        "unanswered at the last kill: {resent} events sent again, {came_back_duplicate} of them were stored already (DUPLICATE)"
    );
    let at_retailer = stored(&r, &reader).await;
    r.wait_drained(&operator, 0).await;
    let at_distributor = stored(&d, &reader).await;
    let retailer_ids: HashSet<&String> = at_retailer.iter().map(|(_, id)| id).collect();
    let mut seen: HashMap<&String, usize> = HashMap::new();
    for (_, id) in &at_distributor {
        *seen.entry(id).or_default() += 1;
    }
    let upstream_duplicates = seen.values().filter(|&&n| n > 1).count();
    let acknowledged: usize = ledgers
        .iter()
        .map(|l| l.lock().unwrap().acknowledged.len())
        .sum();
    println!(
        "crash test: {cycles} cycles in {:?}; acknowledged {acknowledged}, stored at the retailer {}, at the distributor {}, lost 0, duplicated {worst_duplicates} (retailer) and {upstream_duplicates} (distributor)",
        started.elapsed(),
        at_retailer.len(),
        at_distributor.len()
    );
    assert_eq!(
        acknowledged,
        at_retailer.len(),
        "every stored event was acknowledged once retried"
    );
    assert_eq!(upstream_duplicates, 0, "events stored twice upstream");
    assert_eq!(
        seen.keys().copied().collect::<HashSet<_>>(),
        retailer_ids,
        "the distributor holds other events than the retailer"
    );
    // After every kill -9 and repair at open, the retailer's indexes (ids,
    // customer runs, outboxes) agree with its events.
    r.terminate();
    // The id packer ran between and across the kills (`id_pack_min`).
    let log = std::fs::read_to_string(env.path().join("retailer").join("node.log"))
        .expect("the retailer's log");
    let passes = log.matches("event ids packed").count();
    println!("event-id packer passes: {passes}");
    assert!(passes > 0, "the id packer never ran");
    let config = env.path().join("retailer").join("node.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["admin", "verify", "--config"])
        .arg(&config)
        .output()
        .expect("run chainsight admin verify");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("no problem found"),
        "admin verify after the crashes: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_and_duplicates_nothing_short() {
    crash_cycles(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long form (100 cycles): cargo test --test crash -- --ignored"]
async fn kill_9_under_load_loses_and_duplicates_nothing_long() {
    crash_cycles(100).await;
}
