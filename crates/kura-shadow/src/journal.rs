//! The standby's journal: append-only segment files of frames, each a batch exactly as the
//! primary sent it, stamped with the standby's receive time and made durable before it is
//! acknowledged. Opening it rebuilds the record list and the chunk index; a torn last frame (a
//! crash mid-append, never acknowledged) is cut off.
//!
//! Frame: `"KSJ1" | recv_ns i64 LE | body_len u32 LE | BLAKE3(body)[..16] | body`.

use crate::record::{BatchMeta, ChunkMeta, Op, open_chunk};
use crate::{ShadowError, path};
use kura_repo::Id;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"KSJ1";
const HEADER: usize = 32;
/// A segment is closed and a new one started beyond this size.
const SEGMENT_BYTES: u64 = 64 << 20;

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
    len: u64,
}

#[derive(Clone, Copy)]
struct Loc {
    seg: usize,
    off: u64,
    meta: ChunkMeta,
}

/// An open journal (one writer: the stream that owns it, or a read-only restore).
pub struct Journal {
    dir: PathBuf,
    id_key: [u8; 32],
    segments: Vec<Segment>,
    entries: Vec<Entry>,
    chunks: HashMap<Id, Loc>,
    last_recv: i64,
    read_only: bool,
}

/// A segment's name: its first record and its place among the segments (a batch of chunks
/// alone starts a segment at the same record as the next one may).
fn seg_name(first_seq: u64, index: usize) -> String {
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
    /// Reads, decompresses and verifies the chunk.
    pub fn read(&self, id_key: &[u8; 32]) -> Result<Vec<u8>, ShadowError> {
        let mut buf = vec![0; self.meta.zlen as usize];
        self.file
            .read_exact_at(&mut buf, self.off)
            .map_err(|e| ShadowError::Corrupt { what: format!("chunk {}", self.meta.id.short()), detail: e.to_string() })?;
        open_chunk(id_key, &self.meta, &buf).map_err(|detail| ShadowError::Corrupt { what: "journal".into(), detail })
    }
}

