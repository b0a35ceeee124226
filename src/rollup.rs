//! Rollups: the aggregates an insight query needs — events, review scores,
//! NPS answers, purchases and returns, and the distinct customers behind
//! them — kept up to date at ingest in the same transaction as the events,
//! so a query reads rollup cells, not events.
//!
//! Cells come in families:
//! - family 0 (`FAMILY_BASE`): per hour and per combination of every
//!   dimension of the event — answers any query;
//! - family 1 (`FAMILY_ATTRIBUTE`): the same with one attribute (key,
//!   value) of the event added — answers any ATTRIBUTE query;
//! - families 2, 3, …: the *views* of the [`Layout`] (`[insights] views`
//!   in node.toml): per day, ISO week and month, and per combination
//!   of a few dimensions only (e.g. category × region). A view has few cells
//!   per period whatever the number of events, so a query a view covers
//!   reads a number of cells that does not grow with history.
//!
//! Distinct customers: a cell keeps the exact set of (64-bit hashes of)
//! pseudonyms up to [`EXACT_LIMIT`]; above it the cell switches to a
//! HyperLogLog sketch with 2^[`HLL_P`] registers (standard error
//! 1.04/√1024 ≈ 3.25 %). Query results are exact when every contributing
//! cell is exact, and approximate within that bound otherwise.

use std::collections::{BTreeMap, HashSet};

use prost::Message;

use crate::domain::{EventKind, PreferenceEvent, UnixNanos};

/// Cells keep exact customer sets up to this many customers.
pub const EXACT_LIMIT: usize = 64;
/// HyperLogLog precision: 2^10 = 1024 registers.
pub const HLL_P: u32 = 10;
const HLL_M: usize = 1 << HLL_P;
const NANOS_PER_HOUR: i64 = 3_600 * 1_000_000_000;

/// A time bucket (and the period of a rollup cell), in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    Hour,
    Day,
    /// ISO weeks, starting on Monday.
    Week,
    Month,
}

impl Bucket {
    /// Every period kind, finest first.
    pub const ALL: [Bucket; 4] = [Bucket::Hour, Bucket::Day, Bucket::Week, Bucket::Month];
    /// The periods a view keeps. Hours are left to the base families: a
    /// view's hour cells would hold about one event each, and cost a write
    /// per event and view.
    pub const VIEW_PERIODS: [Bucket; 3] = [Bucket::Day, Bucket::Week, Bucket::Month];

