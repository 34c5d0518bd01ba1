//! Check: the structure (every snapshot's trees and chunks are indexed, every indexed pack
//! exists, snapshots list the packs they use) and, with `read_data`, every stored byte. Damage is
//! reported per object with the snapshots and file paths it affects.

use crate::error::OpsError;
use crate::walk::for_each_node;
use kura_repo::pack::read_header;
use kura_repo::{Id, RepoError, Repository};
use kura_store::{Kind, ObjectName};
use serde::Serialize;
use kura_repo::id::{IdMap, IdSet};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Which packs `--read-data-subset` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    /// Part n of m (1-based): packs whose first id byte mod m is n-1; rotate n daily.
    Part(u32, u32),
    /// A random share of the packs, in percent.
    Percent(f64),
}

impl std::str::FromStr for Subset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| format!("bad percentage {s:?}"))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("percentage {s:?} must be in (0, 100]"));
            }
            return Ok(Subset::Percent(v));
        }
        let (n, m) = s.split_once('/').ok_or_else(|| format!("subset {s:?} is neither n/m nor p%"))?;
        let n: u32 = n.trim().parse().map_err(|_| format!("bad subset {s:?}"))?;
        let m: u32 = m.trim().parse().map_err(|_| format!("bad subset {s:?}"))?;
        if m == 0 || n == 0 || n > m || m > 256 {
            return Err(format!("subset {s:?} needs 1 <= n <= m <= 256"));
        }
        Ok(Subset::Part(n, m))
    }
}

/// Check options.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Read every stored byte: each pack must hash to its name and its header must decrypt and
    /// describe the pack. This catches all damage at rest; when a pack is damaged every blob in
    /// it is verified to name exactly what is lost.
    pub read_data: bool,
    /// Also verify every blob of every pack as a restore would (authenticate, decompress, hash to
    /// its id): catches a faulty writer, not only damage at rest. Costs CPU, not I/O.
    pub deep: bool,
    /// Read only a subset of the packs.
    pub subset: Option<Subset>,
}

/// One damaged object and what it affects.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    /// The object (`data/ab/…`, `index/…`, `snapshots/…`).
    pub object: String,
    /// What is wrong.
    pub problem: String,
    /// Snapshots (short ids) that lose data through it.
    pub snapshots: Vec<String>,
    /// Paths in those snapshots that are affected (first 50).
    pub paths: Vec<String>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    /// Snapshots checked.
    pub snapshots: usize,
    /// Packs in the repository.
    pub packs: usize,
    /// Packs read in full.
    pub packs_read: usize,
    /// Bytes read.
    pub bytes_read: u64,
    /// Trees checked.
    pub trees: usize,
    /// Damage found.
    pub damage: Vec<Damage>,
    /// Harmless findings (unindexed packs of an interrupted backup).
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn ok(&self) -> bool {
        self.damage.is_empty()
    }
}

fn selected(id: &Id, subset: Option<Subset>) -> bool {
    match subset {
        None => true,
        Some(Subset::Part(n, m)) => (id.0[0] as u32) % m == n - 1,
        Some(Subset::Percent(p)) => {
            let mut r = [0u8; 4];
            let _ = getrandom::fill(&mut r);
            (u32::from_le_bytes(r) as f64) < p / 100.0 * (u32::MAX as f64)
        }
    }
}

