//! Reaching the node through a corporate HTTP CONNECT proxy (a real tinyproxy on loopback),
//! with and without basic auth; `NO_PROXY`; clear errors naming the proxy, never its
//! password.
//!
//! Without tinyproxy installed, the tests that need it say loudly that they were skipped, so
//! that `cargo test` works on any developer machine; with `REQUIRE_TINYPROXY=1` (set by
//! `.ci/run`) a missing tinyproxy is a failure. `TINYPROXY=PATH` names another binary.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use relay::sink::Sink;

/// Starts a proxy with `cmd` and waits until it listens on `port` of loopback.
async fn spawn_listening(cmd: &mut Command, port: u16) -> Child {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for("the proxy to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
    })
    .await;
    child
}

/// A port free on loopback for a proxy to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Tinyproxy {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

/// Makes a missing tinyproxy a failure instead of a skip.
const REQUIRE: &str = "REQUIRE_TINYPROXY";

/// The tinyproxy binary; `None` after a loud line when it is missing and not required.
fn tinyproxy_bin(test: &str) -> Option<std::path::PathBuf> {
    let found = match std::env::var_os("TINYPROXY") {
        Some(path) => Some(std::path::PathBuf::from(path)).filter(|p| p.exists()),
        None => ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy", "/usr/local/bin/tinyproxy"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists()),
    };
    if found.is_none() {
        skip_unless_required(
            test,
            REQUIRE,
            "tinyproxy is not installed (apt-get install tinyproxy, or TINYPROXY=PATH)",
        );
    }
    found
}

