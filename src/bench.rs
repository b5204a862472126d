//! `relay bench`: throughput and latency of the whole path on loopback, each figure printed
//! beside a direct baseline measured in the same run (plain POSTs to the same kind of
//! webhook), as DESIGN.md's performance targets are stated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::agent::AcceptOptions;
use crate::config::Settings;
use crate::error::{Kind, OpError, OpResult};
use crate::http::{self, Method};
use crate::invite::Invitation;
use crate::node::{Action, InitiateRequest};
use crate::sink::Sink;

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Payloads per throughput phase.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Concurrent submitters for the intake phase.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Offered load of the latency phase (payloads per second).
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Length of the latency phase in seconds.
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
}

fn fail(e: impl std::fmt::Display) -> OpError {
    OpError::new(Kind::Failed, e.to_string())
}

fn payload(i: usize, size: usize) -> Vec<u8> {
    let mut body = format!("{i:010}").into_bytes();
    body.resize(size.max(10), b'x');
    body
}

fn index_of(body: &[u8]) -> usize {
    std::str::from_utf8(&body[..10.min(body.len())])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

async fn post(client: &http::Client, url: &str, body: Vec<u8>) -> OpResult<()> {
    let req = http::request(Method::POST, url, &[("content-type", "application/json")], body).map_err(fail)?;
    let reply = client.send(req, Duration::from_secs(30), 1 << 16).await.map_err(fail)?;
    if reply.status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("{url} answered {}", reply.status)))
    }
}

/// Posts payloads `0..n` from `concurrency` tasks (each in its own order); returns the time.
async fn post_concurrently(
    client: &http::Client,
    url: &str,
    n: usize,
    size: usize,
    concurrency: usize,
) -> OpResult<Duration> {
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), OpError>(());
                }
                post(&client, &url, payload(i, size)).await?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(fail)??;
    }
    Ok(start.elapsed())
}

