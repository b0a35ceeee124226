//! The time index (tree `time_blocks`): when each stored event occurred, in
//! blocks of one day and one bucket of 256 sequence numbers.
//!
//! Key: the day (days since the epoch, UTC; i64 with the sign bit flipped,
//! so earlier days sort first) ‖ the first sequence number of the bucket
//! (u64), both big-endian. Value: one entry of 9 bytes per event of that day
//! in that bucket, in sequence order: the number's offset in the bucket
//! (u8) and `occurred_at` (i64, big-endian).
//!
//! It replaced `by_time` (occurred_at ‖ seq → (), one key per event; stores
//! holding one are converted at open, see [`convert`]). A sled key costs
//! its insert, its share of a leaf and of every flush whatever its size,
//! and events that occurred anywhere in a month put theirs all over the
//! tree: a commit of 400 such events wrote 400 keys into 400 leaves. Now it
//! reads and writes one block per day it touches (a throw-away sled program
//! with 4M such events in commits of 400: 18.6 µs per event one key per
//! event, 1.7 µs in blocks, a sixth of the disk). A block's key follows
//! from the event's time and number alone, so writing an entry again
//! (replay after a crash, conversion cut short) replaces it: no commit
//! boundary has to be known or kept.
//!
//! Reading a time range reads the blocks of every day it touches and sorts
//! each day's entries by (occurred_at, seq).

use std::collections::{BTreeMap, BTreeSet};

use super::{gate, DecodeError, Error, Result, Seq};

/// The tree's name.
pub(super) const TREE: &str = "time_blocks";
/// The tree it replaced (one key per event).
pub(super) const OLD_TREE: &str = "by_time";

const BUCKET_BITS: u32 = 8;
const BUCKET_MASK: Seq = (1 << BUCKET_BITS) - 1;
const ENTRY_BYTES: usize = 9;
const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// A block's key.
pub(super) type Key = [u8; 16];

/// One event's place in the index. Orders by time, then number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Entry {
    pub at: i64,
    pub seq: Seq,
}

impl Entry {
    pub fn new(at: i64, seq: Seq) -> Entry {
        Entry { at, seq }
    }

    pub(super) fn key(self) -> Key {
        key(day_of(self.at), self.seq & !BUCKET_MASK)
    }
}

/// A change to one block: its new value, or `None` to remove it.
pub(super) type Change = (Key, Option<Vec<u8>>);

fn day_of(at: i64) -> i64 {
    at.div_euclid(NANOS_PER_DAY)
}

/// A signed and an unsigned number as one key that sorts as the pair: the
/// sign bit flipped, both big-endian. A block's key is (day, first number);
/// the old tree's was (occurred_at, seq) in the same form.
fn key(signed: i64, unsigned: Seq) -> Key {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&((signed as u64) ^ (1 << 63)).to_be_bytes());
    k[8..].copy_from_slice(&unsigned.to_be_bytes());
    k
}

/// The pair of [`key`].
fn unkey(k: &Key) -> (i64, Seq) {
    let signed = (u64::from_be_bytes(k[..8].try_into().expect("8 bytes")) ^ (1 << 63)) as i64;
    (
        signed,
        Seq::from_be_bytes(k[8..].try_into().expect("8 bytes")),
    )
}

/// An entry's key in the old tree ([`OLD_TREE`]).
#[cfg(test)]
pub(super) fn old_key(e: Entry) -> Key {
    key(e.at, e.seq)
}

fn corrupt(key: &[u8], source: DecodeError) -> Error {
    Error::Corrupt {
        tree: TREE,
        key: format!("{key:02x?}"),
        source,
    }
}

/// The day and the bucket's first number of a key.
fn split(k: &[u8]) -> Result<(i64, Seq)> {
    let k: &Key = k
        .try_into()
        .map_err(|_| corrupt(k, DecodeError::TooShort(k.len())))?;
    Ok(unkey(k))
}

