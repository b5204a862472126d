//! The local HTTP API on both sides: `POST /v1/connections/{name}/messages` queues a payload
//! durably; `POST /v1/hooks/azure-devops` wakes the sync poller; `/healthz`, `/readyz` and
//! `/metrics` report on the process. Every request passes the [`crate::guard`] first.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::guard;
use crate::http::{self, Body, HeaderMap, HeaderValue, IncomingRequest, Method, Response, StatusCode};
use crate::protocol::codes;
use crate::store::{AnyQueue, AnyStore, NewMessage, NodeQueue, QueueError};

/// Why a connection cannot take a message now.
#[derive(Debug)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// Message.
    pub message: String,
}

/// What the intake needs from the side it serves.
pub trait IntakeTarget: Send + Sync + 'static {
    /// The queue that carries a local submission on connection `name` to the peer.
    fn outbox<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<AnyQueue, Refusal>>;
    /// The largest payload the other side accepts on connection `name`, when known.
    fn max_payload(&self, _name: &str) -> Option<usize> {
        None
    }
    /// `Ok` when the process is connected and delivering.
    fn ready(&self) -> BoxFuture<'_, Result<String, String>>;
    /// Prometheus text exposition.
    fn metrics(&self) -> BoxFuture<'_, String>;
    /// The sync engine a service hook wakes, when this side has a tracker.
    fn sync(&self) -> Option<&crate::sync::engine::Engine> {
        None
    }
}

/// A boxed future, for the trait methods an intake calls through `dyn IntakeTarget`.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The intake's fixed parts.
#[derive(Clone)]
pub struct Intake {
    /// The database (for pruning idempotency keys).
    pub store: AnyStore,
    /// The side served.
    pub target: Arc<dyn IntakeTarget>,
    /// Largest payload.
    pub max_payload: usize,
    /// Bearer token required on the message endpoint, when set.
    pub token: Option<Secret>,
    /// What the listener accepts from browsers, and its refusals so far.
    pub gate: Arc<Gate>,
    /// Trips when the process shuts down.
    pub shutdown: CancellationToken,
}

/// One listener's guard: its policy and the tally of what it refused.
#[derive(Debug)]
pub struct Gate {
    /// The policy.
    pub policy: guard::Policy,
    /// Refusals by reason, and when each was last logged.
    pub tally: guard::Tally,
}

impl Gate {
    /// A gate with `policy` and nothing refused yet.
    pub fn new(policy: guard::Policy) -> Gate {
        Gate {
            policy,
            tally: guard::Tally::default(),
        }
    }
}

impl Intake {
    /// The intake of `target`, with the limits of `settings`, the token and the guard's
    /// policy of its listener.
    pub fn new(
        target: Arc<dyn IntakeTarget>,
        store: AnyStore,
        settings: &crate::config::Settings,
        api_token: Option<Secret>,
        policy: guard::Policy,
        shutdown: CancellationToken,
    ) -> Intake {
        Intake {
            store,
            target,
            max_payload: settings.queue.max_payload_bytes as usize,
            token: api_token,
            gate: Arc::new(Gate::new(policy)),
            shutdown,
        }
    }

    /// Serves the local API on `listener` until shutdown, and prunes idempotency keys older
    /// than `idempotency_ttl` meanwhile; both tasks run on `tracker`.
    pub fn spawn(
        self,
        tracker: &tokio_util::task::TaskTracker,
        listener: tokio::net::TcpListener,
        name: &'static str,
        idempotency_ttl: std::time::Duration,
    ) {
        let (store, token) = (self.store.clone(), self.shutdown.clone());
        tracker.spawn(http::serve(
            listener,
            http::ServerOptions {
                tls: None,
                max_connections: 1024,
                name,
            },
            move |req, peer| handle(self.clone(), req, peer),
            token.clone(),
        ));
        tracker.spawn(store.prune_idempotency_keys(idempotency_ttl, token));
    }
}

