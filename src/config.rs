//! Configuration: `node.toml` for a node and `client.toml` for the CLI's
//! client commands, parsed once into typed structs and validated at start.
//! Relative paths are resolved against the directory of the config file.
//! Every error names the key and says how to fix it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::EventKind;
use crate::rollup::{DimSet, Layout};

/// A configuration error, naming the file, the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The TLS files of a node or client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate of the chain CA.
    pub ca: PathBuf,
    /// PEM certificate of this node or client.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Seconds a client has to complete the TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// PEM certificate revocation lists of the chain CA (e.g. the
    /// `crl.pem` of `chainsight certs revoke`): a node refuses a client
    /// certificate they list at the handshake. Re-read on reload (SIGHUP,
    /// `chainsight admin reload`), for new connections.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// A node checks its TLS files (CA, certificate, key, CRLs) this often
    /// and puts changed ones in force without a reload. 0: only on reload.
    #[serde(default = "default_watch_secs")]
    pub watch_secs: u64,
}

fn default_watch_secs() -> u64 {
    10
}

fn default_handshake_timeout() -> u64 {
    10
}

/// Certificate identities granted each role. Deny by default: an identity
/// not listed has no role.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    #[serde(default)]
    pub publishers: Vec<String>,
    #[serde(default)]
    pub downstream: Vec<String>,
    #[serde(default)]
    pub subscribers: Vec<String>,
    #[serde(default)]
    pub analysts: Vec<String>,
    /// May read operational state (`Peering.Links`).
    #[serde(default)]
    pub operators: Vec<String>,
    /// May read the audit trail (`Audit.List`).
    #[serde(default)]
    pub auditors: Vec<String>,
}

/// Privacy settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// Aggregates over fewer distinct customers are suppressed.
    #[serde(default = "default_k_min")]
    pub k_min: u32,
}

fn default_k_min() -> u32 {
    10
}

impl Default for Privacy {
    fn default() -> Self {
        Privacy {
            k_min: default_k_min(),
        }
    }
}

/// Request size limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted gRPC message, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most events in one PublishRequest.
    #[serde(default = "default_max_events")]
    pub max_events_per_request: usize,
    /// Requests per second one identity may make (each message of a
    /// publish or forward stream counts as one), with bursts up to one
    /// second's worth; beyond, RESOURCE_EXHAUSTED. 0: no limit.
    #[serde(default)]
    pub requests_per_second: u32,
    /// Most requests (HTTP/2 streams) open at once on one connection; a
    /// client asking for more waits until one ends. Default 128.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
}

fn default_max_concurrent_streams() -> u32 {
    128
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_max_events() -> usize {
    10_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: default_max_message_bytes(),
            max_events_per_request: default_max_events(),
            requests_per_second: 0,
            max_concurrent_streams: default_max_concurrent_streams(),
        }
    }
}

/// How events travel upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Propagation {
    /// Events whose path is longer than this are not stored or forwarded.
    #[serde(default = "default_max_hops")]
    pub max_hops: usize,
    /// Most events in one forwarded batch.
    #[serde(default = "default_batch_events")]
    pub batch_max_events: usize,
    /// Most encoded bytes in one forwarded batch.
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: usize,
    /// Batches sent but not yet acknowledged, per link.
    #[serde(default = "default_window")]
    pub window: usize,
    /// A link with a backlog and no acknowledgement for this long is stalled.
    #[serde(default = "default_stall_after")]
    pub stall_after_secs: u64,
    /// Reconnect backoff bounds, milliseconds.
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// HTTP/2 keepalive pings on a link's connection every this many
    /// seconds; an unanswered ping (after `keepalive_timeout_secs`) ends
    /// the connection, so a half-open connection is found within their sum.
    #[serde(default = "default_keepalive_interval")]
    pub keepalive_interval_secs: u64,
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_secs: u64,
}

fn default_keepalive_interval() -> u64 {
    20
}

fn default_keepalive_timeout() -> u64 {
    10
}

