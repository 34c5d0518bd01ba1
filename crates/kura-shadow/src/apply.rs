//! Applying records to a mirror directory, with the same meaning [`crate::Manifest::apply`]
//! gives them. Files are written to a temporary name beside their target and renamed over it,
//! so a reader of the mirror never sees a torn file; no path is followed through a symlink.

use crate::path;
use crate::record::Op;
use crate::{Manifest, ShadowError};
use kura_ops::restore::{MetaTarget, apply_meta};
use kura_repo::{Id, Node, NodeKind};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

/// Where chunk bytes come from (the journal).
pub trait Chunks {
    /// The plain bytes of a chunk, verified.
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError>;
    /// The key chunk ids are made with, when known: a SQLite mirror is then compared with its
    /// pages' ids by hashing, without reading every chunk.
    fn id_key(&self) -> Option<[u8; 32]> {
        None
    }
}

/// Prefix of the temporary names files are written under.
pub const TEMP_PREFIX: &str = ".kura-shadow-";

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> ShadowError + '_ {
    move |e| ShadowError::io(p, e)
}

/// Removes whatever is at `p` (a directory with all it holds), never following a link.
pub(crate) fn remove(p: &Path) -> Result<(), ShadowError> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ShadowError::io(p, e)),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io(p)),
        Ok(_) => fs::remove_file(p).map_err(io(p)),
    }
}

/// Makes every ancestor of `rel` under `root` a real directory (replacing files and links).
pub(crate) fn make_parents(root: &Path, rel: &[u8]) -> Result<(), ShadowError> {
    for a in path::ancestors(rel) {
        let p = path::join(root, a);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&p).map_err(io(&p))?;
                fs::create_dir(&p).map_err(io(&p))?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o755).create(&p).map_err(io(&p))?;
            }
            Err(e) => return Err(ShadowError::io(&p, e)),
        }
    }
    Ok(())
}

/// Warnings from applying metadata (an owner the standby cannot set) go to the log.
fn meta(target: MetaTarget<'_>, p: &Path, n: &Node) {
    let w = Mutex::new(Vec::new());
    apply_meta(target, p, n, &w);
    for m in w.into_inner().unwrap_or_default() {
        tracing::debug!("{m}");
    }
}

/// Opens the directory `name` in `dir`, never through a link: a file or link in its place is
/// replaced by a new directory, as is a missing one.
fn open_dir_at(dir: &OwnedFd, name: &[u8]) -> std::io::Result<OwnedFd> {
    match rfs::openat(dir, name, SUBDIR, Mode::empty()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(Errno::NOTDIR | Errno::LOOP) => rfs::unlinkat(dir, name, AtFlags::empty())?,
        Err(e) => return Err(e.into()),
    }
    match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(rfs::openat(dir, name, SUBDIR, Mode::empty())?)
}

/// How a directory below the mirror's root is opened: never through a link.
const SUBDIR: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// The last component of a relative path.
fn name_of(rel: &[u8]) -> &[u8] {
    path::parent(rel).map_or(rel, |p| &rel[p.len() + 1..])
}

/// Writes records into one mirror, keeping open the directories it last wrote into. A first
/// sync writes thousands of files per directory: each then costs no walk of its path (checking
/// every ancestor by path was a tenth of a standby's CPU). Directories are opened one by one
/// from the root without following links, so nothing is written outside the mirror, even if a
/// directory on the way is swapped for a link meanwhile.
pub struct Writer<'a> {
    root: &'a Path,
    /// `dirs[i]` is open on the directory `comps[..i]` names (`dirs[0]` on the root).
    dirs: Vec<OwnedFd>,
    comps: Vec<Vec<u8>>,
    /// Names temporaries: random at start, then counted.
    temp: u64,
}

impl<'a> Writer<'a> {
    /// A writer into the mirror at `root` (which must exist).
    pub fn new(root: &'a Path) -> Self {
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        Writer { root, dirs: Vec::new(), comps: Vec::new(), temp: u64::from_le_bytes(r) }
    }

    /// Closes the open directories: after a change made another way that may have moved or
    /// removed one.
    pub fn forget(&mut self) {
        self.dirs.clear();
        self.comps.clear();
    }

