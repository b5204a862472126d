//! The HTTP face: PAT authentication, injected faults, the version gate, routing of every
//! simulated endpoint to the store, request counters, and service hook delivery. The one
//! module that knows hyper.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::clock;
use crate::error::ApiError;
use crate::model::{Identity, Kind};
use crate::profile::{Profile, Requested, Version};
use crate::render::{self, Expand};
use crate::store::{self, Store, WriteOpts};
use crate::wiql;

mod comments;
mod conformance;
mod control;
mod faults;
mod hooks;
mod queries;

use comments::comments;
use control::control;
pub use control::{fail_after_commit, hold, human, release, set_canonical, slow_commits};
use faults::{fault, rate_limit_warning};
use hooks::deliver_events;
pub use hooks::{deliver_pending, subscribe};
use queries::{feed, wiql_query};

/// The most ids one `workitemsbatch` or `workitems?ids=` call may ask for.
pub const BATCH_LIMIT: usize = 200;
/// The default and largest page of the reporting revisions feed.
pub const FEED_PAGE: usize = 200;
/// The most work items one WIQL query may return.
pub const WIQL_LIMIT: usize = 20_000;
/// The default page of the comments list.
pub const COMMENTS_PAGE: usize = 200;

/// A response body.
pub type Body = Full<Bytes>;

/// Faults armed by tests: the next N requests are refused.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Requests still to answer 429.
    pub throttle: u32,
    /// `Retry-After` seconds of those 429s.
    pub throttle_retry_after: u64,
    /// Requests still to answer 503.
    pub unavailable: u32,
    /// `Retry-After` seconds of those 503s.
    pub unavailable_retry_after: u64,
    /// Only requests to this endpoint (e.g. `workitems.update`) are refused; all when `None`.
    pub only: Option<String>,
    /// Successful responses still to carry rate-limit warning headers.
    pub delayed: u32,
    /// `Retry-After` seconds of those warnings.
    pub delayed_retry_after: u64,
    /// Per endpoint: answer this gateway status (502 or 504) *after* the request took effect,
    /// for this many more calls (a gateway that timed out on a server that committed).
    pub after_commit: BTreeMap<String, (u16, u32)>,
    /// Per endpoint: wait this long before the request takes effect (a slow commit).
    pub slow_commits: BTreeMap<String, std::time::Duration>,
    /// The total attachment size limit in bytes; the profile's default when `None`.
    pub attachment_limit: Option<u64>,
}

/// A service hook subscription (a web hook).
#[derive(Debug, Clone)]
pub struct Subscription {
    /// GUID.
    pub id: String,
    /// Where events are POSTed (plain HTTP).
    pub url: String,
    /// Event types to send (`workitem.created` …); empty means all work item events.
    pub event_types: Vec<String>,
    /// Extra headers, e.g. the shared secret.
    pub headers: Vec<(String, String)>,
}

/// Everything the server shares between connections.
pub struct Shared {
    /// The collection.
    pub store: Mutex<Store>,
    /// Accepted PATs and their owners.
    pub pats: Mutex<Vec<(String, Identity)>>,
    /// Armed faults.
    pub faults: Mutex<Faults>,
    /// Requests per endpoint name.
    pub counters: Mutex<BTreeMap<String, u64>>,
    /// Endpoints whose answers wait, after the request took effect, until the gate opens:
    /// a client can be killed between a write and its answer.
    pub gates: Mutex<BTreeMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// The senders of gates armed over the control API (`/_sim/hold`), opened by
    /// `/_sim/release`.
    pub held: Mutex<BTreeMap<String, tokio::sync::watch::Sender<bool>>>,
    /// The URL clients configure (the requested host); answers may name another
    /// (`/_sim/canonical`).
    pub url: String,
    /// Service hook subscriptions.
    pub hooks: Mutex<Vec<Subscription>>,
    /// Hook POSTs answered with a 2xx.
    pub hook_delivered: AtomicU64,
    /// Hook POSTs that failed.
    pub hook_failed: AtomicU64,
    /// Notification sequence.
    pub notification: AtomicU64,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Check every request and answer against the specification's description.
    pub conformance: bool,
    /// Mismatches found (distinct, in order), when checking is on.
    pub violations: Mutex<Vec<String>>,
    /// The one HTTP client for hooks.
    pub client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
}

