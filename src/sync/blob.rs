//! Attachment bytes on the wire: one message per chunk (`application/vnd.relay.blob`), each a
//! small JSON header (which file, which chunk of how many) followed by the raw bytes. A pure
//! codec; the engine stores the chunks and uploads a file once every chunk arrived and its
//! SHA-256 matches.

use serde::{Deserialize, Serialize};

use crate::crypto;

/// Largest header (bytes); headers are a few short strings.
const MAX_HEADER: usize = 4096;
/// Most chunks of one file (with 1 MiB chunks: 64 GiB, far above any tracker's limit).
pub const MAX_CHUNKS: u32 = 65_536;

/// Which part of which file a chunk message carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkHeader {
    /// SHA-256 of the whole file, hex: its identity.
    pub sha256: String,
    /// Size of the whole file.
    pub size: u64,
    /// File name, for the upload.
    pub filename: String,
    /// This chunk's index, from 0.
    pub index: u32,
    /// How many chunks the file has.
    pub count: u32,
}

/// Why a chunk message could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    /// Too short, or a header that is no JSON header.
    #[error("attachment chunk malformed: {0}")]
    Malformed(String),
    /// The reassembled bytes do not hash to the announced SHA-256.
    #[error("attachment {expected} arrived corrupted: its bytes hash to {found}")]
    Corrupt {
        /// Announced.
        expected: String,
        /// Computed.
        found: String,
    },
}

/// The chunk messages of `bytes`, each at most `chunk_bytes` of payload plus its header.
pub fn split(filename: &str, bytes: &[u8], chunk_bytes: usize) -> Vec<(ChunkHeader, Vec<u8>)> {
    let sha256 = crypto::hex(&crypto::sha256(bytes));
    let chunk_bytes = chunk_bytes.max(1);
    let count = bytes.len().div_ceil(chunk_bytes).max(1) as u32;
    (0..count)
        .map(|index| {
            let start = index as usize * chunk_bytes;
            let part = &bytes[start.min(bytes.len())..(start + chunk_bytes).min(bytes.len())];
            let header = ChunkHeader {
                sha256: sha256.clone(),
                size: bytes.len() as u64,
                filename: filename.to_owned(),
                index,
                count,
            };
            (header.clone(), encode(&header, part))
        })
        .collect()
}

/// A chunk message body.
pub fn encode(header: &ChunkHeader, part: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(header).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + head.len() + part.len());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(part);
    out
}

/// Reads a chunk message body.
pub fn decode(body: &[u8]) -> Result<(ChunkHeader, &[u8]), BlobError> {
    let malformed = |m: &str| BlobError::Malformed(m.to_owned());
    let len_bytes: [u8; 4] = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed("shorter than its header length"))?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_HEADER {
        return Err(malformed("header too long"));
    }
    let head = body.get(4..4 + len).ok_or_else(|| malformed("header cut off"))?;
    let header: ChunkHeader = serde_json::from_slice(head).map_err(|e| BlobError::Malformed(e.to_string()))?;
    if header.count == 0 || header.count > MAX_CHUNKS || header.index >= header.count {
        return Err(malformed("chunk index out of range"));
    }
    if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed("sha256 is not 64 hex digits"));
    }
    Ok((header, &body[4 + len..]))
}

/// Checks reassembled bytes against their announced hash.
pub fn verify(sha256: &str, bytes: &[u8]) -> Result<(), BlobError> {
    let found = crypto::hex(&crypto::sha256(bytes));
    if found.eq_ignore_ascii_case(sha256) {
        Ok(())
    } else {
        Err(BlobError::Corrupt {
            expected: sha256.to_owned(),
            found,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chunks_reassemble_to_the_file(bytes in proptest::collection::vec(any::<u8>(), 0..5000), chunk in 1usize..700) {
            let parts = split("f.bin", &bytes, chunk);
            let mut joined = Vec::new();
            for (i, (h, body)) in parts.iter().enumerate() {
                let (read, part) = decode(body).unwrap();
                prop_assert_eq!(&read, h);
                prop_assert_eq!(read.index as usize, i);
                prop_assert!(part.len() <= chunk);
                joined.extend_from_slice(part);
            }
            prop_assert_eq!(&joined, &bytes);
            prop_assert!(verify(&parts[0].0.sha256, &joined).is_ok());
        }
    }

    #[test]
    fn broken_chunks_are_named() {
        assert!(matches!(decode(b"\0\0"), Err(BlobError::Malformed(_))));
        assert!(matches!(decode(b"\0\0\0\x09{\"a\":1}"), Err(BlobError::Malformed(_))));
        let (h, body) = split("f.txt", b"hello", 2).remove(0);
        let mut bad = h.clone();
        bad.index = 9;
        assert_eq!(
            decode(&encode(&bad, b"he")),
            Err(BlobError::Malformed("chunk index out of range".into()))
        );
        assert!(decode(&body).is_ok());
        let err = verify(&h.sha256, b"hellO").unwrap_err();
        assert!(err.to_string().contains("arrived corrupted"), "{err}");
    }
}
