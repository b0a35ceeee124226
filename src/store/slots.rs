//! The `events` tree: where each stored event's record is.
//!
//! A commit writes **one key** for its new events (consecutive sequence
//! numbers): the first sequence number (u64, big-endian) → format byte
//! [`RUN_FORMAT`], then per sequence number of the run a slot of
//! [`SLOT`] bytes, the [`Location`] of its frame in the event log, or all
//! zeros once the event is gone (erasure, retention, the repair of an
//! interrupted commit). A run with no event left goes.
//!
//! Older stores have one key per event (seq → a `Location`, or before the
//! log the record itself); both forms are read, side by side, and never
//! overlap: a run covers only numbers no other key holds.
//!
//! One key per commit instead of one per event: `bench growth` at 1M
//! stored events measured the per-event key at about 12 % of ingest (each
//! sled key costs an insert that copies its leaf, and memory and disk per
//! key). A read of one event finds its run with one reverse range step.

use std::collections::{BTreeMap, VecDeque};

use super::log::{Location, LOCATION_FORMAT};
use super::{Error, Result, Seq};

/// The first byte of a run's value (a `Location` starts with
/// [`LOCATION_FORMAT`], an inline record with its own format byte, 1).
pub(super) const RUN_FORMAT: u8 = 3;
/// Bytes of a slot: an encoded [`Location`].
pub(super) const SLOT: usize = 21;
/// Most sequence numbers in one run (a larger commit writes several): an
/// erasure rewrites a whole run to empty one slot. A run's value is then
/// at most 5.4 KB, so that a leaf of sled (up to 16 keys before it
/// splits) stays under its blob threshold (128 KiB, a quarter of a
/// segment): a larger leaf is written to a file of its own at every
/// consolidation, split and segment cleaning. With 1024 (21.5 KB runs),
/// most of the 6,000 blob files of a store grown to 10M events were
/// `events` leaves, and writing them took a fifth of the writer's time.
pub(super) const MAX_RUN: usize = 256;

/// An event's entry as stored: its own value, or its slot in a run.
#[derive(Debug, Clone)]
pub(super) enum Stored {
    /// A key of its own: an inline record or a `Location` (older stores,
    /// and tests that write one).
    Whole(sled::IVec),
    /// Its slot in a commit's run: a `Location`.
    Slot([u8; SLOT]),
}

impl std::ops::Deref for Stored {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Stored::Whole(v) => v,
            Stored::Slot(s) => s,
        }
    }
}

/// The runs to write for new events at consecutive (or not) sequence
/// numbers, ascending: one per stretch of consecutive numbers, at most
/// [`MAX_RUN`] long.
pub(super) fn runs(events: &[(Seq, Location)]) -> Vec<(Seq, Vec<u8>)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let mut end = start + 1;
        while end < events.len() && end - start < MAX_RUN && events[end].0 == events[end - 1].0 + 1
        {
            end += 1;
        }
        let mut value = Vec::with_capacity(1 + SLOT * (end - start));
        value.push(RUN_FORMAT);
        for (_, at) in &events[start..end] {
            value.extend_from_slice(&at.encode());
        }
        out.push((events[start].0, value));
        start = end;
    }
    out
}

fn corrupt(first: Seq, reason: String) -> Error {
    Error::Corrupt {
        tree: "events",
        key: first.to_string(),
        source: super::DecodeError::Payload(reason),
    }
}

/// The slots of a run's value (`None`: not a run).
fn run_slots(first: Seq, value: &[u8]) -> Result<Option<&[u8]>> {
    match value.split_first() {
        Some((&RUN_FORMAT, rest)) if !rest.is_empty() && rest.len() % SLOT == 0 => Ok(Some(rest)),
        Some((&RUN_FORMAT, rest)) => Err(corrupt(first, format!("a run of {} bytes", rest.len()))),
        _ => Ok(None),
    }
}

/// The first sequence number an entry holds and how many numbers it spans
/// (removed slots included).
pub(super) fn span(key: &[u8], value: &[u8]) -> Result<(Seq, u64)> {
    let first = super::seq_from(key, "events", "?")?;
    Ok(match run_slots(first, value)? {
        Some(slots) => (first, (slots.len() / SLOT) as u64),
        None => (first, 1),
    })
}

/// The events an entry holds, in order (removed slots left out).
pub(super) fn expand(key: &[u8], value: &sled::IVec) -> Result<Vec<(Seq, Stored)>> {
    let first = super::seq_from(key, "events", "?")?;
    let Some(slots) = run_slots(first, value)? else {
        return Ok(vec![(first, Stored::Whole(value.clone()))]);
    };
    let mut out = Vec::with_capacity(slots.len() / SLOT);
    for (i, slot) in slots.chunks_exact(SLOT).enumerate() {
        match slot[0] {
            0 => {}
            LOCATION_FORMAT => out.push((
                first + i as u64,
                Stored::Slot(slot.try_into().expect("SLOT bytes")),
            )),
            other => {
                return Err(corrupt(
                    first,
                    format!("slot {i} has format {other}, not a location"),
                ))
            }
        }
    }
    Ok(out)
}

