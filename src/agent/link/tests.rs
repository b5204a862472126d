//! The agent's loops driven by a fake node, in paused time: a restored data directory, an
//! unknown credential, a revocation, lost acknowledgements and partial high-water marks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::time::Instant;

use super::*;
use crate::config::Settings;
use crate::intake::IntakeTarget;
use crate::store::{NewMessage, Store};

// Paused-time tests flush only while no timer of the code under test is pending: tokio
// advances paused time whenever the runtime idles, and it idles during an fsync.

/// What the fake does with the next push, instead of behaving like a node.
enum Script {
    /// Store the batch, then lose the answer (the agent sees a transport error).
    StoreThenLose,
    /// Store at most this many messages of the batch.
    StoreAtMost(usize),
    /// Queue two more messages on the agent (as its intake would, not flushed yet), store the
    /// batch, and claim a high-water mark far beyond it.
    AppendAndClaim(Queue),
}

#[derive(Default)]
struct State {
    /// What the node holds from the agent: sequence number → message id.
    held: BTreeMap<u64, String>,
    /// Messages the node stored, counting repeats (a duplicate would show here).
    stores: usize,
    script: VecDeque<Script>,
    /// Every push: when, and which sequence numbers.
    pushes: Vec<(Instant, Vec<u64>)>,
    /// Every poll: when, and the request.
    polls: Vec<(Instant, PollRequest)>,
    /// Answer every push with this failure (an unknown credential, a conflict) until cleared.
    refuse: Option<Failure>,
    /// Answers for the next polls; once empty, polls hang (a half-open connection).
    poll_answers: VecDeque<PollResponse>,
}

/// A node in memory that deduplicates by sequence number and refuses a push that reuses
/// numbers it holds for other messages (409 `sequence_conflict`), as the real node does.
#[derive(Default)]
struct FakeNode {
    state: Mutex<State>,
}

impl FakeNode {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn store(st: &mut State, request: &PushRequest, at_most: usize) -> u64 {
        let hw = st.held.keys().next_back().copied().unwrap_or(0);
        for m in request.messages.iter().filter(|m| m.seq > hw).take(at_most) {
            st.held.insert(m.seq, m.id.clone());
            st.stores += 1;
        }
        st.held.keys().next_back().copied().unwrap_or(0)
    }
}

impl NodeApi for FakeNode {
    async fn poll(
        &self,
        request: PollRequest,
        _deadline: Duration,
        _max_reply: usize,
    ) -> Result<PollResponse, Failure> {
        let answer = {
            let mut st = self.state();
            st.polls.push((Instant::now(), request));
            st.poll_answers.pop_front()
        };
        match answer {
            Some(a) => Ok(a),
            None => std::future::pending().await,
        }
    }

    async fn push(&self, request: PushRequest, _deadline: Duration) -> Result<PushResponse, Failure> {
        let script = {
            let mut st = self.state();
            st.pushes
                .push((Instant::now(), request.messages.iter().map(|m| m.seq).collect()));
            if let Some(f) = st.refuse.clone() {
                return Err(f);
            }
            let conflict = request
                .messages
                .iter()
                .find(|m| st.held.get(&m.seq).is_some_and(|id| *id != m.id));
            if let Some(m) = conflict {
                return Err(Failure::Conflict(format!(
                    "message {} is another message on the node",
                    m.seq
                )));
            }
            st.script.pop_front()
        };
        let answer = |high_water| PushResponse {
            version: protocol::PROTOCOL_VERSION,
            high_water,
            state: LinkState::Active,
        };
        match script {
            None => Ok(answer(Self::store(&mut self.state(), &request, usize::MAX))),
            Some(Script::StoreThenLose) => {
                Self::store(&mut self.state(), &request, usize::MAX);
                Err(Failure::Retry("connection reset before the answer".into(), None))
            }
            Some(Script::StoreAtMost(n)) => Ok(answer(Self::store(&mut self.state(), &request, n))),
            Some(Script::AppendAndClaim(outbox)) => {
                append(&outbox, &["late-1", "late-2"]);
                Self::store(&mut self.state(), &request, usize::MAX);
                Ok(answer(1_000))
            }
        }
    }
}

