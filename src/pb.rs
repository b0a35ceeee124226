//! Generated protobuf and gRPC code for package `chainsight.v1`, with the
//! proto3 canonical JSON mapping. Nothing outside the service edge and the
//! CLI uses these types: domain logic works on `crate::domain`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/chainsight.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/chainsight.v1.serde.rs"));

/// Encoded FileDescriptorSet of every chainsight proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/chainsight_descriptor.bin"));

impl std::fmt::Debug for CustomerEvent {
    /// Prints only the fields that carry no personal data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerEvent")
            .field("event_id", &self.event_id)
            .field("kind", &self.kind)
            .field("channel", &self.channel)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}
