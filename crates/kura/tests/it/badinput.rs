//! Bad input: each case gets a one-line error naming what and where, a distinct exit code, and
//! no damage to the repository.

use crate::util::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn wrong_password_exits_12_and_missing_repository_exits_10() {
    let e = Env::new();
    let o = e.cmd(&["snapshots"]).env("KURA_PASSWORD", "wrong").output().unwrap();
    assert_eq!(o.status.code(), Some(12), "{}", stderr(&o));
    assert!(stderr(&o).contains("wrong password"));
    no_panic(&o);
    let o = Command::new(BIN).args(["-r", e.path("nope").to_str().unwrap(), "snapshots"]).env("KURA_PASSWORD", "x").output().unwrap();
    assert_eq!(o.status.code(), Some(10));
    assert!(stderr(&o).contains("no repository at"), "{}", stderr(&o));
    let o = e.run(&["init"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"));
}

#[test]
fn no_password_and_no_terminal_is_a_clear_error() {
    let e = Env::new();
    let o = e.cmd(&["snapshots"]).env_remove("KURA_PASSWORD").stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no password given"), "{}", stderr(&o));
}

#[test]
fn missing_source_path_is_named_and_saves_nothing() {
    let e = Env::new();
    let missing = e.path("does-not-exist");
    let o = e.run(&["backup", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("does-not-exist") && err.contains("does not exist"), "{err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert_eq!(e.json(&["snapshots"]).as_array().unwrap().len(), 0);
}

#[test]
fn newer_repository_format_is_refused_clearly() {
    let e = Env::new();
    let cfg = e.repo.join("config");
    let text = fs::read_to_string(&cfg).unwrap().replace("\"version\": 1", "\"version\": 2");
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&cfg, text).unwrap();
    let o = e.run(&["snapshots"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("format version 2 is newer than this kura supports (1)"), "{}", stderr(&o));
}

#[test]
fn unreadable_files_give_exit_3_and_the_rest_is_saved() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(src.join("locked-dir")).unwrap();
    fs::write(src.join("ok.txt"), b"fine").unwrap();
    fs::write(src.join("secret"), b"no").unwrap();
    fs::write(src.join("locked-dir/inner"), b"no").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o000)).unwrap();
    let mut c = e.cmd(&["backup", src.to_str().unwrap()]);
    if is_root() {
        // root reads everything; drop to an unprivileged user so the files really are unreadable.
        fs::set_permissions(e.dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        chown_r(&e.repo, 65534);
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mut p = Command::new("setpriv");
        p.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]).args(args);
        p.env("KURA_PASSWORD", "test-pass").env("HOME", e.dir.path());
        c = p;
    }
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("secret") && err.contains("locked-dir"), "{err}");
    if is_root() {
        chown_r(&e.repo, 0);
    }
    let ls = e.ok(&["ls", "latest"]);
    assert!(ls.contains("ok.txt") && !ls.contains("/secret"), "{ls}");
    e.ok(&["check"]);
}

