//! Conformance to Microsoft's specification: the operations of `spec/operations.json` (the
//! specification's facts, per version) and a check of one request and its answer against
//! them, reporting each mismatch with the operation, the version and the JSON path.
//!
//! The description's notation is explained in its `about` lines; in short: a type is a JSON
//! kind (`integer`, `string`, …), `date-time`, `uuid`, `enum:a,b`, `[T]`, `{T}`, `A|B` or a
//! named type; `!` marks what is required and ` >=6.0` a field that exists from 6.0 on.

use std::sync::OnceLock;

use serde_json::{Map, Value};

use crate::profile::{Requested, Version};

/// The description, as compiled into the simulator.
pub const DESCRIPTION: &str = include_str!("../spec/operations.json");

/// The versions the description covers, oldest first.
pub const VERSIONS: [Version; 4] = [
    Version { major: 5, minor: 0 },
    Version { major: 6, minor: 0 },
    Version { major: 7, minor: 0 },
    Version { major: 7, minor: 1 },
];

/// A body as seen on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// No bytes.
    Empty,
    /// A JSON document.
    Json(Value),
    /// Bytes that are not JSON (an attachment, a gateway's HTML page).
    Other,
}

impl Body {
    /// Classifies raw bytes.
    pub fn from_bytes(b: &[u8]) -> Body {
        if b.is_empty() {
            return Body::Empty;
        }
        serde_json::from_slice(b).map_or(Body::Other, Body::Json)
    }
}

/// One request, as the check needs it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The endpoint name the simulator gave it (`workitems.get`, `comments.add`, …).
    pub endpoint: String,
    /// The `api-version` asked for (query or `Accept` header), as written.
    pub version: Option<String>,
    /// The version checked against when none was asked for (the server's latest).
    pub fallback: Version,
    /// `GET`, `POST`, …
    pub method: String,
    /// Path segments between the collection and `_apis` (project, team).
    pub scope: Vec<String>,
    /// Path segments after `_apis`.
    pub path: Vec<String>,
    /// Query parameters, decoded.
    pub query: Vec<(String, String)>,
    /// Header names, lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
}

/// One answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Body,
}

/// The parsed description.
pub fn description() -> &'static Value {
    static D: OnceLock<Value> = OnceLock::new();
    D.get_or_init(|| serde_json::from_str(DESCRIPTION).unwrap_or_else(|e| panic!("spec/operations.json: {e}")))
}

/// Every endpoint name the description holds.
pub fn endpoints() -> Vec<String> {
    let mut v: Vec<String> = operations()
        .iter()
        .filter_map(|o| o.get("endpoint").and_then(Value::as_str).map(str::to_string))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn operations() -> &'static [Value] {
    description()
        .get("operations")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn types() -> &'static Map<String, Value> {
    static EMPTY: OnceLock<Map<String, Value>> = OnceLock::new();
    description()
        .get("types")
        .and_then(Value::as_object)
        .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

/// The described version a request is checked against: the highest covered one not above
/// the one asked for (the lowest for anything older).
pub fn described_version(asked: Version) -> Version {
    VERSIONS
        .iter()
        .rev()
        .find(|v| **v <= asked)
        .copied()
        .unwrap_or(VERSIONS[0])
}

fn parse_version(s: &str) -> Option<Version> {
    let (a, b) = s.split_once('.')?;
    Some(Version {
        major: a.parse().ok()?,
        minor: b.parse().ok()?,
    })
}

/// The entry for an endpoint, method and version.
fn find(endpoint: &str, method: &str, v: Version) -> Option<&'static Value> {
    operations().iter().find(|o| {
        o.get("endpoint").and_then(Value::as_str) == Some(endpoint)
            && o.get("method")
                .and_then(Value::as_str)
                .is_some_and(|m| m.eq_ignore_ascii_case(method))
            && o.get("versions")
                .and_then(Value::as_array)
                .is_some_and(|vs| vs.iter().filter_map(Value::as_str).any(|x| parse_version(x) == Some(v)))
    })
}

