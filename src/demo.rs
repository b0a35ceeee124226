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
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use crate::certs::{ChainCa, LeafOptions};
use crate::config::TlsFiles;
use crate::domain::PreferenceEvent;
use crate::pb;
use crate::store::Store;
use crate::workload::{Workload, APPAREL_PREFIX, DAIRY_PREFIX};

/// Demo errors: which step failed and why.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct Error {
    step: String,
    reason: String,
}

fn err(step: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error {
        step: step.to_string(),
        reason,
    }
}

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

/// A node process; killed (SIGKILL) if dropped while running.
struct NodeProcess {
    id: String,
    child: tokio::process::Child,
    dir: PathBuf,
}

impl NodeProcess {
    async fn spawn(id: &str, dir: &Path) -> Result<Self, Error> {
        let exe = std::env::current_exe().map_err(|e| err("find own executable")(e.to_string()))?;
        let log = std::fs::File::create(dir.join("node.log"))
            .map_err(|e| err("create log")(e.to_string()))?;
        let mut child = tokio::process::Command::new(exe)
            .arg("node")
            .arg("--config")
            .arg(dir.join("node.toml"))
            .env("RUST_LOG", "info,h2=warn,hyper=warn,tower=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err("start node")(format!("{id}: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| err("start node")(format!("{id}: no stdout")))?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        tokio::time::timeout(Duration::from_secs(15), reader.read_line(&mut line))
            .await
            .map_err(|_| {
                err("start node")(format!(
                    "{id} did not start within 15 s; see {}",
                    dir.join("node.log").display()
                ))
            })?
            .map_err(|e| err("start node")(e.to_string()))?;
        if !line.contains("listening on") {
            return Err(err("start node")(format!(
                "{id} exited: {}",
                std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
            )));
        }
        Ok(NodeProcess {
            id: id.to_string(),
            child,
            dir: dir.to_path_buf(),
        })
    }

    /// SIGTERM, then wait for a clean exit.
    async fn stop(mut self) -> Result<(), Error> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
                .map_err(|e| err("stop node")(format!("{}: {e}", self.id)))?;
        }
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .map_err(|_| err("stop node")(format!("{} did not stop within 20 s", self.id)))?
            .map_err(|e| err("stop node")(e.to_string()))?;
        if status.success() {
            Ok(())
        } else {
            Err(err("stop node")(format!(
                "{} exited with {status}; see {}",
                self.id,
                self.dir.join("node.log").display()
            )))
        }
    }
}

/// Runs the demo and prints its report; returns whether every check passed.
pub async fn run(opts: Options) -> Result<bool, Error> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("chainsight-demo-")
        .tempdir()
        .map_err(|e| err("create temp dir")(e.to_string()))?;
    let root = tmp.path().to_path_buf();
    println!(
        "chainsight demo: 5 nodes on loopback over mutual TLS, working in {}",
        root.display()
    );
    let certs = make_certificates(&root)?;
    let ports = write_configs(&root, &certs)?;

    // Upstream first, so that links find their peers at once.
    let mut nodes = Vec::new();
    for id in [DAIRY, APPAREL, DISTRIBUTOR, RETAILERS[0], RETAILERS[1]] {
        nodes.push(NodeProcess::spawn(id, &root.join(id)).await?);
    }
    println!(
        "started {} node processes in {:.1} s",
        nodes.len(),
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
        publish(&certs, retailer, ports[*retailer], events.clone()).await?;
        println!(
            "published {} events at {retailer} in {:.2} s (acknowledged = flushed to disk)",
            events.len(),
            t.elapsed().as_secs_f64()
        );
        published.push((events, w.customers().to_vec()));
    }

    let t = Instant::now();
    let link_status = wait_drained(&certs, &ports, opts.events_per_retailer as u64).await?;
    println!("all links drained in {:.2} s", t.elapsed().as_secs_f64());

    // Downstream first: each sender closes its Forward streams before the
    // receiver stops.
    for node in nodes.into_iter().rev() {
        node.stop().await?;
    }
    println!("stopped every node cleanly (SIGTERM: drain, flush, exit 0)\n");

    let ok = report(&root, &published, &link_status)?;
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if opts.keep {
        let kept = tmp.keep();
        println!(
            "kept certificates, configs, data and logs in {}",
            kept.display()
        );
    }
    Ok(ok)
}

