//! Starting a node or an agent: data directory, database, certificate, listeners, admin
//! socket. Shared by `relay node run`, `relay run`, `relay demo` and the tests.

use std::path::Path;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Info, Side};
use crate::agent::Agent;
use crate::config::{Settings, StoreKind};
use crate::error::{Kind, OpError, OpResult};
use crate::node::Node;
use crate::store::postgres::PgStore;
use crate::store::{AnyStore, QueueError, Store};

/// Which role a data directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Public node.
    Node,
    /// Private agent.
    Agent,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Agent => "agent",
        }
    }
}

/// Creates (owner-only) and claims `data_dir` for `role`, refusing one that belongs to the
/// other role, and opens its database.
pub fn open_store(settings: &Settings, role: Role) -> OpResult<Store> {
    claim_data_dir(settings, role)?;
    let dir = &settings.data_dir;
    Store::open(&dir.join("db"), settings.queue.cache_bytes).map_err(|e| match e {
        QueueError::Locked(_) => OpError::new(
            Kind::Failed,
            format!(
                "the data directory {} is in use by another relay process (a daemon whose admin socket did not answer, or another command)",
                dir.display()
            ),
        ),
        other => OpError::new(Kind::Failed, other.to_string()),
    })
}

/// The node's store as `[store]` says: sled in the data directory, or the PostgreSQL
/// database, whose schema must be the one this build speaks. The data directory is claimed
/// either way: it holds the certificate and the admin socket.
pub async fn open_node_store(settings: &Settings) -> OpResult<AnyStore> {
    if settings.store.kind == StoreKind::Sled {
        return open_store(settings, Role::Node).map(AnyStore::Sled);
    }
    claim_data_dir(settings, Role::Node)?;
    let store = connect_postgres(settings).await?;
    store.check_schema().await.map_err(store_error)?;
    Ok(AnyStore::Postgres(store))
}

/// Connects to the node's PostgreSQL database, schema unchecked (`relay node migrate`).
pub async fn connect_postgres(settings: &Settings) -> OpResult<PgStore> {
    let options = settings
        .store
        .postgres_options()
        .map_err(|e| OpError::new(Kind::Config, e.to_string()))?;
    PgStore::connect(&options).await.map_err(store_error)
}

/// A store error as an operator command's: a schema this build does not speak is
/// configuration (a supervisor must not restart into it), the rest a failure.
fn store_error(e: QueueError) -> OpError {
    match e {
        QueueError::Schema(m) => OpError::new(Kind::Config, m),
        other => OpError::new(Kind::Failed, other.to_string()),
    }
}

/// Creates (owner-only) and claims `data_dir` for `role`, refusing one that belongs to the
/// other role.
fn claim_data_dir(settings: &Settings, role: Role) -> OpResult<()> {
    let dir = &settings.data_dir;
    // Also here, not only in `main`: in-process daemons (tests, `relay demo`) get it too.
    crate::fsutil::private_umask();
    match crate::fsutil::prepare_private_dir(dir) {
        Ok(crate::fsutil::DirState::Tightened { from }) => tracing::info!(
            data_dir = %dir.display(),
            "the data directory was open to other users (mode {from:04o}); made it private (0700)"
        ),
        Ok(_) => {}
        Err(e @ crate::fsutil::DirError::Io { .. }) => {
            return Err(OpError::new(
                Kind::Config,
                format!("{e} (set --data-dir or RELAY_DATA_DIR)"),
            ))
        }
        Err(e) => return Err(OpError::new(Kind::Config, e.to_string())),
    }
    let marker = dir.join("role");
    match std::fs::read_to_string(&marker) {
        Ok(existing) if existing.trim() != role.as_str() => {
            return Err(OpError::new(
                Kind::Config,
                format!(
                    "the data directory {} belongs to {}; use another --data-dir for {}",
                    dir.display(),
                    article(existing.trim()),
                    article(role.as_str())
                ),
            ))
        }
        Ok(_) => {}
        Err(_) => crate::fsutil::write_atomic(&marker, format!("{}\n", role.as_str()).as_bytes())
            .map_err(|e| OpError::new(Kind::Config, format!("cannot write {}: {e}", marker.display())))?,
    }
    Ok(())
}

fn article(role: &str) -> String {
    match role {
        "agent" => "an agent".into(),
        other => format!("a {other}"),
    }
}

/// The role recorded in a data directory, if any.
pub fn recorded_role(data_dir: &Path) -> Option<Role> {
    match std::fs::read_to_string(data_dir.join("role")).ok()?.trim() {
        "node" => Some(Role::Node),
        "agent" => Some(Role::Agent),
        _ => None,
    }
}

/// The node's certificate and key: the configured files, or the self-signed pair in the data
/// directory (made on first use).
pub fn node_identity(settings: &Settings) -> OpResult<crate::tls::ServerIdentity> {
    let hosts: Vec<String> = settings
        .node
        .public_url
        .as_deref()
        .and_then(url_host)
        .into_iter()
        .collect();
    crate::tls::server_identity(
        settings.node.tls_cert.as_deref(),
        settings.node.tls_key.as_deref(),
        &settings.data_dir.join("tls"),
        &hosts,
    )
    .map_err(|e| OpError::new(Kind::Config, e.to_string()))
}

