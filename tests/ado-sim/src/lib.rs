//! An in-memory simulator of the Azure DevOps work item tracking REST API, shaped after
//! Microsoft's published specification, for tests of a sync engine and for operators trying
//! their sync rules before production. Not part of the relay binary.
//!
//! # Layout
//!
//! - [`profile`]: version profiles (Services 7.1, Server 2022/2020/2019) and the version gate.
//! - [`store`]: the collection's rules: work items from JSON Patch (`store/patch`),
//!   revisions, the change feed, comments, attachments, value coercion.
//! - [`model`]: the plain data the store holds (fields, types, revisions, comments).
//! - [`render`]: stored data to the API's JSON shapes.
//! - [`wiql`]: the WIQL subset, parsed and evaluated.
//! - [`server`]: HTTP: authentication, routing, counters; `server/{faults, queries,
//!   comments, control, hooks}` hold the injected faults, WIQL and the feed, both comment
//!   APIs, the `/_sim` control API and service hook delivery.
//! - [`spec`]: the specification's facts (`spec/operations.json`) and the check of each
//!   request and answer against them (`server/conformance` runs it on every routed call).
//! - [`clock`], [`error`]: timestamps and the service's error body.
//!
//! Start one with [`Sim::start`]; the [`SimHandle`] gives the base URL and PAT, and the
//! control methods tests use (projects, faults, "human" edits, counters).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod error;
pub mod model;
pub mod profile;
pub mod render;
pub mod server;
pub mod spec;
pub mod store;
pub mod wiql;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ApiError;
pub use model::{Identity, Kind};
pub use profile::{parse_latest_supported, Profile, Version};
use server::{lock, Shared};
use store::{Store, WriteOpts};

/// Most simultaneous connections.
const MAX_CONNECTIONS: usize = 256;
/// How long a peer may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Version profile.
    pub profile: Profile,
    /// Serve HTTPS with a fresh CA (its PEM is in [`SimHandle::ca_pem`]).
    pub tls: bool,
    /// Collection or organisation name in URLs; the profile's default when `None`.
    pub collection: Option<String>,
    /// Projects to create at start.
    pub projects: Vec<String>,
    /// The PAT to accept; a random one when `None`.
    pub pat: Option<String>,
    /// The PAT owner.
    pub user: Identity,
    /// Where to listen; `127.0.0.1:0` by default.
    pub listen: SocketAddr,
    /// Largest request body (attachments included).
    pub max_body: usize,
    /// Check every request and answer against the specification's description
    /// (`spec/operations.json`) and keep the mismatches; on by default.
    pub conformance: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            profile: Profile::Services,
            tls: false,
            collection: None,
            projects: Vec::new(),
            pat: None,
            user: Identity {
                display_name: "Sim User".into(),
                unique_name: "sim.user@example.com".into(),
            },
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body: 160 * 1024 * 1024,
            conformance: true,
        }
    }
}

/// The simulator.
pub struct Sim;

/// A running simulator: its address, credentials and control methods. Dropping it does not
/// stop the server; call [`SimHandle::shutdown`].
#[derive(Clone)]
pub struct SimHandle {
    /// `http(s)://127.0.0.1:port/{collection}`: what a client configures as the tracker URL.
    pub url: String,
    /// The listening address.
    pub addr: SocketAddr,
    /// The accepted PAT.
    pub pat: String,
    /// PEM of the CA that signed the server certificate (TLS only).
    pub ca_pem: Option<String>,
    shared: Arc<Shared>,
    token: CancellationToken,
    tracker: TaskTracker,
}

/// A failure to start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

fn random_pat() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 26];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b[..8].copy_from_slice(&clock::now_ms().to_le_bytes());
    }
    data_encoding::BASE32_NOPAD.encode(&b).to_lowercase()
}

/// A CA and a server certificate for `localhost` and `127.0.0.1` signed by it.
fn tls_config() -> Result<(Arc<rustls::ServerConfig>, String), StartError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let e = |x: rcgen::Error| StartError(format!("generating the test certificate: {x}"));
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "ado-sim test CA");
    let ca_key = KeyPair::generate().map_err(e)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).map_err(e)?;
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().map_err(e)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).map_err(e)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|x| StartError(format!("TLS versions: {x}")))?
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)
        .map_err(|x| StartError(format!("TLS certificate: {x}")))?;
    Ok((Arc::new(config), ca_cert.pem()))
}

