//! The on-disk form of a stored event: a format byte, a CRC-32 of the
//! payload, and the protobuf encoding of the `PreferenceEvent`. The checksum
//! is verified on every read, so a flipped byte is reported, never served.

use prost::Message;

use crate::conversions;
use crate::domain::PreferenceEvent;
use crate::pb;

const FORMAT_V1: u8 = 1;
pub(super) const HEADER: usize = 5;

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record too short ({0} bytes)")]
    TooShort(usize),
    #[error("unknown record format {0}")]
    Format(u8),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("undecodable payload: {0}")]
    Payload(String),
    #[error("{0}")]
    Frame(String),
}

/// Encodes an event for storage: the payload is the `pb::PreferenceEvent`
/// encoding of `ev`, written straight from it (see [`pb_form`]).
pub fn encode(ev: &PreferenceEvent) -> Vec<u8> {
    let len = pb_form::len(ev);
    let mut out = Vec::with_capacity(HEADER + len);
    out.extend_from_slice(&[FORMAT_V1, 0, 0, 0, 0]);
    pb_form::put(ev, &mut out);
    debug_assert_eq!(out.len(), HEADER + len);
    let crc = crc32fast::hash(&out[HEADER..]).to_be_bytes();
    out[1..HEADER].copy_from_slice(&crc);
    out
}

/// The `pb::ForwardBatch` a link sends (`batch_id`, `events`,
/// `certificates`) in wire form, each event written straight from the
/// domain event as the stored record is (see [`pb_form`]): no
/// `pb::PreferenceEvent` is built (the conversion copied every string and
/// digest of the event, about a fifth of a sending node's runtime samples
/// in a drain). The test `the_direct_batch_is_prosts` holds it to prost's
/// bytes.
pub fn forward_batch(
    batch_id: u64,
    events: &[PreferenceEvent],
    certificates: &[Vec<u8>],
) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let lens: Vec<usize> = events.iter().map(pb_form::len).collect();
    let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
    let total = if batch_id == 0 {
        0
    } else {
        key_len(1) + encoded_len_varint(batch_id)
    } + lens.iter().map(|&n| field(2, n)).sum::<usize>()
        + certificates
            .iter()
            .map(|c| field(3, c.len()))
            .sum::<usize>();
    let mut out = Vec::with_capacity(total);
    if batch_id != 0 {
        encode_key(1, WireType::Varint, &mut out);
        encode_varint(batch_id, &mut out);
    }
    for (ev, &len) in events.iter().zip(&lens) {
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(len as u64, &mut out);
        pb_form::put(ev, &mut out);
    }
    for c in certificates {
        encode_key(3, WireType::LengthDelimited, &mut out);
        encode_varint(c.len() as u64, &mut out);
        out.extend_from_slice(c);
    }
    debug_assert_eq!(out.len(), total);
    out
}

/// The bytes prost gives for `conversions::preference_event_to_pb(ev)`,
/// without building that message: the conversion copied every string of
/// the event (a score of allocations) on the store writer, for each event
/// it stores. Field numbers and presence rules are those of
/// `proto/chainsight/v1/types.proto` under proto3: a scalar or string at
/// its default is left out, an `optional` or message field is written when
/// set, repeated and map entries always. Maps are `BTreeMap`s (build.rs),
/// so prost writes them sorted, as here; the test
/// `the_direct_encoding_is_prosts` holds both to the same bytes.
mod pb_form {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

    use crate::domain::{PreferenceEvent, UnixNanos};
    use crate::origin::{BatchInclusion, FieldEntry, FieldPart, OriginProof, ProofForm};

    fn field_len(tag: u32, len: usize) -> usize {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }

    fn put_head(tag: u32, len: usize, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    }

    fn bytes_len(tag: u32, b: &[u8]) -> usize {
        if b.is_empty() {
            0
        } else {
            field_len(tag, b.len())
        }
    }

