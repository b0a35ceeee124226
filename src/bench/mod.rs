//! `chainsight bench`: benchmark scenarios against real node processes on
//! loopback, with real mTLS and real sled directories. Each scenario prints
//! a human summary and, with `--json FILE`, writes its figures as JSON.
//!
//! `propagate`: a retailer → distributor → manufacturer chain. At a fixed
//! offered rate it measures the latency from the publish acknowledgement at
//! the retailer (flushed there) to the event's delivery by a following
//! subscriber at the manufacturer (which only sees flushed events) — so the
//! figure includes two forwards, two flushes and the subscription's hand-off.
//! Then it stops the distributor, lets the retailer accumulate a backlog,
//! restarts the distributor and measures how fast the backlog drains to the
//! manufacturer.

pub mod nats;
pub mod scenarios;
pub mod suite;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};

pub use crate::chain::Error;
use crate::chain::{err, LocalChain, NodeSpec};
use crate::pb;
use crate::workload::Workload;

/// Settings of `bench propagate`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PropagateOptions {
    /// Offered publish rate, events per second.
    pub rate: u64,
    /// How long to publish at that rate, seconds.
    pub duration_secs: u64,
    /// Events per publish request in the latency phase.
    pub batch: usize,
    /// Size of the backlog whose drain is measured.
    pub backlog: usize,
    /// Nodes do not sign events (`[trust] sign = false`): the cost of
    /// origin proofs is the difference.
    pub unsigned: bool,
    /// Also write each event of the latency phase to this file: when the
    /// retailer acknowledged it (Unix seconds) and how long it took to
    /// reach the manufacturer (ms), one event per line, in the order
    /// acknowledged — to see when in a run the tail happens.
    #[serde(skip)]
    pub samples: Option<std::path::PathBuf>,
}

impl Default for PropagateOptions {
    fn default() -> Self {
        PropagateOptions {
            rate: 5_000,
            duration_secs: 10,
            batch: 50,
            backlog: 100_000,
            unsigned: false,
            samples: None,
        }
    }
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of `samples` (sorted here).
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                return 0;
            }
            let i = ((samples.len() - 1) as f64 * q).round() as usize;
            samples[i].as_micros() as u64
        };
        Percentiles {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: at(1.0),
            samples: samples.len(),
        }
    }
}

/// What `bench propagate` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PropagateReport {
    pub scenario: &'static str,
    pub parameters: PropagateOptions,
    pub machine: String,
    pub offered_events_per_s: f64,
    pub achieved_publish_events_per_s: f64,
    pub end_to_end_latency: Percentiles,
    pub publish_ack_latency: Percentiles,
    pub backlog_events: usize,
    pub backlog_publish_events_per_s: f64,
    pub drain_seconds: f64,
    pub drain_events_per_s: f64,
    /// From the distributor's restart to the first backlog event at the
    /// manufacturer: the store's open and the retailer's reconnect (its
    /// link retries with a growing backoff while the distributor is down).
    pub drain_first_arrival_seconds: f64,
    /// The backlog over the time from its first event's arrival at the
    /// manufacturer to its last's: the rate of the flow itself.
    pub drain_flow_events_per_s: f64,
}

const RETAILER: &str = "retailer";
const DISTRIBUTOR: &str = "distributor";
const MANUFACTURER: &str = "manufacturer";
const CLIENT: &str = "bench";

fn chain_specs(unsigned: bool) -> Vec<NodeSpec> {
    let extra = if unsigned {
        "[trust]\nsign = false\n"
    } else {
        ""
    };
    let spec = |id: &str, roles: &[&str], up: Option<&str>| NodeSpec {
        id: id.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        upstreams: up
            .map(|u| (u.to_string(), String::new()))
            .into_iter()
            .collect(),
        extra: extra.to_string(),
    };
    vec![
        spec(
            MANUFACTURER,
            &[
                "downstream = [\"distributor\"]",
                "subscribers = [\"bench\"]",
            ],
            None,
        ),
        spec(
            DISTRIBUTOR,
            &["downstream = [\"retailer\"]"],
            Some(MANUFACTURER),
        ),
        spec(RETAILER, &["publishers = [\"bench\"]"], Some(DISTRIBUTOR)),
    ]
}

/// Arrival times of events at the manufacturer's subscriber.
struct Arrivals {
    times: Arc<Mutex<HashMap<String, Instant>>>,
    count: watch::Receiver<usize>,
}

impl Arrivals {
    /// Latency from each acknowledgement to the event's arrival.
    fn latencies(&self, acks: &Acks) -> Vec<Duration> {
        let times = self
            .times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        acks.iter()
            .filter_map(|(id, acked)| {
                times
                    .get(id)
                    .map(|arrived| arrived.saturating_duration_since(*acked))
            })
            .collect()
    }

