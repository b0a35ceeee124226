//! The node's durable store: anonymised events in sled.
//!
//! The events' records are in the event log's segment files (see
//! [`log`]); sled holds everything else.
//!
//! Trees (one per keyspace, numeric keys big-endian):
//! - `events`:  first seq (u64) of a commit's new events → where each
//!   one's record is in the event log, one slot per seq (see [`slots`];
//!   stores written before: seq → where its record is, or before the log
//!   the record itself, see [`record`])
//! - `id_journal.<n>`, `id_packs`: event_id → seq — deduplication; a
//!   commit's new ids in one journal record (held by id in memory, see
//!   [`id_journal`]), moved by a background pass into packs of a few KB
//!   (see [`ids`]; the journal replaced `by_id`, one key per id)
//! - `time_blocks`: day ‖ first seq of a bucket of 256 → the occurred_at
//!   of each of its events that occurred that day — time range scans (see
//!   [`times`]; it replaced `by_time`, occurred_at ‖ seq → (), one key per
//!   event)
//! - `customer_runs`: first seq of a commit's new events → a fingerprint
//!   of each one's customer pseudonym — finding a customer's events for
//!   erasure (see [`customers`]; it replaced `by_customer`,
//!   pseudonym ‖ seq → (), one key per event)
//!
//! - `meta`:    `log_end` → the event log's end after the last commit
//!   sled holds (where replay starts at open);
//!   `last_seq`, `purged_upto` → u64 — the sequence high-water
//!   mark (so numbers are never reused, even after retention removed the
//!   newest events) and the highest sequence number retention removed;
//!   `export/<name>` → u64 — how far each export was acknowledged
//! - `rollups`: family ‖ period ‖ dimensions → aggregates (see
//!   `crate::rollup`) for the views' days, weeks and months; the hourly
//!   cells over every dimension in blocks per hour, family ‖ period ‖ hour
//!   (‖ id ‖ part) (see [`blocks`]); merged in by a checkpointer behind
//!   the commits (see [`rollups`]); `meta` keeps the layout they were
//!   built with (`rollup_layout`)
//!   and the hour before which retention removed them (`rollup_horizon`)
//! - `cursors`: identity ‖ 0 ‖ subscription name → acknowledged cursor
//! - `outboxes/<link>`: first seq of a run → enqueue time and a bitmap of
//!   the run's numbers — events waiting to be acknowledged by that
//!   upstream link, one run per commit (see [`outbox`]; it replaced
//!   `outbox/<link>`, seq → enqueue time, one key per event)
//! - `audit`: seq (u64) → hash-chained audit record (see [`crate::audit`])
//! - `certs`: SHA-256 → DER of the origin certificates events are signed
//!   with (see [`crate::origin`])
//! - `dp_budget`: analyst identity → period start (i64) ‖ ε spent (f64)
//!
//! An event's outbox entries are written in the same commit as the event
//! and before its id's journal record, which is what makes it stored: after a
//! crash an event is never stored without being queued where it must go
//! (see `writer::Writer::write_sled` and `repair_tail`).
//!
//! All writes go through one writer that batches concurrent appends into
//! one commit and a single sync of the event log (group commit): an append
//! returns only after its events are on disk, and one sync serves every
//! publisher waiting at that moment. The writer has its own thread; a
//! small append answered early is synced on its caller's thread when the
//! writer is idle, and the writer's thread does the rest of its commit
//! (`writer::try_commit`). sled's part of a commit is
//! flushed in the background and, if a crash loses it, replayed from the
//! log at open. Nothing outside this module touches sled or the log.

pub mod backup;
mod log;
pub mod record;
mod writer;

mod audit;
mod blocks;
mod customers;
mod erasure;
mod export;
mod gate;
mod id_journal;
mod ids;
mod outbox;
mod recent;
mod rollups;
mod slots;
mod times;

pub use erasure::{EraseRequest, Erased, ErasureRecord, ErasureSignal, LinkErasure, Route, Router};
pub use recent::{Following, RecentEvent};
pub use rollups::{Piece, RawCell};

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::{oneshot, Notify};

pub use log::with_blocks_decompressed as with_log_blocks_decompressed;
pub use record::DecodeError;

use crate::domain::{PreferenceEvent, UnixNanos};

/// A local sequence number: the position of an event in this node's store.
pub type Seq = u64;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the data directory {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record in tree {tree:?} at key {key}: {source}; the data directory is damaged: stop the node, run `chainsight admin verify --config <its node.toml>` to list every damaged record, and restore the data directory from a backup (`chainsight admin restore`)")]
    Corrupt {
        tree: &'static str,
        key: String,
        source: DecodeError,
    },
    #[error("the store is shut down")]
    Closed,
    #[error("write failed: {reason}")]
    Write { reason: String, disk_full: bool },
    #[error("the insight rollups in {path} {state}, but this node keeps {wanted:?}: stop the node and run `chainsight admin rebuild-rollups --config <its node.toml>`")]
    RollupsStale {
        path: PathBuf,
        state: String,
        wanted: String,
    },
}

/// Result type of the store.
pub type Result<T> = std::result::Result<T, Error>;

/// What happened to one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored now, at this sequence number.
    Stored(Seq),
    /// An event with the same event_id was already stored at this sequence number.
    Duplicate(Seq),
}

/// What a sequence number holds, for subscribers and exports
/// ([`Store::scan_shared`]).
#[derive(Debug, Clone)]
pub enum Shared {
    /// An event, decoded and encoded once for every subscription.
    Event(Arc<RecentEvent>),
    Erasure(ErasureSignal),
}

/// An event to append and the outboxes (indexes into the link list given to
/// [`Store::open`]) it must be queued in if it is new.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: PreferenceEvent,
    pub outboxes: Vec<usize>,
    /// Received from a downstream node (not published here). An id a
    /// downstream's erasure tombstoned before it arrived stays a duplicate
    /// for forwarded events only: a downstream cannot erase in advance an
    /// event this node's own publishers have yet to publish.
    pub forwarded: bool,
}

impl NewEvent {
    /// An event queued nowhere.
    pub fn local(event: PreferenceEvent) -> Self {
        NewEvent {
            event,
            outboxes: Vec::new(),
            forwarded: false,
        }
    }
}

/// Handle to an open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    trees: Trees,
    writer: writer::Queue,
    /// The writer itself, for small appends committed on the caller's
    /// thread while it is idle (see [`writer::try_commit`]).
    shared_writer: writer::Shared,
    /// Joined when the last handle goes, so the files are released.
    writer_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    flushes: Arc<AtomicU64>,
    durable: tokio::sync::watch::Receiver<Seq>,
    /// The highest sequence number whose caller the writer answered:
    /// ahead of `durable` while that commit's sled writes run (see
    /// [`Store::wait_applied`]).
    answered: Arc<AtomicU64>,
    /// The write failure that left the database unusable, if any.
    failure: tokio::sync::watch::Receiver<Option<String>>,
    audit: audit::AuditLog,
    /// The dimension values of the cells queries decoded.
    symbols: Arc<std::sync::RwLock<crate::rollup::Interner>>,
}

/// Rollup cells for a query, decoded: shared segments (whole cached
/// periods among them) and the symbols their dimensions refer to.
pub struct QueryCells {
    pub segments: Vec<Arc<Vec<crate::rollup::QueryCell>>>,
    pub symbols: Arc<std::sync::RwLock<crate::rollup::Interner>>,
}

impl QueryCells {
    /// Every cell.
    pub fn iter(&self) -> impl Iterator<Item = &crate::rollup::QueryCell> {
        self.segments.iter().flat_map(|s| s.iter())
    }

    /// The symbols, for reading.
    pub fn symbols(&self) -> std::sync::RwLockReadGuard<'_, crate::rollup::Interner> {
        self.symbols
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Clone)]
struct Trees {
    /// seq → the record's [`log::Location`] (or, in stores written before
    /// the event log, the record itself).
    events: sled::Tree,
    /// The event-id index: generations (journals written by the writer)
    /// and packs.
    ids: Arc<ids::Ids>,
    by_time: sled::Tree,
    meta: sled::Tree,
    cursors: sled::Tree,
    certs: sled::Tree,
    /// Fingerprints of the events' customers, one run per commit (see
    /// [`customers`]).
    customer_runs: sled::Tree,
    dp_budget: sled::Tree,
    erasures: sled::Tree,
    erasure_signals: sled::Tree,
    /// Woken when an erasure is recorded (links pass it on).
    erasures_added: Arc<Notify>,
    rollups: sled::Tree,
    outboxes: Arc<Vec<Outbox>>,
    /// The rollups waiting in memory (and the layout); `None` when rollups
    /// are off.
    pending: Option<Arc<rollups::Pending>>,
    /// The newest events as subscriptions send them.
    recent: Arc<recent::Recent>,
    /// The segment files holding the events' records.
    log: Arc<log::EventLog>,
    /// `META_PURGED_UPTO` as the last purge left it, in memory: every
    /// follower reads it on each round (see [`Store::purged_upto`]), and a
    /// sled read there can wait behind a rollup checkpoint's batch.
    purged: Arc<AtomicU64>,
}

impl Trees {
    /// The record an `events` value holds or points to.
    fn record<'a>(&self, seq: Seq, value: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>> {
        if value.first() != Some(&log::LOCATION_FORMAT) {
            return Ok(std::borrow::Cow::Borrowed(value));
        }
        let corrupt = |source| Error::Corrupt {
            tree: "events",
            key: seq.to_string(),
            source,
        };
        let at = log::Location::decode(value)
            .ok_or_else(|| corrupt(DecodeError::TooShort(value.len())))?;
        self.log
            .read(seq, at)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| corrupt(DecodeError::Frame(e.to_string())))
    }

    /// As [`Self::record`], for reads that race the writer: `None` when
    /// the event was removed (erasure, retention) between reading `value`
    /// and reading its frame, which may be zeroed or deleted by then.
    fn record_live<'a>(
        &self,
        seq: Seq,
        value: &'a [u8],
    ) -> Result<Option<std::borrow::Cow<'a, [u8]>>> {
        let e = match self.record(seq, value) {
            Ok(record) => return Ok(Some(record)),
            Err(e) => e,
        };
        let mut seen = value.to_vec();
        let mut last = e;
        // An event that stays when its block of the log is zeroed moves
        // first (see `remove_records`): then it is read where it is now.
        for _ in 0..4 {
            match slots::get(&self.events, seq)? {
                Some(now) if *now == *seen => return Err(last),
                Some(now) => match self.record(seq, &now) {
                    Ok(record) => return Ok(Some(std::borrow::Cow::Owned(record.into_owned()))),
                    Err(e) => {
                        seen = now.to_vec();
                        last = e;
                    }
                },
                None => return Ok(None),
            }
        }
        Err(last)
    }

    /// As [`Self::event`], for reads that race the writer (see
    /// [`Self::record_live`]).
    fn event_live(&self, seq: Seq, value: &[u8]) -> Result<Option<PreferenceEvent>> {
        self.record_live(seq, value)?
            .map(|record| decode_event(seq, &record))
            .transpose()
    }

    /// A stored event's entry read as its event (see
    /// [`Self::event_live`]): `None` when it was removed meanwhile.
    fn entry_live(
        &self,
        item: Result<(Seq, slots::Stored)>,
    ) -> Result<Option<(Seq, PreferenceEvent)>> {
        let (seq, v) = item?;
        Ok(self.event_live(seq, &v)?.map(|ev| (seq, ev)))
    }

    /// Whether an `events` value points to a frame a failed commit took
    /// back out of the log (see `log::EventLog::rollback`).
    fn rolled_back(&self, seq: Seq, value: &[u8]) -> bool {
        log::Location::decode(value).is_some_and(|at| {
            matches!(
                self.log.read(seq, at),
                Err(log::FrameError::RolledBack { .. })
            )
        })
    }

    /// The event an `events` value holds or points to.
    fn event(&self, seq: Seq, value: &[u8]) -> Result<PreferenceEvent> {
        decode_event(seq, &self.record(seq, value)?)
    }
}

/// `meta` key of the sequence high-water mark.
const META_LAST_SEQ: &[u8] = b"last_seq";
/// `meta` key of the event log's end after the last commit sled holds
/// ([`log::End`]): where replay starts at open.
const META_LOG_END: &[u8] = b"log_end";
/// `meta` key of the event log frames of removed events still to be
/// zeroed ([`log::Location`]s, one after the other).
const META_TO_ZERO: &[u8] = b"log_to_zero";
/// `meta` key prefix (then the segment's id, u64 big-endian) of a segment
/// of the event log that holds relocated blocks: events of sequence
/// numbers below its id, which the test of a segment's liveness by its
/// numbers misses (see [`relocated_into`]).
const META_RELOCATED_INTO: &[u8] = b"log_relocated_into/";
/// `meta` key of the highest sequence number removed by retention.
const META_PURGED_UPTO: &[u8] = b"purged_upto";
/// `meta` key of the rollup layout's signature (or a state word).
const META_ROLLUP_LAYOUT: &[u8] = b"rollup_layout";
/// `meta` key of the hour (i64) before which retention removed rollups.
const META_ROLLUP_HORIZON: &[u8] = b"rollup_horizon";
/// [`META_ROLLUP_LAYOUT`] while a rebuild runs.
const ROLLUPS_REBUILDING: &str = "rebuilding";
/// [`META_ROLLUP_LAYOUT`] when a node ran without rollups.
const ROLLUPS_OFF: &str = "off";

/// One upstream link's queue.
struct Outbox {
    /// The link's id.
    link: String,
    tree: sled::Tree,
    /// Entries in the tree (kept in memory: sled's len() is a full scan).
    len: AtomicU64,
    /// Woken when entries are added.
    added: Notify,
    /// Held while a run is read, changed and written back (see [`outbox`]).
    edit: parking_lot::Mutex<()>,
}

/// What [`Store::verify`] checked and found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub events: u64,
    /// Entries of the event-id index (tombstones of removed events too).
    pub index_entries: u64,
    /// Entries of the time index.
    pub time_entries: u64,
    pub outbox_entries: u64,
    pub audit_records: u64,
    /// Rollup cells stored: a view's cell once, an hour's cell once per
    /// block that holds a delta of it.
    pub rollup_cells: u64,
    /// The first 1,000 problems, one line each.
    pub problems: Vec<String>,
    /// All problems found.
    pub problem_count: u64,
}

/// New event ids kept one key each before a pass packs them (see
/// [`ids`]; `[storage] id_pack_min`).
pub const DEFAULT_ID_PACK_MIN: u64 = ids::MIN_PASS;

/// The page cache of a store opened without a size: the node's default
/// (`[storage] page_cache_mib`, 128 MiB; sled's own is 1 GiB).
pub const DEFAULT_PAGE_CACHE_BYTES: u64 = 128 << 20;

impl Store {
    /// Opens (creating if needed) the store in `dir`, with an outbox per
    /// entry of `links`, and starts its writer.
    pub fn open(dir: &Path, links: &[String]) -> Result<Store> {
        Self::open_with(dir, links, Some(crate::rollup::Layout::default()))
    }

    /// As [`Self::open`], keeping rollups with `layout`; with `None` the
    /// writer does not maintain rollups (to measure their cost; insight
    /// queries then see nothing new). Call [`Self::check_rollups`] before
    /// serving queries.
    pub fn open_with(
        dir: &Path,
        links: &[String],
        layout: Option<crate::rollup::Layout>,
    ) -> Result<Store> {
        Self::open_tuned(dir, links, layout, DEFAULT_PAGE_CACHE_BYTES)
    }

