//! The local work item the scripts see, its conversion from and to Azure DevOps JSON, and the
//! JSON Patch that turns one state of it into another.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::replica::{same_person, Person};

/// `System.Title`.
pub const FIELD_TITLE: &str = "System.Title";
/// `System.Description` (HTML).
pub const FIELD_DESCRIPTION: &str = "System.Description";
/// `System.Tags` (`; `-separated).
pub const FIELD_TAGS: &str = "System.Tags";
/// `System.State`.
pub const FIELD_STATE: &str = "System.State";
/// `Microsoft.VSTS.Common.Priority` (an integer).
pub const FIELD_PRIORITY: &str = "Microsoft.VSTS.Common.Priority";
/// `System.WorkItemType`.
pub const FIELD_TYPE: &str = "System.WorkItemType";
/// `System.TeamProject`.
pub const FIELD_PROJECT: &str = "System.TeamProject";
/// `System.AssignedTo` (an identity).
pub const FIELD_ASSIGNED_TO: &str = "System.AssignedTo";
/// `System.CreatedBy` (an identity, set by the tracker).
pub const FIELD_CREATED_BY: &str = "System.CreatedBy";
/// The relation type of an attachment.
pub const REL_ATTACHED_FILE: &str = "AttachedFile";
/// The relation type of a link to a URL.
pub const REL_HYPERLINK: &str = "Hyperlink";
/// The prefix of the relation types of links between work items.
pub const REL_WORK_ITEM_LINK: &str = "System.LinkTypes.";
/// The relation type naming an item's parent.
pub const REL_PARENT: &str = "System.LinkTypes.Hierarchy-Reverse";

/// Fields with their own place in [`WorkItem`]; every other field is a custom field.
const MAPPED_FIELDS: &[&str] = &[
    "System.Id",
    "System.Rev",
    FIELD_TYPE,
    FIELD_PROJECT,
    FIELD_TITLE,
    FIELD_DESCRIPTION,
    FIELD_TAGS,
    FIELD_STATE,
    FIELD_PRIORITY,
    FIELD_ASSIGNED_TO,
    FIELD_CREATED_BY,
];

/// A work item as the scripts see it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkItem {
    /// Its id; `None` before it is created.
    pub id: Option<u64>,
    /// Its revision; `None` before it is created.
    pub rev: Option<u64>,
    /// Work item type (`System.WorkItemType`).
    pub type_name: String,
    /// Project (`System.TeamProject`).
    pub project_key: String,
    /// `System.Title`.
    pub summary: String,
    /// `System.Description`, HTML.
    pub description: String,
    /// `System.Tags`, normalised by [`normalize_labels`].
    pub labels: Vec<String>,
    /// Comments, oldest first (read through the comments API, not the fields).
    pub comments: Vec<WorkComment>,
    /// Attachments (`AttachedFile` relations).
    pub attachments: Vec<WorkAttachment>,
    /// `System.State`.
    pub status: Option<String>,
    /// `Microsoft.VSTS.Common.Priority`.
    pub priority: Option<i64>,
    /// `System.AssignedTo`.
    pub assignee: Option<Person>,
    /// `System.CreatedBy` (read only).
    pub creator: Option<Person>,
    /// Every other field, by reference name.
    pub custom_fields: BTreeMap<String, Value>,
    /// Its links to other work items (`System.LinkTypes.*` relations).
    pub links: Vec<WorkLink>,
    /// The URLs of its `Hyperlink` relations (read only: relay's create marker is one).
    pub hyperlinks: Vec<String>,
}

/// A comment on a work item.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkComment {
    /// Its local id; `None` for a comment still to add.
    pub id: Option<String>,
    /// For a comment relay copied from the other side: that side's comment id. Such comments
    /// are never sent back (no echo), and merging skips remote comments already copied.
    pub remote_id: Option<String>,
    /// Author's display name.
    pub author_name: String,
    /// Author's e-mail or unique name.
    pub author_email: String,
    /// When (RFC 3339).
    pub created: String,
    /// HTML body.
    pub body: String,
}

