//! The node's persistent registry: connections, their invitations and credentials. Secrets are
//! kept only as SHA-256 hashes and compared in constant time.
//!
//! A connection's record changes only by compare-and-swap on what was read, so replicas
//! sharing one database never lose each other's changes: two redeems of one invitation, on
//! any replicas, cannot both succeed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::crypto;
use crate::error::{Kind, OpError, OpResult};
use crate::invite::Invitation;
use crate::protocol::{codes, RedeemRequest, RedeemResponse, PROTOCOL_VERSION};
use crate::status::{now_ms, ConnectionStatus};
use crate::store::{get_json, AnyStore, AnyTable, NodeStore, NodeTable, QueueError, QueueStats};

/// Wrong secrets after which an invitation is locked.
pub const MAX_FAILED_ATTEMPTS: u32 = 5;
/// How long after a redemption the same client nonce may redeem again (the agent lost the
/// answer and retries); only until the credential is first used. Later, or once the agent
/// has authenticated, a retry is "already redeemed": it must not outlive the expiry nor
/// replace a credential in use.
pub const REDEEM_RETRY_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Credential prefix, so a leaked one is recognisable.
const CREDENTIAL_PREFIX: &str = "rlycred1_";

/// The public side's "initiate connection" form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitiateRequest {
    /// Connection name.
    pub name: String,
    /// This (public) instance's short name.
    pub local_name: String,
    /// The destination (private) instance's short name.
    pub remote_name: String,
    /// Description.
    pub description: String,
    /// Configuration mode; only `script` for now.
    pub mode: String,
    /// Project for incoming sync on the public side.
    pub project: String,
    /// Invitation lifetime (default from settings).
    #[serde(with = "humantime_serde", default)]
    pub expires: Option<Duration>,
    /// Webhook for payloads from the agent.
    pub deliver_to: Option<String>,
}

impl InitiateRequest {
    /// A `script` connection `name` from `local_name` to `remote_name` for `project`, with no
    /// description, the default invitation lifetime and no webhook yet.
    pub fn script(name: &str, local_name: &str, remote_name: &str, project: &str) -> InitiateRequest {
        InitiateRequest {
            name: name.into(),
            local_name: local_name.into(),
            remote_name: remote_name.into(),
            description: String::new(),
            mode: "script".into(),
            project: project.into(),
            expires: None,
            deliver_to: None,
        }
    }
}

/// Operator actions on a connection.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Pause delivery both ways; messages keep queuing.
    Deactivate,
    /// Resume delivery.
    Activate,
    /// Kill the credential for good.
    Revoke,
}

/// The invitation part of a connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvitationRecord {
    /// Public id (hex).
    pub id: String,
    /// SHA-256 of the one-time secret (hex).
    pub secret_sha256: String,
    /// Expiry (unix seconds).
    pub expires_at: u64,
    /// Wrong secrets so far.
    pub failed_attempts: u32,
    /// The client nonce of the successful redemption.
    pub redeemed_nonce: Option<String>,
    /// When it was redeemed (unix ms).
    pub redeemed_at_ms: Option<u64>,
}

/// The agent side as it reported itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteInfo {
    /// Instance short name.
    pub instance: String,
    /// Host name.
    pub host: String,
}

/// One connection as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Connection name.
    pub name: String,
    /// Public instance short name.
    pub local_name: String,
    /// Private instance short name as the public admin typed it.
    pub remote_name: String,
    /// Description.
    pub description: String,
    /// Mode.
    pub mode: String,
    /// Project for incoming sync.
    pub project: String,
    /// Webhook for the agent's payloads.
    pub deliver_to: Option<String>,
    /// Created (unix ms).
    pub created_at_ms: u64,
    /// Invitation.
    pub invitation: InvitationRecord,
    /// The agent, once accepted.
    pub remote: Option<RemoteInfo>,
    /// SHA-256 of the current credential (hex), once accepted.
    pub credential_sha256: Option<String>,
    /// When an agent first authenticated with the current credential (unix ms); from then on
    /// the invitation cannot be redeemed again, not even with the same nonce.
    #[serde(default)]
    pub credential_first_used_ms: Option<u64>,
    /// Paused by the administrator.
    pub deactivated: bool,
    /// Revoked for good.
    pub revoked: bool,
}

