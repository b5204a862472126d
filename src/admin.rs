//! The local admin socket: a running daemon owns the database, so operator commands reach it
//! through `admin.sock` in the data directory (owner-only), one JSON request and one JSON
//! answer per connection. When no daemon runs, the CLI opens the data directory itself and
//! calls the same [`dispatch`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::agent::{AcceptOptions, Agent};
use crate::error::{Kind, OpError, OpResult};
use crate::invite::Invitation;
use crate::node::{Action, InitiateRequest, Node};
use crate::store::{AnyQueue, NodeQueue, SledQueue};

/// Largest answer line.
const MAX_LINE: u64 = 4 * 1024 * 1024;
/// Largest request line (the biggest is an initiate form: a few short strings).
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request, and to take its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the CLI waits for a daemon's answer: above the slowest request (an accept that
/// redeems over the network), below forever for a daemon that hangs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// Most admin connections handled at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// An operator request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Role and bound addresses.
    Info,
    /// Connection statuses.
    Status,
    /// Agent: the accepted connections as stored (no credentials).
    AgentConnections,
    /// Node: create a pending connection.
    Initiate {
        /// The form.
        request: InitiateRequest,
    },
    /// Node: deactivate, activate or revoke.
    SetState {
        /// Connection.
        name: String,
        /// Action.
        action: Action,
    },
    /// List, retry or drop a connection's dead letters.
    DeadLetters {
        /// Connection.
        connection: String,
        /// What to do.
        action: DeadLetterAction,
        /// Which queue's: inbound (refused by this side's webhook) by default.
        #[serde(default)]
        direction: Direction,
    },
    /// A sync command.
    Sync {
        /// The command.
        request: crate::sync::ops::SyncRequest,
    },
    /// Agent: try again the proxy credentials held after a refusal.
    ProxyRetry,
    /// Agent: redeem an invitation.
    Accept {
        /// The invitation code (travels only over the owner-only socket).
        code: String,
        /// Options.
        options: AcceptOptions,
    },
}

/// An operator action on dead letters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterAction {
    /// Show them.
    List,
    /// Put these (or all) back into the queue for delivery.
    Retry {
        /// Sequence numbers; empty with `all`.
        seqs: Vec<u64>,
        /// Every dead letter.
        all: bool,
    },
    /// Delete these (or all) for good.
    Drop {
        /// Sequence numbers; empty with `all`.
        seqs: Vec<u64>,
        /// Every dead letter.
        all: bool,
    },
}

/// Which of a connection's two queues a dead-letter command is about.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Payloads received from the other side that this side's webhook refused.
    #[default]
    In,
    /// Payloads for the other side that it cannot take (larger than its payload limit).
    Out,
    /// Both (listing, or `--all`).
    Both,
}

impl Direction {
    fn covers(self, other: Direction) -> bool {
        self == Direction::Both || self == other
    }
}

/// What a dead-letter action did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetterOutcome {
    /// Inbound dead letters now (after the action), when the command covered them.
    pub dead_letters: Vec<crate::store::DeadLetter>,
    /// Outbound dead letters now, when the command covered them.
    #[serde(default)]
    pub outbound: Vec<crate::store::DeadLetter>,
    /// Sequence numbers acted on.
    pub done: Vec<u64>,
    /// Sequence numbers that were not dead letters.
    pub missing: Vec<u64>,
}

/// At most this many dead letters are listed or acted on at once.
const DEAD_LETTER_BATCH: usize = 10_000;

async fn dead_letters(
    side: &Side,
    connection: &str,
    direction: Direction,
    action: DeadLetterAction,
) -> OpResult<DeadLetterOutcome> {
    let (inbox, outbox) = match side {
        Side::Node(n) => (n.inbox(connection).await?, n.outbound_queue(connection).await?),
        Side::Agent(a) => {
            let sled = |q| AnyQueue::Sled(SledQueue::new(a.store().clone(), q));
            (sled(a.inbox(connection)?), sled(a.outbound_queue(connection)?))
        }
    };
    let mut outcome = DeadLetterOutcome::default();
    let (seqs, all, retry) = match action {
        DeadLetterAction::List => (Vec::new(), true, None),
        DeadLetterAction::Retry { seqs, all } => (seqs, all, Some(true)),
        DeadLetterAction::Drop { seqs, all } => (seqs, all, Some(false)),
    };
    if retry.is_some() && !all && direction == Direction::Both {
        return Err(OpError::new(
            Kind::Invalid,
            "sequence numbers are counted per direction: say --direction in or --direction out",
        ));
    }
    for (dir, queue) in [(Direction::In, &inbox), (Direction::Out, &outbox)] {
        let Some(retry) = retry.filter(|_| direction.covers(dir)) else {
            continue;
        };
        let targets = if all {
            queue
                .dead_letters(DEAD_LETTER_BATCH)
                .await?
                .into_iter()
                .map(|d| d.seq)
                .collect()
        } else {
            seqs.clone()
        };
        for seq in targets {
            let found = match (retry, dir) {
                // An inbox's numbers are the sender's: the message goes back at its own.
                (true, Direction::In) => queue.retry_dead_letter(seq).await?,
                // This side numbers its outbox, and the peer has passed the old number: the
                // message goes to the end under a new one, with its own id.
                (true, _) => queue.requeue_dead_letter(seq).await?.is_some(),
                (false, _) => queue.drop_dead_letter(seq).await?,
            };
            if found {
                outcome.done.push(seq);
            } else {
                outcome.missing.push(seq);
            }
        }
    }
    // Each change above is durable already (committed, or flushed with sled's group).
    if direction.covers(Direction::In) {
        outcome.dead_letters = inbox.dead_letters(DEAD_LETTER_BATCH).await?;
    }
    if direction.covers(Direction::Out) {
        outcome.outbound = outbox.dead_letters(DEAD_LETTER_BATCH).await?;
    }
    Ok(outcome)
}