impl Tinyproxy {
    /// Starts a tinyproxy for `test`, or `None` when it is skipped (see [`tinyproxy_bin`]).
    async fn start(test: &str, dir: &Path, basic_auth: Option<(&str, &str)>) -> Option<Tinyproxy> {
        let bin = tinyproxy_bin(test)?;
        let port = free_port();
        // The proxy drops to an unprivileged user when started as root; it must still write its log.
        std::fs::create_dir_all(dir).unwrap();
        for d in [dir.parent().unwrap(), dir] {
            let mode = if d == dir { 0o777 } else { 0o755 };
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        }
        let log = dir.join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\nAllow 127.0.0.1\nLogLevel Info\nDisableViaHeader Yes\nLogFile \"{}\"\n",
            log.display()
        );
        if is_root() {
            conf.push_str("User nobody\nGroup nogroup\n");
        }
        if let Some((user, password)) = basic_auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf_path = dir.join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = spawn_listening(Command::new(&bin).arg("-d").arg("-c").arg(&conf_path), port).await;
        Some(Tinyproxy { child, port, log })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `relay accept` in `dir` with one proxy variable set, which must fail with exit 1;
/// returns what it said on stderr.
async fn refused_accept(dir: &Path, code: &str, var: (&str, &str)) -> String {
    let o = cli(dir, &["accept", code], &[var], None).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    stderr(&o)
}

/// Accepts `code` in `agent_dir`, delivering to `deliver_to`, and runs the agent, both with
/// `env`.
async fn accepted_agent(agent_dir: &Path, code: &str, deliver_to: &str, env: &[(&str, &str)]) -> Daemon {
    let o = cli(agent_dir, &["accept", code, "--deliver-to", deliver_to], env, None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    Daemon::start(agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], env).await
}

/// A payload each way on connection `c`: posted to the node for the private side's
/// application, and to the agent for the public side's.
async fn both_ways(node: &Daemon, agent: &Daemon, public_app: &mut Sink, private_app: &mut Sink) {
    let http = client();
    assert_eq!(
        post(&http, &node.api(), "c", b"down".to_vec(), &[]).await.unwrap().0,
        202
    );
    assert_eq!(private_app.next(DEADLINE).await.unwrap().body, b"down");
    assert_eq!(
        post(&http, &agent.api(), "c", b"up".to_vec(), &[]).await.unwrap().0,
        202
    );
    assert_eq!(public_app.next(DEADLINE).await.unwrap().body, b"up");
}

fn node_port(node: &Daemon) -> String {
    node.info.listen.clone().unwrap().rsplit(':').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_proxy_from_the_environment_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(proxy) = Tinyproxy::start(
        "through_a_proxy_from_the_environment_both_ways",
        &tmp.path().join("proxy"),
        None,
    )
    .await
    else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let mut public_app = Sink::start().await.unwrap();
    let mut private_app = Sink::start().await.unwrap();
    let code = initiate(&node.data_dir, "c", &public_app.url, &[]).await;
    let agent_dir = tmp.path().join("agent");
    let env = [("HTTPS_PROXY", proxy.url()), ("NO_PROXY", String::new())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = accepted_agent(&agent_dir, &code, &private_app.url, &env).await;

    let http = client();
    assert_eq!(
        post(&http, &node.api(), "c", b"down".to_vec(), &[]).await.unwrap().0,
        202
    );
    assert_eq!(
        post(&http, &agent.api(), "c", b"up".to_vec(), &[]).await.unwrap().0,
        202
    );
    assert_eq!(private_app.next(DEADLINE).await.unwrap().body, b"down");
    assert_eq!(public_app.next(DEADLINE).await.unwrap().body, b"up");

    let connect = format!("CONNECT 127.0.0.1:{}", node_port(&node));
    assert!(
        proxy.log().contains(&connect),
        "the proxy carried the traffic:\n{}",
        proxy.log()
    );
    let o = cli(&agent_dir, &["status"], &env, None).await;
    assert!(
        stdout(&o).contains(&format!("route:        via proxy {}", proxy.url())),
        "{}",
        stdout(&o)
    );
    let o = cli(&agent_dir, &["egress"], &env, None).await;
    let proxy_addr = format!("127.0.0.1:{}", proxy.port);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with(&proxy_addr) && l.contains("HTTP CONNECT proxy")),
        "{}",
        stdout(&o)
    );
    let o = cli(&agent_dir, &["doctor"], &env, None).await;
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!("[ ok ] tcp         via proxy {}", proxy.url())),
        "{}",
        stdout(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authentication_and_its_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(proxy) = Tinyproxy::start(
        "proxy_authentication_and_its_errors",
        &tmp.path().join("proxy"),
        Some(("relay", "pr0xy-pass")),
    )
    .await
    else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let mut private_app = Sink::start().await.unwrap();
    let code = initiate(&node.data_dir, "c", "http://127.0.0.1:9/hook", &[]).await;
    let port = proxy.port;

    // No credentials: a 407 that names the proxy and says what to do.
    let no_auth = format!("http://127.0.0.1:{port}");
    let err = refused_accept(&tmp.path().join("a1"), &code, ("RELAY_AGENT__PROXY", &no_auth)).await;
    assert!(
        err.contains("407") && err.contains(&no_auth) && err.contains("user and password"),
        "{err}\n{}",
        proxy.log()
    );

    // Wrong credentials: refused, and the password never appears.
    let wrong = format!("http://relay:not-the-pass@127.0.0.1:{port}");
    let err = refused_accept(&tmp.path().join("a2"), &code, ("HTTPS_PROXY", &wrong)).await;
    // tinyproxy answers a wrong password with 401, other proxies with 407: both are explained.
    assert!(
        err.contains(&no_auth) && (err.contains("407") || err.contains("401")),
        "{err}"
    );
    assert!(err.contains("user and password"), "{err}");
    assert!(!err.contains("not-the-pass"), "{err}");

    // The right credentials in the configuration key: accepted and running through the proxy.
    let right = format!("http://relay:pr0xy-pass@127.0.0.1:{port}");
    let agent_dir = tmp.path().join("a3");
    let env = [("RELAY_AGENT__PROXY", right.as_str())];
    let agent = accepted_agent(&agent_dir, &code, &private_app.url, &env).await;
    assert_eq!(
        post(&client(), &node.api(), "c", b"via-auth".to_vec(), &[])
            .await
            .unwrap()
            .0,
        202
    );
    assert_eq!(private_app.next(DEADLINE).await.unwrap().body, b"via-auth");
    assert!(!agent.log().contains("pr0xy-pass"));
    let o = cli(&agent_dir, &["status", "--json"], &env, None).await;
    assert!(
        !stdout(&o).contains("pr0xy-pass") && stdout(&o).contains("with a user and password"),
        "{}",
        stdout(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_bypasses_and_a_dead_proxy_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let node = start_node(&tmp.path().join("node"), None).await;
    let code = initiate(&node.data_dir, "c", "http://127.0.0.1:9/hook", &[]).await;
    let (_held, dead) = closed_port();
    let dead_url = format!("http://127.0.0.1:{dead}");

    let err = refused_accept(&tmp.path().join("a1"), &code, ("https_proxy", &dead_url)).await;
    assert!(
        err.contains(&format!("cannot connect to the proxy {dead_url}")),
        "{err}"
    );

    let o = cli(
        &tmp.path().join("a2"),
        &["accept", &code],
        &[("HTTPS_PROXY", &dead_url), ("NO_PROXY", "localhost,127.0.0.1")],
        None,
    )
    .await;
    assert!(o.status.success(), "NO_PROXY goes direct: {}", stderr(&o));
    let _ = Duration::ZERO;
}

/// A proxy that asks every CONNECT for Negotiate or NTLM and closes the connection, as Squid
/// does, keeping each request head it received.
async fn windows_proxy() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let heads = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                heads.lock().unwrap().push(String::from_utf8_lossy(&buf).into_owned());
                let answer = "HTTP/1.1 407 Proxy Authentication Required\r\n\
                              Proxy-Authenticate: Negotiate\r\n\
                              Proxy-Authenticate: NTLM\r\n\
                              Connection: close\r\nContent-Length: 0\r\n\r\n";
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_asking_for_ntlm_or_negotiate_is_named_and_never_gets_the_password() {
    let tmp = tempfile::tempdir().unwrap();
    let node = start_node(&tmp.path().join("node"), None).await;
    let code = initiate(&node.data_dir, "c", "http://127.0.0.1:9/hook", &[]).await;
    let (port, seen) = windows_proxy().await;
    let proxy = format!("http://127.0.0.1:{port}");
    // No credentials: what the proxy asked for, and what to do.
    let err = refused_accept(&tmp.path().join("a1"), &code, ("HTTPS_PROXY", &proxy)).await;
    assert!(
        err.contains(&proxy)
            && err.contains("407")
            && err.contains("asking for Negotiate, NTLM")
            && err.contains("DOMAIN%5Cuser"),
        "{err}"
    );
    // A domain account: NTLM is tried (this proxy breaks off the handshake), never Basic.
    let url = format!("http://CORP%5Cops:d0main-secret@127.0.0.1:{port}");
    let err = refused_accept(&tmp.path().join("a2"), &code, ("HTTPS_PROXY", &url)).await;
    assert!(err.contains(&proxy) && err.contains("NTLM"), "{err}");
    assert!(!err.contains("d0main-secret"), "{err}");
    let heads = seen.lock().unwrap().clone();
    assert!(
        heads.iter().any(|h| h.contains("Proxy-Authorization: NTLM ")),
        "{heads:?}"
    );
    for head in heads {
        assert!(head.starts_with("CONNECT "), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("proxy-authorization: basic"),
            "a password went out in clear: {head}"
        );
    }
}

/// Makes a missing MIT Kerberos KDC a failure instead of a skip.
const REQUIRE_KRB5: &str = "REQUIRE_KRB5";

/// The clock skew the test proxy's Kerberos allows (`clockskew` in its krb5.conf): it accepts
/// a ticket this long after it expired. Five minutes by default; one here, so that a run
/// outlasting ticket lifetime plus skew takes four minutes instead of eight.
const PROXY_SKEW: Duration = Duration::from_secs(60);

/// The realm of the test KDC.
const REALM: &str = "RELAY.TEST";

/// An MIT Kerberos realm on loopback, in a temporary directory: its KDC on a port of its own,
/// the proxy's principal `HTTP/localhost` and the agent's service account `agent` with their
/// keytabs (`proxy.keytab`, `agent.keytab`, mode 600).
struct Realm {
    kdc: Child,
    dir: std::path::PathBuf,
    port: u16,
}

/// The MIT Kerberos programs a realm needs; `None` after a loud line when they are missing and
/// not required.
fn krb5_bins(test: &str) -> Option<()> {
    let found = ["/usr/sbin/krb5kdc", "/usr/sbin/kdb5_util", "/usr/sbin/kadmin.local"]
        .iter()
        .all(|p| Path::new(p).exists());
    if !found {
        skip_unless_required(
            test,
            REQUIRE_KRB5,
            "MIT Kerberos's KDC is not installed (apt-get install krb5-kdc krb5-admin-server)",
        );
        return None;
    }
    Some(())
}

impl Realm {
    /// Makes the realm in `dir` with tickets of at most `max_life` and starts its KDC, or
    /// `None` when the test is skipped.
    async fn start(test: &str, dir: &Path, max_life: &str) -> Option<Realm> {
        krb5_bins(test)?;
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut realm = Realm {
            kdc: Command::new("true").spawn().unwrap(),
            dir: dir.to_owned(),
            port,
        };
        let d = dir.display();
        std::fs::write(dir.join("krb5.conf"), realm.krb5_conf(None)).unwrap();
        std::fs::write(
            dir.join("kdc.conf"),
            format!(
                "[kdcdefaults]\n  kdc_listen = 127.0.0.1:{port}\n  kdc_tcp_listen = 127.0.0.1:{port}\n\
                 [realms]\n  {REALM} = {{\n    database_name = {d}/principal\n    key_stash_file = {d}/stash\n\
                 \x20   acl_file = {d}/kadm5.acl\n    max_life = {max_life}\n    max_renewable_life = 0\n  }}\n\
                 [logging]\n  kdc = FILE:{d}/kdc.log\n"
            ),
        )
        .unwrap();
        realm.run("kdb5_util", &["create", "-s", "-r", REALM, "-P", "kdc-master-key"]);
        for principal in ["HTTP/localhost", "agent"] {
            realm.run(
                "kadmin.local",
                &["-r", REALM, "-q", &format!("addprinc -randkey {principal}")],
            );
        }
        realm.keytab("HTTP/localhost", "proxy.keytab");
        realm.keytab("agent", "agent.keytab");
        let mut kdc = Command::new("/usr/sbin/krb5kdc");
        kdc.args(["-n", "-r", REALM]).envs(realm.env());
        realm.kdc = spawn_listening(&mut kdc, port).await;
        Some(realm)
    }

    /// Runs a KDC administration program against this realm.
    fn run(&self, program: &str, args: &[&str]) {
        let o = Command::new(format!("/usr/sbin/{program}"))
            .args(args)
            .envs(self.env())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Exports `principal`'s keys into `file` in the realm's directory (mode 600). Exporting
    /// makes new keys: a keytab exported before no longer matches.
    fn keytab(&self, principal: &str, file: &str) -> std::path::PathBuf {
        let path = self.dir.join(file);
        let _ = std::fs::remove_file(&path);
        self.run(
            "kadmin.local",
            &["-r", REALM, "-q", &format!("ktadd -k {} {principal}", path.display())],
        );
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        path
    }

    /// A krb5.conf naming this realm's KDC; with `skew`, the clock skew an acceptor allows.
    fn krb5_conf(&self, skew: Option<Duration>) -> String {
        let skew = skew
            .map(|s| format!("  clockskew = {}\n", s.as_secs()))
            .unwrap_or_default();
        format!(
            "[libdefaults]\n  default_realm = {REALM}\n  dns_lookup_kdc = false\n  dns_lookup_realm = false\n\
             \x20 dns_canonicalize_hostname = false\n  rdns = false\n  udp_preference_limit = 1\n{skew}\
             [realms]\n  {REALM} = {{\n    kdc = 127.0.0.1:{}\n  }}\n",
            self.port
        )
    }

    /// The environment that points MIT Kerberos at this realm.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "KRB5_CONFIG".to_owned(),
                self.dir.join("krb5.conf").display().to_string(),
            ),
            (
                "KRB5_KDC_PROFILE".to_owned(),
                self.dir.join("kdc.conf").display().to_string(),
            ),
        ]
    }

    /// The KDC's log: one line per ticket request.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kdc.log")).unwrap_or_default()
    }

    /// How many ticket requests of `kind` (`AS_REQ`, `TGS_REQ`) the KDC answered for the agent.
    fn issued(&self, kind: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(kind) && l.contains("ISSUE") && l.contains(&format!("agent@{REALM}")))
            .count()
    }
}

