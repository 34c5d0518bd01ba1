//! PostgreSQL: a real PostgreSQL 15 (Debian's, which `scripts/test-deps` installs) archives its
//! WAL through `kura pg wal-push`, takes a base backup through `kura pg backup`, and a
//! point-in-time restore started on `kura pg restore`'s data directory holds exactly the rows
//! committed before the target time. PostgreSQL refuses to run as root, so under root every
//! PostgreSQL and kura process runs as the `postgres` user.

use crate::server::Server;
use crate::util::{BIN, is_root, no_panic, stderr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn pg_bin() -> PathBuf {
    let p = std::env::var_os("KURA_PG_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    assert!(p.join("initdb").is_file(), "no PostgreSQL at {}: run ./scripts/test, which installs postgresql-15", p.display());
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A scratch directory owned by the user PostgreSQL runs as, the repository's options for
/// PostgreSQL's archiving (`push`) and for restores (`read`), and helpers that run programs as
/// that user.
struct Site {
    dir: tempfile::TempDir,
    push: Vec<String>,
    read: Vec<String>,
    bin: PathBuf,
    sock: PathBuf,
}

impl Site {
    /// A local repository in the scratch directory.
    fn local() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let pw = Self::secret(dir.path(), "pw", "pg-test-pass");
        let creds = vec!["-r".into(), dir.path().join("repo").to_str().unwrap().to_string(), "--password-file".into(), pw];
        let s = Self::at(dir, creds.clone(), creds);
        let o = s.kura(&["init"]);
        assert!(o.status.success(), "{}", stderr(&o));
        s
    }

    /// The repository of a kura server: WAL goes in with its backup token, restores read with
    /// its read token.
    fn remote(server: &Server) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let pw = Self::secret(dir.path(), "pw", "test-pass");
        let creds = |token: &str, name: &str| {
            let f = Self::secret(dir.path(), name, token);
            vec!["-r".into(), server.url(), "--token-file".into(), f, "--fingerprint".into(), server.fingerprint.clone(), "--password-file".into(), pw.clone()]
        };
        let (push, read) = (creds(&server.backup, "backup-token"), creds(&server.read, "read-token"));
        Self::at(dir, push, read)
    }

    fn secret(dir: &Path, name: &str, value: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, value).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn at(dir: tempfile::TempDir, push: Vec<String>, read: Vec<String>) -> Site {
        let s = Site { push, read, bin: pg_bin(), sock: dir.path().join("sock"), dir };
        std::fs::create_dir(&s.sock).unwrap();
        if is_root() {
            let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(s.dir.path()).status().unwrap();
            assert!(st.success());
        }
        s
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `program args` as the postgres user when we are root.
    fn as_pg(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.args(args).env("HOME", self.dir.path()).env_remove("KURA_REPOSITORY").env_remove("KURA_PASSWORD").env_remove("KURA_PASSWORD_FILE");
        c.env_remove("KURA_TOKEN").env_remove("KURA_TOKEN_FILE").env_remove("KURA_FINGERPRINT");
        c.env("PGHOST", &self.sock).env("PGUSER", "postgres").env("TZ", "UTC");
        c
    }

    /// kura with the archiving credentials (a restore uses the read ones).
    fn kura(&self, args: &[&str]) -> Output {
        let creds = if args.first() == Some(&"pg") && matches!(args.get(1), Some(&"restore") | Some(&"wal-fetch")) { &self.read } else { &self.push };
        let mut a: Vec<&str> = creds.iter().map(String::as_str).collect();
        a.extend_from_slice(args);
        let o = self.as_pg(Path::new(BIN), &a).output().unwrap();
        no_panic(&o);
        o
    }

    fn kura_ok(&self, args: &[&str]) -> String {
        let o = self.kura(args);
        assert!(o.status.success(), "kura {args:?} failed ({:?}): {}", o.status.code(), stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A fresh cluster archiving into the repository.
    fn initdb(&self, data: &Path) {
        self.tool("initdb", &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]);
        let archive = format!("{BIN} -q {} pg wal-push %p", self.push.join(" "));
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut conf, format!("wal_level = replica\narchive_mode = on\narchive_command = '{archive}'\n").as_bytes()).unwrap();
    }

    fn tool(&self, name: &str, args: &[&str]) -> String {
        let o = self.as_pg(&self.bin.join(name), args).output().unwrap();
        assert!(o.status.success(), "{name} {args:?} failed: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// A PostgreSQL server on a data directory, stopped (immediately: a test is over) when dropped.
struct Pg<'a> {
    site: &'a Site,
    data: PathBuf,
    port: u16,
}

impl<'a> Pg<'a> {
    fn start(site: &'a Site, data: &Path, extra: &[&str]) -> Pg<'a> {
        let port = free_port();
        let log = data.with_extension("log");
        let mut opts = format!("-p {port} -c listen_addresses='' -c unix_socket_directories='{}'", site.sock.display());
        for e in extra {
            opts.push_str(&format!(" -c {e}"));
        }
        site.tool("pg_ctl", &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-o", &opts, "-w", "-t", "120", "start"]);
        Pg { site, data: data.to_path_buf(), port }
    }

    fn sql(&self, q: &str) -> String {
        self.site.tool("psql", &["-p", &self.port.to_string(), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", q]).trim().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }

    fn stop(&self) {
        let _ = self.site.as_pg(&self.site.bin.join("pg_ctl"), &["-D", self.data.to_str().unwrap(), "-m", "fast", "-w", "stop"]).output();
    }
}

impl Drop for Pg<'_> {
    fn drop(&mut self) {
        let _ = self.site.as_pg(&self.site.bin.join("pg_ctl"), &["-D", self.data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]).output();
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Switches to a new WAL segment and waits until the one it closed is archived.
fn archive_now(s: &Pg) -> String {
    let seg = s.sql("SELECT pg_walfile_name(pg_switch_wal())");
    wait_for(&format!("archiving of {seg}"), Duration::from_secs(60), || {
        s.sql(&format!("SELECT coalesce(last_archived_wal >= '{seg}', false) FROM pg_stat_archiver")) == "t"
    });
    seg
}

#[test]
fn wal_archive_base_backup_and_point_in_time_restore_with_a_real_postgresql() {
    let site = Site::local();
    let data = site.path("data");
    site.initdb(&data);
    let pg = Pg::start(&site, &data, &[]);
    pg.sql("CREATE TABLE orders (id int PRIMARY KEY, note text, at timestamptz DEFAULT clock_timestamp())");
    pg.sql("INSERT INTO orders (id, note) SELECT i, repeat('a', 100) FROM generate_series(1, 1000) i");

    // A base backup through pg_basebackup, as the snapshot the restore starts from.
    let out = site.kura_ok(&["pg", "backup", "--", "-p", &pg.port.to_string()]);
    assert!(out.contains("base backup of cluster main saved"), "{out}");
    let staging = site.path(".cache/kura/pg-main-base");
    assert!(staging.parent().unwrap().is_dir() && !staging.exists(), "the staging copy stayed behind");
    pg.sql("INSERT INTO orders (id, note) SELECT i, 'second' FROM generate_series(1001, 1500) i");
    std::thread::sleep(Duration::from_millis(300));
    let t1 = pg.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    std::thread::sleep(Duration::from_millis(300));
    pg.sql("INSERT INTO orders (id, note) SELECT i, 'after' FROM generate_series(1501, 1700) i");
    pg.sql("UPDATE orders SET note = 'changed after' WHERE id <= 10");
    let last = archive_now(&pg);
    pg.stop();

    let snaps = site.kura_ok(&["snapshots", "--tag", "pg-wal"]);
    assert!(snaps.contains("/postgresql/main/wal"), "{snaps}");
    site.kura_ok(&["check", "--read-data"]);

    // The archive's rules: the same file again is success, other bytes under its name are not.
    let redo = site.path("redo");
    std::fs::create_dir(&redo).unwrap();
    if is_root() {
        Command::new("chown").args(["postgres:postgres"]).arg(&redo).status().unwrap();
    }
    let seg = redo.join(&last);
    site.kura_ok(&["pg", "wal-fetch", &last, seg.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 16 << 20);
    let again = site.kura_ok(&["pg", "wal-push", seg.to_str().unwrap()]);
    assert!(again.contains("already archived"), "{again}");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let o = site.kura(&["pg", "wal-push", seg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("other contents"), "{}", stderr(&o));
    // The end of the archive is exit 1 and writes nothing; a failure is above 125, so
    // PostgreSQL stops its recovery instead of promoting early.
    let missing = redo.join("0000000100000000000000FE");
    let o = site.kura(&["pg", "wal-fetch", "0000000100000000000000FE", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!missing.exists());
    let o = site.kura(&["pg", "wal-fetch", "../../etc/passwd", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(129), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a WAL file name"), "{}", stderr(&o));
    let badpw = site.path("badpw");
    std::fs::write(&badpw, "wrong").unwrap();
    let o = site.as_pg(Path::new(BIN), &["-r", &site.read[1], "--password-file", badpw.to_str().unwrap(), "pg", "wal-fetch", &last, missing.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(128 + 12), "{}", stderr(&o));
    assert!(!missing.exists());

    // Before the first base backup there is nothing to restore from.
    let early = site.path("early");
    let o = site.kura(&["pg", "restore", "--target", early.to_str().unwrap(), "--at", "2000-01-01T00:00:00Z"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no base backup"), "{}", stderr(&o));

    // Point-in-time restore to t1: the first two batches, none of what came after.
    let restored = site.path("restored");
    let out = site.kura_ok(&["pg", "restore", "--target", restored.to_str().unwrap(), "--at", &t1, "--no-archive"]);
    assert!(out.contains("replays the archive to"), "{out}");
    assert!(restored.join("recovery.signal").is_file());
    let wal_before = site.kura_ok(&["snapshots", "--tag", "pg-wal"]);
    let pg2 = Pg::start(&site, &restored, &[]);
    wait_for("the end of recovery", Duration::from_secs(120), || pg2.sql("SELECT pg_is_in_recovery()") == "f");
    assert_eq!(pg2.sql("SELECT count(*), max(id) FROM orders"), "1500|1500", "{}", pg2.log());
    assert_eq!(pg2.sql("SELECT count(*) FROM orders WHERE note = 'changed after'"), "0");
    assert!(pg2.log().contains("recovery stopping before commit"), "{}", pg2.log());
    // The trial restore's new timeline stayed out of the archive.
    pg2.sql("SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pg2.sql("SHOW archive_mode"), "off");
    assert_eq!(site.kura_ok(&["snapshots", "--tag", "pg-wal"]), wal_before);
    drop(pg2);

    // A restore into a directory that holds something is refused and leaves it alone.
    let o = site.kura(&["pg", "restore", "--target", restored.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));

    // Without --at: the whole archive, every row and the last update.
    let full = site.path("full");
    site.kura_ok(&["pg", "restore", "--target", full.to_str().unwrap()]);
    let pg3 = Pg::start(&site, &full, &["archive_mode=off"]);
    wait_for("the end of recovery", Duration::from_secs(120), || pg3.sql("SELECT pg_is_in_recovery()") == "f");
    assert_eq!(pg3.sql("SELECT count(*), max(id) FROM orders"), "1700|1700", "{}", pg3.log());
    assert_eq!(pg3.sql("SELECT count(*) FROM orders WHERE note = 'changed after'"), "10");
}

#[test]
fn wal_archived_through_a_kura_server_survives_its_outage_and_restores_with_a_read_token() {
    let mut server = Server::start("");
    server.ok(&server.admin, &["init"]);
    let site = Site::remote(&server);
    let data = site.path("data");
    site.initdb(&data);
    let pg = Pg::start(&site, &data, &[]);
    pg.sql("CREATE TABLE ledger (id int PRIMARY KEY, amount int)");
    pg.sql("INSERT INTO ledger SELECT i, i FROM generate_series(1, 500) i");
    site.kura_ok(&["pg", "backup", "--", "-p", &pg.port.to_string()]);
    archive_now(&pg);

    // The server goes away (kill -9): PostgreSQL keeps the WAL and retries the failed archive
    // command until it is back; nothing is lost.
    server.kill9();
    pg.sql("INSERT INTO ledger SELECT i, i FROM generate_series(501, 900) i");
    let seg = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
    wait_for("a failed archive attempt", Duration::from_secs(60), || pg.sql("SELECT failed_count > 0 FROM pg_stat_archiver") == "t");
    assert_eq!(pg.sql(&format!("SELECT coalesce(last_archived_wal >= '{seg}', false) FROM pg_stat_archiver")), "f");
    server.restart();
    wait_for(&format!("archiving of {seg} after the outage"), Duration::from_secs(120), || {
        pg.sql(&format!("SELECT coalesce(last_archived_wal >= '{seg}', false) FROM pg_stat_archiver")) == "t"
    });
    pg.sql("INSERT INTO ledger SELECT i, i FROM generate_series(901, 1000) i");
    archive_now(&pg);
    pg.stop();

    // The backup token could add WAL but a restore needs only the read token.
    let restored = site.path("restored");
    site.kura_ok(&["pg", "restore", "--target", restored.to_str().unwrap()]);
    let conf = std::fs::read_to_string(restored.join("postgresql.auto.conf")).unwrap();
    assert!(conf.contains("read-token") && !conf.contains(&server.read), "the restore_command names the token file, never the token: {conf}");
    let pg2 = Pg::start(&site, &restored, &["archive_mode=off"]);
    wait_for("the end of recovery", Duration::from_secs(120), || pg2.sql("SELECT pg_is_in_recovery()") == "f");
    assert_eq!(pg2.sql("SELECT count(*), sum(amount) FROM ledger"), "1000|500500", "{}", pg2.log());
    drop(pg2);
    // The read token cannot archive: a new WAL file is refused by the server (exit 13).
    let fake = site.path("0000000100000000000000FD");
    std::fs::write(&fake, vec![7u8; 1 << 16]).unwrap();
    let mut args: Vec<&str> = site.read.iter().map(String::as_str).collect();
    args.extend(["pg", "wal-push", fake.to_str().unwrap()]);
    let o = site.as_pg(Path::new(BIN), &args).output().unwrap();
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
}

#[test]
fn wal_push_killed_at_any_moment_is_retried_to_one_intact_copy() {
    let site = Site::local();
    let wal = site.path("wal");
    std::fs::create_dir(&wal).unwrap();
    let mut segs = Vec::new();
    for (i, delay) in [5u64, 20, 40, 80, 150].into_iter().enumerate() {
        let name = format!("00000001000000000000{:04X}", i + 1);
        let file = wal.join(&name);
        std::fs::write(&file, crate::util::bytes(16 << 20, i as u64 + 1)).unwrap();
        if is_root() {
            Command::new("chown").args(["-R", "postgres:postgres"]).arg(&wal).status().unwrap();
        }
        let mut a: Vec<&str> = site.push.iter().map(String::as_str).collect();
        a.extend(["pg", "wal-push", file.to_str().unwrap()]);
        let mut child = site.as_pg(Path::new(BIN), &a).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        // SIGKILL (the setpriv wrapper execs kura, so this is kura itself).
        let _ = child.kill();
        let _ = child.wait();
        // PostgreSQL runs the command again; it succeeds, once.
        site.kura_ok(&["pg", "wal-push", file.to_str().unwrap()]);
        let again = site.kura_ok(&["pg", "wal-push", file.to_str().unwrap()]);
        assert!(again.contains("already archived"), "{again}");
        segs.push((name, file));
    }
    let out = site.path("out");
    std::fs::create_dir(&out).unwrap();
    if is_root() {
        Command::new("chown").args(["postgres:postgres"]).arg(&out).status().unwrap();
    }
    for (name, file) in &segs {
        let dest = out.join(name);
        site.kura_ok(&["pg", "wal-fetch", name, dest.to_str().unwrap()]);
        assert!(std::fs::read(&dest).unwrap() == std::fs::read(file).unwrap(), "{name} differs");
    }
    let snaps = site.kura_ok(&["snapshots", "--tag", "pg-wal"]);
    assert_eq!(snaps.matches("/postgresql/main/wal").count(), segs.len(), "{snaps}");
    site.kura_ok(&["check", "--read-data"]);
}
