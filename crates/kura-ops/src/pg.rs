//! PostgreSQL continuous archiving into a repository: WAL files in and out by name (what
//! `archive_command` and `restore_command` call), base backups through `pg_basebackup`, and the
//! data directory of a point-in-time restore. Every piece is an ordinary snapshot, so
//! generations, pulls, checks and drills treat a database like any other data.

use crate::backup::{BackupOptions, BackupResult, backup, backup_stdin};
use crate::progress::{NoProgress, Progress};
use crate::restore::{RestoreOptions, RestoreResult, restore};
use crate::OpsError;
use jiff::Timestamp;
use kura_repo::{Id, NodeKind, Repository, Snapshot};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Tag of every WAL snapshot.
pub const WAL_TAG: &str = "pg-wal";
/// Tag of every base backup.
pub const BASE_TAG: &str = "pg-base";

/// Whether `name` is a file PostgreSQL archives: a segment (24 upper-case hex digits), a
/// `.partial` segment, a timeline `.history` or a backup history `.backup` file. Anything else
/// is refused, which also keeps a name from ever reaching outside the directory it lands in.
pub fn is_wal_name(name: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    if !name.is_ascii() {
        return false;
    }
    if let Some(seg) = name.strip_suffix(".partial") {
        return hex(seg, 24);
    }
    if let Some(tl) = name.strip_suffix(".history") {
        return hex(tl, 8);
    }
    if let Some(b) = name.strip_suffix(".backup") {
        return b.len() == 33 && hex(&b[..24], 24) && b.as_bytes()[24] == b'.' && hex(&b[25..], 8);
    }
    hex(name, 24)
}

/// The WAL position a file covers, as 16 hex digits that compare as numbers (the timeline is
/// left out: positions only grow from one timeline to the next). `None` for a timeline
/// `.history` file, which every later timeline needs, and for any other name.
pub fn wal_position(name: &str) -> Option<&str> {
    (is_wal_name(name) && !name.ends_with(".history")).then(|| &name[8..24])
}

/// A snapshot's WAL file name and cluster, when it is a WAL snapshot.
pub fn wal_of(tags: &[String]) -> Option<(&str, &str)> {
    if !tags.iter().any(|t| t == WAL_TAG) {
        return None;
    }
    let name = tags.iter().find_map(|t| t.strip_prefix("wal="))?;
    let cluster = tags.iter().find_map(|t| t.strip_prefix("pg-cluster="))?;
    Some((name, cluster))
}

/// A base backup's cluster and the WAL position it replays from (`None`: not recorded, so it
/// may need the whole archive).
pub fn base_of(tags: &[String]) -> Option<(&str, Option<&str>)> {
    if !tags.iter().any(|t| t == BASE_TAG) {
        return None;
    }
    let cluster = tags.iter().find_map(|t| t.strip_prefix("pg-cluster="))?;
    let start = tags.iter().find_map(|t| t.strip_prefix("pg-start-wal=")).and_then(wal_position);
    Some((cluster, start))
}

/// Refuses a cluster name that could not stand in a tag and a path.
pub fn check_cluster(cluster: &str) -> Result<(), OpsError> {
    let ok = !cluster.is_empty() && cluster.len() <= 64 && cluster.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok { Ok(()) } else { Err(OpsError::Invalid(format!("cluster name {cluster:?} must be 1-64 letters, digits, '_', '.' or '-'"))) }
}

/// The path WAL snapshots record: one retention group per host and cluster.
pub fn wal_path(cluster: &str) -> String {
    format!("/postgresql/{cluster}/wal")
}

fn cluster_tag(cluster: &str) -> String {
    format!("pg-cluster={cluster}")
}

fn wal_tag(name: &str) -> String {
    format!("wal={name}")
}

/// The newest readable snapshot of `cluster` (from `host`, if given) with tag `tag` that
/// `keep` accepts. When none is found and some snapshot could not be read, that error is
/// returned instead: "not archived" must never be said of a file that may sit in a damaged
/// snapshot (PostgreSQL would end its recovery early on it).
fn newest_with(repo: &Repository, cluster: &str, host: Option<&str>, tag: &str, keep: &dyn Fn(&Snapshot) -> bool) -> Result<Option<(Id, Snapshot)>, OpsError> {
    let ctag = cluster_tag(cluster);
    let mut best: Option<(Id, Snapshot)> = None;
    let mut problem = None;
    // Only the public parts of the others are read: an archive holds thousands of snapshots
    // and PostgreSQL runs this once per WAL file.
    let wanted = |p: &kura_repo::SnapshotPublic| p.tags.iter().any(|x| x == tag) && p.tags.contains(&ctag) && host.is_none_or(|h| p.host == h);
    for (id, s) in repo.snapshots_where(&wanted)? {
        match s {
            Ok(s) => {
                if keep(&s) && best.as_ref().is_none_or(|(_, b)| s.time() >= b.time()) {
                    best = Some((id, s));
                }
            }
            Err(e) => problem = problem.or(Some(e)),
        }
    }
    match (best, problem) {
        (Some(b), _) => Ok(Some(b)),
        (None, Some(e)) => Err(e.into()),
        (None, None) => Ok(None),
    }
}

