//! What the node and the agent keep, behind one boundary: durable FIFO queues and small
//! record tables, with one module per storage engine. [`sled`] (embedded, the default, and
//! the agent's only engine) and [`postgres`] (the node's, when several replicas share one
//! database) are the only modules that touch their engine.
//!
//! The types here are what every engine speaks: messages, bounds, counters and the errors the
//! intake maps to HTTP statuses. [`NodeQueue`] and [`NodeStore`] are the contract an engine
//! keeps for the node, checked for both engines by one conformance suite.

use std::future::Future;

use bytes::Bytes;
use serde::Serialize;

pub mod postgres;
pub mod sled;

pub use self::sled::{Queue, SledQueue, SledTable, Store, SyncCounts, Table};

/// Errors from the store and its queues; the intake maps them to HTTP statuses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The queue holds its maximum number of messages (dead letters included).
    #[error("queue {queue} is full: {count} messages queued, {dead_letters} of them dead letters (limit {limit}); retry later, and retry or drop dead letters")]
    FullCount {
        /// Queue name.
        queue: String,
        /// Messages and dead letters held now.
        count: u64,
        /// Dead letters among them.
        dead_letters: u64,
        /// Configured limit.
        limit: u64,
    },
    /// The queue holds its maximum number of bytes (dead letters included).
    #[error("queue {queue} is full: {bytes} bytes queued, {dead_letter_bytes} of them in dead letters (limit {limit}); retry later, and retry or drop dead letters")]
    FullBytes {
        /// Queue name.
        queue: String,
        /// Payload bytes held now, dead letters included.
        bytes: u64,
        /// Bytes in dead letters among them.
        dead_letter_bytes: u64,
        /// Configured limit.
        limit: u64,
    },
    /// A peer sent a message under a sequence number this queue already used for another
    /// message: the peer's data directory was restored from a backup or copied.
    #[error(
        "sequence conflict in {queue}: the peer sent message {seq} with id {sent_id}, but {}; \
         this side holds messages up to {high_water}. The peer's data directory was probably \
         restored from a backup or copied; nothing from this batch was stored",
        match held_id { Some(h) => format!("this side took id {h} under that number"), None => "that number is older than the retries this side accepts".to_owned() }
    )]
    SequenceConflict {
        /// Queue name.
        queue: String,
        /// The conflicting sequence number.
        seq: u64,
        /// The id the peer sent under it.
        sent_id: String,
        /// The id this side stored under it, when it still remembers.
        held_id: Option<String>,
        /// This side's high-water mark.
        high_water: u64,
    },
    /// The database failed (disk full, I/O error); the store stays failed until restart.
    #[error("storage failed: {0}")]
    Storage(String),
    /// Another process holds the database.
    #[error("the data directory {0} is in use by another relay process")]
    Locked(String),
    /// A stored record could not be decoded.
    #[error("corrupt record in {0}")]
    Corrupt(String),
    /// The database server cannot be reached or refused the session; nothing was stored, and
    /// the same request may be retried.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is not the one this build speaks.
    #[error("{0}")]
    Schema(String),
    /// A write made under a lease that another replica holds now: refused, so a stalled
    /// former owner changes nothing after the takeover.
    #[error("the lease on connection {connection} passed to another replica (this replica held epoch {epoch}); the write was refused")]
    Fenced {
        /// The connection.
        connection: String,
        /// The epoch this replica held.
        epoch: i64,
    },
}

/// Bounds of one queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum messages queued.
    pub max_messages: u64,
    /// Maximum payload bytes queued.
    pub max_bytes: u64,
}

/// A message as queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Per-queue sequence number, from 1.
    pub seq: u64,
    /// Stable message id, used as `Idempotency-Key` downstream.
    pub id: String,
    /// Content type as submitted.
    pub content_type: String,
    /// When it was first accepted (unix milliseconds).
    pub enqueued_at_ms: u64,
    /// The payload.
    pub body: Bytes,
}

