//! Signals.Subscribe and SubscribeBatches: backfill with filters, resume
//! by cursor, live follow with no gap and no duplicate while events
//! arrive, roles and bad filters.

mod common;

use std::collections::HashSet;

use chainsight::pb;
use common::{event_of, publish_all, roles, TestEnv};
use tonic::transport::Channel;

const DAIRY: &str = "4740001000017";
const WEAR: &str = "4750002000015";

fn node(env: &TestEnv) -> common::NodeProc {
    env.node_config(
        "retailer",
        &roles(&[
            "publishers = [\"retailer-eshop\"]",
            "subscribers = [\"maker-app\"]",
        ]),
    );
    env.start("retailer")
}

async fn signals(
    node: &common::NodeProc,
    files: &chainsight::config::TlsFiles,
) -> pb::signals_client::SignalsClient<Channel> {
    pb::signals_client::SignalsClient::new(node.channel(files).await.unwrap())
}

/// A backfill request: `filter`'s signals after `after`, not following.
fn backfill(filter: pb::Filter, after: u64) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        filter: Some(filter),
        after_cursor: after,
        follow: false,
        name: String::new(),
    }
}

async fn collect(
    client: &mut pb::signals_client::SignalsClient<Channel>,
    filter: pb::Filter,
    after: u64,
) -> Vec<pb::Signal> {
    let mut stream = client
        .subscribe(backfill(filter, after))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(s) = stream.message().await.unwrap() {
        out.push(s);
    }
    out
}

