//! `Insights`: partners and analysts query aggregated insight. The query is
//! validated and narrowed to the caller's filter limit, then answered from
//! the rollups (never from events) with small groups suppressed.
//!
//! The report leaves as the bytes [`insights::run_encoded`] wrote, so this
//! service is served by [`InsightsServer`] (the generated server's routing,
//! with a codec that sends those bytes) rather than by the generated one,
//! whose handler must build a `pb::InsightReport` for prost to encode.

use std::sync::Arc;

use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::{Request, Response, Status};

use super::{authorize, rpc_span, ApiError};
use crate::config::DpBudget;
use crate::conversions;
use crate::dp::Mechanism;
use crate::insights::{self, EncodedReport};
use crate::pb;
use crate::policy::{FilterLimits, Policy, Role};
use crate::store::Store;

/// The largest report a query may answer with (encode limit): the whole
/// feed of a year by category × region × week is about 1 MB.
pub const MAX_REPORT_BYTES: usize = 64 * 1024 * 1024;

/// The Insights service.
#[derive(Clone)]
pub struct InsightsService {
    policy: Policy,
    limits: FilterLimits,
    store: Store,
    k_min: u32,
    budgets: Arc<std::collections::HashMap<String, DpBudget>>,
}

impl InsightsService {
    /// Groups with fewer than `k_min` distinct customers are suppressed;
    /// analysts with a budget get differentially private answers.
    pub fn new(
        policy: Policy,
        limits: FilterLimits,
        store: Store,
        k_min: u32,
        budgets: &[DpBudget],
    ) -> Self {
        InsightsService {
            policy,
            limits,
            store,
            k_min,
            budgets: Arc::new(
                budgets
                    .iter()
                    .map(|b| (b.identity.clone(), b.clone()))
                    .collect(),
            ),
        }
    }

    /// Spends the query's ε of `identity`'s budget, if it has one: the
    /// mechanism to answer with, or RESOURCE_EXHAUSTED saying when the
    /// budget renews.
    async fn spend(&self, identity: &str) -> Result<Option<(Mechanism, f64)>, Status> {
        let Some(b) = self.budgets.get(identity) else {
            return Ok(None);
        };
        let period = i64::try_from(b.period.as_nanos())
            .unwrap_or(i64::MAX)
            .max(1);
        let now = crate::domain::UnixNanos::now().0;
        let start = now.div_euclid(period) * period;
        let spent = self
            .store
            .spend_privacy_budget(identity, start, b.epsilon_per_query, b.epsilon_per_period)
            .await
            .map_err(ApiError::from)?;
        match spent {
            Ok(left) => Ok(Some((
                Mechanism {
                    epsilon: b.epsilon_per_query,
                    max_events_per_customer: b.max_events_per_customer,
                    delta: b.delta,
                },
                left,
            ))),
            Err(spent) => {
                let renews = time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(start) + i128::from(period),
                )
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
                tracing::warn!(identity, spent, "privacy budget spent; query refused");
                Err(Status::resource_exhausted(format!(
                    "the privacy budget of {identity:?} for this period is spent                      (ε {spent:.3} of {:.3} used, {:.3} per query); it renews at {renews}",
                    b.epsilon_per_period, b.epsilon_per_query
                )))
            }
        }
    }

    /// `Insights.Query`.
    pub async fn query(
        &self,
        req: Request<pb::InsightQuery>,
    ) -> Result<Response<EncodedReport>, Status> {
        let started = std::time::Instant::now();
        let answer = self.answer(req).await;
        let m = crate::metrics::get();
        match &answer {
            Ok(report) => {
                m.query_seconds.observe(started.elapsed().as_secs_f64());
                m.suppressed_groups
                    .inc_by(u64::from(report.get_ref().suppressed_groups));
                crate::metrics::Metrics::count(&m.queries, "ok", 1);
            }
            Err(_) => crate::metrics::Metrics::count(&m.queries, "error", 1),
        }
        answer
    }

    async fn answer(
        &self,
        req: Request<pb::InsightQuery>,
    ) -> Result<Response<EncodedReport>, Status> {
        let span = rpc_span(&req, "Insights.Query");
        let peer = span.in_scope(|| authorize(&req, &self.policy, Role::Analyst))?;
        let asked = req.into_inner();
        let mut query =
            conversions::insight_query_from_pb(asked.clone()).map_err(ApiError::from)?;
        if let (Some(key), Some(layout)) = (&query.attribute_key, self.store.rollup_layout()) {
            if !layout.keeps_attribute(key) {
                return Err(ApiError::InvalidArgument {
                    field: "attribute_key".into(),
                    reason: format!(
                        "{key:?} is not kept in this node's rollups (it keeps {}); the operator can add it to [insights] attribute_keys and run `chainsight admin rebuild-rollups`",
                        layout.attribute_keys.as_deref().unwrap_or_default().join(", ")
                    ),
                }
                .into());
            }
        }
        query.filter = self
            .limits
            .constrain(&peer.identity, query.filter)
            .map_err(ApiError::PermissionDenied)?;
        let private = self.spend(&peer.identity).await?;
        let store = self.store.clone();
        let k_min = self.k_min;
        let started = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || {
            let report = match private {
                None => insights::run_encoded(&store, &query, k_min)?,
                Some((mechanism, _)) => {
                    // Everything computed exactly, then noise, ranking,
                    // suppression and the limit on the noisy sums.
                    let limit = query.limit;
                    let exact = insights::run(
                        &store,
                        &insights::Query {
                            limit: 0,
                            ..query.clone()
                        },
                        0,
                    )?;
                    let noisy = crate::dp::noisy(exact, mechanism, k_min, limit);
                    let rows = noisy.rows.len();
                    let suppressed_groups = noisy.suppressed_groups;
                    EncodedReport {
                        rows,
                        suppressed_groups,
                        bytes: prost::Message::encode_to_vec(&conversions::insight_report_to_pb(
                            noisy,
                        ))
                        .into(),
                    }
                }
            };
            let detail = serde_json::json!({
                "query": asked,
                "filter_applied": conversions::filter_to_pb(&query.filter),
                "groups_returned": report.rows,
                "groups_suppressed": report.suppressed_groups,
                "k_min": k_min,
                "epsilon": private.map_or(0.0, |(m, _)| m.epsilon),
                "budget_left": private.map(|(_, left)| left),
            });
            store.audit(crate::audit::Kind::Query, &peer.identity, &detail)?;
            Ok::<_, crate::store::Error>(report)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)?;
        if report.bytes.len() > MAX_REPORT_BYTES {
            return Err(ApiError::ResourceExhausted(format!(
                "the report is {} bytes ({} rows), more than the {MAX_REPORT_BYTES} a response may carry; ask for fewer rows (limit), fewer dimensions or a narrower filter",
                report.bytes.len(),
                report.rows
            ))
            .into());
        }
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
        super::Routed::new(self, max_decoding_message_size)
    }
}

/// Serves `chainsight.v1.Insights` (see the module documentation).
pub type InsightsServer = super::Routed<InsightsService>;

impl super::Routes for InsightsService {
    const NAME: &'static str = pb::insights_server::SERVICE_NAME;

    fn route<B>(
        self: Arc<Self>,
        max_message_bytes: usize,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        if req.uri().path() != "/chainsight.v1.Insights/Query" {
            return super::unimplemented();
        }
        Box::pin(async move {
            // Reports have their own bound (`MAX_REPORT_BYTES`).
            let codec = super::PreEncoded::<EncodedReport, pb::InsightQuery>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(max_message_bytes), None);
            Ok(grpc.unary(QueryMethod(self), req).await)
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