/// Waits for `n` deliveries and checks they came in queue order (`Relay-Seq` increasing).
async fn drain_in_order(sink: &mut Sink, n: usize) -> OpResult<Instant> {
    let mut last = None;
    let mut seen = 0;
    let mut prev: Option<u64> = None;
    while seen < n {
        let r = sink
            .next(Duration::from_secs(60))
            .await
            .ok_or_else(|| fail(format!("only {seen} of {n} delivered")))?;
        if let Some(seq) = r.header("relay-seq").and_then(|s| s.parse::<u64>().ok()) {
            if prev.is_some_and(|p| seq <= p) {
                return Err(fail(format!("delivered out of order: seq {seq} after {prev:?}")));
            }
            prev = Some(seq);
        }
        seen += 1;
        last = Some(r.at);
    }
    last.ok_or_else(|| fail("nothing delivered"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Offers `rate` payloads per second for `seconds` to `url`; returns per-payload latency from
/// the start of the request to its arrival at `sink`.
async fn latency(client: &http::Client, url: &str, sink: &mut Sink, opts: &BenchOptions) -> OpResult<Vec<Duration>> {
    let n = (opts.rate * opts.seconds) as usize;
    let mut sent = vec![None; n];
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        ticker.tick().await;
        sent[i] = Some(Instant::now());
        let (client, url, size) = (client.clone(), url.to_owned(), opts.size);
        tasks.push(tokio::spawn(async move { post(&client, &url, payload(i, size)).await }));
        while let Ok(r) = sink.rx.try_recv() {
            if let Some(Some(at)) = sent.get(index_of(&r.body)) {
                latencies.push(r.at.duration_since(*at));
            }
        }
    }
    for t in tasks {
        t.await.map_err(fail)??;
    }
    while latencies.len() < n {
        let r = sink
            .next(Duration::from_secs(30))
            .await
            .ok_or_else(|| fail("latency phase: deliveries stopped"))?;
        if let Some(Some(at)) = sent.get(index_of(&r.body)) {
            latencies.push(r.at.duration_since(*at));
        }
    }
    latencies.sort();
    Ok(latencies)
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs every phase and prints figures with their baselines and ratios.
pub async fn run(opts: BenchOptions) -> OpResult<()> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let token = CancellationToken::new();
    let client = http::Client::webhook(
        crate::tls::local_client_config().map_err(fail)?,
        Duration::from_secs(10),
    );
    let n = opts.messages;
    println!(
        "relay bench: {n} payloads of {} bytes per phase, {} submitters, latency at {}/s for {}s; loopback, fsync on",
        opts.size, opts.concurrency, opts.rate, opts.seconds
    );

    // Baselines: plain POSTs to a webhook like the one relay delivers to.
    let mut direct = Sink::start().await.map_err(fail)?;
    let start = Instant::now();
    for i in 0..n {
        post(&client, &direct.url, payload(i, opts.size)).await?;
    }
    let seq_rate = n as f64 / start.elapsed().as_secs_f64();
    drain_in_order(&mut direct, n).await?;
    let conc = post_concurrently(&client, &direct.url, n, opts.size, opts.concurrency).await?;
    let conc_rate = n as f64 / conc.as_secs_f64();
    while direct.rx.try_recv().is_ok() {}

    // A node and an agent on loopback.
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut node_settings = Settings {
        data_dir: dir.path().join("node"),
        ..Settings::default()
    };
    node_settings.node.listen = loopback;
    node_settings.node.api_listen = loopback;
    let mut agent_settings = Settings {
        data_dir: dir.path().join("agent"),
        ..Settings::default()
    };
    agent_settings.agent.intake_listen = loopback;
    let node = crate::daemon::start_node(node_settings, token.clone()).await?;
    let agent = crate::daemon::start_agent(agent_settings, token.clone()).await?;
    let mut private_app = Sink::start().await.map_err(fail)?;
    let code = node
        .side
        .initiate(InitiateRequest {
            name: "bench".into(),
            local_name: "public".into(),
            remote_name: "private".into(),
            description: String::new(),
            mode: "script".into(),
            project: "bench".into(),
            expires: None,
            deliver_to: None,
        })
        .await?;
    agent
        .side
        .accept(
            &Invitation::decode(&code).map_err(fail)?,
            AcceptOptions {
                deliver_to: Some(private_app.url.clone()),
                ..Default::default()
            },
        )
        .await?;
    let intake_url = format!(
        "http://{}/v1/connections/bench/messages",
        node.info.api.clone().unwrap_or_default()
    );

    // Intake alone (delivery paused): group commit under concurrent submitters.
    node.side.set_state("bench", Action::Deactivate).await?;
    let took = post_concurrently(&client, &intake_url, n, opts.size, opts.concurrency).await?;
    let intake_rate = n as f64 / took.as_secs_f64();
    let start = Instant::now();
    node.side.set_state("bench", Action::Activate).await?;
    let last = drain_in_order(&mut private_app, n).await?;
    let backlog_rate = n as f64 / last.duration_since(start).as_secs_f64();

    // End to end: intake → node → agent → webhook, in order.
    let start = Instant::now();
    let submit = {
        let (client, url, size, c) = (client.clone(), intake_url.clone(), opts.size, opts.concurrency.min(8));
        tokio::spawn(async move { post_concurrently(&client, &url, n, size, c).await })
    };
    let last = drain_in_order(&mut private_app, n).await?;
    submit.await.map_err(fail)??;
    let e2e_rate = n as f64 / last.duration_since(start).as_secs_f64();

    // Latency at a steady offered load, against the same load posted directly.
    let direct_url = direct.url.clone();
    let base = latency(&client, &direct_url, &mut direct, &opts).await?;
    let relayed = latency(&client, &intake_url, &mut private_app, &opts).await?;
    let (rss, hwm) = rss_kib();

    println!();
    println!("{:<44} {:>12} {:>12} {:>7}", "figure", "relay", "baseline", "ratio");
    println!(
        "{:<44} {:>10.0}/s {:>10.0}/s {:>7.2}   (target >= 0.80)",
        "end to end, in order vs sequential POSTs",
        e2e_rate,
        seq_rate,
        e2e_rate / seq_rate
    );
    println!(
        "{:<44} {:>10.0}/s {:>10.0}/s {:>7.2}",
        "backlog drain, in order vs sequential POSTs",
        backlog_rate,
        seq_rate,
        backlog_rate / seq_rate
    );
    println!(
        "{:<44} {:>10.0}/s {:>10.0}/s {:>7.2}   (target >= 0.50)",
        format!("intake, {} submitters vs concurrent POSTs", opts.concurrency),
        intake_rate,
        conc_rate,
        intake_rate / conc_rate
    );
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (r, b) = (percentile(&relayed, p), percentile(&base, p));
        println!(
            "{:<44} {:>10.2}ms {:>10.2}ms   added {:.2} ms (target {})",
            format!("latency {label} at {}/s", opts.rate),
            r.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            r.saturating_sub(b).as_secs_f64() * 1e3,
            if label == "p50" { "<= 1 ms" } else { "<= 5 ms" }
        );
    }
    println!(
        "{:<44} {:>9} KiB (peak {hwm} KiB; node, agent and webhooks share this process)",
        "resident memory", rss
    );
    token.cancel();
    node.task.await.map_err(fail)??;
    agent.task.await.map_err(fail)??;
    Ok(())
}
