//! The incoming half: take the inbound queue's messages in order; store attachment chunks and
//! upload a file once all of it arrived intact; apply each replica to its local twin through
//! the incoming script (create with a marker, or patch with `test /rev` and retry on 412),
//! and park replicas of an item with a sync error so that other items flow on.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Engine, ItemFailure, SyncLink};
use crate::retry::Backoff;
use crate::status::{now_ms, Health};
use crate::store::Message;
use crate::sync::blob;
use crate::sync::inline;
use crate::sync::replica::{self, Person, Replica};
use crate::sync::script;
use crate::sync::state::{
    FileFacts, PendingComment, PendingCreate, Side, SyncState, SyncWarning, Twin, UploadedFile, ALL_FIELDS,
};
use crate::sync::workitem::{self, WorkItem};
use crate::tracker::{Tracker, TrackerError};

/// Writes retried when the item changes between read and write (412).
const CONFLICT_RETRIES: usize = 5;

/// What became of one inbound message.
#[derive(Debug)]
enum Handled {
    /// Applied, stored, or parked behind its item's error: remove it.
    Done,
    /// Unusable for good: set it aside as a dead letter.
    DeadLetter(String),
}

/// Replicas of distinct items applied at once on one connection (each item's replicas stay in
/// order): a tracker answers each request in a fraction of what one item's chain of requests
/// takes, so items applied one after another leave it, and this process, mostly waiting.
const APPLY_WINDOW: usize = 4;

/// Messages looked at per round: enough to keep the window full past files and an item's
/// later replicas waiting for its earlier one.
const ROUND: usize = 64;

/// Bodies read per round at most (a file's chunks are large).
const ROUND_BYTES: usize = 16 * 1024 * 1024;

/// What one handled message came to, with its message.
type Outcome = (Message, Option<String>, Result<Handled, ItemFailure>);

/// Runs the apply worker of one connection until `token` is cancelled.
pub async fn run(
    engine: Engine,
    link: SyncLink,
    mut active: watch::Receiver<bool>,
    mut wake: watch::Receiver<u64>,
    token: CancellationToken,
) {
    let Some(tracker) = engine.tracker_patiently(&link.health, &token).await else {
        return;
    };
    let inbox = link.inbox.clone();
    // Messages already queued now may have been cut short by a crash of an earlier run.
    let queued_at_start = inbox.last_seq();
    let oldest_queued_ms = inbox.first().ok().flatten().map(|m| m.enqueued_at_ms);
    let mut created_lately = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(60));
    let mut kicks = inbox.kicks();
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return,
            r = active.wait_for(|a| *a) => if r.is_err() { return },
        }
        retry_parked(&engine, &tracker, &link).await;
        let durable = inbox.durable_seq();
        let msgs = match inbox.read_after(0, ROUND, ROUND_BYTES) {
            Ok(m) if m.is_empty() => {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => return,
                    _ = inbox.wait_durable_after(durable) => {}
                    r = active.changed() => if r.is_err() { return },
                    r = wake.changed() => if r.is_err() { return },
                    _ = kicks.changed() => {}
                }
                continue;
            }
            Ok(m) => m,
            Err(e) => {
                link.health.error(format!("reading queue: {e}"));
                if !crate::retry::sleep(backoff.next_delay(None), &token).await {
                    return;
                }
                continue;
            }
        };
        // The round: files one at a time and before any replica that follows them (it may
        // need their bytes), replicas of distinct items side by side, an item's next replica
        // once its previous one is done. The first failure ends the round; what is under way
        // finishes, and the next round starts again from the oldest message left.
        let mut running: tokio::task::JoinSet<Outcome> = tokio::task::JoinSet::new();
        let mut items: Vec<String> = Vec::new();
        let mut files = 0usize;
        let mut failed: Option<Option<Duration>> = None;
        for msg in msgs {
            if failed.is_some() || !*active.borrow() {
                break;
            }
            let inbound = Inbound::read(&msg);
            let of = inbound.item(&msg);
            let earlier_run = msg.seq <= queued_at_start;
            // What this message must wait for among those under way: files (it may need their
            // bytes), and an apply of the same item or of one it links to (a link to an item
            // is made by whichever of the two applies finds the other's twin).
            let waits = |items: &Vec<String>, files: usize, running: usize| {
                if earlier_run {
                    running > 0
                } else if let Some((item, linked)) = &of {
                    files > 0
                        || running >= APPLY_WINDOW
                        || items.contains(item)
                        || linked.iter().any(|l| items.contains(l))
                } else {
                    files > 0
                }
            };
            let item = of.as_ref().map(|(i, _)| i.clone());
            while waits(&items, files, running.len()) {
                let outcome = tokio::select! {
                    _ = token.cancelled() => return,
                    done = running.join_next() => done,
                };
                let (done, done_item, result) = match outcome {
                    Some(Ok(o)) => o,
                    // A handler that panicked: its message stays for the next round.
                    Some(Err(e)) => {
                        warn!(error = %e, "an apply ended abnormally; retrying");
                        failed = Some(None);
                        break;
                    }
                    None => break,
                };
                match &done_item {
                    Some(i) => items.retain(|x| x != i),
                    None => files -= 1,
                }
                if let Some(after) = settle(&link, &inbox, &done, result, &mut backoff) {
                    failed = Some(after);
                }
            }
            if failed.is_some() {
                break;
            }
            if earlier_run {
                // Found again, if an earlier run created it, by the one search it shares
                // with the other messages of the backlog: one at a time.
                let recovery = Recovery::Known(&mut created_lately, oldest_queued_ms.unwrap_or(msg.enqueued_at_ms));
                let result = tokio::select! {
                    r = handle(&engine, &tracker, &link, &msg, inbound, recovery) => r,
                    // Whatever was written is recorded as it went; the message is handled again.
                    _ = token.cancelled() => return,
                };
                if let Some(after) = settle(&link, &inbox, &msg, result, &mut backoff) {
                    failed = Some(after);
                }
                continue;
            }
            match &item {
                Some(i) => items.push(i.clone()),
                None => files += 1,
            }
            let (engine, tracker, link) = (engine.clone(), tracker.clone(), link.clone());
            running.spawn(async move {
                let result = handle(&engine, &tracker, &link, &msg, inbound, Recovery::Fresh).await;
                (msg, item, result)
            });
        }
        // Whatever was written is recorded as it went; a message cut short is handled again.
        loop {
            let outcome = tokio::select! {
                _ = token.cancelled() => return,
                done = running.join_next() => done,
            };
            let Some(outcome) = outcome else { break };
            let Ok((done, _, result)) = outcome else {
                failed = Some(None);
                continue;
            };
            if let Some(after) = settle(&link, &inbox, &done, result, &mut backoff) {
                failed = Some(after);
            }
        }
        if let Some(after) = failed {
            let delay = backoff.next_delay(after);
            if !crate::retry::sleep(delay, &token).await {
                return;
            }
        }
    }
}

