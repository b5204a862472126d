//! Values in and out of scripts: work items, entities and replicas as Rhai maps, and back,
//! where anything a field cannot hold is an error naming the field.

use std::collections::BTreeMap;

use rhai::{Array, Dynamic, Map};
use serde_json::Value;

use super::super::replica::{
    same_person, Attachment, Author, Comment, Entity, Link, Person, Replica, Text, TextFormat,
};
use super::super::workitem::{
    normalize_labels, WorkAttachment, WorkComment, WorkItem, WorkLink, REL_PARENT, REL_WORK_ITEM_LINK,
};
use super::helpers::to_html;
use super::{ScriptError, Section};

/// A value that could not be mapped, before it knows which script.
#[derive(Debug)]
pub(super) struct MapError {
    field: String,
    message: String,
}

impl MapError {
    fn new(field: &str, message: impl Into<String>) -> MapError {
        MapError {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(super) fn in_script(self, script: Section) -> ScriptError {
        ScriptError::Unmappable {
            script,
            field: self.field,
            message: self.message,
        }
    }
}

fn opt_str(v: Option<&str>) -> Dynamic {
    v.map_or(Dynamic::UNIT, |s| s.into())
}

fn labels_array(labels: &[String]) -> Dynamic {
    Dynamic::from_array(labels.iter().map(|l| l.as_str().into()).collect())
}

fn author_map(name: &str, email: &str) -> Dynamic {
    let mut m = Map::new();
    m.insert("displayName".into(), name.into());
    m.insert("email".into(), email.into());
    Dynamic::from_map(m)
}

fn person_value(p: Option<&Person>) -> Dynamic {
    p.map_or(Dynamic::UNIT, |p| {
        let mut m = Map::new();
        m.insert("displayName".into(), p.display_name.as_str().into());
        m.insert("uniqueName".into(), p.unique_name.as_str().into());
        Dynamic::from_map(m)
    })
}

/// A person a script set: `()`, a map `#{displayName, uniqueName}` (either may be missing),
/// or a string, `Name <unique>` or a bare unique name.
fn person(v: &Dynamic, field: &str) -> Result<Option<Person>, MapError> {
    if v.is_unit() {
        return Ok(None);
    }
    if v.is_string() {
        return Ok(Person::parse(&v.to_string()));
    }
    let m = fields(v, field, &["displayName", "uniqueName"])
        .map_err(|_| found(field, "a person (#{displayName, uniqueName}, a unique name or ())", v))?;
    let part = |k: &str| {
        m.get(k)
            .map_or(Ok(None), |x| opt_string(x, &format!("{field}.{k}")))
            .map(Option::unwrap_or_default)
    };
    Ok(Person::from_names(&part("displayName")?, &part("uniqueName")?))
}

pub(super) fn work_item_map(w: &WorkItem) -> Map {
    let mut m = Map::new();
    let int = |v: Option<u64>| v.map_or(Dynamic::UNIT, |v| Dynamic::from_int(v as i64));
    m.insert("id".into(), int(w.id));
    m.insert("rev".into(), int(w.rev));
    m.insert("typeName".into(), w.type_name.as_str().into());
    m.insert("projectKey".into(), w.project_key.as_str().into());
    m.insert("summary".into(), w.summary.as_str().into());
    m.insert("description".into(), w.description.as_str().into());
    m.insert("labels".into(), labels_array(&w.labels));
    let comments = w
        .comments
        .iter()
        .map(|c| {
            let mut cm = Map::new();
            cm.insert("id".into(), opt_str(c.id.as_deref()));
            cm.insert("remoteId".into(), opt_str(c.remote_id.as_deref()));
            cm.insert("author".into(), author_map(&c.author_name, &c.author_email));
            cm.insert("created".into(), c.created.as_str().into());
            cm.insert("body".into(), c.body.as_str().into());
            Dynamic::from_map(cm)
        })
        .collect();
    m.insert("comments".into(), Dynamic::from_array(comments));
    let attachments = w
        .attachments
        .iter()
        .map(|a| {
            let mut am = Map::new();
            am.insert("id".into(), opt_str(a.id.as_deref()));
            am.insert("remoteId".into(), opt_str(a.remote_id.as_deref()));
            am.insert("filename".into(), a.filename.as_str().into());
            am.insert("size".into(), Dynamic::from_int(a.size as i64));
            am.insert("mime".into(), a.mime.as_str().into());
            am.insert("sha256".into(), a.sha256.as_str().into());
            am.insert("url".into(), opt_str(a.url.as_deref()));
            Dynamic::from_map(am)
        })
        .collect();
    m.insert("attachments".into(), Dynamic::from_array(attachments));
    m.insert("status".into(), opt_str(w.status.as_deref()));
    m.insert("priority".into(), w.priority.map_or(Dynamic::UNIT, Dynamic::from_int));
    m.insert("assignee".into(), person_value(w.assignee.as_ref()));
    m.insert("creator".into(), person_value(w.creator.as_ref()));
    let links = w
        .links
        .iter()
        .map(|l| {
            let mut lm = Map::new();
            lm.insert("rel".into(), l.rel.as_str().into());
            lm.insert("id".into(), Dynamic::from_int(l.target as i64));
            lm.insert("url".into(), opt_str(l.url.as_deref()));
            Dynamic::from_map(lm)
        })
        .collect();
    m.insert("links".into(), Dynamic::from_array(links));
    for (key, field) in PATH_FIELDS {
        let path = w.custom_fields.get(field).and_then(Value::as_str);
        m.insert(key.into(), opt_str(path));
    }
    m.insert("customFields".into(), custom_map(&w.custom_fields));
    m
}

pub(super) fn entity_map(e: &Entity) -> Map {
    let mut m = Map::new();
    m.insert("key".into(), e.key.as_str().into());
    m.insert("type".into(), e.type_name.as_str().into());
    m.insert("summary".into(), e.summary.as_str().into());
    m.insert("description".into(), e.description.text.as_str().into());
    m.insert("descriptionFormat".into(), e.description.format.as_str().into());
    m.insert("labels".into(), labels_array(&e.labels));
    m.insert(
        "comments".into(),
        Dynamic::from_array(e.comments.iter().map(comment_value).collect()),
    );
    let attachments = e
        .attachments
        .iter()
        .map(|a| {
            let mut am = Map::new();
            am.insert("id".into(), a.id.as_str().into());
            am.insert("filename".into(), a.filename.as_str().into());
            am.insert("size".into(), Dynamic::from_int(a.size as i64));
            am.insert("mime".into(), a.mime.as_str().into());
            am.insert("sha256".into(), a.sha256.as_str().into());
            Dynamic::from_map(am)
        })
        .collect();
    m.insert("attachments".into(), Dynamic::from_array(attachments));
    m.insert("status".into(), opt_str(e.status.as_deref()));
    m.insert("priority".into(), opt_str(e.priority.as_deref()));
    m.insert("assignee".into(), person_value(e.assignee.as_ref()));
    m.insert("creator".into(), person_value(e.creator.as_ref()));
    let links = e
        .links
        .iter()
        .map(|l| {
            let mut lm = Map::new();
            lm.insert("rel".into(), l.rel.as_str().into());
            lm.insert("key".into(), l.key.as_str().into());
            Dynamic::from_map(lm)
        })
        .collect();
    m.insert("links".into(), Dynamic::from_array(links));
    m.insert("parentId".into(), opt_str(parent_key(&e.links)));
    m.insert("customFields".into(), custom_map(&e.custom_fields));
    m
}

/// The key of the parent among `links`, if there is one.
fn parent_key(links: &[Link]) -> Option<&str> {
    links
        .iter()
        .find(|l| l.rel.eq_ignore_ascii_case(REL_PARENT))
        .map(|l| l.key.as_str())
}

/// A link type a script gave: a work item link's reference name.
fn link_rel(v: &Dynamic, field: &str) -> Result<String, MapError> {
    let rel = string(v, field)?;
    if !rel.starts_with(REL_WORK_ITEM_LINK) {
        return Err(MapError::new(
            field,
            format!("{rel:?} is not a work item link type ({REL_WORK_ITEM_LINK}…, such as {REL_PARENT})"),
        ));
    }
    Ok(rel)
}

fn comment_value(c: &Comment) -> Dynamic {
    let mut cm = Map::new();
    cm.insert("id".into(), c.id.as_str().into());
    cm.insert("author".into(), author_map(&c.author.display_name, &c.author.email));
    cm.insert("created".into(), c.created.as_str().into());
    cm.insert("body".into(), c.body.text.as_str().into());
    cm.insert("format".into(), c.body.format.as_str().into());
    Dynamic::from_map(cm)
}

pub(super) fn replica_value(r: &Replica) -> Dynamic {
    let mut m = entity_map(&r.entity);
    m.insert("origin".into(), origin_map(r));
    Dynamic::from_map(m)
}

pub(super) fn origin_map(r: &Replica) -> Dynamic {
    let o = &r.origin;
    let mut m = Map::new();
    m.insert("instance".into(), o.instance.as_str().into());
    m.insert("project".into(), o.project.as_str().into());
    m.insert("id".into(), Dynamic::from_int(o.id as i64));
    m.insert("rev".into(), Dynamic::from_int(o.rev as i64));
    m.insert("url".into(), o.url.as_str().into());
    m.insert("changedAt".into(), o.changed_at.as_str().into());
    Dynamic::from_map(m)
}

/// `replica.addedComments` and `replica.removedComments`, by comment id against the previous
/// replica (every comment is new on a first replica).
pub(super) fn added_removed(m: &mut Map, now: &Entity, previous: Option<&Entity>) {
    let before: &[Comment] = previous.map_or(&[], |p| &p.comments);
    let added = now
        .comments
        .iter()
        .filter(|c| !before.iter().any(|b| b.id == c.id))
        .map(comment_value)
        .collect();
    let removed = before
        .iter()
        .filter(|b| !now.comments.iter().any(|c| c.id == b.id))
        .map(comment_value)
        .collect();
    let edited = now
        .comments
        .iter()
        .filter(|c| before.iter().any(|b| b.id == c.id && b.body != c.body))
        .map(comment_value)
        .collect();
    m.insert("addedComments".into(), Dynamic::from_array(added));
    m.insert("removedComments".into(), Dynamic::from_array(removed));
    m.insert("editedComments".into(), Dynamic::from_array(edited));
}

fn custom_map(fields: &BTreeMap<String, Value>) -> Dynamic {
    Dynamic::from_map(
        fields
            .iter()
            .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
            .collect(),
    )
}

fn json_to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => Dynamic::from_array(a.iter().map(json_to_dynamic).collect()),
        Value::Object(o) => Dynamic::from_map(o.iter().map(|(k, v)| (k.as_str().into(), json_to_dynamic(v))).collect()),
    }
}

