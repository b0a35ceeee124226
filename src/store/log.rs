//! The event log: the records of stored events in append-only segment
//! files (`<store>/log/<first seq>.seg`), outside sled.
//!
//! The `events` tree maps a sequence number to the record's [`Location`]
//! (21 bytes; one key per commit holds its events' locations, see
//! `super::slots`) instead of the record itself (stores written before the
//! log keep their records inline; every form is read). A group commit appends
//! its frames to the active segment and syncs it once: that sync is what
//! makes the commit durable. The sled writes of the commit (the location,
//! indexes, outbox entries, high-water mark and [`super::META_LOG_END`])
//! follow without a sled flush; sled flushes in the background, and at open
//! [`EventLog::replay`] hands back every frame after the end sled
//! recorded, for the store to index again. So a commit costs one sync of a
//! few kilobytes appended at the end of a file, and kilobyte records never
//! go through sled's log and page cache.
//!
//! A frame: body length (u32), CRC-32 of the body (u32), then the body:
//! sequence number (u64), the outbox links it was queued for (count u8,
//! then each name's length u16 and UTF-8 bytes), and the record (see
//! [`super::record`]). All integers big-endian.
//!
//! A **block** holds the frames of up to [`BLOCK_EVENTS`] events of one
//! commit, compressed together (zstd): the records of a commit share most
//! of their bytes (the origin's batch signature, certificate digest and
//! Merkle path nodes, the vocabulary of products, categories and regions),
//! and `bench growth` measured 821 bytes per event as single frames against
//! about 260 in blocks of 16. Its header's length word has [`BLOCK_FLAG`]
//! set; its body: kind (u8: [`BLOCK_COMMIT`] or [`BLOCK_RELOCATED`]),
//! entry count (u16), decompressed length (u32), then the zstd frame of
//! the entries, each: sequence number (u64), links (as above), record
//! length (u32) and record. A [`Location`] in a block names the block and
//! the entry. Commits of at most 16 events (one request in flight) write
//! single frames: nothing to share, and no compression on that path.
//!
//! Erasure and retention overwrite the frames of the events they remove
//! with zeros (after the sled transaction that removed their locations is
//! flushed), and retention deletes a segment once no stored event is left
//! in it. A block is zeroed whole: the events of it that stay are first
//! written again, as a relocated block at the end of the log, and their
//! locations moved to it (see `super::remove_records`). Replay never
//! indexes a relocated block as new events; one that no location points to
//! is the remains of a move a crash cut short, and is zeroed.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use super::Seq;

/// The first byte of an `events` value that is a [`Location`] (an inline
/// record starts with its format byte, 1).
pub(super) const LOCATION_FORMAT: u8 = 2;
/// A new segment is started once the active one has this many bytes.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Frame header: body length and CRC.
const HEADER: usize = 8;
/// A frame body is never larger (records are bounded far below it).
const MAX_BODY: u32 = 64 << 20;
/// Set in a frame header's length word: the frame is a block.
const BLOCK_FLAG: u32 = 1 << 31;
/// Most events in one block (a commit's events are split evenly into
/// blocks of at most this many). Reading one event decompresses its block
/// (about 13 KB for 16 events: microseconds); 8 measured 322 bytes per
/// event on disk, 16 about 260, 32 about 226.
pub(super) const BLOCK_EVENTS: usize = 16;
/// A block of a commit's new events.
const BLOCK_COMMIT: u8 = 1;
/// A block of events moved out of a block that was zeroed.
const BLOCK_RELOCATED: u8 = 2;
/// Block body header: kind, count, decompressed length.
const BLOCK_HEADER: usize = 7;
/// zstd's fastest regular level: 1 and 3 measured within 1 % of each
/// other in size on these records.
const ZSTD_LEVEL: i32 = 1;
/// Decompressed blocks kept for readers (sequential readers, subscribers
/// and links, read the entries of a block one after the other).
const CACHED_BLOCKS: usize = 64;

/// A frame's segment, offset and length.
type FrameKey = (u64, u64, u32);

/// Where an event's frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    /// The segment's id (the sequence number it starts at).
    pub segment: u64,
    pub offset: u64,
    /// The frame's length, header included.
    pub len: u32,
    /// The entry in a block (0 for a single frame). Encoded in the top 16
    /// bits of the offset (segments are far smaller than 2^48 bytes).
    pub entry: u16,
}

