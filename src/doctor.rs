//! `relay doctor` and `relay egress`: what an operator needs when a connection does not come
//! up — each step from name resolution to the webhook (or the tracker, when one is bound)
//! checked in order with its measured value, and the exact outbound destinations for a
//! firewall change request.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tower_service::Service;

use crate::agent::AgentConnection;
use crate::config::Settings;
use crate::http::{self, Method, ProxyConnector, Route, Uri};
use crate::protocol::{self, CheckResponse, LinkState};

/// How long each network step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock difference to the node above which the clock check fails.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The outcome of one step.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Works.
    Ok,
    /// Does not work.
    Fail,
    /// Not tried because an earlier step failed.
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Step name.
    pub step: &'static str,
    /// Outcome.
    pub outcome: Outcome,
    /// What was measured or what went wrong.
    pub detail: String,
}

/// All steps of one connection.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was checked: `connection` (an agent's) or `store` (a node's database).
    pub kind: &'static str,
    /// Connection name.
    pub connection: String,
    /// Node URL.
    pub node_url: String,
    /// Steps in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// True when no step failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    fn push(&mut self, step: &'static str, outcome: Outcome, detail: impl Into<String>) {
        self.checks.push(Check {
            step,
            outcome,
            detail: detail.into(),
        });
    }

    fn skip(&mut self, steps: &[&'static str]) {
        for step in steps {
            self.push(step, Outcome::Skip, "skipped: an earlier step failed");
        }
    }
}

fn ms(since: Instant) -> String {
    format!("{:.1} ms", since.elapsed().as_secs_f64() * 1000.0)
}

/// Checks a node's PostgreSQL database: reachable (with the time a connection took), its
/// schema at the version this build speaks, and a record written and read back.
pub async fn diagnose_store(settings: &Settings) -> Report {
    use crate::store::NodeStore;
    let mut report = Report {
        kind: "store",
        connection: "node".into(),
        node_url: String::new(),
        checks: Vec::new(),
    };
    let options = match settings.store.postgres_options() {
        Ok(o) => o,
        Err(e) => {
            report.push("database", Outcome::Fail, e.to_string());
            report.skip(&["schema", "write"]);
            return report;
        }
    };
    report.node_url = crate::store::postgres::redact(&options.url);
    let started = Instant::now();
    let store = match crate::store::postgres::PgStore::connect(&options).await {
        Ok(s) => s,
        Err(e) => {
            report.push("database", Outcome::Fail, e.to_string());
            report.skip(&["schema", "write"]);
            return report;
        }
    };
    report.push(
        "database",
        Outcome::Ok,
        format!("{} answered in {}", store.display_url(), ms(started)),
    );
    match store.check_schema().await {
        Ok(()) => report.push(
            "schema",
            Outcome::Ok,
            format!("version {}", crate::store::postgres::SCHEMA_VERSION),
        ),
        Err(e) => {
            report.push("schema", Outcome::Fail, e.to_string());
            report.skip(&["write"]);
            return report;
        }
    }
    let started = Instant::now();
    match store.probe().await {
        Ok(()) => report.push(
            "write",
            Outcome::Ok,
            format!("a record written, read back and removed in {}", ms(started)),
        ),
        Err(e) => report.push("write", Outcome::Fail, e.to_string()),
    }
    report
}

