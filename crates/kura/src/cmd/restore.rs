//! `kura restore`.

use crate::args::{Cli, RestoreArgs};
use crate::output::{Bar, bytes, json};
use crate::{Outcome, open};
use anyhow::{Context, Result};
use kura_ops::restore::{RestoreOptions, restore};
use std::sync::atomic::AtomicBool;

/// Restores a snapshot below `--target`.
pub fn run(cli: &Cli, a: &RestoreArgs, interrupt: &AtomicBool) -> Result<Outcome> {
    let repo = open::open_indexed(cli, "restore")?;
    let (id, snap) = repo.find_snapshot(&a.snapshot, |_| true)?;
    let opts = RestoreOptions { target: a.target.clone(), include: a.include.clone(), overwrite: a.overwrite };
    let bar = Bar::new(cli.quiet, cli.json);
    let r = restore(&repo, &snap.body.tree, &opts, &bar, Some(interrupt));
    bar.finish();
    let r = r.with_context(|| format!("restoring snapshot {} to {}", id.short(), a.target.display()))?;
    for w in &r.warnings {
        eprintln!("kura: warning: {w}");
    }
    if cli.json {
        json(&serde_json::json!({"snapshot": id.to_hex(), "target": a.target, "result": r}))?;
    } else if !cli.quiet {
        outln!(
            "restored snapshot {} to {}: {} file(s) ({}), {} already complete, {} dir(s), {} other",
            id.short(), a.target.display(), r.files_restored, bytes(r.bytes), r.files_skipped, r.dirs, r.others
        );
    }
    Ok(Outcome::Ok)
}