impl Drop for Realm {
    fn drop(&mut self) {
        let _ = self.kdc.kill();
        let _ = self.kdc.wait();
    }
}

/// Makes a missing Squid a failure instead of a skip.
const REQUIRE_SQUID: &str = "REQUIRE_SQUID";

/// What a test Squid asks for, in this order: Negotiate (Kerberos checked by Squid's
/// `negotiate_kerberos_auth` against a realm's proxy keytab, and with `negotiate_ntlm` NTLM
/// inside it too, through `negotiate_wrapper_auth`), NTLM, Basic. NTLM and Basic are checked
/// against one account, `CORP\ops`, by the helpers in `tests/proxy`.
#[derive(Default, Clone, Copy)]
struct Offers<'a> {
    negotiate: Option<&'a Realm>,
    negotiate_ntlm: bool,
    ntlm: bool,
    basic: bool,
}

/// Only NTLM.
const NTLM: Offers<'static> = Offers {
    negotiate: None,
    negotiate_ntlm: false,
    ntlm: true,
    basic: false,
};

/// A Squid on loopback asking for the schemes of its [`Offers`].
struct Squid {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Squid {
    /// Starts Squid for `test` taking only NTLM with the account's password, or `None` when
    /// it is skipped; with `basic`, it offers Basic (for the same account and password) after
    /// NTLM.
    async fn start_ntlm(test: &str, dir: &Path, password: &str, basic: bool) -> Option<Squid> {
        Squid::start(test, dir, password, Offers { basic, ..NTLM }).await
    }

