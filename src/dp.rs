//! Differentially private insight feeds.
//!
//! An analyst given a budget in node.toml (`[[dp_budget]]`) gets answers
//! whose counts carry discrete Laplace noise. Each query spends
//! `epsilon_per_query` of the analyst's `epsilon_per_period`; the spent
//! amount is stored (and flushed) before the answer leaves, and a query past
//! the budget is refused until the period renews.
//!
//! **Mechanism.** A row releases nine sums: events, distinct customers,
//! score sum and count (reviews), promoters, detractors and answers (NPS),
//! purchases and returns. The query's ε is split evenly over them, so each
//! gets ε/9 and noise from the discrete Laplace distribution
//! P(k) ∝ α^|k| with α = exp(−(ε/9)/Δ), Δ being that sum's sensitivity:
//! `max_events_per_customer` (events and the kind counts), ten times it
//! (score sum: scores are 0–10), and 1 (distinct customers). Its variance is
//! 2α/(1−α)². Noisy sums are clamped at 0; the metrics (average score, NPS,
//! return rate, share) are computed from the noisy sums, groups are ranked
//! by noisy events and suppressed by noisy customers (k_min), so nothing
//! in the answer depends on an exact count: post-processing keeps the
//! guarantee. Which groups appear is protected by a threshold: a group
//! appears only when its noisy customers reach τ, chosen so that a group
//! of one customer appears with probability at most δ ((ε, δ)-DP
//! partition selection); the number of groups not shown is not reported
//! (`suppressed_groups` is 0 in private answers).
//!
//! **Assumptions** (the README repeats them): the guarantee is ε-DP per
//! query and per group for a customer who contributes at most
//! `max_events_per_customer` events to any one group. Rollups do not
//! enforce that bound, so a customer with more events in a group is less
//! protected in proportion; a customer who appears in g groups of one
//! answer (time buckets, several products) spends g·ε of their protection.
//! Noise comes from the operating system's CSPRNG through `rand`'s thread
//! generator; the integer-valued (discrete) distribution avoids the
//! floating-point weaknesses of a naively sampled continuous Laplace.

use rand::Rng;

use crate::insights::{Report, Row};
use crate::rollup::Counts;

/// Sums released per row, over which a query's ε is split.
pub const MEASURES: u32 = 9;

/// The noise of one query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mechanism {
    /// ε spent by the query.
    pub epsilon: f64,
    /// Contribution bound: events of one customer in one group.
    pub max_events_per_customer: u32,
    /// δ of the (ε, δ) guarantee on which groups appear.
    pub delta: f64,
}

impl Mechanism {
    /// α of the discrete Laplace noise of a sum with `sensitivity`.
    pub fn alpha(&self, sensitivity: f64) -> f64 {
        (-(self.epsilon / f64::from(MEASURES)) / sensitivity).exp()
    }

    /// The noise variance of a sum with `sensitivity`.
    pub fn variance(&self, sensitivity: f64) -> f64 {
        let a = self.alpha(sensitivity);
        2.0 * a / ((1.0 - a) * (1.0 - a))
    }

    /// The sensitivity of the events count (and of each kind count).
    pub fn events_sensitivity(&self) -> f64 {
        f64::from(self.max_events_per_customer.max(1))
    }

    /// The fewest noisy distinct customers a group needs to appear: a
    /// group of one customer then appears with probability at most δ
    /// (the discrete Laplace tail beyond τ − 1 is α^(τ−1) / (1 + α)).
    pub fn release_threshold(&self) -> u64 {
        let alpha = self.alpha(1.0);
        let tau = 1.0 + (self.delta * (1.0 + alpha)).ln() / alpha.ln();
        tau.ceil().max(1.0) as u64
    }
}

/// A sample of the discrete Laplace distribution with parameter `alpha`
/// (0 < α < 1): the difference of two geometric samples.
pub fn discrete_laplace<R: Rng>(rng: &mut R, alpha: f64) -> i64 {
    geometric(rng, alpha) - geometric(rng, alpha)
}

/// Failures before the first success, success probability 1 − α.
fn geometric<R: Rng>(rng: &mut R, alpha: f64) -> i64 {
    let u: f64 = 1.0 - rng.random::<f64>(); // in (0, 1]
    (u.ln() / alpha.ln()).floor().min(i64::MAX as f64 / 4.0) as i64
}

