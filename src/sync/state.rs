//! Sync state beside the queues, in the same store: each connection's rules, twins (local id
//! ↔ remote key, last replica sent and received, comment and attachment links, relay's own
//! revisions), tracker watermarks, attachment chunks in transit, and per-item sync errors.
//!
//! Records are JSON in [`store::Table`]s; writes are durable after the next store flush, and
//! sled keeps them in order, so a crash leaves a prefix of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::store::{QueueError, Store, Table};
use crate::sync::replica::{Entity, Replica};

/// Separates the parts of a key (a connection name never contains it).
const SEP: char = '\u{1f}';
/// Event ids remembered per twin (a receiver applies each once).
const APPLIED_KEPT: usize = 64;
/// Own revisions remembered per twin (echo suppression).
const OWN_REVS_KEPT: usize = 256;
/// Sends remembered until the other side shows it applied them.
const UNACKED_KEPT: usize = 64;
/// In [`Twin::unacked`], a replica that changed every field (it had no agreed state to
/// compare with).
pub const ALL_FIELDS: &str = "*";
/// Replicas parked behind one item's error; a replica carries the whole state, so the newest
/// ones are all that matter once the error is retried.
const PARKED_KEPT: usize = 32;

/// A connection's rules, as the operator stored them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulesRecord {
    /// Both scripts in one text.
    pub source: String,
    /// WIQL condition selecting the items to send (`None`: every item of the project).
    #[serde(default)]
    pub trigger: Option<String>,
    /// When stored (unix ms).
    pub updated_ms: u64,
}

/// A create in progress: stored before the create is sent, so a crash before its answer is
/// reconciled by finding the item by its marker, never created twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingCreate {
    /// The hyperlink the created item carries.
    pub marker: String,
    /// When the create was started (unix ms).
    pub since_ms: u64,
}

/// A comment add in progress: stored and flushed before the add is sent, so an add whose
/// answer was lost (a timeout, a reset, a crash) is found on the item rather than made again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingComment {
    /// The other side's comment id it copies.
    pub remote: String,
    /// The text sent.
    pub body: String,
}

/// One item and its twin on the other side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    /// The local work item id, once it exists.
    pub local: Option<u64>,
    /// The other side's key, once known.
    pub remote: Option<String>,
    /// Hash of the last replica sent.
    pub last_sent_hash: Option<String>,
    /// What both sides last agreed on, as this side's outgoing script makes it: the entity
    /// last sent, or the one the item made once the other side's last replica was applied,
    /// whichever came later. An export equal to it sends nothing; an export sends the names
    /// of the fields that differ from it (`event.changed`).
    #[serde(default)]
    pub agreed: Option<Entity>,
    /// Hash of `agreed`.
    #[serde(default)]
    pub agreed_hash: Option<String>,
    /// The last replica sent (the outgoing script's `previous`).
    pub last_sent: Option<Replica>,
    /// The last replica applied (the incoming script's `previous`).
    pub last_received: Option<Replica>,
    /// Event ids applied, newest last.
    pub applied: Vec<String>,
    /// Revisions relay wrote itself, newest last: never exported.
    pub own_revs: Vec<u64>,
    /// Local comment id → the other side's comment id, for comments relay copied here.
    pub comments: BTreeMap<String, String>,
    /// Local attachment id → the other side's attachment id, for attachments copied here.
    pub attachments: BTreeMap<String, String>,
    /// A create started and not yet answered.
    pub pending_create: Option<PendingCreate>,
    /// Comment adds started and not yet answered.
    #[serde(default)]
    pub pending_comments: Vec<PendingComment>,
    /// Replicas sent that the other side had not applied when it last sent one: event id and
    /// the fields each changed (`*`: all), oldest first.
    #[serde(default)]
    pub unacked: Vec<(String, Vec<String>)>,
    /// Last replica sent (unix ms).
    pub last_out_ms: Option<u64>,
    /// Last replica applied (unix ms).
    pub last_in_ms: Option<u64>,
}

