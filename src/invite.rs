//! The invitation code: a one-line, copy-paste safe text (`rlyinv1_` + base32) that carries a
//! node's URL, a one-time secret and optionally the node's certificate pin. Pure codec: no I/O,
//! and the clock only arrives as an argument.

use std::fmt;

use crate::crypto::{base32_decode, base32_encode, ct_eq, hex, random_bytes, sha256};

/// Text every version-1 invitation code starts with.
pub const PREFIX: &str = "rlyinv1_";

/// Longest node URL an invitation may carry, in bytes.
pub const MAX_URL_LEN: usize = 512;

/// The payload format version this relay writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// What every code starts with regardless of version; used to tell "not an invitation" apart from
/// "an invitation from a newer relay".
const FAMILY: &str = "rlyinv";

const FLAG_PIN: u8 = 0b0000_0001;
const CHECKSUM_LEN: usize = 4;

/// version + flags + expires + id + secret + url_len + checksum: the smallest payload that can
/// possibly be valid (no pin, empty URL).
const MIN_PAYLOAD_LEN: usize = 1 + 1 + 8 + 16 + 32 + 2 + CHECKSUM_LEN;

/// Base32 characters needed for [`MIN_PAYLOAD_LEN`] bytes; anything shorter cannot be whole.
const MIN_BODY_CHARS: usize = (MIN_PAYLOAD_LEN * 8).div_ceil(5);

/// URLs are echoed in error messages; cap what is shown so a hostile code cannot flood a terminal.
const MAX_URL_SHOWN: usize = 120;

/// Why an invitation code or node URL was refused. Messages are written for the operator who
/// pasted the code and never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    /// Nothing but whitespace was given.
    #[error("the invitation code is empty; paste the whole line that starts with `rlyinv1_`")]
    Empty,

    /// The text does not start with `rlyinv`.
    #[error("this is not a relay invitation code (it should start with `rlyinv1_`)")]
    NotAnInvitation,

    /// The code was made by a relay that uses another format version.
    #[error(
        "this invitation code uses format version {0}, but this relay understands version 1 \
         only; upgrade relay to accept it"
    )]
    UnsupportedVersion(u32),

    /// A character outside the base32 alphabet (a-z, 2-7).
    #[error(
        "the code has an invalid character {character:?} at position {position}; after \
         `rlyinv1_` a code holds only the letters a-z and the digits 2-7 (no 0, 1, 8 or 9), so \
         it was probably mistyped; copy it again"
    )]
    BadCharacter {
        /// 1-based position in the code as shown, whitespace removed, prefix included.
        position: usize,
        /// The offending character.
        character: char,
    },

    /// Too short to hold even the fixed fields.
    #[error("the code is truncated: only {length} characters; copy the whole line")]
    Truncated {
        /// Characters received, whitespace removed, prefix included.
        length: usize,
    },

    /// The checksum does not match the content.
    #[error("the code's checksum does not match: it was mistyped or truncated; copy it again")]
    ChecksumMismatch,

    /// The checksum matched but the content breaks the format: a bug in the relay that made it.
    #[error(
        "the invitation code is malformed ({0}); the relay that made it may be faulty, ask the \
         node administrator for a new invitation"
    )]
    Malformed(&'static str),

    /// The node URL does not use https.
    #[error(
        "the node URL {0} does not use https; relay only connects to nodes over https \
         (it should look like https://relay.example.com:8443)"
    )]
    NotHttps(String),

    /// The node URL is not an acceptable https URL for another reason.
    #[error("the node URL {url} is not valid: {reason}")]
    BadUrl {
        /// The URL, quoted and shortened for display.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The invitation's validity has ended.
    #[error(
        "this invitation expired at {}; ask the node administrator for a new invitation",
        crate::clock::when(expires_at.saturating_mul(1000), now.saturating_mul(1000))
    )]
    Expired {
        /// When it stopped being valid, unix seconds.
        expires_at: u64,
        /// The clock it was checked against, unix seconds.
        now: u64,
    },
}

/// Everything a relay needs to join a node: where it is, how to prove it was invited, until when,
/// and optionally which certificate the node must present.
#[derive(Clone, PartialEq, Eq)]
pub struct Invitation {
    /// Node public base URL without trailing '/', e.g. `https://relay.example.com:8443`.
    pub url: String,
    /// Public invitation id: names the invitation in logs and on the node.
    pub id: [u8; 16],
    /// One-time secret proving possession of the code.
    pub secret: [u8; 32],
    /// End of validity, unix seconds.
    pub expires_at: u64,
    /// SHA-256 of the node certificate's DER SubjectPublicKeyInfo, when the node pins it.
    pub pin: Option<[u8; 32]>,
}

