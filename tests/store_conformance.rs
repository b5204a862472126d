//! One conformance suite for the node's store, run against both engines: sled in a temporary
//! data directory, and PostgreSQL in a throwaway cluster (skipped, loudly, where no server
//! is installed; `.ci/run` requires it). Each scenario is written once, over the
//! `NodeStore` contract; the PostgreSQL-only tests at the end cover what one process cannot
//! show: two replicas on one database, the schema's versions, the listener's loss and a
//! database restart.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::postgres::Cluster;
use relay::store::postgres::{self, Migrated, PgStore, SCHEMA_VERSION};
use relay::store::{
    get_json, put_json, Limits, Message, NewMessage, NodeQueue, NodeStore, NodeTable, QueueError, SequenceGap,
};

const ROOMY: Limits = Limits {
    max_messages: 100_000,
    max_bytes: 1 << 30,
};

fn new_message(id: &str, body: &str) -> NewMessage {
    NewMessage {
        id: id.to_owned(),
        content_type: "text/plain".to_owned(),
        enqueued_at_ms: 1_700_000_000_000,
        body: Bytes::from(body.to_owned()),
    }
}

fn peer_message(seq: u64, id: &str) -> Message {
    Message {
        seq,
        id: id.to_owned(),
        content_type: "application/json".to_owned(),
        enqueued_at_ms: 1_700_000_000_000 + seq,
        body: Bytes::from(format!("{{\"n\":{seq}}}")),
    }
}

fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

// ---- the scenarios, over the contract ----

