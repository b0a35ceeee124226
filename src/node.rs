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
use crate::policy::Policy;
use crate::propagate::{self, Links};
use crate::service::ingest::IngestService;
use crate::service::peering::PeeringService;
use crate::service::unimplemented::{InsightsService, SignalsService};
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
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("could not create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Runs a node on an already-bound listener until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let span = tracing::info_span!("node", id = %config.id);
    run_inner(config, listener, shutdown).instrument(span).await
}

async fn run_inner(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let anonymiser = Anonymiser::open(config.id.clone(), &config.data_dir)?;
    let links = Arc::new(Links::new(&config, &anonymiser));
    let store_dir = config.data_dir.join("store");
    let link_ids = links.ids();
    let store = tokio::task::spawn_blocking(move || Store::open(&store_dir, &link_ids))
        .await
        .map_err(|e| Error::Serve(e.to_string()))??;
    let tls_config = tls::server_config(&config.tls)?;
    let policy = Policy::from_roles(&config.roles);

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Serve(e.to_string()))?;

    let max = config.limits.max_message_bytes;
    let ingest = pb::ingest_server::IngestServer::new(IngestService::new(
        policy.clone(),
        anonymiser,
        store.clone(),
        links.clone(),
        config.limits.max_events_per_request,
    ))
    .max_decoding_message_size(max);
    health
        .set_serving::<pb::ingest_server::IngestServer<IngestService>>()
        .await;

    let token = CancellationToken::new();
    let incoming = tls::incoming(
        listener,
        tls_config,
        Duration::from_secs(config.tls.handshake_timeout_secs),
        token.clone(),
    );
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ingest)
        .add_service(
            pb::peering_server::PeeringServer::new(PeeringService::new(
                config.id.clone(),
                policy.clone(),
                store.clone(),
                links.clone(),
            ))
            .max_decoding_message_size(max),
        )
        .add_service(pb::signals_server::SignalsServer::new(SignalsService))
        .add_service(pb::insights_server::InsightsServer::new(InsightsService));
    let server_token = token.clone();
    let mut server = tokio::spawn(
        router
            .serve_with_incoming_shutdown(incoming, server_token.cancelled_owned())
            .in_current_span(),
    );
    let workers = propagate::spawn_workers(
        links.clone(),
        store.clone(),
        config.tls.clone(),
        config.propagation.clone(),
        token.clone(),
    );
    tracing::info!(data_dir = %config.data_dir.display(), events = store.len(), links = workers.len(), "node started");

    let early_exit = tokio::select! {
        _ = shutdown => None,
        res = &mut server => Some(res),
    };
    let result = match early_exit {
        Some(res) => res
            .map_err(|e| Error::Serve(e.to_string()))?
            .map_err(|e| Error::Serve(tls::error_chain(&e))),
        None => {
            tracing::info!("shutting down: draining in-flight requests");
            health
                .set_not_serving::<pb::ingest_server::IngestServer<IngestService>>()
                .await;
            token.cancel();
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(res)) => res.map_err(|e| Error::Serve(tls::error_chain(&e))),
                Ok(Err(e)) => Err(Error::Serve(e.to_string())),
                Err(_) => {
                    tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still running after the grace period; closing them");
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    token.cancel();
    for w in workers {
        let _ = w.await;
    }
    store.flush().await?;
    tracing::info!(events = store.len(), "store flushed; node stopped");
    result
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
