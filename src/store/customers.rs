//! The customer index: where a customer's events are, for erasure.
//!
//! Tree `customer_runs`: the first sequence number (u64, big-endian) of a
//! run of consecutive sequence numbers (one commit's new events) → format
//! byte [`RUN_FORMAT`], then per sequence number of the run a 4-byte
//! fingerprint of the event's customer pseudonym ([`fingerprint`]; 0: no
//! pseudonym, or the event is gone).
//!
//! One key per commit instead of one per event: `bench growth` measured
//! the per-event key (`pseudonym ‖ seq`, 41 bytes, in `by_customer`) as the
//! most expensive of the store's indexes (at 1M events without it: ingest
//! +39 %, disk 8.5× instead of 11.4× the payload, RSS −290 MiB). Finding a
//! customer's events reads every run (4 bytes per event) instead of one
//! prefix; a fingerprint is a filter, so every candidate is checked
//! against the stored event's pseudonym. An erased or purged event's
//! fingerprint is zeroed in the same transaction that removes it, and a
//! run left with nothing but zeros goes.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::{Error, Result, Seq};

/// The first byte of a run's value.
pub(super) const RUN_FORMAT: u8 = 1;
/// Most sequence numbers in one run (4 KB): a commit's new events, or
/// events already stored (migration from `by_customer`, replay of the
/// event log). Small enough for sled's leaves to stay under its blob
/// threshold (see `slots::MAX_RUN`).
pub(super) const MAX_RUN: usize = 1024;

/// The fingerprint of a pseudonym (never 0); 0 for none.
pub(super) fn fingerprint(pseudonym: &str) -> u32 {
    if pseudonym.is_empty() {
        return 0;
    }
    let digest = Sha256::digest(pseudonym.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]).max(1)
}

/// A run's value: the fingerprints of consecutive sequence numbers.
pub(super) fn encode(fingerprints: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 * fingerprints.len());
    out.push(RUN_FORMAT);
    for f in fingerprints {
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

/// A run's first sequence number and fingerprints.
pub(super) fn decode(key: &[u8], value: &[u8]) -> Result<(Seq, Vec<u32>)> {
    let first = super::seq_from(key, "customer_runs", "?")?;
    let corrupt = |reason: String| Error::Corrupt {
        tree: "customer_runs",
        key: first.to_string(),
        source: super::DecodeError::Payload(reason),
    };
    match value.split_first() {
        Some((&RUN_FORMAT, rest)) if rest.len() % 4 == 0 && !rest.is_empty() => Ok((
            first,
            rest.chunks_exact(4)
                .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        )),
        Some((&RUN_FORMAT, rest)) => Err(corrupt(format!("a run of {} bytes", rest.len()))),
        Some((format, _)) => Err(corrupt(format!("unknown run format {format}"))),
        None => Err(corrupt("an empty run".into())),
    }
}

/// The runs to write for events at `seqs` (ascending) with these
/// fingerprints: one per stretch of consecutive sequence numbers, at most
/// `max_len` long; runs with no fingerprint are left out.
pub(super) fn runs(events: &[(Seq, u32)], max_len: usize) -> Vec<(Seq, Vec<u8>)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let mut end = start + 1;
        while end < events.len() && end - start < max_len && events[end].0 == events[end - 1].0 + 1
        {
            end += 1;
        }
        let stretch = &events[start..end];
        if stretch.iter().any(|(_, f)| *f != 0) {
            let fps: Vec<u32> = stretch.iter().map(|(_, f)| *f).collect();
            out.push((stretch[0].0, encode(&fps)));
        }
        start = end;
    }
    out
}

/// What a scan of the runs found: the sequence numbers whose fingerprint
/// matches (candidates: check each event's pseudonym), and the key of the
/// last run read (a later scan continues after it).
#[derive(Debug, Default, Clone)]
pub struct Scan {
    pub candidates: BTreeSet<Seq>,
    pub last_run: Option<Seq>,
}