/// Runs a check; the repository's index must not be loaded yet (check loads it and reports).
pub fn check(repo: &Repository, opts: &CheckOptions) -> Result<CheckReport, OpsError> {
    let mut report = CheckReport::default();
    // Damaged blob id -> index into report.damage.
    // A blob can be damage seen from two sides (its tree unreadable in the structure pass, its
    // pack failing in the read pass): every entry naming it gets the paths.
    let mut bad_blobs: IdMap<Vec<usize>> = IdMap::default();
    let mut pending_damage: Vec<Damage> = Vec::new();
    let mut damage = |object: String, problem: String, blobs: &[Id], bad_blobs: &mut IdMap<Vec<usize>>| {
        let i = pending_damage.len();
        pending_damage.push(Damage { object, problem, snapshots: Vec::new(), paths: Vec::new() });
        for b in blobs {
            bad_blobs.entry(*b).or_default().push(i);
        }
    };

    let bad_indexes = repo.load_index()?;
    // Snapshots before packs: every pack a listed snapshot needs is then listed too, so a
    // backup committing meanwhile is never mistaken for damage.
    let mut snaps = repo.snapshots()?;
    snaps.retain(|(_, s)| !matches!(s, Err(RepoError::Store(kura_store::StoreError::NotFound(_)))));
    let listed: HashMap<Id, u64> = repo
        .store()
        .list(Kind::Pack)?
        .into_iter()
        .filter_map(|l| Id::from_hex(&l.name).map(|id| (id, l.size)))
        .collect();
    report.packs = listed.len();
    // Packs no index covers: read their headers (read-only) so their blobs count as present.
    let mut extra = kura_repo::index::Index::default();
    for (id, size) in &listed {
        if !repo.index().has_pack(id) {
            match repo.read_pack_header(id, *size) {
                Ok(h) => {
                    report.warnings.push(format!(
                        "{} is not indexed yet (left by an interrupted backup); the next backup indexes it",
                        ObjectName::new(Kind::Pack, &id.to_hex())
                    ));
                    extra.add_pack(*id, &h.entries);
                }
                Err(e) => damage(e.to_string(), "pack unreadable".into(), &[], &mut bad_blobs),
            }
        }
    }
    // An unreadable index file loses information only while some pack is covered by no other
    // index file; once a backup has indexed them again it is merely redundant.
    let all_covered = extra.packs().is_empty();
    for e in bad_indexes {
        if all_covered {
            report.warnings.push(format!("{e}; every pack is covered by other index files, so nothing is lost"));
        } else {
            damage(e.to_string(), "index file unreadable; its packs are indexed again by the next backup".into(), &[], &mut bad_blobs);
        }
    }
    // A pack a pending prune plan condemns may already be deleted (a prune was interrupted
    // mid-sweep): that is no damage unless a snapshot still needs a blob only it held, which
    // the structure walk below finds because such blobs are looked up as missing.
    let lookup = |b: &Id| {
        let idx = repo.index();
        idx.get(b).filter(|(p, _)| listed.contains_key(p) || !idx.is_condemned(p)).or_else(|| extra.get(b))
    };
    for (id, plan) in repo.plans() {
        report.warnings.push(if plan.keyless {
            format!(
                "a server's prune plan {} records {} deleted or condemned pack(s); the next `kura prune` with the key folds it into the index",
                id.short(),
                plan.condemned.len()
            )
        } else {
            format!("prune plan {} is pending ({} condemned pack(s)); the next `kura prune` finishes it", id.short(), plan.condemned.len())
        });
    }
    // Indexed packs that are gone.
    {
        let idx = repo.index();
        let mut by_pack: HashMap<Id, Vec<Id>> = HashMap::new();
        for (blob, pack, _) in idx.iter() {
            if !listed.contains_key(&pack) && !idx.is_condemned(&pack) {
                by_pack.entry(pack).or_default().push(*blob);
            }
        }
        for (pack, blobs) in by_pack {
            damage(ObjectName::new(Kind::Pack, &pack.to_hex()).to_string(), "pack is missing".into(), &blobs, &mut bad_blobs);
        }
    }

    // The read pass runs on its own threads while this thread walks the structure: the two
    // together are bound by the disk (or the CPU), not by their sum.
    // Every pack's header is compared with what the index says of it; the selected ones are
    // also read whole.
    let mut packs: Vec<(Id, bool)> =
        listed.keys().map(|id| (*id, opts.read_data && selected(id, opts.subset))).collect();
    packs.sort();
    // How many index entries point into each pack: a header must account for all of them.
    let mut per_pack: IdMap<usize> = IdMap::default();
    for (_, pack, _) in repo.index().iter() {
        *per_pack.entry(pack).or_default() += 1;
    }
    let next = AtomicUsize::new(0);
    let found: Mutex<Vec<(Id, String, Vec<Id>)>> = Mutex::new(Vec::new());
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let threads = crate::cores().min(packs.len());
    let extra_ref = &extra;
    let per_pack_ref = &per_pack;
    let mut good_snaps = Vec::new();
    std::thread::scope(|sc| -> Result<(), OpsError> {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, read)) = packs.get(i) else { break };
                // Only for damage reports (rare): which blobs the index places in this pack.
                let indexed = || -> Vec<Id> {
                    let v: Vec<Id> = repo.index().iter().filter(|(_, p, _)| p == id).map(|(b, _, _)| *b).collect();
                    if v.is_empty() { extra_ref.iter().filter(|(_, p, _)| p == id).map(|(b, _, _)| *b).collect() } else { v }
                };
                let (problem, blobs) = if *read {
                    verify_pack(repo, id, listed[id], opts.deep, &bytes, &indexed)
                } else {
                    (None, Vec::new())
                };
                let (problem, blobs) = match problem {
                    Some(p) => (Some(p), blobs),
                    None => header_matches_index(repo, id, listed[id], per_pack_ref.get(id).copied().unwrap_or(0), &indexed),
                };
                if let Some(p) = problem
                    && let Ok(mut f) = found.lock()
                {
                    f.push((*id, p, blobs));
                }
            });
        }
        // Structure: every snapshot's trees and chunks.
        report.snapshots = snaps.len();
        let roots: Vec<Id> = snaps.iter().filter_map(|(_, s)| s.as_ref().ok().map(|s| s.body.tree)).collect();
        let mut loaded = load_trees(repo, &extra, &lookup, &roots);
        // Each tree is read once; what it uses (its own pack, its files' packs, its subtrees) is
        // remembered so every snapshot can be compared with its own pack list without rereading.
        let mut infos: IdMap<Option<TreeInfo>> = IdMap::default();
        // Tree -> the snapshot (index into `lists`) whose pack list it was found inside.
        let mut verified: IdMap<u32> = IdMap::default();
        let mut lists: Vec<Vec<Id>> = Vec::new();
        let mut superset: HashMap<u32, bool> = HashMap::new();
        for (sid, s) in snaps {
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    damage(e.to_string(), "snapshot unreadable".into(), &[], &mut bad_blobs);
                    continue;
                }
            };
            let listed_packs: IdSet = s.public.packs.iter().copied().collect();
            // A subtree already found inside the pack list of an earlier snapshot is inside this
            // one's too when this list contains that one (consecutive snapshots' lists nearly
            // always do): then it is not walked again, and many snapshots sharing most trees cost
            // little more than one.
            let me = lists.len() as u32;
            let mut covers = |k: u32| -> bool {
                *superset.entry(k).or_insert_with(|| lists[k as usize].iter().all(|p| listed_packs.contains(p)))
            };
            let mut stack = vec![s.body.tree];
            let mut unlisted = 0usize;
            while let Some(t) = stack.pop() {
                match verified.get(&t) {
                    Some(&k) if k == me || covers(k) => continue,
                    _ => {}
                }
                if let std::collections::hash_map::Entry::Vacant(slot) = infos.entry(t) {
                    report.trees += 1;
                    let (info, found) = loaded.remove(&t).unwrap_or_else(|| {
                        let mut found = Vec::new();
                        let info = tree_info(repo, &extra, &t, &lookup, &mut |o, p, b| found.push((o, p, b.to_vec())));
                        (info, found)
                    });
                    for (obj, problem, blobs) in found {
                        // A missing blob shared by many files is one damage, reported once.
                        if blobs.is_empty() || !blobs.iter().all(|b| bad_blobs.contains_key(b)) {
                            damage(obj, problem, &blobs, &mut bad_blobs)
                        }
                    }
                    slot.insert(info);
                }
                if let Some(Some(info)) = infos.get(&t) {
                    let missing = info.packs.iter().filter(|p| !listed_packs.contains(p)).count();
                    unlisted += missing;
                    // Only a fully covered subtree may be skipped later.
                    if missing == 0 {
                        verified.insert(t, me);
                    }
                    stack.extend(info.subtrees.iter().copied());
                }
            }
            superset.clear();
            lists.push(s.public.packs.clone());
            if unlisted > 0 {
                // Not data loss: with duplicate blobs (two backups at once) the index may name a
                // different copy than the one the snapshot listed. Keyless GC relies on this list.
                report.warnings.push(format!(
                    "{}: {unlisted} referenced blob(s) are indexed in packs the snapshot does not list",
                    ObjectName::new(Kind::Snapshot, &sid.to_hex())
                ));
            }
            good_snaps.push((sid, s));
        }
        Ok(())
    })?;
    report.packs_read = packs.iter().filter(|(_, read)| *read).count();
    report.bytes_read = bytes.load(Ordering::Relaxed);
    let mut found = found.into_inner().unwrap_or_default();
    found.sort_by_key(|f| f.0);
    for (id, problem, blobs) in found {
        damage(ObjectName::new(Kind::Pack, &id.to_hex()).to_string(), problem, &blobs, &mut bad_blobs);
    }

    // Attribute damaged blobs to snapshots and paths.
    if !bad_blobs.is_empty() {
        for (sid, s) in &good_snaps {
            let short = sid.short();
            let hit = |i: usize, path: &str, pending: &mut Vec<Damage>| {
                let d = &mut pending[i];
                if !d.snapshots.contains(&short) {
                    d.snapshots.push(short.clone());
                }
                if d.paths.len() < 50 {
                    d.paths.push(format!("{short}:{path}"));
                }
            };
            if let Some(entries) = bad_blobs.get(&s.body.tree) {
                for &i in entries {
                    hit(i, "/", &mut pending_damage);
                }
                continue;
            }
            // A damaged tree stops this walk early; the tree itself is already reported above.
            let _ = for_each_node(repo, &s.body.tree, "/", &mut |p, n| {
                let ids = n.content.iter().chain(n.subtree.iter());
                let hits: BTreeSet<usize> = ids.filter_map(|c| bad_blobs.get(c)).flatten().copied().collect();
                for i in hits {
                    hit(i, p, &mut pending_damage);
                }
                Ok(())
            });
        }
    }
    report.damage = pending_damage;
    Ok(report)
}

