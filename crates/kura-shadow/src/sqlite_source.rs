//! The primary's side of a SQLite shadow: the whole, checked commits of a live database that
//! another program writes, read from its write-ahead log while a held read transaction keeps
//! SQLite from overwriting frames not yet read, with checkpoints run here under a brief writer
//! fence (docs/design/sqlite-shadow.md §2). Nothing is ever written to the user's database.

use crate::sqlite_wal::{self, FRAME_HEADER_LEN, HEADER_LEN, SHM_HEADER_LEN, ShmHeader, WalHeader};
use rusqlite::Connection;
use rusqlite::config::DbConfig;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the database's commits could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file of the database could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// SQLite refused.
    #[error("{path}: {source}")]
    Sqlite {
        /// The database.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// Not a database this can shadow (not in WAL mode, exclusive locking).
    #[error("{path}: {problem}")]
    Unsupported {
        /// The database.
        path: PathBuf,
        /// What to change.
        problem: String,
    },
    /// The log no longer proves that every commit since the last one read was seen (the
    /// wal-index was rebuilt, a commit went missing, the database was replaced): the standby
    /// needs the whole database again.
    #[error("{path}: continuity lost ({why}); a full copy is needed")]
    Resync {
        /// The database.
        path: PathBuf,
        /// What was seen.
        why: String,
    },
}

/// One committed transaction: the page images it wrote (the last of each page) and the
/// database's size in pages after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedCommit {
    /// Page number (1-based) and image.
    pub pages: Vec<(u32, Vec<u8>)>,
    /// Database size in pages after the commit.
    pub db_pages: u32,
    /// The wal-index's change counter after it (one more per commit).
    pub change: u32,
    /// Where it ends in the log: the log generation's salts and its commit frame (0 for a base
    /// read from a log holding no frames).
    pub salt: [u32; 2],
    /// See `salt`.
    pub frame: u32,
}

/// The database as of the commit [`Source::attach`] pinned: its size and log position; its
/// pages come from [`Source::base_pages`].
#[derive(Debug)]
pub struct Base {
    /// Database size in pages.
    pub db_pages: u32,
    /// Page size in bytes.
    pub page_size: usize,
    /// The wal-index's change counter at that commit.
    pub change: u32,
    /// The log generation's salts.
    pub salt: [u32; 2],
    /// Its commit frame (0: the log held no frames).
    pub frame: u32,
    /// Where the newest image of each page the log holds starts in the log (the read
    /// transaction keeps those frames from being overwritten).
    newest: HashMap<u32, u64>,
}

/// Bytes of the log read at a time while a base is read: a log is as large as the application
/// let it grow (a long transaction, checkpoints starved while the pusher was away), and the
/// base needs only where each page's newest image is.
const BASE_LOG_BYTES: u64 = 64 << 20;

/// Where reading stands: the last commit read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    salt: [u32; 2],
    frame: u32,
    checksum: [u32; 2],
    change: u32,
}

/// Counters of a source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Commits read.
    pub commits: u64,
    /// WAL restarts followed (a new generation of the log, proven continuous).
    pub restarts: u64,
    /// Checkpoints run here.
    pub checkpoints: u64,
    /// Fences not taken because the application held the writer lock (tried again later).
    pub fence_busy: u64,
    /// Times the read transaction stepped aside for the application's own FULL, RESTART or
    /// TRUNCATE checkpoint, which would otherwise wait out its busy timeout.
    pub yields: u64,
}

/// A live database being read. Field order is drop order: the connections close before the
/// raw descriptors, because closing any descriptor of a file drops every POSIX lock this
/// process holds on it, the read transaction's too (docs/design/sqlite-shadow.md §1).
pub struct Source {
    read: Connection,
    fence: Connection,
    ckpt: Connection,
    path: PathBuf,
    db: File,
    wal: File,
    shm: File,
    page_size: usize,
    pos: Position,
    stats: SourceStats,
    /// The last poll left published commits unread ([`POLL_BYTES`]): no checkpoint until
    /// they are read.
    behind: bool,
}

