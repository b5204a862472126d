//! Durable FIFO queues and small record tables over sled: the only module that touches sled.
//!
//! One [`Store`] per data directory holds every queue. A queue is one sled tree whose keys are
//! `m` + sequence number (big-endian, so sled's order is FIFO order), `d` + sequence number
//! for dead letters, `i` + idempotency key (with `t` + accept time, its expiry index), `b` +
//! sequence number for the ids of a peer's newest batches, and `c` for the counters record.
//! Messages taken from a peer (an inbox) are stored several to a record instead: `g` + the
//! last sequence number of a group of consecutive messages of one received batch, small
//! enough to stay inline in sled's log. A group member is consumed in memory; a
//! *consumed-through mark* in the counters record says that every group member at or below
//! it is gone, members consumed out of order above it are kept in memory, and a group's record
//! is removed, in one write, once the mark passes its last member. So an inbox writes one key
//! per group where it wrote two per message. A crash forgets what was consumed after the
//! last counters record: those messages are delivered again (same ids), never lost.
//! Every write on the message path is a single-key insert or remove, never a multi-key batch:
//! in sled 0.34 a batch takes a global lock that a running flush holds off, which would
//! serialise appends behind the disk. Multi-key changes are ordered so a crash in between
//! leaves a message twice (delivered again, same id), never lost. The one batch is the rare
//! repair [`Queue::renumber_unsent`], which must be all or nothing.
//!
//! Counters live in memory. The flush thread writes a queue's counters record just before a
//! flush when they changed, and a clean close writes an exact one, so opening a queue never
//! reads its messages: after an unclean stop the counters are the last record plus the
//! messages appended after it (a tail range, exact), and removals made after the record are
//! counted until a background recount, in small steps, corrects them. Counters may
//! over-count for that while; they never under-count.
//!
//! Writes land in memory first. [`Store::flush`] is group commit: every caller waiting at the
//! same moment shares one sled flush and one `fdatasync` of the log (with the files sled
//! creates unsynced, see [`durable`]), so a power cut loses nothing it acknowledged. Readers only see messages up to a queue's *durable* sequence
//! number, advanced after a flush, so nothing that could vanish in a crash is ever handed on.
//! The one exception is [`Queue::read_stored_after`], for an inbox's webhook: its sender keeps
//! each message until the durable mark covers it, so a message lost in a crash comes again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{oneshot, watch};

mod durable;
mod node;
mod records;

pub use node::{SledQueue, SledTable};

pub use durable::SyncCounts;
use records::Records;

use super::{
    Appended, DeadLetter, Limits, Message, NewMessage, QueueError, QueueImage, QueueStats, RemoteAppended, SequenceGap,
    RECENT_IDS,
};

impl From<sled::Error> for QueueError {
    fn from(e: sled::Error) -> Self {
        QueueError::Storage(e.to_string())
    }
}

/// The counters record: see [`encode_counters`].
const COUNTERS_KEY: &[u8] = b"c";
/// The high-water mark of databases written before the counters record existed.
const LEGACY_STATE_KEY: &[u8] = b"s";
const MSG_PREFIX: u8 = b'm';
const IDEM_PREFIX: u8 = b'i';
const DEAD_PREFIX: u8 = b'd';
/// `b` + the last sequence number of a batch taken from a peer → the ids of its messages
/// (see [`encode_batch_ids`]), for the newest batches: tells a retried batch from a sender
/// that reuses sequence numbers for other messages. One key per batch, not per message.
const BATCH_IDS_PREFIX: u8 = b'b';
/// `r` + sequence number → message id: the per-message form of the same, written by earlier
/// versions; still read, and pruned as the window moves past it.
const RECENT_PREFIX: u8 = b'r';
/// `g` + the last sequence number of a group → several messages of one batch from a peer
/// (see [`encode_group`]).
const GROUP_PREFIX: u8 = b'g';
/// The members consumed above the mark (sequence number and payload length of each), written
/// by a clean close and read by the next open.
const ABOVE_KEY: &[u8] = b"a";

/// Group members consumed above the consumed-through mark: sequence number → payload length.
type Above = BTreeMap<u64, u64>;

/// Writes the members consumed above the mark under [`ABOVE_KEY`], for the next open. Every
/// member there stays consumed for good, so an older copy is never wrong, only incomplete.
fn save_above(tree: &Records, above: &Above) -> Result<(), sled::Error> {
    if above.is_empty() {
        return tree.remove(ABOVE_KEY).map(|_| ());
    }
    let raw: Vec<u8> = above
        .iter()
        .flat_map(|(s, b)| [s.to_be_bytes(), b.to_be_bytes()])
        .flatten()
        .collect();
    tree.insert(ABOVE_KEY, raw).map(|_| ())
}
const RECORD_VERSION: u8 = 1;
const GROUP_VERSION: u8 = 2;
/// Stored bytes per group record. sled 0.34 keeps a value inline in its log below a quarter
/// of a segment (128 KiB by default), and rewrites a leaf of up to 17 keys whole, so a leaf
/// of full groups stays under that threshold too; a larger message is a group of its own.
const GROUP_MAX_BYTES: usize = 6 * 1024;
/// Messages per group record (a few in unit tests, so their batches span several groups).
const GROUP_MAX_MESSAGES: usize = if cfg!(test) { 3 } else { 64 };
/// Flag in the counters record: written by a clean close, so exact.
const CLEAN: u8 = 1;

/// Messages `remove_through` removes per step, holding the queue's lock only that long.
const REMOVE_STEP: usize = 256;
/// Keys a background recount reads per step, holding the queue's lock only that long.
const RECOUNT_CHUNK: usize = 64;

/// Message and dead-letter totals of a queue, or of a range of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sums {
    count: u64,
    bytes: u64,
    dead: u64,
    dead_bytes: u64,
}

/// Which list a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    Messages,
    /// Messages in group records: counted as messages, keyed by their group's record.
    Grouped,
    Dead,
}

impl Sums {
    fn add(&mut self, list: List, bytes: u64) {
        match list {
            List::Messages | List::Grouped => {
                self.count += 1;
                self.bytes += bytes;
            }
            List::Dead => {
                self.dead += 1;
                self.dead_bytes += bytes;
            }
        }
    }

    fn sub(&mut self, list: List, bytes: u64) {
        match list {
            List::Messages | List::Grouped => {
                self.count = self.count.saturating_sub(1);
                self.bytes = self.bytes.saturating_sub(bytes);
            }
            List::Dead => {
                self.dead = self.dead.saturating_sub(1);
                self.dead_bytes = self.dead_bytes.saturating_sub(bytes);
            }
        }
    }

    fn plus(self, o: Sums) -> Sums {
        Sums {
            count: self.count + o.count,
            bytes: self.bytes + o.bytes,
            dead: self.dead + o.dead,
            dead_bytes: self.dead_bytes + o.dead_bytes,
        }
    }

    fn minus(self, o: Sums) -> Sums {
        Sums {
            count: self.count.saturating_sub(o.count),
            bytes: self.bytes.saturating_sub(o.bytes),
            dead: self.dead.saturating_sub(o.dead),
            dead_bytes: self.dead_bytes.saturating_sub(o.dead_bytes),
        }
    }
}

/// A queue's counters, kept in memory and persisted in the counters record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    last_seq: u64,
    sums: Sums,
    /// Highest sequence number the next hop acknowledged (a cursor passed to `remove_through`).
    acked: u64,
    /// The consumed-through mark: every group member at or below it is consumed.
    consumed: u64,
}

/// Length of a counters record; records written before the consumed-through mark are
/// [`COUNTERS_LEN_V1`] bytes long and read with the mark at zero.
const COUNTERS_LEN: usize = 58;
const COUNTERS_LEN_V1: usize = 50;

/// The counters record: version, flags, last_seq, count, bytes, dead, dead bytes, acked,
/// consumed.
fn encode_counters(c: &Counters, clean: bool) -> [u8; COUNTERS_LEN] {
    let mut out = [0u8; COUNTERS_LEN];
    out[0] = RECORD_VERSION;
    out[1] = if clean { CLEAN } else { 0 };
    let fields = [
        c.last_seq,
        c.sums.count,
        c.sums.bytes,
        c.sums.dead,
        c.sums.dead_bytes,
        c.acked,
        c.consumed,
    ];
    for (i, f) in fields.iter().enumerate() {
        out[2 + 8 * i..10 + 8 * i].copy_from_slice(&f.to_be_bytes());
    }
    out
}