/// A message waiting for a sequence number.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Stable message id.
    pub id: String,
    /// Content type.
    pub content_type: String,
    /// When it was accepted (unix milliseconds).
    pub enqueued_at_ms: u64,
    /// The payload.
    pub body: Bytes,
}

/// Result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number given to the message.
    pub seq: u64,
    /// Message id.
    pub id: String,
    /// True when an earlier request with the same idempotency key already queued it.
    pub duplicate: bool,
}

/// A message an endpoint refused for good.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// Sequence number.
    pub seq: u64,
    /// Message id.
    pub id: String,
    /// Content type.
    pub content_type: String,
    /// Payload size.
    pub bytes: u64,
    /// When it was accepted (unix milliseconds).
    pub enqueued_at_ms: u64,
    /// When it was dead-lettered (unix milliseconds).
    pub dead_at_ms: u64,
    /// Why.
    pub reason: String,
}

/// A snapshot of a queue's counters.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages queued.
    pub depth: u64,
    /// Payload bytes queued.
    pub bytes: u64,
    /// Highest sequence number appended.
    pub last_seq: u64,
    /// Accept time of the oldest queued message (unix milliseconds).
    pub oldest_enqueued_ms: Option<u64>,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Payload bytes in dead letters.
    #[serde(default)]
    pub dead_letter_bytes: u64,
}

/// The outcome of [`Queue::append_remote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAppended {
    /// The queue's high-water mark afterwards.
    pub high_water: u64,
    /// Messages stored (new ones; retried ones are skipped).
    pub stored: u64,
    /// The first jump in sequence numbers: messages the sender numbered but never sent.
    pub gap: Option<SequenceGap>,
}

/// Sequence numbers missing between what a queue held and what a peer sent next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceGap {
    /// The number expected next.
    pub expected: u64,
    /// The number received instead.
    pub got: u64,
}

/// How many of a peer's newest sequence numbers an inbox remembers the ids of. A sender
/// never sends a batch before the previous one is answered, so a true retry is never older
/// than two batches.
pub const RECENT_IDS: u64 = 2 * crate::protocol::MAX_BATCH_MESSAGES as u64;

/// Everything one queue holds, to move it from one engine to another (`relay node migrate
/// --from-sled`): its marks, messages, dead letters (with their payloads), idempotency keys
/// and the ids of the peer's newest numbers.
#[derive(Debug, Clone, Default)]
pub struct QueueImage {
    /// The high-water mark.
    pub last_seq: u64,
    /// What the peer acknowledged.
    pub acked: u64,
    /// What may have reached the peer.
    pub sent: u64,
    /// The messages, in order.
    pub messages: Vec<Message>,
    /// The dead letters, each with its payload.
    pub dead_letters: Vec<(DeadLetter, Bytes)>,
    /// Idempotency keys: key, number, message id, accept time (unix ms).
    pub idempotency_keys: Vec<(String, u64, String, u64)>,
    /// The ids taken from the peer under its newest numbers.
    pub peer_ids: Vec<(u64, String)>,
}

/// One replica's hold on a connection's side effects (its webhook delivery), numbered: each
/// takeover by another replica raises the epoch, and writes made under an older one are
/// refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The connection.
    pub connection: String,
    /// The replica that holds it.
    pub owner: String,
    /// Raised by each change of owner.
    pub epoch: i64,
}

