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
