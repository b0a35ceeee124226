mod common;

// Insight feeds (`Insights.Query`, `chainsight query`), black-box against
// real node processes: every metric of every returned row is compared with
// a plain fold over the events the test published (or, after a crash, over
// the events the store actually holds).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chainsight::config::TlsFiles;
use chainsight::domain::{Country, PreferenceEvent};
use chainsight::pb;
use common::*;
use pb::{Dimension as D, TimeBucket};

// ---------------------------------------------------------------------------
// Generated datasets

/// (GTIN-13, category, brand): two GS1 company prefixes, 4740001 and 4750002.
const PRODUCTS: &[(&str, &str, &str)] = &[
    ("4740001000017", "dairy", "Põlluvara"),
    ("4740001000024", "bakery", "Põlluvara"),
    ("4750002000015", "dairy", "Nordic Mills"),
    ("4750002000022", "snacks", "Nordic Mills"),
];

/// (country, postal code): EE-10, EE-50, EE-80, LV-1, FI-00, DE-80, JP, EE.
const PLACES: &[(&str, &str)] = &[
    ("EE", "10115"),
    ("EE", "50090"),
    ("EE", "80010"),
    ("LV", "LV-1050"),
    ("FI", "00100"),
    ("DE", "80331"),
    ("JP", "100-0001"),
    ("EE", ""),
];

const SIZES: &[&str] = &["S", "M", "L", "XL"];

/// splitmix64: a small deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Clone)]
struct Customer {
    id: String,
    country: &'static str,
    postal: &'static str,
    birth_year: u32,
}

