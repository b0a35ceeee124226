//! The audit trail in the `audit` tree: seq (u64, big-endian) → record.
//!
//! Appends are serialised by the head lock, so numbers have no gaps and
//! each record links to the one written before it. A record is inserted
//! without a flush of its own: it is on disk with the next flush of the
//! store (the writer's next group commit, or sled's periodic flush within
//! half a second).

use std::sync::Mutex;

use prost::Message;

use super::{Error, Result};
use crate::audit::{Broken, Hash, Kind, Record, Verified, GENESIS, HASH_LEN};
use crate::domain::UnixNanos;

/// A record as stored (its seq is the key).
#[derive(Clone, PartialEq, Message)]
struct Stored {
    #[prost(int64, tag = "1")]
    at: i64,
    #[prost(int32, tag = "2")]
    kind: i32,
    #[prost(string, tag = "3")]
    identity: String,
    #[prost(string, tag = "4")]
    detail: String,
    #[prost(bytes = "vec", tag = "5")]
    prev: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    hash: Vec<u8>,
}

pub(super) struct AuditLog {
    tree: sled::Tree,
    /// The last record's seq and hash.
    head: Mutex<(u64, Hash)>,
}

impl AuditLog {
    pub(super) fn open(db: &sled::Db) -> Result<AuditLog> {
        let tree = db.open_tree("audit")?;
        let head = match tree.last()? {
            None => (0, GENESIS),
            Some((k, v)) => {
                let seq = key_seq(&k)?;
                let record = decode(seq, &v).map_err(|b| corrupt(seq, &b.reason))?;
                (seq, record.hash)
            }
        };
        Ok(AuditLog {
            tree,
            head: Mutex::new(head),
        })
    }

    pub(super) fn append(&self, kind: Kind, identity: &str, detail: String) -> Result<Record> {
        let mut head = self
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = Record::next(*head, UnixNanos::now(), kind, identity.to_string(), detail);
        let stored = Stored {
            at: record.at.0,
            kind: record.kind.number(),
            identity: record.identity.clone(),
            detail: record.detail.clone(),
            prev: record.prev.to_vec(),
            hash: record.hash.to_vec(),
        };
        self.tree
            .insert(record.seq.to_be_bytes(), stored.encode_to_vec())?;
        *head = (record.seq, record.hash);
        Ok(record)
    }

    /// The last record's seq (0 when the trail is empty).
    pub(super) fn head_seq(&self) -> u64 {
        self.head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Records with a seq above `after`, oldest first. A record that does
    /// not decode ends the iteration with [`Error::Corrupt`].
    pub(super) fn after(&self, after: u64) -> impl Iterator<Item = Result<Record>> {
        let start = after.saturating_add(1).to_be_bytes();
        self.tree.range(start..).map(|item| {
            let (k, v) = item?;
            let seq = key_seq(&k)?;
            decode(seq, &v).map_err(|b| corrupt(seq, &b.reason))
        })
    }

    /// Checks the whole chain (see [`verify_tree`]).
    pub(super) fn verify(&self) -> Result<std::result::Result<Verified, Broken>> {
        verify_tree(&self.tree)
    }
}

/// Opens the audit tree of `db` and checks it, without starting anything
/// else of a store (offline `chainsight audit verify`).
pub(super) fn verify_db(db: &sled::Db) -> Result<std::result::Result<Verified, Broken>> {
    verify_tree(&db.open_tree("audit")?)
}

/// Checks a whole chain. A record that does not decode breaks it there
/// (tampering with the bytes), rather than failing the check.
fn verify_tree(tree: &sled::Tree) -> Result<std::result::Result<Verified, Broken>> {
    crate::audit::verify_chain(tree.iter().map(|item| {
        let (k, v) = item?;
        Ok(decode(key_seq(&k)?, &v))
    }))
}

fn key_seq(k: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = k
        .try_into()
        .map_err(|_| corrupt(0, "a key is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode(seq: u64, v: &[u8]) -> std::result::Result<Record, Broken> {
    let broken = |reason: &str| Broken {
        seq,
        reason: reason.to_string(),
    };
    let s = Stored::decode(v).map_err(|_| broken("its stored bytes do not decode"))?;
    let hash = |b: &[u8]| -> std::result::Result<Hash, Broken> {
        b.try_into()
            .map_err(|_| broken(&format!("a hash is not {HASH_LEN} bytes")))
    };
    Ok(Record {
        seq,
        at: UnixNanos(s.at),
        kind: Kind::from_number(s.kind).ok_or_else(|| broken("unknown kind"))?,
        identity: s.identity,
        detail: s.detail,
        prev: hash(&s.prev)?,
        hash: hash(&s.hash)?,
    })
}

fn corrupt(seq: u64, reason: &str) -> Error {
    Error::Corrupt {
        tree: "audit",
        key: seq.to_string(),
        source: super::DecodeError::Payload(format!(
            "{reason}; check the trail with `chainsight audit verify --data-dir <dir>`"
        )),
    }
}
