//! Prune: delete data no snapshot references and repack mostly unused packs, safely while other
//! processes back up and restore. Two phases: *mark* copies what must survive, writes the index
//! of survivors and a plan naming the condemned packs; *sweep* deletes them once every session
//! that might still use them has seen the plan or ended. Either phase can be killed at any point;
//! the next prune finishes the work. The protocol is specified in docs/FORMAT.md §11.

use crate::error::OpsError;
use crate::progress::Progress;
use kura_repo::index::IndexPack;
use kura_repo::pack::{BlobKind, PackEntry};
use kura_repo::lineage::{self, Lineage};
use kura_repo::plan::PrunePlan;
use kura_repo::session::{Liveness, list_sessions};
use kura_repo::id::{IdMap, IdSet};
use kura_repo::{Id, RepoError, Repository};
use kura_store::{Kind, Store, StoreError};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// How much unused space prune may leave in partly used packs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxUnused {
    /// At most this share (0..100) of the repository's size after pruning.
    Percent(f64),
    /// At most this many bytes.
    Bytes(u64),
    /// Never repack for space (only fully unused packs go).
    Unlimited,
}

impl std::str::FromStr for MaxUnused {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(MaxUnused::Unlimited);
        }
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| format!("bad percentage {s:?}"))?;
            if !(0.0..100.0).contains(&v) {
                return Err(format!("--max-unused {s}: a percentage must be at least 0 and below 100"));
            }
            return Ok(MaxUnused::Percent(v));
        }
        parse_size(t).map(MaxUnused::Bytes).ok_or_else(|| format!("bad size {s:?} (examples: 5%, 200M, 2G, unlimited)"))
    }
}

/// Parses `123`, `10k`, `200M`, `2G`, `1T` (powers of 1024; `MiB`, `MB` and `B` suffixes
/// are read the same way).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix("B")).unwrap_or(t);
    let (num, mult) = match t.chars().last()?.to_ascii_lowercase() {
        'k' => (&t[..t.len() - 1], 1u64 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        't' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// What to do.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Only report.
    pub dry_run: bool,
    /// Unused space tolerated in kept packs.
    pub max_unused: MaxUnused,
    /// At most this many bytes of packs are repacked per run.
    pub max_repack: Option<u64>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions { dry_run: false, max_unused: MaxUnused::Percent(5.0), max_repack: None }
    }
}

/// What prune found and did.
#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    /// Snapshots whose data was kept.
    pub snapshots: usize,
    /// Deleted snapshots still in a server's undelete window, whose data was kept.
    pub trashed: usize,
    /// Temporary files of writes killed a day or more ago, removed.
    pub temporaries_removed: u64,
    /// Packs in the repository before.
    pub packs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes of blobs some snapshot uses.
    pub used_bytes: u64,
    /// Bytes of unused or duplicate blobs.
    pub unused_bytes: u64,
    /// Packs deleted whole (nothing in them used).
    pub packs_deleted: usize,
    /// Packs whose used blobs were copied into new packs, then deleted.
    pub packs_repacked: usize,
    /// Bytes of used blobs copied.
    pub bytes_copied: u64,
    /// Bytes freed once the plan is swept.
    pub bytes_freed: u64,
    /// Unused bytes left in kept packs.
    pub unused_left: u64,
    /// Unreferenced packs whose header cannot be read: left alone.
    pub unreadable_packs: Vec<String>,
    /// Plans (earlier ones and this run's) that were executed.
    pub plans_swept: usize,
    /// Plans that wait for sessions that started before them.
    pub plans_deferred: Vec<Deferred>,
    /// Condemned packs kept because a snapshot made during the prune uses them.
    pub packs_resurrected: usize,
    /// Dead sessions whose objects were removed.
    pub sessions_cleaned: usize,
    /// Unused objects an S3 Object Lock keeps: left alone, for a run after their date.
    pub locked: Vec<Locked>,
    /// Object Lock upkeep, on a store that locks objects.
    pub lock: Option<kura_store::LockUpkeep>,
    /// Why the Object Lock upkeep failed (the prune itself succeeded).
    pub lock_error: Option<String>,
    /// True for --dry-run.
    pub dry_run: bool,
}

/// An object a prune left because the store keeps it locked.
#[derive(Debug, Clone, Serialize)]
pub struct Locked {
    /// The object (`data/ab/abcd...`).
    pub object: String,
    /// When its retention ends (UTC).
    pub until: String,
}

