//! Prune plans: what a prune condemned (packs, superseded index files), written before anything
//! is deleted, so a killed prune is finished by the next one and sessions avoid condemned packs.

use crate::crypto::MasterKey;
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Magic at the start of a plan object; also its AAD.
pub const PLAN_MAGIC: &[u8; 8] = b"KURAPLAN";

/// The plaintext of `plans/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PrunePlan {
    /// Record version (1).
    pub version: u32,
    /// When the plan was made (UTC seconds, the pruning host's clock; informational).
    pub created: i64,
    /// Snapshots that existed when the plan was made. A snapshot not in this list appeared
    /// later; packs it references are not deleted.
    pub snapshots: Vec<Id>,
    /// Packs to delete.
    pub condemned: Vec<Id>,
    /// Index files superseded by the index files the prune wrote before this plan.
    pub obsolete_indexes: Vec<Id>,
}

impl PrunePlan {
    /// Seals to the stored form: magic ‖ sealed(postcard).
    pub fn encode(&self, key: &MasterKey) -> Option<Vec<u8>> {
        key.seal_record(PLAN_MAGIC, self)
    }

    /// Opens a stored plan.
    pub fn decode(key: &MasterKey, bytes: &[u8]) -> Result<PrunePlan, String> {
        let p: PrunePlan = key.open_record(PLAN_MAGIC, "a prune plan", bytes)?;
        if p.version != 1 {
            return Err(format!("unsupported prune plan version {}", p.version));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_round_trip_and_tamper() {
        let key = MasterKey::from_secret([3; 32]);
        let p = PrunePlan {
            version: 1,
            created: 5,
            snapshots: vec![Id([1; 32])],
            condemned: vec![Id([2; 32])],
            obsolete_indexes: vec![],
        };
        let mut b = p.encode(&key).unwrap();
        assert_eq!(PrunePlan::decode(&key, &b).unwrap(), p);
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(PrunePlan::decode(&key, &b).is_err());
        assert!(PrunePlan::decode(&key, b"KURA").is_err());
    }
}
