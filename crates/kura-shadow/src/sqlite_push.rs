//! `kura shadow push --sqlite DB`: the primary's loop for a live SQLite database. Attaches to
//! it ([`crate::sqlite_source`]), sends the pages that differ from the standby's copy, then
//! every commit as one record (its pages as chunks; only chunks the standby lacks cross the
//! wire), running the database's checkpoints itself. Any failure ends in a re-attach and a
//! fresh comparison with the standby's copy: the database itself is the spool, so nothing a
//! restart of either side loses is ever missing from the standby for longer than a reconnect.

use crate::capture::Pending;
use crate::push::{Link, Outbox, Sent, Target, checked_epoch, id_key};
use crate::verify::Verified;
use crate::record::{ChunkMeta, Op};
use crate::sqlite_source::{OwnedCommit, Source, SourceError};
use crate::sqlite_stream::page_size_of;
use crate::{Manifest, ShadowError};
use kura_repo::Id;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// Pages in one record of a base (its references take 36 bytes each; a batch is at most 64 MiB).
const BASE_PAGES: usize = 1 << 16;
/// Bytes of page images read for one record of a base.
const BASE_BYTES: usize = 64 << 20;
/// The frame of a base's records before its last: not a position of the primary's log.
pub const PARTIAL: u32 = u32::MAX;
/// Checkpoints run at least this often while the application writes.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// The database is polled this often while commits arrive...
const POLL_BUSY: Duration = Duration::from_millis(1);
/// ...and this often once nothing came for [`BUSY_FOR`].
const POLL_IDLE: Duration = Duration::from_millis(10);
const BUSY_FOR: Duration = Duration::from_millis(200);
/// Appends are at least this far apart under load (`kura shadow push --interval`): commits
/// read meanwhile travel together (one request and one journal write for several), which costs
/// at most this much lag. Measured at 1,000 commits/s (bench/sqlite-shadow.sh, after the
/// standby's appends ran in place): 4 ms gave lag p99 5.5 ms for 250 appends a second, 5 ms
/// 7.0 ms for 200, 6 ms 7.9 ms, 8 ms 10.1 ms for 125 (half the standby's system calls of 4 ms).
pub const APPEND_EVERY: Duration = Duration::from_millis(5);
/// With nothing to send, the standby hears from the primary this often.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// The page ranges a base of `db_pages` pages is read and sent in: at most [`BASE_BYTES`] of
/// images and `cap` pages each; always one at least (empty, 1..=0, for a database of none).
fn parts(db_pages: u32, page_size: u32, cap: usize) -> impl Iterator<Item = (u32, u32)> {
    let per = (BASE_BYTES / page_size.max(1) as usize).clamp(1, cap.max(1)) as u64;
    let n = u64::from(db_pages).div_ceil(per).max(1);
    (0..n).map(move |k| ((k * per + 1) as u32, ((k + 1) * per).min(u64::from(db_pages)) as u32))
}

/// Reads pages `a..=b` of a base.
type Reader<'a> = &'a mut dyn FnMut(u32, u32) -> Result<Vec<(u32, Vec<u8>)>, ShadowError>;
/// Sends what is pending.
type Sender<'a> = &'a mut dyn FnMut(&mut Pending) -> Result<(), ShadowError>;

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
    /// Pages per record of a base ([`BASE_PAGES`]).
    base_pages: usize,
}

impl Copy {
    /// Adds the record of one commit to `p`: the pages that differ from the standby's copy
    /// (all pages past its size), with the chunks it lacks.
    fn commit(&mut self, c: &OwnedCommit, p: &mut Pending) {
        self.pages(&c.pages, c.db_pages, c, p);
    }