    /// Starts Squid for `test` asking for `offers`, or `None` when it is skipped.
    async fn start(test: &str, dir: &Path, password: &str, offers: Offers<'_>) -> Option<Squid> {
        let bin = ["/usr/sbin/squid", "/usr/bin/squid"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists());
        let Some(bin) = bin else {
            skip_unless_required(
                test,
                REQUIRE_SQUID,
                "Squid is not installed (apt-get install squid-openssl)",
            );
            return None;
        };
        let port = free_port();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("password"), password).unwrap();
        std::fs::write(dir.join("attempts"), "").unwrap();
        // The helpers are copied beside Squid's files: Squid runs them as its own user, which
        // may not reach the source tree (a clone in a private temporary directory).
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proxy");
        for script in ["ntlm_helper.py", "basic_helper.py"] {
            std::fs::copy(sources.join(script), dir.join(script)).unwrap();
        }
        let d = dir.display();
        let ntlm_helper = format!("{d}/ntlm_helper.py CORP ops {d}/password {d}/attempts");
        let mut auth = String::new();
        let mut env = Vec::new();
        if let Some(realm) = offers.negotiate {
            std::fs::copy(realm.dir.join("proxy.keytab"), dir.join("proxy.keytab")).unwrap();
            std::fs::write(dir.join("krb5.conf"), realm.krb5_conf(Some(PROXY_SKEW))).unwrap();
            env.push(("KRB5_KTNAME".to_owned(), format!("{d}/proxy.keytab")));
            env.push(("KRB5_CONFIG".to_owned(), format!("{d}/krb5.conf")));
            let kerberos = "/usr/lib/squid/negotiate_kerberos_auth -s GSS_C_NO_NAME";
            let program = if offers.negotiate_ntlm {
                format!("/usr/lib/squid/negotiate_wrapper_auth --ntlm {ntlm_helper} --kerberos {kerberos}")
            } else {
                kerberos.to_owned()
            };
            auth.push_str(&format!(
                "auth_param negotiate program {program}\nauth_param negotiate children 4 startup=1\nauth_param negotiate keep_alive on\n"
            ));
        }
        if offers.ntlm {
            auth.push_str(&format!(
                "auth_param ntlm program {ntlm_helper}\nauth_param ntlm children 4 startup=1\n"
            ));
        }
        if offers.basic {
            auth.push_str(&format!(
                "auth_param basic program {d}/basic_helper.py CORP\\ops {d}/password {d}/attempts\nauth_param basic children 2\nauth_param basic realm relay-test\n"
            ));
        }
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             pid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log {d}/access.log\n\
             coredump_dir {d}\ncache deny all\ncache_mem 8 MB\npinger_enable off\nshutdown_lifetime 0 seconds\n\
             {auth}\
             acl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all\n"
        );
        std::fs::write(dir.join("squid.conf"), conf).unwrap();
        // Started as root, Squid runs as its own user, which must read its keytab and write
        // its logs here.
        if is_root() {
            for d in [dir.parent().unwrap(), dir] {
                std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            }
            assert!(Command::new("chown")
                .args(["-R", "proxy"])
                .arg(dir)
                .status()
                .unwrap()
                .success());
        }
        let mut squid = Squid {
            child: Command::new("true").spawn().unwrap(),
            port,
            dir: dir.to_owned(),
            bin,
            env,
        };
        squid.restart().await;
        Some(squid)
    }

    /// Stops Squid (SIGKILL: every tunnel through it breaks) and starts it again on the
    /// same port.
    async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-N").arg("-f").arg(self.dir.join("squid.conf"));
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.child = spawn_listening(&mut cmd, self.port).await;
    }

    /// The proxy URL with the account and `password` in it.
    fn url(&self, password: &str) -> String {
        format!("http://CORP%5Cops:{password}@127.0.0.1:{}", self.port)
    }

    /// What the helpers said to each answer they checked: `ok`, `wrong`, `v1`, `basic ok`.
    fn attempts(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.join("attempts")).unwrap_or_default();
        text.lines().map(str::to_owned).collect()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Behind a Squid that takes only NTLM, checked against the account's password: the agent
