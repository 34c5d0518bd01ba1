//! Repositories in an S3 bucket, against a real S3 server process on loopback (s3s-fs, which
//! checks SigV4 signatures and stores objects as plain files): every command, wrong credentials,
//! a missing bucket, an unreachable or killed server, and an object deleted behind kura's back.

use crate::util::{BIN, assert_same_tree, bytes, no_panic, restored, sample_tree, stderr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUCKET: &str = "kura-test";
const ACCESS: &str = "kura";
const SECRET: &str = "kura-secret-key";

/// The s3s-fs binary `scripts/test` installs (a cargo install into the CI cache).
fn s3s_fs() -> PathBuf {
    let p = std::env::var_os("KURA_S3S_FS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kura-ci/s3s-fs-0.14.1/bin/s3s-fs")
    });
    assert!(p.is_file(), "no S3 server at {}: run ./scripts/test, which installs s3s-fs", p.display());
    p
}

/// The bin directory of the moto venv `scripts/test` installs.
fn moto() -> PathBuf {
    let p = std::env::var_os("KURA_MOTO").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kura-ci/moto-5.2.5/bin")
    });
    assert!(p.join("moto_server").is_file(), "no moto at {}: run ./scripts/test, which installs it", p.display());
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running s3s-fs with one bucket, and a scratch directory for the client side.
struct S3 {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl S3 {
    fn start() -> S3 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data").join(BUCKET)).unwrap();
        let mut s = S3 { dir, port: free_port(), child: None };
        s.spawn();
        s
    }