    /// A base: records of at most [`BASE_PAGES`] pages and [`BASE_BYTES`] of images each,
    /// read from the database and handed to `send` one by one (a database of any size costs
    /// the primary one record's memory), the database growing record by record, cut to its
    /// size by the last. The records in between are not states of the database and do not
    /// restore; those that change nothing are left out, but for the last. `at` is the base's
    /// size and position (its pages empty); `read(a, b)` reads pages a..=b.
    fn base(&mut self, at: &OwnedCommit, read: Reader<'_>, p: &mut Pending, send: Sender<'_>) -> Result<(), ShadowError> {
        // The parts before the last are at no position of the primary's log (frame u32::MAX):
        // `wait --sqlite` must not take one for the base.
        let partial = OwnedCommit { frame: PARTIAL, ..at.clone() };
        for (from, to) in parts(at.db_pages, self.page_size, self.base_pages) {
            let part = if from <= to { read(from, to)? } else { Vec::new() };
            let last = to >= at.db_pages;
            if last {
                self.pages(&part, at.db_pages, at, p);
            } else {
                self.pages(&part, to.max(self.ids.len() as u32), &partial, p);
            }
            // The last always goes: it carries the base's log position, and it ends whatever
            // parts an earlier attachment sent before it was cut off (the standby waits for it).
            let empty = p.ops.last().is_some_and(|o| matches!(o, Op::Pages { pages, .. } if pages.is_empty()));
            if empty && !last {
                p.ops.pop();
                p.marks.pop();
            }
            if !p.is_empty() {
                send(p)?;
            }
        }
        Ok(())
    }

