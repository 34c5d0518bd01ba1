//! Restore drill records (`drills/<BLAKE3 of the bytes>`): plain JSON facts of one drill, so
//! anyone who can list the repository (a read token, `kura status`, a report) sees when its
//! data was last proven to restore, and how long that took. No file names: the storage may
//! read these.

use kura_store::{Kind, Store, StoreError};
use serde::{Deserialize, Serialize};

/// One drill (FORMAT.md §14).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DrillRecord {
    /// Record version (1).
    pub version: u32,
    /// When the drill started (RFC 3339, the drilling machine's clock).
    pub time: String,
    /// The machine that ran it.
    pub by_host: String,
    /// The snapshot restored.
    pub snapshot: String,
    /// That snapshot's time, host and paths.
    pub snapshot_time: String,
    /// Its host.
    pub host: String,
    /// Its paths.
    pub paths: Vec<String>,
    /// `sample` (a random sample of files) or `full` (the whole snapshot).
    pub mode: String,
    /// Files restored and checked against the chunk ids recorded at backup time.
    pub files: u64,
    /// Files that did not restore or did not match.
    pub failed: u64,
    /// Bytes restored.
    pub bytes: u64,
    /// Wall seconds from the first read to the last file checked: a measured recovery time
    /// for this much data.
    pub seconds: f64,
    /// True when every file restored and matched.
    pub ok: bool,
    /// Why it failed (the first problem), without file names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DrillRecord {
    /// Parses a version-1 record.
    pub fn decode(bytes: &[u8]) -> Result<DrillRecord, String> {
        let r: DrillRecord = serde_json::from_slice(bytes).map_err(|e| format!("not a drill record: {e}"))?;
        if r.version != 1 {
            return Err(format!("drill record version {} is not supported", r.version));
        }
        r.time.parse::<jiff::Timestamp>().map_err(|e| format!("drill time {:?}: {e}", r.time))?;
        Ok(r)
    }

    /// Stores the record; returns its name.
    pub fn save(&self, store: &dyn Store) -> Result<String, StoreError> {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let name = blake3::hash(&bytes).to_hex().to_string();
        match store.put_new(Kind::Drill, &name, &bytes) {
            Ok(()) | Err(StoreError::Exists(_)) => Ok(name),
            Err(e) => Err(e),
        }
    }
}

/// Every readable drill record, oldest first; unreadable ones are skipped (they are facts
/// about the past, not data).
pub fn read_all(store: &dyn Store) -> Result<Vec<DrillRecord>, StoreError> {
    let mut out = Vec::new();
    for l in store.list(Kind::Drill)? {
        match store.get(Kind::Drill, &l.name) {
            Ok(b) if blake3::hash(&b).to_hex().as_str() == l.name => {
                if let Ok(r) = DrillRecord::decode(&b) {
                    out.push(r);
                }
            }
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    // decode() checked every time parses.
    out.sort_by_key(|r| r.time.parse::<jiff::Timestamp>().ok());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_other_versions_are_refused() {
        let r = DrillRecord {
            version: 1,
            time: "2026-12-06T04:00:00Z".into(),
            by_host: "admin".into(),
            snapshot: "ab".repeat(32),
            snapshot_time: "2026-12-05T23:00:00Z".into(),
            host: "www".into(),
            paths: vec!["/srv/www".into()],
            mode: "sample".into(),
            files: 20,
            failed: 0,
            bytes: 12345,
            seconds: 0.4,
            ok: true,
            error: None,
        };
        let b = serde_json::to_vec(&r).unwrap();
        assert_eq!(DrillRecord::decode(&b).unwrap(), r);
        let mut v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        v["version"] = 2.into();
        assert!(DrillRecord::decode(&serde_json::to_vec(&v).unwrap()).is_err());
        assert!(DrillRecord::decode(b"{}").is_err());
    }
}
