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
    /// `customProperties`, which rule errors carry (the field and its own message).
    pub custom_properties: Option<Value>,
}

impl ApiError {
    /// A refusal with any status.
    pub fn new(status: u16, type_key: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            type_key,
            message: message.into(),
            custom_properties: None,
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

    /// 400 for an identity field set to someone the collection does not know: the rule error
    /// of the field, with the identity named in `customProperties.ErrorMessage`.
    pub fn unknown_identity(field: &str, label: &str, value: &str) -> ApiError {
        let mut e = ApiError::bad_request(
            "RuleValidationException",
            format!(
                "TF401320: Rule Error for field {label}. Error code: HasValues, LimitedToValues, AllowsOldValue, InvalidNotInList."
            ),
        );
        e.custom_properties = Some(json!({
            "FieldReferenceName": field,
            "FieldStatusFlags": "hasValues, limitedToValues, allowsOldValue, invalidNotInList",
            "ErrorMessage": format!("The identity value '{value}' for field '{label}' is an unknown identity."),
            "FieldStatusCode": 4,
        }));
        e
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let namespace = if self.type_key.starts_with("Vss") {
            "Microsoft.VisualStudio.Services.WebApi"
        } else {
            "Microsoft.TeamFoundation.WorkItemTracking.Server"
        };
        let mut body = json!({
            "$id": "1",
            "innerException": null,
            "message": self.message,
            "typeName": format!("{namespace}.{}, {namespace}", self.type_key),
            "typeKey": self.type_key,
            "errorCode": 0,
            "eventId": 3000,
        });
        if let Some(custom) = &self.custom_properties {
            body["customProperties"] = custom.clone();
        }
        body
    }
}
