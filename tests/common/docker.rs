//! Helpers for the container tests: find a Docker engine (or skip loudly), the Debian base
//! image and the relay image built from the repository's Dockerfile, run `docker` and
//! `docker-compose`, and remove everything a test created, even when it fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::{bin, skip_unless_required};

/// The variable that turns a missing engine or base image into a failure (`.ci/run` sets it).
pub const REQUIRE: &str = "REQUIRE_DOCKER";
/// Names the Debian base image every container of the tests starts from (made by `.ci/run`
/// with debootstrap: minbase plus ca-certificates, tinyproxy and systemd).
pub const BASE_ENV: &str = "RELAY_TEST_BASE";
/// Names a relay image already built from the Dockerfile; without it the tests build one.
pub const IMAGE_ENV: &str = "RELAY_TEST_IMAGE";
/// The base image's name when `RELAY_TEST_BASE` is not set.
pub const DEFAULT_BASE: &str = "relay-test-base:bookworm";

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `docker ARGS` to completion.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

/// `docker ARGS`, which must succeed; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What the container tests start from.
#[derive(Debug, Clone)]
pub struct Images {
    /// The Debian base (simulators, the proxy, systemd).
    pub base: String,
    /// relay's image, built from the Dockerfile with this build's binary.
    pub relay: String,
}

/// The engine and the images, or `None` after saying `SKIPPED` (a failure under
/// `REQUIRE_DOCKER=1`).
pub fn images(test: &str) -> Option<Images> {
    static ENGINE: OnceLock<Result<(), String>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let out = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "no Docker engine answers ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("no docker command ({e})")),
        }
    });
    if let Err(why) = engine {
        skip_unless_required(test, REQUIRE, why);
        return None;
    }
    let base = std::env::var(BASE_ENV).unwrap_or_else(|_| DEFAULT_BASE.to_owned());
    if !docker(&["image", "inspect", &base]).status.success() {
        skip_unless_required(
            test,
            REQUIRE,
            &format!("no base image {base} (`.ci/run images` makes it with debootstrap)"),
        );
        return None;
    }
    static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
    let relay = IMAGE.get_or_init(|| match std::env::var(IMAGE_ENV) {
        Ok(image) => Ok(image),
        Err(_) => build_image(&base, "relay-test:latest"),
    });
    match relay {
        Ok(relay) => Some(Images {
            base,
            relay: relay.clone(),
        }),
        Err(e) => panic!("{test}: building relay's image: {e}"),
    }
}

/// A docker client that builds with BuildKit (the Dockerfile needs it to skip the stage that
/// compiles): `docker` with buildx, else Debian's docker.io client (20.10), which carries
/// BuildKit itself.
fn buildkit_client() -> Result<String, String> {
    let works = |client: &str, args: &[&str]| {
        Command::new(client)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works("docker", &["buildx", "version"]) {
        return Ok("docker".into());
    }
    for client in ["/usr/bin/docker", "/bin/docker"] {
        let out = Command::new(client)
            .args(["version", "--format", "{{.Client.Version}}"])
            .stdin(Stdio::null())
            .output();
        if let Ok(o) = out {
            let version = String::from_utf8_lossy(&o.stdout);
            let major: u32 = version
                .split('.')
                .next()
                .and_then(|m| m.trim().parse().ok())
                .unwrap_or(0);
            if (18..23).contains(&major) {
                return Ok(client.into());
            }
        }
    }
    Err("no docker client builds with BuildKit: install buildx (docker-buildx-plugin)".into())
}

/// Builds `tag` from the repository's Dockerfile: its runtime stage, with this build's relay
/// binary (debug information stripped) as the prebuilt binary and `base` as the Debian base.
pub fn build_image(base: &str, tag: &str) -> Result<String, String> {
    let ctx = tempfile::tempdir().map_err(|e| e.to_string())?;
    let binary = ctx.path().join("relay");
    let strip = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&binary)
        .arg(bin())
        .status();
    if !strip.is_ok_and(|s| s.success()) {
        std::fs::copy(bin(), &binary).map_err(|e| format!("copying {}: {e}", bin()))?;
    }
    let client = buildkit_client()?;
    let out = Command::new(&client)
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "--quiet", "--tag", tag, "--build-arg"])
        .arg(format!("BASE={base}"))
        .args(["--build-arg", "BINARY=prebuilt", "--file"])
        .arg(repo().join("Dockerfile"))
        .arg(ctx.path())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{client}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{client} build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(tag.to_owned())
}