impl Twin {
    /// Records an event as applied.
    pub fn applied(&mut self, event: &str) {
        self.applied.push(event.to_owned());
        trim(&mut self.applied, APPLIED_KEPT);
    }

    /// Records a revision relay wrote.
    pub fn own(&mut self, rev: u64) {
        if !self.own_revs.contains(&rev) {
            self.own_revs.push(rev);
            trim(&mut self.own_revs, OWN_REVS_KEPT);
        }
    }

    /// Whether relay wrote `rev` itself.
    pub fn is_own(&self, rev: u64) -> bool {
        self.own_revs.contains(&rev)
    }

    /// The hash an export is compared with: the agreed state's, or, in a record written
    /// before it was kept, the last one sent.
    pub fn base_hash(&self) -> Option<&str> {
        self.agreed_hash.as_deref().or(self.last_sent_hash.as_deref())
    }

    /// The state an export's changed fields are named against (see [`Twin::agreed`]).
    pub fn base(&self) -> Option<&Entity> {
        self.agreed.as_ref().or(self.last_sent.as_ref().map(|r| &r.entity))
    }

    /// Records a replica sent with the fields it changed (`None`: all of them).
    pub fn sent(&mut self, event: &str, changed: Option<&[String]>) {
        let fields = changed
            .map(<[String]>::to_vec)
            .unwrap_or_else(|| vec![ALL_FIELDS.to_owned()]);
        self.unacked.push((event.to_owned(), fields));
        trim(&mut self.unacked, UNACKED_KEPT);
    }

    /// Takes note that the other side had applied this side's events through `acked` when it
    /// made its replica; answers the fields this side changed in replicas it had not applied
    /// (`*` for all): those changed on both sides at once.
    pub fn crossed(&mut self, acked: Option<&str>) -> std::collections::BTreeSet<String> {
        if let Some(at) = acked.and_then(|a| self.unacked.iter().position(|(id, _)| id == a)) {
            self.unacked.drain(..=at);
        }
        self.unacked.iter().flat_map(|(_, f)| f.iter().cloned()).collect()
    }

    /// Records `entity` as what both sides now agree on.
    pub fn agree(&mut self, entity: Entity) {
        self.agreed_hash = Some(entity.hash());
        self.agreed = Some(entity);
    }
}

fn trim<T>(v: &mut Vec<T>, keep: usize) {
    if v.len() > keep {
        v.drain(..v.len() - keep);
    }
}

/// Where the change feed was read up to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watermark {
    /// The feed's continuation token.
    pub continuation: String,
    /// When the feed was last read to its end (unix ms).
    pub read_ms: u64,
}

/// Which way an item failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Making or sending a replica of a local item.
    Outgoing,
    /// Applying a replica from the other side.
    Incoming,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Outgoing => "outgoing",
            Side::Incoming => "incoming",
        })
    }
}

/// An item that could not be synced; its later replicas wait behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncError {
    /// The connection.
    pub connection: String,
    /// Which way.
    pub side: Side,
    /// The item: the local id (outgoing) or the other side's key (incoming).
    pub item: String,
    /// What went wrong, for the operator.
    pub message: String,
    /// When it first failed (unix ms).
    pub at_ms: u64,
    /// How many attempts failed.
    pub attempts: u32,
    /// Replicas that arrived for the item since (JSON), oldest first.
    #[serde(default)]
    pub parked: Vec<String>,
    /// The operator asked for a retry.
    #[serde(default)]
    pub retry: bool,
}

/// A field of an item that synced without it, once per item and field: the item is not held
/// back, but the operator should know (a person unknown here, say).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncWarning {
    /// The connection.
    pub connection: String,
    /// The item, as the other side keys it (the replica's origin id).
    pub item: String,
    /// This side's twin, once there is one.
    pub local: Option<u64>,
    /// The field left as it was (`assignee`).
    pub field: String,
    /// What happened, for the operator.
    pub message: String,
    /// When it was first seen (unix ms).
    pub at_ms: u64,
}