/// Appends number from 1 in order; reads cut by count and bytes; an idempotency key returns
/// the first result; removal and counters.
async fn order_idempotency_and_counters<S: NodeStore>(store: &S) {
    let q = store.queue("out-order", ROOMY).await.unwrap();
    let mut got = Vec::new();
    for i in 0..5 {
        let a = q
            .append(new_message(&format!("m{i}"), "12345"), Some(&format!("k{i}")))
            .await
            .unwrap();
        assert!(!a.duplicate);
        got.push(a.seq);
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    let again = q.append(new_message("other", "zz"), Some("k2")).await.unwrap();
    assert_eq!((again.seq, again.id.as_str(), again.duplicate), (3, "m2", true));
    let all = q.read_after(0, 100, usize::MAX).await.unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(all[2].id, "m2");
    assert_eq!(all[2].body, Bytes::from("12345"));
    assert_eq!(all[2].content_type, "text/plain");
    assert_eq!(seqs(&q.read_after(2, 2, usize::MAX).await.unwrap()), vec![3, 4]);
    // Bytes: stops before the bound, but always one.
    assert_eq!(seqs(&q.read_after(0, 100, 11).await.unwrap()), vec![1, 2]);
    assert_eq!(seqs(&q.read_after(0, 100, 1).await.unwrap()), vec![1]);
    let s = q.stats().await.unwrap();
    assert_eq!((s.depth, s.bytes, s.last_seq), (5, 25, 5));
    assert_eq!(s.oldest_enqueued_ms, Some(1_700_000_000_000));
    assert!(q.remove(2).await.unwrap());
    assert!(!q.remove(2).await.unwrap());
    assert_eq!(seqs(&q.read_after(0, 100, usize::MAX).await.unwrap()), vec![1, 3, 4, 5]);
    assert_eq!(q.first().await.unwrap().map(|m| m.seq), Some(1));
    let s = q.stats().await.unwrap();
    assert_eq!((s.depth, s.bytes), (4, 20));
    // Forgetting keys: the same key then queues anew.
    assert_eq!(q.prune_idempotency_keys(u64::MAX).await.unwrap(), 5);
    let fresh = q.append(new_message("m-new", "x"), Some("k2")).await.unwrap();
    assert_eq!((fresh.seq, fresh.duplicate), (6, false));
}

/// Bounds by count and by bytes, dead letters counting against both; nothing is dropped to
/// make room.
async fn bounds_refuse_and_count_dead_letters<S: NodeStore>(store: &S) {
    let q = store
        .queue(
            "out-bounds",
            Limits {
                max_messages: 3,
                max_bytes: 100,
            },
        )
        .await
        .unwrap();
    for i in 0..3 {
        q.append(new_message(&format!("b{i}"), "0123456789"), None)
            .await
            .unwrap();
    }
    match q.append(new_message("b3", "x"), None).await {
        Err(QueueError::FullCount { count: 3, limit: 3, .. }) => {}
        other => panic!("expected FullCount, got {other:?}"),
    }
    let first = q.first().await.unwrap().unwrap();
    q.dead_letter(&first, "refused by the webhook: 422").await.unwrap();
    match q.append(new_message("b3", "x"), None).await {
        Err(QueueError::FullCount { dead_letters: 1, .. }) => {}
        other => panic!("a dead letter still counts: {other:?}"),
    }
    assert!(q.drop_dead_letter(first.seq).await.unwrap());
    match q.append(new_message("big", &"y".repeat(90)), None).await {
        Err(QueueError::FullBytes {
            bytes: 20, limit: 100, ..
        }) => {}
        other => panic!("expected FullBytes, got {other:?}"),
    }
    assert_eq!(q.append(new_message("b3", "x"), None).await.unwrap().seq, 4);
    let s = q.stats().await.unwrap();
    assert_eq!((s.depth, s.bytes, s.dead_letters, s.dead_letter_bytes), (3, 21, 0, 0));
}

/// Dead letters: listed with their reason; retried in place (a queue the peer numbers),
/// requeued under a new number (a queue this side numbers), dropped.
async fn dead_letters_retry_requeue_drop<S: NodeStore>(store: &S) {
    let q = store.queue("out-dead", ROOMY).await.unwrap();
    for i in 1..=4 {
        q.append(new_message(&format!("d{i}"), "abc"), Some(&format!("key-d{i}")))
            .await
            .unwrap();
    }
    let msgs = q.read_after(0, 10, usize::MAX).await.unwrap();
    q.dead_letter(&msgs[1], "422 Unprocessable").await.unwrap();
    q.dead_letter(&msgs[2], "413 Too Large").await.unwrap();
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(
        (dead[0].id.as_str(), dead[0].reason.as_str(), dead[0].bytes),
        ("d2", "422 Unprocessable", 3)
    );
    assert_eq!(seqs(&q.read_after(0, 10, usize::MAX).await.unwrap()), vec![1, 4]);
    let s = q.stats().await.unwrap();
    assert_eq!((s.depth, s.bytes, s.dead_letters, s.dead_letter_bytes), (2, 6, 2, 6));
    assert!(q.retry_dead_letter(2).await.unwrap());
    assert_eq!(seqs(&q.read_after(0, 10, usize::MAX).await.unwrap()), vec![1, 2, 4]);
    assert_eq!(q.requeue_dead_letter(3).await.unwrap(), Some(5));
    assert_eq!(seqs(&q.read_after(0, 10, usize::MAX).await.unwrap()), vec![1, 2, 4, 5]);
    // Its idempotency key still names it: a retry of the submission queues nothing new.
    let again = q.append(new_message("d3", "abc"), Some("key-d3")).await.unwrap();
    assert_eq!((again.id.as_str(), again.duplicate), ("d3", true));
    assert_eq!(q.requeue_dead_letter(3).await.unwrap(), None);
    assert!(!q.retry_dead_letter(9).await.unwrap());
    assert!(!q.drop_dead_letter(9).await.unwrap());
    let s = q.stats().await.unwrap();
    assert_eq!((s.depth, s.dead_letters, s.last_seq), (4, 0, 5));
}

/// A queue the peer numbers: a retried batch is skipped, a reused number for another message
/// refuses the whole batch, a jump is reported, and only the prefix that fits is stored.
async fn peer_numbered_batches<S: NodeStore>(store: &S) {
    let q = store.queue("in-peer", ROOMY).await.unwrap();
    let batch: Vec<Message> = (1..=3).map(|s| peer_message(s, &format!("p{s}"))).collect();
    let r = q.append_remote(batch.clone()).await.unwrap();
    assert_eq!((r.high_water, r.stored, r.gap), (3, 3, None));
    // The same batch again, with one more: only the new one is stored.
    let mut retry = batch.clone();
    retry.push(peer_message(4, "p4"));
    let r = q.append_remote(retry).await.unwrap();
    assert_eq!((r.high_water, r.stored), (4, 1));
    // Consumed messages are still recognised as retries.
    assert!(q.remove(1).await.unwrap());
    assert_eq!(q.append_remote(vec![peer_message(1, "p1")]).await.unwrap().stored, 0);
    // Another message under a number already taken: refused, nothing stored.
    match q
        .append_remote(vec![peer_message(4, "other"), peer_message(5, "p5")])
        .await
    {
        Err(QueueError::SequenceConflict {
            seq: 4,
            held_id: Some(h),
            high_water: 4,
            ..
        }) => assert_eq!(h, "p4"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(q.stats().await.unwrap().last_seq, 4);
    // A jump: stored, and said.
    let r = q.append_remote(vec![peer_message(7, "p7")]).await.unwrap();
    assert_eq!(r.gap, Some(SequenceGap { expected: 5, got: 7 }));
    assert_eq!(seqs(&q.read_after(0, 10, usize::MAX).await.unwrap()), vec![2, 3, 4, 7]);
    // Bounds: the prefix that fits.
    let small = store
        .queue(
            "in-small",
            Limits {
                max_messages: 2,
                max_bytes: 1 << 20,
            },
        )
        .await
        .unwrap();
    let r = small
        .append_remote((1..=3).map(|s| peer_message(s, &format!("s{s}"))).collect())
        .await
        .unwrap();
    assert_eq!((r.high_water, r.stored), (2, 2));
    assert!(matches!(
        small.append_remote(vec![peer_message(3, "s3")]).await,
        Err(QueueError::FullCount { .. })
    ));
}

/// What the peer acknowledged goes; a cursor beyond what was handed on renumbers the unsent
/// above it, idempotency keys following.
async fn acknowledgements_and_renumbering<S: NodeStore>(store: &S) {
    let q = store.queue("out-acks", ROOMY).await.unwrap();
    for i in 1..=6 {
        q.append(new_message(&format!("a{i}"), "body"), Some(&format!("ka{i}")))
            .await
            .unwrap();
    }
    q.note_sent(3).await.unwrap();
    assert!(q.sent_through().await.unwrap() >= 3);
    assert_eq!(q.remove_through(2).await.unwrap(), 2);
    assert_eq!(q.acked_through().await.unwrap(), 2);
    assert_eq!(q.remove_through(2).await.unwrap(), 0);
    assert_eq!(seqs(&q.read_after(2, 10, usize::MAX).await.unwrap()), vec![3, 4, 5, 6]);
    // The peer says it has everything through 10 (a store restored from a backup).
    let sent = q.sent_through().await.unwrap();
    let moved = q.renumber_unsent(10).await.unwrap();
    assert_eq!(moved, 6 - sent);
    let left = q.read_after(10, 10, usize::MAX).await.unwrap();
    assert_eq!(left.len() as u64, moved);
    assert!(left.iter().all(|m| m.seq > 10), "{:?}", seqs(&left));
    assert_eq!(q.acked_through().await.unwrap(), 10);
    let next = q.append(new_message("a7", "body"), None).await.unwrap();
    assert_eq!(next.seq, 10 + moved + 1);
    if moved > 0 {
        let last_moved = left.last().unwrap();
        let again = q
            .append(
                new_message(&last_moved.id, "body"),
                Some(&format!("k{}", last_moved.id)),
            )
            .await
            .unwrap();
        assert_eq!((again.seq, again.duplicate), (last_moved.seq, true));
    }
    assert_eq!(q.renumber_unsent(5).await.unwrap(), 0);
}

/// Tables: records, prefixes, compare-and-swap, and 50 racing claims of one key of which
/// exactly one wins.
async fn tables_and_exactly_one_claim<S: NodeStore>(store: &S, other: &S) {
    let t = store.table("conformance").await.unwrap();
    put_json(&t, "inv/a", &"pending").await.unwrap();
    put_json(&t, "inv/b", &"pending").await.unwrap();
    put_json(&t, "other", &1).await.unwrap();
    assert_eq!(
        get_json::<String>(&t, "inv/a").await.unwrap().as_deref(),
        Some("pending")
    );
    assert_eq!(get_json::<String>(&t, "missing").await.unwrap(), None);
    let listed: Vec<String> = t
        .list_prefix_raw("inv/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, vec!["inv/a", "inv/b"]);
    t.remove("inv/b").await.unwrap();
    assert_eq!(t.list_prefix_raw("inv/").await.unwrap().len(), 1);
    // Compare-and-swap: absent → present, present → changed, stale expectations refused.
    assert!(t.compare_and_swap("cas", None, Some(b"1".to_vec())).await.unwrap());
    assert!(!t.compare_and_swap("cas", None, Some(b"2".to_vec())).await.unwrap());
    assert!(!t
        .compare_and_swap("cas", Some(b"0".to_vec()), Some(b"2".to_vec()))
        .await
        .unwrap());
    assert!(t
        .compare_and_swap("cas", Some(b"1".to_vec()), Some(b"2".to_vec()))
        .await
        .unwrap());
    assert!(t.compare_and_swap("cas", Some(b"2".to_vec()), None).await.unwrap());
    assert_eq!(t.get_raw("cas").await.unwrap(), None);
    // Another handle (another replica, for PostgreSQL) sees the same records.
    let t2 = other.table("conformance").await.unwrap();
    assert_eq!(get_json::<i32>(&t2, "other").await.unwrap(), Some(1));
    // 50 claims of one invitation at once, over both handles: exactly one wins.
    t.put_raw("claim", b"open".to_vec()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let table = if i % 2 == 0 { t.clone() } else { t2.clone() };
        tasks.push(tokio::spawn(async move {
            table
                .compare_and_swap(
                    "claim",
                    Some(b"open".to_vec()),
                    Some(format!("taken by {i}").into_bytes()),
                )
                .await
                .unwrap()
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.unwrap());
    }
    assert_eq!(wins, 1, "exactly one claim succeeds");
    store.probe().await.unwrap();
}

/// Two writers race on one queue (through two handles: two replicas for PostgreSQL) while a
/// reader tails it: every number from 1 arrives once, none skipped, in order; a parked reader
/// wakes for a write made through the other handle.
async fn racing_writers_and_a_tailing_reader<S: NodeStore>(store: &S, other: &S) {
    const EACH: usize = 150;
    let q1 = store.queue("out-race", ROOMY).await.unwrap();
    let q2 = other.queue("out-race", ROOMY).await.unwrap();
    let reader = {
        let q = q1.clone();
        tokio::spawn(async move {
            let mut seen: Vec<u64> = Vec::new();
            let mut after = 0;
            while seen.len() < 2 * EACH {
                let got = q.read_after(after, 64, usize::MAX).await.unwrap();
                if got.is_empty() {
                    q.wait_after(after).await;
                    continue;
                }
                for m in &got {
                    assert_eq!(m.seq, after + 1, "the reader skipped a number");
                    after = m.seq;
                    seen.push(m.seq);
                }
            }
            seen
        })
    };
    let writer = |q: S::Queue, tag: &'static str| {
        tokio::spawn(async move {
            for i in 0..EACH {
                q.append(new_message(&format!("{tag}{i}"), "x"), None).await.unwrap();
            }
        })
    };
    let (a, b) = (writer(q1.clone(), "a"), writer(q2.clone(), "b"));
    a.await.unwrap();
    b.await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, (1..=(2 * EACH) as u64).collect::<Vec<_>>());
    let ids: BTreeSet<String> = q1
        .read_after(0, 1000, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids.len(), 2 * EACH);
    // A parked reader on one handle wakes for a write through the other, well before the
    // fallback poll would wake it.
    let parked = {
        let q = q1.clone();
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            q.wait_after((2 * EACH) as u64).await;
            start.elapsed()
        })
    };
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    q2.append(new_message("wake", "x"), None).await.unwrap();
    let waited = parked.await.unwrap();
    assert!(waited < Duration::from_secs(30), "waited {waited:?}");
    let newest = q1.read_after((2 * EACH) as u64, 10, usize::MAX).await.unwrap();
    assert_eq!(newest.len(), 1);
}

// ---- the engines ----

struct Sled {
    _dir: tempfile::TempDir,
    store: relay::store::Store,
}

fn sled() -> Sled {
    let dir = tempfile::tempdir().unwrap();
    let store = relay::store::Store::open(dir.path(), 4 << 20).unwrap();
    Sled { _dir: dir, store }
}

struct Pg {
    cluster: Cluster,
    url: String,
    store: PgStore,
}

fn options(url: &str) -> postgres::Options {
    postgres::Options {
        url: url.to_owned(),
        pool_size: 8,
        tls: relay::tls::webhook_client_config(relay::config::WebhookTrust::System, None).unwrap(),
        connect_timeout: Duration::from_secs(5),
    }
}

/// A fresh database in a throwaway cluster, migrated; `None` after SKIPPED.
async fn pg(test: &str) -> Option<Pg> {
    let cluster = Cluster::start(test)?;
    let url = cluster.database("relay").await;
    let store = PgStore::connect(&options(&url)).await.unwrap();
    assert_eq!(store.migrate().await.unwrap(), Migrated::Created(SCHEMA_VERSION));
    Some(Pg { cluster, url, store })
}

impl Pg {
    /// Another replica: its own pool and listener on the same database.
    async fn replica(&self) -> PgStore {
        PgStore::connect(&options(&self.url)).await.unwrap()
    }
}

macro_rules! on_both {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                let s = super::sled();
                super::$scenario(&s.store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(pg) = super::pg(concat!(stringify!($scenario), "::postgres")).await else {
                    return;
                };
                super::$scenario(&pg.store).await;
            }
        }
    };
    ($scenario:ident, two) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                let s = super::sled();
                super::$scenario(&s.store, &s.store.clone()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(pg) = super::pg(concat!(stringify!($scenario), "::postgres")).await else {
                    return;
                };
                let other = pg.replica().await;
                super::$scenario(&pg.store, &other).await;
            }
        }
    };
}

