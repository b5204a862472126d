//! Which replica delivers each connection's payloads, when the node's state is in PostgreSQL
//! and several replicas share it. Every replica serves every agent (polls and pushes are
//! answered from the database), but a connection's webhook delivery runs on one replica at a
//! time: the one holding the connection's lease. Each replica renews its leases every third of
//! `store.lease_ttl`, takes free or expired ones up to its share (the connections divided by
//! the replicas alive), gives up what is above its share so a new replica gets work, and stops
//! a delivery at once when its lease was taken over. Writes of a delivery are fenced by the
//! lease's epoch: a stalled former holder's late writes are refused.
//!
//! The same round refreshes each link's state from the registry (deactivated, revoked), which
//! an operator may have changed through another replica; a notification of the change
//! refreshes it at once.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ConnectionRecord, Node};
use crate::error::{Kind, OpError, OpResult};
use crate::store::postgres::PgStore;
use crate::store::{AnyQueue, Lease, NodeStore, NodeTable};

/// The table and key holding the SPKI pin of the key every replica must serve.
const IDENTITY_TABLE: &str = "node-identity";
const IDENTITY_KEY: &str = "pin";

/// This process's name in the leases: `{replica}/{host}-{pid}-{random}`, where the replica's
/// id is kept in its data directory (file `replica-id`), so a restarted replica recognises
/// the leases its former process held.
pub fn owner_name(data_dir: &std::path::Path) -> OpResult<(String, String)> {
    let path = data_dir.join("replica-id");
    let replica = match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => {
            let id = crate::crypto::hex(&crate::crypto::random_bytes::<8>());
            crate::fsutil::write_atomic(&path, format!("{id}\n").as_bytes())
                .map_err(|e| OpError::new(Kind::Failed, format!("cannot write {}: {e}", path.display())))?;
            id
        }
    };
    let owner = format!(
        "{replica}/{}-{}-{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id(),
        crate::crypto::hex(&crate::crypto::random_bytes::<2>())
    );
    Ok((replica, owner))
}

/// Refuses to serve a key other than the one the database's connections are pinned to (the
/// first replica's): every invitation carries that pin, and agents refuse any other key.
pub async fn check_identity(pg: &PgStore, pin: &[u8; 32]) -> OpResult<()> {
    let table = NodeStore::table(pg, IDENTITY_TABLE).await?;
    let mine = crate::tls::format_pin(pin).into_bytes();
    if table.compare_and_swap(IDENTITY_KEY, None, Some(mine.clone())).await? {
        info!("this database's node identity is now the key this replica serves");
        return Ok(());
    }
    match table.get_raw(IDENTITY_KEY).await? {
        Some(held) if held == mine => Ok(()),
        Some(held) => Err(OpError::new(
            Kind::Config,
            format!(
                "this replica serves the key with pin {}, but the database's connections are pinned to {} (the key \
                 the first replica served; every invitation carries it): start every replica with the same \
                 node.tls_cert and node.tls_key",
                String::from_utf8_lossy(&mine),
                String::from_utf8_lossy(&held)
            ),
        )),
        None => Err(OpError::new(
            Kind::Failed,
            "the node identity record vanished; start again",
        )),
    }
}

