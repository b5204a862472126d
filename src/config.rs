//! Settings: config file, `RELAY_…` environment variables and flags, parsed, validated and
//! typed; the only module that knows the `config` crate.

pub use crate::tls::{TrustMode, WebhookTrust};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `RELAY_…` environment variables that carry something other than a setting; read where they
/// are used, never as settings.
const NOT_SETTINGS: &[&str] = &[
    "RELAY_LOG",
    "RELAY_CONFIG",
    "RELAY_INVITATION",
    "RELAY_INVITATION_FILE",
    "RELAY_INVITATION_PROJECT",
];

/// A secret that never prints.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything configurable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where the database, certificate and credentials live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Log format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Node (public side) settings.
    #[serde(default)]
    pub node: NodeSettings,
    /// Agent (private side) settings.
    #[serde(default)]
    pub agent: AgentSettings,
    /// Queue bounds.
    #[serde(default)]
    pub queue: QueueSettings,
    /// Where the node keeps its state.
    #[serde(default)]
    pub store: StoreSettings,
    /// Webhook delivery and retry.
    #[serde(default)]
    pub delivery: DeliverySettings,
    /// This side's issue tracker; when set, connections sync work items with it instead of
    /// delivering payloads to a webhook.
    #[serde(default)]
    pub tracker: Option<TrackerSettings>,
}

/// `[tracker]`: the Azure DevOps instance of this side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerSettings {
    /// The tracker's kind; only `azure-devops` today.
    #[serde(default)]
    pub kind: TrackerKind,
    /// `https://dev.azure.com/{org}` or `https://{server}/{collection}`.
    pub url: String,
    /// File holding the personal access token (its first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The personal access token itself (`RELAY_TRACKER__TOKEN`); prefer `token_file`.
    #[serde(default)]
    pub token: Option<Secret>,
    /// How the tracker's certificate is checked.
    #[serde(default)]
    pub trust: WebhookTrust,
    /// PEM bundle of CA certificates: required with `trust = "ca"`, added to the roots
    /// otherwise (an internal CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// REST API version, e.g. `"5.0"`; probed from the server when absent.
    #[serde(default)]
    pub api_version: Option<String>,
    /// How often the change feed is read when no service hook wakes it.
    #[serde(default = "default_tracker_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Deadline of one tracker request.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Shared secret a service hook sends in the `Relay-Hook-Secret` header to wake the poller
    /// (`POST /v1/hooks/azure-devops` on the local API); hooks are refused without it.
    #[serde(default)]
    pub hook_secret: Option<Secret>,
}

/// A tracker's kind.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum TrackerKind {
    /// Azure DevOps Services or Server.
    #[default]
    #[serde(rename = "azure-devops")]
    AzureDevOps,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Agent-facing HTTPS listener.
    #[serde(default = "default_node_listen")]
    pub listen: SocketAddr,
    /// Local API listener.
    #[serde(default = "default_node_api_listen")]
    pub api_listen: SocketAddr,
    /// The https URL agents dial; goes into invitation codes.
    #[serde(default)]
    pub public_url: Option<String>,
    /// PEM certificate chain to serve instead of the generated self-signed one.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Longest a long-poll is held when nothing is queued.
    #[serde(default = "default_poll_wait", with = "humantime_serde")]
    pub poll_wait: Duration,
    /// Default invitation lifetime.
    #[serde(default = "default_invitation_ttl", with = "humantime_serde")]
    pub invitation_ttl: Duration,
    /// Default webhook for payloads from agents.
    #[serde(default)]
    pub deliver_to: Option<String>,
    /// Bearer token for the local API (required when it listens beyond loopback).
    #[serde(default)]
    pub api_token: Option<Secret>,
    /// Host names the local API answers to besides its address and `localhost`: the names
    /// clients reach it by. Any other `Host` is refused (DNS rebinding).
    #[serde(default, deserialize_with = "list")]
    pub api_names: Vec<String>,
    /// Origins (`scheme://host[:port]`) of web applications allowed to call the local API
    /// from a browser, with CORS; other pages' requests are refused.
    #[serde(default, deserialize_with = "list")]
    pub api_allowed_origins: Vec<String>,
    /// Most simultaneous authenticated agent connections (parked polls included); no
    /// unauthenticated connection takes one of these.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most simultaneous connections that have not yet presented a valid credential (every
    /// connection starts so; redeems stay so); when full, the oldest is shed for a newcomer.
    #[serde(default = "default_max_unauthenticated_connections")]
    pub max_unauthenticated_connections: usize,
    /// Most unauthenticated connections from one IPv4 address or IPv6 /64.
    #[serde(default = "default_max_unauthenticated_per_peer")]
    pub max_unauthenticated_per_peer: usize,
    /// An authenticated connection with no request in flight is closed after this.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// An unauthenticated connection with no request in flight (after the TLS handshake, and
    /// between requests) is closed after this.
    #[serde(default = "default_unauthenticated_idle_timeout", with = "humantime_serde")]
    pub unauthenticated_idle_timeout: Duration,
    /// The whole body of an unauthenticated request (a redeem) must arrive within this, and
    /// at 1 KiB/s or faster after its first 2 s.
    #[serde(default = "default_unauthenticated_body_timeout", with = "humantime_serde")]
    pub unauthenticated_body_timeout: Duration,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Local intake API listener.
    #[serde(default = "default_agent_intake_listen")]
    pub intake_listen: SocketAddr,
    /// This instance's short name, reported to the node (default: the host name).
    #[serde(default)]
    pub instance_name: Option<String>,
    /// Default webhook for payloads from the node.
    #[serde(default)]
    pub deliver_to: Option<String>,
    /// Bearer token for the intake API (required when it listens beyond loopback).
    #[serde(default)]
    pub api_token: Option<Secret>,
    /// Host names the intake answers to besides its address and `localhost`.
    #[serde(default, deserialize_with = "list")]
    pub intake_names: Vec<String>,
    /// Origins of web applications allowed to call the intake from a browser, with CORS.
    #[serde(default, deserialize_with = "list")]
    pub intake_allowed_origins: Vec<String>,
    /// Long-poll wait asked of the node; keep below proxies' idle timeouts.
    #[serde(default = "default_poll_wait", with = "humantime_serde")]
    pub poll_wait: Duration,
    /// Deadline for connecting and for a non-poll request to the node.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP CONNECT proxy for reaching the node, `http://[user:password@]host:port`; when
    /// unset, `HTTPS_PROXY`/`ALL_PROXY` (either case) apply.
    #[serde(default)]
    pub proxy: Option<Secret>,
    /// Hosts reached without the configured proxy (`NO_PROXY` syntax); when `proxy` is
    /// unset, `NO_PROXY` applies.
    #[serde(default)]
    pub no_proxy: Option<String>,
    /// Which scheme answers the proxy's challenges: `auto` (the strongest the proxy offers
    /// that relay has credentials for: Negotiate with a keytab, NTLM with a password, Basic
    /// for a proxy URL's credentials), `negotiate`, `ntlm` or `basic`.
    #[serde(default)]
    pub proxy_auth: crate::http::ProxyAuth,
    /// Keytab of the agent's service account, for Negotiate (Kerberos) proxies; without it,
    /// `KRB5_CLIENT_KTNAME`. Read again at each handshake.
    #[serde(default)]
    pub proxy_keytab: Option<PathBuf>,
    /// The Kerberos principal to use from the keytab (`user@REALM`); without it, the
    /// keytab's first entry.
    #[serde(default)]
    pub proxy_principal: Option<String>,
    /// The proxy's Kerberos service principal; without it, `HTTP/` and the proxy's host as
    /// the proxy URL names it.
    #[serde(default)]
    pub proxy_spn: Option<String>,
    /// The proxy account (`DOMAIN\\user` or `user@domain`), with `proxy_password_file`,
    /// instead of credentials in the proxy URL.
    #[serde(default)]
    pub proxy_user: Option<String>,
    /// File holding the proxy account's password (first line), read again at each
    /// handshake, so a rotated password takes effect without a restart.
    #[serde(default)]
    pub proxy_password_file: Option<PathBuf>,
    /// How the node's certificate is trusted.
    #[serde(default)]
    pub trust: TrustMode,
    /// PEM bundle of CA certificates: required with `trust = "ca"`, added to the system roots
    /// with `trust = "system"`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `/readyz` fails when a connection has not reached its node for longer than this.
    #[serde(default = "default_ready_max_silence", with = "humantime_serde")]
    pub ready_max_silence: Duration,
}

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// Largest payload accepted.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: u64,
    /// Most messages per queue.
    #[serde(default = "default_max_messages")]
    pub max_messages: u64,
    /// Most payload bytes per queue.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// sled page cache size.
    #[serde(default = "default_cache")]
    pub cache_bytes: u64,
    /// How long an intake `Idempotency-Key` is remembered.
    #[serde(default = "default_idempotency_ttl", with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// `/readyz` fails when an active connection's oldest queued message is older than this.
    #[serde(default = "default_ready_max_age", with = "humantime_serde")]
    pub ready_max_age: Duration,
}

