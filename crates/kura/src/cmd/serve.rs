//! `kura serve` and `kura serve token add/list/revoke`.

use crate::Outcome;
use crate::args::{Cli, ServeArgs, ServeCommand, TokenCommand};
use crate::output::json;
use anyhow::{Context, Result, bail};
use kura_server::{Role, ServerConfig, Tokens};
use std::io::Write;

/// `kura serve`.
pub fn run(cli: &Cli, a: &ServeArgs) -> Result<Outcome> {
    let cfg = ServerConfig::load(&a.config)?;
    match &a.command {
        Some(ServeCommand::Token(t)) => token(cli, &cfg, t),
        None => {
            kura_server::init_logging(a.log_json);
            kura_server::run(&cfg, |addr, id, tokens| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "kura serve: listening on https://{addr}");
                let _ = writeln!(out, "kura serve: certificate fingerprint {}{}", id.fingerprint,
                    if id.generated { " (generated now; clients pin it with --fingerprint)" } else { "" });
                if tokens == 0 {
                    let _ = writeln!(out, "kura serve: no access tokens yet: kura serve -c {} token add --role admin --repository '*'", a.config.display());
                }
                let _ = out.flush();
            })?;
            Ok(Outcome::Ok)
        }
    }
}

fn token(cli: &Cli, cfg: &ServerConfig, t: &TokenCommand) -> Result<Outcome> {
    let path = cfg.tokens_path();
    let mut tokens = Tokens::load(&path)?;
    match t {
        TokenCommand::Add { role, repos, label } => {
            let role = Role::parse(role).with_context(|| format!("role {role:?}: use backup, read, admin or shadow"))?;
            for r in repos {
                if role == Role::Shadow && r == "*" {
                    bail!("a shadow token names its streams: --repository STREAM");
                }
                let known = match role {
                    Role::Shadow => cfg.streams.iter().any(|c| &c.name == r),
                    _ => r == "*" || cfg.repositories.iter().any(|c| &c.name == r) || cfg.streams.iter().any(|c| &c.name == r),
                };
                if !known {
                    bail!("the server configuration has no {} {r:?}", if role == Role::Shadow { "stream" } else { "repository or stream" });
                }
            }
            let (entry, secret) = tokens.add(role, repos.clone(), label)?;
            tokens.save(&path)?;
            if cli.json {
                json(&serde_json::json!({"id": entry.id, "role": role.name(), "repos": entry.repos, "label": entry.label, "token": secret}))?;
            } else {
                outln!("{secret}");
                eprintln!("kura: token {} ({} on {}) created; the secret above is shown only now", entry.id, role.name(), entry.repos.join(", "));
            }
        }
        TokenCommand::List => {
            if cli.json {
                let list: Vec<_> = tokens.entries().iter().map(|e| serde_json::json!({"id": e.id, "label": e.label, "role": e.role.name(), "repos": e.repos, "created": e.created})).collect();
                json(&list)?;
            } else {
                outln!("{:<8}  {:<6}  {:<20}  {:<20}  label", "id", "role", "repositories", "created");
                for e in tokens.entries() {
                    outln!("{:<8}  {:<6}  {:<20}  {:<20}  {}", e.id, e.role.name(), e.repos.join(","), &e.created[..e.created.len().min(19)], e.label);
                }
            }
        }
        TokenCommand::Revoke { which } => {
            let n = tokens.revoke(which);
            if n == 0 {
                bail!("no token has the id or label {which:?}");
            }
            tokens.save(&path)?;
            if !cli.quiet {
                outln!("revoked {n} token(s); a running server refuses them within a second");
            }
        }
    }
    Ok(Outcome::Ok)
}
