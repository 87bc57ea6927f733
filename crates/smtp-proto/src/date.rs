//! Dates in the form mail headers use (RFC 5322 §3.3), from Unix time, with no
//! calendar library: the Received header, bounces' Date fields and `tsubame spool
//! inspect` all come through here.

const MILLISECONDS_PER_SECOND: u64 = 1000;
const SECONDS_PER_MINUTE: u64 = 60;
const SECONDS_PER_HOUR: u64 = 3600;
const SECONDS_PER_DAY: u64 = 86_400;
/// Days from 0000-03-01 to 1970-01-01 in the proleptic Gregorian calendar: the civil
/// date computation counts from a 1 March so that the leap day ends its year.
const DAYS_FROM_MARCH_0000_TO_EPOCH: u64 = 719_468;
/// Days in a 400-year Gregorian cycle, which repeats exactly.
const DAYS_PER_400_YEARS: u64 = 146_097;
/// 1970-01-01 was a Thursday; index 4 of [`WEEKDAY_NAMES`].
const EPOCH_WEEKDAY: u64 = 4;
const WEEKDAY_NAMES: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
/// Month names from March, the first month of the computation's year.
const MONTH_NAMES_FROM_MARCH: [&str; 12] = [
    "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "Jan", "Feb",
];

/// `unix_ms` as an RFC 5322 §3.3 date-time in UTC, e.g. `Thu, 01 Jan 1970 00:00:00
/// +0000`. Milliseconds are dropped. Every `u64` is accepted; years past 9999 get more
/// digits (the grammar's `4*DIGIT` allows them).
pub fn rfc5322_date(unix_ms: u64) -> String {
    let seconds = unix_ms / MILLISECONDS_PER_SECOND;
    let days = seconds / SECONDS_PER_DAY;
    let second_of_day = seconds % SECONDS_PER_DAY;
    let weekday = WEEKDAY_NAMES[((days + EPOCH_WEEKDAY) % 7) as usize];
    let date = CivilDate::from_days_since_epoch(days);
    format!(
        "{weekday}, {:02} {} {:04} {:02}:{:02}:{:02} +0000",
        date.day,
        date.month_name,
        date.year,
        second_of_day / SECONDS_PER_HOUR,
        second_of_day % SECONDS_PER_HOUR / SECONDS_PER_MINUTE,
        second_of_day % SECONDS_PER_MINUTE,
    )
}

/// `unix_ms` as an RFC 3339 date-time in UTC with milliseconds,
/// `2026-11-26T06:30:37.123Z`: the delivery log's and `spool inspect`'s time stamps.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let seconds = unix_ms / MILLISECONDS_PER_SECOND;
    let second_of_day = seconds % SECONDS_PER_DAY;
    let date = CivilDate::from_days_since_epoch(seconds / SECONDS_PER_DAY);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        date.year,
        date.month,
        date.day,
        second_of_day / SECONDS_PER_HOUR,
        second_of_day % SECONDS_PER_HOUR / SECONDS_PER_MINUTE,
        second_of_day % SECONDS_PER_MINUTE,
        unix_ms % MILLISECONDS_PER_SECOND
    )
}

/// Parses an RFC 3339 date-time (`2026-11-26T06:30:37Z`, `…T15:30:37.5+09:00`, `t`
/// and a space accepted for `T`) or a bare date (`2026-11-26`, midnight UTC) into Unix
/// milliseconds. `None` for anything else, dates before 1970 included. Fractions
/// beyond milliseconds are dropped; a leap second (`:60`) counts as the next second.
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u64> {
        let digits = bytes.get(range)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    if bytes.get(4) != Some(&b'-') || bytes.get(7) != Some(&b'-') {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let days = CivilDate::days_since_epoch(year, month, day)?;
    let mut unix_ms = days.checked_mul(SECONDS_PER_DAY * MILLISECONDS_PER_SECOND)?;
    if bytes.len() == 10 {
        return Some(unix_ms);
    }
    if !matches!(bytes.get(10), Some(b'T' | b't' | b' '))
        || bytes.get(13) != Some(&b':')
        || bytes.get(16) != Some(&b':')
    {
        return None;
    }
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    unix_ms +=
        (hour * SECONDS_PER_HOUR + minute * SECONDS_PER_MINUTE + second) * MILLISECONDS_PER_SECOND;
    let mut rest = bytes.get(19..)?;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        let mut milliseconds = 0;
        for position in 0..3 {
            let digit = fraction.get(position).filter(|_| position < digits);
            milliseconds = milliseconds * 10 + digit.map_or(0, |digit| u64::from(digit - b'0'));
        }
        unix_ms += milliseconds;
        rest = fraction.get(digits..)?;
    }
    match rest {
        [b'Z' | b'z'] => Some(unix_ms),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let offset_text = [*h1, *h2, *m1, *m2];
            if !offset_text.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let hours = u64::from(h1 - b'0') * 10 + u64::from(h2 - b'0');
            let minutes = u64::from(m1 - b'0') * 10 + u64::from(m2 - b'0');
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset_ms =
                (hours * SECONDS_PER_HOUR + minutes * SECONDS_PER_MINUTE) * MILLISECONDS_PER_SECOND;
            // Local time = UTC + offset, so UTC = local - offset.
            if *sign == b'+' {
                unix_ms.checked_sub(offset_ms)
            } else {
                unix_ms.checked_add(offset_ms)
            }
        }
        _ => None,
    }
}

