//! Content-defined chunking: FastCDC (2020, normalisation level 1) with a gear table seeded from
//! the master key, over a reusable buffer so a stream is cut exactly as if it were one slice;
//! and page-aligned chunks for database files whose pages never move (SQLite).

use crate::config::ChunkerParams;
use fastcdc::v2020::{Normalization, cut_gear, get_gear_with_seed, select_masks};
use std::io::Read;

/// A configured chunker; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: Vec<u64>,
    gear_ls: Vec<u64>,
}

impl Chunker {
    /// A chunker with the repository's parameters and key-derived seed.
    pub fn new(p: ChunkerParams, seed: u64) -> Self {
        let (mask_s, mask_l) = select_masks(p.avg as usize, Normalization::Level1);
        let (gear, gear_ls) = get_gear_with_seed(seed);
        Chunker {
            min: p.min as usize,
            avg: p.avg as usize,
            max: p.max as usize,
            mask_s,
            mask_l,
            gear: gear.into_owned(),
            gear_ls: gear_ls.into_owned(),
        }
    }

    /// Length of the chunk that starts `data`. `data` must hold at least `max` bytes unless it
    /// is the end of the stream.
    pub fn cut(&self, data: &[u8]) -> usize {
        if data.len() <= self.min {
            return data.len();
        }
        let (_, n) = cut_gear(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        n.clamp(1, data.len())
    }

    /// Size of the buffer [`Chunker::for_each_chunk`] wants.
    pub fn buffer_size(&self) -> usize {
        self.max * 2
    }

    /// Reads `r` to its end and calls `f` with each chunk in order. `buf` is reused between
    /// calls so small files cost no allocation. Returns the number of bytes read.
    pub fn for_each_chunk<R: Read, E: From<std::io::Error>>(
        &self,
        mut r: R,
        buf: &mut Vec<u8>,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let cap = self.buffer_size();
        // The buffer grows on demand (64 KiB up to 2 × max): most files are small, and a
        // buffer of full size per thread would be resident memory for nothing.
        if buf.is_empty() {
            buf.resize(64 * 1024, 0);
        }
        let mut len = 0usize;
        let mut total = 0u64;
        let mut eof = false;
        loop {
            while !eof && len < cap {
                if len == buf.len() {
                    let grown = (buf.len() * 2).min(cap);
                    buf.resize(grown, 0);
                }
                let end = buf.len();
                match r.read(&mut buf[len..end]) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        len += n;
                        total += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let mut pos = 0;
            while pos < len && (eof || len - pos >= self.max) {
                let n = self.cut(&buf[pos..len]);
                f(&buf[pos..pos + n])?;
                pos += n;
            }
            if eof {
                return Ok(total);
            }
            buf.copy_within(pos..len, 0);
            len -= pos;
        }
    }
}

/// The most chunks one file is cut into by pages: its tree node lists every chunk id.
const MAX_PAGE_CHUNKS: u64 = 1 << 18;

/// The chunk size for a file that starts with `head` and is `size` bytes long, when it is a
/// SQLite database: whole pages (at least 4 KiB, at most [`MAX_PAGE_CHUNKS`] chunks). A
/// scattered update rewrites pages in place, so page-aligned chunks keep every untouched page's
/// chunk, where content-defined chunks of ~1 MiB would each hold some changed page.
pub fn page_chunk_size(head: &[u8], size: u64) -> Option<usize> {
    if head.len() < 100 || !head.starts_with(b"SQLite format 3\0") {
        return None;
    }
    // SQLite's own header is big-endian; kura's formats are not.
    #[allow(clippy::big_endian_bytes)]
    let raw = u16::from_be_bytes([head[16], head[17]]) as usize;
    let page = if raw == 1 { 65536 } else { raw };
    if !page.is_power_of_two() || !(512..=65536).contains(&page) {
        return None;
    }
    let mut chunk = page.max(4096);
    // u64::MAX: a stream of unknown length (standard input).
    while size != u64::MAX && size / chunk as u64 > MAX_PAGE_CHUNKS && chunk < 1 << 24 {
        chunk *= 2;
    }
    Some(chunk)
}

/// Cuts `r` into chunks of exactly `size` bytes (the last one shorter). With `grow_every` > 0
/// the size doubles after every `grow_every` chunks (up to 16 MiB): a stream of unknown length
/// is then cut into a number of chunks that grows with the log of its length, never one per
/// page of a database of any size.
fn for_each_fixed<R: Read, E: From<std::io::Error>>(
    mut r: R,
    mut size: usize,
    grow_every: u64,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let mut total = 0u64;
    let mut cut = 0u64;
    loop {
        if grow_every > 0 && cut == grow_every && size < 1 << 24 {
            size *= 2;
            cut = 0;
        }
        cut += 1;
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let mut len = 0;
        while len < size {
            match r.read(&mut buf[len..size]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        total += len as u64;
        if len > 0 {
            f(&buf[..len])?;
        }
        if len < size {
            return Ok(total);
        }
    }
}

impl Chunker {
    /// Chunks a file of `size` bytes: page-aligned for a SQLite database
    /// ([`page_chunk_size`]), content-defined otherwise. Backup and every check that re-chunks
    /// a restored file go through here, so both cut the same way. Returns the bytes read.
    pub fn for_each_chunk_of_file<R: Read, E: From<std::io::Error>>(
        &self,
        mut r: R,
        size: u64,
        buf: &mut Vec<u8>,
        f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut head = [0u8; 100];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let whole = (&head[..got]).chain(r);
        match page_chunk_size(&head[..got], size) {
            // A stream of unknown length (standard input) grows its chunks as it goes.
            Some(n) => for_each_fixed(whole, n, if size == u64::MAX { MAX_PAGE_CHUNKS } else { 0 }, buf, f),
            None => self.for_each_chunk(whole, buf, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> Chunker {
        Chunker::new(ChunkerParams { min: 256, avg: 1024, max: 4096 }, 42)
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A reader that hands out at most `.1` bytes per read.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Cut points over a stream with tiny reads equal those over the whole slice.
    fn cuts_stream(c: &Chunker, data: &[u8], read_size: usize) -> Vec<usize> {
        let mut v = Vec::new();
        let mut buf = Vec::new();
        c.for_each_chunk::<_, std::io::Error>(Dribble(data, read_size), &mut buf, |ch| {
            v.push(ch.len());
            Ok(())
        })
        .unwrap();
        v
    }

    fn cuts_slice(c: &Chunker, mut data: &[u8]) -> Vec<usize> {
        let mut v = Vec::new();
        while !data.is_empty() {
            let n = c.cut(data);
            v.push(n);
            data = &data[n..];
        }
        v
    }

    #[test]
    fn golden_cut_points_are_stable() {
        // Cut points are part of the format: a change here breaks dedup against old repositories.
        let data = pseudo_random(64 * 1024, 2012);
        let cuts = cuts_slice(&small(), &data);
        assert_eq!(cuts.iter().sum::<usize>(), data.len());
        assert_eq!(cuts[..8], [1045, 1918, 1686, 1576, 3314, 1110, 1262, 1084]);
    }

    #[test]
    fn zeros_cut_at_max() {
        let c = small();
        assert_eq!(cuts_slice(&c, &[0u8; 10000]), vec![4096, 4096, 1808]);
        assert!(cuts_stream(&c, &[], 7).is_empty());
    }

    #[allow(clippy::big_endian_bytes)] // SQLite's header, as SQLite writes it
    fn sqlite_like(pages: usize, page_size_field: u16, seed: u64) -> Vec<u8> {
        let page = if page_size_field == 1 { 65536 } else { page_size_field as usize };
        let mut d = pseudo_random(pages * page, seed);
        d[..16].copy_from_slice(b"SQLite format 3\0");
        d[16..18].copy_from_slice(&page_size_field.to_be_bytes());
        d
    }

    fn file_cuts(c: &Chunker, data: &[u8], read_size: usize) -> Vec<usize> {
        let mut v = Vec::new();
        let mut buf = Vec::new();
        let mut joined = Vec::new();
        c.for_each_chunk_of_file::<_, std::io::Error>(Dribble(data, read_size), data.len() as u64, &mut buf, |ch| {
            v.push(ch.len());
            joined.extend_from_slice(ch);
            Ok(())
        })
        .unwrap();
        assert_eq!(joined, data);
        v
    }

    #[test]
    fn a_stream_of_unknown_length_is_cut_into_logarithmically_many_chunks() {
        // Growing every 4 chunks: 4 of 4 KiB, 4 of 8 KiB, 4 of 16 KiB, then 32 KiB; without
        // growth, 4 KiB.
        let data = pseudo_random(40 * 4096 + 100, 3);
        let cut = |grow_every| {
            let mut sizes = Vec::new();
            let n = for_each_fixed(&data[..], 4096, grow_every, &mut Vec::new(), |c| -> Result<(), std::io::Error> {
                sizes.push(c.len());
                Ok(())
            });
            assert_eq!(n.unwrap(), data.len() as u64);
            sizes
        };
        assert_eq!(cut(4), [vec![4096; 4], vec![8192; 4], vec![16384; 4], vec![32768, 40 * 4096 + 100 - 28 * 4096 - 32768]].concat());
        assert_eq!(cut(0), [vec![4096; 40], vec![100]].concat());
        // A database read from a stream starts as one read from a file: the same first chunks.
        let mut db = pseudo_random(8 * 4096, 5);
        db[..16].copy_from_slice(b"SQLite format 3\0");
        db[16] = 0x10;
        db[17] = 0;
        let ids = |size| {
            let mut v = Vec::new();
            small().for_each_chunk_of_file(&db[..], size, &mut Vec::new(), |c| -> Result<(), std::io::Error> {
                v.push(c.to_vec());
                Ok(())
            }).unwrap();
            v
        };
        assert_eq!(ids(u64::MAX), ids(db.len() as u64));
        assert_eq!(ids(u64::MAX).len(), 8);
    }

    #[test]
    fn sqlite_databases_are_cut_at_pages_and_other_files_by_content() {
        let c = small();
        // 4 KiB pages: one page per chunk; 1 KiB pages: four; 64 KiB (field 1): one.
        assert_eq!(file_cuts(&c, &sqlite_like(10, 4096, 1), 7), vec![4096; 10]);
        assert_eq!(file_cuts(&c, &sqlite_like(10, 1024, 2), 333), vec![4096, 4096, 2048]);
        assert_eq!(file_cuts(&c, &sqlite_like(2, 1, 3), 5000), vec![65536; 2]);
        // Not a page size, or not SQLite: content-defined.
        let mut odd = sqlite_like(10, 4096, 4);
        odd[16..18].copy_from_slice(&[0x0b, 0xb8]); // 3000, big-endian
        assert_eq!(file_cuts(&c, &odd, 4096), cuts_slice(&c, &odd));
        let plain = pseudo_random(40000, 5);
        assert_eq!(file_cuts(&c, &plain, 100), cuts_slice(&c, &plain));
        // A huge database gets bigger chunks, never more than MAX_PAGE_CHUNKS of them.
        let head = sqlite_like(1, 4096, 6);
        assert_eq!(page_chunk_size(&head, 10 << 30), Some(65536));
        assert_eq!(page_chunk_size(&head[..50], 1 << 20), None);
        assert_eq!(page_chunk_size(&head, u64::MAX), Some(4096));
    }

    proptest! {
        #[test]
        fn page_chunks_rejoin_and_an_update_changes_only_its_pages(pages in 1usize..40, seed in 1u64..500, at in 0usize..40, rs in 1usize..9000) {
            let c = small();
            let data = sqlite_like(pages, 4096, seed);
            let cuts = file_cuts(&c, &data, rs);
            prop_assert!(cuts.iter().all(|&n| n == 4096));
            let mut changed = data.clone();
            let p = (at % pages).max(if pages > 1 { 1 } else { 0 });
            changed[p * 4096 + 100] ^= 0xff;
            let a: Vec<&[u8]> = data.chunks(4096).collect();
            let b: Vec<&[u8]> = changed.chunks(4096).collect();
            prop_assert_eq!(a.iter().zip(&b).filter(|(x, y)| x != y).count(), 1);
        }

        #[test]
        fn streaming_matches_slice(len in 0usize..40000, seed in 1u64..1000, rs in 1usize..9000) {
            let c = small();
            let data = pseudo_random(len, seed);
            let s = cuts_slice(&c, &data);
            prop_assert_eq!(cuts_stream(&c, &data, rs), s.clone());
            prop_assert!(s.iter().all(|&n| n <= 4096 && n > 0));
            prop_assert!(s.iter().rev().skip(1).all(|&n| n >= 256));
        }

        #[test]
        fn an_insertion_only_changes_nearby_chunks(seed in 1u64..500, at in 0usize..30000) {
            let c = small();
            let data = pseudo_random(40000, seed);
            let mut changed = data.clone();
            changed.insert(at, 0xAA);
            let a = cuts_slice(&c, &data);
            let b = cuts_slice(&c, &changed);
            let set: std::collections::HashSet<_> = {
                let mut off = 0; a.iter().map(|n| { let s = &data[off..off+n]; off += n; s.to_vec() }).collect()
            };
            let mut off = 0; let mut shared = 0;
            for n in &b { if set.contains(&changed[off..off+n]) { shared += n; } off += n; }
            // Content-defined: most bytes stay in identical chunks.
            prop_assert!(shared * 10 >= data.len() * 6, "only {} of {} bytes shared", shared, data.len());
        }
    }
}
