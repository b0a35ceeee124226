//! The hourly rollup cells (families over every dimension: about one new
//! cell per event) kept in blocks, not one sled key per cell.
//!
//! One key per cell made each rollup checkpoint read and write one key per
//! event at a random place of a tree that, at 10M events, holds tens of
//! millions of keys: about 34 µs per cell, 8 s per hourly checkpoint, and
//! the bound of ingest there. Now a checkpoint writes, per (family, hour)
//! it touches, one new block holding that hour's deltas — no read of the
//! cells already stored — and the blocks of an hour are merged in the
//! background of later checkpoints, level by level, as in a log-structured
//! merge tree:
//!
//! - a new block has level 0; once the newest [`FANOUT`] blocks of an hour
//!   share a level, they are merged into one block a level up (each cell is
//!   rewritten about log_FANOUT(blocks) times);
//! - a merge that would pass [`MAX_BLOCK_BYTES`] is not done: its blocks
//!   are marked full and never merged again (sled writes a leaf of 16
//!   larger blocks to a file of its own, see [`MAX_BLOCK_BYTES`]); a
//!   checkpoint's deltas of a busy hour that pass it are stored in full
//!   parts at once.
//!
//! Keys, in the `rollups` tree, under the cells' period prefix (family,
//! period kind `Hour`, start hour; [`crate::rollup::period_prefix`]):
//! - the prefix alone: the hour's *manifest* ([`Manifest`]): the blocks
//!   that may still merge, in key order (id, part, level, bytes), and the
//!   number and a digest of the full ones, which it does not list;
//! - prefix ‖ id (u64 BE) ‖ part (u16 BE): a block. `id` is the sequence
//!   number the checkpoint that wrote it covers up to (a merge keeps the
//!   newest), so a checkpoint resumed after a crash writes the same keys
//!   again. A rewrite (erasure) splits an hour into parts.
//!
//! A block holds its cells sorted by key: the key after the prefix, as the
//! bytes it shares with the cell's before (see [`BLOCK_V2`]; blocks of
//! format 1 hold it whole), and the value as stored elsewhere (sealed with
//! its checksum), each behind its length (varint). Blocks and manifests
//! end with a CRC-32 of key and body.
//! A key may be in several blocks of an hour: cells add up, as they do
//! with the deltas waiting in memory.

use std::collections::BTreeMap;

use prost::encoding::{decode_varint, encode_varint};

use super::rollups::{CellWrite, RawCell};
use super::{Error, Result, Seq};
use crate::rollup::{open_value, seal_bytes, seal_value, Agg};

/// Bytes of the period prefix (family, period kind, start hour).
pub(super) use super::rollups::PREFIX;
/// Bytes of a block's key: prefix, id, part.
const BLOCK_KEY: usize = PREFIX + 8 + 2;
/// Blocks of one level merged into one of the next.
pub(super) const FANOUT: usize = 4;
/// Blocks are not merged past this size. sled writes a *node* (a leaf
/// holds up to 16 keys before it splits) larger than a quarter of its
/// 512 KiB segments to a file of its own, again at each consolidation,
/// split and segment cleaning of that leaf; 16 blocks of 7 KiB stay under
/// it. With 96 KiB blocks, a store grown to 10M events held 1.8 GB of
/// such files, and writing them took a fifth of the checkpointer's time
/// (creating the files included) and, through sled's segment cleaning,
/// of the writer's.
pub(super) const MAX_BLOCK_BYTES: usize = 7 << 10;
/// The level of a block that is never merged again.
const FULL: u8 = u8::MAX;
/// Bytes of a manifest entry.
const ENTRY: usize = 8 + 2 + 1 + 4;

/// Whether cells of `key`'s period are kept in blocks (hours are; the
/// views' days, weeks and months are one key per cell).
pub(super) fn in_blocks(key: &[u8]) -> bool {
    key.get(1) == Some(&0) && key.len() >= PREFIX
}

/// One block of an hour, as its manifest lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub id: Seq,
    pub part: u16,
    pub level: u8,
    pub bytes: u32,
}

impl Entry {
    fn key(&self, prefix: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(BLOCK_KEY);
        key.extend_from_slice(&prefix[..PREFIX]);
        key.extend_from_slice(&self.id.to_be_bytes());
        key.extend_from_slice(&self.part.to_be_bytes());
        key
    }
}

/// First byte of a manifest's body in format 2 (since session 21): then
/// the number of the hour's full blocks (u32), the newest id of any of
/// its blocks (u64), the digest of the full blocks' keys (u64, see
/// [`full_digest`]), and the entries of its blocks that may still merge.
/// (A binary from before cannot read it: no downgrade.)
/// A format 1 body (a multiple of [`ENTRY`] bytes; a format 2 body is
/// [`V2_HEAD`] bytes more, never one) lists every block, full ones included; it is read as
/// format 2 and written as such at the hour's next block.
const MANIFEST_V2: u8 = 2;
/// Bytes before a format 2 manifest's entries.
const V2_HEAD: usize = 1 + 4 + 8 + 8;

/// An hour's manifest: the blocks that may still merge, listed, and the
/// full ones, counted. Full blocks are never merged or read by the
/// manifest again, so they are not listed: a manifest that listed them
/// grew with every checkpoint that touched the hour (about 200 entries
/// near 10M events) and was rewritten with each new block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Manifest {
    /// The blocks that may still merge, oldest first.
    pub open: Vec<Entry>,
    /// How many full blocks the hour holds.
    pub full: u32,
    /// The newest id of any block of the hour (0: no block yet).
    pub newest: Seq,
    /// The sum of [`full_digest`] over the full blocks' (id, part): with
    /// the count, what the hour's unlisted blocks are checked against.
    pub digest: u64,
}