/// An attachment uploaded to this side's tracker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadedFile {
    /// Attachment id.
    pub id: String,
    /// Its URL.
    pub url: String,
}

/// What relay knows of a local attachment's bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileFacts {
    /// SHA-256, hex.
    pub sha256: String,
    /// Size.
    pub size: u64,
}

/// A connection's sync at a glance, for `relay status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSummary {
    /// Items linked with a twin.
    pub twins: u64,
    /// Last replica sent (unix ms).
    pub last_out_ms: Option<u64>,
    /// Last replica applied (unix ms).
    pub last_in_ms: Option<u64>,
    /// When the change feed was last read to its end (unix ms).
    pub watermark_ms: Option<u64>,
    /// Items with a sync error.
    pub errors: u64,
    /// Fields items synced without (see [`SyncWarning`]).
    #[serde(default)]
    pub warnings: u64,
}

/// Last activity each way.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Activity {
    last_out_ms: Option<u64>,
    last_in_ms: Option<u64>,
}

/// The sync tables of one store: a cheap-`Clone` handle.
#[derive(Clone)]
pub struct SyncState {
    store: Store,
    rules: Table,
    twins: Table,
    aliases: Table,
    watermarks: Table,
    errors: Table,
    warnings: Table,
    chunks: Table,
    uploaded: Table,
    sent_files: Table,
    files: Table,
    refused: Table,
    deferred: Table,
    activity: Table,
}

/// A twin and the key it is stored under.
pub type Keyed = (String, Twin);

fn key(parts: &[&str]) -> String {
    parts.join(&SEP.to_string())
}

impl SyncState {
    /// Opens (creating) the sync tables of `store`.
    pub fn open(store: &Store) -> Result<SyncState, QueueError> {
        Ok(SyncState {
            store: store.clone(),
            rules: store.table("sync-rules")?,
            twins: store.table("sync-twins")?,
            aliases: store.table("sync-aliases")?,
            watermarks: store.table("sync-watermarks")?,
            errors: store.table("sync-errors")?,
            warnings: store.table("sync-warnings")?,
            chunks: store.table("sync-chunks")?,
            uploaded: store.table("sync-uploaded")?,
            sent_files: store.table("sync-sent-files")?,
            files: store.table("sync-files")?,
            refused: store.table("sync-refused-files")?,
            deferred: store.table("sync-deferred-exports")?,
            activity: store.table("sync-activity")?,
        })
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.store.flush().await
    }

    /// The connection's rules.
    pub fn rules(&self, conn: &str) -> Result<Option<RulesRecord>, QueueError> {
        self.rules.get(conn)
    }

    /// Stores the connection's rules.
    pub fn set_rules(&self, conn: &str, source: &str, trigger: Option<String>) -> Result<(), QueueError> {
        self.rules.put(
            conn,
            &RulesRecord {
                source: source.to_owned(),
                trigger,
                updated_ms: now_ms(),
            },
        )
    }

    /// The twin of local item `id`.
    pub fn twin_by_local(&self, conn: &str, id: u64) -> Result<Option<Keyed>, QueueError> {
        self.find(conn, &format!("l:{id}"))
    }

    /// The twin of the other side's item `remote`.
    pub fn twin_by_remote(&self, conn: &str, remote: &str) -> Result<Option<Keyed>, QueueError> {
        self.find(conn, &format!("r:{remote}"))
    }

    fn find(&self, conn: &str, alias: &str) -> Result<Option<Keyed>, QueueError> {
        let Some(primary) = self.aliases.get::<String>(&key(&[conn, alias]))? else {
            return Ok(None);
        };
        Ok(self.twins.get::<Twin>(&key(&[conn, &primary]))?.map(|t| (primary, t)))
    }

    /// A key for a new twin: by the side that knew it first.
    pub fn new_key(twin: &Twin) -> String {
        match (&twin.local, &twin.remote) {
            (Some(id), _) => format!("l:{id}"),
            (None, Some(r)) => format!("r:{r}"),
            (None, None) => "l:0".into(),
        }
    }

