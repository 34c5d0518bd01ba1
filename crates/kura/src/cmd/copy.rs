//! `kura copy` (snapshots from another repository, re-encrypted) and `kura pull` (into a replica
//! of their repository, keyless).

use crate::args::{Cli, CopyArgs, PullArgs};
use crate::output::{bytes, json, short};
use crate::{Outcome, open};
use anyhow::{Context, Result};

/// Copies the named snapshots (or all the destination lacks) from `--from-repo`.
pub fn run(cli: &Cli, a: &CopyArgs) -> Result<Outcome> {
    let src = open::open_source(cli, &a.from_repo, a.from_password_file.as_deref())?;
    // Copying only adds: a kura server's backup token is enough.
    let dst = open::open_indexed(cli, "copy")?;
    let ids = if a.snapshots.is_empty() {
        let mut all: Vec<_> = src.snapshots()?.into_iter().filter_map(|(id, s)| s.ok().filter(|s| a.select.filter.matches(&s.public)).map(|s| (id, s.time(), (s.public.host.clone(), s.public.paths.clone())))).collect();
        all.sort_by_key(|(id, t, _)| (*t, *id));
        match a.select.period() {
            Some(p) => kura_ops::copy::newest_of(&all, p, &jiff::tz::TimeZone::system(), jiff::Timestamp::now()),
            None => all.into_iter().map(|(id, _, _)| id).collect(),
        }
    } else {
        let f = &a.select.filter;
        if a.select.newest_of.is_some() || f.host.is_some() || f.tag.is_some() || f.path.is_some() {
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

/// `kura pull`: the selected snapshots of `--from-repo` into a replica of it, without the key.
pub fn pull(cli: &Cli, a: &PullArgs) -> Result<Outcome> {
    let loc = open::location_of(Some(&a.from_repo))?;
    let src = open::open_store_with(&loc, &|| {
        open::remote_options_with(a.from_token_file.as_deref(), "KURA_FROM_TOKEN", "--from-token-file", a.from_fingerprint.as_ref())
    })
    .context("opening the source repository")?;
    let dst = open::pull_target(cli)?;
    let f = &a.select.filter;
    let sel = kura_ops::pull::Selection {
        hosts: f.host.iter().cloned().collect(),
        tags: f.tag.iter().cloned().collect(),
        paths: f.path.iter().cloned().collect(),
        newest_of: a.select.period(),
        tz: jiff::tz::TimeZone::system(),
        retry: Default::default(),
    };
    let put = kura_ops::pull::put_plain(dst.as_ref());
    let r = kura_ops::pull::pull(&src, &dst, &sel, jiff::Timestamp::now(), &put).context("pulling")?;
    if cli.json {
        json(&r)?;
    } else if !cli.quiet {
        if r.initialised {
            outln!("{} is now a replica of {}", dst.location(), src.location());
        }
        for s in &r.pulled {
            outln!("snapshot {} pulled", short(s, 8));
        }
        for s in &r.future {
            outln!("snapshot {} is dated in the future: not pulled", short(s, 8));
        }
        outln!(
            "{} snapshot(s) pulled, {} here already, {} older than what is here; {} pack(s) fetched ({}), {} here already",
            r.pulled.len(),
            r.present,
            r.older,
            r.packs_fetched,
            bytes(r.bytes_fetched),
            r.packs_present
        );
    }
    for f in &r.refused {
        eprintln!("kura: snapshot {} refused: {}", short(&f.snapshot, 8), f.reason);
    }
    Ok(if r.refused.is_empty() { Outcome::Ok } else { Outcome::Partial })
}
