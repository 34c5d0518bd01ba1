//! Copies snapshots into another repository (another key, another machine, a bucket): every
//! blob is read and verified from the source, named anew with the destination's key, stored
//! unless the destination has it already, and trees are rewritten with the new names.

use crate::error::OpsError;
use kura_repo::BlobKind;
use kura_repo::snapshot::{Snapshot, SnapshotBody, SnapshotPublic};
use kura_repo::tree::Tree;
use kura_repo::{Id, Repository};
use serde::Serialize;
use std::collections::HashMap;

/// One snapshot copied.
#[derive(Debug, Serialize)]
pub struct Copied {
    /// Its id in the source.
    pub source: String,
    /// Its id in the destination.
    pub copy: String,
}

/// What a copy did.
#[derive(Debug, Default, Serialize)]
pub struct CopyReport {
    /// Snapshots copied.
    pub copied: Vec<Copied>,
    /// Source snapshots the destination already has a copy of (same time, host, paths, tags).
    pub skipped: Vec<String>,
    /// Blobs the destination did not have.
    pub blobs_added: u64,
    /// Their plaintext bytes.
    pub bytes_added: u64,
}

/// Source blob ids already copied, and their names in the destination.
struct Copier<'a> {
    src: &'a Repository,
    dst: &'a Repository,
    names: HashMap<Id, Id>,
    report: &'a mut CopyReport,
}

impl Copier<'_> {
    fn blob(&mut self, id: &Id, kind: BlobKind, data: Option<Vec<u8>>) -> Result<Id, OpsError> {
        if let Some(n) = self.names.get(id) {
            return Ok(*n);
        }
        let data = match data {
            Some(d) => d,
            None => self.src.read_blob(id)?,
        };
        let (new, added) = self.dst.save_blob(kind, &data)?;
        if added {
            self.report.blobs_added += 1;
            self.report.bytes_added += data.len() as u64;
        }
        self.names.insert(*id, new);
        Ok(new)
    }

    /// Copies a tree and everything below it; returns its name in the destination.
    fn tree(&mut self, id: &Id) -> Result<Id, OpsError> {
        if let Some(n) = self.names.get(id) {
            return Ok(*n);
        }
        let mut tree = self.src.read_tree(id)?;
        for node in &mut tree.nodes {
            for c in &mut node.content {
                *c = self.blob(c, BlobKind::Data, None)?;
            }
            if let Some(sub) = node.subtree {
                node.subtree = Some(self.tree(&sub)?);
            }
        }
        let bytes = Tree::new(tree.nodes).encode();
        self.blob(id, BlobKind::Tree, Some(bytes))
    }
}

/// Whether two snapshots are copies of each other: kura names blobs with each repository's
/// key, so ids cannot tell; the public facts can.
fn same(a: &SnapshotPublic, b: &SnapshotPublic) -> bool {
    a.time == b.time && a.host == b.host && a.paths == b.paths && a.tags == b.tags
}

/// Copies the source snapshots `ids` into `dst` (whose session the caller registered), skipping
/// those `dst` already has. Each copy is written only after all its data is durable, so an
/// interrupted copy leaves no snapshot missing data (the next run reuses what was stored).
pub fn copy(src: &Repository, dst: &Repository, ids: &[Id]) -> Result<CopyReport, OpsError> {
    let mut report = CopyReport::default();
    // A damaged destination snapshot is no copy of anything (check reports it).
    let existing: Vec<SnapshotPublic> = dst.snapshots()?.into_iter().filter_map(|(_, s)| s.ok()).map(|s| s.public).collect();
    let mut copier = Copier { src, dst, names: HashMap::new(), report: &mut report };
    let mut done = Vec::new();
    for id in ids {
        let snap = src.read_snapshot(id)?;
        if existing.iter().any(|e| same(e, &snap.public)) {
            copier.report.skipped.push(id.to_hex());
            continue;
        }
        let root = copier.tree(&snap.body.tree)?;
        done.push((*id, snap, root));
    }
    for (id, snap, root) in done {
        dst.flush()?;
        let packs = crate::backup::packs_of(dst, root)?;
        crate::backup::ensure_present(dst, &packs)?;
        let copy = Snapshot {
            public: SnapshotPublic { packs, original: None, ..snap.public },
            // The parent names a snapshot of the source.
            body: SnapshotBody { tree: root, parent: None, ..snap.body },
        };
        let new = dst.save_snapshot(&copy)?;
        report.copied.push(Copied { source: id.to_hex(), copy: new.to_hex() });
    }
    Ok(report)
}
