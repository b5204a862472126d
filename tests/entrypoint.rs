//! The container entrypoint through the built binary: `relay run` with `RELAY_INVITATION` or
//! `RELAY_INVITATION_FILE` accepts the invitation on its first start and just runs on later
//! starts (the code is single-use, so a second redeem would fail); a refused or malformed code
//! exits 3 (a refused one again on the next start, without asking the node), an unreachable
//! node exits 1 after a few retries; `relay health` answers for the running daemon; no log
//! holds the code or the credential.

mod common;

use common::*;
use relay::sink::Sink;
use std::time::Duration;

const RUN: &[&str] = &["run", "--intake-listen", "127.0.0.1:0"];
const NODE_RUN: &[&str] = &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];

/// The next delivery whose body is `want`: delivery is at least once, so a run stopped while
/// a delivery was in flight may repeat an earlier payload first.
async fn delivered(app: &mut Sink, want: &str, earlier: &[&str]) {
    loop {
        let got = app
            .next(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("no delivery of {want}"));
        let body = String::from_utf8_lossy(&got.body).into_owned();
        if body == want {
            return;
        }
        assert!(earlier.contains(&body.as_str()), "unexpected delivery {body:?}");
    }
}

async fn wait_active(agent_dir: &std::path::Path) {
    wait_for("the agent's connection to be active", || async {
        let s = statuses(agent_dir, false).await;
        (s.len() == 1 && s[0].state == "active").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_accepts_later_starts_just_run_and_no_log_holds_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let mut private_app = Sink::start().await.unwrap();
    let hook = private_app.url.clone();
    let public_app = Sink::start().await.unwrap();
    let http = client();
    let mut node = Daemon::start(&node_dir, NODE_RUN, &[]).await;
    let code = initiate(&node_dir, "ado-sync", &public_app.url, &[]).await;

    // First start, as with a Docker secret: the file's whitespace does not matter.
    let secret = tmp.path().join("invitation.txt");
    std::fs::write(&secret, format!("  {code}\n\n")).unwrap();
    let secret = secret.display().to_string();
    let env = [
        ("RELAY_INVITATION_FILE", secret.as_str()),
        ("RELAY_AGENT__DELIVER_TO", hook.as_str()),
        ("RELAY_INVITATION_PROJECT", "OnPrem"),
    ];
    let mut agent = Daemon::start(&agent_dir, RUN, &env).await;
    wait_active(&agent_dir).await;
    assert_eq!(statuses(&agent_dir, false).await[0].project, "OnPrem");
    let on_node = statuses(&node_dir, true).await;
    assert_eq!(on_node[0].state, "active", "{:?}", on_node[0]);
    // The connection delivers to agent.deliver_to.
    let (s, _) = post(&http, &node.api(), "ado-sync", b"first".to_vec(), &[])
        .await
        .unwrap();
    assert_eq!(s, 202);
    delivered(&mut private_app, "first", &[]).await;
    assert!(agent.terminate().await.success(), "{}", agent.log());
    let mut logs = vec![agent.log()];

    // Later starts (the container restarts with the same environment, either variable): no
    // second redeem, which the node would refuse; the same connection runs on.
    let runs = [
        env,
        [
            ("RELAY_INVITATION", code.as_str()),
            ("RELAY_AGENT__DELIVER_TO", hook.as_str()),
            ("RELAY_INVITATION_PROJECT", "OnPrem"),
        ],
    ];
    let bodies = ["first", "second", "third"];
    for (run, env) in runs.into_iter().enumerate() {
        let mut again = Daemon::start(&agent_dir, RUN, &env).await;
        wait_active(&agent_dir).await;
        assert!(again.log().contains("accepted before"), "{}", again.log());
        let body = bodies[run + 1];
        let (s, _) = post(&http, &node.api(), "ado-sync", body.as_bytes().to_vec(), &[])
            .await
            .unwrap();
        assert_eq!(s, 202);
        delivered(&mut private_app, body, &bodies[..=run]).await;
        again.kill9();
        logs.push(again.log());
    }
    assert_eq!(statuses(&agent_dir, false).await.len(), 1);

    // Neither the code nor the stored credential appears in any log of these runs.
    let credential = std::fs::read_to_string(agent_dir.join("credentials/ado-sync.cred")).unwrap();
    let credential = credential.trim();
    assert!(credential.starts_with("rlycred1_"));
    assert!(node.terminate().await.success());
    logs.push(node.log());
    for log in &logs {
        assert!(!log.is_empty());
        assert!(!log.contains(&code), "a log holds the invitation code:\n{log}");
        assert!(!log.contains(credential), "a log holds the credential:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_or_malformed_invitations_exit_3_and_an_unreachable_node_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let node_dir = tmp.path().join("node");
    let app = Sink::start().await.unwrap();
    let mut node = Daemon::start(&node_dir, NODE_RUN, &[]).await;
    let code = initiate(&node_dir, "ado-sync", &app.url, &[]).await;

    // Redeemed elsewhere first: the container's start is refused by the node.
    let out = cli(&tmp.path().join("other"), &["accept", &code], &[], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let fresh = tmp.path().join("fresh");
    let out = cli(&fresh, RUN, &[("RELAY_INVITATION", &code)], None).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("RELAY_INVITATION") && err.contains("already redeemed"),
        "{err}"
    );
    assert!(!err.contains(&code), "{err}");
    // Started again by a restart policy: the same answer, without asking the node again.
    assert!(node.terminate().await.success());
    let out = cli(&fresh, RUN, &[("RELAY_INVITATION", &code)], None).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("already redeemed") && err.contains("not tried again"),
        "{err}"
    );
    let mut node = Daemon::start(&node_dir, NODE_RUN, &[]).await;

    // Mangled: refused before any network call, without quoting it.
    let truncated = &code[..code.len() - 8];
    let out = cli(&fresh, RUN, &[("RELAY_INVITATION", truncated)], None).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("checksum") || err.contains("truncated"), "{err}");
    assert!(!err.contains(truncated), "{err}");

    // A secret file that is not there is a configuration problem: do not restart.
    let missing = tmp.path().join("no-such-secret").display().to_string();
    let out = cli(&fresh, RUN, &[("RELAY_INVITATION_FILE", &missing)], None).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("RELAY_INVITATION_FILE"), "{}", stderr(&out));

    // The node is gone: a few retries with backoff, then exit 1 for the supervisor.
    let unused = initiate(&node_dir, "later", &app.url, &[]).await;
    assert!(node.terminate().await.success());
    let started = std::time::Instant::now();
    let out = cli(&fresh, RUN, &[("RELAY_INVITATION", &unused)], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("attempt 4 of 5") && err.contains("cannot reach the node"),
        "{err}"
    );
    assert!(!err.contains(&unused), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_asks_the_running_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let app = Sink::start().await.unwrap();

    let out = cli(&node_dir, &["health"], &[], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no relay daemon is running"), "{}", stderr(&out));

    let mut node = Daemon::start(&node_dir, NODE_RUN, &[]).await;
    let out = cli(&node_dir, &["health"], &[], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "ok");
    let out = cli(&node_dir, &["health", "--ready"], &[], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ready"), "{}", stdout(&out));

    // `relay accept` without an argument reads RELAY_INVITATION_FILE.
    let code = initiate(&node_dir, "ado-sync", &app.url, &[]).await;
    let secret = tmp.path().join("code");
    std::fs::write(&secret, format!("{code}\n")).unwrap();
    let secret = secret.display().to_string();
    let out = cli(&agent_dir, &["accept"], &[("RELAY_INVITATION_FILE", &secret)], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("accepted connection \"ado-sync\""));

    // An agent that cannot reach its node is alive but not ready.
    assert!(node.terminate().await.success());
    let _agent = Daemon::start(&agent_dir, RUN, &[]).await;
    let out = cli(&agent_dir, &["health"], &[], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&agent_dir, &["health", "--ready"], &[], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("not ready: ado-sync: not connected to the node yet"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("503"), "{}", stderr(&out));
}
