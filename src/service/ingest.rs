//! `Ingest`: a company's own publishers send customer events to their node.
//! Each event is validated, anonymised in memory, and stored; the answer
//! comes only after the accepted events are flushed to disk.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{authorize, rpc_span, ApiError};
use crate::anonymise::Anonymiser;
use crate::conversions::{self, Invalid};
use crate::domain::UnixNanos;
use crate::pb;
use crate::policy::{Policy, Role};
use crate::propagate::Links;
use crate::store::{Appended, NewEvent, Store};

/// How many batches of one PublishStream are processed concurrently (their
/// answers still go out in order). Lets one stream fill a group commit.
const STREAM_PIPELINE: usize = 8;

/// The Ingest service.
#[derive(Clone)]
pub struct IngestService {
    inner: Arc<Inner>,
}

struct Inner {
    policy: Policy,
    anonymiser: Anonymiser,
    store: Store,
    links: Arc<Links>,
    max_events: usize,
    signer: Option<Arc<crate::origin::Signer>>,
    erasure: crate::erasure::Context,
}

impl IngestService {
    /// The service of a node with these grants, key, store and upstream
    /// links; events are signed with `signer` if given.
    pub fn new(
        policy: Policy,
        anonymiser: Anonymiser,
        store: Store,
        links: Arc<Links>,
        max_events: usize,
        signer: Option<Arc<crate::origin::Signer>>,
        erasure: crate::erasure::Context,
    ) -> Self {
        IngestService {
            inner: Arc::new(Inner {
                policy,
                anonymiser,
                store,
                links,
                max_events,
                signer,
                erasure,
            }),
        }
    }
}

/// Requests of at most this many accepted events are signed on the
/// runtime thread: a few signatures (about 30 µs each) cost less than the
/// hop to a blocking thread and back, which one event in flight waits for.
const SIGN_INLINE_EVENTS: usize = 4;

impl Inner {
    /// Validates, anonymises and stores a batch; one result per event, in order.
    async fn publish(
        &self,
        events: Vec<pb::CustomerEvent>,
    ) -> Result<pb::PublishResponse, ApiError> {
        if events.len() > self.max_events {
            return Err(ApiError::InvalidArgument {
                field: "events".into(),
                reason: format!(
                    "{} events exceed the limit of {} per request; split the batch",
                    events.len(),
                    self.max_events
                ),
            });
        }
        let now = UnixNanos::now();
        let mut results = Vec::with_capacity(events.len());
        let mut accepted = Vec::new();
        let mut accepted_at = Vec::new();
        for (i, ev) in events.into_iter().enumerate() {
            let given_id = ev.event_id.clone();
            match conversions::customer_event_from_pb(ev, now) {
                Ok(ce) => {
                    // The id as stored (the given one, nearly always).
                    let id = if ce.event_id == given_id {
                        given_id
                    } else {
                        ce.event_id.clone()
                    };
                    results.push(result(id, pb::PublishOutcome::Accepted));
                    let event = self.anonymiser.anonymise(ce);
                    let outboxes = self.links.route(&event);
                    accepted.push(NewEvent {
                        event,
                        outboxes,
                        forwarded: false,
                    });
                    accepted_at.push(i);
                }
                Err(Invalid { field, reason }) => {
                    let given_id = given_id
                        .chars()
                        .take(conversions::limits::EVENT_ID_LEN)
                        .collect();
                    let mut r = result(given_id, pb::PublishOutcome::Rejected);
                    r.field = field;
                    r.reason = reason;
                    results.push(r);
                }
            }
        }
        let accepted = match &self.signer {
            Some(signer) if !accepted.is_empty() && accepted.len() <= SIGN_INLINE_EVENTS => {
                let mut accepted = accepted;
                sign_all(signer, &mut accepted)
                    .map_err(|e| ApiError::Internal(format!("signing events: {e}")))?;
                accepted
            }
            Some(signer) if !accepted.is_empty() => {
                // One signature over the batch, but a digest per field of
                // every event: CPU work, off the runtime threads.
                let signer = signer.clone();
                tokio::task::spawn_blocking(move || {
                    let mut accepted = accepted;
                    sign_all(&signer, &mut accepted).map(|()| accepted)
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::Internal(format!("signing events: {e}")))?
            }
            _ => accepted,
        };
        let outcomes = self.store.append_durable(accepted).await?;
        for (i, outcome) in accepted_at.into_iter().zip(outcomes) {
            if let Appended::Duplicate(_) = outcome {
                results[i].outcome = pb::PublishOutcome::Duplicate as i32;
            }
        }
        log_outcomes(&results);
        Ok(pb::PublishResponse { results })
    }
}

/// Signs the accepted events of one request with one batch signature.
fn sign_all(signer: &crate::origin::Signer, accepted: &mut [NewEvent]) -> Result<(), String> {
    let mut events: Vec<&mut crate::domain::PreferenceEvent> =
        accepted.iter_mut().map(|new| &mut new.event).collect();
    signer.sign_batch(&mut events)
}

fn result(event_id: String, outcome: pb::PublishOutcome) -> pb::PublishResult {
    pb::PublishResult {
        event_id,
        outcome: outcome as i32,
        field: String::new(),
        reason: String::new(),
    }
}

fn log_outcomes(results: &[pb::PublishResult]) {
    let count = |o: pb::PublishOutcome| results.iter().filter(|r| r.outcome == o as i32).count();
    let m = crate::metrics::get();
    for (outcome, label) in [
        (pb::PublishOutcome::Accepted, "accepted"),
        (pb::PublishOutcome::Duplicate, "duplicate"),
        (pb::PublishOutcome::Rejected, "rejected"),
    ] {
        crate::metrics::Metrics::count(&m.published, label, count(outcome) as u64);
    }
    tracing::info!(
        accepted = count(pb::PublishOutcome::Accepted),
        duplicate = count(pb::PublishOutcome::Duplicate),
        rejected = count(pb::PublishOutcome::Rejected),
        "published"
    );
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let span = rpc_span(&req, "Ingest.Publish");
        async {
            authorize(&req, &self.inner.policy, Role::Publisher)?;
            let resp = self.inner.publish(req.into_inner().events).await?;
            Ok(Response::new(resp))
        }
        .instrument(span)
        .await
    }

