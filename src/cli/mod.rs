//! The command line: argument definitions and what each command does. `main` only parses
//! and calls [`run`].

pub mod sync;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Info, Request, Side};
use crate::agent::{AcceptOptions, Accepted, AgentConnection};
use crate::config::{LogFormat, Settings};
use crate::daemon::{self, Role};
use crate::error::{Kind, OpError, OpResult};
use crate::invite::Invitation;
use crate::node::{Action, InitiateRequest};
use crate::status::ConnectionStatus;

const EXIT_CODES: &str = "Exit codes: 0 success; 1 failure (for `health`: not healthy, or no daemon runs); \
2 bad arguments; 3 invitation refused (malformed, expired, reused, locked, wrong certificate), \
also when `run` is given one in RELAY_INVITATION or RELAY_INVITATION_FILE; \
78 bad configuration, or every connection revoked (do not restart).";

/// relay: private, outbound-only, durable connections between issue trackers.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (database, certificate, credentials).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Public side: serve agents and manage connections.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Redeem an invitation code (CODE, "-" for stdin, RELAY_INVITATION or RELAY_INVITATION_FILE).
    Accept(AcceptArgs),
    /// Run the agent: every accepted connection and the local intake API. With
    /// RELAY_INVITATION or RELAY_INVITATION_FILE set, first accept that invitation once (with
    /// RELAY_INVITATION_PROJECT as this side's project).
    Run(RunArgs),
    /// Ask the running daemon whether it is alive (or ready); exit 0 if so. For health checks.
    Health(HealthArgs),
    /// Per connection: state, remote, last contact, queues, dead letters, last error.
    Status(JsonArg),
    /// Queue a payload on a connection through the local intake.
    Send(SendArgs),
    /// List, retry or drop the payloads a webhook refused for good, or the other side cannot take.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCommand),
    /// Script mode: sync rules, initial sync, one item now, sync errors.
    #[command(subcommand)]
    Sync(sync::SyncCommand),
    /// Check each connection step by step: DNS, TCP (direct or proxy), TLS, credential, clock, webhook.
    Doctor(JsonArg),
    /// Print the host:port list the agent contacts, for a firewall change request.
    Egress(JsonArg),
    /// Agent: try again a proxy password or keytab that was refused and is held (so that the
    /// domain does not lock the account out), once the account is unlocked or corrected.
    #[command(name = "proxy-retry")]
    ProxyRetry,
    /// Two simulated Azure DevOps instances, a node and an agent on loopback: a work item
    /// synced both ways, narrated.
    Demo(DemoArgs),
    /// Throughput and latency on loopback, beside a direct baseline from the same run.
    Bench(crate::bench::BenchOptions),
}

/// `relay node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Serve agents (HTTPS) and the local API.
    Run(NodeRunArgs),
    /// Create a pending connection; prints its invitation code alone on stdout.
    Initiate(InitiateArgs),
    /// List connections ("unknown" remote while pending).
    Connections(JsonArg),
    /// Pause delivery both ways; messages keep queuing.
    Deactivate(NameArg),
    /// Resume delivery.
    Activate(NameArg),
    /// Kill the connection's credential for good.
    Revoke(NameArg),
    /// Create or upgrade the node's PostgreSQL schema ([store] kind = "postgres"), and say
    /// what was done; safe to run on every replica and every start.
    Migrate(MigrateArgs),
}

/// `relay node migrate` options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Then move the state of the (stopped) node whose sled data directory this is into the
    /// database: connections, credentials, queues; its agents carry on without a new
    /// invitation. The replicas must serve that node's key.
    #[arg(long, value_name = "DIR")]
    pub from_sled: Option<PathBuf>,
}

/// `relay dead-letters …` (works on a node's or an agent's data directory).
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Show a connection's dead letters: sequence number, id, size, age, and why (the
    /// webhook's answer, or the other side's payload limit).
    List {
        /// Connection name.
        connection: String,
        /// Which: `in` (refused by this side's webhook), `out` (too big for the other side), or both.
        #[arg(long, value_enum, default_value = "both")]
        direction: DirectionArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Deliver dead letters again (same message id, so receivers can still drop repeats).
    Retry(DeadLetterTargets),
    /// Delete dead letters for good.
    Drop(DeadLetterTargets),
}

