//! The standby's copy of a shadowed SQLite database: committed page images written through
//! SQLite's own pager (`sqlite_dbpage`), one transaction per run of whole commits, into a
//! WAL-mode database, so a reader that opens it read-only sees a consistent database at every
//! moment and never blocks the applier (docs/design/sqlite-shadow.md §3).

use rusqlite::{Connection, OpenFlags, params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why the mirror could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// SQLite refused (the path, the disk, the lock).
    #[error("sqlite mirror {path}: {source}")]
    Sqlite {
        /// The mirror.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A commit that cannot be a database's: a page of the wrong size, page 0, or a page
    /// beyond the size the commit gives.
    #[error("sqlite mirror {path}: {problem}")]
    Invalid {
        /// The mirror.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// One committed transaction of the primary: the page images it wrote (a page written twice:
/// the later wins) and the database's size in pages after it.
#[derive(Debug, Clone, Copy)]
pub struct PageCommit<'a> {
    /// Page number (1-based) and image, in the order written.
    pub pages: &'a [(u32, &'a [u8])],
    /// Database size in pages after the commit.
    pub db_pages: u32,
}

/// The mirror database and its applier's connection.
pub struct Mirror {
    path: PathBuf,
    conn: Connection,
    page_size: usize,
    db_pages: u32,
    /// The write transaction [`Mirror::begin`] opened, until [`Mirror::commit`].
    tx: Option<Tx>,
}

/// An open write transaction: the size it leaves, the largest it reached, and page 1's newest
/// image, written only at the commit.
struct Tx {
    size: u32,
    largest: u32,
    page1: Option<Vec<u8>>,
}