/// `[store]`: where the node keeps its connections, queues and sync state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `sled` (embedded in the data directory, the default) or `postgres` (one database that
    /// several node replicas share). The agent always uses sled.
    #[serde(default)]
    pub kind: StoreKind,
    /// The database, `postgres://user[:password]@host[:port]/database[?sslmode=require]`;
    /// prefer `url_file` for a URL with a password.
    #[serde(default)]
    pub url: Option<Secret>,
    /// A file holding the database URL, password included (its first line; mode 600).
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Connections to the database in this replica's pool.
    #[serde(default = "default_store_pool_size")]
    pub pool_size: usize,
    /// Deadline of connecting to the database and of waiting for a pooled connection.
    #[serde(default = "default_store_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a replica's hold on a connection's webhook delivery lasts unless renewed (a
    /// third of it apart): another replica takes over this long after one dies.
    #[serde(default = "default_store_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How the database's certificate is checked when the URL asks for TLS.
    #[serde(default)]
    pub trust: WebhookTrust,
    /// PEM bundle of CA certificates: required with `trust = "ca"`, added to the roots
    /// otherwise.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Which engine keeps the node's state.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// sled, in the data directory.
    #[default]
    Sled,
    /// PostgreSQL, at `store.url`.
    Postgres,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            kind: StoreKind::default(),
            url: None,
            url_file: None,
            pool_size: default_store_pool_size(),
            connect_timeout: default_store_connect_timeout(),
            lease_ttl: default_store_lease_ttl(),
            trust: WebhookTrust::default(),
            ca_file: None,
        }
    }
}

fn default_store_pool_size() -> usize {
    16
}

fn default_store_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_store_lease_ttl() -> Duration {
    Duration::from_secs(15)
}

impl StoreSettings {
    /// How to reach the PostgreSQL database: the URL (from `url_file`, read now, or `url`) and
    /// the TLS trust. Never prints the password.
    pub fn postgres_options(&self) -> Result<crate::store::postgres::Options, ConfigError> {
        let url = match (&self.url_file, &self.url) {
            (Some(path), _) => {
                private_file("store.url_file", path)?;
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                    key: "store.url_file",
                    problem: format!("cannot read {}: {e}", path.display()),
                })?;
                text.lines().next().unwrap_or_default().trim().to_owned()
            }
            (None, Some(url)) => url.expose().to_owned(),
            (None, None) => {
                return Err(ConfigError::Invalid {
                    key: "store.url",
                    problem: "required with store.kind = \"postgres\" (or store.url_file)".into(),
                })
            }
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                key: if self.url_file.is_some() {
                    "store.url_file"
                } else {
                    "store.url"
                },
                problem: format!(
                    "{} is not a PostgreSQL URL (postgres://user@host:port/database)",
                    crate::store::postgres::redact(&url)
                ),
            });
        }
        let tls = crate::tls::webhook_client_config(self.trust, self.ca_file.as_deref()).map_err(|e| {
            ConfigError::Invalid {
                key: "store.ca_file",
                problem: e.to_string(),
            }
        })?;
        Ok(crate::store::postgres::Options {
            url,
            pool_size: self.pool_size,
            tls,
            connect_timeout: self.connect_timeout,
        })
    }
}

