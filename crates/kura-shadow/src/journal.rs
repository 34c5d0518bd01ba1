//! The standby's journal: append-only segment files of frames, each a batch exactly as the
//! primary sent it, stamped with the standby's receive time and made durable before it is
//! acknowledged. Opening it rebuilds the chunk index and a sparse index of the records (a mark
//! every [`MARK_BYTES`] of frames); only the newest records stay in memory, older ones are read
//! back from the segments. A torn last frame (a crash mid-append, never acknowledged) is cut
//! off. The window is kept by pruning: segments older than it are folded into a base (the tree
//! before the first kept record) and the chunks still needed move into packs.
//!
//! Frame: `"KSJ1" | recv_ns i64 LE | body_len u32 LE | BLAKE3(body)[..16] | body`.
//! Base (`base.ksb`): `"KSB1" | BLAKE3(body)[..16] | body (postcard BaseFile)`.
//! Pack (`pack-N.ksp`): `"KSP1" | meta_len u32 LE | BLAKE3(meta)[..16] | meta (postcard
//! Vec<ChunkMeta>) | the chunks as stored in frames, concatenated`.

use crate::chunk_index::{ChunkIndex, FileNo, HOT_ENTRIES, IndexMerge, IndexWrite, Loc, Merged, Run};
use crate::record::{BatchMeta, ChunkMeta, Op, open_chunk};
use crate::{ShadowError, path};
use kura_repo::Id;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"KSJ1";
const BASE_MAGIC: &[u8; 4] = b"KSB1";
const PACK_MAGIC: &[u8; 4] = b"KSP1";
const HEADER: usize = 32;
/// Small packs (below `SMALL_PACK` bytes) are merged once this many packs exist.
const PACKS_BEFORE_COMPACTION: usize = 8;
const SMALL_PACK: u64 = 4 << 20;
/// A segment is closed and a new one started beyond this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Zeros written ahead of the last segment's frames, so that an append overwrites blocks the
/// file already has: its `fdatasync` then flushes the frame alone, not the file's size and
/// block map as well. Measured on ext4 (5 KB frames): 39 µs of CPU and 88 µs of wall time a
/// sync instead of 71 and 170.
const PREALLOC: u64 = 1 << 20;
/// A segment is marked (offset, first record, receive time) once every this many bytes of
/// frames: reading back a record reads at most this much before it.
const MARK_BYTES: u64 = 1 << 20;
/// The newest records kept in memory (what followers and the applier read while they keep
/// up); the rest of the window is read from the segments, so memory does not grow with it.
const TAIL_RECORDS: usize = 1 << 14;

/// A record as the standby holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Sequence number.
    pub seq: u64,
    /// The primary's time of the change.
    pub at_ns: i64,
    /// The standby's time of receipt (never decreasing: the journal's own timeline).
    pub recv_ns: i64,
    /// The change.
    pub op: Op,
}

struct Segment {
    path: PathBuf,
    file: Arc<File>,
    no: FileNo,
    /// End of its frames; the file may go on with zeros up to `alloc` ([`PREALLOC`]).
    len: u64,
    alloc: u64,
    /// Newest record in it (the one before its first when it holds chunks only).
    last_seq: u64,
    /// Receive time of its newest frame, and of its first.
    max_recv: i64,
    /// Receive time of the frame holding its newest record.
    last_rec_recv: i64,
    first_recv: i64,
    /// Where its frames can be read from, in order (the first at its first frame).
    marks: Vec<Mark>,
    /// Chunks stored in it.
    chunks: u64,
}

/// A frame's place in a segment, the first record at or after it and its receive time.
#[derive(Clone, Copy, Debug)]
struct Mark {
    off: u64,
    seq: u64,
    recv_ns: i64,
}

/// Chunks moved out of pruned segments.
struct Pack {
    path: PathBuf,
    file: Arc<File>,
    no: FileNo,
    /// Its chunks, stored one after the other from `data_off`.
    list: Vec<ChunkMeta>,
    data_off: u64,
}

impl Pack {
    /// Each chunk with its offset.
    fn chunks(&self) -> impl Iterator<Item = (&ChunkMeta, u64)> {
        self.list.iter().scan(self.data_off, |off, c| {
            let at = *off;
            *off += u64::from(c.zlen);
            Some((c, at))
        })
    }
}

fn loc(file: FileNo, off: u64, c: &ChunkMeta) -> Loc {
    Loc { file, off, raw_len: c.raw_len, zlen: c.zlen }
}

fn handle(file: &Arc<File>, id: Id, l: &Loc) -> ChunkHandle {
    ChunkHandle { file: file.clone(), off: l.off, meta: ChunkMeta { id, raw_len: l.raw_len, zlen: l.zlen } }
}

/// The tree before the first kept record: every pruned record folded in.
#[derive(Debug, Clone, Default)]
pub struct Base {
    /// The newest record folded in (0: nothing was ever pruned).
    pub seq: u64,
    /// Its receive time: the oldest moment the journal can restore.
    pub recv_ns: i64,
    /// The primary's tree at `seq`.
    pub tree: crate::Manifest,
    /// The mirror's tree at `seq` when it differs (deletions an operator discarded).
    pub mirror: Option<crate::Manifest>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BaseFile {
    version: u32,
    seq: u64,
    recv_ns: i64,
    tree: Vec<u8>,
    mirror: Option<Vec<u8>>,
}

/// An open journal (one writer: the stream that owns it, or a read-only restore).
pub struct Journal {
    dir: PathBuf,
    id_key: [u8; 32],
    base: Arc<Base>,
    packs: Vec<Pack>,
    next_pack: u64,
    segments: Vec<Segment>,
    /// The newest records (at most [`TAIL_RECORDS`]), a run that ends at `head`.
    tail: std::collections::VecDeque<Entry>,
    head: u64,
    /// The first run of records missing after the base (a damaged journal; found on open).
    gap: Option<(u64, u64)>,
    /// [`TAIL_RECORDS`], [`MARK_BYTES`] and [`HOT_ENTRIES`] while opening (smaller in tests,
    /// to read from disk often).
    tail_max: usize,
    mark_bytes: u64,
    hot_max: usize,
    /// Where each chunk is: in memory, then in sorted runs on disk (chunk_index).
    chunks: ChunkIndex,
    /// Chunks named by a record of a later batch than the one that stored them: the newest
    /// such record (pruning keeps the chunk while one is in the window). Few: a file put again
    /// with content the standby has, a page written back to an earlier content.
    rerefs: HashMap<Id, u64>,
    /// A write-out while opening failed (warned once; the open goes on in memory).
    index_warned: bool,
    /// Number of the next file opened or made (segments and packs, in the index).
    next_file: FileNo,
    last_recv: i64,
    read_only: bool,
    /// A segment is closed once its first frame is this old (so pruning has whole segments to
    /// drop even when little is written).
    segment_age: Option<std::time::Duration>,
    /// Place of the next new segment (names sort by first record, then place).
    next_index: u64,
}

/// A segment's name: its first record and its place among the segments (a batch of chunks
/// alone starts a segment at the same record as the next one may).
fn seg_name(first_seq: u64, index: u64) -> String {
    format!("{first_seq:020}-{index:08}.ksj")
}

/// The (first record, place) a segment's name gives.
fn parse_seg_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".ksj")?;
    match stem.split_once('-') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => Some((stem.parse().ok()?, 0)),
    }
}

/// A chunk's location, readable without the journal's lock.
#[derive(Clone)]
pub struct ChunkHandle {
    file: Arc<File>,
    off: u64,
    meta: ChunkMeta,
}

impl ChunkHandle {
    /// The chunk's plain length.
    pub fn raw_len(&self) -> u32 {
        self.meta.raw_len
    }

    /// Reads, decompresses and verifies the chunk.
    pub fn read(&self, id_key: &[u8; 32]) -> Result<Vec<u8>, ShadowError> {
        let buf = self.read_stored()?;
        open_chunk(id_key, &self.meta, &buf).map_err(|detail| ShadowError::Corrupt { what: "journal".into(), detail })
    }

    /// The chunk as stored (compressed), unverified.
    fn read_stored(&self) -> Result<Vec<u8>, ShadowError> {
        let mut buf = vec![0; self.meta.zlen as usize];
        self.file
            .read_exact_at(&mut buf, self.off)
            .map_err(|e| ShadowError::Corrupt { what: format!("chunk {}", self.meta.id.short()), detail: e.to_string() })?;
        Ok(buf)
    }
}

/// A chunk as pruning sees it: its id, where it is, and its file.
type Held = (Id, ChunkHandle, FileNo);
/// A pack as pruning sees it: path, file, number, and chunks with their offsets.
type PackChunks = (PathBuf, Arc<File>, FileNo, Vec<(ChunkMeta, u64)>);
/// What a batch sets in the index: entries of the chunks it stores, and (chunk, record) for
/// each chunk a record names without the batch carrying it.
type IndexPlan = (Vec<(Id, Loc)>, Vec<(Id, u64)>);

/// What one pruning round takes out of the journal, gathered under the stream's lock and
/// worked out without it ([`PrunePlan::build`]).
pub struct PrunePlan {
    old: Arc<Base>,
    seq: u64,
    recv_ns: i64,
    /// The dropped segments' files, numbers and the length of their frames: their records are
    /// folded, and the chunks whose place they are either move into a pack or go.
    fold: Vec<(PathBuf, Arc<File>, FileNo, u64)>,
    /// Segments dropped (their count from the front) and packs that may be merged.
    drop_segments: usize,
    segment_files: Vec<Arc<File>>,
    packs: Vec<PackChunks>,
    /// The ids in the index's memory as the plan was made, with their entry when it names a
    /// dropped segment or a pack: a chunk whose newest copy is elsewhere is not this file's.
    /// One not in memory is taken to be (copying it is harmless; leaving it is not).
    memory: HashMap<Id, Option<Loc>>,
    /// Chunks a record after the round's last names (kept for it).
    named_after: HashSet<Id>,
    dir: PathBuf,
    id_key: [u8; 32],
    pack_no: u64,
}

