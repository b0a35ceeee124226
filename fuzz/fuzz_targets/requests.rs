//! cargo-fuzz target `requests`: see `chainsight::fuzzing::requests` for what it
//! feeds and which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chainsight::fuzzing::requests(data));
