//! The whole lifecycle through the built binary: initiate → pending/unknown → accept →
//! active → payloads both ways in order with the contract headers → deactivate holds,
//! activate releases → revoke stops the agent with a clear error; SIGTERM exits 0.

mod common;

use common::*;
use relay::sink::{Received, Sink};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

async fn receive(sink: &mut Sink, n: usize) -> Vec<Received> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = sink
            .next(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("webhook got {i} of {n} payloads"));
        out.push(r);
    }
    out
}

fn check_contract(got: &[Received], prefix: &str, first_seq: u64, conn: &str, project: &str) {
    for (i, r) in got.iter().enumerate() {
        assert_eq!(String::from_utf8_lossy(&r.body), format!("{prefix}-{i}"), "FIFO order");
        assert_eq!(r.header("content-type"), Some("application/vnd.workitem+json"));
        assert_eq!(r.header("relay-connection"), Some(conn));
        assert_eq!(r.header("relay-project"), Some(project));
        assert_eq!(r.header("relay-seq"), Some((first_seq + i as u64).to_string().as_str()));
        let id = r.header("relay-message-id").expect("message id");
        assert_eq!(r.header("idempotency-key"), Some(id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiate_accept_traffic_pause_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let mut public_app = Sink::start().await.unwrap();
    let mut private_app = Sink::start().await.unwrap();
    let http = client();

    let mut node = Daemon::start(
        &node_dir,
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        &[],
    )
    .await;
    let code = initiate(&node_dir, "ado-sync", &public_app.url, &["--expires", "2h"]).await;

    let pending = statuses(&node_dir, true).await;
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].state.as_str(), pending[0].remote.as_str()),
        ("pending", "unknown")
    );
    assert!(pending[0].invitation_expires_at.is_some());

    let mut agent = Daemon::start(
        &agent_dir,
        &["run", "--intake-listen", "127.0.0.1:0"],
        &[("RELAY_AGENT__INSTANCE_NAME", "ado-server-prod")],
    )
    .await;
    // Accepted while the agent runs: the CLI hands the code to the daemon's admin socket.
    let out = cli(
        &agent_dir,
        &["accept", "-", "--deliver-to", &private_app.url, "--project", "OnPrem"],
        &[("RELAY_AGENT__INSTANCE_NAME", "ado-server-prod")],
        Some(&format!("{code}\n")),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    for expected in [
        "ado-sync",
        "ado-services",
        "ado-server",
        "Services to Server",
        "OnPrem",
        "Fabrikam",
    ] {
        assert!(printed.contains(expected), "accept output lacks {expected}: {printed}");
    }
    assert!(!printed.contains(&code) && !agent.log().contains(&code) && !node.log().contains(&code));
    let cred = agent_dir.join("credentials/ado-sync.cred");
    assert_eq!(std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777, 0o600);
    let credential = std::fs::read_to_string(&cred).unwrap();
    assert!(!node.log().contains(credential.trim()));

    // The agent confirms the connection at once, so it is ready without a full poll wait.
    let readyz = format!("{}/readyz", agent.api());
    wait_for("the agent's /readyz", || async {
        let req = relay::http::request(relay::http::Method::GET, &readyz, &[], Vec::new()).unwrap();
        let r = http.send(req, Duration::from_secs(5), 1 << 16).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;

    let active = statuses(&node_dir, true).await;
    assert_eq!(active[0].state, "active");
    assert!(
        active[0].remote.starts_with("ado-server-prod ("),
        "{}",
        active[0].remote
    );

    // Traffic both ways, in order, with the contract headers.
    let ct = [("content-type", "application/vnd.workitem+json")];
    for i in 0..5 {
        let (s, body) = post(&http, &node.api(), "ado-sync", format!("down-{i}").into_bytes(), &ct)
            .await
            .unwrap();
        assert_eq!(s, 202, "{body}");
        assert_eq!(body["seq"], i + 1);
        let (s, _) = post(&http, &agent.api(), "ado-sync", format!("up-{i}").into_bytes(), &ct)
            .await
            .unwrap();
        assert_eq!(s, 202);
    }
    check_contract(&receive(&mut private_app, 5).await, "down", 1, "ado-sync", "OnPrem");
    check_contract(&receive(&mut public_app, 5).await, "up", 1, "ado-sync", "Fabrikam");

    // Deactivate: both directions hold on the node; nothing reaches either webhook.
    assert!(cli_ok(&node_dir, &["node", "deactivate", "ado-sync"])
        .await
        .contains("deactivated"));
    for i in 5..7 {
        post(&http, &node.api(), "ado-sync", format!("down-{i}").into_bytes(), &ct)
            .await
            .unwrap();
        post(&http, &agent.api(), "ado-sync", format!("up-{i}").into_bytes(), &ct)
            .await
            .unwrap();
    }
    wait_for("both directions held on the node", || async {
        let s = statuses(&node_dir, true).await;
        (s[0].state == "deactivated" && s[0].outbound.depth == 2 && s[0].inbound.depth == 2).then_some(())
    })
    .await;
    wait_for("the agent to see the deactivation", || async {
        (statuses(&agent_dir, false).await[0].state == "deactivated").then_some(())
    })
    .await;
    assert!(private_app.rx.try_recv().is_err() && public_app.rx.try_recv().is_err());

    assert!(cli_ok(&node_dir, &["node", "activate", "ado-sync"])
        .await
        .contains("active"));
    let released = receive(&mut private_app, 2).await;
    assert_eq!(
        released.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
        [b"down-5".to_vec(), b"down-6".to_vec()]
    );
    let released = receive(&mut public_app, 2).await;
    assert_eq!(
        released.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
        [b"up-5".to_vec(), b"up-6".to_vec()]
    );

    // Revoke: the agent's only connection stops; the agent exits with the "revoked" code.
    assert!(cli_ok(&node_dir, &["node", "revoke", "ado-sync"])
        .await
        .contains("revoked"));
    let status = agent.wait_exit().await;
    assert_eq!(status.code(), Some(78), "{}", agent.log());
    assert!(
        agent.log().contains("revoked by the node administrator"),
        "{}",
        agent.log()
    );
    let after = statuses(&agent_dir, false).await;
    assert_eq!(after[0].state, "revoked");
    assert!(after[0].last_error.as_ref().unwrap().message.contains("revoked"));
    let (s, body) = post(&http, &node.api(), "ado-sync", b"late".to_vec(), &[])
        .await
        .unwrap();
    assert_eq!((s, body["code"].as_str()), (409, Some("connection_state")));

    // SIGTERM: drains and exits 0 promptly.
    let started = std::time::Instant::now();
    let status = node.terminate().await;
    assert!(status.success(), "{status}: {}", node.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(node.log().contains("stopped cleanly"));

    // A full run never shows the code or the credential: not in logs, status or errors.
    let status_text = stdout(&cli(&agent_dir, &["status", "--json"], &[], None).await);
    let node_text = stdout(&cli(&node_dir, &["node", "connections", "--json"], &[], None).await);
    for (what, text) in [
        ("agent log", agent.log()),
        ("node log", node.log()),
        ("status", status_text),
        ("connections", node_text),
    ] {
        assert!(!text.contains(&code), "the invitation code leaked into the {what}");
        assert!(
            !text.contains(credential.trim()),
            "the credential leaked into the {what}"
        );
        assert!(
            !text.contains(&code[8..40]),
            "part of the invitation code leaked into the {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_work_without_a_daemon_and_agent_exits_cleanly_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let mut private_app = Sink::start().await.unwrap();
    // A mistyped data directory is reported, not created.
    let typo = tmp.path().join("nodee");
    let o = cli(&typo, &["node", "connections"], &[], None).await;
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("holds no relay data"), "{}", stderr(&o));
    assert!(!typo.join("role").exists());
    // Offline initiate needs the public URL from configuration.
    let o = cli(
        &node_dir,
        &[
            "node",
            "initiate",
            "--local-name",
            "a",
            "--remote-name",
            "b",
            "--name",
            "c",
            "--project",
            "p",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("public URL"), "{}", stderr(&o));

    // Reserve a port for the node, initiate offline with that URL, then start the node on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let env = [("RELAY_NODE__PUBLIC_URL", url.as_str())];
    let o = cli(
        &node_dir,
        &[
            "node",
            "initiate",
            "--local-name",
            "a",
            "--remote-name",
            "b",
            "--name",
            "c",
            "--project",
            "p",
            "--deliver-to",
            "http://127.0.0.1:9/x",
        ],
        &env,
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let code = stdout(&o).trim().to_owned();
    let o = cli(
        &node_dir,
        &[
            "node",
            "initiate",
            "--local-name",
            "a",
            "--remote-name",
            "b",
            "--name",
            "d",
            "--project",
            "p",
            "--mode",
            "basic",
        ],
        &env,
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("only mode is \"script\""), "{}", stderr(&o));

    let listen = format!("127.0.0.1:{port}");
    let _node = Daemon::start(
        &node_dir,
        &["node", "run", "--listen", &listen, "--api-listen", "127.0.0.1:0"],
        &env,
    )
    .await;

    // Accept offline from the environment, as a container would.
    let o = cli(
        &agent_dir,
        &["accept", "--deliver-to", &private_app.url],
        &[("RELAY_INVITATION", code.as_str())],
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let s = statuses(&agent_dir, false).await;
    assert_eq!((s[0].name.as_str(), s[0].state.as_str()), ("c", "active"));

    // Queue offline with `relay send`, then run: the payload is delivered.
    let payload = tmp.path().join("item.json");
    std::fs::write(&payload, br#"{"summary":"offline"}"#).unwrap();
    let out = cli_ok(&node_dir, &["send", "c", payload.to_str().unwrap()]).await;
    assert!(out.contains("\"seq\""), "{out}");
    let mut agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    let got = private_app.next(DEADLINE).await.expect("delivered");
    assert_eq!(got.body, br#"{"summary":"offline"}"#);
    assert_eq!(got.header("content-type"), Some("application/json"));

    // `relay send` while the agent runs goes through its intake.
    let o = cli(
        &agent_dir,
        &["send", "c", "-", "--content-type", "text/plain"],
        &[],
        Some("hello"),
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(&agent_dir, &["send", "nope", "-"], &[], Some("x")).await;
    assert!(
        !o.status.success() && stderr(&o).contains("no connection named"),
        "{}",
        stderr(&o)
    );

    let status = agent.terminate().await;
    assert!(status.success(), "{}", agent.log());
}