/// As [`collect`], by `SubscribeBatches`: the signals and the batches.
async fn collect_batches(
    client: &mut pb::signals_client::SignalsClient<Channel>,
    filter: pb::Filter,
    after: u64,
) -> (Vec<pb::Signal>, usize) {
    let mut stream = client
        .subscribe_batches(backfill(filter, after))
        .await
        .unwrap()
        .into_inner();
    let (mut out, mut batches) = (Vec::new(), 0);
    while let Some(batch) = stream.message().await.unwrap() {
        assert!(!batch.signals.is_empty(), "a batch is never empty");
        batches += 1;
        out.extend(batch.signals);
    }
    (out, batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_returns_exactly_the_matching_events_in_order_and_resumes() {
    let env = TestEnv::new();
    let node = node(&env);
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    let kinds = [
        pb::EventKind::Purchase,
        pb::EventKind::Review,
        pb::EventKind::Return,
    ];
    let events: Vec<_> = (0..300)
        .map(|i| {
            event_of(
                &format!("s-{i:03}"),
                if i % 2 == 0 { DAIRY } else { WEAR },
                kinds[i % 3],
                "c",
            )
        })
        .collect();
    let expected: Vec<String> = events
        .iter()
        .filter(|e| {
            e.product.as_ref().unwrap().gtin == DAIRY && e.kind == pb::EventKind::Review as i32
        })
        .map(|e| e.event_id.clone())
        .collect();
    publish_all(&mut node.ingest(&eshop).await, events).await;

    let mut client = signals(&node, &app).await;
    let filter = pb::Filter {
        gtin_prefixes: vec!["4740001".into()],
        kinds: vec![pb::EventKind::Review as i32],
        ..Default::default()
    };
    let got = collect(&mut client, filter.clone(), 0).await;
    let ids: Vec<String> = got
        .iter()
        .map(|s| s.event.as_ref().unwrap().event_id.clone())
        .collect();
    assert_eq!(ids, expected, "exactly the matching events, in store order");
    assert!(
        got.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "cursors increase"
    );

    // Resuming after a cursor gives exactly the signals after it.
    let mid = got[got.len() / 2].cursor;
    let filter_again = filter.clone();
    let rest = collect(&mut client, filter, mid).await;
    assert_eq!(rest.len(), got.len() - got.len() / 2 - 1);
    assert_eq!(rest[0].cursor, got[got.len() / 2 + 1].cursor);

    // Everything, unfiltered: all 300, cursors 1..=300.
    let all = collect(&mut client, pb::Filter::default(), 0).await;
    assert_eq!(
        all.iter().map(|s| s.cursor).collect::<Vec<_>>(),
        (1..=300).collect::<Vec<u64>>()
    );

    // In batches: the same signals, several to a message.
    let (batched, batches) = collect_batches(&mut client, pb::Filter::default(), 0).await;
    assert_eq!(batched, all, "SubscribeBatches sends what Subscribe sends");
    assert!(
        batches < all.len() / 10,
        "{batches} batches for {}",
        all.len()
    );
    let (batched, _) = collect_batches(&mut client, filter_again, mid).await;
    assert_eq!(batched, rest, "filtered and resumed alike");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_hands_over_from_backfill_to_live_without_gap_or_duplicate() {
    follow_without_gap_or_duplicate(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_in_batches_hands_over_without_gap_or_duplicate() {
    follow_without_gap_or_duplicate(true).await;
}

/// Signals of `Subscribe`, or of `SubscribeBatches` one by one.
enum Signals {
    One(tonic::Streaming<pb::Signal>),
    Batches(
        tonic::Streaming<pb::SignalBatch>,
        std::collections::VecDeque<pb::Signal>,
    ),
}

impl Signals {
    async fn next(&mut self) -> Option<pb::Signal> {
        match self {
            Signals::One(stream) => stream.message().await.unwrap(),
            Signals::Batches(stream, ready) => loop {
                if let Some(s) = ready.pop_front() {
                    return Some(s);
                }
                let batch = stream.message().await.unwrap()?;
                assert!(!batch.signals.is_empty(), "a batch is never empty");
                ready.extend(batch.signals);
            },
        }
    }
}

async fn follow_without_gap_or_duplicate(batched: bool) {
    let env = TestEnv::new();
    let node = node(&env);
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    // Some history first.
    let history: Vec<_> = (0..500)
        .map(|i| event_of(&format!("h-{i}"), DAIRY, pb::EventKind::Purchase, "c"))
        .collect();
    publish_all(&mut node.ingest(&eshop).await, history).await;

    // Publishers keep going while the subscription starts and runs.
    let mut tasks = Vec::new();
    for p in 0..3 {
        let mut client = node.ingest(&eshop).await;
        tasks.push(tokio::spawn(async move {
            for b in 0..20 {
                let events: Vec<_> = (0..25)
                    .map(|i| {
                        event_of(
                            &format!("live-{p}-{b}-{i}"),
                            DAIRY,
                            pb::EventKind::Purchase,
                            "c",
                        )
                    })
                    .collect();
                publish_all(&mut client, events).await;
            }
        }));
    }
    let total = 500 + 3 * 20 * 25;
    let request = pb::SubscribeRequest {
        filter: None,
        after_cursor: 0,
        follow: true,
        name: String::new(),
    };
    let mut client = signals(&node, &app).await;
    let mut stream = if batched {
        let stream = client.subscribe_batches(request).await.unwrap();
        Signals::Batches(stream.into_inner(), Default::default())
    } else {
        Signals::One(client.subscribe(request).await.unwrap().into_inner())
    };
    let mut seen = HashSet::new();
    let mut last = 0;
    while seen.len() < total {
        let s = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
            .await
            .expect("signals keep coming")
            .expect("stream stays open with follow");
        assert_eq!(
            s.cursor,
            last + 1,
            "no gap, no duplicate: cursor {} after {last}",
            s.cursor
        );
        last = s.cursor;
        assert!(seen.insert(s.event.unwrap().event_id), "duplicate signal");
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(seen.len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_needs_the_role_and_a_valid_filter() {
    let env = TestEnv::new();
    let node = node(&env);
    let eshop = env.issue("retailer-eshop");
    let app = env.issue("maker-app");
    // What `Subscribe` (or `SubscribeBatches`) answers `files` with `filter`.
    let refusal = |files, filter: Option<pb::Filter>, batched: bool| {
        let node = &node;
        async move {
            let mut client = signals(node, files).await;
            let request = pb::SubscribeRequest {
                filter,
                ..Default::default()
            };
            if batched {
                client.subscribe_batches(request).await.map(|_| ())
            } else {
                client.subscribe(request).await.map(|_| ())
            }
            .expect_err("refused")
        }
    };
    for batched in [false, true] {
        let status = refusal(&eshop, None, batched).await;
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "a publisher is not a subscriber"
        );
        let prefix = pb::Filter {
            gtin_prefixes: vec!["47x".into()],
            ..Default::default()
        };
        let status = refusal(&app, Some(prefix), batched).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("filter.gtin_prefixes"),
            "{status:?}"
        );
        let kind = pb::Filter {
            kinds: vec![42],
            ..Default::default()
        };
        let status = refusal(&app, Some(kind), batched).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("filter.kinds"), "{status:?}");
    }
}
