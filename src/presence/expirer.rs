//! When offline transitions are decided: the expirer's loop, one handler per event (the
//! gate closed, a reconciliation owed, an `expired` event, the safety net, a bucket's
//! deadline, a failed Redis call). The Redis calls themselves are `sweep`'s; this must not
//! decide anything while the backlog gate (`gate`) is closed: a stall of the process closes
//! it, whenever it happened (see `crate::pulse`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::gate::{Backlog, Gate};
use super::handoff::Committer;
use super::stamper::FLOOR_EVERY;
use super::sweep::{Progress, Source, SweepError, Sweeper, SWEEP_LIMIT};
use crate::device::{now_ms, DeviceId};
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
    pub(crate) backlog: Backlog,
    /// How long another replica's floor stands without renewal (see `Stamper`).
    pub(crate) floor_lease: Duration,
    /// Due deadlines wait for another replica's floor until then.
    pub(crate) floor_wait: Instant,
}

impl Expirer {
    pub(crate) async fn run(self, token: CancellationToken) {
        let sweeper = Sweeper {
            commit: self.commit,
            backlog: self.backlog.clone(),
            floor_lease: self.floor_lease,
            floor_wait: self.floor_wait,
        };
        let now = Instant::now();
        let state = State {
            sweeper,
            expired_rx: self.expired_rx,
            reconcile: self.reconcile,
            backlog: self.backlog,
            token,
            limiter: LogLimiter::new(Duration::from_secs(10)),
            backoff: Backoff::new(Duration::from_secs(2)),
            owed: Some(Source::Reconcile),
            next_safety: now + SAFETY_EVERY,
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
    /// Waited without asking Redis anything (gate closed): the backoff stands.
    Waited,
    /// Handled an event: success resets the backoff, an error is backed off from.
    Done(Result<(), SweepError>),
}

/// Whether a pause ran to its end.
enum Flow {
    Go,
    Stop,
}

/// The expirer between two events.
struct State {
    sweeper: Sweeper,
    expired_rx: mpsc::Receiver<DeviceId>,
    reconcile: Arc<Notify>,
    backlog: Backlog,
    token: CancellationToken,
    limiter: LogLimiter,
    backoff: Backoff,
    /// A reconciliation is owed at start and after every gap.
    owed: Option<Source>,
    next_safety: Instant,
    last_sweep: Instant,
}

impl State {
    async fn run(mut self) {
        loop {
            // Expiries wait while heartbeats may still be on their way: until the MQTT
            // backlog is in (the sync marker) and everything received before it is applied.
            let turn = match self.backlog.gate() {
                Gate::Open if self.owed.is_some() => self.reconcile().await,
                Gate::Open => self.next_event().await,
                closed => self.gate_closed(closed).await,
            };
            match turn {
                Turn::Stop => break,
                Turn::Waited => {}
                Turn::Done(Ok(())) => self.backoff.reset(),
                Turn::Done(Err(SweepError::Closed(gate))) => self.closed_before_the_call(gate),
                Turn::Done(Err(SweepError::Store(e))) => {
                    if let Flow::Stop = self.failed(e).await {
                        break;
                    }
                }
            }
        }
        debug!("Expirer stopped.");
    }

    /// Waits for the gate to open; a gap in listening (no sync marker, a stall) owes a
    /// reconcile.
    async fn gate_closed(&mut self, gate: Gate) -> Turn {
        match gate {
            Gate::NoMarker => self.owe(Source::Reconcile),
            Gate::Stalled => self.owe(Source::AfterStall),
            Gate::Open | Gate::Draining => {}
        }
        tokio::select! {
            () = self.token.cancelled() => Turn::Stop,
            open = self.backlog.changed() => if open { Turn::Waited } else { Turn::Stop },
            () = tokio::time::sleep(RECHECK) => Turn::Waited,
        }
    }

    /// The gate closed between the event and its Redis call (the process stalled, say):
    /// nothing was decided, and what the event named is found by the reconciliation.
    fn closed_before_the_call(&mut self, gate: Gate) {
        debug!(
            ?gate,
            "The backlog gate closed before the call; reconciling once it opens."
        );
        self.owe(match gate {
            Gate::Stalled => Source::AfterStall,
            _ => Source::Reconcile,
        });
    }

    /// A reconciliation is owed: after a gap in listening (all it finds was missed), or
    /// after a stall (only what is long overdue was); the first kind wins.
    fn owe(&mut self, source: Source) {
        if self.owed != Some(Source::Reconcile) {
            self.owed = Some(source);
        }
    }

    /// Sweeps every bucket until nothing overdue is left. Not done until every overdue
    /// device is decided: blocked by other replicas' floors, it tries again when they have
    /// moved (or their leases ran out).
    async fn reconcile(&mut self) -> Turn {
        let source = self.owed.unwrap_or(Source::Reconcile);
        match self.sweeper.sweep_all(source).await {
            Ok(Progress::Complete) => {
                self.owed = None;
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
        let due = self.due_at();
        // Due deadlines come before notifications: during a mass expiry Redis notifies at
        // its own (slow) pace, and must not hold the sweep back.
        let woke = tokio::select! {
            biased;
            () = self.token.cancelled() => return Turn::Stop,
            () = self.reconcile.notified() => Wake::Reconcile,
            () = tokio::time::sleep_until(due) => Wake::Due,
            () = tokio::time::sleep_until(self.next_safety) => Wake::SafetyNet,
            Some(id) = self.expired_rx.recv() => Wake::Expired(id),
            () = self.sweeper.commit.due.wake.notified() => Wake::Recompute,
        };
        match woke {
            Wake::Reconcile => {
                self.owe(Source::Reconcile);
                Turn::Done(Ok(()))
            }
            Wake::Expired(id) => Turn::Done(self.expired(id).await),
            Wake::SafetyNet => Turn::Done(self.safety_net().await),
            Wake::Recompute => Turn::Done(Ok(())),
            Wake::Due => Turn::Done(self.due_sweep().await),
        }
    }

    /// When the due buckets are swept next.
    fn due_at(&self) -> Instant {
        let now = now_ms();
        let cutoff = self.sweeper.commit.held.cutoff(now);
        let earliest = self.sweeper.commit.due.earliest();
        if earliest <= cutoff {
            (self.last_sweep + MIN_SWEEP_GAP).max(self.sweeper.floor_wait)
        } else if earliest <= now {
            // Due, but a heartbeat older than it is still being applied.
            Instant::now() + RECHECK
        } else {
            let ms = (earliest - now).min(SAFETY_EVERY.as_millis() as u64);
            Instant::now() + Duration::from_millis(ms)
        }
    }

    /// Expires the devices of the queued `expired` events (this one and what else is queued,
    /// up to a sweep's worth).
    async fn expired(&mut self, first: DeviceId) -> Result<(), SweepError> {
        let mut ids = vec![first];
        while ids.len() < SWEEP_LIMIT {
            match self.expired_rx.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        self.sweeper.expire(&ids).await
    }

    async fn safety_net(&mut self) -> Result<(), SweepError> {
        self.next_safety = Instant::now() + SAFETY_EVERY;
        self.sweeper.sweep_all(Source::SafetyNet).await.map(|_| ())
    }

    async fn due_sweep(&mut self) -> Result<(), SweepError> {
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
        self.owe(Source::Reconcile);
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
