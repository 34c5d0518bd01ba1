//! `kura serve` against real client processes on loopback: append-only tokens, attacks by a
//! backup token (deletes, overwrites, traversal, oversized and truncated bodies, slow clients,
//! forged and future-dated snapshots, token guessing) and kill -9 of the server mid-upload.

use crate::util::{BIN, assert_same_tree, bytes, no_panic, restored, sample_tree, stderr};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running `kura serve` hosting the repository `office`, with one token of each role.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    extra: String,
    pub addr: String,
    pub fingerprint: String,
    pub admin: String,
    pub backup: String,
    pub read: String,
    /// Environment of the server process (S3 credentials).
    env: Vec<(String, String)>,
    /// A command the server runs under (`unshare … bash -c '…; exec "$@"' bash`), if any.
    wrapper: Vec<String>,
    child: Option<Child>,
}

fn token(config: &Path, role: &str) -> String {
    let o = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .args(["token", "add", "--role", role, "--repository", "office", "--label", role])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

impl Server {
    /// Starts a server; `extra` is appended to its configuration (a `[limits]` table).
    pub fn start(extra: &str) -> Server {
        Self::start_with_env(extra, Vec::new())
    }

    /// Starts a server whose process also gets `env`.
    pub fn start_with_env(extra: &str, env: Vec<(String, String)>) -> Server {
        Self::start_wrapped(extra, env, Vec::new())
    }

    /// Starts a server under `wrapper` (a command that ends by running its arguments).
    pub fn start_wrapped(extra: &str, env: Vec<(String, String)>, wrapper: Vec<String>) -> Server {
        Self::start_at("127.0.0.1:0", extra, env, wrapper)
    }

    /// The same, listening on `listen` (an address of a test host's network namespace).
    pub fn start_at(listen: &str, extra: &str, env: Vec<(String, String)>, wrapper: Vec<String>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("server.toml");
        let mut s = Server {
            config,
            extra: extra.to_string(),
            addr: listen.into(),
            fingerprint: String::new(),
            admin: String::new(),
            backup: String::new(),
            read: String::new(),
            env,
            wrapper,
            child: None,
            dir,
        };
        s.write_config();
        s.admin = token(&s.config, "admin");
        s.backup = token(&s.config, "backup");
        s.read = token(&s.config, "read");
        s.spawn();
        s
    }

    fn write_config(&self) {
        let text = format!(
            "listen = \"{}\"\nstate_dir = \"{}\"\n[[repository]]\nname = \"office\"\n{}\n",
            self.addr,
            self.dir.path().join("state").display(),
            self.extra
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .args(["serve", "-c"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let second = lines.next().unwrap().unwrap();
        self.addr = first.rsplit("https://").next().unwrap().trim().to_string();
        self.fingerprint = second.split_whitespace().find(|w| w.starts_with("sha256:")).unwrap().to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Changes the environment of the next start.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// Starts again on the same port with the same state.
    pub fn restart(&mut self) {
        self.kill9();
        self.write_config();
        self.spawn();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.dir.path().join("state/repos/office")
    }

    pub fn url(&self) -> String {
        format!("kura://{}/office", self.addr)
    }

    /// `kura -r kura://…/office` with `token`.
    pub fn kura(&self, token: &str, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-r").arg(self.url()).args(args);
        c.env("KURA_PASSWORD", "test-pass")
            .env("KURA_TOKEN", token)
            .env("KURA_FINGERPRINT", &self.fingerprint)
            .env("HOME", self.dir.path())
            .env_remove("KURA_REPOSITORY")
            .env_remove("KURA_PASSWORD_FILE")
            .env_remove("KURA_TOKEN_FILE");
        c
    }

    pub fn run(&self, token: &str, args: &[&str]) -> Output {
        let o = self.kura(token, args).output().unwrap();
        no_panic(&o);
        o
    }

    pub fn ok(&self, token: &str, args: &[&str]) -> String {
        let o = self.run(token, args);
        assert!(o.status.success(), "kura {args:?} failed ({:?}): {}", o.status.code(), stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// An HTTPS client that trusts exactly this server's certificate. Some tests give the
    /// server a 2 s header timeout, which also closes idle connections: it never reuses one.
    pub fn http(&self) -> reqwest::blocking::Client {
        self.http_pooled(0)
    }

    /// The same, keeping up to `idle` connections open between requests.
    pub fn http_pooled(&self, idle: usize) -> reqwest::blocking::Client {
        kura_store::remote::install_crypto_provider();
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(kura_store::remote::pinned_config(&self.fingerprint).unwrap())
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(idle)
            .build()
            .unwrap()
    }

    pub fn obj_url(&self, kind: &str, name: &str) -> String {
        format!("https://{}/v1/office/{kind}/{name}", self.addr)
    }

    /// A raw TLS connection, for requests no well-behaved client sends.
    pub fn raw(&self) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        kura_store::remote::install_crypto_provider();
        let cfg = Arc::new(kura_store::remote::pinned_config(&self.fingerprint).unwrap());
        let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
        let tcp = std::net::TcpStream::connect(&self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    }

    /// Sends `request` verbatim and returns the status code (0 when the server closed the
    /// connection without answering).
    pub fn raw_status(&self, request: &[u8]) -> u16 {
        let mut s = self.raw();
        if s.write_all(request).and_then(|_| s.flush()).is_err() {
            return 0;
        }
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let text = String::from_utf8_lossy(&resp);
        text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    /// Names of the objects of one kind (the server's own view, with the admin token).
    pub fn names(&self, kind: &str) -> Vec<String> {
        let r = self.http().get(format!("https://{}/v1/office/{kind}/", self.addr)).bearer_auth(&self.admin).send().unwrap();
        assert_eq!(r.status(), 200);
        let v: Vec<serde_json::Value> = r.json_fallback();
        let mut n: Vec<String> = v.iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
        n.sort();
        n
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `Response::json` needs a reqwest feature kura does not build; this is the same thing.
trait JsonFallback {
    fn json_fallback<T: serde::de::DeserializeOwned>(self) -> T;
}

impl JsonFallback for reqwest::blocking::Response {
    fn json_fallback<T: serde::de::DeserializeOwned>(self) -> T {
        serde_json::from_slice(&self.bytes().unwrap()).unwrap()
    }
}

/// A small tree with a multi-megabyte file, small files and a symlink.
fn source(dir: &Path, seed: u64) -> PathBuf {
    sample_tree(dir, seed, 3 << 20, 20)
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// Forged snapshot bytes: a valid public part with `time`, and garbage where the sealed body is.
fn forged_snapshot(time: &str, n: u64) -> Vec<u8> {
    forged_snapshot_of(serde_json::json!({"time": time, "host": "evil", "paths": ["/"], "tags": [], "packs": []}), n)
}

fn forged_snapshot_of(public: serde_json::Value, n: u64) -> Vec<u8> {
    let public = public.to_string();
    let mut v = b"KURASNAP".to_vec();
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&(public.len() as u32).to_le_bytes());
    v.extend_from_slice(public.as_bytes());
    v.extend_from_slice(&bytes(80, n));
    v
}

fn hash_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

#[test]
fn backup_and_restore_through_the_server_are_bit_exact() {
    let s = Server::start("");
    let src = source(s.dir.path(), 1);
    s.ok(&s.admin, &["init"]);
    s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    let target = s.dir.path().join("restore");
    s.ok(&s.read, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
    s.ok(&s.admin, &["check", "--read-data"]);

    // The read token restores but cannot back up; the refusal has its own exit code.
    let o = s.run(&s.read, &["backup", src.to_str().unwrap()]);
    assert_eq!(code(&o), Some(13), "{}", stderr(&o));
    assert!(stderr(&o).contains("read token cannot write"), "{}", stderr(&o));

    // The server recorded its own receive time beside the claimed one.
    let snaps = s.names("snapshots");
    assert_eq!(s.names("receipts"), snaps);
    let r: serde_json::Value =
        s.http().get(s.obj_url("receipts", &snaps[0])).bearer_auth(&s.read).send().unwrap().json_fallback();
    assert!(r["skew_seconds"].as_i64().unwrap().abs() < 600, "{r}");
    assert!(r.get("flag").is_none(), "{r}");

    // A wrong pinned certificate, a bad token and an unknown repository fail clearly.
    let o = s.kura(&s.read, &["snapshots"]).env("KURA_FINGERPRINT", format!("sha256:{}", "00".repeat(32))).output().unwrap();
    assert_eq!(code(&o), Some(14), "{}", stderr(&o));
    assert!(stderr(&o).contains("fingerprint"), "{}", stderr(&o));
    let o = s.run("kura_not-a-token", &["snapshots"]);
    assert_eq!(code(&o), Some(13), "{}", stderr(&o));
    // A token learns nothing about repositories it does not open; one for all of them is told
    // that the server has none of that name.
    let o = s.kura(&s.admin, &["snapshots"]).arg("-r").arg(format!("kura://{}/elsewhere", s.addr)).output().unwrap();
    assert_eq!(code(&o), Some(13), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not open repository \"elsewhere\""), "{}", stderr(&o));
    let all = Command::new(BIN).args(["serve", "-c"]).arg(&s.config).args(["token", "add", "--role", "read", "--repository", "*"]).output().unwrap();
    let all = String::from_utf8(all.stdout).unwrap().trim().to_string();
    std::thread::sleep(Duration::from_millis(1100)); // the server rereads its token list each second
    let o = s.kura(&all, &["snapshots"]).arg("-r").arg(format!("kura://{}/elsewhere", s.addr)).output().unwrap();
    assert_eq!(code(&o), Some(10), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn a_backup_token_can_never_delete_or_overwrite() {
    let s = Server::start("");
    let src = source(s.dir.path(), 2);
    s.ok(&s.admin, &["init"]);
    s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    std::fs::write(src.join("sub/f0"), b"changed").unwrap();
    s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    let http = s.http();
    let before: Vec<_> = ["config", "keys", "data", "index", "snapshots", "receipts"].iter().map(|k| s.names(k)).collect();

    for (kind, names) in ["config", "keys", "data", "index", "snapshots", "receipts"].iter().zip(&before) {
        for token in [&s.backup, &s.read] {
            let r = http.delete(s.obj_url(kind, &names[0])).bearer_auth(token).send().unwrap();
            assert_eq!(r.status(), 403, "DELETE {kind}/{}", names[0]);
        }
    }
    // Overwriting an existing pack with other bytes: the name is not their hash.
    let pack = &before[2][0];
    let r = http.put(s.obj_url("data", pack)).bearer_auth(&s.backup).body(b"other bytes".to_vec()).send().unwrap();
    assert_eq!(r.status(), 400);
    // The same bytes again are harmless (a retry): "exists", nothing changes.
    let original = std::fs::read(s.repo_dir().join("data").join(&pack[..2]).join(pack)).unwrap();
    let r = http.put(s.obj_url("data", pack)).bearer_auth(&s.backup).body(original.clone()).send().unwrap();
    assert_eq!(r.status(), 409);
    // Config, keys, plans, protection marks and receipts are not a backup token's to write.
    let fresh = b"{\"version\":1}".to_vec();
    for (kind, name) in [("config", "config".to_string()), ("keys", hash_hex(&fresh)), ("plans", hash_hex(&fresh)), ("protected", hash_hex(&fresh)), ("receipts", before[4][0].clone())] {
        let r = http.put(s.obj_url(kind, &name)).bearer_auth(&s.backup).body(fresh.clone()).send().unwrap();
        assert_eq!(r.status(), 403, "PUT {kind}/{name}");
    }
    // Not even an admin overwrites an existing object.
    let r = http.put(s.obj_url("config", "config")).bearer_auth(&s.admin).body(fresh.clone()).send().unwrap();
    assert_eq!(r.status(), 409);

    // The commands that delete are refused as a whole.
    for args in [vec!["forget", &before[4][0][..8]], vec!["forget", "--keep-last", "1"], vec!["prune"]] {
        let o = s.run(&s.backup, &args);
        assert_eq!(code(&o), Some(13), "{args:?}: {}", stderr(&o));
    }

    let after: Vec<_> = ["config", "keys", "data", "index", "snapshots", "receipts"].iter().map(|k| s.names(k)).collect();
    assert_eq!(before, after);
    assert_eq!(std::fs::read(s.repo_dir().join("data").join(&pack[..2]).join(pack)).unwrap(), original);
    s.ok(&s.admin, &["check", "--read-data"]);
    let target = s.dir.path().join("restore");
    s.ok(&s.read, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
    assert!(s.log().contains("refused a delete"));
}

#[test]
fn names_that_escape_the_repository_are_refused() {
    let s = Server::start("");
    s.ok(&s.admin, &["init"]);
    let canary = s.dir.path().join("state/canary");
    std::fs::write(&canary, b"keep").unwrap();
    let paths = [
        "/v1/office/data/..%2F..%2Fcanary",
        "/v1/office/data/%2e%2e",
        "/v1/office/snapshots/..",
        "/v1/office/../../canary",
        "/v1/office/snapshots/%2Fetc%2Fpasswd",
        "/v1/..%2F..%2Fcanary/config/config",
        "/v1/office/%2e%2e/canary",
        "//etc/passwd",
        "/v1/office/data//etc/passwd",
        "/v1/office/config/..%2Fcanary",
        "/v1/office/sessions/.tmp-x",
    ];
    for token in [&s.backup, &s.admin] {
        for p in paths {
            for method in ["GET", "PUT", "DELETE"] {
                let req = format!("{method} {p} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
                let status = s.raw_status(req.as_bytes());
                assert!((400..500).contains(&status), "{method} {p}: {status}");
            }
        }
    }
    assert_eq!(std::fs::read(&canary).unwrap(), b"keep");
    assert!(!Path::new("/etc/passwd.tmp").exists());
    s.ok(&s.admin, &["check"]);
}

#[test]
fn oversized_truncated_slow_and_malformed_requests_store_nothing() {
    let s = Server::start("[limits]\nmax_object_size = \"4MiB\"\nidle_timeout = \"2s\"\nheader_timeout = \"2s\"\n");
    let src = source(s.dir.path(), 3);
    s.ok(&s.admin, &["init"]);
    s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    let http = s.http();
    let before: Vec<_> = ["data", "index", "snapshots", "sessions"].iter().map(|k| s.names(k)).collect();

    // Too large: refused on its declared length, before a byte of the body is read.
    let big = bytes(5 << 20, 9);
    let head = format!(
        "PUT /v1/office/data/{} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        hash_hex(&big), s.backup, big.len()
    );
    assert_eq!(s.raw_status(head.as_bytes()), 413);

    // Truncated: the connection closes before the declared length.
    let body = bytes(1000, 10);
    let name = hash_hex(&body);
    let head = format!("PUT /v1/office/data/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 1000\r\n\r\n", s.backup);
    {
        let mut c = s.raw();
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(&body[..10]).unwrap();
        c.flush().unwrap();
        c.conn.send_close_notify();
        let _ = c.flush();
    }
    // Stalled mid-body: cut off after the idle timeout with 408, while others are served.
    let started = Instant::now();
    let mut stalled = s.raw();
    stalled.write_all(head.as_bytes()).unwrap();
    stalled.write_all(&body[..10]).unwrap();
    stalled.flush().unwrap();
    // A slow-loris client that never finishes its headers.
    let mut loris = s.raw();
    loris.write_all(b"GET /v1/office HTTP/1.1\r\nHost: x\r\n").unwrap();
    loris.flush().unwrap();
    s.ok(&s.read, &["snapshots"]);
    let mut resp = Vec::new();
    let _ = stalled.read_to_end(&mut resp);
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&resp));
    let mut buf = [0u8; 256];
    let n = loris.read(&mut buf).unwrap_or(0);
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"), "slow-loris connection not closed");
    assert!(started.elapsed() < Duration::from_secs(25));

    // Malformed objects under correct hash names.
    let junk = bytes(200, 11);
    for (kind, body) in [("snapshots", junk.clone()), ("index", b"".to_vec())] {
        let r = http.put(s.obj_url(kind, &hash_hex(&body))).bearer_auth(&s.backup).body(body.clone()).send().unwrap();
        assert_eq!(r.status(), if kind == "snapshots" { 400 } else { 201 }, "{kind}");
        if kind == "index" {
            // An empty index object is stored (the server cannot read index files); the client
            // reports it as damage and carries on. Remove it so the final comparison holds.
            let r = http.delete(s.obj_url(kind, &hash_hex(&body))).bearer_auth(&s.admin).send().unwrap();
            assert_eq!(r.status(), 204);
        }
    }
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 365);
    for body in [b"{not json".to_vec(), format!("{{\"version\":1,\"heartbeat\":\"{future}\"}}").into_bytes()] {
        let r = http.put(s.obj_url("sessions", "0123abcd")).bearer_auth(&s.backup).body(body).send().unwrap();
        assert_eq!(r.status(), 400);
    }
    let snap = &before[2][0];
    for (range, status) in [
        ("bytes=5-1", 400),
        ("items=0-1", 400),
        ("bytes=100000000-100000001", 416),
        // Ranges that would make the server allocate without bound, or overflow.
        ("bytes=0-9000000000000000000", 400),
        ("bytes=0-18446744073709551615", 400),
        ("bytes=18446744073709551615-18446744073709551615", 416),
    ] {
        let r = http.get(s.obj_url("snapshots", snap)).bearer_auth(&s.read).header("Range", range).send().unwrap();
        assert_eq!(r.status(), status, "{range}");
    }
    let r = http.get(format!("https://{}/v1/office/sideways/x", s.addr)).bearer_auth(&s.read).send().unwrap();
    assert_eq!(r.status(), 404);

    let after: Vec<_> = ["data", "index", "snapshots", "sessions"].iter().map(|k| s.names(k)).collect();
    assert_eq!(before, after);
    s.ok(&s.admin, &["check", "--read-data"]);
    let target = s.dir.path().join("restore");
    s.ok(&s.read, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn future_dated_and_forged_snapshots_are_flagged_and_harm_nothing() {
    let s = Server::start("");
    let src = source(s.dir.path(), 4);
    s.ok(&s.admin, &["init"]);
    s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    let legit = s.names("snapshots");
    let year_ahead = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 365)).to_string();
    s.ok(&s.backup, &["backup", "--time", &year_ahead, src.to_str().unwrap()]);
    let all = s.names("snapshots");
    let future_id = all.iter().find(|n| !legit.contains(n)).unwrap().clone();
    let http = s.http();
    let r: serde_json::Value = http.get(s.obj_url("receipts", &future_id)).bearer_auth(&s.read).send().unwrap().json_fallback();
    assert!(r["flag"].as_str().unwrap().contains("after the server received it"), "{r}");
    assert!(r["skew_seconds"].as_i64().unwrap() > 364 * 86400);
    assert!(s.log().contains("after the server received it"));
    let listed = s.ok(&s.read, &["snapshots"]);
    let line = listed.lines().find(|l| l.starts_with(&future_id[..8])).unwrap();
    assert!(line.contains("[flagged by the server: claimed time is"), "{listed}");

    // 1,000 forged snapshots spread over past and future days: accepted (the server cannot
    // read bodies), each with its receipt, and none disturbs the real ones.
    for n in 0..1000u64 {
        let t = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(n as i64 * 24 - 12_000);
        let body = forged_snapshot(&t.to_string(), n);
        let r = http.put(s.obj_url("snapshots", &hash_hex(&body))).bearer_auth(&s.backup).body(body).send().unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eq!(s.names("receipts").len(), 1002);
    let o = s.run(&s.read, &["snapshots"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for id in legit.iter().chain([&future_id]) {
        assert!(out.contains(&id[..8]), "{id} missing from:\n{out}");
    }
    let target = s.dir.path().join("restore");
    s.ok(&s.read, &["restore", &legit[0][..8], "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn bad_tokens_are_throttled_and_secrets_never_logged() {
    let s = Server::start("");
    s.ok(&s.admin, &["init"]);
    let http = s.http_pooled(1);
    let url = format!("https://{}/v1/office", s.addr);
    let (mut unauthorized, mut throttled) = (0, 0);
    for i in 0..10_000 {
        let status = http.get(&url).bearer_auth(format!("kura_guess{i:05}")).send().unwrap().status().as_u16();
        match status {
            401 => unauthorized += 1,
            429 => throttled += 1,
            other => panic!("bad token got {other}"),
        }
        if i % 2500 == 0 {
            // Legitimate clients at the same address are still served.
            assert_eq!(http.get(&url).bearer_auth(&s.read).send().unwrap().status(), 200);
        }
    }
    assert!(throttled >= 9_000, "{unauthorized} refused, {throttled} throttled");
    s.ok(&s.read, &["snapshots"]);
    let log = s.log();
    assert!(log.contains("throttling"), "no throttling logged");
    for secret in ["kura_guess00000", "kura_guess09999", &s.admin, &s.backup, &s.read] {
        assert!(!log.contains(secret), "{secret} appears in the log");
    }
    assert!(log.lines().count() < 12_000, "every throttled request was logged as a warning");
}

/// Waits until `cond` holds (polling), failing after `secs`.
fn wait_for(secs: u64, what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_server_killed_during_uploads_exposes_no_half_object_and_clients_retry() {
    let mut s = Server::start("");
    let src = s.dir.path().join("bigsrc");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("f{i}")), bytes(8 << 20, 100 + i)).unwrap();
    }
    s.ok(&s.admin, &["init"]);

    // Killed and back within a second: the backup's retries carry it through.
    let backup = s.kura(&s.backup, &["backup", src.to_str().unwrap()]).env("KURA_RETRIES", "20").stderr(Stdio::piped()).spawn().unwrap();
    let data = s.repo_dir().join("data");
    let uploads = || std::fs::read_dir(&data).unwrap().flatten().any(|d| std::fs::read_dir(d.path()).unwrap().next().is_some());
    wait_for(120, "the first pack upload", uploads);
    s.kill9();
    std::thread::sleep(Duration::from_millis(500));
    s.restart();
    let out = backup.wait_with_output().unwrap();
    assert!(out.status.success(), "backup did not survive the restart: {}", stderr(&out));

    // Killed for good, mid-backup: the client gives up with one clear line and its own exit
    // code (the backup of a changed file is still uploading when the server dies).
    std::fs::write(src.join("f0"), bytes(8 << 20, 999)).unwrap();
    let sessions = s.repo_dir().join("sessions");
    let n_sessions = || std::fs::read_dir(&sessions).map(|d| d.count()).unwrap_or(0);
    let backup = s.kura(&s.backup, &["backup", src.to_str().unwrap()]).env("KURA_RETRIES", "1").stderr(Stdio::piped()).spawn().unwrap();
    wait_for(120, "the backup session", || n_sessions() > 0);
    s.kill9();
    let out = backup.wait_with_output().unwrap();
    no_panic(&out);
    assert_eq!(code(&out), Some(14), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains(&s.addr), "{}", stderr(&out));
    s.restart();

    // Nothing visible is half-written: every pack, index and snapshot is its hash.
    for kind in ["data", "index", "snapshots"] {
        for name in s.names(kind) {
            let r = s.http().get(s.obj_url(kind, &name)).bearer_auth(&s.read).send().unwrap();
            assert_eq!(hash_hex(&r.bytes().unwrap()), name, "{kind}/{name}");
        }
    }
    s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    s.ok(&s.admin, &["check", "--read-data"]);
    let target = s.dir.path().join("restore");
    s.ok(&s.read, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

/// Total bytes of the repository's packs on the server's disk.
fn pack_bytes(s: &Server) -> u64 {
    let mut n = 0;
    for d in std::fs::read_dir(s.repo_dir().join("data")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            n += f.metadata().unwrap().len();
        }
    }
    n
}

#[test]
fn server_retention_uses_receive_times_and_deleted_snapshots_stay_undeletable_for_the_window() {
    let s = Server::start(
        "undelete_window = \"3s\"\n[repository.retention]\nschedule = \"daily 03:00\"\ntimezone = \"UTC\"\nkeep = { daily = 3 }\n\
         [repository.verify]\nschedule = \"daily 04:00\"\nsubset = \"all\"\n",
    );
    s.ok(&s.admin, &["init"]);
    // Five backups of different data, claiming to be from five different days: by their claims
    // keep-daily 3 would keep three; the server received them all today, so it keeps one.
    let src = s.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut claims = Vec::new();
    for day in 0..5u64 {
        std::fs::write(src.join("data.bin"), bytes(600_000, 500 + day)).unwrap();
        let claimed = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * (5 - day as i64));
        s.ok(&s.backup, &["backup", "--time", &claimed.to_string(), src.to_str().unwrap()]);
        claims.push(claimed);
    }
    let http = s.http();
    let job = |name: &str, token: &str| http.post(format!("https://{}/v1/office/jobs/{name}", s.addr)).bearer_auth(token).send().unwrap();
    assert_eq!(job("retention", &s.backup).status(), 403);
    let r = job("retention", &s.admin);
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap().contains("moved 4 to the trash"));
    assert_eq!(s.names("snapshots").len(), 1);
    assert_eq!(s.names("trash").len(), 4);

    // The trash is listed, cannot be emptied by anyone, and its data survives an admin prune.
    let listed = s.ok(&s.read, &["undelete"]);
    assert_eq!(listed.lines().count(), 5, "{listed}");
    let trashed = s.names("trash");
    for token in [&s.admin, &s.backup] {
        assert_eq!(http.delete(s.obj_url("trash", &trashed[0])).bearer_auth(token).send().unwrap().status(), 403);
    }
    s.ok(&s.admin, &["prune"]);
    // The backup token brings one back (it only adds), and it restores bit-exact.
    let oldest = s.ok(&s.read, &["--json", "undelete"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&oldest).unwrap();
    let day0 = claims[0].to_string();
    let first = list.iter().find(|e| e["time"].as_str().unwrap()[..19] == day0[..19]).unwrap()["id"].as_str().unwrap().to_string();
    s.ok(&s.backup, &["undelete", &first[..8]]);
    assert_eq!(s.names("trash").len(), 3);
    let target = s.dir.path().join("restore0");
    s.ok(&s.read, &["restore", &first[..8], "--target", target.to_str().unwrap()]);
    assert_eq!(std::fs::read(restored(&target, &src).join("data.bin")).unwrap(), bytes(600_000, 500));

    // An admin's forget also goes through the trash.
    s.ok(&s.admin, &["forget", &first[..8]]);
    assert_eq!(s.names("trash").len(), 4);

    // After the window the server expires the trash, and only then does prune free the data.
    let before = pack_bytes(&s);
    // What a server killed mid-upload leaves: a temporary file, removed once a day old.
    let stale = s.repo_dir().join("data/00/.tmp-killed");
    std::fs::write(&stale, bytes(1000, 1)).unwrap();
    let day_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(day_ago).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let r = job("expire", &s.admin);
    let text = r.text().unwrap();
    assert!(text.contains("expired 4 trashed") && text.contains("removed 1 stale temporary file(s) (1000 bytes)"), "{text}");
    assert!(!stale.exists());
    assert!(s.names("trash").is_empty());
    // Receipts of snapshots gone for good stay a day (one may belong to an upload in flight).
    assert_eq!(s.names("receipts").len(), 5);
    s.ok(&s.admin, &["prune"]);
    assert!(pack_bytes(&s) < before / 2, "prune freed too little: {} of {before}", pack_bytes(&s));
    s.ok(&s.admin, &["check", "--read-data"]);

    // Keyless verification: clean, then one flipped byte in a pack is named.
    let r = job("verify", &s.admin);
    assert_eq!(r.status(), 200);
    let pack = s.names("data")[0].clone();
    let path = s.repo_dir().join("data").join(&pack[..2]).join(&pack);
    let mut b = std::fs::read(&path).unwrap();
    b[100] ^= 1;
    std::fs::write(&path, b).unwrap();
    let r = job("verify", &s.admin);
    assert_eq!(r.status(), 500);
    assert!(r.text().unwrap().contains(&pack));
    let st: serde_json::Value = http.get(format!("https://{}/v1/office/jobs", s.addr)).bearer_auth(&s.read).send().unwrap().json_fallback();
    assert_eq!(st["verify"]["last_ok"], false);
    assert_eq!(st["retention"]["last_ok"], true);
    assert!(st["retention"]["next"].as_str().unwrap().contains("T03:00:00"), "{st}");

    // The same facts on /metrics for any valid token, with request counts; no secret shown.
    assert_eq!(http.get(format!("https://{}/metrics", s.addr)).send().unwrap().status(), 401);
    let m = http.get(format!("https://{}/metrics", s.addr)).bearer_auth(&s.read).send().unwrap().text().unwrap();
    for want in [
        "kura_repository_snapshots{repository=\"office\"} 1",
        "kura_repository_trash_snapshots{repository=\"office\"} 0",
        "kura_job_last_ok{repository=\"office\",job=\"verify\"} 0",
        "kura_job_last_ok{repository=\"office\",job=\"retention\"} 1",
        "kura_auth_failures_total 1",
    ] {
        assert!(m.contains(want), "{want} missing from:\n{m}");
    }
    assert!(m.lines().any(|l| l.starts_with("kura_http_requests_total{method=\"PUT\",status=\"201\"}")), "{m}");
    let age: f64 = m.lines().find(|l| l.starts_with("kura_repository_newest_snapshot_age_seconds")).unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!((0.0..600.0).contains(&age), "{age}");
    assert!(!m.contains(&s.admin) && !m.contains(&s.backup));
}

#[test]
fn concurrent_backups_through_the_server_survive_an_admin_prune() {
    let s = Server::start("undelete_window = \"0s\"\n");
    s.ok(&s.admin, &["init"]);
    // Snapshots to forget, so that each prune has data to free.
    let old = s.dir.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    for i in 0..3u64 {
        std::fs::write(old.join("f"), bytes(2 << 20, 700 + i)).unwrap();
        s.ok(&s.backup, &["backup", old.to_str().unwrap()]);
    }
    s.ok(&s.admin, &["forget", "--keep-last", "1"]);
    let expire = s.http().post(format!("https://{}/v1/office/jobs/expire", s.addr)).bearer_auth(&s.admin).send().unwrap();
    assert!(expire.text().unwrap().contains("expired 2"));

    let sources: Vec<PathBuf> = (0..3u64)
        .map(|i| {
            let src = s.dir.path().join(format!("client{i}"));
            std::fs::create_dir_all(&src).unwrap();
            std::fs::write(src.join("own.bin"), bytes(6 << 20, 800 + i)).unwrap();
            // Shared between clients: deduplicated across concurrent uploads.
            std::fs::write(src.join("shared.bin"), bytes(3 << 20, 900)).unwrap();
            src
        })
        .collect();
    let mut backups: Vec<Child> = sources
        .iter()
        .map(|src| s.kura(&s.backup, &["backup", src.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    // Admin prunes (with the key) and the server's keyless prune take turns while they run.
    let mut prunes = 0;
    while backups.iter_mut().any(|b| b.try_wait().unwrap().is_none()) {
        if prunes % 2 == 0 {
            let o = s.run(&s.admin, &["prune"]);
            assert!(o.status.success(), "prune failed: {}", stderr(&o));
        } else {
            let r = s.http().post(format!("https://{}/v1/office/jobs/prune", s.addr)).bearer_auth(&s.admin).send().unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().unwrap());
        }
        prunes += 1;
    }
    for b in backups {
        let o = b.wait_with_output().unwrap();
        assert!(o.status.success(), "backup failed beside prune: {}", stderr(&o));
    }
    assert!(prunes >= 1);
    let r = s.http().post(format!("https://{}/v1/office/jobs/prune", s.addr)).bearer_auth(&s.admin).send().unwrap();
    assert_eq!(r.status(), 200);
    s.ok(&s.admin, &["prune"]);
    s.ok(&s.admin, &["check", "--read-data"]);
    let snaps: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&s.read, &["--json", "snapshots"])).unwrap();
    assert_eq!(snaps.len(), 4);
    for src in &sources {
        let id = snaps.iter().find(|v| v["paths"][0].as_str() == src.to_str()).unwrap()["id"].as_str().unwrap().to_string();
        let target = s.dir.path().join(format!("restore-{}", &id[..8]));
        s.ok(&s.read, &["restore", &id[..8], "--target", target.to_str().unwrap()]);
        assert_same_tree(src, &restored(&target, src));
    }
}

#[test]
fn a_backup_token_cannot_drag_snapshots_out_with_forged_repaired_copies() {
    let s = Server::start("[repository.retention]\nschedule = \"daily 03:00\"\nkeep = { tags = [\"important\"], last = 1 }\n");
    s.ok(&s.admin, &["init"]);
    let src = source(s.dir.path(), 6);
    s.ok(&s.backup, &["backup", "--tag", "important", src.to_str().unwrap()]);
    std::fs::write(src.join("sub/f0"), b"second").unwrap();
    s.ok(&s.backup, &["backup", "--tag", "important", src.to_str().unwrap()]);
    let real = s.names("snapshots");
    // Each forged "repaired copy" claims to replace a real snapshot; none is kept by the
    // policy, so if retention believed them, their "originals" would go with them.
    let http = s.http();
    for (n, victim) in real.iter().enumerate() {
        let now = jiff::Timestamp::now().to_string();
        let body = forged_snapshot_of(
            serde_json::json!({"time": now, "host": "evil", "paths": ["/x"], "tags": [], "packs": [], "original": victim}),
            n as u64,
        );
        let r = http.put(s.obj_url("snapshots", &hash_hex(&body))).bearer_auth(&s.backup).body(body).send().unwrap();
        assert_eq!(r.status(), 201);
    }
    let newest = forged_snapshot(&jiff::Timestamp::now().to_string(), 99);
    http.put(s.obj_url("snapshots", &hash_hex(&newest))).bearer_auth(&s.backup).body(newest).send().unwrap();
    let r = http.post(format!("https://{}/v1/office/jobs/retention", s.addr)).bearer_auth(&s.admin).send().unwrap();
    assert_eq!(r.status(), 200);
    let left = s.names("snapshots");
    for id in &real {
        assert!(left.contains(id), "real snapshot {id} was trashed through a forged copy: {}", r.text().unwrap_or_default());
    }
}

#[test]
fn sessions_belong_to_the_token_that_wrote_them_across_restarts() {
    let mut s = Server::start("");
    s.ok(&s.admin, &["init"]);
    let record = |beat: &str| {
        serde_json::json!({"version": 1, "command": "backup", "host": "a", "machine": "", "pid": 1, "pid_start": 1,
            "started": beat, "heartbeat": beat, "plans_seen": []})
        .to_string()
    };
    let now = jiff::Timestamp::now().to_string();
    let old = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24)).to_string();
    let url = s.obj_url("sessions", "0123456789abcdef");
    let put = |s: &Server, token: &str, body: String, replace: bool| {
        let u = if replace { format!("{url}?replace=1") } else { url.clone() };
        s.http().put(u).bearer_auth(token).body(body).send().unwrap().status().as_u16()
    };
    assert_eq!(put(&s, &s.backup, record(&now), false), 201);
    for _ in 0..2 {
        // Another token can neither age it (so prune would think it dead) nor delete it.
        assert_eq!(put(&s, &s.read, record(&old), true), 403);
        assert_eq!(s.http().delete(&url).bearer_auth(&s.read).send().unwrap().status(), 403);
        assert_eq!(put(&s, &s.backup, record(&now), true), 201);
        s.restart();
    }
    // A version the server cannot judge, or one without a heartbeat, is refused.
    for bad in [serde_json::json!({"version": 2}).to_string(), "{\"version\":1}".to_string()] {
        let u = s.obj_url("sessions", "fedcba9876543210");
        assert_eq!(s.http().put(u).bearer_auth(&s.read).body(bad).send().unwrap().status(), 400);
    }
    assert_eq!(s.http().delete(&url).bearer_auth(&s.backup).send().unwrap().status(), 204);
}

#[test]
fn the_servers_keyless_prune_frees_forgotten_data_and_follows_admin_repacks() {
    let s = Server::start("undelete_window = \"0s\"\n[repository.prune]\nschedule = \"weekly sun 03:00\"\n");
    s.ok(&s.admin, &["init"]);
    let http = s.http();
    let job = |name: &str| {
        let r = http.post(format!("https://{}/v1/office/jobs/{name}", s.addr)).bearer_auth(&s.admin).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    // Four backups: each adds a file of its own to a pack that also holds the first one's
    // shared file, so after forgetting the older ones that pack is only partly used.
    let src = s.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("shared.bin"), bytes(2 << 20, 42)).unwrap();
    for i in 0..4u64 {
        std::fs::write(src.join("own.bin"), bytes(3 << 20, 1000 + i)).unwrap();
        s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    }
    let snaps = |s: &Server| -> Vec<String> {
        let v: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&s.read, &["--json", "snapshots"])).unwrap();
        v.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
    };
    let restore_all = |s: &Server, own: &[u64], round: &str| {
        let ids = snaps(s);
        assert_eq!(ids.len(), own.len());
        for (id, seed) in ids.iter().zip(own) {
            let target = s.dir.path().join(format!("restore-{round}-{}", &id[..8]));
            s.ok(&s.read, &["restore", &id[..8], "--target", target.to_str().unwrap()]);
            let out = restored(&target, &src);
            assert_eq!(std::fs::read(out.join("own.bin")).unwrap(), bytes(3 << 20, *seed), "{id}");
            assert_eq!(std::fs::read(out.join("shared.bin")).unwrap(), bytes(2 << 20, 42), "{id}");
        }
    };
    let (code, text) = job("prune");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("deleted 0 of"), "{text}");

    // Forgotten snapshots sit in the trash: their data stays until the trash expires.
    s.ok(&s.admin, &["forget", "--keep-last", "2"]);
    let (_, text) = job("prune");
    assert!(text.contains("2 trashed keep their data; deleted 0 of"), "{text}");
    assert!(job("expire").1.contains("expired 2"));
    let before = pack_bytes(&s);
    let (code, text) = job("prune");
    assert_eq!(code, 200, "{text}");
    // The second backup's own file goes; the first one's shares a pack with the shared file.
    assert!(pack_bytes(&s) <= before - (3 << 20), "keyless prune freed too little ({text})");
    // The plan stays (the index files still name the deleted packs); check with the key
    // accepts it, and every kept snapshot restores bit-exact.
    assert_eq!(s.names("plans").len(), 1);
    s.ok(&s.admin, &["check", "--read-data"]);
    restore_all(&s, &[1002, 1003], "a");

    // An admin prune with the key folds the server's plan into the index and repacks the
    // partly used pack, recording where the shared file's data went.
    s.ok(&s.admin, &["prune", "--max-unused", "0%"]);
    assert!(s.names("plans").is_empty());
    assert_eq!(s.names("lineage").len(), 1);
    // The snapshots' public lists still name the repacked pack; following the lineage, the
    // keyless prune keeps the new one. Without it the shared file would be lost here.
    let (code, text) = job("prune");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("deleted 0 of"), "{text}");
    s.ok(&s.admin, &["check", "--read-data"]);
    restore_all(&s, &[1002, 1003], "b");

    // A new backup deduplicates against the repacked data; the older ones go; all still restores.
    std::fs::write(src.join("own.bin"), bytes(3 << 20, 1004)).unwrap();
    s.ok(&s.backup, &["backup", src.to_str().unwrap()]);
    s.ok(&s.admin, &["forget", "--keep-last", "1"]);
    assert!(job("expire").1.contains("expired 2"));
    let (code, text) = job("prune");
    assert_eq!(code, 200, "{text}");
    s.ok(&s.admin, &["check", "--read-data"]);
    restore_all(&s, &[1004], "c");

    // A backup token can neither plant a snapshot naming a pack the server lacks (which would
    // stop the keyless prune) nor register a prune session (which would hold every prune off);
    // forged snapshots it may upload keep only what they name.
    let ghost = format!("{:064x}", 7);
    let body = forged_snapshot_of(serde_json::json!({"time": jiff::Timestamp::now().to_string(), "host": "evil", "paths": ["/"], "tags": [], "packs": [ghost]}), 1);
    let r = http.put(s.obj_url("snapshots", &hash_hex(&body))).bearer_auth(&s.backup).body(body).send().unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("does not have"));
    let session = serde_json::json!({"version": 1, "command": "prune", "host": "evil", "machine": "", "pid": 1, "pid_start": 0,
        "started": jiff::Timestamp::now().to_string(), "heartbeat": jiff::Timestamp::now().to_string(), "plans_seen": []});
    let r = http.put(s.obj_url("sessions", &format!("{:032x}", 5))).bearer_auth(&s.backup).body(session.to_string()).send().unwrap();
    assert_eq!(r.status(), 403);
    let body = forged_snapshot(&jiff::Timestamp::now().to_string(), 2);
    let forged = hash_hex(&body);
    let r = http.put(s.obj_url("snapshots", &forged)).bearer_auth(&s.backup).body(body).send().unwrap();
    assert_eq!(r.status(), 201);
    let (code, text) = job("prune");
    assert_eq!(code, 200, "{text}");
    // An admin prune refuses to guess what a forged body uses until it is forgotten.
    s.ok(&s.admin, &["forget", &forged[..12]]);

    // A damaged lineage record stops the keyless prune with a message naming it.
    s.ok(&s.admin, &["prune", "--max-unused", "0%"]);
    for name in s.names("lineage") {
        std::fs::write(s.repo_dir().join("lineage").join(&name), b"{}").unwrap();
        let (code, text) = job("prune");
        assert_eq!(code, 500, "{text}");
        assert!(text.contains(&format!("lineage/{name}")) && text.contains("does not match"), "{text}");
    }
}
