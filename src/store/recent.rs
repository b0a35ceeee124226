//! The newest stored events, decoded once and encoded as a `Signal` once,
//! shared by every subscription that reads them.
//!
//! Following subscribers read the same newest events at about the same
//! time. Each reading them from sled, decoding, converting and encoding
//! them again took about two thirds of the node's time with 64 of them
//! (`bench fanout`, profiled): the work was the same for every one.
//!
//! The cache holds one contiguous run of sequence numbers: every event
//! stored with `after < seq <= upto` is in it (erasure signals are not:
//! they differ per filter and are read from their own tree). Reads fill
//! it, and while a subscription follows, the store writer continues a run
//! that reaches the newest events with each commit's new events, as long
//! as a read came within [`NEAR`] of them (see [`Recent::wants`]); it
//! grows at its top and is bounded by count, the oldest entries going
//! first, so a subscriber far behind reads from sled without pushing the
//! live run out. Erasure and retention empty it, since they
//! remove events, and while they write nothing is served from it or kept
//! in it; a read that began before such a change never fills it
//! (generation check). So an event removed is never served from it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};

use super::Seq;
use crate::domain::PreferenceEvent;

/// Events kept by default (about 2 KiB each, decoded and encoded).
pub const DEFAULT_CAPACITY: usize = 16_384;

/// A stored event as subscriptions send it.
#[derive(Debug)]
pub struct RecentEvent {
    seq: Seq,
    event: PreferenceEvent,
    signal: Bytes,
}

impl RecentEvent {
    /// `payload`: the event's protobuf encoding as stored (verified).
    pub(super) fn new(seq: Seq, event: PreferenceEvent, payload: &[u8]) -> RecentEvent {
        RecentEvent {
            seq,
            event,
            signal: encode_signal(seq, payload),
        }
    }

    /// `signal`: [`encode_signal`] of the event's stored encoding.
    pub(super) fn with_signal(seq: Seq, event: PreferenceEvent, signal: Bytes) -> RecentEvent {
        RecentEvent { seq, event, signal }
    }

    /// Its sequence number (the signal's cursor).
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The event, decoded (for filters).
    pub fn event(&self) -> &PreferenceEvent {
        &self.event
    }

    /// The encoded `Signal { cursor: seq, event }` (shared, not copied).
    pub fn signal(&self) -> Bytes {
        self.signal.clone()
    }
}

/// `Signal { cursor = 1: seq, event = 2: <payload> }` in protobuf wire
/// form, from the event's stored encoding: what prost would write for the
/// decoded event, without decoding and encoding it again.
pub(super) fn encode_signal(seq: Seq, payload: &[u8]) -> Bytes {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let mut out = BytesMut::with_capacity(
        2 + encoded_len_varint(seq) + encoded_len_varint(payload.len() as u64) + payload.len(),
    );
    if seq != 0 {
        encode_key(1, WireType::Varint, &mut out);
        encode_varint(seq, &mut out);
    }
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(payload.len() as u64, &mut out);
    out.put_slice(payload);
    out.freeze()
}

/// The cache (see the module documentation).
pub(super) struct Recent {
    capacity: usize,
    run: Mutex<Run>,
    /// Following subscriptions open ([`Following`]): while there are any,
    /// the store writer may put each commit's new events in
    /// ([`Self::wants`], [`Self::push`]).
    followers: AtomicUsize,
    /// The furthest any read of the shared events reached (the end of the
    /// range [`super::Store::scan_shared`] answered).
    reached: AtomicU64,
}

/// How far (in sequence numbers) the newest events may run ahead of the
/// furthest read before the writer stops keeping them: a follower that
/// caught up and then stalled makes the cache hold at most this many
/// events nobody read, not its whole capacity.
pub(super) const NEAR: u64 = DEFAULT_CAPACITY as u64 / 4;

