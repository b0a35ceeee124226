//! Compiles the protos under `proto/` without `protoc`: protox parses them
//! into a FileDescriptorSet, tonic-prost-build generates the messages and
//! services from it, and pbjson-build the proto3 canonical JSON mapping. The
//! encoded descriptor set is also written out for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/chainsight/v1/types.proto",
    "proto/chainsight/v1/ingest.proto",
    "proto/chainsight/v1/peering.proto",
    "proto/chainsight/v1/signals.proto",
    "proto/chainsight/v1/insights.proto",
    "proto/chainsight/v1/audit.proto",
    "proto/chainsight/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    let descriptor_bytes = fds.encode_to_vec();
    std::fs::write(out_dir.join("chainsight_descriptor.bin"), &descriptor_bytes)?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // CustomerEvent holds personal data: its Debug is written by hand
        // (src/pb.rs) so that a stray `?event` in a log line leaks nothing.
        .skip_debug([".chainsight.v1.CustomerEvent"])
        // Maps as BTreeMap: the domain keeps attributes sorted, so decoding
        // moves them without hashing, and an event encodes to the same
        // bytes every time (a HashMap encodes in a random order).
        .btree_map(".")
        .generate_default_stubs(true)
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .btree_map(["."])
        .build(&[".chainsight"])?;
    Ok(())
}
