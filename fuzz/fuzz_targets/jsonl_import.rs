//! cargo-fuzz target `jsonl_import`: see `chainsight::fuzzing::jsonl_import` for what it
//! feeds and which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chainsight::fuzzing::jsonl_import(data));