    /// The directory that holds `rel`, opened (made where missing, replacing what is in the
    /// way) from the root down, or kept open from the previous write.
    fn parent(&mut self, rel: &[u8]) -> Result<&OwnedFd, ShadowError> {
        if self.dirs.is_empty() {
            let fd = self.open_root()?;
            self.dirs.push(fd);
        }
        let want: Vec<&[u8]> = path::parent(rel).map(|p| p.split(|&b| b == b'/').collect()).unwrap_or_default();
        let keep = self.comps.iter().zip(&want).take_while(|(a, b)| a.as_slice() == **b).count();
        self.comps.truncate(keep);
        self.dirs.truncate(keep + 1);
        for (i, c) in want.iter().enumerate().skip(keep) {
            let fd = open_dir_at(self.current()?, c).map_err(|e| ShadowError::io(path::join(self.root, &want[..=i].join(&b'/')), e))?;
            self.dirs.push(fd);
            self.comps.push(c.to_vec());
        }
        self.current()
    }

    /// The mirror's root (itself may be a link an operator configured).
    fn open_root(&self) -> Result<OwnedFd, ShadowError> {
        rfs::open(self.root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| ShadowError::io(self.root, e.into()))
    }

    /// The directory that holds `rel` when every ancestor is a real directory, opened from the
    /// root without following links; `None` when one is missing or is not a directory (below
    /// it nothing exists). Nothing is made or kept open.
    fn existing_parent(&self, rel: &[u8]) -> Result<Option<OwnedFd>, ShadowError> {
        let mut dir = self.open_root()?;
        let Some(parent) = path::parent(rel) else { return Ok(Some(dir)) };
        for c in parent.split(|&b| b == b'/') {
            dir = match rfs::openat(&dir, c, SUBDIR, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
                Err(e) => return Err(ShadowError::io(path::join(self.root, parent), e.into())),
            };
        }
        Ok(Some(dir))
    }

    /// The directory opened last (the root at least, once [`Writer::parent`] ran).
    fn current(&self) -> Result<&OwnedFd, ShadowError> {
        self.dirs.last().ok_or_else(|| ShadowError::io(self.root, std::io::Error::other("the mirror's root is not open")))
    }

    /// A name for a temporary (one a crashed run left may be taken: the caller tries the next).
    fn next_temp(&mut self) -> Vec<u8> {
        self.temp = self.temp.wrapping_add(1);
        format!("{TEMP_PREFIX}{:016x}", self.temp).into_bytes()
    }

    /// Makes a temporary beside `rel` with `make`, trying further names while one is taken;
    /// returns its name and the directory it is in.
    fn temp_beside<T>(&mut self, rel: &[u8], mut make: impl FnMut(&OwnedFd, &[u8]) -> rustix::io::Result<T>) -> Result<(Vec<u8>, T), ShadowError> {
        loop {
            let tmp = self.next_temp();
            let dir = self.parent(rel)?;
            match make(dir, &tmp) {
                Ok(t) => return Ok((tmp, t)),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(ShadowError::io(path::join(self.root, rel).with_file_name(std::ffi::OsStr::from_bytes(&tmp)), e.into())),
            }
        }
    }

