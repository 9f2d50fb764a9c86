//! The one place transitions are decided and handed on to the publisher.
//!
//! * [`Held`]: heartbeats received and not yet applied to Redis, coalesced per device and
//!   bounded. Its *watermark* (the oldest unapplied arrival) is what keeps a heartbeat that
//!   reached us before a device's deadline from ever losing to that deadline.
//! * [`Applier`]: applies held heartbeats in batches (one pipelined round trip per batch,
//!   however many devices), hands the online transitions to the publisher.
//! * [`Expirer`]: decides offline transitions: on `expired` events (fast path), at each
//!   bucket's next deadline (so a lazy Redis never delays us), by reconciliation after
//!   every gap in listening, and by a periodic safety-net pass.
//! * [`Outbox`]: records the broker's acknowledgements, publishes the current status again
//!   where an older one may have overwritten it, claims transitions whose publisher died,
//!   and republishes every status after the broker lost its state.
//!
//! Nothing here holds device state in memory beyond the held heartbeats: Redis holds it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::device::{now_ms, DeviceId, Millis};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::beat::Beat;
use crate::bucket::{bucket_of, Bucket, BUCKETS};
use crate::held::Held;
use crate::status::{Delivered, Lag, Receipt, StatusOut};
use crate::store::{
    Committed, Cutoff, Floor, Store, OUTBOX_LEASE,
};
use crate::telemetry::{Backoff, LogLimiter};

/// Most heartbeats applied in one pipelined round trip.
const APPLY_BATCH: usize = 5_000;
/// Most devices one sweep of one bucket marks offline; a bucket with more is swept again.
const SWEEP_LIMIT: usize = 1_000;
/// How often every bucket is swept whatever the known deadlines (the safety net; it also
/// learns deadlines set by other replicas).
const SAFETY_EVERY: Duration = Duration::from_secs(1);
/// A device the safety net finds overdue by more than this was missed by the other paths.
const MISSED_GRACE_MS: Millis = 2_000;
/// Sweeps of due buckets are spaced at least this much, so that a steady trickle of
/// deadlines is handled in batches.
const MIN_SWEEP_GAP: Duration = Duration::from_millis(2);
/// How often the outbox is checked for expired leases.
const CLAIM_EVERY: Duration = Duration::from_secs(2);
/// Republishing after the broker lost its retained statuses: a page of about
/// `REPUBLISH_PAGE` devices per bucket every `REPUBLISH_TICK` (about 5,000 statuses/s per
/// replica that works on the job), and a look for jobs every `REPUBLISH_IDLE` otherwise.
const REPUBLISH_PAGE: usize = 8;
const REPUBLISH_TICK: Duration = Duration::from_millis(100);
const REPUBLISH_IDLE: Duration = Duration::from_secs(1);

/// One committer of transitions at a time in this process, from its Redis call until what it
/// committed is in the status queue: the queue then holds a device's seqs in the order Redis
/// committed them. Without it an expiry batch (seq n, offline) could be queued after the
/// heartbeat that the applier committed right after it (seq n + 1, online), and a subscriber
/// that keeps the highest seq would never see n. Republished statuses (acknowledgements,
/// claims, a lost session) need no turn: they repeat a seq already queued.
#[derive(Clone, Default)]
pub struct CommitOrder(Arc<tokio::sync::Mutex<()>>);

impl CommitOrder {
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.lock().await
    }
}

/// Hands committed transitions to the publisher; awaits room (backpressure).
async fn publish(out: &mpsc::Sender<StatusOut>, committed: Vec<Committed>, lag: Lag) {
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
            // The MQTT task is gone (shutdown): the outbox still holds these.
            return;
        }
    }
}

fn count(metrics: &Metrics, committed: &[Committed]) {
    for c in committed {
        metrics.transition_committed(c.event.state);
        info!(device = %c.event.device, state = c.event.state.as_str(), seq = c.event.seq, "Transition.");
    }
}