/// Locks a mutex, recovering from a panicked holder (the data stays usable for a test).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Reply {
    status: u16,
    body: Bytes,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            body: Bytes::from(v.to_string()),
            content_type: "application/json; charset=utf-8",
            headers: Vec::new(),
        }
    }
    fn err(e: &ApiError) -> Reply {
        Reply::json(e.status, e.body())
    }
}

type R = Result<Reply, ApiError>;

/// Percent-decodes a URL component (`+` is a space in queries).
fn decode(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters, keys lower-cased (the service matches them case-insensitively).
struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut m = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(decode(k, true).to_lowercase(), decode(v, true));
        }
        Query(m)
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(&k.to_lowercase()).map(String::as_str)
    }
    fn flag(&self, k: &str) -> bool {
        self.get(k).is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
    fn list(&self, k: &str) -> Option<Vec<String>> {
        self.get(k).map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
    }
    fn num(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(
                    "ArgumentException",
                    format!("The value '{v}' of parameter {k} is not a valid number."),
                )
            }),
        }
    }
}

/// The parsed request the handlers see.
struct Call {
    /// Serve the 5.0 (History) comments view.
    legacy_comments: bool,
    method: String,
    project: Option<String>,
    rest: Vec<String>,
    query: Query,
    headers: hyper::HeaderMap,
    body: Bytes,
    actor: Identity,
}

impl Call {
    fn json_body(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::bad_request(
                "VssRequestContentException",
                format!("The request body is not valid JSON: {e}"),
            )
        })
    }
    fn patch_body(&self) -> Result<Vec<Value>, ApiError> {
        let ct = self
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.to_ascii_lowercase().starts_with("application/json-patch+json") {
            return Err(ApiError::new(
                415,
                "VssRequestContentTypeNotSupportedException",
                format!("The request indicated a Content-Type of \"{ct}\" for method type \"{}\" which is not supported. Valid content types for this method are: application/json-patch+json.", self.method),
            ));
        }
        match self.json_body()? {
            Value::Array(a) => Ok(a),
            _ => Err(ApiError::bad_request(
                "VssPropertyValidationException",
                "You must pass a valid patch document in the body of the request.",
            )),
        }
    }
    fn opts(&self) -> WriteOpts {
        WriteOpts {
            validate_only: self.query.flag("validateOnly"),
            bypass_rules: self.query.flag("bypassRules"),
            suppress_notifications: self.query.flag("suppressNotifications"),
            actor: self.actor.clone(),
        }
    }
    fn project(&self) -> Result<&str, ApiError> {
        self.project.as_deref().ok_or_else(|| {
            ApiError::new(
                404,
                "ProjectDoesNotExistWithNameException",
                "This API needs a project in the URL.",
            )
        })
    }
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(
        404,
        "RouteNotFoundException",
        format!("The resource {what} was not found on this server."),
    )
}

/// Answers one request.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let reply = match respond(&shared, req).await {
        Ok(r) => r,
        Err(e) => Reply::err(&e),
    };
    let mut resp = Response::new(Full::new(reply.body));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    for (k, v) in reply.headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    deliver_events(&shared);
    Ok(resp)
}

fn authenticate(shared: &Shared, headers: &hyper::HeaderMap) -> Option<Identity> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, cred) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = data_encoding::BASE64.decode(cred.trim().as_bytes()).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (_user, pat) = raw.split_once(':')?;
    lock(&shared.pats)
        .iter()
        .find(|(p, _)| p == pat)
        .map(|(_, who)| who.clone())
}

