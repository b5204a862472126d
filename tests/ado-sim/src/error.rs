//! The error body every failed call answers with, shaped as the service shapes it:
//! `{"$id":"1","innerException":null,"message":…,"typeName":…,"typeKey":…,"errorCode":0,"eventId":3000}`.

use serde_json::{json, Value};

/// A refusal: HTTP status, the exception's short type key and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Short exception name (`typeKey`), what clients may branch on.
    pub type_key: &'static str,
    /// Human-readable message, with the service's TF/VS code where one is known.
    pub message: String,
}

impl ApiError {
    /// A refusal with any status.
    pub fn new(status: u16, type_key: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            type_key,
            message: message.into(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(type_key: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(400, type_key, message)
    }

    /// 404 for a work item that does not exist (or was deleted).
    pub fn work_item_missing(id: u64) -> ApiError {
        ApiError::new(
            404,
            "WorkItemUnauthorizedAccessException",
            format!("TF401232: Work item {id} does not exist, or you do not have permissions to read it."),
        )
    }

    /// 400 for a field reference name the collection does not define.
    pub fn unknown_field(name: &str) -> ApiError {
        ApiError::bad_request(
            "WorkItemTrackingFieldDefinitionNotFoundException",
            format!("TF51535: Cannot find field {name}."),
        )
    }

    /// 400 for a rule the update breaks (required, allowed values, read-only).
    pub fn rule(field: &str, code: &str) -> ApiError {
        ApiError::bad_request(
            "RuleValidationException",
            format!("TF401320: Rule Error for field {field}. Error code: {code}."),
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let namespace = if self.type_key.starts_with("Vss") {
            "Microsoft.VisualStudio.Services.WebApi"
        } else {
            "Microsoft.TeamFoundation.WorkItemTracking.Server"
        };
        json!({
            "$id": "1",
            "innerException": null,
            "message": self.message,
            "typeName": format!("{namespace}.{}, {namespace}", self.type_key),
            "typeKey": self.type_key,
            "errorCode": 0,
            "eventId": 3000,
        })
    }
}