/// A pruning round worked out: the new base and the pack holding the chunks that stay.
pub struct BuiltPrune {
    plan_seq: u64,
    drop_segments: usize,
    segment_files: Vec<Arc<File>>,
    base: Arc<Base>,
    /// Chunks not copied, which a record appended meanwhile may have named.
    left: Vec<(Id, ChunkHandle)>,
    /// Every chunk whose place was a dropped segment or merged pack (copied or not).
    dropped: Vec<(Id, FileNo)>,
    pack: Option<(PathBuf, Vec<ChunkMeta>)>,
    merged_packs: Vec<(PathBuf, Arc<File>)>,
    dir: PathBuf,
    id_key: [u8; 32],
    pack_no: u64,
}

/// Files a committed pruning round leaves to write and remove ([`Cleanup::finish`]).
pub struct Cleanup {
    base: Arc<Base>,
    remove: Vec<PathBuf>,
    dir: PathBuf,
    /// Records and bytes pruned.
    pub records: u64,
    /// Bytes of segments and packs removed.
    pub bytes: u64,
}

impl Journal {
    /// Opens (or, when `create`, makes) the journal in `dir`. Read-only opens never cut a torn
    /// tail or remove anything; they just stop before a torn tail.
    pub fn open(dir: &Path, id_key: [u8; 32], read_only: bool) -> Result<Journal, ShadowError> {
        Self::open_with(dir, id_key, read_only, (TAIL_RECORDS, MARK_BYTES, HOT_ENTRIES))
    }

