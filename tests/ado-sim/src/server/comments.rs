//! Comments: the 6.0+ comments API, and the read-only `System.History` view of 5.0.

use super::*;

pub(super) fn comments(s: &mut Store, name: &str, c: &Call) -> R {
    let id = parse_id(&c.rest[2])?;
    let project = c.project.as_deref();
    if c.legacy_comments {
        return legacy_comments(s, name, c, id);
    }
    let rendered = c.query.get("$expand").is_some_and(|e| {
        matches!(
            e.to_ascii_lowercase().as_str(),
            "renderedtext" | "renderedtextonly" | "all"
        )
    });
    let include_deleted = c.query.flag("includeDeleted");
    let format = || -> Result<&'static str, ApiError> {
        match c.query.get("format").map(str::to_ascii_lowercase).as_deref() {
            _ if !s.profile.has_comment_format() => Ok("html"),
            None | Some("html") => Ok("html"),
            Some("markdown") => Ok("markdown"),
            Some(other) => Err(ApiError::bad_request(
                "ArgumentException",
                format!("The comment format '{other}' is not valid: use markdown or html."),
            )),
        }
    };
    let text = || -> Result<String, ApiError> {
        c.json_body()?
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_request("ArgumentNullException", "The body needs a 'text'."))
    };
    match name {
        "comments.list" => {
            let wi = s.item(id, project)?;
            let mut list: Vec<&crate::model::Comment> =
                wi.comments.iter().filter(|x| include_deleted || !x.deleted).collect();
            if let Some(ids) = c.query.list("ids") {
                let want: Vec<u64> = ids.iter().filter_map(|i| i.parse().ok()).collect();
                list.retain(|x| want.contains(&x.id));
            }
            let desc = c.query.get("order").is_some_and(|o| o.eq_ignore_ascii_case("desc"));
            if desc {
                list.reverse();
            }
            let total = list.len();
            let skip = match c.query.get("continuationToken") {
                Some(t) => t.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(
                        "ArgumentException",
                        format!("The continuation token '{t}' is not valid."),
                    )
                })?,
                None => 0,
            };
            let top = c
                .query
                .num("$top")?
                .map(|n| n as usize)
                .unwrap_or(COMMENTS_PAGE)
                .clamp(1, COMMENTS_PAGE);
            let page: Vec<Value> = list
                .iter()
                .skip(skip)
                .take(top)
                .map(|x| render::comment(s, id, x, rendered))
                .collect();
            let next = skip + page.len();
            let url = format!("{}/comments", s.item_url(id));
            let mut body = json!({"totalCount": total, "count": page.len(), "comments": page, "url": url});
            if next < total {
                body["continuationToken"] = json!(next.to_string());
                body["nextPage"] = json!(format!("{url}?continuationToken={next}&$top={top}"));
            }
            Ok(Reply::json(200, body))
        }
        "comments.get" => {
            let cid = parse_id(&c.rest[4])?;
            let wi = s.item(id, project)?;
            let x = wi
                .comments
                .iter()
                .find(|x| x.id == cid && (include_deleted || !x.deleted))
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "CommentNotFoundException",
                        format!("VS402612: Comment {cid} was not found."),
                    )
                })?;
            Ok(Reply::json(200, render::comment(s, id, x, rendered)))
        }
        "comments.add" => {
            let f = format()?;
            let x = s.add_comment(id, project, &text()?, f, &c.opts())?;
            Ok(Reply::json(200, render::comment(s, id, &x, true)))
        }
        "comments.update" => {
            let cid = parse_id(&c.rest[4])?;
            let t = text()?;
            let x = s.change_comment(id, project, cid, Some(&t), &c.opts())?;
            Ok(Reply::json(200, render::comment(s, id, &x, true)))
        }
        "comments.delete" => {
            let cid = parse_id(&c.rest[4])?;
            s.change_comment(id, project, cid, None, &c.opts())?;
            Ok(Reply {
                status: 200,
                body: Bytes::new(),
                content_type: "text/plain",
                headers: Vec::new(),
            })
        }
        _ => Err(method_not_allowed(&c.method)),
    }
}

pub(super) fn method_not_allowed(m: &str) -> ApiError {
    ApiError::new(
        405,
        "HttpMethodNotSupportedException",
        format!("The requested resource does not support http method '{m}'."),
    )
}

/// Server 2019: comments are the `System.History` entries, read-only.
pub(super) fn legacy_comments(s: &Store, name: &str, c: &Call, id: u64) -> R {
    let wi = s.item(id, c.project.as_deref())?;
    let all = render::history_comments(s, wi);
    match name {
        "comments.list" => {
            let from = c.query.num("fromRevision")?.unwrap_or(1) as u32;
            let top = c.query.num("$top")?.unwrap_or(200) as usize;
            let mut from_rev: Vec<Value> = all.iter().filter(|(r, _)| *r >= from).map(|(_, v)| v.clone()).collect();
            let from_count = from_rev.len();
            if c.query.get("order").is_some_and(|o| o.eq_ignore_ascii_case("desc")) {
                from_rev.reverse();
            }
            from_rev.truncate(top);
            Ok(Reply::json(
                200,
                json!({"totalCount": all.len(), "fromRevisionCount": from_count, "count": from_rev.len(), "comments": from_rev, "url": format!("{}/comments", s.item_url(id))}),
            ))
        }
        "comments.get" => {
            let rev = parse_id(&c.rest[4])? as u32;
            let v = all
                .into_iter()
                .find(|(r, _)| *r == rev)
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "CommentNotFoundException",
                        format!("VS402612: Work item {id} has no comment at revision {rev}."),
                    )
                })?;
            Ok(Reply::json(200, v))
        }
        _ => Err(method_not_allowed(&c.method)),
    }
}
