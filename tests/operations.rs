//! Operating a node: the Prometheus endpoint, live reload, backup and
//! restore — on real node processes over mTLS.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;

use chainsight::pb;
use common::{event_of, publish, publish_all, roles, stored, upstream, TestEnv};

const DAIRY: &str = "4740001000017";
const DAIRY_RARE: &str = "4740001000024";
const WEAR: &str = "4750002000015";

/// One scrape, parsed: (metric name, labels) → value, plus each family's
/// declared type.
struct Scrape {
    samples: HashMap<(String, BTreeMap<String, String>), f64>,
    types: HashMap<String, String>,
}

impl Scrape {
    /// The value of `name` with exactly `labels`; panics (showing what was
    /// scraped) when absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        *self
            .samples
            .get(&(name.to_string(), labels.clone()))
            .unwrap_or_else(|| {
                let mut names: Vec<_> = self
                    .samples
                    .keys()
                    .map(|(n, l)| format!("{n}{l:?}"))
                    .collect();
                names.sort();
                panic!("no sample {name}{labels:?} among:\n{}", names.join("\n"))
            })
    }

    fn type_of(&self, family: &str) -> &str {
        self.types
            .get(family)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no # TYPE line for {family}"))
    }
}

/// Parses the OpenMetrics / Prometheus text format strictly: every line is
/// a comment (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) or a sample
/// `name{label="value",...} number`; anything else fails the test.
fn parse_metrics(text: &str) -> Scrape {
    assert_eq!(
        text.trim_end().lines().last(),
        Some("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if line.is_empty() || line == "# EOF" {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let family = parts.next().expect("family").to_string();
                    let kind = parts.next().expect("type").to_string();
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "unknown",
                            "info",
                            "stateset"
                        ]
                        .contains(&kind.as_str()),
                        "bad type in {line:?}"
                    );
                    types.insert(family, kind);
                }
                Some("HELP") | Some("UNIT") => {}
                _ => panic!("unexpected comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample: series and value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
                    assert!(valid_name(key), "bad label name in {line:?}");
                    let end = after.find('"').expect("closing quote");
                    labels.insert(key.to_string(), after[..end].to_string());
                    rest = after[end + 1..].trim_start_matches(',');
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        assert!(
            samples.insert((name.to_string(), labels), value).is_none(),
            "sample twice: {line:?}"
        );
    }
    Scrape { samples, types }
}

/// `GET /metrics` over plain HTTP/1.1.
fn scrape(addr: SocketAddr) -> Scrape {
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    if std::env::var_os("SHOW_METRICS").is_some() {
        println!("{body}");
    }
    parse_metrics(body)
}

