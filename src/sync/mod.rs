//! Script mode: the replica format, the local work-item model and the sandboxed scripts that
//! turn one into the other, as pure code; the engine that drives them lives beside the queues.
//!
//! - [`replica`]: `relay.replica/1`, its bounds, canonical hash and idempotency key.
//! - [`workitem`]: the work item scripts see, Azure DevOps JSON in and out, the JSON Patch.
//! - [`script`]: compiling and running a side's rules in a bounded Rhai engine.
//! - [`defaults`]: the rules generated for a side at `initiate` / `accept`.
//! - [`inline`]: inline images in HTML fields and the references replicas carry for them.
//! - [`states`]: workflow states across processes, for `nodeHelper.mapState`.

pub mod blob;
pub mod defaults;
pub mod engine;
pub mod hook;
pub mod inline;
pub mod ops;
pub mod replica;
pub mod script;
pub mod state;
pub mod states;
pub mod workitem;

#[cfg(test)]
mod tests;

pub use defaults::default_rules;
pub use replica::{idempotency_key, Entity, Replica, ReplicaError};
pub use script::{compile, run_incoming, run_outgoing, Limits, Rules, ScriptError};
pub use workitem::{build_patch, Plan, WorkItem};
