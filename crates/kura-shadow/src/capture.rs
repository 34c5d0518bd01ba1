//! Change capture on the primary: compares the source tree with the standby's tree (size,
//! mtime, ctime and inode decide whether a file is read again, as the backup's files cache
//! does) and turns every difference into records and the new chunks they need.

use crate::record::{ChunkMeta, Op};
use crate::{Manifest, ShadowError, path};
use kura_ops::fsmeta::{node_from_meta, unchanged};
use kura_repo::{Chunker, Id, Node, NodeKind};
use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Pending chunk bytes at which a full scan hands its changes over to be sent.
pub const FLUSH_DATA: usize = 8 << 20;
/// Pending changes at which it does.
pub const FLUSH_RECORDS: usize = 4096;

/// Where a full scan hands its changes (the push session's sender).
pub type Sink<'a> = dyn FnMut(&mut Pending) -> Result<(), ShadowError> + 'a;

/// Changes found and not yet sent.
#[derive(Default)]
pub struct Pending {
    /// Records' changes in order.
    pub ops: Vec<Op>,
    /// For each change, how many of `chunks` it and those before it need.
    pub marks: Vec<usize>,
    /// The chunks they need that the standby lacks.
    pub chunks: Vec<ChunkMeta>,
    /// Those chunks' bytes, concatenated: plain until [`Pending::pack`] compresses them (in a
    /// first sync on a thread of its own, between the scan and the sender).
    pub data: Vec<u8>,
    /// Whether `data` is packed.
    pub packed: bool,
}

impl Pending {
    /// Compresses the chunks (each stored plain when that is not smaller), once.
    pub fn pack(&mut self, packer: &mut crate::record::Packer) {
        if self.packed {
            return;
        }
        let mut data = Vec::with_capacity(self.data.len() / 2);
        let mut off = 0;
        for c in self.chunks.iter_mut() {
            let n = c.raw_len as usize;
            c.zlen = packer.pack(&self.data[off..off + n], &mut data);
            off += n;
        }
        self.data = data;
        self.packed = true;
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The primary's view: its source tree and what the standby holds.
pub struct Capture {
    root: PathBuf,
    chunker: Chunker,
    id_key: [u8; 32],
    /// Chunks the standby has or that are pending.
    known: HashSet<Id>,
    /// The standby's tree once everything pending is applied.
    state: Manifest,
    buf: Vec<u8>,
    /// Paths never opened here (a SQLite mirror and its side files: in a process that holds
    /// SQLite connections to it, closing any descriptor of the file drops their locks).
    skip: HashSet<Vec<u8>>,
}

/// Whether two nodes describe the same entry (content aside).
fn same_meta(a: &Node, b: &Node) -> bool {
    a.kind == b.kind && a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.mtime_ns == b.mtime_ns && a.size == b.size && a.rdev == b.rdev && a.target == b.target
}

impl Capture {
    /// Starts from the standby's tree `state`.
    pub fn new(root: &Path, state: Manifest, id_key: [u8; 32], chunker_seed: u64) -> Capture {
        let known = state.chunk_ids().copied().collect();
        Capture { root: root.to_path_buf(), chunker: Chunker::new(kura_repo::config::ChunkerParams::default(), chunker_seed), id_key, known, state, buf: Vec::new(), skip: HashSet::new() }
    }

    /// Leaves these paths out of every comparison: never opened, never recorded.
    pub fn skip(&mut self, paths: impl Iterator<Item = Vec<u8>>) {
        self.skip.extend(paths);
    }

    /// The tree the standby will have.
    pub fn state(&self) -> &Manifest {
        &self.state
    }

    fn push(&mut self, op: Op, out: &mut Pending) {
        self.state.apply(&op);
        out.ops.push(op);
        out.marks.push(out.chunks.len());
    }

    /// Compares the whole tree.
    pub fn full_scan(&mut self, out: &mut Pending) -> Result<(), ShadowError> {
        self.full_scan_with(out, &mut |_| Ok(()))
    }

    /// Compares the whole tree, handing `out` to `sink` whenever it holds [`FLUSH_DATA`] bytes
    /// of chunks or [`FLUSH_RECORDS`] changes, so a large first sync is sent (and applied on the
    /// standby) while the rest is still being read, and never held whole in memory.
    pub fn full_scan_with(&mut self, out: &mut Pending, sink: &mut Sink<'_>) -> Result<(), ShadowError> {
        if let Err(e) = fs::symlink_metadata(&self.root) {
            return Err(ShadowError::io(&self.root, e));
        }
        self.scan_children(b"", out, sink)
    }

    /// Compares the entries of directory `rel` (the root when empty) with the state, deeply,
    /// and deletes what is gone.
    fn scan_children(&mut self, rel: &[u8], out: &mut Pending, sink: &mut Sink<'_>) -> Result<(), ShadowError> {
        let dir = if rel.is_empty() { self.root.clone() } else { path::join(&self.root, rel) };
        let mut names: Vec<Vec<u8>> = match fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name().as_bytes().to_vec()).collect(),
            Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(20) => Vec::new(),
            // Unreadable (permissions): left as the standby has it, said, and the rest goes on.
            Err(e) => {
                tracing::warn!("{}: {e}; not shadowed", dir.display());
                return Ok(());
            }
        };
        names.sort();
        let child = |n: &[u8]| if rel.is_empty() { n.to_vec() } else { [rel, b"/", n].concat() };
        let present: HashSet<Vec<u8>> = names.iter().map(|n| child(n)).collect();
        let gone: Vec<Vec<u8>> = if rel.is_empty() {
            self.state.iter().filter(|(k, _)| !k.contains(&b'/')).map(|(k, _)| k.clone()).filter(|k| !present.contains(k)).collect()
        } else {
            self.state.below(rel).filter(|(k, _)| path::parent(k) == Some(rel)).map(|(k, _)| k.clone()).filter(|k| !present.contains(k)).collect()
        };
        for g in gone {
            self.push(Op::Delete { path: g }, out);
        }
        for n in names {
            self.scan_path_into(&child(&n), true, out, sink)?;
            if out.data.len() >= FLUSH_DATA || out.ops.len() >= FLUSH_RECORDS {
                sink(out)?;
            }
        }
        Ok(())
    }