/// Counts one following subscription while it lives (see
/// [`Recent::follow`]).
pub struct Following(Arc<Recent>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Run {
    events: BTreeMap<Seq, Arc<RecentEvent>>,
    /// Every event stored with `covered.0 < seq <= covered.1` is in
    /// `events`; `None`: nothing is known.
    covered: Option<(Seq, Seq)>,
    /// Bumped by every change that removes events.
    generation: u64,
    /// Events are being removed: nothing is served or kept until the
    /// removal is written ([`Recent::end_removal`]).
    removing: bool,
}

impl Run {
    /// Drops the oldest events beyond `capacity`.
    fn trim(&mut self, capacity: usize) {
        while self.events.len() > capacity {
            if let Some((seq, _)) = self.events.pop_first() {
                if let Some(covered) = &mut self.covered {
                    covered.0 = covered.0.max(seq);
                }
            }
        }
    }
}

/// What [`Recent::read`] found.
pub(super) struct Found {
    /// The cached events from the read's start on, in order.
    pub events: Vec<Arc<RecentEvent>>,
    /// The read goes on in sled after this sequence number, unless
    /// `complete`.
    pub resume_after: Seq,
    /// Every event of the read came from the cache.
    pub complete: bool,
    /// For [`Recent::fill`].
    pub generation: u64,
}

impl Recent {
    pub(super) fn new(capacity: usize) -> Recent {
        Recent {
            capacity,
            run: Mutex::new(Run::default()),
            followers: AtomicUsize::new(0),
            reached: AtomicU64::new(0),
        }
    }

    /// A read of the shared events answered everything up to `seq`.
    pub(super) fn reached(&self, seq: Seq) {
        self.reached.fetch_max(seq, Ordering::SeqCst);
    }

    /// A following subscription opens: until the guard is dropped, the
    /// writer keeps the newest events here as it commits them, once a
    /// follower caught up (see [`Self::wants`]), so that no follower reads
    /// and decodes them from the store again (the first reader of each
    /// did: with one follower, every event it got).
    pub(super) fn follow(self: &Arc<Self>) -> Following {
        self.followers.fetch_add(1, Ordering::SeqCst);
        Following(self.clone())
    }

    /// Whether [`Self::push`] would keep the events of a commit that
    /// numbers from `first` on: a following subscription is open, a read
    /// reached within [`NEAR`] of `first`, and the cached run ends right
    /// before `first`. The writer does not start a run: a follower that
    /// reached the newest events did, by reading them. So a follower far
    /// behind, a slow one that never caught up, or one that caught up and
    /// then stalled does not make the cache fill up with events nobody
    /// reads.
    pub(super) fn wants(&self, first: Seq) -> bool {
        if self.capacity == 0 || self.followers.load(Ordering::SeqCst) == 0 {
            return false;
        }
        if self.reached.load(Ordering::SeqCst).saturating_add(NEAR) < first.saturating_sub(1) {
            return false;
        }
        let run = self.run();
        !run.removing
            && run
                .covered
                .is_some_and(|(_, to)| to.checked_add(1) == Some(first))
    }

    /// Keeps the new events of a commit that numbered `first..=last` (the
    /// writer, before readers may see them): every event of that range,
    /// in order, if they continue the cached run (see [`Self::wants`]).
    pub(super) fn push(&self, first: Seq, last: Seq, events: &[Arc<RecentEvent>]) {
        if self.capacity == 0 || last < first {
            return;
        }
        let mut run = self.run();
        if run.removing {
            return;
        }
        match run.covered {
            Some((from, to)) if to.checked_add(1) == Some(first) => {
                run.covered = Some((from, last));
            }
            _ => return,
        }
        for e in events {
            run.events.insert(e.seq, e.clone());
        }
        run.trim(self.capacity);
    }

    fn run(&self) -> std::sync::MutexGuard<'_, Run> {
        self.run
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached events with `after < seq <= upto`, at most `limit`, if
    /// the cached run starts at or before `after + 1`.
    pub(super) fn read(&self, after: Seq, upto: Seq, limit: usize) -> Found {
        let run = self.run();
        let mut found = Found {
            events: Vec::new(),
            resume_after: after,
            complete: false,
            generation: run.generation,
        };
        let Some((from, to)) = run.covered.filter(|_| !run.removing) else {
            return found;
        };
        if after < from || after >= to || upto <= after {
            return found;
        }
        let end = upto.min(to);
        found.events.extend(
            run.events
                .range(after + 1..=end)
                .take(limit)
                .map(|(_, e)| e.clone()),
        );
        if found.events.len() == limit {
            found.complete = true;
            found.resume_after = found.events.last().map_or(after, |e| e.seq);
        } else {
            found.complete = end == upto;
            found.resume_after = end;
        }
        found
    }

    /// Keeps `events`: every event stored with `after < seq <= upto`, read
    /// from sled since [`Self::read`] returned `generation`. Kept only if
    /// nothing was removed meanwhile, and only if they continue the cached
    /// run or lie beyond it (older ones are not kept).
    pub(super) fn fill(&self, after: Seq, upto: Seq, events: &[Arc<RecentEvent>], generation: u64) {
        if self.capacity == 0 || upto <= after {
            return;
        }
        let mut run = self.run();
        if run.generation != generation || run.removing {
            return;
        }
        match run.covered {
            Some((from, to)) if from <= after && after <= to => {
                if upto <= to {
                    return;
                }
                for e in events.iter().filter(|e| e.seq > to) {
                    run.events.insert(e.seq, e.clone());
                }
                run.covered = Some((from, upto));
            }
            Some((_, to)) if upto <= to => return,
            _ => {
                run.events = events.iter().map(|e| (e.seq, e.clone())).collect();
                run.covered = Some((after, upto));
            }
        }
        run.trim(self.capacity);
    }

    /// Events are about to be removed: forgets everything, and serves and
    /// keeps nothing until [`Self::end_removal`] (between the two, sled may
    /// or may not hold them still).
    pub(super) fn begin_removal(&self) {
        self.forget(true);
    }

    /// The removal [`Self::begin_removal`] announced is written (or failed).
    /// Reads that began before it fill nothing.
    pub(super) fn end_removal(&self) {
        self.forget(false);
    }

    fn forget(&self, removing: bool) {
        let mut run = self.run();
        run.generation += 1;
        run.removing = removing;
        run.events.clear();
        run.covered = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn ev(seq: Seq) -> Arc<RecentEvent> {
        let mut event = PreferenceEvent::example();
        event.event_id = format!("ev-{seq}");
        event.attributes.insert("colour".into(), "red".into());
        event.attributes.insert("size".into(), "xl".into());
        let payload = crate::conversions::preference_event_to_pb(&event).encode_to_vec();
        Arc::new(RecentEvent::new(seq, event, &payload))
    }

    fn seqs(found: &Found) -> Vec<Seq> {
        found.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn the_signal_is_what_prost_writes_for_the_event() {
        // (As messages: prost writes map entries in its map's order.)
        let e = ev(300);
        let expected = crate::pb::Signal {
            cursor: 300,
            event: Some(crate::conversions::preference_event_to_pb(e.event())),
            erasure: None,
        };
        let decoded = crate::pb::Signal::decode(e.signal()).unwrap();
        assert_eq!(decoded, expected);
        assert_eq!(e.signal().len(), expected.encoded_len());
        assert_eq!(decoded.event.unwrap().event_id, "ev-300");
    }

    #[test]
    fn reads_come_from_the_run_and_go_on_in_sled_where_it_ends() {
        let r = Recent::new(100);
        let f = r.read(0, 10, 512);
        assert!(f.events.is_empty() && !f.complete && f.resume_after == 0);
        // Events 1..=10 stored, 4 and 7 being erasure signals (no event).
        let stored: Vec<_> = [1, 2, 3, 5, 6, 8, 9, 10].into_iter().map(ev).collect();
        r.fill(0, 10, &stored, f.generation);
        let f = r.read(2, 10, 512);
        assert_eq!(seqs(&f), vec![3, 5, 6, 8, 9, 10]);
        assert!(f.complete);
        // Beyond the run: cached part, then sled after 10.
        let f = r.read(5, 14, 512);
        assert_eq!(seqs(&f), vec![6, 8, 9, 10]);
        assert!(!f.complete);
        assert_eq!(f.resume_after, 10);
        // The limit ends a read inside the run.
        let f = r.read(0, 10, 3);
        assert_eq!(seqs(&f), vec![1, 2, 3]);
        assert!(f.complete);
        assert_eq!(f.resume_after, 3);
        // Continuing the run extends it.
        r.fill(10, 12, &[ev(11), ev(12)], f.generation);
        assert_eq!(seqs(&r.read(8, 12, 512)), vec![9, 10, 11, 12]);
        // So does a fill from inside the run to beyond its top.
        r.fill(11, 20, &[ev(12), ev(13), ev(20)], f.generation);
        let f = r.read(0, 20, 512);
        assert!(seqs(&f).len() == 12 && f.complete);
    }

    #[test]
    fn the_run_is_bounded_and_old_reads_do_not_push_it_out() {
        let r = Recent::new(4);
        let g = r.read(0, 0, 1).generation;
        r.fill(100, 108, &(101..=108).map(ev).collect::<Vec<_>>(), g);
        // The oldest went: the run now starts after 104.
        assert_eq!(seqs(&r.read(104, 108, 512)), vec![105, 106, 107, 108]);
        let f = r.read(100, 108, 512);
        assert!(f.events.is_empty() && f.resume_after == 100);
        // A subscriber far behind fills nothing.
        r.fill(10, 20, &(11..=20).map(ev).collect::<Vec<_>>(), g);
        assert_eq!(seqs(&r.read(104, 108, 512)), vec![105, 106, 107, 108]);
        // A read beyond the run (not continuing it) replaces it.
        r.fill(200, 202, &[ev(201), ev(202)], g);
        assert!(r.read(104, 108, 512).events.is_empty());
        assert_eq!(seqs(&r.read(200, 202, 512)), vec![201, 202]);
    }

    #[test]
    fn nothing_is_served_or_kept_across_a_removal() {
        let r = Recent::new(100);
        let g = r.read(0, 3, 512).generation;
        r.fill(0, 3, &[ev(1), ev(2), ev(3)], g);
        // An erasure of event 2 begins: nothing is served from the run...
        let before = r.read(0, 3, 512).generation;
        r.begin_removal();
        let during = r.read(0, 3, 512);
        assert!(during.events.is_empty() && !during.complete);
        // ... nor kept, by a read that began before or during it...
        r.fill(0, 3, &[ev(1), ev(2), ev(3)], before);
        r.fill(0, 3, &[ev(1), ev(2), ev(3)], during.generation);
        assert!(r.read(0, 3, 512).events.is_empty());
        r.end_removal();
        // ... nor after it ends.
        r.fill(0, 3, &[ev(1), ev(2), ev(3)], before);
        r.fill(0, 3, &[ev(1), ev(2), ev(3)], during.generation);
        assert!(r.read(0, 3, 512).events.is_empty());
        let g = r.read(0, 3, 512).generation;
        r.fill(0, 3, &[ev(1), ev(3)], g);
        assert_eq!(seqs(&r.read(0, 3, 512)), vec![1, 3]);
    }
}
