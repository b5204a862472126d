//! The agent: the private end. It redeems invitations ([`Agent::accept`]), keeps the accepted
//! connections and their credentials, and runs one [`link`] per connection that only ever
//! dials out to the node.

pub mod link;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Secret, Settings};
use crate::crypto;
use crate::error::{Kind, OpError, OpResult};
use crate::http::{self, Method, StatusCode};
use crate::intake::{IntakeTarget, Refusal};
use crate::invite::Invitation;
use crate::protocol::{self, codes, RedeemRequest, RedeemResponse};
use crate::status::{now_ms, ConnectionStatus, Health};
use crate::store::{AnyQueue, Queue, Store, Table};

/// An accepted connection as the agent stores it (the credential lives in its own file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConnection {
    /// Local name of the connection.
    pub name: String,
    /// The connection's name on the node.
    pub node_connection: String,
    /// The node's URL.
    pub node_url: String,
    /// Pinned SPKI hash (hex), when the invitation carried one.
    pub pin: Option<String>,
    /// The node side's instance name.
    pub node_instance: String,
    /// What the node calls this side.
    pub local_instance: String,
    /// The instance name this agent reported.
    pub reported_instance: String,
    /// Description.
    pub description: String,
    /// Mode.
    pub mode: String,
    /// The public side's project for incoming sync.
    pub node_project: String,
    /// This side's project for incoming sync.
    pub project: String,
    /// Webhook for payloads from the node.
    pub deliver_to: Option<String>,
    /// When accepted (unix ms).
    pub accepted_at_ms: u64,
    /// Why the connection stopped for good, once the node revoked it.
    pub revoked: Option<String>,
    /// When it stopped (unix ms).
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
    /// The public id of the invitation it was accepted from (hex), so a container that is
    /// given the same invitation on every start knows it was accepted already.
    #[serde(default)]
    pub invitation_id: Option<String>,
}

impl AgentConnection {
    /// The pinned SPKI hash, when the invitation carried one.
    pub fn pin_bytes(&self) -> Option<[u8; 32]> {
        self.pin
            .as_deref()
            .and_then(crypto::from_hex)
            .and_then(|p| <[u8; 32]>::try_from(p).ok())
    }

    fn state_name(&self, paused: bool) -> &'static str {
        if self.revoked.is_some() {
            "revoked"
        } else if paused {
            "deactivated"
        } else {
            "active"
        }
    }
}

/// In the data directory: the id of an invitation the node refused when `relay run` offered
/// it, and why, so that later starts with the same invitation do not offer it again.
pub const REFUSED_INVITATION_FILE: &str = "refused-invitation";

/// Options of `relay accept`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AcceptOptions {
    /// Local connection name (default: the node's).
    pub name: Option<String>,
    /// Webhook for payloads from the node.
    pub deliver_to: Option<String>,
    /// This side's project for incoming sync.
    pub project: Option<String>,
}

/// What `relay accept` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    /// The stored connection.
    pub connection: AgentConnection,
}

/// Live parts of one connection.
pub struct LinkHandle {
    /// Counters.
    pub health: Arc<Health>,
    /// The node said "deactivated" in its last answer.
    pub paused: AtomicBool,
    /// The node's largest accepted payload (0 until a poll answer says).
    pub node_max_payload: std::sync::atomic::AtomicU64,
    /// Stops this connection's exchanges with the node.
    pub token: CancellationToken,
    /// Stops its webhook worker (at shutdown only: a revoked connection still delivers what
    /// it holds).
    pub deliver_token: CancellationToken,
}

struct Runtime {
    tracker: TaskTracker,
    token: CancellationToken,
    webhook_client: http::Client,
    /// Cancelled when no connection is left running after a revocation.
    all_revoked: CancellationToken,
}

struct AgentInner {
    store: Store,
    settings: Settings,
    connections: Table,
    nonces: Table,
    links: Mutex<HashMap<String, Arc<LinkHandle>>>,
    runtime: Mutex<Option<Runtime>>,
    sync: Option<crate::sync::engine::Engine>,
}

/// The agent's state. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

/// How often `relay run` tries to redeem a container's invitation before it gives up.
const START_ACCEPT_ATTEMPTS: u32 = 5;

/// Queue names of a connection on the agent.
pub fn queue_names(conn: &str) -> (String, String) {
    (format!("agent/{conn}/to-node"), format!("agent/{conn}/from-node"))
}