    /// [`Journal::open`] keeping `limits.0` records in memory, a mark every `limits.1` bytes,
    /// and writing the index out while opening once `limits.2` entries wait.
    fn open_with(dir: &Path, id_key: [u8; 32], read_only: bool, limits: (usize, u64, usize)) -> Result<Journal, ShadowError> {
        if !read_only {
            std::fs::create_dir_all(dir).map_err(|e| ShadowError::io(dir, e))?;
        }
        let mut names: Vec<((u64, u64), PathBuf)> = Vec::new();
        let mut packs: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| ShadowError::io(dir, e))? {
            let e = e.map_err(|e| ShadowError::io(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = parse_seg_name(&name) {
                names.push((n, e.path()));
            } else if let Some(n) = name.strip_prefix("pack-").and_then(|n| n.strip_suffix(".ksp")).and_then(|n| n.parse().ok()) {
                packs.push((n, e.path()));
            } else if name.starts_with(".tmp-") && !read_only {
                // A pruning round killed before its rename: never part of the journal.
                let _ = std::fs::remove_file(e.path());
            }
        }
        names.sort();
        packs.sort();
        let base = load_base(&dir.join("base.ksb"))?;
        // The index's runs go where the journal is; a read-only open's, when it cannot write
        // there, to the temporary directory.
        let chunks = ChunkIndex::new(if read_only { vec![dir.to_path_buf(), std::env::temp_dir()] } else { vec![dir.to_path_buf()] });
        let mut j = Journal {
            dir: dir.to_path_buf(),
            id_key,
            base: Arc::new(base),
            packs: Vec::new(),
            next_pack: packs.last().map(|(n, _)| n + 1).unwrap_or(1),
            segments: Vec::new(),
            tail: std::collections::VecDeque::new(),
            head: 0,
            gap: None,
            tail_max: limits.0,
            mark_bytes: limits.1,
            hot_max: limits.2,
            chunks,
            rerefs: HashMap::new(),
            index_warned: false,
            next_file: 0,
            last_recv: 0,
            read_only,
            segment_age: None,
            next_index: names.iter().map(|((_, i), _)| i + 1).max().unwrap_or(0),
        };
        j.last_recv = j.base.recv_ns;
        j.head = j.base.seq;
        let count = names.len();
        for (i, ((first, _), p)) in names.into_iter().enumerate() {
            j.load_segment(&p, first, i + 1 == count)?;
        }
        // After the segments: a chunk a pack holds is named there (a kept segment holding it
        // again may be one a killed pruning round already folded, removed below).
        for (_, p) in packs {
            j.load_pack(&p)?;
        }
        if let Some((from, to)) = j.gap {
            return Err(ShadowError::Corrupt { what: dir.display().to_string(), detail: format!("records {from} to {to} are missing") });
        }
        if !read_only {
            // Segments a killed pruning round folded into the base but did not remove yet.
            let covered = j.segments.iter().take(j.segments.len().saturating_sub(1)).take_while(|s| s.last_seq <= j.base.seq).count();
            if covered > 0 {
                for s in &j.segments[..covered] {
                    let mut ids = Vec::new();
                    read_frames(&s.path, &s.file, 0, s.len, |_, meta, _| {
                        ids.extend(meta.chunks.iter().map(|c| c.id));
                        true
                    })?;
                    for id in ids {
                        j.chunks.forget(id, s.no);
                    }
                }
                for s in j.segments.drain(..covered) {
                    std::fs::remove_file(&s.path).map_err(|e| ShadowError::io(&s.path, e))?;
                }
            }
        }
        Ok(j)
    }

    /// Writes the index's entries in memory out as a run when at least `min` wait, and merges
    /// runs (while opening: nothing else holds the journal). `current`: a segment being read,
    /// not yet among the segments.
    fn write_out(&mut self, min: usize, current: Option<FileNo>) -> Result<(), ShadowError> {
        if let Some(w) = self.chunks.freeze(min) {
            let run = w.write()?;
            self.chunks.written(run);
            while let Some(m) = self.index_merge_plan(current) {
                let merged = m.run()?;
                self.chunks.merged(merged);
            }
        }
        Ok(())
    }

    /// [`Journal::write_out`] while opening: a run that cannot be written (a full disk)
    /// leaves the index in memory, where the stream's thread tries again later.
    fn write_out_opening(&mut self, current: Option<FileNo>) {
        if self.index_warned {
            return;
        }
        if let Err(e) = self.write_out(self.hot_max, current) {
            tracing::warn!(journal = %self.dir.display(), "the chunk index stays in memory for now: {e}");
            self.index_warned = true;
        }
    }

    /// The index entries waiting in memory, to write out without the stream's lock when at
    /// least `min` wait ([`IndexWrite::write`], then [`Journal::index_written`]).
    pub(crate) fn index_freeze(&mut self, min: usize) -> Option<IndexWrite> {
        self.chunks.freeze(min)
    }

    /// The frozen entries are in a run: they leave memory.
    pub(crate) fn index_written(&mut self, run: Run) {
        self.chunks.written(run);
    }

    /// A merge of the index's runs when a tier is full ([`IndexMerge::run`], then
    /// [`Journal::index_merged`]); runs naming only files gone are dropped.
    pub(crate) fn index_merge_plan(&mut self, current: Option<FileNo>) -> Option<IndexMerge> {
        let mut live: Vec<FileNo> = self.segments.iter().map(|s| s.no).chain(self.packs.iter().map(|p| p.no)).chain(current).collect();
        live.sort_unstable();
        self.chunks.merge_plan(&live)
    }

    /// Takes in a merged run.
    pub(crate) fn index_merged(&mut self, m: Merged) {
        self.chunks.merged(m);
    }

    /// Index entries held in memory.
    pub fn index_in_memory(&self) -> usize {
        self.chunks.in_memory()
    }

    /// The file numbered `no` if the journal still has it.
    fn file(&self, no: FileNo) -> Option<&Arc<File>> {
        if let Ok(i) = self.segments.binary_search_by_key(&no, |s| s.no) {
            return Some(&self.segments[i].file);
        }
        self.packs.binary_search_by_key(&no, |p| p.no).ok().map(|i| &self.packs[i].file)
    }

    /// The entry for `id` if it names a file still held.
    fn live(&self, id: &Id) -> Result<Option<Loc>, ShadowError> {
        self.chunks.get(id, |f| self.file(f).is_some())
    }

    fn take_file_no(&mut self) -> FileNo {
        self.next_file += 1;
        self.next_file
    }

    /// Closes segments once their first frame is `age` old.
    pub fn set_segment_age(&mut self, age: std::time::Duration) {
        self.segment_age = Some(age);
    }

    fn load_pack(&mut self, p: &Path) -> Result<(), ShadowError> {
        let file = File::open(p).map_err(|e| ShadowError::io(p, e))?;
        let corrupt = |detail: &str| ShadowError::Corrupt { what: p.display().to_string(), detail: detail.to_string() };
        let mut h = [0u8; 24];
        file.read_exact_at(&mut h, 0).map_err(|_| corrupt("header cut short"))?;
        if &h[..4] != PACK_MAGIC {
            return Err(corrupt("not a pack"));
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let mut meta = vec![0u8; len];
        file.read_exact_at(&mut meta, 24).map_err(|_| corrupt("chunk list cut short"))?;
        if blake3::hash(&meta).as_bytes()[..16] != h[8..24] {
            return Err(corrupt("chunk list checksum mismatch"));
        }
        let list: Vec<ChunkMeta> = postcard::from_bytes(&meta).map_err(|e| corrupt(&e.to_string()))?;
        let pack = Pack { path: p.to_path_buf(), file: Arc::new(file), no: self.take_file_no(), list, data_off: (24 + len) as u64 };
        for (c, off) in pack.chunks() {
            self.chunks.put(c.id, loc(pack.no, off, c));
        }
        self.packs.push(pack);
        self.write_out_opening(None);
        Ok(())
    }

    fn load_segment(&mut self, p: &Path, first: u64, last: bool) -> Result<(), ShadowError> {
        let file = OpenOptions::new().read(true).write(!self.read_only).open(p).map_err(|e| ShadowError::io(p, e))?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).map_err(|e| ShadowError::io(p, e))?;
        let corrupt = |detail: String| ShadowError::Corrupt { what: p.display().to_string(), detail };
        let no = self.take_file_no();
        let mut seg = Segment { path: p.to_path_buf(), file: Arc::new(file), no, len: 0, alloc: bytes.len() as u64, last_seq: first.saturating_sub(1), max_recv: 0, last_rec_recv: 0, first_recv: 0, marks: Vec::new(), chunks: 0 };
        let mut pos = 0usize;
        let mut expect = first;
        // Zeros from a point on are the space written ahead of the frames.
        let zeros_from = |at: usize| bytes.get(at..).is_none_or(|b| b.iter().all(|&x| x == 0));
        while pos < bytes.len() && !zeros_from(pos) {
            // A frame is torn (never acknowledged as durable) only if nothing but zeros follows
            // it; a bad frame with more behind it is damage, reported and not cut.
            let frame = (|| {
                let h = bytes.get(pos..pos + HEADER).ok_or(("header cut short", true))?;
                if &h[..4] != MAGIC {
                    return Err(("not a frame", false));
                }
                let recv = i64::from_le_bytes(h[4..12].try_into().map_err(|_| ("header", false))?);
                let len = u32::from_le_bytes(h[12..16].try_into().map_err(|_| ("header", false))?) as usize;
                let end = pos + HEADER + len;
                let body = bytes.get(pos + HEADER..end).ok_or(("body cut short", true))?;
                if blake3::hash(body).as_bytes()[..16] != h[16..32] {
                    return Err(("checksum mismatch", zeros_from(end)));
                }
                Ok((recv, body))
            })();
            let (recv, body) = match frame {
                Ok(f) => f,
                Err((why, true)) if last => {
                    // Never acknowledged: the append that wrote it did not finish.
                    tracing::warn!(segment = %p.display(), offset = pos, dropped = bytes.len() - pos, "journal ends in a torn frame ({why}); cutting it off");
                    if !self.read_only {
                        seg.file.set_len(pos as u64).map_err(|e| ShadowError::io(p, e))?;
                        seg.file.sync_all().map_err(|e| ShadowError::io(p, e))?;
                        seg.alloc = pos as u64;
                    }
                    break;
                }
                Err((why, _)) => return Err(corrupt(format!("frame at byte {pos}: {why}"))),
            };
            let (meta, data_off) = BatchMeta::decode(body).map_err(|e| corrupt(format!("frame at byte {pos}: {e}")))?;
            if meta.records.first().is_some_and(|r| r.seq != expect) {
                return Err(corrupt(format!("frame at byte {pos} starts at record {} where {expect} was due", meta.records[0].seq)));
            }
            expect += meta.records.len() as u64;
            let plan = self.index_plan(&meta, seg.no, (pos + HEADER + data_off) as u64);
            self.index_apply(&mut seg, pos as u64, plan, meta, recv);
            self.write_out_opening(Some(seg.no));
            pos += HEADER + body.len();
        }
        if last && !self.read_only {
            // Frames a killed standby wrote but never synced may still be only in the page
            // cache: they count as durable from here on, so make them so.
            seg.file.sync_data().map_err(|e| ShadowError::io(p, e))?;
        }
        seg.len = pos as u64;
        self.segments.push(seg);
        Ok(())
    }

    /// The index entries of a batch stored at `data_off` of file `no` (the newest copy of a
    /// chunk is the one named: nothing is looked up), and the records naming chunks the batch
    /// does not carry.
    fn index_plan(&self, meta: &BatchMeta, no: FileNo, data_off: u64) -> IndexPlan {
        let mut puts = Vec::with_capacity(meta.chunks.len());
        let mut off = data_off;
        for c in &meta.chunks {
            puts.push((c.id, loc(no, off, c)));
            off += u64::from(c.zlen);
        }
        let mut refs = Vec::new();
        let carried: HashSet<&Id> = meta.chunks.iter().map(|c| &c.id).collect();
        for r in meta.records.iter().filter(|r| r.seq > self.base.seq) {
            for id in r.op.chunk_ids() {
                if !carried.contains(id) {
                    refs.push((*id, r.seq));
                }
            }
        }
        (puts, refs)
    }

    fn index_apply(&mut self, seg: &mut Segment, frame_off: u64, (puts, refs): IndexPlan, meta: BatchMeta, recv_ns: i64) {
        if seg.marks.last().is_none_or(|m| frame_off >= m.off + self.mark_bytes) {
            seg.marks.push(Mark { off: frame_off, seq: seg.last_seq + 1, recv_ns });
        }
        seg.chunks += puts.len() as u64;
        // In order: a chunk stored twice in one batch is named at its first copy.
        for (id, l) in puts.into_iter().rev() {
            self.chunks.put(id, l);
        }
        for (id, seq) in refs {
            self.rerefs.insert(id, seq);
        }
        self.last_recv = self.last_recv.max(recv_ns);
        if seg.first_recv == 0 {
            seg.first_recv = recv_ns;
        }
        seg.max_recv = seg.max_recv.max(recv_ns);
        if !meta.records.is_empty() {
            seg.last_rec_recv = recv_ns;
        }
        for r in meta.records {
            seg.last_seq = r.seq;
            if r.seq <= self.base.seq {
                continue;
            }
            if r.seq != self.head + 1 && self.gap.is_none() {
                self.gap = Some((self.head + 1, r.seq.saturating_sub(1)));
            }
            self.head = r.seq;
            if self.tail.len() >= self.tail_max {
                self.tail.pop_front();
            }
            self.tail.push_back(Entry { seq: r.seq, at_ns: r.at_ns, recv_ns, op: r.op });
        }
    }

    /// Sequence number of the newest record (0 when empty).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Number of records kept (those after the base).
    pub fn len(&self) -> u64 {
        self.head - self.base.seq
    }

    /// Whether no record is kept after the base.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with each kept record after `after`, in order, while it returns true. Records
    /// older than those in memory are read back from the segments (each frame checked again).
    pub fn scan(&self, after: u64, mut f: impl FnMut(&Entry) -> bool) -> Result<(), ShadowError> {
        let after = after.max(self.base.seq);
        let in_memory = self.tail.front().map_or(self.head + 1, |e| e.seq);
        if after + 1 < in_memory {
            let start = after + 1;
            let mut more = true;
            for s in self.segments.iter().skip_while(|s| s.last_seq < start) {
                let Some(mark) = s.marks.iter().take_while(|m| m.seq <= start).last().or(s.marks.first()) else { continue };
                let mut stopped = false;
                read_frames(&s.path, &s.file, mark.off, s.len, |recv_ns, meta, _| {
                    for r in meta.records {
                        if r.seq < start {
                            continue;
                        }
                        if r.seq >= in_memory {
                            more = false;
                            return false;
                        }
                        if !f(&Entry { seq: r.seq, at_ns: r.at_ns, recv_ns, op: r.op }) {
                            stopped = true;
                            return false;
                        }
                    }
                    true
                })?;
                if stopped {
                    return Ok(());
                }
                if !more {
                    break;
                }
            }
        }
        let from = self.tail.partition_point(|e| e.seq <= after);
        for e in self.tail.range(from..) {
            if !f(e) {
                break;
            }
        }
        Ok(())
    }

    /// At most `max` records after `after` and at or before `upto`.
    pub fn records(&self, after: u64, upto: u64, max: usize) -> Result<Vec<Entry>, ShadowError> {
        let mut out = Vec::new();
        self.scan(after, |e| {
            if e.seq > upto || out.len() >= max {
                return false;
            }
            out.push(e.clone());
            true
        })?;
        Ok(out)
    }

    /// The first record after `after`, if any.
    pub fn next_after(&self, after: u64) -> Result<Option<Entry>, ShadowError> {
        Ok(self.records(after, u64::MAX, 1)?.pop())
    }

    /// The newest record, when it is kept.
    pub fn last(&self) -> Option<&Entry> {
        self.tail.back()
    }

    /// The state before the first kept record.
    pub fn base(&self) -> &Base {
        &self.base
    }

    /// The oldest moment the journal can restore (ns; 0 when it holds nothing).
    pub fn oldest_time(&self) -> i64 {
        if self.base.seq > 0 || self.is_empty() {
            return self.base.recv_ns;
        }
        self.segments.iter().find(|s| s.last_seq > self.base.seq).map_or(0, |s| s.first_recv)
    }

    /// The stream's chunk id key.
    pub fn id_key(&self) -> &[u8; 32] {
        &self.id_key
    }

    /// Whether the journal holds a chunk.
    pub fn has_chunk(&self, id: &Id) -> Result<bool, ShadowError> {
        Ok(self.live(id)?.is_some())
    }

    /// Number of chunks held (a chunk stored again counts again until pruning drops the older
    /// copy), and bytes of all segments and packs.
    pub fn sizes(&self) -> (usize, u64) {
        let packs: u64 = self.packs.iter().filter_map(|p| p.file.metadata().ok()).map(|m| m.len()).sum();
        let chunks = self.segments.iter().map(|s| s.chunks).sum::<u64>() + self.packs.iter().map(|p| p.list.len() as u64).sum::<u64>();
        (chunks as usize, self.segments.iter().map(|s| s.len).sum::<u64>() + packs)
    }

    /// Where a chunk is, to read it without holding the journal.
    pub fn chunk(&self, id: &Id) -> Result<Option<ChunkHandle>, ShadowError> {
        Ok(self.live(id)?.and_then(|l| self.file(l.file).map(|f| handle(f, *id, &l))))
    }

    /// Appends a checked batch (`body` as received, `meta` decoded from it). It is written but
    /// not yet durable: [`Journal::last_segment`] and a `sync_data` make it so (one sync covers
    /// every frame written before it, so concurrent appends share it). Returns the receive time
    /// recorded.
    pub fn append(&mut self, body: &[u8], meta: &BatchMeta, data_off: usize) -> Result<i64, ShadowError> {
        let recv_ns = crate::now_ns().max(self.last_recv);
        let first = meta.records.first().map(|r| r.seq).unwrap_or(self.head() + 1);
        let aged = |s: &Segment| {
            self.segment_age.is_some_and(|a| s.first_recv > 0 && recv_ns.saturating_sub(s.first_recv) > i64::try_from(a.as_nanos()).unwrap_or(i64::MAX))
        };
        if self.segments.last().is_none_or(|s| s.len >= SEGMENT_BYTES || aged(s)) {
            // A closed segment is durable, and without the zeros written ahead, before the
            // next one starts: only the last one ever needs a sync.
            if let Some(s) = self.segments.last_mut() {
                if s.alloc > s.len {
                    s.file.set_len(s.len).map_err(|e| ShadowError::io(&s.path, e))?;
                    s.alloc = s.len;
                }
                s.file.sync_all().map_err(|e| ShadowError::io(&s.path, e))?;
            }
            let p = self.dir.join(seg_name(first, self.next_index));
            self.next_index += 1;
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&p).map_err(|e| ShadowError::io(&p, e))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| ShadowError::io(&self.dir, e))?;
            let no = self.take_file_no();
            self.segments.push(Segment { path: p, file: Arc::new(file), no, len: 0, alloc: 0, last_seq: first - 1, max_recv: 0, last_rec_recv: 0, first_recv: 0, marks: Vec::new(), chunks: 0 });
        }
        let mut seg = self.segments.pop().ok_or_else(|| ShadowError::Corrupt { what: self.dir.display().to_string(), detail: "no segment".into() })?;
        let mut frame = Vec::with_capacity(HEADER + body.len());
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(&recv_ns.to_le_bytes());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&blake3::hash(body).as_bytes()[..16]);
        frame.extend_from_slice(body);
        let at = seg.len;
        let end = at + frame.len() as u64;
        let plan = self.index_plan(meta, seg.no, at + (HEADER + data_off) as u64);
        if let Err(e) = seg.file.write_all_at(&frame, at) {
            // Leave no partial frame for the next append to follow: zeros where it was.
            let _ = seg.file.set_len(at).and_then(|()| seg.file.set_len(seg.alloc.max(at)));
            let path = seg.path.clone();
            self.segments.push(seg);
            return Err(ShadowError::io(&path, e));
        }
        if end > seg.alloc {
            // The next stretch of zeros, synced with this frame. A disk too full for them took
            // the frame all the same: the next append tries again.
            static ZEROS: [u8; PREALLOC as usize] = [0; PREALLOC as usize];
            seg.alloc = match seg.file.write_all_at(&ZEROS, end) {
                Ok(()) => end + PREALLOC,
                Err(_) => {
                    let _ = seg.file.set_len(end);
                    end
                }
            };
        }
        seg.len = end;
        self.index_apply(&mut seg, at, plan, meta.clone(), recv_ns);
        self.segments.push(seg);
        Ok(recv_ns)
    }

    /// The segment appends go to, to sync it without holding the journal.
    pub fn last_segment(&self) -> Option<(Arc<File>, PathBuf)> {
        self.segments.last().map(|s| (s.file.clone(), s.path.clone()))
    }

    /// The tree after every record up to and including `seq` (at least the base's).
    pub fn manifest_at(&self, seq: u64) -> Result<crate::Manifest, ShadowError> {
        let mut m = self.base.tree.clone();
        self.scan(0, |e| {
            if e.seq > seq {
                return false;
            }
            m.apply(&e.op);
            true
        })?;
        Ok(m)
    }

    /// The mirror's tree: the same without the records in `skip` (deletions an operator
    /// discarded), from the base's mirror.
    pub fn manifest_skipping(&self, seq: u64, skip: &std::collections::BTreeSet<u64>) -> Result<crate::Manifest, ShadowError> {
        let mut m = self.base.mirror.as_ref().unwrap_or(&self.base.tree).clone();
        self.scan(0, |e| {
            if e.seq > seq {
                return false;
            }
            if !skip.contains(&e.seq) {
                m.apply(&e.op);
            }
            true
        })?;
        Ok(m)
    }

    /// The newest record received at or before `t_ns` (the base's when none is kept from then;
    /// 0 when nothing is).
    pub fn seq_at(&self, t_ns: i64) -> Result<u64, ShadowError> {
        let from = self.before_time(t_ns);
        let mut seq = self.base.seq.max(from);
        self.scan(from, |e| {
            if e.recv_ns > t_ns {
                return false;
            }
            seq = e.seq;
            true
        })?;
        Ok(seq)
    }

    /// A record received before `t_ns`, and every one before it (0 when none is known): where
    /// reading for a time starts, at the newest mark before it (receive times never decrease).
    fn before_time(&self, t_ns: i64) -> u64 {
        self.segments.iter().flat_map(|s| s.marks.iter()).take_while(|m| m.recv_ns < t_ns).last().map_or(0, |m| m.seq.saturating_sub(1))
    }

    /// Receive time of record `seq`, 0 when it is not kept.
    pub fn time_of(&self, seq: u64) -> Result<i64, ShadowError> {
        if seq == self.base.seq {
            return Ok(self.base.recv_ns);
        }
        if seq < self.base.seq || seq == 0 {
            return Ok(0);
        }
        Ok(self.next_after(seq - 1)?.filter(|e| e.seq == seq).map_or(0, |e| e.recv_ns))
    }

    /// Calls `f` with each record received at or after `since_ns` touching `p` (or anything
    /// below it; a rename when either end does), every one when `p` is `None`.
    pub fn touching(&self, p: Option<&[u8]>, since_ns: i64, mut f: impl FnMut(&Entry)) -> Result<(), ShadowError> {
        self.scan(self.before_time(since_ns), |e| {
            if e.recv_ns >= since_ns && p.is_none_or(|p| touches(&e.op, p)) {
                f(e);
            }
            true
        })
    }

    /// Plans a pruning round: the leading segments whose every frame arrived before
    /// `before_ns` and whose records are all at or below `upto` (applied and durable) are
    /// folded into the base. The segment appends go to is never dropped. `None`: nothing to do.
    /// Run it, [`PrunePlan::build`] and [`Journal::prune_commit`] from the thread that writes
    /// the index out, never beside a write-out: what the table misses is then in memory.
    pub fn prune_plan(&self, before_ns: i64, upto: u64) -> Result<Option<PrunePlan>, ShadowError> {
        if self.read_only {
            return Ok(None);
        }
        let n = self.segments.len().saturating_sub(1);
        let drop = self.segments[..n].iter().take_while(|s| s.max_recv < before_ns && s.last_seq <= upto).count();
        if drop == 0 {
            return Ok(None);
        }
        let seq = self.segments[drop - 1].last_seq.max(self.base.seq);
        let recv_ns = self.segments[..drop].iter().rev().find(|s| s.last_seq > self.base.seq).map_or(self.base.recv_ns, |s| s.last_rec_recv);
        // Which chunks the dropped segments and the packs hold is worked out without the lock,
        // from their frames and lists; only what the index has in memory is taken now.
        let files: Vec<FileNo> = self.segments[..drop].iter().map(|s| s.no).chain(self.packs.iter().map(|p| p.no)).collect();
        Ok(Some(PrunePlan {
            old: self.base.clone(),
            seq,
            recv_ns,
            fold: self.segments[..drop].iter().map(|s| (s.path.clone(), s.file.clone(), s.no, s.len)).collect(),
            drop_segments: drop,
            segment_files: self.segments[..drop].iter().map(|s| s.file.clone()).collect(),
            packs: self.packs.iter().map(|p| (p.path.clone(), p.file.clone(), p.no, p.chunks().map(|(c, o)| (*c, o)).collect())).collect(),
            memory: self.chunks.memory_in(&files),
            named_after: self.rerefs.iter().filter(|(_, s)| **s > seq).map(|(id, _)| *id).collect(),
            dir: self.dir.clone(),
            id_key: self.id_key,
            pack_no: self.next_pack,
        }))
    }

    /// Commits a built round: the base and index change, the dropped segments leave the
    /// journal (their files are removed by [`Cleanup::finish`], after the base is written).
    pub fn prune_commit(&mut self, mut b: BuiltPrune) -> Result<Cleanup, ShadowError> {
        // A record appended while the round was built may name a chunk it left behind: those
        // join the pack now (rare and few). Such a record set the entry in memory.
        let late: Vec<(Id, ChunkHandle)> = b.left.drain(..).filter(|(id, _)| self.rerefs.get(id).is_some_and(|s| *s > b.plan_seq)).collect();
        if !late.is_empty() {
            let no = self.next_pack.max(b.pack_no + 1);
            let (path, list) = write_pack(&b.dir, no, &b.id_key, late.into_iter())?;
            self.next_pack = no + 1;
            self.adopt_pack(&path, list)?;
        }
        if let Some((path, list)) = b.pack.take() {
            self.next_pack = self.next_pack.max(b.pack_no + 1);
            self.adopt_pack(&path, list)?;
        }
        let dropped: Vec<Segment> = self.segments.drain(..b.drop_segments).collect();
        let mut remove = Vec::new();
        let mut bytes = 0;
        for s in &dropped {
            if !b.segment_files.iter().any(|f| Arc::ptr_eq(f, &s.file)) {
                return Err(ShadowError::Corrupt { what: self.dir.display().to_string(), detail: "segments changed during pruning".into() });
            }
        }
        for (id, file) in b.dropped.drain(..) {
            self.chunks.forget(id, file);
        }
        let base_seq = b.base.seq;
        self.rerefs.retain(|_, s| *s > base_seq);
        for s in dropped {
            bytes += s.len;
            remove.push(s.path);
        }
        let merged: Vec<PathBuf> = b.merged_packs.iter().map(|(p, _)| p.clone()).collect();
        let mut kept = Vec::new();
        for p in std::mem::take(&mut self.packs) {
            if merged.contains(&p.path) {
                bytes += p.file.metadata().map(|m| m.len()).unwrap_or(0);
                remove.push(p.path);
            } else {
                kept.push(p);
            }
        }
        self.packs = kept;
        let before = self.len();
        while self.tail.front().is_some_and(|e| e.seq <= b.base.seq) {
            self.tail.pop_front();
        }
        self.base = b.base.clone();
        Ok(Cleanup { base: b.base, remove, dir: self.dir.clone(), records: before - self.len(), bytes })
    }

    /// Takes in a pack written by pruning: the index names its copies of its chunks (the
    /// segments or packs they came from are going).
    fn adopt_pack(&mut self, path: &Path, list: Vec<ChunkMeta>) -> Result<(), ShadowError> {
        let file = Arc::new(File::open(path).map_err(|e| ShadowError::io(path, e))?);
        let meta_len = postcard::to_allocvec(&list).map(|v| v.len()).unwrap_or(0);
        let pack = Pack { path: path.to_path_buf(), file, no: self.take_file_no(), list, data_off: (24 + meta_len) as u64 };
        for (c, off) in pack.chunks() {
            self.chunks.put(c.id, loc(pack.no, off, c));
        }
        self.packs.push(pack);
        Ok(())
    }
}

