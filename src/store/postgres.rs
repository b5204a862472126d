//! The node's store on PostgreSQL, for several node replicas sharing one database: the only
//! module that touches PostgreSQL.
//!
//! A queue is a row of `relay_queues` (its high-water mark, counters and marks) and its
//! messages are rows of `relay_messages`. Every write is one transaction that first locks the
//! queue's row: a sequence number is given out in the transaction that inserts the message
//! (`UPDATE … SET last_seq = last_seq + 1 … RETURNING`), so transactions on one queue commit in
//! sequence order and a reader never skips a number that commits late. A write resolves once
//! its transaction committed, which is what a `202` or a push's answer waits for.
//!
//! Readers wait on [`Notifier`]: a commit on this replica wakes them at once, a commit on
//! another replica through `LISTEN`/`NOTIFY` on one dedicated connection (one notification per
//! transaction, which PostgreSQL folds per channel and payload), and a fallback poll every
//! [`FALLBACK_POLL`] covers a lost notification or a pooler that drops `LISTEN`: that costs
//! latency, never a message.
//!
//! The schema is versioned ([`SCHEMA_VERSION`]); [`PgStore::migrate`] creates or upgrades it
//! under an advisory lock, and [`PgStore::check_schema`] refuses any other version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{
    cut_read, Appended, DeadLetter, Lease, Limits, Message, NewMessage, NodeQueue, NodeStore, NodeTable, QueueError,
    QueueImage, QueueStats, RemoteAppended, SequenceGap, RECENT_IDS,
};

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = 1;

/// How long a parked reader waits before it reads again without a notification.
pub const FALLBACK_POLL: Duration = Duration::from_millis(1500);

/// The channel every queue write notifies, with the queue's name as payload.
const CHANNEL: &str = "relay_queue";

/// The channel a dead letter put back in its place notifies (see [`NodeQueue::kicks`]).
const KICK_CHANNEL: &str = "relay_kick";

/// The channel every record write notifies, with `table/key` as payload.
const RECORD_CHANNEL: &str = "relay_record";

/// The advisory lock key that serialises migrations (any constant; this one spells "relay").
const MIGRATION_LOCK: i64 = 0x72_65_6c_61_79;

/// Each schema version's statements, applied in order from the database's version.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r#"
CREATE TABLE relay_queues (
    name text COLLATE "C" PRIMARY KEY,
    last_seq bigint NOT NULL DEFAULT 0,
    acked bigint NOT NULL DEFAULT 0,
    sent bigint NOT NULL DEFAULT 0,
    depth bigint NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    dead bigint NOT NULL DEFAULT 0,
    dead_bytes bigint NOT NULL DEFAULT 0
);
CREATE TABLE relay_messages (
    queue text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    id text NOT NULL,
    content_type text NOT NULL,
    enqueued_at_ms bigint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (queue, seq)
);
CREATE TABLE relay_dead_letters (
    queue text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    id text NOT NULL,
    content_type text NOT NULL,
    enqueued_at_ms bigint NOT NULL,
    dead_at_ms bigint NOT NULL,
    reason text NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (queue, seq)
);
CREATE TABLE relay_idempotency_keys (
    queue text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    id text NOT NULL,
    accepted_at_ms bigint NOT NULL,
    PRIMARY KEY (queue, key)
);
CREATE INDEX relay_idempotency_keys_expiry ON relay_idempotency_keys (accepted_at_ms);
CREATE TABLE relay_peer_ids (
    queue text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    id text NOT NULL,
    PRIMARY KEY (queue, seq)
);
CREATE TABLE relay_records (
    tbl text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tbl, key)
);
CREATE TABLE relay_leases (
    connection text COLLATE "C" PRIMARY KEY,
    owner text NOT NULL,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE relay_replicas (
    owner text PRIMARY KEY,
    seen_at timestamptz NOT NULL,
    pin text NOT NULL
);
"#,
)];

/// How to reach the database.
#[derive(Clone)]
pub struct Options {
    /// `postgres://user:password@host:port/database?sslmode=…`, password included.
    pub url: String,
    /// Connections in the pool (the listener's comes on top).
    pub pool_size: usize,
    /// How certificates are checked when the URL asks for TLS (`sslmode=require`).
    pub tls: rustls::ClientConfig,
    /// Deadline of connecting and of waiting for a pooled connection.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("url", &redact(&self.url))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// `url` with its password replaced by `***`, for messages and status.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            let hidden = if authority[..authority.len() - host.len() - 1].contains(':') {
                ":***"
            } else {
                ""
            };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// What [`PgStore::migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
    /// The schema was made from nothing, at this version.
    Created(i32),
    /// The schema went from one version to another.
    Upgraded {
        /// The version found.
        from: i32,
        /// The version now.
        to: i32,
    },
    /// The schema was already at this build's version.
    UpToDate(i32),
}

impl std::fmt::Display for Migrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Migrated::Created(v) => write!(f, "created the schema at version {v}"),
            Migrated::Upgraded { from, to } => write!(f, "upgraded the schema from version {from} to {to}"),
            Migrated::UpToDate(v) => write!(f, "the schema is at version {v} already; nothing to do"),
        }
    }
}

/// Maps a PostgreSQL error to the store's: a connection that failed or closed is
/// [`QueueError::Unavailable`] (nothing was acknowledged; retry), the rest names what the
/// server said.
fn db_error(e: tokio_postgres::Error) -> QueueError {
    let unavailable = match e.code() {
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
        }
    };
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => crate::tls::error_chain(&e),
    };
    if unavailable {
        QueueError::Unavailable(text)
    } else {
        QueueError::Storage(text)
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> QueueError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        other => QueueError::Unavailable(crate::tls::error_chain(&other)),
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Wakes readers parked on a queue: by this replica's commits, by other replicas' through
/// `LISTEN`, and by one query every [`FALLBACK_POLL`] for the queues someone waits on, which
/// wakes those whose high-water mark moved unannounced.
struct Notifier {
    queues: Mutex<HashMap<String, watch::Sender<u64>>>,
    kicks: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// The high-water marks the fallback poll saw last, by queue.
    seen: Mutex<HashMap<String, i64>>,
    /// Records written, on any replica: `(table, key)`.
    records: tokio::sync::broadcast::Sender<(String, String)>,
    /// Notifications received on the listener connection (for tests and metrics).
    received: std::sync::atomic::AtomicU64,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            queues: Mutex::default(),
            kicks: Mutex::default(),
            seen: Mutex::default(),
            records: tokio::sync::broadcast::channel(1024).0,
            received: std::sync::atomic::AtomicU64::default(),
        }
    }
}

impl Notifier {
    fn sender(&self, queue: &str) -> watch::Sender<u64> {
        channel_of(&self.queues, queue)
    }

    fn wake(&self, queue: &str) {
        self.sender(queue).send_modify(|n| *n += 1);
    }

