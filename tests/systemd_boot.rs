//! The systemd units booted by systemd: a container from the Debian base image with systemd
//! as its init, relay, `systemd/*.service` and `systemd/relay.sysusers` installed as a package
//! would; `systemctl start` returns once relay said READY=1 (`Type=notify`),
//! `systemd-analyze security` rates both running units 2.0 or better, a revoked connection
//! stops the agent with exit code 78 and no restart, `systemctl stop` is clean, and the
//! journal holds relay's lines. Skipped, loudly, where no Docker engine answers; `.ci/run`
//! sets `REQUIRE_DOCKER=1`.

mod common;
#[path = "common/docker.rs"]
mod docker;

use docker::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(120);

/// `ARGS` inside the container, as root; (success, stdout + stderr).
fn run(container: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["exec", container];
    all.extend_from_slice(args);
    let out = docker(&all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `ARGS` inside the container, which must succeed; the output.
fn ok(container: &str, args: &[&str]) -> String {
    let (success, text) = run(container, args);
    assert!(success, "{args:?} failed:\n{text}");
    text
}

/// `ARGS` with `input` on stdin.
fn with_stdin(container: &str, args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("docker")
        .args(["exec", "--interactive", container])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `systemctl show -p PROPERTY --value UNIT`.
fn property(container: &str, unit: &str, name: &str) -> String {
    ok(container, &["systemctl", "show", "--property", name, "--value", unit])
        .trim()
        .to_owned()
}

/// Copies a host file into the container with a mode and owner.
fn install(container: &str, from: &std::path::Path, to: &str, mode: &str, group: &str) {
    let dir = std::path::Path::new(to).parent().unwrap().display().to_string();
    ok(container, &["mkdir", "-p", &dir]);
    docker_ok(&["cp", &from.display().to_string(), &format!("{container}:{to}")]);
    ok(container, &["chown", &format!("root:{group}"), to]);
    ok(container, &["chmod", mode, to]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_start_through_notify_rate_well_stop_on_revocation_and_stop_cleanly() {
    let test = "systemd_boot::units_start_through_notify_rate_well_stop_on_revocation_and_stop_cleanly";
    let Some(images) = images(test) else { return };
    let mut cleanup = Cleanup::default();
    let name = unique("systemd");
    cleanup.containers.push(name.clone());

    // systemd as PID 1: tmpfs on /run and /run/lock, the host's cgroup file system writable,
    // and Docker's default seccomp profile lifted. That profile refuses the user namespace
    // the units' PrivateUsers= asks for ("Failed to set up user namespacing for unprivileged
    // user: Operation not permitted", status 217/USER); no capability is added and the
    // container is not privileged.
    docker_ok(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/run/lock",
        "--volume",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--cgroupns=host",
        "--security-opt",
        "seccomp=unconfined",
        &images.base,
        "/lib/systemd/systemd",
    ]);
    poll("systemd to boot", WITHIN, || {
        let (_, state) = run(&name, &["systemctl", "is-system-running"]);
        matches!(state.trim(), "running" | "degraded").then_some(())
    })
    .await;

    // Installed as a package would: the binary, the sysusers file (then systemd-sysusers),
    // the units under /usr/lib/systemd/system, the example configurations in /etc/relay.
    let scratch = tempfile::tempdir().unwrap();
    let binary = scratch.path().join("relay");
    let stripped = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&binary)
        .arg(common::bin())
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(common::bin(), &binary).unwrap();
    }
    install(&name, &binary, "/usr/bin/relay", "0755", "root");
    install(
        &name,
        &repo().join("systemd/relay.sysusers"),
        "/usr/lib/sysusers.d/relay.conf",
        "0644",
        "root",
    );
    ok(&name, &["systemd-sysusers"]);
    for unit in ["relay-agent.service", "relay-node.service"] {
        install(
            &name,
            &repo().join("systemd").join(unit),
            &format!("/usr/lib/systemd/system/{unit}"),
            "0644",
            "root",
        );
    }
    install(
        &name,
        &repo().join("config/agent.toml"),
        "/etc/relay/agent.toml",
        "0640",
        "relay",
    );
    install(
        &name,
        &repo().join("config/node.toml"),
        "/etc/relay/node.toml",
        "0640",
        "relay",
    );
    // The node's public URL, as the README says to change a unit: a drop-in.
    let dropin = scratch.path().join("public-url.conf");
    std::fs::write(
        &dropin,
        "[Service]\nEnvironment=RELAY_NODE__PUBLIC_URL=https://127.0.0.1:8443\n",
    )
    .unwrap();
    install(
        &name,
        &dropin,
        "/etc/systemd/system/relay-node.service.d/public-url.conf",
        "0644",
        "root",
    );
    ok(&name, &["systemctl", "daemon-reload"]);

    // `systemctl start` returns once READY=1 came: active at once, with relay's status line.
    for unit in ["relay-node", "relay-agent"] {
        let (started, text) = run(&name, &["systemctl", "start", unit]);
        let journal = run(&name, &["journalctl", "--unit", unit, "--no-pager"]).1;
        assert!(started, "systemctl start {unit}: {text}\n{journal}");
        assert_eq!(property(&name, unit, "ActiveState"), "active", "{journal}");
        assert_eq!(property(&name, unit, "Type"), "notify");
        let status = property(&name, unit, "StatusText");
        assert!(status.contains("queued outbound"), "{unit}'s status: {status:?}");
    }

    // The running units, as systemd-analyze rates them: 2.0 or better.
    for unit in ["relay-agent.service", "relay-node.service"] {
        let report = ok(&name, &["systemd-analyze", "security", "--no-pager", unit]);
        let rating: f64 = report
            .lines()
            .find_map(|l| l.split_once(&format!("Overall exposure level for {unit}: ")))
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no rating for {unit}:\n{report}"));
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{unit}: exposure {rating} (booted)");
        assert!(rating <= 2.0, "{unit} rates {rating}:\n{report}");
    }

    // A connection, as the README does it: initiate on the node, accept while the agent
    // runs, both as the service user through the admin sockets.
    let out = docker(&[
        "exec",
        &name,
        "runuser",
        "-u",
        "relay",
        "--",
        "relay",
        "node",
        "initiate",
        "--data-dir",
        "/var/lib/relay-node",
        "--local-name",
        "ado-services",
        "--remote-name",
        "ado-server",
        "--name",
        "ado-sync",
        "--project",
        "Fabrikam",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = code.trim().to_owned();
    assert!(code.starts_with("rlyinv1_"), "{code}");
    let (accepted, text) = with_stdin(
        &name,
        &[
            "runuser",
            "-u",
            "relay",
            "--",
            "relay",
            "accept",
            "-",
            "--data-dir",
            "/var/lib/relay",
        ],
        &format!("{code}\n"),
    );
    assert!(accepted, "{text}");
    poll("the agent's status line to show the connection", WITHIN, || {
        property(&name, "relay-agent", "StatusText")
            .contains("1 connection: 1 active")
            .then_some(())
    })
    .await;

    // Revoked on the node: the agent stops with 78 and systemd leaves it failed, not in
    // auto-restart (RestartPreventExitStatus).
    ok(
        &name,
        &[
            "runuser",
            "-u",
            "relay",
            "--",
            "relay",
            "node",
            "revoke",
            "ado-sync",
            "--data-dir",
            "/var/lib/relay-node",
        ],
    );
    poll("the agent to stop after the revocation", WITHIN, || {
        (property(&name, "relay-agent", "ActiveState") == "failed").then_some(())
    })
    .await;
    assert_eq!(property(&name, "relay-agent", "ExecMainStatus"), "78");
    assert_eq!(property(&name, "relay-agent", "NRestarts"), "0");
    let journal = ok(&name, &["journalctl", "--unit", "relay-agent", "--no-pager"]);
    assert!(journal.contains("revoked"), "{journal}");
    // relay's own lines, recorded with their priority: warnings and worse only.
    let warnings = ok(
        &name,
        &[
            "journalctl",
            "--unit",
            "relay-agent",
            "--priority",
            "warning",
            "--no-pager",
        ],
    );
    assert!(warnings.contains("revoked"), "{warnings}");

    // `systemctl stop`: SIGTERM, exit 0, inactive with result success.
    ok(&name, &["systemctl", "stop", "relay-node"]);
    assert_eq!(property(&name, "relay-node", "ActiveState"), "inactive");
    assert_eq!(property(&name, "relay-node", "Result"), "success");
    assert_eq!(property(&name, "relay-node", "ExecMainStatus"), "0");
    let journal = ok(&name, &["journalctl", "--unit", "relay-node", "--no-pager"]);
    for line in ["node serving", "stopped cleanly"] {
        assert!(journal.contains(line), "no {line:?} in the journal:\n{journal}");
    }
    assert!(!journal.contains(&code), "the journal holds the invitation code");
    drop(cleanup);
}
