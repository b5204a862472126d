//! Comments of the 6.0+ comments API: each add, edit and delete is a work item revision.

use super::*;

impl Store {
    /// Adds a comment through the comments API: a new revision whose `System.History` is the
    /// text, `System.CommentCount` + 1.
    pub fn add_comment(
        &mut self,
        id: u64,
        project: Option<&str>,
        text: &str,
        format: &'static str,
        o: &WriteOpts,
    ) -> Result<Comment, ApiError> {
        if text.trim().is_empty() {
            return Err(ApiError::bad_request(
                "ArgumentNullException",
                "The comment text must not be empty.",
            ));
        }
        let history = if format == "markdown" {
            render_markdown(text)
        } else {
            text.to_string()
        };
        let ops = [json!({"op": "add", "path": "/fields/System.History", "value": history})];
        let before = self.item(id, project)?.comments.len();
        // A comment is not a field edit: the type's rules do not stand in its way.
        let o = WriteOpts {
            bypass_rules: true,
            ..o.clone()
        };
        self.update(id, project, &ops, &o)?;
        let wi = self.items.get_mut(&id).ok_or_else(|| ApiError::work_item_missing(id))?;
        let c = wi
            .comments
            .get_mut(before)
            .ok_or_else(|| ApiError::work_item_missing(id))?;
        c.text = text.to_string();
        c.format = format;
        let c = c.clone();
        if let Some(r) = wi.revisions.last_mut().and_then(|r| r.comment.as_mut()) {
            r.text = text.to_string();
        }
        Ok(c)
    }

    /// Edits or deletes a comment: its version + 1 and a new work item revision carrying the
    /// comment reference.
    pub fn change_comment(
        &mut self,
        id: u64,
        project: Option<&str>,
        comment_id: u64,
        text: Option<&str>,
        o: &WriteOpts,
    ) -> Result<Comment, ApiError> {
        self.item(id, project)?;
        let now = self.tick();
        let wi = self.items.get_mut(&id).ok_or_else(|| ApiError::work_item_missing(id))?;
        let c = wi
            .comments
            .iter_mut()
            .find(|c| c.id == comment_id && !c.deleted)
            .ok_or_else(|| comment_missing(comment_id))?;
        match text {
            Some(t) if t.trim().is_empty() => {
                return Err(ApiError::bad_request(
                    "ArgumentNullException",
                    "The comment text must not be empty.",
                ))
            }
            Some(t) => c.text = t.to_string(),
            None => c.deleted = true,
        }
        c.version += 1;
        c.modified_by = o.actor.combined();
        c.modified_ms = now;
        let c = c.clone();
        let count = wi.comments.iter().filter(|c| !c.deleted).count();
        let mut rev = wi.latest().clone();
        rev.fields.remove("System.History");
        rev.rev += 1;
        rev.changed_ms = now;
        rev.fields.insert("System.Rev".into(), json!(rev.rev));
        rev.fields
            .insert("System.ChangedDate".into(), json!(clock::format(now)));
        rev.fields
            .insert("System.AuthorizedDate".into(), json!(clock::format(now)));
        rev.fields.insert("System.ChangedBy".into(), json!(o.actor.combined()));
        rev.fields.insert("System.CommentCount".into(), json!(count));
        rev.fields
            .insert("System.Watermark".into(), json!(self.feed.len() as u64 + 1));
        rev.comment = Some(CommentRef {
            comment_id,
            version: c.version,
            created_in_revision: c.created_in_revision,
            is_deleted: c.deleted,
            text: c.text.clone(),
        });
        let n = rev.rev;
        wi.revisions.push(rev);
        self.feed.push((id, n));
        if !o.suppress_notifications {
            self.events.push(Event {
                kind: "workitem.updated",
                id,
                rev: n,
                comment: None,
            });
        }
        Ok(c)
    }
}

fn comment_missing(id: u64) -> ApiError {
    ApiError::new(
        404,
        "CommentNotFoundException",
        format!("VS402612: Comment {id} was not found."),
    )
}
