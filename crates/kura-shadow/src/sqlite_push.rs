//! `kura shadow push --sqlite DB`: the primary's loop for a live SQLite database. Attaches to
//! it ([`crate::sqlite_source`]), sends the pages that differ from the standby's copy, then
//! every commit as one record (its pages as chunks; only chunks the standby lacks cross the
//! wire), running the database's checkpoints itself. Any failure ends in a re-attach and a
//! fresh comparison with the standby's copy: the database itself is the spool, so nothing a
//! restart of either side loses is ever missing from the standby for longer than a reconnect.

use crate::capture::Pending;
use crate::push::{Outbox, Sent, Target, checked_epoch, id_key};
use crate::record::{ChunkMeta, Op};
use crate::sqlite_source::{OwnedCommit, Source, SourceError};
use crate::sqlite_stream::page_size_of;
use crate::{Manifest, ShadowError};
use kura_repo::Id;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// Checkpoints run at least this often while the application writes.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// The database is polled this often while commits arrive...
const POLL_BUSY: Duration = Duration::from_millis(1);
/// ...and this often once nothing came for [`BUSY_FOR`].
const POLL_IDLE: Duration = Duration::from_millis(10);
const BUSY_FOR: Duration = Duration::from_millis(200);
/// Appends are at least this far apart under load: commits read meanwhile travel together
/// (one request and one journal write for several), which costs at most this much lag.
/// Measured at 1,000 commits/s (bench/sqlite-shadow.sh): 1 ms gave lag p99 2.6 ms for 14% of a
/// core on the pusher and 32% on the standby, 4 ms p99 5.4 ms for 5.5% and 9%.
const APPEND_EVERY: Duration = Duration::from_millis(4);
/// With nothing to send, the standby hears from the primary this often.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// What the primary knows of the standby's copy while it sends.
struct Copy {
    key: [u8; 32],
    /// The entry's path in the stream.
    name: Vec<u8>,
    page_size: u32,
    /// The standby's page ids once everything sent is applied.
    ids: Vec<Id>,
    /// Chunks the standby holds or was sent (bounded: reset to `ids` now and then).
    known: HashSet<Id>,
    zero: Vec<u8>,
}

impl Copy {
    /// Adds the record of one commit to `p`: the pages that differ from the standby's copy
    /// (all pages past its size), with the chunks it lacks.
    fn commit(&mut self, c: &OwnedCommit, change: u32, p: &mut Pending) {
        if c.db_pages == 0 {
            return;
        }
        if self.known.len() > 4 * self.ids.len() + 65_536 {
            self.known = self.ids.iter().copied().collect();
        }
        let mut pages = Vec::new();
        let mut add = |pgno: u32, img: &[u8], known: &mut HashSet<Id>, ids: &[Id], p: &mut Pending| {
            let id = Id(*blake3::keyed_hash(&self.key, img).as_bytes());
            if ids.get(pgno as usize - 1) == Some(&id) {
                return;
            }
            if known.insert(id) {
                p.chunks.push(ChunkMeta { id, raw_len: img.len() as u32, zlen: 0 });
                p.data.extend_from_slice(img);
            }
            pages.push((pgno, id));
        };
        let mut carried = HashSet::new();
        for (pgno, img) in &c.pages {
            if *pgno <= c.db_pages {
                carried.insert(*pgno);
                add(*pgno, img, &mut self.known, &self.ids, p);
            }
        }
        // A commit may grow the database past the pages it wrote: those are zeros, and the
        // standby takes no page it is not given.
        for pgno in self.ids.len() as u32 + 1..=c.db_pages {
            if !carried.contains(&pgno) {
                add(pgno, &self.zero, &mut self.known, &self.ids, p);
            }
        }
        crate::sqlite_stream::patch_ids(&mut self.ids, c.db_pages, &pages);
        p.ops.push(Op::Pages { path: self.name.clone(), page_size: self.page_size, db_pages: c.db_pages, pages, change });
        p.marks.push(p.chunks.len());
    }
}

/// Whether an error ends pushing for good (the others end in a reconnect).
fn fatal(e: &ShadowError) -> bool {
    matches!(e, ShadowError::Fenced(_) | ShadowError::Usage(_) | ShadowError::Denied(_))
}

fn source_err(e: SourceError) -> ShadowError {
    match e {
        SourceError::Unsupported { .. } => ShadowError::Usage(e.to_string()),
        SourceError::Io { path, source } => ShadowError::Io { path: path.display().to_string(), source },
        // A lost continuity, a database busy or replaced: attach again.
        e => ShadowError::Remote(e.to_string()),
    }
}

