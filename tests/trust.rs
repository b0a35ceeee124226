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
    assert_eq!(store.len(), 200);
    for item in store.scan_after(0) {
        let (_, ev) = item.unwrap();
        assert!(ev.text.is_empty() && ev.region.is_empty() && ev.attributes.is_empty());
        let proof = ev.proof.as_ref().expect("signed");
        let withheld: HashSet<&str> = proof
            .fields
            .iter()
            .filter(|f| f.salt.is_none())
            .map(|f| f.name.as_str())
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
    publish_all(&mut r.ingest(&eshop).await, events(3)).await;
    r.terminate();
    let store = r.open_store();
    let signed: Vec<_> = store.scan_after(0).map(|item| item.unwrap().1).collect();
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
    let batch = pb::ForwardBatch {
        batch_id: 1,
        events: vec![honest, altered, stripped],
        certificates: vec![certificate],
    };
    let mut acks = pb::peering_client::PeeringClient::new(m.channel(&relay).await.unwrap())
        .forward(futures::stream::iter(vec![batch]))
        .await
        .expect("forward")
        .into_inner();
    let ack = acks.message().await.expect("ack").expect("one ack");
    assert_eq!((ack.stored, ack.refused, ack.dropped), (1, 2, 0), "{ack:?}");
    m.terminate();
    let log = m.log();
    assert!(
        log.contains("field product.category does not match what the origin signed"),
        "{log}"
    );
    assert!(log.contains("the event carries no origin proof"), "{log}");
    let store = m.open_store();
    assert_eq!(store.len(), 1);
    assert!(store
        .get_by_event_id(&signed[0].event_id)
        .unwrap()
        .is_some());
}
