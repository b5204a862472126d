//! The local listeners' guard against browsers: a pure decision, from a request's `Host`,
//! `Origin` and `Sec-Fetch-Site` and one listener's policy, to pass it on, refuse it, or
//! answer a CORS preflight. It imports only error codes (from the foundation's `protocol`),
//! so configuration checks and the HTTP glue of either side can both use it.
//!
//! Why: a browser on the operator's machine is a local program that runs other people's
//! pages. Any page can make it send a "simple" cross-site POST to a loopback address, and a
//! page on a name that re-resolves to 127.0.0.1 (DNS rebinding) can also read the answers.
//! Plain programs (curl, relay's own clients, HTTP libraries) send neither `Origin` nor
//! `Sec-Fetch-Site` and name the listener by an address, `localhost` or a configured name,
//! so the guard does not touch them.
//!
//! The order of the checks, first refusal wins:
//! 1. the host the request names (its `Host` header, and the request target's authority in
//!    HTTP/2 or absolute form) must be one the listener answers to: `421`;
//! 2. an `Origin` that is neither the request's own origin nor an allowed one: `403`;
//!    an allowed origin skips the rest and gets CORS answers;
//! 3. `Sec-Fetch-Site` other than `same-origin` or `none`: `403`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::protocol::codes;

/// Headers a trusted web application may send (CORS `Access-Control-Allow-Headers`).
pub const ALLOWED_HEADERS: &str = "Content-Type, Idempotency-Key, Authorization";
/// Methods the local API answers (CORS `Access-Control-Allow-Methods`).
pub const ALLOWED_METHODS: &str = "GET, POST";
/// Answer headers a trusted web application may read beyond the CORS-safelisted ones.
pub const EXPOSED_HEADERS: &str = "Idempotent-Replayed, Retry-After";
/// How long a browser may cache a preflight answer, in seconds.
pub const PREFLIGHT_MAX_AGE: u32 = 600;
/// At most one log line per refusal reason in this long.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How much of a refused header value an error message or a log line repeats.
const ECHO_MAX: usize = 100;

/// Why a request was refused; the label of the refusal counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The host named is not one the listener answers to (DNS rebinding, a wrong name).
    Host,
    /// An HTTP/1.1 or later request named no host at all.
    NoHost,
    /// `Origin: null`: a sandboxed frame, a `file:` page, or a cross-site redirect.
    OriginNull,
    /// An `Origin` that is neither the listener's own nor an allowed one.
    CrossOrigin,
    /// `Sec-Fetch-Site` says another site (`cross-site`, `same-site`) or something unknown.
    FetchSite,
}

impl Reason {
    /// Every reason, in the order of [`Reason::index`].
    pub const ALL: [Reason; 5] = [
        Reason::Host,
        Reason::NoHost,
        Reason::OriginNull,
        Reason::CrossOrigin,
        Reason::FetchSite,
    ];