fn url_host(url: &str) -> Option<String> {
    let (host, _) = crate::http::host_port(&url.parse().ok()?);
    (!host.is_empty()).then_some(host)
}

/// Opens the side of a data directory without serving (admin commands when no daemon runs).
pub async fn open_side(settings: &Settings, role: Role) -> OpResult<Side> {
    Ok(match role {
        Role::Node => {
            let store = open_node_store(settings).await?;
            Side::Node(Node::open(store, settings.clone(), node_identity(settings)?.pin).await?)
        }
        Role::Agent => Side::Agent(Agent::open(open_store(settings, role)?, settings.clone())?),
    })
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> OpResult<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| OpError::new(Kind::Failed, format!("cannot listen on {addr} ({what}): {e}")))
}

/// A started daemon.
pub struct Running<T> {
    /// The side.
    pub side: T,
    /// Where it listens.
    pub info: Info,
    /// Resolves when it has stopped.
    pub task: JoinHandle<OpResult<()>>,
}

/// Starts a node: certificate, listeners, admin socket; serves until `token` is cancelled.
pub async fn start_node(settings: Settings, token: CancellationToken) -> OpResult<Running<Node>> {
    let store = open_node_store(&settings).await?;
    let identity = node_identity(&settings)?;
    let agents = bind(settings.node.listen, "node.listen").await?;
    let api = bind(settings.node.api_listen, "node.api_listen").await?;
    let listen = agents
        .local_addr()
        .map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
    let api_addr = api
        .local_addr()
        .map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
    let mut settings = settings;
    if settings.node.public_url.is_none() {
        settings.node.public_url = Some(crate::node::derived_url(listen));
    }
    let node = Node::open(store, settings.clone(), identity.pin).await?;
    let info = Info {
        role: "node".into(),
        listen: Some(listen.to_string()),
        api: Some(api_addr.to_string()),
        public_url: node.public_url(),
        pid: std::process::id(),
    };
    let admin_listener = admin::bind(&settings.data_dir)?;
    tokio::spawn(admin::serve(
        admin_listener,
        Side::Node(node.clone()),
        info.clone(),
        token.clone(),
    ));
    tracing::info!(listen = %listen, api = %api_addr, public_url = %info.public_url.as_deref().unwrap_or(""), pin = %crate::tls::format_pin(&identity.pin), "node serving");
    let n = node.clone();
    let socket = admin::socket_path(&settings.data_dir);
    let task = tokio::spawn(async move {
        let r = n.serve(agents, api, identity.config, token).await;
        let _ = std::fs::remove_file(socket);
        r
    });
    Ok(Running { side: node, info, task })
}

/// Starts an agent: intake listener, admin socket, every accepted connection.
pub async fn start_agent(settings: Settings, token: CancellationToken) -> OpResult<Running<Agent>> {
    serve_agent(open_agent(&settings)?, token).await
}

/// Claims and opens an agent's data directory without serving yet, so that `relay run` can
/// accept a container's invitation before it starts the connections.
pub fn open_agent(settings: &Settings) -> OpResult<Agent> {
    Agent::open(open_store(settings, Role::Agent)?, settings.clone())
}

/// Serves an opened agent: intake listener, admin socket, every accepted connection.
pub async fn serve_agent(agent: Agent, token: CancellationToken) -> OpResult<Running<Agent>> {
    let settings = agent.settings().clone();
    let intake = bind(settings.agent.intake_listen, "agent.intake_listen").await?;
    let addr = intake
        .local_addr()
        .map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
    let info = Info {
        role: "agent".into(),
        listen: None,
        api: Some(addr.to_string()),
        public_url: None,
        pid: std::process::id(),
    };
    let admin_listener = admin::bind(&settings.data_dir)?;
    tokio::spawn(admin::serve(
        admin_listener,
        Side::Agent(agent.clone()),
        info.clone(),
        token.clone(),
    ));
    tracing::info!(intake = %addr, "agent running");
    let a = agent.clone();
    let socket = admin::socket_path(&settings.data_dir);
    let task = tokio::spawn(async move {
        let r = a.run(intake, token).await;
        let _ = std::fs::remove_file(socket);
        r
    });
    Ok(Running {
        side: agent,
        info,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_urls() {
        assert_eq!(url_host("https://a.example:8443/x").as_deref(), Some("a.example"));
        assert_eq!(url_host("https://[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(url_host("https://10.0.0.1").as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn a_data_directory_keeps_its_role() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            data_dir: dir.path().join("d"),
            ..Settings::default()
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            drop(open_store(&settings, Role::Node).unwrap());
        });
        let err = rt.block_on(async { open_store(&settings, Role::Agent).err().unwrap() });
        assert!(err.message.contains("belongs to a node"), "{}", err.message);
        assert_eq!(recorded_role(&settings.data_dir), Some(Role::Node));
    }
}
