//! The operator's sync commands (`relay sync rules|bulk|item|errors|retry|resolve`), answered
//! by a running daemon over the admin socket or by the CLI on an opened data directory.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Kind, OpError, OpResult};
use crate::status::now_ms;
use crate::store::Store;
use crate::sync::engine::{self, Engine};
use crate::sync::replica::{self, Event, EventKind, Origin, Replica};
use crate::sync::state::{Side, SyncError, SyncState};
use crate::sync::{script, workitem, WorkItem};

/// A sync command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "sync", rename_all = "snake_case")]
pub enum SyncRequest {
    /// The connection's rules (the generated defaults until someone sets them).
    RulesShow {
        /// Connection.
        connection: String,
    },
    /// Compiles and stores the connection's rules.
    RulesSet {
        /// Connection.
        connection: String,
        /// Both scripts in one text.
        source: String,
        /// WIQL condition for the items to send; `None` keeps the current one.
        trigger: Option<String>,
        /// Forget the trigger: every item of the project.
        #[serde(default)]
        clear_trigger: bool,
    },
    /// Runs the scripts without writing anything.
    RulesTest {
        /// Connection.
        connection: String,
        /// A local item to run the outgoing script on.
        item: Option<u64>,
        /// A replica document to run the incoming script on.
        replica: Option<String>,
        /// Rules to try instead of the stored ones.
        source: Option<String>,
    },
    /// Sends every matching item not yet synced.
    Bulk {
        /// Connection.
        connection: String,
        /// Only count.
        dry_run: bool,
    },
    /// Sends one item now.
    Item {
        /// Connection.
        connection: String,
        /// Local work item id.
        id: u64,
    },
    /// Lists sync errors.
    Errors {
        /// One connection, or all.
        connection: Option<String>,
    },
    /// Lists fields items synced without.
    Warnings {
        /// One connection, or all.
        connection: Option<String>,
    },
    /// Retries an item's error.
    Retry {
        /// Connection.
        connection: String,
        /// The item as `relay sync errors` lists it.
        item: String,
        /// Which side's error, when the same id failed both ways.
        #[serde(default)]
        side: Option<Side>,
    },
    /// Drops an item's error and what waited behind it.
    Resolve {
        /// Connection.
        connection: String,
        /// The item as `relay sync errors` lists it.
        item: String,
        /// Which side's error, when the same id failed both ways.
        #[serde(default)]
        side: Option<Side>,
    },
}

/// What a sync command may use.
pub struct Context<'a> {
    /// The side's store.
    pub store: &'a Store,
    /// The engine, when the side has a tracker.
    pub engine: Option<&'a Engine>,
    /// Each connection's name and project.
    pub connections: Vec<(String, String)>,
}

impl Context<'_> {
    fn project(&self, conn: &str) -> OpResult<&str> {
        self.connections
            .iter()
            .find(|(n, _)| n == conn)
            .map(|(_, p)| p.as_str())
            .ok_or_else(|| OpError::new(Kind::NotFound, format!("no connection named {conn:?}")))
    }

    fn engine(&self) -> OpResult<&Engine> {
        self.engine.ok_or_else(|| {
            OpError::new(
                Kind::Config,
                "this side has no tracker: set [tracker] (url, token_file) in the config, or RELAY_TRACKER__URL",
            )
        })
    }

    fn state(&self) -> OpResult<SyncState> {
        match self.engine {
            Some(e) => Ok(e.state().clone()),
            None => Ok(SyncState::open(self.store)?),
        }
    }
}

/// Stores the default rules of a new connection (initiate, accept), unless it has rules.
pub fn ensure_default_rules(store: &Store, conn: &str, project: &str) -> OpResult<()> {
    let state = SyncState::open(store)?;
    if state.rules(conn)?.is_none() {
        state.set_rules(conn, &crate::sync::default_rules(project), None)?;
    }
    Ok(())
}

/// Answers one sync command.
pub async fn dispatch(ctx: Context<'_>, req: SyncRequest) -> OpResult<Value> {
    let state = ctx.state()?;
    let value = match req {
        SyncRequest::RulesShow { connection } => {
            let project = ctx.project(&connection)?;
            ensure_default_rules(ctx.store, &connection, project)?;
            json!(state.rules(&connection)?)
        }
        SyncRequest::RulesSet {
            connection,
            source,
            trigger,
            clear_trigger,
        } => {
            ctx.project(&connection)?;
            script::compile(&source).map_err(|e| OpError::new(Kind::Invalid, format!("rules not stored: {e}")))?;
            let trigger = match (clear_trigger, trigger) {
                (true, _) => None,
                (false, Some(t)) => Some(t),
                (false, None) => state.rules(&connection)?.and_then(|r| r.trigger),
            };
            state.set_rules(&connection, &source, trigger)?;
            state.flush().await?;
            if let Some(e) = ctx.engine {
                e.wake(Some(&connection));
            }
            json!(state.rules(&connection)?)
        }
        SyncRequest::RulesTest {
            connection,
            item,
            replica,
            source,
        } => test_rules(&ctx, &state, &connection, item, replica, source).await?,
        SyncRequest::Bulk { connection, dry_run } => json!(ctx.engine()?.bulk(&connection, dry_run).await?),
        SyncRequest::Item { connection, id } => json!(ctx.engine()?.sync_item(&connection, id).await?),
        SyncRequest::Errors { connection } => {
            if let Some(c) = &connection {
                ctx.project(c)?;
            }
            json!(state.errors(connection.as_deref())?)
        }
        SyncRequest::Warnings { connection } => {
            if let Some(c) = &connection {
                ctx.project(c)?;
            }
            json!(state.warnings(connection.as_deref())?)
        }
        SyncRequest::Retry { connection, item, side } => {
            ctx.project(&connection)?;
            let touched = engine::retry_or_resolve(&state, &connection, &item, side, false)?;
            state.flush().await?;
            if let Some(e) = ctx.engine {
                e.wake(Some(&connection));
            }
            json!(touched)
        }
        SyncRequest::Resolve { connection, item, side } => {
            ctx.project(&connection)?;
            let touched: Vec<SyncError> = engine::retry_or_resolve(&state, &connection, &item, side, true)?;
            state.flush().await?;
            json!(touched)
        }
    };
    Ok(value)
}

