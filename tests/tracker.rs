//! The Azure DevOps client against the simulator over real TLS: version probing per profile,
//! authentication, work items with `test /rev`, comments per server version, tags,
//! attachments, the revisions feed, WIQL, crash reconciliation by hyperlink, and 429 waits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ado_sim::{Profile, Sim, SimHandle, SimOptions};
use relay::config::{Secret, TrackerKind, TrackerSettings, WebhookTrust};
use relay::tracker::{Tracker, TrackerError, MAX_RETRIES};
use serde_json::{json, Value};

const PROJECT: &str = "Fabrikam";

/// A simulator over TLS with one project, its CA in a file of `dir`.
struct Env {
    sim: SimHandle,
    settings: TrackerSettings,
    _dir: tempfile::TempDir,
}

async fn env(profile: Profile) -> Env {
    let sim = Sim::start(SimOptions {
        profile,
        tls: true,
        projects: vec![PROJECT.to_owned()],
        ..SimOptions::default()
    })
    .await
    .expect("simulator starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, sim.ca_pem.as_deref().expect("a TLS simulator has a CA")).expect("write CA");
    let token = dir.path().join("pat");
    std::fs::write(&token, format!("{}\n", sim.pat)).expect("write PAT");
    let settings = settings(&sim.url, Some(token), Some(ca));
    Env {
        sim,
        settings,
        _dir: dir,
    }
}

fn settings(url: &str, token_file: Option<PathBuf>, ca_file: Option<PathBuf>) -> TrackerSettings {
    TrackerSettings {
        kind: TrackerKind::AzureDevOps,
        url: url.to_owned(),
        token_file,
        token: None,
        trust: WebhookTrust::Ca,
        ca_file,
        api_version: None,
        poll_interval: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        hook_secret: None,
    }
}

/// At the end of a test that did not fail otherwise: the simulator saw only requests and
/// gave only answers the specification's description allows.
impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.sim.assert_conformant();
        }
    }
}

impl Env {
    async fn tracker(&self) -> Tracker {
        Tracker::connect(&self.settings).await.expect("connects")
    }
}

