//! Keeping the offsets to the Redis clocks fresh (`crate::clock`) and this replica's floor
//! in every bucket (`clock.lua`): the time before which every heartbeat it received is
//! applied. Decides nothing; it must not write anything but its own floor (and remove the
//! floors of replicas seen gone).

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::gate::{Backlog, Gate};
use crate::device::{now_ms, Millis};
use crate::store::{Floor, Store, StoreError};
use crate::telemetry::LogLimiter;

/// How often the clock offsets are measured.
const CLOCK_EVERY: Duration = Duration::from_secs(1);
/// How often a replica sharing heartbeats renews its floor.
pub(crate) const FLOOR_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for one clock / floor round trip.
const STAMP_TIMEOUT: Duration = Duration::from_secs(1);
/// After a stall, how long our floor waits at most for the heartbeats that were unread.
const STALL_FREEZE: Duration = Duration::from_secs(10);
/// At a stop, how long our floor waits at most for our held heartbeats to be applied.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Keeps the offsets to the Redis clocks fresh and, for a replica that shares heartbeats
/// with others (a shared subscription), its *floor* in every bucket. Every replica's
/// expiries stay below every live floor, so a heartbeat that one replica holds (Redis is
/// slow or unreachable for it, a failover, a partition) is never overtaken by another
/// replica's sweep. A floor stands for `floor_lease` without renewal; then the replica is
/// taken for dead (stopped, partitioned for longer) and its floor ignored.
pub(crate) struct Stamper {
    pub(crate) store: Store,
    /// Our name in the floors, with a shared subscription.
    pub(crate) floor_of: Option<String>,
    pub(crate) backlog: Backlog,
    /// Replicas whose presence went offline (their will, or a clean stop): their floors
    /// go at once instead of at the end of their lease.
    pub(crate) gone: mpsc::Receiver<String>,
    /// Whether Redis answers (every bucket, within `STAMP_TIMEOUT`).
    pub(crate) redis_ok: watch::Sender<bool>,
}

/// Why a clock round trip told nothing.
#[derive(Debug, thiserror::Error)]
enum ClockError {
    #[error(transparent)]
    Redis(#[from] StoreError),
    #[error("timed out")]
    TimedOut,
}

impl Stamper {
    /// Measures the clocks once (and records our floor) before anything else starts.
    pub(crate) async fn first(&self, floor: Millis) {
        let _ = self.sync(self.floor(floor)).await;
    }

    fn floor(&self, at: Millis) -> Floor<'_> {
        match &self.floor_of {
            Some(who) => Floor::At(who, at),
            None => Floor::None,
        }
    }

    /// One `clock.lua` round trip (every bucket), bounded.
    async fn sync(&self, floor: Floor<'_>) -> Result<(), ClockError> {
        match tokio::time::timeout(STAMP_TIMEOUT, self.store.sync_clock(floor)).await {
            Ok(p) => p.error.map_or(Ok(()), |e| Err(e.into())),
            Err(_) => Err(ClockError::TimedOut),
        }
    }

    pub(crate) async fn run(self, token: CancellationToken) {
        let every = if self.floor_of.is_some() {
            FLOOR_EVERY
        } else {
            CLOCK_EVERY
        };
        let state = State {
            every,
            limiter: LogLimiter::new(Duration::from_secs(10)),
            floor: now_ms(),
            stalled_since: None,
            stalls: self.backlog.stalls(),
            planned: Instant::now(),
            stopping: None,
            stamper: self,
        };
        state.run(token).await;
    }
}

/// The stamper between two ticks.
struct State {
    stamper: Stamper,
    every: Duration,
    limiter: LogLimiter,
    /// The floor we record; it only moves forward.
    floor: Millis,
    /// Since when the process stalled (heartbeats may wait unread in our socket) without
    /// the gate open again since.
    stalled_since: Option<Instant>,
    /// The process's stall count when we last looked.
    stalls: u64,
    /// When the current timer wait is planned to end.
    planned: Instant,
    /// When we were asked to stop.
    stopping: Option<Instant>,
}

impl State {
    async fn run(mut self, token: CancellationToken) {
        loop {
            let stopped = self.stopping.is_some_and(|at| {
                self.stamper.backlog.held().is_drained() || at.elapsed() > STOP_WAIT
            });
            if stopped {
                break;
            }
            tokio::select! {
                () = token.cancelled(), if self.stopping.is_none() => {
                    // Our floor stays until what we hold is applied: the MQTT task still
                    // drains and the applier applies after it.
                    self.stopping = Some(Instant::now());
                }
                Some(who) = self.stamper.gone.recv() => self.gone(&who).await,
                () = tokio::time::sleep_until(self.planned) => self.tick().await,
            }
        }
        if let Some(who) = &self.stamper.floor_of {
            let _ = self.stamper.sync(Floor::Leave(who)).await;
        }
        debug!("Stamper stopped.");
    }

    /// Another replica's presence went offline: its floor goes now.
    async fn gone(&self, who: &str) {
        if self.stamper.floor_of.as_ref().is_some_and(|me| me != who) {
            debug!(replica = %who, "A replica is gone; dropping its floor.");
            let _ = self.stamper.sync(Floor::Leave(who)).await;
        }
    }

    /// The timer came: renews the floor (frozen during a stall) and measures the clocks.
    async fn tick(&mut self) {
        self.planned = Instant::now() + self.every;
        // The clock first, then the gate: a stall before the reading is seen.
        let backlog = &self.stamper.backlog;
        let held = backlog.held().cutoff(now_ms());
        let (stalls, gate) = (backlog.stalls(), backlog.gate());
        if stalls != self.stalls {
            // Heartbeats may be unread in the socket: keep renewing the old floor until the
            // MQTT task has read them (a fresh sync marker back, everything before it
            // applied), for a while: each stall once.
            self.stalls = stalls;
            self.stalled_since = Some(Instant::now());
        }
        if gate == Gate::Open
            || self
                .stalled_since
                .is_some_and(|s| s.elapsed() > STALL_FREEZE)
        {
            self.stalled_since = None;
        }
        // A reader held up right now leaves heartbeats unread just the same.
        let frozen = self.stalled_since.is_some() || !backlog.reader_fresh();
        if !frozen {
            // Disconnected from the broker, nothing is queued for us (clean sessions): the
            // floor follows what we hold.
            self.floor = self.floor.max(held);
        }
        let result = self.stamper.sync(self.stamper.floor(self.floor)).await;
        let ok = result.is_ok();
        self.stamper
            .redis_ok
            .send_if_modified(|was| std::mem::replace(was, ok) != ok);
        if let (Err(e), Some(n)) = (result, self.limiter.check()) {
            debug!(error = %e, suppressed = n, "Cannot read the Redis clock.");
        }
    }
}
