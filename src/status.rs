//! What each side reports about its connections: live health counters and the status records
//! printed by `relay status` and `relay node connections`.

pub use crate::clock::{ago, now_ms, relative, rfc3339, when};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use crate::metrics::Histogram;
use crate::store::{DeadLetter, QueueStats};

/// Live counters of one connection, shared by its tasks.
#[derive(Debug, Default)]
pub struct Health {
    /// Last successful exchange with the peer (unix ms, 0 = never).
    pub last_contact_ms: AtomicU64,
    /// Messages handed to the local webhook.
    pub delivered: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Failed delivery or transport attempts.
    pub failures: AtomicU64,
    /// Reconnects to the peer.
    pub reconnects: AtomicU64,
    /// Messages sent to the peer.
    pub sent: AtomicU64,
    /// Messages received from the peer.
    pub received: AtomicU64,
    /// Payload bytes sent to the peer.
    pub bytes_sent: AtomicU64,
    /// Payload bytes received from the peer.
    pub bytes_received: AtomicU64,
    /// Payload bytes delivered to the webhook.
    pub bytes_delivered: AtomicU64,
    /// Round trips of exchanges with the peer that did not wait (pushes, polls answered with
    /// messages or asked to answer at once).
    pub round_trip: Histogram,
    /// Webhook request durations.
    pub webhook_latency: Histogram,
    last_error: Mutex<Option<LastError>>,
    /// Conditions that hold this connection's work until they clear, by what holds it
    /// (e.g. "webhook", "credential"): shown by status and `/readyz`.
    holds: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

/// The most recent problem, with when it happened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastError {
    /// When (unix ms).
    pub at_ms: u64,
    /// What.
    pub message: String,
}

impl Health {
    /// Records a successful exchange with the peer.
    pub fn contact(&self) {
        self.last_contact_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Records a problem.
    pub fn error(&self, message: impl Into<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastError {
            at_ms: now_ms(),
            message: message.into(),
        });
    }

    /// The last problem; kept after recovery (with its time) so an operator can see what
    /// happened while nobody was looking.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Holds work for `reason` (also the last error); true when that is news (not held, or
    /// held for another reason), so callers log once per change.
    pub fn hold(&self, what: &'static str, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        self.error(reason.clone());
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.insert(what, reason.clone()).as_ref() != Some(&reason)
    }

    /// Clears the hold of `what`; true when there was one.
    pub fn release(&self, what: &'static str) -> bool {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(what)
            .is_some()
    }

    /// Why work is held, if it is.
    pub fn holds(&self) -> Vec<String> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One connection as `relay status` / `relay node connections` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// Connection name on this side.
    pub name: String,
    /// `pending`, `active`, `deactivated`, `revoked`.
    pub state: String,
    /// This side's instance name.
    pub local: String,
    /// The other side: instance name and host, or `unknown` while pending.
    pub remote: String,
    /// Description.
    pub description: String,
    /// Configuration mode.
    pub mode: String,
    /// Project for incoming sync on this side.
    pub project: String,
    /// Webhook for incoming payloads.
    pub deliver_to: Option<String>,
    /// Last exchange with the peer (unix ms).
    pub last_contact_ms: Option<u64>,
    /// Payloads waiting to go to the peer.
    pub outbound: QueueStats,
    /// Payloads received and waiting for the webhook.
    pub inbound: QueueStats,
    /// The most recent problem.
    pub last_error: Option<LastError>,
    /// Invitation expiry (unix s), while pending.
    pub invitation_expires_at: Option<u64>,
    /// How the peer's certificate is trusted (agent).
    #[serde(default)]
    pub trust: Option<String>,
    /// How the peer is reached: direct or via which proxy (agent).
    #[serde(default)]
    pub route: Option<String>,
    /// The most recent dead letters (up to [`RECENT_DEAD_LETTERS`]), oldest first.
    #[serde(default)]
    pub recent_dead_letters: Vec<DeadLetter>,
    /// What holds work on this connection and why (an unknown credential, a sequence conflict,
    /// a webhook that refuses everyone); empty while everything flows.
    #[serde(default)]
    pub holds: Vec<String>,
    /// Script mode: twins, last sync each way, watermark, errors (a side with a tracker).
    #[serde(default)]
    pub sync: Option<crate::sync::state::SyncSummary>,
}

/// How many dead letters a status shows in detail.
pub const RECENT_DEAD_LETTERS: usize = 10;

/// Readiness problems of a connection's queues: the oldest message older than `max_age`.
pub fn stale_queues(s: &ConnectionStatus, max_age: std::time::Duration) -> Vec<String> {
    let now = now_ms();
    [("outbound", &s.outbound), ("inbound", &s.inbound)]
        .into_iter()
        .filter_map(|(dir, q)| {
            let oldest = q.oldest_enqueued_ms?;
            (now.saturating_sub(oldest) > max_age.as_millis() as u64).then(|| {
                format!(
                    "{}: oldest {dir} message queued {} (limit {})",
                    s.name,
                    ago(oldest, now),
                    humantime::format_duration(max_age)
                )
            })
        })
        .collect()
}