fn dynamic_to_json(v: &Dynamic, field: &str) -> Result<Value, MapError> {
    if v.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.as_bool() {
        return Ok(b.into());
    }
    if let Ok(i) = v.as_int() {
        return Ok(i.into());
    }
    if let Ok(f) = v.as_float() {
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| MapError::new(field, format!("{f} is not a number JSON can hold")));
    }
    if v.is_string() {
        return Ok(v.to_string().into());
    }
    if v.is_char() {
        return Ok(v.to_string().into());
    }
    if let Some(a) = v.read_lock::<Array>() {
        return a
            .iter()
            .enumerate()
            .map(|(i, x)| dynamic_to_json(x, &format!("{field}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if let Some(m) = v.read_lock::<Map>() {
        let mut out = serde_json::Map::new();
        for (k, x) in m.iter() {
            out.insert(k.to_string(), dynamic_to_json(x, &format!("{field}.{k}"))?);
        }
        return Ok(Value::Object(out));
    }
    Err(MapError::new(
        field,
        format!("a {} cannot be stored in a field", v.type_name()),
    ))
}

/// Reads a script's map with exactly the given keys; an unknown key is an error, not dropped.
fn fields(v: &Dynamic, field: &str, allowed: &[&str]) -> Result<Map, MapError> {
    let m = v
        .read_lock::<Map>()
        .map(|m| m.clone())
        .ok_or_else(|| found(field, "a map", v))?;
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(MapError::new(
            &format!("{field}.{k}"),
            format!("not a field here (the fields are: {})", allowed.join(", ")),
        ));
    }
    Ok(m)
}

fn found(field: &str, expected: &str, v: &Dynamic) -> MapError {
    let shown = if v.is_string() {
        format!("{:?}", v.to_string())
    } else {
        format!("a {}", v.type_name())
    };
    MapError::new(field, format!("expected {expected}, found {shown}"))
}

fn get<'m>(m: &'m Map, key: &str, field: &str) -> Result<&'m Dynamic, MapError> {
    m.get(key)
        .ok_or_else(|| MapError::new(&format!("{field}.{key}"), "missing"))
}

