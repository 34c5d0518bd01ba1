//! Operations on a kura repository: [`backup`], [`restore`], [`walk`] (ls and diff) and
//! [`check`]. Each takes an open [`kura_repo::Repository`] and plain `*Options`, reports progress
//! through a trait the binary implements, and returns typed errors ([`OpsError`]).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod backup;
pub mod check;
pub mod error;
pub mod fsmeta;
pub mod progress;
pub mod restore;
pub mod walk;

pub use error::OpsError;
pub use progress::{NoProgress, Progress};
