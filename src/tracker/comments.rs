//! Comments: every comment of a work item, oldest first, through the comments API (5.1 and
//! later, paged by continuation token) or Server 2019's read-only History view (the revision
//! that wrote an entry is its id); and adding, editing and deleting one through the comments
//! API.

use serde_json::{json, Value};

use super::client::{Req, Rest};
use super::{AddedComment, ApiVersion, TrackerError};
use crate::http::Method;
use crate::sync::workitem::WorkComment;

/// Comments asked for per page (the service's maximum).
const PAGE: usize = 200;
/// Pages read at most for one work item: a runaway token loop ends as an error.
const MAX_PAGES: usize = 1000;

/// The comments resource's `api-version` for `v`: the spec marks it preview everywhere, at
/// resource version 2 on 5.0, 3 from 5.1 through 7.0, and 4 on 7.1.
pub fn api_version(v: ApiVersion) -> String {
    let resource = if v >= (ApiVersion { major: 7, minor: 1 }) {
        4
    } else if v.writes_comments() {
        3
    } else {
        2
    };
    format!("{v}-preview.{resource}")
}

/// Whether this version's comments carry a `format` (markdown or html): 7.1 and later.
fn has_format(v: ApiVersion) -> bool {
    v >= (ApiVersion { major: 7, minor: 1 })
}

/// Every live comment of work item `id`, oldest first.
pub async fn read_all(rest: &Rest, project: &str, id: u64) -> Result<Vec<WorkComment>, TrackerError> {
    let base = rest.project_url(project, &format!("wit/workItems/{id}/comments"));
    let version = api_version(rest.version);
    let mut out = Vec::new();
    if !rest.version.writes_comments() {
        // 5.0: the History view, paged by revision.
        let mut from = 1u64;
        for _ in 0..MAX_PAGES {
            let url = format!("{base}?fromRevision={from}&$top={PAGE}&order=asc&api-version={version}");
            let v = rest.json(&Req::get(url)).await?;
            let page = v.get("comments").and_then(Value::as_array).cloned().unwrap_or_default();
            let remaining = v.get("fromRevisionCount").and_then(Value::as_u64).unwrap_or(0);
            let mut last = None;
            for c in &page {
                let rev = c.get("revision").and_then(Value::as_u64);
                last = rev.max(last);
                out.push(WorkComment {
                    id: rev.map(|r| r.to_string()),
                    remote_id: None,
                    author_name: text(c, "/revisedBy/displayName"),
                    author_email: text(c, "/revisedBy/uniqueName"),
                    created: text(c, "/revisedDate"),
                    body: text(c, "/text"),
                });
            }
            match last {
                Some(rev) if (page.len() as u64) < remaining => from = rev + 1,
                _ => break,
            }
        }
        out.sort_by_key(|c| c.id.as_deref().and_then(|i| i.parse::<u64>().ok()));
        return Ok(out);
    }
    let expand = if has_format(rest.version) {
        "&$expand=renderedText"
    } else {
        ""
    };
    let mut token: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut url = format!("{base}?$top={PAGE}&order=asc{expand}&api-version={version}");
        if let Some(t) = &token {
            url.push_str(&format!("&continuationToken={}", super::enc(t)));
        }
        let v = rest.json(&Req::get(url)).await?;
        for c in v.get("comments").and_then(Value::as_array).into_iter().flatten() {
            if c.get("isDeleted").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            // A markdown comment's HTML is its rendered text.
            let markdown = c.get("format").and_then(Value::as_str) == Some("markdown");
            let body = match c.get("renderedText").and_then(Value::as_str) {
                Some(html) if markdown => html.to_owned(),
                _ => text(c, "/text"),
            };
            out.push(WorkComment {
                id: c.get("id").and_then(Value::as_u64).map(|i| i.to_string()),
                remote_id: None,
                author_name: text(c, "/createdBy/displayName"),
                author_email: text(c, "/createdBy/uniqueName"),
                created: text(c, "/createdDate"),
                body,
            });
        }
        match v
            .get("continuationToken")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            Some(t) if token.as_deref() != Some(t) => token = Some(t.to_owned()),
            _ => break,
        }
    }
    // Ids grow with creation; the order asked for is not trusted blindly.
    out.sort_by_key(|c| c.id.as_deref().and_then(|i| i.parse::<u64>().ok()));
    Ok(out)
}

/// Adds an HTML comment through the comments API.
pub async fn add(rest: &Rest, project: &str, id: u64, html: &str) -> Result<AddedComment, TrackerError> {
    let format = if has_format(rest.version) { "format=html&" } else { "" };
    let url = format!(
        "{}?{format}api-version={}",
        rest.project_url(project, &format!("wit/workItems/{id}/comments")),
        api_version(rest.version)
    );
    let mut req = Req::json(Method::POST, url, &json!({ "text": html }));
    req.item = Some(id);
    // A second add after a lost answer would be a second comment.
    req.idempotent = false;
    let v = rest.json(&req).await?;
    let comment_id = v
        .get("id")
        .or_else(|| v.get("commentId"))
        .and_then(Value::as_u64)
        .ok_or_else(|| TrackerError::Protocol(format!("work item {id}: the added comment came back without an id")))?;
    Ok(AddedComment {
        id: comment_id.to_string(),
        rev: None,
    })
}

/// Replaces the text of comment `comment` of work item `id` with `html` (the comments API's
/// update, 5.1 and later). Sending the same text twice leaves one edit's result.
pub async fn update(rest: &Rest, project: &str, id: u64, comment: &str, html: &str) -> Result<(), TrackerError> {
    let format = if has_format(rest.version) { "format=html&" } else { "" };
    let url = format!(
        "{}?{format}api-version={}",
        rest.project_url(project, &format!("wit/workItems/{id}/comments/{}", super::enc(comment))),
        api_version(rest.version)
    );
    let mut req = Req::json(Method::PATCH, url, &json!({ "text": html }));
    req.item = Some(id);
    rest.json(&req).await.map(|_| ())
}

/// Deletes comment `comment` of work item `id` (5.1 and later); one already gone is not an
/// error.
pub async fn delete(rest: &Rest, project: &str, id: u64, comment: &str) -> Result<(), TrackerError> {
    let url = format!(
        "{}?api-version={}",
        rest.project_url(project, &format!("wit/workItems/{id}/comments/{}", super::enc(comment))),
        api_version(rest.version)
    );
    let mut req = Req::get(url);
    req.method = Method::DELETE;
    req.item = Some(id);
    match rest.send(&req).await {
        Ok(_) | Err(TrackerError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn text(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_versions_follow_the_spec() {
        let v = |s| ApiVersion::parse(s).unwrap();
        assert_eq!(api_version(v("7.1")), "7.1-preview.4");
        assert_eq!(api_version(v("7.0")), "7.0-preview.3");
        assert_eq!(api_version(v("6.0")), "6.0-preview.3");
        assert_eq!(api_version(v("5.1")), "5.1-preview.3");
        assert_eq!(api_version(v("5.0")), "5.0-preview.2");
    }
}