fn append(outbox: &Queue, ids: &[&str]) {
    for id in ids {
        let msg = NewMessage {
            id: (*id).to_owned(),
            content_type: "text/plain".into(),
            enqueued_at_ms: 1,
            body: Bytes::from_static(b"payload"),
        };
        outbox.append(msg, None).unwrap();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    agent: Agent,
    node: Arc<FakeNode>,
    ctx: Ctx<FakeNode>,
    outbox: Queue,
    inbox: Queue,
}

impl Setup {
    /// An agent with connection "c" whose outbox holds messages `ids` (durable).
    async fn new(ids: &[&str]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            data_dir: dir.path().to_owned(),
            ..Settings::default()
        };
        settings.delivery.backoff_initial = Duration::from_millis(100);
        settings.delivery.backoff_max = Duration::from_secs(2);
        let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
        let agent = Agent::open(store, settings).unwrap();
        let conn = AgentConnection {
            name: "c".into(),
            node_connection: "c".into(),
            node_url: "https://node.example".into(),
            pin: None,
            node_instance: "pub".into(),
            local_instance: "priv".into(),
            reported_instance: "priv".into(),
            description: String::new(),
            mode: "script".into(),
            node_project: "P".into(),
            project: "Q".into(),
            deliver_to: None,
            accepted_at_ms: 1,
            revoked: None,
            revoked_at_ms: None,
            invitation_id: None,
        };
        agent.inner.connections.put("c", &conn).unwrap();
        let handle = Arc::new(LinkHandle {
            health: Arc::new(Health::default()),
            paused: AtomicBool::new(false),
            node_max_payload: std::sync::atomic::AtomicU64::new(0),
            token: CancellationToken::new(),
            deliver_token: CancellationToken::new(),
        });
        agent.inner.links.lock().unwrap().insert("c".into(), handle.clone());
        let (outbox, inbox) = agent.queues("c").unwrap();
        append(&outbox, ids);
        agent.store().flush().await.unwrap();
        let node = Arc::new(FakeNode::default());
        let ctx = Ctx {
            agent: agent.clone(),
            conn,
            handle,
            node: node.clone(),
        };
        Setup {
            _dir: dir,
            agent,
            node,
            ctx,
            outbox,
            inbox,
        }
    }

    fn spawn_send(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(send_loop(self.ctx.clone(), self.outbox.clone()))
    }

    /// Waits (in paused time, so at no real cost) until `done` holds.
    async fn until(&self, what: &str, done: impl Fn(&State) -> bool) {
        for _ in 0..100_000 {
            if done(&self.node.state()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    fn held_ids(&self) -> Vec<String> {
        self.node.state().held.values().cloned().collect()
    }

    fn push_gaps(&self) -> Vec<Duration> {
        let st = self.node.state();
        st.pushes.windows(2).map(|w| w[1].0 - w[0].0).collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_restored_directory_removes_nothing_holds_loudly_and_retries_with_backoff() {
    let s = Setup::new(&["new-1", "new-2", "new-3"]).await;
    // The node already holds 1..5 from before the backup was taken: other messages.
    {
        let mut st = s.node.state();
        for seq in 1..=5 {
            st.held.insert(seq, format!("old-{seq}"));
        }
    }
    let task = s.spawn_send();
    s.until("six refused pushes", |st| st.pushes.len() >= 6).await;
    assert_eq!(s.outbox.stats().depth, 3, "nothing removed");
    let holds = s.ctx.handle.health.holds();
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert!(
        holds[0].contains("probably restored from a backup or copied"),
        "{}",
        holds[0]
    );
    assert!(s.agent.ready().await.unwrap_err().contains("restored from a backup"));
    assert!(s.agent.get("c").unwrap().unwrap().revoked.is_none());
    let gaps = s.push_gaps();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(50)),
        "never a hot loop: {gaps:?}"
    );
    assert!(gaps[4] > gaps[0], "the backoff grows: {gaps:?}");

    // An operator sorts it out on the node: the next push goes through and the hold clears.
    s.node.state().held.clear();
    s.until("the messages to arrive", |st| st.held.len() == 3).await;
    s.until("the outbox to empty", |_| s.outbox.stats().depth == 0).await;
    assert_eq!(s.held_ids(), ["new-1", "new-2", "new-3"]);
    assert!(s.ctx.handle.health.holds().is_empty());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn an_unknown_credential_is_retried_with_capped_backoff_and_never_saved_as_revoked() {
    let s = Setup::new(&["m1"]).await;
    s.node.state().refuse = Some(Failure::Unauthorized("the node does not know this credential".into()));
    let task = s.spawn_send();
    s.until("many refused pushes", |st| st.pushes.len() >= 15).await;
    let gaps = s.push_gaps();
    let cap = Duration::from_secs(3); // backoff_max plus its jitter
    assert!(gaps.iter().all(|g| *g <= cap), "capped: {gaps:?}");
    assert!(
        gaps[gaps.len() - 1] >= Duration::from_secs(1),
        "grown to the cap: {gaps:?}"
    );
    assert!(!s.ctx.handle.token.is_cancelled(), "still running");
    assert!(
        s.agent.get("c").unwrap().unwrap().revoked.is_none(),
        "not saved as revoked"
    );
    let holds = s.ctx.handle.health.holds();
    assert!(
        holds[0].contains("does not know this connection's credential"),
        "{holds:?}"
    );
    assert!(holds[0].contains("only a revocation stops this agent"), "{holds:?}");
    assert!(s.agent.ready().await.is_err());

    // The node's data is put back: the credential works again.
    s.node.state().refuse = None;
    s.until("the message to arrive", |st| st.held.len() == 1).await;
    s.until("the hold to clear", |_| s.ctx.handle.health.holds().is_empty())
        .await;
    task.abort();
}

// Real time: marking revoked flushes, and paused time would jump ahead during the fsync.
#[tokio::test]
async fn revoked_stops_the_connection_and_keeps_its_queue() {
    let s = Setup::new(&["m1", "m2"]).await;
    s.node.state().refuse = Some(Failure::Revoked("connection \"c\" was revoked".into()));
    let task = s.spawn_send();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the loop stops")
        .unwrap();
    assert_eq!(s.node.state().pushes.len(), 1, "not retried");
    let conn = s.agent.get("c").unwrap().unwrap();
    assert!(conn.revoked.unwrap().contains("was revoked"));
    assert!(s.ctx.handle.token.is_cancelled());
    assert_eq!(s.outbox.stats().depth, 2, "the queue is kept");
}

#[tokio::test(start_paused = true)]
async fn lost_acknowledgements_neither_duplicate_nor_lose() {
    let s = Setup::new(&["m1", "m2", "m3"]).await;
    s.node
        .state()
        .script
        .extend([Script::StoreThenLose, Script::StoreThenLose]);
    let task = s.spawn_send();
    s.until("the outbox to empty", |_| s.outbox.stats().depth == 0).await;
    append(&s.outbox, &["m4"]);
    s.agent.store().flush().await.unwrap();
    s.until("m4", |st| st.held.len() == 4).await;
    assert_eq!(s.held_ids(), ["m1", "m2", "m3", "m4"]);
    assert_eq!(s.node.state().stores, 4, "each message stored once");
    let pushes: Vec<Vec<u64>> = s.node.state().pushes.iter().map(|p| p.1.clone()).collect();
    assert_eq!(pushes, [vec![1, 2, 3], vec![1, 2, 3], vec![1, 2, 3], vec![4]]);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_partial_high_water_mark_removes_only_what_the_node_holds() {
    let s = Setup::new(&["m1", "m2", "m3", "m4", "m5"]).await;
    s.node
        .state()
        .script
        .extend([Script::StoreAtMost(2), Script::StoreAtMost(2)]);
    let task = s.spawn_send();
    s.until("everything to arrive", |st| st.held.len() == 5).await;
    s.until("the outbox to empty", |_| s.outbox.stats().depth == 0).await;
    let firsts: Vec<u64> = s.node.state().pushes.iter().map(|p| p.1[0]).collect();
    assert_eq!(firsts, [1, 3, 5]);
    assert_eq!(s.node.state().stores, 5);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_high_water_mark_beyond_the_batch_removes_nothing_unsent() {
    let s = Setup::new(&["m1", "m2"]).await;
    s.node
        .state()
        .script
        .push_back(Script::AppendAndClaim(s.outbox.clone()));
    let task = s.spawn_send();
    // The node claims 1000 while the agent sent 1..2 and queued 3..4 meanwhile: those must
    // still be pushed, not removed on the node's word.
    s.until("the first push", |st| st.pushes.len() == 1).await;
    s.until("1..2 removed", |_| s.outbox.stats().depth == 2).await;
    // Flushed only now, with no timer pending, so paused time cannot jump during the fsync.
    s.agent.store().flush().await.unwrap();
    s.until("the late messages to arrive", |st| st.held.len() == 4).await;
    assert_eq!(s.held_ids(), ["m1", "m2", "late-1", "late-2"]);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn polls_confirm_at_once_then_wait_and_a_silent_node_is_dropped_at_the_deadline() {
    let s = Setup::new(&[]).await;
    let empty = PollResponse {
        version: protocol::PROTOCOL_VERSION,
        state: LinkState::Active,
        messages: Vec::new(),
        max_payload_bytes: 1 << 20,
    };
    s.node.state().poll_answers.push_back(empty);
    let task = tokio::spawn(receive_loop(s.ctx.clone(), s.inbox.clone()));
    // The second poll hangs (a half-open connection); the third comes after its deadline.
    s.until("three polls", |st| st.polls.len() >= 3).await;
    let st = s.node.state();
    let wait = s.agent.settings().agent.poll_wait;
    let waits: Vec<u64> = st.polls.iter().map(|p| p.1.wait_ms).collect();
    assert_eq!(
        waits,
        [0, wait.as_millis() as u64, 0],
        "confirm, wait, confirm after the failure"
    );
    let max_reply = protocol::max_batch_bytes(s.agent.settings().queue.max_payload_bytes as usize);
    let deadline = wait + POLL_MARGIN + transfer_time(max_reply);
    let silent = st.polls[2].0 - st.polls[1].0;
    assert!(
        silent >= deadline && silent <= deadline + Duration::from_millis(200),
        "{silent:?} vs {deadline:?}"
    );
    assert_eq!(s.ctx.handle.node_max_payload.load(Ordering::Relaxed), 1 << 20);
    let last = s.ctx.handle.health.last_error().unwrap().message;
    assert!(last.contains("no answer from the node within"), "{last}");
    drop(st);
    task.abort();
}

#[test]
fn gaps_in_what_the_node_sends_are_found() {
    let m = |seq| protocol::WireMessage {
        seq,
        id: format!("m{seq}"),
        content_type: "text/plain".into(),
        enqueued_at_ms: 1,
        body: Vec::new(),
    };
    assert!(gaps(3, &[m(3), m(4), m(5)]).is_empty());
    assert_eq!(gaps(3, &[m(6), m(7), m(9)]), [(4, 5), (8, 8)]);
    assert_eq!(gaps(0, &[m(2)]), [(1, 1)]);
}

#[test]
fn only_revoked_is_final() {
    let reply = |status: u16, code: &str| Reply {
        status: StatusCode::from_u16(status).unwrap(),
        headers: http::HeaderMap::new(),
        body: serde_json::to_vec(&protocol::ErrorBody {
            error: "why".into(),
            code: code.into(),
        })
        .unwrap()
        .into(),
    };
    assert_eq!(refusal(&reply(401, codes::REVOKED)), Failure::Revoked("why".into()));
    assert_eq!(
        refusal(&reply(401, codes::UNAUTHORIZED)),
        Failure::Unauthorized("why".into())
    );
    assert_eq!(refusal(&reply(401, "")), Failure::Unauthorized("why".into()));
    assert_eq!(
        refusal(&reply(409, codes::SEQUENCE_CONFLICT)),
        Failure::Conflict("why".into())
    );
    assert!(matches!(refusal(&reply(503, codes::STORAGE)), Failure::Retry(..)));
}
