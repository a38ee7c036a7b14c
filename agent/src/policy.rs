//! Credential policy from `[[credential]]` config entries: which credential (by path glob or
//! fingerprint) and when it may be used (`schedule`, weekday/time windows in a timezone).

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use globset::{GlobBuilder, GlobMatcher};

use crate::{config::CredentialPolicy, event::CredentialRef};

/// One weekday/time window, minutes since local midnight. `end <= start` wraps past
/// midnight (`22:00-06:00`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    days: [bool; 7],
    start: u32,
    end: u32,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    tz: Tz,
    windows: Vec<Window>,
    /// As written, for alert summaries.
    pub text: String,
}

const DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// `Mon`…`Sun`, or any longer prefix of the full name.
fn day_index(s: &str) -> Result<usize> {
    let l = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|d| l.len() >= 3 && d.starts_with(&l))
        .ok_or_else(|| anyhow!("unknown weekday {s:?} (use Mon, Tue, … Sun)"))
}

fn minutes(s: &str) -> Result<u32> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("time {s:?} is not HH:MM"))?;
    let (h, m): (u32, u32) = (h.parse().context("hour")?, m.parse().context("minute")?);
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        bail!("time {s:?} is out of range");
    }
    Ok(h * 60 + m)
}

/// `Mon-Fri 09:00-17:00`, `Sat,Sun 10:00-12:00`, `daily 22:00-06:00`.
fn parse_window(s: &str) -> Result<Window> {
    let (days, times) = s
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| anyhow!("window {s:?} is not `DAYS HH:MM-HH:MM`"))?;
    let mut set = [false; 7];
    if days.eq_ignore_ascii_case("daily") {
        set = [true; 7];
    } else {
        for part in days.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day_index(a)?, day_index(b)?);
                    let mut d = a;
                    loop {
                        set[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => set[day_index(part)?] = true,
            }
        }
    }
    let (start, end) = times
        .trim()
        .split_once('-')
        .ok_or_else(|| anyhow!("window {s:?}: times are not HH:MM-HH:MM"))?;
    Ok(Window {
        days: set,
        start: minutes(start)?,
        end: minutes(end)?,
    })
}

impl Schedule {
    pub fn parse(windows: &[String], timezone: Option<&str>) -> Result<Self> {
        let tz: Tz = match timezone {
            Some(t) => t.parse().map_err(|_| {
                anyhow!("unknown timezone {t:?} (use an IANA name like Europe/Berlin)")
            })?,
            None => Tz::UTC,
        };
        let windows = windows
            .iter()
            .map(|w| parse_window(w))
            .collect::<Result<Vec<_>>>()?;
        if windows.is_empty() {
            bail!("schedule is empty");
        }
        let text = format!(
            "{} ({})",
            windows_text(windows.len()),
            timezone.unwrap_or("UTC")
        );
        Ok(Schedule { tz, windows, text })
    }

    /// True when `t` falls inside any window, in the schedule's timezone.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        let local = t.with_timezone(&self.tz);
        let day = local.weekday().num_days_from_monday() as usize;
        let prev = (day + 6) % 7;
        let m = local.hour() * 60 + local.minute();
        self.windows.iter().any(|w| {
            if w.start < w.end {
                w.days[day] && m >= w.start && m < w.end
            } else {
                // Wraps midnight: the evening part today, the morning part from yesterday.
                (w.days[day] && m >= w.start) || (w.days[prev] && m < w.end)
            }
        })
    }
}

fn windows_text(n: usize) -> String {
    if n == 1 {
        "1 window".into()
    } else {
        format!("{n} windows")
    }
}

enum Matcher {
    Path(GlobMatcher),
    Fingerprint(String),
}

pub struct PolicyEntry {
    matcher: Matcher,
    pub purpose: Option<String>,
    pub schedule: Option<Schedule>,
    /// The entry as written (`path` or `fingerprint`), for alert evidence.
    pub name: String,
}

#[derive(Default)]
pub struct Policy {
    entries: Vec<PolicyEntry>,
}

impl Policy {
    /// Errors name the entry; `Config::validate` adds the line.
    pub fn compile(entries: &[CredentialPolicy]) -> Result<Self> {
        let mut out = Vec::new();
        for e in entries {
            let (matcher, name) = match (&e.path, &e.fingerprint) {
                (Some(p), None) => {
                    let g = GlobBuilder::new(p)
                        .literal_separator(true)
                        .build()
                        .with_context(|| format!("bad path glob {p:?}"))?;
                    (Matcher::Path(g.compile_matcher()), p.clone())
                }
                (None, Some(f)) => (Matcher::Fingerprint(f.clone()), f.clone()),
                _ => bail!("a [[credential]] needs exactly one of `path` or `fingerprint`"),
            };
            let schedule = if e.schedule.is_empty() {
                None
            } else {
                Some(Schedule::parse(&e.schedule, e.timezone.as_deref())?)
            };
            out.push(PolicyEntry {
                matcher,
                purpose: e.purpose.clone(),
                schedule,
                name,
            });
        }
        Ok(Policy { entries: out })
    }

    /// The first entry naming this credential.
    pub fn find(&self, cred: &CredentialRef, path: Option<&str>) -> Option<&PolicyEntry> {
        self.entries.iter().find(|e| match &e.matcher {
            Matcher::Fingerprint(f) => *f == cred.fingerprint,
            Matcher::Path(g) => path.is_some_and(|p| g.is_match(p)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weekday_windows_in_a_timezone() {
        let s = Schedule::parse(&["Mon-Fri 09:00-17:00".into()], Some("Europe/Berlin")).unwrap();
        // 2026-11-23 is a Monday; Berlin is UTC+1 in November.
        assert!(s.contains(at("2026-11-23T08:30:00Z")), "09:30 Berlin");
        assert!(!s.contains(at("2026-11-23T07:30:00Z")), "08:30 Berlin");
        assert!(
            !s.contains(at("2026-11-23T16:00:00Z")),
            "17:00 Berlin is the end, exclusive"
        );
        assert!(!s.contains(at("2026-11-22T10:00:00Z")), "Sunday");
    }

    #[test]
    fn windows_wrapping_midnight_and_lists() {
        let s = Schedule::parse(
            &["Sat,Sun 22:00-06:00".into(), "daily 12:00-12:30".into()],
            None,
        )
        .unwrap();
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 21, 23, 0, 0).unwrap()),
            "Sat 23:00"
        );
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 22, 5, 0, 0).unwrap()),
            "Sun 05:00 from Sat night"
        );
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 23, 5, 0, 0).unwrap()),
            "Mon 05:00 from Sun night"
        );
        assert!(
            !s.contains(Utc.with_ymd_and_hms(2026, 11, 24, 5, 0, 0).unwrap()),
            "Tue 05:00"
        );
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 25, 12, 15, 0).unwrap()),
            "daily noon"
        );
    }

    #[test]
    fn bad_schedules_are_errors() {
        for bad in [
            "Mon-Fri",
            "Funday 09:00-10:00",
            "Mon 9-10",
            "Mon 25:00-26:00",
            "Mon 09:00",
        ] {
            assert!(Schedule::parse(&[bad.into()], None).is_err(), "{bad}");
        }
        assert!(Schedule::parse(&["Mon 09:00-10:00".into()], Some("Mars/Olympus")).is_err());
    }
}
