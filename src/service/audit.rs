//! `Audit`: an auditor reads the node's audit trail. Records stream oldest
//! first, read from the store in chunks off the runtime; the caller can
//! check the hash chain itself (`chainsight audit verify --config …`).

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{authorize, rpc_span, ApiError};
use crate::audit::{Kind, Record};
use crate::conversions;
use crate::domain::UnixNanos;
use crate::pb;
use crate::policy::{Policy, Role};
use crate::store::Store;

/// Records read from the store per step.
const CHUNK: usize = 512;

/// The Audit service.
#[derive(Clone)]
pub struct AuditService {
    policy: Policy,
    store: Store,
}

impl AuditService {
    pub fn new(policy: Policy, store: Store) -> Self {
        AuditService { policy, store }
    }
}

/// What a listing keeps.
struct Selection {
    since: Option<UnixNanos>,
    identity: String,
    kind: Option<Kind>,
}

impl Selection {
    fn keeps(&self, r: &Record) -> bool {
        self.since.is_none_or(|s| r.at >= s)
            && (self.identity.is_empty() || r.identity == self.identity)
            && self.kind.is_none_or(|k| r.kind == k)
    }
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn list(
        &self,
        req: Request<pb::AuditListRequest>,
    ) -> Result<Response<RecordStream>, Status> {
        let span = rpc_span(&req, "Audit.List");
        span.in_scope(|| authorize(&req, &self.policy, Role::Auditor))?;
        let req = req.into_inner();
        let selection = Selection {
            since: conversions::optional_timestamp("since", req.since).map_err(ApiError::from)?,
            identity: req.identity,
            kind: match req.kind {
                0 => None,
                n => Some(
                    Kind::from_number(n).ok_or_else(|| ApiError::InvalidArgument {
                        field: "kind".into(),
                        reason: format!("unknown enum value {n}"),
                    })?,
                ),
            },
        };
        let (tx, rx) = mpsc::channel(CHUNK);
        let store = self.store.clone();
        let mut after = req.after_seq;
        tokio::spawn(
            async move {
                let mut sent = 0u64;
                loop {
                    let s = store.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        s.audit_records(after)
                            .take(CHUNK)
                            .collect::<Result<Vec<Record>, _>>()
                    })
                    .await;
                    let chunk = match read {
                        Ok(Ok(chunk)) => chunk,
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(ApiError::Internal(e.to_string()).into())).await;
                            return;
                        }
                    };
                    let Some(last) = chunk.last() else { break };
                    after = last.seq;
                    for record in chunk.iter().filter(|r| selection.keeps(r)) {
                        if tx
                            .send(Ok(conversions::audit_record_to_pb(record)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        sent += 1;
                    }
                }
                tracing::info!(sent, "audit records listed");
            }
            .instrument(span),
        );
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as RecordStream
        ))
    }
}
