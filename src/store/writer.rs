//! The single writer: group commit for every append.
//!
//! Appends arrive on a bounded channel. The writer takes the first waiting
//! command, drains whatever else is already queued (up to a batch limit),
//! appends their records to the event log and syncs it once, answers the
//! callers that asked to be answered then (publishers, see
//! [`super::Store::append_durable`]), writes their sled entries (one sled
//! batch per tree, see `Writer::write_sled`) without a flush, and then
//! answers the others. The writer (its sequence counter among it) sits
//! behind one mutex: its thread holds it for each command, and a small
//! append answered early may be synced under it by its caller's thread
//! while the writer is idle ([`try_commit`]); deduplication and numbering
//! happen under it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::{mpsc, oneshot};

use super::log::Location;
use super::{gate, record, times, Appended, Error, NewEvent, Result, Seq, Trees};
use crate::domain::UnixNanos;

/// The sequence number a `by_id` tombstone of an erased event that was
/// never stored here points to (no event has it).
pub(super) const ERASED_TOMBSTONE: Seq = Seq::MAX;
/// The same, for an id a downstream's erasure named before the event
/// arrived: it blocks forwarded events only (see [`NewEvent::forwarded`]).
pub(super) const PEER_TOMBSTONE: Seq = Seq::MAX - 1;

/// Queue depth before appenders wait (backpressure).
const QUEUE: usize = 1024;
/// Commits of at most this many events write key by key rather than one
/// sled batch per tree (see `Writer::write_sled`).
const PLAIN_INSERTS_UP_TO: usize = 16;
/// Most events written in one group commit and flush.
const MAX_BATCH_EVENTS: usize = 8192;

pub(super) struct Append {
    pub events: Vec<NewEvent>,
    pub reply: Reply,
    /// Answer once the events are durable in the event log, before the
    /// commit's sled writes (see [`super::Store::append_durable`]); else
    /// once those are done too.
    pub early: bool,
}

/// Where an append's outcome goes.
pub(super) type Reply = oneshot::Sender<Result<Vec<Appended>>>;

/// Folds of commits that may wait for the folder thread before the
/// writer waits for it (each holds a commit's new events, up to a few MB).
/// None: the writer hands a commit's fold over when the folder is done
/// with the one before, so it commits one ahead at most, and no more than
/// two commits' events wait in memory (with two queued, 10M stored events
/// peaked 25 MiB higher).
const FOLDS_QUEUED: usize = 0;

/// A commit of at most this many new events is folded on the writer
/// thread, after its callers were answered, when the folder has nothing
/// left to fold (so it overtakes no fold) and neither the checkpointer
/// nor a query holds the waiting cells (the writer must not wait for
/// them; the folder does): a few µs of work, against
/// waking the folder and waiting until it takes the fold over. With one
/// request in flight, the folder was woken on the CPU that was about to
/// deliver the answer and ran ahead of it there while the writer's CPU
/// went idle (`perf sched`, `bench latency`).
const FOLD_HERE_UP_TO: usize = PLAIN_INSERTS_UP_TO;

/// An append's reply, and whether it is answered early
/// ([`Append::early`]).
type Waiting = (Reply, bool);

/// What [`Writer::write`] gives: the outcomes (per append, per event),
/// the highest new sequence number, and the new events' records as
/// logged, if any are new.
type Written = (Vec<Vec<Appended>>, Option<Seq>, Option<Logged>);

/// A commit after [`Writer::sync`]: its events durable in the event log,
/// its early callers answered; [`Writer::apply`] does the rest.
pub(super) struct Synced {
    /// The first sequence number the commit could give out.
    start_seq: Seq,
    batch: Vec<Vec<NewEvent>>,
    outcomes: Vec<Vec<Appended>>,
    /// The callers not answered yet, with their append's place.
    late: Vec<(usize, Reply)>,
    /// The highest new sequence number, and the new events' records as
    /// logged, if any are new.
    upto: Option<Seq>,
    logged: Option<Logged>,
}

/// A commit's new events durable in the event log (see
/// [`Writer::write_log`]): what their sled writes need.
struct Logged {
    /// When they were logged (their outbox entries' time).
    now: i64,
    /// Whether sled gets plain inserts rather than batches.
    plain: bool,
    high_water: [u8; 8],
    end: super::log::End,
    /// The time index's blocks, whole.
    blocks: Vec<(times::Key, Vec<u8>)>,
    /// The `events` tree's runs of locations.
    slot_runs: Vec<(Seq, Vec<u8>)>,
    fingerprints: Vec<(Seq, u32)>,
    /// Per link, the new numbers queued.
    outboxes: Vec<Vec<Seq>>,
    /// The signals of the new events, for the cache of the newest events
    /// (only while a subscription follows, see [`super::Store::follow`]).
    signals: Vec<(Seq, bytes::Bytes)>,
    /// The hours the events fall in, when rollups are kept (see
    /// [`Writer::log`]).
    hours: Option<Vec<i64>>,
}

/// The new events of a commit, with their numbers, in the order
/// [`Writer::write`] numbered them.
fn stored<'a>(batch: &'a [Vec<NewEvent>], outcomes: &[Vec<Appended>]) -> Vec<(Seq, &'a NewEvent)> {
    batch
        .iter()
        .zip(outcomes)
        .flat_map(|(events, out)| events.iter().zip(out))
        .filter_map(|(ne, outcome)| match outcome {
            Appended::Stored(seq) => Some((*seq, ne)),
            Appended::Duplicate(_) => None,
        })
        .collect()
}

/// Tests: a pause before each fold, so that folds are still waiting when
/// the commands behind their commits come.
#[cfg(test)]
pub(super) static FOLD_DELAY_MS: AtomicU64 = AtomicU64::new(0);

/// Tests: an event with this id makes its commit's sled writes wait
/// 300 ms after the callers were answered.
#[cfg(test)]
pub(super) const SLOW_APPLY_ID: &str = "test-slow-apply";
/// Tests: an event with this id makes its commit panic before its sync.
#[cfg(test)]
pub(super) const PANIC_SYNC_ID: &str = "test-panic-sync";
/// Tests: an event with this id makes its commit fail after its callers
/// were answered and its locations were written (as an I/O error of
/// sled's would).
#[cfg(test)]
pub(super) const FAIL_APPLY_ID: &str = "test-fail-apply";

/// A commit's new events to fold into the waiting rollups, on the folder
/// thread (see [`Writer::apply`]).
struct Fold {
    events: FoldEvents,
    /// The highest sequence number among them.
    upto: Seq,
}

/// A commit's new events, as [`Committed`] held them.
enum FoldEvents {
    Plain(Vec<crate::domain::PreferenceEvent>),
    Shared(Vec<Arc<super::RecentEvent>>),
}

/// A commit's appends after it was written: as they came, or, while a
/// subscription follows, its new events shared with the cache of the
/// newest events.
enum Committed {
    Plain(Vec<Vec<NewEvent>>),
    Shared(Vec<Arc<super::RecentEvent>>),
}

