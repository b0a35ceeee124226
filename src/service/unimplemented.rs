//! Services declared by the contract whose behaviour comes with later work:
//! they answer UNIMPLEMENTED (the generated default methods) until then.

use crate::pb;

/// `Insights`: aggregated queries.
#[derive(Debug, Default)]
pub struct InsightsService;

#[tonic::async_trait]
impl pb::insights_server::Insights for InsightsService {}
