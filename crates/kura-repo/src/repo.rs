//! The open repository: keys, index, blob reads with verification, and the thread-safe blob
//! writer that packs, uploads and indexes new blobs in the order FORMAT.md requires.

use crate::chunker::Chunker;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::error::RepoError;
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::keyfile::{KdfParams, KeyFile, KeyFileError};
use crate::pack::{self, BlobKind, Compression, PackBuilder};
use crate::plan::PrunePlan;
use crate::session::Session;
use crate::snapshot::Snapshot;
use crate::trash::TrashRecord;
use crate::tree::Tree;
use kura_store::{Kind, ObjectName, Store, StoreError};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A pack being written straight into a staged store object.
type Packer = PackBuilder<Box<dyn kura_store::Staged>>;

fn pack_write_error(e: std::io::Error) -> RepoError {
    RepoError::Store(StoreError::Io { verb: kura_store::Verb::Write, target: "a new pack".into(), source: e })
}

struct Scratch {
    level: i32,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    sealed: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { level: 0, zstd: None, sealed: Vec::new() })
    };
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// After this many new packs an index file is written, so a killed backup loses little.
const PACKS_PER_INDEX: usize = 32;

/// A listed key file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    /// Key id (hash of the key file).
    pub id: String,
    /// True for the key that opened this session.
    pub current: bool,
    /// Creation time.
    pub created: String,
    /// Host that added it.
    pub host: String,
    /// User that added it.
    pub user: String,
}

/// Prune plans with their ids.
pub type Plans = Vec<(Id, PrunePlan)>;

/// Every snapshot id with the snapshot or the error that names it.
pub type SnapshotList = Vec<(Id, Result<Snapshot, RepoError>)>;

/// Snapshots in a server's trash: each id with its record, decoded snapshot and stored bytes,
/// or the error that names it.
pub type TrashList = Vec<(Id, Result<(TrashRecord, Snapshot, Vec<u8>), RepoError>)>;