impl Manifest {
    fn has_blocks(&self) -> bool {
        self.full > 0 || !self.open.is_empty()
    }

    /// Counts the block `(id, part)` as full.
    fn add_full(&mut self, id: Seq, part: u16) {
        self.full += 1;
        self.digest = self.digest.wrapping_add(full_digest(id, part));
    }

    /// Whether `keys`, an hour's stored blocks this manifest does not
    /// list, are the full blocks it counts.
    pub(super) fn are_full(&self, keys: &[&[u8]]) -> bool {
        let digest = keys.iter().try_fold(0u64, |sum, k| {
            let (id, part) = block_id_part(k)?;
            Some(sum.wrapping_add(full_digest(id, part)))
        });
        keys.len() == self.full as usize && digest == Some(self.digest)
    }
}

/// A full block's share of a manifest's digest: a mix of its id and part
/// (splitmix64), so that a missing block and a stray one do not cancel
/// out as they would in a count.
fn full_digest(id: Seq, part: u16) -> u64 {
    let mut z = id ^ (u64::from(part) << 48) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The id and part of the block under `key`.
fn block_id_part(key: &[u8]) -> Option<(Seq, u16)> {
    (key.len() == BLOCK_KEY).then(|| {
        (
            Seq::from_be_bytes(key[PREFIX..PREFIX + 8].try_into().expect("8 bytes")),
            u16::from_be_bytes(key[PREFIX + 8..].try_into().expect("2 bytes")),
        )
    })
}

fn encode_manifest(prefix: &[u8], manifest: &Manifest) -> Vec<u8> {
    let entries = &manifest.open;
    let mut body = Vec::with_capacity(V2_HEAD + entries.len() * ENTRY + 4);
    body.push(MANIFEST_V2);
    body.extend_from_slice(&manifest.full.to_be_bytes());
    body.extend_from_slice(&manifest.newest.to_be_bytes());
    body.extend_from_slice(&manifest.digest.to_be_bytes());
    for e in entries {
        body.extend_from_slice(&e.id.to_be_bytes());
        body.extend_from_slice(&e.part.to_be_bytes());
        body.push(e.level);
        body.extend_from_slice(&e.bytes.to_be_bytes());
    }
    seal_bytes(&prefix[..PREFIX], body)
}

fn decode_manifest(key: &[u8], value: &[u8]) -> Option<Manifest> {
    let body = open_value(key, value)?;
    let (head, list) = if body.len() % ENTRY == 0 {
        (None, body)
    } else if body.len() >= V2_HEAD
        && body.len() % ENTRY == V2_HEAD % ENTRY
        && body[0] == MANIFEST_V2
    {
        let full = u32::from_be_bytes(body[1..5].try_into().expect("4 bytes"));
        let newest = Seq::from_be_bytes(body[5..13].try_into().expect("8 bytes"));
        let digest = u64::from_be_bytes(body[13..V2_HEAD].try_into().expect("8 bytes"));
        (Some((full, newest, digest)), &body[V2_HEAD..])
    } else {
        return None;
    };
    let entries: Vec<Entry> = list
        .chunks_exact(ENTRY)
        .map(|e| Entry {
            id: Seq::from_be_bytes(e[..8].try_into().expect("8 bytes")),
            part: u16::from_be_bytes(e[8..10].try_into().expect("2 bytes")),
            level: e[10],
            bytes: u32::from_be_bytes(e[11..15].try_into().expect("4 bytes")),
        })
        .collect();
    if !entries
        .windows(2)
        .all(|w| (w[0].id, w[0].part) < (w[1].id, w[1].part))
    {
        return None;
    }
    let newest_listed = entries.last().map_or(0, |e| e.id);
    match head {
        None => {
            // Format 1: every block listed; the full ones become a count.
            let mut manifest = Manifest {
                newest: newest_listed,
                ..Manifest::default()
            };
            for e in entries {
                if e.level == FULL {
                    manifest.add_full(e.id, e.part);
                } else {
                    manifest.open.push(e);
                }
            }
            Some(manifest)
        }
        Some((full, newest, digest)) => (entries.iter().all(|e| e.level != FULL)
            && newest >= newest_listed
            && (newest > 0 || (full == 0 && entries.is_empty())))
        .then_some(Manifest {
            open: entries,
            full,
            newest,
            digest,
        }),
    }
}

/// The manifest of the hour `prefix`, empty when none is stored.
fn read_manifest(tree: &sled::Tree, prefix: &[u8]) -> Result<Manifest> {
    match tree.get(&prefix[..PREFIX])? {
        None => Ok(Manifest::default()),
        Some(v) => decode_manifest(&prefix[..PREFIX], &v)
            .ok_or_else(|| corrupt(&prefix[..PREFIX], "bad block manifest")),
    }
}

/// First byte of a block's body in format 2 (since session 22): each
/// cell's key after the prefix is stored as the number of bytes it shares
/// with the previous cell's (varint) and the rest behind its length
/// (varint), then its sealed value behind its length. Sorted cells share
/// most of their keys (family, then GTIN, category, brand, region, …):
/// at 10M events the hour blocks held 862 MB of keys, 555 MB of them
/// repeating the previous cell's. A format 1 body (each key after the
/// prefix whole) starts with its first key's length, a varint of at least
/// 1 (a cell's dimensions are never empty), so never with 0; both are read.
/// (A binary from before cannot read format 2: no downgrade.)
const BLOCK_V2: u8 = 0;

/// How many leading bytes `a` and `b` share.
fn shared_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The bytes a cell takes in a block body after a cell whose key after
/// the prefix is `prev` (see [`BLOCK_V2`]).
fn cell_len(prev: &[u8], suffix: &[u8], value: &[u8]) -> usize {
    use prost::encoding::encoded_len_varint;
    let shared = shared_len(prev, suffix);
    let rest = suffix.len() - shared;
    encoded_len_varint(shared as u64)
        + encoded_len_varint(rest as u64)
        + rest
        + encoded_len_varint(value.len() as u64)
        + value.len()
}

/// Bytes of a block besides its cells: the format byte and the checksum.
const BLOCK_OVERHEAD: usize = 1 + 4;

/// A block of `cells` (full keys, sealed values, sorted by key) under `key`,
/// in format 2.
fn encode_block<'a>(key: &[u8], cells: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut body = vec![BLOCK_V2];
    let mut prev: &[u8] = &[];
    for (k, v) in cells {
        let suffix = &k[PREFIX..];
        let shared = shared_len(prev, suffix);
        encode_varint(shared as u64, &mut body);
        encode_varint((suffix.len() - shared) as u64, &mut body);
        body.extend_from_slice(&suffix[shared..]);
        encode_varint(v.len() as u64, &mut body);
        body.extend_from_slice(v);
        prev = suffix;
    }
    seal_bytes(key, body)
}

