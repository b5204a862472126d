//! Two node replicas on one PostgreSQL database behind a TCP load balancer (a passthrough
//! written here, as an operator's HAProxy in TCP mode would be), one agent with 50
//! connections streaming both ways, and `kill -9` of the replica that holds the most leases,
//! ten times, with the database restarted (`pg_ctl restart -m immediate`) once among them: nothing is lost, first deliveries arrive in order per connection, repeats only
//! with their first idempotency key; the time the other replica takes to hold the victim's
//! leases is measured and printed (a figure, not a pass mark: the benchmark holds the target). Also: 50 redeems of one invitation at once, spread over
//! both replicas, of which exactly one succeeds.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::Cluster;
use common::*;
use relay::sink::{Received, Sink};

const CONNECTIONS: usize = 50;
/// Payloads per connection and direction.
const EACH: usize = 20;
const KILLS: usize = 10;
/// Short leases, so that ten takeovers fit in a test.
const LEASE_TTL: &str = "3s";

/// A TCP passthrough on a loopback port: each connection goes to the first backend, in turn
/// from the last one used, that accepts it.
struct Balancer {
    port: u16,
    backends: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    async fn start() -> Balancer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backends: Arc<Mutex<Vec<String>>> = Arc::default();
        let list = backends.clone();
        tokio::spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let (list, next) = (list.clone(), next.clone());
                tokio::spawn(async move {
                    let candidates = list.lock().unwrap().clone();
                    let start = next.fetch_add(1, Ordering::Relaxed);
                    for i in 0..candidates.len() {
                        let addr = &candidates[(start + i) % candidates.len()];
                        let connect = tokio::net::TcpStream::connect(addr.as_str());
                        if let Ok(Ok(mut outbound)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer { port, backends }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

/// One replica: its data directory, addresses and settings.
struct Replica {
    dir: PathBuf,
    listen: String,
    api: String,
    daemon: Option<Daemon>,
}

async fn start_replica(
    dir: &Path,
    listen: &str,
    api: &str,
    public_url: &str,
    env: &[(&str, &str)],
    tls: Option<(&Path, &Path)>,
) -> Daemon {
    let mut args = vec![
        "node",
        "run",
        "--listen",
        listen,
        "--api-listen",
        api,
        "--public-url",
        public_url,
    ];
    let paths = tls.map(|(c, k)| (c.display().to_string(), k.display().to_string()));
    if let Some((c, k)) = &paths {
        args.extend(["--tls-cert", c.as_str(), "--tls-key", k.as_str()]);
    }
    Daemon::start(dir, &args, env).await
}

/// Two replicas in `root` (`node-a` makes the key, `node-b` serves the same), public behind
/// `balancer`, which sends to both.
async fn start_two(root: &Path, balancer: &Balancer, env: &[(&str, &str)]) -> [(PathBuf, Daemon); 2] {
    let dir_a = root.join("node-a");
    let a = start_replica(&dir_a, "127.0.0.1:0", "127.0.0.1:0", &balancer.url(), env, None).await;
    let (cert, key) = (dir_a.join("tls").join("node.crt"), dir_a.join("tls").join("node.key"));
    let dir_b = root.join("node-b");
    let b = start_replica(
        &dir_b,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &balancer.url(),
        env,
        Some((&cert, &key)),
    )
    .await;
    *balancer.backends.lock().unwrap() = [&a, &b].iter().map(|d| d.info.listen.clone().unwrap()).collect();
    [(dir_a, a), (dir_b, b)]
}

/// Submits `EACH` payloads `{prefix}-{conn}-{i}` on every connection, in order per connection,
/// each retried with its idempotency key until accepted; `apis` are tried in turn.
fn submit(apis: Vec<String>, prefix: &'static str) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let task = tokio::spawn(async move {
        let http = client();
        let mut turn = 0usize;
        for i in 0..EACH {
            for c in 0..CONNECTIONS {
                let key = format!("{prefix}-{c}-{i}");
                let started = Instant::now();
                loop {
                    assert!(started.elapsed() < DEADLINE * 2, "{key} never accepted");
                    turn += 1;
                    let api = &apis[turn % apis.len()];
                    let conn = format!("c{c}");
                    match post(
                        &http,
                        api,
                        &conn,
                        key.clone().into_bytes(),
                        &[("idempotency-key", &key)],
                    )
                    .await
                    {
                        Ok((202, _)) => break,
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                d.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (task, done)
}

fn distinct(seen: &Mutex<Vec<Received>>) -> usize {
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|r| r.answered == 200)
        .filter_map(|r| r.header("relay-message-id").map(str::to_owned))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Every payload arrived; per connection, first arrivals in submission order; every repeat
/// with its first id. Returns the repeats.
fn check(seen: &Mutex<Vec<Received>>, prefix: &str) -> usize {
    let seen = seen.lock().unwrap();
    let mut id_of_body: HashMap<String, String> = HashMap::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
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
                let conn = r.header("relay-connection").unwrap().to_owned();
                order.entry(conn).or_default().push(body);
            }
        }
    }
    assert_eq!(id_of_body.len(), CONNECTIONS * EACH, "{prefix}: delivered");
    for (conn, bodies) in order {
        let c = conn.trim_start_matches('c');
        let expected: Vec<String> = (0..EACH).map(|i| format!("{prefix}-{c}-{i}")).collect();
        assert_eq!(bodies, expected, "{prefix}: {conn} in order");
    }
    repeats
}

/// Leases in force per owner's replica id (the part before `/`).
async fn holders(cluster: &Cluster) -> HashMap<String, usize> {
    let rows = cluster
        .sql(
            "relay",
            "SELECT split_part(owner, '/', 1), count(*) FROM relay_leases WHERE expires_at > now() GROUP BY 1",
        )
        .await;
    rows.iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as usize))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_lose_nothing_when_the_lease_holder_is_killed() {
    let Some(cluster) = Cluster::start("two_replicas_lose_nothing_when_the_lease_holder_is_killed") else {
        return;
    };
    let url = cluster.database("relay").await;
    let env_owned = vec![
        ("RELAY_STORE__KIND".to_owned(), "postgres".to_owned()),
        ("RELAY_STORE__URL".to_owned(), url),
        ("RELAY_STORE__LEASE_TTL".to_owned(), LEASE_TTL.to_owned()),
        // Behind a balancer every connection comes from its address.
        ("RELAY_NODE__MAX_UNAUTHENTICATED_PER_PEER".to_owned(), "200".to_owned()),
    ];
    let env = borrowed(&env_owned);
    let tmp = tempfile::tempdir().unwrap();
    assert!(cli(tmp.path(), &["node", "migrate"], &env, None).await.status.success());
    let balancer = Balancer::start().await;
    let public_app = Sink::start().await.unwrap();
    let private_app = Sink::start().await.unwrap();
    let (public_url, private_url) = (public_app.url.clone(), private_app.url.clone());
    let (to_public, to_private) = (collect(public_app), collect(private_app));

    // Replica A makes the key; B serves the same one.
    let (cert, key) = (
        tmp.path().join("node-a/tls/node.crt"),
        tmp.path().join("node-a/tls/node.key"),
    );
    let mut replicas: Vec<Replica> = start_two(tmp.path(), &balancer, &env)
        .await
        .into_iter()
        .map(|(dir, d)| Replica {
            dir,
            listen: d.info.listen.clone().unwrap(),
            api: d.info.api.clone().unwrap(),
            daemon: Some(d),
        })
        .collect();

    // 50 connections, initiated on either replica, all accepted by one agent.
    let agent_dir = tmp.path().join("agent");
    for c in 0..CONNECTIONS {
        let code = initiate(&replicas[c % 2].dir, &format!("c{c}"), &public_url, &[]).await;
        let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &private_url], &[], None).await;
        assert!(o.status.success(), "accept c{c}: {}", stderr(&o));
    }
    let agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    wait_for("both replicas to hold leases", || async {
        let h = holders(&cluster).await;
        (h.len() == 2 && h.values().sum::<usize>() == CONNECTIONS).then_some(())
    })
    .await;

    let apis: Vec<String> = replicas.iter().map(|r| format!("http://{}", r.api)).collect();
    let (down_task, down_done) = submit(apis, "down");
    let (up_task, up_done) = submit(vec![agent.api()], "up");
    let total = CONNECTIONS * EACH;
    let progress = || {
        down_done.load(Ordering::SeqCst) + up_done.load(Ordering::SeqCst) + distinct(&to_private) + distinct(&to_public)
    };
    let mut takeovers = Vec::new();
    for k in 0..KILLS {
        let threshold = (k + 1) * 4 * total / (KILLS + 2);
        wait_for(&format!("progress {threshold} before kill {}", k + 1), || async {
            (progress() >= threshold).then_some(())
        })
        .await;
        if k == KILLS / 2 {
            // Once, the database instead: restarted without a clean shutdown mid-stream.
            // Both replicas reconnect; what was acknowledged stays.
            cluster.restart_immediate();
            continue;
        }
        // The replica holding the most leases.
        let held = holders(&cluster).await;
        let ids: Vec<String> = replicas
            .iter()
            .map(|r| {
                std::fs::read_to_string(r.dir.join("replica-id"))
                    .unwrap()
                    .trim()
                    .to_owned()
            })
            .collect();
        let victim = (0..2).max_by_key(|&i| held.get(&ids[i]).copied().unwrap_or(0)).unwrap();
        let survivor = 1 - victim;
        replicas[victim].daemon.as_mut().unwrap().kill9();
        let killed = Instant::now();
        wait_for("the survivor to hold every lease", || async {
            let h = holders(&cluster).await;
            (h.get(&ids[survivor]).copied() == Some(CONNECTIONS)).then_some(())
        })
        .await;
        takeovers.push(killed.elapsed());
        let r = &replicas[victim];
        let tls = (victim == 1).then_some((cert.as_path(), key.as_path()));
        let d = start_replica(&r.dir, &r.listen, &r.api, &balancer.url(), &env, tls).await;
        replicas[victim].daemon = Some(d);
    }
    down_task.await.unwrap();
    up_task.await.unwrap();
    wait_for("every payload delivered both ways", || async {
        (distinct(&to_private) >= total && distinct(&to_public) >= total).then_some(())
    })
    .await;
    let repeats = check(&to_private, "down") + check(&to_public, "up");
    takeovers.sort();
    eprintln!(
        "{total} payloads each way over {CONNECTIONS} connections and two replicas, {} kills of the lease holder and a database restart; \
         {repeats} webhook repeats (same ids); takeover with store.lease_ttl = {LEASE_TTL}: median {:?}, max {:?}",
        takeovers.len(),
        takeovers[takeovers.len() / 2],
        takeovers.last().unwrap()
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_redeems_of_one_invitation_over_two_replicas_make_one_connection() {
    let Some(cluster) = Cluster::start("fifty_redeems_of_one_invitation_over_two_replicas_make_one_connection") else {
        return;
    };
    let url = cluster.database("relay").await;
    let env_owned = vec![
        ("RELAY_STORE__KIND".to_owned(), "postgres".to_owned()),
        ("RELAY_STORE__URL".to_owned(), url),
        // Behind a balancer every connection comes from its address.
        ("RELAY_NODE__MAX_UNAUTHENTICATED_PER_PEER".to_owned(), "200".to_owned()),
    ];
    let env = borrowed(&env_owned);
    let tmp = tempfile::tempdir().unwrap();
    assert!(cli(tmp.path(), &["node", "migrate"], &env, None).await.status.success());
    let balancer = Balancer::start().await;
    let [(dir_a, _a), (dir_b, _b)] = start_two(tmp.path(), &balancer, &env).await;
    let code = initiate(&dir_a, "c", "http://127.0.0.1:9/hook", &[]).await;
    // 50 agents (accept commands, each its own data directory) at once; the balancer sends
    // them to the two replicas in turn.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let dir = tmp.path().join(format!("agent-{i}"));
        let code = code.clone();
        tasks.push(tokio::spawn(async move {
            let o = cli(
                &dir,
                &["accept", &code, "--deliver-to", "http://127.0.0.1:9/hook"],
                &[],
                None,
            )
            .await;
            (o.status.success(), format!("{}{}", stdout(&o), stderr(&o)))
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let accepted = outcomes.iter().filter(|(ok, _)| *ok).count();
    assert_eq!(accepted, 1, "exactly one redeem succeeds: {outcomes:#?}");
    for (_, out) in outcomes.iter().filter(|(ok, _)| !*ok) {
        assert!(out.contains("already redeemed"), "{out}");
    }
    let list = statuses(&dir_b, true).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, "active");
}
