//! Keyless pull: copies chosen snapshots of a repository into a replica of it (same key, same
//! object names), object for object, checking every object against its content-addressed name
//! as it arrives. What a generation server runs with only a read token on its source.

use crate::error::OpsError;
use crate::prune::stored_snapshots;
use crate::retention::Period;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use kura_repo::Id;
use kura_repo::id::{IdMap, IdSet};
use kura_repo::snapshot::{SnapshotPublic, decode_public};
use kura_store::{Kind, ObjectName, Store, StoreError};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use kura_repo::session::Session;
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Which source snapshots a pull takes.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Only these hosts (empty: all).
    pub hosts: Vec<String>,
    /// Only snapshots carrying every one of these tags.
    pub tags: Vec<String>,
    /// Only snapshots whose paths include every one of these.
    pub paths: Vec<String>,
    /// Only the newest snapshot of each period per host and paths (a weekly server's pick).
    pub newest_of: Option<Period>,
    /// The calendar the periods are counted in.
    pub tz: TimeZone,
    /// Snapshots an earlier pull refused (a damaged pack at the source): taken once they can
    /// be, even when the destination has a newer one of their group by then (else one refusal
    /// would lose that generation for good).
    pub retry: HashSet<Id>,
}

impl Default for Selection {
    fn default() -> Self {
        Selection { hosts: Vec::new(), tags: Vec::new(), paths: Vec::new(), newest_of: None, tz: TimeZone::UTC, retry: HashSet::new() }
    }
}

impl Selection {
    /// Whether a snapshot passes the host, tag and path filters.
    pub fn matches(&self, p: &SnapshotPublic) -> bool {
        (self.hosts.is_empty() || self.hosts.contains(&p.host))
            && self.tags.iter().all(|t| p.tags.contains(t))
            && self.paths.iter().all(|x| p.paths.contains(x))
    }
}

/// A source snapshot the pull would not take, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    /// The snapshot's id.
    pub snapshot: String,
    /// Why (damage at the source, a pack whose bytes do not match its name, a pack gone).
    pub reason: String,
}

/// What a pull did.
#[derive(Debug, Default, Serialize)]
pub struct PullReport {
    /// True when the destination was empty and became a replica (config and keys copied).
    pub initialised: bool,
    /// Key files added (a passphrase added at the source opens the replica too).
    pub keys_added: u64,
    /// Snapshots pulled, oldest first.
    pub pulled: Vec<String>,
    /// Selected snapshots the destination has already (live or in its trash).
    pub present: u64,
    /// Selected snapshots older than the newest the destination has of their group: a
    /// generation the destination's retention already let go is not brought back.
    pub older: u64,
    /// Snapshots dated in the future of this pull's clock: never taken (a wrong clock or a
    /// forged date must not stand in for the newest state).
    pub future: Vec<String>,
    /// Snapshots refused, with the reason; the rest of the pull went on.
    pub refused: Vec<Refused>,
    /// Packs fetched from the source.
    pub packs_fetched: u64,
    /// Their bytes (what crossed the wire).
    pub bytes_fetched: u64,
    /// Packs the pulled snapshots use that the destination had before this pull.
    pub packs_present: u64,
    /// Lineage records (where a source prune moved data) added.
    pub lineage_added: u64,
}

/// Writes a pulled snapshot object (name, bytes, and when the source's server received it, if
/// it recorded that); a kura server passes one that records its own receipt first.
pub type PutSnapshot<'a> = &'a (dyn Fn(&str, &[u8], Option<Timestamp>) -> Result<(), StoreError> + Sync);

