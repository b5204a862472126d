//! The collection's data: projects and their work item types, the field catalogue, work items
//! as lists of revisions, comments and attachments. Plain data; the rules live in `store`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The storage type of a field, which decides coercion, WIQL comparison and whether the
/// reporting feed treats it as long text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Short text (up to 255 characters on the service).
    String,
    /// Whole number.
    Integer,
    /// Decimal number.
    Double,
    /// Instant, stored formatted.
    DateTime,
    /// Long text holding HTML (Description, History, ReproSteps).
    Html,
    /// Long text without markup.
    PlainText,
    /// A person, stored as `Display Name <unique@name>`.
    Identity,
    /// An area or iteration path.
    TreePath,
    /// True or false.
    Boolean,
}

impl Kind {
    /// Long text: left out of the reporting feed unless `$expand=fields`.
    pub fn is_long_text(self) -> bool {
        matches!(self, Kind::Html | Kind::PlainText)
    }
}

/// One field of the collection's catalogue.
#[derive(Debug, Clone)]
pub struct FieldDef {
    /// Reference name, e.g. `System.Title`.
    pub reference: String,
    /// Friendly name, e.g. `Title`.
    pub name: String,
    /// Storage type.
    pub kind: Kind,
    /// Computed by the server; writable only with `bypassRules` where the service allows it.
    pub read_only: bool,
}

/// The built-in fields: the `System.*` core and the common `Microsoft.VSTS.*` ones.
pub fn builtin_fields() -> Vec<FieldDef> {
    use Kind::*;
    let f = |r: &str, n: &str, k, ro| FieldDef {
        reference: r.into(),
        name: n.into(),
        kind: k,
        read_only: ro,
    };
    vec![
        f("System.Id", "ID", Integer, true),
        f("System.Rev", "Rev", Integer, true),
        f("System.Watermark", "Watermark", Integer, true),
        f("System.Title", "Title", String, false),
        f("System.Description", "Description", Html, false),
        f("System.History", "History", Html, false),
        f("System.State", "State", String, false),
        f("System.Reason", "Reason", String, false),
        f("System.Tags", "Tags", PlainText, false),
        f("System.AreaPath", "Area Path", TreePath, false),
        f("System.IterationPath", "Iteration Path", TreePath, false),
        f("System.WorkItemType", "Work Item Type", String, true),
        f("System.TeamProject", "Team Project", String, true),
        f("System.AssignedTo", "Assigned To", Identity, false),
        f("System.CreatedDate", "Created Date", DateTime, true),
        f("System.CreatedBy", "Created By", Identity, true),
        f("System.ChangedDate", "Changed Date", DateTime, true),
        f("System.ChangedBy", "Changed By", Identity, true),
        f("System.AuthorizedDate", "Authorized Date", DateTime, true),
        f("System.RevisedDate", "Revised Date", DateTime, true),
        f("System.CommentCount", "Comment Count", Integer, true),
        f("Microsoft.VSTS.Common.Priority", "Priority", Integer, false),
        f("Microsoft.VSTS.Common.Severity", "Severity", String, false),
        f("Microsoft.VSTS.Common.ValueArea", "Value Area", String, false),
        f(
            "Microsoft.VSTS.Common.StateChangeDate",
            "State Change Date",
            DateTime,
            true,
        ),
        f(
            "Microsoft.VSTS.Common.AcceptanceCriteria",
            "Acceptance Criteria",
            Html,
            false,
        ),
        f("Microsoft.VSTS.TCM.ReproSteps", "Repro Steps", Html, false),
        f("Microsoft.VSTS.Scheduling.StoryPoints", "Story Points", Double, false),
        f(
            "Microsoft.VSTS.Scheduling.RemainingWork",
            "Remaining Work",
            Double,
            false,
        ),
    ]
}

/// Fields whose value the server computes but `bypassRules` may set (migrations do).
pub const BYPASS_WRITABLE: [&str; 4] = [
    "System.CreatedDate",
    "System.CreatedBy",
    "System.ChangedDate",
    "System.ChangedBy",
];

/// The long-text fields the tags-style `;` normalisation must not touch, etc.
pub const TAGS: &str = "System.Tags";

/// A work item type of a project's process, with its states (the first is the default).
#[derive(Debug, Clone)]
pub struct WorkItemType {
    /// Name, e.g. `User Story`.
    pub name: String,
    /// Allowed states; `states[0]` is where a new item starts.
    pub states: Vec<String>,
}

/// The category Azure DevOps gives a default state of its processes.
pub fn state_category(state: &str) -> &'static str {
    match state {
        "New" | "Proposed" | "To Do" | "Approved" => "Proposed",
        "Active" | "Doing" | "Committed" | "In Progress" | "Open" => "InProgress",
        "Resolved" => "Resolved",
        "Removed" => "Removed",
        _ => "Completed",
    }
}

/// The types of the Scrum process.
pub fn scrum_types() -> Vec<WorkItemType> {
    let t = |n: &str, s: &[&str]| WorkItemType {
        name: n.into(),
        states: s.iter().map(|x| x.to_string()).collect(),
    };
    let backlog = &["New", "Approved", "Committed", "Done", "Removed"];
    vec![
        t("Product Backlog Item", backlog),
        t("Bug", backlog),
        t("Task", &["To Do", "In Progress", "Done", "Removed"]),
        t("Feature", &["New", "In Progress", "Done", "Removed"]),
        t("Epic", &["New", "In Progress", "Done", "Removed"]),
        t("Impediment", &["Open", "Closed"]),
    ]
}