async fn respond(shared: &Arc<Shared>, req: Request<Incoming>) -> R {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = Query::parse(parts.uri.query());
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| decode(s, false))
        .collect();
    let Some(actor) = authenticate(shared, &parts.headers) else {
        bump(shared, "unauthorized");
        return Ok(Reply {
            status: 401,
            body: Bytes::new(),
            content_type: "text/plain",
            headers: vec![("www-authenticate", "Basic realm=\"ado-sim\"".into())],
        });
    };
    let body = Limited::new(body, shared.max_body)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| {
            ApiError::new(
                413,
                "RequestTooLargeException",
                format!("The request body exceeds {} bytes.", shared.max_body),
            )
        })?;
    if segs.first().map(String::as_str) == Some("_sim") {
        bump(shared, "control");
        return control(shared, parts.method.as_str(), &segs[1..], &body);
    }
    let (collection, profile) = {
        let s = lock(&shared.store);
        (s.collection.clone(), s.profile)
    };
    // The collection may span segments (`tfs/DefaultCollection` on older Server installs).
    let prefix: Vec<&str> = collection.split('/').filter(|s| !s.is_empty()).collect();
    let matches_prefix = segs.len() >= prefix.len() && prefix.iter().zip(&segs).all(|(a, b)| b.eq_ignore_ascii_case(a));
    if !matches_prefix {
        bump(shared, "unknown");
        return Err(not_found(&path));
    }
    let segs = &segs[prefix.len()..];
    let apis = segs
        .iter()
        .position(|s| s.eq_ignore_ascii_case("_apis"))
        .ok_or_else(|| not_found(&path))?;
    let project = segs.first().filter(|_| apis >= 1).cloned();
    let rest: Vec<String> = segs[apis + 1..].to_vec();
    let lower: Vec<String> = rest.iter().map(|s| s.to_lowercase()).collect();
    let method = parts.method.as_str().to_string();
    let name = endpoint(&method, &lower);
    bump(shared, &name);
    if let Some(r) = fault(shared, &name) {
        return Ok(r);
    }
    let version = query.get("api-version").map(str::to_string).or_else(|| {
        let accept = parts.headers.get(hyper::header::ACCEPT)?.to_str().ok()?;
        accept
            .split(';')
            .find_map(|p| p.trim().strip_prefix("api-version=").map(str::to_string))
    });
    let preview_only = name.starts_with("comments.");
    profile.check(version.as_deref(), &method, preview_only)?;
    // The comments resource before 5.1 is the read-only History view; newer servers still
    // serve that old version to clients that ask for it.
    let legacy_comments = !profile.has_comments_api()
        || version
            .as_deref()
            .and_then(Requested::parse)
            .is_some_and(|r| r.version <= Version { major: 5, minor: 0 });
    let warn = rate_limit_warning(shared);
    let slow = lock(&shared.faults).slow_commits.get(&name).copied();
    if let Some(delay) = slow {
        bump(shared, &format!("{name}.slow"));
        tokio::time::sleep(delay).await;
    }
    let call = Call {
        legacy_comments,
        method,
        project,
        rest,
        query,
        headers: parts.headers,
        body,
        actor,
    };
    let result = route(shared, &name, &call);
    conformance::observe(shared, &name, version.as_deref(), &segs[..apis], &call, &result);
    let mut reply = result?;
    if let Some(gateway) = faults::after_commit(shared, &name) {
        reply = gateway;
    }
    let gate = lock(&shared.gates).get(&name).cloned();
    if let Some(mut open) = gate {
        bump(shared, &format!("{name}.held"));
        let _ = open.wait_for(|o| *o).await;
    }
    if let Some(headers) = warn {
        reply.headers.extend(headers);
    }
    Ok(reply)
}

fn bump(shared: &Shared, name: &str) {
    *lock(&shared.counters).entry(name.to_string()).or_default() += 1;
}

