//! Bulk sync benchmark: items/s for `relay sync bulk` of N work items (3 comments and 3 tags
//! each) from a Services simulator to a Server 2022 simulator through a release node and agent
//! as separate processes, beside the rate at which a plain client creates the same items in a
//! simulator directly, measured in the same run; then the same with a screenshot pasted into
//! each item's description (an inline image: its bytes cross and are uploaded, its URL
//! rewritten), beside a plain client that uploads the image and creates the item with it.
//! `cargo bench --bench sync_bulk`; the item count is `BENCH_ITEMS` (default 10000).

#[path = "../common/mod.rs"]
mod common;
#[path = "../sync/pair.rs"]
mod pair;

use std::time::{Duration, Instant};

use ado_sim::{Profile, Sim, SimHandle, SimOptions};
use relay::config::{Secret, TrackerKind, TrackerSettings, WebhookTrust};
use relay::tracker::Tracker;
use serde_json::json;

use pair::{fields, Pair, CONN, PRIVATE, PUBLIC};

const COMMENTS: usize = 3;
const TAGS: &str = "bulk; bench; relay";

fn title(i: usize) -> String {
    format!("Bulk item {i}")
}

fn description(i: usize) -> String {
    format!("<p>Item {i} of the bulk benchmark, with <b>some</b> markup.</p>")
}

/// Size of each item's inline image.
const IMAGE_BYTES: usize = 8 * 1024;

/// A distinct PNG-headed image for item `i`.
fn image(i: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    let seed = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    b.extend((0..IMAGE_BYTES as u64).map(|k| (k.wrapping_mul(seed) >> 13) as u8));
    b
}

/// The description of item `i` with its image at `url`.
fn description_with(i: usize, url: &str) -> String {
    format!("{}<p><img src=\"{url}\" alt=\"screenshot {i}\"></p>", description(i))
}

/// A client of `sim` as a person would configure it.
async fn client(sim: &SimHandle, dir: &std::path::Path) -> Tracker {
    let ca = dir.join("direct-ca.pem");
    std::fs::write(&ca, sim.ca_pem.as_deref().unwrap()).unwrap();
    Tracker::connect(&TrackerSettings {
        kind: TrackerKind::AzureDevOps,
        url: sim.url.clone(),
        token_file: None,
        token: Some(Secret::new(sim.human_pat())),
        trust: WebhookTrust::Ca,
        ca_file: Some(ca),
        api_version: None,
        poll_interval: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        hook_secret: None,
    })
    .await
    .unwrap()
}

/// Items/s of a plain client creating `n` items (create, then each comment) one after another
/// in a fresh Server 2022 simulator over TLS: what relay's incoming side has to do per item.
async fn direct(n: usize, images: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(SimOptions {
        profile: Profile::Server2022,
        tls: true,
        projects: vec![PRIVATE.into()],
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let t = client(&sim, dir.path()).await;
    let started = Instant::now();
    for i in 0..n {
        let text = if images {
            let up = t
                .upload_attachment(PRIVATE, &format!("shot-{i}.png"), &image(i))
                .await
                .unwrap();
            description_with(i, &up.url)
        } else {
            description(i)
        };
        let patch = json!([
            {"op": "add", "path": "/fields/System.Title", "value": title(i)},
            {"op": "add", "path": "/fields/System.Description", "value": text},
            {"op": "add", "path": "/fields/System.Tags", "value": TAGS},
        ]);
        let item = t.create(PRIVATE, "Task", &patch).await.unwrap();
        for c in 0..COMMENTS {
            t.add_comment(PRIVATE, item.id.unwrap(), &format!("<p>comment {c} on {i}</p>"))
                .await
                .unwrap();
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    sim.shutdown().await;
    rate
}

/// Items/s of `relay sync bulk` from the command to the last item's last comment arriving.
async fn relayed(n: usize, images: bool) -> (f64, Duration) {
    let p = Pair::start_seeded(Profile::Services, Profile::Server2022, &[], |sim| {
        for i in 0..n {
            let text = if images {
                let (_, url) = sim.upload_as_human(&format!("shot-{i}.png"), &image(i));
                description_with(i, &url)
            } else {
                description(i)
            };
            let id = sim
                .create_item(
                    PUBLIC,
                    "Task",
                    &fields(&[
                        ("System.Title", &title(i)),
                        ("System.Description", &text),
                        ("System.Tags", TAGS),
                    ]),
                )
                .unwrap();
            for c in 0..COMMENTS {
                sim.add_comment_as_human(id, &format!("comment {c} on {i}")).unwrap();
            }
        }
    })
    .await;
    let started = Instant::now();
    let out = p.sync_cli(true, &["bulk", CONN]).await;
    let sent = started.elapsed();
    assert!(out.contains(&format!("sent {n}")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        // Counting is cheap; the comments of every item are read only once all items exist
        // (reading them holds the simulator's lock, which would slow the run it measures).
        let ids = p.private.item_ids(Some(PRIVATE));
        if ids.len() >= n && ids.iter().all(|id| p.private.comment_texts(*id).len() >= COMMENTS) {
            break;
        }
        let pause = if ids.len() >= n { 20 } else { 200 };
        assert!(Instant::now() < deadline, "only {} of {n} items arrived", ids.len());
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let ids = p.private.item_ids(Some(PRIVATE));
    assert_eq!(ids.len(), n, "an item was created twice");
    if images {
        // Each image crossed: uploaded once to the private tracker, linked from its twin there.
        let own = format!("{}/_apis/wit/attachments/", p.private.url);
        let linked = ids
            .iter()
            .filter(|id| pair::field(&p.private, **id, "System.Description").contains(&own))
            .count();
        assert_eq!(linked, n, "items whose image is on the private tracker");
        assert_eq!(
            p.private.count("attachments.create") as usize,
            n,
            "one upload per image"
        );
    }
    let per_item: Vec<String> = p
        .private
        .counters()
        .into_iter()
        .filter(|(_, c)| *c as usize >= n / 2)
        .map(|(e, c)| format!("{e} {:.1}", c as f64 / n as f64))
        .collect();
    println!("  private tracker requests per item: {}", per_item.join(", "));
    (rate, sent)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    for images in [false, true] {
        let what = if images {
            format!(", and a {} KiB inline image", IMAGE_BYTES / 1024)
        } else {
            String::new()
        };
        println!("bulk sync of {n} work items, {COMMENTS} comments and 3 tags each{what} (Services -> Server 2022)");
        let base = direct(n, images).await;
        println!("  direct: a plain client creating them over TLS     {base:>8.1} items/s");
        let (rate, sent) = relayed(n, images).await;
        println!(
            "  relay:  sync bulk through node and agent processes {rate:>8.1} items/s (bulk command answered in {:.1} s)",
            sent.as_secs_f64()
        );
        let ratio = rate / base;
        println!(
            "  ratio relay / direct: {ratio:.2} (target >= 0.50): {}",
            if ratio >= 0.5 { "met" } else { "NOT met" }
        );
    }
}