/// Collects mismatches under one operation and version.
struct Report {
    prefix: String,
    version: Version,
    out: Vec<String>,
}

impl Report {
    fn push(&mut self, at: &str, what: String) {
        self.out.push(format!("{}: {at}: {what}", self.prefix));
    }
}

/// Checks a request and its answer; answers every mismatch, e.g. `workitems.get 7.1:
/// response $.fields: expected object, got string`.
pub fn check(req: &Request, resp: &Response) -> Vec<String> {
    let asked = req.version.as_deref().and_then(Requested::parse);
    let v = described_version(asked.map_or(req.fallback, |r| r.version));
    let mut r = Report {
        prefix: format!("{} {v}", req.endpoint),
        version: v,
        out: Vec::new(),
    };
    let Some(op) = find(&req.endpoint, &req.method, v) else {
        r.push(
            "request",
            format!(
                "{} is not an operation of the specification at this version",
                req.method
            ),
        );
        return r.out;
    };
    check_request(op, req, asked, &mut r);
    check_response(op, resp, &mut r);
    r.out
}

fn check_request(op: &Value, req: &Request, asked: Option<Requested>, r: &mut Report) {
    match (&req.version, asked) {
        (None, _) => r.push("request query", "missing required parameter 'api-version'".into()),
        (Some(s), None) => r.push("request query", format!("'api-version' {s:?} is not a version")),
        (Some(s), Some(a)) => {
            if let Some(want) = op.get("apiVersion").and_then(Value::as_str) {
                let resource = want.strip_prefix("preview.").and_then(|n| n.parse::<u32>().ok());
                if !a.preview {
                    r.push(
                        "request query",
                        format!(
                            "'api-version' {s:?}: this resource is preview ({v}-{want})",
                            v = r.version
                        ),
                    );
                } else if let (Some(got), Some(max)) = (a.resource_version, resource) {
                    if got > max {
                        r.push(
                            "request query",
                            format!(
                                "'api-version' {s:?}: the resource's version is {max} ({}-{want})",
                                r.version
                            ),
                        );
                    }
                }
            }
        }
    }
    check_path(op, req, r);
    let params = op.get("query").and_then(Value::as_object);
    for (k, val) in &req.query {
        if k.eq_ignore_ascii_case("api-version") {
            continue;
        }
        let known = params.and_then(|p| p.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)));
        match known {
            None => r.push("request query", format!("unknown parameter '{k}'")),
            Some((name, ty)) => {
                let (ty, _, _) = split_type(ty.as_str().unwrap_or("any"));
                if let Err(e) = query_value(ty, val) {
                    r.push("request query", format!("parameter '{name}': {e}"));
                }
            }
        }
    }
    for (name, ty) in params.into_iter().flatten() {
        let (_, required, _) = split_type(ty.as_str().unwrap_or("any"));
        if required && !req.query.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
            r.push("request query", format!("missing required parameter '{name}'"));
        }
    }
    for h in op.get("headers").and_then(Value::as_array).into_iter().flatten() {
        let h = h.as_str().unwrap_or_default();
        if !req.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(h)) {
            r.push("request headers", format!("missing required header '{h}'"));
        }
    }
    if let Some(ct) = op.get("contentType").and_then(Value::as_str) {
        let got = req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if !got.to_ascii_lowercase().starts_with(ct) {
            r.push("request headers", format!("Content-Type: expected {ct}, got {got:?}"));
        }
    }
    match (op.get("body").and_then(Value::as_str), &req.body) {
        (None, Body::Empty) | (Some("binary"), _) => {}
        (None, _) => r.push("request body", "this operation takes no body".into()),
        (Some(ty), Body::Json(v)) => value(ty, v, "$", "request body", r),
        (Some(_), _) => r.push("request body", "expected a JSON document".into()),
    }
}

