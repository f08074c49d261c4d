//! Schedules (weekly time windows in the site's local time, holidays) and the door entries of a
//! credential (`front`, `@group`, `*`, each optionally `=schedule`).
//!
//! Pure: no database, no clock. A schedule is kept as eight day programs (Monday to Sunday,
//! and the holiday one), each a sorted list of minute ranges of the local day; an overnight
//! window (until ≤ from) is split at midnight into its two days. Whether a schedule is open is
//! decided on the local wall clock of the site's time zone, and every instant has exactly one
//! local time, so the DST days need no special case: on the spring-forward day the skipped
//! hour never happens (a window inside it does not open that day), on the fall-back day the
//! repeated hour happens twice (a window covering it is open both times).

use super::record::{is_door_byte, MAX_DOOR_ID_BYTES};
use jiff::tz::TimeZone;

/// Most schedules in one ACL.
pub const MAX_SCHEDULES: usize = 1_000;
/// Most windows in one schedule (weekly plus holiday).
pub const MAX_WINDOWS: usize = 64;
/// Most holiday dates in one ACL.
pub const MAX_HOLIDAYS: usize = 1_000;
/// Most door groups in one ACL.
pub const MAX_DOOR_GROUPS: usize = 10_000;
/// Most doors in one group.
pub const MAX_DOORS_PER_GROUP: usize = 1_000;
/// Most group memberships in one ACL (bounds the memory of a file's definitions).
pub const MAX_GROUP_MEMBERS: usize = 100_000;

/// Minutes in a day; `24:00` is the end of a day.
const DAY: u16 = 24 * 60;

/// Day names, Monday first (ISO order).
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One weekly window: the days it starts on, and its start and end as minutes of the day.
/// `until <= from` is an overnight window, ending on the next day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Monday first.
    pub days: [bool; 7],
    pub from: u16,
    pub until: u16,
}

/// What a schedule does on a holiday.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolidayRule {
    /// Closed all day (the default, as on Mercury-class panels).
    Closed,
    /// Holidays are ordinary days.
    AsWeekday,
    /// These windows instead of the weekday's (`days` is ignored).
    Windows(Vec<(u16, u16)>),
}

/// A schedule, compiled into day programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    days: [Vec<(u16, u16)>; 7],
    /// `None`: holidays are ordinary days.
    holiday: Option<Vec<(u16, u16)>>,
}

/// A moment on the site's wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Monday.
    pub weekday: usize,
    /// Minutes since local midnight.
    pub minute: u16,
    pub date: jiff::civil::Date,
}

/// `unix` seconds on the wall clock of `tz`; `None` outside the range jiff represents.
pub fn local_time(unix: i64, tz: &TimeZone) -> Option<LocalTime> {
    let z = jiff::Timestamp::from_second(unix)
        .ok()?
        .to_zoned_datetime(tz.clone());
    Some(LocalTime {
        weekday: usize::try_from(z.weekday().to_monday_zero_offset()).ok()?,
        minute: u16::try_from(z.hour()).ok()? * 60 + u16::try_from(z.minute()).ok()?,
        date: z.date(),
    })
}

impl Schedule {
    /// Compiles `weekly` windows and the holiday rule.
    pub fn new(weekly: &[Window], holidays: &HolidayRule) -> Schedule {
        let mut days: [Vec<(u16, u16)>; 7] = Default::default();
        for w in weekly {
            for (d, on) in w.days.iter().enumerate() {
                if !on {
                    continue;
                }
                if w.until > w.from {
                    push(&mut days, d, (w.from, w.until));
                } else {
                    // Overnight: the evening on its day, the morning on the next.
                    push(&mut days, d, (w.from, DAY));
                    if w.until > 0 {
                        push(&mut days, (d + 1) % 7, (0, w.until));
                    }
                }
            }
        }
        for p in &mut days {
            normalize(p);
        }
        let holiday = match holidays {
            HolidayRule::Closed => Some(Vec::new()),
            HolidayRule::AsWeekday => None,
            HolidayRule::Windows(w) => {
                let mut p: Vec<(u16, u16)> = Vec::new();
                for &(from, until) in w {
                    // Within the holiday itself: an overnight one ends at its midnight.
                    p.push((from, if until > from { until } else { DAY }));
                }
                normalize(&mut p);
                Some(p)
            }
        };
        Schedule { days, holiday }
    }

    /// Open at `t` (on a holiday when `holiday`)?
    pub fn is_open(&self, t: &LocalTime, holiday: bool) -> bool {
        let program = match (&self.holiday, holiday) {
            (Some(h), true) => h,
            _ => match self.days.get(t.weekday) {
                Some(p) => p,
                None => return false,
            },
        };
        program.iter().any(|&(a, b)| a <= t.minute && t.minute < b)
    }