/// `[delivery]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Deadline of one webhook request.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay.
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest retry delay (before jitter).
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How the certificates of https webhooks are trusted.
    #[serde(default)]
    pub trust: WebhookTrust,
    /// PEM bundle of CA certificates for https webhooks: required with `trust = "ca"`, added
    /// to the roots otherwise.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl DeliverySettings {
    /// How https webhooks are trusted: `trust` and `ca_file`, as the TLS layer takes them.
    pub fn web_trust(&self) -> (WebhookTrust, Option<&std::path::Path>) {
        (self.trust, self.ca_file.as_deref())
    }
}

/// A list setting: a TOML array of strings, or one string of entries separated by commas or
/// spaces (how an environment variable carries a list; the `config` crate would split only
/// with `try_parsing`, which mangles other strings).
fn list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct List;
    impl<'de> serde::de::Visitor<'de> for List {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of strings, or one string of entries separated by commas")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(v.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = seq.next_element::<String>()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(List)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/relay")
}
fn default_node_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_node_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_agent_intake_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_poll_wait() -> Duration {
    Duration::from_secs(25)
}
fn default_invitation_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    16_384
}
fn default_max_unauthenticated_connections() -> usize {
    crate::http::MAX_UNAUTHENTICATED
}
fn default_max_unauthenticated_per_peer() -> usize {
    crate::http::MAX_UNAUTHENTICATED_PER_PEER
}
fn default_idle_timeout() -> Duration {
    crate::http::IDLE_TIMEOUT
}
fn default_unauthenticated_idle_timeout() -> Duration {
    crate::http::UNAUTHENTICATED_IDLE_TIMEOUT
}
fn default_unauthenticated_body_timeout() -> Duration {
    crate::http::UNAUTHENTICATED_BODY_DEADLINE
}
fn default_max_payload() -> u64 {
    16 * 1024 * 1024
}
fn default_max_messages() -> u64 {
    1_000_000
}
fn default_max_bytes() -> u64 {
    4 * 1024 * 1024 * 1024
}
fn default_cache() -> u64 {
    16 * 1024 * 1024
}
fn default_idempotency_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_ready_max_silence() -> Duration {
    Duration::from_secs(90)
}
fn default_ready_max_age() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_tracker_poll_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(20)
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            listen: default_node_listen(),
            api_listen: default_node_api_listen(),
            public_url: None,
            tls_cert: None,
            tls_key: None,
            poll_wait: default_poll_wait(),
            invitation_ttl: default_invitation_ttl(),
            deliver_to: None,
            api_token: None,
            api_names: Vec::new(),
            api_allowed_origins: Vec::new(),
            max_connections: default_max_connections(),
            max_unauthenticated_connections: default_max_unauthenticated_connections(),
            max_unauthenticated_per_peer: default_max_unauthenticated_per_peer(),
            idle_timeout: default_idle_timeout(),
            unauthenticated_idle_timeout: default_unauthenticated_idle_timeout(),
            unauthenticated_body_timeout: default_unauthenticated_body_timeout(),
        }
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            intake_listen: default_agent_intake_listen(),
            instance_name: None,
            deliver_to: None,
            api_token: None,
            intake_names: Vec::new(),
            intake_allowed_origins: Vec::new(),
            poll_wait: default_poll_wait(),
            request_timeout: default_request_timeout(),
            proxy: None,
            no_proxy: None,
            proxy_auth: crate::http::ProxyAuth::Auto,
            proxy_keytab: None,
            proxy_principal: None,
            proxy_spn: None,
            proxy_user: None,
            proxy_password_file: None,
            trust: TrustMode::default(),
            ca_file: None,
            ready_max_silence: default_ready_max_silence(),
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            max_payload_bytes: default_max_payload(),
            max_messages: default_max_messages(),
            max_bytes: default_max_bytes(),
            cache_bytes: default_cache(),
            idempotency_ttl: default_idempotency_ttl(),
            ready_max_age: default_ready_max_age(),
        }
    }
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            timeout: default_request_timeout(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            trust: WebhookTrust::default(),
            ca_file: None,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: default_data_dir(),
            log_format: LogFormat::default(),
            node: NodeSettings::default(),
            agent: AgentSettings::default(),
            queue: QueueSettings::default(),
            store: StoreSettings::default(),
            delivery: DeliverySettings::default(),
            tracker: None,
        }
    }
}

/// A bad setting, named by its key and, where it came from one, its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("configuration: {0}")]
    Load(String),
    /// A value is out of range.
    #[error("configuration key `{key}`: {problem}")]
    Invalid {
        /// Dotted key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A value from a named source (a file and key, a variable or a flag) is wrong.
    #[error("configuration: {origin}: {problem}")]
    At {
        /// Where the value came from, e.g. `environment variable RELAY_NODE__POLL_WAIT`.
        origin: String,
        /// What is wrong.
        problem: String,
    },
}

/// What a `RELAY_…` environment variable is to the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvVar {
    /// Sets the setting with this dotted key.
    Setting(String),
    /// Carries something else (`RELAY_LOG`, `RELAY_INVITATION`, …), read where it is used.
    Reserved,
    /// Is no setting and names no section (`RELAY_PORT`, which Kubernetes injects for a
    /// Service named relay): ignored.
    Unrelated,
    /// Names a section but no key in it (`RELAY_NODE__POLL_WIAT`): a typo, refused. Kubernetes
    /// never produces the `__` separator, so only an operator writes these.
    Misspelt(String),
}