impl Sim {
    /// Binds, starts serving and answers the handle.
    pub async fn start(opts: SimOptions) -> Result<SimHandle, StartError> {
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| StartError(format!("binding {}: {e}", opts.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError(format!("reading the bound address: {e}")))?;
        let (tls, ca_pem) = if opts.tls {
            let (c, pem) = tls_config()?;
            (Some(tokio_rustls::TlsAcceptor::from(c)), Some(pem))
        } else {
            (None, None)
        };
        let scheme = if opts.tls { "https" } else { "http" };
        let host = if opts.tls && addr.ip().is_loopback() {
            "localhost".to_string()
        } else {
            addr.ip().to_string()
        };
        let collection = opts
            .collection
            .clone()
            .unwrap_or_else(|| opts.profile.default_collection().to_string());
        let url = format!("{scheme}://{host}:{}/{collection}", addr.port());
        let mut store = Store::new(opts.profile, collection, url.clone());
        for p in &opts.projects {
            store.add_project(p);
        }
        store.add_identity(opts.user.clone());
        store.add_identity(server::human());
        let pat = opts.pat.clone().unwrap_or_else(random_pat);
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            pats: Mutex::new(vec![
                (pat.clone(), opts.user.clone()),
                (format!("{pat}-human"), server::human()),
            ]),
            faults: Mutex::new(server::Faults::default()),
            counters: Mutex::new(BTreeMap::new()),
            gates: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeMap::new()),
            url: url.clone(),
            hooks: Mutex::new(Vec::new()),
            hook_delivered: AtomicU64::new(0),
            hook_failed: AtomicU64::new(0),
            notification: AtomicU64::new(0),
            max_body: opts.max_body,
            conformance: opts.conformance,
            violations: Mutex::new(Vec::new()),
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http(),
        });
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            listener,
            tls,
            shared.clone(),
            token.clone(),
            tracker.clone(),
        ));
        Ok(SimHandle {
            url,
            addr,
            pat,
            ca_pem,
            shared,
            token,
            tracker,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = token.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = token.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                // Transient accept errors (e.g. too many open files) must not end the loop.
                Err(_) => continue,
            },
        };
        let (shared, token, tls) = (shared.clone(), token.clone(), tls.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| server::handle(shared.clone(), req));
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(s)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await else {
                        return;
                    };
                    serve_conn(TokioIo::new(s), svc, token).await
                }
                None => serve_conn(TokioIo::new(stream), svc, token).await,
            }
        });
    }
}

async fn serve_conn<I, S>(io: I, svc: S, token: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = server::Body> + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = token.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn).await;
        }
    }
}

impl SimHandle {
    /// Stops accepting, lets open connections finish briefly, and waits for every task.
    pub async fn shutdown(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Makes a person known to identity fields (`System.AssignedTo`); the PATs' owners are
    /// known from the start.
    pub fn add_identity(&self, display_name: &str, unique_name: &str) {
        lock(&self.shared.store).add_identity(Identity {
            display_name: display_name.into(),
            unique_name: unique_name.into(),
        });
    }

    /// A PAT owned by the "human" editor, for edits made as someone other than the client.
    pub fn human_pat(&self) -> String {
        format!("{}-human", self.pat)
    }

    /// The `Authorization` header value for the main PAT.
    pub fn auth_header(&self) -> String {
        format!(
            "Basic {}",
            data_encoding::BASE64.encode(format!(":{}", self.pat).as_bytes())
        )
    }

    /// Creates a project (Agile work item types) and answers its id.
    pub fn create_project(&self, name: &str) -> String {
        lock(&self.shared.store).add_project(name).id
    }

    /// Gives `project` the work item types of the Scrum process instead of Agile's.
    pub fn use_scrum(&self, project: &str) {
        let mut s = lock(&self.shared.store);
        if let Some(p) = s.projects.iter_mut().find(|p| p.name.eq_ignore_ascii_case(project)) {
            p.types = model::scrum_types();
        }
    }

    /// Adds a field to the collection's catalogue (e.g. a `Custom.*` field).
    pub fn add_field(&self, reference: &str, kind: Kind) {
        lock(&self.shared.store).add_field(reference, kind);
    }

    /// The version profile in force.
    pub fn profile(&self) -> Profile {
        lock(&self.shared.store).profile
    }

    /// Switches the version profile.
    pub fn set_profile(&self, p: Profile) {
        lock(&self.shared.store).profile = p;
    }

    /// The next `n` API requests answer 429 with `Retry-After: retry_after_secs`.
    pub fn inject_429(&self, n: u32, retry_after_secs: u64) {
        let mut f = lock(&self.shared.faults);
        f.only = None;
        f.throttle = n;
        f.throttle_retry_after = retry_after_secs;
    }

    /// The next `n` successful API responses carry `Retry-After: retry_after_secs` and the
    /// `X-RateLimit-*` headers (with a non-zero `X-RateLimit-Delay`): delayed mode, before
    /// the service starts blocking with 429.
    pub fn inject_rate_limit_warning(&self, n: u32, retry_after_secs: u64) {
        let mut f = lock(&self.shared.faults);
        f.delayed = n;
        f.delayed_retry_after = retry_after_secs;
    }

    /// Like [`SimHandle::inject_429`], only for requests to one endpoint (the names of
    /// [`SimHandle::counters`], e.g. `workitems.update`); other requests pass.
    pub fn inject_429_on(&self, endpoint: &str, n: u32, retry_after_secs: u64) {
        let mut f = lock(&self.shared.faults);
        f.only = Some(endpoint.to_string());
        f.throttle = n;
        f.throttle_retry_after = retry_after_secs;
    }

    /// The next `n` API requests answer 503 with `Retry-After: retry_after_secs`.
    pub fn inject_503(&self, n: u32, retry_after_secs: u64) {
        let mut f = lock(&self.shared.faults);
        f.only = None;
        f.unavailable = n;
        f.unavailable_retry_after = retry_after_secs;
    }

    /// From now on, answers of `endpoint` (a name of [`SimHandle::counters`]) wait after the
    /// request took effect until the returned sender sends `true` or is dropped. Each held
    /// answer counts under `{endpoint}.held`.
    pub fn hold_answers(&self, endpoint: &str) -> tokio::sync::watch::Sender<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        lock(&self.shared.gates).insert(endpoint.to_string(), rx);
        tx
    }

