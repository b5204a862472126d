//! The node with its state in PostgreSQL, as an operator meets it: `relay node migrate` says
//! what it did, `relay node run` refuses a database at another schema version (naming both)
//! with the configuration exit code, `relay doctor` checks the database, the password is
//! never printed, and a node restarted on the same database carries on: its connections,
//! credentials and queues are there, the agent needs no new invitation.

mod common;

use common::postgres::Cluster;
use common::*;
use relay::store::postgres::SCHEMA_VERSION;

/// A node data directory's settings for the database at `url`, the URL in a mode-600 file.
fn node_env(dir: &std::path::Path, url: &str) -> Vec<(String, String)> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("database-url");
    std::fs::write(&file, format!("{url}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    vec![
        ("RELAY_STORE__KIND".into(), "postgres".into()),
        ("RELAY_STORE__URL_FILE".into(), file.display().to_string()),
    ]
}

/// `relay node run` in `dir` on `listen` and `api`, serving the key that the node of
/// `key_dir` made (as replicas, and a node moved to another store, must).
async fn start_with_key_of(
    dir: &std::path::Path,
    key_dir: &std::path::Path,
    (listen, api): (&str, &str),
    env: &[(&str, &str)],
) -> Daemon {
    let tls = key_dir.join("tls");
    let (cert, key) = (
        tls.join("node.crt").display().to_string(),
        tls.join("node.key").display().to_string(),
    );
    let args = [
        "node",
        "run",
        "--listen",
        listen,
        "--api-listen",
        api,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    Daemon::start(dir, &args, env).await
}

fn output(o: &std::process::Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_run_and_doctor_say_what_they_find() {
    let Some(cluster) = Cluster::start("migrate_run_and_doctor_say_what_they_find") else {
        return;
    };
    let url = cluster.database("relay").await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let env = node_env(&dir, &url);
    let env = borrowed(&env);
    // Not migrated yet: the node refuses to start, and says what to run.
    let o = cli(
        &dir,
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        &env,
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(78), "{}", output(&o));
    assert!(
        output(&o).contains("no relay schema") && output(&o).contains("relay node migrate"),
        "{}",
        output(&o)
    );
    // Doctor names the failing step.
    let o = cli(&dir, &["doctor"], &env, None).await;
    assert!(!o.status.success());
    let text = output(&o);
    assert!(
        text.contains("[ ok ] database") && text.contains("[FAIL] schema"),
        "{text}"
    );
    // Migrate: made, then nothing to do.
    let o = cli(&dir, &["node", "migrate"], &env, None).await;
    assert!(o.status.success(), "{}", output(&o));
    assert!(
        stdout(&o).contains(&format!("created the schema at version {SCHEMA_VERSION}")),
        "{}",
        output(&o)
    );
    let o = cli(&dir, &["node", "migrate"], &env, None).await;
    assert!(stdout(&o).contains("nothing to do"), "{}", output(&o));
    assert!(!output(&o).contains(&cluster.password), "the password is never printed");
    let o = cli(&dir, &["doctor"], &env, None).await;
    let text = output(&o);
    assert!(o.status.success(), "{text}");
    for step in ["database", "schema", "write"] {
        assert!(text.contains(&format!("[ ok ] {step}")), "{text}");
    }
    assert!(text.contains("postgres://relay:***@127.0.0.1"), "{text}");
    assert!(!text.contains(&cluster.password), "{text}");
    // A schema from a later build: refused, both versions named, nothing touched.
    let newer = SCHEMA_VERSION + 1;
    cluster
        .sql("relay", &format!("UPDATE relay_schema SET version = {newer}"))
        .await;
    let o = cli(
        &dir,
        &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        &env,
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(78), "{}", output(&o));
    let text = output(&o);
    assert!(
        text.contains(&format!("version {newer}")) && text.contains(&format!("version {SCHEMA_VERSION}")),
        "{text}"
    );
    let o = cli(&dir, &["node", "migrate"], &env, None).await;
    assert_eq!(o.status.code(), Some(78), "{}", output(&o));
    assert!(output(&o).contains("nothing was changed"), "{}", output(&o));
    // A URL file others can read is refused before anything connects.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("database-url"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = cli(&dir, &["node", "migrate"], &env, None).await;
    assert_eq!(o.status.code(), Some(78), "{}", output(&o));
    assert!(
        output(&o).contains("store.url_file") && output(&o).contains("chmod 600"),
        "{}",
        output(&o)
    );
}

/// Traffic both ways with the node on PostgreSQL; the node stopped and started again on a
/// fresh data directory (its state is in the database; only its certificate and key are
/// carried over, as replicas share them): the agent carries on with its credential, nothing
/// queued meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_postgres_keeps_its_connections_in_the_database() {
    let Some(cluster) = Cluster::start("a_node_on_postgres_keeps_its_connections_in_the_database") else {
        return;
    };
    let url = cluster.database("relay").await;
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let env = node_env(&node_dir, &url);
    let env = borrowed(&env);
    assert!(cli(&node_dir, &["node", "migrate"], &env, None).await.status.success());
    let public_app = relay::sink::Sink::start().await.unwrap();
    let private_app = relay::sink::Sink::start().await.unwrap();
    let (public_url, private_url) = (public_app.url.clone(), private_app.url.clone());
    let (to_public, to_private) = (collect(public_app), collect(private_app));
    let args = ["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
    let mut node = Daemon::start(&node_dir, &args, &env).await;
    let code = initiate(&node_dir, "c", &public_url, &[]).await;
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &private_url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    let http = client();
    for i in 0..20 {
        let (status, _) = post(&http, &node.api(), "c", format!("down-{i}").into_bytes(), &[])
            .await
            .unwrap();
        assert_eq!(status, 202);
        let (status, _) = post(&http, &agent.api(), "c", format!("up-{i}").into_bytes(), &[])
            .await
            .unwrap();
        assert_eq!(status, 202);
    }
    wait_for("20 each way", || async {
        (bodies(&to_private).len() >= 20 && bodies(&to_public).len() >= 20).then_some(())
    })
    .await;
    assert_eq!(
        bodies(&to_private),
        (0..20).map(|i| format!("down-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        bodies(&to_public),
        (0..20).map(|i| format!("up-{i}")).collect::<Vec<_>>()
    );
    // The node goes; payloads wait at the agent; a node starts on another data directory
    // with the same certificate and key, and the same database.
    let (listen, api) = (node.info.listen.clone().unwrap(), node.info.api.clone().unwrap());
    node.terminate().await;
    for i in 20..30 {
        let (status, _) = post(&http, &agent.api(), "c", format!("up-{i}").into_bytes(), &[])
            .await
            .unwrap();
        assert_eq!(status, 202);
    }
    let other_dir = tmp.path().join("node-2");
    std::fs::create_dir_all(&other_dir).unwrap();
    assert!(
        node_dir.join("tls").join("node.key").exists(),
        "the node's generated identity is in its data directory"
    );
    let _node = start_with_key_of(&other_dir, &node_dir, (&listen, &api), &env).await;
    wait_for("the payloads queued while the node was away", || async {
        (bodies(&to_public).len() >= 30).then_some(())
    })
    .await;
    assert_eq!(
        bodies(&to_public),
        (0..30).map(|i| format!("up-{i}")).collect::<Vec<_>>()
    );
    let list = statuses(&other_dir, true).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, "active");
    assert_eq!(list[0].inbound.last_seq, 30);
    drop(agent);
}

/// A node on sled moved into PostgreSQL: `relay node migrate --from-sled DIR` takes its
/// connections, credentials, queued messages (both ways), dead letters and idempotency keys;
/// a node started on the database with the old key serves the same agent, which needs no new
/// invitation, and delivers what waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_node_moves_into_postgres_and_its_agent_carries_on() {
    let Some(cluster) = Cluster::start("a_sled_node_moves_into_postgres_and_its_agent_carries_on") else {
        return;
    };
    let url = cluster.database("relay").await;
    let tmp = tempfile::tempdir().unwrap();
    let (sled_dir, pg_dir, agent_dir) = (
        tmp.path().join("node"),
        tmp.path().join("node-pg"),
        tmp.path().join("agent"),
    );
    let public_app = relay::sink::Sink::start().await.unwrap();
    let private_app = relay::sink::Sink::start().await.unwrap();
    let (public_url, private_url) = (public_app.url.clone(), private_app.url.clone());
    let (to_public, to_private) = (collect(public_app), collect(private_app));
    let mut node = start_node(&sled_dir, None).await;
    let code = initiate(&sled_dir, "c", &public_url, &[]).await;
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &private_url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mut agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    let http = client();
    let (status, _) = post(
        &http,
        &node.api(),
        "c",
        b"down-0".to_vec(),
        &[("idempotency-key", "k0")],
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
    wait_for("the first payload", || async {
        (!bodies(&to_private).is_empty()).then_some(())
    })
    .await;
    // The agent goes; payloads wait at the node, one of them with a key a client may retry.
    agent.terminate().await;
    for i in 1..=5 {
        let key = format!("k{i}");
        let (status, _) = post(
            &http,
            &node.api(),
            "c",
            format!("down-{i}").into_bytes(),
            &[("idempotency-key", &key)],
        )
        .await
        .unwrap();
        assert_eq!(status, 202);
    }
    let (listen, api) = (node.info.listen.clone().unwrap(), node.info.api.clone().unwrap());
    node.terminate().await;
    let env_owned = node_env(&pg_dir, &url);
    let env = borrowed(&env_owned);
    let sled = sled_dir.display().to_string();
    let o = cli(&pg_dir, &["node", "migrate", "--from-sled", &sled], &env, None).await;
    assert!(o.status.success(), "{}", output(&o));
    assert!(
        stdout(&o).contains("moved 1 connection(s), 5 queued message(s), 0 dead letter(s)"),
        "{}",
        output(&o)
    );
    // Once moved, it is not moved again over it.
    let o = cli(&pg_dir, &["node", "migrate", "--from-sled", &sled], &env, None).await;
    assert!(
        !o.status.success() && output(&o).contains("already holds 1 connection"),
        "{}",
        output(&o)
    );
    // A node on the database, with the old key and address.
    let node = start_with_key_of(&pg_dir, &sled_dir, (&listen, &api), &env).await;
    // A retry of a payload accepted before the move is recognised.
    let (status, body) = post(
        &http,
        &node.api(),
        "c",
        b"down-3".to_vec(),
        &[("idempotency-key", "k3")],
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
    assert_eq!(body["seq"], 4, "{body}");
    let _agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    wait_for("what waited at the node", || async {
        (bodies(&to_private).len() >= 6).then_some(())
    })
    .await;
    assert_eq!(
        bodies(&to_private),
        (0..=5).map(|i| format!("down-{i}")).collect::<Vec<_>>()
    );
    let (status, _) = post(&http, &_agent.api(), "c", b"up-0".to_vec(), &[]).await.unwrap();
    assert_eq!(status, 202);
    wait_for("a payload the other way", || async {
        (!bodies(&to_public).is_empty()).then_some(())
    })
    .await;
    assert_eq!(bodies(&to_public), vec!["up-0".to_owned()]);
}
