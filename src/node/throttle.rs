//! Keeps what strangers send out of the log in bulk: unauthenticated text is shown bounded
//! and escaped, and refusals are logged at most so many a minute, then summed up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most characters of unauthenticated text shown in a log line.
pub const MAX_LOGGED_CHARS: usize = 64;
/// Refusals logged per [`LOG_WINDOW`]; the rest are counted and summed up.
pub const REFUSALS_PER_WINDOW: u32 = 10;
/// The window of [`REFUSALS_PER_WINDOW`].
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

/// Unauthenticated text for a log line: at most `max` characters, control and non-ASCII
/// characters escaped, and its length in bytes when it was cut.
pub fn untrusted(text: &str, max: usize) -> String {
    let mut shown = String::new();
    let mut cut = false;
    for (count, c) in text.chars().enumerate() {
        if count == max {
            cut = true;
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            shown.push(c);
        } else {
            shown.extend(c.escape_default());
        }
    }
    if cut {
        format!("{shown}… ({} bytes)", text.len())
    } else {
        shown
    }
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; first say that `suppressed` refusals before it went unlogged.
    Log {
        /// Refusals not logged since the last logged one.
        suppressed: u64,
    },
    /// Count it, log nothing.
    Quiet,
}

struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// At most `per_window` log lines per `window`; the first line of a later window carries the
/// number suppressed meanwhile.
pub struct LogThrottle {
    per_window: u32,
    window: Duration,
    state: Mutex<Window>,
}

impl LogThrottle {
    /// A throttle of `per_window` lines per `window`.
    pub const fn new(per_window: u32, window: Duration) -> LogThrottle {
        LogThrottle {
            per_window,
            window,
            state: Mutex::new(Window {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Decides about one event at `now`.
    pub fn check(&self, now: Instant) -> Verdict {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let expired = w
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if expired {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < self.per_window {
            w.logged += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            Verdict::Log { suppressed }
        } else {
            w.suppressed += 1;
            Verdict::Quiet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_is_bounded_escaped_and_measured() {
        assert_eq!(untrusted("0123abcd", 64), "0123abcd");
        let flood = "A".repeat(16 * 1024);
        let shown = untrusted(&flood, MAX_LOGGED_CHARS);
        assert_eq!(shown, format!("{}… (16384 bytes)", "A".repeat(64)));
        assert_eq!(untrusted("a\nb\x1b[31m\u{202e}", 64), "a\\nb\\u{1b}[31m\\u{202e}");
    }

    #[test]
    fn a_flood_of_refusals_logs_n_lines_a_window_then_one_summary() {
        let throttle = LogThrottle::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let first: Vec<Verdict> = (0..1000)
            .map(|i| throttle.check(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(first.iter().filter(|v| matches!(v, Verdict::Log { .. })).count(), 3);
        assert!(first[..3].iter().all(|v| *v == Verdict::Log { suppressed: 0 }));
        // The next window's first line says how many went unlogged.
        assert_eq!(
            throttle.check(t0 + Duration::from_secs(61)),
            Verdict::Log { suppressed: 997 }
        );
        assert_eq!(
            throttle.check(t0 + Duration::from_secs(62)),
            Verdict::Log { suppressed: 0 }
        );
    }
}
