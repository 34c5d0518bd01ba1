//! Fuzz target: arbitrary bytes as a SQLite write-ahead log (header, frames, checksum chain,
//! commits, applied to a page image). Stable twin: `kura_shadow::sqlite_wal`'s proptest
//! `any_bytes_are_read_or_refused`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kura_shadow::sqlite_wal::fuzz_wal(data);
});
