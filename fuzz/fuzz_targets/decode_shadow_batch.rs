//! Fuzz target: arbitrary bytes as a shadow batch (what a primary sends a standby). Stable twin:
//! `kura_shadow::record`'s proptest `random_bodies_never_panic`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kura_shadow::record::BatchMeta::decode(data);
});
