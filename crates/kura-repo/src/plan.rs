//! Prune plans: what a prune condemned (packs, superseded index files), written before anything
//! is deleted, so a killed prune is finished by the next one and sessions avoid condemned packs.

use crate::crypto::MasterKey;
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Magic at the start of a plan object; also its AAD.
pub const PLAN_MAGIC: &[u8; 8] = b"KURAPLAN";
/// Magic of a keyless plan, written by a kura server's prune job: plain postcard, since the
/// server has no key. It condemns only packs no snapshot's public list reaches.
pub const KEYLESS_PLAN_MAGIC: &[u8; 8] = b"KURAPLNK";

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
    /// Written by a keyless server prune (not stored: the magic says it). Such a plan stays
    /// after its packs are deleted, since the index files still name them, until a prune with
    /// the key rewrites those files.
    #[serde(skip)]
    pub keyless: bool,
}

impl PrunePlan {
    /// Seals to the stored form: magic ‖ sealed(postcard).
    pub fn encode(&self, key: &MasterKey) -> Option<Vec<u8>> {
        key.seal_record(PLAN_MAGIC, self)
    }

    /// The stored form of a keyless plan: magic ‖ postcard.
    pub fn encode_keyless(&self) -> Option<Vec<u8>> {
        let mut out = KEYLESS_PLAN_MAGIC.to_vec();
        out.extend(postcard::to_stdvec(self).ok()?);
        Some(out)
    }

    /// Opens a stored plan of either kind.
    pub fn decode(key: &MasterKey, bytes: &[u8]) -> Result<PrunePlan, String> {
        if bytes.starts_with(KEYLESS_PLAN_MAGIC) {
            return Self::decode_keyless(bytes);
        }
        let p: PrunePlan = key.open_record(PLAN_MAGIC, "a prune plan", bytes)?;
        Self::checked(p)
    }

    /// Parses a keyless plan; a sealed one is refused (`Ok(None)`: not readable without the key).
    pub fn decode_keyless(bytes: &[u8]) -> Result<PrunePlan, String> {
        let body = bytes.strip_prefix(KEYLESS_PLAN_MAGIC).ok_or("not a keyless prune plan")?;
        let mut p: PrunePlan = postcard::from_bytes(body).map_err(|e| format!("not a prune plan: {e}"))?;
        p.keyless = true;
        Self::checked(p)
    }

    fn checked(p: PrunePlan) -> Result<PrunePlan, String> {
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
            keyless: false,
        };
        let mut b = p.encode(&key).unwrap();
        assert_eq!(PrunePlan::decode(&key, &b).unwrap(), p);
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(PrunePlan::decode(&key, &b).is_err());
        assert!(PrunePlan::decode(&key, b"KURA").is_err());
    }

    #[test]
    fn keyless_plans_read_with_or_without_the_key() {
        let key = MasterKey::from_secret([3; 32]);
        let p = PrunePlan { version: 1, created: 9, snapshots: vec![], condemned: vec![Id([4; 32])], obsolete_indexes: vec![], keyless: true };
        let b = p.encode_keyless().unwrap();
        assert_eq!(PrunePlan::decode(&key, &b).unwrap(), p);
        assert_eq!(PrunePlan::decode_keyless(&b).unwrap(), p);
        assert!(PrunePlan::decode_keyless(&p.encode(&key).unwrap()).is_err());
        assert!(PrunePlan::decode_keyless(&b[..b.len() - 1]).is_err());
    }
}