impl Mirror {
    /// Opens (or creates, empty) the mirror at `path` for a primary with pages of `page_size`
    /// bytes. A mirror that exists with another page size is refused.
    pub fn open(path: &Path, page_size: usize) -> Result<Mirror, MirrorError> {
        let err = |source| MirrorError::Sqlite { path: path.to_path_buf(), source };
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(MirrorError::Invalid { path: path.into(), problem: format!("page size {page_size} is not one SQLite has") });
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(err)?;
        let current: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).map_err(err)?;
        if current == 0 {
            // Before the first page is written: the pager's page size must be the primary's.
            conn.pragma_update(None, "page_size", page_size as i64).map_err(err)?;
        } else {
            let have: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(err)?;
            if have as usize != page_size {
                return Err(MirrorError::Invalid { path: path.into(), problem: format!("has pages of {have} bytes, the primary {page_size}") });
            }
        }
        // WAL: readers see whole commits and never block the applier. NORMAL: a crash may lose
        // the last applied commits, which the journal replays (full page images: idempotent).
        conn.pragma_update(None, "journal_mode", "wal").map_err(err)?;
        conn.pragma_update(None, "synchronous", "normal").map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        Ok(Mirror { path: path.to_path_buf(), conn, page_size, db_pages: current as u32, tx: None })
    }

    /// The mirror's size in pages.
    pub fn db_pages(&self) -> u32 {
        self.db_pages
    }

    /// Its size in pages as the open transaction leaves it so far (else [`Mirror::db_pages`]).
    pub fn size(&self) -> u32 {
        self.tx.as_ref().map_or(self.db_pages, |t| t.size)
    }

    /// Its page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Calls `f` with every page, in order, as a reader sees them now.
    pub fn for_each_page(&mut self, f: impl FnMut(u32, &[u8])) -> Result<(), MirrorError> {
        pages_of(&self.conn, &self.path, f)
    }

    /// Calls `f` with every page of the database at `path`, opened read-only.
    pub fn read_pages(path: &Path, f: impl FnMut(u32, &[u8])) -> Result<(), MirrorError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|source| MirrorError::Sqlite { path: path.to_path_buf(), source })?;
        pages_of(&conn, path, f)
    }

    /// Applies whole commits, in order, as one transaction: a reader sees the mirror before
    /// them or after the last, never between. Pages a growing commit does not carry become
    /// zeros (SQLite never reads them before writing them); a shrinking one truncates.
    pub fn apply(&mut self, commits: &[PageCommit<'_>]) -> Result<(), MirrorError> {
        self.begin()?;
        let r = self.write(commits).and_then(|()| self.commit());
        if r.is_err() {
            self.rollback();
        }
        r
    }

    /// Opens a write transaction that [`Mirror::write`] adds commits to, for a run of commits
    /// too large to hold in memory at once (a base of a large database): readers see none of
    /// it before [`Mirror::commit`].
    pub fn begin(&mut self) -> Result<(), MirrorError> {
        let path = self.path.clone();
        let err = |source| MirrorError::Sqlite { path: path.clone(), source };
        self.rollback();
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
        // Another connection (a repair) may have changed the size since the last run.
        match self.conn.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0)) {
            Ok(size) => {
                self.tx = Some(Tx { size: size as u32, largest: size as u32, page1: None });
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(err(e))
            }
        }
    }

    /// Writes commits into the open transaction (see [`Mirror::begin`]).
    pub fn write(&mut self, commits: &[PageCommit<'_>]) -> Result<(), MirrorError> {
        let path = self.path.clone();
        let err = |source| MirrorError::Sqlite { path: path.clone(), source };
        for c in commits {
            for (pgno, img) in c.pages {
                if *pgno == 0 || *pgno > c.db_pages || img.len() != self.page_size {
                    return Err(MirrorError::Invalid {
                        path: path.clone(),
                        problem: format!("page {pgno} of {} bytes in a commit of {} pages of {} bytes", img.len(), c.db_pages, self.page_size),
                    });
                }
            }
        }
        let Some(tx) = self.tx.as_mut() else {
            return Err(MirrorError::Invalid { path, problem: "pages written outside a transaction".into() });
        };
        // SQLite never stores the page holding the lock bytes (the one at 1 GiB): its pager
        // refuses a write of it as corruption, and reads it as zeros.
        let lock_page = (0x4000_0000 / self.page_size) as u32 + 1;
        let mut put = self.conn.prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)").map_err(err)?;
        let zero = vec![0u8; self.page_size];
        for c in commits {
            // Only the last image of a page counts.
            let mut last: BTreeMap<u32, &[u8]> = c.pages.iter().map(|(p, img)| (*p, *img)).collect();
            for p in tx.size.min(c.db_pages) + 1..=c.db_pages {
                last.entry(p).or_insert(&zero);
            }
            last.remove(&lock_page);
            // Page 1 (the schema, its cookie and the database's size) at the commit: a
            // statement after it re-reads the schema, which must not name root pages not yet
            // written, and SQLite takes a size in it larger than the file for corruption.
            if let Some(img) = last.remove(&1) {
                tx.page1 = Some(img.to_vec());
            }
            for (pgno, img) in last {
                put.execute(params![pgno as i64, img]).map_err(err)?;
            }
            tx.size = c.db_pages;
            tx.largest = tx.largest.max(tx.size);
        }
        Ok(())
    }

    /// Commits the open transaction.
    pub fn commit(&mut self) -> Result<(), MirrorError> {
        let path = self.path.clone();
        let err = |source| MirrorError::Sqlite { path: path.clone(), source };
        let Some(tx) = self.tx.take() else { return Ok(()) };
        let r = (|| {
            let mut put = self.conn.prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")?;
            if let Some(img) = &tx.page1 {
                put.execute(params![1i64, img])?;
            }
            if tx.size < tx.largest {
                // A NULL page one past the end truncates the file there (SQLite 3.48+), unless a
                // page is written after it: so once, last.
                put.execute(params![tx.size as i64 + 1, Option::<Vec<u8>>::None])?;
            }
            self.conn.execute_batch("COMMIT")
        })();
        match r {
            Ok(()) => {
                self.db_pages = tx.size;
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(err(e))
            }
        }
    }

    /// Drops the open transaction, if any.
    pub fn rollback(&mut self) {
        if self.tx.take().is_some() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Every page of the database `conn` has open, in order, in one read transaction.
fn pages_of(conn: &Connection, path: &Path, mut f: impl FnMut(u32, &[u8])) -> Result<(), MirrorError> {
    let err = |source| MirrorError::Sqlite { path: path.to_path_buf(), source };
    let mut st = conn.prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").map_err(err)?;
    let mut rows = st.query([]).map_err(err)?;
    while let Some(r) = rows.next().map_err(err)? {
        let p: i64 = r.get(0).map_err(err)?;
        let data = r.get_ref(1).map_err(err)?.as_blob().map_err(|e| err(e.into()))?;
        f(p as u32, data);
    }
    Ok(())
}

/// Runs `integrity_check` on a database file nobody else uses, opened for writing so that
/// closing it removes the `-wal` and `-shm` files opening it made (a read-only connection
/// leaves them behind).
pub fn integrity_check_alone(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(|e| e.to_string())?;
    let rows: Vec<String> = {
        let mut st = conn.prepare("PRAGMA integrity_check(10)").map_err(|e| e.to_string())?;
        st.query_map([], |r| r.get(0)).map_err(|e| e.to_string())?.collect::<Result<_, _>>().map_err(|e| e.to_string())?
    };
    conn.close().map_err(|(_, e)| e.to_string())?;
    if rows == ["ok"] { Ok(()) } else { Err(rows.join("; ")) }
}

/// Opens a database read-only, as a reader of the mirror would, and runs SQLite's
/// `integrity_check`: `Ok(())` when it says "ok", else its first complaints.
pub fn integrity_check(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(|e| e.to_string())?;
    let mut st = conn.prepare("PRAGMA integrity_check(10)").map_err(|e| e.to_string())?;
    let rows: Vec<String> = st.query_map([], |r| r.get(0)).map_err(|e| e.to_string())?.collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    if rows == ["ok"] { Ok(()) } else { Err(rows.join("; ")) }
}
