//! The chainsight side of the benchmark suite (issue 8): `ingest`,
//! `latency`, `fanout` and `growth` against a real node process (real mTLS,
//! real sled, every acknowledgement after a flush), each reporting
//! [`Figures`]. `propagate` and `query` live in the parent module and are
//! converted to [`Figures`] there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};

use super::suite::{
    dir_bytes, mean_encoded_len, payloads, CpuMeter, EventSource, Figures, IngestOptions,
    LatencyOptions, ProcSample, Via,
};
use super::{err, Error, Percentiles};
use crate::chain::{LocalChain, NodeSpec};
use crate::pb;

const NODE: &str = "retailer";
const PUBLISHER: &str = "bench";
const SUBSCRIBER: &str = "reader";
const SYSTEM: &str = "chainsight";

/// A one-node chain as a retailer runs it (origin signatures and rollups
/// on, the defaults), plus `extra` node.toml.
fn one_node(prefix: &str, extra: &str) -> Result<LocalChain, Error> {
    let spec = NodeSpec {
        id: NODE.into(),
        roles: vec![
            format!("publishers = [\"{PUBLISHER}\"]"),
            format!("subscribers = [\"{SUBSCRIBER}\"]"),
        ],
        extra: extra.to_string(),
        ..NodeSpec::default()
    };
    LocalChain::create(prefix, &[spec], &[PUBLISHER, SUBSCRIBER])
}

fn node_pid(chain: &LocalChain) -> Result<u32, Error> {
    chain
        .pid(NODE)
        .ok_or_else(|| err("find the node process")("not running".into()))
}

/// Events stored by the (stopped) node.
fn stored_events(chain: &LocalChain) -> Result<u64, Error> {
    let store = crate::store::Store::open(&chain.data_dir(NODE).join("store"), &[])
        .map_err(|e| err("count stored events")(e.to_string()))?;
    let n = store
        .len()
        .map_err(|e| err("count stored events")(e.to_string()))?;
    Ok(n as u64)
}

/// What [`publish`] measured.
struct Published {
    acknowledged: u64,
    seconds: f64,
    /// Per batch: send → acknowledgement.
    batch_latency: Vec<Duration>,
    /// Acknowledgement time of each event id (when asked for).
    acked_at: HashMap<String, Instant>,
}

/// Publishes the batches `source` yields on `streams` concurrent
/// `PublishStream`s (one connection each), each with at most `window`
/// unacknowledged batches, until `source` ends. Every event must be
/// accepted (a duplicate or a rejection is an error: the counts must add up).
async fn publish(
    chain: &LocalChain,
    streams: usize,
    window: usize,
    source: mpsc::Receiver<Vec<pb::CustomerEvent>>,
    record_acks: bool,
    bar: &indicatif::ProgressBar,
) -> Result<Published, Error> {
    let source = Arc::new(tokio::sync::Mutex::new(source));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let acked_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams.max(1) {
        let channel = chain.channel(NODE, PUBLISHER).await?;
        let (source, acknowledged, latencies, acked_at, bar) = (
            source.clone(),
            acknowledged.clone(),
            latencies.clone(),
            acked_at.clone(),
            bar.clone(),
        );
        tasks.spawn(async move {
            let mut client = pb::ingest_client::IngestClient::new(channel);
            let window = Arc::new(Semaphore::new(window.max(1)));
            let (tx, rx) = mpsc::channel::<pb::PublishRequest>(window.available_permits());
            // Send times and ids of the batches in flight, in order.
            let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(Instant, Vec<String>)>();
            let feeder = {
                let window = window.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok(permit) = window.clone().acquire_owned().await else {
                            return;
                        };
                        let Some(events) = source.lock().await.recv().await else {
                            return;
                        };
                        permit.forget();
                        let ids = if record_acks {
                            events.iter().map(|e| e.event_id.clone()).collect()
                        } else {
                            Vec::new()
                        };
                        let _ = sent_tx.send((Instant::now(), ids));
                        if tx.send(pb::PublishRequest { events }).await.is_err() {
                            return;
                        }
                    }
                })
            };
            let mut responses = client
                .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|e| err("publish")(e.message().to_string()))?
                .into_inner();
            let mut mine = Vec::new();
            while let Some(resp) = responses
                .message()
                .await
                .map_err(|e| err("publish")(e.message().to_string()))?
            {
                let now = Instant::now();
                window.add_permits(1);
                let (sent, ids) = sent_rx
                    .recv()
                    .await
                    .ok_or_else(|| err("publish")("a response without a request".into()))?;
                mine.push(now - sent);
                if let Some(bad) = resp
                    .results
                    .iter()
                    .find(|r| r.outcome != pb::PublishOutcome::Accepted as i32)
                {
                    return Err(err("publish")(format!(
                        "event {} not accepted: outcome {}, {} {}",
                        bad.event_id, bad.outcome, bad.field, bad.reason
                    )));
                }
                acknowledged.fetch_add(resp.results.len() as u64, Ordering::Relaxed);
                bar.inc(resp.results.len() as u64);
                if record_acks {
                    let mut map = acked_at.lock().unwrap_or_else(PoisonError::into_inner);
                    map.extend(ids.into_iter().map(|id| (id, now)));
                }
            }
            let _ = feeder.await;
            latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(mine);
            Ok::<(), Error>(())
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.map_err(|e| err("publish")(e.to_string()))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let batch_latency = super::take(&latencies);
    let acked_at = super::take(&acked_at);
    Ok(Published {
        acknowledged: acknowledged.load(Ordering::Relaxed),
        seconds,
        batch_latency,
        acked_at,
    })
}

