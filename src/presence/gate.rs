//! The backlog gate: whether every heartbeat that may still be on its way to us is in and
//! applied, and the cutoff below the ones we hold, so that an expiry (or forgetting)
//! decided now cannot overtake one (ARCHITECTURE.md, invariant 3). Reads the MQTT task's
//! sync marker, the held heartbeats' watermark and the process's [`Pulse`]; it must not wait
//! or decide anything itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::device::now_ms;
use crate::held::Held;
use crate::pulse::{Pulse, Synced};
use crate::store::Cutoff;

/// Where the backlog gate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// The sync marker is back and everything received before it is applied.
    Open,
    /// The sync marker is back, but heartbeats received before it are not applied yet.
    Draining,
    /// The process stalled after the marker was sent (or the heartbeat reader is held up
    /// now): heartbeats may wait unread behind it, until a fresh marker is back.
    Stalled,
    /// No sync marker since the last (re)connection to the broker: a gap in listening.
    NoMarker,
}

/// The gate, as every decider sees it.
#[derive(Clone)]
pub(crate) struct Backlog {
    /// The MQTT task's sync marker (`None` until it is back since the last connection).
    ingest: watch::Receiver<Option<Synced>>,
    held: Arc<Held>,
    pulse: Arc<Pulse>,
}

impl Backlog {
    pub(crate) fn new(
        ingest: watch::Receiver<Option<Synced>>,
        held: Arc<Held>,
        pulse: Arc<Pulse>,
    ) -> Backlog {
        Backlog {
            ingest,
            held,
            pulse,
        }
    }

    /// Where the gate stands now. A stall nobody has noticed yet is noticed here.
    pub(crate) fn gate(&self) -> Gate {
        let stalls = self.pulse.beat();
        let marker = *self.ingest.borrow();
        match marker {
            None => Gate::NoMarker,
            Some(m) if m.stalls != stalls || !self.pulse.reader_fresh() => Gate::Stalled,
            Some(m) if self.held.watermark().is_none_or(|w| w > m.at) => Gate::Open,
            Some(_) => Gate::Draining,
        }
    }

    /// The latest deadline an expiry may be decided for now (before any heartbeat this
    /// replica has not applied yet; the other replicas' are in their floors, `floor_lease`
    /// long), if the gate is open. The gate is asked *after* the clock is read: a stall
    /// before that moment closes it, so a cutoff never reaches into a pause whose heartbeats
    /// are unread.
    pub(crate) fn cutoff(&self, floor_lease: Duration) -> Result<Cutoff, Gate> {
        let before = self.held.cutoff(now_ms());
        match self.gate() {
            Gate::Open => Ok(Cutoff {
                before,
                floor_lease_ms: floor_lease.as_millis() as u64,
            }),
            closed => Err(closed),
        }
    }

    /// Whether the heartbeat reader noted lately (see [`Pulse::reader_fresh`]).
    pub(crate) fn reader_fresh(&self) -> bool {
        self.pulse.reader_fresh()
    }

    /// The process's stall count now (see [`Pulse::beat`]).
    pub(crate) fn stalls(&self) -> u64 {
        self.pulse.beat()
    }

    /// Waits for the sync marker to change; `false` once the MQTT task is gone.
    pub(crate) async fn changed(&mut self) -> bool {
        self.ingest.changed().await.is_ok()
    }

    pub(crate) fn held(&self) -> &Arc<Held> {
        &self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beat::{Named, Stamp};
    use crate::device::DeviceId;

    fn backlog() -> (watch::Sender<Option<Synced>>, Backlog) {
        let (tx, rx) = watch::channel(None);
        let held = Arc::new(Held::new(16));
        (tx, Backlog::new(rx, held, Arc::new(Pulse::default())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_reader_held_up_closes_it() {
        let (tx, backlog) = backlog();
        tx.send_replace(Some(Synced {
            at: now_ms(),
            stalls: 0,
        }));
        backlog.pulse.reader_beat();
        for _ in 0..8 {
            tokio::time::advance(Duration::from_millis(100)).await;
            backlog.pulse.beat(); // the rest of the process runs
        }
        assert_eq!(backlog.gate(), Gate::Stalled);
        assert_eq!(
            backlog.pulse.reader_beat(),
            1,
            "the reader counts its own gap"
        );
        assert_eq!(
            backlog.gate(),
            Gate::Stalled,
            "until a fresh marker is back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_with_the_marker_and_closes_at_a_stall_after_it() {
        let (tx, backlog) = backlog();
        assert_eq!(backlog.gate(), Gate::NoMarker);
        assert!(backlog.cutoff(Duration::from_secs(1)).is_err());
        tx.send_replace(Some(Synced {
            at: now_ms(),
            stalls: 0,
        }));
        assert_eq!(backlog.gate(), Gate::Open);
        assert!(backlog.cutoff(Duration::from_secs(1)).is_ok());

        // Paused: nothing noted that the process ran, as after SIGSTOP.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(
            matches!(backlog.cutoff(Duration::from_secs(1)), Err(Gate::Stalled)),
            "the first look after the pause sees it"
        );
        // The reader reads again (so only the count can keep it closed).
        assert_eq!(backlog.pulse.reader_beat(), 1);
        assert_eq!(backlog.gate(), Gate::Stalled, "it stays closed");
        tx.send_replace(Some(Synced {
            at: now_ms(),
            stalls: 1,
        }));
        assert_eq!(
            backlog.gate(),
            Gate::Open,
            "until a marker sent after it is back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_read_before_the_marker_hold_it_until_applied() {
        let (tx, backlog) = backlog();
        let id = DeviceId::parse("d").unwrap();
        backlog
            .held()
            .insert(id, Named::default(), Duration::from_secs(60), || {
                Stamp::Live
            });
        tx.send_replace(Some(Synced {
            at: now_ms() + 1,
            stalls: 0,
        }));
        assert_eq!(backlog.gate(), Gate::Draining);
    }
}