/// An inbound message as read once: a file's chunk, a replica, or something that is
/// dead-lettered (with why).
enum Inbound {
    Chunk,
    Replica(Box<Replica>),
    Refused(String),
}

impl Inbound {
    fn read(msg: &Message) -> Inbound {
        match msg.content_type.as_str() {
            replica::BLOB_CONTENT_TYPE => Inbound::Chunk,
            replica::CONTENT_TYPE => match Replica::parse(&msg.body) {
                Ok(r) => Inbound::Replica(Box::new(r)),
                Err(e) => Inbound::Refused(e.to_string()),
            },
            other => Inbound::Refused(format!(
                "not a sync message (content type {other:?}): this side syncs with its tracker and has no webhook"
            )),
        }
    }

    /// The item a replica is about (its key on the other side), with the items it links to;
    /// `None` for a file's chunk. A refused message counts as an item of its own (it is
    /// dead-lettered alone).
    fn item(&self, msg: &Message) -> Option<(String, Vec<String>)> {
        match self {
            Inbound::Chunk => None,
            Inbound::Replica(r) => Some((
                r.origin.id.to_string(),
                r.entity.links.iter().map(|l| l.key.clone()).collect(),
            )),
            Inbound::Refused(_) => Some((format!("message {}", msg.seq), Vec::new())),
        }
    }
}

/// Records what became of one message: removed once handled, dead-lettered, or left for the
/// next round. Answers, for a failure, how long the tracker asked to wait (if it did).
fn settle(
    link: &SyncLink,
    inbox: &crate::store::Queue,
    msg: &Message,
    result: Result<Handled, ItemFailure>,
    backoff: &mut Backoff,
) -> Option<Option<Duration>> {
    match result {
        Ok(Handled::Done) => {
            backoff.reset();
            Health::add(&link.health.delivered, 1);
            if let Err(e) = inbox.remove(msg.seq) {
                link.health.error(format!("removing an applied message: {e}"));
            }
            None
        }
        Ok(Handled::DeadLetter(reason)) => {
            warn!(id = %msg.id, seq = msg.seq, %reason, "dead-lettering message");
            Health::add(&link.health.dead_lettered, 1);
            link.health.error(format!("message {} dead-lettered: {reason}", msg.id));
            if let Err(e) = inbox.dead_letter(msg, &reason) {
                warn!(error = %e, "cannot dead-letter; will retry the message");
            }
            None
        }
        Err(failure) => {
            let (reason, after) = match failure {
                ItemFailure::Transient { reason, after } => (reason, after),
                ItemFailure::Item(reason) => (reason, None),
            };
            Health::add(&link.health.failures, 1);
            link.health.error(reason.clone());
            warn!(error = %reason, "cannot apply now; retrying");
            Some(after)
        }
    }
}

/// How a first sync makes sure no earlier attempt already created the item. A create is
/// recorded and flushed as pending before it is sent, so a pending record is searched for in
/// every case; these say what else to do.
pub enum Recovery<'a> {
    /// Nothing more: an item without a pending create was never created.
    Fresh,
    /// Queued before this run started, by a version that did not flush the pending record:
    /// look among the items with hyperlinks this token's user created since the oldest queued
    /// message, read from the tracker once per run (a backlog costs one search, not one per
    /// item).
    Known(&'a mut Option<HashMap<String, u64>>, u64),
}

