//! Point in time, on the standby: the tree as it was at any moment the journal covers,
//! materialised into a new directory (all of it or one path), and the list of changes that
//! finds the moment before a mistake.

use crate::apply::{self, Chunks};
use crate::journal::{Journal, StreamFile};
use crate::{ShadowError, path};
use kura_repo::{Id, NodeKind};
use std::path::Path;

struct ReadOnly<'a>(&'a Journal);

impl Chunks for ReadOnly<'_> {
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        self.0
            .chunk(id)?
            .ok_or_else(|| ShadowError::Corrupt { what: "journal".into(), detail: format!("chunk {} is not in the journal", id.short()) })?
            .read(self.0.id_key())
    }
}

/// Opens a stream's journal read-only (`dir` is the stream's directory, holding `stream.json`).
pub fn open(dir: &Path) -> Result<Journal, ShadowError> {
    if !dir.join("stream.json").exists() {
        return Err(ShadowError::Usage(format!("{} is not a shadow stream's directory (no stream.json)", dir.display())));
    }
    let f = StreamFile::load(dir, false)?;
    Journal::open(&dir.join("journal"), f.id_key(), true)
}

/// What a restore wrote.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Restored {
    /// The newest record included.
    pub seq: u64,
    /// Its receive time (ns), 0 when none.
    pub time_ns: i64,
    /// Files written.
    pub files: u64,
    /// Directories and other entries.
    pub others: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// Writes the tree as of `at_ns` (records received up to then), or the part at and below
/// `only`, into `target`, which must be empty or absent.
pub fn restore(j: &Journal, at_ns: i64, only: Option<&[u8]>, target: &Path) -> Result<Restored, ShadowError> {
    if j.base().seq > 0 && at_ns < j.base().recv_ns {
        return Err(ShadowError::Usage(format!(
            "that moment is older than the journal's window: the oldest moment it can restore is {} (record {})",
            crate::show_time(j.base().recv_ns),
            j.base().seq
        )));
    }
    prepare_target(only, target)?;
    let seq = j.seq_at(at_ns)?;
    let m = j.manifest_at(seq)?;
    write_tree(&m, only, target, &ReadOnly(j), Restored { seq, time_ns: j.time_of(seq)?, ..Restored::default() })
}

/// Which commit of a shadowed SQLite database to restore.
#[derive(Debug, Clone, Copy)]
pub enum Moment {
    /// The newest record received up to then (ns).
    At(i64),
    /// Record (transaction) number N.
    Txid(u64),
}

/// Writes the SQLite database `only` (the stream's only database when `None`) as of a commit
/// into the new file `target`: pages written to a temporary beside it, synced, checked by
/// SQLite's `integrity_check`, then renamed into place.
pub fn restore_sqlite(j: &Journal, when: Moment, only: Option<&[u8]>, target: &Path) -> Result<Restored, ShadowError> {
    let seq = match when {
        Moment::At(t) => {
            if j.base().seq > 0 && t < j.base().recv_ns {
                return Err(ShadowError::Usage(format!("that moment is older than the journal's window: the oldest it can restore is {}", crate::show_time(j.base().recv_ns))));
            }
            j.seq_at(t)?
        }
        Moment::Txid(n) if n > j.head() => return Err(ShadowError::Usage(format!("transaction {n} is past the newest the standby received ({})", j.head()))),
        Moment::Txid(n) if n < j.base().seq => return Err(ShadowError::Usage(format!("transaction {n} is older than the journal's window (it starts at {})", j.base().seq))),
        Moment::Txid(n) => n,
    };
    // A base's parts before its last are no state of the database: a moment within a base
    // restores the state before it; a transaction number of one is refused.
    let is_part = |s: u64| -> Result<bool, ShadowError> { Ok(s > 0 && j.next_after(s - 1)?.is_some_and(|x| x.seq == s && x.op.is_base_part())) };
    let seq = match when {
        Moment::Txid(n) if is_part(n)? => {
            let mut whole = None;
            j.scan(n, |x| {
                if x.op.is_base_part() {
                    return true;
                }
                whole = Some(x.seq);
                false
            })?;
            return Err(ShadowError::Usage(format!(
                "record {n} is a part of a database copy sent in several records, not a transaction{}",
                whole.map(|w| format!(": the copy is whole at record {w}")).unwrap_or_default()
            )));
        }
        _ => {
            let mut s = seq;
            while s > j.base().seq && is_part(s)? {
                s -= 1;
            }
            s
        }
    };
    let m = j.manifest_at(seq)?;
    let dbs: Vec<&Vec<u8>> = m.iter().filter(|(_, n)| crate::sqlite_stream::page_size_of(n).is_some()).map(|(k, _)| k).collect();
    let rel = match (only, dbs.as_slice()) {
        (Some(p), _) => dbs.iter().find(|k| k.as_slice() == p).copied().ok_or_else(|| ShadowError::Usage(format!("{} was not a SQLite database of the stream at record {seq}", path::show(p))))?,
        (None, [one]) => *one,
        (None, []) => return Err(ShadowError::Usage(format!("the stream held no SQLite database at record {seq}"))),
        (None, _) => return Err(ShadowError::Usage(format!("the stream holds {} databases: name one with --path", dbs.len()))),
    };
    let node = m.get(rel).ok_or_else(|| ShadowError::Usage("no database".into()))?;
    if std::fs::symlink_metadata(target).is_ok() {
        return Err(ShadowError::Usage(format!("{} exists: restore into a new file", target.display())));
    }
    let tmp = target.with_file_name(format!("{}{}", apply::TEMP_PREFIX, target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| ShadowError::io(&tmp, e))?;
        let chunks = ReadOnly(j);
        for id in &node.content {
            let b = chunks.chunk(id)?;
            std::io::Write::write_all(&mut f, &b).map_err(|e| ShadowError::io(&tmp, e))?;
        }
        f.sync_all().map_err(|e| ShadowError::io(&tmp, e))?;
        drop(f);
        crate::sqlite_mirror::integrity_check_alone(&tmp).map_err(|e| ShadowError::Corrupt { what: format!("{} as of record {seq}", path::show(rel)), detail: format!("integrity_check: {e}") })?;
        std::fs::rename(&tmp, target).map_err(|e| ShadowError::io(target, e))
    })();
    if written.is_err() {
        for s in ["", "-wal", "-shm"] {
            let mut q = tmp.as_os_str().to_owned();
            q.push(s);
            let _ = std::fs::remove_file(q);
        }
    }
    written?;
    Ok(Restored { seq, time_ns: j.time_of(seq)?, files: 1, others: 0, bytes: node.size })
}

