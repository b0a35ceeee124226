//! The on-disk form of a stored event: a format byte, a CRC-32 of the
//! payload, and the protobuf encoding of the `PreferenceEvent`. The checksum
//! is verified on every read, so a flipped byte is reported, never served.

use prost::Message;

use crate::conversions;
use crate::domain::PreferenceEvent;
use crate::pb;

const FORMAT_V1: u8 = 1;
const HEADER: usize = 5;

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

/// Encodes an event for storage.
pub fn encode(ev: &PreferenceEvent) -> Vec<u8> {
    let payload = conversions::preference_event_to_pb(ev).encode_to_vec();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out
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

    #[test]
    fn a_flipped_byte_is_detected() {
        let mut bytes = encode(&sample());
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        assert!(matches!(decode(&bytes), Err(DecodeError::Checksum { .. })));
    }
}
