//! The turns of the committers of transitions (applier, expirer, forgetter) in this
//! process. Owns only the turn: it must not look at what is committed.

use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard};

/// One committer of transitions at a time in this process, from its Redis call until what it
/// committed is in the status queue: the queue then holds a device's seqs in the order Redis
/// committed them. Without it an expiry batch (seq n, offline) could be queued after the
/// heartbeat that the applier committed right after it (seq n + 1, online), and a subscriber
/// that keeps the highest seq would never see n. Republished statuses (acknowledgements,
/// claims, a lost session) need no turn: they repeat a seq already queued.
#[derive(Clone, Default)]
pub(crate) struct CommitOrder(Arc<Mutex<()>>);

impl CommitOrder {
    /// Waits for this committer's turn; it lasts as long as the guard.
    pub(crate) async fn turn(&self) -> MutexGuard<'_, ()> {
        self.0.lock().await
    }
}