/// accepts its invitation and payloads go both ways through it; a wrong password is refused,
/// named, never printed, and not tried again (the helper sees it once), so the domain does not
/// lock the account out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_squid_with_ntlm_and_a_wrong_password_is_tried_once() {
    let test = "through_squid_with_ntlm_and_a_wrong_password_is_tried_once";
    let tmp = tempfile::tempdir().unwrap();
    let Some(squid) = Squid::start_ntlm(test, &tmp.path().join("squid"), "S3cret-pass", false).await else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let mut public_app = Sink::start().await.unwrap();
    let mut private_app = Sink::start().await.unwrap();
    let code = initiate(&node.data_dir, "c", &public_app.url, &[]).await;
    let agent_dir = tmp.path().join("agent");
    let right = squid.url("S3cret-pass");
    let env = [("RELAY_AGENT__PROXY", right.as_str())];
    let mut agent = accepted_agent(&agent_dir, &code, &private_app.url, &env).await;
    let http = client();
    both_ways(&node, &agent, &mut public_app, &mut private_app).await;
    assert!(squid.attempts().iter().all(|a| a == "ok"), "{:?}", squid.attempts());
    assert!(!agent.log().contains("S3cret-pass"));

    // The password changed at the domain, not here: one refused answer, then a hold.
    drop(agent);
    std::fs::write(squid.dir.join("password"), "N3w-pass").unwrap();
    let before = squid.attempts().len();
    agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &env).await;
    let held = wait_for("the agent to hold the refused password", || async {
        let log = agent.log();
        log.contains("refused the NTLM answer for CORP\\ops earlier")
            .then_some(log)
    })
    .await;
    assert!(held.contains("wrong user or password"), "{held}");
    assert!(!held.contains("S3cret-pass"), "{held}");
    assert_eq!(squid.attempts()[before..], ["wrong".to_owned()], "tried once");
    let o = cli(&agent_dir, &["status"], &env, None).await;
    assert!(!stdout(&o).contains("S3cret-pass"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("refused the NTLM answer for CORP\\ops"),
        "{}",
        stdout(&o)
    );
    // The domain's password set back (an operator had the account reset): `relay
    // proxy-retry` lets the running agent try the held password again.
    std::fs::write(squid.dir.join("password"), "S3cret-pass").unwrap();
    let o = cli(&agent_dir, &["proxy-retry"], &env, None).await;
    assert!(
        stdout(&o).contains("released 1 held proxy credential"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(
        post(&http, &node.api(), "c", b"after".to_vec(), &[]).await.unwrap().0,
        202
    );
    assert_eq!(private_app.next(DEADLINE).await.unwrap().body, b"after");
    assert_eq!(squid.attempts().last().map(String::as_str), Some("ok"));
}

/// A proxy that offers NTLM and Basic: NTLM answers it, the password never goes as Basic,
/// unless `agent.proxy_auth = "basic"` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_offering_ntlm_and_basic_gets_ntlm_unless_basic_is_pinned() {
    let test = "a_proxy_offering_ntlm_and_basic_gets_ntlm_unless_basic_is_pinned";
    let tmp = tempfile::tempdir().unwrap();
    let Some(squid) = Squid::start_ntlm(test, &tmp.path().join("squid"), "S3cret-pass", true).await else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let url = squid.url("S3cret-pass");
    for (dir, pin, seen) in [("auto", "auto", "ok"), ("basic", "basic", "basic ok")] {
        let code = initiate(&node.data_dir, dir, "http://127.0.0.1:9/hook", &[]).await;
        let env = [("RELAY_AGENT__PROXY", url.as_str()), ("RELAY_AGENT__PROXY_AUTH", pin)];
        let before = squid.attempts().len();
        let o = cli(&tmp.path().join(dir), &["accept", &code], &env, None).await;
        assert!(o.status.success(), "{pin}: {}", stderr(&o));
        let attempts = squid.attempts()[before..].to_vec();
        assert!(
            !attempts.is_empty() && attempts.iter().all(|a| a == seen),
            "{pin}: {attempts:?}"
        );
    }
    // Pinned to Negotiate, a proxy without it gets nothing and the operator is told why.
    let o = cli(
        &tmp.path().join("pinned"),
        &[
            "accept",
            &initiate(&node.data_dir, "pinned", "http://127.0.0.1:9/hook", &[]).await,
        ],
        &[
            ("RELAY_AGENT__PROXY", url.as_str()),
            ("RELAY_AGENT__PROXY_AUTH", "negotiate"),
        ],
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("agent.proxy_auth pins Negotiate, which the proxy does not offer"),
        "{}",
        stderr(&o)
    );
    // A scheme relay does not know is a configuration error.
    let o = cli(
        &tmp.path().join("digest"),
        &["accept", "unused"],
        &[
            ("RELAY_AGENT__PROXY", url.as_str()),
            ("RELAY_AGENT__PROXY_AUTH", "digest"),
        ],
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("agent.proxy_auth"), "{}", stderr(&o));
}

/// The account in `agent.proxy_user` with its password in `agent.proxy_password_file`: read
/// again at each handshake, so after a refusal (held, tried once) the corrected file lets the
/// running agent through without a restart; a file other users can read is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_is_read_at_each_handshake() {
    let test = "a_password_file_is_read_at_each_handshake";
    let tmp = tempfile::tempdir().unwrap();
    let Some(squid) = Squid::start_ntlm(test, &tmp.path().join("squid"), "S3cret-pass", false).await else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let mut private_app = Sink::start().await.unwrap();
    let code = initiate(&node.data_dir, "c", "http://127.0.0.1:9/hook", &[]).await;
    let secret = tmp.path().join("proxy-password");
    let write = |password: &str| {
        std::fs::write(&secret, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    };
    write("S3cret-pass");
    let url = format!("http://127.0.0.1:{}", squid.port);
    let file = secret.display().to_string();
    let env = [
        ("RELAY_AGENT__PROXY", url.as_str()),
        ("RELAY_AGENT__PROXY_USER", "CORP\\ops"),
        ("RELAY_AGENT__PROXY_PASSWORD_FILE", file.as_str()),
    ];
    let agent_dir = tmp.path().join("agent");
    let o = cli(
        &agent_dir,
        &["accept", &code, "--deliver-to", &private_app.url],
        &env,
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(squid.attempts(), ["ok"]);

    // A wrong password in the file: refused once, then held.
    write("old-pass");
    let agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &env).await;
    wait_for("the agent to hold the refused password", || async {
        agent
            .log()
            .contains("refused the NTLM answer for CORP\\ops earlier")
            .then_some(())
    })
    .await;
    assert_eq!(squid.attempts(), ["ok", "wrong"], "tried once");
    // Corrected in the file: the running agent gets through at its next try.
    write("S3cret-pass");
    assert_eq!(
        post(&client(), &node.api(), "c", b"after".to_vec(), &[])
            .await
            .unwrap()
            .0,
        202
    );
    assert_eq!(private_app.next(DEADLINE).await.unwrap().body, b"after");
    assert_eq!(squid.attempts()[..2], ["ok", "wrong"]);
    assert!(
        squid.attempts()[2..].iter().all(|a| a == "ok"),
        "{:?}",
        squid.attempts()
    );
    assert!(!agent.log().contains("S3cret-pass") && !agent.log().contains("old-pass"));

    // Readable by others: refused with what to do.
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = cli(&tmp.path().join("other"), &["accept", &code], &env, None).await;
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("agent.proxy_password_file") && stderr(&o).contains("chmod 600"),
        "{}",
        stderr(&o)
    );
}