/// The cells of a block (whole key, sealed value), checked against the
/// block's checksum; `None` when the bytes are not a block. Reads both
/// formats (see [`BLOCK_V2`]).
fn block_cells<'a>(key: &[u8], value: &'a [u8]) -> Option<Vec<(Vec<u8>, &'a [u8])>> {
    let mut body = open_value(key, value)?;
    let v2 = body.first() == Some(&BLOCK_V2);
    if v2 {
        body = &body[1..];
    }
    let mut out: Vec<(Vec<u8>, &[u8])> = Vec::new();
    let number =
        |body: &mut &'a [u8]| -> Option<usize> { usize::try_from(decode_varint(body).ok()?).ok() };
    let take = |body: &mut &'a [u8]| -> Option<&'a [u8]> {
        let n = number(body)?;
        let (head, rest) = (body.get(..n)?, body.get(n..)?);
        *body = rest;
        Some(head)
    };
    while !body.is_empty() {
        let full = if v2 {
            let shared = number(&mut body)?;
            let rest = take(&mut body)?;
            let prev = out.last().map_or(&key[..PREFIX], |(k, _)| k.as_slice());
            let kept = prev.get(..PREFIX.checked_add(shared)?)?;
            let mut full = Vec::with_capacity(kept.len() + rest.len());
            full.extend_from_slice(kept);
            full.extend_from_slice(rest);
            full
        } else {
            full_key(key, take(&mut body)?)
        };
        let value = take(&mut body)?;
        out.push((full, value));
    }
    Some(out)
}

/// A cell's whole key: the prefix of the block key `block` and the
/// cell's `suffix` as a format 1 block holds it.
fn full_key(block: &[u8], suffix: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(PREFIX + suffix.len());
    full.extend_from_slice(&block[..PREFIX]);
    full.extend_from_slice(suffix);
    full
}

/// What a stored entry under a block period is: its manifest or a block.
enum Kind {
    Manifest,
    Block,
}

fn kind(key: &[u8]) -> Option<Kind> {
    match key.len() {
        PREFIX => Some(Kind::Manifest),
        BLOCK_KEY => Some(Kind::Block),
        _ => None,
    }
}

/// Adds the cells of a stored entry of an hour (a block; a manifest has
/// none) to `out`, keys whole.
pub(super) fn expand(key: &[u8], value: &[u8], out: &mut Vec<RawCell>) -> Result<()> {
    match kind(key) {
        Some(Kind::Manifest) => Ok(()),
        Some(Kind::Block) => {
            let cells = block_cells(key, value).ok_or_else(|| corrupt(key, "bad cell block"))?;
            out.reserve(cells.len());
            for (full, v) in cells {
                out.push((full.into(), v.into()));
            }
            Ok(())
        }
        None => Err(corrupt(key, "not a cell block or a manifest")),
    }
}

/// The cells of an hour's stored blocks, merged by key.
fn read_cells(
    tree: &sled::Tree,
    prefix: &[u8],
    entries: &[Entry],
    into: &mut BTreeMap<Vec<u8>, Agg>,
) -> Result<()> {
    for e in entries {
        let key = e.key(prefix);
        let value = tree
            .get(&key)?
            .ok_or_else(|| corrupt(&key, "block listed in the manifest is missing"))?;
        merge_block(&key, &value, into)?;
    }
    Ok(())
}

/// Adds the cells of the block `key` holding `value` into `into`.
fn merge_block(key: &[u8], value: &[u8], into: &mut BTreeMap<Vec<u8>, Agg>) -> Result<()> {
    let cells = block_cells(key, value).ok_or_else(|| corrupt(key, "bad cell block"))?;
    for (full, v) in cells {
        let agg = open_value(&full, v)
            .and_then(Agg::decode_bytes)
            .ok_or_else(|| corrupt(&full, "bad cell"))?;
        match into.entry(full) {
            std::collections::btree_map::Entry::Occupied(mut cell) => {
                cell.get_mut().merge_cell(&agg)
            }
            std::collections::btree_map::Entry::Vacant(cell) => {
                cell.insert(agg);
            }
        }
    }
    Ok(())
}

/// The cells sealed as stored (a sketch's estimate computed first).
fn sealed_cells(cells: &mut BTreeMap<Vec<u8>, Agg>) -> Vec<(&[u8], Vec<u8>)> {
    cells
        .iter_mut()
        .map(|(k, agg)| {
            agg.seal();
            (k.as_slice(), seal_value(k, agg))
        })
        .collect()
}