/// Classifies the environment variable `name` (case-sensitive prefix `RELAY_`).
pub fn classify_env(name: &str) -> EnvVar {
    let Some(rest) = name.strip_prefix("RELAY_") else {
        return EnvVar::Unrelated;
    };
    if NOT_SETTINGS.contains(&name) {
        return EnvVar::Reserved;
    }
    let key = rest.to_ascii_lowercase().replace("__", ".");
    let keys = keys::known();
    // A map-valued setting takes any key below it.
    let mut prefix = key.as_str();
    loop {
        if keys.leaves.contains(prefix) {
            return EnvVar::Setting(key);
        }
        match prefix.rfind('.') {
            Some(i) => prefix = &prefix[..i],
            None => break,
        }
    }
    let mut prefix = key.as_str();
    while let Some(i) = prefix.rfind('.') {
        prefix = &prefix[..i];
        if keys.sections.contains(prefix) {
            return EnvVar::Misspelt(key);
        }
    }
    EnvVar::Unrelated
}

/// The `RELAY_…` variables in `env` that are no setting and are ignored, for a debug line
/// once logging is up (settings are loaded before it).
pub fn ignored_env(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    env.into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("RELAY_") && classify_env(k) == EnvVar::Unrelated)
        .collect()
}

/// This process's environment for [`load`]. Unlike `std::env::vars`, bytes that are not
/// UTF-8 do not panic: such a variable is skipped unless it is a setting, which is refused
/// by name.
pub fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue;
        };
        match value.into_string() {
            Ok(value) => vars.push((name, value)),
            Err(_) if matches!(classify_env(&name), EnvVar::Setting(_)) => {
                return Err(ConfigError::At {
                    origin: format!("environment variable {name}"),
                    problem: "the value is not valid UTF-8".into(),
                })
            }
            Err(_) => {}
        }
    }
    Ok(vars)
}

/// Where the value of each key came from, to name it in errors.
struct Origins {
    file: Option<(PathBuf, config::Config)>,
    vars: HashMap<String, String>,
    flags: Vec<String>,
}

impl Origins {
    /// The source of `key`'s effective value (flags over variables over the file), if any.
    fn of(&self, key: &str) -> Option<String> {
        if self.flags.iter().any(|k| k == key) {
            let flag = key.rsplit('.').next().unwrap_or(key).replace('_', "-");
            return Some(format!("flag --{flag} ({key})"));
        }
        // The variable of the key, or of a key below it (`RELAY_NODE__LISTEN__X` makes
        // `node.listen` a table, and the error is about `node.listen`).
        let below = format!("{key}.");
        let var = self.vars.get(key).or_else(|| {
            self.vars
                .iter()
                .find(|(k, _)| k.starts_with(&below))
                .map(|(_, var)| var)
        });
        if let Some(var) = var {
            return Some(format!("environment variable {var} (`{key}`)"));
        }
        let (path, file) = self.file.as_ref()?;
        // The key, or the section holding it (an unknown key is reported at its section).
        file.get::<config::Value>(key)
            .is_ok()
            .then(|| format!("{}, key `{key}`", path.display()))
    }

    /// `problem` about `key`, named by its source when it has one.
    fn error(&self, key: &str, problem: String) -> ConfigError {
        match self.of(key) {
            Some(origin) => ConfigError::At { origin, problem },
            None => ConfigError::Load(format!("key `{key}`: {problem}")),
        }
    }
}

/// Loads settings from `file` (when given), then `RELAY_…` variables from `env`, then
/// `overrides` (dotted key → value, from flags), and validates them. `RELAY_…` variables that
/// are no setting are left out (see [`ignored_env`]); a misspelt one is refused by name.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(&str, String)],
) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder();
    let mut origins = Origins {
        file: None,
        vars: HashMap::new(),
        flags: overrides.iter().map(|(k, _)| (*k).to_owned()).collect(),
    };
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Load(format!("{} does not exist", path.display())));
        }
        let source = config::File::from(path).format(config::FileFormat::Toml);
        let alone = config::Config::builder()
            .add_source(source.clone())
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        origins.file = Some((path.to_owned(), alone));
        builder = builder.add_source(source);
    }
    let mut vars: HashMap<String, String> = HashMap::new();
    for (name, value) in env {
        match classify_env(&name) {
            EnvVar::Setting(key) => {
                origins.vars.insert(key, name.clone());
                vars.insert(name, value);
            }
            EnvVar::Misspelt(key) => {
                let section = key.rsplit_once('.').map_or("", |(s, _)| s).to_owned();
                return Err(ConfigError::At {
                    origin: format!("environment variable {name} (`{key}`)"),
                    problem: format!(
                        "no such setting `{key}` in [{section}] (known: {})",
                        keys::known().in_section(&section).join(", ")
                    ),
                });
            }
            EnvVar::Reserved | EnvVar::Unrelated => {}
        }
    }
    builder = builder.add_source(
        config::Environment::with_prefix("RELAY")
            .prefix_separator("_")
            .separator("__")
            .source(Some(vars)),
    );
    for (key, value) in overrides {
        builder = builder
            .set_override(*key, value.clone())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
    }
    let config = builder.build().map_err(|e| ConfigError::Load(e.to_string()))?;
    let settings: Settings = config.try_deserialize().map_err(|e| match located(&e) {
        Some((key, problem)) => origins.error(&key, problem),
        None => ConfigError::Load(e.to_string()),
    })?;
    settings.validate().map_err(|e| match e {
        ConfigError::Invalid { key, problem } if origins.of(key).is_some() => origins.error(key, problem),
        other => other,
    })?;
    Ok(settings)
}

/// The key a deserialisation error is about, and the problem without the crate's own
/// location text (which says "the environment" rather than the variable).
fn located(e: &config::ConfigError) -> Option<(String, String)> {
    match e {
        config::ConfigError::Type {
            key: Some(key),
            unexpected,
            expected,
            ..
        } => Some((key.clone(), format!("invalid type: {unexpected}, expected {expected}"))),
        config::ConfigError::At {
            key: Some(key), error, ..
        } => Some((key.clone(), error.to_string())),
        _ => None,
    }
}

/// The settings' keys, read from the `Deserialize` implementations themselves, so that a key
/// added to a struct is known to the environment handling without a second list.
mod keys {
    use std::collections::BTreeSet;
    use std::sync::OnceLock;

