//! Repair: rebuild the index from the packs themselves, and rewrite damaged snapshots without
//! the files whose data is lost, keeping the originals, so everything else stays restorable.

use crate::error::OpsError;
use crate::progress::Progress;
use kura_repo::index::IndexPack;
use kura_repo::pack::{BlobKind, PackEntry};
use kura_repo::{Id, Node, NodeKind, Repository, Snapshot, Tree};
use kura_store::{Kind, StoreError};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// What `repair index` did.
#[derive(Debug, Default, Serialize)]
pub struct IndexRepair {
    /// Packs indexed.
    pub packs: usize,
    /// Blobs indexed.
    pub blobs: usize,
    /// Blobs left out because their bytes failed verification (`--read-data`).
    pub damaged_blobs: usize,
    /// Packs left out (header unreadable), with the reason.
    pub unreadable_packs: Vec<String>,
    /// Old index files replaced.
    pub old_index_files: usize,
    /// New index files written.
    pub new_index_files: usize,
}

/// Rebuilds the index from the packs' headers; with `read_data`, reads every pack and leaves
/// out blobs that fail verification, so the next backup of those files stores them again and
/// `repair snapshots` sees exactly what is lost.
pub fn repair_index(repo: &Repository, read_data: bool, progress: &dyn Progress) -> Result<IndexRepair, OpsError> {
    crate::prune::ensure_alone(repo, "repair")?;
    let mut r = IndexRepair::default();
    // Old index files first: any index file written after this listing is kept.
    let old: Vec<String> = repo.store().list(Kind::Index)?.into_iter().map(|l| l.name).collect();
    let packs = repo.store().list(Kind::Pack)?;
    progress.add_total(packs.len() as u64, packs.iter().map(|l| l.size).sum());
    let mut fresh: Vec<IndexPack> = Vec::new();
    for l in &packs {
        let Some(id) = Id::from_hex(&l.name) else { continue };
        let header = match repo.read_pack_header(&id, l.size) {
            Ok(h) => h,
            Err(e) => {
                r.unreadable_packs.push(e.to_string());
                progress.advance(1, l.size);
                continue;
            }
        };
        let mut entries: Vec<PackEntry> = header.entries;
        if read_data {
            let bytes = match repo.store().get(Kind::Pack, &l.name) {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let before = entries.len();
            entries.retain(|e| {
                let end = e.offset as usize + e.length as usize;
                bytes.get(e.offset as usize..end).is_some_and(|sealed| {
                    repo.decode_blob(&e.id, &id, e.compression, e.raw_length, sealed).is_ok()
                })
            });
            r.damaged_blobs += before - entries.len();
        }
        progress.advance(1, l.size);
        r.packs += 1;
        r.blobs += entries.len();
        // A pack whose every blob is damaged is still listed, with no blobs: left out, it would
        // look like a pack a crashed backup never indexed, and the next command would index its
        // damaged blobs again from the header. Listed empty, prune deletes it.
        fresh.push(IndexPack { id, blobs: entries });
    }
    for chunk in fresh.chunks(256) {
        repo.write_index_file(chunk.to_vec())?;
        r.new_index_files += 1;
    }
    // New index files carry fresh nonces, so none of them has an old file's name.
    for name in old {
        match repo.store().delete(Kind::Index, &name) {
            Ok(()) | Err(StoreError::NotFound(_)) => r.old_index_files += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(r)
}

/// One repaired snapshot.
#[derive(Debug, Serialize)]
pub struct RepairedSnapshot {
    /// The damaged original (kept unless asked otherwise).
    pub original: String,
    /// The repaired copy (`None` on a dry run).
    pub repaired: Option<String>,
    /// Files left out (their data is lost).
    pub files_removed: Vec<String>,
    /// Directories whose listing was lost (restored empty).
    pub dirs_emptied: Vec<String>,
}

/// What `repair snapshots` did.
#[derive(Debug, Default, Serialize)]
pub struct SnapshotRepair {
    /// Snapshots looked at.
    pub snapshots: usize,
    /// Damaged ones and what became of them.
    pub repaired: Vec<RepairedSnapshot>,
    /// Snapshot objects that cannot be read at all (nothing to repair from).
    pub unreadable: Vec<String>,
    /// Originals forgotten (`--forget`).
    pub forgotten: usize,
}

struct Rewriter<'a> {
    repo: &'a Repository,
    present: HashSet<Id>,
    dry_run: bool,
    // Old tree id -> new tree id (or unchanged), with what was lost below it.
    memo: HashMap<Id, (Id, Vec<String>, Vec<String>)>,
}

impl Rewriter<'_> {
    fn usable(&self, blob: &Id) -> bool {
        self.repo.index().get(blob).is_some_and(|(pack, _)| self.present.contains(&pack))
    }

    fn empty_tree(&self) -> Result<Id, OpsError> {
        self.save(&Tree::new(Vec::new()))
    }

    fn save(&self, t: &Tree) -> Result<Id, OpsError> {
        let bytes = t.encode();
        if self.dry_run {
            return Ok(self.repo.key().blob_id(&bytes));
        }
        Ok(self.repo.save_blob(BlobKind::Tree, &bytes)?.0)
    }

    /// Returns the tree to use instead of `id` and the paths (relative to it) lost.
    fn tree(&mut self, id: Id, path: &str) -> Result<(Id, Vec<String>, Vec<String>), OpsError> {
        if let Some((n, f, d)) = self.memo.get(&id) {
            let prefix = |v: &Vec<String>| v.iter().map(|p| format!("{path}{p}")).collect::<Vec<_>>();
            return Ok((*n, prefix(f), prefix(d)));
        }
        let tree = match self.usable(&id).then(|| self.repo.read_tree(&id)) {
            Some(Ok(t)) => t,
            _ => {
                let e = self.empty_tree()?;
                return Ok((e, Vec::new(), vec![if path.is_empty() { "/".into() } else { path.into() }]));
            }
        };
        let (mut files, mut dirs) = (Vec::new(), Vec::new());
        let mut nodes: Vec<Node> = Vec::with_capacity(tree.nodes.len());
        let mut changed = false;
        for n in tree.nodes {
            let child = format!("/{}", n.display_name());
            match n.kind {
                NodeKind::File if !n.content.iter().all(|c| self.usable(c)) => {
                    files.push(child);
                    changed = true;
                }
                NodeKind::Dir if n.subtree.is_some() => {
                    let mut n = n;
                    let sub = n.subtree.unwrap_or(id);
                    let (new, f, d) = self.tree(sub, &child)?;
                    if new != sub {
                        changed = true;
                        n.subtree = Some(new);
                    }
                    files.extend(f);
                    dirs.extend(d);
                    nodes.push(n);
                }
                _ => nodes.push(n),
            }
        }
        let new = if changed { self.save(&Tree::new(nodes))? } else { id };
        self.memo.insert(id, (new, files.clone(), dirs.clone()));
        let prefix = |v: Vec<String>| v.into_iter().map(|p| format!("{path}{p}")).collect::<Vec<_>>();
        Ok((new, prefix(files), prefix(dirs)))
    }
}

/// Finds snapshots that reference lost data (blobs in no index or in missing packs) and writes
/// a repaired copy of each: same time, host, paths, tags plus `repaired`, naming its original.
/// The original stays (retention treats the pair as one) unless `forget_originals`.
pub fn repair_snapshots(
    repo: &Repository,
    dry_run: bool,
    forget_originals: bool,
    progress: &dyn Progress,
) -> Result<SnapshotRepair, OpsError> {
    // Snapshots first, then packs (and the headers of packs the index does not cover yet): a
    // backup that commits meanwhile has all its data listed, so it is never taken for damaged.
    let mut all = repo.snapshots()?;
    all.retain(|(_, s)| !matches!(s, Err(kura_repo::RepoError::Store(StoreError::NotFound(_)))));
    repo.index_orphan_packs(false)?;
    let present: HashSet<Id> =
        repo.store().list(Kind::Pack)?.iter().filter_map(|l| Id::from_hex(&l.name)).collect();
    let protected = repo.protections()?;
    let mut rw = Rewriter { repo, present, dry_run, memo: HashMap::new() };
    let mut out = SnapshotRepair::default();
    let already: HashSet<String> =
        all.iter().filter_map(|(_, s)| s.as_ref().ok()?.public.original.clone()).collect();
    // (original id, snapshot, new root, files lost, directories emptied)
    type Fixed = (Id, Snapshot, Id, Vec<String>, Vec<String>);
    let mut fixed: Vec<Fixed> = Vec::new();
    for (id, s) in all {
        out.snapshots += 1;
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                out.unreadable.push(e.to_string());
                continue;
            }
        };
        progress.advance(1, 0);
        let (new_root, files, dirs) = rw.tree(s.body.tree, "")?;
        if new_root == s.body.tree {
            continue;
        }
        if already.contains(&id.to_hex()) {
            // Repaired by an earlier run: only the request to drop the original is left.
            if forget_originals && !dry_run && !protected.contains(&id) {
                match repo.store().delete(Kind::Snapshot, &id.to_hex()) {
                    Ok(()) | Err(StoreError::NotFound(_)) => out.forgotten += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            continue;
        }
        fixed.push((id, s, new_root, files, dirs));
    }
    if !dry_run && !fixed.is_empty() {
        repo.flush()?;
    }
    for (id, s, root, files, dirs) in fixed {
        let mut repaired = None;
        if !dry_run {
            let mut n = s.clone();
            n.body.tree = root;
            n.public.original = Some(id.to_hex());
            if !n.public.tags.iter().any(|t| t == "repaired") {
                n.public.tags.push("repaired".into());
            }
            n.public.packs = crate::backup::packs_of(repo, root)?;
            let new_id = repo.save_snapshot(&n)?;
            repaired = Some(new_id.to_hex());
            if forget_originals && !protected.contains(&id) {
                match repo.store().delete(Kind::Snapshot, &id.to_hex()) {
                    Ok(()) | Err(StoreError::NotFound(_)) => out.forgotten += 1,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        out.repaired.push(RepairedSnapshot { original: id.to_hex(), repaired, files_removed: files, dirs_emptied: dirs });
    }
    Ok(out)
}