/// An attachment of a work item.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkAttachment {
    /// Its local id (the attachment GUID); `None` for one still to attach.
    pub id: Option<String>,
    /// For an attachment relay copied from the other side: that side's id.
    pub remote_id: Option<String>,
    /// File name.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type.
    pub mime: String,
    /// SHA-256 of the bytes, hex; empty when not yet known.
    pub sha256: String,
    /// The attachment URL; set by the upload before a patch adds the relation.
    pub url: Option<String>,
    /// Position in the item's `relations`, for a remove.
    pub relation_index: Option<usize>,
}

/// A link from a work item to another one of the same tracker.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkLink {
    /// The link type's reference name (`System.LinkTypes.Hierarchy-Reverse`).
    pub rel: String,
    /// The other item's id.
    pub target: u64,
    /// The relation's URL; set before a patch adds it.
    pub url: Option<String>,
    /// Position in the item's `relations`, for a remove.
    pub relation_index: Option<usize>,
}

impl WorkLink {
    /// Whether both are the same link: the same type (in any case) to the same item.
    pub fn same(&self, other: &WorkLink) -> bool {
        self.target == other.target && self.rel.eq_ignore_ascii_case(&other.rel)
    }
}

/// The work item id a work item URL ends with (`…/_apis/wit/workItems/42`).
pub fn linked_id(url: &str) -> Option<u64> {
    let (head, id) = url.trim_end_matches('/').rsplit_once('/')?;
    head.to_ascii_lowercase()
        .ends_with("/workitems")
        .then(|| id.parse().ok())
        .flatten()
}

/// Why an Azure DevOps document could not be read as a work item.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdoError {
    /// A field has a shape the model cannot hold.
    #[error("work item field {field}: {message}")]
    Field {
        /// Reference name or JSON key.
        field: String,
        /// What was wrong.
        message: String,
    },
}

/// Why a patch could not be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatchError {
    /// An attachment to add has not been uploaded yet.
    #[error("attachment {0:?} must be uploaded before it is attached")]
    NotUploaded(String),
    /// A link to add has no URL of its target yet.
    #[error("the link {rel} to work item {target} has no URL")]
    LinkWithoutUrl {
        /// The link type.
        rel: String,
        /// The other item.
        target: u64,
    },
    /// An existing item without a revision cannot be updated safely.
    #[error("work item {0} has no revision to test")]
    NoRev(u64),
}

/// Splits `System.Tags` into labels.
pub fn split_tags(tags: &str) -> Vec<String> {
    normalize_labels(tags.split(';').map(str::to_string).collect())
}

/// Trims, drops empty ones, removes duplicates ignoring case (keeping the first spelling, as
/// Azure DevOps does) and sorts ignoring case, so two lists of the same tags compare equal.
pub fn normalize_labels(labels: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(labels.len());
    for label in labels {
        let label = label.trim();
        if label.is_empty() || out.iter().any(|l| l.to_lowercase() == label.to_lowercase()) {
            continue;
        }
        out.push(label.to_string());
    }
    out.sort_by_key(|l| l.to_lowercase());
    out
}

