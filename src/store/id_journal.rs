//! A generation of the event-id index as a journal: sled holds a commit's
//! ids together, a few KB per key, and memory holds them by id.
//!
//! The index's generations held one sled key per id, written as commits
//! came. A sled insert costs a few µs and splits a leaf every 16 keys:
//! those inserts were about a third of the store writer's time, and the
//! ingest rate rose by a third to a half without them (session 32,
//! `bench ingest`). A journal writes one key per commit (per
//! [`MAX_RECORD_BYTES`] of ids): the next number of the journal, with
//! the commit's ids and values in a record (see [`put_entry`]). A later
//! record's value for an id replaces an earlier one's, as a later insert
//! did. Lookups go to a hash map of the journal's ids, rebuilt from the
//! records when the store opens; the journal is short (a pass packs and
//! drops it after at most a few hundred thousand ids, see
//! [`super::ids`]), so that takes a fraction of a second.
//!
//! Writes and the map change together under the map's write lock: the
//! map never holds an id whose record is not written, and records are
//! numbered in the order their writes were made.

use std::collections::{BTreeMap, HashMap};

use parking_lot::{RwLock, RwLockWriteGuard};
use prost::encoding::{decode_varint, encode_varint, encoded_len_varint};

use super::{gate, DecodeError, Error, Result, Seq};

/// First byte of a record.
const RECORD_V1: u8 = 1;
/// Most bytes of a record's entries: a commit's ids beyond go into
/// further records of the same batch. Small enough for sled's leaves to
/// stay out of its blob files (like `ids::MAX_PACK_BYTES`).
pub(super) const MAX_RECORD_BYTES: usize = 4 << 10;

/// The tree name of generation `n`'s journal.
pub(super) fn name(n: u64) -> String {
    format!("id_journal.{n}")
}

/// The generation a journal's tree name is of, if it is one.
pub(super) fn number_of(name: &[u8]) -> Option<u64> {
    let rest = name.strip_prefix(b"id_journal.")?;
    let n: u64 = std::str::from_utf8(rest).ok()?.parse().ok()?;
    // Only the names this module writes (not "id_journal.01").
    (self::name(n).as_bytes() == name).then_some(n)
}

/// A journal's entries (id, value as stored), in id order, and its
/// records that cannot be read.
pub(super) type Snapshot = (Vec<(Vec<u8>, Vec<u8>)>, Vec<Damaged>);

/// A record that cannot be read: its ids are unknown.
#[derive(Debug, Clone)]
pub(super) struct Damaged {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub why: String,
}

/// One generation's journal: its tree and its ids in memory.
pub(super) struct Journal {
    tree: sled::Tree,
    state: RwLock<State>,
    /// Whether `state.damaged` is not empty: read on every lookup of a new
    /// id (see `ids::Ids::get`), so without the lock.
    any_damaged: std::sync::atomic::AtomicBool,
    /// The ids in id order, moved out of the map when the generation is
    /// frozen (no commit writes into it after that), for a pass to walk
    /// and lookups to binary-search.
    frozen: std::sync::OnceLock<Vec<(Box<[u8]>, Value)>>,
}

/// An id's value in a frozen journal.
enum Value {
    Seq(Seq),
    /// Not a sequence number (see [`State::odd`]).
    Odd(Box<[u8]>),
}

#[derive(Default)]
struct State {
    /// Id → its value as a sequence number (or a tombstone's).
    ids: HashMap<Box<[u8]>, Seq, foldhash::fast::RandomState>,
    /// Ids whose value is not a sequence number: damaged entries a pass
    /// carried from an older generation, kept for verify to report.
    odd: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Records that cannot be read.
    damaged: Vec<Damaged>,
    /// The key of the next record.
    next: u64,
}

impl State {
    fn put(&mut self, id: Box<[u8]>, value: &[u8]) {
        match <[u8; 8]>::try_from(value) {
            Ok(v) => {
                if !self.odd.is_empty() {
                    self.odd.remove(&*id);
                }
                self.ids.insert(id, Seq::from_be_bytes(v));
            }
            Err(_) => {
                self.ids.remove(&id);
                self.odd.insert(id.into_vec(), value.to_vec());
            }
        }
    }

