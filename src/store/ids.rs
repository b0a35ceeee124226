//! The event-id index (event_id → seq: deduplication, lookup by id), in
//! sled trees of two kinds.
//!
//! - Generations (`id_journal.0`, `id_journal.1`, …) hold the ids as
//!   commits write them (and erasures' tombstones): one journal record
//!   per commit, the ids held by id in memory (see
//!   [`super::id_journal`]). Cheap to write, but memory per id.
//!   Stores written before journals held a generation as a tree of one
//!   key per id (`by_id`, `by_id.1`, …): sled splits a leaf past 16 keys
//!   and keeps a few hundred bytes of memory per leaf whatever its cache
//!   size (at 10M events `by_id` alone was about 1M leaves and 380 MiB
//!   resident, session 22), and the inserts were about a third of the
//!   writer's time (session 32). Such trees are frozen at open and packed
//!   by the next pass.
//! - `id_packs` holds the ids of older generations, in id order, a few KB
//!   of them per key: key = the pack's last id, value = its entries (see
//!   [`encode`]). About 600 ids per key instead of one.
//!
//! The writer writes into the current generation only. A pass freezes it
//! (the writer goes on in a new, empty one, named in `meta` as
//! `id_generation`), merges the frozen generation's ids into the packs,
//! then drops its tree whole (sled frees its pages without a write per
//! key; removing the moved keys one by one took most of a pass's time).
//! A lookup reads the current generation, then the frozen one, then the
//! first pack whose key is at or after the id: a newer layer shadows an
//! older one (an erased event's tombstone over its packed number). A pack
//! batch is atomic, and a generation is dropped only once all its ids are
//! in packs: a lookup never misses an id, and a crash leaves at worst a
//! frozen generation that the next pass packs again (it is found by name
//! at open).
//!
//! A pass runs when the ids written since the last one reach an eighth of
//! those packed (at least [`MIN_PASS`], at most [`MAX_PASS`]): up to 2M
//! packed ids, whatever their order, each is then rewritten about eight
//! times over its life; beyond, random ids are rewritten more often (a
//! pass touches most packs), which keeps the generations, and the
//! memory they take, small. Ids that arrive in order (the
//! node's UUIDv7s, a retailer's running numbers) mostly land after every
//! pack or at one pack's end: a pass then writes new packs and rewrites
//! few.

use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use prost::encoding::{decode_varint, encode_varint, encoded_len_varint};

use super::id_journal::Journal;
use super::{gate, DecodeError, Error, Result, Seq};

/// Name of the packed tree.
pub(super) const PACKS_TREE: &str = "id_packs";
/// Name of the first generation (the index's only tree before packs).
const FIRST_GENERATION: &str = "by_id";
/// `meta` key: the current generation's number (u64; 0 or absent:
/// [`FIRST_GENERATION`]).
const META_GENERATION: &[u8] = b"id_generation";
/// First byte of a pack.
const PACK_V1: u8 = 1;
/// Most bytes of a pack (one entry more than fits is never split; ids are
/// at most 128 bytes). Small enough for sled's leaves of up to 17 packs to
/// stay out of its blob files (past 128 KiB), large enough for few keys.
pub(super) const MAX_PACK_BYTES: usize = 4 << 10;
/// Every this many entries an entry stores its id whole (a restart
/// point): lookups binary-search the restart points, then read at most
/// this many entries.
const RESTART_EVERY: usize = 16;
/// Fewest ids written since the last pass that start one (default).
pub(crate) const MIN_PASS: u64 = 100_000;
/// Most ids written since the last pass before the next is due (unless
/// the minimum is set higher): a generation's journal holds its ids in
/// memory (an id's bytes and about 40 more), and a frozen one stays
/// there while a pass packs it. Past 2M packed ids a pass then comes more
/// often than an eighth of them: ids in order still cost a pass little,
/// random ids rewrite more packs per id.
const MAX_PASS: u64 = 250_000;
/// Ids a round of a pass moves, about (see [`Ids::round`]).
const SLICE: usize = 32_768;
/// Bytes of packs a round writes, about.
const ROUND_BYTES: usize = 4 << 20;
/// `meta` key: ids in packs after the last pass (u64; the trigger's
/// measure, approximate after a crash).
const META_PACKED: &[u8] = b"id_packs_entries";
/// `meta` key: ids written since the last pass, as the packer last
/// recorded them (u64; every [`RECORD_EVERY`] and at stop), so that
/// restarts do not put a pass off.
const META_UNPACKED: &[u8] = b"id_unpacked";
/// How often the packer records the ids written since the last pass.
const RECORD_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The tree name of generation `n`.
fn generation_name(n: u64) -> String {
    if n == 0 {
        FIRST_GENERATION.to_string()
    } else {
        format!("{FIRST_GENERATION}.{n}")
    }
}

/// The generation a tree name is of, if it is one.
fn generation_of(name: &[u8]) -> Option<u64> {
    if name == FIRST_GENERATION.as_bytes() {
        return Some(0);
    }
    let rest = name
        .strip_prefix(FIRST_GENERATION.as_bytes())?
        .strip_prefix(b".")?;
    let n: u64 = std::str::from_utf8(rest).ok()?.parse().ok()?;
    // Only the names this module writes (not "by_id.01", "by_id.+1").
    (n > 0 && generation_name(n).as_bytes() == name).then_some(n)
}

/// The generations: the one written into, and those frozen, newest first.
pub(super) struct Generations {
    pub current: Arc<Journal>,
    number: u64,
    frozen: Vec<(u64, Layer)>,
}

impl Generations {
    /// The layers, newest first.
    fn layers(&self) -> Vec<Layer> {
        std::iter::once(Layer::Journal(self.current.clone()))
            .chain(self.frozen.iter().map(|(_, l)| l.clone()))
            .collect()
    }
}

/// A generation: a journal (see [`super::id_journal`]), or a tree of one
/// key per id as stores before journals wrote them (frozen at open, and
/// packed and dropped by the next pass).
#[derive(Clone)]
pub(super) enum Layer {
    Journal(Arc<Journal>),
    Tree(sled::Tree),
}

impl Layer {
    /// The value stored for `id` in this generation.
    fn get(&self, id: &[u8]) -> Result<Option<Seq>> {
        match self {
            Layer::Journal(j) => j.get(id),
            Layer::Tree(t) => match t.get(id)? {
                Some(v) => seq_of(&v, id).map(Some),
                None => Ok(None),
            },
        }
    }

    fn contains(&self, id: &[u8]) -> Result<bool> {
        match self {
            Layer::Journal(j) => Ok(j.contains(id)),
            Layer::Tree(t) => Ok(t.contains_key(id)?),
        }
    }

    #[cfg(test)]
    fn len(&self) -> u64 {
        match self {
            Layer::Journal(j) => j.len() as u64,
            Layer::Tree(t) => t.len() as u64,
        }
    }

