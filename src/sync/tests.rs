//! Tests across the sync modules: default rules, the sandbox, merging and empty patches.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::defaults::{default_rules, rhai_string};
use super::replica::Person;
use super::replica::{Event, EventKind, Origin, Replica};
use super::script::{
    compile, compile_with, get_issue_type, map_path, run_incoming, run_incoming_linked, run_outgoing, strip_html,
    Limit, Limits, Rules, ScriptError, Section, Twins, INCOMING_MARKER, OUTGOING_MARKER,
};
use super::workitem::{build_patch, WorkAttachment, WorkComment, WorkItem, WorkLink};

fn local_item() -> WorkItem {
    WorkItem {
        id: Some(42),
        rev: Some(7),
        type_name: "Bug".into(),
        project_key: "Contoso".into(),
        summary: "Login fails".into(),
        description: "<p>Steps: <b>1</b></p>".into(),
        labels: vec!["backend".into(), "ui".into(), "urgent".into()],
        comments: vec![
            WorkComment {
                id: Some("101".into()),
                remote_id: None,
                author_name: "Ann".into(),
                author_email: "ann@contoso.com".into(),
                created: "2026-01-02T03:04:05Z".into(),
                body: "<p>first</p>".into(),
            },
            WorkComment {
                id: Some("102".into()),
                remote_id: None,
                author_name: "Bob".into(),
                author_email: "bob@contoso.com".into(),
                created: "2026-01-02T04:00:00Z".into(),
                body: "second".into(),
            },
        ],
        attachments: vec![WorkAttachment {
            id: Some("g-1".into()),
            remote_id: None,
            filename: "log.txt".into(),
            size: 3,
            mime: "text/plain".into(),
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
            url: Some("https://dev.azure.com/contoso/_apis/wit/attachments/g-1".into()),
            relation_index: Some(0),
        }],
        status: Some("Active".into()),
        priority: Some(2),
        custom_fields: BTreeMap::from([("System.AreaPath".into(), json!("Contoso"))]),
        assignee: Some(Person {
            display_name: "Ann Smith".into(),
            unique_name: "ann@contoso.com".into(),
        }),
        creator: Some(Person {
            display_name: "Bob".into(),
            unique_name: "bob@contoso.com".into(),
        }),
        links: vec![WorkLink {
            rel: "System.LinkTypes.Hierarchy-Reverse".into(),
            target: 40,
            url: Some("https://dev.azure.com/contoso/_apis/wit/workItems/40".into()),
            relation_index: Some(1),
        }],
        hyperlinks: Vec::new(),
    }
}

fn replica_of(rules: &Rules, item: &WorkItem, rev: u64) -> Replica {
    let entity = run_outgoing(rules, item, None).unwrap();
    Replica::new(
        Origin {
            instance: "https://dev.azure.com/contoso".into(),
            project: item.project_key.clone(),
            id: item.id.unwrap_or(0),
            rev,
            url: "https://dev.azure.com/contoso/_workitems/edit/42".into(),
            changed_at: "2026-01-02T05:00:00Z".into(),
        },
        Event {
            id: format!("ev-{rev}"),
            kind: EventKind::Upsert,
            twin: None,
            changed: None,
            acked: None,
        },
        entity,
    )
}

fn agile() -> crate::sync::states::LocalTypes {
    types(&["Bug", "Epic", "Feature", "Issue", "Task", "Test Case", "User Story"])
}

/// Types without states.
fn types(names: &[&str]) -> crate::sync::states::LocalTypes {
    crate::sync::states::LocalTypes::new(names.iter().map(|n| (n.to_string(), Vec::new())).collect())
}

/// What the tracker would hold after applying a create: ids for everything relay added.
fn applied(mut desired: WorkItem) -> WorkItem {
    desired.id = Some(900);
    desired.rev = Some(1);
    for (i, c) in desired.comments.iter_mut().enumerate() {
        c.id.get_or_insert_with(|| format!("c{i}"));
    }
    for (i, a) in desired.attachments.iter_mut().enumerate() {
        a.id.get_or_insert_with(|| format!("local-{i}"));
        a.url
            .get_or_insert_with(|| format!("https://server/_apis/wit/attachments/local-{i}"));
        a.relation_index = Some(i);
    }
    desired
}

