//! Keeps sled 0.34's unlocked writers — `Db::drop_tree`, and
//! `Db::open_tree` creating a tree — apart from its batches and
//! transactions.
//!
//! A sled batch or transaction takes sled's process-wide
//! concurrency-control lock exclusively and, for the batch's whole
//! length, holds a reservation in the log buffer that records the batch.
//! Every other sled operation takes that lock shared, except two:
//! `Db::drop_tree` frees the dropped tree's pages (a `Free` record per
//! page) and `Db::open_tree`, creating a tree, writes its first pages,
//! both without it. When a drop overlapped a batch (the id packer
//! dropping a generation while the rollup checkpointer applied a batch,
//! at about 1M stored events), the batch waited forever in `Log::read`
//! for a log buffer to become stable, and every other sled user, sled's
//! own flusher too, waited for the lock (session 25's stacks; sled's
//! tracker has hangs of this family, e.g. spacejam/sled#1412, without
//! stacks to compare). This gate is taken shared around every batch and
//! transaction of the store, and alone around every `drop_tree` and
//! around the creation of a tree while the store runs (the id packer's
//! generations; every other tree is opened before the store's threads
//! start), so they never overlap. `clippy.toml` disallows calling a
//! batch, a transaction or `drop_tree` outside it (`cargo clippy
//! --all-targets -- -D warnings`, run before every commit, fails on
//! one); creating a tree has no such check.
//!
//! The gate is process-wide, like sled's lock: several stores in one
//! process (the tests, the benchmarks) share both. A holder never takes
//! it again before letting it go (std's lock makes a second shared taker
//! wait behind a waiting exclusive one) and, holding it, waits for none
//! of the store's own locks (some are held by callers *before* they take
//! it: the checkpointer's `tree_lock`, the writer's id generations and the
//! current id journal's lock; the
//! id packer takes the gate alone holding only its `moving` lock).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionResult, TransactionResult, Transactional};

static GATE: RwLock<()> = RwLock::new(());

/// Nanoseconds batches and transactions waited for the gate, in all (see
/// [`waited`]).
static WAITED: AtomicU64 = AtomicU64::new(0);

/// Held shared for the length of one sled batch or transaction.
pub(super) fn shared() -> RwLockReadGuard<'static, ()> {
    match GATE.try_read() {
        Ok(shared) => shared,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => {
            let started = Instant::now();
            let shared = GATE.read().unwrap_or_else(PoisonError::into_inner);
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            WAITED.fetch_add(nanos, Ordering::Relaxed);
            shared
        }
    }
}

/// How long batches and transactions of this process waited for the
/// gate since it started, in all (the id packer logs it: the price of
/// keeping its drops apart).
pub(super) fn waited() -> Duration {
    Duration::from_nanos(WAITED.load(Ordering::Relaxed))
}

/// `tree.apply_batch(batch)`, inside the gate.
#[allow(clippy::disallowed_methods)] // the one place it is called
pub(super) fn apply_batch(tree: &sled::Tree, batch: sled::Batch) -> sled::Result<()> {
    let _shared = shared();
    tree.apply_batch(batch)
}

/// `db.drop_tree(name)`, alone in the gate: no sled batch or transaction
/// of this process runs while a tree's pages are freed (and sled flushes,
/// as the dropped tree's last handle goes).
#[allow(clippy::disallowed_methods)] // the one place it is called
pub(super) fn drop_tree(db: &sled::Db, name: impl AsRef<[u8]>) -> sled::Result<bool> {
    let _alone = GATE.write().unwrap_or_else(PoisonError::into_inner);
    db.drop_tree(name)
}

/// `db.open_tree(name)` for a tree that may not exist yet, alone in the
/// gate: creating a tree, like dropping one, writes its first pages
/// without sled's lock (`Db::open_tree` → `meta::open_tree`). Opening a
/// tree that exists only looks it up.
pub(super) fn create_tree(db: &sled::Db, name: impl AsRef<[u8]>) -> sled::Result<sled::Tree> {
    let name = name.as_ref();
    if db.tree_names().iter().any(|n| n.as_ref() == name) {
        return db.open_tree(name);
    }
    let _alone = GATE.write().unwrap_or_else(PoisonError::into_inner);
    db.open_tree(name)
}

