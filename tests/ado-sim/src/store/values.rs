//! Field values: coercion to a field's kind, tag normalisation, and the small text helpers.

use super::*;

/// Normalises a tag list as the service stores it: split on `;`, trimmed, duplicates
/// (case-insensitive) dropped, sorted case-insensitively, joined with `"; "`.
pub fn normalise_tags(s: &str) -> String {
    let mut tags: Vec<String> = Vec::new();
    for t in s.split(';').map(str::trim).filter(|t| !t.is_empty()) {
        if !tags.iter().any(|x| x.eq_ignore_ascii_case(t)) {
            tags.push(t.to_string());
        }
    }
    tags.sort_by_key(|t| t.to_lowercase());
    tags.join("; ")
}

/// The simulator's markdown rendering: escaped text in paragraphs. Enough to tell rendered
/// from raw; not a markdown engine.
pub fn render_markdown(text: &str) -> String {
    text.split("\n\n")
        .map(|p| format!("<p>{}</p>", escape_html(p.trim())))
        .collect::<Vec<_>>()
        .join("")
}

/// Minimal HTML escaping.
pub fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Converts a patch value to the stored form for the field's kind; `None` clears the field.
pub fn coerce(def: &FieldDef, v: &Value) -> Result<Option<Value>, ApiError> {
    let invalid = || ApiError::rule(&def.name, "InvalidType");
    if v.is_null() {
        return Ok(None);
    }
    let text = || match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    Ok(match def.kind {
        Kind::String | Kind::TreePath | Kind::Html | Kind::PlainText => {
            let s = text().ok_or_else(invalid)?;
            if def.kind == Kind::String && s.chars().count() > 255 {
                return Err(ApiError::rule(&def.name, "InvalidTooLong"));
            }
            if s.is_empty() {
                None
            } else {
                Some(Value::String(s))
            }
        }
        Kind::Integer => match v {
            Value::Number(n) if n.is_i64() => Some(v.clone()),
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(json!(s.trim().parse::<i64>().map_err(|_| invalid())?)),
            _ => return Err(invalid()),
        },
        Kind::Double => match v {
            Value::Number(_) => Some(v.clone()),
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(json!(s.trim().parse::<f64>().map_err(|_| invalid())?)),
            _ => return Err(invalid()),
        },
        Kind::Boolean => match v {
            Value::Bool(_) => Some(v.clone()),
            Value::String(s) => Some(json!(s.eq_ignore_ascii_case("true"))),
            _ => return Err(invalid()),
        },
        Kind::DateTime => {
            let s = text().ok_or_else(invalid)?;
            let p = clock::parse(&s).ok_or_else(invalid)?;
            Some(json!(clock::format(p.ms)))
        }
        Kind::Identity => {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Object(o) => o
                    .get("uniqueName")
                    .or_else(|| o.get("displayName"))
                    .and_then(Value::as_str)
                    .map(|u| match o.get("displayName").and_then(Value::as_str) {
                        Some(d) if d != u => format!("{d} <{u}>"),
                        _ => u.to_string(),
                    })
                    .ok_or_else(invalid)?,
                _ => return Err(invalid()),
            };
            if s.trim().is_empty() {
                None
            } else {
                Some(json!(Identity::parse(&s).combined()))
            }
        }
    })
}