fn string(v: &Dynamic, field: &str) -> Result<String, MapError> {
    if v.is_string() || v.is_char() {
        Ok(v.to_string())
    } else {
        Err(found(field, "a string", v))
    }
}

fn opt_string(v: &Dynamic, field: &str) -> Result<Option<String>, MapError> {
    if v.is_unit() {
        Ok(None)
    } else {
        string(v, field).map(Some)
    }
}

/// An id: a string, or an integer written in decimal.
fn id_string(v: &Dynamic, field: &str) -> Result<Option<String>, MapError> {
    if let Ok(i) = v.as_int() {
        return Ok(Some(i.to_string()));
    }
    opt_string(v, field).map_err(|_| found(field, "an id (string or integer)", v))
}

fn string_list(v: &Dynamic, field: &str) -> Result<Vec<String>, MapError> {
    if v.is_unit() {
        return Ok(Vec::new());
    }
    let a = v
        .read_lock::<Array>()
        .ok_or_else(|| found(field, "an array of strings", v))?;
    a.iter()
        .enumerate()
        .map(|(i, x)| string(x, &format!("{field}[{i}]")))
        .collect()
}

fn array(v: &Dynamic, field: &str) -> Result<Array, MapError> {
    if v.is_unit() {
        return Ok(Array::new());
    }
    v.read_lock::<Array>()
        .map(|a| a.clone())
        .ok_or_else(|| found(field, "an array", v))
}

