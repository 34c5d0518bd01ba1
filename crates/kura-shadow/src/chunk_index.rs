//! The journal's chunk index: where each chunk is stored. New entries stay in memory until
//! the prune thread writes them out as a sorted run (a file without a name, made and unlinked
//! at once, so a killed process leaves nothing; rebuilt from the segments on every open); runs
//! are merged by size tiers, so a lookup reads a handful of blocks, and memory keeps one key
//! per block. Nothing is written under the stream's lock, and an append looks nothing up.
//! Every entry names a copy of the chunk as it was stored (checked by its id when read): a
//! lookup answers the newest entry whose file is still held, so runs can merge in any order.
//!
//! Measured against a redb table first (bench/sqlite-shadow.sh, 1,000 commits/s): random keys
//! made each write-out rewrite most of the B-tree's leaves, about 2.7 times the journal's own
//! bytes; runs write each 52-byte entry once per tier.

use crate::ShadowError;
use kura_repo::Id;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// A journal file (segment or pack) as the index names it: numbered as the journal opens or
/// makes it, so only within one process (runs are rebuilt on every open).
pub(crate) type FileNo = u32;

/// Where a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub file: FileNo,
    pub off: u64,
    pub raw_len: u32,
    pub zlen: u32,
}

/// Entries kept in memory before they are written out (about 100 B each with the map's slack).
pub(crate) const HOT_ENTRIES: usize = 1 << 16;
/// An entry in a run: id, file, offset, plain and stored length.
const REC: usize = 32 + 4 + 8 + 4 + 4;
/// Entries per block: memory keeps each block's first id, a lookup reads one block per run.
const BLOCK: usize = 128;
/// Runs of up to TIER_BASE entries are tier 0; each tier holds runs TIER_FANOUT times larger,
/// and TIER_FANOUT runs of one tier merge into one of the next.
const TIER_BASE: u64 = 1 << 14;
const TIER_FANOUT: usize = 4;

fn encode(id: &Id, l: &Loc, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&l.file.to_le_bytes());
    out.extend_from_slice(&l.off.to_le_bytes());
    out.extend_from_slice(&l.raw_len.to_le_bytes());
    out.extend_from_slice(&l.zlen.to_le_bytes());
}

fn decode(b: &[u8]) -> (Id, Loc) {
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[..32]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[36..44]);
    (Id(id), Loc { file: u32_at(32), off: u64::from_le_bytes(off), raw_len: u32_at(44), zlen: u32_at(48) })
}

/// A sorted run of entries in an unlinked file.
pub(crate) struct Run {
    file: File,
    path: PathBuf,
    len: u64,
    /// First id of each block.
    fences: Vec<Id>,
    /// The files its entries name (sorted): a run naming none the journal still has is dropped.
    files: Vec<FileNo>,
}

impl Run {
    /// Writes `entries` (sorted by id, each id once) as a run in the first of `dirs` that takes
    /// a file.
    fn write(dirs: &[PathBuf], entries: impl Iterator<Item = (Id, Loc)>) -> Result<Run, ShadowError> {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut last = None;
        let mut made = None;
        for dir in dirs {
            let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.join(format!(".tmp-index-{}-{n}", std::process::id()));
            match std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
                Ok(f) => {
                    // Unlinked at once: the run lives as long as its handle.
                    let _ = std::fs::remove_file(&path);
                    made = Some((f, path));
                    break;
                }
                Err(e) => last = Some(ShadowError::io(&path, e)),
            }
        }
        let Some((file, path)) = made else {
            return Err(last.unwrap_or_else(|| ShadowError::Usage("no directory for the chunk index".into())));
        };
        let (mut buf, mut at, mut len) = (Vec::with_capacity(1 << 20), 0u64, 0u64);
        let (mut fences, mut files) = (Vec::new(), Vec::new());
        let mut dedup_at = 4096;
        for (id, l) in entries {
            if len % BLOCK as u64 == 0 {
                fences.push(id);
            }
            files.push(l.file);
            if files.len() >= dedup_at {
                files.sort_unstable();
                files.dedup();
                dedup_at = files.len() * 2 + 4096;
            }
            encode(&id, &l, &mut buf);
            len += 1;
            if buf.len() >= 1 << 20 {
                file.write_all_at(&buf, at).map_err(|e| ShadowError::io(&path, e))?;
                at += buf.len() as u64;
                buf.clear();
            }
        }
        file.write_all_at(&buf, at).map_err(|e| ShadowError::io(&path, e))?;
        files.sort_unstable();
        files.dedup();
        Ok(Run { file, path, len, fences, files })
    }

    fn get(&self, id: &Id) -> Result<Option<Loc>, ShadowError> {
        let b = self.fences.partition_point(|f| f <= id);
        if b == 0 {
            return Ok(None);
        }
        let first = (b - 1) * BLOCK;
        let n = BLOCK.min((self.len - first as u64) as usize);
        let mut block = vec![0u8; n * REC];
        self.file.read_exact_at(&mut block, (first * REC) as u64).map_err(|e| ShadowError::io(&self.path, e))?;
        let recs: Vec<&[u8]> = block.chunks_exact(REC).collect();
        Ok(recs.binary_search_by(|r| r[..32].cmp(&id.0[..])).ok().map(|i| decode(recs[i]).1))
    }

    fn tier(&self) -> u32 {
        let (mut t, mut cap) = (0, TIER_BASE);
        while self.len > cap {
            t += 1;
            cap = cap.saturating_mul(TIER_FANOUT as u64);
        }
        t
    }
}