impl Journal {
    /// Opens (or, when `create`, makes) the journal in `dir`. Read-only opens never cut a torn
    /// tail; they just stop before it.
    pub fn open(dir: &Path, id_key: [u8; 32], read_only: bool) -> Result<Journal, ShadowError> {
        if !read_only {
            std::fs::create_dir_all(dir).map_err(|e| ShadowError::io(dir, e))?;
        }
        let mut names: Vec<((u64, u64), PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| ShadowError::io(dir, e))? {
            let e = e.map_err(|e| ShadowError::io(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = parse_seg_name(&name) {
                names.push((n, e.path()));
            }
        }
        names.sort();
        let mut j = Journal { dir: dir.to_path_buf(), id_key, segments: Vec::new(), entries: Vec::new(), chunks: HashMap::new(), last_recv: 0, read_only };
        let count = names.len();
        for (i, ((first, _), p)) in names.into_iter().enumerate() {
            j.load_segment(&p, first, i + 1 == count)?;
        }
        Ok(j)
    }

    fn load_segment(&mut self, p: &Path, first: u64, last: bool) -> Result<(), ShadowError> {
        let file = OpenOptions::new().read(true).write(!self.read_only).open(p).map_err(|e| ShadowError::io(p, e))?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).map_err(|e| ShadowError::io(p, e))?;
        let seg = self.segments.len();
        let corrupt = |detail: String| ShadowError::Corrupt { what: p.display().to_string(), detail };
        let mut pos = 0usize;
        let mut expect = first;
        while pos < bytes.len() {
            // A frame is torn (never acknowledged as durable) only if it reaches the end of
            // the file; a bad frame with more behind it is damage, reported and not cut.
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
                    return Err(("checksum mismatch", end == bytes.len()));
                }
                Ok((recv, body))
            })();
            let (recv, body) = match frame {
                Ok(f) => f,
                Err((why, true)) if last => {
                    // Never acknowledged: the append that wrote it did not finish.
                    tracing::warn!(segment = %p.display(), offset = pos, dropped = bytes.len() - pos, "journal ends in a torn frame ({why}); cutting it off");
                    if !self.read_only {
                        file.set_len(pos as u64).map_err(|e| ShadowError::io(p, e))?;
                        file.sync_all().map_err(|e| ShadowError::io(p, e))?;
                    }
                    break;
                }
                Err((why, _)) => return Err(corrupt(format!("frame at byte {pos}: {why}"))),
            };
            let (meta, data_off) = BatchMeta::decode(body).map_err(|e| corrupt(format!("frame at byte {pos}: {e}")))?;
            if meta.records.first().is_some_and(|r| r.seq != expect) {
                return Err(corrupt(format!("frame at byte {pos} starts at record {} where {expect} was due", meta.records[0].seq)));
            }
            self.index(seg, (pos + HEADER + data_off) as u64, &meta, recv);
            expect += meta.records.len() as u64;
            pos += HEADER + body.len();
        }
        if last && !self.read_only {
            // Frames a killed standby wrote but never synced may still be only in the page
            // cache: they count as durable from here on, so make them so.
            file.sync_data().map_err(|e| ShadowError::io(p, e))?;
        }
        self.segments.push(Segment { path: p.to_path_buf(), file: Arc::new(file), len: pos as u64 });
        Ok(())
    }

    fn index(&mut self, seg: usize, data_off: u64, meta: &BatchMeta, recv_ns: i64) {
        let mut off = data_off;
        for c in &meta.chunks {
            self.chunks.entry(c.id).or_insert(Loc { seg, off, meta: *c });
            off += u64::from(c.zlen);
        }
        self.last_recv = self.last_recv.max(recv_ns);
        for r in &meta.records {
            self.entries.push(Entry { seq: r.seq, at_ns: r.at_ns, recv_ns, op: r.op.clone() });
        }
    }

    /// Sequence number of the newest record (0 when empty).
    pub fn head(&self) -> u64 {
        self.entries.last().map(|e| e.seq).unwrap_or(0)
    }

    /// The records in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The stream's chunk id key.
    pub fn id_key(&self) -> &[u8; 32] {
        &self.id_key
    }

    /// Whether the journal holds a chunk.
    pub fn has_chunk(&self, id: &Id) -> bool {
        self.chunks.contains_key(id)
    }

    /// Number of distinct chunks held, and bytes of all segments.
    pub fn sizes(&self) -> (usize, u64) {
        (self.chunks.len(), self.segments.iter().map(|s| s.len).sum())
    }

    /// Where a chunk is, to read it without holding the journal.
    pub fn chunk(&self, id: &Id) -> Option<ChunkHandle> {
        self.chunks.get(id).map(|l| ChunkHandle { file: self.segments[l.seg].file.clone(), off: l.off, meta: l.meta })
    }

    /// Appends a checked batch (`body` as received, `meta` decoded from it). It is written but
    /// not yet durable: [`Journal::last_segment`] and a `sync_data` make it so (one sync covers
    /// every frame written before it, so concurrent appends share it). Returns the receive time
    /// recorded.
    pub fn append(&mut self, body: &[u8], meta: &BatchMeta, data_off: usize) -> Result<i64, ShadowError> {
        let recv_ns = crate::now_ns().max(self.last_recv);
        let first = meta.records.first().map(|r| r.seq).unwrap_or(self.head() + 1);
        if self.segments.last().is_none_or(|s| s.len >= SEGMENT_BYTES) {
            // A closed segment is durable before the next one starts: only the last one ever
            // needs a sync.
            if let Some(s) = self.segments.last() {
                s.file.sync_data().map_err(|e| ShadowError::io(&s.path, e))?;
            }
            let p = self.dir.join(seg_name(first, self.segments.len()));
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&p).map_err(|e| ShadowError::io(&p, e))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| ShadowError::io(&self.dir, e))?;
            self.segments.push(Segment { path: p, file: Arc::new(file), len: 0 });
        }
        let seg = self.segments.len() - 1;
        let s = &mut self.segments[seg];
        let mut frame = Vec::with_capacity(HEADER + body.len());
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(&recv_ns.to_le_bytes());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&blake3::hash(body).as_bytes()[..16]);
        frame.extend_from_slice(body);
        let at = s.len;
        let r = s.file.write_all_at(&frame, at);
        if let Err(e) = r {
            // Leave no partial frame for the next append to follow.
            let _ = s.file.set_len(at);
            return Err(ShadowError::io(&s.path, e));
        }
        s.len += frame.len() as u64;
        self.index(seg, at + (HEADER + data_off) as u64, meta, recv_ns);
        Ok(recv_ns)
    }

    /// The segment appends go to, to sync it without holding the journal.
    pub fn last_segment(&self) -> Option<(Arc<File>, PathBuf)> {
        self.segments.last().map(|s| (s.file.clone(), s.path.clone()))
    }

    /// The tree after every record up to and including `seq`.
    pub fn manifest_at(&self, seq: u64) -> crate::Manifest {
        self.manifest_skipping(seq, &std::collections::BTreeSet::new())
    }

    /// The same without the records in `skip` (deletions an operator discarded: the mirror's
    /// tree).
    pub fn manifest_skipping(&self, seq: u64, skip: &std::collections::BTreeSet<u64>) -> crate::Manifest {
        let mut m = crate::Manifest::default();
        for e in self.entries.iter().take_while(|e| e.seq <= seq) {
            if !skip.contains(&e.seq) {
                m.apply(&e.op);
            }
        }
        m
    }

    /// The newest record received at or before `t_ns` (0 when none).
    pub fn seq_at(&self, t_ns: i64) -> u64 {
        self.entries.iter().take_while(|e| e.recv_ns <= t_ns).last().map(|e| e.seq).unwrap_or(0)
    }

    /// Records touching `p` (or anything below it; a rename when either end does).
    pub fn touching<'a>(&'a self, p: &'a [u8]) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| match &e.op {
            Op::Put { path: q, .. } | Op::Delete { path: q } => path::within(q, p) || path::within(p, q),
            Op::Rename { from, to } => path::within(from, p) || path::within(to, p) || path::within(p, from) || path::within(p, to),
        })
    }
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
                let f = StreamFile { version: 1, secret: hex::encode(s), epoch: 1, mirror: None };
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

    fn batch(key: &[u8; 32], seq: u64, name: &str, content: &[u8]) -> (Vec<u8>, BatchMeta, usize) {
        let id = Id(*blake3::keyed_hash(key, content).as_bytes());
        let z = zstd::bulk::compress(content, 1).unwrap();
        let mut node = Node::new(Vec::new(), NodeKind::File);
        node.content = vec![id];
        node.size = content.len() as u64;
        let meta = BatchMeta {
            version: BATCH_VERSION,
            epoch: 1,
            records: vec![Record { seq, at_ns: 0, op: Op::Put { path: name.as_bytes().to_vec(), node } }],
            chunks: vec![ChunkMeta { id, raw_len: content.len() as u32, zlen: z.len() as u32 }],
        };
        let body = meta.encode(&z);
        let (m, off) = BatchMeta::decode(&body).unwrap();
        (body, m, off)
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
        let id = match &j.entries()[1].op {
            Op::Put { node, .. } => node.content[0],
            _ => unreachable!(),
        };
        assert_eq!(j.chunk(&id).unwrap().read(&key).unwrap(), "b".repeat(1000).as_bytes());
        drop(j);
        // A crash mid-append: half a frame at the end.
        let seg = d.path().join(seg_name(1, 0));
        let full = std::fs::metadata(&seg).unwrap().len();
        let (body, ..) = batch(&key, 4, "d", b"dddd");
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[MAGIC.as_slice(), &[0; 12], &body[..10]].concat()).unwrap();
        drop(f);
        let j = Journal::open(d.path(), key, false).unwrap();
        assert_eq!(j.head(), 3);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), full);
        assert_eq!(j.manifest_at(2).len(), 2);
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
}