fn size(v: &Dynamic, field: &str) -> Result<u64, MapError> {
    v.as_int()
        .ok()
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| found(field, "a size in bytes", v))
}

fn author(m: &Map, field: &str) -> Result<(String, String), MapError> {
    let field = format!("{field}.author");
    match m.get("author") {
        None => Ok((String::new(), String::new())),
        Some(v) if v.is_unit() => Ok((String::new(), String::new())),
        Some(v) => {
            let a = fields(v, &field, &["displayName", "email"])?;
            let name = a
                .get("displayName")
                .map_or(Ok(None), |x| opt_string(x, &format!("{field}.displayName")))?;
            let email = a
                .get("email")
                .map_or(Ok(None), |x| opt_string(x, &format!("{field}.email")))?;
            Ok((name.unwrap_or_default(), email.unwrap_or_default()))
        }
    }
}

fn custom_fields(v: &Dynamic, field: &str) -> Result<BTreeMap<String, Value>, MapError> {
    if v.is_unit() {
        return Ok(BTreeMap::new());
    }
    let m = v.read_lock::<Map>().ok_or_else(|| found(field, "a map of fields", v))?;
    m.iter()
        .map(|(k, x)| Ok((k.to_string(), dynamic_to_json(x, &format!("{field}.{k}"))?)))
        .collect()
}

const ENTITY_KEYS: &[&str] = &[
    "key",
    "type",
    "summary",
    "description",
    "descriptionFormat",
    "labels",
    "comments",
    "attachments",
    "status",
    "priority",
    "assignee",
    "creator",
    "links",
    "parentId",
    "customFields",
];

