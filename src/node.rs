//! Wiring of a node: open the store and the pseudonym key, build the mTLS
//! server, register the services (plus gRPC health and reflection), serve
//! until the shutdown future resolves, then drain in-flight requests within
//! a grace period and flush the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::anonymise::{self, Anonymiser};
use crate::config::NodeConfig;
use crate::pb;
use crate::pb::ingest_server::IngestServer;
use crate::policy::{FilterLimits, Policy};
use crate::propagate::{self, Links};
use crate::service::ingest::IngestService;
use crate::service::insights::InsightsService;
use crate::service::peering::PeeringService;
use crate::service::signals::SignalsService;
use crate::store::{self, Store};
use crate::tls;

/// How long in-flight requests may take to finish after shutdown is asked.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Key(#[from] anonymise::Error),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error(transparent)]
    Origin(#[from] crate::origin::SetupError),
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("could not create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Runs a node on an already-bound listener until `shutdown` resolves.
///
/// When the store can no longer write (a full disk), the node keeps serving
/// what it can (reads; writes answer RESOURCE_EXHAUSTED), reports health
/// NOT_SERVING, and once `[storage] resume_free_mib` are free again it
/// restarts its services in place: drains requests, closes and reopens the
/// store, and serves on the same listener with the config in force
/// (reloads included). Nothing acknowledged is lost: acknowledgements
/// follow the flush.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let span = tracing::info_span!("node", id = %config.id);
    async move {
        let listener = Arc::new(listener);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut config = config;
        loop {
            match run_once(config, listener.clone(), shutdown.as_mut()).await? {
                Ended::Shutdown => return Ok(()),
                Ended::Recover(in_force) => {
                    tracing::warn!("space is free again: reopening the store and restarting the node's services in place");
                    config = *in_force;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Why [`run_once`] returned.
enum Ended {
    /// The shutdown future resolved (or the server stopped).
    Shutdown,
    /// The store failed and space is free again: run again with this config.
    Recover(Box<NodeConfig>),
}

async fn run_once(
    config: NodeConfig,
    listener: Arc<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Ended, Error> {
    let parts = open_parts(&config).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IngestServer<IngestService>>().await;

    let token = CancellationToken::new();
    let incoming = tls::incoming(
        listener,
        parts.tls.clone(),
        Duration::from_secs(config.tls.handshake_timeout_secs),
        token.clone(),
    );
    let router = build_router(&config, &parts, health_service, token.clone())?;
    let server = tokio::spawn(
        router
            .serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned())
            .in_current_span(),
    );
    let workers = propagate::spawn_workers(
        parts.links.clone(),
        parts.store.clone(),
        config.tls.clone(),
        config.propagation.clone(),
        token.clone(),
    );
    let erasures = crate::erasure::spawn_senders(
        parts.links.clone(),
        parts.store.clone(),
        config.tls.clone(),
        token.clone(),
    );
    let retention =
        crate::retention::spawn(parts.store.clone(), config.retention.clone(), token.clone());
    let metrics = match config.metrics.listen {
        Some(addr) => {
            let registry = crate::metrics::registry(parts.store.clone(), parts.links.clone());
            let (_, task) = crate::metrics::serve(addr, registry, token.clone())
                .await
                .map_err(|e| Error::Serve(e.to_string()))?;
            Some(task)
        }
        None => None,
    };
    // Cancelled when the store has failed and space is free again.
    let recover = CancellationToken::new();
    let store_health = spawn_store_health(
        parts.store.watch_failure(),
        health.clone(),
        config.data_dir.clone(),
        config.storage.resume_free_mib,
        recover.clone(),
        token.clone(),
    );
    let tls_watch = (config.tls.watch_secs > 0).then(|| {
        crate::reload::spawn_tls_watch(
            parts.reloader.clone(),
            parts.store.clone(),
            Duration::from_secs(config.tls.watch_secs),
            token.clone(),
        )
    });
    let reload =
        crate::reload::spawn_on_sighup(parts.reloader.clone(), parts.store.clone(), token.clone());
    let exports = crate::export::spawn(
        &config.id,
        &config.export,
        parts.store.clone(),
        token.clone(),
    );
    tracing::info!(
        data_dir = %config.data_dir.display(),
        last_seq = parts.store.last_seq()?,
        links = workers.len(),
        runtime_workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "node started"
    );

    let result = serve_until(server, shutdown, recover.cancelled(), &token, &health).await;
    token.cancel();
    for w in workers
        .into_iter()
        .chain(erasures)
        .chain(retention)
        .chain(metrics)
        .chain(reload)
        .chain(exports)
        .chain(Some(store_health))
        .chain(tls_watch)
    {
        // Workers watch the token; the bound is a safety net.
        if tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .is_err()
        {
            tracing::warn!("a background task did not stop within 5 s; leaving it");
        }
    }
    if recover.is_cancelled() {
        // The store's writes failed: closing it flushes nothing new (what
        // was acknowledged is on disk already), and its error is expected.
        if let Err(e) = parts.store.close().await {
            tracing::info!(error = %e, "closing the failed store");
        }
        let in_force = parts.reloader.in_force();
        drop(parts);
        result?;
        return Ok(Ended::Recover(Box::new(in_force)));
    }
    parts.store.close().await?;
    tracing::info!(
        last_seq = parts.store.last_seq()?,
        flushes = parts.store.flushes(),
        "store flushed; node stopped"
    );
    result.map(|()| Ended::Shutdown)
}

/// Watches the store: once a write fails for good (sled keeps an I/O error
/// as the state of the database), health goes NOT_SERVING and the log says
/// what to do; then, every second, the free space of the data directory is
/// checked, and `recover` is cancelled when `resume_free_mib` are free.
fn spawn_store_health(
    mut failure: tokio::sync::watch::Receiver<Option<String>>,
    health: tonic_health::server::HealthReporter,
    data_dir: std::path::PathBuf,
    resume_free_mib: u64,
    recover: CancellationToken,
    token: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(
        async move {
            let reason = loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    changed = failure.changed() => if changed.is_err() { return },
                }
                if let Some(reason) = failure.borrow_and_update().clone() {
                    break reason;
                }
            };
            tracing::error!(
                %reason,
                data_dir = %data_dir.display(),
                resume_free_mib,
                "the store can no longer write; health NOT_SERVING: free space (or fix the disk); the node reopens its store by itself once resume_free_mib are free, or restart the node"
            );
            health.set_not_serving::<IngestServer<IngestService>>().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match free_bytes(&data_dir) {
                    Ok(free) if free >= resume_free_mib.saturating_mul(1 << 20) => {
                        tracing::info!(free_mib = free >> 20, "space is free again in the data directory");
                        recover.cancel();
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot read the free space of the data directory"),
                }
            }
        }
        .in_current_span(),
    )
}

/// Bytes available to this process on the filesystem holding `dir`.
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    // The field types differ between platforms (u32 on some).
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(st.blocks_available()).saturating_mul(st.fragment_size()))
}

/// What a node's services share.
struct Parts {
    anonymiser: Anonymiser,
    links: Arc<Links>,
    store: Store,
    policy: Policy,
    limits: FilterLimits,
    tls: tls::LiveServerConfig,
    reloader: Arc<crate::reload::Reloader>,
    signer: Option<Arc<crate::origin::Signer>>,
    verifier: Arc<crate::origin::Verifier>,
}

async fn open_parts(config: &NodeConfig) -> Result<Parts, Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store_dir = config.data_dir.join("store");
    let anonymiser = Anonymiser::open(config.id.clone(), &config.data_dir, store_dir.exists())?;
    let links = Arc::new(Links::new(config, &anonymiser));
    let link_ids = links.ids();
    let layout = config.insights.layout().map_err(Error::Serve)?;
    let cache_bytes = config.insights.cache_mib.saturating_mul(1 << 20);
    let page_cache = config.storage.page_cache_bytes();
    let id_pack_min = config.storage.id_pack_min;
    let history_links = links.clone();
    let store = tokio::task::spawn_blocking(move || {
        let store = Store::open_tuned(&store_dir, &link_ids, layout, page_cache)?;
        store.set_rollup_cache_bytes(cache_bytes);
        store.set_id_pack_min(id_pack_min);
        store.check_rollups()?;
        history_links.load_history(&store)?;
        Ok::<_, crate::store::Error>(store)
    })
    .await
    .map_err(|e| Error::Serve(e.to_string()))??;
    let verifier = Arc::new(crate::origin::Verifier::new(tls::load_certs(
        &config.tls.ca,
    )?)?);
    let signer = if config.trust.sign {
        let chain = tls::load_certs(&config.tls.cert)?;
        let leaf = chain.into_iter().next().ok_or_else(|| {
            Error::Tls(tls::Error::NoCertificate {
                path: config.tls.cert.display().to_string(),
            })
        })?;
        let signer = crate::origin::Signer::new(leaf, &tls::load_key(&config.tls.key)?)?;
        store.put_certificate(signer.certificate())?;
        Some(Arc::new(signer))
    } else {
        None
    };
    let policy =
        Policy::from_roles(&config.roles).with_rate_limit(config.limits.requests_per_second);
    policy.set_revoked(tls::revoked_serials(&config.tls)?);
    let limits = FilterLimits::from_config(&config.filter_limit);
    let tls = tls::LiveServerConfig::new(tls::server_config(&config.tls)?);
    let reloader = Arc::new(crate::reload::Reloader::new(
        config.clone(),
        policy.clone(),
        limits.clone(),
        links.clone(),
        store.clone(),
        tls.clone(),
    ));
    crate::service::admin::remove_stale_staging(&config.data_dir);
    Ok(Parts {
        anonymiser,
        links,
        store,
        policy,
        limits,
        tls,
        reloader,
        signer,
        verifier,
    })
}

fn erasure_context(config: &NodeConfig, parts: &Parts) -> crate::erasure::Context {
    crate::erasure::Context {
        node_id: config.id.clone(),
        links: parts.links.clone(),
        tls: config.tls.clone(),
    }
}

fn build_router(
    config: &NodeConfig,
    parts: &Parts,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    token: CancellationToken,
) -> Result<tonic::transport::server::Router, Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Serve(e.to_string()))?;
    let max = config.limits.max_message_bytes;
    let ingest = IngestServer::new(IngestService::new(
        parts.policy.clone(),
        parts.anonymiser.clone(),
        parts.store.clone(),
        parts.links.clone(),
        config.limits.max_events_per_request,
        parts.signer.clone(),
        erasure_context(config, parts),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let peering = pb::peering_server::PeeringServer::new(PeeringService::new(
        config.id.clone(),
        parts.policy.clone(),
        parts.store.clone(),
        parts.links.clone(),
        token.clone(),
        crate::service::peering::Trust {
            verifier: parts.verifier.clone(),
            require: config.trust.require_origin_signature,
        },
        erasure_context(config, parts),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    // Every response is bounded too (encode): a signal carries one event,
    // a backup chunk 256 KiB, an audit record one entry. Insight reports
    // have their own bound (`service::insights::MAX_REPORT_BYTES`).
    let signals = SignalsService::new(
        parts.policy.clone(),
        parts.limits.clone(),
        parts.store.clone(),
        token.clone(),
    )
    .into_server(max);
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .max_concurrent_streams(Some(config.limits.max_concurrent_streams))
        .add_service(health)
        .add_service(reflection)
        .add_service(ingest)
        .add_service(peering)
        .add_service(signals)
        .add_service(
            pb::admin_server::AdminServer::new(crate::service::admin::AdminService::new(
                config.id.clone(),
                parts.policy.clone(),
                parts.store.clone(),
                config.data_dir.clone(),
                parts.reloader.clone(),
                token.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            pb::audit_server::AuditServer::new(crate::service::audit::AuditService::new(
                parts.policy.clone(),
                parts.store.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            InsightsService::new(
                parts.policy.clone(),
                parts.limits.clone(),
                parts.store.clone(),
                config.privacy.k_min,
                &config.dp_budget,
            )
            .into_server(max),
        ))
}

type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Serves until `shutdown` resolves (or the server fails), then stops
/// accepting and lets in-flight requests finish within [`SHUTDOWN_GRACE`].
async fn serve_until(
    mut server: ServerTask,
    shutdown: impl Future<Output = ()> + Send,
    recover: impl Future<Output = ()> + Send,
    token: &CancellationToken,
    health: &tonic_health::server::HealthReporter,
) -> Result<(), Error> {
    let serve_err = |e: tonic::transport::Error| Error::Serve(tls::error_chain(&e));
    tokio::select! {
        res = &mut server => {
            return res.map_err(|e| Error::Serve(e.to_string()))?.map_err(serve_err);
        }
        _ = shutdown => tracing::info!("shutting down: draining in-flight requests"),
        _ = recover => tracing::info!("restarting in place: draining in-flight requests"),
    }
    health
        .set_not_serving::<IngestServer<IngestService>>()
        .await;
    token.cancel();
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(Ok(res)) => res.map_err(serve_err),
        Ok(Err(e)) => Err(Error::Serve(e.to_string())),
        Err(_) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still running after the grace period; closing them");
            server.abort();
            Ok(())
        }
    }
}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed
/// when this function is called, so a signal that arrives before the future
/// is first polled is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        );
        async move {
            match handlers {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => tracing::info!("SIGINT received"),
                        _ = term.recv() => tracing::info!("SIGTERM received"),
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
