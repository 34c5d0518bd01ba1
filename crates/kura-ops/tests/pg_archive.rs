//! The WAL archive's lookups: the local copies of snapshot objects that `wal-push` and
//! `wal-fetch` keep are checked against their ids and follow the repository, and a damaged
//! snapshot is an error, never "not archived" (PostgreSQL would end its recovery early on it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kura_ops::pg::{wal_fetch, wal_push};
use kura_repo::{KdfParams, Repository};
use kura_store::{Kind, LocalStore, Store};
use std::sync::Arc;

const FAST: KdfParams = KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 };

fn seg(n: u32) -> String {
    format!("00000001000000000000{n:04X}")
}

#[test]
fn cached_snapshot_copies_are_checked_and_follow_the_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(&tmp.path().join("repo")).unwrap());
    let cache_dir = tmp.path().join("cache");
    let cache = Arc::new(LocalStore::create(&cache_dir).unwrap());
    let repo = Repository::init(store.clone(), b"pw", FAST).unwrap().with_snapshot_cache(cache.clone());
    repo.load_index().unwrap();
    let wal = tmp.path().join("pg_wal");
    std::fs::create_dir(&wal).unwrap();
    let mut ids = Vec::new();
    for n in 1..=3 {
        std::fs::write(wal.join(seg(n)), format!("segment {n}").repeat(5000)).unwrap();
        ids.push(wal_push(&repo, &wal.join(seg(n)), "main", "db1").unwrap().snapshot);
    }
    let out = tmp.path().join("out");
    assert_eq!(wal_fetch(&repo, &seg(2), "main", None, &out).unwrap(), Some(ids[1].clone()));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(wal.join(seg(2))).unwrap());
    let cached: Vec<String> = cache.list(Kind::Snapshot).unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(cached.len(), 3, "{cached:?}");

    // A damaged copy in the cache is read past: the repository's object is used and kept again.
    let copy = cache_dir.join("snapshots").join(&ids[1]);
    let mut b = std::fs::read(&copy).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x40;
    std::fs::write(&copy, &b).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(wal_fetch(&repo, &seg(2), "main", None, &out).unwrap(), Some(ids[1].clone()));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(wal.join(seg(2))).unwrap());
    assert_eq!(std::fs::read(&copy).unwrap(), store.get(Kind::Snapshot, &ids[1]).unwrap());

    // A snapshot gone from the repository leaves the cache at the next look.
    store.delete(Kind::Snapshot, &ids[0]).unwrap();
    assert_eq!(wal_fetch(&repo, &seg(1), "main", None, &out).unwrap(), None);
    assert!(!cache_dir.join("snapshots").join(&ids[0]).exists());

    // Damage in the repository itself: not "not archived" but an error naming the object.
    let path = tmp.path().join("repo").join("snapshots").join(&ids[2]);
    let mut b = std::fs::read(&path).unwrap();
    b[20] ^= 1;
    std::fs::write(&path, &b).unwrap();
    std::fs::remove_file(cache_dir.join("snapshots").join(&ids[2])).unwrap();
    let plain = Repository::open(store.clone(), b"pw").unwrap();
    let err = wal_fetch(&plain, &seg(3), "main", None, &out).unwrap_err().to_string();
    assert!(err.contains(&ids[2]), "{err}");
}
