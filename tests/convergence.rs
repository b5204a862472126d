//! Randomized convergence: seeded scenarios of person edits on both trackers (titles,
//! descriptions, tags, comments, attachments, items created on either side) interleaved with
//! faults (answers held past relay's timeout, 502/504 after the tracker committed, slow
//! commits, 503s, kill -9 of either daemon, the connection deactivated and activated again). After each scenario quiesces, every item has
//! exactly one twin, every synced field is equal on both sides, every comment exists once on
//! each, and no sync error remains that a retry does not clear.
//!
//! `CONVERGENCE_SCENARIOS` (default 20) scenarios run from `CONVERGENCE_SEED` (default 5000,
//! so that the test suite runs the same scenarios every time; `CONVERGENCE_SEED=random`
//! takes one from the clock); a failure prints the seed of its scenario and its steps, and
//! `CONVERGENCE_SEED=<seed> CONVERGENCE_SCENARIOS=1` replays it.

mod common;
#[path = "sync/pair.rs"]
mod pair;

use std::time::{Duration, Instant};

use ado_sim::{Profile, SimHandle};
use serde_json::{json, Value};

use pair::{attachments, comments, field, fields, tags, Pair, CONN, PRIVATE, PUBLIC};

/// A small, seeded, reproducible random source (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn public(&mut self) -> bool {
        self.next() & 1 == 0
    }
}

/// An item of a scenario: where a person made it and its id there.
#[derive(Debug, Clone, Copy)]
struct Item {
    public: bool,
    id: u64,
}

/// What the scenario did, for the report of a failure.
#[derive(Debug, Default)]
struct Log {
    steps: Vec<String>,
    faults: usize,
    /// The connection is deactivated on the node.
    paused: bool,
    comments: Vec<((bool, u64), String)>,
}

/// The endpoints whose writes a fault may hit.
const WRITES: &[&str] = &["workitems.create", "workitems.update", "comments.add"];

fn side(p: &Pair, public: bool) -> &SimHandle {
    if public {
        &p.public
    } else {
        &p.private
    }
}

/// The twin of `item` on the other side: the item relay made there, found by the hyperlink
/// marker every item relay creates carries. Every such item, so that a second copy shows.
fn twins(p: &Pair, item: Item) -> Vec<u64> {
    let (origin, other, project) = if item.public {
        (&p.public, &p.private, PRIVATE)
    } else {
        (&p.private, &p.public, PUBLIC)
    };
    let suffix = format!("/_workitems/edit/{}#relay-connection={CONN}", item.id);
    let base = origin.url.trim_end_matches('/').to_owned();
    other
        .item_ids(Some(project))
        .into_iter()
        .filter(|&id| {
            other
                .relations(id)
                .iter()
                .any(|(rel, url, _)| rel == "Hyperlink" && url.starts_with(&base) && url.ends_with(&suffix))
        })
        .collect()
}

/// The id of `item` on side `public`, if known there yet.
fn id_on(p: &Pair, item: Item, public: bool) -> Option<u64> {
    if item.public == public {
        return Some(item.id);
    }
    match twins(p, item).as_slice() {
        [id] => Some(*id),
        _ => None,
    }
}

fn set(field: &str, value: &str) -> Value {
    json!({"op": "add", "path": format!("/fields/{field}"), "value": value})
}

