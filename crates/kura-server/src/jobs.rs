//! Server-side jobs, none of which needs the repository key: retention by the server's receive
//! times (deleted snapshots go to the trash), expiry of the trash after the undelete window,
//! keyless prune of packs no snapshot uses, verification of stored bytes against their
//! content-addressed names, and pulls from the repository this one replicates.

use crate::ServerError;
use crate::api::{Hosted, trash_snapshot};
use crate::config::{PullJob, RepoConfig, parse_duration, parse_subset};
use crate::schedule::Schedule;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ZonedDateTime};
use kura_ops::forget::{ForgetOptions, plan_store};
use kura_ops::policy::Resolved;
use kura_repo::Id;
use kura_repo::trash::TrashRecord;
use kura_store::{Kind, Store, StoreError};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The jobs a hosted repository runs: `pull`, `retention`, `prune`, `verify`, and `expire`
/// (hourly, always).
pub const JOBS: [&str; 5] = ["pull", "retention", "prune", "verify", "expire"];

/// What the last runs of a job did (`GET /v1/<repo>/jobs`, `/metrics`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobStatus {
    /// Its schedule.
    pub schedule: String,
    /// When it last started (RFC 3339).
    pub last_start: Option<String>,
    /// Whether that run succeeded.
    pub last_ok: Option<bool>,
    /// What it did or why it failed.
    pub last_message: String,
    /// How long it took.
    pub last_seconds: f64,
    /// When a run last succeeded.
    pub last_success: Option<String>,
    /// When it runs next.
    pub next: Option<String>,
    /// Runs so far (since the server started).
    pub runs: u64,
    /// Failed runs so far.
    pub failures: u64,
}

/// A repository's job configuration, resolved.
pub struct RepoJobs {
    /// How long deleted snapshots stay recoverable.
    pub undelete_window: Duration,
    retention: Option<(Schedule, Resolved)>,
    prune: Option<Schedule>,
    verify: Option<(Schedule, u64)>,
    pull: Option<(Schedule, PullSpec)>,
    zone: TimeZone,
    /// Status per job name.
    pub status: Mutex<BTreeMap<&'static str, JobStatus>>,
    verify_round: AtomicU64,
    // Held while a job runs: a repository's jobs run one at a time, scheduled or on demand (a
    // pull writing a snapshot while a prune of the same repository decides which packs are
    // unused could lose the snapshot's new packs).
    run_lock: Mutex<()>,
}

impl RepoJobs {
    /// Resolves a repository's configured jobs; `skew` is how far a snapshot's claimed time may
    /// be ahead of and behind the server's clock before its receipt is flagged.
    pub fn new(r: &RepoConfig, skew: (Duration, Duration)) -> Result<RepoJobs, ServerError> {
        let ctx = |m: String| ServerError::Config(format!("repository {:?}: {m}", r.name));
        let mut zone = TimeZone::system();
        let retention = match &r.retention {
            Some(j) => {
                let resolved = j.policy().resolve(None, None, None).map_err(ctx)?;
                zone = resolved.tz.clone();
                Some((j.schedule.parse::<Schedule>().map_err(ctx)?, resolved))
            }
            None => None,
        };
        let prune = match &r.prune {
            Some(j) => Some(j.schedule.parse::<Schedule>().map_err(ctx)?),
            None => None,
        };
        let verify = match &r.verify {
            Some(j) => Some((j.schedule.parse::<Schedule>().map_err(ctx)?, parse_subset(&j.subset).map_err(ctx)?)),
            None => None,
        };
        let pull = match &r.pull {
            Some(j) => Some((j.schedule.parse::<Schedule>().map_err(ctx)?, PullSpec::new(j, skew).map_err(ctx)?)),
            None => None,
        };
        let mut status = BTreeMap::new();
        for (name, sched) in [
            ("pull", pull.as_ref().map(|(s, _)| s.to_string())),
            ("retention", retention.as_ref().map(|(s, _)| s.to_string())),
            ("prune", prune.as_ref().map(|s| s.to_string())),
            ("verify", verify.as_ref().map(|(s, _)| s.to_string())),
            ("expire", Some("hourly".to_string())),
        ] {
            if let Some(schedule) = sched {
                status.insert(name, JobStatus { schedule, ..Default::default() });
            }
        }
        Ok(RepoJobs {
            undelete_window: parse_duration("undelete_window", &r.undelete_window)?,
            retention,
            prune,
            verify,
            pull,
            zone,
            status: Mutex::new(status),
            verify_round: AtomicU64::new(0),
            run_lock: Mutex::new(()),
        })
    }

