//! Fuzz target: arbitrary text as a topology file (`kura plan`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kura_ops::topology::fuzz_plan(data));
