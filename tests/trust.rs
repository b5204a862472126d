//! Trust modes: a node with a private-CA certificate is trusted through `agent.ca_file`;
//! refused under the system roots or another CA with a message saying what was presented
//! and what was expected. https webhooks get the same choice through `delivery.trust` and
//! `delivery.ca_file`.

mod common;

use std::path::Path;

use common::*;

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki(ca_name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "relay node");
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

async fn node_with(dir: &Path, pki: &Pki) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    let (c, k) = (dir.join("node.pem"), dir.join("node.key"));
    std::fs::write(&c, &pki.cert_pem).unwrap();
    std::fs::write(&k, &pki.key_pem).unwrap();
    start_node(&dir.join("data"), Some((&c, &k))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_trusted_by_file_refused_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let corp = pki("Example Corp Issuing CA");
    let other = pki("Some Other CA");
    let node = node_with(&tmp.path().join("node"), &corp).await;
    let code = initiate(&node.data_dir, "c", "http://127.0.0.1:9/hook", &[]).await;
    let ca_file = tmp.path().join("corp-ca.pem");
    std::fs::write(&ca_file, &corp.ca_pem).unwrap();
    let other_file = tmp.path().join("other-ca.pem");
    std::fs::write(&other_file, &other.ca_pem).unwrap();

    // The system roots know nothing of the private CA: refused, and the message says what the
    // node presented and what was expected.
    let o = cli(
        &tmp.path().join("a1"),
        &["accept", &code],
        &[("RELAY_AGENT__TRUST", "system")],
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    for part in [
        "certificate not trusted",
        "CN=relay node",
        "CN=Example Corp Issuing CA",
        "the system trusts",
        "SHA-256",
    ] {
        assert!(err.contains(part), "missing {part:?}: {err}");
    }

    // Another CA: refused, naming the file that was expected to vouch for it.
    let o = cli(
        &tmp.path().join("a2"),
        &["accept", &code],
        &[
            ("RELAY_AGENT__TRUST", "ca"),
            ("RELAY_AGENT__CA_FILE", other_file.to_str().unwrap()),
        ],
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains(other_file.to_str().unwrap()), "{}", stderr(&o));

    // The right CA file: accepted; status says how the node is trusted.
    let env = [
        ("RELAY_AGENT__TRUST", "ca"),
        ("RELAY_AGENT__CA_FILE", ca_file.to_str().unwrap()),
    ];
    let agent_dir = tmp.path().join("a3");
    let o = cli(&agent_dir, &["accept", &code], &env, None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(&agent_dir, &["status"], &env, None).await;
    assert!(
        stdout(&o).contains(&format!("trust:        ca {}", ca_file.display())),
        "{}",
        stdout(&o)
    );
    let o = cli(&agent_dir, &["status"], &[], None).await;
    assert!(stdout(&o).contains("trust:        pin sha256/"), "{}", stdout(&o));

    // A missing CA file is a configuration error naming the key.
    let o = cli(&agent_dir, &["status"], &[("RELAY_AGENT__TRUST", "ca")], None).await;
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("agent.ca_file"), "{}", stderr(&o));
}

/// An https webhook on 127.0.0.1 serving `pki`'s certificate; every request body arrives on
/// the channel and is answered 200.
async fn tls_webhook(pki: &Pki) -> (String, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate ends the handshake here.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let mut stream = tokio::io::BufReader::new(tls);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = tx.send(body);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

async fn next_body(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) -> String {
    let body = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("a delivery to the https webhook")
        .unwrap();
    String::from_utf8(body).unwrap()
}

/// An https webhook behind an internal CA: refused under the default trust, with a message
/// saying what was presented and what was expected, and delivered once `delivery.ca_file`
/// names the CA, on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_behind_an_internal_ca_needs_delivery_ca_file() {
    let tmp = tempfile::tempdir().unwrap();
    let internal = pki("Example Webhook CA");
    let ca_file = tmp.path().join("webhook-ca.pem");
    std::fs::write(&ca_file, &internal.ca_pem).unwrap();
    let ca = ca_file.to_str().unwrap();
    let (hook, mut received) = tls_webhook(&internal).await;
    let http = client();

    let node_dir = tmp.path().join("node");
    let node_args = ["node", "run", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
    let mut node = Daemon::start(&node_dir, &node_args, &[]).await;
    let code = initiate(&node_dir, "c", &hook, &[]).await;
    let agent_dir = tmp.path().join("agent");
    let agent_env = [("RELAY_DELIVERY__TRUST", "ca"), ("RELAY_DELIVERY__CA_FILE", ca)];
    let o = cli(&agent_dir, &["accept", &code, "--deliver-to", &hook], &agent_env, None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &agent_env).await;

    // The agent trusts the internal CA through its file: delivered.
    let (s, _) = post(&http, &node.api(), "c", b"down-1".to_vec(), &[]).await.unwrap();
    assert_eq!(s, 202);
    assert_eq!(next_body(&mut received).await, "down-1");

    // doctor checks an https webhook with the trust delivery uses.
    let o = cli(&agent_dir, &["doctor"], &agent_env, None).await;
    let report = stdout(&o);
    assert!(
        report.contains("webhook") && report.contains("issued by \"CN=Example Webhook CA\""),
        "{report}"
    );
    let o = cli(&agent_dir, &["doctor"], &[], None).await;
    let report = stdout(&o);
    assert!(
        report.contains("[FAIL] webhook") && report.contains("certificate not trusted"),
        "{report}"
    );

    // The node keeps the default trust (system roots): refused, saying what was presented,
    // what was expected and which setting fixes it; the message stays queued.
    let (s, _) = post(&http, &agent.api(), "c", b"up-1".to_vec(), &[]).await.unwrap();
    assert_eq!(s, 202);
    let refused = wait_for("the node to report the untrusted webhook", || async {
        let s = statuses(&node_dir, true).await.remove(0);
        s.last_error
            .map(|e| e.message)
            .filter(|m| m.contains("certificate not trusted"))
    })
    .await;
    for part in [
        "CN=relay node",
        "issued by \"CN=Example Webhook CA\"",
        "the system trusts",
        "delivery.ca_file",
        &hook,
    ] {
        assert!(refused.contains(part), "missing {part:?}: {refused}");
    }
    assert!(received.try_recv().is_err(), "nothing reaches an untrusted webhook");
    assert_eq!(statuses(&node_dir, true).await[0].inbound.depth, 1);

    // The same node with the CA file: the held message is delivered.
    node.terminate().await;
    let _node = Daemon::start(&node_dir, &node_args, &[("RELAY_DELIVERY__CA_FILE", ca)]).await;
    assert_eq!(next_body(&mut received).await, "up-1");
    let o = cli(&agent_dir, &["status"], &[("RELAY_DELIVERY__TRUST", "ca")], None).await;
    assert_eq!(o.status.code(), Some(78), "a CA trust without its file is refused");
    assert!(stderr(&o).contains("delivery.ca_file"), "{}", stderr(&o));
}
