//! The process's shutdown trigger: SIGTERM or SIGINT.
//!
//! It must not stop anything itself: `run` owns the shutdown order.

use tokio::signal::unix::{self as unix, SignalKind};
use tracing::info;

/// Completes on the first SIGTERM or SIGINT.
///
/// * SIGTERM: what systemd and Kubernetes send to stop a service.
/// * SIGINT: Ctrl-C, so a developer's terminal stops it the same graceful way.
///
/// If a handler cannot be installed (no signal support), that signal never fires; the
/// other still does.
pub async fn signal() {
    let term = async {
        match unix::signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let int = async {
        match unix::signal(SignalKind::interrupt()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => info!("SIGTERM received; shutting down."),
        () = int => info!("SIGINT received; shutting down."),
    }
}