/// [`check_identity`], waiting for a database that does not answer now (restarting) rather
/// than stopping the replica; a refusal stops it.
pub async fn check_identity_patiently(pg: &PgStore, pin: &[u8; 32], token: &CancellationToken) -> OpResult<()> {
    loop {
        match check_identity(pg, pin).await {
            Err(e) if e.kind == Kind::Failed && !token.is_cancelled() => {
                warn!(error = %e.message, "cannot check the node identity yet; trying again");
                tokio::select! {
                    _ = token.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            other => return other,
        }
    }
}

/// A delivery this replica runs under a lease.
struct Held {
    lease: Lease,
    stop: CancellationToken,
}

/// Runs the lease rounds until `token` is cancelled, then gives the leases up so another
/// replica takes over at once.
pub async fn run(node: Node, pg: PgStore, (replica, owner): (String, String), token: CancellationToken) {
    let ttl = node.settings().store.lease_ttl;
    match pg.adopt_leases(&replica, &owner, ttl).await {
        Ok(0) => {}
        Ok(n) => info!(leases = n, "took back the leases this replica held before it restarted"),
        Err(e) => warn!(error = %e, "cannot take back this replica's former leases; they expire instead"),
    }
    let round = (ttl / 3).max(Duration::from_millis(500));
    let pin = crate::tls::format_pin(&node.pin());
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut changes = pg.record_changes();
    let mut tick = tokio::time::interval(round);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            change = changes.recv() => {
                match change {
                    Ok((table, name)) if table == "node-connections" => refresh_one(&node, &name).await,
                    Ok(_) => {}
                    // Missed some: the next round reads everything.
                    Err(_) => changes = pg.record_changes(),
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        if let Err(e) = lease_round(&node, &pg, &owner, &pin, ttl, &mut held, &token).await {
            warn!(error = %e, "lease round failed; deliveries this replica holds go on until their leases expire");
        }
    }
    for (_, h) in held.drain() {
        h.stop.cancel();
        if let Err(e) = pg.release_lease(&h.lease).await {
            warn!(connection = %h.lease.connection, error = %e, "cannot give up the lease; it expires instead");
        }
    }
}

/// One round: say this replica is alive, renew, stop what was lost, give up or take leases
/// to reach this replica's share, and refresh every link's state.
async fn lease_round(
    node: &Node,
    pg: &PgStore,
    owner: &str,
    pin: &str,
    ttl: Duration,
    held: &mut HashMap<String, Held>,
    token: &CancellationToken,
) -> OpResult<()> {
    let replicas = pg.heartbeat(owner, pin, ttl).await?;
    for (other, their_pin) in replicas.iter().filter(|(_, p)| p != pin) {
        error!(replica = %other, pin = %their_pin, "another replica serves another key: agents pinned to this database's key refuse it");
    }
    let renewed: HashMap<String, Lease> = pg
        .renew_leases(owner, ttl)
        .await?
        .into_iter()
        .map(|l| (l.connection.clone(), l))
        .collect();
    held.retain(|name, h| {
        let kept = renewed.get(name).is_some_and(|l| l.epoch == h.lease.epoch);
        if !kept {
            warn!(connection = %name, "the lease passed to another replica; this replica stops delivering it");
            h.stop.cancel();
        }
        kept
    });
    let records = node.inner.registry.list().await?;
    for rec in &records {
        if let Some(link) = node.link(&rec.name) {
            link.follow(rec);
        }
    }
    let mut deliverable: Vec<&ConnectionRecord> = records.iter().filter(|r| r.accepted() && !r.revoked).collect();
    // Each replica tries the connections in its own order, so they rarely race for one.
    deliverable.sort_by_key(|r| crate::crypto::sha256(format!("{owner}/{}", r.name).as_bytes()));
    let share = deliverable.len().div_ceil(replicas.len().max(1));
    while held.len() > share {
        let Some(name) = held.keys().next().cloned() else { break };
        if let Some(h) = held.remove(&name) {
            info!(connection = %name, share, "giving the lease up for another replica");
            h.stop.cancel();
            pg.release_lease(&h.lease).await?;
        }
    }
    for rec in deliverable {
        if held.len() >= share {
            break;
        }
        if held.contains_key(&rec.name) {
            continue;
        }
        let Some(lease) = pg.take_lease(&rec.name, owner, ttl).await? else {
            continue;
        };
        info!(connection = %rec.name, epoch = lease.epoch, "holding the lease: this replica delivers the connection");
        let stop = token.child_token();
        start_delivery(node, rec, &lease, stop.clone()).await?;
        held.insert(rec.name.clone(), Held { lease, stop });
    }
    Ok(())
}

/// Starts the webhook delivery of `rec` under `lease`.
async fn start_delivery(node: &Node, rec: &ConnectionRecord, lease: &Lease, stop: CancellationToken) -> OpResult<()> {
    let link = node.ensure_link(rec).await?;
    let inbox: AnyQueue = link.inbox.fenced(lease);
    let runtime = node.inner.runtime.lock().unwrap_or_else(|p| p.into_inner());
    let Some(rt) = runtime.as_ref() else {
        return Err(OpError::new(Kind::Failed, "the node is not serving"));
    };
    node.spawn_webhook(rt, rec, &link, inbox, stop);
    Ok(())
}

/// Reads connection `name` again after a change made on any replica.
async fn refresh_one(node: &Node, name: &str) {
    if let (Ok(Some(rec)), Some(link)) = (node.inner.registry.get(name).await, node.link(name)) {
        link.follow(&rec);
    }
}
