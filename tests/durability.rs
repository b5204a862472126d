//! No acknowledgement before the disk has it: node and agent run under `strace`, which records
//! every write to their data directories, every `fdatasync`/`fsync`, and every write to the
//! sockets of the test's clients. For each payload answered `202` (node API, agent intake) or
//! acknowledged in a push answer (node), the trace must show, in this order: the write that put
//! the payload in a store file, a sync of that file (and of its directory, when the file was
//! created meanwhile), and only then the first byte of the answer on that client's connection.
//!
//! `sync_file_range`, which sled uses on its own, does not count as a sync: it neither flushes
//! the drive's write cache nor the file's size. Each client connection carries one payload and
//! stays open until the daemons stop, so every write on it after the payload's write is (or
//! follows) that payload's answer. Requires `strace` (Debian's package); without it the test
//! says SKIPPED, and with `REQUIRE_STRACE=1` (set by `.ci/run`) it fails instead.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use relay::protocol::{self, PushRequest, PushResponse, WireMessage};
use relay::sink::Sink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUIRE: &str = "REQUIRE_STRACE";
/// Payloads posted to each local API.
const POSTS: usize = 60;
/// Clients posting at once: enough that group commits take several payloads.
const CONCURRENCY: usize = 12;
/// Pushes to the node, each on its own TLS connection, of [`PUSH_BATCH`] messages.
const PUSHES: usize = 20;
const PUSH_BATCH: usize = 3;
/// Over sled's blob threshold (about 128 KiB per page): stored in a file of its own.
const LARGE: usize = 300 * 1024;

/// Whether strace can trace here (installed, and ptrace allowed).
fn strace_usable(test: &str) -> bool {
    let works = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return true;
    }
    skip_unless_required(
        test,
        REQUIRE,
        "strace is not installed or cannot trace here (apt-get install strace)",
    );
    false
}

fn strace_args(trace: &Path) -> Vec<String> {
    [
        "strace",
        "-f",
        "-qq",
        "-ttt",
        "-T",
        "-yy",
        // Whole write buffers: a payload's marker may sit anywhere in a log segment.
        "-s",
        "4194304",
        "-e",
        "trace=pwrite64,pwritev,pwritev2,write,writev,sendto,sendmsg,fdatasync,fsync,sync_file_range,openat",
        "-o",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([trace.display().to_string(), "--".to_owned()])
    .collect()
}

async fn start_traced(data_dir: &Path, trace: &Path, args: &[&str]) -> Daemon {
    let wrapper = strace_args(trace);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let cmd = wrapped_command(&wrapper, data_dir, args, &[]);
    Daemon::start_wrapped(cmd, data_dir, log_path(data_dir)).await
}

/// A payload of `len` bytes that names itself: `MARK-{tag}-{i:05}-END` then filler.
fn payload(tag: &str, i: usize, len: usize) -> (String, Vec<u8>) {
    let marker = format!("MARK-{tag}-{i:05}-END");
    let mut body = marker.clone().into_bytes();
    body.resize(len.max(body.len()), b'.');
    (marker, body)
}

/// One POST on a fresh connection; the status, and the connection, kept open so the daemon
/// writes nothing more on it.
async fn post_once(api: &str, conn: &str, body: &[u8]) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(api).await.unwrap();
    let head = format!(
        "POST /v1/connections/{conn}/messages HTTP/1.1\r\nHost: {api}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed before the answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some(end) = text.find("\r\n\r\n") else { continue };
        let len = text[..end]
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        if got.len() >= end + 4 + len {
            let status = text[9..12].parse().unwrap();
            return (status, s);
        }
    }
}

/// What one client saw: its marker and its connection, as strace names the daemon's end of it
/// (`[SERVER->CLIENT]`). Both ends count: the kernel gives the same local port to connections
/// to different servers, such as an agent's connection to the node.
#[derive(Debug, Clone)]
struct Answered {
    marker: String,
    connection: String,
}

/// `[SERVER->CLIENT]` for a client's connection.
fn connection_of(stream: &TcpStream) -> String {
    format!("[{}->{}]", stream.peer_addr().unwrap(), stream.local_addr().unwrap())
}