// === impl Applier ===

/// Applies held heartbeats to Redis.
pub struct Applier {
    pub store: Store,
    pub held: Arc<Held>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub out: mpsc::Sender<StatusOut>,
    pub order: CommitOrder,
    pub due: Arc<DueTable>,
    pub recent: Recent,
    /// As for the [`Expirer`]: a late heartbeat respects the other replicas' floors.
    pub floor_lease: Duration,
}

/// How long applied heartbeats are kept to apply again if their master fails: a write the
/// master acknowledged may not have reached its replica before it died (asynchronous
/// replication), and the promoted replica would otherwise hold an older deadline.
const REPLICATION_WINDOW: Duration = Duration::from_secs(2);
/// Most heartbeats kept for that (the oldest go first).
const RECENT_CAP: usize = 200_000;

/// Heartbeats applied within the last `REPLICATION_WINDOW` (2 s), per batch.
#[derive(Default)]
pub struct Recent {
    batches: std::collections::VecDeque<(Instant, Vec<Beat>)>,
    len: usize,
}

impl Recent {
    fn push(&mut self, beats: Vec<Beat>) {
        let now = Instant::now();
        self.len += beats.len();
        self.batches.push_back((now, beats));
        while let Some((at, b)) = self.batches.front() {
            if now.duration_since(*at) <= REPLICATION_WINDOW && self.len <= RECENT_CAP {
                break;
            }
            self.len -= b.len();
            self.batches.pop_front();
        }
    }

