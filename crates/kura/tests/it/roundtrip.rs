//! Backup and restore round-trips: every kind of entry, incremental runs, stdin, excludes,
//! listings, diff, keys and resumable restores.

use crate::util::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

fn awkward_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let p = root.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    };
    w("empty", b"");
    w("small.txt", b"hello\n");
    w("日本語/雲が消えた日.txt", &"データ\n".repeat(1000).into_bytes());
    w("newline\nname", b"x");
    w("spaces and 'quotes'/\"q\" $x.txt", b"odd");
    w("big/random.bin", &bytes(5 << 20, 1));
    w("big/repeat.bin", &bytes(1 << 20, 2).repeat(4));
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    symlink("small.txt", root.join("link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    fs::hard_link(root.join("small.txt"), root.join("hardlink")).unwrap();
    let f = fs::File::create(root.join("sparse.img")).unwrap();
    f.set_len(32 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"end", (32 << 20) - 3).unwrap();
    fs::create_dir(root.join("private")).unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::mknodat(rustix::fs::CWD, root.join("fifo"), rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o644), 0).unwrap();
    let _ = xattr::set(root.join("small.txt"), "user.kura", b"attr-value");
    let mtime = filetime::FileTime::from_unix_time(1_000_000_000, 0);
    filetime::set_file_mtime(root.join("small.txt"), mtime).unwrap();
}

#[test]
fn awkward_tree_round_trips_bit_exact() {
    let e = Env::new();
    let src = e.path("src");
    awkward_tree(&src);
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let r = restored(&out, &src);
    assert_same_tree(&src, &r);
    let ino = |p: &str| fs::metadata(r.join(p)).unwrap().ino();
    assert_eq!(ino("small.txt"), ino("hardlink"), "hardlink restored as a copy");
    assert!(fs::metadata(r.join("sparse.img")).unwrap().blocks() < 1024, "sparse file restored dense");
    if xattr::get(src.join("small.txt"), "user.kura").ok().flatten().is_some() {
        assert_eq!(xattr::get(r.join("small.txt"), "user.kura").unwrap().as_deref(), Some(&b"attr-value"[..]));
    }
    e.ok(&["check", "--read-data"]);
}

#[test]
fn unchanged_files_are_not_read_again_and_parent_is_found() {
    let e = Env::new();
    let src = e.path("src");
    for i in 0..20 {
        fs::create_dir_all(src.join(format!("d{}", i % 3))).unwrap();
        fs::write(src.join(format!("d{}/f{i}", i % 3)), bytes(10_000 + i, i as u64)).unwrap();
    }
    let s = src.to_str().unwrap();
    let first = e.json(&["backup", s]);
    assert_eq!(first["summary"]["files_new"], 20);
    fs::write(src.join("d0/f0"), b"changed").unwrap();
    let second = e.json(&["backup", s]);
    assert_eq!(second["parent"], first["snapshot"]);
    assert_eq!(second["summary"]["files_unchanged"], 19);
    assert_eq!(second["summary"]["files_changed"], 1);
    // Only the changed file is read (twice, as it was modified seconds ago).
    let read = second["summary"]["bytes_read"].as_u64().unwrap();
    assert!(read == 7 || read == 14, "read {read} bytes");
    let d = e.ok(&["diff", &first["snapshot"].as_str().unwrap()[..8], "latest"]);
    assert!(d.contains(&format!("M  {s}/d0/f0")), "{d}");
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&out, &src));
}

#[test]
fn stdin_dump_round_trips_and_dedups() {
    let e = Env::new();
    let dump = bytes(3 << 20, 7);
    for _ in 0..2 {
        let mut c = e.cmd(&["backup", "--stdin", "--stdin-filename", "dump.sql", "--json"]);
        c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&dump).unwrap();
        assert!(child.wait_with_output().unwrap().status.success());
    }
    let snaps = e.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    let added = snaps[1]["summary"]["bytes_added"].as_u64().unwrap();
    assert!(added < 1000, "identical dump added {added} bytes, more than its tree");
    assert!(e.ok(&["ls", "latest"]).contains("/dump.sql"));
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("dump.sql")).unwrap(), dump);
}

