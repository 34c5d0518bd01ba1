//! Generations: forget keeps exactly what the policy says (and says why), protected snapshots
//! survive, prune frees space and is safe beside a running backup, repair recovers what is left.

use crate::util::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

/// A stdin backup at a claimed time; returns the snapshot id.
fn backup_at(e: &Env, time: &str, data: &[u8], extra: &[&str]) -> String {
    let mut args = vec!["--json", "backup", "--stdin", "--stdin-filename", "db.dump", "--time", time];
    args.extend_from_slice(extra);
    let mut child = e.cmd(&args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["snapshot"].as_str().unwrap().to_string()
}

fn ids(e: &Env) -> BTreeSet<String> {
    e.json(&["snapshots"]).as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

fn kept_times(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for g in v["groups"].as_array().unwrap() {
        for s in g["snapshots"].as_array().unwrap() {
            if s["keep"].as_bool().unwrap() {
                out.push(s["time"].as_str().unwrap()[..10].to_string());
            }
        }
    }
    out
}

#[test]
fn forget_keeps_exactly_the_generations_and_explains_every_decision() {
    let e = Env::new();
    // One snapshot a day at 23:00 UTC from 2026-12-01 to 2027-01-10 (covers ISO week 2026-W53).
    let mut day = jiff::civil::date(2026, 12, 1);
    let mut all = Vec::new();
    let mut n = 0u64;
    while day <= jiff::civil::date(2027, 1, 10) {
        let t = format!("{day}T23:00:00Z");
        all.push((t.clone(), backup_at(&e, &t, &bytes(2000, n), &[])));
        day = day.tomorrow().unwrap();
        n += 1;
    }
    let policy = [
        "--keep-daily", "3", "--keep-weekly", "3", "--keep-biweekly", "3", "--keep-monthly", "2",
        "--timezone", "UTC", "--now", "2027-01-11T12:00:00Z",
    ];
    let mut args = vec!["forget", "--dry-run"];
    args.extend_from_slice(&policy);
    let v = e.json(&args);
    // Hand-computed: daily 01-10, 01-09, 01-08; weekly (ISO): 2027-W01 -> 01-10, 2026-W53 ->
    // 01-03, W52 -> 12-27; bi-weekly periods from 1969-12-29: [12-28, 01-10] -> 01-10,
    // [12-14, 12-27] -> 12-27, [11-30, 12-13] -> 12-13; monthly: 2027-01 -> 01-10,
    // 2026-12 -> 12-31.
    let mut got = kept_times(&v);
    got.sort();
    assert_eq!(got, vec!["2026-12-13", "2026-12-27", "2026-12-31", "2027-01-03", "2027-01-08", "2027-01-09", "2027-01-10"]);
    // Every snapshot is listed with its rules; the newest carries all four.
    let snaps = v["groups"][0]["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), all.len());
    let rules: Vec<&str> = snaps[0]["reasons"].as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert_eq!(rules, vec!["period"; 4]);
    assert_eq!(snaps[0]["reasons"][2]["bucket"], "2026-12-28/01-10");
    // A dry run removes nothing; the text form names the rule of each kept snapshot.
    assert_eq!(ids(&e).len(), all.len());
    let mut targs = vec!["forget", "--dry-run"];
    targs.extend_from_slice(&policy);
    let text = e.ok(&targs);
    assert!(text.contains("biweekly 2026-12-14/12-27 (#2)"), "{text}");
    assert!(text.contains("weekly 2026-W53 (#2)"), "{text}");
    assert!(text.contains("would remove"), "{text}");

    let mut args = vec!["forget"];
    args.extend_from_slice(&policy);
    e.ok(&args);
    assert_eq!(ids(&e).len(), 7);
    // The same policy again removes nothing more.
    let v = e.json(&args);
    assert_eq!(v["removed"].as_array().unwrap().len(), 0);
}

#[test]
fn policy_files_groups_protection_and_refusals() {
    let e = Env::new();
    for (i, host) in ["a", "a", "a", "b", "b", "b"].iter().enumerate() {
        backup_at(&e, &format!("2026-11-0{}T10:00:00Z", i + 1), &bytes(1000, i as u64), &["--host", host]);
    }
    let policy = e.path("policy.toml");
    fs::write(
        &policy,
        "timezone = \"UTC\"\ngroup-by = \"host\"\n[keep]\nlast = 1\n\n[[group]]\nhost = \"b\"\n[group.keep]\nlast = 2\n",
    )
    .unwrap();
    let p = policy.to_str().unwrap();
    let v = e.json(&["forget", "--policy", p, "--dry-run"]);
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0]["group"]["host"], "a");
    assert_eq!(groups[0]["policy"], "last 1");
    assert_eq!(groups[1]["policy"], "last 2");
    assert_eq!(kept_times(&v), vec!["2026-11-03", "2026-11-06", "2026-11-05"]);

    // Refusals: no policy, an empty policy, flags and file together, a bad value; nothing removed.
    for (args, msg) in [
        (vec!["forget"], "no retention policy"),
        (vec!["forget", "--keep-daily", "0"], "keeps nothing"),
        (vec!["forget", "--policy", p, "--keep-last", "1"], "not both"),
        (vec!["forget", "--keep-daily", "seven"], "--keep-daily"),
        (vec!["forget", "--keep-within", "7"], "no unit"),
        (vec!["forget", "--keep-last", "1", "--timezone", "Mars/Olympus"], "unknown time zone"),
    ] {
        let o = e.run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        no_panic(&o);
        let err = stderr(&o);
        assert!(err.contains(msg) && err.lines().count() == 1, "{args:?}: {err}");
    }
    assert_eq!(ids(&e).len(), 6);

    // A protected snapshot survives even --keep-none, and prune keeps its data.
    let oldest = e.json(&["snapshots"])[0]["id"].as_str().unwrap().to_string();
    e.ok(&["protect", &oldest[..8], "--reason", "audit"]);
    e.ok(&["forget", "--keep-none", "--prune"]);
    assert_eq!(ids(&e), BTreeSet::from([oldest.clone()]));
    let out = e.path("out");
    e.ok(&["restore", &oldest[..8], "--target", out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("db.dump")).unwrap(), bytes(1000, 0));
    e.ok(&["unprotect", &oldest[..8]]);
    e.ok(&["forget", "--keep-none"]);
    assert!(ids(&e).is_empty());
}

/// Source tree with `n` unique files of `size` bytes, named by round.
fn write_round(dir: &std::path::Path, round: u64, n: u64, size: usize) {
    fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        fs::write(dir.join(format!("r{round}-{i}")), bytes(size, round * 1000 + i)).unwrap();
    }
}

