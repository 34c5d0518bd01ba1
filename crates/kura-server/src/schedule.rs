//! Calendar schedules of server jobs: `hourly [:MM]`, `daily HH:MM`, `weekly DAY HH:MM`,
//! `every DURATION`, in the zone of the server (or the job's), correct across DST changes.

use jiff::civil::{Time, Weekday};
use jiff::{SignedDuration, ZonedDateTime};
use std::fmt;

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// At minute `m` of every hour.
    Hourly(i8),
    /// Every day at this local time.
    Daily(Time),
    /// Every week on this day at this local time.
    Weekly(Weekday, Time),
    /// At a fixed interval from the previous run.
    Every(SignedDuration),
}

fn time(s: &str) -> Result<Time, String> {
    let (h, m) = s.split_once(':').ok_or_else(|| format!("{s:?} is not a time like 02:00"))?;
    let (h, m): (i8, i8) = (h.parse().map_err(|_| format!("bad hour in {s:?}"))?, m.parse().map_err(|_| format!("bad minute in {s:?}"))?);
    Time::new(h, m, 0, 0).map_err(|_| format!("{s:?} is not a time of day"))
}

fn weekday(s: &str) -> Result<Weekday, String> {
    Ok(match s.to_ascii_lowercase().get(..3).unwrap_or("") {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return Err(format!("{s:?} is not a day of the week")),
    })
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let bad = || format!("schedule {s:?}: use `hourly`, `hourly :30`, `daily 02:00`, `weekly sun 03:00` or `every 6h`");
        match words.as_slice() {
            ["hourly"] => Ok(Schedule::Hourly(0)),
            ["hourly", m] => {
                let m: i8 = m.trim_start_matches(':').parse().map_err(|_| bad())?;
                if (0..60).contains(&m) { Ok(Schedule::Hourly(m)) } else { Err(bad()) }
            }
            ["daily", t] => Ok(Schedule::Daily(time(t)?)),
            ["weekly", d, t] => Ok(Schedule::Weekly(weekday(d)?, time(t)?)),
            ["every", d] => {
                let span: jiff::Span = d.parse().map_err(|e| format!("schedule {s:?}: {e}"))?;
                let d = span
                    .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
                    .map_err(|e| format!("schedule {s:?}: {e}"))?;
                if d < SignedDuration::from_secs(1) {
                    return Err(format!("schedule {s:?}: the interval must be at least a second"));
                }
                Ok(Schedule::Every(d))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Hourly(m) => write!(f, "hourly :{m:02}"),
            Schedule::Daily(t) => write!(f, "daily {:02}:{:02}", t.hour(), t.minute()),
            Schedule::Weekly(d, t) => write!(f, "weekly {d:?} {:02}:{:02}", t.hour(), t.minute()),
            Schedule::Every(d) => write!(f, "every {d:#}"),
        }
    }
}

/// The local time `t` on `date`; a time skipped by a DST change moves past the gap.
fn at(date: jiff::civil::Date, t: Time, tz: &jiff::tz::TimeZone) -> Option<ZonedDateTime> {
    date.to_datetime(t).to_zoned_datetime(tz.clone()).ok()
}

impl Schedule {
    /// The first run strictly after `after`.
    pub fn next_after(&self, after: &ZonedDateTime) -> Option<ZonedDateTime> {
        let tz = after.time_zone();
        match self {
            Schedule::Every(d) => after.checked_add(*d).ok(),
            Schedule::Hourly(m) => {
                let mut z = after.with().minute(*m).second(0).subsec_nanosecond(0).build().ok()?;
                while z <= *after {
                    z = z.checked_add(SignedDuration::from_hours(1)).ok()?;
                }
                Some(z)
            }
            Schedule::Daily(t) => (0..3).filter_map(|i| at(after.date().checked_add(jiff::Span::new().days(i)).ok()?, *t, tz)).find(|z| z > after),
            Schedule::Weekly(d, t) => (0..9)
                .filter_map(|i| {
                    let date = after.date().checked_add(jiff::Span::new().days(i)).ok()?;
                    (date.weekday() == *d).then(|| at(date, *t, tz)).flatten()
                })
                .find(|z| z > after),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn z(s: &str) -> ZonedDateTime {
        s.parse().unwrap()
    }

    #[test]
    fn schedules_parse_and_print() {
        for (s, want) in [
            ("hourly", "hourly :00"),
            ("hourly :30", "hourly :30"),
            ("daily 02:00", "daily 02:00"),
            ("weekly sun 03:15", "weekly Sunday 03:15"),
            ("every 6h", "every 6h"),
        ] {
            assert_eq!(s.parse::<Schedule>().unwrap().to_string(), want);
        }
        for bad in ["", "daily", "daily 25:00", "weekly fun 03:00", "hourly :75", "every 0s", "monthly 1 02:00", "every soon"] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn next_runs_follow_the_calendar() {
        let s: Schedule = "daily 02:00".parse().unwrap();
        assert_eq!(s.next_after(&z("2026-11-28T01:00[Europe/Berlin]")).unwrap(), z("2026-11-28T02:00[Europe/Berlin]"));
        assert_eq!(s.next_after(&z("2026-11-28T02:00[Europe/Berlin]")).unwrap(), z("2026-11-29T02:00[Europe/Berlin]"));
        // 02:30 does not exist on 2026-03-29 in Berlin: the run moves past the gap.
        let s: Schedule = "daily 02:30".parse().unwrap();
        assert_eq!(s.next_after(&z("2026-03-29T00:00[Europe/Berlin]")).unwrap(), z("2026-03-29T03:30[Europe/Berlin]"));
        let s: Schedule = "weekly sun 03:00".parse().unwrap();
        assert_eq!(s.next_after(&z("2026-11-28T12:00[UTC]")).unwrap(), z("2026-11-29T03:00[UTC]"));
        assert_eq!(s.next_after(&z("2026-11-29T03:00[UTC]")).unwrap(), z("2026-12-06T03:00[UTC]"));
        let s: Schedule = "hourly :15".parse().unwrap();
        assert_eq!(s.next_after(&z("2026-11-28T12:15[UTC]")).unwrap(), z("2026-11-28T13:15[UTC]"));
    }

    proptest! {
        #[test]
        fn the_next_run_is_after_and_within_its_period(secs in 0i64..2_000_000_000, h in 0i8..24, m in 0i8..60, d in 0usize..7) {
            let after = jiff::Timestamp::from_second(secs).unwrap().to_zoned_datetime(jiff::tz::TimeZone::get("Europe/Berlin").unwrap());
            let days = [Weekday::Monday, Weekday::Tuesday, Weekday::Wednesday, Weekday::Thursday, Weekday::Friday, Weekday::Saturday, Weekday::Sunday];
            let t = Time::new(h, m, 0, 0).unwrap();
            for (s, max_h) in [(Schedule::Hourly(m), 1), (Schedule::Daily(t), 25), (Schedule::Weekly(days[d], t), 7 * 24 + 1)] {
                let next = s.next_after(&after).unwrap();
                prop_assert!(next > after);
                prop_assert!(next.duration_since(&after) <= SignedDuration::from_hours(max_h), "{s} after {after}: {next}");
            }
        }
    }
}