    /// The stable label (metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Host => "host",
            Reason::NoHost => "no_host",
            Reason::OriginNull => "origin_null",
            Reason::CrossOrigin => "cross_origin",
            Reason::FetchSite => "fetch_site",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A refused request: what to answer and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The counter label.
    pub reason: Reason,
    /// HTTP status: 421, 403 or 400.
    pub status: u16,
    /// Stable JSON error code.
    pub code: &'static str,
    /// The JSON error message: what was refused and which setting would allow it.
    pub message: String,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it to the route. With `cors`, the answer gets
    /// [`cors_headers`] for that origin (exactly as the browser sent it).
    Allow {
        /// The allowed origin to answer to.
        cors: Option<String>,
    },
    /// A CORS preflight from an allowed origin: answer `204` with these headers, without
    /// reaching any route.
    Preflight(Vec<(&'static str, String)>),
    /// Refuse it.
    Refuse(Refusal),
}

/// One header of a request, as the guard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header<'a> {
    /// Not sent.
    Absent,
    /// Sent once, with these bytes.
    One(&'a [u8]),
    /// Sent more than once (never from a browser; refused where it matters).
    Repeated,
}

/// What the guard reads from a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method (`OPTIONS` with `Access-Control-Request-Method` is a preflight).
    pub method: &'a str,
    /// HTTP/1.0 or older, where `Host` is optional.
    pub before_http11: bool,
    /// The authority of the request target, when it has one: HTTP/2's `:authority`, or an
    /// absolute-form HTTP/1.1 target.
    pub authority: Option<&'a str>,
    /// `Host`.
    pub host: Header<'a>,
    /// `Origin`.
    pub origin: Header<'a>,
    /// `Sec-Fetch-Site`.
    pub fetch_site: Header<'a>,
    /// `Access-Control-Request-Method`.
    pub preflight_method: Header<'a>,
    /// `Access-Control-Request-Private-Network: true` (Chromium's private network access).
    pub private_network: bool,
}

impl Request<'_> {
    /// A request with no headers the guard reads, as a plain program sends it over HTTP/1.1
    /// without `Host` (tests start from it).
    pub fn bare(method: &str) -> Request<'_> {
        Request {
            method,
            before_http11: false,
            authority: None,
            host: Header::Absent,
            origin: Header::Absent,
            fetch_site: Header::Absent,
            preflight_method: Header::Absent,
            private_network: false,
        }
    }
}

/// A host as a request or a setting names it, normalised: an address, or a lower-case name
/// without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 or IPv6 address (IPv4-mapped IPv6 as IPv4).
    Ip(IpAddr),
    /// A DNS name.
    Name(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

impl Host {
    /// Parses a host without a port: an IPv4 address, an IPv6 address in brackets, or a DNS
    /// name (letters, digits, `-`, `_`, dots; one trailing dot allowed, case ignored).
    pub fn parse(text: &str) -> Option<Host> {
        if let Some(inner) = text.strip_prefix('[') {
            let v6: Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
            return Some(Host::Ip(IpAddr::V6(v6).to_canonical()));
        }
        if let Ok(v4) = text.parse::<Ipv4Addr>() {
            return Some(Host::Ip(IpAddr::V4(v4)));
        }
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        (name.len() <= 253 && name.split('.').all(label_ok)).then_some(Host::Name(name))
    }
}

/// `host[:port]` as `Host` and `:authority` carry it; `None` when it is no such thing. The
/// port is checked for form only (any port is fine: a tunnel changes it).
pub fn parse_authority(text: &str) -> Option<(Host, Option<u16>)> {
    let (host, port) = match text.rfind(':') {
        // A colon inside brackets belongs to an IPv6 address.
        Some(i) if !text[i..].contains(']') => (&text[..i], Some(&text[i + 1..])),
        _ => (text, None),
    };
    let port = match port {
        None | Some("") => None,
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse::<u16>().ok()?),
        Some(_) => return None,
    };
    Some((Host::parse(host)?, port))
}

/// A web origin, `scheme://host[:port]`, with the scheme's default port filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: Host,
    port: u16,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        if default_port(&self.scheme) != Some(self.port) {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl Origin {
    /// Parses an origin as a browser serialises it, or as a setting writes it: `http` or
    /// `https`, a host, an optional port, and nothing after (a single trailing `/` is
    /// forgiven in settings only, see [`Origin::parse_setting`]).
    pub fn parse(text: &str) -> Result<Origin, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| "write scheme://host[:port]".to_owned())?;
        let scheme = scheme.to_ascii_lowercase();
        let default =
            default_port(&scheme).ok_or_else(|| format!("the scheme must be http or https, not {scheme:?}"))?;
        if rest.contains(['/', '?', '#']) {
            return Err("an origin has no path, query or fragment".into());
        }
        if rest.contains('@') {
            return Err("an origin has no user name or password".into());
        }
        let (host, port) = parse_authority(rest).ok_or_else(|| format!("{rest:?} is not a host[:port]"))?;
        if port == Some(0) {
            return Err("port 0 is no port".into());
        }
        Ok(Origin {
            scheme,
            host,
            port: port.unwrap_or(default),
        })
    }

    /// [`Origin::parse`] for a configured origin, which may end in one `/` (as copied from
    /// an address bar).
    pub fn parse_setting(text: &str) -> Result<Origin, String> {
        Origin::parse(text.strip_suffix('/').unwrap_or(text))
    }
}

