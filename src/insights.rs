//! Insight queries over the rollups: group the cells in the query's window
//! by the requested dimensions, compute each group's metrics, and hide the
//! groups with fewer than `k_min` distinct customers (rule 6 of the design:
//! small groups stay hidden).

use std::collections::HashMap;

use crate::domain::{Channel, EventFilter, EventKind, JourneyStage, UnixNanos};
use crate::rollup::{self, CellDims, Counts, DimSet, Interner, Layout, QueryCell, Sym};
use crate::store::{self, QueryCells, Store};
use crate::wire::{ReportWriter, RowFields};

/// A dimension to group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    Gtin,
    Category,
    Brand,
    Region,
    Channel,
    Stage,
    Kind,
    AgeBand,
    /// Values of the query's attribute key.
    Attribute,
    /// The query's time bucket.
    Time,
}

pub use crate::rollup::{bucket_start_hour, Bucket};

/// A validated insight query.
#[derive(Debug, Clone)]
pub struct Query {
    pub filter: EventFilter,
    pub group_by: Vec<Dim>,
    /// Required when grouping by [`Dim::Attribute`].
    pub attribute_key: Option<String>,
    /// Required when grouping by [`Dim::Time`].
    pub bucket: Option<Bucket>,
    /// At most this many rows; 0 = all.
    pub limit: usize,
}

/// One group of the result.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// One value per group_by dimension, in order.
    pub key: Vec<String>,
    pub bucket_start: Option<UnixNanos>,
    pub events: u64,
    pub customers: u64,
    /// Whether `customers` is exact (every contributing cell was).
    pub customers_exact: bool,
    pub avg_score: Option<f64>,
    pub nps: Option<f64>,
    pub return_rate: Option<f64>,
    pub share: f64,
    /// The sums the metrics derive from.
    pub counts: rollup::Counts,
}

/// A query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub rows: Vec<Row>,
    pub suppressed_groups: u32,
    pub k_min: u32,
    /// The privacy budget spent on noise (0: exact; see [`crate::dp`]).
    pub epsilon: f64,
}

impl Dim {
    /// The rollup dimension (none for TIME).
    fn dims(self) -> DimSet {
        match self {
            Dim::Gtin => DimSet::GTIN,
            Dim::Category => DimSet::CATEGORY,
            Dim::Brand => DimSet::BRAND,
            Dim::Region => DimSet::REGION,
            Dim::Channel => DimSet::CHANNEL,
            Dim::Stage => DimSet::STAGE,
            Dim::Kind => DimSet::KIND,
            Dim::AgeBand => DimSet::AGE_BAND,
            Dim::Attribute => DimSet::ATTRIBUTE,
            Dim::Time => DimSet::default(),
        }
    }
}

/// The dimensions a filter looks at.
fn filter_dims(f: &EventFilter) -> DimSet {
    [
        (!f.gtin_prefixes.is_empty(), DimSet::GTIN),
        (!f.categories.is_empty(), DimSet::CATEGORY),
        (!f.kinds.is_empty(), DimSet::KIND),
        (!f.channels.is_empty(), DimSet::CHANNEL),
        (!f.regions.is_empty(), DimSet::REGION),
    ]
    .into_iter()
    .filter(|(used, _)| *used)
    .fold(DimSet::default(), |acc, (_, d)| acc.union(d))
}

/// Where a query's cells come from: a family, and the periods it keeps,
/// coarsest first, that may serve the query. Hours always come from the
/// hourly family over every dimension (`hourly`).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub family: u8,
    /// The view's dimensions, `None` for the hourly families over every
    /// dimension.
    pub view: Option<DimSet>,
    pub periods: Vec<Bucket>,
    /// The family read for whole hours.
    pub hourly: u8,
}

/// The cheapest source that covers `needed`: the view with the fewest
/// dimensions that keeps all of them (and the attribute exactly when the
/// query is about one), else the hourly families over every dimension.
pub fn plan(layout: Option<&Layout>, needed: DimSet, bucket: Option<Bucket>) -> Plan {
    let attribute = needed.contains(DimSet::ATTRIBUTE);
    let hourly = if attribute {
        rollup::FAMILY_ATTRIBUTE
    } else {
        rollup::FAMILY_BASE
    };
    let view = layout
        .filter(|_| bucket != Some(Bucket::Hour))
        .and_then(|l| {
            l.views
                .iter()
                .enumerate()
                .filter(|(_, v)| v.contains(needed) && v.contains(DimSet::ATTRIBUTE) == attribute)
                .min_by_key(|(_, v)| v.len())
        });
    match view {
        Some((i, dims)) => Plan {
            family: Layout::family(i),
            view: Some(*dims),
            hourly,
            periods: match bucket {
                Some(Bucket::Hour) | Some(Bucket::Day) => vec![Bucket::Day, Bucket::Hour],
                Some(Bucket::Week) => vec![Bucket::Week, Bucket::Day, Bucket::Hour],
                Some(Bucket::Month) | None => vec![Bucket::Month, Bucket::Day, Bucket::Hour],
            },
        },
        None => Plan {
            family: hourly,
            view: None,
            periods: vec![Bucket::Hour],
            hourly,
        },
    }
}