fn add(path: &str, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

fn now_ms() -> u64 {
    relay::status::now_ms()
}

fn sha256(bytes: &[u8]) -> String {
    relay::crypto::hex(&relay::crypto::sha256(bytes))
}

#[tokio::test]
async fn the_version_is_probed_on_every_profile_and_a_too_high_setting_is_refused_clearly() {
    for (profile, expected) in [
        (Profile::Services, "7.1"),
        (Profile::Server2022, "7.0"),
        // Server 2020 names 6.1, a preview-only version: the released 6.0 below it.
        (Profile::Server2020, "6.0"),
        (Profile::Server2019, "5.0"),
    ] {
        let e = env(profile).await;
        let t = e.tracker().await;
        assert_eq!(t.version().to_string(), expected, "{profile}");
        assert_eq!(t.version().writes_comments(), profile != Profile::Server2019);
        assert_eq!(t.url(), e.sim.url);
        assert_eq!(t.user().await.expect("user"), "Sim User <sim.user@example.com>");
        // The PAT never shows in the handle's debug form.
        assert!(!format!("{t:?}").contains(&e.sim.pat), "{t:?}");
        e.sim.shutdown().await;
    }

    let e = env(Profile::Server2019).await;
    let mut s = e.settings.clone();
    s.api_version = Some("7.1".into());
    match Tracker::connect(&s).await {
        Err(TrackerError::Refused { status: 400, message }) => {
            assert!(
                message.contains("tracker.api_version") && message.contains("5.0"),
                "{message}"
            );
        }
        other => panic!("a too-high api_version must be refused: {other:?}"),
    }
    s.api_version = Some("5.0".into());
    let t = Tracker::connect(&s).await.expect("the server's own version connects");
    assert_eq!(t.version().to_string(), "5.0");
    e.sim.shutdown().await;
}

#[tokio::test]
async fn a_bad_token_is_an_auth_error_and_token_problems_name_the_file_not_the_token() {
    let e = env(Profile::Services).await;
    let mut s = e.settings.clone();
    s.token_file = None;
    s.token = Some(Secret::new("not-the-pat"));
    match Tracker::connect(&s).await {
        Err(err @ TrackerError::Auth { status: 401, .. }) => {
            assert!(!err.to_string().contains("not-the-pat"), "{err}");
            assert!(err.to_string().contains("token"), "{err}");
        }
        other => panic!("expected Auth: {other:?}"),
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty-pat");
    std::fs::write(&empty, "\n").expect("write");
    let mut s = e.settings.clone();
    s.token_file = Some(empty.clone());
    match Tracker::connect(&s).await {
        Err(TrackerError::Token(m)) => assert!(m.contains(&empty.display().to_string()) && m.contains("empty"), "{m}"),
        other => panic!("expected Token: {other:?}"),
    }
    let missing = dir.path().join("missing-pat");
    s.token_file = Some(missing.clone());
    match Tracker::connect(&s).await {
        Err(TrackerError::Token(m)) => assert!(m.contains(&missing.display().to_string()), "{m}"),
        other => panic!("expected Token: {other:?}"),
    }
    // The token from the environment works like the file.
    let mut s = e.settings.clone();
    s.token_file = None;
    s.token = Some(Secret::new(e.sim.pat.clone()));
    Tracker::connect(&s).await.expect("token from settings");
    e.sim.shutdown().await;
}

#[tokio::test]
async fn projects_and_types_are_checked() {
    let e = env(Profile::Server2022).await;
    let t = e.tracker().await;
    let id = e.sim.create_project("Other Project");
    assert_eq!(t.check_project("Other Project").await.expect("exists"), id);
    match t.check_project("Nope").await {
        Err(TrackerError::NotFound(m)) => assert!(m.contains("Nope"), "{m}"),
        other => panic!("expected NotFound: {other:?}"),
    }
    let types = t.work_item_types(PROJECT).await.expect("types");
    assert!(types.iter().any(|(n, _)| n == "User Story"), "{types:?}");
    let bug = &types.iter().find(|(n, _)| n == "Bug").expect("Bug").1;
    let s = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        *bug,
        s(&[
            ("New", "Proposed"),
            ("Active", "InProgress"),
            ("Resolved", "Resolved"),
            ("Closed", "Completed")
        ])
    );
    e.sim.shutdown().await;
}

#[tokio::test]
async fn create_read_and_update_with_a_rev_test_and_tags() {
    let e = env(Profile::Services).await;
    let t = e.tracker().await;
    let patch = json!([
        add("/fields/System.Title", json!("First")),
        add("/fields/System.Description", json!("<p>Body</p>")),
        add("/fields/System.Tags", json!("beta; Alpha; gamma")),
    ]);
    let created = t.create(PROJECT, "User Story", &patch).await.expect("create");
    let id = created.id.expect("id");
    assert_eq!(created.rev, Some(1));
    assert_eq!(created.summary, "First");

    let read = t.read_item(id).await.expect("read").expect("exists");
    assert_eq!(
        (
            read.summary.as_str(),
            read.description.as_str(),
            read.project_key.as_str()
        ),
        ("First", "<p>Body</p>", PROJECT)
    );
    assert_eq!(read.labels, vec!["Alpha", "beta", "gamma"]);
    assert_eq!(read.type_name, "User Story");
    assert!(read.comments.is_empty());

    let update = json!([
        {"op": "test", "path": "/rev", "value": 1},
        add("/fields/System.Title", json!("Second")),
        add("/fields/System.Tags", json!("delta; Alpha")),
    ]);
    let updated = t.update(id, &update).await.expect("update");
    assert_eq!((updated.rev, updated.summary.as_str()), (Some(2), "Second"));
    let (rev, fields) = e.sim.item(id).expect("in the simulator");
    assert_eq!(rev, 2);
    assert_eq!(fields["System.Title"], "Second");
    assert_eq!(
        t.read_item(id).await.expect("read").expect("exists").labels,
        vec!["Alpha", "delta"]
    );

    // The same rev test again is stale now.
    match t.update(id, &update).await {
        Err(TrackerError::Conflict(c)) => assert_eq!(c, id),
        other => panic!("expected Conflict: {other:?}"),
    }
    // A change between our read and our write is caught the same way.
    e.sim
        .edit_after_next_read(id, vec![add("/fields/System.Title", json!("Human"))]);
    let seen = t.read_item(id).await.expect("read").expect("exists");
    let stale = json!([
        {"op": "test", "path": "/rev", "value": seen.rev},
        add("/fields/System.Title", json!("Ours")),
    ]);
    assert!(matches!(t.update(id, &stale).await, Err(TrackerError::Conflict(c)) if c == id));

    match t.create(PROJECT, "Epic Saga", &patch).await {
        Err(TrackerError::NotFound(m)) => assert!(m.contains("Epic Saga"), "{m}"),
        other => panic!("expected NotFound: {other:?}"),
    }
    match t
        .create(PROJECT, "Bug", &json!([add("/fields/No.Such", json!(1))]))
        .await
    {
        Err(TrackerError::Refused { status: 400, message }) => assert!(message.contains("No.Such"), "{message}"),
        other => panic!("expected Refused: {other:?}"),
    }
    assert!(t.read_item(999_999).await.expect("read").is_none());
    e.sim.shutdown().await;
}

#[tokio::test]
async fn comments_are_written_and_read_back_in_order_per_server_version() {
    for profile in [Profile::Services, Profile::Server2020, Profile::Server2019] {
        let e = env(profile).await;
        let t = e.tracker().await;
        let id = e
            .sim
            .create_item(PROJECT, "Bug", &[add("/fields/System.Title", json!("Commented"))])
            .expect("seed");
        e.sim
            .add_comment_as_human(id, "<p>from a human</p>")
            .expect("human comment");
        let first = t.add_comment(PROJECT, id, "<p>one</p>").await.expect("first");
        let second = t
            .add_comment(PROJECT, id, "<p>two &amp; more</p>")
            .await
            .expect("second");
        if profile == Profile::Server2019 {
            // Written through System.History: the comment id is the revision that carried it.
            let (rev, _) = e.sim.item(id).expect("item");
            assert_eq!(second.rev, Some(rev as u64));
            assert_eq!(second.id, rev.to_string());
            assert_eq!(first.id, (rev - 1).to_string());
        } else {
            assert_ne!(first.id, second.id);
            assert_eq!(e.sim.comment_texts(id).len(), 3, "{profile}");
        }
        let item = t.read_item(id).await.expect("read").expect("exists");
        let bodies: Vec<&str> = item.comments.iter().map(|c| c.body.as_str()).collect();
        assert_eq!(
            bodies,
            ["<p>from a human</p>", "<p>one</p>", "<p>two &amp; more</p>"],
            "{profile}"
        );
        let ids: Vec<&str> = item.comments.iter().filter_map(|c| c.id.as_deref()).collect();
        assert_eq!(&ids[1..], [first.id.as_str(), second.id.as_str()], "{profile}");
        assert_eq!(item.comments[1].author_email, "sim.user@example.com");
        assert_eq!(item.comments[1].author_name, "Sim User");
        assert!(!item.comments[1].created.is_empty());
        assert_ne!(item.comments[0].author_email, "sim.user@example.com");
        e.sim.shutdown().await;
    }
}

#[tokio::test]
async fn many_comments_are_read_across_pages() {
    let e = env(Profile::Server2022).await;
    let t = e.tracker().await;
    let id = e
        .sim
        .create_item(PROJECT, "Bug", &[add("/fields/System.Title", json!("Chatty"))])
        .expect("seed");
    for i in 0..205 {
        e.sim.add_comment_as_human(id, &format!("c{i}")).expect("comment");
    }
    let item = t.read_item(id).await.expect("read").expect("exists");
    let bodies: Vec<String> = item.comments.iter().map(|c| c.body.clone()).collect();
    let expected: Vec<String> = (0..205).map(|i| format!("c{i}")).collect();
    assert_eq!(bodies, expected);
    assert!(e.sim.count("comments.list") >= 2);
    e.sim.shutdown().await;
}

#[tokio::test]
async fn attachments_small_and_chunked_come_back_byte_for_byte() {
    let e = env(Profile::Server2022).await;
    let t = e.tracker().await;
    let small: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let up = t
        .upload_attachment(PROJECT, "small file.bin", &small)
        .await
        .expect("simple upload");
    assert_eq!(e.sim.count("attachments.chunk"), 0);
    let down = t.download_attachment(&up.url, 1 << 20).await.expect("download");
    assert_eq!(sha256(&down), sha256(&small));

    // Over Server's default 4 MB for a whole file: an administrator raised the limit.
    e.sim.set_attachment_limit(16 * 1024 * 1024);
    let big: Vec<u8> = (0..(9 * 1024 * 1024 + 123u32)).map(|i| (i % 253) as u8).collect();
    let up = t
        .upload_attachment(PROJECT, "big.zip", &big)
        .await
        .expect("chunked upload");
    assert_eq!(e.sim.count("attachments.chunk"), 3, "4 MiB chunks");
    assert_eq!(sha256(&e.sim.attachment_bytes(&up.id).expect("stored")), sha256(&big));
    let down = t.download_attachment(&up.url, 16 << 20).await.expect("download");
    assert_eq!(sha256(&down), sha256(&big));
    match t.download_attachment(&up.url, 1 << 20).await {
        Err(TrackerError::Protocol(m)) => assert!(m.contains("larger than"), "{m}"),
        other => panic!("a bounded download must refuse: {other:?}"),
    }
    // The token is never sent to another host.
    match t
        .download_attachment("https://elsewhere.example/_apis/wit/attachments/x", 10)
        .await
    {
        Err(TrackerError::Refused { message, .. }) => assert!(message.contains("not on the tracker"), "{message}"),
        other => panic!("expected a refusal: {other:?}"),
    }

    // Attached through a relation, it reads back as the item's attachment.
    let patch = json!([
        add("/fields/System.Title", json!("With file")),
        add(
            "/relations/-",
            json!({"rel": "AttachedFile", "url": up.url, "attributes": {"comment": ""}})
        ),
    ]);
    let item = t.create(PROJECT, "Bug", &patch).await.expect("create");
    let read = t.read_item(item.id.expect("id")).await.expect("read").expect("exists");
    assert_eq!(read.attachments.len(), 1);
    assert_eq!(read.attachments[0].url.as_deref(), Some(up.url.as_str()));
    e.sim.shutdown().await;
}

#[tokio::test]
async fn the_revisions_feed_pages_with_its_continuation_token() {
    let e = env(Profile::Services).await;
    let t = e.tracker().await;
    let other = "Elsewhere";
    e.sim.create_project(other);
    e.sim
        .create_item(other, "Bug", &[add("/fields/System.Title", json!("not ours"))])
        .expect("seed");
    let mut ids = Vec::new();
    for i in 0..230 {
        ids.push(
            e.sim
                .create_item(
                    PROJECT,
                    "Bug",
                    &[add("/fields/System.Title", json!(format!("item {i}")))],
                )
                .expect("seed"),
        );
    }
    e.sim
        .edit_as_human(ids[0], &[add("/fields/System.Title", json!("edited"))])
        .expect("edit");

    let mut token: Option<String> = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = t.revisions(PROJECT, token.as_deref(), None).await.expect("page");
        pages += 1;
        seen.extend(page.revisions.iter().map(|r| (r.id, r.rev)));
        token = Some(page.continuation.clone());
        if page.last {
            break;
        }
        assert!(pages < 10, "the feed must end");
    }
    assert!(pages >= 2, "231 revisions span more than one page");
    assert_eq!(seen.len(), 231);
    assert!(seen.contains(&(ids[0], 1)) && seen.contains(&(ids[0], 2)));
    let mut seen_ids: Vec<u64> = seen.iter().map(|(id, _)| *id).collect();
    seen_ids.sort_unstable();
    seen_ids.dedup();
    assert_eq!(seen_ids, ids, "only the project's items");

    // From the stored token, only what changed since.
    let quiet = t.revisions(PROJECT, token.as_deref(), None).await.expect("page");
    assert!(quiet.revisions.is_empty() && quiet.last);
    e.sim
        .edit_as_human(ids[5], &[add("/fields/System.Title", json!("again"))])
        .expect("edit");
    let next = t
        .revisions(PROJECT, Some(&quiet.continuation), None)
        .await
        .expect("page");
    let got: Vec<(u64, u64)> = next.revisions.iter().map(|r| (r.id, r.rev)).collect();
    assert_eq!(got, [(ids[5], 2)]);
    e.sim.shutdown().await;
}

