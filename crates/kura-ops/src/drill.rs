//! Restore drills: restore a random sample of files (or a whole snapshot) of a random snapshot
//! into a scratch directory, re-read what landed on disk and check it against the chunk ids
//! recorded at backup time, time it, and keep the facts as a drill record in the repository.

use crate::error::OpsError;
use crate::restore::{RestoreOptions, restore};
use crate::walk::for_each_node;
use kura_repo::drill::DrillRecord;
use kura_repo::tree::{Node, NodeKind};
use kura_repo::{Id, Repository};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a drill restores.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The snapshot; `None` picks one at random.
    pub snapshot: Option<Id>,
    /// Files to sample; 0 restores the whole snapshot.
    pub files: usize,
    /// Where the scratch directory is made (and removed afterwards).
    pub scratch: PathBuf,
}

/// A drill's record and, for the operator, the files that failed with why (the record keeps
/// no file names).
#[derive(Debug)]
pub struct DrillOutcome {
    /// The facts, as stored.
    pub record: DrillRecord,
    /// Failed files: path in the snapshot, reason.
    pub failures: Vec<(String, String)>,
}

fn random_below(n: usize) -> usize {
    let mut b = [0u8; 8];
    // A drill without randomness still drills: the first candidates.
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) % n.max(1) as u64) as usize
}

/// Up to `k` distinct random elements of `v` (a partial Fisher-Yates shuffle).
fn sample<T>(mut v: Vec<T>, k: usize) -> Vec<T> {
    let k = k.min(v.len());
    for i in 0..k {
        let j = i + random_below(v.len() - i);
        v.swap(i, j);
    }
    v.truncate(k);
    v
}

/// Re-reads a restored file and checks its length and chunk ids against the tree's node. The
/// bytes are split at the recorded chunks' lengths, not cut again: how a file was cut depends
/// on more than its size and content (standard input, a file that grew while it was read, a
/// snapshot from before SQLite files were cut at pages), and cutting it again would fail the
/// drill of a perfectly restorable file.
fn check_file(repo: &Repository, path: &Path, node: &Node) -> Result<u64, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open the restored file: {e}"))?;
    let mut r = std::io::BufReader::new(f);
    let mut buf = Vec::new();
    let mut len = 0u64;
    for (i, id) in node.content.iter().enumerate() {
        let raw = repo.index().get(id).map(|(_, loc)| loc.raw_length).ok_or_else(|| format!("chunk {} ({}) is in no indexed pack", i + 1, id.short()))?;
        buf.resize(raw as usize, 0);
        r.read_exact(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => format!("the restored file ends inside chunk {} of {}; the snapshot recorded {} bytes", i + 1, node.content.len(), node.size),
            _ => format!("cannot read the restored file: {e}"),
        })?;
        if repo.key().blob_id(&buf) != *id {
            return Err(format!("restored content of chunk {} of {} does not match the chunk id recorded at backup time", i + 1, node.content.len()));
        }
        len += u64::from(raw);
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(|e| format!("cannot read the restored file: {e}"))? > 0 || len != node.size {
        return Err(format!("the restored file is longer than its chunks, or they add up to {len} bytes and the snapshot recorded {}", node.size));
    }
    Ok(len)
}

