//! Rollup maintenance off the ingest path.
//!
//! Each committed batch is folded into in-memory maps of cell deltas
//! (`active`), one per [`Lane`], by the writer's folder thread (since
//! session 29; before, by the writer itself, which then started its next
//! commit only after the fold). A checkpointer thread regularly
//! freezes a lane's map and merges it into the `rollups` tree in one atomic
//! sled batch, together with the sequence number it covers up to (the
//! lane's *watermark*, kept in the same tree). Queries read the tree plus
//! the frozen and active maps while holding a read lock that the
//! checkpointer's merge takes for writing, so a checkpoint landing
//! mid-query is never counted twice.
//!
//! The lanes: the hourly cells (base and attribute families, about one new
//! cell per event) are merged every 5 s or 50,000 events, which bounds
//! the memory they wait in (every 200 ms or 10,000 events until session
//! 14: 5 % less ingest and a longer latency tail, for about 25 MiB less;
//! every second until session 33: at a few thousand events a second the
//! three nodes of `bench propagate` merged small checkpoints every
//! second, at the same moments, and each one delayed delivery by 20-50
//! ms — the whole tail of the chain's p99).
//! The views' day, week and month cells are few and rewritten over and
//! over (each merge reads, adds to and writes back the same cells,
//! distinct-customer sketches of a kilobyte included), so they wait longer
//! — up to 15 s or 200,000 events (5 s or 50,000 until session 19) — and a
//! merge writes each cell once for all the events it covers. Either lane is
//! merged once no event came for a second.
//!
//! Of the views, only the day cells wait (since session 20): the writer
//! folds an event into its views' day cells, and a view's week and month
//! cells, sums of its day cells, are derived from the waiting days when a
//! checkpoint merges them ([`derive`]) or a query reads them. That takes
//! about half of the cells an event adds off the writer.
//!
//! After a crash the maps are gone; [`Pending::open`] folds the stored
//! events after each lane's watermark again, into that lane. sled writes
//! its log in order, so a durable checkpoint implies the events it covers
//! are durable too.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use super::{blocks, gate, Error, Result, Seq, Trees};
use crate::domain::UnixNanos;
use crate::rollup::{
    open_value, parse_period_prefix, seal_value, Agg, Bucket, DimSet, Interner, Layout, QueryCell,
};

/// Key of the hourly lane's watermark in the `rollups` tree (sorts after
/// every family). Stores from before the lanes have only this one, which
/// then covers the views too.
const WATERMARK_KEY: &[u8] = b"\xffwatermark";
/// Key of the views lane's watermark.
const VIEWS_WATERMARK_KEY: &[u8] = b"\xffwatermark-views";
/// Keys of a lane's unfinished checkpoint: the sequence number it merges
/// up to (8 bytes) and the last cell key merged so far.
const PARTIAL_KEY: &[u8] = b"\xffpartial";
const VIEWS_PARTIAL_KEY: &[u8] = b"\xffpartial-views";
/// Cells a checkpoint merges per sled batch. Applying a batch holds sled's
/// global write lock, which stalls every other write (the store writer's
/// commits) meanwhile: a checkpoint of tens of thousands of cells in one
/// batch stalled publish acknowledgements for a second.
const CHUNK_CELLS: usize = 512;

/// The two groups of cell families, merged into the tree at their own
/// cadence, each with its own watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// Base and attribute families: hourly cells over every dimension.
    Hours = 0,
    /// The views' day, week and month cells.
    Views = 1,
}

impl Lane {
    pub(super) const ALL: [Lane; 2] = [Lane::Hours, Lane::Views];

    /// The lane of the cell with key `key`.
    fn of(key: &[u8]) -> Lane {
        match key.first() {
            Some(f) if *f >= crate::rollup::Layout::family(0) => Lane::Views,
            _ => Lane::Hours,
        }
    }

    fn watermark_key(self) -> &'static [u8] {
        match self {
            Lane::Hours => WATERMARK_KEY,
            Lane::Views => VIEWS_WATERMARK_KEY,
        }
    }

    fn partial_key(self) -> &'static [u8] {
        match self {
            Lane::Hours => PARTIAL_KEY,
            Lane::Views => VIEWS_PARTIAL_KEY,
        }
    }

    /// Merge at least this often while deltas wait.
    fn every(self) -> Duration {
        match self {
            // At a steady few thousand events a second the events bound
            // comes first only after 10-25 s: every 5 s, a checkpoint
            // writes each hour's block once for 5 s of events rather than
            // five times (README, session 33).
            Lane::Hours => Duration::from_secs(5),
            Lane::Views => Duration::from_secs(15),
        }
    }

    /// Merge early once this many events wait. A views checkpoint rewrites
    /// every view cell its events touched, which with events spread over a
    /// month is most of them whatever their number (80k cells and 3.4 s
    /// per checkpoint of about 120k events near 10M stored, session 19):
    /// fewer, larger checkpoints cost less per event.
    fn events(self) -> u64 {
        match self {
            Lane::Hours => 50_000,
            Lane::Views => 200_000,
        }
    }

    /// The writer waits for the checkpointer beyond this many waiting
    /// events.
    fn max_waiting(self) -> u64 {
        3 * self.events()
    }
}

/// A lane whose deltas wait is merged once no event came for this long,
/// whatever its cadence: an idle node settles its rollups.
const SETTLE: Duration = Duration::from_secs(1);

/// Longest pause between two chunks of an unpressed checkpoint (see
/// [`Pending::pace`]).
const PACE_MAX: Duration = Duration::from_millis(5);

/// Cells to read: `family`'s `period` cells starting in the hours
/// `from..to` (open ends: unbounded).
pub type Piece = (u8, Bucket, Option<i64>, Option<i64>);

/// A cell as stored: key and value bytes (shared with sled's cache, not
/// copied). Read them in place with [`crate::rollup::CellKeyRef`] and
/// [`crate::rollup::AggRef`].
pub type RawCell = (sled::IVec, sled::IVec);

/// Default budget of the [`PeriodCache`].
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// One period's cells: family, period kind, start hour.
type PeriodId = (u8, Bucket, i64);

/// The cells of whole days, weeks and months (and of short runs of hours)
/// recently read from the tree, decoded, per period, so that a query over
/// a year of weeks does not walk and decode sled cells each time: one
/// lookup per period instead. Values share
/// sled's bytes (`IVec`s are reference-counted). Filled by queries while
/// they hold `tree_lock` for reading; a checkpoint drops the periods it
/// changes while it holds it for writing, so an entry is never stale.
/// Bounded in bytes; the least recently used periods go first.
struct PeriodCache {
    entries: std::collections::HashMap<PeriodId, CachedPeriod>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

/// A period's cached cells: as stored (projection 0) and, for hours,
/// merged onto the dimensions of the views queries read them with.
#[derive(Default)]
struct CachedPeriod {
    variants: Vec<(DimSet, Arc<Vec<QueryCell>>)>,
    bytes: usize,
    used: u64,
}

impl PeriodCache {
    fn new(budget: usize) -> Self {
        PeriodCache {
            entries: std::collections::HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    fn get(&mut self, id: &PeriodId, projection: DimSet) -> Option<Arc<Vec<QueryCell>>> {
        self.clock += 1;
        let entry = self.entries.get_mut(id)?;
        let cells = entry
            .variants
            .iter()
            .find(|(p, _)| *p == projection)?
            .1
            .clone();
        entry.used = self.clock;
        Some(cells)
    }

    fn insert(&mut self, id: PeriodId, projection: DimSet, cells: Arc<Vec<QueryCell>>) {
        let bytes = cells.iter().map(QueryCell::footprint).sum::<usize>() + 64;
        if bytes > self.budget / 4 {
            return;
        }
        self.clock += 1;
        let entry = self.entries.entry(id).or_default();
        entry.used = self.clock;
        if let Some(at) = entry.variants.iter().position(|(p, _)| *p == projection) {
            let (_, old) = entry.variants.swap_remove(at);
            let old = old.iter().map(QueryCell::footprint).sum::<usize>() + 64;
            entry.bytes -= old;
            self.bytes -= old;
        }
        entry.variants.push((projection, cells));
        entry.bytes += bytes;
        self.bytes += bytes;
        while self.bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            self.remove(&oldest);
        }
    }

    /// Drops every variant of a period.
    fn remove(&mut self, id: &PeriodId) {
        if let Some(old) = self.entries.remove(id) {
            self.bytes -= old.bytes;
        }
    }

    fn retain(&mut self, keep: impl Fn(&PeriodId) -> bool) {
        let gone: Vec<PeriodId> = self
            .entries
            .keys()
            .filter(|id| !keep(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }
}

/// Runs of at most this many hourly cells are read through the cache.
const MAX_CACHED_HOURS: i64 = 48;

/// The partial hours at query windows' edges kept folded (most recent).
const MAX_CACHED_EDGES: usize = 16;

/// The cells folded from the events of partial hours at query windows'
/// edges (a window rarely starts on the hour), merged onto a view's
/// dimensions and decoded: folding them is a query's largest cost at 10M
/// events (about 1,100 events an hour), and the same feed asks for the
/// same edge again. Events come and go by the hour they occurred in: the
/// writer drops the entries of the hours it stores events in before it
/// writes them and again after (every entry when it removes events), and
/// nothing folded while it writes is kept. Entries are not counted in the
/// period cache's budget: 16 partial hours' cells, at most a few thousand.
#[derive(Default)]
struct EdgeCache {
    /// Bumped whenever events are stored or removed: a fold that began
    /// before a bump may have missed them, so it is not kept.
    generation: u64,
    /// Events are being stored or removed: nothing folded now is kept.
    changing: bool,
    /// Oldest first.
    entries: Vec<EdgeEntry>,
}

impl EdgeCache {
    /// Drops the entries of `hours` (sorted; `None`: every entry).
    fn drop_hours(&mut self, hours: Option<&[i64]>) {
        match hours {
            None => self.entries.clear(),
            Some(hours) => self
                .entries
                .retain(|e| hours.binary_search(&e.hour).is_err()),
        }
    }
}

struct EdgeEntry {
    range: (UnixNanos, UnixNanos),
    projection: DimSet,
    /// The hour the range lies in.
    hour: i64,
    cells: Arc<Vec<QueryCell>>,
}

/// Deltas not yet in the tree, per [`Lane`].
#[derive(Default)]
struct Maps {
    lanes: [LaneMaps; 2],
}

impl Maps {
    fn lane(&mut self, lane: Lane) -> &mut LaneMaps {
        &mut self.lanes[lane as usize]
    }
}

/// Longest a query waits for the fold of acknowledged commits.
const FOLD_WAIT: Duration = Duration::from_secs(5);

/// Events a fold adds to the waiting cells per hold of their lock: a
/// query or a checkpoint's chunk waits for no more than that.
const FOLD_CHUNK: usize = 64;

/// Bytes of a cell key's period prefix (family, period kind, start hour).
pub(super) const PREFIX: usize = 10;

/// The seed of the waiting cells' hashers (see [`Cells`]).
static CELL_SEED: std::sync::LazyLock<u64> = std::sync::LazyLock::new(rand::random);

/// Waiting cells, by period (the prefix every read ranges over) and, in a
/// period, hashed by key: merging a commit's cells costs a hash per cell,
/// not a search of one large ordered map (the writer spent 13 % of the
/// node's time there, `memcmp` of long keys with shared prefixes).
/// A checkpoint sorts them once. The hasher's seed is drawn at random
/// once per process ([`CELL_SEED`]): keys are made of what publishers
/// send, so colliding ones cannot be prepared in advance to slow the
/// writer down.
#[derive(Default)]
struct Cells {
    periods: BTreeMap<[u8; PREFIX], PeriodCells>,
    len: usize,
}

/// The waiting cells of one period, by key.
type PeriodCells = HashMap<Vec<u8>, Agg, foldhash::fast::FixedState>;

impl Cells {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The period a key belongs to (keys are never shorter than a
    /// prefix; a shorter one is kept under itself, padded with zeros).
    fn prefix(key: &[u8]) -> [u8; PREFIX] {
        let mut p = [0u8; PREFIX];
        let n = key.len().min(PREFIX);
        p[..n].copy_from_slice(&key[..n]);
        p
    }

    /// The map of the period `key` belongs to, made when missing.
    fn period(&mut self, key: &[u8]) -> &mut PeriodCells {
        self.periods.entry(Self::prefix(key)).or_insert_with(|| {
            HashMap::with_hasher(foldhash::fast::FixedState::with_seed(*CELL_SEED))
        })
    }

    /// Adds `delta` into the cell `key`.
    fn merge(&mut self, key: Vec<u8>, delta: Agg) {
        if Self::merge_in(self.period(&key), key, delta) {
            self.len += 1;
        }
    }

    /// Adds `delta` into the cell `key` of `period`; true if the cell is new.
    fn merge_in(period: &mut PeriodCells, key: Vec<u8>, delta: Agg) -> bool {
        match period.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut cell) => {
                cell.get_mut().merge_cell(&delta);
                false
            }
            std::collections::hash_map::Entry::Vacant(cell) => {
                cell.insert(delta);
                true
            }
        }
    }

    /// Adds `delta` into the cell `key`, copying the key and the delta
    /// only for a new cell.
    fn merge_ref(&mut self, key: &[u8], delta: &Agg) {
        let period = self.period(key);
        match period.get_mut(key) {
            Some(cell) => cell.merge_cell(delta),
            None => {
                period.insert(key.to_vec(), delta.clone());
                self.len += 1;
            }
        }
    }

    /// Adds every cell of `cells`.
    fn merge_all(&mut self, cells: BTreeMap<Vec<u8>, Agg>) {
        for (key, delta) in cells {
            self.merge(key, delta);
        }
    }

    /// The cells of the periods whose prefix is in `[start, end)`, in no
    /// particular order.
    fn range<'a>(
        &'a self,
        start: &[u8],
        end: &[u8],
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Agg)> {
        self.periods_in(start, end)
            .flat_map(|(_, cells)| cells.iter())
    }

    /// The periods whose prefix is in `[start, end)`, each with its cells.
    fn periods_in<'a>(
        &'a self,
        start: &[u8],
        end: &[u8],
    ) -> impl Iterator<Item = (&'a [u8; PREFIX], &'a PeriodCells)> {
        let (start, end) = (Self::prefix(start), Self::prefix(end));
        (start < end)
            .then(|| self.periods.range(start..end))
            .into_iter()
            .flatten()
    }

