//! The repository `config` object: format version and the parameters every writer must share.
//! Plain JSON, readable without the key, so any tool can tell what it is looking at.

use serde::{Deserialize, Serialize};

/// The repository format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Chunker parameters (bytes).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    /// Smallest chunk (except a file's last).
    pub min: u32,
    /// Target average.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        // max 4 MiB (restic uses 8): chunks that large are rare with normalised FastCDC, and
        // every reader and sealer thread keeps buffers of 2 × max; measured -25 MB peak RSS.
        ChunkerParams { min: 512 * 1024, avg: 1024 * 1024, max: 4 * 1024 * 1024 }
    }
}

/// The `config` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Repository format version; readers refuse a newer one.
    pub version: u32,
    /// Random repository id (hex), names the local cache.
    pub id: String,
    /// Content-defined chunking parameters.
    pub chunker: ChunkerParams,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// zstd level for compressible blobs.
    pub zstd_level: i32,
    /// When the repository was created (RFC 3339).
    pub created: String,
}

/// Why a config object cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Written by a newer kura.
    #[error("repository format version {found} is newer than this kura supports ({supported}); upgrade kura to read it")]
    TooNew {
        /// The version in the config.
        found: u32,
        /// What this build supports.
        supported: u32,
    },
    /// Not a valid config object.
    #[error("config is malformed: {0}")]
    Malformed(String),
}

impl Config {
    /// A new config with a random id and default parameters.
    pub fn new() -> Result<Config, ConfigError> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| ConfigError::Malformed(e.to_string()))?;
        Ok(Config {
            version: FORMAT_VERSION,
            id: hex::encode(id),
            chunker: ChunkerParams::default(),
            pack_size: 16 * 1024 * 1024,
            zstd_level: 3,
            created: jiff::Timestamp::now().to_string(),
        })
    }

    /// Parses and validates a config object.
    pub fn decode(bytes: &[u8]) -> Result<Config, ConfigError> {
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Malformed(e.to_string()))?;
        if probe.version > FORMAT_VERSION {
            return Err(ConfigError::TooNew { found: probe.version, supported: FORMAT_VERSION });
        }
        let c: Config =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Malformed(e.to_string()))?;
        let p = c.chunker;
        let sane = c.version >= 1
            && p.min >= 64
            && p.min <= p.avg
            && p.avg <= p.max
            && p.max <= 16 * 1024 * 1024
            && p.avg.is_power_of_two()
            && p.min.is_multiple_of(2)
            && p.max.is_multiple_of(2)
            && c.pack_size >= 1024
            && c.pack_size <= 1 << 30
            && (1..=22).contains(&c.zstd_level);
        if !sane {
            return Err(ConfigError::Malformed("parameters out of range".into()));
        }
        Ok(c)
    }

    /// Serialises to JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_version_is_refused_clearly() {
        let mut c = Config::new().unwrap();
        c.version = 2;
        let err = Config::decode(&c.encode()).unwrap_err();
        assert!(err.to_string().contains("newer than this kura supports"), "{err}");
    }

    #[test]
    fn round_trip() {
        let c = Config::new().unwrap();
        assert_eq!(Config::decode(&c.encode()).unwrap().id, c.id);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Config::decode(&bytes);
        }
    }
}