    /// moto instead of s3s-fs: versioning and Object Lock (it accepts any credentials and
    /// keeps objects in memory); no bucket yet.
    fn start_moto() -> S3 {
        let mut s = S3 { dir: tempfile::tempdir().unwrap(), port: free_port(), child: None };
        let log = std::fs::File::create(s.dir.path().join("moto.log")).unwrap();
        let child = Command::new(moto().join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &s.port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        s.child = Some(child);
        s.wait_listening();
        s
    }

    /// Runs the bucket administrator's helper (boto3) and returns what it printed.
    fn admin(&self, args: &[&str]) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/s3admin.py");
        let o = Command::new(moto().join("python")).arg(script).arg(self.endpoint()).args(args).output().unwrap();
        assert!(o.status.success(), "s3admin {args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("s3s.log")).unwrap();
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string(), "--access-key", ACCESS, "--secret-key", SECRET])
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_listening();
    }

    fn wait_listening(&self) {
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "the S3 server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Where the bucket's objects are on disk.
    fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("data").join(BUCKET)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AWS environment that reaches this server with `secret`.
    fn aws_env(&self, secret: &str) -> Vec<(String, String)> {
        [("AWS_ACCESS_KEY_ID", ACCESS), ("AWS_SECRET_ACCESS_KEY", secret), ("AWS_ENDPOINT_URL", &self.endpoint()), ("AWS_REGION", "us-east-1"), ("KURA_RETRIES", "2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn kura_at(&self, repo: &str, secret: &str, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-r").arg(repo).args(args);
        c.env("KURA_PASSWORD", "test-pass")
            .env("HOME", self.dir.path())
            .envs(self.aws_env(secret))
            .env_remove("KURA_REPOSITORY")
            .env_remove("KURA_PASSWORD_FILE")
            .env_remove("AWS_SESSION_TOKEN");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let o = self.kura_at(&format!("s3://{BUCKET}/office"), SECRET, args).output().unwrap();
        no_panic(&o);
        o
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "kura {args:?} failed ({:?}): {}", o.status.code(), stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tree with a file larger than a pack (multipart upload), small files and a symlink.
fn source(dir: &Path, seed: u64) -> PathBuf {
    sample_tree(dir, seed, 20 << 20, 30)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

#[test]
fn every_command_works_on_a_bucket() {
    let s = S3::start();
    let o = s.run(&["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // init found out that s3s-fs honours If-None-Match, and recorded it.
    assert!(stderr(&o).contains("honours conditional writes"), "{}", stderr(&o));
    let probe: serde_json::Value = serde_json::from_slice(&std::fs::read(s.bucket_dir().join("office/store.json")).unwrap()).unwrap();
    assert_eq!(probe["conditional_create"], true);
    // The layout below the prefix is the local one.
    assert!(s.bucket_dir().join("office/config").is_file());
    let again = s.run(&["init"]);
    assert!(!again.status.success() && stderr(&again).contains("already"), "{}", stderr(&again));

    let src = source(s.dir.path(), 1);
    s.ok(&["backup", src.to_str().unwrap()]);
    // Mostly unchanged, one file new: the second backup adds little.
    std::fs::write(src.join("sub").join("new"), bytes(3000, 99)).unwrap();
    s.ok(&["backup", src.to_str().unwrap()]);
    let packs = files_under(&s.bucket_dir().join("office/data"));
    assert!(packs.len() >= 3, "{packs:?}");
    let target = s.dir.path().join("restore");
    s.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
    s.ok(&["check", "--read-data"]);

    // forget and prune delete objects in the bucket; what is left still checks and restores.
    let snaps: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(snaps.len(), 2);
    std::fs::write(src.join("big.bin"), bytes(20 << 20, 7)).unwrap();
    s.ok(&["backup", src.to_str().unwrap()]);
    s.ok(&["forget", "--keep-last", "1", "--prune"]);
    s.ok(&["check", "--read-data"]);
    let target2 = s.dir.path().join("restore2");
    s.ok(&["restore", "latest", "--target", target2.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target2, &src));
    let left: u64 = files_under(&s.bucket_dir().join("office/data")).iter().map(|p| p.metadata().unwrap().len()).sum();
    assert!(left < 30 << 20, "prune left {left} bytes of packs");
}

#[test]
fn wrong_credentials_missing_bucket_and_unreachable_server_are_clear_errors() {
    let mut s = S3::start();
    s.ok(&["init"]);
    let src = source(s.dir.path(), 2);

    let o = s.kura_at(&format!("s3://{BUCKET}/office"), "not-the-secret", &["snapshots"]).output().unwrap();
    no_panic(&o);
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    assert!(stderr(&o).contains("SignatureDoesNotMatch") && stderr(&o).contains("credentials") && !stderr(&o).contains("not-the-secret"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));

    let o = s.kura_at("s3://no-such-bucket/office", SECRET, &["snapshots"]).output().unwrap();
    no_panic(&o);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-bucket") && stderr(&o).contains("does not exist"), "{}", stderr(&o));

    let o = s.kura_at(&format!("s3://{BUCKET}/nothing-here"), SECRET, &["snapshots"]).output().unwrap();
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));

    let o = s.kura_at(&format!("s3://{BUCKET}/office"), SECRET, &["snapshots"]).env_remove("AWS_SECRET_ACCESS_KEY").output().unwrap();
    assert!(stderr(&o).contains("AWS_SECRET_ACCESS_KEY"), "{}", stderr(&o));

    // The server dies: a clear error with its own exit code, after a bounded retry.
    s.kill9();
    let t = Instant::now();
    let o = s.run(&["backup", src.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(14), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(stderr(&o).contains(&format!("s3://{BUCKET}/office")), "{}", stderr(&o));
}

#[test]
fn a_server_killed_mid_backup_leaves_a_repository_the_next_backup_completes() {
    let mut s = S3::start();
    s.ok(&["init"]);
    let src = source(s.dir.path(), 3);
    for i in 0..6u64 {
        std::fs::write(src.join(format!("more{i}.bin")), bytes(12 << 20, 40 + i)).unwrap();
    }
    let child = s.kura_at(&format!("s3://{BUCKET}/office"), SECRET, &["backup", src.to_str().unwrap()]).stderr(Stdio::piped()).spawn().unwrap();
    // Kill the server once some packs have landed.
    let t = Instant::now();
    while files_under(&s.bucket_dir().join("office/data")).len() < 2 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    s.kill9();
    let o = child.wait_with_output().unwrap();
    no_panic(&o);
    assert!(!o.status.success(), "the backup cannot have finished");
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    s.spawn();
    // No snapshot of the killed backup; its packs are reused by the next one.
    let snaps: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["--json", "snapshots"])).unwrap();
    assert!(snaps.is_empty(), "{snaps:?}");
    s.ok(&["backup", src.to_str().unwrap()]);
    s.ok(&["check", "--read-data"]);
    let target = s.dir.path().join("restore");
    s.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn an_object_deleted_behind_kuras_back_is_named_by_check() {
    let s = S3::start();
    s.ok(&["init"]);
    let src = source(s.dir.path(), 4);
    s.ok(&["backup", src.to_str().unwrap()]);
    let snap: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["--json", "snapshots"])).unwrap();
    let id = snap[0]["id"].as_str().unwrap().to_string();
    // The largest pack holds big.bin.
    let mut packs = files_under(&s.bucket_dir().join("office/data"));
    packs.sort_by_key(|p| std::cmp::Reverse(p.metadata().unwrap().len()));
    std::fs::remove_file(&packs[0]).unwrap();
    let o = s.run(&["check"]);
    assert!(!o.status.success());
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    let name = packs[0].file_name().unwrap().to_str().unwrap();
    assert!(out.contains(&name[..8]) && out.contains("missing"), "{out}");
    assert!(out.contains(&id[..8]) && out.contains("big.bin"), "{out}");
}

#[test]
fn kura_serve_hosts_a_repository_whose_storage_is_a_bucket() {
    let s = S3::start();
    let srv = crate::server::Server::start_with_env(&format!("storage = \"s3://{BUCKET}/hosted\"\nundelete_window = \"0s\"\n[repository.verify]\nschedule = \"weekly sun 04:00\"\nsubset = \"all\""), s.aws_env(SECRET));
    srv.ok(&srv.admin, &["init"]);
    assert!(s.bucket_dir().join("hosted/config").is_file(), "the server wrote the repository into the bucket");
    let src = source(s.dir.path(), 5);
    srv.ok(&srv.backup, &["backup", src.to_str().unwrap()]);
    std::fs::write(src.join("sub").join("new"), bytes(5000, 3)).unwrap();
    srv.ok(&srv.backup, &["backup", src.to_str().unwrap()]);
    // Whole packs larger than a read piece come back streamed from the bucket.
    let target = s.dir.path().join("restore");
    srv.ok(&srv.read, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
    srv.ok(&srv.admin, &["check", "--read-data"]);
    let pack = files_under(&s.bucket_dir().join("hosted/data")).into_iter().max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    let name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let got = srv.http().get(srv.obj_url("data", &name)).bearer_auth(&srv.read).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().unwrap().as_ref(), std::fs::read(&pack).unwrap().as_slice());

    // The backup token still cannot delete, whatever the storage.
    let r = srv.http().delete(srv.obj_url("data", &name)).bearer_auth(&srv.backup).send().unwrap();
    assert_eq!(r.status(), 403);
    assert!(pack.is_file());

    // The server's own jobs run on the bucket: verification, the keyless prune after a forget.
    let job = |name: &str| srv.http().post(format!("https://{}/v1/office/jobs/{name}", srv.addr)).bearer_auth(&srv.admin).send().unwrap();
    let v = job("verify");
    assert!(v.status().is_success(), "{}", v.text().unwrap());
    std::fs::write(src.join("big.bin"), bytes(20 << 20, 8)).unwrap();
    srv.ok(&srv.backup, &["backup", src.to_str().unwrap()]);
    let packs = |s: &S3| -> u64 { files_under(&s.bucket_dir().join("hosted/data")).iter().map(|p| p.metadata().unwrap().len()).sum() };
    // The big file replaced: its first version is only in the forgotten snapshots.
    std::fs::write(src.join("big.bin"), bytes(20 << 20, 9)).unwrap();
    srv.ok(&srv.backup, &["backup", src.to_str().unwrap()]);
    srv.ok(&srv.admin, &["forget", "--keep-last", "1"]);
    let e = job("expire").text().unwrap();
    assert!(e.contains("expired 3"), "{e}");
    let before = packs(&s);
    let p = job("prune");
    assert!(p.status().is_success(), "{}", p.text().unwrap());
    assert!(packs(&s) <= before - (20 << 20), "the keyless prune freed less than the replaced file: {before} -> {}", packs(&s));
    let m = srv.http().get(format!("https://{}/metrics", srv.addr)).bearer_auth(&srv.read).send().unwrap().text().unwrap();
    assert!(m.contains("kura_repository_snapshots{repository=\"office\"} 1"), "{m}");
    assert!(m.contains("kura_repository_newest_snapshot_age_seconds{repository=\"office\"}"), "{m}");
    srv.ok(&srv.admin, &["check", "--read-data"]);
    let target2 = s.dir.path().join("restore2");
    srv.ok(&srv.read, &["restore", "latest", "--target", target2.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target2, &src));
}

#[test]
fn object_lock_keeps_generations_whole_and_prune_leaves_locked_objects_alone() {
    let s = S3::start_moto();
    s.admin(&["mkbucket", "locked"]);
    let repo = "s3://locked/office";
    let kura = |args: &[&str]| {
        let o = s.kura_at(repo, SECRET, args).output().unwrap();
        no_panic(&o);
        assert!(o.status.success(), "kura {args:?}: {}", stderr(&o));
        o
    };
    let o = kura(&["init"]);
    assert!(stderr(&o).contains("Object Lock GOVERNANCE for 1 days"), "{}", stderr(&o));
    let ids = || -> Vec<String> {
        let v: Vec<serde_json::Value> = serde_json::from_slice(&kura(&["--json", "snapshots"]).stdout).unwrap();
        v.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
    };
    let src = s.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), bytes(3 << 20, 1)).unwrap();
    kura(&["backup", src.to_str().unwrap()]);
    std::fs::write(src.join("a.bin"), bytes(3 << 20, 2)).unwrap();
    kura(&["backup", src.to_str().unwrap()]);
    let (old, new) = (ids()[0].clone(), ids()[1].clone());

    // The older generation is locked for a day: forget keeps it and says so.
    let o = kura(&["forget", "--keep-last", "1"]);
    assert!(stderr(&o).contains(&format!("snapshots/{old} is locked until")), "{}", stderr(&o));
    assert_eq!(ids(), [old.clone(), new.clone()]);

    // Its lock ends: forget deletes it, every version of it.
    s.admin(&["expire", "locked", &format!("office/snapshots/{old}")]);
    std::thread::sleep(Duration::from_secs(2));
    kura(&["forget", "--keep-last", "1"]);
    assert_eq!(ids(), std::slice::from_ref(&new));
    assert_eq!(s.admin(&["versions", "locked", &format!("office/snapshots/{old}")]), "0");

    // Its data is still locked: prune leaves it alone, reports it, and the rest stays whole.
    let packs_before: u64 = s.admin(&["versions", "locked", "office/data/"]).parse().unwrap();
    let o = kura(&["prune"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("left 2 object(s) that Object Lock keeps") && out.contains("data/"), "{out}");
    assert_eq!(s.admin(&["versions", "locked", "office/data/"]).parse::<u64>().unwrap(), packs_before);
    kura(&["check", "--read-data"]);

    // Every pack's lock ends (the newer snapshot's too, as if its packs were old): the next
    // prune deletes the unused ones for good and locks the used ones again for as long as the
    // snapshot that needs them.
    s.admin(&["expire", "locked", "office/data/"]);
    std::thread::sleep(Duration::from_secs(2));
    let o = kura(&["prune"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!out.contains("that Object Lock keeps"), "{out}");
    let extended: u64 = out.split("extended the retention of ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(extended >= 1, "{out}");
    assert!(s.admin(&["versions", "locked", "office/data/"]).parse::<u64>().unwrap() < packs_before, "{out}");
    let snapshot_lock: u64 = s.admin(&["min_retention", "locked", "office/snapshots/"]).parse().unwrap();
    let pack_lock: u64 = s.admin(&["min_retention", "locked", "office/data/"]).parse().unwrap();
    assert!(pack_lock + 1 >= snapshot_lock, "packs locked until {pack_lock}, their snapshot until {snapshot_lock}");
    kura(&["check", "--read-data"]);
    let target = s.dir.path().join("restore");
    kura(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn slow_downs_cut_uploads_and_stalls_are_retried_and_leave_no_half_object() {
    let s = S3::start();
    let proxy = crate::faultproxy::Proxy::start(s.port);
    let f = &proxy.faults;
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let kura = |args: &[&str], retries: &str| {
        let o = s
            .kura_at(&format!("s3://{BUCKET}/office"), SECRET, args)
            .env("AWS_ENDPOINT_URL", &url)
            .env("KURA_RETRIES", retries)
            .env("KURA_S3_TIMEOUT", "3")
            .output()
            .unwrap();
        no_panic(&o);
        o
    };
    let ok = |args: &[&str]| {
        let o = kura(args, "6");
        assert!(o.status.success(), "kura {args:?} failed ({:?}): {}", o.status.code(), stderr(&o));
    };
    use std::sync::atomic::Ordering::SeqCst;
    ok(&["init"]);
    let src = source(s.dir.path(), 7);

    // The server asks to slow down for a while: backoff, then success.
    f.slow_down.store(3, SeqCst);
    ok(&["backup", src.to_str().unwrap()]);
    assert_eq!(f.answered_503.load(SeqCst), 3);

    // Connections cut halfway through uploads: retried, and no half object stays.
    std::fs::write(src.join("big2.bin"), bytes(20 << 20, 70)).unwrap();
    f.cut_uploads.store(2, SeqCst);
    ok(&["backup", src.to_str().unwrap()]);
    assert_eq!(f.cut.load(SeqCst), 2);

    // A server that stops answering one request: it times out and is sent again.
    std::fs::write(src.join("more.bin"), bytes(2 << 20, 71)).unwrap();
    f.stall.store(1, SeqCst);
    ok(&["backup", src.to_str().unwrap()]);
    assert_eq!(f.stalled.load(SeqCst), 1);

    // Every pack in the bucket is whole: its bytes hash to its name.
    let packs = files_under(&s.bucket_dir().join("office/data"));
    assert!(packs.len() >= 3, "{packs:?}");
    for p in &packs {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(blake3::hash(&std::fs::read(p).unwrap()).to_hex().as_str(), name, "{}", p.display());
    }
    ok(&["check", "--read-data"]);
    let target = s.dir.path().join("restore");
    ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));

    // Slow-downs that do not end: a one-line error with its own exit code after bounded
    // retries; the next run, once the server recovers, completes.
    std::fs::write(src.join("late.bin"), bytes(1 << 20, 72)).unwrap();
    f.slow_down.store(1_000_000, SeqCst);
    let o = kura(&["backup", src.to_str().unwrap()], "1");
    assert_eq!(o.status.code(), Some(14), "{}", stderr(&o));
    assert!(stderr(&o).contains("SlowDown"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    f.slow_down.store(0, SeqCst);
    ok(&["backup", src.to_str().unwrap()]);
    ok(&["check", "--read-data"]);
}

#[test]
fn copy_moves_generations_between_a_directory_and_a_bucket_with_other_keys() {
    let s = S3::start();
    let local = s.dir.path().join("local-repo");
    let at = |repo: &str, pw: &str, args: &[&str]| {
        let o = s.kura_at(repo, SECRET, args).env("KURA_PASSWORD", pw).output().unwrap();
        no_panic(&o);
        o
    };
    let ok = |repo: &str, pw: &str, args: &[&str]| {
        let o = at(repo, pw, args);
        assert!(o.status.success(), "kura {args:?} failed ({:?}): {}", o.status.code(), stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (l, b) = (local.to_str().unwrap(), &format!("s3://{BUCKET}/copy"));
    ok(l, "local-pass", &["init"]);
    ok(b, "bucket-pass", &["init"]);
    let src = source(s.dir.path(), 11);
    ok(l, "local-pass", &["backup", src.to_str().unwrap()]);
    let first: Vec<u8> = std::fs::read(src.join("sub/f0")).unwrap();
    std::fs::write(src.join("sub/f0"), b"second generation").unwrap();
    ok(l, "local-pass", &["backup", "--tag", "two", src.to_str().unwrap()]);

    // Directory to bucket, every snapshot; the source password comes from its own variable.
    let o = at(b, "bucket-pass", &["copy", "--from-repo", l]);
    assert!(!o.status.success(), "copy without the source password must fail");
    assert!(stderr(&o).contains("source"), "{}", stderr(&o));
    let o = s.kura_at(b, SECRET, &["copy", "--from-repo", l]).env("KURA_PASSWORD", "bucket-pass").env("KURA_FROM_PASSWORD", "wrong").output().unwrap();
    assert_eq!(o.status.code(), Some(12), "{}", stderr(&o));
    let copy = |repo: &str, pw: &str, from: &str, from_pw: &str, extra: &[&str]| {
        let mut args = vec!["--json", "copy", "--from-repo", from];
        args.extend_from_slice(extra);
        let o = s.kura_at(repo, SECRET, &args).env("KURA_PASSWORD", pw).env("KURA_FROM_PASSWORD", from_pw).output().unwrap();
        no_panic(&o);
        assert!(o.status.success(), "copy failed: {}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let r = copy(b, "bucket-pass", l, "local-pass", &[]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 2, "{r}");
    assert!(r["bytes_added"].as_u64().unwrap() >= 20 << 20, "{r}");
    // Again: nothing to do.
    let r = copy(b, "bucket-pass", l, "local-pass", &[]);
    assert_eq!((r["copied"].as_array().unwrap().len(), r["skipped"].as_array().unwrap().len()), (0, 2), "{r}");
    ok(b, "bucket-pass", &["check", "--read-data"]);
    let target = s.dir.path().join("from-bucket");
    ok(b, "bucket-pass", &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
    let snaps: Vec<serde_json::Value> = serde_json::from_str(&ok(b, "bucket-pass", &["--json", "snapshots"])).unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[1]["tags"], serde_json::json!(["two"]));

    // Bucket back to a fresh directory, one snapshot by id: the older generation, whole.
    let back = s.dir.path().join("back-repo");
    let bk = back.to_str().unwrap();
    ok(bk, "back-pass", &["init"]);
    let older = snaps[0]["id"].as_str().unwrap()[..8].to_string();
    let r = copy(bk, "back-pass", b, "bucket-pass", &[&older]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "{r}");
    ok(bk, "back-pass", &["check", "--read-data"]);
    let target = s.dir.path().join("from-back");
    ok(bk, "back-pass", &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(std::fs::read(restored(&target, &src).join("sub/f0")).unwrap(), first);
}
