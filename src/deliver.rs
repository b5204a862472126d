//! The webhook worker: hands one queue's messages, in order, to a local webhook; retries what
//! may succeed later, dead-letters what the receiver refuses for good, and holds delivery
//! while the webhook refuses everyone (a wrong path or an expired token).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::DeliverySettings;
use crate::http::{self, Method, StatusCode};
use crate::retry::Backoff;
use crate::status::Health;
use crate::store::{AnyQueue, Message, NodeQueue, QueueError};

/// How long an in-flight webhook request may finish after shutdown begins (inside the
/// daemon's drain deadline).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How much of a webhook's answer is read, for an error reason; the rest is dropped unread.
const REASON_BYTES: usize = 4 * 1024;
/// Shown at most of the answer in a reason.
const REASON_SHOWN: usize = 200;
/// The key of the webhook's hold in [`Health`].
const HOLD: &str = "webhook";
/// Messages read from the queue at a time, and the bytes they may hold together (one larger
/// message is read alone): one read of the store per group rather than per message.
const READ_AHEAD: usize = 64;
const READ_AHEAD_BYTES: usize = 256 * 1024;

/// Where and how one connection's incoming payloads are delivered.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Target URL.
    pub url: String,
    /// Connection name (`Relay-Connection`).
    pub connection: String,
    /// Project for incoming sync (`Relay-Project`), when set.
    pub project: Option<String>,
}

/// What one attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Delivered,
    /// Worth trying again, after at least the given delay when the receiver asked for one.
    Retry {
        /// Why.
        reason: String,
        /// `Retry-After`.
        after: Option<Duration>,
    },
    /// The receiver refused the message for good.
    Reject {
        /// Why.
        reason: String,
    },
    /// The receiver refuses every message (misconfigured): hold delivery and retry later.
    Hold {
        /// Why, and what to check.
        reason: String,
        /// `Retry-After`.
        after: Option<Duration>,
    },
}

/// Statuses that say the webhook refuses everyone, not this message: a wrong path or method,
/// a missing or expired token.
const REFUSES_EVERYONE: [StatusCode; 5] = [
    StatusCode::UNAUTHORIZED,
    StatusCode::FORBIDDEN,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::GONE,
];

/// Classifies the answer of the webhook at `url`, on the status line alone: 2xx delivered
/// (whatever the body); 408, 429, 5xx (and redirects, which relay does not follow) retried;
/// 401, 403, 404, 405, 410 hold delivery; every other status refuses this message for good.
pub fn classify(url: &str, status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    if status.is_success() {
        return Outcome::Delivered;
    }
    let shown = String::from_utf8_lossy(&body[..body.len().min(REASON_SHOWN)]);
    let snippet = shown.trim();
    let reason = if snippet.is_empty() {
        format!("webhook answered {status}")
    } else {
        format!("webhook answered {status}: {snippet}")
    };
    if REFUSES_EVERYONE.contains(&status) {
        let check = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "check deliver_to and the credentials it expects",
            _ => "check deliver_to",
        };
        let said = if snippet.is_empty() {
            String::new()
        } else {
            format!(" ({snippet})")
        };
        Outcome::Hold {
            reason: format!(
                "webhook {url} answers {status} to every message{said}: {check}; delivery is held, nothing is dead-lettered"
            ),
            after: retry_after,
        }
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Outcome::Retry {
            reason,
            after: retry_after,
        }
    } else if status.is_redirection() {
        Outcome::Retry {
            reason: format!("{reason} (redirects are not followed: point deliver_to at the final URL)"),
            after: retry_after,
        }
    } else {
        Outcome::Reject { reason }
    }
}