/// The names of the settings a listener's refusals point to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    /// The listener, as logs and metrics label it (`api`, `intake`).
    pub listener: &'static str,
    /// The key of extra host names, e.g. `node.api_names`.
    pub names: &'static str,
    /// The key of allowed origins, e.g. `node.api_allowed_origins`.
    pub origins: &'static str,
}

impl Keys {
    /// The node's local API.
    pub const NODE_API: Keys = Keys {
        listener: "api",
        names: "node.api_names",
        origins: "node.api_allowed_origins",
    };
    /// The agent's intake.
    pub const AGENT_INTAKE: Keys = Keys {
        listener: "intake",
        names: "agent.intake_names",
        origins: "agent.intake_allowed_origins",
    };
}

/// `node.api_names` as its environment variable, `RELAY_NODE__API_NAMES`.
pub fn env_var(key: &str) -> String {
    format!("RELAY_{}", key.to_ascii_uppercase().replace('.', "__"))
}

/// A configured name or origin that is no such thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSetting {
    /// The key, e.g. `node.api_allowed_origins`.
    pub key: &'static str,
    /// What is wrong with which entry.
    pub problem: String,
}

impl std::fmt::Display for BadSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

/// One listener's policy: the address it is bound to, the names it answers to, and the
/// origins of trusted web applications.
#[derive(Debug, Clone)]
pub struct Policy {
    bound: IpAddr,
    names: Vec<Host>,
    allowed: Vec<Origin>,
    keys: Keys,
}

impl Policy {
    /// The policy of a listener bound to `bound`, answering also to `names` and to pages of
    /// `origins`; an `Err` names the key and the bad entry.
    pub fn new(bound: IpAddr, names: &[String], origins: &[String], keys: Keys) -> Result<Policy, BadSetting> {
        Ok(Policy {
            bound: bound.to_canonical(),
            names: names
                .iter()
                .map(|n| {
                    parse_name(n).map_err(|problem| BadSetting {
                        key: keys.names,
                        problem,
                    })
                })
                .collect::<Result<_, _>>()?,
            allowed: origins
                .iter()
                .map(|o| {
                    Origin::parse_setting(o.trim()).map_err(|e| BadSetting {
                        key: keys.origins,
                        problem: format!(
                            "{o:?} is not an origin: {e} (e.g. https://app.example.com or http://localhost:3000)"
                        ),
                    })
                })
                .collect::<Result<_, _>>()?,
            keys,
        })
    }

    /// The settings this policy's messages name.
    pub fn keys(&self) -> Keys {
        self.keys
    }

    /// True when some origin is allowed: then every answer varies by `Origin`.
    pub fn has_allowed_origins(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// True when the listener answers to `host`. An address: the bound one; any loopback
    /// address when bound to loopback; any address when bound to all of them (an address
    /// cannot be rebound, and a port published by a container arrives on another one). A
    /// name: `localhost` or a configured one.
    fn answers_to(&self, host: &Host) -> bool {
        match host {
            Host::Ip(ip) => {
                let ip = ip.to_canonical();
                self.bound.is_unspecified()
                    || ip == self.bound
                    || (self.bound.is_loopback() && ip.is_loopback())
                    || self.names.contains(&Host::Ip(ip))
            }
            Host::Name(n) => n == "localhost" || self.names.contains(host),
        }
    }

    fn what_it_answers_to(&self) -> String {
        let address = if self.bound.is_unspecified() {
            "any address".to_owned()
        } else if self.bound.is_loopback() {
            "loopback addresses".to_owned()
        } else {
            Host::Ip(self.bound).to_string()
        };
        let configured = if self.names.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = self.names.iter().map(Host::to_string).collect();
            format!(", {}", names.join(", "))
        };
        format!("{address}, localhost{configured}")
    }