/// The types of the Agile process, which new projects get unless told otherwise.
pub fn agile_types() -> Vec<WorkItemType> {
    let t = |n: &str, s: &[&str]| WorkItemType {
        name: n.into(),
        states: s.iter().map(|x| x.to_string()).collect(),
    };
    vec![
        t("Bug", &["New", "Active", "Resolved", "Closed"]),
        t("Task", &["New", "Active", "Closed", "Removed"]),
        t("User Story", &["New", "Active", "Resolved", "Closed", "Removed"]),
        t("Feature", &["New", "Active", "Resolved", "Closed", "Removed"]),
        t("Epic", &["New", "Active", "Resolved", "Closed", "Removed"]),
        t("Issue", &["Active", "Closed"]),
    ]
}

/// A project of the collection.
#[derive(Debug, Clone)]
pub struct Project {
    /// GUID.
    pub id: String,
    /// Name, unique case-insensitively.
    pub name: String,
    /// Its work item types.
    pub types: Vec<WorkItemType>,
}

/// A link from a work item: another item, a hyperlink, an attachment.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// Relation type, e.g. `AttachedFile`, `Hyperlink`, `System.LinkTypes.Related`.
    pub rel: String,
    /// Target URL.
    pub url: String,
    /// Attributes (`comment`, `name`, `resourceSize`, …).
    pub attributes: Map<String, Value>,
}

/// Which comment a revision added, edited or deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct CommentRef {
    /// Comment id.
    pub comment_id: u64,
    /// The comment's version after this revision.
    pub version: u32,
    /// The revision that first added the comment.
    pub created_in_revision: u32,
    /// Whether this revision deleted it.
    pub is_deleted: bool,
    /// Text at that version.
    pub text: String,
}

/// One revision: the full state of a work item after one change.
#[derive(Debug, Clone)]
pub struct Revision {
    /// Revision number, from 1.
    pub rev: u32,
    /// Field values by reference name (identities as `Name <unique>`).
    pub fields: BTreeMap<String, Value>,
    /// Links.
    pub relations: Vec<Relation>,
    /// When it was made (also `System.ChangedDate`).
    pub changed_ms: i64,
    /// The comment this revision touched, if any.
    pub comment: Option<CommentRef>,
}

/// A work item and its history.
#[derive(Debug, Clone)]
pub struct WorkItem {
    /// Collection-wide id.
    pub id: u64,
    /// Owning project id.
    pub project_id: String,
    /// Every revision, oldest first; never empty.
    pub revisions: Vec<Revision>,
    /// Comments (7.x/6.0 comments API).
    pub comments: Vec<Comment>,
    /// In the recycle bin.
    pub deleted: bool,
}

impl WorkItem {
    /// The current revision.
    pub fn latest(&self) -> &Revision {
        // A work item is created with its first revision and revisions are never removed.
        &self.revisions[self.revisions.len() - 1]
    }

    /// The current revision number.
    pub fn rev(&self) -> u32 {
        self.latest().rev
    }
}

/// A comment of the comments API.
#[derive(Debug, Clone)]
pub struct Comment {
    /// Collection-wide id.
    pub id: u64,
    /// Starts at 1, +1 per edit or delete.
    pub version: u32,
    /// Text as written (markdown or html).
    pub text: String,
    /// `html` or `markdown`.
    pub format: &'static str,
    /// Author, `Name <unique>`.
    pub created_by: String,
    /// When written.
    pub created_ms: i64,
    /// Last editor.
    pub modified_by: String,
    /// Last edit.
    pub modified_ms: i64,
    /// Deleted (kept for `includeDeleted`).
    pub deleted: bool,
    /// The work item revision that added it.
    pub created_in_revision: u32,
}

/// An uploaded attachment (simple or chunked).
#[derive(Debug, Clone)]
pub struct Attachment {
    /// GUID.
    pub id: String,
    /// File name given at upload.
    pub file_name: String,
    /// Bytes received so far.
    pub data: Vec<u8>,
    /// Total length announced by the chunks' `Content-Range` (chunked uploads).
    pub expected_len: Option<u64>,
    /// All bytes are there.
    pub complete: bool,
    /// Upload time.
    pub created_ms: i64,
}

/// A person known to the simulator (a PAT's owner, or the "human" editor of tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Display name.
    pub display_name: String,
    /// Unique (sign-in) name, an e-mail address.
    pub unique_name: String,
}

impl Identity {
    /// The `Name <unique>` form identity fields are written in.
    pub fn combined(&self) -> String {
        format!("{} <{}>", self.display_name, self.unique_name)
    }

    /// Parses `Name <unique>`, or a bare unique name.
    pub fn parse(s: &str) -> Identity {
        let s = s.trim();
        match (s.rfind('<'), s.ends_with('>')) {
            (Some(i), true) => Identity {
                display_name: s[..i].trim().to_string(),
                unique_name: s[i + 1..s.len() - 1].trim().to_string(),
            },
            _ => Identity {
                display_name: s.to_string(),
                unique_name: s.to_string(),
            },
        }
    }
}