#[test]
fn excludes_tags_host_and_time_are_recorded() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(src.join("cache")).unwrap();
    fs::write(src.join("keep.txt"), b"k").unwrap();
    fs::write(src.join("skip.tmp"), b"s").unwrap();
    fs::write(src.join("cache/x"), b"c").unwrap();
    let ex = e.path("excludes");
    fs::write(&ex, "cache/\n").unwrap();
    e.ok(&["backup", src.to_str().unwrap(), "--exclude", "*.tmp", "--exclude-file", ex.to_str().unwrap(),
        "--tag", "nightly", "--host", "db1", "--time", "2026-11-21T14:05:00Z"]);
    let ls = e.ok(&["ls", "latest"]);
    assert!(ls.contains("keep.txt") && !ls.contains("skip.tmp") && !ls.contains("cache"), "{ls}");
    let s = &e.json(&["snapshots", "--host", "db1"])[0];
    assert_eq!(s["tags"][0], "nightly");
    assert_eq!(s["time"], "2026-11-21T14:05:00Z");
}

#[test]
fn restore_refuses_to_overwrite_then_resumes_and_overwrites_on_request() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..10 {
        fs::write(src.join(format!("f{i}")), bytes(50_000, i)).unwrap();
    }
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    let r = restored(&out, &src);
    fs::create_dir_all(&r).unwrap();
    fs::write(r.join("f3"), b"local edit").unwrap();
    let o = e.run(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("f3 already exists"), "{}", stderr(&o));
    assert_eq!(fs::read(r.join("f3")).unwrap(), b"local edit", "existing file was touched");
    // A half-written temporary from a killed restore is cleaned up and the restore completes.
    fs::write(r.join(".kura-restore-deadbeef"), b"partial").unwrap();
    let res = e.json(&["restore", "latest", "--target", out.to_str().unwrap(), "--overwrite"]);
    assert!(res["result"]["files_restored"].as_u64().unwrap() >= 1);
    assert_same_tree(&src, &r);
    let again = e.json(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(again["result"]["files_restored"], 0, "a complete restore was redone");
    assert_eq!(again["result"]["files_skipped"], 10);
}

#[test]
fn include_restores_only_the_named_path() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(src.join("a")).unwrap();
    fs::create_dir_all(src.join("b")).unwrap();
    fs::write(src.join("a/x"), b"x").unwrap();
    fs::write(src.join("b/y"), b"y").unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    let inc = format!("{}/a", src.display());
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap(), "--include", &inc]);
    let r = restored(&out, &src);
    assert_eq!(fs::read(r.join("a/x")).unwrap(), b"x");
    assert!(!r.join("b").exists());
    let o = e.run(&["restore", "latest", "--target", out.to_str().unwrap(), "--include", "/nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not in the snapshot"));
}