/// A source of `events` pre-generated payloads in batches of `batch`, so
/// that generating them is not part of what is measured.
fn pregenerated(
    seed: u64,
    events: u64,
    batch: usize,
) -> (mpsc::Receiver<Vec<pb::CustomerEvent>>, f64) {
    let all = payloads(seed, events as usize);
    let mean = mean_encoded_len(&all);
    let batches: Vec<Vec<pb::CustomerEvent>> =
        all.chunks(batch.max(1)).map(<[_]>::to_vec).collect();
    let (tx, rx) = mpsc::channel(batches.len().max(1));
    for b in batches {
        // The channel holds every batch: this never waits.
        let _ = tx.try_send(b);
    }
    (rx, mean)
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:40}}] {{pos}}/{{len}} ({{per_sec}})"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// `bench ingest`: durable ingest on `streams` publishing streams with a
/// bounded window; events/s of acknowledgements (each after a flush).
pub async fn ingest(opts: &IngestOptions) -> Result<Figures, Error> {
    let mut fig = Figures::new("ingest", SYSTEM, opts);
    let (source, mean) = pregenerated(opts.seed, opts.events, opts.batch);
    let mut chain = one_node("chainsight-bench-ingest-", "")?;
    chain.start(NODE).await?;
    let meter = CpuMeter::start(&[node_pid(&chain)?]);
    let bar = progress(opts.events, "ingest");
    let done = publish(&chain, opts.streams, opts.window, source, false, &bar).await?;
    bar.finish_and_clear();
    meter.finish(&mut fig, done.acknowledged);
    chain.stop(NODE).await?;
    fig.events_sent = opts.events;
    fig.events_acknowledged = done.acknowledged;
    fig.events_stored = stored_events(&chain)?;
    fig.seconds = done.seconds;
    fig.events_per_s = done.acknowledged as f64 / done.seconds;
    fig.latency = Some(Percentiles::of(done.batch_latency));
    fig.disk_bytes = dir_bytes(&chain.data_dir(NODE));
    fig.extra.insert("payload_bytes_mean".into(), mean);
    Ok(fig)
}