    /// The kept heartbeats of the failed buckets (they leave the window: they are held).
    fn take(&mut self, failed: &[Bucket]) -> Vec<Beat> {
        let now = Instant::now();
        while let Some((at, b)) = self.batches.front() {
            if now.duration_since(*at) <= REPLICATION_WINDOW {
                break;
            }
            self.len -= b.len();
            self.batches.pop_front();
        }
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

impl Applier {
    /// Runs until the MQTT task closed [`Held`] and everything held is applied (or, with Redis
    /// away at shutdown, until cancelled and closed).
    pub async fn run(mut self, token: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let mut rebuilt = self.store.loss().subscribe();
        loop {
            if self.held.is_closed_and_empty() {
                break;
            }
            let batch = self.held.take();
            if batch.is_empty() {
                self.held.arrived().await;
                continue;
            }
            let Err(e) = self.apply(batch).await else {
                backoff.reset();
                self.held.applied();
                continue;
            };
            // What was not applied is held again, merged per device with what arrived
            // meanwhile (re-applying is harmless); expiries wait for it (the watermark).
            self.health.set_redis_commands(false);
            let held = self.held.len();
            if let Some(n) = limiter.check() {
                warn!(error = %e, held, suppressed = n, "Cannot apply heartbeats to Redis; holding them.");
            }
            if token.is_cancelled() && self.held.is_closed() {
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

    /// Applies one batch in chunks; on failure, what was not applied is held again.
    async fn apply(&mut self, batch: Vec<Beat>) -> Result<(), crate::store::StoreError> {
        let mut retry: Vec<Beat> = Vec::new();
        let mut done: Vec<Beat> = Vec::new();
        let mut failed = None;
        let mut chunks = batch.chunks(APPLY_BATCH);
        for chunk in chunks.by_ref() {
            let turn = self.order.turn().await;
            let applied = self
                .store
                .apply_heartbeats(chunk, self.floor_lease.as_millis() as u64)
                .await;
            // Whatever was committed is published, even if other buckets failed (in a
            // cluster, one master may be failing over while the others work).
            count(&self.metrics, &applied.done);
            publish(&self.out, applied.done, Lag::Observe).await;
            drop(turn);
            for beat in chunk {
                let b = bucket_of(beat.device.as_str());
                if applied.failed.contains(&b) {
                    retry.push(beat.clone());
                } else {
                    self.due.lower(b, beat.deadline);
                    done.push(beat.clone());
                }
            }
            if !applied.failed.is_empty() {
                // The failed buckets' master may be gone with writes it had acknowledged.
                retry.extend(self.recent.take(&applied.failed));
            }
            if let Some(e) = applied.error {
                // Go on with the other chunks while some buckets work (a cluster master is
                // failing over, a bucket is being rebuilt); stop when nothing does.
                let mut touched: Vec<Bucket> = chunk
                    .iter()
                    .map(|b| bucket_of(b.device.as_str()))
                    .collect();
                touched.sort_unstable();
                touched.dedup();
                let stop = applied.failed.len() >= touched.len();
                failed = Some(e);
                if stop {
                    break;
                }
                continue;
            }
            self.health.set_redis_commands(true);
        }
        self.recent.push(done);
        match failed {
            None => Ok(()),
            Some(e) => {
                retry.extend(chunks.flatten().cloned());
                self.held.restore(retry);
                Err(e)
            }
        }
    }
}

// === impl DueTable ===

/// The next known deadline of each bucket (`u64::MAX`: none known). Lowered by the applier
/// as heartbeats land, replaced by the expirer after each sweep.
pub struct DueTable {
    due: Vec<AtomicU64>,
    wake: Notify,
}

impl Default for DueTable {
    fn default() -> Self {
        DueTable {
            due: (0..BUCKETS).map(|_| AtomicU64::new(u64::MAX)).collect(),
            wake: Notify::new(),
        }
    }
}

impl DueTable {
    fn lower(&self, b: Bucket, deadline: Millis) {
        let prev = self.due[usize::from(b)].fetch_min(deadline, Ordering::AcqRel);
        if deadline < prev {
            self.wake.notify_one();
        }
    }

    /// Replaces a bucket's deadline with what a sweep found, unless the applier lowered it
    /// since `seen` was read (then the lower of the two stands).
    fn replace(&self, b: Bucket, seen: Millis, next: Option<Millis>) {
        let next = next.unwrap_or(u64::MAX);
        let slot = &self.due[usize::from(b)];
        if slot
            .compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            slot.fetch_min(next, Ordering::AcqRel);
        }
    }

    fn get(&self, b: Bucket) -> Millis {
        self.due[usize::from(b)].load(Ordering::Acquire)
    }

    fn earliest(&self) -> Millis {
        (0..BUCKETS).map(|b| self.get(b)).min().unwrap_or(u64::MAX)
    }
}

// === impl Expirer ===

/// Why a sweep runs; decides whether what it finds counts as missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A keyspace notification named the device.
    Notification,
    /// The bucket's known next deadline came.
    Deadline,
    /// After a gap in listening (start, reconnect): everything found was missed.
    Reconcile,
    /// The periodic pass: what it finds long overdue was missed.
    SafetyNet,
}

/// A deadline this much before our own cutoff that another replica's floor still holds back
/// means that replica is behind (cut off, failing over), not just between two renewals.
const BLOCKED_SLACK_MS: Millis = 1_000;

/// Whether a sweep of every bucket decided everything overdue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    Complete,
    /// Some overdue deadlines wait for another replica's floor.
    Blocked,
}

/// What woke the expirer.
enum Wake {
    Reconcile,
    Expired(DeviceId),
    SafetyNet,
    /// An earlier deadline became known.
    Recompute,
    Due,
}

/// Decides offline transitions.
pub struct Expirer {
    pub store: Store,
    pub held: Arc<Held>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub out: mpsc::Sender<StatusOut>,
    pub order: CommitOrder,
    pub due: Arc<DueTable>,
    pub expired_rx: mpsc::Receiver<DeviceId>,
    pub reconcile: Arc<Notify>,
    pub ingest: watch::Receiver<Option<Millis>>,
    /// Asks the MQTT task for a fresh sync marker after a stall.
    pub resync: Arc<Notify>,
    /// How long another replica's floor stands without renewal (see [`Stamper`]).
    pub floor_lease: Duration,
    /// Due deadlines wait for another replica's floor until then.
    pub floor_wait: Instant,
}

/// A timer that fires this much later than planned means the process was stalled (e.g.
/// SIGSTOP, a VM pause): heartbeats may be waiting unread, so expiries wait for a resync.
const STALL: Duration = Duration::from_millis(500);

impl Expirer {
    pub async fn run(mut self, token: CancellationToken) {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let mut backoff = Backoff::new(Duration::from_secs(2));
        // A reconciliation is owed at start and after every gap.
        let mut reconcile_owed = true;
        let mut next_safety = Instant::now() + SAFETY_EVERY;
        // After a stall, only a sync marker newer than this opens the gate again.
        let mut stalled_at: Millis = 0;
        let mut last_sweep = Instant::now();
        loop {
            // Expiries wait while heartbeats may still be on their way: until the MQTT
            // backlog is in (the sync marker) and everything received before it is applied.
            let barrier = *self.ingest.borrow();
            let open = match barrier {
                Some(t) if t >= stalled_at => self.held.watermark().is_none_or(|w| w > t),
                _ => false,
            };
            if !open {
                if barrier.is_none() {
                    reconcile_owed = true;
                }
                tokio::select! {
                    () = token.cancelled() => break,
                    r = self.ingest.changed() => if r.is_err() { break },
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                continue;
            }

            let result = if reconcile_owed {
                match self.sweep_all(Source::Reconcile).await {
                    Ok(Progress::Complete) => {
                        reconcile_owed = false;
                        next_safety = Instant::now() + SAFETY_EVERY;
                        Ok(())
                    }
                    Ok(Progress::Blocked) => {
                        // Not done until every overdue device is decided: try again when
                        // the other replicas' floors have moved (or their leases ran out).
                        tokio::select! {
                            () = token.cancelled() => break,
                            () = tokio::time::sleep(FLOOR_EVERY) => {}
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            } else {
                let now = now_ms();
                let cutoff = self.cutoff(now).before;
                let earliest = self.due.earliest();
                let wake = if earliest <= cutoff {
                    (last_sweep + MIN_SWEEP_GAP).max(self.floor_wait)
                } else if earliest <= now {
                    // Due, but a heartbeat older than it is still being applied.
                    Instant::now() + Duration::from_millis(20)
                } else {
                    let ms = (earliest - now).min(SAFETY_EVERY.as_millis() as u64);
                    Instant::now() + Duration::from_millis(ms)
                };
                // A wake-up already due (e.g. a deadline left overdue while held heartbeats
                // pinned the cutoff) is planned for now, not for when it became due: it is
                // no sign of a stall.
                let planned = wake.min(next_safety).max(Instant::now());
                // Due deadlines come before notifications: during a mass expiry Redis
                // notifies at its own (slow) pace, and must not hold the sweep back.
                let woke = tokio::select! {
                    biased;
                    () = token.cancelled() => break,
                    () = self.reconcile.notified() => Wake::Reconcile,
                    () = tokio::time::sleep_until(wake) => Wake::Due,
                    () = tokio::time::sleep_until(next_safety) => Wake::SafetyNet,
                    Some(id) = self.expired_rx.recv() => Wake::Expired(id),
                    () = self.due.wake.notified() => Wake::Recompute,
                };
                // A wake-up far later than any timer we set: the process was stopped (or
                // starved). Decide nothing until a fresh sync marker proves the heartbeats
                // that arrived meanwhile are in.
                if Instant::now() > planned + STALL {
                    warn!(late_ms = (Instant::now() - planned).as_millis() as u64, "The process was stalled; waiting for queued heartbeats before deciding expiries.");
                    stalled_at = now_ms();
                    reconcile_owed = true;
                    self.resync.notify_one();
                    continue;
                }
                match woke {
                    Wake::Reconcile => {
                        reconcile_owed = true;
                        Ok(())
                    }
                    Wake::Expired(id) => self.on_expired(id).await,
                    Wake::SafetyNet => {
                        next_safety = Instant::now() + SAFETY_EVERY;
                        self.sweep_all(Source::SafetyNet).await.map(|_| ())
                    }
                    Wake::Recompute => Ok(()),
                    Wake::Due => {
                        last_sweep = Instant::now();
                        self.sweep_due().await
                    }
                }
            };
            match result {
                Ok(()) => {
                    backoff.reset();
                }
                Err(e) => {
                    self.health.set_redis_commands(false);
                    if let Some(n) = limiter.check() {
                        warn!(error = %e, suppressed = n, "Cannot decide expiries in Redis; retrying.");
                    }
                    // Something may expire while Redis is away: reconcile when it is back.
                    reconcile_owed = true;
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        debug!("Expirer stopped.");
    }

    /// The latest deadline an expiry may be decided for now: before any heartbeat this
    /// replica has not applied yet, and before an outage's deadlines while they wait.
    fn cutoff(&self, now: Millis) -> Cutoff {
        Cutoff {
            before: self.held.cutoff(now),
            floor_lease_ms: self.floor_lease.as_millis() as u64,
        }
    }

    async fn on_expired(&mut self, first: DeviceId) -> Result<(), crate::store::StoreError> {
        let mut ids = vec![first];
        while ids.len() < SWEEP_LIMIT {
            match self.expired_rx.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        let _turn = self.order.turn().await;
        let expired = self.store.expire_devices(&ids, self.cutoff(now_ms())).await;
        self.decided(Source::Notification, expired.done).await;
        expired.error.map_or(Ok(()), Err)
    }

    /// Sweeps the buckets whose known deadline has come.
    async fn sweep_due(&mut self) -> Result<(), crate::store::StoreError> {
        let now = now_ms();
        let cutoff = self.cutoff(now);
        let seen: Vec<(Bucket, Millis)> = (0..BUCKETS)
            .map(|b| (b, self.due.get(b)))
            .filter(|(_, d)| *d <= cutoff.before)
            .collect();
        if seen.is_empty() {
            return Ok(());
        }
        let buckets: Vec<Bucket> = seen.iter().map(|(b, _)| *b).collect();
        let _turn = self.order.turn().await;
        let swept = self.store.sweep(&buckets, cutoff, SWEEP_LIMIT).await;
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
            self.due.replace(s.bucket, seen, next);
            all.extend(s.committed);
        }
        self.decided(Source::Deadline, all).await;
        match swept.error {
            None => {
                self.health.set_redis_commands(true);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Sweeps every bucket until nothing overdue is left (reconcile) or once (safety net).
    async fn sweep_all(&mut self, source: Source) -> Result<Progress, crate::store::StoreError> {
        let mut buckets: Vec<Bucket> = (0..BUCKETS).collect();
        let started = Instant::now();
        let mut total = 0usize;
        let mut progress = Progress::Complete;
        while !buckets.is_empty() {
            let mut cutoff = self.cutoff(now_ms());
            if source == Source::SafetyNet {
                cutoff.before = cutoff.before.saturating_sub(MISSED_GRACE_MS);
            }
            let seen: Vec<Millis> = (0..BUCKETS).map(|b| self.due.get(b)).collect();
            let turn = self.order.turn().await;
            let swept = self.store.sweep(&buckets, cutoff, SWEEP_LIMIT).await;
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
                self.due
                    .replace(s.bucket, seen[usize::from(s.bucket)], s.next_deadline);
                all.extend(s.committed);
            }
            total += all.len();
            self.decided(source, all).await;
            drop(turn);
            if let Some(e) = swept.error {
                // The buckets that failed are swept again by the reconciliation this error
                // asks for.
                return Err(e);
            }
            self.health.set_redis_commands(true);
            buckets = again;
        }
        if source == Source::Reconcile && progress == Progress::Complete {
            info!(
                missed = total,
                took_ms = started.elapsed().as_millis() as u64,
                "Reconciled expiries."
            );
        }
        Ok(progress)
    }

    async fn decided(&self, source: Source, committed: Vec<Committed>) {
        if committed.is_empty() {
            return;
        }
        if matches!(source, Source::Reconcile | Source::SafetyNet) {
            self.metrics.missed_expiration(committed.len() as u64);
        }
        debug!(?source, n = committed.len(), "Offline transitions decided.");
        count(&self.metrics, &committed);
        publish(&self.out, committed, Lag::Observe).await;
    }
}

// === impl Stamper ===

/// How often the clock offsets are measured.
const CLOCK_EVERY: Duration = Duration::from_secs(1);
/// How often a replica sharing heartbeats renews its floor.
pub const FLOOR_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for one clock / floor round trip.
const STAMP_TIMEOUT: Duration = Duration::from_secs(1);
/// After a stall, how long our floor waits at most for the heartbeats that were unread.
const STALL_FREEZE: Duration = Duration::from_secs(10);
/// At a stop, how long our floor waits at most for our held heartbeats to be applied.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Keeps the offsets to the Redis clocks fresh ([`crate::clock`]) and, for a replica that
/// shares heartbeats with others (a shared subscription), its *floor* in every bucket: a
/// time before which every heartbeat it received is applied. Every replica's expiries stay
/// below every live floor, so a heartbeat that one replica holds (Redis is slow or
/// unreachable for it, a failover, a partition) is never overtaken by another replica's
/// sweep. A floor stands for `floor_lease` without renewal; then the replica is taken for
/// dead (stopped, partitioned for longer) and its floor ignored.
pub struct Stamper {
    pub store: Store,
    pub held: Arc<Held>,
    /// Our name in the floors, with a shared subscription.
    pub floor_of: Option<String>,
    pub ingest: watch::Receiver<Option<Millis>>,
    pub resync: Arc<Notify>,
    /// Replicas whose presence went offline (their will, or a clean stop): their floors
    /// go at once instead of at the end of their lease.
    pub gone: mpsc::Receiver<String>,
    /// Whether Redis answers (every bucket, within `STAMP_TIMEOUT`).
    pub redis_ok: watch::Sender<bool>,
}

impl Stamper {
    /// Measures the clocks once (and records our floor) before anything else starts.
    pub async fn first(&self, floor: Millis) {
        let _ = tokio::time::timeout(STAMP_TIMEOUT, self.store.sync_clock(self.floor(floor))).await;
    }

    fn floor(&self, at: Millis) -> Floor<'_> {
        match &self.floor_of {
            Some(who) => Floor::At(who, at),
            None => Floor::None,
        }
    }

    pub async fn run(mut self, token: CancellationToken) {
        let every = if self.floor_of.is_some() {
            FLOOR_EVERY
        } else {
            CLOCK_EVERY
        };
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let mut floor = now_ms();
        // An unresolved stall: heartbeats may wait unread in our socket.
        let mut stall: Option<(Millis, Instant)> = None;
        let mut planned = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            if stopping.is_some_and(|at| self.held.is_drained() || at.elapsed() > STOP_WAIT) {
                break;
            }
            tokio::select! {
                () = token.cancelled(), if stopping.is_none() => {
                    // Our floor stays until what we hold is applied: the MQTT task still
                    // drains and the applier applies after it.
                    stopping = Some(Instant::now());
                    continue;
                }
                Some(who) = self.gone.recv() => {
                    if self.floor_of.as_ref().is_some_and(|me| *me != who) {
                        debug!(replica = %who, "A replica is gone; dropping its floor.");
                        let leave = self.store.sync_clock(Floor::Leave(&who));
                        let _ = tokio::time::timeout(STAMP_TIMEOUT, leave).await;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(planned) => {}
            }
            if Instant::now() > planned + STALL {
                // Stalled: heartbeats may be unread in the socket. Keep renewing the old floor
                // until the MQTT task has read them (a fresh sync marker), for a while.
                stall = Some((now_ms(), Instant::now()));
                self.resync.notify_one();
            }
            planned = Instant::now() + every;
            if let Some((at, since)) = stall {
                let read = (*self.ingest.borrow())
                    .is_some_and(|t| t >= at && self.held.watermark().is_none_or(|w| w > t));
                if read || since.elapsed() > STALL_FREEZE {
                    stall = None;
                }
            }
            // Disconnected from the broker, nothing is queued for us (clean sessions): the
            // floor follows what we hold.
            if stall.is_none() {
                floor = floor.max(self.held.cutoff(now_ms()));
            }
            let r =
                tokio::time::timeout(STAMP_TIMEOUT, self.store.sync_clock(self.floor(floor))).await;
            let error = match r {
                Ok(p) => p.error.map(|e| e.to_string()),
                Err(_) => Some("timed out".to_owned()),
            };
            self.redis_ok
                .send_if_modified(|ok| std::mem::replace(ok, error.is_none()) != error.is_none());
            if let (Some(e), Some(n)) = (error, limiter.check()) {
                debug!(error = %e, suppressed = n, "Cannot read the Redis clock.");
            }
        }
        if let Some(who) = &self.floor_of {
            let _ =
                tokio::time::timeout(STAMP_TIMEOUT, self.store.sync_clock(Floor::Leave(who))).await;
        }
        debug!("Stamper stopped.");
    }
}

// === impl Outbox ===

/// Acknowledgements, lost publishers and lost retained state.
pub struct Outbox {
    pub store: Store,
    pub out: mpsc::Sender<StatusOut>,
    pub ack_rx: mpsc::Receiver<Delivered>,
    /// Woken when the broker lost its retained statuses: a republish job begins.
    pub republish: Arc<Notify>,
    /// Our name on the republish jobs we hold.
    pub instance: String,
}

/// Most acknowledgements kept while Redis is away; beyond, they are dropped and the outbox
/// lease publishes those statuses once more (a duplicate, never a loss).
const ACKS_HELD: usize = 100_000;

impl Outbox {
    /// Runs until the MQTT task is gone (the ack channel closes), so that acknowledgements
    /// arriving while it drains at shutdown are still recorded; claiming and republishing
    /// stop as soon as `token` is cancelled.
    pub async fn run(mut self, token: CancellationToken) {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let mut pending: Vec<Delivered> = Vec::new();
        let mut claim = tokio::time::interval(CLAIM_EVERY);
        // At start, whatever a previous run committed and did not see acknowledged is ours:
        // every entry leased before this process could have leased any.
        let mut first_claim = Some(now_ms() + OUTBOX_LEASE.as_millis() as u64);
        let mut next_page = Instant::now();
        let mut begin_job = false;
        loop {
            tokio::select! {
                biased;
                n = self.ack_rx.recv_many(&mut pending, 1000) => {
                    if n == 0 {
                        break;
                    }
                    while pending.len() < 5000 {
                        match self.ack_rx.try_recv() {
                            Ok(a) => pending.push(a),
                            Err(_) => break,
                        }
                    }
                    self.flush_acks(&mut pending, &limiter).await;
                }
                _ = claim.tick(), if !token.is_cancelled() => {
                    if !pending.is_empty() {
                        self.flush_acks(&mut pending, &limiter).await;
                    }
                    // A backlog of our own means the broker is slow, not that a publisher
                    // died: claiming now would queue duplicates of what is already queued
                    // and feed the backlog. Claim when the queue is at most half full.
                    if self.out.capacity() * 2 < self.out.max_capacity() {
                        continue;
                    }
                    let claimed = self.store.claim_outbox(first_claim, SWEEP_LIMIT).await;
                    if !claimed.done.is_empty() {
                        info!(n = claimed.done.len(), "Publishing transitions whose publisher did not confirm them.");
                    }
                    publish(&self.out, claimed.done, Lag::Observe).await;
                    match claimed.error {
                        // The first claim takes over a previous run's entries: it is done
                        // only when every bucket answered.
                        None => first_claim = None,
                        Some(e) => {
                            if let Some(n) = limiter.check() {
                                warn!(error = %e, suppressed = n, "Cannot read the outbox.");
                            }
                        }
                    }
                }
                () = self.republish.notified(), if !token.is_cancelled() => {
                    begin_job = true;
                    next_page = Instant::now();
                }
                () = tokio::time::sleep_until(next_page), if !token.is_cancelled() => {
                    next_page = Instant::now() + self.republish_step(&mut begin_job, &limiter).await;
                }
                () = token.cancelled(), if !token.is_cancelled() => {}
            }
        }
        if !pending.is_empty() {
            self.flush_acks(&mut pending, &limiter).await;
        }
        debug!("Outbox stopped.");
    }

    /// Begins a republish job if one is owed, then hands out one page of every bucket's job
    /// (any replica's). Returns how long to wait before the next page.
    async fn republish_step(&self, begin_job: &mut bool, limiter: &LogLimiter) -> Duration {
        if *begin_job {
            match self.store.start_republish().await {
                Ok(began) => {
                    *begin_job = false;
                    if began {
                        info!("Republishing every device's status (a job in Redis, shared by the replicas).");
                    }
                }
                Err(e) => {
                    if let Some(n) = limiter.check() {
                        warn!(error = %e, suppressed = n, "Cannot begin republishing statuses; retrying.");
                    }
                    return REPUBLISH_IDLE;
                }
            }
        }
        // As for claims: our own backlog first.
        if self.out.capacity() * 2 < self.out.max_capacity() {
            return REPUBLISH_TICK;
        }
        let page = self
            .store
            .republish_page(&self.instance, REPUBLISH_PAGE)
            .await;
        let n = page.done.len();
        publish(&self.out, page.done, Lag::Skip).await;
        if let (Some(e), Some(n)) = (page.error, limiter.check()) {
            warn!(error = %e, suppressed = n, "Cannot read the republish jobs.");
        }
        if n > 0 {
            REPUBLISH_TICK
        } else {
            REPUBLISH_IDLE
        }
    }

    async fn flush_acks(&self, pending: &mut Vec<Delivered>, limiter: &LogLimiter) {
        let acked = self.store.ack(pending).await;
        if !acked.done.is_empty() {
            debug!(
                n = acked.done.len(),
                "Republishing statuses overtaken in flight."
            );
        }
        publish(&self.out, acked.done, Lag::Skip).await;
        match acked.error {
            None => pending.clear(),
            Some(e) => {
                // Keep the acknowledgements of the buckets that failed.
                pending.retain(|a| acked.failed.contains(&a.receipt.bucket));
                if let Some(n) = limiter.check() {
                    warn!(error = %e, held = pending.len(), suppressed = n, "Cannot record acknowledgements in Redis; keeping them.");
                }
                if pending.len() > ACKS_HELD {
                    let excess = pending.len() - ACKS_HELD;
                    pending.drain(..excess);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_table_keeps_the_lower_deadline_on_a_race() {
        let due = DueTable::default();
        due.lower(3, 500);
        assert_eq!(due.earliest(), 500);
        let seen = due.get(3);
        due.lower(3, 200); // the applier, between the sweep's read and its write
        due.replace(3, seen, Some(900));
        assert_eq!(due.get(3), 200);
        let seen = due.get(3);
        due.replace(3, seen, None);
        assert_eq!(due.get(3), u64::MAX);
    }
}
