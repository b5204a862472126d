//! Wire types between agent and node, their limits and version: the only module that knows
//! bincode.
//!
//! Every request and response body on the agent-facing listener is a bincode-encoded value of
//! one of these types, carrying [`PROTOCOL_VERSION`] first so either end can refuse a peer it
//! does not understand. Errors travel as JSON [`ErrorBody`] so they stay readable with curl.

use serde::{Deserialize, Serialize};

/// Version of the wire format; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;
/// Content type of bincode bodies.
pub const CONTENT_TYPE: &str = "application/x-relay-bincode";
/// Header naming the protocol version on every request.
pub const VERSION_HEADER: &str = "relay-protocol";
/// Header on every poll: the largest payload the agent stores (its `queue.max_payload_bytes`),
/// so the node never sends a message the agent cannot take. A header rather than a field keeps
/// the wire format, and so [`PROTOCOL_VERSION`], unchanged; a node that does not know it
/// ignores it.
pub const MAX_PAYLOAD_HEADER: &str = "relay-max-payload";

/// Path: redeem an invitation.
pub const REDEEM_PATH: &str = "/v1/redeem";
/// Path: long-poll for messages.
pub const POLL_PATH: &str = "/v1/poll";
/// Path: push a batch of messages.
pub const PUSH_PATH: &str = "/v1/push";
/// Path: check a credential without moving any message (`relay doctor`).
pub const CHECK_PATH: &str = "/v1/check";

/// Largest redeem request body.
pub const MAX_REDEEM_BYTES: usize = 16 * 1024;
/// Largest poll request body.
pub const MAX_POLL_REQUEST_BYTES: usize = 4 * 1024;
/// Most messages in one batch.
pub const MAX_BATCH_MESSAGES: usize = 512;
/// Payload bytes above which a batch is cut (a single larger message still travels alone).
pub const BATCH_TARGET_BYTES: usize = 4 * 1024 * 1024;
/// Longest wait a node grants a long-poll, whatever the agent asks.
pub const MAX_POLL_WAIT_MS: u64 = 120_000;
/// The largest `queue.max_payload_bytes` a configuration may set.
pub const MAX_PAYLOAD_BYTES: u64 = 256 * 1024 * 1024;
/// Longest message id ([`valid_message_id`]).
pub const MAX_ID_BYTES: usize = 128;
/// Longest content type ([`valid_content_type`]).
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Encoded size of one message beyond its payload, at most: id and content type at their
/// longest, and a varint (≤ 9 bytes) for each of seq, time and the three lengths.
const MESSAGE_OVERHEAD_BYTES: usize = MAX_ID_BYTES + MAX_CONTENT_TYPE_BYTES + 5 * 9;
/// Overhead allowed on top of payload bytes in a batch: every message at its largest
/// overhead, plus the envelope (version, count, state, high-water mark).
pub const BATCH_OVERHEAD_BYTES: usize = MAX_BATCH_MESSAGES * MESSAGE_OVERHEAD_BYTES + 1024;

/// Upper bound of an encoded batch, given the largest payload accepted. A batch is cut at
/// [`BATCH_TARGET_BYTES`] of payload unless its first message alone is larger (and then it
/// travels alone), so its payload never exceeds the larger of the two.
pub const fn max_batch_bytes(max_payload: usize) -> usize {
    let payload = if max_payload > BATCH_TARGET_BYTES {
        max_payload
    } else {
        BATCH_TARGET_BYTES
    };
    payload + BATCH_OVERHEAD_BYTES
}

/// The decoder's (and encoder's) size limit: the largest batch the largest allowed payload
/// limit can produce, so no configuration can build a batch its peer refuses to decode.
pub const MAX_ENCODED_BYTES: usize = max_batch_bytes(MAX_PAYLOAD_BYTES as usize);

/// One queued payload on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireMessage {
    /// Sender's per-connection sequence number.
    pub seq: u64,
    /// Stable id (the webhook's `Idempotency-Key`).
    pub id: String,
    /// Content type as submitted.
    pub content_type: String,
    /// When the sender accepted it (unix milliseconds).
    pub enqueued_at_ms: u64,
    /// The payload.
    #[serde(with = "serde_bytes_vec")]
    pub body: Vec<u8>,
}

/// The agent redeems an invitation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RedeemRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Public invitation id (hex).
    pub invitation_id: String,
    /// The one-time secret from the code.
    pub secret: Vec<u8>,
    /// Random per redemption attempt; a retry with the same nonce re-issues the credential.
    pub client_nonce: String,
    /// The agent's instance short name.
    pub instance_name: String,
    /// The agent's host name.
    pub host: String,
}

/// The node accepted a redemption.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RedeemResponse {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Connection name on the node.
    pub connection: String,
    /// The node side's instance short name.
    pub node_instance: String,
    /// What the node calls the agent's instance.
    pub remote_instance: String,
    /// Description.
    pub description: String,
    /// Configuration mode (`script`).
    pub mode: String,
    /// Public side's project for incoming sync.
    pub project: String,
    /// Long-lived credential for this connection (≥ 256 bits).
    pub credential: String,
}

