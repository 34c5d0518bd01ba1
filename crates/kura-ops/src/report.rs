//! `kura report`: a document of facts for customers and auditors (what is protected, how many
//! copies on how many machines, the newest copy of each generation, when each was last
//! verified and last restored, measured RPO and RTO), as Markdown or a self-contained HTML page.

use crate::status::{Level, RepoStatus};
use crate::topology::Plan;

/// What a report is made of.
pub struct ReportInput<'a> {
    /// The site's name (the title).
    pub title: &'a str,
    /// When the facts were read.
    pub generated: jiff::Timestamp,
    /// The topology, when the report covers one.
    pub plan: Option<&'a Plan>,
    /// The status of every repository looked at, labelled `DATASET: COPY on HOST` for a
    /// topology (as `kura status` gathers them).
    pub statuses: &'a [RepoStatus],
    /// kura's version.
    pub version: &'a str,
}

/// One row of a dataset's table.
struct Row {
    copy: String,
    machine: String,
    taken: String,
    kept: String,
    newest: String,
    level: Option<Level>,
    verified: String,
    drill: String,
    reasons: Vec<String>,
}

/// One dataset's section.
struct Section {
    name: String,
    host: String,
    paths: Vec<String>,
    machines: usize,
    rows: Vec<Row>,
    rpo: String,
    rto: String,
}

fn age(h: f64) -> String {
    if h < 1.0 {
        format!("{:.0} minutes", (h * 60.0).max(0.0))
    } else if h < 48.0 {
        format!("{h:.1} hours")
    } else {
        format!("{:.1} days", h / 24.0)
    }
}

fn day(t: &str) -> String {
    t.parse::<jiff::Timestamp>().map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_else(|_| t.to_string())
}

fn newest_hours(s: &RepoStatus) -> Option<f64> {
    s.groups.iter().map(|g| g.age_hours).reduce(f64::min)
}

fn verified(s: &RepoStatus) -> String {
    match s.jobs.iter().find(|j| j.name == "verify") {
        Some(j) => match (&j.last_success, j.last_ok) {
            (_, Some(false)) => "FAILED at its last run".into(),
            (Some(t), _) => day(t),
            (None, _) => "not yet".into(),
        },
        None => "not scheduled".into(),
    }
}

fn drill(s: &RepoStatus) -> String {
    match &s.last_drill {
        Some(d) if d.ok => format!("{}: {} {} file(s) restored and matched in {:.2} s", day(&d.time), if d.mode == "full" { "all" } else { "a sample of" }, d.files, d.seconds),
        Some(d) => format!("{}: FAILED ({} of {} files)", day(&d.time), d.failed, d.files),
        None => "never".into(),
    }
}

fn row(copy: &str, machine: &str, taken: &str, kept: &str, s: Option<&RepoStatus>) -> Row {
    if let Some(f) = s.and_then(|s| s.shadow.as_ref()) {
        return Row {
            copy: copy.into(),
            machine: machine.into(),
            taken: taken.into(),
            kept: kept.into(),
            newest: format!("live, {:.1} s behind", f.lag_seconds),
            level: s.map(|s| s.level),
            verified: format!("contact {:.0} s ago", f.contact_seconds),
            drill: "-".into(),
            reasons: s.map(|s| s.reasons.clone()).unwrap_or_default(),
        };
    }
    Row {
        copy: copy.into(),
        machine: machine.into(),
        taken: taken.into(),
        kept: kept.into(),
        newest: s.and_then(newest_hours).map(|h| format!("{} ago", age(h))).unwrap_or_else(|| if s.is_some() { "none".into() } else { "-".into() }),
        level: s.map(|s| s.level),
        verified: s.map(verified).unwrap_or_else(|| "-".into()),
        drill: s.map(drill).unwrap_or_else(|| "-".into()),
        reasons: s.map(|s| s.reasons.clone()).unwrap_or_default(),
    }
}

