//! The audit trail's records and their hash chain.
//!
//! A node appends a [`Record`] for every forward, subscription, query and
//! erasure (the store keeps them in its `audit` tree). Each record's hash
//! covers its fields and the hash of the record before it, so changing,
//! removing or reordering a record breaks the chain from there on;
//! [`verify_chain`] finds where. Appending at the end stays possible for
//! whoever holds the data directory: the head hash that `chainsight audit
//! verify` prints can be recorded elsewhere to pin the chain down.

use sha2::{Digest, Sha256};

use crate::domain::UnixNanos;

/// Bytes of a record hash.
pub const HASH_LEN: usize = 32;

/// A record hash (SHA-256).
pub type Hash = [u8; HASH_LEN];

/// The `prev` of the first record.
pub const GENESIS: Hash = [0; HASH_LEN];

/// Domain separation of the hashed bytes.
const CONTEXT: &[u8] = b"chainsight-audit-v1";

crate::domain::proto_enum!(
    /// What a record is about.
    Kind ("AUDIT_KIND_") {
        Forward = 1 => "forward",
        Subscription = 2 => "subscription",
        Query = 3 => "query",
        Erasure = 4 => "erasure",
        Admin = 5 => "admin",
    }
);

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the trail, from 1, without gaps.
    pub seq: u64,
    pub at: UnixNanos,
    pub kind: Kind,
    /// Who acted: the caller's certificate identity, or for a forward the
    /// upstream link's.
    pub identity: String,
    /// What happened, as a JSON object.
    pub detail: String,
    /// The hash of the record before ([`GENESIS`] for the first).
    pub prev: Hash,
    /// [`Record::digest`] of this record.
    pub hash: Hash,
}

impl Record {
    /// The record that follows `prev` (seq and hash) in the trail, hashed.
    pub fn next(
        prev: (u64, Hash),
        at: UnixNanos,
        kind: Kind,
        identity: String,
        detail: String,
    ) -> Record {
        let mut record = Record {
            seq: prev.0 + 1,
            at,
            kind,
            identity,
            detail,
            prev: prev.1,
            hash: GENESIS,
        };
        record.hash = record.digest();
        record
    }

    /// SHA-256 over the record's fields and `prev`, as the proto documents
    /// (`AuditRecord`): `hash` itself is not covered.
    pub fn digest(&self) -> Hash {
        let mut h = Sha256::new();
        h.update(CONTEXT);
        h.update(self.seq.to_be_bytes());
        h.update(self.at.0.to_be_bytes());
        h.update(self.kind.number().to_be_bytes());
        for s in [&self.identity, &self.detail] {
            h.update(u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
            h.update(s.as_bytes());
        }
        h.update(self.prev);
        h.finalize().into()
    }
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {reason}")]
pub struct Broken {
    /// The first record that does not verify (for a missing record, the
    /// one after the gap).
    pub seq: u64,
    pub reason: String,
}

/// A record as read back: decoded, or (its bytes damaged) broken where
/// it stands.
pub type ReadRecord = Result<Record, Broken>;

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The last record's hash ([`GENESIS`] when empty).
    pub head: Hash,
}

/// Checks a whole trail, oldest first: numbered from 1 without gaps, each
/// record's hash its digest, each `prev` the hash before it. A record that
/// could not be read breaks the chain there; `E` is a failure to read on
/// (the check then has no verdict).
pub fn verify_chain<E>(
    records: impl IntoIterator<Item = Result<ReadRecord, E>>,
) -> Result<Result<Verified, Broken>, E> {
    let mut expected = (0u64, GENESIS);
    for record in records {
        let record = match record? {
            Ok(record) => record,
            Err(unreadable) => return Ok(Err(unreadable)),
        };
        let broken = |reason: &str| Broken {
            seq: record.seq,
            reason: reason.to_string(),
        };
        if record.seq != expected.0 + 1 {
            return Ok(Err(broken(&format!(
                "expected record {} here: records are missing or out of order",
                expected.0 + 1
            ))));
        }
        if record.prev != expected.1 {
            return Ok(Err(broken(
                "its link to the record before does not match that record's hash",
            )));
        }
        if record.hash != record.digest() {
            return Ok(Err(broken("its contents do not match its hash")));
        }
        expected = (record.seq, record.hash);
    }
    Ok(Ok(Verified {
        records: expected.0,
        head: expected.1,
    }))
}

/// A hash in lower-case hex.
pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(n: u64) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        for i in 0..n {
            let prev = out.last().map_or((0, GENESIS), |r| (r.seq, r.hash));
            out.push(Record::next(
                prev,
                UnixNanos(1_700_000_000_000_000_000 + i as i64),
                Kind::Query,
                "analyst-1".into(),
                format!("{{\"rows\":{i}}}"),
            ));
        }
        out
    }

    fn check(records: &[Record]) -> Result<Verified, Broken> {
        verify_chain(records.iter().cloned().map(|r| Ok::<_, ()>(Ok(r)))).expect("no read error")
    }

    #[test]
    fn an_intact_trail_verifies_and_any_change_breaks_it() {
        let records = trail(5);
        let ok = check(&records).expect("intact");
        assert_eq!((ok.records, ok.head), (5, records[4].hash));
        assert_eq!(check(&[]).expect("empty").head, GENESIS);

        let mut changed = records.clone();
        changed[2].detail = "{\"rows\":99}".into();
        assert_eq!(check(&changed).expect_err("changed").seq, 3);

        let mut rehashed = changed.clone();
        rehashed[2].hash = rehashed[2].digest();
        assert_eq!(check(&rehashed).expect_err("rehashed").seq, 4);

        let mut removed = records.clone();
        removed.remove(1);
        assert_eq!(check(&removed).expect_err("removed").seq, 3);

        let mut identity = records.clone();
        identity[0].identity = "analyst-2".into();
        assert_eq!(check(&identity).expect_err("identity").seq, 1);

        let mut kind = records;
        kind[4].kind = Kind::Erasure;
        assert_eq!(check(&kind).expect_err("kind").seq, 5);
    }
}
