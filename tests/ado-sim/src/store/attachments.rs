//! Attachments: simple uploads, chunked uploads in order, and the ids in their URLs.

use super::*;

impl Store {
    /// Stores a simple upload, or starts a chunked one when `data` is `None`.
    pub fn add_attachment(&mut self, file_name: &str, data: Option<Vec<u8>>) -> Attachment {
        let a = Attachment {
            id: new_guid(),
            file_name: file_name.to_string(),
            complete: data.is_some(),
            data: data.unwrap_or_default(),
            expected_len: None,
            created_ms: self.tick(),
        };
        self.attachments.insert(a.id.clone(), a.clone());
        a
    }

    /// Appends one chunk (`Content-Range: bytes start-end/total`) to a chunked upload; chunks
    /// must arrive in order.
    pub fn add_chunk(
        &mut self,
        id: &str,
        start: u64,
        end: u64,
        total: u64,
        bytes: &[u8],
    ) -> Result<Attachment, ApiError> {
        let a = self
            .attachments
            .get_mut(&id.to_lowercase())
            .ok_or_else(|| attachment_missing(id))?;
        let bad = |m: String| ApiError::bad_request("InvalidChunkException", m);
        if a.complete {
            return Err(bad(format!("The attachment {id} is already complete.")));
        }
        if end < start || end - start + 1 != bytes.len() as u64 || end >= total {
            return Err(bad(format!(
                "The Content-Range bytes {start}-{end}/{total} does not match the {} bytes sent.",
                bytes.len()
            )));
        }
        if a.expected_len.is_some_and(|t| t != total) {
            return Err(bad(format!(
                "The total length {total} differs from the one given before."
            )));
        }
        if start != a.data.len() as u64 {
            return Err(bad(format!(
                "Expected the chunk starting at byte {}, got {start}.",
                a.data.len()
            )));
        }
        a.expected_len = Some(total);
        a.data.extend_from_slice(bytes);
        a.complete = a.data.len() as u64 == total;
        Ok(a.clone())
    }

    /// A complete attachment.
    pub fn attachment(&self, id: &str) -> Result<&Attachment, ApiError> {
        self.attachments
            .get(&id.to_lowercase())
            .filter(|a| a.complete)
            .ok_or_else(|| attachment_missing(id))
    }
}

pub(super) fn attachment_missing(id: &str) -> ApiError {
    ApiError::new(
        404,
        "AttachmentNotFoundException",
        format!("VS402328: The attachment {id} was not found."),
    )
}

/// The id out of `…/_apis/wit/attachments/{id}[?fileName=…]`.
pub fn attachment_id_from_url(url: &str) -> Option<String> {
    let path = url.split('?').next()?;
    let i = path.to_ascii_lowercase().find("/_apis/wit/attachments/")?;
    let id = &path[i + "/_apis/wit/attachments/".len()..];
    (!id.is_empty() && !id.contains('/')).then(|| id.to_string())
}