/// A realm with tickets of at most `max_life` and a Squid in front of it that takes only
/// Negotiate (Kerberos), in `dir`; `None` when `test` is skipped.
async fn kerberos_proxy(test: &str, dir: &Path, max_life: &str) -> Option<(Realm, Squid)> {
    let realm = Realm::start(test, &dir.join("realm"), max_life).await?;
    let negotiate = Offers {
        negotiate: Some(&realm),
        ..Offers::default()
    };
    let squid = Squid::start(test, &dir.join("squid"), "unused", negotiate).await?;
    Some((realm, squid))
}

/// The agent's environment for a proxy that takes Kerberos: the realm's krb5.conf and the
/// agent's keytab, and `extra`.
fn kerberos_env(realm: &Realm, proxy: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "KRB5_CONFIG".to_owned(),
            realm.dir.join("krb5.conf").display().to_string(),
        ),
        ("RELAY_AGENT__PROXY".to_owned(), proxy.to_owned()),
        (
            "RELAY_AGENT__PROXY_KEYTAB".to_owned(),
            realm.dir.join("agent.keytab").display().to_string(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    env
}

/// Borrows an owned environment as the helpers take it.
fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Behind a Squid that takes only Negotiate, checked by Squid's own Kerberos helper against a
/// real MIT KDC: the agent with a keytab accepts and payloads go both ways; doctor names the
/// scheme and both principals, egress the realm and its KDC. Each failure says what it is and
/// names the scheme: a principal the keytab has no key for, a proxy principal the KDC does not
/// know (until `agent.proxy_spn` names the right one), a stale keytab (refused once, then
/// held), no KDC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_squid_with_kerberos_and_each_failure_named() {
    let test = "through_squid_with_kerberos_and_each_failure_named";
    let tmp = tempfile::tempdir().unwrap();
    let Some((realm, squid)) = kerberos_proxy(test, tmp.path(), "10h").await else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let mut public_app = Sink::start().await.unwrap();
    let mut private_app = Sink::start().await.unwrap();
    let by_name = format!("http://localhost:{}", squid.port);
    let env = kerberos_env(&realm, &by_name, &[]);
    let env = borrowed(&env);
    let code = initiate(&node.data_dir, "c", &public_app.url, &[]).await;
    let agent_dir = tmp.path().join("agent");
    let agent = accepted_agent(&agent_dir, &code, &private_app.url, &env).await;
    let http = client();
    both_ways(&node, &agent, &mut public_app, &mut private_app).await;
    assert!(realm.issued("TGS_REQ") >= 1, "{}", realm.log());
    assert!(realm.log().contains("for HTTP/localhost@RELAY.TEST"), "{}", realm.log());

    let o = cli(&agent_dir, &["status"], &env, None).await;
    assert!(
        stdout(&o).contains(&format!(
            "route:        via proxy {by_name} (the proxy offered Negotiate; relay answered Negotiate (Kerberos) as agent@RELAY.TEST for HTTP/localhost)"
        )),
        "{}",
        stdout(&o)
    );
    let o = cli(&agent_dir, &["doctor"], &env, None).await;
    let doctor = stdout(&o);
    assert!(o.status.success(), "{doctor}");
    assert!(
        doctor.contains("relay answered Negotiate (Kerberos) as agent@RELAY.TEST for HTTP/localhost"),
        "{doctor}"
    );
    let o = cli(&agent_dir, &["egress"], &env, None).await;
    let egress = stdout(&o);
    assert!(
        egress
            .lines()
            .any(|l| l.starts_with(&format!("127.0.0.1:{} ", realm.port))
                && l.contains("Kerberos KDC of realm RELAY.TEST")
                && l.contains("krb5.conf")),
        "{egress}"
    );

    // A principal the keytab holds no key for.
    let refused = |extra: &'static [(&'static str, &'static str)], proxy: String| {
        let (realm, node, tmp) = (&realm, &node, tmp.path().to_owned());
        async move {
            let env = kerberos_env(realm, &proxy, extra);
            let code = initiate(
                &node.data_dir,
                &format!("x{}", unique()),
                "http://127.0.0.1:9/hook",
                &[],
            )
            .await;
            let o = cli(
                &tmp.join(format!("a{}", unique())),
                &["accept", &code],
                &borrowed(&env),
                None,
            )
            .await;
            (o.status.code(), stderr(&o))
        }
    };
    let (status, err) = refused(&[("RELAY_AGENT__PROXY_PRINCIPAL", "other@RELAY.TEST")], by_name.clone()).await;
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("asked for Negotiate")
            && err.contains("holds no key for other@RELAY.TEST")
            && err.contains("agent.keytab"),
        "{err}"
    );
    // The proxy by address: HTTP/127.0.0.1 is no principal of the realm; agent.proxy_spn
    // names the one it has.
    let by_address = format!("http://127.0.0.1:{}", squid.port);
    let (status, err) = refused(&[], by_address.clone()).await;
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("does not know the proxy's principal HTTP/127.0.0.1") && err.contains("agent.proxy_spn"),
        "{err}"
    );
    let (status, err) = refused(&[("RELAY_AGENT__PROXY_SPN", "HTTP/localhost")], by_address).await;
    assert_eq!(status, Some(0), "{err}");
    // No KDC: a krb5.conf naming a port where none listens.
    let dead = tmp.path().join("dead-krb5.conf");
    std::fs::write(
        &dead,
        realm
            .krb5_conf(None)
            .replace(&realm.port.to_string(), &free_port().to_string()),
    )
    .unwrap();
    let mut env = kerberos_env(&realm, &by_name, &[]);
    env[0].1 = dead.display().to_string();
    let code = initiate(&node.data_dir, "nokdc", "http://127.0.0.1:9/hook", &[]).await;
    let o = cli(&tmp.path().join("nokdc"), &["accept", &code], &borrowed(&env), None).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no KDC of realm RELAY.TEST could be reached"),
        "{}",
        stderr(&o)
    );

    // A stale keytab (the account's keys exported again since): the KDC refuses it once; the
    // running agent then holds it instead of asking again, and says so in status.
    let stale = tmp.path().join("stale.keytab");
    std::fs::copy(realm.dir.join("agent.keytab"), &stale).unwrap();
    std::fs::set_permissions(&stale, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    realm.keytab("agent", "agent.keytab");
    drop(agent);
    let stale_path = stale.display().to_string();
    let env = kerberos_env(&realm, &by_name, &[("RELAY_AGENT__PROXY_KEYTAB", stale_path.as_str())]);
    let env = borrowed(&env);
    let agent = Daemon::start(&agent_dir, &["run", "--intake-listen", "127.0.0.1:0"], &env).await;
    let held = wait_for("the agent to hold the stale keytab", || async {
        let log = agent.log();
        log.contains("relay does not try that keytab again").then_some(log)
    })
    .await;
    assert!(
        held.contains("did not accept the keytab's key for agent@RELAY.TEST"),
        "{held}"
    );
    let o = cli(&agent_dir, &["status"], &env, None).await;
    assert!(stdout(&o).contains("refused the keytab's key for"), "{}", stdout(&o));
    // The fresh keytab copied over the stale one: the running agent gets through.
    std::fs::copy(realm.dir.join("agent.keytab"), &stale).unwrap();
    assert_eq!(
        post(&http, &node.api(), "c", b"after".to_vec(), &[]).await.unwrap().0,
        202
    );
    assert_eq!(private_app.next(DEADLINE).await.unwrap().body, b"after");
}