/// Checks one connection: DNS, TCP, TLS, credential, clock, then the webhook, or with a
/// `[tracker]` the tracker (reachable, token, API version, the connection's project).
pub async fn diagnose(settings: &Settings, conn: &AgentConnection, credential: Result<String, String>) -> Report {
    let mut report = Report {
        kind: "connection",
        connection: conn.name.clone(),
        node_url: conn.node_url.clone(),
        checks: Vec::new(),
    };
    if let Some(reason) = &conn.revoked {
        report.push("connection", Outcome::Fail, reason.clone());
    }
    let network = ["tcp", "tls", "credential", "clock"];
    let uri: Uri = match conn.node_url.parse() {
        Ok(u) => u,
        Err(e) => {
            report.push(
                "dns",
                Outcome::Fail,
                format!("the node URL {} is not valid: {e}", conn.node_url),
            );
            report.skip(&network);
            webhook_check(settings, conn, &mut report).await;
            return report;
        }
    };
    let (host, port) = http::host_port(&uri);
    let mut direct = hyper_util::client::legacy::connect::HttpConnector::new();
    direct.enforce_http(false);
    direct.set_connect_timeout(Some(STEP_TIMEOUT));
    let mut connector = ProxyConnector::new(direct, &settings.proxy_config());
    let route = connector.route(&uri);

    // DNS: the node's name, or the proxy's when the proxy resolves the node.
    let (lookup, note) = match &route {
        Route::Direct => ((host.clone(), port), String::new()),
        Route::Proxy { proxy, .. } => {
            let p: Uri = proxy.parse().unwrap_or_default();
            (http::host_port(&p), format!(" (proxy; it resolves {host} itself)"))
        }
    };
    let started = Instant::now();
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((lookup.0.as_str(), lookup.1))).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            report.push(
                "dns",
                Outcome::Ok,
                format!("{}{note} -> {} ({})", lookup.0, addrs.join(", "), ms(started)),
            );
        }
        Ok(Err(e)) => {
            report.push("dns", Outcome::Fail, format!("cannot resolve {}{note}: {e}", lookup.0));
            report.skip(&network);
            webhook_check(settings, conn, &mut report).await;
            return report;
        }
        Err(_) => {
            report.push(
                "dns",
                Outcome::Fail,
                format!("resolving {}{note} took over {STEP_TIMEOUT:?}", lookup.0),
            );
            report.skip(&network);
            webhook_check(settings, conn, &mut report).await;
            return report;
        }
    }

    // TCP, through the proxy's tunnel when there is one.
    let started = Instant::now();
    let tcp = match tokio::time::timeout(STEP_TIMEOUT, connector.call(uri.clone())).await {
        Ok(Ok(io)) => {
            let tcp = io.into_inner();
            let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let how = match &route {
                Route::Direct => format!("direct to {peer}"),
                proxied @ Route::Proxy { proxy, .. } => format!(
                    "{proxied}: tunnel to {host}:{port} open{}",
                    http::last_proxy_handshake(proxy)
                        .map(|h| format!(" ({h})"))
                        .unwrap_or_default()
                ),
            };
            report.push("tcp", Outcome::Ok, format!("{how} ({})", ms(started)));
            tcp
        }
        Ok(Err(e)) => {
            report.push(
                "tcp",
                Outcome::Fail,
                format!("{route}: {}", http::error_chain(e.as_ref())),
            );
            report.skip(&network[1..]);
            webhook_check(settings, conn, &mut report).await;
            return report;
        }
        Err(_) => {
            report.push(
                "tcp",
                Outcome::Fail,
                format!("{route}: no connection within {STEP_TIMEOUT:?}"),
            );
            report.skip(&network[1..]);
            webhook_check(settings, conn, &mut report).await;
            return report;
        }
    };

    // TLS, with the trust mode the agent uses.
    let a = &settings.agent;
    let trust = crate::tls::describe_trust(conn.pin_bytes(), a.trust, a.ca_file.as_deref());
    let tls_ok = match crate::tls::handshake(
        tcp,
        &host,
        conn.pin_bytes(),
        a.trust,
        a.ca_file.as_deref(),
        STEP_TIMEOUT,
    )
    .await
    {
        Ok(seen) => {
            report.push("tls", Outcome::Ok, format!("trust {trust}: {seen}"));
            true
        }
        Err(e) => {
            report.push("tls", Outcome::Fail, format!("trust {trust}: {e}"));
            false
        }
    };
    if !tls_ok {
        report.skip(&network[2..]);
        webhook_check(settings, conn, &mut report).await;
        return report;
    }

    // Credential and clock, from one authenticated request that moves no message.
    match credential {
        Err(e) => {
            report.push("credential", Outcome::Fail, e);
            report.skip(&network[3..]);
        }
        Ok(credential) => credential_and_clock(settings, conn, &credential, &mut report).await,
    }
    webhook_check(settings, conn, &mut report).await;
    report
}

