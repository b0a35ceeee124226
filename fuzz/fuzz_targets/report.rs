//! cargo-fuzz target `report`: see `chainsight::fuzzing::report` for what it
//! feeds and which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chainsight::fuzzing::report(data));