/// One queue of the node, as every engine keeps it. Every write is durable (committed, or
/// flushed and synced) when its future resolves, so its caller may acknowledge it. Sequence
/// numbers are per queue, from 1, in commit order: a reader never skips a number that commits
/// later.
pub trait NodeQueue: Clone + Send + Sync + 'static {
    /// The queue's name.
    fn name(&self) -> &str;

    /// Appends a locally submitted message under the next number. An idempotency key seen
    /// before returns the first result (`duplicate`) and queues nothing.
    fn append(
        &self,
        msg: NewMessage,
        idempotency_key: Option<&str>,
    ) -> impl Future<Output = Result<Appended, QueueError>> + Send;

    /// Appends messages numbered by the peer (increasing): a retried one is skipped, one whose
    /// number this queue took for another message refuses the whole batch, and the prefix of
    /// new ones that fits is stored.
    fn append_remote(&self, msgs: Vec<Message>) -> impl Future<Output = Result<RemoteAppended, QueueError>> + Send;

    /// Up to `max_count` messages after `after`, stopping before `max_bytes` (always one when
    /// one exists).
    fn read_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Message>, QueueError>> + Send;

    /// Resolves once a message above `after` may be there to read; it may also resolve
    /// without one (the caller reads and waits again), never later than a few seconds after
    /// one committed.
    fn wait_after(&self, after: u64) -> impl Future<Output = ()> + Send;

    /// Like [`NodeQueue::read_after`], but an engine that commits in groups may hand on what
    /// is stored and not yet committed. Only for a queue whose sender keeps each message
    /// until this queue's commit covers it (one taken from the peer), so a message lost in a
    /// crash comes again with its id.
    fn read_stored_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Message>, QueueError>> + Send {
        self.read_after(after, max_count, max_bytes)
    }

    /// [`NodeQueue::wait_after`] for [`NodeQueue::read_stored_after`].
    fn wait_stored_after(&self, after: u64) -> impl Future<Output = ()> + Send {
        self.wait_after(after)
    }

    /// Bumped when a message reappears below what readers have seen (a retried dead letter):
    /// a reader that reads ahead drops what it read and reads again.
    fn kicks(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The oldest message queued.
    fn first(&self) -> impl Future<Output = Result<Option<Message>, QueueError>> + Send;

    /// Removes message `seq` (delivered); false when it was not there. Like every removal
    /// and [`NodeQueue::dead_letter`], it may be committed only with the next write: lost in
    /// a crash, the message is delivered again with its id, never lost.
    fn remove(&self, seq: u64) -> impl Future<Output = Result<bool, QueueError>> + Send;

    /// Removes every message through `seq` (the peer acknowledged them) and records the
    /// acknowledgement; returns how many went.
    fn remove_through(&self, seq: u64) -> impl Future<Output = Result<u64, QueueError>> + Send;

    /// The highest number the peer acknowledged through [`NodeQueue::remove_through`].
    fn acked_through(&self) -> impl Future<Output = Result<u64, QueueError>> + Send;

    /// Records that messages through `seq` were handed to the peer.
    fn note_sent(&self, seq: u64) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// The highest number that may have reached the peer.
    fn sent_through(&self) -> impl Future<Output = Result<u64, QueueError>> + Send;

    /// Moves every message never handed on above both `cursor` and the high-water mark, in
    /// order, all or nothing (the peer holds other messages under those numbers, from an
    /// earlier copy of this store); returns how many moved.
    fn renumber_unsent(&self, cursor: u64) -> impl Future<Output = Result<u64, QueueError>> + Send;

    /// Moves `msg` to the dead letters, with why.
    fn dead_letter(&self, msg: &Message, reason: &str) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// The newest `limit` dead letters, oldest first.
    fn dead_letters(&self, limit: usize) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send;

    /// Puts dead letter `seq` back in its place (a queue the peer numbers); false when absent.
    fn retry_dead_letter(&self, seq: u64) -> impl Future<Output = Result<bool, QueueError>> + Send;

    /// Queues dead letter `seq` again under a new number (a queue this side numbers); a
    /// retried submission with its idempotency key still finds it, under the number first given.
    fn requeue_dead_letter(&self, seq: u64) -> impl Future<Output = Result<Option<u64>, QueueError>> + Send;

    /// Drops dead letter `seq` for good; false when absent.
    fn drop_dead_letter(&self, seq: u64) -> impl Future<Output = Result<bool, QueueError>> + Send;

    /// The queue's counters.
    fn stats(&self) -> impl Future<Output = Result<QueueStats, QueueError>> + Send;

    /// Forgets idempotency keys accepted before `cutoff_ms`; returns how many.
    fn prune_idempotency_keys(&self, cutoff_ms: u64) -> impl Future<Output = Result<usize, QueueError>> + Send;
}