    fn kick(&self, queue: &str) {
        channel_of(&self.kicks, queue).send_modify(|n| *n += 1);
    }

    fn wake_all(&self) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for tx in queues.values() {
            tx.send_modify(|n| *n += 1);
        }
    }
}

fn channel_of(map: &Mutex<HashMap<String, watch::Sender<u64>>>, queue: &str) -> watch::Sender<u64> {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(queue.to_owned())
        .or_insert_with(|| watch::channel(0).0)
        .clone()
}

struct Shared {
    pool: Pool,
    notifier: Notifier,
    /// Each queue's group commit of appends.
    groups: Mutex<HashMap<String, Arc<Group>>>,
    shutdown: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The node's store in one PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
    display: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &self.display).finish()
    }
}

impl PgStore {
    /// Connects (one connection, to fail early with the server's reason) and starts the
    /// listener. Does not look at the schema: see [`PgStore::check_schema`].
    pub async fn connect(options: &Options) -> Result<PgStore, QueueError> {
        let config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| QueueError::Unavailable(format!("{}: {e}", redact(&options.url))))?;
        let mut config = config;
        config.connect_timeout(options.connect_timeout);
        config.application_name("relay");
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(options.tls.clone());
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let display = redact(&options.url);
        drop(pool.get().await.map_err(|e| {
            let e = pool_error(e);
            QueueError::Unavailable(format!(
                "{display}: {}",
                e.to_string().trim_start_matches("the database is unavailable: ")
            ))
        })?);
        let shared = Arc::new(Shared {
            pool,
            notifier: Notifier::default(),
            groups: Mutex::default(),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(listen(Arc::downgrade(&shared), config, tls, shared.shutdown.clone()));
        tokio::spawn(fallback_poll(Arc::downgrade(&shared), shared.shutdown.clone()));
        Ok(PgStore { shared, display })
    }

    /// Queue `name`'s group commit.
    fn group(&self, name: &str) -> Arc<Group> {
        self.shared
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// The database's URL without its password.
    pub fn display_url(&self) -> &str {
        &self.display
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        self.shared.pool.get().await.map_err(pool_error)
    }

    /// The schema version the database holds; `None` when relay's schema is not there.
    pub async fn schema_version(&self) -> Result<Option<i32>, QueueError> {
        let client = self.client().await?;
        read_version(&client).await
    }

    /// Refuses a database whose schema is not [`SCHEMA_VERSION`], naming both versions.
    pub async fn check_schema(&self) -> Result<(), QueueError> {
        match self.schema_version().await? {
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            Some(v) if v > SCHEMA_VERSION => Err(QueueError::Schema(format!(
                "the database {} holds relay's schema version {v}, newer than version {SCHEMA_VERSION} that this \
                 build speaks: run the relay that migrated it, or a later one",
                self.display
            ))),
            Some(v) => Err(QueueError::Schema(format!(
                "the database {} holds relay's schema version {v}, older than version {SCHEMA_VERSION} that this \
                 build speaks: run `relay node migrate` first",
                self.display
            ))),
            None => Err(QueueError::Schema(format!(
                "the database {} has no relay schema (this build speaks version {SCHEMA_VERSION}): run `relay node \
                 migrate` first",
                self.display
            ))),
        }
    }

    /// Creates or upgrades the schema to [`SCHEMA_VERSION`], in one transaction under an
    /// advisory lock (replicas migrating at once take turns); refuses a newer schema.
    pub async fn migrate(&self) -> Result<Migrated, QueueError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db_error)?;
        let found = read_version(&tx).await?;
        if let Some(v) = found {
            if v > SCHEMA_VERSION {
                return Err(QueueError::Schema(format!(
                    "the database {} holds relay's schema version {v}, newer than version {SCHEMA_VERSION} that \
                     this build speaks: nothing was changed",
                    self.display
                )));
            }
            if v == SCHEMA_VERSION {
                return Ok(Migrated::UpToDate(v));
            }
        } else {
            tx.batch_execute(
                "CREATE TABLE relay_schema (
                     one boolean PRIMARY KEY DEFAULT true CHECK (one),
                     version integer NOT NULL,
                     relay text NOT NULL,
                     migrated_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await
            .map_err(db_error)?;
        }
        let from = found.unwrap_or(0);
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| QueueError::Storage(format!("migrating to schema version {version}: {}", db_error(e))))?;
        }
        tx.execute(
            "INSERT INTO relay_schema (version, relay) VALUES ($1, $2)
             ON CONFLICT (one) DO UPDATE SET version = $1, relay = $2, migrated_at = now()",
            &[&SCHEMA_VERSION, &env!("CARGO_PKG_VERSION")],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(match found {
            None => Migrated::Created(SCHEMA_VERSION),
            Some(from) => Migrated::Upgraded {
                from,
                to: SCHEMA_VERSION,
            },
        })
    }

