//! `kura key list/add/remove/passwd`.

use crate::args::{Cli, KeyCommand};
use crate::output::json;
use crate::{Outcome, open};
use anyhow::Result;
use kura_repo::KdfParams;
use std::path::Path;

fn new_password(file: Option<&Path>) -> Result<Vec<u8>> {
    if let Some(f) = file {
        return open::read_password_file(f);
    }
    if let Ok(p) = std::env::var("KURA_NEW_PASSWORD") {
        return Ok(p.into_bytes());
    }
    open::prompt("new password", true)
}

/// Runs a key subcommand.
pub fn run(cli: &Cli, k: &KeyCommand) -> Result<Outcome> {
    let mut repo = open::open(cli)?;
    match k {
        KeyCommand::List => {
            let keys = repo.keys()?;
            if cli.json {
                json(&keys)?;
            } else {
                for k in keys {
                    outln!("{} {:<10} {:<25} {}@{}", if k.current { "*" } else { " " }, crate::output::short(&k.id, 10), k.created, k.user, k.host);
                }
            }
        }
        KeyCommand::Add { new_password_file } => {
            let pw = new_password(new_password_file.as_deref())?;
            let id = repo.add_key(&pw, KdfParams::default())?;
            if cli.json { json(&serde_json::json!({"added": id}))?; } else if !cli.quiet { outln!("added key {}", crate::output::short(&id, 10)); }
        }
        KeyCommand::Remove { id } => {
            let removed = repo.remove_key(id)?;
            if cli.json { json(&serde_json::json!({"removed": removed}))?; } else if !cli.quiet { outln!("removed key {}", crate::output::short(&removed, 10)); }
        }
        KeyCommand::Passwd { new_password_file } => {
            let pw = new_password(new_password_file.as_deref())?;
            let id = repo.change_password(&pw, KdfParams::default())?;
            if cli.json { json(&serde_json::json!({"key": id}))?; } else if !cli.quiet { outln!("password changed; new key {}", crate::output::short(&id, 10)); }
        }
    }
    Ok(Outcome::Ok)
}
