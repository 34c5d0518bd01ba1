//! `kura drill` (prove that a repository restores, and record it) and `kura status` (is every
//! copy fresh, verified and drilled; exit codes, a command and a webhook for monitoring).

use crate::args::{Cli, DrillArgs, LimitArgs, ReportArgs, StatusArgs};
use crate::output::{bytes, json, short};
use crate::{Outcome, open};
use anyhow::{Context, Result, bail};
use kura_ops::status::{Level, Limits, RepoStatus};
use kura_store::remote::{RemoteOptions, is_remote};
use kura_store::{RemoteStore, Store};
use std::io::Write;
use std::path::Path;

/// Something needs attention: exit 4 (late) or 5 (critical, failing).
#[derive(Debug)]
pub struct Attention {
    /// How bad.
    pub level: Level,
    /// What, in one line.
    pub message: String,
}

impl std::fmt::Display for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Attention {}

impl Attention {
    /// The exit code.
    pub fn code(&self) -> u8 {
        if self.level == Level::Crit { 5 } else { 4 }
    }
}

/// A random copy of a topology, opened with its host's read token and the passphrase.
fn random_copy(cli: &Cli, file: &Path) -> Result<(kura_repo::Repository, String)> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let plan = kura_ops::topology::plan(&text).map_err(|source| crate::cmd::plan::Refused { file: file.display().to_string(), source })?;
    let mut copies: Vec<(String, &str, &str)> = Vec::new();
    for d in &plan.datasets {
        copies.push((format!("{}: backup on {}", d.name, d.host), &d.host, &d.repository));
        for c in d.copies.iter().filter(|c| c.kind == "generation") {
            copies.push((format!("{}: {} on {}", d.name, c.name, c.host), &c.host, &c.repository));
        }
    }
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let (label, host, repo) = &copies[(u64::from_le_bytes(b) % copies.len() as u64) as usize];
    let base = file.parent().unwrap_or(Path::new("."));
    let (addr, token, fingerprint) = host_access(&plan, base, host).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
    let url = format!("kura://{addr}/{repo}");
    let opts = RemoteOptions { token, fingerprint, retries: 3 };
    let store = RemoteStore::open(&url, &opts).map_err(kura_repo::RepoError::from).with_context(|| label.clone())?;
    let loc = open::Location { path: std::path::PathBuf::new(), url: Some(url.clone()), default: false };
    let pw = open::password(cli, &loc, false)?;
    let repo = kura_repo::Repository::open(std::sync::Arc::new(store), &pw).with_context(|| label.clone())?;
    Ok((open::index(repo, "drill")?, label.clone()))
}

/// Runs a drill on the repository, or on a random copy of a topology.
pub fn drill(cli: &Cli, a: &DrillArgs) -> Result<Outcome> {
    let (repo, label) = match &a.topology {
        Some(f) => random_copy(cli, f)?,
        None => (open::open_indexed(cli, "drill")?, open::location(cli)?.describe()),
    };
    let snapshot = match &a.snapshot {
        Some(s) => Some(repo.find_snapshot(s, |_| true)?.0),
        None => None,
    };
    let opts = kura_ops::drill::DrillOptions {
        snapshot,
        files: if a.full { 0 } else { a.files.max(1) },
        scratch: a.scratch.clone().unwrap_or_else(std::env::temp_dir),
    };
    let o = kura_ops::drill::drill(&repo, &opts).context("drill")?;
    let r = &o.record;
    if cli.json {
        let failures: Vec<_> = o.failures.iter().map(|(p, why)| serde_json::json!({"path": p, "error": why})).collect();
        json(&serde_json::json!({"repository": label, "record": r, "failures": failures}))?;
    } else if !cli.quiet {
        outln!(
            "{label}: drill of snapshot {} ({} {}, {}): {} file(s) of {}, {} restored and checked in {:.2} s; {}",
            short(&r.snapshot, 8),
            r.host,
            r.paths.join(","),
            r.snapshot_time,
            r.files,
            r.mode,
            bytes(r.bytes),
            r.seconds,
            if r.ok { "all match what was backed up" } else { "FAILED" }
        );
    }
    for (p, why) in o.failures.iter().take(20) {
        eprintln!("kura: {p}: {why}");
    }
    if !r.ok {
        bail!(Attention {
            level: Level::Crit,
            message: format!("drill of snapshot {} failed: {} of {} file(s): {}", short(&r.snapshot, 8), r.failed, r.files, r.error.as_deref().unwrap_or("")),
        });
    }
    Ok(Outcome::Ok)
}

