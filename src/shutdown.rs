//! Process-wide shutdown: one root cancellation token, tripped by SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT. A second signal is left to the default
/// handling only in the sense that we keep waiting; draining is bounded by deadlines anyway.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
    Ok(())
}
