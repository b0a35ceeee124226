//! Conversions between the protobuf messages (`crate::pb`) and the domain
//! types, with all input validation in one place. Every rule a customer event
//! must satisfy lives here; a violation becomes an [`Invalid`] naming the
//! field (in proto snake_case, dotted for nested fields) and the reason.

use std::collections::BTreeMap;

use crate::domain::{
    Channel, Country, CustomerEvent, EventFilter, EventKind, Gtin, JourneyStage, PersonalData,
    PreferenceEvent, Product, UnixNanos,
};
use crate::pb;

/// Bounds on what one event may carry.
pub mod limits {
    /// Longest accepted `event_id`.
    pub const EVENT_ID_LEN: usize = 128;
    /// Most attributes per event.
    pub const ATTRIBUTES: usize = 32;
    /// Longest attribute key.
    pub const ATTRIBUTE_KEY_LEN: usize = 64;
    /// Longest attribute value.
    pub const ATTRIBUTE_VALUE_LEN: usize = 256;
    /// Longest product category or brand.
    pub const PRODUCT_TEXT_LEN: usize = 128;
    /// Longest customer id.
    pub const CUSTOMER_ID_LEN: usize = 256;
    /// Longest postal code.
    pub const POSTAL_CODE_LEN: usize = 16;
    /// Longest free text.
    pub const FREE_TEXT_LEN: usize = 4096;
    /// Largest quantity.
    pub const QUANTITY: u32 = 100_000;
    /// How far in the future `occurred_at` may lie (clock skew allowance).
    pub const FUTURE_SKEW_NANOS: i64 = 5 * 60 * 1_000_000_000;
    /// The earliest accepted `occurred_at`: 2000-01-01T00:00:00Z.
    pub const EARLIEST_NANOS: i64 = 946_684_800 * 1_000_000_000;
    /// Longest node id in a path, and most hops.
    pub const NODE_ID_LEN: usize = 64;
    /// Most entries in an event's path.
    pub const PATH_LEN: usize = 32;
}

/// A validation failure: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

type Result<T> = std::result::Result<T, Invalid>;

/// Validates a published event. `now` bounds `occurred_at`; an empty
/// `event_id` is replaced by a fresh UUIDv7.
pub fn customer_event_from_pb(ev: pb::CustomerEvent, now: UnixNanos) -> Result<CustomerEvent> {
    let event_id = if ev.event_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        check_event_id(&ev.event_id)?;
        ev.event_id
    };
    let kind = enum_field("kind", ev.kind, EventKind::from_number)?;
    let channel = enum_field("channel", ev.channel, Channel::from_number)?;
    let stage = enum_field("stage", ev.stage, JourneyStage::from_number)?;
    let occurred_at = timestamp("occurred_at", ev.occurred_at)?;
    if occurred_at.0 > now.0.saturating_add(limits::FUTURE_SKEW_NANOS) {
        return Err(invalid(
            "occurred_at",
            "lies more than 5 minutes in the future",
        ));
    }
    let product = product_from_pb(ev.product)?;
    let score = score(kind, ev.score)?;
    if ev.quantity > limits::QUANTITY {
        return Err(invalid(
            "quantity",
            format!("must be at most {}", limits::QUANTITY),
        ));
    }
    let attributes = attributes("attributes", ev.attributes)?;
    let personal = personal_data(
        ev.customer_id,
        ev.postal_code,
        ev.country,
        ev.birth_year,
        ev.free_text,
        now,
    )?;
    Ok(CustomerEvent {
        event_id,
        kind,
        occurred_at,
        product,
        channel,
        stage,
        attributes,
        score,
        quantity: ev.quantity,
        personal,
    })
}

