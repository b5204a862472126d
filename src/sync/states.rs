//! Workflow states across processes: the state categories Azure DevOps defines (Proposed,
//! In Progress, Resolved, Completed, Removed), the default states of the Basic, Agile, Scrum
//! and CMMI processes in them, and the mapping of the other side's state onto a local work
//! item type's states. Pure; the engine learns the local states from the tracker.

use std::collections::BTreeMap;

/// A local work item type's states, each with its category, as the tracker lists them.
pub type TypeStates = Vec<(String, String)>;

/// What the local process has: its work item types, and each type's states.
#[derive(Debug, Clone, Default)]
pub struct LocalTypes {
    /// Type names.
    pub names: Vec<String>,
    /// Type name (lower case) → its states with their categories, in the tracker's order.
    pub states: BTreeMap<String, TypeStates>,
}

impl LocalTypes {
    /// From the tracker's list of types with their states.
    pub fn new(types: Vec<(String, TypeStates)>) -> LocalTypes {
        LocalTypes {
            names: types.iter().map(|(n, _)| n.clone()).collect(),
            states: types.into_iter().map(|(n, s)| (n.to_lowercase(), s)).collect(),
        }
    }

    /// The states of `type_name`, when it is known and the tracker listed any.
    pub fn states_of(&self, type_name: &str) -> Option<&TypeStates> {
        self.states.get(&type_name.to_lowercase()).filter(|s| !s.is_empty())
    }
}

/// The category of a state of one of the four default processes, by its name.
pub fn category(state: &str) -> Option<&'static str> {
    const TABLE: &[(&str, &str)] = &[
        // Basic: To Do, Doing, Done. Agile: New, Active, Resolved, Closed, Removed.
        // Scrum: New, Approved, Committed, Done, Removed; tasks To Do, In Progress, Done;
        // impediments Open, Closed. CMMI: Proposed, Active, Resolved, Closed, Removed.
        ("new", "Proposed"),
        ("proposed", "Proposed"),
        ("to do", "Proposed"),
        ("approved", "Proposed"),
        ("active", "InProgress"),
        ("doing", "InProgress"),
        ("committed", "InProgress"),
        ("in progress", "InProgress"),
        ("open", "InProgress"),
        ("resolved", "Resolved"),
        ("closed", "Completed"),
        ("done", "Completed"),
        ("removed", "Removed"),
    ];
    let wanted = state.trim().to_lowercase();
    TABLE.iter().find(|(s, _)| *s == wanted).map(|(_, c)| *c)
}

/// The state of a local `type_name` for the other side's `state`: the state of that name, else
/// the type's first state in the same category (a Resolved state goes to In Progress where the
/// type has none), else `None`.
pub fn map_state(local: &LocalTypes, type_name: &str, state: &str) -> Option<String> {
    let states = local.states_of(type_name)?;
    if let Some((name, _)) = states.iter().find(|(n, _)| n.eq_ignore_ascii_case(state.trim())) {
        return Some(name.clone());
    }
    let first_in = |cat: &str| states.iter().find(|(_, c)| c == cat).map(|(n, _)| n.clone());
    match category(state)? {
        "Resolved" => first_in("Resolved").or_else(|| first_in("InProgress")),
        cat => first_in(cat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrum_and_agile() -> LocalTypes {
        let s = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        LocalTypes::new(vec![
            (
                "Bug".into(),
                s(&[
                    ("New", "Proposed"),
                    ("Approved", "Proposed"),
                    ("Committed", "InProgress"),
                    ("Done", "Completed"),
                    ("Removed", "Removed"),
                ]),
            ),
            (
                "Task".into(),
                s(&[
                    ("To Do", "Proposed"),
                    ("In Progress", "InProgress"),
                    ("Done", "Completed"),
                ]),
            ),
        ])
    }

    #[test]
    fn states_map_by_name_then_by_category_across_processes() {
        let local = scrum_and_agile();
        assert_eq!(map_state(&local, "bug", "done").as_deref(), Some("Done"));
        assert_eq!(map_state(&local, "Bug", "Active").as_deref(), Some("Committed"));
        assert_eq!(map_state(&local, "Bug", "Resolved").as_deref(), Some("Committed"));
        assert_eq!(map_state(&local, "Bug", "Closed").as_deref(), Some("Done"));
        assert_eq!(map_state(&local, "Task", "Proposed").as_deref(), Some("To Do"));
        assert_eq!(map_state(&local, "Task", "Removed"), None, "no state of that category");
        assert_eq!(
            map_state(&local, "Bug", "Triaged"),
            None,
            "a state of no default process"
        );
        assert_eq!(
            map_state(&local, "Epic", "New"),
            None,
            "a type the process does not have"
        );
    }
}
