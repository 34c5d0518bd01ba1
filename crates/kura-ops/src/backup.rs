//! Backup: walk the sources into an in-memory tree (reusing unchanged files from the parent
//! snapshot), read changed files on all cores (read → chunk → hash → compress → seal → pack),
//! then write trees bottom-up, flush packs and index, and write the snapshot last.

use crate::error::OpsError;
use crate::fsmeta::{node_from_meta, read_xattrs, unchanged};
use crate::progress::Progress;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use kura_repo::{BlobKind, Id, Node, NodeKind, RepoError, Repository, Snapshot, SnapshotBody, SnapshotPublic, Summary, Tree};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What to back up and how.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Source paths (files or directories).
    pub paths: Vec<PathBuf>,
    /// Gitignore-style exclude patterns.
    pub excludes: Vec<String>,
    /// Files of exclude patterns, one per line.
    pub exclude_files: Vec<PathBuf>,
    /// Do not cross filesystem boundaries.
    pub one_file_system: bool,
    /// Tags to record.
    pub tags: Vec<String>,
    /// Host name to record.
    pub host: String,
    /// Snapshot time to record (default: now).
    pub time: Option<jiff::Timestamp>,
    /// Explicit parent snapshot id; `None` picks the latest with the same host and paths.
    pub parent: Option<String>,
    /// Read every file even if unchanged.
    pub force: bool,
    /// Reader threads (0 = one per core).
    pub threads: usize,
    /// The path a stream backup records for its snapshot (default `/<filename>`): one fixed
    /// path keeps a series of streams (a database's WAL files) in one retention group.
    pub record_as: Option<String>,
}

/// A file that could not be backed up (the snapshot is still saved).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceError {
    /// The path.
    pub path: String,
    /// Why.
    pub error: String,
}

/// The outcome of a backup.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupResult {
    /// The new snapshot's id.
    pub snapshot: String,
    /// Its parent, if any.
    pub parent: Option<String>,
    /// Counters.
    pub summary: Summary,
    /// Entries that could not be read (exit code 3).
    pub errors: Vec<SourceError>,
    /// Files that kept changing while being read; saved as last read.
    pub changed_during_backup: Vec<String>,
    /// Packs indexed from an earlier interrupted run.
    pub recovered_packs: usize,
}

struct Built {
    node: Node,
    children: Vec<usize>,
}

/// The walked tree, stored in fixed blocks: a single `Vec` of ~100k nodes doubles its capacity
/// and copies itself while growing (~30 MB of peak memory on the Linux tree).
#[derive(Default)]
struct Arena {
    blocks: Vec<Vec<Built>>,
    len: usize,
}

const ARENA_BLOCK: usize = 4096;

impl Arena {
    fn push(&mut self, b: Built) -> usize {
        if self.len.is_multiple_of(ARENA_BLOCK) {
            self.blocks.push(Vec::with_capacity(ARENA_BLOCK));
        }
        if let Some(last) = self.blocks.last_mut() {
            last.push(b);
        }
        self.len += 1;
        self.len - 1
    }
}

impl std::ops::Index<usize> for Arena {
    type Output = Built;
    fn index(&self, i: usize) -> &Built {
        &self.blocks[i / ARENA_BLOCK][i % ARENA_BLOCK]
    }
}

impl std::ops::IndexMut<usize> for Arena {
    fn index_mut(&mut self, i: usize) -> &mut Built {
        &mut self.blocks[i / ARENA_BLOCK][i % ARENA_BLOCK]
    }
}

struct Job {
    arena: usize,
    path: PathBuf,
    alias_of: Option<usize>,
}

/// A file for the worker threads: what the walk saw, so they can tell whether it changed.
struct ReadJob {
    job: usize,
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
}

struct Walker<'a> {
    repo: &'a Repository,
    opts: &'a BackupOptions,
    ignore: Gitignore,
    arena: Arena,
    jobs: Vec<Job>,
    // Files to read go to the worker threads as soon as the walk finds them.
    queue: crossbeam_channel::Sender<ReadJob>,
    inodes: HashMap<(u64, u64), usize>,
    errors: Vec<SourceError>,
    summary: Summary,
    progress: &'a dyn Progress,
    // Ctrl-C and a fatal error in a worker end the walk early too.
    stop: [Option<&'a AtomicBool>; 2],
    // A storage failure met by the walk itself (the repository unreachable, not damaged).
    fatal: Option<OpsError>,
}

