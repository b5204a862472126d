//! Invitation codes refused, each with its own message: reused, expired, truncated or
//! mistyped (before any network call), a node with another certificate (wrong pin), and the
//! lockout after wrong secrets.

mod common;

use common::*;
use relay::invite::Invitation;

async fn accept(agent_dir: &std::path::Path, code: &str) -> (Option<i32>, String) {
    let o = cli(agent_dir, &["accept", code], &[], None).await;
    (o.status.code(), stderr(&o))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_codes_fail_before_any_network_call() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens at this URL (a port held but not listening): any network attempt
    // would report "cannot reach".
    let (_held, port) = closed_port();
    let good = Invitation::new(&format!("https://127.0.0.1:{port}"), u64::MAX / 2, Some([7; 32]))
        .unwrap()
        .encode();
    let agent_dir = tmp.path().join("agent");

    let (code, err) = accept(&agent_dir, &good[..good.len() - 9]).await;
    assert_eq!(code, Some(3));
    assert!(err.contains("truncated") || err.contains("checksum"), "{err}");

    let mut typo: Vec<char> = good.chars().collect();
    typo[40] = if typo[40] == 'a' { 'b' } else { 'a' };
    let (code, err) = accept(&agent_dir, &typo.into_iter().collect::<String>()).await;
    assert_eq!(code, Some(3));
    assert!(err.contains("checksum"), "{err}");

    let (code, err) = accept(&agent_dir, "hello-world").await;
    assert_eq!(code, Some(3));
    assert!(err.contains("not a relay invitation code"), "{err}");

    let (code, err) = accept(&agent_dir, &good.replace("rlyinv1_", "rlyinv2_")).await;
    assert_eq!(code, Some(3));
    assert!(err.contains("version"), "{err}");

    let expired = Invitation::new(&format!("https://127.0.0.1:{port}"), 1_600_000_000, None)
        .unwrap()
        .encode();
    let (code, err) = accept(&agent_dir, &expired).await;
    assert_eq!(code, Some(3));
    assert!(err.contains("expired") && err.contains("new invitation"), "{err}");

    let o = cli(&agent_dir, &["accept"], &[], None).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("RELAY_INVITATION"), "{}", stderr(&o));

    let (_, err) = accept(&agent_dir, &good[..30]).await;
    assert!(err.contains("truncated") && !err.contains("cannot reach"), "{err}");
    // The well-formed code does try the network, and says so precisely.
    let (code, err) = accept(&agent_dir, &good).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot reach the node"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_code_and_wrong_pin_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let node_a = start_node(&tmp.path().join("node-a"), None).await;
    let node_b = start_node(&tmp.path().join("node-b"), None).await;
    let code = initiate(&node_a.data_dir, "conn", "http://127.0.0.1:9/hook", &[]).await;

    // Same id and secret, but sent to a node with another certificate: the pin refuses it.
    let mut forged = Invitation::decode(&code).unwrap();
    forged.url = node_b.info.public_url.clone().unwrap();
    let (status, err) = accept(&tmp.path().join("agent-0"), &forged.encode()).await;
    assert_eq!(status, Some(3), "{err}");
    assert!(
        err.contains("pin mismatch") && err.contains("not the node that issued"),
        "{err}"
    );

    let (status, err) = accept(&tmp.path().join("agent-1"), &code).await;
    assert_eq!(status, Some(0), "{err}");
    let (status, err) = accept(&tmp.path().join("agent-2"), &code).await;
    assert_eq!(status, Some(3));
    assert!(err.contains("already redeemed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secrets_lock_the_invitation() {
    let tmp = tempfile::tempdir().unwrap();
    let node = start_node(&tmp.path().join("node"), None).await;
    let code = initiate(&node.data_dir, "conn", "http://127.0.0.1:9/hook", &[]).await;
    let agent_dir = tmp.path().join("agent");
    let genuine = Invitation::decode(&code).unwrap();
    for attempt in 1..=6 {
        let mut wrong = genuine.clone();
        wrong.secret = relay::crypto::random_bytes::<32>();
        let (status, err) = accept(&agent_dir, &wrong.encode()).await;
        assert_eq!(status, Some(3), "{err}");
        if attempt < 5 {
            let left = match 5 - attempt {
                1 => "1 attempt left".to_owned(),
                n => format!("{n} attempts left"),
            };
            assert!(err.contains(&left), "attempt {attempt}: {err}");
        } else {
            assert!(err.contains("locked"), "attempt {attempt}: {err}");
        }
    }
    let (status, err) = accept(&agent_dir, &code).await;
    assert_eq!(status, Some(3));
    assert!(err.contains("locked after 5 wrong secrets"), "{err}");
    assert!(!node.log().contains(&code), "the node never logs the code");
    let s = statuses(&node.data_dir, true).await;
    assert_eq!((s[0].state.as_str(), s[0].remote.as_str()), ("pending", "unknown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_redeem_answer_is_retried_with_the_same_nonce() {
    use relay::protocol::{self, RedeemRequest, RedeemResponse};
    let tmp = tempfile::tempdir().unwrap();
    let node = start_node(&tmp.path().join("node"), None).await;
    let code = initiate(&node.data_dir, "conn", "http://127.0.0.1:9/hook", &[]).await;
    let inv = Invitation::decode(&code).unwrap();
    let client = relay::http::Client::https_only(
        relay::tls::node_client_config(inv.pin, relay::config::TrustMode::Pin, None).unwrap(),
        std::time::Duration::from_secs(5),
        &relay::http::ProxyConfig::Direct,
    );
    let redeem = |nonce: &str| {
        let body = protocol::encode(&RedeemRequest {
            version: protocol::PROTOCOL_VERSION,
            invitation_id: inv.id_hex(),
            secret: inv.secret.to_vec(),
            client_nonce: nonce.to_owned(),
            instance_name: "agent".into(),
            host: "host".into(),
        })
        .unwrap();
        let req =
            relay::http::request(relay::http::Method::POST, &format!("{}/v1/redeem", inv.url), &[], body).unwrap();
        let client = client.clone();
        async move {
            client
                .send(req, std::time::Duration::from_secs(10), 1 << 16)
                .await
                .unwrap()
        }
    };
    let first = redeem("nonce-1").await;
    assert_eq!(first.status, 200);
    // The answer was "lost"; the same nonce gets a fresh credential, the old one is void.
    let again = redeem("nonce-1").await;
    assert_eq!(again.status, 200);
    let a: RedeemResponse = protocol::decode("redeem", &first.body).unwrap();
    let b: RedeemResponse = protocol::decode("redeem", &again.body).unwrap();
    assert_ne!(a.credential, b.credential);
    let other = redeem("nonce-2").await;
    assert_eq!(other.status, 409);
    assert_eq!(other.error_body().unwrap().code, "already_redeemed");

    let poll = |cred: String| {
        let body = protocol::encode(&protocol::PollRequest {
            version: protocol::PROTOCOL_VERSION,
            after: 0,
            wait_ms: 1,
        })
        .unwrap();
        let auth = format!("Bearer {cred}");
        let req = relay::http::request(
            relay::http::Method::POST,
            &format!("{}/v1/poll", inv.url),
            &[("authorization", &auth)],
            body,
        )
        .unwrap();
        let client = client.clone();
        async move {
            client
                .send(req, std::time::Duration::from_secs(10), 1 << 16)
                .await
                .unwrap()
        }
    };
    assert_eq!(poll(a.credential).await.status, 401);
    assert_eq!(poll(b.credential).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_certificate_is_served_and_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["relay.example.com".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay.example.com");
    let cert = params.self_signed(&key_pair).unwrap();
    let (cert_path, key_path) = (tmp.path().join("node.pem"), tmp.path().join("node.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    let node_dir = tmp.path().join("node");
    let node = start_node(&node_dir, Some((&cert_path, &key_path))).await;
    let code = initiate(&node.data_dir, "conn", "http://127.0.0.1:9/hook", &[]).await;
    let inv = Invitation::decode(&code).unwrap();
    assert_eq!(inv.pin, Some(relay::crypto::sha256(&key_pair.public_key_der())));
    assert!(!node_dir.join("tls").exists(), "no self-signed certificate is made");
    let (status, err) = accept(&tmp.path().join("agent"), &code).await;
    assert_eq!(status, Some(0), "{err}");
}