impl PrunePlan {
    /// Folds the pruned records into a new base (`skip`: records the mirror never got) and
    /// writes the chunks still needed into a pack. Runs without the stream's lock.
    /// `keep`: chunks needed elsewhere (branches).
    pub fn build(self, skip: &std::collections::BTreeSet<u64>, keep: &HashSet<Id>) -> Result<BuiltPrune, ShadowError> {
        let mut tree = self.old.tree.clone();
        let mut mirror = self.old.mirror.clone();
        if mirror.is_none() && skip.range(self.old.seq + 1..=self.seq).next().is_some() {
            mirror = Some(tree.clone());
        }
        // Whether file `no` holds the copy of `id` the index names.
        let home = |id: &Id, no: FileNo| self.memory.get(id).is_none_or(|l| l.is_some_and(|l| l.file == no));
        let mut candidates: Vec<Held> = Vec::new();
        let mut seen: HashSet<Id> = HashSet::new();
        for (path, file, no, len) in &self.fold {
            read_frames(path, file, 0, *len, |_, meta, data_at| {
                let mut off = data_at;
                for c in &meta.chunks {
                    // Home first: a chunk stored in two dropped segments is the later one's
                    // when the index names that copy.
                    if home(&c.id, *no) && seen.insert(c.id) {
                        candidates.push((c.id, ChunkHandle { file: file.clone(), off, meta: *c }, *no));
                    }
                    off += u64::from(c.zlen);
                }
                for r in meta.records.iter().filter(|r| r.seq > self.old.seq && r.seq <= self.seq) {
                    tree.apply(&r.op);
                    if let Some(m) = &mut mirror
                        && !skip.contains(&r.seq)
                    {
                        m.apply(&r.op);
                    }
                }
                true
            })?;
        }
        if mirror.as_ref() == Some(&tree) {
            mirror = None;
        }
        let mut live: HashSet<Id> = tree.chunk_ids().copied().collect();
        if let Some(m) = &mirror {
            live.extend(m.chunk_ids().copied());
        }
        let needed = |id: &Id| live.contains(id) || keep.contains(id) || self.named_after.contains(id);
        let mut copy = Vec::new();
        let mut left = Vec::new();
        let mut dropped: Vec<(Id, FileNo)> = candidates.iter().map(|c| (c.0, c.2)).collect();
        for (id, h, _) in candidates {
            if needed(&id) { copy.push((id, h)) } else { left.push((id, h)) }
        }
        // Packs more than half dead (by bytes) are merged into the new one, and so are small
        // ones once there are many (a short window makes a small pack each round).
        let mut merged_packs = Vec::new();
        let many = self.packs.len() >= PACKS_BEFORE_COMPACTION;
        for (path, file, no, list) in &self.packs {
            let chunks: Vec<Held> = list.iter().filter(|(c, _)| home(&c.id, *no)).map(|(c, off)| (c.id, ChunkHandle { file: file.clone(), off: *off, meta: *c }, *no)).collect();
            let size = |c: &Held| u64::from(c.1.meta.zlen);
            let total: u64 = chunks.iter().map(size).sum();
            let alive: u64 = chunks.iter().filter(|(id, _, _)| needed(id)).map(size).sum();
            if alive * 2 < total || chunks.is_empty() || (many && total < SMALL_PACK) {
                merged_packs.push((path.clone(), file.clone()));
                for (id, h, no) in chunks {
                    dropped.push((id, no));
                    if needed(&id) { copy.push((id, h)) } else { left.push((id, h)) }
                }
            }
        }
        let pack = if copy.is_empty() { None } else { Some(write_pack(&self.dir, self.pack_no, &self.id_key, copy.into_iter())?) };
        let base = Base { seq: self.seq, recv_ns: self.recv_ns, tree, mirror };
        Ok(BuiltPrune {
            plan_seq: self.seq,
            drop_segments: self.drop_segments,
            segment_files: self.segment_files,
            base: Arc::new(base),
            left,
            dropped,
            pack,
            merged_packs,
            dir: self.dir,
            id_key: self.id_key,
            pack_no: self.pack_no,
        })
    }
}