/// Why a redemption failed.
fn accept_error(e: http::ClientError, url: &str) -> OpError {
    let text = e.to_string();
    if let Some(at) = text
        .find("certificate pin mismatch")
        .or_else(|| text.find("certificate not trusted"))
    {
        return OpError::new(
            Kind::Invitation,
            format!(
                "refusing {url}: it is not the node that issued this invitation: {}",
                &text[at..]
            ),
        );
    }
    OpError::new(Kind::Unreachable, format!("cannot reach the node at {url}: {text}"))
}

impl Agent {
    /// Opens the agent's tables in `store`.
    pub fn open(store: Store, settings: Settings) -> OpResult<Agent> {
        Ok(Agent {
            inner: Arc::new(AgentInner {
                connections: store.table("agent-connections")?,
                nonces: store.table("agent-redeem-nonces")?,
                sync: crate::node::sync_engine(&store, &settings, false)?,
                store,
                settings,
                links: Mutex::new(HashMap::new()),
                runtime: Mutex::new(None),
            }),
        })
    }

    /// Settings in force.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The sync engine, when this side has a tracker.
    pub fn sync(&self) -> Option<&crate::sync::engine::Engine> {
        self.inner.sync.as_ref()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    fn credential_path(&self, name: &str) -> PathBuf {
        self.inner
            .settings
            .data_dir
            .join("credentials")
            .join(format!("{name}.cred"))
    }

    /// Reads a connection's credential.
    pub fn credential(&self, name: &str) -> OpResult<Secret> {
        let path = self.credential_path(name);
        std::fs::read_to_string(&path)
            .map(|s| Secret::new(s.trim()))
            .map_err(|e| {
                OpError::new(
                    Kind::Config,
                    format!("cannot read the credential {}: {e}", path.display()),
                )
            })
    }

    fn queues(&self, name: &str) -> OpResult<(Queue, Queue)> {
        let (out, inb) = queue_names(name);
        let limits = self.inner.settings.queue_limits();
        Ok((
            self.inner.store.queue(&out, limits)?,
            self.inner.store.queue(&inb, limits)?,
        ))
    }

    /// The queue of payloads from the node on `name`, waiting for the webhook.
    pub fn inbox(&self, name: &str) -> OpResult<Queue> {
        if self.get(name)?.is_none() {
            return Err(OpError::new(Kind::NotFound, format!("no connection named {name:?}")));
        }
        Ok(self.queues(name)?.1)
    }

    /// The queue of payloads for the node on `name`.
    pub fn outbound_queue(&self, name: &str) -> OpResult<Queue> {
        if self.get(name)?.is_none() {
            return Err(OpError::new(Kind::NotFound, format!("no connection named {name:?}")));
        }
        Ok(self.queues(name)?.0)
    }

    /// Every connection.
    pub fn list(&self) -> OpResult<Vec<AgentConnection>> {
        Ok(self.inner.connections.list()?.into_iter().map(|(_, v)| v).collect())
    }

    /// A connection by name.
    pub fn get(&self, name: &str) -> OpResult<Option<AgentConnection>> {
        Ok(self.inner.connections.get(name)?)
    }

    /// Redeems `invitation` at its node and stores the connection and its credential. When
    /// the agent is running, the connection starts at once.
    pub async fn accept(&self, invitation: &Invitation, opts: AcceptOptions) -> OpResult<Accepted> {
        invitation
            .check_expiry(now_ms() / 1000)
            .map_err(|e| OpError::new(Kind::Invitation, e.to_string()))?;
        let invalid = |m: String| OpError::new(Kind::Invalid, m);
        if let Some(name) = &opts.name {
            crate::names::check_connection_name(name).map_err(invalid)?;
            self.check_name_free(name)?;
        }
        if let Some(url) = &opts.deliver_to {
            crate::config::check_webhook_url(url).map_err(invalid)?;
        }
        if let Some(p) = &opts.project {
            crate::names::check_label("--project", p, true).map_err(invalid)?;
        }
        if self.inner.sync.is_some() && opts.project.as_deref().is_none_or(str::is_empty) {
            return Err(invalid(
                "this side syncs with its tracker ([tracker] is set): give the project for incoming work items with --project".into(),
            ));
        }
        // The same nonce on every attempt for this invitation makes a lost answer retryable.
        let id = invitation.id_hex();
        let nonce = match self.inner.nonces.get::<String>(&id)? {
            Some(n) => n,
            None => {
                let n = crypto::random_id();
                self.inner.nonces.put(&id, &n)?;
                self.inner.store.flush().await?;
                n
            }
        };
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let instance = self
            .inner
            .settings
            .agent
            .instance_name
            .clone()
            .unwrap_or_else(|| host.clone());
        let request = RedeemRequest {
            version: protocol::PROTOCOL_VERSION,
            invitation_id: id.clone(),
            secret: invitation.secret.to_vec(),
            client_nonce: nonce,
            instance_name: instance.clone(),
            host,
        };
        let resp = self.redeem(invitation, &request).await?;
        let name = opts.name.clone().unwrap_or_else(|| resp.connection.clone());
        crate::names::check_connection_name(&name).map_err(invalid)?;
        self.check_name_free(&name)?;
        let conn = AgentConnection {
            name: name.clone(),
            node_connection: resp.connection.clone(),
            node_url: invitation.url.clone(),
            pin: invitation.pin.map(|p| crypto::hex(&p)),
            node_instance: resp.node_instance.clone(),
            local_instance: resp.remote_instance.clone(),
            reported_instance: instance,
            description: resp.description.clone(),
            mode: resp.mode.clone(),
            node_project: resp.project.clone(),
            project: opts.project.clone().unwrap_or_default(),
            deliver_to: opts.deliver_to.clone(),
            accepted_at_ms: now_ms(),
            revoked: None,
            revoked_at_ms: None,
            invitation_id: Some(id.clone()),
        };
        let dir = self.inner.settings.data_dir.join("credentials");
        crate::fsutil::create_private_dir(&dir)
            .and_then(|_| crate::fsutil::write_private(&self.credential_path(&name), resp.credential.as_bytes()))
            .map_err(|e| {
                OpError::new(
                    Kind::Failed,
                    format!("cannot store the credential in {}: {e}", dir.display()),
                )
            })?;
        self.inner.connections.put(&name, &conn)?;
        self.inner.nonces.remove(&id)?;
        self.queues(&name)?;
        self.inner.store.flush().await?;
        info!(connection = %name, node = %conn.node_url, "invitation accepted; connection active");
        self.start_link(&conn);
        Ok(Accepted { connection: conn })
    }

    /// The connection accepted from `invitation` earlier, if any.
    pub fn accepted_from(&self, invitation: &Invitation) -> OpResult<Option<AgentConnection>> {
        let id = invitation.id_hex();
        Ok(self
            .list()?
            .into_iter()
            .find(|c| c.invitation_id.as_deref() == Some(id.as_str())))
    }

    /// Accepts `invitation` (named by `source` in messages, e.g. `RELAY_INVITATION`) unless
    /// a connection came from it already: a container is given the same invitation on every
    /// start, and the code works once. The connection uses `agent.deliver_to` as configured at
    /// each start. A node that cannot be reached is retried a few times with backoff; after
    /// that the error goes to the supervisor, which restarts the process. `Ok(None)` when
    /// `token` was cancelled first.
    pub async fn accept_once(
        &self,
        invitation: &Invitation,
        source: &str,
        options: AcceptOptions,
        token: &CancellationToken,
    ) -> OpResult<Option<AgentConnection>> {
        if let Some(conn) = self.accepted_from(invitation)? {
            info!(connection = %conn.name, "the invitation in {source} was accepted before; not redeeming it again");
            return Ok(Some(conn));
        }
        let settings = &self.inner.settings;
        // A restart policy starts a refused container again and again: answer from the note
        // the first refusal left, without asking the node each time.
        let refused_note = settings.data_dir.join(REFUSED_INVITATION_FILE);
        let id = invitation.id_hex();
        if let Ok(note) = std::fs::read_to_string(&refused_note) {
            if let Some((noted, reason)) = note.split_once('\n') {
                if noted == id {
                    return Err(OpError::new(
                        Kind::Invitation,
                        format!(
                            "cannot accept the invitation in {source}: {} (the node refused it on an earlier start, \
                             so it is not tried again; give this agent a new invitation)",
                            reason.trim()
                        ),
                    ));
                }
            }
        }
        let mut backoff = crate::retry::Backoff::new(settings.delivery.backoff_initial, settings.delivery.backoff_max);
        let mut attempt = 1;
        loop {
            let result = tokio::select! {
                r = self.accept(invitation, options.clone()) => r,
                // Safe to abandon: the redeem nonce is on disk, so a later start retries it.
                _ = token.cancelled() => return Ok(None),
            };
            let e = match result {
                Ok(accepted) => return Ok(Some(accepted.connection)),
                Err(e) => e,
            };
            let prefix = format!("cannot accept the invitation in {source}");
            match e.kind {
                Kind::Unreachable | Kind::Failed if attempt < START_ACCEPT_ATTEMPTS => {
                    let delay = backoff.next_delay(None);
                    let shown = Duration::from_millis(delay.as_millis() as u64);
                    warn!(
                        error = %e,
                        "{prefix} (attempt {attempt} of {START_ACCEPT_ATTEMPTS}); retrying in {shown:?}"
                    );
                    if !crate::retry::sleep(delay, token).await {
                        return Ok(None);
                    }
                    attempt += 1;
                }
                // A name clash does not go away by restarting: say so with the exit code.
                Kind::Conflict => return Err(OpError::new(Kind::Config, format!("{prefix}: {}", e.message))),
                Kind::Invitation => {
                    if let Err(write) =
                        crate::fsutil::write_atomic(&refused_note, format!("{id}\n{}\n", e.message).as_bytes())
                    {
                        warn!(error = %write, "cannot note the refused invitation in {}", refused_note.display());
                    }
                    return Err(OpError::new(Kind::Invitation, format!("{prefix}: {}", e.message)));
                }
                kind => return Err(OpError::new(kind, format!("{prefix}: {}", e.message))),
            }
        }
    }

    fn check_name_free(&self, name: &str) -> OpResult<()> {
        match self.get(name)? {
            Some(existing) if existing.revoked.is_some() => Err(OpError::new(
                Kind::Conflict,
                format!("a revoked connection named {name:?} still holds its queue; accept under another --name"),
            )),
            Some(_) => Err(OpError::new(
                Kind::Conflict,
                format!("a connection named {name:?} already exists; accept under another --name"),
            )),
            None => Ok(()),
        }
    }

    async fn redeem(&self, invitation: &Invitation, request: &RedeemRequest) -> OpResult<RedeemResponse> {
        let a = &self.inner.settings.agent;
        let tls = crate::tls::node_client_config(invitation.pin, a.trust, a.ca_file.as_deref())
            .map_err(|e| OpError::new(Kind::Config, e.to_string()))?;
        let timeout = self.inner.settings.agent.request_timeout;
        let client = http::Client::https_only(tls, timeout, &self.inner.settings.proxy_config());
        let url = format!("{}{}", invitation.url, protocol::REDEEM_PATH);
        let body = protocol::encode(request).map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
        let mut backoff = crate::retry::Backoff::new(Duration::from_millis(300), Duration::from_secs(3));
        let mut attempt = 0;
        let reply = loop {
            attempt += 1;
            let req = http::request(
                Method::POST,
                &url,
                &[
                    ("content-type", protocol::CONTENT_TYPE),
                    (protocol::VERSION_HEADER, "1"),
                ],
                body.clone(),
            )
            .map_err(|e| OpError::new(Kind::Invitation, format!("the invitation's URL is unusable: {e}")))?;
            match client.send(req, timeout, 64 * 1024).await {
                Ok(r) if r.status.is_server_error() && attempt < 3 => {}
                Ok(r) => break r,
                Err(e) => {
                    let err = accept_error(e, &invitation.url);
                    // A wrong pin will not fix itself; a network hiccup might.
                    if err.kind == Kind::Invitation || attempt >= 3 {
                        return Err(err);
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay(None)).await;
        };
        if reply.status == StatusCode::OK {
            let resp: RedeemResponse = protocol::decode("redeem response", &reply.body)
                .map_err(|e| OpError::new(Kind::Failed, format!("the node's answer is not understood: {e}")))?;
            protocol::check_version(resp.version).map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
            return Ok(resp);
        }
        let (code, message) = match reply.error_body() {
            Some(b) => (b.code, b.error),
            None => (String::new(), format!("the node answered {}", reply.status)),
        };
        let kind = match code.as_str() {
            codes::WRONG_SECRET
            | codes::LOCKED
            | codes::EXPIRED
            | codes::ALREADY_REDEEMED
            | codes::UNKNOWN_INVITATION
            | codes::REVOKED => Kind::Invitation,
            _ => Kind::Failed,
        };
        Err(OpError::new(
            kind,
            format!("the node refused the invitation: {message}"),
        ))
    }

    /// Status of every connection.
    pub fn status(&self) -> OpResult<Vec<ConnectionStatus>> {
        let mut out = Vec::new();
        for conn in self.list()? {
            let (outbox, inbox) = self.queues(&conn.name)?;
            let link = self.link(&conn.name);
            let paused = link.as_ref().is_some_and(|l| l.paused.load(Ordering::Relaxed));
            let live_contact = link
                .as_ref()
                .map(|l| Health::get(&l.health.last_contact_ms))
                .filter(|t| *t > 0);
            let last_error = match &conn.revoked {
                Some(reason) => Some(crate::status::LastError {
                    at_ms: conn.revoked_at_ms.unwrap_or(conn.accepted_at_ms),
                    message: reason.clone(),
                }),
                None => link.as_ref().and_then(|l| l.health.last_error()),
            };
            out.push(ConnectionStatus {
                name: conn.name.clone(),
                state: conn.state_name(paused).to_owned(),
                local: conn.local_instance.clone(),
                remote: format!("{} ({})", conn.node_instance, conn.node_url),
                description: conn.description.clone(),
                mode: conn.mode.clone(),
                project: conn.project.clone(),
                deliver_to: conn
                    .deliver_to
                    .clone()
                    .or_else(|| self.inner.settings.agent.deliver_to.clone()),
                last_contact_ms: live_contact.or(Some(conn.accepted_at_ms)),
                outbound: outbox.stats(),
                inbound: inbox.stats(),
                last_error,
                invitation_expires_at: None,
                recent_dead_letters: inbox.dead_letters(crate::status::RECENT_DEAD_LETTERS)?,
                trust: Some(self.trust_of(&conn)),
                route: Some(self.route_shown(&conn.node_url)),
                holds: link.as_ref().map(|l| l.health.holds()).unwrap_or_default(),
                sync: match &self.inner.sync {
                    Some(e) => Some(e.state().summary(&conn.name)?),
                    None => None,
                },
            });
        }
        Ok(out)
    }

    /// How this agent trusts the node of `conn`.
    pub fn trust_of(&self, conn: &AgentConnection) -> String {
        let a = &self.inner.settings.agent;
        crate::tls::describe_trust(conn.pin_bytes(), a.trust, a.ca_file.as_deref())
    }

    /// How the agent reaches `url`, for status: directly, or through which proxy and how the
    /// last tunnel through it was authenticated.
    fn route_shown(&self, url: &str) -> String {
        let route = self.route_to(url);
        let handshake = match &route {
            http::Route::Proxy { proxy, .. } => http::last_proxy_handshake(proxy),
            http::Route::Direct => None,
        };
        match handshake {
            Some(handshake) => format!("{route} ({handshake})"),
            None => route.to_string(),
        }
    }

    /// How the agent reaches `url`: directly or through which proxy.
    pub fn route_to(&self, url: &str) -> http::Route {
        http::ProxyConnector::for_config(&self.inner.settings.proxy_config()).route_to(url)
    }

    fn link(&self, name: &str) -> Option<Arc<LinkHandle>> {
        self.inner
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Marks a connection revoked (persisted) and stops its tasks; its queues stay.
    pub async fn mark_revoked(&self, name: &str, reason: &str) {
        let message =
            format!("stopped: {reason}. The queues are kept; accept a new invitation (under another --name) to resume");
        tracing::error!(connection = %name, "{message}");
        if let Ok(Some(mut conn)) = self.get(name) {
            conn.revoked = Some(message);
            conn.revoked_at_ms = Some(now_ms());
            let _ = self.inner.connections.put(name, &conn);
            let _ = self.inner.store.flush().await;
        }
        if let Some(link) = self.link(name) {
            link.token.cancel();
        }
        let any_running = self
            .list()
            .map(|l| l.iter().any(|c| c.revoked.is_none()))
            .unwrap_or(true);
        if !any_running {
            if let Some(rt) = self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                rt.all_revoked.cancel();
            }
        }
    }

    /// Payloads revoked connections still hold for a webhook that can take them.
    fn revoked_backlog(&self) -> u64 {
        let has_webhook =
            |c: &AgentConnection| c.deliver_to.is_some() || self.inner.settings.agent.deliver_to.is_some();
        self.list()
            .unwrap_or_default()
            .iter()
            .filter(|c| c.revoked.is_some() && has_webhook(c))
            .filter_map(|c| self.queues(&c.name).ok())
            .map(|(_, inbox)| inbox.stats().depth)
            .sum()
    }

    fn start_link(&self, conn: &AgentConnection) {
        let runtime = self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rt) = runtime.as_ref() else { return };
        let mut links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
        if links.contains_key(&conn.name) {
            return;
        }
        let handle = Arc::new(LinkHandle {
            health: Arc::new(Health::default()),
            paused: AtomicBool::new(false),
            node_max_payload: std::sync::atomic::AtomicU64::new(0),
            token: rt.token.child_token(),
            deliver_token: rt.token.child_token(),
        });
        if conn.revoked.is_some() {
            handle.token.cancel();
        }
        links.insert(conn.name.clone(), handle.clone());
        link::spawn(
            self.clone(),
            conn.clone(),
            handle,
            &rt.tracker,
            rt.webhook_client.clone(),
        );
    }

    /// Runs every accepted connection and the intake API on `intake_listener` until `token`
    /// is cancelled. Returns `Err(Revoked)` when revocations leave no connection running.
    pub async fn run(&self, intake_listener: TcpListener, token: CancellationToken) -> OpResult<()> {
        // Before anything starts: a bad name or origin stops the daemon with nothing to undo.
        let intake_addr = intake_listener
            .local_addr()
            .map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
        let policy = self
            .inner
            .settings
            .intake_policy(intake_addr.ip())
            .map_err(|e| OpError::new(Kind::Config, e.to_string()))?;
        let tracker = TaskTracker::new();
        let (trust, ca_file) = self.inner.settings.delivery.web_trust();
        let webhook_tls =
            crate::tls::webhook_client_config(trust, ca_file).map_err(|e| OpError::new(Kind::Config, e.to_string()))?;
        let all_revoked = CancellationToken::new();
        *self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner()) = Some(Runtime {
            tracker: tracker.clone(),
            token: token.clone(),
            webhook_client: http::Client::webhook(webhook_tls, self.inner.settings.delivery.timeout),
            all_revoked: all_revoked.clone(),
        });
        let connections = self.list()?;
        if !connections.is_empty() && connections.iter().all(|c| c.revoked.is_some()) {
            if self.revoked_backlog() == 0 {
                return Err(OpError::new(
                    Kind::Revoked,
                    "every connection of this agent was revoked by its node; accept a new invitation",
                ));
            }
            // Deliver what the revoked connections still hold, then stop.
            all_revoked.cancel();
        }
        if connections.is_empty() {
            warn!("no accepted connection yet: run `relay accept CODE`; the agent picks it up without a restart");
        }
        for conn in &connections {
            self.start_link(conn);
        }
        crate::intake::Intake::new(
            Arc::new(self.clone()),
            crate::store::AnyStore::Sled(self.inner.store.clone()),
            &self.inner.settings,
            self.inner.settings.agent.api_token.clone(),
            policy,
            token.clone(),
        )
        .spawn(
            &tracker,
            intake_listener,
            "intake",
            self.inner.settings.queue.idempotency_ttl,
        );
        let (mut revoked, mut storage_failure) = tokio::select! {
            biased;
            _ = token.cancelled() => (false, None),
            reason = self.inner.store.failed() => (false, Some(reason)),
            _ = all_revoked.cancelled() => (true, None),
        };
        if revoked {
            // Payloads the node handed over before revoking are still delivered first.
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while self.revoked_backlog() > 0 {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => { revoked = false; break }
                    reason = self.inner.store.failed() => { storage_failure = Some(reason); break }
                    _ = tick.tick() => {}
                }
            }
        }
        token.cancel();
        tracker.close();
        tracker.wait().await;
        if let Some(reason) = storage_failure {
            return Err(crate::node::storage_stop(&reason));
        }
        self.inner.store.flush().await?;
        if revoked {
            return Err(OpError::new(
                Kind::Revoked,
                "every connection of this agent has been revoked by its node; stopping",
            ));
        }
        Ok(())
    }
}

