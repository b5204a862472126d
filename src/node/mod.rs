//! The node: the public end. It keeps the connection registry (invitations, credentials,
//! states), a pair of queues per connection, answers agents' long-polls and pushes
//! ([`server`]), and delivers agents' payloads to the public application's webhook.

pub mod leases;
pub mod moving;
pub mod registry;
pub mod server;
pub mod throttle;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};

use crate::config::Settings;
use crate::deliver::{self, Webhook};
use crate::error::{Kind, OpError, OpResult};
use crate::http::{self, StatusCode};
use crate::intake::{IntakeTarget, Refusal};
use crate::protocol::codes;
use crate::status::{ConnectionStatus, Health};
use crate::store::{AnyQueue, AnyStore, NodeQueue, NodeStore, Store};
use crate::sync::engine::{Engine, SyncLink};
use crate::sync::state::SyncState;
pub use registry::{Action, ConnectionRecord, InitiateRequest, Registry};

/// Live parts of one connection while the node runs.
pub struct Link {
    /// Connection name.
    pub name: String,
    /// Node → agent.
    pub outbox: AnyQueue,
    /// Agent → node, waiting for the webhook.
    pub inbox: AnyQueue,
    /// Counters.
    pub health: Arc<Health>,
    /// True while delivery flows (accepted and not deactivated).
    pub active_tx: watch::Sender<bool>,
    /// Set once revoked; parked polls see it when `active_tx` changes.
    pub revoked: AtomicBool,
    /// The largest payload the agent takes, as its last poll said (0: not known).
    pub agent_max_payload: AtomicU64,
}

impl Link {
    /// Takes the state of `rec` (the connection as the registry holds it): revoked for good,
    /// delivering or paused; parked polls and the delivery wake on a change.
    pub fn follow(&self, rec: &ConnectionRecord) {
        if rec.revoked {
            self.revoked.store(true, Ordering::SeqCst);
        }
        self.active_tx.send_if_modified(|active| {
            let changed = *active != rec.delivering();
            *active = rec.delivering();
            changed
        });
    }
}

struct Runtime {
    tracker: TaskTracker,
    token: CancellationToken,
    webhook_client: http::Client,
}

struct NodeInner {
    store: AnyStore,
    settings: Settings,
    registry: Registry,
    links: Mutex<HashMap<String, Arc<Link>>>,
    runtime: Mutex<Option<Runtime>>,
    public_url: Mutex<Option<String>>,
    pin: [u8; 32],
    sync: Option<Engine>,
}

/// The node's state: registry, queues and (while serving) live links. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

/// The sync engine of a side whose settings bind a tracker; `public` on the node.
pub fn sync_engine(store: &Store, settings: &Settings, public: bool) -> OpResult<Option<Engine>> {
    let Some(tracker) = &settings.tracker else {
        return Ok(None);
    };
    let state = SyncState::open(store)?;
    Ok(Some(Engine::new(
        tracker.clone(),
        state,
        settings.queue.max_payload_bytes as usize,
        public,
    )))
}

/// Queue names of a connection on the node.
pub fn queue_names(conn: &str) -> (String, String) {
    (format!("node/{conn}/to-agent"), format!("node/{conn}/from-agent"))
}

impl Node {
    /// Opens the node's registry in `store`; `pin` is the served certificate's SPKI hash.
    pub async fn open(store: AnyStore, settings: Settings, pin: [u8; 32]) -> OpResult<Node> {
        let registry = Registry::open(&store).await?;
        let public_url = settings.node.public_url.clone();
        let sync = match (&settings.tracker, store.sled()) {
            (Some(_), None) => {
                return Err(OpError::new(
                    Kind::Config,
                    "a node bound to a tracker keeps its sync state in sled: set store.kind = \"sled\", or remove \
                     [tracker] to deliver to a webhook",
                ))
            }
            (_, Some(sled)) => sync_engine(sled, &settings, true)?,
            (None, None) => None,
        };
        Ok(Node {
            inner: Arc::new(NodeInner {
                store,
                settings,
                registry,
                links: Mutex::new(HashMap::new()),
                runtime: Mutex::new(None),
                public_url: Mutex::new(public_url),
                pin,
                sync,
            }),
        })
    }