    fn code(self) -> u8 {
        match self {
            Bucket::Hour => 0,
            Bucket::Day => 1,
            Bucket::Week => 2,
            Bucket::Month => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Bucket> {
        Bucket::ALL.get(usize::from(c)).copied()
    }
}

/// The first hour of the bucket `hour` falls in.
pub fn bucket_start_hour(hour: i64, bucket: Bucket) -> i64 {
    if bucket == Bucket::Hour {
        return hour;
    }
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(hour.saturating_mul(3600)) else {
        return hour;
    };
    let day = t.date();
    let start = match bucket {
        Bucket::Hour | Bucket::Day => day,
        Bucket::Week => {
            day - time::Duration::days(i64::from(day.weekday().number_days_from_monday()))
        }
        Bucket::Month => day.replace_day(1).unwrap_or(day),
    };
    start
        .midnight()
        .assume_utc()
        .unix_timestamp()
        .div_euclid(3600)
}

/// The first hour of the bucket after the one starting at `start`.
pub fn next_bucket_start(start: i64, bucket: Bucket) -> i64 {
    match bucket {
        Bucket::Hour => start + 1,
        Bucket::Day => start + 24,
        Bucket::Week => start + 7 * 24,
        // Months are 28-31 days: step past the end and snap back.
        Bucket::Month => bucket_start_hour(start + 32 * 24, Bucket::Month),
    }
}

/// A set of non-time dimensions, one bit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DimSet(pub u16);

impl DimSet {
    pub const GTIN: DimSet = DimSet(1);
    pub const CATEGORY: DimSet = DimSet(1 << 1);
    pub const BRAND: DimSet = DimSet(1 << 2);
    pub const REGION: DimSet = DimSet(1 << 3);
    pub const CHANNEL: DimSet = DimSet(1 << 4);
    pub const STAGE: DimSet = DimSet(1 << 5);
    pub const KIND: DimSet = DimSet(1 << 6);
    pub const AGE_BAND: DimSet = DimSet(1 << 7);
    pub const ATTRIBUTE: DimSet = DimSet(1 << 8);

    /// The names used in node.toml, in key order.
    pub const NAMES: [(&'static str, DimSet); 9] = [
        ("gtin", DimSet::GTIN),
        ("category", DimSet::CATEGORY),
        ("brand", DimSet::BRAND),
        ("region", DimSet::REGION),
        ("channel", DimSet::CHANNEL),
        ("stage", DimSet::STAGE),
        ("kind", DimSet::KIND),
        ("age_band", DimSet::AGE_BAND),
        ("attribute", DimSet::ATTRIBUTE),
    ];

    /// The dimension called `name` in node.toml.
    pub fn named(name: &str) -> Option<DimSet> {
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(_, d)| *d)
    }

    pub fn union(self, other: DimSet) -> DimSet {
        DimSet(self.0 | other.0)
    }

    pub fn contains(self, other: DimSet) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn len(self) -> u32 {
        self.0.count_ones()
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `category+region`-style name.
    pub fn describe(self) -> String {
        Self::NAMES
            .iter()
            .filter(|(_, d)| self.contains(*d))
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// The views kept besides the base families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Each view's dimensions; view `i` is family `FIRST_VIEW_FAMILY + i`.
    pub views: Vec<DimSet>,
    /// The attribute keys that get attribute cells (sorted); `None`: every
    /// key. Each kept attribute of an event adds cells to every family
    /// that keeps the attribute, so a key with unbounded values (a basket
    /// or session id) would grow the rollups by cells per event.
    pub attribute_keys: Option<Vec<String>>,
}

/// The attribute keys kept in rollups unless `[insights] attribute_keys`
/// says otherwise: the usual product-preference attributes.
pub const DEFAULT_ATTRIBUTE_KEYS: &[&str] = &[
    "color",
    "colour",
    "fat",
    "fit",
    "flavor",
    "flavour",
    "material",
    "pack_size",
    "size",
    "variant",
];

/// Family of the first view.
pub const FIRST_VIEW_FAMILY: u8 = 2;
/// At most this many views.
pub const MAX_VIEWS: usize = 32;

impl Default for Layout {
    /// Views for the usual feeds: category × region (the typical feed), the
    /// same per kind (kind filters: only reviews, only NPS answers), per
    /// product and kind (a manufacturer's own products), journey funnels,
    /// and attribute preferences per category.
    fn default() -> Self {
        let d = |dims: &[DimSet]| dims.iter().fold(DimSet::default(), |a, d| a.union(*d));
        Layout {
            views: vec![
                d(&[DimSet::CATEGORY, DimSet::REGION]),
                d(&[DimSet::CATEGORY, DimSet::REGION, DimSet::KIND]),
                d(&[DimSet::GTIN, DimSet::KIND]),
                d(&[
                    DimSet::CATEGORY,
                    DimSet::CHANNEL,
                    DimSet::STAGE,
                    DimSet::KIND,
                ]),
                d(&[DimSet::CATEGORY, DimSet::ATTRIBUTE]),
            ],
            attribute_keys: Some(
                DEFAULT_ATTRIBUTE_KEYS
                    .iter()
                    .map(|k| k.to_string())
                    .collect(),
            ),
        }
    }
}

impl Layout {
    /// No views: only the hourly base families.
    pub fn base_only() -> Layout {
        Layout {
            views: Vec::new(),
            attribute_keys: None,
        }
    }

    /// Whether attribute `key` gets attribute cells.
    pub fn keeps_attribute(&self, key: &str) -> bool {
        self.attribute_keys
            .as_ref()
            .is_none_or(|keys| keys.binary_search_by(|k| k.as_str().cmp(key)).is_ok())
    }

    /// Identifies the layout the stored cells were built with.
    pub fn signature(&self) -> String {
        let views: Vec<String> = self.views.iter().map(|v| v.describe()).collect();
        // v3: every stored cell value ends with a CRC-32 of key and value.
        // v4: the hourly cells are kept in blocks (`store::blocks`).
        let attributes = match &self.attribute_keys {
            None => "*".to_string(),
            Some(keys) => keys.join(","),
        };
        format!("rollups-v4;{};attributes={attributes}", views.join(";"))
    }

    /// The family of view `i`.
    pub fn family(i: usize) -> u8 {
        FIRST_VIEW_FAMILY + i as u8
    }
}

/// The dimensions of a cell, in key order. A view's cells leave the
/// dimensions it does not keep empty (0 for the enums).
/// `S` is `String` for owned dimensions and `&str` for dimensions read in
/// place from a stored key ([`CellKeyRef`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CellDims<S = String> {
    pub gtin: S,
    pub category: S,
    pub brand: S,
    pub region: S,
    pub channel: u8,
    pub stage: u8,
    pub kind: u8,
    pub age_band: S,
    /// `(attribute key, value)` for attribute cells; `None` otherwise.
    pub attribute: Option<(S, S)>,
}

impl CellDims<&str> {
    /// The owned form.
    pub fn to_owned(&self) -> CellDims {
        CellDims {
            gtin: self.gtin.to_string(),
            category: self.category.to_string(),
            brand: self.brand.to_string(),
            region: self.region.to_string(),
            channel: self.channel,
            stage: self.stage,
            kind: self.kind,
            age_band: self.age_band.to_string(),
            attribute: self.attribute.map(|(k, v)| (k.to_string(), v.to_string())),
        }
    }
}

impl<S: AsRef<str>> CellDims<S> {
    /// Appends the key bytes of the dimensions (after the period prefix).
    fn encode_into(&self, out: &mut Vec<u8>) {
        for s in [&self.gtin, &self.category, &self.brand, &self.region] {
            put_str(out, s.as_ref());
        }
        out.extend_from_slice(&[self.channel, self.stage, self.kind]);
        put_str(out, self.age_band.as_ref());
        match &self.attribute {
            Some((k, v)) => {
                out.push(1);
                put_str(out, k.as_ref());
                put_str(out, v.as_ref());
            }
            None => out.push(0),
        }
    }
}

impl<S: Clone + Default> CellDims<S> {
    /// Only the dimensions in `keep`.
    fn masked(&self, keep: DimSet) -> CellDims<S> {
        let s = |d: DimSet, v: &S| {
            if keep.contains(d) {
                v.clone()
            } else {
                S::default()
            }
        };
        let n = |d: DimSet, v: u8| if keep.contains(d) { v } else { 0 };
        CellDims {
            gtin: s(DimSet::GTIN, &self.gtin),
            category: s(DimSet::CATEGORY, &self.category),
            brand: s(DimSet::BRAND, &self.brand),
            region: s(DimSet::REGION, &self.region),
            channel: n(DimSet::CHANNEL, self.channel),
            stage: n(DimSet::STAGE, self.stage),
            kind: n(DimSet::KIND, self.kind),
            age_band: s(DimSet::AGE_BAND, &self.age_band),
            attribute: self
                .attribute
                .clone()
                .filter(|_| keep.contains(DimSet::ATTRIBUTE)),
        }
    }
}

/// A cell's position: its family, period and dimensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellKey {
    pub family: u8,
    pub period: Bucket,
    /// The period's first hour (hours since the Unix epoch).
    pub hour: i64,
    pub dims: CellDims,
}

/// The hour index of an instant.
pub fn hour_of(t: UnixNanos) -> i64 {
    t.0.div_euclid(NANOS_PER_HOUR)
}

/// The start of an hour index.
pub fn hour_start(hour: i64) -> UnixNanos {
    UnixNanos(hour.saturating_mul(NANOS_PER_HOUR))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn get_str<'a>(bytes: &'a [u8], pos: &mut usize) -> Option<&'a str> {
    let len = usize::from(u16::from_be_bytes(
        bytes.get(*pos..*pos + 2)?.try_into().ok()?,
    ));
    *pos += 2;
    let s = std::str::from_utf8(bytes.get(*pos..*pos + len)?).ok()?;
    *pos += len;
    Some(s)
}

/// Hourly cells over every dimension.
pub const FAMILY_BASE: u8 = 0;
/// Hourly cells over every dimension and one attribute.
pub const FAMILY_ATTRIBUTE: u8 = 1;

/// The sled key of the first cell of `family`'s `period` starting at
/// `hour` (cells sort by family, period kind, then start hour).
pub fn period_prefix(family: u8, period: Bucket, hour: i64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = family;
    k[1] = period.code();
    k[2..].copy_from_slice(&((hour as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// The family, period kind and start hour at the head of a cell key (see
/// [`period_prefix`]).
pub fn parse_period_prefix(key: &[u8]) -> Option<(u8, Bucket, i64)> {
    let family = *key.first()?;
    let period = Bucket::from_code(*key.get(1)?)?;
    let hour = (u64::from_be_bytes(key.get(2..10)?.try_into().ok()?) ^ (1 << 63)) as i64;
    Some((family, period, hour))
}

/// The periods of a view's cells that are sums of its day cells: a day
/// falls in exactly one week and one month.
pub const DERIVED_PERIODS: [Bucket; 2] = [Bucket::Week, Bucket::Month];

/// Whether `key` is a view's week or month cell (see [`derived_prefix`]).
pub fn is_derived(key: &[u8]) -> bool {
    key.first().is_some_and(|&f| f >= Layout::family(0))
        && key
            .get(1)
            .and_then(|&c| Bucket::from_code(c))
            .is_some_and(|p| DERIVED_PERIODS.contains(&p))
}

/// For the period prefix of a view's day (a cell key's first 10 bytes),
/// the prefix of the `period` (a week or a month) that holds that day:
/// its cells are the day's cells under this prefix, the same family and
/// dimensions. `None` for any other prefix.
pub fn derived_prefix(day: &[u8], period: Bucket) -> Option<[u8; 10]> {
    let (family, from, hour) = parse_period_prefix(day)?;
    if family < Layout::family(0) || from != Bucket::Day || !DERIVED_PERIODS.contains(&period) {
        return None;
    }
    Some(period_prefix(
        family,
        period,
        bucket_start_hour(hour, period),
    ))
}

impl CellKey {
    /// Encodes the key: family, period kind, start hour (sign-flipped,
    /// big-endian), dimensions.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(&period_prefix(self.family, self.period, self.hour));
        self.dims.encode_into(&mut out);
        out
    }

    /// Decodes a key written by [`Self::encode`].
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let k = CellKeyRef::parse(bytes)?;
        Some(CellKey {
            family: k.family,
            period: k.period,
            hour: k.hour,
            dims: k.dims.to_owned(),
        })
    }
}

/// A stored cell key read in place: its dimensions borrow the key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellKeyRef<'a> {
    pub family: u8,
    pub period: Bucket,
    pub hour: i64,
    pub dims: CellDims<&'a str>,
}

impl<'a> CellKeyRef<'a> {
    /// Reads a key written by [`CellKey::encode`].
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        let (family, period, hour) = parse_period_prefix(bytes)?;
        let mut pos = 10;
        let gtin = get_str(bytes, &mut pos)?;
        let category = get_str(bytes, &mut pos)?;
        let brand = get_str(bytes, &mut pos)?;
        let region = get_str(bytes, &mut pos)?;
        let [channel, stage, kind] = bytes.get(pos..pos + 3)?.try_into().ok()?;
        pos += 3;
        let age_band = get_str(bytes, &mut pos)?;
        let attribute = match bytes.get(pos)? {
            0 => None,
            1 => {
                pos += 1;
                Some((get_str(bytes, &mut pos)?, get_str(bytes, &mut pos)?))
            }
            _ => return None,
        };
        Some(CellKeyRef {
            family,
            period,
            hour,
            dims: CellDims {
                gtin,
                category,
                brand,
                region,
                channel,
                stage,
                kind,
                age_band,
                attribute,
            },
        })
    }
}

/// The aggregates of one cell (or of a query group).
#[derive(Clone, PartialEq, Message)]
pub struct Agg {
    #[prost(uint64, tag = "1")]
    pub events: u64,
    /// Sum and count of REVIEW scores.
    #[prost(uint64, tag = "2")]
    pub score_sum: u64,
    #[prost(uint64, tag = "3")]
    pub score_n: u64,
    /// NPS answers: promoters (9-10), detractors (0-6), all.
    #[prost(uint64, tag = "4")]
    pub promoters: u64,
    #[prost(uint64, tag = "5")]
    pub detractors: u64,
    #[prost(uint64, tag = "6")]
    pub nps_n: u64,
    #[prost(uint64, tag = "7")]
    pub purchases: u64,
    #[prost(uint64, tag = "8")]
    pub returns: u64,
    /// Exact customer hashes, while at most EXACT_LIMIT and `hll` is empty.
    #[prost(uint64, repeated, tag = "9")]
    pub customers: Vec<u64>,
    /// HyperLogLog registers (HLL_M bytes) once the cell outgrew the exact set.
    #[prost(bytes = "vec", tag = "10")]
    pub hll: Vec<u8>,
    /// The estimate of `hll`, kept with it (see [`Agg::compact`]) so that
    /// a group of one cell needs no pass over the registers.
    #[prost(uint64, tag = "11")]
    pub hll_estimate: u64,
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// The additive part of a cell or a query group: an [`Agg`] without its
/// customers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub events: u64,
    pub score_sum: u64,
    pub score_n: u64,
    pub promoters: u64,
    pub detractors: u64,
    pub nps_n: u64,
    pub purchases: u64,
    pub returns: u64,
}

impl Counts {
    /// Average review score.
    pub fn avg_score(&self) -> Option<f64> {
        ratio(self.score_sum, self.score_n)
    }

