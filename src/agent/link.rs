//! One accepted connection on the agent, as three tasks that only dial out: the receive loop
//! (long-poll), the send loop (batched pushes) and the webhook worker for what was received.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::{Agent, AgentConnection, LinkHandle};
use crate::deliver::{self, Webhook};
use crate::http::{self, Method, Reply, StatusCode};
use crate::protocol::{self, codes, LinkState, PollRequest, PollResponse, PushRequest, PushResponse};
use crate::queue::{Queue, QueueError};
use crate::retry::Backoff;
use crate::status::Health;

/// Extra time beyond the poll wait before a silent connection counts as dead (half-open).
const POLL_MARGIN: Duration = Duration::from_secs(15);
/// The slowest link a transfer deadline allows for (256 KiB/s, about 2 Mbit/s).
const SLOWEST_LINK_BYTES_PER_SEC: u64 = 256 * 1024;

/// Time to move `bytes` over the slowest link we plan for.
fn transfer_time(bytes: usize) -> Duration {
    Duration::from_millis(bytes as u64 * 1000 / SLOWEST_LINK_BYTES_PER_SEC)
}

/// Everything the loops of one connection share.
#[derive(Clone)]
struct Ctx {
    agent: Agent,
    conn: AgentConnection,
    handle: Arc<LinkHandle>,
    client: http::Client,
    credential: String,
}

/// What a failed exchange means for the loop.
enum Failure {
    /// The node revoked or forgot this connection: stop.
    Fatal(String),
    /// Try again after a delay (at least the `Retry-After`).
    Retry(String, Option<Duration>),
}

/// Starts the connection's tasks on `tracker`.
pub fn spawn(
    agent: Agent,
    conn: AgentConnection,
    handle: Arc<LinkHandle>,
    tracker: &TaskTracker,
    webhook_client: http::Client,
) {
    let (outbox_name, inbox_name) = super::queue_names(&conn.name);
    let limits = agent.settings().queue_limits();
    let (outbox, inbox) = match (
        agent.store().queue(&outbox_name, limits),
        agent.store().queue(&inbox_name, limits),
    ) {
        (Ok(o), Ok(i)) => (o, i),
        (Err(e), _) | (_, Err(e)) => {
            handle.health.error(e.to_string());
            return;
        }
    };
    let name = conn.name.clone();
    spawn_delivery(&agent, &conn, &handle, tracker, webhook_client, inbox.clone());
    if conn.revoked.is_some() {
        // Revoked: no more exchanges with the node, but what it already sent is delivered.
        return;
    }
    let credential = match agent.credential(&conn.name) {
        Ok(c) => c.expose().to_owned(),
        Err(e) => {
            warn!(connection = %conn.name, error = %e, "connection not started");
            handle.health.error(e.message);
            return;
        }
    };
    let pin = conn.pin_bytes();
    let trust = &agent.settings().agent;
    let tls = match crate::tls::node_client_config(pin, trust.trust, trust.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            handle.health.error(e.to_string());
            return;
        }
    };
    let client = http::Client::https_only(
        tls,
        agent.settings().agent.request_timeout,
        &agent.settings().proxy_config(),
    );
    let ctx = Ctx {
        agent: agent.clone(),
        conn: conn.clone(),
        handle: handle.clone(),
        client,
        credential,
    };
    tracker.spawn(receive_loop(ctx.clone(), inbox).instrument(tracing::info_span!("receive", connection = %name)));
    tracker.spawn(send_loop(ctx, outbox).instrument(tracing::info_span!("send", connection = %name)));
}

/// Starts the webhook worker for what the node sent, if a webhook is configured.
fn spawn_delivery(
    agent: &Agent,
    conn: &AgentConnection,
    handle: &Arc<LinkHandle>,
    tracker: &TaskTracker,
    webhook_client: http::Client,
    inbox: Queue,
) {
    let name = conn.name.clone();
    let Some(url) = conn
        .deliver_to
        .clone()
        .or_else(|| agent.settings().agent.deliver_to.clone())
    else {
        warn!(connection = %name, "no webhook configured (set agent.deliver_to or RELAY_AGENT__DELIVER_TO and restart): payloads from the node are kept in the queue");
        return;
    };
    let hook = Webhook {
        url,
        connection: name.clone(),
        project: Some(conn.project.clone()),
    };
    // The agent delivers whatever it received; pausing happens on the node.
    let (active_tx, active_rx) = watch::channel(true);
    let settings = agent.settings().delivery.clone();
    let (health, token) = (handle.health.clone(), handle.deliver_token.clone());
    tracker.spawn(
        async move {
            deliver::run(inbox, hook, webhook_client, settings, active_rx, health, token).await;
            drop(active_tx);
        }
        .instrument(tracing::info_span!("deliver", connection = %name, side = "agent")),
    );
}

