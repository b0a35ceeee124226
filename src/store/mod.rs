//! The node's durable store: anonymised events in sled.
//!
//! Trees (one per keyspace, numeric keys big-endian):
//! - `events`:  seq (u64) → record (see [`record`])
//! - `by_id`:   event_id → seq — deduplication
//! - `by_time`: occurred_at (i64, sign-flipped) ‖ seq → () — time range scans
//!
//! - `meta`:    `last_seq`, `purged_upto` → u64 — the sequence high-water
//!   mark (so numbers are never reused, even after retention removed the
//!   newest events) and the highest sequence number retention removed
//! - `rollups`: hour ‖ dimensions → aggregates (see `crate::rollup`),
//!   updated in the same transaction as the events they count
//! - `cursors`: identity ‖ 0 ‖ subscription name → acknowledged cursor
//! - `outbox/<link>`: seq → enqueue time (UnixNanos, i64) — events waiting
//!   to be acknowledged by that upstream link
//!
//! An event and its outbox entries are written in the same transaction, so
//! an event is never stored without being queued where it must go. Later
//! keyspaces (subscriber cursors, rollups) follow the same rule.
//!
//! All writes go through one writer thread that batches concurrent appends
//! into a single sled transaction and a single flush (group commit): an
//! append returns only after its events are on disk, and one flush serves
//! every publisher waiting at that moment. Nothing outside this module
//! touches sled.

mod record;
mod writer;

mod outbox;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

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
    #[error("corrupt record in tree {tree:?} at key {key}: {source}; the data directory is damaged: stop the node and restore it from a backup")]
    Corrupt {
        tree: &'static str,
        key: String,
        source: DecodeError,
    },
    #[error("the store is shut down")]
    Closed,
    #[error("write failed: {reason}")]
    Write { reason: String, disk_full: bool },
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

/// An event to append and the outboxes (indexes into the link list given to
/// [`Store::open`]) it must be queued in if it is new.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: PreferenceEvent,
    pub outboxes: Vec<usize>,
}

impl NewEvent {
    /// An event queued nowhere.
    pub fn local(event: PreferenceEvent) -> Self {
        NewEvent {
            event,
            outboxes: Vec::new(),
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
    writer: mpsc::Sender<writer::Command>,
    path: PathBuf,
    flushes: Arc<AtomicU64>,
    durable: tokio::sync::watch::Receiver<Seq>,
}

#[derive(Clone)]
struct Trees {
    events: sled::Tree,
    by_id: sled::Tree,
    by_time: sled::Tree,
    meta: sled::Tree,
    cursors: sled::Tree,
    rollups: sled::Tree,
    outboxes: Arc<Vec<Outbox>>,
}

/// `meta` key of the sequence high-water mark.
const META_LAST_SEQ: &[u8] = b"last_seq";
/// `meta` key of the highest sequence number removed by retention.
const META_PURGED_UPTO: &[u8] = b"purged_upto";

/// One upstream link's queue.
struct Outbox {
    tree: sled::Tree,
    /// Entries in the tree (kept in memory: sled's len() is a full scan).
    len: AtomicU64,
    /// Woken when entries are added.
    added: Notify,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, with an outbox per
    /// entry of `links`, and starts its writer.
    pub fn open(dir: &Path, links: &[String]) -> Result<Store> {
        Self::open_with(dir, links, true)
    }

    /// As [`Self::open`]; with `rollups = false` the writer does not maintain
    /// rollups (to measure their cost; insight queries then see nothing new).
    pub fn open_with(dir: &Path, links: &[String], rollups: bool) -> Result<Store> {
        let open_err = |source| Error::Open {
            path: dir.to_path_buf(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(open_err)?;
        let trees = Trees {
            events: db.open_tree("events").map_err(open_err)?,
            by_id: db.open_tree("by_id").map_err(open_err)?,
            by_time: db.open_tree("by_time").map_err(open_err)?,
            meta: db.open_tree("meta").map_err(open_err)?,
            cursors: db.open_tree("cursors").map_err(open_err)?,
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
        };
        let flushes = Arc::new(AtomicU64::new(0));
        let last = high_water(&trees)?;
        let (durable_tx, durable) = tokio::sync::watch::channel(last);
        let writer = writer::spawn(
            db.clone(),
            trees.clone(),
            flushes.clone(),
            durable_tx,
            rollups,
        )?;
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                trees,
                writer,
                path: dir.to_path_buf(),
                flushes,
                durable,
            }),
        })
    }

