//! Transport benchmark, measured as an operator runs relay: the release binary as separate
//! node and agent processes (`relay node run`, `relay run`), a load generator and a webhook
//! sink in this process, every figure beside a baseline measured in the same run (rounds
//! interleaved, medians printed), with its ratio and target, and the CPU time the node and
//! the agent spent per 1000 payloads.
//!
//! `cargo bench --bench transport`. `BENCH_PHASES` picks phases (comma-separated, default
//! `throughput,memory`; `all` adds `parked` and `depth`); `BENCH_MESSAGES`, `BENCH_ROUNDS`,
//! `BENCH_QUEUED`, `BENCH_PARKED` and `BENCH_DEPTH` scale them.

#[path = "transport/agents.rs"]
mod agents;
#[path = "../common/mod.rs"]
mod common;
#[path = "transport/sink.rs"]
mod sink;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay::admin::{self, Request};
use relay::http::{self, Method};
use relay::node::{Action, InitiateRequest};

use common::{borrowed, Daemon};
use sink::Sink;

const CONN: &str = "bench";
/// What every spawned daemon gets besides [`common::FAST`]: quiet logs. Nothing for the
/// allocator: the binary keeps its memory bound wherever it runs.
const QUIET: &[(&str, &str)] = &[("RELAY_LOG", "warn")];

/// `phase`'s settings, then [`QUIET`], then `BENCH_DAEMON_ENV` (`NAME=VALUE,…`) to try
/// other settings.
fn daemon_env(phase: &[(&str, &str)]) -> Vec<(String, String)> {
    let extra = std::env::var("BENCH_DAEMON_ENV").unwrap_or_default();
    phase
        .iter()
        .chain(QUIET)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(
            extra
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .collect()
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// A payload of `size` bytes whose first ten are its index (how the sink times it).
fn payload(i: usize, size: usize) -> Vec<u8> {
    let mut body = format!("{i:010}").into_bytes();
    body.resize(size.max(10), b'x');
    body
}

fn client() -> http::Client {
    http::Client::webhook(relay::tls::local_client_config().unwrap(), Duration::from_secs(10))
}

/// POSTs one payload; refusals other than a full queue stop the benchmark.
async fn post(client: &http::Client, url: &str, body: Vec<u8>) {
    let req = http::request(Method::POST, url, &[("content-type", "application/json")], body).unwrap();
    let reply = client.send(req, Duration::from_secs(60), 1 << 16).await.unwrap();
    assert!(reply.status.is_success(), "{url} answered {}", reply.status);
}

/// Posts payloads `first..first + n` to `url` from `tasks` submitters; returns the time.
async fn post_concurrently(
    client: &http::Client,
    url: &str,
    first: usize,
    n: usize,
    size: usize,
    tasks: usize,
) -> Duration {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut running = Vec::new();
    for _ in 0..tasks {
        let (client, url, next) = (client.clone(), url.to_owned(), next.clone());
        running.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                post(&client, &url, payload(first + i, size)).await;
            }
        }));
    }
    for t in running {
        t.await.unwrap();
    }
    started.elapsed()
}

