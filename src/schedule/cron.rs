//! Crontab(5) schedules: parsing a five-field line and finding its next run.
//!
//! `hasync` runs replication cycles from cron, and the `[schedule] cron = "..."` setting holds
//! the same line a sysadmin would put in a crontab. It must therefore mean exactly what
//! cronie (Vixie cron) makes of it. The popular `cron` crate reads a different dialect: it
//! wants six or seven fields (seconds first, an optional year last) and counts weekdays
//! Quartz-style from Sunday = 1. A crontab line pasted into it is either rejected for its field
//! count or, once someone prefixes a `0` for the seconds, silently shifted by a day:
//! `0 0 9 * * 1-5` runs Sunday to Thursday there, not Monday to Friday. A replication schedule
//! that is quietly off by a day is worse than none, so this module implements the crontab
//! grammar and matching rules itself, following cronie's `entry.c` and `cron.c`.
//!
//! What is accepted, as in cronie:
//! - five fields separated by spaces or tabs: minute (0-59), hour (0-23), day of month (1-31),
//!   month (1-12 or `jan`-`dec`) and day of week (0-7 or `sun`-`sat`, 0 and 7 both Sunday);
//!   names are three letters, case-insensitive, and only in the month and day-of-week fields;
//! - in each field a comma-separated list of `*`, `n`, `a-b`, `*/step` and `a-b/step`;
//!   in the day-of-week field a range may end on Sunday as 0 (`fri-sun` is `5-7`);
//! - the macros `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly`.
//!
//! The day rule is cronie's, quirk included: when the day-of-month or the day-of-week field
//! *starts with* `*`, a day must match both fields (so a plain `*` leaves only the other field
//! in force, and `*/2` in day-of-month with `1` in day-of-week means "odd-numbered Mondays");
//! when neither starts with `*`, a day matching either field is enough (`0 0 1,15 * fri` runs
//! on the 1st, the 15th and every Friday).
//!
//! Where this parser is stricter than cronie, it is because cronie accepts a line that can
//! only be a mistake, and a config error is better than a schedule that never does what was
//! meant. Each case is rejected with an error that says how to write what was probably meant:
//! - `@reboot`: it has no next run time, so it cannot drive a scheduler;
//! - `a-b` with `a > b` (current cronie accepts it and selects nothing, so the job never
//!   runs; older Vixie cron rejected it);
//! - a step larger than its range, such as `*/90` in the minute field (cronie only warns
//!   "Step size 90 higher than possible maximum of 59" and then runs at minute 0 alone);
//! - a day of month that none of the selected months has, such as `0 0 30 2 *`, which cron
//!   would keep without ever running it (under the "either" day rule the weekday still runs,
//!   so only schedules where the day of month must match are checked).
//!
//! `a/step` without a range or `*` (`5/15`) is rejected like cronie and Vixie cron reject it
//! ("bad minute"); the error suggests `5-59/15`, which both accept.

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Local, MappedLocalTime, NaiveDate, NaiveDateTime, TimeDelta, TimeZone,
    Timelike,
};

/// How far [`CronSchedule::next_after`] looks ahead before giving up.
///
/// The Gregorian calendar repeats every 400 years (146 097 days, a whole number of weeks), so a
/// schedule that has not matched within 400 years never will. A shorter horizon such as five
/// years would be wrong for valid schedules: `0 0 29 2 */7` (29 February falling on a Sunday)
/// fires in 2032 and then not until 2060. Because the parser rejects day/month combinations
/// that never occur, every accepted schedule does match within this horizon, and the search
/// skips whole months, days and hours, so even the 40-year gap of that example costs about a
/// thousand cheap steps.
const SEARCH_YEARS: i32 = 400;

/// The longest clock jump forward after which fixed-time runs that fell into the gap are
/// caught up. cron(8): "Special considerations exist when the clock is changed by less than
/// 3 hours"; larger jumps (Samoa skipping 30 December 2011) just skip the missing times.
const MAX_CATCH_UP_MINUTES: i64 = 3 * 60;

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const MONTH_FULL_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Longest length of each month, February counted in a leap year (index 0 is January).
const MONTH_MAX_DAYS: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/// The five fields of a crontab line, named as error messages name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl Field {
    const ALL: [Field; 5] = [
        Field::Minute,
        Field::Hour,
        Field::DayOfMonth,
        Field::Month,
        Field::DayOfWeek,
    ];

    fn min(self) -> u32 {
        match self {
            Field::DayOfMonth | Field::Month => 1,
            Field::Minute | Field::Hour | Field::DayOfWeek => 0,
        }
    }

    fn max(self) -> u32 {
        match self {
            Field::Minute => 59,
            Field::Hour => 23,
            Field::DayOfMonth => 31,
            Field::Month => 12,
            Field::DayOfWeek => 7,
        }
    }

    /// Appended to "value out of range a-b" to head off the usual mistake.
    fn range_note(self) -> &'static str {
        match self {
            Field::Minute => "",
            Field::Hour => " (midnight is 0)",
            Field::DayOfMonth => " (the first of the month is 1)",
            Field::Month => " (or jan-dec)",
            Field::DayOfWeek => " (0 and 7 are Sunday)",
        }
    }

    /// The span after which a step starts over, for "steps restart every ...".
    fn period(self) -> &'static str {
        match self {
            Field::Minute => "hour",
            Field::Hour => "day",
            Field::DayOfMonth => "month",
            Field::Month => "year",
            Field::DayOfWeek => "week",
        }
    }

    fn names(self) -> Option<&'static [&'static str]> {
        match self {
            Field::Month => Some(&MONTH_NAMES),
            Field::DayOfWeek => Some(&DAY_NAMES),
            Field::Minute | Field::Hour | Field::DayOfMonth => None,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        })
    }
}

/// Why a schedule was rejected.
///
/// Messages start in lower case, name the field and the offending text, and end with what to
/// write instead, so they read well after a location prefix such as
/// `config.toml:42:8: [schedule] cron = "0 24 * * *": `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CronError {
    /// Nothing but whitespace.
    #[error(
        "empty schedule; write five fields (minute hour day-of-month month day-of-week) \
         such as `0 2 * * *`, or a macro such as `@daily`"
    )]
    Empty,

    /// Not five fields (and not a macro).
    #[error(
        "expected 5 fields (minute hour day-of-month month day-of-week) but found {found}; {hint}"
    )]
    FieldCount { found: usize, hint: &'static str },

    /// `@reboot`, which has no next run time.
    #[error(
        "`@reboot` runs once at boot and has no next run time, so it cannot schedule \
         replication cycles; use a time such as `@daily` or `0 2 * * *`"
    )]
    Reboot,

    /// An `@` word other than the cronie macros (which are lower case).
    #[error("unknown macro `{name}`; {hint}")]
    UnknownMacro { name: String, hint: String },

    /// A macro followed by more text.
    #[error("`{name}` stands for all five fields, so nothing may follow it (found `{rest}`)")]
    MacroWithFields { name: String, rest: String },

    /// One field is malformed. `item` is the offending list item when the field has several.
    #[error("{field} field `{text}`{}: {problem}", item_suffix(.item.as_deref()))]
    Field {
        field: Field,
        text: String,
        item: Option<String>,
        problem: FieldProblem,
    },

    /// The day of month must match and none of its days exists in the selected months.
    #[error(
        "day-of-month field `{days}` never occurs in month field `{months}` ({why}), so cron \
         would never run this schedule; pick days that exist in those months"
    )]
    NeverRuns {
        days: String,
        months: String,
        why: String,
    },
}

