//! Script mode end to end: two simulated Azure DevOps instances, a node and an agent as real
//! processes over real TLS and real sled, the default rules on both sides.

mod common;
#[path = "sync/pair.rs"]
mod pair;

use ado_sim::Profile;
use serde_json::json;

use common::wait_for;
use pair::{attachments, comments, converge, field, fields, tags, titled, wait_titled, Pair, CONN, PRIVATE, PUBLIC};

/// Writes through the tracker API, which a quiet connection must not cause.
fn writes(sim: &ado_sim::SimHandle) -> u64 {
    [
        "workitems.create",
        "workitems.update",
        "comments.add",
        "attachments.create",
        "attachments.chunk",
    ]
    .iter()
    .map(|e| sim.count(e))
    .sum()
}

/// Checks the five seed fields of twin items agree.
fn same_five(p: &Pair, public: u64, private: u64) -> Result<(), String> {
    let differ = |what: &str, a: String, b: String| {
        if a == b {
            Ok(())
        } else {
            Err(format!("{what}: public {a:?}, private {b:?}"))
        }
    };
    for f in ["System.Title", "System.Description"] {
        differ(f, field(&p.public, public, f), field(&p.private, private, f))?;
    }
    differ(
        "tags",
        tags(&p.public, public).join(";"),
        tags(&p.private, private).join(";"),
    )?;
    let (mut a, mut b) = (comments(&p.public, public), comments(&p.private, private));
    a.sort();
    b.sort();
    differ("comments", a.join(" | "), b.join(" | "))?;
    differ(
        "attachments",
        format!("{:?}", attachments(&p.public, public)),
        format!("{:?}", attachments(&p.private, private)),
    )
}