#[test]
fn prune_frees_unused_data_repacks_and_everything_left_restores() {
    let e = Env::new();
    let src = e.path("src");
    let s = src.to_str().unwrap();
    for round in 0..5 {
        // Each round adds files and drops the previous round's, so old packs become garbage
        // and the small ones (trees) partly unused.
        if round > 0 {
            for i in 0..6 {
                fs::remove_file(src.join(format!("r{}-{i}", round - 1))).unwrap();
            }
        }
        write_round(&src, round, 6, 700_000);
        e.ok(&["backup", s, "--quiet"]);
    }
    let size = |e: &Env| -> u64 {
        walk(&e.repo.join("data")).iter().map(|p| fs::metadata(p).unwrap().len()).sum()
    };
    let before = size(&e);
    let dry = e.json(&["prune", "--dry-run"]);
    assert_eq!(size(&e), before, "a dry run deletes nothing");
    assert_eq!(dry["packs_deleted"].as_u64(), Some(0), "every snapshot still uses its data");
    e.ok(&["forget", "--keep-last", "2"]);
    let dry = e.json(&["prune", "--dry-run", "--max-unused", "0%"]);
    let freed = dry["bytes_freed"].as_u64().unwrap();
    assert!(freed > 10_000_000, "{dry}");
    let r = e.json(&["prune", "--max-unused", "0%"]);
    assert_eq!(r["plans_swept"].as_u64(), Some(1), "{r}");
    assert_eq!(r["bytes_freed"].as_u64().unwrap(), freed);
    let after = size(&e);
    assert!(before - after >= freed - 100_000, "freed {} of {freed}", before - after);
    assert!(fs::read_dir(e.repo.join("plans")).unwrap().next().is_none());
    e.ok(&["check", "--read-data"]);
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&out, &src));
    // Nothing is left to do.
    let again = e.json(&["prune", "--max-unused", "0%"]);
    assert_eq!(again["packs_deleted"].as_u64(), Some(0), "{again}");
    assert_eq!(again["packs_repacked"].as_u64(), Some(0), "{again}");
}

pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for ent in fs::read_dir(dir).unwrap() {
        let p = ent.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn a_backup_running_during_prune_keeps_the_data_it_deduplicates_against() {
    let e = Env::new();
    let data = bytes(3_000_000, 42);
    let first = backup_at(&e, "2026-11-01T00:00:00Z", &data, &[]);
    // Backup B starts (session registered, index loaded, data already deduplicable) and waits
    // for its input.
    let mut b = e
        .cmd(&["--json", "backup", "--stdin", "--stdin-filename", "db.dump"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut b_in = b.stdin.take().unwrap();
    // B reads its input only after loading the index: once a megabyte has gone through the
    // pipe (64 KiB buffer), B holds the index, before the plan below exists.
    b_in.write_all(&data[..1_000_000]).unwrap();
    // The only snapshot goes; prune condemns its packs but must wait for B.
    e.ok(&["forget", "--keep-none"]);
    let r = e.json(&["prune"]);
    assert_eq!(r["plans_swept"].as_u64(), Some(0), "{r}");
    let waits = r["plans_deferred"][0]["waiting_for"][0].as_str().unwrap();
    assert!(waits.starts_with("backup on"), "{r}");
    assert!(fs::read_dir(e.repo.join("plans")).unwrap().count() == 1);
    // A backup that starts now sees the plan and stores the data again instead of using the
    // condemned packs.
    let c = backup_at(&e, "2026-11-03T00:00:00Z", &bytes(500_000, 7), &[]);
    // B now reads the rest: all of it deduplicates against the condemned packs.
    b_in.write_all(&data[1_000_000..]).unwrap();
    drop(b_in);
    let o = b.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let b_snap = v["snapshot"].as_str().unwrap().to_string();
    assert!(v["summary"]["bytes_added"].as_u64().unwrap() < 10_000, "B should have deduplicated the data: {v}");
    // The next prune runs the plan but keeps the packs B's snapshot uses.
    let r = e.json(&["prune"]);
    assert_eq!(r["plans_swept"].as_u64(), Some(1), "{r}");
    assert!(r["packs_resurrected"].as_u64().unwrap() >= 1, "{r}");
    e.ok(&["check", "--read-data"]);
    let out = e.path("out");
    e.ok(&["restore", &b_snap[..8], "--target", out.to_str().unwrap()]);
    assert!(fs::read(out.join("db.dump")).unwrap() == data, "B's snapshot must restore bit-exact");
    let out2 = e.path("out2");
    e.ok(&["restore", &c[..8], "--target", out2.to_str().unwrap()]);
    assert!(fs::read(out2.join("db.dump")).unwrap() == bytes(500_000, 7));
    assert_ne!(first, b_snap);
}

#[test]
fn a_plan_waits_for_a_live_session_and_not_for_a_killed_one() {
    let e = Env::new();
    backup_at(&e, "2026-11-01T00:00:00Z", &bytes(1_000_000, 1), &[]);
    let mut b = e.cmd(&["backup", "--stdin"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    // Through the pipe means B has loaded the index (see the test above).
    b.stdin.as_mut().unwrap().write_all(&bytes(500_000, 2)).unwrap();
    e.ok(&["forget", "--keep-none"]);
    let r = e.json(&["prune"]);
    assert_eq!(r["plans_deferred"].as_array().unwrap().len(), 1, "{r}");
    // A second prune while the first one's plan waits: still waiting, never deletes.
    let r = e.json(&["prune"]);
    assert_eq!(r["plans_swept"].as_u64(), Some(0), "{r}");
    b.kill().unwrap(); // SIGKILL: its session object stays behind
    b.wait().unwrap();
    assert_eq!(fs::read_dir(e.repo.join("sessions")).unwrap().count(), 1);
    let r = e.json(&["prune"]);
    assert_eq!(r["plans_swept"].as_u64(), Some(1), "{r}");
    assert_eq!(r["sessions_cleaned"].as_u64(), Some(1), "{r}");
    assert_eq!(walk(&e.repo.join("data")).len(), 0, "every pack was garbage");
    e.ok(&["check", "--read-data"]);
}

/// A source with one small file, backed up once: later data goes into packs of its own.
fn small_safe_source(e: &Env) -> std::path::PathBuf {
    let src = e.path("src");
    fs::create_dir_all(src.join("keep")).unwrap();
    fs::write(src.join("keep/a.txt"), b"small and safe").unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    src
}

#[test]
fn repair_index_and_snapshots_after_a_pack_is_lost() {
    let e = Env::new();
    let src = small_safe_source(&e);
    let s = src.to_str().unwrap();
    fs::write(src.join("lost.bin"), bytes(2_000_000, 9)).unwrap();
    e.ok(&["backup", s]);
    // The pack holding the big file disappears; the index still names it.
    let packs: Vec<_> = walk(&e.repo.join("data"));
    let big = packs.iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    fs::remove_file(big).unwrap();
    let o = e.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("lost.bin"), "{}", stderr(&o));
    let r = e.json(&["repair", "index"]);
    assert_eq!(r["packs"].as_u64(), Some(packs.len() as u64 - 1), "{r}");
    let dry = e.json(&["repair", "snapshots", "--dry-run"]);
    assert_eq!(dry["repaired"][0]["files_removed"].as_array().unwrap().len(), 1, "{dry}");
    let r = e.json(&["repair", "snapshots"]);
    let lost: Vec<&str> = r["repaired"][0]["files_removed"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(lost.len() == 1 && lost[0].ends_with("/src/lost.bin"), "{r}");
    let repaired = r["repaired"][0]["repaired"].as_str().unwrap().to_string();
    let out = e.path("out");
    e.ok(&["restore", &repaired[..8], "--target", out.to_str().unwrap()]);
    let base = restored(&out, &src);
    assert_eq!(fs::read(base.join("keep/a.txt")).unwrap(), b"small and safe");
    assert!(!base.join("lost.bin").exists());
    // Retention treats original and repair as one: keep-last 1 keeps both (not the first).
    let v = e.json(&["forget", "--keep-last", "1", "--dry-run"]);
    assert_eq!(v["groups"][0]["snapshots"].as_array().unwrap().iter().filter(|s| s["keep"] == true).count(), 2, "{v}");
    // Repairing again does nothing new; forgetting the original leaves a clean repository.
    let again = e.json(&["repair", "snapshots", "--forget"]);
    assert_eq!(again["repaired"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["forgotten"].as_u64(), Some(1), "{again}");
    e.ok(&["check", "--read-data"]);
    // A later backup stores the lost file again; the data is whole once more.
    e.ok(&["backup", s]);
    e.ok(&["check", "--read-data"]);
}

#[test]
fn a_second_prune_is_refused_while_one_runs_and_not_after_it_died() {
    let e = Env::new();
    backup_at(&e, "2026-11-01T00:00:00Z", &bytes(1000, 1), &[]);
    // A live process registered as a prune, exactly as kura writes it.
    let mut sleeper = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(19).unwrap().parse().unwrap();
    let machine = format!(
        "{}/{}",
        fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim(),
        fs::read_link("/proc/self/ns/pid").unwrap().display()
    );
    let now = jiff::Timestamp::now().to_string();
    let session = serde_json::json!({
        "version": 1, "command": "prune", "host": "elsewhere", "machine": machine, "pid": pid,
        "pid_start": start, "started": now, "heartbeat": now, "plans_seen": [],
    });
    fs::create_dir_all(e.repo.join("sessions")).unwrap();
    fs::write(e.repo.join("sessions").join("0123456789abcdef0123456789abcdef"), session.to_string()).unwrap();
    for args in [&["prune"][..], &["repair", "index"][..]] {
        let o = e.run(args);
        assert_eq!(o.status.code(), Some(11), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("a prune is running") && err.contains(&format!("pid {pid}")), "{err}");
    }
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    // Dead now: nobody has to remove anything by hand. Garbage in sessions/ (not a record)
    // blocks nothing either.
    fs::write(e.repo.join("sessions").join("fedcba9876543210fedcba9876543210"), b"\x00garbage").unwrap();
    let r = e.json(&["prune"]);
    assert_eq!(r["sessions_cleaned"].as_u64(), Some(2), "{r}");
    assert_eq!(fs::read_dir(e.repo.join("sessions")).unwrap().count(), 0);
}

#[test]
fn prune_refuses_a_repository_that_lost_data_snapshots_use() {
    let e = Env::new();
    let src = e.path("src");
    write_round(&src, 0, 3, 300_000);
    e.ok(&["backup", src.to_str().unwrap()]);
    write_round(&src, 1, 3, 300_000);
    e.ok(&["backup", src.to_str().unwrap()]);
    let packs = walk(&e.repo.join("data"));
    let big = packs.iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    fs::remove_file(big).unwrap();
    let o = e.run(&["prune"]);
    assert_eq!(o.status.code(), Some(1));
    no_panic(&o);
    let err = stderr(&o);
    assert!(err.contains("repair") && err.lines().count() == 1, "{err}");
    assert_eq!(walk(&e.repo.join("data")).len(), packs.len() - 1, "prune deleted something");
}

#[test]
fn forget_by_id_respects_protection_and_snapshots_show_marks() {
    let e = Env::new();
    let a = backup_at(&e, "2026-11-01T00:00:00Z", &bytes(1000, 1), &[]);
    let b = backup_at(&e, "2026-11-02T00:00:00Z", &bytes(1000, 2), &[]);
    e.ok(&["protect", &a[..8]]);
    let list = e.json(&["snapshots"]);
    assert_eq!(list[0]["protected"], true);
    assert_eq!(list[1]["protected"], false);
    assert!(e.ok(&["snapshots"]).contains("[protected]"));
    for (args, msg) in [
        (vec!["forget", &a[..8]], "protected"),
        (vec!["forget", "latest"], "explicit snapshot ids"),
        (vec!["forget", &b[..8], "--keep-last", "1"], "not both"),
        (vec!["forget", "ffffffff"], "no snapshot matches"),
    ] {
        let o = e.run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains(msg) && err.lines().count() == 1, "{args:?}: {err}");
    }
    assert_eq!(ids(&e).len(), 2);
    e.ok(&["forget", &b[..8], "--dry-run"]);
    assert_eq!(ids(&e).len(), 2);
    let r = e.json(&["forget", &b[..8]]);
    assert_eq!(r["removed"][0].as_str(), Some(b.as_str()));
    assert_eq!(ids(&e), BTreeSet::from([a]));
}

#[test]
fn prune_on_a_full_disk_fails_cleanly_and_succeeds_once_space_is_freed() {
    let e = Env::new();
    let mnt = e.path("mnt");
    let src = e.path("src");
    fs::create_dir_all(&mnt).unwrap();
    write_round(&src, 0, 40, 200_000);
    let out = e.path("out");
    // A real 13 MiB tmpfs in a private mount namespace. Two backups fill it to ~12 MiB; after
    // the first is forgotten, half of every early pack is garbage, and repacking the other half
    // needs ~4 MiB that the disk does not have. Then the tmpfs grows ("space freed").
    let script = format!(
        r#"set -u
M={mnt}; K={bin}; S={src}; D={dir}; export KURA_PASSWORD=pw
mount -t tmpfs -o size=13m tmpfs "$M" || exit 99
"$K" -r "$M/repo" init >/dev/null 2>&1 || exit 98
sed -i 's/"pack_size": 16777216/"pack_size": 1048576/' "$M/repo/config"
"$K" -r "$M/repo" backup "$S" >/dev/null 2>$D/e0 || exit 97
for i in $(seq 0 2 38); do head -c 200000 /dev/urandom > "$S/r0-$i"; done
"$K" -r "$M/repo" backup "$S" >/dev/null 2>$D/e0 || exit 96
"$K" -r "$M/repo" forget --keep-last 1 >/dev/null 2>$D/e0 || exit 95
"$K" -r "$M/repo" prune --max-unused 0% >/dev/null 2>$D/e1; echo $? >$D/rc1
"$K" -r "$M/repo" check --read-data >/dev/null 2>$D/e2; echo $? >$D/rc2
mount -o remount,size=200m tmpfs "$M" || exit 94
"$K" -r "$M/repo" --json prune --max-unused 0% >$D/o3 2>$D/e3; echo $? >$D/rc3
"$K" -r "$M/repo" check --read-data >/dev/null 2>$D/e4; echo $? >$D/rc4
"$K" -r "$M/repo" restore latest --target {out} >/dev/null 2>$D/e5; echo $? >$D/rc5
"#,
        mnt = mnt.display(), bin = BIN, src = src.display(), dir = e.dir.path().display(), out = out.display()
    );
    let st = std::process::Command::new("unshare").args(["-rm", "bash", "-c", &script]).status().unwrap();
    assert!(st.success(), "namespace script failed: {st:?}: {}", fs::read_to_string(e.path("e0")).unwrap_or_default());
    let rd = |n: &str| fs::read_to_string(e.path(n)).unwrap().trim().to_string();
    assert_eq!(rd("rc1"), "1", "prune on a full disk did not fail: {}", rd("e1"));
    assert!(rd("e1").contains("No space left on device") && rd("e1").lines().count() == 1, "{}", rd("e1"));
    assert_eq!(rd("rc2"), "0", "repository damaged by the failed prune: {}", rd("e2"));
    assert_eq!(rd("rc3"), "0", "prune after freeing space failed: {}", rd("e3"));
    let r: serde_json::Value = serde_json::from_str(&rd("o3")).unwrap();
    assert!(r["packs_repacked"].as_u64().unwrap() > 0 && r["plans_swept"].as_u64() == Some(1), "{r}");
    assert_eq!(rd("rc4"), "0", "{}", rd("e4"));
    assert_eq!(rd("rc5"), "0", "{}", rd("e5"));
    assert_same_tree(&src, &restored(&out, &src));
}

/// Writes `name` into `src`, backs it up, and flips a bit at byte `at` of the new pack larger
/// than `min` bytes; returns the snapshot and that pack.
fn back_up_and_rot(e: &Env, src: &std::path::Path, name: &str, content: &[u8], min: u64, at: usize) -> (String, std::path::PathBuf) {
    let before: BTreeSet<_> = walk(&e.repo.join("data")).into_iter().collect();
    fs::write(src.join(name), content).unwrap();
    let snap = e.json(&["backup", src.to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();
    let pack = walk(&e.repo.join("data")).into_iter().find(|p| !before.contains(p) && fs::metadata(p).unwrap().len() > min).unwrap();
    let mut b = fs::read(&pack).unwrap();
    b[at] ^= 0x04;
    fs::write(&pack, &b).unwrap();
    (snap, pack)
}

#[test]
fn bit_rot_is_repaired_healed_by_the_next_backup_and_pruned_away() {
    let e = Env::new();
    let src = small_safe_source(&e);
    let s = src.to_str().unwrap();
    let big = bytes(3_000_000, 77);
    let (damaged_snap, pack) = back_up_and_rot(&e, &src, "big.bin", &big, 1_000_000, 1_500_000);
    // Found, and named.
    let o = e.run(&["check", "--read-data"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("big.bin"), "{}", stderr(&o));
    // The damaged chunk leaves the index; the snapshot is repaired without the file.
    let r = e.json(&["repair", "index", "--read-data"]);
    assert_eq!(r["damaged_blobs"].as_u64(), Some(1), "{r}");
    let r = e.json(&["repair", "snapshots"]);
    let lost = r["repaired"][0]["files_removed"].as_array().unwrap();
    assert!(lost.len() == 1 && lost[0].as_str().unwrap().ends_with("/big.bin"), "{r}");
    // The next backup stores the lost chunk again (same id): the original snapshot is whole.
    e.ok(&["backup", s]);
    let out = e.path("out");
    e.ok(&["restore", &damaged_snap[..8], "--target", out.to_str().unwrap()]);
    assert!(fs::read(restored(&out, &src).join("big.bin")).unwrap() == big);
    // Prune repacks the good chunks out of the damaged pack and deletes it: the repository is
    // clean again.
    let r = e.json(&["prune", "--max-unused", "0%"]);
    assert!(r["packs_repacked"].as_u64().unwrap() + r["packs_deleted"].as_u64().unwrap() >= 1, "{r}");
    assert!(!pack.exists(), "the damaged pack is still there: {r}");
    e.ok(&["check", "--read-data"]);
    let out2 = e.path("out2");
    e.ok(&["restore", &damaged_snap[..8], "--target", out2.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&out2, &src));
}

#[test]
fn a_pack_whose_every_blob_is_damaged_stays_out_of_the_index_until_prune_deletes_it() {
    // One chunk (below the chunker's minimum) alone in its own backup: its pack holds that one
    // blob. Dropped from the index as damaged, the pack must not come back as an "orphan" whose
    // header the next command indexes again (CI failure of stop 24: `repair snapshots` found
    // nothing to repair).
    let e = Env::new();
    let src = small_safe_source(&e);
    let s = src.to_str().unwrap();
    let lone = bytes(400_000, 78);
    let (damaged_snap, pack) = back_up_and_rot(&e, &src, "lone.bin", &lone, 300_000, 200_000);
    let r = e.json(&["repair", "index", "--read-data"]);
    assert_eq!(r["damaged_blobs"].as_u64(), Some(1), "{r}");
    let r = e.json(&["repair", "snapshots"]);
    let lost = r["repaired"][0]["files_removed"].as_array().unwrap_or_else(|| panic!("nothing repaired: {r}"));
    assert!(lost.len() == 1 && lost[0].as_str().unwrap().ends_with("/lone.bin"), "{r}");
    // A second look still sees the loss (nothing re-indexed the damaged pack meanwhile).
    let o = e.run(&["check"]);
    assert_eq!(o.status.code(), Some(1), "check passed with a damaged pack's blob in a snapshot: {}", stderr(&o));
    e.ok(&["backup", s]);
    let r = e.json(&["prune", "--max-unused", "0%"]);
    assert!(!pack.exists(), "the damaged pack is still there: {r}");
    e.ok(&["check", "--read-data"]);
    let out = e.path("out");
    e.ok(&["restore", &damaged_snap[..8], "--target", out.to_str().unwrap()]);
    assert_eq!(fs::read(restored(&out, &src).join("lone.bin")).unwrap(), lone);
}

#[test]
fn a_weekly_copy_takes_the_newest_snapshot_of_each_week_and_only_of_its_host() {
    let daily = Env::new();
    // 2026-11-02 is a Monday: 17 daily snapshots span ISO weeks 45, 46 and 47 (Mon-Wed); the
    // other host's snapshots are not taken.
    let mut newest_of_week = std::collections::BTreeMap::new();
    for d in 2..=18 {
        let time = format!("2026-11-{d:02}T12:00:00Z");
        let id = backup_at(&daily, &time, format!("day {d}").as_bytes(), &["--host", "www"]);
        newest_of_week.insert((d - 2) / 7, id);
        backup_at(&daily, &time, b"other", &["--host", "mail"]);
    }
    let weekly = Env::new();
    let copy = |extra: &[&str]| {
        let mut args = vec!["--json", "copy", "--from-repo", daily.repo.to_str().unwrap(), "--host", "www", "--newest-of", "weekly"];
        args.extend_from_slice(extra);
        let o = weekly.cmd(&args).env("KURA_FROM_PASSWORD", "test-pass").output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let r = copy(&[]);
    let copied: Vec<&str> = r["copied"].as_array().unwrap().iter().map(|c| c["source"].as_str().unwrap()).collect();
    let want: Vec<&str> = newest_of_week.values().map(String::as_str).collect();
    assert_eq!(copied, want, "{r}");
    let snaps = weekly.json(&["snapshots"]);
    let times: Vec<&str> = snaps.as_array().unwrap().iter().map(|s| s["time"].as_str().unwrap()).collect();
    assert_eq!(times.len(), 3, "{snaps}");
    assert!(times.iter().all(|t| t.starts_with("2026-11-08") || t.starts_with("2026-11-15") || t.starts_with("2026-11-18")), "{times:?}");
    assert!(snaps.as_array().unwrap().iter().all(|s| s["host"] == "www"), "{snaps}");
    // Run again: nothing new.
    let r = copy(&[]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["skipped"].as_array().unwrap().len(), 3, "{r}");
    // Naming snapshots and selecting them at once is refused.
    let o = weekly.cmd(&["copy", "--from-repo", daily.repo.to_str().unwrap(), "--newest-of", "weekly", "latest"]).env("KURA_FROM_PASSWORD", "test-pass").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not both"), "{}", stderr(&o));
}

#[test]
fn a_daily_copy_reads_only_what_changed_and_a_false_copy_teaches_nothing() {
    let src_repo = Env::new();
    let dst = Env::new();
    // Every file a single chunk, so a tree with the same names and sizes has the same shape.
    let tree = sample_tree(&src_repo.path("data"), 8, 100_000, 40);
    let t = tree.to_str().unwrap();
    src_repo.ok(&["backup", "--time", "2026-11-02T22:00:00Z", t]);
    let copy = |into: &Env| {
        let o = into.cmd(&["--json", "copy", "--from-repo", src_repo.repo.to_str().unwrap()]).env("KURA_FROM_PASSWORD", "test-pass").output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let first = copy(&dst);
    let all = first["blobs_read"].as_u64().unwrap();
    assert_eq!(first["names_learnt"], 0);
    let original: Vec<(PathBuf, Vec<u8>)> = (0..40).map(|i| tree.join(format!("sub/f{i}"))).map(|f| { let b = fs::read(&f).unwrap(); (f, b) }).collect();
    // One small file changes: the next copy learns the rest from the first copy's trees.
    fs::write(tree.join("sub/f7"), bytes(1137, 4242)).unwrap();
    src_repo.ok(&["backup", "--time", "2026-11-03T22:00:00Z", t]);
    let second = copy(&dst);
    let read = second["blobs_read"].as_u64().unwrap();
    assert!(second["names_learnt"].as_u64().unwrap() > 40, "{second}");
    assert!(read <= 8, "read {read} blobs for one changed file (the first copy read {all})");
    let out = dst.path("out");
    dst.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&tree, &restored(&out, &tree));
    dst.ok(&["check", "--read-data"]);

    // A repository holding a snapshot with the first one's time, host and paths that is no copy
    // of it (same names and sizes, other bytes): the spot checks catch it, nothing is learnt,
    // and the copy of the second snapshot is still exactly the source's.
    for (i, (f, b)) in original.iter().enumerate() {
        fs::write(f, bytes(b.len(), 7000 + i as u64)).unwrap();
    }
    fs::write(tree.join("big.bin"), bytes(100_000, 77)).unwrap();
    let fake = Env::new();
    fake.ok(&["backup", "--time", "2026-11-02T22:00:00Z", t]);
    let r = copy(&fake);
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "the false copy stands for the first snapshot: {r}");
    assert_eq!(r["names_learnt"], 0, "{r}");
    let got = fake.path("got");
    fake.ok(&["restore", "latest", "--target", got.to_str().unwrap()]);
    assert_same_tree(&restored(&out, &tree), &restored(&got, &tree));
}
