//! Black-box tests of the Ingest service's validation against a real node
//! process: every rule rejects exactly the offending event (naming the field)
//! without affecting its neighbours, only accepted events reach the store,
//! and request-level limits fail the whole call without storing anything.

mod common;

use chainsight::config::TlsFiles;
use chainsight::pb;
use common::{event, outcome, publish, NodeProc, TestEnv};
use prost::Message;
use tonic::Code;

/// The identity `TestEnv::retailer` grants the publisher role.
const PUBLISHER: &str = "retailer-eshop";

/// What the node must answer for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Accepted,
    /// REJECTED naming exactly this field.
    Field(&'static str),
    /// REJECTED naming a field that starts with this.
    FieldPrefix(&'static str),
}

type Mutation = Box<dyn Fn(&mut pb::CustomerEvent)>;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The TLS files of the publisher certificate issued under certs/.
fn publisher_files(env: &TestEnv) -> TlsFiles {
    let dir = env.certs_dir();
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{PUBLISHER}.pem")),
        key: dir.join(format!("{PUBLISHER}.key")),
        handshake_timeout_secs: 5,
        crls: Vec::new(),
        watch_secs: 10,
    }
}

/// Starts a node `id` whose only publisher is `retailer-eshop`, with the
/// given `[limits]` table body.
fn node_with_limits(env: &TestEnv, id: &str, limits: &str) -> NodeProc {
    env.node_config(
        id,
        &format!("[roles]\npublishers = [\"{PUBLISHER}\"]\n[limits]\n{limits}\n"),
    );
    env.issue(PUBLISHER);
    env.start(id)
}

/// Appends the GS1 check digit (weights 3,1,3,... from the right) to `data`.
fn with_check_digit(data: &str) -> String {
    let sum: u32 = data
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                3 * d
            } else {
                d
            }
        })
        .sum();
    format!("{data}{}", (10 - sum % 10) % 10)
}

fn with_gtin(gtin: String) -> Mutation {
    Box::new(move |e| e.product.as_mut().unwrap().gtin = gtin.clone())
}

/// Asserts one result against its expectation; `given` is the event id sent.
fn check_result(case: &str, r: &pb::PublishResult, given: &str, expect: Expect) {
    match expect {
        Expect::Accepted => {
            assert_eq!(
                outcome(r),
                pb::PublishOutcome::Accepted,
                "{case}: expected ACCEPTED, got {r:?}"
            );
            assert_eq!(r.event_id, given, "{case}: accepted id echoed");
            assert!(
                r.field.is_empty() && r.reason.is_empty(),
                "{case}: accepted result carries no field/reason: {r:?}"
            );
        }
        Expect::Field(_) | Expect::FieldPrefix(_) => {
            assert_eq!(
                outcome(r),
                pb::PublishOutcome::Rejected,
                "{case}: expected REJECTED, got {r:?}"
            );
            match expect {
                Expect::Field(f) => assert_eq!(r.field, f, "{case}: field of {r:?}"),
                Expect::FieldPrefix(p) => assert!(
                    r.field.starts_with(p),
                    "{case}: field {:?} should start with {p:?}",
                    r.field
                ),
                Expect::Accepted => unreachable!(),
            }
            assert!(!r.reason.trim().is_empty(), "{case}: empty reason: {r:?}");
            if given.len() <= 128 {
                assert_eq!(r.event_id, given, "{case}: rejected id echoed");
            } else {
                assert!(
                    !r.event_id.is_empty() && given.starts_with(&r.event_id),
                    "{case}: rejected long id echoed as a prefix, got {:?}",
                    r.event_id
                );
            }
        }
    }
}