    /// As [`Self::open_with`], with sled's page cache bounded to
    /// `page_cache_bytes` (the node's largest use of memory: pages read or
    /// written recently stay cached up to this size).
    pub fn open_tuned(
        dir: &Path,
        links: &[String],
        layout: Option<crate::rollup::Layout>,
        page_cache_bytes: u64,
    ) -> Result<Store> {
        let open_err = |source| Error::Open {
            path: dir.to_path_buf(),
            source,
        };
        // Each phase of opening is timed and logged: at millions of events
        // reopening takes long, and the operator should see where.
        let started = std::time::Instant::now();
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(page_cache_bytes)
            .open()
            .map_err(open_err)?;
        let sled_recovered = started.elapsed();
        let meta = db.open_tree("meta").map_err(open_err)?;
        let purged = Arc::new(AtomicU64::new(meta_seq(&meta, META_PURGED_UPTO)?));
        let trees = Trees {
            events: db.open_tree("events").map_err(open_err)?,
            ids: Arc::new(ids::Ids::open(&db, meta.clone()).map_err(|e| match e {
                Error::Sled(source) => open_err(source),
                e => e,
            })?),
            by_time: db.open_tree(times::TREE).map_err(open_err)?,
            meta,
            cursors: db.open_tree("cursors").map_err(open_err)?,
            certs: db.open_tree("certs").map_err(open_err)?,
            customer_runs: db.open_tree("customer_runs").map_err(open_err)?,
            dp_budget: db.open_tree("dp_budget").map_err(open_err)?,
            erasures: db.open_tree("erasures").map_err(open_err)?,
            erasure_signals: db.open_tree("erasure_signals").map_err(open_err)?,
            erasures_added: Arc::new(Notify::new()),
            rollups: db.open_tree("rollups").map_err(open_err)?,
            outboxes: Arc::new(
                links
                    .iter()
                    .map(|id| outbox::open(&db, id))
                    .collect::<Result<Vec<_>>>()
                    .map_err(|e| match e {
                        Error::Sled(source) => open_err(source),
                        other => other,
                    })?,
            ),
            pending: None,
            recent: Arc::new(recent::Recent::new(recent::DEFAULT_CAPACITY)),
            log: Arc::new(log::EventLog::open(&dir.join("log")).map_err(|e| open_err(e.into()))?),
            purged,
        };
        let mut trees = trees;
        let trees_opened = started.elapsed();
        times::convert(&db, &trees.by_time)?;
        replay_log(&db, &trees)?;
        // Before the zeroing, which may append to the log: over frames a
        // failed commit took back, whose slots `repair_tail` reads.
        repair_tail(&trees)?;
        finish_zeroing(&db, &trees)?;
        let repaired = started.elapsed();
        if let Some(layout) = layout {
            let current = rollups_current(&trees, &layout)?;
            trees.pending = Some(Arc::new(rollups::Pending::open(
                &trees,
                Arc::new(layout),
                current,
            )?));
        }
        let rollups_folded = started.elapsed();
        index_customers(&db, &trees)?;
        tracing::info!(
            ?sled_recovered,
            ?trees_opened,
            ?repaired,
            ?rollups_folded,
            total = ?started.elapsed(),
            "store opened (times since the start of opening)"
        );
        let audit = audit::AuditLog::open(&db).map_err(|e| match e {
            Error::Sled(source) => open_err(source),
            other => other,
        })?;
        let flushes = Arc::new(AtomicU64::new(0));
        let last = high_water(&trees)?;
        // Nothing is queued above the high-water mark, unless a repair ran
        // while the link was not configured (an open without links, as
        // `admin verify` does): those numbers are given out again.
        for outbox in trees.outboxes.iter() {
            let stale = outbox.truncate_from(last + 1)?;
            if stale > 0 {
                tracing::warn!(link = %outbox.link, entries = stale, above = last, "took out outbox entries above the high-water mark (of events removed while the link was not configured)");
            }
        }
        let (durable_tx, durable) = tokio::sync::watch::channel(last);
        let answered = Arc::new(AtomicU64::new(last));
        let (failure_tx, failure) = tokio::sync::watch::channel(None);
        let (writer, shared_writer, writer_thread) = writer::spawn(
            db.clone(),
            trees.clone(),
            flushes.clone(),
            durable_tx,
            answered.clone(),
            failure_tx,
        )?;
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                trees,
                writer,
                shared_writer,
                writer_thread: std::sync::Mutex::new(Some(writer_thread)),
                path: dir.to_path_buf(),
                flushes,
                durable,
                answered,
                failure,
                audit,
                symbols: Default::default(),
            }),
        })
    }

    /// Stores the events not stored before and returns, per event in order,
    /// whether it was stored or a duplicate. Returns once the events are
    /// flushed to disk.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        self.append_when(events, false).await
    }

    /// [`Self::append`], returning once the events are durable in the
    /// event log, before the commit's sled writes (tens of µs more): for
    /// answering a publisher sooner. Reads by id or number and queries
    /// wait for those writes; subscribers and links follow the durable
    /// mark ([`Self::durable_seq`]), which moves after them. Should the
    /// writes fail, the events are stored at the node's next start.
    pub async fn append_durable(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        self.append_when(events, true).await
    }

    async fn append_when(&self, events: Vec<NewEvent>, early: bool) -> Result<Vec<Appended>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let events = if early {
            match writer::try_commit(&self.inner.shared_writer, &self.inner.writer, events) {
                Ok(outcome) => return outcome,
                Err(events) => events,
            }
        } else {
            events
        };
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Command::Append(writer::Append {
                events,
                reply,
                early,
            }))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Returns once the sled writes of every commit answered so far are
    /// done. The writer answers a commit's callers once its events are
    /// durable in the event log, before its sled writes (tens of µs, see
    /// `writer::Writer::sync` and `writer::try_commit`): a read by id or
    /// number waits for them,
    /// so that it finds what its caller saw acknowledged. With `seq`,
    /// only if that number is not applied yet. Gives up after a second,
    /// or once the store failed.
    fn wait_applied(&self, seq: Option<Seq>) {
        let Some(answered) = self.answered_ahead() else {
            return;
        };
        if seq.is_some_and(|seq| seq <= *self.inner.durable.borrow() || seq > answered) {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while *self.inner.durable.borrow() < answered
            && self.inner.failure.borrow().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    /// [`Self::wait_applied`] for async callers: returns once the sled
    /// writes of every commit answered so far are done (the durable mark
    /// reached it), or after a second.
    pub async fn applied(&self) {
        let Some(answered) = self.answered_ahead() else {
            return;
        };
        let mut durable = self.inner.durable.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            durable.wait_for(|d| *d >= answered),
        )
        .await;
    }

    /// The highest sequence number answered, if the sled writes of its
    /// commit are not done yet (the durable mark is behind it).
    fn answered_ahead(&self) -> Option<Seq> {
        let answered = self
            .inner
            .answered
            .load(std::sync::atomic::Ordering::SeqCst);
        (*self.inner.durable.borrow() < answered).then_some(answered)
    }

    /// The event at `seq`.
    pub fn get(&self, seq: Seq) -> Result<Option<PreferenceEvent>> {
        self.wait_applied(Some(seq));
        match slots::get(&self.inner.trees.events, seq)? {
            None => Ok(None),
            Some(bytes) => self.inner.trees.event_live(seq, &bytes),
        }
    }

    /// The sequence number and event stored under `event_id`.
    pub fn get_by_event_id(&self, event_id: &str) -> Result<Option<(Seq, PreferenceEvent)>> {
        self.wait_applied(None);
        let Some(seq) = self.inner.trees.ids.get(event_id.as_bytes())? else {
            return Ok(None);
        };
        Ok(self.get(seq)?.map(|ev| (seq, ev)))
    }

    /// Events with a sequence number greater than `after`, in order.
    pub fn scan_after(&self, after: Seq) -> impl Iterator<Item = Result<(Seq, PreferenceEvent)>> {
        let inner = self.inner.clone();
        slots::range(&inner.trees.events, after.saturating_add(1), Seq::MAX)
            .filter_map(move |item| inner.trees.entry_live(item).transpose())
    }

    /// Up to `limit` events with `after < seq <= upto`, in order.
    pub fn scan_range(
        &self,
        after: Seq,
        upto: Seq,
        limit: usize,
    ) -> Result<Vec<(Seq, PreferenceEvent)>> {
        if upto <= after {
            return Ok(Vec::new());
        }
        slots::range(&self.inner.trees.events, after.saturating_add(1), upto)
            .take(limit)
            .filter_map(|item| self.inner.trees.entry_live(item).transpose())
            .collect()
    }

    /// The highest sequence number known to be flushed to disk; everything
    /// up to it is readable.
    pub fn durable_seq(&self) -> Seq {
        *self.inner.durable.borrow()
    }

    /// The write failure that left the database unusable (sled keeps an
    /// I/O error, a full disk among them, until the node restarts), and
    /// changes to it.
    pub fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.inner.failure.clone()
    }

    /// A receiver that changes whenever [`Self::durable_seq`] advances.
    pub fn watch_durable(&self) -> tokio::sync::watch::Receiver<Seq> {
        self.inner.durable.clone()
    }

    /// The rollup cells of `pieces` (each: `family`'s `period` cells
    /// starting in the hours `from..to`, open ends unbounded), including
    /// the deltas not yet checkpointed (a cell may come more than once:
    /// its parts add up), and the cells of the events in `edges` (the
    /// partial hours at a window's ends), folded from the events. Hour
    /// cells and edge cells may come merged onto the dimensions of
    /// `hour_view` (a view's dimensions that cover the query: grouping and
    /// filtering by them reads the same, from fewer cells).
    pub fn read_rollups(
        &self,
        pieces: &[rollups::Piece],
        hour_view: Option<crate::rollup::DimSet>,
        edges: &[(UnixNanos, UnixNanos)],
    ) -> Result<QueryCells> {
        let tree = &self.inner.trees.rollups;
        let symbols = &self.inner.symbols;
        let pending = self.inner.trees.pending.as_deref();
        if pending.is_none() {
            // No folds to wait for: the answered commits' sled writes.
            self.wait_applied(None);
        }
        let mut segments = match pending {
            Some(pending) => pending.read_cells(tree, pieces, hour_view, symbols)?,
            None => vec![Arc::new(rollups::decode_cells(
                rollups::Pending::read_tree(tree, pieces)?,
                symbols,
            )?)],
        };
        let projection = hour_view.unwrap_or_default();
        let fold = |range: (UnixNanos, UnixNanos)| -> Result<Arc<Vec<crate::rollup::QueryCell>>> {
            let mut cells = self.fold_events(range)?;
            if !projection.is_empty() && !cells.is_empty() {
                cells = rollups::project(cells, projection)?;
            }
            Ok(Arc::new(rollups::decode_cells(cells, symbols)?))
        };
        for &range in edges.iter().filter(|(a, b)| a < b) {
            segments.push(match pending {
                Some(pending) => pending.edge_cells(range, projection, || fold(range))?,
                None => fold(range)?,
            });
        }
        Ok(QueryCells {
            segments,
            symbols: self.inner.symbols.clone(),
        })
    }

    /// The hourly cells over every dimension of the events that occurred in
    /// `from..to`, folded from the events.
    fn fold_events(&self, (from, to): (UnixNanos, UnixNanos)) -> Result<Vec<rollups::RawCell>> {
        let events = self.scan_time(from, to).collect::<Result<Vec<_>>>()?;
        Ok(rollups::sealed(crate::rollup::fold(
            events.iter(),
            &crate::rollup::Layout::base_only(),
        )))
    }

    /// Whether rollup deltas wait in memory for the next checkpoint.
    pub fn rollup_deltas_waiting(&self) -> bool {
        self.inner
            .trees
            .pending
            .as_deref()
            .is_some_and(rollups::Pending::waiting)
    }

    /// Bounds the memory of recently read day, week and month cells
    /// (default [`rollups::DEFAULT_CACHE_BYTES`]; 0: no cache).
    pub fn set_rollup_cache_bytes(&self, bytes: usize) {
        if let Some(pending) = &self.inner.trees.pending {
            pending.set_cache_budget(bytes);
        }
    }

    /// Sets how many new event ids wait, one key each, before a pass
    /// packs them (`[storage] id_pack_min`, see [`ids`]).
    pub fn set_id_pack_min(&self, ids: u64) {
        self.inner.trees.ids.set_min_pass(ids);
    }

    /// Runs a pass of the event-id packer now (tests).
    #[cfg(test)]
    fn pack_ids(&self) -> ids::PassStats {
        self.inner.trees.ids.pass().expect("pass")
    }

    /// The rollup layout kept, `None` when rollups are off.
    pub fn rollup_layout(&self) -> Option<&crate::rollup::Layout> {
        self.inner
            .trees
            .pending
            .as_deref()
            .map(rollups::Pending::layout)
    }

    /// The hour before which retention removed events and rollups: cells
    /// of periods starting earlier are incomplete.
    pub fn rollup_horizon(&self) -> Result<Option<i64>> {
        read_horizon(&self.inner.trees.meta)
    }

    /// Checks that the stored rollups were built with this store's layout
    /// (and that no rebuild was cut short); an empty store just takes the
    /// layout. With rollups off, records that they are no longer kept, so
    /// that turning them on again asks for a rebuild. Blocks (flushes):
    /// call it off the async runtime.
    #[allow(clippy::disallowed_methods)] // a blocking flush, by contract
    pub fn check_rollups(&self) -> Result<()> {
        let meta = &self.inner.trees.meta;
        let stored = meta
            .get(META_ROLLUP_LAYOUT)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let wanted = match self.rollup_layout() {
            None => ROLLUPS_OFF.to_string(),
            Some(layout) => layout.signature(),
        };
        if stored.as_deref() == Some(wanted.as_str()) {
            return Ok(());
        }
        // No event and no cell (the bookkeeping keys sort after every cell).
        let empty = self.inner.trees.events.is_empty()
            && self
                .inner
                .trees
                .rollups
                .first()?
                .is_none_or(|(k, _)| rollups::is_meta_key(&k));
        if self.rollup_layout().is_some() && !empty {
            let state = match stored.as_deref() {
                None => "were built by an older version".to_string(),
                Some(ROLLUPS_REBUILDING) => "are incomplete: a rebuild did not finish".to_string(),
                Some(ROLLUPS_OFF) => "were not kept while rollups were off".to_string(),
                Some(other) => format!("were built for the layout {other:?}"),
            };
            return Err(Error::RollupsStale {
                path: self.inner.path.clone(),
                state,
                wanted,
            });
        }
        meta.insert(META_ROLLUP_LAYOUT, wanted.as_bytes())?;
        // At start-up, before serving (the node calls this off the runtime).
        self.inner.db.flush()?;
        Ok(())
    }

    /// Recomputes every rollup cell from the stored events (offline repair,
    /// `chainsight admin rebuild-rollups`); `progress` gets the events done.
    /// Returns the number of events folded. A rebuild cut short leaves a
    /// marker that [`Self::check_rollups`] refuses.
    pub async fn rebuild_rollups(&self, progress: impl Fn(u64)) -> Result<u64> {
        let layout = self.rollup_layout().cloned().unwrap_or_default();
        let meta = &self.inner.trees.meta;
        meta.insert(META_ROLLUP_LAYOUT, ROLLUPS_REBUILDING)?;
        meta.flush_async().await?;
        let rollups = &self.inner.trees.rollups;
        // No checkpoint runs while the tree is rebuilt: one already under
        // way would merge its cells into the new tree.
        let _paused = self.inner.trees.pending.as_deref().map(|p| p.pause());
        rollups.clear()?;
        let last = self.last_seq()?;
        if let Some(pending) = &self.inner.trees.pending {
            // The folds of answered commits land before the reset, not
            // after (their events are folded again from the tree below).
            pending.settle();
            pending.reset(last);
        }
        let horizon = self.rollup_horizon()?;
        let mut after = 0;
        let mut done = 0u64;
        loop {
            let chunk = self.scan_range(after, u64::MAX, 20_000)?;
            let Some((last, _)) = chunk.last() else { break };
            after = *last;
            done += chunk.len() as u64;
            let cells = crate::rollup::fold(chunk.iter().map(|(_, ev)| ev), &layout);
            gate::apply_batch(
                rollups,
                rollups::prepare_batch(rollups, &cells, after, &rollups::Lane::ALL)?,
            )?;
            progress(done);
        }
        if let Some(h) = horizon {
            writer::remove_cells_before(rollups, &layout, h)?;
        }
        if let Some(pending) = &self.inner.trees.pending {
            pending.clear_cache();
        }
        rollups::write_watermark(rollups, after.max(last))?;
        self.inner.db.flush_async().await?;
        meta.insert(META_ROLLUP_LAYOUT, layout.signature().as_bytes())?;
        meta.flush_async().await?;
        Ok(done)
    }

    /// Events that occurred in `[from, to)`, in time order.
    pub fn scan_time(
        &self,
        from: UnixNanos,
        to: UnixNanos,
    ) -> impl Iterator<Item = Result<PreferenceEvent>> + '_ {
        times::scan(&self.inner.trees.by_time, from.0, to.0)
            .filter_map(move |entry| entry.and_then(|e| self.get(e.seq)).transpose())
    }

    /// Number of stored events.
    pub fn len(&self) -> Result<usize> {
        slots::count(&self.inner.trees.events)
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.inner.trees.events.is_empty()
    }

    /// The highest sequence number ever used, 0 when nothing was stored.
    pub fn last_seq(&self) -> Result<Seq> {
        high_water(&self.inner.trees)
    }

    /// The sequence number of the oldest stored event.
    pub fn first_seq(&self) -> Result<Option<Seq>> {
        slots::first(&self.inner.trees.events)
    }

    /// The highest sequence number retention has removed (0 if none):
    /// from memory, set once a purge's transaction is done (the stored
    /// mark is read at open).
    pub fn purged_upto(&self) -> Result<Seq> {
        Ok(self
            .inner
            .trees
            .purged
            .load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The cursor acknowledged under subscription `name` of `identity`.
    pub fn named_cursor(&self, identity: &str, name: &str) -> Result<Option<Seq>> {
        match self.inner.trees.cursors.get(cursor_key(identity, name))? {
            None => Ok(None),
            Some(v) => seq_from(&v, "cursors", name).map(Some),
        }
    }

    /// Every named subscription's acknowledged cursor: (identity, name, cursor).
    pub fn named_cursors(&self) -> Result<Vec<(String, String, Seq)>> {
        let mut out = Vec::new();
        for entry in self.inner.trees.cursors.iter() {
            let (k, v) = entry?;
            let Some(split) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            let identity = String::from_utf8_lossy(&k[..split]).into_owned();
            let name = String::from_utf8_lossy(&k[split + 1..]).into_owned();
            let cursor = seq_from(&v, "cursors", &name)?;
            out.push((identity, name, cursor));
        }
        Ok(out)
    }

    /// Durably records `cursor` as acknowledged under subscription `name` of `identity`.
    pub async fn set_named_cursor(&self, identity: &str, name: &str, cursor: Seq) -> Result<()> {
        self.inner
            .trees
            .cursors
            .insert(cursor_key(identity, name), &cursor.to_be_bytes())?;
        self.inner.trees.cursors.flush_async().await?;
        Ok(())
    }

    /// Every agreement link `link` has had here (JSON of
    /// `[upstream.share]` tables, oldest first), for routing erasures to
    /// whatever a link may have received.
    pub fn agreement_history(&self, link: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .trees
            .meta
            .get(agreement_key(link))?
            .map(|v| v.to_vec()))
    }

    /// Records link `link`'s agreement history (see
    /// [`Self::agreement_history`]), durably.
    pub fn set_agreement_history(&self, link: &str, json: &[u8]) -> Result<()> {
        self.inner.trees.meta.insert(agreement_key(link), json)?;
        flush_blocking(&self.inner.db)?;
        Ok(())
    }

    /// Checks the whole store offline (`chainsight admin verify`): every
    /// event record's checksum and decoding, the event-id index both ways,
    /// that every outbox entry names a stored event, and the audit trail's
    /// hash chain. `progress` is called with the events checked so far.
    /// Returns the records checked and one line per problem found.
    pub fn verify(&self, progress: impl Fn(u64)) -> Result<Verification> {
        let t = &self.inner.trees;
        // No event ids move between the index's trees meanwhile.
        let _paused = t.ids.pause();
        let mut v = Verification::default();
        let problem = |v: &mut Verification, line: String| {
            if v.problems.len() < 1000 {
                v.problems.push(line);
            }
            v.problem_count += 1;
        };
        // The customer run covering the event (events come in order).
        let mut run: Option<(Seq, Vec<u32>)> = None;
        // Every entry's events, or the line that says why it has none; an
        // entry must begin after the numbers of the one before (reads
        // look only at the nearest entry at or below a number).
        let mut spanned: Option<Seq> = None;
        let stored = t.events.iter().flat_map(|entry| {
            let expanded = entry.map_err(Error::from).and_then(|(key, value)| {
                if key.len() != 8 {
                    return Ok(Err(format!("tree events: a key of {} bytes", key.len())));
                }
                match slots::span(&key, &value).and_then(|(first, len)| {
                    Ok((first, len, slots::expand(&key, &value)?))
                }) {
                    Ok((first, _, _)) if spanned.is_some_and(|end| first <= end) => Ok(Err(format!(
                        "tree events: the entry at seq {first} overlaps the one before it (up to seq {})",
                        spanned.unwrap_or_default()
                    ))),
                    Ok((first, len, events)) => {
                        spanned = Some(first + len - 1);
                        Ok(Ok(events))
                    }
                    Err(Error::Corrupt { key, source, .. }) => {
                        Ok(Err(format!("tree events, key {key}: {source}")))
                    }
                    Err(e) => Err(e),
                }
            });
            let out: Vec<Result<std::result::Result<(Seq, slots::Stored), String>>> = match expanded
            {
                Ok(Ok(events)) => events.into_iter().map(|e| Ok(Ok(e))).collect(),
                Ok(Err(line)) => vec![Ok(Err(line))],
                Err(e) => vec![Err(e)],
            };
            out
        });
        for entry in stored {
            let (seq, value) = match entry? {
                Ok(event) => event,
                Err(line) => {
                    problem(&mut v, line);
                    continue;
                }
            };
            v.events += 1;
            let decoded = match t.record(seq, &value) {
                Ok(record) => record::decode(&record),
                Err(Error::Corrupt { source, .. }) => Err(source),
                Err(e) => return Err(e),
            };
            if let Ok(ev) = &decoded {
                if run
                    .as_ref()
                    .is_none_or(|(first, fps)| seq >= first + fps.len() as u64)
                {
                    run = match t.customer_runs.range(..=seq.to_be_bytes()).next_back() {
                        None => None,
                        Some(item) => {
                            let (k, value) = item?;
                            match customers::decode(&k, &value) {
                                Ok(run) => Some(run),
                                Err(e) => {
                                    problem(&mut v, format!("tree customer_runs: {e}"));
                                    None
                                }
                            }
                        }
                    };
                }
                let fingerprint = run
                    .as_ref()
                    .and_then(|(first, fps)| fps.get(usize::try_from(seq - first).ok()?))
                    .copied()
                    .unwrap_or(0);
                if fingerprint != customers::fingerprint(&ev.customer_pseudonym) {
                    problem(
                        &mut v,
                        format!("tree customer_runs: seq {seq} has fingerprint {fingerprint:#x}, not its customer's"),
                    );
                }
            }
            match decoded {
                Err(e) => problem(&mut v, format!("tree events, seq {seq}: {e}")),
                Ok(ev) => match t.ids.get(ev.event_id.as_bytes()) {
                    Err(Error::Corrupt { tree, key, source }) => problem(
                        &mut v,
                        format!(
                            "the event-id index, looking up event {:?} (seq {seq}): tree {tree}, key {key:?}: {source}",
                            ev.event_id
                        ),
                    ),
                    Err(e) => return Err(e),
                    Ok(Some(s)) if s == seq => {}
                    Ok(Some(_)) => problem(
                        &mut v,
                        format!(
                            "event-id index: event {:?} (seq {seq}) points elsewhere",
                            ev.event_id
                        ),
                    ),
                    Ok(None) => problem(
                        &mut v,
                        format!("event-id index: event {:?} (seq {seq}) is missing", ev.event_id),
                    ),
                },
            }
            if v.events % 10_000 == 0 {
                progress(v.events);
            }
        }
        progress(v.events);
        for entry in t.ids.entries() {
            let entry = entry?;
            v.index_entries += 1;
            let id = String::from_utf8_lossy(&entry.id);
            match entry.seq {
                // An erased or purged id stays as a tombstone.
                Ok(writer::ERASED_TOMBSTONE | writer::PEER_TOMBSTONE) => {}
                Ok(seq) if slots::contains(&t.events, seq)? => {}
                Ok(seq) if seq <= self.purged_upto()? => {}
                Ok(seq) => problem(
                    &mut v,
                    format!("event-id index: {id:?} points to seq {seq}, which holds no event"),
                ),
                Err(e) => problem(&mut v, format!("the event-id index at {id:?}: {e}")),
            }
        }
        // One time entry per stored event, each naming one.
        let mut time_entries = 0u64;
        for item in t.by_time.iter() {
            let (key, value) = item?;
            match times::decode(&key, &value) {
                Err(e) => problem(&mut v, format!("tree {}: {e}", times::TREE)),
                Ok(entries) => {
                    for e in entries {
                        time_entries += 1;
                        if !slots::contains(&t.events, e.seq)? {
                            problem(
                                &mut v,
                                format!(
                                    "tree {}: entry of seq {} names no stored event",
                                    times::TREE,
                                    e.seq
                                ),
                            );
                        }
                    }
                }
            }
        }
        v.time_entries = time_entries;
        if time_entries != v.events {
            let line = format!(
                "tree {}: {time_entries} entries for {} stored events",
                times::TREE,
                v.events
            );
            problem(&mut v, line);
        }
        for name in self.inner.db.tree_names() {
            if !outbox::is_outbox_tree(&name) {
                continue;
            }
            let tree = self.inner.db.open_tree(&name)?;
            // Runs, or (a link no longer configured, so not moved at open)
            // one key per entry.
            let runs = name.starts_with(b"outboxes/");
            let name = String::from_utf8_lossy(&name).into_owned();
            for entry in tree.iter() {
                let (key, value) = entry?;
                let seqs: Vec<Seq> = if runs {
                    match outbox::Run::decode(&key, &value) {
                        Ok(run) => run.seqs().collect(),
                        Err(e) => {
                            problem(&mut v, format!("tree {name}: {e}"));
                            continue;
                        }
                    }
                } else {
                    match <[u8; 8]>::try_from(key.as_ref()) {
                        Ok(k) => vec![Seq::from_be_bytes(k)],
                        Err(_) => {
                            problem(&mut v, format!("tree {name}: a key of {} bytes", key.len()));
                            continue;
                        }
                    }
                };
                for seq in seqs {
                    v.outbox_entries += 1;
                    if !slots::contains(&t.events, seq)? {
                        problem(
                            &mut v,
                            format!("tree {name}: entry {seq} names no stored event"),
                        );
                    }
                }
            }
        }
        match self.verify_audit()? {
            Ok(ok) => v.audit_records = ok.records,
            Err(broken) => problem(&mut v, format!("tree audit: {broken}")),
        }
        // The hours' blocks and the manifests that list them must match
        // (hours with a damaged entry aside: that entry is the problem).
        // No checkpoint lands meanwhile.
        let _stable = t.pending.as_deref().map(rollups::Pending::hold_checkpoints);
        // Per hour: its manifest and its stored blocks.
        type HourBlocks = (blocks::Manifest, Vec<Vec<u8>>);
        let mut hours: std::collections::BTreeMap<Vec<u8>, HourBlocks> = Default::default();
        let mut damaged_hours = std::collections::BTreeSet::new();
        let rebuild = "(repair: `chainsight admin rebuild-rollups`)";
        for entry in t.rollups.iter() {
            let (key, value) = entry?;
            match rollups::check_cell(&key, &value) {
                Err(reason) => {
                    if blocks::in_blocks(&key) {
                        damaged_hours.insert(key[..blocks::PREFIX].to_vec());
                    }
                    problem(
                        &mut v,
                        format!("tree rollups: cell {key:?}: {reason} {rebuild}"),
                    );
                }
                Ok(cells) => {
                    v.rollup_cells += cells as u64;
                    if blocks::in_blocks(&key) {
                        let hour = hours.entry(key[..blocks::PREFIX].to_vec()).or_default();
                        if blocks::is_block(&key) {
                            hour.1.push(key.to_vec());
                        } else {
                            hour.0 = blocks::manifest(&key, &value);
                        }
                    }
                }
            }
        }
        for (hour, (manifest, stored)) in &hours {
            if damaged_hours.contains(hour) {
                continue;
            }
            let keys: Vec<&[u8]> = stored.iter().map(Vec::as_slice).collect();
            let (missing, stray) = blocks::mismatch(manifest, hour, &keys);
            for key in missing {
                problem(
                    &mut v,
                    format!(
                        "tree rollups: {key:?}: a block its hour's manifest lists is missing {rebuild}"
                    ),
                );
            }
            if let Some(keys) = stray {
                problem(
                    &mut v,
                    format!(
                        "tree rollups: hour {hour:?}: the blocks no manifest lists ({keys:?}) are not the {} full ones its manifest counts: a block is missing or stray {rebuild}",
                        manifest.full
                    ),
                );
            }
        }
        Ok(v)
    }

    /// Writes a consistent snapshot of the store to a new file at `path`
    /// (header and trees; see [`backup`]); returns once it is written.
    /// Publishes wait meanwhile.
    pub async fn snapshot(&self, node_id: &str, path: &Path) -> Result<backup::Counts> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Command::Snapshot {
                node_id: node_id.to_string(),
                path: path.to_path_buf(),
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Erases one customer's events here (see [`EraseRequest`]) and records
    /// the erasure for the upstream links `router` names; returns once it
    /// is durable.
    pub async fn erase(&self, request: EraseRequest, router: Router) -> Result<Erased> {
        // The customer's runs are read here, beside the writer: at millions
        // of events that takes a while, and the writer then reads only the
        // runs written since.
        let scanned = if request.pseudonym.is_empty() {
            customers::Scan::default()
        } else {
            let runs = self.inner.trees.customer_runs.clone();
            let pseudonym = request.pseudonym.clone();
            tokio::task::spawn_blocking(move || customers::scan(&runs, &pseudonym, None))
                .await
                .map_err(|_| Error::Closed)??
        };
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Command::Erase {
                request,
                router,
                scanned,
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// The erasure recorded under `id`.
    pub fn erasure(&self, id: &str) -> Result<Option<ErasureRecord>> {
        match self.inner.trees.erasures.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => erasure::decode_record(id, &bytes).map(Some),
        }
    }

    /// The erasures not yet confirmed by upstream link `link`.
    pub fn erasures_pending(&self, link: &str) -> Result<Vec<(String, LinkErasure)>> {
        let mut out = Vec::new();
        for item in self.inner.trees.erasures.iter() {
            let (k, v) = item?;
            let id = String::from_utf8_lossy(&k).into_owned();
            let record = erasure::decode_record(&id, &v)?;
            if let Some(l) = record
                .links
                .into_iter()
                .find(|l| l.link == link && l.confirmed_at == 0)
            {
                out.push((id, l));
            }
        }
        Ok(out)
    }

    /// Records the upstream's answer to passing erasure `id` on along
    /// `link` with its first `sent_ids` event ids: confirmed with the events
    /// it erased, or the error. A confirmation does not cover ids added
    /// since they were sent (the erasure stays pending for those).
    pub async fn erasure_answered(
        &self,
        id: &str,
        link: &str,
        sent_ids: usize,
        answer: std::result::Result<u64, String>,
    ) -> Result<()> {
        let tree = &self.inner.trees.erasures;
        tree.fetch_and_update(id.as_bytes(), |old| {
            let mut record = erasure::decode_record(id, old?).ok()?;
            if let Some(l) = record.links.iter_mut().find(|l| l.link == link) {
                match &answer {
                    Ok(_) if l.event_ids.len() != sent_ids => l.last_error.clear(),
                    Ok(n) => {
                        l.confirmed_at = UnixNanos::now().0;
                        l.erased_upstream = *n;
                        l.last_error.clear();
                    }
                    Err(e) => l.last_error = e.clone(),
                }
            }
            Some(prost::Message::encode_to_vec(&record))
        })?;
        tree.flush_async().await?;
        Ok(())
    }

    /// Woken whenever an erasure is recorded.
    pub fn erasures_added(&self) -> Arc<Notify> {
        self.inner.trees.erasures_added.clone()
    }

    /// Registers a following subscription while the guard lives: the
    /// writer then keeps each commit's new events, decoded and encoded,
    /// in the cache [`Self::scan_shared`] reads first (see
    /// `store::recent`).
    pub fn follow(&self) -> Following {
        self.inner.trees.recent.follow()
    }

    /// Up to `limit` events with `after < seq <= upto`, and the erasure
    /// signals among them, in sequence order: what subscribers and exports
    /// are sent. Events are shared: the newest come from a cache that every
    /// reader uses (see `store::recent`), so a node with many following
    /// subscribers reads, decodes and encodes each event once.
    pub fn scan_shared(&self, after: Seq, upto: Seq, limit: usize) -> Result<Vec<(Seq, Shared)>> {
        let recent = &self.inner.trees.recent;
        let found = recent.read(after, upto, limit);
        let mut events = found.events;
        if !found.complete {
            let from = found.resume_after;
            let want = limit - events.len();
            let mut read = Vec::new();
            // An event removed (erasure, retention) while this read ran:
            // read again, past it (a gap here would end a backfill early).
            'read: loop {
                read.clear();
                for item in
                    slots::range(&self.inner.trees.events, from.saturating_add(1), upto).take(want)
                {
                    let (seq, v) = item?;
                    let Some(record) = self.inner.trees.record_live(seq, &v)? else {
                        continue 'read;
                    };
                    let (ev, payload) = decode_event_with_payload(seq, &record)?;
                    read.push(Arc::new(RecentEvent::new(seq, ev, payload)));
                }
                break;
            }
            // Every event in (from, end] was read.
            let end = match read.last() {
                Some(last) if read.len() == want => last.seq(),
                _ => upto,
            };
            recent.fill(from, end, &read, found.generation);
            events.extend(read);
        }
        let bound = match events.last() {
            Some(last) if events.len() >= limit => last.seq(),
            _ => upto,
        };
        recent.reached(bound);
        let erasures = self.erasure_signals(after, bound)?;
        let mut out: Vec<(Seq, Shared)> = events
            .into_iter()
            .map(|e| (e.seq(), Shared::Event(e)))
            .chain(erasures.into_iter().map(|(s, e)| (s, Shared::Erasure(e))))
            .collect();
        out.sort_by_key(|(s, _)| *s);
        Ok(out)
    }

    /// Erasure signals with `after < seq <= upto`, in order.
    pub fn erasure_signals(&self, after: Seq, upto: Seq) -> Result<Vec<(Seq, ErasureSignal)>> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let range = after.saturating_add(1).to_be_bytes()..=upto.to_be_bytes();
        self.inner
            .trees
            .erasure_signals
            .range(range)
            .map(|item| {
                let (k, v) = item?;
                let seq = seq_from(&k, "erasure_signals", "?")?;
                Ok((seq, erasure::decode_signal(seq, &v)?))
            })
            .collect()
    }

    /// Spends `cost` of `identity`'s privacy budget `budget` for the period
    /// starting at `period_start` (a new period starts from nothing), and
    /// flushes before returning: `Ok(left)`, or `Err(spent)` when the cost
    /// does not fit (nothing is spent then).
    pub async fn spend_privacy_budget(
        &self,
        identity: &str,
        period_start: i64,
        cost: f64,
        budget: f64,
    ) -> Result<std::result::Result<f64, f64>> {
        let tree = &self.inner.trees.dp_budget;
        let mut verdict = Err(0.0);
        tree.fetch_and_update(identity.as_bytes(), |old| {
            let spent = old
                .filter(|v| v.len() == 16)
                .filter(|v| {
                    i64::from_be_bytes(v[..8].try_into().unwrap_or_default()) == period_start
                })
                .map_or(0.0, |v| {
                    f64::from_be_bytes(v[8..].try_into().unwrap_or_default())
                });
            // A little slack for sums of decimal fractions (0.1 × 10).
            if spent + cost > budget * (1.0 + 1e-9) {
                verdict = Err(spent);
                return old.map(<[u8]>::to_vec);
            }
            verdict = Ok(budget - spent - cost);
            let mut v = period_start.to_be_bytes().to_vec();
            v.extend_from_slice(&(spent + cost).to_be_bytes());
            Some(v)
        })?;
        tree.flush_async().await?;
        Ok(verdict)
    }

    /// Keeps an origin certificate (DER) under its SHA-256.
    pub fn put_certificate(&self, der: &[u8]) -> Result<()> {
        let fp = crate::origin::fingerprint(der);
        if !self.inner.trees.certs.contains_key(fp)? {
            self.inner.trees.certs.insert(fp, der)?;
        }
        Ok(())
    }

    /// The origin certificate (DER) with SHA-256 `fp`, if kept.
    pub fn certificate(&self, fp: &crate::origin::Fingerprint) -> Result<Option<Vec<u8>>> {
        Ok(self.inner.trees.certs.get(fp)?.map(|v| v.to_vec()))
    }

    /// Appends a record to the audit trail: `identity` did `kind`,
    /// described by `detail` (a JSON object).
    pub fn audit(
        &self,
        kind: crate::audit::Kind,
        identity: &str,
        detail: &serde_json::Value,
    ) -> Result<crate::audit::Record> {
        self.inner.audit.append(kind, identity, detail.to_string())
    }

    /// Records in the audit trail (its last seq: numbers have no gaps).
    pub fn audit_len(&self) -> u64 {
        self.inner.audit.head_seq()
    }

    /// The audit records after seq `after`, oldest first.
    pub fn audit_records(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<crate::audit::Record>> + Send + 'static {
        self.inner.audit.after(after)
    }

    /// Checks the audit trail's hash chain from its first record.
    pub fn verify_audit(
        &self,
    ) -> Result<std::result::Result<crate::audit::Verified, crate::audit::Broken>> {
        self.inner.audit.verify()
    }

    /// Checks the audit trail of the (stopped) node whose store is `dir`,
    /// opening nothing else of it.
    pub fn verify_audit_at(
        dir: &Path,
    ) -> Result<std::result::Result<crate::audit::Verified, crate::audit::Broken>> {
        let db = sled::Config::new()
            .path(dir)
            .create_new(false)
            .open()
            .map_err(|source| Error::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        audit::verify_db(&db)
    }

    /// Removes about `limit` events that occurred before `before`
    /// (retention), with their index entries: the oldest whole blocks of the
    /// time index, so up to 255 more. Returns how many were removed; 0 once
    /// none is left (that step also drops the rollup cells before it).
    pub async fn purge_before(&self, before: UnixNanos, limit: usize) -> Result<usize> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Command::Purge {
                before,
                limit,
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Flushes (group commits) done since the store was opened.
    pub fn flushes(&self) -> u64 {
        self.inner
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.inner.db.size_on_disk()? + self.inner.trees.log.bytes())
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Merges the rollups waiting in memory, flushes, and stops the writer:
    /// later writes fail with [`Error::Closed`]. For a clean shutdown (the
    /// next start then has nothing to refold).
    pub async fn close(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .writer
            .send(writer::Command::Close { reply })
            .await
            .is_err()
        {
            return Ok(()); // already closed
        }
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Flushes everything written so far to disk.
    pub async fn flush(&self) -> Result<()> {
        self.inner.db.flush_async().await?;
        Ok(())
    }
}

impl Drop for Inner {
    /// The writer stops once its queue closes (this was the last handle);
    /// waiting for it means the data directory is released on return.
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.writer, writer::Queue::closed()));
        let handle = self
            .writer_thread
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

fn agreement_key(link: &str) -> Vec<u8> {
    [b"agreements/".as_slice(), link.as_bytes()].concat()
}

/// A flush from a blocking context (a reload, or node start).
#[allow(clippy::disallowed_methods)]
fn flush_blocking(db: &sled::Db) -> Result<()> {
    db.flush()?;
    Ok(())
}

fn cursor_key(identity: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(identity.len() + 1 + name.len());
    key.extend_from_slice(identity.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

fn meta_seq(meta: &sled::Tree, key: &'static [u8]) -> Result<Seq> {
    meta_seq_key(meta, key, std::str::from_utf8(key).unwrap_or("?"))
}

/// The u64 under `key` in `meta` (0 if unset); `name` is for errors.
fn meta_seq_key(meta: &sled::Tree, key: &[u8], name: &str) -> Result<Seq> {
    match meta.get(key)? {
        None => Ok(0),
        Some(v) => seq_from(&v, "meta", name),
    }
}

/// The recorded retention horizon of the rollups (an hour), if any.
fn read_horizon(meta: &sled::Tree) -> Result<Option<i64>> {
    Ok(meta
        .get(META_ROLLUP_HORIZON)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(i64::from_be_bytes))
}

/// Whether the stored rollups were built with `layout` (or there is nothing
/// to build from yet).
fn rollups_current(trees: &Trees, layout: &crate::rollup::Layout) -> Result<bool> {
    let stored = trees.meta.get(META_ROLLUP_LAYOUT)?;
    Ok(stored.as_deref() == Some(layout.signature().as_bytes()) || trees.events.is_empty())
}

/// The highest sequence number ever used: the recorded high-water mark, or
/// the last event (stores written before the mark existed).
/// `meta` key set once `customer_runs` covers every stored event.
const META_CUSTOMER_RUNS: &[u8] = b"customer_runs";
/// `meta` key of the per-event customer index `customer_runs` replaced.
const META_CUSTOMER_INDEX: &[u8] = b"customer_index";

/// Builds the customer runs of a store written before they existed (from
/// its events; the `by_customer` tree of the per-event index goes).
fn index_customers(db: &sled::Db, trees: &Trees) -> Result<()> {
    // A `by_customer` tree is there in a store written before the runs, or
    // opened by such a version since (which did not keep them up to date).
    let old_index = db.tree_names().iter().any(|name| name == b"by_customer");
    if trees.meta.contains_key(META_CUSTOMER_RUNS)? && !old_index {
        return Ok(());
    }
    let started = std::time::Instant::now();
    // Runs the event log's replay wrote before this are built again here.
    trees.customer_runs.clear()?;
    let write = |pending: &[(Seq, u32)]| -> Result<()> {
        let mut batch = sled::Batch::default();
        for (first, value) in customers::runs(pending, customers::MAX_RUN) {
            batch.insert(&first.to_be_bytes(), value);
        }
        Ok(gate::apply_batch(&trees.customer_runs, batch)?)
    };
    let mut n = 0u64;
    if old_index && trees.meta.contains_key(META_CUSTOMER_INDEX)? {
        // From the old index (pseudonym ‖ 0 ‖ seq), which names every
        // stored event that has a customer: no event is read.
        let old = db.open_tree("by_customer")?;
        let mut found: Vec<(Seq, u32)> = Vec::with_capacity(old.len());
        for item in old.iter() {
            let (k, _) = item?;
            let Some(at) = k.len().checked_sub(9).filter(|at| k[*at] == 0) else {
                continue;
            };
            let seq = seq_from(&k[at + 1..], "by_customer", "?")?;
            if slots::contains(&trees.events, seq)? {
                let pseudonym = String::from_utf8_lossy(&k[..at]);
                found.push((seq, customers::fingerprint(&pseudonym)));
            }
        }
        found.sort_unstable();
        found.dedup_by_key(|(seq, _)| *seq);
        n = found.len() as u64;
        for chunk in found.chunks(64 * customers::MAX_RUN) {
            write(chunk)?;
        }
    } else {
        let mut pending: Vec<(Seq, u32)> = Vec::new();
        for item in slots::range(&trees.events, 0, Seq::MAX) {
            let (seq, v) = item?;
            let ev = trees.event(seq, &v)?;
            pending.push((seq, customers::fingerprint(&ev.customer_pseudonym)));
            n += 1;
            if pending.len() >= 64 * customers::MAX_RUN {
                write(&pending)?;
                pending.clear();
            }
        }
        write(&pending)?;
    }
    if old_index {
        gate::drop_tree(db, "by_customer")?;
    }
    trees.meta.remove(META_CUSTOMER_INDEX)?;
    trees.meta.insert(META_CUSTOMER_RUNS, &[1])?;
    flush_blocking(db)?;
    if n > 0 {
        tracing::info!(
            events = n,
            elapsed = ?started.elapsed(),
            "indexed the stored events by customer (one run of fingerprints per commit)"
        );
    }
    Ok(())
}

/// Removes the events at the end of the store whose `by_id` entry is
/// missing: the remains of a commit that a crash (or an I/O error)
/// interrupted before its flush. The writer applies its batches in the
/// order events, indexes and outboxes, `by_id` (see `Writer::write_sled`),
/// and sled recovers a prefix of them, so such events were never
/// acknowledged: their senders send them again. Their index and outbox
/// entries go with them. Returns how many were removed.
fn repair_tail(trees: &Trees) -> Result<usize> {
    let mut orphans: Vec<(Seq, PreferenceEvent)> = Vec::new();
    let mut rolled_back: std::collections::BTreeSet<Seq> = Default::default();
    for item in slots::rev(&trees.events) {
        let (seq, v) = item?;
        if trees.rolled_back(seq, &v) {
            rolled_back.insert(seq);
            continue;
        }
        let ev = trees.event(seq, &v)?;
        match trees.ids.get(ev.event_id.as_bytes()) {
            Ok(Some(s)) if s == seq => break,
            // A damaged pack of the id index: the event may be stored;
            // it is kept (verify reports the pack).
            Err(Error::Corrupt { tree, key, source }) => {
                tracing::warn!(event = %ev.event_id, seq, tree, key = %key, error = %source, "the event-id index is damaged where it would hold this event; keeping it (stop the node and run `chainsight admin verify`)");
                break;
            }
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        orphans.push((seq, ev));
    }
    // Nothing from the first of them on is stored any more: no customer
    // run may reach there (a later commit's run starts there, and the
    // event log's replay writes runs from the end of the last one).
    let first_gone = orphans
        .iter()
        .map(|(seq, _)| *seq)
        .chain(rolled_back.first().copied())
        .min();
    if let Some(first) = first_gone {
        slots::apply(
            &trees.customer_runs,
            &customers::truncated(&trees.customer_runs, first)?,
        )?;
        // Their outbox entries go too; the run that reaches there ends
        // before it (the numbers are given out again).
        for outbox in trees.outboxes.iter() {
            outbox.truncate_from(first)?;
        }
    }
    times::apply(
        &trees.by_time,
        &times::removed(
            &trees.by_time,
            orphans
                .iter()
                .map(|(seq, ev)| times::Entry::new(ev.occurred_at.0, *seq)),
        )?,
    )?;
    slots::apply(
        &trees.events,
        &slots::removals(&trees.events, orphans.iter().map(|(seq, _)| *seq))?,
    )?;
    if let Some((first, _)) = orphans.last() {
        tracing::warn!(
            events = orphans.len(),
            from_seq = first,
            "removed the unacknowledged remains of an interrupted write; their senders resend them"
        );
    }
    if let Some(first) = rolled_back.first() {
        // Their records are gone from the log, so their time entries are
        // found by their sequence number.
        times::apply(
            &trees.by_time,
            &times::removed_seqs(&trees.by_time, &rolled_back)?,
        )?;
        slots::apply(
            &trees.events,
            &slots::removals(&trees.events, rolled_back.iter().copied())?,
        )?;
        tracing::warn!(
            events = rolled_back.len(),
            from_seq = first,
            "removed the remains of a commit that failed (its events were refused and never stored); their senders resend them"
        );
    }
    Ok(orphans.len() + rolled_back.len())
}

/// Indexes again the events of the event log's frames after the end sled
/// recorded: commits that were synced to the log (and acknowledged) but
/// whose sled writes a crash lost before sled's background flush. Their
/// writes are put again in full (a commit sled kept in part is completed),
/// then flushed. Returns how many frames were replayed.
fn replay_log(db: &sled::Db, trees: &Trees) -> Result<usize> {
    let from = trees
        .meta
        .get(META_LOG_END)?
        .and_then(|v| log::End::decode(&v));
    if from.is_none() && trees.log.is_empty() {
        return Ok(0);
    }
    // Only frames this store can have written after `from`: above the
    // high-water mark sled kept, and of ids sled has not stored elsewhere
    // (or erased). Anything else is old bytes, never acknowledged, and ends
    // the log like a torn frame.
    let last_seq = meta_seq(&trees.meta, META_LAST_SEQ)?;
    let mut failed: Option<Error> = None;
    // The events of the accepted frames, in order (decoded once).
    let mut accepted: Vec<PreferenceEvent> = Vec::new();
    let replayed = trees
        .log
        .replay(from, |f| {
            let mut fits = || -> Result<bool> {
                if f.seq <= last_seq {
                    return Ok(false);
                }
                let ev = decode_event(f.seq, &f.record)?;
                let fits = match trees.ids.get(ev.event_id.as_bytes()) {
                    Ok(None) => true,
                    Ok(Some(seq)) => seq == f.seq,
                    // A damaged pack of the id index: replayed rather than
                    // lost (its id is then found in `by_id`).
                    Err(Error::Corrupt { tree, key, source }) => {
                        tracing::warn!(event = %ev.event_id, seq = f.seq, tree, key = %key, error = %source, "the event-id index is damaged where it would hold this event; replaying it (stop the node and run `chainsight admin verify`)");
                        true
                    }
                    Err(e) => return Err(e),
                };
                if fits {
                    accepted.push(ev);
                }
                Ok(fits)
            };
            match fits() {
                Ok(fits) => fits,
                Err(e) => {
                    failed.get_or_insert(e);
                    false
                }
            }
        })
        .map_err(|e| Error::Sled(e.into()))?;
    if let Some(e) = failed {
        return Err(e);
    }
    let orphans = settle_relocated(trees, &replayed.relocated)?;
    let frames = replayed.frames;
    let Some(last) = frames.last() else {
        zero_orphans(db, trees, &orphans)?;
        return Ok(0);
    };
    let end = log::End {
        segment: last.location.segment,
        offset: last.location.offset + u64::from(last.location.len),
    };
    let now = UnixNanos::now().0;
    let mut high = last_seq;
    // The customer runs of the commits sled lost, written again from their
    // frames. Replay starts at a commit, and a commit's run is one write: a
    // run sled kept from there on is whole, and written again here. Runs
    // before it stay, above the high-water mark too: the log's end is
    // written before the mark, so commits up to it may be kept whole
    // without it (truncating from the mark dropped their runs).
    slots::apply(
        &trees.customer_runs,
        &customers::truncated(&trees.customer_runs, frames[0].seq)?,
    )?;
    // (Every replayed frame is above that mark.)
    let fingerprints: Vec<(Seq, u32)> = frames
        .iter()
        .zip(&accepted)
        .map(|(f, ev)| (f.seq, customers::fingerprint(&ev.customer_pseudonym)))
        .collect();
    for (first, value) in customers::runs(&fingerprints, customers::MAX_RUN) {
        trees.customer_runs.insert(first.to_be_bytes(), value)?;
    }
    // Likewise the events' entries: one run per stretch of consecutive
    // numbers, rewritten from the first number above that mark. Entries
    // sled kept there are merged in, not dropped: a commit that failed
    // after its sled writes left slots of rolled-back frames (not
    // replayed), which `repair_tail` must find to remove their index and
    // outbox entries; replayed frames take their own slots.
    let mut above: std::collections::BTreeMap<Seq, log::Location> = Default::default();
    for item in slots::range(&trees.events, last_seq + 1, Seq::MAX) {
        let (seq, value) = item?;
        let at = log::Location::decode(&value).ok_or_else(|| Error::Corrupt {
            tree: "events",
            key: seq.to_string(),
            source: DecodeError::Payload(
                "an entry above the high-water mark that is not a location in the event log".into(),
            ),
        })?;
        above.insert(seq, at);
    }
    above.extend(frames.iter().map(|f| (f.seq, f.location)));
    // One batch: a crash between the removal and the rewrite would lose
    // the slots of rolled-back frames, and with them what `repair_tail`
    // removes by them (their numbers would then be given out again).
    let mut batch = sled::Batch::default();
    for (first, value) in slots::truncated(&trees.events, last_seq + 1)? {
        match value {
            Some(v) => batch.insert(&first.to_be_bytes(), v),
            None => batch.remove(&first.to_be_bytes()),
        }
    }
    let locations: Vec<(Seq, log::Location)> = above.into_iter().collect();
    for (first, value) in slots::runs(&locations) {
        batch.insert(&first.to_be_bytes(), value);
    }
    gate::apply_batch(&trees.events, batch)?;
    // A replayed entry replaces one sled kept of the same number.
    for (k, v) in times::added(
        &trees.by_time,
        frames
            .iter()
            .zip(&accepted)
            .map(|(f, ev)| times::Entry::new(ev.occurred_at.0, f.seq)),
    )? {
        trees.by_time.insert(k, v)?;
    }
    let mut queued: std::collections::BTreeMap<&str, Vec<Seq>> = Default::default();
    for f in &frames {
        for link in &f.links {
            queued.entry(link.as_str()).or_default().push(f.seq);
        }
    }
    for (link, mut seqs) in queued {
        seqs.sort_unstable();
        match trees.outboxes.iter().find(|o| o.link == link) {
            Some(outbox) => outbox.add_seqs(&seqs, now)?,
            // A link this open does not configure (an admin command opens
            // without links; a link may be left out of the config for a
            // while) is queued for all the same: the replay happens once,
            // and the events would otherwise never be forwarded.
            None => outbox::open(db, link)?.add_seqs(&seqs, now)?,
        };
    }
    trees.ids.generations().current.append(
        frames
            .iter()
            .zip(&accepted)
            .map(|(f, ev)| (ev.event_id.as_bytes(), f.seq)),
    )?;
    high = frames.iter().map(|f| f.seq).fold(high, Seq::max);
    // The log's end first, as in a commit (see `Writer::write_sled`).
    trees.meta.insert(META_LOG_END, &end.encode())?;
    trees.meta.insert(META_LAST_SEQ, &high.to_be_bytes())?;
    flush_blocking(db)?;
    zero_orphans(db, trees, &orphans)?;
    tracing::info!(
        events = frames.len(),
        from_seq = frames[0].seq,
        to_seq = last.seq,
        "indexed again the events of the log's last commits (sled had not flushed them before the node stopped)"
    );
    Ok(frames.len())
}

/// The relocated blocks a replay found after the log's end sled kept: one
/// that a location points to was moved to in full (its move's transaction
/// is in sled); one that none points to is what a crash left of a move cut
/// short before that transaction (the events are still where they were).
/// Those at the log's end are taken back (zeroed, and appends go on where
/// they began); any others are returned, to be zeroed once the log's end
/// past them is durable ([`zero_orphans`]): zeroed before, a replay would
/// end at their zeros and cut off what follows them.
fn settle_relocated(
    trees: &Trees,
    relocated: &[(log::Location, Vec<Seq>)],
) -> Result<Vec<log::Location>> {
    let mut orphans = Vec::new();
    for (at, seqs) in relocated {
        let mut live = false;
        for &seq in seqs {
            live |= slots::get(&trees.events, seq)?
                .and_then(|v| log::Location::decode(&v))
                .is_some_and(|now| now.same_frame(at));
        }
        if !live {
            orphans.push(*at);
        }
    }
    while let Some(last) = orphans.last().copied() {
        if !trees
            .log
            .cut_tail(last)
            .map_err(|e| Error::Sled(e.into()))?
        {
            break;
        }
        orphans.pop();
        tracing::warn!(
            segment = last.segment,
            offset = last.offset,
            "took back a relocated block at the end of the event log whose move a stop cut short (its events are where they were)"
        );
    }
    Ok(orphans)
}

/// Zeroes relocated blocks no location points to that are not at the
/// log's end, once the log's end is durable past them.
fn zero_orphans(db: &sled::Db, trees: &Trees, orphans: &[log::Location]) -> Result<()> {
    if orphans.is_empty() {
        return Ok(());
    }
    if let Some(end) = trees.log.end() {
        trees.meta.insert(META_LOG_END, &end.encode())?;
    }
    flush_blocking(db)?;
    trees.log.zero(orphans).map_err(|e| Error::Sled(e.into()))?;
    tracing::warn!(
        blocks = orphans.len(),
        "zeroed relocated blocks of the event log whose move failed (their events are where they were)"
    );
    Ok(())
}

/// Zeroes the frames an erasure or retention removed whose zeroing was cut
/// short (they are recorded under [`META_TO_ZERO`] in the same transaction
/// that removed them).
fn finish_zeroing(db: &sled::Db, trees: &Trees) -> Result<()> {
    let Some(owed) = trees.meta.get(META_TO_ZERO)? else {
        return Ok(());
    };
    let locations = log::Location::decode_all(&owed);
    remove_records(db, trees, &locations)?;
    trees.meta.remove(META_TO_ZERO)?;
    flush_blocking(db)?;
    tracing::info!(
        frames = locations.len(),
        "zeroed the event log's frames of removed events that a stop had left"
    );
    Ok(())
}

/// Zeroes the event log's frames at `owed` (of events an erasure or
/// retention removed). A block is zeroed whole: the events of it that are
/// still stored are first written again as a relocated block at the log's
/// end, synced, and their locations moved to it in one transaction with
/// the log's new end, flushed. A stop anywhere in between loses nothing:
/// before that transaction the events are where they were (and the open
/// zeroes the orphaned copy, see [`settle_relocated`]); after it, the
/// zeroing is finished from [`META_TO_ZERO`]. Idempotent.
fn remove_records(db: &sled::Db, trees: &Trees, owed: &[log::Location]) -> Result<()> {
    let mut moving: Vec<(Seq, Vec<String>, Vec<u8>)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for at in owed {
        if !seen.insert((at.segment, at.offset)) {
            continue;
        }
        let block = match trees.log.read_block(*at) {
            Ok(Some(block)) => block,
            // A single event's frame, or one zeroed or deleted already.
            Ok(None)
            | Err(log::FrameError::RolledBack { .. })
            | Err(log::FrameError::NoSegment(_)) => continue,
            // Not read: the zeroing stays owed (retried at the next
            // removal or open), the events that stay are not lost.
            Err(e @ log::FrameError::Io { .. }) => {
                return Err(Error::Sled(std::io::Error::other(e.to_string()).into()))
            }
            Err(e) => {
                // Damaged: what stays of it cannot be read either.
                tracing::error!(error = %e, "a block of the event log to zero is damaged; the events in it that were still stored go with it (run `chainsight admin verify`)");
                continue;
            }
        };
        for (i, (seq, links, record)) in block.entries().enumerate() {
            let here = log::Location {
                entry: i as u16,
                ..*at
            };
            let stays = slots::get(&trees.events, seq)?
                .and_then(|v| log::Location::decode(&v))
                .is_some_and(|now| now == here);
            if stays {
                moving.push((seq, links, record.to_vec()));
            }
        }
    }
    if !moving.is_empty() {
        moving.sort_by_key(|m| m.0);
        let frames: Vec<log::NewFrame> = moving
            .iter()
            .map(|(seq, links, record)| log::NewFrame {
                seq: *seq,
                links: links.iter().map(String::as_str).collect(),
                record: record.clone(),
            })
            .collect();
        let io = |e: std::io::Error| Error::Sled(e.into());
        let (locations, end) = trees
            .log
            .append_as(&frames, log::Packing::Relocated)
            .map_err(io)?;
        let moved = || -> Result<()> {
            trees.log.sync().map_err(io)?;
            let moves: Vec<(Seq, log::Location)> = moving
                .iter()
                .zip(&locations)
                .map(|((seq, _, _), at)| (*seq, *at))
                .collect();
            let rewrites = slots::moved(&trees.events, &moves)?;
            let mut pins: Vec<Vec<u8>> = locations
                .iter()
                .map(|at| relocated_key(at.segment))
                .collect();
            pins.dedup();
            gate::transaction(&(&trees.events, &trees.meta), |(events, meta)| {
                slots::apply_in(events, &rewrites)?;
                meta.insert(META_LOG_END, &end.encode())?;
                for pin in &pins {
                    meta.insert(pin.as_slice(), &[])?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => Error::Sled(e),
                sled::transaction::TransactionError::Abort(()) => Error::Closed,
            })
        };
        if let Err(e) = moved() {
            // The copies go again (they are the log's last frames: this
            // runs on the writer's thread, or at open before it): no stale
            // copy of the events stays behind, and the next commit does
            // not follow one.
            if let Err(undo) = trees.log.rollback(&locations) {
                tracing::error!(error = %undo, "could not take back the copies of a failed move in the event log; the next open zeroes them");
            }
            return Err(e);
        }
        flush_blocking(db)?;
        tracing::debug!(
            events = moving.len(),
            "moved the stored events of event log blocks being zeroed"
        );
    }
    trees.log.zero(owed).map_err(|e| Error::Sled(e.into()))
}

fn relocated_key(segment: u64) -> Vec<u8> {
    let mut key = META_RELOCATED_INTO.to_vec();
    key.extend_from_slice(&segment.to_be_bytes());
    key
}

/// Whether the event log's segment `segment` holds relocated blocks of
/// events still stored. Only a segment recorded as having received any is
/// looked up in `referenced`, the segments any stored event's location
/// names (a full scan of the `events` tree, made once per `referenced`,
/// on the first such segment); the record goes once none is left in it.
fn relocated_into(
    trees: &Trees,
    segment: u64,
    referenced: &mut Option<std::collections::HashSet<u64>>,
) -> Result<bool> {
    let key = relocated_key(segment);
    if !trees.meta.contains_key(&key)? {
        return Ok(false);
    }
    if referenced.is_none() {
        let mut segments = std::collections::HashSet::new();
        for item in slots::range(&trees.events, 0, Seq::MAX) {
            let (_, v) = item?;
            if let Some(at) = log::Location::decode(&v) {
                segments.insert(at.segment);
            }
        }
        *referenced = Some(segments);
    }
    if referenced.as_ref().is_some_and(|r| r.contains(&segment)) {
        return Ok(true);
    }
    trees.meta.remove(&key)?;
    Ok(false)
}

fn high_water(trees: &Trees) -> Result<Seq> {
    let last_event = slots::end(&trees.events)?;
    Ok(last_event.max(meta_seq(&trees.meta, META_LAST_SEQ)?))
}

fn decode_event(seq: Seq, bytes: &[u8]) -> Result<PreferenceEvent> {
    decode_event_with_payload(seq, bytes).map(|(ev, _)| ev)
}

/// The event stored at `seq`, and its protobuf encoding as stored.
fn decode_event_with_payload(seq: Seq, bytes: &[u8]) -> Result<(PreferenceEvent, &[u8])> {
    record::decode_with_payload(bytes).map_err(|source| Error::Corrupt {
        tree: "events",
        key: seq.to_string(),
        source,
    })
}

fn seq_from(bytes: &[u8], tree: &'static str, key: &str) -> Result<Seq> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| Error::Corrupt {
        tree,
        key: key.to_string(),
        source: DecodeError::TooShort(bytes.len()),
    })?;
    Ok(Seq::from_be_bytes(arr))
}

/// What `open` opens, retried for up to 5 s while it fails: a sled
/// database dropped a moment ago may still hold its lock (sled's flusher
/// thread). For tests that reopen what they just closed.
#[cfg(test)]
pub(crate) fn retry_open<T, E: std::fmt::Display>(
    mut open: impl FnMut() -> std::result::Result<T, E>,
) -> T {
    let mut last = String::new();
    for _ in 0..200 {
        match open() {
            Ok(opened) => return opened,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("still failing to open after 5 s: {last}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::{DimSet, Layout};

    /// Opens once the writer of a dropped handle has let go of the files.
    fn reopen(dir: &Path, layout: Option<Layout>) -> Store {
        retry_open(|| Store::open_with(dir, &[], layout.clone()))
    }

    /// What a commit cut short before its `by_id` writes leaves (events,
    /// their indexes and outbox entries, no `by_id`), or during them (the
    /// first event's `by_id` landed, the second's not), is removed on open:
    /// nothing of it is counted, queued or found, and the sender's resend
    /// stores what was missing, once.
    /// Opens what `open` opens once the directory's lock is free: sled's
    /// I/O threads may hold it for a moment after a store was closed and
    /// dropped in this process.
    fn unlocked<T, E: std::fmt::Display>(open: impl Fn() -> std::result::Result<T, E>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open() {
                Ok(t) => return t,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("open: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn the_remains_of_an_interrupted_commit_are_removed_on_open() {
        for first_by_id_landed in [false, true] {
            interrupted_commit(first_by_id_landed).await;
        }
    }

    async fn interrupted_commit(first_by_id_landed: bool) {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let event = |i: usize| {
            let mut ev = PreferenceEvent::example();
            ev.event_id = format!("e-{i}");
            ev.customer_pseudonym = format!("{:032x}", i + 1);
            ev.occurred_at = UnixNanos(ev.occurred_at.0 + i as i64);
            NewEvent {
                outboxes: vec![0],
                ..NewEvent::local(ev)
            }
        };
        {
            let store = Store::open(dir.path(), &links).expect("open");
            let stored = store
                .append((0..3).map(event).collect())
                .await
                .expect("append");
            assert!(stored.iter().all(|a| matches!(a, Appended::Stored(_))));
            store.close().await.expect("close");
        }
        // A commit of two more events, cut short as a crash leaves it.
        {
            let db = unlocked(|| sled::open(dir.path()));
            let (events, by_time, customer_runs, by_id, outbox) = (
                db.open_tree("events").expect("tree"),
                db.open_tree(times::TREE).expect("tree"),
                db.open_tree("customer_runs").expect("tree"),
                db.open_tree("by_id").expect("tree"),
                outbox::open(&db, &links[0]).expect("outbox").tree,
            );
            let fingerprints: Vec<(Seq, u32)> = [(4u64, event(3)), (5, event(4))]
                .iter()
                .map(|(seq, ne)| (*seq, customers::fingerprint(&ne.event.customer_pseudonym)))
                .collect();
            for (first, value) in customers::runs(&fingerprints, usize::MAX) {
                customer_runs
                    .insert(first.to_be_bytes(), value)
                    .expect("insert");
            }
            for (seq, ne) in [(4u64, event(3)), (5, event(4))] {
                events
                    .insert(seq.to_be_bytes(), record::encode(&ne.event))
                    .expect("insert");
                times::insert(&by_time, ne.event.occurred_at.0, seq).expect("insert");
            }
            for (first, run) in outbox::runs_of(&[4, 5], 0) {
                outbox.insert(first.to_be_bytes(), run).expect("insert");
            }
            if first_by_id_landed {
                by_id.insert("e-3", &4u64.to_be_bytes()).expect("insert");
            }
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let kept = if first_by_id_landed { 4 } else { 3 };
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(store.len().unwrap(), kept, "the remains are gone");
        assert_eq!(times::count(&store.inner.trees.by_time).unwrap(), kept);
        assert_eq!(customer_fingerprints(&store), kept);
        assert_eq!(outbox::entries(&store.inner.trees.outboxes[0].tree), kept);
        assert_eq!(
            store.inner.trees.outboxes[0]
                .len
                .load(std::sync::atomic::Ordering::SeqCst),
            kept as u64
        );
        assert!(store.get(5).expect("get").is_none());
        assert_eq!(
            customers::end(&store.inner.trees.customer_runs).expect("end"),
            kept as u64 + 1,
            "no customer run reaches past the stored events"
        );
        let log_end = store.inner.trees.meta.get(META_LOG_END).expect("read");
        // The resend: what landed is a duplicate, the rest is stored, once.
        let resent = store
            .append(vec![event(3), event(4)])
            .await
            .expect("append");
        let expected = if first_by_id_landed {
            vec![Appended::Duplicate(4), Appended::Stored(5)]
        } else {
            vec![Appended::Stored(4), Appended::Stored(5)]
        };
        assert_eq!(resent, expected);
        let again = store
            .append(vec![event(3), event(4)])
            .await
            .expect("append");
        assert_eq!(again, vec![Appended::Duplicate(4), Appended::Duplicate(5)]);
        assert_eq!(store.len().unwrap(), 5);
        assert_eq!(times::count(&store.inner.trees.by_time).unwrap(), 5);
        assert_eq!(customer_fingerprints(&store), 5);
        assert_eq!(
            outbox::queued_checked(&store.inner.trees.outboxes[0].tree),
            (1..=5).collect::<Vec<Seq>>(),
            "each stored event queued once, in runs that do not overlap"
        );
        store.close().await.expect("close");
        drop(store);
        // A crash then loses the resend's sled writes (not its synced
        // frames): the open indexes it again, its customers too.
        {
            let db = unlocked(|| sled::open(dir.path()));
            let lost: Vec<(Seq, PreferenceEvent)> = ((kept as u64 + 1)..=5)
                .map(|seq| (seq, event(seq as usize - 1).event))
                .collect();
            lose_commit(&db, &links[0], &lost);
            let meta = db.open_tree("meta").unwrap();
            meta.insert(META_LAST_SEQ, &(kept as u64).to_be_bytes())
                .unwrap();
            meta.insert(META_LOG_END, log_end.expect("a log end"))
                .unwrap();
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(store.len().unwrap(), 5);
        assert_eq!(customer_fingerprints(&store), 5, "indexed again");
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    /// A store written before the time blocks (one `by_time` key per
    /// event) is converted at open: the same scans, retention and erasure
    /// find the same events, and verify finds nothing wrong.
    #[tokio::test]
    async fn a_store_with_the_old_time_index_is_converted_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        const DAY: i64 = 86_400 * 1_000_000_000;
        let event = |i: usize| {
            let mut ev = PreferenceEvent::example();
            ev.event_id = format!("e-{i}");
            ev.customer_pseudonym = format!("{:032x}", i % 7 + 1);
            ev.occurred_at = UnixNanos(ev.occurred_at.0 - (i as i64 % 9) * DAY + i as i64 * 1_000);
            NewEvent::local(ev)
        };
        let base = PreferenceEvent::example().occurred_at.0;
        let everything = || (UnixNanos(i64::MIN), UnixNanos(i64::MAX));
        let ids = |events: Vec<PreferenceEvent>| -> Vec<String> {
            events.into_iter().map(|e| e.event_id).collect()
        };
        let before = {
            let store = Store::open(dir.path(), &[]).expect("open");
            for chunk in (0..600).collect::<Vec<_>>().chunks(70) {
                store
                    .append(chunk.iter().map(|&i| event(i)).collect())
                    .await
                    .expect("append");
            }
            let (from, to) = everything();
            let all = ids(store.scan_time(from, to).collect::<Result<_>>().unwrap());
            store.close().await.expect("close");
            all
        };
        assert_eq!(before.len(), 600);
        // Write the index as the old format had it, and drop the blocks.
        {
            let db = unlocked(|| sled::open(dir.path()));
            let blocks = db.open_tree(times::TREE).unwrap();
            let old = db.open_tree(times::OLD_TREE).unwrap();
            for item in blocks.iter() {
                let (k, v) = item.unwrap();
                for e in times::decode(&k, &v).unwrap() {
                    old.insert(times::old_key(e), &[]).unwrap();
                }
            }
            assert_eq!(old.len(), 600);
            gate::drop_tree(&db, times::TREE).unwrap();
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = unlocked(|| Store::open(dir.path(), &[]));
        assert!(!store
            .inner
            .db
            .tree_names()
            .iter()
            .any(|n| n == times::OLD_TREE.as_bytes()));
        let (from, to) = everything();
        let after = ids(store.scan_time(from, to).collect::<Result<_>>().unwrap());
        assert_eq!(after, before, "the same events in the same order");
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // A day's range, then retention of the three oldest days.
        let day: Vec<String> = ids(store
            .scan_time(UnixNanos(base - 2 * DAY), UnixNanos(base - DAY))
            .collect::<Result<_>>()
            .unwrap());
        let want: Vec<String> = (0..600)
            .map(event)
            .filter(|ne| (base - 2 * DAY..base - DAY).contains(&ne.event.occurred_at.0))
            .map(|ne| ne.event.event_id)
            .collect();
        let mut sorted = day.clone();
        sorted.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(sorted, want_sorted);
        assert!(!day.is_empty());
        let cut = UnixNanos(base - 5 * DAY - DAY / 2);
        let mut removed = 0;
        loop {
            // Small steps: each removes whole blocks, at least 50 events.
            let n = store.purge_before(cut, 50).await.expect("purge");
            if n == 0 {
                break;
            }
            assert!(n >= 50 || store.purge_before(cut, 50).await.expect("purge") == 0);
            removed += n;
        }
        let expected_gone = (0..600)
            .map(event)
            .filter(|ne| ne.event.occurred_at < cut)
            .count();
        assert_eq!(removed, expected_gone);
        assert_eq!(store.len().unwrap(), 600 - expected_gone);
        let (from, to) = everything();
        assert!(store
            .scan_time(from, to)
            .all(|e| e.unwrap().occurred_at >= cut));
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    fn linked_event(i: usize) -> NewEvent {
        let mut ev = PreferenceEvent::example();
        ev.event_id = format!("e-{i}");
        ev.customer_pseudonym = format!("{:032x}", i + 1);
        ev.occurred_at = UnixNanos(ev.occurred_at.0 + i as i64);
        NewEvent {
            outboxes: vec![0],
            ..NewEvent::local(ev)
        }
    }

    /// [`linked_event`] with the id `id`.
    fn linked_event_with_id(i: usize, id: &str) -> NewEvent {
        let mut ne = linked_event(i);
        ne.event.event_id = id.into();
        ne
    }

    /// A store with `links` holding `linked_event(i)` for each `i` in
    /// `events`, in one commit.
    async fn linked_store(dir: &Path, links: &[String], events: std::ops::Range<usize>) -> Store {
        let store = Store::open(dir, links).expect("open");
        store
            .append(events.map(linked_event).collect())
            .await
            .expect("append");
        store
    }

    /// Takes a commit's sled writes out, as a crash before sled's
    /// background flush loses them (the event log keeps its frames).
    fn lose_commit(db: &sled::Db, link: &str, events: &[(Seq, PreferenceEvent)]) {
        for (seq, ev) in events {
            db.open_tree("by_id")
                .unwrap()
                .remove(ev.event_id.as_bytes())
                .unwrap();
            times::remove(&db.open_tree(times::TREE).unwrap(), ev.occurred_at.0, *seq).unwrap();
        }
        db.open_tree(outbox::tree_name(link))
            .unwrap()
            .remove(events[0].0.to_be_bytes())
            .unwrap()
            .expect("the commit's outbox run");
        // The commit's run of locations and its customer run: one key
        // each, at its first number.
        db.open_tree("events")
            .unwrap()
            .remove(events[0].0.to_be_bytes())
            .unwrap()
            .expect("the commit's run of locations");
        db.open_tree("customer_runs")
            .unwrap()
            .remove(events[0].0.to_be_bytes())
            .unwrap()
            .expect("the commit's run");
    }

    /// Counts of every place an event is indexed in.
    fn index_counts(store: &Store) -> [usize; 5] {
        let t = &store.inner.trees;
        [
            slots::count(&t.events).unwrap(),
            t.ids.len(),
            times::count(&t.by_time).unwrap(),
            customer_fingerprints(store),
            outbox::entries(&t.outboxes[0].tree),
        ]
    }

    /// How many events the customer runs hold a fingerprint of.
    fn customer_fingerprints(store: &Store) -> usize {
        store
            .inner
            .trees
            .customer_runs
            .iter()
            .map(|item| {
                let (k, v) = item.expect("read");
                let (_, fps) = customers::decode(&k, &v).expect("a run");
                fps.iter().filter(|f| **f != 0).count()
            })
            .sum()
    }

    /// A store with `links` and two commits (events 1–3, then 4–5), of
    /// which sled lost the second (a crash before its background flush):
    /// its writes are gone, the log's frames are not.
    async fn second_commit_lost(dir: &Path, links: &[String]) {
        let first_end = {
            let store = linked_store(dir, links, 0..3).await;
            let end = store.inner.trees.meta.get(META_LOG_END).unwrap().unwrap();
            store
                .append((3..5).map(linked_event).collect())
                .await
                .expect("append");
            store.close().await.expect("close");
            end
        };
        let db = unlocked(|| sled::open(dir));
        let lost: Vec<(Seq, PreferenceEvent)> = [4u64, 5]
            .into_iter()
            .map(|seq| (seq, linked_event(seq as usize - 1).event))
            .collect();
        lose_commit(&db, &links[0], &lost);
        let meta = db.open_tree("meta").unwrap();
        meta.insert(META_LAST_SEQ, &3u64.to_be_bytes()).unwrap();
        meta.insert(META_LOG_END, first_end).unwrap();
        #[allow(clippy::disallowed_methods)]
        db.flush().expect("flush");
    }

    #[tokio::test]
    async fn commits_sled_had_not_flushed_are_indexed_again_from_the_event_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        second_commit_lost(dir.path(), &links).await;
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(index_counts(&store), [5, 5, 5, 5, 5], "indexed again");
        assert_eq!(
            store.inner.trees.outboxes[0]
                .len
                .load(std::sync::atomic::Ordering::SeqCst),
            5
        );
        assert_eq!(store.get(5).unwrap().unwrap().event_id, "e-4");
        assert_eq!(store.last_seq().unwrap(), 5);
        let v = store.verify(|_| {}).unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // The resend finds them stored; the next event follows them.
        let resent = store
            .append((3..6).map(linked_event).collect())
            .await
            .expect("append");
        assert_eq!(
            resent,
            [
                Appended::Duplicate(4),
                Appended::Duplicate(5),
                Appended::Stored(6)
            ]
        );
        store.close().await.expect("close");
        drop(store);
        // Nothing is replayed twice.
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(index_counts(&store), [6, 6, 6, 6, 6]);
        store.close().await.expect("close");
    }

    /// An open without the link (as `admin verify` does) replays a commit
    /// sled lost: its events are queued for the link all the same, and
    /// found there when the node opens with it.
    #[tokio::test]
    async fn a_replay_without_the_links_still_queues_for_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        second_commit_lost(dir.path(), &links).await;
        {
            let store = unlocked(|| Store::open(dir.path(), &[]));
            assert_eq!(store.len().unwrap(), 5, "replayed without the link");
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(index_counts(&store), [5, 5, 5, 5, 5]);
        assert_eq!(store.outbox_len(0), 5);
        assert_eq!(
            outbox::queued_checked(&store.inner.trees.outboxes[0].tree),
            [1, 2, 3, 4, 5]
        );
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_failed_commit_is_taken_out_of_the_log_and_its_remains_out_of_sled() {
        failed_commit(0).await;
    }

    /// The commit's id of the first event landed, the others' did not (as
    /// the key-by-key `by_id` writes before the id journal could leave
    /// it): the first event is stored, the others' frames are rolled back. The
    /// event log's replay must leave their slots to the repair (which
    /// removes their index and outbox entries), not drop them unseen.
    #[tokio::test]
    async fn a_commit_that_failed_after_its_first_id_keeps_only_that_event() {
        failed_commit(1).await;
    }

    /// A commit of three more events (seqs 4 to 6) fails after its frames
    /// were synced and its sled writes landed up to the `by_id` entries of
    /// the first `kept` (as the writer does on an I/O error): the other
    /// frames go back out of the log. Reopened, the store holds the three
    /// earlier events and the `kept`, each once in every index; the
    /// resend stores the rest.
    async fn failed_commit(kept: usize) {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let seqs = [4u64, 5, 6];
        {
            let store = linked_store(dir.path(), &links, 0..3).await;
            let t = &store.inner.trees;
            let news: Vec<NewEvent> = (3..6).map(linked_event).collect();
            let frames: Vec<log::NewFrame> = news
                .iter()
                .zip(seqs)
                .map(|(ne, seq)| log::NewFrame {
                    seq,
                    links: vec![links[0].as_str()],
                    record: record::encode(&ne.event),
                })
                .collect();
            let (locations, _) = t.log.append(&frames).unwrap();
            t.log.sync().unwrap();
            let at: Vec<(Seq, log::Location)> = seqs.into_iter().zip(locations.clone()).collect();
            for (first, value) in slots::runs(&at) {
                t.events.insert(first.to_be_bytes(), value).unwrap();
            }
            for (ne, seq) in news.iter().zip(seqs) {
                times::insert(&t.by_time, ne.event.occurred_at.0, seq).unwrap();
            }
            for (first, run) in outbox::runs_of(&seqs, 0) {
                t.outboxes[0].tree.insert(first.to_be_bytes(), run).unwrap();
            }
            let fingerprints: Vec<(Seq, u32)> = news
                .iter()
                .zip(seqs)
                .map(|(ne, seq)| (seq, customers::fingerprint(&ne.event.customer_pseudonym)))
                .collect();
            for (first, value) in customers::runs(&fingerprints, usize::MAX) {
                t.customer_runs.insert(first.to_be_bytes(), value).unwrap();
            }
            for (ne, seq) in news.iter().zip(seqs).take(kept) {
                t.ids
                    .generations()
                    .current
                    .append([(ne.event.event_id.as_bytes(), seq)])
                    .unwrap();
            }
            t.log.rollback(&locations[kept..]).unwrap();
            assert!(t.rolled_back(6, &locations[2].encode()));
            assert!(store.get(6).is_err(), "a rolled back frame is never served");
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        let n = 3 + kept;
        assert_eq!(index_counts(&store), [n; 5], "the remains are gone");
        let v = store.verify(|_| {}).unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // The resend stores the others, once, and the log goes on where
        // the rolled back frames were.
        let resent = store
            .append((3..6).map(linked_event).collect())
            .await
            .expect("append");
        for (i, outcome) in resent.iter().enumerate() {
            assert_eq!(
                matches!(outcome, Appended::Duplicate(_)),
                i < kept,
                "{resent:?}"
            );
        }
        assert_eq!(index_counts(&store), [6; 5]);
        store.close().await.expect("close");
        drop(store);
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(index_counts(&store), [6; 5]);
        let ids: Vec<String> = store
            .scan_after(0)
            .map(|e| e.expect("read").1.event_id)
            .collect();
        assert_eq!(ids, (0..6).map(|i| format!("e-{i}")).collect::<Vec<_>>());
        let v = store.verify(|_| {}).unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    /// The writer records the log's end before the high-water mark, so a
    /// crash between the two can leave the end without the mark (never
    /// the mark without the end, which would make the open refuse the
    /// commit's frames as older than the mark and zero them): the commit
    /// is whole in sled then, and its numbers stay used.
    #[tokio::test]
    async fn a_log_end_kept_without_its_high_water_mark_loses_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        {
            let store = linked_store(dir.path(), &links, 0..3).await;
            store
                .append((3..5).map(linked_event).collect())
                .await
                .expect("append");
            store.close().await.expect("close");
        }
        {
            let db = unlocked(|| sled::open(dir.path()));
            db.open_tree("meta")
                .unwrap()
                .insert(META_LAST_SEQ, &3u64.to_be_bytes())
                .unwrap();
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(index_counts(&store), [5; 5]);
        assert_eq!(store.get(5).unwrap().unwrap().event_id, "e-4");
        let next = store.append(vec![linked_event(5)]).await.expect("append");
        assert!(matches!(next[..], [Appended::Stored(6)]), "{next:?}");
        let v = store.verify(|_| {}).unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    /// A kill -9 can leave a commit whole in sled but the high-water mark
    /// before it (the log's end is written first), and lose the next commit
    /// to the event log. Its replay must keep the kept commit's customer
    /// run (the crash suite found one truncated away).
    #[tokio::test]
    async fn a_replay_keeps_the_customer_run_of_a_commit_kept_above_the_mark() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let log_end = {
            let store = linked_store(dir.path(), &links, 0..3).await;
            store
                .append((3..5).map(linked_event).collect())
                .await
                .expect("append");
            let log_end = store.inner.trees.meta.get(META_LOG_END).unwrap();
            store
                .append((5..7).map(linked_event).collect())
                .await
                .expect("append");
            store.close().await.expect("close");
            log_end.expect("a log end")
        };
        {
            let db = unlocked(|| sled::open(dir.path()));
            let lost: Vec<(Seq, PreferenceEvent)> = (6..=7)
                .map(|seq| (seq, linked_event(seq as usize - 1).event))
                .collect();
            lose_commit(&db, &links[0], &lost);
            let meta = db.open_tree("meta").unwrap();
            meta.insert(META_LOG_END, log_end).unwrap();
            meta.insert(META_LAST_SEQ, &3u64.to_be_bytes()).unwrap();
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(index_counts(&store), [7; 5]);
        let v = store.verify(|_| {}).unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    /// A damaged time block fails the commits whose events fall in it, with
    /// nothing of them in sled; other commits go on, and verify names it.
    #[tokio::test]
    async fn a_damaged_time_block_fails_only_the_commits_that_touch_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let store = linked_store(dir.path(), &links, 0..3).await;
        const DAY: i64 = 86_400 * 1_000_000_000;
        let in_day = |i: usize, days: i64| {
            let mut ne = linked_event(i);
            ne.event.occurred_at = UnixNanos(ne.event.occurred_at.0 + days * DAY);
            ne
        };
        let damaged = times::Entry::new(in_day(3, 2).event.occurred_at.0, 4).key();
        store
            .inner
            .trees
            .by_time
            .insert(damaged, &[7u8; 10])
            .unwrap();
        let failed = store.append(vec![in_day(3, 2)]).await;
        assert!(
            matches!(&failed, Err(Error::Write { reason, .. })
                if reason.contains("tree \"time_blocks\"") && reason.contains("not stored")),
            "{failed:?}"
        );
        let t = &store.inner.trees;
        assert_eq!(
            [
                store.len().unwrap(),
                t.ids.len(),
                outbox::entries(&t.outboxes[0].tree)
            ],
            [3; 3],
            "nothing of it stored"
        );
        assert_eq!(customer_fingerprints(&store), 3);
        let next = store.append(vec![in_day(4, 3)]).await.expect("append");
        let Appended::Stored(seq) = next[0] else {
            panic!("{next:?}")
        };
        assert_eq!(store.get(seq).unwrap().unwrap().event_id, "e-4");
        let v = store.verify(|_| {}).unwrap();
        assert_eq!(v.events, 4);
        assert!(
            !v.problems.is_empty() && v.problems.iter().all(|p| p.starts_with("tree time_blocks")),
            "{:?}",
            v.problems
        );
        store.close().await.expect("close");
    }

    /// `admin verify` finds an hour's block its manifest lists but that is
    /// missing, and a block no manifest lists; a damaged manifest is one
    /// problem, not one more per block it lists.
    #[tokio::test]
    async fn verify_checks_the_hours_blocks_against_their_manifests() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hour = 3_600_000_000_000i64;
        {
            let store = Store::open(dir.path(), &[]).expect("open");
            let events = (0..3)
                .map(|i| {
                    let mut ev = PreferenceEvent::example();
                    ev.event_id = format!("e-{i}");
                    ev.occurred_at = UnixNanos(ev.occurred_at.0 - i * hour);
                    NewEvent::local(ev)
                })
                .collect();
            store.append(events).await.expect("append");
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &[]));
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty() && v.rollup_cells > 0, "{v:?}");
        let tree = &store.inner.trees.rollups;
        // The base family's three hours: their manifests and blocks.
        let base: Vec<(sled::IVec, sled::IVec)> = tree
            .scan_prefix([crate::rollup::FAMILY_BASE])
            .map(|item| item.expect("entry"))
            .collect();
        let manifests: Vec<&(sled::IVec, sled::IVec)> =
            base.iter().filter(|(k, _)| !blocks::is_block(k)).collect();
        let block_of = |prefix: &[u8]| {
            base.iter()
                .find(|(k, _)| blocks::is_block(k) && k.starts_with(prefix))
                .expect("a block")
                .clone()
        };
        assert_eq!(manifests.len(), 3, "{base:?}");
        let (missing, _) = block_of(&manifests[0].0);
        tree.remove(&missing).expect("remove");
        let (damaged, value) = manifests[1];
        let mut flipped = value.to_vec();
        flipped[1] ^= 1;
        tree.insert(damaged, flipped).expect("damage");
        let (listed, value) = block_of(&manifests[2].0);
        let mut stray = listed.to_vec();
        stray[blocks::PREFIX + 7] ^= 0x40;
        tree.insert(&stray, blocks::moved(&listed, &stray, &value))
            .expect("stray");
        let v = store.verify(|_| {}).expect("verify");
        assert_eq!(v.problems.len(), 3, "{:?}", v.problems);
        let about = |key: &[u8], what: &str| {
            v.problems
                .iter()
                .any(|p| p.contains(&format!("{key:?}")) && p.contains(what))
        };
        assert!(about(&missing, "lists is missing"), "{:?}", v.problems);
        assert!(about(damaged, "checksum mismatch"), "{:?}", v.problems);
        assert!(about(&stray, "no manifest lists"), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn verify_reports_an_entry_inside_the_run_before_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = linked_store(dir.path(), &["upstream".to_string()], 0..3).await;
        let t = &store.inner.trees;
        let v = store.verify(|_| {}).unwrap();
        assert!(v.problems.is_empty() && v.events == 3, "{v:?}");
        // Seq 2 again, as a key of its own inside the commit's run 1..=3.
        let at = slots::get(&t.events, 2).unwrap().unwrap();
        t.events.insert(2u64.to_be_bytes(), &*at).unwrap();
        let v = store.verify(|_| {}).unwrap();
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("entry at seq 2 overlaps the one before it (up to seq 3)")),
            "{:?}",
            v.problems
        );
        store.close().await.expect("close");
    }

    /// The bytes of every segment file of the store in `dir` (each cut
    /// after its last byte that is not zero: the rest was allocated ahead
    /// of time), by segment id.
    fn segment_files(dir: &Path) -> std::collections::BTreeMap<u64, Vec<u8>> {
        let mut out = whole_segment_files(dir);
        for bytes in out.values_mut() {
            let used = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            bytes.truncate(used);
        }
        out
    }

    /// The bytes of every segment file of the store in `dir`, whole (a
    /// block may end in zero bytes), by segment id.
    fn whole_segment_files(dir: &Path) -> std::collections::BTreeMap<u64, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(dir.join("log")).expect("log dir") {
            let path = entry.expect("entry").path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            out.insert(id, std::fs::read(&path).expect("segment"));
        }
        out
    }

    fn holds(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn an_erasure_leaves_none_of_the_erased_events_bytes_in_the_event_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let victim = "f00dfeedf00dfeedf00dfeedf00dfeed";
        let victim_ids = ["erase-me-first", "erase-me-second"];
        // The victim's two events among others, in two commits (one of
        // them in the middle of its commit, one at the end of the log).
        let event = |i: usize| {
            let mut ne = linked_event(i);
            if let Some(n) = [2, 5].iter().position(|v| *v == i) {
                ne.event.event_id = victim_ids[n].to_string();
                ne.event.customer_pseudonym = victim.to_string();
            }
            ne
        };
        let kept: Vec<(Seq, String)> = [1, 2, 4, 5]
            .into_iter()
            .map(|seq| (seq, linked_event(seq as usize - 1).event.event_id))
            .collect();
        let check = |store: &Store, when: &str| {
            let files = segment_files(dir.path());
            assert!(!files.is_empty(), "{when}: the log has segments");
            for (id, bytes) in &files {
                for needle in victim_ids.iter().chain([&victim]) {
                    assert!(
                        !holds(bytes, needle.as_bytes()),
                        "{when}: segment {id} still holds {needle:?}"
                    );
                }
            }
            for (seq, id) in &kept {
                let ev = store.get(*seq).expect("read").expect("kept");
                assert_eq!(&ev.event_id, id, "{when}: seq {seq}");
            }
            for seq in [3, 6] {
                assert!(store.get(seq).expect("read").is_none(), "{when}: seq {seq}");
            }
            for id in victim_ids {
                assert!(
                    store.get_by_event_id(id).expect("read").is_none(),
                    "{when}: {id}"
                );
            }
            assert_eq!(index_counts(store), [4, 6, 4, 4, 4], "{when}");
        };
        {
            let store = Store::open(dir.path(), &links).expect("open");
            store
                .append((0..4).map(event).collect())
                .await
                .expect("append");
            store
                .append((4..6).map(event).collect())
                .await
                .expect("append");
            // The test sees the bytes it looks for while they are stored.
            let before = segment_files(dir.path());
            for needle in victim_ids.iter().chain([&victim]) {
                assert!(
                    before.values().any(|b| holds(b, needle.as_bytes())),
                    "{needle:?} is in the log before the erasure"
                );
            }
            let erased = store
                .erase(erase_customer("er-1", victim), Router::none())
                .await
                .expect("erase");
            assert_eq!(erased.events, 2);
            check(&store, "after the erasure");
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        check(&store, "after a reopen");
        // The log goes on after the zeroed frame at its end.
        let stored = store.append(vec![linked_event(6)]).await.expect("append");
        assert_eq!(stored, [Appended::Stored(8)]);
        assert_eq!(store.get(8).unwrap().unwrap().event_id, "e-6");
        store.close().await.expect("close");
    }

    /// An erasure of events inside compressed blocks of the log: each block
    /// is zeroed whole, the events in it that stay are moved first, and
    /// none of the erased events' bytes is left in any segment, blocks
    /// decompressed; after a reopen the moved events are read where they
    /// are, not indexed again as new ones.
    #[tokio::test]
    async fn an_erasure_in_blocks_moves_what_stays_and_leaves_none_of_the_erased_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let victim = "f00dfeedf00dfeedf00dfeedf00dfeed";
        let victim_at = [3usize, 17, 38];
        let victim_id = |n: usize| format!("erase-me-{n}");
        let event = |i: usize| {
            let mut ne = linked_event(i);
            if let Some(n) = victim_at.iter().position(|v| *v == i) {
                ne.event.event_id = victim_id(n);
                ne.event.customer_pseudonym = victim.to_string();
            }
            ne
        };
        let needles: Vec<String> = (0..3).map(victim_id).chain([victim.to_string()]).collect();
        let plain = || -> Vec<(u64, Vec<u8>, usize)> {
            whole_segment_files(dir.path())
                .into_iter()
                .map(|(id, bytes)| {
                    let (plain, blocks) = log::with_blocks_decompressed(&bytes);
                    (id, plain, blocks)
                })
                .collect()
        };
        let check = |store: &Store, when: &str| {
            for (id, bytes, _) in plain() {
                for needle in &needles {
                    assert!(
                        !holds(&bytes, needle.as_bytes()),
                        "{when}: segment {id} still holds {needle:?}"
                    );
                }
            }
            for i in (0..40).filter(|i| !victim_at.contains(i)) {
                let seq = i as Seq + 1;
                let ev = store.get(seq).expect("read").expect("kept");
                assert_eq!(ev.event_id, format!("e-{i}"), "{when}: seq {seq}");
            }
            for i in victim_at {
                assert!(
                    store.get(i as Seq + 1).expect("read").is_none(),
                    "{when}: {i}"
                );
            }
            assert_eq!(index_counts(store), [37, 40, 37, 37, 37], "{when}");
        };
        {
            let store = Store::open(dir.path(), &links).expect("open");
            store
                .append((0..40).map(event).collect())
                .await
                .expect("append");
            // In blocks (40 events: three), where the test finds what it
            // looks for only decompressed.
            let before = plain();
            assert_eq!(before.iter().map(|(_, _, b)| b).sum::<usize>(), 3);
            for needle in &needles {
                assert!(
                    before.iter().any(|(_, b, _)| holds(b, needle.as_bytes())),
                    "{needle:?} is in the log before the erasure"
                );
            }
            let erased = store
                .erase(erase_customer("er-1", victim), Router::none())
                .await
                .expect("erase");
            assert_eq!(erased.events, 3);
            check(&store, "after the erasure");
            // The three blocks are zeros; the 37 events are in relocated
            // blocks after them.
            let after = plain();
            assert_eq!(after.iter().map(|(_, _, b)| b).sum::<usize>(), 3);
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        check(&store, "after a reopen");
        // The erasure's signal took seq 41.
        let stored = store.append(vec![linked_event(40)]).await.expect("append");
        assert_eq!(stored, [Appended::Stored(42)]);
        assert_eq!(store.get(42).unwrap().unwrap().event_id, "e-40");
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    /// A stop after the events that stay in a block were written again at
    /// the log's end but before their locations moved: the open zeroes
    /// that copy, and the events are read where they were.
    #[tokio::test]
    async fn a_relocated_block_no_location_points_to_is_zeroed_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let orphan;
        {
            let store = Store::open(dir.path(), &links).expect("open");
            store
                .append((0..20).map(linked_event).collect())
                .await
                .expect("append");
            // The move's first half: the copy, synced, no transaction.
            let t = &store.inner.trees;
            let copies: Vec<NewEvent> = (0..2).map(linked_event).collect();
            let records: Vec<Vec<u8>> = copies.iter().map(|ne| record::encode(&ne.event)).collect();
            let frames: Vec<log::NewFrame> = records
                .iter()
                .enumerate()
                .map(|(i, r)| log::NewFrame {
                    seq: i as Seq + 1,
                    links: vec!["upstream"],
                    record: r.clone(),
                })
                .collect();
            let (copy, _) = t
                .log
                .append_as(&frames, log::Packing::Relocated)
                .expect("append");
            t.log.sync().expect("sync");
            orphan = copy[0];
            store.close().await.expect("close");
        }
        let blocks = |dir: &Path| -> usize {
            whole_segment_files(dir)
                .values()
                .map(|b| log::with_blocks_decompressed(b).1)
                .sum()
        };
        assert_eq!(
            blocks(dir.path()),
            3,
            "two blocks of the commit and the copy"
        );
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(blocks(dir.path()), 2, "the copy is zeroed");
        assert_eq!(index_counts(&store), [20; 5]);
        for i in 0..20 {
            let ev = store.get(i as Seq + 1).expect("read").expect("stored");
            assert_eq!(ev.event_id, format!("e-{i}"));
        }
        // The copy was the log's last frame: taken back, the next commit
        // goes where it began (not after zeros, where a replay would end).
        let stored = store.append(vec![linked_event(20)]).await.expect("append");
        assert_eq!(stored, [Appended::Stored(21)]);
        let at = slots::get(&store.inner.trees.events, 21)
            .unwrap()
            .and_then(|v| log::Location::decode(&v))
            .unwrap();
        assert_eq!((at.segment, at.offset), (orphan.segment, orphan.offset));
        store.close().await.expect("close");
    }

    /// A commit's callers are answered once its events are durable in the
    /// event log, before its sled writes: a read by id or number right
    /// after the answer waits for them and finds the event.
    #[tokio::test]
    async fn reads_after_an_answer_wait_for_the_commits_sled_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let links = vec!["up".to_string()];
        let store = Store::open(dir.path(), &links).expect("open");
        store.append(vec![linked_event(0)]).await.expect("append");
        let slow = linked_event_with_id(1, writer::SLOW_APPLY_ID);
        let stored = store.append_durable(vec![slow]).await.expect("append");
        assert_eq!(stored, [Appended::Stored(2)]);
        assert_eq!(store.durable_seq(), 1, "answered before its sled writes");
        let (seq, ev) = store
            .get_by_event_id(writer::SLOW_APPLY_ID)
            .expect("get")
            .expect("found right after the answer");
        assert_eq!((seq, ev.event_id.as_str()), (2, writer::SLOW_APPLY_ID));
        assert_eq!(store.durable_seq(), 2);
        assert!(store.get(2).expect("get").is_some());
        store.close().await.expect("close");
    }

    /// Early callers (answered at the sync) and late ones (after the sled
    /// writes) in one commit each get their own outcomes.
    #[tokio::test]
    async fn early_and_late_callers_of_one_commit_get_their_own_outcomes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let links = vec!["up".to_string()];
        let store = Store::open(dir.path(), &links).expect("open");
        // Holds the writer for 300 ms after its answer: the next two
        // appends queue meanwhile and go into one commit.
        let slow = linked_event_with_id(0, writer::SLOW_APPLY_ID);
        store.append_durable(vec![slow]).await.expect("append");
        let (early, late) = tokio::join!(
            store.append_durable(vec![linked_event(1), linked_event(2)]),
            store.append(vec![linked_event(3)]),
        );
        assert_eq!(
            early.expect("early"),
            [Appended::Stored(2), Appended::Stored(3)]
        );
        assert_eq!(late.expect("late"), [Appended::Stored(4)]);
        store.close().await.expect("close");
    }

    /// A commit that fails after its callers were answered: the writer
    /// refuses every write until a restart (and says so), and the restart
    /// indexes the answered events from the event log.
    #[tokio::test]
    async fn a_failure_after_the_answer_halts_the_writer_and_the_restart_stores_the_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let links = vec!["up".to_string()];
        {
            let store = Store::open(dir.path(), &links).expect("open");
            store.append(vec![linked_event(0)]).await.expect("append");
            let failing = linked_event_with_id(1, writer::FAIL_APPLY_ID);
            let stored = store.append_durable(vec![failing]).await.expect("answered");
            assert_eq!(stored, [Appended::Stored(2)]);
            let e = store
                .append(vec![linked_event(2)])
                .await
                .expect_err("halted");
            assert!(e.to_string().contains("restart the node"), "{e}");
            let failure = store.watch_failure().borrow().clone();
            assert!(
                failure.as_deref().is_some_and(|f| f.contains("event log")),
                "{failure:?}"
            );
            assert_eq!(store.durable_seq(), 1);
            let _ = store.close().await;
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        let (seq, _) = store
            .get_by_event_id(writer::FAIL_APPLY_ID)
            .expect("get")
            .expect("indexed from the log at open");
        assert_eq!(seq, 2);
        let resent = linked_event_with_id(1, writer::FAIL_APPLY_ID);
        let again = store
            .append(vec![resent, linked_event(2)])
            .await
            .expect("append");
        assert_eq!(again, [Appended::Duplicate(2), Appended::Stored(3)]);
        assert_eq!(index_counts(&store), [3; 5]);
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    /// Event ids a pass moved into packs: resends are still duplicates,
    /// lookups by id find them, an erasure by id tombstones a packed id
    /// (the tombstone in `by_id` shadows the pack until the next pass
    /// merges it) and an id not yet seen, and verify finds nothing wrong,
    /// before and after a reopen.
    #[tokio::test]
    async fn packed_event_ids_still_deduplicate_erase_and_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let links = vec!["up".to_string()];
        let is_dup = |a: &Appended| matches!(a, Appended::Duplicate(_));
        let check = |store: &Store, packed_erased: bool| {
            let v = store.verify(|_| {}).expect("verify");
            assert!(v.problems.is_empty(), "{:?}", v.problems);
            // 350 events' ids and the tombstone of an id never stored.
            assert_eq!(v.index_entries, if packed_erased { 351 } else { 300 });
            let (seq, ev) = store.get_by_event_id("e-123").expect("get").expect("found");
            assert_eq!(ev.event_id, "e-123");
            assert_eq!(
                store.get(seq).expect("get").expect("event").event_id,
                "e-123"
            );
        };
        {
            let store = Store::open(dir.path(), &links).expect("open");
            store
                .append((0..300).map(linked_event).collect())
                .await
                .expect("append");
            let stats = store.pack_ids();
            assert_eq!(stats.moved, 300);
            assert_eq!(store.inner.trees.ids.counts().expect("counts"), (0, 300));
            check(&store, false);
            let again = store
                .append((250..350).map(linked_event).collect())
                .await
                .expect("append");
            assert!(again[..50].iter().all(is_dup), "{again:?}");
            assert!(!again[50..].iter().any(is_dup), "{again:?}");
            let erased = store
                .erase(
                    EraseRequest {
                        id: "er-ids".into(),
                        requested_by: "test".into(),
                        pseudonym: String::new(),
                        event_ids: vec!["e-7".into(), "e-never".into()],
                        spare_origin: None,
                    },
                    Router::none(),
                )
                .await
                .expect("erase");
            assert_eq!(erased.events, 1);
            assert!(store.get_by_event_id("e-7").expect("get").is_none());
            check(&store, true);
            let resent = store
                .append(vec![linked_event(7), linked_event(123)])
                .await
                .expect("append");
            assert!(resent.iter().all(is_dup), "{resent:?}");
            let stats = store.pack_ids();
            assert_eq!(stats.moved, 52, "50 new ids and the two tombstones");
            assert_eq!(store.inner.trees.ids.counts().expect("counts"), (0, 351));
            check(&store, true);
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        check(&store, true);
        let mut never = linked_event(999);
        never.event.event_id = "e-never".into();
        let resent = store
            .append(vec![
                linked_event(7),
                linked_event(349),
                never,
                linked_event(350),
            ])
            .await
            .expect("append");
        assert_eq!(resent.iter().filter(|a| is_dup(a)).count(), 3, "{resent:?}");
        store.close().await.expect("close");
    }

    /// A damaged pack of event ids is reported by verify, and a publish
    /// of an id it may hold is refused (never stored as new: it might be
    /// a duplicate); ids outside it are unaffected.
    #[tokio::test]
    async fn a_damaged_id_pack_is_reported_and_refuses_what_it_may_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let links = vec!["up".to_string()];
        let store = Store::open(dir.path(), &links).expect("open");
        store
            .append((0..3000).map(linked_event).collect())
            .await
            .expect("append");
        store.pack_ids();
        // Ids that will fall into the first pack ("e-1000" < "e-10000" <
        // "e-1001"), not packed yet.
        let mut later: Vec<NewEvent> = (0..100).map(|i| linked_event(3000 + i)).collect();
        for (i, ne) in later.iter_mut().enumerate() {
            ne.event.event_id = format!("e-1000{i:02}");
        }
        store.append(later).await.expect("append");
        let packs = store.inner.db.open_tree(ids::PACKS_TREE).expect("tree");
        assert!(packs.len() > 1, "several packs");
        let (key, value) = packs.first().expect("read").expect("a pack");
        assert!(key.as_ref() > b"e-100099".as_slice(), "{key:?}");
        let mut damaged = value.to_vec();
        let at = damaged.len() - 2;
        damaged[at] ^= 0x5a;
        packs.insert(&key, damaged).expect("insert");
        let v = store.verify(|_| {}).expect("verify");
        assert!(
            v.problems.iter().any(|p| p.contains("bad id pack")),
            "{:?}",
            v.problems
        );
        // A pass keeps the ids that fall into the damaged pack unpacked,
        // packs the rest, and leaves the pack for verify.
        let stats = store.pack_ids();
        assert_eq!((stats.carried, stats.generations), (100, 1), "{stats:?}");
        for i in 0..100 {
            let id = format!("e-1000{i:02}");
            assert!(store
                .get_by_event_id(&id)
                .expect("found unpacked")
                .is_some());
        }
        let v = store.verify(|_| {}).expect("verify");
        assert!(
            v.problems.iter().any(|p| p.contains("bad id pack")),
            "{:?}",
            v.problems
        );
        // Every problem is the pack's (each stored event whose id it
        // may hold is named), none the ids kept out of it.
        assert!(v.problems.iter().all(|p| p.contains("e-1665")));
        for i in 0..100 {
            let id = format!("\"e-1000{i:02}\"");
            assert!(!v.problems.iter().any(|p| p.contains(&id)), "{id}");
        }
        let before = store.len().expect("len");
        // The first pack's last id.
        let inside = String::from_utf8(key.to_vec()).expect("utf-8");
        let mut ev = linked_event(0);
        ev.event.event_id = inside.clone();
        let refused = store.append(vec![ev]).await;
        assert!(
            matches!(&refused, Err(Error::Write { reason, .. }) if reason.contains("bad id pack")),
            "{refused:?}"
        );
        assert_eq!(store.len().expect("len"), before, "nothing stored");
        let fine = store
            .append(vec![linked_event(5000)])
            .await
            .expect("append");
        assert!(matches!(fine[0], Appended::Stored(_)), "{fine:?}");
        store.close().await.expect("close");
    }

    fn erase_customer(id: &str, pseudonym: &str) -> EraseRequest {
        EraseRequest {
            id: id.into(),
            requested_by: "test".into(),
            pseudonym: pseudonym.into(),
            event_ids: Vec::new(),
            spare_origin: None,
        }
    }

    /// How a store came to lack (up-to-date) customer runs.
    #[derive(Debug, Clone, Copy)]
    enum OldCustomerIndex {
        /// Written by a version with the per-event `by_customer` index.
        PerEvent,
        /// Written before any customer index.
        None,
        /// Runs, then opened by a version that kept `by_customer` instead.
        OpenedByAnOlderVersion,
    }

    #[tokio::test]
    async fn stores_without_up_to_date_customer_runs_are_indexed_at_open_and_erasure_reads_them() {
        for old in [
            OldCustomerIndex::PerEvent,
            OldCustomerIndex::None,
            OldCustomerIndex::OpenedByAnOlderVersion,
        ] {
            migrated_customer_index(old).await;
        }
    }

    async fn migrated_customer_index(old: OldCustomerIndex) {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let victim = "0123456789abcdef0123456789abcdef";
        // Seqs 1, 4 and 7 are the victim's, in three commits.
        let event = |i: usize| {
            let mut ne = linked_event(i);
            if i.is_multiple_of(3) {
                ne.event.customer_pseudonym = victim.to_string();
            }
            ne
        };
        {
            let store = Store::open(dir.path(), &links).expect("open");
            for commit in [0..4, 4..5, 5..9] {
                store
                    .append(commit.map(event).collect())
                    .await
                    .expect("append");
            }
            store.close().await.expect("close");
        }
        {
            let db = unlocked(|| sled::open(dir.path()));
            let runs = db.open_tree("customer_runs").expect("tree");
            let meta = db.open_tree("meta").expect("tree");
            match old {
                OldCustomerIndex::PerEvent | OldCustomerIndex::None => {
                    gate::drop_tree(&db, "customer_runs").expect("drop");
                    meta.remove(META_CUSTOMER_RUNS).expect("remove");
                }
                // The older version stored the third commit without a run.
                OldCustomerIndex::OpenedByAnOlderVersion => {
                    runs.remove(6u64.to_be_bytes())
                        .expect("remove")
                        .expect("run");
                }
            }
            if !matches!(old, OldCustomerIndex::None) {
                let by_customer = db.open_tree("by_customer").expect("tree");
                for seq in 1..=9u64 {
                    let mut key = event(seq as usize - 1)
                        .event
                        .customer_pseudonym
                        .into_bytes();
                    key.push(0);
                    key.extend_from_slice(&seq.to_be_bytes());
                    by_customer.insert(key, &[]).expect("insert");
                }
                meta.insert(META_CUSTOMER_INDEX, &[1]).expect("insert");
            }
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(
            customer_fingerprints(&store),
            9,
            "{old:?}: every event is indexed"
        );
        let names = store.inner.db.tree_names();
        assert!(
            !names.iter().any(|n| n == b"by_customer"),
            "{old:?}: the old index went"
        );
        let erased = store
            .erase(erase_customer("er-1", victim), Router::none())
            .await
            .expect("erase");
        assert_eq!(erased.events, 3, "{old:?}");
        for seq in 1..=9u64 {
            let gone = store.get(seq).expect("read").is_none();
            assert_eq!(gone, seq % 3 == 1, "{old:?}: seq {seq}");
        }
        assert_eq!(
            customer_fingerprints(&store),
            6,
            "{old:?}: the victim's are zeroed"
        );
        store.close().await.expect("close");
        drop(store);
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(
            customer_fingerprints(&store),
            6,
            "{old:?}: not indexed again"
        );
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{old:?}: {:?}", v.problems);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn an_event_that_only_shares_the_customers_fingerprint_is_not_erased() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let store = linked_store(dir.path(), &links, 0..3).await;
        let victim = linked_event(0).event.customer_pseudonym;
        let other = linked_event(1).event.customer_pseudonym;
        assert_ne!(victim, other);
        // As a collision would have it: seq 2's fingerprint is the victim's.
        let t = &store.inner.trees;
        let (first, _) = t.customer_runs.first().expect("read").expect("a run");
        assert_eq!(first.as_ref(), 1u64.to_be_bytes());
        let victims = customers::fingerprint(&victim);
        let third = customers::fingerprint(&linked_event(2).event.customer_pseudonym);
        t.customer_runs
            .insert(first, customers::encode(&[victims, victims, third]))
            .expect("insert");
        let erased = store
            .erase(erase_customer("er-2", &victim), Router::none())
            .await
            .expect("erase");
        assert_eq!(erased.events, 1);
        assert!(store.get(1).expect("read").is_none());
        let kept = store.get(2).expect("read").expect("seq 2 stays");
        assert_eq!(kept.customer_pseudonym, other);
        store.close().await.expect("close");
    }

    /// Retention of part of a commit written in blocks: the events that
    /// stay move to the active segment; a later pass never deletes that
    /// segment for having no stored event numbered in its range while the
    /// moved events are in it.
    #[tokio::test]
    async fn retention_moves_what_stays_in_a_block_and_keeps_the_segment_it_moved_to() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let base = PreferenceEvent::example().occurred_at.0;
        let hour = 3_600_000_000_000i64;
        // Commits of 20 (two blocks of 10): seqs 1-20 (segment 1), 21-40
        // (segment 21; seqs 26 and 34 new, the rest old), 41-60 (segment
        // 41), all old; later 61-80 (segment 61), new but for seq 61.
        let is_new = |i: usize| [25, 33].contains(&i) || (61..80).contains(&i);
        let event = |i: usize| {
            let mut ne = linked_event(i);
            let later = if is_new(i) { hour } else { 0 };
            ne.event.occurred_at = UnixNanos(base + i as i64 + later);
            ne
        };
        let segment = |id: u64| dir.path().join("log").join(format!("{id:020}.seg"));
        let kept = [(26u64, "e-25"), (34, "e-33")];
        {
            let store = Store::open(dir.path(), &links).expect("open");
            for (n, range) in [0..20, 20..40, 40..60].into_iter().enumerate() {
                if n > 0 {
                    store.inner.trees.log.end_active_segment();
                }
                store
                    .append(range.map(event).collect())
                    .await
                    .expect("append");
            }
            let cut = UnixNanos(base + hour / 2);
            assert_eq!(store.purge_before(cut, 1000).await.expect("purge"), 58);
            // Segment 1 held only removed events: gone. Segment 21 keeps
            // (by its numbers) the two that stay, which moved to segment
            // 41, the active one.
            assert_eq!(
                store.inner.trees.log.ids_and_active(),
                (vec![21, 41], Some(41))
            );
            for (seq, id) in kept {
                let at = slots::get(&store.inner.trees.events, seq)
                    .unwrap()
                    .and_then(|v| log::Location::decode(&v))
                    .unwrap();
                assert_eq!(at.segment, 41, "seq {seq} moved");
                assert_eq!(store.get(seq).unwrap().unwrap().event_id, id);
            }
            // Segment 41 stops being the active one; a pass removes seq 61.
            store.inner.trees.log.end_active_segment();
            store
                .append((60..80).map(event).collect())
                .await
                .expect("append");
            assert_eq!(store.purge_before(cut, 1000).await.expect("purge"), 1);
            // No event numbered 41-60 is stored, but 26 and 34 are in
            // segment 41: it stays.
            assert_eq!(
                store.inner.trees.log.ids_and_active(),
                (vec![21, 41, 61], Some(61))
            );
            assert!(segment(41).exists());
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        for (seq, id) in kept {
            assert_eq!(store.get(seq).unwrap().unwrap().event_id, id);
        }
        assert_eq!(&index_counts(&store)[..4], [21, 80, 21, 21]);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn retention_deletes_a_segment_it_emptied_but_never_the_active_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let base = PreferenceEvent::example().occurred_at.0;
        let hour = 3_600_000_000_000i64;
        // Seqs 1-3 old (segment 1), 4 old and 5-6 new (segment 4), 7-8 old
        // (segment 7, the active one).
        let event = |i: usize| {
            let mut ne = linked_event(i);
            let old = ![4, 5].contains(&i);
            ne.event.occurred_at = UnixNanos(base + i as i64 + if old { 0 } else { hour });
            ne
        };
        let segment = |id: u64| dir.path().join("log").join(format!("{id:020}.seg"));
        {
            let store = Store::open(dir.path(), &links).expect("open");
            for (n, range) in [0..3, 3..6, 6..8].into_iter().enumerate() {
                if n > 0 {
                    store.inner.trees.log.end_active_segment();
                }
                store
                    .append(range.map(event).collect())
                    .await
                    .expect("append");
            }
            assert_eq!(
                store.inner.trees.log.ids_and_active(),
                (vec![1, 4, 7], Some(7))
            );
            let removed = store
                .purge_before(UnixNanos(base + hour / 2), 1000)
                .await
                .expect("purge");
            assert_eq!(removed, 6);
            assert_eq!(store.purged_upto().unwrap(), 8, "the highest removed");
            // Segment 1 held only removed events: gone. Segment 4 holds
            // two stored events; segment 7 none, but it is the active one.
            assert_eq!(
                store.inner.trees.log.ids_and_active(),
                (vec![4, 7], Some(7))
            );
            assert!(!segment(1).exists());
            assert!(segment(4).exists() && segment(7).exists());
            for seq in [5, 6] {
                assert!(store.get(seq).unwrap().is_some(), "seq {seq}");
            }
            store.close().await.expect("close");
        }
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(
            store.inner.trees.log.ids_and_active(),
            (vec![4, 7], Some(7))
        );
        assert_eq!(store.purged_upto().unwrap(), 8, "read back at open");
        assert_eq!(&index_counts(&store)[..4], [2, 8, 2, 2]);
        for (seq, id) in [(5, "e-4"), (6, "e-5")] {
            assert_eq!(store.get(seq).unwrap().unwrap().event_id, id);
        }
        for seq in [1, 2, 3, 4, 7, 8] {
            assert!(store.get(seq).unwrap().is_none(), "seq {seq}");
        }
        // Appends go on in the active segment, and survive a reopen.
        let stored = store.append(vec![event(8)]).await.expect("append");
        assert_eq!(stored, [Appended::Stored(9)]);
        store.close().await.expect("close");
        drop(store);
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert_eq!(
            store.inner.trees.log.ids_and_active(),
            (vec![4, 7], Some(7))
        );
        for (seq, id) in [(5, "e-4"), (6, "e-5"), (9, "e-8")] {
            assert_eq!(store.get(seq).unwrap().unwrap().event_id, id);
        }
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_read_that_races_an_erasure_finds_the_event_gone_not_damaged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &[]).expect("open");
        let events: Vec<NewEvent> = (0..3)
            .map(|i| NewEvent::local(linked_event(i).event))
            .collect();
        let victim = events[1].event.customer_pseudonym.clone();
        store.append(events).await.expect("append");
        // A reader took seq 2's location from sled, then the writer erased
        // the event and zeroed its frame before the reader read it.
        let t = &store.inner.trees;
        let stale = slots::get(&t.events, 2).unwrap().unwrap();
        store
            .erase(
                EraseRequest {
                    id: "er-race".into(),
                    requested_by: "test".into(),
                    pseudonym: victim,
                    event_ids: Vec::new(),
                    spare_origin: None,
                },
                Router::none(),
            )
            .await
            .expect("erase");
        assert!(t.record(2, &stale).is_err(), "its frame is zeroed");
        assert!(
            t.record_live(2, &stale).unwrap().is_none(),
            "gone, not corrupt"
        );
        assert!(t.event_live(2, &stale).unwrap().is_none());
        // A damaged frame of an event still stored stays an error.
        let kept = slots::get(&t.events, 3).unwrap().unwrap();
        let at = log::Location::decode(&kept).unwrap();
        t.log.zero(&[at]).unwrap();
        assert!(t.record_live(3, &kept).is_err());
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn frames_a_stop_left_unzeroed_are_zeroed_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let links = ["upstream".to_string()];
        let at = {
            let store = linked_store(dir.path(), &links, 0..3).await;
            let value = slots::get(&store.inner.trees.events, 2).unwrap().unwrap();
            store.close().await.expect("close");
            log::Location::decode(&value).unwrap()
        };
        // An erasure removed seq 2 and recorded its frame as owed, then the
        // node stopped before zeroing it.
        {
            let db = unlocked(|| sled::open(dir.path()));
            let events = db.open_tree("events").unwrap();
            slots::apply(&events, &slots::removals(&events, [2]).unwrap()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(META_TO_ZERO, at.encode().to_vec())
                .unwrap();
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let segment = dir
            .path()
            .join("log")
            .join(format!("{:020}.seg", at.segment));
        let frame = |bytes: &[u8]| bytes[at.offset as usize..][..at.len as usize].to_vec();
        assert!(frame(&std::fs::read(&segment).unwrap())
            .iter()
            .any(|b| *b != 0));
        let store = unlocked(|| Store::open(dir.path(), &links));
        assert!(frame(&std::fs::read(&segment).unwrap())
            .iter()
            .all(|b| *b == 0));
        assert!(store.inner.trees.meta.get(META_TO_ZERO).unwrap().is_none());
        assert_eq!(store.get(3).unwrap().unwrap().event_id, "e-2");
        store.close().await.expect("close");
    }

    /// Every rollup cell, decoded, customer sets sorted: what two ways of
    /// computing the rollups must agree on.
    /// (The hours' cells merged over their blocks.)
    fn rollup_cells(store: &Store) -> Vec<(Vec<u8>, crate::rollup::Agg)> {
        let mut cells: std::collections::BTreeMap<Vec<u8>, crate::rollup::Agg> =
            std::collections::BTreeMap::new();
        for item in store.inner.trees.rollups.iter() {
            let (k, v) = item.expect("cell");
            if rollups::is_meta_key(&k) {
                continue;
            }
            let mut raw = Vec::new();
            if blocks::in_blocks(&k) {
                blocks::expand(&k, &v, &mut raw).expect("block");
            } else {
                raw.push((k, v));
            }
            for (k, v) in raw {
                let body = crate::rollup::open_value(&k, &v).expect("sealed");
                let agg = crate::rollup::Agg::decode_bytes(body).expect("agg");
                cells.entry(k.to_vec()).or_default().merge_cell(&agg);
            }
        }
        cells
            .into_iter()
            .map(|(k, mut agg)| {
                agg.seal();
                agg.customers.sort_unstable();
                (k, agg)
            })
            .collect()
    }

    /// After a crash each lane of the rollups refolds exactly the events
    /// after its own watermark: the hourly lane merged events 4-5 before
    /// the crash, the views lane did not (its cadence is slower), or had
    /// merged the first half of their cells when the crash cut its
    /// checkpoint short, or had never merged anything (a new store). A
    /// store from before the lanes has one watermark, which covers both.
    #[tokio::test]
    async fn each_rollup_lane_refolds_the_events_after_its_own_watermark() {
        #[derive(Debug, PartialEq)]
        enum Crash {
            ViewsBehind,
            ViewsCutShort,
            ViewsNeverMerged,
            Legacy,
        }
        for crash in [
            Crash::ViewsBehind,
            Crash::ViewsCutShort,
            Crash::ViewsNeverMerged,
            Crash::Legacy,
        ] {
            let first = if crash == Crash::ViewsNeverMerged {
                0
            } else {
                3
            };
            let last = first as u64 + 2;
            let dir = tempfile::tempdir().expect("temp dir");
            let event = |i: usize| {
                let mut ev = PreferenceEvent::example();
                ev.event_id = format!("e-{i}");
                ev.customer_pseudonym = format!("{:032x}", i % 2 + 1);
                ev.occurred_at = UnixNanos(ev.occurred_at.0 + i as i64 * 3_600_000_000_000);
                NewEvent::local(ev)
            };
            {
                let store = Store::open(dir.path(), &[]).expect("open");
                store.check_rollups().expect("layout");
                store
                    .append((0..first).map(event).collect())
                    .await
                    .expect("append");
                store.close().await.expect("close");
            }
            // Two more events, stored; the crash came before the views lane
            // merged them (or, legacy, before any merge).
            {
                let db = unlocked(|| sled::open(dir.path()));
                let (events, by_time, by_id, meta, tree) = (
                    db.open_tree("events").expect("tree"),
                    db.open_tree(times::TREE).expect("tree"),
                    db.open_tree("by_id").expect("tree"),
                    db.open_tree("meta").expect("tree"),
                    db.open_tree("rollups").expect("tree"),
                );
                let new: Vec<(u64, NewEvent)> = (first..first + 2)
                    .map(|i| (i as u64 + 1, event(i)))
                    .collect();
                for (seq, ne) in &new {
                    events
                        .insert(seq.to_be_bytes(), record::encode(&ne.event))
                        .expect("insert");
                    times::insert(&by_time, ne.event.occurred_at.0, *seq).expect("insert");
                    by_id
                        .insert(ne.event.event_id.as_bytes(), &seq.to_be_bytes())
                        .expect("insert");
                }
                meta.insert(META_LAST_SEQ, &last.to_be_bytes())
                    .expect("insert");
                let cells = crate::rollup::fold(
                    new.iter().map(|(_, ne)| &ne.event),
                    &crate::rollup::Layout::default(),
                );
                type Cells = std::collections::BTreeMap<Vec<u8>, crate::rollup::Agg>;
                let (hourly, views): (Cells, Cells) = cells
                    .into_iter()
                    .partition(|(k, _)| k[0] < crate::rollup::Layout::family(0));
                if crash == Crash::Legacy {
                    tree.remove(b"\xffwatermark-views").expect("remove");
                } else {
                    gate::apply_batch(
                        &tree,
                        rollups::prepare_batch(&tree, &hourly, last, &[rollups::Lane::Hours])
                            .expect("batch"),
                    )
                    .expect("hourly lane");
                }
                if crash == Crash::ViewsCutShort {
                    // The first half of the views' cells merged, and the
                    // record of that progress, as one chunk leaves them.
                    let n = views.len() / 2;
                    let half: std::collections::BTreeMap<_, _> =
                        views.into_iter().take(n).collect();
                    let last_key = half.keys().next_back().expect("cells").clone();
                    let mut batch = rollups::prepare_batch(&tree, &half, 0, &[]).expect("batch");
                    let mut record = last.to_be_bytes().to_vec();
                    record.extend_from_slice(&last_key);
                    batch.insert(&b"\xffpartial-views"[..], record);
                    gate::apply_batch(&tree, batch).expect("half of the views");
                }
                #[allow(clippy::disallowed_methods)]
                db.flush().expect("flush");
            }
            let store = unlocked(|| Store::open(dir.path(), &[]));
            // A checkpoint cut short is finished at open, before anything
            // else merges: a second crash cannot leave two records.
            let rollups = &store.inner.trees.rollups;
            assert_eq!(rollups.get(b"\xffpartial-views").expect("get"), None);
            if crash == Crash::ViewsCutShort {
                assert_eq!(
                    rollups.get(b"\xffwatermark-views").expect("get").as_deref(),
                    Some(&last.to_be_bytes()[..])
                );
            }
            store.close().await.expect("close");
            let refolded = rollup_cells(&store);
            drop(store);
            let store = unlocked(|| Store::open(dir.path(), &[]));
            store.rebuild_rollups(|_| {}).await.expect("rebuild");
            let rebuilt = rollup_cells(&store);
            assert!(refolded.len() > 10, "{}", refolded.len());
            assert_eq!(refolded, rebuilt, "{crash:?}");
            store.close().await.expect("close");
        }
    }

    /// A damaged cell makes every checkpoint fail until the operator
    /// rebuilds; meanwhile ingest goes on (the writer does not wait for a
    /// checkpointer that cannot catch up) and the store still closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_checkpoint_neither_stalls_ingest_nor_close() {
        let dir = tempfile::tempdir().expect("temp dir");
        let event = |i: usize| {
            let mut ev = PreferenceEvent::example();
            ev.event_id = format!("e-{i}");
            NewEvent::local(ev)
        };
        {
            let store = Store::open(dir.path(), &[]).expect("open");
            store.check_rollups().expect("layout");
            store.append(vec![event(0)]).await.expect("append");
            store.close().await.expect("close");
        }
        {
            // Every cell damaged: the next events' cells are the same ones.
            let db = unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("rollups").expect("tree");
            for key in tree.iter().keys() {
                let key = key.expect("key");
                if !rollups::is_meta_key(&key) {
                    tree.insert(key, &[0xff, 0xff, 0xff][..]).expect("damage");
                }
            }
            #[allow(clippy::disallowed_methods)]
            db.flush().expect("flush");
        }
        let store = unlocked(|| Store::open(dir.path(), &[]));
        // More events than the hourly lane lets wait (30,000).
        let appended = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            for chunk in 0..35 {
                let events = (1..=1000).map(|i| event(chunk * 1000 + i)).collect();
                store.append(events).await.expect("append");
            }
        })
        .await;
        assert!(
            appended.is_ok(),
            "ingest stalled behind a failing checkpoint"
        );
        assert_eq!(store.len().unwrap(), 35_001);
        let closed = tokio::time::timeout(std::time::Duration::from_secs(60), store.close()).await;
        assert!(closed.is_ok(), "close stalled behind a failing checkpoint");
    }

    #[tokio::test]
    async fn an_erasure_corrects_exact_cells_and_rebuilds_sketches_as_a_full_rebuild_would() {
        use crate::insights::{self, Dim, Query};
        let dir = tempfile::tempdir().expect("temp dir");
        let store = reopen(dir.path(), Some(Layout::default()));
        // 300 customers in one hour (the cells become sketches), and a
        // small category of 5 customers (exact cells).
        let events: Vec<NewEvent> = (0..900)
            .map(|i| {
                let mut ev = PreferenceEvent::example();
                ev.event_id = format!("e-{i}");
                let customer = i % 300;
                ev.customer_pseudonym =
                    format!("{:032x}", (customer as u128 + 1) * 0x9e37_79b9_7f4a_7c15);
                ev.product.category = if customer < 5 {
                    "tea".into()
                } else {
                    "dairy".into()
                };
                ev.kind = [
                    crate::domain::EventKind::Purchase,
                    crate::domain::EventKind::Return,
                ][i % 2];
                ev.occurred_at = UnixNanos(ev.occurred_at.0 + i as i64 * 1_000_000);
                NewEvent::local(ev)
            })
            .collect();
        let victim = events[3].event.customer_pseudonym.clone();
        let victim_events = events
            .iter()
            .filter(|e| e.event.customer_pseudonym == victim)
            .count() as u64;
        store.append(events).await.expect("append");
        let query = Query {
            filter: Default::default(),
            group_by: vec![Dim::Category, Dim::Kind],
            attribute_key: None,
            bucket: None,
            limit: 0,
        };
        let before = insights::run(&store, &query, 1).expect("query");
        let erased = store
            .erase(
                EraseRequest {
                    id: "er-1".into(),
                    requested_by: "test".into(),
                    pseudonym: victim,
                    event_ids: Vec::new(),
                    spare_origin: None,
                },
                Router::none(),
            )
            .await
            .expect("erase");
        assert_eq!(erased.events, victim_events);
        let after = insights::run(&store, &query, 1).expect("query");
        let total = |r: &insights::Report| r.rows.iter().map(|r| r.events).sum::<u64>();
        assert_eq!(total(&before) - total(&after), victim_events);
        let tea = |r: &insights::Report| {
            r.rows
                .iter()
                .filter(|r| r.key[0] == "tea")
                .map(|r| (r.key[1].clone(), r.events, r.customers, r.customers_exact))
                .collect::<Vec<_>>()
        };
        // Exact cells: the victim (customer 3, whose events are all
        // returns) is one customer fewer among tea returns, exactly.
        let (b, a) = (tea(&before), tea(&after));
        assert_eq!(b.len(), 2);
        assert_eq!(b.len(), a.len());
        for (b, a) in b.iter().zip(&a) {
            assert!(b.3 && a.3, "tea cells are exact");
            let gone = u64::from(b.0 == "return");
            assert_eq!((a.0.clone(), a.2), (b.0.clone(), b.2 - gone));
        }
        // Every cell, sketches included, as a rebuild from the remaining
        // events computes it.
        store.rebuild_rollups(|_| {}).await.expect("rebuild");
        let rebuilt = insights::run(&store, &query, 1).expect("query");
        assert_eq!(after, rebuilt);
        assert!(
            rebuilt.rows.iter().any(|r| !r.customers_exact),
            "sketches were exercised"
        );
        // Applying the same erasure again changes nothing.
        let again = store
            .erase(
                EraseRequest {
                    id: "er-1".into(),
                    requested_by: "test".into(),
                    pseudonym: String::new(),
                    event_ids: vec!["e-3".into()],
                    spare_origin: None,
                },
                Router::none(),
            )
            .await
            .expect("erase again");
        assert_eq!(again.events, 0);
        assert_eq!(
            store
                .erasure("er-1")
                .expect("read")
                .expect("recorded")
                .erased_events,
            victim_events
        );
    }

    /// Commits are folded into the waiting rollups on the folder thread,
    /// after their answer: an erasure right behind them (no query between
    /// to wait for the folds) still corrects cells that hold its events,
    /// never cells their fold lands in later.
    #[tokio::test]
    async fn an_erasure_right_after_the_commits_corrects_their_folded_cells() {
        use crate::insights::{self, Dim, Query};
        let dir = tempfile::tempdir().expect("temp dir");
        let store = reopen(dir.path(), Some(Layout::default()));
        let query = Query {
            filter: Default::default(),
            group_by: vec![Dim::Category, Dim::Kind],
            attribute_key: None,
            bucket: None,
            limit: 0,
        };
        // Distinct customers (their first 16 hex digits are what cells count).
        let customer = |n: usize| {
            let h = (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            format!("{h:016x}{n:016x}")
        };
        // Slow folds: they still wait when the erasure comes (meanwhile
        // every store of this test binary folds, and so commits, slower).
        struct Delay;
        impl Drop for Delay {
            fn drop(&mut self) {
                writer::FOLD_DELAY_MS.store(0, std::sync::atomic::Ordering::Relaxed);
            }
        }
        writer::FOLD_DELAY_MS.store(20, std::sync::atomic::Ordering::Relaxed);
        let _delay = Delay;
        for round in 0..5 {
            // Many commits in flight at once: the writer commits ahead of
            // the folder.
            let commits = (0..8).map(|c| {
                let events: Vec<NewEvent> = (0..200)
                    .map(|i| {
                        let mut ev = PreferenceEvent::example();
                        ev.event_id = format!("e-{round}-{c}-{i}");
                        ev.customer_pseudonym = customer(round * 8 + c);
                        ev.occurred_at = UnixNanos(ev.occurred_at.0 + i as i64 * 1_000_000);
                        NewEvent::local(ev)
                    })
                    .collect();
                store.append(events)
            });
            for result in futures::future::join_all(commits).await {
                result.expect("append");
            }
            let victim = customer(round * 8 + 3);
            let erased = store
                .erase(
                    erase_customer(&format!("er-{round}"), &victim),
                    Router::none(),
                )
                .await
                .expect("erase");
            assert_eq!(erased.events, 200, "round {round}");
        }
        let kept = insights::run(&store, &query, 1).expect("query");
        let total: u64 = kept.rows.iter().map(|r| r.events).sum();
        assert_eq!(total, 5 * 7 * 200, "every erased event left the cells");
        store.rebuild_rollups(|_| {}).await.expect("rebuild");
        let rebuilt = insights::run(&store, &query, 1).expect("query");
        assert_eq!(kept, rebuilt, "as a rebuild from the remaining events");
    }

    /// Subscriptions read the newest events through a shared cache
    /// (`recent`): what they read is what sled holds, and an event erased
    /// or removed by retention after the cache held it is never served
    /// from it again.
    #[tokio::test]
    async fn shared_reads_match_the_store_before_and_after_erasure_and_retention() {
        shared_reads_match_the_store(false).await;
    }

    /// As above, with a following subscription open: the writer puts each
    /// commit's new events in the cache (a commit of duplicates and new
    /// events, and one of small single frames, included).
    #[tokio::test]
    async fn shared_reads_match_the_store_with_the_writer_filling_the_cache() {
        shared_reads_match_the_store(true).await;
    }

    /// Every event the insight cells count (a query waits for the folds
    /// of the commits answered before it).
    fn events_counted(store: &Store) -> u64 {
        use crate::insights::{self, Dim, Query};
        let query = Query {
            filter: Default::default(),
            group_by: vec![Dim::Kind],
            attribute_key: None,
            bucket: None,
            limit: 0,
        };
        let report = insights::run(store, &query, 1).expect("query");
        report.rows.iter().map(|r| r.events).sum()
    }

    async fn shared_reads_match_the_store(follow: bool) {
        use prost::Message;
        let dir = tempfile::tempdir().expect("temp dir");
        // With rollups: small commits are folded on the writer thread, and
        // while followed, from the events the cache shares.
        let store = reopen(dir.path(), Some(Layout::default()));
        let following = follow.then(|| store.follow());
        let events: Vec<NewEvent> = (0..40)
            .map(|i| {
                let mut ev = PreferenceEvent::example();
                ev.event_id = format!("e-{i}");
                ev.occurred_at = UnixNanos(ev.occurred_at.0 + i as i64 * 60_000_000_000);
                NewEvent::local(ev)
            })
            .collect();
        let first_time = events[0].event.occurred_at;
        // Three commits: 30 events; 5 of them again with 5 new; 5 new.
        let again: Vec<NewEvent> = events[25..35].to_vec();
        let last: Vec<NewEvent> = events[35..].to_vec();
        store.append(events[..30].to_vec()).await.expect("append");
        // Nobody has read the newest events yet: the writer starts no run.
        let read_all = |store: &Store| store.inner.trees.recent.read(0, store.durable_seq(), 1000);
        assert!(!read_all(&store).complete);
        // A follower catches up (its read fills the cache to the newest).
        let caught_up = store.durable_seq();
        assert_eq!(
            store.scan_shared(0, caught_up, 1000).expect("read").len(),
            30
        );
        let outcomes = store.append(again).await.expect("append");
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Appended::Duplicate(_)))
                .count(),
            5
        );
        store.append(last).await.expect("append");
        assert_eq!(events_counted(&store), 40, "every new event folded once");
        // No read since: the writer went on with the run only if followed.
        let cached = store
            .inner
            .trees
            .recent
            .read(caught_up, store.durable_seq(), 1000);
        assert_eq!(cached.complete, follow);
        assert_eq!(cached.events.len(), if follow { 10 } else { 0 });
        // Both ways of reading, as the signals subscribers get them.
        let compare = |store: &Store| {
            let upto = store.durable_seq();
            let mut shared = Vec::new();
            let mut after = 0;
            // In chunks of 7, as a subscription reads on from its cursor.
            loop {
                let chunk = store.scan_shared(after, upto, 7).expect("shared");
                let Some(last) = chunk.last() else { break };
                after = last.0;
                shared.extend(chunk);
            }
            // Plain reads: events and erasure signals straight from sled.
            let events = store.scan_range(0, upto, 1000).expect("plain events");
            let erasures = store.erasure_signals(0, upto).expect("plain erasures");
            assert_eq!(shared.len(), events.len() + erasures.len());
            assert!(shared.windows(2).all(|w| w[0].0 < w[1].0), "in order");
            let (mut events, mut erasures) = (events.iter(), erasures.iter());
            for (s1, a) in &shared {
                match a {
                    Shared::Event(a) => {
                        let (s2, b) = events.next().expect("as many events");
                        assert_eq!(s1, s2);
                        assert_eq!(a.event(), b);
                        let signal = crate::pb::Signal::decode(a.signal()).expect("signal");
                        assert_eq!(signal.cursor, *s1);
                        assert_eq!(
                            signal.event,
                            Some(crate::conversions::preference_event_to_pb(b))
                        );
                    }
                    Shared::Erasure(a) => {
                        let (s2, b) = erasures.next().expect("as many erasures");
                        assert_eq!(s1, s2);
                        assert_eq!(a.erasure_id, b.erasure_id)
                    }
                }
            }
            shared
                .iter()
                .filter_map(|(_, s)| match s {
                    Shared::Event(e) => Some(e.event().event_id.clone()),
                    Shared::Erasure(_) => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(compare(&store).len(), 40);
        // The cache is warm now; an erasure removes two events from it.
        store
            .erase(
                EraseRequest {
                    id: "er-1".into(),
                    requested_by: "test".into(),
                    pseudonym: String::new(),
                    event_ids: vec!["e-5".into(), "e-39".into()],
                    spare_origin: None,
                },
                Router::none(),
            )
            .await
            .expect("erase");
        let ids = compare(&store);
        assert_eq!(ids.len(), 38);
        assert!(!ids.contains(&"e-5".to_string()) && !ids.contains(&"e-39".to_string()));
        // Warm again; retention removes the first ten minutes' events.
        let removed = store
            .purge_before(UnixNanos(first_time.0 + 10 * 60_000_000_000), 1000)
            .await
            .expect("purge");
        assert_eq!(removed, 9);
        let ids = compare(&store);
        assert_eq!(ids.len(), 29);
        assert!(!ids.contains(&"e-0".to_string()) && ids.contains(&"e-10".to_string()));
        // New events after the removals (the reads above caught up with
        // the newest): cached by the writer again.
        let more: Vec<NewEvent> = (40..45)
            .map(|i| {
                let mut ev = PreferenceEvent::example();
                ev.event_id = format!("e-{i}");
                NewEvent::local(ev)
            })
            .collect();
        store.append(more).await.expect("append");
        let upto = store.durable_seq();
        let cached = store.inner.trees.recent.read(upto - 5, upto, 1000);
        assert_eq!(cached.complete, follow);
        assert_eq!(compare(&store).len(), 34);
        // The follower stops reading: the writer keeps the new events for
        // `recent::NEAR` numbers past the furthest read, then no more.
        let head = store.durable_seq();
        let fresh = |from: usize, n: usize| -> Vec<NewEvent> {
            (from..from + n)
                .map(|i| {
                    let mut ev = PreferenceEvent::example();
                    ev.event_id = format!("s-{i}");
                    NewEvent::local(ev)
                })
                .collect()
        };
        let near = recent::NEAR as usize;
        store.append(fresh(0, near + 100)).await.expect("append");
        let ahead = store.durable_seq();
        store.append(fresh(near + 100, 10)).await.expect("append");
        let recent = &store.inner.trees.recent;
        assert_eq!(recent.read(head, ahead, usize::MAX).complete, follow);
        assert!(
            !recent.read(ahead, store.durable_seq(), usize::MAX).complete,
            "nothing kept that far past the furthest read"
        );
        drop(following);
        store.close().await.expect("close");
    }

    /// A commit of a few events is folded on the writer thread when the
    /// folder has nothing left (`writer::FOLD_HERE_UP_TO`), and counted
    /// once.
    #[tokio::test]
    async fn small_commits_are_folded_on_the_writer_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = reopen(dir.path(), Some(Layout::default()));
        let pending = store.inner.trees.pending.clone().expect("rollups");
        for i in 0..5 {
            let mut ev = PreferenceEvent::example();
            ev.event_id = format!("small-{i}");
            store
                .append(vec![NewEvent::local(ev)])
                .await
                .expect("append");
            // The query waits for the fold: the folder is idle after it.
            assert_eq!(events_counted(&store), i + 1, "each event counted once");
        }
        // Each could find the cells held by a checkpoint at that moment
        // (then the folder folds it): not all five.
        let on_writer = pending
            .folded_by_try
            .load(std::sync::atomic::Ordering::SeqCst);
        assert!(on_writer >= 1, "{on_writer} of 5 folded on the writer");
        store.close().await.expect("close");
    }

    /// A small append answered early is committed on the caller's thread
    /// while the writer is idle (`writer::try_commit`), and the writer's
    /// thread does its sled writes and fold after: each event is found by
    /// id right after its answer, counted once, deduplicated, and stored
    /// whole after a close (which finishes the last commit first).
    #[tokio::test]
    async fn small_durable_appends_are_committed_on_the_callers_thread() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = reopen(dir.path(), Some(Layout::default()));
        let event = |i: u64| event_with_id(&format!("inline-{i}"));
        for i in 0..5 {
            let stored = store.append_durable(vec![event(i)]).await.expect("append");
            assert_eq!(stored, [Appended::Stored(i + 1)]);
            let (seq, _) = store
                .get_by_event_id(&format!("inline-{i}"))
                .expect("get")
                .expect("found right after the answer");
            assert_eq!(seq, i + 1);
            assert_eq!(events_counted(&store), i + 1, "each event counted once");
        }
        // Each could find the writer's thread still busy with the commit
        // before (then it queues there): not all five.
        let inline = inline_commits(&store);
        assert!(
            inline >= 1,
            "{inline} of 5 committed on the caller's thread"
        );
        let again = store.append_durable(vec![event(0)]).await.expect("resend");
        assert_eq!(again, [Appended::Duplicate(1)]);
        // The last one committed on this thread (its sled writes left to the
        // writer's): the close finishes them before it flushes, so sled's
        // marks are at its end (no replay needed).
        wait_idle(&store);
        let before = inline_commits(&store);
        let last = store.append_durable(vec![event(5)]).await.expect("append");
        assert_eq!(last, [Appended::Stored(6)]);
        assert_eq!(inline_commits(&store), before + 1, "committed here");
        store.close().await.expect("close");
        let meta = &store.inner.trees.meta;
        let last_seq = meta.get(META_LAST_SEQ).expect("meta").expect("mark");
        assert_eq!(last_seq.as_ref(), 6u64.to_be_bytes());
        let log_end = meta.get(META_LOG_END).expect("meta").expect("log end");
        assert_eq!(
            log::End::decode(&log_end),
            store.inner.trees.log.end(),
            "sled's log end is the log's"
        );
        drop(store);
        let store = reopen(dir.path(), Some(Layout::default()));
        assert_eq!(store.durable_seq(), 6);
        let t = &store.inner.trees;
        let indexed = [
            slots::count(&t.events).expect("events"),
            t.ids.len(),
            times::count(&t.by_time).expect("times"),
            customer_fingerprints(&store),
        ];
        assert_eq!(indexed, [6; 4]);
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(events_counted(&store), 6);
        store.close().await.expect("close");
    }

    /// An example event with `id`, for no link.
    fn event_with_id(id: &str) -> NewEvent {
        let mut ev = PreferenceEvent::example();
        ev.event_id = id.into();
        NewEvent::local(ev)
    }

    /// How many commits callers' threads synced in `store`.
    fn inline_commits(store: &Store) -> u64 {
        let writer = store.inner.shared_writer.lock().expect("writer");
        writer.as_ref().map_or(0, |w| w.inline_commits)
    }

    /// Returns once a caller could commit on its own thread (the writer's
    /// thread is done with everything before); a slow sync of this loaded
    /// test machine is forgotten.
    fn wait_idle(store: &Store) {
        for _ in 0..5000 {
            if let Ok(writer) = store.inner.shared_writer.try_lock() {
                let writer = writer.as_ref().expect("open");
                writer.slow_sync.set(false);
                if writer.idle() {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the writer did not become idle");
    }

    /// A command the writer's thread took but could not run yet (a caller
    /// holds the writer) keeps callers from committing ahead of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_taken_but_not_run_keeps_callers_from_committing_ahead() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = reopen(dir.path(), Some(Layout::default()));
        store
            .append(vec![event_with_id("first")])
            .await
            .expect("append");
        wait_idle(&store);
        let late = {
            let held = store.inner.shared_writer.lock().expect("writer");
            let writer = held.as_ref().expect("open");
            assert!(writer.idle(), "nothing queued or running");
            let queued = store.clone();
            let late =
                tokio::spawn(async move { queued.append(vec![event_with_id("late")]).await });
            // The writer's thread takes it and waits for the writer.
            for _ in 0..5000 {
                if store.inner.writer.queued() == 0 && store.inner.writer.sent() == 2 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(store.inner.writer.sent(), 2, "sent");
            assert_eq!(store.inner.writer.queued(), 0, "taken from the queue");
            assert!(!writer.idle(), "a command taken but not run");
            late
        };
        let outcome = late.await.expect("task").expect("append");
        assert_eq!(outcome, [Appended::Stored(2)]);
        store.close().await.expect("close");
    }

    /// A commit that panics on a caller's thread (holding the writer):
    /// the writer refuses every write after, saying why, still closes,
    /// and a reopen finds the store whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_panics_on_a_callers_thread_halts_the_writer() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = reopen(dir.path(), Some(Layout::default()));
            store
                .append(vec![event_with_id("first")])
                .await
                .expect("append");
            wait_idle(&store);
            let panicking = store.clone();
            let task = tokio::spawn(async move {
                panicking
                    .append_durable(vec![event_with_id(writer::PANIC_SYNC_ID)])
                    .await
            });
            assert!(task.await.expect_err("panicked").is_panic());
            let e = store
                .append(vec![event_with_id("after")])
                .await
                .expect_err("refused");
            assert!(e.to_string().contains("panicked"), "{e}");
            let failure = store.watch_failure().borrow().clone();
            assert!(
                failure.as_deref().is_some_and(|f| f.contains("panicked")),
                "{failure:?}"
            );
            store.close().await.expect("close");
        }
        let store = reopen(dir.path(), Some(Layout::default()));
        assert!(store.get_by_event_id("first").expect("get").is_some());
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let again = store
            .append(vec![event_with_id("after")])
            .await
            .expect("append");
        assert!(matches!(again[..], [Appended::Stored(_)]), "{again:?}");
        store.close().await.expect("close");
    }

    /// Small appends answered early from many tasks at once, on a runtime
    /// with two threads: some commit on their callers' threads, the others
    /// queue for the writer's; every event is stored once, under its own
    /// number, and an id sent twice at once is stored once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_small_appends_are_numbered_once_each() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = reopen(dir.path(), Some(Layout::default()));
        let mut stored = Vec::new();
        for round in 0..20 {
            let mut tasks = Vec::new();
            for i in 0..6 {
                let store = store.clone();
                let ev = event_with_id(&format!("c-{round}-{i}"));
                tasks.push(tokio::spawn(
                    async move { store.append_durable(vec![ev]).await },
                ));
            }
            for _ in 0..2 {
                let store = store.clone();
                let ev = event_with_id(&format!("twice-{round}"));
                tasks.push(tokio::spawn(
                    async move { store.append_durable(vec![ev]).await },
                ));
            }
            let mut twice = Vec::new();
            for (i, task) in tasks.into_iter().enumerate() {
                let outcome = task.await.expect("task").expect("append");
                let [outcome] = outcome[..] else {
                    panic!("one outcome per event: {outcome:?}");
                };
                if i >= 6 {
                    twice.push(outcome);
                }
                if let Appended::Stored(seq) = outcome {
                    stored.push(seq);
                }
            }
            let firsts = twice
                .iter()
                .filter(|o| matches!(o, Appended::Stored(_)))
                .count();
            assert_eq!(firsts, 1, "an id sent twice at once: {twice:?}");
        }
        stored.sort_unstable();
        assert_eq!(stored, (1..=140).collect::<Vec<Seq>>());
        // Some queued for the writer's thread (in runs here, 1 to 11 of
        // the 140 were committed on callers' threads).
        let inline = inline_commits(&store);
        assert!(
            inline < 140,
            "every append was committed on its caller's thread"
        );
        store.applied().await;
        assert_eq!(events_counted(&store), 140);
        store.close().await.expect("close");
        drop(store);
        let store = reopen(dir.path(), Some(Layout::default()));
        assert_eq!(store.durable_seq(), 140);
        let v = store.verify(|_| {}).expect("verify");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn the_audit_trail_continues_its_chain_after_a_reopen() {
        use crate::audit::Kind;
        let dir = tempfile::tempdir().expect("temp dir");
        let detail = serde_json::json!({"n": 1});
        let store = reopen(dir.path(), None);
        for identity in ["a", "b", "c"] {
            store.audit(Kind::Query, identity, &detail).expect("append");
        }
        drop(store);
        let store = reopen(dir.path(), None);
        let fourth = store
            .audit(Kind::Erasure, "d", &detail)
            .expect("append after reopen");
        assert_eq!(fourth.seq, 4);
        let verified = store.verify_audit().expect("read").expect("intact");
        assert_eq!((verified.records, verified.head), (4, fourth.hash));
        let identities: Vec<String> = store
            .audit_records(1)
            .map(|r| r.expect("record").identity)
            .collect();
        assert_eq!(identities, ["b", "c", "d"]);
        drop(store);
        let mut offline = Store::verify_audit_at(dir.path());
        for _ in 0..200 {
            if offline.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
            offline = Store::verify_audit_at(dir.path());
        }
        let offline = offline.expect("store released");
        assert_eq!(offline.expect("intact").records, 4);
    }

    #[tokio::test]
    async fn rollups_of_another_layout_or_an_unfinished_rebuild_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path(), &[]).expect("open");
            store
                .check_rollups()
                .expect("an empty store takes the layout");
            store
                .append(vec![NewEvent::local(PreferenceEvent::example())])
                .await
                .expect("append");
        }
        let other = Layout {
            views: vec![DimSet::BRAND],
            attribute_keys: None,
        };
        let store = reopen(dir.path(), Some(other.clone()));
        let err = store.check_rollups().expect_err("other layout");
        assert!(err.to_string().contains("rebuild-rollups"), "{err}");
        // A rebuild cut short (the marker is written first) stays refused.
        store
            .inner
            .trees
            .meta
            .insert(META_ROLLUP_LAYOUT, ROLLUPS_REBUILDING)
            .expect("marker");
        let err = store.check_rollups().expect_err("unfinished rebuild");
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert_eq!(store.rebuild_rollups(|_| {}).await.expect("rebuild"), 1);
        store.check_rollups().expect("rebuilt");
        let family = Layout::family(0);
        let cells = store
            .read_rollups(
                &[(family, crate::rollup::Bucket::Month, None, None)],
                None,
                &[],
            )
            .expect("cells");
        let all: Vec<_> = cells.iter().collect();
        assert_eq!(all.len(), 1);
        let symbols = cells.symbols();
        let dims = symbols.resolve_dims(&all[0].dims);
        assert_eq!(dims.brand, "x");
        assert_eq!(dims.category, "", "not kept by the view");
        drop(store);
        // Running without rollups marks them stale for later.
        let store = reopen(dir.path(), None);
        store.check_rollups().expect("off");
        drop(store);
        let store = reopen(dir.path(), Some(other));
        let err = store.check_rollups().expect_err("were off");
        assert!(err.to_string().contains("rollups were off"), "{err}");
    }
}