/// Maps a queue error to an HTTP reply: full by count 429 (retry later), a database that
/// cannot be reached 503 (retry shortly), full by bytes or a failed disk 507.
pub fn queue_error_response(e: &QueueError) -> Response<Body> {
    match e {
        QueueError::FullCount { .. } => http::with_retry_after(
            http::error(StatusCode::TOO_MANY_REQUESTS, codes::QUEUE_FULL, e.to_string()),
            5,
        ),
        QueueError::FullBytes { .. } => http::with_retry_after(
            http::error(StatusCode::INSUFFICIENT_STORAGE, codes::QUEUE_FULL_BYTES, e.to_string()),
            30,
        ),
        // The database is down or restarting: nothing was stored, and a retry may succeed.
        QueueError::Unavailable(_) => http::with_retry_after(
            http::error(StatusCode::SERVICE_UNAVAILABLE, codes::STORAGE, e.to_string()),
            1,
        ),
        _ => http::error(StatusCode::INSUFFICIENT_STORAGE, codes::STORAGE, e.to_string()),
    }
}

/// An `Idempotency-Key` relay accepts: 1–255 visible ASCII characters.
pub fn valid_idempotency_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic())
}

/// The value of header `name` when `valid` accepts it; `Err` carries a detail for the error
/// message (which byte is not ASCII), possibly empty.
fn ascii_header(req: &IncomingRequest, name: &str, valid: fn(&str) -> bool) -> Result<Option<String>, String> {
    let Some(value) = req.headers().get(name) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if let Some(at) = bytes.iter().position(|b| !b.is_ascii()) {
        return Err(format!(" (byte {at} is 0x{:02x}, not ASCII)", bytes[at]));
    }
    let text = String::from_utf8_lossy(bytes).into_owned();
    if valid(&text) {
        Ok(Some(text))
    } else {
        Err(String::new())
    }
}

/// One header as the guard reads it: absent, once, or repeated.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> guard::Header<'a> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => guard::Header::Absent,
        (Some(v), None) => guard::Header::One(v.as_bytes()),
        (Some(_), Some(_)) => guard::Header::Repeated,
    }
}

/// What the guard reads from `req`.
fn guard_facts(req: &IncomingRequest) -> guard::Request<'_> {
    let headers = req.headers();
    guard::Request {
        method: req.method().as_str(),
        before_http11: req.version() < http::Version::HTTP_11,
        authority: req.uri().authority().map(|a| a.as_str()),
        host: header(headers, "host"),
        origin: header(headers, "origin"),
        fetch_site: header(headers, "sec-fetch-site"),
        preflight_method: header(headers, "access-control-request-method"),
        private_network: headers
            .get("access-control-request-private-network")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")),
    }
}

/// Adds `headers` (lower-case constant names) to `resp`; a value that is no header value
/// (it came from a request header, so never) is left out.
fn add_headers(resp: &mut Response<Body>, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            resp.headers_mut().append(name, value);
        }
    }
}

/// Handles one request on the local API: the guard first, then the route.
pub async fn handle(intake: Intake, req: IncomingRequest, peer: SocketAddr) -> Response<Body> {
    let gate = intake.gate.clone();
    let cors = match guard::check(&gate.policy, &guard_facts(&req)) {
        guard::Verdict::Allow { cors } => cors,
        guard::Verdict::Preflight(headers) => {
            let mut resp = Response::new(Body::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            add_headers(&mut resp, headers);
            return resp;
        }
        guard::Verdict::Refuse(refusal) => {
            if let Some(left_out) = gate.tally.record(refusal.reason, std::time::Instant::now()) {
                tracing::warn!(
                    listener = gate.policy.keys().listener,
                    reason = refusal.reason.as_str(),
                    status = refusal.status,
                    %peer,
                    left_out,
                    "{} (logged at most once a minute per reason; left_out: refusals since the last line)",
                    refusal.message
                );
            }
            let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
            return http::error(status, refusal.code, refusal.message);
        }
    };
    let mut resp = route(intake, req).await;
    if let Some(origin) = cors {
        add_headers(&mut resp, guard::cors_headers(&origin));
    }
    if gate.policy.has_allowed_origins() {
        // Answers differ by Origin once some origin gets CORS headers: caches must know.
        resp.headers_mut().append("vary", HeaderValue::from_static("Origin"));
    }
    resp
}

/// The `/metrics` answer: the side's figures, then the guard's refusals.
async fn metrics(intake: &Intake) -> String {
    let counts: Vec<(&'static str, u64)> = intake
        .gate
        .tally
        .counts()
        .into_iter()
        .map(|(reason, n)| (reason.as_str(), n))
        .collect();
    let mut text = intake.target.metrics().await;
    text.push_str(&crate::metrics::render_refusals(
        intake.gate.policy.keys().listener,
        &counts,
    ));
    text
}

/// Routes a request the guard let through.
async fn route(intake: Intake, req: IncomingRequest) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => http::text(StatusCode::OK, "ok\n"),
        (&Method::GET, ["readyz"]) => match intake.target.ready().await {
            Ok(m) => http::text(StatusCode::OK, format!("ready: {m}\n")),
            Err(m) => http::text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {m}\n")),
        },
        (&Method::GET, ["metrics"]) => http::bytes(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&intake).await,
        ),
        (&Method::POST, ["v1", "connections", name, "messages"]) => {
            let name = (*name).to_owned();
            submit(intake, &name, req).await
        }
        (&Method::POST, ["v1", "hooks", "azure-devops"]) => crate::sync::hook::receive(intake.target.sync(), req).await,
        (_, ["v1", "connections", _, "messages"])
        | (_, ["healthz" | "readyz" | "metrics"])
        | (_, ["v1", "hooks", "azure-devops"]) => {
            http::error(StatusCode::METHOD_NOT_ALLOWED, codes::METHOD, "method not allowed")
        }
        _ => http::error(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            format!("no such endpoint: {path}"),
        ),
    }
}

