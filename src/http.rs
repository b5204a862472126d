//! HTTP plumbing shared by every listener and client: the bounded, gracefully stopping server
//! loop, bounded body reading, JSON replies, and a client with deadlines. The one place that
//! knows hyper, hyper-util and hyper-rustls.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
pub use hyper::header::HeaderValue;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
pub use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::protocol::ErrorBody;

/// Every response body: complete in memory (payloads and batches are bounded).
pub type Body = Full<Bytes>;
/// An incoming request.
pub type IncomingRequest = Request<Incoming>;

/// How long a peer may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take to send request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long open connections get to finish when shutting down.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Options of one listener.
#[derive(Clone)]
pub struct ServerOptions {
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Most simultaneous connections; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Name used in logs.
    pub name: &'static str,
}

/// Serves `handler` on `listener` until `token` is cancelled, then drains open connections
/// for a few seconds. The handler sees the peer's address.
pub async fn serve<H, F>(listener: TcpListener, opts: ServerOptions, handler: H, token: CancellationToken)
where
    H: Fn(IncomingRequest, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    let acceptor = opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    loop {
        let permit = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = opts.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        let handler = handler.clone();
        let span = tracing::debug_span!("conn", listener = opts.name, %peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req, peer);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let result = match acceptor {
                    Some(acceptor) => {
                        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!("TLS handshake timed out");
                                return;
                            }
                        };
                        let conn = builder.serve_connection(TokioIo::new(tls), service);
                        watcher.watch(conn).await
                    }
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        watcher.watch(conn).await
                    }
                };
                if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown()).await.is_err() {
        warn!(
            listener = opts.name,
            "connections still open after the drain deadline; closing them"
        );
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Larger than allowed.
    #[error("body larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The peer went away or sent garbage.
    #[error("reading body: {0}")]
    Read(String),
}

/// Reads a whole request body, refusing more than `limit` bytes (early, from Content-Length,
/// when the client declared it).
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A JSON error `{"error": message, "code": code}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: message.into(),
            code: code.to_owned(),
        },
    )
}

/// A response with raw bytes.
pub fn bytes(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    bytes(status, "text/plain; charset=utf-8", body.into())
}

/// Adds `Retry-After` (seconds).
pub fn with_retry_after(mut resp: Response<Body>, seconds: u64) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
        resp.headers_mut().insert(hyper::header::RETRY_AFTER, v);
    }
    resp
}

/// A header as text, when present and valid.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    header(headers, "authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::trim))
}

/// A response read by [`Client`].
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Whole body.
    pub body: Bytes,
}

impl Reply {
    /// `Retry-After` in seconds, when the peer sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        let value = header(&self.headers, "retry-after")?.trim();
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        // The other form is an HTTP date.
        let at = httpdate::parse_http_date(value).ok()?;
        Some(
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// The peer's clock from its `Date` header.
    pub fn date(&self) -> Option<std::time::SystemTime> {
        httpdate::parse_http_date(header(&self.headers, "date")?).ok()
    }

    /// The JSON error body, when the peer sent one.
    pub fn error_body(&self) -> Option<ErrorBody> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Why a request failed before any response was read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The deadline passed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, TLS or the exchange failed.
    #[error("{0}")]
    Transport(String),
    /// The response body exceeded the limit.
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Build(String),
}

/// Which proxy, if any, the agent's connections to the node go through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProxyConfig {
    /// `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` from the environment (either case).
    #[default]
    FromEnvironment,
    /// An explicit `http://[user:password@]host:port` proxy, with an optional no-proxy list.
    Url {
        /// The proxy URL (may carry credentials).
        url: String,
        /// Hosts reached directly, `NO_PROXY` syntax.
        no_proxy: Option<String>,
    },
    /// Always connect directly (webhooks on the local network).
    Direct,
}

/// How a destination is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A direct TCP connection.
    Direct,
    /// An HTTP CONNECT tunnel through this proxy (shown without credentials).
    Proxy {
        /// `scheme://host:port` of the proxy.
        proxy: String,
        /// Whether credentials are sent.
        authenticated: bool,
    },
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Direct => f.write_str("direct"),
            Route::Proxy {
                proxy,
                authenticated: true,
            } => write!(f, "via proxy {proxy} (with basic auth)"),
            Route::Proxy { proxy, .. } => write!(f, "via proxy {proxy}"),
        }
    }
}

