//! Storage for kura repositories: a flat namespace of write-once objects grouped by kind.
//!
//! The [`Store`] trait is all the repository format needs from a backend: create an object that
//! must not exist yet, read it (whole or a range), list a kind, delete (admin jobs only). The
//! local directory backend ([`LocalStore`]) is the embedded default; an S3 backend (OpenDAL) and
//! the kura server's HTTP client implement the same trait, so operations never see the difference.
//!
//! ```
//! use kura_store::{Kind, LocalStore, Store};
//! let dir = tempfile::tempdir().unwrap();
//! let store = LocalStore::create(dir.path()).unwrap();
//! store.put_new(Kind::Snapshot, "abcd", b"bytes").unwrap();
//! assert_eq!(store.get(Kind::Snapshot, "abcd").unwrap(), b"bytes");
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod blocks;
mod local;
pub mod remote;
pub mod s3;
pub mod s3lock;

pub use local::LocalStore;
pub use remote::{RemoteOptions, RemoteStore};
pub use s3::{S3Options, S3Store};

use std::fmt;

/// The kinds of object a repository stores; each is a separate listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The repository's `config` object (one, named `config`).
    Config,
    /// Passphrase-wrapped copies of the master key.
    Key,
    /// Pack files holding encrypted blobs.
    Pack,
    /// Index files mapping blobs to packs.
    Index,
    /// Snapshot objects.
    Snapshot,
    /// Live writer and reader sessions: the only objects that are rewritten in place
    /// ([`Store::replace`]), as heartbeats.
    Session,
    /// Prune plans: packs condemned by a prune, deleted once no session can still use them.
    Plan,
    /// Protection marks: `protected/<snapshot id>` keeps that snapshot from `forget`.
    Protection,
    /// Server receipts: `receipts/<snapshot id>` records when a kura server received that
    /// snapshot, by the server's clock. Written only by the server.
    Receipt,
    /// Deleted snapshots within a kura server's undelete window: `trash/<snapshot id>` holds
    /// the snapshot's bytes and when it was deleted. Written and expired only by the server.
    Trash,
    /// Repack lineage: which packs a prune moved still-used data out of, and into which packs,
    /// so a keyless server can follow snapshots' public pack lists to where their data lives.
    /// Written by admin prunes only.
    Lineage,
    /// Restore drill records: `drills/<BLAKE3 of the bytes>`, plain JSON facts of one drill
    /// (which snapshot, how many files, how long, the result), no file names. Added by any
    /// token that can read (a drill needs only to read), never changed.
    Drill,
}

impl Kind {
    /// Every kind, in the order a full listing walks them.
    pub const ALL: [Kind; 12] = [
        Kind::Config,
        Kind::Key,
        Kind::Pack,
        Kind::Index,
        Kind::Snapshot,
        Kind::Session,
        Kind::Plan,
        Kind::Protection,
        Kind::Receipt,
        Kind::Trash,
        Kind::Lineage,
        Kind::Drill,
    ];

    /// The directory (or key prefix) objects of this kind live under.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Config => "",
            Kind::Key => "keys",
            Kind::Pack => "data",
            Kind::Index => "index",
            Kind::Snapshot => "snapshots",
            Kind::Session => "sessions",
            Kind::Plan => "plans",
            Kind::Protection => "protected",
            Kind::Receipt => "receipts",
            Kind::Trash => "trash",
            Kind::Lineage => "lineage",
            Kind::Drill => "drills",
        }
    }

    /// The kind's path segment in the server's URLs (`config` for the config object).
    pub fn wire(self) -> &'static str {
        match self {
            Kind::Config => "config",
            k => k.dir(),
        }
    }

    /// The kind a URL path segment names.
    pub fn from_wire(segment: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.wire() == segment)
    }

    /// True for kinds whose objects are named by the BLAKE3 hash of their bytes, which anyone
    /// (a keyless server) can check.
    pub fn content_addressed(self) -> bool {
        matches!(self, Kind::Key | Kind::Pack | Kind::Index | Kind::Snapshot | Kind::Plan | Kind::Lineage | Kind::Drill)
    }
}

/// An object's full name for messages: `data/ab/abcdef…`, `snapshots/…`, `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    /// The kind of object.
    pub kind: Kind,
    /// Its name within the kind.
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Config => write!(f, "{}", self.name),
            Kind::Pack if self.name.is_char_boundary(2) && self.name.len() > 2 => {
                write!(f, "data/{}/{}", &self.name[..2], self.name)
            }
            k => write!(f, "{}/{}", k.dir(), self.name),
        }
    }
}

impl ObjectName {
    /// Names an object.
    pub fn new(kind: Kind, name: &str) -> Self {
        ObjectName { kind, name: name.to_string() }
    }
}