on_both!(order_idempotency_and_counters);
on_both!(bounds_refuse_and_count_dead_letters);
on_both!(dead_letters_retry_requeue_drop);
on_both!(peer_numbered_batches);
on_both!(acknowledgements_and_renumbering);
on_both!(tables_and_exactly_one_claim, two);
on_both!(racing_writers_and_a_tailing_reader, two);

// ---- PostgreSQL only ----

/// The schema: made once, then up to date; a database at another version is refused by name
/// of both versions, and a newer one is never touched by migrate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_versions_are_checked() {
    let Some(pg) = pg("postgres_schema_versions_are_checked").await else {
        return;
    };
    pg.store.check_schema().await.unwrap();
    assert_eq!(pg.store.migrate().await.unwrap(), Migrated::UpToDate(SCHEMA_VERSION));
    let newer = SCHEMA_VERSION + 1;
    pg.cluster
        .sql("relay", &format!("UPDATE relay_schema SET version = {newer}"))
        .await;
    let e = pg.store.check_schema().await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("version {newer}")) && e.contains(&format!("version {SCHEMA_VERSION}")),
        "{e}"
    );
    assert!(!e.contains(&pg.cluster.password), "the password is never shown: {e}");
    let e = pg.store.migrate().await.unwrap_err().to_string();
    assert!(e.contains("nothing was changed"), "{e}");
    pg.cluster.sql("relay", "UPDATE relay_schema SET version = 0").await;
    let e = pg.store.check_schema().await.unwrap_err().to_string();
    assert!(e.contains("version 0") && e.contains("relay node migrate"), "{e}");
    // A database without the schema.
    let bare = pg.cluster.database("bare").await;
    let store = PgStore::connect(&options(&bare)).await.unwrap();
    let e = store.check_schema().await.unwrap_err().to_string();
    assert!(e.contains("no relay schema") && e.contains("relay node migrate"), "{e}");
    // Two replicas migrating at once: one creates, the other finds it done.
    let other = pg.cluster.database("race").await;
    let (a, b) = (
        PgStore::connect(&options(&other)).await.unwrap(),
        PgStore::connect(&options(&other)).await.unwrap(),
    );
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    let mut outcomes = vec![ra.unwrap(), rb.unwrap()];
    outcomes.sort_by_key(|m| matches!(m, Migrated::UpToDate(_)));
    assert_eq!(
        outcomes,
        vec![Migrated::Created(SCHEMA_VERSION), Migrated::UpToDate(SCHEMA_VERSION)]
    );
}

