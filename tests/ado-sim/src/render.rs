//! Turns stored data into the JSON the API answers: work items (with `fields`, `$expand` and
//! identity references), comments of both comment APIs, and identity references.

use serde_json::{json, Map, Value};

use crate::clock;
use crate::model::{Comment, Identity, Kind, Revision, WorkItem};
use crate::store::{render_markdown, Store};

/// What `$expand` asks for on work item reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expand {
    /// Fields and links (the default).
    None,
    /// Also relations.
    Relations,
    /// Fields only.
    Fields,
    /// Links.
    Links,
    /// Everything.
    All,
}

impl Expand {
    /// Parses the query value, case-insensitively; unknown values are `None`.
    pub fn parse(s: Option<&str>) -> Option<Expand> {
        Some(match s.map(str::to_ascii_lowercase).as_deref() {
            None | Some("none") => Expand::None,
            Some("relations") => Expand::Relations,
            Some("fields") => Expand::Fields,
            Some("links") => Expand::Links,
            Some("all") => Expand::All,
            Some(_) => return None,
        })
    }
}

/// A stable pseudo-GUID for an identity, derived from its unique name.
pub fn identity_id(unique: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, unique.to_lowercase().as_bytes());
    let h = data_encoding::HEXLOWER.encode(&d.as_ref()[..16]);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// An `IdentityRef` as work item reads and comments carry it.
pub fn identity_ref(store: &Store, combined: &str) -> Value {
    let who = Identity::parse(combined);
    let id = identity_id(&who.unique_name);
    json!({
        "displayName": who.display_name,
        "url": format!("{}/_apis/Identities/{id}", store.base_url),
        "_links": {"avatar": {"href": format!("{}/_apis/GraphProfile/MemberAvatars/sim.{id}", store.base_url)}},
        "id": id,
        "uniqueName": who.unique_name,
        "imageUrl": format!("{}/_api/_common/identityImage?id={id}", store.base_url),
        "descriptor": format!("sim.{id}"),
    })
}

/// A field value as a work item read shows it (identities become `IdentityRef`s).
fn field_value(store: &Store, name: &str, v: &Value) -> Value {
    match store.field(name).map(|f| f.kind) {
        Some(Kind::Identity) => v.as_str().map(|s| identity_ref(store, s)).unwrap_or(Value::Null),
        _ => v.clone(),
    }
}

/// A work item at one revision, as GET / POST / PATCH answer it. `fields` limits the fields
/// (and then `System.Id`/`System.Rev` appear when asked); without it every set field but
/// the id and rev is shown, as the service does.
pub fn work_item(store: &Store, wi: &WorkItem, r: &Revision, fields: Option<&[String]>, expand: Expand) -> Value {
    let mut f = Map::new();
    match fields {
        Some(list) => {
            for name in list {
                let canon = store
                    .field(name)
                    .map(|d| d.reference.clone())
                    .unwrap_or_else(|| name.clone());
                if let Some(v) = r.fields.get(&canon) {
                    f.insert(canon.clone(), field_value(store, &canon, v));
                }
            }
        }
        None => {
            for (k, v) in &r.fields {
                if k == "System.Id" || k == "System.Rev" || k == "System.AuthorizedDate" || k == "System.Watermark" {
                    continue;
                }
                f.insert(k.clone(), field_value(store, k, v));
            }
        }
    }
    let url = store.item_url(wi.id);
    let mut out = Map::new();
    out.insert("id".into(), json!(wi.id));
    out.insert("rev".into(), json!(r.rev));
    out.insert("fields".into(), Value::Object(f));
    if matches!(expand, Expand::Relations | Expand::All) {
        let rels: Vec<Value> = r
            .relations
            .iter()
            .map(|x| json!({"rel": x.rel, "url": x.url, "attributes": x.attributes}))
            .collect();
        out.insert("relations".into(), Value::Array(rels));
    }
    if let Some(c) = &r.comment {
        out.insert(
            "commentVersionRef".into(),
            json!({
                "commentId": c.comment_id,
                "version": c.version,
                "createdInRevision": c.created_in_revision,
                "isDeleted": c.is_deleted,
                "text": c.text,
                "url": format!("{url}/comments/{}/versions/{}", c.comment_id, c.version),
            }),
        );
    }
    if fields.is_none() && expand != Expand::Fields {
        let project = store.projects.iter().find(|p| p.id == wi.project_id);
        let type_name = r
            .fields
            .get("System.WorkItemType")
            .and_then(Value::as_str)
            .unwrap_or("");
        out.insert(
            "_links".into(),
            json!({
                "self": {"href": url},
                "workItemUpdates": {"href": format!("{url}/updates")},
                "workItemRevisions": {"href": format!("{url}/revisions")},
                "workItemComments": {"href": format!("{url}/comments")},
                "html": {"href": format!("{}/{}/_workitems/edit/{}", store.base_url, project.map(|p| p.name.as_str()).unwrap_or(""), wi.id)},
                "workItemType": {"href": format!("{}/{}/_apis/wit/workItemTypes/{}", store.base_url, wi.project_id, type_name.replace(' ', "%20"))},
                "fields": {"href": format!("{}/{}/_apis/wit/fields", store.base_url, wi.project_id)},
            }),
        );
    }
    out.insert("url".into(), json!(url));
    Value::Object(out)
}

