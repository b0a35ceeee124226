//! `Signals`: manufacturers subscribe to the stored signals about their
//! products. A subscription reads the store from its cursor up to the
//! durable watermark (events flushed to disk), sends the matching ones, and
//! with `follow` waits for the watermark to move, then reads on. Because a
//! subscriber is always served from the store through a bounded channel, it
//! never sees a gap or a duplicate at the hand-over from backfill to live,
//! a slow subscriber only slows itself, and the node never buffers for it
//! beyond that channel.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{authorize, rpc_span, ApiError, Encoded, PreEncoded};
use crate::conversions;
use crate::domain::EventFilter;
use crate::pb;
use crate::policy::{FilterLimits, Policy, Role};
use crate::store::{Seq, Shared, Store};

/// Signals queued for one subscriber before its reader waits.
const SUBSCRIBER_BUFFER: usize = 256;
/// Events read from the store per step.
const SCAN_CHUNK: usize = 512;
/// Largest `SignalBatch` (`SubscribeBatches`) a subscription sends, in
/// bytes (less where the node's message limit is lower): a couple of
/// hundred signals, enough to make the cost per message small.
const BATCH_BYTES: usize = 64 * 1024;
/// Batches queued for one subscriber before its reader waits (each a copy
/// of its signals: at most 1 MiB per subscriber). Measured with 64
/// following subscribers (`bench fanout`, one run): with 4, readers fell
/// behind the store's recent events and read them back from the log, and
/// delivery fell from about 720,000 to 450,000 signals a second.
const SUBSCRIBER_BATCHES: usize = 16;

/// The Signals service.
#[derive(Clone)]
pub struct SignalsService {
    policy: Policy,
    limits: FilterLimits,
    store: Store,
    shutdown: CancellationToken,
}

impl SignalsService {
    /// Subscriptions end when `shutdown` is cancelled.
    pub fn new(
        policy: Policy,
        limits: FilterLimits,
        store: Store,
        shutdown: CancellationToken,
    ) -> Self {
        SignalsService {
            policy,
            limits,
            store,
            shutdown,
        }
    }

    /// Where a subscription starts: the explicit cursor, else the named
    /// subscription's acknowledged cursor, else the beginning — refused with
    /// OUT_OF_RANGE if retention removed events after it.
    fn start_cursor(&self, identity: &str, after: Seq, name: &str) -> Result<Seq, Status> {
        let start = if after != 0 || name.is_empty() {
            after
        } else {
            self.store
                .named_cursor(identity, name)
                .map_err(ApiError::from)?
                .unwrap_or(0)
        };
        let last = self.store.last_seq().map_err(ApiError::from)?;
        if start > last {
            return Err(ApiError::InvalidArgument {
                field: "after_cursor".into(),
                reason: format!("{start} is beyond the newest cursor {last}"),
            }
            .into());
        }
        let purged = self.store.purged_upto().map_err(ApiError::from)?;
        if start > 0 && start < purged {
            // Every event after `purged` is still stored, so resuming after
            // it never misses anything retention did not remove.
            let oldest = purged;
            let mut status = Status::out_of_range(format!(
                "cursor {start} points before the oldest retained event: retention removed events up to cursor {purged}; \
                 the oldest available cursor is {oldest} (subscribe with after_cursor {oldest}, or 0 for everything retained)"
            ));
            if let Ok(v) = oldest.to_string().parse() {
                status.metadata_mut().insert("x-oldest-cursor", v);
            }
            return Err(status);
        }
        Ok(start)
    }
}

/// Longest durable subscription name.
const NAME_LEN: usize = 64;

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.len() > NAME_LEN || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::InvalidArgument {
            field: "name".into(),
            reason: format!("must be at most {NAME_LEN} printable ASCII characters without spaces"),
        });
    }
    Ok(())
}

/// A `Signal` in protobuf wire form: an event's is encoded once and
/// shared by every subscription that sends it (see
/// [`crate::store::RecentEvent::signal`]).
pub struct EncodedSignal(bytes::Bytes);