/// A proxy URL without any credentials, for messages.
fn redact(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// Checks a configured proxy URL: `http://[user:password@]host:port`.
pub fn check_proxy_url(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|_| "the proxy URL is not a valid URL".to_owned())?;
    if uri.scheme_str() != Some("http") {
        return Err("the proxy URL must start with http:// (relay speaks HTTP CONNECT to the proxy)".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the proxy URL has no host".into());
    }
    Ok(())
}

/// Why the proxy did not open a tunnel; names the proxy, never its credentials.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// 407 from the proxy.
    #[error(
        "the proxy {proxy} answered 407 Proxy Authentication Required{}",
        if *.sent_credentials { ": it refused the user and password in the proxy URL" } else { ": put a user and password in the proxy URL (http://user:password@host:port, in agent.proxy or HTTPS_PROXY)" }
    )]
    AuthRequired {
        /// The proxy.
        proxy: String,
        /// Whether credentials were sent.
        sent_credentials: bool,
    },
    /// The proxy could not be reached.
    #[error("cannot connect to the proxy {proxy}: {detail}")]
    Unreachable {
        /// The proxy.
        proxy: String,
        /// Why.
        detail: String,
    },
    /// The proxy refused or failed the CONNECT.
    #[error("the proxy {proxy} did not open a tunnel to {target}: {detail}")]
    Refused {
        /// The proxy.
        proxy: String,
        /// Where the tunnel should have gone.
        target: String,
        /// What happened.
        detail: String,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TcpIo = TokioIo<tokio::net::TcpStream>;

/// A connector that dials directly or through an HTTP CONNECT proxy, per destination.
#[derive(Clone)]
pub struct ProxyConnector {
    direct: hyper_util::client::legacy::connect::HttpConnector,
    matcher: Arc<hyper_util::client::proxy::matcher::Matcher>,
}

impl ProxyConnector {
    /// A connector following `config`.
    pub fn new(direct: hyper_util::client::legacy::connect::HttpConnector, config: &ProxyConfig) -> ProxyConnector {
        use hyper_util::client::proxy::matcher::Matcher;
        let matcher = match config {
            ProxyConfig::FromEnvironment => Matcher::from_env(),
            ProxyConfig::Url { url, no_proxy } => Matcher::builder()
                .https(url.clone())
                .no(no_proxy.clone().unwrap_or_default())
                .build(),
            ProxyConfig::Direct => Matcher::builder().build(),
        };
        ProxyConnector {
            direct,
            matcher: Arc::new(matcher),
        }
    }

    /// A connector with default socket options, for asking about routes.
    pub fn for_config(config: &ProxyConfig) -> ProxyConnector {
        let mut direct = hyper_util::client::legacy::connect::HttpConnector::new();
        direct.enforce_http(false);
        ProxyConnector::new(direct, config)
    }

    /// How `url` would be reached (direct when it does not parse).
    pub fn route_to(&self, url: &str) -> Route {
        url.parse::<Uri>().map(|u| self.route(&u)).unwrap_or(Route::Direct)
    }

    /// How `dst` would be reached.
    pub fn route(&self, dst: &Uri) -> Route {
        match self.matcher.intercept(dst) {
            Some(i) => Route::Proxy {
                proxy: redact(i.uri()),
                authenticated: i.basic_auth().is_some(),
            },
            None => Route::Direct,
        }
    }
}

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = TcpIo;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<TcpIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        // HttpConnector is always ready; readiness is per call.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let Some(intercept) = self.matcher.intercept(&dst) else {
            let mut direct = self.direct.clone();
            return Box::pin(async move { direct.call(dst).await.map_err(Into::into) });
        };
        let proxy = redact(intercept.uri());
        let proxy_uri = intercept.uri().clone();
        let auth = intercept.basic_auth().cloned();
        let target = format!("{}:{}", dst.host().unwrap_or(""), dst.port_u16().unwrap_or(443));
        let mut direct = self.direct.clone();
        Box::pin(async move {
            let io = direct.call(proxy_uri).await.map_err(|e| {
                Box::new(ProxyError::Unreachable {
                    proxy: proxy.clone(),
                    detail: error_chain(&e),
                }) as BoxError
            })?;
            let tcp = connect_tunnel(io.into_inner(), &target, auth.as_ref())
                .await
                .map_err(|problem| Box::new(problem.into_error(proxy, target, auth.is_some())) as BoxError)?;
            Ok(TokioIo::new(tcp))
        })
    }
}

