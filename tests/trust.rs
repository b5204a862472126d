//! Trust modes: a node with a private-CA certificate is trusted through `agent.ca_file`;
//! refused under the system roots or another CA with a message saying what was presented
//! and what was expected.

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
