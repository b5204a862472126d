//! The guard in front of both local listeners, end to end over real sockets: a foreign `Host`
//! on every route answers 421, what a browser marks as cross-site answers 403 and queues
//! nothing, plain programs post as before, an allowed origin gets its preflight and CORS
//! answers, refusals are counted by reason and logged once a minute per reason.

mod common;

use std::time::Duration;

use common::{client, connect, in_process, post, Daemon, DEADLINE};
use relay::http::{Method, Reply};
use relay::sink::Sink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Sends `method path` to `base` with `headers` (which may set `Host`).
async fn send(base: &str, method: Method, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let req = relay::http::request(method, &format!("{base}{path}"), headers, body.to_vec()).unwrap();
    client().send(req, Duration::from_secs(30), 1 << 20).await.unwrap()
}

fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null)
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Sends raw bytes to `addr` and returns the status line's code and the body.
async fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `relay_local_refusals_total{…,reason="REASON"}` in a scrape.
fn refusals(metrics: &str, reason: &str) -> u64 {
    let needle = format!("reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find(|l| l.starts_with("relay_local_refusals_total{") && l.contains(&needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refusal count for {reason} in\n{metrics}"))
}

async fn scrape(base: &str) -> String {
    let reply = send(base, Method::GET, "/metrics", &[], b"").await;
    assert_eq!(reply.status, 200);
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// The last sequence number each side's outbound queue of connection "c" handed out: it
/// moves with every message queued, whatever has been delivered since.
async fn last_seqs(node: &relay::node::Node, agent: &relay::agent::Agent) -> (u64, u64) {
    (
        node.connections().await.unwrap()[0].outbound.last_seq,
        agent.status().unwrap()[0].outbound.last_seq,
    )
}

/// A connected in-process node and agent, with `tune` applied to both settings.
struct Pair {
    node: relay::daemon::Running<relay::node::Node>,
    agent: relay::daemon::Running<relay::agent::Agent>,
    token: CancellationToken,
    _sink: Sink,
    _tmp: tempfile::TempDir,
}

impl Pair {
    async fn start(tune: impl Fn(&mut relay::config::Settings)) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let token = CancellationToken::new();
        let mut node_settings = in_process(&tmp.path().join("node"));
        tune(&mut node_settings);
        let mut agent_settings = in_process(&tmp.path().join("agent"));
        tune(&mut agent_settings);
        let node = relay::daemon::start_node(node_settings, token.clone()).await.unwrap();
        let agent = relay::daemon::start_agent(agent_settings, token.clone()).await.unwrap();
        let sink = Sink::start().await.unwrap();
        connect(&node.side, &agent.side, &sink.url).await;
        Pair {
            node,
            agent,
            token,
            _sink: sink,
            _tmp: tmp,
        }
    }

    /// (listener name, base URL, the key that names its hosts, its origins key).
    fn listeners(&self) -> [(&'static str, String, &'static str, &'static str); 2] {
        [
            (
                "api",
                format!("http://{}", self.node.info.api.clone().unwrap()),
                "node.api_names",
                "node.api_allowed_origins",
            ),
            (
                "intake",
                format!("http://{}", self.agent.info.api.clone().unwrap()),
                "agent.intake_names",
                "agent.intake_allowed_origins",
            ),
        ]
    }

    async fn last_seqs(&self) -> (u64, u64) {
        last_seqs(&self.node.side, &self.agent.side).await
    }

    async fn stop(self) {
        self.token.cancel();
        self.node.task.await.unwrap().unwrap();
        self.agent.task.await.unwrap().unwrap();
    }
}

/// Every route of the local API, as (method, path).
const ROUTES: [(Method, &str); 7] = [
    (Method::GET, "/healthz"),
    (Method::GET, "/readyz"),
    (Method::GET, "/metrics"),
    (Method::POST, "/v1/connections/c/messages"),
    (Method::POST, "/v1/hooks/azure-devops"),
    (Method::OPTIONS, "/v1/connections/c/messages"),
    (Method::GET, "/no/such/route"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused_on_every_route_of_both_listeners() {
    let pair = Pair::start(|_| {}).await;
    let before = pair.last_seqs().await;
    for (listener, base, names_key, _) in pair.listeners() {
        let port = base.rsplit(':').next().unwrap().to_owned();
        let foreign = [
            format!("rebind.example:{port}"),
            "rebind.example".to_owned(),
            format!("localhost.rebind.example:{port}"),
            format!("127.0.0.1.nip.example:{port}"),
            format!("[2001:db8::1]:{port}"),
            "not a host".to_owned(),
        ];
        let mut refused = 0;
        for host in &foreign {
            for (method, path) in ROUTES {
                let reply = send(
                    &base,
                    method.clone(),
                    path,
                    &[("host", host), ("content-type", "text/plain")],
                    b"x",
                )
                .await;
                let e = json(&reply);
                assert_eq!(
                    (reply.status.as_u16(), e["code"].as_str()),
                    (421, Some("unknown_host")),
                    "{listener} {method} {path} Host {host}: {e}"
                );
                let message = e["error"].as_str().unwrap();
                assert!(message.contains(names_key), "{message}");
                refused += 1;
            }
        }
        // Names the listener answers to, on any port (a tunnel changes it).
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            "localhost:1".to_owned(),
            "LOCALHOST.".to_owned(),
            format!("[::1]:{port}"),
        ] {
            let reply = send(&base, Method::GET, "/healthz", &[("host", &host)], b"").await;
            assert_eq!(reply.status, 200, "{listener} Host {host}");
        }
        let metrics = scrape(&base).await;
        assert_eq!(refusals(&metrics, "host"), refused, "{listener}");
        assert!(
            metrics.contains(&format!(
                "relay_local_refusals_total{{listener=\"{listener}\",reason=\"host\"}}"
            )),
            "{metrics}"
        );

        // Without any Host: HTTP/1.0 may (no browser sends that), HTTP/1.1 must name one.
        let addr = base.trim_start_matches("http://");
        let (s, body) = raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert_eq!((s, body.as_str()), (200, "ok\n"));
        let (s, body) = raw(addr, b"GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n").await;
        assert_eq!(s, 400, "{body}");
        assert!(body.contains("Host"), "{body}");
        let (s, _) = raw(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: rebind.example\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(s, 421);
        let (s, _) = raw(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: rebind.example\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(s, 421, "a second Host header");
    }
    assert_eq!(pair.last_seqs().await, before, "nothing was queued");

    // The same POST with the listener's own name goes through.
    for (_, base, _, _) in pair.listeners() {
        let (s, e) = post(&client(), &base, "c", b"plain".to_vec(), &[("host", "localhost")])
            .await
            .unwrap();
        assert_eq!(s, 202, "{e}");
    }
    assert_eq!(pair.last_seqs().await, (before.0 + 1, before.1 + 1));
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_are_refused_and_queue_nothing_while_plain_programs_post() {
    let pair = Pair::start(|_| {}).await;
    for (listener, base, _, origins_key) in pair.listeners() {
        let own = base.clone();
        let page = "http://127.0.0.1:1";
        // What any page can make a browser send: a "simple" POST, no preflight.
        let cases: [(&[(&str, &str)], &str); 8] = [
            (
                &[("origin", "http://evil.example"), ("sec-fetch-site", "cross-site")],
                "cross_origin",
            ),
            (&[("origin", "http://evil.example")], "cross_origin"),
            (&[("origin", page), ("sec-fetch-site", "same-site")], "cross_origin"),
            (&[("origin", "https://127.0.0.1")], "cross_origin"),
            (&[("origin", "null"), ("sec-fetch-site", "cross-site")], "origin_null"),
            (&[("sec-fetch-site", "cross-site")], "fetch_site"),
            (&[("sec-fetch-site", "same-site")], "fetch_site"),
            (
                &[("origin", own.as_str()), ("sec-fetch-site", "cross-site")],
                "fetch_site",
            ),
        ];
        let before = pair.last_seqs().await;
        let metrics = scrape(&base).await;
        let counted: Vec<u64> = ["cross_origin", "origin_null", "fetch_site"]
            .iter()
            .map(|r| refusals(&metrics, r))
            .collect();
        for (headers, reason) in cases {
            let mut headers = headers.to_vec();
            headers.push(("content-type", "text/plain"));
            for (method, path) in ROUTES {
                let reply = send(&base, method.clone(), path, &headers, b"from a page").await;
                let e = json(&reply);
                assert_eq!(
                    (reply.status.as_u16(), e["code"].as_str()),
                    (403, Some("cross_site")),
                    "{listener} {method} {path} {headers:?}: {e}"
                );
                assert!(e["error"].as_str().unwrap().contains(origins_key), "{e}");
                assert_eq!(header(&reply, "access-control-allow-origin"), None);
            }
            let metrics = scrape(&base).await;
            assert!(refusals(&metrics, reason) > 0, "{reason}");
        }
        assert_eq!(pair.last_seqs().await, before, "{listener}: nothing was queued");
        let metrics = scrape(&base).await;
        let after: Vec<u64> = ["cross_origin", "origin_null", "fetch_site"]
            .iter()
            .map(|r| refusals(&metrics, r))
            .collect();
        let routes = ROUTES.len() as u64;
        assert_eq!(
            after,
            [counted[0] + 4 * routes, counted[1] + routes, counted[2] + 3 * routes],
            "{listener}: refusals by reason"
        );

        // Plain programs send neither header: unaffected.
        let (s, e) = post(
            &client(),
            &base,
            "c",
            b"from curl".to_vec(),
            &[("content-type", "text/plain")],
        )
        .await
        .unwrap();
        assert_eq!(s, 202, "{e}");
        // A page of the listener's own origin, and a typed-in address, are not cross-site.
        for headers in [
            [("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
            [("sec-fetch-site", "none"), ("x-nothing", "")],
        ] {
            let (s, e) = post(&client(), &base, "c", b"same origin".to_vec(), &headers)
                .await
                .unwrap();
            assert_eq!(s, 202, "{headers:?}: {e}");
        }
        let after_posts = pair.last_seqs().await;
        let moved = if listener == "api" {
            (after_posts.0 - before.0, after_posts.1 - before.1)
        } else {
            (after_posts.1 - before.1, after_posts.0 - before.0)
        };
        assert_eq!(moved, (3, 0), "{listener}: the three plain posts, on its own side only");
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_comes_before_the_bearer_token() {
    let pair = Pair::start(|s| {
        s.node.api_token = Some(relay::config::Secret::new("node-token"));
        s.agent.api_token = Some(relay::config::Secret::new("agent-token"));
    })
    .await;
    for ((_, base, _, _), token) in pair.listeners().into_iter().zip(["node-token", "agent-token"]) {
        let before = pair.last_seqs().await;
        let bearer = format!("Bearer {token}");
        let auth = ("authorization", bearer.as_str());
        let reply = send(
            &base,
            Method::POST,
            "/v1/connections/c/messages",
            &[("host", "rebind.example")],
            b"x",
        )
        .await;
        assert_eq!(reply.status, 421, "a foreign host before a missing token");
        let reply = send(
            &base,
            Method::POST,
            "/v1/connections/c/messages",
            &[auth, ("origin", "http://evil.example")],
            b"x",
        )
        .await;
        assert_eq!(
            reply.status, 403,
            "a right token does not make a cross-site request right"
        );
        let reply = send(&base, Method::POST, "/v1/connections/c/messages", &[], b"x").await;
        assert_eq!(reply.status, 401, "the token still applies");
        assert_eq!(pair.last_seqs().await, before);
        let reply = send(&base, Method::POST, "/v1/connections/c/messages", &[auth], b"x").await;
        assert_eq!(reply.status, 202);
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_gets_its_preflight_answered_and_can_post() {
    let app = "http://127.0.0.1:3000";
    let pair = Pair::start(|s| {
        s.node.api_allowed_origins = vec!["https://app.example/".into(), app.into()];
        s.agent.intake_allowed_origins = vec![app.into()];
    })
    .await;
    for (listener, base, _, _) in pair.listeners() {
        let preflight = send(
            &base,
            Method::OPTIONS,
            "/v1/connections/c/messages",
            &[
                ("origin", app),
                ("sec-fetch-site", "same-site"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "content-type,idempotency-key,authorization",
                ),
            ],
            b"",
        )
        .await;
        assert_eq!(preflight.status, 204, "{listener}");
        assert_eq!(header(&preflight, "access-control-allow-origin"), Some(app));
        assert!(header(&preflight, "access-control-allow-methods")
            .unwrap()
            .contains("POST"));
        let allowed = header(&preflight, "access-control-allow-headers")
            .unwrap()
            .to_ascii_lowercase();
        for h in ["content-type", "idempotency-key", "authorization"] {
            assert!(allowed.contains(h), "{listener}: {h} in {allowed}");
        }
        assert_eq!(header(&preflight, "access-control-max-age"), Some("600"));
        assert!(header(&preflight, "vary").unwrap().contains("Origin"));

        let before = pair.last_seqs().await;
        let reply = send(
            &base,
            Method::POST,
            "/v1/connections/c/messages",
            &[
                ("origin", app),
                ("sec-fetch-site", "same-site"),
                ("content-type", "application/json"),
                ("idempotency-key", "from-the-app-1"),
            ],
            b"{\"from\":\"the app\"}",
        )
        .await;
        assert_eq!(reply.status, 202, "{listener}: {}", json(&reply));
        assert_eq!(header(&reply, "access-control-allow-origin"), Some(app));
        assert!(header(&reply, "access-control-expose-headers")
            .unwrap()
            .contains("Idempotent-Replayed"));
        assert!(reply.headers.get_all("vary").iter().any(|v| v == "Origin"));
        assert!(json(&reply)["seq"].as_u64().is_some());
        assert_ne!(pair.last_seqs().await, before);
        // Errors reach the application readable too.
        let reply = send(
            &base,
            Method::POST,
            "/v1/connections/nope/messages",
            &[("origin", app)],
            b"x",
        )
        .await;
        assert_eq!(reply.status, 404);
        assert_eq!(header(&reply, "access-control-allow-origin"), Some(app));
        // A plain program's answer says it varies by origin, and carries no CORS grant.
        let reply = send(&base, Method::GET, "/healthz", &[], b"").await;
        assert_eq!(reply.status, 200);
        assert_eq!(header(&reply, "access-control-allow-origin"), None);
        assert!(reply.headers.get_all("vary").iter().any(|v| v == "Origin"));

        // Any other origin is still refused, preflight included.
        for other in ["http://127.0.0.1:3001", "http://evil.example"] {
            let reply = send(
                &base,
                Method::OPTIONS,
                "/v1/connections/c/messages",
                &[("origin", other), ("access-control-request-method", "POST")],
                b"",
            )
            .await;
            assert_eq!(reply.status, 403, "{listener} {other}");
            assert_eq!(header(&reply, "access-control-allow-origin"), None);
        }
    }
    // The node allows one more origin than the agent.
    let [(_, node, _, _), (_, agent, _, _)] = pair.listeners();
    let headers = [("origin", "https://app.example"), ("sec-fetch-site", "cross-site")];
    assert_eq!(
        send(&node, Method::POST, "/v1/connections/c/messages", &headers, b"x")
            .await
            .status,
        202
    );
    assert_eq!(
        send(&agent, Method::POST, "/v1/connections/c/messages", &headers, b"x")
            .await
            .status,
        403
    );
    pair.stop().await;
}

/// The released binary, configured through the environment: configured names are answered
/// to, and a hostile page's stream of refusals leaves one log line per reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_names_work_and_refusals_are_logged_once_a_minute_per_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let node_dir = tmp.path().join("node");
    let mut node = Daemon::start(
        &node_dir,
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        &[
            ("RELAY_NODE__API_NAMES", "relay-node.test, relay.corp.test"),
            ("RELAY_NODE__API_ALLOWED_ORIGINS", "http://localhost:3000"),
        ],
    )
    .await;
    let base = node.api();
    for host in ["relay-node.test", "relay.corp.test:8080", "RELAY-NODE.TEST."] {
        let reply = send(&base, Method::GET, "/healthz", &[("host", host)], b"").await;
        assert_eq!(reply.status, 200, "{host}");
    }
    let reply = send(&base, Method::GET, "/healthz", &[("host", "other.test")], b"").await;
    assert_eq!(reply.status, 421);
    let message = json(&reply)["error"].as_str().unwrap().to_owned();
    assert!(
        message.contains("relay-node.test") && message.contains("RELAY_NODE__API_NAMES"),
        "{message}"
    );
    for _ in 0..25 {
        let reply = send(
            &base,
            Method::POST,
            "/v1/connections/c/messages",
            &[("origin", "http://evil.example")],
            b"x",
        )
        .await;
        assert_eq!(reply.status, 403);
        let reply = send(&base, Method::GET, "/metrics", &[("host", "rebind.example")], b"").await;
        assert_eq!(reply.status, 421);
    }
    let metrics = scrape(&base).await;
    assert_eq!(refusals(&metrics, "cross_origin"), 25);
    assert_eq!(refusals(&metrics, "host"), 26);
    // Log lines are written before the answer is sent, so they are there now.
    let log = node.log();
    let lines = |reason: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("reason=\"{reason}\"")) || l.contains(&format!("reason={reason} ")))
            .count()
    };
    assert_eq!(lines("cross_origin"), 1, "{log}");
    assert_eq!(lines("host"), 1, "{log}");
    assert!(log.contains("http://evil.example"), "{log}");
    assert_eq!(node.terminate().await.code(), Some(0), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_origin_or_name_stops_the_daemon_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (var, value, key) in [
        (
            "RELAY_NODE__API_ALLOWED_ORIGINS",
            "https://app.example/console",
            "node.api_allowed_origins",
        ),
        ("RELAY_NODE__API_NAMES", "http://relay.corp", "node.api_names"),
        (
            "RELAY_AGENT__INTAKE_ALLOWED_ORIGINS",
            "app.example",
            "agent.intake_allowed_origins",
        ),
    ] {
        let out = common::cli(
            &tmp.path().join("d"),
            &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
            &[(var, value)],
            None,
        )
        .await;
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains(var) && err.contains(key) && err.contains(value), "{err}");
    }
}
