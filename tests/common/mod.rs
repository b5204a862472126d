//! Helpers for the end-to-end tests: start the real binary on ephemeral ports with temporary
//! data directories, run CLI commands, and wait for conditions with deadlines (never sleeps
//! as synchronisation).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use relay::admin::{self, Info, Request};
use relay::status::ConnectionStatus;

pub mod postgres;

/// How long any condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Settings every spawned process gets: quick retries so recovery is observed fast.
pub const FAST: &[(&str, &str)] = &[
    ("RELAY_LOG", "info"),
    ("RELAY_DELIVERY__BACKOFF_INITIAL", "50ms"),
    ("RELAY_DELIVERY__BACKOFF_MAX", "500ms"),
    ("RELAY_AGENT__POLL_WAIT", "5s"),
    ("RELAY_AGENT__REQUEST_TIMEOUT", "10s"),
];

/// A test that needs a program from Debian's packages and did not find it: a failure when
/// the variable `require` is set (as `.ci/run` sets it), otherwise `SKIPPED {test}: {why}` on
/// stderr and the test passes.
pub fn skip_unless_required(test: &str, require: &str, why: &str) {
    let required = std::env::var_os(require).is_some_and(|v| !v.is_empty() && v != "0");
    assert!(!required, "{test}: {why}, and {require} is set");
    // Straight to stderr, not `eprintln!`: the harness captures that and would hide the skip
    // from a passing run.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why}; set {require}=1 to make this a failure, as .ci/run does"
    );
}

/// Path of the built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_relay")
}

/// Variables a service manager sets; a test sets them only on purpose.
const SERVICE_MANAGER_VARS: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"];

fn prepare(mut cmd: Command, data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    for (k, _) in std::env::vars() {
        // Settings, proxies and service-manager variables come only from what each test says.
        let proxy = ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"].contains(&k.to_ascii_uppercase().as_str());
        if k.starts_with("RELAY_") || proxy || SERVICE_MANAGER_VARS.contains(&k.as_str()) {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--data-dir").arg(data_dir).args(args);
    for (k, v) in FAST.iter().chain(env) {
        cmd.env(k, v);
    }
    cmd
}

/// `relay --data-dir DIR ARGS` with the [`FAST`] settings and `env`, and no `RELAY_…` or
/// service-manager variables inherited from the test's environment.
pub fn command(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    prepare(Command::new(bin()), data_dir, args, env)
}

/// Like [`command`], run as `sh -c 'SCRIPT; exec relay …'`: for variables that must hold the
/// process's own pid (`$$` survives the `exec`), as systemd's `WATCHDOG_PID` does.
pub fn command_via_shell(script: &str, data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("{script}; exec \"$0\" \"$@\"")).arg(bin());
    prepare(cmd, data_dir, args, env)
}

/// `WRAPPER… relay --data-dir DIR ARGS`, prepared as [`command`]: relay run under another
/// program that execs or traces it (`strace -f -o FILE --`).
pub fn wrapped_command(wrapper: &[&str], data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let (program, rest) = wrapper.split_first().expect("a wrapper program");
    let mut cmd = Command::new(program);
    cmd.args(rest).arg(bin());
    prepare(cmd, data_dir, args, env)
}

/// A fresh path for a daemon's stderr, beside its data directory.
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.with_extension(format!("{}.log", unique()))
}

/// A daemon started from the binary.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Its admin info (addresses).
    pub info: Info,
}

impl Daemon {
    /// Starts `relay ARGS` and waits until its admin socket answers.
    pub async fn start(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_command(command(data_dir, args, env), data_dir, log_path(data_dir)).await
    }

    /// Spawns `cmd` (from [`command`]) with stderr to `log` and waits until its admin socket
    /// answers with its pid.
    pub async fn start_command(cmd: Command, data_dir: &Path, log: PathBuf) -> Daemon {
        Daemon::spawn(cmd, data_dir, log, true).await
    }

    /// Spawns `cmd` (from [`wrapped_command`]): relay is a child of the wrapper, so the admin
    /// socket answers with another pid than the child's; `info.pid` is relay's.
    pub async fn start_wrapped(cmd: Command, data_dir: &Path, log: PathBuf) -> Daemon {
        Daemon::spawn(cmd, data_dir, log, false).await
    }

    async fn spawn(mut cmd: Command, data_dir: &Path, log: PathBuf, own_pid: bool) -> Daemon {
        std::fs::create_dir_all(data_dir).unwrap();
        let args = format!("{cmd:?}");
        // Truncates an existing file in place, so its inode (JOURNAL_STREAM) stays the same.
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn relay");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let info = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{args} exited early with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(Some(v)) = admin::call(data_dir, &Request::Info).await {
                let info: Info = serde_json::from_value(v).unwrap();
                if info.pid == child.id() || !own_pid {
                    break info;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "{args} did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Daemon {
            child,
            data_dir: data_dir.to_owned(),
            log,
            info,
        }
    }

