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

/// One page of `{project}/_apis/wit/reporting/workitemrevisions`, ids and revs only: from
/// `continuation`, else (a first read) from `start_ms` with the documented `startDateTime`
/// (revisions after that instant), else from the start of the project's history.
pub async fn revisions(
    rest: &Rest,
    project: &str,
    continuation: Option<&str>,
    start_ms: Option<u64>,
) -> Result<RevisionPage, TrackerError> {
    let mut url = format!(
        "{}?fields=System.Id,System.Rev&{}",
        rest.project_url(project, "wit/reporting/workitemrevisions"),
        rest.api()
    );
    match (continuation.filter(|t| !t.is_empty()), start_ms) {
        (Some(token), _) => url.push_str(&format!("&continuationToken={}", enc(token))),
        // The two cannot go together; the token already holds the position.
        (None, Some(ms)) => url.push_str(&format!("&startDateTime={}", enc(&utc_instant(ms)))),
        (None, None) => {}
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

/// The lowest id among the project's items created by this token's user since `since_ms`
/// whose relations hold a `Hyperlink` to exactly `url`.
pub async fn find_by_hyperlink(
    rest: &Rest,
    project: &str,
    url: &str,
    since_ms: u64,
) -> Result<Option<u64>, TrackerError> {
    Ok(hyperlinks_created(rest, project, since_ms).await?.get(url).copied())
}

/// The WIQL selecting the project's items this token's user created on or after the day
/// before `since_ms`'s (UTC) day: WIQL compares dates by day in the server's time zone, which
/// may be up to a day behind UTC, and a day too many only costs a few more candidates.
fn created_since_wiql(since_ms: u64) -> String {
    let day = utc_instant(since_ms.saturating_sub(DAY_MS));
    let day = &day[..10];
    format!(
        "SELECT [System.Id] FROM WorkItems WHERE [System.TeamProject] = @project \
         AND [System.CreatedBy] = @me AND [System.CreatedDate] >= '{day}' ORDER BY [System.Id]"
    )
}

/// Every `Hyperlink` URL of the project's items created by this token's user since
/// `since_ms` (see [`created_since_wiql`]), with the lowest id of an item carrying it.
pub async fn hyperlinks_created(
    rest: &Rest,
    project: &str,
    since_ms: u64,
) -> Result<HashMap<String, u64>, TrackerError> {
    let query = created_since_wiql(since_ms);
    let candidates = run_wiql(rest, project, &query, 20_000).await?;
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

/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

/// `2024-05-01T10:02:03.450Z` for unix milliseconds (UTC, proleptic Gregorian).
fn utc_instant(ms: u64) -> String {
    let days = (ms / DAY_MS) as i64;
    let rem = ms % DAY_MS;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
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

    #[test]
    fn instants_print_in_utc() {
        assert_eq!(utc_instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_instant(1_507_251_891_570), "2017-10-06T01:04:51.570Z");
        assert_eq!(utc_instant(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_instant(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }

    #[test]
    fn the_reconciling_search_starts_the_day_before_the_first_attempt() {
        // 2017-10-06T01:04:51Z: from 2017-10-05, however long ago that was.
        let q = created_since_wiql(1_507_251_891_570);
        assert!(q.contains("[System.CreatedDate] >= '2017-10-05'"), "{q}");
        assert!(q.contains("[System.CreatedBy] = @me"), "{q}");
        assert!(!q.contains("@today"), "{q}");
    }
}
