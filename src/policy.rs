//! Who may call what. Roles are granted to certificate identities in
//! node.toml `[roles]`; an identity not listed for a role does not have it
//! (deny by default).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use crate::anonymise::keyed_digest;
use crate::config::{PseudonymMode, Roles, Share};
use crate::domain::{EventFilter, EventKind, PreferenceEvent};

/// A role a caller may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// May call `Ingest`.
    Publisher,
    /// May call `Peering.Forward` (a downstream node).
    Downstream,
    /// May call `Signals.Subscribe`.
    Subscriber,
    /// May call `Insights.Query`.
    Analyst,
    /// May read operational state (`Peering.Links`).
    Operator,
    /// May read the audit trail (`Audit.List`).
    Auditor,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Publisher => "publisher",
            Role::Downstream => "downstream",
            Role::Subscriber => "subscriber",
            Role::Analyst => "analyst",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        })
    }
}

impl Role {
    /// The node.toml key that grants this role.
    pub fn config_key(self) -> &'static str {
        match self {
            Role::Publisher => "roles.publishers",
            Role::Downstream => "roles.downstream",
            Role::Subscriber => "roles.subscribers",
            Role::Analyst => "roles.analysts",
            Role::Operator => "roles.operators",
            Role::Auditor => "roles.auditors",
        }
    }
}

/// The role grants of one node. Clones share the grants, so a live reload
/// ([`Policy::replace`]) reaches every service at once.
#[derive(Debug, Clone)]
pub struct Policy {
    grants: Arc<RwLock<Grants>>,
    /// Client certificate serials the CRLs in force list.
    revoked: Arc<RwLock<HashSet<Vec<u8>>>>,
    /// Bumped after each reload, so running streams check their grounds
    /// again even when no new event wakes them.
    reloads: Arc<tokio::sync::watch::Sender<u64>>,
    /// Requests per second per identity (`[limits] requests_per_second`).
    rate: Arc<RateLimit>,
}

/// A token bucket per identity: `per_second` tokens a second, at most one
/// second's worth saved up.
#[derive(Debug, Default)]
struct RateLimit {
    per_second: u32,
    buckets: std::sync::Mutex<HashMap<String, (f64, std::time::Instant)>>,
}

impl RateLimit {
    /// Takes a token for `identity`; false when its bucket is empty.
    fn take(&self, identity: &str) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let rate = f64::from(self.per_second);
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = buckets.entry(identity.to_string()).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Grants {
    publishers: HashSet<String>,
    downstream: HashSet<String>,
    subscribers: HashSet<String>,
    analysts: HashSet<String>,
    operators: HashSet<String>,
    auditors: HashSet<String>,
}

impl Grants {
    fn from_roles(roles: &Roles) -> Self {
        let set = |v: &Vec<String>| v.iter().cloned().collect();
        Grants {
            publishers: set(&roles.publishers),
            downstream: set(&roles.downstream),
            subscribers: set(&roles.subscribers),
            analysts: set(&roles.analysts),
            operators: set(&roles.operators),
            auditors: set(&roles.auditors),
        }
    }
}

impl Policy {
    /// The grants of node.toml `[roles]`.
    pub fn from_roles(roles: &Roles) -> Self {
        Policy {
            grants: Arc::new(RwLock::new(Grants::from_roles(roles))),
            revoked: Arc::default(),
            reloads: Arc::new(tokio::sync::watch::Sender::new(0)),
            rate: Arc::default(),
        }
    }

    /// The same grants, with at most `per_second` requests a second per
    /// identity (0: no limit).
    pub fn with_rate_limit(mut self, per_second: u32) -> Self {
        self.rate = Arc::new(RateLimit {
            per_second,
            buckets: Default::default(),
        });
        self
    }

    /// Counts one request of `identity`; false when it is over its rate.
    pub fn admit(&self, identity: &str) -> bool {
        self.rate.take(identity)
    }