impl Cleanup {
    /// Writes the new base, then removes the pruned segments and merged packs (a crash in
    /// between leaves files the next open removes or ignores).
    pub fn finish(self) -> Result<(), ShadowError> {
        let b = &self.base;
        let file = BaseFile { version: 1, seq: b.seq, recv_ns: b.recv_ns, tree: b.tree.encode(), mirror: b.mirror.as_ref().map(|m| m.encode()) };
        let body = postcard::to_allocvec(&file).map_err(|e| ShadowError::Corrupt { what: "base".into(), detail: e.to_string() })?;
        let mut out = Vec::with_capacity(20 + body.len());
        out.extend_from_slice(BASE_MAGIC);
        out.extend_from_slice(&blake3::hash(&body).as_bytes()[..16]);
        out.extend_from_slice(&body);
        write_atomic(&self.dir, "base.ksb", &out)?;
        for p in &self.remove {
            std::fs::remove_file(p).map_err(|e| ShadowError::io(p, e))?;
        }
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| ShadowError::io(&self.dir, e))
    }
}

/// Whether `op` touches `p` or anything below it (a rename when either end does).
fn touches(op: &Op, p: &[u8]) -> bool {
    match op {
        Op::Put { path: q, .. } | Op::Delete { path: q } | Op::Pages { path: q, .. } => path::within(q, p) || path::within(p, q),
        Op::Rename { from, to } => path::within(from, p) || path::within(to, p) || path::within(p, from) || path::within(p, to),
    }
}

/// Calls `f` with the receive time and decoded batch of each frame of the segment at `path`
/// from byte `from` to `end` (each checked again), while it returns true.
fn read_frames(path: &Path, file: &File, from: u64, end: u64, mut f: impl FnMut(i64, BatchMeta, u64) -> bool) -> Result<(), ShadowError> {
    let mut body = Vec::new();
    let mut pos = from;
    while pos < end {
        let corrupt = |detail: String| ShadowError::Corrupt { what: path.display().to_string(), detail: format!("frame at byte {pos}: {detail}") };
        let (recv_ns, next) = read_frame(file, pos, end, &mut body).map_err(corrupt)?;
        let (meta, data_off) = BatchMeta::decode(&body).map_err(corrupt)?;
        if !f(recv_ns, meta, pos + (HEADER + data_off) as u64) {
            break;
        }
        pos = next;
    }
    Ok(())
}

/// Reads the frame at `off` of a segment whose frames end at `end` into `body`, checking it;
/// returns its receive time and where the next frame starts.
fn read_frame(file: &File, off: u64, end: u64, body: &mut Vec<u8>) -> Result<(i64, u64), String> {
    let mut h = [0u8; HEADER];
    if off + HEADER as u64 > end {
        return Err("header beyond the frames".into());
    }
    file.read_exact_at(&mut h, off).map_err(|e| format!("header unreadable: {e}"))?;
    if &h[..4] != MAGIC {
        return Err("not a frame".into());
    }
    let recv = i64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    let len = u64::from(u32::from_le_bytes([h[12], h[13], h[14], h[15]]));
    let next = off + HEADER as u64 + len;
    if next > end {
        return Err("body beyond the frames".into());
    }
    body.resize(len as usize, 0);
    file.read_exact_at(body, off + HEADER as u64).map_err(|e| format!("body unreadable: {e}"))?;
    if blake3::hash(body).as_bytes()[..16] != h[16..32] {
        return Err("checksum mismatch".into());
    }
    Ok((recv, next))
}

/// Writes `dir/name` whole or not at all (temporary file, sync, rename, directory sync).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ShadowError> {
    let tmp = dir.join(format!(".tmp-{name}"));
    let dst = dir.join(name);
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)?;
        File::open(dir)?.sync_all()
    })();
    r.map_err(|e| ShadowError::io(&dst, e))
}

/// Writes pack number `no` of the given chunks (each read and verified); returns its path and
/// chunk list.
fn write_pack(dir: &Path, no: u64, id_key: &[u8; 32], chunks: impl Iterator<Item = (Id, ChunkHandle)>) -> Result<(PathBuf, Vec<ChunkMeta>), ShadowError> {
    let mut list = Vec::new();
    let mut data = Vec::new();
    for (_, h) in chunks {
        let stored = h.read_stored()?;
        open_chunk(id_key, &h.meta, &stored).map_err(|detail| ShadowError::Corrupt { what: format!("journal chunk {}", h.meta.id.short()), detail })?;
        list.push(h.meta);
        data.extend_from_slice(&stored);
    }
    let meta = postcard::to_allocvec(&list).map_err(|e| ShadowError::Corrupt { what: "pack".into(), detail: e.to_string() })?;
    let mut out = Vec::with_capacity(24 + meta.len() + data.len());
    out.extend_from_slice(PACK_MAGIC);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&blake3::hash(&meta).as_bytes()[..16]);
    out.extend_from_slice(&meta);
    out.extend_from_slice(&data);
    let name = format!("pack-{no:08}.ksp");
    write_atomic(dir, &name, &out)?;
    Ok((dir.join(name), list))
}

