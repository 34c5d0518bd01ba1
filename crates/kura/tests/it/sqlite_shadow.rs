//! SQLite shadowing with real processes: an application (Python's sqlite3, its own process and
//! SQLite) writes transactions while `kura shadow push --sqlite` sends them to `kura serve`;
//! pusher and receiver are killed with SIGKILL and the network is cut under load. A reader of
//! the standby's copy always finds a consistent database, the copy ends equal to the
//! application's, and every transaction in the journal restores to a database that passes
//! `integrity_check` and holds exactly the transactions up to it.

use crate::shadow::{Cable, Standby, kill9};
use crate::util::stderr;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Transaction i inserts row n = i and moves money between two accounts whose sum stays 2000;
/// every 300 transactions a bulk update rewrites many pages. Prints "ready", then "done".
const APP: &str = r#"
import sqlite3, sys, time, random
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v TEXT)")
db.execute("CREATE TABLE IF NOT EXISTS bank (id INTEGER PRIMARY KEY, balance INTEGER)")
db.execute("INSERT OR IGNORE INTO bank VALUES (1, 1000), (2, 1000)")
start = db.execute("SELECT coalesce(max(n) + 1, 0) FROM t").fetchone()[0]
print("ready", flush=True)
random.seed(start)
for i in range(start, start + int(sys.argv[2])):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t (n, v) VALUES (?, ?)", (i, "row %d " % i * random.randrange(1, 30)))
    a = random.randrange(1, 50)
    db.execute("UPDATE bank SET balance = balance - ? WHERE id = 1", (a,))
    db.execute("UPDATE bank SET balance = balance + ? WHERE id = 2", (a,))
    if i % 300 == 299:
        db.execute("UPDATE t SET v = v || '.' WHERE n % 5 = 0")
    db.execute("COMMIT")
    time.sleep(float(sys.argv[3]))
print("done", flush=True)
"#;

/// Rows, the highest n, and the bank's total, read-only: `None` when the database cannot be
/// read yet (not there, no tables).
fn digest(db: &Path) -> Option<(i64, i64, i64)> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let (n, max): (i64, i64) = c.query_row("SELECT count(*), coalesce(max(n), -1) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?))).ok()?;
    let bank: i64 = c.query_row("SELECT coalesce(sum(balance), 0) FROM bank", [], |r| r.get(0)).ok()?;
    Some((n, max, bank))
}

/// Every row with its text, for an exact comparison.
fn rows(db: &Path) -> Vec<(i64, String)> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut st = c.prepare("SELECT n, v FROM t ORDER BY n").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap()
}

fn integrity(db: &Path) -> String {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap()
}

