//! `kura shadow rejoin`: a fenced former primary comes back after a failover. Its tree is
//! hashed and compared with the promoted standby's; what it wrote that the standby never got
//! is kept on the standby as a named branch (restorable, never dropped); then the tree is made
//! a copy of the new primary's, fetching only the chunks of entries that differ. `follow`
//! keeps the copy live (record by record) until the stream is handed back to it: the failback.

use crate::apply::{self, Chunks};
use crate::capture::Capture;
use crate::push::{Link, PushState, Sent, Session, handed_back, id_key};
use std::time::Duration;
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
    /// The stream had been handed back (`kura shadow demote`): this host pushes at the new
    /// epoch now.
    pub handed_back: bool,
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
/// `branch`, makes `source` equal to the primary's newest durable record, and remembers the
/// new epoch (this host does not push while it is a copy). Run again on a copy (after a
/// restart of its follower), what it holds beyond the record it followed is what diverged. On
/// a stream handed back to this copy (`kura shadow demote`), `source` is made equal to the last
/// record of the promoted epoch and this host pushes at the new one.
pub fn rejoin(link: &Link, source: &Path, state_dir: &Path, branch: &str) -> Result<Rejoined, ShadowError> {
    let st = link.status()?;
    let key = id_key(&st)?;
    let state_path = PushState::path(state_dir, &st.id_key);
    let mine = PushState::load(&state_path)?;
    let back = mine.as_ref().is_some_and(|m| handed_back(&st, m));
    if st.role != "primary" && !back {
        return Err(ShadowError::Usage(format!(
            "stream {} was not promoted (its standby is still a standby at epoch {}): nothing to rejoin; `kura shadow push` goes on",
            st.stream, st.epoch
        )));
    }
    // The record this host ends at: the newest durable one, or the last of the promoted epoch.
    let target = if back { st.demoted_seq } else { st.durable.max(st.promoted_seq) };
    let head = link.manifest_at(target)?.ok_or_else(|| ShadowError::Remote(format!("stream {}: the standby has no tree for record {target}", st.stream)))?;
    // What this host should hold: the record it followed to, or else the tree the standby was
    // promoted with; what it holds beyond that diverged. When the journal no longer reaches
    // back that far, the newest tree stands in for it.
    let followed = mine.as_ref().filter(|m| m.rejoined && m.followed > 0).map(|m| m.followed);
    let since = followed.unwrap_or(st.promoted_seq);
    let expected = match link.manifest_at(since)? {
        Some(m) => m,
        None => {
            tracing::warn!("the standby's journal no longer holds record {since}: comparing with its newest tree");
            head.clone()
        }
    };
    // This host's tree, every file hashed; chunks the standby holds are not sent.
    let mut cap = Capture::new(source, Manifest::default(), key, st.chunker_seed);
    cap.know(head.chunk_ids());
    cap.know(expected.chunk_ids());
    let mut pending = crate::capture::Pending::default();
    cap.full_scan(&mut pending)?;
    let tree = cap.state().clone();
    let mut out = Rejoined { epoch: st.epoch, diverged: tree.differences(&expected).len() as u64, ..Rejoined::default() };
    if out.diverged > 0 {
        let b = link.branch(branch);
        let mut s = Session { cap, out: crate::push::Outbox::new(1, st.epoch) };
        let mut sent = Sent::default();
        s.flush(&b, &mut pending, &mut sent)?;
        b.seal()?;
        out.branch = Some(branch.to_string());
        out.branch_records = sent.records;
        out.branch_bytes = sent.bytes;
    }
    // From here this host is a copy: it must not push at the new epoch beside the primary.
    let old_epoch = mine.as_ref().map(|m| m.epoch).filter(|_| back).unwrap_or(st.epoch);
    let mut state = PushState { version: 1, stream: st.stream.clone(), epoch: old_epoch, rejoined: true, followed: 0 };
    state.save(&state_path)?;
    let remote = Remote { link, key, fetched: AtomicU64::new(0) };
    let r = apply::reconcile_verified(source, &head, &remote, Some(&tree))?;
    state.followed = target;
    if back {
        state.epoch = st.epoch;
        state.rejoined = false;
        out.handed_back = true;
    }
    state.save(&state_path)?;
    out.head = target;
    out.written = r.written;
    out.removed = r.removed;
    out.fetched_bytes = remote.fetched.load(Ordering::Relaxed);
    Ok(out)
}

