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

/// Where this host keeps its push state: the flag, `$KURA_STATE_DIR`, `$XDG_STATE_HOME/kura`,
/// `~/.local/state/kura`.
fn state_dir(flag: &Option<std::path::PathBuf>) -> Result<std::path::PathBuf> {
    if let Some(d) = flag {
        return Ok(d.clone());
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    env("KURA_STATE_DIR")
        .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("kura")))
        .or_else(|| env("HOME").map(|d| d.join(".local/state/kura")))
        .context("no state directory: give --state-dir or set KURA_STATE_DIR")
}

fn describe(op: &Op) -> String {
    match op {
        Op::Put { path: p, node } => format!("{:<8} {}", format!("{:?}", node.kind).to_lowercase(), path::show(p)),
        Op::Delete { path: p } => format!("{:<8} {}", "delete", path::show(p)),
        Op::Rename { from, to } => format!("{:<8} {} -> {}", "rename", path::show(from), path::show(to)),
        Op::Pages { path: p, db_pages, pages, change, .. } => format!("{:<8} {} ({} pages written, {db_pages} pages, commit {change})", "sqlite", path::show(p), pages.len()),
    }
}

/// Runs a `kura shadow` subcommand.
pub fn run(cli: &Cli, c: &ShadowCommand) -> Result<Outcome> {
    match c {
        ShadowCommand::Push { sqlite: Some(db), to, once, state_dir: sd, interval, .. } => {
            let every = match interval {
                Some(i) => duration("--interval", i)?,
                None => kura_shadow::sqlite_push::APPEND_EVERY,
            };
            anyhow::ensure!(every <= Duration::from_secs(10), "--interval {}: at most 10s (the standby's lag grows with it)", interval.as_deref().unwrap_or_default());
            let to = to.as_deref().context("no standby (--to)")?;
            let meta = std::fs::metadata(db).with_context(|| format!("database {}", db.display()))?;
            anyhow::ensure!(meta.is_file(), "database {} is not a file", db.display());
            let db = std::fs::canonicalize(db).with_context(|| format!("database {}", db.display()))?;
            let name = db.file_name().map(|n| n.as_encoded_bytes().to_vec()).context("a database file has a name")?;
            let (l, ..) = link(cli, to)?;
            let sd = state_dir(sd)?;
            let sent = if *once {
                kura_shadow::sqlite_push::sync_once(&l, &db, &name, Some(&sd))?
            } else {
                kura_server::init_logging(false);
                kura_shadow::sqlite_push::follow(&l, &db, &name, Some(&sd), every, &|| false)?
            };
            if cli.json {
                outln!("{}", serde_json::json!({"records": sent.records, "bytes": sent.bytes, "head": sent.head}));
            } else if !cli.quiet {
                eprintln!("kura: standby in sync at record {} ({} records, {} bytes of new data sent)", sent.head, sent.records, sent.bytes);
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Push { config, source, to, rescan_every, once, state_dir: sd, interval, .. } => {
            anyhow::ensure!(interval.is_none(), "--interval is for a database (--sqlite): a directory's changes are sent as they are found");
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
                state_dir: state_dir(sd)?,
            };
            if !*once {
                kura_server::init_logging(false);
            }
            let sent = kura_shadow::push::run(&p)?;
            if cli.json {
                outln!("{}", serde_json::json!({"records": sent.records, "bytes": sent.bytes, "head": sent.head}));
            } else if !cli.quiet {
                eprintln!("kura: standby in sync at record {} ({} records, {} bytes of new data sent)", sent.head, sent.records, sent.bytes);
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Status { to, journal, state_dir: sd } => {
            let mut mine = None;
            let st = match (to, journal) {
                (Some(to), _) => {
                    let st = link(cli, to)?.0.status()?;
                    if !st.id_key.is_empty() {
                        let p = kura_shadow::push::PushState::path(&state_dir(sd)?, &st.id_key);
                        mine = kura_shadow::push::PushState::load(&p)?;
                    }
                    st
                }
                (None, Some(dir)) => {
                    let j = kura_shadow::restore::open(dir)?;
                    let applied = std::fs::read_to_string(dir.join("applied")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
                    let (chunks, bytes) = j.sizes();
                    let f = kura_shadow::journal::StreamFile::load(dir, false)?;
                    kura_shadow::StreamStatus {
                        stream: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                        epoch: f.epoch,
                        role: if f.primary { "primary" } else { "standby" }.into(),
                        promoted_seq: f.promoted_seq,
                        demoted_seq: f.demoted_seq,
                        head: j.head(),
                        applied,
                        durable: j.head(),
                        head_time_ns: j.last().map(|e| e.recv_ns).unwrap_or(j.base().recv_ns),
                        oldest_time_ns: j.oldest_time(),
                        records: j.len(),
                        chunks: chunks as u64,
                        journal_bytes: bytes,
                        index_in_memory: j.index_in_memory() as u64,
                        base_seq: j.base().seq,
                        ..Default::default()
                    }
                }
                (None, None) => anyhow::bail!("give --to or --journal"),
            };
            let back = mine.as_ref().is_some_and(|m| m.rejoined && m.epoch < st.epoch && st.role == "standby" && st.demoted_seq > 0);
            let fenced = !back && mine.as_ref().is_some_and(|m| m.epoch < st.epoch);
            if cli.json {
                let mut v = serde_json::to_value(&st)?;
                if let Some(m) = &mine {
                    v["this_host"] = serde_json::json!({"epoch": m.epoch, "fenced": fenced, "rejoined": m.rejoined, "followed": m.followed, "handed_back": back});
                }
                outln!("{v}");
            } else {
                outln!("stream        {}", st.stream);
                let mut since = if st.promoted_seq > 0 { format!(", promoted after record {}", st.promoted_seq) } else { String::new() };
                if st.demoted_seq > 0 {
                    since += &format!(", handed back after record {}", st.demoted_seq);
                }
                outln!("role          {} (epoch {}{since})", st.role, st.epoch);
                if let Some(m) = &mine {
                    let what = if back {
                        format!("HANDED BACK: holds record {} of {}; `kura shadow push` takes over (after `kura shadow rejoin` when behind)", m.followed, st.demoted_seq)
                    } else if fenced {
                        "FENCED: the standby was promoted; `kura shadow rejoin` brings this host back".into()
                    } else if m.rejoined {
                        format!("a copy of the primary (rejoined), holds record {}", m.followed)
                    } else {
                        "pushes to it".into()
                    };
                    outln!("this host     epoch {}: {what}", m.epoch);
                }
                outln!("head          record {} received {}", st.head, show_time(st.head_time_ns));
                outln!("applied       record {} ({} behind, {:.3} s)", st.applied, st.head.saturating_sub(st.applied), st.lag_secs);
                if st.last_contact_ns > 0 {
                    outln!("last contact  {} (a push or the primary's heartbeat)", show_time(st.last_contact_ns));
                }
                outln!("durable       record {}", st.durable);
                let kept = if st.window_secs > 0 { format!(", kept {}", format_args!("{:#}", jiff::SignedDuration::from_secs(st.window_secs as i64))) } else { String::new() };
                outln!("window        {} records since {}{kept}", st.records, show_time(st.oldest_time_ns));
                outln!("journal       {} bytes, {} chunks", st.journal_bytes, st.chunks);
                if let Some(e) = &st.apply_error {
                    outln!("apply error   {e}");
                }
                if let Some(h) = &st.held {
                    outln!("HELD          since record {} ({}): {}", h.seq, show_time(h.since_ns), h.reason);
                    outln!("              kura shadow release --to URL applies it; kura shadow discard --to URL drops it");
                }
                if st.discarded > 0 {
                    outln!("discarded     {} records never applied to the mirror", st.discarded);
                }
                for b in &st.branches {
                    let state = if b.sealed { "" } else { " (incomplete)" };
                    outln!("branch        {} ({} entries, {}){state}", b.name, b.entries, show_time(b.time_ns));
                }
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Release { to } | ShadowCommand::Discard { to } => {
            let verb = if matches!(c, ShadowCommand::Release { .. }) { "release" } else { "discard" };
            let (l, ..) = link(cli, to)?;
            let held = l.operate(verb)?;
            if cli.json {
                outln!("{}", serde_json::to_string(&held)?);
            } else if !cli.quiet {
                let done = if verb == "release" { "applied to the mirror" } else { "dropped: the mirror keeps those files" };
                eprintln!("kura: the changes held since record {} ({}) are {done}", held.seq, held.reason);
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Wait { sqlite: Some(db), to, timeout, .. } => {
            let (l, ..) = link(cli, to)?;
            let (change, salt, frame) = kura_shadow::sqlite_source::committed_position(db)?;
            let deadline = std::time::Instant::now() + duration("--timeout", timeout)?;
            loop {
                if l.status()?.sqlite_position.is_some_and(|p| p.holds(change, salt, frame)) {
                    return Ok(Outcome::Ok);
                }
                anyhow::ensure!(std::time::Instant::now() < deadline, "the last commit of {} (log frame {frame}) was not applied on the standby within {timeout}", db.display());
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        ShadowCommand::Wait { seq, to, timeout, .. } => {
            let (l, ..) = link(cli, to)?;
            let seq = seq.context("give SEQ or --sqlite")?;
            if l.wait(seq, duration("--timeout", timeout)?)? {
                Ok(Outcome::Ok)
            } else {
                anyhow::bail!("record {seq} was not applied on the standby within {timeout}")
            }
        }
        ShadowCommand::Log { journal, path: only, since } => {
            let j = kura_shadow::restore::open(journal)?;
            let since = since.as_deref().map(crate::cmd::backup::parse_time).transpose()?.map(|t| t.as_nanosecond() as i64).unwrap_or(i64::MIN);
            let only = only.as_deref().map(|p| p.trim_matches('/').as_bytes().to_vec());
            // Printed as read: the window may hold more records than fit in memory.
            let mut first = true;
            j.touching(only.as_deref(), since, |e| {
                if cli.json {
                    let one = serde_json::json!({"seq": e.seq, "received": show_time(e.recv_ns), "received_ns": e.recv_ns, "primary_time_ns": e.at_ns, "change": describe(&e.op)});
                    outln!("{}{one}", if first { "[" } else { "," });
                } else {
                    outln!("{:>8}  {}  {}", e.seq, show_time(e.recv_ns), describe(&e.op));
                }
                first = false;
            })?;
            if cli.json {
                outln!("{}]", if first { "[" } else { "" });
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Verify { source, sqlite, timeout, to, repair, state_dir: sd } => {
            let (l, ..) = link(cli, to)?;
            let (primary, sent) = match (source, sqlite) {
                (_, Some(db)) => {
                    let db = std::fs::canonicalize(db).with_context(|| format!("database {}", db.display()))?;
                    let name = db.file_name().map(|n| n.as_encoded_bytes().to_vec()).context("a database file has a name")?;
                    kura_shadow::sqlite_push::verify_sqlite(&l, &db, &name, &state_dir(sd)?, *repair, duration("--timeout", timeout)?)?
                }
                (Some(source), None) => {
                    let source = std::fs::canonicalize(source).with_context(|| format!("source {}", source.display()))?;
                    kura_shadow::verify::verify_primary(&l, &source, &state_dir(sd)?, *repair)?
                }
                (None, None) => anyhow::bail!("give --source DIR or --sqlite DB"),
            };
            let standby = l.verify(*repair)?;
            if cli.json {
                outln!("{}", serde_json::json!({"primary": primary, "standby": standby, "sent_records": sent.records}));
            } else {
                for (what, v) in [("this host vs the standby's record of it", &primary), ("the standby's mirror vs its journal", &standby)] {
                    let fixed = if v.repaired { " (repaired)" } else { "" };
                    outln!("{what}: {} entries at record {}, {} differ{fixed}", v.entries, v.record, v.drifted);
                    for p in &v.drift {
                        outln!("  {p}");
                    }
                }
            }
            let clean = (primary.drifted == 0 || primary.repaired) && (standby.drifted == 0 || standby.repaired);
            Ok(if clean { Outcome::Ok } else { Outcome::Partial })
        }
        ShadowCommand::Promote { to } => {
            let (l, ..) = link(cli, to)?;
            let (epoch, seq, caught_up) = l.promote()?;
            if cli.json {
                outln!("{}", serde_json::json!({"epoch": epoch, "promoted_seq": seq, "caught_up": caught_up}));
            } else if !cli.quiet {
                eprintln!("kura: promoted to epoch {epoch} after record {seq}: the mirror is the primary copy; the old primary's pushes are refused");
                if !caught_up {
                    eprintln!("kura: the mirror is still applying records up to {seq} (see kura shadow status)");
                }
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Rejoin { source, to, branch, follow, state_dir: sd } => {
            let meta = std::fs::metadata(source).with_context(|| format!("source {}", source.display()))?;
            anyhow::ensure!(meta.is_dir(), "source {} is not a directory", source.display());
            let source = std::fs::canonicalize(source).with_context(|| format!("source {}", source.display()))?;
            let (l, ..) = link(cli, to)?;
            let name = branch.clone().unwrap_or_else(kura_shadow::rejoin::default_branch_name);
            let sd = state_dir(sd)?;
            let r = kura_shadow::rejoin::rejoin(&l, &source, &sd, &name)?;
            if !cli.quiet && !cli.json {
                match &r.branch {
                    Some(b) => eprintln!("kura: {} entries differed from the primary's tree: kept on the standby as branch {b} ({} bytes sent; kura shadow restore --branch {b} brings them back)", r.diverged, r.branch_bytes),
                    None => eprintln!("kura: nothing this host wrote was missing on the new primary"),
                }
                eprintln!(
                    "kura: {} is now a copy of the primary at epoch {} (record {}): {} entries written, {} removed, {} bytes fetched",
                    source.display(),
                    r.epoch,
                    r.head,
                    r.written,
                    r.removed,
                    r.fetched_bytes
                );
            }
            let mut followed = None;
            if *follow && !r.handed_back {
                kura_server::init_logging(false);
                followed = Some(kura_shadow::rejoin::follow(&l, &source, &sd, &|| false)?);
            }
            let handed_back = r.handed_back.then_some(r.epoch).or(followed.as_ref().and_then(|f| f.handed_back));
            if cli.json {
                outln!("{}", serde_json::json!({"rejoined": r, "followed": followed, "handed_back": handed_back}));
            } else if !cli.quiet {
                if let Some(f) = &followed {
                    eprintln!("kura: followed the primary for {} records ({} bytes fetched), holding record {}", f.records, f.fetched_bytes, f.head);
                }
                if let Some(e) = handed_back {
                    eprintln!("kura: the stream was handed back to this host at epoch {e}: {} is the primary copy again; start `kura shadow push` for it", source.display());
                }
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Demote { to } => {
            let (l, ..) = link(cli, to)?;
            let (epoch, seq) = l.demote()?;
            if cli.json {
                outln!("{}", serde_json::json!({"epoch": epoch, "demoted_seq": seq}));
            } else if !cli.quiet {
                eprintln!(
                    "kura: handed back at epoch {epoch} after record {seq}: the mirror follows the journal again; the host following the stream (kura shadow rejoin --follow) stops there and pushes with `kura shadow push`"
                );
            }
            Ok(Outcome::Ok)
        }
        ShadowCommand::Restore { journal, at, branch, path: only, sqlite, txid, target } => {
            let only = only.as_deref().map(|p| p.trim_matches('/').as_bytes().to_vec());
            if *sqlite {
                let j = kura_shadow::restore::open(journal)?;
                let when = match (txid, at) {
                    (Some(n), _) => kura_shadow::restore::Moment::Txid(*n),
                    (None, Some(at)) => kura_shadow::restore::Moment::At(crate::cmd::backup::parse_time(at)?.as_nanosecond() as i64),
                    (None, None) => kura_shadow::restore::Moment::Txid(j.head()),
                };
                let r = kura_shadow::restore::restore_sqlite(&j, when, only.as_deref(), target)?;
                if cli.json {
                    outln!("{}", serde_json::to_string(&r)?);
                } else if !cli.quiet {
                    eprintln!("kura: restored the database as of transaction {} (received {}): {} bytes into {}, integrity_check ok", r.seq, show_time(r.time_ns), r.bytes, target.display());
                }
                return Ok(Outcome::Ok);
            }
            let r = match branch {
                Some(b) => kura_shadow::restore::restore_branch(journal, b, only.as_deref(), target)?,
                None => {
                    let j = kura_shadow::restore::open(journal)?;
                    let at_ns = match at {
                        Some(at) => crate::cmd::backup::parse_time(at)?.as_nanosecond() as i64,
                        None => i64::MAX,
                    };
                    kura_shadow::restore::restore(&j, at_ns, only.as_deref(), target)?
                }
            };
            if cli.json {
                outln!("{}", serde_json::to_string(&r)?);
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