/// Handles one inbound message.
async fn handle(
    engine: &Engine,
    tracker: &Tracker,
    link: &SyncLink,
    msg: &Message,
    inbound: Inbound,
    recovery: Recovery<'_>,
) -> Result<Handled, ItemFailure> {
    match inbound {
        Inbound::Chunk => receive_chunk(engine, tracker, link, msg).await,
        Inbound::Refused(reason) => Ok(Handled::DeadLetter(reason)),
        Inbound::Replica(replica) => {
            let item = replica.origin.id.to_string();
            if let Some(e) = engine.state().error(&link.name, Side::Incoming, &item)? {
                // Later replicas wait behind the item's error; other items flow on.
                let mut e = e;
                e.parked.push(String::from_utf8_lossy(&msg.body).into_owned());
                engine.state().put_error(&e)?;
                return Ok(Handled::Done);
            }
            match apply(engine, tracker, link, &replica, recovery).await {
                Ok(()) => Ok(Handled::Done),
                Err(ItemFailure::Item(m)) => {
                    let parked = String::from_utf8_lossy(&msg.body).into_owned();
                    engine.fail(link, Side::Incoming, &item, m, Some(parked));
                    Ok(Handled::Done)
                }
                Err(t) => Err(t),
            }
        }
    }
}

/// Stores one chunk; once the file is whole and intact, uploads it (once per hash).
async fn receive_chunk(
    engine: &Engine,
    tracker: &Tracker,
    link: &SyncLink,
    msg: &Message,
) -> Result<Handled, ItemFailure> {
    let state = engine.state();
    let (h, part) = match blob::decode(&msg.body) {
        Ok(x) => x,
        Err(e) => return Ok(Handled::DeadLetter(e.to_string())),
    };
    if state.uploaded(&h.sha256)?.is_some() {
        return Ok(Handled::Done);
    }
    let have = state.put_chunk(&link.name, &h.sha256, h.index, part)?;
    if have < h.count {
        return Ok(Handled::Done);
    }
    upload_stored(engine, tracker, link, &h.sha256, &h.filename).await?;
    Ok(Handled::Done)
}

/// Uploads a file whose chunks are all stored, once it checks out against its hash. A file the
/// tracker refuses (too large, a blocked type) is recorded as refused with its chunks kept, so
/// the replicas that need it become that item's sync error and a retry can upload it again;
/// nothing else waits for it.
async fn upload_stored(
    engine: &Engine,
    tracker: &Tracker,
    link: &SyncLink,
    sha256: &str,
    filename: &str,
) -> Result<(), ItemFailure> {
    let state = engine.state();
    let bytes = state.chunks(&link.name, sha256)?;
    if let Err(e) = blob::verify(sha256, &bytes) {
        state.drop_chunks(&link.name, sha256)?;
        link.health.error(e.to_string());
        warn!(error = %e, "attachment dropped; the replica that needs it becomes a sync error");
        return Ok(());
    }
    let up = match tracker
        .upload_attachment(&link.project, filename, &bytes)
        .await
        .map_err(ItemFailure::from)
    {
        Ok(up) => up,
        Err(t @ ItemFailure::Transient { .. }) => return Err(t),
        Err(ItemFailure::Item(why)) => {
            warn!(file = %filename, bytes = bytes.len(), error = %why, "the tracker refused the attachment; the item that carries it waits, others flow on");
            link.health
                .error(format!("attachment {filename:?} refused by the tracker: {why}"));
            state.set_refused(&link.name, sha256, &why)?;
            return Ok(());
        }
    };
    state.set_file_facts(
        &up.id,
        &FileFacts {
            sha256: sha256.to_owned(),
            size: bytes.len() as u64,
        },
    )?;
    state.set_uploaded(sha256, &UploadedFile { id: up.id, url: up.url })?;
    // The other side has these bytes: the same file going back sends none.
    state.set_file_sent(&link.name, sha256)?;
    state.clear_refused(&link.name, sha256)?;
    state.drop_chunks(&link.name, sha256)?;
    info!(file = %filename, bytes = bytes.len(), "attachment uploaded");
    Ok(())
}

