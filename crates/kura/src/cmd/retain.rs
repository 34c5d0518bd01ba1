//! Deleting commands: `forget`, `prune`, `protect`/`unprotect`. Each prints what it touches,
//! and `--dry-run` prints the same without touching anything.

use crate::args::{Cli, ForgetArgs, PruneArgs, PruneOpts};
use crate::output::{bytes, json, short};
use crate::{Outcome, open, policy};
use anyhow::{Context, Result};
use kura_ops::NoProgress;
use kura_ops::forget::{self, ForgetOptions, GroupPlan};
use kura_ops::prune::{self, MaxUnused, PruneOptions, PruneReport, parse_size};
use kura_repo::Repository;
use serde_json::json as j;

fn prune_options(dry_run: bool, o: &PruneOpts) -> Result<PruneOptions> {
    let max_unused: MaxUnused = o.max_unused.parse().map_err(anyhow::Error::msg)?;
    let max_repack = o
        .max_repack_size
        .as_deref()
        .map(|s| parse_size(s).ok_or_else(|| anyhow::anyhow!("--max-repack-size: bad size {s:?}")))
        .transpose()?;
    Ok(PruneOptions { dry_run, max_unused, max_repack })
}

fn print_plans(plans: &[GroupPlan], tz: &jiff::tz::TimeZone, dry_run: bool) {
    for g in plans {
        outln!("{}  (policy: {})", g.group, g.policy);
        for d in &g.snapshots {
            let time = d
                .time
                .parse::<jiff::Timestamp>()
                .map(|t| t.to_zoned_datetime(tz.clone()).strftime("%Y-%m-%d %H:%M:%S %Z").to_string())
                .unwrap_or_else(|_| d.time.clone());
            let what = if d.keep { "keep" } else if dry_run { "would remove" } else { "remove" };
            let why: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
            outln!("  {}  {time}  {what:<12}  {}", short(&d.id, 8), why.join(", "));
        }
        let kept = g.snapshots.iter().filter(|d| d.keep).count();
        outln!("  {} kept, {} {}", kept, g.snapshots.len() - kept, if dry_run { "would be removed" } else { "removed" });
    }
}

fn print_prune(r: &PruneReport) {
    outln!(
        "{} snapshot(s) use {} of {} in {} pack(s); {} unused",
        r.snapshots, bytes(r.used_bytes), bytes(r.bytes), r.packs, bytes(r.unused_bytes)
    );
    for u in &r.unreadable_packs {
        outln!("warning: {u}; left alone");
    }
    let verb = if r.dry_run { "would" } else { "will" };
    if r.packs_deleted + r.packs_repacked == 0 && r.plans_deferred.is_empty() {
        outln!("nothing to delete");
    } else {
        outln!(
            "{verb} delete {} unused pack(s) and repack {} (copying {}): frees {}, leaves {} unused",
            r.packs_deleted, r.packs_repacked, bytes(r.bytes_copied), bytes(r.bytes_freed), bytes(r.unused_left)
        );
    }
    if r.packs_resurrected > 0 {
        outln!("kept {} condemned pack(s) that a snapshot made meanwhile uses", r.packs_resurrected);
    }
    if r.temporaries_removed > 0 {
        outln!("removed {} temporary file(s) of writes killed more than a day ago", r.temporaries_removed);
    }
    if r.trashed > 0 {
        outln!("kept the data of {} deleted snapshot(s) still in the server's undelete window", r.trashed);
    }
    if r.sessions_cleaned > 0 {
        outln!("removed {} session(s) of processes that died", r.sessions_cleaned);
    }
    if !r.dry_run && r.plans_swept > 0 {
        outln!("deleted the data of {} prune plan(s)", r.plans_swept);
    }
    for d in &r.plans_deferred {
        outln!(
            "plan {} waits for: {}; the next `kura prune` deletes its packs once they have finished",
            short(&d.plan, 8),
            d.waiting_for.join("; ")
        );
    }
    for line in kura_ops::lock::summary(&r.locked, r.lock.as_ref(), r.lock_error.as_deref()) {
        outln!("{line}");
    }
}

