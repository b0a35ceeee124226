//! `chainsight demo`: a real chain on loopback. It makes a chain CA and
//! certificates in a temporary directory, starts two retailers, a
//! distributor and two manufacturers (with different GS1 company prefixes)
//! as separate `chainsight node` processes, publishes a generated workload
//! at both retailers, waits until every link has drained, stops every node
//! cleanly, and then reads each node's store to show what it holds — and
//! checks that each manufacturer received exactly the events about its own
//! products and that no personal data is on any node's disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::domain::PreferenceEvent;
use crate::pb;
use crate::store::Store;
use crate::workload::{Workload, APPAREL_PREFIX, DAIRY_PREFIX};

pub use crate::chain::Error;
use crate::chain::{err, LocalChain, NodeSpec};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events published at each retailer.
    pub events_per_retailer: usize,
    /// Distinct customers per retailer.
    pub customers_per_retailer: usize,
    /// Workload seed.
    pub seed: u64,
    /// Keep the temporary directory (certificates, configs, data, logs).
    pub keep: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            events_per_retailer: 3000,
            customers_per_retailer: 400,
            seed: 2026,
            keep: false,
        }
    }
}

const RETAILERS: [&str; 2] = ["retailer-north", "retailer-south"];
const DISTRIBUTOR: &str = "distributor";
const DAIRY: &str = "dairy-maker";
const APPAREL: &str = "apparel-maker";

const ORDER: [&str; 5] = [DAIRY, APPAREL, DISTRIBUTOR, RETAILERS[0], RETAILERS[1]];

