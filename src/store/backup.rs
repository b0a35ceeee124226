//! Backup and restore of a store.
//!
//! A backup file is a sequence of length-delimited `BackupRecord` messages
//! (`proto/chainsight/v1/admin.proto`): a header, then for each sled tree
//! its name followed by its entries, then key files if asked for, and last
//! a trailer holding the SHA-256 of every byte before it.
//!
//! **Consistency.** The snapshot is taken on the writer thread, so no
//! event, outbox entry, erasure or retention change is written while the
//! trees are copied (publishes wait; nothing fails), and the rollup tree is
//! copied with checkpoints held off. Writes from other threads may land
//! during the copy, each on its own and each harmless: an outbox entry
//! acknowledged upstream (a restored node sends it again; upstream finds a
//! duplicate), a subscriber cursor (never beyond the events the snapshot
//! holds: a subscriber only sees durable events), an audit record (the
//! trail stays a valid prefix). On open, a restored store refolds the
//! rollup deltas that were waiting in memory, as after a crash.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use super::{Error, Result, Seq};
use crate::pb;

/// The format version written in the header.
pub const VERSION: u32 = 1;

/// Bytes of a record the reader accepts (a stored event is far smaller).
const MAX_RECORD: u64 = 64 << 20;

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub trees: u64,
    pub entries: u64,
    pub last_seq: Seq,
}