    /// The rate limit in force (requests per second per identity; 0: none).
    pub fn rate_limit(&self) -> u32 {
        self.rate.per_second
    }

    /// Says that a reload has happened (roles, limits or CRLs may differ).
    pub fn reloaded(&self) {
        self.reloads.send_modify(|n| *n += 1);
    }

    /// Wakes when [`Self::reloaded`] is called.
    pub fn watch_reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Whether the client certificate with `serial` is revoked.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        read(&self.revoked).contains(serial)
    }

    /// Puts the revoked serials of the CRLs in force (at start and on
    /// reload): every request after is checked against them.
    pub fn set_revoked(&self, serials: HashSet<Vec<u8>>) {
        *self.revoked.write().unwrap_or_else(PoisonError::into_inner) = serials;
    }

    /// Whether `identity` holds `role`.
    pub fn allows(&self, identity: &str, role: Role) -> bool {
        let g = read(&self.grants);
        let set = match role {
            Role::Publisher => &g.publishers,
            Role::Downstream => &g.downstream,
            Role::Subscriber => &g.subscribers,
            Role::Analyst => &g.analysts,
            Role::Operator => &g.operators,
            Role::Auditor => &g.auditors,
        };
        set.contains(identity)
    }

    /// Puts the grants of `roles` in force for every request from now on
    /// (live reload); whether they differ from those in force.
    pub fn replace(&self, roles: &Roles) -> bool {
        let new = Grants::from_roles(roles);
        let mut g = self.grants.write().unwrap_or_else(PoisonError::into_inner);
        let changed = *g != new;
        *g = new;
        changed
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from_roles(&Roles::default())
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Per-identity filters that subscriptions and queries cannot widen
/// (`[[filter_limit]]` in node.toml).
///
/// A request is **narrowed** where it leaves a dimension open (an empty
/// list takes the limit's values) and **refused** (`PERMISSION_DENIED`)
/// where it explicitly asks for something outside the limit.
///
/// Clones share the limits, so a live reload ([`FilterLimits::replace`])
/// reaches subscriptions and queries alike.
#[derive(Debug, Clone, Default)]
pub struct FilterLimits {
    by_identity: Arc<RwLock<HashMap<String, EventFilter>>>,
}

impl FilterLimits {
    /// The limits of node.toml.
    pub fn from_config(limits: &[crate::config::FilterLimit]) -> Self {
        FilterLimits {
            by_identity: Arc::new(RwLock::new(Self::parse(limits))),
        }
    }

    /// Puts `limits` in force for every request from now on (live reload);
    /// whether they differ from those in force.
    pub fn replace(&self, limits: &[crate::config::FilterLimit]) -> bool {
        let new = Self::parse(limits);
        let mut l = self
            .by_identity
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = *l != new;
        *l = new;
        changed
    }

    fn parse(limits: &[crate::config::FilterLimit]) -> HashMap<String, EventFilter> {
        limits
            .iter()
            .map(|l| {
                let filter = EventFilter {
                    gtin_prefixes: l.gtin_prefixes.clone(),
                    categories: l.categories.iter().map(|c| c.to_lowercase()).collect(),
                    kinds: l
                        .kinds
                        .iter()
                        .filter_map(|k| EventKind::from_label(k))
                        .collect(),
                    regions: l.regions.iter().map(|r| r.to_uppercase()).collect(),
                    ..EventFilter::default()
                };
                (l.identity.clone(), filter)
            })
            .collect()
    }

    /// The filter `identity` gets for `requested`, or why it is refused.
    pub fn constrain(
        &self,
        identity: &str,
        mut requested: EventFilter,
    ) -> Result<EventFilter, String> {
        let Some(limit) = read(&self.by_identity).get(identity).cloned() else {
            return Ok(requested);
        };
        narrow(
            &mut requested.gtin_prefixes,
            &limit.gtin_prefixes,
            "GTIN prefix",
            |r, a| r.starts_with(a),
        )?;
        narrow(
            &mut requested.categories,
            &limit.categories,
            "category",
            |r, a| r == a,
        )?;
        narrow(&mut requested.kinds, &limit.kinds, "kind", |r, a| r == a)?;
        narrow(&mut requested.regions, &limit.regions, "region", |r, a| {
            crate::domain::region_within(r, a)
        })?;
        Ok(requested)
    }
}

/// Fills an open dimension from the limit, or checks every requested value
/// lies within it.
fn narrow<T: Clone + fmt::Debug>(
    requested: &mut Vec<T>,
    allowed: &[T],
    what: &str,
    within: impl Fn(&T, &T) -> bool,
) -> Result<(), String> {
    if allowed.is_empty() {
        return Ok(());
    }
    if requested.is_empty() {
        *requested = allowed.to_vec();
        return Ok(());
    }
    match requested
        .iter()
        .find(|r| !allowed.iter().any(|a| within(r, a)))
    {
        None => Ok(()),
        Some(r) => Err(format!(
            "{what} {r:?} is outside this identity's limit {allowed:?}"
        )),
    }
}

/// The sharing agreement of one upstream link, parsed from `[upstream.share]`:
/// which events the link receives and what is withheld from them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkAgreement {
    /// Which events the link receives (GTIN company prefixes, categories,
    /// kinds; empty = all).
    pub filter: EventFilter,
    /// Fields withheld (names from `config::DROPPABLE_FIELDS`).
    pub drop_fields: HashSet<String>,
    pub pseudonym: PseudonymMode,
}

impl LinkAgreement {
    /// The agreement of a validated `[upstream.share]` table.
    pub fn from_share(share: &Share) -> Self {
        LinkAgreement {
            filter: EventFilter {
                gtin_prefixes: share.gtin_prefixes.clone(),
                categories: share.categories.iter().map(|c| c.to_lowercase()).collect(),
                kinds: share
                    .kinds
                    .iter()
                    .filter_map(|k| EventKind::from_label(k))
                    .collect(),
                ..EventFilter::default()
            },
            drop_fields: share.drop_fields.iter().cloned().collect(),
            pseudonym: share.pseudonym,
        }
    }