/// CPU time (user + system) and memory of one process, from `/proc`.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Resident and peak resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Per-payload latencies of `n` payloads offered at `rate`/s to `url`, from the start of each
/// request to its arrival at `sink`.
async fn latency(client: &http::Client, url: &str, sink: &Sink, rate: usize, n: usize, size: usize) -> Vec<Duration> {
    sink.record(n);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let base = sink.delivered();
    for i in 0..n {
        ticker.tick().await;
        sent.push(Instant::now());
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move { post(&client, &url, payload(i, size)).await }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    sink.wait_for(base + n as u64, "the latency phase").await;
    let arrived = sink.take_recorded();
    let mut lat: Vec<Duration> = sent
        .iter()
        .zip(arrived)
        .map(|(s, a)| a.expect("every payload arrived").saturating_duration_since(*s))
        .collect();
    lat.sort();
    lat
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// p50 and CPU time of one 1 KiB append + `fdatasync` in `dir`.
fn fdatasync_latency(dir: &Path) -> (Duration, Duration) {
    use std::io::Write;
    let path = dir.join("fdatasync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let block = vec![b'x'; 1024];
    let cpu0 = cpu(std::process::id());
    let mut times: Vec<Duration> = (0..1000)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
            t.elapsed()
        })
        .collect();
    let cpu_each = (cpu(std::process::id()) - cpu0) / times.len() as u32;
    drop(f);
    let _ = std::fs::remove_file(path);
    times.sort();
    (percentile(&times, 0.5), cpu_each)
}

/// relay's store alone, in this process, on the same disk: the p50 and the CPU time of one
/// append + flush (what a lone submitter waits for at each hop), the CPU time of an append
/// and a removal of one message (an outbox, spent at the sending end), and of one message
/// taken in a peer's batch and removed (an inbox, at the receiving end).
async fn store_floor(dir: &Path) -> Floor {
    use relay::store::{Limits, Message, NewMessage, Store};
    let store = Store::open(&dir.join("floor"), 16 << 20).unwrap();
    let limits = Limits {
        max_messages: 1 << 30,
        max_bytes: 1 << 40,
    };
    let q = store.queue("floor", limits).unwrap();
    let msg = |i: usize| NewMessage {
        id: format!("m{i}"),
        content_type: "application/json".into(),
        enqueued_at_ms: 0,
        body: payload(i, 1024).into(),
    };
    let t = cpu(std::process::id());
    let mut flushes = Vec::with_capacity(500);
    for i in 0..500 {
        let t = Instant::now();
        q.append(msg(i), None).unwrap();
        store.flush().await.unwrap();
        flushes.push(t.elapsed());
    }
    let flush_cpu = (cpu(std::process::id()) - t) / flushes.len() as u32;
    flushes.sort();
    // A backlog, as a queue holds one while its consumer lags: appended, then removed.
    let n = 20_000;
    let t = cpu(std::process::id());
    let seqs: Vec<u64> = (0..n).map(|i| q.append(msg(i), None).unwrap().seq).collect();
    for seq in seqs {
        q.remove(seq).unwrap();
    }
    let outbox = (cpu(std::process::id()) - t) / n as u32;
    // The same backlog at an inbox: taken in a peer's batches, then removed one by one.
    let q = store.queue("floor-in", limits).unwrap();
    let base = q.last_seq();
    let t = cpu(std::process::id());
    for start in (base + 1..=base + n as u64).step_by(BATCH) {
        let batch: Vec<Message> = (start..start + BATCH as u64)
            .map(|seq| {
                let m = msg(seq as usize);
                Message {
                    seq,
                    id: m.id,
                    content_type: m.content_type,
                    enqueued_at_ms: 0,
                    body: m.body,
                }
            })
            .collect();
        q.append_remote(&batch).unwrap();
    }
    for seq in base + 1..=base + n as u64 {
        q.remove(seq).unwrap();
    }
    let inbox = (cpu(std::process::id()) - t) / n as u32;
    Floor {
        flush: percentile(&flushes, 0.5),
        flush_cpu,
        outbox,
        inbox,
    }
}

/// Messages per batch in [`store_floor`]'s inbox, as an agent sends a backlog.
const BATCH: usize = 250;

/// What [`store_floor`] measured.
#[derive(Clone, Copy)]
struct Floor {
    /// Append + flush, p50.
    flush: Duration,
    /// CPU time of one append + flush.
    flush_cpu: Duration,
    /// CPU time of an append and a removal at an outbox (a record per message).
    outbox: Duration,
    /// CPU time of a message taken in a peer's batch and removed at an inbox.
    inbox: Duration,
}

/// A node and an agent process with one active connection delivering to `sink`.
struct Pair {
    node: Daemon,
    agent: Daemon,
    intake: String,
    /// The agent's resident memory once started, with its connection.
    idle_rss: f64,
    dir: tempfile::TempDir,
}

impl Pair {
    /// A node and an agent of the relay binary `bin`.
    async fn start(sink: &Sink, bin: &str) -> Pair {
        Pair::start_with(sink, bin, &[]).await
    }

    /// A node with `node_env` besides the daemons' settings, and an agent, of `bin`.
    async fn start_with(sink: &Sink, bin: &str, node_env: &[(String, String)]) -> Pair {
        let dir = tempfile::tempdir_in(bench_root()).unwrap();
        let (node_dir, agent_dir) = (dir.path().join("node"), dir.path().join("agent"));
        let owned = daemon_env(&[]);
        let env = borrowed(&owned);
        let spawn = |data_dir: PathBuf, args: &[&str], extra: &[(String, String)]| {
            let mut all = env.clone();
            all.extend(borrowed(extra));
            let cmd = common::command_of(bin, &data_dir, args, &all);
            async move { Daemon::start_command(cmd, &data_dir, common::log_path(&data_dir)).await }
        };
        let node_args = ["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
        let node = spawn(node_dir.clone(), &node_args, node_env).await;
        let code = initiate(&node_dir, CONN).await;
        let hook = format!("{}/{}", sink.url, dir.path().file_name().unwrap().to_string_lossy());
        let accept = ["accept", "-", "--deliver-to", &hook, "--project", "Bench"];
        let out = common::cli_of(bin, &agent_dir, &accept, &env, Some(&code)).await;
        assert!(out.status.success(), "accept: {}", common::stderr(&out));
        let agent = spawn(agent_dir.clone(), &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
        let intake = format!("{}/v1/connections/{CONN}/messages", node.api());
        let idle_rss = rss_mib(agent.child.id()).0;
        let pair = Pair {
            node,
            agent,
            intake,
            idle_rss,
            dir,
        };
        // Active once one payload made the whole way.
        let c = client();
        let before = sink.delivered();
        post(&c, &pair.intake, payload(0, 16)).await;
        sink.wait_for(before + 1, "the first payload").await;
        pair
    }

    fn cpu(&self) -> (Duration, Duration) {
        (cpu(self.node.child.id()), cpu(self.agent.child.id()))
    }

    async fn set_state(&self, action: Action) {
        let r = admin::call(
            &self.node.data_dir,
            &Request::SetState {
                name: CONN.into(),
                action,
            },
        )
        .await;
        assert!(matches!(r, Ok(Some(_))), "{action:?}: {r:?}");
    }

    /// Inbound depth at the agent and outbound depth at the node.
    async fn depths(&self) -> (u64, u64) {
        let agent = status(&self.agent.data_dir).await;
        let node = status(&self.node.data_dir).await;
        (agent.inbound.depth, node.outbound.depth)
    }
}

async fn status(dir: &Path) -> relay::status::ConnectionStatus {
    let v = admin::call(dir, &Request::Status).await.unwrap().unwrap();
    let list: Vec<relay::status::ConnectionStatus> = serde_json::from_value(v).unwrap();
    list.into_iter().find(|s| s.name == CONN).expect("the connection")
}

async fn initiate(node_dir: &Path, name: &str) -> String {
    let v = admin::call(
        node_dir,
        &Request::Initiate {
            request: InitiateRequest {
                name: name.into(),
                local_name: "public".into(),
                remote_name: "private".into(),
                description: String::new(),
                mode: "script".into(),
                project: "Bench".into(),
                expires: None,
                deliver_to: None,
            },
        },
    )
    .await
    .unwrap()
    .unwrap();
    v.as_str().unwrap().to_owned()
}

/// Where data directories go: the disk the fdatasync probe measures.
fn bench_root() -> PathBuf {
    std::env::temp_dir()
}

/// CPU seconds of node and agent per 1000 payloads.
fn per_k(before: (Duration, Duration), after: (Duration, Duration), n: usize) -> (f64, f64) {
    let k = n as f64 / 1000.0;
    (
        (after.0 - before.0).as_secs_f64() * 1e3 / k,
        (after.1 - before.1).as_secs_f64() * 1e3 / k,
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// One figure: relay, baseline, ratio, target.
fn row(label: &str, relay: f64, base: f64, target: Option<f64>) {
    let ratio = relay / base;
    let judged = target
        .map(|t| format!("  (target >= {t:.2}: {})", verdict(ratio >= t)))
        .unwrap_or_default();
    println!("  {label:<46} {relay:>9.0}/s {base:>9.0}/s {ratio:>6.2}{judged}");
}

struct Round {
    direct_seq: f64,
    direct_conc: f64,
    e2e: f64,
    one: f64,
    fsync_rate: f64,
    /// CPU time of one append + fdatasync.
    fsync_cpu: Duration,
    intake: f64,
    one_intake: f64,
    drain: f64,
    lat_direct: (Duration, Duration),
    lat_relay: (Duration, Duration),
    cpu_e2e: (f64, f64),
    cpu_one: (f64, f64),
    /// The store alone: append + flush p50 and CPU, CPU of an append and a removal.
    floor: Floor,
}

async fn round(pair: &Pair, sink: &Sink, n: usize, size: usize, rate: usize, latency_n: usize) -> Round {
    let c = client();
    // Direct: plain sequential POSTs to the same sink.
    let t = Instant::now();
    for i in 0..n {
        post(&c, &sink.url, payload(i, size)).await;
    }
    let direct_seq = n as f64 / t.elapsed().as_secs_f64();

    // Delivered in order, 32 submitters: from the first POST to the last delivery.
    let before = sink.delivered();
    let cpu0 = pair.cpu();
    let t = Instant::now();
    let submit = {
        let (c, url) = (c.clone(), pair.intake.clone());
        tokio::spawn(async move { post_concurrently(&c, &url, 0, n, size, 32).await })
    };
    sink.wait_for(before + n as u64, "end to end").await;
    let e2e = n as f64 / t.elapsed().as_secs_f64();
    submit.await.unwrap();
    let cpu_e2e = per_k(cpu0, pair.cpu(), n);

    // One submitter, end to end, against one flush of this disk.
    let (fsync, fsync_cpu) = fdatasync_latency(&pair.node.data_dir);
    let floor = store_floor(pair.dir.path()).await;
    let one_n = (n / 4).max(1);
    let before = sink.delivered();
    let cpu0 = pair.cpu();
    let t = Instant::now();
    for i in 0..one_n {
        post(&c, &pair.intake, payload(i, size)).await;
    }
    sink.wait_for(before + one_n as u64, "one submitter").await;
    let one = one_n as f64 / t.elapsed().as_secs_f64();
    let cpu_one = per_k(cpu0, pair.cpu(), one_n);

    // Intake alone (delivery paused) against 32 concurrent plain POSTs.
    let direct_conc = n as f64 / post_concurrently(&c, &sink.url, 0, n, size, 32).await.as_secs_f64();
    pair.set_state(Action::Deactivate).await;
    let intake = n as f64 / post_concurrently(&c, &pair.intake, 0, n, size, 32).await.as_secs_f64();
    // One submitter at the node alone: one durable hop, the disk to itself.
    let t = Instant::now();
    for i in 0..one_n {
        post(&c, &pair.intake, payload(i, size)).await;
    }
    let one_intake = one_n as f64 / t.elapsed().as_secs_f64();
    let before = sink.delivered();
    let t = Instant::now();
    pair.set_state(Action::Activate).await;
    sink.wait_for(before + (n + one_n) as u64, "the backlog").await;
    let drain = (n + one_n) as f64 / t.elapsed().as_secs_f64();

    // Added latency at a steady offered load.
    let d = latency(&c, &sink.url, sink, rate, latency_n, size).await;
    let r = latency(&c, &pair.intake, sink, rate, latency_n, size).await;
    Round {
        direct_seq,
        direct_conc,
        e2e,
        one,
        fsync_rate: 1.0 / fsync.as_secs_f64(),
        fsync_cpu,
        intake,
        one_intake,
        drain,
        lat_direct: (percentile(&d, 0.5), percentile(&d, 0.99)),
        lat_relay: (percentile(&r, 0.5), percentile(&r, 0.99)),
        cpu_e2e,
        cpu_one,
        floor,
    }
}

async fn throughput(sink: &Sink) {
    let (n, rounds, size) = (env_or("BENCH_MESSAGES", 20_000), env_or("BENCH_ROUNDS", 3), 1024);
    let (rate, seconds) = (500, 4);
    println!(
        "throughput: {rounds} rounds of {n} payloads of {size} bytes, relay and direct interleaved; latency at {rate}/s for {seconds} s"
    );
    // Another relay binary (an earlier commit's), measured in the same rounds.
    let mut builds = vec![("this build".to_owned(), common::bin().to_owned())];
    if let Ok(other) = std::env::var("BENCH_BASELINE_BIN") {
        builds.push((format!("baseline build {other}"), other));
    }
    let mut pairs = Vec::new();
    for (label, bin) in &builds {
        pairs.push((label.as_str(), Pair::start(sink, bin).await));
    }
    let mut all: Vec<Vec<Round>> = pairs.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (i, (label, pair)) in pairs.iter().enumerate() {
            let x = round(pair, sink, n, size, rate, rate * seconds).await;
            println!(
                "  round {} ({label}): e2e {:.0}/s vs {:.0}/s, one {:.0}/s vs 1/fdatasync {:.0}/s, intake {:.0}/s vs {:.0}/s, drain {:.0}/s, cpu {:.0}+{:.0} ms/1k",
                r + 1,
                x.e2e,
                x.direct_seq,
                x.one,
                x.fsync_rate,
                x.intake,
                x.direct_conc,
                x.drain,
                x.cpu_e2e.0,
                x.cpu_e2e.1
            );
            all[i].push(x);
        }
    }
    for ((label, pair), all) in pairs.iter().zip(&all) {
        println!();
        println!("  {label}:");
        figures(pair, all, rate);
    }
    if let [this, base] = &all[..] {
        let cpu = |rs: &[Round]| median(rs.iter().map(|x| x.cpu_e2e.0 + x.cpu_e2e.1).collect());
        let (now, then) = (cpu(this), cpu(base));
        println!();
        println!(
            "  7. CPU per 1k payloads, 32 submitters, this build vs baseline build: {now:.0} ms vs {then:.0} ms, ratio {:.2} (target <= 0.50: {})",
            now / then,
            verdict(now / then <= 0.5)
        );
    }
    println!();
}

/// Prints the medians of `all`, the rounds of one pair.
fn figures(pair: &Pair, all: &[Round], rate: usize) {
    let idle = pair.idle_rss;
    let m = |f: &dyn Fn(&Round) -> f64| median(all.iter().map(f).collect());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "  {:<46} {:>11} {:>11} {:>6}",
        "figure (medians)", "relay", "baseline", "ratio"
    );
    type Pick = fn(&Round) -> f64;
    let rates: [(&str, Pick, Pick, Option<f64>); 5] = [
        (
            "1. in order, 32 submitters vs sequential POSTs",
            |x| x.e2e,
            |x| x.direct_seq,
            Some(0.8),
        ),
        (
            "2. one submitter vs 1 / fdatasync",
            |x| x.one,
            |x| x.fsync_rate,
            Some(0.8),
        ),
        (
            "   one submitter, the node alone vs 1 / fdatasync",
            |x| x.one_intake,
            |x| x.fsync_rate,
            None,
        ),
        (
            "4. intake, 32 submitters vs 32 concurrent POSTs",
            |x| x.intake,
            |x| x.direct_conc,
            Some(0.5),
        ),
        (
            "   backlog drain vs sequential POSTs",
            |x| x.drain,
            |x| x.direct_seq,
            None,
        ),
    ];
    for (label, relay, base, target) in rates {
        row(label, m(&relay), m(&base), target);
    }
    for (label, pick, target) in [
        (
            "p50",
            (|l: (Duration, Duration)| l.0) as fn((Duration, Duration)) -> Duration,
            0.5,
        ),
        ("p99", |l: (Duration, Duration)| l.1, 2.0),
    ] {
        let relay = m(&|x| ms(pick(x.lat_relay)));
        let base = m(&|x| ms(pick(x.lat_direct)));
        let added = relay - base;
        println!(
            "  {:<46} {relay:>9.2}ms {base:>9.2}ms  added {added:.2} ms (target <= {target} ms: {})",
            format!("3. latency {label} at {rate}/s"),
            verdict(added <= target)
        );
    }
    let (node_k, agent_k) = (m(&|x| x.cpu_e2e.0), m(&|x| x.cpu_e2e.1));
    println!(
        "  7. CPU per 1k payloads, 32 submitters          node {node_k:.0} ms + agent {agent_k:.0} ms = {:.0} ms",
        node_k + agent_k
    );
    let (node_k, agent_k) = (m(&|x| x.cpu_one.0), m(&|x| x.cpu_one.1));
    println!(
        "     CPU per 1k payloads, one submitter          node {node_k:.0} ms + agent {agent_k:.0} ms = {:.0} ms",
        node_k + agent_k
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (flush, flush_cpu) = (m(&|x| ms(x.floor.flush)), m(&|x| us(x.floor.flush_cpu)));
    let (outbox, inbox) = (m(&|x| us(x.floor.outbox)), m(&|x| us(x.floor.inbox)));
    println!(
        "     the store alone: append + flush p50 {flush:.2} ms, {flush_cpu:.0} us CPU each (a plain fdatasync: p50 {:.2} ms, {:.0} us CPU)",
        1e3 / m(&|x| x.fsync_rate),
        m(&|x| us(x.fsync_cpu))
    );
    println!(
        "     the store alone, a backlog: append + remove at an outbox {outbox:.1} us CPU, batch + remove at an inbox {inbox:.1} us ({:.2}x); per payload relayed {:.0} ms per 1k",
        inbox / outbox,
        outbox + inbox
    );
    let (agent_rss, agent_peak) = rss_mib(pair.agent.child.id());
    let (node_rss, node_peak) = rss_mib(pair.node.child.id());
    println!(
        "  5. agent RSS idle with one connection          {idle:.1} MiB (target <= 20: {})",
        verdict(idle <= 20.0)
    );
    println!(
        "     after the run: agent {agent_rss:.1} MiB (peak {agent_peak:.1}), node {node_rss:.1} MiB (peak {node_peak:.1})"
    );
}

/// Agent memory while `queued` payloads wait for a webhook that answers 503, while they drain,
/// and after.
async fn memory(sink: &Sink, bin: &str, label: &str) {
    let queued = env_or("BENCH_QUEUED", 200_000);
    println!("memory ({label}): {queued} payloads of 1 KiB held at the agent (its webhook answers 503), then drained");
    let pair = Pair::start(sink, bin).await;
    let pid = pair.agent.child.id();
    let idle = rss_mib(pid).0;
    sink.set_status(503);
    let c = client();
    let submit = {
        let (c, url) = (c.clone(), pair.intake.clone());
        tokio::spawn(async move { post_concurrently(&c, &url, 0, queued, 1024, 32).await })
    };
    let mut at_100k = None;
    let mut peak_holding = 0f64;
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let (held, at_node) = pair.depths().await;
        let rss = rss_mib(pid).0;
        peak_holding = peak_holding.max(rss);
        if at_100k.is_none() && held >= (queued as u64).min(100_000) {
            at_100k = Some(rss);
        }
        if submit.is_finished() && held >= queued as u64 && at_node == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the agent holds only {held} of {queued}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    submit.await.unwrap();
    let holding = rss_mib(pid).0;
    let before = sink.delivered();
    sink.set_status(200);
    let mut peak_drain = 0f64;
    let t = Instant::now();
    while sink.delivered() < before + queued as u64 {
        peak_drain = peak_drain.max(rss_mib(pid).0);
        assert!(t.elapsed() < Duration::from_secs(1200), "the drain stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = rss_mib(pid).0;
    let drain_rate = queued as f64 / t.elapsed().as_secs_f64();
    // The allocator gives memory back on its own schedule: RSS is read every half second for
    // up to a minute, until it is back to twice the idle figure.
    let settled = Instant::now();
    let back = loop {
        let rss = rss_mib(pid).0;
        if rss <= 2.0 * idle {
            break Ok((settled.elapsed(), rss));
        }
        if settled.elapsed() >= Duration::from_secs(60) {
            break Err(rss);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ok = |v: f64| verdict(v <= 64.0);
    let at_100k = at_100k.unwrap_or(holding);
    let first = queued.min(100_000);
    println!("  {:<46} {idle:>9.1} MiB", "agent RSS idle");
    println!(
        "  {:<46} {at_100k:>9.1} MiB (target <= 64: {})",
        format!("with {first} queued"),
        ok(at_100k)
    );
    println!(
        "  {:<46} {holding:>9.1} MiB (highest while filling {peak_holding:.1})",
        format!("with {queued} queued")
    );
    println!(
        "  {:<46} {peak_drain:>9.1} MiB (target <= 64: {})",
        format!("highest while they drain ({drain_rate:.0}/s)"),
        ok(peak_drain)
    );
    println!("  {:<46} {drained:>9.1} MiB", "right after the drain");
    match back {
        Ok((after, rss)) => println!(
            "  {:<46} {:>9.1} s  ({rss:.1} MiB; target <= 60 s: met)",
            format!("back to <= 2x idle ({:.1} MiB) after", 2.0 * idle),
            after.as_secs_f64()
        ),
        Err(rss) => println!(
            "  {:<46} {rss:>9.1} MiB (target <= {:.1} within 60 s: NOT met)",
            "a minute after the drain",
            2.0 * idle
        ),
    }
    println!();
}

/// A node holding `n` parked long-polls, one connection and one credential per simulated
/// agent.
async fn parked() {
    let n = env_or("BENCH_PARKED", 10_000);
    println!("parked polls: {n} simulated agents, each with its own connection and credential");
    let dir = tempfile::tempdir_in(bench_root()).unwrap();
    let node_dir = dir.path().join("node");
    // All from one address, as agents behind one NAT: room for the handshakes under way.
    let owned = daemon_env(&[
        ("RELAY_NODE__POLL_WAIT", "120s"),
        ("RELAY_NODE__MAX_UNAUTHENTICATED_PER_PEER", "64"),
    ]);
    let env = borrowed(&owned);
    let node = Daemon::start(
        &node_dir,
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        &env,
    )
    .await;
    let idle = rss_mib(node.child.id()).0;
    let t = Instant::now();
    let mut codes = Vec::with_capacity(n);
    let mut each = Vec::with_capacity(n);
    for i in 0..n {
        let one = Instant::now();
        codes.push(initiate(&node_dir, &format!("sim-{i}")).await);
        each.push(one.elapsed().as_secs_f64() * 1000.0);
    }
    println!("  {n} connections initiated in {:.1} s", t.elapsed().as_secs_f64());
    let window = 500.min(n / 2).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&each[..window]), mean(&each[n - window..]));
    println!(
        "  initiate, the last {window} vs the first {window}       {last:.2} ms     {first:.2} ms   {:.2}  (target <= 2.00: {})",
        last / first,
        verdict(last <= 2.0 * first)
    );
    let t = Instant::now();
    let credentials = agents::redeem_all(codes, 8).await;
    println!("  {n} invitations redeemed in {:.1} s", t.elapsed().as_secs_f64());
    let stored = rss_mib(node.child.id()).0;
    println!("  node RSS with {n} connections, before the polls   {stored:.1} MiB");
    let t = Instant::now();
    let polls = agents::park_all(credentials, 16).await;
    println!("  {n} polls parked in {:.1} s", t.elapsed().as_secs_f64());
    let mut peak = 0f64;
    for _ in 0..20 {
        peak = peak.max(rss_mib(node.child.id()).0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let parked_now = polls.iter().filter(|p| !p.is_finished()).count();
    println!(
        "  node RSS with {parked_now} parked polls             {peak:.1} MiB (idle {idle:.1}; target <= 512: {})",
        verdict(peak <= 512.0 && parked_now == n)
    );
    // What the polls hold once the handshakes' garbage is given back: the allocator returns
    // freed pages after about ten seconds. The pace of the measurement, not a wait for an event.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let settled = rss_mib(node.child.id()).0;
    let parked_now = polls.iter().filter(|p| !p.is_finished()).count();
    let per_poll = |rss: f64| (rss - idle) * 1024.0 / n as f64;
    println!(
        "  node memory per parked poll, 15 s later     {:.1} KiB (target <= 32: {}; at the peak {:.1}; {:.1} of it before the polls)",
        per_poll(settled),
        verdict(per_poll(settled) <= 32.0 && parked_now == n),
        per_poll(peak),
        per_poll(stored)
    );
    for p in polls {
        p.abort();
    }
    println!();
}

/// Intake rate of the first and the last 10k of `depth` payloads queued at a node, and the
/// time a restart takes to answer `/healthz`, after a clean stop and after SIGKILL.
async fn depth() {
    let depth = env_or("BENCH_DEPTH", 1_000_000);
    let window = 10_000.min(depth);
    println!("depth: {depth} payloads queued at a node (connection deactivated), 32 submitters");
    let dir = tempfile::tempdir_in(bench_root()).unwrap();
    let node_dir = dir.path().join("node");
    let owned = daemon_env(&[
        ("RELAY_QUEUE__MAX_MESSAGES", "100000000"),
        ("RELAY_QUEUE__MAX_BYTES", "100000000000"),
    ]);
    let env = borrowed(&owned);
    let args = |port: &str| {
        vec![
            "node".to_owned(),
            "run".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--api-listen".into(),
            format!("127.0.0.1:{port}"),
        ]
    };
    let first = args("0");
    let mut node = Daemon::start(&node_dir, &first.iter().map(String::as_str).collect::<Vec<_>>(), &env).await;
    let _code = initiate(&node_dir, CONN).await;
    let intake = format!("{}/v1/connections/{CONN}/messages", node.api());
    let c = client();
    let first = window as f64 / post_concurrently(&c, &intake, 0, window, 1024, 32).await.as_secs_f64();
    let t = Instant::now();
    let middle = depth.saturating_sub(2 * window);
    post_concurrently(&c, &intake, window, middle, 1024, 32).await;
    let last = window as f64
        / post_concurrently(&c, &intake, window + middle, window, 1024, 32)
            .await
            .as_secs_f64();
    println!("  {depth} queued in {:.0} s", t.elapsed().as_secs_f64());
    let ratio = last / first;
    println!(
        "  intake of the last 10k vs the first 10k        {last:>9.0}/s {first:>9.0}/s {ratio:>6.2}  (target >= 0.90: {})",
        verdict(ratio >= 0.9)
    );
    let port = node.info.api.clone().unwrap().rsplit(':').next().unwrap().to_owned();
    // Each restart is a bare process, timed from its spawn: the first after the daemon's clean
    // stop, the second after that process is killed with SIGKILL.
    node.terminate().await;
    let mut restarted: Option<std::process::Child> = None;
    for how in ["a clean stop", "SIGKILL"] {
        if let Some(mut killed) = restarted.take() {
            killed.kill().unwrap();
            killed.wait().unwrap();
        }
        let t = Instant::now();
        let a = args(&port);
        let mut cmd = common::command(&node_dir, &a.iter().map(String::as_str).collect::<Vec<_>>(), &env);
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/healthz");
        let took = loop {
            let req = http::request(Method::GET, &url, &[], Vec::new()).unwrap();
            if let Ok(r) = c.send(req, Duration::from_secs(2), 1024).await {
                if r.status.is_success() {
                    break t.elapsed();
                }
            }
            assert!(t.elapsed() < Duration::from_secs(120), "no /healthz after {how}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!(
            "  restart after {how:<12} answers /healthz in    {:.2} s (target <= 2: {})",
            took.as_secs_f64(),
            verdict(took <= Duration::from_secs(2))
        );
        restarted = Some(child);
    }
    if let Some(mut last) = restarted {
        let _ = last.kill();
        let _ = last.wait();
    }
    println!();
}

/// CPU time of every PostgreSQL server process (the benchmark's throwaway cluster is the only
/// one running).
fn postgres_cpu() -> Duration {
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres" {
            total += cpu(pid);
        }
    }
    total
}

/// The floor of a queue in PostgreSQL: `n` payloads of `size` bytes stored in batches of
/// [`BATCH`] rows by 32 concurrent writers, each batch one committed `INSERT`, then read back
/// with a `SELECT` and removed with a committed `DELETE` — what any durable queue on the
/// database does at least, with nothing of relay around it. Payloads per second.
async fn postgres_floor(url: &str, n: usize, size: usize) -> f64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS floor (w int, seq bigint, body bytea, PRIMARY KEY (w, seq))")
        .await
        .unwrap();
    let writers = 32;
    let per = n / writers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers as i32 {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut done = 0;
            while done < per {
                let k = BATCH.min(per - done).min(32);
                let seqs: Vec<i64> = (done..done + k).map(|s| s as i64).collect();
                let bodies: Vec<Vec<u8>> = (0..k).map(|i| payload(done + i, size)).collect();
                client
                    .execute(
                        "INSERT INTO floor (w, seq, body) SELECT $1, * FROM unnest($2::bigint[], $3::bytea[])",
                        &[&w, &seqs, &bodies],
                    )
                    .await
                    .unwrap();
                let rows = client
                    .query(
                        "SELECT seq, body FROM floor WHERE w = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                        &[&w, &(done as i64 - 1), &(k as i64)],
                    )
                    .await
                    .unwrap();
                assert_eq!(rows.len(), k);
                client
                    .execute(
                        "DELETE FROM floor WHERE w = $1 AND seq <= $2",
                        &[&w, &((done + k) as i64)],
                    )
                    .await
                    .unwrap();
                done += k;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (per * writers) as f64 / started.elapsed().as_secs_f64()
}

/// The node on PostgreSQL beside the node on sled, in the same rounds: in order at 32
/// submitters, one submitter, intake alone; the database's floor; and intake through two
/// replicas against one, with PostgreSQL's share of the CPU.
async fn postgres(sink: &Sink) {
    let Some(cluster) = common::postgres::Cluster::start("postgres phase") else {
        return;
    };
    let (n, rounds, size) = (env_or("BENCH_MESSAGES", 20_000), env_or("BENCH_ROUNDS", 3), 1024);
    let url = cluster.database("relay").await;
    let node_env = vec![
        ("RELAY_STORE__KIND".to_owned(), "postgres".to_owned()),
        ("RELAY_STORE__URL".to_owned(), url.clone()),
    ];
    let scratch = tempfile::tempdir_in(bench_root()).unwrap();
    let out = common::cli(scratch.path(), &["node", "migrate"], &borrowed(&node_env), None).await;
    assert!(out.status.success(), "migrate: {}", common::stderr(&out));
    println!("postgres: {rounds} rounds of {n} payloads of {size} bytes, the node on sled and on PostgreSQL (on this machine, fsync on) interleaved");
    let sled = Pair::start(sink, common::bin()).await;
    let pg = Pair::start_with(sink, common::bin(), &node_env).await;
    let floor_db = cluster.database("floor").await;
    let c = client();
    let (mut rows, mut floors): (Vec<[f64; 6]>, Vec<f64>) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let mut x = [0.0; 6];
        for (i, pair) in [&sled, &pg].into_iter().enumerate() {
            let before = sink.delivered();
            let t = Instant::now();
            let submit = {
                let (c, url) = (c.clone(), pair.intake.clone());
                tokio::spawn(async move { post_concurrently(&c, &url, 0, n, size, 32).await })
            };
            sink.wait_for(before + n as u64, "end to end").await;
            x[i] = n as f64 / t.elapsed().as_secs_f64();
            submit.await.unwrap();
            let one_n = (n / 10).max(1);
            let before = sink.delivered();
            let t = Instant::now();
            for k in 0..one_n {
                post(&c, &pair.intake, payload(k, size)).await;
            }
            sink.wait_for(before + one_n as u64, "one submitter").await;
            x[2 + i] = one_n as f64 / t.elapsed().as_secs_f64();
            pair.set_state(Action::Deactivate).await;
            x[4 + i] = n as f64 / post_concurrently(&c, &pair.intake, 0, n, size, 32).await.as_secs_f64();
            let before = sink.delivered();
            pair.set_state(Action::Activate).await;
            sink.wait_for(before + n as u64, "the backlog").await;
        }
        let floor = postgres_floor(&floor_db, n, size).await;
        println!(
            "  round {}: in order, 32 submitters {:.0}/s on sled vs {:.0}/s on PostgreSQL; one submitter {:.0}/s vs {:.0}/s; intake {:.0}/s vs {:.0}/s; the database's floor {floor:.0}/s",
            r + 1,
            x[0],
            x[1],
            x[2],
            x[3],
            x[4],
            x[5]
        );
        rows.push(x);
        floors.push(floor);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let floor = median(floors);
    println!();
    println!("  figure (medians)                                       postgres    baseline  ratio");
    row("in order, 32 submitters vs the node on sled", col(1), col(0), Some(1.0));
    row(
        "in order, 32 submitters vs the database's floor",
        col(1),
        floor,
        Some(0.8),
    );
    row("one submitter vs the node on sled", col(3), col(2), None);
    row("intake, 32 submitters vs the node on sled", col(5), col(4), None);

    // Two replicas against one: intake alone on one connection per replica's share of the
    // submitters, a second replica serving the same key.
    let key_dir = pg.node.data_dir.join("tls");
    let dir = tempfile::tempdir_in(bench_root()).unwrap();
    let (cert, key) = (
        key_dir.join("node.crt").display().to_string(),
        key_dir.join("node.key").display().to_string(),
    );
    let args = [
        "node",
        "run",
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let mut env = daemon_env(&[]);
    env.extend(node_env.iter().cloned());
    let second = Daemon::start(dir.path(), &args, &borrowed(&env)).await;
    let other_intake = format!("{}/v1/connections/{CONN}/messages", second.api());
    pg.set_state(Action::Deactivate).await;
    let (mut one, mut two, mut share) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        one.push(n as f64 / post_concurrently(&c, &pg.intake, 0, n, size, 32).await.as_secs_f64());
        let (cpu0, t) = (postgres_cpu(), Instant::now());
        let half = |url: String| {
            let c = c.clone();
            tokio::spawn(async move { post_concurrently(&c, &url, 0, n / 2, size, 16).await })
        };
        let (a, b) = (half(pg.intake.clone()), half(other_intake.clone()));
        a.await.unwrap();
        b.await.unwrap();
        let wall = t.elapsed();
        two.push((n / 2 * 2) as f64 / wall.as_secs_f64());
        share.push((postgres_cpu() - cpu0).as_secs_f64() / wall.as_secs_f64() / 2.0);
    }
    row(
        "intake, two replicas vs one (one connection)",
        median(two.clone()),
        median(one.clone()),
        None,
    );
    println!(
        "     PostgreSQL's share of the machine's 2 cores during the two-replica intake: {:.0} %",
        median(share) * 100.0
    );
    pg.set_state(Action::Activate).await;
    drop(second);
    println!();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let phases = std::env::var("BENCH_PHASES").unwrap_or_else(|_| "throughput,memory".into());
    let all = phases.split(',').any(|p| p.trim() == "all");
    let wants = |p: &str| all || phases.split(',').any(|x| x.trim() == p);
    println!("relay transport benchmark: node and agent are release processes; loopback, fsync on, 1 KiB payloads");
    let env: Vec<String> = daemon_env(&[]).iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("daemon environment: {}", env.join(" "));
    let sink = Sink::start().await;
    if wants("throughput") {
        throughput(&sink).await;
    }
    if wants("memory") {
        memory(&sink, common::bin(), "this build").await;
        if let Ok(other) = std::env::var("BENCH_BASELINE_BIN") {
            memory(&sink, &other, &format!("baseline build {other}")).await;
        }
    }
    if wants("parked") {
        parked().await;
    }
    if wants("postgres") {
        postgres(&sink).await;
    }
    if wants("depth") {
        depth().await;
    }
    let disorder = sink.out_of_order();
    assert_eq!(disorder, 0, "{disorder} deliveries came out of order");
    println!("every delivery arrived in order (Relay-Seq increasing per connection)");
}