/// The attachment GUID in an attachment URL: its last path segment, without the query
/// (`…/_apis/wit/attachments/{id}?fileName=a.txt`).
pub fn attachment_id(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// Joins labels as `System.Tags` wants them.
pub fn join_tags(labels: &[String]) -> String {
    labels.join("; ")
}

impl WorkItem {
    /// Reads a work item as `GET _apis/wit/workitems/{id}?$expand=relations` returns it
    /// (`{id, rev, fields, relations}`). Comments come from their own API and stay empty.
    pub fn from_ado(doc: &Value) -> Result<WorkItem, AdoError> {
        let mut item = WorkItem {
            id: doc.get("id").and_then(Value::as_u64),
            rev: doc.get("rev").and_then(Value::as_u64),
            ..WorkItem::default()
        };
        if let Some(fields) = doc.get("fields") {
            let fields = fields
                .as_object()
                .ok_or_else(|| field_error("fields", "not an object"))?;
            item.apply_fields(fields)?;
        }
        if let Some(relations) = doc.get("relations").and_then(Value::as_array) {
            for (index, rel) in relations.iter().enumerate() {
                let url = rel.get("url").and_then(Value::as_str).unwrap_or_default();
                match rel.get("rel").and_then(Value::as_str) {
                    Some(REL_ATTACHED_FILE) => {}
                    Some(REL_HYPERLINK) => {
                        item.hyperlinks.push(url.to_owned());
                        continue;
                    }
                    Some(kind) if kind.starts_with(REL_WORK_ITEM_LINK) => {
                        if let Some(target) = linked_id(url) {
                            item.links.push(WorkLink {
                                rel: kind.to_owned(),
                                target,
                                url: Some(url.to_owned()),
                                relation_index: Some(index),
                            });
                        }
                        continue;
                    }
                    _ => continue,
                }
                let attrs = rel.get("attributes");
                let attr = |k: &str| attrs.and_then(|a| a.get(k));
                item.attachments.push(WorkAttachment {
                    // The attachment GUID is the URL's last segment.
                    id: Some(attachment_id(url).to_string()),
                    remote_id: None,
                    filename: attr("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                    size: attr("resourceSize").and_then(Value::as_u64).unwrap_or(0),
                    mime: String::new(),
                    sha256: String::new(),
                    url: Some(url.to_string()),
                    relation_index: Some(index),
                });
            }
        }
        Ok(item)
    }

    /// Reads the `fields` map of a work item into this one.
    pub fn apply_fields(&mut self, fields: &Map<String, Value>) -> Result<(), AdoError> {
        for (name, value) in fields {
            match name.as_str() {
                FIELD_TYPE => self.type_name = text(name, value)?,
                FIELD_PROJECT => self.project_key = text(name, value)?,
                FIELD_TITLE => self.summary = text(name, value)?,
                FIELD_DESCRIPTION => self.description = text(name, value)?,
                FIELD_TAGS => self.labels = split_tags(&text(name, value)?),
                FIELD_STATE => self.status = Some(text(name, value)?).filter(|s| !s.is_empty()),
                FIELD_PRIORITY => {
                    self.priority = match value {
                        Value::Null => None,
                        v => Some(v.as_i64().ok_or_else(|| field_error(name, "not an integer"))?),
                    }
                }
                FIELD_ASSIGNED_TO => self.assignee = person(name, value)?,
                FIELD_CREATED_BY => self.creator = person(name, value)?,
                "System.Id" | "System.Rev" => {}
                _ => {
                    self.custom_fields.insert(name.clone(), value.clone());
                }
            }
        }
        Ok(())
    }

    /// The `fields` map of this work item, as Azure DevOps returns it.
    pub fn to_ado_fields(&self) -> Map<String, Value> {
        let mut f = Map::new();
        let mut put = |k: &str, v: Value| {
            f.insert(k.to_string(), v);
        };
        if let Some(id) = self.id {
            put("System.Id", id.into());
        }
        if let Some(rev) = self.rev {
            put("System.Rev", rev.into());
        }
        if !self.type_name.is_empty() {
            put(FIELD_TYPE, self.type_name.clone().into());
        }
        if !self.project_key.is_empty() {
            put(FIELD_PROJECT, self.project_key.clone().into());
        }
        put(FIELD_TITLE, self.summary.clone().into());
        if !self.description.is_empty() {
            put(FIELD_DESCRIPTION, self.description.clone().into());
        }
        if !self.labels.is_empty() {
            put(FIELD_TAGS, join_tags(&self.labels).into());
        }
        if let Some(s) = &self.status {
            put(FIELD_STATE, s.clone().into());
        }
        if let Some(p) = self.priority {
            put(FIELD_PRIORITY, p.into());
        }
        for (field, who) in [(FIELD_ASSIGNED_TO, &self.assignee), (FIELD_CREATED_BY, &self.creator)] {
            if let Some(p) = who {
                put(
                    field,
                    json!({"displayName": p.display_name, "uniqueName": p.unique_name}),
                );
            }
        }
        for (k, v) in &self.custom_fields {
            if !MAPPED_FIELDS.contains(&k.as_str()) {
                put(k, v.clone());
            }
        }
        f
    }

    /// The work item document (`{id, rev, fields, relations}`), the inverse of
    /// [`WorkItem::from_ado`] but for comments.
    pub fn to_ado(&self) -> Value {
        let relations: Vec<Value> = self
            .attachments
            .iter()
            .filter_map(|a| {
                a.url.as_ref().map(|url| {
                    json!({"rel": REL_ATTACHED_FILE, "url": url,
                           "attributes": {"name": a.filename, "resourceSize": a.size}})
                })
            })
            .collect();
        let mut relations = relations;
        relations.extend(self.links.iter().filter_map(|l| {
            l.url
                .as_ref()
                .map(|url| json!({"rel": l.rel, "url": url, "attributes": {}}))
        }));
        json!({"id": self.id, "rev": self.rev, "fields": self.to_ado_fields(), "relations": relations})
    }
}

/// What to write to turn one state of a work item into another.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// For an item not yet created: its project and type (the create URL names both).
    pub create: Option<CreateTarget>,
    /// The JSON Patch document (`application/json-patch+json`); `None` when no field or
    /// relation changes, so nothing is written.
    pub patch: Option<Value>,
    /// Comments to add, oldest first, through the comments API or `System.History`
    /// (which one depends on the server version, so they are not patch operations).
    pub comments: Vec<WorkComment>,
    /// Comments relay copied here whose text changes (each with its id and the new body).
    pub comment_edits: Vec<WorkComment>,
    /// The ids of comments relay copied here whose original was deleted on the other side;
    /// a person's own comment is never deleted.
    pub comment_deletes: Vec<String>,
}

/// Project and type of an item to create.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateTarget {
    /// `System.TeamProject`.
    pub project: String,
    /// `System.WorkItemType`.
    pub type_name: String,
}