    async fn follow_from(chain: &LocalChain, node: &str, after: u64) -> Result<Self, Error> {
        let channel = chain.channel(node, CLIENT).await?;
        let mut stream = pb::signals_client::SignalsClient::new(channel)
            .subscribe(pb::SubscribeRequest {
                filter: None,
                after_cursor: after,
                follow: true,
                name: String::new(),
            })
            .await
            .map_err(|e| err("subscribe")(e.message().to_string()))?
            .into_inner();
        let times: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let (tx, count) = watch::channel(0usize);
        let t = times.clone();
        tokio::spawn(async move {
            while let Ok(Some(signal)) = stream.message().await {
                let now = Instant::now();
                if let Some(ev) = signal.event {
                    let mut map = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    map.insert(ev.event_id, now);
                    tx.send_replace(map.len());
                }
            }
        });
        Ok(Arrivals { times, count })
    }

    async fn wait_for(&mut self, n: usize, within: Duration) -> Result<(), Error> {
        let waited = tokio::time::timeout(within, self.count.wait_for(|c| *c >= n))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(err("wait for arrivals")("the subscription ended".into())),
            Err(_) => Err(err("wait for arrivals")(format!(
                "only {} of {n} arrived within {within:?}",
                *self.count.borrow()
            ))),
        }
    }
}

/// Writes `bench propagate --samples`: per acknowledged event, in the
/// order acknowledged, the acknowledgement's wall-clock time (Unix
/// seconds) and the end-to-end latency (ms).
fn write_samples(
    path: &std::path::Path,
    acks: &[(String, Instant)],
    arrivals: &Arrivals,
) -> Result<(), Error> {
    use std::fmt::Write as _;
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let wall = wall
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let times = arrivals
        .times
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = String::with_capacity(acks.len() * 24);
    for (id, acked) in acks {
        if let Some(arrived) = times.get(id) {
            let at = wall - now.duration_since(*acked).as_secs_f64();
            let ms = arrived.saturating_duration_since(*acked).as_secs_f64() * 1e3;
            let _ = writeln!(out, "{at:.6} {ms:.3}");
        }
    }
    std::fs::write(path, &out)
        .map_err(|e| crate::chain::err("writing the samples")(format!("{}: {e}", path.display())))
}