/// What a running daemon is and where it listens.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Info {
    /// `node` or `agent`.
    pub role: String,
    /// Node: agent-facing listener.
    pub listen: Option<String>,
    /// Local API (node) or intake (agent) listener.
    pub api: Option<String>,
    /// Node: the URL in invitation codes.
    pub public_url: Option<String>,
    /// Process id.
    pub pid: u32,
}

/// The side a daemon (or the CLI, offline) plays.
#[derive(Clone)]
pub enum Side {
    /// Public node.
    Node(Node),
    /// Private agent.
    Agent(Agent),
}

/// Answers one request.
pub async fn dispatch(side: &Side, info: &Info, req: Request) -> OpResult<serde_json::Value> {
    let to_json = |v: &dyn erased::Ser| v.to_value();
    match (side, req) {
        (_, Request::Info) => Ok(to_json(info)),
        (Side::Node(n), Request::Status) => Ok(to_json(&n.connections().await?)),
        (Side::Agent(a), Request::Status) => Ok(to_json(&a.status()?)),
        (Side::Agent(a), Request::AgentConnections) => Ok(to_json(&a.list()?)),
        (Side::Agent(_), Request::ProxyRetry) => Ok(serde_json::json!({
            "released": crate::http::forget_refused_proxy_credentials()
        })),
        (
            side,
            Request::DeadLetters {
                connection,
                action,
                direction,
            },
        ) => Ok(to_json(&dead_letters(side, &connection, direction, action).await?)),
        (side, Request::Sync { request }) => crate::sync::ops::dispatch(sync_context(side).await?, request).await,
        (Side::Node(n), Request::Initiate { request }) => {
            let (name, project) = (request.name.clone(), request.project.clone());
            let code = n.initiate(request).await?;
            // Sync rules live beside the sync state, in sled (a node on PostgreSQL has no
            // tracker: see `node::sync_engine`).
            if let Some(store) = n.store().sled() {
                crate::sync::ops::ensure_default_rules(store, &name, &project)?;
            }
            n.store().flush().await?;
            Ok(serde_json::Value::String(code))
        }
        (Side::Node(n), Request::SetState { name, action }) => Ok(to_json(&n.set_state(&name, action).await?)),
        (Side::Agent(a), Request::Accept { code, options }) => {
            let invitation = Invitation::decode(&code).map_err(|e| OpError::new(Kind::Invitation, e.to_string()))?;
            let accepted = a.accept(&invitation, options).await?;
            let c = &accepted.connection;
            crate::sync::ops::ensure_default_rules(a.store(), &c.name, &c.project)?;
            a.store().flush().await?;
            Ok(to_json(&accepted))
        }
        (Side::Node(_), _) => Err(OpError::new(
            Kind::Config,
            "this data directory belongs to a node; that command is for an agent",
        )),
        (Side::Agent(_), _) => Err(OpError::new(
            Kind::Config,
            "this data directory belongs to an agent; that command is for a node",
        )),
    }
}

/// What the sync commands of `side` may use.
async fn sync_context(side: &Side) -> OpResult<crate::sync::ops::Context<'_>> {
    let (store, engine, statuses) = match side {
        Side::Node(n) => {
            let store = n.store().sled().ok_or_else(|| {
                OpError::new(
                    Kind::Config,
                    "this node keeps its state in PostgreSQL, which holds no sync state yet: sync commands need \
                     store.kind = \"sled\"",
                )
            })?;
            (store, n.sync(), n.connections().await?)
        }
        Side::Agent(a) => (a.store(), a.sync(), a.status()?),
    };
    Ok(crate::sync::ops::Context {
        store,
        engine,
        connections: statuses.into_iter().map(|s| (s.name, s.project)).collect(),
    })
}

