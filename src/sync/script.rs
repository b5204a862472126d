//! The sandboxed Rhai engine that runs a side's sync rules: the outgoing script (work item →
//! replica entity) and the incoming script (replica → desired work item).
//!
//! The engine starts raw and gets only arithmetic, logic, string, array and map functions:
//! nothing reaches files, the network, processes or the clock, `import` does not exist
//! (`no_module`) and `eval` is disabled. Every run is bounded in operations, expression depth,
//! call levels, data sizes and wall-clock time, and each bound hit is its own clear error.
//! Rhai sizes are per value (an array counts everything inside it), not per run.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage, BasicStringPackage,
    LogicPackage, MoreStringPackage, Package,
};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, Module, Position, Scope, AST};
use serde_json::Value;

use super::replica::{Attachment, Author, Comment, Entity, EventKind, Replica, Text, TextFormat};
use super::workitem::{normalize_labels, WorkAttachment, WorkComment, WorkItem};

/// Most operations one run may take.
pub const MAX_OPERATIONS: u64 = 1_000_000;
/// Deepest expression at top level.
pub const MAX_EXPR_DEPTH: usize = 64;
/// Deepest expression inside a function.
pub const MAX_FN_EXPR_DEPTH: usize = 32;
/// Deepest nesting of function calls (recursion). Low because each level costs native stack.
pub const MAX_CALL_LEVELS: usize = 16;
/// Most text in one value, bytes (a replica carries at most 4 MiB anyway).
pub const MAX_STRING_SIZE: usize = 4 * 1024 * 1024;
/// Most items in one array, counting nested arrays.
pub const MAX_ARRAY_SIZE: usize = 50_000;
/// Most entries in one map, counting nested maps.
pub const MAX_MAP_SIZE: usize = 100_000;
/// Most variables in scope.
pub const MAX_VARIABLES: usize = 256;
/// Wall-clock budget of one run.
pub const TIME_BUDGET: Duration = Duration::from_millis(200);

/// The line that starts the outgoing script in a rules text.
pub const OUTGOING_MARKER: &str = "// ==== outgoing ====";
/// The line that starts the incoming script in a rules text.
pub const INCOMING_MARKER: &str = "// ==== incoming ====";

/// How often (in operations) the clock is read.
const CLOCK_EVERY: u64 = 64;

/// The bounds of a run, ready to be a settings section.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// [`MAX_OPERATIONS`].
    pub max_operations: u64,
    /// [`MAX_EXPR_DEPTH`].
    pub max_expr_depth: usize,
    /// [`MAX_FN_EXPR_DEPTH`].
    pub max_fn_expr_depth: usize,
    /// [`MAX_CALL_LEVELS`].
    pub max_call_levels: usize,
    /// [`MAX_STRING_SIZE`].
    pub max_string_size: usize,
    /// [`MAX_ARRAY_SIZE`].
    pub max_array_size: usize,
    /// [`MAX_MAP_SIZE`].
    pub max_map_size: usize,
    /// [`MAX_VARIABLES`].
    pub max_variables: usize,
    /// [`TIME_BUDGET`].
    pub time_budget: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: MAX_OPERATIONS,
            max_expr_depth: MAX_EXPR_DEPTH,
            max_fn_expr_depth: MAX_FN_EXPR_DEPTH,
            max_call_levels: MAX_CALL_LEVELS,
            max_string_size: MAX_STRING_SIZE,
            max_array_size: MAX_ARRAY_SIZE,
            max_map_size: MAX_MAP_SIZE,
            max_variables: MAX_VARIABLES,
            time_budget: TIME_BUDGET,
        }
    }
}

/// Which of a side's two scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Work item → replica, on the side where the change happened.
    Outgoing,
    /// Replica → work item, on the receiving side.
    Incoming,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Outgoing => "outgoing",
            Section::Incoming => "incoming",
        })
    }
}

