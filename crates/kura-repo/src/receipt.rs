//! Receipts (`receipts/<snapshot id>`): a kura server's record of when it received a snapshot,
//! by its own clock. Retention uses this time when present, so a client cannot push
//! generations out with fake or future-dated snapshot times.

use crate::id::Id;
use kura_store::{Kind, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What the server records of a snapshot it received (plain JSON; FORMAT.md §14).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    /// Record version (1).
    pub version: u32,
    /// When the server stored the snapshot, by its own clock (RFC 3339).
    pub received: String,
    /// The time the client claims (the snapshot's public `time`).
    pub claimed: String,
    /// Claimed minus received, in seconds.
    pub skew_seconds: i64,
    /// Set when the claimed time is implausibly far from the receive time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// Id of the token that uploaded it.
    pub token: String,
    /// That token's role. Only an admin's upload may claim to replace another snapshot (a
    /// repaired copy's `original`): a backup token's claim is ignored by retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl Receipt {
    /// Parses a receipt; `None` for anything that is not a version-1 receipt with a valid time.
    pub fn decode(bytes: &[u8]) -> Option<(Receipt, jiff::Timestamp)> {
        let r: Receipt = serde_json::from_slice(bytes).ok()?;
        let t = r.received.parse().ok()?;
        (r.version == 1).then_some((r, t))
    }
}

/// Every readable receipt in a store, by snapshot id, with its receive time. Receipts that do
/// not parse are skipped: they only refine times, and the claimed time stands in for them.
pub fn read_all(store: &dyn Store) -> Result<HashMap<Id, (Receipt, jiff::Timestamp)>, StoreError> {
    let mut out = HashMap::new();
    for l in store.list(Kind::Receipt)? {
        let Some(id) = Id::from_hex(&l.name) else { continue };
        match store.get(Kind::Receipt, &l.name) {
            Ok(b) => {
                if let Some(r) = Receipt::decode(&b) {
                    out.insert(id, r);
                }
            }
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