/// Which dead letters.
#[derive(Debug, Args)]
pub struct DeadLetterTargets {
    /// Connection name.
    pub connection: String,
    /// Sequence numbers (from `relay dead-letters list`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub seqs: Vec<u64>,
    /// Every dead letter of the connection.
    #[arg(long)]
    pub all: bool,
    /// Which: `in` (refused by this side's webhook), `out` (too big for the other side: retried
    /// under a new sequence number, e.g. after its limit was raised), or `both` with `--all`.
    #[arg(long, value_enum, default_value = "in")]
    pub direction: DirectionArg,
}

/// `--direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectionArg {
    /// Received payloads this side's webhook refused.
    In,
    /// Payloads for the other side that it cannot take.
    Out,
    /// Both.
    Both,
}

impl From<DirectionArg> for admin::Direction {
    fn from(d: DirectionArg) -> Self {
        match d {
            DirectionArg::In => admin::Direction::In,
            DirectionArg::Out => admin::Direction::Out,
            DirectionArg::Both => admin::Direction::Both,
        }
    }
}

/// `relay demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The Azure DevOps simulator binary (default: `ado-sim` beside this executable).
    #[arg(long, value_name = "PATH")]
    pub ado_sim: Option<std::path::PathBuf>,
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// A connection name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// Connection name.
    pub name: String,
}

/// `relay node run`.
#[derive(Debug, Args)]
pub struct NodeRunArgs {
    /// Agent-facing HTTPS listener.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Local API listener (loopback by default).
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// The https URL agents dial; goes into invitation codes.
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// PEM certificate chain to serve instead of a self-signed one.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// `relay node initiate`.
#[derive(Debug, Args)]
pub struct InitiateArgs {
    /// This (public) instance's short name.
    #[arg(long)]
    pub local_name: String,
    /// The destination (private) instance's short name.
    #[arg(long)]
    pub remote_name: String,
    /// Connection name.
    #[arg(long)]
    pub name: String,
    /// Project for incoming sync.
    #[arg(long)]
    pub project: String,
    /// Description.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Configuration mode.
    #[arg(long, default_value = "script")]
    pub mode: String,
    /// Invitation lifetime, e.g. 24h, 30m, 7d.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expires: Option<Duration>,
    /// Webhook for payloads from the agent.
    #[arg(long, value_name = "URL")]
    pub deliver_to: Option<String>,
}

/// `relay accept`.
#[derive(Debug, Args)]
pub struct AcceptArgs {
    /// The invitation code, or "-" to read it from stdin. Without it: RELAY_INVITATION, then
    /// the file named by RELAY_INVITATION_FILE.
    #[arg(env = "RELAY_INVITATION", hide_env_values = true)]
    pub code: Option<String>,
    /// Webhook for payloads from the node.
    #[arg(long, value_name = "URL")]
    pub deliver_to: Option<String>,
    /// This side's project for incoming sync.
    #[arg(long)]
    pub project: Option<String>,
    /// Local name of the connection (default: the node's).
    #[arg(long)]
    pub name: Option<String>,
}

/// `relay health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Check `/readyz` (connected and delivering) instead of `/healthz` (alive).
    #[arg(long)]
    pub ready: bool,
}

/// `relay run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Local intake API listener (loopback by default).
    #[arg(long, value_name = "ADDR")]
    pub intake_listen: Option<String>,
}

/// `relay send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Connection name.
    pub connection: String,
    /// File with the payload, or "-" (the default) for stdin.
    #[arg(default_value = "-")]
    pub file: String,
    /// Content type of the payload.
    #[arg(long, default_value = "application/json")]
    pub content_type: String,
    /// Idempotency key: a repeat queues nothing.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