/// A bound a run ran into.
#[derive(Debug, Clone, PartialEq)]
pub enum Limit {
    /// [`Limits::time_budget`].
    Time(Duration),
    /// [`Limits::max_operations`].
    Operations(u64),
    /// [`Limits::max_call_levels`].
    CallLevels(usize),
    /// [`Limits::max_string_size`].
    StringSize(usize),
    /// [`Limits::max_array_size`].
    ArraySize(usize),
    /// [`Limits::max_map_size`].
    MapSize(usize),
    /// [`Limits::max_variables`].
    Variables(usize),
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Time(d) => write!(f, "ran longer than {} ms", d.as_millis()),
            Limit::Operations(n) => write!(f, "ran more than {n} operations"),
            Limit::CallLevels(n) => write!(f, "nested calls deeper than {n} levels"),
            Limit::StringSize(n) => write!(f, "text in one value grew beyond {n} bytes"),
            Limit::ArraySize(n) => write!(f, "an array grew beyond {n} items"),
            Limit::MapSize(n) => write!(f, "a map grew beyond {n} entries"),
            Limit::Variables(n) => write!(f, "more than {n} variables"),
        }
    }
}

/// Why rules did not compile or a script did not produce a result.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScriptError {
    /// The rules text is not two marked sections.
    #[error("sync rules, line {line}: {message}")]
    Layout {
        /// 1-based line in the rules text.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A syntax error (or a disabled feature such as `eval`).
    #[error("{script} script, line {line}, column {column}: {message}")]
    Syntax {
        /// Which script.
        script: Section,
        /// 1-based line in the rules text.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Rhai's description.
        message: String,
    },
    /// A run hit a bound.
    #[error("{script} script stopped: {limit} (line {line})")]
    Stopped {
        /// Which script.
        script: Section,
        /// The bound.
        limit: Limit,
        /// Where it was running (0 when unknown).
        line: usize,
    },
    /// A run failed: unknown function, wrong types, a thrown error.
    #[error("{script} script failed at line {line}, column {column}: {message}")]
    Runtime {
        /// Which script.
        script: Section,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What went wrong.
        message: String,
    },
    /// The script left a value where it cannot be mapped; never dropped silently.
    #[error("{script} script: {field}: {message}")]
    Unmappable {
        /// Which script.
        script: Section,
        /// The field, as a path (`workItem.comments[2].body`).
        field: String,
        /// What was found and what was expected.
        message: String,
    },
}

/// A side's compiled sync rules, ready to run any number of times.
#[derive(Debug, Clone)]
pub struct Rules {
    source: String,
    outgoing: AST,
    incoming: AST,
    limits: Limits,
    local_types: Arc<Vec<String>>,
}

impl Rules {
    /// The text the rules were compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The bounds every run gets.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Tells `nodeHelper.getIssueType` which work item types the local process has.
    pub fn with_local_types(mut self, types: Vec<String>) -> Rules {
        self.local_types = Arc::new(types);
        self
    }
}

/// Compiles a rules text with the default [`Limits`]. This is what storing rules runs first,
/// so a syntax error is refused with its line and column.
pub fn compile(source: &str) -> Result<Rules, ScriptError> {
    compile_with(source, Limits::default())
}

/// Compiles a rules text with the given bounds.
pub fn compile_with(source: &str, limits: Limits) -> Result<Rules, ScriptError> {
    let (out_text, in_text) = split_sections(source)?;
    let engine = engine(&limits);
    let compile = |script: Section, text: &str| {
        engine.compile(text).map_err(|e| {
            let pos = e.position();
            ScriptError::Syntax {
                script,
                line: pos.line().unwrap_or(0),
                column: pos.position().unwrap_or(0),
                message: e.err_type().to_string(),
            }
        })
    };
    Ok(Rules {
        outgoing: compile(Section::Outgoing, &out_text)?,
        incoming: compile(Section::Incoming, &in_text)?,
        source: source.to_string(),
        limits,
        local_types: Arc::default(),
    })
}