    /// Forgets idempotency keys of every queue accepted before `cutoff_ms`, in bounded
    /// steps. Every replica may run it: the steps commute.
    pub async fn prune_idempotency_keys(&self, cutoff_ms: u64) -> Result<(), QueueError> {
        const STEP: u64 = 10_000;
        loop {
            let client = self.client().await?;
            let n = client
                .execute(
                    "DELETE FROM relay_idempotency_keys WHERE ctid IN
                     (SELECT ctid FROM relay_idempotency_keys WHERE accepted_at_ms < $1 LIMIT $2)",
                    &[&to_i64(cutoff_ms), &to_i64(STEP)],
                )
                .await
                .map_err(db_error)?;
            if n < STEP {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
    }

    /// Records written on any replica, as `(table, key)`, from now on (a lagging receiver
    /// misses some: it reads everything again then).
    pub fn record_changes(&self) -> tokio::sync::broadcast::Receiver<(String, String)> {
        self.shared.notifier.records.subscribe()
    }

    /// Says that replica `owner`, serving the key with SPKI pin `pin`, is alive, and returns
    /// the replicas seen within `ttl` (itself included) with their pins.
    pub async fn heartbeat(&self, owner: &str, pin: &str, ttl: Duration) -> Result<Vec<(String, String)>, QueueError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO relay_replicas (owner, seen_at, pin) VALUES ($1, now(), $2)
                 ON CONFLICT (owner) DO UPDATE SET seen_at = now(), pin = excluded.pin",
                &[&owner, &pin],
            )
            .await
            .map_err(db_error)?;
        client
            .execute(
                "DELETE FROM relay_replicas WHERE seen_at < now() - make_interval(secs => $1::float8 * 10)",
                &[&ttl.as_secs_f64()],
            )
            .await
            .map_err(db_error)?;
        let rows = client
            .query(
                "SELECT owner, pin FROM relay_replicas WHERE seen_at >= now() - make_interval(secs => $1::float8)
                 ORDER BY owner",
                &[&ttl.as_secs_f64()],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Extends every lease `owner` holds by `ttl` and returns them: a lease missing here was
    /// taken over (it had expired), and its side effects must stop.
    pub async fn renew_leases(&self, owner: &str, ttl: Duration) -> Result<Vec<Lease>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE relay_leases SET expires_at = now() + make_interval(secs => $2::float8)
                 WHERE owner = $1 AND expires_at > now() RETURNING connection, epoch",
                &[&owner, &ttl.as_secs_f64()],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| Lease {
                connection: r.get(0),
                owner: owner.to_owned(),
                epoch: r.get(1),
            })
            .collect())
    }

    /// Takes the lease of `connection` for `owner` when nobody holds it or its holder let it
    /// expire (a new epoch), or renews it when `owner` holds it already; `None` when another
    /// replica holds it.
    pub async fn take_lease(&self, connection: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "INSERT INTO relay_leases AS l (connection, owner, epoch, expires_at)
                 VALUES ($1, $2, 1, now() + make_interval(secs => $3::float8))
                 ON CONFLICT (connection) DO UPDATE SET
                     owner = excluded.owner,
                     epoch = CASE WHEN l.owner = excluded.owner AND l.expires_at > now() THEN l.epoch ELSE l.epoch + 1 END,
                     expires_at = excluded.expires_at
                 WHERE l.owner = excluded.owner OR l.expires_at <= now()
                 RETURNING epoch",
                &[&connection, &owner, &ttl.as_secs_f64()],
            )
            .await
            .map_err(db_error)?;
        Ok(row.map(|r| Lease {
            connection: connection.to_owned(),
            owner: owner.to_owned(),
            epoch: r.get(0),
        }))
    }

    /// Takes over, under new epochs, the leases that an earlier process of the same replica
    /// held (owners `{replica}/…`): a replica restarted after a crash delivers again at once
    /// instead of waiting for its own leases to expire, and the old process, were it alive,
    /// is fenced. Returns how many.
    pub async fn adopt_leases(&self, replica: &str, owner: &str, ttl: Duration) -> Result<u64, QueueError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE relay_leases SET owner = $2, epoch = epoch + 1, expires_at = now() + make_interval(secs => $3::float8)
                 WHERE split_part(owner, '/', 1) = $1 AND owner <> $2 AND expires_at > now()",
                &[&replica, &owner, &ttl.as_secs_f64()],
            )
            .await
            .map_err(db_error)
    }

    /// Gives `lease` up at once (another replica may take it at its next round).
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), QueueError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE relay_leases SET expires_at = now() WHERE connection = $1 AND owner = $2 AND epoch = $3",
                &[&lease.connection, &lease.owner, &lease.epoch],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Every lease: connection, owner, epoch, and whether it is in force.
    pub async fn leases(&self) -> Result<Vec<(Lease, bool)>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT connection, owner, epoch, expires_at > now() FROM relay_leases ORDER BY connection",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    Lease {
                        connection: r.get(0),
                        owner: r.get(1),
                        epoch: r.get(2),
                    },
                    r.get(3),
                )
            })
            .collect())
    }

    /// How many connection records the database holds (`relay node migrate --from-sled`
    /// moves a node into a database that holds none).
    pub async fn connection_count(&self) -> Result<u64, QueueError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM relay_records WHERE tbl = 'node-connections'", &[])
            .await
            .map_err(db_error)?
            .get(0);
        Ok(to_u64(n))
    }

    /// Stores `image` as queue `name`, replacing whatever it held, in one transaction.
    pub async fn import_queue(&self, name: &str, image: &QueueImage) -> Result<(), QueueError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        for table in [
            "relay_messages",
            "relay_dead_letters",
            "relay_idempotency_keys",
            "relay_peer_ids",
        ] {
            tx.execute(&format!("DELETE FROM {table} WHERE queue = $1"), &[&name])
                .await
                .map_err(db_error)?;
        }
        let bytes: u64 = image.messages.iter().map(|m| m.body.len() as u64).sum();
        let dead_bytes: u64 = image.dead_letters.iter().map(|(_, b)| b.len() as u64).sum();
        tx.execute(
            "INSERT INTO relay_queues (name, last_seq, acked, sent, depth, bytes, dead, dead_bytes)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (name) DO UPDATE SET last_seq = $2, acked = $3, sent = $4, depth = $5, bytes = $6,
                 dead = $7, dead_bytes = $8",
            &[
                &name,
                &to_i64(image.last_seq),
                &to_i64(image.acked),
                &to_i64(image.sent),
                &to_i64(image.messages.len() as u64),
                &to_i64(bytes),
                &to_i64(image.dead_letters.len() as u64),
                &to_i64(dead_bytes),
            ],
        )
        .await
        .map_err(db_error)?;
        for chunk in image.messages.chunks(1000) {
            let rows: Vec<_> = chunk.iter().map(message_row).collect();
            insert_messages(&tx, name, &rows).await?;
        }
        for (d, body) in &image.dead_letters {
            tx.execute(
                "INSERT INTO relay_dead_letters (queue, seq, id, content_type, enqueued_at_ms, dead_at_ms, reason, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &name,
                    &to_i64(d.seq),
                    &d.id,
                    &d.content_type,
                    &to_i64(d.enqueued_at_ms),
                    &to_i64(d.dead_at_ms),
                    &d.reason,
                    &&body[..],
                ],
            )
            .await
            .map_err(db_error)?;
        }
        for (key, seq, id, at) in &image.idempotency_keys {
            tx.execute(
                "INSERT INTO relay_idempotency_keys (queue, key, seq, id, accepted_at_ms) VALUES ($1, $2, $3, $4, $5)",
                &[&name, key, &to_i64(*seq), id, &to_i64(*at)],
            )
            .await
            .map_err(db_error)?;
        }
        for (seq, id) in &image.peer_ids {
            tx.execute(
                "INSERT INTO relay_peer_ids (queue, seq, id) VALUES ($1, $2, $3)",
                &[&name, &to_i64(*seq), id],
            )
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)
    }

    /// Notifications this replica's listener received so far.
    pub fn notifications_received(&self) -> u64 {
        self.shared.notifier.received.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn read_version(client: &impl deadpool_postgres::GenericClient) -> Result<Option<i32>, QueueError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('relay_schema') IS NOT NULL", &[])
        .await
        .map_err(db_error)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT version FROM relay_schema", &[])
        .await
        .map_err(db_error)?
        .map(|row| row.get(0)))
}

