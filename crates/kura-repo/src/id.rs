//! 32-byte object ids (keyed BLAKE3 of plaintext for blobs, BLAKE3 of stored bytes for files).

use serde::{Deserialize, Serialize};
use std::fmt;

/// A 32-byte identifier, printed as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Id(pub [u8; 32]);

/// Ids are uniformly distributed hashes already: 8 of their bytes are as good a hash key as all
/// 32, and hashing them again (SipHash over 40 bytes) was the largest cost of the check's tree
/// walk and of index lookups.
impl std::hash::Hash for Id {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

/// A hasher for maps keyed by [`Id`]: passes the id's first 8 bytes through. Blob ids are keyed
/// hashes nobody without the key can steer; pack ids are hashes of content, which the storage
/// could grind to collide only at a cost far above simply deleting data.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

/// Builds [`IdHasher`]s.
pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;
/// A map keyed by ids.
pub type IdMap<V> = std::collections::HashMap<Id, V, IdBuildHasher>;
/// A set of ids.
pub type IdSet = std::collections::HashSet<Id, IdBuildHasher>;

impl Id {
    /// The id of stored bytes: plain (unkeyed) BLAKE3, so anyone holding the bytes, the storage
    /// included, can verify them against their name without the key.
    pub fn of_stored(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, as shown in listings.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Id> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Id(out))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

/// Serde helper: ids as hex strings in JSON objects.
pub mod hex_id {
    use super::Id;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes an id as hex.
    pub fn serialize<S: Serializer>(id: &Id, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_hex())
    }

    /// Reads an id from hex.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let s = String::deserialize(d)?;
        Id::from_hex(&s).ok_or_else(|| serde::de::Error::custom("invalid id"))
    }
}

/// Serde helper: lists of ids as hex strings in JSON objects.
pub mod hex_ids {
    use super::Id;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    /// Writes ids as hex strings.
    pub fn serialize<S: Serializer>(ids: &[Id], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(ids.len()))?;
        for id in ids {
            seq.serialize_element(&id.to_hex())?;
        }
        seq.end()
    }

    /// Reads ids from hex strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Id>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| Id::from_hex(s).ok_or_else(|| serde::de::Error::custom("invalid id")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = Id::of_stored(b"kura");
        assert_eq!(Id::from_hex(&id.to_hex()), Some(id));
        assert_eq!(id.short().len(), 8);
        assert_eq!(Id::from_hex("zz"), None);
    }
}