/// Delivers one message once.
pub async fn attempt(client: &http::Client, hook: &Webhook, msg: &Message, timeout: Duration) -> Outcome {
    let seq = msg.seq.to_string();
    let mut headers = vec![
        ("content-type", msg.content_type.as_str()),
        ("relay-connection", hook.connection.as_str()),
        ("relay-message-id", msg.id.as_str()),
        ("relay-seq", seq.as_str()),
        ("idempotency-key", msg.id.as_str()),
        ("user-agent", concat!("relay/", env!("CARGO_PKG_VERSION"))),
    ];
    if let Some(p) = hook.project.as_deref().filter(|p| !p.is_empty()) {
        headers.push(("relay-project", p));
    }
    let req = match http::request(Method::POST, &hook.url, &headers, msg.body.clone()) {
        Ok(r) => r,
        // A message that cannot become a request never will: set it aside.
        Err(e) => {
            return Outcome::Reject {
                reason: format!("cannot build the webhook request: {e}"),
            }
        }
    };
    match client.send_head(req, timeout, REASON_BYTES).await {
        Ok(reply) => classify(&hook.url, reply.status, reply.retry_after(), &reply.body),
        Err(e) => Outcome::Retry {
            reason: format!("webhook {} unreachable: {e}", hook.url),
            after: None,
        },
    }
}

