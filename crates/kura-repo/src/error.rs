//! Errors of the repository layer. Corruption is its own variant and always names the object.

use crate::config::ConfigError;
use crate::id::Id;
use crate::keyfile::KeyFileError;
use kura_store::StoreError;

/// Errors opening, reading or writing a repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No repository at the location.
    #[error("no repository at {0}")]
    NotFound(String),
    /// `init` found one already.
    #[error("a repository already exists at {0}")]
    AlreadyExists(String),
    /// No key file opens with the given password.
    #[error("wrong password: none of the {keys} key(s) in {location} opens with it")]
    WrongPassword {
        /// Where.
        location: String,
        /// How many keys were tried.
        keys: usize,
    },
    /// The config object is unusable (too new, malformed).
    #[error("config of {location}: {source}")]
    Config {
        /// Where.
        location: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// A key file problem other than a wrong password.
    #[error("key {id}: {source}")]
    Key {
        /// Key id.
        id: String,
        /// Why.
        #[source]
        source: KeyFileError,
    },
    /// A stored object failed verification.
    #[error("{object} is corrupt: {detail}")]
    Corrupt {
        /// The object's path (`data/ab/…`, `index/…`, `snapshots/…`).
        object: String,
        /// What is wrong.
        detail: String,
    },
    /// A blob a tree or snapshot references is not in the index.
    #[error("blob {0} is missing from the repository index (run `kura check`)")]
    BlobMissing(Id),
    /// No snapshot matches.
    #[error("no snapshot matches {0:?}")]
    NoSnapshot(String),
    /// A prefix matches several snapshots.
    #[error("snapshot id prefix {0:?} matches more than one snapshot")]
    Ambiguous(String),
    /// Refused key operation.
    #[error("{0}")]
    KeyRefused(String),
    /// The storage backend failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for RepoError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoStore(l) => RepoError::NotFound(l),
            e => RepoError::Store(e),
        }
    }
}

impl RepoError {
    /// A corruption error for an object.
    pub fn corrupt(object: impl std::fmt::Display, detail: impl std::fmt::Display) -> Self {
        RepoError::Corrupt { object: object.to_string(), detail: detail.to_string() }
    }
}
