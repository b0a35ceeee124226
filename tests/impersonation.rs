//! Impersonation (issue 7, item 5): a certificate of identity A calling as
//! anything else gets nothing A is not granted. Identity is the client
//! certificate's first DNS SAN (`tls::identity_of`); every request field
//! that names a node or an identity — a forwarded event's `origin` and
//! `path`, its origin proof, an event id, a subscription's `name`, a filter,
//! an audit listing's `identity`, an erasure's event ids — is tried here
//! with A's certificate, and the store is checked afterwards.
//!
//! Covered elsewhere (tls_and_roles.rs cases are not repeated here; the
//! others only where A holds other roles or the field names someone else):
//! - tests/tls_and_roles.rs: no client certificate, another CA's certificate
//!   carrying a publisher's name, expired / not yet valid / server-auth-only
//!   certificates, and a non-publisher calling Ingest.Publish and
//!   Ingest.PublishStream (PERMISSION_DENIED naming the role).
//! - tests/propagation_faults.rs: a stranger calling Peering.Forward, and
//!   Peering.Links without the operators role; tests/signals.rs and
//!   tests/signals_durable.rs: Subscribe/Ack without the subscriber role,
//!   and a limited identity's GTIN prefix widening; tests/insights.rs: the
//!   same for Insights.Query; tests/trust.rs: an unsigned or altered relayed
//!   event where origin signatures are required.
//!
//! Found by this file and fixed: Peering.Erase let any downstream erase, by
//! id, events this node's own publishers created, and tombstone ids they had
//! not used yet (now such events are spared, and a downstream's tombstone
//! blocks forwarded events only).

mod common;

use chainsight::config::TlsFiles;
use chainsight::pb;
use common::{event_of, outcome, publish, publish_all, roles, NodeProc, TestEnv};
use tonic::Code;

const DAIRY: &str = "4740001000017";
const WEAR: &str = "4750002000015";

/// The TLS files of a certificate already issued under `name` (without
/// issuing it again, which would replace a running node's own).
fn files_of(env: &TestEnv, name: &str) -> TlsFiles {
    let dir = env.certs_dir();
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        handshake_timeout_secs: 5,
        crls: Vec::new(),
        watch_secs: 10,
    }
}

/// A client certificate signed by the test chain CA with common name `cn`
/// and DNS SANs `dns` (in that order), plus IP 127.0.0.1: the shapes the
/// CLI's `certs init` never makes, for checking where identity comes from.
fn crafted(env: &TestEnv, file: &str, cn: &str, dns: &[&str]) -> TlsFiles {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let dir = env.certs_dir();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read CA file");
    let ca_key = KeyPair::from_pem(&read("ca.key")).expect("CA key");
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem"), ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = dns.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(30);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).expect("sign");
    env.write_files(file, &cert.pem(), &key.serialize_pem())
}

