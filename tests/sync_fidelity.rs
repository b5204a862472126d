//! What real work items carry beyond the five default fields, end to end: inline images in
//! HTML fields, a Bug's repro steps, states, people, area and iteration paths, comment edits
//! and deletions, links between work items, and kills between their writes. Two simulated
//! trackers, a node and an agent as real processes.

mod common;
#[path = "sync/pair.rs"]
mod pair;

use ado_sim::{Profile, SimHandle};
use serde_json::json;

use pair::{comments, converge, field, fields, wait_field, wait_titled, Pair, PRIVATE, PUBLIC};
use relay::sync::inline::image_sources;

fn set(field: &str, value: &str) -> serde_json::Value {
    json!({"op": "add", "path": format!("/fields/{field}"), "value": value})
}

fn png(seed: u8, len: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend((0..len).map(|i| (i as u8).wrapping_mul(seed)));
    b
}

/// The images of `html` on `sim`'s own URL, as the bytes they link; `Err` names any other
/// image that is not `allowed`.
fn local_images(sim: &SimHandle, html: &str, allowed: &[&str]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for (_, src) in image_sources(html) {
        if allowed.contains(&src.as_str()) {
            continue;
        }
        let base = sim.url.trim_end_matches('/');
        let id = src
            .strip_prefix(&format!("{base}/_apis/wit/attachments/"))
            .and_then(|rest| rest.split('?').next())
            .ok_or_else(|| format!("an image not on this tracker: {src}"))?;
        out.push(
            sim.attachment_bytes(id)
                .ok_or_else(|| format!("an image with no bytes: {src}"))?,
        );
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_images_cross_as_bytes_come_back_as_the_original_and_leave_other_hosts_alone() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let shot = png(7, 40_000);
    let (_, shot_url) = p.public.upload_as_human("screen shot.png", &shot);
    let elsewhere = "https://cdn.example.com/logo.png";
    let description =
        format!("<p>Broken here: <img src=\"{shot_url}\" alt=\"shot\"> see also <img src=\"{elsewhere}\"></p>");
    let (id, twin) = p
        .create_synced(
            "Task",
            &[
                ("System.Title", "Pasted screenshot"),
                ("System.Description", &description),
            ],
        )
        .await;
    converge("the screenshot on the private side", || {
        let d = field(&p.private, twin, "System.Description");
        let images = local_images(&p.private, &d, &[elsewhere])?;
        (images == [shot.clone()] && d.contains(elsewhere))
            .then_some(())
            .ok_or(d.clone())
    })
    .await;

    // A comment with a pasted image crosses the same way.
    let trace = png(13, 9_000);
    let (_, trace_url) = p.public.upload_as_human("trace.png", &trace);
    p.public
        .add_comment_as_human(id, &format!("<div>Trace: <img src=\"{trace_url}\"></div>"))
        .unwrap();
    converge("the comment's image on the private side", || {
        let c = comments(&p.private, twin);
        let with = c.iter().find(|c| c.contains("Trace:")).ok_or(format!("{c:?}"))?;
        let images = local_images(&p.private, with, &[])?;
        (images == [trace.clone()]).then_some(()).ok_or(with.to_string())
    })
    .await;

    // An edit on the private side comes back: the public description is the original, and
    // no image was uploaded again on either side.
    p.private
        .edit_as_human(twin, &[set("System.Title", "Pasted screenshot, seen on premises")])
        .unwrap();
    wait_field(&p.public, id, "System.Title", "Pasted screenshot, seen on premises").await;
    assert_eq!(field(&p.public, id, "System.Description"), description);
    assert_eq!(
        p.public.count("attachments.create"),
        0,
        "an image uploaded back to its origin"
    );
    assert_eq!(p.private.count("attachments.create"), 2, "one upload per image");

    // A screenshot pasted on the private side arrives on the public side.
    let onprem = png(29, 20_000);
    let (_, onprem_url) = p.private.upload_as_human("onprem.png", &onprem);
    let current = field(&p.private, twin, "System.Description");
    p.private
        .edit_as_human(
            twin,
            &[set(
                "System.Description",
                &format!("{current}<p>On premises: <img src=\"{onprem_url}\"></p>"),
            )],
        )
        .unwrap();
    converge("both screenshots on the public side", || {
        let d = field(&p.public, id, "System.Description");
        let images = local_images(&p.public, &d, &[elsewhere])?;
        (images == [shot.clone(), onprem.clone()]).then_some(()).ok_or(d)
    })
    .await;
    assert_eq!(
        p.public.count("attachments.create"),
        1,
        "only the new image is uploaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bug_carries_its_repro_steps_and_a_task_made_from_it_shows_them_as_its_description() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    // On the private side, the other side's Bugs become Issues (a process without Bugs).
    let rules = p.agent_dir.with_extension("rules");
    std::fs::write(
        &rules,
        relay::sync::default_rules(PRIVATE).replace(
            "workItem.typeName = nodeHelper.getIssueType(replica.type) ?? \"Task\";",
            "workItem.typeName = if replica.type == \"Bug\" { \"Issue\" } else { nodeHelper.getIssueType(replica.type) ?? \"Task\" };",
        ),
    )
    .unwrap();
    p.sync_cli(false, &["rules", "set", pair::CONN, rules.to_str().unwrap()])
        .await;
    let steps = "<ol><li>Open the login page</li><li>Wait 30 s</li></ol>";
    let (id, twin) = p
        .create_synced(
            "Bug",
            &[
                ("System.Title", "Login times out"),
                ("Microsoft.VSTS.TCM.ReproSteps", steps),
            ],
        )
        .await;
    assert_eq!(field(&p.private, twin, "System.WorkItemType"), "Issue");
    converge("the repro steps as the Issue's description", || {
        (field(&p.private, twin, "System.Description") == steps)
            .then_some(())
            .ok_or_else(|| field(&p.private, twin, "System.Description"))
    })
    .await;

    // Edited on premises, the text comes back as the Bug's repro steps.
    let edited = "<ol><li>Open the login page</li><li>Wait 31 s</li></ol>";
    p.private
        .edit_as_human(twin, &[set("System.Description", edited)])
        .unwrap();
    converge("the repro steps on the public side", || {
        (field(&p.public, id, "Microsoft.VSTS.TCM.ReproSteps") == edited)
            .then_some(())
            .ok_or_else(|| field(&p.public, id, "Microsoft.VSTS.TCM.ReproSteps"))
    })
    .await;

    // A Bug made on premises arrives as a Bug whose repro steps hold its text.
    let private_bug = p
        .private
        .create_item(
            PRIVATE,
            "Bug",
            &fields(&[
                ("System.Title", "Printer jams"),
                ("Microsoft.VSTS.TCM.ReproSteps", "<p>Print twice</p>"),
            ]),
        )
        .unwrap();
    let public_bug = wait_titled(&p.public, PUBLIC, "Printer jams").await;
    wait_field(
        &p.public,
        public_bug,
        "Microsoft.VSTS.TCM.ReproSteps",
        "<p>Print twice</p>",
    )
    .await;
    assert_eq!(field(&p.public, public_bug, "System.WorkItemType"), "Bug");
    assert!(private_bug > 0);
}

/// The default rules of a side with the state sent, and set through `mapState` (or, with
/// `mapped` false, copied as it is).
fn rules_with_states(project: &str, mapped: bool) -> String {
    let incoming = if mapped {
        "if replica.status != () { workItem.status = nodeHelper.mapState(replica.status, workItem.typeName) ?? workItem.status; }"
    } else {
        "if replica.status != () { workItem.status = replica.status; }"
    };
    relay::sync::default_rules(project)
        .replace("// replica.status = workItem.status;", "replica.status = workItem.status;")
        .replace(
            "// if replica.status != () { workItem.status = nodeHelper.mapState(replica.status, workItem.typeName) ?? workItem.status; }",
            incoming,
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_map_between_agile_and_scrum_and_a_state_the_type_lacks_is_an_item_error_naming_its_states() {
    let mut p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    // The private project follows Scrum; the agent learns its types when it starts.
    p.private.use_scrum(PRIVATE);
    p.restart_agent().await;
    for (node, project) in [(true, PUBLIC), (false, PRIVATE)] {
        let dir = if node { &p.node_dir } else { &p.agent_dir };
        let rules = dir.with_extension("rules");
        std::fs::write(&rules, rules_with_states(project, true)).unwrap();
        p.sync_cli(node, &["rules", "set", pair::CONN, rules.to_str().unwrap()])
            .await;
    }
    let (id, twin) = p.create_synced("Bug", &[("System.Title", "Stateful")]).await;
    wait_field(&p.private, twin, "System.State", "New").await;
    p.public.edit_as_human(id, &[set("System.State", "Active")]).unwrap();
    wait_field(&p.private, twin, "System.State", "Committed").await;
    p.private.edit_as_human(twin, &[set("System.State", "Done")]).unwrap();
    wait_field(&p.public, id, "System.State", "Closed").await;

    // Copied as it is, a state the Scrum Bug lacks is that item's error, naming its states.
    let rules = p.agent_dir.with_extension("rules");
    std::fs::write(&rules, rules_with_states(PRIVATE, false)).unwrap();
    p.sync_cli(false, &["rules", "set", pair::CONN, rules.to_str().unwrap()])
        .await;
    p.public.edit_as_human(id, &[set("System.State", "Resolved")]).unwrap();
    let errors = common::wait_for("the state's sync error", || async {
        let out = p.sync_cli(false, &["errors", pair::CONN, "--json"]).await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        (!list.is_empty()).then_some(list)
    })
    .await;
    let message = errors[0]["message"].as_str().unwrap();
    assert!(
        message.contains("\"Resolved\" is not a state of a Bug")
            && message.contains("New, Approved, Committed, Done, Removed"),
        "{message}"
    );
    assert_eq!(field(&p.private, twin, "System.State"), "Done", "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_between_an_image_upload_and_the_write_makes_one_item_whose_image_works() {
    let mut p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let shot = png(3, 60_000);
    let (_, shot_url) = p.public.upload_as_human("crash.png", &shot);
    // Killed while the image's upload answer is held, and again while the create's is.
    p.kill_agent_during_upload_and_create(|p| {
        p.public
            .create_item(
                PUBLIC,
                "Task",
                &fields(&[
                    ("System.Title", "Crash with a screenshot"),
                    ("System.Description", &format!("<p><img src=\"{shot_url}\"></p>")),
                ]),
            )
            .unwrap();
    })
    .await;
    let twin = wait_titled(&p.private, PRIVATE, "Crash with a screenshot").await;
    converge("the screenshot", || {
        let d = field(&p.private, twin, "System.Description");
        let images = local_images(&p.private, &d, &[])?;
        (images == [shot.clone()]).then_some(()).ok_or(d)
    })
    .await;
    assert_eq!(p.private.item_ids(Some(PRIVATE)), [twin], "exactly one work item");
}

/// Waits until item `id` on `sim` is assigned to unique name `who`.
async fn wait_assigned(sim: &SimHandle, id: u64, who: &str) {
    converge(&format!("#{id} assigned to {who}"), || {
        (unique_name(sim, id, "System.AssignedTo") == who)
            .then_some(())
            .ok_or_else(|| field(sim, id, "System.AssignedTo"))
    })
    .await
}

/// The unique name in an identity field as the simulator holds it (`Name <unique>`).
fn unique_name(sim: &SimHandle, id: u64, name: &str) -> String {
    let v = field(sim, id, name);
    v.rsplit_once('<')
        .map(|(_, u)| u.trim_end_matches('>').to_owned())
        .unwrap_or(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assignee_crosses_by_unique_name_and_one_unknown_here_leaves_the_field_with_one_warning() {
    let p = Pair::start(Profile::Services, Profile::Server2019, &[]).await;
    // The same person under another display name on premises; Zed exists only in the cloud.
    p.public.add_identity("Ann Smith", "ann@contoso.com");
    p.public.add_identity("Zed Jones", "zed@contoso.com");
    p.private.add_identity("Smith, Ann", "ann@contoso.com");
    let assigned = |sim: &SimHandle, id: u64| unique_name(sim, id, "System.AssignedTo");

    let (id, twin) = p
        .create_synced(
            "Task",
            &[("System.Title", "Assigned"), ("System.AssignedTo", "ann@contoso.com")],
        )
        .await;
    wait_assigned(&p.private, twin, "ann@contoso.com").await;
    assert_eq!(
        field(&p.private, twin, "System.AssignedTo"),
        "Smith, Ann <ann@contoso.com>",
        "the person as this tracker names her"
    );

    // Reassigned on premises, to someone both trackers know.
    p.private
        .edit_as_human(twin, &[set("System.AssignedTo", "human.editor@example.com")])
        .unwrap();
    wait_assigned(&p.public, id, "human.editor@example.com").await;

    // Zed is unknown on premises: the title still crosses, the assignee stays, one warning.
    p.public
        .edit_as_human(
            id,
            &[
                set("System.AssignedTo", "zed@contoso.com"),
                set("System.Title", "Assigned to Zed"),
            ],
        )
        .unwrap();
    wait_field(&p.private, twin, "System.Title", "Assigned to Zed").await;
    assert_eq!(assigned(&p.private, twin), "human.editor@example.com");
    let warnings = || async {
        let out = p.sync_cli(false, &["warnings", pair::CONN, "--json"]).await;
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    };
    let list = warnings().await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["field"], "assignee");
    assert_eq!(list[0]["local"], twin);
    let message = list[0]["message"].as_str().unwrap();
    assert!(
        message.contains("Zed Jones <zed@contoso.com> is not a user of this tracker"),
        "{message}"
    );
    let errors = p.sync_cli(false, &["errors", pair::CONN]).await;
    assert!(
        errors.contains("no sync errors") && errors.contains("zed@contoso.com"),
        "{errors}"
    );

    // Another change of the item: still one warning, and the cloud keeps Zed (the unchanged
    // assignee on premises is not sent back over him).
    p.private
        .edit_as_human(twin, &[set("System.Title", "Assigned to Zed, seen")])
        .unwrap();
    wait_field(&p.public, id, "System.Title", "Assigned to Zed, seen").await;
    assert_eq!(assigned(&p.public, id), "zed@contoso.com");
    assert_eq!(warnings().await.len(), 1);

    // Once an assignee is written again, the warning goes.
    p.public
        .edit_as_human(id, &[set("System.AssignedTo", "ann@contoso.com")])
        .unwrap();
    wait_assigned(&p.private, twin, "ann@contoso.com").await;
    assert!(warnings().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn area_and_iteration_paths_move_onto_the_other_project_when_their_lines_are_uncommented() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    for (node, project) in [(true, PUBLIC), (false, PRIVATE)] {
        let dir = if node { &p.node_dir } else { &p.agent_dir };
        let rules = dir.with_extension("rules");
        let mut text = relay::sync::default_rules(project);
        for line in [
            "replica.customFields[\"areaPath\"] = workItem.areaPath;",
            "replica.customFields[\"iterationPath\"] = workItem.iterationPath;",
            "workItem.areaPath = nodeHelper.mapPath(replica.customFields[\"areaPath\"], workItem.projectKey) ?? workItem.areaPath;",
            "workItem.iterationPath = nodeHelper.mapPath(replica.customFields[\"iterationPath\"], workItem.projectKey) ?? workItem.iterationPath;",
        ] {
            assert!(text.contains(&format!("// {line}")), "{line} is one line away");
            text = text.replace(&format!("// {line}"), line);
        }
        std::fs::write(&rules, text).unwrap();
        p.sync_cli(node, &["rules", "set", pair::CONN, rules.to_str().unwrap()])
            .await;
    }
    let (id, twin) = p
        .create_synced(
            "Task",
            &[
                ("System.Title", "Pathed"),
                ("System.AreaPath", &format!("{PUBLIC}\\Web")),
                ("System.IterationPath", &format!("{PUBLIC}\\Sprint 3")),
            ],
        )
        .await;
    converge("the paths on premises", || {
        let got = (
            field(&p.private, twin, "System.AreaPath"),
            field(&p.private, twin, "System.IterationPath"),
        );
        (got == (format!("{PRIVATE}\\Web"), format!("{PRIVATE}\\Sprint 3")))
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
    p.private
        .edit_as_human(twin, &[set("System.IterationPath", &format!("{PRIVATE}\\Sprint 4"))])
        .unwrap();
    converge("the next sprint in the cloud", || {
        let got = field(&p.public, id, "System.IterationPath");
        (got == format!("{PUBLIC}\\Sprint 4")).then_some(()).ok_or(got)
    })
    .await;
    assert_eq!(field(&p.public, id, "System.AreaPath"), format!("{PUBLIC}\\Web"));
}

/// Waits until `sim`'s item `id` has exactly the comment texts `want` (History on 2019).
async fn wait_comments(what: &str, sim: &SimHandle, id: u64, want: &[&str]) {
    converge(what, || {
        let got = comments(sim, id);
        (got == want).then_some(()).ok_or(format!("{got:?}"))
    })
    .await;
}

/// An item titled `title` made in the cloud with one comment, its twin on premises with the
/// copy, and then that comment edited in the cloud: the item, its twin and the comment's id.
async fn commented_then_edited(p: &Pair, title: &str) -> (u64, u64, u64) {
    let id = p
        .public
        .create_item(PUBLIC, "Task", &fields(&[("System.Title", title)]))
        .unwrap();
    p.public.add_comment_as_human(id, "<p>first</p>").unwrap();
    let twin = wait_titled(&p.private, PRIVATE, title).await;
    wait_comments("the comment on premises", &p.private, twin, &["<p>first</p>"]).await;
    let (cloud_comment, _) = p.public.comments_with_ids(id)[0].clone();
    p.public
        .change_comment_as_human(id, cloud_comment, Some("<p>first, corrected</p>"))
        .unwrap();
    (id, twin, cloud_comment)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comment_edits_and_deletions_cross_both_ways_through_the_comments_api() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    // An edit in the cloud changes the copy on premises; nothing is added.
    let (id, twin, cloud_comment) = commented_then_edited(&p, "Discussed").await;
    wait_comments("the edit on premises", &p.private, twin, &["<p>first, corrected</p>"]).await;

    // And the other way.
    p.private.add_comment_as_human(twin, "<p>from premises</p>").unwrap();
    wait_comments(
        "the premises comment in the cloud",
        &p.public,
        id,
        &["<p>first, corrected</p>", "<p>from premises</p>"],
    )
    .await;
    let premises_comment = p
        .private
        .comments_with_ids(twin)
        .into_iter()
        .find(|(_, t)| t.contains("from premises"))
        .unwrap()
        .0;
    p.private
        .change_comment_as_human(twin, premises_comment, Some("<p>from premises, edited</p>"))
        .unwrap();
    wait_comments(
        "the premises edit in the cloud",
        &p.public,
        id,
        &["<p>first, corrected</p>", "<p>from premises, edited</p>"],
    )
    .await;

    // A deletion in the cloud deletes the copy; the premises comment stays on both sides.
    p.public.change_comment_as_human(id, cloud_comment, None).unwrap();
    wait_comments(
        "the deletion on premises",
        &p.private,
        twin,
        &["<p>from premises, edited</p>"],
    )
    .await;
    // Nothing echoed: the cloud holds the copy and nothing else, and each side added one.
    p.private
        .edit_as_human(twin, &[set("System.Title", "Discussed, settled")])
        .unwrap();
    wait_field(&p.public, id, "System.Title", "Discussed, settled").await;
    assert_eq!(comments(&p.public, id), ["<p>from premises, edited</p>"]);
    assert_eq!(comments(&p.private, twin), ["<p>from premises, edited</p>"]);
    assert_eq!(p.private.count("comments.add"), 1);
    assert_eq!(p.public.count("comments.add"), 1);
    assert_eq!(p.private.count("comments.update"), 1);
    assert_eq!(p.public.count("comments.update"), 1);
    assert_eq!(p.private.count("comments.delete"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_server_2019_an_edit_arrives_as_a_new_history_entry_naming_the_comment_it_replaces() {
    let p = Pair::start(Profile::Services, Profile::Server2019, &[]).await;
    let (id, twin, _) = commented_then_edited(&p, "Historic").await;
    converge("the edit as a new entry on premises", || {
        let got = comments(&p.private, twin);
        let ok = got.len() == 2
            && got[0] == "<p>first</p>"
            && got[1].contains("Edited on the other side: this replaces the comment of")
            && got[1].contains("Human Editor")
            && got[1].ends_with("<p>first, corrected</p>");
        ok.then_some(()).ok_or(format!("{got:?}"))
    })
    .await;
    // The entries made on premises are not sent back as comments of the cloud.
    p.private
        .edit_as_human(twin, &[set("System.Title", "Historic, settled")])
        .unwrap();
    wait_field(&p.public, id, "System.Title", "Historic, settled").await;
    assert_eq!(comments(&p.public, id), ["<p>first, corrected</p>"]);
    assert_eq!(comments(&p.private, twin).len(), 2);
}

/// The work item links of `id` as (type, other item), sorted.
fn links(sim: &SimHandle, id: u64) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = sim
        .relations(id)
        .into_iter()
        .filter(|(rel, _, _)| rel.starts_with("System.LinkTypes."))
        .filter_map(|(rel, url, _)| Some((rel, url.rsplit('/').next()?.parse().ok()?)))
        .collect();
    out.sort();
    out
}

fn link_op(sim: &SimHandle, rel: &str, target: u64) -> serde_json::Value {
    json!({"op": "add", "path": "/relations/-", "value": {
        "rel": rel, "url": format!("{}/_apis/wit/workItems/{target}", sim.url)}})
}

const PARENT: &str = "System.LinkTypes.Hierarchy-Reverse";
const CHILD: &str = "System.LinkTypes.Hierarchy-Forward";
const RELATED: &str = "System.LinkTypes.Related";

/// Waits until `child` on `sim` has `parent` as its parent and only link, and `parent` has
/// `child` as its child and only link.
async fn wait_pair_linked(what: &str, sim: &SimHandle, parent: u64, child: u64) {
    converge(what, || {
        let got = (links(sim, child), links(sim, parent));
        (got == (vec![(PARENT.into(), parent)], vec![(CHILD.into(), child)]))
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_child_and_related_links_become_the_same_links_between_the_twins_and_removals_cross() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    // A parent and its child made together: the parent may arrive first, its link to a child
    // not synced yet waits, and is made when the child arrives.
    let parent = p
        .public
        .create_item(PUBLIC, "Feature", &fields(&[("System.Title", "Parent")]))
        .unwrap();
    let mut ops = fields(&[("System.Title", "Child")]);
    ops.push(link_op(&p.public, PARENT, parent));
    let child = p.public.create_item(PUBLIC, "Task", &ops).unwrap();
    let parent_twin = wait_titled(&p.private, PRIVATE, "Parent").await;
    let child_twin = wait_titled(&p.private, PRIVATE, "Child").await;
    wait_pair_linked("the child's parent on premises", &p.private, parent_twin, child_twin).await;

    // A related link made on premises, to an item made there.
    let other_twin = p
        .private
        .create_item(PRIVATE, "Task", &fields(&[("System.Title", "Neighbour")]))
        .unwrap();
    let other = wait_titled(&p.public, PUBLIC, "Neighbour").await;
    p.private
        .edit_as_human(parent_twin, &[link_op(&p.private, RELATED, other_twin)])
        .unwrap();
    converge("the related link in the cloud", || {
        let got = links(&p.public, parent);
        (got == vec![(CHILD.into(), child), (RELATED.into(), other)])
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
    assert_eq!(links(&p.public, other), [(RELATED.to_string(), parent)]);

    // The parent link removed in the cloud is removed on premises, from both ends.
    let index = p
        .public
        .relations(child)
        .iter()
        .position(|(rel, _, _)| rel == PARENT)
        .unwrap();
    p.public
        .edit_as_human(child, &[json!({"op": "remove", "path": format!("/relations/{index}")})])
        .unwrap();
    converge("the parent link gone on premises", || {
        let got = (links(&p.private, child_twin), links(&p.private, parent_twin));
        (got == (vec![], vec![(RELATED.into(), other_twin)]))
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
    // Settled: one more change crosses, the links stay as they are, each once, no errors.
    p.private
        .edit_as_human(parent_twin, &[set("System.Title", "Parent, settled")])
        .unwrap();
    wait_field(&p.public, parent, "System.Title", "Parent, settled").await;
    assert_eq!(links(&p.public, parent), [(RELATED.to_string(), other)]);
    assert!(links(&p.public, child).is_empty());
    for node in [true, false] {
        let out = p.sync_cli(node, &["errors", pair::CONN, "--json"]).await;
        assert_eq!(out.trim(), "[]", "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_after_each_write_of_a_linked_pair_makes_each_item_and_its_link_once() {
    let mut p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let release = p.private.hold_answers("workitems.create");
    let parent = p
        .public
        .create_item(PUBLIC, "Feature", &fields(&[("System.Title", "Linked parent")]))
        .unwrap();
    let mut ops = fields(&[("System.Title", "Linked child")]);
    ops.push(link_op(&p.public, PARENT, parent));
    p.public.create_item(PUBLIC, "Task", &ops).unwrap();
    // The parent's create commits and its answer is held: kill. The agent comes back, finds
    // the parent by its marker, creates the child with its link: held again, kill again.
    for held in 1..=2 {
        let sim = &p.private;
        common::wait_for(&format!("create {held} committed and held"), || async move {
            (sim.count("workitems.create.held") >= held).then_some(())
        })
        .await;
        p.restart_agent().await;
    }
    drop(release);
    p.private.stop_holding("workitems.create");
    let parent_twin = wait_titled(&p.private, PRIVATE, "Linked parent").await;
    let child_twin = wait_titled(&p.private, PRIVATE, "Linked child").await;
    wait_pair_linked("the pair linked once on premises", &p.private, parent_twin, child_twin).await;
    assert_eq!(p.private.item_ids(Some(PRIVATE)).len(), 2, "an item made twice");
    let out = p.sync_cli(false, &["errors", pair::CONN, "--json"]).await;
    assert_eq!(out.trim(), "[]", "{out}");
}
