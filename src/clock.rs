//! Wall-clock time as relay records it (milliseconds since the Unix epoch) and as it shows it
//! to people (RFC 3339, and how long ago or ahead). The lowest layer: it imports nothing of
//! the crate.

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A unix-ms instant as RFC 3339 in UTC, to the second: `2026-12-02T17:48:09Z`.
pub fn rfc3339(unix_ms: u64) -> String {
    // RFC 3339 ends with year 9999, and times can come from untrusted codes.
    const LAST_MS: u64 = 253_402_300_799_000;
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.min(LAST_MS));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// How far `then_ms` is from `now_ms`, in the largest unit that fits: "in 23 h", "5 min ago",
/// "12 s ago", "just now".
pub fn relative(then_ms: u64, now_ms: u64) -> String {
    let (secs, future) = if then_ms > now_ms {
        ((then_ms - now_ms) / 1000, true)
    } else {
        ((now_ms - then_ms) / 1000, false)
    };
    let amount = match secs {
        0 => return "just now".to_owned(),
        1..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=172_799 => format!("{} h", secs / 3600),
        172_800..=63_071_999 => format!("{} d", secs / 86_400),
        // Julian years: close enough for "when does this certificate end".
        _ => format!("{} y", secs / 31_557_600),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// An instant for humans: RFC 3339 and how far it is, `2026-12-02T17:48:09Z (5 min ago)`.
pub fn when(then_ms: u64, now_ms: u64) -> String {
    format!("{} ({})", rfc3339(then_ms), relative(then_ms, now_ms))
}

/// How long ago `then_ms` was, as "12 s ago" (see [`relative`]).
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    relative(then_ms.min(now_ms), now_ms)
}
