//! Restore: recreate a snapshot's tree below a target directory and never outside it. Files are
//! written on all cores to temporary names, every chunk verified, then renamed into place, so a
//! re-run resumes: complete files are kept, unfinished ones are redone.

use crate::error::OpsError;
use crate::progress::Progress;
use kura_repo::{Id, Node, NodeKind, Repository};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Prefix of temporary files a restore writes; leftovers of a killed restore are removed.
pub const TMP_PREFIX: &str = ".kura-restore-";

/// What to restore and where.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Target directory (created if missing).
    pub target: PathBuf,
    /// Restore only these snapshot paths (and what is below them); empty = everything.
    pub include: Vec<String>,
    /// Replace existing files that differ.
    pub overwrite: bool,
}

/// Counters of a restore.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreResult {
    /// Files written.
    pub files_restored: u64,
    /// Files already complete in the target (resume).
    pub files_skipped: u64,
    /// Directories.
    pub dirs: u64,
    /// Other entries (symlinks, fifos, devices, hardlinks).
    pub others: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Metadata that could not be applied (e.g. ownership when not root).
    pub warnings: Vec<String>,
}

struct FileJob {
    path: PathBuf,
    node: Node,
}

struct Plan {
    files: Vec<FileJob>,
    links: Vec<(PathBuf, PathBuf)>,
    dirs: Vec<(PathBuf, Node)>,
    result: RestoreResult,
}

fn included(rel: &[u8], include: &[Vec<u8>]) -> bool {
    include.is_empty()
        || include.iter().any(|inc| {
            let (short, long): (&[u8], &[u8]) = if inc.len() <= rel.len() { (inc, rel) } else { (rel, inc) };
            long.starts_with(short) && (long.len() == short.len() || long[short.len()] == b'/')
        })
}

fn normalize_include(s: &str) -> Vec<u8> {
    let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    parts.join("/").into_bytes()
}

/// Makes sure `path` is a real directory we may write into: creates it, or accepts an existing
/// directory; never follows a symlink.
/// Makes `path` a directory; true when it was created now (so it is empty).
fn ensure_dir(path: &Path, overwrite: bool) -> Result<bool, OpsError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(false),
        Ok(m) if m.file_type().is_symlink() && !overwrite => Err(OpsError::SymlinkInPath(path.to_path_buf())),
        Ok(_) if !overwrite => Err(OpsError::WouldOverwrite(path.to_path_buf())),
        Ok(_) => {
            fs::remove_file(path).map_err(|e| OpsError::io("cannot remove", path, e))?;
            fs::create_dir(path).map(|_| true).map_err(|e| OpsError::io("cannot create directory", path, e))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            fs::create_dir(path).map(|_| true).map_err(|e| OpsError::io("cannot create directory", path, e))
        }
        Err(e) => Err(OpsError::io("cannot inspect", path, e)),
    }
}

/// Removes what stands at `path` so a non-directory can be created there; false when something
/// is there and overwriting is off.
fn clear_for(path: &Path, overwrite: bool) -> Result<bool, OpsError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        Err(e) => Err(OpsError::io("cannot inspect", path, e)),
        Ok(_) if !overwrite => Ok(false),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map(|_| true).map_err(|e| OpsError::io("cannot remove", path, e)),
        Ok(_) => fs::remove_file(path).map(|_| true).map_err(|e| OpsError::io("cannot remove", path, e)),
    }
}

fn mtime_of(n: &Node) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(n.mtime_ns.div_euclid(1_000_000_000), n.mtime_ns.rem_euclid(1_000_000_000) as u32)
}

/// The effective user and group, asked once (restore applies metadata to every file).
fn effective_ids() -> (u32, u32) {
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()))
}

fn is_root() -> bool {
    effective_ids().0 == 0
}

/// What restored metadata is applied to: a file still open (through its descriptor: no path
/// lookups, nothing to follow), or an entry by path, never following a symlink.
pub enum MetaTarget<'a> {
    /// An open file.
    Open(&'a File),
    /// The entry at the path given beside it.
    Path,
}

