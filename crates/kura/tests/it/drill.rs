//! The First Server drill: the story's chain on loopback. A primary backs up to its repository
//! server A every (simulated) day; a daily server C pulls everything from A and a weekly server
//! D the newest of each week from C, each with only a read token. Then a buggy maintenance
//! script runs with the primary's credentials: it wipes the data, tries to delete on every
//! server it can reach, and uploads a fake and a future-dated snapshot. The newest daily state
//! comes back bit-exact from C, and every generation is still on C and D.

use crate::pull::{puller, run_job};
use crate::server::Server;
use crate::util::{assert_same_tree, bytes, stderr};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn backup_at(s: &Server, dir: &Path, time: &str) -> String {
    let out = s.ok(&s.backup, &["--json", "backup", "--time", time, dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["snapshot"].as_str().unwrap().to_string()
}

/// One day of a small customer site: new orders, a database file changed in place, an old
/// upload removed now and then.
fn one_day(data: &Path, day: u64) {
    std::fs::create_dir_all(data.join("orders")).unwrap();
    std::fs::create_dir_all(data.join("uploads")).unwrap();
    std::fs::write(data.join("orders").join(format!("day{day:02}.csv")), bytes(3000 + day as usize * 17, day)).unwrap();
    let db = data.join("shop.db");
    let mut content = std::fs::read(&db).unwrap_or_else(|_| bytes(400_000, 1000));
    let at = (day as usize * 37_000) % (content.len() - 5000);
    content[at..at + 5000].copy_from_slice(&bytes(5000, 2000 + day));
    std::fs::write(&db, content).unwrap();
    std::fs::write(data.join("uploads").join(format!("img{day:02}.bin")), bytes(60_000, 3000 + day)).unwrap();
    if day >= 3 && day.is_multiple_of(3) {
        let _ = std::fs::remove_file(data.join("uploads").join(format!("img{:02}.bin", day - 3)));
    }
}

fn ids(s: &Server) -> BTreeSet<String> {
    s.names("snapshots").into_iter().collect()
}

#[test]
fn first_server_drill_survives_a_buggy_script_with_the_primarys_credentials() {
    let a = Server::start("");
    a.ok(&a.admin, &["init"]);
    let (c, _cd) = puller(&a.url(), &a.read, &format!("fingerprint = \"{}\"", a.fingerprint));
    let (d, _dd) = puller(&c.url(), &c.read, &format!("fingerprint = \"{}\"\nnewest-of = \"weekly\"\ntimezone = \"UTC\"", c.fingerprint));
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("srv/site");

    // Three ISO weeks of nightly backups, Monday 2026-11-02 to Sunday 2026-11-22; the daily
    // server pulls every night, the weekly server every Sunday.
    let mut days = Vec::new();
    let start = jiff::civil::date(2026, 11, 2);
    for day in 0..21u64 {
        one_day(&data, day);
        let date = start.checked_add(jiff::Span::new().days(day as i64)).unwrap();
        let id = backup_at(&a, &data, &format!("{date}T23:00:00Z"));
        let expected = work.path().join(format!("expected/{day:02}"));
        std::fs::create_dir_all(expected.parent().unwrap()).unwrap();
        let o = Command::new("cp").arg("-a").arg(&data).arg(&expected).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        days.push((id, expected));
        let (st, msg) = run_job(&c, "pull");
        assert_eq!(st, 200, "day {day}: {msg}");
        if day % 7 == 6 {
            let (st, msg) = run_job(&d, "pull");
            assert_eq!(st, 200, "day {day}: {msg}");
        }
    }
    let dailies: BTreeSet<String> = days.iter().map(|(id, _)| id.clone()).collect();
    let weeklies: BTreeSet<String> = [6, 13, 20].iter().map(|i| days[*i].0.clone()).collect();
    assert_eq!(ids(&c), dailies);
    assert_eq!(ids(&d), weeklies);

    // The buggy maintenance script, with everything the primary holds (its backup token): the
    // generation servers do not know it (401, then throttled: 429), its own server refuses (403).
    std::fs::remove_dir_all(&data).unwrap();
    let mut refused = 0;
    for s in [&a, &c, &d] {
        for kind in ["snapshots", "data", "keys"] {
            for name in s.names(kind) {
                let r = s.http().delete(s.obj_url(kind, &name)).bearer_auth(&a.backup).send().unwrap();
                assert!(matches!(r.status().as_u16(), 401 | 403 | 429), "{kind}/{name} on {}: {}", s.addr, r.status());
                refused += 1;
            }
        }
    }
    assert!(refused > 50, "{refused}");
    let o = a.run(&a.backup, &["forget", "--keep-last", "1"]);
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    let o = a.run(&a.backup, &["prune"]);
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    // A fake "newest" state (the emptied site) and a snapshot dated years ahead.
    std::fs::create_dir_all(&data).unwrap();
    let fake = backup_at(&a, &data, &jiff::Timestamp::now().to_string());
    let future = backup_at(&a, &data, "2031-01-01T00:00:00Z");
    // The generation servers keep pulling on schedule.
    let (st, msg) = run_job(&c, "pull");
    assert_eq!(st, 200, "{msg}");
    assert!(msg.contains("1 dated in the future not pulled"), "{msg}");
    let (st, msg) = run_job(&d, "pull");
    assert_eq!(st, 200, "{msg}");
    assert!(!ids(&c).contains(&future) && !ids(&d).contains(&future));
    assert!(ids(&c).contains(&fake));

    // Every generation is still there, and each restores bit-exact: the newest real daily state
    // from the daily server, every week's from the weekly server.
    assert!(ids(&c).is_superset(&dailies));
    assert!(ids(&d).is_superset(&weeklies));
    let restore = |s: &Server, i: usize| {
        let target = work.path().join(format!("restore-{}-{i}", s.addr.replace(':', "_")));
        s.ok(&s.read, &["restore", &days[i].0[..12], "--target", target.to_str().unwrap()]);
        let got = target.join(data.strip_prefix("/").unwrap());
        assert_same_tree(&days[i].1, &got);
    };
    restore(&c, 20);
    restore(&c, 0);
    for i in [6, 13, 20] {
        restore(&d, i);
    }
    c.ok(&c.admin, &["check", "--read-data"]);
    d.ok(&d.admin, &["check", "--read-data"]);
}
