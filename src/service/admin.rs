//! `Admin`: an operator's actions on the running node — a live reload of
//! node.toml and a consistent backup of the store. Callers need the
//! operators role or the node's own certificate (which the CLI uses with
//! `--config node.toml` on the node's machine).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{rpc_span, ApiError};
use crate::pb;
use crate::policy::{Policy, Role};
use crate::reload::Reloader;
use crate::store::Store;
use crate::tls::Peer;
use tokio_util::sync::CancellationToken;

/// Bytes of a backup chunk.
const CHUNK: usize = 256 * 1024;

/// The prefix of the snapshot files staged in the data directory.
const STAGING_PREFIX: &str = "backup-staging-";

/// The Admin service.
#[derive(Clone)]
pub struct AdminService {
    node_id: String,
    policy: Policy,
    store: Store,
    data_dir: PathBuf,
    reloader: Arc<Reloader>,
    /// One backup at a time (each holds writes during its snapshot and a
    /// copy of the store on disk until streamed).
    backup: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
}

impl AdminService {
    pub fn new(
        node_id: String,
        policy: Policy,
        store: Store,
        data_dir: PathBuf,
        reloader: Arc<Reloader>,
        shutdown: CancellationToken,
    ) -> Self {
        AdminService {
            node_id,
            policy,
            store,
            data_dir,
            reloader,
            backup: Arc::new(tokio::sync::Semaphore::new(1)),
            shutdown,
        }
    }

    /// The caller, if it is this node itself or holds the operators role.
    fn authorize<T>(&self, req: &Request<T>) -> Result<Peer, ApiError> {
        let own = req
            .extensions()
            .get::<Peer>()
            .filter(|p| p.identity == self.node_id)
            .cloned();
        match own {
            Some(peer) if self.policy.is_revoked(&peer.serial) => Err(ApiError::Unauthenticated(
                "this node's own certificate is revoked (listed in a CRL in force)".into(),
            )),
            Some(peer) => Ok(peer),
            None => super::authorize(req, &self.policy, Role::Operator),
        }
    }
}

/// Removes snapshot files a crash left in `data_dir`.
pub fn remove_stale_staging(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed a stale backup snapshot")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "could not remove a stale backup snapshot")
                }
            }
        }
    }
}

/// A staged snapshot file, removed when dropped (streamed or not).
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn reload(
        &self,
        req: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let span = rpc_span(&req, "Admin.Reload");
        let peer = span.in_scope(|| self.authorize(&req))?;
        let reloader = self.reloader.clone();
        let result = tokio::task::spawn_blocking(move || reloader.reload())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        crate::reload::log_and_audit(&self.store, &peer.identity, &result)
            .instrument(span)
            .await;
        match result {
            Ok(o) => Ok(Response::new(pb::ReloadResponse {
                applied: o.applied,
                needs_restart: o.needs_restart,
            })),
            Err(reason) => Err(Status::failed_precondition(format!(
                "the new config is refused and the one in force stays: {reason}"
            ))),
        }
    }

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let span = rpc_span(&req, "Admin.Backup");
        let peer = span.in_scope(|| self.authorize(&req))?;
        let Ok(running) = self.backup.clone().try_acquire_owned() else {
            return Err(Status::aborted(
                "a backup of this node is already running; retry when it has finished",
            ));
        };
        let staged = Staged(
            self.data_dir
                .join(format!("{STAGING_PREFIX}{}", uuid::Uuid::now_v7().simple())),
        );
        let counts = self
            .store
            .snapshot(&self.node_id, &staged.0)
            .instrument(span.clone())
            .await
            .map_err(ApiError::from)?;
        let size = tokio::fs::metadata(&staged.0).await.map_or(0, |m| m.len());
        super::audit(
            &self.store,
            crate::audit::Kind::Admin,
            &peer.identity,
            serde_json::json!({
                "action": "backup",
                "trees": counts.trees,
                "entries": counts.entries,
                "last_seq": counts.last_seq,
                "bytes": size,
            }),
        )
        .await?;
        span.in_scope(|| {
            tracing::info!(
                entries = counts.entries,
                last_seq = counts.last_seq,
                bytes = size,
                "streaming the snapshot"
            )
        });
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let shutdown = self.shutdown.clone();
        tokio::spawn(
            async move {
                let (_running, staged) = (running, staged);
                let mut file = match tokio::fs::File::open(&staged.0).await {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("reading the snapshot: {e}"))))
                            .await;
                        return;
                    }
                };
                loop {
                    let mut data = vec![0u8; CHUNK];
                    let n = match file.read(&mut data).await {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::internal(format!("reading the snapshot: {e}"))))
                                .await;
                            return;
                        }
                    };
                    data.truncate(n);
                    tokio::select! {
                        sent = tx.send(Ok(pb::BackupChunk { data })) => if sent.is_err() {
                            tracing::warn!("the backup client went away; snapshot dropped");
                            return;
                        },
                        _ = shutdown.cancelled() => {
                            let _ = tx.try_send(Err(Status::unavailable("the node is shutting down; take the backup again")));
                            return;
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