struct App {
    child: Child,
    out: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl App {
    fn start(db: &Path, n: u32, pause: &str) -> App {
        let mut child = Command::new("python3").arg("-c").arg(APP).arg(db).arg(n.to_string()).arg(pause).stdout(Stdio::piped()).spawn().expect("python3");
        let mut out = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        assert_eq!(out.next().unwrap().unwrap(), "ready");
        App { child, out }
    }

    fn finish(mut self) {
        assert_eq!(self.out.next().unwrap().unwrap(), "done");
        assert!(self.child.wait().unwrap().success());
    }
}

fn pusher(sb: &Standby, db: &Path, url: &str, log: &Path) -> Child {
    pusher_with(sb, db, url, log, &[])
}

fn pusher_with(sb: &Standby, db: &Path, url: &str, log: &Path, extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let args = [&["shadow", "push", "--sqlite", db.to_str().unwrap(), "--to", url], extra].concat();
    sb.kura(&sb.token, &args).env("KURA_LOG", "debug").stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

/// A working directory with the application's database and the pusher's log, and where the
/// standby keeps its copy.
fn places(sb: &Standby) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let (db, log) = (work.path().join("app.db"), work.path().join("push.log"));
    let copy = sb.mirror().join("app.db");
    (work, db, log, copy)
}

/// `rows` transactions written, then a pusher started and the copy caught up with them.
fn pushing(sb: &Standby, db: &Path, log: &Path, copy: &Path, rows: u32, pause: &str) -> Child {
    App::start(db, rows, pause).finish();
    let push = pusher(sb, db, &sb.url(), log);
    converge(sb, db, copy, log);
    push
}

/// Waits until the standby's copy holds exactly the application's rows.
fn converge(sb: &Standby, db: &Path, copy: &Path, log: &Path) {
    converge_by(sb, db, copy, log, try_rows);
}

/// Waits until `f` reads the same from the standby's copy as from the application's database.
fn converge_by<T: PartialEq>(sb: &Standby, db: &Path, copy: &Path, log: &Path, f: impl Fn(&Path) -> Option<T>) {
    let want = f(db).expect("the application's database reads");
    let t = Instant::now();
    loop {
        if copy.exists() && f(copy).is_some_and(|got| got == want) {
            return;
        }
        if t.elapsed() > Duration::from_secs(90) {
            panic!("the copy never caught up\nstandby: {}\npusher: {}", sb.status(), std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn try_rows(db: &Path) -> Option<Vec<(i64, String)>> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let mut st = c.prepare("SELECT n, v FROM t ORDER BY n").ok()?;
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).ok()?.collect::<Result<_, _>>().ok()
}

/// A reader of the copy, as an application on the standby would be: every look finds a
/// database that passes `quick_check`, with contiguous rows and the bank's total intact.
fn reader(copy: PathBuf, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut looks = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(40));
            let Ok(c) = Connection::open_with_flags(&copy, OpenFlags::SQLITE_OPEN_READ_ONLY) else { continue };
            let Ok(tx) = c.unchecked_transaction() else { continue };
            let Ok(q) = tx.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) else { continue };
            assert_eq!(q, "ok", "a reader of the copy found it damaged");
            let Ok((n, max)) = tx.query_row("SELECT count(*), coalesce(max(n), -1) FROM t", [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))) else { continue };
            assert_eq!(n, max + 1, "a reader saw a transaction's row without those before it");
            let bank: i64 = tx.query_row("SELECT sum(balance) FROM bank", [], |r| r.get(0)).unwrap();
            assert_eq!(bank, 2000, "a reader saw half a transfer");
            looks += 1;
        }
        looks
    })
}

/// Restores transaction `txid` into a new file and checks it: integrity, contiguous rows, the
/// bank's total. Returns the rows it holds.
fn restore_txid(sb: &Standby, work: &Path, txid: u64) -> i64 {
    let target = work.join(format!("restored-{txid}.db"));
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--sqlite", "--txid", &txid.to_string(), "--target", target.to_str().unwrap()]);
    assert!(o.status.success(), "restore of transaction {txid}: {}", stderr(&o));
    let name = format!("restored-{txid}.db");
    let left: Vec<String> = std::fs::read_dir(work).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".kura-shadow-") || (n.starts_with(&name) && *n != name)).collect();
    assert!(left.is_empty(), "the restore left files behind: {left:?}");
    assert_eq!(integrity(&target), "ok", "transaction {txid}");
    let (n, max, bank) = digest(&target).unwrap();
    assert_eq!((n, bank), (max + 1, 2000), "transaction {txid} is not a whole prefix of the application's transactions");
    n
}

