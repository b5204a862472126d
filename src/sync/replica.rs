//! The replica `relay.replica/1`: one work-item revision as it travels between two trackers.
//!
//! The outgoing script writes the [`Entity`]; the engine fills origin, event and the hash. The
//! hash covers the entity only, so a new revision that changes nothing synced (a state the other
//! side does not see, relay's own write) hashes the same and is not sent again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crypto;

/// The schema this build writes and the only one it reads.
pub const SCHEMA: &str = "relay.replica/1";
/// Content type of a replica message.
pub const CONTENT_TYPE: &str = "application/vnd.relay.replica+json";
/// Content type of an attachment chunk message.
pub const BLOB_CONTENT_TYPE: &str = "application/vnd.relay.blob";

/// The header that carries [`idempotency_key`] with each replica message.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Largest replica document accepted (bytes); attachment bytes travel apart, so this is text.
pub const MAX_REPLICA_BYTES: usize = 4 * 1024 * 1024;
/// Largest short string: keys, ids, names, labels, file names, states, dates, URLs.
pub const MAX_SHORT_CHARS: usize = 2048;
/// Largest summary (Azure DevOps allows 255 characters; other trackers more).
pub const MAX_SUMMARY_CHARS: usize = 4096;
/// Largest long text: a description or a comment body.
pub const MAX_LONG_CHARS: usize = 1024 * 1024;
/// Most labels on one item.
pub const MAX_LABELS: usize = 256;
/// Most comments on one item.
pub const MAX_COMMENTS: usize = 2000;
/// Most attachments on one item.
pub const MAX_ATTACHMENTS: usize = 500;
/// Most custom fields on one item.
pub const MAX_CUSTOM_FIELDS: usize = 256;
/// Most links in one replica.
pub const MAX_LINKS: usize = 1000;
/// Largest custom field value, as compact JSON (bytes).
pub const MAX_CUSTOM_VALUE_BYTES: usize = 64 * 1024;

/// One replica message: which revision of which item, what happened, and the synced content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Where the revision comes from.
    pub origin: Origin,
    /// What happened to the item.
    pub event: Event,
    /// The synced content, as the outgoing script wrote it.
    pub entity: Entity,
    /// [`Entity::hash`] of `entity`, hex.
    pub hash: String,
}

/// The source of a replica: instance, project and revision of the item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// The tracker's base URL (`https://dev.azure.com/org`).
    pub instance: String,
    /// The item's project on that tracker.
    pub project: String,
    /// The item's id on that tracker.
    pub id: u64,
    /// The revision this replica was made from.
    pub rev: u64,
    /// A link to the item for people.
    pub url: String,
    /// When the revision was made (RFC 3339, as the tracker reports it).
    pub changed_at: String,
}

/// What happened to the item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique per event; a receiver applies an event id once.
    pub id: String,
    /// Upsert or delete.
    pub kind: EventKind,
    /// The receiver's own key of this item's twin, once the sender knows it (the receiver
    /// created the twin from an earlier replica): the receiver updates that item rather than
    /// creating one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
    /// The fields the sender's side changed since the state both sides last shared (names
    /// as [`Entity::changed_since`] gives them); `None` when there is no such state yet. A
    /// receiver keeps its own value of every other field, so a replica made before the sender
    /// applied the receiver's latest change cannot undo it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<Vec<String>>,
    /// The id of the receiver's last event the sender had applied to this item when it made
    /// the replica: a receiver that sent something since knows the two changes crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<String>,
}

/// The kinds of event a replica carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The item was created or changed.
    Upsert,
    /// The item was deleted.
    Delete,
}

