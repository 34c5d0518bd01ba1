//! A live database written by another process (Python's sqlite3, a real application with
//! its own SQLite and its own checkpoints), read commit by commit with `sqlite_source` while it
//! writes, and applied to a mirror: the mirror passes `integrity_check` whenever a reader looks,
//! the log restarts under the source's checkpoints without a commit lost, and at the end the
//! mirror holds exactly the application's rows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kura_shadow::sqlite_mirror::{Mirror, PageCommit, integrity_check};
use kura_shadow::sqlite_source::{OwnedCommit, Source, SourceError};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const WRITER: &str = r#"
import sqlite3, sys, time, random
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)")
db.execute("CREATE TABLE IF NOT EXISTS bank (id INTEGER PRIMARY KEY, balance INTEGER)")
db.execute("INSERT OR IGNORE INTO bank VALUES (1, 1000), (2, 1000)")
print("ready", flush=True)
random.seed(7)
for i in range(int(sys.argv[2])):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t (v, n) VALUES (?, ?)", ("row %d " % i * random.randrange(1, 40), i))
    if i % 7 == 0:
        db.execute("UPDATE t SET v = 'changed' WHERE id = ?", (random.randrange(1, i + 2),))
    amount = random.randrange(1, 50)
    db.execute("UPDATE bank SET balance = balance - ? WHERE id = 1", (amount,))
    db.execute("UPDATE bank SET balance = balance + ? WHERE id = 2", (amount,))
    db.execute("COMMIT")
    if i % 400 == 399:
        db.execute("DELETE FROM t WHERE n % 3 = 0 AND n < ?", (i - 200,))
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    time.sleep(0.0005)
print("done", flush=True)
"#;

fn digest(path: &Path) -> (i64, i64, i64, i64) {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let (n, len, s) = c.query_row("SELECT count(*), coalesce(sum(length(v)), 0), coalesce(sum(n), 0) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    let bank: i64 = c.query_row("SELECT sum(balance) FROM bank", [], |r| r.get(0)).unwrap();
    (n, len, s, bank)
}

/// Attaches to the database and gives the mirror its base.
fn follow(db: &Path, mirror_path: &Path) -> (Source, Mirror) {
    let (src, base) = Source::attach(db).unwrap();
    let mut mirror = Mirror::open(mirror_path, base.page_size).unwrap();
    apply(&mut mirror, std::slice::from_ref(&src.base_commit(&base).unwrap()));
    (src, mirror)
}

fn apply(mirror: &mut Mirror, commits: &[OwnedCommit]) {
    let pages: Vec<Vec<(u32, &[u8])>> = commits.iter().map(|c| c.pages.iter().map(|(p, img)| (*p, img.as_slice())).collect()).collect();
    let batch: Vec<PageCommit> = commits.iter().zip(&pages).map(|(c, p)| PageCommit { pages: p, db_pages: c.db_pages }).collect();
    mirror.apply(&batch).unwrap();
}

#[test]
fn a_live_database_is_mirrored_commit_by_commit_through_log_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    let mirror_path = tmp.path().join("mirror.db");
    let mut app = Command::new("python3").arg("-c").arg(WRITER).arg(&db).arg("3000").stdout(Stdio::piped()).spawn().expect("python3");
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(app.stdout.take().unwrap()));
    assert_eq!(out.next().unwrap().unwrap(), "ready");
    std::thread::sleep(Duration::from_millis(100));

    let (mut src, mut mirror) = follow(&db, &mirror_path);
    let mut polls = 0u64;
    let mut looked = 0;
    loop {
        let finished = app.try_wait().unwrap().is_some();
        let commits = if polls % 50 == 49 { src.checkpoint().unwrap().unwrap_or_default() } else { src.poll().unwrap() };
        apply(&mut mirror, &commits);
        polls += 1;
        if polls.is_multiple_of(100) {
            // A reader of the standby, at any moment: a whole database and a constant total.
            integrity_check(&mirror_path).unwrap_or_else(|e| panic!("mirror after {polls} polls: {e}"));
            assert_eq!(digest(&mirror_path).3, 2000, "a transfer was seen half-applied");
            looked += 1;
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(app.wait().unwrap().success());
    apply(&mut mirror, &src.poll().unwrap());
    integrity_check(&mirror_path).unwrap();
    assert_eq!(digest(&mirror_path), digest(&db));
    let st = src.stats();
    assert!(looked > 0 && st.commits > 100, "{st:?}");
    assert!(st.checkpoints > 0 && st.restarts > 0, "the log never restarted: {st:?}");
}

#[test]
fn a_database_not_in_wal_mode_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("rollback.db");
    let c = Connection::open(&db).unwrap();
    c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1)").unwrap();
    let e = Source::attach(&db).err().expect("attached to a rollback-journal database");
    assert!(matches!(e, SourceError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("journal_mode=WAL"), "{e}");
    let missing = Source::attach(&tmp.path().join("nope.db")).err().expect("attached to nothing");
    assert!(matches!(missing, SourceError::Sqlite { .. }), "{missing}");
    assert!(!tmp.path().join("nope.db").exists(), "attaching created the database");
}

