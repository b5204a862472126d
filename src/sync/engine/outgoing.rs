//! The outgoing half: read the tracker's reporting revisions feed from the stored watermark,
//! skip the revisions relay wrote itself, run the outgoing script on each changed item, and
//! queue the replica (after the chunks of any attachment the other side lacks) unless its
//! hash equals the last one sent.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Engine, ItemFailure, SyncLink, MAX_ATTACHMENT_BYTES};
use crate::crypto;
use crate::retry::Backoff;
use crate::status::{now_ms, rfc3339};
use crate::store::NewMessage;
use crate::sync::blob;
use crate::sync::inline;
use crate::sync::replica::Entity;
use crate::sync::replica::{self, Event, EventKind, Origin, Replica};
use crate::sync::script;
use crate::sync::state::{FileFacts, Side, SyncState, Twin, UploadedFile, Watermark};
use crate::tracker::{Tracker, TrackerError};

/// What exporting one item came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exported {
    /// A replica was queued.
    Sent,
    /// Its replica equals the last one sent: nothing queued.
    Unchanged,
    /// The item does not exist (any more) or left the project.
    Missing,
    /// The item has a sync error: it waits for `relay sync retry`.
    Waiting,
}

/// Runs the poller of one connection until `token` is cancelled.
pub async fn run(engine: Engine, link: SyncLink, mut wake: watch::Receiver<u64>, token: CancellationToken) {
    let Some(tracker) = engine.tracker_patiently(&link.health, &token).await else {
        return;
    };
    engine.learn_types(&tracker, &link.project).await;
    let interval = engine.settings().poll_interval;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return,
            r = wake.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(delay) => {}
        }
        retry_requested(&engine, &tracker, &link).await;
        export_deferred(&engine, &tracker, &link).await;
        delay = match read_feed(&engine, &tracker, &link).await {
            Ok(()) => {
                backoff.reset();
                interval
            }
            Err(failure) => {
                let (reason, after) = match failure {
                    ItemFailure::Transient { reason, after } => (reason, after),
                    ItemFailure::Item(reason) => (reason, None),
                };
                let d = backoff.next_delay(after);
                link.health.error(format!("reading the change feed: {reason}"));
                warn!(error = %reason, retry_in = ?d, "cannot read the change feed; retrying");
                d
            }
        };
    }
}

/// Exports the items whose outgoing errors the operator asked to retry.
async fn retry_requested(engine: &Engine, tracker: &Tracker, link: &SyncLink) {
    let errors = match engine.state().errors(Some(&link.name)) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot read sync errors");
            return;
        }
    };
    for e in errors.into_iter().filter(|e| e.retry && e.side == Side::Outgoing) {
        let Ok(id) = e.item.parse::<u64>() else { continue };
        match export(engine, tracker, link, id, true).await {
            Ok(_) => info!(item = id, "retried item synced"),
            Err(ItemFailure::Item(m)) => engine.fail(link, Side::Outgoing, &e.item, m, None),
            Err(ItemFailure::Transient { reason, .. }) => {
                warn!(item = id, error = %reason, "retry postponed");
                return;
            }
        }
    }
}

/// Exports the items that changed while they were relay's creates not linked yet, once they are.
async fn export_deferred(engine: &Engine, tracker: &Tracker, link: &SyncLink) {
    let state = engine.state();
    let Ok(ids) = state.deferred_exports(&link.name) else {
        return;
    };
    for id in ids {
        if !matches!(state.twin_by_local(&link.name, id), Ok(Some(_))) {
            continue;
        }
        match export(engine, tracker, link, id, false).await {
            Ok(_) => {}
            Err(ItemFailure::Item(m)) => engine.fail(link, Side::Outgoing, &id.to_string(), m, None),
            Err(ItemFailure::Transient { reason, .. }) => {
                warn!(item = id, error = %reason, "export of a newly linked item postponed");
                return;
            }
        }
        if let Err(e) = state.clear_deferred(&link.name, id) {
            warn!(error = %e, "cannot clear a deferred export");
        }
    }
}