impl Ctx {
    /// The node's payload limit, once a poll answer told us.
    fn node_max_payload(&self) -> Option<usize> {
        match self.handle.node_max_payload.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n as usize),
        }
    }

    async fn call(&self, path: &str, body: Vec<u8>, deadline: Duration, max_body: usize) -> Result<Reply, Failure> {
        let url = format!("{}{}", self.conn.node_url, path);
        let auth = format!("Bearer {}", self.credential);
        let req = http::request(
            Method::POST,
            &url,
            &[
                ("content-type", protocol::CONTENT_TYPE),
                (protocol::VERSION_HEADER, "1"),
                ("authorization", &auth),
            ],
            body,
        )
        .map_err(|e| Failure::Fatal(format!("the node URL {url} is unusable: {e}")))?;
        let reply = self
            .client
            .send(req, deadline, max_body)
            .await
            .map_err(|e| Failure::Retry(format!("node {} unreachable: {e}", self.conn.node_url), None))?;
        if reply.status == StatusCode::OK {
            return Ok(reply);
        }
        let body = reply.error_body();
        let message = body
            .as_ref()
            .map(|b| b.error.clone())
            .unwrap_or_else(|| format!("the node answered {}", reply.status));
        let code = body.map(|b| b.code).unwrap_or_default();
        if reply.status == StatusCode::UNAUTHORIZED && (code == codes::REVOKED || code == codes::UNAUTHORIZED) {
            return Err(Failure::Fatal(message));
        }
        Err(Failure::Retry(
            format!("node answered {}: {message}", reply.status),
            reply.retry_after(),
        ))
    }

    /// Handles a failure; false when the loop must stop.
    async fn failed(&self, failure: Failure, backoff: &mut Backoff, token: &CancellationToken) -> bool {
        match failure {
            Failure::Fatal(reason) => {
                self.agent.mark_revoked(&self.conn.name, &reason).await;
                false
            }
            Failure::Retry(reason, after) => {
                Health::add(&self.handle.health.failures, 1);
                Health::add(&self.handle.health.reconnects, 1);
                let delay = backoff.next_delay(after);
                if self.handle.health.last_error().map(|e| e.message) != Some(reason.clone()) {
                    warn!(%reason, retry_in = ?delay, "exchange with the node failed; retrying");
                }
                self.handle.health.error(reason);
                crate::retry::sleep(delay, token).await
            }
        }
    }

    fn healthy(&self, backoff: &mut Backoff) {
        backoff.reset();
        self.handle.health.contact();
    }

    fn note_state(&self, state: LinkState) {
        let paused = state == LinkState::Deactivated;
        let was = self.handle.paused.swap(paused, Ordering::Relaxed);
        if was != paused {
            if paused {
                info!("the node deactivated this connection; messages keep queuing");
            } else {
                info!("the node activated this connection");
            }
        }
    }
}

fn backoff(agent: &Agent) -> Backoff {
    let d = &agent.settings().delivery;
    Backoff::new(d.backoff_initial, d.backoff_max)
}

/// Long-polls the node for messages after the inbox's durable high-water mark, stores them,
/// flushes, and polls again (which acknowledges them).
async fn receive_loop(ctx: Ctx, inbox: Queue) {
    let token = ctx.handle.token.clone();
    let mut backoff = backoff(&ctx.agent);
    let wait = ctx.agent.settings().agent.poll_wait;
    let max_payload = ctx.agent.settings().queue.max_payload_bytes as usize;
    // The first poll, and the first after a failure, asks for an immediate answer so the
    // connection is known to work (status, /readyz) at once rather than after a full wait.
    let mut confirm = true;
    loop {
        if token.is_cancelled() {
            return;
        }
        let request = PollRequest {
            version: protocol::PROTOCOL_VERSION,
            after: inbox.durable_seq(),
            wait_ms: if confirm { 0 } else { wait.as_millis() as u64 },
        };
        let max_reply = protocol::max_batch_bytes(max_payload.max(ctx.node_max_payload().unwrap_or(0)));
        // Room to receive the largest possible batch on a slow link; a dead connection is
        // still noticed sooner by HTTP/2 keep-alive pings.
        let poll_deadline = Duration::from_millis(request.wait_ms) + POLL_MARGIN + transfer_time(max_reply);
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            _ = token.cancelled() => return,
            r = ctx.call(protocol::POLL_PATH, protocol::encode(&request), poll_deadline, max_reply) => r,
        };
        let reply = match result {
            Ok(r) => r,
            Err(f) => {
                confirm = true;
                if !ctx.failed(f, &mut backoff, &token).await {
                    return;
                }
                continue;
            }
        };
        if request.wait_ms == 0 {
            ctx.handle.health.round_trip.observe(started.elapsed());
        }
        confirm = false;
        let resp: PollResponse = match protocol::decode("poll response", &reply.body) {
            Ok(r) => r,
            Err(e) => {
                if !ctx
                    .failed(Failure::Retry(e.to_string(), None), &mut backoff, &token)
                    .await
                {
                    return;
                }
                continue;
            }
        };
        ctx.note_state(resp.state);
        ctx.handle
            .node_max_payload
            .store(resp.max_payload_bytes, Ordering::Relaxed);
        if let Err(problem) = protocol::check_messages(&resp.messages, usize::MAX) {
            let reason = format!("the node sent a malformed batch: {problem}");
            if !ctx.failed(Failure::Retry(reason, None), &mut backoff, &token).await {
                return;
            }
            continue;
        }
        if resp.messages.is_empty() {
            ctx.healthy(&mut backoff);
            continue;
        }
        let bytes_received: u64 = resp.messages.iter().map(|m| m.body.len() as u64).sum();
        let messages: Vec<_> = resp.messages.into_iter().map(crate::node::server::from_wire).collect();
        let before = inbox.last_seq();
        let stored = inbox.append_remote(&messages).and(Ok(()));
        let stored = match stored {
            Ok(()) => ctx.agent.store().flush().await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => {
                Health::add(&ctx.handle.health.received, inbox.last_seq().saturating_sub(before));
                Health::add(&ctx.handle.health.bytes_received, bytes_received);
                ctx.healthy(&mut backoff);
            }
            Err(e) => {
                // Not acknowledged: the node keeps them and offers them again.
                let retry_after = matches!(e, QueueError::FullCount { .. } | QueueError::FullBytes { .. })
                    .then_some(Duration::from_secs(5));
                if !ctx
                    .failed(
                        Failure::Retry(format!("cannot store received messages: {e}"), retry_after),
                        &mut backoff,
                        &token,
                    )
                    .await
                {
                    return;
                }
            }
        }
    }
}

