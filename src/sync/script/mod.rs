//! The sandboxed Rhai engine that runs a side's sync rules: the outgoing script (work item →
//! replica entity) and the incoming script (replica → desired work item).
//!
//! The engine starts raw and gets only arithmetic, logic, string, array and map functions:
//! nothing reaches files, the network, processes or the clock, `import` does not exist
//! (`no_module`) and `eval` is disabled. Every run is bounded in operations, expression depth,
//! call levels, data sizes and wall-clock time, and each bound hit is its own clear error.
//! Rhai sizes are per value (an array counts everything inside it), not per run.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage, BasicStringPackage,
    LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, Module, Scope, AST};

use super::replica::{Entity, EventKind, Replica};
use super::workitem::WorkItem;

mod helpers;
mod values;

pub use helpers::Twins;
pub use helpers::{escape_html, get_issue_type, map_path, strip_html};
use helpers::{
    local_id, map_links, merge_attachments, merge_comments, AttachmentHelper, CommentHelper, LinkHelper, NodeHelper,
};

use crate::sync::states::{map_state, LocalTypes};
use values::{added_removed, entity_map, origin_map, read_entity, read_work_item, replica_value, work_item_map};

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
    local_types: Arc<LocalTypes>,
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

    /// Tells `nodeHelper.getIssueType` and `nodeHelper.mapState` which work item types, and
    /// which states of each, the local process has.
    pub fn with_local_types(mut self, types: LocalTypes) -> Rules {
        self.local_types = Arc::new(types);
        self
    }

    /// What [`Rules::with_local_types`] told.
    pub fn local_types(&self) -> &LocalTypes {
        &self.local_types
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
        .register_type_with_name::<LinkHelper>("LinkHelper")
        .register_fn("mapLinks", map_links)
        .register_fn("localId", local_id)
        .register_type_with_name::<NodeHelper>("NodeHelper")
        .register_fn("stripHtml", |_: NodeHelper, html: &str| strip_html(html))
        .register_fn("getIssueType", |h: NodeHelper, name: &str| {
            get_issue_type(&h.local_types.names, name).map_or(Dynamic::UNIT, Dynamic::from)
        })
        .register_fn("mapPath", |_: NodeHelper, path: Dynamic, project: &str| {
            path.into_string()
                .ok()
                .and_then(|p| map_path(&p, project))
                .map_or(Dynamic::UNIT, Dynamic::from)
        })
        .register_fn("mapState", |h: NodeHelper, state: Dynamic, type_name: &str| {
            state
                .into_string()
                .ok()
                .and_then(|s| map_state(&h.local_types, type_name, &s))
                .map_or(Dynamic::UNIT, Dynamic::from)
        });
    engine
}

/// `commentHelper`, `attachmentHelper`, `linkHelper` and `nodeHelper` in scripts.
fn helpers(scope: &mut Scope, local_types: &Arc<LocalTypes>, twins: Arc<Twins>) {
    scope.push_constant("commentHelper", CommentHelper);
    scope.push_constant("attachmentHelper", AttachmentHelper);
    scope.push_constant("linkHelper", LinkHelper { twins });
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
    helpers(&mut scope, &rules.local_types, Arc::default());
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
    run_incoming_linked(rules, replica, previous, current, first_sync, Twins::default())
}

/// [`run_incoming`] with the twins `linkHelper` maps links by.
pub fn run_incoming_linked(
    rules: &Rules,
    replica: &Replica,
    previous: Option<&Replica>,
    current: &WorkItem,
    first_sync: bool,
    twins: Twins,
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
    helpers(&mut scope, &rules.local_types, Arc::new(twins));
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