/// Re-applies the newest parked replica of each incoming error the operator asked to retry.
async fn retry_parked(engine: &Engine, tracker: &Tracker, link: &SyncLink) {
    let state = engine.state();
    let Ok(errors) = state.errors(Some(&link.name)) else {
        return;
    };
    for e in errors.into_iter().filter(|e| e.retry && e.side == Side::Incoming) {
        let Some(replica) = e.parked.last().and_then(|raw| Replica::parse(raw.as_bytes()).ok()) else {
            // Nothing to apply again: the operator's retry clears it.
            let _ = state.clear_error(&link.name, Side::Incoming, &e.item);
            continue;
        };
        // A file the tracker refused may be accepted now (a limit raised, a type allowed).
        for a in &replica.entity.attachments {
            if matches!(state.refused(&link.name, &a.sha256), Ok(Some(_))) {
                if let Err(ItemFailure::Transient { reason, .. }) =
                    upload_stored(engine, tracker, link, &a.sha256, &a.filename).await
                {
                    warn!(item = %e.item, error = %reason, "retry postponed");
                    return;
                }
            }
        }
        // An earlier attempt cut short left its pending create: apply looks for it first.
        match apply(engine, tracker, link, &replica, Recovery::Fresh).await {
            Ok(()) => {
                info!(item = %e.item, "retried item applied");
                if let Err(err) = state.clear_error(&link.name, Side::Incoming, &e.item) {
                    warn!(error = %err, "cannot clear the sync error");
                }
            }
            Err(ItemFailure::Item(m)) => engine.fail(link, Side::Incoming, &e.item, m, None),
            Err(ItemFailure::Transient { reason, .. }) => {
                warn!(item = %e.item, error = %reason, "retry postponed");
                return;
            }
        }
    }
}

/// The hyperlink a created item carries: found again after a crash cut the create short.
fn marker(replica: &Replica, conn: &str) -> String {
    format!("{}{}", replica.origin.url, marker_suffix(conn))
}

fn marker_suffix(conn: &str) -> String {
    format!("#relay-connection={}", conn.replace(' ', "%20"))
}

/// Whether `url` is the marker of an item relay created for connection `conn`.
pub fn is_marker_of(url: &str, conn: &str) -> bool {
    url.ends_with(&marker_suffix(conn))
}

fn ops(patch: Option<&Value>) -> Vec<Value> {
    patch.and_then(Value::as_array).cloned().unwrap_or_default()
}

