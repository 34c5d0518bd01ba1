//! Fuzz target: arbitrary text into the retention and prune option parsers.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kura_ops::retention::fuzz_parsers(data));
