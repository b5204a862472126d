//! `relay demo`: a node and an agent on loopback in temporary directories, driven through the
//! whole lifecycle with narration — initiate, accept, traffic both ways, deactivate/activate.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::AcceptOptions;
use crate::config::Settings;
use crate::daemon;
use crate::error::{Kind, OpError, OpResult};
use crate::http::{self, Method};
use crate::invite::Invitation;
use crate::node::{Action, InitiateRequest};
use crate::sink::Sink;

const WAIT: Duration = Duration::from_secs(20);

fn fail(e: impl std::fmt::Display) -> OpError {
    OpError::new(Kind::Failed, e.to_string())
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn work_item(id: u32, summary: &str, side: &str) -> String {
    serde_json::json!({
        "workItem": id,
        "summary": summary,
        "description": format!("Replica of work item {id} from the {side} side"),
        "comments": [{"author": "ops", "text": "synced by relay"}],
        "labels": ["relay-demo", side],
        "attachments": [],
    })
    .to_string()
}

async fn post(client: &http::Client, api: &str, conn: &str, body: String) -> OpResult<String> {
    let url = format!("http://{api}/v1/connections/{conn}/messages");
    let req = http::request(Method::POST, &url, &[("content-type", "application/json")], body).map_err(fail)?;
    let reply = client.send(req, WAIT, 64 * 1024).await.map_err(fail)?;
    if reply.status != http::StatusCode::ACCEPTED {
        return Err(fail(format!("{url} answered {}", reply.status)));
    }
    Ok(String::from_utf8_lossy(&reply.body).replace(['\n', ' '], ""))
}

async fn expect(sink: &mut Sink, who: &str, n: usize) -> OpResult<()> {
    for _ in 0..n {
        let got = sink
            .next(WAIT)
            .await
            .ok_or_else(|| fail(format!("{who} received nothing within {WAIT:?}")))?;
        let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap_or_default();
        println!(
            "    {who} webhook <- seq {} id {} : work item {} \"{}\"",
            got.header("relay-seq").unwrap_or("?"),
            got.header("relay-message-id").unwrap_or("?"),
            body["workItem"],
            body["summary"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Runs the demo; exits non-zero if any step does not behave as documented.
pub async fn run() -> OpResult<()> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let token = CancellationToken::new();
    let client = http::Client::webhook(crate::tls::local_client_config().map_err(fail)?, WAIT);

    step(
        1,
        "Starting the public application's and the private application's webhooks",
    );
    let mut public_app = Sink::start().await.map_err(fail)?;
    let mut private_app = Sink::start().await.map_err(fail)?;
    println!("    public side webhook:  {}", public_app.url);
    println!("    private side webhook: {}", private_app.url);

    step(2, "Starting the node (public side) with a self-signed certificate");
    let mut node_settings = Settings {
        data_dir: dir.path().join("node"),
        ..Settings::default()
    };
    node_settings.node.listen = loopback();
    node_settings.node.api_listen = loopback();
    let node = daemon::start_node(node_settings, token.clone()).await?;
    let node_api = node.info.api.clone().unwrap_or_default();
    println!(
        "    agents dial      {}",
        node.info.public_url.clone().unwrap_or_default()
    );
    println!("    local API        http://{node_api}");
    println!("    certificate pin  {}", crate::tls::format_pin(&node.side.pin()));

    step(3, "Public admin initiates the connection (relay node initiate)");
    let code = node
        .side
        .initiate(InitiateRequest {
            name: "ado-sync".into(),
            local_name: "ado-services".into(),
            remote_name: "ado-server".into(),
            description: "Azure DevOps Services <-> Azure DevOps Server on-prem".into(),
            mode: "script".into(),
            project: "Fabrikam".into(),
            expires: Some(Duration::from_secs(3600)),
            deliver_to: Some(public_app.url.clone()),
        })
        .await?;
    println!(
        "    invitation code: {}…{} ({} characters)",
        &code[..16],
        &code[code.len() - 6..],
        code.len()
    );
    for c in node.side.connections()? {
        println!("    connection {} is {}; remote: {}", c.name, c.state, c.remote);
    }

    step(
        4,
        "Private admin accepts it (relay accept CODE): pin checked, code redeemed once",
    );
    let mut agent_settings = Settings {
        data_dir: dir.path().join("agent"),
        ..Settings::default()
    };
    agent_settings.agent.intake_listen = loopback();
    agent_settings.agent.instance_name = Some("ado-server".into());
    let agent = daemon::start_agent(agent_settings, token.clone()).await?;
    let agent_api = agent.info.api.clone().unwrap_or_default();
    let invitation = Invitation::decode(&code).map_err(fail)?;
    let accepted = agent
        .side
        .accept(
            &invitation,
            AcceptOptions {
                name: None,
                deliver_to: Some(private_app.url.clone()),
                project: Some("OnPrem".into()),
            },
        )
        .await?;
    println!(
        "    accepted {:?}: node instance {}, this side {}, project {:?}",
        accepted.connection.name,
        accepted.connection.node_instance,
        accepted.connection.local_instance,
        accepted.connection.node_project
    );
    for c in node.side.connections()? {
        println!("    node now shows {} as {}; remote: {}", c.name, c.state, c.remote);
    }
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
    if let Err(e) = reuse {
        println!("    redeeming the same code again is refused: {e}");
    }

    step(
        5,
        "Public side -> private side: three work items through the node's local API",
    );
    for (i, s) in [
        (101, "Login page times out"),
        (102, "Export to CSV"),
        (103, "Dark mode"),
    ] {
        println!(
            "    POST node API -> 202 {}",
            post(&client, &node_api, "ado-sync", work_item(i, s, "public")).await?
        );
    }
    expect(&mut private_app, "private", 3).await?;

    step(
        6,
        "Private side -> public side: three work items through the agent's intake",
    );
    for (i, s) in [
        (7, "Patch server 2019"),
        (8, "Rotate certificates"),
        (9, "Backup check"),
    ] {
        println!(
            "    POST agent intake -> 202 {}",
            post(&client, &agent_api, "ado-sync", work_item(i, s, "private")).await?
        );
    }
    expect(&mut public_app, "public", 3).await?;

    step(7, "Deactivate: delivery pauses both ways, messages keep queuing");
    node.side.set_state("ado-sync", Action::Deactivate).await?;
    post(
        &client,
        &node_api,
        "ado-sync",
        work_item(104, "Queued while paused", "public"),
    )
    .await?;
    post(
        &client,
        &agent_api,
        "ado-sync",
        work_item(10, "Queued while paused", "private"),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let c = node
            .side
            .connections()?
            .into_iter()
            .next()
            .ok_or_else(|| fail("no connection"))?;
        if c.outbound.depth == 1 && c.inbound.depth == 1 {
            println!("    node holds 1 message for the agent and 1 from it; webhooks get nothing");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(fail("messages did not queue while deactivated"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    step(8, "Activate: the held messages are delivered");
    node.side.set_state("ado-sync", Action::Activate).await?;
    expect(&mut private_app, "private", 1).await?;
    expect(&mut public_app, "public", 1).await?;

    step(9, "Status on both sides");
    for (side, list) in [("node", node.side.connections()?), ("agent", agent.side.status()?)] {
        println!(
            "    relay {} on the {side}:",
            if side == "node" { "node connections" } else { "status" }
        );
        for line in crate::status::render(&list).lines() {
            println!("      {line}");
        }
    }

    step(
        10,
        "Shutting down (what SIGTERM does): parked polls return, queues flushed",
    );
    token.cancel();
    node.task.await.map_err(fail)??;
    agent.task.await.map_err(fail)??;
    println!("\ndemo finished: every payload arrived once, in order, with its Idempotency-Key.");
    Ok(())
}
