//! Attackers on the public listener: connections that finish the TLS handshake and send
//! nothing, h2 connections that answer pings but never open a stream, redeem bodies trickled
//! a byte at a time, and keep-alive connections left idle after one request. Each is cut by
//! its deadline, one address cannot hold more than its share, and a real agent keeps
//! accepting and flowing while such idlers hold every unauthenticated slot.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, connect, in_process, post, DEADLINE};
use relay::sink::Sink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

/// The kinds of idler an attacker holds a slot with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idler {
    /// Completes the TLS handshake, then sends nothing.
    Tls,
    /// Speaks h2 (preface, settings, ping answers) but never opens a stream.
    H2,
    /// Starts a 16 000-byte redeem body and sends one byte per second.
    Trickle,
    /// One request over HTTP/1.1 keep-alive, then nothing.
    KeepAlive,
}

const KINDS: [Idler; 4] = [Idler::Tls, Idler::H2, Idler::Trickle, Idler::KeepAlive];

/// How one attacker connection ended.
#[derive(Debug)]
enum Outcome {
    /// The node refused it before or during the handshake.
    Refused,
    /// The node closed it after it had held a slot this long.
    Held(Duration),
    /// Still open when the attacker gave up.
    StillOpen,
}

/// Settings of a node with small budgets and short deadlines, so the attacks play out in
/// seconds.
fn hardened(dir: &std::path::Path) -> relay::config::Settings {
    let mut s = in_process(dir);
    s.node.max_connections = 4;
    s.node.max_unauthenticated_connections = 8;
    s.node.max_unauthenticated_per_peer = 2;
    s.node.unauthenticated_idle_timeout = Duration::from_secs(2);
    s.node.unauthenticated_body_timeout = Duration::from_secs(2);
    s
}

async fn tls_from(
    node: SocketAddr,
    from: Ipv4Addr,
    pin: [u8; 32],
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let tcp = socket.connect(node).await?;
    let mut config = relay::tls::node_client_config(Some(pin), relay::config::TrustMode::Pin, None)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Reads until the node closes the stream; answers h2 settings and pings when `h2`.
async fn until_closed(tls: &mut TlsStream<TcpStream>, h2: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    if !h2 {
        while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    }
    loop {
        let mut head = [0u8; 9];
        if tls.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        if tls.read_exact(&mut payload).await.is_err() {
            return;
        }
        let answer: Option<Vec<u8>> = match (kind, flags & 1) {
            // SETTINGS without ACK: acknowledge.
            (4, 0) => Some(vec![0, 0, 0, 4, 1, 0, 0, 0, 0]),
            // PING without ACK: echo it back acknowledged.
            (6, 0) => {
                let mut f = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                f.extend_from_slice(&payload);
                Some(f)
            }
            _ => None,
        };
        if let Some(frame) = answer {
            if tls.write_all(&frame).await.is_err() {
                return;
            }
        }
    }
}

/// Opens one attacker connection of `kind` from `from` and holds it until the node closes
/// it or `give_up` passes. `held` counts connections holding a slot right now.
async fn attack(
    kind: Idler,
    node: SocketAddr,
    from: Ipv4Addr,
    pin: [u8; 32],
    held: &AtomicUsize,
    give_up: Duration,
) -> Outcome {
    let alpn: &[u8] = if kind == Idler::H2 { b"h2" } else { b"http/1.1" };
    let Ok(mut tls) = tls_from(node, from, pin, alpn).await else {
        return Outcome::Refused;
    };
    match kind {
        Idler::Tls => {}
        Idler::H2 => {
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            if tls.write_all(&hello).await.is_err() {
                return Outcome::Refused;
            }
        }
        Idler::Trickle => {
            let head = "POST /v1/redeem HTTP/1.1\r\nhost: node\r\ncontent-type: application/x-relay-bincode\r\ncontent-length: 16000\r\n\r\n";
            if tls.write_all(head.as_bytes()).await.is_err() {
                return Outcome::Refused;
            }
        }
        Idler::KeepAlive => {
            if tls
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: node\r\n\r\n")
                .await
                .is_err()
            {
                return Outcome::Refused;
            }
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"ok\n") {
                match tls.read(&mut buf).await {
                    Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                    _ => return Outcome::Refused,
                }
            }
        }
    }
    held.fetch_add(1, Ordering::SeqCst);
    let since = Instant::now();
    let hold = async {
        if kind == Idler::Trickle {
            // The attack itself: one byte a second, while watching for the node to hang up.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let (mut rd, mut wr) = tokio::io::split(&mut tls);
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    _ = tick.tick() => if wr.write_all(b"x").await.is_err() { return },
                    r = rd.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
                }
            }
        } else {
            until_closed(&mut tls, kind == Idler::H2).await
        }
    };
    let outcome = match tokio::time::timeout(give_up, hold).await {
        Ok(()) => Outcome::Held(since.elapsed()),
        Err(_) => Outcome::StillOpen,
    };
    held.fetch_sub(1, Ordering::SeqCst);
    outcome
}

