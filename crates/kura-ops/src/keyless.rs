//! Keyless prune, for a kura server without the repository key: deletes whole packs that no
//! snapshot's public pack list reaches (following the repack lineage of admin prunes), with the
//! same plan-and-sessions protocol as [`crate::prune`]. Specified in docs/FORMAT.md §11.

use crate::error::OpsError;
use crate::prune::{Deferred, ensure_alone_in, reap_sessions, stored_snapshots, unaware_sessions};
use kura_repo::id::{IdMap, IdSet};
use kura_repo::lineage;
use kura_repo::plan::{PLAN_MAGIC, PrunePlan};
use kura_repo::snapshot::decode_public;
use kura_repo::Id;
use kura_store::{Kind, ObjectName, Store, StoreError};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// What a keyless prune found and did.
#[derive(Debug, Default, Serialize)]
pub struct KeylessReport {
    /// Snapshots whose packs were kept.
    pub snapshots: usize,
    /// Deleted snapshots still in the undelete window, whose packs were kept.
    pub trashed: usize,
    /// Packs in the repository before.
    pub packs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Packs this run condemned (no snapshot reaches them).
    pub packs_condemned: usize,
    /// Packs deleted (by this run's plan or earlier ones it finished).
    pub packs_deleted: usize,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Condemned packs kept because a snapshot made since their plan uses them.
    pub packs_resurrected: usize,
    /// Plans executed.
    pub plans_swept: usize,
    /// Earlier executed plans merged into this run's (their packs are gone; the plan that
    /// records it stays until an admin prune rewrites the index).
    pub plans_merged: usize,
    /// Plans that wait for sessions that started before them.
    pub plans_deferred: Vec<Deferred>,
    /// Dead sessions whose objects were removed.
    pub sessions_cleaned: usize,
    /// Unused packs an S3 Object Lock keeps: left alone, for a run after their date.
    pub locked: Vec<crate::prune::Locked>,
    /// Object Lock upkeep, on a store that locks objects.
    pub lock: Option<kura_store::LockUpkeep>,
    /// Why the Object Lock upkeep failed (the prune itself succeeded).
    pub lock_error: Option<String>,
    /// Temporary files of writes killed a day or more ago, removed.
    pub temporaries_removed: u64,
    /// Set when an admin prune's plan (sealed with the key) is pending: nothing was done.
    pub waiting_for_admin: Option<String>,
    /// Trash records that could not be read (they keep nothing).
    pub warnings: Vec<String>,
}

/// Public pack lists of every snapshot and trashed snapshot. A snapshot whose public part cannot
/// be read stops the run (the server checked it on upload: this is damage); an unreadable trash
/// record keeps nothing and is reported.
fn public_lists(store: &dyn Store, skip: &dyn Fn(&Id) -> bool, report: &mut KeylessReport) -> Result<Vec<(Id, Vec<Id>)>, OpsError> {
    let mut out = Vec::new();
    for st in stored_snapshots(store, skip)? {
        match st.bytes.and_then(|b| decode_public(&b).map_err(|e| e.to_string())) {
            Ok((public, _)) => {
                out.push((st.id, public.packs));
                if st.trashed {
                    report.trashed += 1;
                } else {
                    report.snapshots += 1;
                }
            }
            Err(e) if st.trashed => report.warnings.push(format!("{e}; no data is kept for it")),
            Err(e) => {
                return Err(OpsError::Unsafe(format!(
                    "snapshot {} is damaged ({e}), so prune cannot know which packs it uses; \
                     run `kura check`, then `kura repair snapshots` or forget it",
                    st.id.short()
                )));
            }
        }
    }
    Ok(out)
}

/// Runs a keyless prune as session `me` (registered by the caller, command `prune`).
pub fn prune(store: &dyn Store, me: &str) -> Result<KeylessReport, OpsError> {
    let mut report = prune_unlocked(store, me)?;
    match crate::lock::upkeep(store) {
        Ok(u) => report.lock = u,
        Err(e) => report.lock_error = Some(e.to_string()),
    }
    Ok(report)
}

