//! The sync engine of one side: for each connection, a poller that turns changed local work
//! items into replicas on the outbound queue ([`outgoing`]), and a worker that applies the
//! replicas and attachment chunks of the inbound queue to the local tracker ([`incoming`]).
//!
//! Everything it learns is in [`SyncState`], in the same store as the queues; a message is
//! removed from the inbound queue only once what it caused is stored, and the feed's watermark
//! moves only once the replicas it caused are durable, so a crash repeats work (with the same
//! idempotency keys) and never loses it.

pub mod incoming;
pub mod outgoing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, OnceCell};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::config::TrackerSettings;
use crate::error::{Kind, OpError, OpResult};
use crate::retry::Backoff;
use crate::status::{now_ms, Health};
use crate::store::{Queue, QueueError};
use crate::sync::script::{self, Rules};
use crate::sync::state::{Side, SyncError, SyncState};
use crate::sync::states::LocalTypes;
use crate::tracker::{Tracker, TrackerError};

/// The key of the tracker's hold in [`Health`].
const HOLD: &str = "tracker";
/// Room left in a message for a chunk's header and the wire's framing.
const CHUNK_MARGIN: usize = 8 * 1024;
/// Largest attachment relay reads (a tracker's own limits are lower: Server 4 MB by default,
/// Services 130 MB).
pub const MAX_ATTACHMENT_BYTES: usize = 256 * 1024 * 1024;

/// One connection as the engine drives it.
#[derive(Clone)]
pub struct SyncLink {
    /// Connection name.
    pub name: String,
    /// This side's project: the scope of what is sent and where created items go.
    pub project: String,
    /// Messages to the other side.
    pub outbox: Queue,
    /// Messages from the other side.
    pub inbox: Queue,
    /// The connection's health (errors, holds).
    pub health: Arc<Health>,
}

/// A side's sync engine: a cheap-`Clone` handle.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    settings: TrackerSettings,
    state: SyncState,
    tracker: OnceCell<Tracker>,
    links: Mutex<HashMap<String, (SyncLink, watch::Sender<u64>)>>,
    compiled: Mutex<HashMap<String, (String, Arc<Rules>)>>,
    types: Mutex<HashMap<String, LocalTypes>>,
    /// Per connection: held for the whole of each apply, so a reader of the change feed can
    /// wait until the revisions an apply wrote are recorded as relay's own.
    applying: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    chunk_bytes: usize,
    /// The public side (the node's): its value wins a field both sides changed at once.
    public: bool,
}

/// Why one item could not be synced now.
#[derive(Debug)]
pub enum ItemFailure {
    /// The tracker or the store may do it later: retry the same work.
    Transient {
        /// Why.
        reason: String,
        /// How long the tracker asked to wait.
        after: Option<Duration>,
    },
    /// This item cannot be synced as things stand: a sync error the operator sees.
    Item(String),
}

impl From<TrackerError> for ItemFailure {
    fn from(e: TrackerError) -> ItemFailure {
        match e {
            TrackerError::Busy { after, .. } => ItemFailure::Transient {
                reason: e.to_string(),
                after: Some(after),
            },
            TrackerError::Unreachable { .. } | TrackerError::Auth { .. } | TrackerError::Protocol(_) => {
                ItemFailure::Transient {
                    reason: e.to_string(),
                    after: None,
                }
            }
            other => ItemFailure::Item(other.to_string()),
        }
    }
}

impl From<QueueError> for ItemFailure {
    fn from(e: QueueError) -> ItemFailure {
        ItemFailure::Transient {
            reason: format!("storage: {e}"),
            after: None,
        }
    }
}

impl Engine {
    /// An engine for the tracker in `settings`, keeping its state in `state`. `max_payload`
    /// bounds attachment chunks (the smaller of both sides' limits); `public` is true on the
    /// node's side, whose value wins a field both sides changed at once.
    pub fn new(settings: TrackerSettings, state: SyncState, max_payload: usize, public: bool) -> Engine {
        Engine {
            inner: Arc::new(Inner {
                settings,
                state,
                tracker: OnceCell::new(),
                links: Mutex::default(),
                compiled: Mutex::default(),
                types: Mutex::default(),
                applying: Mutex::default(),
                chunk_bytes: max_payload.saturating_sub(CHUNK_MARGIN).clamp(1024, 4 * 1024 * 1024),
                public,
            }),
        }
    }

    /// The sync state.
    pub fn state(&self) -> &SyncState {
        &self.inner.state
    }

    /// Whether this side's value wins a field both sides changed at once.
    pub fn wins_crossed_edits(&self) -> bool {
        self.inner.public
    }

