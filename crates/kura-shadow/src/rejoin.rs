//! `kura shadow rejoin`: a fenced former primary comes back after a failover. Its tree is
//! hashed and compared with the promoted standby's; what it wrote that the standby never got
//! is kept on the standby as a named branch (restorable, never dropped); then the tree is made
//! a copy of the new primary's, fetching only the chunks of entries that differ.

use crate::apply::{self, Chunks};
use crate::capture::Capture;
use crate::push::{Link, PushState, Sent, Session, id_key};
use crate::{Manifest, ShadowError};
use kura_repo::Id;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a rejoin did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Rejoined {
    /// The stream's epoch this host now follows.
    pub epoch: u64,
    /// Entries that differed from the tree the standby was promoted with.
    pub diverged: u64,
    /// The branch they were kept in (none when nothing diverged).
    pub branch: Option<String>,
    /// Records and chunk bytes sent for the branch.
    pub branch_records: u64,
    /// Chunk bytes sent for the branch (compressed).
    pub branch_bytes: u64,
    /// The primary's record the tree now equals (at least: later ones may be in too).
    pub head: u64,
    /// Entries written and removed to get there.
    pub written: u64,
    /// Entries removed.
    pub removed: u64,
    /// Chunk bytes fetched.
    pub fetched_bytes: u64,
}

/// Chunks fetched from the standby, each checked against its id.
struct Remote<'a> {
    link: &'a Link,
    key: [u8; 32],
    fetched: AtomicU64,
}

impl Chunks for Remote<'_> {
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        let b = self.link.chunk(id, &self.key)?;
        self.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }
}

/// A default branch name: this host's name and the time, `host-20261205T071500Z`.
pub fn default_branch_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(40).collect();
    let t = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
    if host.is_empty() { format!("rejoin-{t}") } else { format!("{host}-{t}") }
}

/// Rejoins `source` to the promoted stream behind `link`: keeps what diverged as branch
/// `branch`, makes `source` equal to the primary's newest record, and remembers the new epoch
/// (this host does not push while it is a copy).
pub fn rejoin(link: &Link, source: &Path, state_dir: &Path, branch: &str) -> Result<Rejoined, ShadowError> {
    let st = link.status()?;
    if st.role != "primary" {
        return Err(ShadowError::Usage(format!(
            "stream {} was not promoted (its standby is still a standby at epoch {}): nothing to rejoin; `kura shadow push` goes on",
            st.stream, st.epoch
        )));
    }
    let key = id_key(&st)?;
    let state_path = PushState::path(state_dir, &st.id_key);
    let head = link.manifest()?;
    // What the standby had when it was promoted: what this host wrote beyond it diverged. When
    // the journal no longer reaches back that far, the newest tree stands in for it.
    let promoted = match link.manifest_at(st.promoted_seq)? {
        Some(m) => m,
        None => {
            tracing::warn!("the standby's journal no longer holds record {}: comparing with its newest tree", st.promoted_seq);
            head.clone()
        }
    };
    // This host's tree, every file hashed; chunks the standby holds are not sent.
    let mut cap = Capture::new(source, Manifest::default(), key, st.chunker_seed);
    cap.know(head.chunk_ids());
    cap.know(promoted.chunk_ids());
    let mut pending = crate::capture::Pending::default();
    cap.full_scan(&mut pending)?;
    let mine = cap.state().clone();
    let mut out = Rejoined { epoch: st.epoch, diverged: mine.differences(&promoted).len() as u64, ..Rejoined::default() };
    if out.diverged > 0 {
        let b = link.branch(branch);
        let mut s = Session { cap, out: crate::push::Outbox { next: 1, epoch: st.epoch } };
        let mut sent = Sent::default();
        s.flush(&b, &mut pending, &mut sent)?;
        b.seal()?;
        out.branch = Some(branch.to_string());
        out.branch_records = sent.records;
        out.branch_bytes = sent.bytes;
    }
    // From here this host is a copy: it must not push at the new epoch beside the primary.
    PushState { version: 1, stream: st.stream.clone(), epoch: st.epoch, rejoined: true }.save(&state_path)?;
    let remote = Remote { link, key, fetched: AtomicU64::new(0) };
    let r = apply::reconcile_verified(source, &head, &remote, Some(&mine))?;
    out.head = st.head;
    out.written = r.written;
    out.removed = r.removed;
    out.fetched_bytes = remote.fetched.load(Ordering::Relaxed);
    Ok(out)
}
