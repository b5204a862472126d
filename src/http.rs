//! HTTP plumbing shared by every listener and client: the bounded, gracefully stopping server
//! loop, bounded body reading, JSON replies, and a client with deadlines. The one place that
//! knows hyper, hyper-util and hyper-rustls.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
pub use hyper::header::HeaderValue;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
pub use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::protocol::ErrorBody;

/// Every response body: complete in memory (payloads and batches are bounded).
pub type Body = Full<Bytes>;
/// An incoming request.
pub type IncomingRequest = Request<Incoming>;

// Limits and deadlines of every listener, side by side. The node's public listener takes its
// budgets and the unauthenticated deadlines from `[node]` settings whose defaults are these.

/// How long a peer may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take to send request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a trusted connection (one that presented a valid credential, or any connection
/// of a local API) may sit with no request in flight. Longer than the clients' own pool idle
/// timeout, so the client normally closes first and never sends into a closing socket.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an unauthenticated connection may sit with no request in flight: from the end of
/// the handshake (h2 pings and settings do not count), and between requests.
pub const UNAUTHENTICATED_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unauthenticated connections a public listener holds at once; when full, the oldest is
/// shed for a newcomer.
pub const MAX_UNAUTHENTICATED: usize = 512;
/// Unauthenticated connections one peer (an IPv4 address, an IPv6 /64) may hold at once.
pub const MAX_UNAUTHENTICATED_PER_PEER: usize = 16;
/// An unauthenticated connection younger than this is not shed for a newcomer (the newcomer
/// is refused instead): a real client presents its credential on its first request, well
/// within it, and an attacker cannot flush a real client out by reconnecting quickly. A
/// listener with a short idle timeout uses a tenth of it, so idlers that reconnect in step
/// leave most of each cycle open to newcomers.
pub const SHED_MIN_AGE: Duration = Duration::from_secs(1);
/// How long a connection closed for idleness gets to finish what it is sending.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long open connections get to finish when shutting down.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// The whole request body of an authenticated request (batches over slow links).
pub const BODY_DEADLINE: Duration = Duration::from_secs(300);
/// The whole request body of an unauthenticated request (a redeem is at most 16 KiB).
pub const UNAUTHENTICATED_BODY_DEADLINE: Duration = Duration::from_secs(10);
/// After [`BODY_RATE_GRACE`], an unauthenticated body must have arrived at this average rate
/// (bytes per second): a trickle is cut long before the deadline.
pub const MIN_BODY_RATE: u64 = 1024;
/// The start an unauthenticated body gets before [`MIN_BODY_RATE`] applies.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(2);

/// The budgets and deadlines of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections start unauthenticated and move to the trusted budget once a request on
    /// them presents a valid credential ([`mark_authenticated`]). When false (local APIs),
    /// every connection is trusted from the start, and the listener stops accepting while
    /// `max_connections` are open.
    pub authenticate: bool,
    /// TLS handshake.
    pub handshake_timeout: Duration,
    /// Request headers.
    pub header_timeout: Duration,
    /// Trusted connections with no request in flight.
    pub idle_timeout: Duration,
    /// Unauthenticated connections with no request in flight.
    pub unauthenticated_idle_timeout: Duration,
    /// Unauthenticated connections at once (the first to be shed).
    pub max_unauthenticated: usize,
    /// Unauthenticated connections per peer.
    pub max_unauthenticated_per_peer: usize,
    /// Unauthenticated connections younger than this are not shed.
    pub shed_min_age: Duration,
}

impl Default for ListenerLimits {
    /// A local API's listener: every connection trusted.
    fn default() -> Self {
        ListenerLimits {
            authenticate: false,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            unauthenticated_idle_timeout: UNAUTHENTICATED_IDLE_TIMEOUT,
            max_unauthenticated: MAX_UNAUTHENTICATED,
            max_unauthenticated_per_peer: MAX_UNAUTHENTICATED_PER_PEER,
            shed_min_age: SHED_MIN_AGE,
        }
    }
}

impl ListenerLimits {
    /// A public listener: connections start unauthenticated, are closed after
    /// `unauthenticated_idle_timeout` without a request, and at most
    /// `max_unauthenticated` of them, `per_peer` from one peer, are held at once.
    pub fn public(
        unauthenticated_idle_timeout: Duration,
        max_unauthenticated: usize,
        per_peer: usize,
    ) -> ListenerLimits {
        ListenerLimits {
            authenticate: true,
            unauthenticated_idle_timeout,
            max_unauthenticated,
            max_unauthenticated_per_peer: per_peer,
            shed_min_age: SHED_MIN_AGE.min(unauthenticated_idle_timeout / 10),
            ..ListenerLimits::default()
        }
    }
}

/// Options of one listener.
#[derive(Clone)]
pub struct ServerOptions {
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Most simultaneous trusted connections. On a local API, more wait in the kernel's
    /// accept queue; on a public listener, an authenticated connection beyond it stays in the
    /// unauthenticated budget.
    pub max_connections: usize,
    /// Name used in logs.
    pub name: &'static str,
}

/// Where one connection stands in its listener's budgets.
struct Entry {
    peer: IpAddr,
    opened: Instant,
    shed: CancellationToken,
}

#[derive(Default)]
struct Pools {
    /// Unauthenticated connections by id, so oldest first.
    unauthenticated: BTreeMap<u64, Entry>,
    per_peer: HashMap<IpAddr, usize>,
    trusted: usize,
}

impl Pools {
    fn remove_unauthenticated(&mut self, id: u64) -> Option<Entry> {
        let entry = self.unauthenticated.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&entry.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&entry.peer);
            }
        }
        Some(entry)
    }
}

/// Why a new connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// Its peer already holds its share of unauthenticated connections.
    PeerShare,
    /// Every unauthenticated slot is taken by connections too young to shed.
    Full,
}

/// The two budgets of a public listener: unauthenticated connections (capped per peer, the
/// first to be shed) and trusted ones, which unauthenticated traffic never displaces.
struct Admission {
    limits: ListenerLimits,
    max_trusted: usize,
    next_id: AtomicU64,
    pools: Mutex<Pools>,
}

/// One connection's place in the budgets; leaving it releases the place.
struct Ticket {
    id: u64,
    admission: Arc<Admission>,
    trusted: AtomicBool,
    shed: CancellationToken,
    /// Requests being handled on the connection; idle means zero.
    in_flight: watch::Sender<usize>,
}

/// The peer key budgets count by: IPv4 addresses, IPv6 /64 networks (one host often has a
/// whole /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

