//! Outboxes: per upstream link, the events stored here that the link has
//! not yet acknowledged. Entries are added by the writer in the same
//! commit as their event and removed only after the upstream node has
//! acknowledged them (it acknowledges after its own flush), so a crash on
//! either side at worst causes a resend, which the receiver deduplicates.
//!
//! Tree `outboxes/<link>`: first seq (u64) of a run → [`RUN_FORMAT`] ‖
//! enqueue time (UnixNanos, i64) ‖ span (u32) ‖ a bitmap of the span's
//! numbers (bit `i` of byte `i / 8`, least significant first: `first + i`
//! is queued). A commit's new events are numbered consecutively, so a
//! commit queues one run per link: one sled write however many events,
//! and an acknowledged batch rewrites or removes the few runs it covers.
//! (Stores written before kept `outbox/<link>`: seq → enqueue time, one
//! key per event, an insert and a remove per event and link; [`open`]
//! moves such a tree into runs.) Runs never overlap: each covers exactly
//! `first ..= first + span - 1`, and only numbers no run covers start a
//! new one.
//!
//! A run is read, changed and written back under its outbox's `edit`
//! lock (acknowledgements on the runtime's threads, erasure on the
//! writer's); only the writer adds runs.

use std::sync::atomic::Ordering;

use super::{decode_event, DecodeError, Error, Outbox, Result, Seq, Store};
use crate::domain::{PreferenceEvent, UnixNanos};

/// The first byte of a run's value.
const RUN_FORMAT: u8 = 1;
/// Bytes before a run's bitmap.
const RUN_HEAD: usize = 1 + 8 + 4;
/// The most numbers one run spans (a bitmap of 1 KiB).
pub(super) const MAX_RUN_SPAN: u64 = 8192;

/// The tree of `link`'s outbox.
pub(super) fn tree_name(link: &str) -> String {
    format!("outboxes/{link}")
}

/// The tree stores before runs kept `link`'s outbox in.
fn old_tree_name(link: &str) -> String {
    format!("outbox/{link}")
}

/// Whether `name` is an outbox tree (of either form).
pub(super) fn is_outbox_tree(name: &[u8]) -> bool {
    name.starts_with(b"outboxes/") || name.starts_with(b"outbox/")
}

/// Opens `link`'s outbox, moving a tree of the old form into runs.
pub(super) fn open(db: &sled::Db, link: &str) -> Result<Outbox> {
    let tree = super::gate::create_tree(db, tree_name(link))?;
    let outbox = Outbox {
        link: link.to_string(),
        tree,
        len: 0.into(),
        added: Default::default(),
        edit: Default::default(),
    };
    let old = old_tree_name(link);
    if db.tree_names().iter().any(|n| n.as_ref() == old.as_bytes()) {
        migrate(db, &outbox, &old)?;
    }
    let mut len = 0;
    for item in outbox.tree.iter() {
        let (k, v) = item?;
        len += Run::decode(&k, &v)?.count();
    }
    outbox.len.store(len, Ordering::SeqCst);
    Ok(outbox)
}

/// Moves the one-key-per-event tree `old` into `outbox`'s runs, then drops
/// it. Interrupted, it is done again at the next open: adding numbers
/// already in runs changes nothing.
fn migrate(db: &sled::Db, outbox: &Outbox, old: &str) -> Result<()> {
    let tree = db.open_tree(old)?;
    let mut moved = 0u64;
    let mut group: Vec<Seq> = Vec::new();
    let mut group_at = 0i64;
    for item in tree.iter() {
        let (k, v) = item?;
        let seq = super::seq_from(&k, "outbox", "?")?;
        let at = <[u8; 8]>::try_from(v.as_ref()).map_or(0, i64::from_be_bytes);
        if group.is_empty() {
            group_at = at;
        }
        group.push(seq);
        if group.len() >= MAX_RUN_SPAN as usize {
            moved += outbox.add_seqs(&group, group_at)?;
            group.clear();
        }
    }
    if !group.is_empty() {
        moved += outbox.add_seqs(&group, group_at)?;
    }
    drop(tree);
    super::flush_blocking(db)?;
    super::gate::drop_tree(db, old)?;
    tracing::info!(link = %outbox.link, entries = moved, "moved the outbox into runs (one key per commit)");
    Ok(())
}

