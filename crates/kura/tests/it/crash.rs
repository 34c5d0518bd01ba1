//! kill -9 at seeded random points of real `kura backup` and `kura restore` processes: afterwards
//! the repository opens, earlier snapshots restore bit-exact, and the next run succeeds with no
//! manual step.

use crate::util::*;
use std::fs;
use std::time::{Duration, Instant};

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn twenty_four_kill_9_during_backup_leave_a_repository_that_works() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(src.join("small")).unwrap();
    for i in 0..40 {
        fs::write(src.join(format!("f{i:02}")), bytes(600_000, i)).unwrap();
    }
    for i in 0..300 {
        fs::write(src.join(format!("small/s{i}")), format!("small file {i}\n").repeat(i % 40)).unwrap();
    }
    let orig = e.path("orig");
    let s = src.to_str().unwrap();
    let first = e.json(&["backup", s])["snapshot"].as_str().unwrap().to_string();
    copy_dir(&src, &orig);
    // Kill points are spread over the duration of a run like the killed ones: eight changed files.
    let mut seed = 0x5eed_2012_u64;
    let change = |round: u64, seed: &mut u64| {
        for k in 0..8 {
            let i = (xorshift(seed) % 40) as usize;
            fs::write(src.join(format!("f{i:02}")), bytes(600_000, 1000 + round * 10 + k)).unwrap();
        }
    };
    // The shortest of three runs: one slowed by a busy machine (tests run in parallel) would
    // put most kill points after the killed runs have finished.
    let mut full = std::time::Duration::MAX;
    for r in 0..3 {
        change(97 + r, &mut seed);
        let t0 = Instant::now();
        e.ok(&["backup", s, "--quiet"]);
        full = full.min(t0.elapsed());
    }

    let mut killed_mid_run = 0;
    for round in 0..24u64 {
        // New content each round so every run has real work to be killed in.
        change(round, &mut seed);
        let frac = (xorshift(&mut seed) % 1000) as f64 / 1000.0;
        let delay = full.mul_f64(0.05 + 1.1 * frac);
        let mut child = e.cmd(&["backup", s, "--quiet"]).spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // The repository opens and lists at once after every kill.
        let o = e.run(&["snapshots"]);
        assert!(o.status.success(), "round {round}: snapshots failed: {}", stderr(&o));
        if round % 6 == 5 {
            let o = e.run(&["check"]);
            assert!(o.status.success(), "round {round}: check failed: {}", stderr(&o));
        }
    }
    assert!(killed_mid_run >= 12, "only {killed_mid_run} of 24 kills hit a running backup");
    let last = e.json(&["backup", s]);
    assert!(last["snapshot"].is_string());
    e.ok(&["check", "--read-data"]);
    let out1 = e.path("out1");
    e.ok(&["restore", &first[..8], "--target", out1.to_str().unwrap()]);
    assert_same_tree(&orig, &restored(&out1, &src));
    let out2 = e.path("out2");
    e.ok(&["restore", "latest", "--target", out2.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&out2, &src));
}

#[test]
fn kill_9_during_restore_then_rerun_completes_it() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..60 {
        fs::write(src.join(format!("f{i:02}")), bytes(400_000, i)).unwrap();
    }
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    let t0 = Instant::now();
    e.ok(&["restore", "latest", "--target", e.path("warm").to_str().unwrap()]);
    let full = t0.elapsed();
    let mut seed = 77u64;
    for _ in 0..5 {
        let frac = (xorshift(&mut seed) % 1000) as f64 / 1000.0;
        let mut child = e.cmd(&["restore", "latest", "--target", out.to_str().unwrap(), "--quiet"]).spawn().unwrap();
        std::thread::sleep(full.mul_f64(0.1 + 0.8 * frac).max(Duration::from_millis(1)));
        let _ = child.kill();
        let _ = child.wait();
    }
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&out, &src));
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp").args(["-a", from.to_str().unwrap(), to.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
}

