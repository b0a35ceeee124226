//! Upstream propagation: which events go to which upstream link, and one
//! worker per link that streams them over `Peering.Forward`.
//!
//! An event is routed when it is stored (published here or received from
//! downstream): the store queues it in the outbox of every link whose
//! agreement covers it, in the same durable write. The link's worker reads
//! its outbox in order, shapes each event as the agreement allows (dropped
//! fields, pseudonym per link, this node appended to the path), sends
//! batches bounded in count and bytes with a bounded window of
//! unacknowledged batches, and deletes entries only once the upstream node
//! has acknowledged them — which it does after its own flush. On any error
//! the worker reconnects with exponential backoff and full jitter and
//! resends everything still in the outbox; the receiver deduplicates.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::anonymise::Anonymiser;
use crate::config::{NodeConfig, Propagation, TlsFiles};
use crate::domain::{PreferenceEvent, UnixNanos};
use crate::pb;
use crate::policy::LinkAgreement;
use crate::store::{self, Seq, Store};
use crate::tls;

/// One upstream link.
pub struct Link {
    /// The upstream node's certificate identity.
    pub id: String,
    pub address: String,
    /// Replaced by a live reload; read per event.
    agreement: std::sync::RwLock<Arc<LinkAgreement>>,
    /// Every agreement this link has had (persisted; the one in force
    /// last), as tables and parsed: an erasure goes wherever any of them
    /// may have sent the erased events.
    history: std::sync::RwLock<Vec<(crate::config::Share, Arc<LinkAgreement>)>>,
    key: [u8; 32],
    state: LinkState,
}

#[derive(Default)]
struct LinkState {
    connected: AtomicBool,
    acknowledged: AtomicU64,
    stalled: AtomicBool,
    last_error: Mutex<String>,
    last_progress: Mutex<Option<(Instant, UnixNanos)>>,
}

impl Link {
    /// The agreement in force.
    pub fn agreement(&self) -> Arc<LinkAgreement> {
        self.agreement
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every agreement this link has had, the one in force last.
    fn history(&self) -> Vec<Arc<LinkAgreement>> {
        self.history
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Adds `agreement` (from `share`) to the history, in memory and in
    /// `store`, unless it is the last one already.
    fn remember(
        &self,
        share: crate::config::Share,
        agreement: Arc<LinkAgreement>,
        store: &Store,
    ) -> Result<(), String> {
        let mut h = self
            .history
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.last().is_some_and(|(_, a)| **a == *agreement) {
            return Ok(());
        }
        h.push((share, agreement));
        let shares: Vec<&crate::config::Share> = h.iter().map(|(s, _)| s).collect();
        let json = serde_json::to_vec(&shares).map_err(|e| e.to_string())?;
        store
            .set_agreement_history(&self.id, &json)
            .map_err(|e| e.to_string())
    }
}

/// A link's state, as `Peering.Links` reports it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub id: String,
    pub address: String,
    pub connected: bool,
    pub backlog: u64,
    pub oldest_unacked: Option<Duration>,
    pub acknowledged: u64,
    pub last_error: String,
    pub stalled: bool,
    pub last_progress: Option<UnixNanos>,
}

/// This node's upstream links and the routing rules over them.
pub struct Links {
    node_id: String,
    max_hops: usize,
    links: Vec<Link>,
}

impl Links {
    /// The links of `[[upstream]]`; per-link pseudonym keys derive from the node key.
    pub fn new(config: &NodeConfig, anonymiser: &Anonymiser) -> Self {
        Links {
            node_id: config.id.clone(),
            max_hops: config.propagation.max_hops,
            links: config
                .upstream
                .iter()
                .map(|u| Link {
                    id: u.id.clone(),
                    address: u.address.clone(),
                    agreement: std::sync::RwLock::new(Arc::new(LinkAgreement::from_share(
                        &u.share,
                    ))),
                    history: std::sync::RwLock::new(vec![(
                        u.share.clone(),
                        Arc::new(LinkAgreement::from_share(&u.share)),
                    )]),
                    key: anonymiser.link_key(&u.id),
                    state: LinkState::default(),
                })
                .collect(),
        }
    }