    /// Its tree's name, as generation `n`.
    fn tree_name(&self, n: u64) -> String {
        match self {
            Layer::Journal(_) => super::id_journal::name(n),
            Layer::Tree(_) => generation_name(n),
        }
    }

    /// The entries (id, value as stored) after `from`, in id order.
    fn entries_after(
        &self,
        from: &Bound<Vec<u8>>,
    ) -> Box<dyn Iterator<Item = Result<(sled::IVec, sled::IVec)>> + '_> {
        match self {
            Layer::Tree(t) => Box::new(
                t.range::<Vec<u8>, _>((from.clone(), Bound::Unbounded))
                    .map(|item| item.map_err(Error::from)),
            ),
            Layer::Journal(j) => Box::new(j.entries_after(from).map(Ok)),
        }
    }

    /// Every entry, in id order, with its sequence number or why it
    /// cannot be read (a journal's damaged records too).
    fn entries(&self) -> Box<dyn Iterator<Item = Result<Entry>>> {
        match self {
            Layer::Tree(t) => Box::new(t.iter().map(|item| {
                let (key, value) = item?;
                Ok(Entry {
                    seq: seq_of(&value, &key),
                    id: key.to_vec(),
                })
            })),
            Layer::Journal(j) => {
                let (all, damaged) = j.snapshot();
                let tree = String::from_utf8_lossy(&j.tree().name()).into_owned();
                Box::new(
                    all.into_iter()
                        .map(|(id, value)| {
                            Ok(Entry {
                                seq: seq_of(&value, &id),
                                id,
                            })
                        })
                        .chain(damaged.into_iter().map(move |d| {
                            Ok(Entry {
                                seq: Err(corrupt(
                                    "id_journal",
                                    &d.key,
                                    format!("{tree}: {}", d.why),
                                )),
                                id: d.key,
                            })
                        })),
                )
            }
        }
    }
}

/// The index: the generations, the packs, and the pass's state.
pub(super) struct Ids {
    db: sled::Db,
    generations: RwLock<Generations>,
    packs: sled::Tree,
    /// The greatest key of `packs` (a pack's key is its last id), read
    /// again after every write of packs, before a frozen generation is
    /// dropped: an id after it is in no pack. A new id that sorts after
    /// every packed one (ids that arrive in order: the node's UUIDv7s, a
    /// retailer's running numbers, `bench ingest`'s) then needs no read of
    /// the packs; sled's range read copied the tree's last leaf (up to 17
    /// packs of 4 KiB) per lookup, a tenth of the store writer's time in
    /// `bench ingest` (session 34).
    last_pack: RwLock<Option<Vec<u8>>>,
    meta: sled::Tree,
    /// Ids written since the last pass began (approximate).
    unpacked: AtomicU64,
    /// Ids in packs (approximate).
    packed: AtomicU64,
    /// Held by a pass per round and while it drops a generation, and by
    /// what must not interleave with one (a snapshot's copy).
    moving: Mutex<()>,
    /// Held for a whole pass: one runs at a time (the packer thread's,
    /// or one a test starts), as freezing and packing assume.
    passing: Mutex<()>,
    /// Set to stop the packer thread.
    stop: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<()>,
    /// Fewest ids written since the last pass that start one.
    min_pass: AtomicU64,
    /// Ids and bytes of packs that make a round full ([`SLICE`],
    /// [`ROUND_BYTES`]; smaller in tests).
    slice: usize,
    round_bytes: usize,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct PassStats {
    /// Ids moved from generations into packs.
    pub moved: u64,
    /// Packs written (new and rewritten).
    pub packs_written: u64,
    /// Packs rewritten (they held ids before).
    pub packs_rewritten: u64,
    /// Generations packed and dropped.
    pub generations: u64,
    /// Entries kept unpacked (damaged, or falling into a damaged pack).
    pub carried: u64,
    /// Time spent dropping generations' trees (alone in the sled gate:
    /// every sled batch and transaction of the process waits meanwhile —
    /// the writer's larger commits, the rollup checkpointer's merges —
    /// see [`super::gate`]).
    pub dropping: std::time::Duration,
}

/// What a round writes: the packs, and the ids moved into them.
struct RoundOut {
    packs: sled::Batch,
    pack_bytes: usize,
    /// The ids dealt with (moved into packs, or carried).
    moved: Vec<sled::IVec>,
    /// Entries that stay in `by_id`: those that fall into a damaged pack,
    /// and damaged entries (id, value as stored).
    carried: Vec<(sled::IVec, sled::IVec)>,
    /// The damaged packs met, with what is wrong.
    damaged: Vec<(sled::IVec, Error)>,
    written: u64,
    rewritten: u64,
    /// Ids and bytes of packs that make a round full.
    slice: usize,
    round_bytes: usize,
}

impl RoundOut {
    fn new(slice: usize, round_bytes: usize) -> RoundOut {
        RoundOut {
            packs: sled::Batch::default(),
            pack_bytes: 0,
            moved: Vec::new(),
            carried: Vec::new(),
            damaged: Vec::new(),
            written: 0,
            rewritten: 0,
            slice,
            round_bytes,
        }
    }

    /// Whether the round has done its share.
    fn full(&self) -> bool {
        self.moved.len() >= self.slice || self.pack_bytes >= self.round_bytes
    }

    /// Keeps an entry in the current generation (see [`Ids::round`]).
    fn carry(&mut self, id: sled::IVec, value: sled::IVec) {
        self.moved.push(id.clone());
        self.carried.push((id, value));
    }