/// A revision of the reporting feed: `{id, rev, fields}` with identities as `Name <unique>`
/// strings (or `{id, uniqueName}` with `includeIdentityRef`), long text only with
/// `$expand=fields`, and `System.RevisedDate` (the next revision's date, or the end of time).
pub fn reporting_revision(
    store: &Store,
    wi: &WorkItem,
    rev: u32,
    fields: Option<&[String]>,
    long_text: bool,
    identity_ref: bool,
) -> Value {
    let r = &wi.revisions[(rev - 1) as usize];
    let revised = wi
        .revisions
        .get(rev as usize)
        .map(|n| clock::format(n.changed_ms))
        .unwrap_or_else(|| clock::END_OF_TIME.to_string());
    let mut all = r.fields.clone();
    all.insert("System.RevisedDate".into(), json!(revised));
    all.remove("System.AuthorizedDate");
    let mut f = Map::new();
    let wanted: Vec<String> = match fields {
        Some(list) => list
            .iter()
            .map(|n| store.field(n).map(|d| d.reference.clone()).unwrap_or_else(|| n.clone()))
            .collect(),
        None => all.keys().cloned().collect(),
    };
    for k in wanted {
        let Some(v) = all.get(&k) else { continue };
        let kind = store.field(&k).map(|d| d.kind);
        if kind.is_some_and(Kind::is_long_text) && k != crate::model::TAGS && !long_text {
            continue;
        }
        let v = match kind {
            // The specification: "an identity reference instead of a string value".
            Some(Kind::Identity) if identity_ref => self::identity_ref(store, v.as_str().unwrap_or("")),
            _ => v.clone(),
        };
        f.insert(k, v);
    }
    json!({"id": wi.id, "rev": rev, "fields": f})
}

/// A comment of the 7.x/6.0 comments API.
pub fn comment(store: &Store, wi_id: u64, c: &Comment, rendered: bool) -> Value {
    let mut out = Map::new();
    out.insert("workItemId".into(), json!(wi_id));
    out.insert("id".into(), json!(c.id));
    out.insert("version".into(), json!(c.version));
    out.insert("text".into(), json!(c.text));
    if store.profile.has_comment_format() {
        out.insert("format".into(), json!(c.format));
    }
    // Only the 7.1 schema has `renderedText` (and `format`).
    if rendered && store.profile.has_comment_format() {
        let html = if c.format == "markdown" {
            render_markdown(&c.text)
        } else {
            c.text.clone()
        };
        out.insert("renderedText".into(), json!(html));
    }
    out.insert("createdBy".into(), identity_ref(store, &c.created_by));
    out.insert("createdDate".into(), json!(clock::format(c.created_ms)));
    out.insert("modifiedBy".into(), identity_ref(store, &c.modified_by));
    out.insert("modifiedDate".into(), json!(clock::format(c.modified_ms)));
    out.insert("isDeleted".into(), json!(c.deleted));
    out.insert("mentions".into(), json!([]));
    out.insert("reactions".into(), json!([]));
    out.insert(
        "url".into(),
        json!(format!("{}/comments/{}", store.item_url(wi_id), c.id)),
    );
    Value::Object(out)
}

/// The 5.0 comments view: every revision that wrote `System.History`.
pub fn history_comments(store: &Store, wi: &WorkItem) -> Vec<(u32, Value)> {
    wi.revisions
        .iter()
        .filter_map(|r| {
            let text = r.fields.get("System.History")?.as_str()?;
            let by = r.fields.get("System.ChangedBy").and_then(Value::as_str).unwrap_or("");
            Some((
                r.rev,
                json!({
                    "revision": r.rev,
                    "text": text,
                    "revisedBy": identity_ref(store, by),
                    "revisedDate": clock::format(r.changed_ms),
                    "url": format!("{}/comments/{}", store.item_url(wi.id), r.rev),
                }),
            ))
        })
        .collect()
}
