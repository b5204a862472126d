//! Simulated agents for the parked-polls phase: each redeems its own invitation and holds a
//! long-poll open on its own TLS connection, as a real agent does when nothing is queued.

use std::sync::Arc;
use std::time::Duration;

use relay::agent::link::{HttpsNode, NodeApi};
use relay::config::TrustMode;
use relay::http::{self, Method, ProxyConfig};
use relay::invite::Invitation;
use relay::protocol::{self, PollRequest, RedeemRequest, RedeemResponse};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// What an agent keeps from its redemption.
pub struct Credential {
    url: String,
    pin: Option<[u8; 32]>,
    credential: String,
}

/// A client with its own connection pool, so every simulated agent has its own connection.
fn client(pin: Option<[u8; 32]>) -> http::Client {
    let tls = relay::tls::node_client_config(pin, TrustMode::Pin, None).unwrap();
    http::Client::https_only(tls, Duration::from_secs(30), &ProxyConfig::Direct)
}

async fn redeem(code: String) -> Credential {
    let inv = Invitation::decode(&code).unwrap();
    let request = RedeemRequest {
        version: protocol::PROTOCOL_VERSION,
        invitation_id: inv.id_hex(),
        secret: inv.secret.to_vec(),
        client_nonce: relay::crypto::random_id(),
        instance_name: "sim".into(),
        host: "sim".into(),
    };
    let req = http::request(
        Method::POST,
        &format!("{}{}", inv.url, protocol::REDEEM_PATH),
        &[
            ("content-type", protocol::CONTENT_TYPE),
            (protocol::VERSION_HEADER, "1"),
        ],
        protocol::encode(&request).unwrap(),
    )
    .unwrap();
    let reply = client(inv.pin)
        .send(req, Duration::from_secs(30), 64 * 1024)
        .await
        .unwrap();
    assert!(reply.status.is_success(), "redeem answered {}", reply.status);
    let resp: RedeemResponse = protocol::decode("redeem response", &reply.body).unwrap();
    Credential {
        url: inv.url,
        pin: inv.pin,
        credential: resp.credential,
    }
}

/// Redeems every code, `concurrency` at a time.
pub async fn redeem_all(codes: Vec<String>, concurrency: usize) -> Vec<Credential> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let tasks: Vec<JoinHandle<Credential>> = codes
        .into_iter()
        .map(|code| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                redeem(code).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Starts one agent per credential: a first poll answered at once (the connection is up and
/// authenticated), then long-polls for as long as the task lives. Returns once every first
/// poll was answered, `concurrency` connections being set up at a time.
pub async fn park_all(credentials: Vec<Credential>, concurrency: usize) -> Vec<JoinHandle<()>> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut ready = Vec::with_capacity(credentials.len());
    let mut agents = Vec::with_capacity(credentials.len());
    for c in credentials {
        let (gate, (up_tx, up_rx)) = (gate.clone(), tokio::sync::oneshot::channel::<()>());
        ready.push(up_rx);
        agents.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let node = HttpsNode::new(client(c.pin), &c.url, &c.credential, 1 << 20);
            let ask = |wait_ms| PollRequest {
                version: protocol::PROTOCOL_VERSION,
                after: 0,
                wait_ms,
            };
            // As an agent does, retry a first poll the node turned away (it sheds the oldest
            // handshakes when too many from one address are under way).
            let mut attempts = 0;
            while let Err(e) = node.poll(ask(0), Duration::from_secs(30), 1 << 20).await {
                attempts += 1;
                assert!(attempts < 20, "a simulated agent's first poll keeps failing: {e:?}");
                tokio::time::sleep(Duration::from_millis(100 * attempts)).await;
            }
            drop(permit);
            let _ = up_tx.send(());
            loop {
                if node
                    .poll(ask(120_000), Duration::from_secs(150), 1 << 20)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    for r in ready {
        r.await.expect("a simulated agent's first poll failed");
    }
    agents
}
