//! Work item links are two-sided: adding or removing one on an item adds or removes its
//! reverse on the target, as a revision of the target.

use super::*;

/// The reverse of a link type: `…-Forward` ↔ `…-Reverse`; symmetric types (Related) are
/// their own reverse.
pub fn reverse_link(rel: &str) -> String {
    if let Some(base) = rel.strip_suffix("-Forward") {
        format!("{base}-Reverse")
    } else if let Some(base) = rel.strip_suffix("-Reverse") {
        format!("{base}-Forward")
    } else {
        rel.to_string()
    }
}

/// Whether a relation links two work items (rather than a file or a hyperlink).
pub fn is_work_item_link(rel: &str) -> bool {
    rel.starts_with("System.LinkTypes.") || rel.starts_with("Microsoft.VSTS.")
}

fn target_id(url: &str) -> Option<u64> {
    url.rsplit('/').next()?.parse().ok()
}

impl Store {
    /// Mirrors the work item links `source` gained or lost between `before` and `after` on
    /// their targets.
    pub(super) fn reciprocate(&mut self, source: u64, before: &[Relation], after: &[Relation], o: &WriteOpts) {
        let links = |rs: &[Relation]| -> Vec<(String, u64)> {
            rs.iter()
                .filter(|r| is_work_item_link(&r.rel))
                .filter_map(|r| Some((r.rel.clone(), target_id(&r.url)?)))
                .collect()
        };
        let (old, new) = (links(before), links(after));
        let source_url = self.item_url(source);
        for (rel, target) in new.iter().filter(|l| !old.contains(l)) {
            let back = reverse_link(rel);
            let url = source_url.clone();
            self.side_revision(*target, o, |r| {
                if r.relations
                    .iter()
                    .any(|x| x.rel == back && x.url.eq_ignore_ascii_case(&url))
                {
                    return false;
                }
                let mut attributes = serde_json::Map::new();
                attributes.insert("isLocked".into(), json!(false));
                r.relations.push(Relation {
                    rel: back.clone(),
                    url: url.clone(),
                    attributes,
                });
                true
            });
        }
        for (rel, target) in old.iter().filter(|l| !new.contains(l)) {
            let back = reverse_link(rel);
            let url = source_url.clone();
            self.side_revision(*target, o, |r| {
                let n = r.relations.len();
                r.relations
                    .retain(|x| !(x.rel == back && x.url.eq_ignore_ascii_case(&url)));
                r.relations.len() != n
            });
        }
    }

    /// A revision of `id` made as a consequence of another change: `change` edits a copy of
    /// the current revision and says whether it changed anything.
    fn side_revision(&mut self, id: u64, o: &WriteOpts, change: impl FnOnce(&mut Revision) -> bool) {
        if self.items.get(&id).is_none_or(|w| w.deleted) {
            return;
        }
        let now = self.tick();
        let watermark = self.feed.len() as u64 + 1;
        let Some(wi) = self.items.get_mut(&id) else { return };
        let mut r = wi.latest().clone();
        r.fields.remove("System.History");
        r.comment = None;
        if !change(&mut r) {
            return;
        }
        r.rev += 1;
        r.changed_ms = now;
        let stamp = json!(clock::format(now));
        r.fields.insert("System.Rev".into(), json!(r.rev));
        r.fields.insert("System.ChangedDate".into(), stamp.clone());
        r.fields.insert("System.AuthorizedDate".into(), stamp);
        r.fields.insert("System.ChangedBy".into(), json!(o.actor.combined()));
        r.fields.insert("System.Watermark".into(), json!(watermark));
        let n = r.rev;
        wi.revisions.push(r);
        self.feed.push((id, n));
        if !o.suppress_notifications {
            self.events.push(Event {
                kind: "workitem.updated",
                id,
                rev: n,
                comment: None,
            });
        }
    }
}