mod erased {
    /// Object-safe serialisation to a JSON value.
    pub trait Ser {
        fn to_value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok(serde_json::Value),
    Err(OpError),
}

/// The socket's path in a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Binds the admin socket (replacing a stale one: we hold the database lock, so no other
/// daemon can be using it). The process umask (0077, see [`crate::fsutil::private_umask`])
/// makes it owner-only from the moment it exists; the chmod after only states the mode.
pub fn bind(data_dir: &Path) -> OpResult<UnixListener> {
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    crate::fsutil::private_umask();
    let listener = UnixListener::bind(&path).map_err(|e| {
        OpError::new(
            Kind::Failed,
            format!("cannot create the admin socket {}: {e}", path.display()),
        )
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| OpError::new(Kind::Failed, format!("cannot restrict {}: {e}", path.display())))?;
    Ok(listener)
}

/// Whether a peer with user id `peer` may use the daemon running as `me`: the same user, or
/// root (who could read the database anyway).
pub fn peer_allowed(peer: u32, me: u32) -> bool {
    peer == me || peer == 0
}

/// Serves admin requests until `token` is cancelled.
pub async fn serve(listener: UnixListener, side: Side, info: Info, token: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let me = crate::fsutil::effective_uid();
    loop {
        let permit = tokio::select! {
            _ = token.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = token.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    continue;
                }
            },
        };
        let side = side.clone();
        let info = info.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = handle(stream, side, info, me).await {
                warn!(error = %e, "admin request failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, side: Side, info: Info, me: u32) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    // The request is read (bounded) even from a refused peer, so that the refusal is an
    // answer it can read rather than a broken pipe under its request.
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let read_request = reader.read_line(&mut line);
    if !peer_allowed(peer.uid(), me) {
        warn!(peer_uid = peer.uid(), peer_pid = ?peer.pid(), "admin socket: refused a connection from another user");
        let _ = tokio::time::timeout(IO_TIMEOUT, read_request).await;
        let refusal = Answer::Err(OpError::new(
            Kind::Failed,
            format!(
                "the daemon's admin socket takes commands only from its own user (uid {me}) or root, not uid {}",
                peer.uid()
            ),
        ));
        return send_answer(&mut write, &refusal).await;
    }
    let answer = match tokio::time::timeout(IO_TIMEOUT, read_request).await {
        Err(_) => Answer::Err(OpError::new(
            Kind::Invalid,
            format!("no complete admin request within {}s", IO_TIMEOUT.as_secs()),
        )),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if !line.ends_with('\n') => Answer::Err(OpError::new(
            Kind::Invalid,
            format!("admin request incomplete or larger than {MAX_REQUEST} bytes"),
        )),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => match dispatch(&side, &info, req).await {
                Ok(v) => Answer::Ok(v),
                Err(e) => Answer::Err(e),
            },
            Err(e) => Answer::Err(OpError::new(Kind::Invalid, format!("malformed admin request: {e}"))),
        },
    };
    send_answer(&mut write, &answer).await
}

async fn send_answer(write: &mut tokio::net::unix::OwnedWriteHalf, answer: &Answer) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(answer).unwrap_or_default();
    out.push(b'\n');
    let send = async {
        write.write_all(&out).await?;
        write.shutdown().await
    };
    tokio::time::timeout(IO_TIMEOUT, send)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the admin client did not take its answer"))?
}

/// Sends `req` to the daemon of `data_dir`. `Ok(None)` when no daemon listens there.
pub async fn call(data_dir: &Path, req: &Request) -> OpResult<Option<serde_json::Value>> {
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(OpError::new(
                Kind::Failed,
                format!("cannot reach the daemon's admin socket {}: {e}", path.display()),
            ))
        }
    };
    let io = |e: std::io::Error| OpError::new(Kind::Failed, format!("admin socket {}: {e}", path.display()));
    let (read, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(req).map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
    out.push(b'\n');
    let silent = |what: &str, limit: Duration| {
        OpError::new(
            Kind::Failed,
            format!(
                "the daemon did not {what} on its admin socket {} within {}s",
                path.display(),
                limit.as_secs()
            ),
        )
    };
    tokio::time::timeout(IO_TIMEOUT, write.write_all(&out))
        .await
        .map_err(|_| silent("take the request", IO_TIMEOUT))?
        .map_err(io)?;
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE));
    tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| silent("answer", ANSWER_TIMEOUT))?
        .map_err(io)?;
    match serde_json::from_str::<Answer>(&line) {
        Ok(Answer::Ok(v)) => Ok(Some(v)),
        Ok(Answer::Err(e)) => Err(e),
        Err(e) => Err(OpError::new(
            Kind::Failed,
            format!("malformed answer from the daemon: {e}"),
        )),
    }
}