fn make_certificates(root: &Path) -> Result<PathBuf, Error> {
    let dir = root.join("certs");
    let ca =
        ChainCa::generate("chainsight demo chain CA").map_err(|e| err("make CA")(e.to_string()))?;
    ca.write(&dir).map_err(|e| err("write CA")(e.to_string()))?;
    let names = [
        RETAILERS[0],
        RETAILERS[1],
        DISTRIBUTOR,
        DAIRY,
        APPAREL,
        "retailer-north-eshop",
        "retailer-south-eshop",
        "operator",
    ];
    for name in names {
        let issued = ca
            .issue(name, &LeafOptions::default())
            .map_err(|e| err("issue certificate")(e.to_string()))?;
        crate::certs::write_pair(&dir, name, &issued.cert_pem, &issued.key_pem)
            .map_err(|e| err("write certificate")(e.to_string()))?;
    }
    Ok(dir)
}

fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| err("find a free port")(e.to_string()))
}

/// Writes each node's node.toml; returns the ports.
fn write_configs(root: &Path, certs: &Path) -> Result<HashMap<&'static str, u16>, Error> {
    let mut ports = HashMap::new();
    for id in [DAIRY, APPAREL, DISTRIBUTOR, RETAILERS[0], RETAILERS[1]] {
        ports.insert(id, free_port()?);
    }
    let upstream = |id: &str, share: &str| {
        format!(
            "[[upstream]]\nid = \"{id}\"\naddress = \"https://127.0.0.1:{}\"\n[upstream.share]\n{share}\n",
            ports[id]
        )
    };
    let configs = [
        (DAIRY, "downstream = [\"distributor\"]".to_string(), String::new()),
        (APPAREL, "downstream = [\"distributor\"]".to_string(), String::new()),
        (
            DISTRIBUTOR,
            "downstream = [\"retailer-north\", \"retailer-south\"]".to_string(),
            format!(
                "{}{}",
                upstream(DAIRY, &format!("gtin_prefixes = [\"{DAIRY_PREFIX}\"]\ndrop_fields = [\"text\"]")),
                upstream(
                    APPAREL,
                    &format!("gtin_prefixes = [\"{APPAREL_PREFIX}\"]\ndrop_fields = [\"text\", \"age_band\"]")
                )
            ),
        ),
        (
            RETAILERS[0],
            "publishers = [\"retailer-north-eshop\"]".to_string(),
            upstream(DISTRIBUTOR, ""),
        ),
        (
            RETAILERS[1],
            "publishers = [\"retailer-south-eshop\"]".to_string(),
            upstream(DISTRIBUTOR, ""),
        ),
    ];
    for (id, roles, upstreams) in configs {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).map_err(|e| err("create node dir")(e.to_string()))?;
        let toml = format!(
            "id = \"{id}\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{id}.pem\"\nkey = \"{c}/{id}.key\"\n\n[roles]\n{roles}\noperators = [\"operator\"]\n\n{upstreams}",
            port = ports[id],
            c = certs.display(),
        );
        std::fs::write(dir.join("node.toml"), toml)
            .map_err(|e| err("write node.toml")(e.to_string()))?;
    }
    Ok(ports)
}

fn client_files(certs: &Path, identity: &str) -> TlsFiles {
    TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{identity}.pem")),
        key: certs.join(format!("{identity}.key")),
        handshake_timeout_secs: 10,
    }
}

async fn publish(
    certs: &Path,
    retailer: &str,
    port: u16,
    events: Vec<pb::CustomerEvent>,
) -> Result<(), Error> {
    let files = client_files(certs, &format!("{retailer}-eshop"));
    let channel = crate::tls::connect(&format!("https://127.0.0.1:{port}"), retailer, &files)
        .await
        .map_err(|e| err("connect publisher")(e.to_string()))?;
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
    certs: &Path,
    ports: &HashMap<&'static str, u16>,
    per_retailer: u64,
) -> Result<Vec<(String, pb::LinkStatus)>, Error> {
    let files = client_files(certs, "operator");
    let deadline = Instant::now() + Duration::from_secs(40);
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message("waiting for the links to drain");
    loop {
        bar.tick();
        let mut all = Vec::new();
        for node in [RETAILERS[0], RETAILERS[1], DISTRIBUTOR] {
            let channel =
                crate::tls::connect(&format!("https://127.0.0.1:{}", ports[node]), node, &files)
                    .await
                    .map_err(|e| err("ask link status")(e.to_string()))?;
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
    let (scanned, found) = scan_for_personal_data(root, published)?;
    check(
        found.is_empty(),
        format!(
            "no customer id or e-mail address in any byte of the 5 data directories ({} bytes scanned for {} strings{})",
            scanned,
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
) -> Result<(u64, Vec<PathBuf>), Error> {
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
            let bytes = std::fs::read(&path).map_err(|e| err("scan")(e.to_string()))?;
            scanned += bytes.len() as u64;
            if matcher.is_match(&bytes) {
                found.push(path);
            }
        }
    }
    Ok((scanned, found))
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
