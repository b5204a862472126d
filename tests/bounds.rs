//! Dead letters count against a queue's bounds: once a node's inbound queue holds its limit in
//! dead letters, the agent's push is refused with `429` and the agent keeps the message; when
//! an operator drops the dead letters, it flows again. Nothing accepted is dropped for room.

mod common;

use common::*;
use relay::sink::Sink;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_fill_the_queue_and_a_full_queue_refuses_with_429() {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let mut public_app = Sink::start().await.unwrap();
    public_app.script(&[400, 400, 400]);
    let private_app = Sink::start().await.unwrap();
    let public_url = public_app.url.clone();
    let node = Daemon::start(
        &node_dir,
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        &[("RELAY_QUEUE__MAX_MESSAGES", "3")],
    )
    .await;
    let code = initiate(&node_dir, "c", &public_url, &[]).await;
    let o = cli(
        &agent_dir,
        &["accept", &code, "--deliver-to", &private_app.url],
        &[],
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    let http = client();
    for i in 1..=3 {
        let (status, json) = post(&http, &agent.api(), "c", format!("bad-{i}").into_bytes(), &[])
            .await
            .unwrap();
        assert_eq!(status, 202, "{json}");
    }
    wait_for("three dead letters on the node", || async {
        let n = statuses(&node_dir, true).await;
        (n[0].inbound.dead_letters == 3).then_some(())
    })
    .await;

    let (status, json) = post(&http, &agent.api(), "c", b"good".to_vec(), &[]).await.unwrap();
    assert_eq!(status, 202, "{json}");
    let error = wait_for("the node to refuse the push for room", || async {
        let a = statuses(&agent_dir, false).await;
        let e = a[0].last_error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
        e.contains("429").then_some(e)
    })
    .await;
    assert!(error.contains("3 of them dead letters"), "{error}");
    let a = statuses(&agent_dir, false).await;
    assert_eq!(a[0].outbound.depth, 1, "the agent keeps what the node could not take");
    let n = statuses(&node_dir, true).await;
    assert_eq!(
        (n[0].inbound.depth, n[0].inbound.dead_letters),
        (0, 3),
        "nothing dropped"
    );

    cli_ok(&node_dir, &["dead-letters", "drop", "c", "--all"]).await;
    loop {
        let r = public_app
            .next(DEADLINE)
            .await
            .expect("the held message is delivered once there is room");
        if r.answered == 200 && r.body == b"good" {
            break;
        }
    }
    drop((agent, node));
}
