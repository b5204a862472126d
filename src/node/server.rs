//! The agent-facing HTTPS API of the node: redeem an invitation, long-poll for messages, push
//! a batch. Bodies are bincode ([`crate::protocol`]); errors are JSON.

// Handlers return a ready error response as `Err`; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::registry::Denied;
use super::throttle::{self, LogThrottle, Verdict};
use super::Node;
use crate::http::{self, Body, IncomingRequest, Method, Response, StatusCode};
use crate::protocol::{
    self, codes, LinkState, PollRequest, PollResponse, PushRequest, PushResponse, RedeemRequest, WireMessage,
};
use crate::status::Health;
use crate::store::{Message, NodeQueue, QueueError};

fn deny(d: Denied) -> Response<Body> {
    let status = StatusCode::from_u16(d.status).unwrap_or(StatusCode::FORBIDDEN);
    http::error(status, d.code, d.message)
}

fn bincode_reply<T: serde::Serialize>(value: &T) -> Response<Body> {
    match protocol::encode(value) {
        Ok(raw) => http::bytes(StatusCode::OK, protocol::CONTENT_TYPE, raw),
        // The limits are built so this cannot happen; if it does, say so rather than answer
        // with an empty body the agent would misread.
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an answer to the agent");
            http::error(StatusCode::INTERNAL_SERVER_ERROR, codes::TOO_LARGE, e.to_string())
        }
    }
}

fn bad_request(e: impl std::fmt::Display) -> Response<Body> {
    http::error(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.to_string())
}

/// Reads an authenticated request's body (the credential was checked from the headers).
async fn body(req: IncomingRequest, limit: usize) -> Result<(http::HeaderMap, bytes::Bytes), Response<Body>> {
    body_paced(req, limit, http::BodyPace::AUTHENTICATED).await
}

/// Reads a body that must keep `pace`: a trickling upload would otherwise hold its
/// connection slot.
async fn body_paced(
    req: IncomingRequest,
    limit: usize,
    pace: http::BodyPace,
) -> Result<(http::HeaderMap, bytes::Bytes), Response<Body>> {
    let (parts, body) = req.into_parts();
    match http::read_body_paced(body, limit, pace).await {
        Ok(b) => Ok((parts.headers, b)),
        Err(http::BodyError::TooLarge { limit }) => Err(http::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::TOO_LARGE,
            format!("request body larger than {limit} bytes"),
        )),
        Err(e @ http::BodyError::TooSlow { .. }) => Err(http::error(
            StatusCode::REQUEST_TIMEOUT,
            codes::BAD_REQUEST,
            match pace.min_rate {
                0 => format!("request {e}: the whole body must arrive within {:?}", pace.deadline),
                rate => format!(
                    "request {e}: the whole body must arrive within {:?}, at {rate} bytes/s or faster after the first {:?}",
                    pace.deadline, pace.grace
                ),
            },
        )),
        Err(e) => Err(bad_request(e)),
    }
}

/// Routes one agent request.
pub async fn handle(node: Node, req: IncomingRequest, token: CancellationToken) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::POST, protocol::REDEEM_PATH) => redeem(node, req).await,
        (&Method::POST, protocol::POLL_PATH) => poll(node, req, token).await,
        (&Method::POST, protocol::PUSH_PATH) => push(node, req).await,
        (&Method::POST, protocol::CHECK_PATH) => check(node, req).await,
        (&Method::GET, "/healthz") => http::text(StatusCode::OK, "ok\n"),
        _ => http::error(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            format!("no such endpoint: {path}"),
        ),
    }
}

/// Refused redeems in the log.
static REDEEM_REFUSALS: LogThrottle = LogThrottle::new(throttle::REFUSALS_PER_WINDOW, throttle::LOG_WINDOW);