/// The synced content of one item, tracker-neutral.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    /// The item's key on its origin (for Azure DevOps, its id).
    pub key: String,
    /// The item's type name on its origin (`Bug`, `User Story`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Title.
    pub summary: String,
    /// Long description.
    pub description: Text,
    /// Labels (tags); a set, order carries no meaning.
    pub labels: Vec<String>,
    /// Comments, oldest first.
    pub comments: Vec<Comment>,
    /// Attachment descriptions; the bytes travel as blob messages.
    pub attachments: Vec<Attachment>,
    /// Workflow state, if the script sends it.
    pub status: Option<String>,
    /// Priority, if the script sends it.
    pub priority: Option<String>,
    /// Anything else the script sends, by name.
    pub custom_fields: BTreeMap<String, Value>,
    /// Who the item is assigned to, if the script sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<Person>,
    /// Who created the item on its origin, if the script sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<Person>,
    /// Links to other items of the origin, if the script sends them; a set, order carries no
    /// meaning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<Link>,
}

/// A link from an item to another item of the same tracker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The link type's reference name (`System.LinkTypes.Hierarchy-Reverse`: the parent).
    pub rel: String,
    /// The other item's key on the origin.
    pub key: String,
    /// The other item's twin on the receiving side, when the sender knows it (as
    /// [`Event::twin`] for the item itself): the receiver finds it by this before any replica
    /// of it came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
}

/// A person as trackers name them: a display name, and the unique (sign-in) name, usually an
/// e-mail address, that the other side finds the same person by.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    /// Display name.
    pub display_name: String,
    /// Unique name; may be empty when the tracker showed only a display name.
    pub unique_name: String,
}

impl Person {
    /// Whether both name the same person: the same unique name (case-insensitive), or, where
    /// one has none, the same display name.
    pub fn same(&self, other: &Person) -> bool {
        if self.unique_name.is_empty() || other.unique_name.is_empty() {
            self.display_name.eq_ignore_ascii_case(&other.display_name)
        } else {
            self.unique_name.eq_ignore_ascii_case(&other.unique_name)
        }
    }

    /// A person from the two names as a tracker or a script gives them (trimmed); the unique
    /// name stands in for a missing display name; `None` when both are empty.
    pub fn from_names(display_name: &str, unique_name: &str) -> Option<Person> {
        let (display_name, unique_name) = (display_name.trim(), unique_name.trim());
        if display_name.is_empty() && unique_name.is_empty() {
            return None;
        }
        Some(Person {
            display_name: if display_name.is_empty() {
                unique_name
            } else {
                display_name
            }
            .to_owned(),
            unique_name: unique_name.to_owned(),
        })
    }

    /// Reads `Name <unique>`, or a bare name (an e-mail address counts as a unique name).
    pub fn parse(text: &str) -> Option<Person> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        Some(match (text.rfind('<'), text.ends_with('>')) {
            (Some(i), true) => Person {
                display_name: text[..i].trim().to_owned(),
                unique_name: text[i + 1..text.len() - 1].trim().to_owned(),
            },
            _ if text.contains('@') || text.contains('\\') => Person {
                display_name: text.to_owned(),
                unique_name: text.to_owned(),
            },
            _ => Person {
                display_name: text.to_owned(),
                unique_name: String::new(),
            },
        })
    }
}

/// Whether two optional people are the same (see [`Person::same`]).
pub fn same_person(a: Option<&Person>, b: Option<&Person>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.same(b),
        (None, None) => true,
        _ => false,
    }
}

/// A text and how to read it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Text {
    /// Markup of `text`.
    pub format: TextFormat,
    /// The text.
    pub text: String,
}

/// Markup of a [`Text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextFormat {
    /// HTML, what Azure DevOps stores.
    #[default]
    Html,
    /// Markdown.
    Markdown,
    /// Plain text.
    Plain,
}

impl TextFormat {
    /// The name used in JSON and in scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            TextFormat::Html => "html",
            TextFormat::Markdown => "markdown",
            TextFormat::Plain => "plain",
        }
    }

    /// Parses a name as [`TextFormat::as_str`] writes it.
    pub fn parse(name: &str) -> Option<TextFormat> {
        match name {
            "html" => Some(TextFormat::Html),
            "markdown" => Some(TextFormat::Markdown),
            "plain" => Some(TextFormat::Plain),
            _ => None,
        }
    }
}

