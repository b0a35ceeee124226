//! Mutual TLS: the node's rustls server configuration, the accept loop that
//! hands authenticated connections to tonic, the caller's identity taken
//! from its certificate, and the client side used by the CLI and by links.
//!
//! The server is built on a rustls `ServerConfig` of our own (rather than
//! tonic's `ServerTlsConfig`) so that it can insist on TLS 1.3, bound the
//! handshake time, and read the identity from the client certificate's SAN.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::config::TlsFiles;

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("certificate {path} has no DNS name (SAN) to serve as identity")]
    NoIdentity { path: String },
    #[error("client TLS setup: {0}")]
    Client(String),
}

/// Most TLS handshakes in progress at once.
const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// Who is calling: the identity from the client certificate, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: String,
    pub remote: std::net::SocketAddr,
    /// The client certificate's serial number (checked against the CRLs
    /// in force on every request, so a revocation reaches established
    /// connections too).
    pub serial: Vec<u8>,
}

/// The crypto provider used everywhere (rcgen and tonic use ring too).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Pem {
            what: "certificate",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::Pem {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The identity of a certificate: its first DNS SAN other than `localhost`.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) if *dns != "localhost" => {
            Some((*dns).to_string())
        }
        _ => None,
    })
}

/// The node's server configuration: TLS 1.3 only, ALPN h2, and a client
/// certificate signed by the chain CA, and not revoked by one of `crls`,
/// required from every caller.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&files.ca)? {
        roots.add(ca)?;
    }
    let mut crls = Vec::new();
    for path in &files.crls {
        crls.extend(load_crls(path)?);
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The serial numbers the CRLs of `files` list.
pub fn revoked_serials(files: &TlsFiles) -> Result<std::collections::HashSet<Vec<u8>>, Error> {
    use x509_parser::prelude::FromDer;
    let mut out = std::collections::HashSet::new();
    for path in &files.crls {
        for crl in load_crls(path)? {
            let (_, parsed) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
                    .map_err(|e| crl_error(path, e.to_string()))?;
            out.extend(
                parsed
                    .iter_revoked_certificates()
                    .map(|r| r.raw_serial().to_vec()),
            );
        }
    }
    Ok(out)
}

/// The CRLs of one PEM file (at least one).
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let list = CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| crl_error(path, e.to_string()))?;
    if list.is_empty() {
        return Err(crl_error(path, "no X509 CRL in the file".into()));
    }
    Ok(list)
}

fn crl_error(path: &Path, reason: String) -> Error {
    Error::Pem {
        what: "certificate revocation list",
        path: path.display().to_string(),
        reason,
    }
}

/// The server configuration for new connections, replaceable while the
/// node runs (certificate rotation, new CRLs) without touching the
/// connections already established.
#[derive(Clone)]
pub struct LiveServerConfig(Arc<std::sync::RwLock<Arc<ServerConfig>>>);

impl LiveServerConfig {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        LiveServerConfig(Arc::new(std::sync::RwLock::new(config)))
    }

    /// The configuration in force.
    pub fn get(&self) -> Arc<ServerConfig> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `config` in force for connections accepted from now on.
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }
}

/// An authenticated connection, as handed to tonic.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
}

impl Connected for TlsConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener`, performs the TLS handshake of each
/// in its own task (bounded by `handshake_timeout`), and yields the
/// connections whose client certificate verified and carries an identity.
/// Failed handshakes are logged and dropped. Stops accepting on `shutdown`.
pub fn incoming(
    listener: Arc<TcpListener>,
    config: LiveServerConfig,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    // Bounds the handshakes in progress, so a flood of idle sockets cannot
    // hold unbounded file descriptors and tasks.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                break;
            };
            // The configuration in force now (a reload swaps it for new
            // connections; established ones keep theirs).
            let acceptor = TlsAcceptor::from(config.get());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match handshake(acceptor, tcp, remote, handshake_timeout).await {
                    Ok(conn) => {
                        tracing::debug!(peer = %conn.peer.identity, %remote, "TLS connection established");
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(reason) => tracing::info!(%remote, %reason, "TLS handshake refused"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: std::net::SocketAddr,
    timeout: Duration,
) -> Result<TlsConn, String> {
    let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| format!("handshake not completed within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| "no client certificate".to_string())?;
    let identity = identity_of(cert)
        .ok_or_else(|| "client certificate has no DNS SAN identity".to_string())?;
    let serial = x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, c)| c.raw_serial().to_vec())
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    Ok(TlsConn {
        stream,
        peer: Peer {
            identity,
            remote,
            serial,
        },
    })
}

/// A tonic client channel to `address` over mutual TLS, presenting the
/// certificate in `files` and verifying that the server's certificate is
/// issued by the chain CA for `server_name`.
pub async fn connect(
    address: &str,
    server_name: &str,
    files: &TlsFiles,
) -> Result<tonic::transport::Channel, Error> {
    let endpoint = client_endpoint(address, server_name, files)?;
    endpoint
        .connect()
        .await
        .map_err(|e| Error::Client(format!("cannot connect to {address}: {}", error_chain(&e))))
}

/// As [`connect`], but the channel connects lazily (on first use, and again
/// after a failure).
pub fn client_endpoint(
    address: &str,
    server_name: &str,
    files: &TlsFiles,
) -> Result<tonic::transport::Endpoint, Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |p: &Path, what: &'static str| {
        std::fs::read(p).map_err(|e| Error::Pem {
            what,
            path: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&files.ca, "CA certificate")?))
        .identity(Identity::from_pem(
            read(&files.cert, "certificate")?,
            read(&files.key, "private key")?,
        ))
        .domain_name(server_name)
        // Bounds the TLS handshake too: connect_timeout covers only TCP.
        .timeout(Duration::from_secs(10));
    Endpoint::from_shared(address.to_string())
        .map_err(|e| Error::Client(format!("bad address {address:?}: {e}")))?
        // Larger HTTP/2 receive windows than the 64 KiB default: insight
        // reports and signal batches arrive in fewer round trips.
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(8 << 20))
        // And larger frames than the 16 KiB default: a report of 1 MB
        // arrives in a few frames rather than 64, each of which wakes the
        // receiving task.
        .max_frame_size(Some(1 << 20))
        .tls_config(tls)
        .map_err(|e| Error::Client(error_chain(&e)))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
        })
}

/// An error and all its sources, joined by ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let next = src.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = src.source();
    }
    s
}
