//! One accepted connection on the agent, as three tasks that only dial out: the receive loop
//! (long-poll), the send loop (batched pushes) and the webhook worker for what was received.
//! The loops reach the node through [`NodeApi`], so tests drive them with a fake node.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use super::{Agent, AgentConnection, LinkHandle};
use crate::deliver::{self, Webhook};
use crate::http::{self, Method, Reply, StatusCode};
use crate::protocol::{self, codes, LinkState, PollRequest, PollResponse, PushRequest, PushResponse};
use crate::retry::Backoff;
use crate::status::Health;
use crate::store::{AnyQueue, Queue, QueueError, SledQueue};

#[cfg(test)]
mod tests;

/// Extra time beyond the poll wait before a silent connection counts as dead (half-open).
const POLL_MARGIN: Duration = Duration::from_secs(15);
/// The slowest link a transfer deadline allows for (256 KiB/s, about 2 Mbit/s).
const SLOWEST_LINK_BYTES_PER_SEC: u64 = 256 * 1024;
/// Largest push answer read (a small bincode value, or a JSON error).
const MAX_PUSH_REPLY_BYTES: usize = 64 * 1024;

/// Keys of this connection's holds in [`Health`]: what stops it until an operator acts.
const HOLD_CREDENTIAL: &str = "credential";
const HOLD_PUSH: &str = "push";
const HOLD_POLL: &str = "poll";

/// Time to move `bytes` over the slowest link we plan for.
fn transfer_time(bytes: usize) -> Duration {
    Duration::from_millis(bytes as u64 * 1000 / SLOWEST_LINK_BYTES_PER_SEC)
}

/// What a failed exchange with the node means for the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The node revoked this connection: the only final answer.
    Revoked(String),
    /// The node does not know the credential. Retried with backoff, never saved: a node
    /// restored from a backup or started on the wrong data directory must not disable its
    /// agents for good.
    Unauthorized(String),
    /// The node holds other messages under these sequence numbers (or has sent fewer than the
    /// agent holds): nothing is removed; retried with backoff until an operator fixes it.
    Conflict(String),
    /// Try again after a delay (at least the `Retry-After`).
    Retry(String, Option<Duration>),
}

/// What the agent's loops need from the node. The seam between the loops and HTTPS, so the
/// loops can be driven into rare cases (restored data directory, unknown credential, lost
/// acknowledgements) by a fake node.
pub trait NodeApi: Send + Sync + 'static {
    /// Long-polls for messages after `request.after`, which acknowledges everything up to it.
    /// The answer must come within `deadline` and be at most `max_reply` bytes.
    fn poll(
        &self,
        request: PollRequest,
        deadline: Duration,
        max_reply: usize,
    ) -> impl Future<Output = Result<PollResponse, Failure>> + Send;

    /// Pushes a batch; the answer's `high_water` is the highest sequence number the node holds
    /// durably from this agent.
    fn push(
        &self,
        request: PushRequest,
        deadline: Duration,
    ) -> impl Future<Output = Result<PushResponse, Failure>> + Send;
}

/// The node over HTTPS, as agents reach it.
pub struct HttpsNode {
    client: http::Client,
    url: String,
    authorization: String,
    /// This agent's largest payload, advertised on every poll.
    max_payload: String,
}

impl HttpsNode {
    /// The node at `url`, with the connection's credential.
    pub fn new(client: http::Client, url: &str, credential: &str, max_payload: u64) -> HttpsNode {
        HttpsNode {
            client,
            url: url.to_owned(),
            authorization: format!("Bearer {credential}"),
            max_payload: max_payload.to_string(),
        }
    }

    async fn call(
        &self,
        path: &str,
        body: Vec<u8>,
        deadline: Duration,
        max_body: usize,
        extra: &[(&str, &str)],
    ) -> Result<Reply, Failure> {
        let url = format!("{}{}", self.url, path);
        let mut headers = vec![
            ("content-type", protocol::CONTENT_TYPE),
            (protocol::VERSION_HEADER, "1"),
            ("authorization", self.authorization.as_str()),
        ];
        headers.extend_from_slice(extra);
        let req = http::request(Method::POST, &url, &headers, body)
            .map_err(|e| Failure::Retry(format!("cannot build a request to the node URL {url}: {e}"), None))?;
        let reply = self
            .client
            .send(req, deadline, max_body)
            .await
            .map_err(|e| Failure::Retry(format!("node {} unreachable: {e}", self.url), None))?;
        if reply.status == StatusCode::OK {
            return Ok(reply);
        }
        Err(refusal(&reply))
    }
}