    /// Keeps the periods whose prefix `keep` accepts.
    fn retain_periods(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        self.periods.retain(|prefix, _| keep(prefix));
        self.len = self.periods.values().map(HashMap::len).sum();
    }

    /// Every cell, in key order.
    fn sorted(&self) -> Vec<(&Vec<u8>, &Agg)> {
        let mut out: Vec<(&Vec<u8>, &Agg)> = Vec::with_capacity(self.len);
        for cells in self.periods.values() {
            let start = out.len();
            out.extend(cells.iter());
            out[start..].sort_unstable_by(|a, b| a.0.cmp(b.0));
        }
        out
    }

    /// The cell `key` (tests).
    #[cfg(test)]
    fn get(&self, key: &[u8]) -> Option<&Agg> {
        self.periods.get(&Self::prefix(key))?.get(key)
    }
}

/// One lane's deltas.
#[derive(Default)]
struct LaneMaps {
    active: Cells,
    active_events: u64,
    /// The highest sequence number folded into `active`.
    active_upto: Seq,
    /// When the oldest delta in `active` was added.
    since: Option<std::time::Instant>,
    /// When the newest was.
    last: Option<std::time::Instant>,
    /// This wait's share off the lane's cadence, drawn in [-1/4, 1/4)
    /// when its first delta comes (see [`Self::due`]).
    jitter: f64,
    /// Being merged into the tree by the checkpointer, chunk by chunk.
    frozen: Option<Arc<Cells>>,
    /// The last key of `frozen` merged into the tree so far: the cells up
    /// to it are read from the tree, no longer from `frozen`.
    frozen_done: Option<Vec<u8>>,
    /// The sequence number `frozen` covers up to.
    frozen_upto: Seq,
    /// The events folded into `frozen`.
    frozen_events: u64,
}

impl LaneMaps {
    /// Adds a fold's cells but the views' week and month cells (the
    /// waiting cells hold the views' days only; see [`derive`]).
    fn add(&mut self, mut cells: BTreeMap<Vec<u8>, Agg>, events: u64, upto: Seq) {
        cells.retain(|key, _| !crate::rollup::is_derived(key));
        if cells.is_empty() && events == 0 {
            return;
        }
        self.active.merge_all(cells);
        self.counted(events, upto);
    }

    /// Counts `events` up to `upto` as added (their cells are in `active`).
    fn counted(&mut self, events: u64, upto: Seq) {
        self.active_events += events;
        self.active_upto = self.active_upto.max(upto);
        let now = std::time::Instant::now();
        // A wait starts with its first work: a commit of duplicates only
        // (nothing counted, no cell) does not start it, or the lane's
        // cadence would run from then and a first event after a quiet
        // hour would find the lane due at once.
        if self.since.is_none() && self.has_work() {
            self.since = Some(now);
            self.jitter = rand::random::<f64>() / 2.0 - 0.25;
        }
        self.last = Some(now);
    }

    /// Whether anything waits: cells, or only events (whose watermark
    /// moves on even when they add no cell to this lane).
    fn has_work(&self) -> bool {
        !self.active.is_empty() || self.active_events > 0
    }

    /// How long until the lane is due by time (its cadence, or
    /// [`SETTLE`] after the last delta), if anything waits.
    fn due_in(&self, lane: Lane) -> Option<Duration> {
        if !self.has_work() {
            return None;
        }
        let cadence = self.since.map(|t| {
            lane.every()
                .mul_f64(1.0 + self.jitter)
                .saturating_sub(t.elapsed())
        });
        let settle = self.last.map(|t| SETTLE.saturating_sub(t.elapsed()));
        cadence.into_iter().chain(settle).min()
    }

    /// Whether the checkpointer should merge this lane now.
    ///
    /// Its cadence is the lane's give or take a quarter, drawn anew for
    /// every wait: nodes that share a host and started together (the
    /// demo's chain, `bench propagate`'s three nodes on two CPUs) merged
    /// their hourly cells at the same moments, every 5 s, and the three
    /// checkpoints together held both CPUs for about 300 ms, which made
    /// the whole tail of the chain's delivery latency (an event
    /// forwarded meanwhile took 10-20 ms, README, session 35).
    fn due(&self, lane: Lane) -> bool {
        self.frozen.is_some()
            || self.has_work()
                && (self.active_events >= lane.events()
                    || self.due_in(lane) == Some(Duration::ZERO))
    }
}

/// Splits `cells` by lane. A cell's lane is its key's first byte (see
/// [`Lane::of`]), so the views' cells are the keys from the first views
/// family on: one split of the map, not a new map cell by cell.
fn by_lane(mut cells: BTreeMap<Vec<u8>, Agg>) -> [BTreeMap<Vec<u8>, Agg>; 2] {
    let views = cells.split_off([crate::rollup::Layout::family(0)].as_slice());
    debug_assert!(cells.keys().all(|k| Lane::of(k) == Lane::Hours));
    debug_assert!(views.keys().all(|k| Lane::of(k) == Lane::Views));
    [cells, views]
}

/// The rollups waiting in memory, shared by the writer's folder thread
/// (adds), the checkpointer (drains) and queries (read).
pub(super) struct Pending {
    layout: Arc<Layout>,
    maps: RwLock<Maps>,
    /// Held for reading by queries, for writing while a checkpoint merges.
    tree_lock: RwLock<()>,
    /// Cells queries read recently, decoded, per period.
    cache: Mutex<PeriodCache>,
    /// Partial hours at query windows' edges, folded from their events.
    edges: Mutex<EdgeCache>,
    wake: Condvar,
    wake_lock: Mutex<()>,
    stop: AtomicBool,
    /// Merge every lane now, due or not ([`Pending::drain`]).
    draining: AtomicBool,
    /// The last checkpoint failed: the writer does not wait for the
    /// checkpointer then (it may fail until an operator repairs the store).
    failing: AtomicBool,
    /// No checkpoint starts while set ([`Pending::pause`]).
    /// Pauses under way ([`Pending::pause`]); checkpoints wait for none.
    paused: AtomicUsize,
    /// Held by the checkpointer through each checkpoint.
    checkpointing: Mutex<()>,
    /// Held through each commit's fold ([`Pending::add`]), which takes
    /// the maps' lock chunk by chunk; a checkpoint freezes a lane only
    /// between two commits' folds, so that a frozen map holds whole
    /// commits, those up to its watermark. Handed over fairly at the end
    /// of a fold: back-to-back folds would otherwise keep a checkpoint
    /// from ever taking it.
    folding: parking_lot::Mutex<()>,
    /// A fold panicked half way: the maps may hold part of a commit's
    /// cells without its events counted (see [`Pending::checkpoint`]).
    half_folded: AtomicBool,
    /// Tests: folds done by [`Self::try_add`] (on the store writer).
    #[cfg(test)]
    pub(super) folded_by_try: std::sync::atomic::AtomicU64,
    /// Commits whose callers were answered before their fold, and folds
    /// done since ([`Pending::fold_owed`], [`Pending::add`]).
    folds: Mutex<FoldCount>,
    folded: Condvar,
}

/// Folds owed (commits acknowledged) and done, counted from the open.
#[derive(Default)]
struct FoldCount {
    owed: u64,
    done: u64,
}

/// Counts a fold done when dropped, however the fold ends (a panic
/// included: queries must not wait for a fold that will never come).
struct FoldDone<'p>(&'p Pending);

impl Drop for FoldDone<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.half_folded.store(true, Ordering::SeqCst);
        }
        self.0.fold_count().done += 1;
        self.0.folded.notify_all();
    }
}

/// Keeps checkpoints from starting while it lives ([`Pending::pause`]).
pub(super) struct Paused<'a>(&'a Pending);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.paused.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A lane's unfinished checkpoint, as stored: the sequence number it
/// merges up to, and the last cell key it merged. Cells up to that key
/// hold the events up to that number; the others only those up to the
/// lane's watermark.
fn read_partial(tree: &sled::Tree, lane: Lane) -> Result<Option<(Seq, Vec<u8>)>> {
    let Some(v) = tree.get(lane.partial_key())? else {
        return Ok(None);
    };
    let (upto, key) = v
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt(lane.partial_key(), "partial checkpoint record too short"))?;
    Ok(Some((Seq::from_be_bytes(*upto), key.to_vec())))
}

fn read_watermark(tree: &sled::Tree, key: &[u8]) -> Result<Option<Seq>> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(Seq::from_be_bytes))
}

/// The batch that writes `cells` (deltas) into `tree` merged with what it
/// holds, and the watermark of `lanes` (also used by a rebuild, chunk by
/// chunk, with every lane).
pub(super) fn prepare_batch(
    tree: &sled::Tree,
    cells: &BTreeMap<Vec<u8>, Agg>,
    watermark: Seq,
    lanes: &[Lane],
) -> Result<sled::Batch> {
    let mut batch = merge_batch(tree, cells, watermark)?;
    for lane in lanes {
        batch.insert(lane.watermark_key(), &watermark.to_be_bytes());
    }
    Ok(batch)
}

/// Adds to a checkpoint's chunk its progress: the last chunk moves the
/// lane's watermark to `upto` and drops the record; any other records
/// `upto` and the last key of the chunk.
fn mark_progress(batch: &mut sled::Batch, lane: Lane, upto: Seq, last: bool, key: Option<&[u8]>) {
    if last {
        batch.insert(lane.watermark_key(), &upto.to_be_bytes());
        batch.remove(lane.partial_key());
    } else if let Some(key) = key {
        let mut record = upto.to_be_bytes().to_vec();
        record.extend_from_slice(key);
        batch.insert(lane.partial_key(), record);
    }
}

/// Finishes a checkpoint a crash cut short (at open, before anything else
/// writes cells): merges `rest`, the cells past its record's key folded
/// from the events up to its number `upto`, chunk by chunk as the
/// checkpoint would have. A crash meanwhile leaves a record further on.
fn finish_partial(
    tree: &sled::Tree,
    lane: Lane,
    rest: &BTreeMap<Vec<u8>, Agg>,
    upto: Seq,
) -> Result<()> {
    let cells: Vec<(&Vec<u8>, &Agg)> = rest.iter().collect();
    for (last, chunk) in chunked(&cells) {
        let mut batch = merge_batch(tree, chunk.iter().copied(), upto)?;
        let key = chunk.last().map(|(k, _)| k.as_slice());
        mark_progress(&mut batch, lane, upto, last, key);
        gate::apply_batch(tree, batch)?;
    }
    Ok(())
}

/// A checkpoint's chunks of `cells` (sorted by key) in order, each with
/// whether it is the last; at least one (empty when there are no cells:
/// the watermark still moves). A chunk takes about [`CHUNK_CELLS`] cells,
/// and never parts the cells of one period: an hour's go into one block.
fn chunked<'c, 'a>(
    cells: &'c [(&'a Vec<u8>, &'a Agg)],
) -> impl Iterator<Item = (bool, &'c [(&'a Vec<u8>, &'a Agg)])> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < cells.len() {
        let mut end = (start + CHUNK_CELLS).min(cells.len());
        let hour = |i: usize| {
            let key = cells[i].0;
            blocks::in_blocks(key).then(|| &key[..blocks::PREFIX])
        };
        while end < cells.len() && hour(end).is_some() && hour(end) == hour(end - 1) {
            end += 1;
        }
        chunks.push(&cells[start..end]);
        start = end;
    }
    if chunks.is_empty() {
        chunks.push(&cells[..0]);
    }
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(move |(i, chunk)| (i + 1 == n, chunk))
}