/// One comment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Comment {
    /// The comment's id on the origin.
    pub id: String,
    /// Who wrote it.
    pub author: Author,
    /// When (RFC 3339).
    pub created: String,
    /// The text.
    pub body: Text,
}

/// A comment's author as people read it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Author {
    /// Display name.
    pub display_name: String,
    /// E-mail or unique name; may be empty.
    pub email: String,
}

/// One attachment's description.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// The attachment's id on the origin.
    pub id: String,
    /// File name.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type.
    pub mime: String,
    /// SHA-256 of the bytes, hex; the blob messages are checked against it.
    pub sha256: String,
}

/// Why a replica document was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReplicaError {
    /// The document is larger than [`MAX_REPLICA_BYTES`].
    #[error("replica is {0} bytes, more than the {MAX_REPLICA_BYTES} allowed")]
    TooLarge(usize),
    /// Not JSON, or not the shape of the schema.
    #[error("replica is malformed: {0}")]
    Malformed(String),
    /// A schema this build does not read.
    #[error("replica schema {found:?} is not supported (this relay reads {SCHEMA:?}); upgrade relay on this side")]
    UnsupportedSchema {
        /// The schema the document names.
        found: String,
    },
    /// A string or list over its bound.
    #[error("replica field {field} is too large: {size}, at most {max}")]
    FieldTooLarge {
        /// The field, as a path (`entity.comments[3].body.text`).
        field: String,
        /// Its size (characters or entries).
        size: usize,
        /// The bound.
        max: usize,
    },
    /// A field whose form is wrong.
    #[error("replica field {field}: {message}")]
    Invalid {
        /// The field, as a path.
        field: String,
        /// What is wrong.
        message: &'static str,
    },
    /// The hash does not match the entity.
    #[error("replica hash {found} does not match its content (expected {expected})")]
    HashMismatch {
        /// The hash the document carries.
        found: String,
        /// The hash of its entity.
        expected: String,
    },
}

impl Replica {
    /// A replica of `entity`, with its hash computed.
    pub fn new(origin: Origin, event: Event, entity: Entity) -> Replica {
        let hash = entity.hash();
        Replica {
            schema: SCHEMA.to_string(),
            origin,
            event,
            entity,
            hash,
        }
    }

    /// Parses a replica message strictly: known schema, known fields, every size bounded, and
    /// a hash that matches the entity.
    pub fn parse(bytes: &[u8]) -> Result<Replica, ReplicaError> {
        if bytes.len() > MAX_REPLICA_BYTES {
            return Err(ReplicaError::TooLarge(bytes.len()));
        }
        // The schema is read first, so a newer version is named as such rather than reported
        // as an unknown field somewhere inside it.
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ReplicaError::Malformed(e.to_string()))?;
        match value.get("schema") {
            Some(Value::String(s)) if s == SCHEMA => {}
            Some(Value::String(s)) => return Err(ReplicaError::UnsupportedSchema { found: s.clone() }),
            _ => return Err(ReplicaError::Malformed("no \"schema\" string".into())),
        }
        let replica: Replica = serde_json::from_value(value).map_err(|e| ReplicaError::Malformed(e.to_string()))?;
        replica.validate()?;
        let expected = replica.entity.hash();
        if !crypto::ct_eq(expected.as_bytes(), replica.hash.as_bytes()) {
            return Err(ReplicaError::HashMismatch {
                found: replica.hash,
                expected,
            });
        }
        Ok(replica)
    }

    /// The message body: compact JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks every bound of the schema.
    pub fn validate(&self) -> Result<(), ReplicaError> {
        let o = &self.origin;
        short("origin.instance", &o.instance)?;
        short("origin.project", &o.project)?;
        short("origin.url", &o.url)?;
        short("origin.changed_at", &o.changed_at)?;
        short("event.id", &self.event.id)?;
        if let Some(t) = &self.event.twin {
            short("event.twin", t)?;
        }
        if let Some(c) = &self.event.changed {
            bound("event.changed", c.len(), MAX_CUSTOM_FIELDS + 8)?;
            for name in c {
                short("event.changed", name)?;
            }
        }
        self.entity.validate()
    }
}