/// Runs `bench propagate`.
pub async fn propagate(opts: PropagateOptions) -> Result<suite::Figures, Error> {
    let mut chain =
        LocalChain::create("chainsight-bench-", &chain_specs(opts.unsigned), &[CLIENT])?;
    for id in [MANUFACTURER, DISTRIBUTOR, RETAILER] {
        chain.start(id).await?;
    }
    let mut arrivals = Arrivals::follow_from(&chain, MANUFACTURER, 0).await?;
    let pids: Vec<u32> = [RETAILER, DISTRIBUTOR, MANUFACTURER]
        .iter()
        .filter_map(|id| chain.pid(id))
        .collect();
    let meter = suite::CpuMeter::start(&pids);
    let mut workload = suite::Payloads::new(7);

    // Phase 1: latency at a fixed offered rate.
    tracing::info!("propagate: offering {} events/s for {} s at the retailer, measuring until delivery at the manufacturer",
        opts.rate, opts.duration_secs
    );
    let (acks, publish_latency, elapsed) = offer(
        &chain,
        RETAILER,
        &mut workload,
        opts.rate,
        opts.batch,
        opts.duration_secs,
    )
    .await?;
    let sent = acks.len();
    arrivals.wait_for(sent, Duration::from_secs(120)).await?;
    let e2e: Vec<Duration> = {
        let times = arrivals
            .times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        acks.iter()
            .filter_map(|(id, acked)| {
                times
                    .get(id)
                    .map(|arrived| arrived.saturating_duration_since(*acked))
            })
            .collect()
    };

    if let Some(path) = &opts.samples {
        write_samples(path, &acks, &arrivals)?;
    }
    // Phase 2: a backlog builds while the distributor is down, then drains.
    tracing::info!(
        "propagate: stopping the distributor, publishing a backlog of {} events",
        opts.backlog
    );
    chain.stop(DISTRIBUTOR).await?;
    let t = Instant::now();
    publish_bulk(&chain, RETAILER, workload, opts.backlog).await?;
    let backlog_rate = opts.backlog as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    chain.start(DISTRIBUTOR).await?;
    arrivals
        .wait_for(sent + opts.backlog, Duration::from_secs(600))
        .await?;
    let drain = t.elapsed().as_secs_f64();
    let (first_arrival, flow) = {
        let phase_one: std::collections::HashSet<&str> =
            acks.iter().map(|(id, _)| id.as_str()).collect();
        let times = arrivals
            .times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let backlog: Vec<Instant> = times
            .iter()
            .filter(|(id, _)| !phase_one.contains(id.as_str()))
            .map(|(_, at)| *at)
            .collect();
        match (backlog.iter().min(), backlog.iter().max()) {
            (Some(first), Some(last)) => (
                first.saturating_duration_since(t).as_secs_f64(),
                backlog.len() as f64 / last.duration_since(*first).as_secs_f64().max(1e-3),
            ),
            _ => (drain, 0.0),
        }
    };
    // The distributor was restarted: its CPU before the stop is not in
    // /proc any more, so CPU covers the retailer and manufacturer fully and
    // the distributor's first run.
    let (cpu, rss) = meter.stop();
    let delivered = arrivals
        .times
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len();

    for id in [RETAILER, DISTRIBUTOR, MANUFACTURER] {
        chain.stop(id).await?;
    }
    let disk: u64 = [RETAILER, DISTRIBUTOR, MANUFACTURER]
        .iter()
        .map(|id| suite::dir_bytes(&chain.data_dir(id)))
        .sum();
    let report = PropagateReport {
        scenario: "propagate",
        machine: machine(),
        offered_events_per_s: opts.rate as f64,
        achieved_publish_events_per_s: sent as f64 / elapsed.as_secs_f64(),
        end_to_end_latency: Percentiles::of(e2e),
        publish_ack_latency: Percentiles::of(publish_latency),
        backlog_events: opts.backlog,
        backlog_publish_events_per_s: backlog_rate,
        drain_seconds: drain,
        drain_events_per_s: opts.backlog as f64 / drain,
        drain_first_arrival_seconds: first_arrival,
        drain_flow_events_per_s: flow,
        parameters: opts,
    };
    print_report(&report);
    let total = (sent + report.backlog_events) as u64;
    let mut fig = suite::Figures::new("propagate", "chainsight", &report.parameters);
    fig.events_sent = total;
    // Every publish above was answered (an error ends the bench).
    fig.events_acknowledged = total;
    fig.events_stored = delivered as u64;
    fig.seconds = elapsed.as_secs_f64();
    fig.events_per_s = report.achieved_publish_events_per_s;
    fig.latency = Some(report.end_to_end_latency.clone());
    fig.cpu_seconds_per_million_events = cpu * 1e6 / total.max(1) as f64;
    fig.peak_rss_bytes = rss;
    fig.disk_bytes = disk;
    for (k, v) in [
        ("offered_events_per_s", report.offered_events_per_s),
        (
            "achieved_publish_events_per_s",
            report.achieved_publish_events_per_s,
        ),
        (
            "publish_ack_p99_us",
            report.publish_ack_latency.p99_us as f64,
        ),
        ("backlog_events", report.backlog_events as f64),
        ("drain_seconds", report.drain_seconds),
        ("drain_events_per_s", report.drain_events_per_s),
        (
            "drain_first_arrival_seconds",
            report.drain_first_arrival_seconds,
        ),
        ("drain_flow_events_per_s", report.drain_flow_events_per_s),
    ] {
        fig.extra.insert(k.into(), v);
    }
    Ok(fig)
}

/// Settings of `bench subscribe`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscribeOptions {
    /// Events stored before the backfill is measured.
    pub events: usize,
    /// Offered publish rate while live latency is measured, events per second.
    pub rate: u64,
    /// Seconds of live publishing.
    pub duration_secs: u64,
    /// Events per publish request in the live phase.
    pub batch: usize,
    #[serde(skip)]
    pub json: Option<PathBuf>,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            events: 1_000_000,
            rate: 2_000,
            duration_secs: 5,
            batch: 20,
            json: None,
        }
    }
}

/// What `bench subscribe` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscribeReport {
    pub scenario: &'static str,
    pub parameters: SubscribeOptions,
    pub machine: String,
    pub bulk_publish_events_per_s: f64,
    pub backfill_events: u64,
    pub backfill_seconds: f64,
    pub backfill_events_per_s: f64,
    pub live_latency: Percentiles,
}