fn cases() -> Vec<(&'static str, Mutation, Expect)> {
    use Expect::*;
    let now = now_secs();
    let at = move |secs: i64| -> Mutation {
        Box::new(move |e| {
            e.occurred_at = Some(pbjson_types::Timestamp {
                seconds: secs,
                nanos: 0,
            })
        })
    };
    let attrs = |n: usize| -> Mutation {
        Box::new(move |e| {
            e.attributes = (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        })
    };
    let review = |score: Option<u32>| -> Mutation {
        Box::new(move |e| {
            e.kind = pb::EventKind::Review as i32;
            e.stage = pb::JourneyStage::PostPurchase as i32;
            e.score = score;
        })
    };
    let nps = |score: Option<u32>| -> Mutation {
        Box::new(move |e| {
            e.kind = pb::EventKind::Nps as i32;
            e.stage = pb::JourneyStage::PostPurchase as i32;
            e.score = score;
        })
    };
    vec![
        // GTIN
        (
            "gtin-letters",
            with_gtin("47400010000A7".into()),
            Field("product.gtin"),
        ),
        (
            "gtin-11-digits",
            with_gtin("47400010000".into()),
            Field("product.gtin"),
        ),
        (
            "gtin-bad-check-digit",
            with_gtin("4740001000018".into()),
            Field("product.gtin"),
        ),
        (
            "gtin-empty",
            with_gtin(String::new()),
            Field("product.gtin"),
        ),
        (
            "gtin-8-valid",
            with_gtin(with_check_digit("9638507")),
            Accepted,
        ),
        (
            "gtin-12-valid",
            with_gtin(with_check_digit("03600029145")),
            Accepted,
        ),
        (
            "gtin-13-valid",
            with_gtin(with_check_digit("400638133393")),
            Accepted,
        ),
        (
            "gtin-14-valid",
            with_gtin(with_check_digit("1001234567890")),
            Accepted,
        ),
        (
            "missing-product",
            Box::new(|e| e.product = None),
            Field("product"),
        ),
        // enums
        ("kind-unspecified", Box::new(|e| e.kind = 0), Field("kind")),
        ("kind-unknown-42", Box::new(|e| e.kind = 42), Field("kind")),
        (
            "channel-unspecified",
            Box::new(|e| e.channel = 0),
            Field("channel"),
        ),
        (
            "channel-unknown",
            Box::new(|e| e.channel = 99),
            Field("channel"),
        ),
        (
            "stage-unspecified",
            Box::new(|e| e.stage = 0),
            Field("stage"),
        ),
        ("stage-unknown", Box::new(|e| e.stage = 17), Field("stage")),
        // scores
        ("review-score-0", review(Some(0)), Field("score")),
        ("review-score-6", review(Some(6)), Field("score")),
        ("review-score-missing", review(None), Field("score")),
        ("review-score-1", review(Some(1)), Accepted),
        ("review-score-5", review(Some(5)), Accepted),
        ("nps-score-11", nps(Some(11)), Field("score")),
        ("nps-score-missing", nps(None), Field("score")),
        ("nps-score-0", nps(Some(0)), Accepted),
        ("nps-score-10", nps(Some(10)), Accepted),
        (
            "purchase-score-11",
            Box::new(|e| e.score = Some(11)),
            Field("score"),
        ),
        // occurred_at
        (
            "occurred-at-missing",
            Box::new(|e| e.occurred_at = None),
            Field("occurred_at"),
        ),
        (
            "occurred-at-10min-future",
            at(now + 600),
            Field("occurred_at"),
        ),
        ("occurred-at-2min-future", at(now + 120), Accepted),
        (
            "occurred-at-1999",
            at(946_684_800 - 86_400),
            Field("occurred_at"),
        ),
        // attributes
        ("attributes-32", attrs(32), Accepted),
        ("attributes-33", attrs(33), Field("attributes")),
        (
            "attribute-key-space",
            Box::new(|e| {
                e.attributes.insert("bad key".into(), "v".into());
            }),
            Field("attributes.key"),
        ),
        (
            "attribute-key-empty",
            Box::new(|e| {
                e.attributes.insert(String::new(), "v".into());
            }),
            Field("attributes.key"),
        ),
        (
            "attribute-value-256",
            Box::new(|e| {
                e.attributes.insert("long".into(), "v".repeat(256));
            }),
            Accepted,
        ),
        (
            "attribute-value-257",
            Box::new(|e| {
                e.attributes.insert("long".into(), "v".repeat(257));
            }),
            FieldPrefix("attributes"),
        ),
        // personal data
        (
            "country-XX",
            Box::new(|e| e.country = "XX".into()),
            Field("country"),
        ),
        (
            "country-EST",
            Box::new(|e| e.country = "EST".into()),
            Field("country"),
        ),
        (
            "country-lowercase-ee",
            Box::new(|e| e.country = "ee".into()),
            Accepted,
        ),
        (
            "postal-code-without-country",
            Box::new(|e| e.country = String::new()),
            Field("country"),
        ),
        (
            "no-country-no-postal-code",
            Box::new(|e| {
                e.country = String::new();
                e.postal_code = String::new();
            }),
            Accepted,
        ),
        (
            "birth-year-1800",
            Box::new(|e| e.birth_year = 1800),
            Field("birth_year"),
        ),
        (
            "birth-year-unknown",
            Box::new(|e| e.birth_year = 0),
            Accepted,
        ),
        // quantity
        (
            "quantity-100000",
            Box::new(|e| e.quantity = 100_000),
            Accepted,
        ),
        (
            "quantity-100001",
            Box::new(|e| e.quantity = 100_001),
            Field("quantity"),
        ),
        // event_id
        (
            "event-id-space",
            Box::new(|e| e.event_id = format!("{} with space", e.event_id)),
            Field("event_id"),
        ),
        (
            "event-id-129-chars",
            Box::new(|e| {
                let pad = 129 - e.event_id.len();
                e.event_id = format!("{}{}", e.event_id, "x".repeat(pad));
            }),
            Field("event_id"),
        ),
        (
            "event-id-128-chars",
            Box::new(|e| {
                let pad = 128 - e.event_id.len();
                e.event_id = format!("{}{}", e.event_id, "y".repeat(pad));
            }),
            Accepted,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_rejects_only_its_event_and_only_accepted_events_are_stored() {
    // Sanity of the check-digit helper against published GS1 examples.
    assert_eq!(with_check_digit("9638507"), "96385074");
    assert_eq!(with_check_digit("03600029145"), "036000291452");
    assert_eq!(with_check_digit("400638133393"), "4006381333931");
    assert_eq!(with_check_digit("1001234567890"), "10012345678902");

    let env = TestEnv::new();
    let mut node = env.retailer();
    let mut client = node.ingest(&publisher_files(&env)).await;

    let mut accepted: Vec<String> = Vec::new();
    let mut rejected: Vec<String> = Vec::new();
    let mut gtin8_id = None;
    let cases = cases();
    let mut names = std::collections::HashSet::new();
    for (i, (name, mutate, expect)) in cases.iter().enumerate() {
        assert!(names.insert(*name), "duplicate case name {name}");
        let before = event(&format!("c{i:02}-{name}-before"));
        let after = event(&format!("c{i:02}-{name}-after"));
        let mut subject = event(&format!("c{i:02}-{name}"));
        mutate(&mut subject);
        let ids = [
            before.event_id.clone(),
            subject.event_id.clone(),
            after.event_id.clone(),
        ];
        let results = publish(&mut client, vec![before, subject, after]).await;
        assert_eq!(
            results.len(),
            3,
            "{name}: one result per event: {results:?}"
        );
        check_result(name, &results[0], &ids[0], Expect::Accepted);
        check_result(name, &results[1], &ids[1], *expect);
        check_result(name, &results[2], &ids[2], Expect::Accepted);

        accepted.push(ids[0].clone());
        accepted.push(ids[2].clone());
        if *expect == Expect::Accepted {
            accepted.push(ids[1].clone());
        } else {
            rejected.push(ids[1].clone());
        }
        if *name == "gtin-8-valid" {
            gtin8_id = Some(ids[1].clone());
        }
    }

    node.terminate();
    let store = node.open_store();
    let mut seqs = std::collections::HashSet::new();
    for id in &accepted {
        let (seq, ev) = store
            .get_by_event_id(id)
            .expect("read store")
            .unwrap_or_else(|| panic!("accepted event {id:?} is not stored"));
        assert_eq!(&ev.event_id, id);
        assert!(seqs.insert(seq), "two accepted events share seq {seq}");
    }
    for id in &rejected {
        assert!(
            store.get_by_event_id(id).expect("read store").is_none(),
            "rejected event {id:?} was stored"
        );
    }
    assert_eq!(
        store.len().unwrap(),
        accepted.len(),
        "the store holds exactly the accepted events"
    );
    let stored_ids: std::collections::HashSet<String> = store
        .scan_after(0)
        .map(|r| r.expect("scan").1.event_id)
        .collect();
    assert_eq!(stored_ids.len(), accepted.len(), "each stored exactly once");

    let (_, ev) = store
        .get_by_event_id(gtin8_id.as_deref().expect("gtin-8 case ran"))
        .unwrap()
        .expect("GTIN-8 event stored");
    assert_eq!(ev.product.gtin.as_str(), "00000096385074");
    let (_, ev) = store
        .get_by_event_id(&accepted[0])
        .unwrap()
        .expect("stored");
    assert_eq!(ev.product.gtin.as_str(), "04740001000017");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_only_invalid_events_is_answered_ok_and_stores_nothing() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let mut client = node.ingest(&publisher_files(&env)).await;

    let mut no_kind = event("all-bad-1");
    no_kind.kind = 0;
    let mut bad_gtin = event("all-bad-2");
    bad_gtin.product.as_mut().unwrap().gtin = "4740001000018".into();
    let mut bad_country = event("all-bad-3");
    bad_country.country = "XX".into();

    let results = client
        .publish(pb::PublishRequest {
            events: vec![no_kind, bad_gtin, bad_country],
        })
        .await
        .expect("an all-invalid request is still answered OK")
        .into_inner()
        .results;
    assert_eq!(results.len(), 3, "{results:?}");
    let expected = [
        ("all-bad-1", "kind"),
        ("all-bad-2", "product.gtin"),
        ("all-bad-3", "country"),
    ];
    for (r, (id, field)) in results.iter().zip(expected) {
        check_result(id, r, id, Expect::Field(field));
    }

    node.terminate();
    let store = node.open_store();
    assert!(
        store.is_empty(),
        "nothing stored, found {}",
        store.len().unwrap()
    );
    for (id, _) in expected {
        assert!(store.get_by_event_id(id).unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_fails_out_of_range_and_stores_nothing() {
    let env = TestEnv::new();
    let mut node = node_with_limits(&env, "small-msgs", "max_message_bytes = 65536");
    let mut client = node.ingest(&publisher_files(&env)).await;

    // A request under the limit goes through.
    let small: Vec<_> = (0..10).map(|i| event(&format!("small-{i}"))).collect();
    let results = publish(&mut client, small).await;
    assert_eq!(results.len(), 10);
    assert!(results
        .iter()
        .all(|r| outcome(r) == pb::PublishOutcome::Accepted));

    // 400 valid events: each alone is fine, together they exceed 64 KiB.
    let big: Vec<_> = (0..400)
        .map(|i| {
            let mut e = event(&format!("big-{i}"));
            e.free_text = "the oat milk was great but the cap leaks ".repeat(8);
            e
        })
        .collect();
    let request = pb::PublishRequest { events: big };
    assert!(request.encoded_len() > 65536, "{}", request.encoded_len());
    let status = client
        .publish(request)
        .await
        .expect_err("an oversized request must fail");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");

    node.terminate();
    let store = node.open_store();
    assert_eq!(
        store.len().unwrap(),
        10,
        "only the small request was stored"
    );
    for i in 0..400 {
        assert!(store
            .get_by_event_id(&format!("big-{i}"))
            .unwrap()
            .is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_too_many_events_fails_invalid_argument_and_stores_nothing() {
    let env = TestEnv::new();
    let mut node = node_with_limits(&env, "few-events", "max_events_per_request = 10");
    let mut client = node.ingest(&publisher_files(&env)).await;

    // Exactly the limit is fine.
    let ten: Vec<_> = (0..10).map(|i| event(&format!("ten-{i}"))).collect();
    let results = publish(&mut client, ten).await;
    assert_eq!(results.len(), 10);
    assert!(results
        .iter()
        .all(|r| outcome(r) == pb::PublishOutcome::Accepted));

    let eleven: Vec<_> = (0..11).map(|i| event(&format!("eleven-{i}"))).collect();
    let status = client
        .publish(pb::PublishRequest { events: eleven })
        .await
        .expect_err("11 events exceed max_events_per_request = 10");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("events"), "{status:?}");

    node.terminate();
    let store = node.open_store();
    assert_eq!(
        store.len().unwrap(),
        10,
        "only the first request was stored"
    );
    for i in 0..11 {
        assert!(store
            .get_by_event_id(&format!("eleven-{i}"))
            .unwrap()
            .is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_event_id_gets_a_generated_uuid_v7() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let mut client = node.ingest(&publisher_files(&env)).await;

    let results = publish(&mut client, vec![event(""), event("named"), event("")]).await;
    assert_eq!(results.len(), 3, "{results:?}");
    for r in &results {
        assert_eq!(outcome(r), pb::PublishOutcome::Accepted, "{r:?}");
    }
    assert_eq!(results[1].event_id, "named");
    let mut generated = Vec::new();
    for r in [&results[0], &results[2]] {
        let id = uuid::Uuid::parse_str(&r.event_id)
            .unwrap_or_else(|e| panic!("{:?} is not a UUID: {e}", r.event_id));
        assert_eq!(id.get_version_num(), 7, "{id} is not a UUIDv7");
        generated.push(r.event_id.clone());
    }
    assert_ne!(generated[0], generated[1], "each event gets its own id");

    node.terminate();
    let store = node.open_store();
    assert_eq!(store.len().unwrap(), 3);
    for id in generated.iter().map(String::as_str).chain(["named"]) {
        let (_, ev) = store
            .get_by_event_id(id)
            .unwrap()
            .unwrap_or_else(|| panic!("{id} not stored"));
        assert_eq!(ev.event_id, id);
    }
    assert!(store.get_by_event_id("").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_stream_answers_each_request_in_order() {
    let env = TestEnv::new();
    let mut node = env.retailer();
    let mut client = node.ingest(&publisher_files(&env)).await;

    let bad = |id: &str, mutate: fn(&mut pb::CustomerEvent)| {
        let mut e = event(id);
        mutate(&mut e);
        e
    };
    let batches: Vec<Vec<(pb::CustomerEvent, Expect)>> = vec![
        vec![
            (event("s1-good"), Expect::Accepted),
            (bad("s1-no-kind", |e| e.kind = 0), Expect::Field("kind")),
        ],
        vec![
            (
                bad("s2-review-no-score", |e| {
                    e.kind = pb::EventKind::Review as i32;
                    e.score = None;
                }),
                Expect::Field("score"),
            ),
            (
                bad("s2-country", |e| e.country = "XX".into()),
                Expect::Field("country"),
            ),
        ],
        vec![
            (event("s3-good-a"), Expect::Accepted),
            (event("s3-good-b"), Expect::Accepted),
            (
                bad("s3-gtin", |e| {
                    e.product.as_mut().unwrap().gtin = "4740001000018".into()
                }),
                Expect::Field("product.gtin"),
            ),
        ],
    ];
    let requests: Vec<_> = batches
        .iter()
        .map(|b| pb::PublishRequest {
            events: b.iter().map(|(e, _)| e.clone()).collect(),
        })
        .collect();

    let mut responses = client
        .publish_stream(futures::stream::iter(requests))
        .await
        .expect("publish_stream")
        .into_inner();
    for (n, batch) in batches.iter().enumerate() {
        let resp = responses
            .message()
            .await
            .expect("stream item")
            .unwrap_or_else(|| panic!("stream ended before response {n}"));
        assert_eq!(resp.results.len(), batch.len(), "response {n}: {resp:?}");
        for (r, (e, expect)) in resp.results.iter().zip(batch) {
            check_result(&format!("stream batch {n}"), r, &e.event_id, *expect);
        }
    }
    assert!(
        responses.message().await.expect("clean end").is_none(),
        "exactly one response per request"
    );

    node.terminate();
    let store = node.open_store();
    let expected_stored = ["s1-good", "s3-good-a", "s3-good-b"];
    assert_eq!(store.len().unwrap(), expected_stored.len());
    for id in expected_stored {
        assert!(store.get_by_event_id(id).unwrap().is_some(), "{id} stored");
    }
    for id in ["s1-no-kind", "s2-review-no-score", "s2-country", "s3-gtin"] {
        assert!(store.get_by_event_id(id).unwrap().is_none(), "{id} stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_over_its_request_rate_gets_resource_exhausted_and_stores_nothing_more() {
    let env = TestEnv::new();
    let mut node = node_with_limits(&env, "rated", "requests_per_second = 5");
    let mut client = node.ingest(&publisher_files(&env)).await;

    // A burst of 12 single-event requests at once: the bucket holds 5,
    // and refills at 5 a second while the burst is answered.
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..12).map(|i| {
        let mut client = client.clone();
        async move {
            let id = format!("burst-{i}");
            let answer = client
                .publish(pb::PublishRequest {
                    events: vec![event(&id)],
                })
                .await;
            (id, answer)
        }
    }))
    .await;
    let took = started.elapsed();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (id, answer) in answers {
        match answer {
            Ok(_) => accepted.push(id),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("requests per second"),
                    "{status:?}"
                );
                refused.push(id);
            }
        }
    }
    println!(
        "12 requests at once with requests_per_second = 5: {} answered, {} RESOURCE_EXHAUSTED, in {took:?}",
        accepted.len(),
        refused.len()
    );
    let refilled = (took.as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        accepted.len() >= 5 && accepted.len() <= 5 + refilled,
        "{} of 12 answered in {took:?}",
        accepted.len()
    );
    // A second later the bucket has refilled.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let results = publish(&mut client, vec![event("after-a-pause")]).await;
    assert_eq!(outcome(&results[0]), pb::PublishOutcome::Accepted);

    node.terminate();
    let store = node.open_store();
    assert_eq!(store.len().unwrap(), accepted.len() + 1);
    for id in &refused {
        assert!(store.get_by_event_id(id).unwrap().is_none(), "{id} stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_no_more_concurrent_streams_than_the_limit() {
    let env = TestEnv::new();
    env.node_config(
        "narrow",
        &format!(
            "[roles]\npublishers = [\"{PUBLISHER}\"]\nsubscribers = [\"{PUBLISHER}\"]\n[limits]\nmax_concurrent_streams = 1\n"
        ),
    );
    env.issue(PUBLISHER);
    let node = env.start("narrow");
    let files = publisher_files(&env);
    let channel = node.channel(&files).await.expect("connect");
    // One stream open (a live subscription) takes the connection's only slot.
    let mut signals = pb::signals_client::SignalsClient::new(channel.clone());
    let follow = signals
        .subscribe(pb::SubscribeRequest {
            filter: Some(pb::Filter::default()),
            after_cursor: 0,
            follow: true,
            name: String::new(),
        })
        .await
        .expect("subscribe")
        .into_inner();
    // A second request on the same connection waits for a free stream.
    let mut ingest = pb::ingest_client::IngestClient::new(channel);
    let second = tokio::time::timeout(
        std::time::Duration::from_millis(1500),
        ingest.publish(pb::PublishRequest {
            events: vec![event("waits")],
        }),
    )
    .await;
    assert!(
        second.is_err(),
        "a second stream opened beside the first: {second:?}"
    );
    // Once the subscription ends, the connection takes a request again.
    drop(follow);
    let third = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        ingest.publish(pb::PublishRequest {
            events: vec![event("after")],
        }),
    )
    .await
    .expect("a free stream after the subscription ended")
    .expect("publish");
    assert_eq!(
        outcome(&third.into_inner().results[0]),
        pb::PublishOutcome::Accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_message_limit_is_refused_not_sent() {
    // The encode side of the limit: events stored under a generous limit,
    // then the node restarted with one smaller than a single signal.
    let env = TestEnv::new();
    let reader = env.issue("maker-app");
    env.issue(PUBLISHER);
    let toml = env.node_config(
        "encode-limit",
        &format!(
            "[roles]\npublishers = [\"{PUBLISHER}\"]\nsubscribers = [\"maker-app\"]\n[limits]\nmax_message_bytes = 65536\n"
        ),
    );
    let mut node = env.start("encode-limit");
    let events: Vec<_> = (0..3)
        .map(|i| {
            let mut e = event(&format!("long-{i}"));
            e.free_text = "the oat milk was great but the cap leaks ".repeat(60);
            e
        })
        .collect();
    let results = publish(&mut node.ingest(&publisher_files(&env)).await, events).await;
    assert!(results
        .iter()
        .all(|r| outcome(r) == pb::PublishOutcome::Accepted));
    node.terminate();
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("max_message_bytes = 65536", "max_message_bytes = 1024"),
    )
    .unwrap();
    node.restart();

    let mut client = pb::signals_client::SignalsClient::new(node.channel(&reader).await.unwrap());
    let status = async {
        let mut stream = client
            .subscribe(common::subscription(0, false, ""))
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    }
    .await
    .expect_err("a signal over 1,024 bytes must not be sent");
    println!(
        "a signal over max_message_bytes = 1024: {:?}: {}",
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    node.terminate();
    assert_eq!(
        node.open_store().len().unwrap(),
        3,
        "the events stay stored"
    );
}
