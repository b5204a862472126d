//! The rules of the simulated collection: creating and updating work items from JSON Patch
//! documents (rev increments, computed `System.*` fields, tags, states, relations), the change
//! feed behind the reporting revisions API, comments and attachments. No HTTP here; every
//! refusal is an [`ApiError`] the server turns into a response.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::clock;
use crate::error::ApiError;
use crate::model::*;
use crate::profile::Profile;

mod attachments;
mod comments;
mod links;
mod patch;
mod values;

pub use attachments::attachment_id_from_url;
pub use links::{is_work_item_link, reverse_link};
pub use values::{coerce, escape_html, normalise_tags, render_markdown};

/// Options of one write, from the query string and the caller.
#[derive(Debug, Clone)]
pub struct WriteOpts {
    /// `validateOnly=true`: check and answer, store nothing.
    pub validate_only: bool,
    /// `bypassRules=true`: skip state rules, allow setting created/changed by/date.
    pub bypass_rules: bool,
    /// `suppressNotifications=true`: no service hook events.
    pub suppress_notifications: bool,
    /// Who writes.
    pub actor: Identity,
}

/// Something service hooks publish.
#[derive(Debug, Clone)]
pub struct Event {
    /// `workitem.created`, `workitem.updated`, `workitem.commented` or `workitem.deleted`.
    pub kind: &'static str,
    /// The work item.
    pub id: u64,
    /// Its revision after the change.
    pub rev: u32,
    /// Comment text for `workitem.commented`.
    pub comment: Option<String>,
}

/// What one read of the change feed asks for.
#[derive(Debug, Clone, Default)]
pub struct FeedQuery {
    /// Only items of this project (id).
    pub project_id: Option<String>,
    /// Only these work item types (empty: all).
    pub types: Vec<String>,
    /// Start after this feed position (0: from the beginning).
    pub after: u64,
    /// Most entries in the page.
    pub max: usize,
    /// Only each item's latest revision.
    pub latest_only: bool,
    /// Only revisions changed after this instant.
    pub since_ms: Option<i64>,
    /// Include items in the recycle bin.
    pub include_deleted: bool,
}

/// One page of the change feed: `(position, id, rev)` in change order.
#[derive(Debug, Clone)]
pub struct FeedPage {
    /// Entries of this page.
    pub entries: Vec<(u64, u64, u32)>,
    /// Position to continue from (the last entry's, or the start when empty).
    pub last_position: u64,
    /// No entry after this page (now).
    pub is_last: bool,
}

/// The whole collection.
#[derive(Debug)]
pub struct Store {
    /// The version profile in force.
    pub profile: Profile,
    /// Collection (organisation) name.
    pub collection: String,
    /// `http(s)://host:port/collection`, for URLs in answers.
    pub base_url: String,
    /// Projects.
    pub projects: Vec<Project>,
    /// Field catalogue by lower-case reference name.
    pub fields: BTreeMap<String, FieldDef>,
    /// Work items by id.
    pub items: BTreeMap<u64, WorkItem>,
    /// Every revision in change order: (id, rev). Position = index + 1.
    pub feed: Vec<(u64, u32)>,
    /// Uploaded attachments by lower-case id.
    pub attachments: HashMap<String, Attachment>,
    /// Events waiting for service hook delivery.
    pub events: Vec<Event>,
    /// Edits a test wants made "by a human" right after the next read of an item.
    pub after_read: HashMap<u64, (Identity, Vec<Value>)>,
    /// The people identity fields may name (the PATs' owners and those tests add).
    pub identities: Vec<Identity>,
    next_id: u64,
    next_comment_id: u64,
    next_link_id: u64,
    last_ms: i64,
}

/// A random GUID string.
pub fn new_guid() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    // A failing system RNG would only make ids less random; fall back to the clock.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b[..8].copy_from_slice(&clock::now_ms().to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = data_encoding::HEXLOWER.encode(&b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn patch_error(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("VssPropertyValidationException", message)
}

/// The refusal of a failed `test` operation: 412, as the service answers a stale `/rev`.
pub fn test_failed(detail: String) -> ApiError {
    ApiError::new(
        412,
        "WorkItemRevisionMismatchException",
        format!(
            "TF26071: This work item has been changed by someone else since you opened it. You \
             will need to refresh it and discard your changes. ({detail})"
        ),
    )
}