/// Matches the path against the template: scope segments (project, team) and the segments
/// after `_apis`, with typed parameters.
fn check_path(op: &Value, req: &Request, r: &mut Report) {
    let template = op.get("path").and_then(Value::as_str).unwrap_or("");
    let (scope, rest) = template.split_once("_apis/").unwrap_or(("", template));
    let mut required = 0;
    let mut allowed = 0;
    let mut s = scope;
    while !s.is_empty() {
        if let Some(t) = s.strip_prefix('[') {
            let end = t.find(']').map_or(t.len(), |i| i + 1);
            s = t.get(end..).unwrap_or("");
        } else {
            required += 1;
            s = s.split_once('/').map_or("", |(_, t)| t);
        }
        allowed += 1;
    }
    let n = req.scope.len();
    if n < required {
        r.push("request path", format!("'{template}' needs a project before _apis"));
    } else if n > allowed {
        r.push(
            "request path",
            format!("'{template}' allows {allowed} segment(s) before _apis, got {n}"),
        );
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() != req.path.len() {
        r.push(
            "request path",
            format!("expected _apis/{rest}, got _apis/{}", req.path.join("/")),
        );
        return;
    }
    for (t, got) in parts.iter().zip(&req.path) {
        let (lit, param) = match t.find('{') {
            Some(i) => (&t[..i], Some(t[i + 1..].trim_end_matches('}'))),
            None => (*t, None),
        };
        match param {
            None if !got.eq_ignore_ascii_case(lit) => {
                r.push("request path", format!("expected segment '{lit}', got '{got}'"))
            }
            None => {}
            Some(p) => {
                let (name, ty) = p.split_once(':').unwrap_or((p, "string"));
                let Some(v) = got.strip_prefix(lit) else {
                    r.push("request path", format!("segment '{got}' must start with '{lit}'"));
                    continue;
                };
                if let Err(e) = query_value(ty, v) {
                    r.push("request path", format!("parameter '{name}': {e}"));
                }
            }
        }
    }
}

fn check_response(op: &Value, resp: &Response, r: &mut Report) {
    if !(200..300).contains(&resp.status) {
        // Errors have the service's error body; gateway pages and empty 401s are not JSON.
        if let Body::Json(v) = &resp.body {
            value("Error", v, "$", "error response", r);
        }
        return;
    }
    let statuses: Vec<u64> = op
        .get("status")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_else(|| vec![200]);
    if !statuses.contains(&u64::from(resp.status)) {
        r.push("response status", format!("expected {statuses:?}, got {}", resp.status));
    }
    match (op.get("response").and_then(Value::as_str).unwrap_or("any"), &resp.body) {
        ("binary", _) | ("any", _) => {}
        ("empty", Body::Empty) => {}
        ("empty", _) => r.push("response", "expected no body".into()),
        (ty, Body::Json(v)) => value(ty, v, "$", "response", r),
        (ty, _) => r.push("response", format!("expected a JSON {ty}, got no JSON")),
    }
}

/// `"WorkItem! >=6.0"` → (`WorkItem`, required, since).
fn split_type(t: &str) -> (&str, bool, Option<Version>) {
    let (t, since) = match t.split_once(" >=") {
        Some((a, v)) => (a, parse_version(v.trim())),
        None => (t, None),
    };
    let t = t.trim();
    match t.strip_suffix('!') {
        Some(t) => (t, true, since),
        None => (t, false, since),
    }
}

/// Splits `A|B` at the top level (not inside brackets).
fn alternatives(t: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in t.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            '|' if depth == 0 => {
                out.push(&t[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&t[start..]);
    out
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
        && (b.len() == 10 || b[10] == b'T' || b[10] == b' ')
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn enum_has(list: &str, s: &str) -> bool {
    list.split(',').any(|x| x.eq_ignore_ascii_case(s))
}

/// Checks a query or path value (text) against a scalar type.
fn query_value(ty: &str, v: &str) -> Result<(), String> {
    let ok = match ty {
        "integer" => v.trim().parse::<i64>().is_ok(),
        "number" => v.trim().parse::<f64>().is_ok(),
        "boolean" => v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false"),
        "date-time" => is_date_time(v),
        "uuid" => is_uuid(v),
        "csv-integer" => v.split(',').all(|x| x.trim().parse::<i64>().is_ok()),
        t if t.starts_with("enum:") => enum_has(&t[5..], v),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {ty}, got {v:?}"))
    }
}

/// Checks a JSON value against a type, reporting under `what` (`response`, `request body`)
/// at the JSON path `at`.
fn value(ty: &str, v: &Value, at: &str, what: &str, r: &mut Report) {
    let alts = alternatives(ty);
    if alts.len() > 1 {
        let mut best: Option<Vec<String>> = None;
        for a in &alts {
            let mut sub = Report {
                prefix: r.prefix.clone(),
                version: r.version,
                out: Vec::new(),
            };
            value(a, v, at, what, &mut sub);
            if sub.out.is_empty() {
                return;
            }
            // Report the alternative of the value's own kind (an object against a named type).
            let same_kind = matches!(v, Value::Object(_)) && types().contains_key(*a)
                || kind(v) == *a
                || a.starts_with('[') && v.is_array();
            if same_kind || best.is_none() {
                best = Some(sub.out);
            }
        }
        if let Some(b) = best {
            if b.len() == 1 && !matches!(v, Value::Object(_) | Value::Array(_)) {
                r.push(&format!("{what} {at}"), format!("expected {ty}, got {}", kind(v)));
            } else {
                r.out.extend(b);
            }
        }
        return;
    }
    let mismatch = |r: &mut Report, expected: &str| {
        r.push(&format!("{what} {at}"), format!("expected {expected}, got {}", kind(v)))
    };
    match ty {
        "any" => {}
        "null" if v.is_null() => {}
        "object" if v.is_object() => {}
        "array" if v.is_array() => {}
        "string" if v.is_string() => {}
        "boolean" if v.is_boolean() => {}
        "number" if v.is_number() => {}
        "integer" if v.is_i64() || v.is_u64() => {}
        "null" | "object" | "array" | "string" | "boolean" | "number" | "integer" => mismatch(r, ty),
        "date-time" | "uuid" => match v.as_str() {
            Some(s) if (ty == "uuid" && is_uuid(s)) || (ty == "date-time" && is_date_time(s)) => {}
            Some(s) => r.push(&format!("{what} {at}"), format!("expected {ty}, got {s:?}")),
            None => mismatch(r, ty),
        },
        t if t.starts_with("enum:") => match v.as_str() {
            Some(s) if enum_has(&t[5..], s) => {}
            Some(s) => r.push(
                &format!("{what} {at}"),
                format!("expected one of {}, got {s:?}", &t[5..]),
            ),
            None => mismatch(r, "string"),
        },
        t if t.starts_with('[') && t.ends_with(']') => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    value(&t[1..t.len() - 1], item, &format!("{at}[{i}]"), what, r);
                }
            }
            None => mismatch(r, "array"),
        },
        t if t.starts_with('{') && t.ends_with('}') => match v.as_object() {
            Some(m) => {
                for (k, item) in m {
                    value(&t[1..t.len() - 1], item, &child(at, k), what, r);
                }
            }
            None => mismatch(r, "object"),
        },
        name => match types().get(name).and_then(Value::as_object) {
            None => r.push(&format!("{what} {at}"), format!("the description has no type '{name}'")),
            Some(_) => match v.as_object() {
                Some(obj) => object(name, obj, at, what, r),
                None => mismatch(r, &format!("object ({name})")),
            },
        },
    }
}

/// A named type's fields, its `...` base's included (the nearer definition wins).
fn fields_of(name: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut next = Some(name.to_string());
    let mut depth = 0;
    while let (Some(n), true) = (next.take(), depth < 8) {
        depth += 1;
        for (k, t) in types().get(&n).and_then(Value::as_object).into_iter().flatten() {
            let t = t.as_str().unwrap_or("any").to_string();
            if k == "..." {
                next = Some(t);
            } else if !out.iter().any(|(x, _)| x == k) {
                out.push((k.clone(), t));
            }
        }
    }
    out
}

fn child(at: &str, key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
        format!("{at}.{key}")
    } else {
        format!("{at}[{key:?}]")
    }
}