    /// Stores a twin under `primary`, with the aliases that find it by either id.
    pub fn put_twin(&self, conn: &str, primary: &str, twin: &Twin) -> Result<(), QueueError> {
        self.twins.put(&key(&[conn, primary]), twin)?;
        let primary = primary.to_owned();
        if let Some(id) = twin.local {
            self.aliases.put(&key(&[conn, &format!("l:{id}")]), &primary)?;
        }
        if let Some(r) = &twin.remote {
            self.aliases.put(&key(&[conn, &format!("r:{r}")]), &primary)?;
        }
        Ok(())
    }

    /// How many twins the connection has.
    pub fn twin_count(&self, conn: &str) -> Result<u64, QueueError> {
        self.twins.count_prefix(&format!("{conn}{SEP}"))
    }

    /// Every twin of the connection.
    pub fn twins(&self, conn: &str) -> Result<Vec<Twin>, QueueError> {
        Ok(self
            .twins
            .list_prefix::<Twin>(&format!("{conn}{SEP}"))?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// Notes that a replica went out (`side` outgoing) or was applied (incoming) now.
    pub fn touch(&self, conn: &str, side: Side) -> Result<(), QueueError> {
        let mut a: Activity = self.activity.get(conn)?.unwrap_or_default();
        match side {
            Side::Outgoing => a.last_out_ms = Some(now_ms()),
            Side::Incoming => a.last_in_ms = Some(now_ms()),
        }
        self.activity.put(conn, &a)
    }

    /// The connection's sync at a glance.
    pub fn summary(&self, conn: &str) -> Result<SyncSummary, QueueError> {
        let a: Activity = self.activity.get(conn)?.unwrap_or_default();
        Ok(SyncSummary {
            twins: self.twin_count(conn)?,
            last_out_ms: a.last_out_ms,
            last_in_ms: a.last_in_ms,
            watermark_ms: self.watermark(conn)?.map(|w| w.read_ms),
            errors: self.errors.count_prefix(&format!("{conn}{SEP}"))?,
            warnings: self.warnings.count_prefix(&format!("{conn}{SEP}"))?,
        })
    }

    /// The change feed's watermark of the connection.
    pub fn watermark(&self, conn: &str) -> Result<Option<Watermark>, QueueError> {
        self.watermarks.get(conn)
    }

    /// Stores the watermark.
    pub fn set_watermark(&self, conn: &str, w: &Watermark) -> Result<(), QueueError> {
        self.watermarks.put(conn, w)
    }

    fn error_key(conn: &str, side: Side, item: &str) -> String {
        key(&[conn, &side.to_string(), item])
    }

    /// The error of one item, if it has one.
    pub fn error(&self, conn: &str, side: Side, item: &str) -> Result<Option<SyncError>, QueueError> {
        self.errors.get(&Self::error_key(conn, side, item))
    }

    /// Records (or updates) an item's error.
    pub fn put_error(&self, e: &SyncError) -> Result<(), QueueError> {
        let mut e = e.clone();
        trim(&mut e.parked, PARKED_KEPT);
        self.errors.put(&Self::error_key(&e.connection, e.side, &e.item), &e)
    }

    /// Forgets an item's error.
    pub fn clear_error(&self, conn: &str, side: Side, item: &str) -> Result<(), QueueError> {
        self.errors.remove(&Self::error_key(conn, side, item))
    }

    /// The errors of one connection, or of all.
    pub fn errors(&self, conn: Option<&str>) -> Result<Vec<SyncError>, QueueError> {
        let prefix = conn.map(|c| format!("{c}{SEP}")).unwrap_or_default();
        Ok(self
            .errors
            .list_prefix::<SyncError>(&prefix)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// Records a warning; answers false when the same item already had one for the field
    /// (kept as first recorded: once per item and field).
    pub fn put_warning(&self, w: &SyncWarning) -> Result<bool, QueueError> {
        let k = key(&[&w.connection, &w.item, &w.field]);
        if self.warnings.get::<SyncWarning>(&k)?.is_some() {
            return Ok(false);
        }
        self.warnings.put(&k, w)?;
        Ok(true)
    }

    /// Forgets the warning of an item's field (it synced in full since).
    pub fn clear_warning(&self, conn: &str, item: &str, field: &str) -> Result<(), QueueError> {
        let k = key(&[conn, item, field]);
        if self.warnings.get::<SyncWarning>(&k)?.is_some() {
            self.warnings.remove(&k)?;
        }
        Ok(())
    }

    /// The warnings of one connection, or of all.
    pub fn warnings(&self, conn: Option<&str>) -> Result<Vec<SyncWarning>, QueueError> {
        let prefix = conn.map(|c| format!("{c}{SEP}")).unwrap_or_default();
        Ok(self
            .warnings
            .list_prefix::<SyncWarning>(&prefix)?
            .into_iter()
            .map(|(_, w)| w)
            .collect())
    }

    /// Stores one chunk of a file in transit; answers how many of its chunks are here.
    pub fn put_chunk(&self, conn: &str, sha256: &str, index: u32, bytes: &[u8]) -> Result<u32, QueueError> {
        let encoded = data_encoding::BASE64.encode(bytes);
        self.chunks
            .put(&key(&[conn, sha256, &format!("{index:08}")]), &encoded)?;
        Ok(self.chunks.count_prefix(&format!("{}{SEP}", key(&[conn, sha256])))? as u32)
    }

    /// The chunks of a file, in order.
    pub fn chunks(&self, conn: &str, sha256: &str) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::new();
        for (k, v) in self
            .chunks
            .list_prefix::<String>(&format!("{}{SEP}", key(&[conn, sha256])))?
        {
            let part = data_encoding::BASE64
                .decode(v.as_bytes())
                .map_err(|e| QueueError::Corrupt(format!("sync-chunks/{k}: {e}")))?;
            out.extend_from_slice(&part);
        }
        Ok(out)
    }

    /// Forgets the chunks of a file.
    pub fn drop_chunks(&self, conn: &str, sha256: &str) -> Result<(), QueueError> {
        for (k, _) in self
            .chunks
            .list_prefix::<String>(&format!("{}{SEP}", key(&[conn, sha256])))?
        {
            self.chunks.remove(&k)?;
        }
        Ok(())
    }

    /// The upload of the file with this hash, once done.
    pub fn uploaded(&self, sha256: &str) -> Result<Option<UploadedFile>, QueueError> {
        self.uploaded.get(sha256)
    }

    /// Records an upload.
    pub fn set_uploaded(&self, sha256: &str, f: &UploadedFile) -> Result<(), QueueError> {
        self.uploaded.put(sha256, f)
    }

    /// Whether the file's chunks were queued for the other side already.
    pub fn file_sent(&self, conn: &str, sha256: &str) -> Result<bool, QueueError> {
        Ok(self.sent_files.get::<u64>(&key(&[conn, sha256]))?.is_some())
    }

    /// Records that the file's chunks are queued.
    pub fn set_file_sent(&self, conn: &str, sha256: &str) -> Result<(), QueueError> {
        self.sent_files.put(&key(&[conn, sha256]), &now_ms())
    }

    /// Why this side's tracker refused the file with this hash, if it did.
    pub fn refused(&self, conn: &str, sha256: &str) -> Result<Option<String>, QueueError> {
        self.refused.get(&key(&[conn, sha256]))
    }

    /// Records that the tracker refused the file (its chunks stay for a retry).
    pub fn set_refused(&self, conn: &str, sha256: &str, why: &str) -> Result<(), QueueError> {
        self.refused.put(&key(&[conn, sha256]), &why.to_owned())
    }

    /// Forgets a refusal (the file was uploaded after all).
    pub fn clear_refused(&self, conn: &str, sha256: &str) -> Result<(), QueueError> {
        self.refused.remove(&key(&[conn, sha256]))
    }

    /// Notes that local item `id` changed while it was relay's own create not linked to its
    /// twin yet: it is exported once the link exists.
    pub fn defer_export(&self, conn: &str, id: u64) -> Result<(), QueueError> {
        self.deferred.put(&key(&[conn, &format!("{id:020}")]), &now_ms())
    }

    /// The local items whose export waits for their link, oldest id first.
    pub fn deferred_exports(&self, conn: &str) -> Result<Vec<u64>, QueueError> {
        Ok(self
            .deferred
            .list_prefix::<u64>(&format!("{conn}{SEP}"))?
            .into_iter()
            .filter_map(|(k, _)| k.rsplit(SEP).next().and_then(|id| id.parse().ok()))
            .collect())
    }

    /// Forgets a deferred export (done).
    pub fn clear_deferred(&self, conn: &str, id: u64) -> Result<(), QueueError> {
        self.deferred.remove(&key(&[conn, &format!("{id:020}")]))
    }

    /// What is known of a local attachment's bytes.
    pub fn file_facts(&self, attachment_id: &str) -> Result<Option<FileFacts>, QueueError> {
        self.files.get(attachment_id)
    }

    /// Records a local attachment's hash and size.
    pub fn set_file_facts(&self, attachment_id: &str, f: &FileFacts) -> Result<(), QueueError> {
        self.files.put(attachment_id, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn twins_are_found_by_either_id_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let s = SyncState::open(&store).unwrap();
            let mut t = Twin {
                remote: Some("41".into()),
                ..Twin::default()
            };
            let primary = SyncState::new_key(&t);
            s.put_twin("c", &primary, &t).unwrap();
            t.local = Some(7);
            for rev in 1..=300 {
                t.own(rev);
            }
            s.put_twin("c", &primary, &t).unwrap();
            assert_eq!(s.twin_by_local("c", 7).unwrap().unwrap().0, "r:41");
            assert!(s.twin_by_local("other", 7).unwrap().is_none());
            assert_eq!(s.twin_count("c").unwrap(), 1);
            s.flush().await.unwrap();
        }
        let store = crate::store::sled::reopen_when_released(dir.path(), 1 << 20);
        let s = SyncState::open(&store).unwrap();
        let (_, t) = s.twin_by_remote("c", "41").unwrap().unwrap();
        assert_eq!(t.local, Some(7));
        assert_eq!(t.own_revs.len(), OWN_REVS_KEPT);
        assert!(t.is_own(300) && !t.is_own(1));
    }

    #[tokio::test]
    async fn chunks_come_back_in_order_and_errors_by_connection() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let s = SyncState::open(&store).unwrap();
        assert_eq!(s.put_chunk("c", "ab", 1, b"world").unwrap(), 1);
        assert_eq!(s.put_chunk("c", "ab", 0, b"hello ").unwrap(), 2);
        assert_eq!(
            s.put_chunk("c", "ab", 0, b"hello ").unwrap(),
            2,
            "a chunk again is no new chunk"
        );
        assert_eq!(s.chunks("c", "ab").unwrap(), b"hello world");
        s.drop_chunks("c", "ab").unwrap();
        assert!(s.chunks("c", "ab").unwrap().is_empty());
        let e = SyncError {
            connection: "c".into(),
            side: Side::Incoming,
            item: "41".into(),
            message: "boom".into(),
            at_ms: 1,
            attempts: 1,
            parked: (0..40).map(|i| i.to_string()).collect(),
            retry: false,
        };
        s.put_error(&e).unwrap();
        s.put_error(&SyncError {
            connection: "d".into(),
            ..e.clone()
        })
        .unwrap();
        let listed = s.errors(Some("c")).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].parked.len(), PARKED_KEPT);
        assert_eq!(listed[0].parked.last().map(String::as_str), Some("39"));
        assert_eq!(s.errors(None).unwrap().len(), 2);
        s.clear_error("c", Side::Incoming, "41").unwrap();
        assert!(s.error("c", Side::Incoming, "41").unwrap().is_none());
    }
}
