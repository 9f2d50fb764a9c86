//! Applying held heartbeats and wills to Redis (`heartbeat.lua` and `will.lua` decide; this
//! only batches, orders, retries and hands on what was committed), and [`Recent`]: the
//! heartbeats applied lately, applied again when their master fails. Must not decide a
//! transition itself.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::handoff::Committer;
use crate::beat::Beat;
use crate::bucket::{bucket_of, Bucket};
use crate::held::Taken;
use crate::metrics::WillResult;
use crate::store::StoreError;
use crate::telemetry::{Backoff, LogLimiter};
use crate::will::Will;

/// Most heartbeats applied in one pipelined round trip.
const APPLY_BATCH: usize = 5_000;
/// How long applied heartbeats are kept to apply again if their master fails: a write the
/// master acknowledged may not have reached its replica before it died (asynchronous
/// replication), and the promoted replica would otherwise hold an older deadline.
const REPLICATION_WINDOW: Duration = Duration::from_secs(2);
/// Most heartbeats kept for that (the oldest go first).
const RECENT_CAP: usize = 200_000;

/// Applies held heartbeats to Redis.
pub(crate) struct Applier {
    pub(crate) commit: Committer,
    pub(crate) recent: Recent,
    /// As for the expirer: a late heartbeat respects the other replicas' floors.
    pub(crate) floor_lease: Duration,
}

/// Heartbeats applied within the last `REPLICATION_WINDOW` (2 s), per batch.
#[derive(Default)]
pub(crate) struct Recent {
    batches: VecDeque<(Instant, Vec<Beat>)>,
    len: usize,
}

impl Recent {
    fn push(&mut self, beats: Vec<Beat>) {
        let now = Instant::now();
        self.len += beats.len();
        self.batches.push_back((now, beats));
        self.trim(now, RECENT_CAP);
    }

    /// Drops the batches older than the window, and the oldest beyond `cap` heartbeats.
    fn trim(&mut self, now: Instant, cap: usize) {
        while let Some((at, b)) = self.batches.front() {
            if now.duration_since(*at) <= REPLICATION_WINDOW && self.len <= cap {
                break;
            }
            self.len -= b.len();
            self.batches.pop_front();
        }
    }

    /// The kept heartbeats of the failed buckets (they leave the window: they are held).
    fn take(&mut self, failed: &[Bucket]) -> Vec<Beat> {
        self.trim(Instant::now(), usize::MAX);
        let mut out = Vec::new();
        for (_, batch) in &mut self.batches {
            let before = batch.len();
            batch.retain(|beat| {
                let lost = failed.contains(&bucket_of(beat.device.as_str()));
                if lost {
                    out.push(beat.clone());
                }
                !lost
            });
            self.len -= before - batch.len();
        }
        out
    }
}

/// Whether the chunks after a failed one are still tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunks {
    GoOn,
    /// Every bucket the chunk touched failed: Redis is away.
    Stop,
}