#[tokio::test]
async fn wiql_selects_ids_and_a_crash_cut_create_is_found_by_its_hyperlink() {
    let e = env(Profile::Server2019).await;
    let t = e.tracker().await;
    let tagged = |title: &str, tags: &str| {
        e.sim
            .create_item(
                PROJECT,
                "Bug",
                &[
                    add("/fields/System.Title", json!(title)),
                    add("/fields/System.Tags", json!(tags)),
                ],
            )
            .expect("seed")
    };
    let a = tagged("a", "sync");
    let b = tagged("b", "other");
    let c = tagged("c", "sync; other");
    let mut all = t.query_ids(PROJECT, None).await.expect("all ids");
    all.sort_unstable();
    let mut expected = e.sim.item_ids(Some(PROJECT));
    expected.sort_unstable();
    assert_eq!(all, expected);
    assert_eq!(all, [a, b, c]);
    assert_eq!(
        t.query_ids(PROJECT, Some("[System.Tags] CONTAINS 'sync'"))
            .await
            .expect("ids"),
        [a, c]
    );

    let marker = "https://dev.azure.com/fabrikam/_workitems/edit/42";
    let link = |url: &str| add("/relations/-", json!({"rel": "Hyperlink", "url": url}));
    // The same marker on an item someone else created is not ours.
    e.sim
        .create_item(
            PROJECT,
            "Bug",
            &[add("/fields/System.Title", json!("human's")), link(marker)],
        )
        .expect("seed");
    assert_eq!(
        t.find_by_hyperlink(PROJECT, marker, now_ms()).await.expect("search"),
        None
    );
    let ours = t
        .create(
            PROJECT,
            "Bug",
            &json!([add("/fields/System.Title", json!("ours")), link(&format!("{marker}0"))]),
        )
        .await
        .expect("create");
    let ours2 = t
        .create(
            PROJECT,
            "Bug",
            &json!([add("/fields/System.Title", json!("ours too")), link(marker)]),
        )
        .await
        .expect("create");
    assert_eq!(
        t.find_by_hyperlink(PROJECT, marker, now_ms()).await.expect("search"),
        ours2.id,
        "exactly the URL, not a prefix"
    );
    assert_eq!(
        t.find_by_hyperlink(PROJECT, &format!("{marker}0"), now_ms())
            .await
            .expect("search"),
        ours.id
    );
    assert_eq!(
        t.find_by_hyperlink(PROJECT, "https://nowhere/1", now_ms())
            .await
            .expect("search"),
        None
    );
    e.sim.shutdown().await;
}