    /// Stores the events not stored before and returns, per event in order,
    /// whether it was stored or a duplicate. Returns once the events are
    /// flushed to disk.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Command::Append(writer::Append { events, reply }))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// The event at `seq`.
    pub fn get(&self, seq: Seq) -> Result<Option<PreferenceEvent>> {
        let key = seq.to_be_bytes();
        match self.inner.trees.events.get(key)? {
            None => Ok(None),
            Some(bytes) => decode_event(seq, &bytes).map(Some),
        }
    }

    /// The sequence number and event stored under `event_id`.
    pub fn get_by_event_id(&self, event_id: &str) -> Result<Option<(Seq, PreferenceEvent)>> {
        let Some(seq) = self.inner.trees.by_id.get(event_id.as_bytes())? else {
            return Ok(None);
        };
        let seq = seq_from(&seq, "by_id", event_id)?;
        Ok(self.get(seq)?.map(|ev| (seq, ev)))
    }

    /// Events with a sequence number greater than `after`, in order.
    pub fn scan_after(&self, after: Seq) -> impl Iterator<Item = Result<(Seq, PreferenceEvent)>> {
        let start = after.saturating_add(1).to_be_bytes();
        self.inner.trees.events.range(start..).map(|item| {
            let (k, v) = item?;
            let seq = seq_from(&k, "events", "?")?;
            Ok((seq, decode_event(seq, &v)?))
        })
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
        let range = after.saturating_add(1).to_be_bytes()..=upto.to_be_bytes();
        self.inner
            .trees
            .events
            .range(range)
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                let seq = seq_from(&k, "events", "?")?;
                Ok((seq, decode_event(seq, &v)?))
            })
            .collect()
    }

    /// The highest sequence number known to be flushed to disk; everything
    /// up to it is readable.
    pub fn durable_seq(&self) -> Seq {
        *self.inner.durable.borrow()
    }

    /// A receiver that changes whenever [`Self::durable_seq`] advances.
    pub fn watch_durable(&self) -> tokio::sync::watch::Receiver<Seq> {
        self.inner.durable.clone()
    }

    /// Rollup cells of `family` in the hours `from..to` (open ends:
    /// unbounded), in key order.
    pub fn scan_rollups(
        &self,
        family: u8,
        from: Option<i64>,
        to: Option<i64>,
    ) -> impl Iterator<Item = Result<(crate::rollup::CellKey, crate::rollup::Agg)>> + '_ {
        use crate::rollup::hour_prefix;
        let start = hour_prefix(family, from.unwrap_or(i64::MIN)).to_vec();
        let end = hour_prefix(family, to.unwrap_or(i64::MAX)).to_vec();
        self.inner.trees.rollups.range(start..end).map(|item| {
            let (k, v) = item?;
            let corrupt = |what: &str| Error::Corrupt {
                tree: "rollups",
                key: format!("{k:?}"),
                source: DecodeError::Payload(what.to_string()),
            };
            let key = crate::rollup::CellKey::decode(&k).ok_or_else(|| corrupt("bad cell key"))?;
            let agg = crate::rollup::Agg::decode_bytes(&v).ok_or_else(|| corrupt("bad cell"))?;
            Ok((key, agg))
        })
    }

    /// Recomputes every rollup cell from the stored events (offline repair,
    /// `chainsight admin rebuild-rollups`); `progress` gets the events done.
    /// Returns the number of events folded.
    pub async fn rebuild_rollups(&self, progress: impl Fn(u64)) -> Result<u64> {
        let rollups = &self.inner.trees.rollups;
        rollups.clear()?;
        let mut after = 0;
        let mut done = 0u64;
        loop {
            let chunk = self.scan_range(after, u64::MAX, 20_000)?;
            let Some((last, _)) = chunk.last() else { break };
            after = *last;
            done += chunk.len() as u64;
            let cells = crate::rollup::fold(chunk.iter().map(|(_, ev)| ev));
            let mut batch = sled::Batch::default();
            for (key, delta) in cells {
                let mut agg = match rollups.get(&key)? {
                    Some(old) => crate::rollup::Agg::decode_bytes(&old).unwrap_or_default(),
                    None => crate::rollup::Agg::default(),
                };
                agg.merge(&delta);
                agg.compact();
                batch.insert(key, agg.encode());
            }
            rollups.apply_batch(batch)?;
            progress(done);
        }
        self.inner.db.flush_async().await?;
        Ok(done)
    }

    /// Events that occurred in `[from, to)`, in time order.
    pub fn scan_time(
        &self,
        from: UnixNanos,
        to: UnixNanos,
    ) -> impl Iterator<Item = Result<PreferenceEvent>> + '_ {
        let start = time_key(from.0, 0);
        let end = time_key(to.0, 0);
        self.inner
            .trees
            .by_time
            .range(start..end)
            .filter_map(move |item| {
                let read = || -> Result<Option<PreferenceEvent>> {
                    let (k, _) = item?;
                    let seq = seq_from(&k[8..], "by_time", "?")?;
                    self.get(seq)
                };
                read().transpose()
            })
    }

    /// Number of stored events.
    pub fn len(&self) -> usize {
        self.inner.trees.events.len()
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
        match self.inner.trees.events.first()? {
            None => Ok(None),
            Some((k, _)) => seq_from(&k, "events", "first").map(Some),
        }
    }

    /// The highest sequence number retention has removed (0 if none).
    pub fn purged_upto(&self) -> Result<Seq> {
        meta_seq(&self.inner.trees.meta, META_PURGED_UPTO)
    }

    /// The cursor acknowledged under subscription `name` of `identity`.
    pub fn named_cursor(&self, identity: &str, name: &str) -> Result<Option<Seq>> {
        match self.inner.trees.cursors.get(cursor_key(identity, name))? {
            None => Ok(None),
            Some(v) => seq_from(&v, "cursors", name).map(Some),
        }
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

    /// Removes up to `limit` events that occurred before `before` (retention),
    /// with their index entries. Returns how many were removed.
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
        Ok(self.inner.db.size_on_disk()?)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Flushes everything written so far to disk.
    pub async fn flush(&self) -> Result<()> {
        self.inner.db.flush_async().await?;
        Ok(())
    }
}

fn cursor_key(identity: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(identity.len() + 1 + name.len());
    key.extend_from_slice(identity.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

fn meta_seq(meta: &sled::Tree, key: &'static [u8]) -> Result<Seq> {
    match meta.get(key)? {
        None => Ok(0),
        Some(v) => seq_from(&v, "meta", std::str::from_utf8(key).unwrap_or("?")),
    }
}

/// The highest sequence number ever used: the recorded high-water mark, or
/// the last event (stores written before the mark existed).
fn high_water(trees: &Trees) -> Result<Seq> {
    let last_event = match trees.events.last()? {
        None => 0,
        Some((k, _)) => seq_from(&k, "events", "last")?,
    };
    Ok(last_event.max(meta_seq(&trees.meta, META_LAST_SEQ)?))
}

fn decode_event(seq: Seq, bytes: &[u8]) -> Result<PreferenceEvent> {
    record::decode(bytes).map_err(|source| Error::Corrupt {
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

/// The `by_time` key: occurred_at with the sign bit flipped (so negative
/// times sort first) followed by the sequence number, both big-endian.
fn time_key(occurred_at: i64, seq: Seq) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&((occurred_at as u64) ^ (1 << 63)).to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}