    use serde::de::{self, value::Error, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
    use serde::Deserialize;

    /// Dotted keys of values (`node.poll_wait`) and of sections (`node`).
    pub struct Keys {
        pub leaves: BTreeSet<String>,
        pub sections: BTreeSet<String>,
    }

    impl Keys {
        /// The keys directly in `section`, without it.
        pub fn in_section(&self, section: &str) -> Vec<String> {
            let prefix = format!("{section}.");
            self.leaves
                .iter()
                .chain(&self.sections)
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter(|k| !k.contains('.'))
                .map(str::to_owned)
                .collect()
        }
    }

    /// Every key of [`super::Settings`], computed once.
    pub fn known() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut keys = Keys {
                leaves: BTreeSet::new(),
                sections: BTreeSet::new(),
            };
            let mut pending: Vec<Vec<&'static str>> = vec![Vec::new()];
            while let Some(path) = pending.pop() {
                let Some(fields) = fields_at(&path) else {
                    keys.leaves.insert(path.join("."));
                    continue;
                };
                if !path.is_empty() {
                    keys.sections.insert(path.join("."));
                }
                for field in fields {
                    let mut child = path.clone();
                    child.push(field);
                    pending.push(child);
                }
            }
            keys
        })
    }

    /// The field names of the struct at `path`, or `None` when a plain value is there.
    fn fields_at(path: &[&'static str]) -> Option<&'static [&'static str]> {
        let mut found = None;
        let _ = super::Settings::deserialize(Probe {
            path,
            found: &mut found,
        });
        found
    }

    /// A deserializer that walks down `path` and records the fields of the struct there;
    /// everything else is an error (the walk stops, which is all it needs).
    struct Probe<'a> {
        path: &'a [&'static str],
        found: &'a mut Option<&'static [&'static str]>,
    }

    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(de::Error::custom("a value"))
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_some(self)
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            match self.path.split_first() {
                None => {
                    *self.found = Some(fields);
                    Err(de::Error::custom("found"))
                }
                Some((first, rest)) => visitor.visit_map(One {
                    key: Some(first),
                    value: Some(Probe {
                        path: rest,
                        found: self.found,
                    }),
                }),
            }
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            unit unit_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    /// A map of one entry: the next field on the path, whose value is probed further.
    struct One<'a> {
        key: Option<&'static str>,
        value: Option<Probe<'a>>,
    }

    impl<'de> MapAccess<'de> for One<'_> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
            match self.key.take() {
                Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
                None => Ok(None),
            }
        }

        fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
            match self.value.take() {
                Some(probe) => seed.deserialize(probe),
                None => Err(de::Error::custom("no value")),
            }
        }
    }
}

impl Settings {
    /// The guard's policy of the node's local API, bound to `bound`.
    pub fn api_policy(&self, bound: std::net::IpAddr) -> Result<crate::guard::Policy, crate::guard::BadSetting> {
        crate::guard::Policy::new(
            bound,
            &self.node.api_names,
            &self.node.api_allowed_origins,
            crate::guard::Keys::NODE_API,
        )
    }

    /// The guard's policy of the agent's intake, bound to `bound`.
    pub fn intake_policy(&self, bound: std::net::IpAddr) -> Result<crate::guard::Policy, crate::guard::BadSetting> {
        crate::guard::Policy::new(
            bound,
            &self.agent.intake_names,
            &self.agent.intake_allowed_origins,
            crate::guard::Keys::AGENT_INTAKE,
        )
    }