impl Store {
    /// An empty collection.
    pub fn new(profile: Profile, collection: String, base_url: String) -> Store {
        let fields = builtin_fields()
            .into_iter()
            .map(|f| (f.reference.to_lowercase(), f))
            .collect();
        Store {
            profile,
            collection,
            base_url,
            projects: Vec::new(),
            fields,
            items: BTreeMap::new(),
            feed: Vec::new(),
            attachments: HashMap::new(),
            events: Vec::new(),
            after_read: HashMap::new(),
            identities: Vec::new(),
            next_id: 1,
            next_comment_id: 1,
            next_link_id: 1,
            last_ms: 0,
        }
    }

    /// Makes `who` known to identity fields; a known unique name is kept once.
    pub fn add_identity(&mut self, who: Identity) {
        if !self
            .identities
            .iter()
            .any(|i| i.unique_name.eq_ignore_ascii_case(&who.unique_name))
        {
            self.identities.push(who);
        }
    }

    /// A strictly increasing clock, so revisions have distinct, ordered changed dates.
    fn tick(&mut self) -> i64 {
        let now = clock::now_ms().max(self.last_ms + 1);
        self.last_ms = now;
        now
    }

    /// Adds a project (Agile types); an existing name answers the existing project.
    pub fn add_project(&mut self, name: &str) -> Project {
        if let Some(p) = self.project(name) {
            return p.clone();
        }
        let p = Project {
            id: new_guid(),
            name: name.to_string(),
            types: agile_types(),
        };
        self.projects.push(p.clone());
        p
    }

    /// Adds a field to the catalogue (e.g. `Custom.ExternalKey`).
    pub fn add_field(&mut self, reference: &str, kind: Kind) {
        let name = reference.rsplit('.').next().unwrap_or(reference).to_string();
        self.fields.insert(
            reference.to_lowercase(),
            FieldDef {
                reference: reference.to_string(),
                name,
                kind,
                read_only: false,
            },
        );
    }