/// What a node's refusal means: decided by its code first, then its status.
fn refusal(reply: &Reply) -> Failure {
    let body = reply.error_body();
    let message = body
        .as_ref()
        .map(|b| b.error.clone())
        .unwrap_or_else(|| format!("the node answered {}", reply.status));
    let code = body.map(|b| b.code).unwrap_or_default();
    match (reply.status, code.as_str()) {
        (_, codes::REVOKED) => Failure::Revoked(message),
        (StatusCode::UNAUTHORIZED, _) => Failure::Unauthorized(message),
        (StatusCode::CONFLICT, codes::SEQUENCE_CONFLICT | codes::CONNECTION_STATE) => Failure::Conflict(message),
        (status, _) => Failure::Retry(format!("node answered {status}: {message}"), reply.retry_after()),
    }
}

/// Encodes a request; a failure is logged at error level (it means relay's limits disagree).
fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    protocol::encode(value).map_err(|e| {
        error!(error = %e, "cannot encode a request to the node");
        Failure::Retry(e.to_string(), None)
    })
}

/// Decodes an answer and checks its protocol version.
fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    reply: &Reply,
    version: impl Fn(&T) -> u16,
) -> Result<T, Failure> {
    let value: T = protocol::decode(what, &reply.body).map_err(|e| Failure::Retry(e.to_string(), None))?;
    protocol::check_version(version(&value)).map_err(|e| Failure::Retry(e.to_string(), None))?;
    Ok(value)
}

impl NodeApi for HttpsNode {
    async fn poll(&self, request: PollRequest, deadline: Duration, max_reply: usize) -> Result<PollResponse, Failure> {
        let body = encode(&request)?;
        let advertised = [(protocol::MAX_PAYLOAD_HEADER, self.max_payload.as_str())];
        let reply = self
            .call(protocol::POLL_PATH, body, deadline, max_reply, &advertised)
            .await?;
        decode("poll response", &reply, |r: &PollResponse| r.version)
    }

    async fn push(&self, request: PushRequest, deadline: Duration) -> Result<PushResponse, Failure> {
        let body = encode(&request)?;
        let deadline = deadline + transfer_time(body.len());
        let reply = self
            .call(protocol::PUSH_PATH, body, deadline, MAX_PUSH_REPLY_BYTES, &[])
            .await?;
        decode("push response", &reply, |r: &PushResponse| r.version)
    }
}

/// Everything the loops of one connection share.
struct Ctx<N> {
    agent: Agent,
    conn: AgentConnection,
    handle: Arc<LinkHandle>,
    node: Arc<N>,
}

impl<N> Clone for Ctx<N> {
    fn clone(&self) -> Self {
        Ctx {
            agent: self.agent.clone(),
            conn: self.conn.clone(),
            handle: self.handle.clone(),
            node: self.node.clone(),
        }
    }
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
    spawn_delivery(
        &agent,
        &conn,
        &handle,
        tracker,
        webhook_client,
        (outbox.clone(), inbox.clone()),
    );
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
    let node = HttpsNode::new(
        client,
        &conn.node_url,
        &credential,
        agent.settings().queue.max_payload_bytes,
    );
    let ctx = Ctx {
        agent: agent.clone(),
        conn: conn.clone(),
        handle: handle.clone(),
        node: Arc::new(node),
    };
    tracker.spawn(receive_loop(ctx.clone(), inbox).instrument(tracing::info_span!("receive", connection = %name)));
    tracker.spawn(send_loop(ctx, outbox).instrument(tracing::info_span!("send", connection = %name)));
}