async fn credential_and_clock(settings: &Settings, conn: &AgentConnection, credential: &str, report: &mut Report) {
    let a = &settings.agent;
    let tls = match crate::tls::node_client_config(conn.pin_bytes(), a.trust, a.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            report.push("credential", Outcome::Fail, e.to_string());
            report.skip(&["clock"]);
            return;
        }
    };
    let client = http::Client::https_only(tls, STEP_TIMEOUT, &settings.proxy_config());
    let auth = format!("Bearer {credential}");
    let url = format!("{}{}", conn.node_url, protocol::CHECK_PATH);
    let req = match http::request(Method::POST, &url, &[("authorization", &auth)], Vec::new()) {
        Ok(r) => r,
        Err(e) => {
            report.push("credential", Outcome::Fail, e.to_string());
            report.skip(&["clock"]);
            return;
        }
    };
    let sent = SystemTime::now();
    let reply = match client.send(req, STEP_TIMEOUT, 64 * 1024).await {
        Ok(r) => r,
        Err(e) => {
            report.push("credential", Outcome::Fail, e.to_string());
            report.skip(&["clock"]);
            return;
        }
    };
    if reply.status == http::StatusCode::OK {
        match protocol::decode::<CheckResponse>("check response", &reply.body) {
            Ok(c) => {
                let state = if c.state == LinkState::Active {
                    "active"
                } else {
                    "deactivated by the node"
                };
                report.push(
                    "credential",
                    Outcome::Ok,
                    format!("accepted for connection {:?} on the node ({state})", c.connection),
                );
            }
            Err(e) => report.push("credential", Outcome::Fail, e.to_string()),
        }
    } else {
        let message = reply
            .error_body()
            .map(|b| b.error)
            .unwrap_or_else(|| format!("the node answered {}", reply.status));
        report.push("credential", Outcome::Fail, message);
    }
    match reply.date() {
        Some(node_time) => {
            // The Date header has one-second resolution; compare with the middle of the exchange.
            let received = SystemTime::now();
            let local = sent + received.duration_since(sent).unwrap_or_default() / 2;
            let (sign, skew) = match local.duration_since(node_time) {
                Ok(ahead) => ("+", ahead),
                Err(behind) => ("-", behind.duration()),
            };
            // The Date header counts whole seconds, so anything under one second is agreement.
            let detail = if skew < Duration::from_secs(1) {
                "this host's clock agrees with the node's to within 1 s".to_owned()
            } else {
                format!("this host's clock is {sign}{:.0} s from the node's", skew.as_secs_f64())
            };
            if skew <= MAX_CLOCK_SKEW + Duration::from_secs(1) {
                report.push("clock", Outcome::Ok, detail);
            } else {
                report.push(
                    "clock",
                    Outcome::Fail,
                    format!(
                        "{detail} (limit {}s): set up time synchronisation (NTP)",
                        MAX_CLOCK_SKEW.as_secs()
                    ),
                );
            }
        }
        None => report.push("clock", Outcome::Fail, "the node's answer carried no Date header"),
    }
}

async fn webhook_check(settings: &Settings, conn: &AgentConnection, report: &mut Report) {
    // With a tracker, payloads go to the sync engine: the tracker is what must work.
    if let Some(tracker) = &settings.tracker {
        tracker_check(tracker, conn, report).await;
        return;
    }
    let Some(url) = conn.deliver_to.clone().or_else(|| settings.agent.deliver_to.clone()) else {
        report.push(
            "webhook",
            Outcome::Fail,
            "no webhook configured (accept --deliver-to, or agent.deliver_to): payloads from the node are held",
        );
        return;
    };
    let uri: Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            report.push("webhook", Outcome::Fail, format!("{url} is not a valid URL: {e}"));
            return;
        }
    };
    let (host, port) = http::host_port(&uri);
    let started = Instant::now();
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(tcp)) if uri.scheme_str() == Some("https") => {
            // An https webhook is checked with the trust delivery uses.
            let (mode, ca_file) = settings.delivery.web_trust();
            let trust = crate::tls::describe_webhook_trust(mode, ca_file);
            match crate::tls::webhook_handshake(tcp, &host, settings.delivery.web_trust(), STEP_TIMEOUT).await {
                Ok(seen) => report.push(
                    "webhook",
                    Outcome::Ok,
                    format!("{url}: trust {trust}: {seen} ({})", ms(started)),
                ),
                Err(e) => report.push("webhook", Outcome::Fail, format!("{url}: trust {trust}: {e}")),
            }
        }
        Ok(Ok(_)) => report.push(
            "webhook",
            Outcome::Ok,
            format!("{url}: {host}:{port} accepts connections ({})", ms(started)),
        ),
        Ok(Err(e)) => report.push("webhook", Outcome::Fail, format!("{url}: {host}:{port}: {e}")),
        Err(_) => report.push(
            "webhook",
            Outcome::Fail,
            format!("{url}: {host}:{port}: no connection within {STEP_TIMEOUT:?}"),
        ),
    }
}