    /// A project by name (case-insensitive) or id.
    pub fn project(&self, key: &str) -> Option<&Project> {
        self.projects
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(key) || p.id.eq_ignore_ascii_case(key))
    }

    /// A project or the service's refusal.
    pub fn require_project(&self, key: &str) -> Result<&Project, ApiError> {
        self.project(key).ok_or_else(|| {
            ApiError::new(
                404,
                "ProjectDoesNotExistWithNameException",
                format!(
                    "TF200016: The following project does not exist: {key}. Verify that the name \
                     of the project is correct and that the project exists on the specified \
                     Azure DevOps Server."
                ),
            )
        })
    }

    /// The catalogue entry of a field (case-insensitive reference name).
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.get(&name.to_lowercase())
    }

    /// A live (not deleted) work item, optionally required to be in `project`.
    pub fn item(&self, id: u64, project: Option<&str>) -> Result<&WorkItem, ApiError> {
        let wi = self
            .items
            .get(&id)
            .filter(|w| !w.deleted)
            .ok_or_else(|| ApiError::work_item_missing(id))?;
        if let Some(p) = project {
            let p = self.require_project(p)?;
            if p.id != wi.project_id {
                return Err(ApiError::work_item_missing(id));
            }
        }
        Ok(wi)
    }

    /// The URL of a work item as the API names it.
    pub fn item_url(&self, id: u64) -> String {
        format!("{}/_apis/wit/workItems/{id}", self.base_url)
    }

    /// Creates a work item of `type_name` in `project` from a JSON Patch document.
    pub fn create(
        &mut self,
        project: &str,
        type_name: &str,
        ops: &[Value],
        o: &WriteOpts,
    ) -> Result<WorkItem, ApiError> {
        let project = self.require_project(project)?.clone();
        let Some(wit) = project.types.iter().find(|t| t.name.eq_ignore_ascii_case(type_name)) else {
            return Err(ApiError::new(
                404,
                "WorkItemTypeNotFoundException",
                format!(
                    "VS402323: Work item type {type_name} does not exist in project {} or you do \
                     not have permission to access it.",
                    project.name
                ),
            ));
        };
        let now = self.tick();
        let actor = o.actor.combined();
        let mut fields = BTreeMap::new();
        let stamp = Value::String(clock::format(now));
        fields.insert("System.WorkItemType".into(), json!(wit.name));
        fields.insert("System.TeamProject".into(), json!(project.name));
        fields.insert("System.AreaPath".into(), json!(project.name));
        fields.insert("System.IterationPath".into(), json!(project.name));
        fields.insert("System.State".into(), json!(wit.states[0]));
        fields.insert("System.Reason".into(), json!("New"));
        fields.insert("System.CreatedDate".into(), stamp.clone());
        fields.insert("System.CreatedBy".into(), json!(actor));
        fields.insert("Microsoft.VSTS.Common.Priority".into(), json!(2));
        fields.insert("Microsoft.VSTS.Common.StateChangeDate".into(), stamp);
        fields.insert("System.CommentCount".into(), json!(0));
        let empty = Revision {
            rev: 0,
            fields,
            relations: Vec::new(),
            changed_ms: now,
            comment: None,
        };
        let id = if o.validate_only { 0 } else { self.next_id };
        let draft = self.apply(id, &project, wit, &empty, ops, o, true)?;
        let mut wi = WorkItem {
            id,
            project_id: project.id.clone(),
            revisions: Vec::new(),
            comments: Vec::new(),
            deleted: false,
        };
        let rev = self.finish(&mut wi, draft, now, o, true);
        if o.validate_only {
            wi.revisions.push(rev);
            return Ok(wi);
        }
        self.next_id += 1;
        let history = rev
            .fields
            .get("System.History")
            .and_then(Value::as_str)
            .map(str::to_string);
        wi.revisions.push(rev);
        self.stamp_relations(&mut wi);
        if let Some(text) = history.filter(|_| self.profile.has_comments_api()) {
            self.history_comment(&mut wi, text, o);
        }
        self.feed.push((id, 1));
        self.items.insert(id, wi.clone());
        self.reciprocate(id, &[], &wi.latest().relations.clone(), o);
        if !o.suppress_notifications {
            self.events.push(Event {
                kind: "workitem.created",
                id,
                rev: 1,
                comment: None,
            });
        }
        Ok(wi)
    }

    /// Updates a work item from a JSON Patch document. A document that changes nothing
    /// answers the item as it is, without a new revision.
    pub fn update(
        &mut self,
        id: u64,
        project: Option<&str>,
        ops: &[Value],
        o: &WriteOpts,
    ) -> Result<WorkItem, ApiError> {
        let wi = self.item(id, project)?.clone();
        let project = self
            .projects
            .iter()
            .find(|p| p.id == wi.project_id)
            .cloned()
            .ok_or_else(|| ApiError::work_item_missing(id))?;
        let type_name = wi
            .latest()
            .fields
            .get("System.WorkItemType")
            .and_then(Value::as_str)
            .unwrap_or("");
        let wit = project
            .types
            .iter()
            .find(|t| t.name == type_name)
            .cloned()
            .ok_or_else(|| ApiError::work_item_missing(id))?;
        let draft = self.apply(id, &project, &wit, wi.latest(), ops, o, false)?;
        let prev = wi.latest();
        // History belongs to one revision, so the previous one's is not part of the state.
        let unchanged = |a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>| {
            a.iter()
                .filter(|(k, _)| *k != "System.History")
                .eq(b.iter().filter(|(k, _)| *k != "System.History"))
        };
        if unchanged(&draft.fields, &prev.fields)
            && draft.relations == prev.relations
            && !draft.fields.contains_key("System.History")
        {
            return Ok(wi);
        }
        if o.validate_only {
            let mut shown = wi.clone();
            let rev = self.finish(&mut shown, draft, clock::now_ms(), o, false);
            shown.revisions.push(rev);
            return Ok(shown);
        }
        let now = self.tick();
        let mut wi = wi;
        let before = wi.latest().relations.clone();
        let rev = self.finish(&mut wi, draft, now, o, false);
        let n = rev.rev;
        let history = rev
            .fields
            .get("System.History")
            .and_then(Value::as_str)
            .map(str::to_string);
        wi.revisions.push(rev);
        self.stamp_relations(&mut wi);
        let mut comment = None;
        if let Some(text) = history {
            if self.profile.has_comments_api() {
                self.history_comment(&mut wi, text.clone(), o);
            }
            comment = Some(text);
        }
        self.feed.push((id, n));
        let after = wi.latest().relations.clone();
        self.items.insert(id, wi);
        if !o.suppress_notifications {
            self.events.push(Event {
                kind: "workitem.updated",
                id,
                rev: n,
                comment: None,
            });
            if comment.is_some() {
                self.events.push(Event {
                    kind: "workitem.commented",
                    id,
                    rev: n,
                    comment,
                });
            }
        }
        self.reciprocate(id, &before, &after, o);
        self.items
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::work_item_missing(id))
    }

    /// A `System.History` write becomes a comment of the comments API too.
    fn history_comment(&mut self, wi: &mut WorkItem, text: String, o: &WriteOpts) {
        let rev = wi.rev();
        let ms = wi.latest().changed_ms;
        let c = Comment {
            id: self.next_comment_id,
            version: 1,
            text: text.clone(),
            format: "html",
            created_by: o.actor.combined(),
            created_ms: ms,
            modified_by: o.actor.combined(),
            modified_ms: ms,
            deleted: false,
            created_in_revision: rev,
        };
        self.next_comment_id += 1;
        let count = wi.comments.iter().filter(|c| !c.deleted).count() as u64 + 1;
        let last = wi.revisions.len() - 1;
        let r = &mut wi.revisions[last];
        r.fields.insert("System.CommentCount".into(), json!(count));
        r.comment = Some(CommentRef {
            comment_id: c.id,
            version: 1,
            created_in_revision: rev,
            is_deleted: false,
            text,
        });
        wi.comments.push(c);
    }

    /// Stamps the computed fields of a new revision.
    fn finish(&mut self, wi: &mut WorkItem, mut draft: Revision, now: i64, o: &WriteOpts, created: bool) -> Revision {
        let rev = wi.revisions.last().map(|r| r.rev).unwrap_or(0) + 1;
        let stamp = json!(clock::format(now));
        let f = &mut draft.fields;
        let prev_state = wi.revisions.last().and_then(|r| r.fields.get("System.State").cloned());
        if !created && prev_state.as_ref() != f.get("System.State") {
            f.insert("Microsoft.VSTS.Common.StateChangeDate".into(), stamp.clone());
        }
        if !(o.bypass_rules && f.contains_key("System.ChangedDate") && draft_sets(f, "System.ChangedDate", wi)) {
            f.insert("System.ChangedDate".into(), stamp.clone());
        }
        if !(o.bypass_rules && draft_sets(f, "System.ChangedBy", wi)) {
            f.insert("System.ChangedBy".into(), json!(o.actor.combined()));
        }
        f.insert("System.AuthorizedDate".into(), stamp);
        f.insert("System.Rev".into(), json!(rev));
        f.insert("System.Id".into(), json!(wi.id));
        f.insert("System.Watermark".into(), json!(self.feed.len() as u64 + 1));
        draft.rev = rev;
        draft.changed_ms = f
            .get("System.ChangedDate")
            .and_then(Value::as_str)
            .and_then(clock::parse)
            .map(|p| p.ms)
            .unwrap_or(now);
        draft
    }

    /// Adds the computed attributes a stored relation carries.
    pub fn stamp_relations(&mut self, wi: &mut WorkItem) {
        let last = wi.revisions.len() - 1;
        let ms = wi.revisions[last].changed_ms;
        for r in &mut wi.revisions[last].relations {
            if (r.rel == "AttachedFile" || r.rel == "Hyperlink") && !r.attributes.contains_key("id") {
                r.attributes.insert("id".into(), json!(self.next_link_id));
                r.attributes.insert("authorizedDate".into(), json!(clock::format(ms)));
                r.attributes
                    .insert("resourceModifiedDate".into(), json!(clock::format(ms)));
                r.attributes.insert("revisedDate".into(), json!(clock::END_OF_TIME));
                self.next_link_id += 1;
            }
        }
    }

    /// The revision of a work item current at `as_of` (milliseconds).
    pub fn as_of<'a>(&self, wi: &'a WorkItem, as_of: Option<i64>) -> Result<&'a Revision, ApiError> {
        match as_of {
            None => Ok(wi.latest()),
            Some(t) => wi
                .revisions
                .iter()
                .rev()
                .find(|r| r.changed_ms <= t)
                .ok_or_else(|| ApiError::work_item_missing(wi.id)),
        }
    }

    /// A page of the change feed after `after` (a position), at most `max` entries, scoped to
    /// a project and types, optionally only the latest revision of each item.
    pub fn feed_page(&self, q: &FeedQuery) -> FeedPage {
        let FeedQuery {
            project_id,
            types,
            after,
            max,
            latest_only,
            since_ms,
            include_deleted,
        } = q;
        let (project_id, after, max, latest_only, since_ms, include_deleted) = (
            project_id.as_deref(),
            *after,
            *max,
            *latest_only,
            *since_ms,
            *include_deleted,
        );
        let mut entries = Vec::new();
        let mut last_position = after;
        let mut is_last = true;
        for (i, &(id, rev)) in self.feed.iter().enumerate().skip(after as usize) {
            let pos = i as u64 + 1;
            let Some(wi) = self.items.get(&id).filter(|w| include_deleted || !w.deleted) else {
                last_position = pos;
                continue;
            };
            let r = &wi.revisions[(rev - 1) as usize];
            let in_scope = project_id.is_none_or(|p| p == wi.project_id)
                && (types.is_empty()
                    || types
                        .iter()
                        .any(|t| Some(t.as_str()) == r.fields.get("System.WorkItemType").and_then(Value::as_str)))
                && since_ms.is_none_or(|s| r.changed_ms > s)
                && (!latest_only || rev == wi.rev());
            if !in_scope {
                last_position = pos;
                continue;
            }
            if entries.len() == max {
                is_last = false;
                break;
            }
            entries.push((pos, id, rev));
            last_position = pos;
        }
        FeedPage {
            entries,
            last_position,
            is_last,
        }
    }

    /// Sends a work item to the recycle bin.
    pub fn delete(&mut self, id: u64, project: Option<&str>) -> Result<(), ApiError> {
        let rev = self.item(id, project)?.rev();
        if let Some(wi) = self.items.get_mut(&id) {
            wi.deleted = true;
        }
        self.events.push(Event {
            kind: "workitem.deleted",
            id,
            rev,
            comment: None,
        });
        Ok(())
    }
}