async fn redeem(node: Node, req: IncomingRequest) -> Response<Body> {
    // Nobody is authenticated yet: a short deadline and a minimum rate.
    let pace = http::BodyPace::unauthenticated(node.settings().node.unauthenticated_body_timeout);
    let (_, raw) = match body_paced(req, protocol::MAX_REDEEM_BYTES, pace).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request: RedeemRequest = match protocol::decode("redeem request", &raw) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    if let Err(e) = protocol::check_version(request.version) {
        return http::error(StatusCode::BAD_REQUEST, codes::UNSUPPORTED_VERSION, e.to_string());
    }
    // A redemption and a counted wrong secret are durable before the answer (the lockout must
    // survive a restart); other refusals change nothing.
    let result = node.registry().redeem(&request).await;
    match result {
        Ok((rec, resp)) => {
            info!(connection = %rec.name, agent = %request.instance_name, host = %request.host, "invitation redeemed; connection active");
            if let Err(e) = node.ensure_link(&rec).await {
                warn!(error = %e, "cannot start the connection's link");
            }
            if let Some(link) = node.link(&rec.name) {
                // Read the state again: an operator may have changed it meanwhile.
                if let Ok(Some(fresh)) = node.registry().get(&rec.name).await {
                    link.follow(&fresh);
                }
                link.health.contact();
            }
            bincode_reply(&resp)
        }
        Err(d) => {
            // Anyone can send refused redeems: bounded lines, at a bounded rate.
            if let Verdict::Log { suppressed } = REDEEM_REFUSALS.check(std::time::Instant::now()) {
                if suppressed > 0 {
                    warn!(
                        suppressed,
                        "{suppressed} more redeem refusals were not logged (at most {} a minute)",
                        throttle::REFUSALS_PER_WINDOW
                    );
                }
                warn!(
                    invitation = %throttle::untrusted(&request.invitation_id, throttle::MAX_LOGGED_CHARS),
                    code = d.code,
                    "redeem refused"
                );
            }
            deny(d)
        }
    }
}

async fn authenticate(node: &Node, headers: &http::HeaderMap) -> Result<std::sync::Arc<super::Link>, Response<Body>> {
    let rec = node
        .registry()
        .authenticate(http::bearer(headers))
        .await
        .map_err(deny)?;
    // A valid credential moves this connection out of the unauthenticated budget.
    http::mark_authenticated();
    node.ensure_link(&rec)
        .await
        .map_err(|e| http::error(StatusCode::INSUFFICIENT_STORAGE, codes::STORAGE, e.message))
}

fn revoked(name: &str) -> Response<Body> {
    http::error(
        StatusCode::UNAUTHORIZED,
        codes::REVOKED,
        format!("connection {name:?} was revoked by the node administrator"),
    )
}