/// Starts the sync engine of the connection when this side has a tracker, or else the
/// webhook worker for what the node sent, if a webhook is configured.
fn spawn_delivery(
    agent: &Agent,
    conn: &AgentConnection,
    handle: &Arc<LinkHandle>,
    tracker: &TaskTracker,
    webhook_client: http::Client,
    (outbox, inbox): (Queue, Queue),
) {
    let name = conn.name.clone();
    if let Some(engine) = agent.sync() {
        let link = crate::sync::engine::SyncLink {
            name,
            project: conn.project.clone(),
            outbox,
            inbox,
            health: handle.health.clone(),
        };
        // Like the webhook, sync applies whatever arrived; pausing happens on the node.
        let (active_tx, active_rx) = watch::channel(true);
        engine.spawn(link, active_rx, tracker, handle.deliver_token.clone());
        // The sender lives as long as the connection's tasks.
        tracker.spawn(async move {
            active_tx.closed().await;
        });
        return;
    }
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
    let inbox = AnyQueue::Sled(SledQueue::new(agent.store().clone(), inbox));
    tracker.spawn(
        async move {
            deliver::run(inbox, hook, webhook_client, settings, active_rx, health, token).await;
            drop(active_tx);
        }
        .instrument(tracing::info_span!("deliver", connection = %name, side = "agent")),
    );
}

