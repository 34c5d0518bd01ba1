//! Restore drills, `kura status` and `kura report` against real repositories and servers: a
//! drill proves a restore and records it, a damaged pack makes it fail, status exits 4 or 5 and
//! tells a command and a webhook, and the report of a three-server topology renders in headless
//! Chromium (the screenshot is kept in target/test-artifacts/).

use crate::pull::{puller, run_job};
use crate::server::Server;
use crate::util::{BIN, Env, sample_tree, stderr};
use std::process::Command;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;

fn code(e: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let o = e.run(args);
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), stderr(&o))
}

/// A one-request HTTP server; returns its URL and a handle yielding the request body.
fn webhook() -> (String, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line.to_ascii_lowercase().starts_with("content-length:") {
                len = line[15..].trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let mut w = s;
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
        String::from_utf8(body).unwrap()
    });
    (url, h)
}

#[test]
fn a_drill_proves_a_restore_and_status_tells_when_anything_is_late_or_failing() {
    let e = Env::new();
    let src = sample_tree(&e.path("data"), 5, 2 << 20, 30);
    let two_hours_ago = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2)).to_string();
    e.ok(&["backup", "--time", &two_hours_ago, src.to_str().unwrap()]);

    // Fresh, but never drilled: a warning (exit 4).
    let (c, out, err) = code(&e, &["status"]);
    assert_eq!(c, Some(4), "{out}{err}");
    assert!(out.contains("never drilled"), "{out}");

    let v = e.json(&["drill", "--files", "5"]);
    let r = &v["record"];
    assert_eq!((r["ok"].as_bool(), r["files"].as_u64(), r["mode"].as_str()), (Some(true), Some(5), Some("sample")), "{v}");
    assert!(r["bytes"].as_u64().unwrap() > 0 && r["seconds"].as_f64().unwrap() > 0.0);
    // The record is in the repository, and names no file.
    let recs: Vec<PathBuf> = std::fs::read_dir(e.repo.join("drills")).unwrap().map(|d| d.unwrap().path()).collect();
    assert_eq!(recs.len(), 1);
    assert!(!std::fs::read_to_string(&recs[0]).unwrap().contains("/sub/"));
    let (c, out, err) = code(&e, &["status"]);
    assert_eq!(c, Some(0), "{out}{err}");

    // Late, then critical, by the limits given; a notify command and a webhook hear of it.
    let (c, out, _) = code(&e, &["status", "--warn", "1h", "--crit", "3h"]);
    assert_eq!(c, Some(4), "{out}");
    let note = e.path("note");
    let (url, hook) = webhook();
    let notify = format!("(echo \"$KURA_STATUS\"; cat) > {}", note.display());
    let (c, out, err) = code(&e, &["status", "--warn", "30m", "--crit", "1h", "--notify", &notify, "--webhook", &url]);
    assert_eq!(c, Some(5), "{out}{err}");
    assert!(err.contains("need attention (crit)"), "{err}");
    let n = std::fs::read_to_string(&note).unwrap();
    assert!(n.starts_with("crit\n") && n.contains("newest snapshot"), "{n}");
    let body: serde_json::Value = serde_json::from_str(&hook.join().unwrap()).unwrap();
    assert_eq!(body["status"], "crit");
    assert_eq!(body["repositories"][0]["level"], "crit");

    // Damage: a whole-snapshot drill fails (exit 5), is recorded, and status turns critical.
    let mut packs = Vec::new();
    for d in std::fs::read_dir(e.repo.join("data")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            packs.push(f.unwrap().path());
        }
    }
    let biggest = packs.iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut b = std::fs::read(biggest).unwrap();
    b[4096] ^= 0xff;
    std::fs::write(biggest, &b).unwrap();
    let (c, out, err) = code(&e, &["drill", "--full"]);
    assert_eq!(c, Some(5), "{out}{err}");
    assert!(err.contains("drill of snapshot") && err.contains("failed"), "{err}");
    assert_eq!(std::fs::read_dir(e.repo.join("drills")).unwrap().count(), 2);
    let (c, out, _) = code(&e, &["status"]);
    assert_eq!(c, Some(5), "{out}");
    assert!(out.contains("the last drill") && out.contains("failed"), "{out}");

    // A server nobody answers at is a critical copy (exit 5, notified), as in a topology.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o = Command::new(BIN)
        .args(["status", "-r", &format!("kura://127.0.0.1:{port}/gone"), "--notify", &notify])
        .env("KURA_TOKEN", "x")
        .env_remove("KURA_REPOSITORY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("cannot read"), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(std::fs::read_to_string(&note).unwrap().starts_with("crit\n"));
}