/// A cell range to read: `period` cells starting in hours `from..to`.
pub type Piece = (Bucket, Option<i64>, Option<i64>);

/// Splits the hours `[a, b)` (open ends: unbounded) into whole periods of
/// the coarsest kind of `periods` that fit, and the rest, at each end,
/// into finer ones. The last kind (hours) takes whatever is left.
pub fn decompose(a: Option<i64>, b: Option<i64>, periods: &[Bucket], out: &mut Vec<Piece>) {
    if let (Some(a), Some(b)) = (a, b) {
        if a >= b {
            return;
        }
    }
    let Some((&p, finer)) = periods.split_first() else {
        return;
    };
    if finer.is_empty() {
        out.push((p, a, b));
        return;
    }
    let lo = a.map(|a| {
        let s = bucket_start_hour(a, p);
        if s == a {
            s
        } else {
            rollup::next_bucket_start(s, p)
        }
    });
    let hi = b.map(|b| bucket_start_hour(b, p));
    if let (Some(lo), Some(hi)) = (lo, hi) {
        if lo >= hi {
            return decompose(a, b, finer, out);
        }
    }
    out.push((p, lo, hi));
    if let (Some(a), Some(lo)) = (a, lo) {
        decompose(Some(a), Some(lo), finer, out);
    }
    if let (Some(hi), Some(b)) = (hi, b) {
        decompose(Some(hi), Some(b), finer, out);
    }
}

/// Runs `q` over the rollups of `store`.
pub fn run(store: &Store, q: &Query, k_min: u32) -> store::Result<Report> {
    run_with(store, q, k_min, store.rollup_layout())
}

/// Runs `q` reading the views of `layout` (`None`: only the hourly
/// families over every dimension; the answer is the same, slower).
pub fn run_with(
    store: &Store,
    q: &Query,
    k_min: u32,
    layout: Option<&Layout>,
) -> store::Result<Report> {
    answer(store, q, k_min, layout, |a| Report {
        rows: a
            .rows()
            .map(|r| Row {
                key: r.key().iter().map(|k| k.to_string()).collect(),
                bucket_start: r.bucket_start,
                events: r.counts.events,
                customers: r.customers,
                customers_exact: r.exact,
                avg_score: r.avg_score(),
                nps: r.nps(),
                return_rate: r.return_rate(),
                share: r.share(),
                counts: *r.counts,
            })
            .collect(),
        suppressed_groups: a.suppressed,
        k_min,
        epsilon: 0.0,
    })
}

/// Runs `q` and writes the report's protobuf encoding (`InsightReport`)
/// straight from the groups, without building a row object per group: what
/// `Insights.Query` sends. Decodes to what [`run`] returns, converted.
pub fn run_encoded(store: &Store, q: &Query, k_min: u32) -> store::Result<EncodedReport> {
    answer(store, q, k_min, store.rollup_layout(), |a| {
        let mut writer = ReportWriter::with_capacity(a.order.len());
        for r in a.rows() {
            writer.row(&RowFields {
                key: r.key(),
                bucket_start: r.bucket_start,
                events: r.counts.events,
                customers: r.customers,
                avg_score: r.avg_score(),
                nps: r.nps(),
                return_rate: r.return_rate(),
                share: r.share(),
            });
        }
        EncodedReport {
            rows: a.order.len(),
            suppressed_groups: a.suppressed,
            bytes: writer.finish(a.suppressed, k_min),
        }
    })
}

/// An `InsightReport` in its protobuf encoding, and what a log line says of
/// it.
#[derive(Debug, Clone)]
pub struct EncodedReport {
    pub rows: usize,
    pub suppressed_groups: u32,
    pub bytes: bytes::Bytes,
}

/// The groups of an answer, ranked and cut to the limit: what [`run_with`]
/// turns into rows and [`run_encoded`] into bytes.
struct Answer<'a> {
    keys: Vec<GroupKey>,
    accs: Vec<rollup::GroupAcc<'a>>,
    customers: Vec<(u64, bool)>,
    /// The groups returned, in order.
    order: Vec<usize>,
    /// Each position's label per group (the bucket's RFC 3339 start for
    /// TIME).
    labels: Labels<'a>,
    total: u64,
    suppressed: u32,
}

/// The key labels of the returned groups, borrowed from the symbols (or
/// the bucket labels made for this answer).
struct Labels<'a> {
    group_by: &'a [Dim],
    symbols: &'a Interner,
    buckets: HashMap<i64, String, foldhash::fast::FixedState>,
}

/// One returned group, borrowed from an [`Answer`].
struct RowRef<'a> {
    key: [&'a str; DIMS],
    len: usize,
    bucket_start: Option<UnixNanos>,
    counts: &'a Counts,
    customers: u64,
    exact: bool,
    total: u64,
}