    fn schedule(&self, job: &str) -> Option<Schedule> {
        match job {
            "retention" => self.retention.as_ref().map(|(s, _)| s.clone()),
            "prune" => self.prune.clone(),
            "verify" => self.verify.as_ref().map(|(s, _)| s.clone()),
            "pull" => self.pull.as_ref().map(|(s, _)| s.clone()),
            "expire" => Some(Schedule::Hourly(0)),
            _ => None,
        }
    }

    /// When each configured job runs next after `now`.
    pub fn next_runs(&self, now: Timestamp) -> Vec<(&'static str, ZonedDateTime)> {
        let now = now.to_zoned_datetime(self.zone.clone());
        JOBS.iter().filter_map(|j| Some((*j, self.schedule(j)?.next_after(&now)?))).collect()
    }
}

/// Runs one job now (blocking); returns what it did, or why it failed.
pub fn run_job(hosted: &Hosted, job: &str) -> Result<String, String> {
    let job: &'static str = JOBS.into_iter().find(|j| *j == job).ok_or_else(|| format!("no job named {job:?} (pull, retention, prune, verify, expire)"))?;
    let _one_at_a_time = hosted.jobs.run_lock.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let start_time = Timestamp::now();
    let result = match job {
        "pull" => match &hosted.jobs.pull {
            Some((_, spec)) => pull(hosted, spec),
            None => Err("no pull is configured for this repository".into()),
        },
        "retention" => match &hosted.jobs.retention {
            Some((_, policy)) => retention(hosted, policy),
            None => Err("no retention is configured for this repository".into()),
        },
        // Also on demand when none is scheduled: an admin frees space after deleting snapshots.
        "prune" => prune(hosted),
        "verify" => match hosted.jobs.verify {
            Some((_, n)) => verify(hosted.store.as_ref(), n, hosted.jobs.verify_round.fetch_add(1, Ordering::Relaxed)),
            None => Err("no verification is configured for this repository".into()),
        },
        _ => expire(hosted.store.as_ref(), hosted.jobs.undelete_window),
    };
    let next = hosted.jobs.schedule(job).and_then(|s| s.next_after(&Timestamp::now().to_zoned_datetime(hosted.jobs.zone.clone())));
    if let Ok(mut all) = hosted.jobs.status.lock() {
        let st = all.entry(job).or_default();
        st.last_start = Some(start_time.to_string());
        st.last_ok = Some(result.is_ok());
        st.last_message = match &result {
            Ok(m) | Err(m) => m.clone(),
        };
        st.last_seconds = started.elapsed().as_secs_f64();
        st.runs += 1;
        match &result {
            Ok(_) => st.last_success = Some(start_time.to_string()),
            Err(_) => st.failures += 1,
        }
        st.next = next.map(|n| n.to_string());
    }
    match &result {
        Ok(m) => tracing::info!(repo = %hosted.name, job, "{m}"),
        Err(m) => tracing::error!(repo = %hosted.name, job, "job failed: {m}"),
    }
    result
}

fn store_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A resolved `[repository.pull]`.
pub struct PullSpec {
    job: PullJob,
    selection: kura_ops::pull::Selection,
    skew: (Duration, Duration),
}