    /// The store.
    pub fn store(&self) -> &AnyStore {
        &self.inner.store
    }

    /// The sync engine, when this side has a tracker.
    pub fn sync(&self) -> Option<&Engine> {
        self.inner.sync.as_ref()
    }

    /// Settings in force.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The URL agents dial (as configured, or derived from the bound listener).
    pub fn public_url(&self) -> Option<String> {
        self.inner.public_url.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The served certificate's pin.
    pub fn pin(&self) -> [u8; 32] {
        self.inner.pin
    }

    async fn queues(&self, conn: &str) -> OpResult<(AnyQueue, AnyQueue)> {
        let (out, inb) = queue_names(conn);
        let limits = self.inner.settings.queue_limits();
        Ok((
            self.inner.store.queue(&out, limits).await?,
            self.inner.store.queue(&inb, limits).await?,
        ))
    }

    /// Creates a pending connection and returns its invitation code.
    pub async fn initiate(&self, req: InitiateRequest) -> OpResult<String> {
        let url = self.public_url().ok_or_else(|| {
            OpError::new(
                Kind::Config,
                "no public URL for invitation codes: set node.public_url (RELAY_NODE__PUBLIC_URL), or run initiate while `relay node run` runs",
            )
        })?;
        let ttl = req.expires.unwrap_or(self.inner.settings.node.invitation_ttl);
        let code = self.inner.registry.initiate(&req, &url, ttl, self.inner.pin).await?;
        self.queues(&req.name).await?;
        self.inner.store.flush().await?;
        info!(connection = %req.name, "connection initiated; invitation issued");
        Ok(code)
    }

    /// The queue of payloads from the agent of `name`, waiting for the webhook.
    pub async fn inbox(&self, name: &str) -> OpResult<AnyQueue> {
        if self.inner.registry.get(name).await?.is_none() {
            return Err(OpError::new(Kind::NotFound, format!("no connection named {name:?}")));
        }
        Ok(self.queues(name).await?.1)
    }

    /// The queue of payloads for the agent of `name`.
    pub async fn outbound_queue(&self, name: &str) -> OpResult<AnyQueue> {
        if self.inner.registry.get(name).await?.is_none() {
            return Err(OpError::new(Kind::NotFound, format!("no connection named {name:?}")));
        }
        Ok(self.queues(name).await?.0)
    }

    /// Every connection with its live state.
    pub async fn connections(&self) -> OpResult<Vec<ConnectionStatus>> {
        let records = self.inner.registry.list().await?;
        let mut out = Vec::with_capacity(records.len());
        for rec in records {
            let (outbox, inbox) = self.queues(&rec.name).await?;
            let link = self.link(&rec.name);
            let mut status = rec.status(outbox.stats().await?, inbox.stats().await?);
            status.deliver_to = status
                .deliver_to
                .or_else(|| self.inner.settings.node.deliver_to.clone());
            status.recent_dead_letters = inbox.dead_letters(crate::status::RECENT_DEAD_LETTERS).await?;
            if let Some(e) = &self.inner.sync {
                status.sync = Some(e.state().summary(&rec.name)?);
            }
            if let Some(link) = link {
                let live = Health::get(&link.health.last_contact_ms);
                if live > 0 {
                    status.last_contact_ms = Some(live);
                }
                status.last_error = link.health.last_error();
                status.holds = link.health.holds();
            }
            out.push(status);
        }
        Ok(out)
    }

    /// Deactivates, activates or revokes a connection.
    pub async fn set_state(&self, name: &str, action: Action) -> OpResult<ConnectionStatus> {
        // Durable when it returns, as every registry write.
        let rec = self.inner.registry.set_state(name, action).await?;
        // Make sure a link exists, so a redeem racing with this change cannot miss it. Not
        // before the node serves: a link made then would never start its worker, and serving
        // makes the links of every accepted connection from the registry as it is by then.
        let serving = self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if rec.accepted() && serving {
            let _ = self.ensure_link(&rec).await;
        }
        if let Some(link) = self.link(name) {
            link.follow(&rec);
        }
        info!(connection = %name, state = rec.state_name(), "connection state changed");
        let (outbox, inbox) = self.queues(name).await?;
        Ok(rec.status(outbox.stats().await?, inbox.stats().await?))
    }

    /// The live link of `name`, if serving.
    pub fn link(&self, name: &str) -> Option<Arc<Link>> {
        self.inner
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Creates (once) the live link of an accepted connection and starts its webhook worker.
    pub async fn ensure_link(&self, rec: &ConnectionRecord) -> OpResult<Arc<Link>> {
        if let Some(l) = self.link(&rec.name) {
            return Ok(l);
        }
        let (outbox, inbox) = self.queues(&rec.name).await?;
        let mut links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get(&rec.name) {
            return Ok(l.clone());
        }
        let (active_tx, active_rx) = watch::channel(rec.delivering());
        let link = Arc::new(Link {
            name: rec.name.clone(),
            outbox,
            inbox: inbox.clone(),
            health: Arc::new(Health::default()),
            active_tx,
            revoked: AtomicBool::new(rec.revoked),
            agent_max_payload: AtomicU64::new(0),
        });
        links.insert(rec.name.clone(), link.clone());
        drop(links);
        // On PostgreSQL the replica holding the connection's lease delivers (see `leases`).
        if matches!(self.inner.store, AnyStore::Postgres(_)) {
            return Ok(link);
        }
        let runtime = self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(engine), Some(rt), AnyQueue::Sled(outbox), AnyQueue::Sled(inbox)) =
            (&self.inner.sync, runtime.as_ref(), &link.outbox, &inbox)
        {
            // A node bound to a tracker runs on sled (see `sync_engine`).
            let sync = SyncLink {
                name: rec.name.clone(),
                project: rec.project.clone(),
                outbox: outbox.inner().clone(),
                inbox: inbox.inner().clone(),
                health: link.health.clone(),
            };
            engine.spawn(sync, active_rx, &rt.tracker, rt.token.child_token());
            return Ok(link);
        }
        if let Some(rt) = runtime.as_ref() {
            self.spawn_webhook(rt, rec, &link, inbox, rt.token.child_token());
        }
        Ok(link)
    }

    /// Starts the webhook worker of `link` on `inbox` until `token` is cancelled; says so when
    /// no webhook is configured.
    fn spawn_webhook(
        &self,
        rt: &Runtime,
        rec: &ConnectionRecord,
        link: &Arc<Link>,
        inbox: AnyQueue,
        token: CancellationToken,
    ) {
        let url = rec
            .deliver_to
            .clone()
            .or_else(|| self.inner.settings.node.deliver_to.clone());
        let Some(url) = url else {
            tracing::warn!(connection = %rec.name, "no webhook configured (initiate --deliver-to, or node.deliver_to): payloads from the agent are kept in the queue");
            return;
        };
        let hook = Webhook {
            url,
            connection: rec.name.clone(),
            project: Some(rec.project.clone()),
        };
        let span = tracing::info_span!("deliver", connection = %rec.name, side = "node");
        rt.tracker.spawn(
            deliver::run(
                inbox,
                hook,
                rt.webhook_client.clone(),
                self.inner.settings.delivery.clone(),
                link.active_tx.subscribe(),
                link.health.clone(),
                token,
            )
            .instrument(span),
        );
    }

    /// Serves agents on `agent_listener` (TLS with `tls`) and the local API on `api_listener`
    /// until `token` is cancelled; then drains and flushes.
    pub async fn serve(
        &self,
        agent_listener: TcpListener,
        api_listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        token: CancellationToken,
    ) -> OpResult<()> {
        // Before anything starts: a bad name or origin stops the daemon with nothing to undo.
        let api_addr = api_listener
            .local_addr()
            .map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
        let policy = self
            .inner
            .settings
            .api_policy(api_addr.ip())
            .map_err(|e| OpError::new(Kind::Config, e.to_string()))?;
        if let AnyStore::Postgres(pg) = &self.inner.store {
            leases::check_identity_patiently(pg, &self.inner.pin, &token).await?;
        }
        let tracker = TaskTracker::new();
        let (trust, ca_file) = self.inner.settings.delivery.web_trust();
        let webhook_tls =
            crate::tls::webhook_client_config(trust, ca_file).map_err(|e| OpError::new(Kind::Config, e.to_string()))?;
        let client = http::Client::webhook(webhook_tls, self.inner.settings.delivery.timeout);
        *self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner()) = Some(Runtime {
            tracker: tracker.clone(),
            token: token.clone(),
            webhook_client: client,
        });
        if self.public_url().is_none() {
            let addr = agent_listener
                .local_addr()
                .map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
            *self.inner.public_url.lock().unwrap_or_else(|p| p.into_inner()) = Some(derived_url(addr));
        }
        // A database that goes away now (restarting) does not stop a replica: agents are
        // served as they come, and the lease rounds start deliveries once it answers.
        let shared_database = matches!(self.inner.store, AnyStore::Postgres(_));
        let records = match self.inner.registry.list().await {
            Ok(records) => records,
            Err(e) if shared_database => {
                tracing::warn!(error = %e, "cannot read the connections yet; serving them as the database answers");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        for rec in records.iter().filter(|r| r.accepted()) {
            match self.ensure_link(rec).await {
                Ok(_) => {}
                Err(e) if shared_database => {
                    tracing::warn!(connection = %rec.name, error = %e, "cannot prepare the connection yet")
                }
                Err(e) => return Err(e),
            }
        }
        if let AnyStore::Postgres(pg) = &self.inner.store {
            let owner = leases::owner_name(&self.inner.settings.data_dir)?;
            info!(replica = %owner.1, "serving as one replica of the node on PostgreSQL");
            tracker.spawn(leases::run(self.clone(), pg.clone(), owner, token.clone()));
        }
        let node = self.clone();
        let t = token.clone();
        tracker.spawn(http::serve_with(
            agent_listener,
            http::ServerOptions {
                tls: Some(tls),
                max_connections: self.inner.settings.node.max_connections,
                name: "agents",
            },
            listener_limits(&self.inner.settings.node),
            move |req, _peer| server::handle(node.clone(), req, t.clone()),
            token.clone(),
        ));
        crate::intake::Intake::new(
            Arc::new(self.clone()),
            self.inner.store.clone(),
            &self.inner.settings,
            self.inner.settings.node.api_token.clone(),
            policy,
            token.clone(),
        )
        .spawn(&tracker, api_listener, "api", self.inner.settings.queue.idempotency_ttl);
        let storage_failure = tokio::select! {
            _ = token.cancelled() => None,
            reason = self.inner.store.failed() => Some(reason),
        };
        token.cancel();
        tracker.close();
        tracker.wait().await;
        if let Some(reason) = storage_failure {
            return Err(storage_stop(&reason));
        }
        self.inner.store.flush().await?;
        Ok(())
    }
}

/// The public listener's budgets and deadlines: every connection starts unauthenticated and
/// moves to the agents' budget (`max_connections`) once it presents a valid credential.
fn listener_limits(node: &crate::config::NodeSettings) -> http::ListenerLimits {
    http::ListenerLimits {
        idle_timeout: node.idle_timeout,
        ..http::ListenerLimits::public(
            node.unauthenticated_idle_timeout,
            node.max_unauthenticated_connections,
            node.max_unauthenticated_per_peer,
        )
    }
}

/// The error a daemon stops with after its database failed.
pub fn storage_stop(reason: &str) -> OpError {
    OpError::new(
        Kind::Failed,
        format!(
            "storage failed ({reason}); stopped so the supervisor can restart relay once the disk is fixed. \
             Everything accepted before the failure is still queued"
        ),
    )
}

/// `https://ADDR` for a bound listener, with a wildcard address replaced by loopback.
pub fn derived_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        ip => ip.to_string(),
    };
    format!("https://{ip}:{}", addr.port())
}