/// The endpoint name a request counts under (and routes by).
fn endpoint(method: &str, r: &[String]) -> String {
    let s: Vec<&str> = r.iter().map(String::as_str).collect();
    let n = match (method, s.as_slice()) {
        ("GET", ["connectiondata"]) => "connectiondata",
        ("GET", ["projects"]) => "projects.list",
        ("GET", ["projects", _]) => "projects.get",
        ("GET", ["wit", "fields"]) => "fields.list",
        ("GET", ["wit", "workitemtypes"]) => "workitemtypes.list",
        ("GET", ["wit", "workitemtypes", _]) => "workitemtypes.get",
        ("POST", ["wit", "workitems", t]) if t.starts_with('$') => "workitems.create",
        ("GET", ["wit", "workitems"]) => "workitems.list",
        ("GET", ["wit", "workitems", _]) => "workitems.get",
        ("PATCH", ["wit", "workitems", _]) => "workitems.update",
        ("DELETE", ["wit", "workitems", _]) => "workitems.delete",
        ("GET", ["wit", "workitems", _, "revisions"]) => "revisions.list",
        ("POST", ["wit", "workitemsbatch"]) => "workitemsbatch",
        ("POST", ["wit", "wiql"]) => "wiql",
        ("GET" | "POST", ["wit", "reporting", "workitemrevisions"]) => "reporting.revisions",
        ("GET", ["wit", "workitems", _, "comments"]) => "comments.list",
        ("POST", ["wit", "workitems", _, "comments"]) => "comments.add",
        ("GET", ["wit", "workitems", _, "comments", _]) => "comments.get",
        ("PATCH", ["wit", "workitems", _, "comments", _]) => "comments.update",
        ("DELETE", ["wit", "workitems", _, "comments", _]) => "comments.delete",
        ("POST", ["wit", "attachments"]) => "attachments.create",
        ("PUT", ["wit", "attachments", _]) => "attachments.chunk",
        ("GET", ["wit", "attachments", _]) => "attachments.get",
        (_, ["wit", "workitems", _, "comments", ..]) => "comments.method",
        _ => "unknown",
    };
    n.to_string()
}

fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| {
        ApiError::bad_request(
            "ArgumentException",
            format!("The work item id '{s}' is not a valid number."),
        )
    })
}

