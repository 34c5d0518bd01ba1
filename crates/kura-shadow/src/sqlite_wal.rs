//! Reading a SQLite write-ahead log: its header, its frames, the cumulative checksum chain, and
//! the whole commits they form; applying a commit's pages to a database image. The first piece of
//! SQLite shadowing (docs/design/sqlite-shadow.md §1); formats from
//! <https://www.sqlite.org/fileformat2.html#walformat>.

// SQLite's formats are big-endian (and its checksum words in the order the magic names).
// The wal-index is in the host's byte order, as SQLite writes it in memory.
#![allow(clippy::big_endian_bytes, clippy::host_endian_bytes)]

use std::ops::Range;

/// Bytes of the WAL header.
pub const HEADER_LEN: usize = 32;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 24;

/// A WAL that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// Shorter than its header, wrong magic or version, a page size SQLite never uses, or a
    /// header checksum that does not match.
    #[error("not a SQLite write-ahead log: {0}")]
    BadHeader(String),
}

/// The WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksum words are read big-endian (magic `0x377f0683`), else little-endian.
    pub big_endian: bool,
    /// Database page size in bytes.
    pub page_size: usize,
    /// Checkpoint sequence number.
    pub checkpoint_seq: u32,
    /// The salts every valid frame of this WAL generation repeats.
    pub salt: [u32; 2],
    /// Checksum of the header's first 24 bytes: where the frames' chain starts.
    pub checksum: [u32; 2],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from `s`.
pub fn checksum(big_endian: bool, data: &[u8], s: [u32; 2]) -> [u32; 2] {
    let (mut s0, mut s1) = (s[0], s[1]);
    for w in data.chunks_exact(8) {
        let (a, b) = if big_endian {
            (u32::from_be_bytes([w[0], w[1], w[2], w[3]]), u32::from_be_bytes([w[4], w[5], w[6], w[7]]))
        } else {
            (u32::from_le_bytes([w[0], w[1], w[2], w[3]]), u32::from_le_bytes([w[4], w[5], w[6], w[7]]))
        };
        s0 = s0.wrapping_add(a).wrapping_add(s1);
        s1 = s1.wrapping_add(b).wrapping_add(s0);
    }
    [s0, s1]
}

/// Parses and checks the header.
pub fn parse_header(b: &[u8]) -> Result<WalHeader, WalError> {
    if b.len() < HEADER_LEN {
        return Err(WalError::BadHeader(format!("{} bytes, shorter than a header", b.len())));
    }
    let big_endian = match be32(b, 0) {
        0x377f_0682 => false,
        0x377f_0683 => true,
        m => return Err(WalError::BadHeader(format!("magic {m:#010x}"))),
    };
    if be32(b, 4) != 3_007_000 {
        return Err(WalError::BadHeader(format!("format version {}", be32(b, 4))));
    }
    let page_size = be32(b, 8) as usize;
    if !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) {
        return Err(WalError::BadHeader(format!("page size {page_size}")));
    }
    let header = WalHeader {
        big_endian,
        page_size,
        checkpoint_seq: be32(b, 12),
        salt: [be32(b, 16), be32(b, 20)],
        checksum: [be32(b, 24), be32(b, 28)],
    };
    if checksum(big_endian, &b[..24], [0, 0]) != header.checksum {
        return Err(WalError::BadHeader("header checksum does not match".into()));
    }
    Ok(header)
}

/// One committed transaction: its frames' pages and the database size after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Page number (1-based) and where its image lies in the WAL, in frame order; a page
    /// written twice appears twice, and the later frame wins.
    pub pages: Vec<(u32, Range<usize>)>,
    /// Database size in pages after the commit (the db may shrink or grow).
    pub db_pages: u32,
    /// Number (1-based) of the commit frame.
    pub last_frame: u32,
    /// The checksum chain at the commit frame: where the next commit's frames continue.
    pub checksum: [u32; 2],
}