    /// Writes `group` (sorted, distinct ids, all at or before `target`'s
    /// key, or after every pack when `target` is `None`) into `target`'s
    /// entries, in packs of at most [`MAX_PACK_BYTES`]; the last pack
    /// keeps `target`'s key (its last id). Unless `last`, the last,
    /// partly filled pack of a group after every pack is left out, its ids
    /// left in `by_id`. Empties `group`.
    fn write(
        &mut self,
        target: Option<(sled::IVec, sled::IVec)>,
        group: &mut Vec<(sled::IVec, Seq)>,
        last: bool,
    ) -> Result<()> {
        let entries = match &target {
            Some((key, value)) => match decode(key, value) {
                Ok(old) => {
                    self.rewritten += 1;
                    merged(old, group)
                }
                Err(e) => {
                    // Its ids stay where they are found (`by_id`); the
                    // pack stays as it is, for verify to report.
                    for (id, seq) in group.drain(..) {
                        self.carry(id, sled::IVec::from(&seq.to_be_bytes()));
                    }
                    self.damaged.push((key.clone(), e));
                    return Ok(());
                }
            },
            None => group.iter().map(|(id, seq)| (id.to_vec(), *seq)).collect(),
        };
        let parts = split(&entries);
        let keep = if !last && target.is_none() && parts.len() > 1 {
            parts.len() - 1
        } else {
            parts.len()
        };
        let mut upto: &[u8] = &[];
        for part in &parts[..keep] {
            let key = &entries[part.end - 1].0;
            let value = encode(&entries[part.clone()]);
            self.pack_bytes += value.len();
            self.packs.insert(key.as_slice(), value);
            self.written += 1;
            upto = key;
        }
        let moved = group.partition_point(|(id, _)| id.as_ref() <= upto);
        self.moved
            .extend(group.drain(..).take(moved).map(|(id, _)| id));
        Ok(())
    }
}

impl Ids {
    pub(super) fn open(db: &sled::Db, meta: sled::Tree) -> Result<Ids> {
        let read_u64 = |key: &[u8]| -> sled::Result<u64> {
            Ok(meta
                .get(key)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes))
        };
        let mut number = read_u64(META_GENERATION)?;
        let mut current: Option<Journal> = None;
        let mut frozen: Vec<(u64, Layer)> = Vec::new();
        for name in db.tree_names() {
            if let Some(n) = super::id_journal::number_of(&name) {
                if n == number {
                    current = Some(Journal::open(db.open_tree(&name)?, MAX_PASS as usize)?);
                } else {
                    let journal = Journal::open(db.open_tree(&name)?, 0)?;
                    journal.freeze();
                    frozen.push((n, Layer::Journal(Arc::new(journal))));
                }
            } else if let Some(n) = generation_of(&name) {
                // A tree of one key per id, written before journals (the
                // current generation's too): frozen, for the next pass.
                let tree = db.open_tree(&name)?;
                if tree.is_empty() {
                    drop(tree);
                    gate::drop_tree(db, &name)?;
                } else {
                    frozen.push((n, Layer::Tree(tree)));
                }
            }
        }
        frozen.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let current = match current {
            Some(journal) => journal,
            None => {
                // A new store, or one written before journals: a new
                // generation after every one found, named before it is
                // written into.
                if let Some((newest, _)) = frozen.first() {
                    number = number.max(newest + 1);
                }
                meta.insert(META_GENERATION, &number.to_be_bytes())?;
                Journal::open(
                    db.open_tree(super::id_journal::name(number))?,
                    MAX_PASS as usize,
                )?
            }
        };
        // Ids written since the last pass, as last recorded; a store
        // written before packs is packed soon after it opens (its tree is
        // frozen: a pass is due).
        let unpacked = read_u64(META_UNPACKED)?;
        let packs = db.open_tree(PACKS_TREE)?;
        let last_pack = RwLock::new(packs.last()?.map(|(key, _)| key.to_vec()));
        Ok(Ids {
            db: db.clone(),
            generations: RwLock::new(Generations {
                current: Arc::new(current),
                number,
                frozen,
            }),
            packs,
            last_pack,
            unpacked: AtomicU64::new(unpacked),
            packed: AtomicU64::new(read_u64(META_PACKED)?),
            meta,
            moving: Mutex::new(()),
            passing: Mutex::new(()),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            min_pass: AtomicU64::new(MIN_PASS),
            slice: SLICE,
            round_bytes: ROUND_BYTES,
        })
    }

    /// The generations, for writing into the current one: a pass does
    /// not freeze it while the guard lives.
    pub(super) fn generations(&self) -> RwLockReadGuard<'_, Generations> {
        self.generations
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Passes are due after `min_pass` ids (at least 1) or an eighth of
    /// those packed.
    pub(super) fn set_min_pass(&self, min_pass: u64) {
        self.min_pass.store(min_pass.max(1), Ordering::Relaxed);
        self.written(0);
    }

    /// The sequence number stored for `id` (or a tombstone's).
    pub(super) fn get(&self, id: &[u8]) -> Result<Option<Seq>> {
        let generations = self.generations();
        if let Some(seq) = generations.current.get(id)? {
            return Ok(Some(seq));
        }
        for (_, layer) in &generations.frozen {
            if let Some(seq) = layer.get(id)? {
                return Ok(Some(seq));
            }
        }
        let past_packs = match &*self.last_pack.read().unwrap_or_else(|e| e.into_inner()) {
            Some(last) => id > last.as_slice(),
            None => true,
        };
        if !past_packs {
            if let Some(item) = self.packs.range(id..).next() {
                let (key, value) = item?;
                if let Some(seq) = find(&key, &value, id)? {
                    return Ok(Some(seq));
                }
            }
        }
        // A journal record that cannot be read may hold any id: one not
        // found is refused rather than stored a second time.
        let damaged = std::iter::once(&generations.current)
            .chain(generations.frozen.iter().filter_map(|(_, l)| match l {
                Layer::Journal(j) => Some(j),
                Layer::Tree(_) => None,
            }))
            .find(|j| j.has_damaged());
        match damaged {
            Some(journal) => Err(corrupt(
                "id_journal",
                &journal.tree().name(),
                "a record of the event-id index cannot be read and may hold this id",
            )),
            None => Ok(None),
        }
    }

    /// Keeps passes from moving ids while the guard lives (a snapshot's
    /// copy of the trees).
    pub(super) fn pause(&self) -> MutexGuard<'_, ()> {
        self.moving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts `n` ids written, and wakes the packer when a pass is due.
    pub(super) fn written(&self, n: u64) {
        let unpacked = self.unpacked.fetch_add(n, Ordering::Relaxed) + n;
        if unpacked >= self.due_at() {
            let _guard = self
                .wake_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.wake.notify_all();
        }
    }

    /// Ids written since the last pass that make the next one due: an
    /// eighth of those packed, at most [`MAX_PASS`], at least the minimum.
    fn due_at(&self) -> u64 {
        self.min_pass
            .load(Ordering::Relaxed)
            .max((self.packed.load(Ordering::Relaxed) / 8).min(MAX_PASS))
    }

    /// Records the ids written since the last pass in `meta`.
    fn record_unpacked(&self) -> Result<()> {
        let n = self.unpacked.load(Ordering::Relaxed).min(u64::MAX / 4);
        self.meta.insert(META_UNPACKED, &n.to_be_bytes())?;
        Ok(())
    }

    /// Whether a pass is due: enough new ids, or a frozen generation
    /// left by a pass that a crash or a failure cut short.
    fn due(&self) -> bool {
        self.unpacked.load(Ordering::Relaxed) >= self.due_at()
            || !self.generations().frozen.is_empty()
    }