/// Applies one replica to its local twin; `recovery` says how a first sync finds an item an
/// earlier attempt created (a crash, a lost answer) before creating one.
pub async fn apply(
    engine: &Engine,
    tracker: &Tracker,
    link: &SyncLink,
    replica: &Replica,
    mut recovery: Recovery<'_>,
) -> Result<(), ItemFailure> {
    let conn = &link.name;
    // Held until every revision this apply writes is recorded as relay's own. Applies of
    // other items share it; a reader judging revisions waits for all of them.
    let lock = engine.apply_lock(conn);
    let _applying = lock.read().await;
    let state = engine.state();
    let remote = replica.origin.id.to_string();
    let by_twin = match replica.event.twin.as_deref().map(str::parse::<u64>) {
        Some(Ok(local)) => state.twin_by_local(conn, local)?,
        _ => None,
    };
    let found = match by_twin {
        Some(f) => Some(f),
        None => state.twin_by_remote(conn, &remote)?,
    };
    let (primary, mut twin) = found.unwrap_or_else(|| {
        let t = Twin {
            remote: Some(remote.clone()),
            ..Twin::default()
        };
        (SyncState::new_key(&t), t)
    });
    if twin.applied.contains(&replica.event.id) {
        return Ok(());
    }
    if twin.remote.as_deref() != Some(remote.as_str()) {
        twin.remote = Some(remote.clone());
    }
    let rules = engine.rules(conn, &link.project)?;
    // People the tracker refused as unknown in this apply: the item syncs without them.
    let mut unknown: Vec<Person> = Vec::new();
    for _ in 0..CONFLICT_RETRIES {
        if twin.local.is_none() {
            // A create may have been sent and its answer lost (to a crash, or to a failed
            // request of this run): find the item rather than make another.
            let marker = twin
                .pending_create
                .as_ref()
                .map(|p| p.marker.clone())
                .unwrap_or_else(|| marker(replica, conn));
            let found = match (&mut recovery, &twin.pending_create) {
                (_, Some(pending)) => {
                    tracker
                        .find_by_hyperlink(&link.project, &marker, pending.since_ms)
                        .await?
                }
                (Recovery::Known(lately, since), None) => {
                    if lately.is_none() {
                        **lately = Some(tracker.hyperlinks_created(&link.project, *since).await?);
                    }
                    lately.as_ref().and_then(|m| m.get(&marker).copied())
                }
                (Recovery::Fresh, None) => None,
            };
            if let Some(id) = found {
                info!(item = id, remote = %remote, "found the work item of a create cut short");
                twin.local = Some(id);
                twin.pending_create = None;
                state.put_twin(conn, &primary, &twin)?;
            }
        }
        let mut current = match twin.local {
            Some(id) => tracker.read_item(id).await?.ok_or_else(|| {
                ItemFailure::Item(format!(
                    "local work item {id}, the twin of remote item {remote}, no longer exists; resolve this error to stop syncing it"
                ))
            })?,
            None => WorkItem::default(),
        };
        if !twin.pending_comments.is_empty() {
            reconcile_comments(&mut twin, &current);
            state.put_twin(conn, &primary, &twin)?;
        }
        super::annotate(state, &mut current, &twin);
        let first_sync = twin.local.is_none();
        // The item as this side would send it now, before this apply writes.
        let before = (!first_sync)
            .then(|| outgoing_view(state, tracker, &rules, &current, &twin).ok())
            .flatten();
        let localized = localize(state, conn, replica)?;
        let twins = super::twins_for(state, conn, replica, &current)?;
        let mut desired = script::run_incoming_linked(
            &rules,
            &localized,
            twin.last_received.as_ref(),
            &current,
            first_sync,
            twins,
        )
        .map_err(|e| ItemFailure::Item(e.to_string()))?;
        tracker.fill_link_urls(&mut desired.links);
        // Fields this side sent in replicas the sender had not applied when it made this one.
        let crossed = twin.crossed(replica.event.acked.as_deref());
        if let (Some(asked), false) = (&replica.event.changed, first_sync) {
            let mut changed = asked.clone();
            if engine.wins_crossed_edits() {
                // Changed here too, sent or not yet: this side's value stands, and the other
                // side takes it when this side's replica arrives there.
                let mut crossed = crossed;
                if let (Some(local), Some(base)) = (&before, twin.base()) {
                    crossed.extend(local.changed_since(base));
                }
                changed.retain(|f| !crossed.contains(f) && !crossed.contains(ALL_FIELDS));
                if changed != *asked {
                    let kept: Vec<&String> = asked.iter().filter(|f| !changed.contains(f)).collect();
                    info!(item = ?twin.local, %remote, fields = ?kept, "changed on both sides at once: this side's value stands");
                }
            }
            keep_unchanged(&mut desired, &current, &replica.entity, &changed);
        }
        if desired
            .assignee
            .as_ref()
            .is_some_and(|p| unknown.iter().any(|u| u.same(p)))
        {
            desired.assignee = current.assignee.clone();
        }
        let mut new_files = Vec::new();
        for a in desired
            .attachments
            .iter_mut()
            .filter(|a| a.id.is_none() && a.url.is_none())
        {
            let up = match state.uploaded(&a.sha256)? {
                Some(up) => up,
                None => {
                    return Err(ItemFailure::Item(match state.refused(conn, &a.sha256)? {
                        Some(why) => format!(
                            "the tracker refused attachment {:?} ({} bytes): {why}; fix that (a size limit, a blocked type), then retry this item",
                            a.filename, a.size
                        ),
                        None => format!(
                            "the bytes of attachment {:?} (sha256 {}) did not arrive intact",
                            a.filename, a.sha256
                        ),
                    }))
                }
            };
            a.url = Some(up.url.clone());
            new_files.push((up.id, a.remote_id.clone()));
        }
        check_state(&rules, &current, &desired)?;
        let plan = workitem::build_patch(&current, &desired).map_err(|e| ItemFailure::Item(e.to_string()))?;
        if plan.create.is_none() && (!new_files.is_empty() || matches!(localized, Cow::Owned(_))) {
            // The records of the files this write links (their hashes above all) must outlive
            // a crash right after it: the next attempt recognises them on the item by them,
            // rather than linking a second copy. A create flushes them with its pending record.
            state.flush().await?;
        }
        let mut last_rev = current.rev.unwrap_or(0);
        // The item as relay's write left it: what both sides agree on from now on.
        let mut after = current.clone();
        let local = match (&plan.create, twin.local) {
            (Some(target), _) => {
                let marker = marker(replica, conn);
                // An earlier attempt's start stays the lower bound of the search.
                let since_ms = twin.pending_create.as_ref().map_or_else(now_ms, |p| p.since_ms);
                twin.pending_create = Some(PendingCreate {
                    marker: marker.clone(),
                    since_ms,
                });
                // Recorded and flushed before the create is sent: a lost answer, a gateway's
                // 502/504 after the server committed, or a crash is reconciled above by this
                // marker, however long it takes to come back. The comment adds that follow
                // are recorded with it, in the same flush.
                record_pending_comments(&mut twin, &plan.comments);
                state.put_twin(conn, &primary, &twin)?;
                state.flush().await?;
                let mut ops = ops(plan.patch.as_ref());
                ops.push(json!({
                    "op": "add",
                    "path": "/relations/-",
                    "value": {"rel": "Hyperlink", "url": marker, "attributes": {"comment": format!("synced by relay, connection {conn}")}},
                }));
                let created = match tracker
                    .create(&target.project, &target.type_name, &Value::Array(ops))
                    .await
                {
                    Ok(created) => created,
                    Err(e) => {
                        if refused_person(&e, &desired, &mut unknown) {
                            continue;
                        }
                        return Err(e.into());
                    }
                };
                let id = created
                    .id
                    .ok_or_else(|| ItemFailure::Item("the tracker answered a create without an id".into()))?;
                twin.local = Some(id);
                twin.pending_create = None;
                last_rev = created.rev.unwrap_or(1);
                after = created;
                twin.own(last_rev);
                // No flush here: should this write be lost, the pending create stored above
                // finds the item by its marker.
                state.put_twin(conn, &primary, &twin)?;
                info!(item = id, remote = %remote, "work item created");
                id
            }
            (None, Some(id)) => {
                // The plan's patch starts with `test /rev` of the item as read.
                if let Some(patch) = plan.patch.as_ref() {
                    match tracker.update(id, patch).await {
                        Ok(item) => {
                            last_rev = item.rev.unwrap_or(last_rev + 1);
                            twin.own(last_rev);
                            after = WorkItem {
                                comments: std::mem::take(&mut after.comments),
                                ..item
                            };
                        }
                        // Changed since it was read: read again and run the script again.
                        Err(TrackerError::Conflict(_)) => continue,
                        Err(e) if refused_person(&e, &desired, &mut unknown) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                id
            }
            (None, None) => return Err(ItemFailure::Item("nothing to create and no twin to update".into())),
        };
        for (file, remote_file) in new_files {
            if let Some(r) = remote_file {
                twin.attachments.insert(file, r);
            }
        }
        let mut adds = plan.comments.clone();
        if tracker.edits_comments() {
            last_rev = edit_comments(tracker, link, &mut twin, local, last_rev, &plan, replica).await?;
        } else {
            adds.extend(edits_as_entries(&plan, replica));
        }
        let added = add_comments(tracker, link, state, &primary, &mut twin, (local, last_rev), &adds).await?;
        after.comments.extend(added);
        super::annotate(state, &mut after, &twin);
        // What both sides agree on moves by the fields this apply wrote, and by nothing
        // else: a change a person made here that is not sent yet stays a change to send.
        let written = outgoing_view(state, tracker, &rules, &after, &twin);
        match (written, &before, twin.base()) {
            (Ok(written), Some(before), Some(base)) => {
                let agreed = base.with_changes(before, &written);
                twin.agree(agreed)
            }
            (Ok(written), _, _) => twin.agree(written),
            // The next export compares with the older agreement: it sends, never skips.
            (Err(e), _, _) => warn!(item = local, error = %e, "the outgoing script fails on the item as applied"),
        }
        note_people(state, conn, &remote, local, &unknown, &desired)?;
        twin.last_received = Some(replica.clone());
        twin.applied(&replica.event.id);
        twin.last_in_ms = Some(now_ms());
        state.put_twin(conn, &primary, &twin)?;
        state.touch(conn, Side::Incoming)?;
        return Ok(());
    }
    Err(ItemFailure::Item(format!(
        "work item changed {CONFLICT_RETRIES} times while relay was writing it (412); retry it when edits settle"
    )))
}

/// Whether `e` refuses the assignee `desired` names as unknown; if so it is added to
/// `unknown`, and the write is made again without it.
fn refused_person(e: &TrackerError, desired: &WorkItem, unknown: &mut Vec<Person>) -> bool {
    let TrackerError::UnknownIdentity { field, .. } = e else {
        return false;
    };
    let Some(person) = desired.assignee.as_ref().filter(|p| !unknown.iter().any(|u| u.same(p))) else {
        return false;
    };
    if !(field.is_empty() || field.eq_ignore_ascii_case(workitem::FIELD_ASSIGNED_TO)) {
        return false;
    }
    unknown.push(person.clone());
    true
}

/// Records, once per item, that its assignee was left as it was because the person is
/// unknown here; forgets that once an assignee is written.
fn note_people(
    state: &SyncState,
    conn: &str,
    remote: &str,
    local: u64,
    unknown: &[Person],
    written: &WorkItem,
) -> Result<(), ItemFailure> {
    let Some(person) = unknown.last() else {
        if written.assignee.is_some() {
            state.clear_warning(conn, remote, "assignee")?;
        }
        return Ok(());
    };
    let warning = SyncWarning {
        connection: conn.to_owned(),
        item: remote.to_owned(),
        local: Some(local),
        field: "assignee".into(),
        message: format!(
            "{} <{}> is not a user of this tracker: work item {local} synced with Assigned To left as it was; add the user here, or map people in the incoming script",
            person.display_name, person.unique_name
        ),
        at_ms: now_ms(),
    };
    if state.put_warning(&warning)? {
        warn!(item = local, %remote, "{}", warning.message);
    }
    Ok(())
}

/// The replica with each inline file it references turned into the URL of this side's copy
/// (uploaded when its bytes arrived, or the original when it went out from here). A file not
/// here is this item's error: nothing is written with a link to nothing.
fn localize<'r>(state: &SyncState, conn: &str, replica: &'r Replica) -> Result<Cow<'r, Replica>, ItemFailure> {
    if !inline::has_references(&replica.entity) {
        return Ok(Cow::Borrowed(replica));
    }
    let mut out = replica.clone();
    let mut missing: Option<Result<String, ItemFailure>> = None;
    for t in inline::html_texts(&mut out.entity) {
        *t = inline::rewrite(t, |src| {
            let r = inline::Reference::parse(src)?;
            match state.uploaded(&r.sha256) {
                Ok(Some(up)) => Some(up.url),
                Ok(None) => {
                    missing.get_or_insert_with(|| {
                        Ok(match state.refused(conn, &r.sha256) {
                            Ok(Some(why)) => format!(
                                "the tracker refused inline image {:?}: {why}; fix that, then retry this item",
                                r.filename
                            ),
                            _ => format!(
                                "the bytes of inline image {:?} (sha256 {}) did not arrive intact",
                                r.filename, r.sha256
                            ),
                        })
                    });
                    None
                }
                Err(e) => {
                    missing.get_or_insert_with(|| Err(e.into()));
                    None
                }
            }
        });
    }
    match missing {
        None => Ok(Cow::Owned(out)),
        Some(Ok(m)) => Err(ItemFailure::Item(m)),
        Some(Err(e)) => Err(e),
    }
}

