//! Two simulated Azure DevOps instances (public and private) over real TLS, a node bound to
//! the public one and an agent bound to the private one, as real processes, and a connection
//! between them in Script mode.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ado_sim::{Profile, Sim, SimHandle, SimOptions};
use serde_json::{json, Value};

use crate::common::{self, borrowed, cli, cli_ok, stderr, wait_for, Daemon};

/// The connection's name on both sides.
pub const CONN: &str = "sync";
/// The public project.
pub const PUBLIC: &str = "Contoso";
/// The private project.
pub const PRIVATE: &str = "Fabrikam";

/// A running pair.
pub struct Pair {
    /// The public tracker (the node's).
    pub public: SimHandle,
    /// The private tracker (the agent's).
    pub private: SimHandle,
    /// `relay node run`.
    pub node: Daemon,
    /// `relay run`.
    pub agent: Daemon,
    /// The node's data directory.
    pub node_dir: PathBuf,
    /// The agent's data directory.
    pub agent_dir: PathBuf,
    agent_env: Vec<(String, String)>,
    node_env: Vec<(String, String)>,
    _tmp: tempfile::TempDir,
}

/// At the end of a test that did not fail otherwise: both trackers saw only requests and
/// gave only answers the specification's description allows.
impl Drop for Pair {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.public.assert_conformant();
            self.private.assert_conformant();
        }
    }
}