/// Chunks of a branch, or of the stream's journal (a branch stores only what the journal
/// lacked when it was made; pruning keeps the journal's chunks that branches name).
struct Both<'a>(&'a Journal, &'a Journal);

impl Chunks for Both<'_> {
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        match self.0.chunk(id)? {
            Some(h) => h.read(self.0.id_key()),
            None => ReadOnly(self.1).chunk(id),
        }
    }
}

/// Writes branch `name` of the stream in `dir` (a fenced primary's tree, kept when it
/// rejoined), or the part at and below `only`, into `target` (empty or absent).
pub fn restore_branch(dir: &Path, name: &str, only: Option<&[u8]>, target: &Path) -> Result<Restored, ShadowError> {
    let main = open(dir)?;
    let bdir = dir.join("branches").join(name);
    if name.contains('/') || name.starts_with('.') || !bdir.is_dir() {
        let have: Vec<String> = std::fs::read_dir(dir.join("branches")).map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
        return Err(ShadowError::Usage(format!("stream {} has no branch {name:?} (branches: {})", dir.display(), if have.is_empty() { "none".into() } else { have.join(", ") })));
    }
    let b = Journal::open(&bdir, *main.id_key(), true)?;
    if !bdir.join("sealed").exists() {
        tracing::warn!("branch {name} is incomplete (its rejoin was interrupted): restoring what arrived");
    }
    prepare_target(only, target)?;
    let m = b.manifest_at(b.head())?;
    write_tree(&m, only, target, &Both(&b, &main), Restored { seq: b.head(), time_ns: b.oldest_time(), ..Restored::default() })
}

fn write_tree(m: &crate::Manifest, only: Option<&[u8]>, target: &Path, chunks: &dyn Chunks, mut done: Restored) -> Result<Restored, ShadowError> {
    let seq = done.seq;
    let mut dirs = Vec::new();
    let mut w = apply::Writer::new(target);
    for (rel, n) in m.iter() {
        if only.is_some_and(|p| !path::within(rel, p)) {
            continue;
        }
        w.put(rel, n, chunks)?;
        if n.kind == NodeKind::File {
            done.files += 1;
            done.bytes += n.size;
        } else {
            done.others += 1;
        }
        if n.kind == NodeKind::Dir {
            dirs.push((rel, n));
        }
    }
    if let Some(p) = only
        && m.get(p).is_none()
    {
        return Err(ShadowError::Usage(format!("{} did not exist at that time (record {seq})", path::show(p))));
    }
    apply::set_dir_times(target, dirs.into_iter().rev());
    Ok(done)
}

/// Checks `only` and makes sure `target` is empty or absent (creating it).
fn prepare_target(only: Option<&[u8]>, target: &Path) -> Result<(), ShadowError> {
    if let Some(p) = only {
        path::check(p).map_err(ShadowError::Usage)?;
    }
    match std::fs::read_dir(target) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(ShadowError::Usage(format!("{} is not empty: restore into a new directory", target.display())));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(target).map_err(|e| ShadowError::io(target, e)),
        Err(e) => Err(ShadowError::io(target, e)),
    }
}
