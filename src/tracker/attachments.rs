//! Attachments: one-request uploads up to the Server default limit, chunked uploads above it
//! (`uploadType=Chunked`, then `PUT` with `Content-Range`, in order), and bounded, streamed
//! downloads that never send the token to another host.

use bytes::Bytes;
use serde_json::Value;

use super::client::{enc, Req, Rest};
use super::{TrackerError, Uploaded};
use crate::http::Method;

/// The biggest upload sent in one request: Azure DevOps Server's default attachment limit
/// (Services allows far more, but one rule for both keeps requests small).
pub const SIMPLE_UPLOAD_MAX: usize = 4 * 1024 * 1024;
/// One chunk of a chunked upload (at most the server default limit per request).
pub const CHUNK: usize = 4 * 1024 * 1024;

fn octets(method: Method, url: String, body: Bytes) -> Req {
    Req {
        method,
        content_type: Some("application/octet-stream"),
        body,
        ..Req::get(url)
    }
}

fn uploaded(v: &Value, what: &str) -> Result<Uploaded, TrackerError> {
    match (
        v.get("id").and_then(Value::as_str),
        v.get("url").and_then(Value::as_str),
    ) {
        (Some(id), Some(url)) => Ok(Uploaded {
            id: id.to_owned(),
            url: url.to_owned(),
        }),
        _ => Err(TrackerError::Protocol(format!("{what} answered without id and url"))),
    }
}

/// Uploads `bytes` as `filename` in `project`.
pub async fn upload(rest: &Rest, project: &str, filename: &str, bytes: &[u8]) -> Result<Uploaded, TrackerError> {
    let base = rest.project_url(project, "wit/attachments");
    if bytes.len() <= SIMPLE_UPLOAD_MAX {
        let url = format!("{base}?fileName={}&{}", enc(filename), rest.api());
        let v = rest
            .json(&octets(Method::POST, url, Bytes::copy_from_slice(bytes)))
            .await?;
        return uploaded(&v, "the attachment upload");
    }
    let url = format!("{base}?fileName={}&uploadType=Chunked&{}", enc(filename), rest.api());
    let started = rest.json(&octets(Method::POST, url, Bytes::new())).await?;
    let done = uploaded(&started, "the chunked upload's start")?;
    let total = bytes.len();
    let chunk_url = format!("{base}/{}?fileName={}&{}", enc(&done.id), enc(filename), rest.api());
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        let start = i * CHUNK;
        let end = start + chunk.len() - 1;
        let mut req = octets(Method::PUT, chunk_url.clone(), Bytes::copy_from_slice(chunk));
        req.headers
            .push(("content-range", format!("bytes {start}-{end}/{total}")));
        let v = rest.json(&req).await?;
        // The start's URL (with the file name) is the one kept; a chunk's answer only checks.
        if let Ok(u) = uploaded(&v, "a chunk") {
            if u.id != done.id {
                return Err(TrackerError::Protocol(format!(
                    "a chunk of attachment {} answered for attachment {}",
                    done.id, u.id
                )));
            }
        }
    }
    Ok(done)
}

/// Reads an attachment of this tracker, at most `max_bytes` of it. The body streams under a
/// progress deadline (the request timeout between two pieces), so a large file that keeps
/// flowing is read to its end while a stalled one fails; more than `max_bytes` is an error of
/// this attachment, not a transient one.
pub async fn download(rest: &Rest, url: &str, max_bytes: usize) -> Result<Bytes, TrackerError> {
    let Some(local) = rest.resolve_url(url).await else {
        return Err(TrackerError::Refused {
            status: 0,
            message: format!(
                "attachment URL {url} is not on the tracker {}; the access token is not sent there",
                rest.base
            ),
        });
    };
    let url = if local.contains("api-version=") {
        local
    } else {
        let sep = if local.contains('?') { '&' } else { '?' };
        format!("{local}{sep}{}", rest.api())
    };
    let mut req = Req::get(url.clone());
    req.accept = "application/octet-stream";
    req.max = max_bytes;
    let reply = rest.send_streaming(&req).await.map_err(|e| match e {
        TrackerError::Protocol(m) if m.contains("larger than") => {
            TrackerError::Protocol(format!("attachment {url} is larger than the {max_bytes} bytes allowed"))
        }
        other => other,
    })?;
    Ok(reply.body)
}
