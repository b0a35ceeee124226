//! Export into NATS JetStream: each `[[export]]` entry of node.toml streams
//! the node's stored signals — exactly what a subscriber with the entry's
//! filter would receive (`crate::service::signals::to_signal`) — into a
//! JetStream stream, so that downstream analytics (stream processors,
//! warehouses) scale out behind one node instead of each subscribing to it.
//!
//! One task per entry reads the store in sequence order after the entry's
//! persisted cursor, up to the durable watermark, and publishes a batch of
//! signals without waiting (pipelined), then awaits the JetStream acks in
//! order. The cursor is persisted (flushed) only for a prefix of the batch
//! that JetStream acknowledged, so an export never loses a signal; every
//! message carries `Nats-Msg-Id` (the event_id), so what a restart publishes
//! again — at most one batch — is dropped by the stream's duplicate window.
//! A NATS server that is down or refuses is retried with backoff; nothing is
//! skipped. Events the filter excludes advance the cursor too.
//!
//! Messages: subject `<subject>.<kind>` for an event (`kind` is the event
//! kind's label, e.g. `chainsight.retailer.purchase`) and
//! `<subject>.erasure` for an erasure signal; payload the proto3 JSON of a
//! `chainsight.v1.Signal` (`{"cursor": .., "event": {..}}`), headers
//! `Content-Type: application/json`, `Nats-Msg-Id`, `Chainsight-Node` and
//! `Chainsight-Cursor`. A stream that does not exist is created covering
//! `<subject>.>` (file storage, the entry's duplicate window).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config;
use crate::conversions;
use crate::domain::{Channel, EventFilter, EventKind};
use crate::pb;
use crate::service::signals::to_signal;
use crate::store::{self, Seq, Store};

/// Default signals published before their acks are awaited.
const DEFAULT_BATCH: usize = 256;
/// Most signals in flight one entry may ask for.
const MAX_BATCH: usize = 10_000;
/// Timeout of JetStream API requests and of each publish ack.
const NATS_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait before retrying after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// One `[[export]]` entry of node.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Unique among the entries; names the persisted cursor, so renaming
    /// an entry exports everything again.
    pub name: String,
    /// The NATS server, e.g. `nats://127.0.0.1:4222` (`tls://` for TLS).
    pub url: String,
    /// Subject prefix: events go to `<subject>.<kind>`, erasures to
    /// `<subject>.erasure`.
    pub subject: String,
    /// The JetStream stream; created covering `<subject>.>` if missing.
    pub stream: String,
    /// Signals published before their acks are awaited (the most a restart
    /// can publish again).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Duplicate window of a stream this export creates (an existing
    /// stream keeps its own).
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Message age limit of a stream this export creates (e.g. "400d", as
    /// the node's retention): JetStream removes older messages, erased
    /// events' among them. None: kept until the stream's other limits.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Which signals to export; empty lists do not limit.
    #[serde(default)]
    pub filter: ExportFilter,
    /// A NATS authentication token.
    #[serde(default)]
    pub token: Option<Token>,
    /// A NATS credentials (`.creds`) file, relative to node.toml.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
}

fn default_batch() -> usize {
    DEFAULT_BATCH
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

/// `[export.filter]`: the fields of a Signals subscription's filter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFilter {
    /// GS1 company prefixes.
    #[serde(default)]
    pub gtin_prefixes: Vec<String>,
    #[serde(default)]
    pub categories: Vec<String>,
    /// Event kind labels (`purchase`, `review`, ...).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Channel labels (`web`, `store`, ...).
    #[serde(default)]
    pub channels: Vec<String>,
    /// Regions (`EE` also matches `EE-37`).
    #[serde(default)]
    pub regions: Vec<String>,
}

/// A secret that never appears in `Debug` output.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl ExportFilter {
    /// The filter as subscriptions validate it (`conversions::filter_from_pb`);
    /// `field` prefixes the names in errors.
    pub fn to_filter(&self, field: &str) -> Result<EventFilter, conversions::Invalid> {
        fn numbers<T>(
            labels: &[String],
            field: String,
            parse: impl Fn(&str) -> Option<T>,
            number: impl Fn(T) -> i32,
        ) -> Result<Vec<i32>, conversions::Invalid> {
            labels
                .iter()
                .map(|l| {
                    parse(l).map(&number).ok_or_else(|| conversions::Invalid {
                        field: field.clone(),
                        reason: format!("{l:?} is not a known value"),
                    })
                })
                .collect()
        }
        let filter = pb::Filter {
            gtin_prefixes: self.gtin_prefixes.clone(),
            categories: self.categories.clone(),
            kinds: numbers(
                &self.kinds,
                format!("{field}.kinds"),
                EventKind::from_label,
                EventKind::number,
            )?,
            channels: numbers(
                &self.channels,
                format!("{field}.channels"),
                Channel::from_label,
                Channel::number,
            )?,
            regions: self.regions.clone(),
            ..Default::default()
        };
        conversions::filter_from_pb(Some(filter), field)
    }
}