impl Plan {
    /// Whether there is nothing to write at all.
    pub fn is_empty(&self) -> bool {
        self.create.is_none()
            && self.patch.is_none()
            && self.comments.is_empty()
            && self.comment_edits.is_empty()
            && self.comment_deletes.is_empty()
    }
}

/// Builds the writes that turn `before` (the item as read, or [`WorkItem::default`] for one
/// to create) into `after` (what the incoming script wants). Project and type are used only
/// to create; an existing item keeps them.
pub fn build_patch(before: &WorkItem, after: &WorkItem) -> Result<Plan, PatchError> {
    let mut ops: Vec<Value> = Vec::new();
    let set_or_clear = |ops: &mut Vec<Value>, field: &str, old: Option<Value>, new: Option<Value>| {
        let path = format!("/fields/{field}");
        match (old, new) {
            (Some(o), Some(n)) if o == n => {}
            (Some(_), Some(n)) => ops.push(json!({"op": "replace", "path": path, "value": n})),
            (None, Some(n)) => ops.push(json!({"op": "add", "path": path, "value": n})),
            (Some(_), None) => ops.push(json!({"op": "remove", "path": path})),
            (None, None) => {}
        }
    };
    let non_empty = |s: &str| Some(Value::from(s)).filter(|_| !s.is_empty());
    set_or_clear(
        &mut ops,
        FIELD_TITLE,
        non_empty(&before.summary),
        non_empty(&after.summary),
    );
    set_or_clear(
        &mut ops,
        FIELD_DESCRIPTION,
        non_empty(&before.description),
        non_empty(&after.description),
    );
    let tags = |labels: &[String]| {
        let labels = normalize_labels(labels.to_vec());
        // Azure DevOps compares tags ignoring case: a change of case alone writes nothing.
        let key: Vec<String> = labels.iter().map(|l| l.to_lowercase()).collect();
        (!labels.is_empty()).then(|| (join_tags(&labels), key))
    };
    match (tags(&before.labels), tags(&after.labels)) {
        (Some((_, a)), Some((_, b))) if a == b => {}
        (old, new) => set_or_clear(
            &mut ops,
            FIELD_TAGS,
            old.map(|(t, _)| t.into()),
            new.map(|(t, _)| t.into()),
        ),
    }
    set_or_clear(
        &mut ops,
        FIELD_STATE,
        before.status.clone().map(Value::from),
        after.status.clone().map(Value::from),
    );
    set_or_clear(
        &mut ops,
        FIELD_PRIORITY,
        before.priority.map(Value::from),
        after.priority.map(Value::from),
    );
    // A person is written by unique name, the form every tracker resolves; a change of
    // display name alone writes nothing.
    if !same_person(before.assignee.as_ref(), after.assignee.as_ref()) {
        let name = |p: &Person| {
            if p.unique_name.is_empty() {
                p.display_name.clone()
            } else {
                p.unique_name.clone()
            }
        };
        set_or_clear(
            &mut ops,
            FIELD_ASSIGNED_TO,
            before.assignee.as_ref().map(|p| name(p).into()),
            after.assignee.as_ref().map(|p| name(p).into()),
        );
    }
    let custom = |item: &WorkItem, k: &str| item.custom_fields.get(k).filter(|v| !v.is_null()).cloned();
    let names: std::collections::BTreeSet<&String> = before
        .custom_fields
        .keys()
        .chain(after.custom_fields.keys())
        .filter(|k| !MAPPED_FIELDS.contains(&k.as_str()))
        .collect();
    for name in names {
        set_or_clear(&mut ops, name, custom(before, name), custom(after, name));
    }

    // Relations: removes from the highest index down, so earlier indices stay valid.
    let kept = |a: &WorkAttachment| after.attachments.iter().any(|b| b.id.is_some() && b.id == a.id);
    let mut removed: Vec<usize> = before
        .attachments
        .iter()
        .filter(|a| a.id.is_some() && !kept(a))
        .filter_map(|a| a.relation_index)
        .collect();
    removed.extend(
        before
            .links
            .iter()
            .filter(|l| !after.links.iter().any(|a| a.same(l)))
            .filter_map(|l| l.relation_index),
    );
    removed.sort_unstable_by(|a, b| b.cmp(a));
    removed.dedup();
    for index in removed {
        ops.push(json!({"op": "remove", "path": format!("/relations/{index}")}));
    }
    for a in after.attachments.iter().filter(|a| a.id.is_none()) {
        let url = a
            .url
            .as_ref()
            .ok_or_else(|| PatchError::NotUploaded(a.filename.clone()))?;
        ops.push(json!({"op": "add", "path": "/relations/-", "value": {
            "rel": REL_ATTACHED_FILE, "url": url, "attributes": {"name": a.filename}}}));
    }

    for l in after.links.iter().filter(|l| !before.links.iter().any(|b| b.same(l))) {
        let url = l.url.as_ref().ok_or_else(|| PatchError::LinkWithoutUrl {
            rel: l.rel.clone(),
            target: l.target,
        })?;
        ops.push(json!({"op": "add", "path": "/relations/-", "value": {"rel": l.rel, "url": url}}));
    }

    let create = before.id.is_none().then(|| CreateTarget {
        project: after.project_key.clone(),
        type_name: after.type_name.clone(),
    });
    let patch = if ops.is_empty() && create.is_none() {
        None
    } else {
        if let Some(id) = before.id {
            // Optimistic concurrency: a change made since the read is answered 412, not lost.
            let rev = before.rev.ok_or(PatchError::NoRev(id))?;
            ops.insert(0, json!({"op": "test", "path": "/rev", "value": rev}));
        }
        Some(Value::Array(ops))
    };
    let comments = after.comments.iter().filter(|c| c.id.is_none()).cloned().collect();
    let comment_edits = after
        .comments
        .iter()
        .filter(|c| {
            c.id.is_some() && c.remote_id.is_some() && before.comments.iter().any(|b| b.id == c.id && b.body != c.body)
        })
        .cloned()
        .collect();
    let comment_deletes = before
        .comments
        .iter()
        .filter(|b| b.remote_id.is_some() && !after.comments.iter().any(|c| c.id.is_some() && c.id == b.id))
        .filter_map(|b| b.id.clone())
        .collect();
    Ok(Plan {
        create,
        patch,
        comments,
        comment_edits,
        comment_deletes,
    })
}

