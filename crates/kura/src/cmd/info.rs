//! Read-only commands: `snapshots`, `ls`, `diff`, `cat`.

use crate::args::{Cli, FilterArgs};
use crate::output::{bytes, json};
use crate::{Outcome, open};
use anyhow::{Result, bail};
use kura_ops::walk;
use kura_repo::{Id, Repository, Snapshot};
use kura_store::Kind;
use serde_json::json as j;

fn snapshot_json(id: &Id, s: &Snapshot) -> serde_json::Value {
    j!({
        "id": id.to_hex(),
        "short_id": id.short(),
        "time": s.public.time,
        "host": s.public.host,
        "paths": s.public.paths,
        "tags": s.public.tags,
        "tree": s.body.tree.to_hex(),
        "parent": s.body.parent,
        "user": s.body.user,
        "program": s.body.program,
        "summary": s.body.summary,
    })
}

/// `kura snapshots`.
pub fn snapshots(cli: &Cli, f: &FilterArgs) -> Result<Outcome> {
    let repo = open::open(cli)?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (id, s) in repo.snapshots()? {
        match s {
            Ok(s) => {
                if f.matches(&s.public) {
                    out.push((id, s));
                }
            }
            Err(e) => bad.push(e),
        }
    }
    // Marks: protected (forget never removes it), and damaged originals superseded by a repair.
    let protected = repo.protections()?;
    // A kura server's receipts: its own receive time, and a flag on implausible claimed times.
    let receipts = kura_repo::receipt::read_all(repo.store().as_ref()).map_err(kura_repo::RepoError::from)?;
    let repaired_as: std::collections::HashMap<String, String> =
        out.iter().filter_map(|(id, s)| Some((s.public.original.clone()?, id.to_hex()))).collect();
    let marks = |id: &Id| -> Vec<String> {
        let mut m = Vec::new();
        if protected.contains(id) {
            m.push("protected".to_string());
        }
        if let Some(r) = repaired_as.get(&id.to_hex()) {
            m.push(format!("damaged, repaired as {}", &r[..8]));
        }
        if let Some(f) = receipts.get(id).and_then(|(r, _)| r.flag.as_ref()) {
            m.push(format!("flagged by the server: {f}"));
        }
        m
    };
    if cli.json {
        let list: Vec<serde_json::Value> = out
            .iter()
            .map(|(id, s)| {
                let mut v = snapshot_json(id, s);
                v["protected"] = protected.contains(id).into();
                v["original"] = s.public.original.clone().into();
                v["repaired_as"] = repaired_as.get(&id.to_hex()).cloned().into();
                v["received"] = receipts.get(id).map(|(r, _)| r.received.clone()).into();
                v["flag"] = receipts.get(id).and_then(|(r, _)| r.flag.clone()).into();
                v
            })
            .collect();
        json(&list)?;
    } else if !cli.quiet {
        outln!("{:<8}  {:<25}  {:<16}  {:<12}  {:>10}  paths", "id", "time", "host", "tags", "size");
        for (id, s) in &out {
            let t = s.time().to_zoned_datetime(jiff::tz::TimeZone::system()).strftime("%Y-%m-%d %H:%M:%S %Z").to_string();
            let m = marks(id);
            outln!(
                "{:<8}  {:<25}  {:<16}  {:<12}  {:>10}  {}{}",
                id.short(), t, s.public.host, s.public.tags.join(","), bytes(s.body.summary.bytes_total), s.public.paths.join(" "),
                if m.is_empty() { String::new() } else { format!("  [{}]", m.join("; ")) }
            );
        }
        outln!("{} snapshot(s)", out.len());
    }
    if let Some(e) = bad.into_iter().next() {
        bail!(e);
    }
    Ok(Outcome::Ok)
}