/// A proxy offering Negotiate (Kerberos, and NTLM inside it), NTLM and Basic together: a keytab
/// answers Negotiate with Kerberos, a password from the password file answers NTLM and never
/// Basic, `agent.proxy_auth = "basic"` is obeyed. A proxy offering Negotiate alone gets NTLM
/// inside Negotiate from an agent with a password and no keytab, checked by the same helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_ntlm_and_basic_together_each_answered_by_its_credentials() {
    let test = "negotiate_ntlm_and_basic_together_each_answered_by_its_credentials";
    let tmp = tempfile::tempdir().unwrap();
    let Some(realm) = Realm::start(test, &tmp.path().join("realm"), "10h").await else {
        return;
    };
    let all = Offers {
        negotiate: Some(&realm),
        negotiate_ntlm: true,
        ntlm: true,
        basic: true,
    };
    let Some(squid) = Squid::start(test, &tmp.path().join("squid"), "S3cret-pass", all).await else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let secret = tmp.path().join("proxy-password");
    std::fs::write(&secret, "S3cret-pass\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let secret = secret.display().to_string();
    let proxy = format!("http://localhost:{}", squid.port);
    let krb5_conf = realm.dir.join("krb5.conf").display().to_string();
    let password = [
        ("KRB5_CONFIG", krb5_conf.as_str()),
        ("RELAY_AGENT__PROXY", proxy.as_str()),
        ("RELAY_AGENT__PROXY_USER", "CORP\\ops"),
        ("RELAY_AGENT__PROXY_PASSWORD_FILE", secret.as_str()),
    ];
    // Accepts a code with `env` in a directory of its own; returns what doctor said of the
    // tunnel and the helpers' verdicts meanwhile.
    let accept = |env: Vec<(String, String)>| {
        let (node, tmp, squid) = (&node, tmp.path().to_owned(), &squid);
        async move {
            let name = format!("c{}", unique());
            let code = initiate(&node.data_dir, &name, "http://127.0.0.1:9/hook", &[]).await;
            let before = squid.attempts().len();
            let dir = tmp.join(&name);
            let o = cli(&dir, &["accept", &code], &borrowed(&env), None).await;
            assert!(o.status.success(), "{env:?}: {}", stderr(&o));
            let o = cli(&dir, &["doctor"], &borrowed(&env), None).await;
            let tcp = stdout(&o)
                .lines()
                .find(|l| l.contains("] tcp"))
                .unwrap_or_default()
                .to_owned();
            (tcp, squid.attempts()[before..].to_vec())
        }
    };
    let owned = |env: &[(&str, &str)]| {
        env.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<Vec<_>>()
    };

    let (tcp, attempts) = accept(kerberos_env(&realm, &proxy, &[])).await;
    assert!(
        tcp.contains(
            "the proxy offered Negotiate, NTLM, Basic; relay answered Negotiate (Kerberos) as agent@RELAY.TEST"
        ),
        "{tcp}"
    );
    assert!(attempts.is_empty(), "no password was checked: {attempts:?}");
    let (tcp, attempts) = accept(owned(&password)).await;
    assert!(tcp.contains("relay answered NTLM (NTLMv2) as CORP\\ops"), "{tcp}");
    assert!(
        !attempts.is_empty() && attempts.iter().all(|a| a == "ok"),
        "{attempts:?}"
    );
    let mut pinned = owned(&password);
    pinned.push(("RELAY_AGENT__PROXY_AUTH".into(), "basic".into()));
    let (tcp, attempts) = accept(pinned).await;
    assert!(tcp.contains("relay answered Basic"), "{tcp}");
    assert!(
        !attempts.is_empty() && attempts.iter().all(|a| a == "basic ok"),
        "{attempts:?}"
    );

    // Negotiate alone, with a password and no keytab: NTLM inside Negotiate.
    let only = Offers {
        negotiate: Some(&realm),
        negotiate_ntlm: true,
        ..Offers::default()
    };
    let Some(negotiate_only) = Squid::start(test, &tmp.path().join("squid2"), "S3cret-pass", only).await else {
        return;
    };
    let proxy2 = format!("http://localhost:{}", negotiate_only.port);
    let mut env = owned(&password);
    env[1].1 = proxy2;
    let name = "negotiate-only";
    let code = initiate(&node.data_dir, name, "http://127.0.0.1:9/hook", &[]).await;
    let o = cli(&tmp.path().join(name), &["accept", &code], &borrowed(&env), None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !negotiate_only.attempts().is_empty() && negotiate_only.attempts().iter().all(|a| a == "ok"),
        "{:?}",
        negotiate_only.attempts()
    );
    let o = cli(&tmp.path().join(name), &["doctor"], &borrowed(&env), None).await;
    assert!(
        stdout(&o).contains("the proxy offered Negotiate; relay answered Negotiate with NTLM inside (NTLMv2; no Kerberos keytab) as CORP\\ops"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("S3cret-pass"));
}

/// Tickets of two minutes' lifetime, and a run longer than the lifetime plus the proxy's clock
/// skew allowance, in which the proxy restarts every minute so that the agent opens new
/// tunnels: every payload arrives once and in order both ways, and the KDC's log shows that
/// the agent asked for new tickets meanwhile (MIT Kerberos renews them from the keytab before
/// they expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kerberos_tickets_are_renewed_over_a_run_longer_than_their_lifetime() {
    let test = "kerberos_tickets_are_renewed_over_a_run_longer_than_their_lifetime";
    let lifetime = Duration::from_secs(120);
    let tmp = tempfile::tempdir().unwrap();
    let Some((realm, mut squid)) = kerberos_proxy(test, tmp.path(), "2m").await else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let mut public_app = Sink::start().await.unwrap();
    let mut private_app = Sink::start().await.unwrap();
    let env = kerberos_env(&realm, &format!("http://localhost:{}", squid.port), &[]);
    let env = borrowed(&env);
    let code = initiate(&node.data_dir, "c", &public_app.url, &[]).await;
    let agent = accepted_agent(&tmp.path().join("agent"), &code, &private_app.url, &env).await;
    let first_tickets = realm.issued("AS_REQ");

    // Wall time must pass for tickets to expire: the pace of the run, not a wait for an event.
    let run = lifetime + PROXY_SKEW + Duration::from_secs(60);
    let pace = Duration::from_secs(15);
    let started = std::time::Instant::now();
    let http = client();
    let mut sent = 0;
    let mut restarted = started;
    while started.elapsed() < run {
        let (down, up) = (format!("down-{sent}"), format!("up-{sent}"));
        assert_eq!(
            post(&http, &node.api(), "c", down.into_bytes(), &[]).await.unwrap().0,
            202
        );
        assert_eq!(
            post(&http, &agent.api(), "c", up.into_bytes(), &[]).await.unwrap().0,
            202
        );
        sent += 1;
        if restarted.elapsed() >= Duration::from_secs(60) {
            squid.restart().await;
            restarted = std::time::Instant::now();
        }
        tokio::time::sleep(pace).await;
    }
    for (app, prefix) in [(&mut private_app, "down"), (&mut public_app, "up")] {
        for i in 0..sent {
            let got = app
                .next(DEADLINE)
                .await
                .unwrap_or_else(|| panic!("{prefix}-{i} did not arrive:\n{}", agent.log()));
            assert_eq!(
                String::from_utf8_lossy(&got.body),
                format!("{prefix}-{i}"),
                "in order, once"
            );
        }
    }
    assert!(
        realm.issued("AS_REQ") > first_tickets,
        "new tickets after the first ones expired:\n{}",
        realm.log()
    );
    assert!(
        !agent.log().contains("could not get a Kerberos ticket"),
        "{}",
        agent.log()
    );
}

