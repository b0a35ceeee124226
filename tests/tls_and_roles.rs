//! Mutual TLS and roles: who may connect, and who may publish.

mod common;

use chainsight::certs::{ChainCa, LeafOptions};
use chainsight::pb;
use common::{event, TestEnv};
use time::{Duration, OffsetDateTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Publishing as `files` must fail before reaching the service.
async fn assert_refused(node: &common::NodeProc, files: &chainsight::config::TlsFiles, what: &str) {
    let result = match node.channel(files).await {
        Err(_) => return, // refused during connect
        Ok(channel) => {
            pb::ingest_client::IngestClient::new(channel)
                .publish(pb::PublishRequest {
                    events: vec![event(&format!("refused-{what}"))],
                })
                .await
        }
    };
    let status = result.expect_err(what);
    eprintln!("{what}: {status:?}");
    assert_refusal(&status, what);
}

/// A refusal at the TLS layer surfaces as a transport error, never as an
/// answer of the service.
fn assert_refusal(status: &tonic::Status, what: &str) {
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{what}: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_bad_certificates_and_roles_are_enforced() {
    let env = TestEnv::new();
    let mut node = env.retailer();

    // No client certificate at all.
    let ca_pem = std::fs::read(env.certs_dir().join("ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name("retailer");
    let no_cert = Endpoint::from_shared(format!("https://{}", node.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let result = match no_cert.connect().await {
        Err(_) => None,
        Ok(ch) => Some(
            pb::ingest_client::IngestClient::new(ch)
                .publish(pb::PublishRequest {
                    events: vec![event("no-cert")],
                })
                .await,
        ),
    };
    if let Some(r) = result {
        let status = r.expect_err("no client cert");
        eprintln!("no cert: {status:?}");
        assert_refusal(&status, "no client certificate");
    }

    // A certificate from another CA, with a name that is a publisher here.
    let other_ca = ChainCa::generate("some other CA").unwrap();
    let foreign = other_ca
        .issue("retailer-eshop", &LeafOptions::default())
        .unwrap();
    let foreign = env.write_files("foreign-eshop", &foreign.cert_pem, &foreign.key_pem);
    assert_refused(&node, &foreign, "other CA").await;

    // Expired, and not yet valid.
    let now = OffsetDateTime::now_utc();
    let expired = LeafOptions {
        not_before: now - Duration::days(30),
        not_after: now - Duration::days(1),
        ..LeafOptions::default()
    };
    let expired = {
        let issued = env.ca.issue("retailer-eshop", &expired).unwrap();
        env.write_files("expired-eshop", &issued.cert_pem, &issued.key_pem)
    };
    assert_refused(&node, &expired, "expired").await;
    let future = LeafOptions {
        not_before: now + Duration::days(1),
        not_after: now + Duration::days(30),
        ..LeafOptions::default()
    };
    let future = {
        let issued = env.ca.issue("retailer-eshop", &future).unwrap();
        env.write_files("future-eshop", &issued.cert_pem, &issued.key_pem)
    };
    assert_refused(&node, &future, "not yet valid").await;

    // A server-auth-only certificate cannot be used as a client.
    let server_only = LeafOptions {
        client_auth: false,
        ..LeafOptions::default()
    };
    let server_only = {
        let issued = env.ca.issue("retailer-eshop", &server_only).unwrap();
        env.write_files("serveronly-eshop", &issued.cert_pem, &issued.key_pem)
    };
    assert_refused(&node, &server_only, "server-auth only").await;

    // A valid certificate whose identity is not a publisher.
    let analyst = env.issue("analyst");
    let status = node
        .ingest(&analyst)
        .await
        .publish(pb::PublishRequest {
            events: vec![event("wrong-role")],
        })
        .await
        .expect_err("analyst may not publish");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("publisher"), "{status:?}");

    // Same for the streaming form.
    let status = node
        .ingest(&analyst)
        .await
        .publish_stream(tokio_stream::iter(vec![pb::PublishRequest {
            events: vec![event("wrong-role-stream")],
        }]))
        .await
        .expect_err("analyst may not publish_stream");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // The real publisher gets through, so the refusals above were not a broken node.
    let eshop = env.issue("retailer-eshop");
    let results = common::publish(&mut node.ingest(&eshop).await, vec![event("allowed")]).await;
    assert_eq!(common::outcome(&results[0]), pb::PublishOutcome::Accepted);

    node.terminate();
    let store = node.open_store();
    assert_eq!(
        store.len().unwrap(),
        1,
        "only the authorised publish is stored"
    );
    assert!(store.get_by_event_id("allowed").unwrap().is_some());
    // The node says why it refused each handshake.
    let log = node.log();
    for reason in [
        "peer sent no certificates",
        "UnknownIssuer",
        "certificate expired",
        "certificate not valid yet",
        "does not allow extended key usage for client authentication",
    ] {
        assert!(
            log.contains(reason),
            "no refusal for {reason:?} in the log:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let env = TestEnv::new();
    let node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    // The node's certificate says "retailer"; expecting "distributor" must fail.
    let err = chainsight::tls::connect(&format!("https://{}", node.addr), "distributor", &eshop)
        .await
        .expect_err("wrong server identity");
    assert!(err.to_string().contains("connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_the_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let env = TestEnv::new();
    let node = env.retailer();
    // Health needs mTLS but no role.
    let someone = env.issue("someone");
    let channel = node.channel(&someone).await.unwrap();
    for service in ["", "chainsight.v1.Ingest"] {
        let resp = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for s in [
        "chainsight.v1.Ingest",
        "chainsight.v1.Peering",
        "chainsight.v1.Signals",
        "chainsight.v1.Insights",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s), "{s} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_refused_and_idle_handshakes_time_out() {
    use std::sync::Arc;
    let env = TestEnv::new();
    let node = env.retailer();
    let eshop = env.issue("retailer-eshop");

    // A client that offers only TLS 1.2, with a valid certificate.
    let provider = chainsight::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in chainsight::tls::load_certs(&eshop.ca).unwrap() {
        roots.add(ca).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(
            chainsight::tls::load_certs(&eshop.cert).unwrap(),
            chainsight::tls::load_key(&eshop.key).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("retailer").unwrap();
    let err = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name.clone(), tcp)
        .await
        .expect_err("TLS 1.2 must be refused");
    assert!(err.to_string().to_lowercase().contains("protocol"), "{err}");

    // The same client with TLS 1.3 gets through and negotiates h2.
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chainsight::tls::load_certs(&eshop.cert).unwrap(),
            chainsight::tls::load_key(&eshop.key).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // A TCP connection that never starts the handshake is closed once
    // tls.handshake_timeout_secs (3 s in the test config) has passed.
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut idle = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the node closes an idle connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(2500),
        "closed after {waited:?}, before the handshake timeout"
    );
    // The node logs the refusal just after closing the socket.
    common::wait_for(
        || node.log().contains("handshake not completed within"),
        "the node to log the handshake timeout",
    );
}