fn absolute(p: &Path) -> Result<PathBuf, OpsError> {
    let abs = std::path::absolute(p).map_err(|e| OpsError::io("cannot resolve", p, e))?;
    // Resolve `.`/`..` lexically, like restic: a symlink named as a source is kept as a symlink.
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

impl<'a> Walker<'a> {
    fn add(&mut self, node: Node) -> usize {
        self.arena.push(Built { node, children: Vec::new() })
    }

    fn error(&mut self, path: &Path, e: impl std::fmt::Display) {
        let msg = format!("{}: {e}", path.display());
        self.progress.warn(&msg);
        self.errors.push(SourceError { path: path.display().to_string(), error: e.to_string() });
        self.summary.errors += 1;
    }

    fn parent_children(&mut self, tree: Option<Id>) -> HashMap<Vec<u8>, Node> {
        let Some(t) = tree else { return HashMap::new() };
        match self.repo.read_tree(&t) {
            Ok(t) => t.nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            // The storage failing (a server gone, a disk error) is no damage to work around:
            // the backup stops with it instead of reading everything again first.
            Err(RepoError::Store(e)) if !matches!(e, kura_store::StoreError::NotFound(_) | kura_store::StoreError::Short { .. }) => {
                if let Some(f) = self.stop[1] {
                    f.store(true, Ordering::Relaxed);
                }
                self.fatal.get_or_insert(OpsError::Repo(RepoError::Store(e)));
                HashMap::new()
            }
            // A damaged parent only costs re-reading files; the new snapshot stays complete.
            Err(e) => {
                self.progress.warn(&format!("parent tree unreadable, reading files again: {e}"));
                HashMap::new()
            }
        }
    }

    /// Adds the entry at `path` (already lstat'ed) under `dir`.
    fn visit(&mut self, dir: usize, path: &Path, meta: &fs::Metadata, old: Option<&Node>, root_dev: u64) {
        let name = path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
        let mut node = node_from_meta(&name, meta);
        node.xattrs = read_xattrs(path);
        match node.kind {
            NodeKind::Dir => {
                self.summary.dirs += 1;
                let idx = self.add(node);
                self.arena[dir].children.push(idx);
                if !self.opts.one_file_system || meta.dev() == root_dev {
                    let parent_tree = old.filter(|o| o.kind == NodeKind::Dir).and_then(|o| o.subtree);
                    self.walk_dir(idx, path, parent_tree, root_dev);
                }
            }
            NodeKind::Symlink => {
                match fs::read_link(path) {
                    Ok(t) => node.target = t.as_os_str().as_bytes().to_vec(),
                    Err(e) => return self.error(path, e),
                }
                let idx = self.add(node);
                self.arena[dir].children.push(idx);
            }
            NodeKind::File => {
                self.summary.files += 1;
                self.summary.bytes_total += node.size;
                let reuse = !self.opts.force
                    && old.is_some_and(|o| {
                        unchanged(o, &node) && {
                            let idx = self.repo.index();
                            // A chunk only in a pack a prune condemned (or lost) is stored again.
                            o.content.iter().all(|c| idx.is_live(c))
                        }
                    });
                let hard = node.nlink > 1;
                let key = (node.dev, node.inode);
                if reuse {
                    node.content = old.map(|o| o.content.clone()).unwrap_or_default();
                    self.summary.files_unchanged += 1;
                } else if old.is_some() {
                    self.summary.files_changed += 1;
                } else {
                    self.summary.files_new += 1;
                }
                let idx = self.add(node);
                self.arena[dir].children.push(idx);
                if !reuse {
                    let alias_of = if hard { self.inodes.get(&key).copied() } else { None };
                    if hard && alias_of.is_none() {
                        self.inodes.insert(key, self.jobs.len());
                    }
                    if alias_of.is_none() {
                        let n = &self.arena[idx].node;
                        self.progress.add_total(1, n.size);
                        let job = ReadJob { job: self.jobs.len(), path: path.to_path_buf(), size: n.size, mtime_ns: n.mtime_ns };
                        // A send fails only when every worker stopped on a fatal error, reported later.
                        let _ = self.queue.send(job);
                    }
                    self.jobs.push(Job { arena: idx, path: path.to_path_buf(), alias_of });
                }
            }
            _ => {
                let idx = self.add(node);
                self.arena[dir].children.push(idx);
            }
        }
    }

    fn walk_dir(&mut self, idx: usize, path: &Path, parent_tree: Option<Id>, root_dev: u64) {
        let rd = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => return self.error(path, e),
        };
        let mut names = Vec::new();
        for e in rd {
            match e {
                Ok(e) => names.push(e.file_name()),
                Err(e) => self.error(path, e),
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let old = self.parent_children(parent_tree);
        for n in names {
            if self.stop.iter().flatten().any(|f| f.load(Ordering::Relaxed)) {
                return;
            }
            let child = path.join(&n);
            let meta = match fs::symlink_metadata(&child) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(e) => {
                    self.error(&child, e);
                    continue;
                }
            };
            if self.ignore.matched(&child, meta.is_dir()).is_ignore() {
                continue;
            }
            self.visit(idx, &child, &meta, old.get(n.as_bytes()), root_dev);
        }
    }

    /// Inserts a source path below the virtual root, creating ancestor directory nodes from the
    /// real ancestors' metadata.
    fn add_source(&mut self, root: usize, path: &Path, parent_root: Option<Id>) -> Result<(), OpsError> {
        let meta = fs::symlink_metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => OpsError::SourceMissing(path.to_path_buf()),
            _ => OpsError::io("cannot read", path, e),
        })?;
        let mut dir = root;
        let mut old_tree = parent_root;
        let mut cur = PathBuf::from("/");
        let comps: Vec<_> = path.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        if comps.is_empty() {
            // The source is `/` itself: the root node is that directory.
            let mut node = node_from_meta(b"", &meta);
            node.xattrs = read_xattrs(path);
            self.arena[root].node = Node { name: Vec::new(), ..node };
            self.walk_dir(root, path, parent_root, meta.dev());
            return Ok(());
        }
        for (i, c) in comps.iter().enumerate() {
            let name = c.as_os_str().as_bytes().to_vec();
            cur.push(c);
            let old = self.parent_children(old_tree);
            let old_node = old.get(&name).cloned();
            if i + 1 == comps.len() {
                self.visit(dir, &cur, &meta, old_node.as_ref(), meta.dev());
                return Ok(());
            }
            let existing = self.arena[dir].children.iter().copied().find(|&ch| self.arena[ch].node.name == name);
            dir = match existing {
                Some(ch) => ch,
                None => {
                    // An ancestor is recorded as the directory it leads to, even when it is a
                    // symlink (`/var/run`, merged /usr): the source below it lives in that directory.
                    let m = fs::metadata(&cur).map_err(|e| OpsError::io("cannot read", &cur, e))?;
                    let node = node_from_meta(&name, &m);
                    let idx = self.add(node);
                    self.arena[dir].children.push(idx);
                    idx
                }
            };
            old_tree = old_node.and_then(|n| n.subtree);
        }
        Ok(())
    }
}