impl RowRef<'_> {
    fn key(&self) -> &[&str] {
        &self.key[..self.len]
    }

    fn avg_score(&self) -> Option<f64> {
        self.counts.avg_score()
    }

    fn nps(&self) -> Option<f64> {
        self.counts.nps()
    }

    fn return_rate(&self) -> Option<f64> {
        self.counts.return_rate()
    }

    /// The group's events / all matched events.
    fn share(&self) -> f64 {
        if self.total > 0 {
            self.counts.events as f64 / self.total as f64
        } else {
            0.0
        }
    }
}

impl Answer<'_> {
    fn rows(&self) -> impl Iterator<Item = RowRef<'_>> {
        self.order.iter().map(|&i| {
            let (values, bucket) = &self.keys[i];
            let mut key = [""; DIMS];
            let l = &self.labels;
            for ((slot, d), v) in key.iter_mut().zip(l.group_by).zip(values) {
                *slot = match (d, bucket) {
                    (Dim::Time, Some(b)) => l.buckets.get(b).map_or("", String::as_str),
                    _ => dim_label(*d, *v, l.symbols),
                };
            }
            let (customers, exact) = self.customers[i];
            RowRef {
                key,
                len: l.group_by.len(),
                bucket_start: bucket.map(rollup::hour_start),
                counts: &self.accs[i].counts,
                customers,
                exact,
                total: self.total,
            }
        })
    }
}

/// Plans and runs `q`, then hands the ranked groups to `emit`.
fn answer<R>(
    store: &Store,
    q: &Query,
    k_min: u32,
    layout: Option<&Layout>,
    emit: impl FnOnce(&Answer<'_>) -> R,
) -> store::Result<R> {
    let attribute = if q.group_by.contains(&Dim::Attribute) {
        q.attribute_key.as_deref()
    } else {
        None
    };
    let bucket = q.bucket.filter(|_| q.group_by.contains(&Dim::Time));
    let needed = q
        .group_by
        .iter()
        .fold(filter_dims(&q.filter), |acc, d| acc.union(d.dims()));
    let started = std::time::Instant::now();
    let chosen = plan(layout, needed, bucket);
    let view = chosen.view.map(DimSet::describe);
    // Share is of all matched events, with or without the attribute (read
    // first: decoding cells interns symbols, which waits for readers).
    let all_matched = match attribute {
        None => None,
        Some(_) => {
            let needed = filter_dims(&q.filter);
            let all = matching_cells(store, &q.filter, plan(layout, needed, None))?;
            let symbols = all.symbols();
            let events = matching(&all, &symbols, &q.filter, None)
                .iter()
                .map(|cell| cell.counts.events)
                .sum::<u64>();
            Some(events)
        }
    };
    let read_cells = matching_cells(store, &q.filter, chosen)?;
    let symbols = read_cells.symbols();
    let cells = matching(&read_cells, &symbols, &q.filter, attribute);
    let read = started.elapsed();
    let (keys, accs, total) = group(&cells, &q.group_by, bucket);
    let grouped = started.elapsed();
    let total = all_matched.unwrap_or(total);
    let customers: Vec<(u64, bool)> = accs.iter().map(rollup::GroupAcc::customers).collect();
    let kept: Vec<usize> = (0..accs.len())
        .filter(|&i| customers[i].0 >= u64::from(k_min))
        .collect();
    let suppressed = u32::try_from(accs.len() - kept.len()).unwrap_or(u32::MAX);
    // Events descending, then key: the key's values in group_by order, the
    // bucket by its start (as its RFC 3339 label sorts). Values are ranked
    // first, so that ties compare integers rather than strings.
    let mut order = ranked_order(&q.group_by, &keys, &kept, &symbols, |i| {
        accs[i].counts.events
    });
    if q.limit > 0 {
        order.truncate(q.limit);
    }
    let mut buckets = HashMap::default();
    for &i in &order {
        if let Some(b) = keys[i].1 {
            buckets.entry(b).or_insert_with(|| format_hour(b));
        }
    }
    let answer = Answer {
        keys,
        accs,
        customers,
        order,
        labels: Labels {
            group_by: &q.group_by,
            symbols: &symbols,
            buckets,
        },
        total,
        suppressed,
    };
    let out = emit(&answer);
    tracing::debug!(
        view = view.as_deref().unwrap_or("(hourly, every dimension)"),
        cells = cells.len(),
        ?read,
        ?grouped,
        total = ?started.elapsed(),
        "insight query planned and run"
    );
    Ok(out)
}

/// Groups `cells` by the `group_by` values and bucket: the groups' keys
/// and accumulators in first-seen order, and the events of all cells.
fn group<'a>(
    cells: &[&'a QueryCell],
    group_by: &[Dim],
    bucket: Option<Bucket>,
) -> (Vec<GroupKey>, Vec<rollup::GroupAcc<'a>>, u64) {
    debug_assert!(group_by.len() <= DIMS, "dimensions are distinct");
    use std::hash::BuildHasher;
    let hasher = foldhash::fast::FixedState::default();
    let mut total = 0u64;
    // The index holds group numbers only (4 bytes a slot, not the 56-byte
    // keys): it stays in cache while thousands of groups are added.
    let mut index: hashbrown::HashTable<u32> = hashbrown::HashTable::with_capacity(cells.len());
    // At most one group per cell; sized once rather than grown (a grown
    // vector of 12,000 groups copies itself a dozen times).
    let mut keys: Vec<GroupKey> = Vec::with_capacity(cells.len());
    let mut accs: Vec<rollup::GroupAcc> = Vec::with_capacity(cells.len());
    for &cell in cells {
        total += cell.counts.events;
        let bucket = bucket.map(|b| {
            if cell.period == b {
                cell.hour
            } else {
                bucket_start_hour(cell.hour, b)
            }
        });
        let mut values = [0; DIMS];
        for (slot, d) in values.iter_mut().zip(group_by) {
            *slot = dim_id(*d, &cell.dims);
        }
        let key = (values, bucket);
        let hash = hasher.hash_one(key);
        let slot = index.entry(
            hash,
            |&i| keys[i as usize] == key,
            |&i| hasher.hash_one(keys[i as usize]),
        );
        let i = match slot {
            hashbrown::hash_table::Entry::Occupied(e) => *e.get() as usize,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(keys.len() as u32);
                keys.push(key);
                accs.push(rollup::GroupAcc::default());
                keys.len() - 1
            }
        };
        accs[i].add(cell);
    }
    (keys, accs, total)
}

