//! Retry pacing: jittered exponential backoff that honours `Retry-After`; the one place that
//! knows the backoff crate.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use tokio_util::sync::CancellationToken;

/// The longest `Retry-After` we honour; a peer asking for more gets retried sooner.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Retry delays for one loop: grows ×2 from `initial` to `max`, each ±50 % jitter, forever.
pub struct Backoff {
    inner: backoff::ExponentialBackoff,
}

impl Backoff {
    /// A fresh schedule.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let inner = backoff::ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: 0.5,
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..Default::default()
        };
        Backoff { inner }
    }

    /// The delay before the next attempt; at least `retry_after` when the peer sent one.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let jittered = self.inner.next_backoff().unwrap_or(self.inner.max_interval);
        match retry_after {
            Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }

    /// Back to the first delay, after a healthy exchange.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Sleeps for `delay`; false when `token` was cancelled first.
pub async fn sleep(delay: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay(None);
        assert!(
            first >= Duration::from_millis(50) && first <= Duration::from_millis(150),
            "{first:?}"
        );
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next_delay(None);
        }
        assert!(
            last <= Duration::from_secs(3),
            "jitter stays within 1.5x the cap: {last:?}"
        );
        assert!(last >= Duration::from_secs(1), "{last:?}");
        b.reset();
        assert!(b.next_delay(None) <= Duration::from_millis(150));
    }

    #[test]
    fn retry_after_is_a_floor_with_a_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        assert!(b.next_delay(Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        assert!(b.next_delay(Some(Duration::from_secs(86_400))) <= MAX_RETRY_AFTER);
    }
}