/// `bench latency`: one publish (one event) in flight at a time.
pub async fn latency(opts: LatencyOptions) -> Result<Figures, Error> {
    let opts = &opts;
    let mut fig = Figures::new("latency", SYSTEM, opts);
    let events = payloads(opts.seed, (opts.warmup + opts.events) as usize);
    let mut chain = one_node("chainsight-bench-latency-", "")?;
    chain.start(NODE).await?;
    let mut client = pb::ingest_client::IngestClient::new(chain.channel(NODE, PUBLISHER).await?);
    let meter = CpuMeter::start(&[node_pid(&chain)?]);
    let mut samples = Vec::with_capacity(opts.events as usize);
    let mut acknowledged = 0;
    let bar = progress(opts.warmup + opts.events, "one in flight");
    let mut started = Instant::now();
    // The stream's requests, one at a time (a new one once the last was
    // answered).
    let (stream_tx, stream_rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(1);
    let mut responses = match opts.via {
        Via::PublishStream => Some(
            client
                .publish_stream(tokio_stream::wrappers::ReceiverStream::new(stream_rx))
                .await
                .map_err(|e| err("publish")(e.message().to_string()))?
                .into_inner(),
        ),
        Via::Publish => None,
    };
    for (i, ev) in events.into_iter().enumerate() {
        if i as u64 == opts.warmup {
            started = Instant::now();
            acknowledged = 0;
        }
        let request = pb::PublishRequest { events: vec![ev] };
        let sent = Instant::now();
        let resp = match responses.as_mut() {
            Some(responses) => {
                stream_tx
                    .send(request)
                    .await
                    .map_err(|_| err("publish")("the stream's sender stopped".into()))?;
                responses
                    .message()
                    .await
                    .map_err(|e| err("publish")(e.message().to_string()))?
                    .ok_or_else(|| err("publish")("the node ended the stream".into()))?
            }
            None => client
                .publish(request)
                .await
                .map_err(|e| err("publish")(e.message().to_string()))?
                .into_inner(),
        };
        if i as u64 >= opts.warmup {
            samples.push(sent.elapsed());
        }
        if resp
            .results
            .iter()
            .all(|r| r.outcome == pb::PublishOutcome::Accepted as i32)
        {
            acknowledged += 1;
        }
        bar.inc(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    meter.finish(&mut fig, acknowledged);
    // The stream ends when its requests do: the node answers with its end.
    drop(stream_tx);
    if let Some(mut responses) = responses {
        if let Some(extra) = responses
            .message()
            .await
            .map_err(|e| err("publish")(e.message().to_string()))?
        {
            return Err(err("publish")(format!(
                "an answer without a request: {extra:?}"
            )));
        }
    }
    chain.stop(NODE).await?;
    fig.events_sent = opts.events;
    fig.events_acknowledged = acknowledged;
    fig.events_stored = stored_events(&chain)?.saturating_sub(opts.warmup);
    fig.seconds = seconds;
    fig.events_per_s = acknowledged as f64 / seconds;
    fig.latency = Some(Percentiles::of(samples));
    fig.disk_bytes = dir_bytes(&chain.data_dir(NODE));
    Ok(fig)
}

/// One subscriber's sampled arrivals: event id and when it came.
type Arrivals = Vec<(String, Instant)>;

/// Settings of `bench fanout`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FanoutOptions {
    /// Events published in each run.
    pub events: u64,
    /// Following subscribers, one run per entry (0 = the baseline).
    pub subscribers: Vec<usize>,
    pub streams: usize,
    pub batch: usize,
    pub window: usize,
    pub seed: u64,
}

impl Default for FanoutOptions {
    fn default() -> Self {
        FanoutOptions {
            events: 100_000,
            subscribers: vec![0, 1, 8, 64],
            streams: 4,
            batch: 100,
            window: 4,
            seed: 3,
        }
    }
}

/// `bench fanout`: ingest while `k` subscribers follow, for each `k`:
/// ingest events/s (against the run without subscribers), delivered
/// events/s over all subscribers, and the delivery lag (publish
/// acknowledgement → a subscriber receiving the event; 0 when the
/// subscriber was served before the acknowledgement reached the publisher).
pub async fn fanout(opts: &FanoutOptions) -> Result<Vec<Figures>, Error> {
    let mut out = Vec::new();
    let mut baseline: Option<f64> = None;
    for &k in &opts.subscribers {
        let mut params = serde_json::to_value(opts).unwrap_or_default();
        params["subscribers"] = serde_json::json!(k);
        let mut fig = Figures::new("fanout", SYSTEM, &params);
        let (source, _) = pregenerated(opts.seed, opts.events, opts.batch);
        let mut chain = one_node("chainsight-bench-fanout-", "")?;
        chain.start(NODE).await?;
        let meter = CpuMeter::start(&[node_pid(&chain)?]);
        // Subscribers first, each on its own connection, following.
        let arrivals: Arc<Mutex<Vec<Arrivals>>> = Arc::default();
        let mut subs = tokio::task::JoinSet::new();
        // Every `step`-th event's arrival is kept, so 64 subscribers do not
        // hold millions of samples.
        let step = ((opts.events as usize * k) / 500_000).max(1);
        for _ in 0..k {
            let channel = chain.channel(NODE, SUBSCRIBER).await?;
            let (arrivals, total) = (arrivals.clone(), opts.events);
            subs.spawn(async move {
                let mut stream = subscribe_batches(channel)
                    .await
                    .map_err(|e| err("subscribe")(e.message().to_string()))?;
                let mut seen = 0u64;
                let mut mine = Vec::new();
                'stream: while seen < total {
                    let Some(batch) = stream
                        .message()
                        .await
                        .map_err(|e| err("subscribe")(e.message().to_string()))?
                    else {
                        break;
                    };
                    let now = Instant::now();
                    for signal in batch.signals {
                        if let Some(ev) = signal.event {
                            if (seen as usize).is_multiple_of(step) {
                                mine.push((ev.event_id, now));
                            }
                            seen += 1;
                            if seen == total {
                                break 'stream;
                            }
                        }
                    }
                }
                arrivals
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(mine);
                Ok::<u64, Error>(seen)
            });
        }
        let bar = progress(opts.events, &format!("ingest, {k} subscribers"));
        let started = Instant::now();
        let done = publish(&chain, opts.streams, opts.window, source, k > 0, &bar).await?;
        bar.finish_and_clear();
        let mut delivered = 0u64;
        let deadline = Duration::from_secs(60 + opts.events / 1_000);
        while let Some(res) = tokio::time::timeout(deadline, subs.join_next())
            .await
            .map_err(|_| {
                err("fanout")(format!(
                    "subscribers did not receive all events within {deadline:?}"
                ))
            })?
        {
            delivered += res.map_err(|e| err("subscribe")(e.to_string()))??;
        }
        let delivery_seconds = started.elapsed().as_secs_f64();
        meter.finish(&mut fig, done.acknowledged);
        chain.stop(NODE).await?;
        let ingest_rate = done.acknowledged as f64 / done.seconds;
        let mut lags = Vec::new();
        for list in arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            for (id, at) in list {
                if let Some(acked) = done.acked_at.get(id) {
                    lags.push(at.saturating_duration_since(*acked));
                }
            }
        }
        fig.events_sent = opts.events;
        fig.events_acknowledged = done.acknowledged;
        fig.events_stored = stored_events(&chain)?;
        fig.seconds = done.seconds;
        fig.events_per_s = ingest_rate;
        fig.latency = (k > 0).then(|| Percentiles::of(lags));
        fig.disk_bytes = dir_bytes(&chain.data_dir(NODE));
        fig.extra.insert("subscribers".into(), k as f64);
        fig.extra
            .insert("delivered_events".into(), delivered as f64);
        fig.extra.insert(
            "delivered_events_per_s".into(),
            delivered as f64 / delivery_seconds,
        );
        match baseline {
            None if k == 0 => baseline = Some(ingest_rate),
            Some(b) => {
                fig.extra
                    .insert("ingest_vs_no_subscribers".into(), ingest_rate / b);
            }
            None => {}
        }
        out.push(fig);
    }
    Ok(out)
}