/// The tracker steps: it answers, accepts the token (and whose it is), speaks a REST API
/// version, and holds the connection's project.
async fn tracker_check(settings: &crate::config::TrackerSettings, conn: &AgentConnection, report: &mut Report) {
    use crate::tracker::{Tracker, TrackerError};
    let later = ["tracker pat", "api version", "project"];
    let started = Instant::now();
    let tracker = match tokio::time::timeout(STEP_TIMEOUT * 3, Tracker::connect(settings)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            match &e {
                TrackerError::Auth { .. } => {
                    report.push("tracker", Outcome::Ok, format!("{} answers", settings.url));
                    report.push("tracker pat", Outcome::Fail, e.to_string());
                    report.skip(&later[1..]);
                }
                // The version gate answers only an accepted token.
                TrackerError::Refused { .. } => {
                    report.push("tracker", Outcome::Ok, format!("{} answers", settings.url));
                    report.push("tracker pat", Outcome::Ok, "accepted");
                    report.push("api version", Outcome::Fail, e.to_string());
                    report.skip(&later[2..]);
                }
                _ => {
                    report.push("tracker", Outcome::Fail, e.to_string());
                    report.skip(&later);
                }
            }
            return;
        }
        Err(_) => {
            report.push(
                "tracker",
                Outcome::Fail,
                format!("{}: no answer within {:?}", settings.url, STEP_TIMEOUT * 3),
            );
            report.skip(&later);
            return;
        }
    };
    report.push(
        "tracker",
        Outcome::Ok,
        format!("{} answers ({})", tracker.url(), ms(started)),
    );
    match tracker.user().await {
        Ok(user) => report.push("tracker pat", Outcome::Ok, format!("accepted for {user}")),
        Err(e) => report.push("tracker pat", Outcome::Fail, e.to_string()),
    }
    let how = if settings.api_version.is_some() {
        "tracker.api_version, accepted by the server"
    } else {
        "probed from the server"
    };
    let writes = if tracker.version().writes_comments() {
        "comments through the comments API"
    } else {
        "comments through System.History"
    };
    report.push(
        "api version",
        Outcome::Ok,
        format!("{} ({how}; {writes})", tracker.version()),
    );
    if conn.project.is_empty() {
        report.push(
            "project",
            Outcome::Fail,
            "the connection names no project for incoming sync (accept it with --project)",
        );
        return;
    }
    match tracker.check_project(&conn.project).await {
        Ok(id) => report.push("project", Outcome::Ok, format!("{} exists (id {id})", conn.project)),
        Err(e) => report.push("project", Outcome::Fail, e.to_string()),
    }
}

/// Renders reports as the text `relay doctor` prints.
pub fn render(reports: &[Report]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if reports.is_empty() {
        out.push_str("no accepted connections: run `relay accept CODE` first\n");
    }
    for r in reports {
        let _ = writeln!(out, "{} {} -> {}", r.kind, r.connection, r.node_url);
        for c in &r.checks {
            let mark = match c.outcome {
                Outcome::Ok => " ok ",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            let _ = writeln!(out, "  [{mark}] {:<11} {}", c.step, c.detail);
        }
    }
    out
}

/// One outbound destination of the agent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Egress {
    /// `host:port` to allow.
    pub destination: String,
    /// What it is for.
    pub purpose: String,
    /// Whether it leaves the private network (node or proxy) or stays local (webhook).
    pub scope: &'static str,
}