/// The whole content of the file `name` at the root of a WAL snapshot, each blob checked
/// against its id as it is read.
fn wal_bytes(repo: &Repository, id: &Id, snap: &Snapshot, name: &str) -> Result<Vec<u8>, OpsError> {
    let tree = repo.read_tree(&snap.body.tree)?;
    let node = tree
        .nodes
        .iter()
        .find(|n| n.name == name.as_bytes() && n.kind == NodeKind::File)
        .ok_or_else(|| OpsError::Unsafe(format!("snapshot {} is tagged {} but holds no file {name}", id.short(), wal_tag(name))))?;
    let mut out = Vec::with_capacity(node.size.min(1 << 30) as usize);
    for b in &node.content {
        out.extend_from_slice(&repo.read_blob(b)?);
    }
    if out.len() as u64 != node.size {
        return Err(OpsError::Unsafe(format!("snapshot {}: {name} holds {} bytes, its record says {}", id.short(), out.len(), node.size)));
    }
    Ok(out)
}

/// What [`wal_push`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    /// The file's name.
    pub name: String,
    /// The snapshot holding it.
    pub snapshot: String,
    /// False when the same bytes were archived before (PostgreSQL retries a file after a
    /// crash that lost its `.done` mark): nothing was written.
    pub stored: bool,
    /// Its size.
    pub bytes: u64,
}

/// Archives the WAL file `file` as a snapshot of `cluster` from `host`. The same bytes archived
/// before are success; other bytes under an archived name are refused (PostgreSQL's rule for an
/// `archive_command`: never overwrite an archived file).
pub fn wal_push(repo: &Repository, file: &Path, cluster: &str, host: &str) -> Result<Pushed, OpsError> {
    check_cluster(cluster)?;
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_wal_name(n))
        .ok_or_else(|| OpsError::Invalid(format!("{} is not a WAL file name PostgreSQL archives", file.display())))?;
    let data = std::fs::read(file).map_err(|e| OpsError::io("cannot read", file, e))?;
    if let Some((id, snap)) = newest_with(repo, cluster, Some(host), &wal_tag(name), &|_| true)? {
        if wal_bytes(repo, &id, &snap, name)? == data {
            return Ok(Pushed { name: name.into(), snapshot: id.to_hex(), stored: false, bytes: data.len() as u64 });
        }
        return Err(OpsError::Invalid(format!(
            "WAL file {name} of cluster {cluster} is archived already (snapshot {}) with other contents; refusing to archive a second version",
            id.short()
        )));
    }
    let opts = BackupOptions {
        host: host.into(),
        tags: vec![WAL_TAG.into(), cluster_tag(cluster), wal_tag(name)],
        record_as: Some(wal_path(cluster)),
        threads: 1,
        ..Default::default()
    };
    let r = backup_stdin(repo, &data[..], name, &opts, &NoProgress, None)?;
    Ok(Pushed { name: name.into(), snapshot: r.snapshot, stored: true, bytes: data.len() as u64 })
}

/// Writes the archived WAL file `name` of `cluster` to `dest` (a temporary file beside it,
/// synced, then renamed: PostgreSQL never sees half a segment). `Ok(None)` when it was never
/// archived, which is how PostgreSQL learns where the archive ends.
pub fn wal_fetch(repo: &Repository, name: &str, cluster: &str, host: Option<&str>, dest: &Path) -> Result<Option<String>, OpsError> {
    check_cluster(cluster)?;
    if !is_wal_name(name) {
        return Err(OpsError::Invalid(format!("{name:?} is not a WAL file name PostgreSQL archives")));
    }
    let Some((id, snap)) = newest_with(repo, cluster, host, &wal_tag(name), &|_| true)? else {
        return Ok(None);
    };
    let bytes = wal_bytes(repo, &id, &snap, name)?;
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{file_name}.kura-tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        OpsError::io("cannot write", dest, e)
    })?;
    Ok(Some(id.to_hex()))
}

