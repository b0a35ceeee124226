//! Insight queries over the rollups: group the cells in the query's window
//! by the requested dimensions, compute each group's metrics, and hide the
//! groups with fewer than `k_min` distinct customers (rule 6 of the design:
//! small groups stay hidden).

use std::collections::HashMap;

use crate::domain::{Channel, EventFilter, EventKind, JourneyStage, UnixNanos};
use crate::rollup::{self, Agg, CellDims};
use crate::store::{self, Store};

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

/// A time bucket, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
    /// ISO weeks, starting on Monday.
    Week,
    Month,
}

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
}

/// A query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub rows: Vec<Row>,
    pub suppressed_groups: u32,
    pub k_min: u32,
}

/// Runs `q` over the rollups of `store`.
pub fn run(store: &Store, q: &Query, k_min: u32) -> store::Result<Report> {
    let (from, to) = hour_window(&q.filter);
    let attribute = if q.group_by.contains(&Dim::Attribute) {
        q.attribute_key.as_deref()
    } else {
        None
    };
    let mut groups: HashMap<(Vec<String>, Option<i64>), rollup::GroupAcc> = HashMap::new();
    let mut total = 0u64;
    let family = if attribute.is_some() {
        rollup::FAMILY_ATTRIBUTE
    } else {
        rollup::FAMILY_BASE
    };
    // Whole hours come from the rollups; the partial hours at the edges of
    // the window from the few events in them, so the window is exact.
    let (edges, from, to) = edge_cells(store, &q.filter, from, to)?;
    let cells = store
        .scan_rollups(family, from, to)
        .chain(edges.into_iter().map(Ok));
    for cell in cells {
        let (key, agg) = cell?;
        let in_family = match (&key.dims.attribute, attribute) {
            (None, None) => true,
            (Some((k, _)), Some(want)) => k == want,
            _ => false,
        };
        if !in_family || !cell_matches(&q.filter, &key.dims) {
            continue;
        }
        total += agg.events;
        let bucket = q
            .bucket
            .filter(|_| q.group_by.contains(&Dim::Time))
            .map(|b| bucket_start_hour(key.hour, b));
        let group_key = q
            .group_by
            .iter()
            .map(|d| dim_value(*d, &key.dims, bucket))
            .collect();
        groups.entry((group_key, bucket)).or_default().add(&agg);
    }
    let mut suppressed = 0u32;
    let mut rows: Vec<Row> = groups
        .into_iter()
        .filter_map(|((key, bucket), acc)| {
            let (customers, exact) = acc.customers();
            if customers < u64::from(k_min) {
                suppressed += 1;
                return None;
            }
            Some(row(key, bucket, &acc.counts, customers, exact, total))
        })
        .collect();
    rows.sort_by(|a, b| b.events.cmp(&a.events).then_with(|| a.key.cmp(&b.key)));
    if q.limit > 0 {
        rows.truncate(q.limit);
    }
    Ok(Report {
        rows,
        suppressed_groups: suppressed,
        k_min,
    })
}

fn row(
    key: Vec<String>,
    bucket: Option<i64>,
    agg: &Agg,
    customers: u64,
    exact: bool,
    total: u64,
) -> Row {
    let ratio = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
    Row {
        key,
        bucket_start: bucket.map(rollup::hour_start),
        events: agg.events,
        customers,
        customers_exact: exact,
        avg_score: ratio(agg.score_sum, agg.score_n),
        nps: (agg.nps_n > 0)
            .then(|| 100.0 * (agg.promoters as f64 - agg.detractors as f64) / agg.nps_n as f64),
        return_rate: ratio(agg.returns, agg.purchases),
        share: ratio(agg.events, total).unwrap_or(0.0),
    }
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

type Cells = Vec<(rollup::CellKey, Agg)>;

/// The cells of the events in the partial hours at the window's edges, and
/// the whole-hour range left for the rollups (empty when the window lies
/// within one hour).
fn edge_cells(
    store: &Store,
    f: &EventFilter,
    from: Option<i64>,
    to: Option<i64>,
) -> store::Result<(Cells, Option<i64>, Option<i64>)> {
    let mut ranges = Vec::new();
    match (f.since, f.until, from, to) {
        (Some(s), Some(u), Some(fh), Some(th)) if fh > th => {
            // Within one hour: no whole hour, only events.
            ranges.push((s, u));
            let cells = fold_events(store, &ranges)?;
            return Ok((cells, Some(fh), Some(fh)));
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
    Ok((fold_events(store, &ranges)?, from, to))
}

fn fold_events(store: &Store, ranges: &[(UnixNanos, UnixNanos)]) -> store::Result<Cells> {
    let mut events = Vec::new();
    for (a, b) in ranges {
        if a < b {
            for ev in store.scan_time(*a, *b) {
                events.push(ev?);
            }
        }
    }
    Ok(rollup::fold(events.iter())
        .into_iter()
        .filter_map(|(k, agg)| rollup::CellKey::decode(&k).map(|key| (key, agg)))
        .collect())
}

fn cell_matches(f: &EventFilter, d: &CellDims) -> bool {
    let gtin13 = d.gtin.get(1..).unwrap_or("");
    (f.gtin_prefixes.is_empty()
        || f.gtin_prefixes
            .iter()
            .any(|p| gtin13.starts_with(p.as_str())))
        && (f.categories.is_empty() || f.categories.contains(&d.category.to_lowercase()))
        && (f.kinds.is_empty() || f.kinds.iter().any(|k| k.number() == i32::from(d.kind)))
        && (f.channels.is_empty()
            || f.channels
                .iter()
                .any(|c| c.number() == i32::from(d.channel)))
        && (f.regions.is_empty()
            || f.regions
                .iter()
                .any(|r| crate::domain::region_within(&d.region, r)))
}

fn dim_value(d: Dim, dims: &CellDims, bucket: Option<i64>) -> String {
    let label = |n: u8, f: fn(i32) -> Option<&'static str>| {
        f(i32::from(n)).unwrap_or("unknown").to_string()
    };
    match d {
        Dim::Gtin => dims.gtin.clone(),
        Dim::Category => dims.category.clone(),
        Dim::Brand => dims.brand.clone(),
        Dim::Region => dims.region.clone(),
        Dim::Channel => label(dims.channel, |n| {
            Channel::from_number(n).map(Channel::label)
        }),
        Dim::Stage => label(dims.stage, |n| {
            JourneyStage::from_number(n).map(JourneyStage::label)
        }),
        Dim::Kind => label(dims.kind, |n| {
            EventKind::from_number(n).map(EventKind::label)
        }),
        Dim::AgeBand => dims.age_band.clone(),
        Dim::Attribute => dims
            .attribute
            .as_ref()
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
        Dim::Time => bucket.map(format_hour).unwrap_or_default(),
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

/// The first hour of the bucket `hour` falls in.
pub fn bucket_start_hour(hour: i64, bucket: Bucket) -> i64 {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(hour.saturating_mul(3600)) else {
        return hour;
    };
    let day = t.date();
    let start = match bucket {
        Bucket::Hour => return hour,
        Bucket::Day => day,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