/// The agent asks for messages after its high-water mark, which acknowledges everything up to
/// it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PollRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Highest sequence number the agent has made durable.
    pub after: u64,
    /// How long the node may hold the request when nothing is queued.
    pub wait_ms: u64,
}

/// What the node says about the connection in every poll answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum LinkState {
    /// Messages flow.
    Active,
    /// The node's administrator paused delivery; messages keep queuing.
    Deactivated,
}

/// Messages for the agent (possibly none, when the wait passed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PollResponse {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Connection state on the node.
    pub state: LinkState,
    /// Messages in sequence order.
    pub messages: Vec<WireMessage>,
    /// The largest payload the node accepts, so the agent refuses larger ones at its intake.
    pub max_payload_bytes: u64,
}

/// The agent sends a batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Messages in sequence order.
    pub messages: Vec<WireMessage>,
}

/// The node made the batch durable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushResponse {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Highest sequence number the node holds durably from this agent.
    pub high_water: u64,
    /// Connection state on the node.
    pub state: LinkState,
}

/// The node's answer to a credential check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckResponse {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The connection the credential belongs to, on the node.
    pub connection: String,
    /// Its state.
    pub state: LinkState,
}

/// JSON error body, on both the agent-facing and the local API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// Stable machine-readable code (see [`codes`]).
    pub code: String,
}

/// Stable error codes.
pub mod codes {
    /// The credential was revoked by the node's administrator.
    pub const REVOKED: &str = "revoked";
    /// The credential is unknown.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The invitation id is unknown.
    pub const UNKNOWN_INVITATION: &str = "unknown_invitation";
    /// The secret does not match.
    pub const WRONG_SECRET: &str = "wrong_secret";
    /// Too many wrong secrets.
    pub const LOCKED: &str = "invitation_locked";
    /// The invitation has expired.
    pub const EXPIRED: &str = "invitation_expired";
    /// The invitation was already redeemed.
    pub const ALREADY_REDEEMED: &str = "already_redeemed";
    /// Peer speaks another protocol version.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// Body could not be decoded.
    pub const BAD_REQUEST: &str = "bad_request";
    /// Body too large.
    pub const TOO_LARGE: &str = "payload_too_large";
    /// Queue full by count.
    pub const QUEUE_FULL: &str = "queue_full";
    /// Queue full by bytes.
    pub const QUEUE_FULL_BYTES: &str = "queue_full_bytes";
    /// Storage failed.
    pub const STORAGE: &str = "storage_failed";
    /// No such connection.
    pub const UNKNOWN_CONNECTION: &str = "unknown_connection";
    /// No such route.
    pub const NOT_FOUND: &str = "not_found";
    /// Method not allowed.
    pub const METHOD: &str = "method_not_allowed";
    /// Missing or wrong bearer token on the local API.
    pub const TOKEN: &str = "unauthorized";
    /// The connection cannot take messages in its state.
    pub const CONNECTION_STATE: &str = "connection_state";
    /// Shutting down.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// A local listener does not answer to the host the request names (421).
    pub const UNKNOWN_HOST: &str = "unknown_host";
    /// A local listener refused what a browser sent on behalf of another site (403).
    pub const CROSS_SITE: &str = "cross_site";
    /// A push reuses sequence numbers the node already holds for other messages (an agent data
    /// directory restored from a backup or copied): nothing was stored, and the agent must not
    /// remove anything.
    pub const SEQUENCE_CONFLICT: &str = "sequence_conflict";
}

/// A content type relay accepts: 1–255 visible ASCII characters or spaces (it becomes an
/// HTTP header on the way out).
pub fn valid_content_type(ct: &str) -> bool {
    !ct.is_empty() && ct.len() <= MAX_CONTENT_TYPE_BYTES && ct.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

/// A message id relay accepts: 1–128 of `A–Z a–z 0–9 - _ .`.
pub fn valid_message_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A batch must be in strictly increasing sequence order, each message within limits and
/// with an id and content type that can travel as HTTP headers.
pub fn check_messages(messages: &[WireMessage], max_payload: usize) -> Result<(), String> {
    if messages.len() > MAX_BATCH_MESSAGES {
        return Err(format!(
            "batch of {} messages exceeds {MAX_BATCH_MESSAGES}",
            messages.len()
        ));
    }
    let mut last = 0;
    for m in messages {
        if m.seq <= last {
            return Err(format!("sequence numbers must increase (saw {} after {last})", m.seq));
        }
        last = m.seq;
        if m.body.len() > max_payload {
            return Err(format!(
                "message {} is larger than the limit of {max_payload} bytes",
                m.seq
            ));
        }
        if !valid_message_id(&m.id) || !valid_content_type(&m.content_type) {
            return Err(format!("message {} has a malformed id or content type", m.seq));
        }
    }
    Ok(())
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Not valid bincode for the expected type.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which type was expected.
        what: &'static str,
        /// Decoder's message.
        detail: String,
    },
    /// Another protocol version.
    #[error("peer speaks protocol version {0}; this relay speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// A value could not be encoded (larger than [`MAX_ENCODED_BYTES`]).
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// Which type.
        what: &'static str,
        /// Encoder's message.
        detail: String,
    },
}

