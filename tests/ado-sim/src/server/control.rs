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