/// What one tree uses.
struct TreeInfo {
    subtrees: Vec<Id>,
    packs: Vec<Id>,
}

type Lookup<'a> = dyn Fn(&Id) -> Option<(Id, kura_repo::index::BlobLoc)> + Sync + 'a;

/// A damage found while reading a tree: object, problem, blobs.
type Found = (String, String, Vec<Id>);

/// One tree of a level: its position in the level, what it uses, the damage it showed.
type LoadedTree = (usize, Option<TreeInfo>, Vec<Found>);

/// Reads every tree reachable from `roots` once, level by level, each level on all cores
/// (decoding trees and looking up their chunks is most of a structure check). Damage is
/// collected per tree and replayed by the caller in a fixed order.
fn load_trees(
    repo: &Repository,
    extra: &kura_repo::index::Index,
    lookup: &Lookup<'_>,
    roots: &[Id],
) -> IdMap<(Option<TreeInfo>, Vec<Found>)> {
    let mut done: IdMap<(Option<TreeInfo>, Vec<Found>)> = IdMap::default();
    let mut seen: IdSet = roots.iter().copied().collect();
    let mut frontier: Vec<Id> = seen.iter().copied().collect();
    frontier.sort();
    while !frontier.is_empty() {
        let next = AtomicUsize::new(0);
        let out: Mutex<Vec<LoadedTree>> = Mutex::new(Vec::with_capacity(frontier.len()));
        std::thread::scope(|sc| {
            for _ in 0..crate::cores().min(frontier.len()) {
                sc.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(t) = frontier.get(i) else { break };
                        let mut found = Vec::new();
                        let info = tree_info(repo, extra, t, lookup, &mut |o, p, b| found.push((o, p, b.to_vec())));
                        mine.push((i, info, found));
                    }
                    if let Ok(mut o) = out.lock() {
                        o.extend(mine);
                    }
                });
            }
        });
        let mut level = out.into_inner().unwrap_or_default();
        level.sort_by_key(|(i, _, _)| *i);
        let mut children = Vec::new();
        for (i, info, found) in level {
            if let Some(inf) = &info {
                children.extend(inf.subtrees.iter().copied().filter(|c| seen.insert(*c)));
            }
            done.insert(frontier[i], (info, found));
        }
        children.sort();
        frontier = children;
    }
    done
}