/// `relay sync rules test`: the outgoing script on a live item, the incoming script on a
/// replica document; prints what would be sent and written, writes nothing.
async fn test_rules(
    ctx: &Context<'_>,
    state: &SyncState,
    conn: &str,
    item: Option<u64>,
    replica_doc: Option<String>,
    source: Option<String>,
) -> OpResult<Value> {
    let project = ctx.project(conn)?.to_owned();
    let source = match source {
        Some(s) => s,
        None => match state.rules(conn)? {
            Some(r) => r.source,
            None => crate::sync::default_rules(&project),
        },
    };
    let engine = ctx.engine()?;
    let tracker = engine
        .tracker()
        .await
        .map_err(|e| OpError::new(Kind::Unreachable, e.to_string()))?;
    let types = tracker.work_item_types(&project).await.unwrap_or_default();
    let rules = script::compile(&source)
        .map_err(|e| OpError::new(Kind::Invalid, e.to_string()))?
        .with_local_types(crate::sync::states::LocalTypes::new(types));
    let mut out = serde_json::Map::new();
    let failed = |e: &dyn std::fmt::Display| OpError::new(Kind::Failed, e.to_string());
    if let Some(id) = item {
        let mut wi = tracker
            .read_item(id)
            .await
            .map_err(|e| failed(&e))?
            .ok_or_else(|| OpError::new(Kind::NotFound, format!("work item {id} does not exist")))?;
        let twin = state.twin_by_local(conn, id)?.map(|(_, t)| t).unwrap_or_default();
        engine::annotate(state, &mut wi, &twin);
        let entity = script::run_outgoing(&rules, &wi, twin.last_sent.as_ref()).map_err(|e| failed(&e))?;
        let rev = wi.rev.unwrap_or(0);
        let key = replica::idempotency_key(conn, &id.to_string(), rev);
        let r = Replica::new(
            Origin {
                instance: tracker.url().to_owned(),
                project: project.clone(),
                id,
                rev,
                url: String::new(),
                changed_at: crate::status::rfc3339(now_ms()),
            },
            Event {
                id: key,
                kind: EventKind::Upsert,
                twin: twin.remote.clone(),
                changed: None,
                acked: None,
            },
            entity,
        );
        let unchanged = twin.last_sent_hash.as_deref() == Some(r.hash.as_str());
        out.insert("replica".into(), json!(r));
        out.insert("unchanged_since_last_sent".into(), json!(unchanged));
    }
    if let Some(doc) = replica_doc {
        let r = Replica::parse(doc.as_bytes()).map_err(|e| OpError::new(Kind::Invalid, e.to_string()))?;
        let remote = r.origin.id.to_string();
        let twin = state.twin_by_remote(conn, &remote)?.map(|(_, t)| t).unwrap_or_default();
        let mut current = match twin.local {
            Some(id) => tracker.read_item(id).await.map_err(|e| failed(&e))?.unwrap_or_default(),
            None => WorkItem::default(),
        };
        engine::annotate(state, &mut current, &twin);
        let twins = engine::twins_for(state, conn, &r, &current)?;
        let desired = script::run_incoming_linked(
            &rules,
            &r,
            twin.last_received.as_ref(),
            &current,
            twin.local.is_none(),
            twins,
        )
        .map_err(|e| failed(&e))?;
        // Attachments not uploaded yet get a stand-in URL, so the patch shows their relation.
        let mut shown = desired.clone();
        for a in shown
            .attachments
            .iter_mut()
            .filter(|a| a.url.is_none() && a.id.is_none())
        {
            a.url = Some(format!("(upload of {})", a.filename));
        }
        tracker.fill_link_urls(&mut shown.links);
        let plan = workitem::build_patch(&current, &shown).map_err(|e| failed(&e))?;
        out.insert("local_item".into(), json!(twin.local));
        out.insert(
            "create".into(),
            json!(plan
                .create
                .as_ref()
                .map(|c| json!({"project": c.project, "type": c.type_name}))),
        );
        out.insert("patch".into(), plan.patch.clone().unwrap_or(Value::Null));
        out.insert(
            "comments_to_add".into(),
            json!(plan.comments.iter().map(|c| c.body.clone()).collect::<Vec<_>>()),
        );
        out.insert("nothing_to_write".into(), json!(plan.is_empty()));
    }
    if out.is_empty() {
        return Err(OpError::new(Kind::Invalid, "say --item ID, --replica FILE, or both"));
    }
    Ok(Value::Object(out))
}
