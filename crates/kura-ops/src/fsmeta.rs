//! Reading filesystem metadata into tree nodes, and the files-cache comparison.

use kura_repo::{Node, NodeKind, Xattr};
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Builds a node from `lstat` metadata (no content, no subtree).
pub fn node_from_meta(name: &[u8], m: &Metadata) -> Node {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        NodeKind::Dir
    } else if ft.is_symlink() {
        NodeKind::Symlink
    } else if ft.is_fifo() {
        NodeKind::Fifo
    } else if ft.is_char_device() {
        NodeKind::CharDev
    } else if ft.is_block_device() {
        NodeKind::BlockDev
    } else if ft.is_socket() {
        NodeKind::Socket
    } else {
        NodeKind::File
    };
    let mut n = Node::new(name.to_vec(), kind);
    n.mode = m.mode() & 0o7777;
    n.uid = m.uid();
    n.gid = m.gid();
    n.mtime_ns = m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec());
    n.ctime_ns = m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec());
    n.inode = m.ino();
    n.dev = m.dev();
    n.nlink = m.nlink();
    n.size = if kind == NodeKind::File { m.size() } else { 0 };
    n.rdev = m.rdev();
    n
}

/// Reads extended attributes without following symlinks; unsupported filesystems give none.
pub fn read_xattrs(path: &Path) -> Vec<Xattr> {
    let Ok(names) = xattr::list(path) else { return Vec::new() };
    let mut out: Vec<Xattr> = names
        .filter_map(|n| {
            let v = xattr::get(path, &n).ok().flatten()?;
            Some(Xattr { name: n.as_bytes().to_vec(), value: v })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The files cache: a file whose size, mtime, ctime and inode all match its node in the parent
/// snapshot is not read again.
pub fn unchanged(old: &Node, new: &Node) -> bool {
    old.kind == NodeKind::File
        && new.kind == NodeKind::File
        && old.size == new.size
        && old.mtime_ns == new.mtime_ns
        && old.ctime_ns == new.ctime_ns
        && old.inode == new.inode
}
