//! The client side of the CLI: connecting to a node with `client.toml`, and
//! `chainsight publish` — a JSON-lines file sent in batches over
//! `Ingest.PublishStream` with a bounded window of unacknowledged batches.

use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::ClientConfig;
use crate::pb;
use crate::tls;
use crate::wire;

/// Client errors, phrased for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the node refused: {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("{0}")]
    Other(String),
    #[error("interrupted after {} accepted and {} duplicate events: {code:?}: {message}; re-running is safe for events with an event_id (they come back DUPLICATE)", summary.accepted, summary.duplicate)]
    Interrupted {
        summary: Box<PublishSummary>,
        code: tonic::Code,
        message: String,
    },
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The name the node's certificate must carry: `server_name`, or the host of `address`.
pub fn server_name(cfg: &ClientConfig) -> String {
    cfg.server_name.clone().unwrap_or_else(|| {
        cfg.address
            .parse::<tonic::codegen::http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_string))
            .unwrap_or_else(|| "localhost".to_string())
    })
}

/// A channel to the node of `cfg`, over mutual TLS.
pub async fn connect(cfg: &ClientConfig) -> Result<tonic::transport::Channel, Error> {
    Ok(tls::connect(&cfg.address, &server_name(cfg), &cfg.tls).await?)
}

/// Options of `chainsight publish`.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Events per PublishRequest.
    pub batch_size: usize,
    /// Batches sent but not yet acknowledged, at most.
    pub window: usize,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            batch_size: 500,
            window: 8,
            progress: true,
        }
    }
}

/// A line that was not stored, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    /// 1-based line number in the file.
    pub line: usize,
    pub event_id: String,
    /// The offending field; empty for malformed JSON.
    pub field: String,
    pub reason: String,
}

/// The outcome of a `publish` run.
#[derive(Debug, Clone, Default)]
pub struct PublishSummary {
    pub accepted: usize,
    pub duplicate: usize,
    /// Events the node rejected.
    pub rejected: Vec<LineProblem>,
    /// Lines that were not valid JSON of a CustomerEvent.
    pub malformed: Vec<LineProblem>,
}

/// A batch is cut at this many encoded bytes whatever its event count, to
/// stay well under the node's message size limit (4 MiB by default).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

struct Batch {
    request: pb::PublishRequest,
    lines: Vec<usize>,
}

/// Publishes every JSON line of `file` to the node.
pub async fn publish_file(
    cfg: &ClientConfig,
    file: &Path,
    opts: &PublishOptions,
) -> Result<PublishSummary, Error> {
    let read_err = |source| Error::Read {
        path: file.display().to_string(),
        source,
    };
    let total_lines = count_lines(file).await.map_err(read_err)?;
    let channel = connect(cfg).await?;
    let mut client =
        pb::ingest_client::IngestClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);

    let bar = progress_bar(total_lines, opts.progress);
    let window = Arc::new(Semaphore::new(opts.window.max(1)));
    let (req_tx, req_rx) = mpsc::channel::<pb::PublishRequest>(opts.window.max(1));
    let (lines_tx, mut lines_rx) = mpsc::unbounded_channel::<Vec<usize>>();
    let reader = tokio::spawn(read_batches(
        file.to_path_buf(),
        opts.batch_size.max(1),
        window.clone(),
        req_tx,
        lines_tx,
    ));

    let mut responses = client
        .publish_stream(ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    let mut summary = PublishSummary::default();
    loop {
        let resp = match responses.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => break,
            Err(status) => {
                bar.abandon();
                window.close();
                return Err(Error::Interrupted {
                    summary: Box::new(summary),
                    code: status.code(),
                    message: status.message().to_string(),
                });
            }
        };
        window.add_permits(1);
        let lines = lines_rx
            .recv()
            .await
            .ok_or_else(|| Error::Other("the node answered a batch that was never sent".into()))?;
        tally(&mut summary, &lines, resp)?;
        bar.inc(lines.len() as u64);
    }
    let malformed = reader
        .await
        .map_err(|e| Error::Other(e.to_string()))?
        .map_err(read_err)?;
    bar.inc(malformed.len() as u64);
    bar.finish_and_clear();
    summary.malformed = malformed;
    Ok(summary)
}