fn item_suffix(item: Option<&str>) -> String {
    item.map(|item| format!(", item `{item}`"))
        .unwrap_or_default()
}

/// What is wrong inside one field; see [`CronError::Field`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FieldProblem {
    /// `1,,2` or a trailing comma.
    #[error("empty list item; remove the doubled or trailing comma")]
    EmptyItem,

    /// Not a number, name, range or step at all (`5x`, `-5`, `1-2-3`).
    #[error("expected a number, a range `a-b`, a list `a,b` or a step `*/n` or `a-b/n`")]
    Malformed,

    /// Quartz extensions: `?`, `L`, `W`, `#`.
    #[error(
        "`?`, `L`, `W` and `#` belong to the Quartz cron dialect, which crontab(5) does not \
         have; use `*`, numbers, ranges and lists"
    )]
    QuartzSyntax,

    /// A number outside the field's range.
    #[error("value out of range {min}-{max}{note}")]
    OutOfRange {
        min: u32,
        max: u32,
        note: &'static str,
    },

    /// `a-b` with `a > b`.
    #[error("range runs backwards and cron ranges do not wrap around; write `{suggestion}`")]
    Reversed { suggestion: String },

    /// `/0`, or a step that is not a number.
    #[error("step must be a whole number of at least 1")]
    BadStep,

    /// A step that selects only the first value of its range (`*/90` in minutes).
    #[error(
        "step {step} is larger than the range {low}-{high}, so only {low} would match (steps \
         restart every {period}); write `{low}` if that is what you mean"
    )]
    StepTooLarge {
        step: u32,
        low: u32,
        high: u32,
        period: &'static str,
    },

    /// `a/n`, which crontab rejects; `a-max/n` is the accepted spelling.
    #[error(
        "a step needs `*` or a range before it (crontab rejects `{given}`); write `{suggestion}`"
    )]
    StepWithoutRange { given: String, suggestion: String },

    /// A word that is not a three-letter month or day name.
    #[error("unknown {kind} name; use {expected}{hint}")]
    UnknownName {
        kind: &'static str,
        expected: &'static str,
        hint: String,
    },

    /// A day name in the month field or a month name in the day-of-week field.
    #[error("that is a {found} name, but this field takes {expected}")]
    NameInWrongField {
        found: &'static str,
        expected: &'static str,
    },

    /// A name in the minute, hour or day-of-month field.
    #[error(
        "names are only allowed in the month and day-of-week fields; use a number in {min}-{max}"
    )]
    NamesNotAllowed { min: u32, max: u32 },
}

/// A parsed crontab(5) schedule.
///
/// Each field is a bit set with bit `n` standing for value `n` (day of week folded so that
/// bit 0 is Sunday, whether it was written 0, 7 or `sun`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CronSchedule {
    source: String,
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    /// cronie's `DOM_STAR || DOW_STAR`: one of the day fields starts with `*`, so a day must
    /// match both fields; otherwise matching either is enough.
    days_must_match_both: bool,
    /// Neither the minute nor the hour field starts with `*` (cronie's "fixed-time" jobs, the
    /// only ones it catches up after the clock jumps forward).
    fixed_time: bool,
}

impl FromStr for CronSchedule {
    type Err = CronError;

    fn from_str(source: &str) -> Result<Self, CronError> {
        let text = source.trim();
        if text.is_empty() {
            return Err(CronError::Empty);
        }
        let fields: Vec<&str> = text.split([' ', '\t']).filter(|f| !f.is_empty()).collect();
        let expanded;
        let fields = if let Some(name) = fields.first().and_then(|f| f.strip_prefix('@')) {
            if fields.len() > 1 {
                return Err(CronError::MacroWithFields {
                    name: fields[0].to_owned(),
                    rest: fields[1..].join(" "),
                });
            }
            expanded = expand_macro(name)?;
            expanded.split(' ').collect()
        } else {
            fields
        };
        if fields.len() != 5 {
            return Err(CronError::FieldCount {
                found: fields.len(),
                hint: field_count_hint(&fields),
            });
        }

        let mut sets = [0u64; 5];
        for ((set, field), text) in sets.iter_mut().zip(Field::ALL).zip(&fields) {
            *set = parse_field(field, text)?;
        }
        let [minutes, hours, days_of_month, months, mut days_of_week] = sets;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & !(1 << 7);
        }
        let starts_with_star = |i: usize| fields[i].starts_with('*');
        let schedule = CronSchedule {
            source: source.to_owned(),
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            days_must_match_both: starts_with_star(2) || starts_with_star(4),
            fixed_time: !starts_with_star(0) && !starts_with_star(1),
        };
        schedule.check_days_exist(fields[2], fields[3])?;
        Ok(schedule)
    }
}

/// Shows the source text without surrounding whitespace, for log lines.
impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.source.trim())
    }
}

impl CronSchedule {
    /// The text the schedule was parsed from, exactly as given.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The first matching minute strictly after `after` (seconds dropped), in naive local wall
    /// time.
    ///
    /// Returns `None` only when no match exists within 400 years of `after` (see
    /// `SEARCH_YEARS`: for a schedule this parser accepts, that means the end of chrono's date
    /// range has been reached).
    #[must_use]
    pub fn next_after(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let start = after
            .with_second(0)?
            .with_nanosecond(0)?
            .checked_add_signed(TimeDelta::minutes(1))?;
        let last_year = start.year().saturating_add(SEARCH_YEARS);
        let mut date = start.date();
        let (mut hour, mut minute) = (start.hour(), start.minute());
        loop {
            if date.year() > last_year {
                return None;
            }
            if !bit(self.months, date.month()) {
                date = self.next_month_start(date)?;
                (hour, minute) = (0, 0);
                continue;
            }
            if !self.day_matches(date) {
                date = date.succ_opt()?;
                (hour, minute) = (0, 0);
                continue;
            }
            match next_bit(self.hours, hour) {
                None => {
                    date = date.succ_opt()?;
                    (hour, minute) = (0, 0);
                    continue;
                }
                Some(h) if h != hour => (hour, minute) = (h, 0),
                Some(_) => {}
            }
            match next_bit(self.minutes, minute) {
                Some(m) => return date.and_hms_opt(hour, m, 0),
                None if hour < 23 => (hour, minute) = (hour + 1, 0),
                None => {
                    date = date.succ_opt()?;
                    (hour, minute) = (0, 0);
                }
            }
        }
    }

    /// The next run strictly after `after`, in the machine's local time zone.
    ///
    /// Daylight-saving transitions are handled the way cron(8) documents cronie's behaviour,
    /// with one simplification:
    ///
    /// - **Wall times that do not exist** (spring forward, e.g. 02:00-02:59 skipped): a
    ///   fixed-time schedule, one whose minute and hour fields do not start with `*` (such as
    ///   `30 2 * * *` or `@daily`), runs once at the first instant after the jump (03:00), as
    ///   cronie runs the jobs that fell into the skipped time "soon after the change". Several
    ///   skipped matches collapse into that one run. Schedules with `*` in the minute or hour
    ///   field (`*/15 * * * *`, `@hourly`) skip the missing times, as in cronie. So a nightly
    ///   cycle at 02:30 is not lost once a year. As in cronie, only jumps of up to three hours
    ///   are caught up; after a larger one (a zone changing its offset by a day) the missing
    ///   times are skipped.
    /// - **Wall times that occur twice** (fall back, e.g. 02:00-02:59 repeated): every
    ///   schedule runs at the earlier occurrence only. This is cronie's behaviour for
    ///   fixed-time jobs; cronie would also re-run `*`-minute or `*`-hour jobs during the
    ///   repeated hour, which we do not (for a replication cycle, the only effect is one
    ///   longer interval a year).
    #[must_use]
    pub fn next_after_local(&self, after: DateTime<Local>) -> Option<DateTime<Local>> {
        self.next_after_in(&after)
    }