/// The valid commits of a WAL, in order: frames are taken while their salts match the header
/// and the checksum chain holds, and only up to the last commit frame (what follows is a commit
/// still being written, or an older generation's frames). Frames after `from_frame` only: with
/// `from` = the frame number and checksum of an earlier commit, reading resumes after it.
pub fn commits(wal: &[u8], from: Option<(u32, [u32; 2])>) -> Result<(WalHeader, Vec<Commit>), WalError> {
    let h = parse_header(wal)?;
    let (frame, sum) = from.unwrap_or((0, h.checksum));
    let at = HEADER_LEN.saturating_add((frame as usize).saturating_mul(FRAME_HEADER_LEN + h.page_size));
    let mut out = commits_in(&h, wal.get(at..).unwrap_or(&[]), frame, sum);
    // Ranges into the whole log, as documented.
    for c in &mut out {
        for (_, r) in &mut c.pages {
            *r = r.start + at..r.end + at;
        }
    }
    Ok((h, out))
}

/// [`commits`] over `frames`, the log's bytes from frame `first + 1` on (a reader that already
/// holds the frames before need not read them again); `sum` is the checksum chain at frame
/// `first`. Page ranges index `frames`.
pub fn commits_in(h: &WalHeader, frames: &[u8], first: u32, sum: [u32; 2]) -> Vec<Commit> {
    walk(h, frames, first, sum).commits
}

/// Where [`walk`] stopped: the commits it found, the last valid frame and the checksum chain
/// at it, and the pages of frames after the last commit (a commit that goes on past `frames`,
/// or was never finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    /// Whole commits, in order.
    pub commits: Vec<Commit>,
    /// The last valid frame (`first` when none was).
    pub frame: u32,
    /// The checksum chain at `frame`.
    pub sum: [u32; 2],
    /// Pages of the valid frames after the last commit, as in [`Commit::pages`].
    pub pending: Vec<(u32, Range<usize>)>,
}

/// [`commits_in`], also telling where the valid frames end, so that a log read in pieces is
/// walked on from there (`frame`, `sum`) with the pages of a commit cut by a piece's end
/// (`pending`) carried over.
pub fn walk(h: &WalHeader, frames: &[u8], first: u32, sum: [u32; 2]) -> Walk {
    let frame_len = FRAME_HEADER_LEN + h.page_size;
    let (mut frame, mut sum) = (first, sum);
    let mut out = Vec::new();
    let mut pending = Vec::new();
    loop {
        let at = (frame - first) as usize * frame_len;
        let Some(f) = frames.get(at..at + frame_len) else { break };
        if [be32(f, 8), be32(f, 12)] != h.salt {
            break;
        }
        let s = checksum(h.big_endian, &f[FRAME_HEADER_LEN..], checksum(h.big_endian, &f[..8], sum));
        let page = be32(f, 0);
        if s != [be32(f, 16), be32(f, 20)] || page == 0 {
            break;
        }
        sum = s;
        frame += 1;
        pending.push((page, at + FRAME_HEADER_LEN..at + frame_len));
        let db_pages = be32(f, 4);
        if db_pages != 0 {
            out.push(Commit { pages: std::mem::take(&mut pending), db_pages, last_frame: frame, checksum: sum });
        }
    }
    Walk { commits: out, frame, sum, pending }
}

/// Applies a commit to a database image: its page images in frame order, then the size after
/// it (a shrinking commit truncates; pages a growing one does not carry are zeros).
/// Pages beyond the size after the commit are dropped by it anyway, so the image never grows
/// past that size.
pub fn apply(db: &mut Vec<u8>, page_size: usize, wal: &[u8], c: &Commit) {
    let size = c.db_pages as usize * page_size;
    db.resize(size, 0);
    for (page, r) in &c.pages {
        let at = (*page as usize).wrapping_sub(1).saturating_mul(page_size);
        if let (Some(dst), Some(src)) = (db.get_mut(at..at.saturating_add(page_size)), wal.get(r.clone()))
            && dst.len() == src.len()
        {
            dst.copy_from_slice(src);
        }
    }
}

/// The wal-index header at the start of `DB-shm` (native byte order, written by SQLite): what
/// the last published commit is. A pusher reads this, never the WAL's size, to learn of commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmHeader {
    /// Rises by one on every commit (and counts on across WAL restarts).
    pub change: u32,
    /// The last frame of the last published commit (0: the WAL is empty or restarted).
    pub max_frame: u32,
    /// Database size in pages at that commit.
    pub db_pages: u32,
    /// Page size.
    pub page_size: usize,
    /// The salts of the WAL generation the frames belong to (as the WAL header has them).
    pub salt: [u32; 2],
    /// The checksum chain at `max_frame`.
    pub frame_checksum: [u32; 2],
    /// Frames a checkpoint has copied into the database file.
    pub backfill: u32,
}

