//! Retention: a background task that removes events older than
//! `[retention] max_age` (by when they occurred), in bounded batches so
//! that ingest keeps flowing, together with their index entries. The store
//! records how far it has purged, so a subscriber resuming from an older
//! cursor is told (OUT_OF_RANGE) instead of silently missing events.

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Retention;
use crate::domain::UnixNanos;
use crate::store::Store;

/// Starts the retention task if `max_age` is set; it stops with `token`.
pub fn spawn(
    store: Store,
    cfg: Retention,
    token: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let max_age = cfg.max_age?;
    let task = async move {
        let mut tick = tokio::time::interval(cfg.check_every);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            let cutoff = UnixNanos(
                UnixNanos::now()
                    .0
                    .saturating_sub(max_age.as_nanos().min(i64::MAX as u128) as i64),
            );
            // Cut at a whole hour, so that rollup cells (hourly) go with
            // exactly the events they count.
            let cutoff = crate::rollup::hour_start(crate::rollup::hour_of(cutoff));
            let mut removed = 0;
            loop {
                match store.purge_before(cutoff, cfg.batch).await {
                    Ok(n) => {
                        removed += n;
                        // A step that removes nothing also drops the rollup
                        // cells of the purged hours, so always end on one.
                        if n == 0 || token.is_cancelled() {
                            break;
                        }
                        // Let other work (ingest) in between batches.
                        tokio::task::yield_now().await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "retention step failed; will retry");
                        break;
                    }
                }
            }
            if removed > 0 {
                tracing::info!(removed, max_age = ?max_age, "removed events past retention");
            }
        }
    };
    Some(tokio::spawn(
        task.instrument(tracing::info_span!("retention")),
    ))
}
