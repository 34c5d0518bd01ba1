//! A pull takes the source server's receive times for retention, but never places a snapshot
//! before what the replica already has of its group: a source that forged old receive times
//! must not push the replica's real generations out of their retention buckets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use jiff::Timestamp;
use kura_ops::NoProgress;
use kura_ops::backup::{BackupOptions, backup};
use kura_ops::pull::{Selection, pull};
use kura_repo::{KdfParams, Repository};
use kura_store::{Kind, LocalStore, Store, StoreError};
use std::sync::{Arc, Mutex};

const FAST: KdfParams = KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 };

fn snap(repo: &Repository, dir: &std::path::Path, time: &str) -> String {
    std::fs::write(dir.join("f"), time).unwrap();
    let opts = BackupOptions { paths: vec![dir.to_path_buf()], host: "a".into(), time: Some(time.parse().unwrap()), threads: 1, ..Default::default() };
    backup(repo, &opts, &NoProgress, None).unwrap().snapshot
}

fn receipt(store: &dyn Store, snapshot: &str, received: &str) {
    let r = format!(r#"{{"version":1,"received":"{received}","claimed":"{received}","skew_seconds":0,"token":"t"}}"#);
    store.put_new(Kind::Receipt, snapshot, r.as_bytes()).unwrap();
}

#[test]
fn forged_old_receive_times_are_raised_to_the_replicas_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let src_store: Arc<dyn Store> = Arc::new(LocalStore::create(&tmp.path().join("src")).unwrap());
    let dst_store: Arc<dyn Store> = Arc::new(LocalStore::create(&tmp.path().join("dst")).unwrap());
    let repo = Repository::init(src_store.clone(), b"pw", FAST).unwrap();
    repo.load_index().unwrap();

    // First fill: the source's receive times are taken as they are.
    let first = snap(&repo, &data, "2026-01-10T00:00:00Z");
    receipt(src_store.as_ref(), &first, "2026-01-10T00:05:00Z");
    let seen: Mutex<Vec<(String, Option<Timestamp>)>> = Mutex::new(Vec::new());
    let put = |name: &str, bytes: &[u8], received: Option<Timestamp>| -> Result<(), StoreError> {
        seen.lock().unwrap().push((name.to_string(), received));
        dst_store.put_new(Kind::Snapshot, name, bytes)
    };
    let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
    let r = pull(&src_store, &dst_store, &Selection::default(), now, &put).unwrap();
    assert_eq!(r.pulled, vec![first.clone()]);
    assert_eq!(seen.lock().unwrap()[0].1, Some("2026-01-10T00:05:00Z".parse().unwrap()));

    // A later snapshot whose receipt claims it arrived last year: raised to the replica's newest.
    let later = snap(&repo, &data, "2026-02-10T00:00:00Z");
    receipt(src_store.as_ref(), &later, "2025-01-01T00:00:00Z");
    // One with an honest receipt keeps its time.
    let honest = snap(&repo, &data, "2026-02-20T00:00:00Z");
    receipt(src_store.as_ref(), &honest, "2026-02-20T00:01:00Z");
    let r = pull(&src_store, &dst_store, &Selection::default(), now, &put).unwrap();
    assert_eq!(r.pulled, vec![later.clone(), honest.clone()]);
    let seen = seen.lock().unwrap();
    assert_eq!(seen[1], (later, Some("2026-01-10T00:00:00Z".parse().unwrap())));
    assert_eq!(seen[2], (honest, Some("2026-02-20T00:01:00Z".parse().unwrap())));
}