/// RPO and RTO of a dataset from its copies' statuses (all measured, none estimated).
fn objectives(statuses: &[&RepoStatus], shadow: Option<Option<&crate::status::ShadowFacts>>) -> (String, String) {
    let fresh = statuses.iter().filter_map(|s| newest_hours(s)).reduce(f64::min);
    let mut rpo = match fresh {
        Some(h) => format!("the newest state on another machine is {} old", age(h)),
        None => "no copy on another machine could be read".into(),
    };
    match shadow {
        Some(Some(f)) => rpo.push_str(&format!("; the live shadow is {:.1} s behind (last contact {:.0} s ago)", f.lag_seconds, f.contact_seconds)),
        Some(None) => rpo.push_str("; the live shadow's lag could not be read"),
        None => {}
    }
    // The newest whole-snapshot drill of any copy, however many sample drills ran since.
    let full = statuses.iter().filter_map(|s| s.last_full_drill.as_ref()).max_by(|a, b| a.time.cmp(&b.time));
    let sample = statuses.iter().filter_map(|s| s.last_drill.as_ref()).filter(|d| d.ok).max_by(|a, b| a.time.cmp(&b.time));
    let rto = match (full, sample) {
        (Some(d), _) => format!("a whole snapshot ({} files, {:.1} MB) restored and verified in {:.2} s on {}", d.files, d.bytes as f64 / 1e6, d.seconds, day(&d.time)),
        (None, Some(d)) => format!("no whole-snapshot drill yet; {} sampled file(s) ({:.1} MB) restored and verified in {:.2} s on {}", d.files, d.bytes as f64 / 1e6, d.seconds, day(&d.time)),
        (None, None) => "not measured: no restore drill has run".into(),
    };
    (rpo, rto)
}

fn sections(input: &ReportInput<'_>) -> Vec<Section> {
    let find = |label: &str| input.statuses.iter().find(|s| s.label == label);
    let Some(plan) = input.plan else {
        return input
            .statuses
            .iter()
            .map(|s| {
                let (rpo, rto) = objectives(&[s], None);
                Section {
                    name: s.label.clone(),
                    host: s.groups.iter().map(|g| g.host.clone()).collect::<Vec<_>>().join(", "),
                    paths: s.groups.iter().flat_map(|g| g.paths.clone()).collect(),
                    machines: 1,
                    rows: vec![row("backup", &s.location, "-", &format!("{} snapshot(s)", s.snapshots), Some(s))],
                    rpo,
                    rto,
                }
            })
            .collect();
    };
    plan.datasets
        .iter()
        .map(|d| {
            let mut rows = Vec::new();
            let backup = find(&format!("{}: backup on {}", d.name, d.host));
            rows.push(row("backup repository", &d.host, "each backup", "its own retention", backup));
            let mut copies = Vec::new();
            let mut shadow = None;
            for c in &d.copies {
                if c.kind == "shadow" {
                    let s = find(&format!("{}: shadow on {}", d.name, c.host));
                    shadow = Some(s.and_then(|s| s.shadow.as_ref()));
                    rows.push(row("live shadow", &c.host, "every change", &c.covers, s));
                    continue;
                }
                let s = find(&format!("{}: {} on {}", d.name, c.name, c.host));
                if let Some(s) = s {
                    copies.push(s);
                }
                let taken = c.every.map(|p| p.name()).unwrap_or("-");
                rows.push(row(&format!("{} generation", c.name), &c.host, taken, &format!("{} ({})", c.keep, c.covers), s));
            }
            let (rpo, rto) = objectives(&copies, shadow);
            Section { name: d.name.clone(), host: d.host.clone(), paths: d.paths.clone(), machines: d.machines, rows, rpo, rto }
        })
        .collect()
}

fn overall(input: &ReportInput<'_>) -> Level {
    input.statuses.iter().map(|s| s.level).max().unwrap_or(Level::Crit)
}

fn word(l: Option<Level>) -> &'static str {
    match l {
        Some(Level::Ok) => "ok",
        Some(Level::Warn) => "warning",
        Some(Level::Crit) => "critical",
        None => "-",
    }
}

/// Text as Markdown shows it literally: a `|` in a host or a path must not split a table cell,
/// nor a `<` in a reason open an HTML tag in a renderer that passes HTML through.
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' | '!' | '&' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The report as Markdown.
pub fn markdown(input: &ReportInput<'_>) -> String {
    let secs = sections(input);
    let mut m = format!("# {}\n\nFacts read from the repositories at {} by kura {}. Overall: **{}**.\n\n", md(input.title), day(&input.generated.to_string()), md(input.version), word(Some(overall(input))));
    let copies: usize = secs.iter().map(|s| s.rows.len()).sum();
    let machines = input.plan.map(|p| p.machines.len()).unwrap_or(secs.len());
    m.push_str(&format!("{} dataset(s) protected by {} copies on {} machine(s) besides the protected hosts.\n\n", secs.len(), copies, machines));
    for s in &secs {
        let paths = if s.paths.is_empty() { "-".into() } else { s.paths.iter().map(|p| md(p)).collect::<Vec<_>>().join(", ") };
        m.push_str(&format!("## {}\n\nOn **{}**: {}. Copies on {} other machine(s).\n\n", md(&s.name), md(&s.host), paths, s.machines));
        m.push_str("| copy | machine | taken | kept | newest copy | status | last verified | last restore drill |\n|---|---|---|---|---|---|---|---|\n");
        for r in &s.rows {
            m.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                md(&r.copy), md(&r.machine), md(&r.taken), md(&r.kept), md(&r.newest), word(r.level), md(&r.verified), md(&r.drill)
            ));
        }
        m.push_str(&format!("\n- **RPO (measured):** {}.\n- **RTO (measured):** {}.\n", md(&s.rpo), md(&s.rto)));
        for r in &s.rows {
            for why in &r.reasons {
                m.push_str(&format!("- {} on {}: {}\n", md(&r.copy), md(&r.machine), md(why)));
            }
        }
        m.push('\n');
    }
    m
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