    fn get(&self, id: &[u8]) -> Result<Option<Seq>> {
        if let Some(seq) = self.ids.get(id) {
            return Ok(Some(*seq));
        }
        match self.odd.get(id) {
            None => Ok(None),
            Some(v) => odd(id, v),
        }
    }
}

/// The error a damaged entry's lookup gives.
fn odd(id: &[u8], value: &[u8]) -> Result<Option<Seq>> {
    super::seq_from(value, "by_id", &String::from_utf8_lossy(id)).map(Some)
}

/// Records written (under the journal's lock, which the value holds)
/// but not yet in its map: [`Appending::commit`] puts them there once
/// they are written; dropped without, the journal is as before.
pub(super) struct Appending<'a> {
    state: RwLockWriteGuard<'a, State>,
    records: Vec<([u8; 8], Vec<u8>)>,
    entries: Vec<(Box<[u8]>, Seq)>,
}

impl Appending<'_> {
    /// The records to write: (key, value), in order.
    pub(super) fn records(&self) -> &[([u8; 8], Vec<u8>)] {
        &self.records
    }

    /// The records are written: their ids go into the map.
    pub(super) fn commit(mut self) {
        for (id, seq) in std::mem::take(&mut self.entries) {
            self.state.put(id, &seq.to_be_bytes());
        }
        self.state.next += self.records.len() as u64;
    }
}

impl Journal {
    /// Opens a journal, reading its records into memory (room for
    /// `capacity` ids). A record that cannot be read is logged and kept
    /// for verify to report.
    pub(super) fn open(tree: sled::Tree, capacity: usize) -> Result<Journal> {
        let mut state = State {
            ids: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            ..State::default()
        };
        for item in tree.iter() {
            let (key, value) = item?;
            match decode_record(&key, &value) {
                Ok(entries) => {
                    for (id, v) in entries {
                        state.put(id.into(), v);
                    }
                }
                Err(e) => {
                    tracing::error!(tree = %String::from_utf8_lossy(&tree.name()), key = ?key, error = %e, "a record of the event-id index cannot be read; publishes of ids not found elsewhere are refused until the data directory is restored: stop the node and run `chainsight admin verify`");
                    state.damaged.push(Damaged {
                        key: key.to_vec(),
                        value: value.to_vec(),
                        why: e.to_string(),
                    });
                }
            }
            if let Ok(k) = <[u8; 8]>::try_from(key.as_ref()) {
                state.next = state.next.max(u64::from_be_bytes(k).saturating_add(1));
            }
        }
        Ok(Journal {
            tree,
            any_damaged: (!state.damaged.is_empty()).into(),
            state: RwLock::new(state),
            frozen: std::sync::OnceLock::new(),
        })
    }

    /// Creates generation `n`'s journal (empty, with room for `capacity`
    /// ids: the map does not grow on the writer's thread).
    pub(super) fn create(db: &sled::Db, n: u64, capacity: usize) -> Result<Journal> {
        Journal::open(gate::create_tree(db, name(n))?, capacity)
    }

    /// The journal's tree.
    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Starts writing `entries` (id, value; a later one for the same id
    /// replaces an earlier one): the records to write, numbered. The
    /// journal's lookups wait until the value is committed or dropped.
    pub(super) fn begin<'e>(
        &self,
        entries: impl IntoIterator<Item = (&'e [u8], Seq)>,
    ) -> Appending<'_> {
        let state = self.state.write();
        let mut records = Vec::new();
        let mut owned = Vec::new();
        let mut record: Vec<u8> = Vec::new();
        let mut next = state.next;
        let mut close = |record: &mut Vec<u8>| {
            if !record.is_empty() {
                records.push((next.to_be_bytes(), std::mem::take(record)));
                next += 1;
            }
        };
        for (id, seq) in entries {
            let value = seq.to_be_bytes();
            if record.len() + entry_len(id, &value) > MAX_RECORD_BYTES {
                close(&mut record);
            }
            if record.is_empty() {
                record.push(RECORD_V1);
            }
            put_entry(id, &value, &mut record);
            owned.push((Box::from(id), seq));
        }
        close(&mut record);
        Appending {
            state,
            records,
            entries: owned,
        }
    }