    /// The agreement as the audit trail records it.
    pub fn describe(&self) -> serde_json::Value {
        let mut dropped: Vec<&str> = self.drop_fields.iter().map(String::as_str).collect();
        dropped.sort_unstable();
        serde_json::json!({
            "filter": crate::conversions::filter_to_pb(&self.filter),
            "drop_fields": dropped,
            "pseudonym": format!("{:?}", self.pseudonym),
        })
    }

    /// Whether the agreement covers `ev`.
    pub fn matches(&self, ev: &PreferenceEvent) -> bool {
        self.filter.matches(ev)
    }

    /// `ev` as this link may receive it: dropped fields emptied, the
    /// pseudonym re-keyed with `link_key`, kept, or removed.
    pub fn apply(&self, mut ev: PreferenceEvent, link_key: &[u8]) -> PreferenceEvent {
        let drop = |f: &str| self.drop_fields.contains(f);
        if drop("text") {
            ev.text.clear();
        }
        if drop("age_band") {
            ev.age_band.clear();
        }
        if drop("region") {
            ev.region.clear();
        }
        if drop("attributes") {
            ev.attributes.clear();
        }
        if drop("score") {
            ev.score = None;
        }
        if drop("quantity") {
            ev.quantity = 0;
        }
        ev.customer_pseudonym = self.pseudonym_for(&ev.customer_pseudonym, link_key);
        ev
    }

