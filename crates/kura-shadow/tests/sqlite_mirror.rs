//! A real SQLite application's commits, read from its write-ahead log with `sqlite_wal` and
//! applied to a mirror with `sqlite_mirror`: after every step, a read-only reader of the
//! mirror finds a database that passes `integrity_check` and holds exactly the primary's rows,
//! through growth, overflow pages, updates, a shrinking VACUUM and a WAL restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kura_shadow::sqlite_mirror::{Mirror, PageCommit, integrity_check};
use kura_shadow::sqlite_wal::commits;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// What the rows say, computed by SQLite on either copy.
fn digest(path: &Path) -> (i64, i64, i64, String) {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let (n, len, ids) = c.query_row("SELECT count(*), coalesce(sum(length(v)), 0), coalesce(sum(id), 0) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    let schema: String = c.query_row("SELECT group_concat(name, ',') FROM (SELECT name FROM sqlite_schema ORDER BY name)", [], |r| r.get(0)).unwrap();
    (n, len, ids, schema)
}

/// Ships what the primary committed since `pos` to the mirror; returns the new position.
fn ship(primary: &Path, mirror: &mut Mirror, pos: Option<([u32; 2], u32, [u32; 2])>) -> Option<([u32; 2], u32, [u32; 2])> {
    let wal = std::fs::read(primary.with_extension("db-wal")).unwrap();
    let header = kura_shadow::sqlite_wal::parse_header(&wal).unwrap();
    // After a restart the salts differ: the new log is read from its first frame.
    let from = pos.filter(|(salt, _, _)| *salt == header.salt).map(|(_, f, s)| (f, s));
    let (h, cs) = commits(&wal, from).unwrap();
    let owned: Vec<Vec<(u32, &[u8])>> = cs.iter().map(|c| c.pages.iter().map(|(p, r)| (*p, &wal[r.clone()])).collect()).collect();
    let batch: Vec<PageCommit> = cs.iter().zip(&owned).map(|(c, pages)| PageCommit { pages, db_pages: c.db_pages }).collect();
    mirror.apply(&batch).unwrap();
    match cs.last() {
        Some(c) => Some((h.salt, c.last_frame, c.checksum)),
        None => pos,
    }
}

fn check(primary: &Path, mirror_path: &Path, step: &str) {
    integrity_check(mirror_path).unwrap_or_else(|e| panic!("after {step}: {e}"));
    assert_eq!(digest(mirror_path), digest(primary), "after {step}");
}

#[test]
fn a_real_applications_commits_make_a_consistent_mirror_at_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = tmp.path().join("app.db");
    let mirror_path = tmp.path().join("mirror.db");
    let app = Connection::open(&primary).unwrap();
    app.pragma_update(None, "page_size", 4096).unwrap();
    app.pragma_update(None, "journal_mode", "wal").unwrap();
    // The pusher, not the application, decides when to checkpoint.
    app.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)").unwrap();

    // The base: the database file's pages (what the log does not hold).
    let base = std::fs::read(&primary).unwrap();
    let mut mirror = Mirror::open(&mirror_path, 4096).unwrap();
    let pages: Vec<(u32, &[u8])> = base.chunks(4096).enumerate().map(|(i, p)| (i as u32 + 1, p)).collect();
    mirror.apply(&[PageCommit { pages: &pages, db_pages: pages.len() as u32 }]).unwrap();
    let mut pos = ship(&primary, &mut mirror, None);
    check(&primary, &mirror_path, "the base and the first commit");

    for batch in 0..20 {
        let tx = app.unchecked_transaction().unwrap();
        for i in 0..100 {
            tx.execute("INSERT INTO t (id, v) VALUES (?1, ?2)", rusqlite::params![batch * 100 + i, format!("row {batch}-{i} ").repeat(8)]).unwrap();
        }
        tx.commit().unwrap();
    }
    pos = ship(&primary, &mut mirror, pos);
    check(&primary, &mirror_path, "2000 inserts in 20 commits");

    for i in (0..2000).step_by(37) {
        app.execute("UPDATE t SET v = ?1 WHERE id = ?2", rusqlite::params![format!("changed {i}"), i]).unwrap();
    }
    app.execute("INSERT INTO t (id, v) VALUES (5000, ?1)", [&"x".repeat(300_000)]).unwrap();
    app.execute_batch("CREATE INDEX t_v ON t (v)").unwrap();
    pos = ship(&primary, &mut mirror, pos);
    check(&primary, &mirror_path, "scattered updates, a 300 kB row and an index");
    let grown = mirror.db_pages();

    app.execute_batch("DELETE FROM t WHERE id % 10 != 0; DELETE FROM t WHERE id = 5000; DROP INDEX t_v; VACUUM").unwrap();
    pos = ship(&primary, &mut mirror, pos);
    check(&primary, &mirror_path, "deleting 90% and VACUUM");
    assert!(mirror.db_pages() < grown / 2, "the mirror did not shrink: {} of {grown} pages", mirror.db_pages());
    // ...and so did its file, once checkpointed: nothing of the deleted rows stays past its end.
    let c = Connection::open(&mirror_path).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    assert_eq!(std::fs::metadata(&mirror_path).unwrap().len(), u64::from(mirror.db_pages()) * page as u64, "the mirror's file kept pages past its end");
    drop(c);

    // The application checkpoints and the log starts over with new salts.
    app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    app.execute("INSERT INTO t (id, v) VALUES (9000, 'after the restart')", []).unwrap();
    ship(&primary, &mut mirror, pos);
    check(&primary, &mirror_path, "a WAL restart");

    // A commit that cannot be a database's is refused and changes nothing.
    let bad = [(3u32, &[0u8; 100][..])];
    assert!(mirror.apply(&[PageCommit { pages: &bad, db_pages: 10 }]).is_err());
    let beyond = [(11u32, &[0u8; 4096][..])];
    assert!(mirror.apply(&[PageCommit { pages: &beyond, db_pages: 10 }]).is_err());
    check(&primary, &mirror_path, "refused commits");
    assert!(Mirror::open(&mirror_path, 8192).is_err(), "a mirror with another page size was opened");
}