impl Cli {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut o = Vec::new();
        let mut add = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                o.push((k, v));
            }
        };
        add("data_dir", self.data_dir.as_ref().map(|p| p.display().to_string()));
        add(
            "log_format",
            self.log_format
                .map(|f| if f == LogFormat::Json { "json" } else { "text" }.to_owned()),
        );
        match &self.command {
            Command::Node(NodeCommand::Run(a)) => {
                add("node.listen", a.listen.clone());
                add("node.api_listen", a.api_listen.clone());
                add("node.public_url", a.public_url.clone());
                add("node.tls_cert", a.tls_cert.as_ref().map(|p| p.display().to_string()));
                add("node.tls_key", a.tls_key.as_ref().map(|p| p.display().to_string()));
            }
            Command::Run(a) => add("agent.intake_listen", a.intake_listen.clone()),
            _ => {}
        }
        o
    }

    /// Loads the settings this invocation runs with.
    pub fn settings(&self) -> OpResult<Settings> {
        crate::config::process_env()
            .and_then(|env| crate::config::load(self.config.as_deref(), env, &self.overrides()))
            .map_err(|e| OpError::new(Kind::Config, e.to_string()))
    }

    /// Whether the command is a long-running daemon (decides the default log level).
    pub fn is_daemon(&self) -> bool {
        matches!(self.command, Command::Node(NodeCommand::Run(_)) | Command::Run(_))
    }
}

