//! Keeps sled 0.34's `Db::drop_tree` apart from its batches and
//! transactions.
//!
//! A sled batch or transaction takes sled's process-wide write lock and,
//! for the batch's whole length, holds a reservation in the log buffer
//! that records the batch. Everything else that writes takes that lock
//! shared, except `Db::drop_tree`: it frees the dropped tree's pages with
//! no lock at all. When the two overlapped (the id packer dropping a
//! generation while the rollup checkpointer applied a batch, at about 1M
//! stored events), the batch waited forever in `Log::read` for a log
//! buffer to become stable that could not be written while the batch
//! held the lock, and every other sled user, sled's own flusher too,
//! waited for the lock (session 25; upstream: spacejam/sled#1412,
//! spacejam/sled#1308). This gate is taken shared around every batch and
//! transaction of the store and alone around every `drop_tree` and
//! around the creation of a tree while the store runs (the id packer's
//! generations), so they never overlap; the lint
//! `clippy::disallowed_methods` (see `clippy.toml`) keeps the store from
//! calling a batch, a transaction or `drop_tree` outside it.
//!
//! The gate is process-wide, like sled's lock: several stores in one
//! process (the tests, the benchmarks) share both. A holder never takes
//! it again before letting it go (std's lock makes a second shared taker
//! wait behind a waiting exclusive one), and takes no other lock while
//! holding it.

use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use sled::transaction::{ConflictableTransactionResult, TransactionResult, Transactional};

static GATE: RwLock<()> = RwLock::new(());

/// Held shared for the length of one sled batch or transaction.
pub(super) fn shared() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(PoisonError::into_inner)
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
}
