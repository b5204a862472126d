//! Service hooks: subscriptions and the POST of each work item event in the documented
//! envelope.

use super::*;

/// Adds a subscription and answers its id.
pub fn subscribe(shared: &Shared, url: &str, headers: Vec<(String, String)>, event_types: Vec<String>) -> String {
    let id = store::new_guid();
    lock(&shared.hooks).push(Subscription {
        id: id.clone(),
        url: url.to_string(),
        event_types,
        headers,
    });
    id
}

/// Delivers events made outside a request (library edits).
pub fn deliver_pending(shared: &Arc<Shared>) {
    deliver_events(shared);
}

/// Builds the payloads of pending events and POSTs them, each in its own task.
pub(super) fn deliver_events(shared: &Arc<Shared>) {
    let subs = lock(&shared.hooks).clone();
    let mut s = lock(&shared.store);
    let events = std::mem::take(&mut s.events);
    if subs.is_empty() {
        return;
    }
    for ev in events {
        for sub in subs
            .iter()
            .filter(|x| x.event_types.is_empty() || x.event_types.iter().any(|t| t == ev.kind))
        {
            let Some(payload) = hook_payload(&s, shared, sub, &ev) else {
                continue;
            };
            let req = Request::post(sub.url.as_str()).header(CONTENT_TYPE, "application/json; charset=utf-8");
            let req = sub
                .headers
                .iter()
                .fold(req, |r, (k, v)| r.header(k.as_str(), v.as_str()));
            let Ok(req) = req.body(Full::new(Bytes::from(payload.to_string()))) else {
                shared.hook_failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let ok = matches!(shared.client.request(req).await, Ok(r) if r.status().is_success());
                let counter = if ok {
                    &shared.hook_delivered
                } else {
                    &shared.hook_failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
}

/// The documented event envelope with a minimal resource.
pub(super) fn hook_payload(s: &Store, shared: &Shared, sub: &Subscription, ev: &store::Event) -> Option<Value> {
    let wi = s.items.get(&ev.id)?;
    let r = wi.revisions.get((ev.rev - 1) as usize)?;
    let project = s.projects.iter().find(|p| p.id == wi.project_id)?;
    let title = r.fields.get("System.Title").and_then(Value::as_str).unwrap_or("");
    let ty = r
        .fields
        .get("System.WorkItemType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let by = r.fields.get("System.ChangedBy").and_then(Value::as_str).unwrap_or("");
    let verb = match ev.kind {
        "workitem.created" => "created",
        "workitem.commented" => "commented on",
        "workitem.deleted" => "deleted",
        _ => "updated",
    };
    let text = format!(
        "{ty} #{} ({title}) {verb} by {}",
        wi.id,
        crate::model::Identity::parse(by).display_name
    );
    let item = render::work_item(s, wi, r, None, Expand::Relations);
    let resource = match ev.kind {
        "workitem.updated" => {
            let prev = r.rev.checked_sub(2).and_then(|i| wi.revisions.get(i as usize));
            let mut changed = serde_json::Map::new();
            for (k, v) in &r.fields {
                let old = prev.and_then(|p| p.fields.get(k));
                if old != Some(v) {
                    changed.insert(k.clone(), json!({"oldValue": old, "newValue": v}));
                }
            }
            json!({
                "id": r.rev,
                "workItemId": wi.id,
                "rev": r.rev,
                "revisedBy": render::identity_ref(s, by),
                "revisedDate": clock::END_OF_TIME,
                "fields": changed,
                "url": format!("{}/updates/{}", s.item_url(wi.id), r.rev),
                "revision": item,
            })
        }
        "workitem.commented" => {
            let mut item = item;
            if let Some(t) = &ev.comment {
                item["fields"]["System.History"] = json!(t);
            }
            item
        }
        _ => item,
    };
    Some(json!({
        "subscriptionId": sub.id,
        "notificationId": shared.notification.fetch_add(1, Ordering::Relaxed) + 1,
        "id": store::new_guid(),
        "eventType": ev.kind,
        "publisherId": "tfs",
        "message": {"text": text, "html": store::escape_html(&text), "markdown": text},
        "detailedMessage": {"text": text, "html": store::escape_html(&text), "markdown": text},
        "resource": resource,
        "resourceVersion": "1.0",
        "resourceContainers": {
            "collection": {"id": render::identity_id(&s.collection)},
            "account": {"id": render::identity_id(&s.collection)},
            "project": {"id": project.id},
        },
        "createdDate": clock::format(clock::now_ms()),
    }))
}
