//! The blob index: which pack holds each blob. Index files are sealed lists of pack headers, so
//! the index is a cache of the packs and can always be rebuilt from them.

use crate::crypto::MasterKey;
use crate::id::{Id, IdMap, IdSet};
use crate::pack::{BlobKind, Compression, PackEntry};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Magic at the start of an index file.
pub const INDEX_MAGIC: &[u8; 8] = b"KURAIDX1";

/// One pack's entries, as stored in an index file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexPack {
    /// The pack's id (hash of its bytes).
    pub id: Id,
    /// Its blobs.
    pub blobs: Vec<PackEntry>,
}

/// The plaintext of an index file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct IndexFile {
    /// Record version (1).
    pub version: u32,
    /// Packs covered by this file.
    pub packs: Vec<IndexPack>,
}

impl IndexFile {
    /// Seals to the stored form: magic ‖ nonce ‖ ciphertext ‖ tag.
    pub fn encode(&self, key: &MasterKey) -> Option<Vec<u8>> {
        key.seal_record(INDEX_MAGIC, self)
    }

    /// Opens a stored index file.
    pub fn decode(key: &MasterKey, bytes: &[u8]) -> Result<IndexFile, String> {
        let f: IndexFile = key.open_record(INDEX_MAGIC, "an index file", bytes)?;
        if f.version != 1 {
            return Err(format!("unsupported index version {}", f.version));
        }
        Ok(f)
    }
}

/// Where a blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLoc {
    /// Position of the pack in [`Index::packs`].
    pub pack: u32,
    /// Data or tree.
    pub kind: BlobKind,
    /// Encoding.
    pub compression: Compression,
    /// Offset in the pack.
    pub offset: u32,
    /// Sealed length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

/// The in-memory index of every blob in the repository. Each blob has one location: the first
/// one added, except that a location in a live pack replaces one in a condemned pack.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<Id>,
    pack_pos: IdMap<u32>,
    blobs: IdMap<BlobLoc>,
    condemned: IdSet,
    condemned_pos: HashSet<u32>,
    gone: IdSet,
}

impl Index {
    /// Marks packs a pending prune plan will delete; call before adding packs. Their blobs stay
    /// readable but do not count as present for deduplication ([`Index::is_live`]).
    pub fn set_condemned(&mut self, packs: impl IntoIterator<Item = Id>) {
        for p in packs {
            if let Some(&pos) = self.pack_pos.get(&p) {
                self.condemned_pos.insert(pos);
            }
            self.condemned.insert(p);
        }
    }

    /// Condemned packs already deleted; call before adding packs. Index files may still name
    /// them (a keyless server's plan): their entries are skipped, so a blob they held is found
    /// in whichever pack still has it.
    pub fn set_gone(&mut self, packs: impl IntoIterator<Item = Id>) {
        self.gone.extend(packs);
    }

    /// True when a pending prune plan condemns the pack.
    pub fn is_condemned(&self, pack: &Id) -> bool {
        self.condemned.contains(pack)
    }

    /// Adds one pack's entries (idempotent).
    pub fn add_pack(&mut self, pack: Id, entries: &[PackEntry]) {
        if self.gone.contains(&pack) {
            return;
        }
        let pos = *self.pack_pos.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        });
        let condemned = self.condemned.contains(&pack);
        if condemned {
            self.condemned_pos.insert(pos);
        }
        for e in entries {
            let loc = BlobLoc {
                pack: pos,
                kind: e.kind,
                compression: e.compression,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
            };
            match self.blobs.entry(e.id) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if !condemned && self.condemned_pos.contains(&o.get().pack) {
                        o.insert(loc);
                    }
                }
            }
        }
    }

    /// True when the blob is in a pack no prune plan condemns: a backup may reference it
    /// without storing it again.
    pub fn is_live(&self, id: &Id) -> bool {
        self.blobs.get(id).is_some_and(|l| !self.condemned_pos.contains(&l.pack))
    }

    /// Looks a blob up.
    pub fn get(&self, id: &Id) -> Option<(Id, BlobLoc)> {
        let loc = *self.blobs.get(id)?;
        Some((self.packs[loc.pack as usize], loc))
    }

    /// True when the blob is indexed.
    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    /// True when the pack is covered by some index entry.
    pub fn has_pack(&self, id: &Id) -> bool {
        self.pack_pos.contains_key(id)
    }

    /// All packs the index knows.
    pub fn packs(&self) -> &[Id] {
        &self.packs
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Every blob with its pack.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, Id, &BlobLoc)> {
        self.blobs.iter().map(|(id, loc)| (id, self.packs[loc.pack as usize], loc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_file_round_trip_and_garbage() {
        let k = MasterKey::from_secret([4; 32]);
        let e = PackEntry {
            id: Id([2; 32]),
            kind: BlobKind::Tree,
            compression: Compression::Zstd,
            offset: 0,
            length: 50,
            raw_length: 70,
        };
        let f = IndexFile { version: 1, packs: vec![IndexPack { id: Id([3; 32]), blobs: vec![e] }] };
        let bytes = f.encode(&k).unwrap();
        assert_eq!(IndexFile::decode(&k, &bytes).unwrap(), f);
        let mut flipped = bytes.clone();
        flipped[20] ^= 0x40;
        assert!(IndexFile::decode(&k, &flipped).is_err());
        assert!(IndexFile::decode(&k, &bytes[..bytes.len() - 1]).is_err());
        assert!(IndexFile::decode(&k, &[]).is_err());
        let mut idx = Index::default();
        idx.add_pack(Id([3; 32]), &f.packs[0].blobs);
        assert_eq!(idx.get(&Id([2; 32])).unwrap().0, Id([3; 32]));
    }

    #[test]
    fn a_deleted_pack_never_shadows_a_copy_that_still_exists() {
        let e = PackEntry { id: Id([9; 32]), kind: BlobKind::Data, compression: Compression::None, offset: 0, length: 5, raw_length: 5 };
        let (deleted, later, live) = (Id([1; 32]), Id([2; 32]), Id([3; 32]));
        // Both condemned; the first one added is gone: the other copy is the one found.
        let mut idx = Index::default();
        idx.set_gone([deleted]);
        idx.set_condemned([deleted, later]);
        idx.add_pack(deleted, std::slice::from_ref(&e));
        idx.add_pack(later, std::slice::from_ref(&e));
        assert_eq!(idx.get(&e.id).unwrap().0, later);
        assert!(!idx.is_live(&e.id));
        assert!(!idx.has_pack(&deleted));
        // A live copy still wins over a condemned one.
        idx.add_pack(live, std::slice::from_ref(&e));
        assert_eq!(idx.get(&e.id).unwrap().0, live);
        assert!(idx.is_live(&e.id));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let k = MasterKey::from_secret([4; 32]);
            let mut b = INDEX_MAGIC.to_vec(); b.extend_from_slice(&bytes);
            proptest::prop_assert!(IndexFile::decode(&k, &b).is_err());
        }
    }
}
