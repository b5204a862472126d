//! The helpers scripts call: `commentHelper`, `attachmentHelper` and `nodeHelper`.

use std::sync::Arc;

use rhai::{Array, Dynamic, EvalAltResult, Map, Position};

/// `commentHelper` in scripts.
#[derive(Debug, Clone, Copy)]
pub(super) struct CommentHelper;
/// `attachmentHelper` in scripts.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttachmentHelper;
/// `nodeHelper` in scripts.
#[derive(Debug, Clone)]
pub(super) struct NodeHelper {
    pub(super) local_types: Arc<crate::sync::states::LocalTypes>,
}

/// Which items have a twin, for the items one apply concerns: the other side's keys that
/// have one here (with this side's id), and this side's ids that have one.
#[derive(Debug, Clone, Default)]
pub struct Twins {
    /// The other side's key → this side's id.
    pub by_remote: std::collections::BTreeMap<String, u64>,
    /// This side's ids that have a twin.
    pub synced: std::collections::BTreeSet<u64>,
}

/// `linkHelper` in scripts.
#[derive(Debug, Clone)]
pub(super) struct LinkHelper {
    pub(super) twins: Arc<Twins>,
}

/// What a helper returns to the script: a value, or an error the script sees at its call.
type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

fn script_err(message: String) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(message.into(), Position::NONE))
}

fn list(map: &Map, key: &str, what: &str) -> RhaiResult<Array> {
    match map.get(key) {
        Some(v) if v.is_array() => Ok(v.clone().into_array().unwrap_or_default()),
        Some(v) if v.is_unit() => Ok(Array::new()),
        Some(v) => Err(script_err(format!("{what}.{key} is a {}, not an array", v.type_name()))),
        None => Err(script_err(format!("{what} has no {key}"))),
    }
}

fn str_of(map: &Map, key: &str) -> Option<String> {
    map.get(key).filter(|v| !v.is_unit()).map(|v| v.to_string())
}

/// The ids of a replica's comment list (`removedComments`, `editedComments`); none when the
/// map has no such list (a replica a script made up).
fn ids_of(replica: &Map, key: &str) -> RhaiResult<Vec<String>> {
    if !replica.contains_key(key) {
        return Ok(Vec::new());
    }
    Ok(list(replica, key, "replica")?
        .iter()
        .filter_map(|c| c.read_lock::<Map>().and_then(|m| str_of(&m, "id")))
        .collect())
}

/// `commentHelper.mergeComments(workItem, replica)`: the work item's comments, then every
/// replica comment not copied yet (matched by remote id). A copy whose original was edited on
/// the other side since the previous replica takes its new text; one whose original was
/// deleted there is left out (and so deleted). Local comments are kept as they are; running
/// it again changes nothing.
pub(super) fn merge_comments(_: CommentHelper, item: Map, replica: Map) -> RhaiResult<Array> {
    let removed = ids_of(&replica, "removedComments")?;
    let edited = ids_of(&replica, "editedComments")?;
    let remote_text = |id: &str| -> RhaiResult<Option<String>> {
        for c in list(&replica, "comments", "replica")? {
            let Some(m) = c.read_lock::<Map>().map(|m| m.clone()) else {
                continue;
            };
            if str_of(&m, "id").as_deref() == Some(id) {
                let format = str_of(&m, "format").unwrap_or_else(|| "html".into());
                return Ok(Some(to_html(&str_of(&m, "body").unwrap_or_default(), &format)));
            }
        }
        Ok(None)
    };
    let mut out = Array::new();
    for c in list(&item, "comments", "workItem")? {
        let copy_of = c.read_lock::<Map>().and_then(|m| str_of(&m, "remoteId"));
        match copy_of {
            Some(r) if removed.contains(&r) => continue,
            Some(r) if edited.contains(&r) => {
                let mut m = c.read_lock::<Map>().map(|m| m.clone()).unwrap_or_default();
                if let Some(text) = remote_text(&r)? {
                    m.insert("body".into(), text.into());
                }
                out.push(Dynamic::from_map(m));
            }
            _ => out.push(c),
        }
    }
    let copied: Vec<String> = out
        .iter()
        .filter_map(|c| c.read_lock::<Map>().and_then(|m| str_of(&m, "remoteId")))
        .collect();
    for c in list(&replica, "comments", "replica")? {
        let Some(m) = c.read_lock::<Map>().map(|m| m.clone()) else {
            return Err(script_err(format!("replica.comments holds a {}", c.type_name())));
        };
        let Some(id) = str_of(&m, "id") else { continue };
        if copied.contains(&id) {
            continue;
        }
        let body = str_of(&m, "body").unwrap_or_default();
        let format = str_of(&m, "format").unwrap_or_else(|| "html".into());
        let mut new = Map::new();
        new.insert("id".into(), Dynamic::UNIT);
        new.insert("remoteId".into(), id.into());
        new.insert("author".into(), m.get("author").cloned().unwrap_or(Dynamic::UNIT));
        new.insert("created".into(), m.get("created").cloned().unwrap_or_else(|| "".into()));
        new.insert("body".into(), to_html(&body, &format).into());
        out.push(Dynamic::from_map(new));
    }
    Ok(out)
}

