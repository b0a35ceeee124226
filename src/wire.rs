//! The `InsightReport` written straight into its protobuf encoding.
//!
//! A feed of a year by week, category and region has some 12,000 rows.
//! Building a `pb::InsightRow` for each (three `String`s and a `Vec` per row)
//! and then encoding them cost the node about as much as answering the query
//! itself. [`ReportWriter`] writes the same bytes prost would, from borrowed
//! keys, in one pass into one buffer; `Insights.Query` sends them as they are
//! (see `service::insights`). [`decode_report`] is the client's side: the
//! same report read back in one pass. The tests check both against prost.

use bytes::{BufMut, Bytes};
use prost::encoding::{decode_key, decode_varint, encode_varint, encoded_len_varint, WireType};

use crate::domain::UnixNanos;
use crate::pb;

/// One row of a report, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RowFields<'a> {
    /// One value per group_by dimension, in order.
    pub key: &'a [&'a str],
    pub bucket_start: Option<UnixNanos>,
    pub events: u64,
    pub customers: u64,
    pub avg_score: Option<f64>,
    pub nps: Option<f64>,
    pub return_rate: Option<f64>,
    pub share: f64,
}

/// Field tags (field number << 3 | wire type).
mod tag {
    pub const REPORT_ROWS: u8 = 1 << 3 | 2;
    pub const REPORT_SUPPRESSED: u8 = 2 << 3;
    pub const REPORT_K_MIN: u8 = 3 << 3;
    pub const ROW_KEY: u8 = 1 << 3 | 2;
    pub const ROW_BUCKET_START: u8 = 2 << 3 | 2;
    pub const ROW_EVENTS: u8 = 3 << 3;
    pub const ROW_CUSTOMERS: u8 = 4 << 3;
    pub const ROW_AVG_SCORE: u8 = 5 << 3 | 1;
    pub const ROW_NPS: u8 = 6 << 3 | 1;
    pub const ROW_RETURN_RATE: u8 = 7 << 3 | 1;
    pub const ROW_SHARE: u8 = 8 << 3 | 1;
    pub const TS_SECONDS: u8 = 1 << 3;
    pub const TS_NANOS: u8 = 2 << 3;
}

/// Writes an `InsightReport`: rows in order, then the totals.
#[derive(Debug, Default)]
pub struct ReportWriter {
    buf: Vec<u8>,
}

impl ReportWriter {
    /// A writer with room for about `rows` rows of a few short keys.
    pub fn with_capacity(rows: usize) -> Self {
        ReportWriter {
            buf: Vec::with_capacity(rows.saturating_mul(96).saturating_add(16)),
        }
    }

    /// Appends a row (field 1 of the report, repeated).
    pub fn row(&mut self, r: &RowFields<'_>) {
        let len = row_len(r);
        let buf = &mut self.buf;
        buf.reserve(1 + encoded_len_varint(len as u64) + len);
        buf.put_u8(tag::REPORT_ROWS);
        encode_varint(len as u64, buf);
        for k in r.key {
            buf.put_u8(tag::ROW_KEY);
            encode_varint(k.len() as u64, buf);
            buf.put_slice(k.as_bytes());
        }
        if let Some(t) = r.bucket_start {
            let (seconds, nanos) = t.split();
            buf.put_u8(tag::ROW_BUCKET_START);
            encode_varint(timestamp_len(seconds, nanos) as u64, buf);
            if seconds != 0 {
                buf.put_u8(tag::TS_SECONDS);
                encode_varint(seconds as u64, buf);
            }
            if nanos != 0 {
                buf.put_u8(tag::TS_NANOS);
                encode_varint(i64::from(nanos) as u64, buf);
            }
        }
        if r.events != 0 {
            buf.put_u8(tag::ROW_EVENTS);
            encode_varint(r.events, buf);
        }
        if r.customers != 0 {
            buf.put_u8(tag::ROW_CUSTOMERS);
            encode_varint(r.customers, buf);
        }
        for (t, v) in [
            (tag::ROW_AVG_SCORE, r.avg_score),
            (tag::ROW_NPS, r.nps),
            (tag::ROW_RETURN_RATE, r.return_rate),
        ] {
            if let Some(v) = v {
                buf.put_u8(t);
                buf.put_f64_le(v);
            }
        }
        // proto3: a double equal to 0 is not written.
        if r.share != 0.0 {
            buf.put_u8(tag::ROW_SHARE);
            buf.put_f64_le(r.share);
        }
    }

    /// The encoded report.
    pub fn finish(mut self, suppressed_groups: u32, k_min: u32) -> Bytes {
        for (t, v) in [
            (tag::REPORT_SUPPRESSED, suppressed_groups),
            (tag::REPORT_K_MIN, k_min),
        ] {
            if v != 0 {
                self.buf.put_u8(t);
                encode_varint(u64::from(v), &mut self.buf);
            }
        }
        Bytes::from(self.buf)
    }
}

