//! `relay doctor` walks every step with its measured value and fails loudly; `relay egress`
//! lists exactly where the agent connects.

mod common;

use common::*;
use relay::sink::Sink;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_then_names_each_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Daemon::start(
        &tmp.path().join("node"),
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        &[],
    )
    .await;
    let app = Sink::start().await.unwrap();
    let code = initiate(&node.data_dir, "ado-sync", "http://127.0.0.1:9/hook", &[]).await;
    let agent_dir = tmp.path().join("agent");
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &app.url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));

    let o = cli(&agent_dir, &["doctor"], &[], None).await;
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    let node_addr = node.info.listen.clone().unwrap();
    for expected in [
        "connection ado-sync -> https://".to_owned(),
        "[ ok ] dns         127.0.0.1 -> 127.0.0.1".to_owned(),
        format!("[ ok ] tcp         direct to {node_addr}"),
        "[ ok ] tls         trust pin sha256/".to_owned(),
        "presented \"CN=relay node (self-signed)\"".to_owned(),
        "[ ok ] credential  accepted for connection \"ado-sync\" on the node (active)".to_owned(),
        "[ ok ] clock       this host's clock".to_owned(),
        "[ ok ] webhook".to_owned(),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in:\n{out}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&agent_dir, &["doctor", "--json"], &[], None).await)).unwrap();
    assert_eq!(json[0]["checks"].as_array().unwrap().len(), 6);

    let out = cli_ok(&agent_dir, &["egress"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{node_addr} ")) && l.contains("HTTPS to the node")),
        "{out}"
    );
    assert!(out.contains("webhook of connection \"ado-sync\""), "{out}");

    // The webhook goes away, and the node revokes the connection: each shows as its own failure.
    drop(app);
    cli_ok(&node.data_dir, &["node", "revoke", "ado-sync"]).await;
    let o = cli(&agent_dir, &["doctor"], &[], None).await;
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("[FAIL] credential  connection \"ado-sync\" was revoked"),
        "{out}"
    );
    assert!(out.contains("[FAIL] webhook"), "{out}");
    assert!(out.contains("[ ok ] tls"), "the transport itself still works: {out}");
    assert!(stderr(&o).contains("check(s) failed"), "{}", stderr(&o));
}