/// The listener: one dedicated connection that `LISTEN`s on [`CHANNEL`] and wakes the
/// queues named in notifications. Reconnects with backoff when the connection goes; every
/// reconnect wakes every reader, since notifications sent meanwhile are lost.
async fn listen(
    shared: std::sync::Weak<Shared>,
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = config.connect(tls.clone()) => c,
        };
        if let Ok((client, mut connection)) = connected {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
            let listen = async move {
                let r = client
                    .batch_execute(&format!(
                        "LISTEN {CHANNEL}; LISTEN {KICK_CHANNEL}; LISTEN {RECORD_CHANNEL}"
                    ))
                    .await;
                if r.is_ok() {
                    let _ = ready_tx.send(());
                }
                // Keeps the client alive while the connection runs.
                std::future::pending::<()>().await;
                drop(client);
            };
            let drive = async {
                let mut ready_rx = ready_rx;
                let mut announced = false;
                loop {
                    tokio::select! {
                        r = &mut ready_rx, if !announced => {
                            announced = true;
                            if r.is_ok() {
                                delay = Duration::from_millis(200);
                                match shared.upgrade() {
                                    Some(s) => s.notifier.wake_all(),
                                    None => return,
                                }
                            }
                        }
                        m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                            Some(Ok(AsyncMessage::Notification(n))) => match shared.upgrade() {
                                Some(s) => {
                                    s.notifier.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    match n.channel() {
                                        KICK_CHANNEL => {
                                            s.notifier.kick(n.payload());
                                            s.notifier.wake(n.payload());
                                        }
                                        RECORD_CHANNEL => {
                                            if let Some((table, key)) = n.payload().split_once('/') {
                                                let _ = s.notifier.records.send((table.to_owned(), key.to_owned()));
                                            }
                                        }
                                        _ => s.notifier.wake(n.payload()),
                                    }
                                }
                                None => return,
                            },
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        },
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = listen => {}
                _ = drive => {}
            }
        }
        if shared.upgrade().is_none() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Every [`FALLBACK_POLL`], reads the high-water marks of the queues that readers wait on and
/// wakes those that moved: what a lost notification, or a pooler that drops `LISTEN`, costs
/// is this delay, never a message. One query per replica, whatever the number of readers.
async fn fallback_poll(shared: std::sync::Weak<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(FALLBACK_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(shared) = shared.upgrade() else { return };
        let watched: Vec<String> = {
            let queues = shared.notifier.queues.lock().unwrap_or_else(|p| p.into_inner());
            queues
                .iter()
                .filter(|(_, tx)| tx.receiver_count() > 0)
                .map(|(name, _)| name.clone())
                .collect()
        };
        if watched.is_empty() {
            continue;
        }
        let Ok(client) = shared.pool.get().await else { continue };
        let Ok(rows) = client
            .query(
                "SELECT name, last_seq FROM relay_queues WHERE name = ANY($1)",
                &[&watched],
            )
            .await
        else {
            continue;
        };
        let moved: Vec<String> = {
            let mut seen = shared.notifier.seen.lock().unwrap_or_else(|p| p.into_inner());
            rows.iter()
                .filter_map(|r| {
                    let (name, last): (String, i64) = (r.get(0), r.get(1));
                    (seen.insert(name.clone(), last) != Some(last)).then_some(name)
                })
                .collect()
        };
        for name in moved {
            shared.notifier.wake(&name);
        }
    }
}

/// One queue in the database, bound by this replica's limits.
#[derive(Clone)]
pub struct PgQueue {
    store: PgStore,
    name: Arc<str>,
    limits: Limits,
    /// The lease its writes are made under, when they are a leased side effect.
    fence: Option<Arc<Lease>>,
}

impl PgQueue {
    /// This queue, its writes refused once `lease` is no longer in force.
    pub fn fenced(&self, lease: &Lease) -> PgQueue {
        PgQueue {
            fence: Some(Arc::new(lease.clone())),
            ..self.clone()
        }
    }
}

impl std::fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgQueue").field("name", &self.name).finish()
    }
}

/// A queue's row, read under its lock.
#[derive(Debug, Clone, Copy)]
struct Row {
    last_seq: u64,
    acked: u64,
    sent: u64,
    depth: u64,
    bytes: u64,
    dead: u64,
    dead_bytes: u64,
}

const ROW_COLUMNS: &str = "last_seq, acked, sent, depth, bytes, dead, dead_bytes";

fn row_of(row: &tokio_postgres::Row) -> Row {
    Row {
        last_seq: to_u64(row.get(0)),
        acked: to_u64(row.get(1)),
        sent: to_u64(row.get(2)),
        depth: to_u64(row.get(3)),
        bytes: to_u64(row.get(4)),
        dead: to_u64(row.get(5)),
        dead_bytes: to_u64(row.get(6)),
    }
}

fn message_of(row: &tokio_postgres::Row) -> Message {
    Message {
        seq: to_u64(row.get(0)),
        id: row.get(1),
        content_type: row.get(2),
        enqueued_at_ms: to_u64(row.get(3)),
        body: Bytes::from(row.get::<_, Vec<u8>>(4)),
    }
}

const MESSAGE_COLUMNS: &str = "seq, id, content_type, enqueued_at_ms, body";

/// Inserts `msgs` (number, id, content type, accept time, payload) into queue `queue`, in
/// one statement.
async fn insert_messages(
    client: &impl deadpool_postgres::GenericClient,
    queue: &str,
    msgs: &[(u64, &str, &str, u64, &[u8])],
) -> Result<(), QueueError> {
    let seqs: Vec<i64> = msgs.iter().map(|m| to_i64(m.0)).collect();
    let ids: Vec<&str> = msgs.iter().map(|m| m.1).collect();
    let types: Vec<&str> = msgs.iter().map(|m| m.2).collect();
    let times: Vec<i64> = msgs.iter().map(|m| to_i64(m.3)).collect();
    let bodies: Vec<&[u8]> = msgs.iter().map(|m| m.4).collect();
    client
        .execute(
            &format!(
                "INSERT INTO relay_messages (queue, {MESSAGE_COLUMNS})
                 SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::bytea[])"
            ),
            &[&queue, &seqs, &ids, &types, &times, &bodies],
        )
        .await
        .map_err(db_error)?;
    Ok(())
}

