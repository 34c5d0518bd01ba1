//! `kura pg`: PostgreSQL's `archive_command` and `restore_command`, base backups and
//! point-in-time restores, on top of [`kura_ops::pg`].

use crate::args::{Cli, PgCluster, PgCommand};
use crate::output::{Bar, bytes, json};
use crate::{Outcome, open};
use anyhow::{Context, Result};
use kura_ops::pg::{self, BaseOptions, PitrOptions};
use kura_repo::Repository;
use kura_repo::repo::hostname;
use kura_store::{LocalStore, Store};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Runs one `kura pg` subcommand.
pub fn run(cli: &Cli, c: &PgCommand, interrupt: &AtomicBool) -> Result<Outcome> {
    match c {
        PgCommand::WalPush { path, cluster } => wal_push(cli, path, cluster),
        PgCommand::WalFetch { name, dest, cluster } => wal_fetch(cli, name, dest, cluster),
        PgCommand::Backup { cluster, staging, pg_basebackup, args } => base(cli, cluster, staging.as_deref(), pg_basebackup.as_deref(), args, interrupt),
        PgCommand::Restore { cluster, target, at, no_archive } => restore(cli, cluster, target, at.as_deref(), *no_archive, interrupt),
    }
}

/// The repository with a cache of its snapshot objects under the user's cache directory (one
/// per repository id), when there is one: wal-push and wal-fetch look through every snapshot.
fn cached(repo: Repository) -> Repository {
    let Some(dir) = dirs::cache_dir() else { return repo };
    let dir = dir.join("kura").join(format!("snapshots-{}", repo.config().id));
    let made = || -> Result<LocalStore, kura_store::StoreError> {
        let s = LocalStore::create(&dir)?;
        s.put_new(kura_store::Kind::Config, "config", b"kura snapshot cache\n")?;
        Ok(s)
    };
    match LocalStore::open(&dir).or_else(|_| made()) {
        Ok(store) => repo.with_snapshot_cache(Arc::new(store)),
        Err(_) => repo,
    }
}

fn wal_push(cli: &Cli, path: &Path, c: &PgCluster) -> Result<Outcome> {
    let repo = cached(open::open_for_backup(cli)?);
    repo.start_session("pg wal-push").context("registering the session")?;
    for e in repo.load_index()? {
        eprintln!("kura: warning: {e}; its packs are indexed again");
    }
    let host = c.host.clone().unwrap_or_else(hostname);
    let p = pg::wal_push(&repo, path, &c.cluster, &host).with_context(|| format!("archiving {}", path.display()))?;
    if cli.json {
        json(&p)?;
    } else if !cli.quiet {
        let how = if p.stored { "archived" } else { "already archived" };
        outln!("{how} {} ({}) in snapshot {}", p.name, bytes(p.bytes), crate::output::short(&p.snapshot, 8));
    }
    Ok(Outcome::Ok)
}

fn wal_fetch(cli: &Cli, name: &str, dest: &Path, c: &PgCluster) -> Result<Outcome> {
    let repo = cached(open::open_indexed(cli, "pg wal-fetch")?);
    match pg::wal_fetch(&repo, name, &c.cluster, c.host.as_deref(), dest).with_context(|| format!("fetching WAL file {name}"))? {
        Some(snap) => {
            if cli.json {
                json(&serde_json::json!({"name": name, "snapshot": snap, "dest": dest}))?;
            } else if !cli.quiet {
                outln!("fetched {name} from snapshot {}", crate::output::short(&snap, 8));
            }
            Ok(Outcome::Ok)
        }
        None => {
            // PostgreSQL asks for files past the end of the archive as a matter of course: this
            // is how its recovery learns where to stop, not an error.
            if !cli.quiet {
                eprintln!("kura: WAL file {name} of cluster {} is not in the archive", c.cluster);
            }
            Ok(Outcome::Missing)
        }
    }
}

/// Debian installs pg_basebackup per major version and only some of them on PATH.
fn find_pg_basebackup() -> PathBuf {
    let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("pg_basebackup").is_file()));
    if on_path {
        return PathBuf::from("pg_basebackup");
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()))
        .filter(|v| Path::new(&format!("/usr/lib/postgresql/{v}/bin/pg_basebackup")).is_file())
        .max();
    match newest {
        Some(v) => PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/pg_basebackup")),
        None => PathBuf::from("pg_basebackup"),
    }
}

