//! The demo's two Azure DevOps instances: `ado-sim` processes (the simulator is never linked
//! into relay), and a person's client on each, which edits as someone other than relay.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::config::{Secret, TrackerKind, TrackerSettings, WebhookTrust};
use crate::error::{Kind, OpError, OpResult};
use crate::sync::WorkItem;
use crate::tracker::Tracker;

/// A running simulator process, stopped on drop.
pub struct SimProcess {
    child: Child,
    /// The tracker URL (`https://localhost:port/collection`).
    pub url: String,
    /// The PAT relay uses.
    pub pat: String,
    /// The PEM file of the CA that signed its certificate.
    pub ca_file: PathBuf,
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `ado-sim` is: `explicit`, else beside this executable.
pub fn locate(explicit: Option<&Path>) -> OpResult<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| OpError::new(Kind::Failed, format!("cannot find this executable: {e}")))?
            .with_file_name("ado-sim"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(OpError::new(
            Kind::Config,
            format!(
                "relay demo runs two simulated Azure DevOps instances with the ado-sim binary, which is not at {}: \
                 build it beside relay with `cargo build --release --workspace`, or pass --ado-sim PATH",
                path.display()
            ),
        ))
    }
}

/// Starts `ado-sim` with `profile` and `project` on a loopback port over TLS, its files in
/// `dir`, and waits for the address it prints.
pub fn start(bin: &Path, dir: &Path, name: &str, profile: &str, project: &str) -> OpResult<SimProcess> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| OpError::new(Kind::Failed, format!("{name} simulator: {what}: {e}"));
    let pat = crate::crypto::random_id();
    let pat_file = dir.join(format!("{name}.pat"));
    std::fs::write(&pat_file, format!("{pat}\n")).map_err(|e| fail("writing the PAT file", &e))?;
    let ca_file = dir.join(format!("{name}-ca.pem"));
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--profile", profile, "--project", project])
        .arg("--pat-file")
        .arg(&pat_file)
        .arg("--tls-ca-out")
        .arg(&ca_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(&format!("starting {}", bin.display()), &e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut sim = SimProcess {
        child,
        url: String::new(),
        pat,
        ca_file,
    };
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| fail("reading its address", &e))?;
    match line.split_once("listening: ") {
        Some((_, url)) => sim.url = url.trim().to_owned(),
        None => return Err(fail("it did not print its address", &line.trim())),
    }
    Ok(sim)
}

/// Tracker settings for `sim` with `token`: the simulator's CA only, a quick poll.
pub fn settings(sim: &SimProcess, token: &str) -> TrackerSettings {
    TrackerSettings {
        kind: TrackerKind::AzureDevOps,
        url: sim.url.clone(),
        token_file: None,
        token: Some(Secret::new(token)),
        trust: WebhookTrust::Ca,
        ca_file: Some(sim.ca_file.clone()),
        api_version: None,
        poll_interval: Duration::from_millis(200),
        request_timeout: Duration::from_secs(10),
        hook_secret: None,
    }
}

/// A person's client: the simulator accepts `{pat}-human` as a second user's PAT, so these
/// edits are not relay's own and are synced.
pub async fn person(sim: &SimProcess) -> OpResult<Tracker> {
    Tracker::connect(&settings(sim, &format!("{}-human", sim.pat)))
        .await
        .map_err(|e| OpError::new(Kind::Failed, format!("connecting to {}: {e}", sim.url)))
}

/// What a person compares on twin items: the five seed fields, with comment bodies as text
/// and attachments as file name and SHA-256 of their downloaded bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    /// Title.
    pub summary: String,
    /// Description as text.
    pub description: String,
    /// Tags, sorted.
    pub labels: Vec<String>,
    /// Comment texts, sorted.
    pub comments: Vec<String>,
    /// (file name, sha256), sorted.
    pub attachments: Vec<(String, String)>,
    /// The assignee's unique name.
    pub assignee: Option<String>,
    /// The SHA-256 of each inline image of the description, read from this tracker (an image
    /// on another host shows as its URL).
    pub images: Vec<String>,
    /// The parent's title.
    pub parent: Option<String>,
}

/// Reads item `id` as a person sees it.
pub async fn seen(tracker: &Tracker, id: u64) -> OpResult<Seen> {
    let fail = |e: crate::tracker::TrackerError| OpError::new(Kind::Failed, format!("reading work item {id}: {e}"));
    let item: WorkItem = tracker
        .read_item(id)
        .await
        .map_err(fail)?
        .ok_or_else(|| OpError::new(Kind::Failed, format!("work item {id} is gone")))?;
    let text = crate::sync::script::strip_html;
    let mut labels = item.labels.clone();
    labels.sort();
    let mut comments: Vec<String> = item.comments.iter().map(|c| text(&c.body).trim().to_owned()).collect();
    comments.sort();
    let mut attachments = Vec::new();
    for a in &item.attachments {
        let Some(url) = &a.url else { continue };
        let bytes = tracker.download_attachment(url, 64 << 20).await.map_err(fail)?;
        attachments.push((a.filename.clone(), crate::crypto::hex(&crate::crypto::sha256(&bytes))));
    }
    attachments.sort();
    let mut images = Vec::new();
    for (_, src) in crate::sync::inline::image_sources(&item.description) {
        if tracker.attachment_id(&src).await.is_none() {
            images.push(src);
            continue;
        }
        let bytes = tracker.download_attachment(&src, 64 << 20).await.map_err(fail)?;
        images.push(crate::crypto::hex(&crate::crypto::sha256(&bytes)));
    }
    let parent_id = item
        .links
        .iter()
        .find(|l| l.rel == crate::sync::workitem::REL_PARENT)
        .map(|l| l.target);
    let parent = match parent_id {
        Some(p) => tracker.read_item(p).await.map_err(fail)?.map(|w| w.summary),
        None => None,
    };
    Ok(Seen {
        summary: item.summary,
        description: text(&item.description).trim().to_owned(),
        labels,
        comments,
        attachments,
        assignee: item.assignee.map(|p| p.unique_name),
        images,
        parent,
    })
}