/// Runs `bench subscribe`: one node; a bulk load, the backfill rate of one
/// subscriber over it, then the latency from publish acknowledgement to
/// delivery to a following subscriber at a fixed offered rate.
pub async fn subscribe(opts: SubscribeOptions) -> Result<SubscribeReport, Error> {
    let spec = NodeSpec {
        id: RETAILER.into(),
        roles: vec![
            "publishers = [\"bench\"]".into(),
            "subscribers = [\"bench\"]".into(),
        ],
        ..NodeSpec::default()
    };
    let mut chain = LocalChain::create("chainsight-bench-", &[spec], &[CLIENT])?;
    chain.start(RETAILER).await?;
    let now = crate::domain::UnixNanos::now().0 / 1_000_000_000;
    let workload = Workload::new(11, "bench", 20_000, now);
    tracing::info!("subscribe: storing {} events", opts.events);
    let t = Instant::now();
    let mut workload = publish_bulk(&chain, RETAILER, workload, opts.events).await?;
    let bulk_rate = opts.events as f64 / t.elapsed().as_secs_f64();

    tracing::info!("subscribe: one subscriber backfills all of them");
    let t = Instant::now();
    let mut stream = pb::signals_client::SignalsClient::new(chain.channel(RETAILER, CLIENT).await?)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .map_err(|e| err("subscribe")(e.message().to_string()))?
        .into_inner();
    let mut backfilled = 0u64;
    let mut last = 0;
    while let Some(signal) = stream
        .message()
        .await
        .map_err(|e| err("backfill")(e.message().to_string()))?
    {
        backfilled += 1;
        last = signal.cursor;
    }
    let backfill = t.elapsed().as_secs_f64();

    tracing::info!(
        "subscribe: live delivery at {} events/s for {} s",
        opts.rate,
        opts.duration_secs
    );
    let mut arrivals = Arrivals::follow_from(&chain, RETAILER, last).await?;
    let (acks, _, _) = offer(
        &chain,
        RETAILER,
        &mut workload,
        opts.rate,
        opts.batch,
        opts.duration_secs,
    )
    .await?;
    arrivals
        .wait_for(acks.len(), Duration::from_secs(120))
        .await?;
    let live = arrivals.latencies(&acks);
    chain.stop(RETAILER).await?;

    let report = SubscribeReport {
        scenario: "subscribe",
        machine: machine(),
        bulk_publish_events_per_s: bulk_rate,
        backfill_events: backfilled,
        backfill_seconds: backfill,
        backfill_events_per_s: backfilled as f64 / backfill,
        live_latency: Percentiles::of(live),
        parameters: opts,
    };
    println!("\nsubscribe on {}", report.machine);
    println!(
        "  bulk publish: {:.0} events/s",
        report.bulk_publish_events_per_s
    );
    println!(
        "  backfill: {} events in {:.2} s = {:.0} events/s",
        report.backfill_events, report.backfill_seconds, report.backfill_events_per_s
    );
    println!(
        "  live delivery, publish ack -> subscriber: {}",
        format_percentiles(&report.live_latency)
    );
    write_json(&report, report.parameters.json.as_deref())?;
    Ok(report)
}

impl QueryReport {
    /// The suite's figures: one entry per store size.
    pub fn figures(&self) -> Vec<suite::Figures> {
        self.sizes
            .iter()
            .map(|s| {
                let mut params = serde_json::to_value(&self.parameters).unwrap_or_default();
                params["size"] = serde_json::json!(s.stored_events);
                let mut fig = suite::Figures::new("query", "chainsight", &params);
                let n = s.stored_events as u64;
                (fig.events_sent, fig.events_acknowledged, fig.events_stored) = (n, n, n);
                fig.seconds = n as f64 / s.ingest_events_per_s.max(f64::MIN_POSITIVE);
                fig.events_per_s = s.ingest_events_per_s;
                fig.latency = Some(s.latency.clone());
                fig.peak_rss_bytes = s.peak_rss_bytes;
                fig.disk_bytes = s.disk_bytes;
                for (k, v) in [
                    ("rows", s.rows as f64),
                    ("node_p50_us", s.server.p50_us as f64),
                    ("node_p99_us", s.server.p99_us as f64),
                    ("limit_10_p99_us", s.latency_limit_10.p99_us as f64),
                    ("first_query_us", s.first_query_us as f64),
                    (
                        "ingest_with_rollups_events_per_s",
                        self.ingest_with_rollups_events_per_s,
                    ),
                    (
                        "ingest_without_rollups_events_per_s",
                        self.ingest_without_rollups_events_per_s,
                    ),
                ] {
                    fig.extra.insert(k.into(), v);
                }
                fig
            })
            .collect()
    }
}

fn write_json(report: &impl serde::Serialize, path: Option<&std::path::Path>) -> Result<(), Error> {
    let Some(path) = path else { return Ok(()) };
    let json =
        serde_json::to_string_pretty(report).map_err(|e| err("write JSON")(e.to_string()))?;
    std::fs::write(path, json)
        .map_err(|e| err("write JSON")(format!("{}: {e}", path.display())))?;
    println!("figures written to {}", path.display());
    Ok(())
}

fn format_percentiles(x: &Percentiles) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        x.p50_us as f64 / 1000.0,
        x.p90_us as f64 / 1000.0,
        x.p99_us as f64 / 1000.0,
        x.max_us as f64 / 1000.0,
        x.samples
    )
}

/// Settings of `bench query`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryOptions {
    /// Store sizes to measure at (events, spread over one year).
    pub sizes: Vec<usize>,
    /// Queries timed per size.
    pub queries: usize,
    /// Events published to compare ingest with rollups on and off.
    pub cost_events: usize,
}

impl Default for QueryOptions {
    fn default() -> Self {
        QueryOptions {
            sizes: vec![1_000_000],
            queries: 50,
            cost_events: 200_000,
        }
    }
}

