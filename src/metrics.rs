//! Prometheus metrics: an optional plain-HTTP endpoint (`[metrics] listen`,
//! loopback by default) serving `GET /metrics` in the OpenMetrics text
//! format, which Prometheus scrapes natively.
//!
//! Two kinds of metric:
//! - **events**, counted where they happen (publish outcomes, stored events,
//!   flush and query latency, suppressed groups): process-wide, in
//!   [`get`], so the code that counts needs no handle;
//! - **state**, read from the store and the links at each scrape (backlog,
//!   connected, subscriber lag, size on disk, audit records): never stale,
//!   and nothing to keep up to date between scrapes.
//!
//! Names follow Prometheus conventions: the `chainsight_` prefix, counters
//! end in `_total`, durations are `_seconds`, sizes `_bytes`.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::propagate::Links;
use crate::store::Store;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An outcome label (`outcome="stored"`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// The metrics counted where things happen.
pub struct Metrics {
    /// Events received by `Ingest.Publish`, by outcome (accepted,
    /// duplicate, rejected).
    pub published: Family<Outcome, Counter>,
    /// Events received on `Peering.Forward` from downstream nodes, by
    /// outcome (stored, duplicate, dropped, refused).
    pub forwarded_in: Family<Outcome, Counter>,
    /// New events written to the store (published or forwarded).
    pub stored: Counter,
    /// Group commits: the time of each flush to disk.
    pub flush_seconds: Histogram,
    /// `Insights.Query`: the time to answer, successful queries only.
    pub query_seconds: Histogram,
    /// `Insights.Query` by outcome (ok, error).
    pub queries: Family<Outcome, Counter>,
    /// Groups left out of answered queries for having fewer than k_min
    /// distinct customers (or not clearing the private release threshold).
    pub suppressed_groups: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    published: Family::default(),
    forwarded_in: Family::default(),
    stored: Counter::default(),
    // 0.25 ms .. ~4 s
    flush_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 15)),
    // 0.5 ms .. ~8 s
    query_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 15)),
    queries: Family::default(),
    suppressed_groups: Counter::default(),
});

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Adds `n` to the `outcome` series of `family`.
    pub fn count(family: &Family<Outcome, Counter>, outcome: &'static str, n: u64) {
        if n > 0 {
            family.get_or_create(&Outcome { outcome }).inc_by(n);
        }
    }
}

/// The subscription streams open now, with the cursor each has reached.
#[derive(Default)]
struct LiveStreams {
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<std::collections::HashMap<u64, OpenStream>>,
}

struct OpenStream {
    identity: String,
    name: String,
    cursor: Arc<std::sync::atomic::AtomicU64>,
}

static STREAMS: LazyLock<LiveStreams> = LazyLock::new(LiveStreams::default);

/// An open subscription stream, counted in the metrics until dropped.
pub struct StreamGuard {
    id: u64,
    cursor: Arc<std::sync::atomic::AtomicU64>,
}