/// One person edit or fault, chosen by `rng`; answers what it did.
async fn step(p: &mut Pair, rng: &mut Rng, n: usize, items: &mut Vec<Item>, log: &mut Log, tag: &str) -> String {
    let public = rng.public();
    let which = if public { "public" } else { "private" };
    let pick = items[rng.below(items.len())];
    let target = id_on(p, pick, public);
    match (rng.below(13), target) {
        (0, _) => {
            let (project, title) = (if public { PUBLIC } else { PRIVATE }, format!("{tag} item {n}"));
            let id = side(p, public)
                .create_item(project, "Task", &fields(&[("System.Title", &title)]))
                .unwrap();
            items.push(Item { public, id });
            format!("{which}: create {id} {title:?}")
        }
        (1 | 2, Some(id)) => {
            let title = format!("{tag} title {n} ({which})");
            side(p, public)
                .edit_as_human(id, &[set("System.Title", &title)])
                .unwrap();
            format!("{which}: title of {id} = {title:?}")
        }
        (3, Some(id)) => {
            let text = format!("<p>{tag} description {n} ({which})</p>");
            side(p, public)
                .edit_as_human(id, &[set("System.Description", &text)])
                .unwrap();
            format!("{which}: description of {id}")
        }
        (4, Some(id)) => {
            let all = ["alpha", "beta", "gamma", "delta"];
            let chosen: Vec<&str> = all.iter().copied().filter(|_| rng.public()).collect();
            side(p, public)
                .edit_as_human(id, &[set("System.Tags", &chosen.join("; "))])
                .unwrap();
            format!("{which}: tags of {id} = {chosen:?}")
        }
        (5 | 6, Some(id)) => {
            let text = format!("{tag} comment {n} ({which})");
            side(p, public).add_comment_as_human(id, &text).unwrap();
            log.comments.push(((pick.public, pick.id), text.clone()));
            format!("{which}: comment on {id} {text:?}")
        }
        (7, Some(id)) => {
            let len = 2_000 + rng.below(30_000);
            let seed = rng.next();
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed.wrapping_add(i as u64 * 31) >> 3) as u8)
                .collect();
            side(p, public)
                .attach_as_human(id, &format!("{tag}-{n}.bin"), &bytes)
                .unwrap();
            format!("{which}: attachment on {id}, {len} bytes")
        }
        (8, _) => {
            log.faults += 1;
            let endpoint = WRITES[rng.below(WRITES.len())];
            let status = if rng.public() { 502 } else { 504 };
            side(p, public).fail_after_commit(endpoint, status, 1);
            format!("{which} tracker: next {endpoint} answers {status} after committing")
        }
        (9, _) => {
            log.faults += 1;
            let endpoint = WRITES[rng.below(WRITES.len())];
            // Held past relay's request timeout: the answer is lost to it, the write is not.
            side(p, public).hold(endpoint);
            format!("{which} tracker: {endpoint} answers held past the timeout")
        }
        (10, _) => {
            log.faults += 1;
            let endpoint = WRITES[rng.below(WRITES.len())];
            side(p, public).slow_commits(endpoint, Duration::from_millis(300));
            side(p, public).inject_503(1 + rng.below(3) as u32, 1);
            format!("{which} tracker: slow commits of {endpoint}, and 503s")
        }
        (12, _) => {
            log.faults += 1;
            common::cli_ok(&p.node_dir, &["node", "deactivate", CONN]).await;
            log.paused = true;
            "the node deactivates the connection".into()
        }
        (11, _) => {
            log.faults += 1;
            if public {
                p.kill_node();
                p.start_node().await;
                "kill -9 of the node, started again".into()
            } else {
                p.restart_agent().await;
                "kill -9 of the agent, started again".into()
            }
        }
        _ => format!("{which}: item {} has no twin there yet; nothing done", pick.id),
    }
}

/// Ends every fault still in force.
async fn heal(p: &Pair, log: &mut Log) {
    for sim in [&p.public, &p.private] {
        for e in WRITES {
            sim.release(e);
            sim.slow_commits(e, Duration::ZERO);
        }
    }
    if std::mem::take(&mut log.paused) {
        common::cli_ok(&p.node_dir, &["node", "activate", CONN]).await;
    }
}

/// What must hold once a scenario has quiesced; `Err` says what does not.
fn converged(p: &Pair, items: &[Item], log: &Log) -> Result<(), String> {
    for &item in items {
        let found = twins(p, item);
        let [twin] = found.as_slice() else {
            return Err(format!("{item:?} has {} twins: {found:?}", found.len()));
        };
        let (public, private) = if item.public {
            (item.id, *twin)
        } else {
            (*twin, item.id)
        };
        for f in ["System.Title", "System.Description"] {
            let (a, b) = (field(&p.public, public, f), field(&p.private, private, f));
            if a != b {
                return Err(format!("{f} of public {public} / private {private}: {a:?} vs {b:?}"));
            }
        }
        let (a, b) = (tags(&p.public, public), tags(&p.private, private));
        if a != b {
            return Err(format!("tags of public {public} / private {private}: {a:?} vs {b:?}"));
        }
        let (a, b) = (attachments(&p.public, public), attachments(&p.private, private));
        if a != b {
            return Err(format!(
                "attachments of public {public} / private {private}: {a:?} vs {b:?}"
            ));
        }
        for (_, text) in log.comments.iter().filter(|(on, _)| *on == (item.public, item.id)) {
            let count =
                |sim: &SimHandle, id: u64| comments(sim, id).iter().filter(|c| c.contains(text.as_str())).count();
            let (a, b) = (count(&p.public, public), count(&p.private, private));
            if (a, b) != (1, 1) {
                return Err(format!(
                    "comment {text:?}: {a} on public {public}, {b} on private {private}"
                ));
            }
        }
    }
    Ok(())
}

