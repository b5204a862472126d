//! An agent data directory restored from an older snapshot reuses sequence numbers the node
//! already holds for other messages. The node refuses that push with 409 (storing nothing),
//! says why, notices the agent's receive position went back, and keeps serving; the agent
//! keeps its new messages, and nothing reaches the node's webhook twice under one number.
//! A node data directory restored from an older snapshot numbers its messages again from where
//! the snapshot stopped; the agent's cursor is beyond that, so the node moves what it holds
//! above the cursor and nothing new is acknowledged unseen.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::*;
use relay::sink::{Received, Sink};

/// Copies a stopped daemon's data directory, files and modes (sockets are left behind).
fn copy_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

async fn send(api: &str, bodies: &[String]) {
    let http = client();
    for b in bodies {
        let (status, json) = post(&http, api, "c", b.clone().into_bytes(), &[]).await.unwrap();
        assert_eq!(status, 202, "{json}");
    }
}

fn names(prefix: &str, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

async fn start_agent(dir: &Path) -> Daemon {
    Daemon::start(dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await
}

/// Both tests' start: a node, an agent that accepted connection "c" (not running yet), a
/// webhook sink on each side, and where a snapshot of a data directory goes.
struct Setup {
    _tmp: tempfile::TempDir,
    node_dir: PathBuf,
    agent_dir: PathBuf,
    snapshot: PathBuf,
    to_public: Arc<Mutex<Vec<Received>>>,
    to_private: Arc<Mutex<Vec<Received>>>,
    node: Daemon,
}

async fn set_up() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir, snapshot) = (
        tmp.path().join("node"),
        tmp.path().join("agent"),
        tmp.path().join("snapshot"),
    );
    let public_app = Sink::start().await.unwrap();
    let private_app = Sink::start().await.unwrap();
    let (public_url, private_url) = (public_app.url.clone(), private_app.url.clone());
    let (to_public, to_private) = (collect(public_app), collect(private_app));
    let node = start_node(&node_dir, None).await;
    let code = initiate(&node_dir, "c", &public_url, &[]).await;
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &private_url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    Setup {
        _tmp: tmp,
        node_dir,
        agent_dir,
        snapshot,
        to_public,
        to_private,
        node,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_agent_directory_is_refused_with_409_and_loses_nothing() {
    let Setup {
        _tmp,
        node_dir,
        agent_dir,
        snapshot,
        to_public,
        to_private,
        node,
    } = set_up().await;

    // Until the snapshot: up-1..5 and down-1..2, all delivered and acknowledged.
    let mut agent = start_agent(&agent_dir).await;
    send(&agent.api(), &names("up", 1..=5)).await;
    send(&node.api(), &names("down", 1..=2)).await;
    let settled = |up: usize, down: usize| {
        let (to_public, to_private, node_dir, agent_dir) = (
            to_public.clone(),
            to_private.clone(),
            node_dir.clone(),
            agent_dir.clone(),
        );
        async move {
            let n = statuses(&node_dir, true).await;
            let a = statuses(&agent_dir, false).await;
            let ok = bodies(&to_public).contains(&format!("up-{up}"))
                && bodies(&to_private).contains(&format!("down-{down}"))
                && n[0].outbound.depth == 0
                && a[0].outbound.depth == 0;
            ok.then_some(())
        }
    };
    wait_for("the first messages both ways", || settled(5, 2)).await;
    assert!(agent.terminate().await.success());
    copy_dir(&agent_dir, &snapshot);

    // After the snapshot: up-6..10 and down-3..4, also delivered and acknowledged.
    let mut agent = start_agent(&agent_dir).await;
    send(&agent.api(), &names("up", 6..=10)).await;
    send(&node.api(), &names("down", 3..=4)).await;
    wait_for("the later messages both ways", || settled(10, 4)).await;
    assert!(agent.terminate().await.success());
    drop(agent);

    // The operator restores the older snapshot and the agent starts again from it.
    std::fs::remove_dir_all(&agent_dir).unwrap();
    copy_dir(&snapshot, &agent_dir);
    let agent = start_agent(&agent_dir).await;
    let fresh = names("new", 1..=3);
    send(&agent.api(), &fresh).await;
    send(&node.api(), &names("down", 5..=5)).await;

    // The node keeps serving what it holds despite the agent's gap.
    wait_for("down-5 at the private webhook", || async {
        bodies(&to_private).contains(&"down-5".to_owned()).then_some(())
    })
    .await;
    // The node refused the push that reuses 6..8 and says why, on the node and at the agent.
    let agent_error = wait_for("the agent to see the node's refusal", || async {
        let a = statuses(&agent_dir, false).await;
        // Sending is held; the receive loop may have written a later last error meanwhile.
        a[0].holds.iter().find(|h| h.contains("409")).cloned()
    })
    .await;
    assert!(
        agent_error.contains("sequence conflict") && agent_error.contains("restored from a backup or copied"),
        "{agent_error}"
    );
    let a = statuses(&agent_dir, false).await;
    assert_eq!(a[0].outbound.depth, 3, "the agent still holds its new messages");
    let n = statuses(&node_dir, true).await;
    assert_eq!(n[0].inbound.last_seq, 10, "the node stored nothing of the refused push");
    let node_error = n[0].last_error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
    assert!(
        node_error.contains("restored from a backup or copied"),
        "the node's last error says why: {node_error}"
    );
    let log = node.log();
    assert!(log.contains("an agent reused sequence numbers"), "{log}");
    assert!(log.contains("the agent's receive position went back"), "{log}");

    // Nothing new reached the node's webhook, and no number ever carried two messages.
    let seen = to_public.lock().unwrap();
    let mut by_seq: HashMap<String, String> = HashMap::new();
    for r in seen.iter().filter(|r| r.answered == 200) {
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert!(!body.starts_with("new-"), "{body} was delivered under a reused number");
        let seq = r.header("relay-seq").unwrap().to_owned();
        let first = by_seq.entry(seq.clone()).or_insert_with(|| body.clone());
        assert_eq!(first, &body, "sequence {seq} delivered with two payloads");
    }
    assert_eq!(by_seq.len(), 10);
    drop(agent);
}

async fn start_node_at(dir: &Path, listen: &str, api: &str) -> Daemon {
    Daemon::start(dir, &["node", "run", "--listen", listen, "--api-listen", api], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_node_directory_numbers_new_messages_above_the_agents_cursor() {
    let Setup {
        _tmp,
        node_dir,
        agent_dir,
        snapshot,
        to_private,
        mut node,
        ..
    } = set_up().await;
    let (listen, api) = (node.info.listen.clone().unwrap(), node.info.api.clone().unwrap());
    let agent = start_agent(&agent_dir).await;
    let delivered = |want: Vec<String>| {
        let to_private = to_private.clone();
        async move {
            let got = bodies(&to_private);
            want.iter().all(|w| got.contains(w)).then_some(())
        }
    };

    // down-1..3 before the snapshot, down-4..6 after it: the agent's cursor reaches 6.
    send(&node.api(), &names("down", 1..=3)).await;
    wait_for("down-1..3 at the private webhook", || delivered(names("down", 1..=3))).await;
    assert!(node.terminate().await.success());
    copy_dir(&node_dir, &snapshot);
    let mut node = start_node_at(&node_dir, &listen, &api).await;
    send(&node.api(), &names("down", 4..=6)).await;
    wait_for("down-4..6 at the private webhook", || delivered(names("down", 4..=6))).await;
    wait_for("the node to see them acknowledged", || {
        let node_dir = node_dir.clone();
        async move { (statuses(&node_dir, true).await[0].outbound.depth == 0).then_some(()) }
    })
    .await;
    assert!(node.terminate().await.success());
    drop(node);

    // The snapshot comes back: the node numbers its next messages 4, 5, 6 again, which the
    // agent's cursor already covers (the agent is still backing off when they arrive).
    std::fs::remove_dir_all(&node_dir).unwrap();
    copy_dir(&snapshot, &node_dir);
    let node = start_node_at(&node_dir, &listen, &api).await;
    send(&node.api(), &names("new", 1..=3)).await;
    wait_for("new-1..3 at the private webhook", || delivered(names("new", 1..=3))).await;
    let seqs: Vec<u64> = to_private
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.answered == 200 && r.body.starts_with(b"new-"))
        .map(|r| r.header("relay-seq").unwrap().parse().unwrap())
        .collect();
    assert!(
        seqs.iter().all(|&s| s > 6),
        "numbered above the agent's cursor: {seqs:?}"
    );
    let n = statuses(&node_dir, true).await;
    let error = n[0].last_error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
    assert!(error.contains("restored from a backup"), "{error}");
    assert!(
        node.log().contains("renumbered the queue for the agent"),
        "{}",
        node.log()
    );
    drop(agent);
}