impl Encoded for EncodedSignal {
    fn encoded(&self) -> &[u8] {
        &self.0
    }
}

type SignalStream = ReceiverStream<Result<EncodedSignal, Status>>;

impl SignalsService {
    /// The service, ready to be added to a tonic server, with requests and
    /// responses bounded to `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> SignalsServer {
        super::Routed::new(self, max_message_bytes)
    }

    /// `Subscribe`, or with `batch` (the most bytes of a message)
    /// `SubscribeBatches`.
    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
        batch: Option<usize>,
    ) -> Result<Response<SignalStream>, Status> {
        let method = match batch {
            None => "Signals.Subscribe",
            Some(_) => "Signals.SubscribeBatches",
        };
        let span = rpc_span(&req, method);
        let peer = span.in_scope(|| authorize(&req, &self.policy, Role::Subscriber))?;
        let req = req.into_inner();
        check_name(&req.name)?;
        let requested =
            conversions::filter_from_pb(req.filter, "filter").map_err(ApiError::from)?;
        let filter = self
            .limits
            .constrain(&peer.identity, requested.clone())
            .map_err(ApiError::PermissionDenied)?;
        let start =
            span.in_scope(|| self.start_cursor(&peer.identity, req.after_cursor, &req.name))?;
        span.in_scope(|| {
            tracing::info!(after = start, follow = req.follow, name = %req.name, batches = batch.is_some(), "subscription started");
        });
        let (tx, rx) = mpsc::channel(match batch {
            None => SUBSCRIBER_BUFFER,
            Some(_) => SUBSCRIBER_BATCHES,
        });
        let feed = Feed {
            store: self.store.clone(),
            identity: peer.identity.clone(),
            name: req.name.clone(),
            filter,
            cursor: start,
            follow: req.follow,
            batch,
            tx,
            shutdown: self.shutdown.clone(),
            purged_seen: self.store.purged_upto().map_err(ApiError::from)?,
            live: crate::metrics::open_stream(&peer.identity, &req.name, start),
            _following: req.follow.then(|| self.store.follow()),
            access: Access {
                policy: self.policy.clone(),
                limits: self.limits.clone(),
                peer: peer.clone(),
                requested,
            },
        };
        tokio::spawn(feed.run().instrument(span));
        let mut resp = Response::new(ReceiverStream::new(rx));
        // Where the stream starts (useful for named subscriptions that
        // receive nothing: the client can still report where to resume).
        if let Ok(v) = start.to_string().parse() {
            resp.metadata_mut().insert("x-start-cursor", v);
        }
        Ok(resp)
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let span = rpc_span(&req, "Signals.Ack");
        let peer = span.in_scope(|| authorize(&req, &self.policy, Role::Subscriber))?;
        let req = req.into_inner();
        check_name(&req.name)?;
        if req.name.is_empty() {
            return Err(ApiError::InvalidArgument {
                field: "name".into(),
                reason: "required".into(),
            }
            .into());
        }
        let last = self.store.last_seq().map_err(ApiError::from)?;
        if req.cursor > last {
            return Err(ApiError::InvalidArgument {
                field: "cursor".into(),
                reason: format!("{} is beyond the newest cursor {last}", req.cursor),
            }
            .into());
        }
        self.store
            .set_named_cursor(&peer.identity, &req.name, req.cursor)
            .instrument(span)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::AckResponse {}))
    }
}

/// Serves `chainsight.v1.Signals`: the generated server's routing, with
/// `Subscribe` sending signals as the bytes they already are
/// ([`EncodedSignal`]) rather than messages for prost to encode once per
/// subscriber.
pub type SignalsServer = super::Routed<SignalsService>;

impl super::Routes for SignalsService {
    const NAME: &'static str = pb::signals_server::SERVICE_NAME;