/// The sync errors of both sides; each is retried once, so only one a retry cannot clear stays.
async fn errors(p: &Pair) -> Vec<Value> {
    let mut all = Vec::new();
    for node in [true, false] {
        let out = p.sync_cli(node, &["errors", CONN, "--json"]).await;
        let list: Vec<Value> = serde_json::from_str(&out).unwrap();
        for e in &list {
            let (item, side) = (e["item"].as_str().unwrap(), e["side"].as_str().unwrap());
            p.sync_cli(node, &["retry", CONN, item, "--side", side]).await;
        }
        all.extend(list);
    }
    all
}

/// Waits until the scenario converged and stays so once both directions drained.
async fn quiesce(p: &Pair, items: &[Item], log: &Log, tag: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    let mut retried = 0;
    while Instant::now() < deadline {
        match converged(p, items, log) {
            Ok(()) => {
                // Everything queued before these two markers has been applied when they arrive.
                for public in [true, false] {
                    let title = format!("{tag} drain {}", if public { "public" } else { "private" });
                    let (project, other, other_project) = if public {
                        (PUBLIC, &p.private, PRIVATE)
                    } else {
                        (PRIVATE, &p.public, PUBLIC)
                    };
                    side(p, public)
                        .create_item(project, "Task", &fields(&[("System.Title", &title)]))
                        .unwrap();
                    pair::wait_titled(other, other_project, &title).await;
                }
                return converged(p, items, log);
            }
            Err(e) => last = e,
        }
        if retried < 3 && Instant::now() + Duration::from_secs(60) < deadline {
            // Errors a retry clears are fine; one that stays is reported with the rest.
            if !errors(p).await.is_empty() {
                retried += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = errors(p).await;
    Err(format!("never converged: {last}; sync errors: {left:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_scenarios_of_edits_and_faults_converge() {
    let scenarios: usize = std::env::var("CONVERGENCE_SCENARIOS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base: u64 = match std::env::var("CONVERGENCE_SEED").ok().as_deref() {
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        Some(v) => v.parse().expect("CONVERGENCE_SEED: a number, or random"),
        None => 5000,
    };
    eprintln!("convergence: {scenarios} scenarios from seed {base}");
    let mut p = Pair::start(
        Profile::Services,
        Profile::Server2022,
        &[("RELAY_TRACKER__REQUEST_TIMEOUT", "2s")],
    )
    .await;
    let started = Instant::now();
    let mut faults = 0;
    for s in 0..scenarios {
        let seed = base.wrapping_add(s as u64);
        let mut rng = Rng(seed);
        let tag = format!("s{seed}");
        let mut log = Log::default();
        let mut items = Vec::new();
        for k in 0..1 + rng.below(2) {
            let public = rng.public();
            let project = if public { PUBLIC } else { PRIVATE };
            let title = format!("{tag} seed item {k}");
            let id = side(&p, public)
                .create_item(project, "Task", &fields(&[("System.Title", &title)]))
                .unwrap();
            log.steps.push(format!(
                "{}: create {id} {title:?}",
                if public { "public" } else { "private" }
            ));
            items.push(Item { public, id });
        }
        for n in 0..6 + rng.below(8) {
            let what = step(&mut p, &mut rng, n, &mut items, &mut log, &tag).await;
            log.steps.push(what);
            // Now and then the sides catch up before the next step; otherwise edits cross.
            if rng.below(3) == 0 {
                let held = rng.below(2) == 0;
                tokio::time::sleep(Duration::from_millis(if held { 2_500 } else { 300 })).await;
                heal(&p, &mut log).await;
            }
        }
        heal(&p, &mut log).await;
        if let Err(e) = quiesce(&p, &items, &log, &tag).await {
            let tail = |log: String| {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(80)..].join("\n")
            };
            eprintln!(
                "node log, last lines:\n{}\nagent log, last lines:\n{}",
                tail(p.node.log()),
                tail(p.agent.log())
            );
            panic!(
                "scenario {s} (replay: CONVERGENCE_SEED={seed} CONVERGENCE_SCENARIOS=1) failed: {e}\nsteps:\n  {}",
                log.steps.join("\n  ")
            );
        }
        faults += log.faults;
        eprintln!(
            "scenario {s} (seed {seed}): {} steps, {} faults, converged",
            log.steps.len(),
            log.faults
        );
    }
    eprintln!(
        "convergence: {scenarios} scenarios, {faults} faults injected, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
