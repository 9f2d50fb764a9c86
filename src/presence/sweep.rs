//! The expirer's Redis calls: `expire.lua` for named devices, for the buckets whose deadline
//! came, and for every bucket (reconcile, safety net); what they commit is counted and
//! handed to the publisher, each under a `CommitOrder` turn. Knows nothing of when to sweep
//! (that is `expirer`'s): it must not wait for anything but Redis and the status queue.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use super::gate::{Backlog, Gate};
use super::handoff::Committer;
use super::stamper::FLOOR_EVERY;
use crate::bucket::{Bucket, BUCKETS};
use crate::device::{now_ms, DeviceId, Millis};
use crate::store::{Committed, Cutoff, StoreError};

/// Most devices one sweep of one bucket marks offline; a bucket with more is swept again.
pub(crate) const SWEEP_LIMIT: usize = 1_000;
/// A device the safety net finds overdue by more than this was missed by the other paths.
const MISSED_GRACE_MS: Millis = 2_000;
/// A deadline this much before our own cutoff that another replica's floor still holds back
/// means that replica is behind (cut off, failing over), not just between two renewals.
const BLOCKED_SLACK_MS: Millis = 1_000;

/// Why a sweep runs; decides whether what it finds counts as missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// A keyspace notification named the device.
    Notification,
    /// The bucket's known next deadline came.
    Deadline,
    /// After a gap in listening (start, reconnect): everything found was missed.
    Reconcile,
    /// After a stall of this process: every bucket swept as after a gap, but only what was
    /// overdue by more than the safety net's grace counts as missed (a short stall, even a
    /// spurious one of a loaded machine, delays an expiry; it does not miss it).
    AfterStall,
    /// The periodic pass: what it finds long overdue was missed.
    SafetyNet,
}

/// Whether a sweep of every bucket decided everything overdue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    Complete,
    /// Some overdue deadlines wait for another replica's floor.
    Blocked,
}

/// Why a sweep decided nothing (or not everything).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backlog gate closed before the call (e.g. the process was stalled): heartbeats
    /// may be unread.
    #[error("the backlog gate is closed ({0:?})")]
    Closed(Gate),
}

/// Decides offline transitions in Redis.
pub(crate) struct Sweeper {
    pub(crate) commit: Committer,
    pub(crate) backlog: Backlog,
    pub(crate) floor_lease: Duration,
    /// Due deadlines wait for another replica's floor until then.
    pub(crate) floor_wait: Instant,
}

impl Sweeper {
    /// The cutoff for a decision now; an error if the backlog gate is not open.
    fn cutoff(&self) -> Result<Cutoff, SweepError> {
        self.backlog
            .cutoff(self.floor_lease)
            .map_err(SweepError::Closed)
    }

    /// Expires the devices keyspace notifications named (if they are still overdue).
    pub(crate) async fn expire(&self, ids: &[DeviceId]) -> Result<(), SweepError> {
        let _turn = self.commit.order.turn().await;
        let cutoff = self.cutoff()?;
        let expired = self.commit.store.expire_devices(ids, cutoff).await;
        self.decided(Source::Notification, expired.done).await;
        expired.error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Sweeps the buckets whose known deadline has come.
    pub(crate) async fn sweep_due(&mut self) -> Result<(), SweepError> {
        let cutoff = self.cutoff()?;
        let now = now_ms();
        let seen: Vec<(Bucket, Millis)> = (0..BUCKETS)
            .map(|b| (b, self.commit.due.get(b)))
            .filter(|(_, d)| *d <= cutoff.before)
            .collect();
        if seen.is_empty() {
            return Ok(());
        }
        let buckets: Vec<Bucket> = seen.iter().map(|(b, _)| *b).collect();
        let _turn = self.commit.order.turn().await;
        let swept = self.commit.store.sweep(&buckets, cutoff, SWEEP_LIMIT).await;
        let mut all = Vec::new();
        for s in swept.done {
            let seen = seen
                .iter()
                .find(|(b, _)| *b == s.bucket)
                .map_or(0, |(_, d)| *d);
            let next = if s.more { Some(now) } else { s.next_deadline };
            if next.is_some_and(|d| d > s.cutoff && d <= cutoff.before) {
                // Another replica has not applied heartbeats older than this deadline yet:
                // ask again when its floor has had time to move.
                self.floor_wait = Instant::now() + FLOOR_EVERY / 4;
            }
            self.commit.due.replace(s.bucket, seen, next);
            all.extend(s.committed);
        }
        self.decided(Source::Deadline, all).await;
        match swept.error {
            None => {
                self.commit.health.set_redis_commands(true);
                Ok(())
            }
            Some(e) => Err(e.into()),
        }
    }

    /// Sweeps every bucket until nothing overdue is left (reconcile) or once (safety net).
    pub(crate) async fn sweep_all(&mut self, source: Source) -> Result<Progress, SweepError> {
        let mut buckets: Vec<Bucket> = (0..BUCKETS).collect();
        let started = Instant::now();
        let mut total = 0usize;
        let mut progress = Progress::Complete;
        while !buckets.is_empty() {
            let mut cutoff = self.cutoff()?;
            if source == Source::SafetyNet {
                cutoff.before = cutoff.before.saturating_sub(MISSED_GRACE_MS);
            }
            let seen: Vec<Millis> = (0..BUCKETS).map(|b| self.commit.due.get(b)).collect();
            let turn = self.commit.order.turn().await;
            let swept = self.commit.store.sweep(&buckets, cutoff, SWEEP_LIMIT).await;
            let mut again = Vec::new();
            let mut all = Vec::new();
            for s in swept.done {
                if s.more {
                    again.push(s.bucket);
                }
                if s.next_deadline
                    .is_some_and(|d| d > s.cutoff && d + BLOCKED_SLACK_MS <= cutoff.before)
                {
                    // Overdue for a while, but another replica's floor says it may hold a
                    // heartbeat (a floor a little behind, as they normally are, is not that).
                    progress = Progress::Blocked;
                }
                self.commit
                    .due
                    .replace(s.bucket, seen[usize::from(s.bucket)], s.next_deadline);
                all.extend(s.committed);
            }
            total += self.decided(source, all).await;
            drop(turn);
            if let Some(e) = swept.error {
                // The buckets that failed are swept again by the reconciliation this error
                // asks for.
                return Err(e.into());
            }
            self.commit.health.set_redis_commands(true);
            buckets = again;
        }
        if matches!(source, Source::Reconcile | Source::AfterStall)
            && progress == Progress::Complete
        {
            info!(
                missed = total,
                took_ms = started.elapsed().as_millis() as u64,
                "Reconciled expiries."
            );
        }
        Ok(progress)
    }

    /// Counts what `source` found that was missed (returned) and hands it all on.
    async fn decided(&self, source: Source, committed: Vec<Committed>) -> usize {
        if committed.is_empty() {
            return 0;
        }
        let missed = match source {
            Source::Reconcile | Source::SafetyNet => committed.len(),
            Source::AfterStall => committed
                .iter()
                .filter(|c| {
                    c.event
                        .device()
                        .is_some_and(|ev| ev.detected_at > ev.since + MISSED_GRACE_MS)
                })
                .count(),
            Source::Notification | Source::Deadline => 0,
        };
        if missed > 0 {
            self.commit.metrics.missed_expiration(missed as u64);
        }
        debug!(?source, n = committed.len(), "Offline transitions decided.");
        self.commit.hand_on(committed).await;
        missed
    }
}
