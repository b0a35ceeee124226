//! The `chainsight` command line: parses arguments and calls into the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use chainsight::config::{ClientConfig, NodeConfig};

/// mimalloc: the store writer, the rollup checkpointer and insight queries
/// allocate many small objects; glibc malloc took a quarter of their time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The environment variable mimalloc reads its purge delay from.
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";
/// A node's purge delay, in ms (see [`purge_freed_memory_promptly`]).
const NODE_PURGE_DELAY_MS: &str = "100";

/// mimalloc (version 3) returns memory a thread freed to the OS only after
/// a second (`purge_delay`; arenas ten times that), where version 2 waited
/// 10 ms. A node frees and allocates much memory per second (sled's log
/// buffers and page copies, the waiting rollup cells), so freed memory
/// piled up: under `bench growth` its resident memory ran 50-130 MiB
/// higher at 3M events than with 10 ms, at the same ingest rate (README,
/// session 27). A node uses 100 ms: memory returned after 10 ms was soon
/// faulted back in, and with 100 ms `bench ingest` ran 2-20 % faster in
/// four alternating pairs, `bench growth` peaking at 466 MiB at 10M events
/// (README, session 32). mimalloc reads the option from the environment once,
/// before `main`, and setting it later takes an `unsafe` call; so the
/// process runs itself again with it set (`exec`: the same pid, arguments
/// and environment otherwise), before it starts a thread. Only `node`
/// does: the short commands would pay the `exec` for nothing, and the
/// nodes that `demo` and `bench` start are `node`s. A delay the user set
/// is kept; if the `exec` fails, the process runs on with mimalloc's
/// default.
fn purge_freed_memory_promptly() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os(PURGE_DELAY).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        let _failed = std::process::Command::new(&exe)
            .arg0(arg0)
            .args(args)
            .env(PURGE_DELAY, NODE_PURGE_DELAY_MS)
            .exec();
    }
}

/// Turns transparent huge pages off for this process (and the nodes it
/// starts). mimalloc returns freed memory to the OS (after 100 ms in a
/// node, see [`purge_freed_memory_promptly`]) and faults it back in when
/// it needs it again; with huge pages each fault
/// zeroed 2 MiB: a tenth of a node's CPU under ingest and two thirds of the
/// rollup checkpointer's, and twice the resident memory (`bench ingest`,
/// `bench latency`; README, session 14). Failing to is harmless: the
/// process only runs slower.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
}

