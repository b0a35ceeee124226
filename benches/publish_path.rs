//! The CPU a node spends on each published event before the store writer
//! takes it, in process: decoding a `PublishRequest` of 100 events from
//! its protobuf bytes, validating and anonymising each event, signing the
//! batch, and encoding the records the writer appends to the event log.
//! No network, TLS or store: this isolates the per-event work that ingest
//! repeats a million times, steadily enough to compare two versions of it
//! (`chainsight bench ingest` measures the whole path, on a noisy host).
//!
//! Each stage is measured on its own and then all of them in a row; the
//! throughput is in events.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use chainsight::anonymise::Anonymiser;
use chainsight::certs::{ChainCa, LeafOptions};
use chainsight::conversions;
use chainsight::domain::{PreferenceEvent, UnixNanos};
use chainsight::origin::Signer;
use chainsight::pb;
use chainsight::store::record;
use chainsight::workload::Workload;

/// The allocator the `chainsight` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events per request, as `chainsight bench ingest` sends them.
const BATCH: usize = 100;

fn signer() -> Signer {
    let ca = ChainCa::generate("bench-ca").expect("CA");
    let issued = ca
        .issue("retailer", &LeafOptions::default())
        .expect("leaf certificate");
    let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("cert");
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
    Signer::new(cert, &key).expect("signer")
}

fn validate_and_anonymise(
    anonymiser: &Anonymiser,
    events: Vec<pb::CustomerEvent>,
    now: UnixNanos,
) -> Vec<PreferenceEvent> {
    events
        .into_iter()
        .map(|ev| {
            let ce = conversions::customer_event_from_pb(ev, now).expect("valid event");
            anonymiser.anonymise(ce)
        })
        .collect()
}

fn sign(signer: &Signer, events: &mut [PreferenceEvent]) {
    let mut refs: Vec<&mut PreferenceEvent> = events.iter_mut().collect();
    signer.sign_batch(&mut refs).expect("signed");
}

fn bench(c: &mut Criterion) {
    let now = UnixNanos::now();
    let mut workload = Workload::new(7, "bench", 10_000, now.0 / 1_000_000_000);
    let request = pb::PublishRequest {
        events: (0..BATCH).map(|_| workload.next_event()).collect(),
    };
    let bytes = request.encode_to_vec();
    let anonymiser = Anonymiser::new("retailer", [42; 32]);
    let signer = signer();
    let anonymised = validate_and_anonymise(&anonymiser, request.events.clone(), now);
    let mut signed = anonymised.clone();
    sign(&signer, &mut signed);

    let mut group = c.benchmark_group("publish_path");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decode", |b| {
        b.iter(|| pb::PublishRequest::decode(bytes.as_slice()).expect("decodes"))
    });
    group.bench_function("validate_anonymise", |b| {
        b.iter_batched(
            || request.events.clone(),
            |events| validate_and_anonymise(&anonymiser, events, now),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("sign_batch", |b| {
        b.iter_batched(
            || anonymised.clone(),
            |mut events| {
                sign(&signer, &mut events);
                events
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("encode_records", |b| {
        b.iter(|| signed.iter().map(record::encode).collect::<Vec<_>>())
    });
    group.bench_function("all", |b| {
        b.iter(|| {
            let request = pb::PublishRequest::decode(bytes.as_slice()).expect("decodes");
            let mut events = validate_and_anonymise(&anonymiser, request.events, now);
            sign(&signer, &mut events);
            events.iter().map(record::encode).collect::<Vec<_>>()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