fn customers(rng: &mut Rng, n: usize) -> Vec<Customer> {
    (0..n)
        .map(|i| {
            let (country, postal) = *rng.pick(PLACES);
            Customer {
                id: format!("customer-{i:03}"),
                country,
                postal,
                birth_year: 1940 + rng.below(70) as u32,
            }
        })
        .collect()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A random event `id` of a random product: one of purchase, return, review,
/// NPS or stated preference (with a "size"), by one of `custs` (about 3 % have
/// no customer at all), in `channel`s WEB/STORE/MOBILE_APP, at a whole second
/// in the `days` before the last hour.
fn random_event(rng: &mut Rng, id: String, custs: &[Customer], days: i64) -> pb::CustomerEvent {
    let (gtin, category, brand) = *rng.pick(PRODUCTS);
    let roll = rng.below(100);
    let kind = match roll {
        0..=34 => pb::EventKind::Purchase,
        35..=44 => pb::EventKind::Return,
        45..=64 => pb::EventKind::Review,
        65..=79 => pb::EventKind::Nps,
        _ => pb::EventKind::Preference,
    };
    let score = match kind {
        pb::EventKind::Review => Some(1 + rng.below(5) as u32),
        pb::EventKind::Nps => Some(rng.below(11) as u32),
        _ => None,
    };
    let mut attributes = BTreeMap::new();
    if kind == pb::EventKind::Preference || (kind == pb::EventKind::Purchase && rng.below(3) == 0) {
        attributes.insert("size".to_string(), rng.pick(SIZES).to_string());
    }
    if rng.below(4) == 0 {
        attributes.insert("colour".to_string(), rng.pick(&["red", "blue"]).to_string());
    }
    let channel = *rng.pick(&[pb::Channel::Web, pb::Channel::Store, pb::Channel::MobileApp]);
    let stage = *rng.pick(&[
        pb::JourneyStage::Awareness,
        pb::JourneyStage::Consideration,
        pb::JourneyStage::Purchase,
        pb::JourneyStage::PostPurchase,
    ]);
    let occurred = now_secs() - 3600 - rng.below((days * 86_400) as u64) as i64;
    let mut ev = pb::CustomerEvent {
        event_id: id,
        kind: kind as i32,
        occurred_at: Some(pbjson_types::Timestamp {
            seconds: occurred,
            nanos: 0,
        }),
        product: Some(pb::Product {
            gtin: gtin.into(),
            category: category.into(),
            brand: brand.into(),
        }),
        channel: channel as i32,
        stage: stage as i32,
        attributes,
        score,
        quantity: 1 + rng.below(3) as u32,
        ..Default::default()
    };
    if rng.below(100) >= 3 {
        let c = rng.pick(custs);
        ev.customer_id = c.id.clone();
        ev.country = c.country.into();
        ev.postal_code = c.postal.into();
        ev.birth_year = c.birth_year;
    } else if rng.below(2) == 0 {
        // Anonymous, but with a place.
        ev.country = "EE".into();
        ev.postal_code = "10115".into();
    }
    ev
}

fn dataset(
    seed: u64,
    prefix: &str,
    n: usize,
    n_customers: usize,
    days: i64,
) -> Vec<pb::CustomerEvent> {
    let mut rng = Rng(seed);
    let custs = customers(&mut rng, n_customers);
    (0..n)
        .map(|i| random_event(&mut rng, format!("{prefix}-{i:05}"), &custs, days))
        .collect()
}

// ---------------------------------------------------------------------------
// The independent model: what a stored event looks like to a query

/// The dimensions and measures of one event, as the test expects the node
/// to see it.
#[derive(Clone, Debug)]
struct Ev {
    id: String,
    secs: i64,
    gtin: String,
    category: String,
    brand: String,
    region: String,
    channel: String,
    stage: String,
    kind: String,
    age_band: String,
    attributes: BTreeMap<String, String>,
    score: Option<u32>,
    /// Distinct-customer key: the customer id (published) or pseudonym (stored).
    customer: Option<String>,
}

/// "CHANNEL_MOBILE_APP" → "mobile_app".
fn label(proto_name: &str, prefix: &str) -> String {
    proto_name.trim_start_matches(prefix).to_ascii_lowercase()
}

fn year_of(secs: i64) -> i32 {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .year()
}

/// What the node should make of a published event (anonymised at the edge).
fn expected(ev: &pb::CustomerEvent) -> Ev {
    let p = ev.product.as_ref().unwrap();
    let secs = ev.occurred_at.as_ref().unwrap().seconds;
    let postal = ev.postal_code.trim();
    let country = (!ev.country.trim().is_empty()).then(|| Country::parse(&ev.country).unwrap());
    Ev {
        id: ev.event_id.clone(),
        secs,
        gtin: if p.gtin.len() == 13 {
            format!("0{}", p.gtin)
        } else {
            p.gtin.clone()
        },
        category: p.category.trim().to_string(),
        brand: p.brand.trim().to_string(),
        region: chainsight::anonymise::region(country, (!postal.is_empty()).then_some(postal)),
        channel: label(
            pb::Channel::try_from(ev.channel).unwrap().as_str_name(),
            "CHANNEL_",
        ),
        stage: label(
            pb::JourneyStage::try_from(ev.stage).unwrap().as_str_name(),
            "JOURNEY_STAGE_",
        ),
        kind: label(
            pb::EventKind::try_from(ev.kind).unwrap().as_str_name(),
            "EVENT_KIND_",
        ),
        age_band: chainsight::anonymise::age_band(
            (ev.birth_year != 0).then_some(ev.birth_year as u16),
            year_of(secs),
        )
        .to_string(),
        attributes: ev
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        score: ev.score,
        customer: Some(ev.customer_id.trim().to_string()).filter(|c| !c.is_empty()),
    }
}

/// A stored (anonymised) event as the model sees it.
fn from_stored(ev: &PreferenceEvent) -> Ev {
    Ev {
        id: ev.event_id.clone(),
        secs: ev.occurred_at.0.div_euclid(1_000_000_000),
        gtin: ev.product.gtin.as_str().to_string(),
        category: ev.product.category.clone(),
        brand: ev.product.brand.clone(),
        region: ev.region.clone(),
        channel: ev.channel.label().to_string(),
        stage: ev.stage.label().to_string(),
        kind: ev.kind.label().to_string(),
        age_band: ev.age_band.clone(),
        attributes: ev.attributes.clone(),
        score: ev.score,
        customer: Some(ev.customer_pseudonym.clone()).filter(|c| !c.is_empty()),
    }
}

/// The first second of the bucket `secs` falls in (UTC; weeks start on Monday).
fn bucket_start(secs: i64, bucket: TimeBucket) -> i64 {
    let day = secs.div_euclid(86_400);
    match bucket {
        TimeBucket::Hour => secs.div_euclid(3600) * 3600,
        TimeBucket::Day => day * 86_400,
        // 1970-01-01 was a Thursday: day 0 is 3 days after a Monday.
        TimeBucket::Week => (day - (day + 3).rem_euclid(7)) * 86_400,
        TimeBucket::Month => {
            let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
            t.date()
                .replace_day(1)
                .unwrap()
                .midnight()
                .assume_utc()
                .unix_timestamp()
        }
        TimeBucket::Unspecified => panic!("no bucket"),
    }
}

fn rfc3339(secs: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A query and the same query as a predicate over the model.
struct Q {
    group_by: Vec<D>,
    attribute_key: &'static str,
    bucket: TimeBucket,
    filter: pb::Filter,
    limit: u32,
}

impl Q {
    fn by(group_by: &[D]) -> Self {
        Q {
            group_by: group_by.to_vec(),
            attribute_key: "",
            bucket: TimeBucket::Unspecified,
            filter: pb::Filter::default(),
            limit: 0,
        }
    }

    fn pb(&self) -> pb::InsightQuery {
        pb::InsightQuery {
            filter: Some(self.filter.clone()),
            group_by: self.group_by.iter().map(|d| *d as i32).collect(),
            attribute_key: self.attribute_key.to_string(),
            bucket: self.bucket as i32,
            limit: self.limit,
        }
    }

    /// The filter's meaning, written out independently of the node.
    fn matches(&self, e: &Ev) -> bool {
        let f = &self.filter;
        let gtin13 = &e.gtin[1..];
        let kind_names: Vec<String> = f
            .kinds
            .iter()
            .map(|k| {
                label(
                    pb::EventKind::try_from(*k).unwrap().as_str_name(),
                    "EVENT_KIND_",
                )
            })
            .collect();
        let channel_names: Vec<String> = f
            .channels
            .iter()
            .map(|c| label(pb::Channel::try_from(*c).unwrap().as_str_name(), "CHANNEL_"))
            .collect();
        (f.gtin_prefixes.is_empty() || f.gtin_prefixes.iter().any(|p| gtin13.starts_with(p)))
            && (f.categories.is_empty()
                || f.categories
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case(&e.category)))
            && (kind_names.is_empty() || kind_names.contains(&e.kind))
            && (channel_names.is_empty() || channel_names.contains(&e.channel))
            && (f.regions.is_empty()
                || f.regions
                    .iter()
                    .any(|r| e.region == *r || e.region.starts_with(&format!("{r}-"))))
            && f.since.is_none_or(|s| e.secs >= s.seconds)
            && f.until.is_none_or(|u| e.secs < u.seconds)
    }
}

#[derive(Default)]
struct Acc {
    events: u64,
    customers: HashSet<String>,
    score_sum: u64,
    score_n: u64,
    promoters: u64,
    detractors: u64,
    nps_n: u64,
    purchases: u64,
    returns: u64,
}

/// The documented size up to which a rollup cell (hour × all dimensions)
/// counts distinct customers exactly; above it HyperLogLog with a standard
/// error of 1.04/√2^HLL_P (3.25 %). Estimates are checked within 4 standard
/// errors: a correct sketch falls outside about once in 16,000 rows.
const EXACT_LIMIT: usize = 64;
fn hll_bound() -> f64 {
    4.0 * 1.04 / f64::from(1u32 << chainsight::rollup::HLL_P).sqrt()
}

#[derive(Debug, Clone, PartialEq)]
struct Row {
    key: Vec<String>,
    bucket_start: Option<i64>,
    events: u64,
    customers: u64,
    avg_score: Option<f64>,
    nps: Option<f64>,
    return_rate: Option<f64>,
    share: f64,
    /// `customers` is exact in the fold, the node's may be an estimate.
    approx: bool,
}

struct Expected {
    rows: Vec<Row>,
    suppressed: u32,
}

/// The plain fold: group the matching events, compute every metric, hide the
/// groups with fewer than `k_min` distinct customers, sort.
///
/// Grouping by ATTRIBUTE looks only at events that carry `attribute_key`; the
/// shares of such a query are still of all the events that matched the
/// filter, as the design defines share.
///
/// Every rollup cell the node merges into a group holds a subset of the
/// group's events, so a group of at most EXACT_LIMIT customers is counted
/// exactly; a larger one may be an estimate.
fn fold(events: &[Ev], q: &Q, k_min: u32) -> Expected {
    let by_attr = q.group_by.contains(&D::Attribute);
    let mut groups: BTreeMap<(Vec<String>, Option<i64>), Acc> = BTreeMap::new();
    let mut total = 0u64;
    for e in events {
        if !q.matches(e) {
            continue;
        }
        total += 1;
        let attr = if by_attr {
            match e.attributes.get(q.attribute_key) {
                Some(v) => Some(v.clone()),
                None => continue,
            }
        } else {
            None
        };
        let bucket = q
            .group_by
            .contains(&D::Time)
            .then(|| bucket_start(e.secs, q.bucket));
        let key = q
            .group_by
            .iter()
            .map(|d| match d {
                D::Gtin => e.gtin.clone(),
                D::Category => e.category.clone(),
                D::Brand => e.brand.clone(),
                D::Region => e.region.clone(),
                D::Channel => e.channel.clone(),
                D::Stage => e.stage.clone(),
                D::Kind => e.kind.clone(),
                D::AgeBand => e.age_band.clone(),
                D::Attribute => attr.clone().unwrap(),
                D::Time => rfc3339(bucket.unwrap()),
                D::Unspecified => unreachable!(),
            })
            .collect();
        let a = groups.entry((key, bucket)).or_default();
        a.events += 1;
        if let Some(c) = &e.customer {
            a.customers.insert(c.clone());
        }
        match (e.kind.as_str(), e.score) {
            ("review", Some(s)) => {
                a.score_sum += u64::from(s);
                a.score_n += 1;
            }
            ("nps", Some(s)) => {
                a.nps_n += 1;
                a.promoters += u64::from(s >= 9);
                a.detractors += u64::from(s <= 6);
            }
            _ => {}
        }
        a.purchases += u64::from(e.kind == "purchase");
        a.returns += u64::from(e.kind == "return");
    }
    let mut suppressed = 0;
    let mut rows = Vec::new();
    for ((key, bucket_start), a) in groups {
        if (a.customers.len() as u64) < u64::from(k_min) || a.customers.is_empty() {
            suppressed += 1;
            continue;
        }
        rows.push(Row {
            key,
            bucket_start,
            events: a.events,
            customers: a.customers.len() as u64,
            avg_score: (a.score_n > 0).then(|| a.score_sum as f64 / a.score_n as f64),
            nps: (a.nps_n > 0).then(|| {
                (a.promoters as f64 / a.nps_n as f64 - a.detractors as f64 / a.nps_n as f64) * 100.0
            }),
            return_rate: (a.purchases > 0).then(|| a.returns as f64 / a.purchases as f64),
            share: a.events as f64 / total as f64,
            approx: a.customers.len() > EXACT_LIMIT,
        });
    }
    rows.sort_by(|a, b| b.events.cmp(&a.events).then_with(|| a.key.cmp(&b.key)));
    Expected { rows, suppressed }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

fn close_opt(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => close(a, b),
        _ => false,
    }
}

/// Asserts the report equals the fold, row by row and metric by metric.
fn assert_report(what: &str, got: &pb::InsightReport, exp: &Expected, k_min: u32, limit: u32) {
    if let Err(e) = report_diff(what, got, exp, k_min, limit) {
        panic!("{e}");
    }
}

/// Where the report differs from the fold, if it does.
fn report_diff(
    what: &str,
    got: &pb::InsightReport,
    exp: &Expected,
    k_min: u32,
    limit: u32,
) -> Result<(), String> {
    macro_rules! ensure {
        ($cond:expr, $($msg:tt)+) => {
            if !$cond {
                return Err(format!($($msg)+));
            }
        };
    }
    ensure!(got.k_min == k_min, "{what}: k_min {} != {k_min}", got.k_min);
    ensure!(
        got.suppressed_groups == exp.suppressed,
        "{what}: suppressed_groups {} != {}",
        got.suppressed_groups,
        exp.suppressed
    );
    let want: Vec<&Row> = if limit > 0 {
        exp.rows.iter().take(limit as usize).collect()
    } else {
        exp.rows.iter().collect()
    };
    ensure!(
        got.rows.len() == want.len(),
        "{what}: {} rows, want {}\n got keys {:?}\nwant keys {:?}",
        got.rows.len(),
        want.len(),
        got.rows.iter().map(|r| &r.key).collect::<Vec<_>>(),
        want.iter().map(|r| &r.key).collect::<Vec<_>>()
    );
    for (i, (g, w)) in got.rows.iter().zip(&want).enumerate() {
        let ctx = format!("{what}: row {i} {:?}\n got {g:?}\nwant {w:?}", w.key);
        ensure!(g.key == w.key, "key: {ctx}");
        ensure!(
            g.bucket_start.map(|t| (t.seconds, t.nanos)) == w.bucket_start.map(|s| (s, 0)),
            "bucket_start: {ctx}"
        );
        ensure!(g.events == w.events, "events: {ctx}");
        if w.approx {
            let bound = (hll_bound() * w.customers as f64).ceil() as u64;
            ensure!(
                g.customers.abs_diff(w.customers) <= bound,
                "customers beyond the sketch bound ±{bound}: {ctx}"
            );
        } else {
            ensure!(g.customers == w.customers, "customers: {ctx}");
        }
        ensure!(close_opt(g.avg_score, w.avg_score), "avg_score: {ctx}");
        ensure!(close_opt(g.nps, w.nps), "nps: {ctx}");
        ensure!(
            close_opt(g.return_rate, w.return_rate),
            "return_rate: {ctx}"
        );
        ensure!(close(g.share, w.share), "share: {ctx}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Nodes and clients

const ANALYST: &str = "analyst";
const PUBLISHER: &str = "retailer-eshop";

/// node.toml extras: the publisher, the analysts, k_min and more.
fn node_extra(analysts: &[&str], k_min: u32, more: &str) -> String {
    let analysts: Vec<String> = analysts.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "{}[privacy]\nk_min = {k_min}\n{more}",
        roles(&[
            &format!("publishers = [{PUBLISHER:?}]"),
            &format!("analysts = [{}]", analysts.join(", ")),
        ])
    )
}

/// A retailer node with the given extras; returns it with the publisher's
/// and the analyst's certificates.
fn start_retailer(env: &TestEnv, extra: &str) -> (NodeProc, TlsFiles, TlsFiles) {
    env.node_config("retailer", extra);
    let publisher = env.issue(PUBLISHER);
    let analyst = env.issue(ANALYST);
    (env.start("retailer"), publisher, analyst)
}

async fn query(
    node: &NodeProc,
    files: &TlsFiles,
    q: pb::InsightQuery,
) -> Result<pb::InsightReport, tonic::Status> {
    let channel = node
        .channel(files)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", node.log()));
    pb::insights_client::InsightsClient::new(channel)
        .query(q)
        .await
        .map(tonic::Response::into_inner)
}

/// Runs `q` and compares it with the fold over `events`.
async fn check(what: &str, node: &NodeProc, analyst: &TlsFiles, events: &[Ev], q: &Q, k_min: u32) {
    let got = query(node, analyst, q.pb())
        .await
        .unwrap_or_else(|s| panic!("{what}: {s:?}"));
    let exp = fold(events, q, k_min);
    assert!(!exp.rows.is_empty(), "{what}: the dataset should give rows");
    assert_report(what, &got, &exp, k_min, q.limit);
}

/// Rewrites `[privacy] k_min` in the node's node.toml.
fn set_k_min(node: &NodeProc, k_min: u32) {
    let path = node.dir.join("node.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("k_min") {
            out.push_str(&format!("k_min = {k_min}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_ne!(out, text, "node.toml has no k_min line");
    std::fs::write(&path, out).unwrap();
}

fn ts(secs: i64) -> Option<pbjson_types::Timestamp> {
    Some(pbjson_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_equal_an_independent_fold() {
    let env = TestEnv::new();
    let (node, publisher, analyst) = start_retailer(&env, &node_extra(&[ANALYST], 1, ""));
    let published = dataset(0x5eed_0001, "m", 3000, 60, 10);
    let events: Vec<Ev> = published.iter().map(expected).collect();
    publish_all(&mut node.ingest(&publisher).await, published).await;

    // The dataset exercises what the metrics need.
    assert!(events.iter().any(|e| e.customer.is_none()));
    assert!(events.iter().map(|e| year_of(e.secs)).all(|y| y > 2000));
    let days: HashSet<i64> = events.iter().map(|e| e.secs.div_euclid(86_400)).collect();
    assert!(days.len() >= 9, "events spread over {} days", days.len());

    check(
        "category",
        &node,
        &analyst,
        &events,
        &Q::by(&[D::Category]),
        1,
    )
    .await;
    check(
        "category+kind",
        &node,
        &analyst,
        &events,
        &Q::by(&[D::Category, D::Kind]),
        1,
    )
    .await;
    let gtin_channel = Q::by(&[D::Gtin, D::Channel]);
    check("gtin+channel", &node, &analyst, &events, &gtin_channel, 1).await;
    check(
        "brand+stage+age band",
        &node,
        &analyst,
        &events,
        &Q::by(&[D::Brand, D::Stage, D::AgeBand]),
        1,
    )
    .await;

    // Rows come sorted by events descending, then key; limit keeps the first.
    let limited = Q {
        limit: 5,
        ..Q::by(&[D::Gtin, D::Channel])
    };
    check(
        "gtin+channel, limit 5",
        &node,
        &analyst,
        &events,
        &limited,
        1,
    )
    .await;
    let all = query(&node, &analyst, gtin_channel.pb()).await.unwrap();
    assert!(all.rows.len() > 5);
    assert!(all
        .rows
        .windows(2)
        .all(|w| (w[0].events, &w[1].key) >= (w[1].events, &w[0].key)));
    let shares: f64 = all.rows.iter().map(|r| r.share).sum();
    assert!(shares <= 1.0 + 1e-9, "shares add up to {shares}");

    // Days: bucket_start is the UTC midnight, the key its RFC 3339 form.
    let by_day = Q {
        bucket: TimeBucket::Day,
        ..Q::by(&[D::Time])
    };
    check("time by day", &node, &analyst, &events, &by_day, 1).await;
    let days = query(&node, &analyst, by_day.pb()).await.unwrap();
    for r in &days.rows {
        let start = r.bucket_start.expect("bucket_start");
        assert_eq!((start.seconds % 86_400, start.nanos), (0, 0), "{r:?}");
        assert_eq!(r.key, [rfc3339(start.seconds)]);
    }
    check(
        "category+time by week",
        &node,
        &analyst,
        &events,
        &Q {
            bucket: TimeBucket::Week,
            ..Q::by(&[D::Category, D::Time])
        },
        1,
    )
    .await;

    // Attribute values: all stated preferences carry a size.
    let sizes = Q {
        attribute_key: "size",
        filter: pb::Filter {
            kinds: vec![pb::EventKind::Preference as i32],
            ..Default::default()
        },
        ..Q::by(&[D::Attribute])
    };
    check("size of preferences", &node, &analyst, &events, &sizes, 1).await;
    let size_kind = Q {
        attribute_key: "size",
        ..Q::by(&[D::Attribute, D::Kind])
    };
    check("size+kind", &node, &analyst, &events, &size_kind, 1).await;

    check("region", &node, &analyst, &events, &Q::by(&[D::Region]), 1).await;
    let regions = query(&node, &analyst, Q::by(&[D::Region]).pb())
        .await
        .unwrap();
    let names: HashSet<&str> = regions.rows.iter().map(|r| r.key[0].as_str()).collect();
    for want in ["EE-10", "EE-50", "LV-1", "DE-80", "JP", "EE"] {
        assert!(names.contains(want), "region {want} missing from {names:?}");
    }

    // Filtered queries, over whole hours and over partial ones.
    let now_hour = now_secs() / 3600 * 3600;
    let filtered = Q {
        filter: pb::Filter {
            gtin_prefixes: vec!["4750002".into()],
            channels: vec![pb::Channel::Web as i32, pb::Channel::MobileApp as i32],
            regions: vec!["EE".into()],
            since: ts(now_hour - 7 * 86_400),
            until: ts(now_hour - 2 * 86_400),
            ..Default::default()
        },
        ..Q::by(&[D::Category, D::Kind, D::Region])
    };
    check(
        "filtered, whole hours",
        &node,
        &analyst,
        &events,
        &filtered,
        1,
    )
    .await;
    let filtered = Q {
        filter: pb::Filter {
            gtin_prefixes: vec!["4750002".into()],
            kinds: vec![pb::EventKind::Review as i32, pb::EventKind::Nps as i32],
            categories: vec!["DAIRY".into()],
            since: ts(now_hour - 6 * 86_400 - 1234),
            until: ts(now_hour - 86_400 - 777),
            ..Default::default()
        },
        ..Q::by(&[D::Category, D::Kind, D::Region])
    };
    check("filtered", &node, &analyst, &events, &filtered, 1).await;
}

/// `since` and `until` are instants (occurred_at >= since, < until), not
/// whole hours: windows inside one hour, across hours, open on either side,
/// on whole hours and on the very second of an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_window_is_exact() {
    let env = TestEnv::new();
    let (node, publisher, analyst) = start_retailer(&env, &node_extra(&[ANALYST], 1, ""));
    let h = now_secs() / 3600 * 3600 - 7 * 3600;
    let mut rng = Rng(0x5eed_0006);
    let custs = customers(&mut rng, 20);
    // One event every 3 minutes for 6 hours.
    let published: Vec<pb::CustomerEvent> = (0..120)
        .map(|i| {
            let mut e = random_event(&mut rng, format!("w-{i}"), &custs, 1);
            e.occurred_at = ts(h + i * 180);
            e
        })
        .collect();
    let events: Vec<Ev> = published.iter().map(expected).collect();
    publish_all(&mut node.ingest(&publisher).await, published).await;
    let m = 60;
    let windows = [
        (
            "inside one hour",
            Some(h + 3600 + 10 * m + 30),
            Some(h + 3600 + 40 * m),
        ),
        (
            "across hours",
            Some(h + 10 * m + 30),
            Some(h + 4 * 3600 + 17 * m),
        ),
        ("since only", Some(h + 2 * 3600 + 5 * m + 1), None),
        ("until only", None, Some(h + 3 * 3600 + 59 * m + 59)),
        ("whole hours", Some(h + 3600), Some(h + 3 * 3600)),
        (
            "on events",
            Some(h + 2 * 3600 + 9 * m),
            Some(h + 5 * 3600 + 21 * m),
        ),
    ];
    for (what, since, until) in windows {
        let filter = pb::Filter {
            since: since.and_then(ts),
            until: until.and_then(ts),
            ..Default::default()
        };
        let by_hour = Q {
            filter: filter.clone(),
            bucket: TimeBucket::Hour,
            ..Q::by(&[D::Time])
        };
        check(what, &node, &analyst, &events, &by_hour, 1).await;
        let by_kind = Q {
            filter,
            ..Q::by(&[D::Category, D::Kind])
        };
        check(what, &node, &analyst, &events, &by_kind, 1).await;
    }
}

/// Retention removes events and the rollup cells of purged hours together:
/// queries agree with the events that are left, including in the hour the
/// cutoff falls in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn retention_keeps_rollups_consistent_with_events() {
    let env = TestEnv::new();
    let now = now_secs();
    // The cutoff lies in the middle of an hour four hours ago, minutes from
    // every event, so it passes none while the test runs.
    let h = now / 3600 * 3600 - 4 * 3600;
    let cutoff = h + 1800;
    let retention = format!(
        "[retention]\nmax_age = \"{}s\"\ncheck_every = \"100ms\"\n",
        now - cutoff
    );
    let (mut node, publisher, analyst) =
        start_retailer(&env, &node_extra(&[ANALYST], 1, &retention));
    let mut rng = Rng(0x5eed_0007);
    let custs = customers(&mut rng, 20);
    // Every 10 minutes from two hours before the cutoff's hour on.
    let published: Vec<pb::CustomerEvent> = (0..30)
        .map(|i| h - 2 * 3600 + 5 * 60 + i * 600)
        .filter(|t| (t - cutoff).abs() >= 300)
        .enumerate()
        .map(|(i, t)| {
            let mut e = random_event(&mut rng, format!("t-{i}"), &custs, 1);
            e.occurred_at = ts(t);
            e
        })
        .collect();
    let events: Vec<Ev> = published.iter().map(expected).collect();
    assert!(events.iter().any(|e| e.secs < cutoff && e.secs >= h));
    publish_all(&mut node.ingest(&publisher).await, published).await;

    // Wait until the hours wholly before the cutoff are gone from the feed,
    // and retention (every 100 ms) has run several times since the last
    // publish: a run during publishing removes the rollups of the early
    // hours at once (queries never read cells before the retention horizon)
    // while events published after it wait for the next run.
    let by_hour = Q {
        bucket: TimeBucket::Hour,
        ..Q::by(&[D::Time, D::Kind])
    };
    let start = Instant::now();
    loop {
        if start.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let got = query(&node, &analyst, by_hour.pb()).await.unwrap();
        let oldest = got
            .rows
            .iter()
            .filter_map(|r| r.bucket_start)
            .map(|t| t.seconds)
            .min();
        if oldest >= Some(h) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "retention did not run: {got:?}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The feed equals a fold over the events that are left.
    node.terminate();
    let stored: Vec<Ev> = node
        .open_store()
        .scan_after(0)
        .map(|item| from_stored(&item.expect("stored event").1))
        .collect();
    assert!(stored.iter().all(|e| e.secs >= h), "purged hours");
    assert!(stored.iter().all(|e| e.secs >= cutoff - 3600));
    node.restart();
    check(
        "hour after retention",
        &node,
        &analyst,
        &stored,
        &by_hour,
        1,
    )
    .await;
    check(
        "category after retention",
        &node,
        &analyst,
        &stored,
        &Q::by(&[D::Category]),
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_groups_are_suppressed_and_k_min_applies() {
    let env = TestEnv::new();
    let (mut node, publisher, analyst) = start_retailer(&env, &node_extra(&[ANALYST], 10, ""));
    let mut rng = Rng(0x5eed_0002);
    let custs = customers(&mut rng, 40);
    let mut published = Vec::new();
    // (category, customers by index range, events per customer, anonymous events)
    let plan: &[(&str, std::ops::Range<usize>, usize, usize)] = &[
        ("dairy", 0..25, 2, 5),
        ("bakery", 5..17, 2, 0),
        ("snacks", 20..29, 3, 2),
        ("spices", 30..33, 4, 0),
        ("frozen", 0..0, 0, 8),
    ];
    for (category, range, per_customer, anonymous) in plan.iter().cloned() {
        let n = range.len() * per_customer + anonymous;
        for i in 0..n {
            let id = format!("s-{category}-{i}");
            let mut e = random_event(&mut rng, id, &custs, 2);
            e.product.as_mut().unwrap().category = category.into();
            if i < range.len() * per_customer {
                let c = &custs[range.start + i % range.len()];
                e.customer_id = c.id.clone();
                e.country = c.country.into();
                e.postal_code = c.postal.into();
                e.birth_year = c.birth_year;
            } else {
                e.customer_id = String::new();
            }
            published.push(e);
        }
    }
    let events: Vec<Ev> = published.iter().map(expected).collect();
    publish_all(&mut node.ingest(&publisher).await, published).await;

    let by_category = Q::by(&[D::Category]);
    let r = query(&node, &analyst, by_category.pb()).await.unwrap();
    let rows: Vec<(&str, u64, u64)> = r
        .rows
        .iter()
        .map(|r| (r.key[0].as_str(), r.events, r.customers))
        .collect();
    // Anonymous events count toward events, not customers.
    assert_eq!(rows, [("dairy", 55, 25), ("bakery", 24, 12)]);
    assert_eq!((r.suppressed_groups, r.k_min), (3, 10));
    check("category, k 10", &node, &analyst, &events, &by_category, 10).await;
    let category_kind = Q::by(&[D::Category, D::Kind]);
    check(
        "category+kind, k 10",
        &node,
        &analyst,
        &events,
        &category_kind,
        10,
    )
    .await;
    let exp = fold(&events, &category_kind, 10);
    assert!(exp.suppressed > 3, "some category+kind groups are small");

    // A lower k shows snacks (9 customers); a group made only of events
    // without a customer stays hidden even at k = 1.
    for (k, visible) in [
        (5, vec!["dairy", "snacks", "bakery"]),
        (1, vec!["dairy", "snacks", "bakery", "spices"]),
    ] {
        node.terminate();
        set_k_min(&node, k);
        node.restart();
        let r = query(&node, &analyst, by_category.pb()).await.unwrap();
        let keys: Vec<&str> = r.rows.iter().map(|r| r.key[0].as_str()).collect();
        assert_eq!(keys, visible, "k_min {k}");
        assert_eq!(r.k_min, k);
        assert_eq!(r.suppressed_groups as usize, 5 - visible.len(), "k_min {k}");
        check(
            &format!("category, k {k}"),
            &node,
            &analyst,
            &events,
            &by_category,
            k,
        )
        .await;
        check(
            &format!("category+kind, k {k}"),
            &node,
            &analyst,
            &events,
            &category_kind,
            k,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_survive_restart_and_kill9_mid_ingest() {
    let env = TestEnv::new();
    let (mut node, publisher, analyst) = start_retailer(&env, &node_extra(&[ANALYST], 1, ""));
    let published = dataset(0x5eed_0003, "r", 1000, 50, 4);
    let mut events: Vec<Ev> = published.iter().map(expected).collect();
    let again = published[..200].to_vec();
    publish_all(&mut node.ingest(&publisher).await, published).await;
    // Duplicates (a retried publish) are not counted twice.
    let results = publish(&mut node.ingest(&publisher).await, again).await;
    assert!(results
        .iter()
        .all(|r| outcome(r) == pb::PublishOutcome::Duplicate));
    let category_kind = Q::by(&[D::Category, D::Kind]);
    let size_hour = Q {
        attribute_key: "size",
        bucket: TimeBucket::Hour,
        ..Q::by(&[D::Attribute, D::Time])
    };
    check(
        "before restart",
        &node,
        &analyst,
        &events,
        &category_kind,
        1,
    )
    .await;

    node.terminate();
    node.restart();
    check("after restart", &node, &analyst, &events, &category_kind, 1).await;
    check(
        "size by hour, after restart",
        &node,
        &analyst,
        &events,
        &size_hour,
        1,
    )
    .await;

    // Four publishers in parallel; kill -9 once some have been acknowledged.
    let acked_ids = Arc::new(Mutex::new(Vec::<String>::new()));
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let mut client = node.ingest(&publisher).await;
        let (acked_ids, acked, done) = (acked_ids.clone(), acked.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x5eed_0100 + t);
            let custs = customers(&mut rng, 50);
            for b in 0..400 {
                let batch: Vec<pb::CustomerEvent> = (0..25)
                    .map(|i| random_event(&mut rng, format!("k{t}-{b}-{i}"), &custs, 4))
                    .collect();
                let ids: Vec<String> = batch.iter().map(|e| e.event_id.clone()).collect();
                let Ok(resp) = client.publish(pb::PublishRequest { events: batch }).await else {
                    return;
                };
                let results = resp.into_inner().results;
                assert!(results
                    .iter()
                    .all(|r| outcome(r) == pb::PublishOutcome::Accepted));
                acked_ids.lock().unwrap().extend(ids);
                acked.fetch_add(25, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        }));
    }
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < 1000 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ingest too slow: {} acknowledged",
            acked.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        !done.load(Ordering::SeqCst),
        "the node was killed after a publisher had finished"
    );

    // What the store actually holds: everything acknowledged, maybe more.
    let stored: Vec<Ev> = {
        let store = node.open_store();
        store
            .scan_after(0)
            .map(|item| from_stored(&item.expect("stored event").1))
            .collect()
    };
    let stored_ids: HashSet<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    let acked_ids = acked_ids.lock().unwrap().clone();
    for id in acked_ids.iter().chain(events.iter().map(|e| &e.id)) {
        assert!(stored_ids.contains(id.as_str()), "acknowledged {id} lost");
    }
    assert_eq!(stored_ids.len(), stored.len(), "an event stored twice");
    assert!(stored.len() >= events.len() + acked_ids.len());

    node.restart();
    check("after kill -9", &node, &analyst, &stored, &category_kind, 1).await;
    check(
        "size by hour, after kill -9",
        &node,
        &analyst,
        &stored,
        &size_hour,
        1,
    )
    .await;

    // The model of the stored events agrees with what was published.
    let published_ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let stored_first: Vec<Ev> = stored
        .iter()
        .filter(|e| published_ids.contains(e.id.as_str()))
        .cloned()
        .collect();
    let a = fold(&stored_first, &category_kind, 1).rows;
    let b = fold(&events, &category_kind, 1).rows;
    assert_eq!(a, b, "pseudonyms and anonymised fields as the test expects");

    // Rebuilding the rollups from the events gives the same answers.
    node.terminate();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["admin", "rebuild-rollups", "--config"])
        .arg(node.dir.join("node.toml"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "rebuild-rollups: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.restart();
    events = stored;
    check(
        "after rebuild-rollups",
        &node,
        &analyst,
        &events,
        &category_kind,
        1,
    )
    .await;
}

/// Above the exact size a cell counts customers with HyperLogLog: the
/// estimate stays within 3 standard errors, merges with exact cells without
/// counting a customer twice, and groups of at most the exact size stay
/// exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_counts_above_the_exact_limit_stay_within_the_bound() {
    let env = TestEnv::new();
    let (node, publisher, analyst) = start_retailer(&env, &node_extra(&[ANALYST], 1, ""));
    let h = now_secs() / 3600 * 3600 - 12 * 3600;
    let big = 400;
    let one = |id: String, category: &str, kind: pb::EventKind, customer: String, t: i64| {
        let mut e = event_of(&id, "4740001000017", kind, &customer);
        e.product.as_mut().unwrap().category = category.into();
        e.occurred_at = ts(t);
        e
    };
    let mut published = Vec::new();
    // One cell (one hour, same dimensions) with 400 customers: a sketch.
    for i in 0..big {
        published.push(one(
            format!("hll-p-{i}"),
            "dairy",
            pb::EventKind::Purchase,
            format!("big-{i}"),
            h + 60 + i as i64,
        ));
    }
    // The same customers again, 50 an hour: exact cells.
    for i in 0..big {
        published.push(one(
            format!("hll-r-{i}"),
            "dairy",
            pb::EventKind::Review,
            format!("big-{i}"),
            h + 3600 * (1 + i as i64 / 50) + 60,
        ));
    }
    // Sixty customers in one cell: still exact.
    for i in 0..60 {
        published.push(one(
            format!("hll-b-{i}"),
            "bakery",
            pb::EventKind::Purchase,
            format!("small-{i}"),
            h + 120 + i,
        ));
    }
    let events: Vec<Ev> = published.iter().map(expected).collect();
    publish_all(&mut node.ingest(&publisher).await, published).await;

    let by_category = Q::by(&[D::Category]);
    let exp = fold(&events, &by_category, 1);
    assert_eq!(
        exp.rows
            .iter()
            .map(|r| (r.key[0].as_str(), r.customers, r.approx))
            .collect::<Vec<_>>(),
        [("dairy", 400, true), ("bakery", 60, false)]
    );
    check("category", &node, &analyst, &events, &by_category, 1).await;
    let by_kind = Q::by(&[D::Category, D::Kind]);
    let exp = fold(&events, &by_kind, 1);
    assert!(exp
        .rows
        .iter()
        .any(|r| r.key == ["dairy", "review"] && r.customers == 400));
    check("category+kind", &node, &analyst, &events, &by_kind, 1).await;
    let by_hour = Q {
        bucket: TimeBucket::Hour,
        ..Q::by(&[D::Time])
    };
    check("hour", &node, &analyst, &events, &by_hour, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_limits_and_invalid_queries() {
    let env = TestEnv::new();
    let limit =
        format!("[[filter_limit]]\nidentity = {ANALYST:?}\ngtin_prefixes = [\"4740001\"]\n");
    let (node, publisher, analyst) =
        start_retailer(&env, &node_extra(&[ANALYST, "analyst-2"], 1, &limit));
    let analyst2 = env.issue("analyst-2");
    let outsider = env.issue("outsider");
    let published = dataset(0x5eed_0004, "l", 600, 30, 3);
    let events: Vec<Ev> = published.iter().map(expected).collect();
    publish_all(&mut node.ingest(&publisher).await, published).await;

    // Only analysts may query.
    for files in [&outsider, &publisher] {
        let err = query(&node, files, Q::by(&[D::Category]).pb())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    }

    // The limited analyst's open query is narrowed to its prefix...
    let by_gtin = Q::by(&[D::Gtin]);
    let narrowed = Q {
        filter: pb::Filter {
            gtin_prefixes: vec!["4740001".into()],
            ..Default::default()
        },
        ..Q::by(&[D::Gtin])
    };
    let got = query(&node, &analyst, by_gtin.pb()).await.unwrap();
    assert_report(
        "limited, open query",
        &got,
        &fold(&events, &narrowed, 1),
        1,
        0,
    );
    assert!(got.rows.iter().all(|r| r.key[0].starts_with("04740001")));
    // ...a narrower one is allowed...
    let narrower = Q {
        filter: pb::Filter {
            gtin_prefixes: vec!["474000100001".into()],
            ..Default::default()
        },
        ..Q::by(&[D::Gtin, D::Kind])
    };
    check("limited, narrower", &node, &analyst, &events, &narrower, 1).await;
    // ...a wider or other one is refused.
    for prefix in ["4750002", "474"] {
        let q = Q {
            filter: pb::Filter {
                gtin_prefixes: vec![prefix.into()],
                ..Default::default()
            },
            ..Q::by(&[D::Gtin])
        };
        let err = query(&node, &analyst, q.pb()).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{prefix}: {err:?}"
        );
    }
    // An analyst without a limit sees both prefixes.
    let got = query(&node, &analyst2, by_gtin.pb()).await.unwrap();
    assert_report("unlimited", &got, &fold(&events, &by_gtin, 1), 1, 0);
    assert!(got.rows.iter().any(|r| r.key[0].starts_with("04750002")));

    // Invalid queries name the field.
    let now = now_secs();
    let invalid: Vec<(&str, pb::InsightQuery)> = vec![
        (
            "group_by",
            pb::InsightQuery {
                group_by: vec![D::Category as i32, 42],
                ..Default::default()
            },
        ),
        (
            "group_by",
            pb::InsightQuery {
                group_by: vec![D::Unspecified as i32],
                ..Default::default()
            },
        ),
        (
            "attribute_key",
            pb::InsightQuery {
                group_by: vec![D::Attribute as i32],
                ..Default::default()
            },
        ),
        (
            // Not among the attribute keys the rollups keep (the default
            // list): an id-like key would grow the rollups per event.
            "attribute_key",
            pb::InsightQuery {
                group_by: vec![D::Attribute as i32],
                attribute_key: "basket_id".into(),
                ..Default::default()
            },
        ),
        (
            "bucket",
            pb::InsightQuery {
                group_by: vec![D::Time as i32],
                ..Default::default()
            },
        ),
        (
            "bucket",
            pb::InsightQuery {
                group_by: vec![D::Time as i32],
                bucket: 17,
                ..Default::default()
            },
        ),
        (
            "filter.until",
            pb::InsightQuery {
                filter: Some(pb::Filter {
                    since: ts(now - 3600),
                    until: ts(now - 7200),
                    ..Default::default()
                }),
                group_by: vec![D::Category as i32],
                ..Default::default()
            },
        ),
    ];
    for (field, q) in invalid {
        for files in [&analyst, &analyst2] {
            let err = query(&node, files, q.clone()).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
            assert!(
                err.message().starts_with(&format!("{field}: ")),
                "{field}: {err:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prints_a_table_and_json() {
    let env = TestEnv::new();
    let k_min = 3;
    let (node, publisher, analyst) = start_retailer(&env, &node_extra(&[ANALYST], k_min, ""));
    let mut published = dataset(0x5eed_0005, "c", 400, 25, 3);
    // A category with two customers: suppressed.
    for i in 0..6 {
        let mut e = event_of(
            &format!("c-rare-{i}"),
            "4750002000022",
            pb::EventKind::Purchase,
            &format!("rare-{}", i % 2),
        );
        e.product.as_mut().unwrap().category = "rare".into();
        published.push(e);
    }
    let events: Vec<Ev> = published.iter().map(expected).collect();
    publish_all(&mut node.ingest(&publisher).await, published).await;
    let exp = fold(&events, &Q::by(&[D::Category, D::Kind]), k_min);
    assert!(exp.suppressed > 0);

    let client_toml = node.write_client_toml(env.path(), &analyst);
    let run = |json: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsight"));
        cmd.arg("query")
            .arg("--config")
            .arg(&client_toml)
            .args(["--group-by", "category,kind"]);
        if json {
            cmd.arg("--json");
        }
        async move {
            let out = cmd.output().await.unwrap();
            assert!(
                out.status.success(),
                "chainsight query: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };

    let table = run(false).await;
    let lines: Vec<&str> = table.lines().collect();
    let (summary, grid) = lines.split_last().expect("output");
    assert_eq!(
        *summary,
        format!(
            "{} groups; {} suppressed (fewer than {k_min} distinct customers)",
            exp.rows.len(),
            exp.suppressed
        ),
        "{table}"
    );
    assert_eq!(grid.len(), exp.rows.len() + 1, "{table}");
    let header: Vec<&str> = grid[0].split_whitespace().collect();
    assert_eq!(header[..3], ["category", "kind", "events"], "{table}");
    // Aligned: the last column is right-aligned, so every line is as wide.
    let width = grid[0].chars().count();
    assert!(grid.iter().all(|l| l.chars().count() == width), "{table}");
    let events_col = grid[0].find("events").unwrap() + "events".len();
    for (line, row) in grid[1..].iter().zip(&exp.rows) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[..2], row.key[..], "{table}");
        assert_eq!(cells[2], row.events.to_string(), "{table}");
        assert_eq!(cells[3], row.customers.to_string(), "{table}");
        assert!(line[..events_col].ends_with(cells[2]), "{table}");
    }

    let json = run(true).await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), exp.rows.len(), "{json}");
    assert_eq!(v["kMin"], k_min, "{json}");
    assert_eq!(v["suppressedGroups"], exp.suppressed, "{json}");
    // Canonical proto3 JSON: 64-bit integers are strings.
    for (r, want) in rows.iter().zip(&exp.rows) {
        assert_eq!(r["key"], serde_json::json!(want.key), "{json}");
        assert_eq!(r["events"], want.events.to_string(), "{json}");
        assert_eq!(r["customers"], want.customers.to_string(), "{json}");
    }
    // And it reads back as an InsightReport.
    let report: pb::InsightReport = serde_json::from_str(&json).expect("InsightReport JSON");
    assert_report("CLI --json", &report, &exp, k_min, 0);

    // The feed as a picture: a point per returned row, a legend entry per
    // group; without a time bucket there is nothing to plot, and the
    // error says what to add.
    let svg_path = env.path().join("feed.svg");
    let chart = |bucket: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsight"));
        cmd.arg("query")
            .arg("--config")
            .arg(&client_toml)
            .args(["--group-by", "category", "--json", "--chart"])
            .arg(&svg_path);
        if bucket {
            cmd.args(["--bucket", "week"]);
        }
        async move { cmd.output().await.unwrap() }
    };
    let out = chart(true).await;
    assert!(
        out.status.success(),
        "chainsight query --chart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weekly: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let weekly = weekly["rows"].as_array().expect("rows");
    assert!(!weekly.is_empty());
    let svg = std::fs::read_to_string(&svg_path).expect("the chart was written");
    assert!(
        svg.starts_with("<svg"),
        "an SVG document: {}",
        &svg[..80.min(svg.len())]
    );
    assert_eq!(
        svg.matches("<circle").count(),
        weekly.len(),
        "a point per row"
    );
    let categories: std::collections::BTreeSet<&str> =
        weekly.iter().filter_map(|r| r["key"][0].as_str()).collect();
    for c in &categories {
        assert!(svg.contains(c), "the legend names {c}");
    }
    assert!(!categories.contains("rare"), "suppressed: {categories:?}");
    assert!(!svg.contains("rare"), "a suppressed group is not drawn");
    std::fs::remove_file(&svg_path).unwrap();
    let out = chart(false).await;
    assert!(!out.status.success(), "--chart without --bucket must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--bucket week"), "{stderr}");
    assert!(out.stdout.is_empty(), "refused before querying");
    assert!(!svg_path.exists(), "no chart written on failure");
}

/// The views are configurable; a node whose stored rollups were built for
/// other views refuses to start and names the rebuild command, and after
/// `admin rebuild-rollups` the new views answer as the fold says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_views_need_a_rebuild_and_then_answer() {
    let env = TestEnv::new();
    let (mut node, publisher, analyst) = start_retailer(&env, &node_extra(&[ANALYST], 1, ""));
    let published = dataset(0x5eed_0009, "v", 400, 25, 40);
    let events: Vec<Ev> = published.iter().map(expected).collect();
    publish_all(&mut node.ingest(&publisher).await, published).await;
    node.terminate();

    let views =
        "[insights]\nviews = [[\"brand\", \"age_band\"], [\"stage\", \"kind\", \"region\"]]\n";
    let config = env.node_config("retailer", &node_extra(&[ANALYST], 1, views));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["node", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with stale rollups: {stderr}"
    );
    assert!(
        stderr.contains("brand+age_band") && stderr.contains("chainsight admin rebuild-rollups"),
        "the refusal should name the views and the command: {stderr}"
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["admin", "rebuild-rollups", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "rebuild-rollups: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.restart();
    let by_brand_age = Q {
        bucket: TimeBucket::Week,
        ..Q::by(&[D::Brand, D::AgeBand, D::Time])
    };
    check(
        "brand+age_band view",
        &node,
        &analyst,
        &events,
        &by_brand_age,
        1,
    )
    .await;
    let mut by_stage = Q::by(&[D::Stage, D::Kind]);
    by_stage.filter.regions = vec!["EE".into()];
    check("stage+kind in EE", &node, &analyst, &events, &by_stage, 1).await;
    // Dimensions no view keeps come from the hourly cells.
    check(
        "category+region without a view",
        &node,
        &analyst,
        &events,
        &Q::by(&[D::Category, D::Region]),
        1,
    )
    .await;

    // A configuration naming an unknown dimension is refused at load.
    let bad = env.node_config(
        "retailer",
        &node_extra(&[ANALYST], 1, "[insights]\nviews = [[\"colour\"]]\n"),
    );
    node.terminate();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["node", "--config"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("insights.views") && stderr.contains("colour"),
        "{stderr}"
    );
}