impl Admission {
    fn new(limits: ListenerLimits, max_trusted: usize) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            max_trusted,
            next_id: AtomicU64::new(0),
            pools: Mutex::new(Pools::default()),
        })
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ticket(self: &Arc<Self>, id: u64, trusted: bool, shed: CancellationToken) -> Arc<Ticket> {
        Arc::new(Ticket {
            id,
            admission: self.clone(),
            trusted: AtomicBool::new(trusted),
            shed,
            in_flight: watch::channel(0).0,
        })
    }

    /// A trusted connection (local APIs; the accept loop bounds them).
    fn admit_trusted(self: &Arc<Self>) -> Arc<Ticket> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pools().trusted += 1;
        self.ticket(id, true, CancellationToken::new())
    }

    /// A new unauthenticated connection from `peer`, at `now`: refused when its peer holds its
    /// share; when the budget is full, the oldest unauthenticated connection is shed for it,
    /// unless that one is younger than the listener's `shed_min_age`.
    fn admit(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Result<Arc<Ticket>, Refused> {
        let peer = peer_key(peer);
        let mut pools = self.pools();
        if pools.per_peer.get(&peer).copied().unwrap_or(0) >= self.limits.max_unauthenticated_per_peer {
            return Err(Refused::PeerShare);
        }
        if pools.unauthenticated.len() >= self.limits.max_unauthenticated {
            let oldest = pools
                .unauthenticated
                .iter()
                .next()
                .filter(|(_, e)| now.saturating_duration_since(e.opened) >= self.limits.shed_min_age)
                .map(|(id, _)| *id)
                .ok_or(Refused::Full)?;
            if let Some(entry) = pools.remove_unauthenticated(oldest) {
                entry.shed.cancel();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shed = CancellationToken::new();
        pools.unauthenticated.insert(
            id,
            Entry {
                peer,
                opened: now,
                shed: shed.clone(),
            },
        );
        *pools.per_peer.entry(peer).or_insert(0) += 1;
        drop(pools);
        Ok(self.ticket(id, false, shed))
    }

    /// Moves a connection to the trusted budget, when there is room; true when it is trusted.
    fn promote(&self, ticket: &Ticket) -> bool {
        let mut pools = self.pools();
        if ticket.trusted.load(Ordering::SeqCst) {
            return true;
        }
        if ticket.shed.is_cancelled() || pools.trusted >= self.max_trusted {
            return false;
        }
        pools.remove_unauthenticated(ticket.id);
        pools.trusted += 1;
        ticket.trusted.store(true, Ordering::SeqCst);
        true
    }

    /// (unauthenticated, trusted) connections held now.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let pools = self.pools();
        (pools.unauthenticated.len(), pools.trusted)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut pools = self.admission.pools();
        if self.trusted.load(Ordering::SeqCst) {
            pools.trusted -= 1;
        } else {
            pools.remove_unauthenticated(self.id);
        }
    }
}

impl Ticket {
    fn idle_timeout(&self) -> Duration {
        if self.trusted.load(Ordering::SeqCst) {
            self.admission.limits.idle_timeout
        } else {
            self.admission.limits.unauthenticated_idle_timeout
        }
    }
}

/// A request in flight on a connection, for as long as its handler runs.
struct InFlight(Arc<Ticket>);

impl InFlight {
    fn enter(ticket: Arc<Ticket>) -> InFlight {
        ticket.in_flight.send_modify(|n| *n += 1);
        InFlight(ticket)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

tokio::task_local! {
    /// The connection of the request being handled.
    static CONNECTION: Arc<Ticket>;
}

/// Tells the listener that the request being handled presented a valid credential: its
/// connection moves to the trusted budget (when there is room), gets the longer idle timeout
/// and is no longer shed for newcomers. True when the connection now counts as trusted.
/// Called once per authenticated request; cheap after the first.
pub fn mark_authenticated() -> bool {
    CONNECTION.try_with(|t| t.admission.promote(t)).unwrap_or(false)
}

/// Any stream a connection is served over.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Serves `handler` on a local API's `listener` until `token` is cancelled, then drains open
/// connections for a few seconds. The handler sees the peer's address.
pub async fn serve<H, F>(listener: TcpListener, opts: ServerOptions, handler: H, token: CancellationToken)
where
    H: Fn(IncomingRequest, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(listener, opts, ListenerLimits::default(), handler, token).await
}

/// Like [`serve`], with `limits`: for a public listener, [`ListenerLimits::public`] and its
/// settings. Each connection is closed once idle past its idle timeout, shed when it is the
/// oldest unauthenticated one and a newcomer needs its slot, or drained on shutdown.
pub async fn serve_with<H, F>(
    listener: TcpListener,
    opts: ServerOptions,
    limits: ListenerLimits,
    handler: H,
    token: CancellationToken,
) where
    H: Fn(IncomingRequest, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    let acceptor = opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let admission = Admission::new(limits, opts.max_connections);
    // A local API stops accepting while full; a public listener decides per connection.
    let permits = (!limits.authenticate).then(|| Arc::new(tokio::sync::Semaphore::new(opts.max_connections)));
    let connections = TaskTracker::new();
    loop {
        let permit = match &permits {
            Some(permits) => tokio::select! {
                biased;
                _ = token.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => Some(p), Err(_) => break },
            },
            None => None,
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
        let ticket = if limits.authenticate {
            match admission.admit(peer.ip(), Instant::now()) {
                Ok(t) => t,
                Err(why) => {
                    debug!(listener = opts.name, %peer, reason = ?why, "connection refused: no unauthenticated slot");
                    continue;
                }
            }
        } else {
            admission.admit_trusted()
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let token = token.clone();
        let span = tracing::debug_span!("conn", listener = opts.name, %peer);
        connections.spawn(
            async move {
                let _permit = permit;
                let io: Box<dyn Io> = match acceptor {
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
                        let done = tokio::select! {
                            r = handshake => r,
                            _ = ticket.shed.cancelled() => return,
                            _ = token.cancelled() => return,
                        };
                        match done {
                            Ok(Ok(tls)) => Box::new(tls),
                            Ok(Err(e)) => {
                                debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!("TLS handshake timed out");
                                return;
                            }
                        }
                    }
                    None => Box::new(stream),
                };
                let on_conn = ticket.clone();
                let service = hyper::service::service_fn(move |req| {
                    let in_flight = InFlight::enter(on_conn.clone());
                    let fut = CONNECTION.scope(on_conn.clone(), handler(req, peer));
                    async move {
                        let resp = fut.await;
                        drop(in_flight);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(io), service);
                tokio::pin!(conn);
                let mut in_flight = ticket.in_flight.subscribe();
                let result = loop {
                    enum Event<R> {
                        Ended(R),
                        Changed,
                        Idle(Duration),
                        Shed,
                        Stop,
                    }
                    let idle = *in_flight.borrow_and_update() == 0;
                    let wait = ticket.idle_timeout();
                    let event = tokio::select! {
                        r = conn.as_mut() => Event::Ended(r),
                        _ = in_flight.changed() => Event::Changed,
                        _ = tokio::time::sleep(wait), if idle => Event::Idle(wait),
                        _ = ticket.shed.cancelled() => Event::Shed,
                        _ = token.cancelled() => Event::Stop,
                    };
                    let grace = match event {
                        Event::Ended(r) => break r,
                        Event::Changed => continue,
                        Event::Idle(wait) => {
                            debug!("no request for {wait:?}; closing the connection");
                            CLOSE_GRACE
                        }
                        Event::Shed => {
                            debug!("oldest unauthenticated connection; shed for a newcomer");
                            break Ok(());
                        }
                        Event::Stop => DRAIN_DEADLINE,
                    };
                    // Finish what is in flight (h2: GOAWAY), then drop the socket regardless.
                    conn.as_mut().graceful_shutdown();
                    break tokio::time::timeout(grace, conn.as_mut()).await.unwrap_or(Ok(()));
                };
                if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN_DEADLINE + CLOSE_GRACE, connections.wait())
        .await
        .is_err()
    {
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
    /// Not received in time, or slower than the minimum rate.
    #[error("body not received in time ({received} bytes after {elapsed:?})")]
    TooSlow {
        /// Bytes received.
        received: usize,
        /// Time taken until it was cut.
        elapsed: Duration,
    },
    /// The peer went away or sent garbage.
    #[error("reading body: {0}")]
    Read(String),
}

/// How fast a request body must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPace {
    /// The whole body within this.
    pub deadline: Duration,
    /// After `grace`, at least this average rate in bytes per second (0: no minimum).
    pub min_rate: u64,
    /// The start before `min_rate` applies.
    pub grace: Duration,
}

impl BodyPace {
    /// Authenticated requests: a generous deadline, no minimum rate.
    pub const AUTHENTICATED: BodyPace = BodyPace {
        deadline: BODY_DEADLINE,
        min_rate: 0,
        grace: BODY_DEADLINE,
    };

    /// Unauthenticated requests: the whole body within `deadline`, at [`MIN_BODY_RATE`]
    /// after [`BODY_RATE_GRACE`].
    pub fn unauthenticated(deadline: Duration) -> BodyPace {
        BodyPace {
            deadline,
            min_rate: MIN_BODY_RATE,
            grace: BODY_RATE_GRACE,
        }
    }

    /// How long a body that has sent `received` bytes may take in all so far.
    pub fn allowed(&self, received: u64) -> Duration {
        if self.min_rate == 0 {
            return self.deadline;
        }
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
        (self.grace + earned).min(self.deadline)
    }
}

/// Reads a whole request body, refusing more than `limit` bytes (early, from Content-Length,
/// when the client declared it), with the authenticated deadline.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    read_body_paced(body, limit, BodyPace::AUTHENTICATED).await
}

/// Reads a whole request body of at most `limit` bytes, cut when it falls behind `pace`.
pub async fn read_body_paced(body: Incoming, limit: usize, pace: BodyPace) -> Result<Bytes, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    let start = Instant::now();
    let mut body = std::pin::pin!(Limited::new(body, limit));
    let mut buf = bytes::BytesMut::new();
    loop {
        let until = start + pace.allowed(buf.len() as u64);
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => {
                return Err(BodyError::TooSlow {
                    received: buf.len(),
                    elapsed: start.elapsed(),
                })
            }
            Ok(None) => break,
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(BodyError::TooLarge { limit })
            }
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod server_tests {
    use super::*;

    fn limits() -> ListenerLimits {
        ListenerLimits::public(Duration::from_secs(10), 3, 2)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_peer_holds_at_most_its_share_and_a_full_budget_sheds_its_oldest() {
        let admission = Admission::new(limits(), 1);
        let t0 = Instant::now();
        let a1 = admission.admit(ip(1), t0).unwrap();
        let _a2 = admission.admit(ip(1), t0).unwrap();
        assert_eq!(admission.admit(ip(1), t0).err(), Some(Refused::PeerShare));
        let _b1 = admission.admit(ip(2), t0).unwrap();
        // Full, and everyone younger than the shed age: the newcomer waits its turn.
        assert_eq!(admission.admit(ip(3), t0).err(), Some(Refused::Full));
        // Once old enough, the oldest makes room.
        let later = t0 + Duration::from_secs(1);
        let _c1 = admission.admit(ip(3), later).unwrap();
        assert!(a1.shed.is_cancelled());
        assert_eq!(admission.counts(), (3, 0));
        // The shed connection's own departure does not free anyone else's slot.
        drop(a1);
        assert_eq!(admission.counts(), (3, 0));
        // Its peer may come back: it holds one of its two.
        let _a3 = admission.admit(ip(1), later + Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn an_authenticated_connection_leaves_the_unauthenticated_budget_and_is_never_shed() {
        let admission = Admission::new(limits(), 1);
        let t0 = Instant::now();
        let agent = admission.admit(ip(1), t0).unwrap();
        assert!(admission.promote(&agent));
        assert!(admission.promote(&agent), "promoting twice is harmless");
        assert_eq!(admission.counts(), (0, 1));
        assert_eq!(agent.idle_timeout(), IDLE_TIMEOUT);
        // Its address's share is free again, and newcomers shed only the unauthenticated.
        let later = t0 + Duration::from_secs(5);
        let idlers: Vec<_> = (0..3).map(|i| admission.admit(ip(1 + i), t0).unwrap()).collect();
        let _newcomer = admission.admit(ip(9), later).unwrap();
        assert!(!agent.shed.is_cancelled());
        assert!(idlers[0].shed.is_cancelled());
        // The agents' budget is full: a second authenticated connection stays unauthenticated.
        let second = admission.admit(ip(8), later).unwrap();
        assert!(!admission.promote(&second));
        assert_eq!(second.idle_timeout(), Duration::from_secs(10));
        drop(agent);
        assert_eq!(admission.counts().1, 0);
        assert!(admission.promote(&second));
    }

    #[test]
    fn ipv6_peers_share_a_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(peer_key(mapped), ip(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_when_idle_never_while_a_request_is_in_flight() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started, release) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let (s, r) = (started.clone(), release.clone());
        let token = CancellationToken::new();
        let opts = ServerOptions {
            tls: None,
            max_connections: 4,
            name: "test",
        };
        let limits = ListenerLimits::public(Duration::from_secs(10), 8, 8);
        tokio::spawn(serve_with(
            listener,
            opts,
            limits,
            move |_req, _peer| {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    s.notify_one();
                    r.notified().await;
                    text(StatusCode::OK, "ok\n")
                }
            },
            token.clone(),
        ));
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        started.notified().await;
        // An hour passes while the handler works: a request in flight is not idleness.
        tokio::time::advance(Duration::from_secs(3600)).await;
        release.notify_one();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.ends_with(b"ok\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed with a request in flight");
            seen.extend_from_slice(&buf[..n]);
        }
        // Then nothing: closed by the unauthenticated idle timeout after the answer.
        let answered = Instant::now();
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
        let idle = answered.elapsed();
        assert!(
            idle >= Duration::from_secs(10) && idle <= Duration::from_secs(10) + CLOSE_GRACE,
            "{idle:?}"
        );
        token.cancel();
    }

    #[test]
    fn an_unauthenticated_body_earns_time_by_arriving() {
        let pace = BodyPace::unauthenticated(Duration::from_secs(10));
        assert_eq!(pace.allowed(0), BODY_RATE_GRACE);
        assert_eq!(
            pace.allowed(MIN_BODY_RATE * 3),
            BODY_RATE_GRACE + Duration::from_secs(3)
        );
        assert_eq!(
            pace.allowed(16 * 1024),
            Duration::from_secs(10),
            "capped by the deadline"
        );
        assert_eq!(BodyPace::AUTHENTICATED.allowed(0), BODY_DEADLINE);
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyConfig {
    /// `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` from the environment (either case).
    FromEnvironment {
        /// How relay answers the proxy's challenges.
        auth: ProxyLogin,
    },
    /// An explicit `http://[user:password@]host:port` proxy, with an optional no-proxy list.
    Url {
        /// The proxy URL (may carry credentials).
        url: String,
        /// Hosts reached directly, `NO_PROXY` syntax.
        no_proxy: Option<String>,
        /// How relay answers the proxy's challenges.
        auth: ProxyLogin,
    },
    /// Always connect directly (webhooks on the local network).
    Direct,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig::FromEnvironment {
            auth: ProxyLogin::default(),
        }
    }
}

/// How relay answers a proxy's `407`: the scheme (`agent.proxy_auth`), an account whose
/// password is in a file (`agent.proxy_user`, `agent.proxy_password_file`), read again at each
/// handshake (without one, the credentials in the proxy URL), and the Kerberos identity for
/// Negotiate (a keytab).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyLogin {
    /// Which scheme answers.
    pub scheme: ProxyAuth,
    /// The account and the file holding its password.
    pub account: Option<(String, std::path::PathBuf)>,
    /// The keytab, the client principal and the proxy's service principal.
    pub kerberos: crate::proxy_auth::kerberos::KerberosLogin,
}

/// Which scheme answers a proxy's `407` (`agent.proxy_auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyAuth {
    /// The strongest the proxy offers that relay has credentials for: Negotiate with a
    /// keytab, NTLM with a password (inside Negotiate when the proxy offers only that), Basic
    /// for the credentials of a proxy URL when the proxy offers nothing better.
    #[default]
    Auto,
    /// Negotiate only: Kerberos with a keytab, else NTLM inside Negotiate with a password.
    Negotiate,
    /// NTLM only.
    Ntlm,
    /// Basic only, even when the proxy offers NTLM as well.
    Basic,
}

/// How relay answers one challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `Negotiate`, Kerberos inside SPNEGO.
    Kerberos,
    /// `Negotiate` carrying NTLM messages, as Windows clients send them without a ticket.
    NegotiateNtlm,
    /// `NTLM`.
    Ntlm,
    /// `Basic`.
    Basic,
}

/// The credentials relay has for a proxy.
#[derive(Debug, Clone, Copy)]
struct Have {
    /// A keytab or a credential cache.
    kerberos: bool,
    /// A user and password (a password file or the proxy URL).
    password: bool,
    /// The password comes from `agent.proxy_password_file`: a domain account, never Basic
    /// unless pinned.
    from_file: bool,
}

impl ProxyAuth {
    /// The scheme to answer `offered` with, if any.
    fn choose(self, offered: &[String], have: Have) -> Option<Scheme> {
        let offers = |scheme: &str| offered.iter().any(|s| s.eq_ignore_ascii_case(scheme));
        let negotiate = offers("negotiate");
        match self {
            ProxyAuth::Auto | ProxyAuth::Negotiate if negotiate && have.kerberos => Some(Scheme::Kerberos),
            ProxyAuth::Auto | ProxyAuth::Ntlm if offers("ntlm") && have.password => Some(Scheme::Ntlm),
            ProxyAuth::Auto | ProxyAuth::Negotiate if negotiate && have.password => Some(Scheme::NegotiateNtlm),
            ProxyAuth::Auto if offers("basic") && have.password && !have.from_file => Some(Scheme::Basic),
            ProxyAuth::Basic if offers("basic") && have.password => Some(Scheme::Basic),
            _ => None,
        }
    }

    /// The header scheme a pin stands for, when it pins one.
    fn pinned_name(self) -> Option<&'static str> {
        match self {
            ProxyAuth::Auto => None,
            ProxyAuth::Negotiate => Some("Negotiate"),
            ProxyAuth::Ntlm => Some("NTLM"),
            ProxyAuth::Basic => Some("Basic"),
        }
    }
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
            } => write!(
                f,
                "via proxy {proxy} (with a user and password: NTLM or Basic, as the proxy asks)"
            ),
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
    #[error("{}", auth_required(proxy, answered.as_deref(), *have_credentials, offered, *pinned))]
    AuthRequired {
        /// The proxy.
        proxy: String,
        /// How relay answered the challenge that the proxy refused (`Basic`, or `NTLM as
        /// DOMAIN\user`); `None` when it did not answer.
        answered: Option<String>,
        /// Whether the proxy URL carries credentials.
        have_credentials: bool,
        /// The schemes the proxy's `Proxy-Authenticate` challenges offered, as it spelled them.
        offered: Vec<String>,
        /// The scheme `agent.proxy_auth` pins, when it does.
        pinned: Option<ProxyAuth>,
    },
    /// The proxy could not be reached.
    #[error("cannot connect to the proxy {proxy}: {detail}")]
    Unreachable {
        /// The proxy.
        proxy: String,
        /// Why.
        detail: String,
    },
    /// The proxy refused this account's NTLM answer before, and its password has not changed
    /// since: relay does not try it again, so that the domain does not lock the account out.
    #[error(
        "the proxy {proxy} refused the NTLM answer for {user} earlier (wrong user or password, or a locked account); \
         relay does not try that password again, so that the domain does not lock the account out: \
         correct it in agent.proxy_password_file (read again at the next try), or in the proxy URL and restart relay; \
         once the account is unlocked or its password reset to this one, `relay proxy-retry` tries it again"
    )]
    Held {
        /// The proxy.
        proxy: String,
        /// The account, `DOMAIN\user`.
        user: String,
    },
    /// Kerberos could not make the Negotiate token for the proxy.
    #[error("the proxy {proxy} asked for Negotiate, and relay could not get a Kerberos ticket for {spn}: {detail}")]
    Kerberos {
        /// The proxy.
        proxy: String,
        /// The proxy's service principal asked for.
        spn: String,
        /// What went wrong.
        detail: crate::proxy_auth::kerberos::KerberosError,
    },
    /// The proxy refused relay's Kerberos ticket.
    #[error(
        "the proxy {proxy} refused relay's Kerberos ticket for {spn} (as {client}): the proxy's keytab may lack the current key of {spn}, or it answers to another name (set agent.proxy_spn)"
    )]
    KerberosRefused {
        /// The proxy.
        proxy: String,
        /// The client principal.
        client: String,
        /// The service principal.
        spn: String,
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

/// What a 407 means for the operator: the schemes the proxy asked for, whether relay answered
/// and was refused, and what to do.
fn auth_required(
    proxy: &str,
    answered: Option<&str>,
    have: bool,
    offered: &[String],
    pinned: Option<ProxyAuth>,
) -> String {
    let asked = if offered.is_empty() {
        "without naming a scheme (no Proxy-Authenticate)".to_owned()
    } else {
        format!("asking for {}", offered.join(", "))
    };
    let head = format!("the proxy {proxy} answered 407 Proxy Authentication Required, {asked}");
    let basic = offered.iter().any(|s| s.eq_ignore_ascii_case("basic"));
    match answered {
        Some("Basic") => {
            return format!("{head}: it refused the user and password in the proxy URL (sent as Basic)")
        }
        Some(how) => {
            return format!(
                "{head}: it refused relay's {how} (wrong user or password, or a locked account); relay does not try that password again until it changes, so that the domain does not lock the account out"
            )
        }
        None => {}
    }
    let offers = |scheme: &str| offered.iter().any(|s| s.eq_ignore_ascii_case(scheme));
    if let Some(name) = pinned.and_then(ProxyAuth::pinned_name).filter(|n| !offers(n)) {
        return format!(
            "{head}: agent.proxy_auth pins {name}, which the proxy does not offer; set agent.proxy_auth = \"auto\" to answer what it offers"
        );
    }
    let usable = basic || offers("ntlm") || offers("negotiate");
    if !usable && !offered.is_empty() {
        let kept = if have {
            "; the user and password in the proxy URL were not sent, since the proxy takes none of them (a password is never sent in clear to a proxy that asks for another scheme)"
        } else {
            ""
        };
        return format!(
            "{head}: relay answers Negotiate (Kerberos), NTLM and Basic proxy authentication{kept}; ask for a proxy rule that lets the agent's host reach the node, or a proxy port that takes one of them"
        );
    }
    if have && basic && !offers("ntlm") && !offers("negotiate") {
        return format!(
            "{head}: the proxy takes only Basic, which would send the password of agent.proxy_password_file in clear; relay does that only when agent.proxy_auth = \"basic\" says so"
        );
    }
    let kerberos = if offers("negotiate") {
        "agent.proxy_keytab (a keytab of the agent's service account, for Kerberos), or "
    } else {
        ""
    };
    format!("{head}: set {kerberos}a user and password: agent.proxy_user with agent.proxy_password_file, or in the proxy URL (http://user:password@host:port, or http://DOMAIN%5Cuser:password@host:port for NTLM, in agent.proxy or HTTPS_PROXY)")
}

/// The schemes a proxy's answer head offers in its `Proxy-Authenticate` headers, in order:
/// each challenge's first token (`Basic realm="…"` → `Basic`; `NTLM`; `Negotiate`).
fn offered_schemes(head: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("proxy-authenticate") {
            continue;
        }
        // Challenges are comma-separated, and so are a challenge's parameters (`a=b`); a
        // comma inside a quoted string is neither.
        let mut parts = Vec::new();
        let (mut quoted, mut start) = (false, 0);
        for (i, c) in value.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    parts.push(&value[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&value[start..]);
        for part in parts {
            let first = part.split_whitespace().next().unwrap_or("");
            if first.is_empty() || first.contains('=') {
                continue;
            }
            if !out.iter().any(|s| s.eq_ignore_ascii_case(first)) {
                out.push(first.to_owned());
            }
        }
    }
    out
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TcpIo = TokioIo<tokio::net::TcpStream>;

/// A connector that dials directly or through an HTTP CONNECT proxy, per destination.
#[derive(Clone)]
pub struct ProxyConnector {
    direct: hyper_util::client::legacy::connect::HttpConnector,
    matcher: Arc<hyper_util::client::proxy::matcher::Matcher>,
    auth: ProxyLogin,
}

/// The NTLM accounts and passwords a proxy refused (their fingerprints), in this process: not
/// tried again until they change, so that the domain does not lock the account out.
static NTLM_REFUSED: std::sync::Mutex<Vec<[u8; 32]>> = std::sync::Mutex::new(Vec::new());

/// One NTLM handshake at a time in this process, so that a refused password is answered once,
/// not once per connection that was opening at the same moment.
static NTLM_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How the last tunnel through each proxy (by its redacted URL) was authenticated, in this
/// process, for `relay status` and `relay doctor`.
static LAST_HANDSHAKES: std::sync::Mutex<std::collections::BTreeMap<String, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// How the last tunnel this process opened through `proxy` (as [`Route::Proxy`] shows it) was
/// authenticated: the schemes offered and the one answered.
pub fn last_proxy_handshake(proxy: &str) -> Option<String> {
    LAST_HANDSHAKES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(proxy)
        .cloned()
}

/// Forgets every proxy credential this process holds after a refusal (NTLM passwords the
/// proxy refused, keytabs the KDC refused), so that the next tunnel tries them again: for an
/// operator who had the account unlocked or corrected at the domain. Returns how many.
pub fn forget_refused_proxy_credentials() -> usize {
    let ntlm = std::mem::take(&mut *NTLM_REFUSED.lock().unwrap_or_else(|p| p.into_inner())).len();
    ntlm + crate::proxy_auth::kerberos::forget_refused()
}

impl ProxyConnector {
    /// A connector following `config`.
    pub fn new(direct: hyper_util::client::legacy::connect::HttpConnector, config: &ProxyConfig) -> ProxyConnector {
        use hyper_util::client::proxy::matcher::Matcher;
        let (matcher, auth) = match config {
            ProxyConfig::FromEnvironment { auth } => (Matcher::from_env(), auth.clone()),
            ProxyConfig::Url { url, no_proxy, auth } => (
                Matcher::builder()
                    .https(url.clone())
                    .no(no_proxy.clone().unwrap_or_default())
                    .build(),
                auth.clone(),
            ),
            ProxyConfig::Direct => (Matcher::builder().build(), ProxyLogin::default()),
        };
        ProxyConnector {
            direct,
            matcher: Arc::new(matcher),
            auth,
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
        let login = self.auth.clone();
        let pinned = login.scheme;
        let key = proxy.clone();
        let note = move |text: String| {
            LAST_HANDSHAKES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), text);
        };
        Box::pin(async move {
            let mut dial = async || {
                direct
                    .call(proxy_uri.clone())
                    .await
                    .map(TokioIo::into_inner)
                    .map_err(|e| {
                        Box::new(ProxyError::Unreachable {
                            proxy: proxy.clone(),
                            detail: error_chain(&e),
                        }) as BoxError
                    })
            };
            let fail = |e: ProxyError| Box::new(e) as BoxError;
            // First without credentials: the proxy's challenge says which scheme it takes. A
            // password goes out as NTLM to a proxy that offers NTLM, as Basic only to one that
            // offers Basic and nothing better.
            let first = connect_tunnel(dial().await?, &target, None).await;
            let offered = match first {
                Ok(tcp) => {
                    note("the proxy asked for no authentication".into());
                    return Ok(TokioIo::new(tcp));
                }
                Err(TunnelProblem::AuthRequired(offered)) => offered,
                Err(problem) => return Err(fail(problem.into_error(proxy, target, None, auth.is_some()))),
            };
            let have = Have {
                kerberos: login.kerberos.available(),
                password: login.account.is_some() || auth.is_some(),
                from_file: login.account.is_some(),
            };
            let refusal = |answered: Option<String>| {
                fail(ProxyError::AuthRequired {
                    proxy: proxy.clone(),
                    answered,
                    have_credentials: have.password || have.kerberos,
                    offered: offered.clone(),
                    pinned: (pinned != ProxyAuth::Auto).then_some(pinned),
                })
            };
            let Some(scheme) = pinned.choose(&offered, have) else {
                return Err(refusal(None));
            };
            let host = proxy_uri.host().unwrap_or_default().to_owned();
            let offered_list = offered.join(", ");
            if scheme == Scheme::Kerberos {
                let kerberos = login.kerberos.clone();
                let spn = kerberos.spn(&host);
                let made =
                    tokio::task::spawn_blocking(move || crate::proxy_auth::kerberos::initial_token(&kerberos, &host))
                        .await
                        .map_err(|e| {
                            fail(ProxyError::Refused {
                                proxy: proxy.clone(),
                                target: target.clone(),
                                detail: format!("the Kerberos handshake stopped: {e}"),
                            })
                        })?;
                let token = match made {
                    Ok(token) => token,
                    Err(detail) => {
                        if detail.locks_out() {
                            tracing::error!(%proxy, %detail, "the KDC refused the keytab's key; this keytab is not tried again until it changes");
                        }
                        return Err(fail(ProxyError::Kerberos { proxy, spn, detail }));
                    }
                };
                let header = format!("Negotiate {}", data_encoding::BASE64.encode(&token.token));
                // Proxies close the connection after a 407 (Squid does): a new one for the answer.
                return match connect_tunnel(dial().await?, &target, Some(header.as_bytes())).await {
                    Ok(tcp) => {
                        note(format!(
                            "the proxy offered {offered_list}; relay answered Negotiate (Kerberos) as {} for {}",
                            token.client, token.spn
                        ));
                        Ok(TokioIo::new(tcp))
                    }
                    Err(TunnelProblem::AuthRequired(_)) => Err(fail(ProxyError::KerberosRefused {
                        proxy,
                        client: token.client,
                        spn: token.spn,
                    })),
                    Err(problem) => Err(fail(problem.into_error(proxy, target, Some("Negotiate"), true))),
                };
            }
            let account = proxy_account(&login, auth.as_ref())
                .map_err(|detail| {
                    fail(ProxyError::Refused {
                        proxy: proxy.clone(),
                        target: target.clone(),
                        detail,
                    })
                })?
                .ok_or_else(|| refusal(None))?;
            if scheme == Scheme::Ntlm || scheme == Scheme::NegotiateNtlm {
                let header_scheme = if scheme == Scheme::Ntlm { "NTLM" } else { "Negotiate" };
                let fingerprint = account.fingerprint();
                let refused = || NTLM_REFUSED.lock().unwrap_or_else(|p| p.into_inner());
                let _turn = NTLM_TURN.lock().await;
                if refused().contains(&fingerprint) {
                    return Err(fail(ProxyError::Held {
                        proxy,
                        user: account.user,
                    }));
                }
                let how = if scheme == Scheme::Ntlm {
                    "NTLM (NTLMv2)"
                } else {
                    "Negotiate with NTLM inside (NTLMv2; no Kerberos keytab)"
                };
                // Proxies close the connection after a 407 (Squid does): a new one for the
                // handshake, whose messages share it.
                return match ntlm_tunnel(dial().await?, &target, &account, &host, header_scheme).await {
                    Ok(tcp) => {
                        note(format!(
                            "the proxy offered {offered_list}; relay answered {how} as {}",
                            account.user
                        ));
                        Ok(TokioIo::new(tcp))
                    }
                    Err(TunnelProblem::AuthRequired(_)) => {
                        refused().push(fingerprint);
                        tracing::error!(%proxy, user = %account.user, "the proxy refused the NTLM answer; this password is not tried again until it changes");
                        Err(refusal(Some(format!("NTLM answer as {}", account.user))))
                    }
                    Err(problem) => Err(fail(problem.into_error(proxy, target, Some(header_scheme), true))),
                };
            }
            let basic = HeaderValue::from_str(&format!("Basic {}", account.basic_token())).map_err(|_| {
                fail(ProxyError::Refused {
                    proxy: proxy.clone(),
                    target: target.clone(),
                    detail: "the proxy user cannot be sent as Basic".into(),
                })
            })?;
            // Proxies close the connection after a 407 (Squid does): a new one for the answer.
            match connect_tunnel(dial().await?, &target, Some(basic.as_bytes())).await {
                Ok(tcp) => {
                    note(format!("the proxy offered {offered_list}; relay answered Basic"));
                    Ok(TokioIo::new(tcp))
                }
                Err(TunnelProblem::AuthRequired(_)) => Err(refusal(Some("Basic".into()))),
                Err(problem) => Err(fail(problem.into_error(proxy, target, Some("Basic"), true))),
            }
        })
    }
}

/// The proxy account: from the password file, read now (a rotated password counts at the
/// next handshake), else from the proxy URL's credentials; `None` without either.
fn proxy_account(
    login: &ProxyLogin,
    url: Option<&HeaderValue>,
) -> Result<Option<crate::proxy_auth::NtlmAccount>, String> {
    match (&login.account, url) {
        (Some((user, path)), _) => Ok(Some(crate::proxy_auth::NtlmAccount::new(user, &read_password(path)?))),
        (None, Some(auth)) => ntlm_account(auth)
            .map(Some)
            .ok_or_else(|| "the user and password in the proxy URL cannot be read".to_owned()),
        (None, None) => Ok(None),
    }
}

/// The proxy account's password: the first line of its file.
fn read_password(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read agent.proxy_password_file {}: {e}", path.display()))?;
    let password = text.lines().next().unwrap_or("").trim_end_matches('\r').to_owned();
    if password.is_empty() {
        return Err(format!("agent.proxy_password_file {} is empty", path.display()));
    }
    Ok(password)
}

/// The NTLM account in a proxy URL's credentials (as hyper-util hands them on: a Basic header
/// value, percent-decoded), `DOMAIN\user` or `user@domain` with its password.
fn ntlm_account(basic: &HeaderValue) -> Option<crate::proxy_auth::NtlmAccount> {
    let encoded = basic.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = data_encoding::BASE64.decode(encoded.trim().as_bytes()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(crate::proxy_auth::NtlmAccount::new(user, password))
}

/// An NTLM handshake with the proxy on `tcp` (NEGOTIATE, the proxy's CHALLENGE, then
/// AUTHENTICATE, all on this one connection), then the tunnel to `target`; the messages go
/// under `scheme`, `NTLM` or `Negotiate`.
async fn ntlm_tunnel(
    mut tcp: tokio::net::TcpStream,
    target: &str,
    account: &crate::proxy_auth::NtlmAccount,
    proxy_host: &str,
    scheme: &str,
) -> Result<tokio::net::TcpStream, TunnelProblem> {
    use crate::proxy_auth::NtlmHandshake;
    let header = |token: &[u8]| format!("{scheme} {}", data_encoding::BASE64.encode(token));
    let (handshake, negotiate) =
        NtlmHandshake::start(account, proxy_host).map_err(|e| TunnelProblem::Scheme(e.to_string()))?;
    let challenged = exchange(&mut tcp, target, Some(header(&negotiate).as_bytes())).await?;
    match challenged.code {
        200 => return Ok(tcp),
        407 => {}
        code => return Err(TunnelProblem::Status(code, challenged.reason)),
    }
    let challenge = challenge_token(&challenged.head, scheme).ok_or(TunnelProblem::Malformed(
        "the proxy answered the NTLM negotiation without a challenge",
    ))?;
    let authenticate = handshake
        .answer(&challenge)
        .map_err(|e| TunnelProblem::Scheme(e.to_string()))?;
    let answered = exchange(&mut tcp, target, Some(header(&authenticate).as_bytes())).await?;
    match answered.code {
        200 => Ok(tcp),
        407 => Err(TunnelProblem::AuthRequired(offered_schemes(&answered.head))),
        code => Err(TunnelProblem::Status(code, answered.reason)),
    }
}

/// The token of a `Proxy-Authenticate: {scheme} <base64>` challenge, decoded.
fn challenge_token(head: &str, scheme: &str) -> Option<Vec<u8>> {
    head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("proxy-authenticate") {
            return None;
        }
        let (got, token) = value.trim().split_once(' ')?;
        if !got.eq_ignore_ascii_case(scheme) {
            return None;
        }
        data_encoding::BASE64.decode(token.trim().as_bytes()).ok()
    })
}