const CSS: &str = "
:root{--ok:#1a7f37;--warn:#b35900;--crit:#c62828;--ink:#1f2328;--muted:#59636e;--line:#d8dee4;--bg:#f6f8fa}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif}
main{max-width:1080px;margin:0 auto;padding:32px 24px 48px}
header{display:flex;justify-content:space-between;align-items:flex-end;gap:16px;border-bottom:2px solid var(--line);padding-bottom:16px;margin-bottom:24px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:20px;margin:0 0 4px}.muted{color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:12px;margin-bottom:28px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:14px 16px}.card b{display:block;font-size:26px}
section{background:#fff;border:1px solid var(--line);border-radius:12px;padding:20px 22px;margin-bottom:22px}
table{width:100%;border-collapse:collapse;margin:14px 0;font-size:14px}th,td{text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);background:var(--bg)}tr:last-child td{border-bottom:none}
.badge{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:600;color:#fff;background:var(--muted)}
.ok{background:var(--ok)}.warn{background:var(--warn)}.crit{background:var(--crit)}
.big{font-size:14px;padding:6px 14px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:6px 16px;margin:8px 0 0}dt{font-weight:600}dd{margin:0}
ul.reasons{margin:10px 0 0;padding-left:20px;color:var(--crit)}footer{color:var(--muted);font-size:13px;margin-top:28px}
";

fn badge(l: Option<Level>, big: bool) -> String {
    let class = match l {
        Some(l) => l.name(),
        None => "",
    };
    format!("<span class=\"badge {class}{}\">{}</span>", if big { " big" } else { "" }, word(l))
}

/// The report as one self-contained HTML page (no script, no external resource).
pub fn html(input: &ReportInput<'_>) -> String {
    let secs = sections(input);
    let copies: usize = secs.iter().map(|s| s.rows.len()).sum();
    let machines = input.plan.map(|p| p.machines.len()).unwrap_or(secs.len());
    let drilled = input.statuses.iter().filter_map(|s| s.last_drill.as_ref()).filter(|d| d.ok).map(|d| d.time.clone()).max();
    let mut h = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{t}</title><style>{CSS}</style></head><body><main>\
<header><div><h1>{t}</h1><div class=\"muted\">Data protection report &middot; facts read from the repositories at {g}</div></div><div>{b}</div></header>\
<div class=\"cards\"><div class=\"card\"><b>{n}</b>dataset(s) protected</div><div class=\"card\"><b>{copies}</b>copies</div><div class=\"card\"><b>{machines}</b>machine(s) holding copies</div><div class=\"card\"><b>{d}</b>{dt}last successful restore drill</div></div>",
        t = esc(input.title),
        g = esc(&day(&input.generated.to_string())),
        b = badge(Some(overall(input)), true),
        n = secs.len(),
        d = esc(&drilled.as_deref().map(|t| day(t).chars().take(10).collect::<String>()).unwrap_or_else(|| "never".to_string())),
        dt = esc(&drilled.as_deref().map(|t| format!("{} · ", day(t).get(11..).unwrap_or(""))).unwrap_or_default()),
    );
    for s in &secs {
        h.push_str(&format!(
            "<section><h2>{}</h2><div class=\"muted\">on <b>{}</b>: {} &middot; copies on {} other machine(s)</div>\
<table><thead><tr><th>Copy</th><th>Machine</th><th>Taken</th><th>Kept</th><th>Newest copy</th><th>Status</th><th>Last verified</th><th>Last restore drill</th></tr></thead><tbody>",
            esc(&s.name),
            esc(&s.host),
            esc(&if s.paths.is_empty() { "-".into() } else { s.paths.join(", ") }),
            s.machines
        ));
        for r in &s.rows {
            h.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&r.copy),
                esc(&r.machine),
                esc(&r.taken),
                esc(&r.kept),
                esc(&r.newest),
                badge(r.level, false),
                esc(&r.verified),
                esc(&r.drill)
            ));
        }
        h.push_str(&format!("</tbody></table><dl><dt>RPO (measured)</dt><dd>{}</dd><dt>RTO (measured)</dt><dd>{}</dd></dl>", esc(&s.rpo), esc(&s.rto)));
        let reasons: Vec<String> = s.rows.iter().flat_map(|r| r.reasons.iter().map(move |w| format!("<li>{} on {}: {}</li>", esc(&r.copy), esc(&r.machine), esc(w)))).collect();
        if !reasons.is_empty() {
            h.push_str(&format!("<ul class=\"reasons\">{}</ul>", reasons.join("")));
        }
        h.push_str("</section>");
    }
    h.push_str(&format!(
        "<footer>Every figure above was read from the repositories themselves by kura {} (snapshot times, server verification jobs, restore drill records); none is an estimate.</footer></main></body></html>\n",
        esc(input.version)
    ));
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{GroupStatus, Limits};

    fn status(label: &str, level: Level, age: f64) -> RepoStatus {
        RepoStatus {
            label: label.into(),
            location: "kura://c:8443/www".into(),
            level,
            reasons: if level == Level::Ok { vec![] } else { vec!["newest snapshot <late>".into()] },
            limits: Limits { warn_hours: 26.0, crit_hours: 50.0, drill_warn_hours: None },
            groups: vec![GroupStatus { host: "a".into(), paths: vec!["/srv/www".into()], snapshots: 3, newest: "2026-12-05T23:00:00Z".into(), age_hours: age, level }],
            snapshots: 3,
            future_dated: 0,
            jobs: vec![],
            last_drill: None,
            last_good_drill: None,
            last_full_drill: None,
            drills: 0,
            shadow: None,
        }
    }

    fn drill(mode: &str, time: &str, seconds: f64) -> kura_repo::drill::DrillRecord {
        kura_repo::drill::DrillRecord {
            version: 1,
            time: time.into(),
            by_host: "d".into(),
            snapshot: "ab".repeat(32),
            snapshot_time: time.into(),
            host: "a".into(),
            paths: vec!["/srv/www".into()],
            mode: mode.into(),
            files: 10,
            failed: 0,
            bytes: 1_000_000,
            seconds,
            ok: true,
            error: None,
        }
    }

    #[test]
    fn the_rto_is_the_newest_whole_snapshot_drill_even_after_sample_drills() {
        let mut s = status("www: daily on c", Level::Ok, 5.0);
        s.last_drill = Some(drill("sample", "2026-12-06T04:00:00Z", 0.2));
        assert!(objectives(&[&s], None).1.starts_with("no whole-snapshot drill yet"));
        s.last_full_drill = Some(drill("full", "2026-12-05T04:00:00Z", 7.5));
        let rto = objectives(&[&s], None).1;
        assert!(rto.starts_with("a whole snapshot") && rto.contains("7.50 s"), "{rto}");
    }

    #[test]
    fn markdown_text_is_shown_literally() {
        assert_eq!(md("a|b <i>x</i> *y* _z_ [l](u) `c` #h\\ & !\nnext"), "a\\|b \\<i\\>x\\</i\\> \\*y\\* \\_z\\_ \\[l\\](u) \\`c\\` \\#h\\\\ \\& \\! next");
        // A cell with a pipe stays one cell: a two-cell row has three unescaped pipes.
        let row = format!("| {} | {} |", md("srv|a"), md("b"));
        let unescaped = row.char_indices().filter(|(i, c)| *c == '|' && !row[..*i].ends_with('\\')).count();
        assert_eq!(unescaped, 3, "{row}");
    }

    #[test]
    fn a_topology_report_names_every_copy_and_escapes_what_it_prints() {
        let plan = crate::topology::plan(include_str!("../../../examples/first-server.toml")).unwrap();
        let st = vec![status("www: backup on a", Level::Ok, 5.0), status("www: daily on c", Level::Warn, 30.0)];
        let input = ReportInput { title: "Shop <GmbH>", generated: "2026-12-06T06:00:00Z".parse().unwrap(), plan: Some(&plan), statuses: &st, version: "0.1.0" };
        let h = html(&input);
        assert!(h.contains("Shop &lt;GmbH&gt;") && !h.contains("<GmbH>"));
        assert!(h.contains("newest snapshot &lt;late&gt;"));
        for copy in ["live shadow", "daily generation", "weekly generation", "yearly generation"] {
            assert!(h.contains(copy), "{copy}");
        }
        assert!(h.contains("5.0 hours"), "the freshest copy gives the RPO");
        let m = markdown(&input);
        assert!(m.contains("| daily generation | c | daily | 14 (14 days) | 30.0 hours ago | warning |"), "{m}");
        assert!(m.contains("# Shop \\<GmbH\\>") && m.contains("newest snapshot \\<late\\>") && !m.contains("<late>"), "{m}");
        assert!(m.contains("not measured: no restore drill has run"));
    }
}
