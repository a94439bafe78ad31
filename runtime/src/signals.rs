//! Shutdown on SIGTERM or Ctrl-C.

use tokio_util::sync::CancellationToken;

/// Cancelled on the first SIGTERM or Ctrl-C (a drain); the second one exits at once
/// with status 130. Must be called inside a Tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("cannot listen for SIGTERM");
    tokio::spawn(async move {
        for count in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm.recv() => {}
            }
            if count > 0 {
                std::process::exit(130);
            }
            tracing::info!("stopping (signal again to exit at once)");
            trigger.cancel();
        }
    });
    shutdown
}
