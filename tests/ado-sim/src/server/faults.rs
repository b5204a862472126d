//! Injected faults: 429 with `Retry-After` and the `X-RateLimit-*` headers, 503, and the
//! delayed mode's warnings on successes.

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