    /// % promoters − % detractors over the NPS answers.
    pub fn nps(&self) -> Option<f64> {
        (self.nps_n > 0)
            .then(|| 100.0 * (self.promoters as f64 - self.detractors as f64) / self.nps_n as f64)
    }

    /// Returns per purchase.
    pub fn return_rate(&self) -> Option<f64> {
        ratio(self.returns, self.purchases)
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counts) {
        self.events += other.events;
        self.score_sum += other.score_sum;
        self.score_n += other.score_n;
        self.promoters += other.promoters;
        self.detractors += other.detractors;
        self.nps_n += other.nps_n;
        self.purchases += other.purchases;
        self.returns += other.returns;
    }
}

/// A 64-bit hash of a pseudonym (already a keyed HMAC, so its bits are uniform).
pub fn customer_hash(pseudonym: &str) -> Option<u64> {
    if pseudonym.is_empty() {
        return None;
    }
    match pseudonym
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
    {
        Some(h) => Some(h),
        // Not hex: hash it.
        None => {
            use sha2::{Digest, Sha256};
            let d = Sha256::digest(pseudonym.as_bytes());
            Some(u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8])))
        }
    }
}

fn hll_add(registers: &mut [u8], hash: u64) {
    let idx = (hash >> (64 - HLL_P)) as usize;
    let rest = (hash << HLL_P) | (1 << (HLL_P - 1));
    let rank = rest.leading_zeros() as u8 + 1;
    if registers[idx] < rank {
        registers[idx] = rank;
    }
}