/// Applies ownership (root only), xattrs, mode and mtime, in that order (chown clears setuid).
/// `path` names the entry in messages, and is the target itself for [`MetaTarget::Path`].
pub fn apply_meta(target: MetaTarget<'_>, path: &Path, n: &Node, warnings: &Mutex<Vec<String>>) {
    use xattr::FileExt as _;
    let warn = |what: &str, e: &dyn std::fmt::Display| {
        if let Ok(mut w) = warnings.lock() {
            w.push(format!("{}: cannot set {what}: {e}", path.display()));
        }
    };
    // Files the restore creates already belong to the restoring user: skip the call then.
    let mine = (n.uid, n.gid) == effective_ids();
    if is_root() && !mine {
        let (uid, gid) = (Some(rustix::fs::Uid::from_raw(n.uid)), Some(rustix::fs::Gid::from_raw(n.gid)));
        let r = match target {
            MetaTarget::Open(f) => rustix::fs::fchown(f, uid, gid),
            MetaTarget::Path => rustix::fs::chownat(rustix::fs::CWD, path, uid, gid, rustix::fs::AtFlags::SYMLINK_NOFOLLOW),
        };
        if let Err(e) = r {
            warn("owner", &e);
        }
    }
    for x in &n.xattrs {
        let name = OsStr::from_bytes(&x.name);
        let r = match target {
            MetaTarget::Open(f) => f.set_xattr(name, &x.value),
            MetaTarget::Path => xattr::set(path, name, &x.value),
        };
        if let Err(e) = r {
            warn(&format!("xattr {}", String::from_utf8_lossy(&x.name)), &e);
        }
    }
    let mode = fs::Permissions::from_mode(n.mode);
    let r = match target {
        MetaTarget::Open(f) => f.set_permissions(mode),
        // A symlink has no mode of its own, and set_permissions would follow it.
        MetaTarget::Path if n.kind == NodeKind::Symlink => Ok(()),
        MetaTarget::Path => fs::set_permissions(path, mode),
    };
    if let Err(e) = r {
        warn("mode", &e);
    }
    let t = mtime_of(n);
    let r = match target {
        MetaTarget::Open(f) => filetime::set_file_handle_times(f, Some(t), Some(t)),
        MetaTarget::Path => filetime::set_symlink_file_times(path, t, t),
    };
    if let Err(e) = r {
        warn("mtime", &e);
    }
}

/// True when the existing file at `path` is the node's finished restore: size and mtime match
/// (set last) and every chunk hashes to its id. The content is checked because files are not
/// synced one by one: after a power loss a name, size and mtime can survive without the data.
fn already_restored(repo: &Repository, path: &Path, n: &Node) -> bool {
    let meta_ok = fs::symlink_metadata(path).is_ok_and(|m| {
        m.is_file() && m.size() == n.size && m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()) == n.mtime_ns
    });
    if !meta_ok {
        return false;
    }
    let Ok(f) = File::open(path) else { return false };
    let mut off = 0u64;
    let mut buf = Vec::new();
    for id in &n.content {
        let Some((_, loc)) = repo.index().get(id) else { return false };
        buf.resize(loc.raw_length as usize, 0);
        if f.read_exact_at(&mut buf, off).is_err() || repo.key().blob_id(&buf) != *id {
            return false;
        }
        off += loc.raw_length as u64;
    }
    true
}

/// What planning every directory shares.
struct Planner<'a> {
    repo: &'a Repository,
    opts: &'a RestoreOptions,
    include: &'a [Vec<u8>],
    warnings: &'a Mutex<Vec<String>>,
    hardlinks: HashMap<(u64, u64), PathBuf>,
    plan: Plan,
}