    /// A customer pseudonym as this link carries it: re-keyed, as is, or
    /// not at all (empty).
    pub fn pseudonym_for(&self, pseudonym: &str, link_key: &[u8]) -> String {
        if pseudonym.is_empty()
            || self.drop_fields.contains("customer_pseudonym")
            || self.pseudonym == PseudonymMode::Drop
        {
            String::new()
        } else if self.pseudonym == PseudonymMode::PerLink {
            keyed_digest(link_key, pseudonym.as_bytes())
        } else {
            pseudonym.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_narrow_open_requests_and_refuse_wider_ones() {
        let limits = FilterLimits::from_config(&[crate::config::FilterLimit {
            identity: "partner".into(),
            gtin_prefixes: vec!["4740001".into()],
            ..Default::default()
        }]);
        let open = limits.constrain("partner", EventFilter::default()).unwrap();
        assert_eq!(open.gtin_prefixes, ["4740001"]);
        let narrower = EventFilter {
            gtin_prefixes: vec!["47400010".into()],
            ..Default::default()
        };
        assert!(limits.constrain("partner", narrower).is_ok());
        let wider = EventFilter {
            gtin_prefixes: vec!["474".into()],
            ..Default::default()
        };
        assert!(limits
            .constrain("partner", wider)
            .unwrap_err()
            .contains("474"));
        assert!(limits
            .constrain("someone-else", EventFilter::default())
            .unwrap()
            .gtin_prefixes
            .is_empty());
    }

    fn sample_event() -> PreferenceEvent {
        use crate::domain::*;
        PreferenceEvent {
            event_id: "e".into(),
            origin: "r".into(),
            kind: EventKind::Review,
            occurred_at: UnixNanos(1_790_000_000_000_000_000),
            product: Product {
                gtin: Gtin::parse("4740001000017").unwrap(),
                category: "dairy".into(),
                brand: "b".into(),
            },
            channel: Channel::Web,
            stage: JourneyStage::PostPurchase,
            attributes: [("size".to_string(), "M".to_string())].into(),
            score: Some(4),
            quantity: 1,
            region: "EE-10".into(),
            age_band: "35-44".into(),
            customer_pseudonym: "00112233445566778899aabbccddeeff".into(),
            text: "fine".into(),
            path: vec!["r".into()],
            proof: None,
        }
    }

    #[test]
    fn pseudonym_modes_and_dropped_fields() {
        let ev = sample_event();
        let share = |mode, drop: &[&str]| LinkAgreement {
            drop_fields: drop.iter().map(|s| s.to_string()).collect(),
            pseudonym: mode,
            ..Default::default()
        };
        let per_link = share(PseudonymMode::PerLink, &[]);
        let a = per_link.apply(ev.clone(), b"link-a");
        let b = per_link.apply(ev.clone(), b"link-b");
        assert_ne!(a.customer_pseudonym, ev.customer_pseudonym);
        assert_ne!(a.customer_pseudonym, b.customer_pseudonym);
        assert_eq!(
            a.customer_pseudonym,
            per_link.apply(ev.clone(), b"link-a").customer_pseudonym
        );
        let shared = share(PseudonymMode::Shared, &[]).apply(ev.clone(), b"link-a");
        assert_eq!(shared.customer_pseudonym, ev.customer_pseudonym);
        let dropped = share(PseudonymMode::Drop, &[]).apply(ev.clone(), b"link-a");
        assert!(dropped.customer_pseudonym.is_empty());
        let all = [
            "text",
            "age_band",
            "region",
            "attributes",
            "score",
            "quantity",
            "customer_pseudonym",
        ];
        let bare = share(PseudonymMode::Shared, &all).apply(ev, b"k");
        assert!(bare.text.is_empty() && bare.age_band.is_empty() && bare.region.is_empty());
        assert!(bare.attributes.is_empty() && bare.score.is_none() && bare.quantity == 0);
        assert!(bare.customer_pseudonym.is_empty());
    }

    #[test]
    fn deny_by_default() {
        let p = Policy::from_roles(&Roles {
            publishers: vec!["eshop".into()],
            ..Default::default()
        });
        assert!(p.allows("eshop", Role::Publisher));
        assert!(!p.allows("eshop", Role::Analyst));
        assert!(!p.allows("other", Role::Publisher));
    }
}
