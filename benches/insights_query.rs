//! The typical insight feed (category x region x week over the last 365
//! days) answered in process over a store of N events spread over a year:
//! the planner and rollup read (`insights::run`), the same written straight
//! into the report's protobuf encoding as the node sends it
//! (`insights::run_encoded`), and the client's decoding of it. No network: this
//! isolates the node's own cost; `chainsight bench query` measures the
//! whole path over gRPC and mTLS.
//!
//! `CHAINSIGHT_QUERY_EVENTS` (default 200000) sets N; the store is built
//! once under `target/bench-data/` and reused while N is unchanged.

use std::path::PathBuf;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use prost::Message;

use chainsight::anonymise::Anonymiser;
use chainsight::conversions;
use chainsight::domain::{EventFilter, UnixNanos};
use chainsight::insights::{self, Dim, Query};
use chainsight::rollup::Bucket;
use chainsight::store::{NewEvent, Store};
use chainsight::workload::Workload;

/// The allocator the `chainsight` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A fixed "now" so that a reused store answers the same feed.
const NOW_SECS: i64 = 1_790_000_000;

fn store(rt: &tokio::runtime::Runtime) -> Store {
    let n: u64 = std::env::var("CHAINSIGHT_QUERY_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("insights-query-{n}"));
    // Marks a finished store with the rollup layout it was built with: a
    // store of an older layout is built again.
    let done = dir.join("COMPLETE");
    let layout = chainsight::rollup::Layout::default().signature();
    if std::fs::read_to_string(&done).ok().as_deref() != Some(layout.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench data dir");
        let store = Store::open(&dir, &[]).expect("open store");
        store.check_rollups().expect("fresh store");
        let anonymiser = Anonymiser::new("bench", [7; 32]);
        let mut workload = Workload::new(13, "bench", 50_000, NOW_SECS)
            .with_span_days(365)
            .chronological(n);
        let t = Instant::now();
        rt.block_on(async {
            let mut left = n;
            while left > 0 {
                let batch: Vec<NewEvent> = (0..left.min(1000))
                    .map(|_| {
                        let ev = conversions::customer_event_from_pb(
                            workload.next_event(),
                            UnixNanos(NOW_SECS * 1_000_000_000),
                        )
                        .expect("valid generated event");
                        NewEvent::local(anonymiser.anonymise(ev))
                    })
                    .collect();
                left -= batch.len() as u64;
                store.append(batch).await.expect("append");
            }
            store.close().await.expect("close");
        });
        eprintln!("stored {n} events in {:.1?}", t.elapsed());
        drop(store);
        std::fs::write(&done, &layout).expect("mark complete");
    }
    Store::open(&dir, &[]).expect("reopen store")
}

fn feed() -> Query {
    Query {
        filter: EventFilter {
            since: Some(UnixNanos((NOW_SECS - 365 * 86_400) * 1_000_000_000)),
            ..Default::default()
        },
        group_by: vec![Dim::Category, Dim::Region, Dim::Time],
        attribute_key: None,
        bucket: Some(Bucket::Week),
        limit: 0,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = store(&rt);
    store.check_rollups().expect("rollups of this layout");
    let query = feed();
    let rows = insights::run(&store, &query, 5).expect("query").rows.len();
    eprintln!("the feed has {rows} rows");
    let mut group = c.benchmark_group("insight_feed");
    group.sample_size(30);
    group.bench_function("run", |b| {
        b.iter(|| insights::run(&store, &query, 5).expect("query"))
    });
    // What the node does: the report written straight into its encoding.
    group.bench_function("run_encoded", |b| {
        b.iter(|| insights::run_encoded(&store, &query, 5).expect("query"))
    });
    let encoded = insights::run_encoded(&store, &query, 5)
        .expect("query")
        .bytes;
    eprintln!("the encoded report has {} bytes", encoded.len());
    // What the client does (`client::InsightsClient`), and prost for
    // comparison.
    group.bench_function("client_decode", |b| {
        b.iter(|| chainsight::wire::decode_report(&encoded).expect("decode"))
    });
    group.bench_function("client_decode_prost", |b| {
        b.iter(|| chainsight::pb::InsightReport::decode(encoded.as_ref()).expect("decode"))
    });
    group.finish();
    rt.block_on(store.close()).expect("close");
}

criterion_group!(benches, bench);
criterion_main!(benches);