impl IntakeTarget for Node {
    fn outbox<'a>(&'a self, name: &'a str) -> crate::intake::BoxFuture<'a, Result<AnyQueue, Refusal>> {
        Box::pin(self.outbox_of(name))
    }

    fn max_payload(&self, name: &str) -> Option<usize> {
        let agent = self.link(name)?.agent_max_payload.load(Ordering::Relaxed);
        (agent > 0).then_some(agent as usize)
    }

    fn ready(&self) -> crate::intake::BoxFuture<'_, Result<String, String>> {
        Box::pin(self.ready_now())
    }

    fn sync(&self) -> Option<&crate::sync::engine::Engine> {
        self.inner.sync.as_ref()
    }

    fn metrics(&self) -> crate::intake::BoxFuture<'_, String> {
        Box::pin(self.metrics_now())
    }
}

impl Node {
    /// The outbox of connection `name`, or why a submission there is refused.
    async fn outbox_of(&self, name: &str) -> Result<AnyQueue, Refusal> {
        let revoked = || Refusal {
            status: StatusCode::CONFLICT,
            code: codes::CONNECTION_STATE,
            message: format!("connection {name:?} is revoked; it takes no new messages"),
        };
        let storage = |e: OpError| Refusal {
            status: StatusCode::INSUFFICIENT_STORAGE,
            code: codes::STORAGE,
            message: e.message,
        };
        // Every submission comes here: a live link answers without reading the registry.
        if let Some(link) = self.link(name) {
            if link.revoked.load(Ordering::SeqCst) {
                return Err(revoked());
            }
            return Ok(link.outbox.clone());
        }
        let Some(rec) = self.inner.registry.get(name).await.map_err(storage)? else {
            return Err(Refusal {
                status: StatusCode::NOT_FOUND,
                code: codes::UNKNOWN_CONNECTION,
                message: format!("no connection named {name:?}"),
            });
        };
        if rec.revoked {
            return Err(revoked());
        }
        self.queues(name).await.map(|(o, _)| o).map_err(storage)
    }

