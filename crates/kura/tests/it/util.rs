//! Test helpers: a temporary repository, running the binary, comparing trees.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_kura");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
}

impl Env {
    /// A temp dir with an initialised repository at `repo`.
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let e = Env { dir, repo };
        e.ok(&["init"]);
        e
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-r").arg(&self.repo).args(args);
        c.env("KURA_PASSWORD", "test-pass").env("HOME", self.dir.path()).env_remove("KURA_REPOSITORY");
        c.env_remove("KURA_PASSWORD_FILE");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "kura {args:?} failed ({:?}): {}", o.status.code(), String::from_utf8_lossy(&o.stderr));
        no_panic(&o);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

pub fn no_panic(o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "panic: {err}");
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

#[derive(Debug, PartialEq)]
pub struct Meta {
    kind: &'static str,
    mode: u32,
    mtime: i64,
    content: Option<blake3::Hash>,
    target: Option<PathBuf>,
}


/// Whether two trees are the same (as [`assert_same_tree`] checks), false also while one is
/// changing under the walk (an entry that vanished between listing and reading).
pub fn same_tree(a: &Path, b: &Path) -> bool {
    matches!((try_snapshot_tree(a), try_snapshot_tree(b)), (Ok(x), Ok(y)) if x == y)
}

fn try_snapshot_tree(root: &Path) -> std::io::Result<BTreeMap<PathBuf, Meta>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            let ft = m.file_type();
            if ft.is_dir() {
                stack.push(p.clone());
            }
            let kind = if ft.is_dir() { "dir" } else if ft.is_symlink() { "link" } else if ft.is_fifo() { "fifo" } else { "file" };
            let meta = Meta {
                kind,
                mode: if ft.is_symlink() { 0 } else { m.mode() & 0o7777 },
                mtime: if ft.is_dir() { 0 } else { m.mtime() },
                content: if ft.is_file() { Some(blake3::hash(&std::fs::read(&p)?)) } else { None },
                target: if ft.is_symlink() { Some(std::fs::read_link(&p)?) } else { None },
            };
            out.insert(p.strip_prefix(root).map_err(std::io::Error::other)?.to_path_buf(), meta);
        }
    }
    Ok(out)
}

/// Everything below `root` that a restore must reproduce.
pub fn snapshot_tree(root: &Path) -> BTreeMap<PathBuf, Meta> {
    try_snapshot_tree(root).unwrap_or_else(|e| panic!("reading {}: {e}", root.display()))
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    let (x, y) = (snapshot_tree(a), snapshot_tree(b));
    for (k, v) in &x {
        assert_eq!(Some(v), y.get(k), "entry {} differs", k.display());
    }
    assert_eq!(x.len(), y.len(), "restore has extra entries: {:?}", y.keys().filter(|k| !x.contains_key(*k)).collect::<Vec<_>>());
}

/// Where `kura restore` puts an absolute source path below `target`.
pub fn restored(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `dir/src<seed>`: one file of `big` bytes, `small` files in `sub/` and a symlink.
pub fn sample_tree(dir: &Path, seed: u64, big: usize, small: u64) -> PathBuf {
    let src = dir.join(format!("src{seed}"));
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("big.bin"), bytes(big, seed)).unwrap();
    for i in 0..small {
        std::fs::write(src.join("sub").join(format!("f{i}")), bytes(500 + i as usize * 91, seed + i)).unwrap();
    }
    std::os::unix::fs::symlink("sub/f1", src.join("link")).unwrap();
    src
}