/// Writes records, hashing every byte written.
pub struct RecordWriter<W: Write> {
    out: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(out: W) -> Self {
        RecordWriter {
            out,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    /// Writes one record.
    pub fn record(&mut self, record: pb::backup_record::Record) -> std::io::Result<()> {
        let buf = pb::BackupRecord {
            record: Some(record),
        }
        .encode_length_delimited_to_vec();
        self.raw(&buf)
    }

    /// Writes bytes that already are whole records (a node's stream).
    pub fn raw(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.hash.update(buf);
        self.bytes += buf.len() as u64;
        self.out.write_all(buf)
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends the trailer and returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        let sha256 = self.hash.clone().finalize().to_vec();
        let buf = pb::BackupRecord {
            record: Some(pb::backup_record::Record::Trailer(pb::BackupTrailer {
                sha256,
            })),
        }
        .encode_length_delimited_to_vec();
        self.out.write_all(&buf)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes the header and every tree of `db` to `out` (no trailer: the
/// receiver adds key files if asked, then the trailer).
pub(super) fn write_trees(
    db: &sled::Db,
    trees: &super::Trees,
    node_id: &str,
    last_seq: Seq,
    pending: Option<&super::rollups::Pending>,
    out: &mut RecordWriter<impl Write>,
) -> Result<Counts> {
    use pb::backup_record::Record;
    let io = |e: std::io::Error| Error::Sled(sled::Error::Io(e));
    let now = crate::domain::UnixNanos::now();
    out.record(Record::Header(pb::BackupHeader {
        version: VERSION,
        node_id: node_id.to_string(),
        taken_at: Some(pbjson_types::Timestamp {
            seconds: now.0.div_euclid(1_000_000_000),
            nanos: now.0.rem_euclid(1_000_000_000) as i32,
        }),
        last_seq,
    }))
    .map_err(io)?;
    let mut counts = Counts {
        last_seq,
        ..Counts::default()
    };
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        // The rollup cells and their watermark as one checkpoint left them
        // (checkpoints wait, and so do queries behind a waiting one: only
        // for this tree's copy).
        let _no_checkpoint = match (&*name, pending) {
            (b"rollups", Some(p)) => Some(p.hold_checkpoints()),
            _ => None,
        };
        out.record(Record::Tree(name.to_vec())).map_err(io)?;
        counts.trees += 1;
        if &*name == b"events" {
            // A backup holds the records themselves, one entry per event,
            // not where they are in this store's event log (nor its runs
            // of locations); and a restored store has no log to replay.
            for item in super::slots::range(&tree, 0, super::Seq::MAX) {
                let (seq, value) = item?;
                // `None`: removed since (erasure, retention) by a running
                // node; an event that stays is read where it moved.
                let Some(record) = trees.record_live(seq, &value)? else {
                    continue;
                };
                out.record(Record::Entry(pb::BackupEntry {
                    key: seq.to_be_bytes().to_vec(),
                    value: record.into_owned(),
                }))
                .map_err(io)?;
                counts.entries += 1;
            }
            continue;
        }
        for entry in tree.iter() {
            let (key, value) = entry?;
            let value = match &*name {
                // Of this store's event log, which a restored store has not.
                b"meta"
                    if &*key == super::META_LOG_END
                        || key.starts_with(super::META_RELOCATED_INTO) =>
                {
                    continue
                }
                _ => value.to_vec(),
            };
            out.record(Record::Entry(pb::BackupEntry {
                key: key.to_vec(),
                value,
            }))
            .map_err(io)?;
            counts.entries += 1;
        }
    }
    Ok(counts)
}

/// Why a backup file cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid chainsight backup: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} already holds a store: restore into a new, empty data directory")]
    NotEmpty { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] Error),
}

/// What a restore found and wrote.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub node_id: String,
    pub taken_at: Option<crate::domain::UnixNanos>,
    pub counts: Counts,
    /// Key files written into the data directory.
    pub secrets: Vec<String>,
}

/// Reads the records of a backup file in order, checking the trailer's
/// digest when it comes.
struct RecordReader {
    input: BufReader<std::fs::File>,
    path: PathBuf,
    hash: Sha256,
    done: bool,
}

impl RecordReader {
    fn open(path: &Path) -> std::result::Result<Self, RestoreError> {
        let file = std::fs::File::open(path).map_err(|source| RestoreError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(RecordReader {
            input: BufReader::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            hash: Sha256::new(),
            done: false,
        })
    }

    fn invalid(&self, reason: impl Into<String>) -> RestoreError {
        RestoreError::Invalid {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The next record before the trailer; `None` once the trailer has
    /// been read and its digest matched.
    fn next(&mut self) -> std::result::Result<Option<pb::backup_record::Record>, RestoreError> {
        use pb::backup_record::Record;
        if self.done {
            return Ok(None);
        }
        let mut prefix = Vec::with_capacity(10);
        let len = loop {
            let mut byte = [0u8; 1];
            match self.input.read(&mut byte) {
                Ok(0) if prefix.is_empty() => {
                    return Err(self.invalid("it ends without a trailer (truncated?)"))
                }
                Ok(0) => return Err(self.invalid("it ends inside a record (truncated?)")),
                Ok(_) => prefix.push(byte[0]),
                Err(source) => {
                    return Err(RestoreError::Read {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
            if byte[0] & 0x80 == 0 {
                break prost::encoding::decode_varint(&mut prefix.as_slice())
                    .map_err(|e| self.invalid(e.to_string()))?;
            }
            if prefix.len() >= 10 {
                return Err(self.invalid("a record length is malformed"));
            }
        };
        if len > MAX_RECORD {
            return Err(self.invalid(format!("a record claims {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        self.input.read_exact(&mut body).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.invalid("it ends inside a record (truncated?)")
            } else {
                RestoreError::Read {
                    path: self.path.clone(),
                    source: e,
                }
            }
        })?;
        let record = pb::BackupRecord::decode(body.as_slice())
            .map_err(|e| self.invalid(format!("a record does not decode: {e}")))?
            .record
            .ok_or_else(|| self.invalid("an empty record"))?;
        if let Record::Trailer(t) = &record {
            let digest = self.hash.clone().finalize();
            if t.sha256 != digest.as_slice() {
                return Err(self.invalid("its SHA-256 does not match the trailer (altered?)"));
            }
            let mut rest = [0u8; 1];
            if self
                .input
                .read(&mut rest)
                .map_err(|source| RestoreError::Read {
                    path: self.path.clone(),
                    source,
                })?
                != 0
            {
                return Err(self.invalid("bytes follow the trailer"));
            }
            self.done = true;
            return Ok(None);
        }
        self.hash.update(&prefix);
        self.hash.update(&body);
        Ok(Some(record))
    }
}

/// Checks `file` whole (structure and digest) without writing anything.
pub fn verify(file: &Path) -> std::result::Result<Restored, RestoreError> {
    replay(file, |_| Ok(()))
}

/// Rebuilds the store of `data_dir` (which must not hold one) from
/// `file`, and the key files the backup holds. The file is verified whole
/// first; the store is written under a temporary name and renamed into
/// place only when complete, so a failed restore leaves no store behind.
pub fn restore(
    file: &Path,
    data_dir: &Path,
    progress: impl Fn(u64),
) -> std::result::Result<Restored, RestoreError> {
    let store_dir = data_dir.join("store");
    if store_dir.exists() {
        return Err(RestoreError::NotEmpty { path: store_dir });
    }
    let summary = verify(file)?;
    for secret in &summary.secrets {
        if data_dir.join(secret).exists() {
            return Err(RestoreError::NotEmpty {
                path: data_dir.join(secret),
            });
        }
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Write { path, source }
    };
    std::fs::create_dir_all(data_dir).map_err(write_err(data_dir))?;
    let staging = data_dir.join("store.restoring");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(write_err(&staging))?;
    }
    let mut secrets = Vec::new();
    let written = (|| -> std::result::Result<(), RestoreError> {
        let db = sled::Config::new()
            .path(&staging)
            .create_new(true)
            .open()
            .map_err(Error::from)?;
        let mut tree: Option<sled::Tree> = None;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0usize;
        let mut done = 0u64;
        let apply = |tree: &Option<sled::Tree>, batch: &mut sled::Batch| -> Result<()> {
            if let Some(t) = tree {
                super::gate::apply_batch(t, std::mem::take(batch))?;
            }
            Ok(())
        };
        replay(file, |record| {
            use pb::backup_record::Record;
            match record {
                Record::Tree(name) => {
                    apply(&tree, &mut batch)?;
                    in_batch = 0;
                    tree = Some(db.open_tree(name)?);
                }
                Record::Entry(e) => {
                    batch.insert(e.key, e.value);
                    in_batch += 1;
                    done += 1;
                    if in_batch >= 10_000 {
                        apply(&tree, &mut batch)?;
                        in_batch = 0;
                        progress(done);
                    }
                }
                Record::Secret(s) => secrets.push(s),
                Record::Header(_) | Record::Trailer(_) => {}
            }
            Ok(())
        })?;
        apply(&tree, &mut batch)?;
        progress(done);
        flush(&db)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::rename(&staging, &store_dir).map_err(write_err(&store_dir))?;
    crate::secret::sync_parent(&store_dir);
    for s in secrets {
        let path = data_dir.join(&s.file);
        crate::secret::write_private(&path, &s.content).map_err(write_err(&path))?;
    }
    Ok(summary)
}

#[allow(clippy::disallowed_methods)] // a CLI command, on its own thread
fn flush(db: &sled::Db) -> Result<()> {
    db.flush()?;
    Ok(())
}

/// Reads `file` whole, passing each tree, entry and secret record to
/// `apply`; checks the structure (a header first, entries under a tree,
/// secrets after the trees, a valid trailer last).
fn replay(
    file: &Path,
    mut apply: impl FnMut(pb::backup_record::Record) -> Result<()>,
) -> std::result::Result<Restored, RestoreError> {
    use pb::backup_record::Record;
    let mut reader = RecordReader::open(file)?;
    let mut summary = Restored::default();
    match reader.next()? {
        Some(Record::Header(h)) => {
            if h.version != VERSION {
                return Err(reader.invalid(format!(
                    "format version {} (this chainsight reads {VERSION})",
                    h.version
                )));
            }
            summary.node_id = h.node_id;
            summary.counts.last_seq = h.last_seq;
            summary.taken_at = h.taken_at.and_then(|t| {
                t.seconds
                    .checked_mul(1_000_000_000)
                    .and_then(|n| n.checked_add(i64::from(t.nanos)))
                    .map(crate::domain::UnixNanos)
            });
        }
        _ => return Err(reader.invalid("it does not start with a header")),
    }
    let mut in_tree = false;
    while let Some(record) = reader.next()? {
        match &record {
            Record::Header(_) => return Err(reader.invalid("a second header")),
            Record::Tree(_) => {
                if !summary.secrets.is_empty() {
                    return Err(reader.invalid("a tree after the key files"));
                }
                in_tree = true;
                summary.counts.trees += 1;
            }
            Record::Entry(_) => {
                if !in_tree || !summary.secrets.is_empty() {
                    return Err(reader.invalid("an entry outside a tree"));
                }
                summary.counts.entries += 1;
            }
            Record::Secret(s) => {
                // Only the files a backup may carry, nothing that could
                // land elsewhere or overwrite another file.
                if s.file != crate::anonymise::KEY_FILE {
                    return Err(reader.invalid(format!("a key file named {:?}", s.file)));
                }
                summary.secrets.push(s.file.clone());
            }
            Record::Trailer(_) => unreachable!("the reader ends at the trailer"),
        }
        apply(record)?;
    }
    Ok(summary)
}

/// Writes the header and trees of `db` into a new file at `path`, without
/// a trailer: the node streams it to the CLI, which adds key files if
/// asked and the trailer.
pub(super) fn write_staging(
    db: &sled::Db,
    trees: &super::Trees,
    node_id: &str,
    last_seq: Seq,
    pending: Option<&super::rollups::Pending>,
    path: &Path,
) -> Result<Counts> {
    let io = |e: std::io::Error| Error::Sled(sled::Error::Io(e));
    let file = crate::secret::create_private(path).map_err(io)?;
    let mut out = RecordWriter::new(BufWriter::with_capacity(1 << 20, file));
    let counts = write_trees(db, trees, node_id, last_seq, pending, &mut out)?;
    let mut file = out.out;
    file.flush().map_err(io)?;
    Ok(counts)
}