/// `groups` in report order: events descending (`events` of a group),
/// then key. The ranks of a key's values are packed into one integer when
/// they fit in 64 bits (they always do for a few dimensions), so that the
/// sort moves 24-byte entries rather than the keys' rank arrays.
fn ranked_order(
    group_by: &[Dim],
    keys: &[GroupKey],
    groups: &[usize],
    symbols: &Interner,
    events: impl Fn(usize) -> u64,
) -> Vec<usize> {
    let (ranks, distinct) = rank_keys(group_by, keys, groups, symbols);
    let packed = distinct
        .iter()
        .try_fold(1u64, |product, &n| product.checked_mul(n.max(1)));
    if packed.is_some() {
        let pack = |r: &[u32; DIMS]| {
            r.iter()
                .zip(&distinct)
                .fold(0u64, |acc, (&rank, &n)| acc * n.max(1) + u64::from(rank))
        };
        let mut order: Vec<(std::cmp::Reverse<u64>, u64, u32)> = groups
            .iter()
            .map(|&i| (std::cmp::Reverse(events(i)), pack(&ranks[i]), i as u32))
            .collect();
        order.sort_unstable();
        return order.into_iter().map(|(_, _, i)| i as usize).collect();
    }
    let mut order: Vec<(std::cmp::Reverse<u64>, [u32; DIMS], usize)> = groups
        .iter()
        .map(|&i| (std::cmp::Reverse(events(i)), ranks[i], i))
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, _, i)| i).collect()
}

/// For each group of `groups`, the rank of each of its values among the
/// values of its position (strings in order, buckets by start): groups
/// order by key as their rank arrays do.
fn rank_keys(
    group_by: &[Dim],
    keys: &[GroupKey],
    groups: &[usize],
    symbols: &Interner,
) -> (Vec<[u32; DIMS]>, Vec<u64>) {
    let mut ranks = vec![[0u32; DIMS]; keys.len()];
    // Per position, how many distinct values (ranks run 0..n).
    let mut distinct = vec![1u64; DIMS];
    for (pos, d) in group_by.iter().enumerate() {
        if *d == Dim::Time {
            let mut starts: Vec<Option<i64>> = groups.iter().map(|&i| keys[i].1).collect();
            starts.sort_unstable();
            starts.dedup();
            for &i in groups {
                let rank = starts.binary_search(&keys[i].1).unwrap_or_default();
                ranks[i][pos] = rank as u32;
            }
            distinct[pos] = starts.len() as u64;
            continue;
        }
        let mut values: Vec<u32> = groups.iter().map(|&i| keys[i].0[pos]).collect();
        values.sort_unstable();
        values.dedup();
        values.sort_by(|a, b| dim_label(*d, *a, symbols).cmp(dim_label(*d, *b, symbols)));
        distinct[pos] = values.len() as u64;
        let rank: HashMap<u32, u32, foldhash::fast::FixedState> = values
            .into_iter()
            .enumerate()
            .map(|(r, v)| (v, r as u32))
            .collect();
        for &i in groups {
            ranks[i][pos] = rank[&keys[i].0[pos]];
        }
    }
    (ranks, distinct)
}

/// Every cell of `plan` in the filter's window, decoded: whole periods
/// from the rollups, the partial hours at the window's edges folded from
/// the events in them, so the window is exact. Unfiltered: see
/// [`matching`].
fn matching_cells(store: &Store, filter: &EventFilter, plan: Plan) -> store::Result<QueryCells> {
    let (from, to) = hour_window(filter);
    let (edges, from, to) = edge_ranges(filter, from, to);
    // Retention removed everything before the horizon; cells of periods
    // that started earlier still count removed events.
    let from = match (from, store.rollup_horizon()?) {
        (Some(f), Some(h)) => Some(f.max(h)),
        (f, h) => f.or(h),
    };
    let mut pieces = Vec::new();
    decompose(from, to, &plan.periods, &mut pieces);
    let pieces: Vec<_> = pieces
        .into_iter()
        .map(|(period, a, b)| {
            let family = if period == Bucket::Hour {
                plan.hourly
            } else {
                plan.family
            };
            (family, period, a, b)
        })
        .collect();
    store.read_rollups(&pieces, plan.view, &edges)
}