/// The entity the outgoing script left in `replica`. Comments and attachments relay copied
/// from the other side (they have a `remoteId`) are not sent back: that would echo them.
pub(super) fn read_entity(v: &Dynamic, key: &str) -> Result<Entity, MapError> {
    let f = "replica";
    let m = fields(v, f, ENTITY_KEYS)?;
    let got_key = string(get(&m, "key", f)?, "replica.key")?;
    if got_key != key {
        return Err(MapError::new("replica.key", "is set by relay and cannot be changed"));
    }
    let format_name = string(get(&m, "descriptionFormat", f)?, "replica.descriptionFormat")?;
    let format = TextFormat::parse(&format_name).ok_or_else(|| {
        MapError::new(
            "replica.descriptionFormat",
            format!("{format_name:?} is not html, markdown or plain"),
        )
    })?;
    let mut comments = Vec::new();
    for (i, c) in array(get(&m, "comments", f)?, "replica.comments")?.iter().enumerate() {
        let cf = format!("replica.comments[{i}]");
        let cm = fields(c, &cf, &["id", "remoteId", "author", "created", "body", "format"])?;
        if cm.get("remoteId").is_some_and(|r| !r.is_unit()) {
            continue;
        }
        let id = id_string(get(&cm, "id", &cf)?, &format!("{cf}.id"))?
            .ok_or_else(|| MapError::new(&format!("{cf}.id"), "a comment to send needs its id"))?;
        let (display_name, email) = author(&cm, &cf)?;
        let fmt_name = cm
            .get("format")
            .map_or(Ok(None), |x| opt_string(x, &format!("{cf}.format")))?;
        let format = match fmt_name.as_deref() {
            None => TextFormat::Html,
            Some(n) => TextFormat::parse(n).ok_or_else(|| {
                MapError::new(&format!("{cf}.format"), format!("{n:?} is not html, markdown or plain"))
            })?,
        };
        comments.push(Comment {
            id,
            author: Author { display_name, email },
            created: cm
                .get("created")
                .map_or(Ok(None), |x| opt_string(x, &format!("{cf}.created")))?
                .unwrap_or_default(),
            body: Text {
                format,
                text: string(get(&cm, "body", &cf)?, &format!("{cf}.body"))?,
            },
        });
    }
    let mut attachments = Vec::new();
    for (i, a) in array(get(&m, "attachments", f)?, "replica.attachments")?
        .iter()
        .enumerate()
    {
        let af = format!("replica.attachments[{i}]");
        let am = fields(a, &af, &["id", "remoteId", "filename", "size", "mime", "sha256", "url"])?;
        if am.get("remoteId").is_some_and(|r| !r.is_unit()) {
            continue;
        }
        let id = id_string(get(&am, "id", &af)?, &format!("{af}.id"))?
            .ok_or_else(|| MapError::new(&format!("{af}.id"), "an attachment to send needs its id"))?;
        attachments.push(Attachment {
            id,
            filename: string(get(&am, "filename", &af)?, &format!("{af}.filename"))?,
            size: size(get(&am, "size", &af)?, &format!("{af}.size"))?,
            mime: am
                .get("mime")
                .map_or(Ok(None), |x| opt_string(x, &format!("{af}.mime")))?
                .unwrap_or_default(),
            sha256: am
                .get("sha256")
                .map_or(Ok(None), |x| opt_string(x, &format!("{af}.sha256")))?
                .unwrap_or_default(),
        });
    }
    let priority = match get(&m, "priority", f)? {
        p if p.is_unit() => None,
        p => match p.as_int() {
            Ok(i) => Some(i.to_string()),
            Err(_) => Some(string(p, "replica.priority")?),
        },
    };
    Ok(Entity {
        key: got_key,
        type_name: string(get(&m, "type", f)?, "replica.type")?,
        summary: string(get(&m, "summary", f)?, "replica.summary")?,
        description: Text {
            format,
            text: string(get(&m, "description", f)?, "replica.description")?,
        },
        labels: normalize_labels(string_list(get(&m, "labels", f)?, "replica.labels")?),
        comments,
        attachments,
        status: opt_string(get(&m, "status", f)?, "replica.status")?,
        priority,
        custom_fields: custom_fields(get(&m, "customFields", f)?, "replica.customFields")?,
        assignee: person(get(&m, "assignee", f)?, "replica.assignee")?,
        creator: person(get(&m, "creator", f)?, "replica.creator")?,
        links: replica_links(&m)?,
    })
}