/// Human-readable table of connections.
pub fn render(list: &[ConnectionStatus]) -> String {
    use std::fmt::Write;
    if list.is_empty() {
        return "no connections\n".to_owned();
    }
    let now = now_ms();
    let mut out = String::new();
    for c in list {
        let _ = writeln!(out, "{}  [{}]", c.name, c.state);
        let _ = writeln!(out, "  local:        {}", c.local);
        let _ = writeln!(out, "  remote:       {}", c.remote);
        if !c.description.is_empty() {
            let _ = writeln!(out, "  description:  {}", c.description);
        }
        let _ = writeln!(
            out,
            "  mode:         {}   project: {}",
            c.mode,
            if c.project.is_empty() { "-" } else { &c.project }
        );
        let deliver_to = match (&c.sync, c.deliver_to.as_deref()) {
            (Some(_), _) => "this side's tracker (Script mode)",
            (None, Some(url)) => url,
            (None, None) => "(none: incoming payloads are held)",
        };
        let _ = writeln!(out, "  deliver to:   {deliver_to}");
        if let Some(trust) = &c.trust {
            let _ = writeln!(out, "  trust:        {trust}");
        }
        if let Some(route) = &c.route {
            let _ = writeln!(out, "  route:        {route}");
        }
        let contact = c
            .last_contact_ms
            .map(|t| when(t, now))
            .unwrap_or_else(|| "never".into());
        let _ = writeln!(out, "  last contact: {contact}");
        for (label, q) in [("outbound", &c.outbound), ("inbound", &c.inbound)] {
            let oldest = q
                .oldest_enqueued_ms
                .map(|t| format!(", oldest {}", ago(t, now)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {label:<9}     {} queued ({} bytes){oldest}, {} dead letters",
                q.depth, q.bytes, q.dead_letters
            );
        }
        if let Some(exp) = c.invitation_expires_at {
            let _ = writeln!(out, "  invitation:   expires {}", when(exp.saturating_mul(1000), now));
        }
        for d in &c.recent_dead_letters {
            let _ = writeln!(
                out,
                "  dead letter:  seq {} id {} ({} bytes, {}): {}",
                d.seq,
                d.id,
                d.bytes,
                when(d.dead_at_ms, now),
                d.reason
            );
        }
        if let Some(s) = &c.sync {
            let at = |t: Option<u64>| t.map(|t| when(t, now)).unwrap_or_else(|| "never".into());
            let _ = writeln!(
                out,
                "  sync:         {} twins, last sent {}, last applied {}, feed read {}, {} errors",
                s.twins,
                at(s.last_out_ms),
                at(s.last_in_ms),
                at(s.watermark_ms),
                s.errors
            );
            if s.warnings > 0 {
                let _ = writeln!(
                    out,
                    "  sync warnings: {} items synced without a field (relay sync warnings)",
                    s.warnings
                );
            }
        }
        for h in &c.holds {
            let _ = writeln!(out, "  held:         {h}");
        }
        if let Some(e) = &c.last_error {
            let _ = writeln!(out, "  last error:   {} ({})", e.message, when(e.at_ms, now));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc3339_and_a_relative_phrase() {
        let now = 1_795_746_871_000;
        assert_eq!(rfc3339(now), "2026-11-27T02:34:31Z");
        assert_eq!(relative(now + 23 * 3_600_000 + 5_000, now), "in 23 h");
        assert_eq!(relative(now - 5 * 60_000 - 999, now), "5 min ago");
        assert_eq!(relative(now - 12_000, now), "12 s ago");
        assert_eq!(relative(now + 3 * 86_400_000, now), "in 3 d");
        assert_eq!(relative(now + 5 * 31_557_600_000, now), "in 5 y");
        assert_eq!(relative(now, now), "just now");
        assert_eq!(
            ago(now + 5_000, now),
            "just now",
            "a clock step never reads as the future"
        );
        assert_eq!(when(now - 60_000, now), "2026-11-27T02:33:31Z (1 min ago)");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn status_says_times_never_unix_seconds() {
        let now = now_ms();
        let status = ConnectionStatus {
            name: "c".into(),
            state: "pending".into(),
            local: "pub".into(),
            remote: "unknown".into(),
            description: String::new(),
            mode: "script".into(),
            project: String::new(),
            deliver_to: None,
            last_contact_ms: Some(now - 90_000),
            outbound: QueueStats::default(),
            inbound: QueueStats::default(),
            last_error: None,
            invitation_expires_at: Some(now / 1000 + 23 * 3600 + 60),
            trust: None,
            route: None,
            recent_dead_letters: Vec::new(),
            holds: Vec::new(),
            sync: None,
        };
        let text = render(&[status]);
        assert!(!text.contains("unix time"), "{text}");
        assert!(text.contains("(in 23 h)"), "{text}");
        assert!(text.contains("(1 min ago)"), "{text}");
        assert!(text.contains(&rfc3339(now - 90_000)), "{text}");
    }
}