/// Runs the demo and prints its report; returns whether every check passed.
pub async fn run(opts: Options) -> Result<bool, Error> {
    let started = Instant::now();
    let mut chain = LocalChain::create(
        "chainsight-demo-",
        &specs(),
        &["retailer-north-eshop", "retailer-south-eshop"],
    )?;
    let root = chain.root().to_path_buf();
    println!(
        "chainsight demo: 5 nodes on loopback over mutual TLS, working in {}",
        root.display()
    );
    // Upstream first, so that links find their peers at once.
    for id in ORDER {
        chain.start(id).await?;
    }
    println!(
        "started 5 node processes in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let now = crate::domain::UnixNanos::now().0 / 1_000_000_000;
    let mut published = Vec::new();
    for (i, retailer) in RETAILERS.iter().enumerate() {
        let mut w = Workload::new(
            opts.seed + i as u64,
            retailer,
            opts.customers_per_retailer,
            now,
        );
        let events: Vec<_> = (0..opts.events_per_retailer)
            .map(|_| w.next_event())
            .collect();
        let t = Instant::now();
        publish(&chain, retailer, events.clone()).await?;
        println!(
            "published {} events at {retailer} in {:.2} s (acknowledged = flushed to disk)",
            events.len(),
            t.elapsed().as_secs_f64()
        );
        published.push((events, w.customers().to_vec()));
    }

    let t = Instant::now();
    let link_status = wait_drained(&chain, opts.events_per_retailer as u64).await?;
    println!("all links drained in {:.2} s", t.elapsed().as_secs_f64());

    // Downstream first: each sender closes its Forward streams before the
    // receiver stops.
    for id in ORDER.iter().rev() {
        chain.stop(id).await?;
    }
    println!("stopped every node cleanly (SIGTERM: drain, flush, exit 0)\n");

    let ok = report(&root, &published, &link_status)?;
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if opts.keep {
        println!(
            "kept certificates, configs, data and logs in {}",
            chain.keep().display()
        );
    }
    Ok(ok)
}

/// The demo chain: two retailers → distributor → two manufacturers.
fn specs() -> Vec<NodeSpec> {
    let node = |id: &str, roles: &[&str], upstreams: &[(&str, String)]| NodeSpec {
        id: id.to_string(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        upstreams: upstreams
            .iter()
            .map(|(u, s)| (u.to_string(), s.clone()))
            .collect(),
        extra: String::new(),
    };
    vec![
        node(DAIRY, &["downstream = [\"distributor\"]"], &[]),
        node(APPAREL, &["downstream = [\"distributor\"]"], &[]),
        node(
            DISTRIBUTOR,
            &["downstream = [\"retailer-north\", \"retailer-south\"]"],
            &[
                (DAIRY, format!("gtin_prefixes = [\"{DAIRY_PREFIX}\"]\ndrop_fields = [\"text\"]")),
                (
                    APPAREL,
                    format!("gtin_prefixes = [\"{APPAREL_PREFIX}\"]\ndrop_fields = [\"text\", \"age_band\"]"),
                ),
            ],
        ),
        node(RETAILERS[0], &["publishers = [\"retailer-north-eshop\"]"], &[(DISTRIBUTOR, String::new())]),
        node(RETAILERS[1], &["publishers = [\"retailer-south-eshop\"]"], &[(DISTRIBUTOR, String::new())]),
    ]
}

async fn publish(
    chain: &LocalChain,
    retailer: &str,
    events: Vec<pb::CustomerEvent>,
) -> Result<(), Error> {
    let channel = chain
        .channel(retailer, &format!("{retailer}-eshop"))
        .await?;
    let mut client = pb::ingest_client::IngestClient::new(channel);
    let requests: Vec<_> = events
        .chunks(250)
        .map(|c| pb::PublishRequest { events: c.to_vec() })
        .collect();
    let mut responses = client
        .publish_stream(tokio_stream::iter(requests))
        .await
        .map_err(|e| err("publish")(e.message().to_string()))?
        .into_inner();
    let mut accepted = 0;
    while let Some(resp) = responses
        .message()
        .await
        .map_err(|e| err("publish")(e.message().to_string()))?
    {
        accepted += resp
            .results
            .iter()
            .filter(|r| r.outcome == pb::PublishOutcome::Accepted as i32)
            .count();
    }
    if accepted != events.len() {
        return Err(err("publish")(format!(
            "{accepted} of {} events accepted",
            events.len()
        )));
    }
    Ok(())
}

/// Polls every node's links until all outboxes are empty and each retailer
/// link acknowledged everything published there; returns the final states.
async fn wait_drained(
    chain: &LocalChain,
    per_retailer: u64,
) -> Result<Vec<(String, pb::LinkStatus)>, Error> {
    let deadline = Instant::now() + Duration::from_secs(40);
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message("waiting for the links to drain");
    loop {
        bar.tick();
        let mut all = Vec::new();
        for node in [RETAILERS[0], RETAILERS[1], DISTRIBUTOR] {
            let channel = chain.channel(node, "operator").await?;
            let links = pb::peering_client::PeeringClient::new(channel)
                .links(pb::LinksRequest {})
                .await
                .map_err(|e| err("ask link status")(e.message().to_string()))?
                .into_inner()
                .links;
            all.extend(links.into_iter().map(|l| (node.to_string(), l)));
        }
        let retailers_done = all
            .iter()
            .filter(|(n, _)| n.starts_with("retailer"))
            .all(|(_, l)| l.acknowledged >= per_retailer);
        let backlog: u64 = all.iter().map(|(_, l)| l.backlog).sum();
        bar.set_message(format!(
            "waiting for the links to drain: {backlog} events in outboxes"
        ));
        if retailers_done && backlog == 0 {
            bar.finish_and_clear();
            return Ok(all);
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            return Err(err("drain")(format!(
                "links did not drain within 40 s: {all:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_store(root: &Path, id: &str) -> Result<Vec<PreferenceEvent>, Error> {
    let store = Store::open(&root.join(id).join("data").join("store"), &[])
        .map_err(|e| err("open store")(e.to_string()))?;
    store
        .scan_after(0)
        .map(|r| {
            r.map(|(_, ev)| ev)
                .map_err(|e| err("read store")(e.to_string()))
        })
        .collect()
}

/// Prints what each node stored and each link forwarded, and the checks.
fn report(
    root: &Path,
    published: &[(Vec<pb::CustomerEvent>, Vec<crate::workload::Customer>)],
    links: &[(String, pb::LinkStatus)],
) -> Result<bool, Error> {
    let mut stores = HashMap::new();
    for id in [RETAILERS[0], RETAILERS[1], DISTRIBUTOR, DAIRY, APPAREL] {
        stores.insert(id, read_store(root, id)?);
    }
    println!(
        "{:<16} {:>8} {:>16} {:>18}   kinds",
        "node", "stored", "dairy (4740001)", "apparel (4750002)"
    );
    for id in [RETAILERS[0], RETAILERS[1], DISTRIBUTOR, DAIRY, APPAREL] {
        let evs = &stores[id];
        let count = |p: &str| {
            evs.iter()
                .filter(|e| e.product.gtin.has_company_prefix(p))
                .count()
        };
        let mut kinds: HashMap<&str, usize> = HashMap::new();
        for e in evs {
            *kinds.entry(e.kind.label()).or_default() += 1;
        }
        let mut kinds: Vec<_> = kinds.into_iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let kinds: Vec<_> = kinds
            .iter()
            .take(4)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!(
            "{id:<16} {:>8} {:>16} {:>18}   {}, …",
            evs.len(),
            count(DAIRY_PREFIX),
            count(APPAREL_PREFIX),
            kinds.join(", ")
        );
    }
    println!("\n{:<34} {:>12}   agreement", "link", "acknowledged");
    for (node, l) in links {
        let agreement = match l.id.as_str() {
            DAIRY => "prefix 4740001; text dropped; pseudonym per link",
            APPAREL => "prefix 4750002; text, age band dropped; pseudonym per link",
            _ => "everything; pseudonym per link",
        };
        println!(
            "{:<34} {:>12}   {agreement}",
            format!("{node} -> {}", l.id),
            l.acknowledged
        );
    }
    println!("\nchecks");
    let mut ok = true;
    let mut check = |pass: bool, what: String| {
        println!("  [{}] {what}", if pass { "ok" } else { "FAILED" });
        ok &= pass;
    };
    let all_events: Vec<&pb::CustomerEvent> = published.iter().flat_map(|(e, _)| e).collect();
    for (maker, prefix) in [(DAIRY, DAIRY_PREFIX), (APPAREL, APPAREL_PREFIX)] {
        let expected: HashSet<&str> = all_events
            .iter()
            .filter(|e| {
                e.product
                    .as_ref()
                    .is_some_and(|p| p.gtin.get(..prefix.len()) == Some(prefix))
            })
            .map(|e| e.event_id.as_str())
            .collect();
        let got: Vec<&str> = stores[maker].iter().map(|e| e.event_id.as_str()).collect();
        let got_set: HashSet<&str> = got.iter().copied().collect();
        check(
            got_set == expected && got.len() == expected.len(),
            format!(
                "{maker} holds exactly the {} published events about prefix {prefix} (got {}, {} missing, {} foreign, {} twice)",
                expected.len(),
                got.len(),
                expected.difference(&got_set).count(),
                got_set.difference(&expected).count(),
                got.len() - got_set.len()
            ),
        );
        check(
            stores[maker]
                .iter()
                .all(|e| e.text.is_empty() && e.path.len() == 2 && e.path[1] == DISTRIBUTOR),
            format!("{maker}: free text withheld by the agreement, path = [retailer, distributor]"),
        );
    }
    let (scanned, blocks, found) = scan_for_personal_data(root, published)?;
    check(
        found.is_empty(),
        format!(
            "no customer id or e-mail address in any byte of the 5 data directories ({} bytes scanned, {} compressed blocks of the event logs among them decompressed, for {} strings{})",
            scanned,
            blocks,
            published.iter().map(|(_, c)| c.len() * 2).sum::<usize>(),
            if found.is_empty() { String::new() } else { format!("; FOUND in {found:?}") }
        ),
    );
    check(pseudonyms_unlinkable(&stores, published), "the two manufacturers see different pseudonyms for the same customers (they cannot join their data)".into());
    Ok(ok)
}

fn scan_for_personal_data(
    root: &Path,
    published: &[(Vec<pb::CustomerEvent>, Vec<crate::workload::Customer>)],
) -> Result<(u64, usize, Vec<PathBuf>), Error> {
    let needles: Vec<String> = published
        .iter()
        .flat_map(|(_, customers)| {
            customers
                .iter()
                .flat_map(|c| [c.id.clone(), c.email.clone()])
        })
        .collect();
    let matcher =
        aho_corasick::AhoCorasick::new(&needles).map_err(|e| err("scan")(e.to_string()))?;
    let mut scanned = 0u64;
    let mut blocks = 0usize;
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = [RETAILERS[0], RETAILERS[1], DISTRIBUTOR, DAIRY, APPAREL]
        .iter()
        .map(|id| root.join(id).join("data"))
        .collect();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| err("scan")(e.to_string()))? {
                stack.push(entry.map_err(|e| err("scan")(e.to_string()))?.path());
            }
        } else {
            let mut bytes = std::fs::read(&path).map_err(|e| err("scan")(e.to_string()))?;
            if path.extension().is_some_and(|e| e == "seg") {
                // The event log's compressed blocks, searched decompressed.
                let (plain, n) = crate::store::with_log_blocks_decompressed(&bytes);
                bytes = plain;
                blocks += n;
            }
            scanned += bytes.len() as u64;
            if matcher.is_match(&bytes) {
                found.push(path);
            }
        }
    }
    Ok((scanned, blocks, found))
}

/// Whether no customer has the same pseudonym at both manufacturers.
fn pseudonyms_unlinkable(
    stores: &HashMap<&str, Vec<PreferenceEvent>>,
    published: &[(Vec<pb::CustomerEvent>, Vec<crate::workload::Customer>)],
) -> bool {
    let customer_of: HashMap<&str, &str> = published
        .iter()
        .flat_map(|(events, _)| {
            events
                .iter()
                .map(|e| (e.event_id.as_str(), e.customer_id.as_str()))
        })
        .collect();
    let pseudonyms = |maker: &str| {
        let mut m: HashMap<&str, HashSet<&str>> = HashMap::new();
        for e in &stores[maker] {
            if let Some(c) = customer_of.get(e.event_id.as_str()) {
                m.entry(c)
                    .or_default()
                    .insert(e.customer_pseudonym.as_str());
            }
        }
        m
    };
    let (dairy, apparel) = (pseudonyms(DAIRY), pseudonyms(APPAREL));
    let shared: Vec<_> = dairy.keys().filter(|c| apparel.contains_key(*c)).collect();
    !shared.is_empty()
        && shared.iter().all(|c| {
            dairy[*c].len() == 1 && apparel[*c].len() == 1 && dairy[*c].is_disjoint(&apparel[*c])
        })
}
