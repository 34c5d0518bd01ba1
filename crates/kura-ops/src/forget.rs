//! Forget: group snapshots, apply the retention policy of each group, and delete the snapshots
//! no rule keeps. Works on the snapshots' public parts only (time, host, paths, tags) and the
//! server's receipts, so a keyless server runs it too; the data goes with the next prune.

use crate::error::OpsError;
use crate::pg;
use crate::retention::{self, Item, Policy, Reason};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use kura_repo::snapshot::decode_public;
use kura_repo::receipt;
use kura_repo::{Id, Repository};
use kura_store::{Kind, Store, StoreError};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Which snapshot fields form a group; each group gets retention of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupBy {
    /// By host.
    pub host: bool,
    /// By the set of backed-up paths.
    pub paths: bool,
    /// By the set of tags.
    pub tags: bool,
}

impl Default for GroupBy {
    fn default() -> Self {
        GroupBy { host: true, paths: true, tags: false }
    }
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut g = GroupBy { host: false, paths: false, tags: false };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "host" => g.host = true,
                "paths" | "path" => g.paths = true,
                "tags" | "tag" => g.tags = true,
                "none" => {}
                other => return Err(format!("cannot group by {other:?} (use host, paths, tags or none)")),
            }
        }
        Ok(g)
    }
}

/// A group's identity: the fields grouped by (others are `None`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct GroupKey {
    /// Host, when grouping by host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Sorted paths, when grouping by paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Sorted tags, when grouping by tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(h) = &self.host {
            parts.push(format!("host {h}"));
        }
        if let Some(p) = &self.paths {
            parts.push(format!("paths {}", p.join(",")));
        }
        if let Some(t) = &self.tags {
            parts.push(format!("tags [{}]", t.join(",")));
        }
        if parts.is_empty() {
            parts.push("all snapshots".into());
        }
        write!(f, "{}", parts.join(", "))
    }
}

/// One snapshot's fate.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// Snapshot id (hex).
    pub id: String,
    /// Its time as the client claims it (RFC 3339 UTC).
    pub time: String,
    /// When a kura server received it (its receipt), which retention uses instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received: Option<String>,
    /// Host.
    pub host: String,
    /// Paths.
    pub paths: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Kept or removed.
    pub keep: bool,
    /// Every rule that keeps it (empty: removed).
    pub reasons: Vec<Reason>,
}

/// A group with its policy and decisions, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct GroupPlan {
    /// The group.
    pub group: GroupKey,
    /// The policy applied, described.
    pub policy: String,
    /// Decisions, newest first.
    pub snapshots: Vec<Decision>,
}

/// Inputs of a forget run.
#[derive(Debug, Clone)]
pub struct ForgetOptions {
    /// Grouping.
    pub group_by: GroupBy,
    /// Time zone of the calendar rules.
    pub tz: TimeZone,
    /// "Now" (snapshots after it are future-dated).
    pub now: Timestamp,
    /// Only snapshots of this host.
    pub host: Option<String>,
    /// Only snapshots with all these tags.
    pub tags: Vec<String>,
}

/// Decides, for every group, what the policy keeps. `policy_for` picks a group's policy (from
/// flags or a policy file) and refuses empty ones. Unreadable snapshots are never touched and
/// come back as warnings.
pub fn plan(
    repo: &Repository,
    opts: &ForgetOptions,
    policy_for: &dyn Fn(&GroupKey) -> Result<Policy, String>,
) -> Result<(Vec<GroupPlan>, Vec<String>), OpsError> {
    plan_store(repo.store().as_ref(), opts, policy_for)
}