/// Reads a run from the start, a MiB at a time.
struct RunReader<'a> {
    run: &'a Run,
    buf: Vec<u8>,
    pos: usize,
    next: u64,
}

impl RunReader<'_> {
    fn peek(&mut self) -> Result<Option<(Id, Loc)>, ShadowError> {
        if self.pos >= self.buf.len() {
            let left = self.run.len - self.next;
            if left == 0 {
                return Ok(None);
            }
            let n = left.min(((1 << 20) / REC) as u64);
            self.buf.resize(n as usize * REC, 0);
            self.run.file.read_exact_at(&mut self.buf, self.next * REC as u64).map_err(|e| ShadowError::io(&self.run.path, e))?;
            self.next += n;
            self.pos = 0;
        }
        Ok(Some(decode(&self.buf[self.pos..self.pos + REC])))
    }
}

/// The index: memory (new entries, then the frozen ones being written), then the runs.
pub(crate) struct ChunkIndex {
    hot: HashMap<Id, Loc>,
    frozen: Option<Arc<HashMap<Id, Loc>>>,
    /// Oldest first: a newer run's entry for an id is the one that counts.
    runs: Vec<Arc<Run>>,
    /// Where runs go (the first that takes a file); none: everything stays in memory.
    dirs: Vec<PathBuf>,
}

/// A write-out, made without the stream's lock ([`IndexWrite::write`]).
pub(crate) struct IndexWrite {
    entries: Arc<HashMap<Id, Loc>>,
    dirs: Vec<PathBuf>,
}

/// A merge of the runs of one tier into one (oldest first), dropping entries of files gone.
pub(crate) struct IndexMerge {
    runs: Vec<Arc<Run>>,
    live: Vec<FileNo>,
    dirs: Vec<PathBuf>,
}

/// A merged run, to take in with [`ChunkIndex::merged`].
pub(crate) struct Merged {
    from: Vec<Arc<Run>>,
    run: Run,
}

impl ChunkIndex {
    /// An empty index whose runs go to the first of `dirs` that takes a file (none: it stays
    /// in memory).
    pub fn new(dirs: Vec<PathBuf>) -> ChunkIndex {
        ChunkIndex { hot: HashMap::new(), frozen: None, runs: Vec::new(), dirs }
    }

