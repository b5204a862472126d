//! Validation of operator-chosen names: connections, instances, projects.

/// Connection names appear in URLs and storage keys: 1–64 of `A–Z a–z 0–9 . _ -`, not
/// starting with a dot.
pub fn check_connection_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "connection name {name:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

/// Instance short names and projects are free text, but one line and bounded.
pub fn check_label(what: &str, value: &str, allow_empty: bool) -> Result<(), String> {
    if value.is_empty() && !allow_empty {
        return Err(format!("{what} must not be empty"));
    }
    if value.len() > 256 || value.chars().any(char::is_control) {
        return Err(format!("{what} must be one line of at most 256 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names() {
        for ok in ["a", "ado-sync", "A.b_c-9"] {
            assert!(check_connection_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(check_connection_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        assert!(check_label("project", "", true).is_ok());
        assert!(check_label("name", "", false).is_err());
        assert!(check_label("name", "a\nb", false).is_err());
    }
}
