//! The audit trail: forwards, subscriptions and queries are recorded,
//! hash-chained; only auditors may read it; a flipped byte is found.

mod common;

use std::time::{Duration, Instant};

use chainsight::pb;
use common::{event_of, publish_all, roles, upstream, TestEnv};
use tonic::transport::Channel;

const DAIRY: &str = "4740001000017";

async fn audit_list(
    channel: Channel,
    request: pb::AuditListRequest,
) -> Result<Vec<pb::AuditRecord>, tonic::Status> {
    let mut stream = pb::audit_client::AuditClient::new(channel)
        .list(request)
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await? {
        out.push(r);
    }
    Ok(out)
}

fn detail(r: &pb::AuditRecord) -> serde_json::Value {
    serde_json::from_str(&r.detail).expect("detail is JSON")
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(args)
        .output()
        .expect("run chainsight")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_subscriptions_and_queries_are_audited_and_tampering_is_found() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let m_port = env.reserve_port();
    env.node_config_on(
        "manufacturer",
        m_port,
        &roles(&["downstream = [\"retailer\"]"]),
    );
    let _m = env.start("manufacturer");
    env.node_config(
        "retailer",
        &format!(
            "{}{}",
            roles(&[
                "publishers = [\"eshop\"]",
                "subscribers = [\"maker-app\"]",
                "analysts = [\"analyst\"]",
                "auditors = [\"auditor\"]",
            ]),
            upstream("manufacturer", m_port, "drop_fields = [\"text\"]")
        ),
    );
    let mut r = env.start("retailer");
    let (eshop, app, analyst, auditor) = (
        env.issue("eshop"),
        env.issue("maker-app"),
        env.issue("analyst"),
        env.issue("auditor"),
    );

    let events: Vec<_> = (0..300)
        .map(|i| {
            event_of(
                &format!("a-{i}"),
                DAIRY,
                pb::EventKind::Review,
                &format!("c-{}", i % 40),
            )
        })
        .collect();
    publish_all(&mut r.ingest(&eshop).await, events).await;
    r.wait_drained(&operator, 300).await;

    // A query and a subscription.
    let report = pb::insights_client::InsightsClient::new(r.channel(&analyst).await.unwrap())
        .query(pb::InsightQuery {
            group_by: vec![pb::Dimension::Category as i32],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    let mut stream = pb::signals_client::SignalsClient::new(r.channel(&app).await.unwrap())
        .subscribe(pb::SubscribeRequest {
            filter: Some(pb::Filter::default()),
            name: "audit-test".into(),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut signals = 0;
    while stream.message().await.expect("signal").is_some() {
        signals += 1;
    }
    assert_eq!(signals, 300);

    // Only an auditor may read the trail.
    let denied = audit_list(r.channel(&analyst).await.unwrap(), Default::default())
        .await
        .expect_err("analyst reads the audit trail");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("roles.auditors"), "{denied:?}");

    // The subscription is recorded when its stream ends, just after.
    let start = Instant::now();
    let records = loop {
        let records = audit_list(r.channel(&auditor).await.unwrap(), Default::default())
            .await
            .expect("auditor lists");
        if records
            .iter()
            .any(|r| r.kind == pb::AuditKind::Subscription as i32)
        {
            break records;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no subscription record: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let of = |kind: pb::AuditKind| -> Vec<&pb::AuditRecord> {
        records.iter().filter(|r| r.kind == kind as i32).collect()
    };
    let forwards = of(pb::AuditKind::Forward);
    assert!(!forwards.is_empty());
    let forwarded: u64 = forwards
        .iter()
        .map(|r| {
            assert_eq!(r.identity, "manufacturer");
            let d = detail(r);
            assert_eq!(d["link"], "manufacturer");
            assert_eq!(d["agreement"]["drop_fields"], serde_json::json!(["text"]));
            d["stored"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(forwarded, 300, "every forwarded event in a forward record");
    let queries = of(pb::AuditKind::Query);
    assert_eq!(queries.len(), 1);
    assert_eq!(queries[0].identity, "analyst");
    let q = detail(queries[0]);
    assert_eq!(
        q["groups_returned"].as_u64(),
        Some(report.rows.len() as u64)
    );
    assert_eq!(
        q["groups_suppressed"].as_u64(),
        Some(u64::from(report.suppressed_groups))
    );
    assert_eq!(
        q["query"]["groupBy"],
        serde_json::json!(["DIMENSION_CATEGORY"])
    );
    let subs = of(pb::AuditKind::Subscription);
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].identity, "maker-app");
    let s = detail(subs[0]);
    assert_eq!(s["name"], "audit-test");
    assert_eq!(s["signals_sent"].as_u64(), Some(300));
    assert_eq!(s["ended"], "caught up");
    // Numbered from 1 without gaps, in time order.
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
    }

    // The CLI lists with filters and verifies the fetched chain itself.
    let dir = tempfile::tempdir().unwrap();
    let client_toml = r.write_client_toml(dir.path(), &auditor);
    let client_toml = client_toml.to_str().unwrap();
    let out = cli(&[
        "audit",
        "--config",
        client_toml,
        "--identity",
        "analyst",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<pb::AuditRecord> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("proto3 JSON line"))
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], *queries[0]);
    let out = cli(&["audit", "--config", client_toml, "--kind", "subscription"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("maker-app") && !table.contains("analyst"),
        "{table}"
    );
    let out = cli(&["audit", "verify", "--config", client_toml]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("intact"), "{out:?}");

    // Offline, on the stopped node's data directory: intact, then a byte
    // flipped in one stored record breaks the chain right there.
    r.terminate();
    let data_dir = r.data_dir();
    let data = data_dir.to_str().unwrap();
    let out = cli(&["audit", "verify", "--data-dir", data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        said.contains(&format!("{} records", records.len())),
        "{said}"
    );
    let target = 2u64;
    {
        let db = sled::open(data_dir.join("store")).unwrap();
        let tree = db.open_tree("audit").unwrap();
        let mut value = tree.get(target.to_be_bytes()).unwrap().unwrap().to_vec();
        // A byte of the detail text: still decodes, no longer matches.
        let at = value.len() / 2;
        value[at] ^= 0x01;
        tree.insert(target.to_be_bytes(), value).unwrap();
        #[allow(clippy::disallowed_methods, reason = "the test's own blocking write")]
        db.flush().unwrap();
    }
    let out = cli(&["audit", "verify", "--data-dir", data]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tampered trail verified: {out:?}");
    assert!(said.contains("BROKEN at audit record 2"), "{said}");
}