/// The cells of `cells` that match the filter (and are about `attribute`,
/// if given, or about no attribute otherwise).
fn matching<'a>(
    cells: &'a QueryCells,
    symbols: &Interner,
    filter: &EventFilter,
    attribute: Option<&str>,
) -> Vec<&'a QueryCell> {
    let categories: Vec<String> = filter.categories.iter().map(|c| c.to_lowercase()).collect();
    // An attribute no cell has matches nothing.
    let attribute = attribute.map(|a| symbols.get(a).unwrap_or(Sym::MAX));
    let unfiltered = filter.gtin_prefixes.is_empty()
        && categories.is_empty()
        && filter.kinds.is_empty()
        && filter.channels.is_empty()
        && filter.regions.is_empty();
    cells
        .iter()
        .filter(|cell| {
            let in_family = match (cell.dims.attribute, attribute) {
                (None, None) => true,
                (Some((k, _)), Some(want)) => k == want,
                _ => false,
            };
            in_family
                && (unfiltered
                    || cell_matches(filter, &categories, &symbols.resolve_dims(&cell.dims)))
        })
        .collect()
}

/// The whole hours inside a filter's window: since rounded up, until
/// rounded down (rollups are hourly).
fn hour_window(f: &EventFilter) -> (Option<i64>, Option<i64>) {
    let from = f.since.map(|s| {
        let h = rollup::hour_of(s);
        if rollup::hour_start(h) == s {
            h
        } else {
            h + 1
        }
    });
    let to = f.until.map(rollup::hour_of);
    (from, to)
}

/// Dimensions a query can group by (they are distinct).
const DIMS: usize = 10;

/// A group: its value of each group_by dimension (a symbol, or an enum's
/// number), and its time bucket.
type GroupKey = ([u32; DIMS], Option<i64>);

/// The partial hours at the window's edges (each within one hour; their
/// events are folded, see [`Store::read_rollups`]), and the whole-hour
/// range left for the rollups (empty when the window lies within one
/// hour).
fn edge_ranges(
    f: &EventFilter,
    from: Option<i64>,
    to: Option<i64>,
) -> (Vec<(UnixNanos, UnixNanos)>, Option<i64>, Option<i64>) {
    let mut ranges = Vec::new();
    match (f.since, f.until, from, to) {
        (Some(s), Some(u), Some(fh), Some(th)) if fh > th => {
            // Within one hour: no whole hour, only events.
            ranges.push((s, u));
            return (ranges, Some(fh), Some(fh));
        }
        _ => {
            if let (Some(s), Some(fh)) = (f.since, from) {
                ranges.push((s, rollup::hour_start(fh)));
            }
            if let (Some(u), Some(th)) = (f.until, to) {
                ranges.push((rollup::hour_start(th), u));
            }
        }
    }
    (ranges, from, to)
}

/// `categories`: the filter's categories in lower case.
fn cell_matches(f: &EventFilter, categories: &[String], d: &CellDims<&str>) -> bool {
    let gtin13 = d.gtin.get(1..).unwrap_or("");
    (f.gtin_prefixes.is_empty()
        || f.gtin_prefixes
            .iter()
            .any(|p| gtin13.starts_with(p.as_str())))
        && (categories.is_empty()
            || categories.iter().any(|c| {
                c.chars()
                    .eq(d.category.chars().flat_map(char::to_lowercase))
            }))
        && (f.kinds.is_empty() || f.kinds.iter().any(|k| k.number() == i32::from(d.kind)))
        && (f.channels.is_empty()
            || f.channels
                .iter()
                .any(|c| c.number() == i32::from(d.channel)))
        && (f.regions.is_empty()
            || f.regions
                .iter()
                .any(|r| crate::domain::region_within(d.region, r)))
}

/// A cell's value of `d` as a number: the symbol of a string dimension,
/// the number of an enum (TIME: 0, the bucket stands for it).
fn dim_id(d: Dim, dims: &CellDims<Sym>) -> u32 {
    match d {
        Dim::Gtin => dims.gtin,
        Dim::Category => dims.category,
        Dim::Brand => dims.brand,
        Dim::Region => dims.region,
        Dim::Channel => u32::from(dims.channel),
        Dim::Stage => u32::from(dims.stage),
        Dim::Kind => u32::from(dims.kind),
        Dim::AgeBand => dims.age_band,
        Dim::Attribute => dims.attribute.map_or(Sym::MAX, |(_, v)| v),
        Dim::Time => 0,
    }
}

