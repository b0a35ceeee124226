mod common;

// Propagation under faults, against real node processes: an upstream that
// is down for a while, one killed with kill -9 mid-stream, a loop in a
// misconfigured topology, crafted Forward batches the receiver must refuse,
// callers without the right role, and an upstream with the wrong identity.

use std::time::{Duration, Instant};

use chainsight::config::TlsFiles;
use chainsight::pb;
use chainsight::store::Store;
use common::{event_of, publish_all, roles, upstream, NodeProc, TestEnv};
use pb::peering_client::PeeringClient;
use tonic::transport::Channel;

/// Two products of company prefix 4740001 and one of 4750002.
const GTIN_A1: &str = "4740001000017";
const GTIN_A2: &str = "4740001000024";
const GTIN_B1: &str = "4750002000015";

/// How long any single wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(45);

/// A Peering client to `node` as the holder of `files`.
async fn peering(node: &NodeProc, files: &TlsFiles) -> PeeringClient<Channel> {
    PeeringClient::new(node.channel(files).await.expect("connect"))
}

/// The node's one upstream link.
async fn the_link(client: &mut PeeringClient<Channel>) -> pb::LinkStatus {
    let links = client
        .links(pb::LinksRequest {})
        .await
        .expect("links")
        .into_inner()
        .links;
    assert_eq!(links.len(), 1, "expected exactly one link: {links:?}");
    links.into_iter().next().unwrap()
}