/// The counters and the clean flag.
fn decode_counters(raw: &[u8]) -> Option<(Counters, bool)> {
    if raw.first() != Some(&RECORD_VERSION) || ![COUNTERS_LEN, COUNTERS_LEN_V1].contains(&raw.len()) {
        return None;
    }
    let f = |i: usize| {
        raw.get(2 + 8 * i..10 + 8 * i)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let c = Counters {
        last_seq: f(0)?,
        sums: Sums {
            count: f(1)?,
            bytes: f(2)?,
            dead: f(3)?,
            dead_bytes: f(4)?,
        },
        acked: f(5)?,
        consumed: if raw.len() == COUNTERS_LEN { f(6)? } else { 0 },
    };
    Some((c, raw[1] & CLEAN != 0))
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

/// The stored message inside a dead-letter value (after its metadata).
fn dead_letter_message(raw: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
    raw.get(4 + len..)
}

/// Messages and payload bytes stored under a key of `list`: for a group record, its members
/// still live (above the mark `consumed` and not in `above`).
fn value_sums(list: List, raw: &[u8], consumed: u64, above: &Above) -> Sums {
    let mut sums = Sums::default();
    match list {
        List::Messages => sums.add(list, stored_body_len(raw) as u64),
        List::Dead => sums.add(list, dead_letter_message(raw).map(stored_body_len).unwrap_or(0) as u64),
        List::Grouped => {
            for (seq, stored) in group_members(raw).unwrap_or_default() {
                if seq > consumed && !above.contains_key(&seq) {
                    sums.add(list, stored_body_len(stored) as u64);
                }
            }
        }
    }
    sums
}

/// Payload bytes stored under a key of `list`, every member of a group counted.
fn value_bytes(list: List, raw: &[u8]) -> u64 {
    let s = value_sums(list, raw, 0, &Above::new());
    s.bytes + s.dead_bytes
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

/// A group record: version, then per message its sequence number, the length of its stored
/// form (32 bits) and the stored form as [`encode_message`] writes it.
fn encode_group(msgs: &[Message]) -> Vec<u8> {
    let mut out = vec![GROUP_VERSION];
    for m in msgs {
        let stored = encode_message(&m.id, &m.content_type, m.enqueued_at_ms, &m.body);
        out.extend_from_slice(&m.seq.to_be_bytes());
        out.extend_from_slice(&(stored.len() as u32).to_be_bytes());
        out.extend_from_slice(&stored);
    }
    out
}

/// The members of a group record, in order: sequence number and stored form. `None` when the
/// record is damaged.
fn group_members(raw: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    if raw.first() != Some(&GROUP_VERSION) {
        return None;
    }
    let mut out = Vec::new();
    let mut pos = 1;
    while pos < raw.len() {
        let seq = u64::from_be_bytes(raw.get(pos..pos + 8)?.try_into().ok()?);
        let len = u32::from_be_bytes(raw.get(pos + 8..pos + 12)?.try_into().ok()?) as usize;
        out.push((seq, raw.get(pos + 12..pos + 12 + len)?));
        pos += 12 + len;
    }
    Some(out)
}

/// Splits the messages of one batch into groups of consecutive messages, each within
/// [`GROUP_MAX_BYTES`] (a larger message alone) and [`GROUP_MAX_MESSAGES`].
fn groups_of(msgs: &[Message]) -> Vec<&[Message]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in msgs.iter().enumerate() {
        let size = m.body.len() + m.id.len() + m.content_type.len() + 25;
        if i > start && (bytes + size > GROUP_MAX_BYTES || i - start == GROUP_MAX_MESSAGES) {
            out.push(&msgs[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < msgs.len() {
        out.push(&msgs[start..]);
    }
    out
}

/// The ids of one batch from a peer: version, then per message its sequence number, id
/// length and id.
fn encode_batch_ids<'a>(msgs: impl Iterator<Item = &'a Message>) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    for m in msgs {
        out.extend_from_slice(&m.seq.to_be_bytes());
        out.extend_from_slice(&(m.id.len() as u16).to_be_bytes());
        out.extend_from_slice(m.id.as_bytes());
    }
    out
}

/// The id stored for `seq` in a batch-ids record, if it holds one.
fn batch_id_of(raw: &[u8], seq: u64) -> Option<String> {
    if raw.first() != Some(&RECORD_VERSION) {
        return None;
    }
    let mut pos = 1;
    while pos < raw.len() {
        let s = u64::from_be_bytes(raw.get(pos..pos + 8)?.try_into().ok()?);
        let len = u16::from_be_bytes(raw.get(pos + 8..pos + 10)?.try_into().ok()?) as usize;
        let id = raw.get(pos + 10..pos + 10 + len)?;
        if s == seq {
            return Some(String::from_utf8_lossy(id).into_owned());
        }
        pos += 10 + len;
    }
    None
}

fn decode_message(seq: u64, b: &[u8]) -> Option<Message> {
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

/// The tree every queue keeps its records in (see [`records`]).
const QUEUES_TREE: &str = "queues";
/// The tree of a queue made before the shared tree: this prefix and its name.
const OWN_TREE_PREFIX: &str = "queue/";

struct StoreInner {
    db: sled::Db,
    /// Every queue made since the shared tree came, each under a prefix of its name.
    queues_tree: sled::Tree,
    /// Queues made before, each in a tree of its own (`queue/NAME`), where they stay.
    own_trees: std::collections::HashSet<String>,
    /// Strong handles: a queue is opened (and its counters recovered) once per process.
    queues: Mutex<HashMap<String, Arc<QueueShared>>>,
    /// The queues written since the last flush took this list: the only ones a flush visits,
    /// so its cost does not grow with the number of connections.
    touched: Mutex<Vec<Arc<QueueShared>>>,
    flush_tx: std::sync::mpsc::Sender<FlushReply>,
    failure: Mutex<Option<String>>,
    failed_tx: watch::Sender<bool>,
    /// Cleared by tests to stop as a crash would: without the final exact counters.
    clean_close: std::sync::atomic::AtomicBool,
    /// Cleared by tests that step recounts by hand.
    auto_recount: std::sync::atomic::AtomicBool,
    /// Syncs made by group commits.
    syncs: Arc<SyncCounts>,
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        if lock(&self.failure).is_some() {
            // sled flushes when its last handle drops, and after a disk failure that flush
            // waits forever. Keeping one handle alive skips it; the process is exiting.
            std::mem::forget(self.db.clone());
            return;
        }
        if !self.clean_close.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // A clean close: exact counters, marked so the next open trusts them as they are.
        // Queue handles that outlive the store refuse writes from here on.
        let queues: Vec<Arc<QueueShared>> = lock(&self.queues).values().cloned().collect();
        for q in queues {
            let mut st = lock(&q.state);
            st.closed = true;
            let exact = st.recount.is_none();
            // The members consumed above the mark go first, so the clean record covers them.
            if let Err(e) = save_above(&q.tree, &st.above) {
                tracing::warn!(queue = %q.name, error = %e, "cannot save which messages were consumed; they are delivered again after the start");
            }
            if let Err(e) = q.tree.insert(COUNTERS_KEY, &encode_counters(&st.counters, exact)[..]) {
                tracing::warn!(queue = %q.name, error = %e, "cannot save the queue's counters; they are recounted on the next start");
            }
        }
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "final flush failed");
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

/// Counts the keys of `list` in `range`, adding them to `sums`; returns the highest sequence
/// number seen and how many keys were read.
fn tally<R: std::ops::RangeBounds<[u8; 9]>>(
    tree: &Records,
    list: List,
    range: R,
    consumed: u64,
    sums: &mut Sums,
) -> Result<(u64, u64), QueueError> {
    let (mut last, mut read) = (0, 0);
    for item in tree.range(range) {
        let (k, v) = item?;
        // A group's members above the mark: the tail after a counters record is all above it.
        *sums = sums.plus(value_sums(list, &v, consumed, &Above::new()));
        last = last.max(seq_of(&k).unwrap_or(0));
        read += 1;
    }
    Ok((last, read))
}

fn prefix_of(list: List) -> u8 {
    match list {
        List::Messages => MSG_PREFIX,
        List::Grouped => GROUP_PREFIX,
        List::Dead => DEAD_PREFIX,
    }
}

/// What opening a queue recovered from its tree.
struct Recovered {
    counters: Counters,
    /// Set when removals since the last counters record may be counted still: the range
    /// they can be in is recounted in the background.
    recount: Option<Recount>,
    /// Keys read while opening.
    read: u64,
    /// The high-water mark in the counters record on disk: below the recovered one when
    /// messages were appended after the record, so the next removal writes it first.
    persisted_hw: u64,
    /// Group members consumed above the mark, as a clean close left them.
    above: Above,
}

/// Recovers a queue's counters without reading its messages: the last counters record,
/// plus the messages appended after it (a tail range, exact). Removals after the record are
/// still counted, an over-estimate a background recount corrects.
fn recover(tree: &Records, name: &str) -> Result<Recovered, QueueError> {
    let Some(raw) = tree.get(COUNTERS_KEY)? else {
        let legacy_hw = match tree.get(LEGACY_STATE_KEY)? {
            Some(raw) => decode_high_water(&raw).ok_or_else(|| QueueError::Corrupt(name.into()))?,
            None => 0,
        };
        // A new queue, or one written before counters were persisted: one full count, once.
        let mut sums = Sums::default();
        let (mut last, mut read) = (0, 0);
        for list in LISTS {
            let p = prefix_of(list);
            let (l, r) = tally(tree, list, key(p, 0)..=key(p, u64::MAX), 0, &mut sums)?;
            (last, read) = (last.max(l), read + r);
        }
        // Idempotency keys from before the expiry index get their entries, so they are pruned.
        for item in tree.scan_prefix([IDEM_PREFIX]) {
            let (k, v) = item?;
            if let (Some(seq), Some(at)) = (v.get(1..9), v.get(9..17)) {
                let mut t = vec![IDEM_TIME_PREFIX];
                t.extend_from_slice(at);
                t.extend_from_slice(seq);
                tree.insert(t, &k[1..])?;
            }
        }
        let counters = Counters {
            last_seq: legacy_hw.max(last),
            sums,
            acked: 0,
            consumed: 0,
        };
        tree.insert(COUNTERS_KEY, &encode_counters(&counters, false)[..])?;
        return Ok(Recovered {
            counters,
            recount: None,
            read,
            persisted_hw: counters.last_seq,
            above: Above::new(),
        });
    };
    let (record, clean) = decode_counters(&raw).ok_or_else(|| QueueError::Corrupt(name.into()))?;
    // The members the last close (or dead-letter retry) left consumed above the mark; those
    // consumed since come again after a crash. Kept: its members stay consumed for good.
    let mut above: Above = tree
        .get(ABOVE_KEY)?
        .map(|raw| {
            let word = |b: &[u8]| b.try_into().map(u64::from_be_bytes).unwrap_or_default();
            raw.chunks_exact(16).map(|p| (word(&p[..8]), word(&p[8..]))).collect()
        })
        .unwrap_or_default();
    // Those the mark passed since (an older copy, after a crash) say nothing more.
    above.retain(|&seq, _| seq > record.consumed);
    if clean {
        // Mark it used before anything else changes: any later write that reaches the disk
        // comes after this one in sled's log, so a crash never leaves a stale "clean" record.
        tree.insert(COUNTERS_KEY, &encode_counters(&record, false)[..])?;
        return Ok(Recovered {
            counters: record,
            recount: None,
            read: 0,
            persisted_hw: record.last_seq,
            above,
        });
    }
    let boundary = record.last_seq;
    let mut tail = Sums::default();
    let (mut last, mut read) = (0, 0);
    for list in LISTS {
        let p = prefix_of(list);
        let range = key(p, boundary.saturating_add(1))..=key(p, u64::MAX);
        let (l, r) = tally(tree, list, range, record.consumed, &mut tail)?;
        (last, read) = (last.max(l), read + r);
    }
    let legacy_hw = tree
        .get(LEGACY_STATE_KEY)?
        .and_then(|raw| decode_high_water(&raw))
        .unwrap_or(0);
    let counters = Counters {
        last_seq: boundary.max(last).max(legacy_hw),
        sums: record.sums.plus(tail),
        ..record
    };
    Ok(Recovered {
        counters,
        recount: Some(Recount {
            boundary,
            next: [1; 3],
            scanned: Sums::default(),
            estimate: record.sums,
        }),
        read,
        persisted_hw: boundary,
        above,
    })
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
        // Before anything is acknowledged: what sled wrote while opening, unsynced.
        let syncs = Arc::new(SyncCounts::default());
        let durable = durable::Durable::open(dir, syncs.clone())
            .map_err(|e| QueueError::Storage(format!("syncing the database after opening it: {e}")))?;
        let own_trees = db
            .tree_names()
            .iter()
            .filter_map(|n| {
                std::str::from_utf8(n)
                    .ok()?
                    .strip_prefix(OWN_TREE_PREFIX)
                    .map(str::to_owned)
            })
            .collect();
        let queues_tree = db.open_tree(QUEUES_TREE)?;
        let (flush_tx, flush_rx) = std::sync::mpsc::channel();
        let inner = Arc::new(StoreInner {
            db,
            queues_tree,
            own_trees,
            queues: Mutex::new(HashMap::new()),
            touched: Mutex::new(Vec::new()),
            flush_tx,
            failure: Mutex::new(None),
            failed_tx: watch::channel(false).0,
            clean_close: std::sync::atomic::AtomicBool::new(true),
            auto_recount: std::sync::atomic::AtomicBool::new(true),
            syncs,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("relay-flush".into())
            .spawn(move || run_flusher(weak, flush_rx, durable))
            .map_err(|e| QueueError::Storage(format!("cannot start the flush thread: {e}")))?;
        Ok(Store { inner })
    }

    /// Syncs made so far by group commits (for `/metrics`).
    pub fn sync_counts(&self) -> (u64, u64) {
        self.inner.syncs.get()
    }

    /// Makes every write so far durable: sled's flush, then an `fdatasync` of its log and a
    /// sync of the files and directory entries it created (see [`durable`]). Concurrent
    /// callers share one group commit.
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

    /// The queue called `name`, created empty on first use. Opening reads the counters record
    /// and the messages appended after it, never the whole queue.
    pub fn queue(&self, name: &str, limits: Limits) -> Result<Queue, QueueError> {
        let known = |queues: &HashMap<String, Arc<QueueShared>>| {
            queues.get(name).map(|shared| {
                lock(&shared.state).limits = limits;
                Queue { shared: shared.clone() }
            })
        };
        if let Some(q) = known(&lock(&self.inner.queues)) {
            return Ok(q);
        }
        // Recovered without the map's lock, which the flush thread takes before every flush.
        // Two first uses at once both recover (the same answer); the first to register wins.
        let tree = if self.inner.own_trees.contains(name) {
            Records::own(self.inner.db.open_tree(format!("{OWN_TREE_PREFIX}{name}"))?)
        } else {
            Records::shared(self.inner.queues_tree.clone(), name)
        };
        let recovered = recover(&tree, name)?;
        let mut queues = lock(&self.inner.queues);
        if let Some(q) = known(&queues) {
            return Ok(q);
        }
        let counters = recovered.counters;
        let (durable_tx, _) = watch::channel(counters.last_seq);
        let needs_recount = recovered.recount.is_some();
        let shared = Arc::new(QueueShared {
            name: name.to_owned(),
            tree,
            store: Arc::downgrade(&self.inner),
            state: Mutex::new(QueueState {
                counters,
                limits,
                persisted_hw: recovered.persisted_hw,
                // Whatever was stored before this start may have been handed on already.
                sent: counters.last_seq,
                dirty: false,
                closed: false,
                recount: recovered.recount,
                above: recovered.above,
            }),
            durable_tx,
            stored_tx: watch::channel(counters.last_seq).0,
            kicks: watch::channel(0).0,
            keys_read: std::sync::atomic::AtomicU64::new(recovered.read),
            recounted: watch::channel(!needs_recount).0,
            touched: std::sync::atomic::AtomicBool::new(false),
        });
        queues.insert(name.to_owned(), shared.clone());
        drop(queues);
        if needs_recount && self.inner.auto_recount.load(std::sync::atomic::Ordering::Relaxed) {
            let q = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("relay-recount".into())
                .spawn(move || recount(q))
                .map_err(|e| QueueError::Storage(format!("cannot start the recount thread: {e}")))?;
        }
        Ok(Queue { shared })
    }

    /// Forgets intake idempotency keys accepted before `cutoff_ms` in every open queue, in
    /// bounded steps with a yield between, so a large key index never holds a runtime thread
    /// for long.
    pub async fn prune_idempotency_keys(&self, cutoff_ms: u64) -> Result<(), QueueError> {
        let queues: Vec<Arc<QueueShared>> = lock(&self.inner.queues).values().cloned().collect();
        for shared in queues {
            let q = Queue { shared };
            while q.prune_idempotency_keys_step(cutoff_ms, PRUNE_STEP)? == PRUNE_STEP {
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    /// Closes the store as a crash would, without the final exact counters records (sled
    /// still writes everything else, the worst case for counters recovered on the next open).
    #[cfg(test)]
    fn close_uncleanly(self) {
        self.inner
            .clean_close
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The names of the record tables this store holds.
    pub fn table_names(&self) -> Vec<String> {
        self.inner
            .db
            .tree_names()
            .iter()
            .filter_map(|n| {
                n.strip_prefix(b"table/")
                    .map(|t| String::from_utf8_lossy(t).into_owned())
            })
            .collect()
    }

    /// A table of JSON records called `name`.
    pub fn table(&self, name: &str) -> Result<Table, QueueError> {
        Ok(Table {
            name: name.to_owned(),
            tree: self.inner.db.open_tree(format!("table/{name}"))?,
        })
    }
}

/// Idempotency keys forgotten per step of the hourly prune.
const PRUNE_STEP: usize = 1024;
/// `t` + accept time + sequence number → idempotency key: the keys in the order they expire.
const IDEM_TIME_PREFIX: u8 = b't';

fn fail(inner: &StoreInner, reason: String) -> QueueError {
    let mut failure = lock(&inner.failure);
    if failure.is_none() {
        tracing::error!(error = %reason, "storage failed; refusing new work and stopping");
        *failure = Some(reason.clone());
        inner.failed_tx.send_replace(true);
    }
    QueueError::Storage(reason)
}

/// A background recount of the keys at or below `boundary` (the range the last counters
/// record covered), in small steps under the queue's lock. Writes meanwhile keep `scanned`
/// exact for the part already read and `estimate` for the whole range, so at the end the
/// counters become exact: `counters - estimate + scanned`.
#[derive(Debug, Clone, Copy)]
struct Recount {
    boundary: u64,
    /// Next key (sequence number) to read, per list (messages, groups, dead letters).
    next: [u64; 3],
    scanned: Sums,
    estimate: Sums,
}

fn list_index(list: List) -> usize {
    match list {
        List::Messages => 0,
        List::Grouped => 1,
        List::Dead => 2,
    }
}

/// The lists in the order a recount reads them.
const LISTS: [List; 3] = [List::Messages, List::Grouped, List::Dead];

fn recount(q: Weak<QueueShared>) {
    // Only a weak handle between steps, so a closed store is not kept open by this thread.
    while let Some(q) = q.upgrade() {
        if !recount_step(&q, RECOUNT_CHUNK) {
            return;
        }
        drop(q);
        std::thread::yield_now();
    }
}

/// Reads up to `chunk` keys of a pending recount, under the queue's lock; false once there is
/// nothing left to do.
fn recount_step(q: &Arc<QueueShared>, chunk: usize) -> bool {
    let mut st = lock(&q.state);
    if st.closed {
        return false;
    }
    let Some(mut r) = st.recount else { return false };
    let Some(list) = LISTS.into_iter().find(|&l| r.next[list_index(l)] <= r.boundary) else {
        st.counters.sums = st.counters.sums.minus(r.estimate).plus(r.scanned);
        st.recount = None;
        st.dirty = true;
        touch(q);
        drop(st);
        q.recounted.send_replace(true);
        tracing::debug!(queue = %q.name, "queue counters recounted");
        return false;
    };
    let p = prefix_of(list);
    let i = list_index(list);
    let mut read = 0;
    let mut next = r.boundary + 1;
    for item in q.tree.range(key(p, r.next[i])..=key(p, r.boundary)) {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                tracing::warn!(queue = %q.name, error = %e, "recounting the queue failed; its counters stay over-estimated until restart");
                return false;
            }
        };
        let seq = seq_of(&k).unwrap_or(0);
        if read == chunk {
            next = seq;
            break;
        }
        r.scanned = r.scanned.plus(value_sums(list, &v, st.counters.consumed, &st.above));
        read += 1;
    }
    r.next[i] = next;
    st.recount = Some(r);
    drop(st);
    q.keys_read.fetch_add(read as u64, std::sync::atomic::Ordering::Relaxed);
    true
}

/// Under load, how long a flush waits for more submitters to join it.
const GROUP_COMMIT_LINGER: std::time::Duration = std::time::Duration::from_micros(150);
/// Waiters above which a flush starts at once.
const GROUP_COMMIT_MAX: usize = 256;

/// The group-commit loop, on its own thread: the fsync blocks, and a dedicated thread saves the
/// hand-offs a blocking-pool task would add to every flush.
fn run_flusher(store: Weak<StoreInner>, rx: std::sync::mpsc::Receiver<FlushReply>, mut durable: durable::Durable) {
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
        // Everything appended before this point is covered by the flush below, and so is one
        // counters record per changed queue (a single-key write, like every other).
        let queues: Vec<Arc<QueueShared>> = std::mem::take(&mut *lock(&inner.touched));
        let mut marks = Vec::with_capacity(queues.len());
        let mut result = Ok(());
        for q in queues {
            let mut st = lock(&q.state);
            q.touched.store(false, std::sync::atomic::Ordering::Release);
            if st.dirty && !st.closed {
                match q.tree.insert(COUNTERS_KEY, &encode_counters(&st.record(), false)[..]) {
                    Ok(_) => {
                        st.dirty = false;
                        st.persisted_hw = st.counters.last_seq;
                    }
                    Err(e) => result = Err(fail(&inner, format!("saving queue counters: {e}"))),
                }
            }
            let last = st.counters.last_seq;
            drop(st);
            marks.push((q, last));
        }
        if result.is_ok() {
            result = match inner.db.flush() {
                Ok(_) => durable
                    .commit()
                    .map_err(|e| fail(&inner, format!("sync after flush: {e}"))),
                Err(e) => Err(fail(&inner, format!("flush: {e}"))),
            };
        }
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
    /// The high-water mark last written in a counters record.
    persisted_hw: u64,
    /// Highest sequence number that may have reached the next hop: everything stored when the
    /// queue was opened, then whatever [`Queue::note_sent`] records.
    sent: u64,
    /// Counters changed since the last counters record.
    dirty: bool,
    /// The store closed cleanly: its final record is written, so nothing may change now.
    closed: bool,
    /// A recount in progress after an unclean stop.
    recount: Option<Recount>,
    /// Group members consumed above the consumed-through mark (out of order: a message
    /// dead-lettered ahead of it, or handled concurrently), until the mark passes them.
    above: Above,
}

impl QueueState {
    /// The counters as a record written while the queue runs: with the members consumed
    /// above the mark counted still, since a crash forgets their consumption and they come
    /// again. Counters recovered from it over-count; they never under-count.
    fn record(&self) -> Counters {
        let mut c = self.counters;
        for &bytes in self.above.values() {
            c.sums.add(List::Grouped, bytes);
        }
        c
    }

    /// Applies one key's appearance (`add`) or disappearance to the counters, and to a
    /// recount in progress.
    fn change(&mut self, list: List, seq: u64, add: bool, bytes: u64) {
        let apply = |s: &mut Sums| if add { s.add(list, bytes) } else { s.sub(list, bytes) };
        apply(&mut self.counters.sums);
        if let Some(r) = &mut self.recount {
            if seq <= r.boundary {
                apply(&mut r.estimate);
                if seq < r.next[list_index(list)] {
                    apply(&mut r.scanned);
                }
            }
        }
        self.dirty = true;
    }
}

struct QueueShared {
    name: String,
    tree: Records,
    store: Weak<StoreInner>,
    state: Mutex<QueueState>,
    /// Highest sequence number known to be on disk.
    durable_tx: watch::Sender<u64>,
    /// Highest sequence number stored, on disk or not yet.
    stored_tx: watch::Sender<u64>,
    /// Bumped when a message reappears below the durable mark (a retried dead letter).
    kicks: watch::Sender<u64>,
    /// Keys read to recover counters (opening and recounting); tests check it stays small.
    keys_read: std::sync::atomic::AtomicU64,
    /// True once the counters are exact (no recount pending).
    recounted: watch::Sender<bool>,
    /// In the store's list of touched queues (set and cleared under `state`'s lock).
    touched: std::sync::atomic::AtomicBool,
}

/// Puts `q` in its store's list of queues for the next flush to visit. Called with `q`'s
/// state locked, as the flush clears the flag under that lock: a write either comes before
/// the flush reads the queue, or puts it in the list again.
fn touch(q: &Arc<QueueShared>) {
    if !q.touched.swap(true, std::sync::atomic::Ordering::AcqRel) {
        if let Some(inner) = q.store.upgrade() {
            lock(&inner.touched).push(q.clone());
        }
    }
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

    /// The queue's state for a write; refused once the store has closed.
    fn writable(&self) -> Result<MutexGuard<'_, QueueState>, QueueError> {
        let st = lock(&self.shared.state);
        if st.closed {
            return Err(QueueError::Storage("the store is closed".into()));
        }
        touch(&self.shared);
        Ok(st)
    }

    /// Writes a counters record now (a single key). Before a removal it persists the
    /// high-water mark, so a sequence number is never handed out twice even when the queue
    /// empties (the peer deduplicates by it); before a key moves between the message and
    /// dead-letter lists, `extra` makes the record over-count rather than under-count
    /// whatever a crash in between leaves.
    fn write_record(&self, st: &mut QueueState, extra: Option<(List, u64)>) -> Result<(), QueueError> {
        let mut c = st.record();
        if let Some((list, bytes)) = extra {
            c.sums.add(list, bytes);
        }
        self.shared
            .tree
            .insert(COUNTERS_KEY, &encode_counters(&c, false)[..])
            .map_err(|e| self.storage(e))?;
        st.persisted_hw = c.last_seq;
        Ok(())
    }

    fn persist_high_water(&self, st: &mut QueueState) -> Result<(), QueueError> {
        if st.persisted_hw < st.counters.last_seq {
            self.write_record(st, None)?;
        }
        Ok(())
    }

    /// Refuses `n` more messages of `bytes` when the queue is full. Dead letters count: they
    /// take the same disk, and they leave only by an operator's hand.
    fn check_room(&self, c: &Counters, limits: &Limits, n: u64, bytes: u64) -> Result<(), QueueError> {
        let s = &c.sums;
        if s.count + s.dead + n > limits.max_messages {
            return Err(QueueError::FullCount {
                queue: self.shared.name.clone(),
                count: s.count + s.dead,
                dead_letters: s.dead,
                limit: limits.max_messages,
            });
        }
        if s.bytes + s.dead_bytes + bytes > limits.max_bytes {
            return Err(QueueError::FullBytes {
                queue: self.shared.name.clone(),
                bytes: s.bytes + s.dead_bytes,
                dead_letter_bytes: s.dead_bytes,
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
        let mut st = self.writable()?;
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
        self.note_stored(seq);
        st.change(List::Messages, seq, true, size);
        if let Some(k) = idem_key {
            // Written after the message, so whenever the key is on disk the message is too.
            let at = now_ms();
            let mut v = vec![IDEM_PREFIX];
            v.extend_from_slice(&seq.to_be_bytes());
            v.extend_from_slice(&at.to_be_bytes());
            v.extend_from_slice(msg.id.as_bytes());
            // The expiry index lets pruning read only the keys it forgets.
            let mut t = vec![IDEM_TIME_PREFIX];
            t.extend_from_slice(&at.to_be_bytes());
            t.extend_from_slice(&seq.to_be_bytes());
            self.shared.tree.insert(t, &k[1..]).map_err(|e| self.storage(e))?;
            self.shared.tree.insert(k, v).map_err(|e| self.storage(e))?;
        }
        Ok(Appended {
            seq,
            id: msg.id,
            duplicate: false,
        })
    }

    /// Appends messages that already carry the sender's sequence numbers (increasing), and
    /// stores the prefix of the new ones that fits the queue's bounds; `Err` when no new one
    /// fits. A message at or below the high-water mark is a retry only when this queue took
    /// that very message (same id) at that number; anything else means the sender reuses
    /// numbers for other messages (its data directory was restored or copied), and the whole
    /// batch is refused with [`QueueError::SequenceConflict`], storing nothing. Durable after
    /// the next [`Store::flush`]; sled's log keeps writes in order, so a crash leaves a
    /// prefix, which the sender offers again.
    pub fn append_remote(&self, msgs: &[Message]) -> Result<RemoteAppended, QueueError> {
        self.check()?;
        let mut st = self.writable()?;
        let high_water = st.counters.last_seq;
        for m in msgs.iter().take_while(|m| m.seq <= high_water) {
            let mut held = if high_water - m.seq < RECENT_IDS {
                self.recent_id(m.seq)?
            } else {
                None
            };
            if held.is_none() {
                // Still queued (or taken before ids were remembered): the message itself says.
                held = self.held_id(m.seq)?;
            }
            if held.as_deref() != Some(m.id.as_str()) {
                return Err(QueueError::SequenceConflict {
                    queue: self.shared.name.clone(),
                    seq: m.seq,
                    sent_id: m.id.clone(),
                    held_id: held,
                    high_water,
                });
            }
        }
        let limits = st.limits;
        let mut out = RemoteAppended {
            high_water,
            stored: 0,
            gap: None,
        };
        // The new messages (a suffix: sequence numbers increase), and the prefix of them that
        // fits the queue's bounds.
        let fresh = &msgs[msgs.partition_point(|m| m.seq <= high_water)..];
        let (mut fits, mut sums) = (0, st.counters);
        for m in fresh {
            let size = m.body.len() as u64;
            if let Err(full) = self.check_room(&sums, &limits, 1, size) {
                if fits == 0 {
                    return Err(full);
                }
                break;
            }
            sums.sums.add(List::Messages, size);
            fits += 1;
        }
        let new = &fresh[..fits];
        if let Some(last) = new.last() {
            // The ids go in first, in one key: a crash before the messages leaves ids for
            // numbers this queue does not hold yet, which the retry simply stores again.
            self.shared
                .tree
                .insert(key(BATCH_IDS_PREFIX, last.seq), encode_batch_ids(new.iter()))
                .map_err(|e| self.storage(e))?;
        }
        let mut expected = st.counters.last_seq + 1;
        for m in new {
            if m.seq != expected && out.gap.is_none() {
                out.gap = Some(SequenceGap { expected, got: m.seq });
            }
            expected = m.seq + 1;
        }
        // Several messages to a record, in order: a crash leaves a prefix of whole groups.
        for group in groups_of(new) {
            let Some(last) = group.last() else { continue };
            self.shared
                .tree
                .insert(key(GROUP_PREFIX, last.seq), encode_group(group))
                .map_err(|e| self.storage(e))?;
            for m in group {
                st.change(List::Grouped, last.seq, true, m.body.len() as u64);
            }
            st.counters.last_seq = last.seq;
            out.stored += group.len() as u64;
        }
        out.high_water = st.counters.last_seq;
        self.note_stored(out.high_water);
        if out.stored > 0 && out.high_water >= RECENT_IDS {
            // Forget batches that fell out of the window (usually one, or none), and the
            // per-message ids of earlier versions there.
            let below = out.high_water - RECENT_IDS;
            let mut stale: Vec<sled::IVec> = Vec::new();
            for prefix in [BATCH_IDS_PREFIX, RECENT_PREFIX] {
                for k in self
                    .shared
                    .tree
                    .range(key(prefix, 0)..=key(prefix, below))
                    .keys()
                    .take(2 * RECENT_IDS as usize)
                {
                    stale.push(k.map_err(|e| self.storage(e))?);
                }
            }
            for k in stale {
                self.shared.tree.remove(k).map_err(|e| self.storage(e))?;
            }
        }
        Ok(out)
    }

    /// The id this queue remembers taking from its peer under `seq`: from the batch that
    /// ended at or after it, or from an earlier version's per-message record.
    fn recent_id(&self, seq: u64) -> Result<Option<String>, QueueError> {
        let tree = &self.shared.tree;
        if let Some(item) = tree
            .range(key(BATCH_IDS_PREFIX, seq)..=key(BATCH_IDS_PREFIX, u64::MAX))
            .next()
        {
            let (_, raw) = item.map_err(|e| self.storage(e))?;
            if let Some(id) = batch_id_of(&raw, seq) {
                return Ok(Some(id));
            }
        }
        Ok(tree
            .get(key(RECENT_PREFIX, seq))
            .map_err(|e| self.storage(e))?
            .map(|raw| String::from_utf8_lossy(&raw).into_owned()))
    }

    /// The id of message `seq` as this queue holds it (consumed group members included).
    fn held_id(&self, seq: u64) -> Result<Option<String>, QueueError> {
        let tree = &self.shared.tree;
        if let Some(raw) = tree.get(key(MSG_PREFIX, seq)).map_err(|e| self.storage(e))? {
            return Ok(decode_message(seq, &raw).map(|m| m.id));
        }
        let Some(item) = tree.range(key(GROUP_PREFIX, seq)..=key(GROUP_PREFIX, u64::MAX)).next() else {
            return Ok(None);
        };
        let (_, raw) = item.map_err(|e| self.storage(e))?;
        let members = group_members(&raw).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
        Ok(members
            .into_iter()
            .find(|(s, _)| *s == seq)
            .and_then(|(s, stored)| decode_message(s, stored))
            .map(|m| m.id))
    }

    /// Removes the message `seq` alone (delivered to the webhook). Not flushed: after a crash
    /// it is delivered again, never lost.
    pub fn remove(&self, seq: u64) -> Result<bool, QueueError> {
        let mut st = self.writable()?;
        Ok(self.take(&mut st, seq)?.is_some())
    }

    /// Takes message `seq` out of the queue, a record of its own or a group's member, and
    /// returns its payload length; `None` when the queue does not hold it.
    fn take(&self, st: &mut QueueState, seq: u64) -> Result<Option<u64>, QueueError> {
        // A record of its own first: a retried dead letter sits there, beside its old group.
        if let Some(v) = self
            .shared
            .tree
            .get(key(MSG_PREFIX, seq))
            .map_err(|e| self.storage(e))?
        {
            self.persist_high_water(st)?;
            self.shared
                .tree
                .remove(key(MSG_PREFIX, seq))
                .map_err(|e| self.storage(e))?;
            let size = stored_body_len(&v) as u64;
            st.change(List::Messages, seq, false, size);
            return Ok(Some(size));
        }
        self.consume(st, seq)
    }

    /// Consumes group member `seq` in memory, then moves the mark over what was consumed in
    /// order; `None` when no group holds it live.
    fn consume(&self, st: &mut QueueState, seq: u64) -> Result<Option<u64>, QueueError> {
        if seq <= st.counters.consumed || st.above.contains_key(&seq) {
            return Ok(None);
        }
        let range = key(GROUP_PREFIX, seq)..=key(GROUP_PREFIX, u64::MAX);
        let Some(item) = self.shared.tree.range(range).next() else {
            return Ok(None);
        };
        let (k, raw) = item.map_err(|e| self.storage(e))?;
        let members = group_members(&raw).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
        let Some((_, stored)) = members.iter().find(|(s, _)| *s == seq) else {
            return Ok(None);
        };
        let size = stored_body_len(stored) as u64;
        // Nothing below this group is left above the mark (the usual, in-order case): the mark
        // moves on from this very record, without looking it up again.
        let first = members.first().map_or(seq, |(s, _)| *s) <= st.counters.consumed.saturating_add(1);
        st.change(List::Grouped, seq_of(&k).unwrap_or(seq), false, size);
        st.above.insert(seq, size);
        self.advance(st, first.then_some((k, raw)))?;
        Ok(Some(size))
    }

    /// Moves the consumed-through mark over the members consumed in order, and removes each
    /// group record the mark passes entirely: one write per group. `first`, when given, is the
    /// first group record above the mark, already read.
    fn advance(&self, st: &mut QueueState, mut first: Option<(sled::IVec, sled::IVec)>) -> Result<(), QueueError> {
        while !st.above.is_empty() {
            let mark = st.counters.consumed;
            let (k, raw) = match first.take() {
                Some(record) => record,
                None => {
                    let range = key(GROUP_PREFIX, mark.saturating_add(1))..=key(GROUP_PREFIX, u64::MAX);
                    let Some(item) = self.shared.tree.range(range).next() else {
                        // No group above the mark holds them (gone with their record).
                        st.above.clear();
                        return Ok(());
                    };
                    item.map_err(|e| self.storage(e))?
                }
            };
            let members = group_members(&raw).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
            for (s, _) in members.iter().filter(|(s, _)| *s > mark) {
                if st.above.remove(s).is_none() {
                    return Ok(());
                }
                st.counters.consumed = *s;
            }
            // Every member is consumed: the record goes, and the mark passes its key (no
            // other group holds a number up to it).
            self.persist_high_water(st)?;
            self.shared.tree.remove(k.clone()).map_err(|e| self.storage(e))?;
            st.counters.consumed = seq_of(&k).unwrap_or(st.counters.consumed).max(st.counters.consumed);
            st.dirty = true;
        }
        Ok(())
    }

    /// Highest sequence number appended (durable or not): the high-water mark.
    pub fn last_seq(&self) -> u64 {
        lock(&self.shared.state).counters.last_seq
    }

    /// Highest sequence number the next hop acknowledged through [`Queue::remove_through`]
    /// (as of the last counters record after a restart: never more than it was).
    pub fn acked_through(&self) -> u64 {
        lock(&self.shared.state).counters.acked
    }

    /// Records that messages up to `seq` were handed to the next hop.
    pub fn note_sent(&self, seq: u64) {
        let mut st = lock(&self.shared.state);
        st.sent = st.sent.max(seq);
    }

    /// Highest sequence number that may have reached the next hop.
    pub fn sent_through(&self) -> u64 {
        lock(&self.shared.state).sent
    }

    /// For a queue this side numbers (an outbox) whose peer acknowledges up to `cursor`, beyond
    /// anything this queue handed on: the peer holds other messages under those numbers, from
    /// an earlier copy of this store (a node restored from a backup), and would take the ones
    /// numbered there now as acknowledged unseen. Moves every message never handed on above
    /// both the cursor and the high-water mark, in order, and numbers new ones after them;
    /// returns how many moved. The move is one atomic write, so a crash leaves all of it or
    /// none (and the next poll renumbers again). Reads the messages it moves and the
    /// idempotency keys: only for that rare repair. Durable after the next [`Store::flush`].
    pub fn renumber_unsent(&self, cursor: u64) -> Result<u64, QueueError> {
        self.check()?;
        let mut st = self.writable()?;
        if cursor <= st.sent {
            return Ok(0);
        }
        let old: Vec<(sled::IVec, sled::IVec)> = self
            .shared
            .tree
            .range(key(MSG_PREFIX, st.sent.saturating_add(1))..=key(MSG_PREFIX, st.counters.last_seq))
            .collect::<Result<_, _>>()
            .map_err(|e| self.storage(e))?;
        let floor = cursor.max(st.counters.last_seq);
        let moved: HashMap<u64, u64> = old
            .iter()
            .enumerate()
            .filter_map(|(i, (k, _))| Some((seq_of(k)?, floor + 1 + i as u64)))
            .collect();
        // An intake retry with the same idempotency key must learn the number its message has
        // now, not the old one the peer holds for another message: reads the key index, once.
        let keys: Vec<(sled::IVec, sled::IVec)> = self
            .shared
            .tree
            .scan_prefix([IDEM_PREFIX])
            .collect::<Result<_, _>>()
            .map_err(|e| self.storage(e))?;
        let mut next = st.counters;
        next.last_seq = floor + old.len() as u64;
        next.acked = next.acked.max(cursor);
        // One atomic batch, unlike every other write here (sled's batches wait for a running
        // flush; this repair is rare): a crash leaves the queue as it was, and the next poll
        // renumbers again, or as it is now. Half a move would let the cursor acknowledge the
        // messages not yet moved.
        let mut batch = self.shared.tree.batch();
        for (k, v) in &old {
            let seq = seq_of(k).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
            let to = *moved
                .get(&seq)
                .ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
            batch.insert(&key(MSG_PREFIX, to)[..], v.clone());
            batch.remove(k.clone());
        }
        for (k, v) in keys {
            let Some(to) = seq_of(&v).and_then(|seq| moved.get(&seq)) else {
                continue;
            };
            let mut fresh = v.to_vec();
            fresh[1..9].copy_from_slice(&to.to_be_bytes());
            batch.insert(k, fresh);
        }
        batch.insert(COUNTERS_KEY, &encode_counters(&next, false)[..]);
        self.shared.tree.apply_batch(batch).map_err(|e| self.storage(e))?;
        for (seq, to, bytes) in old
            .iter()
            .filter_map(|(k, v)| Some((seq_of(k)?, stored_body_len(v) as u64)))
            .filter_map(|(seq, bytes)| Some((seq, *moved.get(&seq)?, bytes)))
        {
            st.change(List::Messages, to, true, bytes);
            st.change(List::Messages, seq, false, bytes);
        }
        st.counters.last_seq = next.last_seq;
        self.note_stored(next.last_seq);
        st.counters.acked = next.acked;
        st.persisted_hw = next.last_seq;
        st.sent = floor;
        Ok(old.len() as u64)
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

    /// Wakes [`Queue::wait_stored_after`] when `seq` is above what was stored before.
    fn note_stored(&self, seq: u64) {
        self.shared.stored_tx.send_if_modified(|s| {
            let moved = seq > *s;
            if moved {
                *s = seq;
            }
            moved
        });
    }

    /// Highest sequence number stored, on disk or not yet.
    pub fn stored_seq(&self) -> u64 {
        *self.shared.stored_tx.borrow()
    }

    /// Resolves once a message with a sequence number above `after` is stored, on disk or not.
    pub async fn wait_stored_after(&self, after: u64) {
        let mut rx = self.shared.stored_tx.subscribe();
        let _ = rx.wait_for(|s| *s > after).await;
    }

    /// Up to `max_count` durable messages with sequence numbers above `after`, stopping before
    /// `max_bytes` is exceeded (but always at least one message when one exists).
    pub fn read_after(&self, after: u64, max_count: usize, max_bytes: usize) -> Result<Vec<Message>, QueueError> {
        self.read_through(after, self.durable_seq(), max_count, max_bytes)
    }

    /// Like [`Queue::read_after`], but up to what is stored rather than what is on disk. Only
    /// for a queue whose sender keeps each message until this queue's durable mark covers it
    /// (an inbox): a message handed on before the flush and lost in a crash is offered again
    /// by the sender, with the same id. This takes the receiver's flush off the way to the
    /// webhook.
    pub fn read_stored_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>, QueueError> {
        self.read_through(after, self.stored_seq(), max_count, max_bytes)
    }

    fn read_through(
        &self,
        after: u64,
        through: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>, QueueError> {
        if through <= after {
            return Ok(Vec::new());
        }
        let corrupt = || QueueError::Corrupt(self.shared.name.clone());
        let (mark, above) = {
            let st = lock(&self.shared.state);
            (st.counters.consumed, st.above.clone())
        };
        // Two ordered streams merged by sequence number: records of their own, and the live
        // members of group records (which never overlap one another).
        let tree = &self.shared.tree;
        let mut singles = tree
            .range(key(MSG_PREFIX, after.saturating_add(1))..=key(MSG_PREFIX, through))
            .peekable();
        let from = after.max(mark).saturating_add(1);
        let mut groups = tree.range(key(GROUP_PREFIX, from)..=key(GROUP_PREFIX, u64::MAX));
        let mut members: std::collections::VecDeque<Message> = Default::default();
        let mut groups_left = true;
        let mut out = Vec::new();
        let mut total = 0usize;
        loop {
            while members.is_empty() && groups_left {
                let Some(item) = groups.next() else {
                    groups_left = false;
                    break;
                };
                let (_, raw) = item.map_err(|e| self.storage(e))?;
                let all = group_members(&raw).ok_or_else(corrupt)?;
                if all.first().is_some_and(|(s, _)| *s > through) {
                    groups_left = false;
                    break;
                }
                for (seq, stored) in all {
                    if seq >= from && seq <= through && !above.contains_key(&seq) {
                        members.push_back(decode_message(seq, stored).ok_or_else(corrupt)?);
                    }
                }
            }
            let single = match singles.peek() {
                Some(Ok((k, _))) => Some(seq_of(k).ok_or_else(corrupt)?),
                Some(Err(e)) => return Err(self.storage(e.clone())),
                None => None,
            };
            let msg = match (single, members.front().map(|m| m.seq)) {
                (None, None) => break,
                (Some(s), g) if g.is_none_or(|g| s <= g) => {
                    if g == Some(s) {
                        // Left by a crash while it was being retried: one message, not two.
                        members.pop_front();
                    }
                    let (_, v) = singles.next().ok_or_else(corrupt)?.map_err(|e| self.storage(e))?;
                    decode_message(s, &v).ok_or_else(corrupt)?
                }
                _ => members.pop_front().ok_or_else(corrupt)?,
            };
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
    /// the next hop) and records `seq` as acknowledged. Not flushed: after a crash they are
    /// handed on again, never lost. Reads only the keys it removes.
    pub fn remove_through(&self, seq: u64) -> Result<u64, QueueError> {
        let mut removed = 0;
        loop {
            // In steps, the lock released between them: the flush thread takes it too.
            let (n, more) = self.remove_through_step(seq, REMOVE_STEP)?;
            removed += n;
            if !more {
                return Ok(removed);
            }
        }
    }

    /// Removes up to `max` messages at or below `seq`; true when more may be left.
    fn remove_through_step(&self, seq: u64, max: usize) -> Result<(u64, bool), QueueError> {
        let mut st = self.writable()?;
        if seq > st.counters.acked {
            st.counters.acked = seq.min(st.counters.last_seq);
            st.dirty = true;
        }
        let mut removed = 0;
        // Group members first: consumed, and their records removed as the mark passes them.
        while removed < max as u64 && st.counters.consumed < seq {
            let from = st.counters.consumed.saturating_add(1);
            let Some(item) = self
                .shared
                .tree
                .range(key(GROUP_PREFIX, from)..=key(GROUP_PREFIX, u64::MAX))
                .next()
            else {
                break;
            };
            let (k, raw) = item.map_err(|e| self.storage(e))?;
            let members = group_members(&raw).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
            let gkey = seq_of(&k).unwrap_or(0);
            let mut passed = true;
            for (s, stored) in members.iter().filter(|(s, _)| *s >= from) {
                if *s > seq {
                    passed = false;
                    break;
                }
                let size = stored_body_len(stored) as u64;
                if st.above.insert(*s, size).is_none() {
                    st.change(List::Grouped, gkey, false, size);
                    removed += 1;
                }
            }
            // This record is the first above the mark: the mark moves on from it.
            self.advance(&mut st, Some((k, raw)))?;
            if !passed {
                break;
            }
        }
        while removed < max as u64 {
            // Removed keys are gone from the tree, so each lookup finds the next one at once.
            let next = self
                .shared
                .tree
                .range(key(MSG_PREFIX, 0)..=key(MSG_PREFIX, seq))
                .next()
                .transpose()
                .map_err(|e| self.storage(e))?;
            let Some((k, _)) = next else {
                return Ok((removed, false));
            };
            if removed == 0 {
                self.persist_high_water(&mut st)?;
            }
            if let Some(v) = self.shared.tree.remove(&k).map_err(|e| self.storage(e))? {
                st.change(
                    List::Messages,
                    seq_of(&k).unwrap_or(0),
                    false,
                    stored_body_len(&v) as u64,
                );
                removed += 1;
            }
        }
        Ok((removed, true))
    }

    /// A receiver that changes whenever a message reappears in the queue without the durable
    /// mark moving (an operator retried a dead letter); consumers wait on it beside
    /// [`Queue::wait_durable_after`].
    pub fn kicks(&self) -> watch::Receiver<u64> {
        self.shared.kicks.subscribe()
    }

    /// Everything this queue holds, for moving it to another engine; reads it all (a store
    /// no daemon serves).
    pub fn image(&self) -> Result<QueueImage, QueueError> {
        let corrupt = || QueueError::Corrupt(self.shared.name.clone());
        let (last_seq, acked, sent) = {
            let st = lock(&self.shared.state);
            (st.counters.last_seq, st.counters.acked, st.sent)
        };
        let mut image = QueueImage {
            last_seq,
            acked,
            sent,
            messages: self.read_through(0, last_seq, usize::MAX, usize::MAX)?,
            ..QueueImage::default()
        };
        for item in self.shared.tree.scan_prefix([DEAD_PREFIX]) {
            let (_, v) = item.map_err(|e| self.storage(e))?;
            let len = v.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
            let meta: DeadLetter = len
                .and_then(|l| v.get(4..4 + l as usize))
                .and_then(|m| serde_json::from_slice(m).ok())
                .ok_or_else(corrupt)?;
            let stored = dead_letter_message(&v).ok_or_else(corrupt)?;
            let body = decode_message(meta.seq, stored).ok_or_else(corrupt)?.body;
            image.dead_letters.push((meta, body));
        }
        for item in self.shared.tree.scan_prefix([IDEM_PREFIX]) {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let key = String::from_utf8_lossy(&k[1..]).into_owned();
            let seq = seq_of(&v).ok_or_else(corrupt)?;
            let at = v
                .get(9..17)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(corrupt)?;
            let id = String::from_utf8_lossy(v.get(17..).unwrap_or_default()).into_owned();
            image.idempotency_keys.push((key, seq, id, at));
        }
        for seq in last_seq.saturating_sub(RECENT_IDS) + 1..=last_seq {
            if let Some(id) = self.recent_id(seq)? {
                image.peer_ids.push((seq, id));
            }
        }
        Ok(image)
    }

    /// Puts dead letter `seq` back into the queue at its own sequence number, ahead of
    /// everything queued after it; `false` when there is no such dead letter. Durable after
    /// the next [`Store::flush`]. It needs no room: a dead letter already counts against the
    /// bounds.
    pub fn retry_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        self.check()?;
        let mut st = self.writable()?;
        let dk = key(DEAD_PREFIX, seq);
        let Some(raw) = self.shared.tree.get(dk).map_err(|e| self.storage(e))? else {
            return Ok(false);
        };
        let stored = dead_letter_message(&raw).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
        let size = stored_body_len(stored) as u64;
        // Its group may hold it still, live when a crash forgot its consumption: consumed
        // now, and that written down (the mark in the record below, or the members consumed
        // out of order) before the copy goes in, or a crash would bring back both.
        self.consume(&mut st, seq)?;
        if st.above.contains_key(&seq) {
            save_above(&self.shared.tree, &st.above).map_err(|e| self.storage(e))?;
        }
        // Counted as a message before it becomes one, so counters recovered after a crash in
        // between over-count; never under-count.
        self.write_record(&mut st, Some((List::Messages, size)))?;
        // The sequence number is kept: an inbox's numbers belong to the sending peer. The
        // message goes in before the dead letter goes out, so a crash between keeps both.
        let previous = self
            .shared
            .tree
            .insert(key(MSG_PREFIX, seq), stored)
            .map_err(|e| self.storage(e))?;
        if let Some(p) = previous {
            // Left by a crash while it was being dead-lettered: one message, not two.
            st.change(List::Messages, seq, false, stored_body_len(&p) as u64);
        }
        st.change(List::Messages, seq, true, size);
        self.shared.tree.remove(dk).map_err(|e| self.storage(e))?;
        st.change(List::Dead, seq, false, size);
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
        let mut st = self.writable()?;
        let dk = key(DEAD_PREFIX, seq);
        let Some(raw) = self.shared.tree.get(dk).map_err(|e| self.storage(e))? else {
            return Ok(None);
        };
        let stored = dead_letter_message(&raw).ok_or_else(|| QueueError::Corrupt(self.shared.name.clone()))?;
        let size = stored_body_len(stored) as u64;
        // No room check: the dead letter already counts against the bounds.
        let new_seq = st.counters.last_seq + 1;
        // Counted as a message before it becomes one, so counters recovered after a crash in
        // between over-count; never under-count.
        st.counters.last_seq = new_seq;
        self.note_stored(new_seq);
        self.write_record(&mut st, Some((List::Messages, size)))?;
        self.shared
            .tree
            .insert(key(MSG_PREFIX, new_seq), stored)
            .map_err(|e| self.storage(e))?;
        st.change(List::Messages, new_seq, true, size);
        self.shared.tree.remove(dk).map_err(|e| self.storage(e))?;
        st.change(List::Dead, seq, false, size);
        Ok(Some(new_seq))
    }

    /// Deletes dead letter `seq` for good; `false` when there is no such dead letter.
    pub fn drop_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        self.check()?;
        let mut st = self.writable()?;
        let Some(v) = self
            .shared
            .tree
            .remove(key(DEAD_PREFIX, seq))
            .map_err(|e| self.storage(e))?
        else {
            return Ok(false);
        };
        st.change(List::Dead, seq, false, value_bytes(List::Dead, &v));
        Ok(true)
    }

    /// Moves a message to the dead-letter list with the reason.
    pub fn dead_letter(&self, msg: &Message, reason: &str) -> Result<(), QueueError> {
        let mut st = self.writable()?;
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
        let size = msg.body.len() as u64;
        // Counted as a dead letter before it becomes one (and the high-water mark persisted
        // before the message goes): a crash in between leaves counters that over-count.
        self.write_record(&mut st, Some((List::Dead, size)))?;
        // The dead letter goes in before the message goes out: a crash between keeps both,
        // and the message is simply refused again.
        let previous = self
            .shared
            .tree
            .insert(key(DEAD_PREFIX, msg.seq), value)
            .map_err(|e| self.storage(e))?;
        if let Some(p) = previous {
            st.change(List::Dead, msg.seq, false, value_bytes(List::Dead, &p));
        }
        st.change(List::Dead, msg.seq, true, size);
        self.take(&mut st, msg.seq)?;
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

    /// Counters and the oldest message's age. Reads the oldest message's record.
    pub fn stats(&self) -> QueueStats {
        let c = lock(&self.shared.state).counters;
        let oldest = self
            .read_through(0, u64::MAX, 1, usize::MAX)
            .ok()
            .and_then(|m| m.first().map(|m| m.enqueued_at_ms));
        QueueStats {
            depth: c.sums.count,
            bytes: c.sums.bytes,
            last_seq: c.last_seq,
            oldest_enqueued_ms: oldest,
            dead_letters: c.sums.dead,
            dead_letter_bytes: c.sums.dead_bytes,
        }
    }

    /// Resolves once the counters are exact again after an unclean stop (at once when they
    /// are); until then they may over-count removals made just before the stop.
    pub async fn counters_exact(&self) {
        let mut rx = self.shared.recounted.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Keys read so far to recover this queue's counters (opening and recounting).
    pub fn keys_read_for_counters(&self) -> u64 {
        self.shared.keys_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets idempotency keys accepted before `cutoff_ms`, so the key index stays bounded.
    /// Reads only the keys it forgets (an index by accept time).
    pub fn prune_idempotency_keys(&self, cutoff_ms: u64) -> Result<usize, QueueError> {
        let mut total = 0;
        loop {
            let n = self.prune_idempotency_keys_step(cutoff_ms, PRUNE_STEP)?;
            total += n;
            if n < PRUNE_STEP {
                return Ok(total);
            }
        }
    }

    /// One step of [`Queue::prune_idempotency_keys`]: at most `max` keys.
    fn prune_idempotency_keys_step(&self, cutoff_ms: u64, max: usize) -> Result<usize, QueueError> {
        let mut lo = vec![IDEM_TIME_PREFIX];
        lo.extend_from_slice(&0u64.to_be_bytes());
        let mut hi = vec![IDEM_TIME_PREFIX];
        hi.extend_from_slice(&cutoff_ms.to_be_bytes());
        let due: Vec<(sled::IVec, sled::IVec)> = self
            .shared
            .tree
            .range(lo..hi)
            .take(max)
            .collect::<Result<_, _>>()
            .map_err(|e| self.storage(e))?;
        for (t, idem) in &due {
            let mut k = vec![IDEM_PREFIX];
            k.extend_from_slice(idem);
            // The key is removed before its index entry: a crash between leaves an index entry
            // that the next prune removes, never a key that is never pruned.
            self.shared.tree.remove(k).map_err(|e| self.storage(e))?;
            self.shared.tree.remove(t).map_err(|e| self.storage(e))?;
        }
        Ok(due.len())
    }
}

/// A table of JSON records keyed by string: connection registries and the like.
#[derive(Clone, Debug)]
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
        self.list_prefix("")
    }

    /// How many records have keys starting with `prefix` (reads keys only).
    pub fn count_prefix(&self, prefix: &str) -> Result<u64, QueueError> {
        let mut n = 0;
        for item in self.tree.scan_prefix(prefix) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The records whose keys start with `prefix`, in key order.
    pub fn list_prefix<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>, QueueError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let value =
                serde_json::from_slice(&v).map_err(|e| QueueError::Corrupt(format!("{}/{key}: {e}", self.name)))?;
            out.push((key, value));
        }
        Ok(out)
    }
}

/// Opens the store in `dir` again once an instance this process dropped let go of its lock
/// (its threads end after the drop), within 10 s; for tests that reopen a data directory.
#[cfg(test)]
pub(crate) fn reopen_when_released(dir: &Path, cache_bytes: u64) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir, cache_bytes) {
            Ok(s) => return s,
            Err(QueueError::Locked(_)) if std::time::Instant::now() < deadline => std::thread::yield_now(),
            Err(e) => panic!("reopen: {e}"),
        }
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

    /// A queue made before the shared tree, in a tree of its own, stays there: its messages
    /// read back and new ones go to it; a new queue goes to the shared tree, and a new
    /// connection adds no tree.
    #[tokio::test]
    async fn a_queue_in_a_tree_of_its_own_stays_there_and_new_queues_share_one_tree() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As an earlier version left it: the queue's records in `queue/old/out`.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let own = Records::own(db.open_tree("queue/old/out").unwrap());
            own.insert(key(MSG_PREFIX, 1), encode_message("id1", "text/plain", 1, b"before"))
                .unwrap();
            db.flush().unwrap();
        }
        {
            let store = reopen(dir.path());
            let q = store.queue("old/out", LIMITS).unwrap();
            assert_eq!(q.first().unwrap().unwrap().body, Bytes::from_static(b"before"));
            q.append(msg("after"), None).unwrap();
            store
                .queue("new/out", LIMITS)
                .unwrap()
                .append(msg("new"), None)
                .unwrap();
            store.flush().await.unwrap();
        }
        let store = reopen(dir.path());
        let q = store.queue("old/out", LIMITS).unwrap();
        let bodies: Vec<Bytes> = q
            .read_after(0, 10, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|m| m.body)
            .collect();
        assert_eq!(bodies, [Bytes::from_static(b"before"), Bytes::from_static(b"after")]);
        let names: Vec<Vec<u8>> = store.inner.db.tree_names().iter().map(|n| n.to_vec()).collect();
        assert!(names.contains(&b"queue/old/out".to_vec()), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with(b"queue/new")), "{names:?}");
        assert_eq!(store.queue("new/out", LIMITS).unwrap().stats().depth, 1);
        assert_eq!(store.inner.queues_tree.scan_prefix(b"old/out\0").count(), 0);
    }

    #[tokio::test]
    async fn messages_never_sent_move_above_a_cursor_from_an_earlier_copy_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let q = store.queue("c/out", LIMITS).unwrap();
            q.append(msg("snapshot"), None).unwrap();
            store.flush().await.unwrap();
        }
        // Reopened (as after a restore): message 1 may have been handed on before.
        let store = reopen(dir.path());
        let q = store.queue("c/out", LIMITS).unwrap();
        assert_eq!(q.sent_through(), 1);
        let mut ids = Vec::new();
        for body in ["a", "bb", "ccc"] {
            ids.push(q.append(msg(body), None).unwrap().id);
        }
        store.flush().await.unwrap();
        assert_eq!(q.renumber_unsent(1).unwrap(), 0, "a cursor within what was sent");
        // The peer acknowledges up to 3 from an earlier copy: 2..4 were never sent from here.
        assert_eq!(q.renumber_unsent(3).unwrap(), 3);
        assert_eq!((q.last_seq(), q.sent_through(), q.acked_through()), (7, 4, 3));
        assert!(
            q.read_after(4, 10, 1 << 20).unwrap().is_empty(),
            "not durable before the flush"
        );
        store.flush().await.unwrap();
        let got = q.read_after(3, 10, 1 << 20).unwrap();
        assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids);
        let s = q.stats();
        assert_eq!((s.depth, s.bytes), (4, 14));
        q.note_sent(7);
        assert_eq!(q.renumber_unsent(7).unwrap(), 0);
        assert_eq!(q.append(msg("d"), None).unwrap().seq, 8);
        store.flush().await.unwrap();
        drop((q, store));
        let store = reopen(dir.path());
        let q = store.queue("c/out", LIMITS).unwrap();
        let seqs: Vec<u64> = q.read_after(0, 10, 1 << 20).unwrap().iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 5, 6, 7, 8]);
        assert_eq!(q.append(msg("e"), None).unwrap().seq, 9);
    }

    #[tokio::test]
    async fn an_idempotency_key_retried_after_a_renumbering_answers_the_new_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/out", LIMITS).unwrap();
        let first = q.append(msg("a"), Some("key-a")).unwrap();
        q.append(msg("b"), Some("key-b")).unwrap();
        assert_eq!(first.seq, 1);
        store.flush().await.unwrap();
        // Reopened (as after a restore): messages 1 and 2 may have been handed on before.
        drop((q, store));
        let store = reopen(dir.path());
        let q = store.queue("c/out", LIMITS).unwrap();
        let c = q.append(msg("c"), Some("key-c")).unwrap();
        assert_eq!(c.seq, 3);
        assert_eq!(q.renumber_unsent(5).unwrap(), 1);
        let again = q.append(msg("c"), Some("key-c")).unwrap();
        assert!(again.duplicate);
        assert_eq!((again.seq, again.id), (6, c.id), "the number message c has now");
        let a = q.append(msg("a"), Some("key-a")).unwrap();
        assert_eq!(a.seq, 1, "a message that was not moved keeps its number");
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
        let store = reopen(dir.path());
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
        let store = reopen(dir.path());
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
        assert_eq!(q.append_remote(&[remote(1), remote(2)]).unwrap().high_water, 2);
        let again = q.append_remote(&[remote(1), remote(2), remote(3)]).unwrap();
        assert_eq!((again.high_water, again.stored, again.gap), (3, 1, None));
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
        assert_eq!(q.append_remote(&batch).unwrap().high_water, 3, "the prefix that fits");
        assert!(
            matches!(q.append_remote(&batch), Err(QueueError::FullCount { .. })),
            "nothing new fits: full, and nothing lost"
        );
        store.flush().await.unwrap();
        assert!(q.remove(2).unwrap());
        assert!(!q.remove(2).unwrap());
        assert_eq!(q.append_remote(&batch).unwrap().high_water, 4);
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

    fn reopen(dir: &Path) -> Store {
        super::reopen_when_released(dir, 1 << 22)
    }

    fn sized(n: usize) -> NewMessage {
        msg(&"x".repeat(n))
    }

    const ROOMY: Limits = Limits {
        max_messages: 1 << 20,
        max_bytes: 1 << 30,
    };

    #[tokio::test]
    async fn opening_a_cleanly_closed_queue_reads_none_of_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 22).unwrap();
            let q = store.queue("c/out", ROOMY).unwrap();
            for i in 0..3000 {
                q.append(sized(i % 7), None).unwrap();
            }
            let first = {
                store.flush().await.unwrap();
                q.first().unwrap().unwrap()
            };
            q.dead_letter(&first, "HTTP 400").unwrap();
            q.remove_through(1000).unwrap();
            store.flush().await.unwrap();
        }
        let store = reopen(dir.path());
        let q = store.queue("c/out", ROOMY).unwrap();
        assert_eq!(q.keys_read_for_counters(), 0, "opening read no message");
        let s = q.stats();
        let bytes: u64 = (1000..3000u64).map(|i| i % 7).sum();
        assert_eq!((s.depth, s.bytes, s.dead_letters, s.last_seq), (2000, bytes, 1, 3000));
        assert_eq!(q.append(msg("n"), None).unwrap().seq, 3001);
    }

    #[tokio::test]
    async fn after_an_unclean_stop_opening_reads_only_the_tail_and_a_background_recount_corrects_removals() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 22).unwrap();
            let q = store.queue("c/out", ROOMY).unwrap();
            for _ in 0..1000 {
                q.append(sized(3), None).unwrap();
            }
            store.flush().await.unwrap();
            q.remove_through(500).unwrap();
            let m600 = q.read_after(599, 1, usize::MAX).unwrap().remove(0);
            q.dead_letter(&m600, "HTTP 422").unwrap();
            q.remove_through(700).unwrap();
            for _ in 0..10 {
                q.append(sized(5), None).unwrap();
            }
            // No flush, no clean close: the last counters record predates the removals above.
            store.close_uncleanly();
        }
        let store = reopen(dir.path());
        store
            .inner
            .auto_recount
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let q = store.queue("c/out", ROOMY).unwrap();
        let read_at_open = q.keys_read_for_counters();
        assert!(
            read_at_open <= 10,
            "opening read {read_at_open} keys, only the tail of 10 appends"
        );
        let s = q.stats();
        assert_eq!(s.last_seq, 1010, "appends after the record are counted exactly");
        assert!(
            s.depth >= 310 && s.bytes >= 300 * 3 + 50,
            "an estimate never under-counts: {s:?}"
        );
        // The recount the open starts in the background, started by hand here to measure it.
        let weak = Arc::downgrade(&q.shared);
        std::thread::spawn(move || recount(weak));
        tokio::time::timeout(std::time::Duration::from_secs(20), q.counters_exact())
            .await
            .unwrap();
        let s = q.stats();
        assert_eq!(
            (s.depth, s.bytes, s.dead_letters, s.dead_letter_bytes),
            (310, 300 * 3 + 50, 1, 3)
        );
        assert_eq!(q.append(msg("n"), None).unwrap().seq, 1011);
    }

    #[tokio::test]
    async fn a_queue_is_recovered_once_per_process_and_each_flush_saves_its_counters() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 22).unwrap();
            let q = store.queue("c/out", ROOMY).unwrap();
            for _ in 0..500 {
                q.append(sized(2), None).unwrap();
            }
            drop(q);
            // Every later use (intake, status, metrics) finds the open queue: nothing re-read.
            let again = store.queue("c/out", ROOMY).unwrap();
            assert_eq!(again.keys_read_for_counters(), 0);
            assert_eq!(again.stats().depth, 500);
            store.flush().await.unwrap();
            store.close_uncleanly();
        }
        let store = reopen(dir.path());
        store
            .inner
            .auto_recount
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let q = store.queue("c/out", ROOMY).unwrap();
        assert_eq!(
            q.keys_read_for_counters(),
            0,
            "the record written with the flush covers all 500"
        );
        let s = q.stats();
        assert_eq!((s.depth, s.bytes, s.last_seq), (500, 1000, 500));
    }

    #[tokio::test]
    async fn dead_letters_count_against_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let limits = Limits {
            max_messages: 2,
            max_bytes: 10,
        };
        let q = store.queue("c/in", limits).unwrap();
        q.append(msg("aaaa"), None).unwrap();
        q.append(msg("bb"), None).unwrap();
        store.flush().await.unwrap();
        let a = q.first().unwrap().unwrap();
        q.dead_letter(&a, "HTTP 400").unwrap();
        match q.append(msg("c"), None) {
            Err(QueueError::FullCount {
                count, dead_letters, ..
            }) => assert_eq!((count, dead_letters), (2, 1)),
            other => panic!("a dead letter still takes room: {other:?}"),
        }
        assert!(matches!(
            q.append_remote(&[remote(3)]),
            Err(QueueError::FullCount { .. })
        ));
        q.remove(2).unwrap();
        match q.append(msg("1234567"), None) {
            Err(QueueError::FullBytes { dead_letter_bytes, .. }) => assert_eq!(dead_letter_bytes, 4),
            other => panic!("dead-letter bytes count: {other:?}"),
        }
        // Retrying needs no room: the dead letter is already counted.
        q.append(msg("c"), None).unwrap();
        assert!(q.retry_dead_letter(a.seq).unwrap());
        let s = q.stats();
        assert_eq!((s.depth, s.dead_letters, s.bytes), (2, 0, 5));
    }

    #[tokio::test]
    async fn a_batch_that_reuses_sequence_numbers_for_other_messages_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/in", ROOMY).unwrap();
        q.append_remote(&[remote(1), remote(2), remote(3)]).unwrap();
        store.flush().await.unwrap();
        q.remove_through(3).unwrap();
        let mut other = remote(3);
        other.id = "restored".into();
        match q.append_remote(&[other, remote(4)]) {
            Err(e @ QueueError::SequenceConflict { .. }) => {
                let text = e.to_string();
                assert!(text.contains("id restored") && text.contains("id id3"), "{text}");
                assert!(text.contains("restored from a backup or copied"), "{text}");
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(q.last_seq(), 3, "nothing of the batch was stored");
        // A true retry (same ids, even after delivery) is still fine.
        let again = q.append_remote(&[remote(2), remote(3), remote(4)]).unwrap();
        assert_eq!((again.high_water, again.stored), (4, 1));
    }

    #[tokio::test]
    async fn a_sequence_older_than_the_retry_window_conflicts_and_the_window_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 22).unwrap();
        let q = store.queue("c/in", ROOMY).unwrap();
        let n = RECENT_IDS + 300;
        for chunk in (1..=n).collect::<Vec<_>>().chunks(512) {
            q.append_remote(&chunk.iter().map(|&s| remote(s)).collect::<Vec<_>>())
                .unwrap();
        }
        assert!(
            q.append_remote(&[remote(1)]).is_ok(),
            "still queued: the message itself says"
        );
        q.remove_through(n).unwrap();
        match q.append_remote(&[remote(1)]) {
            Err(QueueError::SequenceConflict {
                held_id: None,
                high_water,
                ..
            }) => assert_eq!(high_water, n),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(
            q.append_remote(&[remote(n - RECENT_IDS + 1)]).is_ok(),
            "the window's oldest"
        );
        // Every id of the window is remembered, in one key per batch, and little more.
        for seq in n - RECENT_IDS + 1..=n {
            assert!(q.recent_id(seq).unwrap().is_some(), "{seq}");
        }
        let batches = q.shared.tree.scan_prefix([BATCH_IDS_PREFIX]).count() as u64;
        assert!(batches <= RECENT_IDS / 512 + 2, "{batches} batch records");
    }

    fn keys_with(q: &Queue, prefix: u8) -> usize {
        q.shared.tree.scan_prefix([prefix]).count()
    }

    fn seqs(q: &Queue) -> Vec<u64> {
        let all = q.read_stored_after(0, usize::MAX, usize::MAX).unwrap();
        all.iter().map(|m| m.seq).collect()
    }

    #[tokio::test]
    async fn a_batch_from_a_peer_is_stored_several_to_a_record_and_each_record_removed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
        let q = store.queue("c/in", LIMITS).unwrap();
        let batch: Vec<Message> = (1..=10).map(remote).collect();
        assert_eq!(q.append_remote(&batch).unwrap().stored, 10);
        // Groups of GROUP_MAX_MESSAGES (3 in unit tests): four records, no key per message.
        assert_eq!((keys_with(&q, GROUP_PREFIX), keys_with(&q, MSG_PREFIX)), (4, 0));
        assert_eq!(seqs(&q), (1..=10).collect::<Vec<_>>());
        for seq in 1..=8 {
            assert!(q.remove(seq).unwrap());
            assert!(!q.remove(seq).unwrap(), "consumed once");
        }
        // The mark passed two whole groups and part of the third.
        assert_eq!(keys_with(&q, GROUP_PREFIX), 2);
        assert_eq!(seqs(&q), [9, 10]);
        assert_eq!((q.stats().depth, q.stats().bytes), (2, 2));
        // The mark reaches the disk with the counters at the next flush: a crash after it
        // brings back nothing consumed before it.
        store.flush().await.unwrap();
        drop(q);
        store.close_uncleanly();
        let store = reopen_when_released(&dir.path().join("db"), 1 << 20);
        let q = store.queue("c/in", LIMITS).unwrap();
        assert_eq!(seqs(&q), [9, 10]);
        q.counters_exact().await;
        assert_eq!((q.stats().depth, q.stats().bytes), (2, 2));
    }

    #[tokio::test]
    async fn members_taken_out_of_order_stay_taken_across_a_clean_restart_and_come_again_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let store = Store::open(&db, 1 << 20).unwrap();
        let q = store.queue("c/in", LIMITS).unwrap();
        q.append_remote(&(1..=6).map(remote).collect::<Vec<_>>()).unwrap();
        assert!(q.remove(2).unwrap());
        q.dead_letter(&remote(5), "HTTP 400").unwrap();
        assert_eq!(seqs(&q), [1, 3, 4, 6]);
        drop(q);
        drop(store);
        let store = reopen_when_released(&db, 1 << 20);
        let q = store.queue("c/in", LIMITS).unwrap();
        assert_eq!(seqs(&q), [1, 3, 4, 6], "a clean stop keeps what was taken out of order");
        assert_eq!((q.stats().depth, q.stats().dead_letters), (4, 1));
        // The dead letter goes back in ahead of what follows it, once.
        assert!(q.retry_dead_letter(5).unwrap());
        assert_eq!(seqs(&q), [1, 3, 4, 5, 6]);
        // Taken out of order now, then a crash: at least once, never lost, never twice.
        assert!(q.remove(4).unwrap());
        store.flush().await.unwrap();
        drop(q);
        store.close_uncleanly();
        let store = reopen_when_released(&db, 1 << 20);
        let q = store.queue("c/in", LIMITS).unwrap();
        assert_eq!(seqs(&q), [1, 3, 4, 5, 6], "4 comes again, 2 does not");
        q.counters_exact().await;
        assert_eq!((q.stats().depth, q.stats().dead_letters), (5, 0));
        for seq in [1, 3, 4, 5, 6] {
            assert!(q.remove(seq).unwrap());
        }
        assert_eq!((keys_with(&q, GROUP_PREFIX), keys_with(&q, MSG_PREFIX)), (0, 0));
        assert_eq!(q.stats().depth, 0);
    }

    #[test]
    fn a_counters_record_from_before_the_consumed_mark_is_read_with_the_mark_at_zero() {
        let c = Counters {
            last_seq: 9,
            acked: 4,
            consumed: 7,
            ..Counters::default()
        };
        let raw = encode_counters(&c, true);
        let (old, clean) = decode_counters(&raw[..COUNTERS_LEN_V1]).unwrap();
        assert!(clean);
        assert_eq!(old, Counters { consumed: 0, ..c });
        assert_eq!(decode_counters(&raw).unwrap().0, c);
    }

    #[test]
    fn groups_stay_under_their_bounds_and_a_large_message_is_a_group_of_its_own() {
        let msg = |seq, len| Message {
            body: Bytes::from(vec![b'x'; len]),
            ..remote(seq)
        };
        let batch = vec![msg(1, 100), msg(2, 3000), msg(3, 3000), msg(4, 20_000), msg(5, 10)];
        let sizes: Vec<Vec<u64>> = groups_of(&batch)
            .iter()
            .map(|g| g.iter().map(|m| m.seq).collect())
            .collect();
        assert_eq!(sizes, [vec![1, 2], vec![3], vec![4], vec![5]]);
        let raw = encode_group(&batch[..2]);
        let members = group_members(&raw).unwrap();
        assert_eq!(members.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(decode_message(2, members[1].1).unwrap(), batch[1]);
        assert!(
            group_members(&raw[..raw.len() - 1]).is_none(),
            "a damaged record is refused"
        );
    }

    #[tokio::test]
    async fn an_inbox_hands_on_what_it_stored_before_the_flush_made_it_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/in", ROOMY).unwrap();
        let waiting = {
            let q = q.clone();
            tokio::spawn(async move { q.wait_stored_after(0).await })
        };
        q.append_remote(&[remote(1), remote(2)]).unwrap();
        waiting.await.unwrap();
        assert_eq!((q.stored_seq(), q.durable_seq()), (2, 0));
        assert!(q.read_after(0, 10, 1 << 20).unwrap().is_empty(), "nothing durable yet");
        let seqs: Vec<u64> = q
            .read_stored_after(0, 10, 1 << 20)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        // The durable mark, which acknowledges to the sender, still waits for the flush.
        store.flush().await.unwrap();
        assert_eq!(q.durable_seq(), 2);
    }

    #[tokio::test]
    async fn a_flush_visits_only_the_queues_written_since_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let queues: Vec<Queue> = (0..500)
            .map(|i| store.queue(&format!("q{i}"), ROOMY).unwrap())
            .collect();
        let touched =
            |store: &Store| -> Vec<String> { lock(&store.inner.touched).iter().map(|q| q.name.clone()).collect() };
        assert!(touched(&store).is_empty(), "opening writes nothing");
        queues[7].append(msg("a"), None).unwrap();
        queues[7].append(msg("b"), None).unwrap();
        queues[9].append(msg("c"), None).unwrap();
        assert_eq!(touched(&store), ["q7", "q9"], "each once, in the order written");
        store.flush().await.unwrap();
        assert!(touched(&store).is_empty());
        assert_eq!((queues[7].durable_seq(), queues[9].durable_seq()), (2, 1));
        // A removal is a write too: its counters go into the next flush's record.
        queues[7].remove(1).unwrap();
        assert_eq!(touched(&store), ["q7"]);
        store.flush().await.unwrap();
        drop(queues);
        store
            .inner
            .clean_close
            .store(false, std::sync::atomic::Ordering::Relaxed);
        drop(store);
        let store = reopen(dir.path());
        let q = store.queue("q7", ROOMY).unwrap();
        assert_eq!(
            q.stats().depth,
            1,
            "the counters record the flush wrote after the removal"
        );
    }

    #[tokio::test]
    async fn ids_remembered_one_per_message_by_earlier_versions_still_tell_retries_from_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/in", ROOMY).unwrap();
        q.append_remote(&[remote(1), remote(2)]).unwrap();
        // As an earlier version left it: per-message ids, no batch record.
        for k in q.shared.tree.scan_prefix([BATCH_IDS_PREFIX]).keys() {
            q.shared.tree.remove(k.unwrap()).unwrap();
        }
        for seq in [1, 2] {
            q.shared
                .tree
                .insert(key(RECENT_PREFIX, seq), remote(seq).id.as_bytes())
                .unwrap();
        }
        q.remove_through(2).unwrap();
        assert_eq!(q.append_remote(&[remote(2), remote(3)]).unwrap().stored, 1, "a retry");
        let mut other = remote(1);
        other.id = "someone-else".into();
        assert!(matches!(
            q.append_remote(&[other]),
            Err(QueueError::SequenceConflict { held_id: Some(_), .. })
        ));
    }

    #[tokio::test]
    async fn a_sequence_gap_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/in", ROOMY).unwrap();
        assert_eq!(q.append_remote(&[remote(1), remote(2)]).unwrap().gap, None);
        let got = q.append_remote(&[remote(5), remote(6)]).unwrap();
        assert_eq!(got.gap, Some(SequenceGap { expected: 3, got: 5 }));
        assert_eq!(got.high_water, 6);
    }

    #[tokio::test]
    async fn acknowledgements_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let q = store.queue("c/out", ROOMY).unwrap();
            for _ in 0..5 {
                q.append(msg("a"), None).unwrap();
            }
            store.flush().await.unwrap();
            q.remove_through(3).unwrap();
            assert_eq!(q.acked_through(), 3);
            q.remove_through(2).unwrap();
            assert_eq!(q.acked_through(), 3, "never goes back");
            store.flush().await.unwrap();
            store.close_uncleanly();
        }
        let store = reopen(dir.path());
        assert_eq!(store.queue("c/out", ROOMY).unwrap().acked_through(), 3);
    }

    #[tokio::test]
    async fn pruning_reads_only_expired_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let q = store.queue("c/out", ROOMY).unwrap();
        for i in 0..5 {
            q.append(msg("a"), Some(&format!("k{i}"))).unwrap();
        }
        assert_eq!(q.prune_idempotency_keys(0).unwrap(), 0);
        assert_eq!(q.prune_idempotency_keys(now_ms() + 1).unwrap(), 5);
        assert_eq!(q.shared.tree.scan_prefix([IDEM_TIME_PREFIX]).count(), 0);
        assert!(!q.append(msg("a"), Some("k1")).unwrap().duplicate, "forgotten");
    }

    /// Steps of the model-based test.
    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        AppendRemote { n: u64, gap: u64, len: usize },
        ResendLastBatch,
        Conflict(u64),
        Remove(usize),
        RemoveThrough(usize),
        DeadLetter(usize),
        Retry(usize),
        Drop(usize),
        Flush,
        Reopen { clean: bool },
        RecountStep,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0usize..20).prop_map(Op::Append),
            3 => (1u64..5, prop_oneof![4 => Just(0u64), 1 => 1u64..3], 0usize..20)
                .prop_map(|(n, gap, len)| Op::AppendRemote { n, gap, len }),
            1 => Just(Op::ResendLastBatch),
            1 => any::<u64>().prop_map(Op::Conflict),
            2 => any::<usize>().prop_map(Op::Remove),
            1 => any::<usize>().prop_map(Op::RemoveThrough),
            1 => any::<usize>().prop_map(Op::DeadLetter),
            1 => any::<usize>().prop_map(Op::Retry),
            1 => any::<usize>().prop_map(Op::Drop),
            2 => Just(Op::Flush),
            1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
            2 => Just(Op::RecountStep),
        ]
    }

    /// What the queue should hold.
    #[derive(Default)]
    struct Model {
        msgs: std::collections::BTreeMap<u64, Message>,
        dead: std::collections::BTreeMap<u64, Message>,
        last_seq: u64,
        remote_ids: std::collections::BTreeMap<u64, String>,
        last_batch: Vec<Message>,
        /// Every message taken out (removed or dead-lettered): after a crash, one consumed
        /// after the last counters record may come again, and nothing else may.
        taken: std::collections::BTreeMap<u64, Message>,
    }

    const MODEL_LIMITS: Limits = Limits {
        max_messages: 12,
        max_bytes: 120,
    };

    impl Model {
        fn sums(&self) -> (u64, u64, u64, u64) {
            let b = |m: &std::collections::BTreeMap<u64, Message>| m.values().map(|m| m.body.len() as u64).sum();
            (
                self.msgs.len() as u64,
                b(&self.msgs),
                self.dead.len() as u64,
                b(&self.dead),
            )
        }

        fn fits(&self, len: usize) -> bool {
            let (c, b, d, db) = self.sums();
            c + d < MODEL_LIMITS.max_messages && b + db + len as u64 <= MODEL_LIMITS.max_bytes
        }
    }

    fn nth(m: &std::collections::BTreeMap<u64, Message>, i: usize) -> Option<u64> {
        (!m.is_empty()).then(|| *m.keys().nth(i % m.len()).unwrap())
    }

    /// Runs one step on the queue and the model; `estimating` while a recount is pending
    /// (the queue may then refuse for room the model has, never the other way round).
    async fn step(store: &mut Store, q: &mut Queue, model: &mut Model, op: Op, dir: &Path) {
        let estimating = q.shared.state.lock().unwrap().recount.is_some();
        match op {
            Op::Append(len) => {
                let m = sized(len);
                let fits = model.fits(len);
                match q.append(m.clone(), None) {
                    Ok(a) => {
                        assert!(fits, "accepted beyond the bounds");
                        assert_eq!(a.seq, model.last_seq + 1);
                        model.last_seq = a.seq;
                        model.msgs.insert(
                            a.seq,
                            Message {
                                seq: a.seq,
                                id: m.id,
                                content_type: m.content_type,
                                enqueued_at_ms: m.enqueued_at_ms,
                                body: m.body,
                            },
                        );
                    }
                    Err(QueueError::FullCount { .. } | QueueError::FullBytes { .. }) => {
                        assert!(!fits || estimating, "refused with room");
                    }
                    Err(e) => panic!("append: {e}"),
                }
            }
            Op::AppendRemote { n, gap, len } => {
                let start = model.last_seq + 1 + gap;
                let batch: Vec<Message> = (start..start + n)
                    .map(|seq| Message {
                        seq,
                        id: format!("r{seq}-{}", crate::crypto::random_id()),
                        content_type: "a/b".into(),
                        enqueued_at_ms: 7,
                        body: Bytes::from(vec![b'r'; len]),
                    })
                    .collect();
                remote_step(q, model, batch, estimating);
            }
            Op::ResendLastBatch => {
                let batch = model.last_batch.clone();
                remote_step(q, model, batch, estimating);
            }
            Op::Conflict(k) => {
                if model.last_seq > 0 {
                    let seq = 1 + k % model.last_seq;
                    let mut m = remote(seq);
                    m.id = "someone-else".into();
                    assert!(matches!(
                        q.append_remote(&[m]),
                        Err(QueueError::SequenceConflict { .. })
                    ));
                }
            }
            Op::Remove(i) => {
                if let Some(seq) = nth(&model.msgs, i) {
                    assert!(q.remove(seq).unwrap());
                    let m = model.msgs.remove(&seq).unwrap();
                    model.taken.insert(seq, m);
                }
            }
            Op::RemoveThrough(i) => {
                if let Some(seq) = nth(&model.msgs, i) {
                    let expect = model.msgs.range(..=seq).count() as u64;
                    assert_eq!(q.remove_through(seq).unwrap(), expect);
                    let kept = model.msgs.split_off(&(seq + 1));
                    model.taken.append(&mut std::mem::replace(&mut model.msgs, kept));
                }
            }
            Op::DeadLetter(i) => {
                if let Some(seq) = nth(&model.msgs, i) {
                    let m = model.msgs.remove(&seq).unwrap();
                    q.dead_letter(&m, "HTTP 400").unwrap();
                    model.taken.insert(seq, m.clone());
                    model.dead.insert(seq, m);
                }
            }
            Op::Retry(i) => {
                if let Some(seq) = nth(&model.dead, i) {
                    assert!(q.retry_dead_letter(seq).unwrap());
                    let m = model.dead.remove(&seq).unwrap();
                    model.msgs.insert(seq, m);
                }
            }
            Op::Drop(i) => {
                if let Some(seq) = nth(&model.dead, i) {
                    assert!(q.drop_dead_letter(seq).unwrap());
                    model.dead.remove(&seq);
                }
            }
            Op::Flush => {
                store.flush().await.unwrap();
                let got = q.read_after(0, usize::MAX, usize::MAX).unwrap();
                let want: Vec<Message> = model.msgs.values().cloned().collect();
                assert_eq!(got, want, "order and content of what is durable");
                let dead: Vec<u64> = q.dead_letters(usize::MAX).unwrap().iter().map(|d| d.seq).collect();
                assert_eq!(dead, model.dead.keys().copied().collect::<Vec<_>>());
            }
            Op::Reopen { clean } => {
                // Stand-ins from another directory, so every handle on the real one goes.
                let scratch = reopen(&dir.join("scratch"));
                drop(std::mem::replace(q, scratch.queue("stand-in", MODEL_LIMITS).unwrap()));
                let closing = std::mem::replace(store, scratch);
                if !clean {
                    closing.close_uncleanly();
                } else {
                    drop(closing);
                }
                *store = reopen(&dir.join("db"));
                store
                    .inner
                    .auto_recount
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                *q = store.queue("c/q", MODEL_LIMITS).unwrap();
                if clean {
                    assert_eq!(q.keys_read_for_counters(), 0);
                }
                assert_eq!(q.last_seq(), model.last_seq, "sequence numbers survive");
                // Everything written reached the disk (sled's own close), so all is there.
                store.flush().await.unwrap();
                let got = q.read_after(0, usize::MAX, usize::MAX).unwrap();
                if clean {
                    assert_eq!(got, model.msgs.values().cloned().collect::<Vec<_>>());
                } else {
                    // Group members consumed after the last counters record come again.
                    for m in &got {
                        let known = model.msgs.get(&m.seq).or_else(|| model.taken.get(&m.seq));
                        assert_eq!(known, Some(m), "only what was queued, unchanged");
                    }
                    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
                    assert!(model.msgs.keys().all(|s| seqs.contains(s)), "nothing lost");
                    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, once each");
                    model.msgs = got.into_iter().map(|m| (m.seq, m)).collect();
                }
            }
            Op::RecountStep => {
                recount_step(&q.shared, 3);
            }
        }
        let s = q.stats();
        let (c, b, d, db) = model.sums();
        let got = (s.depth, s.bytes, s.dead_letters, s.dead_letter_bytes);
        assert_eq!(s.last_seq, model.last_seq);
        if q.shared.state.lock().unwrap().recount.is_some() {
            assert!(
                got.0 + got.2 >= c + d && got.1 + got.3 >= b + db && got.0 >= c && got.1 >= b,
                "estimates may only over-count: {got:?} vs {:?}",
                (c, b, d, db)
            );
        } else {
            assert_eq!(got, (c, b, d, db), "exact counters");
        }
    }

    fn remote_step(q: &Queue, model: &mut Model, batch: Vec<Message>, estimating: bool) {
        if batch.is_empty() {
            return;
        }
        let hw = model.last_seq;
        let retry_ok = batch
            .iter()
            .filter(|m| m.seq <= hw)
            .all(|m| model.remote_ids.get(&m.seq) == Some(&m.id));
        let result = q.append_remote(&batch);
        if !retry_ok {
            assert!(matches!(result, Err(QueueError::SequenceConflict { .. })), "{result:?}");
            return;
        }
        // What the model would store: the prefix of the new ones that fits.
        let mut would = 0;
        let mut sim = Model {
            msgs: model.msgs.clone(),
            dead: model.dead.clone(),
            ..Model::default()
        };
        for m in batch.iter().filter(|m| m.seq > hw) {
            if !sim.fits(m.body.len()) {
                break;
            }
            sim.msgs.insert(m.seq, m.clone());
            would += 1;
        }
        let new = batch.iter().filter(|m| m.seq > hw).count();
        match result {
            Ok(r) => {
                assert!(
                    r.stored == would || (estimating && r.stored < would),
                    "{r:?} vs {would}"
                );
                for m in batch.iter().filter(|m| m.seq > hw).take(r.stored as usize) {
                    model.msgs.insert(m.seq, m.clone());
                    model.remote_ids.insert(m.seq, m.id.clone());
                    model.last_seq = m.seq;
                }
                assert_eq!(r.high_water, model.last_seq);
            }
            Err(QueueError::FullCount { .. } | QueueError::FullBytes { .. }) => {
                assert!(new > 0 && (would == 0 || estimating));
            }
            Err(e) => panic!("append_remote: {e}"),
        }
        model.last_batch = batch;
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]
        #[test]
        fn queue_follows_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let tmp = tempfile::tempdir().unwrap();
                let mut store = Store::open(&tmp.path().join("db"), 1 << 20).unwrap();
                store.inner.auto_recount.store(false, std::sync::atomic::Ordering::Relaxed);
                let mut q = store.queue("c/q", MODEL_LIMITS).unwrap();
                let mut model = Model::default();
                for op in ops {
                    step(&mut store, &mut q, &mut model, op, tmp.path()).await;
                }
            });
        }
    }
}