async fn poll(node: Node, req: IncomingRequest, token: CancellationToken) -> Response<Body> {
    // The credential is in the headers: refuse strangers before reading any body.
    let link = match authenticate(&node, req.headers()).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let (headers, raw) = match body(req, protocol::MAX_POLL_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request: PollRequest = match protocol::decode("poll request", &raw) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    if let Err(e) = protocol::check_version(request.version) {
        return http::error(StatusCode::BAD_REQUEST, codes::UNSUPPORTED_VERSION, e.to_string());
    }
    link.health.contact();
    // A cursor beyond anything this node handed on means this node went back (its data
    // directory restored from a backup): the agent holds other messages under numbers this
    // node has given out since, and its cursor would acknowledge them unseen. Number
    // everything not yet handed on above the agent's cursor; nothing is lost.
    let sent = match link.outbox.sent_through().await {
        Ok(s) => s,
        Err(e) => return crate::intake::queue_error_response(&e),
    };
    if request.after > sent {
        let moved = match link.outbox.renumber_unsent(request.after).await {
            Ok(n) => n,
            Err(e) => return crate::intake::queue_error_response(&e),
        };
        let message = format!(
            "the agent has received up to message {} but this node has only sent up to {sent}: this node's data \
             directory was probably restored from a backup. Its {moved} message(s) not yet sent, and every new one, \
             are numbered after that so none is lost",
            request.after
        );
        if is_new_error(&link, &message) {
            error!(connection = %link.name, %message, "renumbered the queue for the agent");
        }
        link.health.error(message);
    }
    // A cursor below what the agent already acknowledged means the agent went back (its data
    // directory restored or copied): this node removed those messages, so they cannot be
    // sent again. Say so loudly, and keep serving what the node still holds.
    let acked = match link.outbox.acked_through().await {
        Ok(a) => a,
        Err(e) => return crate::intake::queue_error_response(&e),
    };
    if request.after < acked {
        let message = format!(
            "the agent asks for messages after {} but had already acknowledged up to {acked}: its data \
             directory was probably restored from a backup or copied. This node removed messages {}..={acked} \
             once acknowledged and cannot send them again; it sends what it still holds",
            request.after,
            request.after + 1
        );
        if is_new_error(&link, &message) {
            error!(connection = %link.name, %message, "the agent's receive position went back");
        }
        link.health.error(message);
    }
    // The cursor acknowledges everything up to it: the agent holds those durably.
    if let Err(e) = link.outbox.remove_through(request.after).await {
        return crate::intake::queue_error_response(&e);
    }
    let wait =
        Duration::from_millis(request.wait_ms.min(protocol::MAX_POLL_WAIT_MS)).min(node.settings().node.poll_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let mut active_rx = link.active_tx.subscribe();
    // The largest payload the agent takes (an agent that does not say takes any): a larger
    // message would be refused by it on every poll, so it is dead-lettered here instead, and
    // the intake refuses such payloads from now on.
    let agent_limit = http::header(&headers, protocol::MAX_PAYLOAD_HEADER).and_then(|v| v.trim().parse::<u64>().ok());
    link.agent_max_payload
        .store(agent_limit.unwrap_or(0), Ordering::Relaxed);
    loop {
        if link.revoked.load(Ordering::SeqCst) {
            return revoked(&link.name);
        }
        let active = *active_rx.borrow_and_update();
        if active {
            let messages = match link
                .outbox
                .read_after(
                    request.after,
                    protocol::MAX_BATCH_MESSAGES,
                    protocol::BATCH_TARGET_BYTES,
                )
                .await
            {
                Ok(m) => m,
                Err(e) => return crate::intake::queue_error_response(&e),
            };
            let (messages, too_big): (Vec<Message>, Vec<Message>) = messages
                .into_iter()
                .partition(|m| agent_limit.is_none_or(|limit| m.body.len() as u64 <= limit));
            for m in &too_big {
                let reason = format!(
                    "{} bytes is more than the agent accepts ({} bytes, its queue.max_payload_bytes)",
                    m.body.len(),
                    agent_limit.unwrap_or_default()
                );
                warn!(connection = %link.name, id = %m.id, seq = m.seq, %reason, "dead-lettering an outbound message");
                Health::add(&link.health.dead_lettered, 1);
                link.health
                    .error(format!("outbound message {} dead-lettered: {reason}", m.id));
                if let Err(e) = link.outbox.dead_letter(m, &reason).await {
                    return crate::intake::queue_error_response(&e);
                }
            }
            if messages.is_empty() && !too_big.is_empty() {
                // Everything read was set aside: read on.
                continue;
            }
            if let Some(last) = messages.last() {
                if let Err(e) = link.outbox.note_sent(last.seq).await {
                    return crate::intake::queue_error_response(&e);
                }
                Health::add(&link.health.sent, messages.len() as u64);
                Health::add(
                    &link.health.bytes_sent,
                    messages.iter().map(|m| m.body.len() as u64).sum(),
                );
                return bincode_reply(&PollResponse {
                    version: protocol::PROTOCOL_VERSION,
                    max_payload_bytes: node.settings().queue.max_payload_bytes,
                    state: LinkState::Active,
                    messages: messages.into_iter().map(to_wire).collect(),
                });
            }
        }
        let state = if active {
            LinkState::Active
        } else {
            LinkState::Deactivated
        };
        let empty = || {
            bincode_reply(&PollResponse {
                version: protocol::PROTOCOL_VERSION,
                max_payload_bytes: node.settings().queue.max_payload_bytes,
                state,
                messages: Vec::new(),
            })
        };
        tokio::select! {
            biased;
            _ = token.cancelled() => return empty(),
            _ = tokio::time::sleep_until(deadline) => return empty(),
            _ = link.outbox.wait_after(request.after), if active => {}
            r = active_rx.changed() => if r.is_err() { return empty() },
        }
    }
}

/// Confirms a credential and reports the connection's state; moves no message.
async fn check(node: Node, req: IncomingRequest) -> Response<Body> {
    let link = match authenticate(&node, req.headers()).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let state = if *link.active_tx.borrow() {
        LinkState::Active
    } else {
        LinkState::Deactivated
    };
    bincode_reply(&protocol::CheckResponse {
        version: protocol::PROTOCOL_VERSION,
        connection: link.name.clone(),
        state,
    })
}

async fn push(node: Node, req: IncomingRequest) -> Response<Body> {
    let max_payload = node.settings().queue.max_payload_bytes as usize;
    let link = match authenticate(&node, req.headers()).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let (_, raw) = match body(req, protocol::max_batch_bytes(max_payload)).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request: PushRequest = match protocol::decode("push request", &raw) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    if let Err(e) = protocol::check_version(request.version) {
        return http::error(StatusCode::BAD_REQUEST, codes::UNSUPPORTED_VERSION, e.to_string());
    }
    if let Err(problem) = protocol::check_messages(&request.messages, max_payload) {
        return bad_request(problem);
    }
    link.health.contact();
    let messages: Vec<Message> = request.messages.into_iter().map(from_wire).collect();
    let bytes: u64 = messages.iter().map(|m| m.body.len() as u64).sum();
    // Durable when it resolves: the answer below acknowledges the batch.
    let appended = match link.inbox.append_remote(messages).await {
        Ok(a) => a,
        Err(e @ QueueError::SequenceConflict { .. }) => {
            // Storing nothing keeps both sides' messages; the agent keeps its own until an
            // operator decides (a new connection, or a data directory that matches the node).
            let message = format!("push refused: {e}");
            if is_new_error(&link, &message) {
                error!(connection = %link.name, %message, "an agent reused sequence numbers");
            }
            link.health.error(message.clone());
            return http::error(StatusCode::CONFLICT, codes::SEQUENCE_CONFLICT, message);
        }
        Err(e) => return crate::intake::queue_error_response(&e),
    };
    if let Some(gap) = appended.gap {
        let message = format!(
            "the agent sent message {} where {} was expected: messages {}..={} never arrived (its data directory may have been restored or copied)",
            gap.got,
            gap.expected,
            gap.expected,
            gap.got - 1
        );
        warn!(connection = %link.name, %message, "sequence gap from the agent");
        link.health.error(message);
    }
    let high_water = appended.high_water;
    Health::add(&link.health.received, appended.stored);
    Health::add(&link.health.bytes_received, bytes);
    let state = if *link.active_tx.borrow() {
        LinkState::Active
    } else {
        LinkState::Deactivated
    };
    bincode_reply(&PushResponse {
        version: protocol::PROTOCOL_VERSION,
        high_water,
        state,
    })
}

/// False when `message` is already the link's last error: an agent retrying the same
/// refused request is logged once, not at every retry (it stays in the status).
fn is_new_error(link: &super::Link, message: &str) -> bool {
    link.health.last_error().map(|e| e.message).as_deref() != Some(message)
}

/// Queue message → wire message.
pub fn to_wire(m: Message) -> WireMessage {
    WireMessage {
        seq: m.seq,
        id: m.id,
        content_type: m.content_type,
        enqueued_at_ms: m.enqueued_at_ms,
        body: m.body.to_vec(),
    }
}

/// Wire message → queue message.
pub fn from_wire(m: WireMessage) -> Message {
    Message {
        seq: m.seq,
        id: m.id,
        content_type: m.content_type,
        enqueued_at_ms: m.enqueued_at_ms,
        body: m.body.into(),
    }
}
