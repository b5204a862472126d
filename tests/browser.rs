//! The local listeners against a real browser: headless Chromium, driven over WebDriver,
//! opens a page of another origin (another port on 127.0.0.1 is another origin, as any web
//! site is) that auto-submits forms and fires `fetch()` calls at the node's message API and
//! the agent's intake. Nothing is queued on either side, the browser's requests carried the
//! headers the guard refuses (counted by reason), and the page cannot read `/metrics`. A
//! name that resolves to 127.0.0.1 (what DNS rebinding achieves) is refused too, while a page
//! of an allowed origin gets through its preflight, posts and reads the answer.
//!
//! Without Chromium and chromedriver (Debian: `apt-get install chromium chromium-driver`)
//! the test says loudly that it was skipped; with `REQUIRE_CHROMIUM=1` (set by `.ci/run`) a
//! missing browser is a failure. `CHROMIUM=PATH` and `CHROMEDRIVER=PATH` name other binaries.

mod common;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{connect, in_process, skip_unless_required, wait_for, DEADLINE};
use relay::http::{Method, StatusCode};
use relay::sink::Sink;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Makes a missing browser a failure instead of a skip.
const REQUIRE: &str = "REQUIRE_CHROMIUM";

/// The variable `var` when it is set; else the first of `candidates` that exists, a path or
/// a name looked up on `PATH`.
fn locate(var: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Some(PathBuf::from(path)).filter(|p| p.exists());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    candidates.iter().find_map(|c| {
        if c.contains('/') {
            Some(PathBuf::from(c)).filter(|p| p.exists())
        } else {
            std::env::split_paths(&path).map(|dir| dir.join(c)).find(|p| p.exists())
        }
    })
}

/// (chromium, chromedriver), or `None` after a loud line when missing and not required.
fn browser_bins(test: &str) -> Option<(PathBuf, PathBuf)> {
    // Debian's /usr/bin/chromium is a wrapper script; the browser itself is beside the driver.
    let chromium = locate(
        "CHROMIUM",
        &[
            "/usr/lib/chromium/chromium",
            "/usr/bin/chromium",
            "/usr/bin/chromium-browser",
        ],
    );
    let driver = locate("CHROMEDRIVER", &["chromedriver", "/usr/lib/chromium/chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            skip_unless_required(
                test,
                REQUIRE,
                "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver, or CHROMIUM=PATH and CHROMEDRIVER=PATH)",
            );
            None
        }
    }
}

/// A chromedriver process on an ephemeral port; killed when dropped.
struct Driver {
    child: Child,
    base: String,
}