fn attacker_address(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_idler_is_cut_by_its_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let node = relay::daemon::start_node(hardened(&tmp.path().join("node")), token.clone())
        .await
        .unwrap();
    let addr: SocketAddr = node.info.listen.clone().unwrap().parse().unwrap();
    let pin = node.side.pin();
    let held = Arc::new(AtomicUsize::new(0));
    let give_up = Duration::from_secs(20);
    let mut tasks = Vec::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let held = held.clone();
        tasks.push(tokio::spawn(async move {
            (
                kind,
                attack(kind, addr, attacker_address(i as u8), pin, &held, give_up).await,
            )
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        let (kind, outcome) = task.await.unwrap();
        eprintln!("{kind:?}: {outcome:?}");
        outcomes.push((kind, outcome));
    }
    for (kind, outcome) in outcomes {
        match outcome {
            // Cut by the 2 s idle or body deadline (plus the close), well before giving up.
            Outcome::Held(d) => assert!(
                d >= Duration::from_millis(1500) && d < Duration::from_secs(8),
                "{kind:?} held {d:?}"
            ),
            other => panic!("{kind:?}: {other:?}"),
        }
    }

    // One address holds at most its share of the unauthenticated budget: its third
    // connection is refused at once while two are held.
    let from = attacker_address(0);
    let mut kept = Vec::new();
    for _ in 0..2 {
        kept.push(
            tls_from(addr, from, pin, b"http/1.1")
                .await
                .expect("within the per-peer cap"),
        );
    }
    let third = tokio::time::timeout(DEADLINE, tls_from(addr, from, pin, b"http/1.1")).await;
    assert!(
        matches!(third, Ok(Err(_))),
        "a third connection from one address is refused"
    );
    // Another address still gets in.
    tls_from(addr, attacker_address(1), pin, b"http/1.1")
        .await
        .expect("another address is admitted");
    drop(kept);
    token.cancel();
    node.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_keeps_flowing_while_idlers_hold_every_unauthenticated_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let mut to_app = Sink::start().await.unwrap();
    let mut node_settings = hardened(&tmp.path().join("node"));
    node_settings.node.deliver_to = Some(to_app.url.clone());
    let node = relay::daemon::start_node(node_settings, token.clone()).await.unwrap();
    let addr: SocketAddr = node.info.listen.clone().unwrap().parse().unwrap();
    let pin = node.side.pin();

    // Four attacker addresses, one kind of idler each, three connections each: two fill the
    // address's share, the third keeps knocking. Together they hold all 8 unauthenticated
    // slots, and reconnect whenever one is cut.
    let attackers = CancellationToken::new();
    let held = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    for (i, kind) in KINDS.into_iter().enumerate() {
        for _ in 0..3 {
            let (held, refused, cut, stop) = (held.clone(), refused.clone(), cut.clone(), attackers.clone());
            tokio::spawn(async move {
                // A knock every 20 ms at most: an attacker's pace, not a wait for anything.
                let mut pace = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = pace.tick() => {}
                    }
                    let one = attack(kind, addr, attacker_address(i as u8), pin, &held, DEADLINE);
                    let outcome = tokio::select! {
                        _ = stop.cancelled() => return,
                        o = one => o,
                    };
                    match outcome {
                        Outcome::Refused => refused.fetch_add(1, Ordering::SeqCst),
                        _ => cut.fetch_add(1, Ordering::SeqCst),
                    };
                }
            });
        }
    }
    common::wait_for("the idlers to hold every unauthenticated slot", || async {
        (held.load(Ordering::SeqCst) >= 8).then_some(())
    })
    .await;

    // The agent accepts (a redeem through the crowded listener) and traffic flows both ways.
    let started = Instant::now();
    let agent = relay::daemon::start_agent(in_process(&tmp.path().join("agent")), token.clone())
        .await
        .unwrap();
    let mut to_agent = Sink::start().await.unwrap();
    tokio::time::timeout(DEADLINE, connect(&node.side, &agent.side, &to_agent.url))
        .await
        .expect("the agent accepts its invitation while the idlers hold the listener");
    let accepted = started.elapsed();
    let http = client();
    let api = format!("http://{}", node.info.api.clone().unwrap());
    let intake = format!("http://{}", agent.info.api.clone().unwrap());
    // Round trips both ways for three of the idlers' cycles: the agent's connections are
    // never cut or shed while idlers come and go around them.
    let cut_before = cut.load(Ordering::SeqCst);
    let flowing = Instant::now();
    let (mut rounds, mut slowest) = (0, Duration::ZERO);
    while flowing.elapsed() < Duration::from_secs(6) {
        let round = Instant::now();
        let down = format!("down{rounds}").into_bytes();
        assert_eq!(post(&http, &api, "c", down.clone(), &[]).await.unwrap().0, 202);
        let up = format!("up{rounds}").into_bytes();
        assert_eq!(post(&http, &intake, "c", up.clone(), &[]).await.unwrap().0, 202);
        assert_eq!(to_agent.next(DEADLINE).await.expect("node → agent flows").body, down);
        assert_eq!(to_app.next(DEADLINE).await.expect("agent → node flows").body, up);
        slowest = slowest.max(round.elapsed());
        rounds += 1;
    }
    let cut_during = cut.load(Ordering::SeqCst) - cut_before;
    eprintln!(
        "accepted after {accepted:?}; then {rounds} round trips in 6 s, slowest {slowest:?}; meanwhile {cut_during} attacker connections cut, {} refused in all, {} holding at the end",
        refused.load(Ordering::SeqCst),
        held.load(Ordering::SeqCst)
    );
    assert!(cut_during >= 8, "the idlers kept coming back while the agent flowed");
    assert!(
        held.load(Ordering::SeqCst) >= 4,
        "the attack was still on while the agent flowed"
    );
    attackers.cancel();
    token.cancel();
    node.task.await.unwrap().unwrap();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_redeems_leaves_a_few_short_log_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let node = common::start_node(&tmp.path().join("node"), None).await;
    let code = common::initiate(&node.data_dir, "conn", "http://127.0.0.1:9/hook", &[]).await;
    let invitation = relay::invite::Invitation::decode(&code).unwrap();
    let tls = relay::tls::node_client_config(invitation.pin, relay::config::TrustMode::Pin, None).unwrap();
    let http = relay::http::Client::https_only(tls, Duration::from_secs(10), &relay::http::ProxyConfig::Direct);
    let flood = relay::protocol::RedeemRequest {
        version: relay::protocol::PROTOCOL_VERSION,
        invitation_id: "\u{1b}[2J".repeat(3000),
        secret: vec![0; 32],
        client_nonce: "n".into(),
        instance_name: "x".into(),
        host: "x".into(),
    };
    let body = relay::protocol::encode(&flood).unwrap();
    let url = format!("{}{}", invitation.url, relay::protocol::REDEEM_PATH);
    for _ in 0..40 {
        let req = relay::http::request(
            relay::http::Method::POST,
            &url,
            &[("content-type", relay::protocol::CONTENT_TYPE)],
            body.clone(),
        )
        .unwrap();
        let reply = http.send(req, DEADLINE, 64 * 1024).await.unwrap();
        assert_eq!(reply.status.as_u16(), 400);
    }
    // Every refusal was logged (or not) before its answer went out.
    let log = node.log();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("redeem refused")).collect();
    assert_eq!(refusals.len(), 10, "at most 10 refusals a minute in the log");
    for line in &refusals {
        assert!(line.len() < 400, "a bounded line: {line}");
        assert!(!line.contains('\u{1b}'), "escaped: {line}");
        assert!(line.contains("(12000 bytes)"), "says the length: {line}");
    }
}