/// Pushes the outbox to the node in batches; removes what the node made durable.
async fn send_loop(ctx: Ctx, outbox: Queue) {
    let token = ctx.handle.token.clone();
    let mut backoff = backoff(&ctx.agent);
    let timeout = ctx.agent.settings().agent.request_timeout;
    loop {
        let durable = outbox.durable_seq();
        let batch = match outbox.read_after(0, protocol::MAX_BATCH_MESSAGES, protocol::BATCH_TARGET_BYTES) {
            Ok(b) => b,
            Err(e) => {
                if !ctx
                    .failed(Failure::Retry(e.to_string(), None), &mut backoff, &token)
                    .await
                {
                    return;
                }
                continue;
            }
        };
        // A payload the node will never take would block everything behind it.
        if let Some(limit) = ctx.node_max_payload() {
            if let Some(big) = batch.iter().find(|m| m.body.len() > limit) {
                let reason = format!(
                    "{} bytes is more than the node accepts ({limit} bytes, its queue.max_payload_bytes)",
                    big.body.len()
                );
                warn!(id = %big.id, seq = big.seq, %reason, "dead-lettering an outbound message");
                ctx.handle
                    .health
                    .error(format!("outbound message {} dead-lettered: {reason}", big.id));
                if let Err(e) = outbox.dead_letter(big, &reason) {
                    ctx.handle.health.error(format!("dead-lettering: {e}"));
                }
                continue;
            }
        }
        if batch.is_empty() {
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = outbox.wait_durable_after(durable) => continue,
            }
        }
        let last = batch.last().map(|m| m.seq).unwrap_or(0);
        let count = batch.len() as u64;
        let request = PushRequest {
            version: protocol::PROTOCOL_VERSION,
            messages: batch.into_iter().map(crate::node::server::to_wire).collect(),
        };
        let bytes: u64 = request.messages.iter().map(|m| m.body.len() as u64).sum();
        let body = protocol::encode(&request);
        let size = body.len();
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            _ = token.cancelled() => return,
            r = ctx.call(protocol::PUSH_PATH, body, timeout + transfer_time(size), 64 * 1024) => r,
        };
        if result.is_ok() {
            ctx.handle.health.round_trip.observe(started.elapsed());
        }
        let resp: PushResponse = match result
            .and_then(|r| protocol::decode("push response", &r.body).map_err(|e| Failure::Retry(e.to_string(), None)))
        {
            Ok(r) => r,
            Err(f) => {
                if !ctx.failed(f, &mut backoff, &token).await {
                    return;
                }
                continue;
            }
        };
        ctx.note_state(resp.state);
        if let Err(e) = outbox.remove_through(resp.high_water) {
            ctx.handle.health.error(format!("removing sent messages: {e}"));
        }
        if resp.high_water < last {
            // The node holds less than we sent (it should not happen); resend from there.
            // The node's queue had room for part of the batch; the rest goes next.
            debug!(
                high_water = resp.high_water,
                sent_through = last,
                "node took part of the batch"
            );
        } else {
            Health::add(&ctx.handle.health.sent, count);
            Health::add(&ctx.handle.health.bytes_sent, bytes);
        }
        ctx.healthy(&mut backoff);
    }
}
