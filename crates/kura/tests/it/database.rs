//! Live databases: a SQLite database is cut at its pages, so a scattered update of 1% of its
//! rows costs a few percent of the file in the repository; restored databases pass SQLite's
//! own integrity check; a drill re-cuts them the same way.

use crate::util::{Env, stderr};
use std::process::Command;

/// Runs a Python snippet with the standard sqlite3 module on the database `db`.
fn sql(db: &std::path::Path, code: &str) -> String {
    let script = format!("import sqlite3, random\nc = sqlite3.connect({:?})\n{code}\nc.commit()\nc.close()\n", db.to_str().unwrap());
    let o = Command::new("python3").arg("-c").arg(&script).output().expect("python3");
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn added(v: &serde_json::Value) -> u64 {
    v["summary"]["bytes_added"].as_u64().unwrap_or_else(|| panic!("no bytes_added in {v}"))
}

#[test]
fn a_scattered_update_of_a_sqlite_database_costs_only_its_pages() {
    let e = Env::new();
    let dir = e.path("db");
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("shop.db");
    sql(
        &db,
        "c.execute('PRAGMA journal_mode=DELETE')\n\
         c.execute('CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, note TEXT)')\n\
         random.seed(1)\n\
         c.executemany('INSERT INTO orders VALUES (?, ?, ?)', [(i, 'c%d' % random.randrange(10**6), ''.join(random.choice('abcdefghij') for _ in range(200))) for i in range(60000)])",
    );
    let size = std::fs::metadata(&db).unwrap().len();
    assert!(size > 10 << 20, "{size}");
    let first = e.json(&["backup", dir.to_str().unwrap()]);
    assert!(added(&first) >= size * 9 / 10, "{first}");

    // 1% of the rows, scattered, updated in place.
    sql(&db, "random.seed(2)\nfor i in random.sample(range(60000), 600):\n    c.execute('UPDATE orders SET customer = ? WHERE id = ?', ('x%d' % i, i))");
    let second = e.json(&["backup", dir.to_str().unwrap()]);
    let cost = added(&second);
    // Content-defined chunks of ~1 MiB would each hold a changed page: the whole file again.
    assert!(cost * 5 < size, "a 1% update stored {cost} bytes of a {size}-byte database");

    let out = e.path("out");
    e.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let restored = out.join(db.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read(&restored).unwrap(), std::fs::read(&db).unwrap());
    assert_eq!(sql(&restored, "print(c.execute('PRAGMA integrity_check').fetchone()[0])"), "ok");
    // A whole-snapshot drill re-cuts the database at its pages and finds it intact.
    let d = e.json(&["drill", "--full"]);
    assert_eq!(d["record"]["ok"], true, "{d}");
}