fn route(shared: &Arc<Shared>, name: &str, c: &Call) -> R {
    let mut s = lock(&shared.store);
    let project = c.project.as_deref();
    if let Some(p) = project {
        s.require_project(p)?;
    }
    match name {
        "connectiondata" => {
            let who = render::identity_ref(&s, &c.actor.combined());
            let user = json!({
                "id": who["id"],
                "descriptor": who["descriptor"],
                "providerDisplayName": c.actor.display_name,
                "isActive": true,
                "properties": {"Account": {"$type": "System.String", "$value": c.actor.unique_name}},
            });
            let hosted = s.profile == Profile::Services;
            Ok(Reply::json(
                200,
                json!({
                    "authenticatedUser": user,
                    "authorizedUser": user,
                    "instanceId": render::identity_id(&s.collection),
                    "deploymentId": render::identity_id(&format!("deployment/{}", s.collection)),
                    "deploymentType": if hosted { "hosted" } else { "onPremises" },
                    "locationServiceData": {
                        "serviceOwner": "00025394-6065-48ca-87d9-7f5672854ef7",
                        "defaultAccessMappingMoniker": "PublicAccessMapping",
                        "accessMappings": access_mappings(&s.base_url, &shared.url),
                        "lastChangeId": 1,
                        "lastChangeId64": 1,
                    },
                }),
            ))
        }
        "projects.list" => {
            let v: Vec<Value> = s.projects.iter().map(|p| project_json(&s, p)).collect();
            Ok(Reply::json(200, json!({"count": v.len(), "value": v})))
        }
        "projects.get" => {
            let p = s.require_project(&c.rest[1])?.clone();
            Ok(Reply::json(200, project_json(&s, &p)))
        }
        "fields.list" => {
            let v: Vec<Value> = s
                .fields
                .values()
                .map(|f| json!({"name": f.name, "referenceName": f.reference, "type": kind_name(f.kind), "readOnly": f.read_only, "url": format!("{}/_apis/wit/fields/{}", s.base_url, f.reference)}))
                .collect();
            Ok(Reply::json(200, json!({"count": v.len(), "value": v})))
        }
        "workitemtypes.list" | "workitemtypes.get" => {
            let p = s.require_project(c.project()?)?.clone();
            let ty = |t: &crate::model::WorkItemType| {
                json!({
                    "name": t.name,
                    "referenceName": format!("Microsoft.VSTS.WorkItemTypes.{}", t.name.replace(' ', "")),
                    "states": t.states.iter().map(|x| json!({"name": x, "category": crate::model::state_category(x), "color": "b2b2b2"})).collect::<Vec<_>>(),
                    "url": format!("{}/{}/_apis/wit/workItemTypes/{}", s.base_url, p.id, t.name.replace(' ', "%20")),
                })
            };
            if name == "workitemtypes.list" {
                let v: Vec<Value> = p.types.iter().map(ty).collect();
                return Ok(Reply::json(200, json!({"count": v.len(), "value": v})));
            }
            let t = p.types.iter().find(|t| t.name.eq_ignore_ascii_case(&c.rest[2])).ok_or_else(|| {
                ApiError::new(404, "WorkItemTypeNotFoundException", format!("VS402323: Work item type {} does not exist in project {} or you do not have permission to access it.", c.rest[2], p.name))
            })?;
            Ok(Reply::json(200, ty(t)))
        }
        "workitems.create" => {
            let ops = c.patch_body()?;
            let ty = &c.rest[2][1..];
            let wi = s.create(c.project()?, ty, &ops, &c.opts())?;
            let expand = Expand::parse(c.query.get("$expand")).unwrap_or(Expand::None);
            Ok(Reply::json(200, render::work_item(&s, &wi, wi.latest(), None, expand)))
        }
        "workitems.get" => {
            let id = parse_id(&c.rest[2])?;
            let (fields, expand, as_of) = read_params(c)?;
            for name in fields.iter().flatten() {
                s.field(name).ok_or_else(|| ApiError::unknown_field(name))?;
            }
            let v = {
                let wi = s.item(id, project)?;
                let r = s.as_of(wi, as_of)?;
                render::work_item(&s, wi, r, fields.as_deref(), expand)
            };
            after_read(&mut s, &[id]);
            Ok(Reply::json(200, v))
        }
        "workitems.list" => {
            let ids: Vec<u64> = c
                .query
                .list("ids")
                .unwrap_or_default()
                .iter()
                .map(|i| parse_id(i))
                .collect::<Result<_, _>>()?;
            let (fields, expand, as_of) = read_params(c)?;
            let omit = c
                .query
                .get("errorPolicy")
                .is_some_and(|p| p.eq_ignore_ascii_case("omit"));
            read_many(&mut s, project, &ids, fields.as_deref(), expand, as_of, omit)
        }
        "workitemsbatch" => {
            let b = c.json_body()?;
            let ids: Vec<u64> = b
                .get("ids")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            let fields: Option<Vec<String>> = b
                .get("fields")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect());
            let expand = Expand::parse(b.get("$expand").and_then(Value::as_str))
                .ok_or_else(|| ApiError::bad_request("ArgumentException", "The $expand value is not valid."))?;
            if fields.is_some() && expand != Expand::None {
                return Err(expand_with_fields());
            }
            let as_of = match b.get("asOf").and_then(Value::as_str) {
                Some(t) => Some(
                    clock::parse(t)
                        .ok_or_else(|| {
                            ApiError::bad_request("ArgumentException", format!("The asOf value '{t}' is not a date."))
                        })?
                        .ms,
                ),
                None => None,
            };
            let omit = b
                .get("errorPolicy")
                .and_then(Value::as_str)
                .is_some_and(|p| p.eq_ignore_ascii_case("omit"));
            read_many(&mut s, project, &ids, fields.as_deref(), expand, as_of, omit)
        }
        "workitems.update" => {
            let id = parse_id(&c.rest[2])?;
            let ops = c.patch_body()?;
            let wi = s.update(id, project, &ops, &c.opts())?;
            let expand = Expand::parse(c.query.get("$expand")).unwrap_or(Expand::None);
            Ok(Reply::json(200, render::work_item(&s, &wi, wi.latest(), None, expand)))
        }
        "workitems.delete" => {
            let id = parse_id(&c.rest[2])?;
            s.delete(id, project)?;
            Ok(Reply::json(200, json!({"id": id, "code": 200, "url": s.item_url(id)})))
        }
        "revisions.list" => {
            let id = parse_id(&c.rest[2])?;
            let expand = Expand::parse(c.query.get("$expand")).unwrap_or(Expand::None);
            let skip = c.query.num("$skip")?.unwrap_or(0) as usize;
            let top = c.query.num("$top")?.unwrap_or(200) as usize;
            let wi = s.item(id, project)?;
            let v: Vec<Value> = wi
                .revisions
                .iter()
                .skip(skip)
                .take(top)
                .map(|r| render::work_item(&s, wi, r, None, expand))
                .collect();
            Ok(Reply::json(200, json!({"count": v.len(), "value": v})))
        }
        "wiql" => wiql_query(&s, c),
        "reporting.revisions" => {
            let (reply, revisions) = feed(&s, c)?;
            if revisions > 0 {
                // A read that saw revisions: tests wait on it, unlike on a read that merely
                // happened (it may have come before the change they need read).
                bump(shared, "reporting.revisions.seen");
            }
            Ok(reply)
        }
        "comments.list" | "comments.get" | "comments.add" | "comments.update" | "comments.delete"
        | "comments.method" => comments(&mut s, name, c),
        "attachments.create" => {
            let file = c.query.get("fileName").unwrap_or("attachment").to_string();
            let chunked = c
                .query
                .get("uploadType")
                .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
            let limit = attachment_limit(shared, s.profile);
            if !chunked && c.body.len() as u64 > limit {
                return Err(faults::attachment_too_large(limit));
            }
            if !chunked && c.body.len() > s.profile.max_simple_attachment() {
                return Err(ApiError::new(
                    413,
                    "AttachmentTooLargeException",
                    format!("VS402311: The attachment is {} bytes, over the {} bytes a simple upload allows; use a chunked upload.", c.body.len(), s.profile.max_simple_attachment()),
                ));
            }
            let a = s.add_attachment(&file, (!chunked).then(|| c.body.to_vec()));
            Ok(Reply::json(201, attachment_ref(&s, &a.id, &a.file_name)))
        }
        "attachments.chunk" => {
            let range = c
                .headers
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let (start, end, total) = parse_content_range(range).ok_or_else(|| {
                ApiError::bad_request(
                    "InvalidChunkException",
                    format!("A chunk needs a Content-Range header like 'bytes 0-39999/50000', got '{range}'."),
                )
            })?;
            // The limit is on the whole file, known from the first chunk's range.
            let limit = attachment_limit(shared, s.profile);
            if total > limit {
                return Err(faults::attachment_too_large(limit));
            }
            let a = s.add_chunk(&c.rest[2], start, end, total, &c.body)?;
            Ok(Reply::json(201, attachment_ref(&s, &a.id, &a.file_name)))
        }
        "attachments.get" => {
            let a = s.attachment(&c.rest[2])?;
            let name = c.query.get("fileName").unwrap_or(&a.file_name).to_string();
            let disposition = if c.query.flag("download") {
                "attachment"
            } else {
                "inline"
            };
            Ok(Reply {
                status: 200,
                body: Bytes::from(a.data.clone()),
                content_type: "application/octet-stream",
                headers: vec![(
                    "content-disposition",
                    format!("{disposition}; filename=\"{}\"", name.replace('"', "")),
                )],
            })
        }
        _ => Err(not_found(&format!("_apis/{}", c.rest.join("/")))),
    }
}