impl ConnectionRecord {
    /// Accepted by an agent.
    pub fn accepted(&self) -> bool {
        self.remote.is_some()
    }

    /// Messages flow.
    pub fn delivering(&self) -> bool {
        // A revoked connection still hands what it already holds to the webhook; only its
        // credential stops working.
        self.accepted() && !self.deactivated
    }

    /// `pending`, `active`, `deactivated` or `revoked`.
    pub fn state_name(&self) -> &'static str {
        if self.revoked {
            "revoked"
        } else if !self.accepted() {
            "pending"
        } else if self.deactivated {
            "deactivated"
        } else {
            "active"
        }
    }

    /// As `relay node connections` shows it.
    pub fn status(&self, outbound: QueueStats, inbound: QueueStats) -> ConnectionStatus {
        ConnectionStatus {
            name: self.name.clone(),
            state: self.state_name().to_owned(),
            local: self.local_name.clone(),
            remote: match &self.remote {
                Some(r) => format!("{} ({})", r.instance, r.host),
                None => "unknown".to_owned(),
            },
            description: self.description.clone(),
            mode: self.mode.clone(),
            project: self.project.clone(),
            deliver_to: self.deliver_to.clone(),
            last_contact_ms: self.invitation.redeemed_at_ms,
            outbound,
            inbound,
            last_error: None,
            invitation_expires_at: (!self.accepted() && !self.revoked).then_some(self.invitation.expires_at),
            recent_dead_letters: Vec::new(),
            holds: Vec::new(),
            trust: None,
            route: None,
            sync: None,
        }
    }
}

/// What a credential maps to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CredentialRecord {
    connection: String,
}

/// A refusal of the agent-facing API: status, stable code, message.
#[derive(Debug, Clone)]
pub struct Denied {
    /// HTTP status.
    pub status: u16,
    /// Stable code.
    pub code: &'static str,
    /// Message for the agent's operator.
    pub message: String,
}

fn denied(status: u16, code: &'static str, message: impl Into<String>) -> Denied {
    Denied {
        status,
        code,
        message: message.into(),
    }
}

/// The registry tables. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    connections: AnyTable,
    invitations: AnyTable,
    credentials: AnyTable,
}

/// What a change of a connection's record decided: store the record as changed and return
/// `Ok(T)`, or change nothing and return `Err(E)`, or change nothing and return `Ok(T)`.
enum Change<T, E> {
    Write(T),
    Keep(T),
    Refuse(E),
}

impl Registry {
    /// Opens the tables.
    pub async fn open(store: &AnyStore) -> OpResult<Registry> {
        Ok(Registry {
            connections: store.table("node-connections").await?,
            invitations: store.table("node-invitations").await?,
            credentials: store.table("node-credentials").await?,
        })
    }

    /// A connection by name.
    pub async fn get(&self, name: &str) -> OpResult<Option<ConnectionRecord>> {
        Ok(get_json(&self.connections, name).await?)
    }

    /// Every connection, by name.
    pub async fn list(&self) -> OpResult<Vec<ConnectionRecord>> {
        let mut out = Vec::new();
        for (key, raw) in self.connections.list_prefix_raw("").await? {
            out.push(serde_json::from_slice(&raw).map_err(|e| QueueError::Corrupt(format!("{key}: {e}")))?);
        }
        Ok(out)
    }

    /// Reads connection `name`, lets `decide` change it, and stores the change only if no
    /// other writer (another task, another replica) changed the record since it was read;
    /// otherwise reads again and decides again. `None` when there is no such connection.
    async fn change<T, E>(
        &self,
        name: &str,
        mut decide: impl FnMut(&mut ConnectionRecord) -> Change<T, E>,
    ) -> Result<Option<Result<T, E>>, QueueError> {
        loop {
            let Some(raw) = self.connections.get_raw(name).await? else {
                return Ok(None);
            };
            let mut rec: ConnectionRecord = serde_json::from_slice(&raw)
                .map_err(|e| QueueError::Corrupt(format!("node-connections/{name}: {e}")))?;
            let out = match decide(&mut rec) {
                Change::Keep(t) => return Ok(Some(Ok(t))),
                Change::Refuse(e) => return Ok(Some(Err(e))),
                Change::Write(t) => t,
            };
            let fresh = serde_json::to_vec(&rec).map_err(|e| QueueError::Storage(e.to_string()))?;
            if self.connections.compare_and_swap(name, Some(raw), Some(fresh)).await? {
                return Ok(Some(Ok(out)));
            }
        }
    }

