//! Fuzz target: arbitrary bytes as the records a promoted standby sends its follower. Stable
//! twin: `kura_shadow::record`'s proptest `random_records_never_panic`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let after = data.first().copied().map(u64::from).unwrap_or(0);
    let _ = kura_shadow::record::Records::decode(data, after);
});
