//! Walking snapshot trees: `ls` (entries below a path) and `diff` (what changed between two
//! snapshots, skipping identical subtrees by id).

use crate::error::OpsError;
use kura_repo::{Id, Node, NodeKind, Repository};
use serde::Serialize;
use std::collections::BTreeMap;

/// An entry for listings.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Path inside the snapshot, starting with `/`.
    pub path: String,
    /// "file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (RFC 3339).
    pub mtime: String,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Symlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Name of a node kind.
pub fn kind_name(k: NodeKind) -> &'static str {
    match k {
        NodeKind::File => "file",
        NodeKind::Dir => "dir",
        NodeKind::Symlink => "symlink",
        NodeKind::Fifo => "fifo",
        NodeKind::CharDev => "chardev",
        NodeKind::BlockDev => "blockdev",
        NodeKind::Socket => "socket",
    }
}

fn entry(path: String, n: &Node) -> Entry {
    let mtime = jiff::Timestamp::from_nanosecond(n.mtime_ns as i128)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Entry {
        path,
        kind: kind_name(n.kind),
        size: n.size,
        mode: n.mode,
        mtime,
        uid: n.uid,
        gid: n.gid,
        target: (n.kind == NodeKind::Symlink).then(|| String::from_utf8_lossy(&n.target).into_owned()),
    }
}

fn join(dir: &str, name: &[u8]) -> String {
    let n = String::from_utf8_lossy(name);
    if dir == "/" { format!("/{n}") } else { format!("{dir}/{n}") }
}

/// Visits every node below `tree` depth-first in name order, with its path.
pub fn for_each_node(
    repo: &Repository,
    tree: &Id,
    dir: &str,
    f: &mut dyn FnMut(&str, &Node) -> Result<(), OpsError>,
) -> Result<(), OpsError> {
    let t = repo.read_tree(tree)?;
    for n in &t.nodes {
        let p = join(dir, &n.name);
        f(&p, n)?;
        if let Some(sub) = &n.subtree {
            for_each_node(repo, sub, &p, f)?;
        }
    }
    Ok(())
}

/// Lists the entries at and below `path` ("/" for all).
pub fn ls(repo: &Repository, root: &Id, path: &str) -> Result<Vec<Entry>, OpsError> {
    let want = format!("/{}", path.trim_matches('/'));
    let mut out = Vec::new();
    let mut found = want == "/";
    for_each_node(repo, root, "/", &mut |p, n| {
        if want == "/" || p == want || p.starts_with(&format!("{want}/")) {
            found = true;
            out.push(entry(p.to_string(), n));
        }
        Ok(())
    })?;
    if !found {
        return Err(OpsError::NoSuchPath(want));
    }
    Ok(out)
}

/// One difference between two snapshots.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    /// `+` added, `-` removed, `M` content changed, `T` type changed, `U` metadata changed.
    pub change: &'static str,
    /// Path.
    pub path: String,
}

fn children(repo: &Repository, t: Option<&Id>) -> Result<BTreeMap<Vec<u8>, Node>, OpsError> {
    Ok(match t {
        Some(id) => repo.read_tree(id)?.nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        None => BTreeMap::new(),
    })
}

fn all_below(repo: &Repository, n: &Node, p: &str, sign: &'static str, out: &mut Vec<Change>) -> Result<(), OpsError> {
    out.push(Change { change: sign, path: p.to_string() });
    if let Some(sub) = &n.subtree {
        for_each_node(repo, sub, p, &mut |q, _| {
            out.push(Change { change: sign, path: q.to_string() });
            Ok(())
        })?;
    }
    Ok(())
}

/// Compares two trees.
pub fn diff(repo: &Repository, a: &Id, b: &Id) -> Result<Vec<Change>, OpsError> {
    let mut out = Vec::new();
    diff_rec(repo, Some(a), Some(b), "/", &mut out)?;
    Ok(out)
}

fn diff_rec(repo: &Repository, a: Option<&Id>, b: Option<&Id>, dir: &str, out: &mut Vec<Change>) -> Result<(), OpsError> {
    if a == b {
        return Ok(());
    }
    let (ca, cb) = (children(repo, a)?, children(repo, b)?);
    let names: std::collections::BTreeSet<&Vec<u8>> = ca.keys().chain(cb.keys()).collect();
    for name in names {
        let p = join(dir, name);
        match (ca.get(name), cb.get(name)) {
            (Some(x), None) => all_below(repo, x, &p, "-", out)?,
            (None, Some(y)) => all_below(repo, y, &p, "+", out)?,
            (Some(x), Some(y)) if x.kind != y.kind => {
                out.push(Change { change: "T", path: p.clone() });
                if x.kind == NodeKind::Dir || y.kind == NodeKind::Dir {
                    diff_rec(repo, x.subtree.as_ref(), y.subtree.as_ref(), &p, out)?;
                }
            }
            (Some(x), Some(y)) => {
                if x.content != y.content || x.target != y.target {
                    out.push(Change { change: "M", path: p.clone() });
                } else if x.mode != y.mode || x.uid != y.uid || x.gid != y.gid || x.mtime_ns != y.mtime_ns || x.xattrs != y.xattrs {
                    out.push(Change { change: "U", path: p.clone() });
                }
                if x.kind == NodeKind::Dir {
                    diff_rec(repo, x.subtree.as_ref(), y.subtree.as_ref(), &p, out)?;
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}