#[test]
fn defaults_compile_and_round_trip() {
    let sender = compile(&default_rules("Contoso")).unwrap();
    let receiver = compile(&default_rules("Fabrikam")).unwrap().with_local_types(agile());
    let item = local_item();
    let replica = replica_of(&sender, &item, 7);
    assert_eq!(replica.entity.key, "42");
    assert_eq!(replica.entity.comments.len(), 2);
    assert_eq!(replica.entity.attachments.len(), 1);
    // The defaults send the five fields and the assignee, by unique name.
    assert_eq!(replica.entity.status, None);
    assert!(replica.entity.custom_fields.is_empty());
    assert_eq!(replica.entity.assignee, item.assignee);
    assert_eq!(replica.entity.creator, None);
    // And it survives the wire.
    let replica = Replica::parse(&replica.to_bytes()).unwrap();

    let desired = run_incoming(&receiver, &replica, None, &WorkItem::default(), true).unwrap();
    assert_eq!(desired.project_key, "Fabrikam");
    assert_eq!(desired.type_name, "Bug");
    assert_eq!(desired.summary, item.summary);
    assert_eq!(desired.description, item.description);
    assert_eq!(desired.labels, item.labels);
    assert_eq!(desired.assignee, item.assignee);
    let bodies = |w: &WorkItem| w.comments.iter().map(|c| c.body.clone()).collect::<Vec<_>>();
    assert_eq!(bodies(&desired), bodies(&item));
    assert_eq!(desired.comments[0].remote_id.as_deref(), Some("101"));
    assert_eq!(desired.comments[0].author_name, "Ann");
    assert_eq!(desired.attachments.len(), 1);
    assert_eq!(desired.attachments[0].remote_id.as_deref(), Some("g-1"));
    assert_eq!(desired.attachments[0].sha256, item.attachments[0].sha256);

    // The create: type and project in the target, fields in the patch, comments apart.
    let mut upload = desired.clone();
    upload.attachments[0].url = Some("https://server/_apis/wit/attachments/new".into());
    let plan = build_patch(&WorkItem::default(), &upload).unwrap();
    let target = plan.create.unwrap();
    assert_eq!(
        (target.project.as_str(), target.type_name.as_str()),
        ("Fabrikam", "Bug")
    );
    assert_eq!(plan.comments.len(), 2);
    let ops = plan.patch.unwrap();
    assert!(ops.as_array().unwrap().iter().all(|op| op["path"] != "/rev"));

    // The copied item, sent back, echoes none of what relay copied into it.
    let back = run_outgoing(&receiver, &applied(desired), None).unwrap();
    assert!(back.comments.is_empty() && back.attachments.is_empty());
    assert_eq!(back.summary, item.summary);
    assert_eq!(back.labels, item.labels);
}

#[test]
fn unchanged_replica_yields_empty_patch() {
    let sender = compile(&default_rules("Contoso")).unwrap();
    let receiver = compile(&default_rules("Fabrikam")).unwrap().with_local_types(agile());
    let replica = replica_of(&sender, &local_item(), 7);
    let first = run_incoming(&receiver, &replica, None, &WorkItem::default(), true).unwrap();
    let current = applied(first);
    // A new revision on the sender that changes nothing synced: same hash, nothing to write.
    let again = replica_of(&sender, &local_item(), 8);
    assert_eq!(again.hash, replica.hash);
    let desired = run_incoming(&receiver, &again, Some(&replica), &current, false).unwrap();
    let plan = build_patch(&current, &desired).unwrap();
    assert!(plan.is_empty(), "{plan:?}");

    // A real change is a patch with the rev test first.
    let mut edited = local_item();
    edited.summary = "Login fails on Sundays".into();
    let changed = replica_of(&sender, &edited, 9);
    let desired = run_incoming(&receiver, &changed, Some(&again), &current, false).unwrap();
    let plan = build_patch(&current, &desired).unwrap();
    assert_eq!(
        plan.patch.unwrap(),
        json!([{"op": "test", "path": "/rev", "value": 1},
               {"op": "replace", "path": "/fields/System.Title", "value": "Login fails on Sundays"}])
    );
    assert!(plan.comments.is_empty());
}