/// The entries of a block, in the order stored (by number).
pub(super) fn decode(k: &[u8], value: &[u8]) -> Result<Vec<Entry>> {
    let (_, first) = split(k)?;
    if !value.len().is_multiple_of(ENTRY_BYTES) {
        return Err(corrupt(
            k,
            DecodeError::Payload(format!(
                "a time block of {} bytes, not a multiple of {ENTRY_BYTES}",
                value.len()
            )),
        ));
    }
    Ok(value
        .chunks_exact(ENTRY_BYTES)
        .map(|c| Entry {
            seq: first + Seq::from(c[0]),
            at: i64::from_be_bytes(c[1..].try_into().expect("8 bytes")),
        })
        .collect())
}

/// A block's value; `entries` are sorted by number, all in one bucket.
fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_BYTES);
    for e in entries {
        out.push((e.seq & BUCKET_MASK) as u8);
        out.extend_from_slice(&e.at.to_be_bytes());
    }
    out
}

fn grouped(entries: impl IntoIterator<Item = Entry>) -> BTreeMap<Key, Vec<Entry>> {
    let mut blocks: BTreeMap<Key, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        blocks.entry(e.key()).or_default().push(e);
    }
    blocks
}

fn stored(tree: &sled::Tree, k: &Key) -> Result<Vec<Entry>> {
    match tree.get(k)? {
        Some(v) => decode(k, &v),
        None => Ok(Vec::new()),
    }
}

/// The blocks that hold `entries` besides what `tree` holds: an entry of a
/// number a block already holds replaces it.
pub(super) fn added(
    tree: &sled::Tree,
    entries: impl IntoIterator<Item = Entry>,
) -> Result<Vec<(Key, Vec<u8>)>> {
    let mut out = Vec::new();
    for (k, new) in grouped(entries) {
        let mut all = stored(tree, &k)?;
        // The new ones first: the stable sort keeps them first among
        // entries of one number, and the dedup keeps the first.
        all.splice(0..0, new);
        all.sort_by_key(|e| e.seq);
        all.dedup_by_key(|e| e.seq);
        out.push((k, encode(&all)));
    }
    Ok(out)
}

/// The changes that take `entries` (found by time and number) out of
/// `tree`'s blocks. Entries it does not hold are ignored.
pub(super) fn removed(
    tree: &sled::Tree,
    entries: impl IntoIterator<Item = Entry>,
) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for (k, gone) in grouped(entries) {
        let gone: BTreeSet<Seq> = gone.iter().map(|e| e.seq).collect();
        out.extend(without(k, stored(tree, &k)?, |e| gone.contains(&e.seq)));
    }
    Ok(out)
}

/// The change that takes the entries `gone` accepts out of block `k`
/// holding `all`; `None` if it takes none.
fn without(k: Key, all: Vec<Entry>, gone: impl Fn(&Entry) -> bool) -> Option<Change> {
    let before = all.len();
    let kept: Vec<Entry> = all.into_iter().filter(|e| !gone(e)).collect();
    (kept.len() < before).then(|| (k, (!kept.is_empty()).then(|| encode(&kept))))
}

/// The changes that take the entries of `seqs` out of `tree`, whenever they
/// occurred: for numbers whose events are gone (a commit rolled back), so
/// every block of their buckets is read.
pub(super) fn removed_seqs(tree: &sled::Tree, seqs: &BTreeSet<Seq>) -> Result<Vec<Change>> {
    let buckets: BTreeSet<Seq> = seqs.iter().map(|s| s & !BUCKET_MASK).collect();
    let mut out = Vec::new();
    for item in tree.iter() {
        let (k, v) = item?;
        let (_, first) = split(&k)?;
        if !buckets.contains(&first) {
            continue;
        }
        let all = decode(&k, &v)?;
        let k: Key = k.as_ref().try_into().expect("checked by split");
        out.extend(without(k, all, |e| seqs.contains(&e.seq)));
    }
    Ok(out)
}