/// Runs the parsed command; the error carries the exit code.
pub async fn run(cli: Cli, settings: Settings) -> OpResult<()> {
    match cli.command {
        Command::Node(NodeCommand::Run(_)) => run_daemon(settings, Role::Node).await,
        Command::Run(_) => run_daemon(settings, Role::Agent).await,
        Command::Node(NodeCommand::Initiate(a)) => {
            let request = InitiateRequest {
                name: a.name,
                local_name: a.local_name,
                remote_name: a.remote_name,
                description: a.description,
                mode: a.mode,
                project: a.project,
                expires: a.expires,
                deliver_to: a.deliver_to,
            };
            let code: String = parse(admin_call(&settings, Role::Node, Request::Initiate { request }).await?)?;
            println!("{code}");
            // stdout carries the code alone; when it stops working goes to the admin.
            if let Ok(invitation) = Invitation::decode(&code) {
                let (at, now) = (invitation.expires_at.saturating_mul(1000), crate::status::now_ms());
                eprintln!("the invitation expires {}", crate::status::when(at, now));
            }
            Ok(())
        }
        Command::Node(NodeCommand::Connections(a)) => print_statuses(&settings, Role::Node, a.json).await,
        Command::Status(a) => {
            let role = daemon::recorded_role(&settings.data_dir).unwrap_or(Role::Agent);
            print_statuses(&settings, role, a.json).await
        }
        Command::Node(NodeCommand::Deactivate(n)) => set_state(&settings, n.name, Action::Deactivate).await,
        Command::Node(NodeCommand::Activate(n)) => set_state(&settings, n.name, Action::Activate).await,
        Command::Node(NodeCommand::Revoke(n)) => set_state(&settings, n.name, Action::Revoke).await,
        Command::Node(NodeCommand::Migrate(a)) => migrate(&settings, a.from_sled.as_deref()).await,
        Command::Accept(a) => accept(&settings, a).await,
        Command::Send(a) => send(&settings, a).await,
        Command::DeadLetters(c) => dead_letter_command(&settings, c).await,
        Command::Sync(c) => sync::run(&settings, c).await,
        Command::Doctor(a) => doctor(&settings, a.json).await,
        Command::Egress(a) => {
            let conns: Vec<AgentConnection> =
                parse(admin_call(&settings, Role::Agent, Request::AgentConnections).await?)?;
            let list = crate::doctor::egress(&settings, &conns);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                print!("{}", crate::doctor::render_egress(&list));
            }
            Ok(())
        }
        Command::ProxyRetry => {
            let answer = admin_call(&settings, Role::Agent, Request::ProxyRetry).await?;
            match answer.get("released").and_then(serde_json::Value::as_u64).unwrap_or(0) {
                0 => println!("no proxy credential is held"),
                n => println!("released {n} held proxy credential(s): the agent tries them at its next tunnel"),
            }
            Ok(())
        }
        Command::Health(a) => health(&settings, a.ready).await,
        Command::Demo(a) => crate::demo::run(a.ado_sim).await,
        Command::Bench(o) => crate::bench::run(o).await,
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> OpResult<T> {
    serde_json::from_value(v).map_err(|e| OpError::new(Kind::Failed, format!("unexpected answer: {e}")))
}

/// Sends `req` to the running daemon, or answers it in this process when none runs.
pub async fn admin_call(settings: &Settings, role: Role, req: Request) -> OpResult<serde_json::Value> {
    if let Some(v) = admin::call(&settings.data_dir, &req).await? {
        return Ok(v);
    }
    // Only initiate and accept may start a fresh data directory; a typo in --data-dir must
    // not silently create one.
    if !matches!(req, Request::Initiate { .. } | Request::Accept { .. }) {
        require_data(settings)?;
    }
    let side = daemon::open_side(settings, role).await?;
    let info = Info {
        role: match role {
            Role::Node => "node",
            Role::Agent => "agent",
        }
        .into(),
        ..Info::default()
    };
    admin::dispatch(&side, &info, req).await
}

fn require_data(settings: &Settings) -> OpResult<()> {
    if daemon::recorded_role(&settings.data_dir).is_none() {
        return Err(OpError::new(
            Kind::Config,
            format!(
                "{} holds no relay data: check --data-dir (or RELAY_DATA_DIR); `relay node initiate` or `relay accept` creates it",
                settings.data_dir.display()
            ),
        ));
    }
    Ok(())
}

/// `relay node migrate`: the schema of the node's PostgreSQL database, made or upgraded, and
/// with `--from-sled DIR` that node's state moved in.
async fn migrate(settings: &Settings, from_sled: Option<&std::path::Path>) -> OpResult<()> {
    if settings.store.kind != crate::config::StoreKind::Postgres {
        return Err(OpError::new(
            Kind::Config,
            "relay node migrate is for a node on PostgreSQL: set store.kind = \"postgres\" and store.url (or \
             store.url_file); a node on sled needs no migration",
        ));
    }
    let store = daemon::connect_postgres(settings).await?;
    let done = store.migrate().await.map_err(|e| match e {
        crate::store::QueueError::Schema(m) => OpError::new(Kind::Config, m),
        other => OpError::new(Kind::Failed, other.to_string()),
    })?;
    println!("{}: {done}", store.display_url());
    let Some(dir) = from_sled else {
        return Ok(());
    };
    // The key that node served, which its agents pin.
    let mut source = settings.clone();
    source.data_dir = dir.to_owned();
    let pin = daemon::node_identity(&source)?.pin;
    let moved = crate::node::moving::from_sled(dir, settings.queue.cache_bytes, &store, &pin).await?;
    println!(
        "{moved} from {}; every replica must serve that node's key (pin {}): node.tls_cert and node.tls_key, \
         or the files in {}",
        dir.display(),
        crate::tls::format_pin(&pin),
        dir.join("tls").display()
    );
    Ok(())
}

async fn run_daemon(settings: Settings, role: Role) -> OpResult<()> {
    use crate::notify::Notifier;
    let token = CancellationToken::new();
    crate::shutdown::cancel_on_signals(token.clone())
        .map_err(|e| OpError::new(Kind::Failed, format!("cannot install signal handlers: {e}")))?;
    // READY=1 goes out once the listeners are bound and the database is open.
    let (task, notifier) = match role {
        Role::Node => {
            let running = daemon::start_node(settings, token.clone()).await?;
            let node = running.side.clone();
            let statuses: crate::notify::Statuses = Arc::new(move || {
                let node = node.clone();
                Box::pin(async move { node.connections().await })
            });
            (running.task, Notifier::start(statuses, token).await)
        }
        Role::Agent => {
            // Decode before touching the data directory: a bad code fails fast.
            let invitation = invitation_from_env()?;
            let agent = daemon::open_agent(&settings)?;
            if let Some((invitation, source)) = invitation {
                let options = AcceptOptions {
                    project: invitation_project(),
                    ..AcceptOptions::default()
                };
                if agent
                    .accept_once(&invitation, &source, options, &token)
                    .await?
                    .is_none()
                {
                    tracing::info!("stopped before the invitation was accepted");
                    return Ok(());
                }
            }
            let running = daemon::serve_agent(agent, token.clone()).await?;
            let agent = running.side.clone();
            let statuses: crate::notify::Statuses = Arc::new(move || Box::pin(std::future::ready(agent.status())));
            (running.task, Notifier::start(statuses, token).await)
        }
    };
    let result = task
        .await
        .map_err(|e| OpError::new(Kind::Failed, format!("the daemon task failed: {e}")))?;
    notifier.stop();
    if result.is_ok() {
        tracing::info!("stopped cleanly");
    }
    result
}

async fn dead_letter_command(settings: &Settings, command: DeadLetterCommand) -> OpResult<()> {
    use crate::admin::{DeadLetterAction, DeadLetterOutcome, Direction};
    let (connection, action, direction, json, verb) = match command {
        DeadLetterCommand::List {
            connection,
            direction,
            json,
        } => (connection, DeadLetterAction::List, direction, json, ""),
        DeadLetterCommand::Retry(t) => (
            t.connection,
            DeadLetterAction::Retry {
                seqs: t.seqs,
                all: t.all,
            },
            t.direction,
            false,
            "queued again for delivery",
        ),
        DeadLetterCommand::Drop(t) => (
            t.connection,
            DeadLetterAction::Drop {
                seqs: t.seqs,
                all: t.all,
            },
            t.direction,
            false,
            "dropped",
        ),
    };
    let direction = Direction::from(direction);
    let role = daemon::recorded_role(&settings.data_dir).unwrap_or(Role::Agent);
    let outcome: DeadLetterOutcome = parse(
        admin_call(
            settings,
            role,
            Request::DeadLetters {
                connection: connection.clone(),
                action,
                direction,
            },
        )
        .await?,
    )?;
    let sections = [
        (Direction::In, "inbound", &outcome.dead_letters),
        (Direction::Out, "outbound", &outcome.outbound),
    ];
    let shown = sections
        .iter()
        .filter(|(d, _, _)| direction == Direction::Both || direction == *d);
    if json {
        let mut all = Vec::new();
        for (_, label, list) in shown {
            for d in list.iter() {
                let mut v = serde_json::to_value(d).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("direction".into(), serde_json::Value::from(*label));
                }
                all.push(v);
            }
        }
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        return Ok(());
    }
    if !verb.is_empty() {
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        if !outcome.done.is_empty() {
            println!(
                "{} dead letter(s) {verb}: seq {}",
                outcome.done.len(),
                list(&outcome.done)
            );
        }
        if !outcome.missing.is_empty() {
            println!("not dead letters of {connection:?}: seq {}", list(&outcome.missing));
        }
    }
    let now = crate::status::now_ms();
    for (_, label, list) in shown {
        // One direction reads as before; both say which is which.
        let label = if direction == Direction::Both {
            format!("{label} ")
        } else {
            String::new()
        };
        if list.is_empty() {
            println!("{connection}: no {label}dead letters");
        } else if !label.is_empty() {
            println!("{connection}: {label}dead letters");
        }
        for d in list.iter() {
            println!(
                "seq {:<8} id {}  {:>8} bytes  {:<10} dead {}: {}",
                d.seq,
                d.id,
                d.bytes,
                d.content_type,
                crate::status::when(d.dead_at_ms, now),
                d.reason
            );
        }
    }
    if !outcome.missing.is_empty() {
        return Err(OpError::new(
            Kind::NotFound,
            "some sequence numbers were not dead letters",
        ));
    }
    Ok(())
}