impl PullSpec {
    fn new(j: &PullJob, skew: (Duration, Duration)) -> Result<PullSpec, String> {
        let tz = match &j.timezone {
            Some(z) => TimeZone::get(z).map_err(|e| format!("pull: timezone {z:?}: {e}"))?,
            None => TimeZone::system(),
        };
        let newest_of = match &j.newest_of {
            Some(n) => Some(
                kura_ops::retention::Period::ALL
                    .into_iter()
                    .find(|p| p.name() == n)
                    .ok_or_else(|| format!("pull: newest-of {n:?}: use hourly, daily, weekly, biweekly, monthly or yearly"))?,
            ),
            None => None,
        };
        if kura_store::remote::is_remote(&j.from) && j.token_file.is_none() {
            return Err(format!("pull: {} is a kura server: name a token-file (a read token is enough)", j.from));
        }
        let selection = kura_ops::pull::Selection { hosts: j.hosts.clone(), tags: j.tags.clone(), paths: j.paths.clone(), newest_of, tz, retry: Default::default() };
        Ok(PullSpec { job: j.clone(), selection, skew })
    }

    /// Opens the source (again at each run: a token file may have been rotated).
    fn source(&self) -> Result<std::sync::Arc<dyn Store>, String> {
        let from = &self.job.from;
        Ok(if kura_store::remote::is_remote(from) {
            let file = self.job.token_file.as_deref().unwrap_or(std::path::Path::new(""));
            let token = std::fs::read_to_string(file).map_err(|e| format!("cannot read token file {}: {e}", file.display()))?;
            let opts = kura_store::remote::RemoteOptions { token: token.trim().to_string(), fingerprint: self.job.fingerprint.clone(), ..Default::default() };
            std::sync::Arc::new(kura_store::RemoteStore::open(from, &opts).map_err(store_err)?)
        } else if kura_store::s3::is_s3(from) {
            std::sync::Arc::new(kura_store::S3Store::open(from, &kura_store::s3::S3Options::from_env()).map_err(store_err)?)
        } else {
            std::sync::Arc::new(kura_store::LocalStore::open(std::path::Path::new(from)).map_err(store_err)?)
        })
    }
}

/// Pulls from the source, trying again after a failure that may pass (a network cut: what was
/// fetched stays, so the next attempt resumes), then applies this repository's retention.
fn pull(hosted: &Hosted, spec: &PullSpec) -> Result<String, String> {
    let mut last = String::new();
    for attempt in 0..spec.job.attempts.max(1) {
        if attempt > 0 {
            tracing::warn!(repo = %hosted.name, "pull attempt {attempt} failed ({last}); trying again");
            std::thread::sleep(Duration::from_secs(1 << attempt.min(6)));
        }
        let (msg, transient) = match pull_once(hosted, spec) {
            Ok(m) => return Ok(m),
            Err(e) => e,
        };
        last = msg;
        if !transient {
            break;
        }
    }
    Err(last)
}