    /// The tracker settings.
    pub fn settings(&self) -> &TrackerSettings {
        &self.inner.settings
    }

    /// The tracker, connecting once (probing its version); `Err` when it cannot be reached now.
    pub async fn tracker(&self) -> Result<Tracker, TrackerError> {
        self.inner
            .tracker
            .get_or_try_init(|| Tracker::connect(&self.inner.settings))
            .await
            .cloned()
    }

    /// The tracker, retrying with backoff until it answers; `None` once `token` is cancelled.
    async fn tracker_patiently(&self, health: &Health, token: &CancellationToken) -> Option<Tracker> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            match self.tracker().await {
                Ok(t) => {
                    if health.release(HOLD) {
                        info!(url = %self.inner.settings.url, "the tracker answers again; sync resumes");
                    }
                    return Some(t);
                }
                Err(e) => {
                    let delay = backoff.next_delay(None);
                    if health.hold(HOLD, e.to_string()) {
                        tracing::error!(error = %e, retry_in = ?delay, "cannot reach the tracker; sync waits, payloads stay queued");
                    }
                    if !crate::retry::sleep(delay, token).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The lock an apply on `conn` holds, shared with the applies of other items, while it
    /// writes to the tracker; held exclusively, no apply is under way.
    pub(crate) fn apply_lock(&self, conn: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut all = self.inner.applying.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(conn.to_owned()).or_default().clone()
    }

    /// Waits until no apply on `conn` is under way. Call it after reading revisions and
    /// before judging them: a revision that exists was written by an apply that has either
    /// recorded it as relay's own by then, or still holds the lock.
    pub(crate) async fn applies_settled(&self, conn: &str) {
        drop(self.apply_lock(conn).write().await);
    }

    /// Largest attachment chunk sent.
    pub fn chunk_bytes(&self) -> usize {
        self.inner.chunk_bytes
    }

    /// The compiled rules of `conn`, generating and storing the defaults for `project` when
    /// the connection has none yet.
    pub fn rules(&self, conn: &str, project: &str) -> Result<Arc<Rules>, ItemFailure> {
        let record = match self.inner.state.rules(conn)? {
            Some(r) => r,
            None => {
                let source = crate::sync::default_rules(project);
                self.inner.state.set_rules(conn, &source, None)?;
                self.inner.state.rules(conn)?.ok_or_else(|| ItemFailure::Transient {
                    reason: "rules vanished".into(),
                    after: None,
                })?
            }
        };
        let mut compiled = self.inner.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((source, rules)) = compiled.get(conn) {
            if *source == record.source {
                return Ok(rules.clone());
            }
        }
        let types = self
            .inner
            .types
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(project)
            .cloned()
            .unwrap_or_default();
        let rules = script::compile(&record.source)
            .map_err(|e| ItemFailure::Item(format!("the connection's rules do not compile: {e}")))?
            .with_local_types(types);
        let rules = Arc::new(rules);
        compiled.insert(conn.to_owned(), (record.source, rules.clone()));
        Ok(rules)
    }

    /// Learns the work item types of `project` (for `nodeHelper.getIssueType`).
    async fn learn_types(&self, tracker: &Tracker, project: &str) {
        match tracker.work_item_types(project).await {
            Ok(types) => {
                self.inner
                    .types
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(project.to_owned(), LocalTypes::new(types));
                // Rules compiled before knew no types.
                self.inner.compiled.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            Err(e) => {
                warn!(project, error = %e, "cannot list the project's work item types; nodeHelper.getIssueType knows none")
            }
        }
    }

    /// Starts the poller and the apply worker of one connection.
    pub fn spawn(&self, link: SyncLink, active: watch::Receiver<bool>, tasks: &TaskTracker, token: CancellationToken) {
        let (wake_tx, wake_rx) = watch::channel(0u64);
        let wake_in = wake_tx.subscribe();
        self.inner
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(link.name.clone(), (link.clone(), wake_tx));
        let span = |what: &'static str| tracing::info_span!("sync", connection = %link.name, loop = what);
        tasks.spawn(outgoing::run(self.clone(), link.clone(), wake_rx, token.clone()).instrument(span("outgoing")));
        tasks.spawn(incoming::run(self.clone(), link.clone(), active, wake_in, token).instrument(span("incoming")));
    }

    /// The running connection `conn`.
    pub fn link(&self, conn: &str) -> OpResult<SyncLink> {
        self.inner
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(conn)
            .map(|(l, _)| l.clone())
            .ok_or_else(|| {
                OpError::new(
                    Kind::NotFound,
                    format!("connection {conn:?} is not syncing (no such active connection)"),
                )
            })
    }

    /// Wakes the poller of `conn` (a service hook, a retry), or of every connection.
    pub fn wake(&self, conn: Option<&str>) {
        for (name, (_, wake)) in self.inner.links.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if conn.is_none_or(|c| c == name) {
                wake.send_modify(|n| *n += 1);
            }
        }
    }

    /// Records that an item failed (or failed again).
    fn fail(&self, link: &SyncLink, side: Side, item: &str, message: String, parked: Option<String>) {
        let state = &self.inner.state;
        let mut e = match state.error(&link.name, side, item) {
            Ok(Some(mut e)) => {
                e.attempts += 1;
                e.message = message.clone();
                e.retry = false;
                e
            }
            _ => SyncError {
                connection: link.name.clone(),
                side,
                item: item.to_owned(),
                message: message.clone(),
                at_ms: now_ms(),
                attempts: 1,
                parked: Vec::new(),
                retry: false,
            },
        };
        e.parked.extend(parked);
        warn!(connection = %link.name, %side, item, error = %message, "sync error; this item waits, others flow on");
        link.health
            .error(format!("sync error on {side} item {item}: {message}"));
        if let Err(err) = state.put_error(&e) {
            warn!(error = %err, "cannot store the sync error");
        }
    }
}

/// Which of the items a replica links to, and which of the items `current` links to, have a
/// twin: what `linkHelper` maps links by.
pub fn twins_for(
    state: &SyncState,
    conn: &str,
    replica: &crate::sync::Replica,
    current: &crate::sync::WorkItem,
) -> Result<script::Twins, QueueError> {
    let mut twins = script::Twins::default();
    for l in &replica.entity.links {
        // The twin the sender names, if this side has it as one; else the one this side knows.
        let named = match l.twin.as_deref().and_then(|t| t.parse::<u64>().ok()) {
            Some(local) => state.twin_by_local(conn, local)?.map(|_| local),
            None => None,
        };
        let local = match named {
            Some(local) => Some(local),
            None => state.twin_by_remote(conn, &l.key)?.and_then(|(_, t)| t.local),
        };
        if let Some(local) = local {
            twins.by_remote.insert(l.key.clone(), local);
        }
    }
    for l in &current.links {
        if state.twin_by_local(conn, l.target)?.is_some() {
            twins.synced.insert(l.target);
        }
    }
    Ok(twins)
}

/// Marks the comments and attachments of `item` that relay copied from the other side (their
/// remote ids), so that scripts never send them back and merging skips them, and fills in
/// the hashes of attachments whose bytes relay read before (merging matches equal files).
pub fn annotate(state: &SyncState, item: &mut crate::sync::WorkItem, twin: &crate::sync::state::Twin) {
    mark_copied(item, twin);
    for a in &mut item.attachments {
        if let Some(f) = a.id.as_deref().and_then(|id| state.file_facts(id).ok().flatten()) {
            a.sha256 = f.sha256;
            a.size = f.size;
        }
    }
}

fn mark_copied(item: &mut crate::sync::WorkItem, twin: &crate::sync::state::Twin) {
    for c in &mut item.comments {
        if let Some(r) = c.id.as_ref().and_then(|id| twin.comments.get(id)) {
            c.remote_id = Some(r.clone());
        }
    }
    for a in &mut item.attachments {
        if let Some(r) = a.id.as_ref().and_then(|id| twin.attachments.get(id)) {
            a.remote_id = Some(r.clone());
        }
    }
    // A copy whose add was not answered yet is a copy all the same.
    for p in &twin.pending_comments {
        if let Some(c) = item
            .comments
            .iter_mut()
            .find(|c| c.remote_id.is_none() && c.body.trim() == p.body.trim())
        {
            c.remote_id = Some(p.remote.clone());
        }
    }
}

/// Replaces each inline image of this tracker whose bytes relay knows (it read or uploaded
/// them before) by its reference, as an export would, without asking the tracker anything.
pub fn neutralize_known(state: &SyncState, tracker: &Tracker, entity: &mut crate::sync::Entity) {
    use crate::sync::inline;
    for t in inline::html_texts(entity) {
        *t = inline::rewrite(t, |src| {
            let aid = tracker.known_attachment_id(src)?;
            let facts = state.file_facts(&aid).ok().flatten()?;
            Some(
                inline::Reference {
                    sha256: facts.sha256,
                    filename: inline::file_name(src),
                }
                .to_src(),
            )
        });
    }
}

/// What `relay sync bulk` did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BulkReport {
    /// Items the trigger matches.
    pub matched: u64,
    /// Of them, already synced.
    pub already: u64,
    /// Sent now (or, with `--dry-run`, that would be).
    pub sent: u64,
    /// Failed: listed in `relay sync errors`.
    pub failed: u64,
}

impl Engine {
    /// Sends every item the connection's trigger matches that has no twin yet.
    pub async fn bulk(&self, conn: &str, dry_run: bool) -> OpResult<BulkReport> {
        let link = self.link(conn)?;
        let tracker = self
            .tracker()
            .await
            .map_err(|e| OpError::new(Kind::Unreachable, e.to_string()))?;
        let trigger = self.inner.state.rules(conn)?.and_then(|r| r.trigger);
        let ids = tracker
            .query_ids(&link.project, trigger.as_deref())
            .await
            .map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
        self.applies_settled(conn).await;
        let mut report = BulkReport {
            matched: ids.len() as u64,
            ..BulkReport::default()
        };
        let mut sent = 0;
        for id in ids {
            if self.inner.state.twin_by_local(conn, id)?.is_some() {
                report.already += 1;
                continue;
            }
            if dry_run {
                report.sent += 1;
                continue;
            }
            match outgoing::export(self, &tracker, &link, id, false).await {
                Ok(outgoing::Exported::Sent) => {
                    report.sent += 1;
                    sent += 1;
                }
                Ok(_) => report.already += 1,
                Err(ItemFailure::Item(m)) => {
                    self.fail(&link, Side::Outgoing, &id.to_string(), m, None);
                    report.failed += 1;
                }
                Err(ItemFailure::Transient { reason, .. }) => {
                    return Err(OpError::new(
                        Kind::Unreachable,
                        format!("stopped after {sent} items: {reason}; run the bulk again to go on"),
                    ))
                }
            }
            if sent % 256 == 0 {
                self.inner.state.flush().await?;
            }
        }
        self.inner.state.flush().await?;
        Ok(report)
    }