/// Runs a Python snippet on the database (its own process, its own SQLite).
fn py(db: &Path, code: &str) -> std::process::Child {
    let script = format!("import sqlite3, sys, time, os\ndb = sqlite3.connect({:?}, isolation_level=None, timeout=10)\n{code}\n", db.to_str().unwrap());
    Command::new("python3").arg("-c").arg(script).stdout(Stdio::piped()).spawn().expect("python3")
}

fn run_py(db: &Path, code: &str) {
    let o = py(db, code).wait_with_output().unwrap();
    assert!(o.status.success(), "python failed");
}

#[test]
fn a_transaction_killed_midway_never_reaches_the_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    let mirror_path = tmp.path().join("mirror.db");
    run_py(&db, "db.execute('PRAGMA journal_mode=WAL')\ndb.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)')\nfor i in range(100):\n    db.execute('INSERT INTO t (v) VALUES (?)', ('before %d' % i,))");
    let (mut src, mut mirror) = follow(&db, &mirror_path);

    // A big transaction spills uncommitted pages into the log, then the application dies.
    let mut app = py(&db, "db.execute('PRAGMA cache_size=10')\ndb.execute('BEGIN')\nfor i in range(20000):\n    db.execute('INSERT INTO t (v) VALUES (?)', ('never committed %d ' % i * 5,))\nprint('inside', flush=True)\ntime.sleep(60)");
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(app.stdout.take().unwrap()));
    assert_eq!(out.next().unwrap().unwrap(), "inside");
    let wal_len = std::fs::metadata(tmp.path().join("app.db-wal")).unwrap().len();
    assert!(wal_len > 1 << 20, "the transaction did not spill into the log ({wal_len} bytes)");
    apply(&mut mirror, &src.poll().unwrap());
    app.kill().unwrap(); // SIGKILL
    app.wait().unwrap();
    assert!(src.poll().unwrap().is_empty(), "a dead transaction's frames were read as a commit");

    // The next application overwrites those frames with its own commits.
    run_py(&db, "for i in range(50):\n    db.execute('INSERT INTO t (v) VALUES (?)', ('after %d' % i,))");
    apply(&mut mirror, &src.poll().unwrap());
    integrity_check(&mirror_path).unwrap();
    let rows = |p: &Path| -> (i64, i64) {
        let c = Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        c.query_row("SELECT count(*), count(*) FILTER (WHERE v LIKE 'never%') FROM t", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap()
    };
    assert_eq!(rows(&mirror_path), (150, 0));
    assert_eq!(rows(&mirror_path), rows(&db));
}

