//! Webhook failures: down (connection refused, then 503s) and back — delivered, same message
//! id on every attempt; a 400 dead-letters that message and the next one still flows.

mod common;

use std::time::Duration;

use common::{client, connect, in_process, post, wait_for, DEADLINE};
use relay::sink::Sink;
use tokio_util::sync::CancellationToken;

async fn get(http: &relay::http::Client, url: &str) -> (u16, String) {
    let req = relay::http::request(relay::http::Method::GET, url, &[], Vec::new()).unwrap();
    let r = http.send(req, Duration::from_secs(5), 1 << 20).await.unwrap();
    (r.status.as_u16(), String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_then_back_and_permanent_rejections() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let node = relay::daemon::start_node(in_process(&tmp.path().join("node")), token.clone())
        .await
        .unwrap();
    let mut agent_settings = in_process(&tmp.path().join("agent"));
    agent_settings.queue.ready_max_age = Duration::from_millis(300);
    let agent = relay::daemon::start_agent(agent_settings, token.clone()).await.unwrap();
    let agent_api = format!("http://{}", agent.info.api.clone().unwrap());

    // The private application is down: its port is held but not listening, so connections
    // are refused; later the same socket starts listening.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hook_addr = reserved.local_addr().unwrap();
    connect(&node.side, &agent.side, &format!("http://{hook_addr}/hook")).await;

    let api = format!("http://{}", node.info.api.clone().unwrap());
    let http = client();
    for body in ["m0", "m1"] {
        assert_eq!(
            post(&http, &api, "c", body.as_bytes().to_vec(), &[]).await.unwrap().0,
            202
        );
    }
    // Both messages reach the agent and stay queued while the webhook refuses connections.
    let refused = wait_for("the agent to hold both messages and report the refusal", || async {
        let s = agent.side.status().unwrap().remove(0);
        s.last_error
            .filter(|e| e.message.contains("unreachable") && s.inbound.depth == 2)
    })
    .await;
    assert!(refused.message.contains(&hook_addr.to_string()), "{}", refused.message);
    assert_eq!(
        agent.side.status().unwrap()[0].inbound.depth,
        2,
        "kept while the webhook is down"
    );
    // Stuck messages make the agent not ready, and say why.
    let why = wait_for("/readyz to fail on the stuck queue", || async {
        let (status, body) = get(&http, &format!("{agent_api}/readyz")).await;
        (status == 503 && body.contains("oldest inbound message")).then_some(body)
    })
    .await;
    assert!(why.contains("limit 300ms"), "{why}");

    // Back, but answering 503 twice before it recovers.
    let mut app = Sink::serve(reserved.listen(64).unwrap());
    app.script(&[503, 503]);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(app.next(DEADLINE).await.expect("delivery attempt"));
    }
    assert_eq!(got.iter().map(|r| r.answered).collect::<Vec<_>>(), [503, 503, 200, 200]);
    assert_eq!(
        got.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
        [b"m0".to_vec(), b"m0".to_vec(), b"m0".to_vec(), b"m1".to_vec()]
    );
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert!(
        ids[0] == ids[1] && ids[1] == ids[2] && ids[2] != ids[3],
        "retries keep the message id"
    );
    wait_for("/readyz to recover", || async {
        (get(&http, &format!("{agent_api}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    let (_, metrics) = get(&http, &format!("{agent_api}/metrics")).await;
    for series in [
        "relay_webhook_seconds_count{connection=\"c\"} ",
        "relay_bytes_delivered_total{connection=\"c\"} 4",
        "relay_messages_delivered_total{connection=\"c\"} 2",
        "relay_peer_round_trip_seconds_bucket{connection=\"c\",le=\"+Inf\"}",
    ] {
        assert!(metrics.contains(series), "missing {series}:\n{metrics}");
    }

    // A permanent refusal: dead-lettered, and the next message still arrives.
    app.script(&[400]);
    for body in ["bad", "good"] {
        assert_eq!(
            post(&http, &api, "c", body.as_bytes().to_vec(), &[]).await.unwrap().0,
            202
        );
    }
    let rejected = app.next(DEADLINE).await.unwrap();
    assert_eq!((rejected.answered, rejected.body.as_slice()), (400, b"bad".as_slice()));
    let next = app.next(DEADLINE).await.unwrap();
    assert_eq!((next.answered, next.body.as_slice()), (200, b"good".as_slice()));
    let status = wait_for("the dead letter to be counted", || async {
        let s = agent.side.status().unwrap().remove(0);
        (s.inbound.dead_letters == 1 && s.inbound.depth == 0).then_some(s)
    })
    .await;
    assert!(status.last_error.unwrap().message.contains("dead-lettered"));
    let rendered = relay::status::render(&agent.side.status().unwrap());
    assert!(rendered.contains("1 dead letters"), "{rendered}");
    let dead = &agent.side.status().unwrap()[0].recent_dead_letters;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.contains("400"), "{}", dead[0].reason);
    assert!(
        rendered.contains(&format!("dead letter:  seq {} id {}", dead[0].seq, dead[0].id)),
        "{rendered}"
    );
    assert!(app.rx.try_recv().is_err(), "the dead letter is not retried");

    // The operator sees the dead letter, and retries it once the receiver is fixed: it
    // arrives again with the same message id.
    let agent_dir = tmp.path().join("agent");
    let listed = common::cli_ok(&agent_dir, &["dead-letters", "list", "c"]).await;
    assert!(
        listed.contains(&format!("id {}", dead[0].id)) && listed.contains("400"),
        "{listed}"
    );
    let out = common::cli_ok(&agent_dir, &["dead-letters", "retry", "c", "--all"]).await;
    assert!(out.contains("1 dead letter(s) queued again for delivery"), "{out}");
    assert!(out.contains("c: no dead letters"), "{out}");
    let again = app.next(DEADLINE).await.unwrap();
    assert_eq!(again.body, b"bad");
    assert_eq!(again.header("idempotency-key"), Some(dead[0].id.as_str()));

    // Another refusal, dropped for good this time.
    app.script(&[422]);
    assert_eq!(post(&http, &api, "c", b"worse".to_vec(), &[]).await.unwrap().0, 202);
    assert_eq!(app.next(DEADLINE).await.unwrap().answered, 422);
    let seq = wait_for("the second dead letter", || async {
        agent.side.status().unwrap()[0]
            .recent_dead_letters
            .first()
            .map(|d| d.seq)
    })
    .await;
    let o = common::cli(&agent_dir, &["dead-letters", "drop", "c", "999999"], &[], None).await;
    assert_eq!(o.status.code(), Some(1), "an unknown sequence number is an error");
    let out = common::cli_ok(&agent_dir, &["dead-letters", "drop", "c", &seq.to_string()]).await;
    assert!(out.contains(&format!("1 dead letter(s) dropped: seq {seq}")), "{out}");
    assert_eq!(agent.side.status().unwrap()[0].inbound.dead_letters, 0);

    token.cancel();
    node.task.await.unwrap().unwrap();
    agent.task.await.unwrap().unwrap();
}

/// A webhook whose every answer is the current `(status, body bytes)`; records what arrives.
struct Hook {
    url: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    answer: std::sync::Arc<std::sync::Mutex<(u16, usize)>>,
    _token: tokio_util::sync::DropGuard,
}

impl Hook {
    async fn start() -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let answer = std::sync::Arc::new(std::sync::Mutex::new((200, 0)));
        let token = CancellationToken::new();
        let a = answer.clone();
        tokio::spawn(relay::http::serve(
            listener,
            relay::http::ServerOptions {
                tls: None,
                max_connections: 64,
                name: "hook",
            },
            move |req, _| {
                let (tx, a) = (tx.clone(), a.clone());
                async move {
                    let body = relay::http::read_body(req.into_body(), 1 << 20)
                        .await
                        .unwrap_or_default();
                    let _ = tx.send(body.to_vec());
                    let (status, size) = *a.lock().unwrap();
                    relay::http::bytes(
                        relay::http::StatusCode::from_u16(status).unwrap(),
                        "text/plain",
                        vec![b'x'; size],
                    )
                }
            },
            token.clone(),
        ));
        Hook {
            url,
            rx,
            answer,
            _token: token.drop_guard(),
        }
    }

    fn answer(&self, status: u16, size: usize) {
        *self.answer.lock().unwrap() = (status, size);
    }

    async fn next(&mut self) -> Vec<u8> {
        tokio::time::timeout(DEADLINE, self.rx.recv()).await.unwrap().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_2xx_answer_is_delivered_once_and_a_webhook_refusing_everyone_holds_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    // The public application's webhook is gone (410) from the start.
    let mut node_hook = Hook::start().await;
    node_hook.answer(410, 0);
    let mut node_settings = in_process(&tmp.path().join("node"));
    node_settings.node.deliver_to = Some(node_hook.url.clone());
    let node = relay::daemon::start_node(node_settings, token.clone()).await.unwrap();
    let agent = relay::daemon::start_agent(in_process(&tmp.path().join("agent")), token.clone())
        .await
        .unwrap();
    let agent_api = format!("http://{}", agent.info.api.clone().unwrap());
    let mut hook = Hook::start().await;
    connect(&node.side, &agent.side, &hook.url).await;
    let api = format!("http://{}", node.info.api.clone().unwrap());
    let http = client();

    // 200 with 100 KiB of body: delivered, once, and the next message follows.
    hook.answer(200, 100 * 1024);
    for body in ["big-answer", "next"] {
        assert_eq!(post(&http, &api, "c", body.into(), &[]).await.unwrap().0, 202);
    }
    assert_eq!(hook.next().await, b"big-answer");
    assert_eq!(hook.next().await, b"next", "delivered once, not again");
    wait_for("both to leave the queue", || async {
        let s = agent.side.status().unwrap().remove(0);
        (s.inbound.depth == 0).then_some(())
    })
    .await;

    // 404 to everything (a wrong path): delivery holds, nothing is dead-lettered, and status
    // and /readyz say why.
    hook.answer(404, 10 * 1024);
    for body in ["held-1", "held-2"] {
        assert_eq!(post(&http, &api, "c", body.into(), &[]).await.unwrap().0, 202);
    }
    assert_eq!(hook.next().await, b"held-1");
    assert_eq!(
        hook.next().await,
        b"held-1",
        "the same message is asked again, not dead-lettered"
    );
    let why = wait_for("/readyz to say why delivery holds", || async {
        let (status, body) = get(&http, &format!("{agent_api}/readyz")).await;
        (status == 503 && body.contains("answers 404 Not Found to every message")).then_some(body)
    })
    .await;
    assert!(why.contains(&hook.url) && why.contains("check deliver_to"), "{why}");
    let s = agent.side.status().unwrap().remove(0);
    assert_eq!((s.inbound.dead_letters, s.inbound.depth), (0, 2), "{s:?}");
    assert!(s.last_error.unwrap().message.contains("404 Not Found"));

    // The same on the node, for the other direction.
    let intake = agent_api.clone();
    assert_eq!(
        post(&http, &intake, "c", b"to-public".to_vec(), &[]).await.unwrap().0,
        202
    );
    assert_eq!(node_hook.next().await, b"to-public");
    let why = wait_for("the node's /readyz to say why", || async {
        let (status, body) = get(&http, &format!("{api}/readyz")).await;
        (status == 503 && body.contains("answers 410 Gone to every message")).then_some(body)
    })
    .await;
    assert!(why.contains(&node_hook.url), "{why}");
    let s = node.side.connections().await.unwrap().remove(0);
    assert_eq!((s.inbound.dead_letters, s.inbound.depth), (0, 1), "{s:?}");

    // deliver_to fixed: both arrive in order, and the hold clears.
    hook.answer(200, 0);
    let mut seen = Vec::new();
    while seen.last().map(Vec::as_slice) != Some(b"held-2".as_slice()) {
        seen.push(hook.next().await);
    }
    // Attempts already on their way when it was fixed answered 404; then each once, in order.
    assert!(seen[..seen.len() - 1].iter().all(|b| b == b"held-1"), "{seen:?}");
    wait_for("/readyz to recover", || async {
        (get(&http, &format!("{agent_api}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    token.cancel();
    node.task.await.unwrap().unwrap();
    agent.task.await.unwrap().unwrap();
}