/// Scans the runs after `after` (every run with `None`) for `pseudonym`.
pub(super) fn scan(tree: &sled::Tree, pseudonym: &str, after: Option<Seq>) -> Result<Scan> {
    let wanted = fingerprint(pseudonym);
    let mut found = Scan {
        candidates: BTreeSet::new(),
        last_run: after,
    };
    if wanted == 0 {
        return Ok(found);
    }
    let start = match after {
        Some(seq) => std::ops::Bound::Excluded(seq.to_be_bytes()),
        None => std::ops::Bound::Unbounded,
    };
    for item in tree.range((start, std::ops::Bound::Unbounded)) {
        let (k, v) = item?;
        let (first, fps) = decode(&k, &v)?;
        for (i, f) in fps.iter().enumerate() {
            if *f == wanted {
                found.candidates.insert(first + i as u64);
            }
        }
        found.last_run = Some(first);
    }
    Ok(found)
}

/// The rewrites that zero the fingerprints of `seqs`: per run touched, its
/// new value, or `None` when nothing is left in it. Apply them (in the
/// transaction that removes the events) with `slots::apply` or
/// `slots::apply_in`.
pub(super) fn cleared(
    tree: &sled::Tree,
    seqs: impl IntoIterator<Item = Seq>,
) -> Result<Vec<(Seq, Option<Vec<u8>>)>> {
    let mut touched: BTreeMap<Seq, Vec<u32>> = BTreeMap::new();
    for seq in seqs {
        let known = touched
            .range(..=seq)
            .next_back()
            .filter(|(first, fps)| seq < **first + fps.len() as u64)
            .map(|(first, _)| *first);
        let first = match known {
            Some(first) => first,
            None => {
                let Some(item) = tree.range(..=seq.to_be_bytes()).next_back() else {
                    continue;
                };
                let (k, v) = item?;
                let (first, fps) = decode(&k, &v)?;
                if seq >= first + fps.len() as u64 {
                    continue;
                }
                touched.entry(first).or_insert(fps);
                first
            }
        };
        let fps = touched.get_mut(&first).expect("just found");
        fps[(seq - first) as usize] = 0;
    }
    Ok(touched
        .into_iter()
        .map(|(first, fps)| {
            let value = fps.iter().any(|f| *f != 0).then(|| encode(&fps));
            (first, value)
        })
        .collect())
}

/// The rewrites that cut every run at `from`: numbers from `from` on are
/// covered by none (a run reaching past it is shortened, runs after it
/// go). For the end of the store, where nothing from `from` on is stored
/// (see `super::repair_tail` and `super::replay_log`).
pub(super) fn truncated(tree: &sled::Tree, from: Seq) -> Result<Vec<(Seq, Option<Vec<u8>>)>> {
    let mut out = Vec::new();
    if let Some(item) = tree.range(..from.to_be_bytes()).next_back() {
        let (k, v) = item?;
        let (first, mut fps) = decode(&k, &v)?;
        if first + fps.len() as u64 > from {
            fps.truncate((from - first) as usize);
            let value = fps.iter().any(|f| *f != 0).then(|| encode(&fps));
            out.push((first, value));
        }
    }
    for item in tree.range(from.to_be_bytes()..) {
        let (k, _) = item?;
        out.push((super::seq_from(&k, "customer_runs", "?")?, None));
    }
    Ok(out)
}