/// A wrong password or an unreachable server is named, without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusals_are_named_without_the_password() {
    let Some(pg) = pg("postgres_refusals_are_named_without_the_password").await else {
        return;
    };
    let wrong = pg.url.replace(&pg.cluster.password, "not-the-password");
    let e = PgStore::connect(&options(&wrong)).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, QueueError::Unavailable(_)), "{e:?}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(
        text.contains(&format!("postgres://relay:***@127.0.0.1:{}/relay", pg.cluster.port)),
        "{text}"
    );
    let (_hold, port) = common::closed_port();
    let closed = format!("postgres://relay:secret@127.0.0.1:{port}/relay");
    let text = PgStore::connect(&options(&closed)).await.unwrap_err().to_string();
    assert!(!text.contains("secret"), "{text}");
    assert!(text.contains("unavailable"), "{text}");
}

/// The listener's connection killed by the server: parked readers are still answered (by the
/// fallback poll at once, then by notifications again once it reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_parked_readers_survive_the_listener_being_killed() {
    let Some(pg) = pg("postgres_parked_readers_survive_the_listener_being_killed").await else {
        return;
    };
    let other = pg.replica().await;
    let reader = pg.store.queue("out-listen", ROOMY).await.unwrap();
    let writer = other.queue("out-listen", ROOMY).await.unwrap();
    // The listener is up once a write on the other replica wakes this one by notification.
    common::wait_for("the listener", || async {
        writer.append(new_message("probe", "x"), None).await.unwrap();
        (pg.store.notifications_received() > 0).then_some(())
    })
    .await;
    common::wait_for("both replicas' listeners", || async {
        let n = pg
            .cluster
            .sql(
                "relay",
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN relay_queue%' AND pid <> pg_backend_pid()",
            )
            .await[0]
            .get::<_, i64>(0);
        (n == 2).then_some(())
    })
    .await;
    let killed = pg
        .cluster
        .sql(
            "relay",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE query LIKE 'LISTEN relay_queue%' AND pid <> pg_backend_pid()",
        )
        .await;
    assert_eq!(killed[0].get::<_, i64>(0), 2, "both replicas' listeners were killed");
    let base = writer.stats().await.unwrap().last_seq;
    for i in 0..5u64 {
        let parked = {
            let q = reader.clone();
            tokio::spawn(async move {
                loop {
                    let got = q.read_after(base + i, 10, usize::MAX).await.unwrap();
                    if !got.is_empty() {
                        return got[0].seq;
                    }
                    q.wait_after(base + i).await;
                }
            })
        };
        writer
            .append(new_message(&format!("after-kill-{i}"), "x"), None)
            .await
            .unwrap();
        let seq = tokio::time::timeout(Duration::from_secs(20), parked)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seq, base + i + 1);
    }
}