/// What a store operation was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Reading an object.
    Read,
    /// Writing an object.
    Write,
    /// Listing a kind.
    List,
    /// Deleting an object.
    Delete,
    /// Opening or creating the store itself.
    Open,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Read => "read",
            Verb::Write => "write",
            Verb::List => "list",
            Verb::Delete => "delete",
            Verb::Open => "open",
        })
    }
}

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object {0} not found")]
    NotFound(ObjectName),
    /// `put_new` found the object already there; nothing was written.
    #[error("object {0} already exists")]
    Exists(ObjectName),
    /// The store itself (the repository location) does not exist.
    #[error("no repository at {0}")]
    NoStore(String),
    /// A repository location that cannot be used as written (a malformed server address).
    #[error("{0}")]
    BadLocation(String),
    /// A name that is not a valid object name (path separators, dots, empty).
    #[error("invalid object name {0:?}")]
    InvalidName(String),
    /// A range read reached past the end of the object.
    #[error("object {name} is shorter than expected: wanted bytes {offset}..{end}, it has {len}")]
    Short {
        /// The object.
        name: ObjectName,
        /// Start of the wanted range.
        offset: u64,
        /// End of the wanted range.
        end: u64,
        /// Actual length.
        len: u64,
    },
    /// A kura server refused the request for lack of rights (token unknown, revoked, or its
    /// role does not allow this).
    #[error("the server refused to {verb} {target}: {reason}")]
    Denied {
        /// What was being done.
        verb: Verb,
        /// The object or location.
        target: String,
        /// The server's reason.
        reason: String,
    },
    /// A kura server answered with an error other than a refusal.
    #[error("cannot {verb} {target}: server answered {status}: {message}")]
    Server {
        /// What was being done.
        verb: Verb,
        /// The object or location.
        target: String,
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// An object store refused a request for good (an invalid bucket name, an unsupported
    /// request): retrying would not help.
    #[error("cannot {verb} {target}: {detail}")]
    Backend {
        /// What was being done.
        verb: Verb,
        /// The object or location.
        target: String,
        /// The store's answer.
        detail: String,
    },
    /// The object is under an S3 Object Lock retention: nobody may delete it before `until`.
    #[error("object {name} is locked until {}", fmt_time(*until))]
    Locked {
        /// The object.
        name: ObjectName,
        /// When its retention ends.
        until: std::time::SystemTime,
    },
    /// The server could not be reached or the connection broke, after retries.
    #[error("cannot {verb} {target}: {detail}")]
    Network {
        /// What was being done.
        verb: Verb,
        /// The object or location.
        target: String,
        /// What went wrong on the wire.
        detail: String,
    },
    /// The medium failed: permission, full disk, I/O error.
    #[error("cannot {verb} {target}")]
    Io {
        /// What was being done.
        verb: Verb,
        /// The object or location.
        target: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// True when the medium ran out of space (the caller may free space and run again).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.raw_os_error() == Some(28))
            || matches!(self, StoreError::Server { status: 507, .. })
    }

    /// True when the store cannot be written at all (read-only media, no permission).
    pub fn is_read_only(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if source.raw_os_error() == Some(30) || source.kind() == std::io::ErrorKind::PermissionDenied)
            || matches!(self, StoreError::Denied { .. })
    }

    /// True for errors worth retrying (network hiccups); the local store has none.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut))
            || matches!(self, StoreError::Network { .. })
            || matches!(self, StoreError::Server { status, .. } if *status >= 500 && *status != 507)
    }
}

/// A time for messages, in UTC to the second.
pub fn fmt_time(t: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(t).map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_else(|_| format!("{t:?}"))
}

/// What a store's Object Lock upkeep did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LockUpkeep {
    /// Objects whose retention was extended.
    pub extended: u64,
    /// Old versions (of deleted or replaced objects) deleted once their retention ended.
    pub versions_deleted: u64,
    /// Their bytes.
    pub version_bytes: u64,
    /// Old versions still locked, left for a later run.
    pub versions_locked: u64,
}

/// A listed object: its name and stored size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Name within its kind.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was written, where the store says (health metrics use it).
    pub modified: Option<std::time::SystemTime>,
}

/// A storage backend. All methods are blocking and safe to call from several threads.
///
/// Durability contract: when `put_new` returns `Ok`, the object is durable (survives a power
/// loss) and visible to `get` and `list` with exactly the given bytes. An object is never
/// visible half-written. Objects are never overwritten: the only way to change a name's bytes
/// is `delete` followed by `put_new`, and only admin operations delete.
pub trait Store: Send + Sync {
    /// Creates `kind/name` with `data`. Fails with [`StoreError::Exists`] (and writes nothing)
    /// when the name is taken. Durable on return.
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError>;

