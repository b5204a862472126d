//! Start-up through the built binary: the umask and the data directory's permissions, the
//! admin socket's peer check and deadlines, stray `RELAY_…` variables, a bad `RELAY_LOG`, and
//! bytes on stdin that are no invitation code.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Output, Stdio};

use common::{command, command_via_shell, is_root, log_path, stderr, Daemon};

const NODE_RUN: &[&str] = &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
const NOBODY: u32 = 65534;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Says that `test` was skipped, where a passing run shows it (the harness captures
/// `eprintln!`).
fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Runs `cmd` to completion with `input` on stdin (off the runtime's threads).
async fn run(mut cmd: std::process::Command, input: &[u8]) -> Output {
    let input = input.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relay");
        child.stdin.take().unwrap().write_all(&input).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// Every path below `dir`, with `dir` itself.
fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all = vec![dir.to_owned()];
    let mut i = 0;
    while i < all.len() {
        if std::fs::symlink_metadata(&all[i]).unwrap().is_dir() {
            let children: Vec<_> = std::fs::read_dir(&all[i]).unwrap().map(|e| e.unwrap().path()).collect();
            all.extend(children);
        }
        i += 1;
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_umask_000_in_a_0755_directory_the_data_stays_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cmd = command_via_shell("umask 000", &dir, NODE_RUN, &[]);
    let node = Daemon::start_command(cmd, &dir, log_path(&dir)).await;
    // Database writes after start (a connection) and the admin socket.
    common::initiate(&dir, "c", "http://127.0.0.1:9/hook", &[]).await;

    assert_eq!(mode(&dir), 0o700, "the data directory is tightened");
    assert!(node.log().contains("made it private (0700)"), "{}", node.log());
    assert_eq!(mode(&dir.join("admin.sock")) & 0o077, 0, "admin.sock");
    for path in tree(&dir.join("db")) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(meta.mode() & 0o777, want, "{}", path.display());
    }
    for path in tree(&dir) {
        assert_eq!(mode(&path) & 0o022, 0, "writable by others: {}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_others_can_read_and_relay_cannot_tighten_is_refused_with_a_fix() {
    if !is_root() {
        skipped(
            "a_data_directory_others_can_read_and_relay_cannot_tighten_is_refused_with_a_fix",
            "needs root to give the directory to another user",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("theirs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = run(command(&dir, NODE_RUN, &[]), b"").await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("open to other users (mode 0755") && err.contains("chmod 700"),
        "{err}"
    );
    assert_eq!(mode(&dir), 0o755, "not someone else's to change");
    assert!(!dir.join("db").exists(), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_refuses_other_users() {
    if !is_root() {
        skipped(
            "the_admin_socket_refuses_other_users",
            "needs root to run a client as another user",
        );
        return;
    }
    // The client runs as nobody: it must be able to reach the binary (a checkout inside a
    // private directory, such as a fresh `mktemp -d`, is out of its reach).
    let closed = Path::new(common::bin())
        .ancestors()
        .skip(1)
        .find(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 == 0));
    if let Some(d) = closed {
        skipped(
            "the_admin_socket_refuses_other_users",
            &format!("another user cannot reach the binary through {}", d.display()),
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let _node = Daemon::start(&dir, NODE_RUN, &[]).await;
    // An operator's mistake opens the way to the socket: the peer check still holds.
    for d in [tmp.path(), &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(dir.join("admin.sock"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut cmd = command(&dir, &["node", "connections", "--json"], &[]);
    cmd.uid(NOBODY).gid(NOBODY);
    let out = run(cmd, b"").await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("takes commands only from its own user (uid 0) or root, not uid 65534"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn admin_connections_are_bounded_and_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let agent = relay::daemon::start_agent(common::in_process(tmp.path()), token.clone())
        .await
        .unwrap();
    let socket = relay::admin::socket_path(tmp.path());
    assert_eq!(mode(&socket), 0o600);

    // Idle clients take every slot; paused time runs on to their deadline.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::UnixStream::connect(&socket).await.unwrap());
    }
    // An operator's command still gets through once the idlers are cut.
    let info = relay::admin::call(tmp.path(), &relay::admin::Request::Info)
        .await
        .unwrap();
    assert!(info.is_some());
    for mut stream in idle {
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains("no complete admin request within 10s"), "{answer}");
    }

    // A request without end is cut at the size cap.
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let _ = stream.write_all(&vec![b'x'; 128 * 1024]).await;
    // The daemon closes with the rest unread, so the end may be a reset: keep what came first.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut chunk).await {
        answer.extend_from_slice(&chunk[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("larger than 65536 bytes"), "{answer}");

    token.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_variables_that_are_no_setting_are_ignored_with_a_debug_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    // What Kubernetes injects into a Pod beside a Service named relay.
    let env = [
        ("RELAY_LOG", "debug"),
        ("RELAY_PORT", "tcp://10.96.0.17:8443"),
        ("RELAY_SERVICE_HOST", "10.96.0.17"),
    ];
    let node = Daemon::start(&dir, NODE_RUN, &env).await;
    assert!(
        node.log().contains("ignoring RELAY_PORT: it is not a relay setting"),
        "{}",
        node.log()
    );
    drop(node);

    let out = run(
        command(&dir, &["node", "connections"], &[("RELAY_NODE__POLL_WAIT", "soon")]),
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("environment variable RELAY_NODE__POLL_WAIT"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_relay_log_is_said_and_the_default_used() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(command(tmp.path(), &["status"], &[("RELAY_LOG", "garbage[==")]), b"").await;
    let err = stderr(&out);
    assert!(
        err.contains("RELAY_LOG \"garbage[==\" is not a valid filter") && err.contains("using the default (warn)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_no_text_on_stdin_are_a_malformed_code() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let out = run(command(&dir, &["accept", "-"], &[]), b"rlyinv1_\xff\xfe\x00garbage\n").await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("not text"), "{}", stderr(&out));
    assert!(!dir.exists(), "nothing created for a malformed code");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_bytes_that_are_not_utf8_are_skipped_or_named() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::ffi::OsStr::from_bytes(b"caf\xe9");
    // Not relay's: no panic, no word.
    let mut cmd = command(tmp.path(), &["status"], &[]);
    cmd.env("UNRELATED", bytes);
    let out = run(cmd, b"").await;
    assert!(stderr(&out).contains("holds no relay data"), "{}", stderr(&out));
    // A setting: refused by name, exit 78.
    let mut cmd = command(tmp.path(), &["status"], &[]);
    cmd.env("RELAY_AGENT__INSTANCE_NAME", bytes);
    let out = run(cmd, b"").await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("environment variable RELAY_AGENT__INSTANCE_NAME: the value is not valid UTF-8"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(start_paused = true)]
async fn a_daemon_that_never_answers_does_not_hang_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    // A stand-in daemon: accepts, reads nothing, answers nothing.
    let listener = tokio::net::UnixListener::bind(relay::admin::socket_path(tmp.path())).unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let err = relay::admin::call(tmp.path(), &relay::admin::Request::Info)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("did not answer") && err.message.contains("300s"),
        "{}",
        err.message
    );
    hold.abort();
}
