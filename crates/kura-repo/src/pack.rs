//! Pack files: encrypted blobs back to back, then an encrypted header listing them, then a fixed
//! 16-byte footer. A pack alone is enough to rebuild its index entries.

use crate::crypto::{MasterKey, SEAL_OVERHEAD};
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Footer magic, the last 8 bytes of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"KURAPACK";
/// Pack format version written in the footer.
pub const PACK_VERSION: u32 = 1;
/// Footer length: header length (u32 LE), version (u32 LE), magic.
pub const FOOTER_LEN: usize = 16;
const HEADER_AAD: &[u8] = b"kura pack header v1";

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobKind {
    /// File content.
    Data,
    /// A serialised directory tree.
    Tree,
}

/// How a blob's plaintext was encoded before encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Stored as is (incompressible).
    None,
    /// zstd frame.
    Zstd,
}

/// One blob's place in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// Keyed hash of the plaintext.
    pub id: Id,
    /// Data or tree.
    pub kind: BlobKind,
    /// Encoding before encryption.
    pub compression: Compression,
    /// Byte offset of the sealed blob in the pack.
    pub offset: u32,
    /// Length of the sealed blob.
    pub length: u32,
    /// Length of the plaintext.
    pub raw_length: u32,
}

/// Decoded pack header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackHeader {
    /// The blobs, in pack order.
    pub entries: Vec<PackEntry>,
}

/// Why a pack could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// Too short for a footer, or header length out of range.
    #[error("truncated ({0})")]
    Truncated(String),
    /// Footer magic or version wrong.
    #[error("bad footer: {0}")]
    BadFooter(String),
    /// Header failed authentication.
    #[error("header failed authentication")]
    HeaderAuth,
    /// Header decoded but is inconsistent.
    #[error("bad header: {0}")]
    BadHeader(String),
}

/// Builds a pack by writing blobs straight to `out` (a staged store object, or a `Vec` in
/// tests) while hashing them, so a pack never has to sit in memory.
pub struct PackBuilder<W> {
    out: W,
    hasher: blake3::Hasher,
    len: usize,
    entries: Vec<PackEntry>,
}

impl<W: std::io::Write> PackBuilder<W> {
    /// An empty pack writing to `out`.
    pub fn new(out: W) -> Self {
        PackBuilder { out, hasher: blake3::Hasher::new(), len: 0, entries: Vec::new() }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len();
        Ok(())
    }

    /// Appends an already sealed blob.
    pub fn add(&mut self, id: Id, kind: BlobKind, compression: Compression, sealed: &[u8], raw: u32) -> std::io::Result<()> {
        let offset = self.len as u32;
        self.put(sealed)?;
        self.entries.push(PackEntry { id, kind, compression, offset, length: sealed.len() as u32, raw_length: raw });
        Ok(())
    }

    /// Writes the sealed header and the footer; returns the pack's id, the sink and the entries.
    pub fn finish(mut self, key: &MasterKey) -> std::io::Result<(Id, W, Vec<PackEntry>)> {
        let header = PackHeader { entries: std::mem::take(&mut self.entries) };
        let plain = postcard::to_stdvec(&header).map_err(std::io::Error::other)?;
        let sealed = key.seal(&plain, HEADER_AAD).map_err(|_| std::io::Error::other("cannot encrypt the pack header"))?;
        self.put(&sealed)?;
        let mut footer = [0u8; FOOTER_LEN];
        footer[..4].copy_from_slice(&(sealed.len() as u32).to_le_bytes());
        footer[4..8].copy_from_slice(&PACK_VERSION.to_le_bytes());
        footer[8..].copy_from_slice(PACK_MAGIC);
        self.put(&footer)?;
        Ok((Id(*self.hasher.finalize().as_bytes()), self.out, header.entries))
    }
}

/// Parses a footer; returns the header's length.
pub fn parse_footer(footer: &[u8], pack_len: u64) -> Result<u32, PackError> {
    if footer.len() != FOOTER_LEN || pack_len < FOOTER_LEN as u64 {
        return Err(PackError::Truncated(format!("{pack_len} bytes")));
    }
    if &footer[8..16] != PACK_MAGIC {
        return Err(PackError::BadFooter("magic missing".into()));
    }
    let mut w = [0u8; 4];
    w.copy_from_slice(&footer[4..8]);
    let version = u32::from_le_bytes(w);
    if version != PACK_VERSION {
        return Err(PackError::BadFooter(format!("unsupported pack version {version}")));
    }
    w.copy_from_slice(&footer[0..4]);
    let hlen = u32::from_le_bytes(w);
    if (hlen as u64) + (FOOTER_LEN as u64) > pack_len || (hlen as usize) < SEAL_OVERHEAD {
        return Err(PackError::Truncated(format!("header of {hlen} bytes in a {pack_len}-byte pack")));
    }
    Ok(hlen)
}

/// Decrypts and validates a header; `data_len` is the pack length minus header and footer.
pub fn decode_header(key: &MasterKey, sealed: &[u8], data_len: u64) -> Result<PackHeader, PackError> {
    let plain = key.open(sealed, HEADER_AAD).map_err(|_| PackError::HeaderAuth)?;
    let h: PackHeader =
        postcard::from_bytes(&plain).map_err(|e| PackError::BadHeader(e.to_string()))?;
    for e in &h.entries {
        if e.offset as u64 + e.length as u64 > data_len || (e.length as usize) < SEAL_OVERHEAD {
            return Err(PackError::BadHeader(format!("blob {} lies outside the pack", e.id.short())));
        }
    }
    Ok(h)
}

/// Reads the header from a whole pack in memory.
pub fn read_header(key: &MasterKey, pack: &[u8]) -> Result<PackHeader, PackError> {
    let n = pack.len();
    if n < FOOTER_LEN {
        return Err(PackError::Truncated(format!("{n} bytes")));
    }
    let hlen = parse_footer(&pack[n - FOOTER_LEN..], n as u64)? as usize;
    let hstart = n - FOOTER_LEN - hlen;
    decode_header(key, &pack[hstart..n - FOOTER_LEN], hstart as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let k = MasterKey::from_secret([5; 32]);
        let mut b = PackBuilder::new(Vec::new());
        let sealed = k.seal(b"blob", b"").unwrap();
        b.add(Id([1; 32]), BlobKind::Data, Compression::None, &sealed, 4).unwrap();
        let (id, bytes, entries) = b.finish(&k).unwrap();
        assert_eq!(id, Id::of_stored(&bytes));
        assert_eq!(read_header(&k, &bytes).unwrap().entries, entries);
        // truncation anywhere is an error, never a panic
        for cut in 0..bytes.len() {
            assert!(read_header(&k, &bytes[..cut]).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn read_header_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400), tail in proptest::bool::ANY) {
            let k = MasterKey::from_secret([5; 32]);
            let mut b = bytes.clone();
            if tail { b.extend_from_slice(&40u32.to_le_bytes()); b.extend_from_slice(&1u32.to_le_bytes()); b.extend_from_slice(PACK_MAGIC); }
            let _ = read_header(&k, &b);
        }
    }
}