/// Bytes of the log one poll reads when more is published (commits made while a base was sent,
/// or while the pusher was away): the rest waits for the next poll, so the pusher's memory is
/// bounded by this, or by the largest commit.
const POLL_BYTES: u64 = 64 << 20;

fn open_conn(path: &Path) -> Result<Connection, SourceError> {
    let err = |source| SourceError::Sqlite { path: path.to_path_buf(), source };
    // Never created here: a wrong path is an error, not a new empty database.
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(err)?;
    // Closing must never checkpoint or remove the log: that is the application's and ours.
    c.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true).map_err(err)?;
    Ok(c)
}

fn side(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Source {
    /// Attaches to the database at `path` (in WAL mode, written by any program) and returns it
    /// with the base: the database as of one commit, from which the commits [`Source::poll`]
    /// returns continue. Its pages are read in ranges ([`Source::base_pages`]), before the
    /// first poll: a database of any size costs the primary a range's memory, not its own.
    pub fn attach(path: &Path) -> Result<(Source, Base), SourceError> {
        let err = |source| SourceError::Sqlite { path: path.to_path_buf(), source };
        let read = open_conn(path)?;
        let mode: String = read.query_row("PRAGMA journal_mode", [], |r| r.get(0)).map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SourceError::Unsupported { path: path.into(), problem: format!("journal_mode is {mode}; shadowing needs WAL (PRAGMA journal_mode=WAL, once, by the application)") });
        }
        // The fence and the checkpointer never wait on the application (rusqlite's default
        // is 5 s): a fence waiting for the writer lock while the application's checkpoint
        // waits for our read transaction would stall both for the application's busy timeout.
        let fence = open_conn(path)?;
        fence.busy_timeout(Duration::ZERO).map_err(err)?;
        let ckpt = open_conn(path)?;
        ckpt.busy_timeout(Duration::ZERO).map_err(err)?;
        let file = |p: PathBuf| File::open(&p).map_err(|source| SourceError::Io { path: p, source });
        let (db, wal, shm) = (file(path.to_path_buf())?, file(side(path, "-wal"))?, file(side(path, "-shm"))?);
        let mut s = Source { read, fence, ckpt, path: path.into(), db, wal, shm, page_size: 0, pos: Position { salt: [0, 0], frame: 0, checksum: [0, 0], change: 0 }, stats: SourceStats::default(), behind: false };
        // Under the writer lock nothing commits: the read transaction begun there sees exactly
        // the commit the wal-index names.
        let h = s.fenced(Duration::from_secs(30), |s| {
            let h = s.shm_header()?;
            s.read.execute_batch("BEGIN").map_err(err)?;
            let _: i64 = s.read.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(err)?;
            s.page_size = s.db_page_size()?;
            Ok(h)
        })?;
        // Read after the fence: the read transaction pins that commit (no checkpoint copies a
        // later frame into the file, no restart overwrites an earlier one), so the application
        // writes on while the whole database is read.
        let base = s.base(&h)?;
        Ok((s, base))
    }

    /// Counters.
    pub fn stats(&self) -> SourceStats {
        self.stats
    }

    fn io(&self, p: &str, source: std::io::Error) -> SourceError {
        SourceError::Io { path: side(&self.path, p), source }
    }

    fn sqlite(&self, source: rusqlite::Error) -> SourceError {
        SourceError::Sqlite { path: self.path.clone(), source }
    }

    /// The wal-index header, read again while SQLite is writing it.
    fn shm_header(&self) -> Result<ShmHeader, SourceError> {
        let mut b = [0u8; SHM_HEADER_LEN];
        for _ in 0..1000 {
            self.shm.read_exact_at(&mut b, 0).map_err(|e| self.io("-shm", e))?;
            if let Some(h) = sqlite_wal::parse_shm(&b) {
                return Ok(h);
            }
            std::thread::yield_now();
        }
        Err(SourceError::Resync { path: self.path.clone(), why: "the wal-index header never read consistently".into() })
    }

    /// The page size in the database file's header (the wal-index's is not set while the log
    /// is empty).
    fn db_page_size(&self) -> Result<usize, SourceError> {
        let mut b = [0u8; 2];
        self.db.read_exact_at(&mut b, 16).map_err(|e| self.io("", e))?;
        // The database header is big-endian by SQLite's format.
        #[allow(clippy::big_endian_bytes)]
        let raw = u16::from_be_bytes(b);
        Ok(match raw {
            1 => 65536,
            n if n >= 512 && n.is_power_of_two() => n as usize,
            n => return Err(SourceError::Unsupported { path: self.path.clone(), problem: format!("page size {n} in its header is not SQLite's") }),
        })
    }

    /// The log's header and its frames `from + 1 ..= to` (only those are read: the log holds
    /// up to a thousand frames between checkpoints, and a poll needs the newest few).
    fn wal_frames(&self, from: u32, to: u32) -> Result<(WalHeader, Vec<u8>), SourceError> {
        let flen = (FRAME_HEADER_LEN + self.page_size) as u64;
        let (start, end) = (HEADER_LEN as u64 + u64::from(from) * flen, HEADER_LEN as u64 + u64::from(to) * flen);
        self.log_holds(to)?;
        if start > end {
            return Err(SourceError::Resync { path: self.path.clone(), why: format!("frames {}..{to} asked of the log", from + 1) });
        }
        let mut hb = [0u8; HEADER_LEN];
        self.wal.read_exact_at(&mut hb, 0).map_err(|e| self.io("-wal", e))?;
        let h = sqlite_wal::parse_header(&hb).map_err(|e| SourceError::Resync { path: self.path.clone(), why: e.to_string() })?;
        if h.page_size != self.page_size {
            return Err(SourceError::Resync { path: self.path.clone(), why: format!("the log's pages are {} bytes, the database's {}", h.page_size, self.page_size) });
        }
        let mut b = vec![0u8; (end - start) as usize];
        self.wal.read_exact_at(&mut b, start).map_err(|e| self.io("-wal", e))?;
        Ok((h, b))
    }

    /// A damaged wal-index may name frames the log never had: checked before allocating.
    fn log_holds(&self, frame: u32) -> Result<(), SourceError> {
        let end = HEADER_LEN as u64 + u64::from(frame) * (FRAME_HEADER_LEN + self.page_size) as u64;
        let have = self.wal.metadata().map_err(|e| self.io("-wal", e))?.len();
        if end > have {
            return Err(SourceError::Resync { path: self.path.clone(), why: format!("the wal-index names frame {frame}, the log holds {have} bytes") });
        }
        Ok(())
    }

    /// The commits in frames `from + 1 ..= h.max_frame`, which must end exactly where the
    /// wal-index says; with the bytes their page ranges index.
    fn read_commits(&self, h: &ShmHeader, from: u32, sum: Option<[u32; 2]>) -> Result<(Vec<sqlite_wal::Commit>, Vec<u8>), SourceError> {
        let (wh, b) = self.wal_frames(from, h.max_frame)?;
        let cs = sqlite_wal::commits_in(&wh, &b, from, sum.unwrap_or(wh.checksum));
        if wh.salt != h.salt || cs.last().map(|c| (c.last_frame, c.checksum)) != Some((h.max_frame, h.frame_checksum)) {
            return Err(SourceError::Resync { path: self.path.clone(), why: format!("frames {}..{} do not end where the wal-index says", from + 1, h.max_frame) });
        }
        Ok((cs, b))
    }

    /// Runs `f` holding the writer lock (taken without waiting on the application; tried again
    /// until `patience` runs out), released afterwards whatever happened.
    fn fenced<T>(&mut self, patience: Duration, f: impl FnOnce(&mut Source) -> Result<T, SourceError>) -> Result<T, SourceError> {
        let t0 = std::time::Instant::now();
        loop {
            match self.fence.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => break,
                Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) && t0.elapsed() < patience => {
                    self.stats.fence_busy += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(self.sqlite(e)),
            }
        }
        let r = f(self);
        let _ = self.fence.execute_batch("ROLLBACK");
        r
    }

    /// Every page as of the commit `h` names: the newest frame of it up to there, else the
    /// database file (which no checkpoint can change past that commit while it is pinned).
    fn base(&mut self, h: &ShmHeader) -> Result<Base, SourceError> {
        let mut newest: HashMap<u32, u64> = HashMap::new();
        let mut pos = Position { salt: h.salt, frame: 0, checksum: [0, 0], change: h.change };
        if h.max_frame > 0 {
            // The log in pieces, its checksum chain walked on from one to the next (the pages
            // of a commit a piece cuts carried over), ending where the wal-index says.
            let flen = (FRAME_HEADER_LEN + self.page_size) as u64;
            let per = u32::try_from((BASE_LOG_BYTES / flen).max(1)).unwrap_or(u32::MAX);
            let (mut from, mut sum, mut last) = (0u32, None, None);
            let mut carried: Vec<(u32, u64)> = Vec::new();
            while from < h.max_frame {
                let (wh, b) = self.wal_frames(from, h.max_frame.min(from.saturating_add(per)))?;
                if wh.salt != h.salt {
                    return Err(SourceError::Resync { path: self.path.clone(), why: "the log's salts are not the wal-index's".into() });
                }
                let w = sqlite_wal::walk(&wh, &b, from, sum.unwrap_or(wh.checksum));
                let at = HEADER_LEN as u64 + u64::from(from) * flen;
                for c in &w.commits {
                    newest.extend(carried.drain(..));
                    newest.extend(c.pages.iter().map(|(p, r)| (*p, at + r.start as u64)));
                    last = Some((c.last_frame, c.checksum));
                }
                carried.extend(w.pending.iter().map(|(p, r)| (*p, at + r.start as u64)));
                if w.frame == from {
                    // A frame that is not the next of the chain: the check below fails.
                    break;
                }
                (from, sum) = (w.frame, Some(w.sum));
            }
            if last != Some((h.max_frame, h.frame_checksum)) {
                return Err(SourceError::Resync { path: self.path.clone(), why: format!("frames 1..{} do not end where the wal-index says", h.max_frame) });
            }
            pos.frame = h.max_frame;
            pos.checksum = h.frame_checksum;
        }
        // With an empty log the wal-index's size is not set: the file is the database.
        let db_pages = match h.max_frame {
            0 => {
                let len = self.db.metadata().map_err(|e| self.io("", e))?.len();
                u32::try_from(len / self.page_size as u64).unwrap_or(u32::MAX)
            }
            _ => h.db_pages,
        };
        self.pos = pos;
        Ok(Base { db_pages, page_size: self.page_size, change: pos.change, salt: h.salt, frame: h.max_frame, newest })
    }

    /// Pages `pages` (clamped to the database's size) of the base `b`, as of its commit: from
    /// the log where the commit's log holds them, else from the file, which no checkpoint
    /// changes past that commit while the read transaction `attach` began is open.
    pub fn base_pages(&self, b: &Base, pages: std::ops::RangeInclusive<u32>) -> Result<Vec<(u32, Vec<u8>)>, SourceError> {
        let (from, to) = ((*pages.start()).max(1), (*pages.end()).min(b.db_pages));
        let mut out = Vec::with_capacity(to.saturating_sub(from).saturating_add(1) as usize);
        for p in from..=to {
            let mut img = vec![0u8; self.page_size];
            match b.newest.get(&p) {
                Some(&at) => self.wal.read_exact_at(&mut img, at).map_err(|e| self.io("-wal", e))?,
                None => {
                    let at = (p as u64 - 1) * self.page_size as u64;
                    // Pages past the file's end (a commit grew the db without writing them) are zeros.
                    let n = read_full_at(&self.db, &mut img, at).map_err(|e| self.io("", e))?;
                    img[n..].fill(0);
                }
            }
            out.push((p, img));
        }
        Ok(out)
    }

    /// The whole base as one commit (every page in memory: for small databases and tests).
    pub fn base_commit(&self, b: &Base) -> Result<OwnedCommit, SourceError> {
        Ok(OwnedCommit { pages: self.base_pages(b, 1..=b.db_pages)?, db_pages: b.db_pages, change: b.change, salt: b.salt, frame: b.frame })
    }

    /// The commits published since the last read, in order; none when nothing changed. Proves
    /// continuity: the wal-index's commit counter must have moved by exactly the number of
    /// commits found, across a restart of the log too.
    pub fn poll(&mut self) -> Result<Vec<OwnedCommit>, SourceError> {
        self.check_same_file()?;
        let h = self.shm_header()?;
        let restarted = h.salt != self.pos.salt || h.max_frame < self.pos.frame;
        let from = if restarted { 0 } else { self.pos.frame };
        if h.max_frame == from {
            // Nothing new (or a log restarted and still empty): the counter must not have
            // moved, and this is when an application's checkpoint may be waiting for us.
            self.check_count(&h, 0)?;
            self.yield_to_checkpointer()?;
            return Ok(Vec::new());
        }
        let sum = (!restarted).then_some(self.pos.checksum);
        let per = u32::try_from((POLL_BYTES / (FRAME_HEADER_LEN + self.page_size) as u64).max(1)).unwrap_or(u32::MAX);
        // A part of what is published when that is much: its continuity is the checksum chain
        // from the last read; the counter is checked once all is read. A first part holding no
        // whole commit (one larger than a part) is read whole below.
        let part = if h.max_frame - from > per {
            self.log_holds(h.max_frame)?;
            let (wh, b) = self.wal_frames(from, from + per)?;
            (wh.salt == h.salt).then(|| (sqlite_wal::commits_in(&wh, &b, from, sum.unwrap_or(wh.checksum)), b))
        } else {
            None
        };
        let (cs, b, behind) = match part {
            Some((cs, b)) if !cs.is_empty() => (cs, b, true),
            _ => {
                let (cs, b) = self.read_commits(&h, from, sum)?;
                self.check_count(&h, cs.len())?;
                (cs, b, false)
            }
        };
        let first_change = self.pos.change.wrapping_add(1);
        let out: Vec<OwnedCommit> = cs
            .iter()
            .zip(0u32..)
            .map(|(c, i)| {
                let mut last: std::collections::BTreeMap<u32, &[u8]> = std::collections::BTreeMap::new();
                for (p, r) in &c.pages {
                    last.insert(*p, &b[r.clone()]);
                }
                OwnedCommit { pages: last.into_iter().map(|(p, img)| (p, img.to_vec())).collect(), db_pages: c.db_pages, change: first_change.wrapping_add(i), salt: h.salt, frame: c.last_frame }
            })
            .collect();
        if restarted {
            self.stats.restarts += 1;
        }
        self.stats.commits += out.len() as u64;
        let end = cs.last().map(|c| (c.last_frame, c.checksum)).unwrap_or((h.max_frame, h.frame_checksum));
        self.pos = Position { salt: h.salt, frame: end.0, checksum: end.1, change: self.pos.change.wrapping_add(out.len() as u32) };
        self.behind = behind;
        Ok(out)
    }

    /// Whether one other process holds both the WRITE (byte 120) and CKPT (121) locks of the
    /// wal-index: the application runs a FULL, RESTART or TRUNCATE checkpoint and waits,
    /// holding the writer lock, for readers to move on. F_GETLK never reports this process's
    /// own locks.
    fn checkpointer_waiting(&self) -> Result<bool, SourceError> {
        use rustix::process::{Flock, FlockOffsetType, FlockType, fcntl_getlk};
        let holder = |byte: u64| -> Result<Option<Option<rustix::process::Pid>>, SourceError> {
            let probe = Flock { start: byte, length: 1, pid: None, typ: FlockType::WriteLock, offset_type: FlockOffsetType::Set };
            let got = fcntl_getlk(&self.shm, &probe).map_err(|e| self.io("-shm", e.into()))?;
            Ok(got.filter(|l| l.typ == FlockType::WriteLock).map(|l| l.pid))
        };
        Ok(match (holder(120)?, holder(121)?) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        })
    }

    /// Steps the read transaction aside while the application's blocking checkpoint runs
    /// (everything published has been read, and its writer lock keeps anything new from
    /// committing meanwhile), then pins again. Without this its checkpoint would wait out its
    /// whole busy timeout, holding the writer lock, and stall its writers. A restart it makes
    /// is followed by the next poll's continuity proof.
    fn yield_to_checkpointer(&mut self) -> Result<(), SourceError> {
        if !self.checkpointer_waiting()? {
            return Ok(());
        }
        self.read.execute_batch("COMMIT").map_err(|e| self.sqlite(e))?;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(10) && self.checkpointer_waiting()? {
            std::thread::sleep(Duration::from_micros(500));
        }
        self.read.execute_batch("BEGIN").map_err(|e| self.sqlite(e))?;
        self.read.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get::<_, i64>(0)).map_err(|e| self.sqlite(e))?;
        self.stats.yields += 1;
        Ok(())
    }

    /// The path must still name the file attached to: a database moved or copied over it
    /// (a restore by file copy, `mv new.db app.db`) is another database, and its pages are
    /// not commits of this one.
    fn check_same_file(&self) -> Result<(), SourceError> {
        use std::os::unix::fs::MetadataExt;
        let ours = self.db.metadata().map_err(|e| self.io("", e))?;
        let same = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()));
        if same {
            Ok(())
        } else {
            Err(SourceError::Resync { path: self.path.clone(), why: "the database file was replaced or removed".into() })
        }
    }

    fn check_count(&self, h: &ShmHeader, found: usize) -> Result<(), SourceError> {
        let moved = h.change.wrapping_sub(self.pos.change);
        if moved as usize != found {
            return Err(SourceError::Resync { path: self.path.clone(), why: format!("the wal-index counts {moved} commit(s) since the last read, the log holds {found}") });
        }
        Ok(())
    }

    /// Reads what is published, then lets SQLite copy the log into the database file: under
    /// the writer fence (nothing commits meanwhile) the read transaction ends, a PASSIVE
    /// checkpoint runs, and a new read transaction begins; the application's next writer then
    /// starts the log over. Returns the commits read. When the application holds the writer
    /// lock, nothing happens and this is tried again later (`Ok(None)`).
    pub fn checkpoint(&mut self) -> Result<Option<Vec<OwnedCommit>>, SourceError> {
        match self.fence.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => {}
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                self.stats.fence_busy += 1;
                return Ok(None);
            }
            Err(e) => return Err(self.sqlite(e)),
        }
        let r = (|| {
            let out = self.poll()?;
            if self.behind {
                // Frames not read yet must stay in the log.
                return Ok(Some(out));
            }
            self.read.execute_batch("COMMIT").map_err(|e| self.sqlite(e))?;
            // PASSIVE never waits on readers: what they still need stays in the log.
            let ck = self.ckpt.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            let again = self.read.execute_batch("BEGIN").and_then(|()| self.read.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get::<_, i64>(0)));
            ck.map_err(|e| self.sqlite(e))?;
            again.map_err(|e| self.sqlite(e))?;
            self.stats.checkpoints += 1;
            Ok(Some(out))
        })();
        let _ = self.fence.execute_batch("ROLLBACK");
        r
    }
}

/// Where the database at `path` stands now: the wal-index's change counter, the log
/// generation's salts and its last commit frame (0: every commit is in the database file).
/// Reads the `-shm` header only (this process must hold no SQLite connection to the database:
/// closing the descriptor would drop its locks).
pub fn committed_position(path: &Path) -> Result<(u32, [u32; 2], u32), SourceError> {
    let p = side(path, "-shm");
    let f = File::open(&p).map_err(|source| SourceError::Io { path: p.clone(), source })?;
    let mut b = vec![0u8; SHM_HEADER_LEN];
    let n = read_full_at(&f, &mut b, 0).map_err(|source| SourceError::Io { path: p.clone(), source })?;
    sqlite_wal::parse_shm(&b[..n])
        .map(|h| (h.change, h.salt, h.max_frame))
        .ok_or_else(|| SourceError::Unsupported { path: p, problem: "no valid wal-index header (is the database open in WAL mode?)".into() })
}

/// Reads as much of `buf` as the file holds from `at`; returns how much.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
