//! Copies snapshots into another repository (another key, another machine, a bucket): every
//! blob is read and verified from the source, named anew with the destination's key, stored
//! unless the destination has it already, and trees are rewritten with the new names. What an
//! earlier copy of the same host and paths already renamed is learnt from that copy's trees, so
//! a daily copy reads only what changed since.

use crate::error::OpsError;
use kura_repo::BlobKind;
use kura_repo::snapshot::{Snapshot, SnapshotBody, SnapshotPublic};
use kura_repo::tree::Tree;
use kura_repo::{Id, Repository};
use serde::Serialize;
use crate::retention::{Period, bucket};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use std::collections::HashMap;
use std::hash::Hash;

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
    /// Blobs read from the source (what crossed the wire, trees and data).
    pub blobs_read: u64,
    /// Names learnt from earlier copies (blobs never read again).
    pub names_learnt: u64,
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
            None => {
                self.report.blobs_read += 1;
                self.src.read_blob(id)?
            }
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
        self.report.blobs_read += 1;
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

impl Copier<'_> {
    /// Learns the names of an earlier copy: `src_tree` in the source and `dst_tree`, its copy,
    /// walked side by side. Trees that differ in any name, kind, size or chunk count are not a
    /// copy of each other and teach nothing; a tree's own name is learnt only when everything
    /// below it was alike. Adds the pairs of data blobs learnt; true when the whole tree was.
    fn learn(&mut self, src_tree: &Id, dst_tree: &Id, pairs: &mut Vec<(Id, Id)>) -> Result<bool, OpsError> {
        if let Some(n) = self.names.get(src_tree) {
            return Ok(n == dst_tree);
        }
        let (a, b) = (self.src.read_tree(src_tree)?, self.dst.read_tree(dst_tree)?);
        let alike = a.nodes.len() == b.nodes.len()
            && a.nodes.iter().zip(&b.nodes).all(|(x, y)| {
                x.name == y.name && x.kind == y.kind && x.size == y.size && x.content.len() == y.content.len() && x.subtree.is_some() == y.subtree.is_some()
            });
        if !alike {
            return Ok(false);
        }
        let mut learnt = Vec::new();
        let mut whole = true;
        for (x, y) in a.nodes.iter().zip(&b.nodes) {
            learnt.extend(x.content.iter().copied().zip(y.content.iter().copied()));
            if let (Some(xs), Some(ys)) = (x.subtree, y.subtree) {
                whole &= self.learn(&xs, &ys, pairs)?;
            }
        }
        if whole {
            self.names.insert(*src_tree, *dst_tree);
            self.report.names_learnt += 1;
        }
        self.report.names_learnt += learnt.len() as u64;
        for (x, y) in &learnt {
            self.names.insert(*x, *y);
        }
        pairs.extend(learnt);
        Ok(whole)
    }
}

/// Blob pairs an earlier copy taught that are read back and checked (the source's bytes must
/// have the destination's id): if the "copy" was not one, nothing it taught is used.
const SPOT_CHECKS: usize = 8;

/// Whether two snapshots are copies of each other: kura names blobs with each repository's
/// key, so ids cannot tell; the public facts can.
fn same(a: &SnapshotPublic, b: &SnapshotPublic) -> bool {
    a.time == b.time && a.host == b.host && a.paths == b.paths && a.tags == b.tags
}

/// The newest snapshot of each `period` (calendar buckets in `tz`, as retention counts them) per
/// group (`items`: id, time, group such as host and paths), oldest first: what a weekly server
/// takes from a daily one. A snapshot dated in the future of `now` is never the newest of
/// anything (a wrong clock or a forged date must not stand in for the real week).
pub fn newest_of<G: Eq + Hash + Clone>(items: &[(Id, Timestamp, G)], period: Period, tz: &TimeZone, now: Timestamp) -> Vec<Id> {
    let mut best: HashMap<(G, i64), (Timestamp, Id)> = HashMap::new();
    for (id, t, g) in items.iter().filter(|(_, t, _)| *t <= now) {
        let b = bucket(period, &t.to_zoned_datetime(tz.clone()));
        let e = best.entry((g.clone(), b)).or_insert((*t, *id));
        if (*t, *id) > *e {
            *e = (*t, *id);
        }
    }
    let mut out: Vec<(Timestamp, Id)> = best.into_values().collect();
    out.sort();
    out.into_iter().map(|(_, id)| id).collect()
}

