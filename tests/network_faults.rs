//! Network faults between hops: a TCP proxy of the test's own between the
//! retailer and the distributor delays, cuts and stalls the link's
//! connection while events are published. The link reconnects and drains;
//! nothing is lost or duplicated; a stalled (half-open) connection is
//! found by HTTP/2 keepalive within a bounded time.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chainsight::pb;
use common::{event_of, roles, TestEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A TCP proxy to `upstream` whose connections can be delayed, cut and
/// stalled. Each connection remembers the epoch it was accepted in; a cut
/// or stall applies to the connections accepted before it.
struct Proxy {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
    cut: watch::Sender<u64>,
    stall: watch::Sender<u64>,
    delay: watch::Sender<Duration>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let (stall, _) = watch::channel(0u64);
        let (delay, _) = watch::channel(Duration::ZERO);
        let proxy = Proxy {
            addr,
            accepted: Arc::default(),
            epoch: Arc::new(AtomicU64::new(1)),
            cut,
            stall,
            delay,
        };
        let (accepted, epoch) = (proxy.accepted.clone(), proxy.epoch.clone());
        let (cut, stall, delay) = (
            proxy.cut.subscribe(),
            proxy.stall.subscribe(),
            proxy.delay.subscribe(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let born = epoch.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (r, w) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    tokio::spawn(pump(r, w, born, cut.clone(), stall.clone(), delay.clone()));
                }
            }
        });
        proxy
    }

    /// Applies to the connections open now.
    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst)
    }

    fn cut_all(&self) {
        let e = self.next_epoch();
        self.cut.send_replace(e);
    }

    fn stall_all(&self) {
        let e = self.next_epoch();
        self.stall.send_replace(e);
    }

    fn set_delay(&self, d: Duration) {
        self.delay.send_replace(d);
    }
}

async fn pump(
    mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut to: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    born: u64,
    mut cut: watch::Receiver<u64>,
    mut stall: watch::Receiver<u64>,
    delay: watch::Receiver<Duration>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = cut.changed() => if *cut.borrow() >= born { return } else { continue },
        };
        // Stalled: hold everything, answer nothing, keep the socket open.
        while *stall.borrow() >= born {
            tokio::select! {
                _ = cut.changed() => if *cut.borrow() >= born { return },
                _ = stall.changed() => {}
            }
        }
        let d = *delay.borrow();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_cut_and_stall_between_hops_lose_and_duplicate_nothing() {
    let env = TestEnv::new();
    let operator = env.issue("operator");
    let reader = env.issue("maker-app");
    let eshop = env.issue("retailer-eshop");
    let d_port = env.reserve_port();
    env.node_config_on(
        "distributor",
        d_port,
        &roles(&[
            "downstream = [\"retailer\"]",
            "subscribers = [\"maker-app\"]",
        ]),
    );
    let d = env.start("distributor");
    let proxy = Proxy::start(d.addr).await;
    env.node_config(
        "retailer",
        &format!(
            "{}[propagation]\nkeepalive_interval_secs = 1\nkeepalive_timeout_secs = 2\nbackoff_max_ms = 500\n{}",
            roles(&["publishers = [\"retailer-eshop\"]", "subscribers = [\"maker-app\"]"]),
            common::upstream("distributor", proxy.addr.port(), "")
        ),
    );
    let r = env.start("retailer");

    // Publish without pause through every phase.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let publisher = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let mut ingest = r.ingest(&eshop).await;
        tokio::spawn(async move {
            let mut batch = 0;
            while !stop.load(Ordering::SeqCst) {
                let events: Vec<_> = (0..50)
                    .map(|i| {
                        event_of(
                            &format!("n{batch}-{i}"),
                            "4740001000017",
                            pb::EventKind::Purchase,
                            &format!("c-{i}"),
                        )
                    })
                    .collect();
                let results = common::publish(&mut ingest, events).await;
                acked
                    .lock()
                    .unwrap()
                    .extend(results.into_iter().map(|r| r.event_id));
                batch += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let wait_connections = |n: u64, within: Duration| {
        let accepted = proxy.accepted.clone();
        async move {
            let start = Instant::now();
            while accepted.load(Ordering::SeqCst) < n {
                assert!(
                    start.elapsed() < within,
                    "no new link connection within {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            start.elapsed()
        }
    };
    wait_connections(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Delay: 100 ms on every chunk each way, for 2 s.
    proxy.set_delay(Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_delay(Duration::ZERO);

    // Cut: every open connection closed; the link reconnects.
    let before = proxy.accepted.load(Ordering::SeqCst);
    proxy.cut_all();
    let reconnect_after_cut = wait_connections(before + 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Stall: the connection stays open but nothing passes (half-open); the
    // link's keepalive (1 s + 2 s) finds it and reconnects.
    let before = proxy.accepted.load(Ordering::SeqCst);
    proxy.stall_all();
    let reconnect_after_stall = wait_connections(before + 1, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
    let acked: HashSet<String> = acked.lock().unwrap().clone();
    r.wait_drained(&operator, 0).await;
    proxy.cut_all();

    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, id) in common::stored(&d, &reader).await {
        *seen.entry(id).or_default() += 1;
    }
    let lost = acked.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicated = seen.values().filter(|&&n| n > 1).count();
    println!(
        "network faults: {} events published, {} at the distributor; link reconnected {:?} after the cut and {:?} after the stall (keepalive 1 s + 2 s); {} connections in all; lost {lost}, duplicated {duplicated}",
        acked.len(),
        seen.len(),
        reconnect_after_cut,
        reconnect_after_stall,
        proxy.accepted.load(Ordering::SeqCst)
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicated, 0);
    assert_eq!(seen.len(), acked.len());
    assert!(
        reconnect_after_stall < Duration::from_secs(10),
        "the half-open connection was found only after {reconnect_after_stall:?}"
    );
}