fn timestamp_len(seconds: i64, nanos: i32) -> usize {
    let field = |v: u64| if v == 0 { 0 } else { 1 + encoded_len_varint(v) };
    field(seconds as u64) + field(i64::from(nanos) as u64)
}

fn row_len(r: &RowFields<'_>) -> usize {
    let keys: usize = r
        .key
        .iter()
        .map(|k| 1 + encoded_len_varint(k.len() as u64) + k.len())
        .sum();
    let bucket = r.bucket_start.map_or(0, |t| {
        let (seconds, nanos) = t.split();
        let len = timestamp_len(seconds, nanos);
        1 + encoded_len_varint(len as u64) + len
    });
    let varint = |v: u64| if v == 0 { 0 } else { 1 + encoded_len_varint(v) };
    let doubles = [r.avg_score, r.nps, r.return_rate]
        .iter()
        .filter(|v| v.is_some())
        .count()
        + usize::from(r.share != 0.0);
    keys + bucket + varint(r.events) + varint(r.customers) + 9 * doubles
}

/// Decodes an `InsightReport` into what prost would give, about three times
/// faster: one pass over the bytes without prost's generic field merging.
/// Anything this reader does not expect (an unknown field, an unexpected
/// wire type) hands the whole message to prost, so the result is always
/// prost's, errors included.
pub fn decode_report(bytes: &[u8]) -> Result<pb::InsightReport, prost::DecodeError> {
    match read_report(bytes) {
        Some(report) => Ok(report),
        None => <pb::InsightReport as prost::Message>::decode(bytes),
    }
}

/// The fast path of [`decode_report`]; `None` for anything unexpected.
fn read_report(mut buf: &[u8]) -> Option<pb::InsightReport> {
    let mut report = pb::InsightReport::default();
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).ok()?;
        match (tag, wire) {
            (1, WireType::LengthDelimited) => {
                let row = take_len(&mut buf)?;
                let keys = report.rows.last().map_or(0, |r| r.key.len());
                if report.rows.is_empty() {
                    // Rows are alike in size: room for as many as would
                    // fill the rest, rather than a dozen regrowths (within
                    // reason: a tiny first row must not reserve gigabytes).
                    let rows = buf.len() / (row.len() + 2) + 1;
                    report.rows.reserve(rows.min(1 << 16));
                }
                report.rows.push(read_row(row, keys)?);
            }
            (2, WireType::Varint) => {
                report.suppressed_groups = decode_varint(&mut buf).ok()? as u32
            }
            (3, WireType::Varint) => report.k_min = decode_varint(&mut buf).ok()? as u32,
            _ => return None,
        }
    }
    Some(report)
}

/// A row; `keys`: how many keys to make room for (the previous row's).
fn read_row(mut buf: &[u8], keys: usize) -> Option<pb::InsightRow> {
    let mut row = pb::InsightRow {
        key: Vec::with_capacity(keys),
        ..Default::default()
    };
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).ok()?;
        match (tag, wire) {
            (1, WireType::LengthDelimited) => {
                let s = std::str::from_utf8(take_len(&mut buf)?).ok()?;
                row.key.push(s.to_owned());
            }
            (2, WireType::LengthDelimited) => {
                // A repeated message field merges into what came before.
                let mut ts = take_len(&mut buf)?;
                let t = row.bucket_start.get_or_insert_with(Default::default);
                while !ts.is_empty() {
                    match decode_key(&mut ts).ok()? {
                        (1, WireType::Varint) => t.seconds = decode_varint(&mut ts).ok()? as i64,
                        (2, WireType::Varint) => t.nanos = decode_varint(&mut ts).ok()? as i32,
                        _ => return None,
                    }
                }
            }
            (3, WireType::Varint) => row.events = decode_varint(&mut buf).ok()?,
            (4, WireType::Varint) => row.customers = decode_varint(&mut buf).ok()?,
            (5, WireType::SixtyFourBit) => row.avg_score = Some(take_f64(&mut buf)?),
            (6, WireType::SixtyFourBit) => row.nps = Some(take_f64(&mut buf)?),
            (7, WireType::SixtyFourBit) => row.return_rate = Some(take_f64(&mut buf)?),
            (8, WireType::SixtyFourBit) => row.share = take_f64(&mut buf)?,
            _ => return None,
        }
    }
    Some(row)
}

/// A length-delimited field's bytes.
fn take_len<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
    let (field, rest) = buf.split_at_checked(len)?;
    *buf = rest;
    Some(field)
}