impl Entity {
    /// The fields whose values differ from `base`: `type`, `summary`, `description`,
    /// `labels` (as a set), `status`, `priority`, `assignee` (as a person), `links` (as a
    /// set) and `custom_fields.{name}`. Comments and
    /// attachments are merged by id, never overwritten, so they are not listed.
    pub fn changed_since(&self, base: &Entity) -> Vec<String> {
        let mut out = Vec::new();
        let mut push = |differ: bool, name: &str| {
            if differ {
                out.push(name.to_owned());
            }
        };
        push(self.type_name != base.type_name, "type");
        push(self.summary != base.summary, "summary");
        push(self.description != base.description, "description");
        let set = |l: &[String]| l.iter().cloned().collect::<std::collections::BTreeSet<_>>();
        push(set(&self.labels) != set(&base.labels), "labels");
        push(self.status != base.status, "status");
        push(self.priority != base.priority, "priority");
        push(!same_person(self.assignee.as_ref(), base.assignee.as_ref()), "assignee");
        let links = |l: &[Link]| {
            l.iter()
                .map(|l| (l.rel.to_ascii_lowercase(), l.key.clone()))
                .collect::<std::collections::BTreeSet<_>>()
        };
        push(links(&self.links) != links(&base.links), "links");
        let names: std::collections::BTreeSet<&String> =
            self.custom_fields.keys().chain(base.custom_fields.keys()).collect();
        for name in names {
            if self.custom_fields.get(name) != base.custom_fields.get(name) {
                out.push(format!("custom_fields.{name}"));
            }
        }
        out
    }

    /// This entity with every field, and the comment and attachment lists, that differ
    /// between `before` and `after` taken from `after`.
    pub fn with_changes(&self, before: &Entity, after: &Entity) -> Entity {
        let mut out = self.clone();
        if before.comments != after.comments {
            out.comments = after.comments.clone();
        }
        if before.attachments != after.attachments {
            out.attachments = after.attachments.clone();
        }
        let fields = after.changed_since(before);
        let touched = |name: &str| fields.iter().any(|f| f == name);
        if touched("type") {
            out.type_name = after.type_name.clone();
        }
        if touched("summary") {
            out.summary = after.summary.clone();
        }
        if touched("description") {
            out.description = after.description.clone();
        }
        if touched("labels") {
            out.labels = after.labels.clone();
        }
        if touched("status") {
            out.status = after.status.clone();
        }
        if touched("priority") {
            out.priority = after.priority.clone();
        }
        if touched("assignee") {
            out.assignee = after.assignee.clone();
        }
        if touched("links") {
            out.links = after.links.clone();
        }
        for f in &fields {
            if let Some(name) = f.strip_prefix("custom_fields.") {
                match after.custom_fields.get(name) {
                    Some(v) => out.custom_fields.insert(name.to_owned(), v.clone()),
                    None => out.custom_fields.remove(name),
                };
            }
        }
        out
    }