fn run_prune(cli: &Cli, repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    if !opts.dry_run {
        repo.start_session("prune").context("registering the prune session")?;
    }
    let r = prune::prune(repo, opts, &NoProgress).context("pruning")?;
    if !cli.json && !cli.quiet {
        print_prune(&r);
    }
    Ok(r)
}

/// `kura prune`.
pub fn prune(cli: &Cli, a: &PruneArgs) -> Result<Outcome> {
    let opts = prune_options(a.dry_run, &a.opts)?;
    let repo = open::open_admin(cli, a.dry_run)?;
    let r = run_prune(cli, &repo, &opts)?;
    if cli.json {
        json(&r)?;
    }
    Ok(Outcome::Ok)
}

/// `kura forget ID...`: removes exactly the named snapshots; a protected one is refused before
/// anything is removed.
fn forget_ids(cli: &Cli, a: &ForgetArgs) -> Result<Outcome> {
    if a.policy.is_some() || policy::has_rules(a) {
        anyhow::bail!("give either snapshot ids or a retention policy, not both");
    }
    let repo = open::open_admin(cli, a.dry_run)?;
    let protected = repo.protections()?;
    let mut ids = Vec::new();
    for spec in &a.snapshots {
        if spec == "latest" {
            anyhow::bail!("forget takes explicit snapshot ids, not \"latest\"");
        }
        // By name alone: a damaged snapshot (which stops prune) must be forgettable.
        let id = repo.find_snapshot_id(spec)?;
        if protected.contains(&id) {
            anyhow::bail!("snapshot {} is protected; `kura unprotect {}` first", id.short(), id.short());
        }
        ids.push(id);
    }
    let mut removed = Vec::new();
    for id in &ids {
        if !a.dry_run {
            match repo.store().delete(kura_store::Kind::Snapshot, &id.to_hex()) {
                Ok(()) | Err(kura_store::StoreError::NotFound(_)) => {}
                Err(e) => return Err(kura_repo::RepoError::from(e)).context("removing snapshots"),
            }
        }
        removed.push(id.to_hex());
    }
    if !cli.json && !cli.quiet {
        for r in &removed {
            outln!("{} snapshot {}", if a.dry_run { "would remove" } else { "removed" }, short(r, 8));
        }
    }
    let pruned = match a.prune {
        true => Some(run_prune(cli, &repo, &prune_options(a.dry_run, &a.prune_args)?)?),
        false => None,
    };
    if cli.json {
        json(&j!({ "dry_run": a.dry_run, "removed": removed, "prune": pruned }))?;
    }
    Ok(Outcome::Ok)
}

/// `kura forget`.
pub fn forget(cli: &Cli, a: &ForgetArgs) -> Result<Outcome> {
    if !a.snapshots.is_empty() {
        return forget_ids(cli, a);
    }
    let resolved = policy::resolve(a)?;
    let prune_opts = if a.prune { Some(prune_options(a.dry_run, &a.prune_args)?) } else { None };
    let now = match &a.now {
        Some(t) => crate::cmd::backup::parse_time(t)?,
        None => jiff::Timestamp::now(),
    };
    let repo = open::open_admin(cli, a.dry_run)?;
    let opts = ForgetOptions {
        group_by: resolved.group_by,
        tz: resolved.tz.clone(),
        now,
        host: a.host.clone(),
        tags: a.tag.clone(),
    };
    let (plans, warnings) = forget::plan(&repo, &opts, &|k| resolved.policy_for(k)).context("applying the policy")?;
    for w in &warnings {
        eprintln!("kura: warning: {w}");
    }
    let mut locked = Vec::new();
    let removed = if a.dry_run { Vec::new() } else { forget::remove(&repo, &plans, &mut locked).context("removing snapshots")? };
    for l in &locked {
        eprintln!("kura: {} is locked until {} (S3 Object Lock): kept; a later forget removes it", l.object, l.until);
    }
    if !cli.json && !cli.quiet {
        print_plans(&plans, &resolved.tz, a.dry_run);
    }
    let pruned = match &prune_opts {
        Some(o) => Some(run_prune(cli, &repo, o)?),
        None => None,
    };
    if cli.json {
        json(&j!({ "dry_run": a.dry_run, "groups": plans, "removed": removed, "locked": locked, "prune": pruned }))?;
    }
    Ok(Outcome::Ok)
}

