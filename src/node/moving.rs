//! Moving a node's state from its sled data directory into PostgreSQL (`relay node migrate
//! --from-sled DIR`): connections, invitations, credentials, every queue with its marks,
//! messages, dead letters and idempotency keys, and the sync state's records. Agents carry
//! on without a new invitation, since their credentials and the node's key stay the same.

use std::path::Path;

use crate::error::{Kind, OpError, OpResult};
use crate::store::postgres::PgStore;
use crate::store::{NodeStore, NodeTable, QueueError, Store};

/// What was moved.
#[derive(Debug, Default)]
pub struct Moved {
    /// Connections.
    pub connections: usize,
    /// Queued messages, both directions.
    pub messages: usize,
    /// Dead letters.
    pub dead_letters: usize,
    /// Records of every table.
    pub records: usize,
}

impl std::fmt::Display for Moved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "moved {} connection(s), {} queued message(s), {} dead letter(s) and {} record(s)",
            self.connections, self.messages, self.dead_letters, self.records
        )
    }
}

/// Moves the node in data directory `dir` (stopped) into `pg`, which must hold no connection
/// yet (a failed move may be run again). `pin` is the key the node served, which every
/// replica must serve from now on.
pub async fn from_sled(dir: &Path, cache_bytes: u64, pg: &PgStore, pin: &[u8; 32]) -> OpResult<Moved> {
    match std::fs::read_to_string(dir.join("role")) {
        Ok(role) if role.trim() == "node" => {}
        _ => {
            return Err(OpError::new(
                Kind::Config,
                format!(
                    "{} is not a node's data directory (its file `role` does not say node)",
                    dir.display()
                ),
            ))
        }
    }
    let held = pg.connection_count().await?;
    if held > 0 {
        return Err(OpError::new(
            Kind::Conflict,
            format!(
                "{} already holds {held} connection(s): --from-sled moves a node into a database that holds none",
                pg.display_url()
            ),
        ));
    }
    let sled = Store::open(&dir.join("db"), cache_bytes).map_err(|e| match e {
        QueueError::Locked(_) => OpError::new(
            Kind::Failed,
            format!("{} is in use: stop the node first", dir.display()),
        ),
        other => OpError::new(Kind::Failed, other.to_string()),
    })?;
    super::leases::check_identity(pg, pin).await?;
    let mut moved = Moved::default();
    let mut tables = sled.table_names();
    // The connections last: until they are there, a failed move may simply run again.
    tables.sort_by_key(|t| t == "node-connections");
    let limits = crate::store::Limits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
    };
    for table in tables {
        let from = NodeStore::table(&sled, &table).await?;
        let to = NodeStore::table(pg, &table).await?;
        let records = from.list_prefix_raw("").await?;
        if table == "node-connections" {
            // Each connection's queues first.
            for (name, _) in &records {
                let (out, inb) = super::queue_names(name);
                for queue in [out, inb] {
                    let image = Store::queue(&sled, &queue, limits)?.image()?;
                    moved.messages += image.messages.len();
                    moved.dead_letters += image.dead_letters.len();
                    pg.import_queue(&queue, &image).await?;
                }
            }
            moved.connections = records.len();
        }
        moved.records += records.len();
        for (key, value) in records {
            to.put_raw(&key, value).await?;
        }
    }
    Ok(moved)
}
