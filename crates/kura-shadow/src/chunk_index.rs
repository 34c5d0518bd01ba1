//! The journal's chunk index: where each chunk is stored and the newest record naming it.
//! New entries stay in memory until the prune thread writes them out to a redb table, a cache
//! rebuilt from the segments on every writable open, so a standby's memory does not grow with
//! its window. No write to the table runs under the stream's lock: the entries being written
//! stay readable in memory (frozen) until the table holds them.

use crate::ShadowError;
use kura_repo::Id;
use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A journal file (segment or pack) as the index names it: numbered as the journal opens or
/// makes it, so only within one process (the table is rebuilt on every open).
pub(crate) type FileNo = u32;

/// Where a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub file: FileNo,
    pub off: u64,
    pub raw_len: u32,
    pub zlen: u32,
    /// Newest record naming the chunk (0 when none within the window).
    pub last_ref: u64,
}

type Row = (u32, u64, u32, u32, u64);
const TABLE: TableDefinition<[u8; 32], Row> = TableDefinition::new("chunks");

/// Entries kept in memory before they are written out (about 100 B each with the map's slack).
pub(crate) const HOT_ENTRIES: usize = 1 << 16;
/// redb's page cache: lookups of written-out entries are rare (a chunk named again, pruning).
const CACHE_BYTES: usize = 8 << 20;

fn to_row(l: &Loc) -> Row {
    (l.file, l.off, l.raw_len, l.zlen, l.last_ref)
}

fn from_row(r: Row) -> Loc {
    Loc { file: r.0, off: r.1, raw_len: r.2, zlen: r.3, last_ref: r.4 }
}

fn err(path: &Path, e: impl Into<redb::Error>) -> ShadowError {
    match e.into() {
        redb::Error::Io(io) => ShadowError::io(path, io),
        e => ShadowError::Corrupt { what: path.display().to_string(), detail: e.to_string() },
    }
}

/// The entries being written out, and the table entries to remove once they are.
#[derive(Clone)]
struct Frozen {
    entries: Arc<HashMap<Id, Loc>>,
    dead: Arc<Vec<(Id, FileNo)>>,
}

struct Table {
    db: Arc<Database>,
    path: PathBuf,
    /// A snapshot taken after the last write-out (all writes are write-outs).
    read: ReadOnlyTable<[u8; 32], Row>,
    /// Entries of files gone from the journal, to remove from the table at the next write-out.
    dead: Vec<(Id, FileNo)>,
}

/// The index: memory (new entries, then the frozen ones being written), then the table.
pub(crate) struct ChunkIndex {
    hot: HashMap<Id, Loc>,
    frozen: Option<Frozen>,
    table: Option<Table>,
}

/// A write-out, made without the stream's lock ([`IndexWrite::write`]).
pub(crate) struct IndexWrite {
    db: Arc<Database>,
    path: PathBuf,
    frozen: Frozen,
}

/// A read of the table as of the last write-out, usable without the journal.
pub(crate) struct IndexReader {
    path: PathBuf,
    read: Option<ReadOnlyTable<[u8; 32], Row>>,
}

impl IndexReader {
    pub fn get(&self, id: &Id) -> Result<Option<Loc>, ShadowError> {
        match &self.read {
            None => Ok(None),
            Some(t) => Ok(t.get(id.0).map_err(|e| err(&self.path, e))?.map(|g| from_row(g.value()))),
        }
    }
}

impl ChunkIndex {
    /// An index in memory only (read-only opens: a restore's process is short-lived and may
    /// not write where the journal is).
    pub fn memory() -> ChunkIndex {
        ChunkIndex { hot: HashMap::new(), frozen: None, table: None }
    }

