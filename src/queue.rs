//! Durable FIFO queues and small record tables over sled: the only module that touches sled.
//!
//! One [`Store`] per data directory holds every queue. A queue is one sled tree whose keys are
//! `m` + sequence number (big-endian, so sled's order is FIFO order), `i` + idempotency key,
//! `d` + sequence number for dead letters and `s` for the high-water mark. Every write is a
//! single-key insert or remove, never a multi-key batch: in sled 0.34 a batch takes a global
//! lock that a running flush holds off, which would serialise appends behind the disk.
//! Multi-key changes are ordered so a crash in between leaves a message twice (delivered
//! again, same id), never lost; counters live in memory and are rebuilt on open.
//!
//! Writes land in memory first. [`Store::flush`] is group commit: every caller waiting at the
//! same moment shares one fsync. Readers only see messages up to a queue's *durable* sequence
//! number, advanced after a flush, so nothing that could vanish in a crash is ever handed on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{oneshot, watch};

/// Errors from the store and its queues; the intake maps them to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue holds its maximum number of messages.
    #[error("queue {queue} is full: {count} messages queued (limit {limit}); retry later")]
    FullCount {
        /// Queue name.
        queue: String,
        /// Messages queued now.
        count: u64,
        /// Configured limit.
        limit: u64,
    },
    /// The queue holds its maximum number of bytes.
    #[error("queue {queue} is full: {bytes} bytes queued (limit {limit}); retry later")]
    FullBytes {
        /// Queue name.
        queue: String,
        /// Bytes queued now.
        bytes: u64,
        /// Configured limit.
        limit: u64,
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
}

impl From<sled::Error> for QueueError {
    fn from(e: sled::Error) -> Self {
        QueueError::Storage(e.to_string())
    }
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
}

const STATE_KEY: &[u8] = b"s";
const MSG_PREFIX: u8 = b'm';
const IDEM_PREFIX: u8 = b'i';
const DEAD_PREFIX: u8 = b'd';
const RECORD_VERSION: u8 = 1;

/// A queue's counters, kept in memory and rebuilt from the tree when it is opened.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    last_seq: u64,
    count: u64,
    bytes: u64,
    dead: u64,
}

/// The persisted high-water mark: version byte, then the last sequence number.
fn encode_high_water(last_seq: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = RECORD_VERSION;
    out[1..].copy_from_slice(&last_seq.to_be_bytes());
    out
}

fn decode_high_water(raw: &[u8]) -> Option<u64> {
    if raw.first() != Some(&RECORD_VERSION) {
        return None;
    }
    Some(u64::from_be_bytes(raw.get(1..9)?.try_into().ok()?))
}

/// Payload length of a stored message, from its header alone.
fn stored_body_len(raw: &[u8]) -> usize {
    let field = |pos: usize| raw.get(pos..pos + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
    let Some(id_len) = field(9) else { return 0 };
    let Some(ct_len) = field(11 + id_len) else { return 0 };
    raw.len().saturating_sub(13 + id_len + ct_len)
}

fn key(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(1..9)?.try_into().ok()?))
}

/// Stored message layout: version, enqueued_at, id, content type, body.
fn encode_message(id: &str, content_type: &str, enqueued_at_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 + 4 + id.len() + content_type.len() + body.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&enqueued_at_ms.to_be_bytes());
    out.extend_from_slice(&(id.len() as u16).to_be_bytes());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&(content_type.len() as u16).to_be_bytes());
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(body);
    out
}