/// 2^-r, exactly, from the bits of an f64 (r is at most 65 here).
fn pow2_neg(r: u8) -> f64 {
    f64::from_bits((1023 - u64::from(r.min(64))) << 52)
}

fn hll_estimate(registers: &[u8]) -> f64 {
    let m = registers.len() as f64;
    let alpha = 0.7213 / (1.0 + 1.079 / m);
    // A histogram of the ranks, then one power per rank: integer work per
    // register instead of a dependent floating-point sum.
    let mut counts = [0u32; 66];
    for &r in registers {
        counts[usize::from(r.min(65))] += 1;
    }
    let sum: f64 = counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(r, &c)| f64::from(c) * pow2_neg(r as u8))
        .sum();
    let zeros = counts[0] as usize;
    let estimate = alpha * m * m / sum;
    if estimate <= 2.5 * m && zeros > 0 {
        m * (m / zeros as f64).ln()
    } else {
        estimate
    }
}

impl Agg {
    /// The contribution of one event.
    pub fn of_event(ev: &PreferenceEvent) -> Self {
        let mut a = Agg {
            events: 1,
            ..Default::default()
        };
        match (ev.kind, ev.score) {
            (EventKind::Review, Some(s)) => {
                a.score_sum = u64::from(s);
                a.score_n = 1;
            }
            (EventKind::Nps, Some(s)) => {
                a.nps_n = 1;
                a.promoters = u64::from(s >= 9);
                a.detractors = u64::from(s <= 6);
            }
            _ => {}
        }
        a.purchases = u64::from(ev.kind == EventKind::Purchase);
        a.returns = u64::from(ev.kind == EventKind::Return);
        if let Some(h) = customer_hash(&ev.customer_pseudonym) {
            a.customers.push(h);
        }
        a
    }

    /// Adds `delta` into this kept cell: [`Self::merge`], then
    /// [`Self::compact`] (a cell switches to a sketch past
    /// [`EXACT_LIMIT`] customers; a query's group does not).
    pub fn merge_cell(&mut self, delta: &Agg) {
        self.merge(delta);
        self.compact();
    }

    /// Adds `other` into `self`. A sketch's stored estimate goes stale
    /// (0) until [`Self::seal`].
    pub fn merge(&mut self, other: &Agg) {
        self.add_counts(other);
        self.hll_estimate = 0;
        if !other.hll.is_empty() {
            self.switch_to_sketch();
            for (r, o) in self.hll.iter_mut().zip(&other.hll) {
                *r = (*r).max(*o);
            }
        }
        if self.hll.is_empty() {
            // The exact set stays sorted; cells are small (at most
            // EXACT_LIMIT before compaction), so insertion is cheap.
            for h in &other.customers {
                if let Err(at) = self.customers.binary_search(h) {
                    self.customers.insert(at, *h);
                }
            }
        } else {
            let hll = &mut self.hll;
            for h in &other.customers {
                hll_add(hll, *h);
            }
        }
    }

    /// The counts (not the customers).
    pub fn counts(&self) -> Counts {
        Counts {
            events: self.events,
            score_sum: self.score_sum,
            score_n: self.score_n,
            promoters: self.promoters,
            detractors: self.detractors,
            nps_n: self.nps_n,
            purchases: self.purchases,
            returns: self.returns,
        }
    }

    /// Adds `other`'s counts (not its customers) into `self`.
    pub fn add_counts(&mut self, other: &Agg) {
        self.events += other.events;
        self.score_sum += other.score_sum;
        self.score_n += other.score_n;
        self.promoters += other.promoters;
        self.detractors += other.detractors;
        self.nps_n += other.nps_n;
        self.purchases += other.purchases;
        self.returns += other.returns;
    }

    /// Takes the counts of `other` out of `self` (an erasure).
    pub fn subtract_counts(&mut self, other: &Agg) {
        self.events = self.events.saturating_sub(other.events);
        self.score_sum = self.score_sum.saturating_sub(other.score_sum);
        self.score_n = self.score_n.saturating_sub(other.score_n);
        self.promoters = self.promoters.saturating_sub(other.promoters);
        self.detractors = self.detractors.saturating_sub(other.detractors);
        self.nps_n = self.nps_n.saturating_sub(other.nps_n);
        self.purchases = self.purchases.saturating_sub(other.purchases);
        self.returns = self.returns.saturating_sub(other.returns);
    }

    /// Switches a cell to the sketch once its exact set is too large.
    /// Called after merging.
    pub fn compact(&mut self) {
        if self.hll.is_empty() && self.customers.len() > EXACT_LIMIT {
            self.switch_to_sketch();
        }
    }

    /// Stores a sketch's estimate with it, so that a query of one cell
    /// needs no pass over the registers. Called once before storing (not
    /// after each merge: in memory a stale estimate is 0, which readers
    /// compute from the registers instead).
    pub fn seal(&mut self) {
        if !self.hll.is_empty() && self.hll_estimate == 0 {
            self.hll_estimate = hll_estimate(&self.hll).round() as u64;
        }
    }

    fn switch_to_sketch(&mut self) {
        if self.hll.is_empty() {
            self.hll = vec![0; HLL_M];
            for h in std::mem::take(&mut self.customers) {
                hll_add(&mut self.hll, h);
            }
        }
    }

    /// Distinct customers, and whether the count is exact.
    pub fn customers(&self) -> (u64, bool) {
        if self.hll.is_empty() {
            (self.customers.len() as u64, true)
        } else {
            (hll_estimate(&self.hll).round() as u64, false)
        }
    }