impl Driver {
    async fn start(bin: PathBuf) -> Driver {
        let mut child = Command::new(&bin)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let stdout = child.stdout.take().unwrap();
        // It prints the port it chose: "ChromeDriver was started successfully on port N."
        let read_port = tokio::task::spawn_blocking(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let port = lines.by_ref().map_while(Result::ok).find_map(|line| {
                let rest = line.split("started successfully on port ").nth(1)?;
                rest.trim_end_matches('.').trim().parse::<u16>().ok()
            });
            // Keep draining, so the driver never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            port
        });
        let port = tokio::time::timeout(DEADLINE, read_port)
            .await
            .expect("chromedriver did not say its port in time")
            .unwrap()
            .expect("chromedriver's port");
        Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session, spoken as plain JSON over HTTP.
#[derive(Clone)]
struct Session {
    http: relay::http::Client,
    base: String,
}

async fn webdriver(http: &relay::http::Client, method: Method, url: &str, body: Option<Value>) -> Value {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let req = relay::http::request(method, url, &[("content-type", "application/json")], bytes).unwrap();
    let reply = http.send(req, DEADLINE, 16 << 20).await.unwrap();
    let value: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    assert_eq!(reply.status, StatusCode::OK, "WebDriver {url}: {value}");
    value["value"].clone()
}

impl Session {
    async fn new(driver: &Driver, chromium: &std::path::Path, profile: &std::path::Path) -> Session {
        let http = common::client();
        let caps = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless=new",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        format!("--user-data-dir={}", profile.display()),
                        // DNS rebinding's effect, without a DNS server: this name is 127.0.0.1.
                        "--host-resolver-rules=MAP rebind.test 127.0.0.1",
                        // Plain http, as the local listeners speak: no upgrade attempt first.
                        "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
                        "--no-first-run",
                        "--no-default-browser-check",
                    ],
                },
            }},
        });
        let value = webdriver(&http, Method::POST, &format!("{}/session", driver.base), Some(caps)).await;
        let id = value["sessionId"].as_str().expect("a session id").to_owned();
        Session {
            http,
            base: format!("{}/session/{id}", driver.base),
        }
    }

    async fn open(&self, url: &str) {
        webdriver(
            &self.http,
            Method::POST,
            &format!("{}/url", self.base),
            Some(json!({ "url": url })),
        )
        .await;
    }

    async fn script(&self, script: &str) -> Value {
        let body = json!({ "script": script, "args": [] });
        webdriver(
            &self.http,
            Method::POST,
            &format!("{}/execute/sync", self.base),
            Some(body),
        )
        .await
    }

    /// The JSON a page writes into `#out` when it is done, polled with a deadline.
    async fn results(&self) -> Value {
        let text = wait_for("the page to report", || async {
            let v = self
                .script("return document.title === 'done' ? document.getElementById('out').textContent : null")
                .await;
            v.as_str().map(str::to_owned)
        })
        .await;
        serde_json::from_str(&text).unwrap()
    }

    async fn close(&self) {
        webdriver(&self.http, Method::DELETE, &self.base, None).await;
    }
}

/// Serves `html` at `/` of `listener` until `token` is cancelled.
fn serve_page(listener: tokio::net::TcpListener, html: String, token: CancellationToken) {
    tokio::spawn(relay::http::serve(
        listener,
        relay::http::ServerOptions {
            tls: None,
            max_connections: 64,
            name: "page",
        },
        move |req, _peer| {
            let html = html.clone();
            async move {
                if req.uri().path() == "/" {
                    relay::http::bytes(StatusCode::OK, "text/html; charset=utf-8", html)
                } else {
                    relay::http::text(StatusCode::NOT_FOUND, "not here\n")
                }
            }
        },
        token,
    ));
}

/// A page of another site: what any web page the operator opens could do.
fn hostile_page(node: &str, agent: &str) -> String {
    r#"<!doctype html>
<html><head><title>running</title></head><body>
<form id="to-node" method="POST" action="NODE/v1/connections/c/messages" enctype="text/plain" target="node-frame">
  <input name="payload" value="from a form">
</form>
<form id="to-agent" method="POST" action="AGENT/v1/connections/c/messages" target="agent-frame">
  <input name="payload" value="from a form">
</form>
<iframe name="node-frame"></iframe><iframe name="agent-frame"></iframe>
<pre id="out"></pre>
<script>
async function attempt(url, init) {
  try {
    const r = await fetch(url, init);
    let body = '';
    try { body = await r.text(); } catch (e) { body = 'unreadable: ' + e; }
    return {outcome: 'answered', status: r.status, type: r.type, body: body.slice(0, 200)};
  } catch (e) {
    return {outcome: 'failed', error: String(e)};
  }
}
// A "simple" request: no preflight, the browser sends it whatever the answer.
const post = {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body: 'from fetch'};
(async () => {
  document.getElementById('to-node').submit();
  document.getElementById('to-agent').submit();
  const results = {
    node_post: await attempt('NODE/v1/connections/c/messages', post),
    agent_post: await attempt('AGENT/v1/connections/c/messages', post),
    node_metrics: await attempt('NODE/metrics', {}),
    agent_metrics: await attempt('AGENT/metrics', {}),
    node_healthz: await attempt('NODE/healthz', {mode: 'no-cors'}),
  };
  document.getElementById('out').textContent = JSON.stringify(results);
  document.title = 'done';
})();
</script>
</body></html>
"#
    .replace("NODE", node)
    .replace("AGENT", agent)
}