/// Validates the `[[export]]` entries of `path` (relative credential paths
/// are resolved against `base`); errors name the key.
pub fn validate(
    exports: &mut [ExportConfig],
    path: &Path,
    base: &Path,
) -> Result<(), config::Error> {
    let mut names = HashSet::new();
    for (i, e) in exports.iter_mut().enumerate() {
        let invalid = |key: &str, message: String| config::Error::Invalid {
            path: path.to_path_buf(),
            key: format!("export[{i}].{key}"),
            message,
        };
        if !config::is_identity(&e.name) || !names.insert(e.name.clone()) {
            return Err(invalid(
                "name",
                "must be 1-64 letters, digits, '-', '.', '_', unique among the exports".into(),
            ));
        }
        e.url
            .parse::<async_nats::ServerAddr>()
            .map_err(|err| invalid("url", format!("{err} (e.g. \"nats://127.0.0.1:4222\")")))?;
        if !is_subject_prefix(&e.subject) {
            return Err(invalid(
                "subject",
                "must be dot-separated tokens of printable ASCII without '*' or '>' (e.g. \"chainsight.retailer\")".into(),
            ));
        }
        if !is_stream_name(&e.stream) {
            return Err(invalid(
                "stream",
                "must be 1-255 printable ASCII characters without '.', '*', '>', '/' or '\\'"
                    .into(),
            ));
        }
        if !(1..=MAX_BATCH).contains(&e.batch) {
            return Err(invalid("batch", format!("must be 1-{MAX_BATCH}")));
        }
        if e.max_age.is_some_and(|a| a < e.duplicate_window) {
            return Err(invalid(
                "max_age",
                "must be at least the duplicate window (e.g. \"400d\")".into(),
            ));
        }
        if e.duplicate_window < Duration::from_secs(1) {
            return Err(invalid(
                "duplicate_window",
                "must be at least 1s (e.g. \"2m\")".into(),
            ));
        }
        e.filter
            .to_filter(&format!("export[{i}].filter"))
            .map_err(|err| config::Error::Invalid {
                path: path.to_path_buf(),
                key: err.field,
                message: err.reason,
            })?;
        check_credentials(e, &invalid, base)?;
    }
    Ok(())
}

/// Token or credentials file, not both; the file resolved against `base`
/// and present.
fn check_credentials(
    e: &mut ExportConfig,
    invalid: &impl Fn(&str, String) -> config::Error,
    base: &Path,
) -> Result<(), config::Error> {
    if e.token.is_some() && e.credentials.is_some() {
        return Err(invalid(
            "credentials",
            "set either token or credentials, not both".into(),
        ));
    }
    if let Some(creds) = &mut e.credentials {
        if creds.is_relative() {
            *creds = base.join(&*creds);
        }
        if !creds.is_file() {
            return Err(invalid(
                "credentials",
                format!("file {} does not exist", creds.display()),
            ));
        }
    }
    Ok(())
}

/// A subject prefix: non-empty tokens, no wildcards, no whitespace.
fn is_subject_prefix(s: &str) -> bool {
    s.len() <= 200
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        })
}

/// A JetStream stream name (as nats-server accepts them).
fn is_stream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>' | b'/' | b'\\'))
}

/// Why an export session ended (it is retried).
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("JetStream stored the message in stream {got:?}, not {expected:?}: another stream captures the subject")]
    WrongStream { expected: String, got: String },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("store read failed: {0}")]
    Read(String),
    #[error("encoding a signal failed: {0}")]
    Encode(String),
}

/// Starts one export task per entry; each stops with `token`.
pub fn spawn(
    node_id: &str,
    exports: &[ExportConfig],
    store: Store,
    token: CancellationToken,
) -> Vec<JoinHandle<()>> {
    exports
        .iter()
        .filter_map(|cfg| {
            // Validated at load; a filter that fails here is a bug, logged.
            let filter = match cfg.filter.to_filter("filter") {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(export = %cfg.name, error = %e, "export not started");
                    return None;
                }
            };
            let export = Export {
                server: server_of(&cfg.url),
                cfg: cfg.clone(),
                filter,
                node_id: node_id.to_string(),
                store: store.clone(),
            };
            let token = token.clone();
            let span = tracing::info_span!("export", name = %cfg.name);
            Some(tokio::spawn(
                async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = export.run() => {}
                    }
                }
                .instrument(span),
            ))
        })
        .collect()
}