/// The batch that writes `cells` (deltas of the events up to `upto`,
/// sorted by key) into `tree`: the hours' as a new block of each hour
/// (see [`super::blocks`]), the others merged with what it holds.
fn merge_batch<'a>(
    tree: &sled::Tree,
    cells: impl IntoIterator<Item = (&'a Vec<u8>, &'a Agg)>,
    upto: Seq,
) -> Result<sled::Batch> {
    let mut batch = sled::Batch::default();
    let mut cells = cells.into_iter().peekable();
    while let Some((key, delta)) = cells.next() {
        if blocks::in_blocks(key) {
            let prefix = &key[..blocks::PREFIX];
            let mut hour = vec![(key, delta)];
            while let Some(next) = cells.next_if(|(k, _)| k.starts_with(prefix)) {
                hour.push(next);
            }
            blocks::add_block(tree, &mut batch, prefix, hour, upto)?;
            continue;
        }
        let mut agg = match tree.get(key)? {
            // Never merged into as if empty: that would lose its counts.
            Some(old) => open_value(key, &old)
                .and_then(Agg::decode_bytes)
                .ok_or_else(|| corrupt(key, "bad cell"))?,
            None => Agg::default(),
        };
        agg.merge_cell(delta);
        agg.seal();
        batch.insert(key.as_slice(), seal_value(key, &agg));
    }
    Ok(batch)
}

/// Adds `cells` into `map`.
fn merge_map(map: &mut BTreeMap<Vec<u8>, Agg>, cells: BTreeMap<Vec<u8>, Agg>) {
    // One search per cell: most of a commit's hourly cells are new keys.
    for (key, delta) in cells {
        match map.entry(key) {
            std::collections::btree_map::Entry::Occupied(mut cell) => {
                cell.get_mut().merge_cell(&delta);
            }
            std::collections::btree_map::Entry::Vacant(cell) => {
                cell.insert(delta);
            }
        }
    }
}

/// The views' week and month cells that `cells`' view day cells add up to
/// ([`crate::rollup::derived`]). The writer folds only the views' day
/// cells into the waiting ones; a checkpoint merges these with them, and
/// queries derive them the same way from what waits.
fn derive(cells: &Cells) -> Cells {
    let mut out = Cells::default();
    let first_view = crate::rollup::period_prefix(Layout::family(0), Bucket::Hour, i64::MIN);
    for (prefix, days) in cells.periods.range(first_view..) {
        for period in crate::rollup::DERIVED_PERIODS {
            // Every cell of a day goes to the same week (month): that
            // period's prefix and map are found once.
            let Some(target) = crate::rollup::derived_prefix(prefix, period) else {
                continue;
            };
            let map = out.periods.entry(target).or_insert_with(|| {
                HashMap::with_hasher(foldhash::fast::FixedState::with_seed(*CELL_SEED))
            });
            for (key, delta) in days {
                let key = [&target[..], &key[PREFIX..]].concat();
                match map.get_mut(&key) {
                    Some(cell) => cell.merge_cell(delta),
                    None => {
                        map.insert(key, delta.clone());
                        out.len += 1;
                    }
                }
            }
        }
    }
    out
}

/// Two key-ordered lists of cells with no key in common, as one.
fn merge_sorted<'a>(
    a: Vec<(&'a Vec<u8>, &'a Agg)>,
    b: Vec<(&'a Vec<u8>, &'a Agg)>,
) -> Vec<(&'a Vec<u8>, &'a Agg)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => {
                if x.0 <= y.0 {
                    a.next()
                } else {
                    b.next()
                }
            }
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        out.extend(next);
    }
    out
}

impl Pending {
    /// Starts from the tree's watermark, folding the events stored after
    /// it (lost from memory by a crash) into the active map. `fold_events`
    /// is false when the tree's layout is stale: nothing is folded then,
    /// the node refuses to start until a rebuild.
    pub(super) fn open(trees: &Trees, layout: Arc<Layout>, fold_events: bool) -> Result<Pending> {
        let mut maps = Maps::default();
        if fold_events {
            let hours = read_watermark(&trees.rollups, WATERMARK_KEY)?.unwrap_or(0);
            // A store from before the lanes: its one watermark covers all.
            let views = match read_watermark(&trees.rollups, VIEWS_WATERMARK_KEY)? {
                Some(views) => views,
                None => {
                    // Kept from now on, so that an hourly checkpoint landing
                    // before the views' first one is not mistaken for a
                    // store from before the lanes.
                    trees
                        .rollups
                        .insert(VIEWS_WATERMARK_KEY, &hours.to_be_bytes())?;
                    hours
                }
            };
            let after = [hours, views];
            let partial = [
                read_partial(&trees.rollups, Lane::Hours)?,
                read_partial(&trees.rollups, Lane::Views)?,
            ];
            for lane in Lane::ALL {
                let maps = maps.lane(lane);
                maps.active_upto = after[lane as usize];
                if let Some((upto, _)) = &partial[lane as usize] {
                    maps.active_upto = maps.active_upto.max(*upto);
                }
            }
            let start = hours.min(views).saturating_add(1);
            let mut chunk = Vec::new();
            // Per lane: the events after its watermark, except that the
            // cells an unfinished checkpoint merged already hold the events
            // up to its number.
            let mut finishing: [BTreeMap<Vec<u8>, Agg>; 2] = Default::default();
            // Per lane, an event after the watermark is either *older*
            // (up to an unfinished checkpoint's number: only its cells past
            // the record's key are missing) or *newer*. Events are grouped
            // by their pair of classes, and each group is folded once.
            #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
            enum Class {
                Merged,
                Older,
                Newer,
            }
            let class = |lane: Lane, seq: Seq| {
                let merged_upto = partial[lane as usize]
                    .as_ref()
                    .map_or(after[lane as usize], |(upto, _)| *upto);
                if seq <= after[lane as usize] {
                    Class::Merged
                } else if seq <= merged_upto {
                    Class::Older
                } else {
                    Class::Newer
                }
            };
            let mut fold =
                |maps: &mut Maps, chunk: &mut Vec<(Seq, crate::domain::PreferenceEvent)>| {
                    let mut groups: BTreeMap<[Class; 2], Vec<&(Seq, _)>> = BTreeMap::new();
                    for item in chunk.iter() {
                        let classes = Lane::ALL.map(|lane| class(lane, item.0));
                        groups.entry(classes).or_default().push(item);
                    }
                    for (classes, events) in groups {
                        if classes == [Class::Merged; 2] {
                            continue;
                        }
                        let cells = crate::rollup::fold(events.iter().map(|(_, ev)| ev), &layout);
                        let upto = events.last().map_or(0, |(seq, _)| *seq);
                        for (lane, cells) in Lane::ALL.into_iter().zip(by_lane(cells)) {
                            match classes[lane as usize] {
                                Class::Merged => {}
                                Class::Older => {
                                    let merged_key = partial[lane as usize]
                                        .as_ref()
                                        .map(|(_, key)| key.as_slice());
                                    let missing = cells
                                        .into_iter()
                                        .filter(|(k, _)| {
                                            merged_key.is_none_or(|m| k.as_slice() > m)
                                        })
                                        .collect();
                                    merge_map(&mut finishing[lane as usize], missing);
                                }
                                Class::Newer => {
                                    maps.lane(lane).add(cells, events.len() as u64, upto);
                                }
                            }
                        }
                    }
                    chunk.clear();
                };
            for item in super::slots::range(&trees.events, start, Seq::MAX) {
                let (seq, v) = item?;
                chunk.push((seq, trees.event(seq, &v)?));
                if chunk.len() == 10_000 {
                    fold(&mut maps, &mut chunk);
                }
            }
            fold(&mut maps, &mut chunk);
            for lane in Lane::ALL {
                if let Some((upto, _)) = &partial[lane as usize] {
                    finish_partial(&trees.rollups, lane, &finishing[lane as usize], *upto)?;
                    tracing::info!(
                        ?lane,
                        cells = finishing[lane as usize].len(),
                        "finished the rollup checkpoint a crash cut short"
                    );
                }
            }
            let [h, v] = [&maps.lanes[0], &maps.lanes[1]].map(|l| l.active_events);
            if h > 0 || v > 0 {
                tracing::info!(
                    hourly_events = h,
                    view_events = v,
                    "folded the events after the last rollup checkpoints"
                );
            }
        }
        Ok(Pending::with_maps(layout, maps))
    }

    fn with_maps(layout: Arc<Layout>, maps: Maps) -> Pending {
        Pending {
            layout,
            maps: RwLock::new(maps),
            tree_lock: RwLock::new(()),
            cache: Mutex::new(PeriodCache::new(DEFAULT_CACHE_BYTES)),
            edges: Mutex::new(EdgeCache::default()),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            paused: AtomicUsize::new(0),
            checkpointing: Mutex::new(()),
            folding: parking_lot::Mutex::new(()),
            half_folded: AtomicBool::new(false),
            #[cfg(test)]
            folded_by_try: Default::default(),
            folds: Mutex::new(FoldCount::default()),
            folded: Condvar::new(),
        }
    }