/// `replica.links`: each `#{rel, key}`, or a work item's link `#{rel, id, url}`; with
/// `replica.parentId` set, the parent link it names.
fn replica_links(m: &Map) -> Result<Vec<Link>, MapError> {
    let mut links = Vec::new();
    for (i, l) in array(get(m, "links", "replica")?, "replica.links")?.iter().enumerate() {
        let lf = format!("replica.links[{i}]");
        let lm = fields(l, &lf, &["rel", "key", "id", "url"])?;
        let key = match (lm.get("key"), lm.get("id")) {
            (Some(k), _) if !k.is_unit() => id_string(k, &format!("{lf}.key"))?,
            (_, Some(id)) => id_string(id, &format!("{lf}.id"))?,
            _ => None,
        }
        .ok_or_else(|| MapError::new(&format!("{lf}.key"), "a link needs the other item's key"))?;
        let link = Link {
            rel: link_rel(get(&lm, "rel", &lf)?, &format!("{lf}.rel"))?,
            key,
            twin: None,
        };
        if !links.contains(&link) {
            links.push(link);
        }
    }
    // `parentId` left `()` is whatever the links say; set, it is the parent link.
    if let Some(parent) = id_string(get(m, "parentId", "replica")?, "replica.parentId")? {
        match parent_key(&links) {
            None => links.push(Link {
                rel: REL_PARENT.to_owned(),
                key: parent,
                twin: None,
            }),
            Some(k) if k == parent => {}
            Some(k) => {
                return Err(MapError::new(
                    "replica.parentId",
                    format!("is {parent:?} while replica.links names {k:?} as the parent"),
                ))
            }
        }
    }
    Ok(links)
}

/// `workItem.links`: each `#{rel, id}` (`url` is the tracker's and may be left out).
fn work_item_links(m: &Map, current: &WorkItem) -> Result<Vec<WorkLink>, MapError> {
    let mut links: Vec<WorkLink> = Vec::new();
    for (i, l) in array(get(m, "links", "workItem")?, "workItem.links")?
        .iter()
        .enumerate()
    {
        let lf = format!("workItem.links[{i}]");
        let lm = fields(l, &lf, &["rel", "id", "key", "url"])?;
        let id = get(&lm, "id", &lf)?;
        let target = id
            .as_int()
            .ok()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| found(&format!("{lf}.id"), "a work item id", id))?;
        let mut link = WorkLink {
            rel: link_rel(get(&lm, "rel", &lf)?, &format!("{lf}.rel"))?,
            target,
            url: None,
            relation_index: None,
        };
        if let Some(have) = current.links.iter().find(|c| c.same(&link)) {
            link.url = have.url.clone();
            link.relation_index = have.relation_index;
        }
        if !links.iter().any(|l| l.same(&link)) {
            links.push(link);
        }
    }
    Ok(links)
}

/// The classification paths, as script properties of a work item and the fields they stand
/// for (kept among the custom fields, where rules written before them find them too).
const PATH_FIELDS: [(&str, &str); 2] = [
    ("areaPath", "System.AreaPath"),
    ("iterationPath", "System.IterationPath"),
];

const WORK_ITEM_KEYS: &[&str] = &[
    "areaPath",
    "iterationPath",
    "id",
    "rev",
    "typeName",
    "projectKey",
    "summary",
    "description",
    "labels",
    "comments",
    "attachments",
    "status",
    "priority",
    "assignee",
    "creator",
    "links",
    "customFields",
];

