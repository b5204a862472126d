//! systemd integration: readiness, STATUS lines, STOPPING and watchdog pings over
//! `NOTIFY_SOCKET` (the one module that knows sd-notify), and whether stderr is the journal.
//! Each piece acts only when the service manager set its environment variable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::error::OpResult;
use crate::status::ConnectionStatus;

/// How often the STATUS line is refreshed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// The order states appear in a STATUS line.
const STATES: [&str; 4] = ["active", "pending", "deactivated", "revoked"];

/// Whether a service manager listens for notifications.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    // The variables stay set (`false`): unsetting them would race with other threads that
    // read the environment.
    if let Err(e) = sd_notify::notify(false, states) {
        // Once is enough: the same failure would otherwise repeat with every ping.
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}

/// Half the watchdog interval the service manager asked for (`WATCHDOG_USEC` for this
/// process), or `None` when no watchdog is set.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    // A tokio interval must not be zero, whatever the environment says.
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// One line about the connections, e.g. `3 connections: 2 active, 1 deactivated; 0 queued
/// outbound, 4 queued inbound`.
pub fn summary(list: &[ConnectionStatus]) -> String {
    let n = list.len();
    let mut line = format!("{n} connection{}", if n == 1 { "" } else { "s" });
    let mut counts: Vec<String> = STATES
        .iter()
        .map(|state| (state, list.iter().filter(|c| c.state == *state).count()))
        .filter(|(_, count)| *count > 0)
        .map(|(state, count)| format!("{count} {state}"))
        .collect();
    let other = list.iter().filter(|c| !STATES.contains(&c.state.as_str())).count();
    if other > 0 {
        counts.push(format!("{other} other"));
    }
    if !counts.is_empty() {
        line.push_str(": ");
        line.push_str(&counts.join(", "));
    }
    let outbound: u64 = list.iter().map(|c| c.outbound.depth).sum();
    let inbound: u64 = list.iter().map(|c| c.inbound.depth).sum();
    line.push_str(&format!("; {outbound} queued outbound, {inbound} queued inbound"));
    let dead: u64 = list
        .iter()
        .map(|c| c.outbound.dead_letters + c.inbound.dead_letters)
        .sum();
    if dead > 0 {
        line.push_str(&format!(", {dead} dead letters"));
    }
    line
}

/// What the STATUS line is made from: the daemon's connections, read afresh each time.
pub type Statuses = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = OpResult<Vec<ConnectionStatus>>> + Send>>
        + Send
        + Sync,
>;

async fn describe(statuses: &Statuses) -> String {
    match statuses().await {
        Ok(list) => summary(&list),
        Err(e) => format!("status unavailable: {e}"),
    }
}

/// A daemon's conversation with the service manager. Dropping it stops the pings.
#[derive(Default)]
pub struct Notifier {
    stopping_sent: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Notifier {
    /// Says READY=1 with a first STATUS line (call once listeners are bound and the database
    /// is open), then refreshes STATUS every [`STATUS_INTERVAL`], pings the watchdog at half
    /// its interval, and says STOPPING=1 as soon as `token` is cancelled. Does nothing without
    /// `NOTIFY_SOCKET`.
    pub async fn start(statuses: Statuses, token: CancellationToken) -> Notifier {
        if !enabled() {
            return Notifier::default();
        }
        send(&[NotifyState::Ready, NotifyState::Status(&describe(&statuses).await)]);
        let stopping_sent = Arc::new(AtomicBool::new(false));
        let mut tasks = vec![tokio::spawn(refresh(statuses, token, stopping_sent.clone()))];
        if let Some(every) = watchdog_interval() {
            tracing::debug!(every = ?every, "pinging the systemd watchdog");
            tasks.push(tokio::spawn(ping(every)));
        }
        Notifier { stopping_sent, tasks }
    }

    /// Says STOPPING=1 unless that was said already, and stops the pings: for a daemon that
    /// ended without its token being cancelled.
    pub fn stop(self) {
        if enabled() && !self.stopping_sent.swap(true, Ordering::Relaxed) {
            send(&[NotifyState::Stopping]);
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn refresh(statuses: Statuses, token: CancellationToken, stopping_sent: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + STATUS_INTERVAL, STATUS_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => {
                if !stopping_sent.swap(true, Ordering::Relaxed) {
                    send(&[NotifyState::Stopping, NotifyState::Status("stopping: draining and flushing")]);
                }
                return;
            }
            _ = tick.tick() => send(&[NotifyState::Status(&describe(&statuses).await)]),
        }
    }
}

/// Pings from a task on the async runtime, not a thread of its own: if the runtime wedges,
/// the pings stop and the service manager restarts the process.
async fn ping(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

/// Whether stderr is a journal stream: systemd sets `JOURNAL_STREAM` to its `device:inode`.
/// Comparing with stderr itself, not just testing the variable, keeps a child whose stderr
/// was redirected (but which inherited the variable) on ordinary output.
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM")
        .ok()
        .and_then(|v| parse_journal_stream(&v))
    else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => meta.dev() == dev && meta.ino() == ino,
        Err(_) => false,
    }
}

fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::QueueStats;

    fn conn(state: &str, outbound: u64, inbound: u64, dead: u64) -> ConnectionStatus {
        ConnectionStatus {
            name: "c".into(),
            state: state.into(),
            local: String::new(),
            remote: String::new(),
            description: String::new(),
            mode: "script".into(),
            project: String::new(),
            deliver_to: None,
            last_contact_ms: None,
            outbound: QueueStats {
                depth: outbound,
                ..QueueStats::default()
            },
            inbound: QueueStats {
                depth: inbound,
                dead_letters: dead,
                ..QueueStats::default()
            },
            last_error: None,
            invitation_expires_at: None,
            recent_dead_letters: Vec::new(),
            holds: Vec::new(),
            sync: None,
            trust: None,
            route: None,
        }
    }

    #[test]
    fn summaries_count_states_and_queues() {
        assert_eq!(summary(&[]), "0 connections; 0 queued outbound, 0 queued inbound");
        assert_eq!(
            summary(&[conn("active", 1, 0, 0)]),
            "1 connection: 1 active; 1 queued outbound, 0 queued inbound"
        );
        assert_eq!(
            summary(&[
                conn("deactivated", 2, 3, 0),
                conn("active", 0, 0, 0),
                conn("active", 0, 1, 2),
            ]),
            "3 connections: 2 active, 1 deactivated; 2 queued outbound, 4 queued inbound, 2 dead letters"
        );
    }

    #[test]
    fn journal_stream_values() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }
}