/// Reads `base.ksb` (the empty base when there is none).
fn load_base(p: &Path) -> Result<Base, ShadowError> {
    let b = match std::fs::read(p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Base::default()),
        Err(e) => return Err(ShadowError::io(p, e)),
    };
    let corrupt = |detail: String| ShadowError::Corrupt { what: p.display().to_string(), detail };
    if b.len() < 20 || &b[..4] != BASE_MAGIC {
        return Err(corrupt("not a journal base".into()));
    }
    if blake3::hash(&b[20..]).as_bytes()[..16] != b[4..20] {
        return Err(corrupt("checksum mismatch".into()));
    }
    let f: BaseFile = postcard::from_bytes(&b[20..]).map_err(|e| corrupt(e.to_string()))?;
    if f.version != 1 {
        return Err(corrupt(format!("version {} not understood", f.version)));
    }
    let tree = crate::Manifest::decode(&f.tree).map_err(corrupt)?;
    let mirror = f.mirror.map(|m| crate::Manifest::decode(&m)).transpose().map_err(corrupt)?;
    Ok(Base { seq: f.seq, recv_ns: f.recv_ns, tree, mirror })
}

/// The stream's files: `stream.json` (its secret and epoch), beside the journal's segments.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StreamFile {
    /// Format version (1).
    pub version: u32,
    /// 32 random bytes, hex: the chunk id key and the chunker's seed derive from it.
    pub secret: String,
    /// Failover epoch.
    pub epoch: u64,
    /// The mirror directory this stream owns (recorded on first use: a stream never empties a
    /// directory that was not its own).
    #[serde(default)]
    pub mirror: Option<std::path::PathBuf>,
    /// Set by a promotion: the stream's mirror is the primary copy (never written by the
    /// applier again) and appends continue at the new epoch.
    #[serde(default)]
    pub primary: bool,
    /// The newest record of the old epoch (the state the mirror was promoted at).
    #[serde(default)]
    pub promoted_seq: u64,
    /// The newest record of the epoch a promoted stream was handed back at (`kura shadow
    /// demote`; 0 when never): a follower that applied it may push at the new epoch.
    #[serde(default)]
    pub demoted_seq: u64,
}

impl StreamFile {
    /// Reads `dir/stream.json`, or creates it with a fresh secret when `create`.
    pub fn load(dir: &Path, create: bool) -> Result<StreamFile, ShadowError> {
        let p = dir.join("stream.json");
        match std::fs::read(&p) {
            Ok(b) => {
                let f: StreamFile = serde_json::from_slice(&b).map_err(|e| ShadowError::Corrupt { what: p.display().to_string(), detail: e.to_string() })?;
                if f.version != 1 || f.secret_bytes().is_none() {
                    return Err(ShadowError::Corrupt { what: p.display().to_string(), detail: format!("version {} or secret not understood", f.version) });
                }
                Ok(f)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut s = [0u8; 32];
                getrandom::fill(&mut s).map_err(|e| ShadowError::io(&p, std::io::Error::other(e.to_string())))?;
                let f = StreamFile { version: 1, secret: hex::encode(s), epoch: 1, mirror: None, primary: false, promoted_seq: 0, demoted_seq: 0 };
                f.save(dir)?;
                Ok(f)
            }
            Err(e) => Err(ShadowError::io(&p, e)),
        }
    }

    /// Writes it atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ShadowError> {
        std::fs::create_dir_all(dir).map_err(|e| ShadowError::io(dir, e))?;
        let (p, tmp) = (dir.join("stream.json"), dir.join(".stream.json.tmp"));
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        let r = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)?;
            File::open(dir)?.sync_all()
        })();
        r.map_err(|e| ShadowError::io(&p, e))
    }

    fn secret_bytes(&self) -> Option<[u8; 32]> {
        hex::decode(&self.secret).ok()?.try_into().ok()
    }

    /// The key chunk ids are keyed with.
    pub fn id_key(&self) -> [u8; 32] {
        blake3::derive_key("kura shadow chunk id 2026", &self.secret_bytes().unwrap_or_default())
    }

    /// The chunker's gear seed.
    pub fn chunker_seed(&self) -> u64 {
        let k = blake3::derive_key("kura shadow chunker seed 2026", &self.secret_bytes().unwrap_or_default());
        u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{BATCH_VERSION, Record};
    use kura_repo::{Node, NodeKind};

    pub(super) fn batch(key: &[u8; 32], seq: u64, name: &str, content: &[u8]) -> (Vec<u8>, BatchMeta, usize) {
        let id = Id(*blake3::keyed_hash(key, content).as_bytes());
        let z = zstd::bulk::compress(content, 1).unwrap();
        let mut node = Node::new(Vec::new(), NodeKind::File);
        node.content = vec![id];
        node.size = content.len() as u64;
        let meta = BatchMeta {
            version: BATCH_VERSION,
            epoch: 1,
            records: vec![Record { seq, at_ns: 0, op: Op::Put { path: name.as_bytes().to_vec(), node: Box::new(node) } }],
            chunks: vec![ChunkMeta { id, raw_len: content.len() as u32, zlen: z.len() as u32 }],
        };
        let body = meta.encode(&z);
        let (m, off) = BatchMeta::decode(&body).unwrap();
        (body, m, off)
    }

    /// `n` records from `first`, each a file of its own content, in one batch.
    fn several(key: &[u8; 32], first: u64, n: u64) -> (Vec<u8>, BatchMeta, usize) {
        let mut records = Vec::new();
        let (mut chunks, mut data) = (Vec::new(), Vec::new());
        for seq in first..first + n {
            let content: Vec<u8> = (0..200 + seq * 37 % 1300).map(|i| (i * seq) as u8).collect();
            let id = Id(*blake3::keyed_hash(key, &content).as_bytes());
            let z = zstd::bulk::compress(&content, 1).unwrap();
            let mut node = Node::new(Vec::new(), NodeKind::File);
            node.content = vec![id];
            node.size = content.len() as u64;
            records.push(Record { seq, at_ns: seq as i64, op: Op::Put { path: format!("f{seq}").into_bytes(), node: Box::new(node) } });
            chunks.push(ChunkMeta { id, raw_len: content.len() as u32, zlen: z.len() as u32 });
            data.extend_from_slice(&z);
        }
        let body = BatchMeta { version: BATCH_VERSION, epoch: 1, records, chunks }.encode(&data);
        let (m, off) = BatchMeta::decode(&body).unwrap();
        (body, m, off)
    }

    /// Every way of reading the records agrees with `want` (seq, receive time), whether they
    /// come from memory or are read back from the segments.
    fn reads_agree(j: &Journal, want: &[(u64, i64)]) {
        let base = j.base().seq;
        let kept: Vec<(u64, i64)> = want.iter().copied().filter(|w| w.0 > base).collect();
        assert_eq!(j.len(), kept.len() as u64);
        for after in base..=j.head() {
            let got: Vec<(u64, i64)> = j.records(after, u64::MAX, usize::MAX).unwrap().iter().map(|e| (e.seq, e.recv_ns)).collect();
            assert_eq!(got, kept.iter().copied().filter(|w| w.0 > after).collect::<Vec<_>>(), "records after {after}");
            let two: Vec<u64> = j.records(after, after + 5, 2).unwrap().iter().map(|e| e.seq).collect();
            assert_eq!(two, (after + 1..=(after + 2).min(j.head())).collect::<Vec<_>>());
        }
        for &(seq, recv) in &kept {
            assert_eq!(j.time_of(seq).unwrap(), recv);
            let newest = kept.iter().take_while(|w| w.1 <= recv).last().unwrap().0;
            assert_eq!(j.seq_at(recv).unwrap(), newest);
            let before = kept.iter().take_while(|w| w.1 < recv).last().map_or(base, |w| w.0);
            assert_eq!(j.seq_at(recv - 1).unwrap(), before);
        }
        for &(_, since) in kept.iter().step_by(7) {
            let mut got = Vec::new();
            j.touching(None, since, |e| got.push(e.seq)).unwrap();
            assert_eq!(got, kept.iter().filter(|w| w.1 >= since).map(|w| w.0).collect::<Vec<_>>(), "records since {since}");
        }
        let mut got = Vec::new();
        j.touching(Some(format!("f{}", j.head() / 2).as_bytes()), i64::MIN, |e| got.push(e.seq)).unwrap();
        assert_eq!(got, if j.head() / 2 > base { vec![j.head() / 2] } else { vec![] });
        for seq in [base, (base + j.head()) / 2, j.head()] {
            let m = j.manifest_at(seq).unwrap();
            assert!((1..=seq).all(|s| m.get(format!("f{s}").as_bytes()).is_some()) && m.len() as u64 == seq, "tree at {seq}");
        }
    }

    #[test]
    fn records_beyond_the_memory_tail_are_read_back_from_the_segments() {
        let d = tempfile::tempdir().unwrap();
        let key = [9u8; 32];
        let limits = (7, 600, HOT_ENTRIES);
        let mut j = Journal::open_with(d.path(), key, false, limits).unwrap();
        let mut want = Vec::new();
        let mut seq = 1;
        for i in 0..60u64 {
            // A new segment every tenth batch; several frames (and marks) in each.
            j.set_segment_age(if i % 10 == 0 { std::time::Duration::ZERO } else { std::time::Duration::from_secs(3600) });
            if i % 10 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let n = i % 4 + 1;
            let (body, m, off) = several(&key, seq, n);
            let recv = j.append(&body, &m, off).unwrap();
            want.extend((seq..seq + n).map(|s| (s, recv)));
            seq += n;
        }
        assert!(j.segments.len() >= 5 && j.tail.len() == 7 && j.segments.iter().map(|s| s.marks.len()).sum::<usize>() > 20);
        reads_agree(&j, &want);
        drop(j);
        // Reopened, writable and read-only: the same records, rebuilt from the segments.
        reads_agree(&Journal::open_with(d.path(), key, true, limits).unwrap(), &want);
        let mut j = Journal::open_with(d.path(), key, false, (3, 2000, HOT_ENTRIES)).unwrap();
        reads_agree(&j, &want);
        // Pruned: what is left reads the same, from the new base on.
        let upto = want[want.len() / 2].0;
        let plan = j.prune_plan(i64::MAX, upto).unwrap().unwrap();
        let c = j.prune_commit(plan.build(&std::collections::BTreeSet::new(), &Default::default()).unwrap()).unwrap();
        c.finish().unwrap();
        assert!(j.base().seq > 0 && j.base().seq <= upto);
        assert_eq!(j.base().tree.len() as u64, j.base().seq, "the base folds every pruned record");
        assert_eq!(j.base().recv_ns, want.iter().find(|w| w.0 == j.base().seq).unwrap().1);
        reads_agree(&j, &want);
        // A byte of an old frame damaged after the open: reading it back is an error naming the
        // segment, the records in memory still read.
        let s = &j.segments[0];
        let mut b = [0u8; 1];
        s.file.read_exact_at(&mut b, HEADER as u64 + 5).unwrap();
        OpenOptions::new().write(true).open(&s.path).unwrap().write_all_at(&[b[0] ^ 0x40], HEADER as u64 + 5).unwrap();
        let e = j.manifest_at(j.head()).unwrap_err();
        assert!(matches!(&e, ShadowError::Corrupt { what, detail } if what.ends_with(".ksj") && detail.contains("checksum mismatch")), "{e}");
        assert_eq!(j.records(j.head() - 2, u64::MAX, 10).unwrap().len(), 2);
    }

    #[test]
    fn appends_survive_reopen_and_a_torn_tail_is_cut() {
        let d = tempfile::tempdir().unwrap();
        let key = [3u8; 32];
        let mut j = Journal::open(d.path(), key, false).unwrap();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let (body, m, off) = batch(&key, i as u64 + 1, name, name.repeat(1000).as_bytes());
            j.append(&body, &m, off).unwrap();
        }
        let id = match &j.next_after(1).unwrap().unwrap().op {
            Op::Put { node, .. } => node.content[0],
            _ => unreachable!(),
        };
        assert_eq!(j.chunk(&id).unwrap().unwrap().read(&key).unwrap(), "b".repeat(1000).as_bytes());
        drop(j);
        // A crash mid-append: half a frame at the end.
        let seg = d.path().join(seg_name(1, 0));
        // The segment goes on with the zeros written ahead; a torn frame lies in them.
        let full = std::fs::read(&seg).unwrap();
        let end = full.len() - full.iter().rev().take_while(|&&b| b == 0).count();
        assert!(full.len() as u64 > PREALLOC, "{} bytes, frames end at {end}", full.len());
        let (body, ..) = batch(&key, 4, "d", b"dddd");
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[MAGIC.as_slice(), &[0; 12], &body[..10]].concat(), end as u64).unwrap();
        drop(f);
        let mut j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!(j.head(), 3);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), end as u64);
        assert_eq!(j.manifest_at(2).unwrap().len(), 2);
        // Appends go on where the frames end, and a reopen over the zeros finds them all.
        let (body, m, off) = batch(&key, 4, "d", b"dddd");
        j.append(&body, &m, off).unwrap();
        drop(j);
        let mut j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!(j.head(), 4);
        let (body, m, off) = batch(&key, 5, "e", b"eeee");
        j.append(&body, &m, off).unwrap();
        drop(j);
        let j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!(j.head(), 5);
        assert_eq!(j.manifest_at(5).unwrap().len(), 5);
        // A flipped byte in an acknowledged frame of an earlier segment is not silently dropped.
        drop(j);
        let mut b = std::fs::read(&seg).unwrap();
        b[HEADER + 20] ^= 1;
        std::fs::write(&seg, &b).unwrap();
        // Damage mid-segment is reported even in the last segment.
        assert!(matches!(Journal::open(d.path(), key, true), Err(ShadowError::Corrupt { .. })));
        std::fs::write(d.path().join(seg_name(9, 1)), b"").unwrap();
        assert!(matches!(Journal::open(d.path(), key, true), Err(ShadowError::Corrupt { .. })));
    }

    #[test]
    fn a_closed_segment_keeps_no_zeros_written_ahead() {
        let d = tempfile::tempdir().unwrap();
        let key = [4u8; 32];
        let mut j = Journal::open(d.path(), key, false).unwrap();
        j.set_segment_age(std::time::Duration::from_nanos(1));
        for (i, name) in ["a", "b"].iter().enumerate() {
            let (body, m, off) = batch(&key, i as u64 + 1, name, name.repeat(1000).as_bytes());
            j.append(&body, &m, off).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let (_, bytes) = j.sizes();
        let (first, last) = (d.path().join(seg_name(1, 0)), d.path().join(seg_name(2, 1)));
        let (first, last) = (std::fs::metadata(first).unwrap().len(), std::fs::metadata(last).unwrap().len());
        assert!(last >= PREALLOC, "the open segment has {last} bytes");
        assert_eq!(first, bytes - (last - PREALLOC), "the closed segment is its frames alone");
        drop(j);
        assert_eq!(Journal::open(d.path(), key, true).unwrap().head(), 2);
    }
}

