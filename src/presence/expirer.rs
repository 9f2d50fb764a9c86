//! When offline transitions are decided: the expirer's loop, one handler per event (the
//! gate closed, a reconciliation owed, an `expired` event, the safety net, a bucket's
//! deadline, a failed Redis call). The Redis calls themselves are `sweep`'s; this must not
//! decide anything while the backlog gate (`gate`) is closed, and never counts a wait for
//! anything but its own timers as a stall.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::gate::{gate, Gate, STALL};
use super::handoff::Committer;
use super::stamper::FLOOR_EVERY;
use super::sweep::{Progress, Source, Sweeper, SWEEP_LIMIT};
use crate::device::{now_ms, DeviceId, Millis};
use crate::store::StoreError;
use crate::telemetry::{Backoff, LogLimiter};

/// How often every bucket is swept whatever the known deadlines (the safety net; it also
/// learns deadlines set by other replicas).
const SAFETY_EVERY: Duration = Duration::from_secs(1);
/// Sweeps of due buckets are spaced at least this much, so that a steady trickle of
/// deadlines is handled in batches.
const MIN_SWEEP_GAP: Duration = Duration::from_millis(2);
/// How often a closed gate, or a due deadline behind a heartbeat still being applied, is
/// looked at again.
const RECHECK: Duration = Duration::from_millis(20);

/// Decides offline transitions.
pub(crate) struct Expirer {
    pub(crate) commit: Committer,
    pub(crate) expired_rx: mpsc::Receiver<DeviceId>,
    pub(crate) reconcile: Arc<Notify>,
    pub(crate) ingest: watch::Receiver<Option<Millis>>,
    /// Asks the MQTT task for a fresh sync marker after a stall.
    pub(crate) resync: Arc<Notify>,
    /// How long another replica's floor stands without renewal (see `Stamper`).
    pub(crate) floor_lease: Duration,
    /// Due deadlines wait for another replica's floor until then.
    pub(crate) floor_wait: Instant,
}

impl Expirer {
    pub(crate) async fn run(self, token: CancellationToken) {
        let sweeper = Sweeper {
            commit: self.commit,
            floor_lease: self.floor_lease,
            floor_wait: self.floor_wait,
        };
        let now = Instant::now();
        let state = State {
            sweeper,
            expired_rx: self.expired_rx,
            reconcile: self.reconcile,
            ingest: self.ingest,
            resync: self.resync,
            token,
            limiter: LogLimiter::new(Duration::from_secs(10)),
            backoff: Backoff::new(Duration::from_secs(2)),
            reconcile_owed: true,
            next_safety: now + SAFETY_EVERY,
            stalled_at: 0,
            last_sweep: now,
        };
        state.run().await;
    }
}

/// What woke the expirer while its gate was open.
enum Wake {
    Reconcile,
    Expired(DeviceId),
    SafetyNet,
    /// An earlier deadline became known.
    Recompute,
    Due,
}

/// What one turn of the loop came to.
enum Turn {
    /// Cancelled (or the MQTT task is gone).
    Stop,
    /// Waited without asking Redis anything (gate closed, a stall): the backoff stands.
    Waited,
    /// Handled an event: success resets the backoff, an error is backed off from.
    Done(Result<(), StoreError>),
}

/// Whether a pause ran to its end.
enum Flow {
    Go,
    Stop,
}

/// When the next wait of an open gate ends.
struct Plan {
    /// When the due buckets are swept.
    due: Instant,
    /// When the wait is planned to end (the earlier timer), as planned before it began: a
    /// wake-up much later than this is a stall.
    planned: Instant,
}

/// The expirer between two events.
struct State {
    sweeper: Sweeper,
    expired_rx: mpsc::Receiver<DeviceId>,
    reconcile: Arc<Notify>,
    ingest: watch::Receiver<Option<Millis>>,
    resync: Arc<Notify>,
    token: CancellationToken,
    limiter: LogLimiter,
    backoff: Backoff,
    /// A reconciliation is owed at start and after every gap.
    reconcile_owed: bool,
    next_safety: Instant,
    /// After a stall, only a sync marker newer than this opens the gate again.
    stalled_at: Millis,
    last_sweep: Instant,
}

impl State {
    async fn run(mut self) {
        loop {
            // Expiries wait while heartbeats may still be on their way: until the MQTT
            // backlog is in (the sync marker) and everything received before it is applied.
            let turn = match gate(&self.ingest, &self.sweeper.commit.held, self.stalled_at) {
                Gate::Open if self.reconcile_owed => self.reconcile().await,
                Gate::Open => self.next_event().await,
                closed => self.gate_closed(closed).await,
            };
            match turn {
                Turn::Stop => break,
                Turn::Waited => {}
                Turn::Done(Ok(())) => self.backoff.reset(),
                Turn::Done(Err(e)) => {
                    if let Flow::Stop = self.failed(e).await {
                        break;
                    }
                }
            }
        }
        debug!("Expirer stopped.");
    }

    /// Waits for the gate to open; a gap in listening (no sync marker) owes a reconcile.
    async fn gate_closed(&mut self, gate: Gate) -> Turn {
        if gate == Gate::NoMarker {
            self.reconcile_owed = true;
        }
        tokio::select! {
            () = self.token.cancelled() => Turn::Stop,
            r = self.ingest.changed() => if r.is_err() { Turn::Stop } else { Turn::Waited },
            () = tokio::time::sleep(RECHECK) => Turn::Waited,
        }
    }