    /// Writes the node at `rel` (content from `chunks`), replacing what is there.
    pub fn put(&mut self, rel: &[u8], node: &Node, chunks: &dyn Chunks) -> Result<(), ShadowError> {
        let p = path::join(self.root, rel);
        let name = name_of(rel);
        let io_at = |e: Errno| ShadowError::io(&p, e.into());
        match node.kind {
            NodeKind::Dir => {
                let dir = self.parent(rel)?;
                match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                        Ok(_) => {
                            rfs::unlinkat(dir, name, AtFlags::empty()).map_err(io_at)?;
                            rfs::mkdirat(dir, name, Mode::from_raw_mode(0o755)).map_err(io_at)?;
                        }
                        Err(e) => return Err(io_at(e)),
                    },
                    Err(e) => return Err(io_at(e)),
                }
                meta(MetaTarget::Path, &p, node);
            }
            NodeKind::File => {
                let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let (tmp, fd) = self.temp_beside(rel, |dir, t| rfs::openat(dir, t, flags, Mode::from_raw_mode(0o600)))?;
                let dir = self.current()?;
                let r = (|| {
                    let mut f = File::from(fd);
                    for id in &node.content {
                        f.write_all(&chunks.chunk(id)?).map_err(io(&p))?;
                    }
                    meta(MetaTarget::Open(&f), &p, node);
                    drop(f);
                    rename_over(dir, &tmp, name, &p)
                })();
                if r.is_err() {
                    let _ = rfs::unlinkat(dir, tmp.as_slice(), AtFlags::empty());
                }
                r?;
            }
            NodeKind::Symlink => {
                let (tmp, ()) = self.temp_beside(rel, |dir, t| rfs::symlinkat(node.target.as_slice(), dir, t))?;
                let dir = self.current()?;
                meta(MetaTarget::Path, &p.with_file_name(std::ffi::OsStr::from_bytes(&tmp)), node);
                let r = rename_over(dir, &tmp, name, &p);
                if r.is_err() {
                    let _ = rfs::unlinkat(dir, tmp.as_slice(), AtFlags::empty());
                }
                r?;
            }
            _ => {
                // Fifos, sockets and devices: made where the standby may (devices need root).
                let dir = self.parent(rel)?;
                remove_in(dir, name, &p)?;
                let ft = match node.kind {
                    NodeKind::Fifo => FileType::Fifo,
                    NodeKind::CharDev => FileType::CharacterDevice,
                    NodeKind::BlockDev => FileType::BlockDevice,
                    _ => FileType::Socket,
                };
                let mode = Mode::from_raw_mode(node.mode & 0o7777);
                if let Err(e) = rfs::mknodat(dir, name, ft, mode, node.rdev) {
                    tracing::warn!(path = %p.display(), "cannot make special file: {e}");
                    return Ok(());
                }
                meta(MetaTarget::Path, &p, node);
            }
        }
        Ok(())
    }

    /// Applies one record.
    pub fn apply(&mut self, op: &Op, chunks: &dyn Chunks) -> Result<(), ShadowError> {
        if !matches!(op, Op::Pages { .. }) {
            crate::sqlite_stream::forget_mirrors();
        }
        let root = self.root;
        if !matches!(op, Op::Put { .. }) {
            // The rest may move or remove a directory kept open.
            self.forget();
        }
        match op {
            Op::Put { path: rel, node } => self.put(rel, node, chunks),
            Op::Pages { path: rel, page_size, db_pages, pages, .. } => crate::sqlite_stream::apply_pages(root, rel, *page_size, &[(*db_pages, pages)], chunks),
            // Below an entry that is not a real directory nothing exists (the tree's meaning), and
            // a path through a symlink must never be followed out of the mirror: both ends are
            // reached through directories opened one by one without following links.
            Op::Delete { path: rel } => match self.existing_parent(rel)? {
                Some(dir) => remove_in(&dir, name_of(rel), &path::join(root, rel)),
                None => Ok(()),
            },
            Op::Rename { from, to } => {
                if from == to || path::within(to, from) || path::within(from, to) {
                    return Ok(());
                }
                let Some(src) = self.existing_parent(from)? else { return Ok(()) };
                match rfs::statat(&src, name_of(from), AtFlags::SYMLINK_NOFOLLOW) {
                    Err(Errno::NOENT) => return Ok(()),
                    Err(e) => return Err(ShadowError::io(path::join(root, from), e.into())),
                    Ok(_) => {}
                }
                let t = path::join(root, to);
                let dst = self.parent(to)?;
                remove_in(dst, name_of(to), &t)?;
                // The directories kept open are now those above `to`, none of which moved.
                rfs::renameat(&src, name_of(from), dst, name_of(to)).map_err(|e| ShadowError::io(&t, e.into()))
            }
        }
    }
}

/// Renames the temporary `tmp` in `dir` over `name` (at `p`): a directory in the way goes first.
fn rename_over(dir: &OwnedFd, tmp: &[u8], name: &[u8], p: &Path) -> Result<(), ShadowError> {
    match rfs::renameat(dir, tmp, dir, name) {
        Ok(()) => Ok(()),
        Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => {
            remove_in(dir, name, p)?;
            rfs::renameat(dir, tmp, dir, name).map_err(|e| ShadowError::io(p, e.into()))
        }
        Err(e) => Err(ShadowError::io(p, e.into())),
    }
}