/// One size of `bench query`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuerySize {
    pub stored_events: usize,
    pub ingest_events_per_s: f64,
    pub rows: usize,
    /// At the client: request sent to report decoded, over gRPC and mTLS.
    pub latency: Percentiles,
    /// In the node: reading the rollups to the finished report (from its
    /// log), without encoding and transport.
    pub server: Percentiles,
    /// At the client, the same feed limited to 10 rows: the node does the
    /// same work, little is encoded and sent.
    pub latency_limit_10: Percentiles,
    /// The node's peak resident set size and data directory at the end.
    pub peak_rss_bytes: u64,
    pub disk_bytes: u64,
    /// At the client, the first query after the bulk load (its periods
    /// read from disk into the node's cache); not among the timed ones.
    pub first_query_us: u64,
    /// Untimed queries before the timed ones, the first included (at
    /// least 3, over at least [`WARM_UP`]).
    pub warm_up_queries: usize,
}

/// How long `bench query` warms up before timing (criterion's default).
const WARM_UP: Duration = Duration::from_secs(3);

/// What `bench query` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryReport {
    pub scenario: &'static str,
    pub parameters: QueryOptions,
    pub machine: String,
    pub feed: &'static str,
    pub sizes: Vec<QuerySize>,
    pub ingest_with_rollups_events_per_s: f64,
    pub ingest_without_rollups_events_per_s: f64,
}

const FEED: &str = "group by category x region x week over the last 365 days (events stored in time order, as history accumulates)";

fn feed_query(now_secs: i64) -> pb::InsightQuery {
    feed_query_limit(now_secs, 0)
}

/// The feed with at most `limit` rows (0: all).
fn feed_query_limit(now_secs: i64, limit: u32) -> pb::InsightQuery {
    pb::InsightQuery {
        limit,
        filter: Some(pb::Filter {
            since: Some(pbjson_types::Timestamp {
                seconds: now_secs - 365 * 86_400,
                nanos: 0,
            }),
            ..Default::default()
        }),
        group_by: vec![
            pb::Dimension::Category as i32,
            pb::Dimension::Region as i32,
            pb::Dimension::Time as i32,
        ],
        bucket: pb::TimeBucket::Week as i32,
        ..Default::default()
    }
}