async fn doctor(settings: &Settings, json: bool) -> OpResult<()> {
    let node = daemon::recorded_role(&settings.data_dir) == Some(Role::Node)
        || settings.store.kind == crate::config::StoreKind::Postgres;
    if node {
        if settings.store.kind != crate::config::StoreKind::Postgres {
            return Err(OpError::new(
                Kind::Failed,
                "nothing to check: relay doctor checks an agent's connections, or a node's PostgreSQL database; \
                 this node keeps its state in sled",
            ));
        }
        let reports = vec![crate::doctor::diagnose_store(settings).await];
        return report_checks(&reports, json);
    }
    let conns: Vec<AgentConnection> = parse(admin_call(settings, Role::Agent, Request::AgentConnections).await?)?;
    let mut reports = Vec::new();
    for conn in &conns {
        let path = settings
            .data_dir
            .join("credentials")
            .join(format!("{}.cred", conn.name));
        let credential = std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("cannot read {}: {e} (run as the service's user)", path.display()));
        reports.push(crate::doctor::diagnose(settings, conn, credential).await);
    }
    report_checks(&reports, json)?;
    if conns.is_empty() {
        return Err(OpError::new(Kind::Failed, "nothing to check: no accepted connection"));
    }
    Ok(())
}

/// Prints doctor's reports; `Err` when a check failed.
fn report_checks(reports: &[crate::doctor::Report], json: bool) -> OpResult<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&reports).unwrap_or_default());
    } else {
        print!("{}", crate::doctor::render(reports));
    }
    let failed: usize = reports
        .iter()
        .map(|r| {
            r.checks
                .iter()
                .filter(|c| c.outcome == crate::doctor::Outcome::Fail)
                .count()
        })
        .sum();
    if failed > 0 {
        return Err(OpError::new(Kind::Failed, format!("{failed} check(s) failed")));
    }
    Ok(())
}