fn decode_message(seq: u64, raw: &sled::IVec) -> Option<Message> {
    let b: &[u8] = raw;
    if b.first() != Some(&RECORD_VERSION) {
        return None;
    }
    let enqueued_at_ms = u64::from_be_bytes(b.get(1..9)?.try_into().ok()?);
    let mut pos = 9;
    let mut field = || -> Option<String> {
        let len = u16::from_be_bytes(b.get(pos..pos + 2)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(b.get(pos + 2..pos + 2 + len)?).ok()?.to_owned();
        pos += 2 + len;
        Some(s)
    };
    let id = field()?;
    let content_type = field()?;
    Some(Message {
        seq,
        id,
        content_type,
        enqueued_at_ms,
        body: Bytes::copy_from_slice(b.get(pos..)?),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type FlushReply = oneshot::Sender<Result<(), QueueError>>;

struct StoreInner {
    db: sled::Db,
    queues: Mutex<HashMap<String, Weak<QueueShared>>>,
    flush_tx: std::sync::mpsc::Sender<FlushReply>,
    failure: Mutex<Option<String>>,
    failed_tx: watch::Sender<bool>,
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        if lock(&self.failure).is_some() {
            // sled flushes when its last handle drops, and after a disk failure that flush
            // waits forever. Keeping one handle alive skips it; the process is exiting.
            std::mem::forget(self.db.clone());
        }
    }
}

/// The database of one data directory. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind, still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens (creating if needed) the database in `dir`, and starts its group-commit thread.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Store, QueueError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    QueueError::Locked(dir.display().to_string())
                }
                sled::Error::Io(ref io) if io.to_string().contains("lock") => {
                    QueueError::Locked(dir.display().to_string())
                }
                other => QueueError::Storage(format!("opening {}: {other}", dir.display())),
            })?;
        let (flush_tx, flush_rx) = std::sync::mpsc::channel();
        let inner = Arc::new(StoreInner {
            db,
            queues: Mutex::new(HashMap::new()),
            flush_tx,
            failure: Mutex::new(None),
            failed_tx: watch::channel(false).0,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("relay-flush".into())
            .spawn(move || run_flusher(weak, flush_rx))
            .map_err(|e| QueueError::Storage(format!("cannot start the flush thread: {e}")))?;
        Ok(Store { inner })
    }

    /// Makes every write so far durable. Concurrent callers share one fsync.
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.check()?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .flush_tx
            .send(tx)
            .map_err(|_| QueueError::Storage("the flusher has stopped".into()))?;
        rx.await
            .map_err(|_| QueueError::Storage("the flusher has stopped".into()))?
    }

    /// Resolves with the reason once the database has failed (disk full, I/O error). sled
    /// cannot recover in-process, so the daemon stops and its supervisor restarts it.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.failed_tx.subscribe();
        let _ = rx.wait_for(|f| *f).await;
        lock(&self.inner.failure).clone().unwrap_or_default()
    }

    /// `Err` once the database has failed; it stays failed until the process restarts.
    pub fn check(&self) -> Result<(), QueueError> {
        match lock(&self.inner.failure).as_ref() {
            Some(reason) => Err(QueueError::Storage(reason.clone())),
            None => Ok(()),
        }
    }

    /// The queue called `name`, created empty on first use.
    pub fn queue(&self, name: &str, limits: Limits) -> Result<Queue, QueueError> {
        let mut queues = lock(&self.inner.queues);
        if let Some(shared) = queues.get(name).and_then(Weak::upgrade) {
            lock(&shared.state).limits = limits;
            return Ok(Queue { shared });
        }
        let tree = self.inner.db.open_tree(format!("queue/{name}"))?;
        let persisted_hw = match tree.get(STATE_KEY)? {
            Some(raw) => decode_high_water(&raw).ok_or_else(|| QueueError::Corrupt(name.into()))?,
            None => 0,
        };
        // Counters live in memory (updating a record with every message would need sled's
        // batches); one pass over the queue rebuilds them.
        let mut counters = Counters {
            last_seq: persisted_hw,
            ..Counters::default()
        };
        for item in tree.scan_prefix([MSG_PREFIX]) {
            let (k, v) = item?;
            counters.count += 1;
            counters.bytes += stored_body_len(&v) as u64;
            counters.last_seq = counters.last_seq.max(seq_of(&k).unwrap_or(0));
        }
        for item in tree.scan_prefix([DEAD_PREFIX]).keys() {
            counters.dead += 1;
            counters.last_seq = counters.last_seq.max(seq_of(&item?).unwrap_or(0));
        }
        let (durable_tx, _) = watch::channel(counters.last_seq);
        let shared = Arc::new(QueueShared {
            name: name.to_owned(),
            tree,
            store: Arc::downgrade(&self.inner),
            state: Mutex::new(QueueState {
                counters,
                limits,
                persisted_hw,
            }),
            durable_tx,
            kicks: watch::channel(0).0,
        });
        queues.insert(name.to_owned(), Arc::downgrade(&shared));
        Ok(Queue { shared })
    }

    /// Forgets intake idempotency keys older than `ttl` in every open queue, once an hour,
    /// until `token` is cancelled; keeps the key index bounded on both sides.
    pub async fn prune_idempotency_keys(self, ttl: std::time::Duration, token: tokio_util::sync::CancellationToken) {
        loop {
            let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
            let queues: Vec<Arc<QueueShared>> = lock(&self.inner.queues).values().filter_map(Weak::upgrade).collect();
            for shared in queues {
                if let Err(e) = (Queue { shared }).prune_idempotency_keys(cutoff) {
                    tracing::warn!(error = %e, "pruning idempotency keys failed");
                }
            }
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
        }
    }

    /// A table of JSON records called `name`.
    pub fn table(&self, name: &str) -> Result<Table, QueueError> {
        Ok(Table {
            name: name.to_owned(),
            tree: self.inner.db.open_tree(format!("table/{name}"))?,
        })
    }
}

