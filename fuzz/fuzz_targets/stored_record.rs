//! cargo-fuzz target `stored_record`: see `chainsight::fuzzing::stored_record` for what it
//! feeds and which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chainsight::fuzzing::stored_record(data));