fn default_max_hops() -> usize {
    8
}
fn default_batch_events() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    1024 * 1024
}
fn default_window() -> usize {
    4
}
fn default_stall_after() -> u64 {
    60
}
fn default_backoff_min() -> u64 {
    100
}
fn default_backoff_max() -> u64 {
    10_000
}

impl Default for Propagation {
    fn default() -> Self {
        Propagation {
            max_hops: default_max_hops(),
            batch_max_events: default_batch_events(),
            batch_max_bytes: default_batch_bytes(),
            window: default_window(),
            stall_after_secs: default_stall_after(),
            backoff_min_ms: default_backoff_min(),
            backoff_max_ms: default_backoff_max(),
            keepalive_interval_secs: default_keepalive_interval(),
            keepalive_timeout_secs: default_keepalive_timeout(),
        }
    }
}

/// How a link treats the customer pseudonym.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PseudonymMode {
    /// Re-keyed per link, so two recipients cannot join on a customer.
    #[default]
    PerLink,
    /// Sent as the origin computed it.
    Shared,
    /// Not sent.
    Drop,
}

/// Fields a link agreement may withhold.
pub const DROPPABLE_FIELDS: &[&str] = &[
    "text",
    "customer_pseudonym",
    "age_band",
    "region",
    "attributes",
    "score",
    "quantity",
];

/// The sharing agreement of one upstream link.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    #[serde(default)]
    pub gtin_prefixes: Vec<String>,
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub drop_fields: Vec<String>,
    #[serde(default)]
    pub pseudonym: PseudonymMode,
}

/// An upstream peer: where this node forwards events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The peer's certificate identity, verified on connect.
    pub id: String,
    /// `https://host:port`.
    pub address: String,
    #[serde(default)]
    pub share: Share,
}

/// A filter an identity cannot widen (`[[filter_limit]]`): applies to its
/// subscriptions and queries. Empty lists do not limit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterLimit {
    pub identity: String,
    #[serde(default)]
    pub gtin_prefixes: Vec<String>,
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub regions: Vec<String>,
}

/// `[retention]`: how long events are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Events that occurred longer ago are removed, e.g. "400d"; none if unset.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<std::time::Duration>,
    /// How often the retention task runs.
    #[serde(default = "default_retention_every", with = "humantime_serde")]
    pub check_every: std::time::Duration,
    /// Most events removed per step (a step is one transaction).
    #[serde(default = "default_retention_batch")]
    pub batch: usize,
}

fn default_retention_every() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}
fn default_retention_batch() -> usize {
    1000
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: None,
            check_every: default_retention_every(),
            batch: default_retention_batch(),
        }
    }
}

/// `[insights]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsightsConfig {
    /// Maintain rollups at ingest (queries read only rollups). Turning this
    /// off is for measuring their cost; re-enable with
    /// `chainsight admin rebuild-rollups`.
    #[serde(default = "default_true")]
    pub rollups: bool,
    /// The views kept besides the hourly cells over every dimension: each
    /// a list of dimensions (gtin, category, brand, region, channel, stage,
    /// kind, age_band, attribute). A query whose group-by and filter
    /// dimensions a view covers reads that view's day/week/month cells, so
    /// its cost does not grow with history. Changing the list needs
    /// `chainsight admin rebuild-rollups`. Default: see [`Layout::default`].
    #[serde(default)]
    pub views: Option<Vec<Vec<String>>>,
    /// Memory for the day, week and month cells queries read recently
    /// (MiB; 0: none). A query over a year of weeks then reads one cached
    /// entry per week instead of walking the store cell by cell.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: usize,
    /// The attribute keys whose values the rollups keep (grouping by
    /// attribute works for these keys only); `["*"]` keeps every key.
    /// Leave out keys with unbounded values (basket, session or order ids):
    /// each kept attribute adds cells per event. Changing the list needs
    /// `chainsight admin rebuild-rollups`. Default:
    /// [`crate::rollup::DEFAULT_ATTRIBUTE_KEYS`].
    #[serde(default)]
    pub attribute_keys: Option<Vec<String>>,
}