/// The exact destinations the agent contacts, for a firewall change request.
pub fn egress(settings: &Settings, conns: &[AgentConnection]) -> Vec<Egress> {
    let mut out: Vec<Egress> = Vec::new();
    let mut add = |e: Egress| {
        if let Some(existing) = out.iter_mut().find(|x| x.destination == e.destination) {
            if !existing.purpose.contains(&e.purpose) {
                existing.purpose = format!("{}; {}", existing.purpose, e.purpose);
            }
        } else {
            out.push(e);
        }
    };
    let connector = ProxyConnector::for_config(&settings.proxy_config());
    let mut proxied = false;
    for conn in conns.iter().filter(|c| c.revoked.is_none()) {
        let Ok(uri) = conn.node_url.parse::<Uri>() else {
            continue;
        };
        let (host, port) = http::host_port(&uri);
        let node = fmt_host_port(&host, port);
        match connector.route(&uri) {
            Route::Direct => add(Egress {
                destination: node,
                purpose: format!("HTTPS to the node of connection {:?}", conn.name),
                scope: "outbound",
            }),
            Route::Proxy { proxy, .. } => {
                proxied = true;
                let p: Uri = proxy.parse().unwrap_or_default();
                let (ph, pp) = http::host_port(&p);
                add(Egress {
                    destination: fmt_host_port(&ph, pp),
                    purpose: format!("HTTP CONNECT proxy to {node} for connection {:?}", conn.name),
                    scope: "outbound",
                });
            }
        }
        if let Some(url) = conn.deliver_to.clone().or_else(|| settings.agent.deliver_to.clone()) {
            if let Ok(w) = url.parse::<Uri>() {
                let (h, p) = http::host_port(&w);
                add(Egress {
                    destination: fmt_host_port(&h, p),
                    purpose: format!("webhook of connection {:?}", conn.name),
                    scope: "local",
                });
            }
        }
    }
    // A proxy that may ask for Kerberos: the realm's KDCs, as MIT Kerberos finds them.
    let login = settings.proxy_login().kerberos;
    if login.available() && proxied {
        match crate::proxy_auth::kerberos::realm(&login) {
            Ok(realm) if realm.kdcs.is_empty() => add(Egress {
                destination: format!("{} KDCs", realm.name),
                purpose: format!(
                    "Kerberos for the proxy's Negotiate authentication, as {}: {}",
                    realm.principal, realm.source
                ),
                scope: "local",
            }),
            Ok(realm) => {
                for kdc in &realm.kdcs {
                    add(Egress {
                        destination: kdc.clone(),
                        purpose: format!(
                            "Kerberos KDC of realm {} ({}), for the proxy's Negotiate authentication as {}",
                            realm.name, realm.source, realm.principal
                        ),
                        scope: "local",
                    });
                }
            }
            Err(e) => add(Egress {
                destination: "Kerberos".to_owned(),
                purpose: format!("the realm of the proxy's Negotiate authentication is unknown: {e}"),
                scope: "local",
            }),
        }
    }
    // The tracker is reached directly (never through the agent's proxy), usually on the
    // private network.
    if let Some(t) = &settings.tracker {
        if let Ok(uri) = t.url.parse::<Uri>() {
            let (h, p) = http::host_port(&uri);
            add(Egress {
                destination: fmt_host_port(&h, p),
                purpose: "the issue tracker (Azure DevOps REST API)".to_owned(),
                scope: "local",
            });
        }
    }
    out
}

fn fmt_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Renders the egress list: the outbound destinations first, one `host:port` per line.
pub fn render_egress(list: &[Egress]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let outbound: Vec<&Egress> = list.iter().filter(|e| e.scope == "outbound").collect();
    let local: Vec<&Egress> = list.iter().filter(|e| e.scope == "local").collect();
    let _ = writeln!(out, "# Outbound TCP the relay agent opens (it needs no inbound port):");
    if outbound.is_empty() {
        let _ = writeln!(out, "# (none: no accepted connection)");
    }
    let width = list.iter().map(|e| e.destination.len()).max().unwrap_or(0);
    for e in outbound {
        let _ = writeln!(out, "{:<width$}  # {}", e.destination, e.purpose);
    }
    if !local.is_empty() {
        let _ = writeln!(
            out,
            "# Inside the private network (webhooks, the tracker, Kerberos KDCs):"
        );
        for e in local {
            let _ = writeln!(out, "{:<width$}  # {}", e.destination, e.purpose);
        }
    }
    out
}