/// One run of an outbox: which numbers of `first ..= last()` are queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) first: Seq,
    pub(super) queued_at: i64,
    span: u32,
    bits: Vec<u8>,
}

impl Run {
    /// A run of `span` numbers from `first`, none queued yet.
    fn empty(first: Seq, span: u64, queued_at: i64) -> Run {
        let span = span.clamp(1, MAX_RUN_SPAN) as u32;
        Run {
            first,
            queued_at,
            span,
            bits: vec![0; (span as usize).div_ceil(8)],
        }
    }

    pub(super) fn decode(key: &[u8], value: &[u8]) -> Result<Run> {
        let first = super::seq_from(key, "outboxes", "?")?;
        let corrupt = |source| Error::Corrupt {
            tree: "outboxes",
            key: first.to_string(),
            source,
        };
        if value.len() < RUN_HEAD {
            return Err(corrupt(DecodeError::TooShort(value.len())));
        }
        if value[0] != RUN_FORMAT {
            return Err(corrupt(DecodeError::Format(value[0])));
        }
        let queued_at = i64::from_be_bytes(value[1..9].try_into().expect("8 bytes"));
        let span = u32::from_be_bytes(value[9..13].try_into().expect("4 bytes"));
        let bits = &value[RUN_HEAD..];
        if span == 0 || u64::from(span) > MAX_RUN_SPAN || bits.len() != (span as usize).div_ceil(8)
        {
            return Err(corrupt(DecodeError::Payload(format!(
                "a run of span {span} with a bitmap of {} bytes",
                bits.len()
            ))));
        }
        let spare = bits.len() * 8 - span as usize;
        if spare > 0 && bits.last().is_some_and(|b| b >> (8 - spare) != 0) {
            return Err(corrupt(DecodeError::Payload(format!(
                "a run of span {span} with numbers queued past its end"
            ))));
        }
        Ok(Run {
            first,
            queued_at,
            span,
            bits: bits.to_vec(),
        })
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RUN_HEAD + self.bits.len());
        v.push(RUN_FORMAT);
        v.extend_from_slice(&self.queued_at.to_be_bytes());
        v.extend_from_slice(&self.span.to_be_bytes());
        v.extend_from_slice(&self.bits);
        v
    }

    pub(super) fn last(&self) -> Seq {
        self.first + u64::from(self.span) - 1
    }

    pub(super) fn covers(&self, seq: Seq) -> bool {
        seq >= self.first && seq <= self.last()
    }

    fn bit(&self, seq: Seq) -> (usize, u8) {
        let i = (seq - self.first) as usize;
        (i / 8, 1 << (i % 8))
    }

    /// Queues `seq` (which the run covers); whether it was not queued.
    fn set(&mut self, seq: Seq) -> bool {
        let (byte, mask) = self.bit(seq);
        let was = self.bits[byte] & mask != 0;
        self.bits[byte] |= mask;
        !was
    }

    /// Ends the run at its last queued number (a run of none keeps one).
    fn trim(&mut self) {
        let last = self.seqs().last().unwrap_or(self.first);
        self.span = (last - self.first + 1) as u32;
        self.bits.truncate((self.span as usize).div_ceil(8));
        let spare = self.bits.len() * 8 - self.span as usize;
        if let Some(b) = self.bits.last_mut() {
            *b &= 0xff >> spare;
        }
    }

    /// Takes `seq` out; whether it was queued.
    fn clear(&mut self, seq: Seq) -> bool {
        if !self.covers(seq) {
            return false;
        }
        let (byte, mask) = self.bit(seq);
        let was = self.bits[byte] & mask != 0;
        self.bits[byte] &= !mask;
        was
    }

    pub(super) fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The queued numbers, in order.
    pub(super) fn seqs(&self) -> impl Iterator<Item = Seq> + '_ {
        self.bits.iter().enumerate().flat_map(move |(i, &b)| {
            (0..8)
                .filter(move |j| b & (1 << j) != 0)
                .map(move |j| self.first + (i * 8 + j) as u64)
        })
    }
}