/// A `SignalBatch` as `bench fanout`'s subscribers read it: of each
/// signal only the cursor and the event's id are decoded (prost skips the
/// rest). The subscribers share the node's two cores, and decoding every
/// field of every event took as much CPU as the node's delivery.
#[derive(Clone, PartialEq, prost::Message)]
struct SignalBatchIds {
    #[prost(message, repeated, tag = "1")]
    signals: Vec<SignalIds>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SignalIds {
    #[prost(uint64, tag = "1")]
    cursor: u64,
    #[prost(message, optional, tag = "2")]
    event: Option<EventId>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EventId {
    #[prost(string, tag = "1")]
    event_id: String,
}

/// `Signals.SubscribeBatches` from the start, following, every event,
/// decoded as [`SignalBatchIds`].
async fn subscribe_batches(
    channel: tonic::transport::Channel,
) -> Result<tonic::Streaming<SignalBatchIds>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/chainsight.v1.Signals/SubscribeBatches",
    );
    let request = tonic::Request::new(pb::SubscribeRequest {
        filter: Some(pb::Filter::default()),
        after_cursor: 0,
        follow: true,
        name: String::new(),
    });
    let codec = tonic_prost::ProstCodec::<pb::SubscribeRequest, SignalBatchIds>::default();
    Ok(grpc
        .server_streaming(request, path, codec)
        .await?
        .into_inner())
}

/// Settings of `bench growth`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrowthOptions {
    /// Store sizes at which to measure, ascending.
    pub sizes: Vec<u64>,
    /// Events whose ingest rate is measured at each size (the last ones
    /// published before reaching it).
    pub window_events: u64,
    pub streams: usize,
    pub batch: usize,
    pub window: usize,
    pub seed: u64,
}

impl Default for GrowthOptions {
    fn default() -> Self {
        GrowthOptions {
            sizes: vec![1_000_000, 10_000_000],
            window_events: 100_000,
            streams: 4,
            batch: 500,
            window: 4,
            seed: 4,
        }
    }
}