fn hours(s: &str, what: &str) -> Result<f64> {
    kura_ops::topology::hours(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// The status of one repository: a kura server's also reports its jobs.
fn one(store: &dyn Store, remote: Option<&RemoteStore>, label: &str, limits: Limits) -> RepoStatus {
    let now = jiff::Timestamp::now();
    let jobs = match remote.map(|r| r.jobs()) {
        Some(Ok(v)) => kura_ops::status::parse_jobs(&v),
        _ => Vec::new(),
    };
    kura_ops::status::repo_status(store, label, jobs, limits, now)
        .unwrap_or_else(|e| kura_ops::status::unreachable(label, &store.location(), limits, &e.to_string()))
}

/// A repository on a topology host's server, read with the host's read token.
/// How to reach a topology host's server: its address, its read token (from `token_file`,
/// relative to the topology file) and its certificate fingerprint.
fn host_access(plan: &kura_ops::topology::Plan, base: &Path, host: &str) -> Result<(String, String, Option<String>), String> {
    let access = plan.hosts.get(host).ok_or_else(|| format!("no host {host} in the topology"))?;
    let addr = access.address.clone().ok_or_else(|| format!("host {host} has no address in the topology"))?;
    let f = access.token_file.as_ref().ok_or_else(|| format!("host {host} has no token_file (a read token of its server)"))?;
    let token = std::fs::read_to_string(base.join(f)).map_err(|e| format!("cannot read token file {}: {e}", base.join(f).display()))?;
    Ok((addr, token.trim().to_string(), access.fingerprint.clone()))
}

fn on_host(plan: &kura_ops::topology::Plan, base: &Path, host: &str, repository: &str, label: &str, limits: Limits) -> RepoStatus {
    let (addr, token, fingerprint) = match host_access(plan, base, host) {
        Ok(a) => a,
        Err(why) => return kura_ops::status::unreachable(label, host, limits, &why),
    };
    let url = format!("kura://{addr}/{repository}");
    let opts = RemoteOptions { token, fingerprint, retries: 1 };
    match RemoteStore::open(&url, &opts) {
        Ok(r) => one(&r, Some(&r), label, limits),
        Err(e) => kura_ops::status::unreachable(label, &url, limits, &e.to_string()),
    }
}

/// A shadow stream on a topology host, as its standby reports it.
fn shadow_on_host(plan: &kura_ops::topology::Plan, base: &Path, host: &str, stream: &str, label: &str, limits: Limits) -> RepoStatus {
    let (addr, token, fingerprint) = match host_access(plan, base, host) {
        Ok(a) => a,
        Err(why) => return kura_ops::status::unreachable(label, host, limits, &why),
    };
    let loc = format!("kura://{addr}/shadow/{stream}");
    let st = kura_shadow::push::Link::new(&format!("https://{addr}"), stream, &token, fingerprint.as_deref()).and_then(|l| l.status());
    match st {
        Ok(st) => {
            let contact = if st.last_contact_ns > 0 { (kura_shadow::now_ns() - st.last_contact_ns).max(0) as f64 / 1e9 } else { f64::INFINITY };
            let facts = kura_ops::status::ShadowFacts { role: st.role.clone(), lag_seconds: st.lag_secs, contact_seconds: contact, head: st.head, applied: st.applied };
            kura_ops::status::shadow_status(label, &loc, limits, facts)
        }
        Err(e) => kura_ops::status::unreachable(label, &loc, limits, &e.to_string()),
    }
}

/// Every status `kura status` (and `kura report`) looks at.
pub fn gather(cli: &Cli, topology: Option<&Path>, l: &LimitArgs) -> Result<Vec<RepoStatus>> {
    let drill_warn_hours = if l.drill_warn == "off" { None } else { Some(hours(&l.drill_warn, "--drill-warn")?) };
    let limits = Limits { warn_hours: hours(&l.warn, "--warn")?, crit_hours: hours(&l.crit, "--crit")?, drill_warn_hours };
    let Some(file) = topology else {
        let loc = open::location(cli)?;
        return Ok(vec![match &loc.url {
            // A server that cannot be reached (or refuses the token) is a critical copy, as it
            // is in a topology: the same exit code and the same notification.
            Some(u) if is_remote(u) => match RemoteStore::open(u, &open::remote_options(cli)?) {
                Ok(r) => one(&r, Some(&r), &loc.describe(), limits),
                Err(e) => kura_ops::status::unreachable(&loc.describe(), u, limits, &e.to_string()),
            },
            _ => {
                let store = open::open_store(cli, &loc)?;
                one(store.as_ref(), None, &loc.describe(), limits)
            }
        }]);
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let plan = kura_ops::topology::plan(&text).map_err(|source| crate::cmd::plan::Refused { file: file.display().to_string(), source })?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for d in &plan.datasets {
        out.push(on_host(&plan, base, &d.host, &d.repository, &format!("{}: backup on {}", d.name, d.host), limits));
        for c in d.copies.iter().filter(|c| c.kind == "shadow") {
            out.push(shadow_on_host(&plan, base, &c.host, &c.repository, &format!("{}: shadow on {}", d.name, c.host), limits));
        }
        for c in d.copies.iter().filter(|c| c.kind == "generation") {
            let l = Limits { warn_hours: c.warn_hours, crit_hours: c.crit_hours, drill_warn_hours };
            out.push(on_host(&plan, base, &c.host, &c.repository, &format!("{}: {} on {}", d.name, c.name, c.host), l));
        }
    }
    Ok(out)
}

fn age(h: f64) -> String {
    if h < 1.0 {
        format!("{:.0} min", h * 60.0)
    } else if h < 72.0 {
        format!("{h:.1} h")
    } else {
        format!("{:.1} d", h / 24.0)
    }
}

/// The human report, one block per repository.
fn text(all: &[RepoStatus]) -> String {
    let mut s = String::new();
    for r in all {
        if let Some(f) = &r.shadow {
            s.push_str(&format!(
                "{:4}  {}  (live shadow, {}: {:.1} s behind, last contact {:.0} s ago, record {} of {} applied)\n",
                r.level.name().to_uppercase(),
                r.label,
                f.role,
                f.lag_seconds,
                f.contact_seconds,
                f.applied,
                f.head
            ));
            for why in &r.reasons {
                s.push_str(&format!("      - {why}\n"));
            }
            continue;
        }
        let newest = r.groups.iter().map(|g| g.age_hours).fold(f64::NAN, f64::min);
        let drill = match &r.last_drill {
            Some(d) => format!("last drill {} ({}, {} files in {:.1} s)", if d.ok { "ok" } else { "FAILED" }, d.time, d.files, d.seconds),
            None => "never drilled".into(),
        };
        let verify = r
            .jobs
            .iter()
            .find(|j| j.name == "verify")
            .map(|j| format!("verified {}", j.last_success.as_deref().unwrap_or("never")))
            .unwrap_or_else(|| "no server verification".into());
        s.push_str(&format!(
            "{:4}  {}  ({} snapshot(s), newest {}; {}; {})\n",
            r.level.name().to_uppercase(),
            r.label,
            r.snapshots,
            if newest.is_nan() { "none".into() } else { age(newest) },
            verify,
            drill
        ));
        for why in &r.reasons {
            s.push_str(&format!("      - {why}\n"));
        }
    }
    s
}

/// Tells the notify command and the webhook; their failures are warnings.
fn notify(a: &StatusArgs, level: Level, report: &str, all: &[RepoStatus]) {
    if let Some(cmd) = &a.notify {
        let child = std::process::Command::new("sh").arg("-c").arg(cmd).env("KURA_STATUS", level.name()).stdin(std::process::Stdio::piped()).spawn();
        match child {
            Ok(mut c) => {
                if let Some(mut i) = c.stdin.take() {
                    let _ = i.write_all(report.as_bytes());
                }
                match c.wait() {
                    Ok(st) if st.success() => {}
                    Ok(st) => eprintln!("kura: warning: the notify command exited with {st}"),
                    Err(e) => eprintln!("kura: warning: the notify command: {e}"),
                }
            }
            Err(e) => eprintln!("kura: warning: cannot run the notify command: {e}"),
        }
    }
    if let Some(url) = &a.webhook {
        let body = serde_json::json!({"status": level.name(), "text": report, "repositories": all});
        match kura_store::remote::post_json(url, body.to_string().as_bytes()) {
            Ok(code) if (200..300).contains(&code) => {}
            Ok(code) => eprintln!("kura: warning: the webhook answered {code}"),
            Err(e) => eprintln!("kura: warning: the webhook failed: {e}"),
        }
    }
}

/// `kura status`.
pub fn status(cli: &Cli, a: &StatusArgs) -> Result<Outcome> {
    let all = gather(cli, a.topology.as_deref(), &a.limits)?;
    let report = text(&all);
    if cli.json {
        json(&all)?;
    } else if !cli.quiet {
        crate::output::line(format_args!("{}", report.trim_end()));
    }
    let level = all.iter().map(|r| r.level).max().unwrap_or(Level::Ok);
    if level == Level::Ok {
        return Ok(Outcome::Ok);
    }
    notify(a, level, &report, &all);
    let bad: Vec<&str> = all.iter().filter(|r| r.level != Level::Ok).map(|r| r.label.as_str()).collect();
    bail!(Attention { level, message: format!("{} of {} repositories need attention ({}): {}", bad.len(), all.len(), level.name(), bad.join("; ")) })
}

/// `kura report`: the facts of `status` as a document. Writing it is the job: a late or
/// critical copy is in the report, not an error.
pub fn report(cli: &Cli, a: &ReportArgs) -> Result<Outcome> {
    let all = gather(cli, a.topology.as_deref(), &a.limits)?;
    let plan = match &a.topology {
        Some(f) => Some(kura_ops::topology::plan(&std::fs::read_to_string(f)?).map_err(|source| crate::cmd::plan::Refused { file: f.display().to_string(), source })?),
        None => None,
    };
    let input = kura_ops::report::ReportInput {
        title: &a.title,
        generated: jiff::Timestamp::now(),
        plan: plan.as_ref(),
        statuses: &all,
        version: env!("CARGO_PKG_VERSION"),
    };
    let doc = if a.format == "markdown" { kura_ops::report::markdown(&input) } else { kura_ops::report::html(&input) };
    match &a.output {
        Some(f) => {
            // Whole or not at all: a monitoring page never shows half a report.
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, &doc).and_then(|_| std::fs::rename(&tmp, f)).with_context(|| format!("cannot write {}", f.display()))?;
            if !cli.quiet {
                eprintln!("kura: report of {} repositories written to {}", all.len(), f.display());
            }
        }
        None => crate::output::line(format_args!("{}", doc.trim_end())),
    }
    Ok(Outcome::Ok)
}