/// How to take a base backup.
#[derive(Debug, Clone)]
pub struct BaseOptions {
    /// Cluster name (tags and groups the snapshot).
    pub cluster: String,
    /// Host recorded.
    pub host: String,
    /// Where `pg_basebackup` writes before kura reads it; the same path every time, so each
    /// base backup's parent is the previous one and the snapshots form one group.
    pub staging: PathBuf,
    /// The `pg_basebackup` program.
    pub program: PathBuf,
    /// Further arguments for it (connection: `-h`, `-p`, `-U`, `-d`).
    pub args: Vec<String>,
}

/// Empties the staging directory if it holds what an earlier, interrupted base backup left;
/// refuses anything else (never deletes a directory kura did not fill).
fn clear_staging(dir: &Path) -> Result<(), OpsError> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(OpsError::io("cannot read", dir, e)),
    };
    if entries.next().is_none() {
        return Ok(());
    }
    if dir.join("backup_label").is_file() || dir.join("PG_VERSION").is_file() {
        return std::fs::remove_dir_all(dir).map_err(|e| OpsError::io("cannot clear the staging directory", dir, e));
    }
    Err(OpsError::Invalid(format!(
        "staging directory {} is not empty and is not a base backup kura left; empty it or choose another --staging",
        dir.display()
    )))
}

/// `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` in a `backup_label`.
fn start_segment(label: &str) -> Option<&str> {
    let line = label.lines().find(|l| l.starts_with("START WAL LOCATION:"))?;
    let seg = line.split("(file ").nth(1)?.trim_end_matches(')');
    is_wal_name(seg).then_some(seg)
}

/// Takes a base backup with `pg_basebackup` (plain format, the WAL it needs streamed beside it,
/// so it restores even without the archive) into the staging directory, backs that up as a
/// snapshot tagged `pg-base`, and removes the staging copy whatever happened.
pub fn base_backup(repo: &Repository, o: &BaseOptions, progress: &dyn Progress, interrupt: Option<&AtomicBool>) -> Result<BackupResult, OpsError> {
    check_cluster(&o.cluster)?;
    clear_staging(&o.staging)?;
    if let Some(parent) = o.staging.parent() {
        std::fs::create_dir_all(parent).map_err(|e| OpsError::io("cannot create", parent, e))?;
    }
    let result = (|| {
        let out = std::process::Command::new(&o.program)
            .arg("-D")
            .arg(&o.staging)
            .args(["-F", "p", "-X", "stream", "-c", "fast", "--no-password"])
            .args(&o.args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| OpsError::io("cannot run", &o.program, e))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            return Err(OpsError::Tool(format!("{} failed ({}): {last}", o.program.display(), out.status)));
        }
        let label = std::fs::read_to_string(o.staging.join("backup_label")).map_err(|e| OpsError::io("cannot read", o.staging.join("backup_label"), e))?;
        let mut tags = vec![BASE_TAG.to_string(), cluster_tag(&o.cluster)];
        if let Some(seg) = start_segment(&label) {
            tags.push(format!("pg-start-wal={seg}"));
        }
        let opts = BackupOptions { paths: vec![o.staging.clone()], host: o.host.clone(), tags, ..Default::default() };
        backup(repo, &opts, progress, interrupt)
    })();
    // The staging copy is the whole database in plain files: it must not stay behind.
    if o.staging.join("PG_VERSION").is_file() || o.staging.join("backup_label").is_file() {
        let _ = std::fs::remove_dir_all(&o.staging);
    }
    result
}

/// How to prepare a point-in-time restore.
#[derive(Debug, Clone)]
pub struct PitrOptions {
    /// Cluster name.
    pub cluster: String,
    /// Only base backups from this host.
    pub host: Option<String>,
    /// The new data directory (absent or empty).
    pub target: PathBuf,
    /// Recover to this moment; `None`: to the end of the archive.
    pub at: Option<Timestamp>,
    /// The `restore_command` PostgreSQL will run (a `kura pg wal-fetch` with this repository).
    pub restore_command: String,
    /// Turn archiving off in the copy: a trial restore must not archive its new timeline into
    /// the repository, where a later restore "to the end" would follow it instead of the
    /// primary's.
    pub no_archive: bool,
}

/// What [`pitr`] prepared.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PitrResult {
    /// The base backup restored.
    pub base: String,
    /// Its time.
    pub base_time: String,
    /// The recovery target written, as PostgreSQL reads it.
    pub recovery_target_time: Option<String>,
    /// Counters of the restore.
    pub restore: RestoreResult,
}

/// The subtree at the absolute `path` of a snapshot's tree.
fn subtree(repo: &Repository, root: Id, path: &str) -> Result<Id, OpsError> {
    let mut cur = root;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let t = repo.read_tree(&cur)?;
        cur = t
            .nodes
            .iter()
            .find(|n| n.name == part.as_bytes() && n.kind == NodeKind::Dir)
            .and_then(|n| n.subtree)
            .ok_or_else(|| OpsError::NoSuchPath(path.to_string()))?;
    }
    Ok(cur)
}