/// chainsight: a customer-insight exchange for the companies of one supply chain.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format on stderr: human (default) or json (one object per line,
    /// for log shippers). A node also takes `[log] format` from node.toml.
    #[arg(long, global = true, env = "CHAINSIGHT_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates for a chain.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run a node.
    Node {
        /// Path to node.toml.
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Publish customer events from a JSON-lines file (proto3 JSON of CustomerEvent).
    Publish {
        /// Path to client.toml.
        #[arg(long, default_value = "client.toml")]
        config: PathBuf,
        /// The JSON-lines file.
        #[arg(long)]
        file: PathBuf,
        /// Events per request.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Requests sent ahead of their acknowledgement.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Do not show a progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Stream stored signals (proto3 JSON lines of Signal: cursor and event).
    Subscribe {
        /// Path to client.toml (the identity needs the subscribers role).
        #[arg(long, default_value = "client.toml")]
        config: PathBuf,
        /// GS1 company prefix to match (repeatable).
        #[arg(long = "gtin-prefix")]
        gtin_prefixes: Vec<String>,
        /// Event kind to match, e.g. review or EVENT_KIND_REVIEW (repeatable).
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Category to match (repeatable).
        #[arg(long = "category")]
        categories: Vec<String>,
        /// Start after this cursor (0 = from the start).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep streaming new signals after the backfill.
        #[arg(long)]
        follow: bool,
        /// A durable subscription name: resumes after the cursor last
        /// acknowledged under it (the client acknowledges as it prints).
        #[arg(long)]
        name: Option<String>,
    },
    /// Query aggregated insight (identity needs the analysts role).
    Query {
        /// Path to client.toml.
        #[arg(long, default_value = "client.toml")]
        config: PathBuf,
        /// Dimensions: gtin, category, brand, region, channel, stage, kind, age_band, attribute, time.
        #[arg(long, value_delimiter = ',')]
        group_by: Vec<String>,
        /// Time bucket for the time dimension (hour, day, week, month); implies grouping by time.
        #[arg(long)]
        bucket: Option<String>,
        /// The attribute whose values the attribute dimension groups by.
        #[arg(long)]
        attribute_key: Option<String>,
        /// RFC 3339 start (inclusive), e.g. 2026-01-01T00:00:00Z.
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339 end (exclusive).
        #[arg(long)]
        until: Option<String>,
        /// GS1 company prefix (repeatable).
        #[arg(long = "gtin-prefix")]
        gtin_prefixes: Vec<String>,
        /// Event kind (repeatable).
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Print the report as proto3 JSON.
        #[arg(long)]
        json: bool,
        /// Also draw the feed into this SVG file (needs --bucket).
        #[arg(long)]
        chart: Option<PathBuf>,
        /// The metric the chart shows: events, customers, nps, avg_score, return_rate.
        #[arg(long, default_value = "events")]
        chart_metric: String,
    },
    /// Maintenance: backup and reload of a running node; restore and rollup rebuild offline.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Run a real chain of five nodes on loopback, publish, propagate, report.
    Demo {
        /// Events published at each of the two retailers.
        #[arg(long, default_value_t = 3000)]
        events: usize,
        /// Keep the temporary directory (certificates, configs, data, logs).
        #[arg(long)]
        keep: bool,
    },
    /// Benchmark scenarios on real nodes (build with --release for real figures).
    Bench {
        #[command(subcommand)]
        scenario: BenchScenario,
    },
    /// Erase every event of one end customer, here and upstream along the chain (publishers role).
    Erase {
        /// Path to client.toml.
        #[arg(long, default_value = "client.toml")]
        config: PathBuf,
        /// The customer id as it was published.
        #[arg(long)]
        customer_id: String,
    },
    /// Follow an erasure along the chain.
    Erasure {
        #[command(subcommand)]
        command: ErasureCommand,
    },
    /// Check the origin signatures of every event a (stopped) node stores.
    Verify {
        /// Path to node.toml of the node (its data_dir and chain CA are used).
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        /// Also fail when events carry no origin proof.
        #[arg(long)]
        require_signed: bool,
    },
    /// The node's audit trail: list it (auditors role), or check its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        command: Option<AuditCommand>,
        #[command(flatten)]
        list: AuditList,
    },
    /// Show the node's upstream links: connected, backlog, oldest unacknowledged, stalled.
    Links {
        /// Path to client.toml (the identity needs the operators role).
        #[arg(long, default_value = "client.toml")]
        config: PathBuf,
        /// Print proto3 JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Options every scenario of the suite takes.
#[derive(clap::Args)]
struct BenchCommon {
    /// Tiny sizes (they replace the scenario's own): a quick check that the
    /// scenario runs and its counts add up, as the tests do.
    #[arg(long)]
    quick: bool,
    /// Also run the scenario against NATS JetStream (ingest, latency and
    /// propagate) and print both side by side; needs nats-server (see
    /// bench/compare-nats.sh).
    #[arg(long)]
    vs_nats: bool,
    /// Also write the figures as a JSON list to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchScenario {
    /// Durable ingest: concurrent publishing streams, each with a bounded window of unacknowledged batches.
    Ingest {
        /// Events to publish.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Concurrent publishing streams (one connection each).
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Events per batch (publish request).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Unacknowledged batches per stream.
        #[arg(long, default_value_t = 4)]
        window: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// Publish acknowledgement latency with one request (one event) in flight.
    Latency {
        /// Timed requests. The default (about 10 s) spans the hourly
        /// rollup checkpoints (every 5 s), which set the tail; the views'
        /// (every 15 s) come later.
        #[arg(long, default_value_t = 15_000)]
        events: u64,
        /// Untimed requests first.
        #[arg(long, default_value_t = 200)]
        warmup: u64,
        /// How the requests go: on one `PublishStream` held open, or one
        /// unary `Publish` call each.
        #[arg(long, value_enum, default_value = "publish-stream")]
        via: chainsight::bench::suite::Via,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// 3-node chain: retailer-ack to manufacturer latency at a fixed rate, and backlog drain rate.
    Propagate {
        /// Offered publish rate, events per second.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Seconds to publish at that rate.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Events per publish request.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Backlog size for the drain measurement.
        #[arg(long, default_value_t = 100_000)]
        backlog: usize,
        /// Nodes do not sign events (to measure what origin proofs cost).
        #[arg(long)]
        unsigned: bool,
        /// Also write each event of the timed phase to this file: the
        /// retailer's acknowledgement (Unix seconds) and the latency to the
        /// manufacturer (ms), one per line — when in the run the tail was.
        #[arg(long)]
        samples: Option<PathBuf>,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// Following subscribers (e.g. 1, 8, 64) while ingesting: delivered events/s, delivery lag, ingest slowdown.
    Fanout {
        /// Events published per run.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Subscriber counts, one run each (0 = the baseline without subscribers).
        #[arg(long, value_delimiter = ',', default_value = "0,1,8,64")]
        subscribers: Vec<usize>,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// Ingest rate, memory, disk per event and reopen time as the store grows.
    Growth {
        /// Store sizes to measure at, ascending.
        #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
        sizes: Vec<u64>,
        /// Events whose ingest rate is measured just before each size.
        #[arg(long, default_value_t = 100_000)]
        window_events: u64,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// The typical insight feed's latency over 1M (and more) stored events; rollup cost.
    Query {
        /// Store sizes, comma-separated (e.g. 1000000,10000000).
        #[arg(long, value_delimiter = ',', default_value = "1000000")]
        sizes: Vec<usize>,
        /// Queries timed per size.
        #[arg(long, default_value_t = 50)]
        queries: usize,
        /// Events published with rollups on and off to compare ingest.
        #[arg(long, default_value_t = 200_000)]
        cost_events: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// One node: backfill rate over N stored events, and live delivery latency.
    Subscribe {
        /// Events stored before the backfill.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Offered publish rate during the live phase, events per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds of live publishing.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ErasureCommand {
    /// Which hops have confirmed erasure ID.
    Status {
        /// The erasure id `chainsight erase` printed.
        id: String,
        /// Path to client.toml (publishers role at the node that took the erasure).
        #[arg(long, default_value = "client.toml")]
        config: PathBuf,
        /// Print proto3 JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `chainsight audit`: which records to list.
#[derive(clap::Args)]
struct AuditList {
    /// Path to client.toml (the identity needs the auditors role).
    #[arg(long, default_value = "client.toml")]
    config: PathBuf,
    /// RFC 3339: only records at or after this time.
    #[arg(long)]
    since: Option<String>,
    /// Only records of this identity.
    #[arg(long)]
    identity: Option<String>,
    /// Only records of this kind: forward, subscription, query, erasure.
    #[arg(long)]
    kind: Option<String>,
    /// Print proto3 JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the trail's hash chain: a node's, fetched over mTLS (--config),
    /// or a stopped node's data directory (--data-dir).
    Verify {
        /// Path to client.toml (the identity needs the auditors role).
        #[arg(long, conflicts_with = "data_dir")]
        config: Option<PathBuf>,
        /// The stopped node's data directory (`data_dir` of its node.toml).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Recompute every rollup from the stored events.
    RebuildRollups {
        /// Path to node.toml of the (stopped) node.
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Back up the running node: a consistent snapshot of its store
    /// (events, outboxes, cursors, rollups, audit trail) into one file.
    Backup {
        /// Path to node.toml of the running node (run on its machine).
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        /// The backup file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Also store the node's pseudonym key (secret: without it a
        /// restored node refuses to start until the key file is copied in).
        #[arg(long)]
        include_keys: bool,
    },
    /// Rebuild a data directory from a backup file (checked whole first).
    Restore {
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The new data directory (`data_dir` of the restored node's
        /// node.toml); must not hold a store.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Check a stopped node's data directory: every event record's
    /// checksum, the indexes, the outboxes and the audit trail (exit 1
    /// naming each problem).
    Verify {
        /// Path to node.toml of the (stopped) node.
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Make the running node re-read node.toml (as SIGHUP does): roles,
    /// link agreements and filter limits change without a restart.
    Reload {
        /// Path to node.toml of the running node.
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a chain CA (or reuse the one in DIR) and a key and certificate per NAME.
    Init {
        /// Output directory: DIR/ca.pem, ca.key, NAME.pem, NAME.key.
        #[arg(long)]
        dir: PathBuf,
        /// Identities to issue certificates for.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Revoke the certificates DIR/NAME.pem: adds them to DIR/crl.pem
    /// (signed by the CA in DIR). Nodes with it in `[tls] crls` refuse them
    /// from their next reload (SIGHUP or `chainsight admin reload`).
    Revoke {
        /// The certificates directory (with ca.pem and ca.key).
        #[arg(long)]
        dir: PathBuf,
        /// Identities whose certificates to revoke.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Node { .. }) {
        purge_freed_memory_promptly();
    }
    // Read once here for the log format and the runtime; the command
    // loads it again and reports a node.toml that does not load.
    let node_config = match &cli.command {
        Command::Node { config } => NodeConfig::load(config).ok(),
        _ => None,
    };
    init_tracing(log_format(&cli, node_config.as_ref()));
    let runtime = match runtime(node_config.as_ref()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: a node's (`node`, its config if it loads) has
/// `[runtime] worker_threads` workers (default one per CPU, as every
/// other command's).
fn runtime(node: Option<&NodeConfig>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(config) = node {
        builder.worker_threads(config.runtime.workers());
    }
    builder.build()
}

/// The log format: the flag, else a node's `[log] format` (`node`, its
/// config if it loads), else human.
fn log_format(cli: &Cli, node: Option<&NodeConfig>) -> LogFormat {
    match (cli.log_format, node) {
        (Some(f), _) => f,
        (None, Some(cfg)) if cfg.log.format == chainsight::config::LogFormat::Json => {
            LogFormat::Json
        }
        _ => LogFormat::Human,
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,async_nats=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Certs {
            command: CertsCommand::Init { dir, names },
        } => {
            let written = chainsight::certs::init(&dir, &names)?;
            for f in written {
                println!("wrote {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command: CertsCommand::Revoke { dir, names },
        } => {
            let crl = chainsight::certs::revoke(&dir, &names)?;
            println!(
                "wrote {} revoking {}; reload the nodes that list it in [tls] crls",
                crl.display(),
                names.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Node { config } => {
            let cfg = NodeConfig::load(&config)?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (key `listen` in {})",
                        cfg.listen,
                        config.display()
                    )
                })?;
            let addr = listener.local_addr()?;
            let shutdown = chainsight::node::shutdown_signal();
            // One line on stdout for supervisors and tests: the bound address.
            println!("chainsight node {} listening on {addr}", cfg.id);
            chainsight::node::run(cfg, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish {
            config,
            file,
            batch_size,
            window,
            quiet,
        } => publish(config, file, batch_size, window, quiet).await,
        Command::Demo { events, keep } => {
            let opts = chainsight::demo::Options {
                events_per_retailer: events,
                keep,
                ..Default::default()
            };
            let ok = chainsight::demo::run(opts).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Subscribe {
            config,
            gtin_prefixes,
            kinds,
            categories,
            after,
            follow,
            name,
        } => {
            let cfg = ClientConfig::load(&config)?;
            let kinds = parse_kinds(&kinds)?;
            let opts = chainsight::client::SubscribeOptions {
                filter: chainsight::pb::Filter {
                    gtin_prefixes,
                    kinds,
                    categories,
                    ..Default::default()
                },
                after,
                follow,
                name,
            };
            let last =
                chainsight::client::subscribe(&cfg, &opts, std::io::stdout().lock(), async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
                .with_context(|| format!("subscribing at {}", cfg.address))?;
            eprintln!("last cursor: {last} (resume with --after {last})");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            scenario:
                BenchScenario::Subscribe {
                    events,
                    rate,
                    duration,
                    json,
                },
        } => {
            let opts = chainsight::bench::SubscribeOptions {
                events,
                rate,
                duration_secs: duration,
                json,
                ..Default::default()
            };
            chainsight::bench::subscribe(opts).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { scenario } => {
            let (run, common) = bench_run(scenario);
            chainsight::bench::run(run, common.vs_nats, common.json.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            config,
            group_by,
            bucket,
            attribute_key,
            since,
            until,
            gtin_prefixes,
            kinds,
            limit,
            json,
            chart,
            chart_metric,
        } => {
            let cfg = ClientConfig::load(&config)?;
            let metric = chainsight::chart::Metric::parse(&chart_metric)
                .with_context(|| format!("--chart-metric {chart_metric}: one of events, customers, nps, avg_score, return_rate"))?;
            let mut dims = parse_dimensions(&group_by)?;
            let bucket = bucket.as_deref().map(parse_bucket).transpose()?;
            if bucket.is_some() && !dims.contains(&(chainsight::pb::Dimension::Time as i32)) {
                dims.push(chainsight::pb::Dimension::Time as i32);
            }
            // Checked before asking the node: a chart plots time buckets.
            let chart = chart
                .map(|path| {
                    dims.iter()
                        .position(|d| *d == chainsight::pb::Dimension::Time as i32)
                        .map(|time_index| (path, time_index))
                        .context("--chart needs --bucket (the chart plots time buckets): add e.g. --bucket week")
                })
                .transpose()?;
            let q = chainsight::pb::InsightQuery {
                filter: Some(chainsight::pb::Filter {
                    gtin_prefixes,
                    kinds: parse_kinds(&kinds)?,
                    since: since
                        .as_deref()
                        .map(|s| parse_time("--since", s))
                        .transpose()?,
                    until: until
                        .as_deref()
                        .map(|s| parse_time("--until", s))
                        .transpose()?,
                    ..Default::default()
                }),
                group_by: dims.clone(),
                attribute_key: attribute_key.unwrap_or_default(),
                bucket: bucket.unwrap_or(0),
                limit,
            };
            let report = chainsight::client::query(&cfg, q)
                .await
                .with_context(|| format!("querying {}", cfg.address))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let headers: Vec<String> = dims
                    .iter()
                    .map(|d| {
                        chainsight::pb::Dimension::try_from(*d)
                            .map(|d| {
                                d.as_str_name()
                                    .trim_start_matches("DIMENSION_")
                                    .to_lowercase()
                            })
                            .unwrap_or_default()
                    })
                    .collect();
                print!("{}", chainsight::client::format_report(&headers, &report));
            }
            if let Some((path, time_index)) = chart {
                chainsight::chart::draw(&report, time_index, metric, &path)
                    .map_err(anyhow::Error::msg)?;
                eprintln!("chart written to {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin {
            command: AdminCommand::RebuildRollups { config },
        } => {
            let cfg = NodeConfig::load(&config)?;
            let dir = cfg.data_dir.join("store");
            let layout =
                cfg.insights.layout().map_err(anyhow::Error::msg)?.context(
                    "[insights] rollups = false in this config: turn them on to rebuild",
                )?;
            let store = chainsight::store::Store::open_with(&dir, &[], Some(layout)).with_context(
                || {
                    format!(
                        "opening {} (is the node still running? stop it first)",
                        dir.display()
                    )
                },
            )?;
            let bar = indicatif::ProgressBar::new(
                store
                    .len()
                    .with_context(|| format!("counting the events in {}", dir.display()))?
                    as u64,
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} rebuilding rollups [{bar:40}] {pos}/{len} events ({per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let n = store.rebuild_rollups(|done| bar.set_position(done)).await?;
            bar.finish_and_clear();
            println!("rebuilt rollups from {n} events");
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin {
            command:
                AdminCommand::Backup {
                    config,
                    out,
                    include_keys,
                },
        } => {
            let cfg = NodeConfig::load(&config)?;
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} backing up {msg}: {bytes} ({bytes_per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_message(cfg.id.clone());
            let summary =
                chainsight::admin::backup(&cfg, &out, include_keys, |b| bar.set_position(b))
                    .await?;
            bar.finish_and_clear();
            let check = chainsight::store::backup::verify(&out)?;
            println!(
                "backed up node {} into {}: {} trees, {} entries, events up to seq {}, {} bytes{}",
                check.node_id,
                out.display(),
                check.counts.trees,
                check.counts.entries,
                check.counts.last_seq,
                summary.bytes,
                if summary.keys.is_empty() {
                    " (no keys: keep the node's pseudonym.key safe separately)".to_string()
                } else {
                    format!(" with {} (keep this file secret)", summary.keys.join(", "))
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin {
            command: AdminCommand::Restore { input, data_dir },
        } => {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} restoring: {pos} entries ({per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let data = data_dir.clone();
            let restored = tokio::task::spawn_blocking(move || {
                chainsight::store::backup::restore(&input, &data, |n| bar.set_position(n))
            })
            .await??;
            println!(
                "restored node {}'s store into {}: {} trees, {} entries, events up to seq {}",
                restored.node_id,
                data_dir.join("store").display(),
                restored.counts.trees,
                restored.counts.entries,
                restored.counts.last_seq
            );
            if restored.secrets.is_empty() {
                println!(
                    "the backup holds no pseudonym key: copy the node's {} into {} before starting it (it refuses to start without it)",
                    chainsight::anonymise::KEY_FILE,
                    data_dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin {
            command: AdminCommand::Verify { config },
        } => {
            let cfg = NodeConfig::load(&config)?;
            let dir = cfg.data_dir.join("store");
            if !dir.exists() {
                anyhow::bail!("{} holds no store", dir.display());
            }
            let layout = cfg.insights.layout().map_err(anyhow::Error::msg)?;
            let store =
                chainsight::store::Store::open_with(&dir, &[], layout).with_context(|| {
                    format!(
                        "opening {} (is the node still running? stop it first)",
                        dir.display()
                    )
                })?;
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} verifying: {pos} events ({per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let v = tokio::task::block_in_place(|| store.verify(|n| bar.set_position(n)))?;
            bar.finish_and_clear();
            store.close().await?;
            println!(
                "checked {}: {} events, {} event-id index entries, {} time index entries, {} outbox entries, {} audit records, {} rollup cells",
                dir.display(),
                v.events,
                v.index_entries,
                v.time_entries,
                v.outbox_entries,
                v.audit_records,
                v.rollup_cells
            );
            if v.problem_count == 0 {
                println!("no problem found");
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &v.problems {
                    println!("PROBLEM {p}");
                }
                println!(
                    "{} problem(s) found in {}: restore the data directory from a backup (`chainsight admin restore`); if only rollups are affected, `chainsight admin rebuild-rollups` repairs them",
                    v.problem_count,
                    dir.display()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Admin {
            command: AdminCommand::Reload { config },
        } => {
            // Only how to reach the node: the node itself judges the file.
            let cfg = chainsight::config::NodeConnection::load(&config)?;
            let r = chainsight::admin::reload(&cfg).await?;
            if r.applied.is_empty() {
                println!("reloaded: nothing that can change live has changed");
            } else {
                println!("reloaded: now in force: {}", r.applied.join(", "));
            }
            if !r.needs_restart.is_empty() {
                println!(
                    "changed but in force only after a restart: {}",
                    r.needs_restart.join("; ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Erase {
            config,
            customer_id,
        } => {
            let cfg = ClientConfig::load(&config)?;
            let channel = chainsight::client::connect(&cfg).await?;
            let resp = chainsight::pb::ingest_client::IngestClient::new(channel)
                .erase(chainsight::pb::EraseRequest { customer_id })
                .await
                .map_err(chainsight::client::Error::from)
                .with_context(|| format!("erasing at {}", cfg.address))?
                .into_inner();
            println!(
                "erasure {}: {} events erased here; passed on to {}",
                resp.erasure_id,
                resp.erased_events,
                if resp.links.is_empty() {
                    "no upstream link".to_string()
                } else {
                    resp.links.join(", ")
                }
            );
            eprintln!(
                "follow it with: chainsight erasure status {} --config {}",
                resp.erasure_id,
                config.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Erasure {
            command: ErasureCommand::Status { id, config, json },
        } => {
            let cfg = ClientConfig::load(&config)?;
            let channel = chainsight::client::connect(&cfg).await?;
            let status = chainsight::pb::ingest_client::IngestClient::new(channel)
                .erasure_status(chainsight::pb::ErasureStatusRequest {
                    erasure_id: id,
                    depth: 0,
                })
                .await
                .map_err(chainsight::client::Error::from)
                .with_context(|| format!("asking {} for the erasure", cfg.address))?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", chainsight::client::format_erasure(&status));
            }
            let done = status
                .hops
                .iter()
                .all(|h| h.state == chainsight::pb::ErasureState::Confirmed as i32);
            Ok(if done {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Verify {
            config,
            require_signed,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let verifier =
                chainsight::origin::Verifier::new(chainsight::tls::load_certs(&cfg.tls.ca)?)?;
            let dir = cfg.data_dir.join("store");
            let layout = cfg.insights.layout().map_err(anyhow::Error::msg)?;
            let store =
                chainsight::store::Store::open_with(&dir, &[], layout).with_context(|| {
                    format!(
                        "opening {} (is the node still running? stop it first)",
                        dir.display()
                    )
                })?;
            let bar = indicatif::ProgressBar::new(
                store
                    .len()
                    .with_context(|| format!("counting the events in {}", dir.display()))?
                    as u64,
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} verifying origin proofs [{bar:40}] {pos}/{len} events ({per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let check = tokio::task::spawn_blocking(move || {
                let check =
                    chainsight::origin::check_store(&store, &verifier, |n| bar.set_position(n));
                bar.finish_and_clear();
                check
            })
            .await??;
            println!(
                "{} verified, {} unsigned, {} failed",
                check.verified, check.unsigned, check.failed
            );
            for (id, why) in &check.failures {
                println!("  {id}: {why}");
            }
            if check.failed > check.failures.len() as u64 {
                println!(
                    "  … and {} more",
                    check.failed - check.failures.len() as u64
                );
            }
            Ok(
                if check.failed > 0 || (require_signed && check.unsigned > 0) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
        Command::Audit {
            command: None,
            list,
        } => {
            let cfg = ClientConfig::load(&list.config)?;
            let request = chainsight::pb::AuditListRequest {
                since: list
                    .since
                    .as_deref()
                    .map(|s| parse_time("--since", s))
                    .transpose()?,
                identity: list.identity.unwrap_or_default(),
                after_seq: 0,
                kind: match list.kind.as_deref() {
                    None => 0,
                    Some(k) => chainsight::audit::Kind::from_label(k)
                        .with_context(|| {
                            format!("--kind {k}: one of forward, subscription, query, erasure")
                        })?
                        .number(),
                },
            };
            let records = chainsight::client::audit_records(&cfg, request)
                .await
                .with_context(|| format!("reading the audit trail of {}", cfg.address))?;
            if list.json {
                for r in &records {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                print!("{}", chainsight::client::format_audit(&records));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: Some(AuditCommand::Verify { config, data_dir }),
            ..
        } => {
            let verdict = match (config, data_dir) {
                (Some(config), None) => {
                    let cfg = ClientConfig::load(&config)?;
                    chainsight::client::verify_audit(&cfg)
                        .await
                        .with_context(|| format!("reading the audit trail of {}", cfg.address))?
                }
                (None, Some(dir)) => {
                    let store = dir.join("store");
                    let verdict = tokio::task::spawn_blocking(move || {
                        chainsight::store::Store::verify_audit_at(&store)
                    })
                    .await?;
                    verdict.with_context(|| {
                        format!(
                            "opening {} (is the node still running? stop it first, or use --config)",
                            dir.display()
                        )
                    })?
                }
                _ => anyhow::bail!("give --config client.toml (a running node) or --data-dir DIR (a stopped node's data directory)"),
            };
            match verdict {
                Ok(v) => {
                    println!(
                        "audit trail intact: {} records, head {}",
                        v.records,
                        chainsight::audit::hex(&v.head)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(broken) => {
                    eprintln!("audit trail BROKEN at {broken}; the records from there on cannot be trusted");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Links { config, json } => {
            let cfg = ClientConfig::load(&config)?;
            let links = chainsight::client::links(&cfg)
                .await
                .with_context(|| format!("asking {} for its links", cfg.address))?;
            if json {
                for l in &links {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                print!("{}", chainsight::client::format_links(&links));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn publish(
    config: PathBuf,
    file: PathBuf,
    batch_size: usize,
    window: usize,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let cfg = ClientConfig::load(&config)?;
    let opts = chainsight::client::PublishOptions {
        batch_size,
        window,
        progress: !quiet,
    };
    let summary = chainsight::client::publish_file(&cfg, &file, &opts)
        .await
        .with_context(|| format!("publishing {} to {}", file.display(), cfg.address))?;
    println!(
        "accepted {}, duplicate {}, rejected {}, malformed {}",
        summary.accepted,
        summary.duplicate,
        summary.rejected.len(),
        summary.malformed.len()
    );
    let mut problems: Vec<_> = summary.rejected.iter().chain(&summary.malformed).collect();
    problems.sort_by_key(|p| p.line);
    for p in &problems {
        if p.field.is_empty() {
            println!("  line {}: {}", p.line, p.reason);
        } else {
            println!(
                "  line {} ({}): {}: {}",
                p.line, p.event_id, p.field, p.reason
            );
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn parse_dimensions(names: &[String]) -> anyhow::Result<Vec<i32>> {
    names
        .iter()
        .filter(|n| !n.trim().is_empty())
        .map(|n| {
            let name = format!("DIMENSION_{}", n.trim().to_uppercase().replace('-', "_"));
            chainsight::pb::Dimension::from_str_name(&name)
                .map(|d| d as i32)
                .with_context(|| format!("--group-by {n}: not a dimension (gtin, category, brand, region, channel, stage, kind, age_band, attribute, time)"))
        })
        .collect()
}

fn parse_bucket(b: &str) -> anyhow::Result<i32> {
    chainsight::pb::TimeBucket::from_str_name(&format!("TIME_BUCKET_{}", b.trim().to_uppercase()))
        .map(|b| b as i32)
        .with_context(|| format!("--bucket {b}: one of hour, day, week, month"))
}

fn parse_kinds(kinds: &[String]) -> anyhow::Result<Vec<i32>> {
    kinds
        .iter()
        .map(|k| {
            chainsight::domain::EventKind::from_label(k)
                .map(|k| k.number())
                .with_context(|| format!("--kind {k}: not an event kind (purchase, return, review, nps, preference, cart_abandoned, search_unmet, complaint, usage)"))
        })
        .collect()
}

fn parse_time(flag: &str, s: &str) -> anyhow::Result<pbjson_types::Timestamp> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{flag} {s}: expected RFC 3339, e.g. 2026-01-01T00:00:00Z"))?;
    Ok(pbjson_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

/// The suite run a `bench` subcommand asks for (`--quick` replaces the sizes).
fn bench_run(scenario: BenchScenario) -> (chainsight::bench::Run, BenchCommon) {
    use chainsight::bench::{scenarios, suite, PropagateOptions, QueryOptions, Run};
    match scenario {
        BenchScenario::Ingest {
            events,
            streams,
            batch,
            window,
            common,
        } => {
            let opts = if common.quick {
                suite::IngestOptions {
                    events: 2_000,
                    streams: 2,
                    batch: 50,
                    window: 2,
                    ..Default::default()
                }
            } else {
                suite::IngestOptions {
                    events,
                    streams,
                    batch,
                    window,
                    ..Default::default()
                }
            };
            (Run::Ingest(opts), common)
        }
        BenchScenario::Latency {
            events,
            warmup,
            via,
            common,
        } => {
            let (events, warmup) = if common.quick {
                (100, 10)
            } else {
                (events, warmup)
            };
            let opts = suite::LatencyOptions {
                events,
                warmup,
                via,
                ..Default::default()
            };
            (Run::Latency(opts), common)
        }
        BenchScenario::Propagate {
            rate,
            duration,
            batch,
            backlog,
            unsigned,
            samples,
            common,
        } => {
            let opts = if common.quick {
                PropagateOptions {
                    rate: 500,
                    duration_secs: 2,
                    batch: 50,
                    backlog: 2_000,
                    unsigned,
                    samples,
                }
            } else {
                PropagateOptions {
                    rate,
                    duration_secs: duration,
                    batch,
                    backlog,
                    unsigned,
                    samples,
                }
            };
            (Run::Propagate(opts), common)
        }
        BenchScenario::Fanout {
            events,
            subscribers,
            common,
        } => {
            let opts = if common.quick {
                scenarios::FanoutOptions {
                    events: 1_000,
                    subscribers: vec![0, 1, 4],
                    streams: 2,
                    batch: 50,
                    window: 2,
                    ..Default::default()
                }
            } else {
                scenarios::FanoutOptions {
                    events,
                    subscribers,
                    ..Default::default()
                }
            };
            (Run::Fanout(opts), common)
        }
        BenchScenario::Growth {
            sizes,
            window_events,
            common,
        } => {
            let opts = if common.quick {
                scenarios::GrowthOptions {
                    sizes: vec![2_000, 5_000],
                    window_events: 1_000,
                    batch: 100,
                    streams: 2,
                    ..Default::default()
                }
            } else {
                scenarios::GrowthOptions {
                    sizes,
                    window_events,
                    ..Default::default()
                }
            };
            (Run::Growth(opts), common)
        }
        BenchScenario::Query {
            sizes,
            queries,
            cost_events,
            common,
        } => {
            let opts = if common.quick {
                QueryOptions {
                    sizes: vec![20_000],
                    queries: 5,
                    cost_events: 1_000,
                }
            } else {
                QueryOptions {
                    sizes,
                    queries,
                    cost_events,
                }
            };
            (Run::Query(opts), common)
        }
        BenchScenario::Subscribe { .. } => unreachable!("handled before"),
    }
}
