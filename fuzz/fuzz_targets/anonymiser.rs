//! cargo-fuzz target `anonymiser`: see `chainsight::fuzzing::anonymiser` for what it
//! feeds and which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chainsight::fuzzing::anonymiser(data));
