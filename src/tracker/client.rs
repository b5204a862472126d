//! The HTTP side of the tracker client: the PAT as a Basic credential, URLs with their
//! `api-version` and the other URLs of the same collection, one deadline and one size bound
//! per request, waits on 429/503 through `crate::retry` (and on 502/504 for requests safe to
//! repeat), the version probe, and the server's refusals as [`TrackerError`]s.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::{ApiVersion, TrackerError};
use crate::config::TrackerSettings;
use crate::http::{self, ClientError, Method, Reply, StatusCode};

/// The newest REST API version relay speaks; a probe starts there.
pub const LATEST_KNOWN: ApiVersion = ApiVersion { major: 7, minor: 1 };
/// The oldest it speaks (Azure DevOps Server 2019).
pub const OLDEST_KNOWN: ApiVersion = ApiVersion { major: 5, minor: 0 };
/// Largest JSON answer read (a page of 200 work items with long descriptions fits).
pub const MAX_JSON_ANSWER: usize = 32 * 1024 * 1024;
/// How many times a 429/503 is retried before the call gives up with `Busy`.
pub const MAX_RETRIES: u32 = 5;
/// Total wait across those retries, unless the server's own `Retry-After` asks for more.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// First backoff delay when the server names none.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest backoff delay between two attempts when the server names none.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// The most a success carrying `Retry-After` (the service's delayed mode) holds back the next
/// request.
const MAX_PACE: Duration = Duration::from_secs(30);
/// The released (not preview-only) REST API versions relay speaks, oldest first: a server
/// whose latest is a preview is spoken to in the highest of these below it.
pub const RELEASED: [ApiVersion; 5] = [
    ApiVersion { major: 5, minor: 0 },
    ApiVersion { major: 5, minor: 1 },
    ApiVersion { major: 6, minor: 0 },
    ApiVersion { major: 7, minor: 0 },
    ApiVersion { major: 7, minor: 1 },
];
/// The preview gate's words: "The requested version "6.1" of the resource is under preview.
/// The -preview flag must be supplied in the api-version for such requests. …"
const PREVIEW_MARK: &str = "-preview flag must be supplied";

/// Whether a 400's message refuses a version for lacking `-preview`.
pub fn is_preview_refusal(message: &str) -> bool {
    message.contains(PREVIEW_MARK) || message.contains("is under preview")
}

/// The highest released version below `v`.
pub fn released_below(v: ApiVersion) -> Option<ApiVersion> {
    RELEASED.iter().rev().copied().find(|r| *r < v)
}

/// What an unknown outcome of a non-idempotent request means for its caller.
const OUTCOME_UNKNOWN: &str =
    "the outcome is unknown (the server may have committed it), so it is not repeated: reconcile by its marker";
/// The version gate's words before the version it names.
const LATEST_MARK: &str = "The latest REST API version this server supports is ";

/// The personal access token as a `Basic` header value; prints as `***`.
pub struct Credential(String);

impl Credential {
    /// `Basic base64(":" + pat)`: Azure DevOps ignores the user name of a PAT.
    pub fn from_pat(pat: &str) -> Credential {
        Credential(format!(
            "Basic {}",
            data_encoding::BASE64.encode(format!(":{pat}").as_bytes())
        ))
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Reads the PAT from `token_file` (its first line) or `token`; the message names the file,
/// never the token.
pub fn read_token(settings: &TrackerSettings) -> Result<String, TrackerError> {
    let token = match (&settings.token_file, &settings.token) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| TrackerError::Token(format!("cannot read tracker.token_file {}: {e}", path.display())))?;
            let line = text.lines().next().unwrap_or("").trim().to_owned();
            if line.is_empty() {
                return Err(TrackerError::Token(format!(
                    "tracker.token_file {} is empty: put the personal access token on its first line",
                    path.display()
                )));
            }
            line
        }
        (None, Some(secret)) => {
            let t = secret.expose().trim().to_owned();
            if t.is_empty() {
                return Err(TrackerError::Token(
                    "tracker.token (RELAY_TRACKER__TOKEN) is empty".to_owned(),
                ));
            }
            t
        }
        (None, None) => {
            return Err(TrackerError::Token(
                "no token: set tracker.token_file (or RELAY_TRACKER__TOKEN)".to_owned(),
            ))
        }
    };
    if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(TrackerError::Token(
            "the personal access token holds spaces or control characters; check that the file holds only the token"
                .to_owned(),
        ));
    }
    Ok(token)
}