/// One running export.
struct Export {
    /// `scheme://host:port` of the url, without credentials: for logs.
    server: String,
    cfg: ExportConfig,
    filter: EventFilter,
    node_id: String,
    store: Store,
}

/// Exponential backoff between failed sessions, reset by progress.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        wait
    }
}

/// What awaiting one batch's acks achieved.
struct Acked {
    /// Every signal up to here is in the stream (or filtered out).
    upto: Seq,
    published: u64,
    duplicates: u64,
    error: Option<Error>,
}

impl Export {
    /// Runs sessions until the task is cancelled; never returns otherwise.
    async fn run(self) {
        let mut backoff = Backoff(BACKOFF_MIN);
        loop {
            let err = self.session(&mut backoff).await;
            let wait = backoff.next();
            tracing::warn!(error = %err, retry_in = ?wait, "export interrupted; will retry");
            tokio::time::sleep(wait).await;
        }
    }

    /// Connects, makes sure the stream exists, and exports until something
    /// fails.
    async fn session(&self, backoff: &mut Backoff) -> Error {
        let js = match self.connect().await {
            Ok(js) => js,
            Err(e) => return e,
        };
        if let Err(e) = self.ensure_stream(&js).await {
            return e;
        }
        self.audit_session().await;
        match self.export_loop(&js, backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn connect(&self) -> Result<jetstream::Context, Error> {
        let connect_err = |reason: String| Error::Connect {
            server: self.server.clone(),
            reason,
        };
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!(
                "chainsight {} export {}",
                self.node_id, self.cfg.name
            ))
            .connection_timeout(Duration::from_secs(5));
        if let Some(Token(token)) = &self.cfg.token {
            opts = opts.token(token.clone());
        }
        if let Some(creds) = &self.cfg.credentials {
            opts = opts
                .credentials_file(creds)
                .await
                .map_err(|e| connect_err(format!("credentials {}: {e}", creds.display())))?;
        }
        let client = opts
            .connect(self.cfg.url.as_str())
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        Ok(jetstream::context::ContextBuilder::new()
            .timeout(NATS_TIMEOUT)
            .ack_timeout(NATS_TIMEOUT)
            .max_ack_inflight(self.cfg.batch)
            .backpressure_on_inflight(true)
            .build(client))
    }

    /// Creates the stream if it does not exist; reports its duplicate window.
    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<(), Error> {
        let config = jetstream::stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![format!("{}.>", self.cfg.subject)],
            duplicate_window: self.cfg.duplicate_window,
            max_age: self.cfg.max_age.unwrap_or_default(),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| Error::Stream {
                stream: self.cfg.stream.clone(),
                reason: e.to_string(),
            })?;
        let info = stream.cached_info();
        tracing::info!(
            stream = %info.config.name,
            subjects = ?info.config.subjects,
            duplicate_window = ?info.config.duplicate_window,
            messages = info.state.messages,
            "export connected"
        );
        Ok(())
    }

    /// Records in the audit trail that signals flow out through this export
    /// (identity `export/<name>`, which no certificate identity can be),
    /// with where to and what, as subscriptions are recorded.
    async fn audit_session(&self) {
        let detail = serde_json::json!({
            "export": self.cfg.name,
            "server": self.server,
            "stream": self.cfg.stream,
            "subject": self.cfg.subject,
            "filter": conversions::filter_to_pb(&self.filter),
            "after_cursor": self.store.export_cursor(&self.cfg.name).ok(),
        });
        let store = self.store.clone();
        let identity = format!("export/{}", self.cfg.name);
        let recorded = tokio::task::spawn_blocking(move || {
            store.audit(crate::audit::Kind::Subscription, &identity, &detail)
        })
        .await;
        if !matches!(recorded, Ok(Ok(_))) {
            tracing::error!(?recorded, "could not record the export in the audit trail");
        }
    }