#[tokio::test]
async fn throttling_is_waited_out_with_retry_after_and_persistent_throttling_is_busy() {
    let e = env(Profile::Services).await;
    let t = e.tracker().await;
    let id = e
        .sim
        .create_item(PROJECT, "Bug", &[add("/fields/System.Title", json!("busy"))])
        .expect("seed");

    e.sim.inject_429(2, 1);
    let started = Instant::now();
    let item = t.read_item(id).await.expect("read after the 429s");
    assert_eq!(item.map(|i| i.summary), Some("busy".to_owned()));
    assert_eq!(e.sim.count("fault.429"), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After: 1 was honoured twice: {:?}",
        started.elapsed()
    );

    e.sim.inject_503(1, 0);
    t.check_project(PROJECT).await.expect("after one 503");
    assert_eq!(e.sim.count("fault.503"), 1);

    e.sim.inject_429(1000, 0);
    match t.read_item(id).await {
        Err(err @ TrackerError::Busy { status: 429, .. }) => assert!(err.is_transient()),
        other => panic!("expected Busy: {other:?}"),
    }
    assert_eq!(e.sim.count("fault.429"), 2 + 1 + u64::from(MAX_RETRIES));
    e.sim.inject_429(0, 0);
    e.sim.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_tracker_and_an_untrusted_certificate_are_told_apart() {
    let e = env(Profile::Services).await;
    // The system roots do not hold the simulator's CA.
    let mut s = e.settings.clone();
    s.trust = WebhookTrust::Web;
    s.ca_file = None;
    match Tracker::connect(&s).await {
        Err(TrackerError::Unreachable { reason, .. }) => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("expected an untrusted certificate: {other:?}"),
    }
    e.sim.shutdown().await;
    match Tracker::connect(&e.settings).await {
        Err(err @ TrackerError::Unreachable { .. }) => assert!(err.is_transient()),
        other => panic!("expected Unreachable: {other:?}"),
    }
}

fn connection(project: &str) -> relay::agent::AgentConnection {
    relay::agent::AgentConnection {
        name: "c".into(),
        node_connection: "c".into(),
        // Nothing listens there: the node steps fail, the tracker steps still run.
        node_url: "https://127.0.0.1:1".into(),
        pin: None,
        node_instance: "pub".into(),
        local_instance: "priv".into(),
        reported_instance: "priv".into(),
        description: String::new(),
        mode: "script".into(),
        node_project: "Public".into(),
        project: project.into(),
        deliver_to: None,
        accepted_at_ms: 0,
        revoked: None,
        revoked_at_ms: None,
        invitation_id: None,
    }
}

#[tokio::test]
async fn doctor_checks_the_tracker_instead_of_the_webhook() {
    use relay::doctor::Outcome;
    let e = env(Profile::Server2019).await;
    let mut settings = relay::config::Settings::default();
    settings.tracker = Some(e.settings.clone());
    let report = relay::doctor::diagnose(&settings, &connection(PROJECT), Ok("x".into())).await;
    let line = |step: &str| {
        report
            .checks
            .iter()
            .find(|c| c.step == step)
            .unwrap_or_else(|| panic!("no {step} line in {report:?}"))
            .clone()
    };
    assert!(report.checks.iter().all(|c| c.step != "webhook"), "{report:?}");
    assert_eq!(line("tracker").outcome, Outcome::Ok, "{report:?}");
    let pat = line("tracker pat");
    assert_eq!(pat.outcome, Outcome::Ok);
    assert!(pat.detail.contains("Sim User <sim.user@example.com>"), "{}", pat.detail);
    let version = line("api version");
    assert!(
        version.outcome == Outcome::Ok && version.detail.starts_with("5.0") && version.detail.contains("History"),
        "{}",
        version.detail
    );
    assert_eq!(line("project").outcome, Outcome::Ok);
    let egress = relay::doctor::egress(&settings, &[connection(PROJECT)]);
    let tracker_host = format!("localhost:{}", e.sim.addr.port());
    assert!(
        egress
            .iter()
            .any(|x| x.destination == tracker_host && x.purpose.contains("tracker")),
        "{egress:?}"
    );
    let text = relay::doctor::render(std::slice::from_ref(&report));
    assert!(text.contains("api version") && !text.contains(&e.sim.pat), "{text}");

    let report = relay::doctor::diagnose(&settings, &connection("Missing"), Ok("x".into())).await;
    let project = report
        .checks
        .iter()
        .find(|c| c.step == "project")
        .expect("project line");
    assert_eq!(project.outcome, Outcome::Fail);
    assert!(project.detail.contains("Missing"), "{}", project.detail);

    let mut bad = e.settings.clone();
    bad.token_file = None;
    bad.token = Some(Secret::new("wrong"));
    settings.tracker = Some(bad);
    let report = relay::doctor::diagnose(&settings, &connection(PROJECT), Ok("x".into())).await;
    let outcomes: Vec<(&str, Outcome)> = report
        .checks
        .iter()
        .filter(|c| ["tracker", "tracker pat", "api version", "project"].contains(&c.step))
        .map(|c| (c.step, c.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("tracker", Outcome::Ok),
            ("tracker pat", Outcome::Fail),
            ("api version", Outcome::Skip),
            ("project", Outcome::Skip)
        ]
    );
    e.sim.shutdown().await;
}

fn marker_link(url: &str) -> Value {
    add("/relations/-", json!({"rel": "Hyperlink", "url": url}))
}

#[tokio::test]
async fn a_create_or_comment_answered_by_a_gateway_after_commit_is_not_repeated_but_reconciled() {
    let e = env(Profile::Services).await;
    let t = e.tracker().await;
    let attempted = now_ms();
    let marker = "https://relay.example/marker/1";
    e.sim.fail_after_commit("workitems.create", 502, 1);
    let err = t
        .create(
            PROJECT,
            "Bug",
            &json!([add("/fields/System.Title", json!("once")), marker_link(marker)]),
        )
        .await
        .expect_err("a gateway's 502");
    assert!(err.is_transient(), "{err}");
    assert!(
        matches!(&err, TrackerError::Unreachable { reason, .. } if reason.contains("outcome is unknown")),
        "{err}"
    );
    assert_eq!(e.sim.count("workitems.create"), 1, "never repeated in the client");
    assert_eq!(e.sim.item_ids(Some(PROJECT)).len(), 1);
    let id = t
        .find_by_hyperlink(PROJECT, marker, attempted)
        .await
        .expect("search")
        .expect("the committed create is found by its marker");

    e.sim.fail_after_commit("comments.add", 504, 1);
    let err = t.add_comment(PROJECT, id, "<p>once</p>").await.expect_err("504");
    assert!(
        err.is_transient() && err.to_string().contains("outcome is unknown"),
        "{err}"
    );
    assert_eq!(e.sim.count("comments.add"), 1);
    assert_eq!(e.sim.comment_texts(id), ["<p>once</p>"]);

    // Refusals made before any processing are still waited out and repeated.
    e.sim.inject_429_on("workitems.create", 1, 0);
    t.create(
        PROJECT,
        "Bug",
        &json!([add("/fields/System.Title", json!("after 429"))]),
    )
    .await
    .expect("a 429 is retried");
    assert_eq!(e.sim.count("workitems.create"), 3);
    // An idempotent write (a patch with `test /rev`) is repeated after a 502.
    e.sim.fail_after_commit("workitems.update", 502, 1);
    let rev = e.sim.item(id).expect("item").0;
    t.update(
        id,
        &json!([
            {"op": "test", "path": "/rev", "value": rev},
            add("/fields/System.Title", json!("patched"))
        ]),
    )
    .await
    .map(|_| ())
    .or_else(|err| match err {
        // The first call committed, so the repeat's `test /rev` fails: the caller re-reads.
        TrackerError::Conflict(_) => Ok(()),
        other => Err(other),
    })
    .expect("an idempotent update is repeated");
    assert_eq!(e.sim.count("workitems.update"), 2);
    e.sim.shutdown().await;
}

#[tokio::test]
async fn reconciliation_finds_a_create_from_days_ago_with_no_fixed_window() {
    let e = env(Profile::Server2022).await;
    let t = e.tracker().await;
    let marker = "https://relay.example/marker/weekend";
    let item = t
        .create(
            PROJECT,
            "Bug",
            &json!([add("/fields/System.Title", json!("friday")), marker_link(marker)]),
        )
        .await
        .expect("create");
    let id = item.id.expect("id");
    // Created on a Friday, looked for on the Monday after a crash over the weekend.
    let friday = now_ms() - 3 * 86_400_000;
    e.sim.backdate(id, friday as i64);
    assert_eq!(
        t.find_by_hyperlink(PROJECT, marker, friday).await.expect("search"),
        Some(id)
    );
    assert_eq!(
        t.hyperlinks_created(PROJECT, friday)
            .await
            .expect("search")
            .get(marker)
            .copied(),
        Some(id)
    );
    // A search from after it was created does not see it.
    assert_eq!(
        t.find_by_hyperlink(PROJECT, marker, now_ms() + 2 * 86_400_000)
            .await
            .expect("search"),
        None
    );
    e.sim.shutdown().await;
}

#[tokio::test]
async fn the_first_feed_read_starts_at_the_given_instant_not_the_project_s_history() {
    let e = env(Profile::Server2020).await;
    let t = e.tracker().await;
    for title in ["old 1", "old 2"] {
        e.sim
            .create_item(PROJECT, "Bug", &[add("/fields/System.Title", json!(title))])
            .expect("seed");
    }
    // The simulator stamps revisions to the millisecond: keep `start` clear of both sides.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let start = now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let new = e
        .sim
        .create_item(PROJECT, "Bug", &[add("/fields/System.Title", json!("new"))])
        .expect("seed");
    let page = t.revisions(PROJECT, None, Some(start)).await.expect("page");
    let got: Vec<(u64, u64)> = page.revisions.iter().map(|r| (r.id, r.rev)).collect();
    assert_eq!(got, [(new, 1)]);
    // The continuation goes on from there; the start no longer applies.
    e.sim
        .edit_as_human(new, &[add("/fields/System.Title", json!("newer"))])
        .expect("edit");
    let next = t
        .revisions(PROJECT, Some(&page.continuation), Some(start))
        .await
        .expect("page");
    let got: Vec<(u64, u64)> = next.revisions.iter().map(|r| (r.id, r.rev)).collect();
    assert_eq!(got, [(new, 2)]);
    let all = t.revisions(PROJECT, None, None).await.expect("page");
    assert_eq!(all.revisions.len(), 4, "without a start: the whole history");
    e.sim.shutdown().await;
}

#[tokio::test]
async fn attachment_urls_on_the_organisation_s_canonical_host_are_read_from_the_configured_one() {
    let e = env(Profile::Services).await;
    e.sim.set_canonical_url(Some("https://fabrikam.visualstudio.com"));
    let t = e.tracker().await;
    let up = t
        .upload_attachment(PROJECT, "trace.log", b"canonical bytes")
        .await
        .expect("upload");
    assert!(
        up.url
            .starts_with("https://fabrikam.visualstudio.com/_apis/wit/attachments/"),
        "{}",
        up.url
    );
    let bytes = t.download_attachment(&up.url, 1 << 20).await.expect("download");
    assert_eq!(&bytes[..], b"canonical bytes");
    let gets = e.sim.count("attachments.get");
    match t
        .download_attachment("https://elsewhere.example/_apis/wit/attachments/x", 1 << 20)
        .await
    {
        Err(TrackerError::Refused { message, .. }) => assert!(message.contains("not on the tracker"), "{message}"),
        other => panic!("expected a refusal: {other:?}"),
    }
    assert_eq!(e.sim.count("attachments.get"), gets);
    e.sim.shutdown().await;
}

#[tokio::test]
async fn an_upload_over_the_server_s_attachment_limit_is_refused_for_good_naming_the_limit() {
    let e = env(Profile::Server2022).await;
    let t = e.tracker().await;
    // Chunked (over 4 MB): the whole file counts.
    let big = vec![7u8; 5 * 1024 * 1024];
    let err = t
        .upload_attachment(PROJECT, "big.bin", &big)
        .await
        .expect_err("over 4 MB");
    assert!(!err.is_transient(), "{err}");
    assert!(
        matches!(&err, TrackerError::Refused { message, .. } if message.contains("TF237082") && message.contains("(4.000 MB(s))")),
        "{err}"
    );
    e.sim.set_attachment_limit(1024);
    let err = t
        .upload_attachment(PROJECT, "small.bin", &[1u8; 2048])
        .await
        .expect_err("over 1 KiB");
    assert!(
        !err.is_transient() && err.to_string().contains("supported file upload size"),
        "{err}"
    );
    e.sim.shutdown().await;
}

/// A plain-HTTP server that answers the version probe, and an attachment as `pieces` bodies
/// pieces `gap` apart (a body that keeps flowing, or that stalls).
async fn trickling_server(pieces: usize, gap: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).to_string();
                if head.contains("/_apis/projects") {
                    let body = r#"{"count":0,"value":[]}"#;
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    return;
                }
                let piece = [b'x'; 1000];
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            pieces * piece.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                for _ in 0..pieces {
                    if s.write_all(&piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
            });
        }
    });
    format!("http://{addr}/coll")
}