/// The database restarted without a clean shutdown mid-stream: writers see errors while it
/// is down and carry on after; nothing that was acknowledged is lost, and a write whose
/// answer was lost is found again by its idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_nothing_acknowledged() {
    let Some(pg) = pg("postgres_restart_loses_nothing_acknowledged").await else {
        return;
    };
    let q = pg.store.queue("out-restart", ROOMY).await.unwrap();
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<(u64, String)>::new()));
    let writer = {
        let (q, acked) = (q.clone(), acknowledged.clone());
        tokio::spawn(async move {
            let mut errors = 0;
            for i in 0..400 {
                let id = format!("r{i}");
                // Retried with its key until acknowledged, as a submitter does.
                loop {
                    match q.append(new_message(&id, "payload"), Some(&id)).await {
                        Ok(a) => {
                            assert_eq!(a.id, id);
                            acked.lock().unwrap().push((a.seq, id.clone()));
                            break;
                        }
                        Err(QueueError::Unavailable(_)) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("unexpected: {e}"),
                    }
                }
            }
            errors
        })
    };
    common::wait_for("some acknowledged writes", || async {
        (acknowledged.lock().unwrap().len() >= 50).then_some(())
    })
    .await;
    pg.cluster.restart_immediate();
    let errors = tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .unwrap()
        .unwrap();
    let held = q.read_after(0, 10_000, usize::MAX).await.unwrap();
    let by_seq: std::collections::HashMap<u64, String> = held.iter().map(|m| (m.seq, m.id.clone())).collect();
    for (seq, id) in acknowledged.lock().unwrap().iter() {
        assert_eq!(by_seq.get(seq), Some(id), "acknowledged {id} at {seq}");
    }
    let ids: BTreeSet<&str> = held.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), held.len(), "no message twice");
    assert_eq!(held.len(), 400);
    eprintln!("the writer saw {errors} refusals while the database restarted");
}