/// The total attachment size allowed: set over the control API, else the profile's default.
fn attachment_limit(shared: &Shared, profile: Profile) -> u64 {
    lock(&shared.faults)
        .attachment_limit
        .unwrap_or_else(|| profile.attachment_limit())
}

fn expand_with_fields() -> ApiError {
    ApiError::bad_request(
        "ConflictingParametersException",
        "VS403437: The expand parameter can not be used with the fields parameter.",
    )
}

type ReadParams = (Option<Vec<String>>, Expand, Option<i64>);

fn read_params(c: &Call) -> Result<ReadParams, ApiError> {
    let fields = c.query.list("fields");
    let expand = Expand::parse(c.query.get("$expand"))
        .ok_or_else(|| ApiError::bad_request("ArgumentException", "The $expand value is not valid."))?;
    if fields.is_some() && expand != Expand::None {
        return Err(expand_with_fields());
    }
    let as_of = match c.query.get("asOf") {
        Some(t) => Some(
            clock::parse(t)
                .ok_or_else(|| {
                    ApiError::bad_request("ArgumentException", format!("The asOf value '{t}' is not a date."))
                })?
                .ms,
        ),
        None => None,
    };
    Ok((fields, expand, as_of))
}

fn read_many(
    s: &mut Store,
    project: Option<&str>,
    ids: &[u64],
    fields: Option<&[String]>,
    expand: Expand,
    as_of: Option<i64>,
    omit: bool,
) -> R {
    if ids.is_empty() {
        return Err(ApiError::bad_request(
            "ArgumentNullException",
            "At least one work item id is required.",
        ));
    }
    if ids.len() > BATCH_LIMIT {
        return Err(ApiError::bad_request(
            "ArgumentOutOfRangeException",
            format!(
                "VS403474: The number of work item ids ({}) exceeds the limit of {BATCH_LIMIT}.",
                ids.len()
            ),
        ));
    }
    if let Some(f) = fields {
        for name in f {
            s.field(name).ok_or_else(|| ApiError::unknown_field(name))?;
        }
    }
    let mut out = Vec::new();
    for &id in ids {
        match s.item(id, project).and_then(|wi| s.as_of(wi, as_of).map(|r| (wi, r))) {
            Ok((wi, r)) => out.push(render::work_item(s, wi, r, fields, expand)),
            Err(_) if omit => out.push(Value::Null),
            Err(e) => return Err(e),
        }
    }
    after_read(s, ids);
    Ok(Reply::json(200, json!({"count": out.len(), "value": out})))
}