    /// Encoded for storage.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decoded from storage.
    pub fn decode_bytes(bytes: &[u8]) -> Option<Self> {
        let a = Agg::decode(bytes).ok()?;
        (a.hll.is_empty() || a.hll.len() == HLL_M).then_some(a)
    }
}

/// A cell's value as stored: the encoded [`Agg`] followed by a CRC-32 (big
/// endian) of the cell's key and that encoding, so that a flipped byte in
/// either is found on read ([`open_value`]) rather than counted.
pub fn seal_value(key: &[u8], agg: &Agg) -> Vec<u8> {
    seal_bytes(key, agg.encode())
}

/// `body` followed by the CRC-32 of `key` and `body`, as [`seal_value`]
/// stores a cell (and `store::blocks` a block); read back by
/// [`open_value`].
pub fn seal_bytes(key: &[u8], mut body: Vec<u8>) -> Vec<u8> {
    let crc = cell_crc(key, &body);
    body.extend_from_slice(&crc.to_be_bytes());
    body
}

/// The encoded [`Agg`] of a stored value written by [`seal_value`]; `None`
/// when the checksum does not match `key` and the value.
pub fn open_value<'a>(key: &[u8], value: &'a [u8]) -> Option<&'a [u8]> {
    let split = value.len().checked_sub(4)?;
    let (body, crc) = value.split_at(split);
    let stored = u32::from_be_bytes(crc.try_into().ok()?);
    (stored == cell_crc(key, body)).then_some(body)
}

fn cell_crc(key: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(body);
    h.finalize()
}

/// Customer hashes stored as packed varints (an exact cell's list, sorted
/// and distinct), read in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct PackedCustomers<'a> {
    bytes: &'a [u8],
    len: usize,
}

impl<'a> PackedCustomers<'a> {
    /// Counts the varints of `bytes` (each ends with a byte below 0x80)
    /// and checks that the last one is whole.
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        let len = bytes.iter().filter(|&&b| b < 0x80).count();
        bytes
            .last()
            .is_none_or(|&b| b < 0x80)
            .then_some(PackedCustomers { bytes, len })
    }

    /// How many hashes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hashes.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        let mut buf = self.bytes;
        // Checked by `parse`, so decoding cannot fail here.
        std::iter::from_fn(move || {
            (!buf.is_empty())
                .then(|| prost::encoding::decode_varint(&mut buf).ok())
                .flatten()
        })
    }
}

/// A stored cell's value read in place from its bytes (no copy, no
/// allocation): the counts, and the customers as stored — the exact hashes
/// or the sketch's registers with their estimate. Reads the encoding of
/// [`Agg`] (a unit test keeps the two in step).
#[derive(Debug, Clone, Default)]
pub struct AggRef<'a> {
    pub counts: Counts,
    pub customers: PackedCustomers<'a>,
    pub hll: &'a [u8],
    pub hll_estimate: u64,
}

impl<'a> AggRef<'a> {
    /// Reads an encoded [`Agg`]; `None` when the bytes are not one.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        use prost::encoding::{decode_key, decode_varint, WireType};
        let mut buf = bytes;
        let mut a = AggRef::default();
        while !buf.is_empty() {
            let (tag, wire) = decode_key(&mut buf).ok()?;
            match wire {
                WireType::Varint => {
                    let v = decode_varint(&mut buf).ok()?;
                    let c = &mut a.counts;
                    match tag {
                        1 => c.events = v,
                        2 => c.score_sum = v,
                        3 => c.score_n = v,
                        4 => c.promoters = v,
                        5 => c.detractors = v,
                        6 => c.nps_n = v,
                        7 => c.purchases = v,
                        8 => c.returns = v,
                        11 => a.hll_estimate = v,
                        // Customers are written packed; anything else is not ours.
                        _ => return None,
                    }
                }
                WireType::LengthDelimited => {
                    let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                    let (field, rest) = buf.split_at_checked(len)?;
                    buf = rest;
                    match tag {
                        9 => a.customers = PackedCustomers::parse(field)?,
                        10 => a.hll = field,
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        (a.hll.is_empty() || a.hll.len() == HLL_M).then_some(a)
    }
}

/// A fast hasher for sets of customer hashes (already uniform bits).
type CustomerSet = HashSet<u64, foldhash::fast::FixedState>;

/// An interned dimension value (see [`Interner`]).
pub type Sym = u32;

/// Dimension strings as small integers, so that a query groups and
/// compares cells by integers and resolves strings only for its rows.
/// Append-only: it holds each distinct dimension value once.
#[derive(Debug, Default)]
pub struct Interner {
    ids: std::collections::HashMap<Box<str>, Sym, foldhash::fast::FixedState>,
    strings: Vec<Box<str>>,
}

impl Interner {
    /// The symbol of `s`, new if needed.
    pub fn intern(&mut self, s: &str) -> Sym {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = Sym::try_from(self.strings.len()).unwrap_or(Sym::MAX);
        self.strings.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    /// The symbol of `s`, if it has one.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.ids.get(s).copied()
    }

    /// The string of `sym`.
    pub fn resolve(&self, sym: Sym) -> &str {
        self.strings.get(sym as usize).map_or("", |s| s)
    }

    /// The dimensions of `dims` as strings.
    pub fn resolve_dims(&self, dims: &CellDims<Sym>) -> CellDims<&str> {
        let r = |s: Sym| self.resolve(s);
        CellDims {
            gtin: r(dims.gtin),
            category: r(dims.category),
            brand: r(dims.brand),
            region: r(dims.region),
            channel: dims.channel,
            stage: dims.stage,
            kind: dims.kind,
            age_band: r(dims.age_band),
            attribute: dims.attribute.map(|(k, v)| (r(k), r(v))),
        }
    }

    fn intern_dims(&mut self, dims: &CellDims<&str>) -> CellDims<Sym> {
        CellDims {
            gtin: self.intern(dims.gtin),
            category: self.intern(dims.category),
            brand: self.intern(dims.brand),
            region: self.intern(dims.region),
            channel: dims.channel,
            stage: dims.stage,
            kind: dims.kind,
            age_band: self.intern(dims.age_band),
            attribute: dims
                .attribute
                .map(|(k, v)| (self.intern(k), self.intern(v))),
        }
    }
}

/// A stored cell decoded for queries: period, interned dimensions, counts
/// and the size of its customers, compact and contiguous so that a query
/// over thousands of cells runs from memory. The stored value stays
/// (shared, not copied) for the unions of customers a group of several
/// cells needs.
#[derive(Debug, Clone)]
pub struct QueryCell {
    pub family: u8,
    pub period: Bucket,
    pub hour: i64,
    pub dims: CellDims<Sym>,
    pub counts: Counts,
    /// Exact customers stored (0 for a sketch).
    pub exact_n: u32,
    /// Whether the customers are a sketch.
    pub sketch: bool,
    /// The sketch's stored estimate (0: compute from the registers).
    pub hll_estimate: u64,
    value: bytes::Bytes,
}

impl QueryCell {
    /// Decodes a stored cell (key and value bytes), interning its
    /// dimensions; `None` when the bytes are not a cell.
    pub fn decode(
        key: &[u8],
        value: impl AsRef<[u8]> + Send + 'static,
        symbols: &mut Interner,
    ) -> Option<QueryCell> {
        let k = CellKeyRef::parse(key)?;
        let body = open_value(key, value.as_ref())?.len();
        let value = bytes::Bytes::from_owner(value).slice(..body);
        let agg = AggRef::parse(&value)?;
        Some(QueryCell {
            family: k.family,
            period: k.period,
            hour: k.hour,
            dims: symbols.intern_dims(&k.dims),
            exact_n: u32::try_from(agg.customers.len()).ok()?,
            sketch: !agg.hll.is_empty(),
            hll_estimate: agg.hll_estimate,
            counts: agg.counts,
            value,
        })
    }

    /// The stored value read in place (for its customers).
    pub fn agg(&self) -> AggRef<'_> {
        // Checked by `decode`.
        AggRef::parse(&self.value).unwrap_or_default()
    }

    /// Bytes this cell holds in memory, about.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>() + self.value.len()
    }
}

/// A query group's running total: counts add up, customers go into one
/// hash set (or one sketch once any contributing cell is a sketch), so
/// merging many cells costs linear, not quadratic, time. A group of one
/// cell reads its size from the cell (a sketch's stored estimate): its
/// stored customers are not touched.
#[derive(Debug, Default)]
pub struct GroupAcc<'a> {
    pub counts: Counts,
    /// The only cell with customers so far.
    first: Option<&'a QueryCell>,
    /// The union of the customers of two or more cells.
    merged: Option<Box<Merged>>,
}