async fn print_statuses(settings: &Settings, role: Role, json: bool) -> OpResult<()> {
    let list: Vec<ConnectionStatus> = parse(admin_call(settings, role, Request::Status).await?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
    } else {
        print!("{}", crate::status::render(&list));
    }
    Ok(())
}

async fn set_state(settings: &Settings, name: String, action: Action) -> OpResult<()> {
    let status: ConnectionStatus = parse(admin_call(settings, Role::Node, Request::SetState { name, action }).await?)?;
    println!("{}: {}", status.name, status.state);
    Ok(())
}

/// Environment variable with the invitation code.
const INVITATION_ENV: &str = "RELAY_INVITATION";
/// Environment variable naming a file with the invitation code (a Docker or systemd secret).
const INVITATION_FILE_ENV: &str = "RELAY_INVITATION_FILE";

/// Environment variable with this side's project for the invitation `relay run` accepts
/// (what `relay accept --project` gives), for an agent with a tracker.
const INVITATION_PROJECT_ENV: &str = "RELAY_INVITATION_PROJECT";

/// RELAY_INVITATION_PROJECT, when set and not blank.
fn invitation_project() -> Option<String> {
    std::env::var(INVITATION_PROJECT_ENV)
        .ok()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
}

/// Reads an invitation code from a file, whitespace trimmed. The message never quotes the
/// content.
fn read_invitation_file(path: &std::path::Path) -> OpResult<String> {
    let mut code = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_string(&mut code))
        .map_err(|e| {
            OpError::new(
                Kind::Config,
                format!(
                    "cannot read the invitation code from {} ({INVITATION_FILE_ENV}): {e}",
                    path.display()
                ),
            )
        })?;
    Ok(code.trim().to_owned())
}

/// The invitation a container hands `relay run`: RELAY_INVITATION, else the file named by
/// RELAY_INVITATION_FILE; decoded (not yet checked for expiry: a later start must still
/// recognise an invitation accepted long ago). Also says where it came from, for messages.
fn invitation_from_env() -> OpResult<Option<(Invitation, String)>> {
    let (code, source) = match std::env::var(INVITATION_ENV) {
        Ok(code) if !code.trim().is_empty() => (code, INVITATION_ENV.to_owned()),
        _ => match std::env::var_os(INVITATION_FILE_ENV) {
            Some(path) => {
                let path = PathBuf::from(path);
                let source = format!("{INVITATION_FILE_ENV} ({})", path.display());
                (read_invitation_file(&path)?, source)
            }
            None => return Ok(None),
        },
    };
    let invitation = Invitation::decode(&code)
        .map_err(|e| OpError::new(Kind::Invitation, format!("the invitation in {source} is unusable: {e}")))?;
    Ok(Some((invitation, source)))
}

/// Reads the invitation from the argument, stdin ("-"), RELAY_INVITATION or the file named by
/// RELAY_INVITATION_FILE, and checks it offline (prefix, checksum, https, expiry) before any
/// network call.
fn read_code(arg: Option<String>) -> OpResult<Invitation> {
    let code = match arg.as_deref() {
        Some("-") => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_end(&mut bytes)
                .map_err(|e| OpError::new(Kind::Invalid, format!("cannot read the code from stdin: {e}")))?;
            // Bytes that are no text are a malformed code (exit 3), not a usage error.
            String::from_utf8(bytes).map_err(|e| {
                OpError::new(
                    Kind::Invitation,
                    format!(
                        "the invitation code on stdin is not text (byte {} is not UTF-8); paste the one-line rlyinv1_ code",
                        e.utf8_error().valid_up_to()
                    ),
                )
            })?
        }
        Some(c) => c.to_owned(),
        None => match std::env::var_os(INVITATION_FILE_ENV) {
            Some(path) => read_invitation_file(&PathBuf::from(path))?,
            None => {
                return Err(OpError::new(
                    Kind::Invalid,
                    "no invitation code: pass it as an argument, \"-\" to read stdin, or set RELAY_INVITATION or RELAY_INVITATION_FILE",
                ))
            }
        },
    };
    let invitation = Invitation::decode(&code).map_err(|e| OpError::new(Kind::Invitation, e.to_string()))?;
    invitation
        .check_expiry(crate::status::now_ms() / 1000)
        .map_err(|e| OpError::new(Kind::Invitation, e.to_string()))?;
    Ok(invitation)
}