impl Committed {
    /// The new events of `batch` (those stored, per `outcomes`), moved
    /// out, with their signals, if `signals` holds one for each of them,
    /// in the same order (the writer numbers new events as they come);
    /// else (none were made: nothing follows) `batch` back.
    fn shared(
        batch: Vec<Vec<NewEvent>>,
        outcomes: &[Vec<Appended>],
        signals: Vec<(Seq, bytes::Bytes)>,
    ) -> std::result::Result<Vec<Arc<super::RecentEvent>>, Vec<Vec<NewEvent>>> {
        let stored = || {
            outcomes.iter().flatten().filter_map(|o| match o {
                Appended::Stored(seq) => Some(*seq),
                Appended::Duplicate(_) => None,
            })
        };
        if signals.is_empty() || !stored().eq(signals.iter().map(|(seq, _)| *seq)) {
            return Err(batch);
        }
        let mut signals = signals.into_iter();
        let mut out = Vec::with_capacity(signals.len());
        for (appended, out_of) in batch.into_iter().zip(outcomes) {
            for (ne, outcome) in appended.into_iter().zip(out_of) {
                if let Appended::Stored(_) = outcome {
                    if let Some((seq, signal)) = signals.next() {
                        let event = super::RecentEvent::with_signal(seq, ne.event, signal);
                        out.push(Arc::new(event));
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Fold {
    /// The new events of a commit (those stored, per `outcomes`), moved
    /// out, up to `upto`.
    fn of(committed: Committed, outcomes: &[Vec<Appended>], upto: Seq) -> Fold {
        let events = match committed {
            Committed::Plain(batch) => {
                let mut events = Vec::new();
                for (appended, out) in batch.into_iter().zip(outcomes) {
                    for (ne, outcome) in appended.into_iter().zip(out) {
                        if let Appended::Stored(_) = outcome {
                            events.push(ne.event);
                        }
                    }
                }
                FoldEvents::Plain(events)
            }
            Committed::Shared(shared) => FoldEvents::Shared(shared),
        };
        Fold { events, upto }
    }

    fn len(&self) -> usize {
        match &self.events {
            FoldEvents::Plain(e) => e.len(),
            FoldEvents::Shared(e) => e.len(),
        }
    }

    /// [`Self::into_pending`] if the waiting cells are free right now
    /// (see `rollups::Pending::try_add`); says whether it folded.
    fn try_into_pending(&self, pending: &super::rollups::Pending) -> bool {
        let n = self.len() as u64;
        match &self.events {
            FoldEvents::Plain(events) => pending.try_add(events.iter(), n, self.upto),
            FoldEvents::Shared(events) => {
                pending.try_add(events.iter().map(|e| e.event()), n, self.upto)
            }
        }
    }

    fn into_pending(self, pending: &super::rollups::Pending) {
        let n = self.len() as u64;
        match &self.events {
            FoldEvents::Plain(events) => pending.add(events, n, self.upto),
            FoldEvents::Shared(events) => {
                pending.add(events.iter().map(|e| e.event()), n, self.upto)
            }
        }
    }
}

/// The thread that folds committed events into the waiting rollups, so
/// that the writer goes on to the next commit meanwhile, and where they
/// are dropped.
struct Folder {
    tx: std::sync::mpsc::SyncSender<Fold>,
    handle: std::thread::JoinHandle<()>,
}

impl Folder {
    fn spawn(pending: Arc<super::rollups::Pending>) -> Result<Folder> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Fold>(FOLDS_QUEUED);
        let handle = std::thread::Builder::new()
            .name("rollup-folder".into())
            .spawn(move || {
                for fold in rx {
                    #[cfg(test)]
                    std::thread::sleep(std::time::Duration::from_millis(
                        FOLD_DELAY_MS.load(Ordering::Relaxed),
                    ));
                    fold.into_pending(&pending);
                }
            })
            .map_err(|e| Error::Sled(sled::Error::Io(e)))?;
        Ok(Folder { tx, handle })
    }
}

pub(super) enum Command {
    Append(Append),
    /// Retention: remove up to `limit` events that occurred before `before`.
    Purge {
        before: UnixNanos,
        limit: usize,
        reply: oneshot::Sender<Result<usize>>,
    },
    /// Erase one customer's events (see `super::erasure`).
    Erase {
        request: super::EraseRequest,
        router: super::Router,
        /// The customer runs read before the command was sent (the writer
        /// reads only those written since).
        scanned: super::customers::Scan,
        reply: oneshot::Sender<Result<super::Erased>>,
    },
    /// Write a consistent snapshot of every tree to a new file (see
    /// `super::backup`): nothing else is written meanwhile.
    Snapshot {
        node_id: String,
        path: std::path::PathBuf,
        reply: oneshot::Sender<Result<super::backup::Counts>>,
    },
    /// Merge the waiting rollups, flush, answer and stop.
    Close {
        reply: oneshot::Sender<Result<()>>,
    },
    /// Wakes the thread to finish a commit a caller synced (see
    /// [`try_commit`]); nothing else.
    Finish,
}

pub(super) fn spawn(
    db: sled::Db,
    trees: Trees,
    flushes: Arc<AtomicU64>,
    durable: tokio::sync::watch::Sender<Seq>,
    answered: Arc<AtomicU64>,
    failure: tokio::sync::watch::Sender<Option<String>>,
) -> Result<(Queue, Shared, std::thread::JoinHandle<()>)> {
    let next_seq = super::high_water(&trees)? + 1;
    let (tx, rx) = mpsc::channel(QUEUE);
    let queue = Queue {
        tx,
        sent: Arc::new(AtomicU64::new(0)),
    };
    let checkpointer = match &trees.pending {
        Some(p) => Some(super::rollups::spawn_checkpointer(
            p.clone(),
            trees.rollups.clone(),
        )?),
        None => None,
    };
    let packer = Some(super::ids::spawn_packer(trees.ids.clone())?);
    let folder = match &trees.pending {
        Some(p) => Some(Folder::spawn(p.clone())?),
        None => None,
    };
    let writer = Writer {
        db,
        trees,
        next_seq,
        failure,
        flushes,
        durable,
        answered,
        halted: None,
        checkpointer,
        packer,
        folder,
        synced: None,
        sent: queue.sent.clone(),
        taken: 0,
        slow_sync: std::cell::Cell::new(false),
        #[cfg(test)]
        inline_commits: 0,
    };
    let shared: Shared = Arc::new(std::sync::Mutex::new(Some(writer)));
    let thread_shared = shared.clone();
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(&thread_shared, rx))
        .map_err(|e| Error::Sled(sled::Error::Io(e)))?;
    Ok((queue, shared, handle))
}

/// The writer's queue. Commands are counted as they are sent, so that a
/// caller committing on its own thread knows that none sent before is
/// waiting or running (see [`try_commit`]).
pub(super) struct Queue {
    tx: mpsc::Sender<Command>,
    sent: Arc<AtomicU64>,
}

impl Queue {
    /// Sends `command` once the queue has room; counted as it goes in (a
    /// send dropped while it waits for room is not counted).
    pub(super) async fn send(
        &self,
        command: Command,
    ) -> std::result::Result<(), mpsc::error::SendError<Command>> {
        let Ok(permit) = self.tx.reserve().await else {
            return Err(mpsc::error::SendError(command));
        };
        self.sent.fetch_add(1, Ordering::SeqCst);
        permit.send(command);
        Ok(())
    }

    /// Tests: how many commands went into the queue.
    #[cfg(test)]
    pub(super) fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Tests: how many commands wait in the queue.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// A queue without a writer: every send fails.
    pub(super) fn closed() -> Queue {
        let (tx, _) = mpsc::channel(1);
        Queue {
            tx,
            sent: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// A sync slower than this (the disk stalls: a sync takes 0.06–0.2 ms on
/// the bench host, a few ms on slow volumes) sends the next small appends
/// to the writer's thread rather than onto a caller's (see
/// [`Writer::idle`]), until a sync there is fast again.
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(10);

/// The writer, shared by its thread and the callers that commit a small
/// append themselves while it is idle ([`try_commit`]); `None` once closed.
pub(super) type Shared = Arc<std::sync::Mutex<Option<Writer>>>;

/// Appends of at most this many events may be committed on their
/// caller's thread (see [`try_commit`]); larger ones always go to the
/// writer's thread, where concurrent appends are committed together.
pub(super) const INLINE_UP_TO: usize = PLAIN_INSERTS_UP_TO;

/// Commits a small append that is answered early on the calling thread,
/// when the writer is idle (see [`Writer::idle`]): its records are
/// appended to the event log and synced here, under the writer's mutex,
/// and the answer comes back at once.
/// The commit's sled writes and the rest ([`Writer::apply`]) are left to
/// the writer's thread, which is woken for them and does them before
/// anything else.
///
/// With one request in flight, handing the append to the parked writer
/// thread and the answer back to a parked runtime thread cost two
/// wake-ups of an idle CPU: with both waits replaced by polling (an
/// experiment), a one-event publish's acknowledgement took about 70 µs
/// less than its 360 µs on the 2-CPU host (`bench latency`); committing
/// here saves 30–50 µs of it (the thread still sleeps in the sync and is
/// woken from it; README, session 37). The calling (runtime) thread is
/// blocked for the append and the sync meanwhile (about 80 µs), which the
/// runtime's other threads absorb; after a slow sync, and when the event
/// log starts a new segment, appends go to the writer's thread. Under
/// load the writer is busy and appends queue for it as before.
///
/// Gives the events back if the writer is not idle.
pub(super) fn try_commit(
    shared: &Shared,
    queue: &Queue,
    events: Vec<NewEvent>,
) -> std::result::Result<Result<Vec<Appended>>, Vec<NewEvent>> {
    if events.len() > INLINE_UP_TO {
        return Err(events);
    }
    let Ok(mut guard) = shared.try_lock() else {
        return Err(events);
    };
    let Some(writer) = guard.as_mut().filter(|w| w.idle()) else {
        return Err(events);
    };
    let (reply, mut answer) = oneshot::channel();
    // A commit of duplicates only leaves nothing to do.
    writer.synced = writer
        .sync(vec![Append {
            events,
            reply,
            early: true,
        }])
        .filter(|synced| synced.logged.is_some());
    let unfinished = writer.synced.is_some();
    #[cfg(test)]
    {
        writer.inline_commits += 1;
    }
    drop(guard);
    if unfinished {
        // Full: the writer's thread has commands to take, and finishes
        // this commit before them anyway.
        let _ = queue.tx.try_send(Command::Finish);
    }
    // `sync` answered the append (with its outcome or its failure).
    Ok(answer.try_recv().unwrap_or(Err(Error::Closed)))
}

/// The writer thread: takes commands until the store closes. A commit
/// left unfinished by [`try_commit`] is finished before each command.
fn run(shared: &Shared, mut rx: mpsc::Receiver<Command>) {
    let _span = tracing::info_span!("store_writer").entered();
    let mut pending: Option<Command> = None;
    loop {
        let Some(first) = pending.take().or_else(|| rx.blocking_recv()) else {
            break;
        };
        let mut guard = lock(shared);
        let Some(writer) = guard.as_mut() else {
            return;
        };
        if let Some(synced) = writer.synced.take() {
            writer.apply(synced);
        }
        match writer.take(first, &mut rx) {
            Next::Go(next) => pending = next,
            Next::Close(reply) => {
                let mut writer = guard.take();
                let finished = writer.as_mut().map_or(Ok(()), Writer::finish);
                // The trees go before the answer: once the last store
                // handle goes too, the directory can be opened again.
                drop(writer);
                drop(guard);
                let _ = reply.send(finished);
                return;
            }
        }
    }
    let mut guard = lock(shared);
    if let Some(mut writer) = guard.take() {
        if let Some(synced) = writer.synced.take() {
            writer.apply(synced);
        }
        if let Err(e) = writer.finish() {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

/// The writer thread's hold of the writer. If a commit panicked on a
/// caller's thread (the mutex is poisoned), what it left is unknown: the
/// writer refuses every write from then on (see [`Writer::panicked`]).
fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Option<Writer>> {
    match shared.lock() {
        Ok(guard) => guard,
        Err(poisoned) => {
            let mut guard = poisoned.into_inner();
            shared.clear_poison();
            if let Some(writer) = guard.as_mut() {
                writer.panicked();
            }
            guard
        }
    }
}

/// What the writer thread does after a command.
enum Next {
    /// Goes on, with a command it took from the queue but did not run.
    Go(Option<Command>),
    /// Closes the store and answers.
    Close(oneshot::Sender<Result<()>>),
}

pub(super) struct Writer {
    db: sled::Db,
    trees: Trees,
    next_seq: Seq,
    /// Set when a write or flush fails: sled keeps an I/O error as the
    /// state of the database, so the node reports it (health NOT_SERVING)
    /// until restarted.
    failure: tokio::sync::watch::Sender<Option<String>>,
    flushes: Arc<AtomicU64>,
    durable: tokio::sync::watch::Sender<Seq>,
    /// The highest sequence number whose caller was answered (see
    /// `Self::sync`); ahead of `durable` while a commit's sled writes run
    /// (and, after [`try_commit`], until the writer's thread woke for them).
    answered: Arc<AtomicU64>,
    /// Why every write is refused until the node restarts (see
    /// [`Self::halt`]), and whether for a full disk.
    halted: Option<(String, bool)>,
    /// Merges rollup deltas into the tree; stopped (after a last merge)
    /// before the final flush.
    checkpointer: Option<std::thread::JoinHandle<()>>,
    /// Moves event ids into packs (see [`super::ids`]); stopped before
    /// the final flush.
    packer: Option<std::thread::JoinHandle<()>>,
    /// Folds commits into the waiting rollups; stopped before the
    /// checkpointer.
    folder: Option<Folder>,
    /// A commit synced by a caller's thread whose sled writes remain (see
    /// [`try_commit`]): done before anything else.
    synced: Option<Synced>,
    /// How many commands went into the queue ([`Queue::send`]) and how
    /// many of them this writer took: a caller commits on its own thread
    /// only when all were.
    sent: Arc<AtomicU64>,
    taken: u64,
    /// Whether the last sync took longer than [`SLOW_SYNC`].
    pub(super) slow_sync: std::cell::Cell<bool>,
    /// Tests: how many commits callers' threads synced.
    #[cfg(test)]
    pub(super) inline_commits: u64,
}

impl Writer {
    /// Whether a caller may commit on its own thread now (see
    /// [`try_commit`]): every command that went into the queue was taken
    /// and run, no commit is left unfinished, the writer is not halted,
    /// the last sync was not slow, the log's next append does not start a
    /// segment, and the waiting rollups have room.
    pub(super) fn idle(&self) -> bool {
        self.synced.is_none()
            && self.taken == self.sent.load(Ordering::SeqCst)
            && self.halted.is_none()
            && !self.slow_sync.get()
            && !self.trees.log.starts_segment()
            && self.trees.pending.as_ref().is_none_or(|p| p.has_room())
    }

    /// A commit panicked on a caller's thread, holding the writer (in
    /// [`Self::sync`], before its answer: no caller saw it acknowledged,
    /// and no fold is owed for it): what it left is unknown, so the writer
    /// refuses every write until the node restarts, whose open indexes
    /// whatever reached the event log (a resend then finds it a
    /// duplicate).
    fn panicked(&mut self) {
        self.synced = None;
        if let Some(pending) = &self.trees.pending {
            pending.end_change(None);
        }
        let reason = "a commit panicked in the store; what it wrote is not known to be whole, so the store takes no more writes: restart the node (its open indexes what reached the event log)".to_string();
        tracing::error!("{reason}");
        if self.failure.borrow().is_none() {
            self.failure.send_replace(Some(reason.clone()));
        }
        self.halted = Some((reason, false));
    }

    /// Runs the command `first` (with the appends queued behind it, in one
    /// commit).
    fn take(&mut self, first: Command, rx: &mut mpsc::Receiver<Command>) -> Next {
        if matches!(first, Command::Finish) {
            // Sent uncounted; the commit it woke for was finished before.
            return Next::Go(None);
        }
        self.taken += 1;
        let first = match (first, &self.halted) {
            (Command::Close { reply }, _) => Command::Close { reply },
            (other, Some((reason, disk_full))) => {
                refuse(other, reason, *disk_full);
                return Next::Go(None);
            }
            (other, None) => other,
        };
        if !matches!(first, Command::Append(_)) {
            // Erasure corrects and retention drops waiting cells, a
            // snapshot copies the rollups, the close merges them last:
            // every answered commit's fold first.
            self.settle_folds();
        }
        let first = match first {
            Command::Purge {
                before,
                limit,
                reply,
            } => {
                let _ = reply.send(self.purge(before, limit));
                return Next::Go(None);
            }
            Command::Erase {
                request,
                router,
                scanned,
                reply,
            } => {
                let _ = reply.send(self.erase(&request, &router, &scanned));
                return Next::Go(None);
            }
            Command::Snapshot {
                node_id,
                path,
                reply,
            } => {
                let _ = reply.send(self.snapshot(&node_id, &path));
                return Next::Go(None);
            }
            Command::Close { reply } => return Next::Close(reply),
            Command::Finish => return Next::Go(None),
            Command::Append(append) => append,
        };
        let mut n = first.events.len();
        let mut batch = vec![first];
        let mut next = None;
        while n < MAX_BATCH_EVENTS {
            match rx.try_recv() {
                Ok(Command::Append(append)) => {
                    self.taken += 1;
                    n += append.events.len();
                    batch.push(append);
                }
                // Nothing is unfinished: the thread finished it before.
                Ok(Command::Finish) => {}
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        self.commit(batch);
        Next::Go(next)
    }

    /// Copies every tree to `path` with no write of this thread in between
    /// (and no rollup checkpoint during the rollup tree's copy).
    fn snapshot(&mut self, node_id: &str, path: &std::path::Path) -> Result<super::backup::Counts> {
        let started = std::time::Instant::now();
        let last_seq = self.next_seq - 1;
        // No ids move between `by_id` and the packs while both are copied.
        let ids = self.trees.ids.clone();
        let _paused = ids.pause();
        let counts = super::backup::write_staging(
            &self.db,
            &self.trees,
            node_id,
            last_seq,
            self.trees.pending.as_deref(),
            path,
        )?;
        tracing::info!(
            trees = counts.trees,
            entries = counts.entries,
            last_seq,
            elapsed = ?started.elapsed(),
            "snapshot taken (writes waited meanwhile)"
        );
        Ok(counts)
    }

    /// Waits until every commit answered so far is folded into the
    /// waiting rollups.
    fn settle_folds(&self) {
        if let Some(pending) = &self.trees.pending {
            pending.settle();
        }
    }

    /// The last folds and checkpoint of the rollups, then the final flush.
    fn finish(&mut self) -> Result<()> {
        if let Some(folder) = self.folder.take() {
            drop(folder.tx);
            let _ = folder.handle.join();
        }
        self.settle_folds();
        if let (Some(pending), Some(handle)) = (&self.trees.pending, self.checkpointer.take()) {
            super::rollups::stop(pending);
            let _ = handle.join();
        }
        if let Some(handle) = self.packer.take() {
            super::ids::stop(&self.trees.ids);
            let _ = handle.join();
        }
        self.flush_now()?;
        Ok(())
    }

    /// Removes about `limit` events that occurred before `before` (whole
    /// blocks of the time index), with their time entries, in one
    /// transaction; records the highest removed sequence number. Outbox entries of removed events are
    /// dropped when a link next reads them.
    fn purge(&mut self, before: UnixNanos, limit: usize) -> Result<usize> {
        let t = &self.trees;
        let (victims, time_changes) = times::oldest(&t.by_time, before.0, limit)?;
        let mut customer_seqs: Vec<Seq> = Vec::new();
        let mut frames: Vec<Location> = Vec::new();
        for victim in &victims {
            let seq = victim.seq;
            if let Some(bytes) = super::slots::get(&t.events, seq)? {
                frames.extend(Location::decode(&bytes));
                let ev = t.event(seq, &bytes)?;
                if !ev.customer_pseudonym.is_empty() {
                    customer_seqs.push(seq);
                }
            }
        }
        if victims.is_empty() {
            // Everything before `before` is gone: so go the rollup cells of
            // periods starting before it (retention cuts at whole hours).
            // The horizon is recorded first: queries never use cells of
            // periods starting before it (a day, week or month cell that
            // straddles it counts removed events).
            let hour = crate::rollup::hour_of(before);
            if let Some(pending) = &self.trees.pending {
                let layout = pending.layout();
                let old = super::read_horizon(&t.meta)?;
                if old.is_none_or(|old| old < hour) {
                    t.meta
                        .insert(super::META_ROLLUP_HORIZON, &hour.to_be_bytes())?;
                    self.flush_now()?;
                }
                // No checkpoint runs meanwhile: one that read an hour's
                // block manifest before the removal would write it back
                // after, listing the blocks removed.
                let _paused = pending.pause();
                remove_cells_before(&t.rollups, layout, hour)?;
                pending.remove_before(hour);
            }
            return Ok(0);
        }
        let purged_upto = super::meta_seq(&t.meta, super::META_PURGED_UPTO)?
            .max(victims.iter().map(|v| v.seq).max().unwrap_or(0))
            .to_be_bytes();
        let owed = owed_zeroing(&t.meta, &frames)?;
        customer_seqs.sort_unstable();
        let runs = super::customers::cleared(&t.customer_runs, customer_seqs)?;
        let slots = super::slots::removals(&t.events, victims.iter().map(|v| v.seq))?;
        if let Some(pending) = &t.pending {
            pending.begin_change(None);
        }
        t.recent.begin_removal();
        let removed = gate::transaction(
            &(&t.events, &t.by_time, &t.meta, &t.customer_runs),
            |(events, by_time, meta, customer_runs)| {
                // `by_id` entries stay, as tombstones: a late resend
                // of a removed event is still a duplicate, never a
                // new copy.
                times::apply_in(by_time, &time_changes)?;
                super::slots::apply_in(events, &slots)?;
                super::slots::apply_in(customer_runs, &runs)?;
                meta.insert(super::META_PURGED_UPTO, &purged_upto)?;
                meta.insert(super::META_TO_ZERO, owed.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            },
        )
        .map_err(|e| match e {
            TransactionError::Storage(e) => Error::Sled(e),
            TransactionError::Abort(()) => Error::Closed,
        });
        if let Some(pending) = &t.pending {
            pending.end_change(None);
        }
        t.recent.end_removal();
        removed?;
        t.purged
            .fetch_max(u64::from_be_bytes(purged_upto), Ordering::SeqCst);
        self.flush_now()?;
        // Their records go from the log too: zeroed, and a segment with no
        // stored event left is deleted.
        self.zero_owed(&owed);
        let events = &t.events;
        let mut referenced = None;
        t.log
            .remove_dead(|from, to| {
                if to <= from {
                    return Ok(false);
                }
                // Stored events numbered in the segment's range, or events
                // relocated into it (numbered below it).
                let mut live = || -> Result<bool> {
                    Ok(super::slots::range(events, from, to - 1)
                        .next()
                        .transpose()?
                        .is_some()
                        || super::relocated_into(t, from, &mut referenced)?)
                };
                live().map_err(|e| std::io::Error::other(e.to_string()))
            })
            .map_err(|e| Error::Sled(e.into()))?;
        Ok(victims.len())
    }

    /// Erases the events of `req` (by pseudonym and by id) with their
    /// index and outbox entries, corrects the rollups, records the erasure
    /// with the upstream links it must go on along (by `router`) and a
    /// signal for subscribers, all in one transaction, then flushes.
    /// Applying an erasure again erases what arrived since, if anything.
    fn erase(
        &mut self,
        req: &super::EraseRequest,
        router: &super::Router,
        scanned: &super::customers::Scan,
    ) -> Result<super::Erased> {
        use super::erasure;
        let t = &self.trees;
        // The events: by the customer runs (the runs scanned before this
        // command, then those written since), and by id.
        let mut by_fingerprint = scanned.candidates.clone();
        if !req.pseudonym.is_empty() {
            let since = super::customers::scan(&t.customer_runs, &req.pseudonym, scanned.last_run)?;
            by_fingerprint.extend(since.candidates);
        }
        let mut seqs = by_fingerprint.clone();
        // Ids not stored (yet): tombstones, so that a batch still on its
        // way here is a duplicate when it arrives, never stored.
        let mut tombstones: Vec<&str> = Vec::new();
        let mut by_id: std::collections::BTreeSet<Seq> = Default::default();
        for id in &req.event_ids {
            match t.ids.get(id.as_bytes())? {
                Some(seq) => {
                    by_id.insert(seq);
                    seqs.insert(seq);
                }
                None => tombstones.push(id),
            }
        }
        // The tombstones go into the current generation of the id index,
        // which a pass does not freeze while the guard lives. (Taken after
        // the lookups above: they take it too, and a second read of the
        // lock while a pass waits to freeze would wait forever.)
        let ids = t.ids.clone();
        ids.written(tombstones.len() as u64);
        let generations = ids.generations();
        if !tombstones.is_empty() {
            let mark = if req.spare_origin.is_some() {
                PEER_TOMBSTONE
            } else {
                ERASED_TOMBSTONE
            };
            generations
                .current
                .append(tombstones.iter().map(|id| (id.as_bytes(), mark)))?;
        }
        let mut erased: Vec<(Seq, crate::domain::PreferenceEvent)> = Vec::new();
        let mut frames: Vec<Location> = Vec::new();
        for seq in seqs {
            if let Some(bytes) = super::slots::get(&t.events, seq)? {
                let ev = t.event(seq, &bytes)?;
                // A fingerprint is a filter: another customer's event may
                // share it.
                if by_fingerprint.contains(&seq)
                    && ev.customer_pseudonym != req.pseudonym
                    && !by_id.contains(&seq)
                {
                    continue;
                }
                // A downstream cannot have carried an event that began here.
                if req.spare_origin.as_deref() == Some(ev.origin.as_str()) {
                    tracing::warn!(erasure = %req.id, requested_by = %req.requested_by, event = %ev.event_id, "a downstream's erasure named an event that originated at this node; not erased");
                    continue;
                }
                frames.extend(Location::decode(&bytes));
                erased.push((seq, ev));
            }
        }
        // The record: merged with an earlier application of the same erasure.
        let mut record = match t.erasures.get(req.id.as_bytes())? {
            Some(bytes) => erasure::decode_record(&req.id, &bytes)?,
            None => super::ErasureRecord {
                id: req.id.clone(),
                requested_at: UnixNanos::now().0,
                requested_by: req.requested_by.clone(),
                ..Default::default()
            },
        };
        record.erased_events += erased.len() as u64;
        let by_customer = if req.pseudonym.is_empty() {
            Vec::new()
        } else {
            (router.customer)(&req.pseudonym)
        };
        for (link, pseudonym) in by_customer {
            if !record.links.iter().any(|l| l.link == link) {
                record.links.push(super::LinkErasure {
                    link,
                    pseudonym,
                    ..Default::default()
                });
            }
        }
        for (_, ev) in &erased {
            for (link, pseudonym) in (router.event)(ev) {
                let entry = match record.links.iter_mut().position(|l| l.link == link) {
                    Some(i) => &mut record.links[i],
                    None => {
                        record.links.push(super::LinkErasure {
                            link: link.clone(),
                            pseudonym: pseudonym.clone(),
                            ..Default::default()
                        });
                        record.links.last_mut().expect("just pushed")
                    }
                };
                // New events to erase upstream: pending again.
                entry.event_ids.push(ev.event_id.clone());
                entry.confirmed_at = 0;
                if entry.pseudonym.is_empty() {
                    entry.pseudonym = pseudonym;
                }
            }
        }
        let links: Vec<String> = record.links.iter().map(|l| l.link.clone()).collect();
        if erased.is_empty() {
            // Nothing (more) here: the record says so; nothing to signal.
            let known = t.erasures.get(req.id.as_bytes())?;
            let bytes = prost::Message::encode_to_vec(&record);
            if known.as_deref() != Some(bytes.as_slice()) {
                t.erasures.insert(req.id.as_bytes(), bytes)?;
            }
            self.flush_now()?;
            self.trees.erasures_added.notify_waiters();
            return Ok(super::Erased {
                events: 0,
                total: record.erased_events,
                links,
            });
        }
        // The rollups: every delta in the tree first, then the corrections.
        let erased_seqs: std::collections::HashSet<Seq> = erased.iter().map(|(s, _)| *s).collect();
        let corrections = match &t.pending {
            Some(pending) if !erased.is_empty() => {
                pending.drain()?;
                let events: Vec<_> = erased.iter().map(|(_, ev)| ev.clone()).collect();
                super::rollups::erase_corrections(&t.rollups, pending.layout(), &events, |a, b| {
                    let start = crate::rollup::hour_start(a).0;
                    let end = crate::rollup::hour_start(b).0;
                    let mut out = Vec::new();
                    for entry in times::scan(&t.by_time, start, end) {
                        let seq = entry?.seq;
                        if erased_seqs.contains(&seq) {
                            continue;
                        }
                        if let Some(bytes) = super::slots::get(&t.events, seq)? {
                            out.push(t.event(seq, &bytes)?);
                        }
                    }
                    Ok(out)
                })?
            }
            _ => Vec::new(),
        };
        let signal_seq = self.next_seq;
        let signal = erasure::SignalRecord {
            erasure_id: req.id.clone(),
            events: erased
                .iter()
                .map(|(_, ev)| record::encode(&erasure::trimmed(ev)))
                .collect(),
        }
        .encode_to_vec();
        let record_bytes = prost::Message::encode_to_vec(&record);
        let owed = owed_zeroing(&t.meta, &frames)?;
        let runs = super::customers::cleared(&t.customer_runs, erased.iter().map(|(s, _)| *s))?;
        let slots = super::slots::removals(&t.events, erased.iter().map(|(s, _)| *s))?;
        let time_changes = times::removed(
            &t.by_time,
            erased
                .iter()
                .map(|(seq, ev)| times::Entry::new(ev.occurred_at.0, *seq)),
        )?;
        // [events, by_time, customer_runs, meta, erasures, erasure_signals,
        //  rollups, the id journal, outbox 0, outbox 1, ...]
        let mut trees: Vec<&sled::Tree> = vec![
            &t.events,
            &t.by_time,
            &t.customer_runs,
            &t.meta,
            &t.erasures,
            &t.erasure_signals,
            &t.rollups,
            generations.current.tree(),
        ];
        trees.extend(t.outboxes.iter().map(|o| &o.tree));
        // The erased events leave the outboxes' runs: read and changed
        // here, written in the transaction, with no acknowledgement's
        // change of a run in between.
        let edits: Vec<_> = t.outboxes.iter().map(|o| o.edit.lock()).collect();
        let erased_seqs: Vec<Seq> = erased.iter().map(|(seq, _)| *seq).collect();
        let (run_changes, unqueued): (Vec<_>, Vec<u64>) = t
            .outboxes
            .iter()
            .map(|o| o.removals(&erased_seqs))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        // The ids stay taken (a resend is a duplicate), by tombstones: no
        // event holds their numbers any more. Lookups of the journal wait
        // until the transaction is in (or failed: then nothing changes).
        let tombstones = generations.current.begin(
            erased
                .iter()
                .map(|(_, ev)| (ev.event_id.as_bytes(), ERASED_TOMBSTONE)),
        );
        let apply = || {
            gate::transaction(trees.as_slice(), |tx| {
                for (key, record) in tombstones.records() {
                    tx[7].insert(key, record.as_slice())?;
                }
                for (i, changes) in run_changes.iter().enumerate() {
                    for (first, value) in changes {
                        match value {
                            Some(v) => tx[8 + i].insert(&first.to_be_bytes(), v.as_slice())?,
                            None => tx[8 + i].remove(&first.to_be_bytes())?,
                        };
                    }
                }
                super::slots::apply_in(&tx[0], &slots)?;
                times::apply_in(&tx[1], &time_changes)?;
                super::slots::apply_in(&tx[2], &runs)?;
                tx[3].insert(super::META_LAST_SEQ, &signal_seq.to_be_bytes())?;
                tx[3].insert(super::META_TO_ZERO, owed.as_slice())?;
                tx[4].insert(req.id.as_bytes(), record_bytes.as_slice())?;
                tx[5].insert(&signal_seq.to_be_bytes(), signal.as_slice())?;
                for (key, value) in &corrections {
                    match value {
                        Some(v) => tx[6].insert(key.as_slice(), v.as_slice())?,
                        None => tx[6].remove(key.as_slice())?,
                    };
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
        };
        t.recent.begin_removal();
        let applied = match &t.pending {
            Some(pending) => {
                pending.begin_change(None);
                let applied = pending.exclusive(apply);
                pending.end_change(None);
                applied
            }
            None => apply(),
        };
        t.recent.end_removal();
        applied.map_err(|e| match e {
            TransactionError::Storage(e) => Error::Sled(e),
            TransactionError::Abort(()) => Error::Closed,
        })?;
        tombstones.commit();
        drop(edits);
        self.next_seq += 1;
        self.flush_now()?;
        // The records leave the disk: the log's frames are zeroed.
        self.zero_owed(&owed);
        self.durable.send_replace(self.next_seq - 1);
        for (outbox, n) in self.trees.outboxes.iter().zip(unqueued) {
            outbox.count_off(n);
        }
        self.trees.erasures_added.notify_waiters();
        tracing::info!(
            erasure = %req.id,
            events = erased.len(),
            cells = corrections.len(),
            links = ?links,
            "erased a customer's events"
        );
        Ok(super::Erased {
            events: erased.len() as u64,
            total: record.erased_events,
            links,
        })
    }

    /// Zeroes the frames recorded as owed (under `META_TO_ZERO`, in the
    /// transaction that removed their events), moving first the events
    /// that stay in a block zeroed (see `super::remove_records`), then
    /// forgets them. If that fails they stay recorded, and the next open
    /// zeroes them.
    fn zero_owed(&self, owed: &[u8]) {
        let t = &self.trees;
        let zeroed = super::remove_records(&self.db, t, &Location::decode_all(owed))
            .and_then(|()| Ok(t.meta.remove(super::META_TO_ZERO).map(|_| ())?));
        if let Err(e) = zeroed {
            tracing::error!(error = %e, "could not zero the removed events' records in the event log; the next start of the node does");
        }
    }

    /// Records the first write failure of an I/O kind (the database is
    /// unusable from then on) for the node to report.
    fn failed(&self, e: &Error) {
        if matches!(e, Error::Sled(sled::Error::Io(_))) && self.failure.borrow().is_none() {
            self.failure.send_replace(Some(e.to_string()));
        }
    }

    /// The blocking flush; this thread is where flushes belong.
    #[allow(clippy::disallowed_methods)]
    fn flush_now(&self) -> sled::Result<usize> {
        self.db.flush()
    }

    fn commit(&mut self, batch: Vec<Append>) {
        if let Some(pending) = &self.trees.pending {
            // Nothing more is answered while the waiting rollups are over
            // their bound (their folds never wait, see `wait_room`).
            pending.wait_room();
        }
        if let Some(synced) = self.sync(batch) {
            self.apply(synced);
        }
    }

    /// A commit's first part: decides per event whether it is new,
    /// appends the new events' records to the event log and syncs it, and
    /// answers the early callers (see [`Append::early`]). `None` if it
    /// failed; every caller was answered with the error then.
    ///
    /// Early callers are answered once their events are durable in the
    /// event log, before the commit's sled writes ([`Self::apply`]):
    /// those took a tenth of a one-event request's acknowledgement (27 of
    /// about 410 µs, `bench latency`). Queries from then on wait for this
    /// commit's fold, reads by id or number for its sled writes
    /// (`Store::wait_applied`): whoever saw its events acknowledged finds
    /// them.
    fn sync(&mut self, batch: Vec<Append>) -> Option<Synced> {
        let start_seq = self.next_seq;
        let (batch, replies): (Vec<Vec<NewEvent>>, Vec<Waiting>) = batch
            .into_iter()
            .map(|a| (a.events, (a.reply, a.early)))
            .unzip();
        let (outcomes, upto, logged) = match self.write(&batch) {
            Ok(written) => written,
            Err((e, applied)) => {
                let replies = replies.into_iter().map(|(reply, _)| reply);
                self.failed(&e);
                if applied {
                    // Its frames were taken back out of the log, or may
                    // still be found there at the next open if that failed
                    // too: its numbers stay used (a next commit must not
                    // write over those events); the senders resend.
                    fail(replies, &e, "it was not stored; retrying is safe");
                } else {
                    // Nothing was applied: its numbers are free again.
                    self.next_seq = start_seq;
                    fail(replies, &e, "nothing of it was stored");
                }
                return None;
            }
        };
        if let Some(upto) = upto {
            if let Some(pending) = &self.trees.pending {
                pending.fold_owed();
            }
            self.answered.fetch_max(upto, Ordering::SeqCst);
        }
        // The callers not answered yet, with their append's place.
        let mut late = Vec::new();
        for (i, ((reply, early), outcome)) in replies.into_iter().zip(&outcomes).enumerate() {
            if early {
                let _ = reply.send(Ok(outcome.clone()));
            } else {
                late.push((i, reply));
            }
        }
        Some(Synced {
            start_seq,
            batch,
            outcomes,
            late,
            upto,
            logged,
        })
    }

    /// A commit's second part, after [`Self::sync`]: the sled writes, the
    /// durable mark, the late callers' answers, and the fold of its new
    /// events into the waiting rollups.
    fn apply(&mut self, synced: Synced) {
        let Synced {
            start_seq,
            batch,
            outcomes,
            late,
            upto,
            logged,
        } = synced;
        let mut signals = Vec::new();
        let mut fold = None;
        if let Some(mut logged) = logged {
            signals = std::mem::take(&mut logged.signals);
            let new = stored(&batch, &outcomes);
            if let Err(e) = self.index(&new, logged) {
                // The events are in the event log, not all in sled.
                let reason = self.halt(&e);
                fail(late.into_iter().map(|(_, r)| r), &e, &reason);
                return;
            }
            fold = self.trees.pending.as_ref().and(upto);
        }
        // Readers (subscribers, link workers) may now see everything up to
        // here; set before links are woken so they find it.
        // The outboxes count their new entries before a link can see them
        // (an acknowledgement counted off first would be lost at zero),
        // and the links are woken after, when they can read them.
        let added = self.count_queued(&batch, &outcomes);
        let committed = match Committed::shared(batch, &outcomes, signals) {
            Ok(shared) => {
                self.trees
                    .recent
                    .push(start_seq, self.next_seq - 1, &shared);
                Committed::Shared(shared)
            }
            Err(batch) => Committed::Plain(batch),
        };
        self.durable.send_replace(self.next_seq - 1);
        self.announce(&added);
        let m = crate::metrics::get();
        let stored = outcomes
            .iter()
            .flatten()
            .filter(|o| matches!(o, Appended::Stored(_)))
            .count();
        m.stored.inc_by(stored as u64);
        for (i, reply) in late {
            if let Some(outcome) = outcomes.get(i) {
                let _ = reply.send(Ok(outcome.clone()));
            }
        }
        // The new events are folded into the waiting rollups after the
        // callers were answered, on the folder thread: the fold was about
        // half of the writer's time per commit (perf, `bench propagate`),
        // a third of it in `bench ingest` with the writer the bound, and
        // delays neither the acknowledgement, nor the links and
        // subscribers that follow the durable mark, nor the next commit. A
        // query waits for the fold of every commit acknowledged before it
        // started (`rollups::Pending::read_cells`); a crash refolds from
        // the stored events.
        let fold = fold
            .zip(self.trees.pending.clone())
            .map(|(upto, pending)| (Fold::of(committed, &outcomes, upto), pending));
        if let Some((fold, pending)) = fold {
            // A small fold with the folder idle is done here if the cells
            // are free (see `FOLD_HERE_UP_TO`).
            if fold.len() <= FOLD_HERE_UP_TO
                && pending.only_latest_owed()
                && fold.try_into_pending(&pending)
            {
                return;
            }
            let fold = match &self.folder {
                Some(folder) => match folder.tx.send(fold) {
                    Ok(()) => return,
                    Err(std::sync::mpsc::SendError(fold)) => fold,
                },
                None => fold,
            };
            // The folder is gone (it panicked): folded here.
            fold.into_pending(&pending);
        }
    }

    /// A commit failed after its callers were answered: its events are
    /// durable in the event log but not all in sled. The next open indexes
    /// them from the log (as after a crash at that moment), as long as
    /// nothing is written after them: the writer refuses every write
    /// until the node restarts, and the node reports the failure (health
    /// NOT_SERVING). Queries stop waiting for the commit's fold (its
    /// events are counted after the restart).
    /// Returns what the callers not answered yet are told.
    fn halt(&mut self, e: &Error) -> String {
        let reason = format!("the store could not index events it had acknowledged ({e}); they are safe in its event log, and the store indexes them when it opens again: free space if the disk is full (the node then reopens its store by itself), else restart the node");
        if self.failure.borrow().is_none() {
            self.failure.send_replace(Some(reason.clone()));
        }
        if let Some(pending) = &self.trees.pending {
            pending.fold_dropped();
        }
        self.halted = Some((reason, is_disk_full(e)));
        "the events are durable in the store's event log and are stored when the store opens again: restart the node (or, if the disk is full, free space: the node then reopens its store)".into()
    }

    /// Decides per event whether it is new, then appends all new events'
    /// records to the event log and syncs it (see [`Self::log`]). On
    /// failure, says whether anything was applied. With the outcomes, the
    /// highest new sequence number and the commit's logged records, if
    /// any are new.
    fn write(&mut self, batch: &[Vec<NewEvent>]) -> std::result::Result<Written, (Error, bool)> {
        let mut in_batch: HashMap<&str, Seq> = HashMap::new();
        let mut new: Vec<(Seq, &NewEvent)> = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for events in batch {
            let mut out = Vec::with_capacity(events.len());
            for ne in events {
                let id = ne.event.event_id.as_str();
                if let Some(seq) = in_batch.get(id) {
                    out.push(Appended::Duplicate(*seq));
                } else if let Some(seq) = self
                    .trees
                    .ids
                    .get(id.as_bytes())
                    .map_err(|e| (e, false))?
                    .filter(|seq| *seq != PEER_TOMBSTONE || ne.forwarded)
                {
                    out.push(Appended::Duplicate(seq));
                } else {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    in_batch.insert(id, seq);
                    new.push((seq, ne));
                    out.push(Appended::Stored(seq));
                }
            }
            outcomes.push(out);
        }
        if new.is_empty() {
            return Ok((outcomes, None, None));
        }
        let upto = new.iter().map(|(s, _)| *s).max();
        let logged = self.log(&new)?;
        Ok((outcomes, upto, Some(logged)))
    }

    /// Appends the new events' records to the event log and syncs it
    /// (what makes them durable; [`Self::write_log`]); [`Self::index`]
    /// then writes their sled entries tree by tree: first the events'
    /// locations, then their time and customer indexes and outbox
    /// entries, then the ids' journal record (which makes an event
    /// "stored": deduplication finds it), and last the high-water mark and
    /// the log's end. Each tree gets one atomic sled `Batch`, or, for small
    /// commits, plain inserts in event order.
    ///
    /// sled recovers its log as a prefix in write order (sled 0.34's
    /// `pagecache::iterator::LogIter` ends recovery at the first torn
    /// message, torn batch or missing segment), so after a crash the trees
    /// hold a prefix of these writes, and the open replays every frame
    /// after the log end sled kept ([`super::replay_log`]): synced commits
    /// are never lost to sled's background flush. A commit that fails
    /// before its ids' record takes its frames back out of the log;
    /// what it left in sled is removed on open ([`super::repair_tail`]),
    /// and the senders resend. A multi-tree transaction would give the same
    /// guarantee at several times the CPU per event (it buffers every write
    /// in per-tree maps and applies them under sled's global write lock).
    /// On failure, says whether anything was applied. Queries' folded
    /// window edges of the events' hours are dropped here and again after
    /// the sled writes (see [`super::rollups::Pending::begin_change`]).
    fn log(&self, new: &[(Seq, &NewEvent)]) -> std::result::Result<Logged, (Error, bool)> {
        let Some(pending) = &self.trees.pending else {
            return self.write_log(new);
        };
        let mut hours: Vec<i64> = new
            .iter()
            .map(|(_, ne)| crate::rollup::hour_of(ne.event.occurred_at))
            .collect();
        hours.sort_unstable();
        hours.dedup();
        pending.begin_change(Some(&hours));
        match self.write_log(new) {
            Ok(logged) => Ok(Logged {
                hours: Some(hours),
                ..logged
            }),
            Err(e) => {
                pending.end_change(None);
                Err(e)
            }
        }
    }

    /// The sled writes of a commit [`Self::log`] made durable (`new` are
    /// its new events); see there.
    fn index(&self, new: &[(Seq, &NewEvent)], mut logged: Logged) -> Result<()> {
        let hours = logged.hours.take();
        let written = self.write_sled(new, logged);
        if let (Some(pending), Some(hours)) = (&self.trees.pending, hours) {
            // The events are in the trees and their callers answered: their
            // rollup deltas are folded into the waiting ones next, merged
            // into the tree by the checkpointer (a crash refolds them).
            pending.end_change(written.is_ok().then_some(&hours[..]));
        }
        written
    }

    /// [`Self::log`]'s writes: the records to the event log, synced (the
    /// commit's one wait for the disk). Everything that reads the trees
    /// or may refuse the commit (the time index's blocks) runs here,
    /// before the sync; a failure up to and with the sync takes the frames
    /// back out of the log. After it ([`Self::write_sled`]), only sled's
    /// inserts: a failure there leaves the frames in the log, the commit
    /// is acknowledged, the next open indexes it from the log, and the
    /// writer halts until then (see [`Writer::halt`]).
    fn write_log(&self, new: &[(Seq, &NewEvent)]) -> std::result::Result<Logged, (Error, bool)> {
        #[cfg(test)]
        if new.iter().any(|(_, ne)| ne.event.event_id == PANIC_SYNC_ID) {
            panic!("injected panic before the sync");
        }
        let now = UnixNanos::now().0;
        let t = &self.trees;
        let high_water = new.iter().map(|(s, _)| *s).max().unwrap_or(0).to_be_bytes();
        let frames: Vec<super::log::NewFrame> = new
            .iter()
            .map(|(seq, ne)| super::log::NewFrame {
                seq: *seq,
                links: ne
                    .outboxes
                    .iter()
                    .filter_map(|&i| t.outboxes.get(i).map(|o| o.link.as_str()))
                    .collect(),
                record: record::encode(&ne.event),
            })
            .collect();
        // The signals of the new events, for the cache of the newest
        // events (only while a subscription follows, see
        // [`super::Store::follow`]), made from the frames' records.
        let signals = if frames.first().is_some_and(|f| t.recent.wants(f.seq)) {
            frames
                .iter()
                .map(|f| {
                    let payload = &f.record[record::HEADER..];
                    (f.seq, super::recent::encode_signal(f.seq, payload))
                })
                .collect()
        } else {
            Vec::new()
        };
        let io = |e: std::io::Error| (Error::Sled(sled::Error::Io(e)), false);
        // Small commits write key by key (see `Self::write_sled`) and
        // their frames one by one; larger ones write their frames in
        // compressed blocks.
        let plain = new.len() <= PLAIN_INSERTS_UP_TO;
        let packing = if plain {
            super::log::Packing::Single
        } else {
            super::log::Packing::Blocks
        };
        let (locations, end) = t.log.append_as(&frames, packing).map_err(io)?;
        // A commit that fails before its answer takes its frames back out
        // of the log (see `EventLog::rollback`), so that no replay stores
        // what was refused; if even that fails, they may be found at the
        // next open, so their sequence numbers stay used.
        let rollback = |e: Error| {
            if let Err(undo) = t.log.rollback(&locations) {
                tracing::error!(error = %undo, "could not take a failed commit's events back out of the event log; they may be stored at the next open, and their senders find them there as duplicates");
            }
            (e, true)
        };
        let mut events: Vec<(Seq, Location)> = Vec::with_capacity(new.len());
        let mut entries: Vec<times::Entry> = Vec::with_capacity(new.len());
        let mut fingerprints: Vec<(Seq, u32)> = Vec::with_capacity(new.len());
        let mut outboxes: Vec<Vec<Seq>> = t.outboxes.iter().map(|_| Vec::new()).collect();
        for ((seq, ne), at) in new.iter().zip(&locations) {
            events.push((*seq, *at));
            entries.push(times::Entry::new(ne.event.occurred_at.0, *seq));
            fingerprints.push((
                *seq,
                super::customers::fingerprint(&ne.event.customer_pseudonym),
            ));
            for &link in &ne.outboxes {
                if let Some(outbox) = outboxes.get_mut(link) {
                    outbox.push(*seq);
                }
            }
        }
        // The blocks of the days and buckets the events fall in, each read
        // and written whole (only under the writer's mutex, each commit's
        // written in its `apply` before the next `sync`); read before
        // the sync, so that a damaged block refuses the commit with
        // nothing of it in sled and its frames out of the log.
        let blocks = times::added(&t.by_time, entries).map_err(rollback)?;
        // One key per stretch of consecutive numbers: a commit's new events
        // are numbered consecutively, so one key (per `slots::MAX_RUN`).
        let slot_runs = super::slots::runs(&events);
        let started = std::time::Instant::now();
        t.log
            .sync()
            .map_err(|e| rollback(Error::Sled(sled::Error::Io(e))))?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let took = started.elapsed();
        self.slow_sync.set(took > SLOW_SYNC);
        crate::metrics::get()
            .flush_seconds
            .observe(took.as_secs_f64());
        // Durable: the callers are answered before sled's part (tens of µs
        // of a one-event commit's ack; a query or a read by id waits for
        // it, see `Store::wait_applied`). Whatever fails from here on, the
        // frames stay in the log for the next open to index.
        Ok(Logged {
            now,
            plain,
            high_water,
            end,
            blocks,
            slot_runs,
            fingerprints,
            outboxes,
            signals,
            hours: None,
        })
    }

    /// [`Self::index`]'s sled inserts, after the answer.
    fn write_sled(&self, new: &[(Seq, &NewEvent)], logged: Logged) -> Result<()> {
        let t = &self.trees;
        let plain = logged.plain;
        type Kv = Vec<(Vec<u8>, Vec<u8>)>;
        #[cfg(test)]
        let injected = |id: &str| new.iter().any(|(_, ne)| ne.event.event_id == id);
        #[cfg(test)]
        if injected(SLOW_APPLY_ID) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        // A sled batch costs tens of µs whatever its size (it takes sled's
        // global write lock and logs a manifest), a plain insert a few µs:
        // small commits (one request in flight) write key by key, large
        // ones tree by tree.
        let put = |tree: &sled::Tree, kv: Kv| -> sled::Result<()> {
            if kv.is_empty() {
                return Ok(());
            }
            if plain {
                for (k, v) in kv {
                    tree.insert(k, v)?;
                }
                Ok(())
            } else {
                let mut batch = sled::Batch::default();
                for (k, v) in kv {
                    batch.insert(k, v);
                }
                gate::apply_batch(tree, batch)
            }
        };
        // Until the ids are in the index's journal, the events are not
        // stored in sled: a crash or failure before leaves what reached
        // sled for the next open to remove (`super::repair_tail`) before
        // it indexes the frames again (`super::replay_log`). Once they are
        // in, the next open completes the rest from the log.
        for (first, value) in logged.slot_runs {
            t.events.insert(first.to_be_bytes(), value)?;
        }
        #[cfg(test)]
        if injected(FAIL_APPLY_ID) {
            return Err(Error::Write {
                reason: "injected after the answer".into(),
                disk_full: false,
            });
        }
        put(
            &t.by_time,
            logged
                .blocks
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v))
                .collect(),
        )?;
        // A commit's new events have consecutive numbers: one run (per
        // 1024 events: 4 KB, like `slots::MAX_RUN`'s runs small enough for
        // sled's leaves to stay out of blob files).
        for (first, value) in
            super::customers::runs(&logged.fingerprints, super::customers::MAX_RUN)
        {
            t.customer_runs.insert(first.to_be_bytes(), value)?;
        }
        // One run per link (see `super::outbox`): the new numbers are
        // above every queued one.
        for (outbox, seqs) in t.outboxes.iter().zip(logged.outboxes) {
            for (first, value) in super::outbox::runs_of(&seqs, logged.now) {
                outbox.tree.insert(first.to_be_bytes(), value)?;
            }
        }
        // The ids, into the index's journal: one insert (or one batch of
        // a few records), so all of the commit's events are stored or
        // none (see `super::id_journal`).
        t.ids.generations().current.append(
            new.iter()
                .map(|(seq, ne)| (ne.event.event_id.as_bytes(), *seq)),
        )?;
        t.ids.written(new.len() as u64);
        // The log's end before the high-water mark: sled may keep the
        // first write without the second. A log end ahead of the mark only
        // skips frames sled holds whole (everything before it is in); a
        // mark ahead of the log end would make the open refuse this
        // commit's frames as older than the mark, end the log there and
        // zero them.
        t.meta.insert(super::META_LOG_END, &logged.end.encode())?;
        t.meta.insert(super::META_LAST_SEQ, &logged.high_water)?;
        Ok(())
    }

    /// After a successful flush, before the durable mark moves: counts the
    /// new outbox entries on; per link, how many.
    fn count_queued(&self, batch: &[Vec<NewEvent>], outcomes: &[Vec<Appended>]) -> Vec<u64> {
        let mut added = vec![0u64; self.trees.outboxes.len()];
        for (events, out) in batch.iter().zip(outcomes) {
            for (ne, outcome) in events.iter().zip(out) {
                if let Appended::Stored(_) = outcome {
                    for &link in &ne.outboxes {
                        if let Some(n) = added.get_mut(link) {
                            *n += 1;
                        }
                    }
                }
            }
        }
        for (outbox, &n) in self.trees.outboxes.iter().zip(&added) {
            outbox.len.fetch_add(n, Ordering::SeqCst);
        }
        added
    }

    /// After the durable mark moved: wake the links that have new work.
    fn announce(&self, added: &[u64]) {
        for (outbox, &n) in self.trees.outboxes.iter().zip(added) {
            if n > 0 {
                outbox.added.notify_one();
            }
        }
    }
}

/// Removes the rollup cells of every family and period that start before
/// `hour`.
pub(super) fn remove_cells_before(
    rollups: &sled::Tree,
    layout: &crate::rollup::Layout,
    hour: i64,
) -> Result<()> {
    use crate::rollup::{period_prefix, Bucket, Layout};
    let families = (0..Layout::family(layout.views.len())).collect::<Vec<u8>>();
    let mut batch = sled::Batch::default();
    for family in families {
        for period in Bucket::ALL {
            let start = period_prefix(family, period, i64::MIN).to_vec();
            let end = period_prefix(family, period, hour).to_vec();
            for item in rollups.range(start..end) {
                batch.remove(item?.0);
            }
        }
    }
    gate::apply_batch(rollups, batch)?;
    Ok(())
}

/// The frames to zero: `frames` and any a stop left owed before.
fn owed_zeroing(meta: &sled::Tree, frames: &[Location]) -> Result<Vec<u8>> {
    let mut owed = meta
        .get(super::META_TO_ZERO)?
        .map(|v| v.to_vec())
        .unwrap_or_default();
    for at in frames {
        owed.extend_from_slice(&at.encode());
    }
    Ok(owed)
}

/// Answers a command of a halted writer (see [`Writer::halt`]).
fn refuse(command: Command, reason: &str, disk_full: bool) {
    let e = || Error::Write {
        reason: reason.to_string(),
        disk_full,
    };
    match command {
        Command::Append(a) => {
            let _ = a.reply.send(Err(e()));
        }
        Command::Purge { reply, .. } => {
            let _ = reply.send(Err(e()));
        }
        Command::Erase { reply, .. } => {
            let _ = reply.send(Err(e()));
        }
        Command::Snapshot { reply, .. } => {
            let _ = reply.send(Err(e()));
        }
        Command::Close { reply } => {
            let _ = reply.send(Err(e()));
        }
        Command::Finish => {}
    }
}

/// Answers every command of a batch with the error.
fn fail(replies: impl IntoIterator<Item = Reply>, e: &Error, consequence: &str) {
    tracing::error!(error = %e, "store write failed; {consequence}");
    let reason = format!("{e}; {consequence}");
    let disk_full = is_disk_full(e);
    for reply in replies {
        let _ = reply.send(Err(Error::Write {
            reason: reason.clone(),
            disk_full,
        }));
    }
}

fn is_disk_full(e: &Error) -> bool {
    match e {
        Error::Sled(sled::Error::Io(io)) => io.kind() == std::io::ErrorKind::StorageFull,
        _ => false,
    }
}