    /// `Ok` when serving, else every reason why not.
    async fn ready_now(&self) -> Result<String, String> {
        self.inner.store.check().map_err(|e| e.to_string())?;
        let statuses = self.connections().await.map_err(|e| e.message)?;
        let mut problems: Vec<String> = statuses
            .iter()
            .filter(|s| s.state == "active")
            .flat_map(|s| crate::status::stale_queues(s, self.inner.settings.queue.ready_max_age))
            .collect();
        // A webhook that refuses everyone holds delivery: say why.
        for s in &statuses {
            if let Some(link) = self.link(&s.name) {
                problems.extend(link.health.holds().into_iter().map(|h| format!("{}: {h}", s.name)));
            }
        }
        if problems.is_empty() {
            Ok(format!("serving {} connection(s)", statuses.len()))
        } else {
            Err(problems.join("; "))
        }
    }

    /// The node's metrics, as Prometheus text.
    async fn metrics_now(&self) -> String {
        let statuses = self.connections().await.unwrap_or_default();
        let links: Vec<Option<Arc<Link>>> = statuses.iter().map(|s| self.link(&s.name)).collect();
        let healths: Vec<Option<Arc<Health>>> = links.iter().map(|l| l.as_ref().map(|l| l.health.clone())).collect();
        let (commits, file_syncs) = self.inner.store.sync_counts();
        let store = crate::metrics::StoreFigures { commits, file_syncs };
        crate::metrics::render("node", &statuses, &healths, store)
    }
}
