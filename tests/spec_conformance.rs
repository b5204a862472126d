//! The simulator against Microsoft's specification: its description (`spec/operations.json`)
//! covers every endpoint relay calls, a representative sync both ways on Services with Server
//! 2019 and with Server 2022 sends and receives nothing the description refuses, and the
//! validator names the operation, the version and the JSON path of each mismatch.

mod common;
#[path = "sync/pair.rs"]
mod pair;

use std::collections::BTreeSet;

use ado_sim::spec::{self, Body, Request, Response};
use ado_sim::{Profile, SimHandle};
use serde_json::{json, Value};

use pair::{attachments, comments, converge, field, fields, tags, wait_titled, Pair, PRIVATE, PUBLIC};

/// Endpoint names among the counters (not faults, holds or events).
fn endpoints_called(sim: &SimHandle) -> BTreeSet<String> {
    sim.counters()
        .into_keys()
        .filter(|k| {
            !matches!(k.as_str(), "control" | "unauthorized")
                && !k.starts_with("fault.")
                && ![".held", ".slow", ".seen"].iter().any(|s| k.ends_with(s))
        })
        .collect()
}

/// An item with a description, tags, a comment and an attachment made on the public side,
/// synced; then edited and commented on the private side, synced back. Answers the endpoint
/// names relay called on each side.
async fn representative_sync(private: Profile) -> (BTreeSet<String>, BTreeSet<String>) {
    let p = Pair::start(Profile::Services, private, &[]).await;
    let id = p
        .public
        .create_item(
            PUBLIC,
            "Bug",
            &fields(&[
                ("System.Title", "Export drops the last row"),
                ("System.Description", "<p>Export <b>any</b> table of 3 rows</p>"),
                ("System.Tags", "export; p2"),
            ]),
        )
        .unwrap();
    p.public.add_comment_as_human(id, "Seen in 2.3 too").unwrap();
    let log: Vec<u8> = (0..50_000u32).map(|i| (i % 199) as u8).collect();
    p.public.attach_as_human(id, "export.log", &log).unwrap();
    let twin = wait_titled(&p.private, PRIVATE, "Export drops the last row").await;
    converge("public → private", || {
        let ok = tags(&p.private, twin) == ["export", "p2"]
            && attachments(&p.private, twin).len() == 1
            && comments(&p.private, twin).iter().any(|c| c.contains("Seen in 2.3 too"))
            && field(&p.private, twin, "System.Description").contains("<b>any</b>");
        if ok {
            Ok(())
        } else {
            Err("description, tags, comment or attachment not yet on the private side".into())
        }
    })
    .await;
    p.private
        .edit_as_human(
            twin,
            &[json!({"op": "replace", "path": "/fields/System.Title", "value": "Export drops the last row of CSV"})],
        )
        .unwrap();
    p.private.add_comment_as_human(twin, "Fixed in the CSV writer").unwrap();
    converge("private → public", || {
        let ok = field(&p.public, id, "System.Title") == "Export drops the last row of CSV"
            && comments(&p.public, id)
                .iter()
                .any(|c| c.contains("Fixed in the CSV writer"));
        if ok {
            Ok(())
        } else {
            Err("title or comment not yet back on the public side".into())
        }
    })
    .await;
    p.public.assert_conformant();
    p.private.assert_conformant();
    (endpoints_called(&p.public), endpoints_called(&p.private))
}