/// Posts `count` payloads tagged `tag` (the first one [`LARGE`]) from [`CONCURRENCY`] clients;
/// every one must be answered 202. Returns them with the open connections.
async fn post_all(api: String, tag: &'static str, count: usize) -> (Vec<Answered>, Vec<TcpStream>) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (api, next) = (api.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return done;
                }
                let (marker, body) = payload(tag, i, if i == 0 { LARGE } else { 1024 });
                let (status, stream) = post_once(&api, "c1", &body).await;
                assert_eq!(status, 202, "{marker}");
                let connection = connection_of(&stream);
                done.push((Answered { marker, connection }, stream));
            }
        }));
    }
    let mut out = (Vec::new(), Vec::new());
    for t in tasks {
        for (a, s) in t.await.unwrap() {
            out.0.push(a);
            out.1.push(s);
        }
    }
    (out.0, out.1)
}

/// Pushes batches to the node as an agent would, one TLS connection each: a `GET /healthz`
/// first (so the handshake's last flight is over), then the push, then the connection stays
/// open. Returns what was acknowledged and the connections' keep-alive handles.
async fn push_all(
    listen: &str,
    pin: [u8; 32],
    credential: &str,
) -> (Vec<Answered>, Vec<Box<dyn std::any::Any + Send>>) {
    use http_body_util::{BodyExt, Full};
    let config = relay::tls::node_client_config(Some(pin), relay::config::TrustMode::Pin, None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut answered = Vec::new();
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let mut seq = 0u64;
    for p in 0..PUSHES {
        let tcp = TcpStream::connect(listen).await.unwrap();
        let connection = connection_of(&tcp);
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let health = hyper::Request::get("/healthz")
            .header("host", listen)
            .body(Full::default())
            .unwrap();
        send.ready().await.unwrap();
        let reply = send.send_request(health).await.unwrap();
        assert_eq!(reply.status(), 200);
        reply.into_body().collect().await.unwrap();

        let mut messages = Vec::new();
        for _ in 0..PUSH_BATCH {
            seq += 1;
            let (marker, body) = payload("P", seq as usize, 1024);
            messages.push(WireMessage {
                seq,
                id: format!("push-{seq}"),
                content_type: "text/plain".into(),
                enqueued_at_ms: 1,
                body,
            });
            answered.push(Answered {
                marker,
                connection: connection.clone(),
            });
        }
        let body = protocol::encode(&PushRequest {
            version: protocol::PROTOCOL_VERSION,
            messages,
        })
        .unwrap();
        let push = hyper::Request::post(protocol::PUSH_PATH)
            .header("host", listen)
            .header("content-type", protocol::CONTENT_TYPE)
            .header(protocol::VERSION_HEADER, "1")
            .header("authorization", format!("Bearer {credential}"))
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        send.ready().await.unwrap();
        let reply = send.send_request(push).await.unwrap();
        assert_eq!(reply.status(), 200, "push {p}");
        let bytes = reply.into_body().collect().await.unwrap().to_bytes();
        let ack: PushResponse = protocol::decode("push response", &bytes).unwrap();
        assert_eq!(ack.high_water, seq, "push {p} acknowledged everything it carried");
        keep.push(Box::new((send, driver)));
    }
    (answered, keep)
}

/// One system call as strace recorded it (microseconds).
#[derive(Debug, Clone)]
struct Call {
    name: String,
    start: u64,
    end: u64,
    /// What the first argument's descriptor names (`-yy`): a path, or `TCP:[a->b]`.
    fd: String,
    args: String,
    /// The descriptor returned, for `openat`.
    opened: Option<String>,
}

/// `SECONDS.FRACTION` in microseconds.
fn micros(ts: &str) -> Option<u64> {
    let (s, frac) = ts.split_once('.').unwrap_or((ts, "0"));
    let frac = format!("{frac:0<6}");
    Some(s.parse::<u64>().ok()? * 1_000_000 + frac.get(..6)?.parse::<u64>().ok()?)
}

/// The `<…>` after the descriptor at the start of `text`: socket descriptions hold `->`.
fn described(text: &str) -> Option<(String, usize)> {
    let open = text.find('<')?;
    if !text[..open].chars().all(|c| c.is_ascii_digit()) || open == 0 {
        return None;
    }
    let rest = &text[open + 1..];
    let close = if rest.starts_with("TCP:[") || rest.starts_with("TCPv6:[") {
        rest.find("]>")? + 1
    } else {
        rest.find('>')?
    };
    Some((rest[..close].to_owned(), open + 1 + close + 1))
}

/// Parses an `strace -f -ttt -T -yy` log into completed calls, in start order.
fn parse_trace(path: &Path) -> Vec<Call> {
    let text = std::fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&text);
    let mut pending: HashMap<(String, String), (u64, String)> = HashMap::new();
    let mut calls = Vec::new();
    let finish = |name: String, start: u64, args: String, tail: &str, calls: &mut Vec<Call>| {
        // `) = RET <DURATION>` (or `= -1 EAGAIN … <…>`).
        let Some(eq) = tail.rfind(" = ") else { return };
        let ret = &tail[eq + 3..];
        let Some(lt) = ret.rfind('<') else { return };
        let Some(duration) = micros(ret[lt + 1..].trim_end().trim_end_matches('>')) else {
            return;
        };
        if ret.starts_with('-') {
            return;
        }
        let fd = described(&args).map(|(d, _)| d).unwrap_or_default();
        let opened = described(ret[..lt].trim()).map(|(d, _)| d);
        calls.push(Call {
            name,
            start,
            end: start + duration,
            fd,
            args,
            opened,
        });
    };
    for line in text.lines() {
        // `PID TIMESTAMP CALL…`; strace pads the pid to a fixed width.
        let Some((pid, after)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((ts, rest)) = after.trim_start().split_once(' ') else {
            continue;
        };
        let Some(ts) = micros(ts) else { continue };
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            if let Some((start, args)) = pending.remove(&(pid.to_owned(), name.to_owned())) {
                finish(name.to_owned(), start, args, tail, &mut calls);
            }
            continue;
        }
        let Some(paren) = rest.find('(') else { continue };
        let name = rest[..paren].to_owned();
        let body = &rest[paren + 1..];
        if let Some(args) = body.strip_suffix(" <unfinished ...>") {
            pending.insert((pid.to_owned(), name), (ts, args.to_owned()));
        } else if let Some(close) = body.rfind(") = ") {
            finish(name, ts, body[..close].to_owned(), &body[close..], &mut calls);
        }
    }
    calls.sort_by_key(|c| c.start);
    calls
}

