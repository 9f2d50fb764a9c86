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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::device::{now_ms, DeviceId, Millis};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::mqtt::StatusOut;
use crate::store::{lease_ms, Ack, Beat, Bucket, Committed, Store, BUCKETS};
use crate::telemetry::{Backoff, LogLimiter};

/// Most devices held for Redis at once (coalesced: one entry per device). Beyond it new
/// devices' heartbeats are dropped (and logged); known ones still refresh their entry.
pub const HELD_CAP: usize = 1_000_000;
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
/// Statuses republished per second after the broker lost its state.
const REPUBLISH_RATE: u64 = 5_000;

// === impl Held ===

/// Heartbeats received and not yet applied, shared by the MQTT task (insert) and the
/// [`Applier`] (take). A `std` mutex: nothing awaits while holding it.
pub struct Held {
    inner: Mutex<HeldInner>,
    notify: Notify,
    cap: usize,
}

#[derive(Default)]
struct HeldInner {
    /// device → (latest arrival, latest deadline)
    map: HashMap<DeviceId, (Millis, Millis)>,
    /// Oldest arrival among `map`.
    oldest: Option<Millis>,
    /// Oldest arrival of the batch the applier is working on.
    oldest_in_flight: Option<Millis>,
    closed: bool,
}

impl Held {
    pub fn new(cap: usize) -> Held {
        Held {
            inner: Mutex::new(HeldInner::default()),
            notify: Notify::new(),
            cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HeldInner> {
        // A panic while holding this lock cannot leave the map inconsistent (every update is
        // a single insert), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds a heartbeat that arrives now. `false` if it was dropped (at capacity).
    ///
    /// The arrival time is taken under the lock, so the watermark can never pass a
    /// heartbeat that is on its way in.
    pub fn insert(&self, device: DeviceId, ttl: Duration) -> bool {
        let mut inner = self.lock();
        let now = now_ms();
        let deadline = now + ttl.as_millis() as u64;
        let len = inner.map.len();
        match inner.map.get_mut(&device) {
            Some(entry) => {
                entry.0 = entry.0.max(now);
                entry.1 = entry.1.max(deadline);
            }
            None if len >= self.cap => return false,
            None => {
                inner.map.insert(device, (now, deadline));
            }
        }
        inner.oldest = Some(inner.oldest.map_or(now, |o| o.min(now)));
        drop(inner);
        self.notify.notify_one();
        true
    }

    /// Takes every held heartbeat; they count towards the watermark until [`Held::applied`].
    fn take(&self) -> Vec<Beat> {
        let mut inner = self.lock();
        let map = std::mem::take(&mut inner.map);
        if let Some(oldest) = inner.oldest.take() {
            inner.oldest_in_flight = Some(inner.oldest_in_flight.map_or(oldest, |o| o.min(oldest)));
        }
        map.into_iter()
            .map(|(device, (arrival, deadline))| Beat {
                device,
                arrival,
                ttl_ms: deadline - arrival,
            })
            .collect()
    }

    /// The batch taken last is in Redis.
    fn applied(&self) {
        self.lock().oldest_in_flight = None;
    }

    /// Every heartbeat that arrived before this time has been applied; `None`: all have.
    pub fn watermark(&self) -> Option<Millis> {
        let inner = self.lock();
        match (inner.oldest, inner.oldest_in_flight) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The latest deadline an expiry may be decided for now: before any unapplied heartbeat.
    pub fn cutoff(&self, now: Millis) -> Millis {
        match self.watermark() {
            Some(w) => now.min(w.saturating_sub(1)),
            None => now,
        }
    }

    /// No more heartbeats will come (the MQTT task stopped).
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    fn is_closed_and_empty(&self) -> bool {
        let inner = self.lock();
        inner.closed && inner.map.is_empty()
    }
}

/// Hands committed transitions to the publisher; awaits room (backpressure).
async fn publish(out: &mpsc::Sender<StatusOut>, committed: Vec<Committed>, lag: bool) {
    for c in committed {
        let status = StatusOut {
            event: c.event,
            bucket: c.bucket,
            member: c.member,
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
    pub due: Arc<DueTable>,
}

impl Applier {
    /// Runs until the MQTT task closed [`Held`] and everything held is applied (or, with Redis
    /// away at shutdown, until cancelled and closed).
    pub async fn run(self, token: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let mut batch: Vec<Beat> = Vec::new();
        loop {
            if batch.is_empty() {
                if self.held.is_closed_and_empty() {
                    break;
                }
                batch = self.held.take();
                if batch.is_empty() {
                    self.held.notify.notified().await;
                    continue;
                }
            }
            let mut failed = None;
            let mut retry: Vec<Beat> = Vec::new();
            for (i, chunk) in batch.chunks(APPLY_BATCH).enumerate() {
                let applied = self.store.apply_heartbeats(chunk, now_ms()).await;
                // Whatever was committed is published, even if other buckets failed (in a
                // cluster, one master may be failing over while the others work).
                count(&self.metrics, &applied.done);
                publish(&self.out, applied.done, true).await;
                for beat in chunk {
                    let b = crate::store::bucket_of(beat.device.as_str());
                    if applied.failed.contains(&b) {
                        retry.push(beat.clone());
                    } else {
                        self.due.lower(b, beat.arrival + beat.ttl_ms);
                    }
                }
                if let Some(e) = applied.error {
                    failed = Some(e);
                    retry.extend(batch.chunks(APPLY_BATCH).skip(i + 1).flatten().cloned());
                    break;
                }
                self.health.set_redis_commands(true);
            }
            match failed {
                None => {
                    backoff.reset();
                    batch.clear();
                    self.held.applied();
                }
                Some(e) => {
                    // Keep what was not applied (re-applying is harmless: deadlines only
                    // grow) and keep holding new heartbeats; expiries wait for them (the
                    // watermark stays at the oldest heartbeat of the batch until all is in).
                    batch = retry;
                    self.health.set_redis_commands(false);
                    if let Some(n) = limiter.check() {
                        warn!(error = %e, held = batch.len(), suppressed = n, "Cannot apply heartbeats to Redis; holding them.");
                    }
                    let closed_and_cancelled = token.is_cancelled() && self.held.lock().closed;
                    if closed_and_cancelled {
                        warn!(
                            held = batch.len(),
                            "Shutting down with heartbeats not applied."
                        );
                        break;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                    // Merge what arrived meanwhile, so the retry is one round trip.
                    batch.extend(self.held.take());
                }
            }
        }
        debug!("Heartbeat applier stopped.");
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
    pub due: Arc<DueTable>,
    pub expired_rx: mpsc::Receiver<DeviceId>,
    pub reconcile: Arc<Notify>,
    pub ingest: watch::Receiver<Option<Millis>>,
    /// Asks the MQTT task for a fresh sync marker after a stall.
    pub resync: Arc<Notify>,
    /// How long deadlines that fell due during a Redis outage wait after it (see [`Hold`]).
    pub outage_grace: Duration,
    pub hold: Hold,
}

/// After a Redis outage, deadlines from `from` on are not decided until `outage_grace` after
/// Redis answered again.
///
/// Why: other replicas may hold heartbeats they received during the outage and could not
/// apply yet (their connection recovers a little later than ours), and our watermark does
/// not cover their heartbeats. A device whose deadline fell in the outage may be alive on
/// their side. Deadlines before `from` (the start of our last complete sweep before the
/// outage) were decided already and are not held.
#[derive(Debug, Default)]
pub struct Hold {
    /// Start of the last sweep of every bucket that succeeded.
    last_full_ok: Millis,
    /// Deadlines at or after this wait.
    from: Option<Millis>,
    /// When the wait ends; `None` while Redis is still failing.
    until: Option<Instant>,
}

impl Hold {
    fn failed(&mut self) {
        let from = self.from.unwrap_or(self.last_full_ok);
        self.from = Some(from.min(self.last_full_ok));
        self.until = None;
    }

    fn swept_all(&mut self, started: Millis, grace: Duration) {
        match (self.from, self.until) {
            (None, _) => self.last_full_ok = started,
            (Some(_), None) => {
                self.until = Some(Instant::now() + grace);
                info!(grace = ?grace, "Redis answers again; deadlines that fell due during the outage wait for the other replicas' heartbeats.");
            }
            (Some(_), Some(until)) if Instant::now() >= until => {
                self.from = None;
                self.until = None;
                self.last_full_ok = started;
            }
            (Some(_), Some(_)) => {}
        }
    }

    /// The latest deadline that may be decided, given `cutoff`.
    fn limit(&self, cutoff: Millis) -> Millis {
        match self.from {
            Some(from) => cutoff.min(from.saturating_sub(1)),
            None => cutoff,
        }
    }
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
                let r = self.sweep_all(Source::Reconcile).await;
                if r.is_ok() {
                    reconcile_owed = false;
                    next_safety = Instant::now() + SAFETY_EVERY;
                }
                r
            } else {
                let now = now_ms();
                let cutoff = self.cutoff(now);
                let earliest = self.due.earliest();
                let wake = if earliest <= cutoff {
                    last_sweep + MIN_SWEEP_GAP
                } else if earliest <= now {
                    // Due, but a heartbeat older than it is still being applied.
                    Instant::now() + Duration::from_millis(5)
                } else {
                    let ms = (earliest - now).min(SAFETY_EVERY.as_millis() as u64);
                    Instant::now() + Duration::from_millis(ms)
                };
                let planned = wake.min(next_safety);
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
                        self.sweep_all(Source::SafetyNet).await
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
                    self.hold.failed();
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
    fn cutoff(&self, now: Millis) -> Millis {
        self.hold.limit(self.held.cutoff(now))
    }

    async fn on_expired(&mut self, first: DeviceId) -> Result<(), crate::store::StoreError> {
        let mut ids = vec![first];
        while ids.len() < SWEEP_LIMIT {
            match self.expired_rx.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        let now = now_ms();
        let expired = self.store.expire_devices(&ids, now, self.cutoff(now)).await;
        self.decided(Source::Notification, expired.done).await;
        expired.error.map_or(Ok(()), Err)
    }

    /// Sweeps the buckets whose known deadline has come.
    async fn sweep_due(&mut self) -> Result<(), crate::store::StoreError> {
        let now = now_ms();
        let cutoff = self.cutoff(now);
        let seen: Vec<(Bucket, Millis)> = (0..BUCKETS)
            .map(|b| (b, self.due.get(b)))
            .filter(|(_, d)| *d <= cutoff)
            .collect();
        if seen.is_empty() {
            return Ok(());
        }
        let buckets: Vec<Bucket> = seen.iter().map(|(b, _)| *b).collect();
        let swept = self.store.sweep(&buckets, now, cutoff, SWEEP_LIMIT).await;
        let mut all = Vec::new();
        for s in swept.done {
            let seen = seen
                .iter()
                .find(|(b, _)| *b == s.bucket)
                .map_or(0, |(_, d)| *d);
            let next = if s.more { Some(now) } else { s.next_deadline };
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
    async fn sweep_all(&mut self, source: Source) -> Result<(), crate::store::StoreError> {
        let mut buckets: Vec<Bucket> = (0..BUCKETS).collect();
        let started = Instant::now();
        let started_ms = now_ms();
        let mut total = 0usize;
        while !buckets.is_empty() {
            let now = now_ms();
            let mut cutoff = self.cutoff(now);
            if source == Source::SafetyNet {
                cutoff = cutoff.saturating_sub(MISSED_GRACE_MS);
            }
            let seen: Vec<Millis> = (0..BUCKETS).map(|b| self.due.get(b)).collect();
            let swept = self.store.sweep(&buckets, now, cutoff, SWEEP_LIMIT).await;
            let mut again = Vec::new();
            let mut all = Vec::new();
            for s in swept.done {
                if s.more {
                    again.push(s.bucket);
                }
                self.due
                    .replace(s.bucket, seen[usize::from(s.bucket)], s.next_deadline);
                all.extend(s.committed);
            }
            total += all.len();
            self.decided(source, all).await;
            if let Some(e) = swept.error {
                // The buckets that failed are swept again by the reconciliation this error
                // asks for.
                return Err(e);
            }
            self.health.set_redis_commands(true);
            buckets = again;
        }
        self.hold.swept_all(started_ms, self.outage_grace);
        if source == Source::Reconcile {
            info!(
                missed = total,
                took_ms = started.elapsed().as_millis() as u64,
                "Reconciled expiries."
            );
        }
        Ok(())
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
        publish(&self.out, committed, true).await;
    }
}

// === impl Outbox ===

/// Acknowledgements, lost publishers and lost retained state.
pub struct Outbox {
    pub store: Store,
    pub out: mpsc::Sender<StatusOut>,
    pub ack_rx: mpsc::Receiver<Ack>,
    pub republish: Arc<Notify>,
}

/// Most acknowledgements kept while Redis is away; beyond, they are dropped and the outbox
/// lease publishes those statuses once more (a duplicate, never a loss).
const ACKS_HELD: usize = 100_000;

impl Outbox {
    /// Runs until the MQTT task is gone (the ack channel closes), so that acknowledgements
    /// arriving while it drains at shutdown are still recorded; claiming and republishing
    /// stop as soon as `token` is cancelled.
    pub async fn run(mut self, token: CancellationToken, tracker: tokio_util::task::TaskTracker) {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let mut pending: Vec<Ack> = Vec::new();
        let mut claim = tokio::time::interval(CLAIM_EVERY);
        // At start, whatever a previous run committed and did not see acknowledged is ours:
        // every entry leased before this process could have leased any.
        let mut first_claim = Some(now_ms() + lease_ms());
        let mut republisher: Option<CancellationToken> = None;
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
                    let now = now_ms();
                    let claimed = self.store.claim_outbox(now, first_claim.unwrap_or(now), SWEEP_LIMIT).await;
                    if !claimed.done.is_empty() {
                        info!(n = claimed.done.len(), "Publishing transitions whose publisher did not confirm them.");
                    }
                    publish(&self.out, claimed.done, true).await;
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
                    if let Some(t) = republisher.take() {
                        t.cancel();
                    }
                    let t = token.child_token();
                    republisher = Some(t.clone());
                    let (store, out) = (self.store.clone(), self.out.clone());
                    tracker.spawn(republish_all(store, out, t));
                }
                () = token.cancelled(), if !token.is_cancelled() => {}
            }
        }
        if !pending.is_empty() {
            self.flush_acks(&mut pending, &limiter).await;
        }
        debug!("Outbox stopped.");
    }

    async fn flush_acks(&self, pending: &mut Vec<Ack>, limiter: &LogLimiter) {
        let acked = self.store.ack(pending, now_ms()).await;
        if !acked.done.is_empty() {
            debug!(
                n = acked.done.len(),
                "Republishing statuses overtaken in flight."
            );
        }
        publish(&self.out, acked.done, false).await;
        match acked.error {
            None => pending.clear(),
            Some(e) => {
                // Keep the acknowledgements of the buckets that failed.
                pending.retain(|a| acked.failed.contains(&a.bucket));
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

/// Publishes every device's current status, paced, e.g. after the broker lost its
/// retained messages. A status overtaken meanwhile is corrected by the ack check.
async fn republish_all(store: Store, out: mpsc::Sender<StatusOut>, token: CancellationToken) {
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut backoff = Backoff::new(Duration::from_secs(5));
    for b in 0..BUCKETS {
        let mut cursor = 0;
        loop {
            if token.is_cancelled() {
                return;
            }
            let (next, records) = match store.scan_records(b, cursor).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "Republishing statuses: cannot read Redis; retrying.");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            sent += records.len() as u64;
            publish(&out, records, false).await;
            // Pace: never ahead of REPUBLISH_RATE per second on average.
            let due = started + Duration::from_millis(sent * 1000 / REPUBLISH_RATE);
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep_until(due) => {}
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    if sent > 0 {
        info!(
            statuses = sent,
            took_ms = started.elapsed().as_millis() as u64,
            "Republished every device's status."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn held_coalesces_and_tracks_the_watermark() {
        let held = Held::new(2);
        assert_eq!(held.watermark(), None);
        assert_eq!(held.cutoff(1_000), 1_000);
        assert!(held.insert(id("a"), Duration::from_secs(10)));
        let w = held.watermark().unwrap();
        assert!(held.insert(id("a"), Duration::from_secs(1)));
        assert!(held.insert(id("b"), Duration::from_secs(1)));
        // Capacity counts devices, not heartbeats.
        assert!(!held.insert(id("c"), Duration::from_secs(1)));
        assert!(held.insert(id("a"), Duration::from_secs(1)));
        assert_eq!(held.watermark(), Some(w));
        assert_eq!(held.cutoff(w + 100), w - 1);

        let batch = held.take();
        assert_eq!(batch.len(), 2);
        let a = batch.iter().find(|b| b.device == id("a")).unwrap();
        // The longest deadline any of a's heartbeats asked for stands.
        assert!(a.ttl_ms >= 9_000, "{a:?}");
        // Taken but not applied: still holds the watermark back.
        assert_eq!(held.watermark(), Some(w));
        held.applied();
        assert_eq!(held.watermark(), None);
    }

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
