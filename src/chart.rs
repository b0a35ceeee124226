//! `chainsight query --chart out.svg`: the insight feed as a picture — one
//! line per group (the group key without its time part), the chosen metric
//! per time bucket — drawn with plotters into an SVG file.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::pb;

/// Which metric the chart shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Events,
    Customers,
    Nps,
    AvgScore,
    ReturnRate,
}

impl Metric {
    /// Parses `events`, `customers`, `nps`, `avg_score` or `return_rate`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_lowercase().replace('-', "_").as_str() {
            "events" => Metric::Events,
            "customers" => Metric::Customers,
            "nps" => Metric::Nps,
            "avg_score" | "score" => Metric::AvgScore,
            "return_rate" | "returns" => Metric::ReturnRate,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Metric::Events => "events",
            Metric::Customers => "distinct customers",
            Metric::Nps => "NPS",
            Metric::AvgScore => "average review score",
            Metric::ReturnRate => "return rate (%)",
        }
    }

    fn of(self, row: &pb::InsightRow) -> Option<f64> {
        match self {
            Metric::Events => Some(row.events as f64),
            Metric::Customers => Some(row.customers as f64),
            Metric::Nps => row.nps,
            Metric::AvgScore => row.avg_score,
            Metric::ReturnRate => row.return_rate.map(|r| r * 100.0),
        }
    }
}

/// Most lines drawn (the groups with the most events).
const MAX_SERIES: usize = 8;

/// Draws `report` (which must be grouped by time) into an SVG at `path`.
/// `time_index` is the position of the time dimension in the row keys.
pub fn draw(
    report: &pb::InsightReport,
    time_index: usize,
    metric: Metric,
    path: &Path,
) -> Result<(), String> {
    let mut series: BTreeMap<String, (u64, Vec<(i64, f64)>)> = BTreeMap::new();
    for row in &report.rows {
        let (Some(start), Some(value)) = (row.bucket_start.as_ref(), metric.of(row)) else {
            continue;
        };
        let name: Vec<&str> = row
            .key
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != time_index)
            .map(|(_, k)| k.as_str())
            .collect();
        let name = if name.is_empty() {
            "all".to_string()
        } else {
            name.join(" / ")
        };
        let entry = series.entry(name).or_default();
        entry.0 += row.events;
        entry.1.push((start.seconds, value));
    }
    if series.is_empty() {
        return Err(
            "nothing to draw: the report has no rows grouped by time (use --bucket)".into(),
        );
    }
    let mut ranked: Vec<(String, Vec<(i64, f64)>)> = {
        let mut v: Vec<_> = series.into_iter().collect();
        v.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
        v.into_iter()
            .take(MAX_SERIES)
            .map(|(n, (_, mut pts))| {
                pts.sort_by_key(|p| p.0);
                (n, pts)
            })
            .collect()
    };
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    let xs = ranked.iter().flat_map(|(_, p)| p.iter().map(|x| x.0));
    let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(1).max(1));
    let ys = ranked.iter().flat_map(|(_, p)| p.iter().map(|x| x.1));
    let y0 = ys.clone().fold(f64::INFINITY, f64::min).min(0.0);
    let y1 = ys.fold(f64::NEG_INFINITY, f64::max).max(y0 + 1.0);
    let day = |s: i64| {
        time::OffsetDateTime::from_unix_timestamp(s)
            .map(|t| t.date().to_string())
            .unwrap_or_default()
    };

    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} per time bucket", metric.label()),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1 + 1, y0..y1 * 1.05)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|s| day(*s))
        .x_labels(8)
        .y_desc(metric.label())
        .draw()
        .map_err(e)?;
    for (i, (name, points)) in ranked.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &[&str], week: i64, events: u64, nps: f64) -> pb::InsightRow {
        pb::InsightRow {
            key: key.iter().map(|k| k.to_string()).collect(),
            bucket_start: Some(pbjson_types::Timestamp {
                // Mondays from 2026-01-05.
                seconds: 1_767_571_200 + week * 7 * 86_400,
                nanos: 0,
            }),
            events,
            customers: events / 2,
            nps: Some(nps),
            ..Default::default()
        }
    }

    #[test]
    fn a_feed_becomes_one_line_per_group_with_a_legend() {
        let mut report = pb::InsightReport::default();
        for w in 0..10 {
            report.rows.push(row(
                &["dairy", "EE", "t"],
                w,
                100 + w as u64,
                20.0 + w as f64,
            ));
            report
                .rows
                .push(row(&["cheese", "LV", "t"], w, 50, -10.0 + 3.0 * w as f64));
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("feed.svg");
        draw(&report, 2, Metric::Nps, &path).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("svg");
        assert!(svg.starts_with("<svg"), "an SVG document");
        assert!(svg.contains("NPS per time bucket"), "caption");
        assert!(
            svg.contains("dairy / EE") && svg.contains("cheese / LV"),
            "legend"
        );
        let dates = svg
            .lines()
            .filter(|l| l.len() == 10 && l.starts_with("2026-0"))
            .count();
        assert!(dates >= 4, "dates on the x axis: {dates}");
        assert_eq!(svg.matches("<circle").count(), 20, "a point per row");
        assert!(
            svg.matches("<polyline").count() >= 4,
            "lines and legend marks"
        );
        if let Ok(out) = std::env::var("CHAINSIGHT_CHART_OUT") {
            std::fs::copy(&path, out).expect("copy");
        }
        let mut untimed = pb::InsightReport::default();
        untimed.rows.push(pb::InsightRow::default());
        let err = draw(&untimed, 0, Metric::Events, &path).expect_err("no time");
        assert!(err.contains("--bucket"), "{err}");
    }
}