/// Runs `bench query`: the typical feed's latency at each store size, and
/// the ingest cost of maintaining rollups.
pub async fn query(opts: QueryOptions) -> Result<QueryReport, Error> {
    let now = crate::domain::UnixNanos::now().0 / 1_000_000_000;
    let mut sizes = Vec::new();
    for &n in &opts.sizes {
        let spec = NodeSpec {
            id: RETAILER.into(),
            roles: vec![
                "publishers = [\"bench\"]".into(),
                "analysts = [\"bench\"]".into(),
            ],
            ..NodeSpec::default()
        };
        let mut chain = LocalChain::create("chainsight-bench-", &[spec], &[CLIENT])?;
        chain.start(RETAILER).await?;
        tracing::info!("query: storing {n} events spread over a year");
        let mut workload = Workload::new(13, "bench", 50_000, now)
            .with_span_days(365)
            .chronological(n as u64);
        let t = Instant::now();
        workload = publish_bulk(&chain, RETAILER, workload, n).await?;
        let ingest = n as f64 / t.elapsed().as_secs_f64();
        let mut client = crate::client::InsightsClient::new(chain.channel(RETAILER, CLIENT).await?);
        // Warm-up: let the node finish the background work of the bulk
        // load (the last rollup checkpoints, sled's flushes of dirty
        // pages), so that the timed queries measure the feed on a store of
        // n events rather than beside its ingest; then run the feed a few
        // times untimed.
        let pid = chain
            .pid(RETAILER)
            .ok_or_else(|| err("find the node process")("not running".into()))?;
        let (waited, idle) = suite::wait_idle(pid, Duration::from_secs(120)).await;
        tracing::info!(?waited, idle, "query: the node is idle after the bulk load");
        // The load wrote gigabytes, which the kernel may still be writing
        // back; a store that grew over a year has no such backlog.
        suite::write_back(&chain.data_dir(RETAILER)).await;
        // The first query after the load reads the year's periods from
        // disk into the node's cache: reported apart (`first_query_us`).
        // Then warm-up as criterion does, for a time rather than a count.
        let t = Instant::now();
        let mut untimed = 0;
        let mut first = None;
        while untimed < 3 || t.elapsed() < WARM_UP {
            let q = Instant::now();
            client
                .query(feed_query(now))
                .await
                .map_err(|e| err("query")(e.message().to_string()))?;
            first.get_or_insert(q.elapsed());
            untimed += 1;
        }
        let first_query = first.unwrap_or_default();
        tracing::info!(?first_query, untimed, "query: warmed up");
        let warmups = chain.log(RETAILER).matches("query answered").count();
        let mut latencies = Vec::with_capacity(opts.queries);
        let mut rows = 0;
        for _ in 0..opts.queries.max(1) {
            let t = Instant::now();
            let report = client
                .query(feed_query(now))
                .await
                .map_err(|e| err("query")(e.message().to_string()))?
                .into_inner();
            latencies.push(t.elapsed());
            rows = report.rows.len();
        }
        let mut small = Vec::with_capacity(opts.queries);
        for _ in 0..opts.queries.max(1) {
            let t = Instant::now();
            client
                .query(feed_query_limit(now, 10))
                .await
                .map_err(|e| err("query")(e.message().to_string()))?;
            small.push(t.elapsed());
        }
        let peak_rss_bytes = chain
            .pid(RETAILER)
            .map_or(0, |p| suite::ProcSample::read(p).peak_rss_bytes);
        chain.stop(RETAILER).await?;
        let disk_bytes = suite::dir_bytes(&chain.data_dir(RETAILER));
        let server: Vec<Duration> = chain
            .log(RETAILER)
            .lines()
            .filter(|l| l.contains("query answered"))
            .skip(warmups)
            .take(opts.queries.max(1))
            .filter_map(|l| l.split("elapsed=").nth(1))
            .filter_map(|d| parse_debug_duration(d.split_whitespace().next()?))
            .collect();
        let size = QuerySize {
            stored_events: n,
            ingest_events_per_s: ingest,
            rows,
            latency: Percentiles::of(latencies),
            server: Percentiles::of(server),
            latency_limit_10: Percentiles::of(small),
            peak_rss_bytes,
            disk_bytes,
            first_query_us: first_query.as_micros() as u64,
            warm_up_queries: untimed,
        };
        println!(
            "  {n} events: {} ({} rows); in the node: {}",
            format_percentiles(&size.latency),
            size.rows,
            format_percentiles(&size.server)
        );
        sizes.push(size);
    }
    let with = ingest_rate(opts.cost_events, true, now).await?;
    let without = ingest_rate(opts.cost_events, false, now).await?;
    let report = QueryReport {
        scenario: "query",
        machine: machine(),
        feed: FEED,
        sizes,
        ingest_with_rollups_events_per_s: with,
        ingest_without_rollups_events_per_s: without,
        parameters: opts,
    };
    println!("\nquery on {}: {}", report.machine, report.feed);
    for s in &report.sizes {
        println!(
            "  {:>10} events: {} ({} rows; ingest {:.0} events/s)",
            s.stored_events,
            format_percentiles(&s.latency),
            s.rows,
            s.ingest_events_per_s
        );
        println!(
            "  {:>10}  in the node: {}",
            "",
            format_percentiles(&s.server)
        );
        println!(
            "  {:>10}  limited to 10 rows: {}",
            "",
            format_percentiles(&s.latency_limit_10)
        );
        println!(
            "  {:>10}  first query after the load (cold cache): {:.2} ms; {} untimed queries in all",
            "",
            s.first_query_us as f64 / 1000.0,
            s.warm_up_queries
        );
    }
    println!(
        "  ingest of {} events: {:.0} events/s with rollups, {:.0} events/s without",
        report.parameters.cost_events, with, without
    );
    Ok(report)
}

/// A `Duration` as `{:?}` prints it ("850µs", "1.16ms", "2.5s").
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ns" => value / 1e9,
        "µs" | "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

async fn ingest_rate(n: usize, rollups: bool, now: i64) -> Result<f64, Error> {
    let spec = NodeSpec {
        id: RETAILER.into(),
        roles: vec!["publishers = [\"bench\"]".into()],
        extra: format!("[insights]\nrollups = {rollups}\n"),
        ..NodeSpec::default()
    };
    let mut chain = LocalChain::create("chainsight-bench-", &[spec], &[CLIENT])?;
    chain.start(RETAILER).await?;
    let workload = Workload::new(17, "bench", 50_000, now)
        .with_span_days(365)
        .chronological(n as u64);
    let t = Instant::now();
    publish_bulk(&chain, RETAILER, workload, n).await?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    chain.stop(RETAILER).await?;
    Ok(rate)
}

type Acks = Vec<(String, Instant)>;