impl StreamGuard {
    /// The stream has reached `cursor`.
    pub fn at(&self, cursor: u64) {
        self.cursor
            .store(cursor, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        lock(&STREAMS.open).remove(&self.id);
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Registers a subscription stream of `identity` (named `name`, or
/// unnamed when empty) starting after `cursor`.
pub fn open_stream(identity: &str, name: &str, cursor: u64) -> StreamGuard {
    let id = STREAMS
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cursor = Arc::new(std::sync::atomic::AtomicU64::new(cursor));
    lock(&STREAMS.open).insert(
        id,
        OpenStream {
            identity: identity.to_string(),
            name: name.to_string(),
            cursor: cursor.clone(),
        },
    );
    StreamGuard { id, cursor }
}

/// The registry a node serves: the event metrics plus its state, read at
/// each scrape.
pub fn registry(store: Store, links: Arc<Links>) -> Registry {
    let m = get();
    let mut r = Registry::with_prefix("chainsight");
    r.register(
        "publish_events",
        "Events received by Ingest.Publish, by outcome (accepted, duplicate, rejected)",
        m.published.clone(),
    );
    r.register(
        "forward_received_events",
        "Events received from downstream nodes on Peering.Forward, by outcome (stored, duplicate, dropped, refused)",
        m.forwarded_in.clone(),
    );
    r.register(
        "events_stored",
        "New events written to the store since the node started (published or forwarded)",
        m.stored.clone(),
    );
    r.register_with_unit(
        "store_flush_duration",
        "Time of each group commit's flush to disk",
        Unit::Seconds,
        m.flush_seconds.clone(),
    );
    r.register_with_unit(
        "query_duration",
        "Time to answer Insights.Query (answered queries)",
        Unit::Seconds,
        m.query_seconds.clone(),
    );
    r.register(
        "queries",
        "Insights.Query requests, by outcome (ok, error)",
        m.queries.clone(),
    );
    r.register(
        "query_suppressed_groups",
        "Groups left out of query answers for having fewer than k_min distinct customers",
        m.suppressed_groups.clone(),
    );
    r.register_collector(Box::new(NodeState { store, links }));
    r
}

/// Encodes `registry` in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The node's state, read at each scrape.
struct NodeState {
    store: Store,
    links: Arc<Links>,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState").finish_non_exhaustive()
    }
}

/// Writes one unlabelled gauge.
fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// Seconds as a gauge value.
fn seconds(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

impl Collector for NodeState {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // A store read that fails leaves its metric out of this scrape
        // (and says why in the log) rather than failing the whole scrape.
        let warn = |what: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(error = %e, "metrics: could not read {what}");
        };
        match self.store.last_seq() {
            Ok(seq) => gauge(
                &mut encoder,
                "store_last_seq",
                "The highest sequence number the store has used (events ever stored here)",
                None,
                seq as i64,
            )?,
            Err(e) => warn("the last sequence number", &e),
        }
        match self.store.size_on_disk() {
            Ok(bytes) => gauge(
                &mut encoder,
                "store_size",
                "Bytes the sled store occupies on disk",
                Some(&Unit::Bytes),
                bytes as i64,
            )?,
            Err(e) => warn("the store's size on disk", &e),
        }
        gauge(
            &mut encoder,
            "audit_records",
            "Records in the audit trail",
            None,
            self.store.audit_len() as i64,
        )?;

        let links = self.links.status(&self.store);
        let per_link = |encoder: &mut DescriptorEncoder<'_>,
                        name: &str,
                        help: &str,
                        unit: Option<&Unit>,
                        value: &dyn Fn(&crate::propagate::LinkStatus) -> i64|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
            for l in &links {
                let labels = [("link", l.id.as_str())];
                ConstGauge::new(value(l)).encode(family.encode_family(&labels)?)?;
            }
            Ok(())
        };
        per_link(
            &mut encoder,
            "link_backlog_events",
            "Events waiting in an upstream link's outbox",
            None,
            &|l| l.backlog as i64,
        )?;
        per_link(
            &mut encoder,
            "link_connected",
            "1 while the link's connection to its upstream node is up",
            None,
            &|l| i64::from(l.connected),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "link_oldest_unacknowledged_age",
                "Age of the oldest event in the link's outbox (0 when empty)",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for l in &links {
                let labels = [("link", l.id.as_str())];
                let age = l.oldest_unacked.map_or(0.0, seconds);
                ConstGauge::new(age).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "link_acknowledged_events",
                "Events the upstream node acknowledged on this link since the node started",
                None,
                MetricType::Counter,
            )?;
            for l in &links {
                let labels = [("link", l.id.as_str())];
                ConstCounter::new(l.acknowledged).encode(family.encode_family(&labels)?)?;
            }
        }

        let head = self.store.last_seq().unwrap_or(0);
        match self.store.named_cursors() {
            Ok(cursors) => {
                let mut family = encoder.encode_descriptor(
                    "subscriber_lag_events",
                    "Events stored after a named subscription's acknowledged cursor (all events, whatever the subscription's filter)",
                    None,
                    MetricType::Gauge,
                )?;
                for (identity, name, cursor) in &cursors {
                    let labels = [
                        ("identity", identity.as_str()),
                        ("subscription", name.as_str()),
                    ];
                    ConstGauge::new(head.saturating_sub(*cursor) as i64)
                        .encode(family.encode_family(&labels)?)?;
                }
            }
            Err(e) => warn("the subscriber cursors", &e),
        }

        // Open streams: per identity and subscription name, how many and
        // the largest lag among them.
        let mut open: std::collections::BTreeMap<(String, String), (u64, u64)> =
            std::collections::BTreeMap::new();
        for s in lock(&STREAMS.open).values() {
            let at = s.cursor.load(std::sync::atomic::Ordering::Relaxed);
            let entry = open
                .entry((s.identity.clone(), s.name.clone()))
                .or_insert((0, 0));
            entry.0 += 1;
            entry.1 = entry.1.max(head.saturating_sub(at));
        }
        let label = |name: &str| {
            if name.is_empty() {
                "(unnamed)".to_string()
            } else {
                name.to_string()
            }
        };
        {
            let mut family = encoder.encode_descriptor(
                "subscriber_streams",
                "Subscription streams open now",
                None,
                MetricType::Gauge,
            )?;
            for ((identity, name), (count, _)) in &open {
                let name = label(name);
                let labels = [
                    ("identity", identity.as_str()),
                    ("subscription", name.as_str()),
                ];
                ConstGauge::new(*count as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "subscriber_stream_lag_events",
                "Events stored after the cursor an open subscription stream has reached (the largest among a subscription's streams)",
                None,
                MetricType::Gauge,
            )?;
            for ((identity, name), (_, lag)) in &open {
                let name = label(name);
                let labels = [
                    ("identity", identity.as_str()),
                    ("subscription", name.as_str()),
                ];
                ConstGauge::new(*lag as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
#[error("could not listen for metrics on {addr}: {source} (change [metrics] listen)")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` and serves `GET /metrics` from `registry` until `token` is
/// cancelled; returns the bound address (for port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    token: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BindError> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the metrics endpoint is plain HTTP without authentication and listens beyond loopback; restrict access to it");
    }
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                // The state part reads the store: off the runtime threads.
                match tokio::task::spawn_blocking(move || encode(&registry)).await {
                    Ok(Ok(body)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
                    _ => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "could not encode the metrics",
                    )
                        .into_response(),
                }
            }
        }),
    );
    let task = tokio::spawn(
        async move {
            let shutdown = token.cancelled_owned();
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        }
        .instrument(tracing::info_span!("metrics", %bound)),
    );
    tracing::info!(%bound, "metrics served at http://{bound}/metrics");
    Ok((bound, task))
}