    /// Answers of `endpoint` no longer wait (those waiting are not released: send `true`).
    pub fn stop_holding(&self, endpoint: &str) {
        lock(&self.shared.gates).remove(endpoint);
    }

    /// Answers of `endpoint` wait, after the request took effect, until
    /// [`SimHandle::release`] (HTTP: `POST /_sim/hold {"endpoint": …}`).
    pub fn hold(&self, endpoint: &str) {
        server::hold(&self.shared, endpoint);
    }

    /// Answers of `endpoint` no longer wait, and those waiting go out (HTTP:
    /// `POST /_sim/release {"endpoint": …}`).
    pub fn release(&self, endpoint: &str) {
        server::release(&self.shared, endpoint);
    }

    /// The next `n` calls of `endpoint` take effect, then answer `status` (502 or 504) as a
    /// gateway that lost the server's answer would; `n = 0` disarms (HTTP:
    /// `POST /_sim/fail-after-commit {"endpoint", "status", "count"}`). Each counts under
    /// `fault.{status}.after-commit`.
    ///
    /// # Panics
    ///
    /// On a status other than 502 or 504 (a test's own mistake).
    pub fn fail_after_commit(&self, endpoint: &str, status: u16, n: u32) {
        if let Err(e) = server::fail_after_commit(&self.shared, endpoint, status, n) {
            panic!("fail_after_commit: {}", e.message);
        }
    }

    /// Calls of `endpoint` wait `delay` before they take effect (a slow commit a client may
    /// time out on); zero stops (HTTP: `POST /_sim/slow-commits {"endpoint", "delayMs"}`).
    /// Each counts under `{endpoint}.slow`.
    pub fn slow_commits(&self, endpoint: &str, delay: std::time::Duration) {
        server::slow_commits(&self.shared, endpoint, delay);
    }

    /// The total size one attachment may have, chunked or not; refused above it as the server
    /// refuses (`TF237082`, naming the limit). The profile's default (4 MB on Server, 130 MB
    /// on Services) until set (HTTP: `PUT /_sim/attachment-limit {"bytes": n|null}`).
    pub fn set_attachment_limit(&self, bytes: u64) {
        lock(&self.shared.faults).attachment_limit = Some(bytes);
    }

    /// Answers name `url` as the collection's base in item, attachment and link URLs instead
    /// of [`SimHandle::url`] (an organisation's canonical host, e.g.
    /// `https://fabrikam.visualstudio.com` when asked on `https://dev.azure.com/fabrikam`);
    /// `None` restores it (HTTP: `PUT /_sim/canonical {"url": …|null}`). Connection data lists
    /// both as access mappings.
    pub fn set_canonical_url(&self, url: Option<&str>) {
        server::set_canonical(&self.shared, url);
    }

