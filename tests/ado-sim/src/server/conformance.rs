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
            body: if r.body.is_empty() {
                spec::Body::Empty
            } else {
                spec::Body::Other
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of the description routes, by its method and path, to the endpoint
    /// name it is described under: the two cannot drift apart.
    #[test]
    fn each_described_path_routes_to_its_endpoint_name() {
        let ops = spec::description()["operations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!ops.is_empty());
        for op in ops {
            let name = op["endpoint"].as_str().unwrap_or_default();
            let method = op["method"].as_str().unwrap_or_default();
            let path = op["path"].as_str().unwrap_or_default();
            let (_, rest) = path.split_once("_apis/").unwrap_or(("", path));
            let segs: Vec<String> = rest
                .split('/')
                .map(|s| match s.find('{') {
                    Some(i) if s[i..].contains(":integer") => format!("{}7", &s[..i]),
                    Some(i) => format!("{}x", &s[..i]),
                    None => s.to_string(),
                })
                .map(|s| s.to_lowercase())
                .collect();
            assert_eq!(endpoint(method, &segs), name, "{method} {path}");
        }
    }
}