/// `kura ls`.
pub fn ls(cli: &Cli, snapshot: &str, path: Option<&str>) -> Result<Outcome> {
    let repo = open::open_indexed(cli, "read")?;
    let (id, s) = repo.find_snapshot(snapshot, |_| true)?;
    let entries = walk::ls(&repo, &s.body.tree, path.unwrap_or("/"))?;
    if cli.json {
        json(&j!({"snapshot": id.to_hex(), "entries": entries}))?;
    } else {
        for e in entries {
            match e.target {
                Some(t) => outln!("{} -> {t}", e.path),
                None => outln!("{}", e.path),
            }
        }
    }
    Ok(Outcome::Ok)
}

/// `kura diff`.
pub fn diff(cli: &Cli, a: &str, b: &str) -> Result<Outcome> {
    let repo = open::open_indexed(cli, "read")?;
    let (ia, sa) = repo.find_snapshot(a, |_| true)?;
    let (ib, sb) = repo.find_snapshot(b, |_| true)?;
    let changes = walk::diff(&repo, &sa.body.tree, &sb.body.tree)?;
    if cli.json {
        json(&j!({"a": ia.to_hex(), "b": ib.to_hex(), "changes": changes}))?;
    } else {
        for c in &changes {
            outln!("{}  {}", c.change, c.path);
        }
        if !cli.quiet {
            let count = |k: &str| changes.iter().filter(|c| c.change == k).count();
            outln!("{} added, {} removed, {} modified, {} metadata only, {} type changed",
                count("+"), count("-"), count("M"), count("U"), count("T"));
        }
    }
    Ok(Outcome::Ok)
}

fn full_id(repo: &Repository, kind: Kind, prefix: &str) -> Result<String> {
    let names: Vec<String> = repo.store().list(kind)?.into_iter().map(|l| l.name).filter(|n| n.starts_with(prefix)).collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no {kind:?} object matches {prefix:?}"),
        _ => bail!("{prefix:?} matches more than one {kind:?} object"),
    }
}

/// `kura cat`: decrypted objects as JSON, for debugging.
pub fn cat(cli: &Cli, kind: &str, id: Option<&str>) -> Result<Outcome> {
    let repo = if matches!(kind, "tree" | "blob" | "snapshot") { open::open_indexed(cli, "read")? } else { open::open(cli)? };
    let need = || id.ok_or_else(|| anyhow::anyhow!("cat {kind} needs an id"));
    match kind {
        "config" => outln!("{}", String::from_utf8_lossy(&repo.config().encode())),
        "key" => {
            let name = full_id(&repo, Kind::Key, need()?)?;
            outln!("{}", String::from_utf8_lossy(&repo.store().get(Kind::Key, &name)?));
        }
        "snapshot" => {
            let (id, s) = repo.find_snapshot(need()?, |_| true)?;
            let mut v = snapshot_json(&id, &s);
            v["packs"] = j!(s.public.packs.iter().map(|p| p.to_hex()).collect::<Vec<_>>());
            json(&v)?;
        }
        "index" => {
            let name = full_id(&repo, Kind::Index, need()?)?;
            let f = kura_repo::index::IndexFile::decode(repo.key(), &repo.store().get(Kind::Index, &name)?)
                .map_err(|d| kura_repo::RepoError::corrupt(format!("index/{name}"), d))?;
            json(&f)?;
        }
        "pack" => {
            let name = full_id(&repo, Kind::Pack, need()?)?;
            let size = repo.store().list(Kind::Pack)?.into_iter().find(|l| l.name == name).map(|l| l.size).unwrap_or(0);
            let id = Id::from_hex(&name).ok_or_else(|| anyhow::anyhow!("bad pack name"))?;
            json(&repo.read_pack_header(&id, size)?)?;
        }
        "tree" | "blob" => {
            let id = Id::from_hex(need()?).ok_or_else(|| anyhow::anyhow!("{kind} needs a full 64-digit id"))?;
            if kind == "tree" {
                json(&repo.read_tree(&id)?)?;
            } else {
                use std::io::Write;
                std::io::stdout().write_all(&repo.read_blob(&id)?)?;
            }
        }
        other => bail!("unknown object kind {other:?}: config, key, snapshot, index, pack, tree or blob"),
    }
    Ok(Outcome::Ok)
}