    /// Moves work item `id`'s creation to `created_ms` (unix ms): its `System.CreatedDate` in
    /// every revision, as an item that has existed for a while (a test of searches by date).
    pub fn backdate(&self, id: u64, created_ms: i64) {
        let mut s = lock(&self.shared.store);
        if let Some(w) = s.items.get_mut(&id) {
            for r in &mut w.revisions {
                r.fields
                    .insert("System.CreatedDate".into(), Value::String(clock::format(created_ms)));
            }
        }
    }

    /// Right after the next read of work item `id` is answered, a "human" applies `ops`, so
    /// the reader's revision is stale when it writes.
    pub fn edit_after_next_read(&self, id: u64, ops: Vec<Value>) {
        lock(&self.shared.store).after_read.insert(id, (server::human(), ops));
    }

    /// A "human" applies `ops` to work item `id` now; answers the new rev.
    pub fn edit_as_human(&self, id: u64, ops: &[Value]) -> Result<u32, ApiError> {
        let o = as_human(false);
        let mut s = lock(&self.shared.store);
        let wi = s.update(id, None, ops, &o)?;
        drop(s);
        // Deliver the edit's hook events now rather than with the next request.
        if tokio::runtime::Handle::try_current().is_ok() {
            server::deliver_pending(&self.shared);
        }
        Ok(wi.rev())
    }

    /// Creates a work item as the "human" editor, without HTTP (seeding data for tests);
    /// answers its id.
    pub fn create_item(&self, project: &str, type_name: &str, ops: &[Value]) -> Result<u64, ApiError> {
        let o = as_human(false);
        let id = lock(&self.shared.store).create(project, type_name, ops, &o)?.id;
        if tokio::runtime::Handle::try_current().is_ok() {
            server::deliver_pending(&self.shared);
        }
        Ok(id)
    }

    /// Adds a comment as the "human" editor (a `System.History` write on Server 2019);
    /// answers the work item's new rev.
    pub fn add_comment_as_human(&self, id: u64, text: &str) -> Result<u32, ApiError> {
        let o = as_human(true);
        let mut s = lock(&self.shared.store);
        if s.profile.has_comments_api() {
            s.add_comment(id, None, text, "html", &o)?;
        } else {
            let ops = [serde_json::json!({"op": "add", "path": "/fields/System.History", "value": text})];
            s.update(id, None, &ops, &o)?;
        }
        let rev = s.item(id, None)?.rev();
        drop(s);
        if tokio::runtime::Handle::try_current().is_ok() {
            server::deliver_pending(&self.shared);
        }
        Ok(rev)
    }

    /// Subscribes a web hook; answers its id.
    pub fn subscribe(&self, url: &str, header: Option<(&str, &str)>, event_types: &[&str]) -> String {
        let headers = header
            .map(|(k, v)| vec![(k.to_string(), v.to_string())])
            .unwrap_or_default();
        server::subscribe(
            &self.shared,
            url,
            headers,
            event_types.iter().map(|s| s.to_string()).collect(),
        )
    }

    /// Hook POSTs answered 2xx, and failed.
    pub fn hook_deliveries(&self) -> (u64, u64) {
        (
            self.shared.hook_delivered.load(Ordering::Relaxed),
            self.shared.hook_failed.load(Ordering::Relaxed),
        )
    }

