//! A full disk: submissions get `507 storage_failed`, the node stops so its supervisor can
//! restart it, and once there is room again every payload accepted before is delivered, in
//! order. Uses a small tmpfs, so it needs root (as CI has).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use relay::sink::Sink;

/// A tmpfs of a given size, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {} failed", path.display());
        SmallDisk { path: path.to_owned() }
    }

    fn grow(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "growing the tmpfs failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_clearly_and_loses_nothing() {
    if !is_root() {
        eprintln!("SKIPPED a_full_disk_refuses_clearly_and_loses_nothing: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("small"), "6m");
    let node_dir = disk.path.join("node");
    let run = ["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
    let mut node = Daemon::start(&node_dir, &run, &[]).await;
    let mut app = Sink::start().await.unwrap();
    let code = initiate(&node_dir, "c", "http://127.0.0.1:9/hook", &[]).await;
    let agent_dir = tmp.path().join("agent");
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &app.url], &[], None).await;
    assert!(o.status.success(), "{}", stderr(&o));

    // Fill the disk with payloads for the agent, which is not running yet.
    let http = client();
    let mut accepted = 0usize;
    let refusal = loop {
        let mut body = format!("{accepted:06}").into_bytes();
        body.resize(64 * 1024, b'x');
        let (status, json) = post(&http, &node.api(), "c", body, &[]).await.unwrap();
        if status != 202 {
            break (status, json);
        }
        accepted += 1;
        assert!(accepted < 1000, "the 6 MiB disk never filled up");
    };
    assert_eq!(refusal.0, 507, "{}", refusal.1);
    assert_eq!(refusal.1["code"], "storage_failed");
    assert!(
        refusal.1["error"].as_str().unwrap().contains("No space left"),
        "{}",
        refusal.1
    );
    assert!(accepted > 10, "only {accepted} payloads fitted");

    // The node stops by itself (exit 1: the supervisor restarts it) and says why.
    let status = node.wait_exit().await;
    assert_eq!(status.code(), Some(1), "{}", node.log());
    assert!(node.log().contains("storage failed"), "{}", node.log());

    // Room again: restart on the same address; every accepted payload reaches the webhook.
    disk.grow("64m");
    let listen = node.info.listen.clone().unwrap();
    let again = [
        "node",
        "run",
        "--listen",
        listen.as_str(),
        "--api-listen",
        "127.0.0.1:0",
    ];
    let _node = Daemon::start(&node_dir, &again, &[]).await;
    let _agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &[]).await;
    let mut next = 0usize;
    while next < accepted {
        let got = app
            .next(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("{next} of {accepted} delivered"));
        let index: usize = std::str::from_utf8(&got.body[..6]).unwrap().parse().unwrap();
        assert!(index <= next, "payload {index} arrived before {next}");
        if index == next {
            next += 1;
        }
    }
}
