//! Signals beyond one connection, against real node processes: resuming by
//! cursor, the live hand-over at full publishing speed, a follower at the
//! end of a chain, a slow subscriber that must not slow ingest nor grow the
//! node's memory, per-identity filter limits, retention with OUT_OF_RANGE,
//! and named (durable) subscriptions through the API and the CLI.

mod common;

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainsight::config::TlsFiles;
use chainsight::pb;
use common::{event_of, outcome, publish_all, roles, upstream, NodeProc, TestEnv};
use tonic::transport::Channel;

const DAIRY: &str = "4740001000017";
/// Also within company prefix 4740001, but not within 47400010.
const DAIRY_B: &str = "4740001100014";
const WEAR: &str = "4750002000015";

/// How long any single expected message may take.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The throughput test takes this exclusively so that the other tests of
/// this file (which run in parallel) do not compete with it for the CPU.
static EXCLUSIVE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

type SignalsClient = pb::signals_client::SignalsClient<Channel>;
type IngestClient = pb::ingest_client::IngestClient<Channel>;

/// A node `id` whose publisher is `retailer-eshop` and whose subscribers are
/// `maker-app`, `maker-bi` and `partner`, plus `extra` TOML.
fn node(env: &TestEnv, id: &str, extra: &str) -> NodeProc {
    env.node_config(
        id,
        &format!(
            "{}{extra}",
            roles(&[
                "publishers = [\"retailer-eshop\"]",
                "subscribers = [\"maker-app\", \"maker-bi\", \"partner\"]",
            ])
        ),
    );
    env.start(id)
}

async fn signals(node: &NodeProc, files: &TlsFiles) -> SignalsClient {
    SignalsClient::new(node.channel(files).await.expect("connect"))
}

fn request(filter: pb::Filter, after: u64, follow: bool, name: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        filter: Some(filter),
        after_cursor: after,
        follow,
        name: name.to_string(),
    }
}

/// The next signal of a stream, failing if none comes in time.
async fn next(stream: &mut tonic::Streaming<pb::Signal>) -> Option<pb::Signal> {
    tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
        .await
        .expect("the next signal (or the end) in time")
        .expect("signal")
}

/// A whole backfill (`follow = false`).
async fn backfill(
    client: &mut SignalsClient,
    filter: pb::Filter,
    after: u64,
    name: &str,
) -> Vec<pb::Signal> {
    let mut stream = client
        .subscribe(request(filter, after, false, name))
        .await
        .expect("subscribe")
        .into_inner();
    let mut out = Vec::new();
    while let Some(s) = next(&mut stream).await {
        out.push(s);
    }
    out
}

fn event_id(s: &pb::Signal) -> String {
    s.event.as_ref().expect("event").event_id.clone()
}

fn ids(signals: &[pb::Signal]) -> Vec<String> {
    signals.iter().map(event_id).collect()
}

fn cursors(signals: &[pb::Signal]) -> Vec<u64> {
    signals.iter().map(|s| s.cursor).collect()
}

/// `n` purchase events of DAIRY with ids `{prefix}-00000`...
fn events(prefix: &str, n: usize) -> Vec<pb::CustomerEvent> {
    (0..n)
        .map(|i| {
            event_of(
                &format!("{prefix}-{i:05}"),
                DAIRY,
                pb::EventKind::Purchase,
                &format!("c-{}", i % 97),
            )
        })
        .collect()
}

fn id_list(events: &[pb::CustomerEvent]) -> Vec<String> {
    events.iter().map(|e| e.event_id.clone()).collect()
}

/// Publishes over one `PublishStream` in requests of 500 (pipelined by the
/// node) and asserts every event was accepted.
async fn publish_stream(client: &mut IngestClient, events: Vec<pb::CustomerEvent>) {
    let total = events.len();
    let mut requests = Vec::new();
    let mut rest = events;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(500));
        requests.push(pb::PublishRequest {
            events: std::mem::replace(&mut rest, tail),
        });
    }
    let mut responses = client
        .publish_stream(futures::stream::iter(requests))
        .await
        .expect("publish_stream")
        .into_inner();
    let mut accepted = 0;
    while let Some(resp) = responses.message().await.expect("publish_stream response") {
        for r in &resp.results {
            assert_eq!(outcome(r), pb::PublishOutcome::Accepted, "{r:?}");
        }
        accepted += resp.results.len();
    }
    assert_eq!(accepted, total, "one result per published event");
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls `cond` (async) until it holds, failing after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pid of `node`'s process: the one process whose command line is
/// `chainsight node --config <node's config path>` (the config path lies in
/// the test's own temp dir, so it is unique).
fn node_pid(node: &NodeProc) -> u32 {
    let config = node.dir.join("node.toml");
    let config = config.as_os_str().as_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() >= 4
            && args[1] == b"node"
            && args
                .windows(2)
                .any(|w| w[0] == b"--config" && w[1] == config)
        {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "exactly one process of node {}", node.id);
    found[0]
}

