//! The WAL reader against a real SQLite: a Python program (the standard sqlite3 module) writes
//! 51 transactions into a database in WAL mode with automatic checkpoints off; its WAL, read
//! and applied commit by commit to the database as it was before them, gives databases that
//! SQLite itself finds intact and that hold exactly the rows of each point in time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kura_shadow::sqlite_wal::{apply, commits, parse_shm};
use std::path::Path;
use std::process::Command;

fn python(code: &str, dir: &Path) -> String {
    let o = Command::new("python3").arg("-c").arg(code).arg(dir).output().expect("python3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

const WRITE: &str = r#"
import sqlite3, shutil, sys
d = sys.argv[1]
c = sqlite3.connect(d + '/db', isolation_level=None)
c.execute('PRAGMA journal_mode=WAL')
c.execute('PRAGMA wal_autocheckpoint=0')
c.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)')
c.execute('PRAGMA wal_checkpoint(TRUNCATE)')
shutil.copy(d + '/db', d + '/base')
for i in range(50):
    c.execute('BEGIN')
    c.execute('INSERT INTO t VALUES (?, ?)', (i, 'x' * (i * 377 % 9000)))
    c.execute('COMMIT')
c.execute('BEGIN')
c.execute('DELETE FROM t WHERE id < 10')
c.execute('COMMIT')
shutil.copy(d + '/db-wal', d + '/wal')
shutil.copy(d + '/db-shm', d + '/shm')
c.close()
"#;

const CHECK: &str = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1] + '/restored')
print(c.execute('PRAGMA integrity_check').fetchone()[0], c.execute('SELECT count(*), coalesce(sum(id), 0) FROM t').fetchone())
"#;

#[test]
fn a_real_wal_replays_to_every_commit_and_sqlite_finds_each_intact() {
    let d = tempfile::tempdir().unwrap();
    python(WRITE, d.path());
    let base = std::fs::read(d.path().join("base")).unwrap();
    let wal = std::fs::read(d.path().join("wal")).unwrap();
    let (h, cs) = commits(&wal, None).unwrap();
    assert_eq!(h.page_size, 4096);
    assert_eq!(cs.len(), 51, "one commit per transaction");
    // The wal-index names the same last commit: frame, checksum chain, salts, size.
    let shm = parse_shm(&std::fs::read(d.path().join("shm")).unwrap()).expect("a settled wal-index header");
    let last = cs.last().unwrap();
    assert_eq!((shm.max_frame, shm.frame_checksum, shm.salt, shm.db_pages, shm.page_size), (last.last_frame, last.checksum, h.salt, last.db_pages, 4096));
    assert!(shm.change >= 51, "{shm:?}");
    // Any point in time: after 20 inserts, after all 50, after the delete.
    for (n, want) in [(20usize, "ok (20, 190)"), (50, "ok (50, 1225)"), (51, "ok (40, 1180)")] {
        let mut db = base.clone();
        for c in &cs[..n] {
            apply(&mut db, h.page_size, &wal, c);
        }
        std::fs::write(d.path().join("restored"), &db).unwrap();
        let _ = std::fs::remove_file(d.path().join("restored-wal"));
        let _ = std::fs::remove_file(d.path().join("restored-shm"));
        assert_eq!(python(CHECK, d.path()), want, "after {n} commits");
    }
}
