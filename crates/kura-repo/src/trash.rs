//! Trash records (`trash/<snapshot id>`): a kura server keeps each deleted snapshot here for its
//! undelete window, so `kura undelete` can bring it back and prune keeps its data meanwhile.

use crate::id::Id;
use serde::{Deserialize, Serialize};

/// One deleted snapshot (plain JSON; it holds the snapshot's stored bytes, which are already
/// encrypted except for the public part).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrashRecord {
    /// Record version (1).
    pub version: u32,
    /// When the server deleted it (RFC 3339, server clock).
    pub deleted: String,
    /// Who: a token id, or the server job that did it (`retention`).
    pub by: String,
    /// The snapshot object's bytes, hex.
    pub snapshot: String,
}

impl TrashRecord {
    /// A record of `bytes` deleted now by `by`.
    pub fn new(bytes: &[u8], by: &str) -> Self {
        TrashRecord { version: 1, deleted: jiff::Timestamp::now().to_string(), by: by.into(), snapshot: hex::encode(bytes) }
    }

    /// Parses a record and checks that the snapshot bytes it holds are the ones named `id`.
    pub fn decode(id: &Id, bytes: &[u8]) -> Result<(TrashRecord, Vec<u8>), String> {
        let r: TrashRecord = serde_json::from_slice(bytes).map_err(|e| format!("not a trash record: {e}"))?;
        if r.version != 1 {
            return Err(format!("trash record version {} is not supported", r.version));
        }
        let snap = hex::decode(&r.snapshot).map_err(|_| "snapshot bytes are not hex".to_string())?;
        if Id::of_stored(&snap) != *id {
            return Err("the snapshot it holds is not the one it is named after".into());
        }
        Ok((r, snap))
    }

    /// When it was deleted.
    pub fn deleted_at(&self) -> Option<jiff::Timestamp> {
        self.deleted.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_must_hold_their_snapshot() {
        let snap = b"KURASNAP fake bytes".to_vec();
        let id = Id::of_stored(&snap);
        let rec = serde_json::to_vec(&TrashRecord::new(&snap, "retention")).unwrap();
        let (r, bytes) = TrashRecord::decode(&id, &rec).unwrap();
        assert_eq!((r.by.as_str(), bytes), ("retention", snap.clone()));
        assert!(r.deleted_at().is_some());
        let other = Id::of_stored(b"other");
        assert!(TrashRecord::decode(&other, &rec).is_err());
        assert!(TrashRecord::decode(&id, b"{}").is_err());
    }
}