/// Publishes at the offered rate (a batch every 10 ms, each request on its
/// own task so a slow acknowledgement does not lower the offered rate).
async fn offer(
    chain: &LocalChain,
    node: &str,
    workload: &mut impl suite::EventSource,
    rate: u64,
    batch: usize,
    duration_secs: u64,
) -> Result<(Acks, Vec<Duration>, Duration), Error> {
    let client = pb::ingest_client::IngestClient::new(chain.channel(node, CLIENT).await?);
    let acks: Arc<Mutex<Acks>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let inflight = Arc::new(Semaphore::new(512));
    let batches_per_s = (rate as f64 / batch.max(1) as f64).max(1.0);
    let total_batches = (batches_per_s * duration_secs as f64).round() as u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / batches_per_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total_batches {
        tick.tick().await;
        let events: Vec<_> = (0..batch).map(|_| workload.next_event()).collect();
        let permit = inflight
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| err("publish")(e.to_string()))?;
        let (mut client, acks, latencies) = (client.clone(), acks.clone(), latencies.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
            let sent = Instant::now();
            let resp = client.publish(pb::PublishRequest { events }).await;
            let acked = Instant::now();
            resp.map_err(|e| err("publish")(e.message().to_string()))?;
            latencies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(acked - sent);
            acks.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(ids.into_iter().map(|id| (id, acked)));
            Ok::<(), Error>(())
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.map_err(|e| err("publish")(e.to_string()))??;
    }
    let elapsed = started.elapsed();
    Ok((take(&acks), take(&latencies), elapsed))
}

fn take<T: Default>(m: &Mutex<T>) -> T {
    std::mem::take(&mut *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Publishes `n` events as fast as the node takes them (streaming, 8 batches in flight).
async fn publish_bulk<S: suite::EventSource>(
    chain: &LocalChain,
    node: &str,
    mut gen: S,
    n: usize,
) -> Result<S, Error> {
    let mut client = pb::ingest_client::IngestClient::new(chain.channel(node, CLIENT).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} publishing [{bar:40}] {pos}/{len} ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // The generator runs on its own thread so publishing never waits for it.
    let feeder = tokio::task::spawn_blocking(move || {
        for i in 0..n.div_ceil(1000) {
            let events = (0..1000.min(n - i * 1000))
                .map(|_| gen.next_event())
                .collect();
            if tx.blocking_send(pb::PublishRequest { events }).is_err() {
                break;
            }
        }
        gen
    });
    let mut responses = client
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| err("publish backlog")(e.message().to_string()))?
        .into_inner();
    while let Some(resp) = responses
        .message()
        .await
        .map_err(|e| err("publish backlog")(e.message().to_string()))?
    {
        bar.inc(resp.results.len() as u64);
    }
    bar.finish_and_clear();
    feeder
        .await
        .map_err(|e| err("publish backlog")(e.to_string()))
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs, {model}")
}

fn print_report(r: &PropagateReport) {
    println!(
        "\npropagate on {}{}",
        r.machine,
        if r.parameters.unsigned {
            " (nodes not signing events)"
        } else {
            " (origin proofs signed at the retailer)"
        }
    );
    println!(
        "  offered {:.0} events/s, achieved {:.0} events/s ({} events per request)",
        r.offered_events_per_s, r.achieved_publish_events_per_s, r.parameters.batch
    );
    println!(
        "  publish acknowledgement latency (retailer): {}",
        format_percentiles(&r.publish_ack_latency)
    );
    println!(
        "  end-to-end latency, retailer ack -> manufacturer delivery: {}",
        format_percentiles(&r.end_to_end_latency)
    );
    println!(
        "  backlog: {} events published at {:.0} events/s while the distributor was down",
        r.backlog_events, r.backlog_publish_events_per_s
    );
    println!(
        "  drain: {:.2} s from distributor restart to the last event at the manufacturer = {:.0} events/s",
        r.drain_seconds, r.drain_events_per_s
    );
    println!(
        "    of which {:.2} s until the first backlog event arrived (the distributor's open, the retailer's reconnect backoff); from the first to the last: {:.0} events/s",
        r.drain_first_arrival_seconds, r.drain_flow_events_per_s
    );
}

/// A scenario of the suite with its settings (`chainsight bench <scenario>`).
#[derive(Debug, Clone)]
pub enum Run {
    Ingest(suite::IngestOptions),
    Latency(suite::LatencyOptions),
    Propagate(PropagateOptions),
    Fanout(scenarios::FanoutOptions),
    Growth(scenarios::GrowthOptions),
    Query(QueryOptions),
}

impl Run {
    /// The scenario's name.
    pub fn name(&self) -> &'static str {
        match self {
            Run::Ingest(_) => "ingest",
            Run::Latency(_) => "latency",
            Run::Propagate(_) => "propagate",
            Run::Fanout(_) => "fanout",
            Run::Growth(_) => "growth",
            Run::Query(_) => "query",
        }
    }
}

