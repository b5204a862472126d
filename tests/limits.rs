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
