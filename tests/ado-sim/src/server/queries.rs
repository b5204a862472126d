//! The query endpoints: WIQL and the reporting revisions feed with its continuation tokens.

use super::*;

pub(super) fn wiql_query(s: &Store, c: &Call) -> R {
    let b = c.json_body()?;
    let text = b.get("query").and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request("ArgumentNullException", "The body needs a 'query' with the WIQL text.")
    })?;
    let q = wiql::parse(text)?;
    let project_name = match c.project.as_deref() {
        Some(p) => Some(s.require_project(p)?.name.clone()),
        None => None,
    };
    let lookup = |n: &str| s.field(n).cloned();
    let now = clock::now_ms();
    let ctx = wiql::Ctx {
        field: &lookup,
        project: project_name.as_deref(),
        me: &c.actor,
        now_ms: now,
        time_precision: c.query.flag("timePrecision"),
    };
    wiql::validate(&q, &ctx)?;
    let mut hits: Vec<&crate::model::WorkItem> = s
        .items
        .values()
        .filter(|w| !w.deleted)
        .filter(|w| {
            let f = &w.latest().fields;
            q.filter
                .as_ref()
                .is_none_or(|e| wiql::matches(e, &|k| f.get(k).cloned(), &ctx))
        })
        .collect();
    if hits.len() > WIQL_LIMIT {
        return Err(ApiError::bad_request(
            "WorkItemQueryTooManyResultsException",
            format!("VS402337: The number of work items returned exceeds the size limit of {WIQL_LIMIT}. Change the query to return fewer work items."),
        ));
    }
    hits.sort_by(|a, b| {
        let (fa, fb) = (&a.latest().fields, &b.latest().fields);
        wiql::order(&q, &|k| fa.get(k).cloned(), &|k| fb.get(k).cloned(), &ctx).then(a.id.cmp(&b.id))
    });
    if let Some(top) = c.query.num("$top")? {
        hits.truncate(top as usize);
    }
    let col = |n: &str| {
        let d = s.field(n);
        json!({"referenceName": d.map(|d| d.reference.clone()).unwrap_or_else(|| n.to_string()), "name": d.map(|d| d.name.clone()).unwrap_or_default(), "url": format!("{}/_apis/wit/fields/{n}", s.base_url)})
    };
    Ok(Reply::json(
        200,
        json!({
            "queryType": "flat",
            "queryResultType": "workItem",
            "asOf": clock::format(now),
            "columns": q.columns.iter().map(|n| col(n)).collect::<Vec<_>>(),
            "sortColumns": q.order.iter().map(|(n, d)| json!({"field": col(n), "descending": d})).collect::<Vec<_>>(),
            "workItems": hits.iter().map(|w| json!({"id": w.id, "url": s.item_url(w.id)})).collect::<Vec<_>>(),
        }),
    ))
}

/// A page of the reporting feed, and how many revisions it holds.
pub(super) fn feed(s: &Store, c: &Call) -> Result<(Reply, usize), ApiError> {
    let post = c.method == "POST";
    let body = if post { c.json_body()? } else { Value::Null };
    let list = |k: &str| -> Option<Vec<String>> {
        if post {
            body.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        } else {
            c.query.list(k)
        }
    };
    let flag = |k: &str| {
        if post {
            body.get(k).and_then(Value::as_bool).unwrap_or(false)
        } else {
            c.query.flag(k)
        }
    };
    let fields = list("fields");
    if let Some(f) = &fields {
        for n in f {
            s.field(n).ok_or_else(|| ApiError::unknown_field(n))?;
        }
    }
    let types = list("types").unwrap_or_default();
    let latest_only = flag("includeLatestOnly");
    let identity_ref = flag("includeIdentityRef");
    let long_text = c.query.get("$expand").is_some_and(|e| e.eq_ignore_ascii_case("fields"));
    let token = c
        .query
        .get("continuationToken")
        .or(c.query.get("watermark"))
        .filter(|t| !t.is_empty());
    let start = c.query.get("startDateTime");
    if token.is_some() && start.is_some() {
        return Err(ApiError::bad_request(
            "ArgumentException",
            "VS402940: startDateTime cannot be used together with a continuationToken.",
        ));
    }
    let after = match token {
        None => 0,
        Some(t) => t
            .split(';')
            .next()
            .and_then(|p| p.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "ArgumentException",
                    format!("VS402941: The continuation token '{t}' is not valid."),
                )
            })?,
    };
    let since = match start {
        Some(t) => Some(
            clock::parse(t)
                .ok_or_else(|| {
                    ApiError::bad_request("ArgumentException", format!("The startDateTime '{t}' is not a date."))
                })?
                .ms,
        ),
        None => None,
    };
    let max = c
        .query
        .num("$maxPageSize")?
        .map(|n| (n as usize).clamp(1, FEED_PAGE))
        .unwrap_or(FEED_PAGE);
    let project_id = match c.project.as_deref() {
        Some(p) => Some(s.require_project(p)?.id.clone()),
        None => None,
    };
    let include_deleted = flag("includeDeleted");
    let page = s.feed_page(&store::FeedQuery {
        project_id,
        types,
        after,
        max,
        latest_only,
        since_ms: since,
        include_deleted,
    });
    let values: Vec<Value> = page
        .entries
        .iter()
        .filter_map(|&(_, id, rev)| {
            s.items
                .get(&id)
                .map(|wi| render::reporting_revision(s, wi, rev, fields.as_deref(), long_text, identity_ref))
        })
        .collect();
    // The token names the feed position reached (with its item and rev, as the service's
    // three-part tokens do); only the position is read back.
    let (tail_id, tail_rev) = (page.last_position as usize)
        .checked_sub(1)
        .and_then(|i| s.feed.get(i))
        .copied()
        .unwrap_or((0, 0));
    let token = format!("{};{tail_id};{tail_rev}", page.last_position);
    let mut link = format!(
        "{}{}/_apis/wit/reporting/workItemRevisions?continuationToken={}",
        s.base_url,
        c.project
            .as_deref()
            .map(|p| format!("/{}", p.replace(' ', "%20")))
            .unwrap_or_default(),
        token.replace(';', "%3B")
    );
    for (k, v) in &c.query.0 {
        if k != "continuationtoken" && k != "watermark" && k != "startdatetime" {
            link.push_str(&format!(
                "&{k}={}",
                v.replace(' ', "%20").replace(';', "%3B").replace('&', "%26")
            ));
        }
    }
    let revisions = values.len();
    let reply = Reply::json(
        200,
        json!({"values": values, "nextLink": link, "continuationToken": token, "isLastBatch": page.is_last}),
    );
    Ok((reply, revisions))
}
