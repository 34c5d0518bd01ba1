//! Retention: which snapshots a keep policy keeps, and why. Pure calendar logic over snapshot
//! times (no repository access), so it is exhaustively testable and a keyless server can run it.
//!
//! The exact semantics are written in docs/RETENTION.md; this file implements that text.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ZonedDateTime};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt;

/// How many snapshots a counting rule may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Count {
    /// The rule is off.
    #[default]
    Off,
    /// At most this many (0 is the same as off).
    Max(u64),
    /// No limit.
    Unlimited,
}

impl Count {
    fn budget(self) -> u64 {
        match self {
            Count::Off => 0,
            Count::Max(n) => n,
            Count::Unlimited => u64::MAX,
        }
    }

    fn is_on(self) -> bool {
        self.budget() > 0
    }
}

impl std::str::FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("unlimited") || s == "-1" {
            return Ok(Count::Unlimited);
        }
        s.parse::<u64>().map(Count::Max).map_err(|_| format!("{s:?} is neither a count nor \"unlimited\""))
    }
}

/// The calendar periods of the bucketed rules, shortest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// One real hour (a repeated local hour at a DST change is two buckets).
    Hourly,
    /// One local calendar day.
    Daily,
    /// One ISO 8601 week (Monday to Sunday, numbered within its ISO year).
    Weekly,
    /// Fourteen local days counted from Monday 1969-12-29 (see [`BIWEEKLY_EPOCH`]).
    Biweekly,
    /// One calendar month.
    Monthly,
    /// One calendar year.
    Yearly,
}

impl Period {
    /// Every period, shortest first.
    pub const ALL: [Period; 6] =
        [Period::Hourly, Period::Daily, Period::Weekly, Period::Biweekly, Period::Monthly, Period::Yearly];

    /// The rule's name as used on the command line and in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Biweekly => "biweekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }
}

/// The Monday bi-weekly periods count from: the first day of ISO week 1970-W01. Bucket `n` is
/// local days `[BIWEEKLY_EPOCH + 14n, BIWEEKLY_EPOCH + 14n + 14)`, independent of ISO week
/// numbers, so week 53 and year ends neither merge nor split a bucket.
pub const BIWEEKLY_EPOCH: Date = jiff::civil::date(1969, 12, 29);

/// A keep policy. The default keeps nothing and is refused by [`Policy::check`].
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keep the newest N snapshots.
    pub last: Count,
    /// Keep the newest snapshot of each of the newest N periods, per period (indexed like
    /// [`Period::ALL`]).
    pub counts: [Count; 6],
    /// Keep every snapshot within this span of the newest (non-future) snapshot.
    pub within: Option<Span>,
    /// Keep the newest snapshot of each period within this span of the newest snapshot.
    pub within_periods: [Option<Span>; 6],
    /// Keep snapshots carrying all tags of any of these lists.
    pub tags: Vec<Vec<String>>,
    /// Explicitly allow a policy with no rule (everything unprotected goes).
    pub keep_none: bool,
}

impl Policy {
    /// True when no rule would keep anything.
    pub fn is_empty(&self) -> bool {
        !self.last.is_on()
            && self.counts.iter().all(|c| !c.is_on())
            && self.within.is_none()
            && self.within_periods.iter().all(Option::is_none)
            && self.tags.is_empty()
    }

    /// Refuses an empty policy unless `keep_none` says it is meant.
    pub fn check(&self) -> Result<(), String> {
        if self.is_empty() && !self.keep_none {
            return Err("the retention policy keeps nothing: give at least one --keep-* rule, or \
                        --keep-none to remove every unprotected snapshot"
                .into());
        }
        Ok(())
    }

    /// The count rule of one period.
    pub fn count(&mut self, p: Period) -> &mut Count {
        &mut self.counts[p as usize]
    }

    /// The within-period rule of one period.
    pub fn within_period(&mut self, p: Period) -> &mut Option<Span> {
        &mut self.within_periods[p as usize]
    }

