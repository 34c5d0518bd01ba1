//! `kura repair index` and `kura repair snapshots`.

use crate::args::{Cli, RepairCommand};
use crate::output::json;
use crate::{Outcome, open};
use anyhow::{Context, Result};
use kura_ops::NoProgress;
use kura_ops::repair::{repair_index, repair_snapshots};

/// Runs a repair subcommand.
pub fn run(cli: &Cli, r: &RepairCommand) -> Result<Outcome> {
    match r {
        RepairCommand::Index { read_data } => {
            let repo = open::open_admin(cli, false)?;
            repo.start_session("repair").context("registering the repair session")?;
            let rep = repair_index(&repo, *read_data, &NoProgress).context("rebuilding the index")?;
            if cli.json {
                json(&rep)?;
            } else if !cli.quiet {
                for u in &rep.unreadable_packs {
                    outln!("left out: {u}");
                }
                outln!(
                    "indexed {} blob(s) in {} pack(s){}; replaced {} index file(s) with {}",
                    rep.blobs,
                    rep.packs,
                    if *read_data { format!(", left out {} damaged blob(s)", rep.damaged_blobs) } else { String::new() },
                    rep.old_index_files,
                    rep.new_index_files
                );
            }
            Ok(Outcome::Ok)
        }
        RepairCommand::Snapshots { dry_run, forget } => {
            let repo = open::open_indexed(cli, "repair")?;
            let rep = repair_snapshots(&repo, *dry_run, *forget, &NoProgress).context("repairing snapshots")?;
            if cli.json {
                json(&rep)?;
            } else if !cli.quiet {
                for u in &rep.unreadable {
                    outln!("cannot repair (unreadable): {u}");
                }
                for s in &rep.repaired {
                    match &s.repaired {
                        Some(new) => outln!("snapshot {} repaired as {}", &s.original[..8], &new[..8]),
                        None => outln!("snapshot {} is damaged (dry run: nothing written)", &s.original[..8]),
                    }
                    for f in &s.files_removed {
                        outln!("  lost file {f}");
                    }
                    for d in &s.dirs_emptied {
                        outln!("  lost the contents of directory {d}");
                    }
                }
                outln!(
                    "{} snapshot(s) checked, {} damaged{}",
                    rep.snapshots,
                    rep.repaired.len(),
                    if rep.forgotten > 0 { format!(", {} original(s) forgotten", rep.forgotten) } else { String::new() }
                );
            }
            Ok(Outcome::Ok)
        }
    }
}