/// A proleptic Gregorian calendar date in UTC. The one calendar conversion of the
/// workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilDate {
    pub year: u64,
    /// 1..=12.
    pub month: u64,
    pub month_name: &'static str,
    /// 1..=31.
    pub day: u64,
}

impl CivilDate {
    /// The date `days` after 1970-01-01.
    ///
    /// Counts in 400-year cycles from 0000-03-01, with years that start on 1 March so the
    /// leap day is the last day of its year; the method is the one Howard Hinnant
    /// describes in "chrono-Compatible Low-Level Date Algorithms" (civil_from_days),
    /// restricted to dates after the epoch so everything stays unsigned. No overflow:
    /// `u64::MAX` milliseconds is about 2.1e11 days.
    pub fn from_days_since_epoch(days: u64) -> CivilDate {
        let days_since_march_0000 = days + DAYS_FROM_MARCH_0000_TO_EPOCH;
        let cycle = days_since_march_0000 / DAYS_PER_400_YEARS;
        // 0..=146_096
        let day_of_cycle = days_since_march_0000 % DAYS_PER_400_YEARS;
        // Taking out one day per 4-year block (1460 days), putting one back per century
        // (36 524 days) and taking out the cycle's very last day leaves a count that
        // divided by 365 gives the year of the cycle: 0..=399.
        let year_of_cycle = (day_of_cycle - day_of_cycle / 1460 + day_of_cycle / 36_524
            - day_of_cycle / (DAYS_PER_400_YEARS - 1))
            / 365;
        // 0..=365, 0 = 1 March.
        let day_of_year =
            day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100);
        // Months from March alternate 31 and 30 days in a 153-day five-month pattern;
        // 0..=11 because day_of_year <= 365 gives (5 * 365 + 2) / 153 = 11.
        let month_from_march = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
        // January and February belong to the next calendar year.
        let year = cycle * 400 + year_of_cycle + u64::from(month_from_march >= 10);
        CivilDate {
            year,
            month: if month_from_march < 10 {
                month_from_march + 3
            } else {
                month_from_march - 9
            },
            month_name: MONTH_NAMES_FROM_MARCH[month_from_march as usize],
            day,
        }
    }
}