    /// The next `n` runs after `after` in the machine's local time zone, in order; fewer if the
    /// schedule runs out (see [`next_after`](Self::next_after)).
    #[must_use]
    pub fn upcoming(&self, after: DateTime<Local>, n: usize) -> Vec<DateTime<Local>> {
        let mut runs = Vec::with_capacity(n);
        let mut cursor = after;
        while runs.len() < n {
            match self.next_after_local(cursor) {
                Some(next) => {
                    runs.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        runs
    }

    /// [`next_after_local`](Self::next_after_local) for any time zone, with the same
    /// daylight-saving rules.
    #[must_use]
    pub fn next_after_in<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        let tz = after.timezone();
        let start = after.naive_local();
        let last_year = start.year().saturating_add(SEARCH_YEARS);
        // Mapping each matching wall time to its earlier instant (and gap times to the end of
        // the gap) is monotonic, so the first candidate later than `after` is the answer; only
        // wall times after `after`'s own can qualify.
        let mut wall = start;
        loop {
            wall = self.next_after(wall)?;
            if wall.year() > last_year {
                return None;
            }
            let instant = match earliest(&tz, wall) {
                Some(t) => t,
                None if self.fixed_time => match end_of_gap(&tz, wall) {
                    Some(t) => t,
                    None => continue,
                },
                None => continue,
            };
            if instant > *after {
                return Some(instant);
            }
        }
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let by_month_day = bit(self.days_of_month, date.day());
        let by_weekday = bit(self.days_of_week, date.weekday().num_days_from_sunday());
        if self.days_must_match_both {
            by_month_day && by_weekday
        } else {
            by_month_day || by_weekday
        }
    }

    /// The first day of the next selected month after `date`'s month.
    fn next_month_start(&self, date: NaiveDate) -> Option<NaiveDate> {
        let months = self.months;
        match next_bit(months, date.month() + 1) {
            Some(month) => NaiveDate::from_ymd_opt(date.year(), month, 1),
            None => NaiveDate::from_ymd_opt(date.year().checked_add(1)?, next_bit(months, 1)?, 1),
        }
    }

    /// Reject schedules cron would keep but never run: the day of month must match and none of
    /// the selected days exists in any selected month (`0 0 30 2 *`, `0 0 31 4,6,9,11 *`).
    fn check_days_exist(&self, days: &str, months: &str) -> Result<(), CronError> {
        if !self.days_must_match_both {
            return Ok(());
        }
        let selected: Vec<usize> = (1..=12)
            .filter(|&m| bit(self.months, m))
            .map(|m| m as usize - 1)
            .collect();
        let longest = selected
            .iter()
            .map(|&m| MONTH_MAX_DAYS[m])
            .max()
            .unwrap_or(31);
        let possible = (1..=longest).any(|d| bit(self.days_of_month, d));
        if possible {
            return Ok(());
        }
        let why = match selected.as_slice() {
            [1] => "February has at most 29 days".to_owned(),
            [m] => format!("{} has {} days", MONTH_FULL_NAMES[*m], MONTH_MAX_DAYS[*m]),
            _ => format!("the longest of those months has {longest} days"),
        };
        Err(CronError::NeverRuns {
            days: days.to_owned(),
            months: months.to_owned(),
            why,
        })
    }
}

/// The earlier instant at which the clock reads `wall`, `None` if it never does (DST gap).
///
/// Not simply `tz.from_local_datetime(..).earliest()`: chrono's `Local` on Unix (0.4.45) lists
/// the two instants of an ambiguous time later-first (chronotope/chrono#1625), and it counts
/// the transition instant on both sides, reporting 02:00 on a spring-forward day as existing
/// (+01:00 in Berlin) and 03:00 on a fall-back day as ambiguous, which would run a 03:00 job
/// at the repeated 02:00. So each candidate is converted back from UTC and kept only if the
/// clock really reads `wall` at that instant, and the earliest survivor wins.
fn earliest<Tz: TimeZone>(tz: &Tz, wall: NaiveDateTime) -> Option<DateTime<Tz>> {
    let (first, second) = match tz.from_local_datetime(&wall) {
        MappedLocalTime::Single(t) => (Some(t), None),
        MappedLocalTime::Ambiguous(a, b) => (Some(a), Some(b)),
        MappedLocalTime::None => (None, None),
    };
    [first, second]
        .into_iter()
        .flatten()
        .map(|t| tz.from_utc_datetime(&t.naive_utc()))
        .filter(|t| t.naive_local() == wall)
        .min()
}

/// The first instant after the gap that swallowed `wall`, if the clock jumped by less than
/// three hours there (see `MAX_CATCH_UP_MINUTES`).
fn end_of_gap<Tz: TimeZone>(tz: &Tz, wall: NaiveDateTime) -> Option<DateTime<Tz>> {
    let end = (1..=MAX_CATCH_UP_MINUTES).find_map(|m| {
        let later = wall.checked_add_signed(TimeDelta::minutes(m))?;
        earliest(tz, later)
    })?;
    let just_before = tz.from_utc_datetime(&(end.naive_utc() - TimeDelta::minutes(1)));
    let jump = end.naive_local() - just_before.naive_local() - TimeDelta::minutes(1);
    (jump <= TimeDelta::minutes(MAX_CATCH_UP_MINUTES)).then_some(end)
}

fn bit(mask: u64, n: u32) -> bool {
    n < 64 && mask & (1 << n) != 0
}

/// The smallest set bit at position `from` or above.
fn next_bit(mask: u64, from: u32) -> Option<u32> {
    let rest = mask.checked_shr(from)?;
    (rest != 0).then(|| from + rest.trailing_zeros())
}

fn expand_macro(name: &str) -> Result<&'static str, CronError> {
    Ok(match name {
        "yearly" | "annually" => "0 0 1 1 *",
        "monthly" => "0 0 1 * *",
        "weekly" => "0 0 * * 0",
        "daily" | "midnight" => "0 0 * * *",
        "hourly" => "0 * * * *",
        "reboot" => return Err(CronError::Reboot),
        _ => {
            const KNOWN: [&str; 7] = [
                "yearly", "annually", "monthly", "weekly", "daily", "midnight", "hourly",
            ];
            let lower = name.to_ascii_lowercase();
            let hint = if KNOWN.contains(&lower.as_str()) || lower == "reboot" {
                format!("macros are lower case, as in `@{lower}`")
            } else {
                "use one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"
                    .to_owned()
            };
            return Err(CronError::UnknownMacro {
                name: format!("@{name}"),
                hint,
            });
        }
    })
}

fn field_count_hint(fields: &[&str]) -> &'static str {
    match fields.len() {
        0..=4 => "every field is required; use `*` for \"any\"",
        // Quartz / `cron` crate order: seconds, the five crontab fields with day of week
        // last-but-year, then an optional year. Tell that apart from a pasted command.
        6 | 7 if fields[5] == "?" || parse_field(Field::DayOfWeek, fields[5]).is_ok() => {
            "crontab(5) has no seconds or year field; if this is the seconds-first format of \
             Quartz or the `cron` crate, drop the seconds (and the year)"
        }
        _ => "give only the five time fields, without a user name or command",
    }
}