fn base(cli: &Cli, c: &PgCluster, staging: Option<&Path>, program: Option<&Path>, args: &[String], interrupt: &AtomicBool) -> Result<Outcome> {
    pg::check_cluster(&c.cluster)?;
    let repo = open::open_for_backup(cli)?;
    repo.start_session("pg backup").context("registering the session")?;
    for e in repo.load_index()? {
        eprintln!("kura: warning: {e}; its packs are indexed again");
    }
    let o = BaseOptions {
        cluster: c.cluster.clone(),
        host: c.host.clone().unwrap_or_else(hostname),
        staging: match staging {
            Some(s) => s.to_path_buf(),
            // Not the shared temporary directory: another user could create the name first and
            // read the database copy pg_basebackup writes into it.
            None => dirs::cache_dir().context("cannot find your cache directory (set HOME or XDG_CACHE_HOME), or give --staging")?.join("kura").join(format!("pg-{}-base", c.cluster)),
        },
        program: program.map(Path::to_path_buf).unwrap_or_else(find_pg_basebackup),
        args: args.to_vec(),
    };
    let bar = Bar::new(cli.quiet, cli.json);
    let r = pg::base_backup(&repo, &o, &bar, Some(interrupt));
    bar.finish();
    let r = r.with_context(|| format!("base backup of cluster {}", c.cluster))?;
    if cli.json {
        json(&r)?;
    } else if !cli.quiet {
        let s = &r.summary;
        outln!("base backup of cluster {} saved as snapshot {}", c.cluster, crate::output::short(&r.snapshot, 8));
        outln!("read {} in {} file(s), added {} ({} stored) in {:.2} s", bytes(s.bytes_read), s.files_new + s.files_changed + s.files_unchanged, bytes(s.bytes_added), bytes(s.bytes_stored), s.seconds);
    }
    if !r.errors.is_empty() {
        for e in &r.errors {
            eprintln!("  {}: {}", e.path, e.error);
        }
        anyhow::bail!("base backup of cluster {}: {} file(s) of pg_basebackup's copy could not be read; the snapshot is incomplete", c.cluster, r.errors.len());
    }
    Ok(Outcome::Ok)
}

/// A word for `/bin/sh`, which runs `restore_command`.
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The `restore_command` that fetches from the repository this command opened, with the same
/// credentials options (never a secret itself: a password or token is passed as its file).
fn restore_command(cli: &Cli, c: &PgCluster) -> Result<String> {
    let exe = std::env::current_exe().context("finding the kura program")?;
    let mut words = vec![exe.to_string_lossy().into_owned(), "-q".into()];
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().into_owned();
    if let Some(r) = &cli.repo {
        let r = if r.contains("://") { r.clone() } else { abs(Path::new(r)) };
        words.extend(["-r".into(), r]);
    }
    if let Some(f) = &cli.password_file {
        words.extend(["--password-file".into(), abs(f)]);
    }
    if let Some(f) = &cli.token_file {
        words.extend(["--token-file".into(), abs(f)]);
    }
    if let Some(f) = &cli.fingerprint {
        words.extend(["--fingerprint".into(), f.clone()]);
    }
    words.extend(["pg".into(), "wal-fetch".into(), "%f".into(), "%p".into(), "--cluster".into(), c.cluster.clone()]);
    if let Some(h) = &c.host {
        words.extend(["--host".into(), h.clone()]);
    }
    // %f and %p are PostgreSQL's to fill in: quoting them would hide them from it.
    Ok(words.iter().map(|w| if w.starts_with('%') { w.clone() } else { sh_quote(w) }).collect::<Vec<_>>().join(" "))
}

fn restore(cli: &Cli, c: &PgCluster, target: &Path, at: Option<&str>, no_archive: bool, interrupt: &AtomicBool) -> Result<Outcome> {
    let at = at.map(crate::cmd::backup::parse_time).transpose()?;
    let repo = open::open_indexed(cli, "pg restore")?;
    let o = PitrOptions { cluster: c.cluster.clone(), host: c.host.clone(), target: target.to_path_buf(), at, restore_command: restore_command(cli, c)?, no_archive };
    let bar = Bar::new(cli.quiet, cli.json);
    let r = pg::pitr(&repo, &o, &bar, Some(interrupt));
    bar.finish();
    let r = r.with_context(|| format!("restoring cluster {} into {}", c.cluster, target.display()))?;
    for w in &r.restore.warnings {
        eprintln!("kura: warning: {w}");
    }
    if cli.json {
        json(&r)?;
    } else if !cli.quiet {
        outln!("restored base backup {} (taken {}) of cluster {} into {}: {} file(s), {}", crate::output::short(&r.base, 8), r.base_time, c.cluster, target.display(), r.restore.files_restored, bytes(r.restore.bytes));
        match &r.recovery_target_time {
            Some(t) => outln!("start PostgreSQL on {}: it replays the archive to {t} and then promotes", target.display()),
            None => outln!("start PostgreSQL on {}: it replays the whole archive and then promotes", target.display()),
        }
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn shell_words() {
        assert_eq!(sh_quote("/usr/bin/kura"), "/usr/bin/kura");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }
}