/// A trusted web application's page, whose origin the node allows and the agent does not.
fn application_page(node: &str, agent: &str) -> String {
    r#"<!doctype html>
<html><head><title>running</title></head><body>
<pre id="out"></pre>
<script>
async function submit(base, key) {
  try {
    const r = await fetch(base + '/v1/connections/c/messages', {
      method: 'POST',
      headers: {'Content-Type': 'application/json', 'Idempotency-Key': key},
      body: JSON.stringify({from: 'the application'}),
    });
    return {outcome: 'answered', status: r.status, body: await r.json(),
            replayed: r.headers.get('Idempotent-Replayed')};
  } catch (e) {
    return {outcome: 'failed', error: String(e)};
  }
}
(async () => {
  const results = {
    node_post: await submit('NODE', 'app-1'),
    node_repeat: await submit('NODE', 'app-1'),
    agent_post: await submit('AGENT', 'app-2'),
  };
  try {
    const m = await fetch('NODE/metrics');
    results.node_metrics = {outcome: 'answered', status: m.status, readable: (await m.text()).includes('relay_queue_depth')};
  } catch (e) {
    results.node_metrics = {outcome: 'failed', error: String(e)};
  }
  document.getElementById('out').textContent = JSON.stringify(results);
  document.title = 'done';
})();
</script>
</body></html>
"#
    .replace("NODE", node)
    .replace("AGENT", agent)
}