/// The entity this side's outgoing script makes of `item`, with its inline images as the
/// references an export would send: what the agreed state is compared in.
fn outgoing_view(
    state: &SyncState,
    tracker: &Tracker,
    rules: &crate::sync::Rules,
    item: &WorkItem,
    twin: &Twin,
) -> Result<crate::sync::Entity, script::ScriptError> {
    let mut e = script::run_outgoing(rules, item, twin.last_sent.as_ref())?;
    super::neutralize_known(state, tracker, &mut e);
    Ok(e)
}

/// Refuses a state the item's type does not have here, naming the states it has (the
/// tracker's own refusal names none).
fn check_state(rules: &crate::sync::Rules, current: &WorkItem, desired: &WorkItem) -> Result<(), ItemFailure> {
    let Some(state) = desired.status.as_deref().filter(|_| desired.status != current.status) else {
        return Ok(());
    };
    let type_name = if desired.type_name.is_empty() {
        &current.type_name
    } else {
        &desired.type_name
    };
    let Some(states) = rules.local_types().states_of(type_name) else {
        return Ok(());
    };
    if states.iter().any(|(n, _)| n.eq_ignore_ascii_case(state)) {
        return Ok(());
    }
    let names: Vec<&str> = states.iter().map(|(n, _)| n.as_str()).collect();
    Err(ItemFailure::Item(format!(
        "state {state:?} is not a state of a {type_name} here; its states are {}; map the other side's states in the incoming script (nodeHelper.mapState)",
        names.join(", ")
    )))
}