    /// Checks ranges and combinations serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        // The protocol's bound keeps every batch within what a peer decodes.
        if self.queue.max_payload_bytes == 0 || self.queue.max_payload_bytes > crate::protocol::MAX_PAYLOAD_BYTES {
            return invalid("queue.max_payload_bytes", "must be between 1 and 268435456");
        }
        if self.store.kind == StoreKind::Postgres {
            if self.store.url.is_none() && self.store.url_file.is_none() {
                return invalid(
                    "store.url",
                    "required with store.kind = \"postgres\" (or store.url_file)",
                );
            }
            if self.store.pool_size == 0 {
                return invalid("store.pool_size", "must be at least 1");
            }
            if self.store.lease_ttl < Duration::from_secs(3) || self.store.lease_ttl > Duration::from_secs(3600) {
                return invalid("store.lease_ttl", "must be between 3s and 1h");
            }
            if self.store.trust == WebhookTrust::Ca && self.store.ca_file.is_none() {
                return invalid("store.ca_file", "required when store.trust = \"ca\"");
            }
        }
        if self.queue.max_messages == 0 {
            return invalid("queue.max_messages", "must be at least 1");
        }
        if self.queue.max_bytes < self.queue.max_payload_bytes {
            return invalid("queue.max_bytes", "must be at least queue.max_payload_bytes");
        }
        if self.node.poll_wait.is_zero() || self.node.poll_wait > Duration::from_secs(120) {
            return invalid("node.poll_wait", "must be between 1ms and 120s");
        }
        if self.agent.poll_wait.is_zero() || self.agent.poll_wait > Duration::from_secs(120) {
            return invalid("agent.poll_wait", "must be between 1ms and 120s");
        }
        if self.agent.ready_max_silence <= self.agent.poll_wait {
            return invalid("agent.ready_max_silence", "must be longer than agent.poll_wait");
        }
        if self.delivery.backoff_initial.is_zero() || self.delivery.backoff_max < self.delivery.backoff_initial {
            return invalid(
                "delivery.backoff_max",
                "must be at least delivery.backoff_initial, which must be above 0",
            );
        }
        if self.node.tls_cert.is_some() != self.node.tls_key.is_some() {
            return invalid("node.tls_cert", "node.tls_cert and node.tls_key go together");
        }
        if let Some(url) = &self.node.public_url {
            if let Err(e) = crate::invite::validate_url(url) {
                return invalid("node.public_url", &e.to_string());
            }
        }
        for (key, url) in [
            ("node.deliver_to", &self.node.deliver_to),
            ("agent.deliver_to", &self.agent.deliver_to),
        ] {
            if let Some(url) = url {
                if let Err(problem) = check_webhook_url(url) {
                    return invalid(key, &problem);
                }
            }
        }
        if !self.node.api_listen.ip().is_loopback() && self.node.api_token.is_none() {
            return invalid(
                "node.api_token",
                "required when node.api_listen is not a loopback address",
            );
        }
        if !self.agent.intake_listen.ip().is_loopback() && self.agent.api_token.is_none() {
            return invalid(
                "agent.api_token",
                "required when agent.intake_listen is not a loopback address",
            );
        }
        for policy in [
            self.api_policy(self.node.api_listen.ip()),
            self.intake_policy(self.agent.intake_listen.ip()),
        ] {
            if let Err(e) = policy {
                return Err(ConfigError::Invalid {
                    key: e.key,
                    problem: e.problem,
                });
            }
        }
        if let Some(proxy) = &self.agent.proxy {
            if let Err(problem) = crate::http::check_proxy_url(proxy.expose()) {
                return invalid("agent.proxy", &problem);
            }
        }
        match (&self.agent.proxy_user, &self.agent.proxy_password_file) {
            (Some(_), None) => return invalid("agent.proxy_password_file", "required with agent.proxy_user"),
            (None, Some(_)) => return invalid("agent.proxy_user", "required with agent.proxy_password_file"),
            (Some(_), Some(path)) => private_file("agent.proxy_password_file", path)?,
            (None, None) => {}
        }
        if let Some(path) = &self.agent.proxy_keytab {
            private_file("agent.proxy_keytab", path)?;
        }
        if self.agent.trust == TrustMode::Ca && self.agent.ca_file.is_none() {
            return invalid("agent.ca_file", "required when agent.trust = \"ca\"");
        }
        if self.delivery.trust == WebhookTrust::Ca && self.delivery.ca_file.is_none() {
            return invalid("delivery.ca_file", "required when delivery.trust = \"ca\"");
        }
        if let Some(t) = &self.tracker {
            if let Err(problem) = check_tracker_url(&t.url) {
                return invalid("tracker.url", &problem);
            }
            if t.token_file.is_some() == t.token.is_some() {
                return invalid(
                    "tracker.token_file",
                    "set exactly one of tracker.token_file and tracker.token (RELAY_TRACKER__TOKEN)",
                );
            }
            if t.trust == WebhookTrust::Ca && t.ca_file.is_none() {
                return invalid("tracker.ca_file", "required when tracker.trust = \"ca\"");
            }
            if let Some(v) = &t.api_version {
                if crate::tracker::ApiVersion::parse(v).is_none() {
                    return invalid("tracker.api_version", "must look like 5.0, 6.0, 7.0 or 7.1");
                }
            }
            if t.poll_interval < Duration::from_millis(100) || t.poll_interval > Duration::from_secs(3600) {
                return invalid("tracker.poll_interval", "must be between 100ms and 1h");
            }
        }
        if self.node.max_connections == 0 {
            return invalid("node.max_connections", "must be at least 1");
        }
        if self.node.max_unauthenticated_connections == 0 {
            return invalid("node.max_unauthenticated_connections", "must be at least 1");
        }
        if self.node.max_unauthenticated_per_peer == 0 {
            return invalid("node.max_unauthenticated_per_peer", "must be at least 1");
        }
        for (key, value) in [
            ("node.idle_timeout", self.node.idle_timeout),
            (
                "node.unauthenticated_idle_timeout",
                self.node.unauthenticated_idle_timeout,
            ),
            (
                "node.unauthenticated_body_timeout",
                self.node.unauthenticated_body_timeout,
            ),
        ] {
            if value.is_zero() || value > Duration::from_secs(3600) {
                return invalid(key, "must be between 1ms and 1h");
            }
        }
        Ok(())
    }

    /// How the agent answers its proxy's challenges.
    pub fn proxy_login(&self) -> crate::http::ProxyLogin {
        crate::http::ProxyLogin {
            scheme: self.agent.proxy_auth,
            account: self
                .agent
                .proxy_user
                .clone()
                .zip(self.agent.proxy_password_file.clone()),
            kerberos: crate::proxy_auth::kerberos::KerberosLogin {
                keytab: self.agent.proxy_keytab.clone(),
                principal: self.agent.proxy_principal.clone(),
                spn: self.agent.proxy_spn.clone(),
            },
        }
    }

    /// The agent's route to its nodes.
    pub fn proxy_config(&self) -> crate::http::ProxyConfig {
        let auth = self.proxy_login();
        match &self.agent.proxy {
            Some(url) => crate::http::ProxyConfig::Url {
                url: url.expose().to_owned(),
                no_proxy: self.agent.no_proxy.clone(),
                auth,
            },
            None => crate::http::ProxyConfig::FromEnvironment { auth },
        }
    }

    /// Queue bounds as the queue module wants them.
    pub fn queue_limits(&self) -> crate::store::Limits {
        crate::store::Limits {
            max_messages: self.queue.max_messages,
            max_bytes: self.queue.max_bytes,
        }
    }
}

/// Checks a secret file (`key` names its setting): it must exist and be readable by its owner
/// alone, like the other secrets.
fn private_file(key: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let problem = match std::fs::metadata(path) {
        Ok(meta) if meta.mode() & 0o077 != 0 => format!(
            "{} can be read by other users (mode {:o}): make it readable by the service user alone (chmod 600)",
            path.display(),
            meta.mode() & 0o777
        ),
        Ok(_) => return Ok(()),
        Err(e) => format!("cannot read {}: {e}", path.display()),
    };
    Err(ConfigError::Invalid { key, problem })
}

/// A tracker URL: https, or http on a loopback address only (a token must not cross a
/// network in the clear).
pub fn check_tracker_url(url: &str) -> Result<(), String> {
    check_url("tracker", url)?;
    let uri: crate::http::Uri = url
        .parse()
        .map_err(|e| format!("tracker URL {url:?} is not valid: {e}"))?;
    let host = crate::http::host_port(&uri).0;
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !uri.scheme_str().is_some_and(|s| s.eq_ignore_ascii_case("https")) && !loopback {
        return Err(format!(
            "tracker URL {url:?} must use https:// (the access token would cross the network in the clear)"
        ));
    }
    Ok(())
}