impl<N: NodeApi> Ctx<N> {
    /// The node's payload limit, once a poll answer told us.
    fn node_max_payload(&self) -> Option<usize> {
        match self.handle.node_max_payload.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n as usize),
        }
    }

    /// Handles a failure of the loop whose hold is `own` ([`HOLD_POLL`] or [`HOLD_PUSH`]):
    /// waits out the backoff (false when the loop must stop).
    async fn failed(
        &self,
        own: &'static str,
        failure: Failure,
        backoff: &mut Backoff,
        token: &CancellationToken,
    ) -> bool {
        let health = &self.handle.health;
        let (reason, after) = match failure {
            Failure::Revoked(reason) => {
                self.agent.mark_revoked(&self.conn.name, &reason).await;
                return false;
            }
            Failure::Unauthorized(detail) => {
                let reason = format!(
                    "the node {} does not know this connection's credential ({detail}); retrying. If the node was restored \
                     from a backup or started on another data directory, fix that on the node; only a revocation stops this agent",
                    self.conn.node_url
                );
                if health.hold(HOLD_CREDENTIAL, reason.clone()) {
                    error!(%reason, "the node refuses the credential");
                }
                (reason, None)
            }
            Failure::Conflict(detail) => {
                let direction = if own == HOLD_POLL { "receiving" } else { "sending" };
                let reason = format!(
                    "the node refused with 409 sequence conflict, this agent and the node disagree on sequence \
                     numbers ({detail}): the agent's data directory was probably restored from a backup or copied. Nothing is removed; {direction} is held and retried \
                     until an operator fixes it (initiate and accept a new connection)"
                );
                if health.hold(own, reason.clone()) {
                    error!(%reason, "sequence conflict with the node");
                }
                (reason, None)
            }
            Failure::Retry(reason, after) => {
                if health.last_error().map(|e| e.message) != Some(reason.clone()) {
                    warn!(%reason, "exchange with the node failed; retrying");
                }
                health.error(reason.clone());
                (reason, after)
            }
        };
        Health::add(&health.failures, 1);
        Health::add(&health.reconnects, 1);
        let delay = backoff.next_delay(after);
        debug!(%reason, retry_in = ?delay, "retrying");
        crate::retry::sleep(delay, token).await
    }

    /// After a successful exchange: back to the first delay, and what it proves cleared.
    fn healthy(&self, backoff: &mut Backoff, cleared: &'static str) {
        backoff.reset();
        self.handle.health.contact();
        for what in [HOLD_CREDENTIAL, cleared] {
            if self.handle.health.release(what) {
                info!("the node accepts this connection's {what} again");
            }
        }
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

/// Sequence numbers the node skipped in `messages`, after `last` (what the inbox holds):
/// `(first, last)` of each gap.
fn gaps(last: u64, messages: &[protocol::WireMessage]) -> Vec<(u64, u64)> {
    let mut expected = last + 1;
    let mut out = Vec::new();
    for m in messages.iter().filter(|m| m.seq > last) {
        if m.seq > expected {
            out.push((expected, m.seq - 1));
        }
        expected = m.seq + 1;
    }
    out
}

/// Long-polls the node for messages after the inbox's durable high-water mark, stores them,
/// flushes, and polls again (which acknowledges them).
async fn receive_loop<N: NodeApi>(ctx: Ctx<N>, inbox: Queue) {
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
        let wait_ms = request.wait_ms;
        let max_reply = protocol::max_batch_bytes(max_payload.max(ctx.node_max_payload().unwrap_or(0)));
        // Room to receive the largest possible batch on a slow link; a dead connection is
        // still noticed sooner by HTTP/2 keep-alive pings.
        let poll_deadline = Duration::from_millis(wait_ms) + POLL_MARGIN + transfer_time(max_reply);
        let started = std::time::Instant::now();
        // The deadline is kept here too, so a half-open connection is noticed whatever the
        // transport does.
        let result = tokio::select! {
            biased;
            _ = token.cancelled() => return,
            r = tokio::time::timeout(poll_deadline, ctx.node.poll(request, poll_deadline, max_reply)) => r
                .unwrap_or_else(|_| Err(Failure::Retry(format!("no answer from the node within {poll_deadline:?}"), None))),
        };
        let resp = match result {
            Ok(r) => r,
            Err(f) => {
                confirm = true;
                if !ctx.failed(HOLD_POLL, f, &mut backoff, &token).await {
                    return;
                }
                continue;
            }
        };
        if wait_ms == 0 {
            ctx.handle.health.round_trip.observe(started.elapsed());
        }
        confirm = false;
        ctx.note_state(resp.state);
        ctx.handle
            .node_max_payload
            .store(resp.max_payload_bytes, Ordering::Relaxed);
        if let Err(problem) = protocol::check_messages(&resp.messages, usize::MAX) {
            let reason = format!("the node sent a malformed batch: {problem}");
            if !ctx
                .failed(HOLD_POLL, Failure::Retry(reason, None), &mut backoff, &token)
                .await
            {
                return;
            }
            continue;
        }
        if resp.messages.is_empty() {
            ctx.healthy(&mut backoff, HOLD_POLL);
            continue;
        }
        let before = inbox.last_seq();
        for (from, to) in gaps(before, &resp.messages) {
            let reason = format!(
                "messages {from} to {to} from the node never arrived: the node dead-lettered them (see `relay dead-letters \
                 list --direction out` on the node) or its data directory was restored"
            );
            warn!(%reason, "sequence gap from the node");
            ctx.handle.health.error(reason);
        }
        // A node that ignores the advertised limit (an older one) can send what never fits:
        // that blocks the connection until an operator acts, so say it loudly.
        let room = ctx.agent.settings().queue.max_bytes;
        if let Some(m) = resp
            .messages
            .iter()
            .find(|m| m.seq > before && m.body.len() as u64 > room)
        {
            let reason = format!(
                "message {} from the node ({} bytes) can never fit this agent's queue (queue.max_bytes {room}): \
                 raise queue.max_bytes, or upgrade the node so it sets such messages aside as dead letters",
                m.seq,
                m.body.len()
            );
            if ctx.handle.health.hold(HOLD_POLL, reason.clone()) {
                error!(%reason, "a message from the node does not fit");
            }
        }
        let bytes_received: u64 = resp.messages.iter().map(|m| m.body.len() as u64).sum();
        let messages: Vec<_> = resp.messages.into_iter().map(crate::node::server::from_wire).collect();
        let stored = inbox.append_remote(&messages).and(Ok(()));
        let stored = match stored {
            Ok(()) => ctx.agent.store().flush().await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => {
                Health::add(&ctx.handle.health.received, inbox.last_seq().saturating_sub(before));
                Health::add(&ctx.handle.health.bytes_received, bytes_received);
                ctx.healthy(&mut backoff, HOLD_POLL);
            }
            Err(e) => {
                // Not acknowledged: the node keeps them and offers them again.
                let retry_after = matches!(e, QueueError::FullCount { .. } | QueueError::FullBytes { .. })
                    .then_some(Duration::from_secs(5));
                if !ctx
                    .failed(
                        HOLD_POLL,
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

/// Pushes the outbox to the node in batches; removes only what the node confirmed holding.
async fn send_loop<N: NodeApi>(ctx: Ctx<N>, outbox: Queue) {
    let token = ctx.handle.token.clone();
    let mut backoff = backoff(&ctx.agent);
    let timeout = ctx.agent.settings().agent.request_timeout;
    // A retried outbound dead letter comes back at the end of the queue: wake up for it.
    let mut kicks = outbox.kicks();
    loop {
        let durable = outbox.durable_seq();
        kicks.borrow_and_update();
        let batch = match outbox.read_after(0, protocol::MAX_BATCH_MESSAGES, protocol::BATCH_TARGET_BYTES) {
            Ok(b) => b,
            Err(e) => {
                if !ctx
                    .failed(HOLD_PUSH, Failure::Retry(e.to_string(), None), &mut backoff, &token)
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
                Health::add(&ctx.handle.health.dead_lettered, 1);
                ctx.handle
                    .health
                    .error(format!("outbound message {} dead-lettered: {reason}", big.id));
                if let Err(e) = outbox.dead_letter(big, &reason) {
                    ctx.handle.health.error(format!("dead-lettering: {e}"));
                    if !crate::retry::sleep(backoff.next_delay(None), &token).await {
                        return;
                    }
                }
                continue;
            }
        }
        let (Some(first), Some(last)) = (batch.first().map(|m| m.seq), batch.last().map(|m| m.seq)) else {
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = outbox.wait_durable_after(durable) => {}
                _ = kicks.changed() => {}
            }
            continue;
        };
        let request = PushRequest {
            version: protocol::PROTOCOL_VERSION,
            messages: batch.into_iter().map(crate::node::server::to_wire).collect(),
        };
        let sizes: Vec<(u64, u64)> = request.messages.iter().map(|m| (m.seq, m.body.len() as u64)).collect();
        let bytes: u64 = sizes.iter().map(|(_, b)| b).sum();
        let deadline = timeout + transfer_time(bytes as usize + protocol::BATCH_OVERHEAD_BYTES);
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            _ = token.cancelled() => return,
            r = tokio::time::timeout(deadline, ctx.node.push(request, deadline)) => r
                .unwrap_or_else(|_| Err(Failure::Retry(format!("no answer from the node within {deadline:?}"), None))),
        };
        let resp = match result {
            Ok(r) => r,
            // Nothing is removed: the node deduplicates a retried batch by sequence number.
            Err(f) => {
                if !ctx.failed(HOLD_PUSH, f, &mut backoff, &token).await {
                    return;
                }
                continue;
            }
        };
        ctx.handle.health.round_trip.observe(started.elapsed());
        ctx.note_state(resp.state);
        // Never more than this batch: a high-water mark above it does not vouch for messages
        // the node has not seen from this outbox (queued since, or a copied data directory).
        let confirmed = resp.high_water.min(last);
        if confirmed < first {
            // The node holds none of the batch yet answered 200: retry later, not in a hot loop.
            let reason = format!(
                "the node answered a push of messages {first} to {last} with high-water mark {}: nothing stored",
                resp.high_water
            );
            if !ctx
                .failed(HOLD_PUSH, Failure::Retry(reason, None), &mut backoff, &token)
                .await
            {
                return;
            }
            continue;
        }
        if let Err(e) = outbox.remove_through(confirmed) {
            ctx.handle.health.error(format!("removing sent messages: {e}"));
        }
        let taken = sizes.iter().filter(|(seq, _)| *seq <= confirmed);
        Health::add(&ctx.handle.health.sent, taken.clone().count() as u64);
        Health::add(&ctx.handle.health.bytes_sent, taken.map(|(_, b)| b).sum());
        if confirmed < last {
            // The node's queue had room for part of the batch; the rest goes next.
            debug!(
                high_water = resp.high_water,
                sent_through = last,
                "node took part of the batch"
            );
        }
        ctx.healthy(&mut backoff, HOLD_PUSH);
    }
}
