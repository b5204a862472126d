//! The conformance hook: each routed request and its answer checked against the
//! specification's description ([`crate::spec`]) when checking is on; mismatches are kept
//! for tests to assert on (`SimHandle::conformance_violations`, `GET /_sim/conformance`).

use super::*;
use crate::spec;

/// The most distinct mismatches kept (a polling client repeats the same one).
const KEPT: usize = 500;

/// Checks one exchange and keeps its new mismatches.
pub(super) fn observe(shared: &Shared, name: &str, version: Option<&str>, scope: &[String], c: &Call, result: &R) {
    if !shared.conformance {
        return;
    }
    let fallback = lock(&shared.store).profile.latest();
    let mut query: Vec<(String, String)> = c.query.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    query.sort();
    let req = spec::Request {
        endpoint: name.to_string(),
        version: version.map(str::to_string),
        fallback,
        method: c.method.clone(),
        scope: scope.to_vec(),
        path: c.rest.clone(),
        query,
        headers: c
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: spec::Body::from_bytes(&c.body),
    };
    let resp = match result {
        Ok(r) if r.content_type.starts_with("application/json") => spec::Response {
            status: r.status,
            body: spec::Body::from_bytes(&r.body),
        },
        Ok(r) => spec::Response {
            status: r.status,
            body: if r.body.is_empty() { spec::Body::Empty } else { spec::Body::Other },
        },
        Err(e) => spec::Response {
            status: e.status,
            body: spec::Body::Json(e.body()),
        },
    };
    let found = spec::check(&req, &resp);
    if found.is_empty() {
        return;
    }
    let mut kept = lock(&shared.violations);
    for m in found {
        if kept.len() < KEPT && !kept.contains(&m) {
            kept.push(m);
        }
    }
}