    /// Validates the form, stores a pending connection and returns the invitation code.
    pub async fn initiate(&self, req: &InitiateRequest, url: &str, ttl: Duration, pin: [u8; 32]) -> OpResult<String> {
        let invalid = |m: String| OpError::new(Kind::Invalid, m);
        crate::names::check_connection_name(&req.name).map_err(invalid)?;
        crate::names::check_label("--local-name", &req.local_name, false).map_err(invalid)?;
        crate::names::check_label("--remote-name", &req.remote_name, false).map_err(invalid)?;
        crate::names::check_label("--project", &req.project, false).map_err(invalid)?;
        if req.description.len() > 4096 {
            return Err(invalid("--description must be at most 4096 bytes".into()));
        }
        if req.mode != "script" {
            return Err(invalid(format!(
                "configuration mode {:?} is not supported; the only mode is \"script\"",
                req.mode
            )));
        }
        if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(invalid("--expires must be between 1m and 30d".into()));
        }
        if let Some(url) = &req.deliver_to {
            crate::config::check_webhook_url(url).map_err(invalid)?;
        }
        let expires_at = now_ms() / 1000 + ttl.as_secs();
        let invitation =
            Invitation::new(url, expires_at, Some(pin)).map_err(|e| OpError::new(Kind::Config, e.to_string()))?;
        let record = ConnectionRecord {
            name: req.name.clone(),
            local_name: req.local_name.clone(),
            remote_name: req.remote_name.clone(),
            description: req.description.clone(),
            mode: req.mode.clone(),
            project: req.project.clone(),
            deliver_to: req.deliver_to.clone(),
            created_at_ms: now_ms(),
            invitation: InvitationRecord {
                id: invitation.id_hex(),
                secret_sha256: crypto::hex(&crypto::sha256(&invitation.secret)),
                expires_at,
                failed_attempts: 0,
                redeemed_nonce: None,
                redeemed_at_ms: None,
            },
            remote: None,
            credential_sha256: None,
            credential_first_used_ms: None,
            deactivated: false,
            revoked: false,
        };
        // The invitation's index first: a crash before the record leaves an index entry that
        // points at nothing ("no such invitation"), never a record no invitation reaches.
        let index = serde_json::to_vec(&req.name).map_err(|e| QueueError::Storage(e.to_string()))?;
        self.invitations.put_raw(&invitation.id_hex(), index).await?;
        let raw = serde_json::to_vec(&record).map_err(|e| QueueError::Storage(e.to_string()))?;
        if !self.connections.compare_and_swap(&req.name, None, Some(raw)).await? {
            self.invitations.remove(&invitation.id_hex()).await?;
            return Err(OpError::new(
                Kind::Conflict,
                format!("a connection named {:?} already exists", req.name),
            ));
        }
        Ok(invitation.encode())
    }

    /// Redeems an invitation: checks lockout, secret (constant time), expiry and single use,
    /// then issues a fresh credential, durable before this returns.
    pub async fn redeem(&self, req: &RedeemRequest) -> Result<(ConnectionRecord, RedeemResponse), Denied> {
        self.redeem_at(req, now_ms()).await
    }

    /// [`Registry::redeem`] as of `now` (unix ms).
    pub async fn redeem_at(&self, req: &RedeemRequest, now: u64) -> Result<(ConnectionRecord, RedeemResponse), Denied> {
        let storage = |e: QueueError| denied(507, codes::STORAGE, e.to_string());
        let unknown = || {
            denied(
                404,
                codes::UNKNOWN_INVITATION,
                "the node knows no such invitation; ask its administrator for a new one",
            )
        };
        if req.invitation_id.len() != 32 || req.client_nonce.is_empty() || req.client_nonce.len() > 128 {
            return Err(denied(400, codes::BAD_REQUEST, "malformed redeem request"));
        }
        crate::names::check_label("instance name", &req.instance_name, false)
            .and_then(|_| crate::names::check_label("host", &req.host, true))
            .map_err(|m| denied(400, codes::BAD_REQUEST, m))?;
        let name: String = get_json(&self.invitations, &req.invitation_id)
            .await
            .map_err(storage)?
            .ok_or_else(unknown)?;
        let credential = format!(
            "{CREDENTIAL_PREFIX}{}",
            crypto::base32_encode(&crypto::random_bytes::<32>())
        );
        let cred_hash = crypto::hex(&crypto::sha256(credential.as_bytes()));
        let decided = self
            .change(&name, |rec| match judge_redeem(rec, req, now) {
                Judged::Refused(d) => Change::Refuse(d),
                Judged::WrongSecret(d) => Change::Write(Err(d)),
                Judged::Issue => {
                    let old = rec.credential_sha256.replace(cred_hash.clone());
                    rec.invitation.redeemed_nonce = Some(req.client_nonce.clone());
                    rec.invitation.redeemed_at_ms.get_or_insert(now);
                    rec.remote = Some(RemoteInfo {
                        instance: req.instance_name.clone(),
                        host: req.host.clone(),
                    });
                    Change::Write(Ok((rec.clone(), old)))
                }
            })
            .await
            .map_err(storage)?
            .ok_or_else(unknown)?;
        // A wrong secret was counted (stored) before it is refused.
        let (rec, old) = decided??;
        // The credential's record after the connection's: a crash in between leaves an agent
        // without an answer, whose retry (same nonce) is issued a credential again.
        let record = serde_json::to_vec(&CredentialRecord {
            connection: name.clone(),
        })
        .map_err(|e| storage(QueueError::Storage(e.to_string())))?;
        self.credentials.put_raw(&cred_hash, record).await.map_err(storage)?;
        if let Some(old) = old {
            self.credentials.remove(&old).await.map_err(storage)?;
        }
        let resp = RedeemResponse {
            version: PROTOCOL_VERSION,
            connection: rec.name.clone(),
            node_instance: rec.local_name.clone(),
            remote_instance: rec.remote_name.clone(),
            description: rec.description.clone(),
            mode: rec.mode.clone(),
            project: rec.project.clone(),
            credential,
        };
        Ok((rec, resp))
    }

    /// The connection a credential belongs to; revoked and unknown credentials are refused
    /// with distinct codes so the agent can tell its operator which.
    pub async fn authenticate(&self, credential: Option<&str>) -> Result<ConnectionRecord, Denied> {
        let Some(credential) = credential else {
            return Err(denied(401, codes::UNAUTHORIZED, "missing credential"));
        };
        let hash = crypto::hex(&crypto::sha256(credential.as_bytes()));
        let storage = |e: QueueError| denied(507, codes::STORAGE, e.to_string());
        let unknown = || {
            denied(
                401,
                codes::UNAUTHORIZED,
                "the node does not know this credential (the connection was deleted or the node's data was reset)",
            )
        };
        let rec: Option<CredentialRecord> = get_json(&self.credentials, &hash).await.map_err(storage)?;
        let Some(rec) = rec else {
            return Err(unknown());
        };
        let conn: ConnectionRecord = get_json(&self.connections, &rec.connection)
            .await
            .map_err(storage)?
            .ok_or_else(|| denied(401, codes::UNAUTHORIZED, "the connection no longer exists on the node"))?;
        if conn.revoked {
            return Err(denied(
                401,
                codes::REVOKED,
                format!("connection {:?} was revoked by the node administrator", conn.name),
            ));
        }
        // A credential that a retried redeem replaced (its record not yet removed).
        if conn.credential_sha256.as_deref() != Some(hash.as_str()) {
            return Err(unknown());
        }
        if conn.credential_first_used_ms.is_none() {
            return self.record_first_use(conn, &hash).await.map_err(storage);
        }
        Ok(conn)
    }

    /// Notes the first authentication with a credential, once: from then on its invitation
    /// cannot be redeemed again.
    async fn record_first_use(&self, conn: ConnectionRecord, hash: &str) -> Result<ConnectionRecord, QueueError> {
        let at = now_ms();
        let changed = self
            .change::<_, std::convert::Infallible>(&conn.name, |fresh| {
                // A retried redeem may have replaced the credential meanwhile.
                if fresh.credential_sha256.as_deref() != Some(hash) || fresh.credential_first_used_ms.is_some() {
                    return Change::Keep(fresh.clone());
                }
                fresh.credential_first_used_ms = Some(at);
                Change::Write(fresh.clone())
            })
            .await?;
        Ok(match changed {
            Some(Ok(rec)) => rec,
            Some(Err(never)) => match never {},
            None => conn,
        })
    }

    /// Applies an operator action.
    pub async fn set_state(&self, name: &str, action: Action) -> OpResult<ConnectionRecord> {
        let changed = self
            .change(name, |rec| {
                if rec.revoked {
                    return Change::Refuse(OpError::new(
                        Kind::Conflict,
                        format!("connection {name:?} is revoked; initiate a new connection instead"),
                    ));
                }
                match action {
                    Action::Deactivate => rec.deactivated = true,
                    Action::Activate => rec.deactivated = false,
                    // The credential record stays, pointing at a revoked connection, so the
                    // agent learns "revoked" rather than "unknown credential".
                    Action::Revoke => rec.revoked = true,
                }
                Change::Write(rec.clone())
            })
            .await?;
        match changed {
            Some(result) => result,
            None => Err(OpError::new(Kind::NotFound, format!("no connection named {name:?}"))),
        }
    }
}