/// Parse one field into a bit set of the values it selects.
fn parse_field(field: Field, text: &str) -> Result<u64, CronError> {
    let items: Vec<&str> = text.split(',').collect();
    let mut set = 0u64;
    for item in &items {
        set |= parse_item(field, item).map_err(|problem| CronError::Field {
            field,
            text: text.to_owned(),
            item: (items.len() > 1 && !item.is_empty()).then(|| (*item).to_owned()),
            problem,
        })?;
    }
    Ok(set)
}

/// Parse one list item: `*`, `*/step`, `n`, `a-b` or `a-b/step`.
fn parse_item(field: Field, item: &str) -> Result<u64, FieldProblem> {
    if item.is_empty() {
        return Err(FieldProblem::EmptyItem);
    }
    if looks_like_quartz(item) {
        return Err(FieldProblem::QuartzSyntax);
    }
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(parse_step(step)?)),
        None => (item, None),
    };
    let (low, high) = if range == "*" {
        (field.min(), field.max())
    } else if let Some((a, b)) = range.split_once('-') {
        let low = parse_value(field, a)?;
        let mut high = parse_value(field, b)?;
        // cronie reads a day-of-week range ending on Sunday-as-0 as ending on 7 (`fri-sun`).
        if field == Field::DayOfWeek && high == 0 && low > 0 {
            high = 7;
        }
        if low > high {
            return Err(FieldProblem::Reversed {
                suggestion: wrap_suggestion(field, low, high),
            });
        }
        (low, high)
    } else {
        let value = parse_value(field, range)?;
        if let Some(step) = step {
            return Err(FieldProblem::StepWithoutRange {
                given: item.to_owned(),
                suggestion: format!("{range}-{}/{step}", field.max()),
            });
        }
        (value, value)
    };
    let step = step.unwrap_or(1);
    if step > 1 && step > high - low {
        return Err(FieldProblem::StepTooLarge {
            step,
            low,
            high,
            period: field.period(),
        });
    }
    Ok((low..=high)
        .step_by(step as usize)
        .fold(0, |set, v| set | 1 << v))
}

fn looks_like_quartz(item: &str) -> bool {
    item.contains(['?', '#'])
        || item.eq_ignore_ascii_case("l")
        || item.eq_ignore_ascii_case("lw")
        || (item.len() > 1
            && item.ends_with(['L', 'W', 'l', 'w'])
            && item[..item.len() - 1].bytes().all(|b| b.is_ascii_digit()))
}

fn parse_step(text: &str) -> Result<u32, FieldProblem> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FieldProblem::BadStep);
    }
    match text.parse::<u32>() {
        Ok(0) => Err(FieldProblem::BadStep),
        Ok(step) => Ok(step),
        // More digits than a u32 holds: certainly larger than any field.
        Err(_) => Ok(u32::MAX),
    }
}

/// Parse a number or, in the month and day-of-week fields, a three-letter name.
fn parse_value(field: Field, text: &str) -> Result<u32, FieldProblem> {
    let out_of_range = || FieldProblem::OutOfRange {
        min: field.min(),
        max: field.max(),
        note: field.range_note(),
    };
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let value = text.parse::<u32>().map_err(|_| out_of_range())?;
        return if (field.min()..=field.max()).contains(&value) {
            Ok(value)
        } else {
            Err(out_of_range())
        };
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(FieldProblem::Malformed);
    }
    let lower = text.to_ascii_lowercase();
    // The value of each name: months count from 1, days of the week from 0 (Sunday).
    let lookup = |names: &[&str], first: u32| {
        names
            .iter()
            .zip(first..)
            .find(|(n, _)| **n == lower)
            .map(|(_, v)| v)
    };
    match field {
        Field::Month => {
            if let Some(month) = lookup(&MONTH_NAMES, 1) {
                return Ok(month);
            }
            if lookup(&DAY_NAMES, 0).is_some() {
                return Err(FieldProblem::NameInWrongField {
                    found: "day-of-week",
                    expected: "months (1-12 or jan-dec)",
                });
            }
        }
        Field::DayOfWeek => {
            if let Some(day) = lookup(&DAY_NAMES, 0) {
                return Ok(day);
            }
            if lookup(&MONTH_NAMES, 1).is_some() {
                return Err(FieldProblem::NameInWrongField {
                    found: "month",
                    expected: "days of the week (0-7 or sun-sat)",
                });
            }
        }
        Field::Minute | Field::Hour | Field::DayOfMonth => {
            return Err(FieldProblem::NamesNotAllowed {
                min: field.min(),
                max: field.max(),
            });
        }
    }
    let (kind, expected) = match field {
        Field::Month => (
            "month",
            "1-12 or jan, feb, mar, apr, may, jun, jul, aug, sep, oct, nov, dec",
        ),
        _ => ("day", "0-7 or sun, mon, tue, wed, thu, fri, sat"),
    };
    let hint = lower
        .get(..3)
        .filter(|prefix| field.names().is_some_and(|names| names.contains(prefix)))
        .map(|prefix| format!(" (names are three letters: `{prefix}`)"))
        .unwrap_or_default();
    Err(FieldProblem::UnknownName {
        kind,
        expected,
        hint,
    })
}