    /// Freezes the current generation (unless one is frozen already:
    /// a pass a crash or a failure cut short goes on first), then packs
    /// each frozen generation, oldest first, in rounds (see
    /// [`Self::round`]) holding [`Self::pause`] during each, and drops
    /// it. Stops early when the packer is stopped.
    pub(super) fn pass(&self) -> Result<PassStats> {
        let _passing = self
            .passing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stats = PassStats::default();
        self.unpacked.store(0, Ordering::Relaxed);
        self.record_unpacked()?;
        if self.generations().frozen.is_empty() {
            let _moving = self.pause();
            // Only a pass changes the number, and one runs at a time
            // (`passing`).
            let next = self.generations().number + 1;
            let journal = Arc::new(Journal::create(&self.db, next, MAX_PASS as usize)?);
            let old = {
                let mut g = self
                    .generations
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Named before written into: a crash after this finds the
                // old generation at open, frozen.
                self.meta.insert(META_GENERATION, &next.to_be_bytes())?;
                let old = std::mem::replace(&mut g.current, journal);
                let number = g.number;
                g.frozen.push((number, Layer::Journal(old.clone())));
                g.number = next;
                old
            };
            // Its ids in order, for the rounds (the writer goes on in the
            // new one meanwhile).
            old.freeze();
        }
        loop {
            let Some((number, layer)) = self.generations().frozen.last().cloned() else {
                break;
            };
            let mut from: Bound<Vec<u8>> = Bound::Unbounded;
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    return Ok(stats);
                }
                let _moving = self.pause();
                let Some(last) = self.round(&layer, &from, &mut stats)? else {
                    break;
                };
                from = Bound::Excluded(last.to_vec());
            }
            let _moving = self.pause();
            if let Layer::Journal(journal) = &layer {
                // Records that cannot be read go on in the current
                // journal, for verify to report.
                let damaged = journal.damaged();
                if !damaged.is_empty() {
                    self.generations().current.carry_damaged(&damaged)?;
                }
            }
            {
                let mut g = self
                    .generations
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                g.frozen.retain(|(n, _)| *n != number);
            }
            let name = layer.tree_name(number);
            drop(layer);
            let dropping = std::time::Instant::now();
            gate::drop_tree(&self.db, name)?;
            stats.dropping += dropping.elapsed();
            stats.generations += 1;
        }
        Ok(stats)
    }

    /// One round of a pass: walks the frozen generation `tree` after
    /// `from`, in order, gathering each run of ids that falls into one
    /// pack (at or before its key) and writing that pack again with them,
    /// or, after every pack, writing new packs of them; until about
    /// [`SLICE`] ids or [`ROUND_BYTES`] of packs, at a pack's end. Then
    /// writes the packs (one batch). Returns the last id moved (`None`:
    /// nothing left). Walking in order, a pass writes each pack at most
    /// once.
    fn round(
        &self,
        layer: &Layer,
        from: &Bound<Vec<u8>>,
        stats: &mut PassStats,
    ) -> Result<Option<sled::IVec>> {
        let mut out = RoundOut::new(self.slice, self.round_bytes);
        let mut group: Vec<(sled::IVec, Seq)> = Vec::new();
        let mut target: Option<(sled::IVec, sled::IVec)> = None;
        let mut ended = true;
        for item in layer.entries_after(from) {
            let (key, value) = item?;
            let Ok(seq) = seq_of(&value, &key) else {
                // Damaged: kept as it is, for verify to report.
                out.carry(key, value);
                continue;
            };
            let in_group = match &target {
                _ if group.is_empty() => false,
                Some((last, _)) => key <= *last,
                None => true,
            };
            if !in_group && !group.is_empty() {
                out.write(target.take(), &mut group, true)?;
                if out.full() {
                    ended = false;
                    break;
                }
            }
            if group.is_empty() {
                target = self.packs.range(key.as_ref()..).next().transpose()?;
            }
            group.push((key, seq));
            if target.is_none() && group.len() >= self.slice {
                // After every pack: its filled packs now; the rest is read
                // again by the next round.
                out.write(None, &mut group, false)?;
                ended = false;
                break;
            }
        }
        if ended && !group.is_empty() {
            out.write(target.take(), &mut group, true)?;
        }
        let Some(last) = out.moved.last().cloned() else {
            return Ok(None);
        };
        gate::apply_batch(&self.packs, out.packs)?;
        *self
            .last_pack
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            self.packs.last()?.map(|(key, _)| key.to_vec());
        if !out.carried.is_empty() {
            // Into the current generation unless it has the id (a newer
            // value), before the frozen one is dropped.
            let generations = self.generations();
            // The generation packed is the oldest frozen one (the last);
            // a newer one's value for an id stays in force.
            let newer = &generations.frozen[..generations.frozen.len().saturating_sub(1)];
            for (id, value) in &out.carried {
                let mut shadowed = false;
                for (_, layer) in newer {
                    if layer.contains(id)? {
                        shadowed = true;
                        break;
                    }
                }
                if !shadowed {
                    generations.current.insert_absent(id, value)?;
                }
            }
        }
        for (key, e) in &out.damaged {
            tracing::warn!(pack = %String::from_utf8_lossy(key), error = %e, "a damaged pack of event ids: the ids that fall into it stay unpacked, and publishes of ids it may hold are refused; stop the node and run `chainsight admin verify`");
        }
        stats.carried += out.carried.len() as u64;
        let moved = (out.moved.len() - out.carried.len()) as u64;
        let packed = self.packed.fetch_add(moved, Ordering::Relaxed) + moved;
        self.meta.insert(META_PACKED, &packed.to_be_bytes())?;
        stats.moved += moved;
        stats.packs_written += out.written;
        stats.packs_rewritten += out.rewritten;
        Ok(Some(last))
    }

    /// Every entry that is in force: those of the generations, newest
    /// first, then those of the packs, each unless a newer layer holds
    /// its id too; with its sequence number or the reason it is damaged.
    pub(super) fn entries(&self) -> impl Iterator<Item = Result<Entry>> + '_ {
        let trees: Arc<Vec<Layer>> = Arc::new(self.generations().layers());
        let layers = trees.len();
        // An entry read in `layer` (0: the current generation; `layers`:
        // the packs), unless a newer layer holds its id.
        let keep = {
            let trees = trees.clone();
            move |layer: usize, entry: Entry| -> Option<Result<Entry>> {
                for newer in &trees[..layer] {
                    match newer.contains(&entry.id) {
                        Ok(true) => return None,
                        Ok(false) => {}
                        Err(e) => return Some(Err(e)),
                    }
                }
                Some(Ok(entry))
            }
        };
        let in_packs = keep.clone();
        let generations = (0..layers).flat_map(move |layer| {
            let keep = keep.clone();
            trees[layer].entries().filter_map(move |item| match item {
                Err(e) => Some(Err(e)),
                Ok(entry) => keep(layer, entry),
            })
        });
        let packed = self
            .packs
            .iter()
            .flat_map(move |item| -> Vec<Result<Entry>> {
                match item {
                    Err(e) => vec![Err(e.into())],
                    Ok((key, value)) => match decode(&key, &value) {
                        Ok(entries) => entries
                            .into_iter()
                            .filter_map(|(id, seq)| in_packs(layers, Entry { id, seq: Ok(seq) }))
                            .collect(),
                        Err(e) => vec![Ok(Entry {
                            id: key.to_vec(),
                            seq: Err(e),
                        })],
                    },
                }
            });
        generations.chain(packed)
    }

    /// Ids in force (a full scan, with passes paused).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        let _paused = self.pause();
        self.entries().count()
    }

    /// Ids in the generations and in packs (a full scan).
    #[cfg(test)]
    pub(super) fn counts(&self) -> Result<(u64, u64)> {
        let hot = self.generations().layers().iter().map(Layer::len).sum();
        let mut packed = 0;
        for item in self.packs.iter() {
            let (key, value) = item?;
            packed += decode(&key, &value)?.len() as u64;
        }
        Ok((hot, packed))
    }
}