/// `report` (computed with nothing suppressed and no limit) with noise on
/// every sum, metrics recomputed, ranked, suppressed below `k_min` noisy
/// customers and cut to `limit` (0: all).
pub fn noisy(report: Report, mech: Mechanism, k_min: u32, limit: usize) -> Report {
    let mut rng = rand::rng();
    let de = mech.events_sensitivity();
    let mut noise = |value: u64, sensitivity: f64| -> u64 {
        let noisy =
            i128::from(value) + i128::from(discrete_laplace(&mut rng, mech.alpha(sensitivity)));
        u64::try_from(noisy.max(0)).unwrap_or(u64::MAX)
    };
    // A group made only of events without a pseudonym cannot prove k:
    // suppressed whatever the noise says, as in exact answers.
    let mut rows: Vec<Row> = report
        .rows
        .into_iter()
        .filter(|r| r.customers > 0)
        .map(|row| {
            let c = row.counts;
            let counts = Counts {
                events: noise(c.events, de),
                score_sum: noise(c.score_sum, 10.0 * de),
                score_n: noise(c.score_n, de),
                promoters: noise(c.promoters, de),
                detractors: noise(c.detractors, de),
                nps_n: noise(c.nps_n, de),
                purchases: noise(c.purchases, de),
                returns: noise(c.returns, de),
            };
            Row {
                key: row.key,
                bucket_start: row.bucket_start,
                events: counts.events,
                customers: noise(row.customers, 1.0),
                customers_exact: false,
                // Noisy sums can make a metric leave its range.
                avg_score: counts.avg_score().map(|a| a.clamp(0.0, 10.0)),
                nps: counts.nps().map(|n| n.clamp(-100.0, 100.0)),
                return_rate: counts.return_rate(),
                share: 0.0,
                counts,
            }
        })
        .collect();
    let total: u64 = rows.iter().map(|r| r.events).sum();
    for r in &mut rows {
        r.share = if total > 0 {
            r.events as f64 / total as f64
        } else {
            0.0
        };
    }
    // Released: groups whose noisy customers reach k_min and the
    // threshold that makes a group's existence (ε, δ)-private. How many
    // were not released is itself exact data: not reported.
    let threshold = mech.release_threshold().max(u64::from(k_min)).max(1);
    rows.retain(|r| r.customers >= threshold);
    rows.sort_by(|a, b| {
        b.events
            .cmp(&a.events)
            .then_with(|| a.key.cmp(&b.key))
            .then_with(|| a.bucket_start.cmp(&b.bucket_start))
    });
    if limit > 0 {
        rows.truncate(limit);
    }
    Report {
        rows,
        suppressed_groups: 0,
        k_min,
        epsilon: mech.epsilon,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discrete_laplace_has_the_stated_mean_and_variance() {
        let mech = Mechanism {
            epsilon: 0.9,
            max_events_per_customer: 2,
            delta: 1e-6,
        };
        let alpha = mech.alpha(2.0);
        let mut rng = rand::rng();
        let n = 200_000;
        let samples: Vec<f64> = (0..n)
            .map(|_| discrete_laplace(&mut rng, alpha) as f64)
            .collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let expected = mech.variance(2.0);
        assert!(mean.abs() < 0.2, "mean {mean}");
        assert!(
            (var / expected - 1.0).abs() < 0.05,
            "variance {var}, expected {expected}"
        );
    }

    #[test]
    fn a_group_of_one_customer_appears_with_probability_at_most_delta() {
        let mech = Mechanism {
            epsilon: 9.0,
            max_events_per_customer: 1,
            delta: 1e-3,
        };
        let tau = mech.release_threshold();
        let alpha = mech.alpha(1.0);
        // P(1 + noise >= tau) for the discrete Laplace noise.
        let p = alpha.powi(tau as i32 - 1) / (1.0 + alpha);
        assert!(p <= 1e-3, "tau {tau}: {p}");
        let looser = alpha.powi(tau as i32 - 2) / (1.0 + alpha);
        assert!(looser > 1e-3, "tau {tau} is the smallest such threshold");
        let mut rng = rand::rng();
        let appeared = (0..100_000)
            .filter(|_| 1 + discrete_laplace(&mut rng, alpha) >= tau as i64)
            .count();
        assert!(appeared <= 200, "{appeared} of 100,000");
    }
}
