//! `kura init`, `kura backup`, `kura check`.

use crate::args::{BackupArgs, CheckArgs, Cli};
use crate::output::{Bar, bytes, json};
use crate::{Outcome, open};
use anyhow::{Context, Result, bail};
use kura_ops::backup::{BackupOptions, backup, backup_stdin};
use kura_ops::check::{CheckOptions, check};
use kura_repo::repo::hostname;
use kura_repo::{KdfParams, Repository};
use std::sync::atomic::AtomicBool;

/// Parses `--time`: RFC 3339, or a civil "YYYY-MM-DD HH:MM[:SS]" in the local time zone.
pub fn parse_time(s: &str) -> Result<jiff::Timestamp> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let dt: jiff::civil::DateTime = s.parse().with_context(|| format!("cannot parse time {s:?}"))?;
    Ok(dt.to_zoned_datetime(jiff::tz::TimeZone::system()).with_context(|| format!("time {s:?}"))?.timestamp())
}

/// `kura init`.
pub fn init(cli: &Cli) -> Result<Outcome> {
    let loc = open::location(cli)?;
    let store = open::create_store(cli, &loc)?;
    let pw = open::password(cli, &loc, true)?;
    let repo = Repository::init(store, &pw, KdfParams::default())?;
    if cli.json {
        json(&serde_json::json!({"repository": loc.describe(), "id": repo.config().id, "version": repo.config().version}))?;
    } else if !cli.quiet {
        outln!("created kura repository {} at {}", crate::output::short(&repo.config().id, 10), loc.describe());
        outln!("keep the password safe: without it the data in this repository cannot be read");
    }
    Ok(Outcome::Ok)
}

/// `kura backup`.
pub fn run(cli: &Cli, a: &BackupArgs, interrupt: &AtomicBool) -> Result<Outcome> {
    if a.stdin && !a.paths.is_empty() {
        bail!("--stdin takes no paths");
    }
    // A standby's mirror: hold its applier between two records for the whole read.
    let mut paths = a.paths.clone();
    let mut tags = a.tag.clone();
    let _hold = match &a.shadow_stream {
        Some(dir) => {
            let f = kura_shadow::journal::StreamFile::load(dir, false).with_context(|| format!("shadow stream {}", dir.display()))?;
            let mirror = f.mirror.clone().with_context(|| format!("shadow stream {} has no mirror yet", dir.display()))?;
            let lock = std::fs::File::open(dir.join(kura_shadow::stream::APPLY_LOCK)).with_context(|| format!("shadow stream {}: is its standby running?", dir.display()))?;
            lock.lock_shared().with_context(|| format!("locking {}", dir.join(kura_shadow::stream::APPLY_LOCK).display()))?;
            // Under the lock the applier wrote its newest record into the lock file (`applied`
            // is noted less often); an applier that never ran leaves only `applied`.
            let number = |p: std::path::PathBuf| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
            let applied = number(dir.join(kura_shadow::stream::APPLY_LOCK)).or_else(|| number(dir.join("applied"))).unwrap_or(0);
            if paths.is_empty() {
                paths.push(mirror);
            }
            tags.push(format!("shadow-record={applied}"));
            if f.primary {
                eprintln!("kura: warning: stream {} was promoted: its mirror is the live copy, written by users while it is read", dir.display());
            }
            Some(lock)
        }
        None => None,
    };
    if !a.stdin && paths.is_empty() {
        bail!("nothing to back up: give one or more paths, or --stdin");
    }
    let time = a.time.as_deref().map(parse_time).transpose()?;
    let repo = open::open_for_backup(cli)?;
    repo.start_session("backup").context("registering the backup session")?;
    for e in repo.load_index()? {
        eprintln!("kura: warning: {e}; its packs are indexed again");
    }
    let opts = BackupOptions {
        paths,
        excludes: a.exclude.clone(),
        exclude_files: a.exclude_file.clone(),
        one_file_system: a.one_file_system,
        tags,
        host: a.host.clone().unwrap_or_else(hostname),
        time,
        parent: a.parent.clone(),
        force: a.force,
        threads: 0,
        record_as: None,
    };
    let bar = Bar::new(cli.quiet, cli.json);
    let res = if a.stdin {
        backup_stdin(&repo, std::io::stdin().lock(), &a.stdin_filename, &opts, &bar, Some(interrupt))
    } else {
        backup(&repo, &opts, &bar, Some(interrupt))
    };
    bar.finish();
    let r = res.context(if a.stdin { "backing up standard input".to_string() } else { "backing up".to_string() })?;
    if cli.json {
        json(&r)?;
    } else if !cli.quiet {
        let s = &r.summary;
        outln!("snapshot {} saved{}", crate::output::short(&r.snapshot, 8), r.parent.as_ref().map(|p| format!(" (parent {})", crate::output::short(p, 8))).unwrap_or_default());
        outln!(
            "files: {} new, {} changed, {} unchanged; {} directories; {} in total",
            s.files_new, s.files_changed, s.files_unchanged, s.dirs, bytes(s.bytes_total)
        );
        outln!(
            "read {}, added {} ({} stored) in {:.2} s",
            bytes(s.bytes_read), bytes(s.bytes_added), bytes(s.bytes_stored), s.seconds
        );
        if r.recovered_packs > 0 {
            outln!("indexed {} pack(s) left by an interrupted backup", r.recovered_packs);
        }
        for c in &r.changed_during_backup {
            outln!("changed while being read (saved as last read): {c}");
        }
    }
    if !r.errors.is_empty() {
        eprintln!("kura: {} source entr{} could not be read and {} not in the snapshot:", r.errors.len(),
            if r.errors.len() == 1 { "y" } else { "ies" }, if r.errors.len() == 1 { "is" } else { "are" });
        for e in &r.errors {
            eprintln!("  {}: {}", e.path, e.error);
        }
        return Ok(Outcome::Partial);
    }
    Ok(Outcome::Ok)
}

/// `kura check`.
pub fn run_check(cli: &Cli, a: &CheckArgs) -> Result<Outcome> {
    let repo = open::open(cli)?;
    open::start_reader_session(&repo, "check")?;
    let subset = a.read_data_subset.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?;
    let opts = CheckOptions { read_data: a.read_data || a.deep || subset.is_some(), deep: a.deep, subset };
    let r = check(&repo, &opts).context("checking")?;
    if cli.json {
        json(&r)?;
    } else {
        if !cli.quiet {
            for w in &r.warnings {
                outln!("warning: {w}");
            }
        }
        for d in &r.damage {
            eprintln!("damaged: {}: {}", d.object, d.problem);
            if !d.snapshots.is_empty() {
                eprintln!("  affects snapshot(s) {}", d.snapshots.join(", "));
            }
            for p in &d.paths {
                eprintln!("  {p}");
            }
        }
        if !cli.quiet {
            outln!(
                "checked {} snapshot(s), {} tree(s), {} pack(s){}",
                r.snapshots, r.trees, r.packs,
                if opts.read_data { format!("; read {} pack(s), {}", r.packs_read, bytes(r.bytes_read)) } else { String::new() }
            );
        }
    }
    if r.ok() {
        if !cli.quiet && !cli.json {
            outln!("no errors were found");
        }
        Ok(Outcome::Ok)
    } else {
        bail!("check found {} damaged object(s): first {}: {}", r.damage.len(), r.damage[0].object, r.damage[0].problem)
    }
}