    /// Puts the agreements of `upstreams` in force from now on (live
    /// reload), for every link whose id and address are unchanged: events
    /// stored from then on are routed by them, and queued events are shaped
    /// by them when sent (those no longer covered are withheld). Returns
    /// the ids of the links whose agreement changed, and the link changes
    /// only a restart applies (added, removed or readdressed links).
    pub fn replace_agreements(
        &self,
        upstreams: &[crate::config::Upstream],
        store: &Store,
    ) -> (Vec<String>, Vec<String>) {
        let (mut changed, mut restart) = (Vec::new(), Vec::new());
        for l in &self.links {
            let Some(u) = upstreams.iter().find(|u| u.id == l.id) else {
                restart.push(format!("upstream {}: removed", l.id));
                continue;
            };
            if u.address != l.address {
                restart.push(format!(
                    "upstream {}: address {} (in force {})",
                    l.id, u.address, l.address
                ));
                continue;
            }
            let new = LinkAgreement::from_share(&u.share);
            let mut a = l
                .agreement
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if **a != new {
                let new = Arc::new(new);
                *a = new.clone();
                drop(a);
                changed.push(l.id.clone());
                if let Err(e) = l.remember(u.share.clone(), new, store) {
                    tracing::error!(link = %l.id, error = %e, "could not record the link's new agreement; erasures route by the agreements this process has seen");
                }
            }
        }
        for u in upstreams {
            if !self.links.iter().any(|l| l.id == u.id) {
                restart.push(format!("upstream {}: new link", u.id));
            }
        }
        (changed, restart)
    }

    /// Link `idx`'s agreement in force now.
    pub fn agreement(&self, idx: usize) -> Arc<LinkAgreement> {
        self.links[idx].agreement()
    }

    /// The link ids, in outbox order.
    pub fn ids(&self) -> Vec<String> {
        self.links.iter().map(|l| l.id.clone()).collect()
    }

    /// The customer pseudonym `pseudonym` as link `idx` carries it (empty
    /// when the link does not carry pseudonyms).
    pub fn link_pseudonym(&self, idx: usize, pseudonym: &str) -> String {
        let link = &self.links[idx];
        link.agreement().pseudonym_for(pseudonym, &link.key)
    }

    /// The link addresses, in outbox order.
    pub fn addresses(&self) -> Vec<String> {
        self.links.iter().map(|l| l.address.clone()).collect()
    }

    /// The most entries an event's path may have.
    pub fn max_hops(&self) -> usize {
        self.max_hops
    }

    /// Loads each link's agreement history from `store` and adds the
    /// agreement in force if it differs from the last recorded (a config
    /// changed across a restart). Call once at start, off the runtime.
    pub fn load_history(&self, store: &Store) -> Result<(), store::Error> {
        for l in &self.links {
            let recorded: Vec<crate::config::Share> = match store.agreement_history(&l.id)? {
                None => Vec::new(),
                Some(json) => serde_json::from_slice(&json).unwrap_or_else(|e| {
                    tracing::error!(link = %l.id, error = %e, "the recorded agreement history does not parse; starting it again");
                    Vec::new()
                }),
            };
            let current = l
                .history
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[0]
                .clone();
            *l.history
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = recorded
                .into_iter()
                .map(|s| {
                    let a = Arc::new(LinkAgreement::from_share(&s));
                    (s, a)
                })
                .collect();
            let (share, agreement) = current;
            if let Err(e) = l.remember(share, agreement, store) {
                tracing::error!(link = %l.id, error = %e, "could not record the link's agreement");
            }
        }
        Ok(())
    }

