//! The hand-off of committed transitions to the publisher (the status queue), shared by every
//! task that commits or republishes them. Decides nothing and orders nothing: committers
//! hold their `CommitOrder` turn around it.

use tokio::sync::mpsc;
use tracing::info;

use crate::metrics::Metrics;
use crate::status::{Lag, Receipt, StatusOut};
use crate::store::Committed;

/// Whether everything was handed to the publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Handed {
    All,
    /// The MQTT task is gone (shutdown): the outbox still holds what was not handed.
    QueueClosed,
}

/// Hands committed transitions to the publisher; awaits room (backpressure).
pub(crate) async fn publish(
    out: &mpsc::Sender<StatusOut>,
    committed: Vec<Committed>,
    lag: Lag,
) -> Handed {
    for c in committed {
        let status = StatusOut {
            event: c.event,
            receipt: Receipt {
                bucket: c.bucket,
                member: c.member,
            },
            lag,
        };
        if out.send(status).await.is_err() {
            return Handed::QueueClosed;
        }
    }
    Handed::All
}

/// Counts and logs transitions this process committed.
pub(crate) fn count(metrics: &Metrics, committed: &[Committed]) {
    for c in committed {
        metrics.transition_committed(c.event.state);
        info!(device = %c.event.device, state = c.event.state.as_str(), seq = c.event.seq, "Transition.");
    }
}

/// Whether the status queue is more than half full: a backlog of our own means the broker
/// is slow, not that a publisher died, and work that only republishes waits for it.
pub(crate) fn backlogged(out: &mpsc::Sender<StatusOut>) -> bool {
    out.capacity() * 2 < out.max_capacity()
}
