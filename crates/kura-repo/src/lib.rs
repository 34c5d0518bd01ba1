//! The kura repository format.
//!
//! A [`Repository`] sits on a [`kura_store::Store`]. Backups cut files into chunks with the
//! [`Chunker`] (FastCDC, key-seeded), store each chunk once as a blob named by a keyed BLAKE3
//! [`Id`], compressed with zstd and sealed with XChaCha20-Poly1305 under the [`MasterKey`].
//! Blobs are collected in packs ([`pack`]) whose ids are the plain BLAKE3 of their bytes, so a
//! keyless server can verify them at rest. Index files ([`index`]) map blobs to packs and can be
//! rebuilt from the packs. Directories become [`Tree`] blobs; a [`Snapshot`] names a root tree and
//! exposes its group, time and referenced packs to the storage. `docs/FORMAT.md` is the spec.
//!
//! ```
//! use kura_repo::{Repository, KdfParams, BlobKind};
//! use std::sync::Arc;
//! let dir = tempfile::tempdir().unwrap();
//! let store = Arc::new(kura_store::LocalStore::create(dir.path()).unwrap());
//! let fast = KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 };
//! let repo = Repository::init(store, b"pw", fast).unwrap();
//! let (id, new) = repo.save_blob(BlobKind::Data, b"hello").unwrap();
//! repo.flush().unwrap();
//! assert!(new);
//! assert_eq!(repo.read_blob(&id).unwrap(), b"hello");
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod chunker;
pub mod config;
pub mod crypto;
pub mod drill;
pub mod error;
pub mod fuzz;
pub mod id;
pub mod index;
pub mod keyfile;
pub mod lineage;
pub mod pack;
pub mod plan;
pub mod receipt;
pub mod repo;
pub mod session;
pub mod snapshot;
pub mod trash;
pub mod tree;

pub use chunker::Chunker;
pub use config::{Config, FORMAT_VERSION};
pub use crypto::MasterKey;
pub use error::RepoError;
pub use id::Id;
pub use keyfile::KdfParams;
pub use pack::BlobKind;
pub use repo::{KeyInfo, Repository};
pub use snapshot::{Snapshot, SnapshotBody, SnapshotPublic, Summary};
pub use tree::{Node, NodeKind, Tree, Xattr};

/// The repository format specification (`docs/FORMAT.md`), kept beside the code that implements it.
#[doc = include_str!("../../../docs/FORMAT.md")]
pub mod format_spec {}