#[test]
fn checkpoints_the_application_forces_and_a_replaced_database_are_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    let mirror_path = tmp.path().join("mirror.db");
    run_py(&db, "db.execute('PRAGMA journal_mode=WAL')\ndb.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)')\ndb.execute('CREATE TABLE bank (id INTEGER PRIMARY KEY, balance INTEGER)')\ndb.execute('INSERT INTO bank VALUES (1, 1000), (2, 1000)')");
    let (mut src, mut mirror) = follow(&db, &mirror_path);

    // The application forces RESTART and TRUNCATE checkpoints between its commits, willing to
    // wait 5 s for readers: the source steps aside, so every one of them completes.
    let mut app = py(&db, "db.execute('PRAGMA busy_timeout=5000')\nbusy = 0\nfor i in range(1500):\n    db.execute('BEGIN IMMEDIATE')\n    db.execute('INSERT INTO t (v, n) VALUES (?, ?)', ('x' * (i % 300), i))\n    db.execute('UPDATE bank SET balance = balance - 1 WHERE id = 1')\n    db.execute('UPDATE bank SET balance = balance + 1 WHERE id = 2')\n    db.execute('COMMIT')\n    if i % 50 == 25:\n        busy += db.execute('PRAGMA wal_checkpoint(RESTART)').fetchone()[0]\n    if i % 50 == 0:\n        busy += db.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0]\nprint(busy, flush=True)");
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(app.stdout.take().unwrap()));
    let mut polls = 0u64;
    loop {
        let finished = app.try_wait().unwrap().is_some();
        let commits = if polls % 20 == 19 { src.checkpoint().unwrap().unwrap_or_default() } else { src.poll().unwrap() };
        apply(&mut mirror, &commits);
        polls += 1;
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(app.wait().unwrap().success());
    assert_eq!(out.next().unwrap().unwrap(), "0", "checkpoints of the application came back busy");
    apply(&mut mirror, &src.poll().unwrap());
    integrity_check(&mirror_path).unwrap();
    assert_eq!(digest(&mirror_path), digest(&db));
    assert!(src.stats().restarts > 0 && src.stats().yields > 0, "{:?}", src.stats());

    // Another database moved over the file: not a commit of this one, but a resync.
    let other = tmp.path().join("other.db");
    run_py(&other, "db.execute('PRAGMA journal_mode=WAL')\ndb.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)')\ndb.execute('CREATE TABLE bank (id INTEGER PRIMARY KEY, balance INTEGER)')\ndb.execute('INSERT INTO bank VALUES (1, 2000)')\ndb.execute('INSERT INTO t (v, n) VALUES (\"other\", 1)')\ndb.execute('PRAGMA wal_checkpoint(TRUNCATE)')");
    // As a restore by file copy does with the application stopped: the new file, and the old
    // log and index gone (left beside it, SQLite would read the old log into the new file).
    std::fs::rename(&other, &db).unwrap();
    for side in ["app.db-wal", "app.db-shm"] {
        std::fs::remove_file(tmp.path().join(side)).unwrap();
    }
    let e = src.poll().unwrap_err();
    assert!(matches!(e, SourceError::Resync { .. }) && e.to_string().contains("replaced"), "{e}");
    drop(src);
    let (mut src, base) = Source::attach(&db).unwrap();
    apply(&mut mirror, std::slice::from_ref(&src.base_commit(&base).unwrap()));
    apply(&mut mirror, &src.poll().unwrap());
    integrity_check(&mirror_path).unwrap();
    assert_eq!(digest(&mirror_path), digest(&db));
    assert_eq!(digest(&mirror_path).0, 1);
}