    fn route<B>(
        self: Arc<Self>,
        max_message_bytes: usize,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        let max = Some(max_message_bytes);
        match req.uri().path() {
            "/chainsight.v1.Signals/Subscribe" => Box::pin(async move {
                let codec = PreEncoded::<EncodedSignal, pb::SubscribeRequest>::default();
                let mut grpc =
                    tonic::server::Grpc::new(codec).apply_max_message_size_config(max, max);
                Ok(grpc
                    .server_streaming(SubscribeMethod(self, None), req)
                    .await)
            }),
            "/chainsight.v1.Signals/SubscribeBatches" => Box::pin(async move {
                let codec = PreEncoded::<EncodedSignal, pb::SubscribeRequest>::default();
                let mut grpc =
                    tonic::server::Grpc::new(codec).apply_max_message_size_config(max, max);
                let limit = BATCH_BYTES.min(max_message_bytes.saturating_sub(1024).max(1));
                Ok(grpc
                    .server_streaming(SubscribeMethod(self, Some(limit)), req)
                    .await)
            }),
            "/chainsight.v1.Signals/Ack" => Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<pb::AckResponse, pb::AckRequest>::default();
                let mut grpc =
                    tonic::server::Grpc::new(codec).apply_max_message_size_config(max, max);
                Ok(grpc.unary(AckMethod(self), req).await)
            }),
            _ => super::unimplemented(),
        }
    }
}

/// The service, and the bytes of a batch (`None`: one signal per
/// message).
struct SubscribeMethod(Arc<SignalsService>, Option<usize>);

impl tonic::server::ServerStreamingService<pb::SubscribeRequest> for SubscribeMethod {
    type Response = EncodedSignal;
    type ResponseStream = SignalStream;
    type Future = BoxFuture<Response<SignalStream>, Status>;

    fn call(&mut self, request: Request<pb::SubscribeRequest>) -> Self::Future {
        let (inner, batch) = (self.0.clone(), self.1);
        Box::pin(async move { inner.subscribe(request, batch).await })
    }
}

struct AckMethod(Arc<SignalsService>);

impl tonic::server::UnaryService<pb::AckRequest> for AckMethod {
    type Response = pb::AckResponse;
    type Future = BoxFuture<Response<pb::AckResponse>, Status>;

    fn call(&mut self, request: Request<pb::AckRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.ack(request).await })
    }
}

/// One subscription's reader.
struct Feed {
    store: Store,
    identity: String,
    name: String,
    filter: EventFilter,
    cursor: Seq,
    follow: bool,
    /// `SubscribeBatches`: the signals of a step go out as `SignalBatch`
    /// messages of at most this many bytes.
    batch: Option<usize>,
    tx: mpsc::Sender<Result<EncodedSignal, Status>>,
    shutdown: CancellationToken,
    /// Retention's high-water mark when this feed last checked.
    purged_seen: Seq,
    /// This stream in the metrics (its lag), while it is open.
    live: crate::metrics::StreamGuard,
    /// A following subscription: the store keeps new events ready for it
    /// while it lives (see [`Store::follow`]).
    _following: Option<crate::store::Following>,
    /// What the subscription was granted on, checked again as it runs.
    access: Access,
}

/// The grounds of a subscription: re-checked after each reload, so that a
/// reload revoking the certificate, removing the subscriber role or
/// changing the identity's filter limit reaches a running stream.
struct Access {
    policy: Policy,
    limits: FilterLimits,
    peer: crate::tls::Peer,
    /// The filter as the subscriber asked for it (before the limit).
    requested: EventFilter,
}

impl Feed {
    /// A follower that fell behind retention is told, not silently skipped:
    /// if retention removed events after its cursor since it last looked.
    fn check_not_purged(&mut self) -> Result<(), Status> {
        let purged = self.store.purged_upto().map_err(ApiError::from)?;
        let newly_purged = purged > self.purged_seen;
        self.purged_seen = purged;
        if newly_purged && self.cursor < purged {
            return Err(Status::out_of_range(format!(
                "retention removed events after cursor {} (up to cursor {purged}) before they were delivered; \
                 resubscribe with after_cursor {purged}",
                self.cursor
            )));
        }
        Ok(())
    }