    /// Checks every bound of the schema.
    pub fn validate(&self) -> Result<(), ReplicaError> {
        short("entity.key", &self.key)?;
        short("entity.type", &self.type_name)?;
        bound("entity.summary", chars(&self.summary), MAX_SUMMARY_CHARS)?;
        bound("entity.description.text", chars(&self.description.text), MAX_LONG_CHARS)?;
        bound("entity.labels", self.labels.len(), MAX_LABELS)?;
        for (i, label) in self.labels.iter().enumerate() {
            short(&format!("entity.labels[{i}]"), label)?;
        }
        bound("entity.comments", self.comments.len(), MAX_COMMENTS)?;
        for (i, c) in self.comments.iter().enumerate() {
            short(&format!("entity.comments[{i}].id"), &c.id)?;
            short(
                &format!("entity.comments[{i}].author.display_name"),
                &c.author.display_name,
            )?;
            short(&format!("entity.comments[{i}].author.email"), &c.author.email)?;
            short(&format!("entity.comments[{i}].created"), &c.created)?;
            bound(
                &format!("entity.comments[{i}].body.text"),
                chars(&c.body.text),
                MAX_LONG_CHARS,
            )?;
        }
        bound("entity.attachments", self.attachments.len(), MAX_ATTACHMENTS)?;
        for (i, a) in self.attachments.iter().enumerate() {
            short(&format!("entity.attachments[{i}].id"), &a.id)?;
            short(&format!("entity.attachments[{i}].filename"), &a.filename)?;
            short(&format!("entity.attachments[{i}].mime"), &a.mime)?;
            // The blob messages are verified against it, so it must be a real digest.
            if a.sha256.len() != 64
                || !a
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(ReplicaError::Invalid {
                    field: format!("entity.attachments[{i}].sha256"),
                    message: "not a SHA-256 in lowercase hex",
                });
            }
        }
        if let Some(s) = &self.status {
            short("entity.status", s)?;
        }
        if let Some(p) = &self.priority {
            short("entity.priority", p)?;
        }
        for (field, person) in [("entity.assignee", &self.assignee), ("entity.creator", &self.creator)] {
            if let Some(p) = person {
                short(&format!("{field}.display_name"), &p.display_name)?;
                short(&format!("{field}.unique_name"), &p.unique_name)?;
            }
        }
        bound("entity.links", self.links.len(), MAX_LINKS)?;
        for (i, l) in self.links.iter().enumerate() {
            short(&format!("entity.links[{i}].rel"), &l.rel)?;
            short(&format!("entity.links[{i}].key"), &l.key)?;
            if let Some(t) = &l.twin {
                short(&format!("entity.links[{i}].twin"), t)?;
            }
        }
        bound("entity.custom_fields", self.custom_fields.len(), MAX_CUSTOM_FIELDS)?;
        for (name, value) in &self.custom_fields {
            short(&format!("entity.custom_fields key {name:?}"), name)?;
            let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(0);
            bound(&format!("entity.custom_fields.{name}"), size, MAX_CUSTOM_VALUE_BYTES)?;
        }
        Ok(())
    }

    /// The canonical hash: SHA-256 (hex) of the entity as canonical JSON (object keys sorted,
    /// no whitespace, labels sorted and deduplicated since they are a set).
    pub fn hash(&self) -> String {
        crypto::hex(&crypto::sha256(&self.canonical_json()))
    }

    /// The bytes [`Entity::hash`] digests.
    pub fn canonical_json(&self) -> Vec<u8> {
        let mut entity = self.clone();
        entity.labels.sort();
        entity.labels.dedup();
        entity.links.sort();
        entity.links.dedup();
        let value = serde_json::to_value(&entity).unwrap_or(Value::Null);
        let mut out = Vec::new();
        write_canonical(&canonical(value), &mut out);
        out
    }
}

/// `Idempotency-Key` of the replica of one revision of one item on one connection: the same
/// revision re-sent after a crash carries the same key, so the receiver applies it once.
pub fn idempotency_key(connection: &str, item: &str, rev: u64) -> String {
    // Length prefixes keep ("a", "bc") and ("ab", "c") apart.
    let mut data = Vec::with_capacity(connection.len() + item.len() + 32);
    for part in [connection.as_bytes(), item.as_bytes()] {
        data.extend_from_slice(&(part.len() as u64).to_be_bytes());
        data.extend_from_slice(part);
    }
    data.extend_from_slice(&rev.to_be_bytes());
    crypto::hex(&crypto::sha256(&data))
}

/// Sorts object keys at every depth (serde_json may be built to keep insertion order).
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> = map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// Writes compact JSON with keys in sorted order regardless of the map's own order.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&serde_json::to_vec(k).unwrap_or_default());
                out.push(b':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(&serde_json::to_vec(scalar).unwrap_or_default()),
    }
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn short(field: &str, s: &str) -> Result<(), ReplicaError> {
    bound(field, chars(s), MAX_SHORT_CHARS)
}