impl fmt::Debug for Invitation {
    // Invitations end up in debug logs; the secret must not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invitation")
            .field("url", &self.url)
            .field("id", &hex(&self.id))
            .field("secret", &"***")
            .field("expires_at", &self.expires_at)
            .field("pin", &self.pin.map(|p| hex(&p)))
            .finish()
    }
}

impl Invitation {
    /// Builds a new invitation with a fresh random id and secret (crate::crypto::random_bytes).
    /// The URL is checked and normalised by [`validate_url`].
    pub fn new(url: &str, expires_at: u64, pin: Option<[u8; 32]>) -> Result<Invitation, InviteError> {
        Ok(Invitation {
            url: validate_url(url)?,
            id: random_bytes::<16>(),
            secret: random_bytes::<32>(),
            expires_at,
            pin,
        })
    }

    /// The invitation as one line of text: [`PREFIX`] followed by lower-case base32.
    ///
    /// Assumes `url` passed [`validate_url`] (as it does for values from [`Invitation::new`] and
    /// [`Invitation::decode`]); a URL longer than 65535 bytes is cut, and [`Invitation::decode`]
    /// then refuses the code.
    pub fn encode(&self) -> String {
        let url = self.url.as_bytes();
        let url = &url[..url.len().min(usize::from(u16::MAX))];
        let url_len = u16::try_from(url.len()).unwrap_or(u16::MAX);

        let mut payload = Vec::with_capacity(MIN_PAYLOAD_LEN + 32 + url.len());
        payload.push(FORMAT_VERSION);
        payload.push(if self.pin.is_some() { FLAG_PIN } else { 0 });
        payload.extend_from_slice(&self.expires_at.to_be_bytes());
        payload.extend_from_slice(&self.id);
        payload.extend_from_slice(&self.secret);
        if let Some(pin) = &self.pin {
            payload.extend_from_slice(pin);
        }
        payload.extend_from_slice(&url_len.to_be_bytes());
        payload.extend_from_slice(url);
        seal(payload)
    }

    /// Parses and checks structure, checksum and URL. Does not check expiry.
    ///
    /// Whitespace anywhere is ignored (codes wrapped across lines in an e-mail still work) and
    /// upper case is accepted.
    pub fn decode(text: &str) -> Result<Invitation, InviteError> {
        let code: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if code.is_empty() {
            return Err(InviteError::Empty);
        }
        let body_start = split_prefix(&code)?;
        let body = code.get(body_start..).ok_or(InviteError::NotAnInvitation)?;
        // The prefix is ASCII, so its byte length is its length in characters.
        let prefix_chars = body_start;

        let payload = match base32_decode(body) {
            Ok(payload) => payload,
            Err(Some(index)) => {
                // Everything before `index` is base32, hence ASCII: byte index = char index.
                let character = body
                    .get(index..)
                    .and_then(|rest| rest.chars().next())
                    .unwrap_or('\u{fffd}');
                return Err(InviteError::BadCharacter {
                    position: prefix_chars + index + 1,
                    character,
                });
            }
            Err(None) if body.len() < MIN_BODY_CHARS => {
                return Err(InviteError::Truncated {
                    length: code.chars().count(),
                })
            }
            // An impossible base32 length or stray trailing bits: a character went missing, was
            // added or was changed at the end.
            Err(None) => return Err(InviteError::ChecksumMismatch),
        };
        if payload.len() < MIN_PAYLOAD_LEN {
            return Err(InviteError::Truncated {
                length: code.chars().count(),
            });
        }

        let (content, checksum) = payload.split_at(payload.len() - CHECKSUM_LEN);
        if !ct_eq(&checksum_of(content), checksum) {
            return Err(InviteError::ChecksumMismatch);
        }
        parse_content(content)
    }

    /// Err(Expired) when now_unix >= expires_at.
    pub fn check_expiry(&self, now_unix: u64) -> Result<(), InviteError> {
        if now_unix >= self.expires_at {
            Err(InviteError::Expired {
                expires_at: self.expires_at,
                now: now_unix,
            })
        } else {
            Ok(())
        }
    }