    /// The subscription's grounds still hold: the caller keeps the role,
    /// its certificate is not revoked, and its filter limit (which may have
    /// changed) still allows the request; the filter follows the limit.
    fn check_access(&mut self) -> Result<(), Status> {
        let a = &self.access;
        super::allowed(&a.policy, &a.peer, Role::Subscriber)?;
        let filter = a
            .limits
            .constrain(&a.peer.identity, a.requested.clone())
            .map_err(ApiError::PermissionDenied)?;
        if filter != self.filter {
            tracing::info!("the identity's filter limit changed: the subscription follows it");
            self.filter = filter;
        }
        Ok(())
    }

    /// Serves the subscription, then records it in the audit trail.
    async fn run(mut self) {
        let first = self.cursor;
        let mut sent = 0u64;
        let ended = self.serve(&mut sent).await;
        let detail = serde_json::json!({
            "name": self.name,
            "filter": conversions::filter_to_pb(&self.filter),
            "follow": self.follow,
            "batches": self.batch.is_some(),
            "after_cursor": first,
            "served_upto_cursor": self.cursor,
            "signals_sent": sent,
            "ended": ended,
        });
        let store = self.store.clone();
        let identity = std::mem::take(&mut self.identity);
        let recorded = tokio::task::spawn_blocking(move || {
            store.audit(crate::audit::Kind::Subscription, &identity, &detail)
        })
        .await;
        if !matches!(recorded, Ok(Ok(_))) {
            tracing::error!(
                ?recorded,
                "could not record the subscription in the audit trail"
            );
        }
    }

