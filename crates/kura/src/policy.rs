//! Retention policies from `forget` flags or a TOML policy file; the file format and its
//! resolution live in `kura_ops::policy` (shared with the server's scheduled retention).

use crate::args::ForgetArgs;
use anyhow::{Result, bail};
use kura_ops::policy::{FileCount, Keep, PolicyFile};
use kura_ops::retention::Policy;

pub use kura_ops::policy::Resolved;

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
    let any = keep.has_rules();
    (keep, any)
}

/// The policy given by flags, if any rule flag is set.
fn from_flags(a: &ForgetArgs) -> Result<Option<Policy>> {
    match flag_table(a) {
        (keep, true) => keep.policy("--keep-").map(Some).map_err(anyhow::Error::msg),
        _ => Ok(None),
    }
}

/// Resolves the policy from flags or the policy file; refuses both at once (which one would
/// win is a question a deletion should never leave open).
pub fn resolve(a: &ForgetArgs) -> Result<Resolved> {
    let flags = from_flags(a)?;
    let file = match &a.policy {
        Some(path) => Some(PolicyFile::read(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    if flags.is_some() && file.is_some() {
        bail!("give the retention policy either as --keep-* flags or in --policy, not both");
    }
    file.unwrap_or_default().resolve(flags, a.group_by.clone(), a.timezone.clone()).map_err(anyhow::Error::msg)
}
