//! `Insights`: partners and analysts query aggregated insight. The query is
//! validated and narrowed to the caller's filter limit, then answered from
//! the rollups (never from events) with small groups suppressed.
//!
//! The report leaves as the bytes [`insights::run_encoded`] wrote, so this
//! service is served by [`InsightsServer`] (the generated server's routing,
//! with a codec that sends those bytes) rather than by the generated one,
//! whose handler must build a `pb::InsightReport` for prost to encode.

use std::sync::Arc;

use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::{Request, Response, Status};

use super::{authorize, rpc_span, ApiError};
use crate::conversions;
use crate::insights::{self, EncodedReport};
use crate::pb;
use crate::policy::{FilterLimits, Policy, Role};
use crate::store::Store;

/// The Insights service.
#[derive(Clone)]
pub struct InsightsService {
    policy: Policy,
    limits: FilterLimits,
    store: Store,
    k_min: u32,
}

impl InsightsService {
    /// Groups with fewer than `k_min` distinct customers are suppressed.
    pub fn new(policy: Policy, limits: FilterLimits, store: Store, k_min: u32) -> Self {
        InsightsService {
            policy,
            limits,
            store,
            k_min,
        }
    }

    /// `Insights.Query`.
    pub async fn query(
        &self,
        req: Request<pb::InsightQuery>,
    ) -> Result<Response<EncodedReport>, Status> {
        let span = rpc_span(&req, "Insights.Query");
        let peer = span.in_scope(|| authorize(&req, &self.policy, Role::Analyst))?;
        let asked = req.into_inner();
        let mut query =
            conversions::insight_query_from_pb(asked.clone()).map_err(ApiError::from)?;
        query.filter = self
            .limits
            .constrain(&peer.identity, query.filter)
            .map_err(ApiError::PermissionDenied)?;
        let store = self.store.clone();
        let k_min = self.k_min;
        let started = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || {
            let report = insights::run_encoded(&store, &query, k_min)?;
            let detail = serde_json::json!({
                "query": asked,
                "filter_applied": conversions::filter_to_pb(&query.filter),
                "groups_returned": report.rows,
                "groups_suppressed": report.suppressed_groups,
                "k_min": k_min,
            });
            store.audit(crate::audit::Kind::Query, &peer.identity, &detail)?;
            Ok::<_, crate::store::Error>(report)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)?;
        span.in_scope(|| {
            tracing::info!(
                rows = report.rows,
                suppressed = report.suppressed_groups,
                bytes = report.bytes.len(),
                elapsed = ?started.elapsed(),
                "query answered"
            );
        });
        Ok(Response::new(report))
    }

    /// The service, ready to be added to a tonic server, accepting queries
    /// of at most `max_decoding_message_size` bytes.
    pub fn into_server(self, max_decoding_message_size: usize) -> InsightsServer {
        InsightsServer {
            inner: Arc::new(self),
            max_decoding_message_size,
        }
    }
}

/// Serves `chainsight.v1.Insights` (see the module documentation).
#[derive(Clone)]
pub struct InsightsServer {
    inner: Arc<InsightsService>,
    max_decoding_message_size: usize,
}

impl tonic::server::NamedService for InsightsServer {
    const NAME: &'static str = pb::insights_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for InsightsServer
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
        if req.uri().path() != "/chainsight.v1.Insights/Query" {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let method = QueryMethod(self.inner.clone());
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ReportCodec)
                .apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(method, req).await)
        })
    }
}

struct QueryMethod(Arc<InsightsService>);

impl tonic::server::UnaryService<pb::InsightQuery> for QueryMethod {
    type Response = EncodedReport;
    type Future = BoxFuture<Response<EncodedReport>, Status>;

    fn call(&mut self, request: Request<pb::InsightQuery>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.query(request).await })
    }
}

/// Decodes an `InsightQuery` as prost does; sends an already encoded report.
#[derive(Debug, Clone, Copy, Default)]
struct ReportCodec;

impl tonic::codec::Codec for ReportCodec {
    type Encode = EncodedReport;
    type Decode = pb::InsightQuery;
    type Encoder = ReportEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::InsightQuery>;

    fn encoder(&mut self) -> Self::Encoder {
        ReportEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

#[derive(Debug, Clone, Copy)]
struct ReportEncoder;

impl tonic::codec::Encoder for ReportEncoder {
    type Item = EncodedReport;
    type Error = Status;

    fn encode(
        &mut self,
        item: EncodedReport,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        buf.reserve(item.bytes.len());
        buf.put_slice(&item.bytes);
        Ok(())
    }
}
