//! Trust across the chain: events signed at the origin verify two hops
//! away with fields withheld on the way; a relay that alters a field is
//! caught and refused where signatures are required.

mod common;

use std::collections::HashSet;

use chainsight::pb;
use common::{event_of, publish_all, roles, upstream, TestEnv};

const DAIRY: &str = "4740001000017";
const REQUIRE: &str = "[trust]\nrequire_origin_signature = true\n";

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(args)
        .output()
        .expect("run chainsight")
}

/// Events with a review text, an attribute and a region to withhold.
fn events(n: usize) -> Vec<pb::CustomerEvent> {
    (0..n)
        .map(|i| {
            let mut e = event_of(
                &format!("t-{i}"),
                DAIRY,
                pb::EventKind::Review,
                &format!("c-{}", i % 23),
            );
            e.attributes
                .insert("size".into(), ["S", "M", "L"][i % 3].into());
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_at_the_retailer_with_fields_withheld_on_the_way_verifies_at_the_manufacturer() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let (m_port, d_port) = (env.reserve_port(), env.reserve_port());
    env.node_config_on(
        "manufacturer",
        m_port,
        &format!("{}{REQUIRE}", roles(&["downstream = [\"distributor\"]"])),
    );
    let mut m = env.start("manufacturer");
    env.node_config_on(
        "distributor",
        d_port,
        &format!(
            "{}{}{REQUIRE}",
            roles(&["downstream = [\"retailer\"]"]),
            upstream(
                "manufacturer",
                m_port,
                "drop_fields = [\"text\", \"region\", \"attributes\"]"
            ),
        ),
    );
    let mut d = env.start("distributor");
    env.node_config(
        "retailer",
        &format!(
            "{}{}",
            roles(&["publishers = [\"eshop\"]"]),
            upstream("distributor", d_port, "")
        ),
    );
    let mut r = env.start("retailer");
    let eshop = env.issue("eshop");
    publish_all(&mut r.ingest(&eshop).await, events(200)).await;
    r.wait_drained(&operator, 200).await;
    d.wait_drained(&operator, 200).await;
    for n in [&mut r, &mut d, &mut m] {
        n.terminate();
    }
    assert!(
        !m.log().contains("refused a forwarded event"),
        "{}",
        m.log()
    );

    // At the manufacturer: every event, withheld fields gone, and proofs
    // whose withheld fields lost their salts.
    let store = m.open_store();
    assert_eq!(store.len().unwrap(), 200);
    for item in store.scan_after(0) {
        let (_, ev) = item.unwrap();
        assert!(ev.text.is_empty() && ev.region.is_empty() && ev.attributes.is_empty());
        let proof = ev.proof.as_ref().expect("signed");
        let chainsight::origin::ProofForm::Expanded(entries) = &proof.form else {
            panic!("fields were withheld: the proof is expanded");
        };
        let withheld: HashSet<&str> = entries
            .iter()
            .filter(|e| matches!(e.part, chainsight::origin::FieldPart::Withheld(_)))
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            withheld,
            HashSet::from(["text", "region", "attributes.size"])
        );
    }
    drop(store);
    // `chainsight verify` over the manufacturer's store: all verify.
    let config = env.path().join("manufacturer/node.toml");
    let out = cli(&[
        "verify",
        "--config",
        config.to_str().unwrap(),
        "--require-signed",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        said.contains("200 verified, 0 unsigned, 0 failed"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_alters_a_field_is_refused_where_signatures_are_required() {
    let env = TestEnv::new();
    // The retailer signs; its events are then replayed by a test "relay".
    env.node_config("retailer", &roles(&["publishers = [\"eshop\"]"]));
    let mut r = env.start("retailer");
    let eshop = env.issue("eshop");
    publish_all(&mut r.ingest(&eshop).await, events(4)).await;
    r.terminate();
    let store = r.open_store();
    let signed: Vec<_> = store.scan_after(0).map(|item| item.unwrap().1).collect();
    // One request, one signature: each event carries its place in the batch.
    for (i, ev) in signed.iter().enumerate() {
        let proof = ev.proof.as_ref().expect("signed");
        let at = proof.batch.as_ref().expect("signed as a batch");
        assert_eq!((at.index, at.size), (i as u32, 4));
        assert_eq!(proof.signature, signed[0].proof.as_ref().unwrap().signature);
    }
    let certificate = store
        .certificate(&signed[0].proof.as_ref().unwrap().certificate)
        .unwrap()
        .expect("the retailer keeps its own certificate");
    drop(store);

    env.node_config(
        "manufacturer",
        &format!("{}{REQUIRE}", roles(&["downstream = [\"relay\"]"])),
    );
    let mut m = env.start("manufacturer");
    let relay = env.issue("relay");
    let outgoing = |ev: &chainsight::domain::PreferenceEvent| {
        let mut pb = chainsight::conversions::preference_event_to_pb(ev);
        pb.path.push("relay".into());
        pb
    };
    let honest = outgoing(&signed[0]);
    let mut altered = outgoing(&signed[1]);
    altered.product.as_mut().unwrap().category = "premium dairy".into();
    let mut stripped = outgoing(&signed[2]);
    stripped.origin_proof = None;
    // A batch path one hash short: not a well-formed proof, dropped.
    let mut short = outgoing(&signed[3]);
    short
        .origin_proof
        .as_mut()
        .unwrap()
        .batch
        .as_mut()
        .unwrap()
        .path
        .pop();
    let batch = pb::ForwardBatch {
        batch_id: 1,
        events: vec![honest, altered, stripped, short],
        certificates: vec![certificate],
    };
    let mut acks = pb::peering_client::PeeringClient::new(m.channel(&relay).await.unwrap())
        .forward(futures::stream::iter(vec![batch]))
        .await
        .expect("forward")
        .into_inner();
    let ack = acks.message().await.expect("ack").expect("one ack");
    assert_eq!((ack.stored, ack.refused, ack.dropped), (1, 2, 1), "{ack:?}");
    m.terminate();
    let log = m.log();
    assert!(
        log.contains("a field was changed, added or removed on the way"),
        "{log}"
    );
    assert!(log.contains("the event carries no origin proof"), "{log}");
    assert!(
        log.contains("origin_proof.batch.path: leaf 3 of 4 needs 2 hashes, got 1"),
        "{log}"
    );
    let store = m.open_store();
    assert_eq!(store.len().unwrap(), 1);
    assert!(store
        .get_by_event_id(&signed[0].event_id)
        .unwrap()
        .is_some());
}

async fn by_kind(
    node: &common::NodeProc,
    analyst: &chainsight::config::TlsFiles,
) -> Vec<(String, u64, u64)> {
    let report = pb::insights_client::InsightsClient::new(node.channel(analyst).await.unwrap())
        .query(pb::InsightQuery {
            group_by: vec![pb::Dimension::Kind as i32],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    assert_eq!(report.suppressed_groups, 0);
    let mut rows: Vec<_> = report
        .rows
        .into_iter()
        .map(|r| (r.key[0].clone(), r.events, r.customers))
        .collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_customer_reaches_every_hop_rollups_included_even_past_a_hop_that_was_down() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let analyst = env.issue("analyst");
    let app = env.issue("maker-app");
    let eshop = env.issue("eshop");
    let (m_port, d_port) = (env.reserve_port(), env.reserve_port());
    let k1 = "[privacy]\nk_min = 1\n";
    env.node_config_on(
        "manufacturer",
        m_port,
        &format!(
            "{}{k1}",
            roles(&[
                "downstream = [\"distributor\"]",
                "analysts = [\"analyst\"]",
                "subscribers = [\"maker-app\"]",
            ])
        ),
    );
    let mut m = env.start("manufacturer");
    env.node_config_on(
        "distributor",
        d_port,
        &format!(
            "{}{k1}{}",
            roles(&["downstream = [\"retailer\"]", "analysts = [\"analyst\"]"]),
            upstream("manufacturer", m_port, "")
        ),
    );
    let mut d = env.start("distributor");
    env.node_config(
        "retailer",
        &format!(
            "{}{k1}{}",
            roles(&["publishers = [\"eshop\"]", "analysts = [\"analyst\"]"]),
            upstream("distributor", d_port, "")
        ),
    );
    let mut r = env.start("retailer");
    let events: Vec<_> = (0..240)
        .map(|i| {
            event_of(
                &format!("x-{i}"),
                DAIRY,
                [pb::EventKind::Review, pb::EventKind::Purchase][i % 2],
                &format!("c-{}", i % 12),
            )
        })
        .collect();
    let erased_ids: Vec<String> = events
        .iter()
        .filter(|e| e.customer_id == "c-3")
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(erased_ids.len(), 20);
    publish_all(&mut r.ingest(&eshop).await, events).await;
    r.wait_drained(&operator, 240).await;
    d.wait_drained(&operator, 240).await;
    let before = by_kind(&m, &analyst).await;
    // Even i: reviews by the even customers; odd i: purchases by the odd.
    assert_eq!(
        before,
        [
            ("purchase".to_string(), 120, 6),
            ("review".to_string(), 120, 6)
        ]
    );
    // c-3's 20 events are purchases (i % 12 == 3 means i is odd): exactly
    // 20 purchase events and one customer go, reviews stay as they were.
    let expected_after = [
        ("purchase".to_string(), 100, 5),
        ("review".to_string(), 120, 6),
    ];

    // The distributor is down when the erasure is asked for.
    d.terminate();
    let dir = tempfile::tempdir().unwrap();
    let client = r.write_client_toml(dir.path(), &eshop);
    let client = client.to_str().unwrap();
    let out = cli(&["erase", "--config", client, "--customer-id", "c-3"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(
        said.contains("20 events erased here; passed on to distributor"),
        "{said}"
    );
    let id = said
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    assert_eq!(
        by_kind(&r, &analyst).await,
        expected_after,
        "at the retailer"
    );
    let out = cli(&["erasure", "status", &id, "--config", client, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "pending while a hop is down: {out:?}"
    );
    let status: pb::ErasureStatusResponse = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<(String, i32)> = status
        .hops
        .iter()
        .map(|h| (h.node.clone(), h.state))
        .collect();
    assert_eq!(
        states,
        [
            ("retailer".to_string(), pb::ErasureState::Confirmed as i32),
            ("distributor".to_string(), pb::ErasureState::Pending as i32)
        ]
    );

    // The hop comes back: the erasure completes, hop by hop.
    d.restart();
    let start = std::time::Instant::now();
    let status = loop {
        let out = cli(&["erasure", "status", &id, "--config", client, "--json"]);
        if out.status.success() {
            break serde_json::from_slice::<pb::ErasureStatusResponse>(&out.stdout).unwrap();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "erasure did not complete: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            d.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let hops: Vec<(String, u64)> = status
        .hops
        .iter()
        .map(|h| (h.node.clone(), h.erased_events))
        .collect();
    assert_eq!(
        hops,
        [
            ("retailer".to_string(), 20),
            ("distributor".to_string(), 20),
            ("manufacturer".to_string(), 20)
        ]
    );
    assert_eq!(
        by_kind(&d, &analyst).await,
        expected_after,
        "at the distributor"
    );
    assert_eq!(
        by_kind(&m, &analyst).await,
        expected_after,
        "at the manufacturer"
    );

    // Subscribers at the manufacturer learn which events to delete.
    let mut stream = pb::signals_client::SignalsClient::new(m.channel(&app).await.unwrap())
        .subscribe(pb::SubscribeRequest {
            filter: Some(pb::Filter::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut events_seen, mut erasures) = (0, Vec::new());
    while let Some(s) = stream.message().await.unwrap() {
        match (s.event, s.erasure) {
            (Some(ev), None) => {
                assert!(!erased_ids.contains(&ev.event_id));
                events_seen += 1;
            }
            (None, Some(e)) => erasures.push(e),
            other => panic!("a signal is an event or an erasure: {other:?}"),
        }
    }
    assert_eq!(events_seen, 220);
    assert_eq!(erasures.len(), 1);
    assert_eq!(erasures[0].erasure_id, id);
    let mut signalled = erasures[0].event_ids.clone();
    signalled.sort();
    let mut expected = erased_ids.clone();
    expected.sort();
    assert_eq!(signalled, expected);

    // Nothing of c-3 is stored anywhere, and the rest is.
    for n in [&mut r, &mut d, &mut m] {
        n.terminate();
        let store = n.open_store();
        assert_eq!(store.len().unwrap(), 220, "{}", n.id);
        for id in &erased_ids {
            assert!(
                store.get_by_event_id(id).unwrap().is_none(),
                "{id} at {}",
                n.id
            );
        }
    }
}

async fn ask(
    node: &common::NodeProc,
    files: &chainsight::config::TlsFiles,
    query: &pb::InsightQuery,
) -> Result<pb::InsightReport, tonic::Status> {
    pb::insights_client::InsightsClient::new(node.channel(files).await.unwrap())
        .query(query.clone())
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_budget_is_spent_per_query_refused_past_it_and_noise_has_the_documented_scale() {
    let env = TestEnv::new();
    let eshop = env.issue("eshop");
    let (analyst, partner, stat) = (
        env.issue("analyst"),
        env.issue("partner"),
        env.issue("stat"),
    );
    env.node_config(
        "retailer",
        &format!(
            "{}[privacy]\nk_min = 1\n\
             [[dp_budget]]\nidentity = \"partner\"\nepsilon_per_period = 0.3\nepsilon_per_query = 0.1\nperiod = \"1d\"\n\
             [[dp_budget]]\nidentity = \"stat\"\nepsilon_per_period = 1000000.0\nepsilon_per_query = 0.9\nmax_events_per_customer = 2\n",
            roles(&[
                "publishers = [\"eshop\"]",
                "analysts = [\"analyst\", \"partner\", \"stat\"]",
            ])
        ),
    );
    let mut r = env.start("retailer");
    // 500 customers with 2 events each (the stat analyst's contribution
    // bound): far above the release threshold, whatever the noise.
    let events: Vec<_> = (0..1000)
        .map(|i| {
            event_of(
                &format!("p-{i}"),
                DAIRY,
                pb::EventKind::Purchase,
                &format!("c-{}", i % 500),
            )
        })
        .collect();
    publish_all(&mut r.ingest(&eshop).await, events).await;
    let query = pb::InsightQuery {
        group_by: vec![pb::Dimension::Category as i32],
        ..Default::default()
    };
    let exact = ask(&r, &analyst, &query).await.expect("exact");
    // 500 customers: counted by a sketch (about 500, within 4 of its
    // documented standard errors, 1.04/√2^HLL_P), the events exactly. The
    // pseudonym key is random per node, so the estimate differs per run.
    assert_eq!((exact.rows[0].events, exact.epsilon), (1000, 0.0));
    let sigma = 1.04 / f64::from(1u32 << chainsight::rollup::HLL_P).sqrt();
    let off = (exact.rows[0].customers as f64 - 500.0).abs();
    assert!(off <= 4.0 * sigma * 500.0, "{exact:?}");

    // The partner's budget: three queries of 0.1 in 0.3, then refused.
    for _ in 0..3 {
        let noisy = ask(&r, &partner, &query).await.expect("within budget");
        assert_eq!(noisy.epsilon, 0.1);
    }
    let refused = ask(&r, &partner, &query)
        .await
        .expect_err("past the budget");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("renews at"), "{refused:?}");
    // Spent is spent: a restart does not renew it.
    r.terminate();
    r.restart();
    let refused = ask(&r, &partner, &query)
        .await
        .expect_err("still past the budget");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

    // The noise of the events count has the documented variance.
    let mech = chainsight::dp::Mechanism {
        epsilon: 0.9,
        max_events_per_customer: 2,
        delta: 1e-6,
    };
    // 500 customers clear the release threshold for ε 0.9 (0.1 per sum).
    assert!(
        mech.release_threshold() < 150,
        "{}",
        mech.release_threshold()
    );
    let runs = 600;
    let mut values = Vec::with_capacity(runs);
    for _ in 0..runs {
        let noisy = ask(&r, &stat, &query).await.expect("stat");
        assert_eq!(noisy.epsilon, 0.9);
        values.push(noisy.rows[0].events as f64);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let expected = mech.variance(mech.events_sensitivity());
    println!("events: mean {mean:.1} (true 1000), variance {var:.0} (theory {expected:.0}) over {runs} answers");
    assert!(
        (var / expected - 1.0).abs() < 0.35,
        "empirical variance {var:.0} vs theoretical {expected:.0}"
    );
    assert!(
        (mean - 1000.0).abs() < 4.0 * (expected / n).sqrt(),
        "mean {mean:.1} is not centred on 1000"
    );
}