    /// Sends signals until the subscription ends; says how it ended.
    async fn serve(&mut self, sent: &mut u64) -> &'static str {
        // From every commit answered so far: a backfill right after a
        // publish's answer includes its events (the durable mark moves
        // after the commit's sled writes, which follow the answer).
        self.store.applied().await;
        let mut durable = self.store.watch_durable();
        let mut reloads = self.access.policy.watch_reloads();
        // Grounds change only by a reload: checked once here (a reload may
        // have come since the request was authorised) and after each one.
        let mut recheck = true;
        let ended = loop {
            let upto = *durable.borrow_and_update();
            if recheck || reloads.has_changed().unwrap_or(false) {
                reloads.borrow_and_update();
                recheck = false;
                if let Err(status) = self.check_access() {
                    tracing::warn!(%status, "subscription ended: access withdrawn by a reload");
                    let _ = self.tx.send(Err(status)).await;
                    return "access withdrawn";
                }
            }
            if let Err(status) = self.check_not_purged() {
                let _ = self.tx.send(Err(status)).await;
                return "behind retention";
            }
            // The scan is a blocking sled read; a filter that matches little
            // must not hold a runtime thread.
            let (store, cursor) = (self.store.clone(), self.cursor);
            let scanned =
                tokio::task::spawn_blocking(move || store.scan_shared(cursor, upto, SCAN_CHUNK))
                    .await;
            let chunk = match scanned {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => {
                    let _ = self.tx.send(Err(ApiError::from(e).into())).await;
                    return "store error";
                }
                Err(e) => {
                    let _ = self
                        .tx
                        .send(Err(ApiError::Internal(e.to_string()).into()))
                        .await;
                    return "internal error";
                }
            };
            if chunk.is_empty() {
                if !self.follow {
                    break "caught up";
                }
                tokio::select! {
                    changed = durable.changed() => if changed.is_err() { break "store closed" },
                    _ = reloads.changed() => recheck = true,
                    _ = self.tx.closed() => break "subscriber went away",
                    _ = self.shutdown.cancelled() => break "node shutting down",
                }
                continue;
            }
            // The chunk's signals first: an event's is already encoded (the
            // same message `to_signal` makes); an erasure's depends on the
            // filter.
            let signals: Vec<(Seq, Option<bytes::Bytes>)> = chunk
                .into_iter()
                .map(|(seq, shared)| {
                    let signal = match &shared {
                        Shared::Event(e) => self.filter.matches(e.event()).then(|| e.signal()),
                        Shared::Erasure(_) => to_signal(&self.filter, seq, &shared).map(|signal| {
                            use prost::Message;
                            signal.encode_to_vec().into()
                        }),
                    };
                    (seq, signal)
                })
                .collect();
            // `SubscribeBatches`: the signals that go together, as a
            // `SignalBatch` in wire form (each signal a field 1), in a
            // buffer sized for the chunk's up front (at most one message's
            // worth; after a full one is split off, the next gets as much):
            // grown by doubling from empty, its copies were a tenth of the
            // runtime threads' time with 64 subscribers (`bench fanout`,
            // perf).
            let wanted = self.batch.map_or(0, |limit| {
                signals
                    .iter()
                    .filter_map(|(_, signal)| signal.as_ref())
                    .map(|signal| signal.len() + 11)
                    .sum::<usize>()
                    .min(limit)
            });
            let mut batch = bytes::BytesMut::with_capacity(wanted);
            let mut batched = 0u64;
            for (seq, signal) in signals {
                self.cursor = seq;
                self.live.at(seq);
                let Some(signal) = signal else {
                    continue;
                };
                let Some(limit) = self.batch else {
                    if let Err(ended) = self.send(EncodedSignal(signal), *sent).await {
                        return ended;
                    }
                    *sent += 1;
                    continue;
                };
                if !batch.is_empty() && batch.len() + signal.len() + 11 > limit {
                    let full = EncodedSignal(batch.split().freeze());
                    if let Err(ended) = self.send(full, *sent).await {
                        return ended;
                    }
                    *sent += std::mem::take(&mut batched);
                }
                use prost::encoding::{encode_key, encode_varint, WireType};
                encode_key(1, WireType::LengthDelimited, &mut batch);
                encode_varint(signal.len() as u64, &mut batch);
                batch.extend_from_slice(&signal);
                batched += 1;
            }
            if !batch.is_empty() {
                if let Err(ended) = self.send(EncodedSignal(batch.freeze()), *sent).await {
                    return ended;
                }
                *sent += batched;
            }
        };
        tracing::info!(
            cursor = self.cursor,
            sent = *sent,
            ended,
            "subscription ended"
        );
        ended
    }
}

impl Feed {
    /// Sends one message (a signal or a batch); says why the subscription
    /// ended if it did.
    async fn send(&self, message: EncodedSignal, sent: u64) -> Result<(), &'static str> {
        tokio::select! {
            res = self.tx.send(Ok(message)) => if res.is_err() {
                tracing::info!(cursor = self.cursor, sent, "subscriber went away");
                return Err("subscriber went away");
            },
            _ = self.shutdown.cancelled() => return Err("node shutting down"),
        }
        Ok(())
    }
}

/// What a subscription with `filter` is sent for what the store holds at
/// `seq`: the event if it matches, the erased events it matches, or nothing.
/// The one definition of a signal, shared by subscriptions and exports
/// (`crate::export`).
pub fn to_signal(filter: &EventFilter, seq: Seq, shared: &Shared) -> Option<pb::Signal> {
    match shared {
        Shared::Event(ev) if filter.matches(ev.event()) => Some(pb::Signal {
            cursor: seq,
            event: Some(conversions::preference_event_to_pb(ev.event())),
            erasure: None,
        }),
        Shared::Event(_) => None,
        Shared::Erasure(erasure) => {
            let event_ids: Vec<String> = erasure
                .events
                .iter()
                .filter(|ev| filter.matches(ev))
                .map(|ev| ev.event_id.clone())
                .collect();
            if event_ids.is_empty() {
                return None;
            }
            Some(pb::Signal {
                cursor: seq,
                event: None,
                erasure: Some(pb::ErasureSignal {
                    erasure_id: erasure.erasure_id.clone(),
                    event_ids,
                }),
            })
        }
    }
}