    /// The public id as 32 lower-case hex characters.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

/// Validates a node public URL: scheme must be https (case-insensitive), a non-empty host,
/// optional port, optional path; no userinfo ("@"), no query ("?"), no fragment ("#"), no
/// whitespace or control characters, at most MAX_URL_LEN bytes. Returns the URL with any
/// trailing '/' removed and the scheme in lower case.
///
/// The host must be a DNS name or IPv4 address (ASCII letters, digits, '-', '.', '_'; use the
/// `xn--` form for international names) or a bracketed IPv6 address; the port, when present, is
/// 1-65535.
pub fn validate_url(url: &str) -> Result<String, InviteError> {
    let bad = |reason: &'static str| InviteError::BadUrl {
        url: shown_url(url),
        reason,
    };
    if url.is_empty() {
        return Err(bad("it is empty"));
    }
    if url.len() > MAX_URL_LEN {
        return Err(bad("it is longer than 512 bytes"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace or control characters"));
    }
    let https = url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    if !https {
        return Err(InviteError::NotHttps(shown_url(url)));
    }
    // What the URL parser would drop or fold into the host, refused by name before it runs.
    if url.contains('#') {
        return Err(bad("it must not contain a fragment ('#')"));
    }
    if url.contains('\\') {
        return Err(bad("it must not contain a backslash"));
    }
    // A user name or password in the URL would be sent around with every invitation.
    if url[8..]
        .split('/')
        .next()
        .is_some_and(|authority| authority.contains('@'))
    {
        return Err(bad("it must not contain a user name or password ('@')"));
    }
    let uri: crate::http::Uri = url
        .parse()
        .map_err(|_| bad("it is not a valid URL (check the host name and port)"))?;
    if uri.query().is_some() {
        return Err(bad("it must not contain a query ('?')"));
    }
    let authority = uri.authority().ok_or_else(|| bad("it has no host name"))?;
    check_host(authority.host()).map_err(bad)?;
    if !crate::http::port_in_range(&uri) {
        return Err(bad("its port is missing or not between 1 and 65535"));
    }
    let path = uri.path().trim_end_matches('/');
    Ok(format!("https://{authority}{path}"))
}

/// Finds where the base32 body starts, or says why the text is not a version-1 code.
fn split_prefix(code: &str) -> Result<usize, InviteError> {
    let bytes = code.as_bytes();
    let family = FAMILY.as_bytes();
    if bytes.len() < family.len() {
        // A few first characters of a code, e.g. a selection that stopped short.
        let is_start = PREFIX.as_bytes()[..bytes.len()].eq_ignore_ascii_case(bytes);
        return Err(if is_start {
            InviteError::Truncated { length: bytes.len() }
        } else {
            InviteError::NotAnInvitation
        });
    }
    if !bytes[..family.len()].eq_ignore_ascii_case(family) {
        return Err(InviteError::NotAnInvitation);
    }
    let digits_start = family.len();
    let digits_len = bytes[digits_start..].iter().take_while(|b| b.is_ascii_digit()).count();
    let digits = &code[digits_start..digits_start + digits_len];
    let after = digits_start + digits_len;
    match bytes.get(after) {
        Some(b'_') => {}
        // "rlyinv" or "rlyinv1": the rest of the line was lost.
        None if digits.is_empty() || digits == "1" => return Err(InviteError::Truncated { length: code.len() }),
        None => {}
        Some(_) => return Err(InviteError::NotAnInvitation),
    }
    if digits == "1" {
        return Ok(after + 1);
    }
    if digits.is_empty() || digits.starts_with('0') {
        return Err(InviteError::NotAnInvitation);
    }
    Err(InviteError::UnsupportedVersion(
        digits.parse::<u32>().unwrap_or(u32::MAX),
    ))
}

/// Reads the fields after the checksum has been verified.
fn parse_content(content: &[u8]) -> Result<Invitation, InviteError> {
    let mut reader = Reader(content);
    let version = reader.array::<1>()?[0];
    if version != FORMAT_VERSION {
        return Err(InviteError::UnsupportedVersion(u32::from(version)));
    }
    let flags = reader.array::<1>()?[0];
    if flags & !FLAG_PIN != 0 {
        return Err(InviteError::Malformed("unknown flag bits are set"));
    }
    let expires_at = u64::from_be_bytes(reader.array::<8>()?);
    let id = reader.array::<16>()?;
    let secret = reader.array::<32>()?;
    let pin = if flags & FLAG_PIN != 0 {
        Some(reader.array::<32>()?)
    } else {
        None
    };
    let url_len = usize::from(u16::from_be_bytes(reader.array::<2>()?));
    let url = reader
        .take(url_len)
        .ok_or(InviteError::Malformed("the URL length runs past the end"))?;
    if !reader.0.is_empty() {
        return Err(InviteError::Malformed("there are unexpected bytes after the URL"));
    }
    let url = std::str::from_utf8(url).map_err(|_| InviteError::Malformed("the URL is not UTF-8"))?;
    Ok(Invitation {
        url: validate_url(url)?,
        id,
        secret,
        expires_at,
        pin,
    })
}

/// Appends the checksum to a payload and renders the code.
fn seal(mut payload: Vec<u8>) -> String {
    let checksum = checksum_of(&payload);
    payload.extend_from_slice(&checksum);
    let mut code = String::from(PREFIX);
    code.push_str(&base32_encode(&payload));
    code
}

/// First bytes of SHA-256 over the prefix and content: the prefix is included so a payload
/// cannot be replayed under another format's prefix.
fn checksum_of(content: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut input = Vec::with_capacity(PREFIX.len() + content.len());
    input.extend_from_slice(PREFIX.as_bytes());
    input.extend_from_slice(content);
    let digest = sha256(&input);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

/// Consumes a byte slice from the front without ever indexing past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], InviteError> {
        self.take(N)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(InviteError::Malformed("a field runs past the end"))
    }
}

fn check_host(host: &str) -> Result<(), &'static str> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').unwrap_or(inner);
        return if inner.parse::<std::net::Ipv6Addr>().is_ok() {
            Ok(())
        } else {
            Err("its IPv6 address is not valid")
        };
    }
    if host.is_empty() {
        return Err("it has no host name");
    }
    if host.starts_with('.') || host.contains("..") {
        return Err("its host name has an empty label");
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(
            "its host name may only hold letters, digits, '-', '.' and '_' (use the xn-- form \
             for international names)",
        );
    }
    Ok(())
}

