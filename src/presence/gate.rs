//! The backlog gate: whether every heartbeat that may still be on its way to us is in and
//! applied, and the cutoff below the ones we hold, so that an expiry (or forgetting)
//! decided now cannot overtake one (ARCHITECTURE.md, invariant 3). Pure reads of the MQTT task's sync marker and of the
//! held heartbeats' watermark; it must not wait or decide anything itself.

use std::time::Duration;

use tokio::sync::watch;

use crate::device::Millis;
use crate::held::Held;
use crate::store::Cutoff;

/// A timer that fires this much later than planned means the process was stalled (e.g.
/// SIGSTOP, a VM pause): heartbeats may be waiting unread, so expiries wait for a resync.
pub(crate) const STALL: Duration = Duration::from_millis(500);

/// Where the backlog gate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// The sync marker is back and everything received before it is applied.
    Open,
    /// The sync marker is back, but it is older than a stall, or heartbeats received
    /// before it are not applied yet.
    Draining,
    /// No sync marker since the last (re)connection to the broker: a gap in listening.
    NoMarker,
}

/// The gate for decisions that must not overtake a heartbeat: `ingest` is the MQTT task's
/// sync marker (the time it came back, `None` until it has since the last connection), and
/// only a marker at or after `since` counts (after a stall: one sent after it).
pub(crate) fn gate(ingest: &watch::Receiver<Option<Millis>>, held: &Held, since: Millis) -> Gate {
    let marker = *ingest.borrow();
    match marker {
        None => Gate::NoMarker,
        Some(t) if t >= since && held.watermark().is_none_or(|w| w > t) => Gate::Open,
        Some(_) => Gate::Draining,
    }
}

/// The latest deadline an expiry may be decided for now: before any heartbeat this replica
/// has not applied yet (the other replicas' are in their floors, `floor_lease` long).
pub(crate) fn cutoff(held: &Held, floor_lease: Duration, now: Millis) -> Cutoff {
    Cutoff {
        before: held.cutoff(now),
        floor_lease_ms: floor_lease.as_millis() as u64,
    }
}
