//! Facts about one repository, read without the key: per group the newest snapshot and its age
//! against freshness limits, the server's job results (verification, pulls), and the drill
//! records. What `kura status` judges and `kura report` prints.

use kura_repo::drill::DrillRecord;
use kura_repo::snapshot::decode_public;
use kura_store::{Kind, Store, StoreError};
use serde::Serialize;
use std::collections::BTreeMap;

/// How bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fresh, verified, drilled.
    Ok,
    /// Late, or not drilled recently.
    Warn,
    /// Past the critical age, a failing job or drill, or unreachable.
    Crit,
}

impl Level {
    /// `ok`, `warn`, `crit`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Crit => "crit",
        }
    }
}

/// Freshness limits, in hours.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// The newest snapshot is late after this.
    pub warn_hours: f64,
    /// ... critical after this.
    pub crit_hours: f64,
    /// The last successful drill is late after this (`None`: drills are not required).
    pub drill_warn_hours: Option<f64>,
}

/// One group's newest snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// Host.
    pub host: String,
    /// Paths.
    pub paths: Vec<String>,
    /// Snapshots of the group.
    pub snapshots: u64,
    /// The newest one's time (claimed; future-dated ones are not counted).
    pub newest: String,
    /// Its age in hours.
    pub age_hours: f64,
    /// Against the limits.
    pub level: Level,
}

/// A job's last result, as the server reports it.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    /// The job.
    pub name: String,
    /// Whether its last run succeeded (none: it never ran).
    pub last_ok: Option<bool>,
    /// When it last succeeded.
    pub last_success: Option<String>,
    /// Its last message.
    pub last_message: String,
}

/// Everything known about one repository.
#[derive(Debug, Clone, Serialize)]
pub struct RepoStatus {
    /// What it is (`www: daily on c`, or the repository's location).
    pub label: String,
    /// Where.
    pub location: String,
    /// The worst of everything below.
    pub level: Level,
    /// Why it is not ok, one line each.
    pub reasons: Vec<String>,
    /// The limits applied.
    pub limits: Limits,
    /// Per group (host, paths).
    pub groups: Vec<GroupStatus>,
    /// Snapshots in all.
    pub snapshots: u64,
    /// Snapshots dated in the future (not counted as fresh).
    pub future_dated: u64,
    /// The server's jobs (a kura server only).
    pub jobs: Vec<JobResult>,
    /// The newest drill.
    pub last_drill: Option<DrillRecord>,
    /// The newest successful drill's time.
    pub last_good_drill: Option<String>,
    /// The newest successful drill of a whole snapshot (the measured RTO; sample drills may
    /// have run since).
    pub last_full_drill: Option<DrillRecord>,
    /// Drills recorded.
    pub drills: u64,
    /// For a shadow stream (no snapshots, no drills): how far the standby is behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowFacts>,
}

/// A shadow stream's health, as its standby reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowFacts {
    /// `standby` or `primary` (after a failover).
    pub role: String,
    /// How long the oldest record not yet applied to the mirror has waited (seconds).
    pub lag_seconds: f64,
    /// Since the primary last pushed or sent its heartbeat (seconds; it does every 10 s).
    pub contact_seconds: f64,
    /// Records received and applied.
    pub head: u64,
    /// Records applied to the mirror.
    pub applied: u64,
}

/// A shadow is late after a minute without contact or behind, critical after ten.
const SHADOW_WARN_SECS: f64 = 60.0;
const SHADOW_CRIT_SECS: f64 = 600.0;

/// Judges a shadow stream from its standby's status.
pub fn shadow_status(label: &str, location: &str, limits: Limits, f: ShadowFacts) -> RepoStatus {
    let worst = f.lag_seconds.max(if f.role == "standby" { f.contact_seconds } else { 0.0 });
    let level = if worst > SHADOW_CRIT_SECS {
        Level::Crit
    } else if worst > SHADOW_WARN_SECS {
        Level::Warn
    } else {
        Level::Ok
    };
    let mut reasons = Vec::new();
    if level != Level::Ok {
        reasons.push(format!("the standby is {:.0} s behind; last contact with the primary {:.0} s ago", f.lag_seconds, f.contact_seconds));
    }
    if f.role != "standby" {
        reasons.push(format!("the stream's role is {} (a failover happened; fail back with kura shadow demote)", f.role));
    }
    let level = if f.role != "standby" { level.max(Level::Warn) } else { level };
    RepoStatus { shadow: Some(f), ..bare(label, location, level, reasons, limits) }
}

/// A status with no snapshots, jobs or drills.
fn bare(label: &str, location: &str, level: Level, reasons: Vec<String>, limits: Limits) -> RepoStatus {
    RepoStatus {
        label: label.into(),
        location: location.into(),
        level,
        reasons,
        limits,
        groups: Vec::new(),
        snapshots: 0,
        future_dated: 0,
        jobs: Vec::new(),
        last_drill: None,
        last_good_drill: None,
        last_full_drill: None,
        drills: 0,
        shadow: None,
    }
}