/// An open repository.
pub struct Repository {
    store: Arc<dyn Store>,
    key: MasterKey,
    config: Config,
    key_id: String,
    chunker: Chunker,
    index: RwLock<Index>,
    pending: Mutex<HashSet<Id>>,
    // One open pack per blob kind: trees stay apart from file data, so damage to a data pack
    // never hides which files it hit, and trees are fetched without reading bulk data.
    packers: [Mutex<Option<Packer>>; 2],
    unindexed: Mutex<Vec<IndexPack>>,
    stored_bytes: AtomicU64,
    plans: Mutex<Vec<(Id, PrunePlan)>>,
    // Dropped with the repository, which removes the session object.
    session: Mutex<Option<Session>>,
    // Copies of snapshot objects read before (see `with_snapshot_cache`).
    snapshot_cache: Option<Arc<dyn Store>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn pack_name(id: &Id) -> ObjectName {
    ObjectName::new(Kind::Pack, &id.to_hex())
}

fn host_user() -> (String, String) {
    let host = hostname();
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    (host, user)
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl Repository {
    /// Creates a repository in an empty store: key first, config last, so a crash leaves no
    /// half-made repository that looks valid.
    pub fn init(
        store: Arc<dyn Store>,
        password: &[u8],
        kdf: KdfParams,
    ) -> Result<Repository, RepoError> {
        if !store.list(Kind::Config)?.is_empty() {
            return Err(RepoError::AlreadyExists(store.location()));
        }
        // Data without a config is a repository that lost its config, not an empty directory:
        // never initialise over it (its keys are the only way to read that data).
        for kind in [Kind::Pack, Kind::Index, Kind::Snapshot] {
            if !store.list(kind)?.is_empty() {
                return Err(RepoError::KeyRefused(format!(
                    "{} holds repository data but no config; refusing to initialise over it",
                    store.location()
                )));
            }
        }
        // Key files without a config or data are what an interrupted init left: no repository
        // uses them, and keeping one would let it open this repository under another master key.
        for k in store.list(Kind::Key)? {
            match store.delete(Kind::Key, &k.name) {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let config = Config::new().map_err(|e| RepoError::Config { location: store.location(), source: e })?;
        let key = MasterKey::generate().map_err(|e| RepoError::KeyRefused(format!("no randomness: {e}")))?;
        let (host, user) = host_user();
        let kf = KeyFile::wrap(&key, password, kdf, &host, &user)
            .map_err(|e| RepoError::Key { id: "new".into(), source: e })?;
        let bytes = kf.encode();
        let key_id = Id::of_stored(&bytes).to_hex();
        store.put_new(Kind::Key, &key_id, &bytes)?;
        store.put_new(Kind::Config, "config", &config.encode())?;
        Ok(Self::assemble(store, key, config, key_id))
    }

    fn assemble(store: Arc<dyn Store>, key: MasterKey, config: Config, key_id: String) -> Self {
        let chunker = Chunker::new(config.chunker, key.chunker_seed());
        Repository {
            store,
            key,
            config,
            key_id,
            chunker,
            index: RwLock::new(Index::default()),
            pending: Mutex::new(HashSet::new()),
            packers: [Mutex::new(None), Mutex::new(None)],
            unindexed: Mutex::new(Vec::new()),
            stored_bytes: AtomicU64::new(0),
            plans: Mutex::new(Vec::new()),
            session: Mutex::new(None),
            snapshot_cache: None,
        }
    }

    /// Keeps a copy of every snapshot object read in `cache` (a local store), checked against
    /// its id on every read. Commands that look through every snapshot on each run (PostgreSQL's
    /// `archive_command` and `restore_command` run once per WAL file) then read each one over
    /// the network once instead of every time.
    pub fn with_snapshot_cache(mut self, cache: Arc<dyn Store>) -> Self {
        self.snapshot_cache = Some(cache);
        self
    }

    fn snapshot_object(&self, id: &Id) -> Result<(ObjectName, Vec<u8>), RepoError> {
        let Some(cache) = &self.snapshot_cache else {
            return self.get_verified(Kind::Snapshot, id);
        };
        let name = id.to_hex();
        if let Ok(bytes) = cache.get(Kind::Snapshot, &name)
            && Id::of_stored(&bytes) == *id
        {
            return Ok((ObjectName::new(Kind::Snapshot, &name), bytes));
        }
        let got = self.get_verified(Kind::Snapshot, id)?;
        // A copy that cannot be kept (full disk, a concurrent run kept it first, or a damaged one
        // sits there) only costs a read next time.
        let _ = cache.delete(Kind::Snapshot, &name);
        let _ = cache.put_new(Kind::Snapshot, &name, &got.1);
        Ok(got)
    }

    /// Opens a repository with a password; tries every key file.
    pub fn open(store: Arc<dyn Store>, password: &[u8]) -> Result<Repository, RepoError> {
        let location = store.location();
        let cfg_bytes = store.get(Kind::Config, "config").map_err(|e| match e {
            StoreError::NotFound(_) => RepoError::NotFound(location.clone()),
            e => e.into(),
        })?;
        let config = Config::decode(&cfg_bytes)
            .map_err(|e| RepoError::Config { location: location.clone(), source: e })?;
        let keys = store.list(Kind::Key)?;
        let mut last_other = None;
        for k in &keys {
            let bytes = store.get(Kind::Key, &k.name)?;
            let kf = match KeyFile::decode(&bytes) {
                Ok(kf) => kf,
                Err(e) => {
                    last_other = Some(RepoError::Key { id: k.name.clone(), source: e });
                    continue;
                }
            };
            match kf.unwrap(password) {
                Ok(key) => return Ok(Self::assemble(store, key, config, k.name.clone())),
                Err(KeyFileError::WrongPassword) => {}
                Err(e) => last_other = Some(RepoError::Key { id: k.name.clone(), source: e }),
            }
        }
        match last_other {
            Some(e) if keys.len() == 1 => Err(e),
            _ => Err(RepoError::WrongPassword { location, keys: keys.len() }),
        }
    }

    /// The storage backend.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The master key.
    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    /// The chunker for this repository.
    pub fn chunker(&self) -> &Chunker {
        &self.chunker
    }

    /// Bytes written to packs by this session.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Announces this process as a session (see [`crate::session`]). Call before
    /// [`Repository::load_index`] in every command that reads or writes blobs: prune then never
    /// deletes a pack this process may still use. Ended when the repository is dropped.
    pub fn start_session(&self, command: &str) -> Result<(), RepoError> {
        let s = Session::register(self.store.clone(), command)?;
        *lock(&self.session) = Some(s);
        Ok(())
    }

    /// This process's session id, if it started one.
    pub fn session_id(&self) -> Option<String> {
        lock(&self.session).as_ref().map(|s| s.id().to_string())
    }

    /// Reads every prune plan. Unreadable ones are returned as problems (nobody can execute
    /// them, so their packs stay).
    pub fn read_plans(&self) -> Result<(Plans, Vec<RepoError>), RepoError> {
        let mut plans = Vec::new();
        let mut problems = Vec::new();
        for l in self.store.list(Kind::Plan)? {
            let Some(id) = Id::from_hex(&l.name) else { continue };
            let (obj, bytes) = match self.get_verified(Kind::Plan, &id) {
                Ok(x) => x,
                Err(RepoError::Store(StoreError::NotFound(_))) => continue,
                Err(e @ RepoError::Corrupt { .. }) => {
                    problems.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match PrunePlan::decode(&self.key, &bytes) {
                Ok(p) => plans.push((id, p)),
                Err(d) => problems.push(RepoError::corrupt(&obj, d)),
            }
        }
        Ok((plans, problems))
    }

    /// Prune plans read by the last [`Repository::load_index`].
    pub fn plans(&self) -> Vec<(Id, PrunePlan)> {
        lock(&self.plans).clone()
    }

    /// Loads the pending prune plans, records them in this process's session, then loads every
    /// index file, so packs a plan condemns are never used for deduplication. Unreadable index
    /// files are returned as errors; their packs then look unindexed and
    /// [`Repository::index_orphan_packs`] recovers them.
    pub fn load_index(&self) -> Result<Vec<RepoError>, RepoError> {
        let (plans, mut problems) = self.read_plans()?;
        if let Some(s) = &*lock(&self.session) {
            let seen: Vec<String> = plans.iter().map(|(id, _)| id.to_hex()).collect();
            s.saw_plans(&seen)?;
        }
        // Condemned packs already deleted are left out altogether: a blob they held may have been
        // stored again in a pack that a later plan condemns, and only that copy can be read.
        let gone: Vec<Id> = if plans.is_empty() {
            Vec::new()
        } else {
            let listed: HashSet<Id> = self.store.list(Kind::Pack)?.iter().filter_map(|l| Id::from_hex(&l.name)).collect();
            plans.iter().flat_map(|(_, p)| p.condemned.iter().copied()).filter(|p| !listed.contains(p)).collect()
        };
        let mut idx = self.index.write().unwrap_or_else(|p| p.into_inner());
        idx.set_gone(gone);
        idx.set_condemned(plans.iter().flat_map(|(_, p)| p.condemned.iter().copied()));
        *lock(&self.plans) = plans;
        for l in self.store.list(Kind::Index)? {
            let Some(id) = Id::from_hex(&l.name) else {
                problems.push(RepoError::corrupt(ObjectName::new(Kind::Index, &l.name), "content does not match its name"));
                continue;
            };
            match self.read_index_file(&id) {
                Ok(f) => {
                    for p in &f.packs {
                        idx.add_pack(p.id, &p.blobs);
                    }
                }
                Err(RepoError::Store(StoreError::NotFound(_))) => {}
                Err(e @ RepoError::Corrupt { .. }) => problems.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok(problems)
    }

    /// Reads and verifies one index file.
    pub fn read_index_file(&self, id: &Id) -> Result<IndexFile, RepoError> {
        let (obj, bytes) = self.get_verified(Kind::Index, id)?;
        IndexFile::decode(&self.key, &bytes).map_err(|d| RepoError::corrupt(&obj, d))
    }

    /// Reads a content-addressed object and checks it against its name.
    fn get_verified(&self, kind: Kind, id: &Id) -> Result<(ObjectName, Vec<u8>), RepoError> {
        let obj = ObjectName::new(kind, &id.to_hex());
        let bytes = self.store.get(kind, &id.to_hex())?;
        if Id::of_stored(&bytes) != *id {
            return Err(RepoError::corrupt(&obj, "content does not match its name"));
        }
        Ok((obj, bytes))
    }

    /// Read access to the index.
    pub fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a pack's header (footer first, then the header range).
    pub fn read_pack_header(&self, id: &Id, size: u64) -> Result<pack::PackHeader, RepoError> {
        let name = id.to_hex();
        let obj = pack_name(id);
        if size < pack::FOOTER_LEN as u64 {
            return Err(RepoError::corrupt(&obj, format!("truncated to {size} bytes")));
        }
        let footer = self.store.get_range(Kind::Pack, &name, size - pack::FOOTER_LEN as u64, pack::FOOTER_LEN as u64)?;
        let hlen = pack::parse_footer(&footer, size).map_err(|e| RepoError::corrupt(&obj, e))? as u64;
        let hstart = size - pack::FOOTER_LEN as u64 - hlen;
        let sealed = self.store.get_range(Kind::Pack, &name, hstart, hlen)?;
        pack::decode_header(&self.key, &sealed, hstart).map_err(|e| RepoError::corrupt(&obj, e))
    }

    /// Finds packs no index file covers (left by a killed backup, or whose index file is
    /// damaged) and reads their headers into the in-memory index; with `persist`, also writes an
    /// index file for them. Returns how many were recovered and the packs that could not be read.
    pub fn index_orphan_packs(&self, persist: bool) -> Result<(usize, Vec<RepoError>), RepoError> {
        let listed = self.store.list(Kind::Pack)?;
        let mut recovered = Vec::new();
        let mut bad = Vec::new();
        for l in listed {
            let Some(id) = Id::from_hex(&l.name) else { continue };
            if self.index().has_pack(&id) {
                continue;
            }
            match self.read_pack_header(&id, l.size) {
                Ok(h) => recovered.push(IndexPack { id, blobs: h.entries }),
                Err(e) => bad.push(e),
            }
        }
        let n = recovered.len();
        if n > 0 {
            {
                let mut idx = self.index.write().unwrap_or_else(|p| p.into_inner());
                for p in &recovered {
                    idx.add_pack(p.id, &p.blobs);
                }
            }
            // Never persist a pack a known plan condemns: its sweep may delete it before (or
            // after) this index file lands, which would leave an index naming a missing pack.
            let keep: Vec<IndexPack> = {
                let idx = self.index();
                recovered.into_iter().filter(|p| !idx.is_condemned(&p.id)).collect()
            };
            if persist && !keep.is_empty() {
                self.write_index_file(keep)?;
            }
        }
        Ok((n, bad))
    }

    /// Writes one index file naming `packs` (which must be durable); returns its id.
    pub fn write_index_file(&self, packs: Vec<IndexPack>) -> Result<Id, RepoError> {
        let f = IndexFile { version: 1, packs };
        let bytes = f.encode(&self.key).ok_or_else(|| RepoError::KeyRefused("cannot encode index".into()))?;
        let id = Id::of_stored(&bytes);
        match self.store.put_new(Kind::Index, &id.to_hex(), &bytes) {
            Ok(()) | Err(StoreError::Exists(_)) => Ok(id),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads, authenticates, decompresses and verifies one blob.
    pub fn read_blob(&self, id: &Id) -> Result<Vec<u8>, RepoError> {
        let (pack, loc) = self.index().get(id).ok_or(RepoError::BlobMissing(*id))?;
        let sealed = self.store.get_range(Kind::Pack, &pack.to_hex(), loc.offset as u64, loc.length as u64)
            .map_err(|e| match e {
                StoreError::Short { name, len, .. } => RepoError::corrupt(name, format!("truncated to {len} bytes")),
                e => e.into(),
            })?;
        self.decode_blob(id, &pack, loc.compression, loc.raw_length, &sealed)
    }

    /// Verifies sealed blob bytes already read from `pack`.
    pub fn decode_blob(
        &self,
        id: &Id,
        pack: &Id,
        compression: Compression,
        raw_length: u32,
        sealed: &[u8],
    ) -> Result<Vec<u8>, RepoError> {
        let obj = pack_name(pack);
        let plain = self
            .key
            .open(sealed, &id.0)
            .map_err(|_| RepoError::corrupt(&obj, format!("blob {} failed authentication", id.short())))?;
        let plain = match compression {
            Compression::None => plain,
            Compression::Zstd => DECOMPRESSOR
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = zstd::bulk::Decompressor::new().ok();
                    }
                    match d.as_mut() {
                        Some(d) => d.decompress(&plain, raw_length as usize),
                        None => zstd::bulk::decompress(&plain, raw_length as usize),
                    }
                })
                .map_err(|e| RepoError::corrupt(&obj, format!("blob {} does not decompress: {e}", id.short())))?,
        };
        if plain.len() != raw_length as usize || self.key.blob_id(&plain) != *id {
            return Err(RepoError::corrupt(&obj, format!("blob {} does not match its id", id.short())));
        }
        Ok(plain)
    }

    /// Reads a tree blob.
    pub fn read_tree(&self, id: &Id) -> Result<Tree, RepoError> {
        let bytes = self.read_blob(id)?;
        Tree::decode(&bytes).map_err(|d| RepoError::corrupt(format!("tree {}", id.short()), d))
    }

    /// Stores a blob unless the repository already has it (or another thread is storing it).
    /// Returns its id and whether it was new. Thread-safe; the blob is durable only after
    /// [`Repository::flush`].
    pub fn save_blob(&self, kind: BlobKind, data: &[u8]) -> Result<(Id, bool), RepoError> {
        let (id, mine) = self.claim(data);
        if mine {
            self.store_claimed(kind, id, data)?;
        }
        Ok((id, mine))
    }

    /// Computes a blob's id and claims it: true when the repository neither has it nor is
    /// storing it, so the caller must pass it to [`Repository::store_claimed`] (possibly on
    /// another thread).
    pub fn claim(&self, data: &[u8]) -> (Id, bool) {
        let id = self.key.blob_id(data);
        let mine = !self.index().is_live(&id) && lock(&self.pending).insert(id);
        (id, mine)
    }

    /// Compresses, seals and packs a blob claimed with [`Repository::claim`].
    pub fn store_claimed(&self, kind: BlobKind, id: Id, data: &[u8]) -> Result<(), RepoError> {
        // One zstd context and two scratch buffers per thread: a fresh context per chunk costs
        // more (allocation, page faults) than compressing a small file.
        let full = SCRATCH.with(|cell| -> Result<Option<Packer>, RepoError> {
            let mut guard = cell.borrow_mut();
            let sc = &mut *guard;
            if sc.level != self.config.zstd_level || sc.zstd.is_none() {
                sc.zstd = zstd::bulk::Compressor::new(self.config.zstd_level).ok();
                sc.level = self.config.zstd_level;
            }
            // Compress straight behind the nonce's room, then encrypt in place.
            let out = &mut sc.sealed;
            out.clear();
            out.resize(24, 0);
            out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 16);
            let mut cur = std::io::Cursor::new(&mut *out);
            cur.set_position(24);
            let ok = sc.zstd.as_mut().is_some_and(|z| z.compress_to_buffer(data, &mut cur).is_ok());
            let comp = if ok && out.len() - 24 < data.len() {
                Compression::Zstd
            } else {
                out.truncate(24);
                out.extend_from_slice(data);
                Compression::None
            };
            self.key.seal_in_place(out, &id.0).map_err(|_| RepoError::KeyRefused("cannot encrypt".into()))?;
            self.add_to_pack(kind, id, comp, &sc.sealed, data.len() as u32)
        })?;
        if let Some(p) = full {
            self.upload_pack(p)?;
        }
        Ok(())
    }

    /// Appends sealed bytes to the open pack of their kind; returns the pack when it is full.
    fn add_to_pack(
        &self,
        kind: BlobKind,
        id: Id,
        comp: Compression,
        sealed: &[u8],
        raw: u32,
    ) -> Result<Option<Packer>, RepoError> {
        let mut slot = lock(&self.packers[kind as usize]);
        let p = match &mut *slot {
            Some(p) => p,
            None => slot.insert(PackBuilder::new(self.store.stage(Kind::Pack)?)),
        };
        p.add(id, kind, comp, sealed, raw).map_err(pack_write_error)?;
        Ok(if p.len() >= self.config.pack_size as usize { slot.take() } else { None })
    }

    /// Copies a blob's sealed bytes (already verified with [`Repository::decode_blob`]) into a
    /// new pack, even though the index has it: prune's repacking. Durable after
    /// [`Repository::flush`].
    pub fn copy_sealed(
        &self,
        kind: BlobKind,
        id: Id,
        compression: Compression,
        sealed: &[u8],
        raw_length: u32,
    ) -> Result<(), RepoError> {
        if let Some(p) = self.add_to_pack(kind, id, compression, sealed, raw_length)? {
            self.upload_pack(p)?;
        }
        Ok(())
    }

    /// Uploads a finished pack, then makes it visible in the in-memory index; every
    /// `PACKS_PER_INDEX` packs an index file is written. A pack is always durable before any
    /// index file names it.
    fn upload_pack(&self, p: Packer) -> Result<(), RepoError> {
        let len = p.len() as u64;
        let (pid, staged, entries) = p.finish(&self.key).map_err(pack_write_error)?;
        match staged.commit(&pid.to_hex()) {
            Ok(()) | Err(StoreError::Exists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.stored_bytes.fetch_add(len, Ordering::Relaxed);
        self.index.write().unwrap_or_else(|p| p.into_inner()).add_pack(pid, &entries);
        {
            let mut pend = lock(&self.pending);
            for e in &entries {
                pend.remove(&e.id);
            }
        }
        let batch = {
            let mut u = lock(&self.unindexed);
            u.push(IndexPack { id: pid, blobs: entries });
            if u.len() >= PACKS_PER_INDEX { Some(std::mem::take(&mut *u)) } else { None }
        };
        if let Some(b) = batch {
            self.write_index_file(b)?;
        }
        Ok(())
    }

    /// Uploads the partly filled pack and writes the index file for every pack not yet covered.
    /// After it returns, every blob saved so far is durable and indexed.
    pub fn flush(&self) -> Result<(), RepoError> {
        for packer in &self.packers {
            let p = lock(packer).take();
            if let Some(p) = p.filter(|p| !p.is_empty()) {
                self.upload_pack(p)?;
            }
        }
        let batch = std::mem::take(&mut *lock(&self.unindexed));
        if !batch.is_empty() {
            self.write_index_file(batch)?;
        }
        Ok(())
    }

    /// Writes a snapshot object; call only after [`Repository::flush`]. Returns its id.
    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<Id, RepoError> {
        let bytes = snap.encode(&self.key).ok_or_else(|| RepoError::KeyRefused("cannot encode snapshot".into()))?;
        let id = Id::of_stored(&bytes);
        self.store.put_new(Kind::Snapshot, &id.to_hex(), &bytes)?;
        Ok(id)
    }

    /// Reads and verifies one snapshot.
    pub fn read_snapshot(&self, id: &Id) -> Result<Snapshot, RepoError> {
        let (obj, bytes) = self.snapshot_object(id)?;
        Snapshot::decode(&self.key, &bytes).map_err(|d| RepoError::corrupt(&obj, d))
    }

    /// The snapshots whose public part (time, host, paths, tags) `keep` accepts, decoded, in
    /// time order; the others are never decrypted. A snapshot whose public part cannot be read
    /// comes back as its error: it might have been one of those asked for. Copies in the
    /// snapshot cache of snapshots no longer listed are dropped.
    pub fn snapshots_where(&self, keep: &dyn Fn(&crate::SnapshotPublic) -> bool) -> Result<SnapshotList, RepoError> {
        let listed = self.store.list(Kind::Snapshot)?;
        let mut out = Vec::new();
        for l in &listed {
            let Some(id) = Id::from_hex(&l.name) else { continue };
            let r = self.snapshot_object(&id).and_then(|(obj, bytes)| match crate::snapshot::decode_public(&bytes) {
                Ok((p, _)) if !keep(&p) => Ok(None),
                Ok(_) => Snapshot::decode(&self.key, &bytes).map(Some).map_err(|d| RepoError::corrupt(&obj, d)),
                Err(d) => Err(RepoError::corrupt(&obj, d)),
            });
            match r {
                Ok(None) => {}
                Ok(Some(s)) => out.push((id, Ok(s))),
                // Deleted between the listing and the read.
                Err(RepoError::Store(StoreError::NotFound(_))) => {}
                Err(e) => out.push((id, Err(e))),
            }
        }
        if let Some(cache) = &self.snapshot_cache {
            let names: HashSet<&str> = listed.iter().map(|l| l.name.as_str()).collect();
            for c in cache.list(Kind::Snapshot).unwrap_or_default() {
                if !names.contains(c.name.as_str()) {
                    let _ = cache.delete(Kind::Snapshot, &c.name);
                }
            }
        }
        out.sort_by_key(|(id, s)| (s.as_ref().map(|s| s.time()).ok(), *id));
        Ok(out)
    }

    /// Snapshots in a kura server's trash (deleted, still within the undelete window), each
    /// with its record and the decoded snapshot or the error that names it. Their data must
    /// stay until the server expires them: prune counts them as used.
    pub fn trashed(&self) -> Result<TrashList, RepoError> {
        let mut out = Vec::new();
        for l in self.store.list(Kind::Trash)? {
            let Some(id) = Id::from_hex(&l.name) else { continue };
            let obj = ObjectName::new(Kind::Trash, &l.name);
            let r = match self.store.get(Kind::Trash, &l.name) {
                // Expired between listing and reading.
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => Err(e.into()),
                Ok(bytes) => TrashRecord::decode(&id, &bytes)
                    .and_then(|(rec, snap)| Ok((rec, Snapshot::decode(&self.key, &snap)?, snap)))
                    .map_err(|d| RepoError::corrupt(&obj, d)),
            };
            out.push((id, r));
        }
        Ok(out)
    }

    /// Every snapshot, each decoded or the error that names it; sorted by time.
    pub fn snapshots(&self) -> Result<SnapshotList, RepoError> {
        let mut out = Vec::new();
        for l in self.store.list(Kind::Snapshot)? {
            let Some(id) = Id::from_hex(&l.name) else { continue };
            out.push((id, self.read_snapshot(&id)));
        }
        out.sort_by_key(|(id, s)| (s.as_ref().map(|s| s.time()).ok(), *id));
        Ok(out)
    }

    /// Resolves `latest` or a unique id prefix among readable snapshots; `filter` narrows
    /// `latest` (e.g. to one host).
    pub fn find_snapshot(
        &self,
        spec: &str,
        filter: impl Fn(&Snapshot) -> bool,
    ) -> Result<(Id, Snapshot), RepoError> {
        if spec == "latest" {
            let all = self.snapshots()?;
            let mut problems = Vec::new();
            let mut best: Option<(Id, Snapshot)> = None;
            for (id, s) in all {
                match s {
                    Ok(s) if filter(&s) => {
                        if best.as_ref().is_none_or(|(_, b)| s.time() >= b.time()) {
                            best = Some((id, s));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => problems.push(e),
                }
            }
            return match (best, problems.into_iter().next()) {
                (Some(b), _) => Ok(b),
                (None, Some(e)) => Err(e),
                (None, None) => Err(RepoError::NoSnapshot(spec.into())),
            };
        }
        let id = self.find_snapshot_id(spec)?;
        self.read_snapshot(&id).map(|s| (id, s))
    }

    /// Resolves a unique id prefix among the stored snapshots by name alone, readable or not:
    /// how a damaged or forged snapshot is named to be forgotten.
    pub fn find_snapshot_id(&self, spec: &str) -> Result<Id, RepoError> {
        let spec_l = spec.to_ascii_lowercase();
        let mut hits = self.store.list(Kind::Snapshot)?.into_iter().filter_map(|l| Id::from_hex(&l.name)).filter(|id| id.to_hex().starts_with(&spec_l));
        match (hits.next(), hits.next()) {
            (None, _) => Err(RepoError::NoSnapshot(spec.into())),
            (Some(_), Some(_)) => Err(RepoError::Ambiguous(spec.into())),
            (Some(id), None) => Ok(id),
        }
    }

    /// Snapshots marked with [`Repository::protect`].
    pub fn protections(&self) -> Result<HashSet<Id>, RepoError> {
        Ok(self.store.list(Kind::Protection)?.iter().filter_map(|l| Id::from_hex(&l.name)).collect())
    }

    /// Protects a snapshot from `forget`; `Ok(false)` when it already was.
    pub fn protect(&self, snapshot: &Id, reason: &str) -> Result<bool, RepoError> {
        let (host, user) = host_user();
        let body = serde_json::json!({
            "time": jiff::Timestamp::now().to_string(), "host": host, "user": user, "reason": reason,
        });
        match self.store.put_new(Kind::Protection, &snapshot.to_hex(), body.to_string().as_bytes()) {
            Ok(()) => Ok(true),
            Err(StoreError::Exists(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a protection; `Ok(false)` when there was none.
    pub fn unprotect(&self, snapshot: &Id) -> Result<bool, RepoError> {
        match self.store.delete(Kind::Protection, &snapshot.to_hex()) {
            Ok(()) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists key files.
    pub fn keys(&self) -> Result<Vec<KeyInfo>, RepoError> {
        let mut out = Vec::new();
        for l in self.store.list(Kind::Key)? {
            let bytes = self.store.get(Kind::Key, &l.name)?;
            let kf = KeyFile::decode(&bytes).map_err(|e| RepoError::Key { id: l.name.clone(), source: e })?;
            out.push(KeyInfo {
                current: l.name == self.key_id,
                id: l.name,
                created: kf.created,
                host: kf.host,
                user: kf.user,
            });
        }
        out.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(out)
    }

    /// Adds a key file for `password`; returns its id.
    pub fn add_key(&self, password: &[u8], kdf: KdfParams) -> Result<String, RepoError> {
        let (host, user) = host_user();
        let kf = KeyFile::wrap(&self.key, password, kdf, &host, &user)
            .map_err(|e| RepoError::Key { id: "new".into(), source: e })?;
        let bytes = kf.encode();
        let id = Id::of_stored(&bytes).to_hex();
        self.store.put_new(Kind::Key, &id, &bytes)?;
        Ok(id)
    }

    /// Removes a key file by id or unique prefix; refuses the key in use and the last key.
    pub fn remove_key(&self, prefix: &str) -> Result<String, RepoError> {
        let keys = self.keys()?;
        let hits: Vec<_> = keys.iter().filter(|k| k.id.starts_with(prefix) && !prefix.is_empty()).collect();
        let k = match hits.as_slice() {
            [k] => k,
            [] => return Err(RepoError::KeyRefused(format!("no key matches {prefix:?}"))),
            _ => return Err(RepoError::KeyRefused(format!("key prefix {prefix:?} is ambiguous"))),
        };
        if k.current {
            return Err(RepoError::KeyRefused(format!(
                "key {} opened this session; remove it with another key's password", k.id.get(..8).unwrap_or(&k.id)
            )));
        }
        if keys.len() < 2 {
            return Err(RepoError::KeyRefused("refusing to remove the last key".into()));
        }
        self.store.delete(Kind::Key, &k.id)?;
        Ok(k.id.clone())
    }

    /// Replaces the current key's password: adds the new key, then removes the old one.
    pub fn change_password(&mut self, password: &[u8], kdf: KdfParams) -> Result<String, RepoError> {
        let new_id = self.add_key(password, kdf)?;
        let old = std::mem::replace(&mut self.key_id, new_id.clone());
        self.store.delete(Kind::Key, &old)?;
        Ok(new_id)
    }
}