/// [`plan`] on a store, without the key: what a keyless server runs. Where a kura server
/// recorded when it received a snapshot, that time counts, not the one the client claims.
pub fn plan_store(
    store: &dyn Store,
    opts: &ForgetOptions,
    policy_for: &dyn Fn(&GroupKey) -> Result<Policy, String>,
) -> Result<(Vec<GroupPlan>, Vec<String>), OpsError> {
    let protected: HashSet<Id> = store.list(Kind::Protection)?.iter().filter_map(|l| Id::from_hex(&l.name)).collect();
    let receipts = receipt::read_all(store)?;
    let received: HashMap<Id, Timestamp> = receipts.iter().map(|(id, (_, t))| (*id, *t)).collect();
    // On a kura server, only an admin's upload may stand in for another snapshot: a backup
    // token's forged "repaired copy" must not drag its victim out with it.
    let may_replace = |id: &Id| receipts.get(id).is_none_or(|(r, _)| r.role.as_deref() == Some("admin"));
    let time_of = |id: &Id, p: &kura_repo::SnapshotPublic| {
        received.get(id).copied().unwrap_or_else(|| p.time.parse().unwrap_or(Timestamp::UNIX_EPOCH))
    };
    let mut warnings = Vec::new();
    let mut groups: BTreeMap<GroupKey, Vec<(Id, kura_repo::SnapshotPublic)>> = BTreeMap::new();
    // Every base backup, also those this run's filters leave out (they stay, so their WAL must).
    let mut bases: Vec<(Id, String, String, Option<String>)> = Vec::new();
    for l in store.list(Kind::Snapshot)? {
        let Some(id) = Id::from_hex(&l.name) else { continue };
        let bytes = match store.get(Kind::Snapshot, &l.name) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let public = match decode_public(&bytes) {
            Ok((p, _)) if Id::of_stored(&bytes) == id => p,
            Ok(_) => {
                warnings.push(format!("snapshots/{} does not match its name; left alone", l.name));
                continue;
            }
            Err(e) => {
                warnings.push(format!("snapshots/{} is unreadable ({e}); left alone", l.name));
                continue;
            }
        };
        if let Some((cluster, start)) = pg::base_of(&public.tags) {
            bases.push((id, public.host.clone(), cluster.to_string(), start.map(str::to_string)));
        }
        if opts.host.as_ref().is_some_and(|h| *h != public.host)
            || !opts.tags.iter().all(|t| public.tags.contains(t))
        {
            continue;
        }
        let sorted = |v: &Vec<String>| {
            let mut v = v.clone();
            v.sort();
            v.dedup();
            v
        };
        let key = GroupKey {
            host: opts.group_by.host.then(|| public.host.clone()),
            paths: opts.group_by.paths.then(|| sorted(&public.paths)),
            tags: opts.group_by.tags.then(|| sorted(&public.tags)),
        };
        groups.entry(key).or_default().push((id, public));
    }
    // A damaged original and its repaired copy are one snapshot to retention: the copy is
    // judged, the original follows it.
    let repairs: HashMap<Id, Id> = groups
        .values()
        .flatten()
        .filter(|(id, _)| may_replace(id))
        .filter_map(|(id, p)| Some((Id::from_hex(p.original.as_deref()?)?, *id)))
        .collect();
    let mut out = Vec::new();
    let mut verdicts: HashMap<Id, bool> = HashMap::new();
    for (key, snaps) in &groups {
        // WAL files are not generations of their own: they live as long as a base backup
        // replays them (decided below, once every base backup's fate is known).
        let judged: Vec<&(Id, kura_repo::SnapshotPublic)> =
            snaps.iter().filter(|(id, p)| !repairs.contains_key(id) && pg::wal_of(&p.tags).is_none()).collect();
        if judged.is_empty() {
            // A WAL archive's group: no policy section needs to name it.
            out.push((key.clone(), "PostgreSQL WAL: kept while a kept base backup replays it".to_string(), Vec::new()));
            continue;
        }
        let policy = policy_for(key).map_err(OpsError::Invalid)?;
        policy.check().map_err(|e| OpsError::Invalid(format!("{key}: {e}")))?;
        let items: Vec<Item> = judged
            .iter()
            .map(|(id, p)| Item {
                time: time_of(id, p),
                tags: p.tags.clone(),
                protected: protected.contains(id),
                order: id.0,
            })
            .collect();
        let reasons = retention::apply(&policy, &items, opts.now, &opts.tz);
        let mut decisions: Vec<(Timestamp, Decision)> = Vec::new();
        for (((id, p), reasons), it) in judged.into_iter().zip(reasons).zip(&items) {
            verdicts.insert(*id, !reasons.is_empty());
            decisions.push((it.time, decision(id, p, reasons, received.get(id))));
        }
        out.push((key.clone(), policy.describe(), decisions));
    }
    // Per host and cluster, the oldest position a kept base backup replays from; "" when one
    // did not record it (it keeps the whole archive).
    let mut floors: HashMap<(String, String), (String, Id)> = HashMap::new();
    for (id, host, cluster, start) in &bases {
        if !verdicts.get(id).copied().unwrap_or(true) {
            continue;
        }
        let start = start.clone().unwrap_or_default();
        let f = floors.entry((host.clone(), cluster.clone())).or_insert_with(|| (start.clone(), *id));
        if start < f.0 {
            *f = (start, *id);
        }
    }
    for (key, snaps) in &groups {
        for (id, p) in snaps.iter().filter(|(id, _)| !repairs.contains_key(id)) {
            let Some((name, cluster)) = pg::wal_of(&p.tags) else { continue };
            let mut reasons = Vec::new();
            if protected.contains(id) {
                reasons.push(Reason::Protected);
            }
            match floors.get(&(p.host.clone(), cluster.to_string())) {
                None => reasons.push(Reason::PgWal { base: None }),
                Some((floor, base)) if pg::wal_position(name).is_none_or(|pos| pos >= floor.as_str()) => {
                    reasons.push(Reason::PgWal { base: Some(base.to_hex()) });
                }
                Some(_) => {}
            }
            verdicts.insert(*id, !reasons.is_empty());
            if let Some(g) = out.iter_mut().find(|g| &g.0 == key) {
                g.2.push((time_of(id, p), decision(id, p, reasons, received.get(id))));
            }
        }
    }
    for (key, snaps) in &groups {
        for (id, p) in snaps.iter().filter(|(id, _)| repairs.contains_key(id)) {
            let copy = repairs[id];
            let mut reasons = Vec::new();
            if protected.contains(id) {
                reasons.push(Reason::Protected);
            }
            if verdicts.get(&copy).copied().unwrap_or(true) {
                reasons.push(Reason::RepairedAs { id: copy.to_hex() });
            }
            if let Some(g) = out.iter_mut().find(|g| &g.0 == key) {
                g.2.push((time_of(id, p), decision(id, p, reasons, received.get(id))));
            }
        }
    }
    let out = out
        .into_iter()
        .map(|(group, policy, mut d)| {
            d.sort_by(|a, b| (b.0, &b.1.id).cmp(&(a.0, &a.1.id)));
            GroupPlan { group, policy, snapshots: d.into_iter().map(|(_, d)| d).collect() }
        })
        .collect();
    Ok((out, warnings))
}