fn default_true() -> bool {
    true
}

fn default_cache_mib() -> usize {
    64
}

impl Default for InsightsConfig {
    fn default() -> Self {
        InsightsConfig {
            rollups: true,
            views: None,
            cache_mib: default_cache_mib(),
            attribute_keys: None,
        }
    }
}

impl InsightsConfig {
    /// The rollup layout to keep; `None` when rollups are off. Checked at
    /// load, so only a hand-built config can fail here.
    pub fn layout(&self) -> Result<Option<Layout>, String> {
        if !self.rollups {
            return Ok(None);
        }
        let attribute_keys = match &self.attribute_keys {
            None => Layout::default().attribute_keys,
            Some(keys) if keys.iter().any(|k| k == "*") => None,
            Some(keys) => {
                if let Some(k) = keys.iter().find(|k| {
                    k.is_empty()
                        || k.len() > 64
                        || k.chars().any(|c| c.is_whitespace() || c.is_control())
                }) {
                    return Err(format!("attribute_keys: {k:?} is not an attribute key"));
                }
                let mut keys = keys.clone();
                keys.sort();
                keys.dedup();
                Some(keys)
            }
        };
        let Some(views) = &self.views else {
            return Ok(Some(Layout {
                attribute_keys,
                ..Layout::default()
            }));
        };
        if views.len() > crate::rollup::MAX_VIEWS {
            return Err(format!(
                "at most {} views, got {}",
                crate::rollup::MAX_VIEWS,
                views.len()
            ));
        }
        let mut out = Vec::with_capacity(views.len());
        for (i, names) in views.iter().enumerate() {
            let mut dims = DimSet::default();
            for name in names {
                let d = DimSet::named(name).ok_or_else(|| {
                    format!(
                        "view {i}: unknown dimension {name:?} (one of {})",
                        DimSet::NAMES.map(|(n, _)| n).join(", ")
                    )
                })?;
                dims = dims.union(d);
            }
            if dims.is_empty() {
                return Err(format!("view {i} names no dimension"));
            }
            if out.contains(&dims) {
                return Err(format!("view {i} repeats an earlier view"));
            }
            out.push(dims);
        }
        Ok(Some(Layout {
            views: out,
            attribute_keys,
        }))
    }
}

/// `node.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id: its certificate identity and its name in event paths.
    pub id: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where the sled store and the pseudonym key live.
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    #[serde(default)]
    pub roles: Roles,
    #[serde(default)]
    pub privacy: Privacy,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub propagation: Propagation,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub insights: InsightsConfig,
    #[serde(default)]
    pub filter_limit: Vec<FilterLimit>,
    #[serde(default)]
    pub upstream: Vec<Upstream>,
    #[serde(default)]
    pub trust: Trust,
    #[serde(default)]
    pub dp_budget: Vec<DpBudget>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[[export]]`: streams of the stored signals into NATS JetStream.
    #[serde(default)]
    pub export: Vec<crate::export::ExportConfig>,
    /// The file this config was read from (for a live reload).
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[metrics]`: the optional Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics` (plain HTTP, no authentication: keep
    /// it on loopback, e.g. "127.0.0.1:9464"). None: no endpoint.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[runtime]`: the node's async runtime (gRPC, TLS, the request