/// A time as PostgreSQL's `recovery_target_time` reads it (microseconds, UTC).
pub fn pg_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// A string as a PostgreSQL configuration value.
fn pg_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Restores the newest base backup of the cluster taken before `at` into `target` and sets it up
/// to replay the archive to `at` (`recovery.signal`, `restore_command`, the target, promotion
/// when reached): starting PostgreSQL on `target` then performs the point-in-time recovery.
pub fn pitr(repo: &Repository, o: &PitrOptions, progress: &dyn Progress, interrupt: Option<&AtomicBool>) -> Result<PitrResult, OpsError> {
    check_cluster(&o.cluster)?;
    match std::fs::read_dir(&o.target).map(|mut e| e.next().is_some()) {
        Ok(true) => {
            return Err(OpsError::Invalid(format!("target {} is not empty; a data directory is restored into an empty one", o.target.display())));
        }
        Ok(false) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(OpsError::io("cannot read", &o.target, e)),
    }
    let (id, snap) = newest_with(repo, &o.cluster, o.host.as_deref(), BASE_TAG, &|s| o.at.is_none_or(|t| s.time() <= t))?.ok_or_else(|| {
        OpsError::Invalid(match o.at {
            Some(t) => format!("no base backup of cluster {} was taken before {t}", o.cluster),
            None => format!("no base backup of cluster {}", o.cluster),
        })
    })?;
    let root = snap.public.paths.first().ok_or_else(|| OpsError::Unsafe(format!("base backup {} records no path", id.short())))?;
    let tree = subtree(repo, snap.body.tree, root)?;
    let r = restore(repo, &tree, &RestoreOptions { target: o.target.clone(), include: Vec::new(), overwrite: false }, progress, interrupt)?;
    // PostgreSQL refuses a data directory others can read.
    std::fs::set_permissions(&o.target, std::fs::Permissions::from_mode(0o700)).map_err(|e| OpsError::io("cannot set the mode of", &o.target, e))?;
    let target_time = o.at.map(pg_time);
    let mut conf = format!("\n# Added by kura pg restore: replay the archive from base backup {}.\nrestore_command = {}\n", id.short(), pg_quote(&o.restore_command));
    if let Some(t) = &target_time {
        conf.push_str(&format!("recovery_target_time = {}\nrecovery_target_action = 'promote'\n", pg_quote(t)));
    }
    if o.no_archive {
        conf.push_str("archive_mode = off\n");
    }
    let auto = o.target.join("postgresql.auto.conf");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&auto)?;
        f.write_all(conf.as_bytes())?;
        f.sync_all()?;
        // Last: without it PostgreSQL would start as the primary it was, replaying nothing.
        let sig = std::fs::File::create(o.target.join("recovery.signal"))?;
        sig.sync_all()
    };
    write().map_err(|e| OpsError::io("cannot write the recovery settings into", &o.target, e))?;
    Ok(PitrResult { base: id.to_hex(), base_time: snap.public.time.clone(), recovery_target_time: target_time, restore: r })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names() {
        for ok in ["000000010000000000000002", "000000010000000000000002.partial", "00000002.history", "000000010000000000000002.00000028.backup"] {
            assert!(is_wal_name(ok), "{ok}");
        }
        for bad in ["", "../000000010000000000000002", "00000001000000000000000g", "000000010000000000000002/", "0000000100000000000000020", "x.history", "000000010000000000000002.0000002.backup", "ééééééééééééééééééééééééé.backup", "000000010000000000000002.00000028.backupx", "RECOVERYXLOG"] {
            assert!(!is_wal_name(bad), "{bad}");
        }
    }

    #[test]
    fn backup_label_start() {
        let l = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n";
        assert_eq!(start_segment(l), Some("000000010000000000000002"));
        assert_eq!(start_segment("garbage"), None);
    }

    #[test]
    fn quoting_and_times() {
        assert_eq!(pg_quote("a'b"), "'a''b'");
        assert_eq!(pg_time("2026-12-06T12:00:01.5Z".parse().unwrap()), "2026-12-06 12:00:01.500000+00");
        assert!(check_cluster("main").is_ok());
        assert!(check_cluster("a/b").is_err());
        assert!(check_cluster("").is_err());
    }

    proptest::proptest! {
        #[test]
        fn name_checks_never_panic(s in "\\PC{0,40}") {
            let _ = is_wal_name(&s);
            let _ = start_segment(&s);
        }
    }
}