fn chown_r(p: &std::path::Path, uid: u32) {
    let st = Command::new("chown").args(["-R", &format!("{uid}:{uid}"), p.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
}

#[test]
fn full_disk_fails_cleanly_and_the_next_backup_succeeds_after_space_is_freed() {
    let e = Env::new();
    let mnt = e.path("mnt");
    let small = e.path("small");
    let big = e.path("big");
    fs::create_dir_all(&mnt).unwrap();
    fs::create_dir_all(&small).unwrap();
    fs::create_dir_all(&big).unwrap();
    fs::write(small.join("a"), bytes(100_000, 1)).unwrap();
    for i in 0..6 {
        fs::write(big.join(format!("f{i}")), bytes(5 << 20, 10 + i)).unwrap();
    }
    let out = e.path("out");
    // A real tmpfs of 12 MiB in a private mount namespace; then grown to 200 MiB ("space freed").
    let script = format!(
        r#"set -u
M={mnt}; K={bin}; export KURA_PASSWORD=pw
mount -t tmpfs -o size=12m tmpfs "$M" || exit 99
"$K" -r "$M/repo" init >/dev/null 2>&1 || exit 98
"$K" -r "$M/repo" backup {small} >/dev/null 2>{dir}/e0 || exit 97
"$K" -r "$M/repo" backup {big} >/dev/null 2>{dir}/e1; echo $? >{dir}/rc1
"$K" -r "$M/repo" check >/dev/null 2>{dir}/e2; echo $? >{dir}/rc2
mount -o remount,size=200m tmpfs "$M" || exit 96
"$K" -r "$M/repo" backup {big} >/dev/null 2>{dir}/e3; echo $? >{dir}/rc3
"$K" -r "$M/repo" check --read-data >/dev/null 2>{dir}/e4; echo $? >{dir}/rc4
"$K" -r "$M/repo" restore latest --target {out} >/dev/null 2>{dir}/e5; echo $? >{dir}/rc5
"#,
        mnt = mnt.display(), bin = BIN, small = small.display(), big = big.display(), dir = e.dir.path().display(), out = out.display()
    );
    let st = Command::new("unshare").args(["-rm", "bash", "-c", &script]).status().unwrap();
    assert!(st.success(), "namespace script failed: {st:?}");
    let rd = |n: &str| fs::read_to_string(e.path(n)).unwrap().trim().to_string();
    assert_eq!(rd("rc1"), "1", "backup into a full disk did not fail: {}", rd("e1"));
    assert!(rd("e1").contains("No space left on device"), "{}", rd("e1"));
    assert!(!rd("e1").contains("panicked"));
    assert_eq!(rd("rc2"), "0", "repository inconsistent after ENOSPC: {}", rd("e2"));
    assert_eq!(rd("rc3"), "0", "backup after freeing space failed: {}", rd("e3"));
    assert_eq!(rd("rc4"), "0", "check after freeing space failed: {}", rd("e4"));
    assert_eq!(rd("rc5"), "0", "{}", rd("e5"));
    assert_same_tree(&big, &restored(&out, &big));
}

#[test]
fn a_file_changing_while_read_is_saved_consistently_or_reported() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    let hot = src.join("hot.log");
    fs::write(&hot, bytes(4 << 20, 3)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let h2 = hot.clone();
    let writer = std::thread::spawn(move || {
        let mut i = 0u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            fs::write(&h2, bytes(((i % 7) as usize + 1) << 19, i)).unwrap();
            i += 1;
        }
        i
    });
    let r = e.json(&["backup", src.to_str().unwrap()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let got = fs::read(restored(&out, &src).join("hot.log")).unwrap();
    // Whatever was read, the chunk list is whole: the restored size is the recorded size.
    let ls = e.json(&["ls", "latest", &format!("{}/hot.log", src.display())]);
    assert_eq!(ls["entries"][0]["size"].as_u64().unwrap(), got.len() as u64);
    let reported = r["changed_during_backup"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().ends_with("hot.log"));
    // The writer truncates, then writes: every instant's content is a prefix of one version
    // (empty included). A torn read would mix two versions and match none.
    let version = |i: u64| (((i % 7) as usize + 1) << 19, i);
    let consistent = bytes(4 << 20, 3).starts_with(&got)
        || (0..written).map(version).filter(|(n, _)| *n >= got.len()).any(|(n, i)| bytes(n, i).starts_with(&got));
    assert!(reported || consistent, "torn file saved without a report: {} bytes, {written} versions, {r}", got.len());
    e.ok(&["check", "--read-data"]);
}

#[test]
fn ctrl_c_stops_a_backup_with_exit_130_and_the_repository_stays_usable() {
    use std::io::Write;
    let e = Env::new();
    // A dump on a pipe we control: the signal arrives while kura waits for more input, which
    // makes the interruption point deterministic.
    let mut child = e
        .cmd(&["backup", "--stdin", "--stdin-filename", "dump"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(&bytes(1 << 20, 1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::INT).unwrap();
    // More data lets the chunker reach its next cut, where the interruption is noticed.
    let _ = input.write_all(&bytes(40 << 20, 2));
    drop(input);
    let o = child.wait_with_output().unwrap();
    no_panic(&o);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    assert_eq!(e.json(&["snapshots"]).as_array().unwrap().len(), 0, "an interrupted backup saved a snapshot");
    e.ok(&["check"]);
}

#[test]
fn an_init_interrupted_before_its_config_leaves_no_stale_key() {
    let e = Env::new();
    // What a kill between the key file and the config leaves behind.
    fs::remove_file(e.repo.join("config")).unwrap();
    let o = e.run(&["snapshots"]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    let o = e.cmd(&["init"]).env("KURA_PASSWORD", "second").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read_dir(e.repo.join("keys")).unwrap().count(), 1, "the stale key file was kept");
    assert_eq!(e.run(&["snapshots"]).status.code(), Some(12));
    let o = e.cmd(&["snapshots"]).env("KURA_PASSWORD", "second").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_password_prompt_on_a_terminal_works_and_asks_twice_on_init() {
    // A real pseudo-terminal (python's pty.fork gives the child a controlling terminal, which
    // the prompt reads from).
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let script = r#"
import os, pty, sys
def run(args, answers):
    pid, fd = pty.fork()
    if pid == 0:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KURA_")}
        os.execve(sys.argv[1], ["kura"] + args, env)
    out, i = b"", 0
    while True:
        try:
            d = os.read(fd, 1024)
        except OSError:
            break
        if not d:
            break
        out += d
        if b"password" in d and i < len(answers):
            os.write(fd, answers[i] + b"\n")
            i += 1
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out.decode(errors="replace")
repo = sys.argv[2]
codes = [run(["-r", repo, "init"], [b"tty-pass", b"tty-pass"]),
         run(["-r", repo, "snapshots"], [b"tty-pass"]),
         run(["-r", repo, "snapshots"], [b"wrong"]),
         run(["-r", repo + "2", "init"], [b"one", b"two"])]
for c, out in codes:
    print(c, out.count("password"), "mismatch" if "do not match" in out else "")
"#;
    let o = std::process::Command::new("python3").args(["-c", script, BIN, repo.to_str().unwrap()]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    // Counts of "password": prompts plus messages ("keep the password safe", "wrong password",
    // "passwords do not match").
    assert_eq!(lines, vec!["0 3 ", "0 1 ", "12 2 ", "1 3 mismatch"], "{out} {}", stderr(&o));
}

#[test]
fn init_never_overwrites_a_repository_that_lost_its_config() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"precious").unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    fs::remove_file(e.repo.join("config")).unwrap();
    let keys_before = fs::read_dir(e.repo.join("keys")).unwrap().count();
    let o = e.cmd(&["init"]).env("KURA_PASSWORD", "other").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("holds repository data but no config"), "{}", stderr(&o));
    assert_eq!(fs::read_dir(e.repo.join("keys")).unwrap().count(), keys_before, "a key was removed");
}

#[test]
fn a_reader_that_stops_early_neither_panics_kura_nor_cuts_its_work_short() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..3 {
        fs::write(src.join(format!("f{i}")), bytes(1000, i)).unwrap();
        e.ok(&["backup", src.to_str().unwrap(), "--time", &format!("2026-01-0{}T12:00:00Z", i + 1)]);
    }
    // Standard output is a pipe whose reader is already gone: every write fails (EPIPE).
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let o = e.cmd(&["snapshots"]).stdout(closed()).output().unwrap();
    no_panic(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // A forget that prints its decisions first still removes what its policy says.
    let o = e.cmd(&["forget", "--keep-last", "1"]).stdout(closed()).output().unwrap();
    no_panic(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let left = e.json(&["snapshots"]);
    assert_eq!(left.as_array().map(|a| a.len()), Some(1), "{left}");
}
