//! The signal between the scripts that find a bucket's data gone and the rebuild.
//!
//! Owns [`Loss`]. Must not rebuild anything (`rebuild.rs` does) nor decide that a bucket is
//! lost (the scripts do, by its missing epoch key).

use tokio::sync::{watch, Notify};

/// Tells the rebuilder that a script found a bucket's data gone, and the applier that the
/// rebuild is done (the generation counts finished rebuilds).
#[derive(Debug)]
pub(crate) struct Loss {
    lost: Notify,
    rebuilt: watch::Sender<u64>,
}

impl Default for Loss {
    fn default() -> Self {
        Loss {
            lost: Notify::new(),
            rebuilt: watch::Sender::new(0),
        }
    }
}

impl Loss {
    /// A script found a bucket without its epoch key.
    pub(crate) fn report(&self) {
        self.lost.notify_one();
    }

    /// Completes when a loss was reported (also one reported before the call).
    pub(crate) async fn reported(&self) {
        self.lost.notified().await;
    }

    /// A rebuild finished: what was held for the lost buckets can be applied now.
    pub(crate) fn rebuilt(&self) {
        self.rebuilt.send_modify(|g| *g += 1);
    }

    /// Finished rebuilds, to wait on with `changed()`.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.rebuilt.subscribe()
    }
}