/// An agent whose clock is ten minutes ahead of the KDC's (libfaketime), with MIT Kerberos's
/// clock compensation off as many sites have it: the error says the KDC reports clock skew
/// and names Negotiate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kerberos_clock_skew_is_named() {
    let test = "kerberos_clock_skew_is_named";
    let faketime = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
    if !faketime.exists() {
        skip_unless_required(
            test,
            REQUIRE_KRB5,
            "libfaketime is not installed (apt-get install faketime)",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((realm, squid)) = kerberos_proxy(test, tmp.path(), "10h").await else {
        return;
    };
    let node = start_node(&tmp.path().join("node"), None).await;
    let code = initiate(&node.data_dir, "c", "http://127.0.0.1:9/hook", &[]).await;
    let strict = tmp.path().join("strict-krb5.conf");
    std::fs::write(
        &strict,
        realm
            .krb5_conf(None)
            .replace("[realms]", "  kdc_timesync = 0\n[realms]"),
    )
    .unwrap();
    let mut env = kerberos_env(&realm, &format!("http://localhost:{}", squid.port), &[]);
    env[0].1 = strict.display().to_string();
    env.push(("LD_PRELOAD".into(), faketime.display().to_string()));
    env.push(("FAKETIME".into(), "+10m".into()));
    env.push(("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()));
    let o = cli(&tmp.path().join("agent"), &["accept", &code], &borrowed(&env), None).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("asked for Negotiate") && stderr(&o).contains("the KDC reports clock skew"),
        "{}",
        stderr(&o)
    );
}