/// The entries of the events that occurred before `before`, oldest days
/// first, whole blocks until there are at least `limit` (or none is left);
/// and the changes that take them out.
pub(super) fn oldest(
    tree: &sled::Tree,
    before: i64,
    limit: usize,
) -> Result<(Vec<Entry>, Vec<Change>)> {
    let mut victims = Vec::new();
    let mut changes = Vec::new();
    if before == i64::MIN {
        return Ok((victims, changes));
    }
    let end = key(day_of(before - 1) + 1, 0);
    for item in tree.range(..end) {
        if victims.len() >= limit {
            break;
        }
        let (k, v) = item?;
        let all = decode(&k, &v)?;
        let (gone, kept): (Vec<Entry>, Vec<Entry>) = all.into_iter().partition(|e| e.at < before);
        if gone.is_empty() {
            continue;
        }
        victims.extend(gone);
        let k: Key = k.as_ref().try_into().expect("checked by decode");
        changes.push((k, (!kept.is_empty()).then(|| encode(&kept))));
    }
    Ok((victims, changes))
}

/// Applies `changes` to `tree`, one insert or removal each.
pub(super) fn apply(tree: &sled::Tree, changes: &[Change]) -> Result<()> {
    for (k, v) in changes {
        match v {
            Some(v) => tree.insert(k, v.as_slice())?,
            None => tree.remove(k)?,
        };
    }
    Ok(())
}

/// As [`apply`], in a transaction.
pub(super) fn apply_in(
    tx: &sled::transaction::TransactionalTree,
    changes: &[Change],
) -> std::result::Result<(), sled::transaction::UnabortableTransactionError> {
    for (k, v) in changes {
        match v {
            Some(v) => tx.insert(k, v.as_slice())?,
            None => tx.remove(k)?,
        };
    }
    Ok(())
}

/// The entries of the events that occurred in `[from, to)`, in time order.
pub(super) fn scan(tree: &sled::Tree, from: i64, to: i64) -> Scan {
    let blocks = (from < to).then(|| {
        let start = key(day_of(from), 0);
        let end = key(day_of(to - 1) + 1, 0);
        tree.range(start..end)
    });
    Scan {
        blocks,
        from,
        to,
        next: None,
        day: Vec::new(),
        ready: Vec::new().into_iter(),
    }
}

/// See [`scan`]: reads a day's blocks at a time.
pub(super) struct Scan {
    blocks: Option<sled::Iter>,
    from: i64,
    to: i64,
    /// A block read ahead: the first of the next day.
    next: Option<(sled::IVec, sled::IVec)>,
    day: Vec<Entry>,
    ready: std::vec::IntoIter<Entry>,
}

impl Scan {
    /// Reads the next day's blocks into `ready`; false at the end.
    fn fill(&mut self) -> Result<bool> {
        let Some(blocks) = self.blocks.as_mut() else {
            return Ok(false);
        };
        self.day.clear();
        let mut current = None;
        loop {
            let (k, v) = match self.next.take() {
                Some(kv) => kv,
                None => match blocks.next() {
                    Some(item) => item?,
                    None => {
                        self.blocks = None;
                        break;
                    }
                },
            };
            let (day, _) = split(&k)?;
            if current.is_some_and(|d| d != day) {
                self.next = Some((k, v));
                break;
            }
            current = Some(day);
            let (from, to) = (self.from, self.to);
            self.day.extend(
                decode(&k, &v)?
                    .into_iter()
                    .filter(|e| (from..to).contains(&e.at)),
            );
        }
        self.day.sort_unstable();
        self.ready = std::mem::take(&mut self.day).into_iter();
        Ok(current.is_some())
    }
}