    /// An empty index whose table is the file at `path` (whatever was there is removed: the
    /// caller fills it again from the journal's files).
    pub fn create(path: &Path) -> Result<ChunkIndex, ShadowError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ShadowError::io(path, e)),
        }
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|e| err(path, e))?;
        let w = db.begin_write().map_err(|e| err(path, e))?;
        w.open_table(TABLE).map_err(|e| err(path, e))?;
        w.commit().map_err(|e| err(path, e))?;
        let read = db.begin_read().map_err(redb::Error::from).and_then(|r| Ok(r.open_table(TABLE)?)).map_err(|e| err(path, e))?;
        Ok(ChunkIndex { hot: HashMap::new(), frozen: None, table: Some(Table { db: Arc::new(db), path: path.to_path_buf(), read, dead: Vec::new() }) })
    }

    /// The entry for `id` (which may name a file the journal no longer has: then it is dead).
    pub fn get(&self, id: &Id) -> Result<Option<Loc>, ShadowError> {
        if let Some(l) = self.get_memory(id) {
            return Ok(Some(l));
        }
        match &self.table {
            None => Ok(None),
            Some(t) => Ok(t.read.get(id.0).map_err(|e| err(&t.path, e))?.map(|g| from_row(g.value()))),
        }
    }

    /// The entry for `id` if it is in memory (newer than the table's when both are).
    pub fn get_memory(&self, id: &Id) -> Option<Loc> {
        self.hot.get(id).or_else(|| self.frozen.as_ref().and_then(|f| f.entries.get(id))).copied()
    }

    /// Entries in memory whose file is one of `files`.
    pub fn memory_in(&self, files: &[FileNo]) -> HashMap<Id, Loc> {
        let mut out: HashMap<Id, Loc> = HashMap::new();
        if let Some(f) = &self.frozen {
            out.extend(f.entries.iter().filter(|(_, l)| files.contains(&l.file)).map(|(id, l)| (*id, *l)));
        }
        // The hot entry is the newer one.
        for (id, l) in &self.hot {
            if files.contains(&l.file) {
                out.insert(*id, *l);
            } else {
                out.remove(id);
            }
        }
        out
    }

    /// A read of the table as it is now (entries in memory are not in it).
    pub fn reader(&self) -> Result<IndexReader, ShadowError> {
        match &self.table {
            None => Ok(IndexReader { path: PathBuf::new(), read: None }),
            Some(t) => {
                let read = t.db.begin_read().map_err(redb::Error::from).and_then(|r| Ok(r.open_table(TABLE)?)).map_err(|e| err(&t.path, e))?;
                Ok(IndexReader { path: t.path.clone(), read: Some(read) })
            }
        }
    }

    /// Sets the entry for `id` (a new chunk, a chunk moved, or a newer reference).
    pub fn put(&mut self, id: Id, loc: Loc) {
        self.hot.insert(id, loc);
    }

    /// Forgets `id`'s entry when it is in `file` (a file leaving the journal).
    pub fn forget(&mut self, id: Id, file: FileNo) {
        if self.hot.get(&id).is_some_and(|l| l.file == file) {
            self.hot.remove(&id);
        }
        if let Some(t) = &mut self.table {
            t.dead.push((id, file));
        }
    }

    /// Freezes the entries in memory for writing out when at least `min` are waiting (or
    /// again those of a write-out that failed). `None`: nothing to do, or no table.
    pub fn freeze(&mut self, min: usize) -> Option<IndexWrite> {
        let t = self.table.as_mut()?;
        if self.frozen.is_none() {
            if self.hot.len().max(t.dead.len()) < min.max(1) {
                return None;
            }
            self.frozen = Some(Frozen { entries: Arc::new(std::mem::take(&mut self.hot)), dead: Arc::new(std::mem::take(&mut t.dead)) });
        }
        let frozen = self.frozen.clone()?;
        Some(IndexWrite { db: t.db.clone(), path: t.path.clone(), frozen })
    }

    /// A write-out is in the table: the frozen entries leave memory. On error the frozen
    /// entries stay (in memory and readable) for the next try.
    pub fn written(&mut self) -> Result<(), ShadowError> {
        if let Some(t) = &mut self.table {
            t.read = t.db.begin_read().map_err(redb::Error::from).and_then(|r| Ok(r.open_table(TABLE)?)).map_err(|e| err(&t.path, e))?;
            self.frozen = None;
        }
        Ok(())
    }

    /// Entries in memory (the part of the index that grows until a write-out).
    pub fn in_memory(&self) -> usize {
        self.hot.len() + self.frozen.as_ref().map_or(0, |f| f.entries.len())
    }
}

impl IndexWrite {
    /// Writes the frozen entries into the table, then removes entries of files gone (only
    /// those still naming the gone file: a chunk moved meanwhile keeps its new place). Durable
    /// at commit, so redb can reuse the pages it frees.
    pub fn write(self) -> Result<(), ShadowError> {
        let w = self.db.begin_write().map_err(|e| err(&self.path, e))?;
        {
            let mut t = w.open_table(TABLE).map_err(|e| err(&self.path, e))?;
            let mut sorted: Vec<(&Id, &Loc)> = self.frozen.entries.iter().collect();
            // In key order: each B-tree page is visited once.
            sorted.sort_unstable_by_key(|(id, _)| **id);
            for (id, l) in sorted {
                t.insert(id.0, to_row(l)).map_err(|e| err(&self.path, e))?;
            }
            for (id, file) in self.frozen.dead.iter() {
                let gone = t.get(id.0).map_err(|e| err(&self.path, e))?.is_some_and(|g| g.value().0 == *file);
                if gone {
                    t.remove(id.0).map_err(|e| err(&self.path, e))?;
                }
            }
        }
        w.commit().map_err(|e| err(&self.path, e))
    }
}
