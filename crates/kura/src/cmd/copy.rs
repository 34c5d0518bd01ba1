//! `kura copy`: snapshots from another repository into this one.

use crate::args::{Cli, CopyArgs};
use crate::output::{bytes, json, short};
use crate::{Outcome, open};
use anyhow::{Context, Result};

/// Copies the named snapshots (or all the destination lacks) from `--from-repo`.
pub fn run(cli: &Cli, a: &CopyArgs) -> Result<Outcome> {
    let src = open::open_source(cli, &a.from_repo, a.from_password_file.as_deref())?;
    // Copying only adds: a kura server's backup token is enough.
    let dst = open::open_indexed(cli, "copy")?;
    let ids = if a.snapshots.is_empty() {
        let mut all: Vec<_> = src.snapshots()?.into_iter().filter_map(|(id, s)| s.ok().filter(|s| a.filter.matches(&s.public)).map(|s| (id, s.time(), (s.public.host.clone(), s.public.paths.clone())))).collect();
        all.sort_by_key(|(id, t, _)| (*t, *id));
        match a.newest_of.as_deref().and_then(|n| kura_ops::retention::Period::ALL.into_iter().find(|p| p.name() == n)) {
            Some(p) => kura_ops::copy::newest_of(&all, p, &jiff::tz::TimeZone::system(), jiff::Timestamp::now()),
            None => all.into_iter().map(|(id, _, _)| id).collect(),
        }
    } else {
        if a.newest_of.is_some() || a.filter.host.is_some() || a.filter.tag.is_some() || a.filter.path.is_some() {
            anyhow::bail!("name snapshots or select them with --host/--tag/--path/--newest-of, not both");
        }
        a.snapshots.iter().map(|s| src.find_snapshot(s, |_| true).map(|(id, _)| id)).collect::<Result<Vec<_>, _>>()?
    };
    let r = kura_ops::copy::copy(&src, &dst, &ids).context("copying")?;
    if cli.json {
        json(&r)?;
    } else if !cli.quiet {
        for c in &r.copied {
            outln!("snapshot {} copied as {}", short(&c.source, 8), short(&c.copy, 8));
        }
        for s in &r.skipped {
            outln!("snapshot {} is here already", short(s, 8));
        }
        outln!("{} snapshot(s) copied; {} new blob(s), {} of data added", r.copied.len(), r.blobs_added, bytes(r.bytes_added));
    }
    Ok(Outcome::Ok)
}
