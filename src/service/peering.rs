//! `Peering`: node to node, upstream. `Forward` receives batches from a
//! downstream node, stores what is new (queueing it for this node's own
//! upstream links in the same write) and acknowledges each batch after the
//! flush. `Links` reports the state of this node's upstream links.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{authorize, rpc_span, ApiError};
use crate::conversions;
use crate::pb;
use crate::policy::{Policy, Role};
use crate::propagate::Links;
use crate::store::{Appended, NewEvent, Store};

/// Batches of one Forward stream processed concurrently (acks stay in order).
const FORWARD_PIPELINE: usize = 4;
/// Most event ids in one erasure passed on by a downstream node.
const MAX_ERASED_IDS: usize = 100_000;
/// Origin certificates looked at per batch (one per origin is needed).
const MAX_BATCH_CERTIFICATES: usize = 64;

/// The Peering service.
#[derive(Clone)]
pub struct PeeringService {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    policy: Policy,
    store: Store,
    links: Arc<Links>,
    shutdown: CancellationToken,
    trust: Trust,
    erasure: crate::erasure::Context,
}

/// How forwarded events' origin proofs are treated.
#[derive(Clone)]
pub struct Trust {
    /// Checks certificates and proofs against the chain CA.
    pub verifier: Arc<crate::origin::Verifier>,
    /// Refuse events whose proof does not verify (or that have none).
    pub require: bool,
}

impl PeeringService {
    /// The service of node `node_id`. When `shutdown` is cancelled, open
    /// Forward streams stop taking batches, answer those in flight, and end
    /// (the sender reconnects later), so they do not hold up the shutdown.
    pub fn new(
        node_id: String,
        policy: Policy,
        store: Store,
        links: Arc<Links>,
        shutdown: CancellationToken,
        trust: Trust,
        erasure: crate::erasure::Context,
    ) -> Self {
        PeeringService {
            inner: Arc::new(Inner {
                node_id,
                policy,
                store,
                links,
                shutdown,
                trust,
                erasure,
            }),
        }
    }
}

impl Inner {
    /// Stores one batch from downstream node `sender` and answers its ack.
    async fn receive(
        &self,
        sender: &str,
        batch: pb::ForwardBatch,
    ) -> Result<pb::ForwardAck, ApiError> {
        let mut dropped = 0u32;
        let mut new = Vec::with_capacity(batch.events.len());
        for ev in batch.events {
            let id = ev.event_id.clone();
            match self.admit(sender, ev) {
                Ok(ev) => {
                    let outboxes = self.links.route(&ev);
                    new.push(NewEvent {
                        event: ev,
                        outboxes,
                        forwarded: true,
                    });
                }
                Err(reason) => {
                    dropped += 1;
                    tracing::warn!(event = %id, %reason, "dropped a forwarded event");
                }
            }
        }
        let (new, refused) = self.check_origins(batch.certificates, new).await?;
        let outcomes = self.store.append_durable(new).await?;
        let stored = outcomes
            .iter()
            .filter(|o| matches!(o, Appended::Stored(_)))
            .count() as u32;
        let ack = pb::ForwardAck {
            batch_id: batch.batch_id,
            stored,
            duplicates: outcomes.len() as u32 - stored,
            dropped,
            refused,
        };
        let m = crate::metrics::get();
        for (label, n) in [
            ("stored", stored),
            ("duplicate", ack.duplicates),
            ("dropped", dropped),
            ("refused", refused),
        ] {
            crate::metrics::Metrics::count(&m.forwarded_in, label, u64::from(n));
        }
        tracing::debug!(
            batch_id = ack.batch_id,
            stored,
            duplicates = ack.duplicates,
            dropped,
            refused,
            "batch stored"
        );
        Ok(ack)
    }