/// The URL quoted for an error message, with anything unprintable escaped and length capped.
fn shown_url(url: &str) -> String {
    let mut shown = String::from("`");
    for (count, c) in url.chars().enumerate() {
        if count == MAX_URL_SHOWN {
            shown.push('…');
            break;
        }
        if c.is_control() || (c.is_whitespace() && c != ' ') {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown.push('`');
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const URL: &str = "https://relay.example.com:8443";

    fn sample(pin: bool) -> Invitation {
        Invitation {
            url: URL.to_string(),
            id: [0x11; 16],
            secret: [0xab; 32],
            expires_at: 1_700_000_000,
            pin: pin.then_some([0x5c; 32]),
        }
    }

    /// Builds the fields before the checksum, so tests can break them one at a time.
    fn raw_content(version: u8, flags: u8, pin: Option<[u8; 32]>, url: &[u8]) -> Vec<u8> {
        let mut content = vec![version, flags];
        content.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        content.extend_from_slice(&[1; 16]);
        content.extend_from_slice(&[2; 32]);
        if let Some(pin) = pin {
            content.extend_from_slice(&pin);
        }
        content.extend_from_slice(&u16::try_from(url.len()).unwrap().to_be_bytes());
        content.extend_from_slice(url);
        content
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\\.[a-z0-9_-]{1,10}){0,3}",
            "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
            Just("[::1]".to_string()),
            Just("[2001:db8::7]".to_string()),
        ]
    }

    fn url_strategy() -> impl Strategy<Value = String> {
        (
            host_strategy(),
            proptest::option::of(1u32..=65535),
            "(/[A-Za-z0-9._~%!$&'()*+,;=:-]{1,12}){0,4}",
        )
            .prop_map(|(host, port, path)| match port {
                Some(port) => format!("https://{host}:{port}{path}"),
                None => format!("https://{host}{path}"),
            })
    }

    fn invitation_strategy() -> impl Strategy<Value = Invitation> {
        (
            url_strategy(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            proptest::option::of(any::<[u8; 32]>()),
        )
            .prop_map(|(url, id, secret, expires_at, pin)| Invitation {
                url,
                id,
                secret,
                expires_at,
                pin,
            })
    }

    #[test]
    fn encodes_with_prefix_in_lower_case_base32() {
        let code = sample(true).encode();
        assert!(code.starts_with(PREFIX));
        assert!(code[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
        assert_eq!(Invitation::decode(&code), Ok(sample(true)));
        assert_eq!(Invitation::decode(&sample(false).encode()), Ok(sample(false)));
    }

    #[test]
    fn payload_layout_matches_the_format() {
        let inv = sample(true);
        let code = inv.encode();
        let payload = base32_decode(&code[PREFIX.len()..]).unwrap();
        let mut expected = vec![1, 1];
        expected.extend_from_slice(&inv.expires_at.to_be_bytes());
        expected.extend_from_slice(&inv.id);
        expected.extend_from_slice(&inv.secret);
        expected.extend_from_slice(&[0x5c; 32]);
        expected.extend_from_slice(&(URL.len() as u16).to_be_bytes());
        expected.extend_from_slice(URL.as_bytes());
        let mut summed = b"rlyinv1_".to_vec();
        summed.extend_from_slice(&expected);
        expected.extend_from_slice(&sha256(&summed)[..4]);
        assert_eq!(payload, expected);
    }

    #[test]
    fn new_makes_fresh_random_ids_and_secrets_and_normalises_the_url() {
        let a = Invitation::new("HTTPS://relay.example.com:8443/", 10, None).unwrap();
        let b = Invitation::new(URL, 10, None).unwrap();
        assert_eq!(a.url, URL);
        assert_ne!(a.id, b.id);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.id_hex(), hex(&a.id));
        assert_eq!(a.id_hex().len(), 32);
        assert!(matches!(
            Invitation::new("http://relay.example.com", 10, None),
            Err(InviteError::NotHttps(_))
        ));
    }

    #[test]
    fn whitespace_inside_and_upper_case_are_accepted() {
        let code = sample(true).encode();
        let mut wrapped = String::from("  \n");
        for (i, c) in code.chars().enumerate() {
            if i > 0 && i % 20 == 0 {
                wrapped.push_str(if i % 40 == 0 { "\r\n" } else { "\n\t " });
            }
            wrapped.push(c);
        }
        wrapped.push_str("\n\n");
        assert_eq!(Invitation::decode(&wrapped), Ok(sample(true)));
        assert_eq!(Invitation::decode(&code.to_ascii_uppercase()), Ok(sample(true)));
    }

    #[test]
    fn empty_and_foreign_text_are_refused() {
        assert_eq!(Invitation::decode(""), Err(InviteError::Empty));
        assert_eq!(Invitation::decode(" \n\t "), Err(InviteError::Empty));
        let code = sample(false).encode();
        for foreign in [
            format!("rlyinx1_{}", &code[8..]),
            format!("xrlyinv1_{}", &code[8..]),
            code[8..].to_string(),
            "hello world".to_string(),
            "rlyinvx_abc".to_string(),
            format!("rlyinv1{}", &code[8..]),
            format!("rlyinv01_{}", &code[8..]),
            "é".to_string(),
        ] {
            let err = Invitation::decode(&foreign).unwrap_err();
            assert_eq!(err, InviteError::NotAnInvitation, "{foreign}");
            assert_eq!(
                err.to_string(),
                "this is not a relay invitation code (it should start with `rlyinv1_`)"
            );
        }
    }

    #[test]
    fn future_versions_are_named() {
        let code = sample(false).encode();
        let err = Invitation::decode(&format!("rlyinv2_{}", &code[8..])).unwrap_err();
        assert_eq!(err, InviteError::UnsupportedVersion(2));
        assert!(err.to_string().contains("version 1"));
        assert!(err.to_string().contains("upgrade relay"));
        assert_eq!(
            Invitation::decode("RLYINV17_abc"),
            Err(InviteError::UnsupportedVersion(17))
        );
        assert_eq!(
            Invitation::decode("rlyinv99999999999999_abc"),
            Err(InviteError::UnsupportedVersion(u32::MAX))
        );

        let mut content = raw_content(2, 0, None, URL.as_bytes());
        assert_eq!(
            Invitation::decode(&seal(content.clone())),
            Err(InviteError::UnsupportedVersion(2))
        );
        content[0] = 1;
        assert!(Invitation::decode(&seal(content)).is_ok());
    }

    #[test]
    fn bad_character_reports_position_as_seen() {
        let code = sample(false).encode();
        let mut chars: Vec<char> = code.chars().collect();
        chars[20] = '0';
        let broken: String = chars.iter().collect();
        assert_eq!(
            Invitation::decode(&broken),
            Err(InviteError::BadCharacter {
                position: 21,
                character: '0'
            })
        );
        // Whitespace does not count towards the position.
        let spaced = format!("{} \n {}", &broken[..10], &broken[10..]);
        assert_eq!(
            Invitation::decode(&spaced),
            Err(InviteError::BadCharacter {
                position: 21,
                character: '0'
            })
        );
        let padded = format!("{code}=");
        assert_eq!(
            Invitation::decode(&padded),
            Err(InviteError::BadCharacter {
                position: code.len() + 1,
                character: '='
            })
        );
        let unicode = format!("{}ü{}", &code[..9], &code[10..]);
        let err = Invitation::decode(&unicode).unwrap_err();
        assert_eq!(
            err,
            InviteError::BadCharacter {
                position: 10,
                character: 'ü'
            }
        );
        assert!(err.to_string().contains("position 10"));
    }

    #[test]
    fn every_truncation_is_refused() {
        let code = sample(true).encode();
        for end in 1..code.len() {
            let err = Invitation::decode(&code[..end]).unwrap_err();
            assert!(
                matches!(err, InviteError::Truncated { .. } | InviteError::ChecksumMismatch),
                "length {end}: {err:?}"
            );
            if let InviteError::Truncated { length } = err {
                assert_eq!(length, end);
                assert!(err.to_string().contains(&format!("only {end} characters")));
            }
        }
        assert_eq!(Invitation::decode("R"), Err(InviteError::Truncated { length: 1 }));
        assert_eq!(Invitation::decode("x"), Err(InviteError::NotAnInvitation));
        assert_eq!(
            Invitation::decode("rlyinv1_"),
            Err(InviteError::Truncated { length: 8 })
        );
    }

    #[test]
    fn every_substitution_is_refused() {
        // Exhaustive over one code: every position, every other base32 character.
        let code = sample(true).encode();
        let alphabet = "abcdefghijklmnopqrstuvwxyz234567";
        let body = &code[PREFIX.len()..];
        for (i, original) in body.char_indices() {
            for c in alphabet.chars().filter(|&c| c != original) {
                let mut mutated = code.clone();
                let at = PREFIX.len() + i;
                mutated.replace_range(at..at + 1, &c.to_string());
                assert_eq!(
                    Invitation::decode(&mutated),
                    Err(InviteError::ChecksumMismatch),
                    "position {at}, {c}"
                );
            }
        }
    }

    #[test]
    fn structural_errors_behind_a_valid_checksum() {
        let url = URL.as_bytes();
        assert_eq!(
            Invitation::decode(&seal(raw_content(1, 0b10, None, url))),
            Err(InviteError::Malformed("unknown flag bits are set"))
        );
        let mut long = raw_content(1, 0, None, url);
        let len_at = long.len() - url.len() - 2;
        long[len_at..len_at + 2].copy_from_slice(&(url.len() as u16 + 1).to_be_bytes());
        assert_eq!(
            Invitation::decode(&seal(long)),
            Err(InviteError::Malformed("the URL length runs past the end"))
        );
        let mut trailing = raw_content(1, 0, None, url);
        trailing.push(0);
        assert_eq!(
            Invitation::decode(&seal(trailing)),
            Err(InviteError::Malformed("there are unexpected bytes after the URL"))
        );
        let mut invalid_utf8 = url.to_vec();
        invalid_utf8.push(0xff);
        assert_eq!(
            Invitation::decode(&seal(raw_content(1, 0, None, &invalid_utf8))),
            Err(InviteError::Malformed("the URL is not UTF-8"))
        );
        // Pin flag set but the pin bytes missing: the fields no longer line up.
        assert!(matches!(
            Invitation::decode(&seal(raw_content(1, FLAG_PIN, None, b""))),
            Err(InviteError::Malformed(_))
        ));
        assert!(matches!(
            Invitation::decode(&seal(raw_content(1, 0, None, b""))),
            Err(InviteError::BadUrl { .. })
        ));
    }

    #[test]
    fn urls_inside_codes_are_validated() {
        let mut http = sample(false);
        http.url = "http://relay.example.com".into();
        let err = Invitation::decode(&http.encode()).unwrap_err();
        assert_eq!(err, InviteError::NotHttps("`http://relay.example.com`".into()));
        assert!(err.to_string().contains("http://relay.example.com"));

        for (url, needle) in [
            ("https://user:pw@relay.example.com", "'@'"),
            ("https://relay.example.com/?x=1", "'?'"),
            ("https://relay.example.com/#top", "'#'"),
        ] {
            let mut inv = sample(false);
            inv.url = url.into();
            let err = Invitation::decode(&inv.encode()).unwrap_err();
            assert!(matches!(err, InviteError::BadUrl { .. }), "{url}: {err:?}");
            let message = err.to_string();
            assert!(message.contains(url) && message.contains(needle), "{message}");
        }

        let mut trailing_slash = sample(false);
        trailing_slash.url = format!("{URL}/");
        assert_eq!(Invitation::decode(&trailing_slash.encode()), Ok(sample(false)));
    }

    #[test]
    fn validate_url_accepts_https_forms() {
        for (input, output) in [
            ("https://relay.example.com", "https://relay.example.com"),
            ("HTTPS://Relay.Example.com/", "https://Relay.Example.com"),
            ("https://relay.example.com:8443//", "https://relay.example.com:8443"),
            ("https://10.0.0.1:443/relay/", "https://10.0.0.1:443/relay"),
            ("https://[::1]:8443/a/b", "https://[::1]:8443/a/b"),
            ("https://[2001:db8::1]", "https://[2001:db8::1]"),
            ("https://relay_1.internal", "https://relay_1.internal"),
        ] {
            assert_eq!(validate_url(input).as_deref(), Ok(output), "{input}");
        }
        let longest = format!("https://a.example/{}", "p".repeat(MAX_URL_LEN - 18));
        assert_eq!(longest.len(), MAX_URL_LEN);
        assert_eq!(validate_url(&longest), Ok(longest.clone()));
    }

    #[test]
    fn validate_url_refuses_everything_else() {
        for url in [
            "http://relay.example.com",
            "ftp://relay.example.com",
            "relay.example.com",
            "https:relay.example.com",
            "",
        ] {
            assert!(
                matches!(
                    validate_url(url),
                    Err(InviteError::NotHttps(_) | InviteError::BadUrl { .. })
                ),
                "{url}"
            );
        }
        assert!(matches!(
            validate_url("http://relay.example.com"),
            Err(InviteError::NotHttps(_))
        ));
        for url in [
            "https://",
            "https:///path",
            "https://:8443",
            "https://user@relay.example.com",
            "https://relay.example.com?x",
            "https://relay.example.com#x",
            "https://relay.example.com:",
            "https://relay.example.com:0",
            "https://relay.example.com:65536",
            "https://relay.example.com:84a3",
            "https://relay.example.com:1:2",
            "https://relay example.com",
            "https://relay.example.com/a b",
            "https://relay.example.com/\u{7}",
            "https://relay.example.com\n",
            "https://réla.example.com",
            "https://relay..example.com",
            "https://.relay.example.com",
            "https://[::1",
            "https://[::1]x",
            "https://[zz::1]",
            "https://[]",
            "https://relay.example.com\\evil",
        ] {
            assert!(
                matches!(validate_url(url), Err(InviteError::BadUrl { .. })),
                "{url}: {:?}",
                validate_url(url)
            );
        }
        let too_long = format!("https://a.example/{}", "p".repeat(MAX_URL_LEN));
        let err = validate_url(&too_long).unwrap_err();
        assert!(err.to_string().contains("longer than 512 bytes"));
        // The echoed URL is capped and its control characters escaped.
        assert!(err.to_string().len() < 300);
        let err = validate_url("https://a.example/\u{1b}[2J").unwrap_err();
        assert!(!err.to_string().contains('\u{1b}'));
    }

    #[test]
    fn expiry_is_checked_against_the_given_clock() {
        let inv = sample(false);
        assert_eq!(inv.check_expiry(inv.expires_at - 1), Ok(()));
        let err = inv.check_expiry(inv.expires_at + 7200).unwrap_err();
        assert_eq!(
            err,
            InviteError::Expired {
                expires_at: 1_700_000_000,
                now: 1_700_007_200,
            }
        );
        let message = err.to_string();
        assert!(message.contains("2023-11-14T22:13:20Z (2 h ago)"), "{message}");
        assert!(!message.contains("unix time"), "{message}");
        assert!(message.contains("ask the node administrator for a new invitation"));
        assert!(inv.check_expiry(u64::MAX).is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        let inv = sample(true);
        let debug = format!("{inv:?}");
        assert!(!debug.contains(&hex(&inv.secret)), "{debug}");
        assert!(!debug.contains("171, 171"), "{debug}");
        assert!(debug.contains("secret: \"***\""), "{debug}");
        assert!(debug.contains(&hex(&inv.id)));
        assert!(debug.contains(&hex(&[0x5c; 32])));
    }

    #[test]
    fn error_messages_never_carry_the_secret() {
        let inv = sample(true);
        let secret_hex = hex(&inv.secret);
        let code = inv.encode();
        let mut messages = vec![inv.check_expiry(u64::MAX).unwrap_err().to_string()];
        for end in 0..code.len() {
            if let Err(err) = Invitation::decode(&code[..end]) {
                messages.push(err.to_string());
                messages.push(format!("{err:?}"));
            }
        }
        for message in messages {
            assert!(!message.contains(&secret_hex), "{message}");
        }
    }

    /// A hostile or garbled edit of a code, for the never-panics properties.
    #[derive(Debug, Clone)]
    enum Edit {
        Replace(usize, char),
        Insert(usize, char),
        Delete(usize),
        Truncate(usize),
    }

    fn edit_strategy() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), any::<char>()).prop_map(|(i, c)| Edit::Replace(i, c)),
            (any::<usize>(), any::<char>()).prop_map(|(i, c)| Edit::Insert(i, c)),
            any::<usize>().prop_map(Edit::Delete),
            any::<usize>().prop_map(Edit::Truncate),
        ]
    }

    fn apply(code: &str, edit: &Edit) -> String {
        let mut chars: Vec<char> = code.chars().collect();
        let len = chars.len();
        match *edit {
            Edit::Replace(i, c) if len > 0 => chars[i % len] = c,
            Edit::Insert(i, c) => chars.insert(i % (len + 1), c),
            Edit::Delete(i) if len > 0 => {
                chars.remove(i % len);
            }
            Edit::Truncate(i) => chars.truncate(i % (len + 1)),
            _ => {}
        }
        chars.into_iter().collect()
    }

    proptest! {
        #[test]
        fn round_trips(inv in invitation_strategy()) {
            let code = inv.encode();
            prop_assert!(code.starts_with(PREFIX));
            prop_assert!(!code.chars().any(char::is_whitespace));
            prop_assert_eq!(Invitation::decode(&code), Ok(inv.clone()));
            prop_assert_eq!(Invitation::decode(&code.to_ascii_uppercase()), Ok(inv));
        }

        #[test]
        fn decode_never_panics_on_arbitrary_text(text in any::<String>()) {
            let _ = Invitation::decode(&text);
        }

        #[test]
        fn decode_never_panics_on_code_like_text(
            prefix in "(?i)rlyinv[0-9]{0,3}_?",
            body in "[a-zA-Z2-7 \n=0189_]{0,400}",
        ) {
            let _ = Invitation::decode(&format!("{prefix}{body}"));
        }

        #[test]
        fn validate_url_never_panics(url in any::<String>()) {
            if let Ok(valid) = validate_url(&url) {
                prop_assert!(valid.starts_with("https://"));
                prop_assert_eq!(validate_url(&valid), Ok(valid.clone()));
            }
        }

        #[test]
        fn substitutions_are_refused(
            inv in invitation_strategy(),
            position in any::<usize>(),
            replacement in any::<char>(),
        ) {
            let code = inv.encode();
            let chars: Vec<char> = code.chars().collect();
            let position = position % chars.len();
            let original = chars[position];
            // Case changes and whitespace are meant to be harmless; they are not substitutions.
            prop_assume!(!replacement.eq_ignore_ascii_case(&original));
            prop_assume!(!replacement.is_whitespace());
            let mut mutated = chars;
            mutated[position] = replacement;
            let mutated: String = mutated.into_iter().collect();
            let err = Invitation::decode(&mutated).unwrap_err();
            if position < PREFIX.len() {
                prop_assert!(matches!(
                    err,
                    InviteError::NotAnInvitation | InviteError::UnsupportedVersion(_)
                ), "{:?}", err);
            } else {
                prop_assert!(matches!(
                    err,
                    InviteError::ChecksumMismatch | InviteError::BadCharacter { .. }
                ), "{:?}", err);
                if let InviteError::BadCharacter { position: reported, character } = err {
                    prop_assert_eq!(reported, position + 1);
                    prop_assert_eq!(character, replacement);
                }
            }
        }

        #[test]
        fn truncations_are_refused(inv in invitation_strategy(), cut in any::<usize>()) {
            let code = inv.encode();
            let end = 6 + cut % (code.len() - 6);
            let err = Invitation::decode(&code[..end]).unwrap_err();
            prop_assert!(matches!(
                err,
                InviteError::Truncated { .. } | InviteError::ChecksumMismatch
            ), "{:?}", err);
        }

        #[test]
        fn decode_never_panics_on_edited_codes(
            inv in invitation_strategy(),
            edits in proptest::collection::vec(edit_strategy(), 1..6),
        ) {
            let mut code = inv.encode();
            for edit in &edits {
                code = apply(&code, edit);
            }
            let _ = Invitation::decode(&code);
        }
    }
}