/// A table of small records (JSON), keyed by text. Every write is durable when it resolves.
pub trait NodeTable: Clone + Send + Sync + 'static {
    /// The record at `key`, as stored.
    fn get_raw(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, QueueError>> + Send;

    /// Stores `value` at `key`.
    fn put_raw(&self, key: &str, value: Vec<u8>) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Replaces the record at `key` only when it is still `expected` (`None`: absent), and
    /// stores `new` (`None`: removes); false, changing nothing, when another writer got there
    /// first. Two callers racing on one key, in this process or in another replica, cannot
    /// both succeed.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> impl Future<Output = Result<bool, QueueError>> + Send;

    /// Removes `key`.
    fn remove(&self, key: &str) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// The records whose keys start with `prefix`, in key order.
    fn list_prefix_raw(&self, prefix: &str) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, QueueError>> + Send;
}

/// Everything the node keeps, in one engine: its queues and its record tables.
pub trait NodeStore: Clone + Send + Sync + 'static {
    /// The engine's queues.
    type Queue: NodeQueue;
    /// The engine's tables.
    type Table: NodeTable;

    /// The queue `name`, made empty when new; `limits` bound it.
    fn queue(&self, name: &str, limits: Limits) -> impl Future<Output = Result<Self::Queue, QueueError>> + Send;

    /// The table `name`, made empty when new.
    fn table(&self, name: &str) -> impl Future<Output = Result<Self::Table, QueueError>> + Send;

    /// Writes a fresh record to a table of its own, reads it back and removes it (what
    /// `relay doctor` shows of the store).
    fn probe(&self) -> impl Future<Output = Result<(), QueueError>> + Send {
        async move {
            let table = self.table("store-probe").await?;
            let key = format!("probe-{}", crate::crypto::hex(&crate::crypto::random_bytes::<8>()));
            let value = crate::clock::now_ms().to_string().into_bytes();
            table.put_raw(&key, value.clone()).await?;
            let back = table.get_raw(&key).await?;
            table.remove(&key).await?;
            if back.as_deref() != Some(&value[..]) {
                return Err(QueueError::Storage(format!(
                    "a record written to {key} read back as {}",
                    back.map_or_else(|| "nothing".to_owned(), |b| String::from_utf8_lossy(&b).into_owned())
                )));
            }
            Ok(())
        }
    }
}

/// Reads the JSON record at `key` of `table`.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    table: &impl NodeTable,
    key: &str,
) -> Result<Option<T>, QueueError> {
    match table.get_raw(key).await? {
        Some(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| QueueError::Corrupt(format!("{key}: {e}"))),
        None => Ok(None),
    }
}

/// Stores `value` as JSON at `key` of `table`.
pub async fn put_json<T: Serialize>(table: &impl NodeTable, key: &str, value: &T) -> Result<(), QueueError> {
    let raw = serde_json::to_vec(value).map_err(|e| QueueError::Storage(e.to_string()))?;
    table.put_raw(key, raw).await
}

/// Keeps the first `max_count` messages, stopping before `max_bytes` but keeping at least one:
/// how every engine cuts a read.
pub fn cut_read(msgs: &mut Vec<Message>, max_count: usize, max_bytes: usize) {
    let mut total = 0usize;
    let mut keep = 0usize;
    for m in msgs.iter().take(max_count) {
        total += m.body.len();
        if keep > 0 && total > max_bytes {
            break;
        }
        keep += 1;
    }
    msgs.truncate(keep);
}

/// The node's store in the engine the settings chose.
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// sled, in the data directory.
    Sled(Store),
    /// PostgreSQL, shared by the replicas.
    Postgres(postgres::PgStore),
}

/// A queue of an [`AnyStore`].
#[derive(Clone, Debug)]
pub enum AnyQueue {
    /// A sled queue.
    Sled(SledQueue),
    /// A PostgreSQL queue.
    Postgres(postgres::PgQueue),
}

/// A table of an [`AnyStore`].
#[derive(Clone, Debug)]
pub enum AnyTable {
    /// A sled table.
    Sled(SledTable),
    /// A PostgreSQL table.
    Postgres(postgres::PgTable),
}