/// VmRSS of `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

// 1. Resume
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_backfill_halfway_and_resuming_from_the_last_cursor_gives_the_full_set_once() {
    let _shared = EXCLUSIVE.read().await;
    let env = TestEnv::new();
    let node = node(&env, "retailer", "");
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    let n = 1000;
    let published = events("r", n);
    let expected = id_list(&published);
    publish_all(&mut node.ingest(&eshop).await, published).await;

    let mut client = signals(&node, &app).await;
    let mut stream = client
        .subscribe(request(pb::Filter::default(), 0, false, ""))
        .await
        .unwrap()
        .into_inner();
    let mut first = Vec::new();
    while first.len() < n / 2 {
        first.push(next(&mut stream).await.expect("more signals"));
    }
    // Disconnect: the stream and the connection go away mid-backfill.
    drop(stream);
    drop(client);
    let last = first.last().unwrap().cursor;

    let mut client = signals(&node, &app).await;
    let rest = backfill(&mut client, pb::Filter::default(), last, "").await;
    assert_eq!(rest.len(), n - n / 2, "exactly the other half");
    let mut union = ids(&first);
    union.extend(ids(&rest));
    assert_eq!(union, expected, "the full set, in order");
    let set: HashSet<_> = union.iter().collect();
    assert_eq!(set.len(), n, "no duplicate");
    let all: Vec<u64> = first.iter().chain(&rest).map(|s| s.cursor).collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "cursors increase");
}

// 2. Live hand-over at full speed
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_joining_during_a_full_speed_publish_gets_all_20000_once_in_order() {
    let _shared = EXCLUSIVE.read().await;
    let env = TestEnv::new();
    let node = node(&env, "retailer", "");
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    let n = 20_000;
    let published = events("live", n);
    let expected: HashSet<String> = id_list(&published).into_iter().collect();

    // Connect first so that subscribing is a single round trip.
    let mut client = signals(&node, &app).await;
    let mut ingest = node.ingest(&eshop).await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut requests = Vec::new();
            let mut rest = published;
            while !rest.is_empty() {
                let tail = rest.split_off(rest.len().min(500));
                requests.push(pb::PublishRequest {
                    events: std::mem::replace(&mut rest, tail),
                });
            }
            let mut responses = ingest
                .publish_stream(futures::stream::iter(requests))
                .await
                .expect("publish_stream")
                .into_inner();
            let mut started = Some(started_tx);
            let mut accepted = 0;
            while let Some(resp) = responses.message().await.expect("response") {
                for r in &resp.results {
                    assert_eq!(outcome(r), pb::PublishOutcome::Accepted, "{r:?}");
                }
                accepted += resp.results.len();
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            }
            done.store(true, Ordering::SeqCst);
            accepted
        })
    };
    // Subscribe once the first events are stored, while the rest pour in.
    started_rx.await.expect("publishing started");
    let mut stream = client
        .subscribe(request(pb::Filter::default(), 0, true, ""))
        .await
        .unwrap()
        .into_inner();
    let joined_while_publishing = !done.load(Ordering::SeqCst);

    let mut seen = HashSet::new();
    let mut last = 0;
    while seen.len() < n {
        let s = next(&mut stream)
            .await
            .expect("follow keeps the stream open");
        assert_eq!(
            s.cursor,
            last + 1,
            "no gap, no duplicate: cursor {} after {last}",
            s.cursor
        );
        last = s.cursor;
        let id = event_id(&s);
        assert!(expected.contains(&id), "unexpected {id}");
        assert!(seen.insert(id), "duplicate signal at cursor {}", s.cursor);
    }
    assert_eq!(publisher.await.unwrap(), n);
    assert_eq!(seen, expected);
    assert!(
        joined_while_publishing,
        "the follower must have joined while publishing was under way"
    );
}