/// The sequence number after the last one the runs cover (1 if none).
#[cfg(test)]
pub(super) fn end(tree: &sled::Tree) -> Result<Seq> {
    match tree.last()? {
        None => Ok(1),
        Some((k, v)) => {
            let (first, fps) = decode(&k, &v)?;
            Ok(first + fps.len() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slots::apply;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .open()
            .expect("open sled");
        (dir, db.open_tree("customer_runs").expect("tree"))
    }

    #[test]
    fn runs_follow_consecutive_numbers_and_leave_out_runs_without_a_customer() {
        let (a, b) = (fingerprint("alice"), fingerprint("bob"));
        assert!(a != 0 && b != 0 && a != b);
        assert_eq!(fingerprint(""), 0);
        let events = [
            (3, a),
            (4, 0),
            (5, b),
            (7, 0),
            (8, 0),
            (10, a),
            (11, a),
            (12, b),
        ];
        let built = runs(&events, 2);
        let firsts: Vec<Seq> = built.iter().map(|(s, _)| *s).collect();
        // 3-4, 5, (7-8 has no customer), 10-11, 12.
        assert_eq!(firsts, vec![3, 5, 10, 12]);
        let (first, fps) = decode(&3u64.to_be_bytes(), &built[0].1).expect("decode");
        assert_eq!((first, fps), (3, vec![a, 0]));
    }

    #[test]
    fn a_scan_finds_the_fingerprints_and_continues_after_its_last_run() {
        let (_dir, t) = tree();
        let (a, b) = (fingerprint("alice"), fingerprint("bob"));
        for (first, value) in runs(&[(1, a), (2, b), (3, a), (9, b), (10, a)], 64) {
            t.insert(first.to_be_bytes(), value).expect("insert");
        }
        let all = scan(&t, "alice", None).expect("scan");
        assert_eq!(
            all.candidates.into_iter().collect::<Vec<_>>(),
            vec![1, 3, 10]
        );
        assert_eq!(all.last_run, Some(9));
        for (first, value) in runs(&[(11, a)], 64) {
            t.insert(first.to_be_bytes(), value).expect("insert");
        }
        let more = scan(&t, "alice", all.last_run).expect("scan");
        assert_eq!(more.candidates.into_iter().collect::<Vec<_>>(), vec![11]);
        assert!(scan(&t, "", None).expect("scan").candidates.is_empty());
        assert_eq!(end(&t).expect("end"), 12);
    }

    #[test]
    fn clearing_zeroes_fingerprints_and_removes_emptied_runs() {
        let (_dir, t) = tree();
        let (a, b) = (fingerprint("alice"), fingerprint("bob"));
        for (first, value) in runs(&[(1, a), (2, b), (3, a), (9, a)], 64) {
            t.insert(first.to_be_bytes(), value).expect("insert");
        }
        // 5 is in no run; 9 empties its run.
        let rewrites = cleared(&t, [1, 3, 5, 9]).expect("cleared");
        assert_eq!(rewrites.len(), 2);
        apply(&t, &rewrites).expect("apply");
        assert!(scan(&t, "alice", None).expect("scan").candidates.is_empty());
        let bob = scan(&t, "bob", None).expect("scan");
        assert_eq!(bob.candidates.into_iter().collect::<Vec<_>>(), vec![2]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn truncating_leaves_no_run_reaching_past_the_cut() {
        let (_dir, t) = tree();
        let (a, b) = (fingerprint("alice"), fingerprint("bob"));
        for (first, value) in runs(&[(1, a), (2, b), (3, a), (4, a), (7, b), (9, a)], 64) {
            t.insert(first.to_be_bytes(), value).expect("insert");
        }
        apply(&t, &truncated(&t, 3).expect("truncated")).expect("apply");
        assert_eq!(end(&t).expect("end"), 3);
        let bob = scan(&t, "bob", None).expect("scan");
        assert_eq!(bob.candidates.into_iter().collect::<Vec<_>>(), vec![2]);
        // A run left with nothing but zeros goes, as does one cut to nothing.
        apply(&t, &cleared(&t, [1]).expect("cleared")).expect("apply");
        apply(&t, &truncated(&t, 2).expect("truncated")).expect("apply");
        assert!(t.is_empty());
        for (first, value) in runs(&[(1, a), (2, b)], 64) {
            t.insert(first.to_be_bytes(), value).expect("insert");
        }
        apply(&t, &truncated(&t, 1).expect("truncated")).expect("apply");
        assert!(t.is_empty());
        assert!(truncated(&t, 1).expect("truncated").is_empty());
    }

    #[test]
    fn a_damaged_run_is_reported_as_corrupt() {
        for value in [
            &[][..],
            &[RUN_FORMAT][..],
            &[RUN_FORMAT, 1, 2][..],
            &[9, 0, 0, 0, 1][..],
        ] {
            let e = decode(&1u64.to_be_bytes(), value).expect_err("damaged");
            assert!(
                matches!(
                    e,
                    Error::Corrupt {
                        tree: "customer_runs",
                        ..
                    }
                ),
                "{e}"
            );
        }
    }
}
