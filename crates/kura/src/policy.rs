//! Retention policies from `forget` flags or a TOML policy file (one per repository, with
//! sections per group). The file's format is documented in docs/RETENTION.md.

use crate::args::ForgetArgs;
use anyhow::{Context, Result, bail};
use kura_ops::forget::{GroupBy, GroupKey};
use kura_ops::retention::{Count, Period, Policy, parse_span};
use serde::Deserialize;
use std::path::Path;

/// A count in a file: a number or "unlimited".
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum FileCount {
    N(u64),
    Word(String),
}

impl FileCount {
    fn count(&self) -> Result<Count> {
        match self {
            FileCount::N(n) => Ok(Count::Max(*n)),
            FileCount::Word(w) => w.parse().map_err(anyhow::Error::msg),
        }
    }
}

/// The `[keep]` table.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Keep {
    last: Option<FileCount>,
    hourly: Option<FileCount>,
    daily: Option<FileCount>,
    weekly: Option<FileCount>,
    biweekly: Option<FileCount>,
    monthly: Option<FileCount>,
    yearly: Option<FileCount>,
    within: Option<String>,
    within_hourly: Option<String>,
    within_daily: Option<String>,
    within_weekly: Option<String>,
    within_biweekly: Option<String>,
    within_monthly: Option<String>,
    within_yearly: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    none: bool,
}

/// A `[[group]]` section: the policy for groups matching every given field.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct GroupSection {
    host: Option<String>,
    paths: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    keep: Keep,
}

/// The whole file.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyFile {
    timezone: Option<String>,
    group_by: Option<String>,
    keep: Option<Keep>,
    #[serde(default)]
    group: Vec<GroupSection>,
}

impl Keep {
    /// The policy of this table; `prefix` names the rules in errors (`--keep-` for flags).
    fn policy(&self, prefix: &str) -> Result<Policy> {
        let count = |x: &Option<FileCount>, name: &str| -> Result<Count> {
            x.as_ref().map(FileCount::count).transpose().map(Option::unwrap_or_default).with_context(|| format!("{prefix}{name}"))
        };
        let span = |x: &Option<String>, name: &str| -> Result<Option<jiff::Span>> {
            x.as_deref().map(parse_span).transpose().map_err(anyhow::Error::msg).with_context(|| format!("{prefix}{name}"))
        };
        let mut p = Policy { last: count(&self.last, "last")?, keep_none: self.none, ..Policy::default() };
        p.within = span(&self.within, "within")?;
        let counts = [&self.hourly, &self.daily, &self.weekly, &self.biweekly, &self.monthly, &self.yearly];
        let withins = [
            &self.within_hourly,
            &self.within_daily,
            &self.within_weekly,
            &self.within_biweekly,
            &self.within_monthly,
            &self.within_yearly,
        ];
        for (i, period) in Period::ALL.into_iter().enumerate() {
            p.counts[i] = count(counts[i], period.name())?;
            p.within_periods[i] = span(withins[i], &format!("within-{}", period.name()))?;
        }
        p.tags = self
            .tags
            .iter()
            .map(|t| t.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>())
            .filter(|l| !l.is_empty())
            .collect();
        Ok(p)
    }
}

/// True when any --keep-* flag is given.
pub fn has_rules(a: &ForgetArgs) -> bool {
    flag_table(a).1
}

/// The `[keep]` table the flags describe, and whether any flag was given.
fn flag_table(a: &ForgetArgs) -> (Keep, bool) {
    let c = |x: &Option<String>| x.clone().map(FileCount::Word);
    let keep = Keep {
        last: c(&a.keep_last),
        hourly: c(&a.keep_hourly),
        daily: c(&a.keep_daily),
        weekly: c(&a.keep_weekly),
        biweekly: c(&a.keep_biweekly),
        monthly: c(&a.keep_monthly),
        yearly: c(&a.keep_yearly),
        within: a.keep_within.clone(),
        within_hourly: a.keep_within_hourly.clone(),
        within_daily: a.keep_within_daily.clone(),
        within_weekly: a.keep_within_weekly.clone(),
        within_biweekly: a.keep_within_biweekly.clone(),
        within_monthly: a.keep_within_monthly.clone(),
        within_yearly: a.keep_within_yearly.clone(),
        tags: a.keep_tag.clone(),
        none: a.keep_none,
    };
    let any = [&keep.last, &keep.hourly, &keep.daily, &keep.weekly, &keep.biweekly, &keep.monthly, &keep.yearly]
        .iter()
        .any(|x| x.is_some())
        || [&keep.within, &keep.within_hourly, &keep.within_daily, &keep.within_weekly, &keep.within_biweekly,
            &keep.within_monthly, &keep.within_yearly]
            .iter()
            .any(|x| x.is_some())
        || !keep.tags.is_empty()
        || keep.none;
    (keep, any)
}