/// Puts back the local value of every field the sender did not change since both sides last
/// agreed: a replica made before the sender applied this side's latest change must not undo
/// it. A custom field is kept when the sender sends one of the same name unchanged; one the
/// script maps from another name is left as the script made it. Comments and attachments
/// merge by id.
fn keep_unchanged(desired: &mut WorkItem, current: &WorkItem, sent: &crate::sync::Entity, changed: &[String]) {
    let kept = |name: &str| !changed.iter().any(|c| c == name);
    if kept("summary") {
        desired.summary = current.summary.clone();
    }
    if kept("description") {
        desired.description = current.description.clone();
        // Where the rules put a Bug's text.
        keep_custom(desired, current, crate::sync::defaults::REPRO_STEPS);
    }
    if kept("labels") {
        desired.labels = current.labels.clone();
    }
    if kept("status") {
        desired.status = current.status.clone();
    }
    if kept("priority") {
        desired.priority = current.priority;
    }
    if kept("assignee") {
        desired.assignee = current.assignee.clone();
    }
    if kept("links") {
        desired.links = current.links.clone();
    }
    for name in sent.custom_fields.keys() {
        if !kept(&format!("custom_fields.{name}")) || !desired.custom_fields.contains_key(name) {
            continue;
        }
        keep_custom(desired, current, name);
    }
}

/// Puts back the local value of custom field `name` (or its absence).
fn keep_custom(desired: &mut WorkItem, current: &WorkItem, name: &str) {
    match current.custom_fields.get(name) {
        Some(v) => desired.custom_fields.insert(name.to_owned(), v.clone()),
        None => desired.custom_fields.remove(name),
    };
}

/// Links the comments whose adds were started and not answered to the copies the tracker
/// holds, matched by text among the comments no link names yet; an add that never arrived is
/// planned again.
fn reconcile_comments(twin: &mut Twin, current: &WorkItem) {
    for p in std::mem::take(&mut twin.pending_comments) {
        if twin.comments.values().any(|r| *r == p.remote) {
            continue;
        }
        let found = current.comments.iter().find(|c| {
            c.id.as_ref().is_some_and(|id| !twin.comments.contains_key(id)) && c.body.trim() == p.body.trim()
        });
        if let Some(id) = found.and_then(|c| c.id.clone()) {
            info!(comment = %id, remote = %p.remote, "found the comment of an add whose answer was lost");
            twin.comments.insert(id, p.remote);
        }
    }
}

/// Records the adds of `comments` that copy the other side's as pending; answers whether any
/// was not pending yet.
fn record_pending_comments(twin: &mut Twin, comments: &[workitem::WorkComment]) -> bool {
    let mut recorded = false;
    for c in comments {
        let Some(remote) = c.remote_id.clone() else { continue };
        if !twin.pending_comments.iter().any(|p| p.remote == remote) {
            twin.pending_comments.push(PendingComment {
                remote,
                body: c.body.clone(),
            });
            recorded = true;
        }
    }
    recorded
}

