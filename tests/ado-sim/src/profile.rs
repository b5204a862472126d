//! Version profiles: which REST API version a simulated server speaks, the version gate that
//! refuses newer requests with the service's own wording, and what each version can do.

use std::fmt;
use std::str::FromStr;

use crate::error::ApiError;

/// A simulated product and the highest REST API version it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// Azure DevOps Services (cloud), REST 7.1.
    Services,
    /// Azure DevOps Server 2022, REST 7.0.
    Server2022,
    /// Azure DevOps Server 2020, REST 6.0.
    Server2020,
    /// Azure DevOps Server 2019, REST 5.0.
    Server2019,
}

/// A REST API version as `major.minor`, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A requested `api-version`: the number, whether `-preview` was given and its resource
/// revision (`7.1-preview.4` → 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    /// The version number.
    pub version: Version,
    /// `-preview` was present.
    pub preview: bool,
    /// The number after `-preview.`, if any.
    pub resource_version: Option<u32>,
}

impl Requested {
    /// Parses `7.1`, `7.1-preview` or `7.1-preview.4`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Requested> {
        let s = s.trim();
        let (num, rest) = match s.split_once('-') {
            Some((n, r)) => (n, Some(r)),
            None => (s, None),
        };
        let (major, minor) = num.split_once('.').unwrap_or((num, "0"));
        let version = Version {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        };
        let (preview, resource_version) = match rest {
            None => (false, None),
            Some(r) => {
                let r = r.to_ascii_lowercase();
                let tail = r.strip_prefix("preview")?;
                match tail.strip_prefix('.') {
                    Some(n) => (true, Some(n.parse().ok()?)),
                    None if tail.is_empty() => (true, None),
                    None => return None,
                }
            }
        };
        Some(Requested {
            version,
            preview,
            resource_version,
        })
    }
}

impl Profile {
    /// Every profile, newest first.
    pub const ALL: [Profile; 4] = [
        Profile::Services,
        Profile::Server2022,
        Profile::Server2020,
        Profile::Server2019,
    ];

    /// The name used on the command line and in the control API.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Services => "services",
            Profile::Server2022 => "server-2022",
            Profile::Server2020 => "server-2020",
            Profile::Server2019 => "server-2019",
        }
    }

    /// The latest REST API version the simulated server supports.
    pub fn latest(self) -> Version {
        match self {
            Profile::Services => Version { major: 7, minor: 1 },
            Profile::Server2022 => Version { major: 7, minor: 0 },
            Profile::Server2020 => Version { major: 6, minor: 0 },
            Profile::Server2019 => Version { major: 5, minor: 0 },
        }
    }

    /// The version the gate names as the server's latest. Azure DevOps Server 2020 names 6.1,
    /// a version it serves only as `6.1-preview`: its latest released version is 6.0.
    pub fn named_latest(self) -> Version {
        match self {
            Profile::Server2020 => Version { major: 6, minor: 1 },
            other => other.latest(),
        }
    }

    /// Whether comments have their own API (add, edit, delete, ids). On Server 2019 (5.0)
    /// comments are only a read-only view of `System.History` revisions.
    pub fn has_comments_api(self) -> bool {
        self != Profile::Server2019
    }

    /// Whether comments carry a `format` (markdown or html): only the 7.1 comments API
    /// has the `format` query parameter and field.
    pub fn has_comment_format(self) -> bool {
        self == Profile::Services
    }

    /// The default collection (or organisation) name in URLs.
    pub fn default_collection(self) -> &'static str {
        match self {
            Profile::Services => "fabrikam",
            _ => "DefaultCollection",
        }
    }

    /// The biggest simple (one-request) attachment upload: Services documents 130 MB;
    /// Server's default maximum attachment size is 4 MB.
    pub fn max_simple_attachment(self) -> usize {
        match self {
            Profile::Services => 130 * 1024 * 1024,
            _ => 4 * 1024 * 1024,
        }
    }

    /// The default total size of one attachment: Azure DevOps Server's default maximum
    /// attachment size is 4 MB for the whole file (chunked or not); Services allows 130 MB.
    pub fn attachment_limit(self) -> u64 {
        match self {
            Profile::Services => 130 * 1024 * 1024,
            _ => 4 * 1024 * 1024,
        }
    }

    /// The version gate. `None` (no `api-version`) is accepted for GET, as the service
    /// answers those with its default version, and refused for writes.
    pub fn check(self, raw: Option<&str>, method: &str, preview_only: bool) -> Result<(), ApiError> {
        let Some(raw) = raw else {
            if method == "GET" || method == "HEAD" {
                return Ok(());
            }
            return Err(ApiError::bad_request(
                "VssVersionNotSpecifiedException",
                format!(
                    "No api-version was supplied for the \"{method}\" request. The version must be \
                     supplied either as part of the Accept header (e.g. \"application/json; \
                     api-version=1.0\") or as a query parameter (e.g. \"?api-version=1.0\")."
                ),
            ));
        };
        let Some(req) = Requested::parse(raw) else {
            return Err(ApiError::bad_request(
                "VssInvalidApiVersionException",
                format!("The api-version '{raw}' is not valid."),
            ));
        };
        if req.version > self.named_latest() {
            return Err(version_out_of_range(&req.version.to_string(), self.named_latest()));
        }
        // Above the latest released version, everything is still preview.
        if (preview_only || req.version > self.latest()) && !req.preview {
            return Err(ApiError::bad_request(
                "VssInvalidPreviewVersionException",
                format!(
                    "The requested version \"{raw}\" of the resource is under preview. The \
                     -preview flag must be supplied in the api-version for such requests. For \
                     example: \"{}-preview\"",
                    req.version
                ),
            ));
        }
        Ok(())
    }
}