async fn accept(settings: &Settings, a: AcceptArgs) -> OpResult<()> {
    let invitation = read_code(a.code)?;
    let options = AcceptOptions {
        name: a.name,
        deliver_to: a.deliver_to,
        project: a.project,
    };
    let req = Request::Accept {
        code: invitation.encode(),
        options,
    };
    let accepted: Accepted = parse(admin_call(settings, Role::Agent, req).await?)?;
    let c = accepted.connection;
    println!("accepted connection {:?}", c.name);
    println!("  node:        {} at {}", c.node_instance, c.node_url);
    println!(
        "  this side:   {} (the node knows it as {:?})",
        c.reported_instance, c.local_instance
    );
    println!("  node's name: {}", c.node_connection);
    if !c.description.is_empty() {
        println!("  description: {}", c.description);
    }
    println!("  mode:        {}", c.mode);
    println!(
        "  projects:    incoming here {:?}, incoming on the node {:?}",
        c.project, c.node_project
    );
    match c.deliver_to.as_ref().or(settings.agent.deliver_to.as_ref()) {
        Some(url) => println!("  deliver to:  {url}"),
        None => println!(
            "  deliver to:  (none: set agent.deliver_to and restart; payloads from the node are held until then)"
        ),
    }
    Ok(())
}

async fn send(settings: &Settings, a: SendArgs) -> OpResult<()> {
    let limit = settings.queue.max_payload_bytes;
    let mut body = Vec::new();
    let read = if a.file == "-" {
        std::io::stdin().take(limit + 1).read_to_end(&mut body)
    } else {
        std::fs::File::open(&a.file).and_then(|f| f.take(limit + 1).read_to_end(&mut body))
    };
    read.map_err(|e| OpError::new(Kind::Invalid, format!("cannot read {}: {e}", a.file)))?;
    if body.len() as u64 > limit {
        return Err(OpError::new(
            Kind::Invalid,
            format!("the payload is larger than the limit of {limit} bytes (queue.max_payload_bytes)"),
        ));
    }
    // The same checks as the local API, so nothing unsendable reaches a queue.
    if !crate::protocol::valid_content_type(&a.content_type) {
        return Err(OpError::new(
            Kind::Invalid,
            "--content-type must be 1 to 255 visible ASCII characters",
        ));
    }
    if a.idempotency_key
        .as_deref()
        .is_some_and(|k| !crate::intake::valid_idempotency_key(k))
    {
        return Err(OpError::new(
            Kind::Invalid,
            "--idempotency-key must be 1 to 255 visible ASCII characters",
        ));
    }
    let role = daemon::recorded_role(&settings.data_dir).unwrap_or(Role::Agent);
    let result = match admin::call(&settings.data_dir, &Request::Info).await? {
        Some(info) => {
            let info: Info = parse(info)?;
            let api = info
                .api
                .ok_or_else(|| OpError::new(Kind::Failed, "the running daemon reports no local API"))?;
            let token = match role {
                Role::Node => settings.node.api_token.clone(),
                Role::Agent => settings.agent.api_token.clone(),
            };
            send_http(&api, &a, body, token).await?
        }
        None => {
            require_data(settings)?;
            send_local(settings, role, &a, body).await?
        }
    };
    println!("{result}");
    Ok(())
}