fn bound(field: &str, size: usize, max: usize) -> Result<(), ReplicaError> {
    if size > max {
        return Err(ReplicaError::FieldTooLarge {
            field: field.to_string(),
            size,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_entity() -> Entity {
        Entity {
            key: "42".into(),
            type_name: "Bug".into(),
            summary: "Login fails".into(),
            description: Text {
                format: TextFormat::Html,
                text: "<p>Steps</p>".into(),
            },
            labels: vec!["ui".into(), "backend".into()],
            comments: vec![Comment {
                id: "7".into(),
                author: Author {
                    display_name: "Ann".into(),
                    email: "ann@example.com".into(),
                },
                created: "2026-01-02T03:04:05Z".into(),
                body: Text {
                    format: TextFormat::Html,
                    text: "seen".into(),
                },
            }],
            attachments: vec![Attachment {
                id: "a1".into(),
                filename: "log.txt".into(),
                size: 3,
                mime: "text/plain".into(),
                sha256: crypto::hex(&crypto::sha256(b"abc")),
            }],
            status: Some("Active".into()),
            priority: Some("2".into()),
            custom_fields: BTreeMap::from([("Custom.Points".into(), serde_json::json!(3))]),
            assignee: Some(Person {
                display_name: "Ann".into(),
                unique_name: "ann@example.com".into(),
            }),
            creator: None,
            links: vec![Link {
                rel: "System.LinkTypes.Hierarchy-Reverse".into(),
                key: "40".into(),
                twin: Some("7".into()),
            }],
        }
    }

    fn sample() -> Replica {
        Replica::new(
            Origin {
                instance: "https://dev.azure.com/contoso".into(),
                project: "Contoso".into(),
                id: 42,
                rev: 5,
                url: "https://dev.azure.com/contoso/_workitems/edit/42".into(),
                changed_at: "2026-01-02T03:04:05Z".into(),
            },
            Event {
                id: "e1".into(),
                kind: EventKind::Upsert,
                twin: None,
                changed: None,
                acked: None,
            },
            sample_entity(),
        )
    }

    #[test]
    fn round_trips_and_checks_hash() {
        let r = sample();
        assert_eq!(Replica::parse(&r.to_bytes()).unwrap(), r);
        let mut bad = r.clone();
        bad.entity.summary.push('!');
        assert!(matches!(
            Replica::parse(&bad.to_bytes()),
            Err(ReplicaError::HashMismatch { .. })
        ));
    }

    #[test]
    fn hash_ignores_origin_rev() {
        let a = sample();
        let mut b = sample();
        b.origin.rev = 99;
        b.event.id = "e2".into();
        assert_eq!(Replica::new(b.origin, b.event, b.entity).hash, a.hash);
    }

    #[test]
    fn refuses_unknown_schema_by_name() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["schema"] = "relay.replica/2".into();
        v["newfield"] = 1.into();
        let err = Replica::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(
            err,
            ReplicaError::UnsupportedSchema {
                found: "relay.replica/2".into()
            }
        );
        assert!(err.to_string().contains("relay.replica/2"));
    }

    #[test]
    fn refuses_unknown_fields_and_oversize() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["entity"]["colour"] = "red".into();
        assert!(matches!(
            Replica::parse(&serde_json::to_vec(&v).unwrap()),
            Err(ReplicaError::Malformed(_))
        ));

        let mut r = sample();
        r.entity.labels = (0..=MAX_LABELS).map(|i| format!("l{i}")).collect();
        let r = Replica::new(r.origin, r.event, r.entity);
        assert!(matches!(
            Replica::parse(&r.to_bytes()),
            Err(ReplicaError::FieldTooLarge { ref field, .. }) if field == "entity.labels"
        ));

        let mut r = sample();
        r.entity.comments[0].body.text = "x".repeat(MAX_LONG_CHARS + 1);
        let r = Replica::new(r.origin, r.event, r.entity);
        let err = Replica::parse(&r.to_bytes()).unwrap_err();
        assert!(err.to_string().contains("entity.comments[0].body.text"), "{err}");

        let mut r = sample();
        r.entity.attachments[0].sha256 = "ABC".into();
        let r = Replica::new(r.origin, r.event, r.entity);
        let err = Replica::parse(&r.to_bytes()).unwrap_err();
        assert!(err.to_string().contains("entity.attachments[0].sha256"), "{err}");

        assert!(matches!(
            Replica::parse(&vec![b' '; MAX_REPLICA_BYTES + 1]),
            Err(ReplicaError::TooLarge(_))
        ));
    }

    #[test]
    fn canonical_json_is_sorted_and_compact() {
        let mut e = Entity::default();
        e.custom_fields
            .insert("b".into(), serde_json::json!({"z": 1, "a": [2, 1]}));
        let text = String::from_utf8(e.canonical_json()).unwrap();
        assert!(
            text.starts_with("{\"attachments\":[],\"comments\":[],\"custom_fields\":{\"b\":{\"a\":[2,1],\"z\":1}}"),
            "{text}"
        );
        assert!(!text.contains(' '));
    }

    #[test]
    fn idempotency_key_separates_its_parts() {
        assert_eq!(idempotency_key("c", "1", 2), idempotency_key("c", "1", 2));
        assert_ne!(idempotency_key("c", "1", 2), idempotency_key("c", "1", 3));
        assert_ne!(idempotency_key("ab", "c", 1), idempotency_key("a", "bc", 1));
        assert_eq!(idempotency_key("c", "1", 2).len(), 64);
    }

    /// Re-serialises a JSON value with every object's keys in reverse order.
    fn reversed(value: &Value) -> String {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                keys.reverse();
                let parts: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{}:{}", serde_json::to_string(k).unwrap(), reversed(&map[k.as_str()])))
                    .collect();
                format!("{{{}}}", parts.join(","))
            }
            Value::Array(items) => {
                format!("[{}]", items.iter().map(reversed).collect::<Vec<_>>().join(","))
            }
            v => v.to_string(),
        }
    }

    proptest! {
        #[test]
        fn hash_stable_under_key_and_label_order(
            labels in proptest::collection::vec("[a-z]{1,6}", 0..8),
            rotate in 0usize..8,
            summary in ".{0,40}",
        ) {
            let mut e = sample_entity();
            e.summary = summary;
            e.labels = labels.clone();
            let h = e.hash();
            // Label order and duplicates do not matter.
            let mut shuffled = labels.clone();
            if !shuffled.is_empty() {
                let n = rotate % shuffled.len();
                shuffled.rotate_left(n);
                shuffled.push(shuffled[0].clone());
            }
            let mut e2 = e.clone();
            e2.labels = shuffled;
            prop_assert_eq!(e2.hash(), h.clone());
            // Key order of the document does not matter either.
            let r = Replica::new(sample().origin, sample().event, e.clone());
            let text = reversed(&serde_json::to_value(&r).unwrap());
            let parsed = Replica::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(parsed.entity.hash(), h);
        }

        #[test]
        fn hash_changes_with_every_field(which in 0usize..14, extra in "[a-z0-9]{1,8}") {
            let base = sample_entity();
            let mut e = base.clone();
            match which {
                0 => e.key.push_str(&extra),
                1 => e.type_name.push_str(&extra),
                2 => e.summary.push_str(&extra),
                3 => e.description.text.push_str(&extra),
                4 => e.description.format = TextFormat::Plain,
                5 => e.labels.push(format!("new-{extra}")),
                6 => e.comments[0].body.text.push_str(&extra),
                7 => e.comments[0].author.email.push_str(&extra),
                8 => e.comments[0].created.push_str(&extra),
                9 => e.attachments[0].sha256 = crypto::hex(&crypto::sha256(extra.as_bytes())),
                10 => e.attachments[0].filename.push_str(&extra),
                11 => e.status = Some(extra.clone()),
                12 => e.priority = None,
                _ => { e.custom_fields.insert(extra.clone(), Value::Bool(true)); }
            }
            prop_assert_ne!(e.hash(), base.hash());
        }
    }
}