    fn host_refusal(&self, shown: &str) -> Refusal {
        Refusal {
            reason: Reason::Host,
            status: 421,
            code: codes::UNKNOWN_HOST,
            message: format!(
                "this listener does not answer to the host {shown:?} (it answers to {}, on any port); \
                 if clients reach it by that name, add the name to {} ({})",
                self.what_it_answers_to(),
                self.keys.names,
                env_var(self.keys.names),
            ),
        }
    }

    fn allow_hint(&self) -> String {
        format!(
            "a trusted web application is allowed by adding its origin to {} ({})",
            self.keys.origins,
            env_var(self.keys.origins)
        )
    }
}

fn parse_name(text: &str) -> Result<Host, String> {
    let trimmed = text.trim();
    match Host::parse(trimmed) {
        Some(h) => Ok(h),
        None if trimmed.contains(['/', ':']) && !trimmed.starts_with('[') => Err(format!(
            "{text:?} is not a host name: write the name alone, without scheme, port or path"
        )),
        None => Err(format!(
            "{text:?} is not a host name (letters, digits, '-', '.'), an IPv4 address or an IPv6 address in brackets"
        )),
    }
}

/// A refusal of what a browser sent on behalf of another site: `403 cross_site`.
fn cross_site(reason: Reason, message: String) -> Verdict {
    Verdict::Refuse(Refusal {
        reason,
        status: 403,
        code: codes::CROSS_SITE,
        message,
    })
}

/// A header value as text for messages: cut, and printable.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(ECHO_MAX).collect();
    if text.chars().count() > ECHO_MAX {
        out.push('…');
    }
    out
}

/// Decides what to do with `req` on a listener with `policy`.
pub fn check(policy: &Policy, req: &Request<'_>) -> Verdict {
    // 1. The host, from every place the request names it.
    let host_header = match req.host {
        Header::Absent => None,
        Header::Repeated => return Verdict::Refuse(policy.host_refusal("(more than one Host header)")),
        Header::One(bytes) => Some(bytes),
    };
    let mut named: Option<(Host, Option<u16>)> = None;
    for bytes in req.authority.map(str::as_bytes).into_iter().chain(host_header) {
        let parsed = std::str::from_utf8(bytes).ok().and_then(parse_authority);
        match parsed {
            Some((host, port)) if policy.answers_to(&host) => {
                // The target's authority wins over Host where both are given (RFC 9110 7.2).
                named.get_or_insert((host, port));
            }
            _ => return Verdict::Refuse(policy.host_refusal(&shown(bytes))),
        }
    }
    if named.is_none() && !req.before_http11 {
        return Verdict::Refuse(Refusal {
            reason: Reason::NoHost,
            status: 400,
            code: codes::BAD_REQUEST,
            message: "the request names no host: HTTP/1.1 requires a Host header".into(),
        });
    }

    // 2. The origin of the page that made a browser send this, if any.
    match req.origin {
        Header::Absent => {}
        Header::Repeated => {
            return cross_site(
                Reason::CrossOrigin,
                format!("refused: more than one Origin header; {}", policy.allow_hint()),
            )
        }
        Header::One(bytes) if bytes == b"null" => {
            return cross_site(
                Reason::OriginNull,
                format!(
                    "refused a request from a browser page without an origin (Origin: null: a sandboxed frame, \
                     a local file or a redirect from another site); this API answers pages of its own origin only; {}",
                    policy.allow_hint()
                ),
            )
        }
        Header::One(bytes) => {
            let sent = std::str::from_utf8(bytes).ok();
            let origin = sent.and_then(|s| Origin::parse(s).ok());
            if let (Some(sent), Some(origin)) = (sent, &origin) {
                if policy.allowed.contains(origin) {
                    if req.method.eq_ignore_ascii_case("OPTIONS") && req.preflight_method != Header::Absent {
                        return Verdict::Preflight(preflight_headers(sent, req.private_network));
                    }
                    return Verdict::Allow {
                        cors: Some(sent.to_owned()),
                    };
                }
            }
            let own = named.as_ref().map(|(host, port)| Origin {
                scheme: "http".into(),
                host: host.clone(),
                port: port.unwrap_or(80),
            });
            let same_origin = origin.is_some() && own.is_some() && origin == own;
            if !same_origin {
                let own = own.map_or_else(|| "unknown".to_owned(), |o| o.to_string());
                return cross_site(
                    Reason::CrossOrigin,
                    format!(
                        "refused a request from a browser page at {:?}, another origin than this listener's ({own}); {}",
                        shown(bytes),
                        policy.allow_hint()
                    ),
                );
            }
        }
    }

    // 3. What the browser says about the site that caused the request.
    match req.fetch_site {
        Header::Absent => {}
        Header::One(b"same-origin" | b"none") => {}
        Header::One(bytes) => {
            let what = match bytes {
                b"cross-site" | b"same-site" => format!(
                    "Sec-Fetch-Site: {}, sent on behalf of a page of another origin",
                    shown(bytes)
                ),
                _ => format!(
                    "Sec-Fetch-Site: {:?}, a value this API does not know, so taken as another origin",
                    shown(bytes)
                ),
            };
            return cross_site(
                Reason::FetchSite,
                format!("refused a request the browser marks {what}; {}", policy.allow_hint()),
            );
        }
        Header::Repeated => {
            return cross_site(
                Reason::FetchSite,
                format!("refused: more than one Sec-Fetch-Site header; {}", policy.allow_hint()),
            )
        }
    }
    Verdict::Allow { cors: None }
}