fn plain_settings(url: &str, dir: &tempfile::TempDir, timeout: Duration) -> TrackerSettings {
    let token = dir.path().join("pat");
    std::fs::write(&token, "pat\n").expect("write PAT");
    let mut s = settings(url, Some(token), None);
    s.trust = WebhookTrust::Web;
    s.request_timeout = timeout;
    s
}

#[tokio::test]
async fn a_download_that_keeps_flowing_outlasts_the_request_timeout_and_one_that_stalls_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    // 12 pieces 100 ms apart: 1.1 s in all, past the 500 ms timeout, never 500 ms without one.
    let url = trickling_server(12, Duration::from_millis(100)).await;
    let t = Tracker::connect(&plain_settings(&url, &dir, Duration::from_millis(500)))
        .await
        .expect("connects");
    let bytes = t
        .download_attachment(&format!("{url}/_apis/wit/attachments/a"), 1 << 20)
        .await
        .expect("a flowing body is read to its end");
    assert_eq!(bytes.len(), 12_000);
    // Over the bound: this attachment's error, not a transient one.
    let err = t
        .download_attachment(&format!("{url}/_apis/wit/attachments/a"), 5_000)
        .await
        .expect_err("too large");
    assert!(!err.is_transient() && err.to_string().contains("larger than"), "{err}");

    // A body that stalls longer than the timeout between two pieces.
    let url = trickling_server(3, Duration::from_millis(1500)).await;
    let t = Tracker::connect(&plain_settings(&url, &dir, Duration::from_millis(500)))
        .await
        .expect("connects");
    let err = t
        .download_attachment(&format!("{url}/_apis/wit/attachments/a"), 1 << 20)
        .await
        .expect_err("stalled");
    assert!(err.is_transient() && err.to_string().contains("stalled"), "{err}");
}