impl Applier {
    /// Runs until the MQTT task closed [`Held`] and everything held is applied (or, with Redis
    /// away at shutdown, until cancelled and closed).
    pub(crate) async fn run(mut self, token: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let mut rebuilt = self.commit.store.loss().subscribe();
        loop {
            if self.commit.held.is_closed_and_empty() {
                break;
            }
            let batch = self.commit.held.take();
            if batch.is_empty() {
                self.commit.held.arrived().await;
                continue;
            }
            let Err(e) = self.apply(batch).await else {
                backoff.reset();
                self.commit.held.applied();
                continue;
            };
            // What was not applied is held again, merged per device with what arrived
            // meanwhile (re-applying is harmless); expiries wait for it (the watermark).
            self.commit.health.set_redis_commands(false);
            let held = self.commit.held.len();
            if let Some(n) = limiter.check() {
                warn!(error = %e, held, suppressed = n, "Cannot apply heartbeats to Redis; holding them.");
            }
            if token.is_cancelled() && self.commit.held.is_closed() {
                warn!(held, "Shutting down with heartbeats not applied.");
                break;
            }
            // Heartbeats of a bucket Redis lost wait for its rebuild (src/rebuild.rs), which
            // ends the wait at once.
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                r = rebuilt.changed() => if r.is_ok() { backoff.reset() },
            }
        }
        debug!("Heartbeat applier stopped.");
    }

    /// Applies what was taken, in order (per device the order of arrival): the heartbeats
    /// from before a will, the wills, the other heartbeats. On failure what was not applied
    /// is held again, and so is everything after it (a later step must not overtake it).
    async fn apply(&mut self, taken: Taken) -> Result<(), StoreError> {
        let Taken {
            before,
            wills,
            beats,
        } = taken;
        if let Err((e, before)) = self.apply_beats(before).await {
            self.commit.held.restore(Taken {
                before,
                wills,
                beats,
            });
            return Err(e);
        }
        if let Err((e, wills)) = self.apply_wills(wills).await {
            self.commit.held.restore(Taken {
                before: Vec::new(),
                wills,
                beats,
            });
            return Err(e);
        }
        if let Err((e, beats)) = self.apply_beats(beats).await {
            self.commit.held.restore(Taken {
                beats,
                ..Taken::default()
            });
            return Err(e);
        }
        Ok(())
    }

    /// Applies heartbeats in chunks; on failure returns what was not applied.
    async fn apply_beats(&mut self, batch: Vec<Beat>) -> Result<(), (StoreError, Vec<Beat>)> {
        let mut retry: Vec<Beat> = Vec::new();
        let mut done: Vec<Beat> = Vec::new();
        let mut failed = None;
        let mut chunks = batch.chunks(APPLY_BATCH);
        for chunk in chunks.by_ref() {
            let Err((e, next)) = self.apply_chunk(chunk, &mut done, &mut retry).await else {
                self.commit.health.set_redis_commands(true);
                continue;
            };
            // Go on with the other chunks while some buckets work (a cluster master is
            // failing over, a bucket is being rebuilt); stop when nothing does.
            failed = Some(e);
            if next == Chunks::Stop {
                break;
            }
        }
        self.recent.push(done);
        match failed {
            None => Ok(()),
            Some(e) => {
                retry.extend(chunks.flatten().cloned());
                Err((e, retry))
            }
        }
    }

    /// Applies wills in one round trip (they are few: a device has at most one held);
    /// counts them, hands on the offline transitions; on failure returns the wills of the
    /// buckets that failed.
    async fn apply_wills(&mut self, wills: Vec<Will>) -> Result<(), (StoreError, Vec<Will>)> {
        if wills.is_empty() {
            return Ok(());
        }
        let turn = self.commit.order.turn().await;
        let applied = self.commit.store.apply_wills(&wills).await;
        let mut committed = Vec::new();
        let metrics = &self.commit.metrics;
        for bucket in applied.done {
            metrics.will_handled(WillResult::Applied, bucket.applied);
            metrics.will_handled(WillResult::Stale, bucket.stale);
            metrics.will_handled(WillResult::Ignored, bucket.ignored);
            committed.extend(bucket.committed);
        }
        self.commit.hand_on(committed).await;
        drop(turn);
        let Some(e) = applied.error else {
            return Ok(());
        };
        let failed = applied.failed;
        let rest = wills
            .into_iter()
            .filter(|w| failed.contains(&bucket_of(w.device.as_str())))
            .collect();
        Err((e, rest))
    }

    /// Applies one chunk in one round trip: the heartbeats of the buckets that worked go to
    /// `done`, the others (and the recent ones of those buckets) to `retry`.
    async fn apply_chunk(
        &mut self,
        chunk: &[Beat],
        done: &mut Vec<Beat>,
        retry: &mut Vec<Beat>,
    ) -> Result<(), (StoreError, Chunks)> {
        let turn = self.commit.order.turn().await;
        let applied = self
            .commit
            .store
            .apply_heartbeats(chunk, self.floor_lease.as_millis() as u64)
            .await;
        // Whatever was committed is published, even if other buckets failed (in a
        // cluster, one master may be failing over while the others work).
        self.commit.hand_on(applied.done).await;
        drop(turn);
        for beat in chunk {
            let b = bucket_of(beat.device.as_str());
            if applied.failed.contains(&b) {
                retry.push(beat.clone());
            } else {
                self.commit.due.lower(b, beat.deadline);
                done.push(beat.clone());
            }
        }
        if !applied.failed.is_empty() {
            // The failed buckets' master may be gone with writes it had acknowledged.
            retry.extend(self.recent.take(&applied.failed));
        }
        let Some(e) = applied.error else {
            return Ok(());
        };
        let mut touched: Vec<Bucket> = chunk.iter().map(|b| bucket_of(b.device.as_str())).collect();
        touched.sort_unstable();
        touched.dedup();
        let next = if applied.failed.len() >= touched.len() {
            Chunks::Stop
        } else {
            Chunks::GoOn
        };
        Err((e, next))
    }
}