/// One entry of the index, as [`Ids::entries`] reads it.
pub(super) struct Entry {
    pub id: Vec<u8>,
    /// Its sequence number, or why it cannot be read.
    pub seq: Result<Seq>,
}

/// The thread that runs passes when due, until [`stop`].
pub(super) fn spawn_packer(ids: Arc<Ids>) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("id-packer".into())
        .spawn(move || {
            let _span = tracing::info_span!("id_packer").entered();
            // At normal priority, like the rollup checkpointer (see
            // `rollups::spawn_checkpointer` for why).
            let mut failures = 0u32;
            let mut recorded = u64::MAX;
            loop {
                {
                    let guard = ids
                        .wake_lock
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let wait = if failures > 0 {
                        std::time::Duration::from_secs(u64::from(failures.min(6)) * 10)
                    } else {
                        RECORD_EVERY
                    };
                    let _ = ids
                        .wake
                        .wait_timeout_while(guard, wait, |_| {
                            !ids.stop.load(Ordering::SeqCst) && (failures > 0 || !ids.due())
                        })
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if ids.stop.load(Ordering::SeqCst) {
                    if let Err(e) = ids.record_unpacked() {
                        tracing::debug!(error = %e, "could not record the ids written since the last pass");
                    }
                    break;
                }
                if !ids.due() && failures == 0 {
                    let n = ids.unpacked.load(Ordering::Relaxed);
                    if n != recorded {
                        match ids.record_unpacked() {
                            Ok(()) => recorded = n,
                            Err(e) => tracing::debug!(error = %e, "could not record the ids written since the last pass"),
                        }
                    }
                    continue;
                }
                let started = std::time::Instant::now();
                match ids.pass() {
                    Ok(stats) => {
                        failures = 0;
                        tracing::info!(
                            moved = stats.moved,
                            packs_written = stats.packs_written,
                            packs_rewritten = stats.packs_rewritten,
                            generations = stats.generations,
                            carried = stats.carried,
                            dropping = ?stats.dropping,
                            batches_waited_in_all = ?gate::waited(),
                            packed = ids.packed.load(Ordering::Relaxed),
                            elapsed = ?started.elapsed(),
                            "event ids packed"
                        );
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::error!(error = %e, "packing event ids failed; will retry (deduplication is unaffected: the ids stay in their generation)");
                    }
                }
            }
        })
        .map_err(|e| Error::Sled(sled::Error::Io(e)))
}

/// Stops the packer thread (at the end of its current slice).
pub(super) fn stop(ids: &Ids) {
    ids.stop.store(true, Ordering::SeqCst);
    let _guard = ids
        .wake_lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ids.wake.notify_all();
}

fn corrupt(tree: &'static str, key: &[u8], what: impl Into<String>) -> Error {
    Error::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        source: DecodeError::Payload(what.into()),
    }
}

/// A generation's value as a sequence number.
fn seq_of(value: &[u8], id: &[u8]) -> Result<Seq> {
    super::seq_from(value, "by_id", &String::from_utf8_lossy(id))
}

/// `entries` (sorted, distinct) with `new` (sorted, distinct) merged in;
/// `new` wins where both have an id.
fn merged(entries: Vec<(Vec<u8>, Seq)>, new: &[(sled::IVec, Seq)]) -> Vec<(Vec<u8>, Seq)> {
    let mut out = Vec::with_capacity(entries.len() + new.len());
    let mut old = entries.into_iter().peekable();
    for (id, seq) in new {
        while let Some(o) = old.next_if(|(o, _)| o.as_slice() < id.as_ref()) {
            out.push(o);
        }
        old.next_if(|(o, _)| o.as_slice() == id.as_ref());
        out.push((id.to_vec(), *seq));
    }
    out.extend(old);
    out
}

/// Bytes an entry takes after `prev` (`None` at a restart point).
fn entry_len(prev: Option<&[u8]>, id: &[u8], seq: Seq) -> usize {
    let shared = prev.map_or(0, |p| shared_len(p, id));
    let rest = id.len() - shared;
    encoded_len_varint(shared as u64)
        + encoded_len_varint(rest as u64)
        + rest
        + encoded_len_varint(seq)
}

fn shared_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `entries` cut into runs whose packs are at most [`MAX_PACK_BYTES`]
/// (each at least one entry), all but the last filled.
fn split(entries: &[(Vec<u8>, Seq)]) -> Vec<std::ops::Range<usize>> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0usize, 1 + 4);
    for (i, (id, seq)) in entries.iter().enumerate() {
        let n = i - start;
        let prev = (n % RESTART_EVERY != 0).then(|| entries[i - 1].0.as_slice());
        let mut cost = entry_len(prev, id, *seq);
        if n % RESTART_EVERY == 0 {
            cost += 4;
        }
        if n > 0 && bytes + cost > MAX_PACK_BYTES {
            parts.push(start..i);
            start = i;
            bytes = 1 + 4 + entry_len(None, id, *seq) + 4;
        } else {
            bytes += cost;
        }
    }
    if start < entries.len() {
        parts.push(start..entries.len());
    }
    parts
}

/// A pack of `entries` (sorted, distinct, at least one): [`PACK_V1`],
/// then per entry the bytes its id shares with the previous id (varint; 0
/// at every [`RESTART_EVERY`]th entry, a restart point), the rest behind
/// its length (varint) and the sequence number (varint); then the offset
/// of each restart point (u32 LE) and their number (u32 LE).
fn encode(entries: &[(Vec<u8>, Seq)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_PACK_BYTES);
    out.push(PACK_V1);
    let mut restarts: Vec<u32> = Vec::new();
    for (i, (id, seq)) in entries.iter().enumerate() {
        let shared = if i % RESTART_EVERY == 0 {
            restarts.push(out.len() as u32);
            0
        } else {
            shared_len(&entries[i - 1].0, id)
        };
        encode_varint(shared as u64, &mut out);
        encode_varint((id.len() - shared) as u64, &mut out);
        out.extend_from_slice(&id[shared..]);
        encode_varint(*seq, &mut out);
    }
    for r in &restarts {
        out.extend_from_slice(&r.to_le_bytes());
    }
    out.extend_from_slice(&(restarts.len() as u32).to_le_bytes());
    out
}