/// Adds to `batch` the writes that store `cells` (the deltas of the hour
/// `prefix`, sorted by key, from the events up to `id`) as a new block of
/// the hour, and the merges of its newest blocks that it completes.
pub(super) fn add_block<'a>(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    prefix: &[u8],
    cells: impl IntoIterator<Item = (&'a Vec<u8>, &'a Agg)>,
    id: Seq,
) -> Result<()> {
    let prefix = &prefix[..PREFIX];
    let mut manifest = read_manifest(tree, prefix)?;
    if manifest.has_blocks() && manifest.newest >= id {
        return Err(corrupt(
            prefix,
            "a block of this hour covers events this checkpoint adds",
        ));
    }
    // The newest block stays decoded in memory while merges fold the
    // blocks before it into it.
    let mut newest: BTreeMap<Vec<u8>, Agg> = BTreeMap::new();
    for (k, delta) in cells {
        newest.insert(k.clone(), delta.clone());
    }
    let mut encoded = encode(prefix, id, &mut newest);
    if encoded.len() > MAX_BLOCK_BYTES {
        // Deltas of a busy hour: stored in full parts as they are.
        for (entry, block) in parts(prefix, id, &mut newest) {
            batch.insert(entry.key(prefix), block);
            manifest.add_full(entry.id, entry.part);
        }
        manifest.newest = id;
        batch.insert(prefix, encode_manifest(prefix, &manifest));
        return Ok(());
    }
    let mut level = 0u8;
    let mut removed = Vec::new();
    loop {
        let entries = &mut manifest.open;
        let tail = entries.iter().rev().take_while(|e| e.level == level);
        if level == FULL || tail.count() + 1 < FANOUT {
            break;
        }
        let merging = entries.split_off(entries.len() + 1 - FANOUT);
        let bytes: usize = merging.iter().map(|e| e.bytes as usize).sum::<usize>() + encoded.len();
        if bytes > MAX_BLOCK_BYTES {
            // Too large to merge: these stay as they are, for good,
            // counted, no longer listed.
            for e in &merging {
                manifest.add_full(e.id, e.part);
            }
            level = FULL;
            break;
        }
        read_cells(tree, prefix, &merging, &mut newest)?;
        removed.extend(merging.iter().map(|e| e.key(prefix)));
        encoded = encode(prefix, id, &mut newest);
        level += 1;
    }
    let entry = Entry {
        id,
        part: 0,
        level,
        bytes: encoded.len() as u32,
    };
    for key in removed {
        batch.remove(key);
    }
    batch.insert(entry.key(prefix), encoded);
    if level == FULL {
        manifest.add_full(entry.id, entry.part);
    } else {
        manifest.open.push(entry);
    }
    manifest.newest = id;
    batch.insert(prefix, encode_manifest(prefix, &manifest));
    Ok(())
}

fn encode(prefix: &[u8], id: Seq, cells: &mut BTreeMap<Vec<u8>, Agg>) -> Vec<u8> {
    let key = Entry {
        id,
        part: 0,
        level: 0,
        bytes: 0,
    }
    .key(prefix);
    let sealed = sealed_cells(cells);
    encode_block(&key, sealed.iter().map(|(k, v)| (*k, v.as_slice())))
}

/// `cells` as full blocks under `id` (parts 0, 1, …) of at most
/// [`MAX_BLOCK_BYTES`] each (or one cell).
fn parts(prefix: &[u8], id: Seq, cells: &mut BTreeMap<Vec<u8>, Agg>) -> Vec<(Entry, Vec<u8>)> {
    let sealed = sealed_cells(cells);
    let mut out = Vec::new();
    let mut start = 0;
    while start < sealed.len() {
        // Cells join the part while it stays within the limit (the first
        // always), each costed after the one before it in the part.
        let mut end = start;
        let mut bytes = BLOCK_OVERHEAD;
        while end < sealed.len() {
            let prev: &[u8] = if end == start {
                &[]
            } else {
                &sealed[end - 1].0[PREFIX..]
            };
            let cost = cell_len(prev, &sealed[end].0[PREFIX..], &sealed[end].1);
            if end > start && bytes + cost > MAX_BLOCK_BYTES {
                break;
            }
            bytes += cost;
            end += 1;
        }
        let entry = Entry {
            id,
            part: out.len() as u16,
            level: FULL,
            bytes: 0,
        };
        let block = encode_block(
            &entry.key(prefix),
            sealed[start..end].iter().map(|(k, v)| (*k, v.as_slice())),
        );
        out.push((
            Entry {
                bytes: block.len() as u32,
                ..entry
            },
            block,
        ));
        start = end;
    }
    out
}

/// An hour's cells, read whole (all its blocks merged), for a rewrite.
pub(super) struct Hour {
    prefix: Vec<u8>,
    /// The keys of all its blocks.
    blocks: Vec<Vec<u8>>,
    /// The newest id of its blocks.
    newest: Seq,
    pub cells: BTreeMap<Vec<u8>, Agg>,
}

/// How an hour's stored blocks (`stored`, their keys) differ from its
/// manifest: the listed blocks that are missing, and the unlisted ones
/// when they are not the full ones it counts (their number and digest).
/// Used by a whole-hour read and by `admin verify`.
pub(super) fn mismatch<'a>(
    manifest: &Manifest,
    prefix: &[u8],
    stored: &[&'a [u8]],
) -> (Vec<Vec<u8>>, Option<Vec<&'a [u8]>>) {
    let listed: std::collections::BTreeSet<Vec<u8>> =
        manifest.open.iter().map(|e| e.key(prefix)).collect();
    let found: std::collections::BTreeSet<&[u8]> = stored.iter().copied().collect();
    let missing = listed
        .iter()
        .filter(|k| !found.contains(k.as_slice()))
        .cloned()
        .collect();
    let unlisted: Vec<&[u8]> = stored
        .iter()
        .copied()
        .filter(|k| !listed.contains(*k))
        .collect();
    let stray = (!manifest.are_full(&unlisted)).then_some(unlisted);
    (missing, stray)
}