fn fail(inner: &StoreInner, reason: String) -> QueueError {
    let mut failure = lock(&inner.failure);
    if failure.is_none() {
        tracing::error!(error = %reason, "storage failed; refusing new work and stopping");
        *failure = Some(reason.clone());
        inner.failed_tx.send_replace(true);
    }
    QueueError::Storage(reason)
}

/// Under load, how long a flush waits for more submitters to join it.
const GROUP_COMMIT_LINGER: std::time::Duration = std::time::Duration::from_micros(150);
/// Waiters above which a flush starts at once.
const GROUP_COMMIT_MAX: usize = 256;

/// The group-commit loop, on its own thread: the fsync blocks, and a dedicated thread saves the
/// hand-offs a blocking-pool task would add to every flush.
fn run_flusher(store: Weak<StoreInner>, rx: std::sync::mpsc::Receiver<FlushReply>) {
    let mut busy = false;
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        // When the last flush was shared, more submitters are probably on their way.
        let linger_until = std::time::Instant::now() + if busy { GROUP_COMMIT_LINGER } else { Default::default() };
        loop {
            while let Ok(more) = rx.try_recv() {
                waiters.push(more);
            }
            let now = std::time::Instant::now();
            if waiters.len() >= GROUP_COMMIT_MAX || now >= linger_until {
                break;
            }
            match rx.recv_timeout(linger_until - now) {
                Ok(more) => waiters.push(more),
                Err(_) => break,
            }
        }
        busy = waiters.len() > 1;
        let Some(inner) = store.upgrade() else { return };
        // Everything appended before this point is covered by the flush below.
        let marks: Vec<(Arc<QueueShared>, u64)> = lock(&inner.queues)
            .values()
            .filter_map(Weak::upgrade)
            .map(|q| {
                let last = lock(&q.state).counters.last_seq;
                (q, last)
            })
            .collect();
        let result = match inner.db.flush() {
            Ok(_) => Ok(()),
            Err(e) => Err(fail(&inner, format!("flush: {e}"))),
        };
        drop(inner);
        if result.is_ok() {
            for (q, mark) in marks {
                q.durable_tx.send_if_modified(|d| {
                    let moved = mark > *d;
                    if moved {
                        *d = mark;
                    }
                    moved
                });
            }
        }
        for w in waiters {
            let _ = w.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(QueueError::Storage(e.to_string())),
            });
        }
    }
}

struct QueueState {
    counters: Counters,
    limits: Limits,
    /// The high-water mark last written to the tree.
    persisted_hw: u64,
}

struct QueueShared {
    name: String,
    tree: sled::Tree,
    store: Weak<StoreInner>,
    state: Mutex<QueueState>,
    /// Highest sequence number known to be on disk.
    durable_tx: watch::Sender<u64>,
    /// Bumped when a message reappears below the durable mark (a retried dead letter).
    kicks: watch::Sender<u64>,
}

/// One durable FIFO. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<QueueShared>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.shared.name).finish()
    }
}

impl Queue {
    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    fn storage(&self, e: sled::Error) -> QueueError {
        match self.shared.store.upgrade() {
            Some(inner) => fail(&inner, e.to_string()),
            None => QueueError::Storage(e.to_string()),
        }
    }

    fn check(&self) -> Result<(), QueueError> {
        match self.shared.store.upgrade() {
            Some(inner) => Store { inner }.check(),
            None => Err(QueueError::Storage("the store is closed".into())),
        }
    }

    /// Persists the high-water mark before anything is removed, so a sequence number is never
    /// handed out twice even when the queue empties (the peer deduplicates by it).
    fn persist_high_water(&self, st: &mut QueueState) -> Result<(), QueueError> {
        if st.persisted_hw < st.counters.last_seq {
            self.shared
                .tree
                .insert(STATE_KEY, &encode_high_water(st.counters.last_seq)[..])
                .map_err(|e| self.storage(e))?;
            st.persisted_hw = st.counters.last_seq;
        }
        Ok(())
    }