/// An identity field as Azure DevOps returns it: an `IdentityRef` object (work item reads from
/// 5.0 on), or a `Name <unique>` string (the reporting feed, older versions).
fn person(field: &str, value: &Value) -> Result<Option<Person>, AdoError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Person::parse(s)),
        Value::Object(o) => {
            let text = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default();
            Person::from_names(text("displayName"), text("uniqueName"))
                .map(Some)
                .ok_or_else(|| field_error(field, "an identity without displayName or uniqueName"))
        }
        _ => Err(field_error(field, "not an identity")),
    }
}

fn field_error(field: &str, message: &str) -> AdoError {
    AdoError::Field {
        field: field.to_string(),
        message: message.to_string(),
    }
}

fn text(field: &str, value: &Value) -> Result<String, AdoError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        _ => Err(field_error(field, "not a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ado_doc() -> Value {
        json!({
            "id": 12, "rev": 4,
            "fields": {
                "System.Id": 12, "System.Rev": 4,
                "System.WorkItemType": "Bug", "System.TeamProject": "Contoso",
                "System.Title": "Crash", "System.Description": "<p>boom</p>",
                "System.Tags": " ui;Backend ; UI;; api", "System.State": "Active",
                "Microsoft.VSTS.Common.Priority": 2, "Custom.Points": 3.5,
            },
            "relations": [
                {"rel": "System.LinkTypes.Related", "url": "https://x/_apis/wit/workItems/9"},
                {"rel": "AttachedFile", "url": "https://x/_apis/wit/attachments/g-1",
                 "attributes": {"name": "log.txt", "resourceSize": 10}}
            ]
        })
    }

    #[test]
    fn reads_ado_document() {
        let w = WorkItem::from_ado(&ado_doc()).unwrap();
        assert_eq!((w.id, w.rev), (Some(12), Some(4)));
        assert_eq!(w.type_name, "Bug");
        assert_eq!(w.project_key, "Contoso");
        assert_eq!(w.labels, vec!["api", "Backend", "ui"]);
        assert_eq!(w.status.as_deref(), Some("Active"));
        assert_eq!(w.priority, Some(2));
        assert_eq!(w.custom_fields["Custom.Points"], json!(3.5));
        assert_eq!(w.attachments.len(), 1);
        assert_eq!(w.attachments[0].id.as_deref(), Some("g-1"));
        assert_eq!(w.attachments[0].relation_index, Some(1));
        // And back: the fields survive a round trip.
        let again = WorkItem::from_ado(&w.to_ado()).unwrap();
        assert_eq!(again.summary, w.summary);
        assert_eq!(again.labels, w.labels);
        assert_eq!(again.custom_fields, w.custom_fields);
        assert_eq!(w.to_ado_fields()["System.Tags"], json!("api; Backend; ui"));
    }

    #[test]
    fn refuses_a_field_of_the_wrong_shape() {
        let err = WorkItem::from_ado(&json!({"fields": {"System.Title": {"a": 1}}})).unwrap_err();
        assert!(err.to_string().contains("System.Title"), "{err}");
    }

    #[test]
    fn people_read_from_identity_refs_and_strings_and_are_written_by_unique_name() {
        let w = WorkItem::from_ado(&json!({"id": 1, "rev": 2, "fields": {
            "System.AssignedTo": {"displayName": "Smith, Ann", "uniqueName": "ann@contoso.com", "id": "g"},
            "System.CreatedBy": "Bob <bob@contoso.com>",
        }}))
        .unwrap();
        let ann = Person {
            display_name: "Smith, Ann".into(),
            unique_name: "ann@contoso.com".into(),
        };
        assert_eq!(w.assignee.as_ref(), Some(&ann));
        assert_eq!(
            w.creator.as_ref().map(|p| p.unique_name.as_str()),
            Some("bob@contoso.com")
        );
        assert!(w.custom_fields.is_empty(), "{:?}", w.custom_fields);
        let err = WorkItem::from_ado(&json!({"fields": {"System.AssignedTo": 7}})).unwrap_err();
        assert!(err.to_string().contains("System.AssignedTo"), "{err}");

        // Another display name of the same person writes nothing.
        let mut same = w.clone();
        same.assignee = Some(Person {
            display_name: "Ann Smith".into(),
            unique_name: "ANN@contoso.com".into(),
        });
        assert!(build_patch(&w, &same).unwrap().patch.is_none());
        let mut other = w.clone();
        other.assignee = Person::parse("zed@contoso.com");
        let patch = build_patch(&w, &other).unwrap().patch.unwrap();
        assert_eq!(
            patch[1],
            json!({"op": "replace", "path": "/fields/System.AssignedTo", "value": "zed@contoso.com"})
        );
        let mut none = w.clone();
        none.assignee = None;
        let patch = build_patch(&w, &none).unwrap().patch.unwrap();
        assert_eq!(patch[1], json!({"op": "remove", "path": "/fields/System.AssignedTo"}));
    }

    #[test]
    fn links_are_read_from_relations_and_added_and_removed_by_patch() {
        let base = "https://dev.azure.com/contoso/_apis/wit/workItems";
        let w = WorkItem::from_ado(&json!({"id": 5, "rev": 3, "fields": {}, "relations": [
            {"rel": "AttachedFile", "url": "https://dev.azure.com/contoso/_apis/wit/attachments/g-1", "attributes": {"name": "a.txt"}},
            {"rel": REL_PARENT, "url": format!("{base}/40"), "attributes": {}},
            {"rel": "System.LinkTypes.Related", "url": format!("{base}/41"), "attributes": {}},
            {"rel": "ArtifactLink", "url": "vstfs:///Git/Commit/abc", "attributes": {}},
        ]}))
        .unwrap();
        let got: Vec<(&str, u64, Option<usize>)> = w
            .links
            .iter()
            .map(|l| (l.rel.as_str(), l.target, l.relation_index))
            .collect();
        assert_eq!(
            got,
            [(REL_PARENT, 40, Some(1)), ("System.LinkTypes.Related", 41, Some(2))]
        );
        assert_eq!(linked_id(&format!("{base}/40/")), Some(40));
        assert_eq!(linked_id("https://x/_apis/wit/attachments/40"), None);

        // The related link and the attachment go (highest index first), a child link comes.
        let mut after = w.clone();
        after.links.retain(|l| l.rel == REL_PARENT);
        after.attachments.clear();
        after.links.push(WorkLink {
            rel: "System.LinkTypes.Hierarchy-Forward".into(),
            target: 42,
            url: Some(format!("{base}/42")),
            relation_index: None,
        });
        let patch = build_patch(&w, &after).unwrap().patch.unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/rev", "value": 3},
                {"op": "remove", "path": "/relations/2"},
                {"op": "remove", "path": "/relations/0"},
                {"op": "add", "path": "/relations/-", "value": {"rel": "System.LinkTypes.Hierarchy-Forward", "url": format!("{base}/42")}},
            ])
        );
        // The same link in another case writes nothing; one without a URL is refused.
        let mut same = w.clone();
        same.links[0].rel = REL_PARENT.to_lowercase();
        assert!(build_patch(&w, &same).unwrap().patch.is_none());
        let mut no_url = w.clone();
        no_url.links.push(WorkLink {
            rel: REL_PARENT.into(),
            target: 9,
            ..WorkLink::default()
        });
        assert!(matches!(
            build_patch(&w, &no_url),
            Err(PatchError::LinkWithoutUrl { target: 9, .. })
        ));
    }

    #[test]
    fn empty_diff_is_no_patch() {
        let w = WorkItem::from_ado(&ado_doc()).unwrap();
        let mut same = w.clone();
        same.labels = vec!["UI".into(), "backend".into(), "API".into()];
        let plan = build_patch(&w, &same).unwrap();
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn patch_tests_rev_first_and_covers_each_change() {
        let before = WorkItem::from_ado(&ado_doc()).unwrap();
        let mut after = before.clone();
        after.summary = "Crash on login".into();
        after.description.clear();
        after.labels.push("new".into());
        after.priority = Some(1);
        after.custom_fields.remove("Custom.Points");
        after.custom_fields.insert("Custom.Team".into(), json!("Blue"));
        after.attachments.clear();
        after.attachments.push(WorkAttachment {
            filename: "new.png".into(),
            url: Some("https://x/_apis/wit/attachments/g-2".into()),
            ..WorkAttachment::default()
        });
        after.comments.push(WorkComment {
            remote_id: Some("r1".into()),
            body: "hi".into(),
            ..WorkComment::default()
        });
        let plan = build_patch(&before, &after).unwrap();
        assert!(plan.create.is_none());
        let ops = plan.patch.unwrap();
        let ops = ops.as_array().unwrap();
        assert_eq!(ops[0], json!({"op": "test", "path": "/rev", "value": 4}));
        let has = |op: Value| assert!(ops.contains(&op), "missing {op} in {ops:?}");
        has(json!({"op": "replace", "path": "/fields/System.Title", "value": "Crash on login"}));
        has(json!({"op": "remove", "path": "/fields/System.Description"}));
        has(json!({"op": "replace", "path": "/fields/System.Tags", "value": "api; Backend; new; ui"}));
        has(json!({"op": "replace", "path": "/fields/Microsoft.VSTS.Common.Priority", "value": 1}));
        has(json!({"op": "remove", "path": "/fields/Custom.Points"}));
        has(json!({"op": "add", "path": "/fields/Custom.Team", "value": "Blue"}));
        has(json!({"op": "remove", "path": "/relations/1"}));
        has(
            json!({"op": "add", "path": "/relations/-", "value": {"rel": "AttachedFile",
            "url": "https://x/_apis/wit/attachments/g-2", "attributes": {"name": "new.png"}}}),
        );
        assert_eq!(ops.len(), 9);
        assert_eq!(plan.comments.len(), 1);
        assert_eq!(plan.comments[0].remote_id.as_deref(), Some("r1"));
    }

    #[test]
    fn comments_alone_write_no_patch() {
        let before = WorkItem::from_ado(&ado_doc()).unwrap();
        let mut after = before.clone();
        after.comments.push(WorkComment {
            body: "x".into(),
            ..WorkComment::default()
        });
        let plan = build_patch(&before, &after).unwrap();
        assert!(plan.patch.is_none());
        assert_eq!(plan.comments.len(), 1);
    }

    #[test]
    fn create_has_target_and_no_rev_test() {
        let after = WorkItem {
            type_name: "Task".into(),
            project_key: "Fabrikam".into(),
            summary: "New".into(),
            labels: vec!["a".into(), "b".into()],
            ..WorkItem::default()
        };
        let plan = build_patch(&WorkItem::default(), &after).unwrap();
        assert_eq!(
            plan.create,
            Some(CreateTarget {
                project: "Fabrikam".into(),
                type_name: "Task".into()
            })
        );
        assert_eq!(
            plan.patch.unwrap(),
            json!([{"op": "add", "path": "/fields/System.Title", "value": "New"},
                   {"op": "add", "path": "/fields/System.Tags", "value": "a; b"}])
        );
    }

    #[test]
    fn attachment_must_be_uploaded_first() {
        let mut after = WorkItem::from_ado(&ado_doc()).unwrap();
        let before = after.clone();
        after.attachments.push(WorkAttachment {
            filename: "x.bin".into(),
            ..Default::default()
        });
        assert_eq!(
            build_patch(&before, &after),
            Err(PatchError::NotUploaded("x.bin".into()))
        );
    }
}