    async fn publish_stream(
        &self,
        req: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let span = rpc_span(&req, "Ingest.PublishStream");
        let peer =
            Arc::new(span.in_scope(|| authorize(&req, &self.inner.policy, Role::Publisher))?);
        let inner = self.inner.clone();
        let out = req
            .into_inner()
            .map(move |item| {
                let inner = inner.clone();
                let peer = peer.clone();
                async move {
                    match item {
                        // Each batch: a reload may have revoked the
                        // certificate or removed the role since.
                        Ok(batch) => match super::allowed(&inner.policy, &peer, Role::Publisher)
                            .and_then(|()| super::admit(&inner.policy, &peer))
                        {
                            Ok(()) => inner.publish(batch.events).await.map_err(Status::from),
                            Err(e) => Err(Status::from(e)),
                        },
                        Err(status) => Err(status),
                    }
                }
                .instrument(span.clone())
            })
            .buffered(STREAM_PIPELINE);
        Ok(Response::new(Box::pin(out)))
    }

    async fn erase(
        &self,
        req: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::EraseResponse>, Status> {
        let span = rpc_span(&req, "Ingest.Erase");
        async {
            let peer = authorize(&req, &self.inner.policy, Role::Publisher)?;
            let customer_id = req.into_inner().customer_id;
            let len = conversions::limits::CUSTOMER_ID_LEN;
            if customer_id.trim().is_empty() || customer_id.len() > len {
                return Err(ApiError::InvalidArgument {
                    field: "customer_id".into(),
                    reason: format!("required, at most {len} bytes"),
                }
                .into());
            }
            let inner = &self.inner;
            let id = uuid::Uuid::now_v7().to_string();
            let request = crate::store::EraseRequest {
                id: id.clone(),
                requested_by: peer.identity.clone(),
                pseudonym: inner.anonymiser.pseudonym(customer_id.trim()),
                event_ids: Vec::new(),
                spare_origin: None,
            };
            let erased = inner.erasure.apply(&inner.store, request).await?;
            Ok(Response::new(pb::EraseResponse {
                erasure_id: id,
                erased_events: erased.events,
                links: erased.links,
            }))
        }
        .instrument(span)
        .await
    }

    async fn erasure_status(
        &self,
        req: Request<pb::ErasureStatusRequest>,
    ) -> Result<Response<pb::ErasureStatusResponse>, Status> {
        let span = rpc_span(&req, "Ingest.ErasureStatus");
        async {
            authorize(&req, &self.inner.policy, Role::Publisher)?;
            let id = req.into_inner().erasure_id;
            let depth = self.inner.links.max_hops() as u32;
            let status = self
                .inner
                .erasure
                .answer_status(&self.inner.store, &id, depth)
                .await?;
            Ok(Response::new(status))
        }
        .instrument(span)
        .await
    }
}
