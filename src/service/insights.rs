//! `Insights`: partners and analysts query aggregated insight. The query is
//! validated and narrowed to the caller's filter limit, then answered from
//! the rollups (never from events) with small groups suppressed.

use tonic::{Request, Response, Status};

use super::{authorize, rpc_span, ApiError};
use crate::conversions;
use crate::insights;
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
}

#[tonic::async_trait]
impl pb::insights_server::Insights for InsightsService {
    async fn query(
        &self,
        req: Request<pb::InsightQuery>,
    ) -> Result<Response<pb::InsightReport>, Status> {
        let span = rpc_span(&req, "Insights.Query");
        let peer = span.in_scope(|| authorize(&req, &self.policy, Role::Analyst))?;
        let mut query =
            conversions::insight_query_from_pb(req.into_inner()).map_err(ApiError::from)?;
        query.filter = self
            .limits
            .constrain(&peer.identity, query.filter)
            .map_err(ApiError::PermissionDenied)?;
        let store = self.store.clone();
        let k_min = self.k_min;
        let started = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || insights::run(&store, &query, k_min))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(ApiError::from)?;
        span.in_scope(|| {
            tracing::info!(
                rows = report.rows.len(),
                suppressed = report.suppressed_groups,
                elapsed = ?started.elapsed(),
                "query answered"
            );
        });
        Ok(Response::new(conversions::insight_report_to_pb(report)))
    }
}
