//! Outboxes: per upstream link, the events stored here that the link has
//! not yet acknowledged. Entries are added by the writer in the same
//! transaction as their event and removed only after the upstream node has
//! acknowledged them (it acknowledges after its own flush), so a crash on
//! either side at worst causes a resend, which the receiver deduplicates.

use std::sync::atomic::Ordering;

use super::{decode_event, seq_from, Error, Outbox, Result, Seq, Store};
use crate::domain::{PreferenceEvent, UnixNanos};

pub(super) fn open(db: &sled::Db, link: &str) -> Result<Outbox> {
    let tree = db.open_tree(format!("outbox/{link}"))?;
    let len = tree.len() as u64;
    Ok(Outbox {
        link: link.to_string(),
        tree,
        len: len.into(),
        added: Default::default(),
    })
}

/// A queued event, read for sending.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: Seq,
    pub event: PreferenceEvent,
    /// Size of the stored record, to bound batches by bytes.
    pub bytes: usize,
}

impl Store {
    fn outbox(&self, link: usize) -> &Outbox {
        &self.inner.trees.outboxes[link]
    }

    /// Up to `max_events` queued events of `link` after `after`, together at
    /// most `max_bytes` (at least one event is returned if any is queued).
    pub fn outbox_batch(
        &self,
        link: usize,
        after: Seq,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Queued>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let start = after.saturating_add(1).to_be_bytes();
        // Only what is flushed here is forwarded.
        let durable = self.durable_seq();
        for item in self.outbox(link).tree.range(start..) {
            let (k, _) = item?;
            let seq = seq_from(&k, "outbox", "?")?;
            if seq > durable {
                break;
            }
            let raw = match super::slots::get(&self.inner.trees.events, seq)? {
                Some(value) => self
                    .inner
                    .trees
                    .record_live(seq, &value)?
                    .map(|r| r.into_owned()),
                None => None,
            };
            let Some(raw) = raw else {
                // The event is gone (removed by retention before it could be
                // forwarded): nothing to send, but say so.
                tracing::warn!(
                    link,
                    seq,
                    "an event past retention was dropped from the outbox before it was forwarded"
                );
                self.outbox_ack(link, &[seq])?;
                continue;
            };
            if !out.is_empty() && (out.len() >= max_events || bytes + raw.len() > max_bytes) {
                break;
            }
            bytes += raw.len();
            out.push(Queued {
                seq,
                event: decode_event(seq, &raw)?,
                bytes: raw.len(),
            });
        }
        Ok(out)
    }

    /// Removes acknowledged entries from `link`'s outbox. Not flushed: if
    /// the removal is lost in a crash, the entries are sent again and the
    /// receiver answers them as duplicates.
    pub fn outbox_ack(&self, link: usize, seqs: &[Seq]) -> Result<()> {
        let outbox = self.outbox(link);
        let mut removed = 0;
        for seq in seqs {
            // Count only what was there: an entry may be acknowledged twice.
            if outbox.tree.remove(seq.to_be_bytes())?.is_some() {
                removed += 1;
            }
        }
        let _ = outbox
            .len
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(removed))
            });
        Ok(())
    }

    /// Events waiting in `link`'s outbox.
    pub fn outbox_len(&self, link: usize) -> u64 {
        self.outbox(link).len.load(Ordering::SeqCst)
    }

    /// When the oldest waiting entry of `link` was queued.
    pub fn outbox_oldest(&self, link: usize) -> Result<Option<UnixNanos>> {
        match self.outbox(link).tree.first()? {
            None => Ok(None),
            Some((_, v)) => {
                let arr: [u8; 8] = v.as_ref().try_into().map_err(|_| Error::Corrupt {
                    tree: "outbox",
                    key: "first".into(),
                    source: super::DecodeError::TooShort(v.len()),
                })?;
                Ok(Some(UnixNanos(i64::from_be_bytes(arr))))
            }
        }
    }

    /// Resolves when entries were added to `link`'s outbox since the last call
    /// (a wake-up is never lost: one that comes first is remembered).
    pub async fn outbox_added(&self, link: usize) {
        self.outbox(link).added.notified().await
    }
}