/// The stored blocks of the hour `prefix` (every key under it but the
/// manifest), in key order.
fn stored_blocks(
    tree: &sled::Tree,
    prefix: &[u8],
) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec)>> {
    let prefix = &prefix[..PREFIX];
    let mut start = prefix.to_vec();
    start.push(0);
    let mut end = prefix.to_vec();
    end.extend_from_slice(&[0xff; BLOCK_KEY - PREFIX + 1]);
    tree.range(start..end).map(|item| item.map_err(Error::from))
}

/// Reads the hour of `key` whole: every stored block (the listed ones
/// must be there, and the others must be the full ones the manifest
/// counts: their number and digest).
pub(super) fn read_hour(tree: &sled::Tree, key: &[u8]) -> Result<Hour> {
    let prefix = key[..PREFIX].to_vec();
    let manifest = read_manifest(tree, &prefix)?;
    let mut cells = BTreeMap::new();
    let mut blocks = Vec::new();
    for item in stored_blocks(tree, &prefix) {
        let (key, value) = item?;
        merge_block(&key, &value, &mut cells)?;
        blocks.push(key.to_vec());
    }
    let keys: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    let (missing, stray) = mismatch(&manifest, &prefix, &keys);
    if let Some(missing) = missing.first() {
        return Err(corrupt(missing, "block listed in the manifest is missing"));
    }
    if stray.is_some() {
        return Err(corrupt(
            &prefix,
            "the hour's blocks are not the ones its manifest lists and counts",
        ));
    }
    // Every block's id is at most the manifest's newest (the listed ones
    // by its decoding, the full ones by their digest).
    Ok(Hour {
        prefix,
        blocks,
        newest: manifest.newest,
        cells,
    })
}

impl Hour {
    /// The writes that replace the hour's blocks with its `cells` as they
    /// are now, in parts of at most [`MAX_BLOCK_BYTES`] (marked full), under
    /// the newest id so far. Nothing when the hour had no block.
    pub(super) fn rewrite(mut self) -> Vec<CellWrite> {
        if self.blocks.is_empty() {
            return Vec::new();
        }
        let id = self.newest;
        let mut writes: Vec<CellWrite> = std::mem::take(&mut self.blocks)
            .into_iter()
            .map(|key| (key, None))
            .collect();
        if self.cells.is_empty() {
            writes.push((self.prefix.clone(), None));
            return writes;
        }
        let mut manifest = Manifest {
            newest: id,
            ..Manifest::default()
        };
        for (entry, block) in parts(&self.prefix, id, &mut self.cells) {
            writes.push((entry.key(&self.prefix), Some(block)));
            manifest.add_full(entry.id, entry.part);
        }
        writes.push((
            self.prefix.clone(),
            Some(encode_manifest(&self.prefix, &manifest)),
        ));
        writes
    }
}

/// Checks a stored entry under a block period (`admin verify`): the number
/// of cells it holds, or why it is not sound.
pub(super) fn check(key: &[u8], value: &[u8]) -> std::result::Result<usize, &'static str> {
    match kind(key) {
        Some(Kind::Manifest) => {
            open_value(key, value).ok_or("checksum mismatch")?;
            decode_manifest(key, value).ok_or("manifest does not decode")?;
            Ok(0)
        }
        Some(Kind::Block) => {
            open_value(key, value).ok_or("checksum mismatch")?;
            let cells = block_cells(key, value).ok_or("block does not decode")?;
            for (full, v) in &cells {
                if crate::rollup::CellKey::decode(full).is_none() {
                    return Err("a cell's key does not decode");
                }
                let body = open_value(full, v).ok_or("a cell's checksum does not match")?;
                Agg::decode_bytes(body).ok_or("a cell's value does not decode")?;
            }
            Ok(cells.len())
        }
        None => Err("key is neither a cell block nor a manifest"),
    }
}

/// The manifest stored under `key` (`admin verify`, after [`check`]
/// passed; empty if it does not decode).
pub(super) fn manifest(key: &[u8], value: &[u8]) -> Manifest {
    decode_manifest(key, value).unwrap_or_default()
}

/// Whether a stored key is a block (not a manifest).
pub(super) fn is_block(key: &[u8]) -> bool {
    in_blocks(key) && matches!(kind(key), Some(Kind::Block))
}

/// A block's value sealed for another key of the same hour (tests that
/// make a stray block).
#[cfg(test)]
pub(super) fn moved(key: &[u8], to: &[u8], value: &[u8]) -> Vec<u8> {
    seal_bytes(to, open_value(key, value).expect("a sealed block").to_vec())
}