/// Adds the comments of a plan, linking each to its remote id as soon as it is written; the
/// adds are recorded (and flushed) as pending first, so a lost answer is reconciled, not added
/// again. Answers the comments as added.
async fn add_comments(
    tracker: &Tracker,
    link: &SyncLink,
    state: &SyncState,
    primary: &str,
    twin: &mut Twin,
    (local, before): (u64, u64),
    comments: &[workitem::WorkComment],
) -> Result<Vec<workitem::WorkComment>, ItemFailure> {
    let mut out = Vec::new();
    if comments.is_empty() {
        return Ok(out);
    }
    let mut unknown = 0u64;
    // All of the plan's adds recorded at once, one flush (none when a create recorded them
    // with its own): an add never answered stays pending and is looked for next time.
    if record_pending_comments(twin, comments) {
        state.put_twin(&link.name, primary, twin)?;
        state.flush().await?;
    }
    for c in comments {
        let added = tracker.add_comment(&link.project, local, &c.body).await?;
        if let Some(r) = c.remote_id.clone() {
            twin.pending_comments.retain(|p| p.remote != r);
            twin.comments.insert(added.id.clone(), r);
        }
        out.push(workitem::WorkComment {
            id: Some(added.id.clone()),
            ..c.clone()
        });
        match added.rev {
            Some(r) => twin.own(r),
            None => unknown += 1,
        }
        state.put_twin(&link.name, primary, twin)?;
    }
    own_unanswered(tracker, twin, local, before, unknown).await?;
    Ok(out)
}

/// Records as relay's own the `count` revisions that comment writes made, which the comments
/// API does not name: they are ours when the item moved by exactly that many since `before`,
/// relay's last known revision of it. Answers the item's revision now.
async fn own_unanswered(
    tracker: &Tracker,
    twin: &mut Twin,
    local: u64,
    before: u64,
    count: u64,
) -> Result<u64, ItemFailure> {
    if count == 0 {
        return Ok(before);
    }
    let Some(rev) = tracker.item_rev(local).await? else {
        return Ok(before);
    };
    if rev == before + count {
        for r in before + 1..=rev {
            twin.own(r);
        }
    } else {
        warn!(
            item = local,
            rev, before, "the item changed while comments were written; its next revision may be sent back once"
        );
        twin.own(rev);
    }
    Ok(rev)
}

/// The other side's comment edits and deletions, made to the copies here through the comments
/// API (5.1 and later). A copy is deleted only when its original left the other side since the
/// previous replica. Writing the same text again, or deleting a comment already gone, changes
/// nothing, so a repeat after a crash is harmless. Answers the item's revision after them.
async fn edit_comments(
    tracker: &Tracker,
    link: &SyncLink,
    twin: &mut Twin,
    local: u64,
    before: u64,
    plan: &workitem::Plan,
    replica: &Replica,
) -> Result<u64, ItemFailure> {
    let removed = removed_comments(twin, replica);
    let mut writes = 0u64;
    for c in &plan.comment_edits {
        if let Some(id) = c.id.as_deref() {
            tracker.update_comment(&link.project, local, id, &c.body).await?;
            writes += 1;
        }
    }
    for id in &plan.comment_deletes {
        let copy_of = twin.comments.get(id).cloned();
        if copy_of.is_some_and(|r| removed.contains(&r)) {
            tracker.delete_comment(&link.project, local, id).await?;
            twin.comments.remove(id);
            writes += 1;
        }
    }
    own_unanswered(tracker, twin, local, before, writes).await
}

/// The ids of the other side's comments in the previous replica of this item and not in this one.
fn removed_comments(twin: &Twin, replica: &Replica) -> Vec<String> {
    let Some(previous) = twin.last_received.as_ref() else {
        return Vec::new();
    };
    previous
        .entity
        .comments
        .iter()
        .filter(|p| !replica.entity.comments.iter().any(|c| c.id == p.id))
        .map(|p| p.id.clone())
        .collect()
}

/// Server 2019's History entries never change: each edit the other side made arrives as a new
/// entry that says which comment it replaces, under its own key (the original's id and the
/// new text's digest), so that it is added once however often the apply repeats. A deletion
/// is not carried.
fn edits_as_entries(plan: &workitem::Plan, replica: &Replica) -> Vec<workitem::WorkComment> {
    plan.comment_edits
        .iter()
        .filter_map(|c| {
            let remote = c.remote_id.as_deref()?;
            let original = replica.entity.comments.iter().find(|o| o.id == remote);
            let (who, when) = original.map_or(("", ""), |o| (o.author.display_name.as_str(), o.created.as_str()));
            let digest = crate::crypto::hex(&crate::crypto::sha256(c.body.as_bytes()));
            Some(workitem::WorkComment {
                id: None,
                remote_id: Some(format!("{remote}~edit-{}", &digest[..16])),
                body: format!(
                    "<p><i>Edited on the other side: this replaces the comment of {} by {}.</i></p>{}",
                    script::escape_html(when),
                    script::escape_html(who),
                    c.body
                ),
                ..c.clone()
            })
        })
        .collect()
}