fn build_ignore(opts: &BackupOptions) -> Result<Gitignore, OpsError> {
    let mut b = GitignoreBuilder::new("/");
    for p in &opts.excludes {
        b.add_line(None, p).map_err(|e| OpsError::Invalid(format!("bad exclude pattern {p:?}: {e}")))?;
    }
    for f in &opts.exclude_files {
        let text = fs::read_to_string(f).map_err(|e| OpsError::io("cannot read exclude file", f, e))?;
        for line in text.lines() {
            b.add_line(Some(f.clone()), line)
                .map_err(|e| OpsError::Invalid(format!("bad pattern {line:?} in {}: {e}", f.display())))?;
        }
    }
    b.build().map_err(|e| OpsError::Invalid(format!("exclude patterns: {e}")))
}

/// Result of reading one file.
struct ReadOutcome {
    content: Vec<Id>,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    changed: bool,
}

/// Stores the chunks of `r`; returns the chunk ids and bytes read.
pub fn store_stream(
    repo: &Repository,
    r: impl Read,
    size_hint: u64,
    buf: &mut Vec<u8>,
    ctx: &Ctx<'_>,
) -> Result<(Vec<Id>, u64), OpsError> {
    // Small files are sealed by their reader (no copy); a big file's chunks go to the sealer
    // threads so that one large file still keeps every core busy.
    let offload = size_hint >= OFFLOAD_SIZE;
    let Ctx { stats, interrupt, progress, sealer, failed } = *ctx;
    let mut ids = Vec::new();
    let n = repo.chunker().for_each_chunk_of_file::<_, ChunkErr>(r, size_hint, buf, |chunk| {
        if interrupt.is_some_and(|i| i.load(Ordering::Relaxed)) {
            return Err(ChunkErr::Ops(OpsError::Interrupted));
        }
        if failed.load(Ordering::Relaxed) {
            return Err(ChunkErr::Ops(OpsError::Cancelled));
        }
        let (id, new) = repo.claim(chunk);
        if new && offload {
            sealer
                .send((id, chunk.to_vec()))
                .map_err(|_| ChunkErr::Ops(OpsError::Invalid("the compression threads stopped".into())))?;
        } else if new {
            repo.store_claimed(BlobKind::Data, id, chunk).map_err(|e| ChunkErr::Ops(e.into()))?;
        }
        if new {
            stats.blobs_added.fetch_add(1, Ordering::Relaxed);
            stats.bytes_added.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        progress.advance(0, chunk.len() as u64);
        ids.push(id);
        Ok(())
    });
    match n {
        Ok(n) => {
            stats.bytes_read.fetch_add(n, Ordering::Relaxed);
            Ok((ids, n))
        }
        Err(ChunkErr::Io(e)) => Err(OpsError::io("cannot read", PathBuf::from("-"), e)),
        Err(ChunkErr::Ops(e)) => Err(e),
    }
}

/// Files at least this big have their chunks compressed by the sealer threads.
const OFFLOAD_SIZE: u64 = 8 << 20;

/// What the reading code shares: counters, the stop flags, progress, and the queue of new chunks
/// for the sealer threads.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    stats: &'a Stats,
    interrupt: Option<&'a AtomicBool>,
    progress: &'a dyn Progress,
    sealer: &'a crossbeam_channel::Sender<(Id, Vec<u8>)>,
    failed: &'a AtomicBool,
}