    /// A short human description, e.g. `daily 7, weekly 4, within 2d`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let c = |c: Count| match c {
            Count::Unlimited => "unlimited".to_string(),
            Count::Max(n) => n.to_string(),
            Count::Off => String::new(),
        };
        if self.last.is_on() {
            parts.push(format!("last {}", c(self.last)));
        }
        for p in Period::ALL {
            if self.counts[p as usize].is_on() {
                parts.push(format!("{} {}", p.name(), c(self.counts[p as usize])));
            }
        }
        if let Some(s) = &self.within {
            parts.push(format!("within {s:#}"));
        }
        for p in Period::ALL {
            if let Some(s) = &self.within_periods[p as usize] {
                parts.push(format!("within-{} {s:#}", p.name()));
            }
        }
        for t in &self.tags {
            parts.push(format!("tag {}", t.join(",")));
        }
        if parts.is_empty() {
            parts.push("keep none".into());
        }
        parts.join(", ")
    }
}

/// Parses a duration like restic's `1y5m7d2h` (also `w` for weeks), or jiff's friendly format
/// (`2 days 4h`). Months and years are calendar units, applied in the policy's time zone.
pub fn parse_span(s: &str) -> Result<Span, String> {
    let t = s.trim();
    let compact = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b"ymwdh".contains(&b));
    if compact {
        // Units add up per field (2d3d = 5d); a span with calendar units can only be summed
        // relative to a date, so fields are collected first.
        let mut f = [0i64; 5];
        let mut num = String::new();
        for ch in t.chars() {
            if ch.is_ascii_digit() {
                num.push(ch);
                continue;
            }
            let n: i64 = num.parse().map_err(|_| format!("bad duration {s:?}: a unit without a number"))?;
            num.clear();
            let k = "ymwdh".find(ch).unwrap_or(4);
            f[k] = f[k].checked_add(n).ok_or_else(|| format!("bad duration {s:?}: too large"))?;
        }
        if !num.is_empty() {
            return Err(format!("bad duration {s:?}: {num} has no unit (y, m, w, d or h)"));
        }
        let bad = |e: jiff::Error| format!("bad duration {s:?}: {e}");
        return Span::new()
            .try_years(f[0])
            .and_then(|x| x.try_months(f[1]))
            .and_then(|x| x.try_weeks(f[2]))
            .and_then(|x| x.try_days(f[3]))
            .and_then(|x| x.try_hours(f[4]))
            .map_err(bad);
    }
    t.parse::<Span>().map_err(|e| format!("bad duration {s:?}: {e} (examples: 7d, 1y6m, 36h, \"2 weeks\")"))
}

/// Entry point of the `parse_retention` fuzz target (and its proptest twin): every parser of
/// retention and prune options gets arbitrary text and must return, never panic.
pub fn fuzz_parsers(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let _ = parse_span(&s);
    let _ = s.parse::<Count>();
    let _ = s.parse::<crate::prune::MaxUnused>();
    let _ = crate::prune::parse_size(&s);
    let _ = s.parse::<crate::forget::GroupBy>();
}

/// One snapshot as retention sees it.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its time.
    pub time: Timestamp,
    /// Its tags.
    pub tags: Vec<String>,
    /// Protected snapshots are always kept.
    pub protected: bool,
    /// A tie-breaker for equal times (the snapshot id): larger counts as newer.
    pub order: [u8; 32],
}

/// Why a snapshot is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Reason {
    /// `kura protect`.
    Protected,
    /// Dated after now: kept, and counted by no rule, so it never pushes older ones out.
    Future,
    /// One of the newest N.
    Last {
        /// 1-based position.
        n: u64,
    },
    /// Newest of a period bucket.
    Period {
        /// The period.
        period: Period,
        /// The bucket, e.g. `2026-W48`.
        bucket: String,
        /// 1-based position among this rule's buckets.
        n: u64,
    },
    /// Within the span of the newest snapshot.
    Within,
    /// Newest of a period bucket within the span.
    WithinPeriod {
        /// The period.
        period: Period,
        /// The bucket.
        bucket: String,
    },
    /// Has a kept tag list.
    Tag {
        /// The tag list.
        tags: String,
    },
    /// A damaged original follows its repaired copy (kept while the copy is).
    RepairedAs {
        /// The repaired copy's id.
        id: String,
    },
    /// A PostgreSQL WAL file a kept base backup replays from (or, with no base backup of its
    /// cluster yet, part of an archive still waiting for its first one).
    PgWal {
        /// The oldest kept base backup of its cluster, when there is one.
        #[serde(skip_serializing_if = "Option::is_none")]
        base: Option<String>,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Protected => write!(f, "protected"),
            Reason::Future => write!(f, "future-dated"),
            Reason::Last { n } => write!(f, "last #{n}"),
            Reason::Period { period, bucket, n } => write!(f, "{} {bucket} (#{n})", period.name()),
            Reason::Within => write!(f, "within"),
            Reason::WithinPeriod { period, bucket } => write!(f, "within-{} {bucket}", period.name()),
            Reason::Tag { tags } => write!(f, "tag {tags}"),
            Reason::RepairedAs { id } => write!(f, "original of repaired {}", id.get(..8).unwrap_or(id)),
            Reason::PgWal { base: Some(id) } => write!(f, "WAL of base backup {}", id.get(..8).unwrap_or(id)),
            Reason::PgWal { base: None } => write!(f, "WAL before any base backup"),
        }
    }
}