    fn check_room(&self, c: &Counters, limits: &Limits, n: u64, bytes: u64) -> Result<(), QueueError> {
        if c.count + n > limits.max_messages {
            return Err(QueueError::FullCount {
                queue: self.shared.name.clone(),
                count: c.count,
                limit: limits.max_messages,
            });
        }
        if c.bytes + bytes > limits.max_bytes {
            return Err(QueueError::FullBytes {
                queue: self.shared.name.clone(),
                bytes: c.bytes,
                limit: limits.max_bytes,
            });
        }
        Ok(())
    }

    /// Appends a locally submitted message, giving it the next sequence number. With an
    /// idempotency key seen before, returns the first result and queues nothing. The message
    /// is durable only after the next [`Store::flush`].
    pub fn append(&self, msg: NewMessage, idempotency_key: Option<&str>) -> Result<Appended, QueueError> {
        self.check()?;
        let mut st = lock(&self.shared.state);
        let idem_key = idempotency_key.map(|k| {
            let mut v = vec![IDEM_PREFIX];
            v.extend_from_slice(k.as_bytes());
            v
        });
        if let Some(k) = &idem_key {
            if let Some(raw) = self.shared.tree.get(k).map_err(|e| self.storage(e))? {
                let seq = seq_of(&raw).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
                let id = std::str::from_utf8(raw.get(17..).unwrap_or_default())
                    .map_err(|_| QueueError::Corrupt(self.shared.name.clone()))?
                    .to_owned();
                return Ok(Appended {
                    seq,
                    id,
                    duplicate: true,
                });
            }
        }
        let size = msg.body.len() as u64;
        let limits = st.limits;
        self.check_room(&st.counters, &limits, 1, size)?;
        let seq = st.counters.last_seq + 1;
        // Single-key writes only: sled's multi-key batches take a global lock that a running
        // flush holds off, which would serialise every append behind the disk.
        self.shared
            .tree
            .insert(
                key(MSG_PREFIX, seq),
                encode_message(&msg.id, &msg.content_type, msg.enqueued_at_ms, &msg.body),
            )
            .map_err(|e| self.storage(e))?;
        st.counters.last_seq = seq;
        st.counters.count += 1;
        st.counters.bytes += size;
        if let Some(k) = idem_key {
            // Written after the message, so whenever the key is on disk the message is too.
            let mut v = vec![IDEM_PREFIX];
            v.extend_from_slice(&seq.to_be_bytes());
            v.extend_from_slice(&now_ms().to_be_bytes());
            v.extend_from_slice(msg.id.as_bytes());
            self.shared.tree.insert(k, v).map_err(|e| self.storage(e))?;
        }
        Ok(Appended {
            seq,
            id: msg.id,
            duplicate: false,
        })
    }

    /// Appends messages that already carry the sender's sequence numbers, skipping every one at
    /// or below the queue's high-water mark (a retried batch), and storing the prefix that
    /// fits the queue's bounds. Returns the new high-water mark; `Err` when nothing fits.
    /// Durable after the next [`Store::flush`]; sled's log keeps writes in order, so a crash
    /// leaves a prefix, which the sender offers again.
    pub fn append_remote(&self, msgs: &[Message]) -> Result<u64, QueueError> {
        self.check()?;
        let mut st = lock(&self.shared.state);
        let limits = st.limits;
        let mut stored = 0usize;
        for m in msgs {
            if m.seq <= st.counters.last_seq {
                continue; // already held (a retried batch), or out of order: never go back
            }
            if let Err(full) = self.check_room(&st.counters, &limits, 1, m.body.len() as u64) {
                if stored == 0 {
                    return Err(full);
                }
                break;
            }
            if m.seq != st.counters.last_seq + 1 {
                tracing::warn!(queue = %self.shared.name, expected = st.counters.last_seq + 1, got = m.seq, "sequence gap from peer");
            }
            self.shared
                .tree
                .insert(
                    key(MSG_PREFIX, m.seq),
                    encode_message(&m.id, &m.content_type, m.enqueued_at_ms, &m.body),
                )
                .map_err(|e| self.storage(e))?;
            st.counters.last_seq = m.seq;
            st.counters.count += 1;
            st.counters.bytes += m.body.len() as u64;
            stored += 1;
        }
        Ok(st.counters.last_seq)
    }

    /// Removes the message `seq` alone (delivered to the webhook). Not flushed: after a crash
    /// it is delivered again, never lost.
    pub fn remove(&self, seq: u64) -> Result<bool, QueueError> {
        let mut st = lock(&self.shared.state);
        self.persist_high_water(&mut st)?;
        let Some(v) = self
            .shared
            .tree
            .remove(key(MSG_PREFIX, seq))
            .map_err(|e| self.storage(e))?
        else {
            return Ok(false);
        };
        st.counters.count = st.counters.count.saturating_sub(1);
        st.counters.bytes = st.counters.bytes.saturating_sub(stored_body_len(&v) as u64);
        Ok(true)
    }