#[cfg(test)]
mod prune_tests {
    use super::*;
    use crate::record::{BATCH_VERSION, Record};
    use std::collections::BTreeSet;

    use super::tests::batch as put;

    fn delete(seq: u64, name: &str) -> (Vec<u8>, BatchMeta, usize) {
        let meta = BatchMeta { version: BATCH_VERSION, epoch: 1, records: vec![Record { seq, at_ns: 0, op: Op::Delete { path: name.as_bytes().to_vec() } }], chunks: vec![] };
        let body = meta.encode(&[]);
        let (m, off) = BatchMeta::decode(&body).unwrap();
        (body, m, off)
    }

    fn content_of(j: &Journal, m: &crate::Manifest, name: &str) -> Vec<u8> {
        let node = m.get(name.as_bytes()).unwrap_or_else(|| panic!("{name} missing"));
        node.content.iter().flat_map(|id| j.chunk(id).unwrap().unwrap_or_else(|| panic!("chunk of {name} gone")).read(j.id_key()).unwrap()).collect()
    }

    /// a, b put; a deleted; c put; each in its own segment (the first three pruned).
    fn journal(dir: &Path, key: [u8; 32]) -> Journal {
        journal_written(dir, key, false)
    }

    /// The same, the index written out of memory after each append when `written`.
    fn journal_written(dir: &Path, key: [u8; 32], written: bool) -> Journal {
        let mut j = Journal::open(dir, key, false).unwrap();
        j.set_segment_age(std::time::Duration::ZERO);
        for (seq, (body, m, off)) in [put(&key, 1, "a", &[b'a'; 3000]), put(&key, 2, "b", &[b'b'; 3000]), delete(3, "a"), put(&key, 4, "c", &[b'c'; 3000])].into_iter().enumerate() {
            std::thread::sleep(std::time::Duration::from_millis(2));
            j.append(&body, &m, off).unwrap();
            assert_eq!(j.head(), seq as u64 + 1);
            if written {
                j.write_out(1, None).unwrap();
                assert_eq!(j.index_in_memory(), 0);
            }
        }
        j
    }

