//! Hashing, randomness and constant-time comparison: the one place that knows `ring`, `subtle`
//! and `data-encoding`.

use ring::rand::SecureRandom;

/// Length of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; SHA256_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; SHA256_LEN];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `N` bytes from the operating system's CSPRNG.
///
/// # Panics
/// Only if the operating system has no usable random source, in which case no secret could be
/// made safely and stopping is the right answer.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .expect("the operating system's random number generator failed");
    out
}

/// Compares two byte strings in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Lower-case hex.
pub fn hex(data: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(data)
}

/// Parses lower- or upper-case hex.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(text.as_bytes()).ok()
}

/// Lower-case base32 without padding (RFC 4648 alphabet): survives copy-paste, terminals and
/// double-click selection.
pub fn base32_encode(data: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(data).to_ascii_lowercase()
}

/// Decodes [`base32_encode`] output, in either case. `Err` carries the index of the first
/// character that is not part of the alphabet, or `None` when the length is impossible.
pub fn base32_decode(text: &str) -> Result<Vec<u8>, Option<usize>> {
    let upper = text.to_ascii_uppercase();
    if let Some(pos) = upper
        .bytes()
        .position(|b| !(b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)))
    {
        return Err(Some(pos));
    }
    data_encoding::BASE32_NOPAD.decode(upper.as_bytes()).map_err(|_| None)
}

/// A fresh random identifier: 128 bits as 32 hex characters.
pub fn random_id() -> String {
    hex(&random_bytes::<16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
    }

    #[test]
    fn base32_round_trip_and_bad_character() {
        let data = random_bytes::<37>();
        assert_eq!(base32_decode(&base32_encode(&data)).unwrap(), data);
        assert_eq!(base32_decode("abc1"), Err(Some(3)));
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_id(), random_id());
        assert_eq!(random_id().len(), 32);
    }
}