    /// Highest sequence number appended (durable or not): the high-water mark.
    pub fn last_seq(&self) -> u64 {
        lock(&self.shared.state).counters.last_seq
    }

    /// Highest sequence number known to be on disk.
    pub fn durable_seq(&self) -> u64 {
        *self.shared.durable_tx.borrow()
    }

    /// Resolves once a message with a sequence number above `after` is durable.
    pub async fn wait_durable_after(&self, after: u64) {
        let mut rx = self.shared.durable_tx.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|d| *d > after).await;
    }

    /// Up to `max_count` durable messages with sequence numbers above `after`, stopping before
    /// `max_bytes` is exceeded (but always at least one message when one exists).
    pub fn read_after(&self, after: u64, max_count: usize, max_bytes: usize) -> Result<Vec<Message>, QueueError> {
        let durable = self.durable_seq();
        if durable <= after {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut total = 0usize;
        let range = key(MSG_PREFIX, after.saturating_add(1))..=key(MSG_PREFIX, durable);
        for item in self.shared.tree.range(range) {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let seq = seq_of(&k).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
            let msg = decode_message(seq, &v).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
            if !out.is_empty() && (out.len() >= max_count || total + msg.body.len() > max_bytes) {
                break;
            }
            total += msg.body.len();
            out.push(msg);
        }
        Ok(out)
    }

    /// The oldest durable message.
    pub fn first(&self) -> Result<Option<Message>, QueueError> {
        Ok(self.read_after(0, 1, usize::MAX)?.into_iter().next())
    }

    /// Removes every message with a sequence number up to and including `seq` (they reached
    /// the next hop). Not flushed: after a crash they are handed on again, never lost.
    pub fn remove_through(&self, seq: u64) -> Result<u64, QueueError> {
        let mut st = lock(&self.shared.state);
        let keys: Vec<sled::IVec> = self
            .shared
            .tree
            .range(key(MSG_PREFIX, 0)..=key(MSG_PREFIX, seq))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.storage(e))?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.persist_high_water(&mut st)?;
        let mut removed = 0;
        for k in keys {
            if let Some(v) = self.shared.tree.remove(k).map_err(|e| self.storage(e))? {
                st.counters.count = st.counters.count.saturating_sub(1);
                st.counters.bytes = st.counters.bytes.saturating_sub(stored_body_len(&v) as u64);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// A receiver that changes whenever a message reappears in the queue without the durable
    /// mark moving (an operator retried a dead letter); consumers wait on it beside
    /// [`Queue::wait_durable_after`].
    pub fn kicks(&self) -> watch::Receiver<u64> {
        self.shared.kicks.subscribe()
    }

    /// Puts dead letter `seq` back into the queue at its own sequence number, ahead of
    /// everything queued after it; `false` when there is no such dead letter. Durable after
    /// the next [`Store::flush`].
    pub fn retry_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        self.check()?;
        let mut st = lock(&self.shared.state);
        let dk = key(DEAD_PREFIX, seq);
        let Some(raw) = self.shared.tree.get(dk).map_err(|e| self.storage(e))? else {
            return Ok(false);
        };
        let len = raw.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        let stored = len
            .and_then(|l| raw.get(4 + l as usize..))
            .ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
        let size = stored_body_len(stored) as u64;
        let limits = st.limits;
        self.check_room(&st.counters, &limits, 1, size)?;
        // The sequence number is kept: an inbox's numbers belong to the sending peer. The
        // message goes in before the dead letter goes out, so a crash between keeps both.
        self.shared
            .tree
            .insert(key(MSG_PREFIX, seq), stored)
            .map_err(|e| self.storage(e))?;
        self.shared.tree.remove(dk).map_err(|e| self.storage(e))?;
        st.counters.count += 1;
        st.counters.bytes += size;
        st.counters.dead = st.counters.dead.saturating_sub(1);
        drop(st);
        self.shared.kicks.send_modify(|k| *k += 1);
        Ok(true)
    }

    /// Puts dead letter `seq` back at the END of a queue this side numbers (an outbox), under
    /// a new sequence number and its own message id; `None` when there is no such dead letter.
    /// Its old number is at or below the peer's high-water mark, so the peer would skip it
    /// there. The message goes in before the dead letter goes out: a crash between keeps both.
    /// Durable after the next [`Store::flush`].
    pub fn requeue_dead_letter(&self, seq: u64) -> Result<Option<u64>, QueueError> {
        self.check()?;
        let mut st = lock(&self.shared.state);
        let dk = key(DEAD_PREFIX, seq);
        let Some(raw) = self.shared.tree.get(dk).map_err(|e| self.storage(e))? else {
            return Ok(None);
        };
        let len = raw.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        let stored = len
            .and_then(|l| raw.get(4 + l as usize..))
            .ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
        let size = stored_body_len(stored) as u64;
        let limits = st.limits;
        self.check_room(&st.counters, &limits, 1, size)?;
        let new_seq = st.counters.last_seq + 1;
        self.shared
            .tree
            .insert(key(MSG_PREFIX, new_seq), stored)
            .map_err(|e| self.storage(e))?;
        st.counters.last_seq = new_seq;
        st.counters.count += 1;
        st.counters.bytes += size;
        self.shared.tree.remove(dk).map_err(|e| self.storage(e))?;
        st.counters.dead = st.counters.dead.saturating_sub(1);
        Ok(Some(new_seq))
    }

    /// Deletes dead letter `seq` for good; `false` when there is no such dead letter.
    pub fn drop_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        self.check()?;
        let mut st = lock(&self.shared.state);
        if self
            .shared
            .tree
            .remove(key(DEAD_PREFIX, seq))
            .map_err(|e| self.storage(e))?
            .is_none()
        {
            return Ok(false);
        }
        st.counters.dead = st.counters.dead.saturating_sub(1);
        Ok(true)
    }

    /// Moves a message to the dead-letter list with the reason.
    pub fn dead_letter(&self, msg: &Message, reason: &str) -> Result<(), QueueError> {
        let mut st = lock(&self.shared.state);
        self.persist_high_water(&mut st)?;
        let record = DeadLetter {
            seq: msg.seq,
            id: msg.id.clone(),
            content_type: msg.content_type.clone(),
            bytes: msg.body.len() as u64,
            enqueued_at_ms: msg.enqueued_at_ms,
            dead_at_ms: now_ms(),
            reason: reason.to_owned(),
        };
        let meta = serde_json::to_vec(&record).map_err(|e| QueueError::Storage(e.to_string()))?;
        // Keep the payload so an operator can retry it: metadata length, metadata, message.
        let mut value = (meta.len() as u32).to_be_bytes().to_vec();
        value.extend_from_slice(&meta);
        value.extend_from_slice(&encode_message(
            &msg.id,
            &msg.content_type,
            msg.enqueued_at_ms,
            &msg.body,
        ));
        // The dead letter goes in before the message goes out: a crash between keeps both,
        // and the message is simply refused again.
        let previous = self
            .shared
            .tree
            .insert(key(DEAD_PREFIX, msg.seq), value)
            .map_err(|e| self.storage(e))?;
        if previous.is_none() {
            st.counters.dead += 1;
        }
        if let Some(v) = self
            .shared
            .tree
            .remove(key(MSG_PREFIX, msg.seq))
            .map_err(|e| self.storage(e))?
        {
            st.counters.count = st.counters.count.saturating_sub(1);
            st.counters.bytes = st.counters.bytes.saturating_sub(stored_body_len(&v) as u64);
        }
        Ok(())
    }

    /// The newest `limit` dead letters, oldest first (metadata only).
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut out = Vec::new();
        for item in self.shared.tree.scan_prefix([DEAD_PREFIX]).rev().take(limit) {
            let (_, v) = item.map_err(|e| self.storage(e))?;
            let len = v.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
            let meta = len.and_then(|l| v.get(4..4 + l as usize));
            let record: DeadLetter = meta
                .and_then(|m| serde_json::from_slice(m).ok())
                .ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
            out.push(record);
        }
        out.reverse();
        Ok(out)
    }

    /// Counters and the oldest message's age.
    pub fn stats(&self) -> QueueStats {
        let c = lock(&self.shared.state).counters;
        let oldest = self
            .shared
            .tree
            .scan_prefix([MSG_PREFIX])
            .next()
            .and_then(|r| r.ok())
            .and_then(|(k, v)| decode_message(seq_of(&k)?, &v))
            .map(|m| m.enqueued_at_ms);
        QueueStats {
            depth: c.count,
            bytes: c.bytes,
            last_seq: c.last_seq,
            oldest_enqueued_ms: oldest,
            dead_letters: c.dead,
        }
    }

    /// Forgets idempotency keys accepted before `cutoff_ms`, so the key index stays bounded.
    pub fn prune_idempotency_keys(&self, cutoff_ms: u64) -> Result<usize, QueueError> {
        let mut n = 0;
        for item in self.shared.tree.scan_prefix([IDEM_PREFIX]) {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let at = v.get(9..17).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            if at.is_some_and(|at| at < cutoff_ms) {
                self.shared.tree.remove(k).map_err(|e| self.storage(e))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// A table of JSON records keyed by string: connection registries and the like.
#[derive(Clone)]
pub struct Table {
    name: String,
    tree: sled::Tree,
}

impl Table {
    /// The record at `key`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, QueueError> {
        match self.tree.get(key)? {
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| QueueError::Corrupt(format!("{}/{key}: {e}", self.name))),
            None => Ok(None),
        }
    }

    /// Stores `value` at `key` (durable after the next flush).
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), QueueError> {
        let raw = serde_json::to_vec(value).map_err(|e| QueueError::Storage(e.to_string()))?;
        self.tree.insert(key, raw)?;
        Ok(())
    }

    /// Removes `key`.
    pub fn remove(&self, key: &str) -> Result<(), QueueError> {
        self.tree.remove(key)?;
        Ok(())
    }

    /// Every record, in key order.
    pub fn list<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, QueueError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let value =
                serde_json::from_slice(&v).map_err(|e| QueueError::Corrupt(format!("{}/{key}: {e}", self.name)))?;
            out.push((key, value));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_messages: 10,
        max_bytes: 1000,
    };

    /// A one-byte message as a peer sends it.
    fn remote(seq: u64) -> Message {
        Message {
            seq,
            id: format!("id{seq}"),
            content_type: "a/b".into(),
            enqueued_at_ms: 1,
            body: Bytes::from_static(b"x"),
        }
    }

    fn msg(body: &str) -> NewMessage {
        NewMessage {
            id: crate::crypto::random_id(),
            content_type: "text/plain".into(),
            enqueued_at_ms: now_ms(),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[tokio::test]
    async fn nothing_is_readable_before_flush_and_order_is_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/out", LIMITS).unwrap();
        for i in 0..3 {
            q.append(msg(&format!("m{i}")), None).unwrap();
        }
        assert!(q.read_after(0, 10, 1 << 20).unwrap().is_empty());
        store.flush().await.unwrap();
        let got = q.read_after(0, 10, 1 << 20).unwrap();
        assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(got[2].body, "m2");
        assert_eq!(q.remove_through(2).unwrap(), 2);
        assert_eq!(q.first().unwrap().unwrap().seq, 3);
        assert_eq!(q.stats().depth, 1);
    }

    #[tokio::test]
    async fn reopen_keeps_messages_and_sequence() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let q = store.queue("c/out", LIMITS).unwrap();
            q.append(msg("a"), None).unwrap();
            q.append(msg("b"), None).unwrap();
            store.flush().await.unwrap();
            q.remove_through(1).unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/out", LIMITS).unwrap();
        assert_eq!(q.durable_seq(), 2);
        assert_eq!(q.first().unwrap().unwrap().body, "b");
        assert_eq!(q.append(msg("c"), None).unwrap().seq, 3);
    }

    #[tokio::test]
    async fn an_emptied_queue_never_reuses_a_sequence_number_and_counters_come_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let q = store.queue("c/out", LIMITS).unwrap();
            for body in ["a", "bb", "ccc"] {
                q.append(msg(body), None).unwrap();
            }
            store.flush().await.unwrap();
            let first = q.first().unwrap().unwrap();
            q.dead_letter(&first, "HTTP 400").unwrap();
            q.remove_through(3).unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/out", LIMITS).unwrap();
        let s = q.stats();
        assert_eq!((s.depth, s.bytes, s.dead_letters, s.last_seq), (0, 0, 1, 3));
        assert_eq!(q.append(msg("d"), None).unwrap().seq, 4);
        assert_eq!(q.stats().bytes, 1);
    }

    #[tokio::test]
    async fn idempotency_key_queues_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/out", LIMITS).unwrap();
        let first = q.append(msg("a"), Some("k1")).unwrap();
        let again = q.append(msg("a"), Some("k1")).unwrap();
        assert!(!first.duplicate);
        assert!(again.duplicate);
        assert_eq!((first.seq, &first.id), (again.seq, &again.id));
        assert_eq!(q.stats().depth, 1);
        assert_eq!(q.prune_idempotency_keys(now_ms() + 1).unwrap(), 1);
    }

    #[tokio::test]
    async fn limits_refuse_without_dropping() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store
            .queue(
                "c/out",
                Limits {
                    max_messages: 2,
                    max_bytes: 5,
                },
            )
            .unwrap();
        q.append(msg("aa"), None).unwrap();
        assert!(matches!(q.append(msg("aaaa"), None), Err(QueueError::FullBytes { .. })));
        q.append(msg("bb"), None).unwrap();
        assert!(matches!(q.append(msg("c"), None), Err(QueueError::FullCount { .. })));
        assert_eq!(q.stats().depth, 2);
    }

    #[tokio::test]
    async fn remote_appends_are_deduplicated_by_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/in", LIMITS).unwrap();
        assert_eq!(q.append_remote(&[remote(1), remote(2)]).unwrap(), 2);
        assert_eq!(q.append_remote(&[remote(1), remote(2), remote(3)]).unwrap(), 3);
        assert_eq!(q.stats().depth, 3);
        store.flush().await.unwrap();
        q.wait_durable_after(2).await;
        let all = q.read_after(0, 10, 100).unwrap();
        assert_eq!(
            all.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["id1", "id2", "id3"]
        );
    }

    #[tokio::test]
    async fn a_remote_batch_larger_than_the_room_stores_the_prefix_that_fits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store
            .queue(
                "c/in",
                Limits {
                    max_messages: 3,
                    max_bytes: 1000,
                },
            )
            .unwrap();
        let batch: Vec<Message> = (1..=5).map(remote).collect();
        assert_eq!(q.append_remote(&batch).unwrap(), 3, "the prefix that fits");
        assert!(
            matches!(q.append_remote(&batch), Err(QueueError::FullCount { .. })),
            "nothing new fits: full, and nothing lost"
        );
        store.flush().await.unwrap();
        assert!(q.remove(2).unwrap());
        assert!(!q.remove(2).unwrap());
        assert_eq!(q.append_remote(&batch).unwrap(), 4);
        assert!(matches!(q.append_remote(&batch), Err(QueueError::FullCount { .. })));
        let seqs: Vec<u64> = q.read_after(0, 10, 1 << 20).unwrap().iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 3]);
    }

    #[tokio::test]
    async fn dead_letters_are_kept_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/in", LIMITS).unwrap();
        q.append(msg("bad"), None).unwrap();
        q.append(msg("good"), None).unwrap();
        store.flush().await.unwrap();
        let bad = q.first().unwrap().unwrap();
        q.dead_letter(&bad, "HTTP 400").unwrap();
        let stats = q.stats();
        assert_eq!((stats.depth, stats.dead_letters), (1, 1));
        assert_eq!(q.dead_letters(10).unwrap()[0].reason, "HTTP 400");
        assert_eq!(q.first().unwrap().unwrap().body, "good");
    }

    #[tokio::test]
    async fn dead_letters_can_be_retried_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/in", LIMITS).unwrap();
        for body in ["a", "b", "c"] {
            q.append(msg(body), None).unwrap();
        }
        store.flush().await.unwrap();
        let a = q.first().unwrap().unwrap();
        q.dead_letter(&a, "HTTP 422").unwrap();
        let b = q.first().unwrap().unwrap();
        q.dead_letter(&b, "HTTP 400").unwrap();
        let mut kicks = q.kicks();
        kicks.borrow_and_update();
        assert!(q.retry_dead_letter(a.seq).unwrap());
        assert!(kicks.has_changed().unwrap(), "consumers are woken");
        let again = q.first().unwrap().unwrap();
        assert_eq!(
            (again.seq, again.id.as_str(), again.body.as_ref()),
            (a.seq, a.id.as_str(), b"a".as_ref())
        );
        assert!(q.drop_dead_letter(b.seq).unwrap());
        assert!(!q.drop_dead_letter(b.seq).unwrap());
        assert!(!q.retry_dead_letter(999).unwrap());
        let s = q.stats();
        assert_eq!((s.depth, s.dead_letters, s.last_seq), (2, 0, 3));
    }

    #[tokio::test]
    async fn tables_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let t = store.table("t").unwrap();
        t.put("a", &vec![1, 2]).unwrap();
        assert_eq!(t.get::<Vec<i32>>("a").unwrap(), Some(vec![1, 2]));
        assert_eq!(t.list::<Vec<i32>>().unwrap().len(), 1);
        t.remove("a").unwrap();
        assert_eq!(t.get::<Vec<i32>>("a").unwrap(), None);
    }
}