/// What went wrong in the CONNECT exchange.
enum TunnelProblem {
    Io(std::io::Error),
    Status(u16, String),
    Malformed(&'static str),
}

impl TunnelProblem {
    fn into_error(self, proxy: String, target: String, sent_credentials: bool) -> ProxyError {
        let detail = match self {
            TunnelProblem::Status(407, _) => {
                return ProxyError::AuthRequired {
                    proxy,
                    sent_credentials,
                }
            }
            TunnelProblem::Status(code @ (401 | 403), reason) if sent_credentials => {
                format!("it answered {code} {reason}; check the user and password in the proxy URL")
            }
            TunnelProblem::Status(code, reason) => format!("it answered {code} {reason}"),
            TunnelProblem::Io(e) => e.to_string(),
            TunnelProblem::Malformed(what) => what.to_owned(),
        };
        ProxyError::Refused { proxy, target, detail }
    }
}

/// Asks the proxy on `tcp` for a tunnel to `target` (HTTP CONNECT) and returns the stream
/// once it answers 200. Hand-rolled rather than hyper-util's `Tunnel` so the operator learns
/// the proxy's actual status.
async fn connect_tunnel(
    mut tcp: tokio::net::TcpStream,
    target: &str,
    auth: Option<&HeaderValue>,
) -> Result<tokio::net::TcpStream, TunnelProblem> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(auth) = auth {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    tcp.write_all(&request).await.map_err(TunnelProblem::Io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = tcp.read(&mut chunk).await.map_err(TunnelProblem::Io)?;
        if n == 0 {
            return Err(TunnelProblem::Malformed(
                "the proxy closed the connection before answering",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 16 * 1024 {
            return Err(TunnelProblem::Malformed("the proxy's answer headers are too long"));
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (
        parts.next().unwrap_or(""),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    );
    let reason = parts.next().unwrap_or("").trim().to_owned();
    let Some(code) = code.filter(|_| version.starts_with("HTTP/1.")) else {
        return Err(TunnelProblem::Malformed("the proxy did not answer with HTTP"));
    };
    if code != 200 {
        return Err(TunnelProblem::Status(code, reason));
    }
    if end != buf.len() {
        // Nothing may follow the proxy's answer before our TLS handshake starts.
        return Err(TunnelProblem::Malformed("the proxy sent data after its answer"));
    }
    Ok(tcp)
}

/// An HTTP(S) client with connection reuse (keep-alive, and h2 where the server offers it)
/// and a deadline on every call, since hyper-util's client has none of its own.
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<ProxyConnector>, Body>,
}

impl Client {
    /// A client that speaks https only, with `tls` deciding whom to trust, through the proxy
    /// `proxy` says.
    pub fn https_only(tls: rustls::ClientConfig, connect_timeout: Duration, proxy: &ProxyConfig) -> Client {
        Client::build(tls, connect_timeout, true, proxy)
    }

    /// A client for webhooks: http, or https against `tls`; always direct.
    pub fn webhook(tls: rustls::ClientConfig, connect_timeout: Duration) -> Client {
        Client::build(tls, connect_timeout, false, &ProxyConfig::Direct)
    }

    fn build(tls: rustls::ClientConfig, connect_timeout: Duration, https_only: bool, proxy: &ProxyConfig) -> Client {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        let connector = ProxyConnector::new(http, proxy);
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let https = if https_only {
            builder
                .https_only()
                .enable_http1()
                .enable_http2()
                .wrap_connector(connector)
        } else {
            builder
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(connector)
        };
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .http2_keep_alive_interval(Some(Duration::from_secs(20)))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .build(https);
        Client { inner }
    }

    /// Sends a request and reads the whole response within `deadline`.
    pub async fn send(&self, req: Request<Body>, deadline: Duration, max_body: usize) -> Result<Reply, ClientError> {
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| ClientError::Transport(error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let body = match Limited::new(body, max_body).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(ClientError::TooLarge(max_body)),
                Err(e) => return Err(ClientError::Transport(format!("reading response: {e}"))),
            };
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(deadline, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(deadline)),
        }
    }

    /// Sends a request and returns once the status line and headers arrived within
    /// `deadline`, with at most `keep` bytes of the body (for an error reason). The rest of
    /// the body is dropped unread, and a body that breaks off or stalls after the status line
    /// is no error: a caller that decides on the status alone (webhook delivery) must not fail
    /// an answer the receiver already gave.
    pub async fn send_head(&self, req: Request<Body>, deadline: Duration, keep: usize) -> Result<Reply, ClientError> {
        let started = tokio::time::Instant::now();
        let resp = match tokio::time::timeout(deadline, self.inner.request(req)).await {
            Ok(r) => r.map_err(|e| ClientError::Transport(error_chain(&e)))?,
            Err(_) => return Err(ClientError::Timeout(deadline)),
        };
        let (parts, mut body) = resp.into_parts();
        let mut prefix = bytes::BytesMut::new();
        let read_prefix = async {
            while prefix.len() < keep {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let take = data.len().min(keep - prefix.len());
                            prefix.extend_from_slice(&data[..take]);
                        }
                    }
                    // The end, or a body cut off: what arrived is all the reason we get.
                    Some(Err(_)) | None => break,
                }
            }
        };
        let _ = tokio::time::timeout_at(started + deadline, read_prefix).await;
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: prefix.freeze(),
        })
    }
}