/// `kura protect` / `kura unprotect`.
pub fn protect(cli: &Cli, spec: &str, reason: Option<&str>) -> Result<Outcome> {
    let repo = open::open_admin(cli, false)?;
    let (id, _) = repo.find_snapshot(spec, |_| true)?;
    let changed = match reason {
        Some(r) => repo.protect(&id, r)?,
        None => repo.unprotect(&id)?,
    };
    let state = if reason.is_some() { "protected" } else { "not protected" };
    if cli.json {
        json(&j!({ "id": id.to_hex(), "protected": reason.is_some(), "changed": changed }))?;
    } else if !cli.quiet {
        outln!("snapshot {} is {state}{}", id.short(), if changed { "" } else { " (it already was)" });
    }
    Ok(Outcome::Ok)
}

/// `kura undelete [ID...]`: lists the server's trash, or puts the named snapshots back (a
/// backup token may: it only adds).
pub fn undelete(cli: &Cli, specs: &[String]) -> Result<Outcome> {
    let repo = open::open(cli)?;
    let trashed = repo.trashed()?;
    if specs.is_empty() {
        if cli.json {
            let list: Vec<_> = trashed
                .iter()
                .map(|(id, t)| match t {
                    Ok((rec, snap, _)) => j!({"id": id.to_hex(), "deleted": rec.deleted, "by": rec.by, "time": snap.public.time,
                        "host": snap.public.host, "paths": snap.public.paths, "tags": snap.public.tags}),
                    Err(e) => j!({"id": id.to_hex(), "error": e.to_string()}),
                })
                .collect();
            json(&list)?;
        } else if trashed.is_empty() {
            outln!("nothing to undelete: no deleted snapshot is within an undelete window here");
        } else {
            outln!("{:<8}  {:<20}  {:<8}  {:<20}  {:<12}  paths", "id", "deleted", "by", "time", "host");
            for (id, t) in &trashed {
                match t {
                    Ok((rec, snap, _)) => outln!(
                        "{:<8}  {:<20}  {:<8}  {:<20}  {:<12}  {}",
                        id.short(),
                        &rec.deleted[..rec.deleted.len().min(19)],
                        rec.by,
                        &snap.public.time[..snap.public.time.len().min(19)],
                        snap.public.host,
                        snap.public.paths.join(" ")
                    ),
                    Err(e) => outln!("{:<8}  unreadable: {e}", id.short()),
                }
            }
        }
        return Ok(Outcome::Ok);
    }
    for spec in specs {
        let matches: Vec<_> = trashed.iter().filter(|(id, _)| id.to_hex().starts_with(spec.as_str())).collect();
        let (id, t) = match matches.as_slice() {
            [one] => *one,
            [] => anyhow::bail!("no deleted snapshot matches {spec:?} (see `kura undelete` for the list)"),
            _ => anyhow::bail!(kura_repo::RepoError::Ambiguous(spec.clone())),
        };
        let (rec, _, bytes) = t.as_ref().map_err(|e| anyhow::anyhow!("cannot undelete {}: {e}", id.short()))?;
        match repo.store().put_new(kura_store::Kind::Snapshot, &id.to_hex(), bytes) {
            Ok(()) | Err(kura_store::StoreError::Exists(_)) => {}
            Err(e) => return Err(kura_repo::RepoError::from(e)).with_context(|| format!("undeleting {}", id.short())),
        }
        if !cli.quiet && !cli.json {
            outln!("snapshot {} is back (deleted {} by {})", id.short(), rec.deleted, rec.by);
        }
    }
    Ok(Outcome::Ok)
}