impl CivilDate {
    /// Days from 1970-01-01 to `year`-`month`-`day`; `None` for an impossible date
    /// (30 February) or one before the epoch. The inverse of
    /// [`CivilDate::from_days_since_epoch`] (Hinnant's days_from_civil).
    pub fn days_since_epoch(year: u64, month: u64, day: u64) -> Option<u64> {
        let leap =
            year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
        let month_days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        if day == 0 || day > month_days {
            return None;
        }
        // Years start on 1 March, as in `from_days_since_epoch`.
        let year_from_march = if month <= 2 {
            year.checked_sub(1)?
        } else {
            year
        };
        let cycle = year_from_march / 400;
        let year_of_cycle = year_from_march % 400;
        let month_from_march = if month > 2 { month - 3 } else { month + 9 };
        let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
        let day_of_cycle =
            year_of_cycle * 365 + year_of_cycle / 4 - year_of_cycle / 100 + day_of_year;
        (cycle * DAYS_PER_400_YEARS + day_of_cycle).checked_sub(DAYS_FROM_MARCH_0000_TO_EPOCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_parses_offsets() {
        let table: &[(&str, Option<u64>)] = &[
            ("1970-01-01", Some(0)),
            ("1970-01-01T00:00:00.000Z", Some(0)),
            ("2000-02-29T00:00:00Z", Some(951_782_400_000)),
            ("2024-02-29T12:34:56.789Z", Some(1_709_210_096_789)),
            ("2024-02-29 21:34:56.7891+09:00", Some(1_709_210_096_789)),
            ("2024-02-29T07:34:56.789-05:00", Some(1_709_210_096_789)),
            ("2100-03-01", Some(4_107_542_400_000)),
            ("2023-02-29", None),
            ("1969-12-31", None),
            ("2024-13-01", None),
            ("2024-01-01T24:00:00Z", None),
            ("2024-01-01T00:00:00", None),
            ("2024-01-01T00:00:00.Z", None),
            ("2024-1-01", None),
            ("yesterday", None),
        ];
        for &(text, expected) in table {
            assert_eq!(parse_rfc3339_ms(text), expected, "{text}");
        }
        for unix_ms in [
            0,
            999,
            951_782_400_000,
            1_709_210_096_789,
            253_402_300_799_999,
        ] {
            assert_eq!(parse_rfc3339_ms(&rfc3339_ms(unix_ms)), Some(unix_ms));
        }
        assert_eq!(rfc3339_ms(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        // Every day to past 2500 converts back to itself.
        for days in 0..200_000 {
            let date = CivilDate::from_days_since_epoch(days);
            assert_eq!(
                CivilDate::days_since_epoch(date.year, date.month, date.day),
                Some(days),
                "{date:?}"
            );
        }
    }

    #[test]
    fn dates_match_known_values() {
        // Expected values from GNU date -u; they cover the epoch, leap days in a year
        // divisible by 400 and by 4, the non-leap century 2100, the last second of a
        // century and of year 9999, dropped milliseconds, and years past 9999.
        let table: &[(u64, &str)] = &[
            (0, "Thu, 01 Jan 1970 00:00:00 +0000"),
            (999, "Thu, 01 Jan 1970 00:00:00 +0000"),
            (86_399_999, "Thu, 01 Jan 1970 23:59:59 +0000"),
            (951_782_400_000, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (1_234_567_890_000, "Fri, 13 Feb 2009 23:31:30 +0000"),
            (1_709_210_096_000, "Thu, 29 Feb 2024 12:34:56 +0000"),
            (4_102_444_799_000, "Thu, 31 Dec 2099 23:59:59 +0000"),
            (4_107_542_400_000, "Mon, 01 Mar 2100 00:00:00 +0000"),
            (253_402_300_799_000, "Fri, 31 Dec 9999 23:59:59 +0000"),
            // u64::MAX ms; expected from Python: the remainder of the 400-year cycles as a
            // datetime date, plus 400 years per cycle (the calendar repeats exactly).
            (u64::MAX, "Wed, 03 Apr 584556019 14:25:51 +0000"),
        ];
        for &(unix_ms, expected) in table {
            assert_eq!(rfc5322_date(unix_ms), expected, "{unix_ms} ms");
        }
    }

    #[test]
    fn civil_dates_match_a_day_by_day_calendar() {
        // An independent oracle: walk two full 400-year cycles a day at a time with the
        // leap-year rule written out, and compare every day.
        let month_lengths = |year: u64| {
            let leap =
                (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
            [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ]
        };
        let names = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let (mut year, mut month, mut day) = (1970_u64, 0_usize, 1_u64);
        for days in 0..2 * DAYS_PER_400_YEARS {
            let date = CivilDate::from_days_since_epoch(days);
            assert_eq!(
                (date.year, date.month_name, date.day),
                (year, names[month], day),
                "day {days}"
            );
            day += 1;
            if day > month_lengths(year)[month] {
                day = 1;
                month += 1;
                if month == 12 {
                    month = 0;
                    year += 1;
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_any_text_never_panics(text in "\\PC{0,40}") {
            let _ = parse_rfc3339_ms(&text);
        }

        #[test]
        fn near_misses_never_panic(
            text in "[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,12})?([Zz]|[+-][0-9]{2}:[0-9]{2})?)?"
        ) {
            let _ = parse_rfc3339_ms(&text);
        }

        #[test]
        fn what_is_written_parses_back(unix_ms in 0u64..253_402_300_799_999) {
            proptest::prop_assert_eq!(parse_rfc3339_ms(&rfc3339_ms(unix_ms)), Some(unix_ms));
        }
    }
}