/// Splits a rules text at its two markers. Each section keeps the other's lines as blank
/// lines, so line numbers in errors are those of the whole text.
fn split_sections(source: &str) -> Result<(String, String), ScriptError> {
    let mut current: Option<Section> = None;
    let mut seen_out = false;
    let mut seen_in = false;
    let (mut out, mut inc) = (String::new(), String::new());
    for (i, line) in source.lines().enumerate() {
        let marker = match line.trim() {
            OUTGOING_MARKER => Some(Section::Outgoing),
            INCOMING_MARKER => Some(Section::Incoming),
            _ => None,
        };
        if let Some(section) = marker {
            let seen = match section {
                Section::Outgoing => &mut seen_out,
                Section::Incoming => &mut seen_in,
            };
            if *seen {
                return Err(ScriptError::Layout {
                    line: i + 1,
                    message: format!("a second {section} marker"),
                });
            }
            *seen = true;
            current = Some(section);
            out.push('\n');
            inc.push('\n');
            continue;
        }
        match current {
            None => {
                let t = line.trim();
                if !(t.is_empty() || t.starts_with("//")) {
                    return Err(ScriptError::Layout {
                        line: i + 1,
                        message: format!(
                            "code before the first section marker ({OUTGOING_MARKER:?} or {INCOMING_MARKER:?})"
                        ),
                    });
                }
                out.push('\n');
                inc.push('\n');
            }
            Some(Section::Outgoing) => {
                out.push_str(line);
                out.push('\n');
                inc.push('\n');
            }
            Some(Section::Incoming) => {
                inc.push_str(line);
                inc.push('\n');
                out.push('\n');
            }
        }
    }
    let lines = source.lines().count().max(1);
    for (seen, marker) in [(seen_out, OUTGOING_MARKER), (seen_in, INCOMING_MARKER)] {
        if !seen {
            return Err(ScriptError::Layout {
                line: lines,
                message: format!("no {marker:?} line"),
            });
        }
    }
    Ok((out, inc))
}

/// The packages, built once: scripts get these and nothing else.
fn packages() -> &'static [Arc<Module>] {
    static PACKAGES: OnceLock<Vec<Arc<Module>>> = OnceLock::new();
    PACKAGES.get_or_init(|| {
        vec![
            ArithmeticPackage::new().as_shared_module(),
            LogicPackage::new().as_shared_module(),
            BasicMathPackage::new().as_shared_module(),
            BasicIteratorPackage::new().as_shared_module(),
            BasicStringPackage::new().as_shared_module(),
            MoreStringPackage::new().as_shared_module(),
            BasicArrayPackage::new().as_shared_module(),
            BasicMapPackage::new().as_shared_module(),
        ]
    })
}

/// A fresh engine per run: the time budget starts when it is built.
fn engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new_raw();
    for package in packages() {
        engine.register_global_module(package.clone());
    }
    engine.disable_symbol("eval");
    engine
        .set_max_operations(limits.max_operations)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_fn_expr_depth)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_max_variables(limits.max_variables);
    let start = Instant::now();
    let budget = limits.time_budget;
    engine.on_progress(move |ops| (ops % CLOCK_EVERY == 0 && start.elapsed() > budget).then(|| Dynamic::from("time")));
    // `print` and `debug` go nowhere: a script has no output but its result.
    engine.on_print(|_| {}).on_debug(|_, _, _| {});

    engine
        .register_type_with_name::<CommentHelper>("CommentHelper")
        .register_fn("mergeComments", merge_comments)
        .register_type_with_name::<AttachmentHelper>("AttachmentHelper")
        .register_fn("mergeAttachments", merge_attachments)
        .register_type_with_name::<NodeHelper>("NodeHelper")
        .register_fn("stripHtml", |_: NodeHelper, html: &str| strip_html(html))
        .register_fn("getIssueType", |h: NodeHelper, name: &str| {
            get_issue_type(&h.local_types, name).map_or(Dynamic::UNIT, Dynamic::from)
        });
    engine
}

