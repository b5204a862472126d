//! `relay demo`: two simulated Azure DevOps instances, a node bound to one and an agent bound
//! to the other, on loopback in temporary directories; a work item synced both ways in Script
//! mode through the whole connection lifecycle, with narration.

mod trackers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agent::AcceptOptions;
use crate::config::Settings;
use crate::daemon;
use crate::error::{Kind, OpError, OpResult};
use crate::invite::Invitation;
use crate::node::{Action, InitiateRequest};
use crate::status::ConnectionStatus;
use crate::tracker::Tracker;
use trackers::Seen;

/// How long any one step may take before the demo calls it a divergence.
const WAIT: Duration = Duration::from_secs(30);
const CONN: &str = "ado-sync";
const PUBLIC_PROJECT: &str = "Contoso";
const PRIVATE_PROJECT: &str = "Fabrikam";
/// The person the demo assigns work to: the simulators' second user, whom both trackers know.
const DEMO_PERSON: &str = "human.editor@example.com";

fn fail(e: impl std::fmt::Display) -> OpError {
    OpError::new(Kind::Failed, e.to_string())
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Polls `probe` until it answers `Ok(Some(_))`; past [`WAIT`] the last complaint is the error.
async fn until<T, F, Fut>(what: &str, mut probe: F) -> OpResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = OpResult<Result<T, String>>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = match probe().await? {
            Ok(v) => return Ok(v),
            Err(why) => why,
        };
        if tokio::time::Instant::now() > deadline {
            return Err(fail(format!("{what} did not happen within {WAIT:?}: {last}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The one item of `project` titled `title`, as a person finds it by WIQL.
async fn find(tracker: &Tracker, project: &str, title: &str) -> OpResult<Result<u64, String>> {
    let wiql = format!("[System.Title] = '{}'", title.replace('\'', "''"));
    let ids = tracker.query_ids(project, Some(&wiql)).await.map_err(fail)?;
    Ok(match ids.as_slice() {
        [id] => Ok(*id),
        [] => Err(format!("no item titled {title:?} in {project} yet")),
        more => Err(format!(
            "{} items titled {title:?} in {project}: duplicated",
            more.len()
        )),
    })
}

/// Waits until twin items look the same to a person on each side, and `check` holds.
async fn converge(
    what: &str,
    (public, public_id): (&Tracker, u64),
    (private, private_id): (&Tracker, u64),
    check: impl Fn(&Seen) -> Result<(), String>,
) -> OpResult<Seen> {
    until(what, || async {
        let a = trackers::seen(public, public_id).await?;
        let b = trackers::seen(private, private_id).await?;
        Ok(if a != b {
            Err(format!("public #{public_id} {a:?}\n    private #{private_id} {b:?}"))
        } else {
            check(&a).map(|()| a)
        })
    })
    .await
}

fn show(side: &str, id: u64, seen: &Seen) {
    println!("    {side} #{id}: {:?}", seen.summary);
    println!("      description: {:?}", seen.description);
    println!("      tags:        {}", seen.labels.join("; "));
    for c in &seen.comments {
        println!("      comment:     {c:?}");
    }
    for (name, sha) in &seen.attachments {
        println!("      attachment:  {name} sha256 {}…", &sha[..16]);
    }
    for sha in &seen.images {
        println!(
            "      inline image on this tracker: sha256 {}…",
            &sha[..16.min(sha.len())]
        );
    }
    if let Some(who) = &seen.assignee {
        println!("      assigned to: {who}");
    }
    if let Some(parent) = &seen.parent {
        println!("      parent:      {parent:?}");
    }
}

fn connection(list: Vec<ConnectionStatus>) -> OpResult<ConnectionStatus> {
    list.into_iter()
        .find(|c| c.name == CONN)
        .ok_or_else(|| fail(format!("no connection {CONN}")))
}

fn patch(ops: &[(&str, &str, &str)]) -> serde_json::Value {
    ops.iter()
        .map(|(op, field, value)| json!({"op": op, "path": format!("/fields/{field}"), "value": value}))
        .collect()
}

/// Runs the demo with the `ado-sim` binary at `ado_sim` (beside this one when `None`); exits
/// non-zero if any step does not behave as documented or the two trackers diverge.
pub async fn run(ado_sim: Option<PathBuf>) -> OpResult<()> {
    let bin = trackers::locate(ado_sim.as_deref())?;
    let dir = tempfile::tempdir().map_err(fail)?;
    let token = CancellationToken::new();

    step(1, "Starting two simulated Azure DevOps instances (ado-sim, over TLS)");
    let public_sim = trackers::start(&bin, dir.path(), "public", "services", PUBLIC_PROJECT)?;
    let private_sim = trackers::start(&bin, dir.path(), "private", "server-2019", PRIVATE_PROJECT)?;
    let public = trackers::person(&public_sim).await?;
    let private = trackers::person(&private_sim).await?;
    println!(
        "    public:  Azure DevOps Services    {} (REST {}), project {PUBLIC_PROJECT}",
        public_sim.url,
        public.version()
    );
    println!(
        "    private: Azure DevOps Server 2019 {} (REST {}), project {PRIVATE_PROJECT}",
        private_sim.url,
        private.version()
    );

    step(
        2,
        "Starting the node bound to the public tracker, and the agent bound to the private one",
    );
    let mut node_settings = Settings {
        data_dir: dir.path().join("node"),
        ..Settings::default()
    };
    node_settings.node.listen = loopback();
    node_settings.node.api_listen = loopback();
    node_settings.tracker = Some(trackers::settings(&public_sim, &public_sim.pat));
    let node = daemon::start_node(node_settings, token.clone()).await?;
    let mut agent_settings = Settings {
        data_dir: dir.path().join("agent"),
        ..Settings::default()
    };
    agent_settings.agent.intake_listen = loopback();
    agent_settings.agent.instance_name = Some("ado-server".into());
    agent_settings.tracker = Some(trackers::settings(&private_sim, &private_sim.pat));
    let agent = daemon::start_agent(agent_settings, token.clone()).await?;
    println!(
        "    agents dial      {}",
        node.info.public_url.clone().unwrap_or_default()
    );
    println!("    certificate pin  {}", crate::tls::format_pin(&node.side.pin()));

    step(
        3,
        "Public admin initiates the connection in Script mode (relay node initiate)",
    );
    let code = node
        .side
        .initiate(InitiateRequest {
            name: CONN.into(),
            local_name: "ado-services".into(),
            remote_name: "ado-server".into(),
            description: "Azure DevOps Services <-> Azure DevOps Server on-prem".into(),
            mode: "script".into(),
            project: PUBLIC_PROJECT.into(),
            expires: Some(Duration::from_secs(3600)),
            deliver_to: None,
        })
        .await?;
    println!(
        "    invitation code: {}…{} ({} characters); default sync rules written for {PUBLIC_PROJECT}",
        &code[..16],
        &code[code.len() - 6..],
        code.len()
    );

    step(
        4,
        "Private admin accepts it (relay accept CODE --project Fabrikam): pin checked, code redeemed once",
    );
    let invitation = Invitation::decode(&code).map_err(fail)?;
    let accepted = agent
        .side
        .accept(
            &invitation,
            AcceptOptions {
                name: None,
                deliver_to: None,
                project: Some(PRIVATE_PROJECT.into()),
            },
        )
        .await?;
    println!(
        "    accepted {:?}: node instance {}, this side {}; incoming items go to {PRIVATE_PROJECT}",
        accepted.connection.name, accepted.connection.node_instance, accepted.connection.local_instance,
    );
    let reuse = agent
        .side
        .accept(
            &invitation,
            AcceptOptions {
                name: Some("again".into()),
                ..Default::default()
            },
        )
        .await;
    match reuse {
        Err(e) => println!("    redeeming the same code again is refused: {e}"),
        Ok(_) => return Err(fail("the same invitation code was redeemed twice")),
    }
    until("both change feeds read to their end", || async {
        let n = connection(node.side.connections().await?)?;
        let a = connection(agent.side.status()?)?;
        let read = |c: &ConnectionStatus| c.sync.as_ref().and_then(|s| s.watermark_ms).is_some();
        Ok(if read(&n) && read(&a) {
            Ok(())
        } else {
            Err("a side has not read its feed yet".to_owned())
        })
    })
    .await?;
    println!("    both sides read their change feed (reporting work item revisions) to its end");

    step(
        5,
        "A person creates a work item on the public tracker: description with a pasted screenshot, 3 tags, \
         an assignee, 2 comments, an attachment, and a child task",
    );
    let title = "Login page times out after upgrade";
    let screenshot: Vec<u8> = b"\x89PNG\r\n\x1a\n"
        .iter()
        .copied()
        .chain((0..20_000u32).map(|i| (i.wrapping_mul(31) >> 3) as u8))
        .collect();
    let shot = public
        .upload_attachment(PUBLIC_PROJECT, "timeout.png", &screenshot)
        .await
        .map_err(fail)?;
    let description = format!(
        "<p>Since 2.4 the <b>login</b> page times out after 30 s.</p><p><img src=\"{}\" alt=\"timeout\"></p>",
        shot.url
    );
    let created = public
        .create(
            PUBLIC_PROJECT,
            "Bug",
            &patch(&[
                ("add", "System.Title", title),
                ("add", "System.Description", &description),
                ("add", "System.Tags", "auth; regression; customer"),
                ("add", "System.AssignedTo", DEMO_PERSON),
            ]),
        )
        .await
        .map_err(fail)?;
    let public_id = created.id.unwrap_or_default();
    for text in ["First seen on Monday by the EU team", "Also reproduced on staging"] {
        public
            .add_comment(PUBLIC_PROJECT, public_id, &format!("<p>{text}</p>"))
            .await
            .map_err(fail)?;
    }
    let trace: Vec<u8> = (0..150_000u32)
        .flat_map(|i| format!("{i:06} GET /login 504\n").into_bytes())
        .take(150_000)
        .collect();
    let up = public
        .upload_attachment(PUBLIC_PROJECT, "login-trace.log", &trace)
        .await
        .map_err(fail)?;
    public
        .update(
            public_id,
            &json!([{"op": "add", "path": "/relations/-", "value": {"rel": "AttachedFile", "url": up.url, "attributes": {"comment": ""}}}]),
        )
        .await
        .map_err(fail)?;
    println!(
        "    created public #{public_id}; attached login-trace.log ({} bytes, sha256 {}…)",
        trace.len(),
        &crate::crypto::hex(&crate::crypto::sha256(&trace))[..16]
    );
    let child_title = "Check the session timeout setting";
    let mut child_ops = patch(&[("add", "System.Title", child_title)]);
    if let Some(ops) = child_ops.as_array_mut() {
        ops.push(json!({"op": "add", "path": "/relations/-", "value": {
            "rel": crate::sync::workitem::REL_PARENT, "url": public.work_item_url(public_id)}}));
    }
    let child = public
        .create(PUBLIC_PROJECT, "Task", &child_ops)
        .await
        .map_err(fail)?
        .id
        .unwrap_or_default();
    println!("    created public #{child} {child_title:?}, a child of #{public_id}");

    step(
        6,
        "relay sends it as replicas (attachment chunks first) and the agent creates its twin",
    );
    let private_id = until("the twin on the private tracker", || {
        find(&private, PRIVATE_PROJECT, title)
    })
    .await?;
    let seen = converge("public -> private", (&public, public_id), (&private, private_id), |s| {
        if s.comments.len() == 2
            && s.attachments.len() == 1
            && s.labels.len() == 3
            && s.images.len() == 1
            && s.assignee.is_some()
        {
            Ok(())
        } else {
            Err(format!("not complete yet: {s:?}"))
        }
    })
    .await?;
    show("private", private_id, &seen);
    let private_child = until("the child's twin on the private tracker", || {
        find(&private, PRIVATE_PROJECT, child_title)
    })
    .await?;
    let child_seen = converge(
        "the child public -> private",
        (&public, child),
        (&private, private_child),
        |s| {
            if s.parent.as_deref() == Some(title) {
                Ok(())
            } else {
                Err(format!("no parent yet: {s:?}"))
            }
        },
    )
    .await?;
    show("private", private_child, &child_seen);
    println!(
        "    the same on both trackers: title, description, tags, comments, attachment bytes, the screenshot \
         (uploaded to the private tracker, its URL rewritten), the assignee, the parent/child link"
    );

    step(
        7,
        "A person on the private tracker edits the title and comments (Server 2019: System.History)",
    );
    let edited = "Login page times out after upgrade to 2.4";
    private
        .update(
            private_id,
            &patch(&[
                ("replace", "System.Title", edited),
                ("replace", "System.Tags", "auth; regression; customer; fixed-onprem"),
            ]),
        )
        .await
        .map_err(fail)?;
    private
        .add_comment(
            PRIVATE_PROJECT,
            private_id,
            "<p>Fixed on premises by raising the proxy timeout</p>",
        )
        .await
        .map_err(fail)?;
    let seen = converge("private -> public", (&public, public_id), (&private, private_id), |s| {
        if s.summary == edited && s.comments.len() == 3 && s.labels.len() == 4 {
            Ok(())
        } else {
            Err(format!("not back yet: {s:?}"))
        }
    })
    .await?;
    show("public", public_id, &seen);

    step(
        8,
        "Deactivate: an edit made meanwhile waits in the node's queue; activate delivers it",
    );
    node.side.set_state(CONN, Action::Deactivate).await?;
    let quiet_title = "Login page times out after upgrade to 2.4 (edited while paused)";
    public
        .update(public_id, &patch(&[("replace", "System.Title", quiet_title)]))
        .await
        .map_err(fail)?;
    until("the replica queued at the node", || async {
        let c = connection(node.side.connections().await?)?;
        Ok(if c.outbound.depth >= 1 {
            Ok(c.outbound.depth)
        } else {
            Err("nothing queued yet".to_owned())
        })
    })
    .await?;
    println!("    node holds the replica; the private tracker still shows the older title");
    node.side.set_state(CONN, Action::Activate).await?;
    converge("after activate", (&public, public_id), (&private, private_id), |s| {
        if s.summary == quiet_title {
            Ok(())
        } else {
            Err("the held replica has not arrived".into())
        }
    })
    .await?;
    println!("    delivered after activate: private #{private_id} is titled {quiet_title:?}");
    for (side, tracker, project) in [
        ("public", &public, PUBLIC_PROJECT),
        ("private", &private, PRIVATE_PROJECT),
    ] {
        match find(tracker, project, quiet_title).await? {
            Ok(_) => {}
            Err(why) => return Err(fail(format!("{side} tracker: {why}"))),
        }
    }
    println!("    exactly one work item on each side: no duplicate, no echo");

    step(9, "Status on both sides (relay status)");
    for (side, list) in [
        ("node", node.side.connections().await?),
        ("agent", agent.side.status()?),
    ] {
        println!("    on the {side}:");
        for line in crate::status::render(&list).lines() {
            println!("      {line}");
        }
        if let Some(s) = connection(list)?.sync {
            if s.errors > 0 {
                return Err(fail(format!("the {side} lists {} sync errors", s.errors)));
            }
        }
    }

    step(
        10,
        "Shutting down (what SIGTERM does): parked polls return, queues flushed",
    );
    token.cancel();
    node.task.await.map_err(fail)??;
    agent.task.await.map_err(fail)??;
    drop((public_sim, private_sim));
    println!("\ndemo finished: the work item and its edits are the same on both trackers, each once.");
    Ok(())
}