impl IntakeTarget for Agent {
    fn outbox<'a>(&'a self, name: &'a str) -> crate::intake::BoxFuture<'a, Result<AnyQueue, Refusal>> {
        let store = self.inner.store.clone();
        Box::pin(std::future::ready(
            self.outbox_now(name)
                .map(|q| AnyQueue::Sled(crate::store::SledQueue::new(store, q))),
        ))
    }

    fn max_payload(&self, name: &str) -> Option<usize> {
        let node = self.link(name)?.node_max_payload.load(Ordering::Relaxed);
        (node > 0).then_some(node as usize)
    }

    fn ready(&self) -> crate::intake::BoxFuture<'_, Result<String, String>> {
        Box::pin(std::future::ready(self.ready_now()))
    }

    fn sync(&self) -> Option<&crate::sync::engine::Engine> {
        self.inner.sync.as_ref()
    }

    fn metrics(&self) -> crate::intake::BoxFuture<'_, String> {
        Box::pin(std::future::ready(self.metrics_now()))
    }
}

impl Agent {
    /// The outbox of connection `name`, or why a submission there is refused.
    fn outbox_now(&self, name: &str) -> Result<Queue, Refusal> {
        let storage = |e: OpError| Refusal {
            status: StatusCode::INSUFFICIENT_STORAGE,
            code: codes::STORAGE,
            message: e.message,
        };
        let Some(conn) = self.get(name).map_err(storage)? else {
            return Err(Refusal {
                status: StatusCode::NOT_FOUND,
                code: codes::UNKNOWN_CONNECTION,
                message: format!("no connection named {name:?}"),
            });
        };
        if conn.revoked.is_some() {
            return Err(Refusal {
                status: StatusCode::CONFLICT,
                code: codes::CONNECTION_STATE,
                message: format!("connection {name:?} was revoked by the node; it takes no new messages"),
            });
        }
        self.queues(name).map(|(o, _)| o).map_err(storage)
    }