/// `commentHelper` in scripts.
#[derive(Debug, Clone, Copy)]
struct CommentHelper;
/// `attachmentHelper` in scripts.
#[derive(Debug, Clone, Copy)]
struct AttachmentHelper;
/// `nodeHelper` in scripts.
#[derive(Debug, Clone)]
struct NodeHelper {
    local_types: Arc<Vec<String>>,
}

fn helpers(scope: &mut Scope, local_types: &Arc<Vec<String>>) {
    scope.push_constant("commentHelper", CommentHelper);
    scope.push_constant("attachmentHelper", AttachmentHelper);
    scope.push_constant(
        "nodeHelper",
        NodeHelper {
            local_types: local_types.clone(),
        },
    );
}

/// Runs the outgoing script on a local work item; `previous` is the last replica sent for it.
pub fn run_outgoing(rules: &Rules, item: &WorkItem, previous: Option<&Replica>) -> Result<Entity, ScriptError> {
    let script = Section::Outgoing;
    let key = item.id.map(|id| id.to_string()).unwrap_or_default();
    let start = Entity {
        key: key.clone(),
        type_name: item.type_name.clone(),
        ..Entity::default()
    };
    let mut scope = Scope::new();
    scope.push_constant("workItem", Dynamic::from_map(work_item_map(item)));
    scope.push("replica", Dynamic::from_map(entity_map(&start)));
    scope.push_constant("previous", previous.map_or(Dynamic::UNIT, replica_value));
    helpers(&mut scope, &rules.local_types);
    run(rules, script, &rules.outgoing, &mut scope)?;
    let value = scope.get_value::<Dynamic>("replica").unwrap_or(Dynamic::UNIT);
    let mapped = read_entity(&value, &key).map_err(|e| e.in_script(script))?;
    mapped.validate().map_err(|e| ScriptError::Unmappable {
        script,
        field: "replica".into(),
        message: e.to_string(),
    })?;
    Ok(mapped)
}

/// Runs the incoming script: `current` is the local twin as read now (or
/// [`WorkItem::default`] before it exists); the result is the work item the script wants.
pub fn run_incoming(
    rules: &Rules,
    replica: &Replica,
    previous: Option<&Replica>,
    current: &WorkItem,
    first_sync: bool,
) -> Result<WorkItem, ScriptError> {
    let script = Section::Incoming;
    let mut scope = Scope::new();
    let mut remote = entity_map(&replica.entity);
    added_removed(&mut remote, &replica.entity, previous.map(|p| &p.entity));
    remote.insert("origin".into(), origin_map(replica));
    remote.insert(
        "eventKind".into(),
        match replica.event.kind {
            EventKind::Upsert => "upsert",
            EventKind::Delete => "delete",
        }
        .into(),
    );
    scope.push_constant("replica", Dynamic::from_map(remote));
    scope.push_constant("previous", previous.map_or(Dynamic::UNIT, replica_value));
    scope.push("workItem", Dynamic::from_map(work_item_map(current)));
    scope.push_constant("firstSync", first_sync);
    helpers(&mut scope, &rules.local_types);
    run(rules, script, &rules.incoming, &mut scope)?;
    let value = scope.get_value::<Dynamic>("workItem").unwrap_or(Dynamic::UNIT);
    let desired = read_work_item(&value, current).map_err(|e| e.in_script(script))?;
    if current.id.is_none() {
        for (field, v) in [("projectKey", &desired.project_key), ("typeName", &desired.type_name)] {
            if v.trim().is_empty() {
                return Err(ScriptError::Unmappable {
                    script,
                    field: format!("workItem.{field}"),
                    message: "empty for an item to create; set it in the `if firstSync` block".into(),
                });
            }
        }
    }
    Ok(desired)
}

fn run(rules: &Rules, script: Section, ast: &AST, scope: &mut Scope) -> Result<(), ScriptError> {
    let engine = engine(&rules.limits);
    engine
        .run_ast_with_scope(scope, ast)
        .map_err(|e| runtime_error(script, &e, &rules.limits))
}

