//! The Azure DevOps client: the REST calls Script mode makes against one tracker (Services or
//! Server), with its API version probed from the server's own answer, a personal access token
//! that never prints, backoff on 429/503, and errors that name what to check.
//!
//! # Layout
//!
//! - this file: the public face ([`Tracker`], its errors and answers) and the work item calls.
//! - `client`: HTTP (credential, deadlines, bounds, 429/503 waits, refusals, version probe).
//! - `feed`: the reporting revisions feed, WIQL ids, the crash-reconciling hyperlink search.
//! - `comments`: reading all comments (5.0's History view or the comments API), adding one.
//! - `attachments`: simple and chunked uploads, bounded downloads.

mod attachments;
mod client;
mod comments;
mod feed;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::TrackerSettings;
use crate::http::Method;
use crate::sync::workitem::WorkItem;
use client::{enc, Req, Rest};

pub use client::{LATEST_KNOWN, MAX_RETRIES, MAX_RETRY_WAIT, OLDEST_KNOWN};

/// A REST API version (`5.0`, `6.0`, `7.0`, `7.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl ApiVersion {
    /// Parses `"7.1"` (a `-preview…` suffix is ignored).
    pub fn parse(text: &str) -> Option<ApiVersion> {
        let text = text.trim();
        let core = text.split('-').next()?;
        let (major, minor) = core.split_once('.')?;
        Some(ApiVersion {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }

    /// Whether the comments API can add comments (5.1 and later); below, comments are written
    /// through `System.History`.
    pub fn writes_comments(self) -> bool {
        (self.major, self.minor) >= (5, 1)
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What a tracker call came to, when not what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The token could not be read.
    #[error("tracker token: {0}")]
    Token(String),
    /// TLS settings could not be built.
    #[error("tracker TLS: {0}")]
    Tls(String),
    /// No answer (DNS, connect, TLS, timeout).
    #[error("tracker {url} unreachable: {reason}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// Why.
        reason: String,
    },
    /// 401 or 403: the token is wrong, expired or lacks a scope.
    #[error("tracker refused the access token ({status}): {message}; check tracker.token_file and the token's scopes (Work Items: Read & write; Project and Team: Read)")]
    Auth {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// 404: a missing project, work item or work item type.
    #[error("not found on the tracker: {0}")]
    NotFound(String),
    /// 412 on a `test /rev`: the item changed since it was read.
    #[error("work item {0} changed since it was read")]
    Conflict(u64),
    /// 429 or 503 persisting past the retries made here.
    #[error("tracker busy ({status}): retry after {after:?}")]
    Busy {
        /// HTTP status.
        status: u16,
        /// How long the server asked to wait.
        after: Duration,
    },
    /// Any other refusal (400 on a bad field, a rule, …), with the server's message.
    #[error("tracker refused the request ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// 400: an identity field names someone the tracker does not know.
    #[error("tracker does not know the identity in {field}: {message}")]
    UnknownIdentity {
        /// The field's reference name (`System.AssignedTo`).
        field: String,
        /// The server's message, naming the identity.
        message: String,
    },
    /// The answer could not be read.
    #[error("tracker answer unreadable: {0}")]
    Protocol(String),
}

impl TrackerError {
    /// Whether the same call may succeed later without anything changing here.
    pub fn is_transient(&self) -> bool {
        matches!(self, TrackerError::Unreachable { .. } | TrackerError::Busy { .. })
    }
}

/// One entry of the reporting revisions feed.
#[derive(Debug, Clone, PartialEq)]
pub struct Revision {
    /// Work item id.
    pub id: u64,
    /// Its revision.
    pub rev: u64,
}

/// One page of the reporting revisions feed.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionPage {
    /// Revisions in feed order.
    pub revisions: Vec<Revision>,
    /// Token to read on from.
    pub continuation: String,
    /// Whether this was the last page for now.
    pub last: bool,
}

/// A comment the tracker stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedComment {
    /// Comment id (on 5.0: the revision that carried it).
    pub id: String,
    /// The work item's revision after the write, when the answer says.
    pub rev: Option<u64>,
}