/// Reads a tree and checks that it and every chunk it names are in some pack; reports what is
/// missing through `damage`. `None` when the tree itself is unreadable.
fn tree_info(
    repo: &Repository,
    extra: &kura_repo::index::Index,
    t: &Id,
    lookup: &Lookup<'_>,
    damage: &mut dyn FnMut(String, String, &[Id]),
) -> Option<TreeInfo> {
    let Some((own, _)) = lookup(t) else {
        damage(format!("tree {}", t.short()), "tree blob missing from every pack".into(), &[*t]);
        return None;
    };
    let tree = match repo.read_tree(t).or_else(|e| match e {
        RepoError::BlobMissing(_) => read_tree_via(repo, extra, t),
        e => Err(e),
    }) {
        Ok(tree) => tree,
        Err(e) => {
            damage(e.to_string(), "tree unreadable".into(), &[*t]);
            return None;
        }
    };
    let mut packs = HashSet::from([own]);
    let mut subtrees = Vec::new();
    for n in &tree.nodes {
        for c in &n.content {
            match lookup(c) {
                Some((p, _)) => {
                    packs.insert(p);
                }
                None => damage(format!("blob {}", c.short()), "data blob missing from every pack".into(), &[*c]),
            }
        }
        subtrees.extend(n.subtree);
    }
    Some(TreeInfo { subtrees, packs: packs.into_iter().collect() })
}