/// Removes whatever `name` in `dir` is (a directory with all it holds), never following a
/// link, and through the descriptor: a directory on the way swapped for a link meanwhile
/// cannot lead the removal out of the mirror (`p` names it in messages).
fn remove_in(dir: &OwnedFd, name: &[u8], p: &Path) -> Result<(), ShadowError> {
    use std::os::fd::AsRawFd;
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(ShadowError::io(p, e.into())),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            // std's remove_dir_all opens what it is given without following a final link and
            // works through descriptors below it; this path reaches `name` through `dir`.
            let at = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(std::ffi::OsStr::from_bytes(name));
            fs::remove_dir_all(at).map_err(io(p))
        }
        Ok(_) => rfs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| ShadowError::io(p, e.into())),
    }
}

/// Sets directories' mtimes, deepest first (give them so): writing inside a directory moves its
/// mtime, so directory times go last.
pub fn set_dir_times<'a>(root: &Path, dirs: impl Iterator<Item = (&'a Vec<u8>, &'a Node)>) {
    for (rel, n) in dirs {
        let t = filetime::FileTime::from_unix_time(n.mtime_ns.div_euclid(1_000_000_000), n.mtime_ns.rem_euclid(1_000_000_000) as u32);
        let _ = filetime::set_symlink_file_times(path::join(root, rel), t, t);
    }
}

/// The directories whose mtime the records moved (the parents of what they changed, and
/// directories they wrote), deepest first, as `tree` has them.
pub fn touched_dirs<'a>(tree: &'a Manifest, ops: impl Iterator<Item = &'a Op>) -> Vec<(&'a Vec<u8>, &'a Node)> {
    let mut set = std::collections::BTreeSet::new();
    for op in ops {
        let paths: Vec<&[u8]> = match op {
            Op::Put { path, .. } | Op::Delete { path } | Op::Pages { path, .. } => vec![path],
            Op::Rename { from, to } => vec![from, to],
        };
        for p in paths {
            set.insert(p.to_vec());
            set.extend(path::parent(p).filter(|q| !q.is_empty()).map(|q| q.to_vec()));
        }
    }
    let mut out: Vec<(&Vec<u8>, &Node)> = set.iter().filter_map(|p| tree.iter_at(p)).filter(|(_, n)| n.kind == NodeKind::Dir).collect();
    out.reverse();
    out
}

/// What [`reconcile`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// Entries written again.
    pub written: u64,
    /// Entries removed (not in the manifest, or temporaries).
    pub removed: u64,
}

fn matches(m: &fs::Metadata, n: &Node) -> bool {
    use std::os::unix::fs::MetadataExt;
    let kind_ok = match n.kind {
        NodeKind::File => m.is_file() && m.size() == n.size && m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()) == n.mtime_ns,
        NodeKind::Dir => m.is_dir(),
        NodeKind::Symlink => m.file_type().is_symlink(),
        _ => !m.is_file() && !m.is_dir(),
    };
    kind_ok && (n.kind == NodeKind::Symlink || m.permissions().mode() & 0o7777 == n.mode & 0o7777)
}

/// Makes the mirror equal to `m`: entries whose kind, mode, size or mtime differ are written
/// again, entries the manifest lacks (and leftover temporaries) are removed. Runs when a
/// receiver starts, so a crash between applying a record and noting it is repaired.
pub fn reconcile(root: &Path, m: &Manifest, chunks: &dyn Chunks) -> Result<Reconciled, ShadowError> {
    reconcile_verified(root, m, chunks, None)
}

