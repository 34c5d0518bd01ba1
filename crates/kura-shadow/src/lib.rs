//! Real-time shadowing of a directory tree: the primary captures changes (`capture`, `push`),
//! the standby keeps them in an append-only journal (`journal`) and replays them onto a hot
//! mirror (`apply`); any moment the journal still holds can be materialised again (`restore`).
//! Wire and journal formats: `docs/FORMAT.md` §15.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod apply;
pub mod capture;
pub(crate) mod chunk_index;
pub mod journal;
pub mod manifest;
pub mod path;
pub mod push;
pub mod record;
pub mod rejoin;
pub mod restore;
pub mod sqlite_mirror;
pub mod sqlite_push;
pub mod sqlite_source;
pub mod sqlite_stream;
pub mod sqlite_wal;
pub mod verify;
pub mod stream;

pub use journal::Journal;
pub use manifest::Manifest;
pub use record::{Op, Record};
pub use stream::{AppendError, BranchInfo, Breaker, Held, PromoteError, SqlitePosition, Stream, StreamOptions, StreamStatus};

/// Errors of the shadow library.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Journal or stream files that are not what kura wrote.
    #[error("{what}: {detail}")]
    Corrupt {
        /// Which file.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// The standby refused or could not be reached.
    #[error("{0}")]
    Remote(String),
    /// The standby refused the token (unknown, revoked, or not of this stream).
    #[error("{0}")]
    Denied(String),
    /// The standby has a newer epoch: this primary was failed over and must rejoin.
    #[error("{0}")]
    Fenced(String),
    /// A bad argument (time, path).
    #[error("{0}")]
    Usage(String),
}

impl ShadowError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> ShadowError {
        ShadowError::Io { path: path.as_ref().display().to_string(), source }
    }
}

/// Nanoseconds since the Unix epoch now (`KURA_SHADOW_CLOCK_OFFSET` seconds added, so tests
/// can play a standby days ahead).
pub fn now_ns() -> i64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
    let off = std::env::var("KURA_SHADOW_CLOCK_OFFSET").ok().and_then(|s| s.trim().parse::<i64>().ok()).unwrap_or(0);
    t.saturating_add(off.saturating_mul(1_000_000_000))
}

/// A receive time for people: local date and time to the millisecond ("-" for none).
pub fn show_time(ns: i64) -> String {
    if ns == 0 {
        return "-".into();
    }
    jiff::Timestamp::from_nanosecond(i128::from(ns))
        .map(|t| t.to_zoned_datetime(jiff::tz::TimeZone::system()).strftime("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|_| ns.to_string())
}