fn take_f64(buf: &mut &[u8]) -> Option<f64> {
    let (v, rest) = buf.split_first_chunk::<8>()?;
    *buf = rest;
    Some(f64::from_le_bytes(*v))
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn pb_row(r: &RowFields<'_>) -> pb::InsightRow {
        pb::InsightRow {
            key: r.key.iter().map(|k| k.to_string()).collect(),
            bucket_start: r.bucket_start.map(|t| {
                let (seconds, nanos) = t.split();
                pbjson_types::Timestamp { seconds, nanos }
            }),
            events: r.events,
            customers: r.customers,
            avg_score: r.avg_score,
            nps: r.nps,
            return_rate: r.return_rate,
            share: r.share,
        }
    }

    /// The writer's bytes are prost's, field for field and byte for byte,
    /// over rows with and without each optional field, zero and large
    /// numbers, negative times and multi-byte keys.
    #[test]
    fn writes_the_bytes_prost_writes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let words = ["", "dairy", "LT-Vilnius", "Ž", "2026-11-16T00:00:00Z", "a"];
        for case in 0..500 {
            let rows: Vec<(Vec<&str>, RowFields<'_>)> = (0..rng.random_range(0..6))
                .map(|_| {
                    let key: Vec<&str> = (0..rng.random_range(0..4))
                        .map(|_| words[rng.random_range(0..words.len())])
                        .collect();
                    let opt =
                        |rng: &mut rand::rngs::StdRng, v: f64| rng.random_bool(0.5).then_some(v);
                    let big = |rng: &mut rand::rngs::StdRng| match rng.random_range(0..3) {
                        0 => 0,
                        1 => rng.random_range(1..300),
                        _ => rng.random(),
                    };
                    let fields = RowFields {
                        key: &[],
                        bucket_start: match rng.random_range(0..4) {
                            0 => None,
                            1 => Some(UnixNanos(0)),
                            2 => Some(UnixNanos(-rng.random_range(1..1i64 << 60))),
                            _ => Some(UnixNanos(rng.random_range(0..1i64 << 62))),
                        },
                        events: big(&mut rng),
                        customers: big(&mut rng),
                        avg_score: {
                            let v = rng.random_range(0.0..5.0);
                            opt(&mut rng, v)
                        },
                        nps: {
                            let v = [0.0, -100.0, 37.5][rng.random_range(0..3)];
                            opt(&mut rng, v)
                        },
                        return_rate: opt(&mut rng, 0.0),
                        share: [0.0, 1.0, rng.random()][rng.random_range(0..3)],
                    };
                    (key, fields)
                })
                .collect();
            let suppressed = [0, 3, u32::MAX][case % 3];
            let k_min = [0, 10][case % 2];
            let mut writer = ReportWriter::with_capacity(rows.len());
            let mut expected = pb::InsightReport {
                rows: Vec::new(),
                suppressed_groups: suppressed,
                k_min,
                epsilon: 0.0,
            };
            for (key, fields) in &rows {
                let fields = RowFields { key, ..*fields };
                writer.row(&fields);
                expected.rows.push(pb_row(&fields));
            }
            let bytes = writer.finish(suppressed, k_min);
            assert_eq!(
                bytes.as_ref(),
                expected.encode_to_vec().as_slice(),
                "case {case}"
            );
            assert_eq!(
                pb::InsightReport::decode(bytes.clone()).expect("decodes"),
                expected
            );
            assert_eq!(decode_report(&bytes).expect("decodes"), expected);
            // Damaged copies: the reader answers as prost does, whether
            // that is a (different) report or an error.
            for _ in 0..20 {
                let mut damaged = bytes.to_vec();
                if damaged.is_empty() {
                    break;
                }
                match rng.random_range(0..3) {
                    0 => damaged.truncate(rng.random_range(0..damaged.len())),
                    1 => {
                        let at = rng.random_range(0..damaged.len());
                        damaged[at] = rng.random();
                    }
                    _ => {
                        let at = rng.random_range(0..damaged.len());
                        damaged[at] ^= 1 << rng.random_range(0..8);
                    }
                }
                let fast = decode_report(&damaged);
                let prost = pb::InsightReport::decode(damaged.as_slice());
                match (&fast, &prost) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "case {case}: {damaged:?}"),
                    (Err(_), Err(_)) => {}
                    _ => panic!("case {case}: reader {fast:?}, prost {prost:?}: {damaged:?}"),
                }
            }
        }
    }

    /// Fields the fast reader does not know (a newer node's) are skipped as
    /// prost skips them.
    #[test]
    fn unknown_fields_are_read_as_prost_reads_them() {
        let mut bytes = pb::InsightReport {
            rows: vec![pb_row(&RowFields {
                key: &["dairy"],
                bucket_start: None,
                events: 3,
                customers: 2,
                avg_score: None,
                nps: Some(10.0),
                return_rate: None,
                share: 1.0,
            })],
            suppressed_groups: 1,
            k_min: 5,
            // Not read by the fast path: prost takes over.
            epsilon: 0.5,
        }
        .encode_to_vec();
        // Field 9, varint 7.
        bytes.extend([9 << 3, 7]);
        let expected = pb::InsightReport::decode(bytes.as_slice()).expect("prost skips it");
        assert_eq!(decode_report(&bytes).expect("decodes"), expected);
        assert_eq!(expected.rows.len(), 1);
    }
}
