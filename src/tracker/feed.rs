//! Finding work items: one page of the project's reporting revisions feed, the ids a WIQL
//! condition selects, and the item a crash-cut create left behind (found by its hyperlink).

use serde_json::{json, Value};
use std::collections::HashMap;

use super::client::{enc, Req, Rest};
use super::{Revision, RevisionPage, TrackerError};
use crate::http::Method;

/// Ids asked for per WIQL query; the next query starts after the last id.
const WIQL_PAGE: usize = 10_000;
/// Ids per `workitemsbatch` call (the service's cap).
const BATCH: usize = 200;

/// One page of `{project}/_apis/wit/reporting/workitemrevisions`, ids and revs only.
pub async fn revisions(rest: &Rest, project: &str, continuation: Option<&str>) -> Result<RevisionPage, TrackerError> {
    let mut url = format!(
        "{}?fields=System.Id,System.Rev&{}",
        rest.project_url(project, "wit/reporting/workitemrevisions"),
        rest.api()
    );
    if let Some(token) = continuation.filter(|t| !t.is_empty()) {
        url.push_str(&format!("&continuationToken={}", enc(token)));
    }
    let v = rest.json(&Req::get(url)).await?;
    let values = v
        .get("values")
        .and_then(Value::as_array)
        .ok_or_else(|| TrackerError::Protocol("the revisions feed answered without values".into()))?;
    let mut revisions = Vec::with_capacity(values.len());
    for entry in values {
        let number = |top: &str, field: &str| {
            entry
                .get(top)
                .or_else(|| entry.pointer(&format!("/fields/{field}")))
                .and_then(Value::as_u64)
        };
        match (number("id", "System.Id"), number("rev", "System.Rev")) {
            (Some(id), Some(rev)) => revisions.push(Revision { id, rev }),
            _ => {
                return Err(TrackerError::Protocol(format!(
                    "a revisions feed entry without id or rev: {}",
                    short(entry)
                )))
            }
        }
    }
    let token = v
        .get("continuationToken")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| continuation.map(str::to_owned))
        .unwrap_or_default();
    let last = v
        .get("isLastBatch")
        .and_then(Value::as_bool)
        .unwrap_or(revisions.is_empty());
    Ok(RevisionPage {
        revisions,
        continuation: token,
        last,
    })
}

/// The WIQL text selecting the project's items after `after`, optionally narrowed.
fn wiql(where_clause: Option<&str>, after: u64) -> String {
    let narrowed = match where_clause.map(str::trim).filter(|w| !w.is_empty()) {
        Some(w) => format!(" AND ({w})"),
        None => String::new(),
    };
    let after = if after > 0 {
        format!(" AND [System.Id] > {after}")
    } else {
        String::new()
    };
    format!(
        "SELECT [System.Id] FROM WorkItems WHERE [System.TeamProject] = @project{narrowed}{after} ORDER BY [System.Id]"
    )
}

/// Runs one WIQL query in `project`, answering the ids.
async fn run_wiql(rest: &Rest, project: &str, query: &str, top: usize) -> Result<Vec<u64>, TrackerError> {
    let url = format!("{}?$top={top}&{}", rest.project_url(project, "wit/wiql"), rest.api());
    let v = rest
        .json(&Req::json(Method::POST, url, &json!({ "query": query })))
        .await?;
    Ok(v.get("workItems")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|w| w.get("id").and_then(Value::as_u64)).collect())
        .unwrap_or_default())
}

/// Every id `where_clause` selects in `project`, ascending, read in pages.
pub async fn query_ids(rest: &Rest, project: &str, where_clause: Option<&str>) -> Result<Vec<u64>, TrackerError> {
    let mut ids: Vec<u64> = Vec::new();
    loop {
        let after = ids.last().copied().unwrap_or(0);
        let page = run_wiql(rest, project, &wiql(where_clause, after), WIQL_PAGE).await?;
        let full = page.len() >= WIQL_PAGE;
        let before = ids.len();
        ids.extend(page.into_iter().filter(|&id| id > after));
        if !full || ids.len() == before {
            break;
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The lowest id among the project's items created by this token's user since yesterday
/// whose relations hold a `Hyperlink` to exactly `url`.
pub async fn find_by_hyperlink(rest: &Rest, project: &str, url: &str) -> Result<Option<u64>, TrackerError> {
    Ok(hyperlinks_created(rest, project).await?.get(url).copied())
}

/// Every `Hyperlink` URL of the project's items created by this token's user since
/// yesterday, with the lowest id of an item carrying it.
pub async fn hyperlinks_created(rest: &Rest, project: &str) -> Result<HashMap<String, u64>, TrackerError> {
    let query = "SELECT [System.Id] FROM WorkItems WHERE [System.TeamProject] = @project \
                 AND [System.CreatedBy] = @me AND [System.CreatedDate] >= @today - 1 ORDER BY [System.Id]";
    let candidates = run_wiql(rest, project, query, 20_000).await?;
    let batch_url = format!("{}?{}", rest.project_url(project, "wit/workitemsbatch"), rest.api());
    let mut found = HashMap::new();
    for chunk in candidates.chunks(BATCH) {
        let body = json!({"ids": chunk, "$expand": "relations", "errorPolicy": "omit"});
        let v = rest.json(&Req::json(Method::POST, batch_url.clone(), &body)).await?;
        for item in v.get("value").and_then(Value::as_array).into_iter().flatten() {
            let Some(id) = item.get("id").and_then(Value::as_u64) else {
                continue;
            };
            let links = item
                .get("relations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|r| r.get("rel").and_then(Value::as_str) == Some("Hyperlink"))
                .filter_map(|r| r.get("url").and_then(Value::as_str));
            for url in links {
                let lowest = found.entry(url.to_owned()).or_insert(id);
                *lowest = (*lowest).min(id);
            }
        }
    }
    Ok(found)
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wiql_scopes_to_the_project_and_narrows() {
        assert_eq!(
            wiql(None, 0),
            "SELECT [System.Id] FROM WorkItems WHERE [System.TeamProject] = @project ORDER BY [System.Id]"
        );
        assert_eq!(
            wiql(Some(" [System.WorkItemType] = 'Bug' OR [System.Tags] CONTAINS 'sync' "), 41),
            "SELECT [System.Id] FROM WorkItems WHERE [System.TeamProject] = @project AND ([System.WorkItemType] = 'Bug' \
             OR [System.Tags] CONTAINS 'sync') AND [System.Id] > 41 ORDER BY [System.Id]"
        );
        assert_eq!(wiql(Some("  "), 0), wiql(None, 0));
    }
}