/// What went wrong in the CONNECT exchange.
enum TunnelProblem {
    Io(std::io::Error),
    /// 407, with the schemes its challenges offered.
    AuthRequired(Vec<String>),
    Status(u16, String),
    Malformed(&'static str),
    /// The authentication library could not make relay's answer.
    Scheme(String),
}

impl TunnelProblem {
    /// The error for the operator; `answered` names the scheme relay answered with, if any.
    fn into_error(self, proxy: String, target: String, answered: Option<&str>, have_credentials: bool) -> ProxyError {
        let detail = match self {
            TunnelProblem::AuthRequired(offered) => {
                return ProxyError::AuthRequired {
                    proxy,
                    answered: answered.map(str::to_owned),
                    have_credentials,
                    offered,
                    pinned: None,
                }
            }
            TunnelProblem::Status(code @ (401 | 403), reason) if answered.is_some() => {
                format!("it answered {code} {reason}; check the user and password in the proxy URL")
            }
            TunnelProblem::Status(code, reason) => format!("it answered {code} {reason}"),
            TunnelProblem::Io(e) => e.to_string(),
            TunnelProblem::Malformed(what) => what.to_owned(),
            TunnelProblem::Scheme(what) => what,
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
    auth: Option<&[u8]>,
) -> Result<tokio::net::TcpStream, TunnelProblem> {
    let answer = exchange(&mut tcp, target, auth).await?;
    match answer.code {
        200 => Ok(tcp),
        407 => Err(TunnelProblem::AuthRequired(offered_schemes(&answer.head))),
        code => Err(TunnelProblem::Status(code, answer.reason)),
    }
}

/// A proxy's answer to one CONNECT.
struct Answer {
    code: u16,
    reason: String,
    /// Status line and headers.
    head: String,
}

/// Largest body of a refusal that is read (and dropped) to keep its connection for the next
/// request of a handshake.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Sends one CONNECT for `target` on `tcp`, with `auth` as its `Proxy-Authorization`, and
/// reads the answer: after a 200 nothing may follow (the tunnel starts); after a refusal its
/// body is read too, so the connection can carry the next message of a handshake.
async fn exchange(tcp: &mut tokio::net::TcpStream, target: &str, auth: Option<&[u8]>) -> Result<Answer, TunnelProblem> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(auth) = auth {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth);
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
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
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
    if code == 200 {
        if end != buf.len() {
            // Nothing may follow the proxy's answer before our TLS handshake starts.
            return Err(TunnelProblem::Malformed("the proxy sent data after its answer"));
        }
        return Ok(Answer { code, reason, head });
    }
    let length = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    if let Some(length) = length.filter(|l| *l <= MAX_REFUSAL_BODY) {
        let mut have = buf.len() - end;
        while have < length {
            let n = tcp.read(&mut chunk).await.map_err(TunnelProblem::Io)?;
            if n == 0 {
                break;
            }
            have += n;
        }
    }
    Ok(Answer { code, reason, head })
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

    /// Sends a request and reads the whole response as it flows: the status line and headers
    /// within `deadline`, then each piece of the body within `progress` of the one before (a
    /// body that keeps flowing is never cut off; one that stalls fails), at most `max_body`
    /// bytes.
    pub async fn send_streaming(
        &self,
        req: Request<Body>,
        deadline: Duration,
        progress: Duration,
        max_body: usize,
    ) -> Result<Reply, ClientError> {
        let resp = match tokio::time::timeout(deadline, self.inner.request(req)).await {
            Ok(r) => r.map_err(|e| ClientError::Transport(error_chain(&e)))?,
            Err(_) => return Err(ClientError::Timeout(deadline)),
        };
        let (parts, mut body) = resp.into_parts();
        if body.size_hint().lower() > max_body as u64 {
            return Err(ClientError::TooLarge(max_body));
        }
        let mut out = bytes::BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(progress, body.frame()).await {
                Err(_) => {
                    return Err(ClientError::Transport(format!(
                        "the response body stalled: nothing for {progress:?} after {} bytes",
                        out.len()
                    )))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(ClientError::Transport(format!("reading response: {e}"))),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > max_body {
                    return Err(ClientError::TooLarge(max_body));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: out.freeze(),
        })
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

pub use crate::tls::error_chain;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_challenges_name_their_schemes() {
        let head = "HTTP/1.1 407 Proxy Authentication Required\r\n\
                    proxy-authenticate: Negotiate\r\n\
                    Proxy-Authenticate: NTLM, Basic realm=\"Squid, the proxy\", charset=\"UTF-8\"\r\n\
                    Proxy-Authenticate: NTLM TlRMTVNTUAACAAAA\r\n\
                    Content-Length: 0\r\n\r\n";
        assert_eq!(offered_schemes(head), ["Negotiate", "NTLM", "Basic"]);
        assert_eq!(challenge_token(head, "ntlm").unwrap(), b"NTLMSSP\0\x02\0\0\0");
        assert_eq!(challenge_token(head, "Negotiate"), None);
        assert!(offered_schemes("HTTP/1.1 407 x\r\nVia: 1.1 proxy\r\n\r\n").is_empty());
        let digest = vec!["Digest".to_owned()];
        let m = auth_required("http://p:3128", None, true, &digest, None);
        assert!(m.contains("asking for Digest") && m.contains("were not sent"), "{m}");
        let m = auth_required("http://p:3128", Some("Basic"), true, &["Basic".to_owned()], None);
        assert!(m.contains("refused the user and password"), "{m}");
        let m = auth_required(
            "http://p:3128",
            Some("NTLM answer as CORP\\ops"),
            true,
            &["NTLM".to_owned()],
            None,
        );
        assert!(
            m.contains("refused relay's NTLM answer as CORP\\ops") && m.contains("does not try that password again"),
            "{m}"
        );
        let m = auth_required("http://p:3128", None, false, &["Basic".to_owned()], None);
        assert!(
            m.contains("a user and password") && m.contains("in the proxy URL"),
            "{m}"
        );
        let windows = ["NTLM".to_owned(), "Basic".to_owned()];
        let m = auth_required(
            "http://p:3128",
            None,
            true,
            &["NTLM".to_owned()],
            Some(ProxyAuth::Basic),
        );
        assert!(
            m.contains("agent.proxy_auth pins Basic, which the proxy does not offer"),
            "{m}"
        );
        let url = Have {
            kerberos: false,
            password: true,
            from_file: false,
        };
        let file = Have { from_file: true, ..url };
        let keytab = Have {
            kerberos: true,
            password: false,
            from_file: false,
        };
        let both = Have { kerberos: true, ..file };
        let all = ["Negotiate".to_owned(), "NTLM".to_owned(), "Basic".to_owned()];
        let negotiate = ["Negotiate".to_owned()];
        assert_eq!(ProxyAuth::Auto.choose(&windows, url), Some(Scheme::Ntlm));
        assert_eq!(ProxyAuth::Basic.choose(&windows, url), Some(Scheme::Basic));
        assert_eq!(ProxyAuth::Ntlm.choose(&windows[1..], url), None);
        // Negotiate: Kerberos with a keytab, else NTLM inside it with a password.
        assert_eq!(ProxyAuth::Auto.choose(&all, both), Some(Scheme::Kerberos));
        assert_eq!(ProxyAuth::Auto.choose(&all, file), Some(Scheme::Ntlm));
        assert_eq!(ProxyAuth::Auto.choose(&negotiate, url), Some(Scheme::NegotiateNtlm));
        assert_eq!(ProxyAuth::Auto.choose(&negotiate, keytab), Some(Scheme::Kerberos));
        assert_eq!(ProxyAuth::Auto.choose(&windows, keytab), None);
        assert_eq!(ProxyAuth::Negotiate.choose(&all, file), Some(Scheme::NegotiateNtlm));
        assert_eq!(ProxyAuth::Ntlm.choose(&all, both), Some(Scheme::Ntlm));
        assert_eq!(ProxyAuth::Basic.choose(&all, both), Some(Scheme::Basic));
        // A password from a file goes as Basic only when Basic is pinned.
        assert_eq!(ProxyAuth::Auto.choose(&windows[1..], file), None);
        assert_eq!(ProxyAuth::Basic.choose(&windows[1..], file), Some(Scheme::Basic));
        let m = auth_required("http://p:3128", None, false, &negotiate, None);
        assert!(m.contains("agent.proxy_keytab") && m.contains("DOMAIN%5Cuser"), "{m}");
    }
}