fn object(name: &str, obj: &Map<String, Value>, at: &str, what: &str, r: &mut Report) {
    let fields = fields_of(name);
    let rest = fields.iter().find(|(k, _)| k == "*").map(|(_, t)| t.clone());
    for (k, t) in &fields {
        if k == "*" {
            continue;
        }
        let (ty, required, since) = split_type(t);
        let exists = since.is_none_or(|s| s <= r.version);
        match obj.get(k) {
            None if required && exists => r.push(&format!("{what} {at}"), format!("missing required field '{k}'")),
            None => {}
            Some(_) if !exists => r.push(
                &format!("{what} {}", child(at, k)),
                format!("field of {name} only from {}", since.unwrap_or(r.version)),
            ),
            Some(v) => value(ty, v, &child(at, k), what, r),
        }
    }
    for (k, v) in obj {
        if fields.iter().any(|(f, _)| f == k) {
            continue;
        }
        match &rest {
            Some(t) => value(t, v, &child(at, k), what, r),
            None => r.push(&format!("{what} {}", child(at, k)), format!("field not in {name}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn get(endpoint: &str, version: &str, path: &[&str], query: &[(&str, &str)]) -> Request {
        Request {
            endpoint: endpoint.into(),
            version: Some(version.into()),
            fallback: VERSIONS[3],
            method: "GET".into(),
            scope: vec!["Fabrikam".into()],
            path: path.iter().map(|s| s.to_string()).collect(),
            query: query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    #[test]
    fn the_description_parses_and_names_only_known_types() {
        let d = description();
        assert!(d["operations"].as_array().is_some_and(|a| a.len() > 30));
        for (name, t) in types() {
            for (field, ty) in t.as_object().into_iter().flatten() {
                let ty = ty.as_str().unwrap_or_default();
                let (base, _, _) = split_type(ty);
                for a in alternatives(base) {
                    let inner = a.trim_start_matches(['[', '{']).trim_end_matches([']', '}']);
                    for leaf in alternatives(inner) {
                        let scalar = [
                            "any",
                            "null",
                            "object",
                            "array",
                            "string",
                            "boolean",
                            "number",
                            "integer",
                            "date-time",
                            "uuid",
                        ];
                        assert!(
                            scalar.contains(&leaf) || leaf.starts_with("enum:") || types().contains_key(leaf),
                            "{name}.{field}: unknown type {leaf}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn versions_map_to_the_nearest_described_one_below() {
        let v = |s: &str| Requested::parse(s).map(|r| described_version(r.version));
        assert_eq!(v("6.1-preview"), Some(VERSIONS[1]));
        assert_eq!(v("5.1"), Some(VERSIONS[0]));
        assert_eq!(v("4.1"), Some(VERSIONS[0]));
        assert_eq!(v("7.2"), Some(VERSIONS[3]));
    }

    #[test]
    fn a_conforming_exchange_has_no_mismatch() {
        let req = get(
            "workitems.get",
            "7.1",
            &["wit", "workitems", "7"],
            &[("$expand", "relations")],
        );
        let resp = Response {
            status: 200,
            body: Body::Json(json!({"id": 7, "rev": 2, "fields": {"System.Title": "x"}, "relations": [], "url": "u"})),
        };
        assert_eq!(check(&req, &resp), Vec::<String>::new());
    }

    #[test]
    fn alternatives_report_the_value_s_own_kind() {
        let req = get("workitems.list", "6.0", &["wit", "workitems"], &[("ids", "1,2")]);
        let resp = Response {
            status: 200,
            body: Body::Json(json!({"count": 2, "value": [null, {"id": 1, "rev": 1}]})),
        };
        assert_eq!(
            check(&req, &resp),
            vec!["workitems.list 6.0: response $.value[1]: missing required field 'fields'"]
        );
    }
}