    /// `Ok` when connected and delivering, else every reason why not.
    fn ready_now(&self) -> Result<String, String> {
        self.inner.store.check().map_err(|e| e.to_string())?;
        let silence = self.inner.settings.agent.ready_max_silence.as_millis() as u64;
        let statuses = self.status().map_err(|e| e.message)?;
        let mut problems = Vec::new();
        for s in statuses.iter().filter(|s| s.state != "revoked") {
            let link = self.link(&s.name);
            let contact = link
                .as_ref()
                .map(|l| Health::get(&l.health.last_contact_ms))
                .unwrap_or(0);
            // What holds the connection (unknown credential, sequence conflict, a webhook that
            // refuses everyone) says why it is not delivering.
            if let Some(l) = &link {
                problems.extend(l.health.holds().into_iter().map(|h| format!("{}: {h}", s.name)));
            }
            if contact == 0 {
                problems.push(format!("{}: not connected to the node yet", s.name));
            } else if now_ms().saturating_sub(contact) > silence {
                problems.push(format!(
                    "{}: no contact with the node for {}",
                    s.name,
                    crate::status::ago(contact, now_ms())
                ));
            }
            if s.state == "active" {
                problems.extend(crate::status::stale_queues(s, self.inner.settings.queue.ready_max_age));
            }
        }
        // An agent that delivers nothing is not ready, whatever else holds: an orchestrator
        // must neither route to it nor consider it healthy before `relay accept`.
        if statuses.is_empty() {
            problems.push("no accepted connection (run relay accept)".into());
        } else if statuses.iter().all(|s| s.state == "revoked") {
            problems.push("every connection is revoked".into());
        } else if !statuses.iter().any(|s| s.state == "active") {
            problems.push("no active connection (every one is deactivated or revoked by the node)".into());
        }
        if problems.is_empty() {
            let active = statuses.iter().filter(|s| s.state == "active").count();
            Ok(format!("{active} connection(s) delivering"))
        } else {
            Err(problems.join("; "))
        }
    }

    /// The agent's metrics, as Prometheus text.
    fn metrics_now(&self) -> String {
        let statuses = self.status().unwrap_or_default();
        let healths: Vec<Option<Arc<Health>>> = statuses
            .iter()
            .map(|s| self.link(&s.name).map(|l| l.health.clone()))
            .collect();
        let (commits, file_syncs) = self.inner.store.sync_counts();
        let store = crate::metrics::StoreFigures { commits, file_syncs };
        crate::metrics::render("agent", &statuses, &healths, store)
    }
}
