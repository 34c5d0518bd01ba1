//! Operations on a kura repository: [`backup`], [`restore`], [`walk`] (ls and diff) and
//! [`check`]. Each takes an open [`kura_repo::Repository`] and plain `*Options`, reports progress
//! through a trait the binary implements, and returns typed errors ([`OpsError`]).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod backup;
pub mod check;
pub mod copy;
pub mod drill;
pub mod forget;
pub mod error;
pub mod fsmeta;
pub mod keyless;
pub mod lock;
pub mod pg;
pub mod policy;
pub mod progress;
pub mod prune;
pub mod pull;
pub mod repair;
pub mod report;
pub mod restore;
pub mod retention;
pub mod status;
pub mod topology;
pub mod walk;

pub use error::OpsError;

/// Number of cores to use for parallel work (at least 1).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}
pub use progress::{NoProgress, Progress};