impl Locked {
    /// The record of a [`StoreError::Locked`], `None` for any other error.
    pub fn from_error(e: &StoreError) -> Option<Locked> {
        match e {
            StoreError::Locked { name, until } => Some(Locked::new(name, *until)),
            _ => None,
        }
    }

    /// The record of an object locked until `until`.
    pub fn new(name: &kura_store::ObjectName, until: std::time::SystemTime) -> Locked {
        Locked { object: name.to_string(), until: kura_store::fmt_time(until) }
    }
}

/// A plan that could not be swept yet.
#[derive(Debug, Serialize)]
pub struct Deferred {
    /// The plan.
    pub plan: String,
    /// Sessions that started before it and still run ("backup on host pid 12 since ...").
    pub waiting_for: Vec<String>,
}

/// Commands that rewrite the index or delete data; they exclude each other (two concurrent
/// repacks could each delete the copy the other kept).
const EXCLUSIVE: [&str; 2] = ["prune", "repair"];

/// Refuses to run beside another live prune or repair. Dead ones are ignored; both sides
/// registered their session first, so two racing processes see each other and at worst both
/// give up.
pub(crate) fn ensure_alone(repo: &Repository, what: &str) -> Result<(), OpsError> {
    ensure_alone_in(repo.store().as_ref(), repo.session_id().as_deref(), what)
}

/// [`ensure_alone`] for a process that has only the store (a keyless server), as session `me`.
pub(crate) fn ensure_alone_in(store: &dyn Store, me: Option<&str>, what: &str) -> Result<(), OpsError> {
    let now = jiff::Timestamp::now();
    for (id, info) in list_sessions(store)? {
        if Some(id.as_str()) == me {
            continue;
        }
        if EXCLUSIVE.contains(&info.command.as_str()) && info.liveness(now) == Liveness::Live {
            return Err(OpsError::Busy(format!(
                "cannot {what} now: a {} is running (host {}, pid {}, since {}); it finishes by itself, try again later",
                info.command, info.host, info.pid, info.started
            )));
        }
    }
    Ok(())
}

