//! Snapshot objects: a public part the storage can read (group, time, referenced packs) and a
//! sealed body (root tree, summary). The public part is authenticated as the body's AAD.

use crate::crypto::MasterKey;
use crate::id::{Id, hex_id, hex_ids};
use serde::{Deserialize, Serialize};

/// Magic at the start of a snapshot object.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"KURASNAP";
/// Snapshot record version.
pub const SNAPSHOT_VERSION: u32 = 1;

/// What the storage (and a keyless server) may read: enough for retention and garbage collection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPublic {
    /// The snapshot's time (RFC 3339, UTC, claimed by the client).
    pub time: String,
    /// Host name.
    pub host: String,
    /// Backed-up paths (absolute).
    pub paths: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Every pack holding a blob this snapshot references, sorted.
    #[serde(with = "hex_ids")]
    pub packs: Vec<Id>,
    /// For a copy written by `kura repair snapshots`: the damaged original's id. Retention
    /// treats the two as one snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
}

/// Counters from the backup that made the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Summary {
    /// Files seen.
    pub files: u64,
    /// Directories seen.
    pub dirs: u64,
    /// Files new since the parent.
    pub files_new: u64,
    /// Files changed since the parent.
    pub files_changed: u64,
    /// Files unchanged (not read again).
    pub files_unchanged: u64,
    /// Bytes of all files.
    pub bytes_total: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Blobs added to the repository.
    pub blobs_added: u64,
    /// Plaintext bytes of added blobs.
    pub bytes_added: u64,
    /// Bytes written to the repository (compressed, encrypted).
    pub bytes_stored: u64,
    /// Source entries that could not be read.
    pub errors: u64,
    /// Seconds the backup took.
    pub seconds: f64,
}

/// The sealed part.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotBody {
    /// Root tree.
    #[serde(with = "hex_id")]
    pub tree: Id,
    /// Parent snapshot used for change detection.
    pub parent: Option<String>,
    /// User who ran the backup.
    pub user: String,
    /// kura version that wrote it.
    pub program: String,
    /// Exclude patterns in force.
    pub excludes: Vec<String>,
    /// Counters.
    pub summary: Summary,
}

/// A decoded snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Public part.
    pub public: SnapshotPublic,
    /// Sealed part.
    pub body: SnapshotBody,
}

/// Decodes the public part only (no key needed).
pub fn decode_public(bytes: &[u8]) -> Result<(SnapshotPublic, usize), String> {
    if bytes.len() < 16 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err("not a snapshot object (magic missing)".into());
    }
    let mut w = [0u8; 4];
    w.copy_from_slice(&bytes[8..12]);
    let version = u32::from_le_bytes(w);
    if version != SNAPSHOT_VERSION {
        return Err(format!("unsupported snapshot version {version}"));
    }
    w.copy_from_slice(&bytes[12..16]);
    let plen = u32::from_le_bytes(w) as usize;
    let end = 16usize.checked_add(plen).filter(|&e| e <= bytes.len()).ok_or("truncated")?;
    let p: SnapshotPublic = serde_json::from_slice(&bytes[16..end]).map_err(|e| e.to_string())?;
    jiff::Timestamp::strptime("%Y-%m-%dT%H:%M:%S%.f%:z", &p.time)
        .or_else(|_| p.time.parse::<jiff::Timestamp>())
        .map_err(|e| format!("bad time {:?}: {e}", p.time))?;
    Ok((p, end))
}

impl Snapshot {
    /// The snapshot time.
    pub fn time(&self) -> jiff::Timestamp {
        self.public.time.parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    /// Encodes to the stored form.
    pub fn encode(&self, key: &MasterKey) -> Option<Vec<u8>> {
        let p = serde_json::to_vec(&self.public).ok()?;
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&p);
        let aad = out.clone();
        let body = serde_json::to_vec(&self.body).ok()?;
        key.seal_into(&body, &aad, &mut out).ok()?;
        Some(out)
    }

    /// Decodes and authenticates the stored form.
    pub fn decode(key: &MasterKey, bytes: &[u8]) -> Result<Snapshot, String> {
        let (public, end) = decode_public(bytes)?;
        let body = key.open(&bytes[end..], &bytes[..end]).map_err(|_| "failed authentication")?;
        let body: SnapshotBody = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(Snapshot { public, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            public: SnapshotPublic {
                time: "2026-11-25T10:00:00Z".into(),
                host: "h".into(),
                paths: vec!["/srv".into()],
                tags: vec![],
                packs: vec![Id([1; 32])],
                original: None,
            },
            body: SnapshotBody {
                tree: Id([2; 32]),
                parent: None,
                user: "u".into(),
                program: "kura".into(),
                excludes: vec![],
                summary: Summary::default(),
            },
        }
    }

    #[test]
    fn public_part_is_authenticated() {
        let k = MasterKey::from_secret([6; 32]);
        let bytes = sample().encode(&k).unwrap();
        assert_eq!(Snapshot::decode(&k, &bytes).unwrap(), sample());
        let s = String::from_utf8_lossy(&bytes).replace("\"h\"", "\"x\"");
        let tampered = [&bytes[..16], &s.as_bytes()[16..16 + (bytes.len() - 16).min(s.len() - 16)]].concat();
        assert!(Snapshot::decode(&k, &tampered).is_err());
        for cut in 0..bytes.len() {
            assert!(Snapshot::decode(&k, &bytes[..cut]).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let k = MasterKey::from_secret([6; 32]);
            let mut b = SNAPSHOT_MAGIC.to_vec(); b.extend_from_slice(&1u32.to_le_bytes()); b.extend_from_slice(&bytes);
            let _ = Snapshot::decode(&k, &b);
            let _ = Snapshot::decode(&k, &bytes);
        }
    }
}
