//! Key files: the master secret wrapped by a passphrase through Argon2id and XChaCha20-Poly1305.
//! A repository may hold several; any one of them opens it.

use crate::crypto::MasterKey;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Argon2id cost parameters, stored in each key file so they can be raised later.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 32 MiB, 6 passes, 1 lane: about 0.2 s on the project machine. Every command derives
    /// the key, so its memory is the floor of every command's peak RSS: 32 MiB matches restic's
    /// scrypt (N=2^15, r=8) and is above OWASP's Argon2id settings (19–46 MiB), while the six
    /// passes keep an attacker's work per guess (memory × passes) where 64 MiB × 3 had it.
    fn default() -> Self {
        KdfParams { m_cost: 32 * 1024, t_cost: 6, p_cost: 1 }
    }
}

/// The on-disk key file (JSON, version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Format version of this record.
    pub version: u32,
    /// Always "argon2id".
    pub kdf: String,
    /// Argon2id costs.
    #[serde(flatten)]
    pub params: KdfParams,
    /// 32 random bytes, hex.
    pub salt: String,
    /// nonce ‖ encrypted master secret ‖ tag, hex.
    pub wrapped: String,
    /// When the key was added (RFC 3339).
    pub created: String,
    /// Host that added it (informational).
    pub host: String,
    /// User that added it (informational).
    pub user: String,
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The passphrase does not unwrap this key file.
    #[error("wrong password")]
    WrongPassword,
    /// The file is not a valid key file.
    #[error("key file is malformed: {0}")]
    Malformed(String),
    /// The OS random source failed.
    #[error("no randomness available: {0}")]
    Random(String),
}

const AAD: &[u8] = b"kura key file v1";

/// The costs a key file may ask for: 1 GiB, 64 passes, 16 lanes. Key files travel (a pull copies
/// a source's keys into a replica), so a forged one must not make opening a repository allocate
/// terabytes or run for days before the passphrase is even checked.
pub const KDF_LIMIT: KdfParams = KdfParams { m_cost: 1 << 20, t_cost: 64, p_cost: 16 };

fn kek(password: &[u8], salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    if p.m_cost > KDF_LIMIT.m_cost || p.t_cost > KDF_LIMIT.t_cost || p.p_cost > KDF_LIMIT.p_cost {
        return Err(KeyFileError::Malformed(format!(
            "argon2 costs m={} KiB t={} p={} exceed the limit m={} KiB t={} p={}",
            p.m_cost, p.t_cost, p.p_cost, KDF_LIMIT.m_cost, KDF_LIMIT.t_cost, KDF_LIMIT.p_cost
        )));
    }
    let params = argon2::Params::new(p.m_cost, p.t_cost, p.p_cost, Some(32))
        .map_err(|e| KeyFileError::Malformed(format!("argon2 parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(password, salt, &mut *out)
        .map_err(|e| KeyFileError::Malformed(format!("argon2: {e}")))?;
    Ok(out)
}

impl KeyFile {
    /// Wraps `master` under `password`.
    pub fn wrap(
        master: &MasterKey,
        password: &[u8],
        params: KdfParams,
        host: &str,
        user: &str,
    ) -> Result<KeyFile, KeyFileError> {
        let mut salt = [0u8; 32];
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut salt).map_err(|e| KeyFileError::Random(e.to_string()))?;
        getrandom::fill(&mut nonce).map_err(|e| KeyFileError::Random(e.to_string()))?;
        let k = kek(password, &salt, params)?;
        let cipher = XChaCha20Poly1305::new(&(*k).into());
        let mut buf = master.secret().to_vec();
        let tag = cipher
            .encrypt_inout_detached(&XNonce::from(nonce), AAD, buf.as_mut_slice().into())
            .map_err(|_| KeyFileError::Malformed("encryption failed".into()))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&buf);
        wrapped.extend_from_slice(&tag);
        Ok(KeyFile {
            version: 1,
            kdf: "argon2id".into(),
            params,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
            created: jiff::Timestamp::now().to_string(),
            host: host.into(),
            user: user.into(),
        })
    }

    /// Unwraps the master key with `password`.
    pub fn unwrap(&self, password: &[u8]) -> Result<MasterKey, KeyFileError> {
        if self.version != 1 || self.kdf != "argon2id" {
            return Err(KeyFileError::Malformed(format!(
                "unsupported key file version {} / kdf {}",
                self.version, self.kdf
            )));
        }
        let salt = hex::decode(&self.salt).map_err(|e| KeyFileError::Malformed(e.to_string()))?;
        let w = hex::decode(&self.wrapped).map_err(|e| KeyFileError::Malformed(e.to_string()))?;
        if w.len() != 24 + 32 + 16 {
            return Err(KeyFileError::Malformed("wrapped key has the wrong length".into()));
        }
        let k = kek(password, &salt, self.params)?;
        let cipher = XChaCha20Poly1305::new(&(*k).into());
        let mut n = [0u8; 24];
        n.copy_from_slice(&w[..24]);
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&w[24..56]);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&w[56..]);
        cipher
            .decrypt_inout_detached(&XNonce::from(n), AAD, secret.as_mut_slice().into(), &tag.into())
            .map_err(|_| KeyFileError::WrongPassword)?;
        Ok(MasterKey::from_secret(*secret))
    }

    /// Parses a key file; never panics on garbage.
    pub fn decode(bytes: &[u8]) -> Result<KeyFile, KeyFileError> {
        serde_json::from_slice(bytes).map_err(|e| KeyFileError::Malformed(e.to_string()))
    }

    /// Serialises to JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 };

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let m = MasterKey::from_secret([9; 32]);
        let kf = KeyFile::wrap(&m, b"pw", FAST, "h", "u").unwrap();
        let back = KeyFile::decode(&kf.encode()).unwrap().unwrap(b"pw").unwrap();
        assert_eq!(back.secret(), m.secret());
        assert!(matches!(kf.unwrap(b"nope"), Err(KeyFileError::WrongPassword)));
    }

    #[test]
    fn costs_beyond_the_limit_are_refused_before_any_work() {
        let m = MasterKey::from_secret([9; 32]);
        let mut kf = KeyFile::wrap(&m, b"pw", FAST, "h", "u").unwrap();
        // 4 TiB of memory: refused at once, not allocated.
        kf.params.m_cost = u32::MAX;
        assert!(matches!(kf.unwrap(b"pw"), Err(KeyFileError::Malformed(m)) if m.contains("exceed")));
        kf.params = KdfParams { t_cost: 1000, ..FAST };
        assert!(matches!(kf.unwrap(b"pw"), Err(KeyFileError::Malformed(_))));
        kf.params = KdfParams { p_cost: 17, ..FAST };
        assert!(matches!(kf.unwrap(b"pw"), Err(KeyFileError::Malformed(_))));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = KeyFile::decode(&bytes);
        }
    }
}
