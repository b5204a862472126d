//! The service-hook receiver: `POST /v1/hooks/azure-devops` on the local API wakes the change
//! feed poller early. The feed stays the source of truth; a hook carries no data relay uses.

use crate::http::{self, Body, IncomingRequest, Response, StatusCode};
use crate::protocol::codes;
use crate::sync::engine::Engine;

/// The header a service hook subscription sends the shared secret in.
pub const SECRET_HEADER: &str = "Relay-Hook-Secret";

/// Largest hook body read: events carry the changed work item, which can be large.
const MAX_HOOK_BODY: usize = 4 * 1024 * 1024;

/// What a hook asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum HookEvent {
    /// A `workitem.*` event: the pollers are woken.
    WorkItem(String),
    /// Another event type (or none): acknowledged and ignored.
    Other(String),
}

/// Reads the event type of a service hook body.
pub fn classify(body: &[u8]) -> Result<HookEvent, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("the hook body is not JSON: {e}"))?;
    let kind = v
        .get("eventType")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(if kind.starts_with("workitem.") {
        HookEvent::WorkItem(kind)
    } else {
        HookEvent::Other(kind)
    })
}

/// Handles one hook: 404 without a tracker, 403 when hooks are off, 401 on a wrong secret, 400
/// on a body that is not JSON, else 202 (woken or ignored, said in the body).
pub async fn receive(engine: Option<&Engine>, req: IncomingRequest) -> Response<Body> {
    let Some(engine) = engine else {
        return http::error(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "no tracker is bound on this side ([tracker] in the config); service hooks have nothing to wake",
        );
    };
    let Some(secret) = &engine.settings().hook_secret else {
        return http::error(
            StatusCode::FORBIDDEN,
            codes::UNAUTHORIZED,
            "service hooks are off: set tracker.hook_secret and send it in the Relay-Hook-Secret header",
        );
    };
    let given = req
        .headers()
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !crate::crypto::ct_eq(given, secret.expose().as_bytes()) {
        return http::error(
            StatusCode::UNAUTHORIZED,
            codes::WRONG_SECRET,
            "missing or wrong Relay-Hook-Secret header",
        );
    }
    let body = match http::read_body(req.into_body(), MAX_HOOK_BODY).await {
        Ok(b) => b,
        Err(http::BodyError::TooLarge { limit }) => {
            return http::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::TOO_LARGE,
                format!("hook body larger than {limit} bytes"),
            )
        }
        Err(e) => return http::error(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.to_string()),
    };
    match classify(&body) {
        Ok(HookEvent::WorkItem(kind)) => {
            tracing::debug!(event = %kind, "service hook: waking the change feed pollers");
            engine.wake(None);
            http::json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"eventType": kind, "woke": true}),
            )
        }
        Ok(HookEvent::Other(kind)) => http::json(
            StatusCode::ACCEPTED,
            &serde_json::json!({"eventType": kind, "woke": false}),
        ),
        Err(message) => http::error(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, message),
    }
}