/// `seqs` (ascending, none in a run yet, none above the next run's start)
/// as runs of at most [`MAX_RUN_SPAN`] numbers, queued at `queued_at`: the
/// writer's entries for one commit and link.
pub(super) fn runs_of(seqs: &[Seq], queued_at: i64) -> Vec<(Seq, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = seqs;
    while let Some(&first) = rest.first() {
        let n = rest
            .iter()
            .position(|&s| s - first >= MAX_RUN_SPAN)
            .unwrap_or(rest.len());
        let (these, later) = rest.split_at(n);
        let last = *these.last().expect("at least the first");
        let mut run = Run::empty(first, last - first + 1, queued_at);
        for &s in these {
            run.set(s);
        }
        out.push((first, run.encode()));
        rest = later;
    }
    out
}

/// How many numbers the runs of `tree` queue.
#[cfg(test)]
pub(super) fn entries(tree: &sled::Tree) -> usize {
    tree.iter()
        .map(|item| {
            let (k, v) = item.expect("read");
            Run::decode(&k, &v).expect("a run").count() as usize
        })
        .sum()
}

/// Every number the runs of `tree` queue, in order, checking that no two
/// runs overlap.
#[cfg(test)]
pub(super) fn queued_checked(tree: &sled::Tree) -> Vec<Seq> {
    let runs: Vec<Run> = tree
        .iter()
        .map(|item| {
            let (k, v) = item.expect("read");
            Run::decode(&k, &v).expect("a run")
        })
        .collect();
    for pair in runs.windows(2) {
        assert!(pair[0].last() < pair[1].first, "runs overlap: {pair:?}");
    }
    runs.iter()
        .flat_map(|r| r.seqs().collect::<Vec<_>>())
        .collect()
}

/// Changes to an outbox tree: key → new value, or removal.
pub(super) type RunChanges = Vec<(Seq, Option<Vec<u8>>)>;

impl Outbox {
    /// The run that covers `seq`, if any.
    fn run_at(&self, seq: Seq) -> Result<Option<Run>> {
        match self.tree.range(..=seq.to_be_bytes()).next_back() {
            Some(item) => {
                let (k, v) = item?;
                let run = Run::decode(&k, &v)?;
                Ok(run.covers(seq).then_some(run))
            }
            None => Ok(None),
        }
    }

    /// What taking `seqs` out changes (runs rewritten or removed), and how
    /// many of them were queued. The caller holds `edit` until the
    /// changes are applied.
    pub(super) fn removals(&self, seqs: &[Seq]) -> Result<(RunChanges, u64)> {
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut changes = Vec::new();
        let mut removed = 0;
        let mut current: Option<(Run, bool)> = None;
        let done = |(run, changed): (Run, bool), changes: &mut RunChanges| {
            if changed {
                let value = (run.count() > 0).then(|| run.encode());
                changes.push((run.first, value));
            }
        };
        for seq in sorted {
            if !current.as_ref().is_some_and(|(run, _)| run.covers(seq)) {
                if let Some(cur) = current.take() {
                    done(cur, &mut changes);
                }
                current = self.run_at(seq)?.map(|run| (run, false));
            }
            if let Some((run, changed)) = current.as_mut() {
                if run.clear(seq) {
                    removed += 1;
                    *changed = true;
                }
            }
        }
        if let Some(cur) = current.take() {
            done(cur, &mut changes);
        }
        Ok((changes, removed))
    }