    /// Where an erasure of `ev` goes: every link that any of its
    /// agreements (past or present) would have sent `ev` on, with the
    /// customer's pseudonym as that link received it.
    pub fn erasure_routes(&self, ev: &PreferenceEvent) -> Vec<(String, String)> {
        if !self.within_hops(ev) {
            return Vec::new();
        }
        self.links
            .iter()
            .filter(|l| !ev.path.contains(&l.id))
            .filter_map(|l| {
                let matching: Vec<_> = l.history().into_iter().filter(|a| a.matches(ev)).collect();
                if matching.is_empty() {
                    return None;
                }
                // The newest pseudonym the link was given, if any was.
                let pseudonym = matching
                    .iter()
                    .rev()
                    .map(|a| a.pseudonym_for(&ev.customer_pseudonym, &l.key))
                    .find(|p| !p.is_empty())
                    .unwrap_or_default();
                Some((l.id.clone(), pseudonym))
            })
            .collect()
    }

    /// The links that were ever given customer pseudonyms, each with
    /// `pseudonym` as it knows it (for erasing a customer's events that
    /// came through them).
    pub fn customer_routes(&self, pseudonym: &str) -> Vec<(String, String)> {
        self.links
            .iter()
            .filter_map(|l| {
                l.history()
                    .iter()
                    .rev()
                    .map(|a| a.pseudonym_for(pseudonym, &l.key))
                    .find(|p| !p.is_empty())
                    .map(|p| (l.id.clone(), p))
            })
            .collect()
    }

    /// Whether `ev` may still be sent on: its path, with this node added,
    /// stays within the hop limit.
    fn within_hops(&self, ev: &PreferenceEvent) -> bool {
        let hops_after_send = ev.path.len() + usize::from(ev.path.last() != Some(&self.node_id));
        hops_after_send <= self.max_hops
    }

    /// The links `ev` must be forwarded on: those whose agreement covers it,
    /// that it has not passed already, and within the hop limit.
    pub fn route(&self, ev: &PreferenceEvent) -> Vec<usize> {
        if !self.within_hops(ev) {
            return Vec::new();
        }
        self.links
            .iter()
            .enumerate()
            .filter(|(_, l)| !ev.path.contains(&l.id) && l.agreement().matches(ev))
            .map(|(i, _)| i)
            .collect()
    }

    /// `ev` as it is sent on link `idx`: shaped by the agreement, with this
    /// node at the end of its path.
    pub fn outgoing(&self, idx: usize, ev: PreferenceEvent) -> PreferenceEvent {
        self.outgoing_under(idx, &self.links[idx].agreement(), ev)
    }

    /// As [`Self::outgoing`], under `agreement` (one read of the agreement
    /// for a whole batch, so a reload cannot fall between choosing the
    /// events and shaping them).
    pub fn outgoing_under(
        &self,
        idx: usize,
        agreement: &LinkAgreement,
        ev: PreferenceEvent,
    ) -> PreferenceEvent {
        let link = &self.links[idx];
        // Withheld fields keep the rest verifiable: the proof is expanded.
        let before = (ev.proof.is_some() && !agreement.drop_fields.is_empty()).then(|| ev.clone());
        let mut ev = agreement.apply(ev, &link.key);
        if let Some(before) = before {
            crate::origin::withhold(&before, &mut ev);
        }
        if ev.path.last() != Some(&self.node_id) {
            ev.path.push(self.node_id.clone());
        }
        ev
    }

