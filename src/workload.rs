//! A seeded generator of realistic customer events: a small catalogue of
//! two manufacturers' products, customers with home regions and birth
//! years, and the kinds, channels and journey stages a retailer sees, in
//! plausible proportions. Used by the demo (and the benchmarks); the same
//! seed gives the same events.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::pb;

/// A product of the demo catalogue.
#[derive(Debug, Clone, Copy)]
pub struct CatalogueItem {
    pub gtin: &'static str,
    pub category: &'static str,
    pub brand: &'static str,
}

/// GS1 company prefix of the dairy manufacturer in the catalogue.
pub const DAIRY_PREFIX: &str = "4740001";
/// GS1 company prefix of the apparel manufacturer in the catalogue.
pub const APPAREL_PREFIX: &str = "4750002";

/// Two manufacturers' products (valid GTIN-13s).
pub const CATALOGUE: &[CatalogueItem] = &[
    CatalogueItem {
        gtin: "4740001000017",
        category: "dairy",
        brand: "Põlluvara",
    },
    CatalogueItem {
        gtin: "4740001000024",
        category: "dairy",
        brand: "Põlluvara",
    },
    CatalogueItem {
        gtin: "4740001000031",
        category: "cheese",
        brand: "Põlluvara",
    },
    CatalogueItem {
        gtin: "4740001000048",
        category: "cheese",
        brand: "Põlluvara",
    },
    CatalogueItem {
        gtin: "4740001000055",
        category: "yoghurt",
        brand: "Põlluvara",
    },
    CatalogueItem {
        gtin: "4750002000015",
        category: "outerwear",
        brand: "Nordwear",
    },
    CatalogueItem {
        gtin: "4750002000022",
        category: "outerwear",
        brand: "Nordwear",
    },
    CatalogueItem {
        gtin: "4750002000039",
        category: "knitwear",
        brand: "Nordwear",
    },
    CatalogueItem {
        gtin: "4750002000046",
        category: "knitwear",
        brand: "Nordwear",
    },
    CatalogueItem {
        gtin: "4750002000053",
        category: "footwear",
        brand: "Nordwear",
    },
];

/// A customer of the generated workload; holds the personal data a
/// retailer's systems know.
#[derive(Debug, Clone)]
pub struct Customer {
    pub id: String,
    pub email: String,
    pub country: &'static str,
    pub postal_code: String,
    pub birth_year: u32,
}

/// Generates events for one retailer.
pub struct Workload {
    rng: StdRng,
    prefix: String,
    customers: Vec<Customer>,
    next: u64,
    now_secs: i64,
    span_secs: i64,
    /// `Some(n)`: the n events arrive in time order over the span (as a
    /// year of history accumulates), instead of at random times in it.
    chronological: Option<u64>,
}

const COUNTRIES: &[(&str, &str)] = &[
    ("EE", "1"),
    ("EE", "5"),
    ("LV", "LV-1"),
    ("FI", "0"),
    ("DE", "1"),
];
const FIRST: &[&str] = &[
    "mari", "jaan", "liis", "peeter", "anna", "toomas", "kadri", "mart", "eva", "juhan",
];

impl Workload {
    /// A workload of events with ids `<prefix>-<n>` and `customers` distinct
    /// customers, all occurring in the 30 days before `now_secs`.
    pub fn new(seed: u64, prefix: &str, customers: usize, now_secs: i64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let customers = (0..customers.max(1))
            .map(|i| {
                let (country, lead) = *COUNTRIES.choose(&mut rng).expect("non-empty");
                let digits: u32 = rng.random_range(1000..9999);
                let postal_code = match country {
                    "LV" => format!("{lead}{:03}", digits % 1000),
                    "FI" => format!("{lead}{digits:04}"),
                    _ => format!("{lead}{digits:04}"),
                };
                let name = FIRST.choose(&mut rng).expect("non-empty");
                Customer {
                    id: format!("{prefix}-cust-{i:05}"),
                    email: format!("{name}.{prefix}{i}@example.ee"),
                    country,
                    postal_code,
                    birth_year: rng.random_range(1945..2008),
                }
            })
            .collect();
        Workload {
            rng,
            prefix: prefix.to_string(),
            customers,
            next: 0,
            now_secs,
            span_secs: 30 * 86_400,
            chronological: None,
        }
    }

    /// The next `n` events occur in time order, evenly over the span (with
    /// a minute of jitter), ending now: a history as it accumulates.
    pub fn chronological(mut self, n: u64) -> Self {
        self.chronological = Some(n.max(1));
        self
    }

    /// Spreads the events over the `days` before now instead of 30.
    pub fn with_span_days(mut self, days: i64) -> Self {
        self.span_secs = days.max(1) * 86_400;
        self
    }