/// An anonymised event as a downstream node would forward it.
fn forwarded(id: &str, origin: &str, path: &[&str], category: &str) -> pb::PreferenceEvent {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    pb::PreferenceEvent {
        event_id: id.to_string(),
        origin: origin.to_string(),
        kind: pb::EventKind::Purchase as i32,
        occurred_at: Some(pbjson_types::Timestamp {
            seconds: now - 600,
            nanos: 0,
        }),
        product: Some(pb::Product {
            gtin: DAIRY.into(),
            category: category.into(),
            brand: "Põlluvara".into(),
        }),
        channel: pb::Channel::Store as i32,
        stage: pb::JourneyStage::Purchase as i32,
        quantity: 1,
        region: "EE".into(),
        age_band: "35-44".into(),
        path: path.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

/// Sends `batches` on one Forward stream to `node` as `files`; every ack.
async fn forward(
    node: &NodeProc,
    files: &TlsFiles,
    batches: Vec<pb::ForwardBatch>,
) -> Result<Vec<pb::ForwardAck>, tonic::Status> {
    let channel = node.channel(files).await.expect("connect");
    let mut acks = pb::peering_client::PeeringClient::new(channel)
        .forward(tokio_stream::iter(batches))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ack) = acks.message().await? {
        out.push(ack);
    }
    Ok(out)
}

fn batch(id: u64, events: Vec<pb::PreferenceEvent>) -> pb::ForwardBatch {
    pb::ForwardBatch {
        batch_id: id,
        events,
        certificates: Vec::new(),
    }
}

/// Asserts `result` is refused with `code` and a message containing every
/// one of `says`; prints what was tried and what came back.
fn assert_refused<T: std::fmt::Debug>(
    tried: &str,
    result: Result<T, tonic::Status>,
    code: Code,
    says: &[&str],
) {
    let status = match result {
        Ok(v) => panic!("{tried}: answered {v:?}, expected {code:?}"),
        Err(s) => s,
    };
    println!("{tried}: {:?}: {}", status.code(), status.message());
    assert_eq!(status.code(), code, "{tried}: {status:?}");
    for s in says {
        assert!(
            status.message().contains(s),
            "{tried}: the message does not say {s:?}: {status:?}"
        );
    }
}

/// Every event id the (stopped) node stores, in store order.
fn stored_ids(node: &NodeProc) -> Vec<String> {
    node.open_store()
        .scan_after(0)
        .map(|item| item.expect("stored event").1.event_id)
        .collect()
}

/// The audit records of the (stopped) node made for `identity`.
fn audited(node: &NodeProc, identity: &str) -> Vec<chainsight::audit::Record> {
    node.open_store()
        .audit_records(0)
        .map(|r| r.expect("audit record"))
        .filter(|r| r.identity == identity)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_cannot_forward_as_another_node_or_overwrite_its_events() {
    let env = TestEnv::new();
    env.node_config(
        "manufacturer",
        &roles(&["downstream = [\"distributor\", \"wholesaler\"]"]),
    );
    let mut node = env.start("manufacturer");
    let distributor = env.issue("distributor");
    let wholesaler = env.issue("wholesaler");

    // B (distributor) forwards one event of its own, genuinely.
    let genuine = forwarded("b-1", "distributor", &["distributor"], "dairy");
    let acks = forward(&node, &distributor, vec![batch(1, vec![genuine])])
        .await
        .expect("B forwards");
    assert_eq!(acks[0].stored, 1, "{acks:?}");

    // A (wholesaler) sends events whose fields claim other nodes.
    let claims = [
        (
            "path ending at B",
            forwarded("as-b", "distributor", &["distributor"], "dairy"),
        ),
        (
            "path [.., \"distributor\"] relayed from the retailer",
            forwarded(
                "as-b-relay",
                "retailer",
                &["retailer", "distributor"],
                "dairy",
            ),
        ),
        (
            "origin \"retailer\" on a path that starts at A",
            forwarded("wrong-origin", "retailer", &["wholesaler"], "dairy"),
        ),
        (
            "origin and path start at the receiving node",
            forwarded(
                "as-receiver",
                "manufacturer",
                &["manufacturer", "wholesaler"],
                "dairy",
            ),
        ),
    ];
    let mut events: Vec<_> = claims.iter().map(|(_, e)| e.clone()).collect();
    // B's event id again, with another content, on a path of A's own.
    events.push(forwarded(
        "b-1",
        "wholesaler",
        &["wholesaler"],
        "premium dairy",
    ));
    // And one honest event of A's: the link works.
    events.push(forwarded("a-1", "wholesaler", &["wholesaler"], "dairy"));
    let acks = forward(&node, &wholesaler, vec![batch(7, events)])
        .await
        .expect("A's stream is answered per event, not refused as a whole");
    let ack = &acks[0];
    println!(
        "A forwarding {} claims + B's event id + 1 own event: stored {}, duplicates {}, dropped {}, refused {}",
        claims.len(),
        ack.stored,
        ack.duplicates,
        ack.dropped,
        ack.refused
    );
    assert_eq!(
        (ack.stored, ack.duplicates, ack.dropped, ack.refused),
        (1, 1, claims.len() as u32, 0),
        "{ack:?}"
    );

    node.terminate();
    let log = node.log();
    for reason in [
        "path [\\\"distributor\\\"] does not end at the sender \\\"wholesaler\\\"",
        "path [\\\"retailer\\\", \\\"distributor\\\"] does not end at the sender \\\"wholesaler\\\"",
        "path does not start at the origin",
        "already contains this node",
    ] {
        let found = log.contains(reason) || log.contains(&reason.replace("\\\"", "\""));
        println!("node log names {reason:?}: {found}");
        assert!(found, "no {reason:?} in the log:\n{log}");
    }
    assert_eq!(stored_ids(&node), ["b-1", "a-1"]);
    let store = node.open_store();
    let (_, b1) = store.get_by_event_id("b-1").unwrap().expect("b-1");
    println!(
        "B's event after A reused its id: origin {:?}, path {:?}, category {:?}",
        b1.origin, b1.path, b1.product.category
    );
    assert_eq!(b1.origin, "distributor");
    assert_eq!(b1.path, ["distributor"]);
    assert_eq!(b1.product.category, "dairy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_cannot_act_as_a_node_or_overwrite_another_publishers_event() {
    let env = TestEnv::new();
    env.node_config(
        "retailer",
        &roles(&["publishers = [\"retailer-eshop\", \"retailer-app\"]"]),
    );
    let mut node = env.start("retailer");
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("retailer-app");

    // B (eshop) publishes an event.
    let theirs = event_of("shared-id", DAIRY, pb::EventKind::Review, "cust-b");
    publish_all(&mut node.ingest(&eshop).await, vec![theirs]).await;

    // A (app) publishes under B's event id: a duplicate, B's content stays.
    let mut mine = event_of("shared-id", WEAR, pb::EventKind::Complaint, "cust-a");
    mine.product.as_mut().unwrap().category = "apparel".into();
    let results = publish(&mut node.ingest(&app).await, vec![mine]).await;
    println!(
        "A publishing with B's event id: {:?} {:?}",
        outcome(&results[0]),
        results[0].reason
    );
    assert_eq!(outcome(&results[0]), pb::PublishOutcome::Duplicate);

    // A's own event: origin and path are the node's, whatever A is; the
    // CustomerEvent has no field that could claim another origin.
    let results = publish(
        &mut node.ingest(&app).await,
        vec![event_of("app-1", DAIRY, pb::EventKind::Purchase, "cust-a")],
    )
    .await;
    assert_eq!(outcome(&results[0]), pb::PublishOutcome::Accepted);

    // A calling the node-to-node services as if it were a downstream node.
    let as_node = forward(
        &node,
        &app,
        vec![batch(
            1,
            vec![forwarded(
                "fwd-1",
                "retailer-app",
                &["retailer-app"],
                "dairy",
            )],
        )],
    )
    .await;
    assert_refused(
        "publisher A calling Peering.Forward with path [\"retailer-app\"]",
        as_node,
        Code::PermissionDenied,
        &["\"retailer-app\"", "downstream", "roles.downstream"],
    );
    let mut peering = pb::peering_client::PeeringClient::new(node.channel(&app).await.unwrap());
    let erase = peering
        .erase(pb::ErasureForward {
            erasure_id: "app-erasure".into(),
            customer_pseudonym: String::new(),
            event_ids: vec!["shared-id".into()],
        })
        .await;
    assert_refused(
        "publisher A calling Peering.Erase of B's event",
        erase,
        Code::PermissionDenied,
        &["\"retailer-app\"", "downstream"],
    );
    let status = peering
        .erasure_status(pb::ErasureStatusRequest {
            erasure_id: "app-erasure".into(),
            depth: 1,
        })
        .await;
    assert_refused(
        "publisher A calling Peering.ErasureStatus",
        status,
        Code::PermissionDenied,
        &["downstream"],
    );

    node.terminate();
    assert_eq!(stored_ids(&node), ["shared-id", "app-1"]);
    let store = node.open_store();
    let (_, shared) = store.get_by_event_id("shared-id").unwrap().expect("stored");
    println!(
        "B's event after A reused its id: kind {:?}, gtin {}, category {:?}, text {:?}",
        shared.kind,
        shared.product.gtin.as_str(),
        shared.product.category,
        shared.text
    );
    assert_eq!(shared.kind, chainsight::domain::EventKind::Review);
    assert_eq!(shared.product.category, "dairy");
    assert_eq!(shared.product.gtin.as_str(), format!("0{DAIRY}"));
    let (_, own) = store.get_by_event_id("app-1").unwrap().expect("stored");
    println!(
        "A's own event: origin {:?}, path {:?}",
        own.origin, own.path
    );
    assert_eq!(own.origin, "retailer");
    assert_eq!(own.path, ["retailer"]);
    drop(store);
    let erasures: Vec<_> = audited(&node, "retailer-app")
        .into_iter()
        .filter(|r| r.kind == chainsight::audit::Kind::Erasure)
        .collect();
    assert!(erasures.is_empty(), "{erasures:?}");
}

/// Opens a backfill named `name` as `files`: where it started (the
/// x-start-cursor header) and the cursors it delivered.
async fn named_backfill(node: &NodeProc, files: &TlsFiles, name: &str) -> (u64, Vec<u64>) {
    let resp = common::subscribe(node, files, common::subscription(0, false, name)).await;
    let start = resp
        .metadata()
        .get("x-start-cursor")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("x-start-cursor");
    let mut stream = resp.into_inner();
    let mut cursors = Vec::new();
    while let Some(s) = stream.message().await.expect("signal") {
        cursors.push(s.cursor);
    }
    (start, cursors)
}

async fn ack(
    node: &NodeProc,
    files: &TlsFiles,
    name: &str,
    cursor: u64,
) -> Result<(), tonic::Status> {
    pb::signals_client::SignalsClient::new(node.channel(files).await.unwrap())
        .ack(pb::AckRequest {
            name: name.into(),
            cursor,
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_cursor_of_another_identity_is_neither_read_nor_moved() {
    let env = TestEnv::new();
    env.node_config(
        "retailer",
        &roles(&[
            "publishers = [\"retailer-eshop\"]",
            "subscribers = [\"maker-app\", \"maker-bi\"]",
        ]),
    );
    let mut node = env.start("retailer");
    let eshop = env.issue("retailer-eshop");
    let b = env.issue("maker-app");
    let a = env.issue("maker-bi");
    let events = (0..20)
        .map(|i| event_of(&format!("n-{i}"), DAIRY, pb::EventKind::Purchase, "c"))
        .collect();
    publish_all(&mut node.ingest(&eshop).await, events).await;

    // B reads and acknowledges up to 15 under "etl".
    let (start, cursors) = named_backfill(&node, &b, "etl").await;
    assert_eq!((start, cursors.len()), (0, 20));
    ack(&node, &b, "etl", 15).await.expect("B acknowledges");

    // A subscribes under the same name: A's own (empty) cursor, not B's.
    let (start, cursors) = named_backfill(&node, &a, "etl").await;
    println!(
        "A subscribing as \"etl\" after B acknowledged 15 there: starts after {start}, got cursors {}..={}",
        cursors.first().unwrap(),
        cursors.last().unwrap()
    );
    assert_eq!(start, 0, "A must not resume from B's cursor");
    assert_eq!(cursors, (1..=20).collect::<Vec<u64>>());

    // A acknowledges under the same name: moves A's cursor only.
    ack(&node, &a, "etl", 3)
        .await
        .expect("A acknowledges its own");
    // Names that spell B's identity are still A's names, or refused.
    ack(&node, &a, "maker-app/etl", 1)
        .await
        .expect("a name with a slash is a plain name of A's");
    assert_refused(
        "A acknowledging the name \"maker-app\\0etl\"",
        ack(&node, &a, "maker-app\0etl", 1).await,
        Code::InvalidArgument,
        &["name"],
    );
    let (b_start, b_cursors) = named_backfill(&node, &b, "etl").await;
    let (a_start, _) = named_backfill(&node, &a, "etl").await;
    println!("after A acknowledged 3 under \"etl\": B resumes after {b_start}, A after {a_start}");
    assert_eq!(b_start, 15, "A's acknowledgement moved B's cursor");
    assert_eq!(b_cursors, (16..=20).collect::<Vec<u64>>());
    assert_eq!(a_start, 3);

    node.terminate();
    let mut cursors = node.open_store().named_cursors().unwrap();
    cursors.sort();
    println!("named cursors in the store: {cursors:?}");
    assert_eq!(
        cursors,
        [
            ("maker-app".to_string(), "etl".to_string(), 15),
            ("maker-bi".to_string(), "etl".to_string(), 3),
            ("maker-bi".to_string(), "maker-app/etl".to_string(), 1),
        ]
    );
}

fn with_place(mut e: pb::CustomerEvent, postal_code: &str) -> pb::CustomerEvent {
    e.postal_code = postal_code.into();
    e
}

async fn backfill_ids(
    node: &NodeProc,
    files: &TlsFiles,
    filter: pb::Filter,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = pb::signals_client::SignalsClient::new(node.channel(files).await.unwrap());
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            filter: Some(filter),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(s) = stream.message().await? {
        ids.extend(s.event.map(|e| e.event_id));
    }
    Ok(ids)
}

async fn query(
    node: &NodeProc,
    files: &TlsFiles,
    filter: pb::Filter,
) -> Result<pb::InsightReport, tonic::Status> {
    pb::insights_client::InsightsClient::new(node.channel(files).await.unwrap())
        .query(pb::InsightQuery {
            filter: Some(filter),
            group_by: vec![pb::Dimension::Kind as i32],
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_identity_cannot_widen_its_filter_in_any_dimension() {
    let env = TestEnv::new();
    let limit = "[[filter_limit]]\nidentity = \"partner\"\ngtin_prefixes = [\"4740001\"]\n\
                 kinds = [\"review\"]\nregions = [\"EE-10\"]\n";
    env.node_config(
        "retailer",
        &format!(
            "{}{limit}",
            roles(&[
                "publishers = [\"retailer-eshop\"]",
                "subscribers = [\"partner\", \"maker-app\"]",
                "analysts = [\"partner\"]",
            ])
        ),
    );
    let node = env.start("retailer");
    let eshop = env.issue("retailer-eshop");
    let partner = env.issue("partner");
    let maker = env.issue("maker-app");
    let review = pb::EventKind::Review;
    publish_all(
        &mut node.ingest(&eshop).await,
        vec![
            with_place(event_of("inside", DAIRY, review, "c1"), "10115"),
            with_place(
                event_of("other-kind", DAIRY, pb::EventKind::Purchase, "c2"),
                "10115",
            ),
            with_place(event_of("other-gtin", WEAR, review, "c3"), "10115"),
            with_place(event_of("other-region", DAIRY, review, "c4"), "51003"),
        ],
    )
    .await;

    // An open request is narrowed to the limit in every dimension.
    let got = backfill_ids(&node, &partner, pb::Filter::default())
        .await
        .expect("open request");
    println!("limited A, open subscription: {got:?}");
    assert_eq!(got, ["inside"]);
    // A dimension the limit leaves open does not lift the others.
    let got = backfill_ids(
        &node,
        &partner,
        pb::Filter {
            categories: vec!["DAIRY".into()],
            channels: vec![pb::Channel::Web as i32],
            ..Default::default()
        },
    )
    .await
    .expect("category and channel are not limited");
    println!("limited A, categories [\"DAIRY\"] channels [WEB]: {got:?}");
    assert_eq!(got, ["inside"]);

    let wider: [(&str, pb::Filter, &str); 5] = [
        (
            "gtin_prefixes [\"474\"]",
            pb::Filter {
                gtin_prefixes: vec!["474".into()],
                ..Default::default()
            },
            "GTIN prefix \"474\"",
        ),
        (
            "kinds [REVIEW, PURCHASE]",
            pb::Filter {
                kinds: vec![review as i32, pb::EventKind::Purchase as i32],
                ..Default::default()
            },
            "kind Purchase",
        ),
        (
            "regions [\"EE\"] (the country around EE-10)",
            pb::Filter {
                regions: vec!["EE".into()],
                ..Default::default()
            },
            "region \"EE\"",
        ),
        (
            "regions [\"ee-10\", \"EE-51\"]",
            pb::Filter {
                regions: vec!["ee-10".into(), "EE-51".into()],
                ..Default::default()
            },
            "region \"EE-51\"",
        ),
        (
            "gtin_prefixes [\"4750002\"]",
            pb::Filter {
                gtin_prefixes: vec!["4750002".into()],
                ..Default::default()
            },
            "GTIN prefix \"4750002\"",
        ),
    ];
    for (what, filter, says) in wider {
        assert_refused(
            &format!("limited A subscribing with {what}"),
            backfill_ids(&node, &partner, filter.clone()).await,
            Code::PermissionDenied,
            &[says, "outside this identity's limit"],
        );
        assert_refused(
            &format!("limited A querying insights with {what}"),
            query(&node, &partner, filter).await,
            Code::PermissionDenied,
            &[says, "outside this identity's limit"],
        );
    }
    // The limit is A's only: B (unlimited) sees everything, so the
    // refusals above came from the limit.
    let got = backfill_ids(&node, &maker, pb::Filter::default())
        .await
        .expect("unlimited");
    assert_eq!(got.len(), 4, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_calls_need_their_role_or_the_nodes_own_certificate() {
    let env = TestEnv::new();
    env.node_config(
        "retailer",
        &roles(&[
            // A holds every role but analyst, operator and auditor.
            "publishers = [\"maker-app\"]",
            "subscribers = [\"maker-app\"]",
            "downstream = [\"maker-app\"]",
            "analysts = [\"analyst\"]",
            "auditors = [\"auditor\"]",
        ]),
    );
    let mut node = env.start("retailer");
    let a = env.issue("maker-app");
    publish_all(
        &mut node.ingest(&a).await,
        vec![event_of("op-1", DAIRY, pb::EventKind::Purchase, "c")],
    )
    .await;
    // Certificates that name the node, but not as their identity.
    let cn_is_node = crafted(&env, "cn-retailer", "retailer", &["impostor"]);
    let other_case = env.issue("Retailer");

    assert_refused(
        "A (no analyst role) calling Insights.Query",
        query(&node, &a, pb::Filter::default()).await,
        Code::PermissionDenied,
        &["\"maker-app\"", "analyst", "roles.analysts"],
    );
    let links = pb::peering_client::PeeringClient::new(node.channel(&a).await.unwrap())
        .links(pb::LinksRequest {})
        .await;
    assert_refused(
        "A (downstream, no operators role) calling Peering.Links",
        links,
        Code::PermissionDenied,
        &["\"maker-app\"", "operator", "roles.operators"],
    );
    for identity in ["maker-app", "auditor"] {
        let listed = pb::audit_client::AuditClient::new(node.channel(&a).await.unwrap())
            .list(pb::AuditListRequest {
                identity: identity.into(),
                ..Default::default()
            })
            .await;
        assert_refused(
            &format!("A calling Audit.List with identity {identity:?}"),
            listed,
            Code::PermissionDenied,
            &["\"maker-app\"", "auditor", "roles.auditors"],
        );
    }
    for (who, files, identity) in [
        ("A", &a, "maker-app"),
        (
            "a certificate with CN=retailer, SAN impostor",
            &cn_is_node,
            "impostor",
        ),
        ("a certificate for \"Retailer\"", &other_case, "Retailer"),
    ] {
        let mut admin = pb::admin_client::AdminClient::new(node.channel(files).await.unwrap());
        let says = [format!("{identity:?}"), "roles.operators".to_string()];
        let says: Vec<&str> = says.iter().map(String::as_str).collect();
        assert_refused(
            &format!("{who} calling Admin.Reload"),
            admin.reload(pb::ReloadRequest {}).await,
            Code::PermissionDenied,
            &says,
        );
        assert_refused(
            &format!("{who} calling Admin.Backup"),
            admin.backup(pb::BackupRequest {}).await.map(|_| ()),
            Code::PermissionDenied,
            &says,
        );
    }

    // The node's own certificate and the operator get through, so the
    // refusals were not a broken service.
    let own = files_of(&env, "retailer");
    pb::admin_client::AdminClient::new(node.channel(&own).await.unwrap())
        .reload(pb::ReloadRequest {})
        .await
        .expect("the node's own certificate may reload");
    let mut chunks =
        pb::admin_client::AdminClient::new(node.channel(&env.issue("operator")).await.unwrap())
            .backup(pb::BackupRequest {})
            .await
            .expect("the operator may take a backup")
            .into_inner();
    let mut bytes = 0;
    while let Some(chunk) = chunks.message().await.expect("backup chunk") {
        bytes += chunk.data.len();
    }
    assert!(bytes > 0);

    node.terminate();
    for identity in ["maker-app", "impostor", "Retailer"] {
        let records: Vec<_> = audited(&node, identity)
            .into_iter()
            .filter(|r| r.kind != chainsight::audit::Kind::Forward)
            .collect();
        println!("audit records of {identity:?}: {}", records.len());
        assert!(records.is_empty(), "{identity}: {records:?}");
    }
    let admin = [audited(&node, "retailer"), audited(&node, "operator")]
        .concat()
        .into_iter()
        .filter(|r| r.kind == chainsight::audit::Kind::Admin)
        .count();
    assert_eq!(admin, 2, "the reload and the backup are audited");
}

/// Tries to publish one event as `files`; the status if refused, at the
/// connection or by the service.
async fn try_publish(node: &NodeProc, files: &TlsFiles, id: &str) -> Result<(), tonic::Status> {
    let channel = match node.channel(files).await {
        Ok(c) => c,
        Err(e) => return Err(tonic::Status::unavailable(e.to_string())),
    };
    let results = pb::ingest_client::IngestClient::new(channel)
        .publish(pb::PublishRequest {
            events: vec![event_of(id, DAIRY, pb::EventKind::Purchase, "c")],
        })
        .await?
        .into_inner()
        .results;
    panic!("{id}: published as {:?}: {results:?}", files.cert);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_is_the_first_dns_name_never_the_common_name_or_a_later_name() {
    let env = TestEnv::new();
    env.node_config("retailer", &roles(&["publishers = [\"retailer-eshop\"]"]));
    let mut node = env.start("retailer");
    let cn_only = crafted(&env, "cn-only", "retailer-eshop", &[]);
    let cn_publisher = crafted(&env, "cn-eshop", "retailer-eshop", &["nobody"]);
    let second_san = crafted(&env, "second-san", "nobody", &["nobody", "retailer-eshop"]);

    // Only the CN names the publisher: no identity, the connection is dropped.
    let refused = try_publish(&node, &cn_only, "cn-only").await.unwrap_err();
    println!(
        "CN=retailer-eshop without a DNS SAN publishing: {:?}: {}",
        refused.code(),
        refused.message()
    );
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{refused:?}"
    );
    assert_refused(
        "CN=retailer-eshop, SAN nobody publishing",
        try_publish(&node, &cn_publisher, "cn-eshop").await,
        Code::PermissionDenied,
        &["\"nobody\"", "publisher"],
    );
    assert_refused(
        "SANs [nobody, retailer-eshop] publishing",
        try_publish(&node, &second_san, "second-san").await,
        Code::PermissionDenied,
        &["\"nobody\"", "publisher"],
    );
    // The publisher itself can, so the node was serving.
    let eshop = env.issue("retailer-eshop");
    publish_all(
        &mut node.ingest(&eshop).await,
        vec![event_of("real", DAIRY, pb::EventKind::Purchase, "c")],
    )
    .await;

    node.terminate();
    assert!(
        node.log()
            .contains("client certificate has no DNS SAN identity"),
        "{}",
        node.log()
    );
    assert_eq!(stored_ids(&node), ["real"]);
}

/// `ev` signed with `key_of`'s key under the certificate `cert_of`
/// (normally the same name: a node signs its own events).
fn signed(
    env: &TestEnv,
    ev: pb::PreferenceEvent,
    cert_of: &str,
    key_of: &str,
) -> pb::PreferenceEvent {
    let cert = chainsight::tls::load_certs(&files_of(env, cert_of).cert).unwrap();
    let key = chainsight::tls::load_key(&files_of(env, key_of).key).unwrap();
    let signer = chainsight::origin::Signer::new(cert[0].clone(), &key).unwrap();
    let mut ev = chainsight::conversions::preference_event_from_pb(ev).unwrap();
    ev.proof = Some(signer.sign(&ev).unwrap());
    chainsight::conversions::preference_event_to_pb(&ev)
}

fn cert_der(env: &TestEnv, name: &str) -> Vec<u8> {
    chainsight::tls::load_certs(&files_of(env, name).cert).unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_sign_events_as_their_origin() {
    let env = TestEnv::new();
    env.node_config(
        "manufacturer",
        &format!(
            "{}[trust]\nrequire_origin_signature = true\n",
            roles(&["downstream = [\"wholesaler\"]"])
        ),
    );
    let mut node = env.start("manufacturer");
    let wholesaler = env.issue("wholesaler");
    env.issue("retailer");
    let relayed = |id: &str| forwarded(id, "retailer", &["retailer", "wholesaler"], "dairy");

    // Claims origin retailer, signed with A's own certificate and key.
    let own_cert = signed(&env, relayed("own-cert"), "wholesaler", "wholesaler");
    // Claims origin retailer, names the retailer's certificate, signed with A's key.
    let their_cert = signed(&env, relayed("their-cert"), "retailer", "wholesaler");
    // A's own event, honestly signed.
    let honest = signed(
        &env,
        forwarded("honest", "wholesaler", &["wholesaler"], "dairy"),
        "wholesaler",
        "wholesaler",
    );
    let acks = forward(
        &node,
        &wholesaler,
        vec![pb::ForwardBatch {
            batch_id: 1,
            events: vec![own_cert, their_cert, honest],
            certificates: vec![cert_der(&env, "wholesaler"), cert_der(&env, "retailer")],
        }],
    )
    .await
    .expect("forward");
    let ack = &acks[0];
    println!(
        "A forwarding 2 events signed by itself claiming origin retailer + 1 own: stored {}, refused {}, dropped {}",
        ack.stored, ack.refused, ack.dropped
    );
    assert_eq!((ack.stored, ack.refused, ack.dropped), (1, 2, 0), "{ack:?}");

    node.terminate();
    let log = node.log();
    for reason in [
        "the origin's certificate is for \\\"wholesaler\\\", the event claims origin \\\"retailer\\\"",
        "the signature does not verify",
    ] {
        let found = log.contains(reason) || log.contains(&reason.replace("\\\"", "\""));
        println!("node log names {reason:?}: {found}");
        assert!(found, "no {reason:?} in the log:\n{log}");
    }
    assert_eq!(stored_ids(&node), ["honest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstreams_erasure_cannot_reach_this_nodes_own_events() {
    let env = TestEnv::new();
    env.node_config(
        "distributor",
        &roles(&[
            "publishers = [\"dist-eshop\"]",
            "downstream = [\"wholesaler\"]",
        ]),
    );
    let mut node = env.start("distributor");
    let eshop = env.issue("dist-eshop");
    let wholesaler = env.issue("wholesaler");
    publish_all(
        &mut node.ingest(&eshop).await,
        vec![event_of("local-1", DAIRY, pb::EventKind::Purchase, "c1")],
    )
    .await;
    let acks = forward(
        &node,
        &wholesaler,
        vec![batch(
            1,
            vec![forwarded("w-1", "wholesaler", &["wholesaler"], "dairy")],
        )],
    )
    .await
    .expect("A forwards its own event");
    assert_eq!(acks[0].stored, 1);

    // A names an event published here (origin = this node, so no
    // downstream carried it) and an id this node's publisher has not used yet.
    let mut peering =
        pb::peering_client::PeeringClient::new(node.channel(&wholesaler).await.unwrap());
    let answer = peering
        .erase(pb::ErasureForward {
            erasure_id: "w-erasure-1".into(),
            customer_pseudonym: String::new(),
            event_ids: vec!["local-1".into(), "local-2".into()],
        })
        .await;
    match &answer {
        Ok(ack) => println!(
            "A erasing [\"local-1\", \"local-2\"] (this node's own): OK, erased_events {}",
            ack.get_ref().erased_events
        ),
        Err(s) => println!(
            "A erasing [\"local-1\", \"local-2\"] (this node's own): {:?}: {}",
            s.code(),
            s.message()
        ),
    }
    let results = publish(
        &mut node.ingest(&eshop).await,
        vec![event_of("local-2", DAIRY, pb::EventKind::Purchase, "c2")],
    )
    .await;
    println!(
        "this node's publisher then publishing \"local-2\": {:?}",
        outcome(&results[0])
    );
    // A's own event can be erased by A.
    let own = peering
        .erase(pb::ErasureForward {
            erasure_id: "w-erasure-2".into(),
            customer_pseudonym: String::new(),
            event_ids: vec!["w-1".into()],
        })
        .await
        .expect("A erases its own event");
    assert_eq!(own.get_ref().erased_events, 1);

    node.terminate();
    let ids = stored_ids(&node);
    println!("stored after A's erasures: {ids:?}");
    // Refusing the request or erasing nothing of this node's are both right.
    if let Ok(ack) = &answer {
        assert_eq!(ack.get_ref().erased_events, 0, "A erased this node's event");
    }
    assert_eq!(
        outcome(&results[0]),
        pb::PublishOutcome::Accepted,
        "A's erasure tombstoned an id of this node's publisher"
    );
    assert_eq!(ids, ["local-1", "local-2"]);
}
