//! `kura shadow`: push on the primary; status, wait, log and point-in-time restore.

use crate::Outcome;
use crate::args::{Cli, ShadowCommand};
use anyhow::{Context, Result};
use kura_shadow::push::{Link, PushOptions};
use kura_shadow::{Op, path};
use std::time::Duration;

/// `kura shadow push --config FILE`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PushFile {
    source: Option<std::path::PathBuf>,
    to: Option<String>,
    token_file: Option<std::path::PathBuf>,
    fingerprint: Option<String>,
    rescan_every: Option<String>,
}

fn duration(what: &str, s: &str) -> Result<Duration> {
    kura_server::config::parse_duration(what, s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `kura://HOST:PORT/STREAM` → (https root, stream), and the link with the token.
fn link(cli: &Cli, to: &str) -> Result<(Link, String, String)> {
    let (root, stream) = kura_store::remote::parse_url(to).map_err(|e| anyhow::anyhow!("{e}"))?;
    let opts = crate::open::remote_options(cli)?;
    let l = Link::new(&root, &stream, &opts.token, opts.fingerprint.as_deref())?;
    Ok((l, root, stream))
}

use kura_shadow::show_time;

fn describe(op: &Op) -> String {
    match op {
        Op::Put { path: p, node } => format!("{:<8} {}", format!("{:?}", node.kind).to_lowercase(), path::show(p)),
        Op::Delete { path: p } => format!("{:<8} {}", "delete", path::show(p)),
        Op::Rename { from, to } => format!("{:<8} {} -> {}", "rename", path::show(from), path::show(to)),
    }
}

/// Runs a `kura shadow` subcommand.
pub fn run(cli: &Cli, c: &ShadowCommand) -> Result<Outcome> {
    match c {
        ShadowCommand::Push { config, source, to, rescan_every, once } => {
            let file: PushFile = match config {
                Some(p) => {
                    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.to_string().replace('\n', " ")))?
                }
                None => PushFile::default(),
            };
            let source = source.clone().or(file.source).context("no source directory (--source or source = in the config)")?;
            let to = to.clone().or(file.to).context("no standby (--to or to = in the config)")?;
            let meta = std::fs::metadata(&source).with_context(|| format!("source {}", source.display()))?;
            anyhow::ensure!(meta.is_dir(), "source {} is not a directory", source.display());
            let (root, stream) = kura_store::remote::parse_url(&to).map_err(|e| anyhow::anyhow!("{e}"))?;
            let token = match (&cli.token_file, &file.token_file) {
                (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("cannot read token file {}", f.display()))?.trim().to_string(),
                _ => crate::open::remote_options(cli)?.token,
            };
            let p = PushOptions {
                source: std::fs::canonicalize(&source).with_context(|| format!("source {}", source.display()))?,
                server: root,
                stream,
                token,
                fingerprint: cli.fingerprint.clone().or(file.fingerprint),
                rescan_every: duration("--rescan-every", rescan_every.as_deref().or(file.rescan_every.as_deref()).unwrap_or("10m"))?,
                once: *once,
            };
            if !*once {
                kura_server::init_logging(false);
            }
            let sent = kura_shadow::push::run(&p)?;
            if cli.json {
                println!("{}", serde_json::json!({"records": sent.records, "bytes": sent.bytes, "head": sent.head}));
            } else if !cli.quiet {
                eprintln!("kura: standby in sync at record {} ({} records, {} bytes of new data sent)", sent.head, sent.records, sent.bytes);
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Status { to, journal } => {
            let st = match (to, journal) {
                (Some(to), _) => link(cli, to)?.0.status()?,
                (None, Some(dir)) => {
                    let j = kura_shadow::restore::open(dir)?;
                    let e = j.entries();
                    let applied = std::fs::read_to_string(dir.join("applied")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
                    let (chunks, bytes) = j.sizes();
                    let f = kura_shadow::journal::StreamFile::load(dir, false)?;
                    kura_shadow::StreamStatus {
                        stream: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                        epoch: f.epoch,
                        head: j.head(),
                        applied,
                        durable: j.head(),
                        head_time_ns: e.last().map(|e| e.recv_ns).unwrap_or(j.base().recv_ns),
                        oldest_time_ns: j.oldest_time(),
                        records: e.len() as u64,
                        chunks: chunks as u64,
                        journal_bytes: bytes,
                        window_secs: 0,
                        base_seq: j.base().seq,
                        apply_error: None,
                        held: None,
                        discarded: 0,
                        id_key: String::new(),
                        chunker_seed: 0,
                    }
                }
                (None, None) => anyhow::bail!("give --to or --journal"),
            };
            if cli.json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                println!("stream        {}", st.stream);
                println!("role          standby (epoch {})", st.epoch);
                println!("head          record {} received {}", st.head, show_time(st.head_time_ns));
                println!("applied       record {} ({} behind)", st.applied, st.head.saturating_sub(st.applied));
                println!("durable       record {}", st.durable);
                let kept = if st.window_secs > 0 { format!(", kept {}", format_args!("{:#}", jiff::SignedDuration::from_secs(st.window_secs as i64))) } else { String::new() };
                println!("window        {} records since {}{kept}", st.records, show_time(st.oldest_time_ns));
                println!("journal       {} bytes, {} chunks", st.journal_bytes, st.chunks);
                if let Some(e) = &st.apply_error {
                    println!("apply error   {e}");
                }
                if let Some(h) = &st.held {
                    println!("HELD          since record {} ({}): {}", h.seq, show_time(h.since_ns), h.reason);
                    println!("              kura shadow release --to URL applies it; kura shadow discard --to URL drops it");
                }
                if st.discarded > 0 {
                    println!("discarded     {} records never applied to the mirror", st.discarded);
                }
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Release { to } | ShadowCommand::Discard { to } => {
            let verb = if matches!(c, ShadowCommand::Release { .. }) { "release" } else { "discard" };
            let (l, ..) = link(cli, to)?;
            let held = l.operate(verb)?;
            if cli.json {
                println!("{}", serde_json::to_string(&held)?);
            } else if !cli.quiet {
                let done = if verb == "release" { "applied to the mirror" } else { "dropped: the mirror keeps those files" };
                eprintln!("kura: the changes held since record {} ({}) are {done}", held.seq, held.reason);
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Wait { seq, to, timeout } => {
            let (l, ..) = link(cli, to)?;
            if l.wait(*seq, duration("--timeout", timeout)?)? {
                Ok(Outcome::Ok)
            } else {
                anyhow::bail!("record {seq} was not applied on the standby within {timeout}")
            }
        }
        ShadowCommand::Log { journal, path: only, since } => {
            let j = kura_shadow::restore::open(journal)?;
            let since = since.as_deref().map(crate::cmd::backup::parse_time).transpose()?.map(|t| t.as_nanosecond() as i64).unwrap_or(i64::MIN);
            let only = only.as_deref().map(|p| p.trim_matches('/').as_bytes().to_vec());
            let entries = kura_shadow::restore::log(&j, only.as_deref(), since);
            if cli.json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| serde_json::json!({"seq": e.seq, "received": show_time(e.recv_ns), "received_ns": e.recv_ns, "primary_time_ns": e.at_ns, "change": describe(&e.op)}))
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for e in entries {
                    println!("{:>8}  {}  {}", e.seq, show_time(e.recv_ns), describe(&e.op));
                }
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Restore { journal, at, path: only, target } => {
            let j = kura_shadow::restore::open(journal)?;
            let at_ns = match at {
                Some(at) => crate::cmd::backup::parse_time(at)?.as_nanosecond() as i64,
                None => i64::MAX,
            };
            let only = only.as_deref().map(|p| p.trim_matches('/').as_bytes().to_vec());
            let r = kura_shadow::restore::restore(&j, at_ns, only.as_deref(), target)?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else if !cli.quiet {
                eprintln!(
                    "kura: restored the tree as of record {} (received {}): {} files, {} other entries, {} bytes into {}",
                    r.seq,
                    show_time(r.time_ns),
                    r.files,
                    r.others,
                    r.bytes,
                    target.display()
                );
            }
            Ok(Outcome::Ok)
        }
    }
}