    /// Exports batch after batch, following the store; returns only on failure.
    async fn export_loop(
        &self,
        js: &jetstream::Context,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, Error> {
        let name = &self.cfg.name;
        let mut cursor = self.store.export_cursor(name)?;
        let mut durable = self.store.watch_durable();
        let mut purged_seen = 0;
        let mut caught_up_at = None;
        let (mut published, mut duplicates) = (0u64, 0u64);
        loop {
            let upto = *durable.borrow_and_update();
            self.check_purged(cursor, &mut purged_seen)?;
            let (chunk, end) = self.read_chunk(cursor, upto).await?;
            if chunk.is_empty() && end == cursor {
                if caught_up_at != Some(cursor) {
                    caught_up_at = Some(cursor);
                    tracing::info!(cursor, published, duplicates, "export caught up");
                }
                if durable.changed().await.is_err() {
                    return Err(Error::Read("the store closed".into()));
                }
                continue;
            }
            let acked = self.publish_batch(js, chunk).await;
            published += acked.published;
            duplicates += acked.duplicates;
            let delivered = if acked.error.is_none() {
                end
            } else {
                acked.upto
            };
            if delivered > cursor {
                self.store.set_export_cursor(name, delivered).await?;
                cursor = delivered;
                *backoff = Backoff(BACKOFF_MIN);
            }
            if let Some(e) = acked.error {
                return Err(e);
            }
        }
    }

    /// Up to `batch` signals after `cursor` up to `upto`, and the cursor
    /// reached once all of them are delivered: `upto` when the chunk holds
    /// everything up to it (numbers that hold nothing, purged, move the
    /// cursor too), else its last sequence number.
    async fn read_chunk(
        &self,
        cursor: Seq,
        upto: Seq,
    ) -> Result<(Vec<(Seq, store::Shared)>, Seq), Error> {
        let (store, batch) = (self.store.clone(), self.cfg.batch);
        let mut chunk = tokio::task::spawn_blocking(move || store.scan_shared(cursor, upto, batch))
            .await
            .map_err(|e| Error::Read(e.to_string()))??;
        let complete = chunk.len() < batch;
        // Erasures can make a chunk longer: no more than `batch` in flight.
        chunk.truncate(batch);
        let end = match chunk.last() {
            Some(&(last, _)) if !complete => last,
            _ => upto.max(cursor),
        };
        Ok((chunk, end))
    }

    /// Says so (once) when retention removed events this export had not
    /// delivered yet: they cannot be exported any more.
    fn check_purged(&self, cursor: Seq, purged_seen: &mut Seq) -> Result<(), Error> {
        let purged = self.store.purged_upto()?;
        if purged > cursor && purged > *purged_seen {
            tracing::error!(
                cursor,
                purged_upto = purged,
                "retention removed events before they were exported; they are missing downstream"
            );
        }
        *purged_seen = purged;
        Ok(())
    }

    /// Publishes a batch without waiting, then awaits the acks in order.
    async fn publish_batch(
        &self,
        js: &jetstream::Context,
        chunk: Vec<(Seq, store::Shared)>,
    ) -> Acked {
        let mut pending: Vec<(Seq, Option<PublishAckFuture>)> = Vec::with_capacity(chunk.len());
        let mut error = None;
        for (seq, shared) in chunk {
            let Some(signal) = to_signal(&self.filter, seq, &shared) else {
                pending.push((seq, None));
                continue;
            };
            let sent = match self.message(&signal) {
                Ok((subject, message)) => js
                    .send_publish(subject, message)
                    .await
                    .map_err(|e| Error::Publish(e.to_string())),
                Err(e) => Err(e),
            };
            match sent {
                Ok(ack) => pending.push((seq, Some(ack))),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let mut acked = Acked {
            upto: 0,
            published: 0,
            duplicates: 0,
            error: None,
        };
        for (seq, ack) in pending {
            if let Some(ack) = ack {
                match ack.await {
                    Ok(ack) if ack.stream != self.cfg.stream => {
                        acked.error = Some(Error::WrongStream {
                            expected: self.cfg.stream.clone(),
                            got: ack.stream,
                        });
                        return acked;
                    }
                    Ok(ack) => {
                        acked.published += 1;
                        acked.duplicates += u64::from(ack.duplicate);
                    }
                    Err(e) => {
                        acked.error = Some(Error::Publish(e.to_string()));
                        return acked;
                    }
                }
            }
            acked.upto = seq;
        }
        acked.error = error;
        acked
    }

    /// The subject and message of `signal`.
    fn message(&self, signal: &pb::Signal) -> Result<(String, PublishMessage), Error> {
        let (subject, id) = match (&signal.event, &signal.erasure) {
            (Some(ev), _) => (
                format!("{}.{}", self.cfg.subject, kind_token(ev.kind)),
                ev.event_id.clone(),
            ),
            (None, Some(erasure)) => (
                format!("{}.erasure", self.cfg.subject),
                format!("erasure:{}:{}", erasure.erasure_id, signal.cursor),
            ),
            (None, None) => return Err(Error::Encode("an empty signal".into())),
        };
        let payload = serde_json::to_vec(signal).map_err(|e| Error::Encode(e.to_string()))?;
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(id)
            .header("Content-Type", "application/json")
            .header("Chainsight-Node", self.node_id.as_str())
            .header("Chainsight-Cursor", signal.cursor.to_string());
        Ok((subject, message))
    }
}

/// `scheme://host:port` of a NATS url: what logs and the audit trail
/// show, never a user or password it may hold.
fn server_of(url: &str) -> String {
    url.parse::<async_nats::ServerAddr>()
        .map(|a| format!("{}://{}:{}", a.scheme(), a.host(), a.port()))
        .unwrap_or_else(|_| "(invalid url)".into())
}

/// The subject token of an event kind (its label).
fn kind_token(kind: i32) -> &'static str {
    EventKind::from_number(kind).map_or("unspecified", EventKind::label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(toml_text: &str) -> Result<Vec<ExportConfig>, config::Error> {
        #[derive(Deserialize)]
        struct Doc {
            export: Vec<ExportConfig>,
        }
        let path = Path::new("node.toml");
        let mut doc: Doc = toml::from_str(toml_text).map_err(|e| config::Error::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        validate(&mut doc.export, path, Path::new("."))?;
        Ok(doc.export)
    }

    fn key_of(err: config::Error) -> String {
        match err {
            config::Error::Invalid { key, .. } => key,
            other => panic!("not a key error: {other}"),
        }
    }

    const GOOD: &str = r#"
        [[export]]
        name = "warehouse"
        url = "nats://127.0.0.1:4222"
        subject = "chainsight.retailer"
        stream = "CHAINSIGHT"
        token = "s3cret"
        [export.filter]
        gtin_prefixes = ["4740001"]
        kinds = ["purchase", "EVENT_KIND_REVIEW"]
        channels = ["web"]
    "#;

    #[test]
    fn a_valid_entry_gets_defaults_and_a_subscription_filter() {
        let e = entries(GOOD).expect("valid");
        assert_eq!(e[0].batch, DEFAULT_BATCH);
        assert_eq!(e[0].duplicate_window, Duration::from_secs(120));
        let f = e[0].filter.to_filter("filter").expect("filter");
        assert_eq!(f.kinds, [EventKind::Purchase, EventKind::Review]);
        assert_eq!(f.channels, [Channel::Web]);
        assert!(!format!("{e:?}").contains("s3cret"), "token redacted");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"url = "nats://127.0.0.1:4222""#,
                r#"url = "nats://[::1""#,
                "export[0].url",
            ),
            (
                r#"subject = "chainsight.retailer""#,
                r#"subject = "a.*""#,
                "export[0].subject",
            ),
            (
                r#"subject = "chainsight.retailer""#,
                r#"subject = "a..b""#,
                "export[0].subject",
            ),
            (
                r#"stream = "CHAINSIGHT""#,
                r#"stream = "A.B""#,
                "export[0].stream",
            ),
            (
                r#"kinds = ["purchase", "EVENT_KIND_REVIEW"]"#,
                r#"kinds = ["buy"]"#,
                "export[0].filter.kinds",
            ),
            (
                r#"gtin_prefixes = ["4740001"]"#,
                r#"gtin_prefixes = ["47x"]"#,
                "export[0].filter.gtin_prefixes",
            ),
            (
                r#"name = "warehouse""#,
                r#"name = "ware house""#,
                "export[0].name",
            ),
            (
                r#"token = "s3cret""#,
                "token = \"t\"\nbatch = 0",
                "export[0].batch",
            ),
        ];
        for (from, to, key) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from}");
            assert_eq!(key_of(entries(&text).expect_err(to)), key, "{to}");
        }
        let twice = format!("{GOOD}\n{}", GOOD.replace("[export.filter]", "").replace("gtin_prefixes = [\"4740001\"]\n        kinds = [\"purchase\", \"EVENT_KIND_REVIEW\"]\n        channels = [\"web\"]", ""));
        assert_eq!(
            key_of(entries(&twice).expect_err("duplicate name")),
            "export[1].name"
        );
        assert!(
            entries(&GOOD.replace("stream =", "streams =")).is_err(),
            "unknown key"
        );
    }

    #[test]
    fn subjects_follow_the_event_kind() {
        assert_eq!(
            kind_token(EventKind::CartAbandoned.number()),
            "cart_abandoned"
        );
        assert_eq!(kind_token(0), "unspecified");
        assert_eq!(
            server_of("nats://u:secret@example.net"),
            "nats://example.net:4222"
        );
        assert!(is_subject_prefix("a.b-c_d"));
        assert!(!is_subject_prefix("a b") && !is_subject_prefix("") && !is_subject_prefix("a."));
    }
}