/// Builds a request with a body.
pub fn request(
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Request<Body>, ClientError> {
    let body: Bytes = body.into();
    let mut builder = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder = builder.header(CONTENT_LENGTH, body.len());
    builder
        .body(Full::new(body))
        .map_err(|e| ClientError::Build(e.to_string()))
}

/// "outer: inner: innermost", skipping repeats, so TLS and socket causes reach the operator.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = crate::tls::describe(err).unwrap_or_else(|| err.to_string());
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Where a URL points: its host (an IPv6 address without brackets; empty when it has none)
/// and its port, 443 for https and 80 otherwise when none is written. With `http::Uri` this is
/// the crate's one reading of URLs: configuration checks, doctor, egress and the node's
/// certificate names all go through it.
pub fn host_port(uri: &Uri) -> (String, u16) {
    let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
    let default = if uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    (host.to_owned(), uri.port_u16().unwrap_or(default))
}

/// False when the URL writes a port outside 1-65535, or a ':' with none: the parser reads any
/// run of digits as a port.
pub fn port_in_range(uri: &Uri) -> bool {
    let Some(authority) = uri.authority() else {
        return true;
    };
    match authority.as_str().strip_prefix(authority.host()) {
        Some("") | None => true,
        Some(rest) => rest
            .strip_prefix(':')
            .is_some_and(|port| matches!(port.parse::<u16>(), Ok(1..))),
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn host_and_port_of_urls() {
        let hp = |url: &str| host_port(&url.parse().unwrap());
        assert_eq!(hp("https://a.example:8443/x"), ("a.example".into(), 8443));
        assert_eq!(hp("HTTPS://a.example/x"), ("a.example".into(), 443));
        assert_eq!(hp("https://[::1]:8443"), ("::1".into(), 8443));
        assert_eq!(hp("http://10.0.0.1"), ("10.0.0.1".into(), 80));
        assert_eq!(hp("http://user:pw@proxy:3128"), ("proxy".into(), 3128));
        assert_eq!(hp("/relative").0, "");
        let ok = |url: &str| port_in_range(&url.parse().unwrap());
        assert!(ok("https://a") && ok("https://a:1") && ok("https://[::1]:65535/x"));
        assert!(!ok("https://a:0") && !ok("https://a:65536") && !ok("https://a:/"));
    }
}
