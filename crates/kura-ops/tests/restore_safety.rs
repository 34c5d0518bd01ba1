//! Restore never writes outside its target, whatever a (crafted or damaged) snapshot holds:
//! `..`, absolute or slash-containing names, and symlinks planted to redirect a later restore.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kura_ops::NoProgress;
use kura_ops::restore::{RestoreOptions, restore};
use kura_repo::{BlobKind, Id, KdfParams, Node, NodeKind, Repository, Tree};
use std::fs;
use std::path::Path;
use std::sync::Arc;

const FAST: KdfParams = KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 };

fn repo(dir: &Path) -> Repository {
    let store = Arc::new(kura_store::LocalStore::create(&dir.join("repo")).unwrap());
    Repository::init(store, b"pw", FAST).unwrap()
}

/// Saves a tree exactly as given, bypassing the sorting and checks of `Tree::new`.
fn raw_tree(r: &Repository, nodes: Vec<Node>) -> Id {
    let t = Tree { version: 1, nodes };
    let (id, _) = r.save_blob(BlobKind::Tree, &t.encode()).unwrap();
    r.flush().unwrap();
    id
}

fn file(r: &Repository, name: &[u8], data: &[u8]) -> Node {
    let (id, _) = r.save_blob(BlobKind::Data, data).unwrap();
    let mut n = Node::new(name.to_vec(), NodeKind::File);
    n.mode = 0o644;
    n.size = data.len() as u64;
    n.content = vec![id];
    n
}

fn dir_node(name: &[u8], sub: Id) -> Node {
    let mut n = Node::new(name.to_vec(), NodeKind::Dir);
    n.mode = 0o755;
    n.subtree = Some(sub);
    n
}

fn listing(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn crafted_names_cannot_escape_the_target() {
    let d = tempfile::tempdir().unwrap();
    let r = repo(d.path());
    let target = d.path().join("sandbox/target");
    fs::create_dir_all(&target).unwrap();
    let before = listing(d.path());
    for evil in [&b".."[..], b".", b"../escape", b"/etc/escape", b"a/../../escape", b"", b"x\0y"] {
        let f = file(&r, evil, b"pwned");
        let t = raw_tree(&r, vec![f]);
        let res = restore(&r, &t, &RestoreOptions { target: target.clone(), ..Default::default() }, &NoProgress, None);
        let err = res.expect_err("crafted name accepted").to_string();
        assert!(err.contains("unsafe entry name"), "{evil:?}: {err}");
        // One level down too: a directory whose child is evil.
        let inner = raw_tree(&r, vec![file(&r, evil, b"pwned")]);
        let t = raw_tree(&r, vec![dir_node(b"sub", inner)]);
        let _ = restore(&r, &t, &RestoreOptions { target: target.clone(), ..Default::default() }, &NoProgress, None);
    }
    assert_eq!(listing(d.path()), before, "something was written beside the target");
    assert!(listing(&d.path().join("sandbox")) == vec!["target".to_string()]);
    assert!(!d.path().join("escape").exists() && !Path::new("/etc/escape").exists());
}

#[test]
fn a_symlink_planted_by_one_snapshot_cannot_redirect_the_next_restore() {
    let d = tempfile::tempdir().unwrap();
    let r = repo(d.path());
    let outside = d.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let target = d.path().join("target");
    // Snapshot 1: "link" -> outside.
    let mut link = Node::new(b"link".to_vec(), NodeKind::Symlink);
    link.target = outside.to_string_lossy().as_bytes().to_vec();
    let t1 = raw_tree(&r, vec![link]);
    // Snapshot 2: a directory "link" holding "pwned", and a file "link2" where the target has a symlink.
    let inner = raw_tree(&r, vec![file(&r, b"pwned", b"x")]);
    let t2 = raw_tree(&r, vec![dir_node(b"link", inner)]);
    restore(&r, &t1, &RestoreOptions { target: target.clone(), ..Default::default() }, &NoProgress, None).unwrap();
    assert!(fs::symlink_metadata(target.join("link")).unwrap().file_type().is_symlink());
    let err = restore(&r, &t2, &RestoreOptions { target: target.clone(), ..Default::default() }, &NoProgress, None)
        .expect_err("restored through a symlink");
    assert!(err.to_string().contains("is a symlink"), "{err}");
    assert!(listing(&outside).is_empty(), "wrote through the symlink");
    // With --overwrite the symlink itself is replaced by a real directory.
    restore(&r, &t2, &RestoreOptions { target: target.clone(), overwrite: true, ..Default::default() }, &NoProgress, None).unwrap();
    assert!(listing(&outside).is_empty(), "wrote through the symlink");
    assert!(fs::symlink_metadata(target.join("link")).unwrap().is_dir());
    assert_eq!(fs::read(target.join("link/pwned")).unwrap(), b"x");
}

#[test]
fn a_file_over_an_existing_symlink_replaces_the_link_not_its_target() {
    let d = tempfile::tempdir().unwrap();
    let r = repo(d.path());
    let victim = d.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let target = d.path().join("target");
    fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&victim, target.join("f")).unwrap();
    let t = raw_tree(&r, vec![file(&r, b"f", b"new")]);
    let err = restore(&r, &t, &RestoreOptions { target: target.clone(), ..Default::default() }, &NoProgress, None);
    assert!(err.is_err(), "overwrote without --overwrite");
    restore(&r, &t, &RestoreOptions { target: target.clone(), overwrite: true, ..Default::default() }, &NoProgress, None).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(fs::read(target.join("f")).unwrap(), b"new");
    assert!(!fs::symlink_metadata(target.join("f")).unwrap().file_type().is_symlink());
}

#[test]
fn a_chunk_that_does_not_match_its_id_is_never_written() {
    let d = tempfile::tempdir().unwrap();
    let r = repo(d.path());
    let mut f = file(&r, b"f", b"real content");
    // Claim a size that disagrees with the content: restore must refuse, not write garbage.
    f.size = 999;
    let t = raw_tree(&r, vec![f]);
    let target = d.path().join("target");
    let err = restore(&r, &t, &RestoreOptions { target: target.clone(), ..Default::default() }, &NoProgress, None)
        .expect_err("inconsistent entry restored");
    assert!(err.to_string().contains("adds up to"), "{err}");
    assert!(listing(&target).is_empty(), "a partial file was left: {:?}", listing(&target));
}