async fn submit(intake: Intake, name: &str, req: IncomingRequest) -> Response<Body> {
    if let Some(token) = &intake.token {
        let given = http::bearer(req.headers()).unwrap_or("");
        if !crate::crypto::ct_eq(given.as_bytes(), token.expose().as_bytes()) {
            return http::error(StatusCode::UNAUTHORIZED, codes::TOKEN, "missing or wrong bearer token");
        }
    }
    if intake.shutdown.is_cancelled() {
        return http::error(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::SHUTTING_DOWN,
            "shutting down; retry shortly",
        );
    }
    // Read as bytes: `to_str` yields nothing for a value with bytes >= 0x80 (which hyper lets
    // through), and taking that as "no header" would queue a repeat twice or relabel the payload.
    let idempotency_key = match ascii_header(&req, "Idempotency-Key", valid_idempotency_key) {
        Ok(k) => k,
        Err(problem) => {
            return http::error(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST,
                format!("Idempotency-Key must be 1 to 255 visible ASCII characters{problem}"),
            )
        }
    };
    let content_type = match ascii_header(&req, "Content-Type", crate::protocol::valid_content_type) {
        Ok(ct) => ct.unwrap_or_else(|| "application/octet-stream".to_owned()),
        Err(problem) => {
            return http::error(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST,
                format!("Content-Type must be 1 to 255 visible ASCII characters or spaces{problem}"),
            )
        }
    };
    let outbox = match intake.target.outbox(name).await {
        Ok(q) => q,
        Err(r) => return http::error(r.status, r.code, r.message),
    };
    let peer_limit = intake.target.max_payload(name).filter(|l| *l < intake.max_payload);
    let limit = peer_limit.unwrap_or(intake.max_payload);
    let body: Bytes = match http::read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(http::BodyError::TooLarge { limit }) => {
            let whose = if peer_limit.is_some() {
                "the other side's queue.max_payload_bytes"
            } else {
                "queue.max_payload_bytes"
            };
            return http::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::TOO_LARGE,
                format!("payload larger than the limit of {limit} bytes ({whose})"),
            );
        }
        Err(e) => return http::error(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.to_string()),
    };
    let msg = NewMessage {
        id: crate::crypto::random_id(),
        content_type,
        enqueued_at_ms: crate::status::now_ms(),
        body,
    };
    // Durable when it resolves: committed, or flushed and synced with the group.
    let appended = match outbox.append(msg, idempotency_key.as_deref()).await {
        Ok(a) => a,
        Err(e) => return queue_error_response(&e),
    };
    let mut resp = http::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "id": appended.id, "seq": appended.seq }),
    );
    if appended.duplicate {
        resp.headers_mut()
            .insert("idempotent-replayed", http::HeaderValue::from_static("true"));
    }
    resp
}