/// Runs a drill and stores its record (also when it failed). `Err` only for a drill that could
/// not run at all (no snapshot, the scratch directory cannot be made).
pub fn drill(repo: &Repository, opts: &DrillOptions) -> Result<DrillOutcome, OpsError> {
    let started_at = jiff::Timestamp::now();
    let started = Instant::now();
    let id = match opts.snapshot {
        Some(id) => id,
        None => {
            let snaps: Vec<Id> = repo.snapshots()?.into_iter().filter(|(_, s)| s.is_ok()).map(|(id, _)| id).collect();
            if snaps.is_empty() {
                return Err(OpsError::Invalid("the repository has no readable snapshot to drill".into()));
            }
            snaps[random_below(snaps.len())]
        }
    };
    let snap = repo.read_snapshot(&id)?;
    let mut files: Vec<(String, Node)> = Vec::new();
    for_each_node(repo, &snap.body.tree, "", &mut |p, n| {
        // A name that is not UTF-8 cannot be named to restore as an include.
        if n.kind == NodeKind::File && !p.contains('\u{FFFD}') {
            files.push((p.to_string(), n.clone()));
        }
        Ok(())
    })?;
    let full = opts.files == 0;
    let chosen = if full { files } else { sample(files, opts.files) };
    std::fs::create_dir_all(&opts.scratch).map_err(|e| OpsError::io("cannot create the scratch directory", &opts.scratch, e))?;
    let dir = tempfile::Builder::new()
        .prefix("kura-drill-")
        .tempdir_in(&opts.scratch)
        .map_err(|e| OpsError::io("cannot create a directory in", &opts.scratch, e))?;
    let target = dir.path().join("restore");
    let ropts = RestoreOptions {
        target: target.clone(),
        include: if full { Vec::new() } else { chosen.iter().map(|(p, _)| p.clone()).collect() },
        overwrite: false,
    };
    let mut failures = Vec::new();
    let mut error = None;
    let mut bytes = 0;
    let restored = if chosen.is_empty() { Ok(()) } else { restore(repo, &snap.body.tree, &ropts, &crate::NoProgress, None).map(|_| ()) };
    match restored {
        Err(e) => {
            error = Some(format!("restore failed: {e}"));
            failures = chosen.iter().map(|(p, _)| (p.clone(), "not restored".to_string())).collect();
        }
        Ok(()) => {
            for (p, n) in &chosen {
                match check_file(repo, &target.join(p.trim_start_matches('/')), n) {
                    Ok(len) => bytes += len,
                    Err(why) => {
                        error.get_or_insert_with(|| why.clone());
                        failures.push((p.clone(), why));
                    }
                }
            }
        }
    }
    if chosen.is_empty() && error.is_none() {
        // Nothing checked proves nothing: it must not count as a passed drill.
        error = Some("the snapshot has no regular file to restore".into());
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(dir);
    let record = DrillRecord {
        version: 1,
        time: started_at.to_string(),
        by_host: kura_repo::repo::hostname(),
        snapshot: id.to_hex(),
        snapshot_time: snap.public.time.clone(),
        host: snap.public.host.clone(),
        paths: snap.public.paths.clone(),
        mode: if full { "full" } else { "sample" }.into(),
        files: chosen.len() as u64,
        failed: failures.len() as u64,
        bytes,
        seconds,
        ok: failures.is_empty() && error.is_none(),
        error,
    };
    record.save(repo.store().as_ref())?;
    Ok(DrillOutcome { record, failures })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file stored in chunks the chunker would not cut (as standard input or an older
    /// snapshot may have it) passes; a flipped byte, a missing or an extra byte fail.
    #[test]
    fn restored_files_are_checked_at_their_recorded_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(kura_store::LocalStore::create(&tmp.path().join("repo")).unwrap());
        let repo = Repository::init(store, b"pw", kura_repo::KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 }).unwrap();
        repo.load_index().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut content = Vec::new();
        for part in [&data[..1000], &data[1000..1001], &data[1001..]] {
            content.push(repo.save_blob(kura_repo::BlobKind::Data, part).unwrap().0);
        }
        repo.flush().unwrap();
        let node = Node { size: data.len() as u64, content, ..Node::new(b"f".to_vec(), NodeKind::File) };
        let f = tmp.path().join("f");
        std::fs::write(&f, &data).unwrap();
        assert_eq!(check_file(&repo, &f, &node), Ok(20_000));
        let mut bad = data.clone();
        bad[5000] ^= 1;
        std::fs::write(&f, &bad).unwrap();
        assert!(check_file(&repo, &f, &node).unwrap_err().contains("chunk 3 of 3"));
        std::fs::write(&f, &data[..19_999]).unwrap();
        assert!(check_file(&repo, &f, &node).unwrap_err().contains("ends inside chunk 3"));
        let mut long = data.clone();
        long.push(0);
        std::fs::write(&f, &long).unwrap();
        assert!(check_file(&repo, &f, &node).unwrap_err().contains("longer"));
    }

    #[test]
    fn a_sample_is_distinct_and_no_larger_than_asked() {
        for _ in 0..50 {
            let s = sample((0..20).collect::<Vec<u32>>(), 7);
            let mut d = s.clone();
            d.sort();
            d.dedup();
            assert_eq!((s.len(), d.len()), (7, 7));
        }
        assert_eq!(sample(vec![1, 2], 5).len(), 2);
    }
}