/// Reads the feed to its end, exporting what changed; the watermark moves page by page once
/// the page's replicas are durable. Without a watermark (a new connection), the feed is read
/// from now to its end without exporting: existing items are `relay sync bulk`'s job, and the
/// project's history is not read at all.
async fn read_feed(engine: &Engine, tracker: &Tracker, link: &SyncLink) -> Result<(), ItemFailure> {
    let state = engine.state();
    let mut mark = state.watermark(&link.name)?;
    let fast_forward = mark.is_none();
    let start = fast_forward.then(now_ms);
    let trigger = state.rules(&link.name)?.and_then(|r| r.trigger);
    loop {
        let page = tracker
            .revisions(&link.project, mark.as_ref().map(|m| m.continuation.as_str()), start)
            .await?;
        if !fast_forward && !page.revisions.is_empty() {
            // An apply may have written some of these revisions and not yet recorded them.
            engine.applies_settled(&link.name).await;
            // The newest revision of each item in the page that relay did not write itself.
            let mut changed: BTreeMap<u64, u64> = BTreeMap::new();
            let mut twins: HashMap<u64, Option<Twin>> = HashMap::new();
            for r in &page.revisions {
                let twin = match twins.get(&r.id) {
                    Some(t) => t.clone(),
                    None => {
                        let t = state.twin_by_local(&link.name, r.id)?.map(|(_, t)| t);
                        twins.insert(r.id, t.clone());
                        t
                    }
                };
                if twin.is_some_and(|t| t.is_own(r.rev)) {
                    continue;
                }
                let e = changed.entry(r.id).or_default();
                *e = (*e).max(r.rev);
            }
            if let (Some(t), false) = (&trigger, changed.is_empty()) {
                let matching: std::collections::HashSet<u64> =
                    tracker.query_ids(&link.project, Some(t)).await?.into_iter().collect();
                changed.retain(|id, _| matching.contains(id));
            }
            for &id in changed.keys() {
                match export(engine, tracker, link, id, false).await {
                    Ok(_) => {}
                    Err(ItemFailure::Item(m)) => engine.fail(link, Side::Outgoing, &id.to_string(), m, None),
                    Err(t) => return Err(t),
                }
            }
            state.flush().await?;
        }
        let next = Watermark {
            continuation: page.continuation.clone(),
            read_ms: now_ms(),
        };
        state.set_watermark(&link.name, &next)?;
        mark = Some(next);
        if page.last {
            state.flush().await?;
            if fast_forward {
                info!(project = %link.project, "change feed read to its end: changes from now on are synced (relay sync bulk sends the existing items)");
            }
            return Ok(());
        }
    }
}

