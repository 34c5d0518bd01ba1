//! The state of a shadowed tree: every path with its node. The primary, the standby and a
//! point-in-time restore all change it with the same [`Manifest::apply`], so they agree on what
//! a sequence of records means.

use crate::path;
use crate::record::Op;
use kura_repo::{Id, Node, NodeKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of an encoded manifest.
pub const MANIFEST_VERSION: u32 = 1;

/// Paths (relative, raw bytes) and their nodes; a path's parent is always a directory entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    entries: BTreeMap<Vec<u8>, Node>,
    /// Regular files and their bytes (kept as entries change; not encoded).
    #[serde(skip)]
    files: u64,
    #[serde(skip)]
    bytes: u64,
}

/// The range of keys strictly below `dir` (`dir/` up to `dir0`: `0` follows `/`).
fn below(dir: &[u8]) -> (std::ops::Bound<Vec<u8>>, std::ops::Bound<Vec<u8>>) {
    let mut lo = dir.to_vec();
    lo.push(b'/');
    let mut hi = dir.to_vec();
    hi.push(b'0');
    (std::ops::Bound::Included(lo), std::ops::Bound::Excluded(hi))
}

/// The directory a parent that was not a directory turns into.
pub fn implicit_dir() -> Node {
    let mut n = Node::new(Vec::new(), NodeKind::Dir);
    n.mode = 0o755;
    n
}

impl Manifest {
    /// The node at `p`.
    pub fn get(&self, p: &[u8]) -> Option<&Node> {
        self.entries.get(p)
    }

    /// The entry at `p` with its stored key.
    pub fn iter_at(&self, p: &[u8]) -> Option<(&Vec<u8>, &Node)> {
        self.entries.get_key_value(p)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry in path order (a directory before what it holds).
    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Node)> {
        self.entries.iter()
    }

    /// The entries strictly below `dir`.
    pub fn below(&self, dir: &[u8]) -> impl Iterator<Item = (&Vec<u8>, &Node)> {
        self.entries.range(below(dir))
    }

    /// Paths whose entries differ between `self` and `other` (kind, mode, size, mtime, link
    /// target or content; owners aside, a standby may not be able to set them), and paths only
    /// one of them has.
    pub fn differences(&self, other: &Manifest) -> Vec<Vec<u8>> {
        let same = |a: &Node, b: &Node| a.kind == b.kind && a.mode == b.mode && a.size == b.size && a.mtime_ns == b.mtime_ns && a.target == b.target && a.content == b.content;
        let mut out: Vec<Vec<u8>> = self.entries.iter().filter(|(p, n)| other.get(p).is_none_or(|o| !same(n, o))).map(|(p, _)| p.clone()).collect();
        out.extend(other.entries.keys().filter(|p| !self.entries.contains_key(*p)).cloned());
        out.sort();
        out
    }