    fn put_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
        if !b.is_empty() {
            put_always(tag, b, buf);
        }
    }

    /// A repeated element: written even when empty.
    fn put_always(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
        put_head(tag, b.len(), buf);
        buf.extend_from_slice(b);
    }

    fn varint_len(tag: u32, v: u64) -> usize {
        if v == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(v)
        }
    }

    fn put_varint(tag: u32, v: u64, buf: &mut Vec<u8>) {
        if v != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(v, buf);
        }
    }

    /// An `int32` (an enum's number, a Timestamp's nanos) or `int64` as
    /// its varint: negative ones take ten bytes, as protobuf wants.
    fn signed(v: impl Into<i64>) -> u64 {
        v.into() as u64
    }

    fn timestamp_len(t: UnixNanos) -> usize {
        let (seconds, nanos) = t.split();
        varint_len(1, signed(seconds)) + varint_len(2, signed(nanos))
    }

    fn put_timestamp(tag: u32, t: UnixNanos, buf: &mut Vec<u8>) {
        let (seconds, nanos) = t.split();
        put_head(tag, timestamp_len(t), buf);
        put_varint(1, signed(seconds), buf);
        put_varint(2, signed(nanos), buf);
    }

    fn product_len(ev: &PreferenceEvent) -> usize {
        let p = &ev.product;
        bytes_len(1, p.gtin.as_str().as_bytes())
            + bytes_len(2, p.category.as_bytes())
            + bytes_len(3, p.brand.as_bytes())
    }

    fn entry_len(k: &str, v: &str) -> usize {
        bytes_len(1, k.as_bytes()) + bytes_len(2, v.as_bytes())
    }

    /// A FieldDigest of an expanded proof: its salt or its digest.
    fn digest_parts(part: &FieldPart) -> (&[u8], &[u8]) {
        match part {
            FieldPart::Salt(s) => (s, &[]),
            FieldPart::Withheld(d) => (&[], d),
        }
    }

    fn digest_len(e: &FieldEntry) -> usize {
        let (salt, digest) = digest_parts(&e.part);
        bytes_len(1, e.name.as_bytes()) + bytes_len(2, salt) + bytes_len(3, digest)
    }

    fn seed(p: &OriginProof) -> &[u8] {
        match &p.form {
            ProofForm::Compact { seed } => seed,
            ProofForm::Expanded(_) => &[],
        }
    }

    fn entries(p: &OriginProof) -> &[FieldEntry] {
        match &p.form {
            ProofForm::Compact { .. } => &[],
            ProofForm::Expanded(entries) => entries,
        }
    }

    fn batch_len(b: &BatchInclusion) -> usize {
        varint_len(1, u64::from(b.index))
            + varint_len(2, u64::from(b.size))
            + b.path.iter().map(|h| field_len(3, h.len())).sum::<usize>()
    }

    fn proof_len(p: &OriginProof) -> usize {
        bytes_len(1, &p.certificate)
            + varint_len(2, u64::from(p.scheme))
            + bytes_len(3, &p.signature)
            + field_len(4, timestamp_len(p.signed_at))
            + bytes_len(5, seed(p))
            + entries(p)
                .iter()
                .map(|e| field_len(6, digest_len(e)))
                .sum::<usize>()
            + p.batch.as_ref().map_or(0, |b| field_len(7, batch_len(b)))
    }

    fn put_proof(p: &OriginProof, buf: &mut Vec<u8>) {
        put_head(16, proof_len(p), buf);
        put_bytes(1, &p.certificate, buf);
        put_varint(2, u64::from(p.scheme), buf);
        put_bytes(3, &p.signature, buf);
        put_timestamp(4, p.signed_at, buf);
        put_bytes(5, seed(p), buf);
        for e in entries(p) {
            let (salt, digest) = digest_parts(&e.part);
            put_head(6, digest_len(e), buf);
            put_bytes(1, e.name.as_bytes(), buf);
            put_bytes(2, salt, buf);
            put_bytes(3, digest, buf);
        }
        if let Some(b) = &p.batch {
            put_head(7, batch_len(b), buf);
            put_varint(1, u64::from(b.index), buf);
            put_varint(2, u64::from(b.size), buf);
            for h in &b.path {
                put_always(3, h, buf);
            }
        }
    }

    /// The length of the encoding.
    pub(super) fn len(ev: &PreferenceEvent) -> usize {
        bytes_len(1, ev.event_id.as_bytes())
            + bytes_len(2, ev.origin.as_bytes())
            + varint_len(3, signed(ev.kind.number()))
            + field_len(4, timestamp_len(ev.occurred_at))
            + field_len(5, product_len(ev))
            + varint_len(6, signed(ev.channel.number()))
            + varint_len(7, signed(ev.stage.number()))
            + ev.attributes
                .iter()
                .map(|(k, v)| field_len(8, entry_len(k, v)))
                .sum::<usize>()
            + ev.score
                .map_or(0, |s| key_len(9) + encoded_len_varint(u64::from(s)))
            + varint_len(10, u64::from(ev.quantity))
            + bytes_len(11, ev.region.as_bytes())
            + bytes_len(12, ev.age_band.as_bytes())
            + bytes_len(13, ev.customer_pseudonym.as_bytes())
            + bytes_len(14, ev.text.as_bytes())
            + ev.path
                .iter()
                .map(|p| field_len(15, p.len()))
                .sum::<usize>()
            + ev.proof.as_ref().map_or(0, |p| field_len(16, proof_len(p)))
    }

    /// Appends the encoding to `buf`.
    pub(super) fn put(ev: &PreferenceEvent, buf: &mut Vec<u8>) {
        put_bytes(1, ev.event_id.as_bytes(), buf);
        put_bytes(2, ev.origin.as_bytes(), buf);
        put_varint(3, signed(ev.kind.number()), buf);
        put_timestamp(4, ev.occurred_at, buf);
        put_head(5, product_len(ev), buf);
        put_bytes(1, ev.product.gtin.as_str().as_bytes(), buf);
        put_bytes(2, ev.product.category.as_bytes(), buf);
        put_bytes(3, ev.product.brand.as_bytes(), buf);
        put_varint(6, signed(ev.channel.number()), buf);
        put_varint(7, signed(ev.stage.number()), buf);
        for (k, v) in &ev.attributes {
            put_head(8, entry_len(k, v), buf);
            put_bytes(1, k.as_bytes(), buf);
            put_bytes(2, v.as_bytes(), buf);
        }
        if let Some(s) = ev.score {
            encode_key(9, WireType::Varint, buf);
            encode_varint(u64::from(s), buf);
        }
        put_varint(10, u64::from(ev.quantity), buf);
        put_bytes(11, ev.region.as_bytes(), buf);
        put_bytes(12, ev.age_band.as_bytes(), buf);
        put_bytes(13, ev.customer_pseudonym.as_bytes(), buf);
        put_bytes(14, ev.text.as_bytes(), buf);
        for p in &ev.path {
            put_always(15, p.as_bytes(), buf);
        }
        if let Some(p) = &ev.proof {
            put_proof(p, buf);
        }
    }
}

