//! Sync correctness under the cases hand-picked scenarios missed: a person undoing the other
//! side's change, answers lost after the tracker committed, an apply landing while an export
//! of the same item is under way. Two simulated trackers, a node and an agent as real
//! processes, the default rules on both sides.

mod common;
#[path = "sync/pair.rs"]
mod pair;

use ado_sim::Profile;
use serde_json::json;

use common::wait_for;
use pair::{attachments, comments, converge, field, fields, tags, titled, wait_titled, Pair, PRIVATE, PUBLIC};

/// Tracker requests give up after this long (answers held longer are lost to relay).
const SHORT_TIMEOUT: (&str, &str) = ("RELAY_TRACKER__REQUEST_TIMEOUT", "2s");

fn set(field: &str, value: &str) -> serde_json::Value {
    json!({"op": "add", "path": format!("/fields/{field}"), "value": value})
}

/// Waits until the agent's log says one more time that it could not apply and will retry.
async fn agent_retries(p: &Pair, seen: usize) {
    let agent = &p.agent;
    wait_for("the agent to give up on the held answer", || async move {
        (agent.log().matches("cannot apply now").count() > seen).then_some(())
    })
    .await;
}

/// How often the agent's log says it could not apply.
fn agent_retried(p: &Pair) -> usize {
    p.agent.log().matches("cannot apply now").count()
}