fn tally(
    summary: &mut PublishSummary,
    lines: &[usize],
    resp: pb::PublishResponse,
) -> Result<(), Error> {
    if resp.results.len() != lines.len() {
        return Err(Error::Other(format!(
            "the node answered {} results for a batch of {} events",
            resp.results.len(),
            lines.len()
        )));
    }
    for (line, r) in lines.iter().zip(resp.results) {
        match pb::PublishOutcome::try_from(r.outcome) {
            Ok(pb::PublishOutcome::Accepted) => summary.accepted += 1,
            Ok(pb::PublishOutcome::Duplicate) => summary.duplicate += 1,
            _ => summary.rejected.push(LineProblem {
                line: *line,
                event_id: r.event_id,
                field: r.field,
                reason: r.reason,
            }),
        }
    }
    Ok(())
}

/// Reads the file, parses each line, and sends batches while the window
/// allows. Returns the malformed lines.
async fn read_batches(
    file: std::path::PathBuf,
    batch_size: usize,
    window: Arc<Semaphore>,
    req_tx: mpsc::Sender<pb::PublishRequest>,
    lines_tx: mpsc::UnboundedSender<Vec<usize>>,
) -> std::io::Result<Vec<LineProblem>> {
    let mut lines = tokio::io::BufReader::new(tokio::fs::File::open(&file).await?).lines();
    let mut malformed = Vec::new();
    let mut batch = Batch {
        request: pb::PublishRequest::default(),
        lines: Vec::new(),
    };
    let mut n = 0;
    let mut bytes = 0;
    while let Some(line) = lines.next_line().await? {
        n += 1;
        let Some(parsed) = parse_line(&line) else {
            continue;
        };
        match parsed {
            Ok(ev) => {
                bytes += prost::Message::encoded_len(&ev) + 8;
                batch.request.events.push(ev);
                batch.lines.push(n);
            }
            Err(e) => malformed.push(LineProblem {
                line: n,
                event_id: String::new(),
                field: String::new(),
                reason: e,
            }),
        }
        if batch.lines.len() >= batch_size || bytes >= MAX_BATCH_BYTES {
            bytes = 0;
            let full = std::mem::replace(
                &mut batch,
                Batch {
                    request: pb::PublishRequest::default(),
                    lines: Vec::new(),
                },
            );
            if !send(full, &window, &req_tx, &lines_tx).await {
                return Ok(malformed);
            }
        }
    }
    if !batch.lines.is_empty() {
        send(batch, &window, &req_tx, &lines_tx).await;
    }
    Ok(malformed)
}

/// One line of a JSON-lines file of `CustomerEvent`s in proto3 JSON:
/// `None` for a blank line, otherwise the event or why the line is not one.
pub fn parse_line(line: &str) -> Option<Result<pb::CustomerEvent, String>> {
    if line.trim().is_empty() {
        return None;
    }
    Some(
        serde_json::from_str::<pb::CustomerEvent>(line)
            .map_err(|e| format!("not a CustomerEvent in proto3 JSON: {e}")),
    )
}

async fn send(
    batch: Batch,
    window: &Semaphore,
    req_tx: &mpsc::Sender<pb::PublishRequest>,
    lines_tx: &mpsc::UnboundedSender<Vec<usize>>,
) -> bool {
    let Ok(permit) = window.acquire().await else {
        return false;
    };
    // The permit comes back when the node answers this batch.
    permit.forget();
    lines_tx.send(batch.lines).is_ok() && req_tx.send(batch.request).await.is_ok()
}

