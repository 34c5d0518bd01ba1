//! Object Lock upkeep, after a prune on a store that locks what it holds (an S3 bucket with a
//! default retention): every object a snapshot needs stays locked at least as long as the
//! snapshot itself, and old versions go once their retention has ended.
//!
//! A snapshot is locked for the bucket's period from its upload; the packs it names may be much
//! older, their own lock long over. Without this an intruder with the bucket's keys could delete
//! those packs and leave a locked snapshot that no longer restores.

use crate::error::OpsError;
use kura_repo::Id;
use kura_repo::lineage;
use kura_repo::snapshot::decode_public;
use kura_store::{Kind, LockUpkeep, Store, StoreError};
use std::collections::HashMap;
use std::time::SystemTime;

/// Runs the upkeep; `None` when the store locks nothing.
pub fn upkeep(store: &dyn Store) -> Result<Option<LockUpkeep>, OpsError> {
    let Some(period) = store.lock_period() else { return Ok(None) };
    let now = SystemTime::now();
    let edges = lineage::read_all(store)?.edges;
    let mut want: HashMap<Id, SystemTime> = HashMap::new();
    let mut newest: Option<SystemTime> = None;
    for l in store.list(Kind::Snapshot)? {
        let bytes = match store.get(Kind::Snapshot, &l.name) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        // A damaged snapshot restores nothing anyway; check reports it.
        let Ok((public, _)) = decode_public(&bytes) else { continue };
        // Its own lock, from the bucket's default: its upload time plus the period.
        let until = l.modified.unwrap_or(now) + period;
        newest = newest.max(Some(until));
        // Packs it names may have been repacked since: their data is where the lineage says,
        // and a pack with recorded moves is needed no more (a prune deleted it, or will once
        // its own lock ends).
        for p in lineage::closure(public.packs.iter().copied(), &edges).into_iter().filter(|p| !edges.contains_key(p)) {
            let w = want.entry(p).or_insert(until);
            *w = (*w).max(until);
        }
    }
    // S3 takes no retention in the past, and one that ends now protects nothing.
    let soon = now + std::time::Duration::from_secs(60);
    want.retain(|_, until| *until > soon);
    let newest = newest.filter(|t| *t > soon);
    // Every needed pack is asked (one HEAD each), not only those whose upload time says they
    // fall short: under GOVERNANCE a retention can have been shortened behind kura's back.
    let todo: Vec<(String, SystemTime)> = store
        .list(Kind::Pack)?
        .into_iter()
        .filter_map(|l| Some((l.name.clone(), *want.get(&Id::from_hex(&l.name)?)?)))
        .collect();
    let mut up = LockUpkeep { extended: store.keep_locked(Kind::Pack, &todo)?, ..LockUpkeep::default() };
    if let Some(until) = newest {
        // Without the config and a key file no snapshot decrypts.
        let keys: Vec<(String, SystemTime)> = store.list(Kind::Key)?.into_iter().map(|l| (l.name, until)).collect();
        up.extended += store.keep_locked(Kind::Key, &keys)?;
        up.extended += store.keep_locked(Kind::Config, &[("config".to_string(), until)])?;
    }
    let purged = store.purge_versions()?;
    up.versions_deleted = purged.versions_deleted;
    up.version_bytes = purged.version_bytes;
    up.versions_locked = purged.versions_locked;
    Ok(Some(up))
}

/// One line per fact for people: objects left locked, retentions extended, old versions.
pub fn summary(locked: &[crate::prune::Locked], upkeep: Option<&LockUpkeep>, error: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = error {
        out.push(format!("warning: Object Lock upkeep failed (the next prune tries again): {e}"));
    }
    if let Some(first) = locked.iter().min_by(|a, b| a.until.cmp(&b.until)) {
        out.push(format!(
            "left {} object(s) that Object Lock keeps (the first, {}, until {}); a prune after that date deletes them",
            locked.len(),
            first.object,
            first.until
        ));
    }
    if let Some(u) = upkeep {
        out.push(format!(
            "Object Lock: extended the retention of {} object(s) that kept snapshots need; deleted {} old version(s) ({} bytes), {} still locked",
            u.extended, u.versions_deleted, u.version_bytes, u.versions_locked
        ));
    }
    out
}