/// The entry whose numbers include `seq`, if any: its key and value.
fn covering(tree: &sled::Tree, seq: Seq) -> Result<Option<(Seq, sled::IVec)>> {
    let Some(item) = tree.range(..=seq.to_be_bytes()).next_back() else {
        return Ok(None);
    };
    let (k, v) = item?;
    let (first, len) = span(&k, &v)?;
    Ok((seq < first + len).then_some((first, v)))
}

/// The stored entry of the event `seq`.
pub(super) fn get(tree: &sled::Tree, seq: Seq) -> Result<Option<Stored>> {
    let Some((first, value)) = covering(tree, seq)? else {
        return Ok(None);
    };
    let Some(slots) = run_slots(first, &value)? else {
        return Ok(Some(Stored::Whole(value)));
    };
    let at = (seq - first) as usize * SLOT;
    let slot: [u8; SLOT] = slots[at..at + SLOT].try_into().expect("SLOT bytes");
    Ok((slot[0] != 0).then_some(Stored::Slot(slot)))
}

/// Whether the event `seq` is stored.
pub(super) fn contains(tree: &sled::Tree, seq: Seq) -> Result<bool> {
    Ok(get(tree, seq)?.is_some())
}

/// The stored events with `from <= seq <= to`, in order.
pub(super) fn range(tree: &sled::Tree, from: Seq, to: Seq) -> Range {
    let start = match covering(tree, from) {
        Ok(Some((first, _))) => first,
        Ok(None) => from,
        Err(e) => {
            return Range {
                inner: None,
                ready: VecDeque::new(),
                failed: Some(e),
                from,
                to,
            }
        }
    };
    Range {
        inner: (from <= to).then(|| tree.range(start.to_be_bytes()..=to.to_be_bytes())),
        ready: VecDeque::new(),
        failed: None,
        from,
        to,
    }
}

/// See [`range`].
pub(super) struct Range {
    inner: Option<sled::Iter>,
    ready: VecDeque<(Seq, Stored)>,
    failed: Option<Error>,
    from: Seq,
    to: Seq,
}