/// A webhook must be an absolute http(s) URL.
pub fn check_webhook_url(url: &str) -> Result<(), String> {
    check_url("webhook", url)
}

fn check_url(what: &str, url: &str) -> Result<(), String> {
    let must_be_http = || format!("{what} URL {url:?} must start with http:// or https://");
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what} URL {url:?} has no host or contains spaces"));
    }
    let uri: crate::http::Uri = url.parse().map_err(|e| {
        if url.contains("://") {
            format!("{what} URL {url:?} is not valid: {e}")
        } else {
            must_be_http()
        }
    })?;
    if !uri
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
    {
        return Err(must_be_http());
    }
    if crate::http::host_port(&uri).0.is_empty() {
        return Err(format!("{what} URL {url:?} has no host or contains spaces"));
    }
    if !crate::http::port_in_range(&uri) {
        return Err(format!("{what} URL {url:?} has a port outside 1-65535"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let s = load(None, env(&[]), &[]).unwrap();
        assert_eq!(s.node.poll_wait, Duration::from_secs(25));
        assert_eq!(s.queue.max_payload_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn listener_budgets_and_deadlines_are_settings() {
        let s = load(None, env(&[]), &[]).unwrap();
        assert_eq!(
            s.node.unauthenticated_idle_timeout,
            crate::http::UNAUTHENTICATED_IDLE_TIMEOUT
        );
        assert_eq!(
            s.node.max_unauthenticated_per_peer,
            crate::http::MAX_UNAUTHENTICATED_PER_PEER
        );
        let s = load(
            None,
            env(&[
                ("RELAY_NODE__UNAUTHENTICATED_IDLE_TIMEOUT", "3s"),
                ("RELAY_NODE__MAX_UNAUTHENTICATED_CONNECTIONS", "64"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.node.unauthenticated_idle_timeout, Duration::from_secs(3));
        assert_eq!(s.node.max_unauthenticated_connections, 64);
        for (var, value, key) in [
            (
                "RELAY_NODE__MAX_UNAUTHENTICATED_PER_PEER",
                "0",
                "node.max_unauthenticated_per_peer",
            ),
            (
                "RELAY_NODE__UNAUTHENTICATED_BODY_TIMEOUT",
                "0s",
                "node.unauthenticated_body_timeout",
            ),
            ("RELAY_NODE__IDLE_TIMEOUT", "2h", "node.idle_timeout"),
        ] {
            let err = load(None, env(&[(var, value)]), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn file_env_and_flags_layer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\n[node]\npoll_wait = \"5s\"\npublic_url = \"https://a.example\"\n[queue]\nmax_messages = 7\n",
        )
        .unwrap();
        let s = load(
            Some(&file),
            env(&[
                ("RELAY_NODE__POLL_WAIT", "7s"),
                ("RELAY_DATA_DIR", "/from/env"),
                ("RELAY_LOG", "debug"),
                ("RELAY_INVITATION", "rlyinv1_x"),
                ("OTHER", "x"),
            ]),
            &[("data_dir", "/from/flag".into())],
        )
        .unwrap();
        assert_eq!(s.node.poll_wait, Duration::from_secs(7));
        assert_eq!(s.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(s.queue.max_messages, 7);
        assert_eq!(s.node.public_url.as_deref(), Some("https://a.example"));
    }

    #[test]
    fn strings_that_look_like_numbers_stay_strings() {
        let s = load(None, env(&[("RELAY_AGENT__INSTANCE_NAME", "1.10")]), &[]).unwrap();
        assert_eq!(s.agent.instance_name.as_deref(), Some("1.10"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "[node]\nlisen = \"0.0.0.0:1\"\n").unwrap();
        let err = load(Some(&file), env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");

        let err = load(None, env(&[("RELAY_NODE__PUBLIC_URL", "http://a")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("node.public_url"), "{err}");

        let err = load(None, env(&[("RELAY_AGENT__INTAKE_LISTEN", "0.0.0.0:9")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.api_token"), "{err}");

        let err = load(None, env(&[("RELAY_NODE__POLL_WAIT", "soon")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("poll_wait"), "{err}");
    }

    #[test]
    fn local_listener_names_and_origins_are_lists_from_a_file_or_a_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "[node]\napi_names = [\"relay.corp\", \"relay-node\"]\napi_allowed_origins = [\"https://app.example\"]\n",
        )
        .unwrap();
        let s = load(Some(&file), env(&[]), &[]).unwrap();
        assert_eq!(s.node.api_names, ["relay.corp", "relay-node"]);
        assert_eq!(s.node.api_allowed_origins, ["https://app.example"]);
        assert!(s.agent.intake_names.is_empty() && s.agent.intake_allowed_origins.is_empty());
        let s = load(
            Some(&file),
            env(&[
                ("RELAY_NODE__API_NAMES", "a.example,b.example c.example"),
                ("RELAY_AGENT__INTAKE_ALLOWED_ORIGINS", "http://localhost:3000"),
                ("RELAY_AGENT__INTAKE_NAMES", ""),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.node.api_names, ["a.example", "b.example", "c.example"]);
        assert_eq!(s.agent.intake_allowed_origins, ["http://localhost:3000"]);
        assert!(s.agent.intake_names.is_empty());

        std::fs::write(&file, "[agent]\nintake_allowed_origins = [\"app.example\"]\n").unwrap();
        let err = load(Some(&file), env(&[]), &[]).unwrap_err().to_string();
        assert!(
            err.contains("key `agent.intake_allowed_origins`") && err.contains("\"app.example\" is not an origin"),
            "{err}"
        );
        std::fs::write(&file, "[node]\napi_names = \"http://relay.corp\"\n").unwrap();
        let err = load(Some(&file), env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("key `node.api_names`"), "{err}");
        std::fs::write(&file, "[node]\napi_names = true\n").unwrap();
        let err = load(Some(&file), env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("api_names"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = load(
            None,
            env(&[
                ("RELAY_NODE__API_TOKEN", "hunter2"),
                ("RELAY_NODE__API_LISTEN", "0.0.0.0:1"),
            ]),
            &[],
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.node.api_token.unwrap().expose(), "hunter2");
    }

    #[test]
    fn proxy_and_trust_settings_are_checked() {
        let err = load(None, env(&[("RELAY_AGENT__PROXY", "https://p:3128")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.proxy") && err.contains("http://"), "{err}");
        let s = load(None, env(&[("RELAY_AGENT__PROXY", "http://u:hunter2@p:3128")]), &[]).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        let err = load(None, env(&[("RELAY_AGENT__TRUST", "ca")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.ca_file"), "{err}");
        let err = load(None, env(&[("RELAY_AGENT__TRUST", "anything")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("trust"), "{err}");
        let s = load(None, env(&[("RELAY_AGENT__TRUST", "system")]), &[]).unwrap();
        assert_eq!(s.agent.trust, TrustMode::System);
    }

    #[test]
    fn the_shipped_example_configurations_parse() {
        for name in ["node.toml", "agent.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name);
            let s = load(Some(&path), env(&[]), &[]).unwrap_or_else(|e| panic!("config/{name}: {e}"));
            assert_eq!(s.data_dir, PathBuf::from("/var/lib/relay"), "config/{name}");
        }
    }

    #[test]
    fn keys_are_read_from_the_settings_types() {
        let keys = keys::known();
        for key in [
            "data_dir",
            "node.poll_wait",
            "agent.proxy",
            "queue.max_bytes",
            "delivery.timeout",
        ] {
            assert!(keys.leaves.contains(key), "{key} in {:?}", keys.leaves);
        }
        assert!(keys.sections.contains("node") && !keys.leaves.contains("node"));
        assert!(keys.in_section("node").contains(&"poll_wait".to_owned()));
    }

    #[test]
    fn relay_variables_are_classified() {
        assert_eq!(
            classify_env("RELAY_NODE__POLL_WAIT"),
            EnvVar::Setting("node.poll_wait".into())
        );
        assert_eq!(classify_env("RELAY_DATA_DIR"), EnvVar::Setting("data_dir".into()));
        assert_eq!(classify_env("RELAY_LOG"), EnvVar::Reserved);
        // What Kubernetes injects for Services named relay and relay-node.
        for k in [
            "RELAY_PORT",
            "RELAY_SERVICE_HOST",
            "RELAY_PORT_8443_TCP_ADDR",
            "RELAY_NODE_SERVICE_PORT",
            "RELAY_NODE",
        ] {
            assert_eq!(classify_env(k), EnvVar::Unrelated, "{k}");
        }
        assert_eq!(
            classify_env("RELAY_NODE__POLL_WIAT"),
            EnvVar::Misspelt("node.poll_wiat".into())
        );
    }

    #[test]
    fn unrelated_relay_variables_are_ignored_and_listed() {
        let vars = env(&[
            ("RELAY_PORT", "tcp://10.0.0.7:8443"),
            ("RELAY_SERVICE_HOST", "10.0.0.7"),
            ("RELAY_NODE__POLL_WAIT", "3s"),
        ]);
        let s = load(None, vars.clone(), &[]).unwrap();
        assert_eq!(s.node.poll_wait, Duration::from_secs(3));
        assert_eq!(
            ignored_env(vars),
            vec!["RELAY_PORT".to_owned(), "RELAY_SERVICE_HOST".to_owned()]
        );
    }

    #[test]
    fn errors_name_their_source() {
        let err = load(None, env(&[("RELAY_NODE__POLL_WAIT", "soon")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("environment variable RELAY_NODE__POLL_WAIT"), "{err}");
        let err = load(None, env(&[("RELAY_NODE__PUBLIC_URL", "http://a")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RELAY_NODE__PUBLIC_URL") && err.contains("https"), "{err}");
        let err = load(None, env(&[("RELAY_NODE__POLL_WIAT", "3s")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RELAY_NODE__POLL_WIAT") && err.contains("poll_wait"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "[node]\npoll_wait = \"later\"\n").unwrap();
        let err = load(Some(&file), env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("relay.toml") && err.contains("node.poll_wait"), "{err}");
        // The variable overrides the file, so it is the one named.
        let err = load(Some(&file), env(&[("RELAY_NODE__POLL_WAIT", "never")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RELAY_NODE__POLL_WAIT") && !err.contains("relay.toml"),
            "{err}"
        );
        let err = load(None, env(&[]), &[("node.public_url", "http://a".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--public-url"), "{err}");
    }

    #[test]
    fn webhook_urls_are_checked() {
        assert!(check_webhook_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_webhook_url("ftp://a").is_err());
        assert!(check_webhook_url("http://").is_err());
        assert!(check_webhook_url("HTTPS://[::1]:8080/h").is_ok());
        assert!(check_webhook_url("relay.example.com/x")
            .unwrap_err()
            .contains("must start with"));
        assert!(check_webhook_url("http://a b/").is_err());
        assert!(check_webhook_url("https://a:99999/").is_err());
    }

    #[test]
    fn webhook_trust_keys_come_from_file_and_environment() {
        let s = load(None, env(&[]), &[]).unwrap();
        assert_eq!((s.delivery.trust, s.delivery.ca_file), (WebhookTrust::System, None));
        let s = load(
            None,
            env(&[
                ("RELAY_DELIVERY__TRUST", "ca"),
                ("RELAY_DELIVERY__CA_FILE", "/etc/relay/webhook-ca.pem"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.delivery.trust, WebhookTrust::Ca);
        assert_eq!(
            s.delivery.ca_file.as_deref(),
            Some(Path::new("/etc/relay/webhook-ca.pem"))
        );
        let s = load(None, env(&[("RELAY_DELIVERY__TRUST", "web")]), &[]).unwrap();
        assert_eq!(s.delivery.trust, WebhookTrust::Web);
        let err = load(None, env(&[("RELAY_DELIVERY__TRUST", "ca")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("delivery.ca_file"), "{err}");
        assert!(load(None, env(&[("RELAY_DELIVERY__TRUST", "pin")]), &[]).is_err());
    }
}