    /// Writes `entries` (one insert, or one sled batch for several
    /// records: all or nothing either way) and adds them to the map.
    pub(super) fn append<'e>(
        &self,
        entries: impl IntoIterator<Item = (&'e [u8], Seq)>,
    ) -> Result<()> {
        let appending = self.begin(entries);
        match appending.records() {
            [] => {}
            [(key, value)] => {
                self.tree.insert(key, value.as_slice())?;
            }
            records => {
                let mut batch = sled::Batch::default();
                for (key, value) in records {
                    batch.insert(key, value.as_slice());
                }
                gate::apply_batch(&self.tree, batch)?;
            }
        }
        appending.commit();
        Ok(())
    }

    /// Writes `value` for `id` unless the journal has the id (a newer
    /// value): a pass's carried entries.
    pub(super) fn insert_absent(&self, id: &[u8], value: &[u8]) -> Result<()> {
        let mut state = self.state.write();
        if state.ids.contains_key(id) || state.odd.contains_key(id) {
            return Ok(());
        }
        let mut record = vec![RECORD_V1];
        put_entry(id, value, &mut record);
        self.tree.insert(state.next.to_be_bytes(), record)?;
        state.put(id.into(), value);
        state.next += 1;
        Ok(())
    }

    /// Writes records that cannot be read, as they are, under new
    /// numbers: a frozen journal's, before a pass drops it, so that
    /// verify still reports them and lookups still refuse what they may
    /// hold.
    pub(super) fn carry_damaged(&self, damaged: &[Damaged]) -> Result<()> {
        let mut state = self.state.write();
        for d in damaged {
            let key = state.next.to_be_bytes();
            self.tree.insert(key, d.value.as_slice())?;
            state.damaged.push(Damaged {
                key: key.to_vec(),
                ..d.clone()
            });
            state.next += 1;
            self.any_damaged
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// The records that cannot be read.
    pub(super) fn damaged(&self) -> Vec<Damaged> {
        self.state.read().damaged.clone()
    }

    /// Whether a record cannot be read (it may hold any id).
    pub(super) fn has_damaged(&self) -> bool {
        self.any_damaged.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `id`'s value among the frozen ids.
    fn frozen_value(&self, id: &[u8]) -> Option<&Value> {
        let frozen = self.frozen.get()?;
        let i = frozen.binary_search_by(|(k, _)| (**k).cmp(id)).ok()?;
        Some(&frozen[i].1)
    }

    /// The value stored for `id`.
    pub(super) fn get(&self, id: &[u8]) -> Result<Option<Seq>> {
        // The lock first: [`Self::freeze`] empties the map and fills the
        // frozen ids under it.
        let state = self.state.read();
        match self.frozen_value(id) {
            Some(Value::Seq(seq)) => Ok(Some(*seq)),
            Some(Value::Odd(v)) => odd(id, v),
            None => state.get(id),
        }
    }

    /// Whether the journal has `id`.
    pub(super) fn contains(&self, id: &[u8]) -> bool {
        let state = self.state.read();
        self.frozen_value(id).is_some() || state.ids.contains_key(id) || state.odd.contains_key(id)
    }

    /// Ids in the journal.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        let state = self.state.read();
        state.ids.len() + state.odd.len() + self.frozen.get().map_or(0, Vec::len)
    }

    /// Moves the ids out of the map into id order (once): for a frozen
    /// generation, which no commit writes into any more. The sorting
    /// (tens of ms for a pass's ids) runs under the read lock, so that the
    /// writer's lookups go on meanwhile; the map is emptied and the sorted
    /// ids set under the write lock, so that a lookup finds each id in one
    /// or the other.
    pub(super) fn freeze(&self) {
        if self.frozen.get().is_some() {
            return;
        }
        let mut all: Vec<(Box<[u8]>, Value)> = {
            let state = self.state.read();
            state
                .ids
                .iter()
                .map(|(id, seq)| (id.clone(), Value::Seq(*seq)))
                .chain(state.odd.iter().map(|(id, v)| {
                    (
                        id.clone().into_boxed_slice(),
                        Value::Odd(v.clone().into_boxed_slice()),
                    )
                }))
                .collect()
        };
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let emptied = {
            let mut state = self.state.write();
            if self.frozen.set(all).is_ok() {
                Some((
                    std::mem::take(&mut state.ids),
                    std::mem::take(&mut state.odd),
                ))
            } else {
                None
            }
        };
        // Freed after the lock.
        drop(emptied);
    }

    /// The entries (id, value as stored: 8 bytes for a sequence number)
    /// after `from`, in id order. Freezes the journal (see
    /// [`Self::freeze`]).
    pub(super) fn entries_after(
        &self,
        from: &std::ops::Bound<Vec<u8>>,
    ) -> impl Iterator<Item = (sled::IVec, sled::IVec)> + '_ {
        use std::ops::Bound;
        self.freeze();
        let frozen = self.frozen.get().map_or(&[][..], Vec::as_slice);
        let start = match from {
            Bound::Unbounded => 0,
            Bound::Excluded(k) => frozen.partition_point(|(id, _)| **id <= *k.as_slice()),
            Bound::Included(k) => frozen.partition_point(|(id, _)| **id < *k.as_slice()),
        };
        frozen[start..].iter().map(|(id, value)| {
            let value = match value {
                Value::Seq(seq) => sled::IVec::from(&seq.to_be_bytes()),
                Value::Odd(v) => sled::IVec::from(&**v),
            };
            (sled::IVec::from(&**id), value)
        })
    }

    /// Every entry now (id, value as stored), in id order, and the
    /// records that cannot be read.
    pub(super) fn snapshot(&self) -> Snapshot {
        let state = self.state.read();
        let mut all: Vec<(Vec<u8>, Vec<u8>)> = state
            .ids
            .iter()
            .map(|(id, seq)| (id.to_vec(), seq.to_be_bytes().to_vec()))
            .chain(state.odd.iter().map(|(id, v)| (id.clone(), v.clone())))
            .chain(self.frozen.get().into_iter().flatten().map(|(id, v)| {
                let v = match v {
                    Value::Seq(seq) => seq.to_be_bytes().to_vec(),
                    Value::Odd(v) => v.to_vec(),
                };
                (id.to_vec(), v)
            }))
            .collect();
        all.sort_unstable();
        (all, state.damaged.clone())
    }
}

fn entry_len(id: &[u8], value: &[u8]) -> usize {
    encoded_len_varint(id.len() as u64)
        + id.len()
        + encoded_len_varint(value.len() as u64)
        + value.len()
}

/// Appends an entry to a record. A record is [`RECORD_V1`], then per
/// entry the id and the value, each behind its length (varint). The value
/// is a sequence number's 8 bytes (big-endian), or what a damaged older
/// entry held.
fn put_entry(id: &[u8], value: &[u8], out: &mut Vec<u8>) {
    encode_varint(id.len() as u64, out);
    out.extend_from_slice(id);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value);
}