fn hours_between(a: jiff::Timestamp, b: jiff::Timestamp) -> f64 {
    b.duration_since(a).as_secs_f64() / 3600.0
}

/// Parses `GET /v1/<repo>/jobs`.
pub fn parse_jobs(v: &serde_json::Value) -> Vec<JobResult> {
    let mut out = Vec::new();
    if let Some(m) = v.as_object() {
        for (name, j) in m {
            out.push(JobResult {
                name: name.clone(),
                last_ok: j["last_ok"].as_bool(),
                last_success: j["last_success"].as_str().map(str::to_string),
                last_message: j["last_message"].as_str().unwrap_or("").to_string(),
            });
        }
    }
    out
}

/// The status of an unreachable repository.
pub fn unreachable(label: &str, location: &str, limits: Limits, why: &str) -> RepoStatus {
    bare(label, location, Level::Crit, vec![format!("cannot read {location}: {why}")], limits)
}

/// Reads and judges one repository at `now`; `jobs` are the server's, when it is one.
pub fn repo_status(store: &dyn Store, label: &str, jobs: Vec<JobResult>, limits: Limits, now: jiff::Timestamp) -> Result<RepoStatus, StoreError> {
    let mut groups: BTreeMap<(String, Vec<String>), (u64, jiff::Timestamp)> = BTreeMap::new();
    let (mut snapshots, mut future_dated) = (0, 0);
    let mut reasons = Vec::new();
    // A little skew is a clock, not a forgery.
    let horizon = now + jiff::SignedDuration::from_mins(10);
    for l in store.list(Kind::Snapshot)? {
        let bytes = match store.get(Kind::Snapshot, &l.name) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let Some((p, t)) = decode_public(&bytes).ok().and_then(|(p, _)| p.time.parse::<jiff::Timestamp>().ok().map(|t| (p, t))) else {
            reasons.push(format!("snapshot {} is unreadable", &l.name[..l.name.len().min(8)]));
            continue;
        };
        snapshots += 1;
        if t > horizon {
            future_dated += 1;
            continue;
        }
        let mut paths = p.paths.clone();
        paths.sort();
        let e = groups.entry((p.host.clone(), paths)).or_insert((0, t));
        e.0 += 1;
        e.1 = e.1.max(t);
    }
    let mut level = if reasons.is_empty() { Level::Ok } else { Level::Warn };
    let mut gs = Vec::new();
    for ((host, paths), (n, newest)) in groups {
        let age = hours_between(newest, now);
        let l = if age > limits.crit_hours {
            Level::Crit
        } else if age > limits.warn_hours {
            Level::Warn
        } else {
            Level::Ok
        };
        if l != Level::Ok {
            reasons.push(format!("newest snapshot of {host}:{} is {age:.1} h old ({} after {} h)", paths.join(","), l.name(), if l == Level::Crit { limits.crit_hours } else { limits.warn_hours }));
        }
        level = level.max(l);
        gs.push(GroupStatus { host, paths, snapshots: n, newest: newest.to_string(), age_hours: age, level: l });
    }
    if gs.is_empty() {
        reasons.push("no snapshot".into());
        level = Level::Crit;
    }
    if future_dated > 0 {
        reasons.push(format!("{future_dated} snapshot(s) dated in the future (a wrong clock or a forgery)"));
        level = level.max(Level::Warn);
    }
    for j in &jobs {
        if j.last_ok == Some(false) {
            reasons.push(format!("server job {} failed: {}", j.name, j.last_message));
            level = Level::Crit;
        }
    }
    // A record dated after now (a wrong clock, or a forged one) proves nothing about today.
    let drills: Vec<DrillRecord> =
        kura_repo::drill::read_all(store)?.into_iter().filter(|d| d.time.parse::<jiff::Timestamp>().is_ok_and(|t| t <= horizon)).collect();
    let last_drill = drills.last().cloned();
    let last_good_drill = drills.iter().rev().find(|d| d.ok).map(|d| d.time.clone());
    let last_full_drill = drills.iter().rev().find(|d| d.ok && d.mode == "full").cloned();
    if let Some(d) = &last_drill
        && !d.ok
    {
        reasons.push(format!("the last drill ({}) failed: {}", d.time, d.error.as_deref().unwrap_or("files did not match")));
        level = Level::Crit;
    }
    if let Some(max) = limits.drill_warn_hours {
        match last_good_drill.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
            None => {
                reasons.push("never drilled: no restore has been proven".into());
                level = level.max(Level::Warn);
            }
            Some(t) if hours_between(t, now) > max => {
                reasons.push(format!("the last successful drill is {:.1} days old", hours_between(t, now) / 24.0));
                level = level.max(Level::Warn);
            }
            Some(_) => {}
        }
    }
    Ok(RepoStatus {
        label: label.into(),
        location: store.location(),
        level,
        reasons,
        limits,
        groups: gs,
        snapshots,
        future_dated,
        jobs,
        drills: drills.len() as u64,
        last_drill,
        last_good_drill,
        last_full_drill,
        shadow: None,
    })
}
