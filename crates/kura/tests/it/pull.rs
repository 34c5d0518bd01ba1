//! Pulls between real `kura serve` processes on loopback: a generation server replicates its
//! source with only a read token, verifies every object, resumes after a cut connection, refuses
//! bytes that do not match their names; `kura pull` between directories.

use crate::server::Server;
use crate::util::{BIN, Env, assert_same_tree, bytes, restored, sample_tree, stderr};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A byte-level TCP proxy (TLS passes through untouched) that can cut every connection once
/// `cut_after` bytes went downstream, and refuse connections while `down`.
pub struct CutProxy {
    pub port: u16,
    pub down: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    pub cut_after: Arc<AtomicU64>,
    pub cuts: Arc<AtomicU64>,
}

impl CutProxy {
    pub fn start(upstream: String) -> CutProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = CutProxy {
            port,
            down: Arc::default(),
            sent: Arc::default(),
            cut_after: Arc::new(AtomicU64::new(u64::MAX)),
            cuts: Arc::default(),
        };
        let (down, sent, cut_after, cuts) = (p.down.clone(), p.sent.clone(), p.cut_after.clone(), p.cuts.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { continue };
                if down.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Upstream direction: plain copy.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (c2, s2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
                let (down, sent, cut_after, cuts) = (down.clone(), sent.clone(), cut_after.clone(), cuts.clone());
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let total = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total > cut_after.load(Ordering::SeqCst) {
                            cut_after.store(u64::MAX, Ordering::SeqCst);
                            cuts.fetch_add(1, Ordering::SeqCst);
                            down.store(true, Ordering::SeqCst);
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                            break;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        p
    }
}

/// A server hosting `office` as a replica that pulls from `from` with the token in a file.
pub fn puller(from: &str, token: &str, extra: &str) -> (Server, PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let tf = dir.join("source.token");
    std::fs::write(&tf, token).unwrap();
    let conf = format!(
        "[repository.pull]\nschedule = \"daily 03:00\"\nfrom = \"{from}\"\ntoken-file = \"{}\"\n{extra}\n",
        tf.display()
    );
    (Server::start(&conf), dir)
}

/// Runs a job now; returns (HTTP status, the job's message).
pub fn run_job(s: &Server, job: &str) -> (u16, String) {
    let r = s.http().post(format!("https://{}/v1/office/jobs/{job}", s.addr)).bearer_auth(&s.admin).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

fn backup_at(s: &Server, dir: &Path, time: &str) -> String {
    let out = s.ok(&s.backup, &["--json", "backup", "--time", time, dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["snapshot"].as_str().unwrap().to_string()
}

fn pack_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(repo.join("data")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_generation_server_pulls_with_a_read_token_verifies_and_restores_bit_exact() {
    let a = Server::start("");
    a.ok(&a.admin, &["init"]);
    let src = sample_tree(a.dir.path(), 1, 3 << 20, 20);
    let first = backup_at(&a, &src, "2026-11-02T22:00:00Z");
    std::fs::write(src.join("sub/f3"), bytes(7000, 99)).unwrap();
    let second = backup_at(&a, &src, "2026-11-03T22:00:00Z");

    // The weekly server takes only the newest of each week; the daily one everything.
    let (weekly, _w) = puller(&a.url(), &a.read, &format!("fingerprint = \"{}\"\nnewest-of = \"weekly\"\ntimezone = \"UTC\"", a.fingerprint));
    let (daily, _d) = puller(&a.url(), &a.read, &format!("fingerprint = \"{}\"", a.fingerprint));
    let (st, msg) = run_job(&daily, "pull");
    assert_eq!(st, 200, "{msg}");
    assert!(msg.contains("pulled 2 snapshot(s)") && msg.contains("now a replica"), "{msg}");
    let (st, msg) = run_job(&weekly, "pull");
    assert_eq!(st, 200, "{msg}");
    assert!(msg.contains("pulled 1 snapshot(s)"), "{msg}");
    assert_eq!(weekly.names("snapshots"), vec![second.clone()]);
    let mut both = vec![first.clone(), second.clone()];
    both.sort();
    assert_eq!(daily.names("snapshots"), both);
    // The pulling server recorded its own receipt of each pulled snapshot.
    assert_eq!(daily.names("receipts"), both);

    // The replica opens with the source's passphrase and restores bit-exact; every byte checks.
    let target = daily.dir.path().join("restore");
    daily.ok(&daily.read, &["restore", &second[..8], "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
    daily.ok(&daily.admin, &["check", "--read-data"]);

    // Nothing new: nothing fetched.
    let (st, msg) = run_job(&daily, "pull");
    assert_eq!(st, 200, "{msg}");
    assert!(msg.contains("pulled 0 snapshot(s) (0 pack(s)") && msg.contains("2 here already"), "{msg}");

    // A source pack whose bytes no longer match its name is refused, and so is its snapshot;
    // the job fails and says which; the good bytes back, the next run takes it.
    std::fs::write(src.join("new.bin"), bytes(2 << 20, 7)).unwrap();
    let before: Vec<PathBuf> = pack_files(&a.repo_dir());
    let third = backup_at(&a, &src, "2026-11-04T22:00:00Z");
    let new: Vec<PathBuf> = pack_files(&a.repo_dir()).into_iter().filter(|p| !before.contains(p)).collect();
    assert!(!new.is_empty());
    let good = std::fs::read(&new[0]).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0x40;
    std::fs::write(&new[0], &bad).unwrap();
    let (st, msg) = run_job(&daily, "pull");
    assert_eq!(st, 500, "{msg}");
    assert!(msg.contains("does not match its name") && msg.contains(&third[..8]), "{msg}");
    assert!(!daily.names("snapshots").contains(&third));
    let name = new[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(!daily.names("data").contains(&name), "the damaged pack was stored");
    // Meanwhile a newer snapshot of the same group, which does not need the damaged pack, is
    // pulled: the refused one is still taken once its bytes are good again, though older.
    std::fs::remove_file(src.join("new.bin")).unwrap();
    let fourth = backup_at(&a, &src, "2026-11-05T22:00:00Z");
    let (st, msg) = run_job(&daily, "pull");
    assert_eq!(st, 500, "{msg}");
    assert!(daily.names("snapshots").contains(&fourth), "{msg}");
    assert!(!daily.names("snapshots").contains(&third));
    std::fs::write(&new[0], &good).unwrap();
    let (st, msg) = run_job(&daily, "pull");
    assert_eq!(st, 200, "{msg}");
    assert!(daily.names("snapshots").contains(&third), "the refused generation was lost once a newer one was pulled: {msg}");
    daily.ok(&daily.admin, &["check", "--read-data"]);
    // Retried once, then forgotten: the next run has nothing to retry.
    let (st, msg) = run_job(&daily, "pull");
    assert!(st == 200 && msg.contains("pulled 0 snapshot(s)"), "{msg}");
}

#[test]
fn a_cut_connection_is_resumed_and_no_half_snapshot_is_ever_visible() {
    let a = Server::start("");
    a.ok(&a.admin, &["init"]);
    let src = sample_tree(a.dir.path(), 2, 40 << 20, 10);
    let snap = backup_at(&a, &src, "2026-11-02T22:00:00Z");
    let total = pack_files(&a.repo_dir()).len();
    assert!(total >= 3, "{total} packs");

    let proxy = CutProxy::start(a.addr.clone());
    let url = format!("kura://127.0.0.1:{}/office", proxy.port);
    // One attempt per run, so the cut shows as a failed run.
    let (b, _d) = puller(&url, &a.read, &format!("fingerprint = \"{}\"\nattempts = 1", a.fingerprint));
    proxy.cut_after.store(20 << 20, Ordering::SeqCst);
    let (st, msg) = run_job(&b, "pull");
    assert_eq!(st, 500, "{msg}");
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1);
    assert!(msg.contains("pulling from"), "{msg}");
    // Some packs arrived, no snapshot did.
    let got = b.names("data").len();
    assert!(got < total, "{got} of {total}");
    assert!(b.names("snapshots").is_empty());

    // The source back: the next run fetches only what is missing and finishes.
    proxy.down.store(false, Ordering::SeqCst);
    let (st, msg) = run_job(&b, "pull");
    assert_eq!(st, 200, "{msg}");
    assert!(msg.contains(&format!("({} pack(s)", total - got)), "{msg}");
    assert_eq!(b.names("snapshots"), vec![snap]);
    let target = b.dir.path().join("restore");
    b.ok(&b.read, &["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));

    // With attempts left, a run survives a cut on its own.
    std::fs::write(src.join("more.bin"), bytes(30 << 20, 3)).unwrap();
    backup_at(&a, &src, "2026-11-03T22:00:00Z");
    let (c, _d2) = puller(&url, &a.read, &format!("fingerprint = \"{}\"\nattempts = 3", a.fingerprint));
    proxy.cut_after.store(proxy.sent.load(Ordering::SeqCst) + (25 << 20), Ordering::SeqCst);
    let reopen = {
        let down = proxy.down.clone();
        std::thread::spawn(move || {
            while !down.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
            down.store(false, Ordering::SeqCst);
        })
    };
    let (st, msg) = run_job(&c, "pull");
    reopen.join().unwrap();
    assert_eq!(st, 200, "{msg}");
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 2);
    assert_eq!(c.names("snapshots").len(), 2);
    assert!(c.log().contains("trying again"), "{}", c.log());
    c.ok(&c.admin, &["check", "--read-data"]);
}

#[test]
fn kura_pull_between_directories_needs_no_key_and_refuses_another_repository() {
    let e = Env::new();
    let src = sample_tree(&e.path("data"), 3, 1 << 20, 5);
    for (i, day) in ["2026-11-02", "2026-11-03", "2026-11-10"].iter().enumerate() {
        std::fs::write(src.join("day"), format!("{i}")).unwrap();
        e.ok(&["backup", "--time", &format!("{day}T12:00:00Z"), src.to_str().unwrap()]);
    }
    let repo = e.repo.clone();
    let replica = e.path("replica");
    let pull = |args: &[&str]| {
        let mut c = std::process::Command::new(BIN);
        c.args(["-r", replica.to_str().unwrap(), "--json", "pull", "--from-repo", repo.to_str().unwrap()]).args(args);
        // No password anywhere: a pull never needs the key.
        c.env_remove("KURA_PASSWORD").env_remove("KURA_PASSWORD_FILE").env("HOME", e.path("home"));
        c.output().unwrap()
    };
    let o = pull(&["--newest-of", "weekly"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["pulled"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["initialised"], true);
    let o = pull(&[]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The Monday snapshot of the first week is older than what the replica has of that group.
    assert_eq!((r["pulled"].as_array().unwrap().len(), r["older"].as_u64()), (0, Some(1)), "{r}");
    let snaps = std::process::Command::new(BIN)
        .args(["-r", replica.to_str().unwrap(), "--json", "snapshots"])
        .env("KURA_PASSWORD", "test-pass")
        .output()
        .unwrap();
    assert!(snaps.status.success(), "{}", stderr(&snaps));
    let v: serde_json::Value = serde_json::from_slice(&snaps.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let target = e.path("restore");
    let o = std::process::Command::new(BIN)
        .args(["-r", replica.to_str().unwrap(), "restore", "latest", "--target", target.to_str().unwrap()])
        .env("KURA_PASSWORD", "test-pass")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_tree(&src, &restored(&target, &src));

    // Another repository is never mixed in; a non-empty directory that is no repository is left alone.
    let other = Env::new();
    let o = std::process::Command::new(BIN)
        .args(["-r", replica.to_str().unwrap(), "pull", "--from-repo", other.repo.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is another repository"), "{}", stderr(&o));
    let o = std::process::Command::new(BIN)
        .args(["-r", e.path("data").to_str().unwrap(), "pull", "--from-repo", repo.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("neither a repository nor empty"), "{}", stderr(&o));
}

#[test]
fn a_pull_onto_a_full_disk_fails_cleanly_and_the_next_one_completes() {
    let e = Env::new();
    let big = e.path("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..4 {
        std::fs::write(big.join(format!("f{i}")), bytes(5 << 20, 20 + i)).unwrap();
    }
    e.ok(&["backup", big.to_str().unwrap()]);
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let dir = e.dir.path();
    let out = e.path("out");
    // A real 8 MiB tmpfs in a private mount namespace holds the replica; then it grows.
    let script = format!(
        r#"set -u
M={mnt}; K={bin}
mount -t tmpfs -o size=8m tmpfs "$M" || exit 99
"$K" -r "$M/replica" pull --from-repo {repo} >/dev/null 2>{dir}/e1; echo $? >{dir}/rc1
ls "$M/replica/snapshots" | wc -l >{dir}/n1
mount -o remount,size=200m tmpfs "$M" || exit 96
"$K" -r "$M/replica" --json pull --from-repo {repo} >{dir}/o2 2>{dir}/e2; echo $? >{dir}/rc2
KURA_PASSWORD=test-pass "$K" -r "$M/replica" check --read-data >/dev/null 2>{dir}/e3; echo $? >{dir}/rc3
KURA_PASSWORD=test-pass "$K" -r "$M/replica" restore latest --target {out} >/dev/null 2>{dir}/e4; echo $? >{dir}/rc4
"#,
        mnt = mnt.display(),
        bin = BIN,
        repo = e.repo.display(),
        dir = dir.display(),
        out = out.display()
    );
    let st = std::process::Command::new("unshare").args(["-rm", "bash", "-c", &script]).status().unwrap();
    assert!(st.success(), "namespace script failed: {st:?}");
    let rd = |n: &str| std::fs::read_to_string(e.path(n)).unwrap().trim().to_string();
    assert_eq!(rd("rc1"), "1", "{}", rd("e1"));
    assert!(rd("e1").contains("No space left on device") && !rd("e1").contains("panicked"), "{}", rd("e1"));
    assert_eq!(rd("n1"), "0", "a snapshot became visible without its data");
    assert_eq!(rd("rc2"), "0", "{}", rd("e2"));
    let r: serde_json::Value = serde_json::from_str(&rd("o2")).unwrap();
    assert_eq!(r["pulled"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(rd("rc3"), "0", "{}", rd("e3"));
    assert_eq!(rd("rc4"), "0", "{}", rd("e4"));
    assert_same_tree(&big, &restored(&out, &big));
}