// 3. End to end in a chain
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manufacturers_follower_receives_the_retailers_events_as_they_propagate() {
    let _shared = EXCLUSIVE.read().await;
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let app = env.issue("maker-app");
    let (m_port, d_port) = (env.reserve_port(), env.reserve_port());
    env.node_config_on(
        "manufacturer",
        m_port,
        &roles(&[
            "downstream = [\"distributor\"]",
            "subscribers = [\"maker-app\"]",
        ]),
    );
    let m = env.start("manufacturer");
    env.node_config_on(
        "distributor",
        d_port,
        &format!(
            "{}{}",
            roles(&["downstream = [\"retailer\"]"]),
            upstream("manufacturer", m_port, "")
        ),
    );
    let d = env.start("distributor");
    env.node_config(
        "retailer",
        &format!(
            "{}{}",
            roles(&["publishers = [\"retailer-eshop\"]"]),
            upstream("distributor", d_port, "")
        ),
    );
    let r = env.start("retailer");
    let eshop = env.issue("retailer-eshop");

    // Subscribed before anything is published.
    let mut follower = signals(&m, &app)
        .await
        .subscribe(request(pb::Filter::default(), 0, true, ""))
        .await
        .unwrap()
        .into_inner();

    let n = 2000;
    let published: Vec<_> = (0..n)
        .map(|i| {
            event_of(
                &format!("chain-{i}"),
                if i % 2 == 0 { DAIRY } else { WEAR },
                pb::EventKind::Review,
                &format!("c-{}", i % 31),
            )
        })
        .collect();
    let expected: HashSet<String> = id_list(&published).into_iter().collect();
    let publisher = {
        let mut ingest = r.ingest(&eshop).await;
        tokio::spawn(async move { publish_all(&mut ingest, published).await })
    };

    let mut seen = HashSet::new();
    let mut last = 0;
    while seen.len() < n {
        let s = next(&mut follower)
            .await
            .expect("follow keeps the stream open");
        assert!(s.cursor > last, "cursors increase");
        last = s.cursor;
        let ev = s.event.unwrap();
        assert!(
            expected.contains(&ev.event_id),
            "unexpected {}",
            ev.event_id
        );
        assert_eq!(ev.origin, "retailer");
        assert_eq!(ev.path, ["retailer", "distributor"], "{}", ev.event_id);
        assert!(seen.insert(ev.event_id.clone()), "{} twice", ev.event_id);
    }
    publisher.await.unwrap();
    // Nothing more is on its way: both links drained, and the manufacturer
    // stores exactly what the follower got.
    r.wait_drained(&operator, n as u64).await;
    d.wait_drained(&operator, n as u64).await;
    let stored = backfill(&mut signals(&m, &app).await, pb::Filter::default(), 0, "").await;
    assert_eq!(stored.len(), n);
    assert_eq!(
        stored.iter().map(event_id).collect::<HashSet<_>>(),
        seen,
        "the follower got exactly what the manufacturer stored"
    );
}

// 4. Slow subscriber
/// CPU time (user + system) `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which is in parentheses): state is
    // field 3, utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Publishes `events` to `node`; returns the rate in events per second and
/// the CPU ticks the node used meanwhile.
async fn timed_round(
    client: &mut IngestClient,
    pid: u32,
    events: Vec<pb::CustomerEvent>,
) -> (f64, u64) {
    let n = events.len();
    let cpu = cpu_ticks(pid);
    let start = Instant::now();
    publish_stream(client, events).await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    (rate, cpu_ticks(pid) - cpu)
}