async fn scrape(base: &str) -> String {
    let req = relay::http::request(Method::GET, &format!("{base}/metrics"), &[], Vec::new()).unwrap();
    let reply = common::client().send(req, DEADLINE, 1 << 20).await.unwrap();
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// Refusal counts of a listener by reason, from its `/metrics`.
async fn refusals(base: &str) -> std::collections::BTreeMap<String, u64> {
    scrape(base)
        .await
        .lines()
        .filter(|l| l.starts_with("relay_local_refusals_total{"))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?.to_owned();
            let n = l.rsplit(' ').next()?.parse().ok()?;
            (n > 0).then_some((reason, n))
        })
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_queues_nothing_and_reads_nothing() {
    let test = "a_page_of_another_origin_queues_nothing_and_reads_nothing";
    let Some((chromium, driver_bin)) = browser_bins(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    // The pages' servers first: the application's origin goes into the node's settings.
    let hostile_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile = format!("http://{}", hostile_listener.local_addr().unwrap());
    let app = format!("http://{}", app_listener.local_addr().unwrap());

    let mut node_settings = in_process(&tmp.path().join("node"));
    node_settings.node.api_allowed_origins = vec![app.clone()];
    let node = relay::daemon::start_node(node_settings, token.clone()).await.unwrap();
    let agent = relay::daemon::start_agent(in_process(&tmp.path().join("agent")), token.clone())
        .await
        .unwrap();
    // The private side's webhook: whatever the node's API queues ends up here.
    let sink = Sink::start().await.unwrap();
    let hook = sink.url.clone();
    let delivered = common::collect(sink);
    connect(&node.side, &agent.side, &hook).await;
    let node_api = format!("http://{}", node.info.api.clone().unwrap());
    let agent_api = format!("http://{}", agent.info.api.clone().unwrap());
    serve_page(hostile_listener, hostile_page(&node_api, &agent_api), token.clone());
    serve_page(app_listener, application_page(&node_api, &agent_api), token.clone());
    let last_seqs = || async {
        (
            node.side.connections().await.unwrap()[0].outbound.last_seq,
            agent.side.status().unwrap()[0].outbound.last_seq,
        )
    };
    let before = last_seqs().await;

    let driver = Driver::start(driver_bin).await;
    let profile = tempfile::tempdir().unwrap();
    let session = Session::new(&driver, &chromium, profile.path()).await;
    // The checks run in their own task so that the browser is closed whatever they find.
    let checks = {
        let session = session.clone();
        let (node_api, agent_api) = (node_api.clone(), agent_api.clone());
        tokio::spawn(async move {
            session.open(&format!("{hostile}/")).await;
            let page = session.results().await;
            // The page could not read a thing: its cross-origin reads failed outright, and its
            // no-cors requests got opaque answers.
            for name in ["node_metrics", "agent_metrics"] {
                assert_eq!(page[name]["outcome"], "failed", "{name}: {page}");
            }
            for name in ["node_post", "agent_post", "node_healthz"] {
                assert_eq!(page[name]["type"], "opaque", "{name}: {page}");
                assert_eq!(page[name]["body"], "", "{name}: {page}");
            }
            // The browser sent both forms, two posts, two reads and a no-cors GET, and the
            // guard refused each for the header it carried: an Origin of another origin, or
            // (the GET, which carries no Origin) Sec-Fetch-Site: same-site.
            let node_expected = counts(&[("cross_origin", 3), ("fetch_site", 1)]);
            let agent_expected = counts(&[("cross_origin", 3)]);
            let total = |m: &std::collections::BTreeMap<String, u64>| m.values().sum::<u64>();
            let (n, a) = wait_for("the guard to count the page's requests", || async {
                let (n, a) = (refusals(&node_api).await, refusals(&agent_api).await);
                (total(&n) >= total(&node_expected) && total(&a) >= total(&agent_expected)).then_some((n, a))
            })
            .await;
            assert_eq!(
                (n, a),
                (node_expected, agent_expected),
                "refusals by reason (node, agent)"
            );

            // A page on a name that resolves to 127.0.0.1 would be same-origin with the API:
            // it is refused by name, so what it reads is the refusal, not the metrics.
            let port = node_api.rsplit(':').next().unwrap();
            session.open(&format!("http://rebind.test:{port}/metrics")).await;
            let text = session.script("return document.body.innerText").await;
            let text = text.as_str().unwrap_or_default();
            assert!(
                text.contains("unknown_host") && !text.contains("relay_queue_depth"),
                "{text}"
            );
            // Chromium retries a 421 once on a fresh connection, and asks for a favicon too.
            assert!(refusals(&node_api).await.get("host").is_some_and(|n| *n >= 1));

            // The application's page: preflight answered, posted once (the repeat replayed),
            // the answer and /metrics readable; the agent, which does not allow it, refused.
            session.open(&format!("{app}/")).await;
            let page = session.results().await;
            assert_eq!(page["node_post"]["status"], 202, "{page}");
            assert!(page["node_post"]["body"]["seq"].as_u64().is_some(), "{page}");
            assert_eq!(page["node_repeat"]["status"], 202, "{page}");
            assert_eq!(page["node_repeat"]["replayed"], "true", "{page}");
            assert_eq!(page["node_repeat"]["body"], page["node_post"]["body"], "{page}");
            assert_eq!(page["node_metrics"]["readable"], true, "{page}");
            assert_eq!(page["agent_post"]["outcome"], "failed", "{page}");
            page
        })
    };
    let outcome = checks.await;
    session.close().await;
    drop(driver);
    let page = match outcome {
        Ok(page) => page,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };

    // The hostile page queued nothing on either side; the application one message on the node.
    let after = last_seqs().await;
    assert_eq!(after, (before.0 + 1, before.1), "{page}");
    // The agent refused the application's preflight, so its POST was never sent.
    assert_eq!(refusals(&agent_api).await, counts(&[("cross_origin", 4)]));
    // In order, so had the hostile page queued anything, it would have arrived first.
    let bodies = wait_for("the application's message at the webhook", || async {
        let bodies = common::bodies(&delivered);
        (!bodies.is_empty()).then_some(bodies)
    })
    .await;
    assert_eq!(bodies, [r#"{"from":"the application"}"#]);
    token.cancel();
    node.task.await.unwrap().unwrap();
    agent.task.await.unwrap().unwrap();
}