/// Settings binding a side to `sim`.
fn tracker_env(sim: &SimHandle, dir: &Path, name: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let token = dir.join(format!("{name}.pat"));
    std::fs::write(&token, format!("{}\n", sim.pat)).unwrap();
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, sim.ca_pem.as_deref().unwrap()).unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("RELAY_TRACKER__URL".into(), sim.url.clone()),
        ("RELAY_TRACKER__TOKEN_FILE".into(), token.display().to_string()),
        ("RELAY_TRACKER__TRUST".into(), "ca".into()),
        ("RELAY_TRACKER__CA_FILE".into(), ca.display().to_string()),
        ("RELAY_TRACKER__POLL_INTERVAL".into(), "150ms".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

async fn sim(profile: Profile, project: &str) -> SimHandle {
    Sim::start(SimOptions {
        profile,
        tls: true,
        projects: vec![project.into()],
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

impl Pair {
    /// Starts both trackers, the node and the agent; initiates, accepts, and waits until both
    /// sides read their change feeds to the end (from then on every change is synced).
    pub async fn start(public: Profile, private: Profile, extra: &[(&str, &str)]) -> Pair {
        Pair::start_seeded(public, private, extra, |_| {}).await
    }

    /// Like [`Pair::start`], with `seed` filling the public tracker before relay starts (items
    /// that exist before the connection, for the initial sync).
    pub async fn start_seeded(
        public: Profile,
        private: Profile,
        extra: &[(&str, &str)],
        seed: impl FnOnce(&SimHandle),
    ) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let (node_dir, agent_dir) = (tmp.path().join("node"), tmp.path().join("agent"));
        let public = sim(public, PUBLIC).await;
        let private = sim(private, PRIVATE).await;
        seed(&public);
        let node_env = tracker_env(&public, tmp.path(), "public", extra);
        let agent_env = tracker_env(&private, tmp.path(), "private", extra);
        let node = Daemon::start(
            &node_dir,
            &["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
            &borrowed(&node_env),
        )
        .await;
        let code = cli_ok(
            &node_dir,
            &[
                "node",
                "initiate",
                "--local-name",
                "ado-services",
                "--remote-name",
                "ado-server",
                "--name",
                CONN,
                "--project",
                PUBLIC,
                "--mode",
                "script",
            ],
        )
        .await;
        // A side bound to a tracker needs the project its incoming items go to.
        let refused = cli(
            &agent_dir,
            &["accept", code.trim(), "--name", CONN],
            &borrowed(&agent_env),
            None,
        )
        .await;
        assert!(
            !refused.status.success() && stderr(&refused).contains("--project"),
            "accept without --project: {}",
            stderr(&refused)
        );
        let accepted = cli(
            &agent_dir,
            &["accept", code.trim(), "--project", PRIVATE, "--name", CONN],
            &borrowed(&agent_env),
            None,
        )
        .await;
        assert!(accepted.status.success(), "accept: {}", stderr(&accepted));
        let agent = Daemon::start(
            &agent_dir,
            &["run", "--intake-listen", "127.0.0.1:0"],
            &borrowed(&agent_env),
        )
        .await;
        let pair = Pair {
            public,
            private,
            node,
            agent,
            node_dir,
            agent_dir,
            agent_env,
            node_env,
            _tmp: tmp,
        };
        pair.wait_feeds_read().await;
        pair
    }

    /// Waits until both sides read their change feed to its end once.
    pub async fn wait_feeds_read(&self) {
        for (dir, node) in [(&self.node_dir, true), (&self.agent_dir, false)] {
            wait_for("the change feed read to its end", || async move {
                let list = common::statuses(dir, node).await;
                list.iter()
                    .find(|c| c.name == CONN)
                    .and_then(|c| c.sync.as_ref())
                    .and_then(|s| s.watermark_ms)
                    .map(|_| ())
            })
            .await;
        }
    }

    /// SIGKILLs the agent and starts it again on the same data directory.
    pub async fn restart_agent(&mut self) {
        self.agent.kill9();
        self.agent = Daemon::start(
            &self.agent_dir,
            &["run", "--intake-listen", "127.0.0.1:0"],
            &borrowed(&self.agent_env),
        )
        .await;
    }

    /// SIGKILLs the node; [`Pair::start_node`] starts it again.
    pub fn kill_node(&mut self) {
        self.node.kill9();
    }

    /// Starts the node again on the same data directory and addresses.
    pub async fn start_node(&mut self) {
        let (listen, api) = (
            self.node.info.listen.clone().unwrap(),
            self.node.info.api.clone().unwrap(),
        );
        self.node = Daemon::start(
            &self.node_dir,
            &["node", "run", "--listen", &listen, "--api-listen", &api],
            &borrowed(&self.node_env),
        )
        .await;
    }

    /// Creates an item titled `title` on the public side whose create on the private side is
    /// committed and its answer held, and waits until the private poller read a feed page that
    /// holds the new item. Dropping the answer releases the held answers.
    pub async fn create_answered_late(&self, title: &str) -> tokio::sync::watch::Sender<bool> {
        let release = self.private.hold_answers("workitems.create");
        self.public
            .create_item(PUBLIC, "Task", &fields(&[("System.Title", title)]))
            .unwrap();
        let sim = &self.private;
        wait_for("the create to be held", || async move {
            (sim.count("workitems.create.held") >= 1).then_some(())
        })
        .await;
        // The poller reads every 150 ms, then waits for the apply under way. Counted as a
        // page that held revisions, not as any read: a read can land between the hold and a
        // look at the count, and the poller does not read again while it waits for the apply.
        wait_for("the private feed read with the item in it", || async move {
            (sim.count("reporting.revisions.seen") >= 1).then_some(())
        })
        .await;
        release
    }

    /// Runs `start` (something that makes the agent upload a file and create an item) with
    /// the private tracker holding both answers, and SIGKILLs the agent while the upload's
    /// answer is held, then again while the create's is; both are released after each kill.
    pub async fn kill_agent_during_upload_and_create(&mut self, start: impl FnOnce(&Pair)) {
        let upload = self.private.hold_answers("attachments.create");
        let create = self.private.hold_answers("workitems.create");
        start(self);
        for (endpoint, release) in [("attachments.create", upload), ("workitems.create", create)] {
            let sim = &self.private;
            let held = format!("{endpoint}.held");
            wait_for(&format!("{endpoint} in flight"), || async {
                (sim.count(&held) >= 1).then_some(())
            })
            .await;
            self.restart_agent().await;
            drop(release);
            self.private.stop_holding(endpoint);
        }
    }

    /// Creates an item of `type_name` with `fields` (a `System.Title` among them) on the
    /// public side as a person, and waits for its twin on the private side: both ids.
    pub async fn create_synced(&self, type_name: &str, fields: &[(&str, &str)]) -> (u64, u64) {
        let title = fields
            .iter()
            .find(|(f, _)| *f == "System.Title")
            .map(|(_, t)| *t)
            .expect("a title to find the twin by");
        let id = self
            .public
            .create_item(PUBLIC, type_name, &self::fields(fields))
            .unwrap();
        (id, wait_titled(&self.private, PRIVATE, title).await)
    }

    /// `relay sync ARGS` on a side (through its running daemon); must succeed.
    pub async fn sync_cli(&self, node: bool, args: &[&str]) -> String {
        let dir = if node { &self.node_dir } else { &self.agent_dir };
        let mut all = vec!["sync"];
        all.extend_from_slice(args);
        cli_ok(dir, &all).await
    }
}

/// `add` operations setting fields.
pub fn fields(pairs: &[(&str, &str)]) -> Vec<Value> {
    pairs
        .iter()
        .map(|(f, v)| json!({"op": "add", "path": format!("/fields/{f}"), "value": v}))
        .collect()
}

/// A field of a work item as the simulator holds it.
pub fn field(sim: &SimHandle, id: u64, name: &str) -> String {
    sim.item(id)
        .and_then(|(_, f)| f.get(name).cloned())
        .map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
        .unwrap_or_default()
}

/// Tags as a sorted set.
pub fn tags(sim: &SimHandle, id: u64) -> Vec<String> {
    let mut t: Vec<String> = field(sim, id, "System.Tags")
        .split(';')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    t.sort();
    t
}

/// The comments of an item as its profile keeps them: the comments API, or the history.
pub fn comments(sim: &SimHandle, id: u64) -> Vec<String> {
    if sim.profile() == Profile::Server2019 {
        sim.history_texts(id)
    } else {
        sim.comment_texts(id)
    }
}

/// The items of `project` whose title is `title`.
pub fn titled(sim: &SimHandle, project: &str, title: &str) -> Vec<u64> {
    sim.item_ids(Some(project))
        .into_iter()
        .filter(|id| field(sim, *id, "System.Title") == title)
        .collect()
}

/// Waits until exactly one item of `project` is titled `title`; answers its id.
pub async fn wait_titled(sim: &SimHandle, project: &str, title: &str) -> u64 {
    wait_for(&format!("an item titled {title:?} in {project}"), || async move {
        match titled(sim, project, title).as_slice() {
            [id] => Some(*id),
            _ => None,
        }
    })
    .await
}

/// The attachments of an item: file name and SHA-256 of the bytes, sorted.
pub fn attachments(sim: &SimHandle, id: u64) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = sim
        .relations(id)
        .into_iter()
        .filter(|(rel, _, _)| rel == "AttachedFile")
        .map(|(_, url, attrs)| {
            let aid = url
                .split("/attachments/")
                .nth(1)
                .unwrap_or_default()
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned();
            let bytes = sim.attachment_bytes(&aid).unwrap_or_default();
            let name = attrs.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            (name, relay::crypto::hex(&relay::crypto::sha256(&bytes)))
        })
        .collect();
    out.sort();
    out
}

/// Polls `check` until it holds (it returns a description of what differs otherwise).
pub async fn converge<F>(what: &str, mut check: F)
where
    F: FnMut() -> Result<(), String>,
{
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let last = match check() {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(tokio::time::Instant::now() < deadline, "{what} never converged: {last}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until field `name` of item `id` on `sim` reads `want`.
pub async fn wait_field(sim: &SimHandle, id: u64, name: &str, want: &str) {
    converge(&format!("{name} of #{id} to be {want:?}"), || {
        let got = field(sim, id, name);
        (got == want).then_some(()).ok_or(got)
    })
    .await;
}
