//! PostgreSQL: a real PostgreSQL 15 (Debian's, which `scripts/test-deps` installs) archives its
//! WAL through `kura pg wal-push`, takes a base backup through `kura pg backup`, and a
//! point-in-time restore started on `kura pg restore`'s data directory holds exactly the rows
//! committed before the target time. PostgreSQL refuses to run as root, so under root every
//! PostgreSQL and kura process runs as the `postgres` user.

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

/// A scratch directory owned by the user PostgreSQL runs as, a repository in it, and helpers
/// that run programs as that user.
struct Site {
    dir: tempfile::TempDir,
    repo: PathBuf,
    pwfile: PathBuf,
    bin: PathBuf,
    sock: PathBuf,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let s = Site { repo: dir.path().join("repo"), pwfile: dir.path().join("pw"), bin: pg_bin(), sock: dir.path().join("sock"), dir };
        std::fs::create_dir(&s.sock).unwrap();
        std::fs::write(&s.pwfile, "pg-test-pass").unwrap();
        std::fs::set_permissions(&s.pwfile, std::fs::Permissions::from_mode(0o600)).unwrap();
        if is_root() {
            let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(s.dir.path()).status().unwrap();
            assert!(st.success());
        }
        let o = s.kura(&["init"]);
        assert!(o.status.success(), "{}", stderr(&o));
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
        c.env("PGHOST", &self.sock).env("PGUSER", "postgres").env("TZ", "UTC");
        c
    }

    fn kura(&self, args: &[&str]) -> Output {
        let mut a = vec!["-r", self.repo.to_str().unwrap(), "--password-file", self.pwfile.to_str().unwrap()];
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

    fn tool(&self, name: &str, args: &[&str]) -> String {
        let o = self.as_pg(&self.bin.join(name), args).output().unwrap();
        assert!(o.status.success(), "{name} {args:?} failed: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// A PostgreSQL server on a data directory, stopped (immediately: a test is over) when dropped.
struct Server<'a> {
    site: &'a Site,
    data: PathBuf,
    port: u16,
}

impl<'a> Server<'a> {
    fn start(site: &'a Site, data: &Path, extra: &[&str]) -> Server<'a> {
        let port = free_port();
        let log = data.with_extension("log");
        let mut opts = format!("-p {port} -c listen_addresses='' -c unix_socket_directories='{}'", site.sock.display());
        for e in extra {
            opts.push_str(&format!(" -c {e}"));
        }
        site.tool("pg_ctl", &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-o", &opts, "-w", "-t", "120", "start"]);
        Server { site, data: data.to_path_buf(), port }
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

impl Drop for Server<'_> {
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
fn archive_now(s: &Server) -> String {
    let seg = s.sql("SELECT pg_walfile_name(pg_switch_wal())");
    wait_for(&format!("archiving of {seg}"), Duration::from_secs(60), || {
        s.sql(&format!("SELECT coalesce(last_archived_wal >= '{seg}', false) FROM pg_stat_archiver")) == "t"
    });
    seg
}

#[test]
fn wal_archive_base_backup_and_point_in_time_restore_with_a_real_postgresql() {
    let site = Site::new();
    let data = site.path("data");
    site.tool("initdb", &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]);
    let archive = format!("{BIN} -q -r {} --password-file {} pg wal-push %p", site.repo.display(), site.pwfile.display());
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
    std::io::Write::write_all(&mut conf, format!("wal_level = replica\narchive_mode = on\narchive_command = '{archive}'\n").as_bytes()).unwrap();
    drop(conf);
    let pg = Server::start(&site, &data, &[]);
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
    let o = site.as_pg(Path::new(BIN), &["-r", site.repo.to_str().unwrap(), "--password-file", badpw.to_str().unwrap(), "pg", "wal-fetch", &last, missing.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(128 + 12), "{}", stderr(&o));
    assert!(!missing.exists());

    // Before the first base backup there is nothing to restore from.
    let early = site.path("early");
    let o = site.kura(&["pg", "restore", "--target", early.to_str().unwrap(), "--at", "2000-01-01T00:00:00Z"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no base backup"), "{}", stderr(&o));

    // Point-in-time restore to t1: the first two batches, none of what came after.
    let restored = site.path("restored");
    let out = site.kura_ok(&["pg", "restore", "--target", restored.to_str().unwrap(), "--at", &t1]);
    assert!(out.contains("replays the archive to"), "{out}");
    assert!(restored.join("recovery.signal").is_file());
    let pg2 = Server::start(&site, &restored, &["archive_mode=off"]);
    wait_for("the end of recovery", Duration::from_secs(120), || pg2.sql("SELECT pg_is_in_recovery()") == "f");
    assert_eq!(pg2.sql("SELECT count(*), max(id) FROM orders"), "1500|1500", "{}", pg2.log());
    assert_eq!(pg2.sql("SELECT count(*) FROM orders WHERE note = 'changed after'"), "0");
    assert!(pg2.log().contains("recovery stopping before commit"), "{}", pg2.log());
    drop(pg2);

    // A restore into a directory that holds something is refused and leaves it alone.
    let o = site.kura(&["pg", "restore", "--target", restored.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));

    // Without --at: the whole archive, every row and the last update.
    let full = site.path("full");
    site.kura_ok(&["pg", "restore", "--target", full.to_str().unwrap()]);
    let pg3 = Server::start(&site, &full, &["archive_mode=off"]);
    wait_for("the end of recovery", Duration::from_secs(120), || pg3.sql("SELECT pg_is_in_recovery()") == "f");
    assert_eq!(pg3.sql("SELECT count(*), max(id) FROM orders"), "1700|1700", "{}", pg3.log());
    assert_eq!(pg3.sql("SELECT count(*) FROM orders WHERE note = 'changed after'"), "10");
}