/// Runs `$body` with `$v` bound to the engine's value inside `$any`.
macro_rules! on_engine {
    ($any:expr, $enum:ident, $v:ident => $body:expr) => {
        match $any {
            $enum::Sled($v) => $body,
            $enum::Postgres($v) => $body,
        }
    };
}

impl AnyStore {
    /// The sled store, when that is the engine (the agent's, and what only sled has: its
    /// flush counters, the failure watch).
    pub fn sled(&self) -> Option<&Store> {
        match self {
            AnyStore::Sled(s) => Some(s),
            AnyStore::Postgres(_) => None,
        }
    }

    /// `Err` once the store failed for good (sled after an I/O error); PostgreSQL's errors
    /// are the request's, and its next request may succeed.
    pub fn check(&self) -> Result<(), QueueError> {
        match self {
            AnyStore::Sled(s) => s.check(),
            AnyStore::Postgres(_) => Ok(()),
        }
    }

    /// Resolves with the reason once the store failed for good (never, on PostgreSQL).
    pub async fn failed(&self) -> String {
        match self {
            AnyStore::Sled(s) => s.failed().await,
            AnyStore::Postgres(_) => std::future::pending().await,
        }
    }

    /// Group commits and file syncs so far (sled's; none on PostgreSQL, which commits each
    /// write itself).
    pub fn sync_counts(&self) -> (u64, u64) {
        match self {
            AnyStore::Sled(s) => s.sync_counts(),
            AnyStore::Postgres(_) => (0, 0),
        }
    }

    /// Forgets idempotency keys older than `ttl`, hourly, until `token` is cancelled.
    pub async fn prune_idempotency_keys(self, ttl: std::time::Duration, token: tokio_util::sync::CancellationToken) {
        loop {
            let cutoff = crate::clock::now_ms().saturating_sub(ttl.as_millis() as u64);
            let pruned = match &self {
                AnyStore::Sled(s) => s.prune_idempotency_keys(cutoff).await,
                AnyStore::Postgres(s) => s.prune_idempotency_keys(cutoff).await,
            };
            if let Err(e) = pruned {
                tracing::warn!(error = %e, "pruning idempotency keys failed");
            }
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
        }
    }

    /// Makes every write so far durable (sled's group commit; PostgreSQL commits each write).
    pub async fn flush(&self) -> Result<(), QueueError> {
        match self {
            AnyStore::Sled(s) => s.flush().await,
            AnyStore::Postgres(_) => Ok(()),
        }
    }
}

impl NodeStore for AnyStore {
    type Queue = AnyQueue;
    type Table = AnyTable;

    async fn queue(&self, name: &str, limits: Limits) -> Result<AnyQueue, QueueError> {
        Ok(match self {
            AnyStore::Sled(s) => AnyQueue::Sled(NodeStore::queue(s, name, limits).await?),
            AnyStore::Postgres(s) => AnyQueue::Postgres(NodeStore::queue(s, name, limits).await?),
        })
    }

    async fn table(&self, name: &str) -> Result<AnyTable, QueueError> {
        Ok(match self {
            AnyStore::Sled(s) => AnyTable::Sled(NodeStore::table(s, name).await?),
            AnyStore::Postgres(s) => AnyTable::Postgres(NodeStore::table(s, name).await?),
        })
    }
}

impl AnyQueue {
    /// This queue with its writes made under `lease` (refused once another replica holds
    /// it); sled's single process needs no fence.
    pub fn fenced(&self, lease: &Lease) -> AnyQueue {
        match self {
            AnyQueue::Sled(q) => AnyQueue::Sled(q.clone()),
            AnyQueue::Postgres(q) => AnyQueue::Postgres(q.fenced(lease)),
        }
    }
}

impl NodeQueue for AnyQueue {
    fn name(&self) -> &str {
        on_engine!(self, AnyQueue, q => q.name())
    }

