//! `Signals`: manufacturers subscribe to the stored signals about their
//! products. A subscription reads the store from its cursor up to the
//! durable watermark (events flushed to disk), sends the matching ones, and
//! with `follow` waits for the watermark to move, then reads on. Because a
//! subscriber is always served from the store through a bounded channel, it
//! never sees a gap or a duplicate at the hand-over from backfill to live,
//! a slow subscriber only slows itself, and the node never buffers for it
//! beyond that channel.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::ingest::rpc_span;
use super::{authorize, ApiError};
use crate::conversions;
use crate::domain::EventFilter;
use crate::pb;
use crate::policy::{Policy, Role};
use crate::store::{Seq, Store};

/// Signals queued for one subscriber before its reader waits.
const SUBSCRIBER_BUFFER: usize = 256;
/// Events read from the store per step.
const SCAN_CHUNK: usize = 512;

/// The Signals service.
#[derive(Clone)]
pub struct SignalsService {
    policy: Policy,
    store: Store,
    shutdown: CancellationToken,
}

impl SignalsService {
    /// Subscriptions end when `shutdown` is cancelled.
    pub fn new(policy: Policy, store: Store, shutdown: CancellationToken) -> Self {
        SignalsService {
            policy,
            store,
            shutdown,
        }
    }
}

type SignalStream = Pin<Box<dyn Stream<Item = Result<pb::Signal, Status>> + Send>>;

#[tonic::async_trait]
impl pb::signals_server::Signals for SignalsService {
    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<SignalStream>, Status> {
        let span = rpc_span(&req, "Signals.Subscribe");
        span.in_scope(|| authorize(&req, &self.policy, Role::Subscriber))?;
        let req = req.into_inner();
        let filter = conversions::filter_from_pb(req.filter, "filter").map_err(ApiError::from)?;
        span.in_scope(|| {
            tracing::info!(
                after = req.after_cursor,
                follow = req.follow,
                "subscription started"
            );
        });
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let feed = Feed {
            store: self.store.clone(),
            filter,
            cursor: req.after_cursor,
            follow: req.follow,
            tx,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(feed.run().instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One subscription's reader.
struct Feed {
    store: Store,
    filter: EventFilter,
    cursor: Seq,
    follow: bool,
    tx: mpsc::Sender<Result<pb::Signal, Status>>,
    shutdown: CancellationToken,
}

impl Feed {
    async fn run(mut self) {
        let mut durable = self.store.watch_durable();
        let mut sent = 0u64;
        loop {
            let upto = *durable.borrow_and_update();
            let chunk = match self.store.scan_range(self.cursor, upto, SCAN_CHUNK) {
                Ok(chunk) => chunk,
                Err(e) => {
                    let _ = self.tx.send(Err(ApiError::from(e).into())).await;
                    return;
                }
            };
            if chunk.is_empty() {
                if !self.follow {
                    break;
                }
                tokio::select! {
                    changed = durable.changed() => if changed.is_err() { break },
                    _ = self.tx.closed() => break,
                    _ = self.shutdown.cancelled() => break,
                }
                continue;
            }
            for (seq, ev) in chunk {
                self.cursor = seq;
                if !self.filter.matches(&ev) {
                    continue;
                }
                let signal = pb::Signal {
                    cursor: seq,
                    event: Some(conversions::preference_event_to_pb(&ev)),
                };
                tokio::select! {
                    res = self.tx.send(Ok(signal)) => if res.is_err() {
                        tracing::info!(cursor = self.cursor, sent, "subscriber went away");
                        return;
                    },
                    _ = self.shutdown.cancelled() => return,
                }
                sent += 1;
            }
        }
        tracing::info!(cursor = self.cursor, sent, "subscription ended");
    }
}
