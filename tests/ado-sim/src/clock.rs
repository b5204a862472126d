//! Timestamps as Azure DevOps prints them (`2024-05-01T10:02:03.45Z`), and the few date forms
//! its query parameters and WIQL accept. Pure, no time crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The "end of time" Azure DevOps writes as the revised date of a current revision.
pub const END_OF_TIME: &str = "9999-01-01T00:00:00Z";

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats like the service: UTC, `Z`, fractional seconds without trailing zeros.
pub fn format(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, frac) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    let mut out = format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
    if frac != 0 {
        let f = format!("{frac:03}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// A parsed date: its instant and whether a time of day was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Milliseconds since the epoch (UTC).
    pub ms: i64,
    /// A time part was present (WIQL refuses it without `timePrecision`).
    pub has_time: bool,
}

/// Parses `YYYY-MM-DD`, optionally `THH:MM[:SS[.fff]]` and `Z` or `±HH:MM`.
pub fn parse(s: &str) -> Option<Parsed> {
    let s = s.trim();
    let (date, time) = match s.find(['T', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut ms = days_from_civil(y, m, d) * 86_400_000;
    let Some(time) = time else {
        return Some(Parsed { ms, has_time: false });
    };
    let (clock, offset_min) = if let Some(t) = time.strip_suffix('Z') {
        (t, 0)
    } else if let Some(i) = time.rfind(['+', '-']) {
        let (t, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let mut o = off[1..].split(':');
        let oh: i64 = o.next()?.parse().ok()?;
        let om: i64 = o.next().unwrap_or("0").parse().ok()?;
        (t, sign * (oh * 60 + om))
    } else {
        (time, 0)
    };
    let mut c = clock.split(':');
    let h: i64 = c.next()?.parse().ok()?;
    let mi: i64 = c.next()?.parse().ok()?;
    let sec = c.next().unwrap_or("0");
    let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let s: i64 = whole.parse().ok()?;
    let frac_ms: i64 = if frac.is_empty() {
        0
    } else {
        format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?
    };
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    ms += ((h * 60 + mi - offset_min) * 60 + s) * 1000 + frac_ms;
    Some(Parsed { ms, has_time: true })
}

/// Start of the UTC day containing `ms`.
pub fn day_start(ms: i64) -> i64 {
    ms.div_euclid(86_400_000) * 86_400_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_service() {
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(1_507_251_891_570), "2017-10-06T01:04:51.57Z");
    }

    #[test]
    fn parses_what_it_formats_and_date_only_forms() {
        for ms in [0, 1_507_251_891_570, 1_700_000_000_001] {
            assert_eq!(parse(&format(ms)).map(|p| p.ms), Some(ms));
        }
        let d = parse("2017-10-06").unwrap();
        assert!(!d.has_time);
        assert_eq!(d.ms, day_start(1_507_251_891_570));
        assert_eq!(parse("2017-10-06T03:04:51.57+02:00").unwrap().ms, 1_507_251_891_570);
        assert!(parse("yesterday").is_none());
    }
}