/// Leases: one holder at a time; renewing keeps the epoch; after expiry another replica takes
/// it under a new epoch, and the former holder's fenced writes are refused while the new
/// holder's go through; a restarted replica takes back its own leases at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_leases_fence_a_former_holder() {
    let Some(pg) = pg("postgres_leases_fence_a_former_holder").await else {
        return;
    };
    let ttl = Duration::from_secs(1);
    let a = pg.store.take_lease("c1", "ra/1", ttl).await.unwrap().expect("free");
    assert_eq!(a.epoch, 1);
    assert_eq!(
        pg.store.take_lease("c1", "rb/1", ttl).await.unwrap(),
        None,
        "held by ra"
    );
    let renewed = pg.store.renew_leases("ra/1", ttl).await.unwrap();
    assert_eq!(renewed, vec![a.clone()]);
    let q = pg.store.queue("node/c1/from-agent", ROOMY).await.unwrap();
    q.append(new_message("m1", "x"), None).await.unwrap();
    q.append(new_message("m2", "x"), None).await.unwrap();
    let as_a = relay::store::AnyQueue::Postgres(q.clone()).fenced(&a);
    assert!(as_a.remove(1).await.unwrap(), "the holder's write goes through");
    // ra stalls past the lease; rb takes it over.
    common::wait_for("the lease to expire and pass to rb", || async {
        pg.store.take_lease("c1", "rb/1", ttl).await.unwrap()
    })
    .await;
    let (b, in_force) = pg.store.leases().await.unwrap().remove(0);
    assert!(in_force);
    assert_eq!((b.owner.as_str(), b.epoch), ("rb/1", 2));
    match as_a.remove(2).await {
        Err(QueueError::Fenced { epoch: 1, .. }) => {}
        other => panic!("the former holder's late write must be refused: {other:?}"),
    }
    assert_eq!(q.stats().await.unwrap().depth, 1, "nothing changed");
    assert!(
        pg.store.renew_leases("ra/1", ttl).await.unwrap().is_empty(),
        "ra learns it lost it"
    );
    let as_b = relay::store::AnyQueue::Postgres(q.clone()).fenced(&b);
    assert!(as_b.remove(2).await.unwrap());
    // rb restarts as another process of the same replica: it takes its lease back at once,
    // under a new epoch that fences the old process.
    let ttl = Duration::from_secs(30);
    pg.store.renew_leases("rb/1", ttl).await.unwrap();
    assert_eq!(pg.store.adopt_leases("rb", "rb/2", ttl).await.unwrap(), 1);
    let (adopted, _) = pg.store.leases().await.unwrap().remove(0);
    assert_eq!((adopted.owner.as_str(), adopted.epoch), ("rb/2", 3));
    q.append(new_message("m3", "x"), None).await.unwrap();
    assert!(matches!(as_b.remove(3).await, Err(QueueError::Fenced { .. })));
    // Given up, it is free at once.
    pg.store.release_lease(&adopted).await.unwrap();
    let c = pg.store.take_lease("c1", "rc/1", ttl).await.unwrap().expect("released");
    assert_eq!(c.epoch, 4);
}