/// Percent-encodes a path segment or query value (everything but RFC 3986's unreserved set).
pub fn enc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The version a gate message names: "… The latest REST API version this server supports is
/// 5.0."
pub fn parse_latest_supported(message: &str) -> Option<ApiVersion> {
    let start = message.find(LATEST_MARK)? + LATEST_MARK.len();
    let tail = &message[start..];
    let end = tail
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(tail.len());
    ApiVersion::parse(tail[..end].trim_end_matches('.'))
}

/// The server's `message` from its JSON error body, else the start of the body as text.
pub fn server_message(reply: &Reply) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(&reply.body) {
        if let Some(m) = v.get("message").and_then(Value::as_str) {
            return m.to_owned();
        }
    }
    let text = String::from_utf8_lossy(&reply.body);
    let text: String = text.trim().chars().take(300).collect();
    if text.is_empty() {
        format!("HTTP {} with no message", reply.status.as_u16())
    } else {
        text
    }
}

/// A refusal as the error callers branch on; `item` is the work item a 412 is about.
pub fn refusal(reply: &Reply, item: Option<u64>) -> TrackerError {
    let status = reply.status.as_u16();
    match status {
        // A 203 is the sign-in page some servers answer an unusable credential with.
        203 | 401 | 403 => TrackerError::Auth {
            status,
            message: server_message(reply),
        },
        404 => TrackerError::NotFound(server_message(reply)),
        412 => TrackerError::Conflict(item.unwrap_or(0)),
        400 => unknown_identity(reply).unwrap_or_else(|| TrackerError::Refused {
            status,
            message: server_message(reply),
        }),
        _ => TrackerError::Refused {
            status,
            message: server_message(reply),
        },
    }
}