    /// The newest entry for `id` naming a file `held` says is still there.
    pub fn get(&self, id: &Id, held: impl Fn(FileNo) -> bool) -> Result<Option<Loc>, ShadowError> {
        if let Some(l) = self.get_memory(id).filter(|l| held(l.file)) {
            return Ok(Some(l));
        }
        for r in self.runs.iter().rev() {
            if let Some(l) = r.get(id)?.filter(|l| held(l.file)) {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    /// The entry for `id` if it is in memory (newer than any run's).
    pub fn get_memory(&self, id: &Id) -> Option<Loc> {
        self.hot.get(id).or_else(|| self.frozen.as_ref().and_then(|f| f.get(id))).copied()
    }

    /// Entries in memory whose file is one of `files`, and the ids in memory naming others.
    pub fn memory_in(&self, files: &[FileNo]) -> HashMap<Id, Option<Loc>> {
        let mut out: HashMap<Id, Option<Loc>> = HashMap::new();
        let frozen = self.frozen.iter().flat_map(|f| f.iter());
        // The hot entry is the newer one: it goes in last.
        for (id, l) in frozen.chain(self.hot.iter()) {
            out.insert(*id, files.contains(&l.file).then_some(*l));
        }
        out
    }

    /// Sets the entry for `id` (a chunk stored, or moved into a pack).
    pub fn put(&mut self, id: Id, loc: Loc) {
        self.hot.insert(id, loc);
    }

    /// Forgets `id`'s entry in memory when it is in `file` (a file leaving the journal; a
    /// run's entries for it are dead from then on and dropped by the next merge).
    pub fn forget(&mut self, id: Id, file: FileNo) {
        if self.hot.get(&id).is_some_and(|l| l.file == file) {
            self.hot.remove(&id);
        }
    }

    /// Freezes the entries in memory for writing out when at least `min` are waiting (or
    /// again those of a write-out that failed). `None`: nothing to do, or no directory.
    pub fn freeze(&mut self, min: usize) -> Option<IndexWrite> {
        if self.dirs.is_empty() {
            return None;
        }
        if self.frozen.is_none() {
            if self.hot.len() < min.max(1) {
                return None;
            }
            self.frozen = Some(Arc::new(std::mem::take(&mut self.hot)));
        }
        self.frozen.clone().map(|entries| IndexWrite { entries, dirs: self.dirs.clone() })
    }

    /// A write-out's run: it joins the runs and the frozen entries leave memory.
    pub fn written(&mut self, run: Run) {
        self.runs.push(Arc::new(run));
        self.frozen = None;
    }

    /// Drops runs naming no file in `live` (sorted) and plans a merge of the lowest tier
    /// holding [`TIER_FANOUT`] runs.
    pub fn merge_plan(&mut self, live: &[FileNo]) -> Option<IndexMerge> {
        self.runs.retain(|r| r.files.iter().any(|f| live.binary_search(f).is_ok()));
        let tier = (0..64).find(|t| self.runs.iter().filter(|r| r.tier() == *t).count() >= TIER_FANOUT)?;
        let runs: Vec<Arc<Run>> = self.runs.iter().filter(|r| r.tier() == tier).cloned().collect();
        Some(IndexMerge { runs, live: live.to_vec(), dirs: self.dirs.clone() })
    }

    /// Takes in a merged run in place of the runs it was made of (those still there).
    pub fn merged(&mut self, m: Merged) {
        self.runs.retain(|r| !m.from.iter().any(|f| Arc::ptr_eq(r, f)));
        self.runs.push(Arc::new(m.run));
    }

    /// Entries in memory (the part of the index that grows until a write-out).
    pub fn in_memory(&self) -> usize {
        self.hot.len() + self.frozen.as_ref().map_or(0, |f| f.len())
    }

}

impl IndexWrite {
    /// Writes the frozen entries as a run, sorted by id.
    pub fn write(self) -> Result<Run, ShadowError> {
        let mut sorted: Vec<(&Id, &Loc)> = self.entries.iter().collect();
        sorted.sort_unstable_by_key(|(id, _)| **id);
        Run::write(&self.dirs, sorted.into_iter().map(|(id, l)| (*id, *l)))
    }
}

impl IndexMerge {
    /// Merges the runs (for an id in several, the newest run's entry), without entries naming
    /// a file gone.
    pub fn run(self) -> Result<Merged, ShadowError> {
        let mut readers: Vec<RunReader> = self.runs.iter().map(|r| RunReader { run: r, buf: Vec::new(), pos: 0, next: 0 }).collect();
        let mut err = None;
        let live = &self.live;
        let merged = std::iter::from_fn(|| {
            loop {
                // The smallest id among the heads; of equal ones, the newest run's.
                let mut best: Option<(Id, Loc)> = None;
                for r in readers.iter_mut() {
                    match r.peek() {
                        Ok(Some((id, l))) if best.is_none_or(|b| id <= b.0) => best = Some((id, l)),
                        Ok(_) => {}
                        Err(e) => {
                            err = Some(e);
                            return None;
                        }
                    }
                }
                let (id, l) = best?;
                for r in readers.iter_mut() {
                    if let Ok(Some((rid, _))) = r.peek()
                        && rid == id
                    {
                        r.pos += REC;
                    }
                }
                if live.binary_search(&l.file).is_ok() {
                    return Some((id, l));
                }
            }
        });
        // Streamed: a merge holds a MiB of each run, never the runs.
        let run = Run::write(&self.dirs, merged);
        if let Some(e) = err {
            return Err(e);
        }
        Ok(Merged { from: self.runs.clone(), run: run? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Id {
        Id(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    fn at(file: FileNo, n: u64) -> Loc {
        Loc { file, off: n * 7, raw_len: n as u32, zlen: (n / 2) as u32 }
    }

    /// Write-outs of many sizes, merged by tiers: every lookup answers the newest entry put,
    /// entries of files gone leave with the merges, and memory keeps one id per block.
    #[test]
    fn runs_answer_the_newest_entry_and_merges_drop_files_gone() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = ChunkIndex::new(vec![d.path().to_path_buf()]);
        let mut want: HashMap<Id, Loc> = HashMap::new();
        let mut live: Vec<FileNo> = Vec::new();
        let (mut n, mut merges) = (0u64, 0);
        for round in 0..40u32 {
            // File `round` is new; some entries name ids put before (a newer copy).
            live.push(round);
            let count = [10, 3000, 17_000, 500][round as usize % 4];
            for k in 0..count {
                let key = if k % 5 == 0 && n > 0 { id((n * 7919 + k) % n) } else { id(n + k) };
                ix.put(key, at(round, n + k));
                want.insert(key, at(round, n + k));
            }
            n += count;
            if round % 7 == 6 {
                // An old file goes: its entries are dead.
                let gone = live.remove(0);
                want.retain(|_, l| l.file != gone);
            }
            let w = ix.freeze(1).unwrap();
            ix.written(w.write().unwrap());
            assert_eq!(ix.in_memory(), 0);
            while let Some(m) = ix.merge_plan(&live) {
                let merged = m.run().unwrap();
                // Sorted, each id once, no entry of a file gone.
                let mut r = RunReader { run: &merged.run, buf: Vec::new(), pos: 0, next: 0 };
                let mut prev: Option<Id> = None;
                while let Some((id, l)) = r.peek().unwrap() {
                    assert!(prev.is_none_or(|p| p < id) && live.contains(&l.file));
                    prev = Some(id);
                    r.pos += REC;
                }
                ix.merged(merged);
                merges += 1;
            }
        }
        assert!(merges >= 5, "{merges} merges");
        assert!(ix.runs.len() < 12, "{} runs", ix.runs.len());
        let fences: usize = ix.runs.iter().map(|r| r.fences.len()).sum();
        assert!(fences * BLOCK < 2 * ix.runs.iter().map(|r| r.len as usize).sum::<usize>() + BLOCK * ix.runs.len());
        for k in 0..n {
            let got = ix.get(&id(k), |f| live.contains(&f)).unwrap();
            assert_eq!(got, want.get(&id(k)).copied(), "entry {k}");
        }
        // No file of the index is left behind in the directory.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    /// A write-out that cannot make its file (here: its directory is missing; a full disk
    /// takes the same path) leaves the entries readable in memory; the next try writes them.
    #[test]
    fn a_write_out_that_fails_keeps_its_entries_and_is_tried_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("later");
        let mut ix = ChunkIndex::new(vec![dir.clone()]);
        ix.put(id(1), at(1, 1));
        let w = ix.freeze(1).unwrap();
        assert!(matches!(w.write(), Err(ShadowError::Io { .. })));
        ix.put(id(2), at(1, 2));
        assert_eq!(ix.get(&id(1), |_| true).unwrap(), Some(at(1, 1)));
        assert_eq!(ix.in_memory(), 2);
        std::fs::create_dir(&dir).unwrap();
        let w = ix.freeze(1).unwrap();
        ix.written(w.write().unwrap());
        assert_eq!(ix.in_memory(), 1, "the failed write-out's entries, not the newer one");
        let w = ix.freeze(1).unwrap();
        ix.written(w.write().unwrap());
        assert_eq!(ix.in_memory(), 0);
        assert_eq!((ix.get(&id(1), |_| true).unwrap(), ix.get(&id(2), |_| true).unwrap()), (Some(at(1, 1)), Some(at(1, 2))));
        assert_eq!(ix.get(&id(2), |f| f != 1).unwrap(), None, "an entry of a file gone is not answered");
    }
}