fn draft_sets(f: &BTreeMap<String, Value>, key: &str, wi: &WorkItem) -> bool {
    f.get(key) != wi.revisions.last().and_then(|r| r.fields.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> WriteOpts {
        WriteOpts {
            validate_only: false,
            bypass_rules: false,
            suppress_notifications: false,
            actor: Identity {
                display_name: "Ann".into(),
                unique_name: "ann@example.com".into(),
            },
        }
    }

    fn store() -> Store {
        let mut s = Store::new(Profile::Services, "fabrikam".into(), "http://x/fabrikam".into());
        s.add_project("Fabrikam");
        s
    }

    #[test]
    fn tags_are_normalised() {
        assert_eq!(normalise_tags(" b;a ; B;;c "), "a; b; c");
    }

    #[test]
    fn create_computes_system_fields_and_update_bumps_rev() {
        let mut s = store();
        let add = |p: &str, v: Value| json!({"op": "add", "path": p, "value": v});
        let wi = s
            .create(
                "fabrikam",
                "user story",
                &[add("/fields/System.Title", json!("T"))],
                &opts(),
            )
            .unwrap();
        let f = &wi.latest().fields;
        assert_eq!(f["System.State"], "New");
        assert_eq!(f["System.WorkItemType"], "User Story");
        assert_eq!(f["System.AreaPath"], "Fabrikam");
        assert_eq!(f["System.CreatedBy"], "Ann <ann@example.com>");
        let ops = [
            json!({"op": "test", "path": "/rev", "value": 1}),
            add("/fields/System.Tags", json!("y;x")),
        ];
        let wi = s.update(wi.id, None, &ops, &opts()).unwrap();
        assert_eq!(wi.rev(), 2);
        assert_eq!(wi.latest().fields["System.Tags"], "x; y");
        let err = s.update(wi.id, None, &ops, &opts()).unwrap_err();
        assert_eq!(err.status, 412);
        let same = s
            .update(wi.id, None, &[add("/fields/System.Tags", json!("x; y"))], &opts())
            .unwrap();
        assert_eq!(same.rev(), 2, "a patch that changes nothing makes no revision");
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut s = store();
        let add = |p: &str, v: Value| json!({"op": "add", "path": p, "value": v});
        assert_eq!(
            s.create("Fabrikam", "Bug", &[], &opts()).unwrap_err().message,
            "TF401320: Rule Error for field Title. Error code: Required, InvalidEmpty."
        );
        let e = s
            .create("Fabrikam", "Bug", &[add("/fields/Custom.Nope", json!(1))], &opts())
            .unwrap_err();
        assert_eq!(e.type_key, "WorkItemTrackingFieldDefinitionNotFoundException");
        assert_eq!(s.create("Fabrikam", "Risk", &[], &opts()).unwrap_err().status, 404);
        let e = s
            .create(
                "Fabrikam",
                "Bug",
                &[
                    add("/fields/System.Title", json!("t")),
                    add("/fields/System.State", json!("Done")),
                ],
                &opts(),
            )
            .unwrap_err();
        assert!(e.message.contains("State"), "{e:?}");
    }
}