    /// One record: `written` (those that differ) in a database of `db_pages` pages, at the
    /// position of `at`.
    fn pages(&mut self, written: &[(u32, Vec<u8>)], db_pages: u32, at: &OwnedCommit, p: &mut Pending) {
        if db_pages == 0 {
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
        for (pgno, img) in written {
            if *pgno <= db_pages {
                carried.insert(*pgno);
                add(*pgno, img, &mut self.known, &self.ids, p);
            }
        }
        // A commit may grow the database past the pages it wrote: those are zeros, and the
        // standby takes no page it is not given.
        for pgno in self.ids.len() as u32 + 1..=db_pages {
            if !carried.contains(&pgno) {
                add(pgno, &self.zero, &mut self.known, &self.ids, p);
            }
        }
        crate::sqlite_stream::patch_ids(&mut self.ids, db_pages, &pages);
        p.ops.push(Op::Pages { path: self.name.clone(), page_size: self.page_size, db_pages, pages, change: at.change, salt: at.salt, frame: at.frame });
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
    session(link, db, name, state_dir, APPEND_EVERY, &mut total, &|| true)?;
    Ok(total)
}

/// Follows the database at `db` and sends its commits to `target` as entry `name` until
/// `stop` says so or an unrecoverable error; reconnects with backoff after anything else.
pub fn follow(target: &dyn Target, db: &Path, name: &[u8], state_dir: Option<&Path>, every: Duration, stop: &dyn Fn() -> bool) -> Result<Sent, ShadowError> {
    let mut backoff = Duration::from_millis(200);
    let mut total = Sent::default();
    while !stop() {
        // A database missing for a moment (moved away, about to be replaced) is waited for.
        match session(target, db, name, state_dir, every, &mut total, stop) {
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
fn session(link: &dyn Target, db: &Path, name: &[u8], state_dir: Option<&Path>, every: Duration, total: &mut Sent, stop: &dyn Fn() -> bool) -> Result<(), ShadowError> {
    let st = link.status()?;
    let key = id_key(&st)?;
    let epoch = match state_dir {
        Some(d) => checked_epoch(&st, d)?,
        None => st.epoch,
    };
    let theirs: Manifest = link.manifest()?;
    let (mut src, base) = Source::attach(db).map_err(source_err)?;
    let page_size = base.page_size as u32;
    let ids: Vec<Id> = theirs.get(name).filter(|n| page_size_of(n) == Some(page_size)).map(|n| n.content.clone()).unwrap_or_default();
    // A stream shadows one database or a directory, never both: the directory's pusher would
    // delete the database's entry and the two would resend each other's changes for ever.
    if let Some((other, _)) = theirs.iter().find(|(k, n)| k.as_slice() != name || page_size_of(n).is_none()) {
        return Err(ShadowError::Usage(format!(
            "stream {} holds {} besides the database {}: a SQLite database needs a stream of its own",
            st.stream,
            crate::path::show(other),
            crate::path::show(name)
        )));
    }
    let mut copy = Copy { key, name: name.to_vec(), page_size, known: ids.iter().copied().collect(), ids, zero: vec![0; page_size as usize], base_pages: BASE_PAGES };
    let mut out = Outbox::new(st.head + 1, epoch);
    total.head = st.head;
    let mut p = Pending::default();
    let at = OwnedCommit { pages: Vec::new(), db_pages: base.db_pages, change: base.change, salt: base.salt, frame: base.frame };
    copy.base(&at, &mut |a, b| src.base_pages(&base, a..=b).map_err(source_err), &mut p, &mut |p| out.flush(link, p, total))?;
    drop(base);
    tracing::info!(head = total.head, "shadow push {}: the standby's copy is the database's", db.display());
    let (mut last_ckpt, mut last_contact, mut last_commit) = (Instant::now(), Instant::now(), Instant::now());
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
            copy.commit(c, &mut p);
        }
        let wait = every.saturating_sub(last_append.elapsed());
        if !wait.is_zero() && p.data.len() < crate::capture::FLUSH_DATA {
            std::thread::sleep(wait);
            for c in src.poll().map_err(source_err)? {
                copy.commit(&c, &mut p);
            }
        }
        last_append = Instant::now();
        out.flush(link, &mut p, total)?;
        last_contact = Instant::now();
    }
    Ok(())
}

/// How far back from the standby's head the record of a verified commit is looked for.
const VERIFY_LOOKBACK: u64 = 1_000;

/// On the primary: the database's pages as of one commit, hashed, compared with the standby's
/// entry as of its record of that same commit (found once the standby has applied it, within
/// `timeout`), so a database written meanwhile is compared at one moment on both sides. With
/// `repair`, an attachment then sends what differs from the standby's newest tree.
pub fn verify_sqlite(link: &Link, db: &Path, name: &[u8], state_dir: &Path, repair: bool, timeout: Duration) -> Result<(Verified, Sent), ShadowError> {
    let st = link.status()?;
    let key = id_key(&st)?;
    let (src, base) = Source::attach(db).map_err(source_err)?;
    let mut mine: Vec<Id> = Vec::with_capacity(base.db_pages as usize);
    for (from, to) in parts(base.db_pages, base.page_size as u32, BASE_PAGES) {
        mine.extend(src.base_pages(&base, from..=to).map_err(source_err)?.iter().map(|(_, img)| Id(*blake3::keyed_hash(&key, img).as_bytes())));
    }
    let (change, salt, frame, page_size) = (base.change, base.salt, base.frame, base.page_size as u32);
    // The read transaction ends here: the application's checkpoints go on.
    drop((src, base));
    let same = |op: &Op| !op.is_base_part() && matches!(op, Op::Pages { path, change: c, salt: s, frame: f, .. } if path.as_slice() == name && if frame == 0 { *c == change } else { *s == salt && *f == frame });
    let deadline = Instant::now() + timeout;
    let head = loop {
        let now = link.status()?;
        if now.sqlite_position.is_some_and(|p| p.holds(change, salt, frame)) {
            break now.head;
        }
        if Instant::now() >= deadline {
            return Err(ShadowError::Remote(format!("the standby did not apply the database's commit at log frame {frame} within {timeout:?}: is its pusher running?")));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut after, mut at) = (st.head.min(head).saturating_sub(VERIFY_LOOKBACK), None);
    while after < head {
        let Some(r) = link.records(after, Duration::ZERO)? else {
            return Err(ShadowError::Remote(format!("record {after} is no longer in the standby's journal")));
        };
        let Some(last) = r.records.last().map(|r| r.seq) else { break };
        at = r.records.iter().filter(|r| r.seq <= head && same(&r.op)).map(|r| r.seq).next_back().or(at);
        after = last;
    }
    let at = at.ok_or_else(|| ShadowError::Remote(format!("the standby has no record of the database's commit at log frame {frame} among its newest {VERIFY_LOOKBACK}")))?;
    let theirs = link.manifest_at(at)?.ok_or_else(|| ShadowError::Remote(format!("the standby has no tree for record {at}")))?;
    let ids: &[Id] = theirs.get(name).filter(|n| page_size_of(n) == Some(page_size)).map(|n| n.content.as_slice()).unwrap_or_default();
    let drift: Vec<Vec<u8>> = (0..mine.len().max(ids.len())).filter(|i| mine.get(*i) != ids.get(*i)).map(|i| [name, format!(" page {}", i + 1).as_bytes()].concat()).collect();
    let mut v = Verified::new(mine.len().max(ids.len()), &drift, at);
    let mut sent = Sent { head, ..Sent::default() };
    if repair && !drift.is_empty() {
        sent = sync_once(link, db, name, Some(state_dir))?;
        v.repaired = true;
    }
    Ok((v, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(pages: u32, seed: u8) -> OwnedCommit {
        OwnedCommit { pages: (1..=pages).map(|p| (p, vec![seed.wrapping_add(p as u8); 512])).collect(), db_pages: pages, change: 1, salt: [1, 2], frame: 0 }
    }

    /// A base cut into records of 3 pages, read 3 pages at a time and sent record by record:
    /// each record passes the standby's checks, and the last leaves the standby's entry equal
    /// to the database, growing or shrinking. Parts that change nothing are left out, but for
    /// the last: a base the standby already is sends one empty record.
    #[test]
    fn a_large_base_goes_in_records_the_standby_accepts_and_ends_equal() {
        let key = [5u8; 32];
        let mut tree = Manifest::default();
        let mut copy = Copy { key, name: b"app.db".to_vec(), page_size: 512, ids: Vec::new(), known: HashSet::new(), zero: vec![0; 512], base_pages: 3 };
        for (pages, seed, want_records) in [(10u32, 1u8, 4usize), (10, 1, 1), (10, 2, 4), (4, 3, 2), (11, 3, 3), (11, 3, 1)] {
            let mut base = db(pages, seed);
            if seed == 3 && pages == 11 {
                // Only pages 10 and 11 differ from the copy of 4 pages' growth: the parts of
                // pages 1-3 and 4-6 carry their new pages (5, 6 past the old size), 7-9 too.
                base.pages[9].1[0] ^= 1;
            }
            let at = OwnedCommit { pages: Vec::new(), ..base.clone() };
            let (mut ops, mut reads) = (Vec::new(), Vec::new());
            let mut p = Pending::default();
            copy.base(
                &at,
                &mut |a, b| {
                    reads.push((a, b));
                    Ok(base.pages[a as usize - 1..b as usize].to_vec())
                },
                &mut p,
                &mut |p: &mut Pending| {
                    ops.append(&mut p.ops);
                    *p = Pending::default();
                    Ok(())
                },
            )
            .unwrap();
            assert!(reads.iter().all(|(a, b)| b - a < 3), "{reads:?}");
            assert_eq!(ops.len(), want_records, "{pages} pages, seed {seed}: {ops:?}");
            let records: Vec<crate::Record> = ops.into_iter().enumerate().map(|(i, op)| crate::Record { seq: i as u64 + 1, at_ns: 0, op }).collect();
            crate::sqlite_stream::check_records(&tree, &records, 0, &|_| Some(512)).unwrap();
            // Only the last record is at the base's position.
            let frames: Vec<u32> = records.iter().map(|r| match r.op { Op::Pages { frame, .. } => frame, _ => 1 }).collect();
            assert!(frames.last().is_some_and(|f| *f == 0) && frames[..frames.len() - 1].iter().all(|f| *f == PARTIAL), "{frames:?}");
            for r in &records {
                tree.apply(&r.op);
            }
            let want: Vec<Id> = base.pages.iter().map(|(_, b)| Id(*blake3::keyed_hash(&key, b).as_bytes())).collect();
            assert_eq!(tree.get(b"app.db").unwrap().content, want, "{pages} pages, seed {seed}");
            assert_eq!(copy.ids, want);
        }
    }
}