/// Turns local item `id` into a replica on the outbound queue (durable after the next flush).
/// With `force`, an unchanged item is sent again and an item with a sync error is retried.
pub async fn export(
    engine: &Engine,
    tracker: &Tracker,
    link: &SyncLink,
    id: u64,
    force: bool,
) -> Result<Exported, ItemFailure> {
    let conn = &link.name;
    let state = engine.state();
    let item_key = id.to_string();
    let had_error = state.error(conn, Side::Outgoing, &item_key)?;
    if had_error.as_ref().is_some_and(|e| !e.retry) && !force {
        return Ok(Exported::Waiting);
    }
    let Some(mut item) = tracker.read_item(id).await? else {
        return Ok(Exported::Missing);
    };
    if !item.project_key.eq_ignore_ascii_case(&link.project) {
        return Ok(Exported::Missing);
    }
    let found = state.twin_by_local(conn, id)?;
    if found.is_none() && item.hyperlinks.iter().any(|l| super::incoming::is_marker_of(l, conn)) {
        // Relay made this item for this connection and has not linked it yet (the create's
        // answer is late or was lost): the apply under way or its retry finds it by this
        // marker. A person may have changed it since: exported once the link exists.
        state.defer_export(conn, id)?;
        return Ok(Exported::Unchanged);
    }
    let (primary, twin) = found.unwrap_or_else(|| {
        let t = Twin {
            local: Some(id),
            ..Twin::default()
        };
        (SyncState::new_key(&t), t)
    });
    super::annotate(state, &mut item, &twin);
    // Attachments are described by their hash; bytes read once are kept for sending.
    let mut read: HashMap<String, Bytes> = HashMap::new();
    for a in &mut item.attachments {
        let (Some(aid), Some(url)) = (a.id.clone(), a.url.clone()) else {
            continue;
        };
        if a.remote_id.is_some() {
            continue;
        }
        match state.file_facts(&aid)? {
            Some(f) => {
                a.sha256 = f.sha256;
                a.size = f.size;
            }
            None => {
                let bytes = download(tracker, &a.filename, &url).await?;
                let facts = FileFacts {
                    sha256: crypto::hex(&crypto::sha256(&bytes)),
                    size: bytes.len() as u64,
                };
                state.set_file_facts(&aid, &facts)?;
                a.sha256 = facts.sha256.clone();
                a.size = facts.size;
                read.insert(facts.sha256, bytes);
            }
        }
    }
    let rules = engine.rules(conn, &link.project)?;
    let mut entity =
        script::run_outgoing(&rules, &item, twin.last_sent.as_ref()).map_err(|e| ItemFailure::Item(e.to_string()))?;
    let inline_files = outline(engine, tracker, &mut entity).await?;
    let hash = entity.hash();
    if !force && twin.base_hash() == Some(hash.as_str()) {
        if had_error.is_some() {
            state.clear_error(conn, Side::Outgoing, &item_key)?;
        }
        return Ok(Exported::Unchanged);
    }
    // The bytes go first, so the replica that needs them finds them on arrival.
    for (r, url, bytes) in inline_files {
        if !state.file_sent(conn, &r.sha256)? {
            let bytes = match bytes {
                Some(b) => b,
                None => download(tracker, &r.filename, &url).await?,
            };
            queue_file(engine, link, &r.filename, &bytes)?;
            state.set_file_sent(conn, &r.sha256)?;
        }
    }
    for a in &entity.attachments {
        if a.sha256.is_empty() || state.file_sent(conn, &a.sha256)? {
            continue;
        }
        let bytes = match read.remove(&a.sha256) {
            Some(b) => b,
            None => {
                let url = item
                    .attachments
                    .iter()
                    .find(|l| l.sha256 == a.sha256)
                    .and_then(|l| l.url.clone())
                    .ok_or_else(|| {
                        ItemFailure::Item(format!("attachment {:?} has no URL to read it from", a.filename))
                    })?;
                download(tracker, &a.filename, &url).await?
            }
        };
        queue_file(engine, link, &a.filename, &bytes)?;
        state.set_file_sent(conn, &a.sha256)?;
    }
    let rev = item.rev.unwrap_or(0);
    let key = replica::idempotency_key(conn, &item_key, rev);
    let changed_at = item
        .custom_fields
        .get("System.ChangedDate")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| rfc3339(now_ms()));
    let origin = Origin {
        instance: tracker.url().to_owned(),
        project: link.project.clone(),
        id,
        rev,
        url: format!(
            "{}/{}/_workitems/edit/{id}",
            tracker.url().trim_end_matches('/'),
            link.project.replace(' ', "%20")
        ),
        changed_at,
    };
    let event = Event {
        id: key.clone(),
        kind: EventKind::Upsert,
        twin: twin.remote.clone(),
        changed: twin.base().map(|base| entity.changed_since(base)),
        acked: twin.applied.last().cloned(),
    };
    // Each linked item's twin on the other side, where this side knows it: what the other side
    // finds the link's item by. Not part of what both sides agree on.
    let mut sent = entity.clone();
    for l in &mut sent.links {
        if let Ok(target) = l.key.parse::<u64>() {
            l.twin = state.twin_by_local(conn, target)?.and_then(|(_, t)| t.remote);
        }
    }
    let replica = Replica::new(origin, event, sent);
    replica.validate().map_err(|e| ItemFailure::Item(e.to_string()))?;
    link.outbox.append(
        NewMessage {
            id: key.clone(),
            content_type: replica::CONTENT_TYPE.into(),
            enqueued_at_ms: now_ms(),
            body: replica.to_bytes().into(),
        },
        Some(&key),
    )?;
    // An apply may have changed the record while this export read and downloaded: what the
    // export owns is written into the record as it is now, under the apply's lock.
    let lock = engine.apply_lock(conn);
    let _applying = lock.write().await;
    let read_base = twin.base().cloned();
    let (primary, mut twin) = state.twin_by_local(conn, id)?.unwrap_or((primary, twin));
    // An apply that landed meanwhile moved the agreed state by the fields it wrote; this
    // export moves it by the fields it sends.
    let agreed = match (twin.base(), &read_base) {
        (Some(now), Some(read)) if now != read => now.with_changes(read, &entity),
        _ => entity,
    };
    twin.sent(&replica.event.id, replica.event.changed.as_deref());
    twin.last_sent_hash = Some(hash);
    twin.last_sent = Some(replica);
    twin.last_out_ms = Some(now_ms());
    twin.agree(agreed);
    state.put_twin(conn, &primary, &twin)?;
    state.touch(conn, Side::Outgoing)?;
    if had_error.is_some() {
        state.clear_error(conn, Side::Outgoing, &item_key)?;
    }
    Ok(Exported::Sent)
}