    /// The customers (to check later that none of their data left the edge).
    pub fn customers(&self) -> &[Customer] {
        &self.customers
    }

    /// The next event.
    pub fn next_event(&mut self) -> pb::CustomerEvent {
        use pb::{Channel as C, EventKind as K, JourneyStage as S};
        self.next += 1;
        let rng = &mut self.rng;
        let item = *CATALOGUE.choose(rng).expect("non-empty");
        let customer = self.customers.choose(rng).expect("non-empty").clone();
        // Weights: purchases dominate; returns and complaints are rarer.
        let kinds = [
            (K::Purchase, 30),
            (K::Return, 5),
            (K::Review, 12),
            (K::Nps, 8),
            (K::Preference, 10),
            (K::CartAbandoned, 12),
            (K::SearchUnmet, 6),
            (K::Complaint, 3),
            (K::Usage, 4),
        ];
        let kind = kinds.choose_weighted(rng, |k| k.1).expect("weights").0;
        let stage = match kind {
            K::Purchase => S::Purchase,
            K::CartAbandoned | K::Preference => S::Consideration,
            K::SearchUnmet => S::Awareness,
            _ => S::PostPurchase,
        };
        let channel = if kind == K::Usage {
            C::IotDevice
        } else {
            *[
                C::Store,
                C::Web,
                C::Web,
                C::MobileApp,
                C::MobileApp,
                C::Marketplace,
                C::Phone,
                C::Social,
            ]
            .choose(rng)
            .expect("non-empty")
        };
        let score = match kind {
            K::Review => Some(*[5, 5, 4, 4, 4, 3, 2, 1].choose(rng).expect("non-empty")),
            K::Nps => Some(rng.random_range(0..=10)),
            _ => None,
        };
        let mut attributes = std::collections::BTreeMap::new();
        if matches!(kind, K::Preference | K::Purchase | K::SearchUnmet) {
            let (key, values): (&str, &[&str]) = if item.brand == "Nordwear" {
                ("size", &["S", "M", "L", "XL"])
            } else {
                ("fat", &["0.5%", "2.5%", "3.5%", "lactose-free"])
            };
            attributes.insert(
                key.to_string(),
                values.choose(rng).expect("non-empty").to_string(),
            );
        }
        let free_text = match kind {
            K::Review if rng.random_bool(0.5) => "Good quality, would buy again.".to_string(),
            K::Complaint => format!(
                "Package arrived damaged. Contact me at {} or +372 5{} {}",
                customer.email,
                rng.random_range(100..999),
                rng.random_range(1000..9999)
            ),
            K::SearchUnmet => "Looked for a larger pack size".to_string(),
            _ => String::new(),
        };
        let age_secs = match self.chronological {
            None => rng.random_range(0..self.span_secs),
            Some(n) => {
                let left = n.saturating_sub(self.next) as i64;
                let at = (i128::from(self.span_secs) * i128::from(left) / i128::from(n)) as i64;
                (at + rng.random_range(0..60)).clamp(0, self.span_secs - 1)
            }
        };
        pb::CustomerEvent {
            event_id: format!("{}-{:07}", self.prefix, self.next),
            kind: kind as i32,
            occurred_at: Some(pbjson_types::Timestamp {
                seconds: self.now_secs - age_secs,
                nanos: 0,
            }),
            product: Some(pb::Product {
                gtin: item.gtin.to_string(),
                category: item.category.to_string(),
                brand: item.brand.to_string(),
            }),
            channel: channel as i32,
            stage: stage as i32,
            attributes,
            score,
            quantity: if matches!(kind, K::Purchase | K::Return) {
                rng.random_range(1..=3)
            } else {
                0
            },
            customer_id: customer.id,
            postal_code: customer.postal_code,
            country: customer.country.to_string(),
            birth_year: customer.birth_year,
            free_text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversions::customer_event_from_pb;
    use crate::domain::UnixNanos;

    #[test]
    fn catalogue_gtins_are_valid_and_events_validate() {
        for item in CATALOGUE {
            crate::domain::Gtin::parse(item.gtin).unwrap();
        }
        let now = 1_790_000_000;
        let mut w = Workload::new(7, "t", 50, now);
        for _ in 0..2000 {
            let ev = w.next_event();
            customer_event_from_pb(ev, UnixNanos(now * 1_000_000_000)).unwrap();
        }
    }

    #[test]
    fn same_seed_same_events() {
        let mut a = Workload::new(1, "x", 10, 1_790_000_000);
        let mut b = Workload::new(1, "x", 10, 1_790_000_000);
        for _ in 0..100 {
            assert_eq!(a.next_event(), b.next_event());
        }
    }
}