/// An uploaded attachment.
#[derive(Debug, Clone, PartialEq)]
pub struct Uploaded {
    /// Attachment GUID.
    pub id: String,
    /// Its URL (for an `AttachedFile` relation).
    pub url: String,
}

/// A connected tracker: a cheap-`Clone` handle.
#[derive(Clone)]
pub struct Tracker {
    rest: Arc<Rest>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("url", &self.rest.base)
            .field("version", &self.rest.version.to_string())
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// Reads the token, builds the TLS client and checks the server with one request: it
    /// answers (reachable), accepts the token, and speaks the configured `api_version` or, when
    /// none is set, the version its own gate names.
    pub async fn connect(settings: &TrackerSettings) -> Result<Tracker, TrackerError> {
        let pat = client::read_token(settings)?;
        let configured = match settings.api_version.as_deref() {
            Some(text) => Some(ApiVersion::parse(text).ok_or_else(|| TrackerError::Refused {
                status: 0,
                message: format!("tracker.api_version {text:?} must look like 5.0, 6.0, 7.0 or 7.1"),
            })?),
            None => None,
        };
        let mut rest = Rest::new(settings, &pat, configured.unwrap_or(LATEST_KNOWN))?;
        let ask = rest.version;
        match (rest.probe(ask).await?, configured) {
            (None, _) => {}
            (Some(latest), Some(set)) => {
                return Err(TrackerError::Refused {
                    status: 400,
                    message: format!(
                        "tracker.api_version = \"{set}\" is newer than {} supports (its latest REST API version is \
                         {latest}): set tracker.api_version = \"{latest}\", or remove it to use what the server answers",
                        rest.base
                    ),
                });
            }
            (Some(latest), None) => {
                if latest < OLDEST_KNOWN {
                    return Err(too_old(&rest.base, latest));
                }
                // Confirm the named version is served before relying on it.
                let speak = match rest.probe(latest).await {
                    Ok(None) => latest,
                    Ok(Some(again)) => {
                        return Err(TrackerError::Protocol(format!(
                            "{} named {latest} as its latest REST API version, then refused it naming {again}",
                            rest.base
                        )))
                    }
                    // Azure DevOps Server 2020 names 6.1, which it serves only as
                    // `6.1-preview`. relay speaks the highest released version below it rather
                    // than the preview: the versioning guidelines let a preview change or be
                    // deactivated, while a released version stays, and the supported-versions
                    // table gives Server 2020 as 6.0.
                    Err(TrackerError::Refused { status: 400, message }) if client::is_preview_refusal(&message) => {
                        let below = client::released_below(latest).ok_or_else(|| TrackerError::Refused {
                            status: 400,
                            message: format!(
                                "{} serves its latest REST API version {latest} only as a preview, and relay knows no \
                                 released version below it: {message}",
                                rest.base
                            ),
                        })?;
                        if let Some(again) = rest.probe(below).await? {
                            return Err(TrackerError::Protocol(format!(
                                "{} named {latest} as its latest REST API version, then refused {below} naming {again}",
                                rest.base
                            )));
                        }
                        below
                    }
                    Err(e) => return Err(e),
                };
                if speak < OLDEST_KNOWN {
                    return Err(too_old(&rest.base, speak));
                }
                rest.version = speak;
            }
        }
        tracing::info!(url = %rest.base, version = %rest.version, "tracker connected");
        Ok(Tracker { rest: Arc::new(rest) })
    }

    /// The REST API version spoken.
    pub fn version(&self) -> ApiVersion {
        self.rest.version
    }

    /// The base URL (collection or organisation), without a trailing `/`.
    pub fn url(&self) -> &str {
        &self.rest.base
    }