/// What following a promoted stream did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Followed {
    /// Records applied.
    pub records: u64,
    /// The primary's record this host now holds.
    pub head: u64,
    /// Chunk bytes fetched.
    pub fetched_bytes: u64,
    /// Times the standby had pruned the next record and the tree was resynced whole.
    pub resyncs: u64,
    /// The epoch the stream was handed back to this host at (it pushes now), if it was.
    pub handed_back: Option<u64>,
}

/// Keeps a rejoined copy (`source`) following its promoted primary: applies each record the
/// primary's journal gets, in order, each file atomically, until `stop` says so (checked at
/// least every 25 s and between batches) or the stream is handed back to this host (`kura
/// shadow demote`): then this host holds the last record of the promoted epoch and pushes at
/// the new one. A lost connection is retried with backoff; a record pruned before this host
/// got it resyncs the whole tree (only differing files are fetched).
pub fn follow(link: &Link, source: &Path, state_dir: &Path, stop: &dyn Fn() -> bool) -> Result<Followed, ShadowError> {
    let st = link.status()?;
    let key = id_key(&st)?;
    let state_path = PushState::path(state_dir, &st.id_key);
    let mut state = match PushState::load(&state_path)? {
        Some(s) if s.rejoined && s.followed > 0 => s,
        _ => return Err(ShadowError::Usage(format!("this host is not a copy of stream {}: `kura shadow rejoin` makes it one first", st.stream))),
    };
    let remote = Remote { link, key, fetched: AtomicU64::new(0) };
    let mut out = Followed { head: state.followed, ..Followed::default() };
    let mut tree = link.manifest_at(state.followed)?;
    let mut backoff = Duration::from_millis(200);
    while !stop() {
        let Some(t) = tree.as_mut() else {
            // The standby pruned what this host needed next: the newest tree, whole.
            let st = link.status()?;
            let at = st.durable.max(st.promoted_seq);
            let m = link.manifest_at(at)?.ok_or_else(|| ShadowError::Remote(format!("stream {}: the standby has no tree for record {at}", st.stream)))?;
            tracing::warn!(stream = %st.stream, "record {} is no longer in the primary's journal: resyncing the whole tree at record {at}", state.followed + 1);
            apply::reconcile_verified(source, &m, &remote, None)?;
            state.followed = at;
            state.save(&state_path)?;
            out.resyncs += 1;
            tree = Some(m);
            continue;
        };
        let r = match link.records(state.followed, Duration::from_secs(25)) {
            Ok(Some(r)) => r,
            Ok(None) => {
                tree = None;
                continue;
            }
            Err(e @ ShadowError::Remote(_)) => {
                tracing::warn!("following the primary: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff = Duration::from_millis(200);
        let mut w = apply::Writer::new(source);
        for rec in &r.records {
            w.apply(&rec.op, &remote)?;
            t.apply(&rec.op);
        }
        apply::set_dir_times(source, apply::touched_dirs(t, r.records.iter().map(|r| &r.op)).into_iter());
        if let Some(last) = r.records.last() {
            state.followed = last.seq;
            state.save(&state_path)?;
            out.records += r.records.len() as u64;
            out.head = last.seq;
            tracing::debug!(head = last.seq, "following the primary: applied {} records", r.records.len());
        }
        if !r.primary && r.demoted_seq > 0 && r.epoch > state.epoch && state.followed >= r.demoted_seq {
            if r.head > r.demoted_seq {
                return Err(ShadowError::Fenced(format!(
                    "stream {} was handed back at epoch {} and another host already pushes to it: this host stays a copy of record {}",
                    st.stream, r.epoch, state.followed
                )));
            }
            state.epoch = r.epoch;
            state.rejoined = false;
            state.save(&state_path)?;
            out.handed_back = Some(r.epoch);
            break;
        }
        if r.primary && r.epoch > state.epoch {
            // Handed back and promoted again while this host was away: the same journal.
            state.epoch = r.epoch;
            state.save(&state_path)?;
        }
    }
    out.fetched_bytes = remote.fetched.load(Ordering::Relaxed);
    Ok(out)
}