/// Runs `run` against chainsight (and, with `vs_nats`, the same scenario
/// against NATS JetStream, then prints the side-by-side table), prints the
/// figures, and writes them as a JSON list to `json`.
pub async fn run(
    run: Run,
    vs_nats: bool,
    json: Option<&std::path::Path>,
) -> Result<Vec<suite::Figures>, Error> {
    let ours = match &run {
        Run::Ingest(o) => vec![scenarios::ingest(o).await?],
        Run::Latency(o) => vec![on_a_worker(scenarios::latency(o.clone())).await?],
        Run::Propagate(o) => vec![propagate(o.clone()).await?],
        Run::Fanout(o) => scenarios::fanout(o).await?,
        Run::Growth(o) => scenarios::growth(o).await?,
        Run::Query(o) => query(o.clone()).await?.figures(),
    };
    println!();
    for f in &ours {
        print!("{}", f.summary());
    }
    let mut all = ours.clone();
    if vs_nats {
        let theirs = nats_peer(&run).await?;
        for f in &theirs {
            print!("{}", f.summary());
        }
        println!();
        print!("{}", comparison_table(&ours, &theirs));
        all.extend(theirs);
    }
    if let Some(path) = json {
        suite::write_json(&all, path)?;
        println!("figures written to {}", path.display());
    }
    Ok(all)
}

/// Runs a scenario's client loop as a task on the runtime's worker threads
/// instead of on the thread that waits for the whole command: the worker
/// that reads a response then runs the loop that sends the next request,
/// without waking another thread in between (two thread hops fewer per
/// request, which a one-in-flight latency measures). Both sides of
/// `--vs-nats` run this way.
async fn on_a_worker<F>(scenario: F) -> Result<suite::Figures, Error>
where
    F: std::future::Future<Output = Result<suite::Figures, Error>> + Send + 'static,
{
    tokio::spawn(scenario)
        .await
        .map_err(|e| err("bench task")(e.to_string()))?
}

/// The NATS JetStream side of `run`, where the suite has one.
///
/// Ingest is compared with both ways of publishing to JetStream: one
/// message per event with its own acknowledgement (`nats`), and the
/// events of a batch as one atomic batch (`nats-atomic-batch`), the closer
/// match to chainsight's one acknowledgement per request.
async fn nats_peer(run: &Run) -> Result<Vec<suite::Figures>, Error> {
    nats::server_exe()?;
    Ok(match run {
        Run::Ingest(o) => vec![
            nats::ingest(o).await?,
            nats::ingest_atomic_batches(o).await?,
        ],
        Run::Latency(o) => vec![on_a_worker(nats::latency(o.clone())).await?],
        Run::Propagate(o) => vec![
            nats::propagate(&nats::PropagateOptions {
                rate: o.rate,
                duration_secs: o.duration_secs,
                batch: o.batch,
                backlog: o.backlog,
                seed: 7,
            })
            .await?,
        ],
        _ => {
            return Err(err("--vs-nats")(format!(
                "the {} scenario has no NATS JetStream side (ingest, latency and propagate have)",
                run.name()
            )))
        }
    })
}

/// Scenario, figure, chainsight, NATS and their ratio (chainsight / NATS),
/// one line per figure; one block per NATS run (`theirs[i]` against
/// `ours[i]`, or against the last of `ours`).
pub fn comparison_table(ours: &[suite::Figures], theirs: &[suite::Figures]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, b) in theirs.iter().enumerate() {
        let Some(a) = ours.get(i).or(ours.last()) else {
            break;
        };
        let _ = writeln!(
            out,
            "{:<10} {:<28} {:>14} {:>17} {:>8}",
            "scenario", "figure", "chainsight", b.system, "ratio"
        );
        let mut rows: Vec<(String, f64, f64)> = vec![
            ("events/s".into(), a.events_per_s, b.events_per_s),
            (
                "CPU s per million events".into(),
                a.cpu_seconds_per_million_events,
                b.cpu_seconds_per_million_events,
            ),
            (
                "peak RSS MiB".into(),
                a.peak_rss_bytes as f64 / f64::from(1 << 20),
                b.peak_rss_bytes as f64 / f64::from(1 << 20),
            ),
            (
                "disk MiB".into(),
                a.disk_bytes as f64 / f64::from(1 << 20),
                b.disk_bytes as f64 / f64::from(1 << 20),
            ),
        ];
        if let (Some(x), Some(y)) = (&a.latency, &b.latency) {
            rows.push(("latency p50 µs".into(), x.p50_us as f64, y.p50_us as f64));
            rows.push(("latency p90 µs".into(), x.p90_us as f64, y.p90_us as f64));
            rows.push(("latency p99 µs".into(), x.p99_us as f64, y.p99_us as f64));
            rows.push(("latency max µs".into(), x.max_us as f64, y.max_us as f64));
        }
        for (k, v) in &a.extra {
            if let Some(w) = b.extra.get(k) {
                rows.push((k.clone(), *v, *w));
            }
        }
        for (name, x, y) in rows {
            let ratio = if y == 0.0 {
                "-".to_string()
            } else {
                format!("{:.2}", x / y)
            };
            let _ = writeln!(
                out,
                "{:<10} {:<28} {:>14.1} {:>17.1} {:>8}",
                a.scenario, name, x, y, ratio
            );
        }
        out.push('\n');
    }
    out
}
