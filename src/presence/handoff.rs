//! The hand-off of committed transitions to the publisher (the status queue), shared by every
//! task that commits or republishes them, and what the committers share (`Committer`).
//! Decides nothing and orders nothing: committers hold their `CommitOrder` turn around it.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::info;

use super::due::DueTable;
use super::order::CommitOrder;
use crate::health::Health;
use crate::held::Held;
use crate::metrics::Metrics;
use crate::status::{Lag, Receipt, StatusOut};
use crate::store::{Committed, Store};

/// What the applier and the expirer share: Redis, the held heartbeats (their watermark), the
/// counters, the Redis health they report, the status queue, the turns, the due table.
#[derive(Clone)]
pub(crate) struct Committer {
    pub(crate) store: Store,
    pub(crate) held: Arc<Held>,
    pub(crate) metrics: Metrics,
    pub(crate) health: Arc<Health>,
    pub(crate) out: mpsc::Sender<StatusOut>,
    pub(crate) order: CommitOrder,
    pub(crate) due: Arc<DueTable>,
}

impl Committer {
    /// Counts transitions committed now and hands them to the publisher (their lag is
    /// observed).
    pub(crate) async fn hand_on(&self, committed: Vec<Committed>) {
        count(&self.metrics, &committed);
        publish(&self.out, committed, Lag::Observe).await;
    }
}

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
fn count(metrics: &Metrics, committed: &[Committed]) {
    for ev in committed.iter().filter_map(|c| c.event.device()) {
        metrics.transition_committed(ev.state);
        info!(device = %ev.device, state = ev.state.as_str(), seq = ev.seq, "Transition.");
    }
}

/// Whether the status queue is more than half full: a backlog of our own means the broker
/// is slow, not that a publisher died, and work that only republishes waits for it.
pub(crate) fn backlogged(out: &mpsc::Sender<StatusOut>) -> bool {
    out.capacity() * 2 < out.max_capacity()
}