    /// Whether holidays change anything (so a decision only looks up the date when needed).
    pub fn cares_about_holidays(&self) -> bool {
        self.holiday.is_some()
    }

    /// The stored form: eight `|`-separated day programs (Monday..Sunday, holiday; the
    /// holiday one `*` when holidays are ordinary days), each `,`-separated `from-until`
    /// minute ranges.
    pub fn encode(&self) -> String {
        let prog = |p: &[(u16, u16)]| {
            p.iter()
                .map(|(a, b)| format!("{a}-{b}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut parts: Vec<String> = self.days.iter().map(|p| prog(p)).collect();
        parts.push(match &self.holiday {
            None => "*".into(),
            Some(h) => prog(h),
        });
        parts.join("|")
    }

    /// Reads [`encode`](Self::encode)'s form; `None` if it is not one (a damaged row).
    pub fn decode(s: &str) -> Option<Schedule> {
        let parts: Vec<&str> = s.split('|').collect();
        if parts.len() != 8 {
            return None;
        }
        let prog = |p: &str| -> Option<Vec<(u16, u16)>> {
            if p.is_empty() {
                return Some(Vec::new());
            }
            p.split(',')
                .map(|r| {
                    let (a, b) = r.split_once('-')?;
                    let (a, b) = (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?);
                    (a < b && b <= DAY).then_some((a, b))
                })
                .collect()
        };
        let mut days: [Vec<(u16, u16)>; 7] = Default::default();
        for (d, p) in days.iter_mut().zip(&parts) {
            *d = prog(p)?;
        }
        let holiday = match parts.get(7)? {
            &"*" => None,
            h => Some(prog(h)?),
        };
        Some(Schedule { days, holiday })
    }
}

fn push(days: &mut [Vec<(u16, u16)>; 7], d: usize, r: (u16, u16)) {
    if let Some(p) = days.get_mut(d) {
        p.push(r);
    }
}

/// Sorts and merges overlapping or touching ranges.
fn normalize(p: &mut Vec<(u16, u16)>) {
    p.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(p.len());
    for &(a, b) in p.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *p = out;
}

/// `HH:MM`, 00:00 to 24:00 (24:00 only where `end` is allowed).
pub fn parse_hhmm(s: &str, end: bool) -> Result<u16, String> {
    let bad = || format!("'{}' is not a time of day like 07:30", short(s));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && (m != 0 || !end)) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri`, `fri-mon` (wrapping), or `daily`.
pub fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    if s.trim() == "daily" {
        return Ok([true; 7]);
    }
    let day = |t: &str| {
        DAY_NAMES.iter().position(|&n| n == t).ok_or_else(|| {
            format!(
                "'{}' is not a day (mon, tue, wed, thu, fri, sat, sun, or daily)",
                short(t)
            )
        })
    };
    for part in s.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            None => {
                if let Some(d) = days.get_mut(day(part)?) {
                    *d = true;
                }
            }
            Some((a, b)) => {
                let (a, b) = (day(a.trim())?, day(b.trim())?);
                let mut d = a;
                loop {
                    if let Some(x) = days.get_mut(d) {
                        *x = true;
                    }
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
        }
    }
    Ok(days)
}

/// A window from its three fields.
pub fn parse_window(days: &str, from: &str, until: &str) -> Result<Window, String> {
    let days = parse_days(days)?;
    let from = parse_hhmm(from, false)?;
    let until = parse_hhmm(until, true)?;
    if from == until {
        return Err("from and until are the same time (an empty window)".into());
    }
    Ok(Window { days, from, until })
}

/// What a door entry of a credential names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `*`: every door.
    All,
    Door(&'a str),
    /// `@name`.
    Group(&'a str),
}

/// One entry of a credential's `doors`: a door, a group or every door, at all times or on a
/// schedule (`target=schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorEntry<'a> {
    pub target: Target<'a>,
    pub schedule: Option<&'a str>,
}

/// An id of a door, group or schedule: 1–64 bytes of `A-Z a-z 0-9 . _ - :`.
pub fn check_id(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("empty {what} id"));
    }
    if s.len() > MAX_DOOR_ID_BYTES {
        return Err(format!("{what} id longer than {MAX_DOOR_ID_BYTES} bytes"));
    }
    if !s.bytes().all(is_door_byte) {
        return Err(format!(
            "{what} id '{}' may only contain A-Z a-z 0-9 . _ - :",
            short(s)
        ));
    }
    Ok(())
}

