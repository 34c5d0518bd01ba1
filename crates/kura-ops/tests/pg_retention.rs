//! PostgreSQL WAL snapshots under a retention policy: base backups are generations like any
//! others, and a WAL file lives exactly as long as a kept base backup replays from it, whatever
//! the policy or the filters of the run say. Forgetting WAL by calendar would break every
//! point-in-time restore between two kept base backups.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kura_ops::NoProgress;
use kura_ops::backup::{BackupOptions, backup};
use kura_ops::forget::{ForgetOptions, GroupBy, plan};
use kura_ops::pg::{self, wal_push};
use kura_ops::retention::{Count, Policy};
use kura_repo::{KdfParams, Repository};
use kura_store::{LocalStore, Store};
use std::sync::Arc;

const FAST: KdfParams = KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 };

fn seg(n: u32) -> String {
    format!("00000001000000000000{n:04X}")
}

/// Which WAL files and base backups a policy keeping the newest `last` base backups keeps.
fn kept(repo: &Repository, last: u64, tags: &[&str]) -> (Vec<String>, Vec<String>) {
    let policy = Policy { last: Count::Max(last), ..Default::default() };
    let opts = ForgetOptions {
        group_by: GroupBy::default(),
        tz: jiff::tz::TimeZone::UTC,
        now: "2026-12-31T00:00:00Z".parse().unwrap(),
        host: None,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };
    // As a policy file with no section for the WAL's group and no [keep] table: the WAL
    // archive needs no policy of its own.
    let policy_for = |k: &kura_ops::forget::GroupKey| {
        if k.paths.as_ref().is_some_and(|p| p.iter().any(|x| x.starts_with("/postgresql/"))) {
            Err(format!("{k}: no policy section matches this group"))
        } else {
            Ok(policy.clone())
        }
    };
    let (plans, warnings) = plan(repo, &opts, &policy_for).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let (mut wal, mut bases) = (Vec::new(), Vec::new());
    for d in plans.iter().flat_map(|g| &g.snapshots).filter(|d| d.keep) {
        match pg::wal_of(&d.tags) {
            Some((name, _)) => wal.push(name.to_string()),
            None => bases.push(d.time.clone()),
        }
    }
    wal.sort();
    bases.sort();
    (wal, bases)
}

#[test]
fn wal_lives_as_long_as_a_kept_base_backup_replays_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(&tmp.path().join("repo")).unwrap());
    let repo = Repository::init(store, b"pw", FAST).unwrap();
    repo.load_index().unwrap();
    let wal_dir = tmp.path().join("pg_wal");
    std::fs::create_dir(&wal_dir).unwrap();
    let push = |name: &str| {
        let f = wal_dir.join(name);
        std::fs::write(&f, name.repeat(1000)).unwrap();
        wal_push(&repo, &f, "main", "db1").unwrap();
    };
    for n in 1..=10 {
        push(&seg(n));
    }
    push("00000002.history");

    // No base backup yet: the archive is all there is, and all of it stays.
    let (wal, bases) = kept(&repo, 1, &[]);
    assert_eq!(wal.len(), 11, "{wal:?}");
    assert!(bases.is_empty());

    let staging = tmp.path().join("base");
    std::fs::create_dir(&staging).unwrap();
    for (day, start) in [(1, 2), (5, 6), (9, 10)] {
        std::fs::write(staging.join("PG_VERSION"), format!("15 {day}")).unwrap();
        let opts = BackupOptions {
            paths: vec![staging.clone()],
            host: "db1".into(),
            tags: vec![pg::BASE_TAG.into(), "pg-cluster=main".into(), format!("pg-start-wal={}", seg(start))],
            time: Some(format!("2026-12-{day:02}T00:00:00Z").parse().unwrap()),
            threads: 1,
            ..Default::default()
        };
        backup(&repo, &opts, &NoProgress, None).unwrap();
    }
    // The newest two base backups start at segments 6 and 10: segments 1-5 go, the timeline
    // history stays.
    let (wal, bases) = kept(&repo, 2, &[]);
    let mut want: Vec<String> = (6..=10).map(seg).collect();
    want.push("00000002.history".into());
    want.sort();
    assert_eq!(wal, want);
    assert_eq!(bases, vec!["2026-12-05T00:00:00Z", "2026-12-09T00:00:00Z"]);

    // A run that looks at WAL snapshots only still counts the base backups it leaves alone:
    // all three stay, so only segment 1, older than the oldest, may go.
    let (wal_only, bases) = kept(&repo, 1, &[pg::WAL_TAG]);
    let mut all: Vec<String> = (2..=10).map(seg).collect();
    all.push("00000002.history".into());
    all.sort();
    assert!(bases.is_empty());
    assert_eq!(wal_only, all, "WAL of base backups this run did not judge was forgotten");

    // Keeping only the newest: segments from 10 on.
    let (wal, _) = kept(&repo, 1, &[]);
    assert_eq!(wal, vec![seg(10), "00000002.history".into()]);

    // Another cluster's WAL is judged by that cluster's base backups (it has none yet).
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join(seg(1)), b"other cluster").unwrap();
    wal_push(&repo, &other.join(seg(1)), "other", "db1").unwrap();
    let (wal, _) = kept(&repo, 1, &[]);
    assert_eq!(wal, vec![seg(1), seg(10), "00000002.history".into()]);
}