/// Waits until an item created on the private side now reaches the public side: everything
/// the agent queued before it has been applied there.
async fn private_side_drained(p: &Pair, title: &str) {
    p.private
        .create_item(PRIVATE, "Task", &fields(&[("System.Title", title)]))
        .unwrap();
    wait_titled(&p.public, PUBLIC, title).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_undoing_the_other_sides_change_is_synced_back() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let (id, twin) = p
        .create_synced("Task", &[("System.Title", "Original title"), ("System.Tags", "web")])
        .await;

    // The private side changes the title and adds a label; both arrive.
    p.private
        .edit_as_human(
            twin,
            &[
                set("System.Title", "Changed on premises"),
                set("System.Tags", "web; onprem"),
            ],
        )
        .unwrap();
    converge("the private change on the public side", || {
        let (t, l) = (field(&p.public, id, "System.Title"), tags(&p.public, id));
        (t == "Changed on premises" && l == ["onprem", "web"])
            .then_some(())
            .ok_or(format!("{t:?} {l:?}"))
    })
    .await;

    // A person on the public side undoes both: the private side follows.
    p.public
        .edit_as_human(id, &[set("System.Title", "Original title"), set("System.Tags", "web")])
        .unwrap();
    converge("the undo on the private side", || {
        let (t, l) = (field(&p.private, twin, "System.Title"), tags(&p.private, twin));
        (t == "Original title" && l == ["web"])
            .then_some(())
            .ok_or(format!("{t:?} {l:?}"))
    })
    .await;

    // And the other way round: the public side changes, the private side undoes.
    p.public
        .edit_as_human(id, &[set("System.Title", "Changed in the cloud")])
        .unwrap();
    converge("the public change", || {
        (field(&p.private, twin, "System.Title") == "Changed in the cloud")
            .then_some(())
            .ok_or_else(|| field(&p.private, twin, "System.Title"))
    })
    .await;
    p.private
        .edit_as_human(twin, &[set("System.Title", "Original title")])
        .unwrap();
    converge("the private undo", || {
        (field(&p.public, id, "System.Title") == "Original title")
            .then_some(())
            .ok_or_else(|| field(&p.public, id, "System.Title"))
    })
    .await;
    private_side_drained(&p, "after the undo").await;
    assert_eq!(field(&p.public, id, "System.Title"), "Original title");
    assert_eq!(field(&p.private, twin, "System.Title"), "Original title");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_is_lost_is_neither_sent_back_nor_made_twice() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[SHORT_TIMEOUT]).await;
    // The private tracker makes the item at once and answers only after relay gave up.
    let retried = agent_retried(&p);
    // The private poller has read the new item and waits for the apply; once the create times
    // out it looks at the item before the apply tries again.
    let release = p.create_answered_late("Answer lost").await;
    agent_retries(&p, retried).await;
    drop(release);
    p.private.stop_holding("workitems.create");
    let twin = wait_titled(&p.private, PRIVATE, "Answer lost").await;
    private_side_drained(&p, "made after the lost answer").await;
    assert_eq!(
        titled(&p.public, PUBLIC, "Answer lost").len(),
        1,
        "sent back as a new item"
    );
    assert_eq!(titled(&p.private, PRIVATE, "Answer lost"), [twin], "created twice");
    assert_eq!(p.private.count("workitems.create"), 1, "one create per item");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_whose_answer_is_lost_exists_once_on_each_side() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[SHORT_TIMEOUT]).await;
    let (id, twin) = p.create_synced("Task", &[("System.Title", "Commented")]).await;
    let retried = agent_retried(&p);
    let release = p.private.hold_answers("comments.add");
    p.public.add_comment_as_human(id, "Seen twice?").unwrap();
    let sim = &p.private;
    wait_for("the comment add to be held", || async move {
        (sim.count("comments.add.held") >= 1).then_some(())
    })
    .await;
    agent_retries(&p, retried).await;
    p.private.stop_holding("comments.add");
    drop(release);
    converge("the comment on the private side", || {
        let c = comments(&p.private, twin);
        c.iter()
            .any(|c| c.contains("Seen twice?"))
            .then_some(())
            .ok_or(format!("{c:?}"))
    })
    .await;
    private_side_drained(&p, "after the comment").await;
    // And the public side has had every change of the private side since.
    p.private
        .edit_as_human(twin, &[set("System.Title", "Commented, then edited")])
        .unwrap();
    converge("the later edit", || {
        (field(&p.public, id, "System.Title") == "Commented, then edited")
            .then_some(())
            .ok_or_else(|| field(&p.public, id, "System.Title"))
    })
    .await;
    let once = |c: Vec<String>| c.iter().filter(|c| c.contains("Seen twice?")).count();
    assert_eq!(once(comments(&p.private, twin)), 1, "added twice on the private side");
    assert_eq!(once(comments(&p.public, id)), 1, "sent back to the public side");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_while_an_export_downloads_loses_none_of_its_links() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let (id, twin) = p.create_synced("Task", &[("System.Title", "Busy item")]).await;
    // The private side's export of a new attachment stalls in its download...
    let release = p.private.hold_answers("attachments.get");
    let bytes: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    p.private.attach_as_human(twin, "trace.bin", &bytes).unwrap();
    let sim = &p.private;
    wait_for("the download to be held", || async move {
        (sim.count("attachments.get.held") >= 1).then_some(())
    })
    .await;
    // ...while a comment from the public side is applied to the same item.
    p.public.add_comment_as_human(id, "Applied meanwhile").unwrap();
    converge("the comment on the private side", || {
        let c = comments(&p.private, twin);
        c.iter()
            .any(|c| c.contains("Applied meanwhile"))
            .then_some(())
            .ok_or(format!("{c:?}"))
    })
    .await;
    p.private.stop_holding("attachments.get");
    drop(release);
    converge("the attachment on the public side", || {
        let a = attachments(&p.public, id);
        (a.len() == 1).then_some(()).ok_or(format!("{a:?}"))
    })
    .await;
    private_side_drained(&p, "after the download").await;
    let once = |c: Vec<String>| c.iter().filter(|c| c.contains("Applied meanwhile")).count();
    assert_eq!(once(comments(&p.public, id)), 1, "the copied comment came back as new");
    assert_eq!(once(comments(&p.private, twin)), 1);
}