#[test]
fn a_live_database_is_shadowed_through_kill9_of_pusher_and_receiver_and_every_transaction_restores() {
    let mut sb = Standby::start();
    let (work, db, log, copy) = places(&sb);
    let app = App::start(&db, 2500, "0.001");
    let mut push = pusher(&sb, &db, &sb.url(), &log);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let look = reader(copy.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(800));
    kill9(&mut push);
    std::thread::sleep(Duration::from_millis(300));
    let mut push = pusher(&sb, &db, &sb.url(), &log);
    std::thread::sleep(Duration::from_millis(600));
    sb.server.restart();
    std::thread::sleep(Duration::from_millis(600));
    kill9(&mut push);
    let mut push = pusher(&sb, &db, &sb.url(), &log);
    app.finish();
    converge(&sb, &db, &copy, &log);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let looks = look.join().unwrap();
    assert!(looks > 10, "the reader looked only {looks} times");

    // Writes after the pusher caught up arrive too, and a restore at the head is the database.
    let app = App::start(&db, 200, "0");
    app.finish();
    // `wait --sqlite` returns only once the copy holds every committed transaction.
    let o = sb.run(&["shadow", "wait", "--sqlite", db.to_str().unwrap(), "--to", &sb.url(), "--timeout", "60s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rows(&copy), rows(&db), "wait returned before the last commit was applied");
    converge(&sb, &db, &copy, &log);
    let st = sb.status();
    let head = st["head"].as_u64().unwrap();
    let target = work.path().join("head.db");
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--sqlite", "--target", target.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rows(&target), rows(&db));
    // Every 97th transaction, and the first ones: whole prefixes, growing.
    let mut last = -1;
    for txid in (1..=head).filter(|t| *t <= 3 || t % 97 == 0) {
        let n = restore_txid(&sb, work.path(), txid);
        assert!(n >= last, "transaction {txid} holds fewer rows ({n}) than an earlier one ({last})");
        last = n;
    }
    // A restore by time: the moment after the head's receipt is the head.
    let when = "2099-01-01 00:00";
    let at = work.path().join("at.db");
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--sqlite", "--at", when, "--target", at.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rows(&at), rows(&db));
    // Bad input: an existing target, a transaction past the head; nothing is written.
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--sqlite", "--target", at.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("exists"), "{}", stderr(&o));
    let past = work.path().join("past.db");
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--sqlite", "--txid", &(head + 10).to_string(), "--target", past.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("past the newest"), "{}", stderr(&o));
    assert!(!past.exists());
    // Verification while the application writes: the database's pages at one commit against
    // the standby's record of that commit, and the standby's copy, read through SQLite,
    // against its journal.
    let app = App::start(&db, 300, "0.002");
    let t = Instant::now();
    while sb.status()["head"].as_u64().unwrap() < head + 10 {
        assert!(t.elapsed() < Duration::from_secs(30), "the application's commits never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = sb.run(&["--json", "shadow", "verify", "--sqlite", db.to_str().unwrap(), "--to", &sb.url()]);
    app.finish();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(o.status.success() && v["primary"]["drifted"] == 0 && v["primary"]["record"].as_u64() > Some(head) && v["standby"]["drifted"] == 0, "{} {}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    converge(&sb, &db, &copy, &log);
    let head = sb.status()["head"].as_u64().unwrap();
    // Failover of a database stream is refused, with what to do instead.
    let o = sb.kura(&sb.token("admin"), &["shadow", "promote", "--to", &sb.url()]).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("SQLite database app.db"), "{}", stderr(&o));
    assert_eq!(sb.status()["role"], "standby");
    // A generation of the copy (on the standby, between two applied commits): a snapshot
    // tagged with its record that restores to the database.
    let e = crate::util::Env::new();
    e.ok(&["backup", "--shadow-stream", sb.journal().to_str().unwrap()]);
    let snap = &e.json(&["snapshots"])[0];
    assert_eq!(snap["tags"][0], format!("shadow-record={head}"), "{snap}");
    let back = e.path("back");
    e.ok(&["restore", "latest", "--target", back.to_str().unwrap()]);
    let gen_db = crate::util::restored(&back, &sb.mirror()).join("app.db");
    assert_eq!(integrity(&gen_db), "ok");
    assert_eq!(rows(&gen_db), rows(&db));
    // A page changed behind SQLite's back (bit rot on the primary, no commit): verify names
    // it, --repair sends it, and the next verify finds nothing. The log restarted and one
    // commit in it, so the page is read from the file.
    let o = Command::new("python3").arg("-c").arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()").arg(&db).output().unwrap();
    assert!(o.status.success());
    App::start(&db, 1, "0").finish();
    converge(&sb, &db, &copy, &log);
    kill9(&mut push);
    let mut bytes = std::fs::read(&db).unwrap();
    let rot = bytes.len() / 4096 / 2;
    bytes[rot * 4096 + 2048] ^= 0x20;
    std::fs::write(&db, &bytes).unwrap();
    let url = sb.url();
    let verify = |extra: &[&str]| {
        let mut args = vec!["--json", "shadow", "verify", "--sqlite", db.to_str().unwrap(), "--to", &url];
        args.extend_from_slice(extra);
        let o = sb.run(&args);
        (o.status.code(), serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default(), stderr(&o))
    };
    let (code, v, err) = verify(&[]);
    assert_eq!((code, &v["primary"]["drift"]), (Some(3), &serde_json::json!([format!("app.db page {}", rot + 1)])), "{v} {err}");
    let (code, v, err) = verify(&["--repair"]);
    assert!(code == Some(0) && v["primary"]["repaired"] == true, "{v} {err}");
    let t = Instant::now();
    while verify(&[]).0 != Some(0) {
        assert!(t.elapsed() < Duration::from_secs(30), "the repaired page never reached the standby: {:?}", verify(&[]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    // Thousands of appends, none in the server's log (it would grow by gigabytes a day); the
    // status requests still are.
    let served = std::fs::read_to_string(sb.server.log_path()).unwrap();
    let plain = |l: &str| l.split('\x1b').map(|p| p.split_once('m').filter(|_| p.starts_with('[')).map_or(p, |x| x.1)).collect::<String>();
    let access: Vec<String> = served.lines().filter(|l| l.contains("kura::access")).map(plain).collect();
    assert!(access.iter().any(|l| l.contains("path=/v1/shadow/www ")), "{served}");
    assert!(!access.iter().any(|l| l.contains("/append") && l.contains("status=200")), "{}", access.join("\n"));
}

#[test]
fn the_copy_converges_after_the_network_is_cut_during_a_write_storm() {
    let sb = Standby::start();
    let cable = Cable::to(&sb.server.addr);
    let (_work, db, log, copy) = places(&sb);
    let url = format!("kura://127.0.0.1:{}/www", cable.port);
    let app = App::start(&db, 3000, "0.0005");
    // Commits travel in groups of up to 20 ms here (the default is 5 ms).
    let mut push = pusher_with(&sb, &db, &url, &log, &["--interval", "20ms"]);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        cable.pull();
        std::thread::sleep(Duration::from_millis(1200));
        cable.plug();
    }
    app.finish();
    converge(&sb, &db, &copy, &log);
    assert!(push.try_wait().unwrap().is_none(), "the pusher gave up on a network cut");
    kill9(&mut push);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("attaching again"), "the cuts were never felt: {text}");
    assert_eq!(integrity(&copy), "ok");
    // An interval that is no duration, or an absurd one, is refused before anything is sent.
    for (bad, why) in [("soon", "--interval = \"soon\""), ("1h", "at most 10s")] {
        let o = sb.kura(&sb.token, &["shadow", "push", "--sqlite", db.to_str().unwrap(), "--to", &url, "--interval", bad]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(why) && err.lines().count() == 1, "{err}");
    }
}

/// Like APP, with a 16 KiB incompressible blob per transaction: a few MiB fill a small disk.
const BLOBS: &str = r#"
import sqlite3, sys, time, os
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v BLOB)")
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    db.execute("INSERT INTO t (n, v) VALUES (?, ?)", (i, os.urandom(16384)))
    time.sleep(0.002)
print("done", flush=True)
"#;

#[test]
fn a_full_disk_on_the_standby_holds_the_stream_and_it_catches_up_once_space_is_freed() {
    // The standby's journal on an 8 MiB tmpfs: ~24 MiB of commits do not fit until it grows.
    let work = tempfile::tempdir().unwrap();
    let (sb, grow) = Standby::on_small_disk(work.path());
    let (db, log) = (work.path().join("app.db"), work.path().join("push.log"));
    let copy = sb.mirror().join("app.db");
    let mut app = Command::new("python3").arg("-c").arg(BLOBS).arg(&db).arg("1500").stdout(Stdio::piped()).spawn().expect("python3");
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(app.stdout.take().unwrap()));
    assert_eq!(out.next().unwrap().unwrap(), "ready");
    let mut push = pusher(&sb, &db, &sb.url(), &log);
    // Full: the standby refuses appends (507) and says so; the pusher keeps trying.
    let t = Instant::now();
    while !sb.server.log().contains("No space left on device") {
        assert!(t.elapsed() < Duration::from_secs(60), "the disk never filled: {}", sb.server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(push.try_wait().unwrap().is_none(), "the pusher gave up on a full standby");
    assert_eq!(integrity(&copy), "ok", "the copy was damaged by the full disk");
    // Space freed: everything arrives.
    std::fs::write(&grow, b"").unwrap();
    assert_eq!(out.next().unwrap().unwrap(), "done");
    assert!(app.wait().unwrap().success());
    converge_by(&sb, &db, &copy, &log, rows_blob);
    assert_eq!(integrity(&copy), "ok");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("507"), "the pusher never met the full disk: {text}");
    // The journal sits in the server's own mount namespace: the standby checks its copy
    // against it page by page.
    let o = sb.run(&["--json", "shadow", "verify", "--source", work.path().to_str().unwrap(), "--to", &sb.url()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v["standby"]["drifted"], 0, "{} {}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    kill9(&mut push);
}

/// Every row's number and a hash of its blob.
fn rows_blob(db: &Path) -> Option<Vec<(i64, [u8; 32])>> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let mut st = c.prepare("SELECT n, v FROM t ORDER BY n").ok()?;
    st.query_map([], |r| Ok((r.get(0)?, *blake3::hash(&r.get::<_, Vec<u8>>(1)?).as_bytes()))).ok()?.collect::<Result<_, _>>().ok()
}

/// An application's transaction that spills pages into the log, then waits to be killed.
const SPILL: &str = r#"
import sqlite3, sys, time, os
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("PRAGMA cache_size=20")
db.execute("BEGIN IMMEDIATE")
for i in range(400):
    db.execute("INSERT INTO t (n, v) VALUES (?, ?)", (10_000_000 + i, "spilled " * 400))
print("spilled", flush=True)
time.sleep(600)
"#;

/// An application forcing its own blocking checkpoints between commits.
const CHECKPOINTS: &str = r#"
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
start = db.execute("SELECT coalesce(max(n) + 1, 0) FROM t").fetchone()[0]
busy = 0
for i in range(start, start + 300):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t (n, v) VALUES (?, ?)", (i, "after checkpoints %d" % i))
    db.execute("UPDATE bank SET balance = balance - 1 WHERE id = 1")
    db.execute("UPDATE bank SET balance = balance + 1 WHERE id = 2")
    db.execute("COMMIT")
    if i % 50 == 0:
        busy += db.execute("PRAGMA wal_checkpoint(%s)" % ("TRUNCATE" if i % 100 == 0 else "RESTART")).fetchone()[0]
print("busy", busy, flush=True)
"#;

#[test]
fn killed_transactions_forced_checkpoints_and_a_replaced_database_all_reach_the_copy_correctly() {
    let sb = Standby::start();
    let (work, db, log, copy) = places(&sb);
    let mut push = pushing(&sb, &db, &log, &copy, 300, "0.001");

    // kill -9 of the application in the middle of a transaction that spilled into the log.
    let mut spill = Command::new("python3").arg("-c").arg(SPILL).arg(&db).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(spill.stdout.take().unwrap()));
    assert_eq!(out.next().unwrap().unwrap(), "spilled");
    let wal = std::fs::metadata(format!("{}-wal", db.display())).unwrap().len();
    assert!(wal > 1 << 20, "the transaction did not spill into the log ({wal} bytes)");
    kill9(&mut spill);
    App::start(&db, 100, "0.001").finish();
    converge(&sb, &db, &copy, &log);
    assert!(try_rows(&copy).unwrap().iter().all(|(n, _)| *n < 10_000_000), "a killed transaction reached the copy");

    // The application's own RESTART and TRUNCATE checkpoints: the pusher steps aside, the log
    // starts over under it, nothing is lost.
    let o = Command::new("python3").arg("-c").arg(CHECKPOINTS).arg(&db).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "busy 0", "the application's checkpoints were blocked");
    converge(&sb, &db, &copy, &log);

    // A table of 1 MB dropped and the database VACUUMed: one commit rewriting every page and
    // shrinking the file; the copy follows and stays whole.
    let pages = |p: &Path| -> i64 { Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap().query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap() };
    let o = Command::new("python3").arg("-c").arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('CREATE TABLE junk (b)'); c.execute('INSERT INTO junk SELECT randomblob(500) FROM t LIMIT 2000'); c.close()").arg(&db).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let shape = |p: &Path| -> Option<(i64, i64)> {
        let c = Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
        let junk: i64 = c.query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'junk'", [], |r| r.get(0)).ok()?;
        Some((junk, c.query_row("PRAGMA page_count", [], |r| r.get(0)).ok()?))
    };
    converge_by(&sb, &db, &copy, &log, shape);
    let before = pages(&db);
    let o = Command::new("python3").arg("-c").arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('DROP TABLE junk'); c.execute('VACUUM'); c.close()").arg(&db).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(pages(&db) < before, "VACUUM did not shrink the database");
    converge_by(&sb, &db, &copy, &log, shape);
    converge(&sb, &db, &copy, &log);
    assert_eq!((integrity(&copy), pages(&copy)), ("ok".to_string(), pages(&db)));
    let before_replace = sb.status()["head"].as_u64().unwrap();

    // Another database moved over the file (the application stopped, as it must be): the
    // pusher notices, compares and sends only what differs; history stays one line.
    let other = work.path().join("other.db");
    App::start(&other, 50, "0").finish();
    let o = Command::new("python3").arg("-c").arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()").arg(&other).output().unwrap();
    assert!(o.status.success());
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", db.display()));
    }
    std::fs::rename(&other, &db).unwrap();
    App::start(&db, 100, "0.001").finish();
    converge(&sb, &db, &copy, &log);
    assert_eq!(integrity(&copy), "ok");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("attaching again"), "the replaced database was never noticed: {text}");
    // Before the replacement, the old database: rows 0.. contiguous through the checkpoints.
    let n = restore_txid(&sb, work.path(), before_replace);
    assert!(n >= 700, "transaction {before_replace} holds {n} rows");
    kill9(&mut push);
}