/// Sets a small pack size in a fresh repository's config (plain JSON), so a small corpus makes
/// many packs and prune has real deleting and repacking to do.
fn small_packs(e: &Env, size: u32) {
    let p = e.repo.join("config");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    v["pack_size"] = size.into();
    fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn twenty_kill_9_during_prune_never_lose_a_kept_snapshot() {
    let e = Env::new();
    small_packs(&e, 256 * 1024);
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    let s = src.to_str().unwrap();
    let mut seed = 0xdead_2026_u64;
    // Six generations; each rewrites a third of the files, so old versions become garbage
    // scattered over packs that also hold live data.
    for i in 0..30u64 {
        fs::write(src.join(format!("f{i:02}")), bytes(60_000 + (i as usize * 4000), i)).unwrap();
    }
    let mut kept = Vec::new();
    for round in 0..6u64 {
        for _ in 0..10 {
            let i = xorshift(&mut seed) % 30;
            fs::write(src.join(format!("f{i:02}")), bytes(60_000 + (i as usize * 4000), 100 + round * 50 + i)).unwrap();
        }
        let id = e.json(&["backup", s])["snapshot"].as_str().unwrap().to_string();
        if round >= 4 {
            let copy = e.path(&format!("gen{round}"));
            copy_dir(&src, &copy);
            kept.push((id, copy));
        }
    }
    e.ok(&["forget", "--keep-last", "2"]);
    let template = e.path("template");
    copy_dir(&e.repo, &template);
    let work = e.repo.clone();
    let reset = || {
        fs::remove_dir_all(&work).unwrap();
        copy_dir(&template, &work);
    };
    // How long an uninterrupted prune takes here, and how much of it is opening the repository
    // (the key derivation): kills are spread over the rest, where prune works.
    let mut opens: Vec<Duration> = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            e.ok(&["snapshots", "--quiet"]);
            t0.elapsed()
        })
        .collect();
    opens.sort();
    let open = opens[1];
    reset();
    let t0 = Instant::now();
    let full = e.json(&["prune", "--max-unused", "0%"]);
    let dur = t0.elapsed();
    let work = dur.saturating_sub(open);
    assert!(full["packs_deleted"].as_u64().unwrap() > 0 && full["packs_repacked"].as_u64().unwrap() > 0, "{full}");

    // Twenty kills must land in a running prune; a kill that came too late (a loaded machine
    // makes runs faster or slower than measured) does not count and shortens the next delays.
    let mut killed_mid_run = 0;
    let mut killed_after_plan = 0;
    let mut scale = 1.0;
    for round in 0..60 {
        if killed_mid_run == 20 {
            break;
        }
        reset();
        let frac = (xorshift(&mut seed) % 1000) as f64 / 1000.0;
        let mut child = e.cmd(&["prune", "--max-unused", "0%", "--quiet"]).spawn().unwrap();
        std::thread::sleep((open.mul_f64(0.9) + work.mul_f64(1.2 * frac)).mul_f64(scale));
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        } else {
            scale *= 0.85;
        }
        let _ = child.kill();
        let _ = child.wait();
        // Plan objects only: a write the kill cut short leaves a `.tmp-` file, which is no object.
        let plans = || -> Vec<String> {
            e.repo.join("plans").read_dir().unwrap().flatten().map(|d| d.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect()
        };
        if !plans().is_empty() {
            killed_after_plan += 1;
        }
        // Straight after the kill: the kept snapshots are complete (structure check), ...
        let o = e.run(&["check"]);
        assert!(o.status.success(), "round {round}: check after kill failed: {}", stderr(&o));
        // ... and the next prune finishes the work without any manual step.
        let r = e.json(&["prune", "--max-unused", "0%"]);
        assert!(r["plans_deferred"].as_array().unwrap().is_empty(), "round {round}: {r}");
        assert!(plans().is_empty(), "round {round}: a plan is left: {:?}", plans());
        e.ok(&["check", "--read-data"]);
        {
            for (id, copy) in &kept {
                let out = e.path(&format!("out{round}-{}", &id[..8]));
                e.ok(&["restore", &id[..8], "--target", out.to_str().unwrap()]);
                assert_same_tree(copy, &restored(&out, &src));
            }
        }
    }
    eprintln!("{killed_mid_run} kills hit a running prune, {killed_after_plan} between plan and sweep end");
    assert_eq!(killed_mid_run, 20, "too few kills hit a running prune");
}