/// The plain write of a snapshot object (a destination without receipts, or a kura server
/// reached over the wire, which writes its own).
pub fn put_plain(dst: &dyn Store) -> impl Fn(&str, &[u8], Option<Timestamp>) -> Result<(), StoreError> + Sync + '_ {
    move |name, bytes, _| match dst.put_new(Kind::Snapshot, name, bytes) {
        Ok(()) | Err(StoreError::Exists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// How much of an object a copy holds in memory at a time.
const COPY_PIECE: usize = 1 << 20;

/// Copies `kind/name` when the destination lacks it, checking the bytes against the name as
/// they stream through `piece` (one buffer a worker keeps for every object it copies: a whole
/// pack held in memory costs fresh pages and cache misses at every step). Returns the bytes
/// written (0 when it was there), or `Ok(Err(reason))` for bytes that do not match their name;
/// nothing of those is visible in `dst`.
fn copy_object(src: &dyn Store, dst: &dyn Store, kind: Kind, name: &str, piece: &mut Vec<u8>) -> Result<Result<u64, String>, StoreError> {
    if piece.len() < COPY_PIECE {
        piece.resize(COPY_PIECE, 0);
    }
    let mut from = src.reader(kind, name)?;
    let mut to = dst.stage(kind)?;
    let mut hash = blake3::Hasher::new();
    let mut len = 0u64;
    loop {
        let n = from.fill(piece)?;
        if n == 0 {
            break;
        }
        hash.update(&piece[..n]);
        std::io::Write::write_all(&mut to, &piece[..n]).map_err(|e| StoreError::Io {
            verb: kura_store::Verb::Write,
            target: format!("{} in {}", ObjectName::new(kind, name), dst.location()),
            source: e,
        })?;
        len += n as u64;
    }
    if Id(*hash.finalize().as_bytes()).to_hex() != name {
        return Ok(Err(format!("{} from {} does not match its name ({len} bytes); refused", ObjectName::new(kind, name), src.location())));
    }
    match to.commit(name) {
        Ok(()) => Ok(Ok(len)),
        Err(StoreError::Exists(_)) => Ok(Ok(0)),
        Err(e) => Err(e),
    }
}

/// Makes `dst` a replica of `src` when it is empty (keys first, `config` last, as `init`
/// writes them), refuses another repository, and adds keys the source gained.
fn replicate_keys(src: &dyn Store, dst: &dyn Store, report: &mut PullReport) -> Result<(), OpsError> {
    let config = src.get(Kind::Config, "config")?;
    let have = match dst.get(Kind::Config, "config") {
        Ok(c) => Some(c),
        Err(StoreError::NotFound(_)) | Err(StoreError::NoStore(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(c) = &have
        && *c != config
    {
        return Err(OpsError::Invalid(format!(
            "{} is another repository (its config differs from that of {}): a pull fills an empty repository or a replica of its source",
            dst.location(),
            src.location()
        )));
    }
    let present: HashSet<String> = dst.list(Kind::Key)?.into_iter().map(|l| l.name).collect();
    for l in src.list(Kind::Key)? {
        if present.contains(&l.name) {
            continue;
        }
        match copy_object(src, dst, Kind::Key, &l.name, &mut Vec::new())? {
            Ok(_) => report.keys_added += 1,
            Err(reason) => return Err(OpsError::Unsafe(reason)),
        }
    }
    if have.is_none() {
        match dst.put_new(Kind::Config, "config", &config) {
            Ok(()) | Err(StoreError::Exists(_)) => report.initialised = true,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A snapshot to pull.
struct Chosen {
    id: Id,
    public: SnapshotPublic,
    bytes: Vec<u8>,
    /// The newest snapshot time the destination had of this group before the pull.
    floor: Option<Timestamp>,
}

/// A snapshot's group: host and paths, as retention groups by default.
type Group = (String, Vec<String>);

fn group_of(p: &SnapshotPublic) -> Group {
    let mut paths = p.paths.clone();
    paths.sort();
    (p.host.clone(), paths)
}

/// The source snapshots to take: selected, not in the destination, not older than the newest
/// the destination has of their group, not dated after `now`; oldest first, each with that
/// newest time of its group (the floor for its receive time).
fn choose(
    src: &dyn Store,
    dst: &dyn Store,
    sel: &Selection,
    now: Timestamp,
    report: &mut PullReport,
) -> Result<Vec<Chosen>, OpsError> {
    let mut have: HashSet<Id> = HashSet::new();
    let mut newest: HashMap<Group, Timestamp> = HashMap::new();
    for st in stored_snapshots(dst, &|_| false)? {
        have.insert(st.id);
        if let Some((p, _)) = st.bytes.ok().and_then(|b| decode_public(&b).ok())
            && let Ok(t) = p.time.parse::<Timestamp>()
            && t <= now
        {
            let e = newest.entry(group_of(&p)).or_insert(t);
            *e = (*e).max(t);
        }
    }
    let mut candidates = Vec::new();
    for l in src.list(Kind::Snapshot)? {
        let Some(id) = Id::from_hex(&l.name) else { continue };
        if have.contains(&id) {
            report.present += 1;
            continue;
        }
        let bytes = match src.get(Kind::Snapshot, &l.name) {
            Ok(b) => b,
            // Forgotten at the source meanwhile.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let refuse = |reason: String| Refused { snapshot: l.name.clone(), reason };
        if Id::of_stored(&bytes) != id {
            report.refused.push(refuse(format!("{} does not match its name; refused", ObjectName::new(Kind::Snapshot, &l.name))));
            continue;
        }
        let public = match decode_public(&bytes) {
            Ok((p, _)) => p,
            Err(e) => {
                report.refused.push(refuse(format!("not a readable snapshot: {e}")));
                continue;
            }
        };
        let Ok(t) = public.time.parse::<Timestamp>() else {
            report.refused.push(refuse(format!("snapshot time {:?} is not a time", public.time)));
            continue;
        };
        if !sel.matches(&public) {
            continue;
        }
        if t > now {
            report.future.push(l.name.clone());
            continue;
        }
        if newest.get(&group_of(&public)).is_some_and(|n| t < *n) && !sel.retry.contains(&id) {
            report.older += 1;
            continue;
        }
        candidates.push((id, t, public, bytes));
    }
    if let Some(period) = sel.newest_of {
        let items: Vec<(Id, Timestamp, Group)> = candidates.iter().map(|(id, t, p, _)| (*id, *t, group_of(p))).collect();
        let keep: IdSet = crate::copy::newest_of(&items, period, &sel.tz, now).into_iter().collect();
        candidates.retain(|(id, ..)| keep.contains(id));
    }
    candidates.sort_by_key(|(id, t, ..)| (*t, *id));
    Ok(candidates
        .into_iter()
        .map(|(id, _, p, b)| {
            let floor = newest.get(&group_of(&p)).copied();
            Chosen { id, public: p, bytes: b, floor }
        })
        .collect())
}

/// The source packs a snapshot needs that the destination lacks, and those it has. A pack both
/// lack is looked for where the source's prunes moved its data; `Err` names one found nowhere.
fn needed(packs: &[Id], src_packs: &HashMap<Id, u64>, dst_packs: &IdSet, edges: &IdMap<IdSet>) -> Result<(Vec<Id>, Vec<Id>), Id> {
    let (mut need, mut present) = (Vec::new(), Vec::new());
    let mut seen = IdSet::default();
    let mut stack: Vec<Id> = packs.to_vec();
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        if dst_packs.contains(&p) {
            present.push(p);
        } else if src_packs.contains_key(&p) {
            need.push(p);
        } else if let Some(to) = edges.get(&p) {
            stack.extend(to.iter().copied());
        } else {
            return Err(p);
        }
    }
    need.sort();
    Ok((need, present))
}

/// Fetches packs with `workers` requests in flight. A pack whose bytes do not match its name
/// is not kept and the others go on: returns those with the reason. A store failure stops them
/// all.
fn fetch_packs(src: &dyn Store, dst: &dyn Store, packs: &[Id], workers: usize, report: &mut PullReport) -> Result<HashMap<Id, String>, OpsError> {
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (fetched, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let bad: Mutex<HashMap<Id, String>> = Mutex::new(HashMap::new());
    let failure: Mutex<Option<StoreError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, packs.len().max(1)) {
            s.spawn(|| {
                let mut piece = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(p) = packs.get(i) else { break };
                    match copy_object(src, dst, Kind::Pack, &p.to_hex(), &mut piece) {
                        Ok(Ok(n)) => {
                            fetched.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(Err(reason)) => {
                            bad.lock().unwrap_or_else(|e| e.into_inner()).insert(*p, reason);
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    report.packs_fetched += fetched.into_inner();
    report.bytes_fetched += bytes.into_inner();
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e.into()),
        None => Ok(bad.into_inner().unwrap_or_else(|e| e.into_inner())),
    }
}

/// Pulls the snapshots `sel` picks from `src` into `dst` (empty, or a replica of `src`).
/// Every pack a snapshot needs is durable in `dst` before the snapshot is written, so an
/// interrupted pull leaves no snapshot missing data, and the next run fetches only what is
/// still missing. Store failures end the run (`Err`); a source object whose bytes do not match
/// its name refuses its snapshot, which the report lists, and the pull goes on.
///
/// The pull registers a session in both repositories, so neither side's prune deletes a pack
/// it is copying (a source that cannot record one, on read-only media, is read without).
pub fn pull(src: &Arc<dyn Store>, dst: &Arc<dyn Store>, sel: &Selection, now: Timestamp, put: PutSnapshot<'_>) -> Result<PullReport, OpsError> {
    let _reading = Session::register(src.clone(), "pull").ok();
    let mut report = PullReport::default();
    replicate_keys(src.as_ref(), dst.as_ref(), &mut report)?;
    let _writing = Session::register(dst.clone(), "pull")?;
    pull_in_session(src.as_ref(), dst.as_ref(), sel, now, put, report)
}

fn pull_in_session(
    src: &dyn Store,
    dst: &dyn Store,
    sel: &Selection,
    now: Timestamp,
    put: PutSnapshot<'_>,
    mut report: PullReport,
) -> Result<PullReport, OpsError> {
    let chosen = choose(src, dst, sel, now, &mut report)?;
    if chosen.is_empty() {
        return Ok(report);
    }
    // Snapshots are listed before packs and moves: every pack a listed snapshot needs is then
    // either listed or recorded as moved (prune writes lineage before deleting).
    let records = kura_repo::lineage::read_all(src)?;
    if let Some(p) = records.problems.first() {
        return Err(OpsError::Unsafe(format!("{p}; a pull cannot know where the source's prunes moved data")));
    }
    let src_packs: HashMap<Id, u64> = src.list(Kind::Pack)?.iter().filter_map(|l| Some((Id::from_hex(&l.name)?, l.size))).collect();
    let dst_packs: IdSet = dst.list(Kind::Pack)?.iter().filter_map(|l| Id::from_hex(&l.name)).collect();
    let had = dst_packs.clone();
    let mut reused = IdSet::default();
    let dst_lineage: HashSet<String> = dst.list(Kind::Lineage)?.into_iter().map(|l| l.name).collect();
    let mut lineage_done = false;
    let workers = if src.is_remote() { 8 } else { crate::cores() };
    // Every pack the chosen snapshots need is fetched in one go, in their order, before any of
    // them is written: one snapshot at a time left the workers idle at each snapshot's end
    // (an incremental snapshot needs a pack or two).
    let mut planned = dst_packs;
    let mut all_need = Vec::new();
    let plans: Vec<_> = chosen
        .into_iter()
        .map(|c| {
            let n = needed(&c.public.packs, &src_packs, &planned, &records.edges);
            if let Ok((need, _)) = &n {
                planned.extend(need.iter().copied());
                all_need.extend(need.iter().copied());
            }
            (c, n)
        })
        .collect();
    let bad = fetch_packs(src, dst, &all_need, workers, &mut report)?;
    for (Chosen { id, public: _, bytes, floor }, n) in plans {
        let refuse = |reason: String| Refused { snapshot: id.to_hex(), reason };
        let (need, present) = match n {
            Ok(n) => n,
            Err(p) => {
                report.refused.push(refuse(format!("it names pack {} which the source no longer has, with no record of where its data went", p.short())));
                continue;
            }
        };
        // A pack that did not match its name, fetched for this snapshot or an earlier one.
        if let Some(reason) = need.iter().chain(&present).find_map(|p| bad.get(p)) {
            report.refused.push(refuse(reason.clone()));
            continue;
        }
        reused.extend(present.into_iter().filter(|p| had.contains(p)));
        report.packs_present = reused.len() as u64;
        // The destination's prune must know the moves its snapshots rely on before it sees them.
        if !lineage_done {
            for l in records.ids.iter().map(|i| i.to_hex()).filter(|n| !dst_lineage.contains(n)) {
                match copy_object(src, dst, Kind::Lineage, &l, &mut Vec::new())? {
                    Ok(_) => report.lineage_added += 1,
                    Err(reason) => return Err(OpsError::Unsafe(reason)),
                }
            }
            lineage_done = true;
        }
        // Retention on the replica counts generations by when the source's server received
        // them, so a first pull of a year of weeklies is not a year of snapshots "received today".
        let received = match src.get(Kind::Receipt, &id.to_hex()) {
            // Never before what the replica already has of the group: a source server that
            // forged old receive times would otherwise fill the replica's older retention
            // buckets with its snapshots and push the real generations there out. A first
            // fill has no floor and takes the source's times as they are.
            Ok(b) => kura_repo::receipt::Receipt::decode(&b).map(|(_, t)| floor.map_or(t, |f| t.max(f))),
            // A source without receipts (a directory, a bucket); a failure to read one must
            // not fix a wrong time for good.
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        put(&id.to_hex(), &bytes, received)?;
        report.pulled.push(id.to_hex());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Id {
        Id([b; 32])
    }

    #[test]
    fn needed_packs_follow_moves_and_stop_at_what_the_destination_has() {
        let src: HashMap<Id, u64> = [(id(2), 10), (id(4), 10), (id(5), 10)].into_iter().collect();
        let dst: IdSet = [id(1)].into_iter().collect();
        let mut edges = IdMap::default();
        // 3 was repacked into 4 and 5; 1 was repacked into 9, but the destination has 1 itself.
        edges.insert(id(3), [id(4), id(5)].into_iter().collect::<IdSet>());
        edges.insert(id(1), [id(9)].into_iter().collect::<IdSet>());
        assert_eq!(needed(&[id(1), id(2), id(3)], &src, &dst, &edges), Ok((vec![id(2), id(4), id(5)], vec![id(1)])));
        // A pack nobody has and no move explains.
        assert_eq!(needed(&[id(2), id(7)], &src, &dst, &edges), Err(id(7)));
    }

    #[test]
    fn objects_stream_across_in_pieces_and_a_mismatch_leaves_nothing_behind() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (kura_store::LocalStore::create(a.path()).unwrap(), kura_store::LocalStore::create(b.path()).unwrap());
        // Three and a half pieces, so the copy loops and ends on a short one.
        let big: Vec<u8> = (0..COPY_PIECE * 7 / 2).map(|i| (i * 31 % 251) as u8).collect();
        let name = Id::of_stored(&big).to_hex();
        src.put_new(Kind::Pack, &name, &big).unwrap();
        let wrong = Id::of_stored(b"other bytes").to_hex();
        src.put_new(Kind::Pack, &wrong, &big[..1000]).unwrap();
        let mut piece = Vec::new();
        assert_eq!(copy_object(&src, &dst, Kind::Pack, &name, &mut piece).unwrap(), Ok(big.len() as u64));
        assert_eq!(dst.get(Kind::Pack, &name).unwrap(), big);
        // Already there: nothing written.
        assert_eq!(copy_object(&src, &dst, Kind::Pack, &name, &mut piece).unwrap(), Ok(0));
        let refused = copy_object(&src, &dst, Kind::Pack, &wrong, &mut piece).unwrap().unwrap_err();
        assert!(refused.contains("does not match its name (1000 bytes)"), "{refused}");
        assert!(matches!(dst.get(Kind::Pack, &wrong), Err(StoreError::NotFound(_))));
        let leftovers: Vec<_> = walk(b.path()).into_iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".tmp")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // A missing source object is the store's error, not a refusal.
        let missing = Id::of_stored(b"nowhere").to_hex();
        assert!(matches!(copy_object(&src, &dst, Kind::Pack, &missing, &mut piece), Err(StoreError::NotFound(_))));
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn selection_filters_hosts_tags_and_paths() {
        let p = SnapshotPublic {
            time: "2026-01-01T00:00:00Z".into(),
            host: "a".into(),
            paths: vec!["/srv".into(), "/etc".into()],
            tags: vec!["daily".into()],
            packs: vec![],
            original: None,
        };
        let mut s = Selection::default();
        assert!(s.matches(&p));
        s.hosts = vec!["b".into(), "a".into()];
        s.tags = vec!["daily".into()];
        s.paths = vec!["/etc".into()];
        assert!(s.matches(&p));
        s.tags.push("weekly".into());
        assert!(!s.matches(&p));
        s.tags.pop();
        s.hosts = vec!["b".into()];
        assert!(!s.matches(&p));
    }
}