fn bincode_config() -> impl bincode::config::Config {
    // Explicit limit: a hostile length prefix cannot make the decoder allocate more than this.
    bincode::config::standard().with_limit::<MAX_ENCODED_BYTES>()
}

/// Encodes a wire value; fails (rather than sending an empty body) when it is larger than
/// the peer could decode.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    encode_within(value, MAX_ENCODED_BYTES)
}

fn encode_within<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, ProtocolError> {
    let what = std::any::type_name::<T>().rsplit("::").next().unwrap_or("value");
    let raw = bincode::serde::encode_to_vec(value, bincode_config()).map_err(|e| ProtocolError::Encode {
        what,
        detail: e.to_string(),
    })?;
    // bincode applies its limit when decoding only: check here, so the peer never receives a
    // body it would refuse.
    if raw.len() > limit {
        return Err(ProtocolError::Encode {
            what,
            detail: format!("{} bytes is more than the {limit} bytes a peer decodes", raw.len()),
        });
    }
    Ok(raw)
}

/// Decodes a wire value, refusing trailing bytes.
pub fn decode<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, ProtocolError> {
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, bincode_config()).map_err(|e| ProtocolError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(ProtocolError::Malformed {
            what,
            detail: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}

/// Checks a decoded version field.
pub fn check_version(version: u16) -> Result<(), ProtocolError> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::Version(version))
    }
}

/// Serialises `Vec<u8>` as one byte string instead of a sequence of numbers.
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(n: usize) -> PushRequest {
        PushRequest {
            version: PROTOCOL_VERSION,
            messages: (0..n as u64)
                .map(|i| WireMessage {
                    seq: i + 1,
                    id: format!("id-{i}"),
                    content_type: "application/json".into(),
                    enqueued_at_ms: 1_700_000_000_000 + i,
                    body: vec![i as u8; 1024],
                })
                .collect(),
        }
    }

    #[test]
    fn batch_round_trip_is_compact() {
        let b = batch(10);
        let raw = encode(&b).unwrap();
        assert!(raw.len() < 10 * (1024 + 64), "{} bytes", raw.len());
        assert_eq!(decode::<PushRequest>("batch", &raw).unwrap(), b);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut raw = encode(&batch(1)).unwrap();
        raw.push(0);
        assert!(decode::<PushRequest>("batch", &raw).is_err());
    }

    #[test]
    fn hostile_length_prefix_does_not_allocate() {
        // version 1, then a message count claiming u64::MAX entries.
        let raw = [1u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<PushRequest>("batch", &raw).is_err());
    }

    /// The largest message a batch can carry, with every field at its longest.
    fn widest(seq: u64, body: usize) -> WireMessage {
        WireMessage {
            seq: u64::MAX - 1000 + seq,
            id: "i".repeat(MAX_ID_BYTES),
            content_type: "t".repeat(MAX_CONTENT_TYPE_BYTES),
            enqueued_at_ms: u64::MAX,
            body: vec![7; body],
        }
    }

    #[test]
    fn the_widest_batches_fit_their_bound() {
        // Many small messages up to the batch target, each with the longest id and type.
        let each = BATCH_TARGET_BYTES / MAX_BATCH_MESSAGES;
        let many = PushRequest {
            version: PROTOCOL_VERSION,
            messages: (0..MAX_BATCH_MESSAGES as u64).map(|i| widest(i, each)).collect(),
        };
        let raw = encode(&many).unwrap();
        assert!(
            raw.len() <= max_batch_bytes(each),
            "{} > {}",
            raw.len(),
            max_batch_bytes(each)
        );
        // One message above the target travels alone.
        let big = BATCH_TARGET_BYTES + 1000;
        let alone = PollResponse {
            version: PROTOCOL_VERSION,
            state: LinkState::Active,
            messages: vec![widest(0, big)],
            max_payload_bytes: u64::MAX,
        };
        let raw = encode(&alone).unwrap();
        assert!(raw.len() <= max_batch_bytes(big));
        assert_eq!(decode::<PollResponse>("poll", &raw).unwrap(), alone);
    }

    // A configuration at the largest payload limit still produces batches the decoder takes.
    const _: () = assert!(max_batch_bytes(MAX_PAYLOAD_BYTES as usize) <= MAX_ENCODED_BYTES);

    #[test]
    fn encoding_beyond_the_limit_fails_loudly() {
        let err = encode_within(&batch(2), 1000).unwrap_err();
        assert!(err.to_string().starts_with("cannot encode PushRequest: "), "{err}");
        assert!(encode_within(&batch(2), 10_000).is_ok());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<PushRequest>("batch", &raw);
            let _ = decode::<PollResponse>("poll", &raw);
            let _ = decode::<RedeemRequest>("redeem", &raw);
        }

        #[test]
        fn poll_round_trip(after in any::<u64>(), wait in any::<u64>()) {
            let p = PollRequest { version: PROTOCOL_VERSION, after, wait_ms: wait };
            prop_assert_eq!(decode::<PollRequest>("poll", &encode(&p).unwrap()).unwrap(), p);
        }
    }
}
