//! Damaged repository objects: a bit flip, a truncation or a zero-length file in a pack, an index
//! file or a snapshot gives a clear error naming the object (and the affected snapshot), never a
//! panic, and damage in one object does not take the rest of the repository with it.

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug)]
enum Damage {
    Flip,
    Truncate,
    Zero,
}

fn damage(p: &Path, how: Damage) {
    let mut b = fs::read(p).unwrap();
    match how {
        Damage::Flip => {
            let i = b.len() / 3;
            b[i] ^= 0x40;
        }
        Damage::Truncate => b.truncate(b.len() / 2),
        Damage::Zero => b.clear(),
    }
    fs::write(p, b).unwrap();
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { v.extend(files(&p)); } else { v.push(p); }
    }
    v.sort();
    v
}

fn largest(dir: &Path) -> PathBuf {
    files(dir).into_iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap()
}

struct Setup {
    e: Env,
    src: PathBuf,
    snap: String,
}

fn setup() -> Setup {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(src.join("docs")).unwrap();
    fs::write(src.join("docs/big.bin"), bytes(3 << 20, 5)).unwrap();
    fs::write(src.join("small.txt"), b"small").unwrap();
    let snap = e.json(&["backup", src.to_str().unwrap()])["snapshot"].as_str().unwrap()[..8].to_string();
    Setup { e, src, snap }
}