/// Customers merged from several cells: an exact set until a sketch comes,
/// then the sketch alone.
#[derive(Debug, Default)]
struct Merged {
    exact: CustomerSet,
    sketch: Option<Vec<u8>>,
}

impl<'a> GroupAcc<'a> {
    /// Adds a cell.
    pub fn add(&mut self, cell: &'a QueryCell) {
        self.counts.add(&cell.counts);
        if cell.exact_n == 0 && !cell.sketch {
            return;
        }
        let merged = match (&mut self.merged, self.first) {
            (Some(merged), _) => merged,
            (None, None) => {
                self.first = Some(cell);
                return;
            }
            (None, Some(first)) => {
                self.first = None;
                let mut merged = Box::<Merged>::default();
                merged.absorb(first);
                self.merged.insert(merged)
            }
        };
        merged.absorb(cell);
    }

    /// Distinct customers, and whether the count is exact.
    pub fn customers(&self) -> (u64, bool) {
        if let Some(first) = self.first {
            return match (first.sketch, first.hll_estimate) {
                (false, _) => (u64::from(first.exact_n), true),
                (true, 0) => (hll_estimate(first.agg().hll).round() as u64, false),
                (true, estimate) => (estimate, false),
            };
        }
        match self.merged.as_deref() {
            None => (0, true),
            Some(Merged {
                sketch: Some(sketch),
                ..
            }) => (hll_estimate(sketch).round() as u64, false),
            Some(Merged { exact, .. }) => (exact.len() as u64, true),
        }
    }
}

impl Merged {
    fn absorb(&mut self, cell: &QueryCell) {
        let agg = cell.agg();
        if !agg.hll.is_empty() && self.sketch.is_none() {
            let mut sketch = agg.hll.to_vec();
            for h in self.exact.drain() {
                hll_add(&mut sketch, h);
            }
            self.sketch = Some(sketch);
        } else if let Some(sketch) = &mut self.sketch {
            max_into(sketch, agg.hll);
        }
        match &mut self.sketch {
            Some(sketch) => {
                for h in agg.customers.iter() {
                    hll_add(sketch, h);
                }
            }
            None => self.exact.extend(agg.customers.iter()),
        }
    }
}

fn max_into(sketch: &mut [u8], other: &[u8]) {
    for (r, o) in sketch.iter_mut().zip(other) {
        *r = (*r).max(*o);
    }
}

/// The cells one event contributes to: its hourly base cell, one hourly
/// attribute cell per attribute, and in every view of `layout` one cell per
/// period kind (one per attribute for views that keep the attribute).
pub fn cells_of(ev: &PreferenceEvent, layout: &Layout) -> Vec<CellKey> {
    let mut out = Vec::new();
    for_each_cell(
        ev,
        layout,
        &Bucket::VIEW_PERIODS,
        |family, period, hour, dims| {
            out.push(CellKey {
                family,
                period,
                hour,
                dims: dims.to_owned(),
            })
        },
    );
    out
}

