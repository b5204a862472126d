//! The service-manager side through the built binary: a notify socket stands in for systemd
//! and receives READY=1 with a STATUS line once the daemon serves, refreshed STATUS lines,
//! WATCHDOG=1 pings when `WATCHDOG_USEC` is set for the process, and STOPPING=1 on SIGTERM;
//! with stderr on a journal stream, log lines carry a priority and no timestamp.

mod common;

use common::*;
use relay::sink::Sink;
use std::path::Path;
use tokio::net::UnixDatagram;

const NODE_RUN: &[&str] = &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];

/// The next notification, split into its `KEY=value` lines.
async fn next(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buf))
        .await
        .expect("a notification within the deadline")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned).collect()
}

/// Notifications until one satisfies `want`; returns that one and how many pings came before.
async fn until(socket: &UnixDatagram, want: impl Fn(&[String]) -> bool) -> (Vec<String>, usize) {
    let mut pings = 0;
    loop {
        let message = next(socket).await;
        if want(&message) {
            return (message, pings);
        }
        if message == ["WATCHDOG=1"] {
            pings += 1;
        }
    }
}

fn has(message: &[String], line: &str) -> bool {
    message.iter().any(|l| l == line)
}

fn notify_socket(dir: &Path) -> (UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    (socket, path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_notifies_ready_status_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let node_dir = tmp.path().join("node");
    let app = Sink::start().await.unwrap();
    let (socket, path) = notify_socket(tmp.path());
    // systemd names the main process in WATCHDOG_PID; the shell's pid becomes relay's.
    let cmd = command_via_shell(
        "export WATCHDOG_PID=$$",
        &node_dir,
        NODE_RUN,
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "200000")],
    );
    let mut node = Daemon::start_command(cmd, &node_dir, log_path(&node_dir)).await;

    let ready = next(&socket).await;
    assert!(has(&ready, "READY=1"), "{ready:?}");
    assert!(
        has(&ready, "STATUS=0 connections; 0 queued outbound, 0 queued inbound"),
        "{ready:?}"
    );

    // Pings every 100 ms (half of WATCHDOG_USEC), and the STATUS line follows the connections.
    initiate(&node_dir, "ado-sync", &app.url, &[]).await;
    let (status, pings) = until(&socket, |m| {
        has(m, "STATUS=1 connection: 1 pending; 0 queued outbound, 0 queued inbound")
    })
    .await;
    assert_eq!(status.len(), 1, "{status:?}");
    assert!(pings >= 3, "only {pings} watchdog pings before the status refresh");

    // Read while it stops: a notify socket that is not drained would hold the sender up.
    let (exit, (stopping, _)) = tokio::join!(node.terminate(), until(&socket, |m| has(m, "STOPPING=1")));
    assert!(
        stopping.iter().any(|l| l.starts_with("STATUS=stopping")),
        "{stopping:?}"
    );
    assert!(exit.success(), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_is_ready_after_its_invitation_is_accepted_and_without_a_watchdog_never_pings() {
    let tmp = tempfile::tempdir().unwrap();
    let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
    let app = Sink::start().await.unwrap();
    let _node = Daemon::start(&node_dir, NODE_RUN, &[]).await;
    let code = initiate(&node_dir, "ado-sync", &app.url, &[]).await;
    let (socket, path) = notify_socket(tmp.path());
    // A WATCHDOG_USEC meant for another process (no WATCHDOG_PID) is not this one's.
    let env = [
        ("NOTIFY_SOCKET", path.as_str()),
        ("WATCHDOG_USEC", "200000"),
        ("RELAY_INVITATION", code.as_str()),
    ];
    let mut agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &env).await;
    let ready = next(&socket).await;
    assert!(has(&ready, "READY=1"), "{ready:?}");
    assert!(
        has(
            &ready,
            "STATUS=1 connection: 1 active; 0 queued outbound, 0 queued inbound"
        ),
        "{ready:?}"
    );
    let (exit, stopping) = tokio::join!(agent.terminate(), next(&socket));
    assert!(has(&stopping, "STOPPING=1"), "no ping may come between: {stopping:?}");
    assert!(exit.success(), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_lines_carry_a_priority_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    for (matching, dir) in [(true, "journal"), (false, "inherited")] {
        let node_dir = tmp.path().join(dir);
        let log = log_path(&node_dir);
        std::fs::write(&log, "").unwrap();
        let meta = std::fs::metadata(&log).unwrap();
        // A stale JOURNAL_STREAM (stderr redirected elsewhere) must not change the format.
        let stream = if matching {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let cmd = command(&node_dir, NODE_RUN, &[("JOURNAL_STREAM", &stream)]);
        let mut node = Daemon::start_command(cmd, &node_dir, log).await;
        assert!(node.terminate().await.success());
        let text = node.log();
        let line = text
            .lines()
            .find(|l| l.contains("node serving"))
            .unwrap_or_else(|| panic!("{text}"));
        if matching {
            assert!(line.starts_with("<6>INFO relay::daemon: node serving"), "{line}");
            assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
        } else {
            let stamp = line.split_whitespace().next().unwrap();
            assert!(stamp.len() > 20 && stamp.ends_with('Z'), "a timestamp first: {line}");
        }
        assert!(!text.contains('\u{1b}'), "no colour codes: {text}");
    }
}