/// `trees.transaction(f)`, inside the gate.
#[allow(clippy::disallowed_methods)] // the one place it is called
pub(super) fn transaction<T, F, A, E>(trees: &T, f: F) -> TransactionResult<A, E>
where
    T: Transactional<E> + ?Sized,
    F: Fn(&T::View) -> ConflictableTransactionResult<A, E>,
{
    let _shared = shared();
    trees.transaction(f)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_tree_is_dropped_only_while_no_batch_or_transaction_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        db.open_tree("doomed")
            .expect("tree")
            .insert(b"k", b"v")
            .expect("insert");
        let batch = super::shared();
        let (done, dropped) = mpsc::channel();
        let dropper = {
            let db = db.clone();
            std::thread::spawn(move || done.send(super::drop_tree(&db, "doomed")))
        };
        assert!(
            dropped.recv_timeout(Duration::from_millis(300)).is_err(),
            "the tree was dropped while a batch held the gate"
        );
        drop(batch);
        let result = dropped
            .recv_timeout(Duration::from_secs(30))
            .expect("the drop goes on once the batch is done");
        assert!(result.expect("drop_tree"), "the tree existed");
        dropper.join().expect("dropper").expect("sent");
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"doomed"));
        // And a batch waits for nothing once the drop is done.
        let tree = db.open_tree("kept").expect("tree");
        let mut b = sled::Batch::default();
        b.insert(b"a", b"1");
        super::apply_batch(&tree, b).expect("batch");
        assert_eq!(tree.get(b"a").expect("get").as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn a_tree_is_created_only_while_no_batch_or_transaction_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        db.open_tree("existing").expect("tree");
        let batch = super::shared();
        // A tree that exists is only looked up: no wait.
        super::create_tree(&db, "existing").expect("existing tree");
        let (done, created) = mpsc::channel();
        let creator = {
            let db = db.clone();
            std::thread::spawn(move || done.send(super::create_tree(&db, "new").map(|_| ())))
        };
        assert!(
            created.recv_timeout(Duration::from_millis(300)).is_err(),
            "the tree was created while a batch held the gate"
        );
        drop(batch);
        created
            .recv_timeout(Duration::from_secs(30))
            .expect("the creation goes on once the batch is done")
            .expect("create_tree");
        creator.join().expect("creator").expect("sent");
        assert!(db.tree_names().iter().any(|n| n.as_ref() == b"new"));
    }

    #[test]
    fn batches_and_transactions_wait_while_a_tree_is_dropped() {
        use sled::transaction::ConflictableTransactionError;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let tree = db.open_tree("t").expect("tree");
        // As `drop_tree` holds it.
        let dropping = super::GATE.write().expect("gate");
        let (done, finished) = mpsc::channel();
        let batch = {
            let (tree, done) = (tree.clone(), done.clone());
            std::thread::spawn(move || {
                let mut b = sled::Batch::default();
                b.insert(b"batch", b"1");
                super::apply_batch(&tree, b).expect("batch");
                done.send("batch").expect("send");
            })
        };
        let transaction = {
            let tree = tree.clone();
            std::thread::spawn(move || {
                super::transaction(&tree, |t| {
                    t.insert(b"transaction", b"2")?;
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .expect("transaction");
                done.send("transaction").expect("send");
            })
        };
        assert!(
            finished.recv_timeout(Duration::from_millis(300)).is_err(),
            "a batch or a transaction ran while a tree was being dropped"
        );
        assert_eq!(tree.get(b"batch").expect("get"), None);
        assert_eq!(tree.get(b"transaction").expect("get"), None);
        drop(dropping);
        let mut got: Vec<&str> = (0..2)
            .map(|_| {
                finished
                    .recv_timeout(Duration::from_secs(30))
                    .expect("they go on once the drop is done")
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, ["batch", "transaction"]);
        // Their wait is counted (the 300 ms above, less their start).
        assert!(super::waited() >= Duration::from_millis(200));
        batch.join().expect("batch thread");
        transaction.join().expect("transaction thread");
        assert!(tree.get(b"batch").expect("get").is_some());
        assert!(tree.get(b"transaction").expect("get").is_some());
    }
}
