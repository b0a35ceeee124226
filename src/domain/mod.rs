//! Domain types: what chainsight reasons about once input has been validated.
//!
//! Protobuf messages (`crate::pb`) are converted into these at the service
//! edge (`crate::conversions`), so `anonymise`, `store` and `propagate` never
//! see unvalidated input. Personal data lives only in [`PersonalData`], which
//! exists only in memory during a request and never implements `Debug` with
//! its contents.

mod country;
mod gtin;

use std::collections::BTreeMap;
use std::fmt;

pub use country::{is_iso_country, Country};
pub use gtin::Gtin;

/// Nanoseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixNanos(pub i64);

impl UnixNanos {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        UnixNanos(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    /// Seconds and sub-second nanoseconds, as protobuf's Timestamp holds them.
    pub fn split(self) -> (i64, i32) {
        let secs = self.0.div_euclid(1_000_000_000);
        let nanos = self.0.rem_euclid(1_000_000_000) as i32;
        (secs, nanos)
    }

    /// The calendar year (UTC) this instant falls in.
    pub fn year(self) -> i32 {
        let (secs, _) = self.split();
        time::OffsetDateTime::from_unix_timestamp(secs)
            .map(|t| t.year())
            .unwrap_or(1970)
    }
}

macro_rules! proto_enum {
    ($(#[$meta:meta])* $name:ident ($prefix:literal) { $($variant:ident = $value:literal => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in proto order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The proto enum number.
            pub fn number(self) -> i32 {
                match self { $($name::$variant => $value),+ }
            }

            /// The value for a proto enum number; `None` for UNSPECIFIED or unknown numbers.
            pub fn from_number(n: i32) -> Option<Self> {
                match n { $($value => Some($name::$variant),)+ _ => None }
            }

            /// A short lower-case label, as shown in reports and accepted by the CLI.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }

            /// Parses a label as produced by [`Self::label`] (case-insensitive),
            /// or the proto name (e.g. `EVENT_KIND_REVIEW`).
            pub fn from_label(s: &str) -> Option<Self> {
                let s = s.trim();
                let s = s.strip_prefix($prefix).unwrap_or(s).to_ascii_lowercase().replace('-', "_");
                Self::ALL.iter().copied().find(|v| v.label() == s)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

pub(crate) use proto_enum;

proto_enum!(
    /// What happened, from the end customer's point of view.
    EventKind ("EVENT_KIND_") {
        Purchase = 1 => "purchase",
        Return = 2 => "return",
        Review = 3 => "review",
        Nps = 4 => "nps",
        Preference = 5 => "preference",
        CartAbandoned = 6 => "cart_abandoned",
        SearchUnmet = 7 => "search_unmet",
        Complaint = 8 => "complaint",
        Usage = 9 => "usage",
    }
);

proto_enum!(
    /// Where the customer interacted.
    Channel ("CHANNEL_") {
        Store = 1 => "store",
        Web = 2 => "web",
        MobileApp = 3 => "mobile_app",
        Social = 4 => "social",
        Phone = 5 => "phone",
        Marketplace = 6 => "marketplace",
        IotDevice = 7 => "iot_device",
    }
);

proto_enum!(
    /// Customer-journey stage.
    JourneyStage ("JOURNEY_STAGE_") {
        Awareness = 1 => "awareness",
        Consideration = 2 => "consideration",
        Purchase = 3 => "purchase",
        PostPurchase = 4 => "post_purchase",
    }
);

/// A product, identified by its GTIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub gtin: Gtin,
    pub category: String,
    pub brand: String,
}

/// The parts of a customer event that are personal data. They exist only in
/// memory, between validation and anonymisation.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PersonalData {
    pub customer_id: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<Country>,
    pub birth_year: Option<u16>,
    pub free_text: Option<String>,
}

impl fmt::Debug for PersonalData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PersonalData { .. }")
    }
}

/// A validated customer event, as a company's own system sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEvent {
    pub event_id: String,
    pub kind: EventKind,
    pub occurred_at: UnixNanos,
    pub product: Product,
    pub channel: Channel,
    pub stage: JourneyStage,
    pub attributes: BTreeMap<String, String>,
    pub score: Option<u32>,
    pub quantity: u32,
    pub personal: PersonalData,
}

/// The anonymised form of an event: the only form that is stored or sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceEvent {
    pub event_id: String,
    pub origin: String,
    pub kind: EventKind,
    pub occurred_at: UnixNanos,
    pub product: Product,
    pub channel: Channel,
    pub stage: JourneyStage,
    pub attributes: BTreeMap<String, String>,
    pub score: Option<u32>,
    pub quantity: u32,
    pub region: String,
    pub age_band: String,
    pub customer_pseudonym: String,
    pub text: String,
    pub path: Vec<String>,
    /// The origin's signature over the fields it set (see [`crate::origin`]).
    pub proof: Option<crate::origin::OriginProof>,
}

#[cfg(test)]
impl PreferenceEvent {
    /// A plausible event for unit tests.
    pub fn example() -> Self {
        PreferenceEvent {
            event_id: "ev-1".into(),
            origin: "retailer".into(),
            kind: EventKind::Purchase,
            occurred_at: UnixNanos(1_790_000_000_000_000_000),
            product: Product {
                gtin: Gtin::parse("4740001000017").expect("valid GTIN"),
                category: "dairy".into(),
                brand: "x".into(),
            },
            channel: Channel::Web,
            stage: JourneyStage::Purchase,
            attributes: Default::default(),
            score: None,
            quantity: 2,
            region: "EE-10".into(),
            age_band: "35-44".into(),
            customer_pseudonym: "ab".into(),
            text: String::new(),
            path: vec!["retailer".into()],
            proof: None,
        }
    }
}

/// Whether `region` lies within `area`: the same region, or a first-level
/// area of the country `area` (`EE-10` lies within `EE`).
pub fn region_within(region: &str, area: &str) -> bool {
    region == area
        || region
            .strip_prefix(area)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// Whether `p` is a GS1 company prefix: 1-13 digits.
pub fn is_company_prefix(p: &str) -> bool {
    !p.is_empty() && p.len() <= 13 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Which events a subscriber, analyst or link is interested in. Empty lists
/// match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// GS1 company prefixes, matched against the GTIN-13 form.
    pub gtin_prefixes: Vec<String>,
    /// Categories, lower case (matched case-insensitively).
    pub categories: Vec<String>,
    pub kinds: Vec<EventKind>,
    pub channels: Vec<Channel>,
    /// Regions; `EE` also matches `EE-10` and other areas of EE.
    pub regions: Vec<String>,
    /// occurred_at >= since.
    pub since: Option<UnixNanos>,
    /// occurred_at < until.
    pub until: Option<UnixNanos>,
}

impl EventFilter {
    /// Whether `ev` passes the filter.
    pub fn matches(&self, ev: &PreferenceEvent) -> bool {
        (self.gtin_prefixes.is_empty()
            || self
                .gtin_prefixes
                .iter()
                .any(|p| ev.product.gtin.has_company_prefix(p)))
            // Categories are kept lower case; one lower-casing per event.
            && (self.categories.is_empty()
                || self.categories.contains(&ev.product.category.to_lowercase()))
            && (self.kinds.is_empty() || self.kinds.contains(&ev.kind))
            && (self.channels.is_empty() || self.channels.contains(&ev.channel))
            && (self.regions.is_empty() || self.regions.iter().any(|r| region_within(&ev.region, r)))
            && self.since.is_none_or(|s| ev.occurred_at >= s)
            && self.until.is_none_or(|u| ev.occurred_at < u)
    }
}