/// What a redeem request meets in a connection's record.
enum Judged {
    /// Refused, nothing to store.
    Refused(Denied),
    /// A wrong secret: counted in the record (which may lock the invitation), then refused.
    WrongSecret(Denied),
    /// A credential is issued.
    Issue,
}

/// Judges `req` against `rec` as of `now`; a wrong secret is counted in `rec`.
fn judge_redeem(rec: &mut ConnectionRecord, req: &RedeemRequest, now: u64) -> Judged {
    if rec.revoked {
        return Judged::Refused(denied(
            403,
            codes::REVOKED,
            "this connection was revoked by the node administrator",
        ));
    }
    if rec.invitation.failed_attempts >= MAX_FAILED_ATTEMPTS {
        return Judged::Refused(denied(
            403,
            codes::LOCKED,
            format!(
                "the invitation is locked after {MAX_FAILED_ATTEMPTS} wrong secrets; ask the node administrator for a new invitation"
            ),
        ));
    }
    let stored = crypto::from_hex(&rec.invitation.secret_sha256).unwrap_or_default();
    if !crypto::ct_eq(&crypto::sha256(&req.secret), &stored) {
        rec.invitation.failed_attempts += 1;
        let left = MAX_FAILED_ATTEMPTS - rec.invitation.failed_attempts;
        let message = if left == 0 {
            format!("the invitation secret is wrong; the invitation is now locked after {MAX_FAILED_ATTEMPTS} wrong secrets")
        } else {
            format!(
                "the invitation secret is wrong ({left} {} left before the invitation locks)",
                if left == 1 { "attempt" } else { "attempts" }
            )
        };
        let code = if left == 0 { codes::LOCKED } else { codes::WRONG_SECRET };
        return Judged::WrongSecret(denied(403, code, message));
    }
    if let Some(nonce) = &rec.invitation.redeemed_nonce {
        let same = crypto::ct_eq(nonce.as_bytes(), req.client_nonce.as_bytes());
        let redeemed_at = rec.invitation.redeemed_at_ms.unwrap_or(0);
        let recent = now.saturating_sub(redeemed_at) <= REDEEM_RETRY_WINDOW.as_millis() as u64;
        if !same || !recent || rec.credential_first_used_ms.is_some() {
            return Judged::Refused(denied(
                409,
                codes::ALREADY_REDEEMED,
                "this invitation was already redeemed; each code works once: ask the node administrator for a new invitation",
            ));
        }
        // Same nonce, soon after, credential never used: the agent lost our answer. Issue
        // again.
    } else if now / 1000 >= rec.invitation.expires_at {
        return Judged::Refused(denied(
            410,
            codes::EXPIRED,
            "this invitation has expired; ask the node administrator for a new invitation",
        ));
    }
    Judged::Issue
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        registry: Registry,
        invitation: Invitation,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = AnyStore::Sled(crate::store::Store::open(dir.path(), 1 << 20).unwrap());
        let registry = Registry::open(&store).await.unwrap();
        let form = InitiateRequest::script("c", "pub", "priv", "P");
        let code = registry
            .initiate(&form, "https://node.example:8443", Duration::from_secs(3600), [1; 32])
            .await
            .unwrap();
        let invitation = Invitation::decode(&code).unwrap();
        Fixture {
            _dir: dir,
            registry,
            invitation,
        }
    }

    fn request(f: &Fixture, nonce: &str, secret: &[u8]) -> RedeemRequest {
        RedeemRequest {
            version: PROTOCOL_VERSION,
            invitation_id: f.invitation.id_hex(),
            secret: secret.to_vec(),
            client_nonce: nonce.into(),
            instance_name: "agent".into(),
            host: "host".into(),
        }
    }

    const MINUTE_MS: u64 = 60_000;

    #[tokio::test]
    async fn a_lost_answer_is_retried_only_shortly_after_and_before_first_use() {
        let f = fixture().await;
        let t0 = now_ms();
        let secret = f.invitation.secret;
        let (_, first) = f.registry.redeem_at(&request(&f, "n1", &secret), t0).await.unwrap();
        // Another nonce is someone else: refused at once.
        let other = f
            .registry
            .redeem_at(&request(&f, "n2", &secret), t0 + 1)
            .await
            .unwrap_err();
        assert_eq!(other.code, codes::ALREADY_REDEEMED);
        // The same nonce inside the window re-issues; the first credential is gone.
        let inside = t0 + REDEEM_RETRY_WINDOW.as_millis() as u64 - MINUTE_MS;
        let (_, again) = f.registry.redeem_at(&request(&f, "n1", &secret), inside).await.unwrap();
        assert_ne!(again.credential, first.credential);
        assert_eq!(
            f.registry.authenticate(Some(&first.credential)).await.unwrap_err().code,
            codes::UNAUTHORIZED
        );
        // Past the window, measured from the first redemption: already redeemed.
        let outside = t0 + REDEEM_RETRY_WINDOW.as_millis() as u64 + 1;
        let late = f
            .registry
            .redeem_at(&request(&f, "n1", &secret), outside)
            .await
            .unwrap_err();
        assert_eq!(late.code, codes::ALREADY_REDEEMED);
        assert_eq!(late.status, 409);
        // The live credential survived the refused retry.
        f.registry.authenticate(Some(&again.credential)).await.unwrap();
    }

    #[tokio::test]
    async fn once_the_credential_was_used_no_retry_replaces_it() {
        let f = fixture().await;
        let t0 = now_ms();
        let secret = f.invitation.secret;
        let (_, resp) = f.registry.redeem_at(&request(&f, "n1", &secret), t0).await.unwrap();
        let used = f.registry.authenticate(Some(&resp.credential)).await.unwrap();
        let first_use = used.credential_first_used_ms.expect("first use recorded");
        // Recorded once: later authentications leave it as it was.
        let again = f.registry.authenticate(Some(&resp.credential)).await.unwrap();
        assert_eq!(again.credential_first_used_ms, Some(first_use));
        let retry = f
            .registry
            .redeem_at(&request(&f, "n1", &secret), t0 + 1)
            .await
            .unwrap_err();
        assert_eq!(retry.code, codes::ALREADY_REDEEMED);
        f.registry.authenticate(Some(&resp.credential)).await.unwrap();
    }

    #[tokio::test]
    async fn the_lockout_countdown_speaks_proper_english() {
        let f = fixture().await;
        let t0 = now_ms();
        let mut messages: Vec<String> = Vec::new();
        for _ in 0..MAX_FAILED_ATTEMPTS {
            let refused = f.registry.redeem_at(&request(&f, "n1", b"wrong"), t0).await;
            messages.push(refused.unwrap_err().message);
        }
        assert!(messages[0].contains("(4 attempts left"), "{}", messages[0]);
        assert!(messages[3].contains("(1 attempt left"), "{}", messages[3]);
        assert!(messages[4].contains("now locked"), "{}", messages[4]);
    }
}
