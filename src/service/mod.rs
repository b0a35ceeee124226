//! The gRPC services. Each handler authorises the caller (by certificate
//! identity and role), converts the request into domain types, delegates,
//! and maps the error through the one `From<ApiError> for Status` below.

pub mod admin;
pub mod audit;
pub mod ingest;
pub mod insights;
pub mod peering;
pub mod signals;

use std::sync::Arc;

use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};

use crate::conversions::Invalid;
use crate::policy::{Policy, Role};
use crate::store;
use crate::tls::Peer;

/// Every error a handler can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DataLoss(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::Write {
                disk_full: true, ..
            } => ApiError::ResourceExhausted(
                "the node's disk is full; nothing of this request was stored, retry later".into(),
            ),
            store::Error::Corrupt { .. } => ApiError::DataLoss(e.to_string()),
            store::Error::Closed => ApiError::Unavailable("the node is shutting down".into()),
            store::Error::Open { .. }
            | store::Error::Sled(_)
            | store::Error::Write { .. }
            | store::Error::RollupsStale { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArgument { field, reason } => {
                tonic::Status::invalid_argument(format!("{field}: {reason}"))
            }
            ApiError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            ApiError::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            ApiError::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            ApiError::Unavailable(m) => tonic::Status::unavailable(m),
            ApiError::DataLoss(m) => {
                tracing::error!(error = %m, "data loss");
                tonic::Status::data_loss("stored data failed verification; the operator has been alerted in the node log")
            }
            ApiError::Internal(m) => {
                // Details stay in the log: they may name files or records.
                tracing::error!(error = %m, "internal error");
                tonic::Status::internal("internal error; see the node log")
            }
        }
    }
}

/// The authenticated caller of a request, if it holds `role`.
pub fn authorize<T>(
    req: &tonic::Request<T>,
    policy: &Policy,
    role: Role,
) -> Result<Peer, ApiError> {
    let peer = req
        .extensions()
        .get::<Peer>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthenticated("no client certificate identity".into()))?;
    allowed(policy, &peer, role)?;
    admit(policy, &peer)?;
    Ok(peer)
}

/// Counts one request of `peer` against `[limits] requests_per_second`.
pub fn admit(policy: &Policy, peer: &Peer) -> Result<(), ApiError> {
    if policy.admit(&peer.identity) {
        Ok(())
    } else {
        tracing::warn!(identity = %peer.identity, limit = policy.rate_limit(), "request refused: over the rate limit");
        Err(ApiError::ResourceExhausted(format!(
            "identity {:?} exceeds {} requests per second on this node; slow down and retry",
            peer.identity,
            policy.rate_limit()
        )))
    }
}

/// Whether `peer` still holds `role` and its certificate is not revoked:
/// checked per request, and again per message of a long stream, so a
/// reload that revokes or removes a role reaches established connections.
pub fn allowed(policy: &Policy, peer: &Peer, role: Role) -> Result<(), ApiError> {
    if policy.is_revoked(&peer.serial) {
        tracing::warn!(identity = %peer.identity, "request with a revoked certificate refused");
        return Err(ApiError::Unauthenticated(format!(
            "the certificate of {:?} is revoked (listed in a CRL this node has in force)",
            peer.identity
        )));
    }
    if policy.allows(&peer.identity, role) {
        Ok(())
    } else {
        tracing::warn!(identity = %peer.identity, %role, "permission denied");
        Err(ApiError::PermissionDenied(format!(
            "identity {:?} does not have the {role} role on this node (grant it in node.toml `{}`)",
            peer.identity,
            role.config_key()
        )))
    }
}

/// Appends an audit record off the runtime threads.
pub(crate) async fn audit(
    store: &crate::store::Store,
    kind: crate::audit::Kind,
    identity: &str,
    detail: serde_json::Value,
) -> Result<(), ApiError> {
    let (store, identity) = (store.clone(), identity.to_string());
    tokio::task::spawn_blocking(move || store.audit(kind, &identity, &detail))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)?;
    Ok(())
}

/// A span for one RPC, carrying the caller's certificate identity.
pub(crate) fn rpc_span<T>(req: &tonic::Request<T>, method: &'static str) -> tracing::Span {
    let identity = req
        .extensions()
        .get::<crate::tls::Peer>()
        .map(|p| p.identity.as_str())
        .unwrap_or("?");
    tracing::info_span!("rpc", method, peer = %identity)
}

/// A message already in protobuf wire form (a response the node built
/// without prost: see [`PreEncoded`]).
pub(crate) trait Encoded {
    fn encoded(&self) -> &[u8];
}

impl Encoded for crate::insights::EncodedReport {
    fn encoded(&self) -> &[u8] {
        &self.bytes
    }
}

/// A codec that decodes requests of type `D` as prost does and sends
/// responses of type `E` as the bytes they already are.
pub(crate) struct PreEncoded<E, D>(std::marker::PhantomData<fn(E) -> D>);

impl<E, D> Default for PreEncoded<E, D> {
    fn default() -> Self {
        PreEncoded(std::marker::PhantomData)
    }
}

impl<E, D> tonic::codec::Codec for PreEncoded<E, D>
where
    E: Encoded + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = PreEncodedEncoder<E>;
    type Decoder = tonic_prost::ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder(std::marker::PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// The encoder of [`PreEncoded`]: copies the bytes into the frame.
pub(crate) struct PreEncodedEncoder<E>(std::marker::PhantomData<fn(E)>);

impl<E: Encoded> tonic::codec::Encoder for PreEncodedEncoder<E> {
    type Item = E;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: E,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        let bytes = item.encoded();
        buf.reserve(bytes.len());
        buf.put_slice(bytes);
        Ok(())
    }
}

/// A service served by hand rather than by its generated server (so that
/// it can answer with [`PreEncoded`] bytes): its name and its routing of
/// requests to methods. Served by [`Routed`].
pub trait Routes: Send + Sync + 'static {
    /// The gRPC service name.
    const NAME: &'static str;

    /// Answers `req` (any path of the service; unknown ones with
    /// UNIMPLEMENTED), with messages bounded to `max_message_bytes`.
    fn route<B>(
        self: Arc<Self>,
        max_message_bytes: usize,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static;
}

/// A [`Routes`] service, ready to be added to a tonic server.
pub struct Routed<S> {
    inner: Arc<S>,
    max_message_bytes: usize,
}

impl<S> Routed<S> {
    pub(crate) fn new(service: S, max_message_bytes: usize) -> Routed<S> {
        Routed {
            inner: Arc::new(service),
            max_message_bytes,
        }
    }
}

impl<S> Clone for Routed<S> {
    fn clone(&self) -> Self {
        Routed {
            inner: self.inner.clone(),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

impl<S: Routes> tonic::server::NamedService for Routed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: Routes, B> Service<http::Request<B>> for Routed<S>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        S::route(self.inner.clone(), self.max_message_bytes, req)
    }
}

/// The answer to a method the service does not have.
pub(crate) fn unimplemented(
) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible> {
    Box::pin(async { Ok(tonic::Status::unimplemented("no such method").into_http()) })
}