/// Every endpoint relay called is described, at some version.
fn assert_described(called: &BTreeSet<String>, side: &str) {
    let described = spec::endpoints();
    let missing: Vec<&String> = called.iter().filter(|e| !described.contains(e)).collect();
    assert!(
        missing.is_empty(),
        "{side}: relay called {missing:?}, which spec/operations.json does not describe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_with_server_2019_conforms_and_every_endpoint_relay_calls_is_described() {
    let (public, private) = representative_sync(Profile::Server2019).await;
    assert_described(&public, "Services");
    assert_described(&private, "Server 2019");
    // The run went through the paths that matter: reads, writes, the feed, comments (the
    // History view on Server 2019), attachments.
    for e in [
        "workitems.get",
        "workitems.update",
        "reporting.revisions",
        "comments.list",
        "comments.add",
        "attachments.get",
    ] {
        assert!(public.contains(e), "Services: {e} not called; called {public:?}");
    }
    for e in [
        "workitems.create",
        "workitems.update",
        "reporting.revisions",
        "comments.list",
        "attachments.create",
    ] {
        assert!(private.contains(e), "Server 2019: {e} not called; called {private:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_with_server_2022_conforms_and_every_endpoint_relay_calls_is_described() {
    let (public, private) = representative_sync(Profile::Server2022).await;
    assert_described(&public, "Services");
    assert_described(&private, "Server 2022");
    assert!(
        private.contains("comments.add"),
        "Server 2022: comments.add not called; called {private:?}"
    );
}

fn request(endpoint: &str, method: &str, version: &str, path: &str, query: &[(&str, &str)], body: Body) -> Request {
    Request {
        endpoint: endpoint.into(),
        version: Some(version.into()),
        fallback: ado_sim::Version { major: 7, minor: 1 },
        method: method.into(),
        scope: vec!["Fabrikam".into()],
        path: path.split('/').map(str::to_owned).collect(),
        query: query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        headers: Vec::new(),
        body,
    }
}

fn ok(v: Value) -> Response {
    Response {
        status: 200,
        body: Body::Json(v),
    }
}

#[test]
fn a_wrong_type_is_named_with_operation_version_and_path() {
    let req = request("workitems.get", "GET", "7.1", "wit/workitems/5", &[], Body::Empty);
    let found = spec::check(&req, &ok(json!({"id": 5, "rev": 1, "fields": "System.Title=x"})));
    assert_eq!(
        found,
        ["workitems.get 7.1: response $.fields: expected object (WorkItemFields), got string"]
    );

    // Nested: a relation's url, and an identity field given as a number.
    let found = spec::check(
        &req,
        &ok(
            json!({"id": 5, "rev": 1, "fields": {"System.CreatedBy": 3}, "relations": [{"rel": "AttachedFile", "url": 9}]}),
        ),
    );
    assert_eq!(
        found,
        [
            "workitems.get 7.1: response $.fields[\"System.CreatedBy\"]: expected object (IdentityRef), got integer",
            "workitems.get 7.1: response $.relations[0].url: expected string, got integer",
        ]
    );
}

#[test]
fn a_missing_required_field_is_named_in_the_request_and_in_the_response() {
    // A comment without its text, asked on Server 2022's 7.0 (as 7.0-preview.3).
    let req = request(
        "comments.add",
        "POST",
        "7.0-preview.3",
        "wit/workItems/5/comments",
        &[],
        Body::Json(json!({"txt": "hello"})),
    );
    let found = spec::check(
        &req,
        &ok(
            json!({"workItemId": 5, "id": 1, "version": 1, "createdBy": {"displayName": "A", "id": "x"}, "createdDate": "2024-01-01T00:00:00Z"}),
        ),
    );
    assert_eq!(
        found,
        [
            "comments.add 7.0: request body $: missing required field 'text'",
            "comments.add 7.0: request body $.txt: field not in CommentText",
            "comments.add 7.0: response $: missing required field 'text'",
        ]
    );
    // 7.1's format and renderedText do not exist before 7.1.
    let found = spec::check(
        &request(
            "comments.get",
            "GET",
            "6.0-preview.3",
            "wit/workItems/5/comments/1",
            &[],
            Body::Empty,
        ),
        &ok(
            json!({"workItemId": 5, "id": 1, "version": 1, "text": "t", "format": "html", "createdBy": {"displayName": "A", "id": "x"}, "createdDate": "2024-01-01T00:00:00Z"}),
        ),
    );
    assert_eq!(
        found,
        ["comments.get 6.0: response $.format: field of Comment only from 7.1"]
    );
}

#[test]
fn an_unknown_or_missing_query_parameter_and_a_version_without_the_operation_are_named() {
    let req = request(
        "comments.add",
        "POST",
        "7.0-preview.3",
        "wit/workItems/5/comments",
        &[("foo", "1"), ("format", "html")],
        Body::Json(json!({"text": "hello"})),
    );
    let found = spec::check(
        &req,
        &Response {
            status: 400,
            body: Body::Json(json!({"message": "no", "typeKey": "X"})),
        },
    );
    assert_eq!(
        found,
        [
            "comments.add 7.0: request query: unknown parameter 'foo'",
            "comments.add 7.0: request query: unknown parameter 'format'",
        ]
    );
    let found = spec::check(
        &request(
            "workitems.list",
            "GET",
            "5.0",
            "wit/workitems",
            &[("$expand", "everything")],
            Body::Empty,
        ),
        &Response {
            status: 400,
            body: Body::Json(json!({"message": "no"})),
        },
    );
    assert_eq!(
        found,
        [
            "workitems.list 5.0: request query: parameter '$expand': expected enum:none,relations,fields,links,all, got \"everything\"",
            "workitems.list 5.0: request query: missing required parameter 'ids'",
            "workitems.list 5.0: error response $: missing required field 'typeKey'",
        ]
    );
    // Server 2019 has no comment writes: its comments resource is the read-only History view.
    let found = spec::check(
        &request(
            "comments.add",
            "POST",
            "5.0-preview.2",
            "wit/workItems/5/comments",
            &[],
            Body::Json(json!({"text": "x"})),
        ),
        &ok(json!({})),
    );
    assert_eq!(
        found,
        ["comments.add 5.0: request: POST is not an operation of the specification at this version"]
    );
}