async fn send_http(
    api: &str,
    a: &SendArgs,
    body: Vec<u8>,
    token: Option<crate::config::Secret>,
) -> OpResult<serde_json::Value> {
    use crate::http;
    let url = format!("http://{}/v1/connections/{}/messages", local_host(api), a.connection);
    let auth = token.map(|t| format!("Bearer {}", t.expose()));
    let mut headers = vec![("content-type", a.content_type.as_str())];
    if let Some(k) = &a.idempotency_key {
        headers.push(("idempotency-key", k.as_str()));
    }
    if let Some(auth) = &auth {
        headers.push(("authorization", auth.as_str()));
    }
    let req = http::request(http::Method::POST, &url, &headers, body)
        .map_err(|e| OpError::new(Kind::Invalid, e.to_string()))?;
    let tls = crate::tls::local_client_config().map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
    let reply = http::Client::webhook(tls, Duration::from_secs(10))
        .send(req, Duration::from_secs(60), 1024 * 1024)
        .await
        .map_err(|e| OpError::new(Kind::Failed, format!("local API {url}: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null);
    if reply.status.is_success() {
        Ok(value)
    } else {
        let message = value
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("local API answered {}", reply.status));
        let kind = if reply.status == http::StatusCode::NOT_FOUND {
            Kind::NotFound
        } else {
            Kind::Failed
        };
        Err(OpError::new(kind, message))
    }
}

/// A daemon's listen address as this host dials it: an unspecified address means loopback.
fn local_host(api: &str) -> String {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    match api.parse::<SocketAddr>() {
        Ok(mut addr) if addr.ip().is_unspecified() => {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
            addr.to_string()
        }
        _ => api.to_owned(),
    }
}

/// `relay health`: asks the daemon of the data directory for its local API address, then
/// GETs `/healthz` (or `/readyz`) there and prints the answer. Needs no curl in a container.
async fn health(settings: &Settings, ready: bool) -> OpResult<()> {
    use crate::http;
    let info: Info = match admin::call(&settings.data_dir, &Request::Info).await? {
        Some(v) => parse(v)?,
        None => {
            return Err(OpError::new(
                Kind::Failed,
                format!(
                    "no relay daemon is running for {} (its admin socket does not answer); check --data-dir or RELAY_DATA_DIR",
                    settings.data_dir.display()
                ),
            ))
        }
    };
    let api = info
        .api
        .ok_or_else(|| OpError::new(Kind::Failed, "the running daemon reports no local API"))?;
    let path = if ready { "readyz" } else { "healthz" };
    let url = format!("http://{}/{path}", local_host(&api));
    let req = http::request(http::Method::GET, &url, &[], Vec::new())
        .map_err(|e| OpError::new(Kind::Failed, format!("{url}: {e}")))?;
    let tls = crate::tls::local_client_config().map_err(|e| OpError::new(Kind::Failed, e.to_string()))?;
    let reply = http::Client::webhook(tls, Duration::from_secs(5))
        .send(req, Duration::from_secs(10), 64 * 1024)
        .await
        .map_err(|e| OpError::new(Kind::Failed, format!("{url}: {e}")))?;
    let answer = String::from_utf8_lossy(&reply.body);
    println!("{}", answer.trim_end());
    if reply.status == http::StatusCode::OK {
        Ok(())
    } else {
        Err(OpError::new(Kind::Failed, format!("{url} answered {}", reply.status)))
    }
}

async fn send_local(settings: &Settings, role: Role, a: &SendArgs, body: Vec<u8>) -> OpResult<serde_json::Value> {
    use crate::intake::IntakeTarget;
    use crate::store::NodeQueue;
    let side = daemon::open_side(settings, role).await?;
    let outbox = match &side {
        Side::Node(n) => n.outbox(&a.connection).await,
        Side::Agent(ag) => ag.outbox(&a.connection).await,
    };
    let outbox = outbox.map_err(|r| {
        let kind = if r.status == crate::http::StatusCode::NOT_FOUND {
            Kind::NotFound
        } else {
            Kind::Failed
        };
        OpError::new(kind, r.message)
    })?;
    let appended = outbox
        .append(
            crate::store::NewMessage {
                id: crate::crypto::random_id(),
                content_type: a.content_type.clone(),
                enqueued_at_ms: crate::status::now_ms(),
                body: body.into(),
            },
            a.idempotency_key.as_deref(),
        )
        .await?;
    Ok(serde_json::json!({ "id": appended.id, "seq": appended.seq }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_dialled_on_loopback() {
        assert_eq!(local_host("0.0.0.0:8081"), "127.0.0.1:8081");
        assert_eq!(local_host("[::]:8081"), "[::1]:8081");
        assert_eq!(local_host("10.0.0.0:8081"), "10.0.0.0:8081");
        assert_eq!(local_host("127.0.0.1:9"), "127.0.0.1:9");
    }
}