impl Iterator for Scan {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            if let Some(e) = self.ready.next() {
                return Some(Ok(e));
            }
            match self.fill() {
                Ok(true) => continue,
                Ok(false) => return None,
                Err(e) => {
                    self.blocks = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// How many entries `tree` holds.
#[cfg(test)]
pub(super) fn count(tree: &sled::Tree) -> Result<usize> {
    let mut n = 0;
    for item in tree.iter() {
        let (k, v) = item?;
        n += decode(&k, &v)?.len();
    }
    Ok(n)
}

/// Converts the index of a store written before the blocks (tree
/// [`OLD_TREE`], one key per event) into `tree`'s blocks, then drops the old
/// tree. Cut short, it runs again at the next open and writes the same
/// blocks. Returns how many entries it converted.
pub(super) fn convert(db: &sled::Db, tree: &sled::Tree) -> Result<usize> {
    if !db.tree_names().iter().any(|n| n == OLD_TREE.as_bytes()) {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    let old = db.open_tree(OLD_TREE)?;
    let mut n = 0;
    let mut chunk: Vec<Entry> = Vec::new();
    let write = |chunk: &mut Vec<Entry>| -> Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in added(tree, chunk.drain(..))? {
            batch.insert(&k, v);
        }
        gate::apply_batch(tree, batch)?;
        Ok(())
    };
    for item in old.iter() {
        let (k, _) = item?;
        let k: [u8; 16] = k.as_ref().try_into().map_err(|_| Error::Corrupt {
            tree: OLD_TREE,
            key: format!("{k:02x?}"),
            source: DecodeError::TooShort(k.len()),
        })?;
        let (at, seq) = unkey(&k);
        chunk.push(Entry { at, seq });
        n += 1;
        if chunk.len() >= 65_536 {
            write(&mut chunk)?;
        }
    }
    write(&mut chunk)?;
    super::flush_blocking(db)?;
    gate::drop_tree(db, OLD_TREE)?;
    super::flush_blocking(db)?;
    tracing::info!(
        events = n,
        elapsed = ?started.elapsed(),
        "converted the time index into blocks (one key per day and 256 sequence numbers)"
    );
    Ok(n)
}

/// Adds one event's entry (tests that write a store as a crash leaves it).
#[cfg(test)]
pub(super) fn insert(tree: &sled::Tree, at: i64, seq: Seq) -> Result<()> {
    for (k, v) in added(tree, [Entry::new(at, seq)])? {
        tree.insert(k, v)?;
    }
    Ok(())
}

/// Takes one event's entry out (as [`insert`]).
#[cfg(test)]
pub(super) fn remove(tree: &sled::Tree, at: i64, seq: Seq) -> Result<()> {
    apply(tree, &removed(tree, [Entry::new(at, seq)])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Db, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("open");
        let tree = db.open_tree(TREE).expect("tree");
        (dir, db, tree)
    }

    const HOUR: i64 = 3_600 * 1_000_000_000;

    fn put(tree: &sled::Tree, entries: &[Entry]) {
        for (k, v) in added(tree, entries.iter().copied()).expect("added") {
            tree.insert(k, v).expect("insert");
        }
    }

    fn all(tree: &sled::Tree) -> Vec<Entry> {
        scan(tree, i64::MIN, i64::MAX)
            .collect::<Result<_>>()
            .expect("scan")
    }

    /// Entries over several days, buckets and both signs of time, in the
    /// order the writer would add them (by number).
    fn sample() -> Vec<Entry> {
        (1..=2_000u64)
            .map(|seq| {
                let at = (seq as i64 * 7_919 % 97 - 48) * 3 * HOUR + seq as i64;
                Entry::new(at, seq)
            })
            .collect()
    }

    #[test]
    fn a_scan_returns_the_entries_of_its_range_in_time_order() {
        let (_dir, _db, tree) = tree();
        let entries = sample();
        for commit in entries.chunks(37) {
            put(&tree, commit);
        }
        let mut sorted = entries.clone();
        sorted.sort();
        assert_eq!(all(&tree), sorted);
        for (from, to) in [
            (-10 * HOUR, 5 * HOUR + 3),
            (HOUR, HOUR + 1),
            (-HOUR * 24 * 30, -HOUR * 24 * 2 + 17),
            (7, 7),
            (9, 3),
        ] {
            let want: Vec<Entry> = sorted
                .iter()
                .copied()
                .filter(|e| (from..to).contains(&e.at))
                .collect();
            let got: Vec<Entry> = scan(&tree, from, to).collect::<Result<_>>().expect("scan");
            assert_eq!(got, want, "[{from}, {to})");
        }
        assert_eq!(count(&tree).unwrap(), entries.len());
        assert!(
            tree.len() < entries.len() / 4,
            "{} blocks for {} entries",
            tree.len(),
            entries.len()
        );
    }

    #[test]
    fn adding_an_entry_again_replaces_it() {
        let (_dir, _db, tree) = tree();
        let entries = sample();
        put(&tree, &entries);
        // A replay writes a commit's entries again, grouped otherwise.
        put(&tree, &entries[100..700]);
        put(&tree, &entries[650..660]);
        assert_eq!(count(&tree).unwrap(), entries.len());
        let mut sorted = entries.clone();
        sorted.sort();
        assert_eq!(all(&tree), sorted);
    }

    #[test]
    fn removals_take_out_exactly_their_entries() {
        let (_dir, _db, tree) = tree();
        let entries = sample();
        put(&tree, &entries);
        let gone: Vec<Entry> = entries.iter().copied().step_by(3).collect();
        apply(&tree, &removed(&tree, gone.iter().copied()).unwrap()).unwrap();
        // Entries not held change nothing.
        assert!(removed(&tree, gone.iter().copied()).unwrap().is_empty());
        let mut kept: Vec<Entry> = entries
            .iter()
            .copied()
            .filter(|e| !gone.contains(e))
            .collect();
        kept.sort();
        assert_eq!(all(&tree), kept);
        // By number alone, wherever they are.
        let seqs: BTreeSet<Seq> = kept.iter().map(|e| e.seq).filter(|s| s % 5 == 0).collect();
        apply(&tree, &removed_seqs(&tree, &seqs).unwrap()).unwrap();
        kept.retain(|e| !seqs.contains(&e.seq));
        assert_eq!(all(&tree), kept);
        // Everything gone: no block is left.
        apply(&tree, &removed(&tree, kept.iter().copied()).unwrap()).unwrap();
        assert!(tree.is_empty());
    }

    #[test]
    fn the_oldest_entries_go_in_whole_blocks_and_only_before_the_cut() {
        let (_dir, _db, tree) = tree();
        let entries = sample();
        put(&tree, &entries);
        let mut sorted = entries.clone();
        sorted.sort();
        // A cut inside a day.
        let before = 5 * HOUR + 2;
        let mut left = sorted.clone();
        let mut rounds = 0;
        loop {
            let (victims, changes) = oldest(&tree, before, 50).unwrap();
            if victims.is_empty() {
                assert!(changes.is_empty());
                break;
            }
            assert!(victims.len() >= 50 || oldest(&tree, before, usize::MAX).unwrap().0 == victims);
            assert!(victims.iter().all(|e| e.at < before));
            apply(&tree, &changes).unwrap();
            left.retain(|e| !victims.contains(e));
            assert_eq!(all(&tree), left);
            rounds += 1;
        }
        assert!(rounds > 1);
        let want: Vec<Entry> = sorted.into_iter().filter(|e| e.at >= before).collect();
        assert_eq!(all(&tree), want);
        assert!(oldest(&tree, i64::MIN, 10).unwrap().0.is_empty());
    }

    #[test]
    fn a_damaged_block_is_reported_as_corrupt() {
        let (_dir, _db, tree) = tree();
        tree.insert(key(3, 256), &[1u8; 10]).unwrap();
        let err = scan(&tree, i64::MIN, i64::MAX).find_map(|r| r.err());
        assert!(
            matches!(err, Some(Error::Corrupt { tree: TREE, .. })),
            "{err:?}"
        );
        assert!(count(&tree).is_err());
    }

    #[test]
    fn the_old_index_is_converted_once_and_dropped() {
        let (_dir, db, tree) = tree();
        let entries = sample();
        let old = db.open_tree(OLD_TREE).unwrap();
        for e in &entries {
            old.insert(old_key(*e), &[]).unwrap();
        }
        // As if a conversion was cut short after its first blocks.
        put(&tree, &entries[..300]);
        assert_eq!(convert(&db, &tree).unwrap(), entries.len());
        assert!(!db.tree_names().iter().any(|n| n == OLD_TREE.as_bytes()));
        let mut sorted = entries.clone();
        sorted.sort();
        assert_eq!(all(&tree), sorted);
        assert_eq!(convert(&db, &tree).unwrap(), 0);
    }
}