#[test]
fn damaged_packs_are_named_with_the_snapshots_and_files_they_affect() {
    for how in [Damage::Flip, Damage::Truncate, Damage::Zero] {
        let s = setup();
        let pack = largest(&s.e.repo.join("data"));
        let name = pack.file_name().unwrap().to_str().unwrap().to_string();
        damage(&pack, how);
        let o = s.e.run(&["check", "--read-data"]);
        assert_eq!(o.status.code(), Some(1), "{how:?}");
        no_panic(&o);
        let err = stderr(&o);
        assert!(err.contains(&name[..16]), "{how:?}: check does not name the pack: {err}");
        assert!(err.contains(&s.snap), "{how:?}: check does not name the snapshot: {err}");
        assert!(err.contains("big.bin"), "{how:?}: check does not name the file: {err}");
        let out = s.e.path("out");
        let o = s.e.run(&["restore", "latest", "--target", out.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{how:?}");
        no_panic(&o);
        let err = stderr(&o);
        assert!(err.contains(&name[..16]) && err.lines().count() == 1, "{how:?}: restore error: {err}");
    }
}

#[test]
fn a_damaged_index_is_reported_and_restore_rebuilds_it_from_packs() {
    for how in [Damage::Flip, Damage::Truncate, Damage::Zero] {
        let s = setup();
        let idx = files(&s.e.repo.join("index")).remove(0);
        let name = idx.file_name().unwrap().to_str().unwrap().to_string();
        damage(&idx, how);
        let o = s.e.run(&["check"]);
        assert_eq!(o.status.code(), Some(1), "{how:?}");
        assert!(stderr(&o).contains(&format!("index/{name}")), "{how:?}: {}", stderr(&o));
        let out = s.e.path("out");
        let o = s.e.run(&["restore", "latest", "--target", out.to_str().unwrap()]);
        assert!(o.status.success(), "{how:?}: restore with a damaged index failed: {}", stderr(&o));
        assert!(stderr(&o).contains(&format!("index/{name}")), "{how:?}: no warning names the index");
        assert_same_tree(&s.src, &restored(&out, &s.src));
        // The next backup writes a fresh index for the packs and needs no manual step: after it,
        // check passes and only notes the redundant damaged file.
        fs::write(s.src.join("new.txt"), b"new").unwrap();
        s.e.ok(&["backup", s.src.to_str().unwrap()]);
        let o = s.e.run(&["check", "--read-data"]);
        assert!(o.status.success(), "{how:?}: check after the repairing backup: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("index/{name}")), "{how:?}: redundant index not mentioned");
    }
}

#[test]
fn a_damaged_snapshot_is_named_and_the_others_stay_usable() {
    for how in [Damage::Flip, Damage::Truncate, Damage::Zero] {
        let s = setup();
        fs::write(s.src.join("later.txt"), b"later").unwrap();
        let second = s.e.json(&["backup", s.src.to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();
        let obj = s.e.repo.join("snapshots").join(&second);
        damage(&obj, how);
        let o = s.e.run(&["snapshots"]);
        assert_eq!(o.status.code(), Some(1), "{how:?}");
        no_panic(&o);
        assert!(stderr(&o).contains(&format!("snapshots/{second}")), "{how:?}: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains(&s.snap), "{how:?}: good snapshot not listed");
        let o = s.e.run(&["restore", &second[..8], "--target", s.e.path("x").to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(&format!("snapshots/{second}")), "{how:?}: {}", stderr(&o));
        let out = s.e.path("out");
        s.e.ok(&["restore", &s.snap, "--target", out.to_str().unwrap()]);
        let o = s.e.run(&["check"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(&second[..16]));
    }
}

#[test]
fn every_random_bit_flip_in_a_pack_is_detected_and_names_the_damaged_file() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    // Files below the minimum chunk size are one blob each, and all differ: a flip inside a
    // blob damages exactly one file.
    for i in 0..24u64 {
        fs::write(src.join(format!("file{i:02}")), bytes(20_000 + i as usize * 9_000, 300 + i)).unwrap();
    }
    // Small packs: most flips land in one of several data packs.
    let cfg = e.repo.join("config");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
    v["pack_size"] = (256 * 1024).into();
    fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    let template = e.path("template");
    fs::rename(&e.repo, &template).unwrap();
    let mut seed = 0xf11b_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut in_blob, mut in_header) = (0, 0);
    for round in 0..30 {
        let _ = fs::remove_dir_all(&e.repo);
        let st = std::process::Command::new("cp").args(["-a"]).arg(&template).arg(&e.repo).status().unwrap();
        assert!(st.success());
        let packs = files(&e.repo.join("data"));
        let pack = &packs[(next() % packs.len() as u64) as usize];
        let name = pack.file_name().unwrap().to_str().unwrap().to_string();
        let header = e.json(&["cat", "pack", &name]);
        let entries = header["entries"].as_array().unwrap();
        let mut b = fs::read(pack).unwrap();
        let at = (next() % b.len() as u64) as usize;
        b[at] ^= 1 << (next() % 8);
        fs::write(pack, &b).unwrap();
        let hit = entries.iter().any(|en| {
            let off = en["offset"].as_u64().unwrap() as usize;
            (off..off + en["length"].as_u64().unwrap() as usize).contains(&at)
        });
        let o = e.run(&["--json", "check", "--read-data"]);
        assert_eq!(o.status.code(), Some(1), "round {round}: flip at {at} of {name} not detected");
        no_panic(&o);
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let named: Vec<String> = r["damage"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|d| d["paths"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().split_once(':').unwrap().1.to_string()))
            .collect();
        assert!(!named.is_empty(), "round {round}: no file named: {r}");
        let trees = entries.iter().any(|en| en["kind"] == "Tree");
        if trees {
            // A damaged directory listing: directories are named (everything below them is
            // unrestorable), never a file.
            in_header += usize::from(!hit);
            in_blob += usize::from(hit);
            assert!(named.iter().all(|n| !n.contains("/file")), "round {round}: {r}");
        } else if hit {
            in_blob += 1;
            // Exactly the one file whose blob was hit: it fails to restore, another one restores.
            assert_eq!(named.len(), 1, "round {round}: {r}");
            let out = e.path(&format!("out{round}"));
            let bad = e.run(&["restore", "latest", "--target", out.to_str().unwrap(), "--include", &named[0]]);
            assert_eq!(bad.status.code(), Some(1), "round {round}: the named file restores");
            let other = (0..24).map(|i| format!("{}/file{i:02}", src.display())).find(|p| *p != named[0]).unwrap();
            e.ok(&["restore", "latest", "--target", out.to_str().unwrap(), "--include", &other]);
        } else {
            // Header or footer: every file of the pack is named.
            in_header += 1;
            assert_eq!(named.len(), entries.len(), "round {round}: {r}");
        }
    }
    assert!(in_blob >= 15, "only {in_blob} flips hit a blob ({in_header} hit headers)");
}

#[test]
fn deep_check_finds_a_blob_that_was_stored_wrong_even_when_the_pack_matches_its_name() {
    // A pack whose bytes match its name but hold a blob that does not verify is what a faulty
    // writer (not damage at rest) would leave: --read-data proves the bytes are as written,
    // --deep proves they also restore.
    let s = setup();
    let pack = largest(&s.e.repo.join("data"));
    let mut b = fs::read(&pack).unwrap();
    b[1000] ^= 0x10; // inside the first blob of big.bin
    let name = blake3::hash(&b).to_hex().to_string();
    fs::remove_file(&pack).unwrap();
    let dir = s.e.repo.join("data").join(&name[..2]);
    fs::write(dir.join(&name), &b).unwrap();
    s.e.ok(&["repair", "index"]);
    s.e.ok(&["check", "--read-data"]);
    let o = s.e.run(&["check", "--deep"]);
    assert_eq!(o.status.code(), Some(1));
    no_panic(&o);
    let err = stderr(&o);
    assert!(err.contains(&name[..16]) && err.contains("big.bin") && err.contains(&s.snap), "{err}");
}

#[test]
fn swapped_packs_are_found_by_the_fast_check_and_repair_index_makes_them_usable() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("one.bin"), bytes(1 << 20, 1)).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    fs::write(src.join("two.bin"), bytes(1 << 20, 2)).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    // The two data packs (the largest two files) trade places, as a confused storage might.
    let mut packs = files(&e.repo.join("data"));
    packs.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
    let (a, b) = (packs[0].clone(), packs[1].clone());
    let tmp = e.path("swap");
    fs::rename(&a, &tmp).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&tmp, &b).unwrap();
    let o = e.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    no_panic(&o);
    let err = stderr(&o);
    assert!(err.contains("index disagrees") && err.contains("one.bin") && err.contains("two.bin"), "{err}");
    // Rebuilt from the headers, every blob is found where it is; the bytes still do not match
    // their names, which only --read-data can see, and says.
    e.ok(&["repair", "index"]);
    e.ok(&["check"]);
    let o = e.run(&["check", "--read-data"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not match its name"), "{}", stderr(&o));
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&out, &src));
}