/// `linkHelper.mapLinks(workItem, replica)`: the work item's links to items the other side
/// does not have (kept as they are), then each link of the replica whose other item has a
/// twin here, to that twin. A link to an item not synced yet is left out; it is made from the
/// other end when that item arrives (Azure DevOps links are two-sided).
pub(super) fn map_links(h: LinkHelper, item: Map, replica: Map) -> RhaiResult<Array> {
    let mut out = Array::new();
    let mut seen: Vec<(String, i64)> = Vec::new();
    let mut push = |out: &mut Array, rel: String, id: i64| {
        if seen.iter().any(|(r, i)| *i == id && r.eq_ignore_ascii_case(&rel)) {
            return;
        }
        seen.push((rel.clone(), id));
        let mut m = Map::new();
        m.insert("rel".into(), rel.into());
        m.insert("id".into(), Dynamic::from_int(id));
        out.push(Dynamic::from_map(m));
    };
    for l in list(&item, "links", "workItem")? {
        let Some(m) = l.read_lock::<Map>().map(|m| m.clone()) else {
            return Err(script_err(format!("workItem.links holds a {}", l.type_name())));
        };
        let id = m.get("id").and_then(|v| v.as_int().ok());
        match (str_of(&m, "rel"), id) {
            (Some(rel), Some(id)) if !h.twins.synced.contains(&(id as u64)) => push(&mut out, rel, id),
            _ => {}
        }
    }
    for l in list(&replica, "links", "replica")? {
        let Some(m) = l.read_lock::<Map>().map(|m| m.clone()) else {
            return Err(script_err(format!("replica.links holds a {}", l.type_name())));
        };
        let local = str_of(&m, "key").and_then(|k| h.twins.by_remote.get(&k).copied());
        if let (Some(rel), Some(local)) = (str_of(&m, "rel"), local) {
            push(&mut out, rel, local as i64);
        }
    }
    Ok(out)
}

/// `linkHelper.localId(key)`: this side's twin of the other side's item `key`, or `()`.
pub(super) fn local_id(h: LinkHelper, key: Dynamic) -> Dynamic {
    let key = if let Ok(i) = key.as_int() {
        i.to_string()
    } else {
        key.to_string()
    };
    h.twins
        .by_remote
        .get(&key)
        .map_or(Dynamic::UNIT, |id| Dynamic::from_int(*id as i64))
}

/// `attachmentHelper.mergeAttachments(workItem, replica)`: the work item's attachments, then
/// every replica attachment not copied yet (matched by remote id, or by equal content).
pub(super) fn merge_attachments(_: AttachmentHelper, item: Map, replica: Map) -> RhaiResult<Array> {
    let mut out = list(&item, "attachments", "workItem")?;
    let mut copied: Vec<String> = Vec::new();
    let mut hashes: Vec<String> = Vec::new();
    for a in &out {
        if let Some(m) = a.read_lock::<Map>() {
            copied.extend(str_of(&m, "remoteId"));
            hashes.extend(str_of(&m, "sha256").filter(|h| !h.is_empty()));
        }
    }
    for a in list(&replica, "attachments", "replica")? {
        let Some(m) = a.read_lock::<Map>().map(|m| m.clone()) else {
            return Err(script_err(format!("replica.attachments holds a {}", a.type_name())));
        };
        let Some(id) = str_of(&m, "id") else { continue };
        let sha = str_of(&m, "sha256").unwrap_or_default();
        if copied.contains(&id) || (!sha.is_empty() && hashes.contains(&sha)) {
            continue;
        }
        let mut new = m.clone();
        new.insert("id".into(), Dynamic::UNIT);
        new.insert("remoteId".into(), id.into());
        new.insert("url".into(), Dynamic::UNIT);
        out.push(Dynamic::from_map(new));
    }
    Ok(out)
}

