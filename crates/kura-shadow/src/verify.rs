//! Verification by content: the primary's tree hashed and compared with the standby's, and the
//! standby's mirror hashed and compared with its journal. Size and mtime can agree while the
//! bytes differ (bit rot, a restore behind kura's back, a standby away past the window); only
//! the chunk ids say. `--repair` sends or rewrites exactly what differs.

use crate::capture::{Capture, Pending};
use crate::push::{Link, Sent, Session};
use crate::{Manifest, ShadowError, path};
use std::path::Path;

/// What a verification found (one side).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Verified {
    /// Entries compared.
    pub entries: u64,
    /// Entries that differ.
    pub drifted: u64,
    /// The first of them (at most 100).
    pub drift: Vec<String>,
    /// Whether they were repaired.
    pub repaired: bool,
    /// The record the comparison was made at.
    pub record: u64,
}

impl Verified {
    pub(crate) fn new(entries: usize, drift: &[Vec<u8>], record: u64) -> Verified {
        Verified { entries: entries as u64, drifted: drift.len() as u64, drift: drift.iter().take(100).map(|p| path::show(p)).collect(), repaired: false, record }
    }
}

/// Hashes every file under `root` with the stream's key and chunker; chunks of `known` are not
/// kept (only drifted content is held in memory).
pub(crate) fn hash_tree(root: &Path, id_key: [u8; 32], seed: u64, known: &Manifest) -> Result<Manifest, ShadowError> {
    let mut h = Capture::new(root, Manifest::default(), id_key, seed);
    h.know(known.chunk_ids());
    // Databases are hashed through SQLite (`sqlite_stream::hash_mirror_dbs`), never opened as files.
    h.skip(known.iter().filter(|(_, n)| crate::sqlite_stream::page_size_of(n).is_some()).flat_map(|(k, _)| std::iter::once(k.clone()).chain(crate::sqlite_stream::side_names(k))));
    let mut scratch = Pending::default();
    h.full_scan(&mut scratch)?;
    Ok(h.state().clone())
}

/// On the primary: hashes `source` and compares it with the standby's tree; with `repair`,
/// sends what differs (files whose bytes differ under the same size and mtime included).
pub fn verify_primary(link: &Link, source: &Path, state_dir: &Path, repair: bool) -> Result<(Verified, Sent), ShadowError> {
    let st = link.status()?;
    let mut s = Session::start(link, source, Some(state_dir))?;
    let theirs = s.cap.state().clone();
    let mine = hash_tree(source, crate::push::id_key(&st)?, st.chunker_seed, &theirs)?;
    let drift = mine.differences(&theirs);
    let mut v = Verified::new(mine.len().max(theirs.len()), &drift, s.out.next - 1);
    let mut sent = Sent { head: s.out.next - 1, ..Sent::default() };
    if repair && !drift.is_empty() {
        for p in &drift {
            s.cap.forget_file(p);
        }
        s.full_sync(link, &mut sent)?;
        v.repaired = true;
    }
    Ok((v, sent))
}