fn read_tree_via(repo: &Repository, extra: &kura_repo::index::Index, t: &Id) -> Result<kura_repo::Tree, RepoError> {
    let (pack, loc) = extra.get(t).ok_or(RepoError::BlobMissing(*t))?;
    let sealed = repo.store().get_range(Kind::Pack, &pack.to_hex(), loc.offset as u64, loc.length as u64)?;
    let bytes = repo.decode_blob(t, &pack, loc.compression, loc.raw_length, &sealed)?;
    kura_repo::Tree::decode(&bytes).map_err(|d| RepoError::corrupt(format!("tree {}", t.short()), d))
}

/// The pack's header must decrypt and agree with every index entry that points into the pack
/// (offset, length, encoding), and account for all `indexed_here` of them: an index that
/// disagrees would make restores fail.
fn header_matches_index(
    repo: &Repository,
    id: &Id,
    size: u64,
    indexed_here: usize,
    indexed: &dyn Fn() -> Vec<Id>,
) -> (Option<String>, Vec<Id>) {
    let h = match repo.read_pack_header(id, size) {
        Ok(h) => h,
        Err(e) => return (Some(format!("header: {e}")), indexed()),
    };
    let (mut agree, mut wrong) = (0usize, Vec::new());
    {
        let idx = repo.index();
        for e in &h.entries {
            match idx.get(&e.id) {
                Some((p, loc)) if p == *id => {
                    let same = e.offset == loc.offset
                        && e.length == loc.length
                        && e.raw_length == loc.raw_length
                        && e.kind == loc.kind
                        && e.compression == loc.compression;
                    if same { agree += 1 } else { wrong.push(e.id) }
                }
                _ => {}
            }
        }
    }
    if wrong.is_empty() && agree == indexed_here {
        return (None, Vec::new());
    }
    let named: IdSet = h.entries.iter().map(|e| e.id).collect();
    wrong.extend(indexed().into_iter().filter(|b| !named.contains(b)));
    (
        Some(format!(
            "the index disagrees with this pack's header about {} blob(s); `kura repair index` rebuilds it",
            wrong.len()
        )),
        wrong,
    )
}

