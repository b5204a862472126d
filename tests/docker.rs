//! relay's image as ops run it, in real containers on a Docker engine: the public and private
//! sides from the Compose files in `config/compose/` (the agent's network internal, its only
//! way out an authenticating proxy) syncing a work item both ways between two simulated
//! trackers; the invitation redeemed from a secret once and never again; the lockdown
//! (numeric non-root user, read-only root, no capabilities, no-new-privileges) and what the
//! image holds; the health check, `docker stop`, and `docker kill` mid-stream on either side.
//! Skipped, loudly, where no engine answers; `.ci/run` sets `REQUIRE_DOCKER=1`.

mod common;
#[path = "common/docker.rs"]
mod docker;

use common::{client, post};
use docker::*;
use relay::status::ConnectionStatus;
use std::path::Path;
use std::time::Duration;

/// Containers start slowly on a loaded machine: conditions get this long.
const WITHIN: Duration = Duration::from_secs(120);

/// `relay ARGS` inside a running container, as its own user; (success, stdout, stderr).
fn exec(container: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["exec", container, "relay"];
    all.extend_from_slice(args);
    let out = docker(&all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The connections a containerised daemon reports (`relay status --json` on an agent,
/// `relay node connections --json` on a node); `None` while it does not answer.
fn statuses(container: &str, node: bool) -> Option<Vec<ConnectionStatus>> {
    let args: &[&str] = if node {
        &["node", "connections", "--json"]
    } else {
        &["status", "--json"]
    };
    let (ok, out, _) = exec(container, args);
    if !ok {
        return None;
    }
    serde_json::from_str(&out).ok()
}

/// Waits until `container`'s connection `name` is in `state`; returns its status.
async fn wait_state(container: &str, node: bool, name: &str, state: &str) -> ConnectionStatus {
    let what = format!("{name} {state} on {container}");
    poll(&what, WITHIN, || {
        statuses(container, node)?
            .into_iter()
            .find(|c| c.name == name && c.state == state)
    })
    .await
}

/// `relay node initiate` in the node's container; the code.
fn initiate(node: &str, name: &str, extra: &[&str]) -> String {
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
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = exec(node, &args);
    assert!(ok, "initiate failed: {err}");
    let code = out.trim().to_owned();
    assert!(code.starts_with("rlyinv1_"), "{out:?}");
    code
}

/// A file a container reads as its user (uid 10001).
fn shared_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// The docker run flags every relay container gets: what item 3 of the lockdown asks.
const LOCKED: &[&str] = &[
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges:true",
    "--user",
    "10001:10001",
];

/// Starts the node's container `name`, locked down, on `net` as `relay-node`, its data on
/// volume `volume`, with its public URL and the `NAME=value` settings in `env`.
fn run_node(name: &str, net: &str, volume: &str, image: &str, env: &[&str]) {
    let mount = format!("{volume}:/var/lib/relay");
    let mut run = vec![
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        net,
        "--network-alias",
        "relay-node",
    ];
    run.extend_from_slice(LOCKED);
    run.extend([
        "--volume",
        &mount,
        "--env",
        "RELAY_NODE__PUBLIC_URL=https://relay-node:8443",
    ]);
    for setting in env {
        run.extend(["--env", setting]);
    }
    run.extend([image, "node", "run"]);
    docker_ok(&run);
}

/// What the kernel says about a container's main process: uid, effective capabilities,
/// no-new-privileges.
fn process_facts(container: &str) -> (String, String, String) {
    let pid = docker_ok(&["inspect", "--format", "{{.State.Pid}}", container]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    (field("Uid:"), field("CapEff:"), field("NoNewPrivs:"))
}

fn assert_locked_down(container: &str) {
    let (uid, caps, nnp) = process_facts(container);
    assert_eq!(uid, "10001 10001 10001 10001", "{container} runs as uid 10001");
    assert_eq!(caps, "0000000000000000", "{container} holds no capability");
    assert_eq!(nnp, "1", "{container} cannot gain privileges");
    let ro = docker_ok(&["inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", container]);
    assert_eq!(ro, "true", "{container}'s root file system is read-only");
}

/// A tracker client as a person (the simulator's `{pat}-human`): edits relay syncs.
async fn person(url: &str, pat: &str) -> relay::tracker::Tracker {
    let settings = relay::config::TrackerSettings {
        kind: relay::config::TrackerKind::AzureDevOps,
        url: url.to_owned(),
        token_file: None,
        token: Some(relay::config::Secret::new(format!("{pat}-human"))),
        trust: relay::config::WebhookTrust::System,
        ca_file: None,
        api_version: None,
        poll_interval: Duration::from_millis(500),
        request_timeout: Duration::from_secs(10),
        hook_secret: None,
    };
    let mut last = String::new();
    for _ in 0..100 {
        match relay::tracker::Tracker::connect(&settings).await {
            Ok(t) => return t,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the simulator at {url} does not answer: {last}");
}

/// The id of the item titled `title` in `project`, once there is one.
async fn find_titled(tracker: &relay::tracker::Tracker, project: &str, title: &str) -> Option<u64> {
    for id in tracker.query_ids(project, None).await.ok()? {
        if let Ok(Some(item)) = tracker.read_item(id).await {
            if item.summary == title {
                return Some(id);
            }
        }
    }
    None
}

/// Polls an async probe every 250 ms until it yields a value, within [`WITHIN`].
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_side_reaches_out_only_through_its_proxy_and_a_work_item_syncs_both_ways() {
    let test = "docker::the_private_side_reaches_out_only_through_its_proxy_and_a_work_item_syncs_both_ways";
    let Some(images) = images(test) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let pat = format!("sim-pat-{}", std::process::id());
    let pat_file = tmp.path().join("ado-pat.txt");
    shared_file(&pat_file, &format!("{pat}\n"));
    let invitation = tmp.path().join("invitation.txt");
    shared_file(&invitation, "");
    let public_net = unique("public");
    let compose_dir = repo().join("config/compose");
    let common_env = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut env = vec![
            ("RELAY_IMAGE", images.relay.as_str()),
            ("BASE_IMAGE", images.base.as_str()),
            ("PROXY_IMAGE", images.base.as_str()),
            ("ADO_SIM_BIN", &ado_sim().display().to_string()),
            ("ADO_PAT_FILE", &pat_file.display().to_string()),
            ("RELAY_PUBLIC_NETWORK", public_net.as_str()),
            ("ADO_POLL_INTERVAL", "300ms"),
            ("RELAY_HEALTH_INTERVAL", "2s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect::<Vec<_>>();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    };
    let public = Compose {
        project: unique("pub"),
        files: vec![
            compose_dir.join("public.yml"),
            repo().join("tests/compose/public-tracker.yml"),
        ],
        env: common_env(&[
            ("ADO_URL", "http://localhost:8090/fabrikam"),
            // Published on a free loopback port here; ops publish 8443.
            ("RELAY_NODE_PORT", "127.0.0.1::8443"),
        ]),
    };
    let private = Compose {
        project: unique("priv"),
        files: vec![
            compose_dir.join("private.yml"),
            repo().join("tests/compose/private-tracker.yml"),
        ],
        env: common_env(&[
            ("ADO_URL", "http://localhost:8090/DefaultCollection"),
            ("RELAY_INVITATION_SECRET", &invitation.display().to_string()),
            ("RELAY_PROJECT", "OnPrem"),
        ]),
    };
    let mut cleanup = Cleanup::default();
    cleanup.projects.push(public.clone());

    // The public side: node and Services simulator.
    public.ok(&["up", "--detach", "--no-color"]);
    let node = public.container("relay-node");
    assert_locked_down(&node);
    poll("the node to serve", WITHIN, || exec(&node, &["health"]).0.then_some(())).await;
    let code = initiate(&node, "ado-sync", &[]);
    shared_file(&invitation, &format!("{code}\n"));

    // The private side: agent, proxy, Server simulator; the agent redeems the secret.
    cleanup.projects.push(private.clone());
    private.ok(&["up", "--detach", "--no-color"]);
    let agent = private.container("relay-agent");
    let proxy = private.container("proxy");
    assert_locked_down(&agent);
    let on_agent = wait_state(&agent, false, "ado-sync", "active").await;
    assert_eq!(on_agent.project, "OnPrem", "{on_agent:?}");
    let on_node = wait_state(&node, true, "ado-sync", "active").await;
    assert!(on_node.remote.starts_with("ado-server"), "{on_node:?}");

    // Nothing opens a connection into the private network from outside it: the node does
    // not reach the Server simulator (a sidecar at the agent's address) or the proxy's
    // private side, though both answer inside; the probe joins each container's network
    // stack. The simulators share their relay's stack (tests/compose/*-tracker.yml).
    let private_net = format!("{}_private", private.project);
    let server_ip = address(&agent, &private_net);
    let proxy_private_ip = address(&proxy, &private_net);
    let node_ip = address(&node, &public_net);
    let services_ip = node_ip.clone();
    assert!(
        connects_from(&images.base, &proxy, &server_ip, 8090),
        "the probe works inside"
    );
    assert!(
        connects_from(&images.base, &proxy, &node_ip, 8443),
        "the probe works outside"
    );
    assert!(
        !connects_from(&images.base, &node, &server_ip, 8090),
        "the node reached the Server simulator"
    );
    assert!(
        !connects_from(&images.base, &node, &proxy_private_ip, 3128),
        "the node reached the proxy's private side"
    );
    // The agent reaches nothing outside directly, only the proxy; the node through it.
    assert!(
        !connects_from(&images.base, &agent, &node_ip, 8443),
        "the agent reached the node directly"
    );
    assert!(connects_from(&images.base, &agent, &proxy_private_ip, 3128));
    let proxy_log = logs(&proxy);
    assert!(
        proxy_log.contains("CONNECT") && proxy_log.contains("relay-node:8443"),
        "the proxy logged no CONNECT to the node:\n{proxy_log}"
    );
    assert!(
        on_agent.route.as_deref().is_some_and(|r| r.contains("proxy")),
        "the agent's route: {:?}",
        on_agent.route
    );

    // A work item syncs both ways through it (Script mode): wait for both engines to read
    // their change feed once (what exists before is left to `relay sync bulk`).
    for (container, node_side) in [(&node, true), (&agent, false)] {
        poll("the change feed read to its end", WITHIN, || {
            statuses(container, node_side)?
                .into_iter()
                .find(|c| c.name == "ado-sync")?
                .sync?
                .watermark_ms
        })
        .await;
    }
    let services = person(&format!("http://{services_ip}:8090/fabrikam"), &pat).await;
    let server = person(&format!("http://{server_ip}:8090/DefaultCollection"), &pat).await;
    let title = "Login page times out";
    let patch = serde_json::json!([{"op": "add", "path": "/fields/System.Title", "value": title}]);
    let public_id = services
        .create("Fabrikam", "Task", &patch)
        .await
        .unwrap()
        .id
        .expect("an id");
    let private_id = until("the item on the private tracker", || {
        find_titled(&server, "OnPrem", title)
    })
    .await;
    let renamed = "Login page times out after 30 s";
    let patch = serde_json::json!([{"op": "add", "path": "/fields/System.Title", "value": renamed}]);
    server.update(private_id, &patch).await.unwrap();
    until("the private edit on the public tracker", || async {
        let item = services.read_item(public_id).await.ok()??;
        (item.summary == renamed).then_some(())
    })
    .await;
    // Both sides are still locked down after the work, and healthy.
    for container in [&node, &agent] {
        poll("healthy containers", WITHIN, || {
            (health(container) == "healthy").then_some(())
        })
        .await;
    }
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invitation_is_redeemed_from_a_secret_once_and_a_refused_one_is_not_offered_again() {
    let test = "docker::the_invitation_is_redeemed_from_a_secret_once_and_a_refused_one_is_not_offered_again";
    let Some(images) = images(test) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let net = unique("inv");
    docker_ok(&["network", "create", &net]);
    cleanup.networks.push(net.clone());
    let (node, agent) = (unique("invnode"), unique("invagent"));
    let (node_vol, agent_vol, fresh_vol) = (unique("invnodevol"), unique("invagentvol"), unique("invfreshvol"));
    cleanup
        .containers
        .extend([node.clone(), agent.clone(), unique("invrefused")]);
    cleanup
        .volumes
        .extend([node_vol.clone(), agent_vol.clone(), fresh_vol.clone()]);

    run_node(&node, &net, &node_vol, &images.relay, &[]);
    poll("the node to serve", WITHIN, || exec(&node, &["health"]).0.then_some(())).await;
    let code = initiate(&node, "ado-sync", &[]);
    let secret = tmp.path().join("invitation.txt");
    shared_file(&secret, &format!("{code}\n"));

    let secret_mount = format!("{}:/run/secrets/relay_invitation:ro", secret.display());
    let agent_mount = format!("{agent_vol}:/var/lib/relay");
    let agent_args = |name: &str, mount: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            &net,
            "--restart",
            "on-failure",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(LOCKED.iter().map(|s| s.to_string()));
        a.extend(
            [
                "--volume",
                mount,
                "--volume",
                &secret_mount,
                "--env",
                "RELAY_INVITATION_FILE=/run/secrets/relay_invitation",
                "--env",
                "RELAY_AGENT__INSTANCE_NAME=ado-server",
                &images.relay,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        a
    };
    let start_agent = || {
        let a = agent_args(&agent, &agent_mount);
        docker_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    };

    // First start: redeemed, the credential on the volume.
    start_agent();
    assert_locked_down(&agent);
    wait_state(&agent, false, "ado-sync", "active").await;
    let on_node = wait_state(&node, true, "ado-sync", "active").await;
    assert!(on_node.remote.starts_with("ado-server"), "{on_node:?}");
    let first_log = logs(&agent);
    assert!(first_log.contains("accepted"), "{first_log}");

    // Restarted, then re-created on the same volume: runs without redeeming again (the node
    // would refuse a second redeem).
    docker_ok(&["restart", "--time", "10", &agent]);
    poll("the restarted agent to say so", WITHIN, || {
        logs(&agent)
            .matches("accepted before; not redeeming it again")
            .next()
            .map(|_| ())
    })
    .await;
    wait_state(&agent, false, "ado-sync", "active").await;
    docker_ok(&["rm", "--force", &agent]);
    start_agent();
    poll("the re-created agent to say so", WITHIN, || {
        logs(&agent)
            .contains("accepted before; not redeeming it again")
            .then_some(())
    })
    .await;
    wait_state(&agent, false, "ado-sync", "active").await;
    assert_eq!(statuses(&agent, false).unwrap().len(), 1);
    for log in [logs(&agent), first_log, logs(&node)] {
        assert!(!log.contains(&code), "a log holds the invitation code:\n{log}");
    }

    // The same code on a fresh volume: the node refuses it (already redeemed); exit 3, the
    // reason in `docker logs`, and under a restart policy the code is not offered again.
    let refused = unique("invrefused");
    let fresh_mount = format!("{fresh_vol}:/var/lib/relay");
    let a = agent_args(&refused, &fresh_mount);
    docker_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let restarts = poll("two restarts of the refused agent", WITHIN, || {
        let n: u32 = docker_ok(&["inspect", "--format", "{{.RestartCount}}", &refused])
            .parse()
            .ok()?;
        (n >= 2).then_some(n)
    })
    .await;
    docker_ok(&["update", "--restart", "no", &refused]);
    let exit = poll("the refused agent to stop", WITHIN, || {
        let state = docker_ok(&["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", &refused]);
        state.strip_prefix("exited ").map(str::to_owned)
    })
    .await;
    assert_eq!(exit, "3");
    let log = logs(&refused);
    assert!(log.contains("already redeemed"), "{log}");
    assert!(log.contains("not tried again"), "{log}");
    assert!(!log.contains(&code), "{log}");
    // One redeem reached the node in all those starts: the node logs each refusal.
    let node_log = logs(&node);
    let refusals = node_log.lines().filter(|l| l.contains("already redeemed")).count();
    assert!(
        refusals <= 1,
        "{refusals} redeems after {restarts} restarts:\n{node_log}"
    );

    // A mangled code: exit 3 before any network call, the reason in `docker logs`.
    let mangled = unique("invmangled");
    cleanup.containers.push(mangled.clone());
    let env = format!("RELAY_INVITATION={}", &code[..code.len() - 6]);
    let mut run = vec!["run", "--name", &mangled, "--network", &net];
    run.extend_from_slice(LOCKED);
    run.extend(["--env", &env, &images.relay]);
    let out = docker(&run);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let log = logs(&mangled);
    assert!(log.contains("checksum") || log.contains("truncated"), "{log}");
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_holds_the_binary_the_c_library_and_ca_roots_only() {
    let test = "docker::the_image_holds_the_binary_the_c_library_and_ca_roots_only";
    let Some(images) = images(test) else { return };
    let mut cleanup = Cleanup::default();
    let name = unique("content");
    cleanup.containers.push(name.clone());
    docker_ok(&["create", "--name", &name, &images.relay]);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("docker export {name} | tar -tvf -"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    // Regular files only (Docker adds empty mount points for /etc/hosts and the like).
    let docker_made = [
        ".dockerenv",
        "etc/hostname",
        "etc/hosts",
        "etc/resolv.conf",
        "dev/console",
    ];
    let files: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|p| !docker_made.contains(p))
        .collect();
    let allowed = [
        "etc/group",
        "etc/nsswitch.conf",
        "etc/passwd",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/bin/relay",
    ];
    for file in &files {
        let library = file.starts_with("lib") && file.contains(".so");
        assert!(
            allowed.contains(file) || library,
            "unexpected {file} in the image:\n{listing}"
        );
    }
    for file in allowed {
        assert!(files.contains(&file), "no {file} in the image:\n{listing}");
    }
    // Nothing that runs but relay: the C library and its loader are the only other
    // executables.
    let executables: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with("-rwx"))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|p| !docker_made.contains(p) && !p.contains(".so"))
        .collect();
    assert_eq!(executables, ["usr/bin/relay"], "nothing else that runs:\n{listing}");
    let config = docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}} {{json .Config.Healthcheck.Test}}",
        &images.relay,
    ]);
    assert_eq!(config, r#"10001:10001 ["CMD","relay","health","--ready"]"#);
    let size: u64 = docker_ok(&["image", "inspect", "--format", "{{.Size}}", &images.relay])
        .parse()
        .unwrap();
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "image {}: {:.1} MB ({size} bytes)",
        images.relay,
        size as f64 / 1e6
    );
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_delivery_stop_is_clean_and_kill_on_either_side_loses_nothing() {
    let test = "docker::health_follows_delivery_stop_is_clean_and_kill_on_either_side_loses_nothing";
    let Some(images) = images(test) else { return };
    let mut cleanup = Cleanup::default();
    let net = unique("hk");
    docker_ok(&["network", "create", &net]);
    cleanup.networks.push(net.clone());
    let (node, agent) = (unique("hknode"), unique("hkagent"));
    let (node_vol, agent_vol) = (unique("hknodevol"), unique("hkagentvol"));
    cleanup.containers.extend([node.clone(), agent.clone()]);
    cleanup.volumes.extend([node_vol.clone(), agent_vol.clone()]);

    // The private application's webhook: a sink in this process on the network's gateway.
    let gateway = docker_ok(&[
        "network",
        "inspect",
        "--format",
        "{{(index .IPAM.Config 0).Gateway}}",
        &net,
    ]);
    let listener = tokio::net::TcpListener::bind((gateway.as_str(), 0)).await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = common::collect(relay::sink::Sink::serve(listener));

    let token = "test-api-token";
    let token_env = format!("RELAY_NODE__API_TOKEN={token}");
    let health_flags = [
        "--health-interval",
        "1s",
        "--health-timeout",
        "10s",
        "--health-retries",
        "2",
        "--health-start-period",
        "0s",
    ];
    run_node(
        &node,
        &net,
        &node_vol,
        &images.relay,
        &[
            "RELAY_NODE__API_LISTEN=0.0.0.0:8080",
            &token_env,
            "RELAY_NODE__POLL_WAIT=2s",
        ],
    );
    poll("the node to serve", WITHIN, || exec(&node, &["health"]).0.then_some(())).await;
    let code = initiate(&node, "ado-sync", &["--deliver-to", "http://127.0.0.1:9/unused"]);

    let agent_mount = format!("{agent_vol}:/var/lib/relay");
    let code_env = format!("RELAY_INVITATION={code}");
    let hook_env = format!("RELAY_AGENT__DELIVER_TO={hook}");
    let mut run = vec!["run", "--detach", "--name", &agent, "--network", &net];
    run.extend_from_slice(LOCKED);
    run.extend_from_slice(&health_flags);
    run.extend([
        "--volume",
        &agent_mount,
        "--env",
        &code_env,
        "--env",
        &hook_env,
        "--env",
        "RELAY_AGENT__POLL_WAIT=2s",
        "--env",
        "RELAY_AGENT__READY_MAX_SILENCE=6s",
        "--env",
        "RELAY_DELIVERY__BACKOFF_MAX=1s",
        &images.relay,
    ]);
    docker_ok(&run);
    poll("the agent healthy (delivering)", WITHIN, || {
        (health(&agent) == "healthy").then_some(())
    })
    .await;

    // A stream of numbered payloads, each retried with its own Idempotency-Key until
    // accepted, while either side is killed and started again.
    const TOTAL: usize = 120;
    let node_api = std::sync::Arc::new(std::sync::Mutex::new(format!("http://{}:8080", address(&node, &net))));
    let api = node_api.clone();
    let submitter = tokio::spawn(async move {
        let http = client();
        let auth = format!("Bearer {token}");
        for i in 0..TOTAL {
            let key = format!("payload-{i}");
            loop {
                let base = api.lock().unwrap().clone();
                let headers = [("Authorization", auth.as_str()), ("Idempotency-Key", key.as_str())];
                match post(&http, &base, "ado-sync", format!("{i}").into_bytes(), &headers).await {
                    Ok((202, _)) | Ok((200, _)) => break,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    });
    let delivered = |n: usize| {
        let seen = seen.clone();
        move || (common::bodies(&seen).len() >= n).then_some(())
    };
    poll("a third delivered", WITHIN, delivered(TOTAL / 3)).await;
    docker_ok(&["kill", &agent]);
    docker_ok(&["start", &agent]);
    poll("two thirds delivered", WITHIN, delivered(2 * TOTAL / 3)).await;
    docker_ok(&["kill", &node]);
    // The agent cannot reach its node: unhealthy.
    poll("the agent unhealthy without its node", WITHIN, || {
        (health(&agent) == "unhealthy").then_some(())
    })
    .await;
    docker_ok(&["start", &node]);
    *node_api.lock().unwrap() = format!("http://{}:8080", address(&node, &net));
    submitter.await.unwrap();
    poll("everything delivered", WITHIN, || {
        let mut firsts = Vec::new();
        for b in common::bodies(&seen) {
            if !firsts.contains(&b) {
                firsts.push(b);
            }
        }
        (firsts.len() == TOTAL).then_some(())
    })
    .await;
    poll("the agent healthy again", WITHIN, || {
        (health(&agent) == "healthy").then_some(())
    })
    .await;

    // In order at first delivery; every repeat carries its first delivery's keys.
    let received = seen.lock().unwrap();
    let mut firsts: Vec<usize> = Vec::new();
    let mut keys = std::collections::HashMap::new();
    for r in received.iter().filter(|r| r.answered == 200) {
        let n: usize = String::from_utf8_lossy(&r.body).parse().unwrap();
        let key = r.header("idempotency-key").unwrap_or_default().to_owned();
        let id = r.header("relay-message-id").unwrap_or_default().to_owned();
        match keys.get(&n) {
            None => {
                keys.insert(n, (key, id));
                firsts.push(n);
            }
            Some(first) => assert_eq!(first, &(key, id), "payload {n} repeated with another key"),
        }
    }
    assert_eq!(firsts, (0..TOTAL).collect::<Vec<_>>(), "first deliveries out of order");
    drop(received);

    // `docker stop`: SIGTERM, exit 0, well within the grace period.
    for container in [&agent, &node] {
        let started = std::time::Instant::now();
        docker_ok(&["stop", "--time", "30", container]);
        let took = started.elapsed();
        let exit = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", container]);
        assert_eq!(exit, "0", "{container} stopped with {exit}:\n{}", logs(container));
        assert!(took < Duration::from_secs(15), "{container} took {took:?} to stop");
    }
    drop(cleanup);
}

#[test]
fn the_readme_quotes_the_compose_files_as_they_are() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for file in ["public.yml", "private.yml"] {
        let text = std::fs::read_to_string(repo().join("config/compose").join(file)).unwrap();
        assert!(
            readme.contains(&format!("```yaml\n{text}```")),
            "README.md does not quote config/compose/{file} as it is"
        );
    }
}