    /// Compares one path with the state; a directory's contents too when `deep` or when the
    /// standby does not have it as a directory yet.
    pub fn scan_path(&mut self, rel: &[u8], deep: bool, out: &mut Pending) -> Result<(), ShadowError> {
        self.scan_path_into(rel, deep, out, &mut |_| Ok(()))
    }

    fn scan_path_into(&mut self, rel: &[u8], deep: bool, out: &mut Pending, sink: &mut Sink<'_>) -> Result<(), ShadowError> {
        if self.skip.contains(rel) {
            return Ok(());
        }
        let p = path::join(&self.root, rel);
        let m = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(20) => {
                if self.state.get(rel).is_some() {
                    self.push(Op::Delete { path: rel.to_vec() }, out);
                }
                return Ok(());
            }
            Err(e) => {
                tracing::warn!("{}: {e}; not shadowed", p.display());
                return Ok(());
            }
        };
        let mut node = node_from_meta(b"", &m);
        let old = self.state.get(rel).cloned();
        match node.kind {
            NodeKind::File => {
                if let Some(o) = &old {
                    if unchanged(o, &node) && same_meta(o, &node) {
                        return Ok(());
                    }
                    if o.kind == NodeKind::File && o.size == node.size && o.mtime_ns == node.mtime_ns && o.inode == node.inode {
                        // Only the status changed (mode, owner): same content.
                        node.content = o.content.clone();
                        self.push(Op::Put { path: rel.to_vec(), node: Box::new(node) }, out);
                        return Ok(());
                    }
                }
                match self.read_file(&p, &mut node, out) {
                    Ok(()) => self.push(Op::Put { path: rel.to_vec(), node: Box::new(node) }, out),
                    // Gone or replaced meanwhile: its next event or scan says what it became.
                    Err(ShadowError::Io { source, .. }) if source.kind() == ErrorKind::NotFound || source.raw_os_error() == Some(40) => {}
                    // Unreadable (permissions): left out, said once per scan, the rest goes on.
                    Err(e) => tracing::warn!("{e}; not shadowed"),
                }
            }
            NodeKind::Dir => {
                let was_dir = old.as_ref().is_some_and(|o| o.kind == NodeKind::Dir);
                if !old.as_ref().is_some_and(|o| same_meta(o, &node)) {
                    self.push(Op::Put { path: rel.to_vec(), node: Box::new(node) }, out);
                }
                if deep || !was_dir {
                    self.scan_children(rel, out, sink)?;
                }
            }
            NodeKind::Symlink => {
                node.target = fs::read_link(&p).map(|t| t.as_os_str().as_bytes().to_vec()).unwrap_or_default();
                if !old.as_ref().is_some_and(|o| same_meta(o, &node)) {
                    self.push(Op::Put { path: rel.to_vec(), node: Box::new(node) }, out);
                }
            }
            _ => {
                if !old.as_ref().is_some_and(|o| same_meta(o, &node)) {
                    self.push(Op::Put { path: rel.to_vec(), node: Box::new(node) }, out);
                }
            }
        }
        Ok(())
    }

    /// A rename the watcher saw: recorded as one when the state has `from` and `to` is the
    /// same inode now, so a moved directory costs one record; then `to` is compared as usual.
    pub fn renamed(&mut self, from: &[u8], to: &[u8], out: &mut Pending) -> Result<(), ShadowError> {
        let same = match (self.state.get(from), fs::symlink_metadata(path::join(&self.root, to))) {
            (Some(o), Ok(m)) => o.inode == m.ino() && o.kind == node_from_meta(b"", &m).kind,
            _ => false,
        };
        if same && !path::within(to, from) {
            self.push(Op::Rename { from: from.to_vec(), to: to.to_vec() }, out);
        }
        self.scan_path(from, false, out)?;
        self.scan_path(to, !same, out)
    }

    /// Reads and chunks a file into `node.content`, adding chunks the standby lacks to `out`.
    /// A file that changes while read is read again (three times at most, then taken as read:
    /// its next event brings the rest).
    fn read_file(&mut self, p: &Path, node: &mut Node, out: &mut Pending) -> Result<(), ShadowError> {
        // Size and mtime before each read: the scan's lstat, then the previous read's fstat.
        let mut before = (node.size, node.mtime_ns);
        for _ in 0..3 {
            let f = fs::OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32).open(p).map_err(|e| ShadowError::io(p, e))?;
            let mut ids = Vec::new();
            let mut buf = std::mem::take(&mut self.buf);
            let (key, known) = (&self.id_key, &mut self.known);
            // Chunks the standby lacks go to `out` as they are cut (those of a read that
            // turns out torn too: their ids are real content, and sent once).
            let chunks_before = out.chunks.len();
            let r = self.chunker.for_each_chunk(&f, &mut buf, |c: &[u8]| -> Result<(), std::io::Error> {
                let id = Id(*blake3::keyed_hash(key, c).as_bytes());
                if known.insert(id) {
                    out.chunks.push(ChunkMeta { id, raw_len: c.len() as u32, zlen: c.len() as u32 });
                    out.data.extend_from_slice(c);
                }
                ids.push(id);
                Ok(())
            });
            self.buf = buf;
            let size = r.map_err(|e| ShadowError::io(p, e))?;
            let after = f.metadata().map_err(|e| ShadowError::io(p, e))?;
            let now = node_from_meta(b"", &after);
            let stable = now.size == size && (now.size, now.mtime_ns) == before;
            before = (now.size, now.mtime_ns);
            // The node says what was read: a file that grew while read (an empty read of a file
            // being written) must not be recorded with its new size and the old content, or no
            // comparison would ever send it again.
            *node = Node { content: ids, size, ..now };
            // Only the time changed and every chunk was known: nothing torn to read again.
            if stable || (now.size == size && out.chunks.len() == chunks_before) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Forgets what the standby has at `p` when it is a file, so the next scan reads and sends
    /// it whatever its metadata says (a verified resync of content that drifted).
    pub fn forget_file(&mut self, p: &[u8]) {
        self.state.forget_file(p);
    }

    /// Notes chunks the standby holds beyond its tree's (so they are not sent).
    pub fn know<'a>(&mut self, ids: impl Iterator<Item = &'a Id>) {
        self.known.extend(ids.copied());
    }

    /// Forgets that the standby has these chunks (it said so).
    pub fn forget_chunks(&mut self, ids: &[Id]) {
        for id in ids {
            self.known.remove(id);
        }
    }
}

/// A relative path of the tree for an absolute one the watcher reported (`None` outside it or
/// for the root itself).
pub fn relative(root: &Path, p: &Path) -> Option<Vec<u8>> {
    let r = p.strip_prefix(root).ok()?.as_os_str().as_bytes().to_vec();
    (!r.is_empty() && path::check(&r).is_ok()).then_some(r)
}
