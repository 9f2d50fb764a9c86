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

/// What was applied within the last `REPLICATION_WINDOW` (2 s), per round.
#[derive(Default)]
pub(crate) struct Recent {
    rounds: VecDeque<(Instant, Taken)>,
    len: usize,
}

fn size(t: &Taken) -> usize {
    t.before.len() + t.wills.len() + t.beats.len()
}

impl Recent {
    fn push(&mut self, round: Taken) {
        if round.is_empty() {
            return;
        }
        let now = Instant::now();
        self.len += size(&round);
        self.rounds.push_back((now, round));
        self.trim(now, RECENT_CAP);
    }

    /// Drops the rounds older than the window, and the oldest beyond `cap` entries.
    fn trim(&mut self, now: Instant, cap: usize) {
        while let Some((at, round)) = self.rounds.front() {
            if now.duration_since(*at) <= REPLICATION_WINDOW && self.len <= cap {
                break;
            }
            self.len -= size(round);
            self.rounds.pop_front();
        }
    }

    /// What was applied lately to the failed buckets, newest round first (they leave the
    /// window: they are held again).
    fn take(&mut self, failed: &[Bucket]) -> Vec<Taken> {
        self.trim(Instant::now(), usize::MAX);
        let lost = |device: &crate::device::DeviceId| failed.contains(&bucket_of(device.as_str()));
        let mut out = Vec::new();
        for (_, round) in self.rounds.iter_mut().rev() {
            let before = size(round);
            let taken = Taken {
                before: drain(&mut round.before, |b| lost(&b.device)),
                wills: drain(&mut round.wills, |w| lost(&w.device)),
                beats: drain(&mut round.beats, |b| lost(&b.device)),
            };
            self.len -= before - size(round);
            out.push(taken);
        }
        out
    }
}

/// Moves the items `lost` picks out of `v`.
fn drain<T>(v: &mut Vec<T>, lost: impl Fn(&T) -> bool) -> Vec<T> {
    let (out, keep) = std::mem::take(v).into_iter().partition(|x| lost(x));
    *v = keep;
    out
}

/// A step of a round that failed: the error, what was not applied (this step's failed part
/// and every later step), and the buckets that failed.
struct Failure {
    error: StoreError,
    rest: Taken,
    buckets: Vec<Bucket>,
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

    /// Applies what was taken; on failure what was not applied is held again, and before it
    /// what was applied lately to the buckets that failed (their master may be gone with
    /// writes it had acknowledged: asynchronous replication), oldest first.
    async fn apply(&mut self, taken: Taken) -> Result<(), StoreError> {
        let mut done = Taken::default();
        let result = self.apply_in_order(taken, &mut done).await;
        self.recent.push(done);
        let Err(failure) = result else {
            return Ok(());
        };
        // `restore` puts what it gets before what is held: the newest first.
        self.commit.held.restore(failure.rest);
        for round in self.recent.take(&failure.buckets) {
            self.commit.held.restore(round);
        }
        Err(failure.error)
    }

    /// The steps of a round, in order (per device the order of arrival): the heartbeats from
    /// before a will, the wills, the other heartbeats. A step that fails stops the round: a
    /// later step must not overtake it.
    async fn apply_in_order(&mut self, taken: Taken, done: &mut Taken) -> Result<(), Failure> {
        let Taken {
            before,
            wills,
            beats,
        } = taken;
        if let Err((error, before, buckets)) = self.apply_beats(before, &mut done.before).await {
            let rest = Taken {
                before,
                wills,
                beats,
            };
            return Err(Failure {
                error,
                rest,
                buckets,
            });
        }
        if let Err((error, wills, buckets)) = self.apply_wills(wills, &mut done.wills).await {
            let rest = Taken {
                before: Vec::new(),
                wills,
                beats,
            };
            return Err(Failure {
                error,
                rest,
                buckets,
            });
        }
        if let Err((error, beats, buckets)) = self.apply_beats(beats, &mut done.beats).await {
            let rest = Taken {
                beats,
                ..Taken::default()
            };
            return Err(Failure {
                error,
                rest,
                buckets,
            });
        }
        Ok(())
    }

    /// Applies heartbeats in chunks (the applied ones go to `done`); on failure returns what
    /// was not applied and the buckets that failed.
    async fn apply_beats(
        &mut self,
        batch: Vec<Beat>,
        done: &mut Vec<Beat>,
    ) -> Result<(), (StoreError, Vec<Beat>, Vec<Bucket>)> {
        let mut retry: Vec<Beat> = Vec::new();
        let mut failed_buckets = Vec::new();
        let mut failed = None;
        let mut chunks = batch.chunks(APPLY_BATCH);
        for chunk in chunks.by_ref() {
            let Err((e, next)) = self
                .apply_chunk(chunk, done, &mut retry, &mut failed_buckets)
                .await
            else {
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
        match failed {
            None => Ok(()),
            Some(e) => {
                retry.extend(chunks.flatten().cloned());
                Err((e, retry, failed_buckets))
            }
        }
    }

    /// Applies wills in chunks (the applied ones go to `done`): counts them, hands on the
    /// offline transitions; on failure returns the wills of the buckets that failed and of
    /// the chunks not tried, and the buckets that failed.
    async fn apply_wills(
        &mut self,
        wills: Vec<Will>,
        done: &mut Vec<Will>,
    ) -> Result<(), (StoreError, Vec<Will>, Vec<Bucket>)> {
        let mut wills = wills.into_iter();
        loop {
            let chunk: Vec<Will> = wills.by_ref().take(APPLY_BATCH).collect();
            if chunk.is_empty() {
                return Ok(());
            }
            let turn = self.commit.order.turn().await;
            let applied = self.commit.store.apply_wills(&chunk).await;
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
            let failed = applied.failed;
            let (mut rest, ok): (Vec<Will>, Vec<Will>) = chunk
                .into_iter()
                .partition(|w| failed.contains(&bucket_of(w.device.as_str())));
            done.extend(ok);
            if let Some(e) = applied.error {
                rest.extend(wills);
                return Err((e, rest, failed));
            }
        }
    }

    /// Applies one chunk in one round trip: the heartbeats of the buckets that worked go to
    /// `done`, the others (and the recent ones of those buckets) to `retry`.
    async fn apply_chunk(
        &mut self,
        chunk: &[Beat],
        done: &mut Vec<Beat>,
        retry: &mut Vec<Beat>,
        failed_buckets: &mut Vec<Bucket>,
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
        // The failed buckets' master may be gone with writes it had acknowledged (see
        // `Applier::apply`).
        failed_buckets.extend(applied.failed.iter().copied());
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
