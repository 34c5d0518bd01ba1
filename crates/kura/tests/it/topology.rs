//! `kura plan`: the story's topology file is planned; a topology the protected host could wipe
//! out is refused with the file and line, exit code 2.

use crate::util::*;
use std::path::PathBuf;
use std::process::{Command, Output};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/first-server.toml")
}

fn plan(args: &[&str]) -> Output {
    let o = Command::new(BIN).arg("plan").args(args).output().unwrap();
    no_panic(&o);
    o
}

#[test]
fn the_example_topology_plans_six_machines_and_ten_years() {
    let f = example();
    let o = plan(&[f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in ["dataset www on a", "shadow", "7d window", "daily", "14 days", "weekly", "8 weeks", "yearly", "10 years", "26h / 50h", "6 machine(s) besides a"] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    let o = Command::new(BIN).args(["--json", "plan", f.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let copies = v["datasets"][0]["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 6, "{v}");
    assert_eq!(copies[2]["from"], "daily", "{v}");
    assert_eq!(copies[2]["every"], "weekly", "{v}");
    assert_eq!(v["machines"].as_array().unwrap().len(), 6, "{v}");
}

#[test]
fn a_topology_the_protected_host_could_delete_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    // The daily generation moved onto the protected host.
    let text = std::fs::read_to_string(example()).unwrap().replacen("host = \"c\"", "host = \"a\"   # oops", 1);
    let line = text.lines().position(|l| l.contains("# oops")).unwrap() + 1;
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, &text).unwrap();
    let o = plan(&[f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("bad.toml:{line}:")) && err.contains("protected host"), "{err}");
    assert!(o.stdout.is_empty());

    // An unknown key, and a file that is not there.
    std::fs::write(&f, "[host.a]\nadress = \"a.example\"\n").unwrap();
    let o = plan(&[f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("bad.toml:2:") && stderr(&o).contains("adress"), "{}", stderr(&o));
    let o = plan(&[dir.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("missing.toml"), "{}", stderr(&o));
}