    /// Sends one item now, whether or not it changed.
    pub async fn sync_item(&self, conn: &str, id: u64) -> OpResult<String> {
        let link = self.link(conn)?;
        let tracker = self
            .tracker()
            .await
            .map_err(|e| OpError::new(Kind::Unreachable, e.to_string()))?;
        let outcome = outgoing::export(self, &tracker, &link, id, true).await;
        self.inner.state.flush().await?;
        match outcome {
            Ok(outgoing::Exported::Sent) => Ok(format!("work item {id} sent")),
            Ok(outgoing::Exported::Missing) => {
                Err(OpError::new(Kind::NotFound, format!("work item {id} does not exist")))
            }
            Ok(outgoing::Exported::Unchanged) => Ok(format!("work item {id} unchanged since it was last sent")),
            Ok(outgoing::Exported::Waiting) => Err(OpError::new(
                Kind::Conflict,
                format!("work item {id} has a sync error: see relay sync errors, then retry or resolve it"),
            )),
            Err(ItemFailure::Item(m)) => {
                self.fail(&link, Side::Outgoing, &id.to_string(), m.clone(), None);
                Err(OpError::new(Kind::Failed, format!("work item {id}: {m}")))
            }
            Err(ItemFailure::Transient { reason, .. }) => Err(OpError::new(Kind::Unreachable, reason)),
        }
    }
}

/// Marks an item's error for retry (the engine retries it at once when running), or drops it
/// with what waited behind it (`resolve`: the operator fixed the item by hand).
pub fn retry_or_resolve(
    state: &SyncState,
    conn: &str,
    item: &str,
    side: Option<Side>,
    resolve: bool,
) -> OpResult<Vec<SyncError>> {
    let mut found = Vec::new();
    for s in [Side::Outgoing, Side::Incoming] {
        if side.is_none_or(|want| want == s) {
            found.extend(state.error(conn, s, item)?);
        }
    }
    if found.len() > 1 {
        // An outgoing error names a local id, an incoming one the other tracker's id: the
        // same number may be two unrelated items.
        return Err(OpError::new(
            Kind::Invalid,
            format!(
                "item {item:?} has a sync error on both sides (outgoing: this tracker's item {item}, incoming: the other tracker's item {item}); say which with --side outgoing|incoming"
            ),
        ));
    }
    let Some(mut e) = found.pop() else {
        return Err(OpError::new(
            Kind::NotFound,
            format!("connection {conn:?} has no sync error for item {item:?} (see relay sync errors)"),
        ));
    };
    if resolve {
        state.clear_error(conn, e.side, item)?;
    } else {
        e.retry = true;
        state.put_error(&e)?;
    }
    Ok(vec![e])
}