/// Removes the objects of sessions whose process is dead; returns how many.
pub(crate) fn reap_sessions(store: &dyn Store) -> Result<usize, OpsError> {
    let now = jiff::Timestamp::now();
    let mut n = 0;
    for (id, info) in list_sessions(store)? {
        if info.liveness(now) == Liveness::Dead && store.delete(Kind::Session, &id).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// The live sessions other than `me` that have not seen plan `plan_hex` (a plan may be swept
/// only when this is empty); removes dead sessions' objects on the way, counting them.
pub(crate) fn unaware_sessions(store: &dyn Store, me: Option<&str>, plan_hex: &str, cleaned: &mut usize) -> Result<Vec<String>, OpsError> {
    let now = jiff::Timestamp::now();
    let mut waiting = Vec::new();
    for (id, info) in list_sessions(store)? {
        if Some(id.as_str()) == me {
            continue;
        }
        if info.liveness(now) == Liveness::Dead {
            if store.delete(Kind::Session, &id).is_ok() {
                *cleaned += 1;
            }
        } else if !info.plans_seen.iter().any(|p| p == plan_hex) {
            waiting.push(format!("{} on {} (pid {}) since {}", info.command, info.host, info.pid, info.started));
        }
    }
    Ok(waiting)
}

/// A stored snapshot: a live one or one in a kura server's trash, with its object's bytes (or
/// why they cannot be had).
pub(crate) struct Stored {
    pub id: Id,
    pub trashed: bool,
    pub bytes: Result<Vec<u8>, String>,
}

/// Every snapshot and trashed snapshot, listing snapshots, the trash, then snapshots again: a
/// snapshot moving into the trash (record written first) or out of it (snapshot written first)
/// meanwhile is seen at least once. Snapshots `skip` names are not read (a sweep needs only
/// the ones made since its plan).
pub(crate) fn stored_snapshots(store: &dyn Store, skip: &dyn Fn(&Id) -> bool) -> Result<Vec<Stored>, OpsError> {
    let mut out: Vec<Stored> = Vec::new();
    let mut seen = HashSet::new();
    for kind in [Kind::Snapshot, Kind::Trash, Kind::Snapshot] {
        for l in store.list(kind)? {
            let Some(id) = Id::from_hex(&l.name) else { continue };
            if skip(&id) || !seen.insert(id) {
                continue;
            }
            let bytes = match store.get(kind, &l.name) {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => {
                    // Moved meanwhile: the next listing finds it.
                    seen.remove(&id);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let obj = kura_store::ObjectName::new(kind, &l.name);
            let bytes = if kind == Kind::Trash {
                kura_repo::trash::TrashRecord::decode(&id, &bytes).map(|(_, snap)| snap).map_err(|e| format!("{obj}: {e}"))
            } else if Id::of_stored(&bytes) == id {
                Ok(bytes)
            } else {
                Err(format!("{obj}: content does not match its name"))
            };
            out.push(Stored { id, trashed: kind == Kind::Trash, bytes });
        }
    }
    Ok(out)
}

/// Runs prune. The caller opened the repository and started a session; prune loads the index.
pub fn prune(repo: &Repository, opts: &PruneOptions, progress: &dyn Progress) -> Result<PruneReport, OpsError> {
    let mut report = prune_unlocked(repo, opts, progress)?;
    if !opts.dry_run {
        // The prune is done: a failed upkeep is reported, not made the prune's failure.
        match crate::lock::upkeep(repo.store().as_ref()) {
            Ok(u) => report.lock = u,
            Err(e) => report.lock_error = Some(e.to_string()),
        }
    }
    Ok(report)
}

/// The prune itself; [`prune`] adds the Object Lock upkeep.
fn prune_unlocked(repo: &Repository, opts: &PruneOptions, progress: &dyn Progress) -> Result<PruneReport, OpsError> {
    if repo.session_id().is_none() && !opts.dry_run {
        return Err(OpsError::Invalid("prune needs a session (Repository::start_session)".into()));
    }
    ensure_alone(repo, "prune")?;
    let mut report = PruneReport { dry_run: opts.dry_run, ..PruneReport::default() };
    if !opts.dry_run {
        report.sessions_cleaned = reap_sessions(repo.store().as_ref())?;
        // Half-written objects of killed processes: a day old, no write is still making them.
        (report.temporaries_removed, _) = repo.store().remove_stale_temporaries(std::time::Duration::from_secs(86_400))?;
    }
    for p in repo.load_index()? {
        progress.warn(&p.to_string());
    }
    // Finish earlier prunes first: their packs then no longer count.
    if !opts.dry_run {
        for (id, plan) in repo.plans() {
            sweep(repo, &id, &plan, &mut report, progress)?;
        }
    }
    let pending: HashSet<Id> = if opts.dry_run {
        repo.plans().iter().flat_map(|(_, p)| p.condemned.iter().copied()).collect()
    } else {
        repo.read_plans()?.0.iter().flat_map(|(_, p)| p.condemned.iter().copied()).collect()
    };

    // Snapshots before packs: every pack a listed snapshot needs is then listed too.
    let mut snapshots = repo.snapshots()?;
    // A snapshot forgotten while being listed is simply gone.
    snapshots.retain(|(_, s)| !matches!(s, Err(RepoError::Store(StoreError::NotFound(_)))));
    let mut known = Vec::new();
    for (id, s) in &snapshots {
        if let Err(e) = s {
            return Err(OpsError::Unsafe(format!(
                "snapshot {} is unreadable ({e}), so prune cannot know which data it uses; \
                 run `kura check`, then `kura repair snapshots` or forget it",
                id.short()
            )));
        }
        known.push(*id);
    }
    report.snapshots = known.len();
    // Snapshots in a kura server's trash keep their data until the server expires them at the
    // end of the undelete window; an unreadable one (forged by a backup token) keeps nothing.
    for (id, t) in repo.trashed()? {
        match t {
            Ok((_, snap, _)) => {
                snapshots.push((id, Ok(snap)));
                known.push(id);
                report.trashed += 1;
            }
            Err(e) => progress.warn(&format!("{e}; no data is kept for it")),
        }
    }
    // Trees of snapshots made since the index was loaded may sit in packs it does not cover;
    // unreadable headers are reported below.
    repo.index_orphan_packs(false)?;
    let index_files: Vec<Id> = repo.store().list(Kind::Index)?.iter().filter_map(|l| Id::from_hex(&l.name)).collect();
    let on_disk: HashMap<Id, u64> =
        repo.store().list(Kind::Pack)?.iter().filter_map(|l| Some((Id::from_hex(&l.name)?, l.size))).collect();

    // Every pack's entries, from the index files and from headers of packs none covers.
    let mut contents: HashMap<Id, Vec<PackEntry>> = HashMap::new();
    for f in &index_files {
        match repo.read_index_file(f) {
            Ok(file) => {
                for p in file.packs {
                    contents.entry(p.id).or_insert(p.blobs);
                }
            }
            Err(RepoError::Store(StoreError::NotFound(_))) => {}
            Err(e) => progress.warn(&format!("{e}; its packs are read from their headers")),
        }
    }
    for (id, size) in &on_disk {
        if !contents.contains_key(id) {
            match repo.read_pack_header(id, *size) {
                Ok(h) => {
                    contents.insert(*id, h.entries);
                }
                Err(e) => report.unreadable_packs.push(e.to_string()),
            }
        }
    }
    // Index entries of packs that no longer exist are dropped with the obsolete index files.
    contents.retain(|id, _| on_disk.contains_key(id));
    report.packs = contents.len();
    report.bytes = contents.keys().map(|id| on_disk[id]).sum();

    let used = used_blobs(repo, &snapshots, progress)?;

    // Choose one copy of every used blob: in a live pack if possible, then the pack with the
    // most used bytes (it is the least likely to be repacked).
    // One map serves as the used set and, per used blob, the position (in `order`) of the pack
    // whose copy is kept: the largest structure of a prune, kept to 4 bytes beside each id.
    const NONE: u32 = u32::MAX;
    let mut order: Vec<Id> = contents.keys().copied().collect();
    order.sort();
    let pos: HashMap<Id, u32> = order.iter().enumerate().map(|(i, p)| (*p, i as u32)).collect();
    let mut chosen: IdMap<u32> = used.into_iter().map(|b| (b, NONE)).collect();
    let pack_used_all: Vec<u64> = order
        .iter()
        .map(|pid| contents[pid].iter().filter(|e| chosen.contains_key(&e.id)).map(|e| u64::from(e.length)).sum())
        .collect();
    let rank = |i: u32| (!pending.contains(&order[i as usize]), pack_used_all[i as usize], order[i as usize]);
    for (i, pid) in order.iter().enumerate() {
        let i = i as u32;
        for e in &contents[pid] {
            if let Some(cur) = chosen.get_mut(&e.id)
                && (*cur == NONE || rank(i) > rank(*cur))
            {
                *cur = i;
            }
        }
    }
    let missing = chosen.values().filter(|c| **c == NONE).count();
    if missing > 0 {
        return Err(OpsError::Unsafe(format!(
            "{missing} blob(s) used by snapshots are in no pack; prune would make nothing worse but refuses to \
             run on a damaged repository: run `kura check` and `kura repair snapshots`"
        )));
    }

    struct PackUse {
        id: Id,
        kind: BlobKind,
        used: u64,
        unused: u64,
    }
    let mut uses = Vec::new();
    for (pid, entries) in &contents {
        let (mut u, mut n) = (0u64, 0u64);
        let me = pos[pid];
        for e in entries {
            if chosen.get(&e.id) == Some(&me) {
                u += u64::from(e.length);
            } else {
                n += u64::from(e.length);
            }
        }
        // Bytes no index entry accounts for beyond a generous header estimate are unused too:
        // blobs `repair index --read-data` dropped as damaged. Repacking such a pack is how
        // damaged data finally leaves the repository.
        let described: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
        let header_max = 4096 + 128 * entries.len() as u64;
        n += on_disk[pid].saturating_sub(described).saturating_sub(header_max);
        let kind = entries.first().map(|e| e.kind).unwrap_or(BlobKind::Data);
        uses.push(PackUse { id: *pid, kind, used: u, unused: n });
    }
    report.used_bytes = uses.iter().map(|p| p.used).sum();
    report.unused_bytes = uses.iter().map(|p| p.unused).sum();

    let mut delete = Vec::new();
    let mut repack = Vec::new();
    let mut candidates = Vec::new();
    for p in &uses {
        if p.used == 0 {
            // Already condemned by a plan that waits: it goes with that plan.
            if !pending.contains(&p.id) {
                delete.push(p.id);
            }
        } else if p.unused > 0 && (pending.contains(&p.id) || p.kind == BlobKind::Tree) {
            // Trees are small and read by every command: keep their packs dense. Packs an
            // unfinished plan condemns must give up their used blobs anyway.
            repack.push(p.id);
        } else if pending.contains(&p.id) {
            repack.push(p.id);
        } else if p.unused > 0 {
            candidates.push(p);
        }
    }
    let mut unused_left: u64 = candidates.iter().map(|p| p.unused).sum();
    let limit = |used: u64| -> u64 {
        match opts.max_unused {
            MaxUnused::Unlimited => u64::MAX,
            MaxUnused::Bytes(b) => b,
            MaxUnused::Percent(pc) => (used as f64 * pc / (100.0 - pc)) as u64,
        }
    };
    // Most wasteful first (by unused share), until what is left is within the limit.
    candidates.sort_by(|a, b| {
        let ra = a.unused as f64 / (a.used + a.unused) as f64;
        let rb = b.unused as f64 / (b.used + b.unused) as f64;
        rb.total_cmp(&ra).then(a.id.cmp(&b.id))
    });
    let mut repack_bytes: u64 = repack.iter().map(|id| on_disk[id]).sum();
    for c in candidates {
        if unused_left <= limit(report.used_bytes) {
            break;
        }
        if opts.max_repack.is_some_and(|m| repack_bytes + on_disk[&c.id] > m) {
            continue;
        }
        repack.push(c.id);
        repack_bytes += on_disk[&c.id];
        unused_left -= c.unused;
    }
    // Packs an Object Lock still keeps cannot go yet: planning them would only rewrite the
    // index on every run (each version of it locked in turn). A prune after their date does.
    if repo.store().lock_period().is_some() {
        let keep = |ids: &mut Vec<Id>, report: &mut PruneReport| -> Result<(), OpsError> {
            let mut left = Vec::new();
            for id in ids.drain(..) {
                match repo.store().locked_until(Kind::Pack, &id.to_hex())? {
                    Some(until) if !pending.contains(&id) => report.locked.push(Locked::new(&kura_store::ObjectName::new(Kind::Pack, &id.to_hex()), until)),
                    _ => left.push(id),
                }
            }
            *ids = left;
            Ok(())
        };
        keep(&mut delete, &mut report)?;
        keep(&mut repack, &mut report)?;
    }
    report.unused_left = unused_left;
    report.packs_deleted = delete.len();
    report.packs_repacked = repack.len();
    let repacked: HashSet<Id> = repack.iter().copied().collect();
    report.bytes_copied = uses.iter().filter(|p| repacked.contains(&p.id)).map(|p| p.used).sum();
    report.bytes_freed =
        delete.iter().chain(&repack).map(|id| on_disk[id]).sum::<u64>().saturating_sub(report.bytes_copied);
    if opts.dry_run || (delete.is_empty() && repack.is_empty()) {
        return Ok(report);
    }

    // A pack deleted whole must really hold what the index says: with misnamed or swapped pack
    // files the index would condemn the only copy of used data.
    for pid in &delete {
        let h = repo.read_pack_header(pid, on_disk[pid]).map_err(|e| {
            OpsError::Unsafe(format!("{e}; prune will not delete a pack it cannot verify: run `kura check`"))
        })?;
        // Every blob the index places here must be in the header (the header may name more:
        // blobs `repair index --read-data` left out as damaged).
        let ids: HashSet<Id> = h.entries.iter().map(|e| e.id).collect();
        if !contents[pid].iter().all(|e| ids.contains(&e.id)) {
            return Err(OpsError::Unsafe(format!(
                "pack {} does not hold what the index says; run `kura check` and `kura repair index` first",
                pid.short()
            )));
        }
    }

    // Mark, step 1: copy used blobs out of the packs to repack, verifying each. Blob by blob:
    // a whole pack in memory would be the largest allocation of the run.
    progress.add_total(repack.len() as u64, repack_bytes);
    for pid in &repack {
        let me = pos[pid];
        for e in &contents[pid] {
            if chosen.get(&e.id) != Some(&me) {
                continue;
            }
            let sealed = match repo.store().get_range(Kind::Pack, &pid.to_hex(), u64::from(e.offset), u64::from(e.length)) {
                Ok(b) => b,
                Err(StoreError::Short { .. }) => {
                    return Err(OpsError::Unsafe(format!(
                        "pack {} is shorter than its header says; run `kura check --read-data`",
                        pid.short()
                    )));
                }
                Err(err) => return Err(err.into()),
            };
            let sealed = &sealed[..];
            repo.decode_blob(&e.id, pid, e.compression, e.raw_length, sealed).map_err(|err| {
                OpsError::Unsafe(format!("{err}: prune will not copy damaged data; run `kura check --read-data` and `kura repair`"))
            })?;
            repo.copy_sealed(e.kind, e.id, e.compression, sealed, e.raw_length)?;
        }
        progress.advance(1, on_disk[pid]);
    }
    repo.flush()?;

    // Mark, step 2: the index of every surviving pack, so the old index files can go.
    let doomed: HashSet<Id> = delete.iter().chain(&repack).copied().collect();
    // Packs an unfinished plan condemns go with that plan: not indexed again.
    let mut survivors: Vec<IndexPack> = contents
        .iter()
        .filter(|(id, _)| !doomed.contains(id) && !pending.contains(id))
        .map(|(id, blobs)| IndexPack { id: *id, blobs: blobs.clone() })
        .collect();
    survivors.sort_by_key(|p| p.id);
    for chunk in survivors.chunks(256) {
        repo.write_index_file(chunk.to_vec())?;
    }

    // Mark, step 3: lineage. Snapshots' public pack lists still name the packs condemned
    // here; a keyless server follows these moves to where their used blobs are kept.
    write_lineage(repo, &snapshots, &contents, &on_disk, &doomed, &repacked, &|b| chosen.get(b).map(|&k| order[k as usize]), progress)?;

    // Mark, step 4: the plan. From here on, new sessions avoid the condemned packs.
    let mut condemned: Vec<Id> = doomed.into_iter().collect();
    condemned.sort();
    let plan = PrunePlan {
        version: 1,
        created: jiff::Timestamp::now().as_second(),
        snapshots: known,
        condemned,
        obsolete_indexes: index_files,
        keyless: false,
    };
    let bytes = plan.encode(repo.key()).ok_or_else(|| OpsError::Invalid("cannot encode the prune plan".into()))?;
    let plan_id = Id::of_stored(&bytes);
    match repo.store().put_new(Kind::Plan, &plan_id.to_hex(), &bytes) {
        Ok(()) | Err(StoreError::Exists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    sweep(repo, &plan_id, &plan, &mut report, progress)?;
    Ok(report)
}

/// Records where the used blobs of every condemned pack are kept (their new packs, for repacked
/// ones), merged with the earlier records still reachable from some snapshot's public list, in
/// one lineage object that replaces the earlier ones.
#[allow(clippy::too_many_arguments)]
fn write_lineage(
    repo: &Repository,
    snapshots: &[(Id, Result<kura_repo::Snapshot, RepoError>)],
    contents: &HashMap<Id, Vec<PackEntry>>,
    on_disk: &HashMap<Id, u64>,
    doomed: &HashSet<Id>,
    repacked: &HashSet<Id>,
    kept_in: &dyn Fn(&Id) -> Option<Id>,
    progress: &dyn Progress,
) -> Result<(), OpsError> {
    // Where the copies made above landed: the packs that appeared since the listing (a
    // concurrent backup's too, which is only more conservative).
    let mut moved: IdMap<Vec<Id>> = IdMap::default();
    if !repacked.is_empty() {
        for l in repo.store().list(Kind::Pack)? {
            let Some(id) = Id::from_hex(&l.name) else { continue };
            if on_disk.contains_key(&id) {
                continue;
            }
            // Another client's upload may be garbage; this prune's own packs are readable.
            let Ok(h) = repo.read_pack_header(&id, l.size) else { continue };
            for e in h.entries {
                moved.entry(e.id).or_default().push(id);
            }
        }
    }
    let lineage::Records { ids: mut old, mut edges, problems } = lineage::read_all(repo.store().as_ref())?;
    for p in problems {
        progress.warn(&format!("{p}; it is left in place, and a server's prune refuses to run until it is readable"));
    }
    for pid in doomed {
        for e in &contents[pid] {
            let Some(k) = kept_in(&e.id) else { continue };
            let targets = if repacked.contains(&k) {
                moved.get(&e.id).cloned().ok_or_else(|| OpsError::Unsafe(format!("a blob copied out of pack {} is in no new pack", pid.short())))?
            } else {
                vec![k]
            };
            edges.entry(*pid).or_default().extend(targets.into_iter().filter(|t| t != pid));
        }
    }
    // Roots: the snapshots this prune walked, and every public list stored now (a snapshot
    // undeleted while prune listed, a trashed one whose body is unreadable).
    let mut roots: HashSet<Id> = snapshots.iter().filter_map(|(_, s)| s.as_ref().ok()).flat_map(|s| s.public.packs.iter().copied()).collect();
    let walked: HashSet<Id> = snapshots.iter().filter(|(_, s)| s.is_ok()).map(|(id, _)| *id).collect();
    for st in stored_snapshots(repo.store().as_ref(), &|id| walked.contains(id))? {
        if let Some((public, _)) = st.bytes.ok().and_then(|b| kura_repo::snapshot::decode_public(&b).ok()) {
            roots.extend(public.packs);
        }
    }
    // A condemned pack some public list names gets an edge even when none of its blobs is
    // used (it goes with nothing of use): a keyless server then knows it was deleted on purpose.
    for pid in doomed {
        if roots.contains(pid) {
            edges.entry(*pid).or_default();
        }
    }
    let edges = lineage::reachable_edges(roots, &edges);
    if !edges.is_empty() {
        let bytes = Lineage::new(&edges).encode();
        let id = Id::of_stored(&bytes);
        match repo.store().put_new(Kind::Lineage, &id.to_hex(), &bytes) {
            Ok(()) | Err(StoreError::Exists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        old.retain(|o| *o != id);
    }
    // The new record holds every move that still matters: the earlier ones can go.
    for o in old {
        match repo.store().delete(Kind::Lineage, &o.to_hex()) {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Every blob (trees and data) the snapshots reference. Each tree is read once.
fn used_blobs(
    repo: &Repository,
    snapshots: &[(Id, Result<kura_repo::Snapshot, RepoError>)],
    progress: &dyn Progress,
) -> Result<IdSet, OpsError> {
    let mut used = IdSet::default();
    let mut stack: Vec<Id> = snapshots.iter().filter_map(|(_, s)| s.as_ref().ok().map(|s| s.body.tree)).collect();
    while let Some(t) = stack.pop() {
        if !used.insert(t) {
            continue;
        }
        let tree = repo.read_tree(&t).map_err(|e| {
            OpsError::Unsafe(format!("{e}; prune cannot know what the snapshots use: run `kura check`"))
        })?;
        progress.advance(0, 0);
        for n in &tree.nodes {
            used.extend(n.content.iter().copied());
            stack.extend(n.subtree);
        }
    }
    Ok(used)
}

/// Executes a plan if no live session can still be using its packs; otherwise records why not.
fn sweep(
    repo: &Repository,
    plan_id: &Id,
    plan: &PrunePlan,
    report: &mut PruneReport,
    progress: &dyn Progress,
) -> Result<(), OpsError> {
    let hex = plan_id.to_hex();
    let waiting = unaware_sessions(repo.store().as_ref(), repo.session_id().as_deref(), &hex, &mut report.sessions_cleaned)?;
    if !waiting.is_empty() {
        report.plans_deferred.push(Deferred { plan: hex, waiting_for: waiting });
        return Ok(());
    }

    // Snapshots made since the plan may use condemned packs (a backup that loaded the index
    // before the plan existed): those packs stay.
    let condemned: HashSet<Id> = plan.condemned.iter().copied().collect();
    let known: HashSet<Id> = plan.snapshots.iter().copied().collect();
    let mut keep: HashSet<Id> = HashSet::new();
    let mut wanted: HashSet<Id> = HashSet::new();
    let mut roots = Vec::new();
    for st in stored_snapshots(repo.store().as_ref(), &|id| known.contains(id))? {
        let id = st.id;
        let public = st.bytes.as_ref().ok().and_then(|b| kura_repo::snapshot::decode_public(b).ok());
        let Some((public, _)) = public else {
            if st.trashed {
                // As in the main pass: an unreadable trashed snapshot keeps nothing.
                progress.warn(&format!("trashed snapshot {} is unreadable; no data is kept for it", id.short()));
                continue;
            }
            progress.warn(&format!("new snapshot {} is unreadable; plan {} waits", id.short(), plan_id.short()));
            report.plans_deferred.push(Deferred { plan: hex, waiting_for: vec![format!("unreadable snapshot {id}")] });
            return Ok(());
        };
        keep.extend(public.packs.iter().filter(|p| condemned.contains(p)));
        match st.bytes.as_ref().map_err(|e| e.clone()).and_then(|b| kura_repo::Snapshot::decode(repo.key(), b).map_err(|e| e.to_string())) {
            Ok(s) => roots.push(s.body.tree),
            Err(e) if st.trashed => progress.warn(&format!("trashed snapshot {}: {e}; only the packs it lists are kept", id.short())),
            Err(e) => {
                progress.warn(&format!("snapshot {}: {e}; plan {} waits", id.short(), plan_id.short()));
                report.plans_deferred.push(Deferred { plan: hex, waiting_for: vec![format!("unreadable snapshot {id}")] });
                return Ok(());
            }
        }
    }
    if !roots.is_empty() {
        // Their trees may sit in packs written after this process loaded the index.
        repo.index_orphan_packs(false)?;
        let mut seen = HashSet::new();
        while let Some(t) = roots.pop() {
            if !seen.insert(t) {
                continue;
            }
            wanted.insert(t);
            match repo.read_tree(&t) {
                Ok(tree) => {
                    for n in &tree.nodes {
                        wanted.extend(n.content.iter().copied());
                        roots.extend(n.subtree);
                    }
                }
                Err(e) => {
                    progress.warn(&format!("{e}; plan {} waits", plan_id.short()));
                    report.plans_deferred.push(Deferred { plan: hex, waiting_for: vec![format!("unreadable tree {t}")] });
                    return Ok(());
                }
            }
        }
    }
    let sizes: HashMap<Id, u64> =
        repo.store().list(Kind::Pack)?.iter().filter_map(|l| Some((Id::from_hex(&l.name)?, l.size))).collect();
    let mut resurrected = Vec::new();
    for p in &plan.condemned {
        let Some(&size) = sizes.get(p) else { continue };
        let header = repo.read_pack_header(p, size).ok();
        let needed = keep.contains(p)
            || (!wanted.is_empty() && header.as_ref().is_none_or(|h| h.entries.iter().any(|e| wanted.contains(&e.id))));
        if needed {
            let Some(h) = header else {
                // Kept but not indexable again: its old index files must stay, so the plan waits
                // (check names the pack).
                report.plans_deferred.push(Deferred {
                    plan: hex,
                    waiting_for: vec![format!("pack {} is needed but its header is unreadable", p.short())],
                });
                return Ok(());
            };
            keep.insert(*p);
            resurrected.push(IndexPack { id: *p, blobs: h.entries });
        }
    }
    // Resurrected packs lose their old index files below: index them anew first.
    if !resurrected.is_empty() {
        report.packs_resurrected += resurrected.len();
        repo.write_index_file(resurrected)?;
    }
    let mut deleted = HashSet::new();
    for p in &plan.condemned {
        if keep.contains(p) {
            continue;
        }
        match repo.store().delete(Kind::Pack, &p.to_hex()) {
            Ok(()) | Err(StoreError::NotFound(_)) => {
                deleted.insert(*p);
            }
            // Still locked: it stays, unindexed; a prune after its date deletes it.
            Err(e) => report.locked.push(Locked::from_error(&e).ok_or(e)?),
        }
    }
    let obsolete: HashSet<Id> = plan.obsolete_indexes.iter().copied().collect();
    for i in &plan.obsolete_indexes {
        match repo.store().delete(Kind::Index, &i.to_hex()) {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Index files written since the plan (by sessions that began before it) may name packs
    // that are now gone: rewrite them without those packs.
    for l in repo.store().list(Kind::Index)? {
        let Some(id) = Id::from_hex(&l.name) else { continue };
        if obsolete.contains(&id) {
            continue;
        }
        let file = match repo.read_index_file(&id) {
            Ok(f) => f,
            // Gone, or damaged (check reports it; its packs are indexed from their headers).
            Err(RepoError::Store(StoreError::NotFound(_)) | RepoError::Corrupt { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if file.packs.iter().any(|p| deleted.contains(&p.id)) {
            let rest: Vec<IndexPack> = file.packs.into_iter().filter(|p| !deleted.contains(&p.id)).collect();
            if !rest.is_empty() {
                repo.write_index_file(rest)?;
            }
            match repo.store().delete(Kind::Index, &id.to_hex()) {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    match repo.store().delete(Kind::Plan, &hex) {
        Ok(()) | Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    report.plans_swept += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("10k"), Some(10 << 10));
        assert_eq!(parse_size("256MiB"), Some(256 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("7B"), Some(7));
        for bad in ["", "MiB", "lots", "-1k", "1.5G"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