/// Rules whose incoming script is `incoming` after the default outgoing one.
fn incoming_rules(incoming: &str) -> Rules {
    compile(&format!(
        "{OUTGOING_MARKER}\nreplica.summary = workItem.summary;\n{INCOMING_MARKER}\n{incoming}\n"
    ))
    .unwrap()
}

#[test]
fn paths_and_people_as_script_properties() {
    let sender = compile(&default_rules("Contoso")).unwrap();
    let replica = replica_of(&sender, &local_item(), 7);
    let current = applied(WorkItem {
        project_key: "Fabrikam".into(),
        type_name: "Bug".into(),
        ..local_item()
    });
    // Paths: the property reads the field, and a new path lands in it.
    let rules = incoming_rules(
        r#"if workItem.areaPath != "Contoso" { throw "areaPath reads " + workItem.areaPath; }
workItem.areaPath = nodeHelper.mapPath("Contoso\\Web", workItem.projectKey);
workItem.iterationPath = "Fabrikam\\Sprint 3";"#,
    );
    let desired = run_incoming(&rules, &replica, None, &current, false).unwrap();
    assert_eq!(desired.custom_fields["System.AreaPath"], json!(r"Fabrikam\Web"));
    assert_eq!(
        desired.custom_fields["System.IterationPath"],
        json!(r"Fabrikam\Sprint 3")
    );
    // People: a unique name alone, or a map; the creator is the tracker's.
    let rules = incoming_rules(r#"workItem.assignee = "zed@contoso.com";"#);
    let desired = run_incoming(&rules, &replica, None, &current, false).unwrap();
    assert_eq!(desired.assignee, Person::parse("zed@contoso.com"));
    let rules = incoming_rules(r#"workItem.assignee = #{ displayName: "Zed" };"#);
    let desired = run_incoming(&rules, &replica, None, &current, false).unwrap();
    assert_eq!(
        desired.assignee.map(|p| (p.display_name, p.unique_name)),
        Some(("Zed".into(), String::new()))
    );
    // The README's map of people.
    let rules = incoming_rules(
        r#"let people = #{ "ann@contoso.com": "ann@fabrikam.local" };
if replica.assignee != () { workItem.assignee = people[replica.assignee.uniqueName] ?? replica.assignee; }"#,
    );
    let desired = run_incoming(&rules, &replica, None, &current, false).unwrap();
    assert_eq!(desired.assignee, Person::parse("ann@fabrikam.local"));
    let rules = incoming_rules(r#"workItem.creator = "zed@contoso.com";"#);
    let err = run_incoming(&rules, &replica, None, &current, false).unwrap_err();
    assert!(err.to_string().contains("workItem.creator"), "{err}");
    let rules = incoming_rules("workItem.assignee = 7;");
    let err = run_incoming(&rules, &replica, None, &current, false).unwrap_err();
    assert!(err.to_string().contains("workItem.assignee"), "{err}");
    assert_eq!(
        map_path("\\Contoso\\Web\\", "Fabrikam").as_deref(),
        Some("Fabrikam\\Web")
    );
    assert_eq!(map_path("Contoso", "Fabrikam").as_deref(), Some("Fabrikam"));
    assert_eq!(map_path("  ", "Fabrikam"), None);
}

#[test]
fn links_map_to_twins_and_keep_those_the_other_side_does_not_have() {
    let sender = compile(&default_rules("Contoso")).unwrap();
    let receiver = compile(&default_rules("Fabrikam")).unwrap().with_local_types(agile());
    // The sender's item has a parent (40) and a related item (41); here 40 is twinned as 400,
    // 41 not yet; this item links to 500 (twinned, and gone from the sender) and 600 (an item
    // the other side does not have).
    let mut item = local_item();
    item.links.push(WorkLink {
        rel: "System.LinkTypes.Related".into(),
        target: 41,
        url: Some("https://dev.azure.com/contoso/_apis/wit/workItems/41".into()),
        relation_index: Some(2),
    });
    let replica = replica_of(&sender, &item, 7);
    let keys: Vec<&str> = replica.entity.links.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["40", "41"]);
    let here = |target: u64| WorkLink {
        rel: "System.LinkTypes.Related".into(),
        target,
        url: Some(format!("https://server/_apis/wit/workItems/{target}")),
        relation_index: Some(target as usize),
    };
    let current = applied(WorkItem {
        project_key: "Fabrikam".into(),
        links: vec![here(500), here(600)],
        ..local_item()
    });
    let twins = Twins {
        by_remote: BTreeMap::from([("40".to_string(), 400)]),
        synced: [400, 500].into_iter().collect(),
    };
    let desired = run_incoming_linked(&receiver, &replica, None, &current, false, twins.clone()).unwrap();
    let got: Vec<(&str, u64)> = desired.links.iter().map(|l| (l.rel.as_str(), l.target)).collect();
    assert_eq!(
        got,
        [
            ("System.LinkTypes.Related", 600),
            ("System.LinkTypes.Hierarchy-Reverse", 400)
        ]
    );
    // Running it again on the result changes nothing.
    let again = run_incoming_linked(
        &receiver,
        &replica,
        None,
        &applied(desired.clone()),
        false,
        twins.clone(),
    )
    .unwrap();
    assert_eq!(again.links.len(), 2);

    // parentId reads the parent link, and localId the twin.
    let rules = incoming_rules(
        r#"if replica.parentId != "40" { throw "parentId " + replica.parentId; }
if linkHelper.localId(replica.parentId) != 400 { throw "localId"; }
if linkHelper.localId("41") != () { throw "41 has no twin"; }"#,
    );
    run_incoming_linked(&rules, &replica, None, &current, false, twins).unwrap();
    // Set in the outgoing script, parentId adds the parent link; against another one, refused.
    let set_parent = |line: &str| {
        compile(&format!(
            "{OUTGOING_MARKER}\nreplica.summary = workItem.summary;\n{line}\n{INCOMING_MARKER}\n"
        ))
        .unwrap()
    };
    let mut orphan = local_item();
    orphan.links.clear();
    let e = run_outgoing(&set_parent("replica.parentId = 77;"), &orphan, None).unwrap();
    assert_eq!(
        e.links
            .iter()
            .map(|l| (l.rel.as_str(), l.key.as_str()))
            .collect::<Vec<_>>(),
        [("System.LinkTypes.Hierarchy-Reverse", "77")]
    );
    let err = run_outgoing(
        &set_parent("replica.links = workItem.links; replica.parentId = 77;"),
        &local_item(),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("replica.parentId"), "{err}");
    let err = run_outgoing(
        &set_parent(r#"replica.links = [#{ rel: "Hyperlink", key: "1" }];"#),
        &orphan,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a work item link type"), "{err}");
}

#[test]
fn merged_copies_take_edits_and_leave_with_deletions_of_their_originals_only() {
    let sender = compile(&default_rules("Contoso")).unwrap();
    let receiver = compile(&default_rules("Fabrikam")).unwrap().with_local_types(agile());
    let item = local_item();
    let first = replica_of(&sender, &item, 7);
    // Here: copies of 101 and 102, and a person's own comment.
    let mut current = applied(run_incoming(&receiver, &first, None, &WorkItem::default(), true).unwrap());
    current.comments.push(WorkComment {
        id: Some("own".into()),
        body: "<p>mine</p>".into(),
        ..WorkComment::default()
    });
    // There: 101 edited, 102 deleted.
    let mut edited = item.clone();
    edited.comments[0].body = "<p>first, corrected</p>".into();
    edited.comments.remove(1);
    let next = replica_of(&sender, &edited, 8);
    let desired = run_incoming(&receiver, &next, Some(&first), &current, false).unwrap();
    let bodies: Vec<&str> = desired.comments.iter().map(|c| c.body.as_str()).collect();
    assert_eq!(bodies, ["<p>first, corrected</p>", "<p>mine</p>"]);
    let plan = build_patch(&current, &desired).unwrap();
    assert!(plan.comments.is_empty(), "{:?}", plan.comments);
    assert_eq!(
        plan.comment_edits.iter().map(|c| c.id.as_deref()).collect::<Vec<_>>(),
        [current.comments[0].id.as_deref()]
    );
    assert_eq!(plan.comment_deletes, [current.comments[1].id.clone().unwrap()]);
    // The same replica again (it is the previous one now): nothing edited, nothing deleted.
    let settled = applied(desired);
    let again = run_incoming(&receiver, &next, Some(&next), &settled, false).unwrap();
    assert!(build_patch(&settled, &again).unwrap().is_empty());
    // A person's own comment is never edited by a script.
    let mut own_edit = settled.clone();
    own_edit.comments[1].body = "<p>changed</p>".into();
    assert!(build_patch(&settled, &own_edit).unwrap().comment_edits.is_empty());
}

#[test]
fn merge_comments_adds_only_new_remote_ones_and_is_idempotent() {
    let sender = compile(&default_rules("Contoso")).unwrap();
    let receiver = compile(&default_rules("Fabrikam")).unwrap();
    let mut remote = local_item();
    let mut current = applied(
        run_incoming(
            &receiver,
            &replica_of(&sender, &remote, 7),
            None,
            &WorkItem::default(),
            true,
        )
        .unwrap(),
    );
    // A local comment on the receiver, and a new comment on the sender.
    current.comments.push(WorkComment {
        id: Some("local-1".into()),
        body: "mine".into(),
        ..WorkComment::default()
    });
    remote.comments.push(WorkComment {
        id: Some("103".into()),
        body: "third".into(),
        ..WorkComment::default()
    });
    let replica = replica_of(&sender, &remote, 8);
    let desired = run_incoming(&receiver, &replica, None, &current, false).unwrap();
    assert_eq!(desired.comments.len(), 4);
    assert!(desired.comments.iter().any(|c| c.body == "mine"));
    let plan = build_patch(&current, &desired).unwrap();
    assert_eq!(plan.comments.len(), 1);
    assert_eq!(plan.comments[0].remote_id.as_deref(), Some("103"));
    assert!(plan.patch.is_none());

    // Merging twice in one script adds nothing more.
    let twice = format!(
        "{OUTGOING_MARKER}\n{INCOMING_MARKER}\n\
         workItem.comments = commentHelper.mergeComments(workItem, replica);\n\
         workItem.comments = commentHelper.mergeComments(workItem, replica);\n"
    );
    let rules = compile(&twice).unwrap();
    let desired2 = run_incoming(&rules, &replica, None, &current, false).unwrap();
    assert_eq!(desired2.comments, desired.comments);
    // And once applied, the next run adds nothing.
    let current = applied(desired);
    let desired = run_incoming(&receiver, &replica, Some(&replica), &current, false).unwrap();
    assert!(build_patch(&current, &desired).unwrap().is_empty());
}

#[test]
fn added_and_removed_comments_come_from_the_previous_replica() {
    let sender = compile(&default_rules("Contoso")).unwrap();
    let mut item = local_item();
    let before = replica_of(&sender, &item, 7);
    item.comments.remove(0);
    item.comments.push(WorkComment {
        id: Some("103".into()),
        body: "third".into(),
        ..WorkComment::default()
    });
    let now = replica_of(&sender, &item, 8);
    let rules = compile(&format!(
        "{OUTGOING_MARKER}\n{INCOMING_MARKER}\n\
         workItem.summary = replica.addedComments.map(|c| c.id).reduce(|s, x| s + x, \"+\") \
         + replica.removedComments.map(|c| c.id).reduce(|s, x| s + x, \"-\") \
         + (if previous == () {{ \"?\" }} else {{ previous.origin.rev.to_string() }});\n"
    ))
    .unwrap();
    let current = WorkItem {
        id: Some(1),
        rev: Some(1),
        ..WorkItem::default()
    };
    let out = run_incoming(&rules, &now, Some(&before), &current, false).unwrap();
    assert_eq!(out.summary, "+103-1017");
    let out = run_incoming(&rules, &now, None, &current, false).unwrap();
    assert_eq!(out.summary, "+102103-?");
}

fn run_one(body: &str, limits: Limits) -> ScriptError {
    let rules = compile_with(&format!("{OUTGOING_MARKER}\n{body}\n{INCOMING_MARKER}\n"), limits).unwrap();
    run_outgoing(&rules, &local_item(), None).unwrap_err()
}

#[test]
fn sandbox_stops_an_endless_loop_by_time() {
    let limits = Limits {
        max_operations: u64::MAX,
        time_budget: Duration::from_millis(50),
        ..Limits::default()
    };
    let err = run_one("let x = 0;\nloop { x += 1; }", limits);
    assert!(
        matches!(
            err,
            ScriptError::Stopped {
                limit: Limit::Time(_),
                line: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("outgoing script stopped: ran longer than 50 ms (line 3)"),
        "{err}"
    );
}

#[test]
fn sandbox_stops_an_endless_loop_by_operations() {
    let err = run_one(
        "loop { }",
        Limits {
            max_operations: 10_000,
            ..Limits::default()
        },
    );
    assert!(err.to_string().contains("ran more than 10000 operations"), "{err}");
}

#[test]
fn sandbox_stops_unbounded_growth() {
    let err = run_one("let s = \"x\";\nloop { s += s; }", Limits::default());
    assert!(
        matches!(
            err,
            ScriptError::Stopped {
                limit: Limit::StringSize(_),
                line: 3,
                ..
            }
        ),
        "{err:?}"
    );
    let err = run_one("let a = [1];\nloop { a += a; }", Limits::default());
    assert!(
        matches!(
            err,
            ScriptError::Stopped {
                limit: Limit::ArraySize(_),
                ..
            }
        ),
        "{err:?}"
    );
    let err = run_one(
        "let m = #{ x: 1 };\nloop { m = #{ a: m, b: m }; }",
        Limits {
            max_map_size: 500,
            ..Limits::default()
        },
    );
    assert!(
        matches!(
            err,
            ScriptError::Stopped {
                limit: Limit::MapSize(500),
                line: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("a map grew beyond 500 entries"), "{err}");
}

#[test]
fn sandbox_stops_deep_recursion() {
    let err = run_one("fn down(n) { down(n + 1) }\ndown(0);", Limits::default());
    assert!(
        matches!(
            err,
            ScriptError::Stopped {
                limit: Limit::CallLevels(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("nested calls deeper than"), "{err}");
}

#[test]
fn sandbox_has_no_import_eval_or_files() {
    for source in ["import \"os\" as os;", "eval(\"1 + 1\");"] {
        let text = format!("{OUTGOING_MARKER}\n{source}\n{INCOMING_MARKER}\n");
        let err = compile(&text).unwrap_err();
        assert!(
            matches!(
                err,
                ScriptError::Syntax {
                    script: Section::Outgoing,
                    line: 2,
                    ..
                }
            ),
            "{source}: {err:?}"
        );
    }
    for source in [
        "let f = open(\"/etc/passwd\");",
        "read_file(\"/etc/passwd\")",
        "sleep(10);",
        "timestamp()",
    ] {
        let err = run_one(source, Limits::default());
        assert!(
            matches!(&err, ScriptError::Runtime { line: 2, message, .. } if message.contains("Function not found")),
            "{source}: {err:?}"
        );
    }
}

#[test]
fn syntax_errors_have_line_and_column_of_the_whole_text() {
    let mut text = default_rules("Fabrikam");
    text.push_str("workItem.summary = ;\n");
    let line = text.lines().count();
    let err = compile(&text).unwrap_err();
    match err {
        ScriptError::Syntax {
            script,
            line: l,
            column,
            ..
        } => {
            assert_eq!((script, l), (Section::Incoming, line));
            assert!(column > 0);
        }
        other => panic!("{other:?}"),
    }
    let err = compile("let x = 1;\n").unwrap_err();
    assert!(matches!(err, ScriptError::Layout { line: 1, .. }), "{err:?}");
    let err = compile(&format!("{OUTGOING_MARKER}\n")).unwrap_err();
    assert!(err.to_string().contains(INCOMING_MARKER), "{err}");
}

#[test]
fn unmappable_values_name_their_field() {
    let err = run_one("replica.summary = #{ a: 1 };", Limits::default());
    assert_eq!(
        err.to_string(),
        "outgoing script: replica.summary: expected a string, found a map"
    );
    let err = run_one("replica.colour = \"red\";", Limits::default());
    assert!(err.to_string().contains("replica.colour: not a field here"), "{err}");
    let err = run_one("replica.labels = [\"a\", 2];", Limits::default());
    assert!(
        err.to_string().contains("replica.labels[1]: expected a string"),
        "{err}"
    );

    let rules = compile(&format!(
        "{OUTGOING_MARKER}\n{INCOMING_MARKER}\nworkItem.comments = replica.comments;\n"
    ))
    .unwrap();
    let replica = replica_of(&compile(&default_rules("C")).unwrap(), &local_item(), 1);
    let err = run_incoming(&rules, &replica, None, &local_item(), false).unwrap_err();
    assert!(
        err.to_string()
            .contains("workItem.comments[0]: this is a replica's entry; use commentHelper.mergeComments"),
        "{err}"
    );

    let rules = compile(&format!(
        "{OUTGOING_MARKER}\n{INCOMING_MARKER}\nworkItem.priority = \"High\";\n"
    ))
    .unwrap();
    let err = run_incoming(&rules, &replica, None, &local_item(), false).unwrap_err();
    assert!(
        err.to_string()
            .contains("workItem.priority: expected an integer, found \"High\""),
        "{err}"
    );

    // A first sync without a project is refused, not created somewhere.
    let rules = compile(&format!(
        "{OUTGOING_MARKER}\n{INCOMING_MARKER}\nworkItem.summary = replica.summary;\n"
    ))
    .unwrap();
    let err = run_incoming(&rules, &replica, None, &WorkItem::default(), true).unwrap_err();
    assert!(err.to_string().contains("workItem.projectKey"), "{err}");
}

#[test]
fn read_only_work_item_in_outgoing() {
    let err = run_one("workItem.summary = \"changed\";", Limits::default());
    assert!(matches!(err, ScriptError::Runtime { line: 2, .. }), "{err:?}");
}

#[test]
fn project_is_escaped_in_the_first_sync_block() {
    let project = "Fab\"rikam\\\"; workItem.summary = \"pwned\"; //\n x";
    let text = default_rules(project);
    let rules = compile(&text).unwrap();
    let replica = replica_of(&compile(&default_rules("C")).unwrap(), &local_item(), 1);
    let out = run_incoming(&rules, &replica, None, &WorkItem::default(), true).unwrap();
    assert_eq!(out.project_key, project);
    assert_eq!(out.summary, "Login fails");
    assert_eq!(rhai_string("a\"b\\c\u{1}"), "\"a\\\"b\\\\c\\u0001\"");
}

#[test]
fn status_priority_and_custom_field_examples_work_when_uncommented() {
    let uncomment = |text: &str| {
        text.lines()
            .map(|l| {
                let t = l.trim_start();
                let code = [
                    "replica.",
                    "let statusMap",
                    "if replica.status",
                    "workItem.priority",
                    "workItem.customFields",
                ];
                match t.strip_prefix("// ") {
                    Some(rest) if code.iter().any(|c| rest.starts_with(c)) => rest.to_string(),
                    _ => l.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let sender = compile(&uncomment(&default_rules("Contoso"))).unwrap();
    let agile_bug = ["New", "Active", "Resolved", "Closed"].map(|s| {
        (
            s.to_string(),
            crate::sync::states::category(s).unwrap_or_default().to_string(),
        )
    });
    let receiver = compile(&uncomment(&default_rules("Fabrikam")))
        .unwrap()
        .with_local_types(crate::sync::states::LocalTypes::new(vec![(
            "Bug".into(),
            agile_bug.to_vec(),
        )]));
    let mut item = local_item();
    item.custom_fields.insert("Custom.Team".into(), json!("Red"));
    item.status = Some("Done".into());
    let replica = replica_of(&sender, &item, 3);
    assert_eq!(replica.entity.status.as_deref(), Some("Done"));
    assert_eq!(replica.entity.priority.as_deref(), Some("2"));
    let out = run_incoming(&receiver, &replica, None, &WorkItem::default(), true).unwrap();
    assert_eq!(out.status.as_deref(), Some("Closed"));
    assert_eq!(out.priority, Some(2));
    assert_eq!(out.custom_fields["Custom.Team"], json!("Red"));
}

#[test]
fn node_helpers() {
    let scrum: Vec<String> = ["Bug", "Epic", "Feature", "Impediment", "Product Backlog Item", "Task"]
        .map(String::from)
        .to_vec();
    let basic: Vec<String> = ["Epic", "Issue", "Task"].map(String::from).to_vec();
    assert_eq!(
        get_issue_type(&scrum, "User Story").as_deref(),
        Some("Product Backlog Item")
    );
    assert_eq!(get_issue_type(&scrum, "bug").as_deref(), Some("Bug"));
    assert_eq!(get_issue_type(&basic, "Bug").as_deref(), Some("Issue"));
    assert_eq!(get_issue_type(&basic, "Product Backlog Item").as_deref(), Some("Issue"));
    assert_eq!(get_issue_type(&basic, "Test Case"), None);
    assert_eq!(get_issue_type(&[], "Whatever").as_deref(), Some("Whatever"));
    assert_eq!(
        strip_html("<p>Hello&nbsp;<b>world</b> &amp; more</p><div>next<br/>line</div><script>x()</script>&#233;"),
        "Hello world & more\nnext\nline\né"
    );
    let rules = compile(&format!(
        "{OUTGOING_MARKER}\nreplica.description = nodeHelper.stripHtml(workItem.description);\n\
         replica.descriptionFormat = \"plain\";\nreplica.type = nodeHelper.getIssueType(\"Nope\") ?? \"Task\";\n{INCOMING_MARKER}\n"
    ))
    .unwrap()
    .with_local_types(types(&basic.iter().map(String::as_str).collect::<Vec<_>>()));
    let e = run_outgoing(&rules, &local_item(), None).unwrap();
    assert_eq!(e.description.text, "Steps: 1");
    assert_eq!(e.type_name, "Task");
}

#[test]
fn rules_can_be_shared_between_threads() {
    // The daemon keeps compiled rules in shared state and runs them off the async threads.
    fn shared<T: Send + Sync + Clone + 'static>() {}
    shared::<Rules>();
}

#[test]
fn attachment_ids_come_without_the_query() {
    use crate::sync::workitem::attachment_id;
    assert_eq!(
        attachment_id("https://x/_apis/wit/attachments/g-1?fileName=a.txt"),
        "g-1"
    );
    assert_eq!(attachment_id("https://x/_apis/wit/attachments/g-2"), "g-2");
}

#[test]
fn service_hooks_wake_on_work_item_events_only() {
    use crate::sync::hook::{classify, HookEvent};
    let ev = |body: &str| classify(body.as_bytes());
    assert_eq!(
        ev(r#"{"eventType":"workitem.commented"}"#),
        Ok(HookEvent::WorkItem("workitem.commented".into()))
    );
    assert_eq!(
        ev(r#"{"eventType":"git.push"}"#),
        Ok(HookEvent::Other("git.push".into()))
    );
    assert_eq!(ev("{}"), Ok(HookEvent::Other(String::new())));
    assert!(ev("workitem.updated").unwrap_err().contains("not JSON"));
}

#[test]
fn retry_and_resolve_ask_which_side_when_one_id_failed_both_ways() {
    use crate::sync::engine::retry_or_resolve;
    use crate::sync::state::{Side, SyncError, SyncState};
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path(), 1 << 20).unwrap();
    let s = SyncState::open(&store).unwrap();
    let error = |side| SyncError {
        connection: "c".into(),
        side,
        item: "7".into(),
        message: "boom".into(),
        at_ms: 1,
        attempts: 1,
        parked: Vec::new(),
        retry: false,
    };
    s.put_error(&error(Side::Outgoing)).unwrap();
    s.put_error(&error(Side::Incoming)).unwrap();
    let e = retry_or_resolve(&s, "c", "7", None, true).unwrap_err();
    assert!(e.message.contains("--side"), "{}", e.message);
    assert!(s.error("c", Side::Outgoing, "7").unwrap().is_some(), "nothing touched");

    let retried = retry_or_resolve(&s, "c", "7", Some(Side::Incoming), false).unwrap();
    assert_eq!(retried.len(), 1);
    assert!(s.error("c", Side::Incoming, "7").unwrap().unwrap().retry);
    assert!(!s.error("c", Side::Outgoing, "7").unwrap().unwrap().retry);

    retry_or_resolve(&s, "c", "7", Some(Side::Outgoing), true).unwrap();
    assert!(s.error("c", Side::Outgoing, "7").unwrap().is_none());
    // One error left: no side needed.
    retry_or_resolve(&s, "c", "7", None, true).unwrap();
    assert!(s.error("c", Side::Incoming, "7").unwrap().is_none());
    assert!(retry_or_resolve(&s, "c", "7", None, true).is_err());
}
