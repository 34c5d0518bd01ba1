//! Topology files: a site's whole protection in one TOML file (hosts, datasets, each dataset's
//! shadow and its generations on other machines). `plan` checks it and says which copies will
//! exist where and for how long; a topology a single lost machine or the protected host itself
//! could wipe out is refused, naming the line. The format is in docs/TOPOLOGY.md.

use crate::retention::{Period, parse_span};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use toml::Spanned;

/// A topology that cannot be used, and the line (1-based) that says why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct TopologyError {
    /// The line of the file.
    pub line: usize,
    /// What is wrong there.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    host: BTreeMap<String, HostSection>,
    #[serde(default)]
    dataset: Vec<Spanned<DatasetSection>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HostSection {
    /// Where its kura server listens (`HOST:PORT`).
    #[serde(default)]
    address: Option<String>,
    /// Its certificate's fingerprint (`sha256:…`), for `status` and `report`.
    #[serde(default)]
    fingerprint: Option<String>,
    /// A file holding a read token of its server, for `status` and `report` (relative to the
    /// topology file).
    #[serde(default)]
    token_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetSection {
    name: Spanned<String>,
    host: Spanned<String>,
    #[serde(default)]
    paths: Vec<String>,
    shadow: Option<Spanned<String>>,
    shadow_window: Option<Spanned<String>>,
    /// The repository's name on its host's server (default: the dataset's name).
    repository: Option<String>,
    #[serde(default)]
    generation: Vec<Spanned<GenerationSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerationSection {
    name: Spanned<String>,
    host: Spanned<String>,
    from: Spanned<String>,
    every: Spanned<String>,
    keep: Spanned<u64>,
    warn: Option<Spanned<String>>,
    crit: Option<Spanned<String>>,
    /// The repository's name on its host's server (default: the dataset's name).
    repository: Option<String>,
}

/// What a topology will keep.
#[derive(Debug, Serialize)]
pub struct Plan {
    /// Each dataset, in file order.
    pub datasets: Vec<DatasetPlan>,
    /// Every machine that holds a copy of something, sorted.
    pub machines: Vec<String>,
    /// How to reach each host's server.
    pub hosts: BTreeMap<String, HostAccess>,
}

/// How to reach a host's kura server.
#[derive(Debug, Clone, Serialize)]
pub struct HostAccess {
    /// `HOST:PORT`.
    pub address: Option<String>,
    /// Certificate fingerprint.
    pub fingerprint: Option<String>,
    /// Read token file (as written: relative to the topology file).
    pub token_file: Option<String>,
}

/// One dataset's copies.
#[derive(Debug, Serialize)]
pub struct DatasetPlan {
    /// Its name.
    pub name: String,
    /// The protected host.
    pub host: String,
    /// Its paths there.
    pub paths: Vec<String>,
    /// Shadow first, then generations in file order.
    pub copies: Vec<CopyPlan>,
    /// Machines other than the protected host that hold a copy.
    pub machines: usize,
    /// How far back the oldest kept state reaches (hours).
    pub reaches_back_hours: f64,
    /// Its backup repository on the protected host's server.
    pub repository: String,
}

/// One copy of a dataset.
#[derive(Debug, Serialize)]
pub struct CopyPlan {
    /// `shadow` or the generation's name.
    pub name: String,
    /// `shadow` or `generation`.
    pub kind: &'static str,
    /// The machine that holds it.
    pub host: String,
    /// Where it comes from: the protected host, the shadow's host or another generation.
    pub from: String,
    /// How often a generation is taken (none for the live shadow).
    pub every: Option<Period>,
    /// Generations kept.
    pub keep: u64,
    /// How far back it reaches (hours): keep × period, or the shadow's journal window.
    pub covers_hours: f64,
    /// The same, for people ("14 days").
    pub covers: String,
    /// Age of the newest copy that is a warning (hours; 0 for the shadow).
    pub warn_hours: f64,
    /// Age of the newest copy that is critical (hours; 0 for the shadow).
    pub crit_hours: f64,
    /// The repository's name on its host's server (generations; the stream's for the shadow).
    pub repository: String,
}

impl Plan {
    /// `kura://ADDRESS/REPO` of a repository on `host`, when the host has an address.
    pub fn url(&self, host: &str, repository: &str) -> Option<String> {
        let a = self.hosts.get(host)?.address.as_ref()?;
        Some(format!("kura://{a}/{repository}"))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

fn period(s: &str) -> Option<Period> {
    Period::ALL.into_iter().find(|p| p.name() == s)
}

/// A period's length in hours (months and years on average).
fn period_hours(p: Period) -> f64 {
    match p {
        Period::Hourly => 1.0,
        Period::Daily => 24.0,
        Period::Weekly => 168.0,
        Period::Biweekly => 336.0,
        Period::Monthly => 730.5,
        Period::Yearly => 8766.0,
    }
}

fn unit_name(p: Period, n: u64) -> String {
    let u = match p {
        Period::Hourly => "hour",
        Period::Daily => "day",
        Period::Weekly => "week",
        Period::Biweekly => "fortnight",
        Period::Monthly => "month",
        Period::Yearly => "year",
    };
    format!("{n} {u}{}", if n == 1 { "" } else { "s" })
}

/// Hours of a duration like `26h`, `7d`, `1m` (months and years from 2026-01-01).
pub fn hours(s: &str) -> Result<f64, String> {
    let span = parse_span(s)?;
    let h = span.total((jiff::Unit::Hour, jiff::civil::date(2026, 1, 1))).map_err(|e| format!("bad duration {s:?}: {e}"))?;
    if h <= 0.0 {
        return Err(format!("duration {s:?} is not positive"));
    }
    Ok(h)
}

/// Reads a topology and works out its plan, or says which line makes it unusable.
pub fn plan(text: &str) -> Result<Plan, TopologyError> {
    let at = |span: std::ops::Range<usize>, message: String| TopologyError { line: line_of(text, span.start), message };
    let file: File = toml::from_str(text).map_err(|e| TopologyError {
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().trim().replace('\n', " "),
    })?;
    let known = |h: &Spanned<String>, what: &str| {
        if file.host.contains_key(h.get_ref()) {
            Ok(())
        } else {
            let listed: Vec<&str> = file.host.keys().map(String::as_str).collect();
            Err(at(h.span(), format!("{what} is on host {:?}, which no [host.{}] section describes (hosts: {})", h.get_ref(), h.get_ref(), listed.join(", "))))
        }
    };
    if file.dataset.is_empty() {
        return Err(TopologyError { line: 1, message: "no [[dataset]]: nothing is protected".into() });
    }
    let mut names = BTreeSet::new();
    let mut datasets = Vec::new();
    let mut all_machines = BTreeSet::new();
    for ds in &file.dataset {
        let d = ds.get_ref();
        let name = d.name.get_ref().clone();
        if !names.insert(name.clone()) {
            return Err(at(d.name.span(), format!("a second dataset named {name:?}")));
        }
        let protected = d.host.get_ref().clone();
        known(&d.host, &format!("dataset {name}"))?;
        let mut copies = Vec::new();
        if let Some(sh) = &d.shadow {
            known(sh, &format!("the shadow of {name}"))?;
            if sh.get_ref() == &protected {
                return Err(at(sh.span(), format!("the shadow of {name} is on {protected}, the protected host itself: it must be another machine")));
            }
            let (covers_hours, covers) = match &d.shadow_window {
                Some(w) => (hours(w.get_ref()).map_err(|e| at(w.span(), e))?, format!("{} window", w.get_ref())),
                None => (0.0, "live, no history".into()),
            };
            copies.push(CopyPlan {
                name: "shadow".into(),
                kind: "shadow",
                host: sh.get_ref().clone(),
                from: protected.clone(),
                every: None,
                keep: 0,
                covers_hours,
                covers,
                warn_hours: 0.0,
                crit_hours: 0.0,
                repository: name.clone(),
            });
        } else if let Some(w) = &d.shadow_window {
            return Err(at(w.span(), format!("shadow_window without a shadow host for {name}")));
        }
        // Generations by name, with their line, host, source and period.
        let mut gens: HashMap<String, (&Spanned<GenerationSection>, Period)> = HashMap::new();
        for gs in &d.generation {
            let g = gs.get_ref();
            let gname = g.name.get_ref().clone();
            if gname == "shadow" || gens.contains_key(&gname) {
                return Err(at(g.name.span(), format!("dataset {name} has a second copy named {gname:?}")));
            }
            known(&g.host, &format!("generation {gname} of {name}"))?;
            if g.host.get_ref() == &protected {
                return Err(at(
                    g.host.span(),
                    format!("generation {gname} of {name} sits on {protected}, the protected host: a buggy script there could delete it; put it on another machine"),
                ));
            }
            let p = period(g.every.get_ref()).ok_or_else(|| at(g.every.span(), format!("every = {:?}: use hourly, daily, weekly, biweekly, monthly or yearly", g.every.get_ref())))?;
            if *g.keep.get_ref() == 0 {
                return Err(at(g.keep.span(), format!("generation {gname} of {name} keeps nothing (keep = 0)")));
            }
            gens.insert(gname, (gs, p));
        }
        if gens.is_empty() {
            return Err(at(ds.span(), format!("dataset {name} has no [[dataset.generation]]: nothing keeps its history on another machine")));
        }
        let gen_hosts: BTreeSet<&str> = gens.values().map(|(g, _)| g.get_ref().host.get_ref().as_str()).collect();
        if gen_hosts.len() < 2 {
            let h = gen_hosts.iter().next().copied().unwrap_or_default();
            return Err(at(ds.span(), format!("every generation of {name} sits on {h}: losing that one machine loses them all; put them on at least two")));
        }
        for gs in &d.generation {
            let g = gs.get_ref();
            let gname = g.name.get_ref();
            let p = gens[gname].1;
            let from = g.from.get_ref();
            let from_shadow = d.shadow.as_ref().is_some_and(|s| s.get_ref() == from);
            if from == &protected || from_shadow {
                // Straight from the protected host's repository or the shadow's mirror.
            } else if let Some((_, sp)) = gens.get(from) {
                if period_hours(*sp) > period_hours(p) {
                    return Err(at(
                        g.from.span(),
                        format!("generation {gname} ({}) pulls from {from}, which changes only {}: a copy cannot be taken more often than its source", p.name(), sp.name()),
                    ));
                }
                // Follow the chain: a cycle never reaches a host.
                let mut chain = vec![gname.as_str()];
                let mut cur = from.as_str();
                while let Some((next, _)) = gens.get(cur) {
                    let seen = chain.contains(&cur);
                    chain.push(cur);
                    if seen {
                        return Err(at(g.from.span(), format!("generations of {name} pull from each other in a cycle: {}", chain.join(" <- "))));
                    }
                    cur = next.get_ref().from.get_ref();
                }
            } else {
                return Err(at(
                    g.from.span(),
                    format!("generation {gname} of {name} pulls from {from:?}, which is neither {protected} (the protected host), its shadow, nor a generation of {name}"),
                ));
            }
            let keep = *g.keep.get_ref();
            let limit = |v: &Option<Spanned<String>>, default: f64| match v {
                Some(s) => hours(s.get_ref()).map_err(|e| at(s.span(), e)),
                None => Ok(default),
            };
            let warn = limit(&g.warn, (period_hours(p) * 1.25).ceil())?;
            let crit = limit(&g.crit, period_hours(p) * 2.0)?;
            if warn > crit {
                let span = g.warn.as_ref().or(g.crit.as_ref()).map(|s| s.span()).unwrap_or(gs.span());
                return Err(at(span, format!("generation {gname} of {name}: warn ({warn}h) is later than crit ({crit}h)")));
            }
            copies.push(CopyPlan {
                name: gname.clone(),
                kind: "generation",
                host: g.host.get_ref().clone(),
                from: from.clone(),
                every: Some(p),
                keep,
                covers_hours: keep as f64 * period_hours(p),
                covers: unit_name(p, keep),
                warn_hours: warn,
                crit_hours: crit,
                repository: g.repository.clone().unwrap_or_else(|| name.clone()),
            });
        }
        let machines: BTreeSet<&str> = copies.iter().map(|c| c.host.as_str()).collect();
        all_machines.extend(machines.iter().map(|s| s.to_string()));
        let reaches_back_hours = copies.iter().map(|c| c.covers_hours).fold(0.0, f64::max);
        let repository = d.repository.clone().unwrap_or_else(|| name.clone());
        datasets.push(DatasetPlan { name, host: protected, paths: d.paths.clone(), machines: machines.len(), copies, reaches_back_hours, repository });
    }
    let hosts = file
        .host
        .iter()
        .map(|(n, h)| (n.clone(), HostAccess { address: h.address.clone(), fingerprint: h.fingerprint.clone(), token_file: h.token_file.clone() }))
        .collect();
    Ok(Plan { datasets, machines: all_machines.into_iter().collect(), hosts })
}

/// When a generation's pull runs: often enough that a copy is never much later than its source.
fn pull_schedule(p: Period) -> &'static str {
    match p {
        Period::Hourly => "hourly :15",
        Period::Daily => "daily 01:30",
        _ => "weekly sun 03:00",
    }
}

/// The `kura serve` configuration of `host`: one repository per generation it keeps, each with
/// its pull (from the repository of its source, with a read token of the source's host), its
/// retention (keep that many of its period), a daily verification and a weekly prune.
pub fn server_config(plan: &Plan, host: &str) -> Result<String, String> {
    use std::fmt::Write as _;
    if !plan.hosts.contains_key(host) {
        return Err(format!("no host named {host:?} in the topology"));
    }
    let mut out = format!("# kura serve configuration of host {host}, made by `kura plan --server-config {host}`.\n");
    out.push_str("listen = \"0.0.0.0:8443\"\nstate_dir = \"/var/lib/kura\"\n");
    let mut any = false;
    for d in &plan.datasets {
        for c in d.copies.iter().filter(|c| c.kind == "generation" && c.host == host) {
            any = true;
            let every = c.every.map(|p| p.name()).unwrap_or("daily");
            let (src_host, src_repo) = if c.from == d.host {
                (d.host.as_str(), d.repository.as_str())
            } else if let Some(g) = d.copies.iter().find(|g| g.kind == "generation" && g.name == c.from) {
                (g.host.as_str(), g.repository.as_str())
            } else {
                let _ = write!(
                    out,
                    "\n# generation {} of {} takes the shadow's mirror on {}: back the mirror up there into a\n# repository and pull from that.\n",
                    c.name, d.name, c.from
                );
                continue;
            };
            let from = plan.url(src_host, src_repo).ok_or_else(|| format!("host {src_host} has no address: generation {} of {} cannot reach it", c.name, d.name))?;
            let _ = write!(
                out,
                "\n# {} generation of {}: the newest of each {} from {}, {} kept ({}).\n[[repository]]\nname = \"{}\"\n[repository.pull]\nschedule = \"{}\"\nfrom = \"{}\"\ntoken-file = \"/etc/kura/{}-read.token\"\n",
                c.name,
                d.name,
                every,
                src_host,
                c.keep,
                c.covers,
                c.repository,
                c.every.map(pull_schedule).unwrap_or("daily 01:30"),
                from,
                src_host
            );
            if let Some(fp) = plan.hosts.get(src_host).and_then(|h| h.fingerprint.as_ref()) {
                let _ = writeln!(out, "fingerprint = \"{fp}\"");
            }
            let _ = write!(
                out,
                "newest-of = \"{every}\"\n[repository.retention]\nschedule = \"daily 06:00\"\nkeep = {{ {every} = {} }}\n[repository.verify]\nschedule = \"daily 04:00\"\n[repository.prune]\nschedule = \"weekly sun 07:00\"\n",
                c.keep
            );
        }
    }
    if !any {
        return Err(format!("host {host} keeps no generation in this topology"));
    }
    Ok(out)
}

/// Entry point of the `parse_topology` fuzz target (and its proptest twin): any text gives a
/// plan or an error, never a panic.
pub fn fuzz_plan(data: &[u8]) {
    let _ = plan(&String::from_utf8_lossy(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../../../examples/first-server.toml");

    fn err(text: &str) -> TopologyError {
        plan(text).expect_err("refused")
    }

    fn line_with(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).expect(needle) + 1
    }

    #[test]
    fn a_generation_host_gets_a_server_configuration_that_pulls_from_its_source() {
        let p = plan(EXAMPLE).unwrap();
        let d = server_config(&p, "d").unwrap();
        let cfg: toml::Value = toml::from_str(&d).unwrap();
        let r = &cfg["repository"][0];
        assert_eq!(r["name"].as_str(), Some("www"));
        assert_eq!(r["pull"]["from"].as_str(), Some("kura://c.example:8443/www"), "{d}");
        assert_eq!(r["pull"]["newest-of"].as_str(), Some("weekly"));
        assert_eq!(r["retention"]["keep"]["weekly"].as_integer(), Some(8));
        let c = server_config(&p, "c").unwrap();
        assert!(c.contains("from = \"kura://a.example:8443/www\""), "{c}");
        assert!(server_config(&p, "a").unwrap_err().contains("keeps no generation"));
        assert!(server_config(&p, "zz").is_err());
    }

    #[test]
    fn the_story_s_setup_keeps_every_generation_on_its_own_machine() {
        let p = plan(EXAMPLE).unwrap();
        let www = &p.datasets[0];
        let names: Vec<&str> = www.copies.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["shadow", "daily", "weekly", "biweekly", "monthly", "yearly"]);
        let hosts: Vec<&str> = www.copies.iter().map(|c| c.host.as_str()).collect();
        assert_eq!(hosts, ["b", "c", "d", "e", "f", "g"]);
        assert_eq!(www.machines, 6);
        assert_eq!(www.copies[1].covers, "14 days");
        assert_eq!(www.copies[1].every, Some(Period::Daily));
        assert!(www.reaches_back_hours >= 10.0 * 8766.0, "the yearly copies reach back ten years");
        assert_eq!(p.machines, ["b", "c", "d", "e", "f", "g"]);
    }

    /// The example with `from` replaced by `to` on the line holding `from`.
    fn edit(from: &str, to: &str) -> String {
        assert!(EXAMPLE.contains(from), "{from}");
        EXAMPLE.replacen(from, to, 1)
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let t = edit("keep = 14", "keep = 14\nkep = 3");
        let e = err(&t);
        assert_eq!(e.line, line_with(&t, "kep = 3"), "{e}");
        assert!(e.message.contains("kep"), "{e}");
    }

    #[test]
    fn a_missing_host_names_its_line() {
        let t = edit("host = \"d\"", "host = \"x\"");
        let e = err(&t);
        assert_eq!(e.line, line_with(&t, "host = \"x\""), "{e}");
        assert!(e.message.contains("\"x\"") && e.message.contains("[host.x]"), "{e}");
    }

    #[test]
    fn a_cycle_of_pulls_is_refused() {
        let t = r#"
[host.a]
[host.c]
[host.d]
[[dataset]]
name = "www"
host = "a"
[[dataset.generation]]
name = "x"
host = "c"
from = "y"
every = "daily"
keep = 7
[[dataset.generation]]
name = "y"
host = "d"
from = "x"
every = "daily"
keep = 7
"#;
        let e = err(t);
        assert_eq!(e.message, "generations of www pull from each other in a cycle: x <- y <- x");
        assert_eq!(e.line, line_with(t, "from = \"y\""));
    }

    #[test]
    fn a_generation_that_pulls_from_itself_is_a_cycle() {
        let t = edit("from = \"weekly\"", "from = \"biweekly\"");
        let e = err(&t);
        assert!(e.message.contains("cycle: biweekly <- biweekly"), "{e}");
        assert_eq!(e.line, line_with(&t, "from = \"biweekly\""), "{e}");
    }

    #[test]
    fn a_generation_on_the_protected_host_is_refused() {
        let t = edit("host = \"e\"", "host = \"a\" # here");
        let e = err(&t);
        assert_eq!(e.line, line_with(&t, "# here"), "{e}");
        assert!(e.message.contains("protected host") && e.message.contains("biweekly"), "{e}");
    }

    #[test]
    fn generations_all_on_one_host_are_refused() {
        let t = EXAMPLE.replace("host = \"d\"", "host = \"c\"").replace("host = \"e\"", "host = \"c\"").replace("host = \"f\"", "host = \"c\"").replace("host = \"g\"", "host = \"c\"");
        let e = err(&t);
        assert!(e.message.contains("every generation of www sits on c"), "{e}");
        assert_eq!(e.line, line_with(&t, "[[dataset]]"), "{e}");
    }

    #[test]
    fn a_copy_cannot_be_taken_more_often_than_its_source() {
        let t = edit("from = \"a\"", "from = \"weekly\"");
        let e = err(&t);
        assert!(e.message.contains("more often"), "{e}");
    }

    #[test]
    fn warn_after_crit_and_bad_periods_are_refused() {
        let e = err(&edit("warn = \"26h\"", "warn = \"3d\""));
        assert!(e.message.contains("later than crit"), "{e}");
        let t = edit("every = \"daily\"", "every = \"fortnightly\"");
        let e = err(&t);
        assert_eq!(e.line, line_with(&t, "fortnightly"), "{e}");
    }

    #[test]
    fn the_shadow_must_be_another_machine() {
        let t = edit("shadow = \"b\"", "shadow = \"a\"");
        let e = err(&t);
        assert!(e.message.contains("shadow"), "{e}");
        assert_eq!(e.line, line_with(&t, "shadow = \"a\""), "{e}");
    }

    proptest! {
        #[test]
        fn random_topologies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            fuzz_plan(&data);
        }

        #[test]
        fn mangled_examples_never_panic(cut in 0usize..2000, byte in any::<u8>()) {
            let mut t = EXAMPLE.as_bytes().to_vec();
            let i = cut % t.len();
            t[i] = byte;
            fuzz_plan(&t);
            fuzz_plan(&EXAMPLE.as_bytes()[..i]);
        }
    }
}