fn decision(id: &Id, p: &kura_repo::SnapshotPublic, reasons: Vec<Reason>, received: Option<&Timestamp>) -> Decision {
    Decision {
        id: id.to_hex(),
        time: p.time.clone(),
        received: received.map(|t| t.to_string()),
        host: p.host.clone(),
        paths: p.paths.clone(),
        tags: p.tags.clone(),
        keep: !reasons.is_empty(),
        reasons,
    }
}

/// Deletes the snapshots the plans remove. Protections are read again first, so a snapshot
/// protected since the plan was made survives; so does one the store keeps locked (S3 Object
/// Lock), listed in `locked`. Returns the ids deleted.
pub fn remove(repo: &Repository, plans: &[GroupPlan], locked: &mut Vec<crate::prune::Locked>) -> Result<Vec<String>, OpsError> {
    let protected = repo.protections()?;
    let mut gone = Vec::new();
    for d in plans.iter().flat_map(|g| &g.snapshots).filter(|d| !d.keep) {
        if Id::from_hex(&d.id).is_some_and(|id| protected.contains(&id)) {
            continue;
        }
        match repo.store().delete(Kind::Snapshot, &d.id) {
            Ok(()) | Err(StoreError::NotFound(_)) => gone.push(d.id.clone()),
            Err(e) => locked.push(crate::prune::Locked::from_error(&e).ok_or(e)?),
        }
    }
    Ok(gone)
}