/// Bytes of the wal-index that [`parse_shm`] reads: two header copies and the checkpoint info.
pub const SHM_HEADER_LEN: usize = 136;

/// Reads the wal-index header; `None` while it is being written (the two copies differ), not
/// initialised, or its checksum does not match: read it again.
pub fn parse_shm(b: &[u8]) -> Option<ShmHeader> {
    let b = b.get(..SHM_HEADER_LEN)?;
    if b[..48] != b[48..96] {
        return None;
    }
    let ne = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if ne(0) != 3_007_000 || b[12] != 1 {
        return None;
    }
    // The header's own checksum is over native-order words, whatever the WAL's order.
    let native_be = cfg!(target_endian = "big");
    if checksum(native_be, &b[..40], [0, 0]) != [ne(40), ne(44)] {
        return None;
    }
    let raw = u16::from_ne_bytes([b[14], b[15]]) as usize;
    Some(ShmHeader {
        change: ne(8),
        max_frame: ne(16),
        db_pages: ne(20),
        page_size: if raw == 1 { 65536 } else { raw },
        // Copied byte for byte from the WAL header, where they are big-endian.
        salt: [be32(b, 32), be32(b, 36)],
        frame_checksum: [ne(24), ne(28)],
        backfill: ne(96),
    })
}