    /// The token's user as `Display Name <unique name>` (connection data), for `relay doctor`.
    pub async fn user(&self) -> Result<String, TrackerError> {
        // The location resource is versioned apart from work items; `-preview` takes its latest.
        let url = format!(
            "{}?api-version={}-preview",
            self.rest.collection_url("connectionData"),
            self.rest.version
        );
        let v = self.rest.json(&Req::get(url)).await?;
        let user = v
            .get("authenticatedUser")
            .ok_or_else(|| TrackerError::Protocol("connection data without authenticatedUser".into()))?;
        let name = user
            .get("providerDisplayName")
            .or_else(|| user.get("customDisplayName"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let account = user
            .pointer("/properties/Account/$value")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Ok(match (name.is_empty(), account.is_empty()) {
            (false, false) => format!("{name} <{account}>"),
            (false, true) => name.to_owned(),
            (true, false) => account.to_owned(),
            (true, true) => user
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or("unknown user")
                .to_owned(),
        })
    }

    /// The project's id; `NotFound` when the collection has no such project.
    pub async fn check_project(&self, project: &str) -> Result<String, TrackerError> {
        let url = format!(
            "{}?{}",
            self.rest.collection_url(&format!("projects/{}", enc(project))),
            self.rest.api()
        );
        let v = self.rest.json(&Req::get(url)).await.map_err(|e| match e {
            TrackerError::NotFound(m) => {
                TrackerError::NotFound(format!("project {project:?} on {}: {m}", self.rest.base))
            }
            other => other,
        })?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| TrackerError::Protocol(format!("project {project:?} answered without an id")))
    }

    /// The project's work item types, each with its states and their categories
    /// (`Proposed`, `InProgress`, `Resolved`, `Completed`, `Removed`).
    pub async fn work_item_types(&self, project: &str) -> Result<Vec<(String, Vec<(String, String)>)>, TrackerError> {
        let url = format!(
            "{}?{}",
            self.rest.project_url(project, "wit/workitemtypes"),
            self.rest.api()
        );
        let v = self.rest.json(&Req::get(url)).await?;
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(v.get("value")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let states = t
                    .get("states")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| Some((text(s, "name")?, text(s, "category").unwrap_or_default())))
                    .collect();
                Some((text(t, "name")?, states))
            })
            .collect())
    }

    /// The work item with its relations and every comment (oldest first); `None` when it does
    /// not exist or was deleted.
    pub async fn read_item(&self, id: u64) -> Result<Option<WorkItem>, TrackerError> {
        let url = format!(
            "{}?$expand=relations&{}",
            self.rest.collection_url(&format!("wit/workitems/{id}")),
            self.rest.api()
        );
        let doc = match self.rest.json(&Req::get(url)).await {
            Ok(doc) => doc,
            Err(TrackerError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut item = work_item(&doc)?;
        let project = item.project_key.clone();
        match comments::read_all(&self.rest, &project, id).await {
            Ok(list) => item.comments = list,
            // Deleted between the two reads.
            Err(TrackerError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
        Ok(Some(item))
    }

    /// The current revision of work item `id` (one small read: `fields=System.Rev`); `None`
    /// when it does not exist or was deleted.
    pub async fn item_rev(&self, id: u64) -> Result<Option<u64>, TrackerError> {
        let url = format!(
            "{}?fields=System.Rev&{}",
            self.rest.collection_url(&format!("wit/workitems/{id}")),
            self.rest.api()
        );
        match self.rest.json(&Req::get(url)).await {
            Ok(doc) => Ok(doc.get("rev").and_then(Value::as_u64)),
            Err(TrackerError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One page of the project's reporting revisions feed, from `continuation`; a first read
    /// (no continuation) starts after `start_ms` (unix ms, e.g. when the connection started)
    /// when given, else at the start of the project's history.
    pub async fn revisions(
        &self,
        project: &str,
        continuation: Option<&str>,
        start_ms: Option<u64>,
    ) -> Result<RevisionPage, TrackerError> {
        feed::revisions(&self.rest, project, continuation, start_ms).await
    }

    /// Ids of the project's work items matching the WIQL condition `where_clause` (all when
    /// `None`), ascending.
    pub async fn query_ids(&self, project: &str, where_clause: Option<&str>) -> Result<Vec<u64>, TrackerError> {
        feed::query_ids(&self.rest, project, where_clause).await
    }

    /// The item of `project` this token's user created since `since_ms` (unix ms: when the
    /// create was first attempted) whose relations hold a `Hyperlink` to exactly `url` (the
    /// marker of a create whose answer was lost). No fixed window: the search starts the day
    /// before `since_ms`'s, for time zones, however long ago that was.
    pub async fn find_by_hyperlink(
        &self,
        project: &str,
        url: &str,
        since_ms: u64,
    ) -> Result<Option<u64>, TrackerError> {
        feed::find_by_hyperlink(&self.rest, project, url, since_ms).await
    }

    /// Every `Hyperlink` URL of the project's items this token's user created since
    /// `since_ms` (as in [`Tracker::find_by_hyperlink`]), with the lowest id carrying it:
    /// [`Tracker::find_by_hyperlink`] for many URLs at once.
    pub async fn hyperlinks_created(
        &self,
        project: &str,
        since_ms: u64,
    ) -> Result<std::collections::HashMap<String, u64>, TrackerError> {
        feed::hyperlinks_created(&self.rest, project, since_ms).await
    }

    /// Creates a work item of `type_name` in `project` from a JSON Patch document.
    pub async fn create(&self, project: &str, type_name: &str, patch: &Value) -> Result<WorkItem, TrackerError> {
        let url = format!(
            "{}?{}{}",
            self.rest
                .project_url(project, &format!("wit/workitems/${}", enc(type_name))),
            self.rest.api(),
            self.expand_relations()
        );
        let mut req = Req::patch(Method::POST, url, patch, None);
        // A second create after a lost answer would be a second item.
        req.idempotent = false;
        let doc = self.rest.json(&req).await.map_err(|e| match e {
            TrackerError::NotFound(m) => {
                TrackerError::NotFound(format!("work item type {type_name:?} in project {project:?}: {m}"))
            }
            other => other,
        })?;
        work_item(&doc)
    }

    /// Applies a JSON Patch document to work item `id`; a failing `test /rev` is `Conflict`.
    pub async fn update(&self, id: u64, patch: &Value) -> Result<WorkItem, TrackerError> {
        let url = format!(
            "{}?{}{}",
            self.rest.collection_url(&format!("wit/workitems/{id}")),
            self.rest.api(),
            self.expand_relations()
        );
        let doc = self.rest.json(&Req::patch(Method::PATCH, url, patch, Some(id))).await?;
        work_item(&doc)
    }

    /// Adds an HTML comment: through the comments API where the server has one (5.1 and
    /// later), else as a `System.History` entry, whose revision is then the comment's id.
    pub async fn add_comment(&self, project: &str, id: u64, html: &str) -> Result<AddedComment, TrackerError> {
        if self.rest.version.writes_comments() {
            return comments::add(&self.rest, project, id, html).await;
        }
        let patch = json!([{"op": "add", "path": "/fields/System.History", "value": html}]);
        let item = self.update(id, &patch).await?;
        let rev = item.rev.ok_or_else(|| {
            TrackerError::Protocol(format!("work item {id} answered a History write without its rev"))
        })?;
        Ok(AddedComment {
            id: rev.to_string(),
            rev: Some(rev),
        })
    }

    /// The URL a link to work item `id` of this tracker names (`{collection}/_apis/wit/workItems/{id}`).
    pub fn work_item_url(&self, id: u64) -> String {
        self.rest.collection_url(&format!("wit/workItems/{id}"))
    }

    /// Gives each link without a URL (one a script made) the URL of its work item here.
    pub fn fill_link_urls(&self, links: &mut [crate::sync::workitem::WorkLink]) {
        for l in links.iter_mut().filter(|l| l.url.is_none()) {
            l.url = Some(self.work_item_url(l.target));
        }
    }

    /// Whether comments can be edited and deleted (the comments API, 5.1 and later); on
    /// older servers they are `System.History` entries, which never change.
    pub fn edits_comments(&self) -> bool {
        self.rest.version.writes_comments()
    }

    /// Replaces a comment's text (see [`Tracker::edits_comments`]).
    pub async fn update_comment(&self, project: &str, id: u64, comment: &str, html: &str) -> Result<(), TrackerError> {
        comments::update(&self.rest, project, id, comment, html).await
    }

    /// Deletes a comment (see [`Tracker::edits_comments`]).
    pub async fn delete_comment(&self, project: &str, id: u64, comment: &str) -> Result<(), TrackerError> {
        comments::delete(&self.rest, project, id, comment).await
    }

    /// Uploads an attachment (chunked above [`attachments::SIMPLE_UPLOAD_MAX`]) and answers
    /// its id and URL for an `AttachedFile` relation.
    pub async fn upload_attachment(
        &self,
        project: &str,
        filename: &str,
        bytes: &[u8],
    ) -> Result<Uploaded, TrackerError> {
        attachments::upload(&self.rest, project, filename, bytes).await
    }

    /// The attachment id of `url` when it is an attachment of this tracker (on its configured
    /// URL or another of the same organisation), as an HTML field's inline image links it.
    pub async fn attachment_id(&self, url: &str) -> Option<String> {
        attachment_path_id(url)?;
        self.rest.resolve_url(url).await?;
        attachment_path_id(url)
    }

    /// [`Tracker::attachment_id`] among the URLs known without asking the server.
    pub fn known_attachment_id(&self, url: &str) -> Option<String> {
        attachment_path_id(url)?;
        self.rest.local_url(url)?;
        attachment_path_id(url)
    }

    /// Downloads an attachment of this tracker, refusing more than `max_bytes`.
    pub async fn download_attachment(&self, url: &str, max_bytes: usize) -> Result<bytes::Bytes, TrackerError> {
        attachments::download(&self.rest, url, max_bytes).await
    }

    /// `&$expand=relations` where create and update take it (6.0 and later), so their answer
    /// carries the attachments too.
    fn expand_relations(&self) -> &'static str {
        if self.rest.version >= (ApiVersion { major: 6, minor: 0 }) {
            "&$expand=relations"
        } else {
            ""
        }
    }
}

/// A work item answer as the model, or why it could not be read.
fn work_item(doc: &Value) -> Result<WorkItem, TrackerError> {
    let item = WorkItem::from_ado(doc).map_err(|e| TrackerError::Protocol(e.to_string()))?;
    if item.id.is_none() || item.rev.is_none() {
        return Err(TrackerError::Protocol("a work item answer without id or rev".into()));
    }
    Ok(item)
}

/// The refusal of a server whose newest REST API version is older than relay speaks.
fn too_old(base: &str, version: ApiVersion) -> TrackerError {
    TrackerError::Refused {
        status: 400,
        message: format!(
            "{base} speaks REST API {version}; relay needs {OLDEST_KNOWN} (Azure DevOps Server 2019) or later"
        ),
    }
}

/// The id in an attachment URL's path (`…/_apis/wit/attachments/{id}?fileName=…`).
fn attachment_path_id(url: &str) -> Option<String> {
    const PATH: &str = "/_apis/wit/attachments/";
    let at = url.to_ascii_lowercase().find(PATH)?;
    let id = url[at + PATH.len()..].split(['?', '/', '#']).next()?;
    (!id.is_empty()).then(|| id.to_owned())
}
