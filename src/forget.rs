//! Forgetting: with `presence.forget_after` set, a device offline for longer than that
//! (counted from the `since` of its offline status) is forgotten. Its record and index
//! entries leave Redis, so it is gone from the counts and the API, and its retained status
//! is cleared (an empty retained message, QoS 1); a later heartbeat makes it a new device.
//!
//! `Forgetter` sweeps every bucket every `FORGET_EVERY` (2 s). Each bucket is decided by one
//! call of `src/lua/forget.lua`, which re-reads the record (a device that came back online is
//! kept), deletes it and stages the clear in the outbox in the same step. So a device is
//! forgotten exactly once whatever the number of replicas, and a clear committed by a
//! replica that dies before publishing it is claimed and published by another, like any
//! transition (the outbox lease). Until the broker acknowledges a device's last status, the
//! device is not forgotten: that status could otherwise overwrite the clear.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bucket::{Bucket, BUCKETS};
use crate::metrics::Metrics;
use crate::presence::gate::{Backlog, Gate};
use crate::presence::handoff::{publish, Handed};
use crate::presence::CommitOrder;
use crate::status::{Lag, StatusOut};
use crate::store::{Store, StoreError};
use crate::telemetry::LogLimiter;

/// How often every bucket is swept for devices to forget: a device is forgotten within about
/// this much after its `forget_after` has passed.
pub(crate) const FORGET_EVERY: Duration = Duration::from_secs(2);
/// Most devices one call forgets in one bucket; a bucket with more is swept again at once.
const FORGET_LIMIT: usize = 500;

/// Forgets devices offline for longer than `after`.
pub(crate) struct Forgetter {
    pub(crate) store: Store,
    pub(crate) metrics: Metrics,
    pub(crate) out: mpsc::Sender<StatusOut>,
    /// A clear and the device's new seq 1 are queued in the order they were committed.
    pub(crate) order: CommitOrder,
    /// The backlog gate (see `presence::gate`): nothing is forgotten while heartbeats may
    /// still be on their way.
    pub(crate) backlog: Backlog,
    pub(crate) after: Duration,
    /// How long another replica's floor stands without renewal (see `presence::Stamper`).
    pub(crate) floor_lease: Duration,
}

impl Forgetter {
    pub(crate) async fn run(self, token: CancellationToken) {
        let limiter = LogLimiter::new(Duration::from_secs(30));
        let mut tick = tokio::time::interval(FORGET_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backfilled = false;
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            if !backfilled {
                backfilled = match self.backfill().await {
                    Ok(()) => true,
                    Err(e) => {
                        if let Some(n) = limiter.check() {
                            warn!(error = %e, suppressed = n, "Cannot index offline devices for forgetting; retrying.");
                        }
                        false
                    }
                };
            }
            if !self.open() {
                continue;
            }
            if let Err(e) = self.sweep().await {
                if let Some(n) = limiter.check() {
                    warn!(error = %e, suppressed = n, "Cannot forget devices in Redis; retrying.");
                }
            }
        }
        debug!("Forgetter stopped.");
    }

    /// Whether every heartbeat the broker queued for us is in, and applied: a device whose
    /// heartbeat is on its way came back, and must not be forgotten.
    fn open(&self) -> bool {
        self.backlog.gate() == Gate::Open
    }

    /// Indexes devices that went offline before the offline-since index existed (a bucket
    /// whose offline index is not larger than it is skipped), so they are forgotten too.
    async fn backfill(&self) -> Result<(), StoreError> {
        for b in 0..BUCKETS {
            if !self.store.offsince_behind(b).await? {
                continue;
            }
            let mut after = None;
            while let Some(last) = self
                .store
                .index_offline(b, after.as_deref(), FORGET_LIMIT)
                .await?
            {
                after = Some(last);
            }
            info!(bucket = b, "Indexed offline devices for forgetting.");
        }
        Ok(())
    }

    /// Sweeps every bucket once, and the buckets that had more to forget until they are done.
    async fn sweep(&self) -> Result<(), StoreError> {
        let mut buckets: Vec<Bucket> = (0..BUCKETS).collect();
        while !buckets.is_empty() {
            // Never past a heartbeat this replica holds (other replicas' are in their floors).
            let Ok(cutoff) = self.backlog.cutoff(self.floor_lease) else {
                // Closed meanwhile (a stall): the next pass goes on.
                return Ok(());
            };
            let turn = self.order.turn().await;
            let forgot = self
                .store
                .forget(&buckets, cutoff, self.after, FORGET_LIMIT)
                .await;
            let mut again = Vec::new();
            let mut cleared = Vec::new();
            for f in forgot.done {
                // Only where this call made progress: devices waiting for an acknowledgement
                // stay due, and must not make this a busy loop.
                if f.more && !f.cleared.is_empty() {
                    again.push(f.bucket);
                }
                cleared.extend(f.cleared);
            }
            if !cleared.is_empty() {
                self.metrics.devices_forgotten(cleared.len() as u64);
                info!(
                    n = cleared.len(),
                    "Forgot devices offline for longer than presence.forget_after."
                );
                for ev in cleared.iter().filter_map(|c| c.event.device()) {
                    debug!(device = %ev.device, "Forgot a device.");
                }
                if publish(&self.out, cleared, Lag::Skip).await == Handed::QueueClosed {
                    // The MQTT task is gone (shutdown): the outbox still holds the clears.
                    return Ok(());
                }
            }
            drop(turn);
            if let Some(e) = forgot.error {
                return Err(e);
            }
            buckets = again;
        }
        Ok(())
    }
}