/// The rule error of an identity field set to someone the tracker does not know: its
/// `customProperties` name the field and say "unknown identity".
fn unknown_identity(reply: &Reply) -> Option<TrackerError> {
    let body: Value = serde_json::from_slice(&reply.body).ok()?;
    let custom = body.get("customProperties")?;
    let message = custom.get("ErrorMessage").and_then(Value::as_str)?;
    if !message.to_ascii_lowercase().contains("unknown identity") {
        return None;
    }
    Some(TrackerError::UnknownIdentity {
        field: custom
            .get("FieldReferenceName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        message: message.to_owned(),
    })
}

/// How long the server asks to wait: its `Retry-After`. `X-RateLimit-Delay` is not one: it
/// reports how long the server already held this request back, a delay spent, not one to
/// wait again.
pub fn asked_delay(reply: &Reply) -> Option<Duration> {
    reply.retry_after()
}

/// Scheme, host and port of a URL, lower-cased.
fn origin(u: &str) -> Option<(String, String, u16)> {
    let uri: http::Uri = u.parse().ok()?;
    let (host, port) = http::host_port(&uri);
    Some((uri.scheme_str()?.to_ascii_lowercase(), host.to_ascii_lowercase(), port))
}

fn same_origin(a: &str, b: &str) -> bool {
    matches!((origin(a), origin(b)), (Some(a), Some(b)) if a == b)
}

/// `url` moved from under `alias` to under `base`, when it is under `alias` (same origin, and
/// the alias's path as a whole-segment prefix).
fn rebase(url: &str, alias: &str, base: &str) -> Option<String> {
    if !same_origin(url, alias) {
        return None;
    }
    let path_of = |u: &str| -> Option<String> {
        let uri: http::Uri = u.parse().ok()?;
        Some(uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default())
    };
    let tail = path_of(url)?;
    let prefix = path_of(alias)?;
    let prefix = prefix.trim_end_matches('/');
    let rest = if prefix.is_empty() {
        tail.as_str()
    } else {
        let head = tail.get(..prefix.len())?;
        if !head.eq_ignore_ascii_case(prefix) {
            return None;
        }
        let rest = &tail[prefix.len()..];
        if !(rest.is_empty() || rest.starts_with(['/', '?'])) {
            return None;
        }
        rest
    };
    Some(format!("{base}{rest}"))
}

/// The other URLs an Azure DevOps Services organisation answers on: `https://dev.azure.com/{org}`
/// and its older canonical host `https://{org}.visualstudio.com` (with or without
/// `DefaultCollection`) are one organisation; answers may name either.
pub fn canonical_aliases(base: &str) -> Vec<String> {
    let Ok(uri) = base.parse::<http::Uri>() else {
        return Vec::new();
    };
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    if host == "dev.azure.com" {
        if let [org] = segments.as_slice() {
            let org = org.to_ascii_lowercase();
            return vec![
                format!("https://{org}.visualstudio.com/DefaultCollection"),
                format!("https://{org}.visualstudio.com"),
            ];
        }
    } else if let Some(org) = host.strip_suffix(".visualstudio.com") {
        let mut out = vec![format!("https://dev.azure.com/{org}")];
        if segments.is_empty() {
            out.insert(0, format!("https://{org}.visualstudio.com/DefaultCollection"));
        }
        return out;
    }
    Vec::new()
}

/// One request to send, possibly more than once.
pub struct Req {
    /// Method.
    pub method: Method,
    /// Absolute URL, `api-version` included.
    pub url: String,
    /// `Content-Type` of the body.
    pub content_type: Option<&'static str>,
    /// `Accept`.
    pub accept: &'static str,
    /// Further headers.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Bytes,
    /// Largest answer read.
    pub max: usize,
    /// The work item a 412 refers to.
    pub item: Option<u64>,
    /// Whether sending it twice does no more than sending it once. A create or a comment add
    /// is not: after an answer that may follow a commit (502, 504, a 503 without
    /// `Retry-After`, a timeout, a reset) it is never repeated here, and the caller reconciles
    /// by its marker. Reads (a batch read by POST too) and `test /rev` patches are.
    pub idempotent: bool,
}

impl Req {
    /// A GET of JSON.
    pub fn get(url: String) -> Req {
        Req {
            method: Method::GET,
            url,
            content_type: None,
            accept: "application/json",
            headers: Vec::new(),
            body: Bytes::new(),
            max: MAX_JSON_ANSWER,
            item: None,
            idempotent: true,
        }
    }

    /// A request with a JSON body.
    pub fn json(method: Method, url: String, body: &Value) -> Req {
        Req {
            content_type: Some("application/json"),
            body: Bytes::from(body.to_string()),
            method,
            ..Req::get(url)
        }
    }

    /// A JSON Patch document (create and update).
    pub fn patch(method: Method, url: String, patch: &Value, item: Option<u64>) -> Req {
        Req {
            content_type: Some("application/json-patch+json"),
            item,
            ..Req::json(method, url, patch)
        }
    }
}

/// The tracker's REST endpoint: base URL, credential, HTTP client and the version it speaks.
pub struct Rest {
    /// `https://dev.azure.com/{org}` or `https://{server}/{collection}`, no trailing `/`.
    pub base: String,
    /// The version spoken.
    pub version: ApiVersion,
    credential: Credential,
    http: http::Client,
    timeout: Duration,
    /// No request leaves before this instant (set by a server that asked to slow down).
    not_before: Mutex<Option<Instant>>,
    /// Other base URLs of the same organisation or collection (no trailing `/`).
    aliases: Mutex<Vec<String>>,
    /// Whether the server's access mappings were asked for already.
    mappings_read: std::sync::atomic::AtomicBool,
}

impl Rest {
    /// A client for `settings`, speaking `version` until told otherwise.
    pub fn new(settings: &TrackerSettings, pat: &str, version: ApiVersion) -> Result<Rest, TrackerError> {
        let tls = crate::tls::tracker_client_config(settings.trust, settings.ca_file.as_deref())
            .map_err(|e| TrackerError::Tls(e.to_string()))?;
        Ok(Rest {
            base: settings.url.trim_end_matches('/').to_owned(),
            version,
            credential: Credential::from_pat(pat),
            // Direct, http allowed: the configuration admits http only on loopback.
            http: http::Client::webhook(tls, settings.request_timeout),
            timeout: settings.request_timeout,
            not_before: Mutex::new(None),
            aliases: Mutex::new(canonical_aliases(settings.url.trim_end_matches('/'))),
            mappings_read: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `{base}/_apis/{path}` (collection level).
    pub fn collection_url(&self, path: &str) -> String {
        format!("{}/_apis/{path}", self.base)
    }

    /// `{base}/{project}/_apis/{path}`.
    pub fn project_url(&self, project: &str, path: &str) -> String {
        format!("{}/{}/_apis/{path}", self.base, enc(project))
    }

    /// `api-version={version}` for generally available resources.
    pub fn api(&self) -> String {
        format!("api-version={}", self.version)
    }

    /// `url` as a URL of the configured base, when it points at this tracker: on the base's
    /// own origin as it is, on another URL of the same organisation or collection (its
    /// canonical host, an access mapping the server named) rewritten onto the base. The
    /// credential is only ever sent to the configured host, and never anywhere else.
    pub fn local_url(&self, url: &str) -> Option<String> {
        if same_origin(url, &self.base) {
            return Some(url.to_owned());
        }
        let aliases = self.aliases.lock().unwrap_or_else(|p| p.into_inner());
        aliases.iter().find_map(|alias| rebase(url, alias, &self.base))
    }

    /// [`Rest::local_url`], asking the server once for the URLs it answers on (its access
    /// mappings) when `url` is on none known yet.
    pub async fn resolve_url(&self, url: &str) -> Option<String> {
        if let Some(local) = self.local_url(url) {
            return Some(local);
        }
        if self.mappings_read.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        // Connection data with its services (connectOptions=1) lists the access mappings.
        let ask = format!(
            "{}?connectOptions=1&api-version={}-preview",
            self.collection_url("connectionData"),
            self.version
        );
        match self.json(&Req::get(ask)).await {
            Ok(v) => {
                let points = v
                    .pointer("/locationServiceData/accessMappings")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.get("accessPoint").and_then(Value::as_str))
                    .map(|p| p.trim_end_matches('/').to_owned())
                    .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case(&self.base));
                let mut aliases = self.aliases.lock().unwrap_or_else(|p| p.into_inner());
                for p in points {
                    if !aliases.iter().any(|a| a.eq_ignore_ascii_case(&p)) {
                        aliases.push(p);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "tracker access mappings unreadable"),
        }
        self.local_url(url)
    }

    async fn pace(&self) {
        let at = *self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = at {
            tokio::time::sleep_until(at).await;
        }
    }

    fn slow_down(&self, by: Duration) {
        let at = Instant::now() + by.min(MAX_PACE);
        let mut nb = self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        if nb.is_none_or(|t| t < at) {
            *nb = Some(at);
        }
    }

    /// Sends `req`, waiting and retrying on 429, 502, 503 and 504 (a non-idempotent request
    /// only on 429 and a 503 with `Retry-After`, refusals made before any processing);
    /// answers a 2xx reply, or the refusal as an error.
    pub async fn send(&self, req: &Req) -> Result<Reply, TrackerError> {
        self.send_with(req, |request| self.http.send(request, self.timeout, req.max))
            .await
    }

    /// [`Rest::send`] reading the body as it flows: the status line within the request
    /// timeout, then no more than the timeout between two pieces of the body (a progress
    /// deadline, not a whole-body one), at most `req.max` bytes.
    pub async fn send_streaming(&self, req: &Req) -> Result<Reply, TrackerError> {
        self.send_with(req, |request| {
            self.http.send_streaming(request, self.timeout, self.timeout, req.max)
        })
        .await
    }

    async fn send_with<F, Fut>(&self, req: &Req, exchange: F) -> Result<Reply, TrackerError>
    where
        F: Fn(http::Request<http::Body>) -> Fut,
        Fut: std::future::Future<Output = Result<Reply, ClientError>>,
    {
        let mut backoff = crate::retry::Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let mut waited = Duration::ZERO;
        let mut attempt = 0;
        loop {
            self.pace().await;
            let mut headers: Vec<(&str, &str)> = vec![("authorization", &self.credential.0), ("accept", req.accept)];
            if let Some(ct) = req.content_type {
                headers.push(("content-type", ct));
            }
            for (k, v) in &req.headers {
                headers.push((k, v));
            }
            let request = http::request(req.method.clone(), &req.url, &headers, req.body.clone())
                .map_err(|e| TrackerError::Protocol(format!("request to {} could not be built: {e}", req.url)))?;
            let reply = match exchange(request).await {
                Ok(r) => r,
                Err(ClientError::TooLarge(n)) => {
                    return Err(TrackerError::Protocol(format!(
                        "the answer of {} is larger than {n} bytes",
                        req.url
                    )))
                }
                Err(ClientError::Build(e)) => {
                    return Err(TrackerError::Protocol(format!(
                        "request to {} could not be built: {e}",
                        req.url
                    )))
                }
                // A write cut off in flight may have happened: never repeated here.
                Err(e) => {
                    let reason = if req.idempotent {
                        e.to_string()
                    } else {
                        format!("{e}; {OUTCOME_UNKNOWN}")
                    };
                    return Err(TrackerError::Unreachable {
                        url: req.url.clone(),
                        reason,
                    });
                }
            };
            let status = reply.status;
            let busy = matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::GATEWAY_TIMEOUT
            );
            let asked = asked_delay(&reply);
            // A gateway's 502/504 (or a 503 that names no wait) may come after the server
            // committed: a second create or comment would be a duplicate.
            let refused_before_processing = status == StatusCode::TOO_MANY_REQUESTS
                || (status == StatusCode::SERVICE_UNAVAILABLE && asked.is_some());
            if busy && !req.idempotent && !refused_before_processing {
                return Err(TrackerError::Unreachable {
                    url: req.url.clone(),
                    reason: format!("answered {status}; {OUTCOME_UNKNOWN}"),
                });
            }
            if !busy {
                if status.is_success() && status != StatusCode::NON_AUTHORITATIVE_INFORMATION {
                    // Delayed mode: the service says to slow down before it starts refusing.
                    if let Some(d) = asked.filter(|d| !d.is_zero()) {
                        self.slow_down(d);
                    }
                    return Ok(reply);
                }
                return Err(refusal(&reply, req.item));
            }
            let delay = backoff.next_delay(asked);
            let budget = MAX_RETRY_WAIT.max(asked.unwrap_or(Duration::ZERO));
            if attempt >= MAX_RETRIES || waited + delay > budget {
                return Err(TrackerError::Busy {
                    status: status.as_u16(),
                    after: asked.unwrap_or(delay),
                });
            }
            tracing::debug!(status = status.as_u16(), ?delay, url = %req.url, "tracker busy; waiting");
            tokio::time::sleep(delay).await;
            waited += delay;
            attempt += 1;
        }
    }

    /// Sends `req` and reads the answer as JSON.
    pub async fn json(&self, req: &Req) -> Result<Value, TrackerError> {
        let reply = self.send(req).await?;
        serde_json::from_slice(&reply.body).map_err(|e| {
            TrackerError::Protocol(format!(
                "{} answered {} that is not JSON ({e}); is tracker.url the collection or organisation URL?",
                req.url, reply.status
            ))
        })
    }

    /// Asks for `ask` with a cheap GET: `Ok(None)` when the server speaks it, `Ok(Some(x))`
    /// when its version gate names `x` as its latest.
    pub async fn probe(&self, ask: ApiVersion) -> Result<Option<ApiVersion>, TrackerError> {
        let url = format!("{}?$top=1&api-version={ask}", self.collection_url("projects"));
        match self.json(&Req::get(url)).await {
            Ok(_) => Ok(None),
            Err(TrackerError::Refused { status: 400, message }) => match parse_latest_supported(&message) {
                Some(latest) => Ok(Some(latest)),
                None => Err(TrackerError::Refused { status: 400, message }),
            },
            Err(TrackerError::NotFound(message)) => Err(TrackerError::NotFound(format!(
                "{} has no REST API ({message}); tracker.url must be https://dev.azure.com/ORG or https://SERVER/COLLECTION",
                self.base
            ))),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, headers: &[(&'static str, &str)], body: &str) -> Reply {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, http::HeaderValue::from_str(v).unwrap());
        }
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn the_gate_message_names_the_latest_version() {
        let m = "The requested REST API version of 7.1 is out of range for this server. \
                 The latest REST API version this server supports is 5.0.";
        assert_eq!(parse_latest_supported(m), Some(ApiVersion { major: 5, minor: 0 }));
        assert_eq!(
            parse_latest_supported(&m.replace("5.0.", "7.0")),
            Some(ApiVersion { major: 7, minor: 0 })
        );
        assert_eq!(parse_latest_supported("TF400898: unavailable"), None);
    }

    #[test]
    fn a_preview_only_latest_falls_back_to_the_highest_released_version_below() {
        let m = "The requested version \"6.1\" of the resource is under preview. The -preview flag must be \
                 supplied in the api-version for such requests. For example: \"6.1-preview\"";
        assert!(is_preview_refusal(m));
        assert!(!is_preview_refusal("TF400898: unavailable"));
        let v = |s| ApiVersion::parse(s).unwrap();
        assert_eq!(released_below(v("6.1")), Some(v("6.0")));
        assert_eq!(released_below(v("7.2")), Some(v("7.1")));
        assert_eq!(released_below(v("5.1")), Some(v("5.0")));
        assert_eq!(released_below(v("5.0")), None);
    }

    #[test]
    fn an_unknown_identity_is_told_apart_from_other_rule_errors() {
        let unknown = r#"{"customProperties":{"FieldReferenceName":"System.AssignedTo","ErrorMessage":"The identity value 'zed@x.com' for field 'Assigned To' is an unknown identity."},"message":"TF401320: Rule Error for field Assigned To.","typeKey":"RuleValidationException"}"#;
        match refusal(&reply(400, &[], unknown), Some(3)) {
            TrackerError::UnknownIdentity { field, message } => {
                assert_eq!(field, "System.AssignedTo");
                assert!(message.contains("zed@x.com"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let other_rule = r#"{"customProperties":{"FieldReferenceName":"System.Title","ErrorMessage":"The field 'Title' cannot be empty."},"message":"TF401320: Rule Error for field Title.","typeKey":"RuleValidationException"}"#;
        assert!(matches!(
            refusal(&reply(400, &[], other_rule), Some(3)),
            TrackerError::Refused { status: 400, .. }
        ));
    }

    #[test]
    fn refusals_map_to_what_callers_branch_on() {
        let body = r#"{"$id":"1","message":"TF401232: Work item 7 does not exist.","typeKey":"X"}"#;
        match refusal(&reply(404, &[], body), None) {
            TrackerError::NotFound(m) => assert!(m.starts_with("TF401232"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            refusal(&reply(412, &[], body), Some(7)),
            TrackerError::Conflict(7)
        ));
        assert!(matches!(
            refusal(&reply(401, &[], ""), None),
            TrackerError::Auth { status: 401, message } if message.contains("401")
        ));
        match refusal(&reply(400, &[], "plain words"), None) {
            TrackerError::Refused { status: 400, message } => assert_eq!(message, "plain words"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn delays_come_from_retry_after_and_never_from_the_delay_already_applied() {
        assert_eq!(
            asked_delay(&reply(429, &[("retry-after", "3")], "")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            asked_delay(&reply(429, &[("retry-after", "2"), ("x-ratelimit-delay", "1.500")], "")),
            Some(Duration::from_secs(2))
        );
        // X-RateLimit-Delay is how long the server already held the request back.
        assert_eq!(asked_delay(&reply(200, &[("x-ratelimit-delay", "1.500")], "")), None);
        assert_eq!(asked_delay(&reply(429, &[("x-ratelimit-delay", "0.000")], "")), None);
        assert_eq!(asked_delay(&reply(503, &[], "")), None);
    }

    #[test]
    fn an_organisation_s_canonical_host_is_the_same_tracker() {
        let at = |base: &str, url: &str| {
            let aliases = canonical_aliases(base);
            if same_origin(url, base) {
                return Some(url.to_owned());
            }
            aliases.iter().find_map(|a| rebase(url, a, base))
        };
        let base = "https://dev.azure.com/fabrikam";
        assert_eq!(
            at(
                base,
                "https://fabrikam.visualstudio.com/_apis/wit/attachments/ab?fileName=a.png"
            )
            .as_deref(),
            Some("https://dev.azure.com/fabrikam/_apis/wit/attachments/ab?fileName=a.png")
        );
        assert_eq!(
            at(
                base,
                "https://Fabrikam.VisualStudio.com/DefaultCollection/_apis/wit/workItems/7"
            )
            .as_deref(),
            Some("https://dev.azure.com/fabrikam/_apis/wit/workItems/7")
        );
        assert_eq!(
            at(base, "https://contoso.visualstudio.com/_apis/wit/attachments/ab"),
            None
        );
        assert_eq!(at(base, "https://evil.example/fabrikam/_apis/wit/attachments/ab"), None);
        // And the reverse.
        assert_eq!(
            at(
                "https://fabrikam.visualstudio.com",
                "https://dev.azure.com/fabrikam/_apis/wit/attachments/ab"
            )
            .as_deref(),
            Some("https://fabrikam.visualstudio.com/_apis/wit/attachments/ab")
        );
        assert_eq!(
            at(
                "https://fabrikam.visualstudio.com",
                "https://dev.azure.com/contoso/_apis/wit/attachments/ab"
            ),
            None
        );
        assert_eq!(
            at(
                "https://fabrikam.visualstudio.com",
                "https://dev.azure.com/fabrikamx/_apis/x"
            ),
            None
        );
        assert!(canonical_aliases("https://tfs.example/DefaultCollection").is_empty());
    }

    #[test]
    fn segments_and_values_are_encoded() {
        assert_eq!(enc("User Story"), "User%20Story");
        assert_eq!(enc("a;b/c&d"), "a%3Bb%2Fc%26d");
        assert_eq!(enc("Fabrikam-Fiber_1.x~"), "Fabrikam-Fiber_1.x~");
        assert_eq!(enc("é"), "%C3%A9");
    }

    #[test]
    fn the_credential_never_prints() {
        let c = Credential::from_pat("secret-pat");
        assert_eq!(format!("{c:?}"), "***");
        assert_eq!(c.0, format!("Basic {}", data_encoding::BASE64.encode(b":secret-pat")));
    }
}