    async fn append(&self, msg: NewMessage, idempotency_key: Option<&str>) -> Result<Appended, QueueError> {
        on_engine!(self, AnyQueue, q => q.append(msg, idempotency_key).await)
    }

    async fn append_remote(&self, msgs: Vec<Message>) -> Result<RemoteAppended, QueueError> {
        on_engine!(self, AnyQueue, q => q.append_remote(msgs).await)
    }

    async fn read_after(&self, after: u64, max_count: usize, max_bytes: usize) -> Result<Vec<Message>, QueueError> {
        on_engine!(self, AnyQueue, q => q.read_after(after, max_count, max_bytes).await)
    }

    async fn wait_after(&self, after: u64) {
        on_engine!(self, AnyQueue, q => q.wait_after(after).await)
    }

    async fn read_stored_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>, QueueError> {
        on_engine!(self, AnyQueue, q => q.read_stored_after(after, max_count, max_bytes).await)
    }

    async fn wait_stored_after(&self, after: u64) {
        on_engine!(self, AnyQueue, q => q.wait_stored_after(after).await)
    }

    fn kicks(&self) -> tokio::sync::watch::Receiver<u64> {
        on_engine!(self, AnyQueue, q => q.kicks())
    }

    async fn first(&self) -> Result<Option<Message>, QueueError> {
        on_engine!(self, AnyQueue, q => q.first().await)
    }

    async fn remove(&self, seq: u64) -> Result<bool, QueueError> {
        on_engine!(self, AnyQueue, q => q.remove(seq).await)
    }

    async fn remove_through(&self, seq: u64) -> Result<u64, QueueError> {
        on_engine!(self, AnyQueue, q => q.remove_through(seq).await)
    }

    async fn acked_through(&self) -> Result<u64, QueueError> {
        on_engine!(self, AnyQueue, q => q.acked_through().await)
    }

    async fn note_sent(&self, seq: u64) -> Result<(), QueueError> {
        on_engine!(self, AnyQueue, q => q.note_sent(seq).await)
    }

    async fn sent_through(&self) -> Result<u64, QueueError> {
        on_engine!(self, AnyQueue, q => q.sent_through().await)
    }

    async fn renumber_unsent(&self, cursor: u64) -> Result<u64, QueueError> {
        on_engine!(self, AnyQueue, q => q.renumber_unsent(cursor).await)
    }

    async fn dead_letter(&self, msg: &Message, reason: &str) -> Result<(), QueueError> {
        on_engine!(self, AnyQueue, q => q.dead_letter(msg, reason).await)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        on_engine!(self, AnyQueue, q => q.dead_letters(limit).await)
    }

    async fn retry_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        on_engine!(self, AnyQueue, q => q.retry_dead_letter(seq).await)
    }

    async fn requeue_dead_letter(&self, seq: u64) -> Result<Option<u64>, QueueError> {
        on_engine!(self, AnyQueue, q => q.requeue_dead_letter(seq).await)
    }

    async fn drop_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        on_engine!(self, AnyQueue, q => q.drop_dead_letter(seq).await)
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        on_engine!(self, AnyQueue, q => q.stats().await)
    }

    async fn prune_idempotency_keys(&self, cutoff_ms: u64) -> Result<usize, QueueError> {
        on_engine!(self, AnyQueue, q => q.prune_idempotency_keys(cutoff_ms).await)
    }
}

impl NodeTable for AnyTable {
    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, QueueError> {
        on_engine!(self, AnyTable, t => t.get_raw(key).await)
    }

    async fn put_raw(&self, key: &str, value: Vec<u8>) -> Result<(), QueueError> {
        on_engine!(self, AnyTable, t => t.put_raw(key, value).await)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, QueueError> {
        on_engine!(self, AnyTable, t => t.compare_and_swap(key, expected, new).await)
    }

    async fn remove(&self, key: &str) -> Result<(), QueueError> {
        on_engine!(self, AnyTable, t => t.remove(key).await)
    }

    async fn list_prefix_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
        on_engine!(self, AnyTable, t => t.list_prefix_raw(prefix).await)
    }
}
