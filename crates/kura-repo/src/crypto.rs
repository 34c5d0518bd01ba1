//! The master key and the primitives built on it: keyed BLAKE3 ids, XChaCha20-Poly1305 sealing,
//! and the chunker seed. Every subkey is derived from one 32-byte master secret.

use crate::id::Id;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// Bytes a sealed message adds: 24-byte nonce in front, 16-byte tag behind.
pub const SEAL_OVERHEAD: usize = 24 + 16;

/// The repository master key; lives only in memory, wrapped by passphrases at rest.
pub struct MasterKey {
    secret: Zeroizing<[u8; 32]>,
    id_key: Zeroizing<[u8; 32]>,
    cipher: XChaCha20Poly1305,
    chunker_seed: u64,
}

/// Sealing or opening failed: the bytes were altered, truncated or sealed under another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailed;

impl MasterKey {
    /// Builds the key and its subkeys from the master secret.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = Zeroizing::new(secret);
        let enc = Zeroizing::new(blake3::derive_key("kura 2026 repository encryption key", &*secret));
        let id_key = Zeroizing::new(blake3::derive_key("kura 2026 blob id key", &*secret));
        let seed = blake3::derive_key("kura 2026 chunker seed", &*secret);
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&seed[..8]);
        let cipher = XChaCha20Poly1305::new(&(*enc).into());
        MasterKey { secret, id_key, cipher, chunker_seed: u64::from_le_bytes(s8) }
    }

    /// A new random master key.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut s = [0u8; 32];
        getrandom::fill(&mut s)?;
        Ok(Self::from_secret(s))
    }

    /// The raw secret, for wrapping into a key file.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The seed mixed into the chunker's gear table, so cut points do not reveal content.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    /// A blob's id: keyed BLAKE3 of its plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// Encrypts `plain` bound to `aad`; output is nonce ‖ ciphertext ‖ tag, appended to `out`.
    pub fn seal_into(&self, plain: &[u8], aad: &[u8], out: &mut Vec<u8>) -> Result<(), AuthFailed> {
        let mut n = [0u8; 24];
        getrandom::fill(&mut n).map_err(|_| AuthFailed)?;
        let nonce = XNonce::from(n);
        out.extend_from_slice(&n);
        let start = out.len();
        out.extend_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce, aad, (&mut out[start..]).into())
            .map_err(|_| AuthFailed)?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypts in place: `buf` holds 24 bytes of room for the nonce followed by the plaintext;
    /// on return it is nonce ‖ ciphertext ‖ tag. Saves a copy on the backup hot path.
    pub fn seal_in_place(&self, buf: &mut Vec<u8>, aad: &[u8]) -> Result<(), AuthFailed> {
        if buf.len() < 24 {
            return Err(AuthFailed);
        }
        let mut n = [0u8; 24];
        getrandom::fill(&mut n).map_err(|_| AuthFailed)?;
        buf[..24].copy_from_slice(&n);
        let tag = self
            .cipher
            .encrypt_inout_detached(&XNonce::from(n), aad, (&mut buf[24..]).into())
            .map_err(|_| AuthFailed)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypts into a new vector.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, AuthFailed> {
        let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        self.seal_into(plain, aad, &mut out)?;
        Ok(out)
    }

    /// A versioned record as stored: `magic ‖ sealed(postcard(value))`, with the magic as AAD
    /// (index files, prune plans).
    pub fn seal_record<T: serde::Serialize>(&self, magic: &[u8; 8], value: &T) -> Option<Vec<u8>> {
        let plain = postcard::to_stdvec(value).ok()?;
        let mut out = magic.to_vec();
        self.seal_into(&plain, magic, &mut out).ok()?;
        Some(out)
    }

    /// Opens a record written by [`MasterKey::seal_record`]; `what` names it in errors.
    pub fn open_record<T: serde::de::DeserializeOwned>(&self, magic: &[u8; 8], what: &str, bytes: &[u8]) -> Result<T, String> {
        if bytes.len() < 8 || &bytes[..8] != magic {
            return Err(format!("not {what} (magic missing)"));
        }
        let plain = self.open(&bytes[8..], magic).map_err(|_| "failed authentication")?;
        postcard::from_bytes(&plain).map_err(|e| e.to_string())
    }

    /// Decrypts and authenticates a sealed message.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, AuthFailed> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthFailed);
        }
        let (n, rest) = sealed.split_at(24);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let mut nb = [0u8; 24];
        nb.copy_from_slice(n);
        let mut tb = [0u8; 16];
        tb.copy_from_slice(tag);
        let mut buf = ct.to_vec();
        self.cipher
            .decrypt_inout_detached(&XNonce::from(nb), aad, buf.as_mut_slice().into(), &tb.into())
            .map_err(|_| AuthFailed)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let k = MasterKey::from_secret([7; 32]);
        let sealed = k.seal(b"secret data", b"aad").unwrap();
        assert_eq!(k.open(&sealed, b"aad").unwrap(), b"secret data");
        assert_eq!(k.open(&sealed, b"other aad"), Err(AuthFailed));
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert_eq!(k.open(&bad, b"aad"), Err(AuthFailed));
        assert_eq!(k.open(&sealed[..10], b"aad"), Err(AuthFailed));
        let other = MasterKey::from_secret([8; 32]);
        assert_eq!(other.open(&sealed, b"aad"), Err(AuthFailed));
    }

    #[test]
    fn seal_in_place_opens_like_seal() {
        let k = MasterKey::from_secret([7; 32]);
        let mut buf = vec![0u8; 24];
        buf.extend_from_slice(b"in place");
        k.seal_in_place(&mut buf, b"id").unwrap();
        assert_eq!(k.open(&buf, b"id").unwrap(), b"in place");
    }

    #[test]
    fn test_vectors_of_format_md() {
        // docs/FORMAT.md §17 quotes these: a change here is a format change.
        let k = MasterKey::from_secret([1; 32]);
        assert_eq!(k.blob_id(b"kura").to_hex(), "f3883362eb7fef31131ea7b0cab696cbe56d6419de572940a5813c78a7c4e82b");
        assert_eq!(k.chunker_seed(), 2815515105509547886);
        assert_eq!(Id::of_stored(b"kura").to_hex(), "26697494d1125815ee688fdb89c8b29780f33877247a39608a9b2f7bf308921c");
    }

    #[test]
    fn blob_ids_depend_on_the_key() {
        let a = MasterKey::from_secret([1; 32]);
        let b = MasterKey::from_secret([2; 32]);
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), Id::of_stored(b"x"));
    }

    proptest::proptest! {
        #[test]
        fn open_never_panics_on_garbage(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let k = MasterKey::from_secret([3; 32]);
            proptest::prop_assert!(k.open(&bytes, b"").is_err());
        }
    }
}