    /// Applies `changes` in one sled batch.
    fn apply(&self, changes: RunChanges) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (first, value) in changes {
            match value {
                Some(v) => batch.insert(&first.to_be_bytes(), v),
                None => batch.remove(&first.to_be_bytes()),
            }
        }
        Ok(super::gate::apply_batch(&self.tree, batch)?)
    }

    /// Counts `n` entries off the backlog (never below zero).
    pub(super) fn count_off(&self, n: u64) {
        let _ = self
            .len
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |len| {
                Some(len.saturating_sub(n))
            });
    }

    /// Takes `seqs` out (any order; numbers not queued are skipped) and
    /// counts them off; how many were queued.
    pub(super) fn remove_seqs(&self, seqs: &[Seq]) -> Result<u64> {
        let _edit = self.edit.lock();
        let (changes, removed) = self.removals(seqs)?;
        self.apply(changes)?;
        self.count_off(removed);
        Ok(removed)
    }

    /// Takes out every number from `first` on, and ends the run that
    /// covers it before it: numbers given out again after a repair (see
    /// `super::repair_tail`) start new runs, which must not fall inside an
    /// old one. How many were queued.
    pub(super) fn truncate_from(&self, first: Seq) -> Result<u64> {
        let _edit = self.edit.lock();
        let mut changes = Vec::new();
        let mut removed = 0;
        if let Some(mut run) = self.run_at(first)?.filter(|run| run.first < first) {
            let cut: Vec<Seq> = run.seqs().filter(|&s| s >= first).collect();
            for s in &cut {
                run.clear(*s);
            }
            removed += cut.len() as u64;
            run.trim();
            changes.push((run.first, (run.count() > 0).then(|| run.encode())));
        }
        for item in self.tree.range(first.to_be_bytes()..) {
            let (k, v) = item?;
            let run = Run::decode(&k, &v)?;
            removed += run.count();
            changes.push((run.first, None));
        }
        self.apply(changes)?;
        self.count_off(removed);
        Ok(removed)
    }

    /// Queues `seqs` (ascending) wherever they fall: into the runs that
    /// cover them, the others into new runs that end before the next run
    /// starts. Counts them on; how many were not queued before. For the
    /// open (the event log's replay, an old tree's move), not the writer's
    /// commits.
    pub(super) fn add_seqs(&self, seqs: &[Seq], queued_at: i64) -> Result<u64> {
        let _edit = self.edit.lock();
        let mut changes: std::collections::BTreeMap<Seq, Run> = Default::default();
        let mut new = std::collections::BTreeSet::new();
        let mut added = 0;
        for &seq in seqs {
            let covering = changes
                .range(..=seq)
                .next_back()
                .filter(|(_, run)| run.covers(seq))
                .map(|(k, _)| *k);
            let key = match covering {
                Some(k) => k,
                None => match self.run_at(seq)? {
                    Some(run) => {
                        let k = run.first;
                        changes.insert(k, run);
                        k
                    }
                    None => {
                        // Up to the next run (stored or new), at most the
                        // longest span.
                        let next_stored = self
                            .tree
                            .range((seq + 1).to_be_bytes()..)
                            .next()
                            .transpose()?
                            .map(|(k, _)| super::seq_from(&k, "outboxes", "?"))
                            .transpose()?;
                        let next_new = changes.range(seq + 1..).next().map(|(k, _)| *k);
                        let bound = [next_stored, next_new]
                            .into_iter()
                            .flatten()
                            .min()
                            .unwrap_or(Seq::MAX);
                        let span = (bound - seq).min(MAX_RUN_SPAN);
                        changes.insert(seq, Run::empty(seq, span, queued_at));
                        new.insert(seq);
                        seq
                    }
                },
            };
            if changes.get_mut(&key).expect("just found").set(seq) {
                added += 1;
            }
        }
        // A new run ends at its last number: one reaching past the
        // numbers given out could overlap the writer's next run.
        for key in new {
            if let Some(run) = changes.get_mut(&key) {
                run.trim();
            }
        }
        self.apply(
            changes
                .into_values()
                .map(|run| (run.first, Some(run.encode())))
                .collect(),
        )?;
        self.len.fetch_add(added, Ordering::SeqCst);
        Ok(added)
    }
}

/// A queued event, read for sending.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: Seq,
    pub event: PreferenceEvent,
    /// Size of the stored record, to bound batches by bytes.
    pub bytes: usize,
}

impl Store {
    fn outbox(&self, link: usize) -> &Outbox {
        &self.inner.trees.outboxes[link]
    }

