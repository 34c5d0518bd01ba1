//! `kura plan TOPOLOGY.toml`: checks a topology file and prints which copies of each dataset
//! will exist on which machine and for how long.

use crate::args::Cli;
use crate::output::json;
use crate::Outcome;
use anyhow::{Context, Result};
use std::path::Path;

/// A topology refused (exit code 2): `FILE:LINE: reason`, as compilers say it.
#[derive(Debug)]
pub struct Refused {
    /// The topology file.
    pub file: String,
    /// The line and the reason.
    pub source: kura_ops::topology::TopologyError,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.source.line, self.source.message)
    }
}

impl std::error::Error for Refused {}

/// Hours for people: "26h", "8d", "2.0y".
fn span(h: f64) -> String {
    if h < 72.0 {
        format!("{h:.0}h")
    } else if h < 24.0 * 365.0 {
        format!("{:.0}d", h / 24.0)
    } else {
        format!("{:.1}y", h / 8766.0)
    }
}

/// Prints the plan of `file` (or one host's server configuration), or refuses it naming the line.
pub fn run(cli: &Cli, file: &Path, server_config: Option<&str>) -> Result<Outcome> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read topology {}", file.display()))?;
    let plan = kura_ops::topology::plan(&text).map_err(|source| Refused { file: file.display().to_string(), source })?;
    if let Some(host) = server_config {
        let cfg = kura_ops::topology::server_config(&plan, host).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        outln!("{}", cfg.trim_end());
        return Ok(Outcome::Ok);
    }
    if cli.json {
        json(&plan)?;
        return Ok(Outcome::Ok);
    }
    use std::fmt::Write as _;
    let mut out = String::new();
    for d in &plan.datasets {
        let paths = if d.paths.is_empty() { "no paths listed".into() } else { d.paths.join(", ") };
        let _ = writeln!(out, "dataset {} on {} ({paths})", d.name, d.host);
        out.push_str("  copy       on       from       every      keep  reaches back     late / critical after\n");
        for c in &d.copies {
            let every = c.every.map(|p| p.name()).unwrap_or("live");
            let keep = if c.kind == "shadow" { "-".to_string() } else { c.keep.to_string() };
            let limits = if c.kind == "shadow" { "-".to_string() } else { format!("{} / {}", span(c.warn_hours), span(c.crit_hours)) };
            let _ = writeln!(out, "  {:<10} {:<8} {:<10} {:<9} {:>5}  {:<16} {}", c.name, c.host, c.from, every, keep, c.covers, limits);
        }
        let _ = writeln!(out, "  {} machine(s) besides {} hold a copy; the oldest state kept reaches back {}", d.machines, d.host, span(d.reaches_back_hours));
    }
    if !cli.quiet {
        let _ = writeln!(out, "machines holding copies: {}", plan.machines.join(", "));
    }
    outln!("{}", out.trim_end_matches('\n'));
    Ok(Outcome::Ok)
}