/// The bucket of a zoned time for a period, as a number (equal numbers = same bucket).
pub fn bucket(p: Period, z: &ZonedDateTime) -> i64 {
    let d = z.date();
    match p {
        // The start of the hour as an instant: the two 01:00 hours of a DST fall-back are
        // different buckets because they are different hours.
        Period::Hourly => {
            let start = z.timestamp().as_second() - i64::from(z.minute()) * 60 - i64::from(z.second());
            start.div_euclid(60)
        }
        Period::Daily => days(d),
        Period::Weekly => {
            let w = d.iso_week_date();
            i64::from(w.year()) * 100 + i64::from(w.week())
        }
        Period::Biweekly => (days(d) - days(BIWEEKLY_EPOCH)).div_euclid(14),
        Period::Monthly => i64::from(d.year()) * 12 + i64::from(d.month()),
        Period::Yearly => i64::from(d.year()),
    }
}

/// A bucket's name for output: `2026-11-24 14h`, `2026-11-24`, `2026-W48`,
/// `2026-11-23/12-06`, `2026-11`, `2026`.
pub fn bucket_label(p: Period, z: &ZonedDateTime) -> String {
    let d = z.date();
    match p {
        Period::Hourly => format!("{} {:02}h{}", d, z.hour(), z.strftime("%:z")),
        Period::Daily => d.to_string(),
        Period::Weekly => {
            let w = d.iso_week_date();
            format!("{}-W{:02}", w.year(), w.week())
        }
        Period::Biweekly => {
            let start = BIWEEKLY_EPOCH
                .checked_add(Span::new().days(bucket(p, z) * 14))
                .unwrap_or(BIWEEKLY_EPOCH);
            let end = start.checked_add(Span::new().days(13)).unwrap_or(start);
            format!("{start}/{}", end.strftime("%m-%d"))
        }
        Period::Monthly => format!("{:04}-{:02}", d.year(), d.month()),
        Period::Yearly => format!("{:04}", d.year()),
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days(d: Date) -> i64 {
    // Howard Hinnant's days_from_civil.
    let (y, m, dd) = (i64::from(d.year()), i64::from(d.month()), i64::from(d.day()));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Applies a policy to one group's snapshots. Returns, for each item in the given order, the
/// reasons it is kept (empty = remove). `now` decides what is future-dated.
pub fn apply(policy: &Policy, items: &[Item], now: Timestamp, tz: &TimeZone) -> Vec<Vec<Reason>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    // Newest first; equal times by the tie-breaker, so the result never depends on input order.
    order.sort_by(|&a, &b| (items[b].time, items[b].order).cmp(&(items[a].time, items[a].order)));
    let newest = order.iter().map(|&i| items[i].time).find(|t| *t <= now);
    let cutoff = |span: &Span| -> Option<Timestamp> {
        let n = newest?.to_zoned_datetime(tz.clone());
        // A span reaching before the calendar's start keeps everything.
        Some(n.checked_sub(*span).map(|z| z.timestamp()).unwrap_or(Timestamp::MIN))
    };
    let within_cut = policy.within.as_ref().and_then(cutoff);
    let period_cut: Vec<Option<Timestamp>> =
        policy.within_periods.iter().map(|s| s.as_ref().and_then(cutoff)).collect();

    let mut last_left = policy.last.budget();
    let mut left: Vec<u64> = policy.counts.iter().map(|c| c.budget()).collect();
    let mut used: Vec<HashSet<i64>> = vec![HashSet::new(); 6];
    let mut used_within: Vec<HashSet<i64>> = vec![HashSet::new(); 6];
    let mut out = vec![Vec::new(); items.len()];
    for &i in &order {
        let it = &items[i];
        let reasons = &mut out[i];
        if it.protected {
            reasons.push(Reason::Protected);
        }
        if it.time > now {
            reasons.push(Reason::Future);
            continue;
        }
        if last_left > 0 {
            last_left -= 1;
            reasons.push(Reason::Last { n: policy.last.budget() - last_left });
        }
        let z = it.time.to_zoned_datetime(tz.clone());
        for p in Period::ALL {
            let k = p as usize;
            if left[k] > 0 {
                let b = bucket(p, &z);
                if used[k].insert(b) {
                    left[k] -= 1;
                    let n = policy.counts[k].budget() - left[k];
                    reasons.push(Reason::Period { period: p, bucket: bucket_label(p, &z), n });
                }
            }
        }
        if within_cut.is_some_and(|c| it.time >= c) {
            reasons.push(Reason::Within);
        }
        for p in Period::ALL {
            let k = p as usize;
            if period_cut[k].is_some_and(|c| it.time >= c) && used_within[k].insert(bucket(p, &z)) {
                reasons.push(Reason::WithinPeriod { period: p, bucket: bucket_label(p, &z) });
            }
        }
        for list in &policy.tags {
            if list.iter().all(|t| it.tags.contains(t)) {
                reasons.push(Reason::Tag { tags: list.join(",") });
            }
        }
    }
    out
}

#[cfg(test)]
#[cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    fn item(t: &str) -> Item {
        Item { time: t.parse().unwrap(), tags: vec![], protected: false, order: [0; 32] }
    }

    /// Items at the given times (all distinct order keys), returning the kept indexes.
    fn kept(policy: &Policy, times: &[&str], now: &str, tz: &TimeZone) -> Vec<usize> {
        let items: Vec<Item> = times
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut it = item(t);
                it.order[0] = i as u8;
                it
            })
            .collect();
        let d = apply(policy, &items, now.parse().unwrap(), tz);
        d.iter().enumerate().filter(|(_, r)| !r.is_empty()).map(|(i, _)| i).collect()
    }

    fn with(p: Period, n: u64) -> Policy {
        let mut pol = Policy::default();
        *pol.count(p) = Count::Max(n);
        pol
    }

    #[test]
    fn days_matches_jiff() {
        for d in ["1970-01-01", "1969-12-29", "2000-02-29", "2026-11-25", "1600-03-01"] {
            let date: Date = d.parse().unwrap();
            let expect = date.since(jiff::civil::date(1970, 1, 1)).unwrap().get_days() as i64;
            assert_eq!(days(date), expect, "{d}");
        }
    }

    #[test]
    fn parse_span_forms() {
        assert_eq!(parse_span("1y5m7d2h").unwrap().fieldwise(), Span::new().years(1).months(5).days(7).hours(2).fieldwise());
        assert_eq!(parse_span("2w").unwrap().fieldwise(), Span::new().weeks(2).fieldwise());
        assert_eq!(parse_span("2 days").unwrap().fieldwise(), Span::new().days(2).fieldwise());
        assert!(parse_span("7").is_err());
        assert!(parse_span("d").is_err());
        assert!(parse_span("soon").is_err());
        assert_eq!("unlimited".parse::<Count>().unwrap(), Count::Unlimited);
        assert!("-3".parse::<Count>().is_err());
    }

    #[test]
    fn empty_policy_is_refused_unless_explicit() {
        let mut p = Policy::default();
        assert!(p.check().is_err());
        p.keep_none = true;
        assert!(p.check().is_ok());
        assert!(with(Period::Daily, 1).check().is_ok());
    }

    // Hand-computed cases, one or more per rule.

    #[test]
    fn last_keeps_the_newest_n() {
        let p = Policy { last: Count::Max(2), ..Policy::default() };
        let t = ["2026-01-01T00:00:00Z", "2026-01-03T00:00:00Z", "2026-01-02T00:00:00Z"];
        assert_eq!(kept(&p, &t, "2026-02-01T00:00:00Z", &utc()), vec![1, 2]);
    }

    #[test]
    fn hourly_keeps_newest_of_each_hour() {
        let t = ["2026-01-01T10:05:00Z", "2026-01-01T10:55:00Z", "2026-01-01T11:10:00Z", "2026-01-01T09:00:00Z"];
        assert_eq!(kept(&with(Period::Hourly, 2), &t, "2026-02-01T00:00:00Z", &utc()), vec![1, 2]);
        assert_eq!(kept(&with(Period::Hourly, 9), &t, "2026-02-01T00:00:00Z", &utc()), vec![1, 2, 3]);
    }

    #[test]
    fn hourly_across_dst_fall_back_keeps_both_one_oclock_hours() {
        // 2026-11-01 in New York: 01:00-01:59 EDT (05:xxZ) then 01:00-01:59 EST (06:xxZ).
        let ny = TimeZone::get("America/New_York").unwrap();
        let t = ["2026-11-01T05:10:00Z", "2026-11-01T05:50:00Z", "2026-11-01T06:10:00Z", "2026-11-01T06:40:00Z"];
        assert_eq!(kept(&with(Period::Hourly, 10), &t, "2026-12-01T00:00:00Z", &ny), vec![1, 3]);
        // Daily: the 25-hour day is one bucket.
        assert_eq!(kept(&with(Period::Daily, 10), &t, "2026-12-01T00:00:00Z", &ny), vec![3]);
    }

    #[test]
    fn daily_uses_the_local_day() {
        // 23:30 UTC on the 1st is 00:30 on the 2nd in Paris (UTC+1 in winter).
        let paris = TimeZone::get("Europe/Paris").unwrap();
        let t = ["2026-01-01T22:30:00Z", "2026-01-01T23:30:00Z", "2026-01-02T12:00:00Z"];
        assert_eq!(kept(&with(Period::Daily, 5), &t, "2026-02-01T00:00:00Z", &utc()), vec![1, 2]);
        assert_eq!(kept(&with(Period::Daily, 5), &t, "2026-02-01T00:00:00Z", &paris), vec![0, 2]);
    }

    #[test]
    fn daily_across_dst_spring_forward() {
        // 2026-03-08 in New York has 23 hours; its last snapshot is kept, the 7th's too.
        let ny = TimeZone::get("America/New_York").unwrap();
        let t = ["2026-03-08T04:30:00Z", "2026-03-08T06:30:00Z", "2026-03-09T03:30:00Z", "2026-03-09T04:30:00Z"];
        // 04:30Z on the 8th = 23:30 EST on the 7th; 03:30Z on the 9th = 23:30 EDT on the 8th;
        // 04:30Z on the 9th = 00:30 EDT on the 9th.
        assert_eq!(kept(&with(Period::Daily, 5), &t, "2026-04-01T00:00:00Z", &ny), vec![0, 2, 3]);
    }

    #[test]
    fn weekly_uses_iso_weeks_across_year_end() {
        // 2026-12-28 (Mon) .. 2027-01-03 (Sun) is ISO week 2026-W53; 2027-01-04 starts 2027-W01.
        let t = ["2026-12-27T12:00:00Z", "2026-12-28T12:00:00Z", "2027-01-03T12:00:00Z", "2027-01-04T12:00:00Z"];
        assert_eq!(kept(&with(Period::Weekly, 5), &t, "2027-02-01T00:00:00Z", &utc()), vec![0, 2, 3]);
        let z = "2027-01-03T12:00:00Z".parse::<Timestamp>().unwrap().to_zoned_datetime(utc());
        assert_eq!(bucket_label(Period::Weekly, &z), "2026-W53");
    }

    #[test]
    fn biweekly_buckets_are_fixed_fourteen_day_periods() {
        let start = |d: &str| {
            let z = format!("{d}T12:00:00Z").parse::<Timestamp>().unwrap().to_zoned_datetime(utc());
            bucket_label(Period::Biweekly, &z)
        };
        // Every bucket starts on a Monday and spans 14 days.
        for d in ["2026-01-01", "2026-12-31", "2027-01-01", "2020-12-31", "2021-01-03", "2015-12-31"] {
            let l = start(d);
            let first: Date = l[..10].parse().unwrap();
            assert_eq!(first.weekday(), jiff::civil::Weekday::Monday, "{l}");
            let day: Date = d.parse().unwrap();
            let off = day.since(first).unwrap().get_days();
            assert!((0..14).contains(&off), "{d} in {l}");
        }
        // ISO week 53 (2026-W53 = Dec 28 .. Jan 3) and the week after never change the rule:
        // consecutive days are in the same bucket unless a bucket boundary (a Monday) separates
        // them, and a boundary comes every 14 days exactly.
        let mut d: Date = "2026-11-30".parse().unwrap();
        let mut changes = Vec::new();
        let mut prev = start(&d.to_string());
        for _ in 0..60 {
            d = d.tomorrow().unwrap();
            let l = start(&d.to_string());
            if l != prev {
                changes.push(d);
            }
            prev = l;
        }
        assert_eq!(changes.len(), 4, "{changes:?}");
        for w in changes.windows(2) {
            assert_eq!(w[1].since(w[0]).unwrap().get_days(), 14);
        }
        // Hand-computed: 1970-01-11 is the last day of bucket 0; 1970-01-12 starts bucket 1.
        assert_eq!(start("1970-01-11"), "1969-12-29/01-11");
        assert_eq!(start("1970-01-12"), "1970-01-12/01-25");
        assert_eq!(start("2026-12-31"), "2026-12-28/01-10");
        assert_eq!(start("2027-01-10"), "2026-12-28/01-10");
        assert_eq!(start("2027-01-11"), "2027-01-11/01-24");
    }

    #[test]
    fn biweekly_keeps_newest_of_each_period() {
        let t = ["2026-12-28T10:00:00Z", "2027-01-05T10:00:00Z", "2027-01-10T10:00:00Z", "2027-01-11T10:00:00Z", "2026-12-27T10:00:00Z"];
        assert_eq!(kept(&with(Period::Biweekly, 2), &t, "2027-02-01T00:00:00Z", &utc()), vec![2, 3]);
        assert_eq!(kept(&with(Period::Biweekly, 3), &t, "2027-02-01T00:00:00Z", &utc()), vec![2, 3, 4]);
    }

    #[test]
    fn monthly_and_yearly() {
        let t = ["2025-12-31T23:00:00Z", "2026-01-01T01:00:00Z", "2026-01-31T01:00:00Z", "2026-02-01T01:00:00Z"];
        assert_eq!(kept(&with(Period::Monthly, 2), &t, "2027-01-01T00:00:00Z", &utc()), vec![2, 3]);
        assert_eq!(kept(&with(Period::Monthly, 9), &t, "2027-01-01T00:00:00Z", &utc()), vec![0, 2, 3]);
        assert_eq!(kept(&with(Period::Yearly, 9), &t, "2027-01-01T00:00:00Z", &utc()), vec![0, 3]);
        assert_eq!(kept(&with(Period::Yearly, 1), &t, "2027-01-01T00:00:00Z", &utc()), vec![3]);
    }

    #[test]
    fn within_counts_from_the_newest_snapshot_not_now() {
        let p = Policy { within: Some(parse_span("2d").unwrap()), ..Policy::default() };
        let t = ["2026-01-01T00:00:00Z", "2026-01-08T00:00:00Z", "2026-01-10T00:00:00Z", "2026-01-07T23:59:59Z"];
        // Newest is the 10th; the cut is the 8th 00:00 inclusive.
        assert_eq!(kept(&p, &t, "2026-06-01T00:00:00Z", &utc()), vec![1, 2]);
    }

    #[test]
    fn within_period_keeps_newest_per_bucket_inside_the_span() {
        let mut p = Policy::default();
        *p.within_period(Period::Daily) = Some(parse_span("2d").unwrap());
        let t = ["2026-01-10T08:00:00Z", "2026-01-10T09:00:00Z", "2026-01-09T09:00:00Z", "2026-01-08T09:00:00Z", "2026-01-08T08:00:00Z", "2026-01-07T09:00:00Z"];
        // Cut = 2026-01-08T09:00: keeps the 10th 09:00, the 9th, the 8th 09:00 (not 08:00).
        assert_eq!(kept(&p, &t, "2026-06-01T00:00:00Z", &utc()), vec![1, 2, 3]);
    }

    #[test]
    fn tags_keep_snapshots_with_all_tags_of_a_list() {
        let p = Policy { tags: vec![vec!["a".into(), "b".into()], vec!["c".into()]], ..Policy::default() };
        let mk = |tags: &[&str], n: u8| {
            let mut i = item("2026-01-01T00:00:00Z");
            i.tags = tags.iter().map(|s| s.to_string()).collect();
            i.order[0] = n;
            i
        };
        let items = vec![mk(&["a"], 0), mk(&["a", "b"], 1), mk(&["c", "x"], 2), mk(&[], 3)];
        let d = apply(&p, &items, "2027-01-01T00:00:00Z".parse().unwrap(), &utc());
        let k: Vec<bool> = d.iter().map(|r| !r.is_empty()).collect();
        assert_eq!(k, vec![false, true, true, false]);
    }

    #[test]
    fn future_snapshots_are_kept_and_push_nothing_out() {
        let t = ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2099-01-01T00:00:00Z", "2098-01-01T00:00:00Z"];
        let mut p = with(Period::Daily, 1);
        p.last = Count::Max(1);
        assert_eq!(kept(&p, &t, "2026-06-01T00:00:00Z", &utc()), vec![1, 2, 3]);
    }

    #[test]
    fn protected_and_duplicates() {
        let mut items = vec![item("2026-01-01T00:00:00Z"), item("2026-01-01T00:00:00Z"), item("2025-01-01T00:00:00Z")];
        items[0].order[0] = 1;
        items[2].protected = true;
        let d = apply(&with(Period::Daily, 5), &items, "2027-01-01T00:00:00Z".parse().unwrap(), &utc());
        // Equal times: the larger tie-breaker is newer and takes the bucket.
        assert!(!d[0].is_empty());
        assert!(d[1].is_empty());
        assert_eq!(d[2][0], Reason::Protected);
    }

    #[test]
    fn a_year_of_dailies_under_a_generations_policy() {
        // The worked example of docs/RETENTION.md: one snapshot at 23:00 UTC every day of 2026,
        // policy daily 7, weekly 4, biweekly 4, monthly 12, yearly 3.
        let mut p = Policy::default();
        *p.count(Period::Daily) = Count::Max(7);
        *p.count(Period::Weekly) = Count::Max(4);
        *p.count(Period::Biweekly) = Count::Max(4);
        *p.count(Period::Monthly) = Count::Max(12);
        *p.count(Period::Yearly) = Count::Max(3);
        let mut d: Date = "2026-01-01".parse().unwrap();
        let mut times = Vec::new();
        while d.year() == 2026 {
            times.push(format!("{d}T23:00:00Z"));
            d = d.tomorrow().unwrap();
        }
        let refs: Vec<&str> = times.iter().map(String::as_str).collect();
        let k = kept(&p, &refs, "2027-01-01T06:00:00Z", &utc());
        let dates: Vec<&str> = k.iter().map(|&i| &times[i][..10]).collect();
        assert_eq!(
            dates,
            vec![
                "2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31", "2026-06-30",
                "2026-07-31", "2026-08-31", "2026-09-30", "2026-10-31", "2026-11-29", "2026-11-30",
                "2026-12-13", "2026-12-20", "2026-12-25", "2026-12-26", "2026-12-27", "2026-12-28",
                "2026-12-29", "2026-12-30", "2026-12-31",
            ]
        );
    }

    fn arb_items() -> impl Strategy<Value = Vec<Item>> {
        // Times over ~3 years around 2026 with a bias to clusters (duplicates, same hour/day).
        let t = prop_oneof![
            (1_735_000_000i64..1_830_000_000i64),
            (1_798_700_000i64..1_798_800_000i64), // around the ISO-53 year end 2026/27
            Just(1_790_000_000i64),
            (1_900_000_000i64..2_000_000_000i64), // future
        ];
        prop::collection::vec((t, any::<bool>(), 0u8..4, any::<u8>()), 0..60).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (s, prot, tag, o))| Item {
                    time: Timestamp::from_second(s).unwrap(),
                    tags: if tag == 0 { vec!["keep".into()] } else { vec![] },
                    protected: prot && o % 5 == 0,
                    order: {
                        let mut a = [0u8; 32];
                        a[0] = o;
                        a[1] = i as u8;
                        a
                    },
                })
                .collect()
        })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        let c = prop_oneof![Just(Count::Off), (1u64..6).prop_map(Count::Max), Just(Count::Unlimited)];
        (c.clone(), prop::array::uniform6(c), any::<bool>(), 0u8..3).prop_map(|(last, counts, tag, within)| Policy {
            last,
            counts,
            within: match within {
                1 => Some(Span::new().days(3)),
                2 => Some(Span::new().months(1)),
                _ => None,
            },
            within_periods: [None, Some(Span::new().days(10)), None, None, None, None],
            tags: if tag { vec![vec!["keep".into()]] } else { vec![] },
            keep_none: false,
        })
    }

    fn zones() -> impl Strategy<Value = TimeZone> {
        prop_oneof![
            Just(TimeZone::UTC),
            Just(TimeZone::get("America/New_York").unwrap()),
            Just(TimeZone::get("Europe/Berlin").unwrap()),
            Just(TimeZone::get("Asia/Kathmandu").unwrap()),
            Just(TimeZone::get("Australia/Lord_Howe").unwrap()),
        ]
    }

    const NOW: i64 = 1_830_000_000;

    fn option_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9ymwdh%kKmMgGtT ,.-]{0,24}",
            "(unlimited|[0-9]{1,25})[ymwdh]?",
            "[0-9]{1,3}(\\.[0-9]{0,3})?%",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn retention_invariants(items in arb_items(), policy in arb_policy(), tz in zones()) {
            let now = Timestamp::from_second(NOW).unwrap();
            let d = apply(&policy, &items, now, &tz);
            // Protected and future snapshots are never removed.
            for (it, r) in items.iter().zip(&d) {
                if it.protected { prop_assert!(r.contains(&Reason::Protected)); }
                if it.time > now { prop_assert!(!r.is_empty()); }
            }
            // Counts are never exceeded, and each period rule keeps one snapshot per bucket,
            // which is the newest (non-future) one of that bucket.
            let key = |i: usize| (items[i].time, items[i].order);
            for p in Period::ALL {
                let hits: Vec<usize> = (0..items.len()).filter(|&i| d[i].iter().any(|r| matches!(r, Reason::Period { period, .. } if *period == p))).collect();
                prop_assert!((hits.len() as u64) <= policy.counts[p as usize].budget());
                let mut buckets = HashSet::new();
                for &i in &hits {
                    let b = bucket(p, &items[i].time.to_zoned_datetime(tz.clone()));
                    prop_assert!(buckets.insert(b), "two kept in one {:?} bucket", p);
                    for (j, other) in items.iter().enumerate() {
                        if other.time <= now && bucket(p, &other.time.to_zoned_datetime(tz.clone())) == b {
                            prop_assert!(key(j) <= key(i), "a newer snapshot exists in the bucket");
                        }
                    }
                }
            }
            let lasts = d.iter().filter(|r| r.iter().any(|x| matches!(x, Reason::Last { .. }))).count();
            prop_assert!((lasts as u64) <= policy.last.budget());
        }

        #[test]
        fn adding_an_older_snapshot_never_removes_a_newer_kept_one(
            items in arb_items(), policy in arb_policy(), tz in zones(), back in 1i64..100_000_000
        ) {
            let now = Timestamp::from_second(NOW).unwrap();
            let before = apply(&policy, &items, now, &tz);
            let oldest = items.iter().map(|i| i.time).min().unwrap_or(now);
            let mut more = items.clone();
            more.push(Item { time: oldest.checked_sub(jiff::SignedDuration::from_secs(back)).unwrap(), tags: vec!["keep".into()], protected: false, order: [255; 32] });
            let after = apply(&policy, &more, now, &tz);
            for i in 0..items.len() {
                prop_assert_eq!(&before[i], &after[i]);
            }
        }

        #[test]
        fn option_parsers_never_panic(text in option_text()) {
            fuzz_parsers(text.as_bytes());
        }

        #[test]
        fn input_order_does_not_matter(items in arb_items(), policy in arb_policy(), tz in zones()) {
            let now = Timestamp::from_second(NOW).unwrap();
            let a = apply(&policy, &items, now, &tz);
            let mut rev = items.clone();
            rev.reverse();
            let mut b = apply(&policy, &rev, now, &tz);
            b.reverse();
            prop_assert_eq!(a, b);
        }
    }
}