/// Polls the node's one link until `cond` holds.
async fn poll_link(
    node: &NodeProc,
    client: &mut PeeringClient<Channel>,
    what: &str,
    cond: impl Fn(&pb::LinkStatus) -> bool,
) -> pb::LinkStatus {
    let start = Instant::now();
    loop {
        let link = the_link(client).await;
        if cond(&link) {
            return link;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "node {}: timed out waiting for {what}: {link:?}\n{}",
            node.id,
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` purchases with ids `{prefix}-{i}`, about the manufacturer's products.
fn events(prefix: &str, n: usize) -> Vec<pb::CustomerEvent> {
    (0..n)
        .map(|i| {
            let gtin = if i % 2 == 0 { GTIN_A1 } else { GTIN_A2 };
            event_of(
                &format!("{prefix}-{i}"),
                gtin,
                pb::EventKind::Purchase,
                &format!("cust-{}", i % 97),
            )
        })
        .collect()
}

/// Asserts the store holds exactly the events `{prefix}-0..n` (each once,
/// as ids are unique keys and the count matches), all with `path`.
fn assert_holds_exactly(store: &Store, prefix: &str, n: usize, path: &[&str]) {
    assert_eq!(store.len().unwrap(), n, "stored events");
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let (_, ev) = store
            .get_by_event_id(&id)
            .expect("read store")
            .unwrap_or_else(|| panic!("event {id} is missing"));
        assert_eq!(ev.path, path, "path of {id}");
    }
}

/// The TOML of a retailer → distributor → manufacturer chain: the
/// manufacturer takes its own prefix, the distributor takes everything.
fn manufacturer_toml() -> String {
    roles(&["downstream = [\"distributor\"]"])
}

fn distributor_toml(manufacturer_port: u16, propagation: &str) -> String {
    format!(
        "{}{propagation}\n{}",
        roles(&["downstream = [\"retailer\"]"]),
        upstream(
            "manufacturer",
            manufacturer_port,
            "gtin_prefixes = [\"4740001\"]"
        )
    )
}

fn retailer_toml(distributor_port: u16, propagation: &str) -> String {
    format!(
        "{}{propagation}\n{}",
        roles(&["publishers = [\"retailer-eshop\"]"]),
        upstream("distributor", distributor_port, "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_of_the_distributor_loses_nothing_and_duplicates_nothing() {
    const N: usize = 10_000;
    let env = TestEnv::new();
    let op = env.issue("operator");
    let eshop = env.issue("retailer-eshop");

    env.node_config("manufacturer", &manufacturer_toml());
    let mut manufacturer = env.start("manufacturer");
    let distributor_port = env.reserve_port();
    env.node_config_on(
        "distributor",
        distributor_port,
        &distributor_toml(
            manufacturer.addr.port(),
            "[propagation]\nbackoff_max_ms = 500",
        ),
    );
    let mut distributor = env.start("distributor");
    env.node_config(
        "retailer",
        &retailer_toml(
            distributor_port,
            "[propagation]\nstall_after_secs = 1\nbackoff_max_ms = 500",
        ),
    );
    let mut retailer = env.start("retailer");
    let mut retailer_ops = peering(&retailer, &op).await;
    poll_link(&retailer, &mut retailer_ops, "the link to connect", |l| {
        l.connected
    })
    .await;

    distributor.terminate();
    // Publishing does not depend on the upstream.
    publish_all(&mut retailer.ingest(&eshop).await, events("out", N)).await;

    let link = poll_link(&retailer, &mut retailer_ops, "a link error", |l| {
        !l.connected && !l.last_error.is_empty()
    })
    .await;
    assert_eq!(link.id, "distributor");
    assert_eq!(link.backlog, N as u64, "{link:?}");
    let link = poll_link(&retailer, &mut retailer_ops, "the link to stall", |l| {
        l.stalled
    })
    .await;
    assert!(!link.connected, "{link:?}");
    assert_eq!(link.backlog, N as u64, "{link:?}");
    assert!(link.oldest_unacked_ms > 0, "{link:?}");
    assert!(!link.last_error.is_empty(), "{link:?}");
    // The warning is written right after the flag is set: poll for it.
    common::wait_for(
        || retailer.log().contains("stalled"),
        "a stall to be logged",
    );

    distributor.restart();
    let links = retailer.wait_drained(&op, N as u64).await;
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].backlog, 0, "{links:?}");
    assert_eq!(links[0].oldest_unacked_ms, 0, "{links:?}");
    assert_eq!(links[0].acknowledged, N as u64, "{links:?}");
    assert!(!links[0].stalled, "stall cleared after progress: {links:?}");
    assert!(links[0].last_error.is_empty(), "{links:?}");
    let links = distributor.wait_drained(&op, N as u64).await;
    assert!(!links[0].stalled, "{links:?}");

    retailer.terminate();
    distributor.terminate();
    manufacturer.terminate();
    assert_holds_exactly(
        &manufacturer.open_store(),
        "out",
        N,
        &["retailer", "distributor"],
    );
    assert_holds_exactly(&distributor.open_store(), "out", N, &["retailer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributor_killed_mid_forwarding_loses_and_duplicates_nothing() {
    const N: usize = 6_000;
    let env = TestEnv::new();
    let op = env.issue("operator");
    let eshop = env.issue("retailer-eshop");
    let small_batches = "[propagation]\nbatch_max_events = 20\nbackoff_max_ms = 500";

    env.node_config("manufacturer", &manufacturer_toml());
    let mut manufacturer = env.start("manufacturer");
    let distributor_port = env.reserve_port();
    env.node_config_on(
        "distributor",
        distributor_port,
        &distributor_toml(manufacturer.addr.port(), small_batches),
    );
    let mut distributor = env.start("distributor");
    env.node_config("retailer", &retailer_toml(distributor_port, small_batches));
    let mut retailer = env.start("retailer");

    // Publish while forwarding runs, and kill the distributor once it has
    // forwarded some events to the manufacturer while more are in flight.
    let mut client = retailer.ingest(&eshop).await;
    let publisher = tokio::spawn(async move { publish_all(&mut client, events("crash", N)).await });
    let mut retailer_ops = peering(&retailer, &op).await;
    let mut distributor_ops = peering(&distributor, &op).await;
    let start = Instant::now();
    loop {
        let d = the_link(&mut distributor_ops).await;
        let r = the_link(&mut retailer_ops).await;
        if d.acknowledged >= 200 && (r.backlog > 0 || d.backlog > 0) {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never caught forwarding in progress: retailer {r:?}, distributor {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    distributor.kill9();
    publisher.await.expect("publisher");

    distributor.restart();
    let links = retailer.wait_drained(&op, N as u64).await;
    assert_eq!(links[0].acknowledged, N as u64, "{links:?}");
    distributor.wait_drained(&op, 0).await;

    retailer.terminate();
    distributor.terminate();
    manufacturer.terminate();
    assert_holds_exactly(
        &manufacturer.open_store(),
        "crash",
        N,
        &["retailer", "distributor"],
    );
    assert_holds_exactly(&distributor.open_store(), "crash", N, &["retailer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_in_the_topology_does_not_circulate_events() {
    let env = TestEnv::new();
    let op = env.issue("operator");
    let (port_a, port_b) = (env.reserve_port(), env.reserve_port());
    for (me, other, other_port) in [("a", "b", port_b), ("b", "a", port_a)] {
        env.issue(&format!("{me}-pub"));
        env.node_config_on(
            me,
            if me == "a" { port_a } else { port_b },
            &format!(
                "{}[propagation]\nbackoff_max_ms = 300\n{}",
                roles(&[
                    &format!("publishers = [\"{me}-pub\"]"),
                    &format!("downstream = [\"{other}\"]"),
                ]),
                upstream(other, other_port, "")
            ),
        );
    }
    let mut a = env.start("a");
    let mut b = env.start("b");

    publish_all(
        &mut a.ingest(&env.issue("a-pub")).await,
        events("from-a", 50),
    )
    .await;
    publish_all(
        &mut b.ingest(&env.issue("b-pub")).await,
        events("from-b", 30),
    )
    .await;

    // Once a has drained, its events are stored (and routed) at b; once b
    // has drained, whatever b routed was delivered; then a drains again.
    a.wait_drained(&op, 50).await;
    let b_links = b.wait_drained(&op, 30).await;
    let a_links = a.wait_drained(&op, 50).await;
    assert_eq!(
        a_links[0].acknowledged, 50,
        "a sent only its own: {a_links:?}"
    );
    assert_eq!(
        b_links[0].acknowledged, 30,
        "b sent only its own: {b_links:?}"
    );
    assert_eq!(b.wait_drained(&op, 30).await[0].acknowledged, 30);

    a.terminate();
    b.terminate();
    for (node, mine, theirs) in [(&a, "from-a", "from-b"), (&b, "from-b", "from-a")] {
        let store = node.open_store();
        assert_eq!(store.len().unwrap(), 80, "node {}", node.id);
        let other = if node.id == "a" { "b" } else { "a" };
        let (mine_n, theirs_n) = if mine == "from-a" { (50, 30) } else { (30, 50) };
        for i in 0..mine_n {
            let (_, ev) = store
                .get_by_event_id(&format!("{mine}-{i}"))
                .unwrap()
                .expect("own event");
            assert_eq!(ev.path, [node.id.as_str()]);
        }
        for i in 0..theirs_n {
            let (_, ev) = store
                .get_by_event_id(&format!("{theirs}-{i}"))
                .unwrap()
                .expect("forwarded event");
            assert_eq!(ev.path, [other], "event {theirs}-{i} at {}", node.id);
        }
    }
}

/// A forwarded event as the distributor would send it to the manufacturer.
fn forwarded(id: &str, path: &[&str]) -> pb::PreferenceEvent {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    pb::PreferenceEvent {
        event_id: id.to_string(),
        origin: "retailer".into(),
        kind: pb::EventKind::Purchase as i32,
        occurred_at: Some(pbjson_types::Timestamp {
            seconds: now - 600,
            nanos: 0,
        }),
        product: Some(pb::Product {
            gtin: GTIN_A1.into(),
            category: "dairy".into(),
            brand: "Põlluvara".into(),
        }),
        channel: pb::Channel::Store as i32,
        stage: pb::JourneyStage::Purchase as i32,
        quantity: 2,
        region: "EE".into(),
        age_band: "35-44".into(),
        path: path.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

/// Sends `batches` on one Forward stream and returns every acknowledgement.
async fn forward(
    client: &mut PeeringClient<Channel>,
    batches: Vec<pb::ForwardBatch>,
) -> Result<Vec<pb::ForwardAck>, tonic::Status> {
    let mut acks = client
        .forward(tokio_stream::iter(batches))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ack) = acks.message().await? {
        out.push(ack);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_drops_loops_long_paths_and_foreign_paths_and_deduplicates() {
    let env = TestEnv::new();
    env.node_config("manufacturer", &manufacturer_toml());
    let mut manufacturer = env.start("manufacturer");
    let mut client = peering(&manufacturer, &env.issue("distributor")).await;

    let valid = forwarded("rx-valid", &["retailer", "distributor"]);
    let looped = forwarded("rx-loop", &["retailer", "manufacturer", "distributor"]);
    let mut long_path = vec!["retailer"];
    let relays: Vec<String> = (1..=7).map(|i| format!("relay{i}")).collect();
    long_path.extend(relays.iter().map(String::as_str));
    long_path.push("distributor");
    assert_eq!(long_path.len(), 9);
    let too_long = forwarded("rx-long", &long_path);
    let foreign = forwarded("rx-foreign", &["retailer", "x"]);
    // A path of exactly max_hops is still fine.
    let mut eight = long_path.clone();
    eight.remove(1);
    let max_hops_ok = forwarded("rx-eight", &eight);

    let acks = forward(
        &mut client,
        vec![
            pb::ForwardBatch {
                batch_id: 7,
                events: vec![valid.clone(), looped, too_long, foreign, valid.clone()],
                certificates: Vec::new(),
            },
            pb::ForwardBatch {
                batch_id: 8,
                events: vec![valid.clone(), max_hops_ok],
                certificates: Vec::new(),
            },
        ],
    )
    .await
    .expect("forward as distributor");
    let counts: Vec<_> = acks
        .iter()
        .map(|a| (a.batch_id, a.stored, a.duplicates, a.dropped))
        .collect();
    assert_eq!(counts, [(7, 1, 1, 3), (8, 1, 1, 0)]);

    manufacturer.terminate();
    let store = manufacturer.open_store();
    assert_eq!(store.len().unwrap(), 2);
    let (_, ev) = store.get_by_event_id("rx-valid").unwrap().expect("stored");
    assert_eq!(ev.path, ["retailer", "distributor"]);
    assert_eq!(ev.origin, "retailer");
    let (_, ev) = store.get_by_event_id("rx-eight").unwrap().expect("stored");
    assert_eq!(ev.path, eight);
    for id in ["rx-loop", "rx-long", "rx-foreign"] {
        assert!(store.get_by_event_id(id).unwrap().is_none(), "{id} stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_and_links_need_their_roles() {
    let env = TestEnv::new();
    env.node_config("manufacturer", &manufacturer_toml());
    let mut manufacturer = env.start("manufacturer");
    let stranger = env.issue("stranger");
    let distributor = env.issue("distributor");

    // Forward from an identity not in `downstream`.
    let batch = pb::ForwardBatch {
        batch_id: 1,
        events: vec![forwarded("perm-1", &["retailer", "stranger"])],
        certificates: Vec::new(),
    };
    let status = forward(&mut peering(&manufacturer, &stranger).await, vec![batch])
        .await
        .expect_err("a stranger may not forward");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("stranger"), "{status:?}");

    // Links without the operators role, also for a legitimate downstream.
    for files in [&stranger, &distributor] {
        let status = peering(&manufacturer, files)
            .await
            .links(pb::LinksRequest {})
            .await
            .expect_err("links needs the operators role");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    // The roles that are granted work, so the refusals were not a broken node.
    let links = peering(&manufacturer, &env.issue("operator"))
        .await
        .links(pb::LinksRequest {})
        .await
        .expect("operator may ask links")
        .into_inner()
        .links;
    assert!(links.is_empty(), "{links:?}");
    let batch = pb::ForwardBatch {
        batch_id: 1,
        events: vec![forwarded("perm-2", &["retailer", "distributor"])],
        certificates: Vec::new(),
    };
    let acks = forward(&mut peering(&manufacturer, &distributor).await, vec![batch])
        .await
        .expect("distributor may forward");
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].stored, 1, "{acks:?}");

    manufacturer.terminate();
    let store = manufacturer.open_store();
    assert_eq!(store.len().unwrap(), 1);
    assert!(store.get_by_event_id("perm-1").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_the_wrong_identity_is_sent_nothing() {
    let env = TestEnv::new();
    let op = env.issue("operator");
    let eshop = env.issue("retailer-eshop");

    env.node_config("impostor", &roles(&["downstream = [\"retailer\"]"]));
    let mut impostor = env.start("impostor");
    // The retailer believes the distributor lives at the impostor's address.
    env.node_config(
        "retailer",
        &retailer_toml(impostor.addr.port(), "[propagation]\nbackoff_max_ms = 300"),
    );
    let mut retailer = env.start("retailer");

    let mut events = events("imp", 10);
    events[3].product.as_mut().unwrap().gtin = GTIN_B1.into();
    publish_all(&mut retailer.ingest(&eshop).await, events).await;

    let mut retailer_ops = peering(&retailer, &op).await;
    let link = poll_link(&retailer, &mut retailer_ops, "a link error", |l| {
        !l.last_error.is_empty()
    })
    .await;
    assert!(!link.connected, "{link:?}");
    assert_eq!(link.backlog, 10, "{link:?}");
    assert_eq!(link.acknowledged, 0, "{link:?}");
    assert!(
        link.last_error.contains("certificate"),
        "the error names the certificate mismatch: {link:?}"
    );

    retailer.terminate();
    impostor.terminate();
    assert!(
        !impostor.log().contains("downstream connected"),
        "the retailer opened a Forward stream to the impostor:\n{}",
        impostor.log()
    );
    assert!(
        impostor.open_store().is_empty(),
        "the impostor stored events"
    );
}
