//! Export cursors: how far each `[[export]]` entry has been acknowledged by
//! its destination. Kept in `meta` under `export/<name>` (big-endian seq),
//! written only after the destination acknowledged everything up to it and
//! flushed before the call returns, so a restart resumes without loss and
//! repeats at most what was in flight.

use super::{meta_seq_key, Result, Seq, Store};

fn key(name: &str) -> Vec<u8> {
    let mut key = b"export/".to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

impl Store {
    /// The last sequence number export `name` has delivered (0: none yet).
    pub fn export_cursor(&self, name: &str) -> Result<Seq> {
        meta_seq_key(&self.inner.trees.meta, &key(name), name)
    }

    /// Durably records that export `name` has delivered everything up to
    /// `cursor`; returns once it is flushed.
    pub async fn set_export_cursor(&self, name: &str, cursor: Seq) -> Result<()> {
        let meta = &self.inner.trees.meta;
        meta.insert(key(name), &cursor.to_be_bytes())?;
        meta.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_export_cursor_survives_a_reopen_and_is_per_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open_with(dir.path(), &[], None).expect("open");
            assert_eq!(store.export_cursor("a").expect("read"), 0);
            store.set_export_cursor("a", 42).await.expect("write");
            store.set_export_cursor("b", 7).await.expect("write");
        }
        let mut reopened = Store::open_with(dir.path(), &[], None);
        for _ in 0..200 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
            reopened = Store::open_with(dir.path(), &[], None);
        }
        let store = reopened.expect("reopen");
        assert_eq!(store.export_cursor("a").expect("read"), 42);
        assert_eq!(store.export_cursor("b").expect("read"), 7);
        assert_eq!(store.last_seq().expect("read"), 0, "not a sequence number");
    }
}