    /// The state of every link.
    pub fn status(&self, store: &Store) -> Vec<LinkStatus> {
        let now = UnixNanos::now();
        self.links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let oldest = store.outbox_oldest(i).ok().flatten();
                LinkStatus {
                    id: l.id.clone(),
                    address: l.address.clone(),
                    connected: l.state.connected.load(Ordering::SeqCst),
                    backlog: store.outbox_len(i),
                    oldest_unacked: oldest
                        .map(|t| Duration::from_nanos(now.0.saturating_sub(t.0).max(0) as u64)),
                    acknowledged: l.state.acknowledged.load(Ordering::SeqCst),
                    last_error: lock(&l.state.last_error).clone(),
                    stalled: l.state.stalled.load(Ordering::SeqCst),
                    last_progress: lock(&l.state.last_progress).map(|(_, t)| t),
                }
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts one worker per link; they stop when `token` is cancelled.
pub fn spawn_workers(
    links: Arc<Links>,
    store: Store,
    tls: TlsFiles,
    settings: Propagation,
    token: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..links.links.len())
        .map(|idx| {
            let worker = Worker {
                idx,
                links: links.clone(),
                store: store.clone(),
                tls: tls.clone(),
                settings: settings.clone(),
                token: token.clone(),
            };
            let span = tracing::info_span!("propagate", link = %links.links[idx].id);
            tokio::spawn(worker.run().instrument(span))
        })
        .collect()
}

/// Why a session with the upstream ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] tls::Error),
    #[error("{0}")]
    Rpc(String),
    #[error("local store: {0}")]
    Store(#[from] store::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        SessionError::Rpc(format!("{:?}: {}", s.code(), s.message()))
    }
}

struct Worker {
    idx: usize,
    links: Arc<Links>,
    store: Store,
    tls: TlsFiles,
    settings: Propagation,
    token: CancellationToken,
}

impl Worker {
    fn link(&self) -> &Link {
        &self.links.links[self.idx]
    }

    async fn run(self) {
        let min = Duration::from_millis(self.settings.backoff_min_ms);
        let max = Duration::from_millis(self.settings.backoff_max_ms);
        let mut failures = 0u32;
        tracing::info!(address = %self.link().address, backlog = self.store.outbox_len(self.idx), "link worker started");
        while !self.token.is_cancelled() {
            let mut progressed = false;
            let result = self.watched_session(&mut progressed).await;
            let state = &self.link().state;
            state.connected.store(false, Ordering::SeqCst);
            let Err(e) = result else { break };
            failures = if progressed {
                1
            } else {
                failures.saturating_add(1)
            };
            let msg = e.to_string();
            tracing::warn!(error = %msg, attempt = failures, "link down; will retry");
            *lock(&state.last_error) = msg;
            let delay = backoff(min, max, failures);
            tokio::select! {
                _ = self.token.cancelled() => break,
                _ = self.monitor_while(delay) => {}
            }
        }
        tracing::info!("link worker stopped");
    }

