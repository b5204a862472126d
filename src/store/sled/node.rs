//! The node's store contract ([`NodeStore`], [`NodeQueue`], [`NodeTable`]) kept by sled: each
//! write is the engine's own, followed by the store's group commit.

use super::{Queue, Store, Table};
use crate::store::{
    Appended, DeadLetter, Limits, Message, NewMessage, NodeQueue, NodeStore, NodeTable, QueueError, QueueStats,
    RemoteAppended,
};

/// A queue of a sled store, with the store that commits its writes.
#[derive(Clone, Debug)]
pub struct SledQueue {
    store: Store,
    queue: Queue,
}

impl SledQueue {
    /// `queue` of `store`, its writes committed by the store's group commit.
    pub fn new(store: Store, queue: Queue) -> SledQueue {
        SledQueue { store, queue }
    }

    /// The engine's queue.
    pub fn inner(&self) -> &Queue {
        &self.queue
    }

    async fn commit<T>(&self, result: Result<T, QueueError>) -> Result<T, QueueError> {
        let value = result?;
        self.store.flush().await?;
        Ok(value)
    }
}

impl NodeQueue for SledQueue {
    fn name(&self) -> &str {
        self.queue.name()
    }

    async fn append(&self, msg: NewMessage, idempotency_key: Option<&str>) -> Result<Appended, QueueError> {
        self.commit(self.queue.append(msg, idempotency_key)).await
    }

    async fn append_remote(&self, msgs: Vec<Message>) -> Result<RemoteAppended, QueueError> {
        self.commit(self.queue.append_remote(&msgs)).await
    }

    async fn read_after(&self, after: u64, max_count: usize, max_bytes: usize) -> Result<Vec<Message>, QueueError> {
        self.queue.read_after(after, max_count, max_bytes)
    }

    async fn wait_after(&self, after: u64) {
        self.queue.wait_durable_after(after).await
    }

    async fn read_stored_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>, QueueError> {
        self.queue.read_stored_after(after, max_count, max_bytes)
    }

    async fn wait_stored_after(&self, after: u64) {
        self.queue.wait_stored_after(after).await
    }

    fn kicks(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queue.kicks()
    }

    async fn first(&self) -> Result<Option<Message>, QueueError> {
        self.queue.first()
    }

    async fn remove(&self, seq: u64) -> Result<bool, QueueError> {
        self.queue.remove(seq)
    }

    async fn remove_through(&self, seq: u64) -> Result<u64, QueueError> {
        self.queue.remove_through(seq)
    }

    async fn acked_through(&self) -> Result<u64, QueueError> {
        Ok(self.queue.acked_through())
    }

    async fn note_sent(&self, seq: u64) -> Result<(), QueueError> {
        self.queue.note_sent(seq);
        Ok(())
    }

    async fn sent_through(&self) -> Result<u64, QueueError> {
        Ok(self.queue.sent_through())
    }

    async fn renumber_unsent(&self, cursor: u64) -> Result<u64, QueueError> {
        self.commit(self.queue.renumber_unsent(cursor)).await
    }

    async fn dead_letter(&self, msg: &Message, reason: &str) -> Result<(), QueueError> {
        self.queue.dead_letter(msg, reason)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.queue.dead_letters(limit)
    }

    async fn retry_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        self.commit(self.queue.retry_dead_letter(seq)).await
    }

    async fn requeue_dead_letter(&self, seq: u64) -> Result<Option<u64>, QueueError> {
        self.commit(self.queue.requeue_dead_letter(seq)).await
    }

    async fn drop_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        self.commit(self.queue.drop_dead_letter(seq)).await
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        Ok(self.queue.stats())
    }

    async fn prune_idempotency_keys(&self, cutoff_ms: u64) -> Result<usize, QueueError> {
        self.commit(self.queue.prune_idempotency_keys(cutoff_ms)).await
    }
}

/// A table of a sled store, with the store that commits its writes.
#[derive(Clone, Debug)]
pub struct SledTable {
    store: Store,
    table: Table,
}

impl NodeTable for SledTable {
    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self.table.tree.get(key)?.map(|v| v.to_vec()))
    }

    async fn put_raw(&self, key: &str, value: Vec<u8>) -> Result<(), QueueError> {
        self.table.tree.insert(key, value)?;
        self.store.flush().await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, QueueError> {
        let swapped = self.table.tree.compare_and_swap(key, expected, new)?.is_ok();
        if swapped {
            self.store.flush().await?;
        }
        Ok(swapped)
    }

    async fn remove(&self, key: &str) -> Result<(), QueueError> {
        self.table.tree.remove(key)?;
        self.store.flush().await
    }

    async fn list_prefix_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
        let mut out = Vec::new();
        for item in self.table.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }
}

impl NodeStore for Store {
    type Queue = SledQueue;
    type Table = SledTable;

    async fn queue(&self, name: &str, limits: Limits) -> Result<SledQueue, QueueError> {
        Ok(SledQueue {
            store: self.clone(),
            queue: Store::queue(self, name, limits)?,
        })
    }

    async fn table(&self, name: &str) -> Result<SledTable, QueueError> {
        Ok(SledTable {
            store: self.clone(),
            table: Store::table(self, name)?,
        })
    }
}