/// Entry point of the `decode_sqlite_wal` fuzz target and its proptest twin: any bytes give
/// commits or an error, never a panic, and applying them stays in bounds.
pub fn fuzz_wal(data: &[u8]) {
    let _ = parse_shm(data);
    if let Ok((h, cs)) = commits(data, None) {
        let mut db = Vec::new();
        for c in cs.iter().take(64) {
            if c.db_pages <= 1024 && c.pages.iter().all(|(p, _)| *p <= 1024) {
                apply(&mut db, h.page_size, data, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes a WAL as SQLite would: header, then frames chained from it.
    fn wal(big_endian: bool, page_size: usize, salt: [u32; 2], frames: &[(u32, u32, u8)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(if big_endian { 0x377f_0683u32 } else { 0x377f_0682 }).to_be_bytes());
        b.extend_from_slice(&3_007_000u32.to_be_bytes());
        b.extend_from_slice(&(page_size as u32).to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&salt[0].to_be_bytes());
        b.extend_from_slice(&salt[1].to_be_bytes());
        let mut s = checksum(big_endian, &b[..24], [0, 0]);
        b.extend_from_slice(&s[0].to_be_bytes());
        b.extend_from_slice(&s[1].to_be_bytes());
        for (page, db_pages, fill) in frames {
            let mut f = Vec::new();
            f.extend_from_slice(&page.to_be_bytes());
            f.extend_from_slice(&db_pages.to_be_bytes());
            f.extend_from_slice(&salt[0].to_be_bytes());
            f.extend_from_slice(&salt[1].to_be_bytes());
            let img = vec![*fill; page_size];
            s = checksum(big_endian, &img, checksum(big_endian, &f[..8], s));
            f.extend_from_slice(&s[0].to_be_bytes());
            f.extend_from_slice(&s[1].to_be_bytes());
            f.extend_from_slice(&img);
            b.extend_from_slice(&f);
        }
        b
    }

    #[test]
    fn commits_end_at_commit_frames_and_the_chain_resumes() {
        for be in [false, true] {
            // Commit 1: pages 1, 2 (size 2); commit 2: page 2 twice, page 3 (size 3); then a
            // frame of a commit still being written.
            let w = wal(be, 512, [7, 9], &[(1, 0, 1), (2, 2, 2), (2, 0, 3), (3, 0, 4), (2, 3, 5), (1, 0, 6)]);
            let (h, cs) = commits(&w, None).unwrap();
            assert_eq!((h.page_size, h.salt, h.big_endian), (512, [7, 9], be));
            assert_eq!(cs.len(), 2);
            assert_eq!((cs[0].last_frame, cs[0].db_pages, cs[0].pages.len()), (2, 2, 2));
            assert_eq!((cs[1].last_frame, cs[1].db_pages, cs[1].pages.len()), (5, 3, 3));
            let mut db = Vec::new();
            for c in &cs {
                apply(&mut db, 512, &w, c);
            }
            assert_eq!(db.len(), 3 * 512);
            assert_eq!((db[0], db[512], db[1024]), (1, 5, 4), "the later frame of page 2 wins");
            // Resuming after commit 1 finds commit 2 alone.
            let (_, rest) = commits(&w, Some((cs[0].last_frame, cs[0].checksum))).unwrap();
            assert_eq!(rest, cs[1..].to_vec());
        }
    }

    #[test]
    fn a_broken_chain_or_other_salts_end_the_valid_log() {
        let mut w = wal(false, 512, [1, 2], &[(1, 1, 1), (1, 1, 2), (1, 1, 3)]);
        // Damage in frame 2's page: frames 2 and 3 are no longer valid.
        w[HEADER_LEN + (FRAME_HEADER_LEN + 512) + FRAME_HEADER_LEN + 10] ^= 1;
        assert_eq!(commits(&w, None).unwrap().1.len(), 1);
        // Frames of an older generation (other salts) after a restart are not this log's.
        let mut old = wal(false, 512, [5, 6], &[(1, 1, 1), (1, 1, 2), (1, 1, 3)]);
        let new = wal(false, 512, [6, 7], &[(1, 1, 9)]);
        old[..new.len()].copy_from_slice(&new);
        let (_, cs) = commits(&old, None).unwrap();
        assert_eq!(cs.len(), 1);
        let mut db = Vec::new();
        apply(&mut db, 512, &old, &cs[0]);
        assert_eq!(db[0], 9);
    }

    #[test]
    fn bad_headers_are_refused() {
        let w = wal(false, 4096, [1, 2], &[]);
        assert!(parse_header(&w[..20]).is_err());
        let mut bad = w.clone();
        bad[3] = 0x84;
        assert!(parse_header(&bad).is_err());
        let mut bad = w.clone();
        bad[13] ^= 1;
        assert!(matches!(parse_header(&bad), Err(WalError::BadHeader(m)) if m.contains("checksum")));
        let mut bad = w;
        bad[8..12].copy_from_slice(&3000u32.to_be_bytes());
        assert!(parse_header(&bad).is_err());
    }

    #[test]
    fn a_shrinking_commit_truncates() {
        let w = wal(false, 512, [1, 1], &[(1, 0, 1), (2, 0, 2), (3, 3, 3), (1, 1, 4)]);
        let (_, cs) = commits(&w, None).unwrap();
        let mut db = Vec::new();
        apply(&mut db, 512, &w, &cs[0]);
        assert_eq!(db.len(), 1536);
        apply(&mut db, 512, &w, &cs[1]);
        assert_eq!((db.len(), db[0]), (512, 4));
    }

    #[test]
    fn a_wal_index_header_is_read_only_when_settled() {
        let mut h = vec![0u8; SHM_HEADER_LEN];
        h[..4].copy_from_slice(&3_007_000u32.to_ne_bytes());
        h[8..12].copy_from_slice(&42u32.to_ne_bytes());
        h[12] = 1;
        h[14..16].copy_from_slice(&4096u16.to_ne_bytes());
        h[16..20].copy_from_slice(&7u32.to_ne_bytes());
        h[32..40].copy_from_slice(&[0, 0, 0, 5, 0, 0, 0, 6]);
        let s = checksum(cfg!(target_endian = "big"), &h[..40], [0, 0]);
        h[40..44].copy_from_slice(&s[0].to_ne_bytes());
        h[44..48].copy_from_slice(&s[1].to_ne_bytes());
        let (first, rest) = h.split_at_mut(48);
        rest[..48].copy_from_slice(first);
        let got = parse_shm(&h).unwrap();
        assert_eq!((got.change, got.max_frame, got.salt, got.page_size), (42, 7, [5, 6], 4096));
        // Mid-write (copies differ), uninitialised, or a checksum that does not match: read again.
        let mut torn = h.clone();
        torn[48 + 16] = 8;
        assert_eq!(parse_shm(&torn), None);
        let mut bad = h.clone();
        bad[20] = 1;
        bad[68] = 1;
        assert_eq!(parse_shm(&bad), None);
        assert_eq!(parse_shm(&h[..100]), None);
    }

    proptest! {
        /// The stable twin of the fuzz target: random bytes, and random bytes behind a valid
        /// header, never panic.
        #[test]
        fn any_bytes_are_read_or_refused(tail in proptest::collection::vec(any::<u8>(), 0..3000), header in any::<bool>()) {
            let mut data = if header { wal(false, 512, [3, 4], &[]) } else { Vec::new() };
            data.extend_from_slice(&tail);
            fuzz_wal(&data);
        }

        /// A reader holding only the log's header and the frames after a commit finds exactly
        /// the commits that follow it when the whole log is read from the start (ranges
        /// shifted to its bytes), whatever the frames, the byte order and the commit.
        #[test]
        fn reading_only_the_new_frames_equals_resuming_in_the_whole_log(
            frames in proptest::collection::vec((1u32..6, prop_oneof![Just(0u32), 1u32..6], any::<u8>()), 0..24),
            be in any::<bool>(),
            pick in any::<prop::sample::Index>(),
        ) {
            let w = wal(be, 512, [5, 6], &frames);
            let (h, all) = commits(&w, None).unwrap();
            let starts: Vec<(u32, [u32; 2])> = std::iter::once((0, h.checksum)).chain(all.iter().map(|c| (c.last_frame, c.checksum))).collect();
            let k = pick.index(starts.len());
            let (from, sum) = starts[k];
            let at = HEADER_LEN + from as usize * (FRAME_HEADER_LEN + 512);
            let mut suffix = commits_in(&h, &w[at..], from, sum);
            for c in &mut suffix {
                for (_, r) in &mut c.pages {
                    *r = r.start + at..r.end + at;
                }
            }
            prop_assert_eq!(suffix, all[k..].to_vec());
        }

        /// A log walked in pieces of any number of frames, each from where the last stopped,
        /// the pages of a commit a piece cuts carried over (as a base is read), finds the
        /// commits of the whole log, with its ranges, and stops at the same frame.
        #[test]
        fn walking_a_log_in_pieces_finds_the_commits_of_the_whole(
            frames in proptest::collection::vec((1u32..6, prop_oneof![Just(0u32), 1u32..6], any::<u8>()), 0..24),
            be in any::<bool>(),
            per in 1usize..8,
            torn in any::<bool>(),
        ) {
            let mut w = wal(be, 512, [5, 6], &frames);
            let flen = FRAME_HEADER_LEN + 512;
            if torn && !frames.is_empty() {
                // A frame of another chain in the middle: both walks stop before it.
                let i = HEADER_LEN + frames.len() / 2 * flen + FRAME_HEADER_LEN;
                w[i] ^= 1;
            }
            let h = parse_header(&w).unwrap();
            let whole = walk(&h, &w[HEADER_LEN..], 0, h.checksum);
            let (mut from, mut sum, mut carried, mut found) = (0u32, h.checksum, Vec::new(), Vec::new());
            loop {
                let at = HEADER_LEN + from as usize * flen;
                let piece = &w[at..w.len().min(at + per * flen)];
                let p = walk(&h, piece, from, sum);
                let shift = |r: &Range<usize>| r.start + at - HEADER_LEN..r.end + at - HEADER_LEN;
                for c in &p.commits {
                    let mut pages: Vec<(u32, Range<usize>)> = std::mem::take(&mut carried);
                    pages.extend(c.pages.iter().map(|(n, r)| (*n, shift(r))));
                    found.push(Commit { pages, ..c.clone() });
                }
                carried.extend(p.pending.iter().map(|(n, r)| (*n, shift(r))));
                if p.frame == from {
                    break;
                }
                (from, sum) = (p.frame, p.sum);
            }
            prop_assert_eq!(found, whole.commits);
            prop_assert_eq!((from, sum, carried), (whole.frame, whole.sum, whole.pending));
        }
    }
}
