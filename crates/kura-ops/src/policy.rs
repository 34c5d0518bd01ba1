//! Retention policy files (TOML: a zone, a grouping, a default `[keep]` table and `[[group]]`
//! sections), shared by `kura forget --policy` and the server's scheduled retention. The format
//! is documented in docs/RETENTION.md.

use crate::forget::{GroupBy, GroupKey};
use crate::retention::{Count, Period, Policy, parse_span};
use serde::Deserialize;
use std::path::Path;

/// A count in a file: a number or "unlimited".
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum FileCount {
    /// A number.
    N(u64),
    /// `unlimited` (or a number given as text, as flags are).
    Word(String),
}

impl FileCount {
    fn count(&self) -> Result<Count, String> {
        match self {
            FileCount::N(n) => Ok(Count::Max(*n)),
            FileCount::Word(w) => w.parse(),
        }
    }
}

/// A `[keep]` table (or the `--keep-*` flags).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(missing_docs)]
pub struct Keep {
    pub last: Option<FileCount>,
    pub hourly: Option<FileCount>,
    pub daily: Option<FileCount>,
    pub weekly: Option<FileCount>,
    pub biweekly: Option<FileCount>,
    pub monthly: Option<FileCount>,
    pub yearly: Option<FileCount>,
    pub within: Option<String>,
    pub within_hourly: Option<String>,
    pub within_daily: Option<String>,
    pub within_weekly: Option<String>,
    pub within_biweekly: Option<String>,
    pub within_monthly: Option<String>,
    pub within_yearly: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub none: bool,
}

/// A `[[group]]` section: the policy for groups matching every given field.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    host: Option<String>,
    paths: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    keep: Keep,
}

/// A whole policy file (or the policy table of a server repository).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyFile {
    /// Zone of the calendar rules (default: the system's).
    pub timezone: Option<String>,
    /// `host,paths` by default.
    pub group_by: Option<String>,
    /// The default policy.
    pub keep: Option<Keep>,
    /// Per-group policies.
    #[serde(default)]
    pub group: Vec<GroupSection>,
}

impl Keep {
    /// The per-period counts, in [`Period::ALL`] order.
    fn counts(&self) -> [&Option<FileCount>; 6] {
        [&self.hourly, &self.daily, &self.weekly, &self.biweekly, &self.monthly, &self.yearly]
    }

    /// The per-period `within-*` spans, in [`Period::ALL`] order.
    fn withins(&self) -> [&Option<String>; 6] {
        [
            &self.within_hourly,
            &self.within_daily,
            &self.within_weekly,
            &self.within_biweekly,
            &self.within_monthly,
            &self.within_yearly,
        ]
    }

    /// True when any rule is set.
    pub fn has_rules(&self) -> bool {
        self.last.is_some()
            || self.within.is_some()
            || self.counts().iter().any(|x| x.is_some())
            || self.withins().iter().any(|x| x.is_some())
            || !self.tags.is_empty()
            || self.none
    }

    /// The policy of this table; `prefix` names the rules in errors (`--keep-` for flags).
    pub fn policy(&self, prefix: &str) -> Result<Policy, String> {
        let count = |x: &Option<FileCount>, name: &str| -> Result<Count, String> {
            x.as_ref().map(FileCount::count).transpose().map(Option::unwrap_or_default).map_err(|e| format!("{prefix}{name}: {e}"))
        };
        let span = |x: &Option<String>, name: &str| -> Result<Option<jiff::Span>, String> {
            x.as_deref().map(parse_span).transpose().map_err(|e| format!("{prefix}{name}: {e}"))
        };
        let mut p = Policy { last: count(&self.last, "last")?, keep_none: self.none, ..Policy::default() };
        p.within = span(&self.within, "within")?;
        let (counts, withins) = (self.counts(), self.withins());
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

/// Everything `forget` needs to decide: grouping, zone, and the policy of each group.
#[derive(Debug, Clone)]
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

impl PolicyFile {
    /// Reads a policy file.
    pub fn read(path: &Path) -> Result<PolicyFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("policy file {}: {}", path.display(), e.to_string().replace('\n', " ")))
    }

    /// Resolves the file, with a policy from flags (replacing `[keep]`) and a grouping and
    /// zone that override the file's.
    pub fn resolve(&self, flags: Option<Policy>, group_by: Option<String>, timezone: Option<String>) -> Result<Resolved, String> {
        let group_by: GroupBy = match group_by.or(self.group_by.clone()) {
            Some(g) => g.parse()?,
            None => GroupBy::default(),
        };
        for g in &self.group {
            if (g.host.is_some() && !group_by.host) || (g.paths.is_some() && !group_by.paths) || (g.tags.is_some() && !group_by.tags) {
                return Err("a [[group]] section matches on a field that group-by does not include; add it to group-by".into());
            }
        }
        let tz = match timezone.or(self.timezone.clone()) {
            Some(n) => jiff::tz::TimeZone::get(&n).map_err(|_| format!("unknown time zone {n:?}"))?,
            None => jiff::tz::TimeZone::system(),
        };
        let default = match flags {
            Some(p) => Some(p),
            None => self.keep.as_ref().map(|k| k.policy("")).transpose()?,
        };
        if default.is_none() && self.group.is_empty() {
            return Err("no retention policy: give --keep-* flags (e.g. --keep-daily 7 --keep-weekly 4) or --policy FILE".into());
        }
        let groups = self.group.iter().map(|g| Ok((g.clone(), g.keep.policy("")?))).collect::<Result<Vec<_>, String>>()?;
        Ok(Resolved { group_by, tz, default, groups })
    }
}
