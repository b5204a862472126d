//! Mismatched limits between the two sides, and revocation with payloads in flight: nothing
//! stalls and nothing already handed over is lost.

mod common;

use common::{client, connect, in_process, post, wait_for, DEADLINE};
use relay::node::Action;
use relay::sink::Sink;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_agent_queue_takes_big_batches_piecewise_and_node_limits_reach_the_intake() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let mut node_settings = in_process(&tmp.path().join("node"));
    node_settings.queue.max_payload_bytes = 1000;
    let node = relay::daemon::start_node(node_settings, token.clone()).await.unwrap();
    let mut agent_settings = in_process(&tmp.path().join("agent"));
    agent_settings.queue.max_messages = 3;
    let agent = relay::daemon::start_agent(agent_settings, token.clone()).await.unwrap();
    let mut app = Sink::start().await.unwrap();
    let http = client();
    let api = format!("http://{}", node.info.api.clone().unwrap());
    let intake = format!("http://{}", agent.info.api.clone().unwrap());

    // Twenty messages wait on the node before the agent connects: one poll offers them all,
    // more than the agent's queue holds.
    connect(&node.side, &agent.side, &app.url).await;
    node.side.set_state("c", Action::Deactivate).await.unwrap();
    for i in 0..20 {
        assert_eq!(
            post(&http, &api, "c", format!("m{i:02}").into_bytes(), &[])
                .await
                .unwrap()
                .0,
            202
        );
    }
    node.side.set_state("c", Action::Activate).await.unwrap();
    for i in 0..20 {
        let got = app
            .next(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("only {i} of 20 delivered"));
        assert_eq!(got.body, format!("m{i:02}").into_bytes());
    }

    // The node accepts at most 1000 bytes: once the agent has heard that, its intake says so.
    let refusal = wait_for("the agent to learn the node's limit", || async {
        let (status, body) = post(&http, &intake, "c", vec![b'x'; 2000], &[]).await.unwrap();
        (status == 413).then_some(body)
    })
    .await;
    assert!(refusal["error"].as_str().unwrap().contains("other side"), "{refusal}");
    assert_eq!(post(&http, &intake, "c", vec![b'y'; 900], &[]).await.unwrap().0, 202);
    token.cancel();
    node.task.await.unwrap().unwrap();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_still_delivers_what_was_handed_over() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let node = relay::daemon::start_node(in_process(&tmp.path().join("node")), token.clone())
        .await
        .unwrap();
    let agent_token = CancellationToken::new();
    let agent = relay::daemon::start_agent(in_process(&tmp.path().join("agent")), agent_token.clone())
        .await
        .unwrap();
    // The private application is down while the payloads arrive.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hook_addr = socket.local_addr().unwrap();
    connect(&node.side, &agent.side, &format!("http://{hook_addr}/hook")).await;
    let http = client();
    let api = format!("http://{}", node.info.api.clone().unwrap());
    for i in 0..5 {
        assert_eq!(
            post(&http, &api, "c", format!("r{i}").into_bytes(), &[])
                .await
                .unwrap()
                .0,
            202
        );
    }
    wait_for("the agent to hold all five", || async {
        (agent.side.status().unwrap()[0].inbound.depth == 5).then_some(())
    })
    .await;
    node.side.set_state("c", Action::Revoke).await.unwrap();
    wait_for("the agent to see the revocation", || async {
        (agent.side.status().unwrap()[0].state == "revoked").then_some(())
    })
    .await;

    // The application comes back: the revoked connection still delivers all five, then the
    // agent stops with the "revoked" error.
    let mut app = Sink::serve(socket.listen(64).unwrap());
    for i in 0..5 {
        assert_eq!(app.next(DEADLINE).await.unwrap().body, format!("r{i}").into_bytes());
    }
    let stopped = tokio::time::timeout(DEADLINE, agent.task)
        .await
        .expect("agent stops")
        .unwrap();
    assert_eq!(stopped.unwrap_err().kind, relay::error::Kind::Revoked);
    token.cancel();
    node.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_big_for_the_agent_is_dead_lettered_on_the_node_and_the_intake_refuses_more() {
    let tmp = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let node_dir = tmp.path().join("node");
    let node = relay::daemon::start_node(in_process(&node_dir), token.clone())
        .await
        .unwrap();
    let mut agent_settings = in_process(&tmp.path().join("agent"));
    agent_settings.queue.max_payload_bytes = 1000;
    agent_settings.queue.max_bytes = 1500;
    let agent = relay::daemon::start_agent(agent_settings, token.clone()).await.unwrap();
    let mut app = Sink::start().await.unwrap();
    let http = client();
    let api = format!("http://{}", node.info.api.clone().unwrap());

    // Queued while the connection is pending, before the node could know the agent's limit:
    // 2000 bytes fit the node but never the agent (more than its whole queue).
    let code = node
        .side
        .initiate(relay::node::InitiateRequest::script("c", "pub", "priv", "P"))
        .await
        .unwrap();
    for body in [b"small-1".to_vec(), vec![b'x'; 2000], b"small-2".to_vec()] {
        assert_eq!(post(&http, &api, "c", body, &[]).await.unwrap().0, 202);
    }
    agent
        .side
        .accept(
            &relay::invite::Invitation::decode(&code).unwrap(),
            relay::agent::AcceptOptions {
                deliver_to: Some(app.url.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The big one is set aside on the node; what follows it flows.
    assert_eq!(app.next(DEADLINE).await.unwrap().body, b"small-1");
    assert_eq!(app.next(DEADLINE).await.unwrap().body, b"small-2");
    let s = node.side.connections().await.unwrap().remove(0);
    assert_eq!(s.outbound.dead_letters, 1, "{s:?}");
    assert!(s
        .last_error
        .unwrap()
        .message
        .contains("more than the agent accepts (1000 bytes"));

    // The node's intake now refuses what the agent cannot take, naming the agent's limit.
    let (status, body) = post(&http, &api, "c", vec![b'y'; 1001], &[]).await.unwrap();
    assert_eq!(status, 413, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("1000 bytes") && error.contains("other side"), "{error}");
    assert_eq!(post(&http, &api, "c", vec![b'z'; 1000], &[]).await.unwrap().0, 202);
    assert_eq!(app.next(DEADLINE).await.unwrap().body, vec![b'z'; 1000]);

    // The operator sees it with `relay dead-letters`, and a retry queues it again at the end
    // under a new sequence number (the agent is past the old one): set aside again, as the
    // agent's limit has not changed.
    let listed = common::cli_ok(&node_dir, &["dead-letters", "list", "c"]).await;
    assert!(listed.contains("c: no inbound dead letters"), "{listed}");
    assert!(listed.contains("c: outbound dead letters"), "{listed}");
    assert!(
        listed.contains("seq 2 ") && listed.contains("more than the agent accepts"),
        "{listed}"
    );
    let out = common::cli_ok(&node_dir, &["dead-letters", "retry", "c", "--direction", "out", "2"]).await;
    assert!(
        out.contains("1 dead letter(s) queued again for delivery: seq 2"),
        "{out}"
    );
    let again = wait_for("the retried message to be set aside again", || async {
        use relay::store::NodeQueue;
        let d = node
            .side
            .outbound_queue("c")
            .await
            .unwrap()
            .dead_letters(10)
            .await
            .unwrap();
        d.first().filter(|d| d.seq > 4).cloned()
    })
    .await;
    assert_eq!(again.bytes, 2000);
    let o = common::cli(
        &node_dir,
        &["dead-letters", "drop", "c", "--direction", "both", "5"],
        &[],
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "sequence numbers need one direction");
    token.cancel();
    node.task.await.unwrap().unwrap();
    agent.task.await.unwrap().unwrap();
    drop(node.side);

    // Without a daemon the CLI opens the data directory itself.
    let seq = again.seq.to_string();
    let out = common::cli_ok(&node_dir, &["dead-letters", "drop", "c", "--direction", "out", &seq]).await;
    assert!(out.contains(&format!("1 dead letter(s) dropped: seq {seq}")), "{out}");
    assert!(out.contains("c: no dead letters"), "{out}");
}