type SealerHandle<'s> = std::thread::ScopedJoinHandle<'s, Result<(), OpsError>>;

/// Starts one sealer per core: they compress, encrypt and pack new chunks, so even a single
/// large file (a database dump) keeps every core busy while its reader chunks and hashes.
fn spawn_sealers<'s, 'e: 's>(
    scope: &'s std::thread::Scope<'s, 'e>,
    repo: &'e Repository,
    rx: crossbeam_channel::Receiver<(Id, Vec<u8>)>,
    failed: &'e AtomicBool,
) -> Vec<SealerHandle<'s>> {
    let n = crate::cores();
    (0..n)
        .map(|_| {
            let rx = rx.clone();
            scope.spawn(move || {
                for (id, data) in rx.iter() {
                    if let Err(e) = repo.store_claimed(BlobKind::Data, id, &data) {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e.into());
                    }
                }
                Ok(())
            })
        })
        .collect()
}

fn join_sealers(handles: Vec<SealerHandle<'_>>) -> Result<(), OpsError> {
    let mut first = Ok(());
    for h in handles {
        let r = h.join().unwrap_or_else(|_| Err(OpsError::Invalid("a compression thread crashed".into())));
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// Runs `f` with sealer threads; returns once every chunk it queued is packed.
fn with_sealers<T>(
    repo: &Repository,
    stats: &Stats,
    interrupt: Option<&AtomicBool>,
    progress: &dyn Progress,
    failed: &AtomicBool,
    f: impl FnOnce(&Ctx<'_>) -> Result<T, OpsError>,
) -> Result<T, OpsError> {
    let (tx, rx) = crossbeam_channel::bounded::<(Id, Vec<u8>)>(4);
    std::thread::scope(|scope| {
        let sealers = spawn_sealers(scope, repo, rx, failed);
        let ctx = Ctx { stats, interrupt, progress, sealer: &tx, failed };
        let r = f(&ctx);
        drop(tx);
        let sealed = join_sealers(sealers);
        // A sealer's error (full disk) is the cause of any reader error it provoked.
        match (sealed, r) {
            (Err(e), _) if !matches!(e, OpsError::Cancelled) => Err(e),
            (_, Err(e)) => Err(e),
            (s, Ok(v)) => s.map(|()| v),
        }
    })
}

/// Counters shared by the worker threads.
#[derive(Default)]
pub struct Stats {
    blobs_added: AtomicU64,
    bytes_added: AtomicU64,
    bytes_read: AtomicU64,
}

enum ChunkErr {
    Io(std::io::Error),
    Ops(OpsError),
}
impl From<std::io::Error> for ChunkErr {
    fn from(e: std::io::Error) -> Self {
        ChunkErr::Io(e)
    }
}

const O_NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;

fn ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

fn open_nofollow(path: &Path) -> std::io::Result<File> {
    File::options().read(true).custom_flags(O_NOFOLLOW).open(path)
}

fn recently_modified(mtime_ns: i64) -> bool {
    let now = jiff::Timestamp::now().as_nanosecond() as i64;
    now.saturating_sub(mtime_ns) < 2_000_000_000
}

/// Reads one file; a file that changes while being read is read again (up to three times).
fn read_file(
    repo: &Repository,
    path: &Path,
    expect: (u64, i64),
    buf: &mut Vec<u8>,
    ctx: &Ctx<'_>,
) -> Result<Result<ReadOutcome, std::io::Error>, OpsError> {
    let mut attempt = 0;
    let (mut size, mut mtime) = expect;
    loop {
        let f = match open_nofollow(path) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let (content, n) = match store_stream(repo, &f, expect.0, buf, ctx) {
            Ok(x) => x,
            Err(OpsError::Io { source, .. }) => return Ok(Err(source)),
            Err(e) => return Err(e),
        };
        let after = match f.metadata() {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        let (amtime, actime) = (ns(after.mtime(), after.mtime_nsec()), ns(after.ctime(), after.ctime_nsec()));
        let mut stable = after.size() == n && n == size && amtime == mtime;
        // File timestamps tick coarsely (a few ms), so a rewrite of the same size can keep its
        // mtime. A file modified in the last seconds is read a second time: only two identical
        // reads count as a consistent copy.
        if stable && recently_modified(amtime) {
            let f2 = match open_nofollow(path) {
                Ok(f) => f,
                Err(e) => return Ok(Err(e)),
            };
            match store_stream(repo, f2, expect.0, buf, ctx) {
                Ok((again, _)) => stable = again == content,
                Err(OpsError::Io { source, .. }) => return Ok(Err(source)),
                Err(e) => return Err(e),
            }
        }
        attempt += 1;
        if stable || attempt >= 3 {
            return Ok(Ok(ReadOutcome { content, size: n, mtime_ns: amtime, ctime_ns: actime, changed: !stable }));
        }
        size = after.size();
        mtime = amtime;
    }
}

/// Runs a backup of `opts.paths` into `repo` (index must be loaded).
pub fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &dyn Progress,
    interrupt: Option<&AtomicBool>,
) -> Result<BackupResult, OpsError> {
    let started = std::time::Instant::now();
    if opts.paths.is_empty() {
        return Err(OpsError::Invalid("no source paths given".into()));
    }
    let (recovered_packs, _) = repo.index_orphan_packs(true)?;
    let mut paths: Vec<PathBuf> = opts.paths.iter().map(|p| absolute(p)).collect::<Result<_, _>>()?;
    paths.sort();
    paths.dedup();
    // A path inside another source is already covered by it.
    let covered: Vec<bool> = paths
        .iter()
        .map(|p| paths.iter().any(|q| q != p && p.starts_with(q)))
        .collect();
    let paths: Vec<PathBuf> = paths.into_iter().zip(covered).filter(|(_, c)| !c).map(|(p, _)| p).collect();
    for p in &paths {
        if fs::symlink_metadata(p).is_err() {
            return Err(OpsError::SourceMissing(p.clone()));
        }
    }
    let path_strings: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let parent = find_parent(repo, opts, &path_strings)?;
    let ignore = build_ignore(opts)?;
    let stats = Stats::default();
    let (tx, rx) = crossbeam_channel::unbounded::<ReadJob>();
    let failed = AtomicBool::new(false);
    let (w, outcomes) = with_sealers(repo, &stats, interrupt, progress, &failed, |ctx| std::thread::scope(|scope| {
        let workers = read_workers(scope, repo, rx, ctx, opts.threads);
        let mut w = Walker {
            repo,
            opts,
            ignore,
            arena: Arena::default(),
            jobs: Vec::new(),
            queue: tx,
            inodes: HashMap::new(),
            errors: Vec::new(),
            summary: Summary::default(),
            progress,
            stop: [interrupt, Some(&failed)],
            fatal: None,
        };
        let root = w.add(Node::new(Vec::new(), NodeKind::Dir));
        let parent_root = parent.as_ref().map(|(_, s)| s.body.tree);
        let walked = paths.iter().try_for_each(|p| w.add_source(root, p, parent_root));
        // Closing the queue lets the workers finish; join them before acting on any error.
        let (tx_closed, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut w.queue, tx_closed));
        let outcomes = collect_workers(workers, w.jobs.len());
        if let Some(e) = w.fatal.take() {
            return Err(e);
        }
        walked?;
        Ok((w, outcomes?))
    }))?;
    let mut w = w;
    let root = 0;
    let mut changed = Vec::new();
    let mut skip = HashSet::new();
    for (i, job) in w.jobs.iter().enumerate() {
        let out = match job.alias_of {
            Some(a) => &outcomes[a],
            None => &outcomes[i],
        };
        match out {
            Ok(o) => {
                let n = &mut w.arena[job.arena].node;
                n.content = o.content.clone();
                n.size = o.size;
                n.mtime_ns = o.mtime_ns;
                n.ctime_ns = o.ctime_ns;
                if o.changed && job.alias_of.is_none() {
                    changed.push(job.path.display().to_string());
                    progress.warn(&format!("{}: file changed while being read; saved as last read", job.path.display()));
                }
            }
            Err(e) => {
                if job.alias_of.is_none() {
                    let msg = format!("{}: {e}", job.path.display());
                    progress.warn(&msg);
                    w.errors.push(SourceError { path: job.path.display().to_string(), error: e.to_string() });
                    w.summary.errors += 1;
                }
                skip.insert(job.arena);
            }
        }
    }
    if interrupt.is_some_and(|i| i.load(Ordering::Relaxed)) {
        return Err(OpsError::Interrupted);
    }

    let mut referenced = HashSet::new();
    let tree = save_tree(repo, &w.arena, root, &skip, &mut referenced, &stats)?;
    let mut summary = w.summary;
    summary.bytes_read = stats.bytes_read.load(Ordering::Relaxed);
    summary.blobs_added = stats.blobs_added.load(Ordering::Relaxed);
    summary.bytes_added = stats.bytes_added.load(Ordering::Relaxed);
    summary.seconds = started.elapsed().as_secs_f64();
    let parent_id = parent.as_ref().map(|(id, _)| id.to_hex());
    let (id, summary) = commit(repo, opts, path_strings, tree, &referenced, parent_id, summary)?;
    Ok(BackupResult {
        snapshot: id.to_hex(),
        parent: parent.map(|(id, _)| id.to_hex()),
        summary,
        errors: w.errors,
        changed_during_backup: changed,
        recovered_packs,
    })
}

/// The commit point of a backup: flushes packs and index, then writes the snapshot naming the
/// packs of every referenced blob. Returns its id and the final counters.
fn commit(
    repo: &Repository,
    opts: &BackupOptions,
    paths: Vec<String>,
    tree: Id,
    referenced: &HashSet<Id>,
    parent: Option<String>,
    mut summary: Summary,
) -> Result<(Id, Summary), OpsError> {
    repo.flush()?;
    let mut packs: Vec<Id> = {
        let idx = repo.index();
        let mut set = HashSet::new();
        for id in referenced {
            set.insert(idx.get(id).ok_or(kura_repo::RepoError::BlobMissing(*id))?.0);
        }
        set.into_iter().collect()
    };
    packs.sort();
    ensure_present(repo, &packs)?;
    summary.bytes_stored = repo.stored_bytes();
    let snap = Snapshot {
        public: SnapshotPublic {
            time: opts.time.unwrap_or_else(jiff::Timestamp::now).to_string(),
            host: opts.host.clone(),
            paths,
            tags: opts.tags.clone(),
            packs,
            original: None,
        },
        body: SnapshotBody {
            tree,
            parent,
            user: std::env::var("USER").unwrap_or_default(),
            program: format!("kura {}", env!("CARGO_PKG_VERSION")),
            excludes: opts.excludes.clone(),
            summary: summary.clone(),
        },
    };
    Ok((repo.save_snapshot(&snap)?, summary))
}

/// Last line of defence against a prune that judged this session dead (a suspended machine
/// that missed its heartbeats): a snapshot is never committed while a pack it needs is gone.
pub(crate) fn ensure_present(repo: &Repository, packs: &[Id]) -> Result<(), OpsError> {
    let present: HashSet<Id> =
        repo.store().list(kura_store::Kind::Pack)?.iter().filter_map(|l| Id::from_hex(&l.name)).collect();
    if let Some(gone) = packs.iter().find(|p| !present.contains(p)) {
        return Err(OpsError::Unsafe(format!(
            "pack {} this snapshot relies on was deleted by a concurrent prune; no snapshot was written, run the command again",
            gone.short()
        )));
    }
    Ok(())
}

/// The sorted packs holding every blob reachable from a root tree (a snapshot's public list).
pub(crate) fn packs_of(repo: &Repository, root: Id) -> Result<Vec<Id>, OpsError> {
    let mut packs = HashSet::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(t) = stack.pop() {
        if !seen.insert(t) {
            continue;
        }
        let tree = repo.read_tree(&t)?;
        let idx = repo.index();
        packs.insert(idx.get(&t).ok_or(kura_repo::RepoError::BlobMissing(t))?.0);
        for n in &tree.nodes {
            for c in &n.content {
                packs.insert(idx.get(c).ok_or(kura_repo::RepoError::BlobMissing(*c))?.0);
            }
            stack.extend(n.subtree);
        }
    }
    let mut v: Vec<Id> = packs.into_iter().collect();
    v.sort();
    Ok(v)
}

fn find_parent(
    repo: &Repository,
    opts: &BackupOptions,
    paths: &[String],
) -> Result<Option<(Id, Snapshot)>, OpsError> {
    if opts.force {
        return Ok(None);
    }
    if let Some(p) = &opts.parent {
        return Ok(Some(repo.find_snapshot(p, |_| true)?));
    }
    match repo.find_snapshot("latest", |s| s.public.host == opts.host && s.public.paths == paths) {
        Ok(x) => Ok(Some(x)),
        // No usable parent only means every file is read.
        Err(_) => Ok(None),
    }
}

type Outcome = Result<ReadOutcome, std::io::Error>;
type Worker<'s> = std::thread::ScopedJoinHandle<'s, Result<Vec<(usize, Outcome)>, OpsError>>;

/// Starts the readers, by default one per core: a third one on 2 cores was measured to add
/// ~20 MiB of peak memory and no speed.
fn read_workers<'s, 'e: 's>(
    scope: &'s std::thread::Scope<'s, 'e>,
    repo: &'e Repository,
    rx: crossbeam_channel::Receiver<ReadJob>,
    ctx: &'e Ctx<'e>,
    threads: usize,
) -> Vec<Worker<'s>> {
    let threads = if threads == 0 { crate::cores() } else { threads };
    (0..threads)
        .map(|_| {
            let rx = rx.clone();
            scope.spawn(move || {
                let mut buf = Vec::new();
                let mut done = Vec::new();
                for job in rx.iter() {
                    if ctx.failed.load(Ordering::Relaxed) {
                        break;
                    }
                    match read_file(repo, &job.path, (job.size, job.mtime_ns), &mut buf, ctx) {
                        Ok(r) => {
                            ctx.progress.advance(1, 0);
                            done.push((job.job, r));
                        }
                        Err(e) => {
                            ctx.failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
                Ok(done)
            })
        })
        .collect()
}

fn collect_workers(workers: Vec<Worker<'_>>, jobs: usize) -> Result<Vec<Outcome>, OpsError> {
    let mut out: Vec<Option<Outcome>> = (0..jobs).map(|_| None).collect();
    let mut fatal = None;
    for w in workers {
        match w.join() {
            Ok(Ok(done)) => {
                for (i, r) in done {
                    out[i] = Some(r);
                }
            }
            // The first real error wins over the cancellations it caused.
            Ok(Err(e)) if matches!(fatal, None | Some(OpsError::Cancelled)) => fatal = Some(e),
            Ok(Err(_)) => {}
            Err(_) => {
                fatal.get_or_insert(OpsError::Invalid("a reader thread crashed".into()));
            }
        }
    }
    if let Some(e) = fatal {
        return Err(e);
    }
    // Hardlink aliases are never sent; their slot stays empty and is filled from the first link.
    Ok(out.into_iter().map(|r| r.unwrap_or_else(|| Err(std::io::Error::other("not read")))).collect())
}

fn save_tree(
    repo: &Repository,
    arena: &Arena,
    idx: usize,
    skip: &HashSet<usize>,
    referenced: &mut HashSet<Id>,
    stats: &Stats,
) -> Result<Id, OpsError> {
    let mut nodes = Vec::with_capacity(arena[idx].children.len());
    for &c in &arena[idx].children {
        if skip.contains(&c) {
            continue;
        }
        let mut n = arena[c].node.clone();
        if n.kind == NodeKind::Dir {
            n.subtree = Some(save_tree(repo, arena, c, skip, referenced, stats)?);
        }
        referenced.extend(n.content.iter().copied());
        nodes.push(n);
    }
    let bytes = Tree::new(nodes).encode();
    let (id, new) = repo.save_blob(BlobKind::Tree, &bytes)?;
    if new {
        stats.blobs_added.fetch_add(1, Ordering::Relaxed);
        stats.bytes_added.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    referenced.insert(id);
    Ok(id)
}

/// Backs up one stream (e.g. a database dump on stdin) as a single file `filename` at the root.
pub fn backup_stdin(
    repo: &Repository,
    input: impl Read,
    filename: &str,
    opts: &BackupOptions,
    progress: &dyn Progress,
    interrupt: Option<&AtomicBool>,
) -> Result<BackupResult, OpsError> {
    let started = std::time::Instant::now();
    if !kura_repo::tree::is_safe_name(filename.as_bytes()) {
        return Err(OpsError::Invalid(format!("--stdin-filename {filename:?} must be a plain file name")));
    }
    let (recovered_packs, _) = repo.index_orphan_packs(true)?;
    let stats = Stats::default();
    let mut buf = Vec::new();
    let failed = AtomicBool::new(false);
    let (content, size) = with_sealers(repo, &stats, interrupt, progress, &failed, |ctx| store_stream(repo, input, u64::MAX, &mut buf, ctx)).map_err(|e| match e {
        OpsError::Io { source, .. } => OpsError::io("cannot read", "standard input", source),
        e => e,
    })?;
    let now = jiff::Timestamp::now();
    let mut node = Node::new(filename.as_bytes().to_vec(), NodeKind::File);
    node.mode = 0o644;
    node.uid = rustix::process::getuid().as_raw();
    node.gid = rustix::process::getgid().as_raw();
    node.mtime_ns = now.as_nanosecond() as i64;
    node.size = size;
    node.content = content;
    let mut referenced: HashSet<Id> = node.content.iter().copied().collect();
    let tree_bytes = Tree::new(vec![node]).encode();
    let (tree, new) = repo.save_blob(BlobKind::Tree, &tree_bytes)?;
    if new {
        stats.blobs_added.fetch_add(1, Ordering::Relaxed);
        stats.bytes_added.fetch_add(tree_bytes.len() as u64, Ordering::Relaxed);
    }
    referenced.insert(tree);
    let summary = Summary {
        files: 1,
        files_new: 1,
        bytes_total: size,
        bytes_read: size,
        blobs_added: stats.blobs_added.load(Ordering::Relaxed),
        bytes_added: stats.bytes_added.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        ..Summary::default()
    };
    let recorded = opts.record_as.clone().unwrap_or_else(|| format!("/{filename}"));
    let (id, summary) = commit(repo, opts, vec![recorded], tree, &referenced, None, summary)?;
    Ok(BackupResult {
        snapshot: id.to_hex(),
        parent: None,
        summary,
        errors: Vec::new(),
        changed_during_backup: Vec::new(),
        recovered_packs,
    })
}