impl Iterator for Range {
    type Item = Result<(Seq, Stored)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            self.inner = None;
            return Some(Err(e));
        }
        loop {
            if let Some(entry) = self.ready.pop_front() {
                return Some(Ok(entry));
            }
            let item = self.inner.as_mut()?.next()?;
            let expanded = item.map_err(Error::from).and_then(|(k, v)| expand(&k, &v));
            match expanded {
                Ok(events) => self.ready.extend(
                    events
                        .into_iter()
                        .filter(|(seq, _)| (self.from..=self.to).contains(seq)),
                ),
                Err(e) => {
                    self.inner = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Every stored event, newest first.
pub(super) fn rev(tree: &sled::Tree) -> impl Iterator<Item = Result<(Seq, Stored)>> {
    tree.iter().rev().flat_map(|item| {
        let expanded = item.map_err(Error::from).and_then(|(k, v)| expand(&k, &v));
        let events: Vec<Result<(Seq, Stored)>> = match expanded {
            Ok(events) => events.into_iter().rev().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        events
    })
}

/// The oldest stored event's number.
pub(super) fn first(tree: &sled::Tree) -> Result<Option<Seq>> {
    range(tree, 0, Seq::MAX)
        .next()
        .transpose()
        .map(|e| e.map(|(seq, _)| seq))
}

/// The highest number an entry spans (0 if none): removed slots at a
/// run's end were used too.
pub(super) fn end(tree: &sled::Tree) -> Result<Seq> {
    match tree.last()? {
        None => Ok(0),
        Some((k, v)) => {
            let (first, len) = span(&k, &v)?;
            Ok(first + len - 1)
        }
    }
}

/// How many events are stored.
pub(super) fn count(tree: &sled::Tree) -> Result<usize> {
    let mut n = 0;
    for item in tree.iter() {
        let (k, v) = item?;
        let first = super::seq_from(&k, "events", "?")?;
        n += match run_slots(first, &v)? {
            Some(slots) => slots.chunks_exact(SLOT).filter(|s| s[0] != 0).count(),
            None => 1,
        };
    }
    Ok(n)
}

/// A key's new value, or `None`: remove the key.
pub(super) type Rewrite = (Seq, Option<Vec<u8>>);

/// The rewrites that remove the events `seqs`: a key of its own goes, a
/// run's slot is zeroed (the run goes when nothing is left in it).
/// Numbers not stored are skipped. Apply them with [`apply`] or, in the
/// transaction that removes the events' other entries, [`apply_in`].
pub(super) fn removals(
    tree: &sled::Tree,
    seqs: impl IntoIterator<Item = Seq>,
) -> Result<Vec<Rewrite>> {
    edits(tree, seqs.into_iter().map(|seq| (seq, None)))
}

/// The rewrites that point the events of `moves` to their new locations
/// (events moved out of a block of the log that is zeroed). Numbers not
/// stored are skipped.
pub(super) fn moved(tree: &sled::Tree, moves: &[(Seq, Location)]) -> Result<Vec<Rewrite>> {
    edits(tree, moves.iter().map(|(seq, at)| (*seq, Some(*at))))
}

/// Per event, its new location, or `None`: removed.
fn edits(
    tree: &sled::Tree,
    changes: impl IntoIterator<Item = (Seq, Option<Location>)>,
) -> Result<Vec<Rewrite>> {
    // Per key touched: its slots, or for a key of its own its new value.
    enum Touched {
        Run(Vec<u8>),
        Own(Option<Vec<u8>>),
    }
    let mut touched: BTreeMap<Seq, Touched> = BTreeMap::new();
    for (seq, change) in changes {
        let known = touched
            .range(..=seq)
            .next_back()
            .filter(|(first, t)| match t {
                Touched::Run(slots) => seq < **first + (slots.len() / SLOT) as u64,
                Touched::Own(_) => seq == **first,
            })
            .map(|(first, _)| *first);
        let first = match known {
            Some(first) => first,
            None => {
                let Some((first, value)) = covering(tree, seq)? else {
                    continue;
                };
                let t = match run_slots(first, &value)? {
                    Some(slots) => Touched::Run(slots.to_vec()),
                    None => Touched::Own(Some(value.to_vec())),
                };
                touched.entry(first).or_insert(t);
                first
            }
        };
        match touched.get_mut(&first).expect("just found") {
            Touched::Run(slots) => {
                let at = (seq - first) as usize * SLOT;
                let slot = &mut slots[at..at + SLOT];
                match change {
                    // A removed slot stays removed.
                    Some(to) if slot[0] != 0 => slot.copy_from_slice(&to.encode()),
                    Some(_) => {}
                    None => slot.fill(0),
                }
            }
            Touched::Own(value) => {
                *value = match change {
                    Some(to) => value.as_ref().map(|_| to.encode().to_vec()),
                    None => None,
                }
            }
        }
    }
    Ok(touched
        .into_iter()
        .map(|(first, t)| {
            let value = match t {
                Touched::Run(s) => s.iter().any(|b| *b != 0).then(|| {
                    let mut value = Vec::with_capacity(1 + s.len());
                    value.push(RUN_FORMAT);
                    value.extend_from_slice(&s);
                    value
                }),
                Touched::Own(value) => value,
            };
            (first, value)
        })
        .collect())
}

/// The rewrites that leave no entry at `from` or after (a run reaching
/// past it is shortened): for the end of the store, where the event log's
/// replay writes everything from `from` on again.
pub(super) fn truncated(tree: &sled::Tree, from: Seq) -> Result<Vec<Rewrite>> {
    let mut out = Vec::new();
    if let Some(item) = tree.range(..from.to_be_bytes()).next_back() {
        let (k, v) = item?;
        let (first, len) = span(&k, &v)?;
        if first + len > from {
            let slots = run_slots(first, &v)?.expect("only a run spans several numbers");
            let kept = &slots[..(from - first) as usize * SLOT];
            let value = kept.iter().any(|b| *b != 0).then(|| {
                let mut value = Vec::with_capacity(1 + kept.len());
                value.push(RUN_FORMAT);
                value.extend_from_slice(kept);
                value
            });
            out.push((first, value));
        }
    }
    for item in tree.range(from.to_be_bytes()..) {
        let (k, _) = item?;
        out.push((super::seq_from(&k, "events", "?")?, None));
    }
    Ok(out)
}

/// Writes rewrites (of this tree's or of `customer_runs`, which keeps
/// the same kind of runs) outside a transaction.
pub(super) fn apply(tree: &sled::Tree, rewrites: &[Rewrite]) -> Result<()> {
    for (first, value) in rewrites {
        match value {
            Some(v) => tree.insert(first.to_be_bytes(), v.as_slice())?,
            None => tree.remove(first.to_be_bytes())?,
        };
    }
    Ok(())
}

/// Writes rewrites in a transaction (the one that removes the events).
pub(super) fn apply_in(
    tx: &sled::transaction::TransactionalTree,
    rewrites: &[Rewrite],
) -> std::result::Result<(), sled::transaction::UnabortableTransactionError> {
    for (first, value) in rewrites {
        match value {
            Some(v) => tx.insert(&first.to_be_bytes(), v.as_slice())?,
            None => tx.remove(&first.to_be_bytes())?,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(i: u64) -> Location {
        Location {
            segment: 1,
            offset: 100 * i,
            len: 100,
            entry: 0,
        }
    }

    fn tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().expect("db");
        db.open_tree("events").expect("tree")
    }

    /// Writes the runs of `events` as a commit does.
    fn write_runs(tree: &sled::Tree, events: &[(Seq, Location)]) {
        for (first, value) in runs(events) {
            tree.insert(first.to_be_bytes(), value).expect("insert");
        }
    }

    fn seqs(tree: &sled::Tree, from: Seq, to: Seq) -> Vec<Seq> {
        range(tree, from, to).map(|e| e.expect("read").0).collect()
    }

    #[test]
    fn runs_split_at_gaps_and_at_the_longest_run() {
        let events: Vec<(Seq, Location)> = (1..=3).chain(5..=6).map(|s| (s, at(s))).collect();
        let r = runs(&events);
        assert_eq!(r.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!(r[0].1.len(), 1 + 3 * SLOT);
        let long: Vec<(Seq, Location)> = (1..=MAX_RUN as u64 + 1).map(|s| (s, at(s))).collect();
        let r = runs(&long);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, MAX_RUN as u64 + 1);
    }

    #[test]
    fn reads_find_every_event_of_runs_and_of_keys_of_their_own() {
        let t = tree();
        // An older store's keys of their own, then two commits' runs.
        t.insert(1u64.to_be_bytes(), &at(1).encode()).unwrap();
        t.insert(2u64.to_be_bytes(), b"\x01inline record".as_slice())
            .unwrap();
        let events: Vec<(Seq, Location)> = (3..=6).chain(9..=10).map(|s| (s, at(s))).collect();
        write_runs(&t, &events);
        assert_eq!(seqs(&t, 0, Seq::MAX), vec![1, 2, 3, 4, 5, 6, 9, 10]);
        assert_eq!(seqs(&t, 4, 9), vec![4, 5, 6, 9]);
        assert_eq!(seqs(&t, 5, 5), vec![5]);
        assert!(seqs(&t, 7, 8).is_empty());
        assert_eq!(&*get(&t, 5).unwrap().unwrap(), at(5).encode().as_slice());
        assert_eq!(&*get(&t, 2).unwrap().unwrap(), b"\x01inline record");
        assert!(get(&t, 7).unwrap().is_none() && get(&t, 11).unwrap().is_none());
        assert_eq!(first(&t).unwrap(), Some(1));
        assert_eq!(end(&t).unwrap(), 10);
        assert_eq!(count(&t).unwrap(), 8);
        let newest: Vec<Seq> = rev(&t).map(|e| e.unwrap().0).collect();
        assert_eq!(newest, vec![10, 9, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn removals_zero_slots_and_drop_what_is_left_empty() {
        let t = tree();
        t.insert(1u64.to_be_bytes(), &at(1).encode()).unwrap();
        let events: Vec<(Seq, Location)> = (2..=4).chain(6..=7).map(|s| (s, at(s))).collect();
        write_runs(&t, &events);
        // 5 and 8 are not stored: skipped.
        let r = removals(&t, [1, 3, 5, 6, 7, 8]).unwrap();
        assert_eq!(
            r.iter().map(|(s, v)| (*s, v.is_some())).collect::<Vec<_>>(),
            vec![(1, false), (2, true), (6, false)]
        );
        apply(&t, &r).unwrap();
        assert_eq!(seqs(&t, 0, Seq::MAX), vec![2, 4]);
        assert!(get(&t, 3).unwrap().is_none());
        // The run keeps its length: the numbers after it stay unused.
        assert_eq!(end(&t).unwrap(), 4);
        assert_eq!(first(&t).unwrap(), Some(2));
        apply(&t, &removals(&t, [2, 4]).unwrap()).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn truncation_leaves_nothing_from_its_number_on() {
        let t = tree();
        let events: Vec<(Seq, Location)> = (1..=5).chain(7..=8).map(|s| (s, at(s))).collect();
        write_runs(&t, &events);
        apply(&t, &truncated(&t, 4).unwrap()).unwrap();
        assert_eq!(seqs(&t, 0, Seq::MAX), vec![1, 2, 3]);
        assert_eq!(end(&t).unwrap(), 3);
        apply(&t, &truncated(&t, 1).unwrap()).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn a_damaged_run_is_reported_not_read_as_events() {
        let t = tree();
        t.insert(1u64.to_be_bytes(), [RUN_FORMAT, 2, 3].as_slice())
            .unwrap();
        assert!(matches!(get(&t, 1), Err(Error::Corrupt { .. })));
        assert!(range(&t, 0, Seq::MAX).next().unwrap().is_err());
    }
}