/// Brings the standby's copy of the database at `db` (entry `name`) up to date once.
pub fn sync_once(link: &dyn Target, db: &Path, name: &[u8], state_dir: Option<&Path>) -> Result<Sent, ShadowError> {
    let mut total = Sent::default();
    session(link, db, name, state_dir, &mut total, &|| true)?;
    Ok(total)
}

/// Follows the database at `db` and sends its commits to `target` as entry `name` until
/// `stop` says so or an unrecoverable error; reconnects with backoff after anything else.
pub fn follow(target: &dyn Target, db: &Path, name: &[u8], state_dir: Option<&Path>, stop: &dyn Fn() -> bool) -> Result<Sent, ShadowError> {
    let mut backoff = Duration::from_millis(200);
    let mut total = Sent::default();
    while !stop() {
        // A database missing for a moment (moved away, about to be replaced) is waited for.
        match session(target, db, name, state_dir, &mut total, stop) {
            Err(e) if fatal(&e) => return Err(e),
            Err(e) => {
                tracing::warn!("shadow push {}: {e}; attaching again in {backoff:?}", db.display());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Ok(()) => backoff = Duration::from_millis(200),
        }
    }
    Ok(total)
}

/// One attachment: the standby's copy compared and brought up to date, then every commit.
fn session(link: &dyn Target, db: &Path, name: &[u8], state_dir: Option<&Path>, total: &mut Sent, stop: &dyn Fn() -> bool) -> Result<(), ShadowError> {
    let st = link.status()?;
    let key = id_key(&st)?;
    let epoch = match state_dir {
        Some(d) => checked_epoch(&st, d)?,
        None => st.epoch,
    };
    let theirs: Manifest = link.manifest()?;
    let (mut src, base) = Source::attach(db).map_err(source_err)?;
    let page_size = base.pages.first().map(|(_, b)| b.len() as u32).unwrap_or(4096);
    let ids: Vec<Id> = theirs.get(name).filter(|n| page_size_of(n) == Some(page_size)).map(|n| n.content.clone()).unwrap_or_default();
    if let Some(n) = theirs.get(name)
        && page_size_of(n).is_none()
    {
        return Err(ShadowError::Usage(format!("the stream's entry {} is not a SQLite database (is the stream a directory's?)", crate::path::show(name))));
    }
    let mut copy = Copy { key, name: name.to_vec(), page_size, known: ids.iter().copied().collect(), ids, zero: vec![0; page_size as usize] };
    let mut out = Outbox::new(st.head + 1, epoch);
    total.head = st.head;
    let mut p = Pending::default();
    let same_size = copy.ids.len() == base.db_pages as usize;
    copy.commit(&base, base.change, &mut p);
    // A base that changes nothing is not sent: the standby already is this commit.
    if matches!(p.ops.last(), Some(Op::Pages { pages, .. }) if pages.is_empty()) && same_size {
        p = Pending::default();
    }
    if !p.is_empty() {
        out.flush(link, &mut p, total)?;
    }
    tracing::info!(head = total.head, "shadow push {}: the standby's copy is the database's", db.display());
    let (mut last_ckpt, mut last_contact, mut last_commit) = (Instant::now(), Instant::now(), Instant::now());
    let every = APPEND_EVERY;
    let mut last_append = Instant::now() - every;
    while !stop() {
        if last_contact.elapsed() >= HEARTBEAT {
            let st = link.status()?;
            if st.epoch != out.epoch || (state_dir.is_some() && st.role == "primary") {
                return Err(ShadowError::Fenced(format!(
                    "stream {} was promoted on the standby (epoch {}, this host pushes at {}): this host is fenced",
                    st.stream, st.epoch, out.epoch
                )));
            }
            last_contact = Instant::now();
        }
        let commits = if last_ckpt.elapsed() >= CHECKPOINT_EVERY {
            last_ckpt = Instant::now();
            src.checkpoint().map_err(source_err)?.unwrap_or_default()
        } else {
            src.poll().map_err(source_err)?
        };
        if commits.is_empty() {
            std::thread::sleep(if last_commit.elapsed() < BUSY_FOR { POLL_BUSY } else { POLL_IDLE });
            continue;
        }
        last_commit = Instant::now();
        for c in &commits {
            copy.commit(c, c.change, &mut p);
        }
        let wait = every.saturating_sub(last_append.elapsed());
        if !wait.is_zero() && p.data.len() < crate::capture::FLUSH_DATA {
            std::thread::sleep(wait);
            for c in src.poll().map_err(source_err)? {
                copy.commit(&c, c.change, &mut p);
            }
        }
        last_append = Instant::now();
        out.flush(link, &mut p, total)?;
        last_contact = Instant::now();
    }
    Ok(())
}