/// A pack's parts: where its entries end, and its restart points.
struct Layout<'a> {
    value: &'a [u8],
    entries_end: usize,
    restarts: Vec<usize>,
}

fn layout<'a>(key: &[u8], value: &'a [u8]) -> Result<Layout<'a>> {
    let bad = |what: &str| corrupt(PACKS_TREE, key, format!("bad id pack: {what}"));
    if value.first() != Some(&PACK_V1) {
        return Err(bad("unknown format"));
    }
    let n = value
        .len()
        .checked_sub(4)
        .filter(|at| *at >= 1)
        .map(|at| u32::from_le_bytes(value[at..].try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| bad("too short"))?;
    let entries_end = n
        .checked_mul(4)
        .and_then(|b| b.checked_add(4))
        .and_then(|b| value.len().checked_sub(b))
        .filter(|end| *end >= 1 && n >= 1)
        .ok_or_else(|| bad("restart points out of range"))?;
    let mut restarts = Vec::with_capacity(n);
    for i in 0..n {
        let at = entries_end + 4 * i;
        let r = u32::from_le_bytes(value[at..at + 4].try_into().expect("4 bytes")) as usize;
        if r < 1 || r >= entries_end || restarts.last().is_some_and(|p| *p >= r) {
            return Err(bad("restart point out of order"));
        }
        restarts.push(r);
    }
    if restarts[0] != 1 {
        return Err(bad("first restart point not at the first entry"));
    }
    Ok(Layout {
        value,
        entries_end,
        restarts,
    })
}

/// Reads the entry at `*at` after the id in `id` (replaced by this one's);
/// returns its sequence number.
fn read_entry(key: &[u8], l: &Layout<'_>, at: &mut usize, id: &mut Vec<u8>) -> Result<Seq> {
    let bad = |what: &str| corrupt(PACKS_TREE, key, format!("bad id pack: {what}"));
    let mut buf = &l.value[*at..l.entries_end];
    let before = buf.len();
    let shared = decode_varint(&mut buf).map_err(|_| bad("bad length"))? as usize;
    let rest = decode_varint(&mut buf).map_err(|_| bad("bad length"))? as usize;
    if shared > id.len() || rest > buf.len() {
        return Err(bad("entry out of range"));
    }
    id.truncate(shared);
    id.extend_from_slice(&buf[..rest]);
    buf = &buf[rest..];
    let seq = decode_varint(&mut buf).map_err(|_| bad("bad sequence number"))?;
    *at += before - buf.len();
    Ok(seq)
}

/// Every entry of a pack, checked: ids strictly ascending, the last one
/// the key, restart points where the ids start whole.
fn decode(key: &[u8], value: &[u8]) -> Result<Vec<(Vec<u8>, Seq)>> {
    let l = layout(key, value)?;
    let bad = |what: &str| corrupt(PACKS_TREE, key, format!("bad id pack: {what}"));
    let mut out: Vec<(Vec<u8>, Seq)> = Vec::with_capacity(l.entries_end / 8);
    let (mut at, mut id, mut restart) = (1usize, Vec::new(), 0usize);
    while at < l.entries_end {
        if l.restarts.get(restart) == Some(&at) {
            id.clear();
            restart += 1;
        } else if out.len().is_multiple_of(RESTART_EVERY) {
            return Err(bad("restart point missing"));
        }
        let seq = read_entry(key, &l, &mut at, &mut id)?;
        if out.last().is_some_and(|(prev, _)| *prev >= id) {
            return Err(bad("ids out of order"));
        }
        out.push((id.clone(), seq));
    }
    if restart != l.restarts.len() {
        return Err(bad("restart point inside an entry"));
    }
    if out.last().map(|(id, _)| id.as_slice()) != Some(key) {
        return Err(bad("last id is not the key"));
    }
    Ok(out)
}