/// The prune itself; [`prune`] adds the Object Lock upkeep.
fn prune_unlocked(store: &dyn Store, me: &str) -> Result<KeylessReport, OpsError> {
    ensure_alone_in(store, Some(me), "prune")?;
    let mut report = KeylessReport { sessions_cleaned: reap_sessions(store)?, ..Default::default() };
    (report.temporaries_removed, _) = store.remove_stale_temporaries(std::time::Duration::from_secs(86_400))?;

    let mut plans = Vec::new();
    for l in store.list(Kind::Plan)? {
        let bytes = match store.get(Kind::Plan, &l.name) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let obj = ObjectName::new(Kind::Plan, &l.name);
        if bytes.starts_with(PLAN_MAGIC) {
            // Only the key can finish it (its sweep reads trees and rewrites index files).
            report.waiting_for_admin = Some(format!(
                "an admin prune's plan ({obj}) is pending; it is finished by the next `kura prune` with the key"
            ));
            return Ok(report);
        }
        let id = Id::of_stored(&bytes);
        let plan = (id.to_hex() == l.name)
            .then(|| PrunePlan::decode_keyless(&bytes).ok())
            .flatten()
            .ok_or_else(|| OpsError::Unsafe(format!("{obj} is damaged; prune cannot know what it condemned")))?;
        plans.push((id, plan));
    }

    // Snapshots before lineage and packs: every pack a listed snapshot needs is then listed.
    let lists = public_lists(store, &|_| false, &mut report)?;
    let lineage::Records { edges, problems, .. } = lineage::read_all(store)?;
    if let Some(p) = problems.first() {
        return Err(OpsError::Unsafe(format!("{p}; prune cannot know where an earlier prune moved data")));
    }
    let sizes: HashMap<Id, u64> = store.list(Kind::Pack)?.iter().filter_map(|l| Some((Id::from_hex(&l.name)?, l.size))).collect();
    report.packs = sizes.len();
    report.bytes = sizes.values().sum();
    let used = lineage::closure(lists.iter().flat_map(|(_, p)| p.iter().copied()), &edges);

    // A pack a snapshot names that is gone, with no recorded move and no plan that deleted it:
    // something removed data without saying where it went (a prune of an older kura, damage).
    // Deleting on such a map could take what that data moved to.
    let planned: HashSet<Id> = plans.iter().flat_map(|(_, p)| p.condemned.iter().copied()).collect();
    for (id, packs) in &lists {
        if let Some(p) = packs.iter().find(|p| !sizes.contains_key(p) && !edges.contains_key(p) && !planned.contains(p)) {
            return Err(OpsError::Unsafe(format!(
                "snapshot {} names pack {} which is gone with no record of where its data went (damage, or a \
                 prune by an older kura); run `kura check` with the key to see what is lost, and forget or \
                 repair that snapshot",
                id.short(),
                p.short()
            )));
        }
    }

    // Finish earlier plans; the executed ones are merged into this run's plan below.
    let mut done = Vec::new();
    let mut pending = IdSet::default();
    for (id, plan) in &plans {
        if sweep(store, me, id, plan, &edges, &mut report)? {
            done.push((*id, plan));
        } else {
            pending.extend(plan.condemned.iter().copied());
        }
    }
    let known: Vec<Id> = lists.iter().map(|(id, _)| *id).collect();
    let mut fresh: Vec<Id> = sizes.keys().filter(|p| !used.contains(*p) && !pending.contains(*p)).copied().collect();
    // Packs an Object Lock still keeps wait for a run after their date (see crate::prune).
    if store.lock_period().is_some() {
        let mut left = Vec::new();
        for p in fresh {
            match store.locked_until(Kind::Pack, &p.to_hex())? {
                Some(until) => report.locked.push(crate::prune::Locked::new(&ObjectName::new(Kind::Pack, &p.to_hex()), until)),
                None => left.push(p),
            }
        }
        fresh = left;
    }
    report.packs_condemned = fresh.len();
    // Packs executed plans deleted stay condemned (index files still name them); ones they
    // kept are live again.
    let mut gone: Vec<Id> =
        done.iter().flat_map(|(_, p)| p.condemned.iter().filter(|c| !sizes.contains_key(c) || !used.contains(*c))).copied().collect();
    gone.sort();
    gone.dedup();
    // An executed plan may be deleted only once a plan recording all it did has been seen by
    // every live session: a reader listing plans meanwhile then finds that one.
    if fresh.is_empty() {
        if let Some((cover, _)) = done.iter().find(|(_, p)| gone.iter().all(|g| p.condemned.binary_search(g).is_ok())) {
            let others: Vec<Id> = done.iter().map(|(id, _)| *id).filter(|id| id != cover).collect();
            delete_plans(store, &others, &mut report)?;
        }
        return Ok(report);
    }
    let mut condemned = fresh;
    condemned.extend(gone);
    condemned.sort();
    condemned.dedup();
    let plan = PrunePlan {
        version: 1,
        created: jiff::Timestamp::now().as_second(),
        snapshots: known,
        condemned,
        obsolete_indexes: Vec::new(),
        keyless: true,
    };
    let bytes = plan.encode_keyless().ok_or_else(|| OpsError::Invalid("cannot encode the prune plan".into()))?;
    let plan_id = Id::of_stored(&bytes);
    match store.put_new(Kind::Plan, &plan_id.to_hex(), &bytes) {
        Ok(()) | Err(StoreError::Exists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    if sweep(store, me, &plan_id, &plan, &edges, &mut report)? {
        let absorbed: Vec<Id> = done.iter().map(|(id, _)| *id).filter(|id| *id != plan_id).collect();
        delete_plans(store, &absorbed, &mut report)?;
    }
    Ok(report)
}

/// Deletes executed plans whose record another plan carries.
fn delete_plans(store: &dyn Store, ids: &[Id], report: &mut KeylessReport) -> Result<(), OpsError> {
    for id in ids {
        match store.delete(Kind::Plan, &id.to_hex()) {
            Ok(()) | Err(StoreError::NotFound(_)) => report.plans_merged += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Executes a keyless plan if every live session has seen it: deletes its condemned packs
/// except those a snapshot made since the plan reaches. The plan itself stays. Returns whether
/// it was executed.
fn sweep(store: &dyn Store, me: &str, plan_id: &Id, plan: &PrunePlan, edges: &IdMap<IdSet>, report: &mut KeylessReport) -> Result<bool, OpsError> {
    let hex = plan_id.to_hex();
    let waiting = unaware_sessions(store, Some(me), &hex, &mut report.sessions_cleaned)?;
    if !waiting.is_empty() {
        report.plans_deferred.push(Deferred { plan: hex, waiting_for: waiting });
        return Ok(false);
    }
    let known: HashSet<Id> = plan.snapshots.iter().copied().collect();
    let mut scratch = KeylessReport::default();
    let newer: Vec<Id> = match public_lists(store, &|id| known.contains(id), &mut scratch) {
        Ok(l) => l.into_iter().flat_map(|(_, p)| p).collect(),
        Err(e) => {
            report.plans_deferred.push(Deferred { plan: hex, waiting_for: vec![e.to_string()] });
            return Ok(false);
        }
    };
    let keep = lineage::closure(newer, edges);
    let sizes: HashMap<Id, u64> = store.list(Kind::Pack)?.iter().filter_map(|l| Some((Id::from_hex(&l.name)?, l.size))).collect();
    for p in &plan.condemned {
        let Some(size) = sizes.get(p) else { continue };
        if keep.contains(p) {
            report.packs_resurrected += 1;
            continue;
        }
        match store.delete(Kind::Pack, &p.to_hex()) {
            Ok(()) => {
                report.packs_deleted += 1;
                report.bytes_freed += size;
            }
            Err(StoreError::NotFound(_)) => {}
            Err(e) => report.locked.push(crate::prune::Locked::from_error(&e).ok_or(e)?),
        }
    }
    report.plans_swept += 1;
    Ok(true)
}