/// The ado-sim binary `cargo build --workspace` put beside relay's.
pub fn ado_sim() -> PathBuf {
    let path = Path::new(bin()).with_file_name("ado-sim");
    assert!(
        path.is_file(),
        "no simulator at {}: build it with `cargo build --workspace`",
        path.display()
    );
    path
}

/// A name unique to this test process: containers, networks and volumes carry it, so runs
/// side by side never meet.
pub fn unique(what: &str) -> String {
    format!("relaytest{}{what}", std::process::id())
}

/// Everything a test created, removed on drop: containers, then networks and volumes, then
/// Compose projects (`down -v`).
#[derive(Default)]
pub struct Cleanup {
    /// Container names.
    pub containers: Vec<String>,
    /// Network names.
    pub networks: Vec<String>,
    /// Volume names.
    pub volumes: Vec<String>,
    /// Compose projects to take down.
    pub projects: Vec<Compose>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for project in self.projects.iter().rev() {
            let _ = project.command(&["down", "--volumes", "--timeout", "5"]).output();
        }
        if !self.containers.is_empty() {
            let mut args = vec!["rm", "--force", "--volumes"];
            args.extend(self.containers.iter().map(String::as_str));
            let _ = docker(&args);
        }
        for network in &self.networks {
            let _ = docker(&["network", "rm", network]);
        }
        for volume in &self.volumes {
            let _ = docker(&["volume", "rm", "--force", volume]);
        }
    }
}

/// A Compose project: its name, files and variables.
#[derive(Debug, Clone)]
pub struct Compose {
    /// `-p NAME`.
    pub project: String,
    /// `-f FILE…`, the first one's folder being the project's.
    pub files: Vec<PathBuf>,
    /// Variables the files read.
    pub env: Vec<(String, String)>,
}

impl Compose {
    /// `docker-compose -p … -f … ARGS`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("--project-name").arg(&self.project);
        for f in &self.files {
            cmd.arg("--file").arg(f);
        }
        cmd.args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `ARGS`, which must succeed; stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> String {
        let id = self.ok(&["ps", "--quiet", service]);
        assert!(!id.is_empty(), "no container for {service}");
        id
    }
}

/// A container's address on `network`.
pub fn address(container: &str, network: &str) -> String {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let ip = docker_ok(&["inspect", "--format", &format, container]);
    assert!(
        !ip.is_empty() && ip != "<no value>",
        "{container} has no address on {network}"
    );
    ip
}

/// A container's health status (`starting`, `healthy`, `unhealthy`) or state.
pub fn health(container: &str) -> String {
    docker_ok(&[
        "inspect",
        "--format",
        "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
        container,
    ])
}

/// `docker logs` of a container, stdout and stderr together.
pub fn logs(container: &str) -> String {
    let out = docker(&["logs", container]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `probe` every 200 ms until it yields a value or `within` passes.
pub async fn poll<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a TCP connection from inside `container`'s network namespace to `ip:port` opens
/// within 3 s: a throwaway container from `base` joins that namespace and tries.
pub fn connects_from(base: &str, container: &str, ip: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{ip}/{port}");
    let net = format!("container:{container}");
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        &net,
        "--user",
        "65534:65534",
        "--cap-drop",
        "ALL",
        base,
        "timeout",
        "3",
        "bash",
        "-c",
        &script,
    ]);
    out.status.success()
}