fn metrics_table(port: u16) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_publishing_forwarding_queries_and_lag() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let analyst = env.issue("analyst");
    let maker = env.issue("maker-app");
    let eshop = env.issue("retailer-eshop");
    let (d_port, d_metrics, r_metrics) =
        (env.reserve_port(), env.reserve_port(), env.reserve_port());
    env.node_config_on(
        "distributor",
        d_port,
        &format!(
            "{}[privacy]\nk_min = 5\n{}",
            roles(&[
                "downstream = [\"retailer\"]",
                "analysts = [\"analyst\"]",
                "subscribers = [\"maker-app\"]",
            ]),
            metrics_table(d_metrics)
        ),
    );
    let d = env.start("distributor");
    env.node_config(
        "retailer",
        &format!(
            "{}{}{}",
            roles(&["publishers = [\"retailer-eshop\"]"]),
            upstream("distributor", d_port, "categories = [\"dairy\"]"),
            metrics_table(r_metrics)
        ),
    );
    let r = env.start("retailer");

    // 300 dairy events (forwarded) and 100 wear events (kept at the
    // retailer), then 40 of them again and 7 invalid ones.
    let events: Vec<_> = (0..400)
        .map(|i| {
            // Four dairy events of a rare product by 2 customers: a group
            // below k_min.
            let (gtin, customer) = match i {
                _ if i % 4 == 3 => (WEAR, format!("c-{}", i % 50)),
                _ if i % 100 == 1 => (DAIRY_RARE, format!("rare-{}", i % 2)),
                _ => (DAIRY, format!("c-{}", i % 50)),
            };
            let mut e = event_of(&format!("e-{i}"), gtin, pb::EventKind::Purchase, &customer);
            if gtin == WEAR {
                e.product.as_mut().unwrap().category = "apparel".into();
            }
            e
        })
        .collect();
    let mut ingest = r.ingest(&eshop).await;
    publish_all(&mut ingest, events.clone()).await;
    let again = publish(&mut ingest, events[..40].to_vec()).await;
    assert!(again
        .iter()
        .all(|x| common::outcome(x) == pb::PublishOutcome::Duplicate));
    let bad: Vec<_> = (0..7)
        .map(|i| {
            let mut e = event_of(&format!("bad-{i}"), DAIRY, pb::EventKind::Purchase, "c-1");
            e.product.as_mut().unwrap().gtin = "12345".into();
            e
        })
        .collect();
    let rejected = publish(&mut ingest, bad).await;
    assert!(rejected
        .iter()
        .all(|x| common::outcome(x) == pb::PublishOutcome::Rejected));
    let r_links = r.wait_drained(&operator, 300).await;

    // A query at the distributor: the rare product's group is suppressed.
    let mut insights =
        pb::insights_client::InsightsClient::new(d.channel(&analyst).await.expect("connect"));
    let report = insights
        .query(pb::InsightQuery {
            group_by: vec![pb::Dimension::Gtin as i32, pb::Dimension::Region as i32],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    let rows_events: u64 = report.rows.iter().map(|r| r.events).sum();
    assert_eq!(report.suppressed_groups, 1, "{report:?}");
    // A named subscription that processed 120 of the 300 events.
    let mut signals =
        pb::signals_client::SignalsClient::new(d.channel(&maker).await.expect("connect"));
    signals
        .ack(pb::AckRequest {
            name: "bi-loader".into(),
            cursor: 120,
        })
        .await
        .expect("ack");

    let rs = scrape(common_addr(r_metrics));
    let ds = scrape(common_addr(d_metrics));
    println!(
        "retailer: {} samples, distributor: {} samples",
        rs.samples.len(),
        ds.samples.len()
    );

    // Publishing, by outcome, at the retailer.
    assert_eq!(rs.type_of("chainsight_publish_events"), "counter");
    let published = |o: &str| rs.value("chainsight_publish_events_total", &[("outcome", o)]);
    assert_eq!(published("accepted"), 400.0);
    assert_eq!(published("duplicate"), 40.0);
    assert_eq!(published("rejected"), 7.0);
    assert_eq!(rs.value("chainsight_events_stored_total", &[]), 400.0);
    assert_eq!(rs.value("chainsight_store_last_seq", &[]), 400.0);
    assert!(rs.value("chainsight_store_size_bytes", &[]) > 0.0);
    // The flush histogram: one observation per group commit, buckets
    // cumulative up to +Inf.
    assert_eq!(
        rs.type_of("chainsight_store_flush_duration_seconds"),
        "histogram"
    );
    let flushes = rs.value("chainsight_store_flush_duration_seconds_count", &[]);
    assert!(flushes >= 1.0, "{flushes} flushes");
    assert_eq!(
        rs.value(
            "chainsight_store_flush_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        flushes
    );
    // The link: everything acknowledged, nothing waiting, connected.
    let link = [("link", "distributor")];
    // What Peering.Links says (a batch sent again after a reconnect counts
    // twice in both), and at least the 300 forwarded.
    let acked = rs.value("chainsight_link_acknowledged_events_total", &link);
    assert!(acked >= 300.0, "{acked}");
    assert!(
        acked <= r_links[0].acknowledged as f64,
        "{acked} vs {r_links:?}"
    );
    assert_eq!(rs.value("chainsight_link_backlog_events", &link), 0.0);
    assert_eq!(
        rs.value("chainsight_link_oldest_unacknowledged_age_seconds", &link),
        0.0
    );
    assert_eq!(rs.value("chainsight_link_connected", &link), 1.0);

    // Forwarding, queries and subscriber lag at the distributor.
    let received = |o: &str| {
        ds.value(
            "chainsight_forward_received_events_total",
            &[("outcome", o)],
        )
    };
    assert_eq!(received("stored"), 300.0);
    assert_eq!(ds.value("chainsight_events_stored_total", &[]), 300.0);
    assert_eq!(rows_events, 296, "300 forwarded, 4 in the suppressed group");
    assert_eq!(
        ds.value("chainsight_queries_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        ds.value("chainsight_query_duration_seconds_count", &[]),
        1.0
    );
    assert!(ds.value("chainsight_query_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(
        ds.value("chainsight_query_suppressed_groups_total", &[]),
        f64::from(report.suppressed_groups)
    );
    assert_eq!(
        ds.value(
            "chainsight_subscriber_lag_events",
            &[("identity", "maker-app"), ("subscription", "bi-loader")]
        ),
        180.0
    );
    // The query was audited.
    assert!(ds.value("chainsight_audit_records", &[]) >= 1.0);
}

fn common_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs the CLI; (exit success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(args)
        .output()
        .expect("run chainsight");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls the node's log until `needle` appears `count` times (20 s at most).
async fn wait_log(node: &common::NodeProc, needle: &str, count: usize) {
    let start = std::time::Instant::now();
    while node.log().matches(needle).count() < count {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting for {count} × {needle:?} in {}'s log:\n{}",
            node.id,
            node.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn mixed_events(prefix: &str, n: usize) -> Vec<pb::CustomerEvent> {
    (0..n)
        .map(|i| {
            let wear = i % 2 == 1;
            let mut e = event_of(
                &format!("{prefix}-{i}"),
                if wear { WEAR } else { DAIRY },
                pb::EventKind::Purchase,
                &format!("c-{}", i % 20),
            );
            if wear {
                e.product.as_mut().unwrap().category = "apparel".into();
            }
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_agreement_from_then_on_and_an_invalid_config_is_refused() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let maker = env.issue("maker-app");
    let eshop = env.issue("retailer-eshop");
    let d_port = env.reserve_port();
    env.node_config_on(
        "distributor",
        d_port,
        &roles(&[
            "downstream = [\"retailer\"]",
            "subscribers = [\"maker-app\"]",
        ]),
    );
    let d = env.start("distributor");
    let r_port = env.reserve_port();
    let retailer_toml = |share: &str, extra: &str| {
        format!(
            "{}{}{extra}",
            roles(&["publishers = [\"retailer-eshop\"]"]),
            upstream("distributor", d_port, share)
        )
    };
    let r_config = env.node_config_on(
        "retailer",
        r_port,
        // Without pseudonyms upstream: an erasure reaches the distributor
        // only by the events the link's agreements sent it.
        &retailer_toml("categories = [\"dairy\"]\npseudonym = \"drop\"", ""),
    );
    let r = env.start("retailer");
    let mut ingest = r.ingest(&eshop).await;

    // Under the first agreement: dairy only.
    publish_all(&mut ingest, mixed_events("a", 100)).await;
    r.wait_drained(&operator, 50).await;

    // SIGHUP with apparel instead of dairy; the connection stays up.
    let text = std::fs::read_to_string(&r_config).unwrap();
    std::fs::write(
        &r_config,
        text.replace("categories = [\"dairy\"]", "categories = [\"apparel\"]"),
    )
    .unwrap();
    r.send_sighup();
    wait_log(&r, "config reloaded", 1).await;
    assert!(
        r.log().contains("upstream distributor"),
        "the log names the changed agreement:\n{}",
        r.log()
    );
    publish_all(&mut ingest, mixed_events("b", 100)).await;
    r.wait_drained(&operator, 100).await;

    // An invalid config (k_min = 0) is refused with the reason; the node
    // keeps serving under the agreement in force.
    let valid = std::fs::read_to_string(&r_config).unwrap();
    std::fs::write(&r_config, format!("{valid}\n[privacy]\nk_min = 0\n")).unwrap();
    let (ok, stdout, stderr) = cli(&["admin", "reload", "--config", r_config.to_str().unwrap()]);
    println!("admin reload of an invalid config: ok={ok}\n{stdout}{stderr}");
    assert!(!ok, "an invalid config must be refused");
    assert!(
        stderr.contains("privacy.k_min") && stderr.contains("the one in force stays"),
        "{stderr}"
    );
    // And a config that does not parse, by SIGHUP.
    std::fs::write(&r_config, "this is not toml = = \n").unwrap();
    r.send_sighup();
    wait_log(&r, "reload refused", 2).await;
    publish_all(&mut ingest, mixed_events("c", 100)).await;
    let links = r.wait_drained(&operator, 150).await;
    assert!(links[0].connected, "{links:?}");
    // The link was never dropped: one connection for the whole test.
    let connects = r
        .log()
        .lines()
        .filter(|l| l.trim_end().ends_with(" connected"))
        .count();
    assert_eq!(connects, 1, "the link reconnected:\n{}", r.log());

    // A valid change by `admin reload`: the reply names what changed.
    std::fs::write(&r_config, &valid).unwrap();
    let (ok, stdout, stderr) = cli(&["admin", "reload", "--config", r_config.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("nothing that can change live has changed"),
        "{stdout}"
    );

    let ids: Vec<String> = stored(&d, &maker)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let got = |prefix: &str, wear: bool| {
        ids.iter()
            .filter(|id| {
                let (p, i) = id.split_once('-').unwrap();
                p == prefix && (i.parse::<usize>().unwrap() % 2 == 1) == wear
            })
            .count()
    };
    println!(
        "forwarded: before SIGHUP dairy {} apparel {}; after dairy {} apparel {}; after the refused configs dairy {} apparel {}",
        got("a", false),
        got("a", true),
        got("b", false),
        got("b", true),
        got("c", false),
        got("c", true)
    );
    assert_eq!((got("a", false), got("a", true)), (50, 0));
    assert_eq!((got("b", false), got("b", true)), (0, 50));
    assert_eq!((got("c", false), got("c", true)), (0, 50));
    assert_eq!(ids.len(), 150);

    // Erasing customer c-2, whose dairy events went upstream under the
    // agreement before the reload: the erasure still reaches the
    // distributor (routed by every agreement the link has had).
    let erased_there = |ids: &[String]| {
        ["a-2", "a-22", "a-42", "a-62", "a-82"]
            .iter()
            .filter(|id| ids.iter().any(|i| i == *id))
            .count()
    };
    assert_eq!(erased_there(&ids), 5);
    let erased = ingest
        .erase(pb::EraseRequest {
            customer_id: "c-2".into(),
        })
        .await
        .expect("erase")
        .into_inner();
    println!("erasure of c-2: {erased:?}");
    assert_eq!(erased.links, ["distributor"], "{erased:?}");
    let start = std::time::Instant::now();
    loop {
        let ids: Vec<String> = stored(&d, &maker)
            .await
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        if erased_there(&ids) == 0 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "c-2's dairy events are still at the distributor:\n{}",
            r.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The first cursor a named subscription resumes at.
async fn resumes_at(
    node: &common::NodeProc,
    as_: &chainsight::config::TlsFiles,
    name: &str,
) -> u64 {
    common::subscribe(node, as_, common::subscription(0, false, name))
        .await
        .into_inner()
        .message()
        .await
        .expect("signal")
        .expect("a signal after the cursor")
        .cursor
}

async fn dairy_feed(
    node: &common::NodeProc,
    as_: &chainsight::config::TlsFiles,
) -> pb::InsightReport {
    pb::insights_client::InsightsClient::new(node.channel(as_).await.expect("connect"))
        .query(pb::InsightQuery {
            filter: Some(pb::Filter {
                gtin_prefixes: vec!["4740001".into()],
                ..Default::default()
            }),
            group_by: vec![pb::Dimension::Gtin as i32, pb::Dimension::Region as i32],
            bucket: pb::TimeBucket::Day as i32,
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_the_same_events_cursors_and_query_results() {
    let env = TestEnv::new();
    let maker = env.issue("maker-app");
    let analyst = env.issue("analyst");
    let eshop = env.issue("retailer-eshop");
    let node_roles = roles(&[
        "publishers = [\"retailer-eshop\"]",
        "subscribers = [\"maker-app\"]",
        "analysts = [\"analyst\"]",
    ]);
    let port = env.reserve_port();
    let node_extra = format!("{node_roles}[privacy]\nk_min = 3\n");
    let config = env.node_config_on("origin", port, &node_extra);
    let origin = env.start("origin");

    // The baseline: 3000 dairy events, two named subscriptions part-way.
    let baseline: Vec<_> = (0..3000)
        .map(|i| {
            event_of(
                &format!("base-{i}"),
                if i % 3 == 0 { DAIRY_RARE } else { DAIRY },
                if i % 5 == 0 {
                    pb::EventKind::Review
                } else {
                    pb::EventKind::Purchase
                },
                &format!("c-{}", i % 120),
            )
        })
        .collect();
    publish_all(&mut origin.ingest(&eshop).await, baseline).await;
    let mut signals =
        pb::signals_client::SignalsClient::new(origin.channel(&maker).await.expect("connect"));
    for (name, cursor) in [("bi-loader", 1234), ("app", 2000)] {
        signals
            .ack(pb::AckRequest {
                name: name.into(),
                cursor,
            })
            .await
            .expect("ack");
    }

    // Load: apparel events published without pause while the backup runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = {
        let (stop, published) = (stop.clone(), published.clone());
        let mut ingest = origin.ingest(&eshop).await;
        tokio::spawn(async move {
            let mut batch = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let events: Vec<_> = (0..100)
                    .map(|i| {
                        let mut e = event_of(
                            &format!("load-{batch}-{i}"),
                            WEAR,
                            pb::EventKind::Purchase,
                            &format!("l-{i}"),
                        );
                        e.product.as_mut().unwrap().category = "apparel".into();
                        e
                    })
                    .collect();
                publish_all(&mut ingest, events).await;
                published.fetch_add(100, std::sync::atomic::Ordering::SeqCst);
                batch += 1;
            }
        })
    };
    let load_count = |p: &std::sync::atomic::AtomicU64| p.load(std::sync::atomic::Ordering::SeqCst);
    while load_count(&published) < 500 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let backup = env.path().join("origin.backup");
    let args = [
        "admin",
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--out",
        backup.to_str().unwrap(),
        "--include-keys",
    ]
    .map(String::from);
    let started = std::time::Instant::now();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(ok, "{stdout}{stderr}");
    let during = load_count(&published);
    while load_count(&published) < during + 500 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.await.unwrap();
    println!(
        "{stdout}backup took {took:?}; load events published: {during} when it ended, {} in all",
        load_count(&published)
    );
    let last_seq: u64 = stdout
        .split("events up to seq ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("the backup names its last seq");
    // Everything acknowledged before the backup began is in it (3000 + at
    // least 500 load events); what came after the backup is not.
    assert!(
        last_seq >= 3500 && last_seq < 3000 + load_count(&published),
        "snapshot up to seq {last_seq}; {} load events published in all",
        load_count(&published)
    );

    // Refusals: a truncated file, and a data directory that holds a store.
    let truncated = env.path().join("truncated.backup");
    let bytes = std::fs::read(&backup).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 40]).unwrap();
    let scratch = env.path().join("scratch");
    let (ok, _, stderr) = cli(&[
        "admin",
        "restore",
        "--in",
        truncated.to_str().unwrap(),
        "--data-dir",
        scratch.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("not a valid chainsight backup"),
        "{stderr}"
    );
    assert!(
        !scratch.join("store").exists(),
        "a refused restore writes no store"
    );

    // Restore into a new node's data directory and start it.
    env.node_config_on("restored", 0, &node_extra);
    let restored_data = env.path().join("restored").join("data");
    let (ok, stdout, stderr) = cli(&[
        "admin",
        "restore",
        "--in",
        backup.to_str().unwrap(),
        "--data-dir",
        restored_data.to_str().unwrap(),
    ]);
    println!("{stdout}{stderr}");
    assert!(ok, "{stdout}{stderr}");
    let (ok, _, stderr) = cli(&[
        "admin",
        "restore",
        "--in",
        backup.to_str().unwrap(),
        "--data-dir",
        restored_data.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("already holds a store"), "{stderr}");
    assert_eq!(
        std::fs::read(restored_data.join("pseudonym.key")).unwrap(),
        std::fs::read(origin.data_dir().join("pseudonym.key")).unwrap(),
        "--include-keys carries the pseudonym key"
    );
    let restored = env.start("restored");

    // The same events (by id and cursor) up to the snapshot.
    let original: Vec<_> = stored(&origin, &maker)
        .await
        .into_iter()
        .filter(|(c, _)| *c <= last_seq)
        .collect();
    let copy = stored(&restored, &maker).await;
    assert_eq!(copy.len(), original.len());
    assert!(copy == original, "the restored node serves other events");
    // The same subscriber cursors.
    for (name, cursor) in [("bi-loader", 1234), ("app", 2000)] {
        assert_eq!(resumes_at(&origin, &maker, name).await, cursor + 1);
        assert_eq!(
            resumes_at(&restored, &maker, name).await,
            cursor + 1,
            "{name}"
        );
    }
    // The same insight feed.
    let (a, b) = (
        dairy_feed(&origin, &analyst).await,
        dairy_feed(&restored, &analyst).await,
    );
    assert!(!a.rows.is_empty() && a.rows.iter().map(|r| r.events).sum::<u64>() == 3000);
    assert_eq!(a, b, "the restored node answers the same query differently");
    // The whole feed of the restored node (rollup deltas that were only in
    // memory at the snapshot were refolded): every event up to the
    // snapshot, apparel ones included.
    let whole = pb::insights_client::InsightsClient::new(
        restored.channel(&analyst).await.expect("connect"),
    )
    .query(pb::InsightQuery {
        group_by: vec![pb::Dimension::Category as i32],
        ..Default::default()
    })
    .await
    .expect("query")
    .into_inner();
    let by_category: HashMap<String, u64> = whole
        .rows
        .iter()
        .map(|r| (r.key[0].clone(), r.events))
        .collect();
    assert_eq!(
        by_category.get("apparel").copied(),
        Some(last_seq - 3000),
        "{whole:?}"
    );
    assert_eq!(by_category.get("dairy").copied(), Some(3000), "{whole:?}");
    println!(
        "restored: {} events up to seq {last_seq}, cursors 1234 and 2000, {} feed rows alike, {by_category:?}",
        copy.len(),
        a.rows.len()
    );

    // Without --include-keys the file holds no key, and the restore says
    // to copy it in.
    let keyless = env.path().join("keyless.backup");
    let (ok, stdout, stderr) = cli(&[
        "admin",
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--out",
        keyless.to_str().unwrap(),
    ]);
    assert!(ok && stdout.contains("no keys"), "{stdout}{stderr}");
    let bare = env.path().join("bare").join("data");
    let (ok, stdout, stderr) = cli(&[
        "admin",
        "restore",
        "--in",
        keyless.to_str().unwrap(),
        "--data-dir",
        bare.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("copy the node's pseudonym.key"), "{stdout}");
    assert!(bare.join("store").is_dir() && !bare.join("pseudonym.key").exists());
    let key = std::fs::read(origin.data_dir().join("pseudonym.key")).unwrap();
    let file = std::fs::read(&keyless).unwrap();
    assert!(
        !file.windows(key.len()).any(|w| w == key.as_slice()),
        "the key's bytes are not in a backup taken without --include-keys"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keyless).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "a backup is readable by its owner only"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_crl_and_fewer_roles_cuts_off_revoked_and_unlisted_identities() {
    let env = TestEnv::new();
    let maker = env.issue("maker-app");
    let bi = env.issue("maker-bi");
    let partner = env.issue("partner");
    let eshop = env.issue("retailer-eshop");
    let port = env.reserve_port();
    let config = env.node_config_on(
        "node",
        port,
        &roles(&[
            "publishers = [\"retailer-eshop\"]",
            "subscribers = [\"maker-app\", \"maker-bi\", \"partner\"]",
        ]),
    );
    let node = env.start("node");
    publish_all(&mut node.ingest(&eshop).await, mixed_events("e", 10)).await;
    // maker-app's connection, opened before the revocation.
    let mut before =
        pb::signals_client::SignalsClient::new(node.channel(&maker).await.expect("connect"));
    let backfill = |client: &mut pb::signals_client::SignalsClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            let mut stream = client
                .subscribe(pb::SubscribeRequest {
                    filter: Some(pb::Filter::default()),
                    after_cursor: 0,
                    follow: false,
                    name: String::new(),
                })
                .await?
                .into_inner();
            let mut n = 0;
            while stream.message().await?.is_some() {
                n += 1;
            }
            Ok::<usize, tonic::Status>(n)
        }
    };
    assert_eq!(backfill(&mut before).await.expect("before"), 10);
    // partner follows live, from before the reload that removes its role.
    let mut follow = common::subscribe(&node, &partner, common::subscription(0, true, ""))
        .await
        .into_inner();
    for _ in 0..10 {
        follow
            .message()
            .await
            .expect("signal")
            .expect("one of the 10");
    }

    // Revoke maker-app with the CLI, list the CRL in node.toml, SIGHUP.
    let (ok, stdout, stderr) = cli(&[
        "certs",
        "revoke",
        "--dir",
        env.certs_dir().to_str().unwrap(),
        "maker-app",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let crl = env.certs_dir().join("crl.pem");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "handshake_timeout_secs = 3\n",
            &format!(
                "handshake_timeout_secs = 3\ncrls = [\"{}\"]\n",
                crl.display()
            ),
        )
        .replace(", \"partner\"]", "]"),
    )
    .unwrap();
    node.send_sighup();
    wait_log(&node, "config reloaded", 1).await;
    assert!(
        node.log().contains("tls (certificate, key and CRLs"),
        "{}",
        node.log()
    );

    // A new connection as maker-app is refused at the handshake (the node
    // says why); maker-bi still connects.
    let refused = match node.channel(&maker).await {
        Err(e) => e.to_string(),
        Ok(channel) => {
            let mut c = pb::signals_client::SignalsClient::new(channel);
            match backfill(&mut c).await {
                Err(status) => status.to_string(),
                Ok(n) => panic!("a revoked certificate got {n} signals on a new connection"),
            }
        }
    };
    println!("maker-app after revocation, new connection: {refused}");
    wait_log(&node, "Revoked", 1).await;
    let mut other =
        pb::signals_client::SignalsClient::new(node.channel(&bi).await.expect("maker-bi connects"));
    assert_eq!(backfill(&mut other).await.expect("maker-bi"), 10);
    // The connection maker-app opened before is still up, but its
    // requests are refused now; partner's running stream ended.
    let status = backfill(&mut before)
        .await
        .expect_err("a revoked certificate on an established connection");
    println!("maker-app after revocation, established connection: {status}");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), follow.message())
        .await
        .expect("the stream ends without waiting for new events");
    let status = ended.expect_err("the stream ends with a status");
    println!("partner's follow stream after its role was removed: {status}");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    // And a CRL file that is not one refuses the reload; the CRL in force stays.
    std::fs::write(&crl, "not a CRL").unwrap();
    let (ok, _, stderr) = cli(&["admin", "reload", "--config", config.to_str().unwrap()]);
    println!("admin reload with a bad CRL file: {stderr}");
    assert!(
        !ok && stderr.contains("certificate revocation list"),
        "{stderr}"
    );
    let still_refused = match node.channel(&maker).await {
        Err(_) => true,
        Ok(channel) => backfill(&mut pb::signals_client::SignalsClient::new(channel))
            .await
            .is_err(),
    };
    assert!(still_refused, "the refused reload dropped the CRL in force");
    assert_eq!(backfill(&mut other).await.expect("maker-bi"), 10);
}

/// The serial of the certificate the node at `addr` presents, read by a
/// plain rustls client holding `files`.
async fn served_serial(
    addr: SocketAddr,
    server_name: &str,
    files: &chainsight::config::TlsFiles,
) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in chainsight::tls::load_certs(&files.ca).unwrap() {
        roots.add(ca).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(chainsight::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chainsight::tls::load_certs(&files.cert).unwrap(),
            chainsight::tls::load_key(&files.key).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    parsed.raw_serial().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_node_certificate_is_served_after_sighup_without_dropping_a_running_stream() {
    let env = TestEnv::new();
    let reader = env.issue("maker-app");
    let eshop = env.issue("retailer-eshop");
    let port = env.reserve_port();
    env.node_config_on(
        "node",
        port,
        &roles(&[
            "publishers = [\"retailer-eshop\"]",
            "subscribers = [\"maker-app\"]",
        ]),
    );
    let node = env.start("node");
    let before = served_serial(node.addr, "node", &reader).await;
    let mut follow = common::subscribe(&node, &reader, common::subscription(0, true, ""))
        .await
        .into_inner();
    let mut ingest = node.ingest(&eshop).await;
    publish_all(&mut ingest, mixed_events("before", 5)).await;
    for _ in 0..5 {
        follow.message().await.expect("signal").expect("event");
    }

    // A new certificate and key for the node, under the same file names.
    let rotated = env.issue("node");
    let (_, new_pem) =
        x509_parser::pem::parse_x509_pem(&std::fs::read(&rotated.cert).unwrap()).unwrap();
    let new_serial = new_pem.parse_x509().unwrap().raw_serial().to_vec();
    assert_ne!(new_serial, before);
    node.send_sighup();
    wait_log(&node, "config reloaded", 1).await;

    let after = served_serial(node.addr, "node", &reader).await;
    println!(
        "served certificate serial before {:02x?}, after SIGHUP {:02x?} (the new file's)",
        before, after
    );
    assert_eq!(
        after, new_serial,
        "new connections get the rotated certificate"
    );
    // The stream opened before the rotation is still served.
    publish_all(&mut ingest, mixed_events("after", 5)).await;
    for i in 0..5 {
        let signal = tokio::time::timeout(std::time::Duration::from_secs(10), follow.message())
            .await
            .expect("the running stream still delivers")
            .expect("signal")
            .expect("event");
        assert_eq!(signal.event.unwrap().event_id, format!("after-{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_replaced_on_disk_is_put_in_force_without_a_reload() {
    let env = TestEnv::new();
    let maker = env.issue("maker-app");
    let bi = env.issue("maker-bi");
    env.issue("nobody");
    // A CRL from the start (revoking an identity nobody uses).
    let (ok, stdout, stderr) = cli(&[
        "certs",
        "revoke",
        "--dir",
        env.certs_dir().to_str().unwrap(),
        "nobody",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let crl = env.certs_dir().join("crl.pem");
    let config = env.node_config(
        "node",
        &roles(&["subscribers = [\"maker-app\", \"maker-bi\"]"]),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "handshake_timeout_secs = 3\n",
            &format!(
                "handshake_timeout_secs = 3\ncrls = [\"{}\"]\nwatch_secs = 1\n",
                crl.display()
            ),
        ),
    )
    .unwrap();
    let node = env.start("node");
    let channel = node.channel(&maker).await.expect("connect");
    let ack = |channel: tonic::transport::Channel| async move {
        pb::signals_client::SignalsClient::new(channel)
            .ack(pb::AckRequest {
                name: "n".into(),
                cursor: 0,
            })
            .await
    };
    ack(channel.clone()).await.expect("before the revocation");

    // Revoke maker-app: the CRL file changes; no SIGHUP, no admin reload.
    let (ok, stdout, stderr) = cli(&[
        "certs",
        "revoke",
        "--dir",
        env.certs_dir().to_str().unwrap(),
        "maker-app",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let start = std::time::Instant::now();
    let status = loop {
        match ack(channel.clone()).await {
            Err(status) => break status,
            Ok(_) => {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(10),
                    "the replaced CRL was not put in force within 10 s:\n{}",
                    node.log()
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    println!(
        "CRL replaced on disk: in force after {:?} (watch_secs = 1): {status}",
        start.elapsed()
    );
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    assert!(
        node.log().contains("tls (files changed on disk)"),
        "{}",
        node.log()
    );
    ack(node.channel(&bi).await.expect("maker-bi connects"))
        .await
        .expect("maker-bi is not revoked");
}
