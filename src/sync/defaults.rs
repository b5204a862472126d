//! The default sync rules generated for a side at `initiate` and `accept`.
//!
//! Both scripts live in one text, split by [`OUTGOING_MARKER`] and [`INCOMING_MARKER`]: an
//! operator edits, shows and stores one thing per connection, and the two halves can be read
//! side by side. Line numbers in errors are those of the whole text.

use super::script::{INCOMING_MARKER, OUTGOING_MARKER};

/// The field that holds a Bug's text in the Agile, Scrum and CMMI processes.
pub const REPRO_STEPS: &str = "Microsoft.VSTS.TCM.ReproSteps";

/// The default rules for a side whose incoming items go to `project`: they sync summary,
/// description, labels, comments, attachments, the assignee and links both ways, with commented
/// examples (state, priority, paths, custom fields), each one line away.
pub fn default_rules(project: &str) -> String {
    let project = rhai_string(project);
    format!(
        r#"// Sync rules of this side of the connection: two scripts in one text.
// The outgoing script runs when a work item here changes and fills the replica sent to the
// other side. The incoming script runs when a replica arrives and shapes the work item here.
// The other side never sees these rules, nor this side theirs. Above the first marker: only
// comments. The language is Rhai (https://rhai.rs); `??` picks a fallback for ().

{OUTGOING_MARKER}
replica.type = workItem.typeName;
replica.summary = workItem.summary;
// The text a person reads: a Bug's repro steps (Agile, Scrum, CMMI), any other type's description.
replica.description = if workItem.typeName == "Bug" {{ workItem.customFields["{REPRO_STEPS}"] ?? workItem.description }} else {{ workItem.description }};
replica.labels = workItem.labels;
replica.comments = workItem.comments;
replica.attachments = workItem.attachments;
// Comments and attachments relay copied here from the other side are never sent back.
// The person it is assigned to (display name and unique name, the e-mail address):
replica.assignee = workItem.assignee;
// Links to other work items (parent, child, related, duplicate, predecessor, successor):
replica.links = workItem.links;
// Each of the following is one line to uncomment (the other side's rules decide what to do
// with them). State, priority, area and iteration path:
// replica.status = workItem.status;
// replica.priority = workItem.priority;
// replica.customFields["areaPath"] = workItem.areaPath;
// replica.customFields["iterationPath"] = workItem.iterationPath;
// Who created it (read only here), and a custom field:
// replica.creator = workItem.creator;
// replica.customFields["Custom.Team"] = workItem.customFields["Custom.Team"];

{INCOMING_MARKER}
if firstSync {{
    workItem.projectKey = {project};
    workItem.typeName = nodeHelper.getIssueType(replica.type) ?? "Task";
}}
workItem.summary = replica.summary;
workItem.description = replica.description;
// A Bug shows its repro steps instead (Agile, Scrum, CMMI): the text goes there too.
if workItem.typeName == "Bug" {{ workItem.customFields["{REPRO_STEPS}"] = replica.description; }}
workItem.labels = replica.labels;
workItem.comments = commentHelper.mergeComments(workItem, replica);
workItem.attachments = attachmentHelper.mergeAttachments(workItem, replica);
// The same person by unique name; one this tracker does not know leaves the field as it
// was and shows in `relay sync warnings`. Map people of your own with a map of unique names.
workItem.assignee = replica.assignee;
// The same links between the twins; one to an item not synced yet is made when it arrives.
workItem.links = linkHelper.mapLinks(workItem, replica);
// Each of the following is one line to uncomment.
// The other side's state as one this type has: the same name, else the same category
// (New, Approved, To Do · Active, Committed, Doing · Resolved · Closed, Done · Removed):
// if replica.status != () {{ workItem.status = nodeHelper.mapState(replica.status, workItem.typeName) ?? workItem.status; }}
// Or a map of your own, the other side's state on the left:
// let statusMap = #{{ "New": "New", "Active": "Active", "Resolved": "Resolved", "Closed": "Closed", "Done": "Closed" }};
// Priority (1 to 4 in Azure DevOps):
// workItem.priority = replica.priority ?? workItem.priority;
// Area and iteration path, moved onto this project (the nodes under it must exist here):
// workItem.areaPath = nodeHelper.mapPath(replica.customFields["areaPath"], workItem.projectKey) ?? workItem.areaPath;
// workItem.iterationPath = nodeHelper.mapPath(replica.customFields["iterationPath"], workItem.projectKey) ?? workItem.iterationPath;
// A custom field, with a fallback when the other side sends none:
// workItem.customFields["Custom.Team"] = replica.customFields["Custom.Team"] ?? "Blue";
// Other helpers: nodeHelper.stripHtml(text), replica.addedComments, replica.removedComments,
// previous (the last replica received for this item, or ()).
"#
    )
}

/// `text` as a Rhai string literal: quotes, backslashes and control characters escaped, so
/// a project name can never end the string or add code.
pub fn rhai_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
