//! Errors of operator commands, each with the exit code the CLI reports for it.

use serde::{Deserialize, Serialize};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command failed (storage, network, a conflict).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the invitation was refused (malformed, expired, reused, locked, wrong pin).
pub const EXIT_INVITATION: u8 = 3;
/// Exit status: bad configuration, or every connection revoked; a supervisor must not restart.
pub const EXIT_CONFIG: u8 = 78;

/// What kind of failure, which decides the exit code.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Bad arguments.
    Invalid,
    /// No such thing.
    NotFound,
    /// Conflicts with what exists.
    Conflict,
    /// The invitation was refused.
    Invitation,
    /// The peer could not be reached.
    Unreachable,
    /// Bad configuration.
    Config,
    /// The connection was revoked.
    Revoked,
    /// Anything else.
    Failed,
}

/// A failed operator command.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Kind.
    pub kind: Kind,
    /// What the operator reads.
    pub message: String,
}

impl OpError {
    /// A new error.
    pub fn new(kind: Kind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
        }
    }

    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            Kind::Invalid => EXIT_USAGE,
            Kind::Invitation => EXIT_INVITATION,
            Kind::Config | Kind::Revoked => EXIT_CONFIG,
            Kind::NotFound | Kind::Conflict | Kind::Unreachable | Kind::Failed => EXIT_FAILURE,
        }
    }
}

impl From<crate::store::QueueError> for OpError {
    fn from(e: crate::store::QueueError) -> Self {
        OpError::new(Kind::Failed, e.to_string())
    }
}

/// Shorthand for results of operator commands.
pub type OpResult<T> = Result<T, OpError>;

/// "outer: inner: innermost", skipping repeats, with `describe` speaking for the errors it
/// knows better than their own `Display` (the TLS layer's, for one).
pub fn error_chain_with(
    e: &(dyn std::error::Error + 'static),
    describe: impl Fn(&(dyn std::error::Error + 'static)) -> Option<String>,
) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = describe(err).unwrap_or_else(|| err.to_string());
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}