fn runtime_error(script: Section, err: &EvalAltResult, limits: &Limits) -> ScriptError {
    let inner = err.unwrap_inner();
    let pos = match inner.position() {
        p if p.is_none() => err.position(),
        p => p,
    };
    let line = pos.line().unwrap_or(0);
    let stopped = |limit| ScriptError::Stopped { script, limit, line };
    match inner {
        EvalAltResult::ErrorTerminated(..) => stopped(Limit::Time(limits.time_budget)),
        EvalAltResult::ErrorTooManyOperations(..) => stopped(Limit::Operations(limits.max_operations)),
        EvalAltResult::ErrorStackOverflow(..) => stopped(Limit::CallLevels(limits.max_call_levels)),
        EvalAltResult::ErrorTooManyVariables(..) => stopped(Limit::Variables(limits.max_variables)),
        EvalAltResult::ErrorDataTooLarge(what, ..) if what.contains("string") => {
            stopped(Limit::StringSize(limits.max_string_size))
        }
        EvalAltResult::ErrorDataTooLarge(what, ..) if what.contains("array") => {
            stopped(Limit::ArraySize(limits.max_array_size))
        }
        EvalAltResult::ErrorDataTooLarge(what, ..) if what.contains("map") => {
            stopped(Limit::MapSize(limits.max_map_size))
        }
        other => {
            // The position is reported in its own fields, not twice.
            let mut message = other.to_string();
            if let Some(at) = message.rfind(" (line ") {
                message.truncate(at);
            }
            ScriptError::Runtime {
                script,
                line,
                column: pos.position().unwrap_or(0),
                message,
            }
        }
    }
}

// ---- helpers the scripts call ----

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

/// `commentHelper.mergeComments(workItem, replica)`: the work item's comments, then every
/// replica comment not copied yet (matched by remote id). Local comments are kept; running it
/// again adds nothing.
fn merge_comments(_: CommentHelper, item: Map, replica: Map) -> RhaiResult<Array> {
    let mut out = list(&item, "comments", "workItem")?;
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

/// `attachmentHelper.mergeAttachments(workItem, replica)`: the work item's attachments, then
/// every replica attachment not copied yet (matched by remote id, or by equal content).
fn merge_attachments(_: AttachmentHelper, item: Map, replica: Map) -> RhaiResult<Array> {
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

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A comment body as the HTML Azure DevOps stores.
fn to_html(text: &str, format: &str) -> String {
    match format {
        "html" => text.to_string(),
        _ => escape_html(text).replace('\n', "<br>"),
    }
}

// ---- values in and out of scripts ----

/// A value that could not be mapped, before it knows which script.
#[derive(Debug)]
struct MapError {
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

    fn in_script(self, script: Section) -> ScriptError {
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

fn work_item_map(w: &WorkItem) -> Map {
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
    m.insert("customFields".into(), custom_map(&w.custom_fields));
    m
}

fn entity_map(e: &Entity) -> Map {
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
    m.insert("customFields".into(), custom_map(&e.custom_fields));
    m
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

fn replica_value(r: &Replica) -> Dynamic {
    let mut m = entity_map(&r.entity);
    m.insert("origin".into(), origin_map(r));
    Dynamic::from_map(m)
}

fn origin_map(r: &Replica) -> Dynamic {
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
fn added_removed(m: &mut Map, now: &Entity, previous: Option<&Entity>) {
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
    m.insert("addedComments".into(), Dynamic::from_array(added));
    m.insert("removedComments".into(), Dynamic::from_array(removed));
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
    "customFields",
];

/// The entity the outgoing script left in `replica`. Comments and attachments relay copied
/// from the other side (they have a `remoteId`) are not sent back: that would echo them.
fn read_entity(v: &Dynamic, key: &str) -> Result<Entity, MapError> {
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
    })
}

const WORK_ITEM_KEYS: &[&str] = &[
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
    "customFields",
];

/// The work item the incoming script left in `workItem`.
fn read_work_item(v: &Dynamic, current: &WorkItem) -> Result<WorkItem, MapError> {
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
        custom_fields: custom_fields(get(&m, "customFields", f)?, "workItem.customFields")?,
    })
}
