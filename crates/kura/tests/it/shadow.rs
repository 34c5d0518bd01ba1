//! Directory shadowing with real processes: `kura serve` receiving a stream, `kura shadow push`
//! watching a source tree, both killed with SIGKILL; point-in-time restore of a deleted
//! directory from the journal; what a primary's token can and cannot do.

use crate::server::Server;
use crate::util::{BIN, assert_same_tree, bytes, no_panic, same_tree, sample_tree, stderr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A server receiving stream `www` into `<dir>/mirror`, with a shadow token for it.
pub(crate) struct Standby {
    pub(crate) server: Server,
    pub(crate) token: String,
    mdir: tempfile::TempDir,
    /// The primary's state directory (the epoch it pushes at).
    state: tempfile::TempDir,
}

impl Standby {
    pub(crate) fn start() -> Standby {
        Self::start_with("")
    }

    /// A standby whose stream table also gets `extra` (apply_delay, breaker keys).
    fn start_with(extra: &str) -> Standby {
        Self::start_custom(extra, Vec::new(), Vec::new())
    }

    /// The same, the server with `env` and under `wrapper` (see `Server::start_wrapped`).
    pub(crate) fn start_custom(extra: &str, env: Vec<(String, String)>, wrapper: Vec<String>) -> Standby {
        Self::start_at("127.0.0.1:0", extra, env, wrapper)
    }

    /// The same, listening on `listen`.
    fn start_at(listen: &str, extra: &str, env: Vec<(String, String)>, wrapper: Vec<String>) -> Standby {
        let mdir = tempfile::tempdir().unwrap();
        let server = Server::start_at(listen, &format!("[[stream]]\nname = \"www\"\nmirror = \"{}\"\n{extra}", mdir.path().join("mirror").display()), env, wrapper);
        let token = stream_token(&server, "shadow");
        Standby { server, token, mdir, state: tempfile::tempdir().unwrap() }
    }

    /// A standby whose journal is a real 8 MiB tmpfs in a private mount namespace (the server
    /// runs inside it, so only it sees the mount; its journal is not readable from here). A
    /// watcher there grows the tmpfs to 400 MiB once the returned path exists ("space freed").
    pub(crate) fn on_small_disk(work: &Path) -> (Standby, PathBuf) {
        let jdir = work.join("journal");
        std::fs::create_dir_all(&jdir).unwrap();
        let grow = work.join("grow");
        let script = format!(
            "mount -t tmpfs -o size=8m tmpfs '{j}' || exit 99; \
             (while [ ! -e '{g}' ] && kill -0 $$ 2>/dev/null; do sleep 0.1; done; mount -o remount,size=400m tmpfs '{j}') & \
             exec \"$@\"",
            j = jdir.display(),
            g = grow.display()
        );
        let sb = Standby::start_custom(&format!("journal = \"{}\"\n", jdir.display()), Vec::new(), vec!["unshare".into(), "-rm".into(), "bash".into(), "-c".into(), script, "bash".into()]);
        (sb, grow)
    }

    /// A new token of `role` for the stream, once the running server accepts it.
    pub(crate) fn token(&self, role: &str) -> String {
        stream_token(&self.server, role)
    }

    pub(crate) fn mirror(&self) -> PathBuf {
        self.mdir.path().join("mirror")
    }

    pub(crate) fn journal(&self) -> PathBuf {
        self.server.dir.path().join("state/shadow/www")
    }

    pub(crate) fn url(&self) -> String {
        format!("kura://{}/www", self.server.addr)
    }

    pub(crate) fn kura(&self, token: &str, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).env("KURA_TOKEN", token).env("KURA_FINGERPRINT", &self.server.fingerprint).env("KURA_STATE_DIR", self.state.path()).env_remove("KURA_TOKEN_FILE");
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let o = self.kura(&self.token, args).output().unwrap();
        no_panic(&o);
        o
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "kura {args:?} failed ({:?}): {}", o.status.code(), stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `kura shadow push` watching `src`, in the background.
    fn pusher(&self, src: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        self.kura(&self.token, &["shadow", "push", "--source", src.to_str().unwrap(), "--to", &self.url(), "--rescan-every", "2s"])
            .env("KURA_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["--json", "shadow", "status", "--to", &self.url()])).unwrap()
    }
}

/// Adds a token of `role` for stream `www` and waits until the running server accepts it (it
/// rereads its tokens within a second).
fn stream_token(server: &Server, role: &str) -> String {
    let o = Command::new(BIN).args(["serve", "-c"]).arg(&server.config).args(["token", "add", "--role", role, "--repository", "www"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let token = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let t = Instant::now();
    while server.http().get(format!("https://{}/v1/shadow/www", server.addr)).bearer_auth(&token).send().unwrap().status() != 200 {
        assert!(t.elapsed() < Duration::from_secs(10), "the server never accepted the new token");
        std::thread::sleep(Duration::from_millis(100));
    }
    token
}

/// Waits until the mirror is the same tree as `src` (contents, modes, mtimes, links).
fn converge(sb: &Standby, src: &Path, what: &str) {
    until_same(src, &sb.mirror(), what, || eprintln!("standby: {}", sb.status()));
}

fn copy_tree(from: &Path, to: &Path) {
    let o = Command::new("cp").arg("-a").arg(from).arg(to).output().unwrap();
    assert!(o.status.success());
}

pub(crate) fn kill9(c: &mut Child) {
    c.kill().unwrap();
    c.wait().unwrap();
}

#[test]
fn a_deleted_directory_replayed_on_the_standby_comes_back_bit_exact_from_the_journal() {
    let sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = sample_tree(work.path(), 1, 3 << 20, 30);
    std::fs::create_dir_all(src.join("docs/deep")).unwrap();
    for i in 0..20 {
        std::fs::write(src.join(format!("docs/deep/r{i}.txt")), bytes(2000 + i * 333, 100 + i as u64)).unwrap();
    }
    // The first sync, then the standby's figures.
    let out = sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    let sent: serde_json::Value = serde_json::from_str(&out).unwrap();
    let head = sent["head"].as_u64().unwrap();
    assert!(head > 50, "{sent}");
    sb.ok(&["shadow", "wait", &head.to_string(), "--to", &sb.url()]);
    assert_same_tree(&src, &sb.mirror());
    // A second sync of an unchanged tree sends nothing.
    let again: serde_json::Value = serde_json::from_str(&sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"])).unwrap();
    assert_eq!(again["records"], 0, "{again}");

    // Live: the watcher sends changes as they happen.
    let mut push = sb.pusher(&src, &work.path().join("push.log"));
    std::fs::write(src.join("new.txt"), b"written while shadowed").unwrap();
    std::fs::write(src.join("sub/f3"), bytes(9000, 77)).unwrap();
    std::fs::rename(src.join("sub"), src.join("sub-renamed")).unwrap();
    converge(&sb, &src, "live changes");
    let before_mistake = work.path().join("before");
    copy_tree(&src, &before_mistake);
    std::thread::sleep(Duration::from_millis(1100));
    let moment = jiff::Timestamp::now().to_string();
    std::thread::sleep(Duration::from_millis(1100));
    // The mistake, replayed on the standby as it happens.
    std::fs::remove_dir_all(src.join("docs")).unwrap();
    converge(&sb, &src, "the deletion");
    assert!(!sb.mirror().join("docs").exists());
    kill9(&mut push);

    // The log finds the deletion.
    let log = sb.ok(&["shadow", "log", "--journal", sb.journal().to_str().unwrap(), "--path", "docs"]);
    assert!(log.lines().any(|l| l.contains("delete") && l.ends_with(" docs")), "{log}");
    // The directory as it was, and the whole tree as it was.
    let out = work.path().join("docs-back");
    sb.ok(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--at", &moment, "--path", "docs", "--target", out.to_str().unwrap()]);
    assert_same_tree(&before_mistake.join("docs"), &out.join("docs"));
    let all = work.path().join("all-back");
    sb.ok(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--at", &moment, "--target", all.to_str().unwrap()]);
    assert_same_tree(&before_mistake, &all);
    // A non-empty target is refused, and nothing is written into it.
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--at", &moment, "--target", all.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
}

#[test]
fn the_mirror_converges_after_kill9_of_the_receiver_and_of_the_pusher() {
    let mut sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = sample_tree(work.path(), 2, 1 << 20, 10);
    let log = work.path().join("push.log");
    let mut push = sb.pusher(&src, &log);
    converge(&sb, &src, "initial sync");
    // Receiver killed while changes keep coming.
    for i in 0..30 {
        std::fs::write(src.join(format!("burst{i}")), bytes(5000 + i, i as u64)).unwrap();
        if i == 10 {
            sb.server.restart();
        }
    }
    std::fs::remove_file(src.join("burst3")).unwrap();
    converge(&sb, &src, "after the receiver's restart");
    // Pusher killed; changes made while it is down arrive when it is back.
    kill9(&mut push);
    std::fs::write(src.join("while-down"), b"made while the pusher was dead").unwrap();
    std::fs::remove_dir_all(src.join("sub")).unwrap();
    let mut push = sb.pusher(&src, &log);
    converge(&sb, &src, "after the pusher's restart");
    // Every record the journal holds is there once: the head is the number of records.
    let st = sb.status();
    assert_eq!(st["head"], st["records"], "{st}");
    assert_eq!(st["applied"], st["head"], "{st}");
    kill9(&mut push);
}

#[test]
fn a_primary_token_can_only_append_to_its_own_stream() {
    let sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = sample_tree(work.path(), 3, 100_000, 3);
    sb.ok(&["shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    let before = sb.status();
    let http = sb.server.http();
    let base = format!("https://{}/v1/shadow/www", sb.server.addr);
    // No repository opens with it, and no verb deletes.
    let r = http.get(format!("https://{}/v1/office/snapshots/", sb.server.addr)).bearer_auth(&sb.token).send().unwrap();
    assert_eq!(r.status(), 403);
    for path in ["", "/append", "/manifest"] {
        let r = http.delete(format!("{base}{path}")).bearer_auth(&sb.token).send().unwrap();
        assert_eq!(r.status(), 405, "DELETE {path}");
    }
    // Replaying an old record (rewriting history) is refused; so are paths out of the tree
    // and bytes that do not match their chunk id.
    let batch = |seq: u64, path: &[u8]| {
        let mut node = kura_repo::Node::new(Vec::new(), kura_repo::NodeKind::Dir);
        node.mode = 0o755;
        let m = kura_shadow::record::BatchMeta {
            version: kura_shadow::record::BATCH_VERSION,
            epoch: 1,
            records: vec![kura_shadow::Record { seq, at_ns: 0, op: kura_shadow::Op::Put { path: path.to_vec(), node: Box::new(node) } }],
            chunks: vec![],
        };
        m.encode(&[])
    };
    let post = |token: &str, body: Vec<u8>| http.post(format!("{base}/append")).bearer_auth(token).body(body).send().unwrap().status().as_u16();
    assert_eq!(post(&sb.token, batch(1, b"overwritten")), 409);
    assert_eq!(post(&sb.token, batch(before["head"].as_u64().unwrap() + 1, b"../escape")), 400);
    let fake = {
        let m = kura_shadow::record::BatchMeta {
            version: kura_shadow::record::BATCH_VERSION,
            epoch: 1,
            records: vec![],
            chunks: vec![kura_shadow::record::ChunkMeta { id: kura_repo::Id([9; 32]), raw_len: 3, zlen: 12 }],
        };
        m.encode(&zstd_like(b"abc"))
    };
    assert_eq!(post(&sb.token, fake), 400);
    // Other roles may not push; a backup token of another resource sees nothing.
    assert_eq!(post(&sb.server.admin, batch(1, b"x")), 403, "the admin token opens only office");
    assert_eq!(post(&sb.server.backup, batch(1, b"x")), 403);
    let after = sb.status();
    assert_eq!(before["head"], after["head"]);
    assert_eq!(before["journal_bytes"], after["journal_bytes"]);
    assert!(!sb.mdir.path().join("escape").exists());
}

/// 12 bytes that are a valid zstd frame of `b` or not: the id check fails either way.
fn zstd_like(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v.resize(12, 0);
    v
}

/// Waits for `cond` on the standby's status, at most 30 s.
fn status_until(sb: &Standby, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let st = sb.status();
        if cond(&st) {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_buggy_script_s_rm_rf_is_held_by_the_breaker_then_discarded_or_released() {
    let sb = Standby::start();
    let admin = sb.token("admin");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    for d in 0..4 {
        std::fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for i in 0..60 {
            std::fs::write(src.join(format!("d{d}/f{i}")), bytes(300 + i, (d * 100 + i) as u64)).unwrap();
        }
    }
    let mut push = sb.pusher(&src, &work.path().join("push.log"));
    converge(&sb, &src, "initial sync");
    // Small changes pass: 10 deletions of 240 files.
    for i in 0..10 {
        std::fs::remove_file(src.join(format!("d0/f{i}"))).unwrap();
    }
    converge(&sb, &src, "a few deletions");
    copy_tree(&src, &work.path().join("kept2"));
    let kept = work.path().join("kept2");
    // The buggy maintenance script: rm -rf of everything. The pusher is down meanwhile, so the
    // whole burst reaches the standby at once (live, a burst split across batches lets the
    // part below the limits through: that is the breaker's definition, not what this checks).
    kill9(&mut push);
    for e in std::fs::read_dir(&src).unwrap() {
        std::fs::remove_dir_all(e.unwrap().path()).unwrap();
    }
    let mut push = sb.pusher(&src, &work.path().join("push.log"));
    let st = status_until(&sb, "the breaker holds", |st| !st["held"].is_null());
    assert!(st["held"]["reason"].as_str().unwrap().contains("files would be deleted"), "{st}");
    // The journal has the deletion; the mirror still has every file.
    std::thread::sleep(Duration::from_millis(500));
    assert_same_tree(&kept, &sb.mirror());
    let text = sb.ok(&["shadow", "status", "--to", &sb.url()]);
    assert!(text.contains("HELD"), "{text}");
    // The primary's token cannot release it.
    let o = sb.run(&["shadow", "release", "--to", &sb.url()]);
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    // Discard: the deletions never reach the mirror; new files written afterwards do.
    std::fs::write(src.join("after.txt"), b"written after the mistake").unwrap();
    let o = sb.kura(&admin, &["shadow", "discard", "--to", &sb.url()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    status_until(&sb, "discard applied", |st| st["held"].is_null() && st["applied"] == st["head"] && st["discarded"].as_u64() > Some(0));
    let t = Instant::now();
    while !sb.mirror().join("after.txt").exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "the file written after the discard never arrived");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(sb.mirror().join("after.txt")).unwrap(), b"written after the mistake");
    for d in 0..4 {
        assert_same_tree(&kept.join(format!("d{d}")), &sb.mirror().join(format!("d{d}")));
    }
    // A receiver restart keeps the discarded files (the mirror is reconciled without them).
    kill9(&mut push);
    let mut sb = sb;
    sb.server.restart();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sb.mirror().join("d1/f5").exists(), "the restart's reconcile deleted a discarded file");
    // Release: the next mass deletion is held, then applied as the operator says.
    let mut push = sb.pusher(&src, &work.path().join("push.log"));
    for d in 0..4 {
        std::fs::create_dir_all(src.join(format!("e{d}"))).unwrap();
        for i in 0..60 {
            std::fs::write(src.join(format!("e{d}/g{i}")), bytes(200 + i, i as u64)).unwrap();
        }
    }
    let t = Instant::now();
    while !(0..4).all(|d| sb.mirror().join(format!("e{d}/g59")).exists()) {
        assert!(t.elapsed() < Duration::from_secs(30), "the new files never reached the mirror");
        std::thread::sleep(Duration::from_millis(100));
    }
    kill9(&mut push);
    for d in 0..4 {
        std::fs::remove_dir_all(src.join(format!("e{d}"))).unwrap();
    }
    let mut push = sb.pusher(&src, &work.path().join("push.log"));
    status_until(&sb, "held again", |st| !st["held"].is_null());
    assert!(sb.mirror().join("e2/g7").exists());
    let o = sb.kura(&admin, &["shadow", "release", "--to", &sb.url()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    status_until(&sb, "released", |st| st["held"].is_null() && st["applied"] == st["head"]);
    assert!(!sb.mirror().join("e2").exists());
    kill9(&mut push);
}

#[test]
fn a_delayed_standby_stays_behind_on_purpose_and_wait_waits_for_it() {
    let sb = Standby::start_with("apply_delay = \"5s\"\n");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"first").unwrap();
    let sent: serde_json::Value = serde_json::from_str(&sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"])).unwrap();
    let t = Instant::now();
    // Journalled at once, on the mirror only after the delay.
    let st = sb.status();
    assert_eq!(st["head"], sent["head"], "{st}");
    assert!(!sb.mirror().join("a").exists(), "applied before its delay");
    // wait: a short timeout fails (exit 1), a long one returns once applied.
    let o = sb.run(&["shadow", "wait", &sent["head"].to_string(), "--to", &sb.url(), "--timeout", "500ms"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not applied"), "{}", stderr(&o));
    sb.ok(&["shadow", "wait", &sent["head"].to_string(), "--to", &sb.url(), "--timeout", "30s"]);
    assert!(t.elapsed() >= Duration::from_millis(4000), "applied after {:?}", t.elapsed());
    assert_eq!(std::fs::read(sb.mirror().join("a")).unwrap(), b"first");
}

#[test]
fn the_journal_keeps_its_window_and_forgets_what_is_older() {
    let sb = Standby::start_with("window = \"3s\"\n");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    let push = |sb: &Standby, what: &str| -> u64 {
        let out = sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
        let head = serde_json::from_str::<serde_json::Value>(&out).unwrap()["head"].as_u64().unwrap();
        sb.ok(&["shadow", "wait", &head.to_string(), "--to", &sb.url()]);
        converge(sb, &src, what);
        head
    };
    // Random bytes: a big file whose chunks only the pruned records name.
    std::fs::write(src.join("big"), bytes(3 << 20, 41)).unwrap();
    std::fs::write(src.join("keep"), bytes(5000, 42)).unwrap();
    let first = push(&sb, "first");
    let early = jiff::Timestamp::now().to_string();
    std::thread::sleep(Duration::from_millis(800));
    std::fs::remove_file(src.join("big")).unwrap();
    std::fs::write(src.join("later"), bytes(7000, 43)).unwrap();
    let second = push(&sb, "second");
    let full = sb.status()["journal_bytes"].as_u64().unwrap();
    assert!(full > 3 << 20, "journal {full} bytes");
    // Once the deletion is older than the window it is folded into the base with the records
    // before it (more changes keep arriving, so their segments are closed), and the deleted
    // file's chunks go.
    let t = Instant::now();
    let st = loop {
        std::thread::sleep(Duration::from_millis(700));
        std::fs::write(src.join("tick"), t.elapsed().as_millis().to_string()).unwrap();
        push(&sb, "tick");
        let st = sb.status();
        if st["base_seq"].as_u64().unwrap() >= second {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never pruned: {st}");
    };
    assert_eq!(st["window_secs"], 3, "{st}");
    let now_bytes = st["journal_bytes"].as_u64().unwrap();
    let files: Vec<String> = std::fs::read_dir(sb.journal().join("journal")).unwrap().map(|e| { let e = e.unwrap(); format!("{} {}", e.file_name().to_string_lossy(), e.metadata().unwrap().len()) }).collect();
    assert!(now_bytes + (2 << 20) < full, "the deleted file's chunks stayed: {now_bytes} of {full} bytes: {files:?} {st}");
    // A moment before the window is refused with its reason; the present restores whole.
    let j = sb.journal();
    let o = sb.run(&["shadow", "restore", "--journal", j.to_str().unwrap(), "--at", &early, "--target", work.path().join("old").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("older than the journal's window"), "{}", stderr(&o));
    assert!(!work.path().join("old").exists() || std::fs::read_dir(work.path().join("old")).unwrap().next().is_none());
    let back = work.path().join("back");
    sb.ok(&["shadow", "restore", "--journal", j.to_str().unwrap(), "--target", back.to_str().unwrap()]);
    assert_same_tree(&src, &back);
    // The standby restarts on the pruned journal and goes on.
    let mut sb = sb;
    sb.server.restart();
    std::fs::write(src.join("after-restart"), b"x").unwrap();
    push(&sb, "after restart");
    assert!(sb.status()["base_seq"].as_u64().unwrap() >= first);
}

#[test]
fn failover_fences_the_old_primary_and_rejoin_keeps_its_writes_as_a_branch() {
    let sb = Standby::start();
    let admin = sb.token("admin");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("a");
    std::fs::create_dir_all(src.join("data")).unwrap();
    std::fs::write(src.join("keep.txt"), bytes(5000, 1)).unwrap();
    std::fs::write(src.join("big.bin"), bytes(1 << 20, 2)).unwrap();
    std::fs::write(src.join("data/x.bin"), bytes(200_000, 3)).unwrap();
    std::fs::write(src.join("data/y.txt"), bytes(3000, 4)).unwrap();
    let sent: serde_json::Value = serde_json::from_str(&sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"])).unwrap();
    sb.ok(&["shadow", "wait", &sent["head"].to_string(), "--to", &sb.url()]);
    converge(&sb, &src, "initial sync");
    let a0 = work.path().join("a0");
    copy_tree(&src, &a0);
    std::thread::sleep(Duration::from_millis(1100));
    let before_failover = jiff::Timestamp::now().to_string();
    std::thread::sleep(Duration::from_millis(1100));
    // A live pusher on A, idle: its heartbeat will tell it about the promotion.
    let mut live = sb.pusher(&src, &work.path().join("push.log"));
    status_until(&sb, "the pusher's first contact", |st| st["last_contact_ns"].as_i64().unwrap() > 0);

    // A's shadow token cannot promote; the admin's does, once.
    let o = sb.run(&["shadow", "promote", "--to", &sb.url()]);
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    let o = sb.kura(&admin, &["--json", "shadow", "promote", "--to", &sb.url()]).output().unwrap();
    no_panic(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((p["epoch"].as_u64(), p["promoted_seq"].as_u64(), p["caught_up"].as_bool()), (Some(2), sent["head"].as_u64(), Some(true)), "{p}");
    // `kura promote` is the same command.
    let o = sb.kura(&admin, &["promote", "--to", &sb.url()]).output().unwrap();
    assert_eq!(o.status.code(), Some(14), "{}", stderr(&o));
    assert!(stderr(&o).contains("already the primary"), "{}", stderr(&o));
    let st = sb.status();
    assert_eq!((st["role"].as_str(), st["epoch"].as_u64()), (Some("primary"), Some(2)), "{st}");
    let metrics = sb.server.http().get(format!("https://{}/metrics", sb.server.addr)).bearer_auth(&admin).send().unwrap().text().unwrap();
    assert!(metrics.contains("kura_shadow_primary{stream=\"www\"} 1"), "{metrics}");
    assert!(metrics.contains("kura_shadow_epoch{stream=\"www\"} 2"), "{metrics}");
    // The idle pusher learns from its heartbeat that it is fenced, and stops.
    let t = Instant::now();
    let code = loop {
        if let Some(s) = live.try_wait().unwrap() {
            break s.code();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the fenced pusher kept running");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, Some(15));
    let log = std::fs::read_to_string(work.path().join("push.log")).unwrap();
    assert!(log.contains("fenced"), "{log}");

    // B's users work on the promoted mirror; its journal goes on recording (history continues).
    std::fs::write(sb.mirror().join("on-b.txt"), b"written on B after the failover").unwrap();
    std::fs::write(sb.mirror().join("keep.txt"), bytes(6000, 5)).unwrap();
    let promoted = p["promoted_seq"].as_u64().unwrap();
    let st = status_until(&sb, "the promoted mirror's changes recorded", |st| st["head"].as_u64().unwrap() >= promoted + 2);
    let head_b = st["head"].as_u64().unwrap();

    // A, cut off, kept writing: it is fenced and sends nothing.
    std::fs::write(src.join("only-on-a.txt"), b"written on A after the failover").unwrap();
    std::fs::write(src.join("data/y.txt"), bytes(3500, 6)).unwrap();
    std::fs::remove_file(src.join("data/x.bin")).unwrap();
    let a_then = work.path().join("a-then");
    copy_tree(&src, &a_then);
    let o = sb.run(&["shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    assert_eq!(o.status.code(), Some(15), "{}", stderr(&o));
    assert!(stderr(&o).contains("promoted") && stderr(&o).contains("rejoin"), "{}", stderr(&o));
    // A reinstalled A (its state gone) is refused by the standby itself.
    let fresh = tempfile::tempdir().unwrap();
    let o = sb.kura(&sb.token, &["shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]).env("KURA_STATE_DIR", fresh.path()).output().unwrap();
    no_panic(&o);
    assert_eq!(o.status.code(), Some(15), "{}", stderr(&o));
    assert!(stderr(&o).contains("takes no pushes"), "{}", stderr(&o));
    let st = sb.status();
    assert_eq!(st["head"].as_u64(), Some(head_b), "{st}");
    assert!(!sb.mirror().join("only-on-a.txt").exists());

    // Rejoin: what A wrote is kept as a branch; A becomes a copy of B, fetching only what differs.
    let out = sb.ok(&["--json", "shadow", "rejoin", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--branch", "a-after-failover"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["followed"].is_null() && v["handed_back"].is_null(), "{v}");
    let r = &v["rejoined"];
    assert_eq!(r["branch"], "a-after-failover", "{r}");
    assert!(r["diverged"].as_u64().unwrap() >= 3, "{r}");
    let fetched = r["fetched_bytes"].as_u64().unwrap();
    assert!((200_000..1 << 20).contains(&fetched), "fetched {fetched} bytes: x.bin comes back, big.bin is not fetched again ({r})");
    assert_same_tree(&sb.mirror(), &src);
    // A copy does not push beside the primary.
    let o = sb.run(&["shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    assert_eq!(o.status.code(), Some(15), "{}", stderr(&o));
    assert!(stderr(&o).contains("rejoined"), "{}", stderr(&o));
    // The branch brings A's writes back bit-exact; it is sealed against later appends.
    let back = work.path().join("branch");
    sb.ok(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--branch", "a-after-failover", "--target", back.to_str().unwrap()]);
    assert_same_tree(&a_then, &back);
    let empty = kura_shadow::record::BatchMeta { version: kura_shadow::record::BATCH_VERSION, epoch: 2, records: vec![], chunks: vec![] }.encode(&[]);
    let r = sb.server.http().post(format!("https://{}/v1/shadow/www/branch/a-after-failover/append", sb.server.addr)).bearer_auth(&sb.token).body(empty).send().unwrap();
    assert_eq!(r.status(), 409);
    let st = sb.status();
    assert_eq!(st["branches"][0]["name"], "a-after-failover", "{st}");
    assert_eq!(st["branches"][0]["sealed"], true, "{st}");
    // One history across the failover: before it, and B's newest state.
    let t0 = work.path().join("t0");
    sb.ok(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--at", &before_failover, "--target", t0.to_str().unwrap()]);
    assert_same_tree(&a0, &t0);
    let now = work.path().join("now");
    sb.ok(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--target", now.to_str().unwrap()]);
    assert_same_tree(&sb.mirror(), &now);
    let o = sb.run(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--branch", "nope", "--target", work.path().join("n").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no branch"), "{}", stderr(&o));
    // The standby restarts as the primary: the users' files stay, recording goes on.
    let mut sb = sb;
    sb.server.restart();
    assert_eq!(std::fs::read(sb.mirror().join("on-b.txt")).unwrap(), b"written on B after the failover");
    std::fs::write(sb.mirror().join("after-restart.txt"), b"still recorded").unwrap();
    status_until(&sb, "recording after a restart", |st| st["head"].as_u64().unwrap() > head_b && st["role"] == "primary");
}

/// Waits until `a` and `b` hold the same tree; `explain` says more before a failure.
fn until_same(a: &Path, b: &Path, what: &str, explain: impl Fn()) {
    let t = Instant::now();
    while !same_tree(a, b) {
        if t.elapsed() > Duration::from_secs(30) {
            explain();
            assert_same_tree(a, b);
            panic!("{what}: the trees did not converge");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn failback_a_rejoined_copy_follows_the_promoted_standby_live_and_takes_the_stream_back() {
    let sb = Standby::start();
    let admin = sb.token("admin");
    let work = tempfile::tempdir().unwrap();
    let src = sample_tree(work.path(), 11, 400_000, 30);
    let sent: serde_json::Value = serde_json::from_str(&sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"])).unwrap();
    sb.ok(&["shadow", "wait", &sent["head"].to_string(), "--to", &sb.url()]);
    let o = sb.kura(&admin, &["shadow", "promote", "--to", &sb.url()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Only a promoted stream is handed back, and only by an admin.
    let o = sb.run(&["shadow", "demote", "--to", &sb.url()]);
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));

    // A rejoins and stays a live copy of B.
    let follower = |log: &str| -> Child {
        let log = std::fs::File::create(work.path().join(log)).unwrap();
        sb.kura(&sb.token, &["--json", "shadow", "rejoin", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--follow"])
            .env("KURA_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut a = follower("follow1.log");
    std::fs::write(sb.mirror().join("on-b.txt"), bytes(70_000, 21)).unwrap();
    std::fs::create_dir_all(sb.mirror().join("newdir/deep")).unwrap();
    std::fs::write(sb.mirror().join("newdir/deep/f"), b"deep").unwrap();
    until_same(&sb.mirror(), &src, "B's writes reach the following copy", || ());
    // A copy does not push beside its primary.
    let o = sb.run(&["shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    assert_eq!(o.status.code(), Some(15), "{}", stderr(&o));
    assert!(stderr(&o).contains("rejoined"), "{}", stderr(&o));
    let st: serde_json::Value = serde_json::from_str(&sb.ok(&["--json", "shadow", "status", "--to", &sb.url()])).unwrap();
    assert_eq!(st["this_host"]["rejoined"], true, "{st}");

    // The follower is killed; B goes on; a restarted follower takes up where it was, and what
    // it held is not mistaken for A's own writes (no branch).
    kill9(&mut a);
    std::fs::rename(sb.mirror().join("newdir"), sb.mirror().join("moved")).unwrap();
    std::fs::write(sb.mirror().join("on-b.txt"), bytes(90_000, 22)).unwrap();
    let mut a = follower("follow2.log");
    until_same(&sb.mirror(), &src, "after the follower's restart", || ());

    // Failback: B's last write is recorded by the demotion itself; the follower applies up to
    // it and stops, handing A the stream.
    std::fs::write(sb.mirror().join("last-on-b.txt"), b"the last write on B").unwrap();
    let o = sb.kura(&admin, &["--json", "shadow", "demote", "--to", &sb.url()]).output().unwrap();
    no_panic(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["epoch"].as_u64(), Some(3), "{d}");
    let t = Instant::now();
    while a.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "the follower did not stop at the hand-back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = a.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", std::fs::read_to_string(work.path().join("follow2.log")).unwrap());
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["handed_back"].as_u64(), Some(3), "{f}");
    assert_eq!(f["rejoined"]["diverged"].as_u64(), Some(0), "{f}");
    assert_eq!(f["followed"]["head"], d["demoted_seq"], "{f}");
    assert_same_tree(&sb.mirror(), &src);
    assert_eq!(std::fs::read(src.join("last-on-b.txt")).unwrap(), b"the last write on B");
    let st = sb.status();
    assert_eq!((st["role"].as_str(), st["epoch"].as_u64(), st["demoted_seq"].as_u64()), (Some("standby"), Some(3), d["demoted_seq"].as_u64()), "{st}");
    assert!(st["branches"].as_array().unwrap().is_empty(), "{st}");
    let o = sb.kura(&admin, &["shadow", "demote", "--to", &sb.url()]).output().unwrap();
    assert_eq!(o.status.code(), Some(14), "{}", stderr(&o));
    assert!(stderr(&o).contains("only a promoted stream"), "{}", stderr(&o));

    // A is the primary again: its pushes at epoch 3 reach B's mirror.
    let mut live = sb.pusher(&src, &work.path().join("push.log"));
    std::fs::write(src.join("on-a-again.txt"), bytes(5000, 23)).unwrap();
    std::fs::remove_file(src.join("on-b.txt")).unwrap();
    converge(&sb, &src, "A pushes again after the failback");
    kill9(&mut live);
    // One history across both switches.
    let now = work.path().join("now");
    sb.ok(&["shadow", "restore", "--journal", sb.journal().to_str().unwrap(), "--target", now.to_str().unwrap()]);
    assert_same_tree(&src, &now);
}

#[test]
fn a_generation_of_the_mirror_is_taken_between_two_records() {
    let sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = sample_tree(work.path(), 7, 300_000, 20);
    let push = |sb: &Standby| -> u64 {
        let out = sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["head"].as_u64().unwrap()
    };
    let h1 = push(&sb);
    sb.ok(&["shadow", "wait", &h1.to_string(), "--to", &sb.url()]);
    // While a backup holds the mirror (here: its lock, held as a long backup would), changes
    // are journalled but wait; once it lets go they are applied.
    let lock = std::fs::File::open(sb.journal().join("apply.lock")).unwrap();
    lock.lock_shared().unwrap();
    std::fs::write(src.join("during-backup.txt"), b"arrived while the mirror was read").unwrap();
    let h2 = push(&sb);
    std::thread::sleep(Duration::from_millis(1000));
    let st = sb.status();
    assert_eq!((st["head"].as_u64(), st["applied"].as_u64()), (Some(h2), Some(h1)), "{st}");
    assert!(!sb.mirror().join("during-backup.txt").exists());
    lock.unlock().unwrap();
    sb.ok(&["shadow", "wait", &h2.to_string(), "--to", &sb.url()]);
    assert!(sb.mirror().join("during-backup.txt").exists());
    // The generation: a repository on the standby's side, the mirror as of a record, tagged.
    let e = crate::util::Env::new();
    e.ok(&["backup", "--shadow-stream", sb.journal().to_str().unwrap()]);
    let s = &e.json(&["snapshots"])[0];
    assert_eq!(s["tags"][0], format!("shadow-record={h2}"), "{s}");
    let back = e.path("back");
    e.ok(&["restore", "latest", "--target", back.to_str().unwrap()]);
    assert_same_tree(&src, &crate::util::restored(&back, &sb.mirror()));
    // Not a stream's directory: a clear error, nothing saved.
    let o = e.run(&["backup", "--shadow-stream", work.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("shadow stream"), "{}", stderr(&o));
    assert_eq!(e.json(&["snapshots"]).as_array().unwrap().len(), 1);
}

#[test]
fn verify_finds_content_that_drifted_under_the_same_size_and_mtime_and_repairs_it() {
    let sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = sample_tree(work.path(), 11, 200_000, 30);
    let out = sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    let head = serde_json::from_str::<serde_json::Value>(&out).unwrap()["head"].as_u64().unwrap();
    sb.ok(&["shadow", "wait", &head.to_string(), "--to", &sb.url()]);
    let url = sb.url();
    let verify = |repair: bool| {
        let mut a = vec!["--json", "shadow", "verify", "--source", src.to_str().unwrap(), "--to", &url];
        if repair {
            a.push("--repair");
        }
        let o = sb.run(&a);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", stderr(&o)));
        (o.status.code(), v)
    };
    let (code, v) = verify(false);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!((v["primary"]["drifted"].as_u64(), v["standby"]["drifted"].as_u64()), (Some(0), Some(0)), "{v}");
    assert!(v["standby"]["entries"].as_u64().unwrap() > 30, "{v}");

    // Bit rot on the mirror: other bytes, same size, same mtime (the applier's reconcile and a
    // size/mtime comparison see nothing).
    let victim = std::fs::read_dir(sb.mirror()).unwrap().map(|e| e.unwrap().path()).find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() > 100)).unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let meta = std::fs::metadata(&victim).unwrap();
    let mut b = std::fs::read(&victim).unwrap();
    b[50] ^= 0xff;
    std::fs::write(&victim, &b).unwrap();
    std::fs::File::options().write(true).open(&victim).unwrap().set_modified(meta.modified().unwrap()).unwrap();
    // A change on the primary not sent yet differs too.
    std::fs::write(src.join("unsent.txt"), b"not pushed yet").unwrap();
    let (code, v) = verify(false);
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["standby"]["drift"], serde_json::json!([name]), "{v}");
    assert!(v["primary"]["drift"].as_array().unwrap().iter().any(|p| p == "unsent.txt"), "{v}");
    let (code, v) = verify(true);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!((v["primary"]["repaired"].as_bool(), v["standby"]["repaired"].as_bool()), (Some(true), Some(true)), "{v}");
    converge(&sb, &src, "after the repair");
    assert_eq!(std::fs::read(src.join(&name)).unwrap(), std::fs::read(sb.mirror().join(&name)).unwrap());
    let (code, v) = verify(false);
    assert_eq!(code, Some(0), "{v}");
}

/// A small deterministic random source for storms (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Changes `src` at random until `stop`: new, rewritten and deleted files, renamed files and
/// directories, directories replaced by files and back, and one file appended to all along
/// (rewritten while it is read).
fn storm(src: PathBuf, seed: u64, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut r = Rng(seed | 1);
        let mut n = 0u64;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(src.join("growing.log")).unwrap();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let d = src.join(format!("d{}", r.below(6)));
            let f = d.join(format!("f{}", r.below(20)));
            let _ = match r.below(10) {
                0..=3 => std::fs::create_dir_all(&d).and_then(|_| std::fs::write(&f, bytes(1 + r.below(40_000) as usize, r.next()))),
                4 => std::fs::remove_file(&f),
                5 => std::fs::rename(&f, d.join(format!("f{}", r.below(20)))),
                6 => std::fs::rename(&d, src.join(format!("d{}", r.below(6)))),
                7 => std::fs::remove_dir_all(&d).and_then(|_| std::fs::write(&d, b"a file where a directory was")),
                8 => std::fs::remove_file(&d).and_then(|_| std::fs::create_dir(&d)),
                _ => std::io::Write::write_all(&mut log, &bytes(100 + r.below(3000) as usize, r.next())),
            };
            n += 1;
            if n.is_multiple_of(20) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        n
    })
}

#[test]
fn the_mirror_converges_after_20_kills_at_random_points_of_a_write_storm() {
    let mut sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    let log = work.path().join("push.log");
    let mut push = sb.pusher(&src, &log);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = storm(src.clone(), 0x5eed_2026, stop.clone());
    let mut r = Rng(0xdead_beef);
    let mut moments = Vec::new();
    for i in 0..20 {
        std::thread::sleep(Duration::from_millis(150 + r.below(500)));
        if i % 2 == 0 {
            kill9(&mut push);
            push = sb.pusher(&src, &log);
        } else {
            sb.server.restart();
        }
        moments.push(jiff::Timestamp::now().to_string());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let changes = writer.join().unwrap();
    assert!(changes > 500, "only {changes} changes");
    converge(&sb, &src, "after 20 kills");
    kill9(&mut push);
    // Hash-identical, on both sides of the standby.
    let o = sb.run(&["--json", "shadow", "verify", "--source", src.to_str().unwrap(), "--to", &sb.url()]);
    assert_eq!(o.status.code(), Some(0), "{} {}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    // Every moment of the storm can still be restored, and the last is the tree.
    let j = sb.journal();
    for (i, m) in moments.iter().enumerate() {
        let t = work.path().join(format!("at{i}"));
        sb.ok(&["shadow", "restore", "--journal", j.to_str().unwrap(), "--at", m, "--target", t.to_str().unwrap()]);
    }
    let t = work.path().join("now");
    sb.ok(&["shadow", "restore", "--journal", j.to_str().unwrap(), "--target", t.to_str().unwrap()]);
    assert_same_tree(&src, &t);
    // One record per number: the log counts them all.
    let st = sb.status();
    let logged: Vec<serde_json::Value> = serde_json::from_str(&sb.ok(&["--json", "shadow", "log", "--journal", j.to_str().unwrap()])).unwrap();
    assert_eq!(logged.len() as u64, st["head"].as_u64().unwrap());
    assert!(logged.windows(2).all(|w| w[1]["seq"].as_u64().unwrap() == w[0]["seq"].as_u64().unwrap() + 1));
}

/// A network cable between the primary and the standby (a TCP relay on loopback) that can be
/// pulled: every connection through it is cut at once and new ones are refused until it is
/// plugged back.
pub(crate) struct Cable {
    pub(crate) port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cable {
    pub(crate) fn to(addr: &str) -> Cable {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (u, c, addr) = (up.clone(), conns.clone(), addr.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(server) = std::net::TcpStream::connect(&addr) else { continue };
                let mut list = c.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cable { port, up, conns }
    }

    pub(crate) fn pull(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub(crate) fn plug(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn the_mirror_converges_after_the_network_is_cut_during_a_write_storm() {
    let sb = Standby::start();
    let cable = Cable::to(&sb.server.addr);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    let url = format!("kura://127.0.0.1:{}/www", cable.port);
    let log = std::fs::File::create(work.path().join("push.log")).unwrap();
    let mut push = sb
        .kura(&sb.token, &["shadow", "push", "--source", src.to_str().unwrap(), "--to", &url, "--rescan-every", "2s"])
        .env("KURA_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = storm(src.clone(), 0xc0ffee, stop.clone());
    let mut r = Rng(42);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300 + r.below(700)));
        cable.pull();
        std::thread::sleep(Duration::from_millis(500 + r.below(1500)));
        cable.plug();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    converge(&sb, &src, "after four network cuts");
    assert!(push.try_wait().unwrap().is_none(), "the pusher gave up on a network cut");
    kill9(&mut push);
    let log = std::fs::read_to_string(work.path().join("push.log")).unwrap();
    assert!(log.contains("reconnecting"), "the cuts were never felt: {log}");
    let o = sb.run(&["--json", "shadow", "verify", "--source", src.to_str().unwrap(), "--to", &sb.url()]);
    assert_eq!(o.status.code(), Some(0), "{} {}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}

#[test]
fn a_full_disk_on_the_standby_stops_the_journal_cleanly_and_it_catches_up_once_space_is_freed() {
    let work = tempfile::tempdir().unwrap();
    let (sb, grow) = Standby::on_small_disk(work.path());
    let src = work.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("first.txt"), b"fits").unwrap();
    let out = sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    let before: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 24 MiB of new data does not fit: refused (507), said, nothing half-written counted.
    for i in 0..6 {
        std::fs::write(src.join(format!("big{i}")), bytes(4 << 20, 900 + i)).unwrap();
    }
    let o = sb.run(&["shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    assert_eq!(o.status.code(), Some(14), "{}", stderr(&o));
    assert!(stderr(&o).contains("507"), "{}", stderr(&o));
    let st = sb.status();
    assert!(st["head"].as_u64().unwrap() >= before["head"].as_u64().unwrap(), "{st}");
    assert!(sb.server.log().contains("No space left on device"), "{}", sb.server.log());
    // Space freed: the next push sends the rest, the mirror converges, every moment restores.
    std::fs::write(&grow, b"").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = sb.ok(&["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]);
    let head = serde_json::from_str::<serde_json::Value>(&out).unwrap()["head"].as_u64().unwrap();
    sb.ok(&["shadow", "wait", &head.to_string(), "--to", &sb.url()]);
    converge(&sb, &src, "after space was freed");
    let o = sb.run(&["--json", "shadow", "verify", "--source", src.to_str().unwrap(), "--to", &sb.url()]);
    assert_eq!(o.status.code(), Some(0), "{} {}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}

#[test]
fn three_days_later_the_deleted_directory_comes_back_though_the_primary_s_clock_is_two_hours_off() {
    const DAY: i64 = 86_400;
    let mut sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = sample_tree(work.path(), 5, 100_000, 10);
    std::fs::create_dir_all(src.join("projects/q4")).unwrap();
    for i in 0..10 {
        std::fs::write(src.join(format!("projects/q4/report{i}.txt")), bytes(3000 + i * 100, 500 + i as u64)).unwrap();
    }
    // The primary's clock is two hours behind the standby's.
    let push = |sb: &Standby| {
        let o = sb.kura(&sb.token, &["--json", "shadow", "push", "--source", src.to_str().unwrap(), "--to", &sb.url(), "--once"]).env("KURA_SHADOW_CLOCK_OFFSET", "-7200").output().unwrap();
        no_panic(&o);
        assert!(o.status.success(), "{}", stderr(&o));
        let head = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["head"].as_u64().unwrap();
        sb.ok(&["shadow", "wait", &head.to_string(), "--to", &sb.url()]);
    };
    push(&sb);
    let before = work.path().join("before");
    copy_tree(&src, &before);
    std::thread::sleep(Duration::from_millis(1100));
    let moment = jiff::Timestamp::now().to_string();
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::remove_dir_all(src.join("projects")).unwrap();
    push(&sb);
    assert!(!sb.mirror().join("projects").exists(), "the deletion was replayed");
    // The journal's timeline is the standby's: the primary's skewed time is kept beside it.
    let j = sb.journal();
    let log: Vec<serde_json::Value> = serde_json::from_str(&sb.ok(&["--json", "shadow", "log", "--journal", j.to_str().unwrap(), "--path", "projects"])).unwrap();
    let del = log.iter().find(|e| e["change"].as_str().unwrap().starts_with("delete")).unwrap();
    let skew = (del["received_ns"].as_i64().unwrap() - del["primary_time_ns"].as_i64().unwrap()) / 1_000_000_000;
    assert!((7190..7210).contains(&skew), "{del}");
    // Three days later (the standby's clock moved on; changes keep coming): still restorable.
    sb.server.set_env(vec![("KURA_SHADOW_CLOCK_OFFSET".into(), (3 * DAY).to_string())]);
    sb.server.restart();
    std::fs::write(src.join("monday.txt"), b"three days later").unwrap();
    push(&sb);
    std::thread::sleep(Duration::from_millis(500));
    let back = work.path().join("back");
    sb.ok(&["shadow", "restore", "--journal", j.to_str().unwrap(), "--at", &moment, "--path", "projects", "--target", back.to_str().unwrap()]);
    assert_same_tree(&before.join("projects"), &back.join("projects"));
    assert_eq!(sb.status()["base_seq"], 0, "nothing is older than the 7-day window yet");
    // Eight days later the moment is out of the window: refused with the oldest one there is.
    sb.server.set_env(vec![("KURA_SHADOW_CLOCK_OFFSET".into(), (8 * DAY).to_string())]);
    sb.server.restart();
    std::fs::write(src.join("next-week.txt"), b"eight days later").unwrap();
    push(&sb);
    status_until(&sb, "pruned to the window", |st| st["base_seq"].as_u64().unwrap() > 0);
    let o = sb.run(&["shadow", "restore", "--journal", j.to_str().unwrap(), "--at", &moment, "--target", work.path().join("late").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("older than the journal's window"), "{}", stderr(&o));
    converge(&sb, &src, "after eight days");
}

#[test]
fn a_burst_of_100k_small_files_arrives_whole() {
    let sb = Standby::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    let mut push = sb.pusher(&src, &work.path().join("push.log"));
    status_until(&sb, "the pusher's first contact", |st| st["last_contact_ns"].as_i64().unwrap() > 0);
    // Far more events than inotify queues (16,384 by default): the overflow makes a rescan.
    for d in 0..100 {
        let dir = src.join(format!("mail{d:03}"));
        std::fs::create_dir(&dir).unwrap();
        for i in 0..1000 {
            std::fs::write(dir.join(format!("m{i:04}")), format!("message {d}/{i}\n")).unwrap();
        }
    }
    // Settled: everything received is applied, and nothing new arrives for two seconds.
    let t = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let st = sb.status();
        let (head, applied) = (st["head"].as_u64().unwrap(), st["applied"].as_u64().unwrap());
        if head != last.0 {
            last = (head, Instant::now());
        } else if head == applied && head > 100_000 && last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "never settled: {st}");
        std::thread::sleep(Duration::from_millis(250));
    }
    kill9(&mut push);
    assert_same_tree(&src, &sb.mirror());
    let st = sb.status();
    assert!(st["held"].is_null(), "{st}");
}

/// A test host: a network namespace joined to this one by a veth pair (`ip netns`, as root).
/// Pulling its cable takes the host side of the link down: packets vanish (no reset), as when
/// a switch dies.
struct TestHost {
    name: String,
    veth: String,
    /// The host's address, and ours on the link.
    ip: String,
}

impl TestHost {
    fn ip(args: &[&str]) -> bool {
        Command::new("ip").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    /// `None` when namespaces cannot be made here (not root, or no `ip`).
    fn create() -> Option<TestHost> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = (std::process::id() + N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) % 250 + 1;
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let h = TestHost { name: format!("kura-sb-{tag}"), veth: format!("kv{tag}"), ip: format!("10.213.{n}.2") };
        let peer = format!("kp{tag}");
        let ours = format!("10.213.{n}.1/30");
        let theirs = format!("{}/30", h.ip);
        let ok = Self::ip(&["netns", "add", &h.name])
            && Self::ip(&["link", "add", &h.veth, "type", "veth", "peer", "name", &peer])
            && Self::ip(&["link", "set", &peer, "netns", &h.name])
            && Self::ip(&["addr", "add", &ours, "dev", &h.veth])
            && Self::ip(&["link", "set", &h.veth, "up"])
            && Self::ip(&["netns", "exec", &h.name, "ip", "addr", "add", &theirs, "dev", &peer])
            && Self::ip(&["netns", "exec", &h.name, "ip", "link", "set", &peer, "up"])
            && Self::ip(&["netns", "exec", &h.name, "ip", "link", "set", "lo", "up"]);
        if !ok {
            drop(h);
            return None;
        }
        Some(h)
    }

    /// The command prefix that runs a process on the host.
    fn exec(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name].iter().map(|s| s.to_string()).collect()
    }

    fn cable(&self, up: bool) {
        assert!(Self::ip(&["link", "set", &self.veth, if up { "up" } else { "down" }]));
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Self::ip(&["link", "del", &self.veth]);
        let _ = Self::ip(&["netns", "del", &self.name]);
    }
}

#[test]
fn a_standby_on_its_own_test_host_converges_after_its_link_goes_dark_during_a_write_storm() {
    let Some(host) = TestHost::create() else {
        // Only root makes namespaces; the same storm through a relay that cuts connections
        // runs everywhere (the_mirror_converges_after_the_network_is_cut_during_a_write_storm).
        assert!(!crate::util::is_root(), "root could not make a network namespace");
        eprintln!("no network namespace here (not root): the loopback relay test covers network cuts");
        return;
    };
    let sb = Standby::start_at(&format!("{}:0", host.ip), "", Vec::new(), host.exec());
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    let mut push = sb.pusher(&src, &work.path().join("push.log"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = storm(src.clone(), 0xbadc0de, stop.clone());
    let mut r = Rng(7);
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(400 + r.below(600)));
        host.cable(false);
        // The last cut is long: retransmissions back off beyond it.
        std::thread::sleep(Duration::from_millis(if i == 3 { 6000 } else { 500 + r.below(1500) }));
        host.cable(true);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    converge(&sb, &src, "after the link came back");
    assert!(push.try_wait().unwrap().is_none(), "the pusher gave up on a dark link");
    kill9(&mut push);
    let o = sb.run(&["--json", "shadow", "verify", "--source", src.to_str().unwrap(), "--to", &sb.url()]);
    assert_eq!(o.status.code(), Some(0), "{} {}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}