/// Waits until the node answers a health check with SERVING.
async fn serving(chain: &LocalChain) -> Result<(), Error> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(channel) = chain.channel(NODE, PUBLISHER).await {
            let asked = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if matches!(asked, Ok(r) if r.get_ref().status() == ServingStatus::Serving) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(err("reopen")("the node did not serve within 120 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `bench growth`: one node filled to each size in turn; at each, the
/// ingest rate of the last `window_events`, the node's resident memory
/// (now and peak), disk bytes per event against the encoded payload, and
/// how long the node takes to reopen its store (restart until listening).
pub async fn growth(opts: &GrowthOptions) -> Result<Vec<Figures>, Error> {
    let mut out = Vec::new();
    let mut chain = one_node("chainsight-bench-growth-", "")?;
    chain.start(NODE).await?;
    let workload = Arc::new(Mutex::new(super::suite::Payloads::new(opts.seed)));
    let mut stored = 0u64;
    let mut payload_bytes = 0f64;
    for &size in &opts.sizes {
        let mut params = serde_json::to_value(opts).unwrap_or_default();
        params["size"] = serde_json::json!(size);
        let mut fig = Figures::new("growth", SYSTEM, &params);
        let fill = size.saturating_sub(stored);
        let measured = opts.window_events.min(fill);
        // Fill up to the measured window, then measure the window.
        for (phase, n) in [("fill", fill - measured), ("measure", measured)] {
            if n == 0 {
                continue;
            }
            let (tx, rx) = mpsc::channel(64);
            let (workload, batch) = (workload.clone(), opts.batch.max(1) as u64);
            let generator = tokio::task::spawn_blocking(move || {
                let mut bytes = 0usize;
                let mut left = n;
                while left > 0 {
                    let take = left.min(batch);
                    let events: Vec<pb::CustomerEvent> = {
                        let mut w = workload.lock().unwrap_or_else(PoisonError::into_inner);
                        (0..take)
                            .map(|_| EventSource::next_event(&mut *w))
                            .collect()
                    };
                    bytes += events
                        .iter()
                        .map(prost::Message::encoded_len)
                        .sum::<usize>();
                    if tx.blocking_send(events).is_err() {
                        break;
                    }
                    left -= take;
                }
                bytes
            });
            let bar = progress(n, &format!("{phase} to {size}"));
            let meter = CpuMeter::start(&[node_pid(&chain)?]);
            let done = publish(&chain, opts.streams, opts.window, rx, false, &bar).await?;
            bar.finish_and_clear();
            let bytes = generator
                .await
                .map_err(|e| err("generate")(e.to_string()))?;
            payload_bytes += bytes as f64;
            stored += done.acknowledged;
            if phase == "measure" {
                meter.finish(&mut fig, done.acknowledged);
                fig.events_sent = n;
                fig.events_acknowledged = done.acknowledged;
                fig.seconds = done.seconds;
                fig.events_per_s = done.acknowledged as f64 / done.seconds;
                fig.latency = Some(Percentiles::of(done.batch_latency));
            }
        }
        let pid = node_pid(&chain)?;
        let now = ProcSample::read(pid);
        let rss_now = now.rss_bytes;
        fig.peak_rss_bytes = now.peak_rss_bytes;
        chain.stop(NODE).await?;
        let disk = dir_bytes(&chain.data_dir(NODE));
        // Reopen: from the process start until the node answers health
        // SERVING (it prints its address before it opens the store).
        let reopen = Instant::now();
        chain.start(NODE).await?;
        serving(&chain).await?;
        let reopen_s = reopen.elapsed().as_secs_f64();
        fig.disk_bytes = disk;
        fig.events_stored = fig.events_acknowledged;
        fig.extra.insert("stored_events".into(), stored as f64);
        fig.extra.insert("rss_bytes".into(), rss_now as f64);
        fig.extra.insert(
            "disk_bytes_per_event".into(),
            disk as f64 / stored.max(1) as f64,
        );
        fig.extra.insert(
            "payload_bytes_per_event".into(),
            payload_bytes / stored.max(1) as f64,
        );
        fig.extra.insert(
            "disk_vs_payload".into(),
            disk as f64 / payload_bytes.max(1.0),
        );
        fig.extra.insert("reopen_s".into(), reopen_s);
        out.push(fig);
    }
    chain.stop(NODE).await?;
    let total = stored_events(&chain)?;
    if total != stored {
        return Err(err("growth")(format!(
            "{stored} events acknowledged but {total} stored"
        )));
    }
    Ok(out)
}