/// A wal-index that names frames the log never had (damage, or another program's bug) is a
/// resync with a message, not an allocation of what it claims.
#[test]
#[allow(clippy::host_endian_bytes)]
fn a_wal_index_naming_frames_the_log_lacks_is_a_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    run_py(&db, "db.execute('PRAGMA journal_mode=WAL')\ndb.execute('CREATE TABLE t (x)')");
    let (mut src, _mirror) = follow(&db, &tmp.path().join("mirror.db"));
    // Rewrite both header copies with a huge last frame and a matching checksum, as SQLite
    // itself would lay them out (native order words, checksum over bytes 0..40).
    let shm = tmp.path().join("app.db-shm");
    let mut b = std::fs::read(&shm).unwrap();
    b[16..20].copy_from_slice(&4_000_000_000u32.to_ne_bytes());
    let sum = kura_shadow::sqlite_wal::checksum(cfg!(target_endian = "big"), &b[..40], [0, 0]);
    b[40..44].copy_from_slice(&sum[0].to_ne_bytes());
    b[44..48].copy_from_slice(&sum[1].to_ne_bytes());
    let (first, second) = b.split_at_mut(48);
    second[..48].copy_from_slice(&first[..48]);
    std::fs::write(&shm, &b).unwrap();
    let e = src.poll().unwrap_err();
    assert!(matches!(e, SourceError::Resync { .. }) && e.to_string().contains("4000000000"), "{e}");
}

/// 100 commits of 1 MiB published at once (written while the source was not looking): each
/// poll reads at most 64 MiB of them, a checkpoint meanwhile leaves the unread ones in the log,
/// and the polls together give every commit once, counted, in order, to a mirror equal to the
/// database.
#[test]
fn a_large_backlog_is_read_in_bounded_parts_and_nothing_is_checkpointed_away() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    let mirror_path = tmp.path().join("mirror.db");
    let make = "import sqlite3, sys\ndb = sqlite3.connect(sys.argv[1], isolation_level=None)\ndb.execute('PRAGMA journal_mode=WAL')\ndb.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)')\nprint('ready', flush=True)\nsys.stdin.readline()\ndb.execute('PRAGMA wal_autocheckpoint=0')\nfor i in range(100):\n    db.execute('INSERT INTO t (b) VALUES (randomblob(1048576))')\nprint('done', flush=True)\nsys.stdin.read()";
    let mut app = Command::new("python3").arg("-c").arg(make).arg(&db).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python3");
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(app.stdout.take().unwrap()));
    assert_eq!(out.next().unwrap().unwrap(), "ready");
    let (mut src, mut mirror) = follow(&db, &mirror_path);
    let first_change = src.poll().unwrap().first().map(|c| c.change);
    assert_eq!(first_change, None);
    std::io::Write::write_all(app.stdin.as_mut().unwrap(), b"go\n").unwrap();
    assert_eq!(out.next().unwrap().unwrap(), "done");
    let (mut parts, mut seen, mut last_change) = (Vec::new(), 0usize, None);
    loop {
        // Every other read is a checkpoint, the first one too: with commits still unread it
        // must not run (the application's next commit would start the log over them).
        let before = src.stats().checkpoints;
        let commits = if parts.len() % 2 == 0 { src.checkpoint().unwrap().unwrap_or_default() } else { src.poll().unwrap() };
        if commits.is_empty() {
            break;
        }
        if seen + commits.len() < 100 {
            assert_eq!(src.stats().checkpoints, before, "a checkpoint ran with commits unread");
        }
        let bytes: usize = commits.iter().flat_map(|c| &c.pages).map(|(_, img)| img.len()).sum();
        for c in &commits {
            if let Some(l) = last_change {
                assert_eq!(c.change, u32::wrapping_add(l, 1), "commits counted one by one");
            }
            last_change = Some(c.change);
        }
        seen += commits.len();
        parts.push((commits.len(), bytes));
        apply(&mut mirror, &commits);
    }
    assert_eq!(seen, 100, "parts {parts:?}");
    assert!(parts.len() >= 2 && parts.iter().all(|(_, b)| *b <= 66 << 20), "parts {parts:?}");
    assert!(src.stats().checkpoints >= 1, "no checkpoint once everything was read");
    drop(app.stdin.take());
    assert!(app.wait().unwrap().success());
    drop(mirror);
    let count = |p: &Path| -> (i64, i64) { Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap().query_row("SELECT count(*), sum(length(b)) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap() };
    assert_eq!(count(&mirror_path), (100, 100 << 20));
    integrity_check(&mirror_path).unwrap();
}