/// Copies the source snapshots `ids` into `dst` (whose session the caller registered), skipping
/// those `dst` already has. Each copy is written only after all its data is durable, so an
/// interrupted copy leaves no snapshot missing data (the next run reuses what was stored).
pub fn copy(src: &Repository, dst: &Repository, ids: &[Id]) -> Result<CopyReport, OpsError> {
    let mut report = CopyReport::default();
    // A damaged destination snapshot is no copy of anything (check reports it).
    let existing: Vec<SnapshotPublic> = dst.snapshots()?.into_iter().filter_map(|(_, s)| s.ok()).map(|s| s.public).collect();
    let mut copier = Copier { src, dst, names: HashMap::new(), report: &mut report };
    // Earlier copies: the source snapshots the destination has a copy of, with that copy.
    let sources: Vec<Snapshot> = src.snapshots()?.into_iter().filter_map(|(_, s)| s.ok()).collect();
    let mut earlier: Vec<(Snapshot, Snapshot)> = Vec::new();
    for (_, d) in dst.snapshots()? {
        let Ok(d) = d else { continue };
        if let Some(s) = sources.iter().find(|s| same(&s.public, &d.public)) {
            earlier.push((s.clone(), d));
        }
    }
    let mut taught: std::collections::HashSet<Id> = std::collections::HashSet::new();
    let mut done = Vec::new();
    for id in ids {
        let snap = src.read_snapshot(id)?;
        if existing.iter().any(|e| same(e, &snap.public)) {
            copier.report.skipped.push(id.to_hex());
            continue;
        }
        // The newest earlier copy of the same host and paths teaches the names of what did not
        // change; a few of its pairs are checked first.
        if let Some((s, d)) = earlier
            .iter()
            .filter(|(s, _)| s.public.host == snap.public.host && s.public.paths == snap.public.paths && s.time() <= snap.time())
            .max_by_key(|(s, _)| s.time())
            && taught.insert(s.body.tree)
        {
            let saved = (copier.names.clone(), copier.report.names_learnt);
            let mut pairs = Vec::new();
            copier.learn(&s.body.tree, &d.body.tree, &mut pairs)?;
            let step = (pairs.len() / SPOT_CHECKS).max(1);
            for (x, y) in pairs.iter().step_by(step).take(SPOT_CHECKS) {
                let data = src.read_blob(x)?;
                if dst.key().blob_id(&data) != *y {
                    (copier.names, copier.report.names_learnt) = saved;
                    break;
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_newest_of_each_week_per_group_and_nothing_from_the_future() {
        let tz = TimeZone::UTC;
        let id = |n: u8| Id([n; 32]);
        // Mon 2026-11-02 .. Sun 2026-11-15: two ISO weeks, two hosts; one future-dated snapshot.
        let items = vec![
            (id(1), at("2026-11-02T10:00:00Z"), "a"),
            (id(2), at("2026-11-08T23:00:00Z"), "a"),
            (id(3), at("2026-11-05T12:00:00Z"), "a"),
            (id(4), at("2026-11-09T01:00:00Z"), "a"),
            (id(5), at("2026-11-03T00:00:00Z"), "b"),
            (id(6), at("2027-01-01T00:00:00Z"), "a"),
        ];
        let now = at("2026-11-20T00:00:00Z");
        assert_eq!(newest_of(&items, Period::Weekly, &tz, now), vec![id(5), id(2), id(4)]);
        assert_eq!(newest_of(&items, Period::Monthly, &tz, now), vec![id(5), id(4)]);
        assert_eq!(newest_of(&items, Period::Daily, &tz, now).len(), 5);
    }

    proptest! {
        /// Every pick is the newest of its bucket and group, and every bucket with a snapshot
        /// has exactly one pick.
        #[test]
        fn one_newest_per_bucket(times in proptest::collection::vec((0i64..400 * 86_400, 0u8..3), 0..60), p in 0usize..6) {
            let period = Period::ALL[p];
            let tz = TimeZone::UTC;
            let items: Vec<(Id, Timestamp, u8)> = times.iter().enumerate().map(|(i, (s, g))| (Id([i as u8; 32]), Timestamp::from_second(1_700_000_000 + s).unwrap(), *g)).collect();
            let now = Timestamp::from_second(1_800_000_000).unwrap();
            let picked = newest_of(&items, period, &tz, now);
            let key = |t: &Timestamp, g: u8| (g, bucket(period, &t.to_zoned_datetime(tz.clone())));
            let mut buckets = std::collections::HashSet::new();
            for (_, t, g) in &items {
                buckets.insert(key(t, *g));
            }
            prop_assert_eq!(picked.len(), buckets.len());
            for id in &picked {
                let (_, t, g) = items.iter().find(|(i, _, _)| i == id).unwrap();
                prop_assert!(items.iter().all(|(i, u, h)| key(u, *h) != key(t, *g) || (*u, *i) <= (*t, *id)));
            }
        }
    }
}