    /// Reads a whole object.
    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError>;

    /// Reads a whole object as a stream: a copy between stores writes it out as it arrives,
    /// through one small buffer, instead of holding all of it. Stores that cannot stream read
    /// it whole first.
    fn reader(&self, kind: Kind, name: &str) -> Result<ObjectReader<'_>, StoreError> {
        let data = self.get(kind, name)?;
        Ok(ObjectReader::new(ObjectName::new(kind, name), Box::new(std::io::Cursor::new(data))))
    }

    /// Reads `len` bytes at `offset`; fails with [`StoreError::Short`] past the end.
    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64)
    -> Result<Vec<u8>, StoreError>;

    /// Lists the objects of a kind (any order). In-progress writes are never listed.
    fn list(&self, kind: Kind) -> Result<Vec<Listed>, StoreError>;

    /// The size of one object, [`StoreError::NotFound`] when it does not exist. Stores that can
    /// ask without reading the object (a file's metadata, an S3 HEAD) override this.
    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        self.get(kind, name).map(|d| d.len() as u64)
    }

    /// Starts an object whose name is known only once all its bytes are written (a pack is
    /// named by the hash of its bytes). Nothing is visible until [`Staged::commit`]; dropping the
    /// staged object without committing discards it.
    fn stage(&self, kind: Kind) -> Result<Box<dyn Staged>, StoreError>;

    /// Creates or atomically replaces a [`Kind::Session`] object (heartbeats); every other kind
    /// is refused with [`StoreError::InvalidName`], so write-once objects stay write-once.
    fn replace(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError>;

    /// Deletes an object; deleting a missing object is `NotFound`. Durable on return.
    fn delete(&self, kind: Kind, name: &str) -> Result<(), StoreError>;

    /// A human description of where the store is, for messages.
    fn location(&self) -> String;

    /// Fails with [`StoreError::Denied`] when this client may not delete or change existing
    /// objects (a kura server's backup and read tokens), so that commands which do (forget,
    /// prune, repair) refuse before doing any work. Local stores allow it.
    fn check_admin(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// True when every read is a network round trip: readers then keep more requests in flight
    /// than they have cores.
    fn is_remote(&self) -> bool {
        false
    }

    /// A hint that `len` bytes at `offset` of a pack will be read soon (a restore knows its
    /// order): remote stores start fetching them in the background, so the round trip overlaps
    /// the work on what was fetched before. Never fails; others ignore it.
    /// Returns false when the store has enough in flight already: the caller hints again a
    /// little later.
    fn prefetch(&self, name: &str, offset: u64, len: u64) -> bool {
        let _ = (name, offset, len);
        true
    }

    /// The retention a store with S3 Object Lock gives every new object (the bucket's default),
    /// `None` when it locks nothing. Deleting a locked object fails with
    /// [`StoreError::Locked`] and changes nothing.
    fn lock_period(&self) -> Option<std::time::Duration> {
        None
    }

    /// When the object's Object Lock retention ends, if it is locked now (deleting it would be
    /// refused with [`StoreError::Locked`]).
    fn locked_until(&self, kind: Kind, name: &str) -> Result<Option<std::time::SystemTime>, StoreError> {
        let _ = (kind, name);
        Ok(None)
    }

    /// Makes sure each named object stays locked at least until its time (extends shorter
    /// retentions; never shortens one). Returns how many were extended.
    fn keep_locked(&self, kind: Kind, until: &[(String, std::time::SystemTime)]) -> Result<u64, StoreError> {
        let _ = (kind, until);
        Ok(0)
    }

    /// Deletes old versions of objects (left by deletes and replacements on a locked bucket)
    /// whose retention has ended; those still locked stay.
    fn purge_versions(&self) -> Result<LockUpkeep, StoreError> {
        Ok(LockUpkeep::default())
    }

    /// Removes temporary files of writes that a killed process left, if older than `age`
    /// (no write takes that long); returns how many and their bytes. They are never part of
    /// the repository, only wasted space. Stores without such files do nothing.
    fn remove_stale_temporaries(&self, age: std::time::Duration) -> Result<(u64, u64), StoreError> {
        let _ = age;
        Ok((0, 0))
    }
}

/// A whole object being read as a stream; see [`Store::reader`].
pub struct ObjectReader<'a> {
    name: ObjectName,
    inner: Box<dyn std::io::Read + Send + 'a>,
}

impl<'a> ObjectReader<'a> {
    /// Wraps a stream of the object's bytes. An error the stream yields that carries a
    /// [`StoreError`] (`io::Error::other(StoreError)`, how a store says what went wrong) comes
    /// out as that error; any other as a read error of the object.
    pub fn new(name: ObjectName, inner: Box<dyn std::io::Read + Send + 'a>) -> Self {
        ObjectReader { name, inner }
    }

