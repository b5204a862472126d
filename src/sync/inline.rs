//! Inline images in HTML fields: finding the `src` of each `<img>`, and the tracker-neutral
//! reference a replica carries in place of an attachment URL of the sending tracker
//! (`relay-inline:{sha256}/{file name}`), which the receiving side turns into a URL of its own
//! tracker. Pure text work; the engine reads, sends and uploads the bytes.

use crate::sync::replica::Entity;

/// The scheme of a reference to an inline file carried by a replica.
pub const SCHEME: &str = "relay-inline:";
/// Inline files one item may carry.
pub const MAX_FILES: usize = 64;
/// Bytes of inline files one item may carry.
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// A reference to an inline file: its content hash and file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// The file name, as the sending tracker gave it.
    pub filename: String,
}

impl Reference {
    /// The reference as an `src` value.
    pub fn to_src(&self) -> String {
        format!("{SCHEME}{}/{}", self.sha256, encode(&self.filename))
    }

    /// Reads an `src` value written by [`Reference::to_src`].
    pub fn parse(src: &str) -> Option<Reference> {
        let rest = src.strip_prefix(SCHEME)?;
        let (sha, name) = rest.split_once('/')?;
        (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Reference {
            sha256: sha.to_ascii_lowercase(),
            filename: decode(name),
        })
    }
}

/// The `src` values of the `<img>` tags of `html`, in order, with their byte ranges.
pub fn image_sources(html: &str) -> Vec<(std::ops::Range<usize>, String)> {
    let lower = html.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = lower[at..].find("<img").map(|i| at + i) {
        let end = lower[open..].find('>').map_or(lower.len(), |i| open + i);
        let tag = &lower[open..end];
        let mut from = 0;
        while let Some(i) = tag[from..].find("src").map(|i| from + i) {
            from = i + 3;
            // An attribute name on its own, not the end of `data-src`.
            let before = tag[..i].chars().next_back();
            if !before.is_some_and(char::is_whitespace) {
                continue;
            }
            let rest = tag[from..].trim_start();
            let Some(rest) = rest.strip_prefix('=') else { continue };
            let rest = rest.trim_start();
            let value_at = open + (tag.len() - rest.len());
            let (start, stop) = match rest.chars().next() {
                Some(q @ ('"' | '\'')) => {
                    let Some(len) = rest[1..].find(q) else { break };
                    (value_at + 1, value_at + 1 + len)
                }
                Some(_) => {
                    let len = rest.find(|c: char| c.is_whitespace() || c == '>').unwrap_or(rest.len());
                    (value_at, value_at + len)
                }
                None => break,
            };
            out.push((start..stop, html[start..stop].replace("&amp;", "&")));
            break;
        }
        at = end.max(open + 4);
    }
    out
}

/// `html` with each `<img>` source that `map` answers for replaced by its answer.
pub fn rewrite(html: &str, mut map: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(html.len());
    let mut last = 0;
    for (range, src) in image_sources(html) {
        if let Some(new) = map(&src) {
            out.push_str(&html[last..range.start]);
            out.push_str(&new.replace('&', "&amp;"));
            last = range.end;
        }
    }
    out.push_str(&html[last..]);
    out
}

/// Every HTML text of an entity that may hold images: the description, the comments and the
/// custom fields whose value is a string with an `<img`.
pub fn html_texts(entity: &mut Entity) -> Vec<&mut String> {
    let mut out: Vec<&mut String> = vec![&mut entity.description.text];
    out.extend(entity.comments.iter_mut().map(|c| &mut c.body.text));
    out.extend(entity.custom_fields.values_mut().filter_map(|v| match v {
        serde_json::Value::String(s) if s.to_ascii_lowercase().contains("<img") => Some(s),
        _ => None,
    }));
    out
}

/// Whether any HTML text of the entity holds a reference ([`SCHEME`]).
pub fn has_references(entity: &Entity) -> bool {
    let texts = std::iter::once(entity.description.text.as_str())
        .chain(entity.comments.iter().map(|c| c.body.text.as_str()))
        .chain(entity.custom_fields.values().filter_map(serde_json::Value::as_str));
    texts.into_iter().any(|t| t.contains(SCHEME))
}

/// The file name an attachment URL names (`?fileName=`), or `image`.
pub fn file_name(url: &str) -> String {
    url.split_once('?')
        .and_then(|(_, q)| {
            q.split('&')
                .find_map(|kv| kv.split_once('=').filter(|(k, _)| k.eq_ignore_ascii_case("filename")))
        })
        .map(|(_, v)| decode(v))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "image".into())
}

fn encode(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || {
            std::str::from_utf8(bytes.get(i + 1..i + 3)?)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match (bytes[i], hex()) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_found_in_any_quoting_and_case_and_data_src_is_not_one() {
        let html = r#"<p>a<IMG alt="x" SRC="https://h/_apis/wit/attachments/1?fileName=a.png&amp;v=2"> b <img data-src="no" src='https://o/x.png'/><img src=bare.png></p>"#;
        let found: Vec<String> = image_sources(html).into_iter().map(|(_, s)| s).collect();
        assert_eq!(
            found,
            [
                "https://h/_apis/wit/attachments/1?fileName=a.png&v=2",
                "https://o/x.png",
                "bare.png"
            ]
        );
        assert!(image_sources("<p>no images, <imgur> either</p>").is_empty());
        assert!(image_sources("<img src=\"unterminated").is_empty());
    }

    #[test]
    fn rewriting_replaces_only_what_the_map_answers_for() {
        let html = r#"<img src="https://h/a?x=1&amp;y=2"><img src="keep.png">"#;
        let out = rewrite(html, |src| {
            (src == "https://h/a?x=1&y=2").then(|| "relay-inline:x/a&b".into())
        });
        assert_eq!(out, r#"<img src="relay-inline:x/a&amp;b"><img src="keep.png">"#);
    }

    #[test]
    fn references_round_trip_with_any_file_name() {
        let r = Reference {
            sha256: "ab".repeat(32),
            filename: "screen shot (1)/ü.png".into(),
        };
        assert_eq!(Reference::parse(&r.to_src()), Some(r));
        assert_eq!(Reference::parse("relay-inline:short/x.png"), None);
        assert_eq!(Reference::parse("https://h/x.png"), None);
        assert_eq!(
            file_name("https://h/_apis/wit/attachments/1?fileName=my%20shot.png"),
            "my shot.png"
        );
        assert_eq!(file_name("https://h/_apis/wit/attachments/1"), "image");
    }
}