    /// Keeps the batch's origin certificates that chain to the CA and, when
    /// signatures are required, takes out the events whose proof does not
    /// verify; how many it took out.
    async fn check_origins(
        &self,
        certificates: Vec<Vec<u8>>,
        events: Vec<NewEvent>,
    ) -> Result<(Vec<NewEvent>, u32), ApiError> {
        if certificates.is_empty() && !self.trust.require {
            return Ok((events, 0));
        }
        let trust = self.trust.clone();
        let store = self.store.clone();
        let checked = tokio::task::spawn_blocking(move || {
            // A certificate is checked at the signing time of an event that
            // needs it: one that expired since still proves older events.
            let signed_at: std::collections::HashMap<_, _> = events
                .iter()
                .filter_map(|e| e.event.proof.as_ref())
                .map(|p| (p.certificate, p.signed_at))
                .collect();
            let mut batch_certs = std::collections::HashMap::new();
            for der in certificates.into_iter().take(MAX_BATCH_CERTIFICATES) {
                let fp = crate::origin::fingerprint(&der);
                // Senders repeat their certificates in every batch: one
                // kept here was checked when it was kept.
                if store.certificate(&fp)?.is_some() {
                    batch_certs.insert(fp, der);
                    continue;
                }
                let checked = match signed_at.get(&fp) {
                    Some(at) => trust.verifier.check_certificate_at(&der, *at),
                    None => trust.verifier.check_certificate(&der),
                };
                match checked {
                    Ok(_) => {
                        store.put_certificate(&der)?;
                        batch_certs.insert(fp, der);
                    }
                    Err(e) => tracing::warn!(error = %e, "ignored a forwarded origin certificate"),
                }
            }
            if !trust.require {
                return Ok((events, 0));
            }
            let mut kept = Vec::with_capacity(events.len());
            let mut refused = 0u32;
            for e in events {
                let verdict = trust.verifier.verify(&e.event, |fp| {
                    batch_certs
                        .get(fp)
                        .cloned()
                        .or_else(|| store.certificate(fp).ok().flatten())
                });
                match verdict {
                    Ok(_) => kept.push(e),
                    Err(failure) => {
                        refused += 1;
                        tracing::warn!(
                            event = %e.event.event_id,
                            origin = %e.event.origin,
                            reason = %failure,
                            "refused a forwarded event: its origin proof does not verify"
                        );
                    }
                }
            }
            Ok::<_, crate::store::Error>((kept, refused))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        Ok(checked)
    }

    /// Validates a forwarded event; the reason it may not be stored otherwise.
    fn admit(
        &self,
        sender: &str,
        ev: pb::PreferenceEvent,
    ) -> Result<crate::domain::PreferenceEvent, String> {
        let mut ev = conversions::preference_event_from_pb(ev).map_err(|e| e.to_string())?;
        // Do not trust the sender's scrubbing: free text is scrubbed again.
        use crate::conversions::limits::{ATTRIBUTE_VALUE_LEN, FREE_TEXT_LEN};
        ev.text = crate::anonymise::scrub_bounded(&ev.text, FREE_TEXT_LEN);
        for v in ev.attributes.values_mut() {
            *v = crate::anonymise::scrub_bounded(v, ATTRIBUTE_VALUE_LEN);
        }
        if ev.path.iter().any(|p| p == &self.node_id) {
            return Err(format!(
                "loop: path {:?} already contains this node",
                ev.path
            ));
        }
        if ev.path.len() > self.links.max_hops() {
            return Err(format!(
                "path has {} hops, more than max_hops {}",
                ev.path.len(),
                self.links.max_hops()
            ));
        }
        if ev.path.first() != Some(&ev.origin) {
            return Err("path does not start at the origin".into());
        }
        if ev.path.last().map(String::as_str) != Some(sender) {
            return Err(format!(
                "path {:?} does not end at the sender {sender:?}",
                ev.path
            ));
        }
        Ok(ev)
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::ForwardAck, Status>> + Send>>;

#[tonic::async_trait]
impl pb::peering_server::Peering for PeeringService {
    async fn forward(
        &self,
        req: Request<Streaming<pb::ForwardBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let span = rpc_span(&req, "Peering.Forward");
        let peer = span.in_scope(|| authorize(&req, &self.inner.policy, Role::Downstream))?;
        span.in_scope(|| tracing::info!("downstream connected"));
        let inner = self.inner.clone();
        let peer = Arc::new(peer);
        let out = req
            .into_inner()
            .take_until(self.inner.shutdown.clone().cancelled_owned())
            .map(move |item| {
                let inner = inner.clone();
                let peer = peer.clone();
                async move {
                    match item {
                        // Each batch: the role may have been removed, or
                        // the certificate revoked, by a reload since.
                        Ok(batch) => match super::allowed(&inner.policy, &peer, Role::Downstream)
                            .and_then(|()| super::admit(&inner.policy, &peer))
                        {
                            Ok(()) => inner
                                .receive(&peer.identity, batch)
                                .await
                                .map_err(Status::from),
                            Err(e) => Err(Status::from(e)),
                        },
                        Err(status) => Err(status),
                    }
                }
                .instrument(span.clone())
            })
            .buffered(FORWARD_PIPELINE);
        Ok(Response::new(Box::pin(out)))
    }

    async fn erase(
        &self,
        req: Request<pb::ErasureForward>,
    ) -> Result<Response<pb::ErasureAck>, Status> {
        let span = rpc_span(&req, "Peering.Erase");
        async {
            let peer = authorize(&req, &self.inner.policy, Role::Downstream)?;
            let req = req.into_inner();
            crate::erasure::check_id(&req.erasure_id).map_err(ApiError::from)?;
            let bad = |field: &str, reason: String| {
                Status::from(ApiError::InvalidArgument {
                    field: field.into(),
                    reason,
                })
            };
            if req.customer_pseudonym.len() > 128 {
                return Err(bad("customer_pseudonym", "longer than 128 bytes".into()));
            }
            let max_ids = MAX_ERASED_IDS;
            if req.event_ids.len() > max_ids {
                return Err(bad("event_ids", format!("more than {max_ids}")));
            }
            if let Some(id) = req
                .event_ids
                .iter()
                .find(|id| id.is_empty() || id.len() > conversions::limits::EVENT_ID_LEN)
            {
                return Err(bad("event_ids", format!("{id:?} is not an event id")));
            }
            let inner = &self.inner;
            let request = crate::store::EraseRequest {
                id: req.erasure_id.clone(),
                requested_by: peer.identity.clone(),
                pseudonym: req.customer_pseudonym,
                event_ids: req.event_ids,
                spare_origin: Some(inner.node_id.clone()),
            };
            let erased = inner.erasure.apply(&inner.store, request).await?;
            Ok(Response::new(pb::ErasureAck {
                erased_events: erased.total,
            }))
        }
        .instrument(span)
        .await
    }

    async fn erasure_status(
        &self,
        req: Request<pb::ErasureStatusRequest>,
    ) -> Result<Response<pb::ErasureStatusResponse>, Status> {
        let span = rpc_span(&req, "Peering.ErasureStatus");
        async {
            authorize(&req, &self.inner.policy, Role::Downstream)?;
            let req = req.into_inner();
            let status = self
                .inner
                .erasure
                .answer_status(&self.inner.store, &req.erasure_id, req.depth)
                .await?;
            Ok(Response::new(status))
        }
        .instrument(span)
        .await
    }

    async fn links(
        &self,
        req: Request<pb::LinksRequest>,
    ) -> Result<Response<pb::LinksResponse>, Status> {
        let span = rpc_span(&req, "Peering.Links");
        // Backlogs that count every commit answered so far.
        self.inner.store.applied().instrument(span.clone()).await;
        let _guard = span.enter();
        authorize(&req, &self.inner.policy, Role::Operator)?;
        let links = self
            .inner
            .links
            .status(&self.inner.store)
            .into_iter()
            .map(|s| pb::LinkStatus {
                id: s.id,
                address: s.address,
                connected: s.connected,
                backlog: s.backlog,
                oldest_unacked_ms: s.oldest_unacked.map_or(0, |d| d.as_millis() as u64),
                acknowledged: s.acknowledged,
                last_error: s.last_error,
                stalled: s.stalled,
                last_progress: s.last_progress.map(|t| {
                    let (seconds, nanos) = t.split();
                    pbjson_types::Timestamp { seconds, nanos }
                }),
            })
            .collect();
        Ok(Response::new(pb::LinksResponse { links }))
    }
}