async fn count_lines(file: &Path) -> std::io::Result<u64> {
    let mut lines = tokio::io::BufReader::new(tokio::fs::File::open(file).await?).lines();
    let mut n = 0;
    while let Some(line) = lines.next_line().await? {
        if !line.trim().is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

fn progress_bar(len: u64, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} publishing [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// The upstream links of the node of `cfg` (`Peering.Links`, operators role).
pub async fn links(cfg: &ClientConfig) -> Result<Vec<pb::LinkStatus>, Error> {
    let channel = connect(cfg).await?;
    let resp = pb::peering_client::PeeringClient::new(channel)
        .links(pb::LinksRequest {})
        .await?;
    Ok(resp.into_inner().links)
}

/// The link table `chainsight links` prints.
pub fn format_links(links: &[pb::LinkStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if links.is_empty() {
        out.push_str("no upstream links configured\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:>9} {:>12} {:>12}  {:<8} last error",
        "link", "state", "backlog", "oldest (s)", "acked", "stalled"
    );
    for l in links {
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:>9} {:>12.1} {:>12}  {:<8} {}",
            l.id,
            if l.connected { "connected" } else { "down" },
            l.backlog,
            l.oldest_unacked_ms as f64 / 1000.0,
            l.acknowledged,
            if l.stalled { "STALLED" } else { "no" },
            l.last_error
        );
    }
    out
}

/// The audit records of the node of `cfg` that `request` selects
/// (`Audit.List`, auditors role), oldest first.
pub async fn audit_records(
    cfg: &ClientConfig,
    request: pb::AuditListRequest,
) -> Result<Vec<pb::AuditRecord>, Error> {
    let channel = connect(cfg).await?;
    let mut stream = pb::audit_client::AuditClient::new(channel)
        .list(request)
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(record) = stream.message().await? {
        out.push(record);
    }
    Ok(out)
}

/// Fetches the whole audit trail of the node of `cfg` and checks its hash
/// chain here, so the node is not trusted to check itself.
pub async fn verify_audit(
    cfg: &ClientConfig,
) -> Result<Result<crate::audit::Verified, crate::audit::Broken>, Error> {
    let records = audit_records(cfg, pb::AuditListRequest::default()).await?;
    let Ok(verdict) = crate::audit::verify_chain(records.into_iter().map(|r| {
        let seq = r.seq;
        Ok::<_, std::convert::Infallible>(crate::conversions::audit_record_from_pb(r).map_err(
            |e| crate::audit::Broken {
                seq,
                reason: format!("malformed record: {e}"),
            },
        ))
    }));
    Ok(verdict)
}

/// The table `chainsight erasure status` prints.
pub fn format_erasure(status: &pb::ErasureStatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "erasure {}", status.erasure_id);
    let _ = writeln!(out, "{:<20} {:<12} {:>8}  detail", "hop", "state", "erased");
    for h in &status.hops {
        let state = pb::ErasureState::try_from(h.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("ERASURE_STATE_")
                    .to_lowercase()
            })
            .unwrap_or_else(|_| h.state.to_string());
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:>8}  {}",
            h.node, state, h.erased_events, h.detail
        );
    }
    out
}

/// The table `chainsight audit` prints.
pub fn format_audit(records: &[pb::AuditRecord]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if records.is_empty() {
        out.push_str("no audit records match\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:>7}  {:<30}  {:<12}  {:<16}  detail",
        "seq", "at", "kind", "identity"
    );
    for r in records {
        let at =
            r.at.as_ref()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
        let kind = crate::audit::Kind::from_number(r.kind)
            .map_or_else(|| r.kind.to_string(), |k| k.label().to_string());
        let _ = writeln!(
            out,
            "{:>7}  {:<30}  {:<12}  {:<16}  {}",
            r.seq, at, kind, r.identity, r.detail
        );
    }
    out
}

/// Options of `chainsight subscribe`.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    pub filter: pb::Filter,
    pub after: u64,
    pub follow: bool,
    /// A durable subscription name: the node resumes it after the cursor last
    /// acknowledged, and the client acknowledges as it goes.
    pub name: Option<String>,
}