/// [`reconcile`], and when `local` (the tree at `root`, its files hashed into chunk ids) is
/// given, a file whose content ids differ is written again too, whatever its size and mtime
/// say: a verified resync.
pub fn reconcile_verified(root: &Path, m: &Manifest, chunks: &dyn Chunks, local: Option<&Manifest>) -> Result<Reconciled, ShadowError> {
    fs::create_dir_all(root).map_err(io(root))?;
    crate::sqlite_stream::forget_mirrors();
    let mut done = Reconciled::default();
    // Remove what should not be there, deepest first.
    let mut extra = Vec::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(dir) = stack.pop() {
        let dp = if dir.is_empty() { root.to_path_buf() } else { path::join(root, &dir) };
        for e in fs::read_dir(&dp).map_err(io(&dp))? {
            let e = e.map_err(io(&dp))?;
            let name = e.file_name();
            let rel = if dir.is_empty() { name.as_bytes().to_vec() } else { [dir.as_slice(), b"/", name.as_bytes()].concat() };
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            match m.get(&rel) {
                Some(n) if n.kind == NodeKind::Dir && is_dir => stack.push(rel),
                Some(_) if !name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) => {}
                None if crate::sqlite_stream::is_side_file(m, &rel) => {}
                _ => extra.push(rel),
            }
        }
    }
    let mut w = Writer::new(root);
    for rel in extra {
        // Through directories opened without following links: one swapped for a link since
        // the walk read it cannot lead the removal out of the mirror.
        if let Some(dir) = w.existing_parent(&rel)? {
            remove_in(&dir, name_of(&rel), &path::join(root, &rel))?;
        }
        done.removed += 1;
    }
    let mut dirs = Vec::new();
    for (rel, n) in m.iter() {
        let p = path::join(root, rel);
        if crate::sqlite_stream::page_size_of(n).is_some() {
            // A database mirror's file lags its log: compared through SQLite, page by page.
            w.forget();
            if crate::sqlite_stream::reconcile_db(root, rel, n, chunks)? > 0 {
                done.written += 1;
            }
            continue;
        }
        let same_content = n.kind != NodeKind::File || local.is_none_or(|l| l.get(rel).is_some_and(|o| o.content == n.content));
        let ok = same_content && fs::symlink_metadata(&p).is_ok_and(|md| matches(&md, n));
        if n.kind == NodeKind::Dir {
            dirs.push((rel, n));
            if ok {
                continue;
            }
        } else if ok && (n.kind != NodeKind::Symlink || fs::read_link(&p).is_ok_and(|t| t.as_os_str().as_bytes() == n.target)) {
            continue;
        }
        w.put(rel, n, chunks)?;
        done.written += 1;
    }
    set_dir_times(root, dirs.into_iter().rev());
    let _ = File::open(root).and_then(|d| d.sync_all());
    // This thread's mirror connections are not kept (it is not the applier).
    crate::sqlite_stream::forget_mirrors();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<Id, Vec<u8>>);
    impl Chunks for Map {
        fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
            self.0.get(id).cloned().ok_or_else(|| ShadowError::Corrupt { what: "test".into(), detail: "no chunk".into() })
        }
    }

    fn file(id: u8, size: u64) -> Node {
        let mut n = Node::new(Vec::new(), NodeKind::File);
        n.content = vec![Id([id; 32])];
        n.size = size;
        n.mode = 0o640;
        n.mtime_ns = 1_700_000_000_000_000_000;
        n
    }

    #[test]
    fn applying_records_and_reconciling_give_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("m");
        let chunks = Map(HashMap::from([(Id([1; 32]), b"one".to_vec()), (Id([2; 32]), b"two!".to_vec())]));
        let ops = [
            Op::Put { path: b"d/a".to_vec(), node: Box::new(file(1, 3)) },
            Op::Put { path: b"d/b".to_vec(), node: Box::new(file(2, 4)) },
            Op::Rename { from: b"d".to_vec(), to: b"e".to_vec() },
            // Into a directory of the same name as the one just moved, not into the moved one
            // the writer had open.
            Op::Put { path: b"d/c".to_vec(), node: Box::new(file(1, 3)) },
            Op::Delete { path: b"d".to_vec() },
            Op::Put { path: b"e/a/x".to_vec(), node: Box::new(file(2, 4)) },
            Op::Delete { path: b"e/b".to_vec() },
        ];
        let mut m = Manifest::default();
        fs::create_dir_all(&root).unwrap();
        let mut w = Writer::new(&root);
        for op in &ops {
            w.apply(op, &chunks).unwrap();
            m.apply(op);
            if matches!(op, Op::Put { path, .. } if path == b"d/c") {
                assert_eq!(fs::read(root.join("d/c")).unwrap(), b"one");
                assert!(!root.join("e/c").exists(), "written into the moved directory");
            }
        }
        assert_eq!(fs::read(root.join("e/a/x")).unwrap(), b"two!");
        assert!(!root.join("d").exists() && !root.join("e/b").exists());
        // Nothing to do when the mirror already is the manifest.
        assert_eq!(reconcile(&root, &m, &chunks).unwrap(), Reconciled::default());
        // Damage of every kind is repaired: a stray file, a temporary, a wrong mode, a file
        // where a directory belongs.
        fs::write(root.join("stray"), b"x").unwrap();
        fs::write(root.join(format!("{TEMP_PREFIX}1234")), b"x").unwrap();
        fs::remove_dir_all(root.join("e/a")).unwrap();
        fs::write(root.join("e/a"), b"not a dir").unwrap();
        let r = reconcile(&root, &m, &chunks).unwrap();
        assert_eq!(r.removed, 2);
        assert_eq!(fs::read(root.join("e/a/x")).unwrap(), b"two!");
        assert_eq!(reconcile(&root, &m, &chunks).unwrap(), Reconciled::default());
    }

    #[test]
    fn a_symlink_in_the_way_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (root, outside) = (d.path().join("m"), d.path().join("outside"));
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let mut link = Node::new(Vec::new(), NodeKind::Symlink);
        link.target = outside.as_os_str().as_encoded_bytes().to_vec();
        let chunks = Map(HashMap::from([(Id([1; 32]), b"one".to_vec())]));
        let mut w = Writer::new(&root);
        w.apply(&Op::Put { path: b"l".to_vec(), node: Box::new(link) }, &chunks).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        w.apply(&Op::Delete { path: b"l/victim".to_vec() }, &chunks).unwrap();
        w.apply(&Op::Rename { from: b"l/victim".to_vec(), to: b"stolen".to_vec() }, &chunks).unwrap();
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep", "deleted or moved through the link");
        assert!(!root.join("stolen").exists());
        fs::remove_file(outside.join("victim")).unwrap();
        w.apply(&Op::Put { path: b"l/f".to_vec(), node: Box::new(file(1, 3)) }, &chunks).unwrap();
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "wrote through the link");
        assert_eq!(fs::read(root.join("l/f")).unwrap(), b"one");
        // A directory the writer holds open, swapped for a link by someone else between two
        // writes: the next write lands in the directory it opened, inside the mirror.
        let sym = Node::new(Vec::new(), NodeKind::Symlink);
        w.apply(&Op::Put { path: b"d/a/f".to_vec(), node: Box::new(file(1, 3)) }, &chunks).unwrap();
        fs::rename(root.join("d"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        w.put(b"d/a/g", &file(1, 3), &chunks).unwrap();
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "wrote through the swapped link");
        assert_eq!(fs::read(root.join("moved/a/g")).unwrap(), b"one");
        // A file put over a directory the writer reaches through its open one: the directory
        // removed is the one inside the mirror, not the one of that name behind the link.
        fs::create_dir(outside.join("a")).unwrap();
        fs::write(outside.join("a/keep"), b"keep").unwrap();
        w.put(b"d/a", &file(1, 3), &chunks).unwrap();
        assert_eq!(fs::read(outside.join("a/keep")).unwrap(), b"keep", "removed through the swapped link");
        assert_eq!(fs::read(root.join("moved/a")).unwrap(), b"one");
        fs::remove_dir_all(outside.join("a")).unwrap();
        // A fresh writer replaces the link with a directory.
        let mut w = Writer::new(&root);
        w.put(b"d/a/h", &file(1, 3), &chunks).unwrap();
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "wrote through the link");
        assert!(fs::symlink_metadata(root.join("d")).unwrap().is_dir());
        // A file and a link put where a directory is replace it.
        w.put(b"d/a", &file(1, 3), &chunks).unwrap();
        assert_eq!(fs::read(root.join("d/a")).unwrap(), b"one");
        let mut sym = sym;
        sym.target = b"nowhere".to_vec();
        fs::create_dir_all(root.join("e/x")).unwrap();
        w.put(b"e", &sym, &chunks).unwrap();
        assert_eq!(fs::read_link(root.join("e")).unwrap(), Path::new("nowhere"));
        assert!(fs::read_dir(&root).unwrap().all(|e| !e.unwrap().file_name().as_bytes().starts_with(TEMP_PREFIX.as_bytes())), "a temporary was left");
        // A directory the writer holds open is renamed: later writes to its old name make a
        // new directory rather than landing in the moved one.
        w.put(b"r/a/f", &file(1, 3), &chunks).unwrap();
        w.apply(&Op::Rename { from: b"r".to_vec(), to: b"s/t".to_vec() }, &chunks).unwrap();
        w.put(b"r/a/g", &file(1, 3), &chunks).unwrap();
        assert_eq!(fs::read(root.join("s/t/a/f")).unwrap(), b"one");
        assert!(!root.join("s/t/a/g").exists(), "wrote into the moved directory");
        assert_eq!(fs::read(root.join("r/a/g")).unwrap(), b"one");
        w.apply(&Op::Delete { path: b"s".to_vec() }, &chunks).unwrap();
        assert!(!root.join("s").exists());
    }
}
