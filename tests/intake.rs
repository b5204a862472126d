//! The local API's refusals, each a JSON error: unknown connection 404, oversized 413, full
//! queue 429 (count) or 507 (bytes), a repeated idempotency key queued once, bearer tokens.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{client, get, post};
use relay::config::{Secret, Settings};
use relay::node::InitiateRequest;
use tokio_util::sync::CancellationToken;

fn settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.to_owned(),
        ..Settings::default()
    };
    s.node.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.node.api_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.queue.max_payload_bytes = 1024;
    s.queue.max_messages = 4;
    s.queue.max_bytes = 2048;
    s
}

async fn initiate(node: &relay::node::Node, name: &str) {
    node.initiate(InitiateRequest {
        name: name.into(),
        local_name: "public".into(),
        remote_name: "private".into(),
        description: String::new(),
        mode: "script".into(),
        project: "P".into(),
        expires: Some(Duration::from_secs(3600)),
        deliver_to: None,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_specific_json_errors_and_nothing_accepted_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let node = relay::daemon::start_node(settings(tmp.path()), token.clone())
        .await
        .unwrap();
    initiate(&node.side, "conn").await;
    let api = format!("http://{}", node.info.api.clone().unwrap());
    let http = client();

    let (s, e) = post(&http, &api, "nope", b"x".to_vec(), &[]).await.unwrap();
    assert_eq!((s, e["code"].as_str()), (404, Some("unknown_connection")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("nope"));

    let (s, e) = post(&http, &api, "conn", vec![b'x'; 1025], &[]).await.unwrap();
    assert_eq!((s, e["code"].as_str()), (413, Some("payload_too_large")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("1024"));

    let (s, e) = post(&http, &api, "conn", b"x".to_vec(), &[("idempotency-key", "has space")])
        .await
        .unwrap();
    assert_eq!((s, e["code"].as_str()), (400, Some("bad_request")), "{e}");

    // The same idempotency key twice: one message, the first answer repeated.
    let key = [("idempotency-key", "wi-42-rev-7")];
    let (s1, first) = post(&http, &api, "conn", b"a".to_vec(), &key).await.unwrap();
    let (s2, again) = post(&http, &api, "conn", b"a".to_vec(), &key).await.unwrap();
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first, again);
    assert_eq!(node.side.connections().await.unwrap()[0].outbound.depth, 1);

    for _ in 0..2 {
        let (s, e) = post(&http, &api, "conn", vec![b'k'; 1000], &[]).await.unwrap();
        assert_eq!(s, 202, "{e}");
    }
    // 2001 bytes queued of 2048: 100 more do not fit.
    let (s, e) = post(&http, &api, "conn", vec![b'k'; 100], &[]).await.unwrap();
    assert_eq!((s, e["code"].as_str()), (507, Some("queue_full_bytes")), "{e}");
    let (s, _) = post(&http, &api, "conn", b"b".to_vec(), &[]).await.unwrap();
    assert_eq!(s, 202);
    // Four messages of four: the count limit answers 429.
    let (s, e) = post(&http, &api, "conn", b"c".to_vec(), &[]).await.unwrap();
    assert_eq!((s, e["code"].as_str()), (429, Some("queue_full")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("full"));

    let stats = node.side.connections().await.unwrap()[0].outbound;
    assert_eq!(
        (stats.depth, stats.bytes, stats.last_seq),
        (4, 2002, 4),
        "nothing accepted was dropped"
    );

    assert_eq!(get(&api, "/healthz").await.0, 200);
    assert_eq!(get(&api, "/readyz").await.0, 200);
    let (s, metrics) = get(&api, "/metrics").await;
    assert_eq!(s, 200);
    assert!(
        metrics.contains("relay_queue_depth{connection=\"conn\",direction=\"outbound\"} 4"),
        "{metrics}"
    );
    assert_eq!(get(&api, "/nowhere").await.0, 404);
    assert_eq!(get(&api, "/v1/connections/conn/messages").await.0, 405);

    token.cancel();
    node.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(tmp.path());
    s.node.api_token = Some(Secret::new("s3cret-token"));
    let token = CancellationToken::new();
    let node = relay::daemon::start_node(s, token.clone()).await.unwrap();
    initiate(&node.side, "conn").await;
    let api = format!("http://{}", node.info.api.clone().unwrap());
    let http = client();
    let (s, e) = post(&http, &api, "conn", b"x".to_vec(), &[]).await.unwrap();
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthorized")));
    let (s, _) = post(&http, &api, "conn", b"x".to_vec(), &[("authorization", "Bearer wrong")])
        .await
        .unwrap();
    assert_eq!(s, 401);
    let (s, _) = post(
        &http,
        &api,
        "conn",
        b"x".to_vec(),
        &[("authorization", "Bearer s3cret-token")],
    )
    .await
    .unwrap();
    assert_eq!(s, 202);
    token.cancel();
    node.task.await.unwrap().unwrap();
}

/// Sends one raw HTTP/1.1 request (`head` without the final blank line) with `body`, and
/// returns the status and the JSON body of the answer.
async fn raw_post(api: &str, head: &[u8], body: &[u8]) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = api.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = head.to_vec();
    req.extend_from_slice(format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes());
    req.extend_from_slice(body);
    stream.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text[9..12].parse().unwrap();
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_bytes_beyond_ascii_are_refused_naming_the_header() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let node = relay::daemon::start_node(settings(tmp.path()), token.clone())
        .await
        .unwrap();
    initiate(&node.side, "conn").await;
    let api = format!("http://{}", node.info.api.clone().unwrap());
    let start = b"POST /v1/connections/conn/messages HTTP/1.1\r\nHost: localhost\r\n".to_vec();

    // A key with a byte >= 0x80, twice: once it was taken for "no key" and queued twice.
    let mut head = start.clone();
    head.extend_from_slice(b"Idempotency-Key: wi-42-\xff-rev\r\n");
    for _ in 0..2 {
        let (s, e) = raw_post(&api, &head, b"a").await;
        assert_eq!((s, e["code"].as_str()), (400, Some("bad_request")), "{e}");
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains("Idempotency-Key") && msg.contains("0xff"), "{msg}");
    }
    // Once it became application/octet-stream without a word.
    let mut head = start.clone();
    head.extend_from_slice(b"Content-Type: text/pl\xe9in\r\n");
    let (s, e) = raw_post(&api, &head, b"b").await;
    assert_eq!((s, e["code"].as_str()), (400, Some("bad_request")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("Content-Type"), "{e}");
    assert_eq!(
        node.side.connections().await.unwrap()[0].outbound.depth,
        0,
        "nothing queued"
    );

    // The same request in plain ASCII goes through, once.
    let mut head = start.clone();
    head.extend_from_slice(b"Idempotency-Key: wi-42-rev\r\nContent-Type: text/plain\r\n");
    for _ in 0..2 {
        assert_eq!(raw_post(&api, &head, b"c").await.0, 202);
    }
    assert_eq!(node.side.connections().await.unwrap()[0].outbound.depth, 1);
    token.cancel();
    node.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_not_ready_before_a_connection_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let agent = relay::daemon::start_agent(common::in_process(&tmp.path().join("agent")), token.clone())
        .await
        .unwrap();
    let intake = format!("http://{}", agent.info.api.clone().unwrap());
    let (s, body) = get(&intake, "/readyz").await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body.contains("not ready: no accepted connection (run relay accept)"),
        "{body}"
    );

    let node = relay::daemon::start_node(common::in_process(&tmp.path().join("node")), token.clone())
        .await
        .unwrap();
    common::connect(&node.side, &agent.side, "http://127.0.0.1:9/unused").await;
    let body = common::wait_for("the agent's /readyz", || async {
        let (s, body) = get(&intake, "/readyz").await;
        (s == 200).then_some(body)
    })
    .await;
    assert!(body.contains("1 connection(s) delivering"), "{body}");
    token.cancel();
    agent.task.await.unwrap().unwrap();
    node.task.await.unwrap().unwrap();
}