/// handlers); the store has threads of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the runtime. Default: one per CPU.
    ///
    /// Fewer can answer a lone request sooner, at a risk. On the 2-CPU
    /// host (README, session 38), one worker against two measured
    /// `bench latency` p50 255-261 vs 280-291 µs and p99 425-439 vs
    /// 483-561 µs at a tenth less CPU, `bench propagate` p50 4.1-4.3 vs
    /// 4.5-4.8 ms, `bench ingest` the same, and with 64 followers (`bench
    /// fanout`) a delivery lag p99 of 108-191 vs 334-391 ms for a tenth
    /// less ingest. But every connection then waits while the one worker
    /// does anything long: a small publish synced on it (a slow disk's
    /// fdatasync), a sled read behind a rollup checkpoint's batch, a
    /// request of thousands of events; on a stuck disk, health checks and
    /// HTTP/2 keepalives stop too. Hence not the default.
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl RuntimeConfig {
    /// The worker threads to start: as set, else one per CPU.
    pub fn workers(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// `[storage]`: the sled store's use of memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// sled's page cache (MiB): pages read or written recently stay in
    /// memory up to this size, which bounds most of the node's memory.
    /// Default 128 (sled's own is 1024: at 10M stored events that took
    /// the node's peak RSS to 3.7 GiB, against 1.9 GiB at 256, with the
    /// same ingest rate and insight query latency; README, session 19;
    /// 256 until session 24, whose `bench growth` peaked at 571-597 MiB with
    /// 128 against 699-736 MiB with 256, the query p99 within its goal).
    #[serde(default = "default_page_cache_mib")]
    pub page_cache_mib: u64,
    /// After the store could not write (a full disk), the node reopens it
    /// by itself once this much space (MiB) is free in the data directory.
    /// Default 256.
    #[serde(default = "default_resume_free_mib")]
    pub resume_free_mib: u64,
    /// New event ids the store keeps in its journal (`id_journal.<n>`,
    /// held by id in memory: the id's bytes and about 40 more) before a
    /// background pass moves them into packs of a few KB (`id_packs`);
    /// once more are packed, an eighth of those (at most 250,000 unless
    /// this is higher). A higher value holds more ids in memory and makes
    /// the store's open read more. Default 100000; at least 1.
    #[serde(default = "default_id_pack_min")]
    pub id_pack_min: u64,
}

fn default_id_pack_min() -> u64 {
    crate::store::DEFAULT_ID_PACK_MIN
}

fn default_resume_free_mib() -> u64 {
    256
}

fn default_page_cache_mib() -> u64 {
    crate::store::DEFAULT_PAGE_CACHE_BYTES >> 20
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            page_cache_mib: default_page_cache_mib(),
            resume_free_mib: default_resume_free_mib(),
            id_pack_min: default_id_pack_min(),
        }
    }
}

impl StorageConfig {
    /// The page cache in bytes.
    pub fn page_cache_bytes(&self) -> u64 {
        self.page_cache_mib.saturating_mul(1 << 20)
    }
}

/// `[log]`: how the node writes its log (stderr).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

/// `human` (default) or `json`: one JSON object per line for log shippers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// A differential-privacy budget for one analyst (`[[dp_budget]]`): their
/// insight answers carry calibrated noise (see `crate::dp`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpBudget {
    pub identity: String,
    /// ε the analyst may spend per period.
    pub epsilon_per_period: f64,
    /// The period, from the Unix epoch (UTC): "1d", "7d", "12h".
    #[serde(default = "default_dp_period", with = "humantime_serde")]
    pub period: std::time::Duration,
    /// ε one query spends.
    pub epsilon_per_query: f64,
    /// Contribution bound the noise is calibrated for: events of one
    /// customer in one group.
    #[serde(default = "default_max_events_per_customer")]
    pub max_events_per_customer: u32,
    /// δ of the (ε, δ) guarantee on which groups appear at all.
    #[serde(default = "default_dp_delta")]
    pub delta: f64,
}

fn default_dp_delta() -> f64 {
    1e-6
}

fn default_dp_period() -> std::time::Duration {
    std::time::Duration::from_secs(86_400)
}

fn default_max_events_per_customer() -> u32 {
    1
}

/// Verifiable origin (`[trust]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    /// Sign the events this node creates (publishes) with its certificate key.
    #[serde(default = "yes")]
    pub sign: bool,
    /// Refuse (and count) forwarded events whose origin proof does not
    /// verify against the chain CA, or that carry none.
    #[serde(default)]
    pub require_origin_signature: bool,
}

fn yes() -> bool {
    true
}

impl Default for Trust {
    fn default() -> Self {
        Trust {
            sign: true,
            require_origin_signature: false,
        }
    }
}

