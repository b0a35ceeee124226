//! Erasure across the chain: passing a recorded erasure on along each
//! upstream link until that hop confirms it (retried with backoff, across
//! restarts: the record is durable), and collecting which hops confirmed.
//! The local part (deleting events, correcting rollups) is the store's
//! (`store::Store::erase`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::TlsFiles;
use crate::domain::{PreferenceEvent, UnixNanos};
use crate::pb;
use crate::propagate::Links;
use crate::store::{Route, Router, Store};
use crate::tls;

/// What the services need to take and pass on erasures.
#[derive(Clone)]
pub struct Context {
    pub node_id: String,
    pub links: Arc<Links>,
    /// This node's TLS files, to reach upstream hops.
    pub tls: TlsFiles,
}

impl Context {
    /// Applies an erasure here (see [`Store::erase`]), passing it on along
    /// this node's links, and records it in the audit trail: what both
    /// `Ingest.Erase` and `Peering.Erase` do once the request is checked.
    pub async fn apply(
        &self,
        store: &Store,
        request: crate::store::EraseRequest,
    ) -> Result<crate::store::Erased, crate::service::ApiError> {
        let (id, by) = (request.id.clone(), request.requested_by.clone());
        let erased = store.erase(request, router(self.links.clone())).await?;
        let detail = serde_json::json!({
            "erasure_id": id,
            "erased_events": erased.events,
            "links": erased.links,
        });
        crate::service::audit(store, crate::audit::Kind::Erasure, &by, detail).await?;
        tracing::info!(erasure = %id, requested_by = %by, erased = erased.events, links = ?erased.links, "erasure applied");
        Ok(erased)
    }

    /// The answer to an erasure status request (either service's): the
    /// status here and up to `depth` hops upstream, or NOT_FOUND.
    pub async fn answer_status(
        &self,
        store: &Store,
        id: &str,
        depth: u32,
    ) -> Result<pb::ErasureStatusResponse, tonic::Status> {
        check_id(id).map_err(crate::service::ApiError::from)?;
        let depth = depth.min(self.links.max_hops() as u32);
        self.status(store, id, depth)
            .await
            .map_err(crate::service::ApiError::from)?
            .ok_or_else(|| tonic::Status::not_found(format!("no erasure {id:?} at this node")))
    }

    /// Status of erasure `id` here and up to `depth` hops upstream.
    pub async fn status(
        &self,
        store: &Store,
        id: &str,
        depth: u32,
    ) -> Result<Option<pb::ErasureStatusResponse>, crate::store::Error> {
        let addresses: Vec<(String, String)> = self
            .links
            .ids()
            .into_iter()
            .zip(self.links.addresses())
            .collect();
        status(&self.node_id, store, &addresses, &self.tls, id, depth).await
    }
}

/// Longest erasure id accepted from a downstream node.
pub const ID_LEN: usize = 64;

/// Checks an erasure id from the wire.
pub fn check_id(id: &str) -> Result<(), crate::conversions::Invalid> {
    if id.is_empty() || id.len() > ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(crate::conversions::Invalid {
            field: "erasure_id".into(),
            reason: format!("must be 1-{ID_LEN} printable ASCII characters"),
        });
    }
    Ok(())
}

/// How long a hop has to answer a status question.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// Pending erasures are retried at least this often.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Where an erasure goes on: the links any agreement they have had would
/// have sent an erased event on, and every link that was given
/// pseudonyms, each with the customer's pseudonym in the form that link
/// knows (see [`Links::erasure_routes`]).
pub fn router(links: Arc<Links>) -> Router {
    let per_customer = links.clone();
    Router {
        event: Box::new(move |ev: &PreferenceEvent| -> Vec<Route> { links.erasure_routes(ev) }),
        customer: Box::new(move |pseudonym: &str| -> Vec<Route> {
            per_customer.customer_routes(pseudonym)
        }),
    }
}

/// Starts one erasure sender per upstream link; they stop with `token`.
pub fn spawn_senders(
    links: Arc<Links>,
    store: Store,
    tls: TlsFiles,
    token: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    links
        .ids()
        .into_iter()
        .zip(links.addresses())
        .map(|(link, address)| {
            let span = tracing::info_span!("erasure", link = %link);
            let sender = Sender {
                link,
                address,
                store: store.clone(),
                tls: tls.clone(),
                token: token.clone(),
            };
            tokio::spawn(sender.run().instrument(span))
        })
        .collect()
}

struct Sender {
    link: String,
    address: String,
    store: Store,
    tls: TlsFiles,
    token: CancellationToken,
}

