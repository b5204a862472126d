//! The control API for operators and tests (`/_sim/…`).

use super::*;

/// The control API for operators (`/_sim/…`), the same as the library handle offers.
pub(super) fn control(shared: &Arc<Shared>, method: &str, rest: &[String], body: &Bytes) -> R {
    let b: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request("Control", format!("bad JSON: {e}")))?
    };
    let r: Vec<&str> = rest.iter().map(String::as_str).collect();
    match (method, r.as_slice()) {
        ("POST", ["projects"]) => {
            let name = b
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request("Control", "needs {\"name\": …}"))?;
            let p = lock(&shared.store).add_project(name);
            Ok(Reply::json(200, json!({"id": p.id, "name": p.name})))
        }
        ("PUT", ["profile"]) => {
            let p: Profile = b
                .get("profile")
                .and_then(Value::as_str)
                .unwrap_or("")
                .parse()
                .map_err(|e: String| ApiError::bad_request("Control", e))?;
            lock(&shared.store).profile = p;
            Ok(Reply::json(200, json!({"profile": p.name()})))
        }
        ("POST", ["faults"]) => {
            let count = b.get("count").and_then(Value::as_u64).unwrap_or(1) as u32;
            let retry = b.get("retryAfter").and_then(Value::as_u64).unwrap_or(1);
            let mut f = lock(&shared.faults);
            f.only = b.get("endpoint").and_then(Value::as_str).map(str::to_string);
            match b.get("status").and_then(Value::as_u64) {
                Some(429) => (f.throttle, f.throttle_retry_after) = (count, retry),
                Some(503) => (f.unavailable, f.unavailable_retry_after) = (count, retry),
                // 200: successes that carry the rate-limit warning headers (delayed mode).
                Some(200) => (f.delayed, f.delayed_retry_after) = (count, retry),
                _ => {
                    return Err(ApiError::bad_request(
                        "Control",
                        "status must be 429, 503 or 200 (delayed)",
                    ))
                }
            }
            Ok(Reply::json(200, json!({"armed": count})))
        }
        ("POST", ["hold"]) => {
            let endpoint = endpoint_arg(&b)?;
            hold(shared, endpoint);
            Ok(Reply::json(200, json!({"holding": endpoint})))
        }
        ("POST", ["release"]) => {
            let endpoint = endpoint_arg(&b)?;
            release(shared, endpoint);
            Ok(Reply::json(200, json!({"released": endpoint})))
        }
        ("POST", ["fail-after-commit"]) => {
            let endpoint = endpoint_arg(&b)?;
            let status = b.get("status").and_then(Value::as_u64).unwrap_or(502) as u16;
            let count = b.get("count").and_then(Value::as_u64).unwrap_or(1) as u32;
            fail_after_commit(shared, endpoint, status, count)?;
            Ok(Reply::json(200, json!({"armed": count, "status": status})))
        }
        ("POST", ["slow-commits"]) => {
            let endpoint = endpoint_arg(&b)?;
            let ms = b.get("delayMs").and_then(Value::as_u64).unwrap_or(0);
            slow_commits(shared, endpoint, std::time::Duration::from_millis(ms));
            Ok(Reply::json(200, json!({"endpoint": endpoint, "delayMs": ms})))
        }
        ("PUT", ["attachment-limit"]) => {
            let bytes = b.get("bytes").and_then(Value::as_u64);
            lock(&shared.faults).attachment_limit = bytes;
            let profile = lock(&shared.store).profile;
            Ok(Reply::json(
                200,
                json!({"bytes": bytes.unwrap_or_else(|| profile.attachment_limit())}),
            ))
        }
        ("PUT", ["canonical"]) => {
            let url = b.get("url").and_then(Value::as_str);
            set_canonical(shared, url);
            Ok(Reply::json(200, json!({"url": lock(&shared.store).base_url})))
        }
        ("POST", ["identities"]) => {
            let text = |k: &str| b.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
            let (Some(display_name), Some(unique_name)) = (text("displayName"), text("uniqueName")) else {
                return Err(ApiError::bad_request(
                    "Control",
                    "needs {\"displayName\": …, \"uniqueName\": …}",
                ));
            };
            lock(&shared.store).add_identity(Identity {
                display_name: display_name.into(),
                unique_name: unique_name.into(),
            });
            Ok(Reply::json(200, json!({"uniqueName": unique_name})))
        }
        ("POST", ["hooks"]) => {
            let url = b
                .get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request("Control", "needs {\"url\": …}"))?;
            let headers = match (
                b.get("header").and_then(Value::as_str),
                b.get("value").and_then(Value::as_str),
            ) {
                (Some(h), Some(v)) => vec![(h.to_string(), v.to_string())],
                _ => Vec::new(),
            };
            let types = b
                .get("eventTypes")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let id = subscribe(shared, url, headers, types);
            Ok(Reply::json(200, json!({"id": id})))
        }
        ("GET", ["counters"]) => {
            let c = lock(&shared.counters).clone();
            Ok(Reply::json(
                200,
                json!({"counters": c, "hooksDelivered": shared.hook_delivered.load(Ordering::Relaxed), "hooksFailed": shared.hook_failed.load(Ordering::Relaxed)}),
            ))
        }
        ("GET", ["conformance"]) => Ok(Reply::json(
            200,
            json!({"enabled": shared.conformance, "violations": *lock(&shared.violations)}),
        )),
        ("GET", ["items"]) => {
            let s = lock(&shared.store);
            let v: Vec<Value> = s
                .items
                .values()
                .map(|w| json!({"id": w.id, "rev": w.rev(), "deleted": w.deleted, "fields": w.latest().fields, "comments": w.comments.iter().filter(|c| !c.deleted).count()}))
                .collect();
            Ok(Reply::json(200, json!({"count": v.len(), "value": v})))
        }
        ("POST", ["human-edit"]) => {
            let id = b
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| ApiError::bad_request("Control", "needs {\"id\": …, \"ops\": […]}"))?;
            let ops = b.get("ops").and_then(Value::as_array).cloned().unwrap_or_default();
            let who = human();
            let mut s = lock(&shared.store);
            if b.get("afterNextRead").and_then(Value::as_bool).unwrap_or(false) {
                s.after_read.insert(id, (who, ops));
                return Ok(Reply::json(200, json!({"armed": id})));
            }
            let o = WriteOpts {
                validate_only: false,
                bypass_rules: false,
                suppress_notifications: false,
                actor: who,
            };
            let wi = s.update(id, None, &ops, &o)?;
            Ok(Reply::json(200, json!({"id": id, "rev": wi.rev()})))
        }
        _ => Err(not_found("control endpoint")),
    }
}