/// The default rules of a side with `Custom.Team` sent and applied as well.
fn rules_with_team(project: &str) -> String {
    relay::sync::default_rules(project)
        .replace(
            "// replica.customFields[\"Custom.Team\"] = workItem.customFields[\"Custom.Team\"];",
            "replica.customFields[\"Custom.Team\"] = workItem.customFields[\"Custom.Team\"];",
        )
        .replace(
            "// workItem.customFields[\"Custom.Team\"] = replica.customFields[\"Custom.Team\"] ?? \"Blue\";",
            "workItem.customFields[\"Custom.Team\"] = replica.customFields[\"Custom.Team\"] ?? \"Blue\";",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_that_cross_keep_every_field_and_the_public_value_of_a_field_changed_on_both_sides() {
    let mut p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    for (sim, node, project) in [(&p.public, true, PUBLIC), (&p.private, false, PRIVATE)] {
        sim.add_field("Custom.Team", ado_sim::Kind::String);
        let dir = if node { &p.node_dir } else { &p.agent_dir };
        let rules = dir.with_extension("rules");
        std::fs::write(&rules, rules_with_team(project)).unwrap();
        p.sync_cli(node, &["rules", "set", pair::CONN, rules.to_str().unwrap()])
            .await;
    }
    let (id, twin) = p
        .create_synced("Task", &[("System.Title", "Crossed"), ("Custom.Team", "Blue")])
        .await;
    converge("the team on the private side", || {
        (field(&p.private, twin, "Custom.Team") == "Blue")
            .then_some(())
            .ok_or_else(|| field(&p.private, twin, "Custom.Team"))
    })
    .await;

    // With the node down, both sides change the item before either sees the other's change:
    // the title on both, the team on the public side, the description on the private one.
    p.kill_node();
    let queued = common::statuses(&p.agent_dir, false).await[0].outbound.last_seq;
    p.public
        .edit_as_human(
            id,
            &[set("System.Title", "Title from the cloud"), set("Custom.Team", "Red")],
        )
        .unwrap();
    p.private
        .edit_as_human(
            twin,
            &[
                set("System.Title", "Title from premises"),
                set("System.Description", "<p>Described on premises</p>"),
            ],
        )
        .unwrap();
    let dir = p.agent_dir.clone();
    wait_for("the private change queued by the agent", || {
        let dir = dir.clone();
        async move { (common::statuses(&dir, false).await[0].outbound.last_seq > queued).then_some(()) }
    })
    .await;
    p.start_node().await;

    let state = |sim: &ado_sim::SimHandle, id: u64| {
        ["System.Title", "System.Description", "Custom.Team"].map(|f| field(sim, id, f))
    };
    let want = ["Title from the cloud", "<p>Described on premises</p>", "Red"].map(str::to_owned);
    converge("both sides", || {
        let (a, b) = (state(&p.public, id), state(&p.private, twin));
        (a == want && b == want)
            .then_some(())
            .ok_or(format!("public {a:?}, private {b:?}"))
    })
    .await;
    private_side_drained(&p, "after the crossing").await;
    assert_eq!(state(&p.public, id), want);
    assert_eq!(state(&p.private, twin), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_tracker_refuses_parks_its_item_while_others_flow_and_a_retry_brings_it() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    // Over Azure DevOps Server's default attachment limit (4 MB for the whole file).
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 241) as u8).collect();
    let id = p
        .public
        .create_item(PUBLIC, "Bug", &fields(&[("System.Title", "Heavy dump")]))
        .unwrap();
    p.public.attach_as_human(id, "core.dump", &big).unwrap();
    let errors = wait_for("the item's sync error", || async {
        let out = p.sync_cli(false, &["errors", pair::CONN, "--json"]).await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        (!list.is_empty()).then_some(list)
    })
    .await;
    let message = errors[0]["message"].as_str().unwrap().to_owned();
    assert_eq!(errors[0]["side"], "incoming");
    assert!(
        message.contains("core.dump") && message.contains("refused") && message.contains("4.000 MB"),
        "{message}"
    );

    // Other items flow on meanwhile.
    p.public
        .create_item(PUBLIC, "Task", &fields(&[("System.Title", "Light item")]))
        .unwrap();
    wait_titled(&p.private, PRIVATE, "Light item").await;
    private_side_drained(&p, "after the refusal").await;

    // The operator raises the limit and retries: the file and its item arrive once.
    p.private.set_attachment_limit(16 * 1024 * 1024);
    let remote = errors[0]["item"].as_str().unwrap().to_owned();
    p.sync_cli(false, &["retry", pair::CONN, &remote]).await;
    let twin = wait_titled(&p.private, PRIVATE, "Heavy dump").await;
    converge("the attachment", || {
        let a = attachments(&p.private, twin);
        (a.len() == 1).then_some(()).ok_or(format!("{a:?}"))
    })
    .await;
    assert_eq!(
        attachments(&p.private, twin)[0].1,
        relay::crypto::hex(&relay::crypto::sha256(&big))
    );
    wait_for("the error cleared", || async {
        let out = p.sync_cli(false, &["errors", pair::CONN, "--json"]).await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        list.is_empty().then_some(())
    })
    .await;
}
