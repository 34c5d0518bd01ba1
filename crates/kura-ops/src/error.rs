//! Errors of repository operations; each names the path or object it concerns.

use kura_repo::RepoError;
use std::path::PathBuf;

/// Errors of backup, restore, check and listing.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The repository layer failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A path given on the command line does not exist.
    #[error("source path {0} does not exist")]
    SourceMissing(PathBuf),
    /// Reading or writing a local file failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done ("cannot read", "cannot create"…).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Restore would overwrite an existing file.
    #[error("{0} already exists and differs from the snapshot; use --overwrite to replace it")]
    WouldOverwrite(PathBuf),
    /// Restore met a symlink where it needs a directory and will not follow it.
    #[error("{0} is a symlink where the snapshot has a directory; refusing to restore through it")]
    SymlinkInPath(PathBuf),
    /// A snapshot path argument that is not in the snapshot.
    #[error("path {0} is not in the snapshot")]
    NoSuchPath(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// Work stopped because another thread failed; that thread's error is the one to report.
    #[error("stopped after an error in another thread")]
    Cancelled,
    /// Another process holds the work (a second prune).
    #[error("{0}")]
    Busy(String),
    /// Refused because the repository is damaged in a way that makes the operation unsafe.
    #[error("{0}")]
    Unsafe(String),
    /// Invalid option.
    #[error("{0}")]
    Invalid(String),
    /// A program kura runs for the operation (`pg_basebackup`) failed.
    #[error("{0}")]
    Tool(String),
}

impl From<kura_store::StoreError> for OpsError {
    fn from(e: kura_store::StoreError) -> Self {
        OpsError::Repo(e.into())
    }
}

impl OpsError {
    /// Builds an [`OpsError::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OpsError::Io { action, path: path.into(), source }
    }
}