    /// Reads until `buf` is full or the object has ended: the count (0 once it has ended).
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<usize, StoreError> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(n)
    }

    /// Reads the rest of the object into `out` (replacing what it held), with `hint` bytes
    /// reserved up front.
    pub fn read_all(mut self, out: &mut Vec<u8>, hint: usize) -> Result<(), StoreError> {
        out.clear();
        out.reserve(hint);
        match self.inner.read_to_end(out) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, e: std::io::Error) -> StoreError {
        match e.downcast::<StoreError>() {
            Ok(store) => store,
            Err(e) => StoreError::Io { verb: Verb::Read, target: self.name.to_string(), source: e },
        }
    }
}

/// An object being written; see [`Store::stage`].
pub trait Staged: std::io::Write + Send {
    /// Makes the bytes written so far durable and visible as `kind/name`, with the guarantees
    /// of [`Store::put_new`] (never replaces an existing object: [`StoreError::Exists`]).
    fn commit(self: Box<Self>, name: &str) -> Result<(), StoreError>;
}

/// A staged object buffered in memory and handed whole to `commit` (remote stores: one upload
/// once the name, the hash of the bytes, is known).
pub(crate) struct MemStaged<C> {
    buf: Vec<u8>,
    commit: C,
}

impl<C: FnOnce(&str, Vec<u8>) -> Result<(), StoreError> + Send> MemStaged<C> {
    pub(crate) fn new(commit: C) -> Self {
        MemStaged { buf: Vec::new(), commit }
    }
}

impl<C: Send> std::io::Write for MemStaged<C> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<C: FnOnce(&str, Vec<u8>) -> Result<(), StoreError> + Send> Staged for MemStaged<C> {
    fn commit(self: Box<Self>, name: &str) -> Result<(), StoreError> {
        let MemStaged { buf, commit } = *self;
        commit(name, buf)
    }
}

/// Checks that `name` is a plain object name: no separators, not `.`/`..`, not empty, and not
/// starting with `.` (reserved for in-progress temporary files).
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(StoreError::InvalidName(name.to_string())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields its pieces one per read, then its error.
    struct Pieces(Vec<Vec<u8>>, Option<std::io::Error>);

    impl std::io::Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return self.1.take().map_or(Ok(0), Err);
            }
            let mut p = self.0.remove(0);
            let n = p.len().min(buf.len());
            buf[..n].copy_from_slice(&p[..n]);
            if n < p.len() {
                self.0.insert(0, p.split_off(n));
            }
            Ok(n)
        }
    }

    #[test]
    fn object_readers_fill_across_short_reads_and_keep_the_stores_error() {
        let name = ObjectName::new(Kind::Pack, "ab12");
        let mut r = ObjectReader::new(name.clone(), Box::new(Pieces(vec![b"abc".to_vec(), b"de".to_vec(), b"fgh".to_vec()], None)));
        let mut buf = [0u8; 4];
        assert_eq!(r.fill(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"abcd");
        assert_eq!(r.fill(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"efgh");
        assert_eq!(r.fill(&mut buf).unwrap(), 0);
        // A store's own error comes out as it is; any other names the object.
        let broke = StoreError::Network { verb: Verb::Read, target: name.to_string(), detail: "the answer broke off".into() };
        let r = ObjectReader::new(name.clone(), Box::new(Pieces(vec![b"abc".to_vec()], Some(std::io::Error::other(broke)))));
        let mut out = Vec::new();
        assert!(matches!(r.read_all(&mut out, 0), Err(StoreError::Network { detail, .. }) if detail == "the answer broke off"));
        let mut r = ObjectReader::new(name, Box::new(Pieces(Vec::new(), Some(std::io::Error::from_raw_os_error(5)))));
        let err = r.fill(&mut buf).unwrap_err();
        assert!(matches!(&err, StoreError::Io { verb: Verb::Read, target, .. } if target.contains("ab12")), "{err}");
    }

    #[test]
    fn names_with_separators_or_dots_are_refused() {
        for bad in ["", ".", "..", "a/b", ".tmp-x", "a b", "../x"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["config", "abcdef0123", "key-1_x"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn object_names_display_as_paths() {
        assert_eq!(ObjectName::new(Kind::Pack, "abcdef").to_string(), "data/ab/abcdef");
        assert_eq!(ObjectName::new(Kind::Snapshot, "12").to_string(), "snapshots/12");
        assert_eq!(ObjectName::new(Kind::Config, "config").to_string(), "config");
    }
}