    /// The local API (node) or intake (agent) base URL.
    pub fn api(&self) -> String {
        format!("http://{}", self.info.api.as_deref().unwrap())
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; the exit status within the deadline.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        self.wait_exit().await
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.info.pid != self.child.id() {
            // Started wrapped: relay itself may outlive its wrapper.
            let _ = Command::new("kill")
                .args(["-KILL", &self.info.pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the tests run as root (proxies then drop to their own user, and permission checks
/// do not bind).
pub fn is_root() -> bool {
    relay::fsutil::effective_uid() == 0
}

/// A number no other call in this process returns.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Starts `relay node run` on ephemeral loopback ports, serving the PEM certificate and key
/// given (or its self-signed one when `tls` is `None`).
pub async fn start_node(data_dir: &Path, tls: Option<(&Path, &Path)>) -> Daemon {
    let mut args = vec!["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
    let paths = tls.map(|(c, k)| (c.display().to_string(), k.display().to_string()));
    if let Some((c, k)) = &paths {
        args.extend(["--tls-cert", c.as_str(), "--tls-key", k.as_str()]);
    }
    Daemon::start(data_dir, &args, &[]).await
}

/// Owned `NAME=VALUE` pairs as the `&[(&str, &str)]` the helpers here take.
pub fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Like [`command`], running another relay binary (a benchmark's baseline build).
pub fn command_of(program: &str, data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    prepare(Command::new(program), data_dir, args, env)
}

/// Runs `relay ARGS` to completion (off the async runtime's threads).
pub async fn cli(data_dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    cli_of(bin(), data_dir, args, env, stdin).await
}

/// [`cli`] with another relay binary.
pub async fn cli_of(
    program: &str,
    data_dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> Output {
    let mut cmd = command_of(program, data_dir, args, env);
    let input = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn relay");
        if let Some(text) = input {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a CLI command that must succeed; returns stdout.
pub async fn cli_ok(data_dir: &Path, args: &[&str]) -> String {
    let o = cli(data_dir, args, &[], None).await;
    assert!(
        o.status.success(),
        "relay {args:?} failed: {}\n{}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

/// Polls `probe` every 20 ms until it yields a value; panics after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Statuses through the CLI (`relay node connections --json` or `relay status --json`).
pub async fn statuses(data_dir: &Path, node: bool) -> Vec<ConnectionStatus> {
    let args: &[&str] = if node {
        &["node", "connections", "--json"]
    } else {
        &["status", "--json"]
    };
    serde_json::from_str(&cli_ok(data_dir, args).await).unwrap()
}

/// `relay node initiate` with a standard form; returns the code.
pub async fn initiate(node_dir: &Path, name: &str, deliver_to: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "node",
        "initiate",
        "--local-name",
        "ado-services",
        "--remote-name",
        "ado-server",
        "--name",
        name,
        "--project",
        "Fabrikam",
        "--description",
        "Services to Server",
        "--deliver-to",
        deliver_to,
    ];
    args.extend_from_slice(extra);
    let out = cli_ok(node_dir, &args).await;
    let code = out.trim().to_owned();
    assert!(code.starts_with("rlyinv1_") && !code.contains('\n'), "{out:?}");
    code
}

/// A loopback port that refuses connections for as long as the returned socket lives: bound,
/// never listening, so no other test or outgoing connection can take it meanwhile.
pub fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// Settings for a node or an agent run inside the test process: loopback listeners on
/// ephemeral ports, quick retries.
pub fn in_process(dir: &Path) -> relay::config::Settings {
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut s = relay::config::Settings {
        data_dir: dir.to_owned(),
        ..relay::config::Settings::default()
    };
    s.node.listen = loopback;
    s.node.api_listen = loopback;
    s.agent.intake_listen = loopback;
    s.delivery.backoff_initial = Duration::from_millis(20);
    s.delivery.backoff_max = Duration::from_millis(200);
    s
}

/// Initiates connection "c" on an in-process node and accepts it on an in-process agent
/// that delivers to `hook`.
pub async fn connect(node: &relay::node::Node, agent: &relay::agent::Agent, hook: &str) {
    let code = node
        .initiate(relay::node::InitiateRequest::script("c", "pub", "priv", "P"))
        .await
        .unwrap();
    agent
        .accept(
            &relay::invite::Invitation::decode(&code).unwrap(),
            relay::agent::AcceptOptions {
                deliver_to: Some(hook.to_owned()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

/// A plain HTTP client for local APIs.
pub fn client() -> relay::http::Client {
    relay::http::Client::webhook(relay::tls::local_client_config().unwrap(), Duration::from_secs(10))
}

/// POSTs a payload to a local API; returns (status, JSON body).
pub async fn post(
    client: &relay::http::Client,
    api: &str,
    conn: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Result<(u16, serde_json::Value), String> {
    let url = format!("{api}/v1/connections/{conn}/messages");
    let req = relay::http::request(relay::http::Method::POST, &url, headers, body).map_err(|e| e.to_string())?;
    let reply = client
        .send(req, Duration::from_secs(30), 1 << 20)
        .await
        .map_err(|e| e.to_string())?;
    let json = serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null);
    Ok((reply.status.as_u16(), json))
}

/// `GET {api}{path}` on a local API; returns (status, body as text).
pub async fn get(api: &str, path: &str) -> (u16, String) {
    let req = relay::http::request(relay::http::Method::GET, &format!("{api}{path}"), &[], Vec::new()).unwrap();
    let r = client().send(req, Duration::from_secs(10), 1 << 20).await.unwrap();
    (r.status.as_u16(), String::from_utf8_lossy(&r.body).into_owned())
}

/// Drains a sink into a shared list.
pub fn collect(mut sink: relay::sink::Sink) -> std::sync::Arc<std::sync::Mutex<Vec<relay::sink::Received>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(r) = sink.rx.recv().await {
            s.lock().unwrap().push(r);
        }
    });
    seen
}

/// The bodies a sink answered with 200, in arrival order.
pub fn bodies(seen: &std::sync::Mutex<Vec<relay::sink::Received>>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}
