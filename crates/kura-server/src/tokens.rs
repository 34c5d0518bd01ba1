//! Access tokens: random secrets shown once at creation, stored only as BLAKE3 hashes with a
//! role and the repositories they open, in `<state_dir>/tokens.json` (owner-only).

use crate::ServerError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Restore: read objects and listings, register its own reader session.
    Read,
    /// Add packs, index files and snapshots, and read what a backup and a restore need. Never
    /// deletes or overwrites anything.
    Backup,
    /// Everything, including init, keys, forget and prune.
    Admin,
    /// Append to the shadow streams it names (a primary's `kura shadow push`); opens no
    /// repository and can never shorten a stream's journal.
    Shadow,
}

impl Role {
    /// Parses `read`, `backup`, `admin` or `shadow`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "backup" => Some(Role::Backup),
            "admin" => Some(Role::Admin),
            "shadow" => Some(Role::Shadow),
            _ => None,
        }
    }

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Backup => "backup",
            Role::Admin => "admin",
            Role::Shadow => "shadow",
        }
    }
}

/// A stored token (its secret is not stored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenEntry {
    /// Short public id (for `list` and `revoke`, and in logs).
    pub id: String,
    /// What the operator called it (host name, purpose).
    pub label: String,
    /// Its role.
    pub role: Role,
    /// Repository names it opens; `*` for all.
    pub repos: Vec<String>,
    /// BLAKE3 of the secret, hex.
    pub hash: String,
    /// When it was made (RFC 3339).
    pub created: String,
}

impl TokenEntry {
    /// Whether this token opens `repo`.
    pub fn opens(&self, repo: &str) -> bool {
        self.repos.iter().any(|r| r == "*" || r == repo)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenEntry>,
}

/// The token list, indexed by hash for lookups.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
    by_hash: HashMap<[u8; 32], usize>,
}

/// The hash a secret is stored and looked up under.
fn hash_secret(secret: &str) -> [u8; 32] {
    *blake3::hash(secret.trim().as_bytes()).as_bytes()
}

impl Tokens {
    /// Reads the token file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Tokens, ServerError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tokens::default()),
            Err(e) => return Err(ServerError::Config(format!("cannot read {}: {e}", path.display()))),
        };
        let file: TokenFile = serde_json::from_str(&text)
            .map_err(|e| ServerError::Config(format!("{} is not a kura token list: {e}", path.display())))?;
        if file.version != 1 {
            return Err(ServerError::Config(format!("{}: token list version {} is not supported", path.display(), file.version)));
        }
        let mut t = Tokens::default();
        for e in file.tokens {
            t.insert(e)?;
        }
        Ok(t)
    }

    fn insert(&mut self, e: TokenEntry) -> Result<(), ServerError> {
        let h: [u8; 32] = hex::decode(&e.hash)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ServerError::Config(format!("token {} has a malformed hash", e.id)))?;
        self.by_hash.insert(h, self.entries.len());
        self.entries.push(e);
        Ok(())
    }

    /// Writes the list atomically (temporary file, fsync, rename), readable by the owner only.
    pub fn save(&self, path: &Path) -> Result<(), ServerError> {
        let err = |e: std::io::Error| ServerError::Config(format!("cannot write {}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("json.tmp");
        // A leftover temporary file would keep its permissions: start from none.
        let _ = std::fs::remove_file(&tmp);
        let file = TokenFile { version: 1, tokens: self.entries.clone() };
        let text = serde_json::to_string_pretty(&file).map_err(|e| ServerError::Config(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        Ok(())
    }

    /// Makes a new token; returns its entry and the secret, which is never stored.
    pub fn add(&mut self, role: Role, repos: Vec<String>, label: &str) -> Result<(TokenEntry, String), ServerError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| ServerError::Config(format!("no randomness: {e}")))?;
        let secret = format!("kura_{}", hex::encode(raw));
        let hash = hash_secret(&secret);
        let entry = TokenEntry {
            id: hex::encode(&blake3::hash(&hash).as_bytes()[..4]),
            label: label.to_string(),
            role,
            repos,
            hash: hex::encode(hash),
            created: jiff::Timestamp::now().to_string(),
        };
        self.insert(entry.clone())?;
        Ok((entry, secret))
    }

    /// Removes the tokens whose id or label is `which`; returns how many.
    pub fn revoke(&mut self, which: &str) -> usize {
        let before = self.entries.len();
        let kept: Vec<TokenEntry> = self.entries.drain(..).filter(|e| e.id != which && e.label != which).collect();
        *self = Tokens::default();
        for e in kept {
            // Entries were valid when loaded, so re-inserting cannot fail.
            let _ = self.insert(e);
        }
        before - self.entries.len()
    }

    /// The tokens, in creation order.
    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    /// The entry of a presented secret. Lookup is by the secret's hash, so the time it takes
    /// tells nothing about the stored secrets.
    pub fn lookup(&self, secret: &str) -> Option<&TokenEntry> {
        let h = hash_secret(secret);
        let i = *self.by_hash.get(&h)?;
        let e = &self.entries[i];
        let stored = hex::decode(&e.hash).ok()?;
        bool::from(subtle::ConstantTimeEq::ct_eq(&stored[..], &h[..])).then_some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mut t = Tokens::load(&path).unwrap();
        let (a, secret_a) = t.add(Role::Backup, vec!["office".into()], "host-a").unwrap();
        let (_, secret_b) = t.add(Role::Admin, vec!["*".into()], "laptop").unwrap();
        t.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret_a) && !text.contains(&secret_b), "secrets must not be stored");
        let mut t = Tokens::load(&path).unwrap();
        let e = t.lookup(&secret_a).unwrap();
        assert_eq!((e.role, e.opens("office"), e.opens("other")), (Role::Backup, true, false));
        assert!(t.lookup(&secret_b).unwrap().opens("anything"));
        assert!(t.lookup("kura_0000").is_none());
        assert_eq!(t.revoke(&a.id), 1);
        assert!(t.lookup(&secret_a).is_none());
        assert!(t.lookup(&secret_b).is_some());
        assert_eq!(t.revoke("laptop"), 1);
        assert!(t.entries().is_empty());
    }
}