impl Sender {
    async fn run(self) {
        let added = self.store.erasures_added();
        let mut failures = 0u32;
        while !self.token.is_cancelled() {
            // Registered before looking, so an erasure recorded meanwhile
            // still wakes this loop.
            let notified = added.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = match self.send_pending().await {
                Ok(()) => {
                    failures = 0;
                    RETRY_EVERY
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, attempt = failures, "erasure not passed on yet; will retry");
                    RETRY_EVERY.min(Duration::from_millis(200) * failures)
                }
            };
            tokio::select! {
                _ = self.token.cancelled() => break,
                _ = &mut notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sends every erasure this link has not confirmed.
    async fn send_pending(&self) -> Result<(), String> {
        let (store, link) = (self.store.clone(), self.link.clone());
        let pending = tokio::task::spawn_blocking(move || store.erasures_pending(&link))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if pending.is_empty() {
            return Ok(());
        }
        let channel = tls::client_endpoint(&self.address, &self.link, &self.tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to {}: {}",
                    self.address,
                    tls::error_chain(&e)
                )
            })?;
        let mut client = pb::peering_client::PeeringClient::new(channel);
        // One erasure the upstream refuses does not hold up the others.
        let mut first_error = None;
        for (id, entry) in pending {
            let sent_ids = entry.event_ids.len();
            let answer = client
                .erase(pb::ErasureForward {
                    erasure_id: id.clone(),
                    customer_pseudonym: entry.pseudonym,
                    event_ids: entry.event_ids,
                })
                .await;
            let result = match &answer {
                Ok(ack) => Ok(ack.get_ref().erased_events),
                Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
            };
            self.store
                .erasure_answered(&id, &self.link, sent_ids, result.clone())
                .await
                .map_err(|e| e.to_string())?;
            match result {
                Ok(n) => {
                    tracing::info!(erasure = %id, erased = n, "upstream confirmed the erasure")
                }
                Err(e) => {
                    tracing::warn!(erasure = %id, error = %e, "upstream did not take the erasure");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The status of erasure `id` at this node and, up to `depth` hops
/// further, upstream of it. `None` when this node has no such erasure.
pub async fn status(
    node_id: &str,
    store: &Store,
    addresses: &[(String, String)],
    tls: &TlsFiles,
    id: &str,
    depth: u32,
) -> Result<Option<pb::ErasureStatusResponse>, crate::store::Error> {
    let Some(record) = store.erasure(id)? else {
        return Ok(None);
    };
    let ts = |n: i64| {
        let (seconds, nanos) = UnixNanos(n).split();
        Some(pbjson_types::Timestamp { seconds, nanos })
    };
    let mut hops = vec![pb::HopErasure {
        node: node_id.to_string(),
        state: pb::ErasureState::Confirmed as i32,
        erased_events: record.erased_events,
        confirmed_at: ts(record.requested_at),
        detail: String::new(),
    }];
    for l in &record.links {
        if l.confirmed_at == 0 {
            hops.push(pb::HopErasure {
                node: l.link.clone(),
                state: pb::ErasureState::Pending as i32,
                erased_events: 0,
                confirmed_at: None,
                detail: l.last_error.clone(),
            });
            continue;
        }
        let confirmed = pb::HopErasure {
            node: l.link.clone(),
            state: pb::ErasureState::Confirmed as i32,
            erased_events: l.erased_upstream,
            confirmed_at: ts(l.confirmed_at),
            detail: String::new(),
        };
        if depth == 0 {
            hops.push(confirmed);
            continue;
        }
        let address = addresses
            .iter()
            .find(|(link, _)| *link == l.link)
            .map(|(_, a)| a.clone());
        let asked = match address {
            None => Err("no longer an upstream link of this node".to_string()),
            Some(address) => ask(&address, &l.link, tls, id, depth - 1).await,
        };
        match asked {
            Ok(upstream) => hops.extend(upstream.hops),
            Err(e) => hops.push(pb::HopErasure {
                state: pb::ErasureState::Unreachable as i32,
                detail: e,
                ..confirmed
            }),
        }
    }
    Ok(Some(pb::ErasureStatusResponse {
        erasure_id: id.to_string(),
        hops,
    }))
}

async fn ask(
    address: &str,
    link: &str,
    tls: &TlsFiles,
    id: &str,
    depth: u32,
) -> Result<pb::ErasureStatusResponse, String> {
    let call = async {
        let channel = tls::client_endpoint(address, link, tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {address}: {}", tls::error_chain(&e)))?;
        pb::peering_client::PeeringClient::new(channel)
            .erasure_status(pb::ErasureStatusRequest {
                erasure_id: id.to_string(),
                depth,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(STATUS_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer within {STATUS_TIMEOUT:?}"))?
}