fn check_event_id(id: &str) -> Result<()> {
    if id.len() > limits::EVENT_ID_LEN {
        return Err(invalid(
            "event_id",
            format!("longer than {} characters", limits::EVENT_ID_LEN),
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "event_id",
            "may contain only printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

fn enum_field<T>(field: &str, n: i32, from: impl Fn(i32) -> Option<T>) -> Result<T> {
    match from(n) {
        Some(v) => Ok(v),
        None if n == 0 => Err(invalid(field, "required (UNSPECIFIED is not allowed)")),
        None => Err(invalid(field, format!("unknown enum value {n}"))),
    }
}

fn timestamp(field: &str, ts: Option<pbjson_types::Timestamp>) -> Result<UnixNanos> {
    let ts = ts.ok_or_else(|| invalid(field, "required"))?;
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(invalid(field, "nanos out of range"));
    }
    let nanos = ts
        .seconds
        .checked_mul(1_000_000_000)
        .and_then(|s| s.checked_add(i64::from(ts.nanos)))
        .ok_or_else(|| invalid(field, "out of range"))?;
    if nanos < limits::EARLIEST_NANOS {
        return Err(invalid(field, "lies before 2000-01-01"));
    }
    Ok(UnixNanos(nanos))
}

fn product_from_pb(p: Option<pb::Product>) -> Result<Product> {
    let p = p.ok_or_else(|| invalid("product", "required"))?;
    let gtin = Gtin::parse(&p.gtin).map_err(|r| invalid("product.gtin", r))?;
    bounded_text("product.category", &p.category, limits::PRODUCT_TEXT_LEN)?;
    bounded_text("product.brand", &p.brand, limits::PRODUCT_TEXT_LEN)?;
    Ok(Product {
        gtin,
        category: p.category.trim().to_string(),
        brand: p.brand.trim().to_string(),
    })
}

/// Free text: bounded, no control characters other than line breaks and tabs.
fn free_text(field: &str, s: &str) -> Result<()> {
    text_rule(s, limits::FREE_TEXT_LEN, |c| {
        matches!(c, '\n' | '\t' | '\r')
    })
    .map_err(|reason| invalid(field, reason))
}

fn bounded_text(field: &str, s: &str, max: usize) -> Result<()> {
    text_rule(s, max, |_| false).map_err(|reason| invalid(field, reason))
}

/// What is wrong with `s` as text of at most `max` characters without
/// control characters other than those `allowed`. The field's name is
/// formatted only for an error: this runs on every string of every
/// published event.
fn text_rule(
    s: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> std::result::Result<(), String> {
    // Cheap first: no string of at most `max` bytes has more characters.
    if s.len() > max && s.chars().count() > max {
        return Err(format!("longer than {max} characters"));
    }
    if s.chars().any(|c| c.is_control() && !allowed(c)) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

fn score(kind: EventKind, score: Option<u32>) -> Result<Option<u32>> {
    match (kind, score) {
        (EventKind::Review, None) => Err(invalid("score", "required for REVIEW events (1-5)")),
        (EventKind::Review, Some(s)) if !(1..=5).contains(&s) => Err(invalid(
            "score",
            format!("must be 1-5 for REVIEW events, got {s}"),
        )),
        (EventKind::Nps, None) => Err(invalid("score", "required for NPS events (0-10)")),
        (_, Some(s)) if s > 10 => Err(invalid("score", format!("must be 0-10, got {s}"))),
        (_, s) => Ok(s),
    }
}

fn attributes(field: &str, attrs: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    if attrs.len() > limits::ATTRIBUTES {
        return Err(invalid(
            field,
            format!("at most {} attributes allowed", limits::ATTRIBUTES),
        ));
    }
    for (k, v) in &attrs {
        let key_ok = !k.is_empty()
            && k.len() <= limits::ATTRIBUTE_KEY_LEN
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !key_ok {
            return Err(invalid(
                &format!("{field}.key"),
                format!(
                    "key {:?} must be 1-{} characters of [A-Za-z0-9_.-]",
                    truncate(k, 80),
                    limits::ATTRIBUTE_KEY_LEN
                ),
            ));
        }
        text_rule(v, limits::ATTRIBUTE_VALUE_LEN, |_| false)
            .map_err(|reason| invalid(&format!("{field}[{k}]"), reason))?;
    }
    Ok(attrs)
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn personal_data(
    customer_id: String,
    postal_code: String,
    country: String,
    birth_year: u32,
    free_text: String,
    now: UnixNanos,
) -> Result<PersonalData> {
    bounded_text("customer_id", &customer_id, limits::CUSTOMER_ID_LEN)?;
    if postal_code.len() > limits::POSTAL_CODE_LEN
        || !postal_code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b' ' || b == b'-')
    {
        return Err(invalid(
            "postal_code",
            format!(
                "must be at most {} letters, digits, spaces or dashes",
                limits::POSTAL_CODE_LEN
            ),
        ));
    }
    let country = if country.trim().is_empty() {
        None
    } else {
        Some(Country::parse(&country).map_err(|r| invalid("country", r))?)
    };
    if country.is_none() && !postal_code.trim().is_empty() {
        return Err(invalid("country", "required when postal_code is set"));
    }
    let birth_year = match birth_year {
        0 => None,
        // The value is personal data: it is not echoed back.
        y if y < 1900 || i64::from(y) > i64::from(now.year()) => {
            return Err(invalid(
                "birth_year",
                format!("must be 0 (unknown) or between 1900 and {}", now.year()),
            ))
        }
        y => Some(y as u16),
    };
    self::free_text("free_text", &free_text)?;
    let non_empty = |s: String| (!s.trim().is_empty()).then(|| s.trim().to_string());
    Ok(PersonalData {
        customer_id: non_empty(customer_id),
        postal_code: non_empty(postal_code),
        country,
        birth_year,
        free_text: non_empty(free_text),
    })
}

/// Validates an anonymised event received from a peer.
pub fn preference_event_from_pb(ev: pb::PreferenceEvent) -> Result<PreferenceEvent> {
    if ev.event_id.is_empty() {
        return Err(invalid("event_id", "required"));
    }
    check_event_id(&ev.event_id)?;
    let node_id = |field: &str, s: &str| -> Result<()> {
        if s.is_empty() || s.len() > limits::NODE_ID_LEN || !s.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                field,
                "must be a node id of 1-64 printable characters",
            ));
        }
        Ok(())
    };
    node_id("origin", &ev.origin)?;
    if ev.path.len() > limits::PATH_LEN {
        return Err(invalid(
            "path",
            format!("longer than {} hops", limits::PATH_LEN),
        ));
    }
    for p in &ev.path {
        node_id("path", p)?;
    }
    let kind = enum_field("kind", ev.kind, EventKind::from_number)?;
    let channel = enum_field("channel", ev.channel, Channel::from_number)?;
    let stage = enum_field("stage", ev.stage, JourneyStage::from_number)?;
    let occurred_at = timestamp("occurred_at", ev.occurred_at)?;
    let product = product_from_pb(ev.product)?;
    // A link agreement may have dropped the score, so it is not required here.
    if let Some(s) = ev.score.filter(|s| *s > 10) {
        return Err(invalid("score", format!("must be 0-10, got {s}")));
    }
    let score = ev.score;
    let attributes = attributes("attributes", ev.attributes)?;
    for (field, value, max) in [
        ("region", &ev.region, 16),
        ("age_band", &ev.age_band, 16),
        ("customer_pseudonym", &ev.customer_pseudonym, 128),
    ] {
        bounded_text(field, value, max)?;
    }
    // Free text keeps the line breaks and tabs the customer wrote, as at
    // Publish; the same rule on both sides, or a stored event would not
    // read back (found by the `anonymiser` fuzz target).
    free_text("text", &ev.text)?;
    Ok(PreferenceEvent {
        event_id: ev.event_id,
        origin: ev.origin,
        kind,
        occurred_at,
        product,
        channel,
        stage,
        attributes,
        score,
        quantity: ev.quantity.min(limits::QUANTITY),
        region: ev.region,
        age_band: ev.age_band,
        customer_pseudonym: ev.customer_pseudonym,
        text: ev.text,
        path: ev.path,
        proof: ev.origin_proof.map(origin_proof_from_pb).transpose()?,
    })
}

/// Most fields an origin proof may cover (the fixed fields and attributes).
const PROOF_FIELDS: usize = 16 + limits::ATTRIBUTES;
/// Longest signature accepted (an RSA-4096 signature is 512 bytes).
const SIGNATURE_LEN: usize = 1024;

fn origin_proof_from_pb(p: pb::OriginProof) -> Result<crate::origin::OriginProof> {
    use crate::origin::{FieldEntry, FieldPart, OriginProof, ProofForm, SALT_LEN};
    let bytes32 = |field: &str, b: &[u8]| -> Result<[u8; 32]> {
        b.try_into().map_err(|_| invalid(field, "must be 32 bytes"))
    };
    let scheme = u16::try_from(p.scheme)
        .map_err(|_| invalid("origin_proof.scheme", "not a TLS signature scheme"))?;
    if p.signature.is_empty() || p.signature.len() > SIGNATURE_LEN {
        return Err(invalid(
            "origin_proof.signature",
            format!("must be 1-{SIGNATURE_LEN} bytes"),
        ));
    }
    let form = match (p.salt_seed.is_empty(), p.fields.is_empty()) {
        (false, true) => ProofForm::Compact {
            seed: bytes32("origin_proof.salt_seed", &p.salt_seed)?,
        },
        (true, false) => {
            if p.fields.len() > PROOF_FIELDS {
                return Err(invalid(
                    "origin_proof.fields",
                    format!("more than {PROOF_FIELDS} fields"),
                ));
            }
            let max_name = "attributes.".len() + limits::ATTRIBUTE_KEY_LEN;
            let mut entries = Vec::with_capacity(p.fields.len());
            for f in p.fields {
                if f.name.is_empty() || f.name.len() > max_name {
                    return Err(invalid(
                        "origin_proof.fields.name",
                        format!("must be 1-{max_name} bytes"),
                    ));
                }
                let part = match (f.salt.len(), f.digest.is_empty()) {
                    (SALT_LEN, true) => {
                        let mut salt = [0u8; SALT_LEN];
                        salt.copy_from_slice(&f.salt);
                        FieldPart::Salt(salt)
                    }
                    (0, false) => {
                        FieldPart::Withheld(bytes32("origin_proof.fields.digest", &f.digest)?)
                    }
                    _ => {
                        return Err(invalid(
                            "origin_proof.fields",
                            format!(
                            "each field has a salt of {SALT_LEN} bytes or a digest of 32, not both"
                        ),
                        ))
                    }
                };
                entries.push(FieldEntry { name: f.name, part });
            }
            if !entries.windows(2).all(|w| w[0].name < w[1].name) {
                return Err(invalid(
                    "origin_proof.fields",
                    "must be sorted by name, each name once",
                ));
            }
            ProofForm::Expanded(entries)
        }
        _ => {
            return Err(invalid(
                "origin_proof",
                "needs either salt_seed or fields (not both)",
            ))
        }
    };
    let batch = match p.batch {
        None => None,
        Some(b) => {
            if b.size == 0 || b.size > crate::origin::MAX_BATCH {
                return Err(invalid(
                    "origin_proof.batch.size",
                    format!("must be 1-{}, got {}", crate::origin::MAX_BATCH, b.size),
                ));
            }
            let needed = crate::origin::path_len(b.index, b.size).ok_or_else(|| {
                invalid(
                    "origin_proof.batch.index",
                    format!("must be below size {}, got {}", b.size, b.index),
                )
            })?;
            if b.path.len() != needed {
                return Err(invalid(
                    "origin_proof.batch.path",
                    format!(
                        "leaf {} of {} needs {needed} hashes, got {}",
                        b.index,
                        b.size,
                        b.path.len()
                    ),
                ));
            }
            let path = b
                .path
                .iter()
                .map(|h| bytes32("origin_proof.batch.path", h))
                .collect::<Result<Vec<_>>>()?;
            Some(crate::origin::BatchInclusion {
                index: b.index,
                size: b.size,
                path,
            })
        }
    };
    Ok(OriginProof {
        certificate: bytes32("origin_proof.certificate_sha256", &p.certificate_sha256)?,
        scheme,
        signature: p.signature,
        signed_at: timestamp("origin_proof.signed_at", p.signed_at)?,
        form,
        batch,
    })
}

fn origin_proof_to_pb(p: &crate::origin::OriginProof) -> pb::OriginProof {
    use crate::origin::{FieldPart, ProofForm};
    let (seconds, nanos) = p.signed_at.split();
    let (salt_seed, fields) = match &p.form {
        ProofForm::Compact { seed } => (seed.to_vec(), Vec::new()),
        ProofForm::Expanded(entries) => (
            Vec::new(),
            entries
                .iter()
                .map(|e| {
                    let (salt, digest) = match e.part {
                        FieldPart::Salt(s) => (s.to_vec(), Vec::new()),
                        FieldPart::Withheld(d) => (Vec::new(), d.to_vec()),
                    };
                    pb::FieldDigest {
                        name: e.name.clone(),
                        salt,
                        digest,
                    }
                })
                .collect(),
        ),
    };
    pb::OriginProof {
        certificate_sha256: p.certificate.to_vec(),
        scheme: u32::from(p.scheme),
        signature: p.signature.clone(),
        signed_at: Some(pbjson_types::Timestamp { seconds, nanos }),
        salt_seed,
        fields,
        batch: p.batch.as_ref().map(|b| pb::BatchInclusion {
            index: b.index,
            size: b.size,
            path: b.path.iter().map(|h| h.to_vec()).collect(),
        }),
    }
}

/// Most values in one list of a filter.
const FILTER_VALUES: usize = 256;

/// Validates a filter; `field` prefixes the field names in errors.
pub fn filter_from_pb(f: Option<pb::Filter>, field: &str) -> Result<EventFilter> {
    let Some(f) = f else {
        return Ok(EventFilter::default());
    };
    let name = |sub: &str| format!("{field}.{sub}");
    for (sub, len) in [
        ("gtin_prefixes", f.gtin_prefixes.len()),
        ("categories", f.categories.len()),
        ("kinds", f.kinds.len()),
        ("channels", f.channels.len()),
        ("regions", f.regions.len()),
    ] {
        if len > FILTER_VALUES {
            return Err(invalid(
                &name(sub),
                format!("at most {FILTER_VALUES} values"),
            ));
        }
    }
    for p in &f.gtin_prefixes {
        if !crate::domain::is_company_prefix(p) {
            return Err(invalid(
                &name("gtin_prefixes"),
                format!(
                    "{:?} is not a GS1 company prefix (1-13 digits)",
                    truncate(p, 20)
                ),
            ));
        }
    }
    for (sub, values) in [("categories", &f.categories), ("regions", &f.regions)] {
        for v in values {
            bounded_text(&name(sub), v, limits::PRODUCT_TEXT_LEN)?;
        }
    }
    let kinds = f
        .kinds
        .iter()
        .map(|k| enum_field(&name("kinds"), *k, EventKind::from_number))
        .collect::<Result<Vec<_>>>()?;
    let channels = f
        .channels
        .iter()
        .map(|c| enum_field(&name("channels"), *c, Channel::from_number))
        .collect::<Result<Vec<_>>>()?;
    let since = f
        .since
        .map(|t| timestamp(&name("since"), Some(t)))
        .transpose()?;
    let until = f
        .until
        .map(|t| timestamp(&name("until"), Some(t)))
        .transpose()?;
    if let (Some(s), Some(u)) = (since, until) {
        if u <= s {
            return Err(invalid(&name("until"), "must be after since"));
        }
    }
    Ok(EventFilter {
        gtin_prefixes: f.gtin_prefixes,
        categories: f.categories.iter().map(|c| c.to_lowercase()).collect(),
        kinds,
        channels,
        regions: f.regions.iter().map(|r| r.to_uppercase()).collect(),
        since,
        until,
    })
}

/// Validates an insight query.
pub fn insight_query_from_pb(q: pb::InsightQuery) -> Result<crate::insights::Query> {
    use crate::insights::{Bucket, Dim, Query};
    let filter = filter_from_pb(q.filter, "filter")?;
    let mut group_by = Vec::with_capacity(q.group_by.len());
    for d in &q.group_by {
        let dim = match pb::Dimension::try_from(*d) {
            Ok(pb::Dimension::Gtin) => Dim::Gtin,
            Ok(pb::Dimension::Category) => Dim::Category,
            Ok(pb::Dimension::Brand) => Dim::Brand,
            Ok(pb::Dimension::Region) => Dim::Region,
            Ok(pb::Dimension::Channel) => Dim::Channel,
            Ok(pb::Dimension::Stage) => Dim::Stage,
            Ok(pb::Dimension::Kind) => Dim::Kind,
            Ok(pb::Dimension::AgeBand) => Dim::AgeBand,
            Ok(pb::Dimension::Attribute) => Dim::Attribute,
            Ok(pb::Dimension::Time) => Dim::Time,
            Ok(pb::Dimension::Unspecified) => {
                return Err(invalid(
                    "group_by",
                    "DIMENSION_UNSPECIFIED is not a dimension",
                ))
            }
            Err(_) => return Err(invalid("group_by", format!("unknown dimension {d}"))),
        };
        if group_by.contains(&dim) {
            return Err(invalid("group_by", format!("{dim:?} listed twice")));
        }
        group_by.push(dim);
    }
    let bucket = match pb::TimeBucket::try_from(q.bucket) {
        Ok(pb::TimeBucket::Unspecified) => None,
        Ok(pb::TimeBucket::Hour) => Some(Bucket::Hour),
        Ok(pb::TimeBucket::Day) => Some(Bucket::Day),
        Ok(pb::TimeBucket::Week) => Some(Bucket::Week),
        Ok(pb::TimeBucket::Month) => Some(Bucket::Month),
        Err(_) => {
            return Err(invalid(
                "bucket",
                format!("unknown time bucket {}", q.bucket),
            ))
        }
    };
    if group_by.contains(&Dim::Time) && bucket.is_none() {
        return Err(invalid(
            "bucket",
            "required when grouping by TIME (HOUR, DAY, WEEK or MONTH)",
        ));
    }
    let attribute_key = (!q.attribute_key.is_empty()).then_some(q.attribute_key);
    if group_by.contains(&Dim::Attribute) && attribute_key.is_none() {
        return Err(invalid(
            "attribute_key",
            "required when grouping by ATTRIBUTE",
        ));
    }
    if let Some(k) = &attribute_key {
        bounded_text("attribute_key", k, limits::ATTRIBUTE_KEY_LEN)?;
    }
    Ok(Query {
        filter,
        group_by,
        attribute_key,
        bucket,
        limit: q.limit as usize,
    })
}

/// The protobuf form of an insight report.
pub fn insight_report_to_pb(r: crate::insights::Report) -> pb::InsightReport {
    pb::InsightReport {
        rows: r
            .rows
            .into_iter()
            .map(|row| pb::InsightRow {
                key: row.key,
                bucket_start: row.bucket_start.map(|t| {
                    let (seconds, nanos) = t.split();
                    pbjson_types::Timestamp { seconds, nanos }
                }),
                events: row.events,
                customers: row.customers,
                avg_score: row.avg_score,
                nps: row.nps,
                return_rate: row.return_rate,
                share: row.share,
            })
            .collect(),
        suppressed_groups: r.suppressed_groups,
        k_min: r.k_min,
        epsilon: r.epsilon,
    }
}

/// The protobuf form of a filter.
pub fn filter_to_pb(f: &EventFilter) -> pb::Filter {
    let ts = |t: UnixNanos| {
        let (seconds, nanos) = t.split();
        pbjson_types::Timestamp { seconds, nanos }
    };
    pb::Filter {
        gtin_prefixes: f.gtin_prefixes.clone(),
        categories: f.categories.clone(),
        kinds: f.kinds.iter().map(|k| k.number()).collect(),
        channels: f.channels.iter().map(|c| c.number()).collect(),
        regions: f.regions.clone(),
        since: f.since.map(ts),
        until: f.until.map(ts),
    }
}

/// The protobuf form of a stored event.
pub fn preference_event_to_pb(ev: &PreferenceEvent) -> pb::PreferenceEvent {
    let (seconds, nanos) = ev.occurred_at.split();
    pb::PreferenceEvent {
        event_id: ev.event_id.clone(),
        origin: ev.origin.clone(),
        kind: ev.kind.number(),
        occurred_at: Some(pbjson_types::Timestamp { seconds, nanos }),
        product: Some(pb::Product {
            gtin: ev.product.gtin.as_str().to_string(),
            category: ev.product.category.clone(),
            brand: ev.product.brand.clone(),
        }),
        channel: ev.channel.number(),
        stage: ev.stage.number(),
        attributes: ev.attributes.clone(),
        score: ev.score,
        quantity: ev.quantity,
        region: ev.region.clone(),
        age_band: ev.age_band.clone(),
        customer_pseudonym: ev.customer_pseudonym.clone(),
        text: ev.text.clone(),
        path: ev.path.clone(),
        origin_proof: ev.proof.as_ref().map(origin_proof_to_pb),
    }
}

/// An optional timestamp field (absent: `None`), validated as
/// [`timestamp`] does.
pub fn optional_timestamp(
    field: &str,
    ts: Option<pbjson_types::Timestamp>,
) -> Result<Option<UnixNanos>> {
    ts.map(|t| timestamp(field, Some(t))).transpose()
}

/// The protobuf form of an audit record.
pub fn audit_record_to_pb(r: &crate::audit::Record) -> pb::AuditRecord {
    let (seconds, nanos) = r.at.split();
    pb::AuditRecord {
        seq: r.seq,
        at: Some(pbjson_types::Timestamp { seconds, nanos }),
        kind: r.kind.number(),
        identity: r.identity.clone(),
        detail: r.detail.clone(),
        prev_hash: r.prev.to_vec(),
        hash: r.hash.to_vec(),
    }
}

/// An audit record as a node sent it, for checking its chain. Only the
/// shape is checked here (whether it verifies is the chain's business).
pub fn audit_record_from_pb(r: pb::AuditRecord) -> Result<crate::audit::Record> {
    let at = r.at.ok_or_else(|| invalid("at", "required"))?;
    let at = at
        .seconds
        .checked_mul(1_000_000_000)
        .and_then(|s| s.checked_add(i64::from(at.nanos)))
        .ok_or_else(|| invalid("at", "out of range"))?;
    let hash = |field: &str, b: Vec<u8>| {
        <crate::audit::Hash>::try_from(b.as_slice())
            .map_err(|_| invalid(field, format!("must be {} bytes", crate::audit::HASH_LEN)))
    };
    Ok(crate::audit::Record {
        seq: r.seq,
        at: UnixNanos(at),
        kind: enum_field("kind", r.kind, crate::audit::Kind::from_number)?,
        identity: r.identity,
        detail: r.detail,
        prev: hash("prev_hash", r.prev_hash)?,
        hash: hash("hash", r.hash)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::CustomerEvent {
        pb::CustomerEvent {
            event_id: "ev-1".into(),
            kind: pb::EventKind::Review as i32,
            occurred_at: Some(pbjson_types::Timestamp {
                seconds: 1_790_000_000,
                nanos: 0,
            }),
            product: Some(pb::Product {
                gtin: "4740001000017".into(),
                category: "dairy".into(),
                brand: "Põlluvara".into(),
            }),
            channel: pb::Channel::Web as i32,
            stage: pb::JourneyStage::PostPurchase as i32,
            score: Some(4),
            quantity: 1,
            country: "EE".into(),
            postal_code: "10115".into(),
            birth_year: 1985,
            ..Default::default()
        }
    }

    fn now() -> UnixNanos {
        UnixNanos(1_790_000_000 * 1_000_000_000)
    }

    fn field_of(ev: pb::CustomerEvent) -> String {
        customer_event_from_pb(ev, now()).unwrap_err().field
    }

    #[test]
    fn a_good_event_converts() {
        let ev = customer_event_from_pb(good(), now()).unwrap();
        assert_eq!(ev.product.gtin.as_str(), "04740001000017");
        assert_eq!(ev.personal.country.unwrap().as_str(), "EE");
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut e = good();
        e.kind = 0;
        assert_eq!(field_of(e), "kind");
        let mut e = good();
        e.channel = 99;
        assert_eq!(field_of(e), "channel");
        let mut e = good();
        e.score = Some(6);
        assert_eq!(field_of(e), "score");
        let mut e = good();
        e.kind = pb::EventKind::Nps as i32;
        e.score = None;
        assert_eq!(field_of(e), "score");
        let mut e = good();
        e.occurred_at.as_mut().unwrap().seconds += 301;
        assert_eq!(field_of(e), "occurred_at");
        let mut e = good();
        e.country = "XX".into();
        assert_eq!(field_of(e), "country");
        let mut e = good();
        e.product.as_mut().unwrap().gtin = "4740001000018".into();
        assert_eq!(field_of(e), "product.gtin");
        let mut e = good();
        e.attributes.insert("bad key".into(), "v".into());
        assert_eq!(field_of(e), "attributes.key");
    }

    #[test]
    fn a_batch_inclusion_is_checked_field_by_field_and_round_trips() {
        let proof = |batch: Option<pb::BatchInclusion>| {
            let mut ev = preference_event_to_pb(&PreferenceEvent::example());
            ev.origin_proof = Some(pb::OriginProof {
                certificate_sha256: vec![1; 32],
                scheme: 0x0403,
                signature: vec![2; 64],
                signed_at: Some(pbjson_types::Timestamp {
                    seconds: 1_790_000_000,
                    nanos: 0,
                }),
                salt_seed: vec![3; 32],
                fields: vec![],
                batch,
            });
            preference_event_from_pb(ev)
        };
        let at = |index, size, path: Vec<Vec<u8>>| Some(pb::BatchInclusion { index, size, path });
        // Leaf 4 of 5 moves up twice unchanged: one sibling, the root of 0-3.
        let good = proof(at(4, 5, vec![vec![7; 32]])).expect("well-formed");
        let back = preference_event_to_pb(&good).origin_proof.unwrap().batch;
        assert_eq!(back, at(4, 5, vec![vec![7; 32]]));
        assert!(proof(None).unwrap().proof.unwrap().batch.is_none());
        for (batch, field, reason) in [
            (
                at(0, 0, vec![]),
                "origin_proof.batch.size",
                "must be 1-1048576, got 0",
            ),
            (
                at(0, (1 << 20) + 1, vec![]),
                "origin_proof.batch.size",
                "must be 1-1048576, got 1048577",
            ),
            (
                at(5, 5, vec![]),
                "origin_proof.batch.index",
                "must be below size 5, got 5",
            ),
            (
                at(0, 5, vec![vec![7; 32]]),
                "origin_proof.batch.path",
                "leaf 0 of 5 needs 3 hashes, got 1",
            ),
            (
                at(4, 5, vec![vec![7; 31]]),
                "origin_proof.batch.path",
                "must be 32 bytes",
            ),
        ] {
            let err = proof(batch).unwrap_err();
            assert_eq!((err.field.as_str(), err.reason.as_str()), (field, reason));
        }
    }

    #[test]
    fn multi_line_free_text_is_accepted_stored_and_read_back() {
        let mut e = good();
        e.customer_id = "c-1".into();
        e.free_text = "Line one.\n\tLine two.\r\n".into();
        let ev = customer_event_from_pb(e, now()).unwrap();
        let stored = crate::anonymise::Anonymiser::new("r", [1; 32]).anonymise(ev);
        assert!(stored.text.contains('\n'));
        let back = crate::store::record::decode(&crate::store::record::encode(&stored)).unwrap();
        assert_eq!(back, stored);
        let mut e = good();
        e.free_text = "bell\u{7}".into();
        assert_eq!(field_of(e), "free_text");
    }

    #[test]
    fn empty_event_id_gets_a_uuid_v7() {
        let mut e = good();
        e.event_id.clear();
        let ev = customer_event_from_pb(e, now()).unwrap();
        let id = uuid::Uuid::parse_str(&ev.event_id).unwrap();
        assert_eq!(id.get_version_num(), 7);
    }
}