/// The label of value `id` of dimension `d` (see [`dim_id`]).
fn dim_label(d: Dim, id: u32, symbols: &Interner) -> &str {
    let label = |f: fn(i32) -> Option<&'static str>| {
        i32::try_from(id).ok().and_then(f).unwrap_or("unknown")
    };
    match d {
        Dim::Channel => label(|n| Channel::from_number(n).map(Channel::label)),
        Dim::Stage => label(|n| JourneyStage::from_number(n).map(JourneyStage::label)),
        Dim::Kind => label(|n| EventKind::from_number(n).map(EventKind::label)),
        Dim::Time => "",
        Dim::Attribute if id == Sym::MAX => "",
        _ => symbols.resolve(id),
    }
}

fn format_hour(hour: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(hour.saturating_mul(3600))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| hour.to_string())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{conversions, pb};

    #[test]
    fn buckets_start_at_day_monday_and_month() {
        // 2026-11-19T15:00Z is a Thursday.
        let h = 1_795_100_400 / 3600;
        assert_eq!(
            format_hour(bucket_start_hour(h, Bucket::Hour)),
            "2026-11-19T15:00:00Z"
        );
        assert_eq!(
            format_hour(bucket_start_hour(h, Bucket::Day)),
            "2026-11-19T00:00:00Z"
        );
        assert_eq!(
            format_hour(bucket_start_hour(h, Bucket::Week)),
            "2026-11-16T00:00:00Z"
        );
        assert_eq!(
            format_hour(bucket_start_hour(h, Bucket::Month)),
            "2026-11-01T00:00:00Z"
        );
    }

    #[test]
    fn windows_split_into_whole_periods_and_edges() {
        // 2026-11-19T15:00Z (Thursday) to 2027-01-04T05:00Z.
        let a = 1_795_100_400 / 3600;
        let b = 1_799_038_800 / 3600;
        let mut pieces = Vec::new();
        decompose(
            Some(a),
            Some(b),
            &[Bucket::Month, Bucket::Day, Bucket::Hour],
            &mut pieces,
        );
        let shown: Vec<(Bucket, String, String)> = pieces
            .iter()
            .map(|(p, x, y)| (*p, format_hour(x.unwrap()), format_hour(y.unwrap())))
            .collect();
        let s = |x: &str| x.to_string();
        assert_eq!(
            shown,
            [
                (
                    Bucket::Month,
                    s("2026-12-01T00:00:00Z"),
                    s("2027-01-01T00:00:00Z")
                ),
                (
                    Bucket::Day,
                    s("2026-11-20T00:00:00Z"),
                    s("2026-12-01T00:00:00Z")
                ),
                (
                    Bucket::Hour,
                    s("2026-11-19T15:00:00Z"),
                    s("2026-11-20T00:00:00Z")
                ),
                (
                    Bucket::Day,
                    s("2027-01-01T00:00:00Z"),
                    s("2027-01-04T00:00:00Z")
                ),
                (
                    Bucket::Hour,
                    s("2027-01-04T00:00:00Z"),
                    s("2027-01-04T05:00:00Z")
                ),
            ]
        );
        // The pieces tile the window exactly.
        let mut covered: Vec<(i64, i64)> = Vec::new();
        for (p, x, y) in &pieces {
            let mut h = x.unwrap();
            while h < y.unwrap() {
                let next = rollup::next_bucket_start(h, *p);
                covered.push((h, next));
                h = next;
            }
        }
        covered.sort();
        assert_eq!(covered.first().unwrap().0, a);
        assert_eq!(covered.last().unwrap().1, b);
        assert!(covered.windows(2).all(|w| w[0].1 == w[1].0));
        // Open ends take whole periods up to the first boundary.
        let mut open = Vec::new();
        decompose(
            None,
            Some(b),
            &[Bucket::Week, Bucket::Day, Bucket::Hour],
            &mut open,
        );
        assert_eq!(
            open[0],
            (Bucket::Week, None, Some(bucket_start_hour(b, Bucket::Week)))
        );
        assert_eq!(open.last().unwrap().0, Bucket::Hour);
    }

    #[test]
    fn the_cheapest_covering_view_is_chosen() {
        let layout = Layout::default();
        let cr = DimSet::CATEGORY.union(DimSet::REGION);
        let p = plan(Some(&layout), cr, Some(Bucket::Week));
        assert_eq!(p.view, Some(cr));
        assert_eq!(p.periods, [Bucket::Week, Bucket::Day, Bucket::Hour]);
        let p = plan(Some(&layout), DimSet::KIND, None);
        assert_eq!(p.view, Some(DimSet::GTIN.union(DimSet::KIND)));
        let p = plan(Some(&layout), DimSet::AGE_BAND, None);
        assert_eq!((p.family, p.view), (rollup::FAMILY_BASE, None));
        let p = plan(Some(&layout), DimSet::ATTRIBUTE.union(DimSet::REGION), None);
        assert_eq!((p.family, p.view), (rollup::FAMILY_ATTRIBUTE, None));
        let p = plan(Some(&layout), DimSet::ATTRIBUTE, None);
        assert_eq!(p.view, Some(DimSet::CATEGORY.union(DimSet::ATTRIBUTE)));
        assert_eq!(plan(None, cr, None).view, None);
    }

    /// splitmix64, for a seeded dataset.
    fn mix(z: &mut u64) -> u64 {
        *z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = *z;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    fn dataset(n: usize, start_hour: i64, hours: u64) -> Vec<crate::store::NewEvent> {
        use crate::domain::{Gtin, PreferenceEvent};
        let mut z = 7u64;
        let gtins = ["4740001000017", "4740001000031", "4750002000015"];
        let categories = ["dairy", "cheese", "outerwear"];
        let regions = ["EE-10", "EE-50", "LV-1", "FI"];
        let kinds = [
            EventKind::Purchase,
            EventKind::Return,
            EventKind::Review,
            EventKind::Nps,
        ];
        (0..n)
            .map(|i| {
                let mut pick = |len: usize| (mix(&mut z) % len as u64) as usize;
                let g = pick(gtins.len());
                let kind = kinds[pick(kinds.len())];
                let mut ev = PreferenceEvent::example();
                ev.event_id = format!("ev-{i}");
                ev.product.gtin = Gtin::parse(gtins[g]).expect("valid");
                ev.product.category = categories[g].into();
                ev.region = regions[pick(regions.len())].into();
                ev.kind = kind;
                ev.channel = [Channel::Web, Channel::Store][pick(2)];
                ev.score = match kind {
                    EventKind::Review => Some(1 + pick(5) as u32),
                    EventKind::Nps => Some(pick(11) as u32),
                    _ => None,
                };
                // At most 60 customers: every count is exact on both paths.
                let mut customer = pick(60) as u64;
                ev.customer_pseudonym = format!("{:016x}", mix(&mut customer));
                if pick(3) == 0 {
                    ev.attributes
                        .insert("size".into(), ["S", "M", "L"][pick(3)].into());
                }
                let secs = start_hour * 3600 + (mix(&mut z) % (hours * 3600)) as i64;
                ev.occurred_at = UnixNanos(secs * 1_000_000_000);
                crate::store::NewEvent::local(ev)
            })
            .collect()
    }

    /// Reading the views gives exactly what reading the hourly cells over
    /// every dimension gives, for windows that cut periods anywhere, every
    /// bucket, filters, attributes, and after retention.
    #[tokio::test]
    async fn views_answer_exactly_as_the_hourly_cells() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &[]).expect("open");
        store.check_rollups().expect("fresh store");
        // 2026-01-01T00:00Z, 100 days.
        let start = 1_767_225_600 / 3600;
        let events = dataset(3000, start, 100 * 24);
        for chunk in events.chunks(500) {
            store.append(chunk.to_vec()).await.expect("append");
        }
        let layout = store.rollup_layout().cloned();
        let t = |h: i64, m: i64| Some(UnixNanos((h * 3600 + m * 60) * 1_000_000_000));
        let windows = [
            (None, None),
            (t(start + 30 * 24 + 5, 17), t(start + 77 * 24 + 13, 41)),
            (t(start + 3, 0), t(start + 3 * 24, 0)),
            (None, t(start + 40 * 24 + 7, 30)),
            (t(start + 50 * 24 + 2, 10), t(start + 50 * 24 + 2, 50)),
        ];
        let groupings: [&[Dim]; 7] = [
            &[Dim::Category, Dim::Region, Dim::Time],
            &[Dim::Kind],
            &[Dim::Gtin, Dim::Kind, Dim::Time],
            &[Dim::Category, Dim::Attribute],
            &[Dim::Attribute, Dim::Time],
            &[Dim::Channel, Dim::Region],
            &[],
        ];
        let filters: Vec<EventFilter> = vec![
            EventFilter::default(),
            EventFilter {
                categories: vec!["dairy".into()],
                ..Default::default()
            },
            EventFilter {
                kinds: vec![EventKind::Review, EventKind::Nps],
                regions: vec!["EE".into()],
                ..Default::default()
            },
            EventFilter {
                gtin_prefixes: vec!["4740001".into()],
                ..Default::default()
            },
        ];
        let compare = |label: &str| {
            let mut checked = 0;
            for (since, until) in windows {
                for group_by in groupings {
                    let buckets: &[Bucket] = if group_by.contains(&Dim::Time) {
                        &Bucket::ALL
                    } else {
                        &[Bucket::Day]
                    };
                    for &bucket in buckets {
                        for base in &filters {
                            let q = Query {
                                filter: EventFilter {
                                    since,
                                    until,
                                    ..base.clone()
                                },
                                group_by: group_by.to_vec(),
                                attribute_key: Some("size".into()),
                                bucket: Some(bucket),
                                limit: 0,
                            };
                            let fast = run_with(&store, &q, 3, layout.as_ref()).expect("views");
                            let slow = run_with(&store, &q, 3, None).expect("hourly");
                            assert_eq!(fast, slow, "{label}: {q:?}");
                            // What the node sends: the same report, encoded.
                            let sent = run_encoded(&store, &q, 3).expect("encoded");
                            assert_eq!(
                                pb::InsightReport::decode(sent.bytes).expect("decodes"),
                                conversions::insight_report_to_pb(fast.clone()),
                                "{label}: {q:?}"
                            );
                            checked += fast.rows.len();
                        }
                    }
                }
            }
            assert!(checked > 1000, "{label}: only {checked} rows compared");
        };
        compare("all events");
        // More events in the same periods: the cached periods must not
        // answer for the changed cells, neither while the deltas wait in
        // memory nor once a checkpoint merged them.
        let mut more = dataset(1500, start, 100 * 24);
        for ev in &mut more {
            ev.event.event_id.push_str("-more");
        }
        store.append(more).await.expect("append more");
        compare("waiting deltas over cached periods");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.rollup_deltas_waiting() {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint in 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        compare("merged deltas over cached periods");
        // Retention at a cut through a day, a week and a month.
        let cut = start + 40 * 24 + 7;
        while store
            .purge_before(rollup::hour_start(cut), 1000)
            .await
            .expect("purge")
            > 0
        {}
        assert_eq!(store.rollup_horizon().expect("horizon"), Some(cut));
        compare("after retention");
    }

    /// The partial hours at a window's edges are folded from their events
    /// and kept folded between queries: events stored in such an hour
    /// later, and events removed, show in the next answer.
    #[tokio::test]
    async fn folded_window_edges_follow_stored_and_removed_events() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &[]).expect("open");
        store.check_rollups().expect("fresh store");
        let hour = 1_767_225_600 / 3600 + 24 * 10;
        let at = |h: i64, m: i64| UnixNanos((h * 3600 + m * 60) * 1_000_000_000);
        let mut stored: Vec<UnixNanos> = Vec::new();
        let mut n = 0;
        let mut events = |minutes: &[(i64, i64)]| {
            let mut out = dataset(minutes.len(), hour, 1);
            for (ev, &(h, m)) in out.iter_mut().zip(minutes) {
                n += 1;
                ev.event.event_id = format!("edge-{n}");
                ev.event.occurred_at = at(h, m);
            }
            out
        };
        let count = |stored: &[UnixNanos], q: &Query| {
            stored
                .iter()
                .filter(|t| q.filter.since.is_none_or(|s| **t >= s))
                .filter(|t| q.filter.until.is_none_or(|u| **t < u))
                .count() as u64
        };
        let queries = [
            // A window from 20 minutes into `hour` (its start edge), ...
            (Some(at(hour, 20)), None),
            // ... one ending 40 minutes into `hour + 2` (its end edge), ...
            (Some(at(hour - 1, 0)), Some(at(hour + 2, 40))),
            // ... and one within `hour`.
            (Some(at(hour, 20)), Some(at(hour, 45))),
        ]
        .into_iter()
        // Each window read through two views (two folds of the same edge).
        .flat_map(|(since, until)| {
            [vec![], vec![Dim::Gtin, Dim::Kind]].map(|group_by| Query {
                filter: EventFilter {
                    since,
                    until,
                    ..Default::default()
                },
                group_by,
                attribute_key: None,
                bucket: None,
                limit: 0,
            })
        })
        .collect::<Vec<_>>();
        let check = |stored: &[UnixNanos], label: &str| {
            for q in &queries {
                let events: u64 = run(&store, q, 0)
                    .expect("query")
                    .rows
                    .iter()
                    .map(|r| r.events)
                    .sum();
                assert_eq!(events, count(stored, q), "{label}: {:?}", q.filter);
            }
        };
        let first = events(&[
            (hour, 5),
            (hour, 25),
            (hour, 50),
            (hour + 1, 10),
            (hour + 2, 30),
        ]);
        stored.extend(first.iter().map(|e| e.event.occurred_at));
        store.append(first).await.expect("append");
        check(&stored, "first events");
        // Asked again: answered from the folded edges.
        check(&stored, "asked again");
        // More events in the edge hours, and one elsewhere.
        let more = events(&[(hour, 30), (hour, 59), (hour + 2, 10), (hour + 5, 0)]);
        stored.extend(more.iter().map(|e| e.event.occurred_at));
        store.append(more).await.expect("append more");
        check(&stored, "events stored in the edge hours");
        check(&stored, "asked again after more events");
        // Erasure of an event at the start edge (the first one at 25
        // minutes into `hour`).
        store
            .erase(
                crate::store::EraseRequest {
                    id: "er-edge".into(),
                    requested_by: "test".into(),
                    pseudonym: String::new(),
                    event_ids: vec!["edge-2".into()],
                    spare_origin: None,
                },
                crate::store::Router::none(),
            )
            .await
            .expect("erase");
        let erased = stored
            .iter()
            .position(|t| *t == at(hour, 25))
            .expect("edge-2");
        stored.remove(erased);
        check(&stored, "after an erasure");
        // Retention (which cuts at whole hours) removes the events of
        // `hour`, folded at two windows' edges.
        while store
            .purge_before(at(hour + 1, 0), 1000)
            .await
            .expect("purge")
            > 0
        {}
        stored.retain(|t| *t >= at(hour + 1, 0));
        check(&stored, "after retention");
    }
}