/// The work item the incoming script left in `workItem`.
pub(super) fn read_work_item(v: &Dynamic, current: &WorkItem) -> Result<WorkItem, MapError> {
    let f = "workItem";
    let m = fields(v, f, WORK_ITEM_KEYS)?;
    let int = |key: &str| -> Result<Option<u64>, MapError> {
        let x = get(&m, key, f)?;
        if x.is_unit() {
            return Ok(None);
        }
        x.as_int()
            .ok()
            .and_then(|i| u64::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| found(&format!("workItem.{key}"), "an integer", x))
    };
    if int("id")? != current.id || int("rev")? != current.rev {
        return Err(MapError::new(
            "workItem.id",
            "id and rev are the tracker's and cannot be changed",
        ));
    }
    let replica_hint = "this is a replica's entry; use commentHelper.mergeComments(workItem, replica) or attachmentHelper.mergeAttachments(workItem, replica)";
    let mut comments = Vec::new();
    for (i, c) in array(get(&m, "comments", f)?, "workItem.comments")?.iter().enumerate() {
        let cf = format!("workItem.comments[{i}]");
        let cm = fields(c, &cf, &["id", "remoteId", "author", "created", "body", "format"])?;
        if !cm.contains_key("remoteId") {
            return Err(MapError::new(&cf, replica_hint));
        }
        let (author_name, author_email) = author(&cm, &cf)?;
        let body = string(get(&cm, "body", &cf)?, &format!("{cf}.body"))?;
        let format = cm
            .get("format")
            .map_or(Ok(None), |x| opt_string(x, &format!("{cf}.format")))?;
        comments.push(WorkComment {
            id: id_string(get(&cm, "id", &cf)?, &format!("{cf}.id"))?,
            remote_id: id_string(get(&cm, "remoteId", &cf)?, &format!("{cf}.remoteId"))?,
            author_name,
            author_email,
            created: cm
                .get("created")
                .map_or(Ok(None), |x| opt_string(x, &format!("{cf}.created")))?
                .unwrap_or_default(),
            body: to_html(&body, format.as_deref().unwrap_or("html")),
        });
    }
    let mut attachments = Vec::new();
    for (i, a) in array(get(&m, "attachments", f)?, "workItem.attachments")?
        .iter()
        .enumerate()
    {
        let af = format!("workItem.attachments[{i}]");
        let am = fields(a, &af, &["id", "remoteId", "filename", "size", "mime", "sha256", "url"])?;
        if !am.contains_key("remoteId") {
            return Err(MapError::new(&af, replica_hint));
        }
        let id = id_string(get(&am, "id", &af)?, &format!("{af}.id"))?;
        let relation_index = current
            .attachments
            .iter()
            .find(|c| c.id.is_some() && c.id == id)
            .and_then(|c| c.relation_index);
        attachments.push(WorkAttachment {
            id,
            remote_id: id_string(get(&am, "remoteId", &af)?, &format!("{af}.remoteId"))?,
            filename: string(get(&am, "filename", &af)?, &format!("{af}.filename"))?,
            size: size(get(&am, "size", &af)?, &format!("{af}.size"))?,
            mime: am
                .get("mime")
                .map_or(Ok(None), |x| opt_string(x, &format!("{af}.mime")))?
                .unwrap_or_default(),
            sha256: am
                .get("sha256")
                .map_or(Ok(None), |x| opt_string(x, &format!("{af}.sha256")))?
                .unwrap_or_default(),
            url: am
                .get("url")
                .map_or(Ok(None), |x| opt_string(x, &format!("{af}.url")))?,
            relation_index,
        });
    }
    let priority = match get(&m, "priority", f)? {
        p if p.is_unit() => None,
        p => Some(match p.as_int() {
            Ok(i) => i,
            Err(_) => string(p, "workItem.priority")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| found("workItem.priority", "an integer", p))?,
        }),
    };
    let creator = person(get(&m, "creator", f)?, "workItem.creator")?;
    if !same_person(creator.as_ref(), current.creator.as_ref()) {
        return Err(MapError::new(
            "workItem.creator",
            "is set by the tracker and cannot be changed",
        ));
    }
    let mut custom = custom_fields(get(&m, "customFields", f)?, "workItem.customFields")?;
    for (key, field) in PATH_FIELDS {
        // A path the script set through its property; one set through customFields stands
        // when the property is left as it was.
        let path = opt_string(get(&m, key, f)?, &format!("workItem.{key}"))?;
        let had = current.custom_fields.get(field).and_then(Value::as_str);
        if path.as_deref() != had {
            match path.filter(|p| !p.is_empty()) {
                Some(p) => custom.insert(field.to_owned(), Value::String(p)),
                None => custom.remove(field),
            };
        }
    }
    Ok(WorkItem {
        id: current.id,
        rev: current.rev,
        type_name: string(get(&m, "typeName", f)?, "workItem.typeName")?,
        project_key: string(get(&m, "projectKey", f)?, "workItem.projectKey")?,
        summary: string(get(&m, "summary", f)?, "workItem.summary")?,
        description: string(get(&m, "description", f)?, "workItem.description")?,
        labels: normalize_labels(string_list(get(&m, "labels", f)?, "workItem.labels")?),
        comments,
        attachments,
        status: opt_string(get(&m, "status", f)?, "workItem.status")?.filter(|s| !s.is_empty()),
        priority,
        custom_fields: custom,
        assignee: person(get(&m, "assignee", f)?, "workItem.assignee")?,
        creator: current.creator.clone(),
        links: work_item_links(&m, current)?,
        hyperlinks: current.hyperlinks.clone(),
    })
}
