//! Upstream propagation over a real chain of node processes: exactly once,
//! with the right path, only what each link's agreement allows.

mod common;

use std::collections::{HashMap, HashSet};

use chainsight::domain::EventKind;
use chainsight::pb;
use common::{event_of, publish_all, roles, upstream, TestEnv};

const DAIRY_A: &str = "4740001000017";
const DAIRY_B: &str = "4740001000024";
const WEAR_A: &str = "4750002000015";
const WEAR_B: &str = "4750002000022";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retailer_to_distributor_to_manufacturer_exactly_once_with_path() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let m_port = env.reserve_port();
    let d_port = env.reserve_port();
    env.node_config_on(
        "manufacturer",
        m_port,
        &roles(&["downstream = [\"distributor\"]"]),
    );
    let mut m = env.start("manufacturer");
    env.node_config_on(
        "distributor",
        d_port,
        &format!(
            "{}{}",
            roles(&["downstream = [\"retailer\"]"]),
            upstream("manufacturer", m_port, "")
        ),
    );
    let mut d = env.start("distributor");
    env.node_config(
        "retailer",
        &format!(
            "{}{}",
            roles(&["publishers = [\"retailer-eshop\"]"]),
            upstream("distributor", d_port, "")
        ),
    );
    let mut r = env.start("retailer");
    let eshop = env.issue("retailer-eshop");

    let kinds = [
        pb::EventKind::Purchase,
        pb::EventKind::Review,
        pb::EventKind::Nps,
        pb::EventKind::Return,
    ];
    let gtins = [DAIRY_A, DAIRY_B, WEAR_A, WEAR_B];
    let events: Vec<_> = (0..1200)
        .map(|i| {
            event_of(
                &format!("e-{i}"),
                gtins[i % 4],
                kinds[i % 4],
                &format!("c-{}", i % 37),
            )
        })
        .collect();
    let ids: HashSet<String> = events.iter().map(|e| e.event_id.clone()).collect();
    publish_all(&mut r.ingest(&eshop).await, events).await;

    let r_links = r.wait_drained(&operator, 1200).await;
    assert_eq!(r_links[0].acknowledged, 1200);
    let d_links = d.wait_drained(&operator, 1200).await;
    assert_eq!(d_links[0].acknowledged, 1200);
    assert!(d_links[0].connected && !d_links[0].stalled && d_links[0].last_error.is_empty());

    for n in [&mut r, &mut d, &mut m] {
        n.terminate();
    }
    let store = m.open_store();
    assert_eq!(
        store.len().unwrap(),
        1200,
        "every event exactly once at the manufacturer"
    );
    let mut seen = HashSet::new();
    for item in store.scan_after(0) {
        let (_, ev) = item.unwrap();
        assert!(ids.contains(&ev.event_id));
        assert!(seen.insert(ev.event_id.clone()), "{} twice", ev.event_id);
        assert_eq!(ev.path, ["retailer", "distributor"]);
        assert_eq!(ev.origin, "retailer");
    }
    // The relay stored them too, with the path as it received them.
    let d_store = d.open_store();
    assert_eq!(d_store.len().unwrap(), 1200);
    let (_, ev) = d_store.get_by_event_id("e-7").unwrap().unwrap();
    assert_eq!(ev.path, ["retailer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_manufacturer_gets_only_its_products_kinds_and_fields() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let (ma_port, mb_port, d_port) = (env.reserve_port(), env.reserve_port(), env.reserve_port());
    let downstream_d = roles(&["downstream = [\"distributor\"]"]);
    env.node_config_on("dairy", ma_port, &downstream_d);
    env.node_config_on("wear", mb_port, &downstream_d);
    let mut ma = env.start("dairy");
    let mut mb = env.start("wear");
    env.node_config_on(
        "distributor",
        d_port,
        &format!(
            "{}{}{}",
            roles(&["downstream = [\"retailer\"]"]),
            upstream(
                "dairy",
                ma_port,
                "gtin_prefixes = [\"4740001\"]\nkinds = [\"purchase\", \"review\"]\ndrop_fields = [\"text\"]"
            ),
            upstream("wear", mb_port, "gtin_prefixes = [\"4750002\"]\ndrop_fields = [\"age_band\", \"region\"]"),
        ),
    );
    let mut d = env.start("distributor");
    env.node_config(
        "retailer",
        &format!(
            "{}{}",
            roles(&["publishers = [\"retailer-eshop\"]"]),
            upstream("distributor", d_port, "")
        ),
    );
    let mut r = env.start("retailer");
    let eshop = env.issue("retailer-eshop");

    // Every customer buys, reviews and answers NPS on products of both brands.
    let mut events = Vec::new();
    for c in 0..20 {
        for (j, gtin) in [DAIRY_A, WEAR_A, DAIRY_B, WEAR_B].iter().enumerate() {
            for kind in [
                pb::EventKind::Purchase,
                pb::EventKind::Review,
                pb::EventKind::Nps,
            ] {
                events.push(event_of(
                    &format!("c{c}-{j}-{}", kind as i32),
                    gtin,
                    kind,
                    &format!("cust-{c}"),
                ));
            }
        }
    }
    let total = events.len() as u64;
    publish_all(&mut r.ingest(&eshop).await, events).await;
    r.wait_drained(&operator, total).await;
    // Dairy: 2 products x 2 allowed kinds x 20; wear: 2 products x 3 kinds x 20.
    let d_links = d.wait_drained(&operator, 80 + 120).await;
    let acked: HashMap<_, _> = d_links
        .iter()
        .map(|l| (l.id.clone(), l.acknowledged))
        .collect();
    assert_eq!(acked["dairy"], 80);
    assert_eq!(acked["wear"], 120);

    for n in [&mut r, &mut d, &mut ma, &mut mb] {
        n.terminate();
    }
    let retailer_pseudonyms: HashSet<String> = r
        .open_store()
        .scan_after(0)
        .map(|i| i.unwrap().1.customer_pseudonym)
        .collect();
    let dairy: Vec<_> = ma
        .open_store()
        .scan_after(0)
        .map(|i| i.unwrap().1)
        .collect();
    let wear: Vec<_> = mb
        .open_store()
        .scan_after(0)
        .map(|i| i.unwrap().1)
        .collect();
    assert_eq!(dairy.len(), 80);
    assert_eq!(wear.len(), 120);
    for ev in &dairy {
        assert!(
            ev.product.gtin.has_company_prefix("4740001"),
            "dairy got {}",
            ev.product.gtin
        );
        assert!(
            matches!(ev.kind, EventKind::Purchase | EventKind::Review),
            "dairy got {:?}",
            ev.kind
        );
        assert!(ev.text.is_empty(), "text was dropped for dairy");
        assert!(!ev.region.is_empty() && !ev.age_band.is_empty());
    }
    for ev in &wear {
        assert!(
            ev.product.gtin.has_company_prefix("4750002"),
            "wear got {}",
            ev.product.gtin
        );
        assert!(
            ev.region.is_empty() && ev.age_band.is_empty(),
            "region and age band were dropped for wear"
        );
        assert!(!ev.text.is_empty());
    }

    // Per-link pseudonyms: stable within one manufacturer, different across
    // manufacturers, and never the retailer's own.
    let by_customer = |evs: &[chainsight::domain::PreferenceEvent]| {
        let mut m: HashMap<String, HashSet<String>> = HashMap::new();
        for ev in evs {
            let customer = ev.event_id.split('-').next().unwrap().to_string();
            m.entry(customer)
                .or_default()
                .insert(ev.customer_pseudonym.clone());
        }
        m
    };
    let (pa, pb_) = (by_customer(&dairy), by_customer(&wear));
    assert_eq!(pa.len(), 20);
    for (customer, set) in &pa {
        assert_eq!(set.len(), 1, "{customer} has one pseudonym at dairy");
        let at_wear = &pb_[customer];
        assert_eq!(at_wear.len(), 1, "{customer} has one pseudonym at wear");
        assert!(
            set.is_disjoint(at_wear),
            "{customer}: the two manufacturers could join"
        );
        assert!(set.is_disjoint(&retailer_pseudonyms));
    }
    let distinct: HashSet<_> = pa.values().flatten().collect();
    assert_eq!(distinct.len(), 20, "distinct customers stay distinct");
}