/// The policy given by flags, if any rule flag is set.
fn from_flags(a: &ForgetArgs) -> Result<Option<Policy>> {
    match flag_table(a) {
        (keep, true) => keep.policy("--keep-").map(Some),
        _ => Ok(None),
    }
}

/// Everything `forget` needs to decide: grouping, zone, and the policy of each group.
pub struct Resolved {
    /// Grouping.
    pub group_by: GroupBy,
    /// Zone of calendar rules.
    pub tz: jiff::tz::TimeZone,
    default: Option<Policy>,
    groups: Vec<(GroupSection, Policy)>,
}

impl Resolved {
    /// The policy of a group: the first `[[group]]` section matching it, else the default.
    pub fn policy_for(&self, key: &GroupKey) -> Result<Policy, String> {
        for (g, p) in &self.groups {
            let host_ok = g.host.as_ref().is_none_or(|h| key.host.as_ref() == Some(h));
            let paths_ok = g.paths.as_ref().is_none_or(|want| {
                let mut w = want.clone();
                w.sort();
                w.dedup();
                key.paths.as_ref() == Some(&w)
            });
            let tags_ok = g.tags.as_ref().is_none_or(|want| key.tags.as_ref().is_some_and(|t| want.iter().all(|x| t.contains(x))));
            if host_ok && paths_ok && tags_ok {
                return Ok(p.clone());
            }
        }
        self.default.clone().ok_or_else(|| format!("{key}: no policy section matches this group and the file has no [keep] table"))
    }
}

/// Resolves the policy from flags or the policy file; refuses both at once (which one would
/// win is a question a deletion should never leave open).
pub fn resolve(a: &ForgetArgs) -> Result<Resolved> {
    let flags = from_flags(a)?;
    let file = match &a.policy {
        Some(path) => Some(read(path)?),
        None => None,
    };
    if flags.is_some() && file.is_some() {
        bail!("give the retention policy either as --keep-* flags or in --policy, not both");
    }
    let file = file.unwrap_or_default();
    let group_by_s = a.group_by.clone().or(file.group_by.clone());
    let group_by: GroupBy = match group_by_s {
        Some(g) => g.parse().map_err(anyhow::Error::msg)?,
        None => GroupBy::default(),
    };
    for g in &file.group {
        if (g.host.is_some() && !group_by.host) || (g.paths.is_some() && !group_by.paths) || (g.tags.is_some() && !group_by.tags) {
            bail!("a [[group]] section matches on a field that group-by does not include; add it to group-by");
        }
    }
    let tz_name = a.timezone.clone().or(file.timezone.clone());
    let tz = match tz_name {
        Some(n) => jiff::tz::TimeZone::get(&n).with_context(|| format!("unknown time zone {n:?}"))?,
        None => jiff::tz::TimeZone::system(),
    };
    let default = match flags {
        Some(p) => Some(p),
        None => file.keep.as_ref().map(|k| k.policy("")).transpose()?,
    };
    if default.is_none() && file.group.is_empty() {
        bail!("no retention policy: give --keep-* flags (e.g. --keep-daily 7 --keep-weekly 4) or --policy FILE");
    }
    let groups = file.group.iter().map(|g| Ok((g.clone(), g.keep.policy("")?))).collect::<Result<Vec<_>>>()?;
    Ok(Resolved { group_by, tz, default, groups })
}

fn read(path: &Path) -> Result<PolicyFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read policy file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("policy file {}: {}", path.display(), e.to_string().replace('\n', " ")))
}
