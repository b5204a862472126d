//! `kill -9` at many instants while 1,000 payloads stream each way, then restart each time:
//! every payload is delivered, first deliveries in order, and any repeat carries the same
//! `Idempotency-Key`. The agent is the victim in one test, the node in the other; the kill
//! points are chosen by the progress observed (messages accepted and delivered), not by time.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use relay::sink::{Received, Sink};

const N: usize = 1000;
/// Kills per test.
const KILLS: usize = 10;

#[derive(Clone, Copy, PartialEq)]
enum Victim {
    Agent,
    Node,
}

fn distinct(seen: &Mutex<Vec<Received>>) -> usize {
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.header("relay-message-id").unwrap().to_owned())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Submits `N` payloads `{prefix}-{i}` in order; each is retried (same idempotency key) until
/// the API accepts it, as a well-behaved client does while the daemon restarts.
fn submit(api: String, prefix: &'static str) -> (tokio::task::JoinHandle<()>, Arc<std::sync::atomic::AtomicUsize>) {
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = done.clone();
    let task = tokio::spawn(async move {
        let http = client();
        for i in 0..N {
            let key = format!("{prefix}-{i}");
            let started = std::time::Instant::now();
            loop {
                assert!(started.elapsed() < DEADLINE * 2, "{key} never accepted");
                match post(&http, &api, "c", key.clone().into_bytes(), &[("idempotency-key", &key)]).await {
                    Ok((202, _)) => break,
                    // Down or restarting: a real client backs off and retries.
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            d.store(i + 1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (task, done)
}

/// Every payload arrived; first arrivals are in submission order with increasing sequence
/// numbers; every repeat has the same message id as the first.
fn check(seen: &Mutex<Vec<Received>>, prefix: &str) -> usize {
    let seen = seen.lock().unwrap();
    let mut id_of_body: HashMap<String, String> = HashMap::new();
    let mut order = Vec::new();
    let mut repeats = 0;
    for r in seen.iter().filter(|r| r.answered == 200) {
        let body = String::from_utf8(r.body.clone()).unwrap();
        let id = r.header("relay-message-id").unwrap().to_owned();
        assert_eq!(r.header("idempotency-key"), Some(id.as_str()));
        match id_of_body.get(&body) {
            Some(first) => {
                assert_eq!(first, &id, "a repeat of {body} carries another id");
                repeats += 1;
            }
            None => {
                id_of_body.insert(body.clone(), id);
                let seq: u64 = r.header("relay-seq").unwrap().parse().unwrap();
                order.push((body, seq));
            }
        }
    }
    assert_eq!(order.len(), N, "{prefix}: {} of {N} delivered", order.len());
    for (i, (body, seq)) in order.iter().enumerate() {
        assert_eq!(body, &format!("{prefix}-{i}"), "{prefix}: out of order at {i}");
        assert_eq!(*seq, i as u64 + 1, "{prefix}: sequence numbers follow submission order");
    }
    repeats
}

/// A node listening (for agents) and serving its API on the addresses given, with `env`.
async fn start_node_at(dir: &std::path::Path, listen: &str, api: &str, env: &[(&str, &str)]) -> Daemon {
    Daemon::start(dir, &["node", "run", "--listen", listen, "--api-listen", api], env).await
}

/// Streams both ways and kills `victim` at many points; the node runs with `node_env` (its
/// store's settings).
async fn crash_and_recover(victim: Victim, node_env: &[(&str, &str)]) {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let public_app = Sink::start().await.unwrap();
    let private_app = Sink::start().await.unwrap();
    let (public_url, private_url) = (public_app.url.clone(), private_app.url.clone());
    let (to_public, to_private) = (collect(public_app), collect(private_app));

    let mut node = start_node_at(&node_dir, "127.0.0.1:0", "127.0.0.1:0", node_env).await;
    let code = initiate(&node_dir, "c", &public_url, &[]).await;
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &private_url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mut agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    let (node_listen, node_api) = (node.info.listen.clone().unwrap(), node.info.api.clone().unwrap());
    let agent_intake = agent.info.api.clone().unwrap();

    let (down_task, down_done) = submit(node.api(), "down");
    let (up_task, up_done) = submit(agent.api(), "up");

    // Progress counts every acceptance and every first delivery, both ways (4 N in all). The
    // k-th kill waits for the k-th share of it, so the kills fall while submitting, while
    // delivering and in between, wherever the run happens to be.
    let progress = || {
        down_done.load(std::sync::atomic::Ordering::SeqCst)
            + up_done.load(std::sync::atomic::Ordering::SeqCst)
            + distinct(&to_private)
            + distinct(&to_public)
    };
    for k in 0..KILLS {
        let threshold = (k + 1) * 4 * N / (KILLS + 1);
        wait_for(&format!("progress {threshold} before kill {}", k + 1), || async {
            (progress() >= threshold).then_some(())
        })
        .await;
        match victim {
            Victim::Agent => {
                agent.kill9();
                agent = Daemon::start(&agent_dir, &["run", "--intake-listen", &agent_intake], &[]).await;
            }
            Victim::Node => {
                node.kill9();
                node = start_node_at(&node_dir, &node_listen, &node_api, node_env).await;
            }
        }
    }
    down_task.await.unwrap();
    up_task.await.unwrap();
    let all_delivered = async {
        while distinct(&to_private) < N || distinct(&to_public) < N {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(DEADLINE, all_delivered).await.is_err() {
        // What a stall looks like from both ends, for the one who reads the failure.
        let tail = |log: String| {
            log.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "not every payload delivered: {} of {N} to the private side, {} of {N} to the public side\n\
             status at the node: {:?}\nnode log:\n{}\nagent log:\n{}",
            distinct(&to_private),
            distinct(&to_public),
            statuses(&node_dir, true)
                .await
                .first()
                .map(|s| (s.outbound.depth, s.inbound.depth)),
            tail(node.log()),
            tail(agent.log())
        );
    }
    let repeats = check(&to_private, "down") + check(&to_public, "up");
    eprintln!("all {N} payloads delivered each way across {KILLS} kills; {repeats} webhook repeats (same ids)");
    wait_for("the node's queues to drain", || async {
        let s = statuses(&node_dir, true).await;
        (s[0].outbound.depth == 0 && s[0].inbound.depth == 0).then_some(())
    })
    .await;
    drop(agent);
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_at_many_instants_loses_nothing() {
    crash_and_recover(Victim::Agent, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_at_many_instants_loses_nothing() {
    crash_and_recover(Victim::Node, &[]).await;
}

/// The same with the node's state in PostgreSQL: every 202 and every push answer follows a
/// commit, so `kill -9` of the node loses nothing there either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_on_postgres_killed_at_many_instants_loses_nothing() {
    let Some((_cluster, env)) = postgres_node("node_on_postgres_killed_at_many_instants_loses_nothing").await else {
        return;
    };
    crash_and_recover(Victim::Node, &common::borrowed(&env)).await;
}

/// A throwaway cluster with a migrated database, and the settings of a node that keeps its
/// state there; `None` after SKIPPED.
async fn postgres_node(test: &str) -> Option<(common::postgres::Cluster, Vec<(String, String)>)> {
    let cluster = common::postgres::Cluster::start(test)?;
    let url = cluster.database("relay").await;
    let env = vec![
        ("RELAY_STORE__KIND".to_owned(), "postgres".to_owned()),
        ("RELAY_STORE__URL".to_owned(), url),
    ];
    let scratch = tempfile::tempdir().unwrap();
    let o = cli(scratch.path(), &["node", "migrate"], &common::borrowed(&env), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    Some((cluster, env))
}

/// A backlog held at one end arrives at the other in full batches (stored there several
/// messages to a record, with one record of their ids per batch) and is delivered from the
/// receiver's read-ahead; `kill -9` the receiver while it takes and delivers them, again and
/// again: every payload arrives, first arrivals in order, repeats with the same id, and no
/// restart mistakes a batch offered again for a conflict. The node's backlog waits while its
/// connection is deactivated; the agent's while the node is down.
async fn backlog_receiver_killed(victim: Victim, node_env: &[(&str, &str)]) {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let public_app = Sink::start().await.unwrap();
    let private_app = Sink::start().await.unwrap();
    let (public_url, private_url) = (public_app.url.clone(), private_app.url.clone());
    let (to_public, to_private) = (collect(public_app), collect(private_app));
    let mut node = start_node_at(&node_dir, "127.0.0.1:0", "127.0.0.1:0", node_env).await;
    let (listen, api) = (node.info.listen.clone().unwrap(), node.info.api.clone().unwrap());
    let code = initiate(&node_dir, "c", &public_url, &[]).await;
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &private_url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let run = |intake: &str| ["run".to_owned(), "--intake-listen".into(), intake.to_owned()];
    let start_agent = async |intake: &str| {
        let args = run(intake);
        Daemon::start(&agent_dir, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await
    };
    let (mut agent, seen, prefix) = match victim {
        Victim::Agent => {
            assert!(cli_ok(&node_dir, &["node", "deactivate", "c"])
                .await
                .contains("deactivated"));
            let (task, _) = submit(node.api(), "down");
            task.await.unwrap();
            let agent = start_agent("127.0.0.1:0").await;
            cli_ok(&node_dir, &["node", "activate", "c"]).await;
            (agent, to_private, "down")
        }
        Victim::Node => {
            let agent = start_agent("127.0.0.1:0").await;
            node.kill9();
            let (task, _) = submit(agent.api(), "up");
            task.await.unwrap();
            node = start_node_at(&node_dir, &listen, &api, node_env).await;
            (agent, to_public, "up")
        }
    };
    let intake = agent.info.api.clone().unwrap();
    // The first kill falls as soon as anything arrived (the receiver is still taking
    // batches), the others while its read-ahead is being delivered.
    for k in 0..KILLS {
        let threshold = 1 + k * N / (KILLS + 1);
        wait_for(&format!("{threshold} delivered before kill {}", k + 1), || async {
            (distinct(&seen) >= threshold).then_some(())
        })
        .await;
        match victim {
            Victim::Agent => {
                agent.kill9();
                agent = start_agent(&intake).await;
            }
            Victim::Node => {
                node.kill9();
                node = start_node_at(&node_dir, &listen, &api, node_env).await;
            }
        }
    }
    wait_for("every payload delivered", || async {
        (distinct(&seen) == N).then_some(())
    })
    .await;
    let repeats = check(&seen, prefix);
    eprintln!(
        "all {N} payloads of a backlog delivered across {KILLS} kills of the receiver; {repeats} repeats (same ids)"
    );
    let log = match victim {
        Victim::Agent => agent.log(),
        Victim::Node => node.log(),
    };
    assert!(!log.contains("sequence conflict"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_taking_and_delivering_a_backlog_loses_nothing() {
    backlog_receiver_killed(Victim::Agent, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_while_taking_and_delivering_a_backlog_loses_nothing() {
    backlog_receiver_killed(Victim::Node, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_on_postgres_killed_while_taking_and_delivering_a_backlog_loses_nothing() {
    let test = "node_on_postgres_killed_while_taking_and_delivering_a_backlog_loses_nothing";
    let Some((_cluster, env)) = postgres_node(test).await else {
        return;
    };
    backlog_receiver_killed(Victim::Node, &common::borrowed(&env)).await;
}