    /// Requests per endpoint (`workitems.get`, `reporting.revisions`, `fault.429`, …), and
    /// events (`reporting.revisions.seen`: a feed page that held revisions).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.counters).clone()
    }

    /// The mismatches with the specification's description found so far, distinct, in order
    /// (e.g. `workitems.get 7.1: response $.fields: expected object, got string`); empty when
    /// checking is off.
    pub fn conformance_violations(&self) -> Vec<String> {
        lock(&self.shared.violations).clone()
    }

    /// Panics listing every mismatch found so far, naming the simulator's URL.
    pub fn assert_conformant(&self) {
        let v = self.conformance_violations();
        assert!(
            v.is_empty(),
            "{} request(s) or answer(s) of {} depart from the specification:\n  {}",
            v.len(),
            self.url,
            v.join("\n  ")
        );
    }

    /// Requests counted under one endpoint name.
    pub fn count(&self, endpoint: &str) -> u64 {
        lock(&self.shared.counters).get(endpoint).copied().unwrap_or(0)
    }

    /// Ids of the live work items of a project (all projects when `None`).
    pub fn item_ids(&self, project: Option<&str>) -> Vec<u64> {
        let s = lock(&self.shared.store);
        let pid = project.and_then(|p| s.project(p)).map(|p| p.id.clone());
        s.items
            .values()
            .filter(|w| !w.deleted && pid.as_ref().is_none_or(|p| *p == w.project_id))
            .map(|w| w.id)
            .collect()
    }

    /// The current fields and rev of a work item.
    pub fn item(&self, id: u64) -> Option<(u32, BTreeMap<String, Value>)> {
        let s = lock(&self.shared.store);
        s.items
            .get(&id)
            .filter(|w| !w.deleted)
            .map(|w| (w.rev(), w.latest().fields.clone()))
    }

    /// The "human" editor changes the text of comment `comment` of item `id` (comments API
    /// profiles only), or deletes it when `text` is `None`; answers the item's new rev.
    pub fn change_comment_as_human(&self, id: u64, comment: u64, text: Option<&str>) -> Result<u32, ApiError> {
        let o = as_human(true);
        let mut s = lock(&self.shared.store);
        s.change_comment(id, None, comment, text, &o)?;
        let rev = s.item(id, None)?.rev();
        drop(s);
        if tokio::runtime::Handle::try_current().is_ok() {
            server::deliver_pending(&self.shared);
        }
        Ok(rev)
    }

    /// The live comments of item `id` with their ids, oldest first.
    pub fn comments_with_ids(&self, id: u64) -> Vec<(u64, String)> {
        let s = lock(&self.shared.store);
        s.items
            .get(&id)
            .map(|w| {
                w.comments
                    .iter()
                    .filter(|c| !c.deleted)
                    .map(|c| (c.id, c.text.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The live comments' texts of a work item (comments API profiles).
    pub fn comment_texts(&self, id: u64) -> Vec<String> {
        self.comments_with_ids(id).into_iter().map(|(_, text)| text).collect()
    }

    /// The current relations of a work item: type, URL, attributes.
    pub fn relations(&self, id: u64) -> Vec<(String, String, serde_json::Map<String, Value>)> {
        let s = lock(&self.shared.store);
        s.items
            .get(&id)
            .map(|w| {
                w.latest()
                    .relations
                    .iter()
                    .map(|r| (r.rel.clone(), r.url.clone(), r.attributes.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every non-empty `System.History` text of a work item, oldest first: the comments of
    /// Server 2019, and the discussion entries of the comments API on the others.
    pub fn history_texts(&self, id: u64) -> Vec<String> {
        let s = lock(&self.shared.store);
        s.items
            .get(&id)
            .map(|w| {
                w.revisions
                    .iter()
                    .filter_map(|r| r.fields.get("System.History").and_then(Value::as_str))
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Uploads `bytes` as `file_name` and attaches it to work item `id` as the "human"
    /// editor; answers the attachment id.
    pub fn attach_as_human(&self, id: u64, file_name: &str, bytes: &[u8]) -> Result<String, ApiError> {
        let (attachment, url) = self.upload_as_human(file_name, bytes);
        let ops = [
            serde_json::json!({"op": "add", "path": "/relations/-", "value": {"rel": "AttachedFile", "url": url, "attributes": {"comment": ""}}}),
        ];
        self.edit_as_human(id, &ops)?;
        Ok(attachment)
    }

    /// Uploads `bytes` as `file_name` without attaching it to any item, as a pasted image is
    /// stored; answers the attachment id and its URL (what an HTML field's `<img>` links).
    pub fn upload_as_human(&self, file_name: &str, bytes: &[u8]) -> (String, String) {
        let (a, base) = {
            let mut s = lock(&self.shared.store);
            (s.add_attachment(file_name, Some(bytes.to_vec())), s.base_url.clone())
        };
        let url = format!(
            "{}/_apis/wit/attachments/{}?fileName={}",
            base.trim_end_matches('/'),
            a.id,
            file_name.replace(' ', "%20")
        );
        (a.id, url)
    }

    /// The bytes of an uploaded attachment.
    pub fn attachment_bytes(&self, id: &str) -> Option<Vec<u8>> {
        lock(&self.shared.store).attachment(id).ok().map(|a| a.data.clone())
    }
}

/// How the "human" editor writes: as someone other than the client, rules bypassed or not.
fn as_human(bypass_rules: bool) -> WriteOpts {
    WriteOpts {
        validate_only: false,
        bypass_rules,
        suppress_notifications: false,
        actor: server::human(),
    }
}