/// Runs until `token` is cancelled: waits while `active` is false, takes the oldest stored
/// message, delivers it, and removes it only after a 2xx (or after dead-lettering it). The
/// queue is an inbox, whose sender keeps each message until this side's flush covers it: a
/// message need not wait for that flush to be delivered, and one lost in a crash before it is
/// sent again and delivered again with the same id.
pub async fn run(
    queue: AnyQueue,
    hook: Webhook,
    client: http::Client,
    settings: DeliverySettings,
    mut active: watch::Receiver<bool>,
    health: Arc<Health>,
    token: CancellationToken,
) {
    let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
    let mut kicks = queue.kicks();
    // The oldest messages, read ahead in queue order; each leaves the queue once delivered.
    let mut ahead: VecDeque<Message> = VecDeque::new();
    // The highest number read so far: a wait is for anything above it.
    let mut seen = 0;
    loop {
        // Paused connections keep their queue; wait to be resumed.
        tokio::select! {
            biased;
            _ = token.cancelled() => return,
            r = active.wait_for(|a| *a) => if r.is_err() { return },
        }
        if kicks.has_changed().unwrap_or(false) {
            // A dead letter came back under its old number, before what was read ahead.
            kicks.borrow_and_update();
            ahead.clear();
        }
        // Stored, not only durable: the sender keeps each message until this side's durable
        // mark covers it, so one lost in a crash before the flush comes again, with its id.
        if ahead.is_empty() {
            match queue.read_stored_after(0, READ_AHEAD, READ_AHEAD_BYTES).await {
                Ok(read) => {
                    seen = read.iter().map(|m| m.seq).fold(seen, u64::max);
                    ahead.extend(read);
                }
                Err(e) => {
                    health.error(format!("reading queue: {e}"));
                    warn!(queue = queue.name(), error = %e, "cannot read the queue; retrying");
                    if !crate::retry::sleep(backoff.next_delay(None), &token).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let msg = match ahead.pop_front() {
            Some(m) => m,
            None => {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => return,
                    _ = queue.wait_stored_after(seen) => continue,
                    _ = active.changed() => continue,
                    _ = kicks.changed() => continue,
                }
            }
        };
        let started = std::time::Instant::now();
        let outcome = {
            let delivery = attempt(&client, &hook, &msg, settings.timeout);
            tokio::pin!(delivery);
            tokio::select! {
                o = &mut delivery => o,
                _ = token.cancelled() => {
                    // Shutting down: let a request already on its way finish briefly, so the
                    // webhook does not see it again after the restart.
                    match tokio::time::timeout(SHUTDOWN_GRACE, &mut delivery).await {
                        Ok(o) => o,
                        Err(_) => return, // still queued; delivered again after the restart
                    }
                }
            }
        };
        health.webhook_latency.observe(started.elapsed());
        if !matches!(outcome, Outcome::Hold { .. }) && health.release(HOLD) {
            info!(connection = %hook.connection, "the webhook answers again; delivery resumes");
        }
        match outcome {
            Outcome::Delivered => {
                backoff.reset();
                Health::add(&health.delivered, 1);
                Health::add(&health.bytes_delivered, msg.body.len() as u64);
                // Exactly this message: a retried dead letter may sit below it.
                if let Err(e) = queue.remove(msg.seq).await {
                    health.error(format!("removing a delivered message: {e}"));
                    if matches!(e, QueueError::Fenced { .. }) {
                        // Another replica delivers this connection now.
                        return;
                    }
                }
            }
            Outcome::Reject { reason } => {
                warn!(connection = %hook.connection, id = %msg.id, seq = msg.seq, %reason, "dead-lettering message");
                Health::add(&health.dead_lettered, 1);
                health.error(format!("message {} dead-lettered: {reason}", msg.id));
                if let Err(e) = queue.dead_letter(&msg, &reason).await {
                    if matches!(e, QueueError::Fenced { .. }) {
                        return;
                    }
                    ahead.push_front(msg);
                    warn!(error = %e, "cannot dead-letter; will retry the message");
                    if !crate::retry::sleep(backoff.next_delay(None), &token).await {
                        return;
                    }
                }
            }
            Outcome::Retry { reason, after } => {
                Health::add(&health.failures, 1);
                let delay = backoff.next_delay(after);
                if health.last_error().map(|e| e.message) != Some(reason.clone()) {
                    info!(connection = %hook.connection, %reason, retry_in = ?delay, "webhook delivery failed; retrying");
                }
                health.error(reason);
                ahead.push_front(msg);
                if !crate::retry::sleep(delay, &token).await {
                    return;
                }
            }
            Outcome::Hold { reason, after } => {
                // Nothing is wrong with this message: keep it first and ask again later.
                Health::add(&health.failures, 1);
                let delay = backoff.next_delay(after);
                if health.hold(HOLD, reason.clone()) {
                    tracing::error!(connection = %hook.connection, %reason, retry_in = ?delay, "webhook refuses every message; holding delivery");
                }
                ahead.push_front(msg);
                if !crate::retry::sleep(delay, &token).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_contract() {
        let url = "http://127.0.0.1:9/hook";
        let status = |s: u16| StatusCode::from_u16(s).unwrap();
        assert_eq!(classify(url, StatusCode::OK, None, b""), Outcome::Delivered);
        assert_eq!(classify(url, StatusCode::NO_CONTENT, None, b""), Outcome::Delivered);
        // The status line decides: a 2xx with an error-looking body is delivered.
        assert_eq!(
            classify(url, StatusCode::OK, None, b"{\"error\":1}"),
            Outcome::Delivered
        );
        for s in [408u16, 429, 500, 502, 503, 504, 301] {
            let o = classify(url, status(s), None, b"");
            assert!(matches!(o, Outcome::Retry { .. }), "{s}: {o:?}");
        }
        for s in [400u16, 409, 413, 415, 422, 418, 451] {
            let o = classify(url, status(s), None, b"nope");
            assert!(
                matches!(o, Outcome::Reject { ref reason } if reason.contains("nope")),
                "{s}: {o:?}"
            );
        }
        // These refuse everyone: delivery holds, nothing is dead-lettered.
        for s in [401u16, 403, 404, 405, 410] {
            let o = classify(url, status(s), Some(Duration::from_secs(2)), b"");
            let Outcome::Hold { reason, after } = o else {
                panic!("{s}: {o:?}")
            };
            assert!(
                reason.starts_with(&format!("webhook {url} answers {} to every message", status(s))),
                "{reason}"
            );
            assert!(reason.contains("check deliver_to"), "{reason}");
            assert_eq!(after, Some(Duration::from_secs(2)));
        }
        let o = classify(url, StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(3)), b"");
        assert_eq!(
            o,
            Outcome::Retry {
                reason: "webhook answered 429 Too Many Requests".into(),
                after: Some(Duration::from_secs(3))
            }
        );
    }
}