/// Groups of type names that mean the same kind of item across processes (Agile, Scrum, CMMI,
/// Basic) and other trackers, in order of preference.
const TYPE_GROUPS: &[&[&str]] = &[
    &["Bug", "Defect", "Issue"],
    &["User Story", "Product Backlog Item", "Requirement", "Story", "Issue"],
    &["Task", "Sub-task", "Subtask"],
    &["Feature"],
    &["Epic"],
    &["Impediment", "Issue", "Risk"],
    &["Test Case"],
];

/// `nodeHelper.getIssueType(name)`: the local type for a remote type name, or `None`
/// (`()` in scripts, so `?? "Task"` picks a fallback). Without a list of local types, the
/// name passes through.
pub fn get_issue_type(local_types: &[String], name: &str) -> Option<String> {
    let name = name.trim();
    if local_types.is_empty() {
        return (!name.is_empty()).then(|| name.to_string());
    }
    let local = |wanted: &str| local_types.iter().find(|t| t.eq_ignore_ascii_case(wanted));
    if let Some(t) = local(name) {
        return Some(t.clone());
    }
    TYPE_GROUPS
        .iter()
        .filter(|g| g.iter().any(|n| n.eq_ignore_ascii_case(name)))
        .find_map(|g| g.iter().find_map(|n| local(n)))
        .cloned()
}

/// `nodeHelper.mapPath(path, project)`: an area or iteration path of the other side with its
/// root (the other project's name) replaced by `project`, so `Fabrikam\Web\Sprint 3` becomes
/// `Contoso\Web\Sprint 3`; `()` for an empty path. The nodes under the root must exist here.
pub fn map_path(path: &str, project: &str) -> Option<String> {
    let path = path.trim().trim_matches('\\');
    if path.is_empty() || project.is_empty() {
        return None;
    }
    Some(match path.split_once('\\') {
        Some((_, rest)) => format!("{project}\\{rest}"),
        None => project.to_owned(),
    })
}

/// `nodeHelper.stripHtml(text)`: the text of some HTML, tags removed, entities decoded,
/// block ends and `<br>` as new lines.
pub fn strip_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        out.push_str(&decode_entities(&rest[..lt]));
        let Some(gt) = rest[lt..].find('>') else {
            out.push_str(&decode_entities(&rest[lt..]));
            rest = "";
            break;
        };
        let tag = rest[lt + 1..lt + gt].trim().to_ascii_lowercase();
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let closing = tag.starts_with('/');
        rest = &rest[lt + gt + 1..];
        if (name == "script" || name == "style") && !closing {
            // Their content is not text.
            let end = format!("</{name}");
            match rest.to_ascii_lowercase().find(&end) {
                Some(i) => rest = rest[i..].find('>').map_or("", |j| &rest[i + j + 1..]),
                None => rest = "",
            }
            continue;
        }
        let breaks = name == "br"
            || (closing
                && matches!(
                    name.as_str(),
                    "p" | "div" | "li" | "tr" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6"
                ));
        if breaks && !out.ends_with('\n') && !out.is_empty() {
            out.push('\n');
        }
    }
    out.push_str(&decode_entities(rest));
    out.trim().to_string()
}

fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest[..rest.len().min(12)].find(';');
        let decoded = end.and_then(|end| {
            let name = &rest[1..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                _ if name.starts_with("#x") || name.starts_with("#X") => {
                    u32::from_str_radix(&name[2..], 16).ok().and_then(char::from_u32)
                }
                _ if name.starts_with('#') => name[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Text as HTML: `&`, `<`, `>` and `"` escaped.
pub fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A comment body as the HTML Azure DevOps stores.
pub(super) fn to_html(text: &str, format: &str) -> String {
    match format {
        "html" => text.to_string(),
        _ => escape_html(text).replace('\n', "<br>"),
    }
}