/// Decodes and verifies a stored event.
pub fn decode(bytes: &[u8]) -> Result<PreferenceEvent, DecodeError> {
    decode_with_payload(bytes).map(|(ev, _)| ev)
}

/// Decodes and verifies a stored event; also returns its protobuf encoding
/// (a `PreferenceEvent`) as stored.
pub fn decode_with_payload(bytes: &[u8]) -> Result<(PreferenceEvent, &[u8]), DecodeError> {
    if bytes.len() < HEADER {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    if bytes[0] != FORMAT_V1 {
        return Err(DecodeError::Format(bytes[0]));
    }
    let stored = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[HEADER..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    let msg =
        pb::PreferenceEvent::decode(payload).map_err(|e| DecodeError::Payload(e.to_string()))?;
    let ev = conversions::preference_event_from_pb(msg)
        .map_err(|e| DecodeError::Payload(e.to_string()))?;
    Ok((ev, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::*;

    fn sample() -> PreferenceEvent {
        PreferenceEvent::example()
    }

    #[test]
    fn round_trips() {
        let ev = sample();
        assert_eq!(decode(&encode(&ev)).unwrap(), ev);
    }

    /// Events that set and leave out every field the encoding has, in
    /// combinations: `i`'s bits pick which.
    fn variant(i: u32) -> PreferenceEvent {
        use crate::origin::{BatchInclusion, FieldEntry, FieldPart, OriginProof, ProofForm};
        let bit = |n: u32| i & (1 << n) != 0;
        let mut ev = sample();
        if bit(0) {
            ev.event_id.clear();
            ev.region.clear();
        }
        if bit(1) {
            ev.occurred_at = UnixNanos(-1_500_000_001 - i64::from(i));
            ev.kind = EventKind::Review;
            ev.score = Some(i % 6);
        }
        if bit(2) {
            ev.attributes.insert("colour".into(), "blue".into());
            ev.attributes.insert("e".into(), String::new());
            ev.text = "long ".repeat(40 + i as usize);
        }
        if bit(3) {
            ev.quantity = 0;
            ev.score = Some(0);
            ev.product.category.clear();
            ev.path.push(String::new());
            ev.path.push("distributor".into());
        }
        if bit(4) {
            ev.occurred_at = UnixNanos(0);
            ev.age_band.clear();
            ev.customer_pseudonym = "p".repeat(200);
        }
        if bit(5) || bit(6) {
            let form = if bit(5) {
                ProofForm::Compact { seed: [7; 32] }
            } else {
                ProofForm::Expanded(vec![
                    FieldEntry {
                        name: "event_id".into(),
                        part: FieldPart::Salt([1; crate::origin::SALT_LEN]),
                    },
                    FieldEntry {
                        name: "text".into(),
                        part: FieldPart::Withheld([2; 32]),
                    },
                ])
            };
            ev.proof = Some(OriginProof {
                certificate: [9; 32],
                scheme: if bit(7) { 0 } else { 0x0403 },
                signature: vec![3; 70 + (i as usize % 3)],
                signed_at: UnixNanos(1_790_000_000_123_456_789),
                form,
                batch: bit(7).then(|| BatchInclusion {
                    index: i % 3,
                    size: 3 + i,
                    path: vec![[5; 32]; (i % 4) as usize],
                }),
            });
        }
        ev
    }

    #[test]
    fn the_direct_encoding_is_prosts() {
        for i in 0..256 {
            let ev = variant(i);
            let ours = encode(&ev);
            let prosts = conversions::preference_event_to_pb(&ev).encode_to_vec();
            assert_eq!(&ours[HEADER..], prosts.as_slice(), "variant {i}");
            let crc = crc32fast::hash(&prosts).to_be_bytes();
            assert_eq!(ours[..HEADER], [FORMAT_V1, crc[0], crc[1], crc[2], crc[3]]);
        }
    }

    #[test]
    fn the_direct_batch_is_prosts() {
        let events: Vec<PreferenceEvent> = (0..256).map(variant).collect();
        let certificates = [vec![1u8; 300], Vec::new(), vec![2u8; 5]];
        for (batch_id, events, certificates) in [
            (7u64, &events[..], &certificates[..]),
            (0, &events[..3], &certificates[..0]),
            (u64::MAX, &events[..0], &certificates[..1]),
            (1, &events[100..101], &certificates[..]),
        ] {
            let prosts = pb::ForwardBatch {
                batch_id,
                events: events
                    .iter()
                    .map(conversions::preference_event_to_pb)
                    .collect(),
                certificates: certificates.to_vec(),
            }
            .encode_to_vec();
            assert_eq!(
                forward_batch(batch_id, events, certificates),
                prosts,
                "batch {batch_id} of {} events",
                events.len()
            );
        }
    }

    #[test]
    fn a_flipped_byte_is_detected() {
        let mut bytes = encode(&sample());
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        assert!(matches!(decode(&bytes), Err(DecodeError::Checksum { .. })));
    }
}