    /// Sweeps every bucket until nothing overdue is left. Not done until every overdue
    /// device is decided: blocked by other replicas' floors, it tries again when they have
    /// moved (or their leases ran out).
    async fn reconcile(&mut self) -> Turn {
        match self.sweeper.sweep_all(Source::Reconcile).await {
            Ok(Progress::Complete) => {
                self.reconcile_owed = false;
                self.next_safety = Instant::now() + SAFETY_EVERY;
                Turn::Done(Ok(()))
            }
            Ok(Progress::Blocked) => match self.pause(FLOOR_EVERY).await {
                Flow::Go => Turn::Done(Ok(())),
                Flow::Stop => Turn::Stop,
            },
            Err(e) => Turn::Done(Err(e)),
        }
    }

    /// Waits for the next event and handles it.
    async fn next_event(&mut self) -> Turn {
        let plan = self.plan();
        // Due deadlines come before notifications: during a mass expiry Redis notifies at
        // its own (slow) pace, and must not hold the sweep back.
        let woke = tokio::select! {
            biased;
            () = self.token.cancelled() => return Turn::Stop,
            () = self.reconcile.notified() => Wake::Reconcile,
            () = tokio::time::sleep_until(plan.due) => Wake::Due,
            () = tokio::time::sleep_until(self.next_safety) => Wake::SafetyNet,
            Some(id) = self.expired_rx.recv() => Wake::Expired(id),
            () = self.sweeper.commit.due.wake.notified() => Wake::Recompute,
        };
        // A wake-up far later than any timer we set: the process was stopped (or starved).
        if Instant::now() > plan.planned + STALL {
            return self.stalled(plan.planned);
        }
        match woke {
            Wake::Reconcile => {
                self.reconcile_owed = true;
                Turn::Done(Ok(()))
            }
            Wake::Expired(id) => Turn::Done(self.expired(id).await),
            Wake::SafetyNet => Turn::Done(self.safety_net().await),
            Wake::Recompute => Turn::Done(Ok(())),
            Wake::Due => Turn::Done(self.due_sweep().await),
        }
    }

    /// Plans the wait for the next due sweep (and the safety net).
    fn plan(&self) -> Plan {
        let now = now_ms();
        let cutoff = self.sweeper.cutoff(now).before;
        let earliest = self.sweeper.commit.due.earliest();
        let due = if earliest <= cutoff {
            (self.last_sweep + MIN_SWEEP_GAP).max(self.sweeper.floor_wait)
        } else if earliest <= now {
            // Due, but a heartbeat older than it is still being applied.
            Instant::now() + RECHECK
        } else {
            let ms = (earliest - now).min(SAFETY_EVERY.as_millis() as u64);
            Instant::now() + Duration::from_millis(ms)
        };
        // A wake-up already due (e.g. a deadline left overdue while held heartbeats pinned
        // the cutoff) is planned for now, not for when it became due: it is no sign of a
        // stall.
        let planned = due.min(self.next_safety).max(Instant::now());
        Plan { due, planned }
    }

    /// Decides nothing until a fresh sync marker proves the heartbeats that arrived during
    /// the stall are in.
    fn stalled(&mut self, planned: Instant) -> Turn {
        warn!(
            late_ms = (Instant::now() - planned).as_millis() as u64,
            "The process was stalled; waiting for queued heartbeats before deciding expiries."
        );
        self.stalled_at = now_ms();
        self.reconcile_owed = true;
        self.resync.notify_one();
        Turn::Waited
    }

    /// Expires the devices of the queued `expired` events (this one and what else is queued,
    /// up to a sweep's worth).
    async fn expired(&mut self, first: DeviceId) -> Result<(), StoreError> {
        let mut ids = vec![first];
        while ids.len() < SWEEP_LIMIT {
            match self.expired_rx.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        self.sweeper.expire(&ids).await
    }

    async fn safety_net(&mut self) -> Result<(), StoreError> {
        self.next_safety = Instant::now() + SAFETY_EVERY;
        self.sweeper.sweep_all(Source::SafetyNet).await.map(|_| ())
    }

    async fn due_sweep(&mut self) -> Result<(), StoreError> {
        self.last_sweep = Instant::now();
        self.sweeper.sweep_due().await
    }

    /// A Redis call failed: something may expire while Redis is away, so reconcile when it
    /// is back; wait out the backoff first.
    async fn failed(&mut self, e: StoreError) -> Flow {
        self.sweeper.commit.health.set_redis_commands(false);
        if let Some(n) = self.limiter.check() {
            warn!(error = %e, suppressed = n, "Cannot decide expiries in Redis; retrying.");
        }
        self.reconcile_owed = true;
        let delay = self.backoff.next_delay();
        self.pause(delay).await
    }

    /// Sleeps, unless cancelled first.
    async fn pause(&self, d: Duration) -> Flow {
        tokio::select! {
            () = self.token.cancelled() => Flow::Stop,
            () = tokio::time::sleep(d) => Flow::Go,
        }
    }
}