/// Plans the restore of tree `tree` into `dir` (`rel` below the snapshot root) and creates its
/// directories, symlinks and special files; `fresh` when `dir` was created by this run.
fn plan_dir(p: &mut Planner<'_>, tree: &Id, dir: &Path, rel: &[u8], fresh: bool) -> Result<(), OpsError> {
    let (repo, opts, include, warnings) = (p.repo, p.opts, p.include, p.warnings);
    let t = repo.read_tree(tree)?;
    // Remove temporaries of an earlier, killed restore. A directory created by this run is
    // empty: nothing in it needs looking at.
    if let Some(rd) = (!fresh).then(|| fs::read_dir(dir).ok()).flatten() {
        for e in rd.flatten() {
            if e.file_name().as_bytes().starts_with(TMP_PREFIX.as_bytes()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    for n in t.nodes {
        // Tree::decode already refused `..`, `/` and empty names; a path is built from them only.
        let mut r = rel.to_vec();
        if !r.is_empty() {
            r.push(b'/');
        }
        r.extend_from_slice(&n.name);
        if !included(&r, include) {
            continue;
        }
        let path = dir.join(OsStr::from_bytes(&n.name));
        match n.kind {
            NodeKind::Dir => {
                let created = fresh || ensure_dir(&path, opts.overwrite)?;
                if fresh {
                    fs::create_dir(&path).map_err(|e| OpsError::io("cannot create directory", &path, e))?;
                }
                p.plan.result.dirs += 1;
                if let Some(sub) = n.subtree {
                    plan_dir(p, &sub, &path, &r, created)?;
                }
                p.plan.dirs.push((path, n));
            }
            NodeKind::File => {
                if n.nlink > 1 {
                    if let Some(first) = p.hardlinks.get(&(n.dev, n.inode)) {
                        p.plan.links.push((first.clone(), path));
                        continue;
                    }
                    p.hardlinks.insert((n.dev, n.inode), path.clone());
                }
                if !fresh {
                    if already_restored(repo, &path, &n) {
                        p.plan.result.files_skipped += 1;
                        continue;
                    }
                    if !clear_for(&path, opts.overwrite)? {
                        return Err(OpsError::WouldOverwrite(path));
                    }
                }
                p.plan.files.push(FileJob { path, node: n });
            }
            NodeKind::Symlink => {
                if !fresh {
                    if fs::read_link(&path).is_ok_and(|t| t.as_os_str().as_bytes() == n.target) {
                        continue;
                    }
                    if !clear_for(&path, opts.overwrite)? {
                        return Err(OpsError::WouldOverwrite(path));
                    }
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&n.target), &path)
                    .map_err(|e| OpsError::io("cannot create symlink", &path, e))?;
                apply_meta(MetaTarget::Path, &path, &n, warnings);
                p.plan.result.others += 1;
            }
            NodeKind::Fifo | NodeKind::CharDev | NodeKind::BlockDev | NodeKind::Socket => {
                if !fresh {
                    if fs::symlink_metadata(&path).is_ok() && !opts.overwrite {
                        continue;
                    }
                    clear_for(&path, opts.overwrite)?;
                }
                let ft = match n.kind {
                    NodeKind::Fifo => rustix::fs::FileType::Fifo,
                    NodeKind::CharDev => rustix::fs::FileType::CharacterDevice,
                    NodeKind::BlockDev => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Socket,
                };
                let mode = rustix::fs::Mode::from_raw_mode(n.mode);
                if let Err(e) = rustix::fs::mknodat(rustix::fs::CWD, &path, ft, mode, n.rdev) {
                    if let Ok(mut w) = warnings.lock() {
                        w.push(format!("{}: cannot create special file: {e}", path.display()));
                    }
                    continue;
                }
                apply_meta(MetaTarget::Path, &path, &n, warnings);
                p.plan.result.others += 1;
            }
        }
    }
    Ok(())
}

/// Writes `data` at `off`, skipping all-zero 4 KiB blocks so they stay holes (the file is
/// extended to its full length afterwards): sparse files are restored sparse.
fn write_sparse(f: &File, data: &[u8], off: u64) -> std::io::Result<u64> {
    const BLOCK: usize = 4096;
    let mut start = None;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + BLOCK).min(data.len());
        let zero = data[pos..end].iter().all(|&b| b == 0);
        match (zero, start) {
            (false, None) => start = Some(pos),
            (true, Some(s)) => {
                f.write_all_at(&data[s..pos], off + s as u64)?;
                start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = start {
        f.write_all_at(&data[s..], off + s as u64)?;
        return Ok(off + data.len() as u64);
    }
    // Ends in a hole (or is all zeros): the file length comes from set_len.
    Ok(0)
}

/// Chunks per restore task: big files are split so every core works on them.
const CHUNKS_PER_TASK: usize = 8;

/// A file being restored by one or more tasks.
struct FileState {
    job: FileJob,
    /// Byte offset of each chunk (from the index), plus the end.
    offsets: Vec<u64>,
    open: Mutex<Option<(PathBuf, std::sync::Arc<File>)>>,
    remaining: AtomicUsize,
    /// Furthest byte written; the file is extended with `set_len` only when it ends in a hole.
    written_end: AtomicU64,
}

impl FileState {
    /// Opens (creating on first use) the temporary file next to the target path.
    fn file(&self) -> Result<std::sync::Arc<File>, OpsError> {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, f)) = &*g {
            return Ok(f.clone());
        }
        let dir = self.job.path.parent().unwrap_or(Path::new("."));
        // Only uniqueness matters here (create_new refuses a collision): process id and a counter.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let f = File::options()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| OpsError::io("cannot create", &tmp, e))?;
        let f = std::sync::Arc::new(f);
        *g = Some((tmp, f.clone()));
        Ok(f)
    }

    fn discard(&self) {
        if let Some((tmp, _)) = self.open.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Writes chunks `range` of a file; the task that writes the last chunks finishes the file:
/// length, metadata, rename into place. Returns the bytes written.
fn restore_chunks(
    repo: &Repository,
    st: &FileState,
    range: std::ops::Range<usize>,
    warnings: &Mutex<Vec<String>>,
) -> Result<u64, OpsError> {
    let f = st.file()?;
    let mut n = 0;
    for i in range.clone() {
        let data = repo.read_blob(&st.job.node.content[i])?;
        let end = write_sparse(&f, &data, st.offsets[i]).map_err(|e| OpsError::io("cannot write", &st.job.path, e))?;
        st.written_end.fetch_max(end, Ordering::Relaxed);
        n += data.len() as u64;
    }
    let k = range.len().max(1);
    if st.remaining.fetch_sub(k, Ordering::AcqRel) != k {
        return Ok(n);
    }
    let size = st.offsets.last().copied().unwrap_or(0);
    if st.written_end.load(Ordering::Relaxed) < size {
        f.set_len(size).map_err(|e| OpsError::io("cannot write", &st.job.path, e))?;
    }
    // Metadata through the open descriptor: no path lookups, nothing to follow.
    apply_meta(MetaTarget::Open(&f), &st.job.path, &st.job.node, warnings);
    drop(f);
    let (tmp, _) = st.open.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or_else(|| OpsError::Invalid("restore state lost".into()))?;
    fs::rename(&tmp, &st.job.path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        OpsError::io("cannot rename into place", &st.job.path, e)
    })?;
    Ok(n)
}

/// Sealed bytes the prefetcher keeps hinted ahead of the restore threads, so the next packs'
/// round trips overlap the work on this one: a third of a remote store's block cache (measured
/// on the kernel tree through S3 on loopback: 32 MiB 1.7x local, 48 MiB 1.5x, 64 MiB no better).
const PREFETCH_AHEAD: u64 = 48 << 20;

/// Tells the store, in restore order, which pack ranges the tasks after the ones being worked
/// on will read; stays at most [`PREFETCH_AHEAD`] bytes ahead. Runs of neighbouring chunks in
/// one pack are one hint.
fn prefetch(repo: &Repository, tasks: &[(usize, std::ops::Range<usize>)], states: &[FileState], next: &AtomicUsize, failed: &AtomicBool) {
    let store = repo.store();
    let pause = || std::thread::sleep(std::time::Duration::from_millis(2));
    // Sealed bytes of the tasks before each one.
    let mut before = Vec::with_capacity(tasks.len() + 1);
    let mut sum = 0u64;
    for (i, range) in tasks {
        before.push(sum);
        let idx = repo.index();
        sum += states[*i].job.node.content[range.clone()].iter().filter_map(|id| idx.get(id)).map(|(_, l)| u64::from(l.length)).sum::<u64>();
    }
    before.push(sum);
    let live = || !failed.load(Ordering::Relaxed) && next.load(Ordering::Relaxed) < tasks.len();
    // Hints the run, again and again while the store is busy.
    let flush = |run: &mut Option<(kura_repo::Id, u64, u64)>| {
        if let Some((pack, start, end)) = run.take() {
            let name = pack.to_hex();
            while !store.prefetch(&name, start, end - start) && live() {
                pause();
            }
        }
    };
    let mut run: Option<(kura_repo::Id, u64, u64)> = None;
    let mut h = 0;
    while h < tasks.len() && live() {
        let cur = next.load(Ordering::Relaxed).min(tasks.len());
        if h < cur {
            h = cur; // the workers caught up: no use hinting what they read already
        }
        if before[h] - before[cur] >= PREFETCH_AHEAD {
            flush(&mut run);
            pause();
            continue;
        }
        let (i, range) = &tasks[h];
        // The index lock only for one task at a time.
        let locs: Vec<_> = {
            let idx = repo.index();
            states[*i].job.node.content[range.clone()].iter().filter_map(|id| idx.get(id).map(|(p, l)| (p, u64::from(l.offset), u64::from(l.length)))).collect()
        };
        for (pack, off, len) in locs {
            let end = off + len;
            match &mut run {
                Some((p, s, e)) if *p == pack && off < *e + (1 << 20) && off >= *s => *e = (*e).max(end),
                _ => {
                    flush(&mut run);
                    run = Some((pack, off, end));
                }
            }
        }
        h += 1;
    }
    flush(&mut run);
}

/// Chunk offsets of a file from the index; the entry's size must be their sum.
fn offsets(repo: &Repository, job: &FileJob) -> Result<Vec<u64>, OpsError> {
    let idx = repo.index();
    let mut v = Vec::with_capacity(job.node.content.len() + 1);
    let mut off = 0u64;
    for id in &job.node.content {
        v.push(off);
        let (_, loc) = idx.get(id).ok_or(kura_repo::RepoError::BlobMissing(*id))?;
        off += loc.raw_length as u64;
    }
    v.push(off);
    if off != job.node.size {
        return Err(OpsError::Repo(kura_repo::RepoError::corrupt(
            format!("tree entry {}", job.path.display()),
            format!("content adds up to {off} bytes, the entry says {}", job.node.size),
        )));
    }
    Ok(v)
}

/// Restores the tree `tree` into `opts.target`.
pub fn restore(
    repo: &Repository,
    tree: &Id,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    interrupt: Option<&AtomicBool>,
) -> Result<RestoreResult, OpsError> {
    let fresh = matches!(fs::symlink_metadata(&opts.target), Err(e) if e.kind() == ErrorKind::NotFound);
    fs::create_dir_all(&opts.target).map_err(|e| OpsError::io("cannot create target", &opts.target, e))?;
    let m = fs::metadata(&opts.target).map_err(|e| OpsError::io("cannot inspect target", &opts.target, e))?;
    if !m.is_dir() {
        return Err(OpsError::Invalid(format!("target {} is not a directory", opts.target.display())));
    }
    let include: Vec<Vec<u8>> = opts.include.iter().map(|s| normalize_include(s)).collect();
    let warnings = Mutex::new(Vec::new());
    let mut planner = Planner {
        repo,
        opts,
        include: &include,
        warnings: &warnings,
        hardlinks: HashMap::new(),
        plan: Plan { files: Vec::new(), links: Vec::new(), dirs: Vec::new(), result: RestoreResult::default() },
    };
    plan_dir(&mut planner, tree, &opts.target, b"", fresh)?;
    let mut plan = planner.plan;
    if !include.is_empty() && plan.files.is_empty() && plan.dirs.is_empty() && plan.result.others == 0
        && plan.result.files_skipped == 0
    {
        return Err(OpsError::NoSuchPath(opts.include.join(", ")));
    }
    let total: u64 = plan.files.iter().map(|f| f.node.size).sum();
    progress.add_total(plan.files.len() as u64, total);

    let mut states = Vec::with_capacity(plan.files.len());
    let mut tasks = Vec::new();
    for job in std::mem::take(&mut plan.files) {
        let offs = offsets(repo, &job)?;
        let chunks = job.node.content.len();
        let i = states.len();
        if chunks == 0 {
            tasks.push((i, 0..0));
        }
        for start in (0..chunks).step_by(CHUNKS_PER_TASK) {
            tasks.push((i, start..(start + CHUNKS_PER_TASK).min(chunks)));
        }
        states.push(FileState {
            job,
            offsets: offs,
            open: Mutex::new(None),
            remaining: AtomicUsize::new(chunks.max(1)),
            written_end: AtomicU64::new(0),
        });
    }
    // In the order the data lies in the packs, not the tree's: backup threads fill packs side
    // by side, so tree order jumps between packs. Each pack is then read front to back once,
    // which keeps a remote store's block cache and prefetch exact (from S3, tree order fetched
    // 13% of the bytes twice). Files are independent; directories get their metadata at the end.
    {
        let idx = repo.index();
        let at = |(i, range): &(usize, std::ops::Range<usize>)| {
            states[*i].job.node.content.get(range.start).and_then(|id| idx.get(id)).map(|(p, l)| (p, l.offset))
        };
        tasks.sort_by_cached_key(at);
    }
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let fatal: Mutex<Option<OpsError>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    // Through a server, threads also wait on round trips: twice as many keep the cores busy.
    let remote = repo.store().is_remote();
    let threads = if remote { 2 * crate::cores() + 1 } else { crate::cores() + 1 };
    std::thread::scope(|s| {
        if remote {
            s.spawn(|| prefetch(repo, &tasks, &states, &next, &failed));
        }
        for _ in 0..threads {
            s.spawn(|| loop {
                let t = next.fetch_add(1, Ordering::Relaxed);
                if t >= tasks.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                let stop = |e: OpsError| {
                    failed.store(true, Ordering::Relaxed);
                    if let Ok(mut f) = fatal.lock() {
                        f.get_or_insert(e);
                    }
                };
                if interrupt.is_some_and(|x| x.load(Ordering::Relaxed)) {
                    stop(OpsError::Interrupted);
                    break;
                }
                let (i, range) = tasks[t].clone();
                let last = range.end == states[i].job.node.content.len();
                match restore_chunks(repo, &states[i], range, &warnings) {
                    Ok(n) => {
                        bytes.fetch_add(n, Ordering::Relaxed);
                        progress.advance(u64::from(last), n);
                    }
                    Err(e) => {
                        stop(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
        for st in &states {
            st.discard();
        }
        return Err(e);
    }
    let files_restored = states.len() as u64;
    for (first, path) in &plan.links {
        if fs::symlink_metadata(path).is_ok_and(|m| {
            fs::symlink_metadata(first).is_ok_and(|f| f.ino() == m.ino() && f.dev() == m.dev())
        }) {
            continue;
        }
        if !clear_for(path, opts.overwrite)? {
            return Err(OpsError::WouldOverwrite(path.clone()));
        }
        fs::hard_link(first, path).map_err(|e| OpsError::io("cannot create hardlink", path, e))?;
        plan.result.others += 1;
    }
    // Directories last and deepest first, so writing their contents does not bump their mtimes.
    for (path, n) in plan.dirs.iter().rev() {
        apply_meta(MetaTarget::Path, path, n, &warnings);
    }
    let mut result = plan.result;
    result.files_restored = files_restored;
    // One filesystem sync at the end instead of one per file: resume verifies content anyway,
    // and this makes the finished restore durable.
    let synced = File::open(&opts.target).and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from));
    if let Err(e) = synced {
        result.warnings.push(format!("{}: cannot sync the restored files: {e}", opts.target.display()));
    }
    result.bytes = bytes.load(Ordering::Relaxed);
    let mut w = warnings.into_inner().unwrap_or_default();
    w.append(&mut result.warnings);
    result.warnings = w;
    Ok(result)
}