/// Applies the "human" edits armed for items just read, so the reader's rev is now stale.
fn after_read(s: &mut Store, ids: &[u64]) {
    for id in ids {
        if let Some((who, ops)) = s.after_read.remove(id) {
            let o = WriteOpts {
                validate_only: false,
                bypass_rules: false,
                suppress_notifications: false,
                actor: who,
            };
            // A failing armed edit is the test's own mistake; the read still answers.
            let _ = s.update(*id, None, &ops, &o);
        }
    }
}

/// The URLs the collection answers on: its canonical (public) one, which answers name, and
/// the one clients asked on when it differs.
fn access_mappings(canonical: &str, requested: &str) -> Value {
    let mut v = vec![
        json!({"displayName": "Public Access Mapping", "moniker": "PublicAccessMapping", "accessPoint": canonical}),
    ];
    if !canonical.eq_ignore_ascii_case(requested) {
        v.push(
            json!({"displayName": "Server Access Mapping", "moniker": "ServerAccessMapping", "accessPoint": requested}),
        );
    }
    Value::Array(v)
}

fn project_json(s: &Store, p: &crate::model::Project) -> Value {
    // The project reference has carried its last update time since 6.0.
    let updated = (s.profile != Profile::Server2019).then_some("2024-01-01T00:00:00Z");
    let mut v = json!({
        "id": p.id,
        "name": p.name,
        "url": format!("{}/_apis/projects/{}", s.base_url, p.id),
        "state": "wellFormed",
        "revision": 1,
        "visibility": "private",
    });
    if let Some(t) = updated {
        v["lastUpdateTime"] = json!(t);
    }
    v
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::String => "string",
        Kind::Integer => "integer",
        Kind::Double => "double",
        Kind::DateTime => "dateTime",
        Kind::Html => "html",
        Kind::PlainText => "plainText",
        Kind::Identity => "identity",
        Kind::TreePath => "treePath",
        Kind::Boolean => "boolean",
    }
}

fn attachment_ref(s: &Store, id: &str, file: &str) -> Value {
    json!({"id": id, "url": format!("{}/_apis/wit/attachments/{id}?fileName={}", s.base_url, file.replace(' ', "%20"))})
}

/// `bytes 0-39999/50000` → (0, 39999, 50000).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let v = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = v.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_components_and_ranges() {
        assert_eq!(decode("%24User%20Story", false), "$User Story");
        assert_eq!(decode("a+b%3Bc", true), "a b;c");
        assert_eq!(decode("100%", false), "100%");
        assert_eq!(parse_content_range("bytes 0-39999/50000"), Some((0, 39_999, 50_000)));
        assert_eq!(parse_content_range("0-1/2"), None);
    }
}