impl Location {
    pub fn encode(&self) -> [u8; 21] {
        let mut out = [0u8; 21];
        out[0] = LOCATION_FORMAT;
        out[1..9].copy_from_slice(&self.segment.to_be_bytes());
        let offset = self.offset | (u64::from(self.entry) << 48);
        out[9..17].copy_from_slice(&offset.to_be_bytes());
        out[17..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The frame (a block, or a single event's) this location is in.
    fn frame_key(&self) -> FrameKey {
        (self.segment, self.offset, self.len)
    }

    /// Whether both locations are in the same frame.
    pub fn same_frame(&self, other: &Location) -> bool {
        self.frame_key() == other.frame_key()
    }

    /// Locations encoded one after the other.
    pub fn decode_all(bytes: &[u8]) -> Vec<Location> {
        bytes
            .chunks_exact(21)
            .filter_map(Location::decode)
            .collect()
    }

    pub fn decode(bytes: &[u8]) -> Option<Location> {
        if bytes.len() != 21 || bytes[0] != LOCATION_FORMAT {
            return None;
        }
        let offset = u64::from_be_bytes(bytes[9..17].try_into().ok()?);
        Some(Location {
            segment: u64::from_be_bytes(bytes[1..9].try_into().ok()?),
            offset: offset & ((1 << 48) - 1),
            len: u32::from_be_bytes(bytes[17..].try_into().ok()?),
            entry: (offset >> 48) as u16,
        })
    }
}

/// A position in the log: the end of the last frame of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct End {
    pub segment: u64,
    pub offset: u64,
}

impl End {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<End> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(End {
            segment: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            offset: u64::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

/// A frame to append.
pub(super) struct NewFrame<'a> {
    pub seq: Seq,
    pub links: Vec<&'a str>,
    pub record: Vec<u8>,
}

/// A frame read back by [`EventLog::replay`].
#[derive(Debug)]
pub(super) struct Frame {
    pub seq: Seq,
    pub links: Vec<String>,
    pub record: Vec<u8>,
    pub location: Location,
}

/// What [`EventLog::replay`] found after the given end.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// The new events' frames, in order.
    pub frames: Vec<Frame>,
    /// Relocated blocks: each block's location (entry 0) and its entries'
    /// sequence numbers. Not new events: either their locations point to
    /// them, or a crash cut their move short (see `super::replay_log`).
    pub relocated: Vec<(Location, Vec<Seq>)>,
}

/// A frame as [`EventLog::read`] finds it.
enum Loaded {
    Block(Arc<Block>),
    Single(Vec<u8>),
}

/// A block's entries, decompressed.
#[derive(Debug)]
pub(super) struct Block {
    data: Vec<u8>,
    entries: Vec<BlockEntry>,
    relocated: bool,
}

#[derive(Debug, Clone, Copy)]
struct BlockEntry {
    seq: Seq,
    /// Where the entry's links start (their count) in `data`.
    links: usize,
    /// The record's span in `data`.
    record: (usize, usize),
}

impl Block {
    /// Its entries: sequence number, links and record.
    pub fn entries(&self) -> impl Iterator<Item = (Seq, Vec<String>, &[u8])> + '_ {
        self.entries.iter().map(|e| {
            let links = read_links(&self.data[e.links..])
                .map(|(links, _)| links)
                .unwrap_or_default();
            (e.seq, links, &self.data[e.record.0..e.record.1])
        })
    }

    /// The record of entry `entry`, checked to be `seq`'s.
    fn record(&self, seq: Seq, entry: u16) -> Result<&[u8], String> {
        let e = self
            .entries
            .get(usize::from(entry))
            .ok_or_else(|| format!("the block has no entry {entry}"))?;
        if e.seq != seq {
            return Err(format!("entry {entry} holds seq {}, not {seq}", e.seq));
        }
        Ok(&self.data[e.record.0..e.record.1])
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum FrameError {
    #[error("segment {0} is missing")]
    NoSegment(u64),
    #[error("cannot read segment {segment}: {source}")]
    Io {
        segment: u64,
        source: std::io::Error,
    },
    #[error("the frame was rolled back: its commit failed (event log segment {segment}, offset {offset})")]
    RolledBack { segment: u64, offset: u64 },
    #[error("{reason} (event log segment {segment}, offset {offset})")]
    Bad {
        segment: u64,
        offset: u64,
        reason: String,
    },
}

struct Active {
    segment: u64,
    file: Arc<File>,
    len: u64,
    /// The bytes allocated ahead of time: the next segment starts once
    /// `len` reaches it.
    capacity: u64,
    /// The frames of a commit are put together here.
    buf: Vec<u8>,
    /// A block's entries before compression.
    raw: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl Active {
    fn new(segment: u64, file: Arc<File>, len: u64) -> std::io::Result<Active> {
        Ok(Active {
            segment,
            file,
            len,
            capacity: SEGMENT_BYTES,
            buf: Vec::new(),
            raw: Vec::new(),
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
        })
    }
}

/// The segment files of one store.
pub(super) struct EventLog {
    dir: PathBuf,
    segments: RwLock<BTreeMap<u64, Arc<File>>>,
    /// The segment appended to (only the writer appends).
    active: Mutex<Option<Active>>,
    /// Set by an I/O error of an append, sync or rollback: what is on disk
    /// after the last good commit is then unknown, so nothing more is
    /// appended until the store is reopened (whose replay sorts it out).
    /// Holds the kind of that error.
    poisoned: Mutex<Option<std::io::ErrorKind>>,
    /// Decompressed blocks recently read, newest last (see
    /// [`CACHED_BLOCKS`]); a block leaves it when it is zeroed.
    cache: Mutex<std::collections::VecDeque<(FrameKey, Arc<Block>)>>,
    /// Counts zeroings (each counted after its write): a block read from
    /// disk while one was under way is not cached (it may be the block
    /// zeroed).
    zeroings: std::sync::atomic::AtomicU64,
}

fn segment_name(segment: u64) -> String {
    format!("{segment:020}.seg")
}

impl EventLog {
    /// Opens (creating) the log directory `dir` and every segment in it.
    pub fn open(dir: &Path) -> std::io::Result<EventLog> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            // The directory's own entry, durable before anything in it is.
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(entry.path())?;
            segments.insert(id, Arc::new(file));
        }
        Ok(EventLog {
            dir: dir.to_path_buf(),
            segments: RwLock::new(segments),
            // Where appends go is known once [`Self::replay`] found the end.
            active: Mutex::new(None),
            poisoned: Default::default(),
            cache: Default::default(),
            zeroings: Default::default(),
        })
    }

    /// Whether the log has no segment (a new store, or one written before
    /// the log).
    pub fn is_empty(&self) -> bool {
        self.segments.read().expect("segments lock").is_empty()
    }

    fn segment(&self, segment: u64) -> Result<Arc<File>, FrameError> {
        self.segments
            .read()
            .expect("segments lock")
            .get(&segment)
            .cloned()
            .ok_or(FrameError::NoSegment(segment))
    }

    /// Appends the frames (not yet synced: see [`Self::sync`]) as single
    /// frames and returns their locations and the log's new end. On error
    /// nothing counts as appended: the next append writes over whatever was
    /// written.
    #[cfg(test)]
    pub fn append(&self, frames: &[NewFrame<'_>]) -> std::io::Result<(Vec<Location>, End)> {
        self.append_as(frames, Packing::Single)
    }

    /// As [`Self::append`], packed as `packing` says.
    pub fn append_as(
        &self,
        frames: &[NewFrame<'_>],
        packing: Packing,
    ) -> std::io::Result<(Vec<Location>, End)> {
        self.usable()?;
        let appended = self.append_unchecked(frames, packing);
        self.poison_on(appended)
    }

    /// Refuses once poisoned.
    fn usable(&self) -> std::io::Result<()> {
        match *self.poisoned.lock().expect("poison lock") {
            // Of the error's kind: a full disk stays a full disk to the
            // callers (RESOURCE_EXHAUSTED, not an internal error).
            Some(kind) => Err(std::io::Error::new(
                kind,
                "the event log refuses writes after an I/O error; the store must be reopened",
            )),
            None => Ok(()),
        }
    }

    fn poison_on<T>(&self, result: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &result {
            self.poisoned
                .lock()
                .expect("poison lock")
                .get_or_insert(e.kind());
        }
        result
    }

    fn append_unchecked(
        &self,
        frames: &[NewFrame<'_>],
        packing: Packing,
    ) -> std::io::Result<(Vec<Location>, End)> {
        let mut active = self.active.lock().expect("active lock");
        // A segment is named by the first sequence number in it: relocated
        // events (numbered lower) never start one, they go to the active
        // segment even when it is full.
        let rotate =
            active.as_ref().is_none_or(|a| a.len >= a.capacity) && packing != Packing::Relocated;
        if packing == Packing::Relocated && active.is_none() {
            return Err(std::io::Error::other(
                "the event log has no segment to move events to",
            ));
        }
        if rotate {
            if let Some(first) = frames.first() {
                if let Some(done) = active.as_ref() {
                    // Complete: durable to its end before the next begins.
                    done.file.sync_data()?;
                }
                *active = Some(self.create(first.seq)?);
            }
        }
        let Some(a) = active.as_mut() else {
            return Ok((
                Vec::new(),
                End {
                    segment: 0,
                    offset: 0,
                },
            ));
        };
        // One buffer, kept from commit to commit (unless a large one grew it).
        let mut buf = std::mem::take(&mut a.buf);
        buf.clear();
        buf.reserve(frames.iter().map(|f| f.record.len() + 64).sum());
        let mut locations = Vec::with_capacity(frames.len());
        let kind = match packing {
            Packing::Single => None,
            Packing::Blocks => Some(BLOCK_COMMIT),
            Packing::Relocated => Some(BLOCK_RELOCATED),
        };
        let packed = match kind {
            None => {
                for f in frames {
                    let start = buf.len();
                    buf.extend_from_slice(&[0u8; HEADER]);
                    put_entry_head(&mut buf, f);
                    buf.extend_from_slice(&f.record);
                    let len = seal(&mut buf, start, 0);
                    locations.push(Location {
                        segment: a.segment,
                        offset: a.len + start as u64,
                        len,
                        entry: 0,
                    });
                }
                Ok(())
            }
            Some(kind) => pack(a, &mut buf, frames, kind, &mut locations),
        };
        let written = packed.and_then(|()| a.file.write_all_at(&buf, a.len));
        let appended = buf.len() as u64;
        if buf.capacity() <= 1 << 20 {
            a.buf = buf;
        }
        if let Err(e) = written {
            // Nothing of it must look like frames to a replay.
            let _ = a.file.set_len(a.len);
            return Err(e);
        }
        a.len += appended;
        Ok((
            locations,
            End {
                segment: a.segment,
                offset: a.len,
            },
        ))
    }

    /// Undoes the last append (`locations`, all in the active segment) of
    /// a commit that failed: its frames are zeroed and synced, so that
    /// neither a replay nor a read finds them, and the next append writes
    /// over them.
    /// If zeroing fails, the log refuses further appends (see
    /// `poisoned`).
    pub fn rollback(&self, locations: &[Location]) -> std::io::Result<()> {
        let Some(first) = locations.first() else {
            return Ok(());
        };
        let mut active = self.active.lock().expect("active lock");
        let Some(a) = active.as_mut().filter(|a| a.segment == first.segment) else {
            return Ok(());
        };
        let end = a.len;
        a.len = first.offset;
        let zeros = vec![0u8; (end - first.offset) as usize];
        let zeroed = a
            .file
            .write_all_at(&zeros, first.offset)
            .and_then(|()| a.file.sync_data());
        // After the writes: a read of the old bytes is then not cached.
        self.zeroings.fetch_add(1, Ordering::SeqCst);
        self.forget(a.segment, Some(first.offset..end));
        self.poison_on(zeroed)
    }

    /// Takes back the frame at `at` if it is the last of the log: zeroes
    /// it (synced) and appends go on at its offset. Returns whether it was.
    pub fn cut_tail(&self, at: Location) -> std::io::Result<bool> {
        let is_tail = self
            .active
            .lock()
            .expect("active lock")
            .as_ref()
            .is_some_and(|a| a.segment == at.segment && at.offset + u64::from(at.len) == a.len);
        if !is_tail {
            return Ok(false);
        }
        self.rollback(&[at])?;
        Ok(true)
    }

    /// Where the next append goes (`None` before [`Self::replay`] found
    /// it, or in a log without segments).
    pub fn end(&self) -> Option<End> {
        self.active
            .lock()
            .expect("active lock")
            .as_ref()
            .map(|a| End {
                segment: a.segment,
                offset: a.len,
            })
    }

    /// Whether the next append starts a new segment (creates its file and
    /// syncs the directory).
    pub fn starts_segment(&self) -> bool {
        self.active
            .lock()
            .expect("active lock")
            .as_ref()
            .is_none_or(|a| a.len >= a.capacity)
    }

    /// Makes everything appended durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.usable()?;
        let file = match self.active.lock().expect("active lock").as_ref() {
            Some(a) => a.file.clone(),
            None => return Ok(()),
        };
        self.poison_on(file.sync_data())
    }

    /// Starts segment `id`: its file, allocated ahead of time (so that a
    /// commit's sync writes into allocated blocks: an append that grows a
    /// file also waits for the file system's journal; measured here, a
    /// kilobyte synced 150 µs into allocated space against 205 µs at the
    /// end of a growing file), and its directory entry, durable.
    fn create(&self, id: u64) -> std::io::Result<Active> {
        let path = self.dir.join(segment_name(id));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        if let Err(e) = nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            SEGMENT_BYTES as i64,
        ) {
            // Short of space, or a file system without it: the appends grow
            // the file themselves.
            tracing::debug!(error = %e, "could not allocate the event log's new segment ahead of time");
        }
        File::open(&self.dir)?.sync_all()?;
        let file = Arc::new(file);
        self.segments
            .write()
            .expect("segments lock")
            .insert(id, file.clone());
        Active::new(id, file, 0)
    }

    /// The record of the frame at `at`, checked (CRC and sequence number).
    pub fn read(&self, seq: Seq, at: Location) -> Result<Vec<u8>, FrameError> {
        let bad = |reason: String| FrameError::Bad {
            segment: at.segment,
            offset: at.offset,
            reason,
        };
        let mut buf = match self.load(at)? {
            Loaded::Block(block) => {
                return block.record(seq, at.entry).map(<[u8]>::to_vec).map_err(bad)
            }
            Loaded::Single(buf) => buf,
        };
        if at.entry != 0 {
            return Err(bad(format!("a single frame has no entry {}", at.entry)));
        }
        let (found, _, record) = check(&buf).map_err(bad)?;
        if found != seq {
            return Err(bad(format!("holds seq {found}, not {seq}")));
        }
        // The record, in place (no second buffer).
        buf.drain(..record);
        Ok(buf)
    }

    /// The block at `at` (any entry of it), decompressed; `None` when the
    /// frame there is a single event's.
    pub fn read_block(&self, at: Location) -> Result<Option<Arc<Block>>, FrameError> {
        Ok(match self.load(at)? {
            Loaded::Block(block) => Some(block),
            Loaded::Single(_) => None,
        })
    }

    /// The frame at `at`: a block, decompressed (from the cache, or read
    /// and cached), or a single event's frame as read.
    fn load(&self, at: Location) -> Result<Loaded, FrameError> {
        if let Some(block) = self.cached(at) {
            return Ok(Loaded::Block(block));
        }
        let zeroings = self.zeroings.load(Ordering::SeqCst);
        let buf = self.read_frame(at)?;
        if !is_block(&buf) {
            return Ok(Loaded::Single(buf));
        }
        let block = Arc::new(decode_block(&buf).map_err(|reason| FrameError::Bad {
            segment: at.segment,
            offset: at.offset,
            reason,
        })?);
        self.remember(at, block.clone(), zeroings);
        Ok(Loaded::Block(block))
    }

    /// The bytes of the frame at `at`; zeros are a rolled-back (or
    /// zeroed) frame.
    fn read_frame(&self, at: Location) -> Result<Vec<u8>, FrameError> {
        let file = self.segment(at.segment)?;
        let mut buf = vec![0u8; at.len as usize];
        file.read_exact_at(&mut buf, at.offset)
            .map_err(|source| FrameError::Io {
                segment: at.segment,
                source,
            })?;
        if buf.iter().all(|b| *b == 0) {
            return Err(FrameError::RolledBack {
                segment: at.segment,
                offset: at.offset,
            });
        }
        Ok(buf)
    }

    fn cached(&self, at: Location) -> Option<Arc<Block>> {
        let mut cache = self.cache.lock().expect("cache lock");
        let i = cache.iter().rposition(|(k, _)| *k == at.frame_key())?;
        let hit = cache.remove(i).expect("found");
        let block = hit.1.clone();
        cache.push_back(hit);
        Some(block)
    }

    /// Caches a block read from disk when no zeroing began since
    /// `zeroings` was read (before reading it).
    fn remember(&self, at: Location, block: Arc<Block>, zeroings: u64) {
        let mut cache = self.cache.lock().expect("cache lock");
        if self.zeroings.load(Ordering::SeqCst) != zeroings
            || cache.iter().any(|(k, _)| *k == at.frame_key())
        {
            return;
        }
        if cache.len() >= CACHED_BLOCKS {
            cache.pop_front();
        }
        cache.push_back((at.frame_key(), block));
    }

    /// Drops cached blocks of `segment` at `offsets` (all of the
    /// segment's when `None`).
    fn forget(&self, segment: u64, offsets: Option<std::ops::Range<u64>>) {
        self.cache
            .lock()
            .expect("cache lock")
            .retain(|((s, o, _), _)| {
                *s != segment || offsets.as_ref().is_some_and(|r| !r.contains(o))
            });
    }

    /// The frames after `from` (the whole log when `None`), up to the end
    /// of the log: a zero header (the rest of a segment written full of
    /// zeros ahead of time) or the first frame that is incomplete or
    /// damaged, the remains of a commit whose sync a crash cut short, never
    /// acknowledged. Those remains are zeroed, so that nothing after the
    /// next appends can ever read as a frame. Appends continue after the
    /// last whole frame. Call once, at open, before any append.
    /// A frame `accept` refuses ends the log as a damaged one does (the
    /// store refuses frames it cannot have written after `from`).
    pub fn replay(
        &self,
        from: Option<End>,
        mut accept: impl FnMut(&Frame) -> bool,
    ) -> std::io::Result<Replayed> {
        let segments: Vec<(u64, Arc<File>)> = self
            .segments
            .read()
            .expect("segments lock")
            .iter()
            .filter(|(id, _)| from.is_none_or(|f| **id >= f.segment))
            .map(|(id, f)| (*id, f.clone()))
            .collect();
        let mut frames = Vec::new();
        let mut relocated = Vec::new();
        let mut end: Option<(u64, Arc<File>, u64)> = None;
        for (segment, file) in &segments {
            let start = match from {
                Some(f) if f.segment == *segment => f.offset,
                _ => 0,
            };
            let len = file.metadata()?.len();
            let mut bytes = vec![0u8; len.saturating_sub(start) as usize];
            file.read_exact_at(&mut bytes, start)?;
            let mut pos = 0usize;
            let mut torn = false;
            while pos + 4 <= bytes.len() {
                let word = u32::from_be_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes"));
                if word == 0 {
                    break;
                }
                let body = word & !BLOCK_FLAG;
                let total = HEADER + body as usize;
                let at = Location {
                    segment: *segment,
                    offset: start + pos as u64,
                    len: total as u32,
                    entry: 0,
                };
                let whole = bytes.get(pos..pos + total).filter(|_| body <= MAX_BODY);
                let before = frames.len();
                let whole_ok = match whole {
                    None => false,
                    Some(b) if is_block(b) => match decode_block(b) {
                        Err(_) => false,
                        Ok(block) if block.relocated => {
                            relocated.push((at, block.entries.iter().map(|e| e.seq).collect()));
                            true
                        }
                        Ok(block) => {
                            block
                                .entries()
                                .enumerate()
                                .all(|(i, (seq, links, record))| {
                                    let frame = Frame {
                                        seq,
                                        links,
                                        record: record.to_vec(),
                                        location: Location {
                                            entry: i as u16,
                                            ..at
                                        },
                                    };
                                    // Sequence numbers only grow along the log.
                                    let fits =
                                        frames.last().is_none_or(|l: &Frame| l.seq < frame.seq)
                                            && accept(&frame);
                                    if fits {
                                        frames.push(frame);
                                    }
                                    fits
                                })
                        }
                    },
                    Some(b) => match parse(b, at) {
                        Ok(frame)
                            if frames.last().is_none_or(|l: &Frame| l.seq < frame.seq)
                                && accept(&frame) =>
                        {
                            frames.push(frame);
                            true
                        }
                        _ => false,
                    },
                };
                if !whole_ok {
                    // A block ends the log whole, entries accepted or not.
                    frames.truncate(before);
                    torn = true;
                    break;
                }
                pos += total;
            }
            // After the last whole frame only zeros may follow: anything
            // else is the remains of an unsynced commit (pages of it may
            // have reached the disk without its first header).
            torn |= bytes[pos..].iter().any(|b| *b != 0);
            let at = start + pos as u64;
            if torn {
                let rest = &bytes[pos..];
                let dirty = rest.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                tracing::warn!(
                    segment,
                    offset = at,
                    bytes = dirty,
                    "zeroed the unacknowledged remains of an interrupted commit in the event log"
                );
                let zeros = vec![0u8; 1 << 20];
                let mut done = 0;
                while done < dirty {
                    let n = (dirty - done).min(zeros.len());
                    file.write_all_at(&zeros[..n], at + done as u64)?;
                    done += n;
                }
                file.sync_all()?;
            }
            end = Some((*segment, file.clone(), at));
            if torn {
                // Any later segment holds nothing acknowledged either.
                for (later, _) in segments.iter().filter(|(id, _)| id > segment) {
                    self.remove_segment(*later)?;
                }
                break;
            }
        }
        // Appends go on in the last segment, after its last whole frame.
        let last = self
            .segments
            .read()
            .expect("segments lock")
            .iter()
            .next_back()
            .map(|(id, f)| (*id, f.clone()));
        let active = match (last, end) {
            (Some((id, _)), Some((segment, file, at))) if id == segment => {
                Some(Active::new(segment, file, at)?)
            }
            // Replay started in a later segment than any (a store whose
            // log was emptied): start anew.
            _ => None,
        };
        *self.active.lock().expect("active lock") = active;
        Ok(Replayed { frames, relocated })
    }

    fn remove_segment(&self, segment: u64) -> std::io::Result<()> {
        self.segments
            .write()
            .expect("segments lock")
            .remove(&segment);
        self.forget(segment, None);
        std::fs::remove_file(self.dir.join(segment_name(segment)))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Overwrites the frames at `locations` with zeros and syncs: what
    /// erasure and retention removed does not stay on disk. A location in
    /// a block zeroes the whole block (move the entries that stay first:
    /// see `super::remove_records`).
    pub fn zero(&self, locations: &[Location]) -> std::io::Result<()> {
        let mut touched: BTreeMap<u64, Arc<File>> = BTreeMap::new();
        let mut done = std::collections::HashSet::new();
        for at in locations {
            if !done.insert(at.frame_key()) {
                continue;
            }
            let Ok(file) = self.segment(at.segment) else {
                continue;
            };
            file.write_all_at(&vec![0u8; at.len as usize], at.offset)?;
            // After the write: a read of the old bytes is then not cached
            // (see `remember`).
            self.zeroings.fetch_add(1, Ordering::SeqCst);
            self.forget(at.segment, Some(at.offset..at.offset + 1));
            touched.insert(at.segment, file);
        }
        for file in touched.values() {
            file.sync_data()?;
        }
        Ok(())
    }

    /// Deletes the segments, other than the active one, in which `live`
    /// finds no stored event (`live(first, end)`: whether a sequence
    /// number in `first..end` is stored). Returns how many went.
    pub fn remove_dead(
        &self,
        mut live: impl FnMut(Seq, Seq) -> std::io::Result<bool>,
    ) -> std::io::Result<usize> {
        let (ids, active) = self.ids_and_active();
        let mut removed = 0;
        for pair in ids.windows(2) {
            let (id, next) = (pair[0], pair[1]);
            if Some(id) == active || live(id, next)? {
                continue;
            }
            self.remove_segment(id)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// The segments' ids, in order, and the active one's.
    pub(super) fn ids_and_active(&self) -> (Vec<u64>, Option<u64>) {
        let ids = self
            .segments
            .read()
            .expect("segments lock")
            .keys()
            .copied()
            .collect();
        let active = self
            .active
            .lock()
            .expect("active lock")
            .as_ref()
            .map(|a| a.segment);
        (ids, active)
    }

    /// Bytes in segment files.
    pub fn bytes(&self) -> u64 {
        self.segments
            .read()
            .expect("segments lock")
            .values()
            .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

/// The bytes of a segment file with each block's entries decompressed
/// after it (so that a search for a string finds it in a block too; for
/// tests and the demo's scan for personal data), and how many blocks
/// there were. A block that does not decompress is left as it is.
pub fn with_blocks_decompressed(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut out = bytes.to_vec();
    let mut blocks = 0;
    let mut pos = 0;
    // Frame by frame; across zeroed frames byte by byte, to the next bytes
    // that are a whole frame with its checksum.
    while pos + HEADER <= bytes.len() {
        let word = u32::from_be_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes"));
        let total = HEADER + (word & !BLOCK_FLAG) as usize;
        let frame = bytes
            .get(pos..pos + total)
            .filter(|f| word != 0 && check_header(f).is_ok());
        let Some(frame) = frame else {
            pos += 1;
            continue;
        };
        if is_block(frame) {
            if let Ok(block) = decode_block(frame) {
                out.extend_from_slice(&block.data);
                blocks += 1;
            }
        }
        pos += total;
    }
    (out, blocks)
}

#[cfg(test)]
impl EventLog {
    /// Tests only: the active segment counts as full at its current
    /// length, so that the next append starts a new segment (without
    /// writing [`SEGMENT_BYTES`] first).
    pub(super) fn end_active_segment(&self) {
        if let Some(a) = self.active.lock().expect("active lock").as_mut() {
            a.capacity = a.len;
        }
    }
}

/// How [`EventLog::append_as`] writes frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Packing {
    /// One frame per event.
    Single,
    /// Blocks of a commit's new events.
    Blocks,
    /// Blocks of events moved out of a block being zeroed.
    Relocated,
}

/// Writes an entry's sequence number and links.
fn put_entry_head(buf: &mut Vec<u8>, f: &NewFrame<'_>) {
    buf.extend_from_slice(&f.seq.to_be_bytes());
    buf.push(f.links.len() as u8);
    for link in &f.links {
        buf.extend_from_slice(&(link.len() as u16).to_be_bytes());
        buf.extend_from_slice(link.as_bytes());
    }
}

/// Fills in the header of the frame that starts at `start` and runs to
/// the end of `buf`; returns the frame's length.
fn seal(buf: &mut [u8], start: usize, flag: u32) -> u32 {
    let body = (buf.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start..start + 4].copy_from_slice(&(body | flag).to_be_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    (buf.len() - start) as u32
}

/// Appends `frames` to `buf` as blocks of `kind`: split evenly into blocks
/// of at most [`BLOCK_EVENTS`]; pushes each frame's location.
fn pack(
    a: &mut Active,
    buf: &mut Vec<u8>,
    frames: &[NewFrame<'_>],
    kind: u8,
    locations: &mut Vec<Location>,
) -> std::io::Result<()> {
    if frames.is_empty() {
        return Ok(());
    }
    let per = frames.len().div_ceil(frames.len().div_ceil(BLOCK_EVENTS));
    let mut out = Vec::new();
    for chunk in frames.chunks(per) {
        a.raw.clear();
        for f in chunk {
            put_entry_head(&mut a.raw, f);
            a.raw
                .extend_from_slice(&(f.record.len() as u32).to_be_bytes());
            a.raw.extend_from_slice(&f.record);
        }
        out.clear();
        out.reserve(zstd::compress_bound(a.raw.len()));
        a.compressor.compress_to_buffer(&a.raw, &mut out)?;
        let start = buf.len();
        buf.extend_from_slice(&[0u8; HEADER]);
        buf.push(kind);
        buf.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        buf.extend_from_slice(&(a.raw.len() as u32).to_be_bytes());
        buf.extend_from_slice(&out);
        let len = seal(buf, start, BLOCK_FLAG);
        for entry in 0..chunk.len() {
            locations.push(Location {
                segment: a.segment,
                offset: a.len + start as u64,
                len,
                entry: entry as u16,
            });
        }
    }
    if a.raw.capacity() > 1 << 20 {
        a.raw = Vec::new();
    }
    Ok(())
}

/// Reads the links at the start of `bytes` (count, then each name);
/// returns them and the bytes they took.
fn read_links(bytes: &[u8]) -> Result<(Vec<String>, usize), String> {
    let n = *bytes.first().ok_or("the links are cut short")? as usize;
    let mut pos = 1;
    let mut links = Vec::with_capacity(n);
    for _ in 0..n {
        let len = bytes
            .get(pos..pos + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or("a link name is cut short")?;
        let name = bytes
            .get(pos + 2..pos + 2 + len)
            .ok_or("a link name is cut short")?;
        links.push(String::from_utf8_lossy(name).into_owned());
        pos += 2 + len;
    }
    Ok((links, pos))
}

/// Checks a whole block frame (length, CRC) and decompresses it.
fn decode_block(bytes: &[u8]) -> Result<Block, String> {
    let body = check_header(bytes)?;
    if body.len() < BLOCK_HEADER {
        return Err(format!("a block of {} bytes is too short", body.len()));
    }
    let kind = body[0];
    if kind != BLOCK_COMMIT && kind != BLOCK_RELOCATED {
        return Err(format!("unknown block kind {kind}"));
    }
    let count = usize::from(u16::from_be_bytes([body[1], body[2]]));
    let raw_len = u32::from_be_bytes(body[3..7].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_BODY as usize {
        return Err(format!(
            "a block of {raw_len} bytes decompressed is too large"
        ));
    }
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let data = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let d = d.as_mut().expect("just set");
        let mut data = Vec::with_capacity(raw_len);
        d.decompress_to_buffer(&body[BLOCK_HEADER..], &mut data)
            .map_err(|e| format!("the block does not decompress: {e}"))?;
        Ok::<_, String>(data)
    })?;
    if data.len() != raw_len {
        return Err(format!(
            "the block decompressed to {} bytes, not {raw_len}",
            data.len()
        ));
    }
    let mut entries = Vec::with_capacity(count);
    let mut pos = 0;
    while pos < data.len() {
        let seq = data
            .get(pos..pos + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .ok_or("an entry is cut short")?;
        let links = pos + 8;
        let (_, took) = read_links(&data[links..])?;
        let at = links + took;
        let len = data
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or("an entry is cut short")?;
        let record = (at + 4, at + 4 + len);
        if record.1 > data.len() {
            return Err("a record is cut short".into());
        }
        entries.push(BlockEntry { seq, links, record });
        pos = record.1;
    }
    if entries.len() != count {
        return Err(format!(
            "the block holds {} entries, not {count}",
            entries.len()
        ));
    }
    Ok(Block {
        data,
        entries,
        relocated: kind == BLOCK_RELOCATED,
    })
}

/// Checks a whole frame's header (length and CRC); returns its body.
fn check_header(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < HEADER {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    let body_len =
        (u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) & !BLOCK_FLAG) as usize;
    let crc = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if body_len != bytes.len() - HEADER {
        return Err(format!("length {body_len} does not match the frame"));
    }
    let body = &bytes[HEADER..];
    let computed = crc32fast::hash(body);
    if computed != crc {
        return Err(format!(
            "checksum mismatch (stored {crc:08x}, computed {computed:08x})"
        ));
    }
    Ok(body)
}

/// Whether a frame (its header's first bytes) is a block.
fn is_block(bytes: &[u8]) -> bool {
    bytes.len() >= 4
        && u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) & BLOCK_FLAG != 0
}

/// Parses one whole frame.
fn parse(bytes: &[u8], at: Location) -> Result<Frame, String> {
    let (seq, links, record) = check(bytes)?;
    Ok(Frame {
        seq,
        links,
        record: bytes[record..].to_vec(),
        location: at,
    })
}

/// Checks one whole frame: its sequence number, links and where in
/// `bytes` its record starts.
fn check(bytes: &[u8]) -> Result<(Seq, Vec<String>, usize), String> {
    if bytes.len() < HEADER + 9 {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    let body = check_header(bytes)?;
    let seq = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
    let (links, took) = read_links(&body[8..])?;
    Ok((seq, links, HEADER + 8 + took))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: Seq, links: &[&'static str], fill: u8) -> NewFrame<'static> {
        NewFrame {
            seq,
            links: links.to_vec(),
            record: vec![fill; 40 + seq as usize],
        }
    }

    /// A log of frames 1, 2 and 3, synced and closed; their locations.
    fn three_synced_frames() -> (tempfile::TempDir, Vec<Location>) {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let (locs, _) = log
            .append(&[frame(1, &[], 1), frame(2, &[], 2), frame(3, &[], 3)])
            .unwrap();
        log.sync().unwrap();
        (dir, locs)
    }

    #[test]
    fn frames_read_back_by_location_and_by_replay() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let (locs, end) = log
            .append(&[frame(1, &["up"], 7), frame(2, &[], 8)])
            .unwrap();
        log.sync().unwrap();
        assert_eq!(log.read(1, locs[0]).unwrap(), vec![7; 41]);
        assert_eq!(log.read(2, locs[1]).unwrap(), vec![8; 42]);
        // The wrong sequence number is refused, not served.
        assert!(log.read(2, locs[0]).is_err());
        let (more, _) = log.append(&[frame(3, &["a", "b"], 9)]).unwrap();
        drop(log);
        let log = EventLog::open(dir.path()).unwrap();
        let all = log.replay(None, |_| true).unwrap().frames;
        assert_eq!(all.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[0].links, ["up"]);
        assert_eq!(all[2].links, ["a", "b"]);
        assert_eq!(all[2].location, more[0]);
        let after = log.replay(Some(end), |_| true).unwrap().frames;
        assert_eq!(after.iter().map(|f| f.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(Location::decode(&more[0].encode()), Some(more[0]));
        assert_eq!(End::decode(&end.encode()), Some(end));
    }

    /// A record much like the others of its commit, as real ones are.
    fn alike(seq: Seq) -> NewFrame<'static> {
        NewFrame {
            seq,
            links: vec!["up"],
            record: format!(
                "event {seq:08}: cheese, dairy, EE-10, 25-34, a review of a mild gouda"
            )
            .repeat(8)
            .into_bytes(),
        }
    }

    #[test]
    fn blocks_read_back_by_location_and_by_replay_and_relocated_ones_are_not_new_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let frames: Vec<NewFrame> = (1..=20).map(alike).collect();
        let (locs, end) = log.append_as(&frames, Packing::Blocks).unwrap();
        log.sync().unwrap();
        // 20 events: two blocks of 10, entries 0..10 each.
        assert_eq!(
            locs.iter().map(|l| l.entry).collect::<Vec<_>>(),
            (0..10).chain(0..10).collect::<Vec<_>>()
        );
        assert!(locs[..10].iter().all(|l| l.same_frame(&locs[0])));
        assert!(!locs[10].same_frame(&locs[0]));
        let raw: usize = frames.iter().map(|f| f.record.len()).sum();
        assert!(
            (end.offset as usize) * 4 < raw,
            "compressed: {} bytes for {raw} of records",
            end.offset
        );
        for (f, at) in frames.iter().zip(&locs) {
            assert_eq!(Location::decode(&at.encode()), Some(*at));
            assert_eq!(log.read(f.seq, *at).unwrap(), f.record);
        }
        // The wrong sequence number for an entry is refused, not served.
        assert!(matches!(log.read(2, locs[0]), Err(FrameError::Bad { .. })));
        // Events moved out of a block being zeroed: not new events.
        let (moved, _) = log
            .append_as(&[alike(3), alike(15)], Packing::Relocated)
            .unwrap();
        log.sync().unwrap();
        assert_eq!(log.read(15, moved[1]).unwrap(), alike(15).record);
        drop(log);
        let log = EventLog::open(dir.path()).unwrap();
        let all = log.replay(None, |_| true).unwrap();
        assert_eq!(
            all.frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        assert_eq!(all.frames[13].links, ["up"]);
        assert_eq!(all.frames[13].location, locs[13]);
        assert_eq!(all.frames[13].record, frames[13].record);
        assert_eq!(all.relocated.len(), 1);
        assert!(all.relocated[0].0.same_frame(&moved[0]));
        assert_eq!(all.relocated[0].1, [3, 15]);
        let after = log.replay(Some(end), |_| true).unwrap();
        assert!(after.frames.is_empty());
        assert_eq!(after.relocated.len(), 1);

        // A flipped byte in a block is caught by its checksum, for every
        // entry of it; the other block still reads.
        let path = dir.path().join(segment_name(1));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, locs[0].offset + 30).unwrap();
        f.write_all_at(&[byte[0] ^ 0x40], locs[0].offset + 30)
            .unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        for (f, at) in frames.iter().zip(&locs).take(10) {
            let e = log.read(f.seq, *at).unwrap_err().to_string();
            assert!(e.contains("checksum mismatch"), "{e}");
        }
        assert_eq!(log.read(11, locs[10]).unwrap(), frames[10].record);
        // Zeroing an entry zeroes its whole block.
        log.zero(&locs[12..13]).unwrap();
        assert!(matches!(
            log.read(11, locs[10]),
            Err(FrameError::RolledBack { .. })
        ));
    }

    #[test]
    fn a_block_the_store_refuses_part_of_ends_the_log_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let (first, _) = log.append(&[frame(1, &[], 1)]).unwrap();
        let frames: Vec<NewFrame> = (2..=21).map(alike).collect();
        let (locs, _) = log.append_as(&frames, Packing::Blocks).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = EventLog::open(dir.path()).unwrap();
        // Seq 5 (in the first block) is refused: that block and all after
        // it end the log, zeroed; appends go on after frame 1.
        let seqs: Vec<Seq> = log
            .replay(None, |f| f.seq != 5)
            .unwrap()
            .frames
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!(seqs, [1]);
        let raw = std::fs::read(dir.path().join(segment_name(1))).unwrap();
        assert!(raw[locs[0].offset as usize..].iter().all(|b| *b == 0));
        let (again, _) = log.append(&[frame(2, &[], 9)]).unwrap();
        assert_eq!(again[0].offset, first[0].offset + u64::from(first[0].len));
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_next_append_follows_the_last_whole_frame() {
        let (dir, locs) = three_synced_frames();
        // A crash tore the last frame: its second half never reached disk.
        let path = dir.path().join(segment_name(1));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let cut = locs[2].offset + u64::from(locs[2].len) / 2;
        f.set_len(cut).unwrap();
        // And a flipped byte in the middle one is caught by its checksum.
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(
            log.replay(None, |_| true)
                .unwrap()
                .frames
                .iter()
                .map(|f| f.seq)
                .collect::<Vec<_>>(),
            [1, 2]
        );
        // Its remains are zeros now: nothing after the next appends can
        // read as a frame.
        let raw = std::fs::read(&path).unwrap();
        assert!(raw[locs[2].offset as usize..].iter().all(|b| *b == 0));
        let (again, _) = log.append(&[frame(3, &[], 4)]).unwrap();
        assert_eq!(again[0].offset, locs[2].offset);
        assert_eq!(log.read(3, again[0]).unwrap(), vec![4; 43]);

        f.write_all_at(&[0xff], locs[1].offset + 20).unwrap();
        assert!(matches!(log.read(2, locs[1]), Err(FrameError::Bad { .. })));
    }

    #[test]
    fn replay_ends_at_what_the_store_refuses_or_at_bytes_behind_a_zero_header() {
        // Frames 1, 2, 3; `refuse`: frame 2 is refused by the store, or
        // its header is zeros with its body and frame 3 still on disk (an
        // unsynced commit's later pages). Either way the log ends after
        // frame 1, the rest is zeroed, and appends go on there.
        for refuse in [true, false] {
            let (dir, locs) = three_synced_frames();
            let path = dir.path().join(segment_name(1));
            if !refuse {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(&[0u8; HEADER], locs[1].offset).unwrap();
            }
            let log = EventLog::open(dir.path()).unwrap();
            let seqs: Vec<Seq> = log
                .replay(None, |f| !(refuse && f.seq == 2))
                .unwrap()
                .frames
                .iter()
                .map(|f| f.seq)
                .collect();
            assert_eq!(seqs, [1], "refuse: {refuse}");
            let raw = std::fs::read(&path).unwrap();
            assert!(raw[locs[1].offset as usize..].iter().all(|b| *b == 0));
            let (again, _) = log.append(&[frame(2, &[], 9)]).unwrap();
            assert_eq!(again[0].offset, locs[1].offset);
        }
    }

    #[test]
    fn zeroed_frames_are_gone_and_dead_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let (first, _) = log.append(&[frame(1, &[], 5), frame(2, &[], 6)]).unwrap();
        // Force a second segment.
        let full = log.active.lock().unwrap().as_ref().unwrap().capacity;
        log.active.lock().unwrap().as_mut().unwrap().len = full;
        let (second, _) = log.append(&[frame(3, &[], 7)]).unwrap();
        assert_eq!(second[0].segment, 3);
        log.zero(&first[..1]).unwrap();
        assert!(log.read(1, first[0]).is_err());
        assert_eq!(log.read(2, first[1]).unwrap(), vec![6; 42]);
        let raw = std::fs::read(dir.path().join(segment_name(1))).unwrap();
        assert!(raw[..first[0].len as usize].iter().all(|b| *b == 0));
        // Seq 2 still lives in segment 1: it stays.
        assert_eq!(log.remove_dead(|a, b| Ok(a <= 2 && 2 < b)).unwrap(), 0);
        assert_eq!(log.remove_dead(|_, _| Ok(false)).unwrap(), 1);
        assert!(!dir.path().join(segment_name(1)).exists());
        // The active segment is never deleted.
        assert_eq!(log.read(3, second[0]).unwrap(), vec![7; 43]);
    }
}