/// What to write instead of the backwards range `low-high`: the two pieces it would wrap into.
fn wrap_suggestion(field: Field, low: u32, high: u32) -> String {
    let piece = |a: u32, b: u32| {
        if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        }
    };
    // Sunday is both 0 and 7; start the second piece on Monday rather than repeat it.
    let restart = if field == Field::DayOfWeek {
        1
    } else {
        field.min()
    };
    format!("{},{}", piece(low, field.max()), piece(restart, high))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, NaiveDate};

    fn parse(text: &str) -> CronSchedule {
        text.parse()
            .unwrap_or_else(|e| panic!("`{text}` should parse: {e}"))
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, mo, d)
            .and_then(|date| date.and_hms_opt(h, mi, 0))
            .unwrap()
    }

    /// The next `n` naive runs after `after`.
    fn runs(text: &str, after: NaiveDateTime, n: usize) -> Vec<NaiveDateTime> {
        let schedule = parse(text);
        let mut out = Vec::new();
        let mut cursor = after;
        for _ in 0..n {
            cursor = schedule.next_after(cursor).expect("schedule should run");
            out.push(cursor);
        }
        out
    }

    fn error(text: &str) -> String {
        match text.parse::<CronSchedule>() {
            Ok(_) => panic!("`{text}` should be rejected"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn daily_at_two() {
        let s = parse("0 2 * * *");
        // Before, after, exactly at and seconds past the run time.
        assert_eq!(
            s.next_after(at(2025, 6, 10, 14, 37)),
            Some(at(2025, 6, 11, 2, 0))
        );
        assert_eq!(
            s.next_after(at(2025, 6, 10, 1, 59)),
            Some(at(2025, 6, 10, 2, 0))
        );
        assert_eq!(
            s.next_after(at(2025, 6, 10, 2, 0)),
            Some(at(2025, 6, 11, 2, 0))
        );
        let with_seconds = at(2025, 6, 10, 1, 59).with_second(59).unwrap();
        assert_eq!(s.next_after(with_seconds), Some(at(2025, 6, 10, 2, 0)));
        let past_run = at(2025, 6, 10, 2, 0).with_second(30).unwrap();
        assert_eq!(s.next_after(past_run), Some(at(2025, 6, 11, 2, 0)));
        // Month and year boundaries.
        assert_eq!(
            s.next_after(at(2025, 12, 31, 3, 0)),
            Some(at(2026, 1, 1, 2, 0))
        );
    }

    #[test]
    fn every_fifteen_minutes() {
        assert_eq!(
            runs("*/15 * * * *", at(2025, 6, 10, 10, 7), 4),
            [
                at(2025, 6, 10, 10, 15),
                at(2025, 6, 10, 10, 30),
                at(2025, 6, 10, 10, 45),
                at(2025, 6, 10, 11, 0),
            ]
        );
        assert_eq!(
            runs("*/15 * * * *", at(2025, 12, 31, 23, 50), 1),
            [at(2026, 1, 1, 0, 0)]
        );
    }

    #[test]
    fn weekdays_from_friday_evening_to_monday() {
        // 2025-06-13 is a Friday, 2025-06-16 the Monday after.
        assert_eq!(
            runs("0 9 * * 1-5", at(2025, 6, 13, 18, 30), 2),
            [at(2025, 6, 16, 9, 0), at(2025, 6, 17, 9, 0)]
        );
        assert_eq!(
            runs("0 9 * * mon-fri", at(2025, 6, 13, 18, 30), 1),
            [at(2025, 6, 16, 9, 0)]
        );
    }

    #[test]
    fn sunday_as_zero_seven_and_name() {
        // 2025-06-11 is a Wednesday; the Sundays after it are 15, 22 and 29 June.
        let expected = [
            at(2025, 6, 15, 12, 0),
            at(2025, 6, 22, 12, 0),
            at(2025, 6, 29, 12, 0),
        ];
        for text in ["0 12 * * 0", "0 12 * * 7", "0 12 * * sun", "0 12 * * SUN"] {
            assert_eq!(runs(text, at(2025, 6, 11, 8, 0), 3), expected, "{text}");
        }
        assert_eq!(parse("0 12 * * 0").days_of_week, 1);
        assert_eq!(parse("0 12 * * 7").days_of_week, 1);
        assert_eq!(parse("0 12 * * 0-7").days_of_week, 0x7f);
    }

    #[test]
    fn day_of_week_range_may_end_on_sunday_as_zero() {
        // cronie reads `fri-sun` / `5-0` as 5-7. 2025-06-13 is a Friday.
        let expected = [
            at(2025, 6, 13, 0, 0),
            at(2025, 6, 14, 0, 0),
            at(2025, 6, 15, 0, 0),
        ];
        for text in ["0 0 * * fri-sun", "0 0 * * 5-0", "0 0 * * 5-7"] {
            assert_eq!(runs(text, at(2025, 6, 12, 12, 0), 3), expected, "{text}");
        }
    }

    #[test]
    fn both_day_fields_restricted_means_either() {
        // September 2025: the 1st and 15th are Mondays; Fridays are 5, 12, 19, 26.
        // October 2025: the 1st is a Wednesday, the 3rd a Friday.
        assert_eq!(
            runs("0 0 1,15 * 5", at(2025, 8, 31, 0, 0), 8),
            [
                at(2025, 9, 1, 0, 0),
                at(2025, 9, 5, 0, 0),
                at(2025, 9, 12, 0, 0),
                at(2025, 9, 15, 0, 0),
                at(2025, 9, 19, 0, 0),
                at(2025, 9, 26, 0, 0),
                at(2025, 10, 1, 0, 0),
                at(2025, 10, 3, 0, 0),
            ]
        );
    }

    #[test]
    fn day_field_starting_with_star_means_both() {
        // cronie's quirk: `*/2` starts with `*`, so the day must be odd AND a Monday.
        // Mondays in September 2025: 1, 8, 15, 22, 29; in October: 6, 13, 20, 27.
        assert_eq!(
            runs("0 0 */2 * 1", at(2025, 8, 31, 0, 0), 5),
            [
                at(2025, 9, 1, 0, 0),
                at(2025, 9, 15, 0, 0),
                at(2025, 9, 29, 0, 0),
                at(2025, 10, 13, 0, 0),
                at(2025, 10, 27, 0, 0),
            ]
        );
    }

    #[test]
    fn yearly_in_january_by_name() {
        assert_eq!(
            runs("30 4 1 jan *", at(2025, 3, 10, 0, 0), 2),
            [at(2026, 1, 1, 4, 30), at(2027, 1, 1, 4, 30)]
        );
    }

    #[test]
    fn leap_day_jumps_to_next_leap_year() {
        assert_eq!(
            runs("0 0 29 2 *", at(2025, 3, 1, 0, 0), 2),
            [at(2028, 2, 29, 0, 0), at(2032, 2, 29, 0, 0)]
        );
        assert_eq!(
            runs("0 0 29 2 *", at(2024, 2, 29, 0, 0), 1),
            [at(2028, 2, 29, 0, 0)]
        );
    }

    #[test]
    fn rare_schedule_beyond_five_years_is_found() {
        // 29 February on a Sunday (day-of-week starts with `*`, so both must match):
        // 2032, then 2060. A five-year horizon would wrongly report "never".
        assert_eq!(
            runs("0 0 29 2 */7", at(2025, 1, 1, 0, 0), 2),
            [at(2032, 2, 29, 0, 0), at(2060, 2, 29, 0, 0)]
        );
    }

    #[test]
    fn search_agrees_with_a_minute_by_minute_scan() {
        let matches = |s: &CronSchedule, t: NaiveDateTime| {
            bit(s.minutes, t.minute())
                && bit(s.hours, t.hour())
                && bit(s.months, t.month())
                && s.day_matches(t.date())
        };
        let schedules = [
            "* * * * *",
            "*/7 3-5 * * *",
            "0 0 1,15 * 5",
            "0 0 */2 * 1",
            "15,45 */5 * * mon-fri",
            "0 12 29-31 * *",
            "30 1 * feb,mar,dec sun",
            "5-59/20 22-23 * * 6-7",
            "59 23 28-31 * *",
        ];
        let starts = [
            at(2024, 2, 27, 23, 59),
            at(2024, 12, 30, 22, 10),
            at(2025, 1, 31, 0, 0),
            at(2025, 6, 13, 18, 31),
        ];
        for text in schedules {
            let schedule = parse(text);
            for start in starts {
                let mut cursor = start;
                for _ in 0..3 {
                    let mut expected = cursor + TimeDelta::minutes(1);
                    while !matches(&schedule, expected) {
                        expected += TimeDelta::minutes(1);
                    }
                    assert_eq!(
                        schedule.next_after(cursor),
                        Some(expected),
                        "{text} after {cursor}"
                    );
                    cursor = expected;
                }
            }
        }
    }

    #[test]
    fn end_of_date_range_is_none_not_a_panic() {
        let last = NaiveDateTime::MAX;
        assert_eq!(parse("* * * * *").next_after(last), None);
        let near_end = NaiveDate::MAX.and_hms_opt(0, 0, 0).unwrap();
        assert_eq!(parse("0 0 1 1 *").next_after(near_end), None);
    }

    #[test]
    fn macros() {
        let after = at(2025, 6, 11, 10, 30); // a Wednesday
        assert_eq!(
            runs("@hourly", after, 2),
            [at(2025, 6, 11, 11, 0), at(2025, 6, 11, 12, 0)]
        );
        assert_eq!(
            runs("@daily", after, 2),
            [at(2025, 6, 12, 0, 0), at(2025, 6, 13, 0, 0)]
        );
        assert_eq!(runs("@midnight", after, 1), [at(2025, 6, 12, 0, 0)]);
        assert_eq!(
            runs("@weekly", after, 2),
            [at(2025, 6, 15, 0, 0), at(2025, 6, 22, 0, 0)]
        );
        assert_eq!(
            runs("@monthly", after, 2),
            [at(2025, 7, 1, 0, 0), at(2025, 8, 1, 0, 0)]
        );
        assert_eq!(runs("@yearly", after, 1), [at(2026, 1, 1, 0, 0)]);
        assert_eq!(runs("@annually", after, 1), [at(2026, 1, 1, 0, 0)]);
        // A macro and its expansion select the same times.
        for (name, text) in [
            ("@yearly", "0 0 1 1 *"),
            ("@monthly", "0 0 1 * *"),
            ("@weekly", "0 0 * * 0"),
            ("@daily", "0 0 * * *"),
            ("@hourly", "0 * * * *"),
        ] {
            let (m, e) = (parse(name), parse(text));
            assert_eq!(
                (m.minutes, m.hours, m.days_of_month),
                (e.minutes, e.hours, e.days_of_month)
            );
            assert_eq!((m.months, m.days_of_week), (e.months, e.days_of_week));
        }
    }

    #[test]
    fn stepped_range() {
        assert_eq!(
            runs("5-59/20 * * * *", at(2025, 6, 10, 10, 0), 4),
            [
                at(2025, 6, 10, 10, 5),
                at(2025, 6, 10, 10, 25),
                at(2025, 6, 10, 10, 45),
                at(2025, 6, 10, 11, 5),
            ]
        );
        assert_eq!(
            parse("1-10/3 * * * *").minutes,
            1 << 1 | 1 << 4 | 1 << 7 | 1 << 10
        );
        assert_eq!(parse("0 */6 * * *").hours, 1 | 1 << 6 | 1 << 12 | 1 << 18);
    }

    #[test]
    fn lists_and_ranges_combine() {
        assert_eq!(
            parse("0,30,45-47 * * * *").minutes,
            1 | 1 << 30 | 0b111 << 45
        );
    }

    #[test]
    fn names_are_case_insensitive() {
        // Day of month is `*`, so only Monday-Wednesday in January and February count.
        // 2026-01-01 is a Thursday: the first runs are 5, 6, 7 and 12 January.
        assert_eq!(
            runs("0 6 * JaN,fEB MoN-wEd", at(2025, 6, 13, 0, 0), 4),
            [
                at(2026, 1, 5, 6, 0),
                at(2026, 1, 6, 6, 0),
                at(2026, 1, 7, 6, 0),
                at(2026, 1, 12, 6, 0),
            ]
        );
        assert_eq!(parse("0 0 1 jan-MAR *").months, 0b1110);
        assert_eq!(parse("0 0 * * Sat,SUN").days_of_week, 1 | 1 << 6);
    }

    #[test]
    fn whitespace_between_and_around_fields() {
        let s = parse("  0\t2 \t *   *\t* \n");
        assert_eq!(s.source(), "  0\t2 \t *   *\t* \n");
        assert_eq!(
            s.next_after(at(2025, 6, 10, 14, 0)),
            Some(at(2025, 6, 11, 2, 0))
        );
        assert_eq!(parse("\t@daily  ").source(), "\t@daily  ");
        assert_eq!(parse(" 0 2 * * *\n").to_string(), "0 2 * * *");
    }

    #[test]
    fn impossible_days_are_rejected_but_either_rule_keeps_weekdays() {
        assert_eq!(
            error("0 0 30 2 *"),
            "day-of-month field `30` never occurs in month field `2` (February has at most 29 \
             days), so cron would never run this schedule; pick days that exist in those months"
        );
        assert_eq!(
            error("0 0 31 4,6,9,11 *"),
            "day-of-month field `31` never occurs in month field `4,6,9,11` (the longest of \
             those months has 30 days), so cron would never run this schedule; pick days that \
             exist in those months"
        );
        assert!(error("0 0 31 apr *").contains("(April has 30 days)"));
        // With both day fields restricted, Mondays in February still run.
        assert_eq!(
            runs("0 0 31 2 mon", at(2025, 1, 15, 0, 0), 2),
            [at(2025, 2, 3, 0, 0), at(2025, 2, 10, 0, 0)]
        );
        parse("0 0 29 2 *");
        parse("0 0 30,31 1-3 *");
    }

    // ----- errors -----

    #[test]
    fn wrong_field_counts() {
        assert_eq!(
            error("0 2 * *"),
            "expected 5 fields (minute hour day-of-month month day-of-week) but found 4; every \
             field is required; use `*` for \"any\""
        );
        assert_eq!(
            error("0 0 2 * * *"),
            "expected 5 fields (minute hour day-of-month month day-of-week) but found 6; \
             crontab(5) has no seconds or year field; if this is the seconds-first format of \
             Quartz or the `cron` crate, drop the seconds (and the year)"
        );
        assert!(error("0 0 9 ? * MON-FRI").contains("found 6; crontab(5) has no seconds"));
        assert!(error("0 0 9 * * 2-6 2026").contains("found 7; crontab(5) has no seconds"));
        assert!(error("0 2 * * * root").contains("found 6; give only the five time fields"));
        assert_eq!(
            error("0 2 * * * /usr/bin/hasync sync"),
            "expected 5 fields (minute hour day-of-month month day-of-week) but found 7; give \
             only the five time fields, without a user name or command"
        );
    }

    #[test]
    fn values_out_of_range() {
        assert_eq!(
            error("60 * * * *"),
            "minute field `60`: value out of range 0-59"
        );
        assert_eq!(
            error("* 24 * * *"),
            "hour field `24`: value out of range 0-23 (midnight is 0)"
        );
        assert_eq!(
            error("* * 0 * *"),
            "day-of-month field `0`: value out of range 1-31 (the first of the month is 1)"
        );
        assert_eq!(
            error("* * * 13 *"),
            "month field `13`: value out of range 1-12 (or jan-dec)"
        );
        assert_eq!(
            error("* * * * 8"),
            "day-of-week field `8`: value out of range 0-7 (0 and 7 are Sunday)"
        );
        assert_eq!(
            error("0,15,75 * * * *"),
            "minute field `0,15,75`, item `75`: value out of range 0-59"
        );
        assert_eq!(
            error("99999999999 * * * *"),
            "minute field `99999999999`: value out of range 0-59"
        );
        assert_eq!(
            error("0-60/5 * * * *"),
            "minute field `0-60/5`: value out of range 0-59"
        );
    }

    #[test]
    fn backwards_range() {
        assert_eq!(
            error("5-1 * * * *"),
            "minute field `5-1`: range runs backwards and cron ranges do not wrap around; \
             write `5-59,0-1`"
        );
        assert_eq!(
            error("0 22-2 * * *"),
            "hour field `22-2`: range runs backwards and cron ranges do not wrap around; \
             write `22-23,0-2`"
        );
        assert_eq!(
            error("0 0 * * sat-mon"),
            "day-of-week field `sat-mon`: range runs backwards and cron ranges do not wrap \
             around; write `6-7,1`"
        );
    }

    #[test]
    fn bad_steps() {
        assert_eq!(
            error("*/0 * * * *"),
            "minute field `*/0`: step must be a whole number of at least 1"
        );
        assert_eq!(
            error("*/x * * * *"),
            "minute field `*/x`: step must be a whole number of at least 1"
        );
        assert_eq!(
            error("*/ * * * *"),
            "minute field `*/`: step must be a whole number of at least 1"
        );
        assert_eq!(
            error("*/90 * * * *"),
            "minute field `*/90`: step 90 is larger than the range 0-59, so only 0 would match \
             (steps restart every hour); write `0` if that is what you mean"
        );
        assert_eq!(
            error("0 */24 * * *"),
            "hour field `*/24`: step 24 is larger than the range 0-23, so only 0 would match \
             (steps restart every day); write `0` if that is what you mean"
        );
        assert_eq!(
            error("5/15 * * * *"),
            "minute field `5/15`: a step needs `*` or a range before it (crontab rejects \
             `5/15`); write `5-59/15`"
        );
        // The largest steps that still select two values are fine.
        assert_eq!(parse("*/59 * * * *").minutes, 1 | 1 << 59);
        assert_eq!(parse("0 0 * * */7").days_of_week, 1);
    }

    #[test]
    fn bad_names() {
        assert_eq!(
            error("* * * * funday"),
            "day-of-week field `funday`: unknown day name; use 0-7 or sun, mon, tue, wed, thu, \
             fri, sat"
        );
        assert_eq!(
            error("* * * * monday"),
            "day-of-week field `monday`: unknown day name; use 0-7 or sun, mon, tue, wed, thu, \
             fri, sat (names are three letters: `mon`)"
        );
        assert_eq!(
            error("* * * sept *"),
            "month field `sept`: unknown month name; use 1-12 or jan, feb, mar, apr, may, jun, \
             jul, aug, sep, oct, nov, dec (names are three letters: `sep`)"
        );
        assert_eq!(
            error("* * * mon *"),
            "month field `mon`: that is a day-of-week name, but this field takes months (1-12 \
             or jan-dec)"
        );
        assert_eq!(
            error("* * * * jan"),
            "day-of-week field `jan`: that is a month name, but this field takes days of the \
             week (0-7 or sun-sat)"
        );
        assert_eq!(
            error("mon * * * *"),
            "minute field `mon`: names are only allowed in the month and day-of-week fields; \
             use a number in 0-59"
        );
    }

    #[test]
    fn malformed_items() {
        assert_eq!(
            error("1,,2 * * * *"),
            "minute field `1,,2`: empty list item; remove the doubled or trailing comma"
        );
        assert_eq!(
            error("* 1, * * *"),
            "hour field `1,`: empty list item; remove the doubled or trailing comma"
        );
        for text in [
            "5x * * * *",
            "-5 * * * *",
            "1-2-3 * * * *",
            "*5 * * * *",
            "1.5 * * * *",
        ] {
            assert!(
                error(text).ends_with(
                    ": expected a number, a range `a-b`, a list `a,b` or a step `*/n` or `a-b/n`"
                ),
                "{text}: {}",
                error(text)
            );
        }
        assert_eq!(
            error("0 0 ? * MON"),
            "day-of-month field `?`: `?`, `L`, `W` and `#` belong to the Quartz cron dialect, \
             which crontab(5) does not have; use `*`, numbers, ranges and lists"
        );
        assert!(error("0 0 * * 5L").contains("Quartz"));
        assert!(error("0 0 * * 5#2").contains("Quartz"));
    }

    #[test]
    fn macros_errors() {
        assert_eq!(
            error("@reboot"),
            "`@reboot` runs once at boot and has no next run time, so it cannot schedule \
             replication cycles; use a time such as `@daily` or `0 2 * * *`"
        );
        assert_eq!(
            error("@fortnightly"),
            "unknown macro `@fortnightly`; use one of @yearly, @annually, @monthly, @weekly, \
             @daily, @midnight, @hourly"
        );
        assert_eq!(
            error("@Daily"),
            "unknown macro `@Daily`; macros are lower case, as in `@daily`"
        );
        assert_eq!(
            error("@daily 5"),
            "`@daily` stands for all five fields, so nothing may follow it (found `5`)"
        );
    }

    #[test]
    fn empty_schedule() {
        let expected = "empty schedule; write five fields (minute hour day-of-month month \
                        day-of-week) such as `0 2 * * *`, or a macro such as `@daily`";
        assert_eq!(error(""), expected);
        assert_eq!(error(" \t "), expected);
    }

    #[test]
    fn errors_read_well_after_a_location_prefix() {
        let text = "0 9 * * 8";
        let e = text.parse::<CronSchedule>().unwrap_err();
        assert_eq!(
            format!("config.toml:42:8: [schedule] cron = \"{text}\": {e}"),
            "config.toml:42:8: [schedule] cron = \"0 9 * * 8\": day-of-week field `8`: value \
             out of range 0-7 (0 and 7 are Sunday)"
        );
        assert!(matches!(
            e,
            CronError::Field {
                field: Field::DayOfWeek,
                problem: FieldProblem::OutOfRange { .. },
                ..
            }
        ));
    }

    // ----- time zones -----

    /// Central European time with the 2025 transitions only: CEST (+02:00) from
    /// 2025-03-30 01:00 UTC (02:00 local jumps to 03:00) until 2025-10-26 01:00 UTC (03:00
    /// local falls back to 02:00), CET (+01:00) otherwise.
    ///
    /// Local-to-UTC lookups copy the two bugs of chrono's `Local` on Unix that `earliest`
    /// works around: ambiguous times come later-first (chronotope/chrono#1625), and the
    /// transition instant counts on both sides, so 02:00 on 30 March is reported as existing
    /// (+01:00) and 03:00 on 26 October as ambiguous. UTC-to-local lookups are correct.
    #[derive(Debug, Clone, Copy)]
    struct Cet2025;

    impl Cet2025 {
        fn offset_at(utc: &NaiveDateTime) -> FixedOffset {
            let summer = at(2025, 3, 30, 1, 0) <= *utc && *utc < at(2025, 10, 26, 1, 0);
            FixedOffset::east_opt(if summer { 7200 } else { 3600 }).unwrap()
        }
    }

    impl TimeZone for Cet2025 {
        type Offset = FixedOffset;

        fn from_offset(_: &FixedOffset) -> Self {
            Cet2025
        }

        fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
            self.offset_from_local_datetime(&local.and_hms_opt(0, 0, 0).unwrap())
        }

        fn offset_from_local_datetime(
            &self,
            local: &NaiveDateTime,
        ) -> MappedLocalTime<FixedOffset> {
            let transitions = [at(2025, 3, 30, 1, 0), at(2025, 10, 26, 1, 0)];
            // Smaller offset (later instant) first, as `Local` does.
            let valid: Vec<FixedOffset> = [3600, 7200]
                .into_iter()
                .map(|s| FixedOffset::east_opt(s).unwrap())
                .filter(|o| {
                    let utc = *local - *o;
                    Self::offset_at(&utc) == *o || transitions.contains(&utc)
                })
                .collect();
            match valid.as_slice() {
                [] => MappedLocalTime::None,
                [o] => MappedLocalTime::Single(*o),
                [a, b, ..] => MappedLocalTime::Ambiguous(*a, *b),
            }
        }

        fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
            Self::offset_at(&utc.and_hms_opt(0, 0, 0).unwrap())
        }

        fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
            Self::offset_at(utc)
        }
    }

    /// A local time that exists exactly once in the test zone.
    fn cet(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Cet2025> {
        Cet2025
            .from_local_datetime(&at(y, mo, d, h, mi))
            .single()
            .unwrap()
    }

    /// The instant `h:mi` UTC, shown in the test zone.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Cet2025> {
        Cet2025.from_utc_datetime(&at(y, mo, d, h, mi))
    }

    fn runs_in_zone(text: &str, after: DateTime<Cet2025>, n: usize) -> Vec<DateTime<Cet2025>> {
        let schedule = parse(text);
        let mut out = Vec::new();
        let mut cursor = after;
        for _ in 0..n {
            cursor = schedule
                .next_after_in(&cursor)
                .expect("schedule should run");
            out.push(cursor);
        }
        out
    }

    #[test]
    fn test_zone_is_what_the_tests_assume() {
        // The copied `Local` boundary bugs.
        assert_eq!(
            Cet2025.from_local_datetime(&at(2025, 3, 30, 2, 0)),
            MappedLocalTime::Single(utc(2025, 3, 30, 1, 0))
        );
        assert_eq!(
            Cet2025.from_local_datetime(&at(2025, 10, 26, 3, 0)),
            MappedLocalTime::Ambiguous(utc(2025, 10, 26, 2, 0), utc(2025, 10, 26, 1, 0))
        );
        let in_gap = Cet2025.from_local_datetime(&at(2025, 3, 30, 2, 30));
        assert_eq!(in_gap, MappedLocalTime::None);
        assert_eq!(cet(2025, 3, 30, 3, 0), utc(2025, 3, 30, 1, 0));
        assert_eq!(
            Cet2025.from_local_datetime(&at(2025, 10, 26, 2, 30)),
            MappedLocalTime::Ambiguous(utc(2025, 10, 26, 1, 30), utc(2025, 10, 26, 0, 30))
        );
    }

    #[test]
    fn spring_gap_fixed_time_runs_when_the_clock_jumps() {
        // 02:30 does not exist on 30 March; the run happens at 03:00 CEST, as in cronie.
        assert_eq!(
            runs_in_zone("30 2 * * *", cet(2025, 3, 29, 12, 0), 3),
            [
                cet(2025, 3, 30, 3, 0),
                cet(2025, 3, 31, 2, 30),
                cet(2025, 4, 1, 2, 30)
            ]
        );
        // Two skipped matches collapse into one run.
        assert_eq!(
            runs_in_zone("0,30 2 * * *", cet(2025, 3, 30, 1, 0), 2),
            [cet(2025, 3, 30, 3, 0), cet(2025, 3, 31, 2, 0)]
        );
        // A caught-up run and a regular one at the same instant are one run.
        assert_eq!(
            runs_in_zone("30 2,3 * * *", cet(2025, 3, 30, 1, 0), 3),
            [
                cet(2025, 3, 30, 3, 0),
                cet(2025, 3, 30, 3, 30),
                cet(2025, 3, 31, 2, 30)
            ]
        );
    }

    #[test]
    fn spring_gap_wildcard_schedules_skip_missing_times() {
        assert_eq!(
            runs_in_zone("*/30 * * * *", cet(2025, 3, 30, 1, 15), 3),
            [
                cet(2025, 3, 30, 1, 30),
                cet(2025, 3, 30, 3, 0),
                cet(2025, 3, 30, 3, 30)
            ]
        );
        // `*` in the minute field: not a fixed-time job, so 30 March has no run at all.
        assert_eq!(
            runs_in_zone("*/15 2 * * *", cet(2025, 3, 30, 0, 0), 1),
            [cet(2025, 3, 31, 2, 0)]
        );
    }

    #[test]
    fn autumn_overlap_runs_at_the_earlier_time_only() {
        // 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET).
        assert_eq!(
            runs_in_zone("30 2 * * *", cet(2025, 10, 26, 0, 0), 2),
            [utc(2025, 10, 26, 0, 30), cet(2025, 10, 27, 2, 30)]
        );
        // Hourly: 02:00 CEST, then 03:00 CET; the repeated 02:00 CET is not run again.
        assert_eq!(
            runs_in_zone("0 * * * *", cet(2025, 10, 26, 1, 30), 2),
            [utc(2025, 10, 26, 0, 0), utc(2025, 10, 26, 2, 0)]
        );
        // Starting inside the repeated hour: its times already ran, so the next is 03:00.
        assert_eq!(
            runs_in_zone("*/15 * * * *", utc(2025, 10, 26, 1, 10), 1),
            [utc(2025, 10, 26, 2, 0)] // 03:00 CET
        );
        assert_eq!(
            runs_in_zone("30 2 * * *", utc(2025, 10, 26, 1, 10), 1),
            [cet(2025, 10, 27, 2, 30)]
        );
    }

    #[test]
    fn transition_instants_are_read_correctly() {
        // 02:00 on 30 March does not exist: the fixed-time run is at 03:00 CEST and says so.
        let run = parse("0 2 * * *")
            .next_after_in(&cet(2025, 3, 30, 0, 0))
            .unwrap();
        assert_eq!(run.to_rfc3339(), "2025-03-30T03:00:00+02:00");
        // Hourly across the gap: 01:00 CET, then 03:00 CEST (not a phantom 02:00 +01:00).
        let runs: Vec<String> = runs_in_zone("0 * * * *", cet(2025, 3, 30, 0, 30), 3)
            .iter()
            .map(DateTime::to_rfc3339)
            .collect();
        assert_eq!(
            runs,
            [
                "2025-03-30T01:00:00+01:00",
                "2025-03-30T03:00:00+02:00",
                "2025-03-30T04:00:00+02:00"
            ]
        );
        // 03:00 on 26 October exists once, as CET; not at 01:00 UTC (the repeated 02:00).
        let run = parse("0 3 * * *")
            .next_after_in(&cet(2025, 10, 26, 0, 0))
            .unwrap();
        assert_eq!(run.to_rfc3339(), "2025-10-26T03:00:00+01:00");
    }

    #[test]
    fn local_zone_runs_are_in_order_and_after_the_start() {
        let now = Local::now();
        let upcoming = parse("*/7 * * * *").upcoming(now, 20);
        assert_eq!(upcoming.len(), 20);
        assert!(upcoming[0] > now);
        assert!(upcoming.windows(2).all(|w| w[0] < w[1]));
        let on_schedule = |t: &DateTime<Local>| t.minute() % 7 == 0 && t.second() == 0;
        assert!(upcoming.iter().all(on_schedule));
        let daily = parse("0 3 * * *");
        assert_eq!(
            daily.next_after_local(now),
            daily.upcoming(now, 1).first().copied()
        );
        assert!(parse("@daily").upcoming(now, 0).is_empty());
    }
}
