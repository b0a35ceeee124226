//! Erasure of one end customer's events.
//!
//! Trees:
//! - `customer_runs`: per commit, a fingerprint of each event's customer
//!   — where a customer's events are (see `super::customers`)
//! - `erasures`: erasure id → [`ErasureRecord`] — what was erased here and
//!   the state of passing it on along each upstream link
//! - `erasure_signals`: seq → [`SignalRecord`] — an erasure's place in the
//!   subscribers' stream (sequence numbers shared with events)
//!
//! The writer erases in one transaction: the events and their index and
//! outbox entries, the rollup cells corrected, the erasure record and the
//! subscribers' signal. So an erasure that is acknowledged is complete here
//! and queued upstream, even across a kill -9. `by_id` entries stay as
//! tombstones, so a late resend of an erased event is a duplicate.

use prost::Message;

use super::{Error, Result, Seq};
use crate::domain::PreferenceEvent;

/// What to erase at this node.
#[derive(Debug, Clone)]
pub struct EraseRequest {
    pub id: String,
    /// Who asked: the publisher's identity, or the downstream node.
    pub requested_by: String,
    /// The customer's pseudonym as stored here (empty: none).
    pub pseudonym: String,
    /// Events to erase by id (those a downstream link carried).
    pub event_ids: Vec<String>,
    /// For a downstream's erasure, this node's id: events that originated
    /// here are not erased (no downstream carried them), and ids not stored
    /// are tombstoned for forwarded events only. `None` for this node's own
    /// publishers' erasures.
    pub spare_origin: Option<String>,
}

/// Where an erased event must be erased further: upstream link id and the
/// pseudonym in that link's form (empty when the link does not carry it).
pub type Route = (String, String);

/// Where an erasure goes on: the links of each erased event, and the
/// links that carry a customer's pseudonym (asked even when nothing is
/// stored here any more: retention here may be shorter than upstream).
pub struct Router {
    pub event: EventRoutes,
    pub customer: CustomerRoutes,
}

/// The routes of an erased event.
pub type EventRoutes = Box<dyn Fn(&PreferenceEvent) -> Vec<Route> + Send>;
/// The routes of a customer's pseudonym.
pub type CustomerRoutes = Box<dyn Fn(&str) -> Vec<Route> + Send>;

impl Router {
    /// Routes nowhere (a node without upstream links).
    pub fn none() -> Router {
        Router {
            event: Box::new(|_| Vec::new()),
            customer: Box::new(|_| Vec::new()),
        }
    }
}

/// An erasure as recorded here.
#[derive(Clone, PartialEq, Message)]
pub struct ErasureRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(int64, tag = "2")]
    pub requested_at: i64,
    #[prost(string, tag = "3")]
    pub requested_by: String,
    /// Events erased here (over every application of this erasure).
    #[prost(uint64, tag = "4")]
    pub erased_events: u64,
    #[prost(message, repeated, tag = "5")]
    pub links: Vec<LinkErasure>,
}

/// Passing an erasure on along one upstream link.
#[derive(Clone, PartialEq, Message)]
pub struct LinkErasure {
    #[prost(string, tag = "1")]
    pub link: String,
    #[prost(string, tag = "2")]
    pub pseudonym: String,
    #[prost(string, repeated, tag = "3")]
    pub event_ids: Vec<String>,
    /// Unix nanoseconds of the upstream's confirmation; 0 while pending.
    #[prost(int64, tag = "4")]
    pub confirmed_at: i64,
    /// Events the upstream node erased.
    #[prost(uint64, tag = "5")]
    pub erased_upstream: u64,
    #[prost(string, tag = "6")]
    pub last_error: String,
}

/// An erasure in the subscribers' stream: the erased events, trimmed to
/// what a subscription filter looks at (no customer data).
#[derive(Clone, PartialEq, Message)]
pub struct SignalRecord {
    #[prost(string, tag = "1")]
    pub erasure_id: String,
    /// Stored-event encodings of the trimmed events.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub events: Vec<Vec<u8>>,
}

/// An erasure as subscribers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ErasureSignal {
    pub erasure_id: String,
    /// The erased events, trimmed to what filters look at.
    pub events: Vec<PreferenceEvent>,
}

/// What an erasure did here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Erased {
    /// Events erased now.
    pub events: u64,
    /// Events erased here by this erasure, over every application of it.
    pub total: u64,
    /// The upstream links it is passed on along.
    pub links: Vec<String>,
}

/// `event` without anything but what filters match on.
pub(super) fn trimmed(ev: &PreferenceEvent) -> PreferenceEvent {
    PreferenceEvent {
        event_id: ev.event_id.clone(),
        origin: ev.origin.clone(),
        kind: ev.kind,
        occurred_at: ev.occurred_at,
        product: ev.product.clone(),
        channel: ev.channel,
        stage: ev.stage,
        attributes: Default::default(),
        score: None,
        quantity: 0,
        region: ev.region.clone(),
        age_band: String::new(),
        customer_pseudonym: String::new(),
        text: String::new(),
        path: ev.path.clone(),
        proof: None,
    }
}

pub(super) fn decode_record(id: &str, bytes: &[u8]) -> Result<ErasureRecord> {
    ErasureRecord::decode(bytes).map_err(|e| Error::Corrupt {
        tree: "erasures",
        key: id.to_string(),
        source: super::DecodeError::Payload(e.to_string()),
    })
}

pub(super) fn decode_signal(seq: Seq, bytes: &[u8]) -> Result<ErasureSignal> {
    let corrupt = |e: String| Error::Corrupt {
        tree: "erasure_signals",
        key: seq.to_string(),
        source: super::DecodeError::Payload(e),
    };
    let r = SignalRecord::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let events = r
        .events
        .iter()
        .map(|b| super::record::decode(b).map_err(|e| corrupt(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    Ok(ErasureSignal {
        erasure_id: r.erasure_id,
        events,
    })
}
