//! Fuzz target: arbitrary bytes into kura_repo::fuzz::decode_plan.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kura_repo::fuzz::decode_plan(data));