/// A named subscription acknowledges its cursor at most this often.
const ACK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Streams signals from the node to `out` as proto3 JSON lines until the
/// stream ends or `stop` resolves. Returns the last cursor seen (the one to
/// resume after), or `opts.after` if none came.
pub async fn subscribe(
    cfg: &ClientConfig,
    opts: &SubscribeOptions,
    mut out: impl std::io::Write,
    stop: impl std::future::Future<Output = ()>,
) -> Result<u64, Error> {
    let channel = connect(cfg).await?;
    let mut client =
        pb::signals_client::SignalsClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
    let name = opts.name.clone().unwrap_or_default();
    // In batches: the same signals, fewer messages (a backfill of millions
    // of signals is bound by the messages, not by the bytes).
    let stream = client
        .subscribe_batches(pb::SubscribeRequest {
            filter: Some(opts.filter.clone()),
            after_cursor: opts.after,
            follow: opts.follow,
            name: name.clone(),
        })
        .await?;
    // The node says where the stream starts (a named subscription's cursor).
    let start = stream
        .metadata()
        .get("x-start-cursor")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(opts.after);
    let mut stream = stream.into_inner();
    let mut last = start;
    let mut acked = last;
    let mut ack_tick = tokio::time::interval(ACK_EVERY);
    tokio::pin!(stop);
    loop {
        let batch = tokio::select! {
            _ = &mut stop => break,
            _ = ack_tick.tick(), if !name.is_empty() && last != acked => {
                let _ = out.flush();
                client.ack(pb::AckRequest { name: name.clone(), cursor: last }).await?;
                acked = last;
                continue;
            }
            msg = stream.message() => match msg? {
                Some(b) => b,
                None => break,
            },
        };
        for signal in batch.signals {
            last = signal.cursor;
            let line = serde_json::to_string(&signal).map_err(|e| Error::Other(e.to_string()))?;
            writeln!(out, "{line}").map_err(|e| Error::Other(format!("writing output: {e}")))?;
        }
    }
    let _ = out.flush();
    if !name.is_empty() && last != acked {
        client.ack(pb::AckRequest { name, cursor: last }).await?;
    }
    Ok(last)
}

/// Runs an insight query (`Insights.Query`, analysts role).
pub async fn query(cfg: &ClientConfig, q: pb::InsightQuery) -> Result<pb::InsightReport, Error> {
    let mut client = InsightsClient::new(connect(cfg).await?);
    Ok(client.query(q).await?.into_inner())
}

/// Largest insight report a client accepts.
const MAX_REPORT_BYTES: usize = 256 * 1024 * 1024;

/// An `Insights` client that reads reports with [`wire::decode_report`]
/// (prost's result, about three times faster for a feed of 10,000 rows;
/// see `benches/insights_query.rs`) from one contiguous buffer.
#[derive(Debug, Clone)]
pub struct InsightsClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl InsightsClient {
    pub fn new(channel: tonic::transport::Channel) -> Self {
        InsightsClient {
            grpc: tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_REPORT_BYTES),
        }
    }

    /// `Insights.Query`.
    pub async fn query(
        &mut self,
        q: pb::InsightQuery,
    ) -> Result<tonic::Response<pb::InsightReport>, tonic::Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/chainsight.v1.Insights/Query");
        self.grpc
            .unary(tonic::Request::new(q), path, ReportCodec)
            .await
    }
}

/// Encodes the query as tonic-prost does; reads the report with
/// [`wire::decode_report`].
#[derive(Debug, Clone, Copy)]
struct ReportCodec;

impl tonic::codec::Codec for ReportCodec {
    type Encode = pb::InsightQuery;
    type Decode = pb::InsightReport;
    type Encoder = tonic_prost::ProstEncoder<pb::InsightQuery>;
    type Decoder = ReportDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ReportDecoder
    }
}

/// See [`ReportCodec`].
#[derive(Debug)]
struct ReportDecoder;

impl tonic::codec::Decoder for ReportDecoder {
    type Item = pb::InsightReport;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::InsightReport>, tonic::Status> {
        use bytes::Buf;
        let bytes = buf.copy_to_bytes(buf.remaining());
        wire::decode_report(&bytes)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("malformed response: {e}")))
    }
}

/// The aligned table `chainsight query` prints, with the suppressed groups
/// noted under it.
pub fn format_report(headers: &[String], r: &pb::InsightReport) -> String {
    use std::fmt::Write;
    let fmt_opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut head: Vec<String> = headers.to_vec();
    head.extend(
        [
            "events",
            "customers",
            "avg score",
            "NPS",
            "return rate",
            "share",
        ]
        .map(String::from),
    );
    table.push(head);
    for row in &r.rows {
        let mut cells = row.key.clone();
        cells.extend([
            row.events.to_string(),
            row.customers.to_string(),
            fmt_opt(row.avg_score, 2),
            fmt_opt(row.nps, 1),
            row.return_rate
                .map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0)),
            format!("{:.1}%", row.share * 100.0),
        ]);
        table.push(cells);
    }
    let cols = table[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            table
                .iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c < headers.len() {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(
        out,
        "{} groups; {} suppressed (fewer than {} distinct customers)",
        r.rows.len(),
        r.suppressed_groups,
        r.k_min
    );
    out
}