#[test]
fn keys_can_be_added_listed_changed_and_removed() {
    let e = Env::new();
    let o = e.cmd(&["key", "add"]).env("KURA_NEW_PASSWORD", "second").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let keys = e.json(&["key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let other = keys.as_array().unwrap().iter().find(|k| k["current"] == false).unwrap()["id"].as_str().unwrap().to_string();
    // The second password opens the repository; the key in use cannot remove itself.
    let o = e.cmd(&["snapshots"]).env("KURA_PASSWORD", "second").output().unwrap();
    assert!(o.status.success());
    let o = e.cmd(&["key", "remove", &other[..8]]).env("KURA_PASSWORD", "second").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("opened this session"));
    e.ok(&["key", "remove", &other[..8]]);
    let o = e.cmd(&["key", "passwd"]).env("KURA_NEW_PASSWORD", "third").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(e.run(&["snapshots"]).status.code(), Some(12));
    assert!(e.cmd(&["snapshots"]).env("KURA_PASSWORD", "third").output().unwrap().status.success());
}

#[test]
fn default_repository_is_created_on_first_backup_with_an_owner_only_key() {
    let home = tempfile::tempdir().unwrap();
    let src = home.path().join("docs");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(BIN).args(args).env("HOME", home.path())
            .env_remove("KURA_REPOSITORY").env_remove("KURA_PASSWORD").env_remove("KURA_PASSWORD_FILE")
            .env_remove("XDG_DATA_HOME").env_remove("XDG_CONFIG_HOME").output().unwrap()
    };
    let o = run(&["backup", src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = home.path().join(".config/kura/default-repository.password");
    assert!(stderr(&o).contains(key.to_str().unwrap()), "not told where the key is: {}", stderr(&o));
    assert!(stderr(&o).contains("keep a copy"));
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    assert!(home.path().join(".local/share/kura/repository/config").exists());
    let o = run(&["backup", src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("generated"), "second run generated another key");
    let o = run(&["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[test]
fn ownership_is_restored_when_root() {
    if !is_root() {
        // Only root may chown; as another user the owner is the restoring user by definition.
        return;
    }
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("owned"), b"x").unwrap();
    std::os::unix::fs::lchown(src.join("owned"), Some(1234), Some(5678)).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let m = fs::metadata(restored(&out, &src).join("owned")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
}

#[test]
fn one_file_system_stops_at_a_mount_point() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(src.join("mnt")).unwrap();
    fs::write(src.join("here.txt"), b"here").unwrap();
    // A real tmpfs mounted inside the source, in a private mount namespace.
    let script = format!(
        r#"set -e
mount -t tmpfs tmpfs {src}/mnt
echo other > {src}/mnt/elsewhere.txt
KURA_PASSWORD=test-pass {bin} -r {repo} backup -x {src} --json > {dir}/x.json
KURA_PASSWORD=test-pass {bin} -r {repo} backup {src} --json > {dir}/all.json
"#,
        src = src.display(), bin = BIN, repo = e.repo.display(), dir = e.dir.path().display()
    );
    let st = std::process::Command::new("unshare").args(["-rm", "bash", "-c", &script]).status().unwrap();
    assert!(st.success());
    let read = |n: &str| -> serde_json::Value { serde_json::from_str(&fs::read_to_string(e.path(n)).unwrap()).unwrap() };
    let (x, all) = (read("x.json"), read("all.json"));
    let ls = |id: &serde_json::Value| e.ok(&["ls", &id.as_str().unwrap()[..8]]);
    let (lx, lall) = (ls(&x["snapshot"]), ls(&all["snapshot"]));
    assert!(lx.contains("/mnt\n") && !lx.contains("elsewhere.txt") && lx.contains("here.txt"), "{lx}");
    assert!(lall.contains("elsewhere.txt"), "{lall}");
}

#[test]
fn cat_prints_every_kind_of_object() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"content of f").unwrap();
    let snap = e.json(&["backup", src.to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();
    let cfg: serde_json::Value = serde_json::from_str(&e.ok(&["cat", "config"])).unwrap();
    assert_eq!(cfg["version"], 1);
    let s: serde_json::Value = serde_json::from_str(&e.ok(&["cat", "snapshot", &snap[..8]])).unwrap();
    let tree = s["tree"].as_str().unwrap().to_string();
    assert!(!s["packs"].as_array().unwrap().is_empty());
    let t: serde_json::Value = serde_json::from_str(&e.ok(&["cat", "tree", &tree])).unwrap();
    assert_eq!(t["nodes"].as_array().unwrap().len(), 1);
    let pack = s["packs"][0].as_str().unwrap();
    let h: serde_json::Value = serde_json::from_str(&e.ok(&["cat", "pack", &pack[..12]])).unwrap();
    assert!(!h["entries"].as_array().unwrap().is_empty());
    let idx = fs::read_dir(e.repo.join("index")).unwrap().next().unwrap().unwrap().file_name();
    let i: serde_json::Value = serde_json::from_str(&e.ok(&["cat", "index", &idx.to_string_lossy()[..12]])).unwrap();
    assert_eq!(i["version"], 1);
    let o = e.run(&["cat", "bogus"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_source_below_a_symlinked_directory_is_backed_up() {
    let e = Env::new();
    fs::create_dir_all(e.path("real/data")).unwrap();
    fs::write(e.path("real/data/f"), b"through the link").unwrap();
    symlink(e.path("real"), e.path("link")).unwrap();
    let src = e.path("link/data");
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(fs::read(restored(&out, &src).join("f")).unwrap(), b"through the link");
}

#[test]
fn a_resumed_restore_checks_content_not_just_size_and_mtime() {
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), bytes(100_000, 9)).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    // What a power cut can leave: the name, size and mtime survived, the data did not.
    let f = restored(&out, &src).join("f");
    let mtime = filetime::FileTime::from_last_modification_time(&fs::metadata(&f).unwrap());
    fs::write(&f, vec![0u8; 100_000]).unwrap();
    filetime::set_file_mtime(&f, mtime).unwrap();
    let o = e.run(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "a damaged file was taken as restored");
    assert!(stderr(&o).contains("already exists and differs"), "{}", stderr(&o));
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap(), "--overwrite"]);
    assert_eq!(fs::read(&f).unwrap(), bytes(100_000, 9));
}

#[test]
fn device_nodes_round_trip_when_root() {
    if !is_root() {
        // Creating device nodes needs root, for the source as for the restore.
        return;
    }
    let e = Env::new();
    let src = e.path("src");
    fs::create_dir_all(&src).unwrap();
    let dev = rustix::fs::makedev(1, 3);
    rustix::fs::mknodat(rustix::fs::CWD, src.join("null"), rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::from_raw_mode(0o640), dev).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let m = fs::symlink_metadata(restored(&out, &src).join("null")).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(m.file_type().is_char_device());
    assert_eq!((m.rdev(), m.mode() & 0o777), (dev, 0o640));
}