/// The identity "human" edits are made as.
pub fn human() -> Identity {
    Identity {
        display_name: "Human Editor".into(),
        unique_name: "human.editor@example.com".into(),
    }
}

fn endpoint_arg(b: &Value) -> Result<&str, ApiError> {
    b.get("endpoint")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| ApiError::bad_request("Control", "needs {\"endpoint\": …} (a name of /_sim/counters)"))
}

/// Answers of `endpoint` wait, after the request took effect, until [`release`].
pub fn hold(shared: &Shared, endpoint: &str) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    lock(&shared.gates).insert(endpoint.to_string(), rx);
    // A hold armed again replaces the old one, whose waiting answers go out now.
    if let Some(old) = lock(&shared.held).insert(endpoint.to_string(), tx) {
        let _ = old.send(true);
    }
}

/// Answers of `endpoint` no longer wait, and those waiting go out.
pub fn release(shared: &Shared, endpoint: &str) {
    lock(&shared.gates).remove(endpoint);
    if let Some(tx) = lock(&shared.held).remove(endpoint) {
        let _ = tx.send(true);
    }
}

/// The next `n` calls of `endpoint` take effect, then answer `status` (502 or 504) as a
/// gateway would; `n = 0` disarms.
pub fn fail_after_commit(shared: &Shared, endpoint: &str, status: u16, n: u32) -> Result<(), ApiError> {
    if !matches!(status, 502 | 504) {
        return Err(ApiError::bad_request("Control", "status must be 502 or 504"));
    }
    let mut f = lock(&shared.faults);
    if n == 0 {
        f.after_commit.remove(endpoint);
    } else {
        f.after_commit.insert(endpoint.to_string(), (status, n));
    }
    Ok(())
}

/// Calls of `endpoint` wait `delay` before they take effect; zero stops.
pub fn slow_commits(shared: &Shared, endpoint: &str, delay: std::time::Duration) {
    let mut f = lock(&shared.faults);
    if delay.is_zero() {
        f.slow_commits.remove(endpoint);
    } else {
        f.slow_commits.insert(endpoint.to_string(), delay);
    }
}

/// Answers name `url` (e.g. `https://fabrikam.visualstudio.com`) as the collection's base
/// in item, attachment and link URLs instead of the URL asked on; `None` restores it.
pub fn set_canonical(shared: &Shared, url: Option<&str>) {
    let url = url
        .map(|u| u.trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| shared.url.clone());
    lock(&shared.store).base_url = url;
}