    /// The entries at and below `paths` and their ancestors: enough for the records naming
    /// those paths to change it as they change the whole tree (counts included).
    pub fn subset<'a>(&self, paths: impl Iterator<Item = &'a [u8]>) -> Manifest {
        let mut m = Manifest::default();
        let mut done = std::collections::HashSet::new();
        for p in paths {
            if !done.insert(p) {
                continue;
            }
            let subtree = self.entries.range(below(p)).map(|(k, _)| k.as_slice());
            for k in path::ancestors(p).chain([p]).chain(subtree) {
                if !m.entries.contains_key(k)
                    && let Some(n) = self.entries.get(k)
                {
                    m.ins(k.to_vec(), n.clone());
                }
            }
        }
        m
    }

    /// Forgets the file at `p` (only a file), so the next comparison reads it again.
    pub fn forget_file(&mut self, p: &[u8]) {
        if self.entries.get(p).is_some_and(|n| n.kind == NodeKind::File) {
            self.rem(p);
        }
    }

    /// Every chunk id a file uses.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &Id> {
        self.entries.values().flat_map(|n| n.content.iter())
    }

    fn ins(&mut self, k: Vec<u8>, n: Node) {
        if n.kind == NodeKind::File {
            self.files += 1;
            self.bytes = self.bytes.saturating_add(n.size);
        }
        if let Some(old) = self.entries.insert(k, n) {
            self.uncount(&old);
        }
    }

    fn rem(&mut self, k: &[u8]) -> Option<Node> {
        let n = self.entries.remove(k)?;
        self.uncount(&n);
        Some(n)
    }

    fn uncount(&mut self, n: &Node) {
        if n.kind == NodeKind::File {
            self.files = self.files.saturating_sub(1);
            self.bytes = self.bytes.saturating_sub(n.size);
        }
    }

    /// Regular files, and their bytes.
    pub fn totals(&self) -> (u64, u64) {
        (self.files, self.bytes)
    }

    /// Regular files at or below `p`, and their bytes.
    pub fn totals_at(&self, p: &[u8]) -> (u64, u64) {
        self.entries.get(p).into_iter().chain(self.entries.range(below(p)).map(|(_, n)| n)).filter(|n| n.kind == NodeKind::File).fold((0u64, 0u64), |(f, b), n| (f + 1, b.saturating_add(n.size)))
    }

    fn remove_tree(&mut self, p: &[u8]) {
        self.rem(p);
        let gone: Vec<Vec<u8>> = self.entries.range(below(p)).map(|(k, _)| k.clone()).collect();
        for k in gone {
            self.rem(&k);
        }
    }

    /// Makes every ancestor of `p` a directory (replacing files and links in the way).
    fn make_parents(&mut self, p: &[u8]) {
        for a in path::ancestors(p) {
            match self.entries.get(a) {
                Some(n) if n.kind == NodeKind::Dir => {}
                Some(_) | None => self.ins(a.to_vec(), implicit_dir()),
            }
        }
    }

    /// Applies one change. Paths must have passed [`path::check`].
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Put { path: p, node } => {
                self.make_parents(p);
                if node.kind != NodeKind::Dir && self.entries.get(p.as_slice()).is_some_and(|n| n.kind == NodeKind::Dir) {
                    self.remove_tree(p);
                }
                self.ins(p.clone(), Node::clone(node));
            }
            Op::Delete { path: p } => self.remove_tree(p),
            Op::Pages { path: p, page_size, db_pages, pages, .. } => {
                let ps = crate::sqlite_stream::page_size_of;
                if self.entries.get(p.as_slice()).and_then(ps) != Some(*page_size) {
                    self.make_parents(p);
                    self.remove_tree(p);
                    self.ins(p.clone(), crate::sqlite_stream::new_node(*page_size));
                }
                // In place: a copy of a large database's page list per commit would cost more
                // than the commit.
                if let Some(n) = self.entries.get_mut(p.as_slice()) {
                    let old = n.size;
                    crate::sqlite_stream::patch(n, *page_size, *db_pages, pages);
                    self.bytes = self.bytes.saturating_sub(old).saturating_add(n.size);
                }
            }
            Op::Rename { from, to } => {
                if from == to || path::within(to, from) || !self.entries.contains_key(from.as_slice()) {
                    return;
                }
                let mut moved: Vec<(Vec<u8>, Node)> = self.entries.range(below(from)).map(|(k, v)| (k.clone(), v.clone())).collect();
                let top = self.rem(from);
                for (k, _) in &moved {
                    self.rem(k);
                }
                self.remove_tree(to);
                self.make_parents(to);
                if let Some(top) = top {
                    self.ins(to.clone(), top);
                }
                for (k, v) in moved.drain(..) {
                    let mut nk = to.clone();
                    nk.extend_from_slice(&k[from.len()..]);
                    self.ins(nk, v);
                }
            }
        }
    }

    /// Encoded for the wire (`GET .../manifest`).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&(MANIFEST_VERSION, self)).unwrap_or_default()
    }

    /// Decodes [`Manifest::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Result<Manifest, String> {
        let (v, mut m): (u32, Manifest) = postcard::from_bytes(b).map_err(|e| format!("manifest does not decode: {e}"))?;
        (m.files, m.bytes) = m.entries.values().filter(|n| n.kind == NodeKind::File).fold((0u64, 0u64), |(f, b), n| (f + 1, b.saturating_add(n.size)));
        if v != MANIFEST_VERSION {
            return Err(format!("manifest version {v} is not supported"));
        }
        if let Some(k) = m.entries.keys().find(|k| path::check(k).is_err()) {
            return Err(format!("manifest names a bad path {:?}", path::show(k)));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(c: u8) -> Node {
        let mut n = Node::new(Vec::new(), NodeKind::File);
        n.content = vec![Id([c; 32])];
        n
    }
    fn put(p: &str, n: Node) -> Op {
        Op::Put { path: p.as_bytes().to_vec(), node: Box::new(n) }
    }
    fn keys(m: &Manifest) -> Vec<String> {
        m.iter().map(|(k, _)| path::show(k)).collect()
    }

    #[test]
    fn puts_make_parents_and_deletes_take_subtrees() {
        let mut m = Manifest::default();
        m.apply(&put("a/b/c", file(1)));
        m.apply(&put("ab", file(2)));
        assert_eq!(keys(&m), ["a", "a/b", "a/b/c", "ab"]);
        m.apply(&Op::Delete { path: b"a".to_vec() });
        assert_eq!(keys(&m), ["ab"]);
        // A file under a file: the file in the way becomes a directory.
        m.apply(&put("ab/x", file(3)));
        assert_eq!(m.get(b"ab").unwrap().kind, NodeKind::Dir);
        // A file over a directory replaces the whole subtree.
        m.apply(&put("ab", file(4)));
        assert_eq!(keys(&m), ["ab"]);
    }

    #[test]
    fn renames_move_subtrees_and_replace_the_target() {
        let mut m = Manifest::default();
        m.apply(&put("d/x", file(1)));
        m.apply(&put("d/y/z", file(2)));
        m.apply(&put("e/old", file(3)));
        m.apply(&Op::Rename { from: b"d".to_vec(), to: b"e".to_vec() });
        assert_eq!(keys(&m), ["e", "e/x", "e/y", "e/y/z"]);
        assert_eq!(m.get(b"e/y/z").unwrap().content, vec![Id([2; 32])]);
        // Into itself, or from nowhere: nothing happens.
        let before = m.clone();
        m.apply(&Op::Rename { from: b"e".to_vec(), to: b"e/y/q".to_vec() });
        m.apply(&Op::Rename { from: b"nope".to_vec(), to: b"e".to_vec() });
        assert_eq!(m, before);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    proptest! {
        /// Whatever the order of changes, every entry's parent is a directory in the manifest.
        #[test]
        fn parents_are_always_directories(ops in proptest::collection::vec((0u8..4, 0usize..6, 0usize..6), 0..40)) {
            let names = ["a", "a/b", "a/b/c", "b", "b/a", "c"];
            let mut m = Manifest::default();
            for (kind, x, y) in ops {
                let op = match kind {
                    0 => put(names[x], file(1)),
                    1 => put(names[x], implicit_dir()),
                    2 => Op::Delete { path: names[x].as_bytes().to_vec() },
                    _ => Op::Rename { from: names[x].as_bytes().to_vec(), to: names[y].as_bytes().to_vec() },
                };
                m.apply(&op);
                let counted = m.iter().filter(|(_, n)| n.kind == NodeKind::File).count() as u64;
                prop_assert_eq!(m.totals().0, counted);
                for (k, _) in m.iter() {
                    if let Some(p) = path::parent(k) {
                        prop_assert_eq!(m.get(p).map(|n| n.kind), Some(NodeKind::Dir), "{:?}", path::show(k));
                    }
                }
            }
        }

        /// Changes applied to the subset of the tree they touch change its totals as they
        /// change the whole tree's (the breaker weighs bursts that way).
        #[test]
        fn a_subset_changes_as_the_whole_tree_does(
            setup in proptest::collection::vec((0u8..2, 0usize..8, 1u64..100), 0..20),
            ops in proptest::collection::vec((0u8..4, 0usize..8, 0usize..8, 1u64..100), 0..20),
        ) {
            let names = ["a", "a/b", "a/b/c", "a/d", "b", "b/a", "c", "c/x/y"];
            let make = |kind: u8, x: usize, y: usize, size: u64| match kind {
                0 => put(names[x], Node { size, ..file(size as u8) }),
                1 => put(names[x], implicit_dir()),
                2 => Op::Delete { path: names[x].as_bytes().to_vec() },
                _ => Op::Rename { from: names[x].as_bytes().to_vec(), to: names[y].as_bytes().to_vec() },
            };
            let mut whole = Manifest::default();
            for (k, x, size) in setup {
                whole.apply(&make(k, x, 0, size));
            }
            let ops: Vec<Op> = ops.into_iter().map(|(k, x, y, size)| make(k, x, y, size)).collect();
            let mut part = whole.subset(ops.iter().flat_map(|op| match op {
                Op::Put { path, .. } | Op::Delete { path } | Op::Pages { path, .. } => vec![path.as_slice()],
                Op::Rename { from, to } => vec![from.as_slice(), to.as_slice()],
            }));
            let (before_whole, before_part) = (whole.totals(), part.totals());
            for op in &ops {
                whole.apply(op);
                part.apply(op);
            }
            let after = (before_whole.0 + part.totals().0 - before_part.0, before_whole.1 + part.totals().1 - before_part.1);
            prop_assert_eq!(after, whole.totals());
        }

        #[test]
        fn random_bytes_never_panic_the_decoder(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Manifest::decode(&b);
        }
    }
}