    pub(super) fn layout(&self) -> &Layout {
        &self.layout
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.maps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A commit's callers are about to be answered, its fold to follow
    /// (under the writer's mutex): queries from now on wait for that fold
    /// ([`Self::wait_folds`]).
    pub(super) fn fold_owed(&self) {
        self.fold_count().owed += 1;
    }

    /// The fold [`Self::fold_owed`] announced will not come (its commit
    /// failed after its callers were answered; the writer halted): queries
    /// stop waiting for it.
    /// Waits for the folds owed before it first: the count says how many
    /// folds are done, not which, and a query must not take this one for
    /// an earlier commit's that is still folding.
    pub(super) fn fold_dropped(&self) {
        let mut count = self.fold_count();
        while count.done + 1 < count.owed {
            count = self
                .folded
                .wait(count)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        count.done += 1;
        self.folded.notify_all();
    }

    /// Whether every fold announced before the latest one
    /// ([`Self::fold_owed`]) is done: nothing is folding elsewhere, so the
    /// latest may be folded on any thread without overtaking another.
    pub(super) fn only_latest_owed(&self) -> bool {
        let count = self.fold_count();
        count.done + 1 >= count.owed
    }

    fn fold_count(&self) -> std::sync::MutexGuard<'_, FoldCount> {
        self.folds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns once every commit acknowledged before the call is folded
    /// into the waiting cells, so that a query counts every event its
    /// caller saw acknowledged (a fold takes milliseconds; after
    /// [`FOLD_WAIT`] the query goes on, with a warning).
    fn wait_folds(&self) {
        let deadline = std::time::Instant::now() + FOLD_WAIT;
        if let Err(owed) = self.wait_announced(Some(deadline)) {
            tracing::warn!(
                owed,
                "a query did not wait any longer for the rollup fold of acknowledged commits; it may miss their events"
            );
        }
    }

    /// Returns once every fold announced so far ([`Self::fold_owed`]) is
    /// done (writer thread, before anything that reads, merges or resets
    /// the waiting cells as a whole: the folds run on their own thread).
    pub(super) fn settle(&self) {
        let _ = self.wait_announced(None);
    }

    /// Waits until the folds announced before the call are done, or
    /// until `deadline`: then `Err` with how many are not.
    fn wait_announced(&self, deadline: Option<std::time::Instant>) -> std::result::Result<(), u64> {
        let mut count = self.fold_count();
        let target = count.owed;
        while count.done < target {
            count = match deadline {
                None => self
                    .folded
                    .wait(count)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(deadline) => {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        return Err(target - count.done);
                    }
                    self.folded
                        .wait_timeout(count, deadline - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
        Ok(())
    }

    /// Adds the cells of committed events up to `upto` (the writer's
    /// folder thread, commit by commit in order). Counts as the fold a
    /// [`Self::fold_owed`] announced.
    ///
    /// The events are folded straight into the waiting cells,
    /// [`FOLD_CHUNK`] events per hold of the maps' lock (a whole commit
    /// under one hold made the checkpointer wait for every commit's fold
    /// at each chunk it merges, and stalled ingest at a million stored
    /// events; until session 29 each commit was folded into maps of its
    /// own first, then moved in: every cell hashed, searched and merged
    /// twice). Each event's cells go in under one hold, so a query counts
    /// an event in all its cells or in none.
    pub(super) fn add<'a>(
        &self,
        new: impl IntoIterator<Item = &'a crate::domain::PreferenceEvent>,
        events: u64,
        upto: Seq,
    ) {
        // Counted done however this ends.
        let done = FoldDone(self);
        let due = {
            let folding = self.folding.lock();
            let mut new = new.into_iter().peekable();
            while new.peek().is_some() {
                self.fold_into(&mut self.write(), new.by_ref().take(FOLD_CHUNK));
            }
            let due = self.count_in(&mut self.write(), events, upto);
            parking_lot::MutexGuard::unlock_fair(folding);
            due
        };
        drop(done);
        if due {
            self.wake.notify_all();
        }
    }

    /// As [`Self::add`] for at most [`FOLD_CHUNK`] events, but only if
    /// neither the fold's lock nor the cells' are held right now (by the
    /// checkpointer or a query): the store writer folds small commits
    /// itself and must not wait for those. Returns whether it folded;
    /// if not, nothing changed.
    pub(super) fn try_add<'a>(
        &self,
        new: impl ExactSizeIterator<Item = &'a crate::domain::PreferenceEvent>,
        events: u64,
        upto: Seq,
    ) -> bool {
        if new.len() > FOLD_CHUNK {
            return false;
        }
        let Some(folding) = self.folding.try_lock() else {
            return false;
        };
        let mut maps = match self.maps.try_write() {
            Ok(maps) => maps,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        let done = FoldDone(self);
        #[cfg(test)]
        self.folded_by_try.fetch_add(1, Ordering::SeqCst);
        self.fold_into(&mut maps, new);
        let due = self.count_in(&mut maps, events, upto);
        drop(maps);
        parking_lot::MutexGuard::unlock_fair(folding);
        drop(done);
        if due {
            self.wake.notify_all();
        }
        true
    }

    /// Folds `new` into the waiting cells.
    fn fold_into<'a>(
        &self,
        maps: &mut Maps,
        new: impl Iterator<Item = &'a crate::domain::PreferenceEvent>,
    ) {
        let lanes = &mut maps.lanes;
        // The views' week and month cells are derived from their day cells
        // when they are read or merged (see [`derive`]): a third of the
        // cells an event adds.
        crate::rollup::fold_with(new, &self.layout, &[Bucket::Day], |key, delta| {
            lanes[Lane::of(key) as usize].active.merge_ref(key, delta)
        });
    }

    /// Counts a fold's `events` up to `upto` in every lane; says whether
    /// a checkpoint is due.
    fn count_in(&self, maps: &mut Maps, events: u64, upto: Seq) -> bool {
        for lane in Lane::ALL {
            maps.lane(lane).counted(events, upto);
        }
        maps.lanes[0].active_events >= Lane::Hours.events()
            || maps.lanes[1].active_events >= Lane::Views.events()
            || Self::over(maps)
    }

    /// Backpressure (writer thread, before a commit): returns once no
    /// lane holds more waiting events than it may, the checkpointer
    /// catching up meanwhile (or at once when it stopped or failed). The
    /// writer waits here rather than the folder: a commit's fold never
    /// waits, so a query, which waits for the folds of every commit
    /// acknowledged before it, never waits for a checkpoint (folds held
    /// back on the folder thread made queries wait for up to
    /// [`FOLD_WAIT`], then go on without the events of commits their
    /// callers had seen acknowledged).
    pub(super) fn wait_room(&self) {
        if !Self::over(&self.read()) {
            return;
        }
        let mut guard = self
            .wake_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while Self::over(&self.read())
            && !self.stop.load(Ordering::SeqCst)
            && !self.failing.load(Ordering::SeqCst)
        {
            self.wake.notify_all();
            guard = self
                .wake
                .wait_timeout(guard, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Whether no lane holds more waiting events than it may (a commit
    /// would not wait in [`Self::wait_room`]); false, without waiting, if
    /// the cells are being written.
    pub(super) fn has_room(&self) -> bool {
        match self.maps.try_read() {
            Ok(maps) => !Self::over(&maps),
            Err(_) => false,
        }
    }

    /// Whether a lane holds more waiting events than it may.
    fn over(maps: &Maps) -> bool {
        Lane::ALL
            .iter()
            .any(|lane| maps.lanes[*lane as usize].active_events >= lane.max_waiting())
    }

    /// Forgets every waiting delta: a rebuild recomputes the tree from all
    /// events, up to `upto`.
    pub(super) fn reset(&self, upto: Seq) {
        let mut maps = self.write();
        *maps = Maps::default();
        for lane in Lane::ALL {
            maps.lane(lane).active_upto = upto;
        }
        self.clear_cache();
    }

    /// Whether deltas wait in memory, not yet merged into the tree.
    pub(super) fn waiting(&self) -> bool {
        let maps = self.read();
        maps.lanes
            .iter()
            .any(|l| !l.active.is_empty() || l.frozen.is_some())
    }

    /// Forgets the cached periods (after writing the tree other than by a
    /// checkpoint). The folded edges stay: they come from the events,
    /// and the writer drops them when events change.
    pub(super) fn clear_cache(&self) {
        let mut cache = self.cache();
        let budget = cache.budget;
        *cache = PeriodCache::new(budget);
    }

    fn edges(&self) -> std::sync::MutexGuard<'_, EdgeCache> {
        self.edges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Events that occurred in `hours` (sorted; `None`: any events) are
    /// about to be stored or removed (under the writer's mutex, before it
    /// writes):
    /// folds of those hours are stale from now on, and until
    /// [`Self::end_change`] nothing folded is kept, since a fold may see
    /// part of the change.
    pub(super) fn begin_change(&self, hours: Option<&[i64]>) {
        let mut edges = self.edges();
        edges.generation += 1;
        edges.changing = true;
        edges.drop_hours(hours);
    }

    /// The change [`Self::begin_change`] announced is written (or failed:
    /// then pass `None`, as what it left is unknown).
    pub(super) fn end_change(&self, hours: Option<&[i64]>) {
        let mut edges = self.edges();
        edges.generation += 1;
        edges.changing = false;
        edges.drop_hours(hours);
    }

    /// The cells of the events in `range` (part of one hour, at a window's
    /// edge), merged onto `projection` and decoded: cached, or
    /// made by `fold` and kept unless events were stored or removed
    /// meanwhile.
    pub(super) fn edge_cells(
        &self,
        range: (UnixNanos, UnixNanos),
        projection: DimSet,
        fold: impl FnOnce() -> Result<Arc<Vec<QueryCell>>>,
    ) -> Result<Arc<Vec<QueryCell>>> {
        let generation = {
            let mut edges = self.edges();
            if let Some(at) = edges
                .entries
                .iter()
                .position(|e| e.range == range && e.projection == projection)
            {
                // Most recently used last.
                let entry = edges.entries.remove(at);
                let cells = entry.cells.clone();
                edges.entries.push(entry);
                return Ok(cells);
            }
            edges.generation
        };
        let hour = crate::rollup::hour_of(range.0);
        debug_assert_eq!(hour, crate::rollup::hour_of(UnixNanos(range.1 .0 - 1)));
        let cells = fold()?;
        let keep = self.cache().budget > 0;
        let mut edges = self.edges();
        if keep && !edges.changing && edges.generation == generation {
            // Another query may have kept the same fold meanwhile.
            edges
                .entries
                .retain(|e| !(e.range == range && e.projection == projection));
            if edges.entries.len() == MAX_CACHED_EDGES {
                edges.entries.remove(0);
            }
            edges.entries.push(EdgeEntry {
                range,
                projection,
                hour,
                cells: cells.clone(),
            });
        }
        Ok(cells)
    }

    /// Bounds the period cache to `bytes` (0: no cache).
    pub(super) fn set_cache_budget(&self, bytes: usize) {
        *self.cache() = PeriodCache::new(bytes);
        if bytes == 0 {
            // No cache means none of the folded edges either.
            self.edges().entries.clear();
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, PeriodCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops waiting cells of periods starting before `hour` (retention).
    pub(super) fn remove_before(&self, hour: i64) {
        let families = crate::rollup::Layout::family(self.layout.views.len());
        let mut maps = self.write();
        for lane in &mut maps.lanes {
            lane.active.retain_periods(|k| {
                parse_period_prefix(k)
                    .is_none_or(|(family, _, start)| family >= families || start >= hour)
            });
        }
        self.cache().retain(|&(_, _, start)| start >= hour);
    }

    /// Merges `lane`'s waiting deltas into the tree if any wait
    /// (checkpointer thread, and once more at shutdown): freezes the
    /// active map and merges it chunk by chunk, each chunk one sled batch
    /// with a record of the progress; the last one moves the watermark and
    /// drops the record. A checkpoint a failure cut short is resumed where
    /// it stopped by the next call.
    fn checkpoint(&self, tree: &sled::Tree, lane: Lane) -> Result<bool> {
        // A panic in a fold (while the maps were held for writing, or
        // between two of its chunks) may have left a commit's cells half
        // added, without the commit's events counted: merging them would
        // count them again when the next open folds that commit's events
        // from the watermark. Nothing is merged until a restart does that.
        if self.maps.is_poisoned() || self.half_folded.load(Ordering::SeqCst) {
            return Err(Error::Write {
                reason: "the waiting rollups were left half updated by a panic in the store's rollup fold; restart the node (it folds the rollups of the events after the last checkpoint again)".into(),
                disk_full: false,
            });
        }
        let started = std::time::Instant::now();
        let (frozen, upto, events, done) = {
            // Between two commits' folds (see `folding`).
            let _folding = self.folding.lock();
            let mut maps = self.write();
            let maps = maps.lane(lane);
            if maps.frozen.is_none() {
                if !maps.has_work() {
                    return Ok(false);
                }
                maps.frozen = Some(Arc::new(std::mem::take(&mut maps.active)));
                maps.frozen_done = None;
                maps.frozen_upto = maps.active_upto;
                maps.frozen_events = std::mem::take(&mut maps.active_events);
                maps.since = None;
                maps.last = None;
            }
            (
                maps.frozen.clone().unwrap_or_default(),
                maps.frozen_upto,
                maps.frozen_events,
                maps.frozen_done.clone(),
            )
        };
        self.wake.notify_all();
        // The views' weeks and months, from their days.
        let derived = derive(&frozen);
        // In key order (sorted here, outside the lock), from after the
        // last key a cut-short run of this checkpoint merged.
        let mut remaining: Vec<(&Vec<u8>, &Agg)> = merge_sorted(frozen.sorted(), derived.sorted());
        if let Some(done) = &done {
            remaining.retain(|(k, _)| *k > done);
        }
        let mut chunks = 0;
        // Whether the hours lane may still be merged between this
        // checkpoint's chunks (not after it failed once here).
        let mut hours_between = lane == Lane::Views;
        for (final_chunk, chunk) in chunked(&remaining) {
            chunks += 1;
            let chunk_started = std::time::Instant::now();
            // Only the checkpointer writes cells while it runs (retention
            // pauses it, an erasure lets it finish first), so the batch is
            // prepared without blocking queries.
            let mut batch = merge_batch(tree, chunk.iter().copied(), upto)?;
            let last_key = chunk.last().map(|(k, _)| (*k).clone());
            mark_progress(&mut batch, lane, upto, final_chunk, last_key.as_deref());
            // Applying the chunk and marking it merged happen under one
            // lock hold: a query sees its deltas either in the map or in
            // the tree.
            {
                let _merging = self
                    .tree_lock
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                gate::apply_batch(tree, batch)?;
                let mut maps = self.write();
                let maps = maps.lane(lane);
                let mut cache = self.cache();
                let mut last = None;
                for id in chunk.iter().filter_map(|(k, _)| parse_period_prefix(k)) {
                    if last != Some(id) {
                        cache.remove(&id);
                        last = Some(id);
                    }
                }
                if final_chunk {
                    maps.frozen = None;
                    maps.frozen_done = None;
                } else {
                    maps.frozen_done = last_key;
                }
            }
            // This chunk's time, not an hours checkpoint's between chunks.
            let took = chunk_started.elapsed();
            if !final_chunk && hours_between {
                hours_between = self.hours_between_chunks(tree);
            }
            if !final_chunk {
                self.pace(took);
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            // Cells written per family kind: base (hourly, every
            // dimension), attribute, and the views' together.
            let mut families = [0usize; 3];
            for (key, _) in &remaining {
                families[usize::from(key.first().copied().unwrap_or(0)).min(2)] += 1;
            }
            // What waits in memory now, per lane: cells being merged and
            // cells added since.
            let waiting = {
                let maps = self.read();
                maps.lanes
                    .each_ref()
                    .map(|l| l.active.len + l.frozen.as_ref().map_or(0, |f| f.len))
            };
            tracing::debug!(
                ?lane,
                events,
                derived_cells = derived.len,
                waiting_hour_cells = waiting[0],
                waiting_view_cells = waiting[1],
                chunks,
                base_cells = families[0],
                attribute_cells = families[1],
                view_cells = families[2],
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "rollup checkpoint"
            );
        }
        Ok(true)
    }

    /// Between two chunks of a checkpoint that nothing presses (no lane
    /// with half its events bound waiting behind it, no drain, stop or
    /// pause waiting), sleeps as long as the chunk took, at most
    /// [`PACE_MAX`]: a checkpoint of chunks that take up to that long
    /// takes at most half a CPU (the views' chunks, 7-12 ms, about two
    /// thirds), and the threads that answer and forward find one free. Run flat out, the checkpoints of the three
    /// nodes of `bench propagate`, which come at the same moments, took
    /// both CPUs for 100-300 ms, and every event forwarded meanwhile
    /// waited (README, session 33).
    fn pace(&self, took: Duration) {
        if let Some(pause) = self.pause_after(took) {
            std::thread::sleep(pause);
        }
    }

    /// How long [`Self::pace`] sleeps after a chunk that took `took`:
    /// nothing while something presses.
    fn pause_after(&self, took: Duration) -> Option<Duration> {
        let pressed = self.stop.load(Ordering::SeqCst)
            || self.draining.load(Ordering::SeqCst)
            || self.paused.load(Ordering::SeqCst) > 0
            || {
                let maps = self.read();
                Lane::ALL
                    .iter()
                    .any(|lane| maps.lanes[*lane as usize].active_events >= lane.events() / 2)
            };
        (!pressed).then(|| took.min(PACE_MAX))
    }

    /// Merges the hours lane, if it is due, between two chunks of a views
    /// checkpoint. A views checkpoint takes seconds (3.3-3.7 s at 2M stored
    /// events); the hourly cells that waited behind it reached 185,000,
    /// where a second's worth is about 75,000. The lanes write disjoint
    /// keys and keep their own progress, so one may run inside the other.
    ///
    /// Not while a pause waits (it waits for the running checkpoint only).
    /// Returns false when the hours checkpoint failed: the views
    /// checkpoint then goes on without trying it again at every chunk
    /// (each try sorts the frozen hours again), and the checkpointer's
    /// loop retries it on its next round and reports it failing then.
    fn hours_between_chunks(&self, tree: &sled::Tree) -> bool {
        if self.paused.load(Ordering::SeqCst) > 0
            || !self.read().lanes[Lane::Hours as usize].due(Lane::Hours)
        {
            return true;
        }
        match self.checkpoint(tree, Lane::Hours) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, lane = ?Lane::Hours, "rollup checkpoint failed between the chunks of a views checkpoint; will retry");
                false
            }
        }
    }

    /// Holds checkpoints off (and lets queries run) while the guard lives:
    /// the tree then stays as one checkpoint left it.
    pub(super) fn hold_checkpoints(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.tree_lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns once no delta waits in memory: every cell is in the tree.
    /// Call on the writer thread after [`Self::settle`] (no fold runs
    /// then: the folder folds only the commits the writer hands it).
    pub(super) fn drain(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        self.draining.store(true, Ordering::SeqCst);
        let drained = loop {
            if !self.waiting() {
                break Ok(());
            }
            if std::time::Instant::now() > deadline {
                break Err(Error::Write {
                    reason: "the rollup checkpoint did not finish within 60 s".into(),
                    disk_full: false,
                });
            }
            self.wake.notify_all();
            std::thread::sleep(Duration::from_millis(5));
        };
        self.draining.store(false, Ordering::SeqCst);
        drained
    }

    /// Keeps checkpoints from starting until the guard is dropped, once any
    /// running one has finished (a rebuild rewrites the tree meanwhile).
    pub(super) fn pause(&self) -> Paused<'_> {
        self.paused.fetch_add(1, Ordering::SeqCst);
        drop(
            self.checkpointing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Paused(self)
    }

    /// Runs `f` (which writes the tree) with queries held off, then
    /// forgets the cached periods.
    pub(super) fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _writing = self
            .tree_lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = f();
        self.clear_cache();
        out
    }

    /// The cells in the tree alone.
    pub(super) fn read_tree(tree: &sled::Tree, pieces: &[Piece]) -> Result<Vec<RawCell>> {
        let mut out = Vec::new();
        for &(family, period, a, b) in pieces {
            let (start, end) = range(family, period, a, b);
            for item in tree.range(start..end) {
                let (key, value) = item?;
                if period == Bucket::Hour {
                    blocks::expand(&key, &value, &mut out)?;
                } else {
                    out.push((key, value));
                }
            }
        }
        Ok(out)
    }

    /// As [`Self::read_tree`], decoded, day, week and month cells period by
    /// period through the cache. Short runs of hours go through the cache
    /// too, merged onto `hour_view`'s dimensions when given (a view's: the
    /// dozens of cells it would keep for the hour rather than the thousand
    /// over every dimension). Call with `tree_lock` held.
    fn read_tree_cached(
        &self,
        tree: &sled::Tree,
        pieces: &[Piece],
        hour_view: Option<DimSet>,
        symbols: &RwLock<Interner>,
        out: &mut Vec<Arc<Vec<QueryCell>>>,
    ) -> Result<()> {
        let mut plain = Vec::new();
        let cached = self.cache().budget > 0;
        for &(family, period, a, b) in pieces {
            // Hours are cached only for short runs (a window's edges):
            // a query that reads hours across a long window would push the
            // periods other queries reuse out of the cache.
            let short_hours = matches!((a, b), (Some(a), Some(b)) if b - a <= MAX_CACHED_HOURS);
            if !cached || (period == Bucket::Hour && !short_hours) {
                plain.push((family, period, a, b));
                continue;
            }
            // Open ends: from the first to the last period stored.
            let (start, end) = range(family, period, a, b);
            let first = match a {
                Some(a) => Some(a),
                None => first_hour(tree.range(start.clone()..end.clone()).next())?,
            };
            let last = match b {
                Some(b) => Some(b - 1),
                None => first_hour(tree.range(start..end).next_back())?,
            };
            let (Some(first), Some(last)) = (first, last) else {
                continue;
            };
            let mut hour = first;
            while hour <= last {
                if crate::rollup::bucket_start_hour(hour, period) != hour {
                    // Not a period start (pieces are whole periods): read
                    // the rest plainly.
                    plain.push((family, period, Some(hour), b));
                    break;
                }
                let id = (family, period, hour);
                let projection = match hour_view {
                    Some(view) if period == Bucket::Hour => view,
                    _ => DimSet::default(),
                };
                let cells = self.cache().get(&id, projection);
                let cells = match cells {
                    Some(cells) => cells,
                    None => {
                        let mut raw =
                            Self::read_tree(tree, &[(family, period, Some(hour), Some(hour + 1))])?;
                        if !projection.is_empty() {
                            raw = project(raw, projection)?;
                        }
                        let cells = Arc::new(decode_cells(raw, symbols)?);
                        self.cache().insert(id, projection, cells.clone());
                        cells
                    }
                };
                out.push(cells);
                hour = crate::rollup::next_bucket_start(hour, period);
            }
        }
        out.push(Arc::new(decode_cells(
            Self::read_tree(tree, &plain)?,
            symbols,
        )?));
        Ok(())
    }

    /// The cells of the pieces, decoded: from the tree, and the deltas
    /// waiting in memory (a key may come twice; cells add up).
    pub(super) fn read_cells(
        &self,
        tree: &sled::Tree,
        pieces: &[Piece],
        hour_view: Option<DimSet>,
        symbols: &RwLock<Interner>,
    ) -> Result<Vec<Arc<Vec<QueryCell>>>> {
        self.wait_folds();
        let _stable = self
            .tree_lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut waiting: Vec<RawCell> = Vec::new();
        {
            let maps = self.read();
            for lane in &maps.lanes {
                // The frozen cells a checkpoint merged so far are in the
                // tree already.
                let frozen = lane
                    .frozen
                    .as_deref()
                    .map(|f| (f, lane.frozen_done.as_ref()));
                let maps = std::iter::once((&lane.active, None)).chain(frozen);
                for (map, merged) in maps {
                    for &(family, period, a, b) in pieces {
                        let (start, end) = range(family, period, a, b);
                        if merged.is_some_and(|done| *done >= end) {
                            continue;
                        }
                        if family >= Layout::family(0)
                            && crate::rollup::DERIVED_PERIODS.contains(&period)
                        {
                            // A view's weeks and months wait as its days:
                            // each day's cell is read under the key of its
                            // week or month, and cells of one key add up.
                            // A period an end falls inside counts whole,
                            // as the tree keeps it: its days after the end
                            // too.
                            let b_days = b.map(|b| {
                                let last = crate::rollup::bucket_start_hour(b - 1, period);
                                crate::rollup::next_bucket_start(last, period)
                            });
                            let (day_start, day_end) = range(family, Bucket::Day, a, b_days);
                            for (day, cells) in map.periods_in(&day_start, &day_end) {
                                let Some(target) = crate::rollup::derived_prefix(day, period)
                                else {
                                    continue;
                                };
                                if target[..] < start[..] || target[..] >= end[..] {
                                    continue;
                                }
                                for (key, agg) in cells {
                                    let k = [&target[..], &key[PREFIX..]].concat();
                                    if merged.is_some_and(|done| k <= *done) {
                                        continue;
                                    }
                                    let value = seal_value(&k, agg);
                                    waiting.push((k.into(), value.into()));
                                }
                            }
                            continue;
                        }
                        for (k, agg) in map.range(&start, &end) {
                            if merged.is_some_and(|done| k <= done) {
                                continue;
                            }
                            waiting.push((k.as_slice().into(), seal_value(k, agg).into()));
                        }
                    }
                }
            }
        }
        let mut out = vec![Arc::new(decode_cells(waiting, symbols)?)];
        self.read_tree_cached(tree, pieces, hour_view, symbols, &mut out)?;
        Ok(out)
    }
}

/// A cell's key and its new value (`None`: remove the cell).
pub(super) type CellWrite = (Vec<u8>, Option<Vec<u8>>);

/// The writes (key, new value or removal) that take `erased`, events about
/// to be removed, out of the rollups in `tree`: counts subtracted, their
/// customers taken out of exact sets, and sketches (which cannot forget)
/// rebuilt from the events that stay in the cell's period, which
/// `remaining(from_hour, to_hour)` returns.
pub(super) fn erase_corrections(
    tree: &sled::Tree,
    layout: &Layout,
    erased: &[crate::domain::PreferenceEvent],
    remaining: impl Fn(i64, i64) -> Result<Vec<crate::domain::PreferenceEvent>>,
) -> Result<Vec<CellWrite>> {
    use std::collections::{BTreeSet, HashSet};
    let customers: HashSet<u64> = erased
        .iter()
        .filter_map(|ev| crate::rollup::customer_hash(&ev.customer_pseudonym))
        .collect();
    // Each cell's new value (`None`: removed). The hours' cells are read
    // and rewritten an hour (all its blocks) at a time.
    let mut outcome: Vec<(Vec<u8>, Option<Agg>)> = Vec::new();
    let mut hours: BTreeMap<Vec<u8>, blocks::Hour> = BTreeMap::new();
    let mut rebuild: BTreeMap<Vec<u8>, Agg> = BTreeMap::new();
    for (key, delta) in crate::rollup::fold(erased.iter(), layout) {
        let stored = if blocks::in_blocks(&key) {
            let hour = match hours.entry(key[..blocks::PREFIX].to_vec()) {
                std::collections::btree_map::Entry::Occupied(hour) => hour.into_mut(),
                std::collections::btree_map::Entry::Vacant(hour) => {
                    hour.insert(blocks::read_hour(tree, &key)?)
                }
            };
            hour.cells.get(&key).cloned()
        } else {
            match tree.get(&key)? {
                Some(stored) => Some(
                    open_value(&key, &stored)
                        .and_then(Agg::decode_bytes)
                        .ok_or_else(|| corrupt(&key, "bad cell"))?,
                ),
                None => None,
            }
        };
        let Some(mut agg) = stored else {
            continue; // retention took the cell
        };
        agg.subtract_counts(&delta);
        if agg.events == 0 {
            outcome.push((key, None));
        } else if agg.hll.is_empty() {
            agg.customers.retain(|h| !customers.contains(h));
            outcome.push((key, Some(agg)));
        } else {
            rebuild.insert(key, agg);
        }
    }
    // Sketches: the customers of the remaining events, period by period.
    let periods: BTreeSet<(Bucket, i64)> = rebuild
        .keys()
        .filter_map(|k| parse_period_prefix(k).map(|(_, period, hour)| (period, hour)))
        .collect();
    // Each remaining event is read and folded once, over the union of the
    // periods (in hours): its cells land in every sketch being rebuilt
    // that it belongs to, whatever period brought it in. (Reading the
    // events period by period read an hour's events again for its day,
    // week and month: at 1M events over 30 days, 3.5M reads for one
    // customer's erasure.)
    let mut spans: Vec<(i64, i64)> = periods
        .into_iter()
        .map(|(period, start)| {
            let end = match period {
                Bucket::Hour => start + 1,
                _ => crate::rollup::next_bucket_start(start, period),
            };
            (start, end)
        })
        .collect();
    spans.sort_unstable();
    let mut union: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match union.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => union.push((start, end)),
        }
    }
    let mut customers_of: BTreeMap<Vec<u8>, Agg> = BTreeMap::new();
    for (start, end) in union {
        for ev in remaining(start, end)? {
            for (key, agg) in crate::rollup::fold(std::iter::once(&ev), layout) {
                if rebuild.contains_key(&key) {
                    let acc = customers_of.entry(key).or_default();
                    acc.merge_cell(&agg);
                }
            }
        }
    }
    for (key, mut agg) in rebuild {
        let acc = customers_of.remove(&key).unwrap_or_default();
        agg.customers = acc.customers;
        agg.hll = acc.hll;
        agg.hll_estimate = 0;
        agg.compact();
        outcome.push((key, Some(agg)));
    }
    let mut writes = Vec::new();
    for (key, agg) in outcome {
        let hour = blocks::in_blocks(&key)
            .then(|| hours.get_mut(&key[..blocks::PREFIX]))
            .flatten();
        if let Some(hour) = hour {
            match agg {
                Some(agg) => hour.cells.insert(key, agg),
                None => hour.cells.remove(&key),
            };
            continue;
        }
        writes.push(match agg {
            Some(mut agg) => {
                agg.seal();
                let value = seal_value(&key, &agg);
                (key, Some(value))
            }
            None => (key, None),
        });
    }
    for hour in hours.into_values() {
        writes.extend(hour.rewrite());
    }
    Ok(writes)
}

/// Whether `key` is the rollup tree's bookkeeping rather than a cell.
pub(super) fn is_meta_key(key: &[u8]) -> bool {
    [
        WATERMARK_KEY,
        VIEWS_WATERMARK_KEY,
        PARTIAL_KEY,
        VIEWS_PARTIAL_KEY,
    ]
    .contains(&key)
}

/// Checks a stored rollup entry (`admin verify`): the number of cells it
/// holds (none for the bookkeeping, one for a cell, a block's), or why it
/// is not sound.
pub(super) fn check_cell(key: &[u8], value: &[u8]) -> std::result::Result<usize, &'static str> {
    if key == PARTIAL_KEY || key == VIEWS_PARTIAL_KEY {
        return if value.len() < 8 {
            Err("partial checkpoint record is shorter than 8 bytes")
        } else {
            Ok(0)
        };
    }
    if is_meta_key(key) {
        return if value.len() != 8 {
            Err("watermark is not 8 bytes")
        } else {
            Ok(0)
        };
    }
    if blocks::in_blocks(key) {
        return blocks::check(key, value);
    }
    if crate::rollup::CellKey::decode(key).is_none() {
        return Err("key does not decode");
    }
    let body = open_value(key, value).ok_or("checksum mismatch")?;
    Agg::decode_bytes(body).ok_or("value does not decode")?;
    Ok(1)
}

/// Decodes stored cells for a query, interning their dimensions.
pub(super) fn decode_cells(
    raw: Vec<RawCell>,
    symbols: &RwLock<Interner>,
) -> Result<Vec<QueryCell>> {
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let mut symbols = symbols
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    raw.into_iter()
        .map(|(k, v)| QueryCell::decode(&k, v, &mut symbols).ok_or_else(|| corrupt(&k, "bad cell")))
        .collect()
}

/// `cells` merged onto the dimensions `keep`, encoded as stored (see
/// [`crate::rollup::project`]).
pub(super) fn project(cells: Vec<RawCell>, keep: DimSet) -> Result<Vec<RawCell>> {
    let projected = crate::rollup::project(cells.iter().map(|(k, v)| (&k[..], &v[..])), keep)
        .map_err(|k| corrupt(k, "bad cell"))?;
    Ok(sealed(projected))
}

/// Folded cells encoded as stored (value sealed with its checksum).
pub(super) fn sealed(cells: BTreeMap<Vec<u8>, Agg>) -> Vec<RawCell> {
    cells
        .into_iter()
        .map(|(k, agg)| {
            let value = seal_value(&k, &agg);
            (k.into(), value.into())
        })
        .collect()
}

fn range(family: u8, period: Bucket, a: Option<i64>, b: Option<i64>) -> (Vec<u8>, Vec<u8>) {
    use crate::rollup::period_prefix;
    (
        period_prefix(family, period, a.unwrap_or(i64::MIN)).to_vec(),
        period_prefix(family, period, b.unwrap_or(i64::MAX)).to_vec(),
    )
}

/// The start hour of a cell found by a range read.
fn first_hour(item: Option<sled::Result<RawCell>>) -> Result<Option<i64>> {
    match item {
        None => Ok(None),
        Some(item) => {
            let (k, _) = item?;
            let (_, _, hour) =
                parse_period_prefix(&k).ok_or_else(|| corrupt(&k, "bad cell key"))?;
            Ok(Some(hour))
        }
    }
}

pub(super) fn corrupt(k: &[u8], what: &str) -> Error {
    Error::Corrupt {
        tree: "rollups",
        key: format!("{k:?}"),
        source: super::DecodeError::Payload(format!(
            "{what} (rollups can be recomputed from the events: stop the node and run \
             `chainsight admin rebuild-rollups --config node.toml`)"
        )),
    }
}

/// Runs checkpoints until [`stop`] is called, then a last one.
pub(super) fn spawn_checkpointer(
    pending: Arc<Pending>,
    tree: sled::Tree,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rollup-checkpoint".into())
        .spawn(move || {
            let _span = tracing::info_span!("rollup_checkpoint").entered();
            // Not at a lower priority (it ran at nice 10 from 2cfdcc4 to
            // session 28): a thread that sled's epoch-based reclamation
            // sees inside an operation holds back the freeing of every
            // node version the writer replaces meanwhile, and a niced
            // thread preempted there for a few hundred milliseconds on
            // busy CPUs made the node's memory jump by 100-190 MiB
            // (`bench growth` at 10M; README, session 28); preempted inside
            // a sled batch it also held sled's global write lock, which
            // every commit waits for. The price: `bench propagate`'s p99,
            // where three nodes share two CPUs, rose about 1.7x.
            loop {
                let stopping = pending.stop.load(Ordering::SeqCst);
                let all = stopping || pending.draining.load(Ordering::SeqCst);
                let mut failed = false;
                // The pause is read under the lock `pause` takes after
                // setting it: read before, a pause could begin between the
                // read and the lock, and a checkpoint run into a rebuild.
                let checkpointing = pending
                    .checkpointing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if pending.paused.load(Ordering::SeqCst) == 0 {
                    for lane in Lane::ALL {
                        // When everything is to be merged, a checkpoint an
                        // earlier failure left unfinished is finished first,
                        // then what waits behind it.
                        for _ in 0..if all { 3 } else { 1 } {
                            if !all && !pending.read().lanes[lane as usize].due(lane) {
                                break;
                            }
                            match pending.checkpoint(&tree, lane) {
                                Ok(true) => {}
                                Ok(false) => break,
                                Err(e) => {
                                    failed = true;
                                    tracing::error!(error = %e, ?lane, "rollup checkpoint failed; will retry (queries still see the waiting deltas)");
                                    break;
                                }
                            }
                        }
                    }
                }
                drop(checkpointing);
                pending.failing.store(failed, Ordering::SeqCst);
                if failed {
                    // The writer may be waiting for room.
                    pending.wake.notify_all();
                }
                if stopping {
                    break;
                }
                let guard = pending
                    .wake_lock
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let idle = {
                    let maps = pending.read();
                    Lane::ALL
                        .iter()
                        .all(|lane| maps.lanes[*lane as usize].active_events < lane.events())
                };
                let draining = pending.draining.load(Ordering::SeqCst);
                let paused = pending.paused.load(Ordering::SeqCst) > 0;
                if failed || paused || (idle && !draining) {
                    // Until the first lane is due by time (not at the next
                    // of fixed one-second rounds: the rounds of nodes that
                    // started together stay in step, and so would their
                    // checkpoints, whatever their cadences), at most
                    // SETTLE; a lane at its count wakes this thread.
                    let wait = if failed || paused {
                        SETTLE
                    } else {
                        let maps = pending.read();
                        Lane::ALL
                            .iter()
                            .filter_map(|lane| maps.lanes[*lane as usize].due_in(*lane))
                            .min()
                            .map_or(SETTLE, |w| w.clamp(Duration::from_millis(1), SETTLE))
                    };
                    let _ = pending.wake.wait_timeout(guard, wait);
                }
            }
        })
        .map_err(|e| Error::Sled(sled::Error::Io(e)))
}

/// Asks the checkpointer to do a last checkpoint and end.
pub(super) fn stop(pending: &Pending) {
    pending.stop.store(true, Ordering::SeqCst);
    pending.wake.notify_all();
}

/// Every lane's watermark, for a rebuild to set.
pub(super) fn write_watermark(tree: &sled::Tree, upto: Seq) -> Result<()> {
    let mut batch = sled::Batch::default();
    for lane in Lane::ALL {
        batch.insert(lane.watermark_key(), &upto.to_be_bytes());
    }
    gate::apply_batch(tree, batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::CellKey;

    /// A `rollups` tree in a fresh sled database; the directory lives as
    /// long as the returned guard.
    fn rollups_tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("rollups").expect("tree");
        (dir, tree)
    }

    /// The folded window edges' protocol with the writer: a fold is served
    /// again only while no event of its hour was stored or removed, a
    /// write drops the folds of its hours before it writes, and a fold
    /// that a write began or ended during is never kept. (Folds are told
    /// apart by pointer: each call of `fresh` makes a new one.)
    #[test]
    fn folded_edges_are_never_kept_across_a_write() {
        let p = Pending::with_maps(Arc::new(Layout::base_only()), Maps::default());
        let hour = 493_000_i64;
        let nanos = |h: i64, minutes: i64| UnixNanos((h * 3600 + minutes * 60) * 1_000_000_000);
        let range = (nanos(hour, 20), nanos(hour + 1, 0));
        let view = DimSet::default();
        let fresh = || Ok(Arc::new(Vec::new()));
        let cached = || -> Result<Arc<Vec<QueryCell>>> { panic!("expected the kept fold") };
        let write = |hours: Option<&[i64]>| {
            p.begin_change(hours);
            p.end_change(hours);
        };
        let same = |x: &Arc<Vec<QueryCell>>, y: &Arc<Vec<QueryCell>>| Arc::ptr_eq(x, y);

        let a = p.edge_cells(range, view, fresh).expect("fold");
        assert!(same(&a, &p.edge_cells(range, view, cached).expect("kept")));
        // Events of other hours leave it.
        write(Some(&[hour - 1, hour + 1]));
        assert!(same(&a, &p.edge_cells(range, view, cached).expect("kept")));
        // A write of its hour drops it before writing, and nothing folded
        // while the write runs is kept.
        p.begin_change(Some(&[hour]));
        let b = p.edge_cells(range, view, fresh).expect("fold");
        assert!(!same(&a, &b));
        let c = p.edge_cells(range, view, fresh).expect("fold");
        assert!(!same(&b, &c), "folded during a write, not kept");
        p.end_change(Some(&[hour]));
        // A fold that a whole write happens during is not kept either.
        let d = p
            .edge_cells(range, view, || {
                write(Some(&[hour + 5]));
                fresh()
            })
            .expect("fold");
        let e = p.edge_cells(range, view, fresh).expect("fold");
        assert!(!same(&d, &e), "a write ran during the fold: not kept");
        assert!(same(&e, &p.edge_cells(range, view, cached).expect("kept")));
        // Removing events (any hour) drops every fold.
        write(None);
        assert!(!same(&e, &p.edge_cells(range, view, fresh).expect("fold")));
        // No cache: nothing kept.
        p.set_cache_budget(0);
        let f = p.edge_cells(range, view, fresh).expect("fold");
        assert!(!same(&f, &p.edge_cells(range, view, fresh).expect("fold")));
    }

    /// Waiting cells: merged per key, read by period range, sorted for a
    /// checkpoint in the order of their keys, dropped by period.
    #[test]
    fn waiting_cells_merge_by_key_and_read_by_period() {
        let key = |family: u8, hour: i64, gtin: &str| {
            CellKey {
                family,
                period: Bucket::Hour,
                hour,
                dims: crate::rollup::CellDims {
                    gtin: gtin.to_string(),
                    ..Default::default()
                },
            }
            .encode()
        };
        let one = || Agg {
            events: 1,
            ..Default::default()
        };
        let mut cells = Cells::default();
        for (hour, gtin) in [(5, "b"), (3, "z"), (5, "a"), (5, "b"), (-2, "m"), (3, "a")] {
            cells.merge(key(0, hour, gtin), one());
        }
        cells.merge(key(1, 0, "q"), one());
        assert_eq!(cells.get(&key(0, 5, "b")).map(|a| a.events), Some(2));
        let sorted: Vec<Vec<u8>> = cells.sorted().into_iter().map(|(k, _)| k.clone()).collect();
        let mut expected = sorted.clone();
        expected.sort();
        assert_eq!(sorted, expected);
        assert_eq!(sorted.len(), 6);
        let read = |cells: &Cells, from: i64, to: i64| -> u64 {
            let (start, end) = range(0, Bucket::Hour, Some(from), Some(to));
            cells.range(&start, &end).map(|(_, a)| a.events).sum()
        };
        assert_eq!(read(&cells, 3, 5), 2, "hour 3 only: the end is excluded");
        assert_eq!(read(&cells, -10, 6), 6);
        assert_eq!(read(&cells, 6, 100), 0);
        cells.retain_periods(|p| parse_period_prefix(p).is_some_and(|(_, _, h)| h >= 3));
        assert_eq!(read(&cells, -10, 6), 5);
        assert!(cells.get(&key(0, -2, "m")).is_none());
        cells.retain_periods(|_| false);
        assert!(cells.is_empty());
    }

    /// A panic while the waiting cells are held for writing stops every
    /// checkpoint: what it left half added never reaches the tree.
    #[test]
    fn no_checkpoint_merges_what_a_panic_left_half_added() {
        let (_dir, tree) = rollups_tree();
        let key = CellKey {
            family: Layout::family(0),
            period: Bucket::Day,
            hour: 48,
            dims: Default::default(),
        }
        .encode();
        let p = Pending::with_maps(Arc::new(Layout::default()), Maps::default());
        let one = Agg {
            events: 1,
            ..Default::default()
        };
        p.write().lane(Lane::Views).active.merge_ref(&key, &one);
        p.write().lane(Lane::Views).counted(1, 1);
        assert!(p.checkpoint(&tree, Lane::Views).expect("checkpoint"));
        assert_eq!(
            tree.len(),
            3 + 1,
            "the day cell, its week's and month's, and the lane's watermark"
        );
        let half = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut maps = p.write();
            maps.lane(Lane::Views).active.merge_ref(&key, &one);
            panic!("a fold that fails half way");
        }));
        assert!(half.is_err());
        let e = p.checkpoint(&tree, Lane::Views).expect_err("refused");
        assert!(e.to_string().contains("restart the node"), "{e}");
        let stored = tree.get(&key).expect("read").expect("cell");
        let stored = Agg::decode_bytes(crate::rollup::open_value(&key, &stored).expect("sealed"));
        assert_eq!(
            stored.map(|a| a.events),
            Some(1),
            "the half-added event is not merged"
        );
    }

    /// The writer folds each commit straight into the waiting cells: what
    /// waits is what `fold` gives for all the commits together, split by
    /// lane, but the views' weeks and months; and each lane counts every
    /// event. Those weeks and months, as a query reads them while they
    /// wait and as a checkpoint writes them, are the fold's.
    #[test]
    fn commits_fold_into_the_waiting_cells_as_one_fold_of_all_their_events() {
        use crate::domain::UnixNanos;
        let now = 1_790_000_000;
        let mut work = crate::workload::Workload::new(3, "w", 40, now);
        let events: Vec<crate::domain::PreferenceEvent> = (0..600)
            .map(|_| {
                crate::conversions::customer_event_from_pb(
                    work.next_event(),
                    UnixNanos(now * 1_000_000_000),
                )
                .expect("valid")
            })
            .map(|ev| crate::anonymise::Anonymiser::new("r", [7; 32]).anonymise(ev))
            .collect();
        let layout = Arc::new(Layout::default());
        let p = Pending::with_maps(layout.clone(), Maps::default());
        for (i, commit) in events.chunks(150).enumerate() {
            p.add(commit, commit.len() as u64, 150 * (i as u64 + 1));
        }
        let expected = by_lane(crate::rollup::fold(&events, &layout));
        let maps = p.read();
        for lane in Lane::ALL {
            let waiting = &maps.lanes[lane as usize];
            let got: Vec<(Vec<u8>, Vec<u8>)> = waiting
                .active
                .sorted()
                .into_iter()
                .map(|(k, a)| (k.clone(), a.encode()))
                .collect();
            let want: Vec<(Vec<u8>, Vec<u8>)> = expected[lane as usize]
                .iter()
                .filter(|(k, _)| !crate::rollup::is_derived(k))
                .map(|(k, a)| (k.clone(), a.encode()))
                .collect();
            assert!(!want.is_empty());
            assert_eq!(got.len(), want.len(), "{lane:?}");
            assert!(
                got == want,
                "{lane:?}: the waiting cells differ from the fold"
            );
            assert_eq!(waiting.active_events, 600);
            assert_eq!(waiting.active_upto, 600);
        }
        let weeks_and_months: BTreeMap<Vec<u8>, Agg> = expected[Lane::Views as usize]
            .iter()
            .filter(|(k, _)| crate::rollup::is_derived(k))
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect();
        let derived = derive(&maps.lanes[Lane::Views as usize].active);
        let derived: Vec<(Vec<u8>, Vec<u8>)> = derived
            .sorted()
            .into_iter()
            .map(|(k, a)| (k.clone(), a.encode()))
            .collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = weeks_and_months
            .iter()
            .map(|(k, a)| (k.clone(), a.encode()))
            .collect();
        assert!(want.len() > layout.views.len() * 2, "{}", want.len());
        assert!(
            derived == want,
            "derived weeks and months differ from the fold"
        );
        drop(maps);

        // Read while waiting, then merged: the same events and customers
        // per week and month of every view.
        let (_dir, tree) = rollups_tree();
        let per_cell = |p: &Pending| -> BTreeMap<(u8, u8, i64), (u64, u64)> {
            let mut pieces = Vec::new();
            for view in 0..layout.views.len() {
                for period in crate::rollup::DERIVED_PERIODS {
                    pieces.push((Layout::family(view), period, None, None));
                }
            }
            let symbols = RwLock::new(Interner::default());
            let mut out = BTreeMap::new();
            for cells in p.read_cells(&tree, &pieces, None, &symbols).expect("read") {
                for c in cells.iter() {
                    let e = out
                        .entry((c.family, c.period as u8, c.hour))
                        .or_insert((0, 0));
                    e.0 += c.counts.events;
                    e.1 += c.counts.purchases;
                }
            }
            out
        };
        let mut want = BTreeMap::new();
        for (k, a) in &weeks_and_months {
            let (family, period, hour) = parse_period_prefix(k).expect("prefix");
            let e = want.entry((family, period as u8, hour)).or_insert((0, 0));
            e.0 += a.events;
            e.1 += a.purchases;
        }
        assert_eq!(per_cell(&p), want, "waiting weeks and months as read");
        assert!(p.checkpoint(&tree, Lane::Views).expect("checkpoint"));
        assert!(!p.read().lanes[Lane::Views as usize].has_work());
        assert_eq!(per_cell(&p), want, "merged weeks and months as read");
        for (k, a) in &weeks_and_months {
            let mut sealed = Agg::default();
            sealed.merge_cell(a);
            sealed.seal();
            let stored = tree.get(k).expect("get").expect("merged cell");
            assert_eq!(stored.as_ref(), seal_value(k, &sealed).as_slice());
        }
    }

    /// The events a query of `piece` counts (tree and waiting cells).
    /// The example event under each of `ids`.
    fn examples(ids: impl Iterator<Item = String>) -> Vec<crate::domain::PreferenceEvent> {
        ids.map(|id| {
            let mut ev = crate::domain::PreferenceEvent::example();
            ev.event_id = id;
            ev
        })
        .collect()
    }

    /// The base family's cells of the hour `ev` occurred in.
    fn base_hour(ev: &crate::domain::PreferenceEvent) -> Piece {
        let hour = crate::rollup::hour_of(ev.occurred_at);
        (
            crate::rollup::FAMILY_BASE,
            Bucket::Hour,
            Some(hour),
            Some(hour + 1),
        )
    }

    fn events_read(p: &Pending, tree: &sled::Tree, piece: Piece) -> u64 {
        p.read_cells(tree, &[piece], None, &RwLock::new(Interner::default()))
            .expect("read")
            .iter()
            .flat_map(|cells| cells.iter())
            .map(|c| c.counts.events)
            .sum()
    }

    /// A fold takes the maps' lock chunk by chunk, and checkpoints run
    /// meanwhile: each one freezes whole commits only, so the tree holds
    /// exactly the events up to its watermark (what a restart refolds
    /// from), never part of a later commit.
    #[test]
    fn checkpoints_between_a_folds_chunks_freeze_whole_commits() {
        let (_dir, tree) = rollups_tree();
        let p = Arc::new(Pending::with_maps(
            Arc::new(Layout::default()),
            Maps::default(),
        ));
        let commits: Vec<Vec<crate::domain::PreferenceEvent>> = (0..30)
            .map(|c| examples((0..1000).map(|i| format!("e-{c}-{i}"))))
            .collect();
        let piece = base_hour(&commits[0][0]);
        let folder = {
            let p = p.clone();
            std::thread::spawn(move || {
                for (c, commit) in commits.iter().enumerate() {
                    p.fold_owed();
                    p.add(commit, commit.len() as u64, 1000 * (c as u64 + 1));
                    // Commits come apart (the checkpoints get their turns
                    // between them, and inside them).
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let mut checkpoints = 0;
        loop {
            let folding = !folder.is_finished();
            if p.checkpoint(&tree, Lane::Hours).expect("checkpoint") {
                checkpoints += 1;
            }
            let in_tree: u64 = Pending::read_tree(&tree, &[piece])
                .expect("read")
                .iter()
                .map(|(k, v)| {
                    crate::rollup::open_value(k, v)
                        .and_then(crate::rollup::AggRef::parse)
                        .expect("cell")
                        .counts
                        .events
                })
                .sum();
            let watermark = read_watermark(&tree, Lane::Hours.watermark_key())
                .expect("read")
                .unwrap_or(0);
            assert_eq!(
                in_tree, watermark,
                "the tree holds the events up to its watermark"
            );
            if !folding {
                break;
            }
        }
        folder.join().expect("folder");
        assert_eq!(events_read(&p, &tree, piece), 30_000);
        assert!(
            checkpoints > 1,
            "checkpoints ran while folds did: {checkpoints}"
        );
    }

    /// Backpressure holds the writer, never a fold: a fold that puts a
    /// lane over its bound returns at once (a query waiting for it goes
    /// on), and the writer's `wait_room` returns once a checkpoint made
    /// room.
    #[test]
    fn a_lane_over_its_bound_holds_the_writer_not_the_fold() {
        use std::sync::mpsc::{channel, RecvTimeoutError};
        let (_dir, tree) = rollups_tree();
        let p = Arc::new(Pending::with_maps(
            Arc::new(Layout::default()),
            Maps::default(),
        ));
        let events = examples((0..5).map(|i| format!("e-{i}")));
        let piece = base_hour(&events[0]);
        // One commit whose count puts the hours lane at its bound.
        let (done, folded) = channel();
        p.fold_owed();
        {
            let p = p.clone();
            std::thread::spawn(move || {
                p.add(&events, Lane::Hours.max_waiting(), 5);
                let _ = done.send(());
            });
        }
        folded
            .recv_timeout(Duration::from_secs(20))
            .expect("the fold returned though no checkpoint ran");
        assert_eq!(events_read(&p, &tree, piece), 5);
        let (done, room) = channel();
        {
            let p = p.clone();
            std::thread::spawn(move || {
                p.wait_room();
                let _ = done.send(());
            });
        }
        assert_eq!(
            room.recv_timeout(Duration::from_millis(300)),
            Err(RecvTimeoutError::Timeout),
            "the writer waits while the lane is over its bound"
        );
        assert!(p.checkpoint(&tree, Lane::Hours).expect("checkpoint"));
        room.recv_timeout(Duration::from_secs(20))
            .expect("the writer goes on once a checkpoint made room");
        assert_eq!(events_read(&p, &tree, piece), 5);
    }

    /// A commit's callers are answered before its fold: a query that
    /// starts after the answer waits for the fold, and counts the events.
    #[test]
    fn a_query_waits_for_the_fold_of_acknowledged_commits() {
        let (_dir, tree) = rollups_tree();
        let layout = Arc::new(Layout::default());
        let p = Arc::new(Pending::with_maps(layout.clone(), Maps::default()));
        let events = examples((0..5).map(|i| format!("e-{i}")));
        let piece = base_hour(&events[0]);
        let count = |p: &Pending| events_read(p, &tree, piece);
        assert_eq!(count(&p), 0);
        // The writer: the commit is acknowledged, and folded 200 ms later.
        p.fold_owed();
        let writer = {
            let (p, events) = (p.clone(), events.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                p.add(&events, 5, 5);
            })
        };
        assert_eq!(count(&p), 5, "the query waited for the fold");
        writer.join().expect("writer");
    }

    /// While a checkpoint merges a lane chunk by chunk, a query reads the
    /// cells merged so far from the tree and the rest from the frozen map:
    /// each once.
    #[test]
    fn a_query_during_a_chunked_checkpoint_counts_each_cell_once() {
        let (_dir, tree) = rollups_tree();
        let family = Layout::family(0);
        let key = |day: i64| {
            CellKey {
                family,
                period: Bucket::Day,
                hour: 24 * day,
                dims: Default::default(),
            }
            .encode()
        };
        let one = || Agg {
            events: 1,
            ..Default::default()
        };
        let frozen: BTreeMap<Vec<u8>, Agg> = (0..4).map(|d| (key(d), one())).collect();
        let events = |p: &Pending| events_read(p, &tree, (family, Bucket::Day, None, None));
        let p = Pending::with_maps(Arc::new(Layout::default()), Maps::default());
        {
            let mut maps = p.write();
            let lane = maps.lane(Lane::Views);
            let mut cells = Cells::default();
            cells.merge_all(frozen.clone());
            lane.frozen = Some(Arc::new(cells));
            lane.active.merge(key(1), one());
        }
        assert_eq!(events(&p), 5, "nothing merged yet");
        // The first two cells merged, as a chunk leaves them.
        let merged: BTreeMap<Vec<u8>, Agg> = frozen.into_iter().take(2).collect();
        crate::store::gate::apply_batch(&tree, merge_batch(&tree, &merged, 1).expect("batch"))
            .expect("apply");
        p.write().lane(Lane::Views).frozen_done = Some(key(1));
        assert_eq!(events(&p), 5, "two from the tree, two frozen, one active");
    }

    /// A views checkpoint of several chunks merges a due hours lane
    /// between its chunks, instead of letting the hourly cells pile up
    /// behind it; both lanes end merged, each cell counted once.
    #[test]
    fn a_views_checkpoint_merges_due_hours_between_its_chunks() {
        let (_dir, tree) = rollups_tree();
        let views = Layout::family(0);
        let cell = |family: u8, period: Bucket, hour: i64| {
            CellKey {
                family,
                period,
                hour,
                dims: Default::default(),
            }
            .encode()
        };
        let one = Agg {
            events: 1,
            ..Default::default()
        };
        let p = Pending::with_maps(Arc::new(Layout::default()), Maps::default());
        let days = 3 * CHUNK_CELLS as i64;
        {
            let mut maps = p.write();
            let lane = maps.lane(Lane::Views);
            for day in 0..days {
                lane.active
                    .merge_ref(&cell(views, Bucket::Day, 24 * day), &one);
            }
            lane.counted(days as u64, days as u64);
        }
        // A due hourly cell (it waited twice its lane's cadence).
        let hour = cell(crate::rollup::FAMILY_BASE, Bucket::Hour, 7);
        {
            let mut maps = p.write();
            let lane = maps.lane(Lane::Hours);
            lane.active.merge_ref(&hour, &one);
            lane.counted(1, days as u64);
            lane.since = std::time::Instant::now().checked_sub(Lane::Hours.every() * 2);
        }
        assert!(p.read().lanes[Lane::Hours as usize].due(Lane::Hours));
        assert!(p.checkpoint(&tree, Lane::Views).expect("checkpoint"));
        let maps = p.read();
        assert!(
            !maps.lanes[Lane::Hours as usize].has_work(),
            "a due hours lane waited for the whole views checkpoint"
        );
        assert!(!maps.lanes[Lane::Views as usize].has_work());
        drop(maps);
        assert!(tree.get(WATERMARK_KEY).expect("read").is_some());
        assert_eq!(
            events_read(
                &p,
                &tree,
                (crate::rollup::FAMILY_BASE, Bucket::Hour, None, None)
            ),
            1
        );
        assert_eq!(
            events_read(&p, &tree, (views, Bucket::Day, None, None)),
            days as u64
        );
    }

    /// The same for the views' weeks and months, which wait as days: at
    /// every point of a checkpoint's progress (its last merged key a day's
    /// or a derived week's or month's), each day counts once in its week
    /// and its month, and a period read up to an end inside it counts its
    /// days before that end.
    #[test]
    fn weeks_and_months_read_during_a_chunked_checkpoint_count_each_day_once() {
        let (_dir, tree) = rollups_tree();
        let family = Layout::family(0);
        // 2026-01-26 (a Monday) and the 40 days after: three months, six
        // weeks; one event a day, two on odd days, one more waiting.
        let first = 1_769_385_600 / 3600;
        let day_key = |day: i64| {
            CellKey {
                family,
                period: Bucket::Day,
                hour: first + 24 * day,
                dims: Default::default(),
            }
            .encode()
        };
        let n = |events| Agg {
            events,
            ..Default::default()
        };
        let mut cells = Cells::default();
        for day in 0..40 {
            cells.merge(day_key(day), n(1 + (day as u64 % 2)));
        }
        let frozen = Arc::new(cells);
        let p = Pending::with_maps(Arc::new(Layout::default()), Maps::default());
        {
            let mut maps = p.write();
            let lane = maps.lane(Lane::Views);
            lane.frozen = Some(frozen.clone());
            lane.active.merge(day_key(3), n(1));
        }
        // Per period start: its events, for the periods starting before
        // `end` (a period a read's end falls inside counts whole, as the
        // tree keeps it).
        let expected = |period: Bucket, end: Option<i64>| -> BTreeMap<i64, u64> {
            let mut out = BTreeMap::new();
            for day in 0..40 {
                let start = crate::rollup::bucket_start_hour(first + 24 * day, period);
                if end.is_some_and(|end| start >= end) {
                    continue;
                }
                *out.entry(start).or_insert(0) += 1 + (day as u64 % 2) + u64::from(day == 3);
            }
            out
        };
        let read = |p: &Pending, period: Bucket, end: Option<i64>| -> BTreeMap<i64, u64> {
            let mut out = BTreeMap::new();
            let pieces = [(family, period, None, end)];
            let symbols = RwLock::new(Interner::default());
            for cells in p.read_cells(&tree, &pieces, None, &symbols).expect("read") {
                for c in cells.iter() {
                    assert_eq!(c.period, period);
                    *out.entry(c.hour).or_insert(0) += c.counts.events;
                }
            }
            out
        };
        let derived = derive(&frozen);
        let all = merge_sorted(frozen.sorted(), derived.sorted());
        assert_eq!(all.len(), 40 + 6 + 3, "40 days, 6 weeks, 3 months");
        // An end inside a week and a month: 2026-02-04, a Wednesday.
        let inside = Some(first + 24 * 9);
        for merged in 0..=all.len() {
            if merged > 0 {
                let (key, delta) = all[merged - 1];
                let batch = merge_batch(&tree, [(key, delta)], 1).expect("batch");
                crate::store::gate::apply_batch(&tree, batch).expect("apply");
                p.write().lane(Lane::Views).frozen_done = Some(key.clone());
                // As a checkpoint's chunk does: its periods leave the cache.
                p.cache().remove(&parse_period_prefix(key).expect("prefix"));
            }
            for period in crate::rollup::DERIVED_PERIODS {
                for end in [None, inside] {
                    assert_eq!(
                        read(&p, period, end),
                        expected(period, end),
                        "{period:?} up to {end:?}, {merged} of {} merged",
                        all.len()
                    );
                }
            }
        }
    }

    /// A checkpoint sleeps between its chunks as long as each took (at
    /// most `PACE_MAX`) unless a lane has half its events bound waiting,
    /// or a drain, a stop or a pause waits for it.
    #[test]
    fn checkpoints_pace_themselves_unless_pressed() {
        let p = Pending::with_maps(Arc::new(Layout::default()), Maps::default());
        let ms = Duration::from_millis;
        assert_eq!(p.pause_after(ms(2)), Some(ms(2)));
        assert_eq!(p.pause_after(ms(40)), Some(PACE_MAX));
        for lane in Lane::ALL {
            p.write().lane(lane).active_events = lane.events() / 2 - 1;
            assert_eq!(p.pause_after(ms(2)), Some(ms(2)), "{lane:?} below half");
            p.write().lane(lane).active_events = lane.events() / 2;
            assert_eq!(p.pause_after(ms(2)), None, "{lane:?} at half its bound");
            p.write().lane(lane).active_events = 0;
        }
        for flag in [&p.stop, &p.draining] {
            flag.store(true, Ordering::SeqCst);
            assert_eq!(p.pause_after(ms(2)), None);
            flag.store(false, Ordering::SeqCst);
        }
        {
            let _paused = p.pause();
            assert_eq!(p.pause_after(ms(2)), None, "a pause waits");
        }
        assert_eq!(p.pause_after(ms(2)), Some(ms(2)));
    }

    /// A lane is due at its count or its cadence, or once no event came
    /// for [`SETTLE`]: an idle node does not keep deltas waiting.
    #[test]
    fn a_lane_settles_once_events_stop() {
        let mut lane = LaneMaps::default();
        assert!(!lane.due(Lane::Views), "nothing waits");
        lane.counted(10, 10);
        assert!(!lane.due(Lane::Views), "events still coming");
        let now = std::time::Instant::now();
        lane.last = now.checked_sub(SETTLE + Duration::from_millis(100));
        assert!(lane.due(Lane::Views), "quiet for longer than SETTLE");
        lane.last = Some(now);
        lane.since = now.checked_sub(Lane::Views.every().mul_f64(0.7));
        lane.jitter = -0.25;
        assert!(!lane.due(Lane::Views), "before its cadence");
        lane.jitter = -0.3;
        assert!(lane.due(Lane::Views), "waiting for its cadence");
        lane.jitter = 0.24;
        lane.since = now.checked_sub(Lane::Views.every().mul_f64(1.25));
        assert!(lane.due(Lane::Views), "waiting for the lane's cadence");
        let mut busy = LaneMaps::default();
        busy.counted(Lane::Views.events(), 1);
        assert!(busy.due(Lane::Views), "at the lane's count");
    }

    /// The checkpointer sleeps until the first lane is due by time: the
    /// lane's cadence (give or take its quarter) or SETTLE after the last
    /// delta, whichever comes first; nothing when nothing waits.
    #[test]
    fn a_lane_says_when_it_is_due() {
        let mut lane = LaneMaps::default();
        assert_eq!(lane.due_in(Lane::Hours), None, "nothing waits");
        lane.counted(10, 10);
        assert!((-0.25..0.25).contains(&lane.jitter), "{}", lane.jitter);
        let left = lane.due_in(Lane::Hours).expect("events wait");
        assert!(left <= SETTLE, "settles first: {left:?}");
        // The cadence alone (no delta seen lately).
        let now = std::time::Instant::now();
        lane.last = None;
        lane.jitter = 0.0;
        lane.since = now.checked_sub(Lane::Hours.every() - Duration::from_secs(3));
        let left = lane.due_in(Lane::Hours).expect("events wait");
        assert!(
            left <= Duration::from_secs(3) && left > Duration::from_secs(1),
            "{left:?}"
        );
        lane.jitter = 0.2;
        let later = lane.due_in(Lane::Hours).expect("events wait");
        assert!(
            later > left,
            "a positive share puts it off: {later:?} after {left:?}"
        );
        lane.jitter = 0.0;
        lane.since = now.checked_sub(Lane::Hours.every());
        assert_eq!(lane.due_in(Lane::Hours), Some(Duration::ZERO));
        assert!(lane.due(Lane::Hours));
        // Nothing counted starts no wait.
        let mut quiet = LaneMaps::default();
        quiet.counted(0, 7);
        assert_eq!(quiet.since, None);
        assert_eq!(quiet.due_in(Lane::Hours), None);
        quiet.counted(3, 9);
        assert!(quiet.since.is_some());
        // A new wait draws its own share.
        let draws: std::collections::HashSet<u64> = (0..20)
            .map(|_| {
                let mut l = LaneMaps::default();
                l.counted(1, 1);
                l.jitter.to_bits()
            })
            .collect();
        assert!(draws.len() > 1, "the cadence is drawn anew");
    }

    /// A stored cell (a view's) or an hour's block manifest that does not
    /// decode is reported, never merged into as if it were empty.
    #[test]
    fn a_corrupt_stored_cell_stops_the_merge_and_names_the_repair() {
        let (_dir, tree) = rollups_tree();
        let cell = |family, period, hour| CellKey {
            family,
            period,
            hour,
            dims: Default::default(),
        };
        let hour = cell(crate::rollup::FAMILY_BASE, Bucket::Hour, 7).encode();
        let day = cell(Layout::family(0), Bucket::Day, 24).encode();
        let garbage = &[0xff, 0xff, 0xff][..];
        for (cell, damaged) in [(&hour, &hour[..blocks::PREFIX]), (&day, &day[..])] {
            tree.insert(damaged, garbage).expect("garbage");
            let delta = Agg {
                events: 1,
                ..Default::default()
            };
            let cells = BTreeMap::from([(cell.clone(), delta)]);
            let err = prepare_batch(&tree, &cells, 1, &[Lane::Hours]).expect_err("corrupt cell");
            assert!(err.to_string().contains("rebuild-rollups"), "{err}");
            assert_eq!(tree.get(damaged).expect("get").as_deref(), Some(garbage));
            assert_eq!(tree.len(), 1 + usize::from(damaged == &day[..]));
        }
    }
}
