//! Tree blobs: one per directory, its entries sorted by name. An unchanged directory serialises to
//! the same bytes, hence the same id, so unchanged subtrees deduplicate.

use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Tree record version.
pub const TREE_VERSION: u32 = 1;

/// The type of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// Regular file.
    File,
    /// Directory (has a subtree).
    Dir,
    /// Symbolic link (has a target).
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// Unix socket.
    Socket,
}

/// An extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Attribute name, raw bytes.
    pub name: Vec<u8>,
    /// Attribute value.
    pub value: Vec<u8>,
}

/// One directory entry with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// File name, raw bytes (any byte but `/` and NUL).
    pub name: Vec<u8>,
    /// Entry type.
    pub kind: NodeKind,
    /// Permission bits (incl. setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status change time, nanoseconds (files cache only).
    pub ctime_ns: i64,
    /// Inode number (files cache and hardlink detection).
    pub inode: u64,
    /// Device of the filesystem holding it.
    pub dev: u64,
    /// Link count.
    pub nlink: u64,
    /// Size in bytes (files).
    pub size: u64,
    /// Device number (device nodes).
    pub rdev: u64,
    /// Symlink target, raw bytes.
    pub target: Vec<u8>,
    /// File content chunks in order.
    pub content: Vec<Id>,
    /// Directory subtree.
    pub subtree: Option<Id>,
    /// Extended attributes (incl. POSIX ACLs as `system.posix_acl_*`).
    pub xattrs: Vec<Xattr>,
}

impl Node {
    /// A node with only a name and kind set.
    pub fn new(name: Vec<u8>, kind: NodeKind) -> Self {
        Node {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
            dev: 0,
            nlink: 1,
            size: 0,
            rdev: 0,
            target: Vec::new(),
            content: Vec::new(),
            subtree: None,
            xattrs: Vec::new(),
        }
    }

    /// The name for display (lossy UTF-8).
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Tree {
    /// Record version.
    pub version: u32,
    /// Entries sorted by name, names unique.
    pub nodes: Vec<Node>,
}

/// Checks a name read from a repository is safe to create below a directory.
pub fn is_safe_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    /// A tree from nodes (sorted here).
    pub fn new(mut nodes: Vec<Node>) -> Self {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Tree { version: TREE_VERSION, nodes }
    }

    /// Serialises (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Parses and validates: version known, names safe, sorted and unique.
    pub fn decode(bytes: &[u8]) -> Result<Tree, String> {
        let t: Tree = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        if t.version != TREE_VERSION {
            return Err(format!("unsupported tree version {}", t.version));
        }
        for (i, n) in t.nodes.iter().enumerate() {
            if !is_safe_name(&n.name) {
                return Err(format!("unsafe entry name {:?}", n.display_name()));
            }
            if i > 0 && t.nodes[i - 1].name >= n.name {
                return Err(format!("entries unsorted or duplicated at {:?}", n.display_name()));
            }
            if (n.kind == NodeKind::Dir) != n.subtree.is_some() {
                return Err(format!("entry {:?} has a subtree iff it is a directory", n.display_name()));
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [&b".."[..], b".", b"", b"a/b", b"a\0"] {
            let t = Tree { version: 1, nodes: vec![Node::new(bad.to_vec(), NodeKind::File)] };
            assert!(Tree::decode(&t.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let n = Node::new(b"x".to_vec(), NodeKind::File);
        let t = Tree { version: 1, nodes: vec![n.clone(), n] };
        assert!(Tree::decode(&t.encode()).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(names in proptest::collection::btree_set("[a-z\\n日本 ]{1,8}", 0..20), size in 0u64..1<<40) {
            let nodes = names.into_iter().map(|n| { let mut x = Node::new(n.into_bytes(), NodeKind::File); x.size = size; x }).collect();
            let t = Tree::new(nodes);
            prop_assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Tree::decode(&bytes);
        }
    }
}