/// Events with about 2 KB of text each, so that holding the unconsumed ones
/// in memory would show in the node's RSS.
fn fat_events(prefix: &str, n: usize) -> Vec<pb::CustomerEvent> {
    let text = "the yoghurt was fresh and the lid closed well ".repeat(44);
    let mut out = events(prefix, n);
    for e in &mut out {
        e.free_text = text.clone();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_neither_slows_publishing_nor_grows_the_nodes_memory() {
    let _exclusive = EXCLUSIVE.write().await;
    let env = TestEnv::new();
    // Two identical nodes take the same rounds in turn; only `busy` has the
    // slow subscriber, `quiet` is the baseline.
    // Unsigned events: the memory bounds below were calibrated for them
    // (an origin proof adds about 1 KB per event to what sled caches,
    // ~40 MiB more here for both nodes alike). sled's page cache is bounded
    // well below the ~35 MB of text published here, so that what the
    // nodes cache cannot hide a queue of unread events (with sled's default
    // 1 GiB cache, two identical nodes grew by amounts 30 MiB apart).
    let tuned = "[trust]\nsign = false\n[storage]\npage_cache_mib = 16\n";
    let quiet = node(&env, "quiet", tuned);
    let busy = node(&env, "busy", tuned);
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    let mut quiet_ingest = quiet.ingest(&eshop).await;
    let mut busy_ingest = busy.ingest(&eshop).await;
    let (rounds, per_round) = (6, 2500);

    let (quiet_pid, busy_pid) = (node_pid(&quiet), node_pid(&busy));
    // Warm up both (connections, store files, allocator).
    timed_round(&mut quiet_ingest, quiet_pid, fat_events("warm", 2000)).await;
    timed_round(&mut busy_ingest, busy_pid, fat_events("warm", 2000)).await;
    let (quiet_rss_before, busy_rss_before) = (vm_rss_kib(quiet_pid), vm_rss_kib(busy_pid));

    // The slow subscriber: follows from the start of the store, reading one
    // signal a second.
    let mut slow = signals(&busy, &app)
        .await
        .subscribe(request(pb::Filter::default(), 0, true, ""))
        .await
        .unwrap()
        .into_inner();
    let consumed = Arc::new(AtomicU64::new(0));
    let reader = {
        let consumed = consumed.clone();
        tokio::spawn(async move {
            while let Ok(Some(_)) = slow.message().await {
                consumed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let (mut quiet_rates, mut busy_rates) = (Vec::new(), Vec::new());
    let (mut quiet_cpu, mut busy_cpu) = (0, 0);
    for r in 0..rounds {
        let q = fat_events(&format!("q{r}"), per_round);
        let b = fat_events(&format!("b{r}"), per_round);
        // Alternate which goes first, so neither always gets the warmer disk.
        let (quiet_round, busy_round) = if r % 2 == 0 {
            let q = timed_round(&mut quiet_ingest, quiet_pid, q).await;
            (q, timed_round(&mut busy_ingest, busy_pid, b).await)
        } else {
            let b = timed_round(&mut busy_ingest, busy_pid, b).await;
            (timed_round(&mut quiet_ingest, quiet_pid, q).await, b)
        };
        quiet_rates.push(quiet_round.0);
        busy_rates.push(busy_round.0);
        quiet_cpu += quiet_round.1;
        busy_cpu += busy_round.1;
    }
    // Both nodes idle a moment first: what they freed in their last round
    // is then returned to the system (the allocator keeps freed memory for
    // about a second), so that the figures compare what each node holds,
    // not which of the two ran last.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (quiet_rss_after, busy_rss_after) = (vm_rss_kib(quiet_pid), vm_rss_kib(busy_pid));
    let consumed = consumed.load(Ordering::SeqCst);
    assert!(!reader.is_finished(), "the slow subscription stays open");
    reader.abort();

    // Each round of `busy` ran right next to one of `quiet`, so their ratio
    // cancels the drift of this (shared, 2-core) machine's load; the median
    // of the ratios discounts a burst of load that hit a single round.
    let mut ratios: Vec<f64> = busy_rates
        .iter()
        .zip(&quiet_rates)
        .map(|(b, q)| b / q)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = (ratios[ratios.len() / 2] + ratios[(ratios.len() - 1) / 2]) / 2.0;
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let stored = 2000 + (rounds * per_round) as u64;
    let mib = |before: u64, after: u64| (after as f64 - before as f64) / 1024.0;
    let quiet_growth = mib(quiet_rss_before, quiet_rss_after);
    let busy_growth = mib(busy_rss_before, busy_rss_after);
    println!(
        "publish rate (events/s) without a slow subscriber: {quiet_rates:.0?} (best {:.0}); \
         with one: {busy_rates:.0?} (best {:.0}); per-round ratios {ratios:.2?}, median {median:.2}",
        best(&quiet_rates),
        best(&busy_rates),
    );
    println!(
        "node CPU ticks for the {} events: {quiet_cpu} without, {busy_cpu} with",
        rounds * per_round
    );
    println!(
        "VmRSS without: {quiet_rss_before} -> {quiet_rss_after} KiB ({quiet_growth:+.1} MiB); \
         with: {busy_rss_before} -> {busy_rss_after} KiB ({busy_growth:+.1} MiB); \
         the slow subscriber read {consumed} of {stored} stored events"
    );
    assert!(
        stored - consumed >= 15_000,
        "the slow subscriber must have left at least 15,000 events unread ({consumed} read)"
    );
    // Wall-clock rates only mean something when the machine is not
    // overloaded by other work (seen here: ratios of 0.83-0.89 at load
    // averages of 5-9 on 2 cores, never at ~3.5). On an overloaded machine
    // the comparison is reported, and the CPU-per-event check below (which
    // does not depend on load) still guards the property.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            l.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    if load <= 2.0 * cpus {
        assert!(
            median >= 0.9,
            "a slow subscriber slowed publishing: median rate ratio {median:.2} ({ratios:.2?})"
        );
    } else {
        println!(
            "load average {load:.1} on {cpus} CPUs: the machine is overloaded, the rate ratio {median:.2} is reported, not asserted"
        );
    }
    // Unlike the rates, the node's CPU time per event hardly depends on the
    // rest of the machine's load: the slow subscriber must not add work.
    assert!(
        busy_cpu as f64 <= 1.25 * quiet_cpu as f64,
        "a slow subscriber made the node work more: {busy_cpu} CPU ticks vs {quiet_cpu} without"
    );
    assert!(
        busy_growth < 100.0,
        "the node's memory grew by {busy_growth:.1} MiB with a slow subscriber"
    );
    // The ~17,000 unread events carry about 35 MB of text: a node that
    // queued them in memory for the subscriber grew by ~34 MiB more than the
    // quiet one (tried with an unbounded subscriber queue); the difference
    // between two identical nodes without that stayed within ±17 MiB.
    assert!(
        busy_growth < quiet_growth + 25.0,
        "with a slow subscriber the node grew by {busy_growth:.1} MiB, {quiet_growth:.1} MiB without"
    );
}

// 5. Filter limits
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_identity_is_narrowed_when_open_and_refused_when_wider() {
    let _shared = EXCLUSIVE.read().await;
    let env = TestEnv::new();
    let node = node(
        &env,
        "retailer",
        "[[filter_limit]]\nidentity = \"partner\"\ngtin_prefixes = [\"4740001\"]\n",
    );
    let eshop = env.issue("retailer-eshop");
    let partner = env.issue("partner");
    let app = env.issue("maker-app");
    let gtins = [DAIRY, WEAR, DAIRY_B];
    let published: Vec<_> = (0..90)
        .map(|i| {
            event_of(
                &format!("f-{i:02}"),
                gtins[i % 3],
                pb::EventKind::Purchase,
                "c",
            )
        })
        .collect();
    let of = |allowed: &[&str]| -> Vec<String> {
        published
            .iter()
            .filter(|e| allowed.contains(&e.product.as_ref().unwrap().gtin.as_str()))
            .map(|e| e.event_id.clone())
            .collect()
    };
    let (dairy_all, dairy_only, everything) = (of(&[DAIRY, DAIRY_B]), of(&[DAIRY]), of(&gtins));
    publish_all(&mut node.ingest(&eshop).await, published).await;

    let mut client = signals(&node, &partner).await;
    // Open request: narrowed to the limit.
    let got = backfill(&mut client, pb::Filter::default(), 0, "").await;
    assert_eq!(ids(&got), dairy_all, "narrowed to 4740001");
    // Also when following.
    let mut live = client
        .subscribe(request(pb::Filter::default(), 0, true, ""))
        .await
        .unwrap()
        .into_inner();
    for want in &dairy_all {
        assert_eq!(&event_id(&next(&mut live).await.unwrap()), want);
    }
    drop(live);

    // Explicitly outside the limit: refused, saying why.
    for prefixes in [vec!["4750002"], vec!["4740001", "4750002"], vec!["474"]] {
        let status = client
            .subscribe(request(
                pb::Filter {
                    gtin_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
                    ..Default::default()
                },
                0,
                false,
                "",
            ))
            .await
            .expect_err("outside the limit");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("4740001"), "{status:?}");
    }
    // Narrower than the limit: allowed, and applied.
    let narrower = pb::Filter {
        gtin_prefixes: vec!["47400010".into()],
        ..Default::default()
    };
    assert_eq!(
        ids(&backfill(&mut client, narrower, 0, "").await),
        dairy_only
    );
    // Exactly the limit: allowed.
    let exact = pb::Filter {
        gtin_prefixes: vec!["4740001".into()],
        ..Default::default()
    };
    assert_eq!(ids(&backfill(&mut client, exact, 0, "").await), dairy_all);

    // The limit is the partner's only: another subscriber sees everything.
    let mut other = signals(&node, &app).await;
    let got = backfill(&mut other, pb::Filter::default(), 0, "").await;
    assert_eq!(ids(&got), everything);
}

// 6. Retention + OUT_OF_RANGE
fn occurred_days_ago(mut e: pb::CustomerEvent, days: i64) -> pb::CustomerEvent {
    e.occurred_at = Some(pbjson_types::Timestamp {
        seconds: unix_now() - days * 86_400,
        nanos: 0,
    });
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_events_and_an_older_cursor_gets_out_of_range() {
    let _shared = EXCLUSIVE.read().await;
    let env = TestEnv::new();
    let mut node = node(
        &env,
        "retailer",
        "[retention]\nmax_age = \"2d\"\ncheck_every = \"1s\"\n",
    );
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    let old: Vec<_> = events("old", 50)
        .into_iter()
        .map(|e| occurred_days_ago(e, 3))
        .collect();
    let recent = events("recent", 30);
    let recent_ids = id_list(&recent);
    publish_all(&mut node.ingest(&eshop).await, old).await;
    publish_all(&mut node.ingest(&eshop).await, recent).await;

    let mut client = signals(&node, &app).await;
    let retained = std::sync::Mutex::new(Vec::new());
    eventually(
        Duration::from_secs(20),
        "retention to remove the old events",
        || {
            let mut client = client.clone();
            let retained = &retained;
            async move {
                // A purge that runs while this backfill streams removes
                // events after its cursor: OUT_OF_RANGE, as documented.
                // Not done yet then; the next attempt starts afresh.
                let mut stream = client
                    .subscribe(request(pb::Filter::default(), 0, false, ""))
                    .await
                    .expect("subscribe")
                    .into_inner();
                let mut got = Vec::new();
                loop {
                    match tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
                        .await
                        .expect("the next signal (or the end) in time")
                    {
                        Ok(Some(s)) => got.push(s),
                        Ok(None) => break,
                        Err(s) if s.code() == tonic::Code::OutOfRange => return false,
                        Err(s) => panic!("signal: {s:?}"),
                    }
                }
                let done = !ids(&got).iter().any(|id| id.starts_with("old-"));
                *retained.lock().unwrap() = got;
                done
            }
        },
    )
    .await;
    let retained = retained.into_inner().unwrap();
    assert_eq!(
        ids(&retained),
        recent_ids,
        "exactly the recent events remain"
    );
    assert_eq!(cursors(&retained), (51..=80).collect::<Vec<u64>>());

    // A cursor inside the removed range: OUT_OF_RANGE, naming the oldest
    // available cursor.
    for after in [1, 49] {
        let status = client
            .subscribe(request(pb::Filter::default(), after, false, ""))
            .await
            .expect_err("cursor before the oldest retained event");
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        let oldest = oldest_cursor(&status);
        assert_eq!(oldest, 50, "resuming after 50 misses nothing retained");
        let resumed = backfill(&mut client, pb::Filter::default(), oldest, "").await;
        assert_eq!(ids(&resumed), recent_ids);
    }
    let from_start = backfill(&mut client, pb::Filter::default(), 0, "").await;
    assert_eq!(ids(&from_start), recent_ids);

    // Old events published after recent ones: retention now removes the
    // newest cursors (81..=100) while 51..=80 stay.
    let newest_old: Vec<_> = events("old2", 20)
        .into_iter()
        .map(|e| occurred_days_ago(e, 3))
        .collect();
    publish_all(&mut node.ingest(&eshop).await, newest_old).await; // cursors 81..=100
    let refused = std::sync::Mutex::new(None);
    eventually(Duration::from_secs(20), "retention to remove old2", || {
        let mut client = client.clone();
        let refused = &refused;
        async move {
            let res = client
                .subscribe(request(pb::Filter::default(), 80, false, ""))
                .await;
            let done = res.is_err();
            *refused.lock().unwrap() = res.err();
            done
        }
    })
    .await;
    let status = refused.into_inner().unwrap().unwrap();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    let oldest = oldest_cursor(&status);
    assert_eq!(oldest, 100, "after 100 nothing was removed: {status:?}");
    let resumed = try_backfill(&mut client, oldest).await.unwrap_or_else(|s| {
        panic!("the node named {oldest} as the oldest available cursor, then refused it: {s:?}")
    });
    assert!(resumed.is_empty());
    // A subscriber from the start still gets everything retained: events
    // removed before it subscribed are no reason to refuse it.
    let got = try_backfill(&mut client, 0).await.unwrap_or_else(|s| {
        panic!("a backfill from 0 must give everything retained, even when retention removed events newer than some retained ones: {s:?}")
    });
    assert_eq!(ids(&got), recent_ids);

    // Sequence numbers are never reused, even when retention removed the
    // newest events and the node restarts.
    node.terminate();
    node.restart();
    publish_all(&mut node.ingest(&eshop).await, events("after-restart", 1)).await;
    let mut client = signals(&node, &app).await;
    let got = backfill(&mut client, pb::Filter::default(), 0, "").await;
    let mut want = recent_ids.clone();
    want.push("after-restart-00000".into());
    assert_eq!(ids(&got), want);
    let newest = got.last().unwrap().cursor;
    assert!(
        newest > 100,
        "cursor {newest} reused a number already given out (up to 100)"
    );
}

/// The oldest available cursor an OUT_OF_RANGE status names, from its
/// metadata; the message must name it too.
fn oldest_cursor(status: &tonic::Status) -> u64 {
    let oldest: u64 = status
        .metadata()
        .get("x-oldest-cursor")
        .expect("x-oldest-cursor metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        status.message().contains(&oldest.to_string()),
        "the message names the oldest available cursor: {status:?}"
    );
    oldest
}

/// An unfiltered backfill after `after`, or the status that ended it.
async fn try_backfill(
    client: &mut SignalsClient,
    after: u64,
) -> Result<Vec<pb::Signal>, tonic::Status> {
    let mut stream = client
        .subscribe(request(pb::Filter::default(), after, false, ""))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(s) = tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
        .await
        .expect("the next signal (or the end) in time")?
    {
        out.push(s);
    }
    Ok(out)
}

// 7. Named subscriptions
async fn ack(client: &mut SignalsClient, name: &str, cursor: u64) -> Result<(), tonic::Status> {
    client
        .ack(pb::AckRequest {
            name: name.to_string(),
            cursor,
        })
        .await
        .map(|_| ())
}

/// Runs `chainsight subscribe --config <client.toml> --name <name>` and
/// returns its stdout lines, each parsed as JSON.
async fn cli_subscribe(client_toml: &std::path::Path, name: &str) -> Vec<serde_json::Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
            .arg("subscribe")
            .arg("--config")
            .arg(client_toml)
            .arg("--name")
            .arg(name)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chainsight subscribe ends (no --follow)")
    .expect("run chainsight subscribe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chainsight subscribe failed: {stderr}"
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.get("event").is_some_and(|e| e.is_object()), "{l}");
            v
        })
        .collect()
}

/// A JSON Signal's cursor (proto3 JSON writes uint64 as a string).
fn json_cursor(v: &serde_json::Value) -> u64 {
    match &v["cursor"] {
        serde_json::Value::String(s) => s.parse().expect("numeric cursor"),
        serde_json::Value::Number(n) => n.as_u64().expect("u64 cursor"),
        other => panic!("no cursor in {v}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_subscription_resumes_after_the_client_restarts() {
    let _shared = EXCLUSIVE.read().await;
    let env = TestEnv::new();
    let mut node = node(&env, "retailer", "");
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    let bi = env.issue("maker-bi");
    let published = events("n", 1000);
    let all_ids = id_list(&published);
    publish_all(&mut node.ingest(&eshop).await, published).await;

    // A consumer reads 300, acknowledges the last, and goes away.
    {
        let mut client = signals(&node, &app).await;
        let mut stream = client
            .subscribe(request(pb::Filter::default(), 0, false, "etl"))
            .await
            .unwrap()
            .into_inner();
        let mut first = Vec::new();
        while first.len() < 300 {
            first.push(next(&mut stream).await.expect("more"));
        }
        assert_eq!(ids(&first), all_ids[..300]);
        drop(stream);
        ack(&mut client, "etl", first.last().unwrap().cursor)
            .await
            .expect("ack");
    }
    // A new client, keeping no cursor of its own, resumes after it.
    let mut client = signals(&node, &app).await;
    let rest = backfill(&mut client, pb::Filter::default(), 0, "etl").await;
    assert_eq!(ids(&rest), all_ids[300..], "exactly events 301..1000");
    assert_eq!(cursors(&rest), (301..=1000).collect::<Vec<u64>>());

    // Names are per identity: maker-bi's "etl" starts from the beginning.
    let mut other = signals(&node, &bi).await;
    let got = backfill(&mut other, pb::Filter::default(), 0, "etl").await;
    assert_eq!(ids(&got), all_ids);
    // An explicit cursor overrides the name's.
    let got = backfill(&mut client, pb::Filter::default(), 990, "etl").await;
    assert_eq!(cursors(&got), (991..=1000).collect::<Vec<u64>>());

    // The acknowledged cursor is durable: it survives a node restart.
    ack(&mut client, "etl", 700).await.expect("ack");
    node.terminate();
    node.restart();
    let mut client = signals(&node, &app).await;
    let got = backfill(&mut client, pb::Filter::default(), 0, "etl").await;
    assert_eq!(cursors(&got), (701..=1000).collect::<Vec<u64>>());

    // An acknowledgement beyond the newest cursor is refused.
    for cursor in [1001, u64::MAX] {
        let status = ack(&mut client, "etl", cursor)
            .await
            .expect_err("beyond the newest cursor");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("cursor"), "{status:?}");
    }

    // Through the CLI: the first run prints everything and acknowledges; the
    // second prints exactly what was published in between.
    let client_toml = node.write_client_toml(env.path(), &app);
    let first_run = cli_subscribe(&client_toml, "cli-etl").await;
    assert_eq!(
        first_run.iter().map(json_cursor).collect::<Vec<_>>(),
        (1..=1000).collect::<Vec<u64>>()
    );
    let more = events("more", 100);
    let more_ids = id_list(&more);
    publish_all(&mut node.ingest(&eshop).await, more).await;
    let second_run = cli_subscribe(&client_toml, "cli-etl").await;
    assert_eq!(second_run.len(), 100, "exactly the 100 new signals");
    assert_eq!(
        second_run.iter().map(json_cursor).collect::<Vec<_>>(),
        (1001..=1100).collect::<Vec<u64>>()
    );
    assert_eq!(
        second_run
            .iter()
            .map(|v| v["event"]["eventId"].as_str().expect("eventId").to_string())
            .collect::<Vec<_>>(),
        more_ids
    );
    // The CLI's name did not move the API consumer's.
    let got = backfill(&mut client, pb::Filter::default(), 0, "etl").await;
    assert_eq!(got.first().map(|s| s.cursor), Some(701));
}

// 8. Roles
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledging_needs_the_subscriber_role() {
    let _shared = EXCLUSIVE.read().await;
    let env = TestEnv::new();
    let node = node(&env, "retailer", "");
    let eshop = env.issue("retailer-eshop");
    let stranger = env.issue("stranger");
    publish_all(&mut node.ingest(&eshop).await, events("a", 5)).await;
    for files in [&eshop, &stranger] {
        let mut client = signals(&node, files).await;
        let status = ack(&mut client, "etl", 1)
            .await
            .expect_err("not a subscriber");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("subscriber"), "{status:?}");
        let status = client
            .subscribe(request(pb::Filter::default(), 0, false, "etl"))
            .await
            .expect_err("not a subscriber");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }
    // A subscriber may.
    let app = env.issue("maker-app");
    ack(&mut signals(&node, &app).await, "etl", 5)
        .await
        .expect("a subscriber acknowledges");
}
