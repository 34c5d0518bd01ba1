//! Fuzz target: arbitrary bytes as a standby's manifest (what a primary receives). Stable twin:
//! `kura_shadow::manifest`'s proptest `random_bytes_never_panic_the_decoder`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kura_shadow::Manifest::decode(data);
});