/// A record's entries, in order.
fn decode_record<'a>(key: &[u8], value: &'a [u8]) -> Result<Vec<(&'a [u8], &'a [u8])>> {
    let bad = |what: String| Error::Corrupt {
        tree: "id_journal",
        key: format!("{key:?}"),
        source: DecodeError::Payload(what),
    };
    let (&format, mut rest) = value
        .split_first()
        .ok_or_else(|| bad("an empty record".into()))?;
    if format != RECORD_V1 {
        return Err(bad(format!("unknown record format {format}")));
    }
    let mut out = Vec::new();
    let take = |rest: &mut &'a [u8]| -> Result<&'a [u8]> {
        let len = decode_varint(rest).map_err(|e| bad(e.to_string()))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|n| *n <= rest.len())
            .ok_or_else(|| bad(format!("an entry of {len} bytes past the record's end")))?;
        let (part, tail) = rest.split_at(len);
        *rest = tail;
        Ok(part)
    };
    while !rest.is_empty() {
        let id = take(&mut rest)?;
        let v = take(&mut rest)?;
        out.push((id, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> (sled::Db, Journal) {
        let db = crate::store::retry_open(|| sled::Config::new().path(dir).open());
        let tree = db.open_tree(name(3)).expect("tree");
        let journal = Journal::open(tree, 0).expect("journal");
        (db, journal)
    }

    /// What is appended is found, a later value replaces an earlier one,
    /// and a reopen reads the same back from the records, split ones
    /// included.
    #[test]
    fn appends_are_found_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<String> = (0..500).map(|i| format!("{i:036}")).collect();
        {
            let (db, j) = open(dir.path());
            j.append(
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| (id.as_bytes(), i as Seq)),
            )
            .expect("append");
            assert!(j.tree().len() > 1, "500 ids take several records");
            j.append([
                (ids[7].as_bytes(), Seq::MAX),
                (b"x".as_slice(), 1),
                (b"x", 2),
            ])
            .expect("append");
            assert_eq!(j.get(ids[7].as_bytes()).expect("get"), Some(Seq::MAX));
            assert_eq!(j.get(b"x").expect("get"), Some(2));
            // Not written: nothing changes, and the numbers are given again.
            let before = j.tree().len();
            drop(j.begin([(b"y".as_slice(), 9)]));
            assert_eq!(j.get(b"y").expect("get"), None);
            j.insert_absent(b"x", &5u64.to_be_bytes()).expect("insert");
            j.insert_absent(b"z", &[1, 2, 3]).expect("insert");
            assert_eq!(j.tree().len(), before + 1);
            #[allow(clippy::disallowed_methods)] // a test, no runtime
            db.flush().expect("flush");
        }
        let (_db, j) = open(dir.path());
        assert_eq!(j.len(), 502);
        for (i, id) in ids.iter().enumerate() {
            let want = if i == 7 { Seq::MAX } else { i as Seq };
            assert_eq!(j.get(id.as_bytes()).expect("get"), Some(want));
        }
        assert_eq!(j.get(b"x").expect("get"), Some(2));
        assert!(matches!(j.get(b"z"), Err(Error::Corrupt { .. })));
        assert_eq!(j.get(b"y").expect("get"), None);
        let sorted: Vec<Vec<u8>> = j
            .entries_after(&std::ops::Bound::Unbounded)
            .map(|(id, _)| id.to_vec())
            .collect();
        let mut want: Vec<Vec<u8>> = ids.iter().map(|s| s.as_bytes().to_vec()).collect();
        want.extend([b"x".to_vec(), b"z".to_vec()]);
        want.sort();
        assert_eq!(sorted, want);
        // Frozen, the same is found.
        assert_eq!(j.get(ids[7].as_bytes()).expect("get"), Some(Seq::MAX));
        assert_eq!(j.get(ids[8].as_bytes()).expect("get"), Some(8));
        assert_eq!(j.get(b"x").expect("get"), Some(2));
        assert!(matches!(j.get(b"z"), Err(Error::Corrupt { .. })));
        assert_eq!(j.get(b"y").expect("get"), None);
        assert!(j.contains(b"z") && !j.contains(b"y"));
        let after: Vec<Vec<u8>> = j
            .entries_after(&std::ops::Bound::Excluded(ids[498].as_bytes().to_vec()))
            .map(|(id, _)| id.to_vec())
            .collect();
        assert_eq!(after, [ids[499].as_bytes(), b"x", b"z"]);
        assert_eq!(j.snapshot().0.len(), 502);
    }

    /// A record that cannot be read is reported, not a panic, and the
    /// others are read.
    #[test]
    fn a_damaged_record_is_kept_for_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (db, j) = open(dir.path());
            j.append([(b"a".as_slice(), 1)]).expect("append");
            j.tree()
                .insert(5u64.to_be_bytes(), &[RECORD_V1, 9, b'b'])
                .expect("insert");
            #[allow(clippy::disallowed_methods)] // a test, no runtime
            db.flush().expect("flush");
        }
        let (_db, j) = open(dir.path());
        assert_eq!(j.get(b"a").expect("get"), Some(1));
        let (entries, damaged) = j.snapshot();
        assert_eq!(entries.len(), 1);
        assert_eq!(damaged.len(), 1);
        // The next record comes after the damaged one's number.
        j.append([(b"c".as_slice(), 2)]).expect("append");
        assert!(j.tree().contains_key(6u64.to_be_bytes()).expect("read"));
        assert!(decode_record(b"k", &[]).is_err());
        assert!(decode_record(b"k", &[2]).is_err());
        assert_eq!(
            decode_record(b"k", &{
                let mut record = vec![RECORD_V1];
                put_entry(b"i", b"v", &mut record);
                record
            })
            .expect("decodes"),
            [(b"i".as_slice(), b"v".as_slice())]
        );
    }
}