/// The refusal of a too-new version, worded as the service words it.
pub fn version_out_of_range(requested: &str, latest: Version) -> ApiError {
    ApiError::bad_request(
        "VssVersionOutOfRangeException",
        format!(
            "The requested REST API version of {requested} is out of range for this server. \
             The latest REST API version this server supports is {latest}."
        ),
    )
}

/// Reads the latest supported version back out of a version-gate message, as a client
/// probing a server does.
pub fn parse_latest_supported(message: &str) -> Option<Version> {
    const MARK: &str = "The latest REST API version this server supports is ";
    let start = message.find(MARK)? + MARK.len();
    let tail = &message[start..];
    let end = tail
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(tail.len());
    let num = tail[..end].trim_end_matches('.');
    Requested::parse(num).map(|r| r.version)
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown profile {s:?}: expected services, server-2022, server-2020 or server-2019"))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions_with_and_without_preview() {
        let r = Requested::parse("7.1-preview.4").unwrap();
        assert_eq!(
            (r.version.to_string(), r.preview, r.resource_version),
            ("7.1".into(), true, Some(4))
        );
        assert!(Requested::parse("7.0-preview").unwrap().preview);
        assert!(!Requested::parse("5.0").unwrap().preview);
        assert!(Requested::parse("seven").is_none());
        assert!(Requested::parse("7.1-beta").is_none());
    }

    #[test]
    fn gate_refuses_newer_versions_with_a_parseable_message() {
        let e = Profile::Server2019.check(Some("7.1"), "GET", false).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(parse_latest_supported(&e.message), Some(Version { major: 5, minor: 0 }));
        assert!(Profile::Server2019.check(Some("5.0"), "GET", false).is_ok());
        assert!(Profile::Server2019.check(Some("4.1"), "GET", false).is_ok());
        assert!(Profile::Services.check(Some("7.1-preview.4"), "POST", true).is_ok());
        assert!(Profile::Services.check(Some("7.1"), "POST", true).is_err());
        assert!(Profile::Services.check(None, "PATCH", false).is_err());
    }

    #[test]
    fn server_2020_names_a_preview_only_latest() {
        let e = Profile::Server2020.check(Some("7.1"), "GET", false).unwrap_err();
        assert!(
            e.message
                .ends_with("The latest REST API version this server supports is 6.1."),
            "{}",
            e.message
        );
        let e = Profile::Server2020.check(Some("6.1"), "GET", false).unwrap_err();
        assert_eq!(e.type_key, "VssInvalidPreviewVersionException");
        assert!(e.message.contains("\"6.1-preview\""), "{}", e.message);
        assert!(Profile::Server2020.check(Some("6.1-preview"), "GET", false).is_ok());
        assert!(Profile::Server2020.check(Some("6.0"), "GET", false).is_ok());
    }
}