const FILE_WRITES: &[&str] = &["pwrite64", "pwritev", "pwritev2", "write", "writev"];
const SOCKET_WRITES: &[&str] = &["write", "writev", "sendto", "sendmsg"];
const SYNCS: &[&str] = &["fdatasync", "fsync"];

/// Checks, for every answered payload, write → sync → answer in `calls`; returns how many
/// syncs of each file were made, for the figures printed.
fn check_order(side: &str, calls: &[Call], data_dir: &Path, answered: &[Answered]) -> usize {
    let prefix = format!("{}/", data_dir.display());
    let in_store = |c: &Call| c.fd.starts_with(&prefix);
    let mut failures = Vec::new();
    for a in answered {
        let writes: Vec<&Call> = calls
            .iter()
            .filter(|c| FILE_WRITES.contains(&c.name.as_str()) && in_store(c) && c.args.contains(&a.marker))
            .collect();
        let Some(first) = writes.first() else {
            failures.push(format!("{}: never written to a file under {prefix}", a.marker));
            continue;
        };
        let peer = &a.connection;
        let Some(answer) = calls.iter().find(|c| {
            SOCKET_WRITES.contains(&c.name.as_str()) && c.fd.ends_with(peer.as_str()) && c.start >= first.end
        }) else {
            failures.push(format!(
                "{}: answered before it was written to {} (no write on the client's connection after it)",
                a.marker, first.fd
            ));
            continue;
        };
        let synced = |path: &str, after: u64| {
            calls
                .iter()
                .any(|c| SYNCS.contains(&c.name.as_str()) && c.fd == path && c.start >= after && c.end <= answer.start)
        };
        // sled may hold a payload in several files before the answer (the log's entry, and a
        // page rewritten into a blob file): at least one copy must be on disk.
        let Some(write) = writes
            .iter()
            .take_while(|w| w.end <= answer.start)
            .find(|w| synced(&w.fd, w.end))
        else {
            // What the trace holds around it, to tell a missing sync from a misread trace.
            let around: Vec<String> = calls
                .iter()
                .filter(|c| c.start + 50_000 >= first.start && c.start <= answer.start + 50_000)
                .filter(|c| {
                    (SYNCS.contains(&c.name.as_str()) || c.name == "sync_file_range") && in_store(c)
                        || writes.iter().any(|w| std::ptr::eq(*w, *c))
                })
                .map(|c| format!("  {} {} {}..{} µs", c.name, c.fd, c.start, c.end))
                .collect();
            failures.push(format!(
                "{}: answered at {} µs without an fdatasync/fsync of {} after its write at {} µs; its writes and the store's syncs around:\n{}",
                a.marker,
                answer.start,
                first.fd,
                first.end,
                around.join("\n")
            ));
            continue;
        };
        // A file created for it (a blob) needs its directory entry on disk too.
        if let Some(created) = calls.iter().find(|c| {
            c.name == "openat" && c.args.contains("O_CREAT") && c.opened.as_deref() == Some(write.fd.as_str())
        }) {
            let dir = Path::new(&write.fd).parent().unwrap().display().to_string();
            if !synced(&dir, created.end) {
                failures.push(format!(
                    "{}: answered without an fsync of {dir} after {} was created in it",
                    a.marker, write.fd
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{side}: of {} acknowledgements, some left before their payload was durable:\n{}",
        answered.len(),
        failures.join("\n")
    );
    calls
        .iter()
        .filter(|c| c.name == "fdatasync" && c.fd == format!("{prefix}db/db"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_answer_leaves_before_a_sync_of_what_it_acknowledges() {
    if !strace_usable("durability") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir, spare_dir) = (
        tmp.path().join("node"),
        tmp.path().join("agent"),
        tmp.path().join("spare"),
    );
    let (node_trace, agent_trace) = (tmp.path().join("node.trace"), tmp.path().join("agent.trace"));
    let public_app = Sink::start().await.unwrap();
    let private_app = Sink::start().await.unwrap();
    let (public_url, private_url) = (public_app.url.clone(), private_app.url.clone());
    let _seen = (collect(public_app), collect(private_app));

    let mut node = start_traced(
        &node_dir,
        &node_trace,
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
    )
    .await;
    let code = initiate(&node_dir, "c1", &public_url, &[]).await;
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &private_url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    // A second connection, accepted into a directory no agent runs from: the test pushes on it.
    let spare_code = initiate(&node_dir, "c2", &public_url, &[]).await;
    let o = cli(
        &spare_dir,
        &["accept", &spare_code, "--deliver-to", &private_url],
        &[],
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let credential = std::fs::read_to_string(spare_dir.join("credentials").join("c2.cred")).unwrap();
    let pin = relay::invite::Invitation::decode(&spare_code).unwrap().pin.unwrap();
    let mut agent = start_traced(&agent_dir, &agent_trace, &["run", "--intake-listen", "127.0.0.1:0"]).await;

    let listen: SocketAddr = node.info.listen.clone().unwrap().parse().unwrap();
    let listen = listen.to_string();
    let ((down, _down_conns), (up, _up_conns), (pushed, _push_conns)) = tokio::join!(
        post_all(node.info.api.clone().unwrap(), "N", POSTS),
        post_all(agent.info.api.clone().unwrap(), "A", POSTS),
        push_all(&listen, pin, credential.trim()),
    );
    let metrics = |api: String| async move {
        let (_, text) = get(&api, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix("relay_store_syncs_total ")?.trim().parse::<u64>().ok())
            .expect("relay_store_syncs_total in /metrics")
    };
    let (node_syncs, agent_syncs) = (metrics(node.api()).await, metrics(agent.api()).await);

    // Stop both (their connections from this test still open), and let strace finish its log.
    for d in [&mut node, &mut agent] {
        assert!(Command::new("kill")
            .args(["-TERM", &d.info.pid.to_string()])
            .status()
            .unwrap()
            .success());
        d.wait_exit().await;
    }

    let node_calls = parse_trace(&node_trace);
    let agent_calls = parse_trace(&agent_trace);
    let mut node_answers = down.clone();
    node_answers.extend(pushed.iter().cloned());
    let node_log_syncs = check_order("node", &node_calls, &node_dir, &node_answers);
    let agent_log_syncs = check_order("agent", &agent_calls, &agent_dir, &up);
    for (side, answers, log_syncs, metric) in [
        ("node", node_answers.len(), node_log_syncs, node_syncs),
        ("agent", up.len(), agent_log_syncs, agent_syncs),
    ] {
        println!(
            "{side}: {answers} acknowledgements, each after an fdatasync of its file; {log_syncs} fdatasyncs of the log in the trace, relay_store_syncs_total {metric}"
        );
        assert!(metric > 0 && log_syncs > 0, "{side}: the store's syncs are counted");
    }
}