/// Calls `f` with every cell of `ev` (see [`cells_of`]) whose period is
/// an hour or one of `view_periods`, its dimensions borrowed from the
/// event.
fn for_each_cell(
    ev: &PreferenceEvent,
    layout: &Layout,
    view_periods: &[Bucket],
    mut f: impl FnMut(u8, Bucket, i64, &CellDims<&str>),
) {
    let base = CellDims {
        gtin: ev.product.gtin.as_str(),
        category: ev.product.category.as_str(),
        brand: ev.product.brand.as_str(),
        region: ev.region.as_str(),
        channel: ev.channel.number() as u8,
        stage: ev.stage.number() as u8,
        kind: ev.kind.number() as u8,
        age_band: ev.age_band.as_str(),
        attribute: None,
    };
    let hour = hour_of(ev.occurred_at);
    // The start of each view period asked for (`None`: not asked for).
    let starts = Bucket::VIEW_PERIODS.map(|p| {
        (
            p,
            view_periods
                .contains(&p)
                .then(|| bucket_start_hour(hour, p)),
        )
    });
    let with_attributes: Vec<CellDims<&str>> = ev
        .attributes
        .iter()
        .filter(|(k, _)| layout.keeps_attribute(k))
        .map(|(k, v)| CellDims {
            attribute: Some((k.as_str(), v.as_str())),
            ..base
        })
        .collect();
    for (i, view) in layout.views.iter().enumerate() {
        let sources = if view.contains(DimSet::ATTRIBUTE) {
            &with_attributes[..]
        } else {
            std::slice::from_ref(&base)
        };
        for dims in sources {
            let dims = dims.masked(*view);
            for (period, start) in starts {
                let Some(start) = start else { continue };
                f(Layout::family(i), period, start, &dims);
            }
        }
    }
    for dims in &with_attributes {
        f(FAMILY_ATTRIBUTE, Bucket::Hour, hour, dims);
    }
    f(FAMILY_BASE, Bucket::Hour, hour, &base);
}

/// Merges cells (encoded keys and values) onto the dimensions `keep`: the
/// cells a view of `keep` holds for the same periods, under the cells'
/// own family. Counts add up and customers unite as in [`fold`], so a
/// query grouping by (and filtering on) dimensions of `keep` answers the
/// same from either. As in a view, attribute cells are kept exactly when
/// `keep` has the attribute (the others are left out). On a cell that does
/// not decode, its key.
pub fn project<'a>(
    cells: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    keep: DimSet,
) -> Result<BTreeMap<Vec<u8>, Agg>, &'a [u8]> {
    let mut out: BTreeMap<Vec<u8>, Agg> = BTreeMap::new();
    for (k, v) in cells {
        let agg = open_value(k, v).and_then(Agg::decode_bytes);
        let (Some(key), Some(agg)) = (CellKey::decode(k), agg) else {
            return Err(k);
        };
        if key.dims.attribute.is_some() != keep.contains(DimSet::ATTRIBUTE) {
            continue;
        }
        let key = CellKey {
            dims: key.dims.masked(keep),
            ..key
        }
        .encode();
        match out.entry(key) {
            std::collections::btree_map::Entry::Occupied(mut cell) => {
                cell.get_mut().merge_cell(&agg);
            }
            std::collections::btree_map::Entry::Vacant(cell) => {
                cell.insert(agg);
            }
        }
    }
    for agg in out.values_mut() {
        agg.seal();
    }
    Ok(out)
}

/// Folds a batch of events into per-cell deltas, by encoded key.
pub fn fold<'a>(
    events: impl IntoIterator<Item = &'a PreferenceEvent>,
    layout: &Layout,
) -> BTreeMap<Vec<u8>, Agg> {
    let mut cells: BTreeMap<Vec<u8>, Agg> = BTreeMap::new();
    // Most cells of a commit are already in the map (a view's day cell
    // gets many events), and looking one up by a borrowed key allocates
    // nothing.
    fold_with(
        events,
        layout,
        &Bucket::VIEW_PERIODS,
        |key, contribution| match cells.get_mut(key) {
            Some(agg) => agg.merge_cell(contribution),
            None => {
                cells.insert(key.to_vec(), contribution.clone());
            }
        },
    );
    cells
}