/// More transactions than the standby keeps in memory (16,384 records): the older ones are
/// read back from the journal's files, by a restore of any of them and by a log of them all.
#[test]
fn transactions_older_than_those_in_memory_restore_from_the_journals_files() {
    let sb = Standby::start();
    let (work, db, log, copy) = places(&sb);
    let mut push = pushing(&sb, &db, &log, &copy, 10, "0");
    App::start(&db, 20_000, "0").finish();
    converge(&sb, &db, &copy, &log);
    kill9(&mut push);
    let head = sb.status()["head"].as_u64().unwrap();
    // One record per commit, unless the pusher attached again (a timeout on a loaded machine):
    // its new base then stands for the commits it had not sent. Either way more records than
    // the journal keeps in memory.
    let pushed = std::fs::read_to_string(&log).unwrap();
    let warned: Vec<&str> = pushed.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    let reattached = pushed.contains("attaching again");
    assert!(head > 20_000 || (reattached && head > 16_384 + 1_000), "{head} records for 20,010 transactions; the pusher warned:\n{}", warned.join("\n"));
    // The chunk index leaves the standby's memory (written out every few seconds); the journal
    // still holds every chunk.
    let t = Instant::now();
    while sb.status()["index_in_memory"].as_u64() != Some(0) {
        assert!(t.elapsed() < Duration::from_secs(30), "the chunk index stays in memory: {}", sb.status());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(sb.status()["chunks"].as_u64().unwrap() > 20_000, "{}", sb.status());
    let mut last = -1;
    for txid in [2, 100, 5_000, head / 2, head - (20_000 - 16_384), head] {
        let n = restore_txid(&sb, work.path(), txid);
        assert!(n > last, "transaction {txid} holds no more rows ({n}) than an earlier one ({last})");
        last = n;
    }
    assert_eq!(last, 20_010);
    let logged: Vec<serde_json::Value> = serde_json::from_str(&sb.ok(&["--json", "shadow", "log", "--journal", sb.journal().to_str().unwrap()])).unwrap();
    let seqs: Vec<u64> = logged.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
}

#[test]
fn a_copy_damaged_while_the_standby_was_down_is_rebuilt_from_the_journal() {
    let mut sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("app.db");
    let copy = sb.mirror().join("app.db");
    App::start(&db, 400, "0").finish();
    sb.ok(&["shadow", "push", "--sqlite", db.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    let log = work.path().join("push.log");
    converge(&sb, &db, &copy, &log);
    // The applier notes its progress at most every 100 ms: killed before, the standby would
    // start from an older record, remove the copy and apply again (not what this is about).
    let head = sb.status()["head"].as_u64().unwrap();
    let t = Instant::now();
    while std::fs::read_to_string(sb.journal().join("applied")).ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(head) {
        assert!(t.elapsed() < Duration::from_secs(30), "record {head} was never noted as applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Down, and something else written over the copy: SQLite cannot read it.
    sb.server.kill9();
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", copy.display()));
    }
    std::fs::write(&copy, vec![0x5a; 64 << 10]).unwrap();
    sb.server.spawn();
    assert_eq!(sb.status()["head"].as_u64(), Some(head), "the journal lost records");
    // The standby starts, rebuilds the copy from its journal, and takes new commits.
    converge(&sb, &db, &copy, &log);
    assert_eq!(integrity(&copy), "ok");
    assert!(sb.server.log().contains("rebuilding the database from the journal"), "{}", sb.server.log());
    App::start(&db, 50, "0").finish();
    sb.ok(&["shadow", "push", "--sqlite", db.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    converge(&sb, &db, &copy, &log);
    assert!(sb.status()["apply_error"].is_null(), "{}", sb.status());
}

/// A database over 1 GiB (SQLite's lock-byte page lies inside it; its base goes in 18
/// records), 500 MiB of it in a log the application keeps from being checkpointed: a pusher
/// killed halfway through the base leaves the copy untouched and the next one finishes it; the
/// pusher's memory stays bounded by a record's, not the database's or the log's size; the
/// application's commits, written past the lock-byte page, reach the copy; the head restores
/// and passes `integrity_check`. The primary's files live in /dev/shm where there is one.
#[test]
fn a_database_over_1_gib_is_shadowed_in_bounded_memory_and_restores() {
    let sb = Standby::start();
    let ram = tempfile::tempdir_in(if Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" }).unwrap();
    let log = ram.path().join("push.log");
    let db = ram.path().join("big.db");
    // 1,100 rows of 1 MiB: overflow pages of zeros, each distinct by its next-page pointer;
    // the first 600 in the file, the last 500 in the log, which stays while the connection
    // that wrote it is open (closing the last one would checkpoint it).
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3, sys\ndb = sqlite3.connect(sys.argv[1], isolation_level=None)\ndb.execute('PRAGMA journal_mode=WAL')\ndb.execute('PRAGMA wal_autocheckpoint=0')\ndb.execute('CREATE TABLE big (id INTEGER PRIMARY KEY, b BLOB)')\nfor n in (600, 500):\n    db.execute('BEGIN')\n    for i in range(n):\n        db.execute('INSERT INTO big (b) VALUES (zeroblob(1048576))')\n    db.execute('COMMIT')\n    if n == 600: db.execute('PRAGMA wal_checkpoint(TRUNCATE)')\nprint('ready', flush=True)\nsys.stdin.read()")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().unwrap()), &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let wal = ram.path().join("big.db-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 500 << 20 && std::fs::metadata(&db).unwrap().len() < 700 << 20);
    let copy = sb.mirror().join("big.db");
    let count = |p: &Path| -> Option<i64> { Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?.query_row("SELECT count(*) FROM big", [], |r| r.get(0)).ok() };
    // The pusher killed while the base is on its way (64 MiB of pages a record): the standby
    // applies none of it, and the next pusher finishes it.
    let parts = (1100u64 << 20).div_ceil(64 << 20);
    let mut push = pusher(&sb, &db, &sb.url(), &log);
    let t = Instant::now();
    while sb.status()["head"].as_u64().unwrap_or(0) < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "no part of the base arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(&mut push);
    let head = sb.status()["head"].as_u64().unwrap();
    assert!(head < parts, "the base was whole ({head} records) before the pusher was killed");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!((sb.status()["applied"].as_u64(), count(&copy)), (Some(0), None), "half a base reached the copy");
    let part = ram.path().join("part.db");
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--sqlite", "--txid", "1", "--target", part.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("not a transaction") && !part.exists(), "{}", stderr(&o));
    let mut push = pusher(&sb, &db, &sb.url(), &log);
    converge_by(&sb, &db, &copy, &log, count);
    // The application's tables and rows go after the 1,100 MiB: past the lock-byte page.
    App::start(&db, 300, "0.001").finish();
    converge(&sb, &db, &copy, &log);
    let status = std::fs::read_to_string(format!("/proc/{}/status", push.id())).unwrap();
    let peak_kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap();
    eprintln!("pusher of a 1.1 GiB database: peak RSS {} MiB", peak_kib >> 10);
    assert!(peak_kib < 512 << 10, "the pusher of a 1.1 GiB database peaked at {peak_kib} KiB");
    kill9(&mut push);
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    assert_eq!(integrity(&copy), "ok");
    let target = ram.path().join("restored.db");
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--sqlite", "--target", target.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(integrity(&target), "ok");
    assert!(std::fs::metadata(&target).unwrap().len() > 1 << 30);
    assert_eq!((rows(&target), count(&target)), (rows(&db), Some(1100)));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