/// Parses an entry (`front`, `*`, `@lobby`, `dock=business-hours`, `@staff=nights`).
pub fn parse_entry(s: &str) -> Result<DoorEntry<'_>, String> {
    let (target, schedule) = match s.split_once('=') {
        Some((t, sch)) => {
            check_id("schedule", sch)?;
            (t, Some(sch))
        }
        None => (s, None),
    };
    let target = if target == super::ALL_DOORS {
        Target::All
    } else if let Some(g) = target.strip_prefix('@') {
        check_id("door group", g)?;
        Target::Group(g)
    } else {
        check_id("door", target)?;
        Target::Door(target)
    };
    Ok(DoorEntry { target, schedule })
}

fn short(s: &str) -> String {
    super::record::truncate(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn at(tz: &TimeZone, y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned_datetime(tz.clone())
            .unwrap()
            .timestamp()
            .as_second()
    }

    fn weekdays_7_19() -> Schedule {
        Schedule::new(
            &[parse_window("mon-fri", "07:00", "19:00").unwrap()],
            &HolidayRule::Closed,
        )
    }

    fn open(s: &Schedule, unix: i64, tz: &TimeZone, holiday: bool) -> bool {
        s.is_open(&local_time(unix, tz).unwrap(), holiday)
    }

    #[test]
    fn weekday_window_in_local_time() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let s = weekdays_7_19();
        // Wednesday 2026-06-03: 06:59 closed, 07:00 open, 18:59 open, 19:00 closed.
        assert!(!open(&s, at(&tz, 2026, 6, 3, 6, 59), &tz, false));
        assert!(open(&s, at(&tz, 2026, 6, 3, 7, 0), &tz, false));
        assert!(open(&s, at(&tz, 2026, 6, 3, 18, 59), &tz, false));
        assert!(!open(&s, at(&tz, 2026, 6, 3, 19, 0), &tz, false));
        // Saturday closed; a holiday closed.
        assert!(!open(&s, at(&tz, 2026, 6, 6, 12, 0), &tz, false));
        assert!(!open(&s, at(&tz, 2026, 6, 3, 12, 0), &tz, true));
        // The same instant is 05:00 in UTC: closed there.
        let utc = TimeZone::UTC;
        assert!(!open(&s, at(&tz, 2026, 6, 3, 7, 0), &utc, false));
    }

    /// Europe/Berlin springs forward on Sunday 2026-03-29 (02:00 -> 03:00) and falls back on
    /// Sunday 2026-10-25 (03:00 -> 02:00).
    #[test]
    fn dst_transition_days_follow_the_wall_clock() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let sunday_early = Schedule::new(
            &[parse_window("sun", "01:30", "03:30").unwrap()],
            &HolidayRule::Closed,
        );
        let skipped = Schedule::new(
            &[parse_window("sun", "02:00", "03:00").unwrap()],
            &HolidayRule::Closed,
        );
        // Spring: 01:59 CET is followed by 03:00 CEST one minute later.
        let before = at(&tz, 2026, 3, 29, 1, 59);
        assert!(open(&sunday_early, before, &tz, false));
        assert!(open(&sunday_early, before + 60, &tz, false));
        assert_eq!(local_time(before + 60, &tz).unwrap().minute, 3 * 60);
        // The skipped hour never happens: a window inside it stays closed all day.
        for minute in 0..(24 * 60) {
            assert!(!open(&skipped, before - 119 * 60 + minute * 60, &tz, false));
        }
        // 03:30 CEST closes it, 30 real minutes after 03:00.
        assert!(!open(&sunday_early, before + 31 * 60, &tz, false));
        // Autumn: 02:00-03:00 happens twice, and the window is open both times: from 01:30
        // CEST to 03:30 CET is 3 real hours.
        let start = at(&tz, 2026, 10, 25, 1, 30);
        let real_open = (0..(5 * 60))
            .filter(|m| open(&sunday_early, start + m * 60, &tz, false))
            .count();
        assert_eq!(real_open, 3 * 60);
        assert!(open(&skipped, start + 45 * 60, &tz, false)); // 02:15 CEST
        assert!(open(&skipped, start + 105 * 60, &tz, false)); // 02:15 CET
                                                               // A weekday window on the day after the change is at 07:00 local, an hour later in
                                                               // UTC than the week before.
        let s = weekdays_7_19();
        let monday = at(&tz, 2026, 10, 26, 7, 0);
        assert!(open(&s, monday, &tz, false));
        assert!(!open(&s, monday - 60, &tz, false));
        assert_eq!(monday - at(&tz, 2026, 10, 19, 7, 0), 7 * 86_400 + 3600);
    }

    /// New York: 2026-03-08 and 2026-11-01, at 02:00 local.
    #[test]
    fn dst_in_another_zone() {
        let tz = TimeZone::get("America/New_York").unwrap();
        let night = Schedule::new(
            &[parse_window("sat", "22:00", "06:00").unwrap()],
            &HolidayRule::AsWeekday,
        );
        // Saturday 22:00 EST to Sunday 06:00 EDT: 7 real hours in spring...
        let start = at(&tz, 2026, 3, 7, 22, 0);
        let n = (0..(12 * 60))
            .filter(|m| open(&night, start + m * 60, &tz, false))
            .count();
        assert_eq!(n, 7 * 60);
        // ...and 9 in autumn.
        let start = at(&tz, 2026, 10, 31, 22, 0);
        let n = (0..(12 * 60))
            .filter(|m| open(&night, start + m * 60, &tz, false))
            .count();
        assert_eq!(n, 9 * 60);
    }

    #[test]
    fn overnight_and_holiday_windows() {
        let s = Schedule::new(
            &[
                parse_window("fri", "22:00", "06:00").unwrap(),
                parse_window("mon-fri", "08:00", "12:00").unwrap(),
                parse_window("mon-fri", "11:00", "13:00").unwrap(),
            ],
            &HolidayRule::Windows(vec![(9 * 60, 10 * 60)]),
        );
        let lt = |weekday, h: u16, m: u16| LocalTime {
            weekday,
            minute: h * 60 + m,
            date: date(2026, 1, 1),
        };
        assert!(s.is_open(&lt(4, 23, 0), false)); // Friday night
        assert!(s.is_open(&lt(5, 5, 59), false)); // Saturday morning
        assert!(!s.is_open(&lt(5, 6, 0), false));
        assert!(s.is_open(&lt(0, 12, 30), false)); // overlapping windows merged
        assert!(!s.is_open(&lt(0, 13, 0), false));
        // On a holiday only the holiday windows count, also for the morning after a Friday.
        assert!(s.is_open(&lt(5, 9, 30), true));
        assert!(!s.is_open(&lt(5, 5, 0), true));
        assert!(!s.is_open(&lt(0, 8, 30), true));
        let back = Schedule::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            s.encode(),
            "480-780|480-780|480-780|480-780|480-780,1320-1440|0-360||540-600"
        );
        let always = Schedule::new(
            &[parse_window("daily", "00:00", "24:00").unwrap()],
            &HolidayRule::AsWeekday,
        );
        assert!(always.is_open(&lt(6, 23, 59), true));
        assert!(!always.cares_about_holidays());
        assert_eq!(Schedule::decode(&always.encode()).unwrap(), always);
        for bad in ["", "1|2", "0-1|||||||x", "5-3|||||||", "0-1441|||||||"] {
            assert_eq!(Schedule::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn field_syntax() {
        assert_eq!(parse_hhmm("07:30", false), Ok(450));
        assert_eq!(parse_hhmm("24:00", true), Ok(1440));
        for bad in ["24:00", "7:30", "07:60", "25:00", "ab:cd", "0730", ""] {
            assert!(parse_hhmm(bad, false).is_err(), "{bad}");
        }
        assert_eq!(
            parse_days("mon-fri").unwrap(),
            [true, true, true, true, true, false, false]
        );
        assert_eq!(
            parse_days("fri-mon").unwrap(),
            [true, false, false, false, true, true, true]
        );
        assert_eq!(
            parse_days("sat, sun").unwrap(),
            [false, false, false, false, false, true, true]
        );
        assert_eq!(parse_days("daily").unwrap(), [true; 7]);
        assert!(parse_days("monday").is_err());
        assert!(parse_days("").is_err());
        assert!(parse_window("mon", "08:00", "08:00").is_err());
        assert_eq!(
            parse_entry("@lobby=biz").unwrap(),
            DoorEntry {
                target: Target::Group("lobby"),
                schedule: Some("biz")
            }
        );
        assert_eq!(
            parse_entry("*").unwrap(),
            DoorEntry {
                target: Target::All,
                schedule: None
            }
        );
        assert_eq!(
            parse_entry("dock=nights").unwrap().target,
            Target::Door("dock")
        );
        for bad in ["", "@", "a=", "=x", "@a b", "a=b=c", "a b"] {
            assert!(parse_entry(bad).is_err(), "{bad}");
        }
    }
}