    /// A session, ended early by shutdown, with the stall check running even
    /// while connecting (an upstream that accepts TCP but never completes the
    /// handshake must not be a silent stall).
    async fn watched_session(&self, progressed: &mut bool) -> Result<(), SessionError> {
        let session = self.session(progressed);
        tokio::pin!(session);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                res = &mut session => return res,
                _ = self.token.cancelled() => return Ok(()),
                _ = tick.tick() => self.check_stall(),
            }
        }
    }

    /// Sleeps `delay` while still watching for a stall.
    async fn monitor_while(&self, delay: Duration) {
        let deadline = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < deadline {
            self.check_stall();
            tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            )
            .await;
        }
    }

    /// One connection: send the outbox, collect acknowledgements, until an
    /// error or shutdown (`Ok`).
    async fn session(&self, progressed: &mut bool) -> Result<(), SessionError> {
        let link = self.link();
        let channel = tls::client_endpoint(&link.address, &link.id, &self.tls)?
            .http2_keep_alive_interval(Duration::from_secs(self.settings.keepalive_interval_secs))
            .keep_alive_timeout(Duration::from_secs(self.settings.keepalive_timeout_secs))
            .connect()
            .await
            .map_err(|e| {
                SessionError::Rpc(format!(
                    "cannot connect to {}: {}",
                    link.address,
                    tls::error_chain(&e)
                ))
            })?;
        let window = self.settings.window.max(1);
        let (tx, rx) = tokio::sync::mpsc::channel::<EncodedBatch>(window);
        // `Peering.Forward` as the generated client calls it, with batches
        // sent as the bytes they were written as (see `EncodedBatch`).
        let mut client = tonic::client::Grpc::new(channel)
            .max_encoding_message_size(self.settings.batch_max_bytes * 2 + 64 * 1024);
        client
            .ready()
            .await
            .map_err(|e| SessionError::Rpc(format!("cannot reach {}: {e}", link.address)))?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new("chainsight.v1.Peering", "Forward"));
        let mut acks = client
            .streaming(
                request,
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/chainsight.v1.Peering/Forward",
                ),
                crate::service::PreEncoded::<EncodedBatch, pb::ForwardAck>::default(),
            )
            .await?
            .into_inner();
        link.state.connected.store(true, Ordering::SeqCst);
        lock(&link.state.last_error).clear();
        tracing::info!("connected");

        let mut inflight: VecDeque<(u64, Vec<Seq>)> = VecDeque::new();
        let mut cursor: Seq = 0;
        let mut next_batch = 1u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            while inflight.len() < window {
                // sled calls can wait on the store's write lock: keep them
                // off the runtime threads that serve gRPC.
                let (store, idx, max_events, max_bytes) = (
                    self.store.clone(),
                    self.idx,
                    self.settings.batch_max_events,
                    self.settings.batch_max_bytes,
                );
                let agreement = self.links.agreement(idx);
                let links = self.links.clone();
                let batch_id = next_batch;
                let queued = tokio::task::spawn_blocking(move || {
                    let mut queued = store.outbox_batch(idx, cursor, max_events, max_bytes)?;
                    let last = queued.last().map(|q| q.seq);
                    // An agreement reloaded since these were queued may no
                    // longer cover some: they are withheld, not sent.
                    let (kept, withheld): (Vec<_>, Vec<_>) = std::mem::take(&mut queued)
                        .into_iter()
                        .partition(|q| agreement.matches(&q.event));
                    let queued = kept;
                    if !withheld.is_empty() {
                        let seqs: Vec<Seq> = withheld.iter().map(|q| q.seq).collect();
                        store.outbox_ack(idx, &seqs)?;
                    }
                    let withheld = withheld.len();
                    // The certificates the batch's origin proofs need.
                    let mut fingerprints: Vec<_> = queued
                        .iter()
                        .filter_map(|q| q.event.proof.as_ref().map(|p| p.certificate))
                        .collect();
                    fingerprints.sort_unstable();
                    fingerprints.dedup();
                    let certificates = fingerprints
                        .iter()
                        .filter_map(|fp| store.certificate(fp).transpose())
                        .collect::<Result<Vec<_>, _>>()?;
                    // Shaped for the link and written in wire form here,
                    // off the runtime's threads too.
                    let seqs: Vec<Seq> = queued.iter().map(|q| q.seq).collect();
                    let events: Vec<PreferenceEvent> = queued
                        .into_iter()
                        .map(|q| links.outgoing_under(idx, &agreement, q.event))
                        .collect();
                    let batch = EncodedBatch(store::record::forward_batch(
                        batch_id,
                        &events,
                        &certificates,
                    ));
                    Ok::<_, store::Error>((seqs, batch, last, withheld))
                })
                .await
                .map_err(|e| SessionError::Protocol(e.to_string()))??;
                let (seqs, batch, last, withheld) = queued;
                if withheld > 0 {
                    tracing::info!(
                        events = withheld,
                        "withheld queued events the reloaded agreement no longer covers"
                    );
                }
                let Some(last) = last else { break };
                cursor = last;
                if seqs.is_empty() {
                    continue;
                }
                next_batch += 1;
                tx.send(batch)
                    .await
                    .map_err(|_| SessionError::Protocol("request stream closed".into()))?;
                tracing::debug!(batch_id, events = seqs.len(), "batch sent");
                inflight.push_back((batch_id, seqs));
            }
            tokio::select! {
                _ = self.token.cancelled() => return Ok(()),
                ack = acks.message() => {
                    let ack = ack?.ok_or_else(|| SessionError::Protocol("upstream closed the stream".into()))?;
                    self.on_ack(ack, &mut inflight).await?;
                    *progressed = true;
                }
                _ = self.store.outbox_added(self.idx), if inflight.len() < window => {}
                _ = tick.tick() => self.check_stall(),
            }
        }
    }

    async fn on_ack(
        &self,
        ack: pb::ForwardAck,
        inflight: &mut VecDeque<(u64, Vec<Seq>)>,
    ) -> Result<(), SessionError> {
        let (batch_id, seqs) = inflight.pop_front().ok_or_else(|| {
            SessionError::Protocol(format!("acknowledgement {} for no batch", ack.batch_id))
        })?;
        if ack.batch_id != batch_id {
            return Err(SessionError::Protocol(format!(
                "acknowledgement {} while expecting {batch_id}",
                ack.batch_id
            )));
        }
        let (store, idx, n) = (self.store.clone(), self.idx, seqs.len());
        let link = self.link();
        let detail = serde_json::json!({
            "link": link.id,
            "address": link.address,
            "batch_id": batch_id,
            "events": n,
            "stored": ack.stored,
            "duplicates": ack.duplicates,
            "dropped": ack.dropped,
            "refused": ack.refused,
            "first_seq": seqs.first(),
            "last_seq": seqs.last(),
            "agreement": link.agreement().describe(),
        });
        let upstream = link.id.clone();
        tokio::task::spawn_blocking(move || {
            store.outbox_ack(idx, &seqs)?;
            store.audit(crate::audit::Kind::Forward, &upstream, &detail)
        })
        .await
        .map_err(|e| SessionError::Protocol(e.to_string()))??;
        let state = &self.link().state;
        state.acknowledged.fetch_add(n as u64, Ordering::SeqCst);
        *lock(&state.last_progress) = Some((Instant::now(), UnixNanos::now()));
        lock(&state.last_error).clear();
        if state.stalled.swap(false, Ordering::SeqCst) {
            tracing::info!("link made progress again");
        }
        tracing::debug!(
            batch_id,
            stored = ack.stored,
            duplicates = ack.duplicates,
            dropped = ack.dropped,
            refused = ack.refused,
            "batch acknowledged"
        );
        if ack.refused > 0 {
            tracing::warn!(
                batch_id,
                refused = ack.refused,
                "upstream refused events whose origin proof did not verify (see its log)"
            );
        }
        Ok(())
    }

    /// Marks the link stalled (and warns, once) when its backlog has not
    /// moved for `stall_after_secs`. An empty outbox counts as progress.
    fn check_stall(&self) {
        let state = &self.link().state;
        let mut progress = lock(&state.last_progress);
        if self.store.outbox_len(self.idx) == 0 {
            *progress = Some((Instant::now(), UnixNanos::now()));
            state.stalled.store(false, Ordering::SeqCst);
            return;
        }
        let since = progress
            .get_or_insert_with(|| (Instant::now(), UnixNanos::now()))
            .0;
        let stall_after = Duration::from_secs(self.settings.stall_after_secs);
        if since.elapsed() >= stall_after && !state.stalled.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                backlog = self.store.outbox_len(self.idx),
                no_progress_for = ?since.elapsed(),
                last_error = %lock(&state.last_error),
                "link stalled: events are waiting and none was acknowledged"
            );
        }
    }
}

/// A `pb::ForwardBatch` in wire form (see `store::record::forward_batch`).
struct EncodedBatch(Vec<u8>);

impl crate::service::Encoded for EncodedBatch {
    fn encoded(&self) -> &[u8] {
        &self.0
    }
}

/// Exponential backoff with full jitter: a random delay in
/// [min, min(max, min * 2^(attempt-1))].
fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = min
        .saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1).min(20))
                .unwrap_or(u32::MAX),
        )
        .min(max);
    let span = cap.saturating_sub(min).as_millis() as u64;
    min + Duration::from_millis(if span == 0 {
        0
    } else {
        rand::random_range(0..=span)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        assert_eq!(backoff(min, max, 1), min);
        for attempt in 1..40 {
            let d = backoff(min, max, attempt);
            assert!(d >= min && d <= max, "{attempt}: {d:?}");
        }
        let cap_at_5 = Duration::from_millis(1600);
        assert!((0..100).all(|_| backoff(min, max, 5) <= cap_at_5));
    }
}