/// Hands each cell that `events` add to, one event at a time, to `sink`:
/// the cell's encoded key and the event's contribution; of the views'
/// cells only those of `view_periods`. [`fold`] collects them all; the
/// store's writer adds the views' day cells to the waiting cells directly
/// (their weeks and months are [`derived`] from them).
pub fn fold_with<'a>(
    events: impl IntoIterator<Item = &'a PreferenceEvent>,
    layout: &Layout,
    view_periods: &[Bucket],
    mut sink: impl FnMut(&[u8], &Agg),
) {
    // One key buffer for every cell.
    let mut key = Vec::with_capacity(128);
    for ev in events {
        let contribution = Agg::of_event(ev);
        for_each_cell(ev, layout, view_periods, |family, period, hour, dims| {
            key.clear();
            key.extend_from_slice(&period_prefix(family, period, hour));
            dims.encode_into(&mut key);
            sink(&key, &contribution);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_family_period_and_hour() {
        let k = CellKey {
            family: FAMILY_ATTRIBUTE,
            period: Bucket::Hour,
            hour: 493_000,
            dims: CellDims {
                gtin: "04740001000017".into(),
                category: "dairy".into(),
                brand: "Põlluvara".into(),
                region: "EE-10".into(),
                channel: 2,
                stage: 3,
                kind: 1,
                age_band: "35-44".into(),
                attribute: Some(("size".into(), "M".into())),
            },
        };
        assert_eq!(CellKey::decode(&k.encode()).unwrap(), k);
        let mut earlier = k.clone();
        earlier.hour -= 1;
        earlier.dims.gtin = "99999999999999".into();
        assert!(earlier.encode() < k.encode());
        let mut negative = k.clone();
        negative.hour = -5;
        assert!(negative.encode() < k.encode());
        let mut base = k.clone();
        base.family = FAMILY_BASE;
        base.dims.attribute = None;
        base.hour += 100;
        assert_eq!(CellKey::decode(&base.encode()).unwrap(), base);
        assert!(base.encode() < k.encode(), "families sort first");
        let mut view = base.clone();
        view.family = Layout::family(0);
        view.period = Bucket::Week;
        view.dims = view.dims.masked(DimSet::CATEGORY.union(DimSet::REGION));
        assert_eq!(view.dims.gtin, "");
        assert_eq!(view.dims.category, "dairy");
        assert_eq!(CellKey::decode(&view.encode()).unwrap(), view);
        let start = period_prefix(view.family, Bucket::Week, view.hour).to_vec();
        let end = period_prefix(view.family, Bucket::Week, view.hour + 1).to_vec();
        assert!(start <= view.encode() && view.encode() < end);
    }

    #[test]
    fn an_event_lands_in_every_period_of_every_view() {
        let layout = Layout::default();
        let mut ev = crate::domain::PreferenceEvent::example();
        ev.attributes = [("size", "M"), ("colour", "red")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cells = cells_of(&ev, &layout);
        // base + 2 attribute cells + 4 plain views × 3 periods + 1 attribute
        // view × 2 attributes × 3 periods.
        assert_eq!(cells.len(), 1 + 2 + 4 * 3 + 2 * 3);
        let hour = hour_of(ev.occurred_at);
        for c in &cells {
            assert_eq!(c.hour, bucket_start_hour(hour, c.period));
            assert!(c.hour <= hour && hour < next_bucket_start(c.hour, c.period));
        }
        // An attribute the layout does not keep adds no cells.
        ev.attributes
            .insert("basket".to_string(), "bk-0001".to_string());
        assert_eq!(cells_of(&ev, &layout).len(), cells.len());
        let every = Layout {
            attribute_keys: None,
            ..Layout::default()
        };
        assert_eq!(cells_of(&ev, &every).len(), 1 + 3 + 4 * 3 + 3 * 3);
        assert!(layout.keeps_attribute("size") && !layout.keeps_attribute("basket"));
    }

    /// `fold` builds its keys in place from the event's borrowed
    /// dimensions; they must be the keys of `cells_of`, which queries,
    /// erasure and rebuilds decode and re-encode.
    #[test]
    fn fold_keys_are_the_encoded_cells_of_each_event() {
        let layout = Layout::default();
        let mut a = crate::domain::PreferenceEvent::example();
        a.attributes = [("size", "M"), ("colour", "red")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut b = a.clone();
        b.region = "LV-RIX".into();
        b.occurred_at = UnixNanos(a.occurred_at.0 + 40 * 24 * NANOS_PER_HOUR);
        let folded = fold([&a, &b, &a], &layout);
        let mut expected: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for ev in [&a, &b, &a] {
            for cell in cells_of(ev, &layout) {
                *expected.entry(cell.encode()).or_default() += 1;
            }
        }
        let got: BTreeMap<Vec<u8>, u64> =
            folded.iter().map(|(k, v)| (k.clone(), v.events)).collect();
        assert_eq!(got, expected);
        assert!(folded.values().any(|agg| agg.events == 2));
    }

    /// `AggRef` reads what `Agg` writes, for every kind of cell.
    #[test]
    fn stored_cells_read_in_place_as_they_decode() {
        let mut exact = Agg {
            events: 300,
            score_sum: 41,
            score_n: 9,
            promoters: 3,
            detractors: 2,
            nps_n: 7,
            purchases: 120,
            returns: 1u64 << 40,
            ..Default::default()
        };
        exact.customers = vec![1, 300, u64::MAX, 1 << 35];
        let mut sketch = exact.clone();
        for i in 0..200 {
            sketch.customers.push(mix(i));
        }
        sketch.customers.sort_unstable();
        sketch.compact();
        sketch.seal();
        assert!(!sketch.hll.is_empty() && sketch.hll_estimate > 0);
        for agg in [Agg::default(), exact, sketch] {
            let bytes = agg.encode();
            let read = AggRef::parse(&bytes).expect("parses");
            assert_eq!(read.counts, agg.counts());
            assert_eq!(read.customers.iter().collect::<Vec<_>>(), agg.customers);
            assert_eq!(read.customers.len(), agg.customers.len());
            assert_eq!(read.hll, agg.hll.as_slice());
            assert_eq!(read.hll_estimate, agg.hll_estimate);
            let key = CellKey {
                family: FAMILY_BASE,
                period: Bucket::Hour,
                hour: 1,
                dims: CellDims::default(),
            };
            let mut symbols = Interner::default();
            let stored = seal_value(&key.encode(), &agg);
            let cell =
                QueryCell::decode(&key.encode(), stored.clone(), &mut symbols).expect("cell");
            // A flipped byte in the value or the key is refused, not read.
            for i in 0..stored.len() {
                let mut bad = stored.clone();
                bad[i] ^= 0x10;
                assert!(QueryCell::decode(&key.encode(), bad, &mut symbols).is_none());
            }
            let mut other = key.encode();
            *other.last_mut().expect("key bytes") ^= 1;
            assert!(
                open_value(&other, &stored).is_none(),
                "the key is checked too"
            );
            assert_eq!(cell.exact_n as usize, agg.customers.len());
            let mut acc = GroupAcc::default();
            acc.add(&cell);
            assert_eq!(acc.customers(), agg.customers());
            acc.add(&cell);
            assert_eq!(acc.customers(), agg.customers(), "a union with itself");
        }
        assert!(AggRef::parse(&[0x4a, 0x05, 0x01]).is_none(), "cut short");
        assert!(AggRef::parse(&[0x48, 0x01]).is_none(), "unpacked customers");
    }

    #[test]
    fn the_power_table_is_exact() {
        for r in 0..=64u8 {
            assert_eq!(pow2_neg(r), 2f64.powi(-i32::from(r)), "2^-{r}");
        }
    }

    #[test]
    fn periods_step_through_months_of_every_length() {
        // 2024-01-01T00:00Z, a leap year.
        let mut h = 1_704_067_200 / 3600;
        let mut days = Vec::new();
        for _ in 0..12 {
            let next = next_bucket_start(h, Bucket::Month);
            days.push((next - h) / 24);
            assert_eq!(bucket_start_hour(next - 1, Bucket::Month), h);
            h = next;
        }
        assert_eq!(days, [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]);
    }

    /// splitmix64: uniform 64-bit values, as HMAC-derived hashes are.
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn exact_below_the_limit_and_within_bound_above() {
        let mut a = Agg::default();
        for i in 0..EXACT_LIMIT as u64 {
            let mut one = Agg::default();
            one.customers.push(mix(i));
            a.merge(&one);
            a.merge(&one);
            a.compact();
        }
        assert_eq!(a.customers(), (EXACT_LIMIT as u64, true));
        let n = 20_000u64;
        for i in 0..n {
            let mut one = Agg::default();
            one.customers.push(mix(1_000_000 + i));
            a.merge(&one);
            a.compact();
        }
        let (est, exact) = a.customers();
        assert!(!exact);
        let err = (est as f64 - (n + EXACT_LIMIT as u64) as f64).abs() / n as f64;
        assert!(err < 3.0 * 0.0325, "estimate {est}, error {err}");
    }
}