fn pull_once(hosted: &Hosted, spec: &PullSpec) -> Result<String, (String, bool)> {
    let src = spec.source().map_err(|e| (e, true))?;
    let put = |name: &str, bytes: &[u8], received: Option<Timestamp>| -> Result<(), StoreError> {
        // The public part was read already; a failure here cannot happen for a chosen snapshot.
        let claimed = kura_repo::snapshot::decode_public(bytes).ok().and_then(|(p, _)| p.time.parse().ok()).unwrap_or_else(Timestamp::now);
        // The source server's receive time when it has one; else the claimed time, which the
        // pull bounded (never after now, never before what this replica had of its group).
        let received = received.unwrap_or(claimed).min(Timestamp::now());
        let r = crate::api::make_receipt(spec.skew, claimed, received, "pull", Some("pull"));
        match crate::api::put_snapshot(hosted, name, bytes, Some(&r)) {
            Ok(()) | Err(StoreError::Exists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    };
    // Snapshots refused by earlier runs, kept across restarts: retried even once a newer one
    // of their group is here.
    let refused_path = hosted.state_file("pull-refused");
    let mut selection = spec.selection.clone();
    selection.retry = std::fs::read_to_string(&refused_path).unwrap_or_default().lines().filter_map(kura_repo::Id::from_hex).collect();
    let r = kura_ops::pull::pull(&src, &hosted.store, &selection, Timestamp::now(), &put).map_err(|e| {
        let transient = matches!(&e, kura_ops::OpsError::Repo(kura_repo::RepoError::Store(s)) if s.is_transient());
        (format!("pulling from {}: {e}", spec.job.from), transient)
    })?;
    let mut retry = selection.retry;
    retry.extend(r.refused.iter().filter_map(|f| kura_repo::Id::from_hex(&f.snapshot)));
    for p in &r.pulled {
        if let Some(id) = kura_repo::Id::from_hex(p) {
            retry.remove(&id);
        }
    }
    let mut text: Vec<String> = retry.iter().map(|i| i.to_hex()).collect();
    text.sort();
    let tmp = refused_path.with_file_name(format!(".pull-refused-{}.tmp", hosted.name));
    std::fs::write(&tmp, text.iter().map(|l| format!("{l}\n")).collect::<String>())
        .and_then(|()| std::fs::rename(&tmp, &refused_path))
        .map_err(|e| (format!("cannot record refused snapshots in {}: {e}", refused_path.display()), false))?;
    let mut msg = format!(
        "pulled {} snapshot(s) ({} pack(s), {} bytes fetched; {} pack(s) here already); {} here already, {} older than what is here",
        r.pulled.len(),
        r.packs_fetched,
        r.bytes_fetched,
        r.packs_present,
        r.present,
        r.older
    );
    if r.initialised {
        msg.push_str("; this repository is now a replica of its source");
    }
    if !r.future.is_empty() {
        msg.push_str(&format!("; {} dated in the future not pulled", r.future.len()));
    }
    if let Some((_, policy)) = &hosted.jobs.retention {
        let kept = retention(hosted, policy).map_err(|e| (format!("{msg}; retention failed: {e}"), false))?;
        msg.push_str(&format!("; retention: {kept}"));
    }
    if !r.refused.is_empty() {
        let why: Vec<String> = r.refused.iter().map(|f| format!("snapshot {}: {}", &f.snapshot[..8], f.reason)).collect();
        return Err((format!("{msg}; refused {}", why.join("; ")), false));
    }
    Ok(msg)
}

/// Applies the retention policy to the snapshots' public parts with the server's receive
/// times, and moves every snapshot it does not keep to the trash.
fn retention(hosted: &Hosted, policy: &Resolved) -> Result<String, String> {
    let store = hosted.store.as_ref();
    let opts = ForgetOptions { group_by: policy.group_by, tz: policy.tz.clone(), now: Timestamp::now(), host: None, tags: Vec::new() };
    let (plans, warnings) = plan_store(store, &opts, &|k| policy.policy_for(k)).map_err(store_err)?;
    for w in &warnings {
        tracing::warn!("retention: {w}");
    }
    // Protection marks are read again: one set since the plan was made still counts.
    let protected: HashSet<String> = store.list(Kind::Protection).map_err(store_err)?.into_iter().map(|l| l.name).collect();
    let (mut kept, mut trashed, mut locked) = (0, 0, 0);
    for d in plans.iter().flat_map(|g| &g.snapshots) {
        if d.keep || protected.contains(&d.id) {
            kept += 1;
            continue;
        }
        match trash_snapshot(hosted, &d.id, "retention") {
            Ok(()) | Err(StoreError::NotFound(_)) => trashed += 1,
            // Its lock has not ended; a later run moves it.
            Err(StoreError::Locked { .. }) => locked += 1,
            Err(e) => return Err(format!("moving snapshot {} to the trash: {e}", &d.id[..8])),
        }
    }
    let locked = if locked > 0 { format!("; {locked} locked by Object Lock stay until their date") } else { String::new() };
    Ok(format!("kept {kept} snapshot(s), moved {trashed} to the trash ({} unreadable left alone){locked}", warnings.len()))
}

/// Deletes packs no snapshot or trashed snapshot uses, as a session of its own (so an admin's
/// `kura prune` and this one exclude each other, and backups that started earlier are waited for).
fn prune(hosted: &Hosted) -> Result<String, String> {
    let store: std::sync::Arc<dyn Store> = hosted.store.clone();
    let session = kura_repo::session::Session::register(store.clone(), "prune").map_err(store_err)?;
    let r = kura_ops::keyless::prune(store.as_ref(), session.id()).map_err(store_err)?;
    drop(session);
    if let Some(w) = r.waiting_for_admin {
        return Ok(format!("nothing done: {w}"));
    }
    for w in &r.warnings {
        tracing::warn!(repo = %hosted.name, "prune: {w}");
    }
    let mut msg = format!(
        "{} snapshot(s) and {} trashed keep their data; deleted {} of {} pack(s) ({} of {} bytes); condemned {}",
        r.snapshots, r.trashed, r.packs_deleted, r.packs, r.bytes_freed, r.bytes, r.packs_condemned
    );
    if r.packs_resurrected > 0 {
        msg.push_str(&format!("; kept {} that newer snapshots use", r.packs_resurrected));
    }
    for d in &r.plans_deferred {
        msg.push_str(&format!("; plan {} waits for {}", &d.plan[..8], d.waiting_for.join(", ")));
    }
    for line in kura_ops::lock::summary(&r.locked, r.lock.as_ref(), r.lock_error.as_deref()) {
        msg.push_str("; ");
        msg.push_str(&line);
    }
    Ok(msg)
}

/// Empties the trash of snapshots deleted longer than the undelete window ago, and drops
/// receipts of snapshots that are gone for good.
fn expire(store: &dyn Store, window: Duration) -> Result<String, String> {
    let now = Timestamp::now();
    let window = jiff::SignedDuration::try_from(window).unwrap_or(jiff::SignedDuration::MAX);
    let mut expired = 0;
    let mut left = HashSet::new();
    for l in store.list(Kind::Trash).map_err(store_err)? {
        let Some(id) = Id::from_hex(&l.name) else { continue };
        let bytes = match store.get(Kind::Trash, &l.name) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.to_string()),
        };
        // An unreadable record is kept: the server cannot tell how old it is.
        let due = TrashRecord::decode(&id, &bytes)
            .ok()
            .and_then(|(r, _)| r.deleted_at())
            .is_some_and(|t| now.duration_since(t) > window);
        if due {
            match store.delete(Kind::Trash, &l.name) {
                Ok(()) | Err(StoreError::NotFound(_)) => expired += 1,
                Err(e) => return Err(e.to_string()),
            }
        } else {
            left.insert(l.name);
        }
    }
    // A receipt is written just before its snapshot, and a snapshot moves to the trash while
    // this runs: only receipts a day old whose snapshot is nowhere are orphans.
    let receipts_listed = store.list(Kind::Receipt).map_err(store_err)?;
    let live: HashSet<String> = store.list(Kind::Snapshot).map_err(store_err)?.into_iter().map(|l| l.name).collect();
    let trash: HashSet<String> = store.list(Kind::Trash).map_err(store_err)?.into_iter().map(|l| l.name).collect();
    let mut receipts = 0;
    for l in receipts_listed {
        if live.contains(&l.name) || trash.contains(&l.name) {
            continue;
        }
        let old = store
            .get(Kind::Receipt, &l.name)
            .ok()
            .and_then(|b| kura_repo::receipt::Receipt::decode(&b))
            .is_none_or(|(_, t)| now.duration_since(t) > jiff::SignedDuration::from_hours(24));
        if old {
            match store.delete(Kind::Receipt, &l.name) {
                Ok(()) | Err(StoreError::NotFound(_)) => receipts += 1,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    // Temporary files of uploads cut off by a killed server: never objects, only space.
    let (temps, temp_bytes) = store.remove_stale_temporaries(Duration::from_secs(86_400)).map_err(store_err)?;
    Ok(format!(
        "expired {expired} trashed snapshot(s) and {receipts} receipt(s); {} still undeletable; removed {temps} stale temporary file(s) ({temp_bytes} bytes)",
        left.len()
    ))
}

/// Reads objects and checks each against its name (the BLAKE3 of its bytes): every key, index
/// file, snapshot, plan and lineage record, and the `round`-th of `n` slices of the packs.
fn verify(store: &dyn Store, n: u64, round: u64) -> Result<String, String> {
    let slice = round % n;
    let (mut objects, mut bytes) = (0u64, 0u64);
    let mut damaged = Vec::new();
    for kind in [Kind::Key, Kind::Index, Kind::Snapshot, Kind::Plan, Kind::Lineage, Kind::Pack] {
        for l in store.list(kind).map_err(store_err)? {
            if kind == Kind::Pack {
                let first = u8::from_str_radix(l.name.get(..2).unwrap_or("00"), 16).unwrap_or(0);
                if u64::from(first) % n != slice {
                    continue;
                }
            }
            match store.get(kind, &l.name) {
                Ok(b) => {
                    objects += 1;
                    bytes += b.len() as u64;
                    if blake3::hash(&b).to_hex().as_str() != l.name {
                        damaged.push(format!("{}/{}", kind.wire(), l.name));
                    }
                }
                Err(StoreError::NotFound(_)) => {} // pruned meanwhile
                Err(e) => damaged.push(format!("{}/{}: {e}", kind.wire(), l.name)),
            }
        }
    }
    let what = format!("read {objects} object(s), {bytes} bytes (packs: slice {} of {n})", slice + 1);
    if damaged.is_empty() {
        Ok(format!("{what}; all match their names"))
    } else {
        Err(format!("{what}; {} damaged: {}", damaged.len(), damaged.join(", ")))
    }
}

/// Runs every repository's jobs when due, forever; `expire` also runs once at start.
pub async fn scheduler(repos: Vec<std::sync::Arc<Hosted>>) {
    for h in &repos {
        let h = h.clone();
        let _ = tokio::task::spawn_blocking(move || run_job(&h, "expire")).await;
    }
    let mut due: Vec<(std::sync::Arc<Hosted>, &'static str, Timestamp)> = Vec::new();
    for h in &repos {
        for (job, at) in h.jobs.next_runs(Timestamp::now()) {
            due.push((h.clone(), job, at.timestamp()));
        }
    }
    for (h, job, at) in &due {
        if let Ok(mut all) = h.jobs.status.lock()
            && let Some(st) = all.get_mut(job)
        {
            st.next = Some(at.to_string());
        }
    }
    loop {
        let now = Timestamp::now();
        for (h, job, at) in due.iter_mut() {
            if *at <= now {
                let (h2, j) = (h.clone(), *job);
                let _ = tokio::task::spawn_blocking(move || run_job(&h2, j)).await;
                let after = Timestamp::now().to_zoned_datetime(h.jobs.zone.clone());
                *at = h.jobs.schedule(job).and_then(|s| s.next_after(&after)).map(|z| z.timestamp()).unwrap_or(Timestamp::MAX);
            }
        }
        // Wake at the next due job, but at least every minute (the clock may jump).
        let next = due.iter().map(|d| d.2).min().unwrap_or(Timestamp::MAX);
        let until = now.duration_until(next);
        let wait = if until.is_negative() { Duration::from_millis(100) } else { until.unsigned_abs().clamp(Duration::from_millis(100), Duration::from_secs(60)) };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::api::Storage;
    use std::sync::Arc;

    /// A job asked for while another of the same repository runs waits for it.
    #[test]
    fn a_repositorys_jobs_run_one_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(kura_store::LocalStore::create(&tmp.path().join("repo")).unwrap());
        let cfg: RepoConfig = toml::from_str("name = \"r\"").unwrap();
        let jobs = RepoJobs::new(&cfg, (Duration::from_secs(600), Duration::from_secs(600))).unwrap();
        let hosted = Arc::new(Hosted::new("r".into(), Storage::Local(store), jobs, tmp.path().join("owners.json")));
        let running = hosted.jobs.run_lock.lock().unwrap();
        let h = hosted.clone();
        let second = std::thread::spawn(move || run_job(&h, "expire"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!second.is_finished(), "a second job ran beside the first");
        drop(running);
        assert!(second.join().unwrap().is_ok());
    }
}