/// Records written through one replica are announced to the other, table and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_record_changes_reach_the_other_replica() {
    let Some(pg) = pg("postgres_record_changes_reach_the_other_replica").await else {
        return;
    };
    let other = pg.replica().await;
    let mut changes = other.record_changes();
    let t = pg.store.table("node-connections").await.unwrap();
    // The listener may still be connecting: write until the change is seen.
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let seen = loop {
        t.put_raw("c1", b"{}".to_vec()).await.unwrap();
        if let Ok(Ok(change)) = tokio::time::timeout(Duration::from_millis(200), changes.recv()).await {
            break change;
        }
        assert!(std::time::Instant::now() < deadline, "no change announced");
    };
    assert_eq!(seen, ("node-connections".to_owned(), "c1".to_owned()));
    while changes.try_recv().is_ok() {}
    // A compare-and-swap that changes nothing announces nothing; one that does, does.
    t.put_raw("c2", b"{}".to_vec()).await.unwrap();
    assert_eq!(
        tokio::time::timeout(common::DEADLINE, changes.recv())
            .await
            .unwrap()
            .unwrap(),
        ("node-connections".to_owned(), "c2".to_owned())
    );
    assert!(!t
        .compare_and_swap("c2", Some(b"stale".to_vec()), Some(b"x".to_vec()))
        .await
        .unwrap());
    assert!(t.compare_and_swap("c1", Some(b"{}".to_vec()), None).await.unwrap());
    assert_eq!(
        tokio::time::timeout(common::DEADLINE, changes.recv())
            .await
            .unwrap()
            .unwrap(),
        ("node-connections".to_owned(), "c1".to_owned()),
        "the refused swap of c2 announced nothing"
    );
}