/// `client.toml`: how the CLI reaches a node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `https://host:port` of the node.
    pub address: String,
    /// The node's identity, checked against its certificate; defaults to the
    /// host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    pub tls: TlsFiles,
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, Error> {
    toml::from_str(text).map_err(|mut e: toml::de::Error| {
        // The position, the reason and the key, never the offending line:
        // it may hold a secret (a token) that must not reach logs or the
        // audit trail of a refused reload.
        let position = e.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: ")
        });
        e.set_input(None);
        Error::Parse {
            path: path.to_path_buf(),
            message: format!(
                "{}{}",
                position.unwrap_or_default(),
                e.to_string().trim_end().replace('\n', " ")
            ),
        }
    })
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."))
}

impl TlsFiles {
    fn resolve_and_check(&mut self, path: &Path, base: &Path) -> Result<(), Error> {
        for (key, file) in [
            ("tls.ca", &mut self.ca),
            ("tls.cert", &mut self.cert),
            ("tls.key", &mut self.key),
        ] {
            resolve(base, file);
            if !file.is_file() {
                return Err(invalid(
                    path,
                    key,
                    format!(
                        "file {} does not exist; create certificates with `chainsight certs init --dir DIR NAME...` and point `{key}` at them",
                        file.display()
                    ),
                ));
            }
        }
        for (i, file) in self.crls.iter_mut().enumerate() {
            resolve(base, file);
            if !file.is_file() {
                return Err(invalid(
                    path,
                    &format!("tls.crls[{i}]"),
                    format!(
                        "file {} does not exist; write one with `chainsight certs revoke --dir DIR NAME...`",
                        file.display()
                    ),
                ));
            }
        }
        if self.handshake_timeout_secs == 0 {
            return Err(invalid(
                path,
                "tls.handshake_timeout_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

fn invalid(path: &Path, key: &str, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// Whether `s` is usable as a node or client identity.
pub fn is_identity(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The parts of node.toml that say how to reach the node as itself: what
/// `chainsight admin reload` needs even when the rest of the file no
/// longer validates (the node then says why it refuses it).
#[derive(Debug, Clone, Deserialize)]
pub struct NodeConnection {
    pub id: String,
    pub listen: SocketAddr,
    pub tls: TlsFiles,
}

impl NodeConnection {
    /// Reads the connection parts of `node.toml`, ignoring the rest.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut c: NodeConnection = parse(path, &read(path)?)?;
        c.tls.resolve_and_check(path, &base_dir(path))?;
        Ok(c)
    }
}

impl NodeConfig {
    /// Reads and validates `node.toml`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut cfg: NodeConfig = parse(path, &read(path)?)?;
        cfg.finish(path)?;
        Ok(cfg)
    }

    /// Parses from a string; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, Error> {
        let mut cfg: NodeConfig = parse(path, text)?;
        cfg.finish(path)?;
        Ok(cfg)
    }

    fn finish(&mut self, path: &Path) -> Result<(), Error> {
        self.source = path.to_path_buf();
        let base = base_dir(path);
        if !is_identity(&self.id) {
            return Err(invalid(
                path,
                "id",
                "must be 1-64 characters of letters, digits, '-', '.', '_' (the node's certificate identity)",
            ));
        }
        resolve(&base, &mut self.data_dir);
        self.tls.resolve_and_check(path, &base)?;
        self.validate_roles(path)?;
        self.validate_dp(path)?;
        if let Some(n) = self.runtime.worker_threads {
            if !(1..=1024).contains(&n) {
                return Err(invalid(
                    path,
                    "runtime.worker_threads",
                    "must be at least 1 and at most 1024 (or left out: one per CPU)",
                ));
            }
        }
        if self.privacy.k_min == 0 {
            return Err(invalid(
                path,
                "privacy.k_min",
                "must be at least 1 (default 10)",
            ));
        }
        if self.limits.max_message_bytes < 1024 {
            return Err(invalid(
                path,
                "limits.max_message_bytes",
                "must be at least 1024",
            ));
        }
        if self.limits.max_concurrent_streams == 0 {
            return Err(invalid(
                path,
                "limits.max_concurrent_streams",
                "must be at least 1 (default 128)",
            ));
        }
        if self.limits.max_events_per_request == 0 {
            return Err(invalid(
                path,
                "limits.max_events_per_request",
                "must be at least 1",
            ));
        }
        self.validate_propagation(path)?;
        self.validate_limits(path)?;
        self.insights
            .layout()
            .map_err(|m| invalid(path, "insights.views", m))?;
        if self.retention.max_age.is_some_and(|a| a.as_secs() < 60) {
            return Err(invalid(
                path,
                "retention.max_age",
                "must be at least 60s (e.g. \"400d\")",
            ));
        }
        if self.retention.batch == 0 || self.retention.check_every.is_zero() {
            return Err(invalid(
                path,
                "retention.batch",
                "batch and check_every must be positive",
            ));
        }
        crate::export::validate(&mut self.export, path, &base)?;
        self.validate_upstreams(path)
    }

    fn validate_limits(&self, path: &Path) -> Result<(), Error> {
        for (i, l) in self.filter_limit.iter().enumerate() {
            let key = |k: &str| format!("filter_limit[{i}].{k}");
            if !is_identity(&l.identity) {
                return Err(invalid(
                    path,
                    &key("identity"),
                    "must be a certificate identity",
                ));
            }
            if let Some(p) = l
                .gtin_prefixes
                .iter()
                .find(|p| !crate::domain::is_company_prefix(p))
            {
                return Err(invalid(
                    path,
                    &key("gtin_prefixes"),
                    format!("{p:?} is not a GS1 company prefix (1-13 digits)"),
                ));
            }
            if let Some(k) = l.kinds.iter().find(|k| EventKind::from_label(k).is_none()) {
                return Err(invalid(
                    path,
                    &key("kinds"),
                    format!("{k:?} is not an event kind (e.g. purchase, review, nps)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_propagation(&self, path: &Path) -> Result<(), Error> {
        let p = &self.propagation;
        let checks: [(&str, bool, &str); 8] = [
            (
                "propagation.keepalive_interval_secs",
                p.keepalive_interval_secs >= 1,
                "must be at least 1",
            ),
            (
                "propagation.keepalive_timeout_secs",
                p.keepalive_timeout_secs >= 1,
                "must be at least 1",
            ),
            (
                "propagation.max_hops",
                (1..=32).contains(&p.max_hops),
                "must be 1-32",
            ),
            (
                "propagation.batch_max_events",
                p.batch_max_events >= 1,
                "must be at least 1",
            ),
            (
                "propagation.batch_max_bytes",
                p.batch_max_bytes >= 1024,
                "must be at least 1024 (and below the upstream's limits.max_message_bytes)",
            ),
            ("propagation.window", p.window >= 1, "must be at least 1"),
            (
                "propagation.stall_after_secs",
                p.stall_after_secs >= 1,
                "must be at least 1",
            ),
            (
                "propagation.backoff_max_ms",
                p.backoff_min_ms >= 1 && p.backoff_max_ms >= p.backoff_min_ms,
                "must be at least backoff_min_ms (which must be at least 1)",
            ),
        ];
        for (key, ok, msg) in checks {
            if !ok {
                return Err(invalid(path, key, msg));
            }
        }
        Ok(())
    }

    fn validate_dp(&self, path: &Path) -> Result<(), Error> {
        let mut seen = std::collections::HashSet::new();
        for b in &self.dp_budget {
            let positive = |v: f64| v.is_finite() && v > 0.0;
            let checks = [
                (
                    "dp_budget.identity",
                    is_identity(&b.identity) && seen.insert(b.identity.clone()),
                    "must be a certificate identity, once per identity",
                ),
                (
                    "dp_budget.epsilon_per_period",
                    positive(b.epsilon_per_period),
                    "must be a positive number",
                ),
                (
                    "dp_budget.epsilon_per_query",
                    positive(b.epsilon_per_query) && b.epsilon_per_query <= b.epsilon_per_period,
                    "must be positive and at most epsilon_per_period",
                ),
                (
                    "dp_budget.period",
                    b.period.as_secs() >= 1,
                    "must be at least 1s",
                ),
                (
                    "dp_budget.max_events_per_customer",
                    b.max_events_per_customer >= 1,
                    "must be at least 1",
                ),
                (
                    "dp_budget.delta",
                    b.delta > 0.0 && b.delta < 0.1,
                    "must lie between 0 and 0.1 (e.g. 1e-6)",
                ),
            ];
            for (key, ok, msg) in checks {
                if !ok {
                    return Err(invalid(path, key, msg));
                }
            }
        }
        Ok(())
    }

    fn validate_roles(&self, path: &Path) -> Result<(), Error> {
        let r = &self.roles;
        for (key, ids) in [
            ("roles.publishers", &r.publishers),
            ("roles.downstream", &r.downstream),
            ("roles.subscribers", &r.subscribers),
            ("roles.analysts", &r.analysts),
            ("roles.operators", &r.operators),
            ("roles.auditors", &r.auditors),
        ] {
            if let Some(bad) = ids.iter().find(|id| !is_identity(id)) {
                return Err(invalid(
                    path,
                    key,
                    format!(
                        "{bad:?} is not a certificate identity (letters, digits, '-', '.', '_')"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_upstreams(&self, path: &Path) -> Result<(), Error> {
        let mut seen = std::collections::HashSet::new();
        for (i, up) in self.upstream.iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            if !is_identity(&up.id) {
                return Err(invalid(
                    path,
                    &key("id"),
                    "must be the peer's certificate identity",
                ));
            }
            if up.id == self.id {
                return Err(invalid(
                    path,
                    &key("id"),
                    "a node cannot be its own upstream",
                ));
            }
            if !seen.insert(&up.id) {
                return Err(invalid(
                    path,
                    &key("id"),
                    format!("{:?} is listed twice", up.id),
                ));
            }
            if !up.address.starts_with("https://") {
                return Err(invalid(
                    path,
                    &key("address"),
                    "must start with https:// (links always use mutual TLS)",
                ));
            }
            for p in &up.share.gtin_prefixes {
                if !crate::domain::is_company_prefix(p) {
                    return Err(invalid(
                        path,
                        &key("share.gtin_prefixes"),
                        format!("{p:?} is not a GS1 company prefix (1-13 digits)"),
                    ));
                }
            }
            for k in &up.share.kinds {
                if EventKind::from_label(k).is_none() {
                    return Err(invalid(
                        path,
                        &key("share.kinds"),
                        format!("{k:?} is not an event kind (e.g. purchase, review, nps)"),
                    ));
                }
            }
            for f in &up.share.drop_fields {
                if !DROPPABLE_FIELDS.contains(&f.as_str()) {
                    return Err(invalid(
                        path,
                        &key("share.drop_fields"),
                        format!("{f:?} cannot be dropped; one of {DROPPABLE_FIELDS:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ClientConfig {
    /// Reads and validates `client.toml`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut cfg: ClientConfig = parse(path, &read(path)?)?;
        let base = base_dir(path);
        if !cfg.address.starts_with("https://") {
            return Err(invalid(
                path,
                "address",
                "must start with https:// (nodes only speak mutual TLS)",
            ));
        }
        cfg.tls.resolve_and_check(path, &base)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let err = NodeConfig::from_toml(
            "id = \"r\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[tls]\nca = \"nope.pem\"\ncert = \"c\"\nkey = \"k\"\n",
            &path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tls.ca") && err.contains("certs init"),
            "{err}"
        );

        let err = NodeConfig::from_toml("id = \"r\"\nlisten = \"nonsense\"\n", &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn the_runtime_has_a_worker_per_cpu_unless_told() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(RuntimeConfig::default().workers(), cpus);
        let set = RuntimeConfig {
            worker_threads: Some(3),
        };
        assert_eq!(set.workers(), 3);
    }
}