#[test]
fn status_and_report_of_a_three_server_topology_render_in_chromium() {
    let a = Server::start("");
    a.ok(&a.admin, &["init"]);
    let data = sample_tree(a.dir.path(), 6, 1 << 20, 12);
    a.ok(&a.backup, &["backup", data.to_str().unwrap()]);
    let (c, _cd) = puller(&a.url(), &a.read, &format!("fingerprint = \"{}\"", a.fingerprint));
    let (d, _dd) = puller(&c.url(), &c.read, &format!("fingerprint = \"{}\"\nnewest-of = \"weekly\"", c.fingerprint));
    assert_eq!(run_job(&c, "pull").0, 200);
    assert_eq!(run_job(&d, "pull").0, 200);
    // Drills on A and C with read tokens (a drill only reads; its record only adds); D never.
    a.ok(&a.read, &["drill", "--files", "4"]);
    c.ok(&c.read, &["drill", "--full"]);
    // A drill record dated ahead would hide every later drill from status: refused.
    let forged = serde_json::json!({"version": 1, "time": "2099-01-01T00:00:00Z", "by_host": "x", "snapshot": "ab".repeat(32),
        "snapshot_time": "2026-01-01T00:00:00Z", "host": "x", "paths": [], "mode": "sample", "files": 1, "failed": 0,
        "bytes": 1, "seconds": 0.1, "ok": true}).to_string();
    let name = blake3::hash(forged.as_bytes()).to_hex().to_string();
    let r = a.http().put(a.obj_url("drills", &name)).bearer_auth(&a.read).body(forged).send().unwrap();
    assert_eq!(r.status().as_u16(), 400, "{}", r.text().unwrap_or_default());
    // B keeps the live shadow of the data; A pushes it once.
    let mirror = tempfile::tempdir().unwrap();
    let b = Server::start(&format!("[[stream]]\nname = \"shop\"\nmirror = \"{}\"", mirror.path().join("m").display()));
    let stream_token = |role: &str| {
        let o = std::process::Command::new(crate::util::BIN).args(["serve", "-c"]).arg(&b.config).args(["token", "add", "--role", role, "--repository", "shop"]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let t = String::from_utf8(o.stdout).unwrap().trim().to_string();
        let started = std::time::Instant::now();
        while b.http().get(format!("https://{}/v1/shadow/shop", b.addr)).bearer_auth(&t).send().unwrap().status() != 200 {
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "the server never accepted the new token");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        t
    };
    let (push, b_read) = (stream_token("shadow"), stream_token("read"));
    let state = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(crate::util::BIN)
        .args(["shadow", "push", "--source", data.to_str().unwrap(), "--to", &format!("kura://{}/shop", b.addr), "--once"])
        .env("KURA_TOKEN", &push)
        .env("KURA_FINGERPRINT", &b.fingerprint)
        .env("KURA_STATE_DIR", state.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let dir = tempfile::tempdir().unwrap();
    let mut t = String::new();
    for (name, s, token) in [("a", &a, &a.read), ("b", &b, &b_read), ("c", &c, &c.read), ("d", &d, &d.read)] {
        std::fs::write(dir.path().join(format!("{name}.token")), token).unwrap();
        t.push_str(&format!("[host.{name}]\naddress = \"{}\"\nfingerprint = \"{}\"\ntoken_file = \"{name}.token\"\n", s.addr, s.fingerprint));
    }
    t.push_str(&format!(
        "[[dataset]]\nname = \"shop\"\nhost = \"a\"\npaths = [\"{}\"]\nrepository = \"office\"\nshadow = \"b\"\nshadow_window = \"7d\"\n\
         [[dataset.generation]]\nname = \"daily\"\nhost = \"c\"\nfrom = \"a\"\nevery = \"daily\"\nkeep = 14\nrepository = \"office\"\n\
         [[dataset.generation]]\nname = \"weekly\"\nhost = \"d\"\nfrom = \"daily\"\nevery = \"weekly\"\nkeep = 8\nrepository = \"office\"\n",
        data.display()
    ));
    let topo = dir.path().join("site.toml");
    std::fs::write(&topo, t).unwrap();

    let o = a.kura(&a.read, &["--json", "status", "--topology", topo.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let levels: Vec<(&str, &str)> = v.as_array().unwrap().iter().map(|r| (r["label"].as_str().unwrap(), r["level"].as_str().unwrap())).collect();
    assert_eq!(levels, [("shop: backup on a", "ok"), ("shop: shadow on b", "ok"), ("shop: daily on c", "ok"), ("shop: weekly on d", "warn")]);
    assert_eq!(v[1]["shadow"]["role"], "standby", "{}", v[1]);
    // The pull jobs' results come from the servers.
    assert!(v[2]["jobs"].as_array().unwrap().iter().any(|j| j["name"] == "pull" && j["last_ok"] == true), "{}", v[2]);

    let html = dir.path().join("report.html");
    let o = a.kura(&a.read, &["report", "--topology", topo.to_str().unwrap(), "--title", "Shop & Co", "-o", html.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let page = std::fs::read_to_string(&html).unwrap();
    for want in ["Shop &amp; Co", "live shadow", "s behind", "daily generation", "weekly generation", "a whole snapshot", "never drilled"] {
        assert!(page.contains(want), "{want}");
    }
    let o = a.kura(&a.read, &["report", "--topology", topo.to_str().unwrap(), "--format", "markdown"]).output().unwrap();
    let md = String::from_utf8_lossy(&o.stdout);
    assert!(md.contains("| daily generation | c | daily | 14 (14 days) |"), "{md}");

    // Headless Chromium from Debian renders it; the screenshot is kept for people to look at.
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("report.png");
    let _ = std::fs::remove_file(&png);
    let o = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1500"])
        .arg(format!("--user-data-dir={}", dir.path().join("chromium").display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("chromium (scripts/test-deps installs it)");
    assert!(o.status.success(), "{}", stderr(&o));
    let shot = std::fs::read(&png).unwrap();
    assert_eq!(&shot[..8], b"\x89PNG\r\n\x1a\n");
    // A blank page compresses to a few KiB; a rendered report with tables and badges does not.
    assert!(shot.len() > 40_000, "screenshot of {} bytes looks blank", shot.len());
    std::fs::copy(&html, artifacts.join("report.html")).unwrap();

    // A drill of a random copy of the topology (its host's read token, the dataset's passphrase).
    for _ in 0..3 {
        let o = a.kura(&a.read, &["--json", "drill", "--topology", topo.to_str().unwrap(), "--files", "2"]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(["shop: backup on a", "shop: daily on c", "shop: weekly on d"].contains(&v["repository"].as_str().unwrap()), "{v}");
        assert_eq!(v["record"]["ok"], true, "{v}");
    }
}