/// `id`'s sequence number in the pack under `key`, if it holds `id`.
fn find(key: &[u8], value: &[u8], id: &[u8]) -> Result<Option<Seq>> {
    let l = layout(key, value)?;
    // The last restart point whose id is at or before `id`.
    let (mut lo, mut hi) = (0usize, l.restarts.len());
    let mut scratch = Vec::new();
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let mut at = l.restarts[mid];
        scratch.clear();
        read_entry(key, &l, &mut at, &mut scratch)?;
        if scratch.as_slice() <= id {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut at = l.restarts[lo];
    let end = l.restarts.get(lo + 1).copied().unwrap_or(l.entries_end);
    scratch.clear();
    while at < end {
        let seq = read_entry(key, &l, &mut at, &mut scratch)?;
        match scratch.as_slice().cmp(id) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Ok(Some(seq)),
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, f: impl Fn(usize) -> String) -> Vec<(Vec<u8>, Seq)> {
        let mut v: Vec<(Vec<u8>, Seq)> =
            (0..n).map(|i| (f(i).into_bytes(), i as Seq + 1)).collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        v
    }

    #[test]
    fn packs_encode_decode_and_find_every_id() {
        for n in [1, 2, 15, 16, 17, 33, 200] {
            let entries = ids(n, |i| format!("ev-{i:07}"));
            let parts = split(&entries);
            for part in parts {
                let pack = &entries[part];
                let value = encode(pack);
                assert!(value.len() <= MAX_PACK_BYTES, "{}", value.len());
                let key = &pack.last().expect("one").0;
                assert_eq!(decode(key, &value).expect("decodes"), pack);
                for (id, seq) in pack {
                    assert_eq!(find(key, &value, id).expect("reads"), Some(*seq));
                    let mut missing = id.clone();
                    missing.push(b'x');
                    assert_eq!(find(key, &value, &missing).expect("reads"), None);
                }
                assert_eq!(find(key, &value, b"a").expect("reads"), None);
                assert_eq!(find(key, &value, b"zzz").expect("reads"), None);
            }
        }
    }

    #[test]
    fn split_fills_every_part_but_the_last() {
        let entries = ids(20_000, |i| {
            format!(
                "{:032x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c)
            )
        });
        let parts = split(&entries);
        assert!(parts.len() > 10);
        let sizes: Vec<usize> = parts
            .iter()
            .map(|p| encode(&entries[p.clone()]).len())
            .collect();
        assert!(sizes.iter().all(|s| *s <= MAX_PACK_BYTES), "{sizes:?}");
        assert!(
            sizes[..sizes.len() - 1]
                .iter()
                .all(|s| *s > MAX_PACK_BYTES - 64),
            "{sizes:?}"
        );
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), entries.len());
    }

    #[test]
    fn damaged_packs_are_errors_not_panics() {
        let entries = ids(40, |i| format!("ev-{i:04}"));
        let key = entries.last().expect("one").0.clone();
        let value = encode(&entries);
        assert!(decode(b"ev-0038", &value).is_err(), "wrong key");
        for len in 0..value.len() {
            assert!(decode(&key, &value[..len]).is_err(), "cut at {len}");
            let _ = find(&key, &value[..len], b"ev-0007");
        }
        for i in 0..value.len() {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut v = value.clone();
                v[i] ^= bit;
                let _ = decode(&key, &v);
                let _ = find(&key, &v, b"ev-0007");
                let _ = find(&key, &v, b"ev-0039");
            }
        }
    }

    fn open_ids(dir: &std::path::Path) -> (sled::Db, Ids) {
        // A database dropped just before may still hold its lock.
        let db = crate::store::retry_open(|| sled::Config::new().path(dir).open());
        let meta = db.open_tree("meta").expect("tree");
        let ids = Ids::open(&db, meta).expect("ids");
        (db, ids)
    }

    fn put(ids: &Ids, id: &[u8], seq: Seq) {
        ids.generations()
            .current
            .append([(id, seq)])
            .expect("append");
    }

    /// Ids in order, at random and in interleaved runs (as from several
    /// publishers) are all found after passes, whatever was packed
    /// before; a newer generation shadows the packs.
    #[test]
    fn passes_move_ids_into_packs_and_lookups_find_them() {
        passes_find_every_id(SLICE, ROUND_BYTES);
    }

    /// The same with rounds of at most 50 ids or 8 KiB of packs: rounds
    /// end at a pack's end, after a pack of ids after every pack, and the
    /// next one goes on after the last id moved.
    #[test]
    fn passes_in_small_rounds_move_every_id() {
        passes_find_every_id(50, 8 << 10);
    }

    fn passes_find_every_id(slice: usize, round_bytes: usize) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, mut ids_) = open_ids(dir.path());
        ids_.slice = slice;
        ids_.round_bytes = round_bytes;
        let mut expected: std::collections::BTreeMap<Vec<u8>, Seq> = Default::default();
        let mut seq = 0u64;
        let mut add =
            |ids_: &Ids, id: String, expected: &mut std::collections::BTreeMap<Vec<u8>, Seq>| {
                seq += 1;
                put(ids_, id.as_bytes(), seq);
                expected.insert(id.into_bytes(), seq);
            };
        for round in 0..4u64 {
            for i in 0..3_000u64 {
                add(
                    &ids_,
                    format!("seq-{:08}", round * 3_000 + i),
                    &mut expected,
                );
                let r = (round * 3_000 + i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                add(&ids_, format!("{r:016x}-random"), &mut expected);
                add(
                    &ids_,
                    format!("p{}-{:07}", i % 4, round * 3_000 + i),
                    &mut expected,
                );
            }
            let stats = ids_.pass().expect("pass");
            assert_eq!((stats.moved, stats.generations), (9_000, 1));
            if round > 0 {
                assert!(stats.packs_rewritten > 0);
            }
            assert_eq!(ids_.counts().expect("counts"), (0, expected.len() as u64));
            for (id, seq) in &expected {
                assert_eq!(
                    ids_.get(id).expect("get"),
                    Some(*seq),
                    "{}",
                    String::from_utf8_lossy(id)
                );
            }
            assert_eq!(ids_.get(b"seq-99999999").expect("get"), None);
            // The greatest packed id is the last pack's key: found (not
            // taken for one after every pack); one after it is in none.
            let last = ids_.packs.last().expect("read").map(|(k, _)| k.to_vec());
            assert_eq!(*ids_.last_pack.read().expect("lock"), last);
            assert_eq!(
                last.as_deref(),
                expected.keys().next_back().map(|k| k.as_slice())
            );
            assert_eq!(ids_.get(b"zzzz").expect("get"), None);
            assert_eq!(ids_.get(b"0").expect("get"), None);
            assert_eq!(ids_.get(b"p2-").expect("get"), None);
            // The frozen generation's journal is gone; the current one is
            // new.
            let names: Vec<String> = db
                .tree_names()
                .iter()
                .filter_map(|n| super::super::id_journal::number_of(n))
                .map(super::super::id_journal::name)
                .collect();
            assert_eq!(names, [super::super::id_journal::name(round + 1)]);
        }
        for item in ids_.packs.iter() {
            let (key, value) = item.expect("pack");
            assert!(value.len() <= MAX_PACK_BYTES);
            decode(&key, &value).expect("a sound pack");
        }
        let listed: Vec<(Vec<u8>, Seq)> = ids_
            .entries()
            .map(|e| {
                let e = e.expect("entry");
                (e.id, e.seq.expect("seq"))
            })
            .collect();
        assert_eq!(listed, expected.into_iter().collect::<Vec<_>>());
        // A tombstone over a packed id shadows it, in lookups and in the
        // entries, until a pass merges it.
        put(&ids_, b"seq-00000005", Seq::MAX);
        put(&ids_, b"new-one", 7);
        assert_eq!(ids_.get(b"seq-00000005").expect("get"), Some(Seq::MAX));
        let tomb: Vec<Seq> = ids_
            .entries()
            .filter_map(|e| e.ok())
            .filter(|e| e.id == b"seq-00000005")
            .map(|e| e.seq.expect("seq"))
            .collect();
        assert_eq!(tomb, [Seq::MAX]);
        let stats = ids_.pass().expect("pass");
        assert_eq!(stats.moved, 2);
        assert_eq!(ids_.get(b"seq-00000005").expect("get"), Some(Seq::MAX));
        assert_eq!(ids_.get(b"new-one").expect("get"), Some(7));
    }

    /// A pass a crash cut short leaves a frozen generation (found by name
    /// at open) whose ids may be in packs already: they are found with
    /// their value, and the next pass packs them again and drops it.
    #[test]
    fn an_interrupted_pass_is_completed_by_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entries: Vec<(Vec<u8>, Seq)> = (0..100u64)
            .map(|i| (format!("ev-{i:04}").into_bytes(), i))
            .collect();
        {
            let (db, ids_) = open_ids(dir.path());
            for (id, seq) in &entries {
                put(&ids_, id, *seq);
            }
            // The freeze and the packs' batch landed, the drop did not.
            ids_.meta
                .insert(META_GENERATION, &1u64.to_be_bytes())
                .expect("insert");
            ids_.packs
                .insert(b"ev-0099", encode(&entries))
                .expect("insert");
            #[allow(clippy::disallowed_methods)] // a test, no runtime
            db.flush().expect("flush");
        }
        let (db, ids_) = open_ids(dir.path());
        assert_eq!(ids_.generations().frozen.len(), 1);
        for (id, seq) in &entries {
            assert_eq!(ids_.get(id).expect("get"), Some(*seq));
        }
        assert_eq!(ids_.entries().count(), 100, "each id once");
        assert!(ids_.due(), "a frozen generation's ids are due");
        put(&ids_, b"ev-1000", 1000);
        let stats = ids_.pass().expect("pass");
        assert_eq!(
            (stats.moved, stats.generations),
            (100, 1),
            "the frozen one first, alone"
        );
        assert_eq!(ids_.counts().expect("counts"), (1, 100));
        let frozen_name = super::super::id_journal::name(0);
        assert!(!db.tree_names().iter().any(|n| n == frozen_name.as_bytes()));
        ids_.pass().expect("pass");
        assert_eq!(ids_.counts().expect("counts"), (0, 101));
        for (id, seq) in entries.iter().chain([&(b"ev-1000".to_vec(), 1000)]) {
            assert_eq!(ids_.get(id).expect("get"), Some(*seq));
        }
    }

    /// A store written before journals holds its generations as trees of
    /// one key per id (the current one included): at open they are
    /// frozen, their ids found (a newer generation's value first), and
    /// the next pass packs and drops them; new ids go into a journal of a
    /// new number.
    #[test]
    fn trees_of_one_key_per_id_are_frozen_found_and_packed() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = crate::store::retry_open(|| sled::Config::new().path(dir.path()).open());
            let meta = db.open_tree("meta").expect("tree");
            meta.insert(META_GENERATION, &2u64.to_be_bytes())
                .expect("insert");
            let older = db.open_tree(generation_name(1)).expect("tree");
            let current = db.open_tree(generation_name(2)).expect("tree");
            for i in 0..50u64 {
                older
                    .insert(format!("ev-{i:03}"), &i.to_be_bytes())
                    .expect("insert");
            }
            current
                .insert("ev-007", &Seq::MAX.to_be_bytes())
                .expect("insert");
            current
                .insert("ev-100", &100u64.to_be_bytes())
                .expect("insert");
            current.insert("ev-bad", &[1, 2]).expect("insert");
            // An empty one is dropped.
            db.open_tree(generation_name(0)).expect("tree");
            #[allow(clippy::disallowed_methods)] // a test, no runtime
            db.flush().expect("flush");
        }
        let (db, ids_) = open_ids(dir.path());
        assert_eq!(ids_.generations().number, 3);
        assert_eq!(ids_.generations().frozen.len(), 2);
        assert!(!db
            .tree_names()
            .iter()
            .any(|n| n == generation_name(0).as_bytes()));
        assert_eq!(ids_.get(b"ev-003").expect("get"), Some(3));
        assert_eq!(ids_.get(b"ev-007").expect("get"), Some(Seq::MAX));
        assert_eq!(ids_.get(b"ev-100").expect("get"), Some(100));
        assert!(ids_.get(b"ev-bad").is_err(), "a damaged entry is an error");
        assert_eq!(ids_.get(b"ev-200").expect("get"), None);
        assert!(ids_.due());
        put(&ids_, b"ev-200", 200);
        assert_eq!(ids_.entries().count(), 53, "each id once");
        ids_.pass().expect("pass");
        ids_.pass().expect("pass");
        assert!(ids_.generations().frozen.is_empty());
        assert!(!db.tree_names().iter().any(|n| generation_of(n).is_some()));
        for (id, seq) in [
            (b"ev-003".as_slice(), 3),
            (b"ev-007", Seq::MAX),
            (b"ev-100", 100),
            (b"ev-200", 200),
        ] {
            assert_eq!(ids_.get(id).expect("get"), Some(seq));
        }
        // The damaged entry was carried into the journal, still an error.
        assert!(ids_.get(b"ev-bad").is_err());
        drop(ids_);
        drop(db);
        let (_db, ids_) = open_ids(dir.path());
        assert_eq!(ids_.get(b"ev-007").expect("get"), Some(Seq::MAX));
        assert!(ids_.get(b"ev-bad").is_err());
        assert_eq!(ids_.generations().number, 4);
    }

    /// A journal record that cannot be read may hold any id: lookups of
    /// ids found nowhere are refused, verify lists it, and a pass carries
    /// it into the current journal rather than dropping it with its
    /// generation.
    #[test]
    fn a_damaged_journal_record_refuses_unknown_ids_and_outlives_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (db, ids_) = open_ids(dir.path());
            put(&ids_, b"ev-1", 1);
            ids_.generations()
                .current
                .tree()
                .insert(9u64.to_be_bytes(), &[1u8, 200])
                .expect("insert");
            #[allow(clippy::disallowed_methods)] // a test, no runtime
            db.flush().expect("flush");
        }
        let (_db, ids_) = open_ids(dir.path());
        assert_eq!(ids_.get(b"ev-1").expect("get"), Some(1));
        assert!(matches!(ids_.get(b"ev-2"), Err(Error::Corrupt { .. })));
        let damaged = |ids_: &Ids| {
            ids_.entries()
                .filter(|e| matches!(e, Ok(e) if e.seq.is_err()))
                .count()
        };
        assert_eq!(damaged(&ids_), 1);
        for _ in 0..2 {
            ids_.pass().expect("pass");
            assert!(ids_.generations().frozen.is_empty());
            assert_eq!(ids_.get(b"ev-1").expect("get"), Some(1));
            assert!(matches!(ids_.get(b"ev-2"), Err(Error::Corrupt { .. })));
            assert_eq!(damaged(&ids_), 1);
        }
    }

    /// An id carried out of an older generation (its pack is damaged)
    /// does not shadow a newer generation's value for it.
    #[test]
    fn a_carried_id_does_not_shadow_a_newer_generations_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = crate::store::retry_open(|| sled::Config::new().path(dir.path()).open());
            let older = db.open_tree(generation_name(1)).expect("tree");
            let newer = db.open_tree(generation_name(2)).expect("tree");
            older.insert("a", &1u64.to_be_bytes()).expect("insert");
            newer.insert("a", &Seq::MAX.to_be_bytes()).expect("insert");
            // The pack "a" falls into cannot be read.
            db.open_tree(PACKS_TREE)
                .expect("tree")
                .insert("b", &[PACK_V1, 0xff])
                .expect("insert");
            #[allow(clippy::disallowed_methods)] // a test, no runtime
            db.flush().expect("flush");
        }
        let (_db, ids_) = open_ids(dir.path());
        assert_eq!(ids_.get(b"a").expect("get"), Some(Seq::MAX));
        let stats = ids_.pass().expect("pass");
        assert_eq!(stats.generations, 2);
        assert_eq!(ids_.get(b"a").expect("get"), Some(Seq::MAX));
    }
}