/// Read size of the streaming pack hash.
const BLOCK: u64 = 1 << 20;

/// A blob's sealed bytes within a pack read whole; `None` when the header points outside it.
fn blob_bytes<'a>(data: &'a [u8], e: &kura_repo::pack::PackEntry) -> Option<&'a [u8]> {
    let start = e.offset as usize;
    data.get(start..start.checked_add(e.length as usize)?)
}

/// Reads a whole pack: its name must be the hash of its bytes and its header must decrypt and
/// lie inside it; with `deep`, every blob must decrypt and hash to its id. Returns the problem
/// and the blobs it hits.
fn verify_pack(
    repo: &Repository,
    id: &Id,
    size: u64,
    deep: bool,
    bytes_read: &std::sync::atomic::AtomicU64,
    indexed: &dyn Fn() -> Vec<Id>,
) -> (Option<String>, Vec<Id>) {
    if !deep {
        // Hash the pack in blocks (memory stays a block per thread, not a pack); only a pack
        // that fails is read whole, below, to name what it loses.
        let mut h = blake3::Hasher::new();
        let mut off = 0u64;
        while off < size {
            let n = BLOCK.min(size - off);
            match repo.store().get_range(Kind::Pack, &id.to_hex(), off, n) {
                Ok(b) => h.update(&b),
                Err(e) => return (Some(format!("cannot read: {e}")), indexed()),
            };
            off += n;
        }
        bytes_read.fetch_add(size, Ordering::Relaxed);
        if Id(*h.finalize().as_bytes()) == *id {
            return match repo.read_pack_header(id, size) {
                Ok(_) => (None, Vec::new()),
                Err(e) => (Some(format!("header: {e}")), indexed()),
            };
        }
    }
    let data = match repo.store().get(Kind::Pack, &id.to_hex()) {
        Ok(d) => d,
        Err(e) => return (Some(format!("cannot read: {e}")), indexed()),
    };
    if deep {
        bytes_read.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    if Id::of_stored(&data) != *id {
        // Name and bytes disagree: find which blobs still verify, to name exactly what is lost.
        let mut lost = Vec::new();
        if let Ok(h) = read_header(repo.key(), &data) {
            for e in &h.entries {
                if blob_bytes(&data, e).is_none_or(|s| repo.decode_blob(&e.id, id, e.compression, e.raw_length, s).is_err()) {
                    lost.push(e.id);
                }
            }
            return (Some(format!("content does not match its name ({} of {} blobs damaged)", lost.len(), h.entries.len())), lost);
        }
        return (Some("content does not match its name; header unreadable".into()), indexed());
    }
    let h = match read_header(repo.key(), &data) {
        Ok(h) => h,
        Err(e) => return (Some(format!("header: {e}")), indexed()),
    };
    if let Some(e) = h.entries.iter().find(|e| blob_bytes(&data, e).is_none()) {
        return (Some(format!("header names blob {} outside the pack", e.id.short())), indexed());
    }
    if !deep {
        return (None, Vec::new());
    }
    let mut lost = Vec::new();
    for e in &h.entries {
        if blob_bytes(&data, e).is_none_or(|s| repo.decode_blob(&e.id, id, e.compression, e.raw_length, s).is_err()) {
            lost.push(e.id);
        }
    }
    if !lost.is_empty() {
        return (Some(format!("{} blob(s) fail verification", lost.len())), lost);
    }
    (None, Vec::new())
}
