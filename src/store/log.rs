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
//! Erasure and retention overwrite the frames of the events they remove
//! with zeros (after the sled transaction that removed their locations is
//! flushed), and retention deletes a segment once no stored event is left
//! in it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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

/// Where an event's frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    /// The segment's id (the sequence number it starts at).
    pub segment: u64,
    pub offset: u64,
    /// The frame's length, header included.
    pub len: u32,
}

impl Location {
    pub fn encode(&self) -> [u8; 21] {
        let mut out = [0u8; 21];
        out[0] = LOCATION_FORMAT;
        out[1..9].copy_from_slice(&self.segment.to_be_bytes());
        out[9..17].copy_from_slice(&self.offset.to_be_bytes());
        out[17..].copy_from_slice(&self.len.to_be_bytes());
        out
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
        Some(Location {
            segment: u64::from_be_bytes(bytes[1..9].try_into().ok()?),
            offset: u64::from_be_bytes(bytes[9..17].try_into().ok()?),
            len: u32::from_be_bytes(bytes[17..].try_into().ok()?),
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

    /// Appends the frames (not yet synced: see [`Self::sync`]) and returns
    /// their locations and the log's new end. On error nothing counts as
    /// appended: the next append writes over whatever was written.
    pub fn append(&self, frames: &[NewFrame<'_>]) -> std::io::Result<(Vec<Location>, End)> {
        self.usable()?;
        let appended = self.append_unchecked(frames);
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

    fn append_unchecked(&self, frames: &[NewFrame<'_>]) -> std::io::Result<(Vec<Location>, End)> {
        let mut active = self.active.lock().expect("active lock");
        let rotate = active.as_ref().is_none_or(|a| a.len >= a.capacity);
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
        for f in frames {
            let start = buf.len();
            buf.extend_from_slice(&[0u8; HEADER]);
            buf.extend_from_slice(&f.seq.to_be_bytes());
            buf.push(f.links.len() as u8);
            for link in &f.links {
                buf.extend_from_slice(&(link.len() as u16).to_be_bytes());
                buf.extend_from_slice(link.as_bytes());
            }
            buf.extend_from_slice(&f.record);
            let body = (buf.len() - start - HEADER) as u32;
            let crc = crc32fast::hash(&buf[start + HEADER..]);
            buf[start..start + 4].copy_from_slice(&body.to_be_bytes());
            buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
            locations.push(Location {
                segment: a.segment,
                offset: a.len + start as u64,
                len: (buf.len() - start) as u32,
            });
        }
        let written = a.file.write_all_at(&buf, a.len);
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
        self.poison_on(zeroed)
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
        Ok(Active {
            segment: id,
            file,
            len: 0,
            capacity: SEGMENT_BYTES,
            buf: Vec::new(),
        })
    }

    /// The record of the frame at `at`, checked (CRC and sequence number).
    pub fn read(&self, seq: Seq, at: Location) -> Result<Vec<u8>, FrameError> {
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
        let (found, _, record) = check(&buf).map_err(|reason| FrameError::Bad {
            segment: at.segment,
            offset: at.offset,
            reason,
        })?;
        if found != seq {
            return Err(FrameError::Bad {
                segment: at.segment,
                offset: at.offset,
                reason: format!("holds seq {found}, not {seq}"),
            });
        }
        // The record, in place (no second buffer).
        buf.drain(..record);
        Ok(buf)
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
    ) -> std::io::Result<Vec<Frame>> {
        let segments: Vec<(u64, Arc<File>)> = self
            .segments
            .read()
            .expect("segments lock")
            .iter()
            .filter(|(id, _)| from.is_none_or(|f| **id >= f.segment))
            .map(|(id, f)| (*id, f.clone()))
            .collect();
        let mut frames = Vec::new();
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
                let body = u32::from_be_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes"));
                if body == 0 {
                    break;
                }
                let total = HEADER + body as usize;
                let at = Location {
                    segment: *segment,
                    offset: start + pos as u64,
                    len: total as u32,
                };
                let parsed = bytes
                    .get(pos..pos + total)
                    .filter(|_| body <= MAX_BODY)
                    .ok_or_else(|| "cut short".to_string())
                    .and_then(|b| parse(b, at));
                match parsed {
                    // Sequence numbers only grow along the log.
                    Ok(frame)
                        if frames.last().is_none_or(|l: &Frame| l.seq < frame.seq)
                            && accept(&frame) =>
                    {
                        frames.push(frame)
                    }
                    _ => {
                        torn = true;
                        break;
                    }
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
            (Some((id, _)), Some((segment, file, at))) if id == segment => Some(Active {
                segment,
                capacity: SEGMENT_BYTES,
                file,
                len: at,
                buf: Vec::new(),
            }),
            // Replay started in a later segment than any (a store whose
            // log was emptied): start anew.
            _ => None,
        };
        *self.active.lock().expect("active lock") = active;
        Ok(frames)
    }

    fn remove_segment(&self, segment: u64) -> std::io::Result<()> {
        self.segments
            .write()
            .expect("segments lock")
            .remove(&segment);
        std::fs::remove_file(self.dir.join(segment_name(segment)))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Overwrites the frames at `locations` with zeros and syncs: what
    /// erasure and retention removed does not stay on disk.
    pub fn zero(&self, locations: &[Location]) -> std::io::Result<()> {
        let mut touched: BTreeMap<u64, Arc<File>> = BTreeMap::new();
        for at in locations {
            let Ok(file) = self.segment(at.segment) else {
                continue;
            };
            file.write_all_at(&vec![0u8; at.len as usize], at.offset)?;
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
    let body_len = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if body_len != bytes.len() - HEADER || body_len < 9 {
        return Err(format!("length {body_len} does not match the frame"));
    }
    let body = &bytes[HEADER..];
    let computed = crc32fast::hash(body);
    if computed != crc {
        return Err(format!(
            "checksum mismatch (stored {crc:08x}, computed {computed:08x})"
        ));
    }
    let seq = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
    let n = body[8] as usize;
    let mut pos = 9;
    let mut links = Vec::with_capacity(n);
    for _ in 0..n {
        let len = body
            .get(pos..pos + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or("a link name is cut short")?;
        let name = body
            .get(pos + 2..pos + 2 + len)
            .ok_or("a link name is cut short")?;
        links.push(String::from_utf8_lossy(name).into_owned());
        pos += 2 + len;
    }
    Ok((seq, links, HEADER + pos))
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
        let all = log.replay(None, |_| true).unwrap();
        assert_eq!(all.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[0].links, ["up"]);
        assert_eq!(all[2].links, ["a", "b"]);
        assert_eq!(all[2].location, more[0]);
        let after = log.replay(Some(end), |_| true).unwrap();
        assert_eq!(after.iter().map(|f| f.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(Location::decode(&more[0].encode()), Some(more[0]));
        assert_eq!(End::decode(&end.encode()), Some(end));
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
