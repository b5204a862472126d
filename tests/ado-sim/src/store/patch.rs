//! JSON Patch documents applied to a work item: the operations on `/fields`, `/rev` and
//! `/relations`, then the type's rules (title, state, paths, tags).

use super::*;

impl Store {
    /// Applies `ops` to a copy of `base`, then checks the type's rules.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply(
        &mut self,
        id: u64,
        project: &Project,
        wit: &WorkItemType,
        base: &Revision,
        ops: &[Value],
        o: &WriteOpts,
        creating: bool,
    ) -> Result<Revision, ApiError> {
        let mut d = base.clone();
        // History belongs to the revision that writes it, never carried forward.
        d.fields.remove("System.History");
        d.comment = None;
        for op in ops {
            let obj = op
                .as_object()
                .ok_or_else(|| patch_error("Each operation of the JSON Patch document must be an object."))?;
            let kind = obj.get("op").and_then(Value::as_str).unwrap_or("").to_ascii_lowercase();
            let path = obj.get("path").and_then(Value::as_str).unwrap_or("");
            let value = obj.get("value").cloned().unwrap_or(Value::Null);
            let lpath = path.to_ascii_lowercase();
            if lpath == "/rev" {
                match kind.as_str() {
                    "test" => {
                        let want = value.as_u64().or_else(|| value.as_str().and_then(|s| s.parse().ok()));
                        if want != Some(base.rev as u64) || creating {
                            return Err(test_failed(format!(
                                "test of /rev expected {value}, the work item is at revision {}",
                                base.rev
                            )));
                        }
                    }
                    _ => {
                        return Err(patch_error(format!(
                            "The operation '{kind}' is not supported on path '{path}'."
                        )))
                    }
                }
            } else if let Some(name) = path.strip_prefix("/fields/") {
                let def = self.field(name).cloned().ok_or_else(|| ApiError::unknown_field(name))?;
                let key = def.reference.clone();
                match kind.as_str() {
                    "test" => {
                        let have = d.fields.get(&key).cloned().unwrap_or(Value::Null);
                        if coerce(&def, &value).ok().flatten().unwrap_or(Value::Null) != have {
                            return Err(test_failed(format!("test of {path} failed")));
                        }
                    }
                    "add" | "replace" | "remove" => {
                        let bypassable = o.bypass_rules && BYPASS_WRITABLE.contains(&key.as_str());
                        if def.read_only && !bypassable {
                            return Err(ApiError::bad_request(
                                "WorkItemFieldInvalidException",
                                format!("TF401326: Invalid field status 'ReadOnly' for field '{key}'."),
                            ));
                        }
                        let mut v = if kind == "remove" { None } else { coerce(&def, &value)? };
                        if def.kind == Kind::Identity {
                            if let Some(written) = &v {
                                v = Some(json!(self.known_identity(&def, written)?.combined()));
                            }
                        }
                        match v {
                            Some(v) => d.fields.insert(key, v),
                            None => d.fields.remove(&key),
                        };
                    }
                    other => {
                        return Err(patch_error(format!(
                            "The operation '{other}' is not supported on path '{path}'."
                        )))
                    }
                }
            } else if lpath == "/relations/-" {
                if kind != "add" {
                    return Err(patch_error(format!(
                        "The operation '{kind}' is not supported on path '{path}'."
                    )));
                }
                let rel = self.relation(&value)?;
                if d.relations
                    .iter()
                    .any(|r| r.rel == rel.rel && r.url.eq_ignore_ascii_case(&rel.url))
                {
                    return Err(ApiError::bad_request(
                        "WorkItemLinkAlreadyExistsException",
                        format!("TF201035: The relation {} to {} already exists.", rel.rel, rel.url),
                    ));
                }
                d.relations.push(rel);
            } else if let Some(rest) = lpath.strip_prefix("/relations/") {
                let (idx, attr) = match rest.split_once("/attributes/") {
                    Some((i, a)) => (i, Some(path[path.len() - a.len()..].to_string())),
                    None => (rest, None),
                };
                let idx: usize = idx
                    .parse()
                    .map_err(|_| patch_error(format!("The path '{path}' is not valid.")))?;
                if idx >= d.relations.len() {
                    return Err(patch_error(format!(
                        "The relation index {idx} is out of range: the work item has {} relations.",
                        d.relations.len()
                    )));
                }
                match (kind.as_str(), attr) {
                    ("remove", None) => {
                        d.relations.remove(idx);
                    }
                    ("replace", None) => {
                        let rel = self.relation(&value)?;
                        d.relations[idx] = rel;
                    }
                    ("add" | "replace", Some(a)) => {
                        d.relations[idx].attributes.insert(a, value);
                    }
                    ("remove", Some(a)) => {
                        d.relations[idx].attributes.remove(&a);
                    }
                    _ => {
                        return Err(patch_error(format!(
                            "The operation '{kind}' is not supported on path '{path}'."
                        )))
                    }
                }
            } else if lpath == "/id" && kind == "test" {
                if value.as_u64() != Some(id) {
                    return Err(test_failed(format!("test of /id expected {value}")));
                }
            } else {
                return Err(patch_error(format!("The path '{path}' is not valid for a work item.")));
            }
        }
        self.check_rules(project, wit, base, &mut d, o)?;
        Ok(d)
    }

    /// Type rules: title required, state allowed, paths inside the project, tags normalised.
    pub(super) fn check_rules(
        &self,
        project: &Project,
        wit: &WorkItemType,
        base: &Revision,
        d: &mut Revision,
        o: &WriteOpts,
    ) -> Result<(), ApiError> {
        let title = d
            .fields
            .get("System.Title")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or("");
        if title.is_empty() {
            return Err(ApiError::rule("Title", "Required, InvalidEmpty"));
        }
        if let Some(tags) = d.fields.get(TAGS).and_then(Value::as_str).map(normalise_tags) {
            if tags.is_empty() {
                d.fields.remove(TAGS);
            } else {
                d.fields.insert(TAGS.into(), json!(tags));
            }
        }
        match d.fields.get("System.State").and_then(Value::as_str).map(str::to_string) {
            None => {
                d.fields.insert("System.State".into(), json!(wit.states[0]));
            }
            Some(s) => match wit.states.iter().find(|x| x.eq_ignore_ascii_case(&s)) {
                Some(canon) => {
                    d.fields.insert("System.State".into(), json!(canon));
                }
                None if o.bypass_rules => {}
                None => return Err(ApiError::rule("State", "LimitedToValues")),
            },
        }
        let old_state = base.fields.get("System.State");
        if base.rev > 0
            && old_state != d.fields.get("System.State")
            && base.fields.get("System.Reason") == d.fields.get("System.Reason")
        {
            let s = d.fields.get("System.State").cloned().unwrap_or(Value::Null);
            d.fields.insert(
                "System.Reason".into(),
                json!(format!("Moved to state {}", s.as_str().unwrap_or(""))),
            );
        }
        for key in ["System.AreaPath", "System.IterationPath"] {
            let v = d.fields.get(key).and_then(Value::as_str).unwrap_or("").to_string();
            if v.is_empty() {
                d.fields.insert(key.into(), json!(project.name));
                continue;
            }
            let root = v.split('\\').next().unwrap_or("");
            if !root.eq_ignore_ascii_case(&project.name) {
                return Err(ApiError::bad_request(
                    "WorkItemTrackingTreeNodeNotFoundException",
                    format!(
                        "TF401347: Invalid tree name given for work item {}, field '{key}'.",
                        base.fields
                            .get("System.Id")
                            .and_then(Value::as_u64)
                            .map(|i| i as i64)
                            .unwrap_or(-1)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Validates a relation value of a patch.
    pub(super) fn relation(&self, value: &Value) -> Result<Relation, ApiError> {
        let rel = value.get("rel").and_then(Value::as_str).unwrap_or("").to_string();
        let url = value.get("url").and_then(Value::as_str).unwrap_or("").to_string();
        if rel.is_empty() || url.is_empty() {
            return Err(patch_error("A relation needs both 'rel' and 'url'."));
        }
        let mut attributes = value
            .get("attributes")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        match rel.as_str() {
            "AttachedFile" => {
                let id = attachment_id_from_url(&url)
                    .ok_or_else(|| patch_error(format!("The attachment URL '{url}' is not valid.")))?;
                let a = self
                    .attachments
                    .get(&id.to_lowercase())
                    .filter(|a| a.complete)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "AttachmentNotFoundException",
                            format!("VS402328: The attachment {id} was not found."),
                        )
                    })?;
                attributes.entry("name").or_insert(json!(a.file_name));
                attributes.insert("resourceSize".into(), json!(a.data.len()));
                attributes.insert("resourceCreatedDate".into(), json!(clock::format(a.created_ms)));
            }
            "Hyperlink" | "ArtifactLink" => {}
            r if r.starts_with("System.LinkTypes.") || r.starts_with("Microsoft.VSTS.") => {
                let target = url
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| patch_error(format!("The work item URL '{url}' is not valid.")))?;
                self.item(target, None)?;
                attributes.entry("isLocked").or_insert(json!(false));
            }
            other => {
                return Err(ApiError::bad_request(
                    "WorkItemLinkTypeNotFoundException",
                    format!("VS402264: The link type {other} does not exist."),
                ))
            }
        }
        Ok(Relation { rel, url, attributes })
    }
}

impl Store {
    /// The known identity an identity field's value names, by unique name or, for a bare
    /// name, by a display name only one identity has; else the rule error the service answers.
    fn known_identity(&self, def: &FieldDef, written: &Value) -> Result<Identity, ApiError> {
        let text = written.as_str().unwrap_or_default();
        let wanted = Identity::parse(text);
        let by_unique = self
            .identities
            .iter()
            .find(|i| i.unique_name.eq_ignore_ascii_case(&wanted.unique_name));
        let by_display = || {
            let mut named = self
                .identities
                .iter()
                .filter(|i| i.display_name.eq_ignore_ascii_case(&wanted.display_name));
            match (named.next(), named.next()) {
                (Some(one), None) => Some(one),
                _ => None,
            }
        };
        by_unique
            .or_else(by_display)
            .cloned()
            .ok_or_else(|| ApiError::unknown_identity(&def.reference, &def.name, text))
    }
}