/// Reads an attachment's bytes, streamed with a deadline on progress (a large file that keeps
/// coming is read to its end). A download refused for good (too large, gone) is this item's
/// sync error: the feed moves on, other items flow, and `relay sync retry` reads it again. A
/// tracker that does not answer now is retried with the page.
async fn download(tracker: &Tracker, filename: &str, url: &str) -> Result<Bytes, ItemFailure> {
    match tracker.download_attachment(url, MAX_ATTACHMENT_BYTES).await {
        Ok(b) => Ok(b),
        Err(e @ (TrackerError::Unreachable { .. } | TrackerError::Busy { .. } | TrackerError::Auth { .. })) => {
            Err(e.into())
        }
        // Larger than relay reads, unreadable, gone or refused: this file, not the tracker.
        Err(e) => Err(ItemFailure::Item(format!("cannot read attachment {filename:?}: {e}"))),
    }
}

/// Queues a file's bytes as checked chunks, under keys that make a repeat a no-op.
fn queue_file(engine: &Engine, link: &SyncLink, filename: &str, bytes: &[u8]) -> Result<(), ItemFailure> {
    for (h, body) in blob::split(filename, bytes, engine.chunk_bytes()) {
        let key = replica::idempotency_key(&link.name, &format!("file:{}", h.sha256), u64::from(h.index));
        link.outbox.append(
            NewMessage {
                id: key.clone(),
                content_type: replica::BLOB_CONTENT_TYPE.into(),
                enqueued_at_ms: now_ms(),
                body: body.into(),
            },
            Some(&key),
        )?;
    }
    Ok(())
}

/// Replaces each inline image of this tracker in the entity's HTML by a reference to its
/// bytes ([`inline::Reference`]); answers the files, with their URL and the bytes read now
/// (`None`: known from before). An image is also recorded as this side's copy of its bytes,
/// so the same reference coming back maps to it. URLs to other hosts stay as they are.
async fn outline(
    engine: &Engine,
    tracker: &Tracker,
    entity: &mut Entity,
) -> Result<Vec<(inline::Reference, String, Option<Bytes>)>, ItemFailure> {
    let state = engine.state();
    let sources: Vec<String> = inline::html_texts(entity)
        .iter()
        .flat_map(|t| inline::image_sources(t))
        .map(|(_, src)| src)
        .collect();
    let mut found: HashMap<String, inline::Reference> = HashMap::new();
    let mut files = Vec::new();
    let mut total = 0u64;
    for src in sources {
        if found.contains_key(&src) {
            continue;
        }
        let Some(aid) = tracker.attachment_id(&src).await else {
            continue;
        };
        let filename = inline::file_name(&src);
        let (facts, bytes) = match state.file_facts(&aid)? {
            Some(f) => (f, None),
            None => {
                let b = download(tracker, &filename, &src).await?;
                let f = FileFacts {
                    sha256: crypto::hex(&crypto::sha256(&b)),
                    size: b.len() as u64,
                };
                state.set_file_facts(&aid, &f)?;
                (f, Some(b))
            }
        };
        if state.uploaded(&facts.sha256)?.is_none() {
            state.set_uploaded(
                &facts.sha256,
                &UploadedFile {
                    id: aid,
                    url: src.clone(),
                },
            )?;
        }
        total += facts.size;
        if files.len() >= inline::MAX_FILES || total > inline::MAX_BYTES {
            return Err(ItemFailure::Item(format!(
                "the item's HTML fields hold more inline images than one item may carry ({} files, {} bytes at most); remove some, then retry this item",
                inline::MAX_FILES,
                inline::MAX_BYTES
            )));
        }
        let r = inline::Reference {
            sha256: facts.sha256,
            filename,
        };
        found.insert(src.clone(), r.clone());
        files.push((r, src, bytes));
    }
    if !found.is_empty() {
        for t in inline::html_texts(entity) {
            *t = inline::rewrite(t, |s| found.get(s).map(inline::Reference::to_src));
        }
    }
    Ok(files)
}