async fn five_fields_both_ways(private_profile: Profile) {
    let p = Pair::start(Profile::Services, private_profile, &[]).await;
    let id = p
        .public
        .create_item(
            PUBLIC,
            "Bug",
            &fields(&[
                ("System.Title", "Login fails after upgrade"),
                ("System.Description", "<p>Steps: open the <b>login</b> page</p>"),
                ("System.Tags", "auth; regression; p1"),
            ]),
        )
        .unwrap();
    p.public.add_comment_as_human(id, "First seen on Monday").unwrap();
    p.public.add_comment_as_human(id, "Also on staging").unwrap();
    let report: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    p.public.attach_as_human(id, "report.bin", &report).unwrap();
    let twin = wait_titled(&p.private, PRIVATE, "Login fails after upgrade").await;
    converge("public → private", || same_five(&p, id, twin)).await;
    assert_eq!(field(&p.private, twin, "System.WorkItemType"), "Bug");
    assert_eq!(tags(&p.private, twin), ["auth", "p1", "regression"]);
    assert_eq!(attachments(&p.private, twin).len(), 1);
    assert_eq!(
        attachments(&p.private, twin)[0].1,
        relay::crypto::hex(&relay::crypto::sha256(&report))
    );

    // Edited and commented on the private side: it comes back.
    p.private
        .edit_as_human(
            twin,
            &[
                json!({"op": "replace", "path": "/fields/System.Title", "value": "Login fails after upgrade to 2.4"}),
                json!({"op": "replace", "path": "/fields/System.Tags", "value": "auth; p1; fixed-onprem"}),
            ],
        )
        .unwrap();
    p.private.add_comment_as_human(twin, "Fixed on premises").unwrap();
    converge("private → public", || {
        same_five(&p, id, twin)?;
        if field(&p.public, id, "System.Title") != "Login fails after upgrade to 2.4" {
            return Err("title not back".into());
        }
        Ok(())
    })
    .await;
    assert!(comments(&p.public, id).iter().any(|c| c.contains("Fixed on premises")));
    assert_eq!(
        titled(&p.public, PUBLIC, "Login fails after upgrade to 2.4"),
        [id],
        "no second item"
    );
    assert_eq!(
        p.private.item_ids(Some(PRIVATE)).len(),
        1,
        "no second item on the private side"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_five_fields_converge_both_ways_with_server_2019() {
    five_fields_both_ways(Profile::Server2019).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_five_fields_converge_both_ways_with_server_2022() {
    five_fields_both_ways(Profile::Server2022).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_edits_on_each_side_then_silence_and_no_item_twice() {
    let p = Pair::start(Profile::Services, Profile::Server2020, &[]).await;
    let id = p
        .public
        .create_item(PUBLIC, "Task", &fields(&[("System.Title", "edit 0")]))
        .unwrap();
    let twin = wait_titled(&p.private, PRIVATE, "edit 0").await;
    for i in 1..=20 {
        let title = format!("public edit {i}");
        p.public
            .edit_as_human(
                id,
                &[json!({"op": "replace", "path": "/fields/System.Title", "value": title})],
            )
            .unwrap();
    }
    converge("public edits", || {
        (field(&p.private, twin, "System.Title") == "public edit 20")
            .then_some(())
            .ok_or_else(|| field(&p.private, twin, "System.Title"))
    })
    .await;
    for i in 1..=20 {
        let text = format!("<p>private edit {i}</p>");
        p.private
            .edit_as_human(
                twin,
                &[json!({"op": "add", "path": "/fields/System.Description", "value": text})],
            )
            .unwrap();
    }
    converge("private edits", || same_five(&p, id, twin)).await;
    assert_eq!(field(&p.public, id, "System.Description"), "<p>private edit 20</p>");

    // Quiet now: while each side reads its feed three more times, nothing is written or sent.
    let before = (writes(&p.public), writes(&p.private));
    let queued = |node: bool| {
        let dir = if node { p.node_dir.clone() } else { p.agent_dir.clone() };
        async move {
            let s = common::statuses(&dir, node).await;
            let c = s.into_iter().find(|c| c.name == CONN).unwrap();
            (c.outbound.last_seq, c.inbound.last_seq)
        }
    };
    let (node_q, agent_q) = (queued(true).await, queued(false).await);
    let reads = (
        p.public.count("reporting.revisions"),
        p.private.count("reporting.revisions"),
    );
    wait_for("three more feed reads on each side", || async {
        let now = (
            p.public.count("reporting.revisions"),
            p.private.count("reporting.revisions"),
        );
        (now.0 >= reads.0 + 3 && now.1 >= reads.1 + 3).then_some(())
    })
    .await;
    assert_eq!(
        (writes(&p.public), writes(&p.private)),
        before,
        "a quiet connection wrote to a tracker"
    );
    assert_eq!(queued(true).await, node_q, "the node queued or received more");
    assert_eq!(queued(false).await, agent_q, "the agent queued or received more");
    assert_eq!(p.public.item_ids(Some(PUBLIC)), [id]);
    assert_eq!(p.private.item_ids(Some(PRIVATE)), [twin]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_edit_between_read_and_write_is_read_again_and_merged() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let id = p
        .public
        .create_item(PUBLIC, "Bug", &fields(&[("System.Title", "racy")]))
        .unwrap();
    let twin = wait_titled(&p.private, PRIVATE, "racy").await;
    // Right after relay reads the private item, someone changes its priority: relay's write
    // carries a stale rev, is refused with 412, and must read again and write.
    p.private.edit_after_next_read(
        twin,
        vec![json!({"op": "add", "path": "/fields/Microsoft.VSTS.Common.Priority", "value": 1})],
    );
    p.public
        .edit_as_human(
            id,
            &[json!({"op": "replace", "path": "/fields/System.Title", "value": "racy, renamed"})],
        )
        .unwrap();
    converge("the rename despite the race", || {
        (field(&p.private, twin, "System.Title") == "racy, renamed")
            .then_some(())
            .ok_or_else(|| field(&p.private, twin, "System.Title"))
    })
    .await;
    assert_eq!(
        field(&p.private, twin, "Microsoft.VSTS.Common.Priority"),
        "1",
        "the human's edit is kept"
    );
    assert!(p.private.count("fault.412") + p.private.count("workitems.update") >= 2);
}

/// Rules for the agent whose incoming script fails on items titled "poison".
fn poisoned_rules(fixed: bool) -> String {
    let rules = relay::sync::default_rules(PRIVATE);
    let check = if fixed {
        ""
    } else {
        "if replica.summary.contains(\"poison\") { throw \"cannot map poison\"; }\n"
    };
    rules.replacen("if firstSync {", &format!("{check}if firstSync {{"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_holds_one_item_while_others_flow_and_retry_applies_it() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let rules = p.agent_dir.with_extension("rules");
    std::fs::write(&rules, poisoned_rules(false)).unwrap();
    p.sync_cli(false, &["rules", "set", CONN, rules.to_str().unwrap()])
        .await;
    let bad = p
        .public
        .create_item(PUBLIC, "Task", &fields(&[("System.Title", "poison pill")]))
        .unwrap();
    let errors = wait_for("the sync error", || async {
        let out = p.sync_cli(false, &["errors", CONN, "--json"]).await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(errors[0]["item"], bad.to_string());
    assert_eq!(errors[0]["side"], "incoming");
    assert!(
        errors[0]["message"].as_str().unwrap().contains("cannot map poison"),
        "{errors:?}"
    );
    // Later replicas of the broken item wait behind its error; other items flow.
    p.public
        .edit_as_human(
            bad,
            &[json!({"op": "replace", "path": "/fields/System.Title", "value": "poison pill 2"})],
        )
        .unwrap();
    p.public
        .create_item(PUBLIC, "Task", &fields(&[("System.Title", "healthy")]))
        .unwrap();
    wait_titled(&p.private, PRIVATE, "healthy").await;
    assert!(titled(&p.private, PRIVATE, "poison pill 2").is_empty());
    let status = common::statuses(&p.agent_dir, false).await;
    assert_eq!(status[0].sync.as_ref().unwrap().errors, 1);
    // Fixed rules, then a retry: the newest replica is applied.
    std::fs::write(&rules, poisoned_rules(true)).unwrap();
    p.sync_cli(false, &["rules", "set", CONN, rules.to_str().unwrap()])
        .await;
    p.sync_cli(false, &["retry", CONN, &bad.to_string()]).await;
    wait_titled(&p.private, PRIVATE, "poison pill 2").await;
    wait_for("the error cleared", || async {
        let out = p.sync_cli(false, &["errors", CONN, "--json"]).await;
        (out.trim() == "[]").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_scripts_are_stopped_with_a_clear_error_and_the_daemon_keeps_serving() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let rules_file = p.agent_dir.with_extension("rules");
    let cases = [
        ("loop", "loop { }", "stopped"),
        ("alloc", "let s = \"x\"; loop { s += s; }", "stopped"),
        ("file", "let f = open_file(\"/etc/passwd\");", "open_file"),
    ];
    for (name, body, said) in cases {
        let rules = relay::sync::default_rules(PRIVATE).replacen(
            "if firstSync {",
            &format!("if replica.summary == \"{name}\" {{ {body} }}\nif firstSync {{"),
            1,
        );
        std::fs::write(&rules_file, rules).unwrap();
        p.sync_cli(false, &["rules", "set", CONN, rules_file.to_str().unwrap()])
            .await;
        let id = p
            .public
            .create_item(PUBLIC, "Task", &fields(&[("System.Title", name)]))
            .unwrap();
        let message = wait_for("the sync error", || async {
            let out = p.sync_cli(false, &["errors", CONN, "--json"]).await;
            let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
            list.into_iter()
                .find(|e| e["item"].as_str() == Some(id.to_string().as_str()))
                .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        })
        .await;
        assert!(message.contains(said), "{name}: {message}");
    }
    // Still serving: a healthy item syncs and the intake answers.
    p.public
        .create_item(PUBLIC, "Task", &fields(&[("System.Title", "after the runaways")]))
        .unwrap();
    wait_titled(&p.private, PRIVATE, "after the runaways").await;
    let health = common::cli(&p.agent_dir, &["health"], &[], None).await;
    assert!(health.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syntax_error_in_rules_is_refused_with_line_and_column_and_nothing_is_stored() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    let shown = p.sync_cli(true, &["rules", "show", CONN]).await;
    assert!(
        shown.contains(&format!("workItem.projectKey = \"{PUBLIC}\"")),
        "{shown}"
    );
    let file = p.node_dir.with_extension("rules");
    std::fs::write(
        &file,
        shown.replace("replica.summary = workItem.summary;", "replica.summary = ;"),
    )
    .unwrap();
    let o = common::cli(
        &p.node_dir,
        &["sync", "rules", "set", CONN, file.to_str().unwrap()],
        &[],
        None,
    )
    .await;
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(
        err.contains("rules not stored") && err.contains("line") && err.contains("column"),
        "{err}"
    );
    assert_eq!(p.sync_cli(true, &["rules", "show", CONN]).await, shown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_creates_exactly_one_item_with_its_attachment_intact() {
    // Small payloads: the attachment travels as many chunks.
    let mut p = Pair::start(
        Profile::Services,
        Profile::Server2022,
        &[("RELAY_QUEUE__MAX_PAYLOAD_BYTES", "16384")],
    )
    .await;
    let bytes: Vec<u8> = (0..120_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let id = p
        .public
        .create_item(PUBLIC, "Bug", &fields(&[("System.Title", "crash twice")]))
        .unwrap();
    // Killed while the upload's answer is held, and again while the create's is.
    p.kill_agent_during_upload_and_create(|p| {
        p.public.attach_as_human(id, "dump.bin", &bytes).unwrap();
    })
    .await;
    let twin = wait_titled(&p.private, PRIVATE, "crash twice").await;
    converge("the attachment", || {
        let a = attachments(&p.private, twin);
        (a.len() == 1).then_some(()).ok_or_else(|| format!("{a:?}"))
    })
    .await;
    assert_eq!(
        attachments(&p.private, twin)[0].1,
        relay::crypto::hex(&relay::crypto::sha256(&bytes))
    );
    assert_eq!(p.private.item_ids(Some(PRIVATE)), [twin], "exactly one work item");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_sync_of_two_thousand_items_converges() {
    // Items that exist before the connection are not changes: only the bulk sync sends them.
    let p = Pair::start_seeded(Profile::Services, Profile::Server2022, &[], |sim| {
        for i in 0..2000 {
            sim.create_item(
                PUBLIC,
                "Task",
                &fields(&[("System.Title", &format!("bulk {i}")), ("System.Tags", "bulk")]),
            )
            .unwrap();
        }
    })
    .await;
    assert!(p.private.item_ids(Some(PRIVATE)).is_empty());
    let dry = p.sync_cli(true, &["bulk", CONN, "--dry-run"]).await;
    assert!(
        dry.contains("2000 items match") && dry.contains("would send 2000"),
        "{dry}"
    );
    let out = p.sync_cli(true, &["bulk", CONN]).await;
    assert!(out.contains("sent 2000"), "{out}");
    wait_for("2000 items on the private side", || async {
        (p.private.item_ids(Some(PRIVATE)).len() >= 2000).then_some(())
    })
    .await;
    let again = p.sync_cli(true, &["bulk", CONN]).await;
    assert!(
        again.contains("2000 already synced") && again.contains("sent 0"),
        "{again}"
    );
    assert_eq!(p.private.item_ids(Some(PRIVATE)).len(), 2000);
    assert_eq!(tags(&p.private, p.private.item_ids(Some(PRIVATE))[1999]), ["bulk"]);
}

/// POSTs a hook body to `url` with `secret`; answers the status.
async fn hook(url: &str, secret: Option<&str>, body: &str) -> u16 {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(secret.map(|s| ("Relay-Hook-Secret", s)));
    let req = relay::http::request(relay::http::Method::POST, url, &headers, body.to_owned()).unwrap();
    common::client()
        .send(req, common::DEADLINE, 1 << 16)
        .await
        .unwrap()
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_hook_wakes_the_poller_early_and_a_wrong_secret_is_refused() {
    let secret = "hook-secret-for-tests";
    // The feed is read at start and then only hourly: an item that arrives within the test
    // arrives because the hook woke the poller.
    let p = Pair::start(
        Profile::Services,
        Profile::Server2022,
        &[
            ("RELAY_TRACKER__POLL_INTERVAL", "1h"),
            ("RELAY_TRACKER__HOOK_SECRET", secret),
        ],
    )
    .await;
    let url = format!("{}/v1/hooks/azure-devops", p.node.api());
    let event = r#"{"eventType":"workitem.updated","resource":{}}"#;
    assert_eq!(hook(&url, None, event).await, 401, "no secret");
    assert_eq!(hook(&url, Some("guess"), event).await, 401, "a wrong secret");
    assert_eq!(
        hook(&url, Some(secret), "not json").await,
        400,
        "a body that is not JSON"
    );
    assert_eq!(hook(&url, Some(secret), r#"{"eventType":"git.push"}"#).await, 202);

    p.public
        .subscribe(&url, Some(("Relay-Hook-Secret", secret)), &["workitem.created"]);
    let id = p
        .public
        .create_item(PUBLIC, "Task", &fields(&[("System.Title", "Woken by a hook")]))
        .unwrap();
    wait_titled(&p.private, PRIVATE, "Woken by a hook").await;
    let sim = &p.public;
    wait_for("the hook's answer", || async move {
        (sim.hook_deliveries().0 >= 1).then_some(())
    })
    .await;
    assert_eq!(sim.hook_deliveries().1, 0, "a hook for item {id} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_syncs_a_work_item_both_ways_and_exits_zero() {
    let relay = std::path::Path::new(common::bin());
    let sim = relay.with_file_name("ado-sim");
    assert!(
        sim.is_file(),
        "{} is missing: the demo needs the simulator built beside relay (cargo test --workspace)",
        sim.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = common::command(dir.path(), &["demo"], &[]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for said in [
        "the same on both trackers: title, description, tags, comments, attachment bytes",
        "comment:     \"Fixed on premises by raising the proxy timeout\"",
        "inline image on this tracker: sha256",
        "assigned to: human.editor@example.com",
        "parent:      \"Login page times out after upgrade\"",
        "exactly one work item on each side",
        "demo finished",
    ] {
        assert!(text.contains(said), "the demo did not say {said:?}:\n{text}");
    }

    // Without the simulator it says what to build.
    let out = common::command(dir.path(), &["demo", "--ado-sim", "/nonexistent/ado-sim"], &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cargo build --release --workspace"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_test_shows_the_replica_and_the_patch_and_writes_nothing() {
    // Hourly polls: the item below is never sent by itself, only tried.
    let p = Pair::start(
        Profile::Services,
        Profile::Server2022,
        &[("RELAY_TRACKER__POLL_INTERVAL", "1h")],
    )
    .await;
    let id = p
        .public
        .create_item(
            PUBLIC,
            "Bug",
            &fields(&[("System.Title", "Tried, not sent"), ("System.Tags", "one; two")]),
        )
        .unwrap();
    p.public.add_comment_as_human(id, "a comment to copy").unwrap();
    let (public_writes, private_writes) = (writes(&p.public), writes(&p.private));

    let out = p
        .sync_cli(true, &["rules", "test", CONN, "--item", &id.to_string()])
        .await;
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let replica = &shown["replica"];
    assert_eq!(replica["entity"]["summary"], "Tried, not sent", "{out}");
    assert_eq!(replica["entity"]["labels"], json!(["one", "two"]), "{out}");
    assert_eq!(shown["unchanged_since_last_sent"], false);

    // The private side's incoming script on that replica, with rules tried from a file.
    let dir = tempfile::tempdir().unwrap();
    let replica_file = dir.path().join("replica.json");
    std::fs::write(&replica_file, replica.to_string()).unwrap();
    let stored = p.sync_cli(false, &["rules", "show", CONN]).await;
    let tried = stored.replace(
        "workItem.summary = replica.summary;",
        "workItem.summary = \"[Contoso] \" + replica.summary;",
    );
    assert_ne!(tried, stored, "the default rules set the summary");
    let rules_file = dir.path().join("rules.rhai");
    std::fs::write(&rules_file, &tried).unwrap();
    let out = p
        .sync_cli(
            false,
            &[
                "rules",
                "test",
                CONN,
                "--replica",
                replica_file.to_str().unwrap(),
                "--rules",
                rules_file.to_str().unwrap(),
            ],
        )
        .await;
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["create"]["project"], PRIVATE, "{out}");
    assert_eq!(plan["create"]["type"], "Bug", "{out}");
    assert!(
        plan["patch"]
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["path"] == "/fields/System.Title" && op["value"] == "[Contoso] Tried, not sent"),
        "{out}"
    );
    assert_eq!(plan["comments_to_add"].as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(plan["nothing_to_write"], false);

    // Nothing was written, sent or stored.
    assert_eq!(writes(&p.public), public_writes);
    assert_eq!(writes(&p.private), private_writes);
    assert!(p.private.item_ids(Some(PRIVATE)).is_empty());
    assert_eq!(p.sync_cli(false, &["rules", "show", CONN]).await, stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_is_slow_is_not_sent_back_as_a_new_item() {
    let p = Pair::start(Profile::Services, Profile::Server2022, &[]).await;
    // The private tracker makes the item at once but answers relay late: meanwhile the item
    // is in its change feed, and that side's poller must not take it for a person's.
    let release = p.create_answered_late("Answered late").await;
    drop(release);
    p.private.stop_holding("workitems.create");
    let twin = wait_titled(&p.private, PRIVATE, "Answered late").await;

    // A later item from the private side comes through the same queue after any echo.
    p.private
        .create_item(PRIVATE, "Task", &fields(&[("System.Title", "Made on premises")]))
        .unwrap();
    wait_titled(&p.public, PUBLIC, "Made on premises").await;
    assert_eq!(
        titled(&p.public, PUBLIC, "Answered late").len(),
        1,
        "sent back as a new item"
    );
    assert_eq!(titled(&p.private, PRIVATE, "Answered late"), [twin]);
}