    /// Up to `max_events` queued events of `link` after `after`, together at
    /// most `max_bytes` (at least one event is returned if any is queued).
    pub fn outbox_batch(
        &self,
        link: usize,
        after: Seq,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Queued>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut gone = Vec::new();
        let start = after.saturating_add(1);
        // Only what is flushed here is forwarded.
        let durable = self.durable_seq();
        let outbox = self.outbox(link);
        // From the run that covers `start`, if one does.
        let from = outbox.run_at(start)?.map_or(start, |run| run.first);
        'runs: for item in outbox.tree.range(from.to_be_bytes()..) {
            let (k, v) = item?;
            let run = Run::decode(&k, &v)?;
            for seq in run.seqs().filter(|&s| s >= start) {
                if seq > durable {
                    break 'runs;
                }
                let raw = match super::slots::get(&self.inner.trees.events, seq)? {
                    Some(value) => self
                        .inner
                        .trees
                        .record_live(seq, &value)?
                        .map(|r| r.into_owned()),
                    None => None,
                };
                let Some(raw) = raw else {
                    // The event is gone (removed by retention before it
                    // could be forwarded): nothing to send, but say so.
                    tracing::warn!(
                        link,
                        seq,
                        "an event past retention was dropped from the outbox before it was forwarded"
                    );
                    gone.push(seq);
                    continue;
                };
                if !out.is_empty() && (out.len() >= max_events || bytes + raw.len() > max_bytes) {
                    break 'runs;
                }
                bytes += raw.len();
                out.push(Queued {
                    seq,
                    event: decode_event(seq, &raw)?,
                    bytes: raw.len(),
                });
            }
        }
        self.outbox_ack(link, &gone)?;
        Ok(out)
    }

    /// Removes acknowledged entries from `link`'s outbox (an entry may be
    /// acknowledged twice: only what was there is counted). Not flushed:
    /// if the removal is lost in a crash, the entries are sent again and
    /// the receiver answers them as duplicates.
    pub fn outbox_ack(&self, link: usize, seqs: &[Seq]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.outbox(link).remove_seqs(seqs).map(drop)
    }

    /// Events waiting in `link`'s outbox (an answered commit's count once
    /// its sled writes are done: [`Store::applied`]).
    pub fn outbox_len(&self, link: usize) -> u64 {
        self.outbox(link).len.load(Ordering::SeqCst)
    }

    /// When the oldest waiting entry of `link` was queued.
    pub fn outbox_oldest(&self, link: usize) -> Result<Option<UnixNanos>> {
        match self.outbox(link).tree.first()? {
            None => Ok(None),
            Some((k, v)) => Ok(Some(UnixNanos(Run::decode(&k, &v)?.queued_at))),
        }
    }

    /// Resolves when entries were added to `link`'s outbox since the last call
    /// (a wake-up is never lost: one that comes first is remembered).
    pub async fn outbox_added(&self, link: usize) {
        self.outbox(link).added.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEvent;

    fn seqs_of(value: &[u8], first: Seq) -> Vec<Seq> {
        Run::decode(&first.to_be_bytes(), value)
            .expect("a run")
            .seqs()
            .collect()
    }

    #[test]
    fn a_commit_is_one_run_and_long_or_sparse_ones_split() {
        let runs = runs_of(&[7, 8, 9, 11], 42);
        assert_eq!(runs.len(), 1);
        let (first, value) = &runs[0];
        assert_eq!(*first, 7);
        let run = Run::decode(&first.to_be_bytes(), value).expect("a run");
        assert_eq!(
            (run.first, run.last(), run.count(), run.queued_at),
            (7, 11, 4, 42)
        );
        assert_eq!(seqs_of(value, 7), [7, 8, 9, 11]);
        assert!(!run.covers(6) && run.covers(10) && !run.covers(12));

        let long: Vec<Seq> = (100..100 + MAX_RUN_SPAN + 5).collect();
        let runs = runs_of(&long, 0);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].0, 100 + MAX_RUN_SPAN);
        let back: Vec<Seq> = runs.iter().flat_map(|(f, v)| seqs_of(v, *f)).collect();
        assert_eq!(back, long);
        assert!(runs_of(&[], 0).is_empty());
    }

    #[test]
    fn damaged_runs_are_refused() {
        let (_, good) = runs_of(&[1, 2, 3], 0).remove(0);
        let key = 1u64.to_be_bytes();
        assert!(Run::decode(&key, &good[..RUN_HEAD - 1]).is_err(), "short");
        let mut other = good.clone();
        other[0] = 9;
        assert!(Run::decode(&key, &other).is_err(), "unknown format");
        let mut longer = good.clone();
        longer.push(0);
        assert!(
            Run::decode(&key, &longer).is_err(),
            "bitmap and span disagree"
        );
        assert!(Run::decode(&key[..4], &good).is_err(), "short key");
        let mut past_end = good.clone();
        *past_end.last_mut().expect("a bitmap") |= 0x80;
        assert!(Run::decode(&key, &past_end).is_err(), "a bit past the span");
    }

    fn event(i: usize, routed: bool) -> NewEvent {
        let mut ev = PreferenceEvent::example();
        ev.event_id = format!("e-{i}");
        ev.occurred_at = UnixNanos(ev.occurred_at.0 + i as i64);
        NewEvent {
            outboxes: if routed { vec![0] } else { vec![] },
            ..NewEvent::local(ev)
        }
    }

    fn queued(store: &Store, after: Seq, max: usize) -> Vec<Seq> {
        store
            .outbox_batch(0, after, max, usize::MAX)
            .expect("batch")
            .into_iter()
            .map(|q| q.seq)
            .collect()
    }

    /// Commits of 5, 4 (one not routed) and 6 events: seqs 1–5, 6–9 (8
    /// not queued), 10–15.
    async fn three_commits(dir: &std::path::Path) -> Store {
        let store = Store::open(dir, &["up".to_string()]).expect("open");
        let mut i = 0;
        for n in [5, 4, 6] {
            let events = (0..n)
                .map(|_| {
                    i += 1;
                    event(i, i != 8)
                })
                .collect();
            store.append(events).await.expect("append");
        }
        store
    }

    #[tokio::test]
    async fn batches_follow_the_runs_and_acknowledgements_take_them_apart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = three_commits(dir.path()).await;
        let tree = &store.inner.trees.outboxes[0].tree;
        assert_eq!(tree.len(), 3, "one run per commit");
        assert_eq!(store.outbox_len(0), 14);
        let all: Vec<Seq> = (1..=15).filter(|&s| s != 8).collect();
        assert_eq!(queued(&store, 0, 100), all);
        // From inside a run, and across runs, bounded.
        assert_eq!(queued(&store, 3, 4), [4, 5, 6, 7]);
        assert_eq!(queued(&store, 7, 3), [9, 10, 11]);
        assert_eq!(queued(&store, 15, 10), Vec::<Seq>::new());
        assert!(store.outbox_oldest(0).expect("oldest").is_some());

        // Part of a run, a whole run, and numbers not queued (8, twice 4,
        // 99): only what was queued is counted off.
        store
            .outbox_ack(0, &[4, 1, 4, 8, 6, 7, 9, 99])
            .expect("ack");
        assert_eq!(store.outbox_len(0), 9);
        assert_eq!(queued(&store, 0, 100), [2, 3, 5, 10, 11, 12, 13, 14, 15]);
        assert_eq!(tree.len(), 2, "the emptied run is gone");
        store.outbox_ack(0, &[2, 3, 5]).expect("ack");
        assert_eq!(tree.len(), 1);
        assert_eq!(entries(tree), 6);
        store.close().await.expect("close");
        drop(store);

        // Reopened: the count is the runs'.
        let store = crate::store::retry_open(|| Store::open(dir.path(), &["up".to_string()]));
        assert_eq!(store.outbox_len(0), 6);
        assert_eq!(queued(&store, 0, 100), [10, 11, 12, 13, 14, 15]);
        store.outbox_ack(0, &[10, 11, 12, 13, 14, 15]).expect("ack");
        assert_eq!(store.outbox_len(0), 0);
        assert!(store.outbox_oldest(0).expect("oldest").is_none());
        assert!(store.inner.trees.outboxes[0].tree.is_empty());
    }

    #[tokio::test]
    async fn numbers_added_at_open_join_their_runs_and_never_overlap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = three_commits(dir.path()).await;
        let outbox = &store.inner.trees.outboxes[0];
        store.outbox_ack(0, &[2, 3, 12]).expect("ack");
        // Back into their runs (2, 3, 12), already there (5), and new
        // numbers above everything (20, 21, 30): one new run, ending at
        // its last number.
        let added = outbox.add_seqs(&[2, 3, 5, 12, 20, 21, 30], 7).expect("add");
        assert_eq!(added, 6);
        assert_eq!(store.outbox_len(0), 14 - 3 + 6);
        let runs: Vec<Run> = outbox
            .tree
            .iter()
            .map(|item| {
                let (k, v) = item.expect("read");
                Run::decode(&k, &v).expect("a run")
            })
            .collect();
        assert_eq!(runs.len(), 4);
        for pair in runs.windows(2) {
            assert!(pair[0].last() < pair[1].first, "{pair:?} overlap");
        }
        assert_eq!((runs[3].first, runs[3].last()), (20, 30));
        let mut expected: Vec<Seq> = (1..=15).filter(|&s| s != 8).collect();
        expected.extend([20, 21, 30]);
        let all: Vec<Seq> = runs
            .iter()
            .flat_map(|r| r.seqs().collect::<Vec<_>>())
            .collect();
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn truncating_ends_the_run_that_reaches_there_and_drops_those_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = three_commits(dir.path()).await;
        let outbox = &store.inner.trees.outboxes[0];
        assert_eq!(outbox.truncate_from(8).expect("truncate"), 7, "9 to 15");
        assert_eq!(store.outbox_len(0), 7);
        assert_eq!(queued_checked(&outbox.tree), [1, 2, 3, 4, 5, 6, 7]);
        let run = outbox.run_at(6).expect("read").expect("a run");
        assert_eq!((run.first, run.last()), (6, 7), "ends at its last number");
        assert_eq!(outbox.truncate_from(100).expect("truncate"), 0);
        store.close().await.expect("close");
        drop(store);

        // Runs above the high-water mark (as a repair leaves them when the
        // store was opened without the link) are taken out at open.
        {
            let db = crate::store::retry_open(|| sled::open(dir.path()));
            let tree = db.open_tree(tree_name("up")).expect("tree");
            for (first, run) in runs_of(&[16, 17, 20], 0) {
                tree.insert(first.to_be_bytes(), run).expect("insert");
            }
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = crate::store::retry_open(|| Store::open(dir.path(), &["up".to_string()]));
        assert_eq!(store.outbox_len(0), 7);
        let outbox = &store.inner.trees.outboxes[0];
        assert_eq!(queued_checked(&outbox.tree), [1, 2, 3, 4, 5, 6, 7]);
    }

    #[tokio::test]
    async fn an_outbox_of_one_key_per_event_is_moved_into_runs_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["up".to_string()];
        let store = three_commits(dir.path()).await;
        store.outbox_ack(0, &[1, 2]).expect("ack");
        let expected: Vec<Seq> = queued(&store, 0, 100);
        store.close().await.expect("close");
        drop(store);
        {
            // Rewritten in the old form: seq → enqueue time.
            let db = crate::store::retry_open(|| sled::open(dir.path()));
            crate::store::gate::drop_tree(&db, tree_name("up")).expect("drop");
            let old = db.open_tree(old_tree_name("up")).expect("tree");
            for seq in &expected {
                old.insert(seq.to_be_bytes(), &5i64.to_be_bytes())
                    .expect("insert");
            }
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = crate::store::retry_open(|| Store::open(dir.path(), &links));
        assert_eq!(store.outbox_len(0), expected.len() as u64);
        assert_eq!(queued(&store, 0, 100), expected);
        assert_eq!(store.outbox_oldest(0).expect("oldest"), Some(UnixNanos(5)));
        let names = store.inner.db.tree_names();
        assert!(!names
            .iter()
            .any(|n| n.as_ref() == old_tree_name("up").as_bytes()));
        let verified = store.verify(|_| {}).expect("verify");
        assert!(verified.problems.is_empty(), "{:?}", verified.problems);
        assert_eq!(verified.outbox_entries, expected.len() as u64);
    }
}