fn corrupt(k: &[u8], what: &str) -> Error {
    super::rollups::corrupt(k, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::{Bucket, CellDims, CellKey, FAMILY_BASE};

    fn key(hour: i64, gtin: u32) -> Vec<u8> {
        CellKey {
            family: FAMILY_BASE,
            period: Bucket::Hour,
            hour,
            dims: CellDims {
                gtin: format!("{gtin:08}"),
                ..Default::default()
            },
        }
        .encode()
    }

    fn agg(events: u64, customer: u64) -> Agg {
        Agg {
            events,
            customers: vec![customer],
            ..Default::default()
        }
    }

    fn checkpoint(tree: &sled::Tree, id: Seq, cells: &BTreeMap<Vec<u8>, Agg>) {
        let mut batch = sled::Batch::default();
        let prefix = cells.keys().next().expect("a cell")[..PREFIX].to_vec();
        add_block(tree, &mut batch, &prefix, cells.iter(), id).expect("add");
        crate::store::gate::apply_batch(tree, batch).expect("apply");
    }

    /// A cell read back: its events and customers.
    type ReadCells = BTreeMap<Vec<u8>, (u64, Vec<u64>)>;

    /// The hour read back: every block expanded, cells added up by key.
    fn hour_cells(tree: &sled::Tree, hour: i64) -> (usize, ReadCells) {
        let prefix = crate::rollup::period_prefix(FAMILY_BASE, Bucket::Hour, hour);
        let mut raw = Vec::new();
        let mut blocks = 0;
        for item in tree.scan_prefix(prefix) {
            let (k, v) = item.expect("item");
            assert_eq!(check(&k, &v).map(|_| ()), Ok(()), "{k:?}");
            blocks += usize::from(is_block(&k));
            expand(&k, &v, &mut raw).expect("expand");
        }
        let mut out = ReadCells::new();
        for (k, v) in raw {
            let agg = Agg::decode_bytes(open_value(&k, &v).expect("sealed")).expect("agg");
            let cell = out.entry(k.to_vec()).or_default();
            cell.0 += agg.events;
            cell.1.extend(agg.customers);
            cell.1.sort_unstable();
            cell.1.dedup();
        }
        (blocks, out)
    }

    /// Checkpoints add blocks without reading cells; the newest blocks of a
    /// level merge a level up, and the hour reads back as the sum of every
    /// delta whatever the blocks.
    #[test]
    fn blocks_merge_level_by_level_and_read_back_as_the_sum_of_their_deltas() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("rollups").expect("tree");
        let mut expected = ReadCells::new();
        let mut most_blocks = 0;
        for id in 1..=40u64 {
            // Each checkpoint: three cells, one of which every checkpoint
            // has (gtin 0), so merges add up the same key.
            let cells: BTreeMap<Vec<u8>, Agg> = [0, id as u32, 100 + id as u32]
                .into_iter()
                .map(|g| (key(5, g), agg(1, id)))
                .collect();
            for k in cells.keys() {
                let cell = expected.entry(k.clone()).or_default();
                cell.0 += 1;
                cell.1.push(id);
            }
            checkpoint(&tree, id, &cells);
            let (blocks, read) = hour_cells(&tree, 5);
            assert_eq!(read, expected, "after checkpoint {id}");
            most_blocks = most_blocks.max(blocks);
        }
        // 40 = 2·16 + 2·4 blocks' worth: two of level 2, two of level 1.
        let manifest = read_manifest(&tree, &key(5, 0)).expect("manifest");
        let levels: Vec<u8> = manifest.open.iter().map(|e| e.level).collect();
        assert_eq!(levels, [2, 2, 1, 1]);
        assert_eq!((manifest.full, manifest.newest), (0, 40));
        assert!(
            most_blocks <= 3 * (FANOUT - 1),
            "{most_blocks} blocks at most"
        );
        // A checkpoint never writes under an id a block already has.
        let again = BTreeMap::from([(key(5, 0), agg(1, 1))]);
        let mut batch = sled::Batch::default();
        let err = add_block(&tree, &mut batch, &key(5, 0), again.iter(), 40).expect_err("id");
        assert!(err.to_string().contains("rebuild-rollups"), "{err}");
    }

    /// The sizes of the stored blocks of the hour of `key` written under
    /// `id`, in part order; checks that each is within the size limit and
    /// that every part but the last is filled up to it.
    fn parts_within_the_limit(tree: &sled::Tree, key: &[u8], id: Seq) -> Vec<usize> {
        let sizes: Vec<usize> = stored_blocks(tree, key)
            .map(|item| item.expect("block"))
            .filter(|(k, _)| block_id_part(k).map(|(i, _)| i) == Some(id))
            .map(|(_, v)| v.len())
            .collect();
        assert!(sizes.iter().all(|b| *b <= MAX_BLOCK_BYTES), "{sizes:?}");
        let filled = &sizes[..sizes.len().saturating_sub(1)];
        assert!(
            filled.iter().all(|b| *b > MAX_BLOCK_BYTES - 64),
            "{sizes:?}"
        );
        sizes
    }

    /// Six checkpoints of `hour` of about two fifths of the size limit
    /// each (cells of about 27 bytes, their keys shared), so that four
    /// would merge into more than it; returns the cells per checkpoint.
    fn too_large_to_merge(tree: &sled::Tree, hour: i64) -> u32 {
        let per = (MAX_BLOCK_BYTES * 2 / 5 / 27) as u32;
        for id in 1..=6u64 {
            let cells: BTreeMap<Vec<u8>, Agg> = (0..per)
                .map(|g| (key(hour, (id as u32) * 10_000 + g), agg(1, u64::from(g))))
                .collect();
            checkpoint(tree, id, &cells);
        }
        per
    }

    /// Blocks that would merge past the size limit stay as they are, and
    /// are never merged again.
    #[test]
    fn blocks_past_the_size_limit_are_kept_full() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("rollups").expect("tree");
        let per = too_large_to_merge(&tree, 9);
        // The first four full (counted, no longer listed), the last two
        // listed, still to merge.
        let manifest = read_manifest(&tree, &key(9, 0)).expect("manifest");
        assert_eq!(manifest.full, 4, "{manifest:?}");
        assert_eq!(manifest.newest, 6, "{manifest:?}");
        let open: Vec<(Seq, u8)> = manifest.open.iter().map(|e| (e.id, e.level)).collect();
        assert_eq!(open, [(5, 0), (6, 0)], "{manifest:?}");
        let (blocks, read) = hour_cells(&tree, 9);
        assert_eq!(blocks, 6);
        assert_eq!(read.len(), 6 * per as usize);
        let stored: Vec<usize> = stored_blocks(&tree, &key(9, 0))
            .map(|item| item.expect("block").1.len())
            .collect();
        assert!(stored.iter().all(|b| *b <= MAX_BLOCK_BYTES), "{stored:?}");
        // A checkpoint's deltas past the limit (a busy hour): full parts.
        let busy: BTreeMap<Vec<u8>, Agg> = (0..4_000)
            .map(|g| (key(9, 900_000 + g), agg(1, u64::from(g))))
            .collect();
        checkpoint(&tree, 7, &busy);
        assert!(parts_within_the_limit(&tree, &key(9, 0), 7).len() > 1);
        let manifest = read_manifest(&tree, &key(9, 0)).expect("manifest");
        let (blocks, read) = hour_cells(&tree, 9);
        assert!(blocks > 7, "{blocks}");
        assert_eq!(manifest.full as usize, blocks - 2, "{manifest:?}");
        assert_eq!(manifest.open.len(), 2, "{manifest:?}");
        assert_eq!(manifest.newest, 7, "{manifest:?}");
        assert_eq!(read.len(), 6 * per as usize + 4_000);
        // The hour reads whole, the full blocks included.
        assert_eq!(
            read_hour(&tree, &key(9, 0)).expect("hour").cells.len(),
            6 * per as usize + 4_000
        );
    }

    /// A manifest of format 1 (every block listed, the full ones with
    /// their level) reads as the blocks still to merge and a count of the
    /// full ones; the hour's next block writes format 2. An hour whose
    /// stored blocks are not the ones its manifest lists and counts does
    /// not read.
    #[test]
    fn a_format_1_manifest_reads_and_a_missing_full_block_is_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("rollups").expect("tree");
        let per = too_large_to_merge(&tree, 4);
        let prefix = key(4, 0)[..PREFIX].to_vec();
        let now = read_manifest(&tree, &prefix).expect("manifest");
        assert_eq!((now.full, now.open.len()), (4, 2));
        // The same hour's manifest as format 1 wrote it.
        let mut body = Vec::new();
        for item in stored_blocks(&tree, &prefix) {
            let (k, v) = item.expect("block");
            let open = now.open.iter().find(|e| e.key(&prefix) == k.as_ref());
            body.extend_from_slice(&k[PREFIX..]);
            body.push(open.map_or(FULL, |e| e.level));
            body.extend_from_slice(&(v.len() as u32).to_be_bytes());
        }
        tree.insert(&prefix, seal_bytes(&prefix, body))
            .expect("format 1");
        let old = read_manifest(&tree, &prefix).expect("format 1 reads");
        assert_eq!((old.full, old.newest), (4, 6));
        assert_eq!(
            old.open.iter().map(|e| (e.id, e.level)).collect::<Vec<_>>(),
            [(5, 0), (6, 0)]
        );
        checkpoint(&tree, 7, &BTreeMap::from([(key(4, 1), agg(1, 7))]));
        let raw = tree.get(&prefix).expect("get").expect("manifest");
        let body = open_value(&prefix, &raw).expect("sealed");
        assert_eq!(
            (body[0], body.len() % ENTRY),
            (MANIFEST_V2, V2_HEAD % ENTRY)
        );
        let hour = read_hour(&tree, &prefix).expect("hour");
        assert_eq!(hour.cells.len(), 6 * per as usize + 1);
        // A full block gone: the hour does not read.
        let full = stored_blocks(&tree, &prefix)
            .map(|item| item.expect("block").0)
            .find(|k| block_id_part(k).map(|(id, _)| id) == Some(1))
            .expect("block 1");
        let value = tree.remove(&full).expect("remove").expect("block 1");
        let err = read_hour(&tree, &prefix).err().expect("a block is missing");
        assert!(
            err.to_string().contains("manifest lists and counts"),
            "{err}"
        );
        // And a stray block in its stead, as many blocks as counted: the
        // digest tells them apart.
        let mut stray = full.to_vec();
        stray[BLOCK_KEY - 1] ^= 1;
        tree.insert(&stray, moved(&full, &stray, &value))
            .expect("stray");
        let err = read_hour(&tree, &prefix).err().expect("a stray block");
        assert!(
            err.to_string().contains("manifest lists and counts"),
            "{err}"
        );
        tree.remove(&stray).expect("remove");
        tree.insert(&full, value).expect("back");
        assert!(read_hour(&tree, &prefix).is_ok());
    }

    /// A rewrite (an erasure's) replaces all of an hour's blocks with its
    /// cells as given, in parts within the size limit; an hour left
    /// without cells goes, manifest and all.
    #[test]
    fn a_rewrite_replaces_the_hours_blocks_in_parts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("rollups").expect("tree");
        for id in 1..=3u64 {
            let cells: BTreeMap<Vec<u8>, Agg> =
                (0..4_000).map(|g| (key(2, g), agg(1, id))).collect();
            checkpoint(&tree, id, &cells);
        }
        let mut hour = read_hour(&tree, &key(2, 0)).expect("read");
        assert_eq!(hour.cells.len(), 4_000);
        assert!(hour
            .cells
            .values()
            .all(|a| a.events == 3 && a.customers == [1, 2, 3]));
        hour.cells.remove(&key(2, 0));
        for agg in hour.cells.values_mut() {
            agg.events = 2;
            agg.customers = vec![1, 3];
        }
        let apply = |writes: Vec<CellWrite>| {
            let mut batch = sled::Batch::default();
            for (k, v) in writes {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
            }
            crate::store::gate::apply_batch(&tree, batch).expect("apply");
        };
        apply(hour.rewrite());
        let (blocks, read) = hour_cells(&tree, 2);
        assert!(
            blocks > 1,
            "3,999 cells of about 27 bytes take more than one part"
        );
        assert_eq!(parts_within_the_limit(&tree, &key(2, 0), 3).len(), blocks);
        assert_eq!(read.len(), 3_999);
        assert!(read
            .values()
            .all(|(events, customers)| *events == 2 && customers == &[1, 3]));
        let manifest = read_manifest(&tree, &key(2, 0)).expect("manifest");
        assert!(manifest.open.is_empty(), "{manifest:?}");
        assert_eq!((manifest.full as usize, manifest.newest), (blocks, 3));
        assert!(stored_blocks(&tree, &key(2, 0)).all(|item| block_id_part(
            &item.expect("block").0
        )
        .map(|(id, _)| id)
            == Some(3)));
        // Later checkpoints add blocks beside the parts.
        checkpoint(&tree, 4, &BTreeMap::from([(key(2, 0), agg(1, 4))]));
        assert_eq!(hour_cells(&tree, 2).1.len(), 4_000);
        let mut hour = read_hour(&tree, &key(2, 0)).expect("read");
        hour.cells.clear();
        apply(hour.rewrite());
        assert_eq!(tree.len(), 0);
    }

    /// A block of format 1 (each key after the prefix whole), as stores
    /// before session 22 wrote them.
    fn encode_block_v1<'a>(
        key: &[u8],
        cells: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in cells {
            let suffix = &k[PREFIX..];
            encode_varint(suffix.len() as u64, &mut body);
            body.extend_from_slice(suffix);
            encode_varint(v.len() as u64, &mut body);
            body.extend_from_slice(v);
        }
        seal_bytes(key, body)
    }

    /// Blocks keep each key as the bytes it shares with the one before and
    /// the rest, and read back whole; blocks of format 1 still read, and
    /// merge with new ones; a block whose key would share more than the
    /// key before has does not read.
    #[test]
    fn blocks_share_key_prefixes_and_format_1_blocks_still_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("rollups").expect("tree");
        let mut cells: BTreeMap<Vec<u8>, Agg> = (0..200)
            .map(|g| (key(6, 4_000_000 + g), agg(1, u64::from(g))))
            .collect();
        let sealed = sealed_cells(&mut cells);
        let pairs = || sealed.iter().map(|(k, v)| (*k, v.as_slice()));
        let block_key = Entry {
            id: 1,
            part: 0,
            level: 0,
            bytes: 0,
        }
        .key(&key(6, 0)[..PREFIX]);
        let v1 = encode_block_v1(&block_key, pairs());
        let v2 = encode_block(&block_key, pairs());
        let whole: Vec<(Vec<u8>, &[u8])> = pairs().map(|(k, v)| (k.to_vec(), v)).collect();
        assert_eq!(block_cells(&block_key, &v1).expect("format 1"), whole);
        assert_eq!(block_cells(&block_key, &v2).expect("format 2"), whole);
        // GTINs 04000000..04000199 share 5 or 6 of their 8 digits and every
        // dimension before them.
        assert!(v2.len() * 10 < v1.len() * 8, "{} vs {}", v2.len(), v1.len());
        assert_eq!(check(&block_key, &v1), Ok(200));
        assert_eq!(check(&block_key, &v2), Ok(200));
        // A stored format 1 block merges with the next checkpoint's.
        let mut batch = sled::Batch::default();
        batch.insert(block_key.clone(), v1);
        batch.insert(
            &key(6, 0)[..PREFIX],
            encode_manifest(
                &key(6, 0)[..PREFIX],
                &Manifest {
                    open: vec![Entry {
                        id: 1,
                        part: 0,
                        level: 0,
                        bytes: 0,
                    }],
                    newest: 1,
                    ..Manifest::default()
                },
            ),
        );
        crate::store::gate::apply_batch(&tree, batch).expect("apply");
        for id in 2..=4 {
            checkpoint(&tree, id, &BTreeMap::from([(key(6, 4_000_000), agg(1, 7))]));
        }
        let manifest = read_manifest(&tree, &key(6, 0)).expect("manifest");
        assert_eq!(manifest.open.len(), 1, "four blocks merged: {manifest:?}");
        for item in stored_blocks(&tree, &key(6, 0)) {
            let (k, v) = item.expect("block");
            assert_eq!(open_value(&k, &v).expect("sealed")[0], BLOCK_V2, "merged");
        }
        let (blocks, read) = hour_cells(&tree, 6);
        assert_eq!((blocks, read.len()), (1, 200));
        assert_eq!(read[&key(6, 4_000_000)], (4, vec![0, 7]));
        // Damaged: the second cell claims more shared bytes than the first
        // key has.
        let mut body = vec![BLOCK_V2];
        for (shared, rest) in [(0usize, &b"ab"[..]), (5, &b"c"[..])] {
            encode_varint(shared as u64, &mut body);
            encode_varint(rest.len() as u64, &mut body);
            body.extend_from_slice(rest);
            encode_varint(1, &mut body);
            body.push(0);
        }
        assert!(block_cells(&block_key, &seal_bytes(&block_key, body)).is_none());
    }

    /// A flipped byte in a block or a manifest is found, and reading the
    /// hour fails rather than count it.
    #[test]
    fn a_damaged_block_or_manifest_is_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("rollups").expect("tree");
        checkpoint(&tree, 1, &BTreeMap::from([(key(3, 1), agg(1, 1))]));
        for item in tree.iter() {
            let (k, v) = item.expect("item");
            let mut damaged = v.to_vec();
            damaged[1] ^= 1;
            assert_eq!(check(&k, &damaged), Err("checksum mismatch"), "{k:?}");
            let mut out = Vec::new();
            if is_block(&k) {
                assert!(expand(&k, &damaged, &mut out).is_err());
            } else {
                assert!(decode_manifest(&k, &damaged).is_none());
            }
        }
    }
}
