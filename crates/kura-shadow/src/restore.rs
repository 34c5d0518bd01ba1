//! Point in time, on the standby: the tree as it was at any moment the journal covers,
//! materialised into a new directory (all of it or one path), and the list of changes that
//! finds the moment before a mistake.

use crate::apply::{self, Chunks};
use crate::journal::{Entry, Journal, StreamFile};
use crate::{ShadowError, path};
use kura_repo::{Id, NodeKind};
use std::path::Path;

struct ReadOnly<'a>(&'a Journal);

impl Chunks for ReadOnly<'_> {
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        self.0
            .chunk(id)
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
    let seq = j.seq_at(at_ns);
    let m = j.manifest_at(seq);
    write_tree(&m, only, target, &ReadOnly(j), Restored { seq, time_ns: j.time_of(seq), ..Restored::default() })
}

/// Chunks of a branch, or of the stream's journal (a branch stores only what the journal
/// lacked when it was made; pruning keeps the journal's chunks that branches name).
struct Both<'a>(&'a Journal, &'a Journal);

impl Chunks for Both<'_> {
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        match self.0.chunk(id) {
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
    let m = b.manifest_at(b.head());
    write_tree(&m, only, target, &Both(&b, &main), Restored { seq: b.head(), time_ns: b.oldest_time(), ..Restored::default() })
}

fn write_tree(m: &crate::Manifest, only: Option<&[u8]>, target: &Path, chunks: &dyn Chunks, mut done: Restored) -> Result<Restored, ShadowError> {
    let seq = done.seq;
    let mut dirs = Vec::new();
    for (rel, n) in m.iter() {
        if only.is_some_and(|p| !path::within(rel, p)) {
            continue;
        }
        apply::put(target, rel, n, chunks)?;
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

/// The records touching `only` (all when `None`) received at or after `since_ns`.
pub fn log<'a>(j: &'a Journal, only: Option<&'a [u8]>, since_ns: i64) -> Vec<&'a Entry> {
    match only {
        Some(p) => j.touching(p).filter(|e| e.recv_ns >= since_ns).collect(),
        None => j.entries().iter().filter(|e| e.recv_ns >= since_ns).collect(),
    }
}