/// The answer to a preflight from the allowed origin `origin` (as sent).
fn preflight_headers(origin: &str, private_network: bool) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("access-control-allow-origin", origin.to_owned()),
        ("access-control-allow-methods", ALLOWED_METHODS.to_owned()),
        ("access-control-allow-headers", ALLOWED_HEADERS.to_owned()),
        ("access-control-max-age", PREFLIGHT_MAX_AGE.to_string()),
        (
            "vary",
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers".to_owned(),
        ),
    ];
    if private_network {
        // A public page calling a loopback API: Chromium asks first, and only this unlocks it.
        headers.push(("access-control-allow-private-network", "true".to_owned()));
    }
    headers
}

/// The headers an answer to the allowed origin `origin` (as sent) carries.
pub fn cors_headers(origin: &str) -> Vec<(&'static str, String)> {
    vec![
        ("access-control-allow-origin", origin.to_owned()),
        ("access-control-expose-headers", EXPOSED_HEADERS.to_owned()),
    ]
}

/// Counts refusals by reason and lets a log line through at most once per [`LOG_INTERVAL`]
/// per reason, so a hostile page cannot flood the log.
#[derive(Debug, Default)]
pub struct Tally {
    slots: Mutex<[Slot; Reason::ALL.len()]>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    count: u64,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Tally {
    /// Counts a refusal for `reason` at `now`. `Some(n)` when a log line is due, `n` being
    /// the refusals of that reason left out of the log since the previous line.
    pub fn record(&self, reason: Reason, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut slots[reason.index()];
        slot.count += 1;
        let due = slot
            .last_logged
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_INTERVAL);
        if due {
            slot.last_logged = Some(now);
            Some(std::mem::take(&mut slot.unlogged))
        } else {
            slot.unlogged += 1;
            None
        }
    }

    /// Refusals so far, for every reason.
    pub fn counts(&self) -> Vec<(Reason, u64)> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Reason::ALL.iter().map(|r| (*r, slots[r.index()].count)).collect()
    }
}

#[cfg(test)]
mod tests;
