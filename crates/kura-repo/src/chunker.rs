//! Content-defined chunking: FastCDC (2020, normalisation level 1) with a gear table seeded from
//! the master key, over a reusable buffer so a stream is cut exactly as if it were one slice.

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

    /// Cut points over a stream with tiny reads equal those over the whole slice.
    fn cuts_stream(c: &Chunker, data: &[u8], read_size: usize) -> Vec<usize> {
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(out.len()).min(self.1);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
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

    proptest! {
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
