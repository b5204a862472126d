//! Injected faults: 429 with `Retry-After` and the `X-RateLimit-*` headers, 503, the
//! delayed mode's warnings on successes, and a gateway's 502/504 after the server committed.

use super::*;

/// Delayed mode: a success that carries the rate-limit headers telling the client to slow
/// down (the service sends `Retry-After` with a 200 before it starts blocking).
pub(super) fn rate_limit_warning(shared: &Shared) -> Option<Vec<(&'static str, String)>> {
    let mut f = lock(&shared.faults);
    if f.delayed == 0 {
        return None;
    }
    f.delayed -= 1;
    let secs = f.delayed_retry_after;
    drop(f);
    bump(shared, "fault.delayed");
    Some(rate_limit_headers(secs, "0.500"))
}

pub(super) fn rate_limit_headers(secs: u64, delay: &str) -> Vec<(&'static str, String)> {
    let reset = clock::now_ms() / 1000 + secs as i64;
    vec![
        ("retry-after", secs.to_string()),
        ("x-ratelimit-resource", "ATCPU".into()),
        ("x-ratelimit-delay", delay.to_string()),
        ("x-ratelimit-limit", "200".into()),
        ("x-ratelimit-remaining", "0".into()),
        ("x-ratelimit-reset", reset.to_string()),
    ]
}

pub(super) fn fault(shared: &Shared, endpoint: &str) -> Option<Reply> {
    let mut f = lock(&shared.faults);
    if f.only.as_deref().is_some_and(|only| only != endpoint) {
        return None;
    }
    if f.throttle > 0 {
        f.throttle -= 1;
        let secs = f.throttle_retry_after;
        drop(f);
        bump(shared, "fault.429");
        let e = ApiError::new(
            429,
            "RequestBlockedException",
            "TF400733: The request has been canceled: Request was blocked due to exceeding usage of resource 'ATCPU' in namespace 'User'.",
        );
        let mut r = Reply::err(&e);
        r.headers = rate_limit_headers(secs, "0.000");
        return Some(r);
    }
    if f.unavailable > 0 {
        f.unavailable -= 1;
        let secs = f.unavailable_retry_after;
        drop(f);
        bump(shared, "fault.503");
        let e = ApiError::new(
            503,
            "ServiceUnavailableException",
            "TF400898: The service is temporarily unavailable. Try again later.",
        );
        let mut r = Reply::err(&e);
        r.headers = vec![("retry-after", secs.to_string())];
        return Some(r);
    }
    None
}

/// A gateway's answer in place of the server's, for a request that already took effect: what
/// a load balancer or proxy sends when the server answered too late or the connection to it
/// broke. Not JSON, as a gateway has no Azure DevOps error body to give.
pub(super) fn after_commit(shared: &Shared, endpoint: &str) -> Option<Reply> {
    let mut f = lock(&shared.faults);
    let (status, left) = f.after_commit.get_mut(endpoint)?;
    let status = *status;
    *left -= 1;
    if *left == 0 {
        f.after_commit.remove(endpoint);
    }
    drop(f);
    bump(shared, &format!("fault.{status}.after-commit"));
    let reason = if status == 504 {
        "Gateway Timeout"
    } else {
        "Bad Gateway"
    };
    Some(Reply {
        status,
        body: Bytes::from(format!(
            "<html><head><title>{status} {reason}</title></head><body><h1>{status} {reason}</h1></body></html>"
        )),
        content_type: "text/html",
        headers: Vec::new(),
    })
}

/// The words of the attachment size refusal, with the limit in MB as the server prints it.
pub(super) fn attachment_too_large(limit: u64) -> ApiError {
    let mb = limit as f64 / (1024.0 * 1024.0);
    ApiError::bad_request(
        "FileAttachmentException",
        format!(
            "TF237082: The file you are trying to upload exceeds the supported file upload size ({mb:.3} MB(s)). \
             Instead of uploading the file, add the file to version control or to the team project web site, and \
             then link the file to the work item."
        ),
    )
}