    fn segments(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".ksj")).count()
    }

    #[test]
    fn pruning_folds_old_records_into_the_base_and_keeps_only_live_chunks() {
        for written in [false, true] {
            pruning_folds(written);
        }
    }

    fn pruning_folds(written: bool) {
        let d = tempfile::tempdir().unwrap();
        let key = [5u8; 32];
        let mut j = journal_written(d.path(), key, written);
        assert_eq!(segments(d.path()), 4);
        let a_id = j.manifest_at(1).unwrap().get(b"a").unwrap().content[0];
        let before = j.time_of(4).unwrap();
        // Record 4 is not yet applied: only 1..=3 may go.
        let plan = j.prune_plan(before, 3).unwrap().unwrap();
        let built = plan.build(&BTreeSet::new(), &Default::default()).unwrap();
        let c = j.prune_commit(built).unwrap();
        assert_eq!(c.records, 3);
        c.finish().unwrap();
        assert_eq!((j.base().seq, j.head(), j.len() as usize), (3, 4, 1));
        assert!(!j.has_chunk(&a_id).unwrap(), "a chunk only a deleted file named stays");
        assert_eq!(j.sizes().0, 2);
        if written {
            // A run naming only files gone is dropped at the next write-out.
            j.write_out(1, None).unwrap();
            assert!(j.chunks.get(&a_id, |_| true).unwrap().is_none());
            assert!(!j.has_chunk(&a_id).unwrap());
        }
        let m = j.manifest_at(4).unwrap();
        assert_eq!(content_of(&j, &m, "b"), vec![b'b'; 3000]);
        assert_eq!(content_of(&j, &m, "c"), vec![b'c'; 3000]);
        assert!(m.get(b"a").is_none());
        assert_eq!(segments(d.path()), 1);
        assert!(d.path().join("pack-00000001.ksp").exists());
        // Moments before the base resolve to it; the oldest is its time.
        assert_eq!(j.seq_at(0).unwrap(), 3);
        assert_eq!(j.oldest_time(), j.base().recv_ns);
        assert!(j.prune_plan(i64::MAX, 4).unwrap().is_none(), "the segment appends go to is never dropped");
        drop(j);
        let j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!((j.base().seq, j.head()), (3, 4));
        let m = j.manifest_at(4).unwrap();
        assert_eq!(content_of(&j, &m, "b"), vec![b'b'; 3000]);
        assert_eq!(content_of(&j, &m, "c"), vec![b'c'; 3000]);
        // A damaged base is reported, not taken for an empty one.
        drop(j);
        let p = d.path().join("base.ksb");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(Journal::open(d.path(), key, true), Err(ShadowError::Corrupt { .. })));
    }

    #[test]
    fn a_deletion_the_mirror_never_got_keeps_its_files_chunks() {
        let d = tempfile::tempdir().unwrap();
        let key = [6u8; 32];
        let mut j = journal(d.path(), key);
        let plan = j.prune_plan(j.time_of(4).unwrap(), 3).unwrap().unwrap();
        let skip: BTreeSet<u64> = [3].into();
        let c = j.prune_commit(plan.build(&skip, &Default::default()).unwrap()).unwrap();
        c.finish().unwrap();
        let mirror = j.manifest_skipping(4, &skip).unwrap();
        assert_eq!(content_of(&j, &mirror, "a"), vec![b'a'; 3000]);
        assert!(j.manifest_at(4).unwrap().get(b"a").is_none());
        drop(j);
        let j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!(content_of(&j, &j.manifest_skipping(4, &skip).unwrap(), "a"), vec![b'a'; 3000]);
    }

    #[test]
    fn a_pruning_round_killed_at_any_step_leaves_a_journal_that_opens_whole() {
        let key = [7u8; 32];
        // Killed after the pack was written, before the base: the old base and every segment
        // still stand; the pack's copies are harmless.
        let d = tempfile::tempdir().unwrap();
        let j = journal(d.path(), key);
        let plan = j.prune_plan(j.time_of(4).unwrap(), 3).unwrap().unwrap();
        let built = plan.build(&BTreeSet::new(), &Default::default()).unwrap();
        drop(built);
        drop(j);
        std::fs::write(d.path().join(".tmp-base.ksb"), b"half").unwrap();
        let j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!((j.base().seq, j.head(), j.len() as usize), (0, 4, 4));
        assert_eq!(content_of(&j, &j.manifest_at(1).unwrap(), "a"), vec![b'a'; 3000]);
        assert!(!d.path().join(".tmp-base.ksb").exists());
        // Killed after the base was written, before the segments were removed: the next open
        // removes them.
        let d = tempfile::tempdir().unwrap();
        let mut j = journal(d.path(), key);
        let saved: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "ksj"))
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        let plan = j.prune_plan(j.time_of(4).unwrap(), 3).unwrap().unwrap();
        j.prune_commit(plan.build(&BTreeSet::new(), &Default::default()).unwrap()).unwrap().finish().unwrap();
        drop(j);
        for (p, b) in &saved {
            std::fs::write(p, b).unwrap();
        }
        assert_eq!(segments(d.path()), 4);
        let j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!((j.base().seq, j.head(), j.len() as usize), (3, 4, 1));
        assert_eq!(segments(d.path()), 1);
        let m = j.manifest_at(4).unwrap();
        assert_eq!(content_of(&j, &m, "b"), vec![b'b'; 3000]);
        assert_eq!(content_of(&j, &m, "c"), vec![b'c'; 3000]);
    }

    /// A chunk stored in two segments that leave in the same round, named by the tree that
    /// stays: it moves into the pack from the copy the index names.
    #[test]
    fn a_chunk_stored_in_two_pruned_segments_stays() {
        for written in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let key = [4u8; 32];
            let mut j = Journal::open(d.path(), key, false).unwrap();
            j.set_segment_age(std::time::Duration::ZERO);
            let same = vec![b's'; 2000];
            for (body, m, off) in [put(&key, 1, "x", &same), put(&key, 2, "y", &same), put(&key, 3, "z", b"other")] {
                std::thread::sleep(std::time::Duration::from_millis(2));
                j.append(&body, &m, off).unwrap();
            }
            if written {
                j.write_out(1, None).unwrap();
            }
            let plan = j.prune_plan(j.time_of(3).unwrap(), 2).unwrap().unwrap();
            j.prune_commit(plan.build(&BTreeSet::new(), &Default::default()).unwrap()).unwrap().finish().unwrap();
            assert_eq!(j.base().seq, 2);
            let m = j.manifest_at(3).unwrap();
            assert_eq!(content_of(&j, &m, "x"), same, "written out: {written}");
            assert_eq!(content_of(&j, &m, "y"), same);
            drop(j);
            let j = Journal::open(d.path(), key, true).unwrap();
            assert_eq!(content_of(&j, &j.manifest_at(3).unwrap(), "x"), same);
        }
    }

    /// A put of `name` naming a chunk the journal already holds, without carrying it.
    fn put_held(seq: u64, name: &str, id: Id, len: usize) -> (Vec<u8>, BatchMeta, usize) {
        let mut node = kura_repo::Node::new(Vec::new(), kura_repo::NodeKind::File);
        node.content = vec![id];
        node.size = len as u64;
        let meta = BatchMeta { version: BATCH_VERSION, epoch: 1, records: vec![Record { seq, at_ns: 0, op: Op::Put { path: name.as_bytes().to_vec(), node: Box::new(node) } }], chunks: vec![] };
        let body = meta.encode(&[]);
        let (m, off) = BatchMeta::decode(&body).unwrap();
        (body, m, off)
    }

    /// Appends, re-stored and re-named chunks, deletions, pruning rounds and reopens, with the
    /// index written out of memory at odd moments: every chunk the base or a kept record names
    /// stays readable, and the index answers as one rebuilt in memory from the files does.
    #[test]
    fn the_index_written_out_of_memory_answers_as_memory_does() {
        let d = tempfile::tempdir().unwrap();
        let key = [8u8; 32];
        let mut j = Journal::open(d.path(), key, false).unwrap();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut contents: Vec<Vec<u8>> = Vec::new();
        let mut seen: Vec<Id> = Vec::new();
        let (mut pruned, mut written) = (0, 0);
        for step in 0..400u64 {
            let seq = j.head() + 1;
            let name = format!("f{}", next() % 12);
            let r = next() % 10;
            let (body, m, off) = if r < 5 || contents.is_empty() {
                let c: Vec<u8> = (0..300 + next() % 700).map(|_| next() as u8).collect();
                contents.push(c.clone());
                put(&key, seq, &name, &c)
            } else if r < 7 {
                // A chunk stored before, carried again.
                let c = contents[(next() % contents.len() as u64) as usize].clone();
                put(&key, seq, &name, &c)
            } else if r < 9 {
                let c = &contents[(next() % contents.len() as u64) as usize];
                let id = Id(*blake3::keyed_hash(&key, c).as_bytes());
                if j.has_chunk(&id).unwrap() { put_held(seq, &name, id, c.len()) } else { put(&key, seq, &name, c) }
            } else {
                delete(seq, &name)
            };
            seen.extend(m.chunks.iter().map(|c| c.id));
            j.set_segment_age(if next() % 4 == 0 { std::time::Duration::ZERO } else { std::time::Duration::from_secs(3600) });
            std::thread::sleep(std::time::Duration::from_micros(50));
            j.append(&body, &m, off).unwrap();
            if next() % 5 == 0 {
                j.write_out(1 + (next() % 8) as usize, None).unwrap();
                written += 1;
            }
            if next() % 25 == 0 {
                let upto = j.head() - next() % 5;
                if let Some(plan) = j.prune_plan(crate::now_ns(), upto).unwrap() {
                    let built = plan.build(&BTreeSet::new(), &Default::default()).unwrap();
                    // Records appended while the round was built name chunks it left behind.
                    for c in contents.iter().rev().take(40) {
                        let id = Id(*blake3::keyed_hash(&key, c).as_bytes());
                        if j.has_chunk(&id).unwrap() && next() % 3 == 0 {
                            let (body, m, off) = put_held(j.head() + 1, &format!("late{}", next() % 4), id, c.len());
                            j.append(&body, &m, off).unwrap();
                        }
                    }
                    j.prune_commit(built).unwrap().finish().unwrap();
                    pruned += 1;
                }
            }
            if step % 97 == 96 {
                drop(j);
                // Every other reopen writes the index out every few entries while it reads
                // the segments (runs and merges before the segment being read is listed).
                let hot = if step % 194 == 96 { 3 } else { HOT_ENTRIES };
                j = Journal::open_with(d.path(), key, false, (TAIL_RECORDS, MARK_BYTES, hot)).unwrap();
                assert!(hot == HOT_ENTRIES || j.index_in_memory() < 3);
            }
            // Every chunk still named reads back whole.
            let mut named: Vec<Id> = j.base().tree.chunk_ids().copied().collect();
            j.scan(0, |e| {
                named.extend(e.op.chunk_ids().copied());
                true
            })
            .unwrap();
            for id in &named {
                let h = j.chunk(id).unwrap().unwrap_or_else(|| panic!("step {step}: chunk {} named but gone", id.short()));
                h.read(&key).unwrap();
            }
            if step % 20 == 19 {
                let mem = Journal::open_with(d.path(), key, true, (TAIL_RECORDS, MARK_BYTES, if step % 40 == 19 { 2 } else { HOT_ENTRIES })).unwrap();
                assert_eq!(j.sizes().0, mem.sizes().0, "step {step}: chunk count");
                for id in &seen {
                    assert_eq!(j.has_chunk(id).unwrap(), mem.has_chunk(id).unwrap(), "step {step}: chunk {}", id.short());
                }
            }
        }
        assert!(pruned >= 5 && written >= 40, "pruned {pruned}, written {written}");
    }
}