fn message_row(m: &Message) -> (u64, &str, &str, u64, &[u8]) {
    (
        m.seq,
        m.id.as_str(),
        m.content_type.as_str(),
        m.enqueued_at_ms,
        &m.body[..],
    )
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

impl PgQueue {
    /// Runs `work` in one transaction holding the queue's row lock, commits, and wakes this
    /// replica's readers (other replicas learn of it through the notification sent with the
    /// commit).
    async fn write<T, F>(&self, work: F) -> Result<T, QueueError>
    where
        F: for<'t> FnOnce(
            &'t Tx<'t>,
            Row,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, QueueError>> + Send + 't>>,
        T: Send,
    {
        let mut client = self.store.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // The row lock, the notification (sent only if the transaction commits) and the
        // lease check in one round trip: the statements go out together.
        let lock = async {
            tx.query_one(
                &format!("SELECT {ROW_COLUMNS}, pg_notify($2, $1) FROM relay_queues WHERE name = $1 FOR UPDATE"),
                &[&&*self.name, &CHANNEL],
            )
            .await
        };
        let fence = async {
            match &self.fence {
                Some(lease) => self.lease_in_force(&tx, lease).await,
                None => Ok(()),
            }
        };
        let (row, fence) = tokio::join!(lock, fence);
        let row = row.map_err(db_error)?;
        fence?;
        let out = work(&tx, row_of(&row)).await?;
        tx.commit().await.map_err(db_error)?;
        self.store.shared.notifier.wake(&self.name);
        Ok(out)
    }

    /// `Err(Fenced)` unless `lease` is in force (held against a takeover until the end of
    /// the transaction).
    async fn lease_in_force(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        lease: &Lease,
    ) -> Result<(), QueueError> {
        let held = client
            .query_opt(
                "SELECT 1 FROM relay_leases WHERE connection = $1 AND owner = $2 AND epoch = $3
                 AND expires_at > now() FOR SHARE",
                &[&lease.connection, &lease.owner, &lease.epoch],
            )
            .await
            .map_err(db_error)?;
        match held {
            Some(_) => Ok(()),
            None => Err(QueueError::Fenced {
                connection: lease.connection.clone(),
                epoch: lease.epoch,
            }),
        }
    }

    async fn row(&self) -> Result<Row, QueueError> {
        let client = self.store.client().await?;
        let row = client
            .query_one(
                &format!("SELECT {ROW_COLUMNS} FROM relay_queues WHERE name = $1"),
                &[&&*self.name],
            )
            .await
            .map_err(db_error)?;
        Ok(row_of(&row))
    }

    fn check_room(&self, row: &Row, n: u64, bytes: u64) -> Result<(), QueueError> {
        if row.depth + row.dead + n > self.limits.max_messages {
            return Err(QueueError::FullCount {
                queue: self.name.to_string(),
                count: row.depth + row.dead,
                dead_letters: row.dead,
                limit: self.limits.max_messages,
            });
        }
        if row.bytes + row.dead_bytes + bytes > self.limits.max_bytes {
            return Err(QueueError::FullBytes {
                queue: self.name.to_string(),
                bytes: row.bytes + row.dead_bytes,
                dead_letter_bytes: row.dead_bytes,
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }
}

impl NodeQueue for PgQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn append(&self, msg: NewMessage, idempotency_key: Option<&str>) -> Result<Appended, QueueError> {
        // Group commit: appends waiting at the same moment share one transaction. Each waiter
        // puts its message in the queue's list; whoever gets the commit lock takes the whole
        // list (its own message, or a later leader did already and answered it).
        let group = self.store.group(&self.name);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        lock_list(&group.pending).push(Pending {
            msg,
            key: idempotency_key.map(str::to_owned),
            answer: tx,
        });
        let leader = group.commit.clone().lock_owned().await;
        if let Ok(answer) = rx.try_recv() {
            return answer;
        }
        let batch = std::mem::take(&mut *lock_list(&group.pending));
        // The commit runs on a task of its own: a caller that goes away (a client that hung
        // up) does not cut short the commit of the others' messages.
        let this = self.clone();
        let commit = tokio::spawn(async move {
            let _leader = leader;
            let outcome = this.append_group(&batch).await;
            // Our own entry is among them: it went in before we took the lock.
            for (i, p) in batch.into_iter().enumerate() {
                let answer = match &outcome {
                    Ok(answers) => answers[i].clone(),
                    Err(e) => Err(e.clone()),
                };
                let _ = p.answer.send(answer);
            }
        });
        let _ = commit.await;
        rx.try_recv()
            .unwrap_or_else(|_| Err(QueueError::Storage("the append was lost from its group".into())))
    }

    async fn append_remote(&self, msgs: Vec<Message>) -> Result<RemoteAppended, QueueError> {
        let name = self.name.clone();
        let this = self.clone();
        self.write(move |tx, row| {
            Box::pin(async move {
                let high_water = row.last_seq;
                let retried: Vec<&Message> = msgs.iter().take_while(|m| m.seq <= high_water).collect();
                if !retried.is_empty() {
                    let seqs: Vec<i64> = retried.iter().map(|m| to_i64(m.seq)).collect();
                    let held: HashMap<u64, String> = tx
                        .query(
                            "SELECT seq, id FROM relay_peer_ids WHERE queue = $1 AND seq = ANY($2)
                             UNION ALL
                             SELECT seq, id FROM relay_messages WHERE queue = $1 AND seq = ANY($2)",
                            &[&&*name, &seqs],
                        )
                        .await
                        .map_err(db_error)?
                        .iter()
                        .map(|r| (to_u64(r.get(0)), r.get(1)))
                        .collect();
                    for m in retried {
                        let held_id = held.get(&m.seq).cloned();
                        if held_id.as_deref() != Some(m.id.as_str()) {
                            return Err(QueueError::SequenceConflict {
                                queue: name.to_string(),
                                seq: m.seq,
                                sent_id: m.id.clone(),
                                held_id,
                                high_water,
                            });
                        }
                    }
                }
                let fresh = &msgs[msgs.partition_point(|m| m.seq <= high_water)..];
                let mut sums = row;
                let mut fits = 0;
                for m in fresh {
                    let size = m.body.len() as u64;
                    if let Err(full) = this.check_room(&sums, 1, size) {
                        if fits == 0 {
                            return Err(full);
                        }
                        break;
                    }
                    sums.depth += 1;
                    sums.bytes += size;
                    fits += 1;
                }
                let new = &fresh[..fits];
                let mut out = RemoteAppended {
                    high_water,
                    stored: new.len() as u64,
                    gap: None,
                };
                let mut expected = high_water + 1;
                for m in new {
                    if m.seq != expected && out.gap.is_none() {
                        out.gap = Some(SequenceGap { expected, got: m.seq });
                    }
                    expected = m.seq + 1;
                }
                let Some(last) = new.last() else {
                    return Ok(out);
                };
                let rows: Vec<_> = new.iter().map(message_row).collect();
                insert_messages(tx, &name, &rows).await?;
                let seqs: Vec<i64> = new.iter().map(|m| to_i64(m.seq)).collect();
                let ids: Vec<&str> = new.iter().map(|m| m.id.as_str()).collect();
                tx.execute(
                    "INSERT INTO relay_peer_ids (queue, seq, id) SELECT $1, * FROM unnest($2::bigint[], $3::text[])",
                    &[&&*name, &seqs, &ids],
                )
                .await
                .map_err(db_error)?;
                tx.execute(
                    "DELETE FROM relay_peer_ids WHERE queue = $1 AND seq <= $2",
                    &[&&*name, &to_i64(last.seq.saturating_sub(RECENT_IDS))],
                )
                .await
                .map_err(db_error)?;
                tx.execute(
                    "UPDATE relay_queues SET last_seq = $2, depth = $3, bytes = $4 WHERE name = $1",
                    &[&&*name, &to_i64(last.seq), &to_i64(sums.depth), &to_i64(sums.bytes)],
                )
                .await
                .map_err(db_error)?;
                out.high_water = last.seq;
                Ok(out)
            })
        })
        .await
    }

    async fn read_after(&self, after: u64, max_count: usize, max_bytes: usize) -> Result<Vec<Message>, QueueError> {
        let client = self.store.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {MESSAGE_COLUMNS} FROM relay_messages WHERE queue = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ),
                &[&&*self.name, &to_i64(after), &to_i64(max_count as u64)],
            )
            .await
            .map_err(db_error)?;
        let mut msgs: Vec<Message> = rows.iter().map(message_of).collect();
        cut_read(&mut msgs, max_count, max_bytes);
        Ok(msgs)
    }

    async fn wait_after(&self, after: u64) {
        let mut rx = self.store.shared.notifier.sender(&self.name).subscribe();
        rx.mark_unchanged();
        // A commit between the caller's read and this subscription would be missed: look once.
        // A failed look returns too (the caller reads, and meets the error there).
        if self.row().await.is_ok_and(|r| r.last_seq <= after) {
            let _ = rx.changed().await;
        }
    }

    fn kicks(&self) -> watch::Receiver<u64> {
        channel_of(&self.store.shared.notifier.kicks, &self.name).subscribe()
    }

    async fn first(&self) -> Result<Option<Message>, QueueError> {
        Ok(self.read_after(0, 1, usize::MAX).await?.pop())
    }

    async fn remove(&self, seq: u64) -> Result<bool, QueueError> {
        // One statement, no row lock held across round trips: the counters move by what was
        // deleted, whatever an append in flight sets after it. Under a lease, the delete
        // happens only while the lease is in force.
        let client = self.store.client().await?;
        let (connection, owner, epoch) = match &self.fence {
            Some(l) => (Some(l.connection.as_str()), Some(l.owner.as_str()), l.epoch),
            None => (None, None, 0),
        };
        let row = client
            .query_one(
                "WITH gone AS (
                     DELETE FROM relay_messages WHERE queue = $1 AND seq = $2
                     AND ($3::text IS NULL OR EXISTS (
                         SELECT 1 FROM relay_leases WHERE connection = $3 AND owner = $4 AND epoch = $5
                         AND expires_at > now()))
                     RETURNING octet_length(body) AS n
                 ), counted AS (
                     UPDATE relay_queues SET depth = depth - (SELECT count(*) FROM gone),
                         bytes = bytes - (SELECT coalesce(sum(n), 0) FROM gone)
                     WHERE name = $1 AND EXISTS (SELECT 1 FROM gone)
                 )
                 SELECT count(*) FROM gone",
                &[&&*self.name, &to_i64(seq), &connection, &owner, &epoch],
            )
            .await
            .map_err(db_error)?;
        let removed = row.get::<_, i64>(0) > 0;
        if !removed {
            if let Some(lease) = &self.fence {
                self.lease_in_force(&client, lease).await?;
            }
        }
        Ok(removed)
    }

    async fn remove_through(&self, seq: u64) -> Result<u64, QueueError> {
        let client = self.store.client().await?;
        let row = client
            .query_one(
                "WITH gone AS (
                     DELETE FROM relay_messages WHERE queue = $1 AND seq <= $2 RETURNING octet_length(body) AS n
                 ), counted AS (
                     UPDATE relay_queues SET depth = depth - (SELECT count(*) FROM gone),
                         bytes = bytes - (SELECT coalesce(sum(n), 0) FROM gone), acked = greatest(acked, $2)
                     WHERE name = $1 AND (acked < $2 OR EXISTS (SELECT 1 FROM gone))
                 )
                 SELECT count(*) FROM gone",
                &[&&*self.name, &to_i64(seq)],
            )
            .await
            .map_err(db_error)?;
        Ok(to_u64(row.get(0)))
    }

    async fn acked_through(&self) -> Result<u64, QueueError> {
        Ok(self.row().await?.acked)
    }

    async fn note_sent(&self, seq: u64) -> Result<(), QueueError> {
        let client = self.store.client().await?;
        client
            .execute(
                "UPDATE relay_queues SET sent = greatest(sent, $2) WHERE name = $1",
                &[&&*self.name, &to_i64(seq)],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn sent_through(&self) -> Result<u64, QueueError> {
        Ok(self.row().await?.sent)
    }

    async fn renumber_unsent(&self, cursor: u64) -> Result<u64, QueueError> {
        let name = self.name.clone();
        self.write(move |tx, row| {
            Box::pin(async move {
                if cursor <= row.sent {
                    return Ok(0);
                }
                let floor = cursor.max(row.last_seq);
                // New numbers are all above every old one, so no row collides on the way.
                let moved = tx
                    .query(
                        "WITH numbered AS (
                             SELECT seq, $3 + row_number() OVER (ORDER BY seq) AS fresh
                             FROM relay_messages WHERE queue = $1 AND seq > $2
                         ), keys AS (
                             UPDATE relay_idempotency_keys k SET seq = n.fresh FROM numbered n
                             WHERE k.queue = $1 AND k.seq = n.seq
                         )
                         UPDATE relay_messages m SET seq = n.fresh FROM numbered n
                         WHERE m.queue = $1 AND m.seq = n.seq RETURNING m.seq",
                        &[&&*name, &to_i64(row.sent), &to_i64(floor)],
                    )
                    .await
                    .map_err(db_error)?
                    .len() as u64;
                tx.execute(
                    "UPDATE relay_queues SET last_seq = $2, acked = greatest(acked, $3), sent = $4 WHERE name = $1",
                    &[&&*name, &to_i64(floor + moved), &to_i64(cursor), &to_i64(floor)],
                )
                .await
                .map_err(db_error)?;
                Ok(moved)
            })
        })
        .await
    }

    async fn dead_letter(&self, msg: &Message, reason: &str) -> Result<(), QueueError> {
        let name = self.name.clone();
        let (seq, reason) = (msg.seq, reason.to_owned());
        self.write(move |tx, _| {
            Box::pin(async move {
                let moved = tx
                    .query_opt(
                        "WITH gone AS (DELETE FROM relay_messages WHERE queue = $1 AND seq = $2 RETURNING *)
                         INSERT INTO relay_dead_letters (queue, seq, id, content_type, enqueued_at_ms, dead_at_ms, reason, body)
                         SELECT queue, seq, id, content_type, enqueued_at_ms, $3, $4, body FROM gone
                         RETURNING octet_length(body)",
                        &[&&*name, &to_i64(seq), &to_i64(crate::clock::now_ms()), &reason],
                    )
                    .await
                    .map_err(db_error)?;
                if let Some(moved) = moved {
                    let bytes = i64::from(moved.get::<_, i32>(0));
                    tx.execute(
                        "UPDATE relay_queues SET depth = depth - 1, bytes = bytes - $2, dead = dead + 1,
                         dead_bytes = dead_bytes + $2 WHERE name = $1",
                        &[&&*name, &bytes],
                    )
                    .await
                    .map_err(db_error)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let client = self.store.client().await?;
        let rows = client
            .query(
                "SELECT seq, id, content_type, octet_length(body), enqueued_at_ms, dead_at_ms, reason
                 FROM relay_dead_letters WHERE queue = $1 ORDER BY seq DESC LIMIT $2",
                &[&&*self.name, &to_i64(limit as u64)],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .rev()
            .map(|r| DeadLetter {
                seq: to_u64(r.get(0)),
                id: r.get(1),
                content_type: r.get(2),
                bytes: u64::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                enqueued_at_ms: to_u64(r.get(4)),
                dead_at_ms: to_u64(r.get(5)),
                reason: r.get(6),
            })
            .collect())
    }

    async fn retry_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        let revived = self.revive(seq, false).await?.is_some();
        if revived {
            self.store.shared.notifier.kick(&self.name);
        }
        Ok(revived)
    }

    async fn requeue_dead_letter(&self, seq: u64) -> Result<Option<u64>, QueueError> {
        self.revive(seq, true).await
    }

    async fn drop_dead_letter(&self, seq: u64) -> Result<bool, QueueError> {
        let name = self.name.clone();
        self.write(move |tx, _| {
            Box::pin(async move {
                let gone = tx
                    .query_opt(
                        "DELETE FROM relay_dead_letters WHERE queue = $1 AND seq = $2 RETURNING octet_length(body)",
                        &[&&*name, &to_i64(seq)],
                    )
                    .await
                    .map_err(db_error)?;
                let Some(gone) = gone else { return Ok(false) };
                tx.execute(
                    "UPDATE relay_queues SET dead = dead - 1, dead_bytes = dead_bytes - $2 WHERE name = $1",
                    &[&&*name, &i64::from(gone.get::<_, i32>(0))],
                )
                .await
                .map_err(db_error)?;
                Ok(true)
            })
        })
        .await
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let row = self.row().await?;
        let client = self.store.client().await?;
        let oldest = client
            .query_opt(
                "SELECT enqueued_at_ms FROM relay_messages WHERE queue = $1 ORDER BY seq LIMIT 1",
                &[&&*self.name],
            )
            .await
            .map_err(db_error)?
            .map(|r| to_u64(r.get(0)));
        Ok(QueueStats {
            depth: row.depth,
            bytes: row.bytes,
            last_seq: row.last_seq,
            oldest_enqueued_ms: oldest,
            dead_letters: row.dead,
            dead_letter_bytes: row.dead_bytes,
        })
    }

    async fn prune_idempotency_keys(&self, cutoff_ms: u64) -> Result<usize, QueueError> {
        let client = self.store.client().await?;
        let n = client
            .execute(
                "DELETE FROM relay_idempotency_keys WHERE queue = $1 AND accepted_at_ms < $2",
                &[&&*self.name, &to_i64(cutoff_ms)],
            )
            .await
            .map_err(db_error)?;
        Ok(n as usize)
    }
}

/// An append waiting for its group's commit.
struct Pending {
    msg: NewMessage,
    key: Option<String>,
    answer: tokio::sync::oneshot::Sender<Result<Appended, QueueError>>,
}

/// One queue's group commit: the appends waiting, and the lock its leader holds.
#[derive(Default)]
struct Group {
    pending: Mutex<Vec<Pending>>,
    commit: Arc<tokio::sync::Mutex<()>>,
}

fn lock_list(list: &Mutex<Vec<Pending>>) -> std::sync::MutexGuard<'_, Vec<Pending>> {
    list.lock().unwrap_or_else(|p| p.into_inner())
}

impl PgQueue {
    /// Appends `batch` in one transaction: numbers in order, a key seen before (in the
    /// database or earlier in the batch) answered with its first result, a message that does
    /// not fit refused alone. The outer `Err` fails the whole batch (nothing committed).
    async fn append_group(&self, batch: &[Pending]) -> Result<Vec<Result<Appended, QueueError>>, QueueError> {
        let name = self.name.clone();
        let this = self.clone();
        let keys: Vec<String> = batch.iter().filter_map(|p| p.key.clone()).collect();
        let work: Vec<(NewMessage, Option<String>)> = batch.iter().map(|p| (p.msg.clone(), p.key.clone())).collect();
        self.write(move |tx, row| {
            Box::pin(async move {
                let mut held: HashMap<String, (u64, String)> = HashMap::new();
                if !keys.is_empty() {
                    for r in tx
                        .query(
                            "SELECT key, seq, id FROM relay_idempotency_keys WHERE queue = $1 AND key = ANY($2)",
                            &[&&*name, &keys],
                        )
                        .await
                        .map_err(db_error)?
                    {
                        held.insert(r.get(0), (to_u64(r.get(1)), r.get(2)));
                    }
                }
                let mut sums = row;
                let mut answers = Vec::with_capacity(work.len());
                let mut fresh: Vec<(u64, &NewMessage, Option<&String>)> = Vec::new();
                for (msg, key) in &work {
                    if let Some((seq, id)) = key.as_ref().and_then(|k| held.get(k)) {
                        answers.push(Ok(Appended {
                            seq: *seq,
                            id: id.clone(),
                            duplicate: true,
                        }));
                        continue;
                    }
                    let size = msg.body.len() as u64;
                    if let Err(full) = this.check_room(&sums, 1, size) {
                        answers.push(Err(full));
                        continue;
                    }
                    sums.last_seq += 1;
                    sums.depth += 1;
                    sums.bytes += size;
                    if let Some(k) = key {
                        held.insert(k.clone(), (sums.last_seq, msg.id.clone()));
                    }
                    fresh.push((sums.last_seq, msg, key.as_ref()));
                    answers.push(Ok(Appended {
                        seq: sums.last_seq,
                        id: msg.id.clone(),
                        duplicate: false,
                    }));
                }
                if fresh.is_empty() {
                    return Ok(answers);
                }
                let rows: Vec<_> = fresh
                    .iter()
                    .map(|(seq, m, _)| {
                        (
                            *seq,
                            m.id.as_str(),
                            m.content_type.as_str(),
                            m.enqueued_at_ms,
                            &m.body[..],
                        )
                    })
                    .collect();
                let keyed: Vec<&(u64, &NewMessage, Option<&String>)> = fresh.iter().filter(|f| f.2.is_some()).collect();
                let k: Vec<&str> = keyed.iter().filter_map(|f| f.2.map(String::as_str)).collect();
                let s: Vec<i64> = keyed.iter().map(|f| to_i64(f.0)).collect();
                let i: Vec<&str> = keyed.iter().map(|f| f.1.id.as_str()).collect();
                let now = to_i64(crate::clock::now_ms());
                let keys = async {
                    if k.is_empty() {
                        return Ok(0);
                    }
                    tx.execute(
                        "INSERT INTO relay_idempotency_keys (queue, key, seq, id, accepted_at_ms)
                         SELECT $1, k, s, i, $5 FROM unnest($2::text[], $3::bigint[], $4::text[]) AS u(k, s, i)",
                        &[&&*name, &k, &s, &i, &now],
                    )
                    .await
                };
                let counters = async {
                    tx.execute(
                        "UPDATE relay_queues SET last_seq = $2, depth = $3, bytes = $4 WHERE name = $1",
                        &[
                            &&*name,
                            &to_i64(sums.last_seq),
                            &to_i64(sums.depth),
                            &to_i64(sums.bytes),
                        ],
                    )
                    .await
                };
                // Independent statements, sent together.
                let (inserted, keys, counters) = tokio::join!(insert_messages(tx, &name, &rows), keys, counters);
                inserted?;
                keys.map_err(db_error)?;
                counters.map_err(db_error)?;
                Ok(answers)
            })
        })
        .await
    }

    /// Moves dead letter `seq` back among the messages: at its own number, or under a new one
    /// (`renumber`). `None` when there is no such dead letter.
    async fn revive(&self, seq: u64, renumber: bool) -> Result<Option<u64>, QueueError> {
        let name = self.name.clone();
        self.write(move |tx, row| {
            Box::pin(async move {
                let at = if renumber { row.last_seq + 1 } else { seq };
                let moved = tx
                    .query_opt(
                        "WITH gone AS (DELETE FROM relay_dead_letters WHERE queue = $1 AND seq = $2 RETURNING *)
                         INSERT INTO relay_messages (queue, seq, id, content_type, enqueued_at_ms, body)
                         SELECT queue, $3, id, content_type, enqueued_at_ms, body FROM gone
                         RETURNING octet_length(body)",
                        &[&&*name, &to_i64(seq), &to_i64(at)],
                    )
                    .await
                    .map_err(db_error)?;
                let Some(moved) = moved else { return Ok(None) };
                if !renumber {
                    tx.execute("SELECT pg_notify($1, $2)", &[&KICK_CHANNEL, &&*name])
                        .await
                        .map_err(db_error)?;
                }
                let bytes = i64::from(moved.get::<_, i32>(0));
                tx.execute(
                    "UPDATE relay_queues SET depth = depth + 1, bytes = bytes + $2, dead = dead - 1,
                     dead_bytes = dead_bytes - $2, last_seq = greatest(last_seq, $3) WHERE name = $1",
                    &[&&*name, &bytes, &to_i64(at)],
                )
                .await
                .map_err(db_error)?;
                Ok(Some(at))
            })
        })
        .await
    }
}

/// One table of records in the database.
#[derive(Clone)]
pub struct PgTable {
    store: PgStore,
    name: Arc<str>,
}

impl std::fmt::Debug for PgTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTable").field("name", &self.name).finish()
    }
}

impl NodeTable for PgTable {
    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, QueueError> {
        let client = self.store.client().await?;
        Ok(client
            .query_opt(
                "SELECT value FROM relay_records WHERE tbl = $1 AND key = $2",
                &[&&*self.name, &key],
            )
            .await
            .map_err(db_error)?
            .map(|r| r.get(0)))
    }

    async fn put_raw(&self, key: &str, value: Vec<u8>) -> Result<(), QueueError> {
        let client = self.store.client().await?;
        client
            .execute(
                "WITH put AS (
                     INSERT INTO relay_records (tbl, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (tbl, key) DO UPDATE SET value = excluded.value
                 )
                 SELECT pg_notify($4, $1 || '/' || $2)",
                &[&&*self.name, &key, &value, &RECORD_CHANNEL],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, QueueError> {
        let client = self.store.client().await?;
        // Each statement notifies only when it changed the record.
        let changed = match (expected, new) {
            (None, Some(new)) => client
                .execute(
                    "WITH put AS (
                         INSERT INTO relay_records (tbl, key, value) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING RETURNING 1
                     )
                     SELECT pg_notify($4, $1 || '/' || $2) FROM put",
                    &[&&*self.name, &key, &new, &RECORD_CHANNEL],
                )
                .await
                .map_err(db_error)?,
            (Some(old), Some(new)) => client
                .execute(
                    "WITH put AS (
                         UPDATE relay_records SET value = $4 WHERE tbl = $1 AND key = $2 AND value = $3 RETURNING 1
                     )
                     SELECT pg_notify($5, $1 || '/' || $2) FROM put",
                    &[&&*self.name, &key, &old, &new, &RECORD_CHANNEL],
                )
                .await
                .map_err(db_error)?,
            (Some(old), None) => client
                .execute(
                    "WITH gone AS (
                         DELETE FROM relay_records WHERE tbl = $1 AND key = $2 AND value = $3 RETURNING 1
                     )
                     SELECT pg_notify($4, $1 || '/' || $2) FROM gone",
                    &[&&*self.name, &key, &old, &RECORD_CHANNEL],
                )
                .await
                .map_err(db_error)?,
            (None, None) => {
                return Ok(client
                    .query_opt(
                        "SELECT 1 FROM relay_records WHERE tbl = $1 AND key = $2",
                        &[&&*self.name, &key],
                    )
                    .await
                    .map_err(db_error)?
                    .is_none())
            }
        };
        Ok(changed == 1)
    }

    async fn remove(&self, key: &str) -> Result<(), QueueError> {
        let client = self.store.client().await?;
        client
            .execute(
                "DELETE FROM relay_records WHERE tbl = $1 AND key = $2",
                &[&&*self.name, &key],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn list_prefix_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
        let client = self.store.client().await?;
        let rows = client
            .query(
                "SELECT key, value FROM relay_records WHERE tbl = $1 AND starts_with(key, $2) ORDER BY key",
                &[&&*self.name, &prefix],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

impl NodeStore for PgStore {
    type Queue = PgQueue;
    type Table = PgTable;

    async fn queue(&self, name: &str, limits: Limits) -> Result<PgQueue, QueueError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO relay_queues (name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&name],
            )
            .await
            .map_err(db_error)?;
        Ok(PgQueue {
            store: self.clone(),
            name: name.into(),
            limits,
            fence: None,
        })
    }

    async fn table(&self, name: &str) -> Result<PgTable, QueueError> {
        Ok(PgTable {
            store: self.clone(),
            name: name.into(),
        })
    }
}
