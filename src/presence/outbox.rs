//! What happens to committed transitions after the status queue: the broker's
//! acknowledgements recorded in Redis (`ack.lua`, which stages the current status again
//! where an older one may have overwritten it), transitions whose publisher died claimed
//! (`claim.lua`), and every status republished after the broker lost its state (the jobs
//! of `republish.lua`). It only republishes seqs already committed: it must not decide a
//! transition.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::groups::GroupNotes;
use super::handoff::{backlogged, publish};
use crate::device::{now_ms, Millis};
use crate::status::{Delivered, Lag, StatusOut};
use crate::store::{Store, OUTBOX_LEASE};
use crate::telemetry::LogLimiter;

/// How often the outbox is checked for expired leases.
const CLAIM_EVERY: Duration = Duration::from_secs(2);
/// Most entries one claim takes over per bucket.
const CLAIM_LIMIT: usize = 1_000;
/// Republishing after the broker lost its retained statuses: a page of about
/// `REPUBLISH_PAGE` devices per bucket every `REPUBLISH_TICK` (about 5,000 statuses/s per
/// replica that works on the job), and a look for jobs every `REPUBLISH_IDLE` otherwise.
const REPUBLISH_PAGE: usize = 8;
const REPUBLISH_TICK: Duration = Duration::from_millis(100);
const REPUBLISH_IDLE: Duration = Duration::from_secs(1);
/// Most acknowledgements kept while Redis is away; beyond, they are dropped and the outbox
/// lease publishes those statuses once more (a duplicate, never a loss).
const ACKS_HELD: usize = 100_000;
/// Acknowledgements read at once from the channel, and recorded at most in one call.
const ACKS_READ: usize = 1_000;
const ACKS_BATCH: usize = 5_000;

/// Acknowledgements, lost publishers and lost retained state.
pub(crate) struct Outbox {
    pub(crate) store: Store,
    pub(crate) out: mpsc::Sender<StatusOut>,
    pub(crate) ack_rx: mpsc::Receiver<Delivered>,
    /// Woken when the broker lost its retained statuses: a republish job begins.
    pub(crate) republish: Arc<Notify>,
    /// Our name on the republish jobs we hold.
    pub(crate) instance: String,
    /// Group statuses noted before their acknowledgement is recorded.
    pub(crate) groups: GroupNotes,
}

/// Whether this replica owes the beginning of a republish job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    Owed,
    None,
}

/// Whether the loop goes on.
enum Flow {
    Go,
    Stop,
}

impl Outbox {
    /// Runs until the MQTT task is gone (the ack channel closes), so that acknowledgements
    /// arriving while it drains at shutdown are still recorded; claiming and republishing
    /// stop as soon as `token` is cancelled.
    pub(crate) async fn run(self, token: CancellationToken) {
        let state = State {
            outbox: self,
            limiter: LogLimiter::new(Duration::from_secs(10)),
            pending: Vec::new(),
            claim: tokio::time::interval(CLAIM_EVERY),
            // At start, whatever a previous run committed and did not see acknowledged is
            // ours: every entry leased before this process could have leased any.
            first_claim: Some(now_ms() + OUTBOX_LEASE.as_millis() as u64),
            next_page: Instant::now(),
            job: Job::None,
        };
        state.run(token).await;
    }
}

/// The outbox between two events.
struct State {
    outbox: Outbox,
    limiter: LogLimiter,
    /// Acknowledgements not yet recorded.
    pending: Vec<Delivered>,
    claim: Interval,
    /// Until the first claim has been answered by every bucket: the lease end it takes.
    first_claim: Option<Millis>,
    next_page: Instant,
    job: Job,
}

impl State {
    async fn run(mut self, token: CancellationToken) {
        loop {
            let flow = tokio::select! {
                biased;
                n = self.outbox.ack_rx.recv_many(&mut self.pending, ACKS_READ) => self.acks(n).await,
                _ = self.claim.tick(), if !token.is_cancelled() => self.claim().await,
                () = self.outbox.republish.notified(), if !token.is_cancelled() => {
                    self.job = Job::Owed;
                    self.next_page = Instant::now();
                    Flow::Go
                }
                () = tokio::time::sleep_until(self.next_page), if !token.is_cancelled() => {
                    self.next_page = Instant::now() + self.republish_step().await;
                    Flow::Go
                }
                () = token.cancelled(), if !token.is_cancelled() => Flow::Go,
            };
            if let Flow::Stop = flow {
                break;
            }
        }
        if !self.pending.is_empty() {
            self.flush_acks().await;
        }
        debug!("Outbox stopped.");
    }

    /// Acknowledgements came (`n == 0`: the MQTT task is gone): records them with what else
    /// is queued, up to a batch.
    async fn acks(&mut self, n: usize) -> Flow {
        if n == 0 {
            return Flow::Stop;
        }
        while self.pending.len() < ACKS_BATCH {
            match self.outbox.ack_rx.try_recv() {
                Ok(a) => self.pending.push(a),
                Err(_) => break,
            }
        }
        self.flush_acks().await;
        Flow::Go
    }

    /// Takes over (and publishes) the entries whose lease ran out.
    async fn claim(&mut self) -> Flow {
        if !self.pending.is_empty() {
            self.flush_acks().await;
        }
        // A backlog of our own means the broker is slow, not that a publisher died:
        // claiming now would queue duplicates of what is already queued and feed the
        // backlog. Claim when the queue is at most half full.
        if backlogged(&self.outbox.out) {
            return Flow::Go;
        }
        let claimed = self
            .outbox
            .store
            .claim_outbox(self.first_claim, CLAIM_LIMIT)
            .await;
        if !claimed.done.is_empty() {
            info!(
                n = claimed.done.len(),
                "Publishing transitions whose publisher did not confirm them."
            );
        }
        publish(&self.outbox.out, claimed.done, Lag::Observe).await;
        match claimed.error {
            // The first claim takes over a previous run's entries: it is done only when
            // every bucket answered.
            None => self.first_claim = None,
            Some(e) => {
                if let Some(n) = self.limiter.check() {
                    warn!(error = %e, suppressed = n, "Cannot read the outbox.");
                }
            }
        }
        Flow::Go
    }

    /// Begins a republish job if one is owed, then hands out one page of every bucket's job
    /// (any replica's). Returns how long to wait before the next page.
    async fn republish_step(&mut self) -> Duration {
        if self.job == Job::Owed {
            match self.outbox.store.start_republish().await {
                Ok(began) => {
                    self.job = Job::None;
                    if began {
                        info!("Republishing every device's status (a job in Redis, shared by the replicas).");
                    }
                }
                Err(e) => {
                    if let Some(n) = self.limiter.check() {
                        warn!(error = %e, suppressed = n, "Cannot begin republishing statuses; retrying.");
                    }
                    return REPUBLISH_IDLE;
                }
            }
        }
        // As for claims: our own backlog first.
        if backlogged(&self.outbox.out) {
            return REPUBLISH_TICK;
        }
        let page = self
            .outbox
            .store
            .republish_page(&self.outbox.instance, REPUBLISH_PAGE)
            .await;
        let n = page.done.len();
        publish(&self.outbox.out, page.done, Lag::Skip).await;
        if let (Some(e), Some(n)) = (page.error, self.limiter.check()) {
            warn!(error = %e, suppressed = n, "Cannot read the republish jobs.");
        }
        if n > 0 {
            REPUBLISH_TICK
        } else {
            REPUBLISH_IDLE
        }
    }

    /// Records the pending acknowledgements; those of the buckets that failed are kept (up
    /// to `ACKS_HELD`).
    async fn flush_acks(&mut self) {
        // Noted in their groups first: an acknowledgement recorded is a status no one
        // publishes (nor notes) again.
        let noted = (self.outbox.groups)
            .note(&self.outbox.store, &self.outbox.out, &self.pending)
            .await;
        let kept = match noted {
            Ok(()) => Vec::new(),
            Err(e) => {
                // Only the statuses of groups wait for their note; the others are recorded.
                let (grouped, rest) = std::mem::take(&mut self.pending)
                    .into_iter()
                    .partition(GroupNotes::notes);
                self.pending = rest;
                if let Some(n) = self.limiter.check() {
                    warn!(error = %e, held = grouped.len(), suppressed = n, "Cannot note statuses in their groups; keeping their acknowledgements.");
                }
                grouped
            }
        };
        self.record_acks().await;
        self.pending.extend(kept);
        self.bound_pending();
    }

    /// Records the pending acknowledgements (see [`State::flush_acks`]).
    async fn record_acks(&mut self) {
        let acked = self.outbox.store.ack(&self.pending).await;
        if !acked.done.is_empty() {
            debug!(
                n = acked.done.len(),
                "Republishing statuses overtaken in flight."
            );
        }
        publish(&self.outbox.out, acked.done, Lag::Skip).await;
        let Some(e) = acked.error else {
            self.pending.clear();
            return;
        };
        self.pending
            .retain(|a| acked.failed.contains(&a.receipt.bucket));
        if let Some(n) = self.limiter.check() {
            warn!(error = %e, held = self.pending.len(), suppressed = n, "Cannot record acknowledgements in Redis; keeping them.");
        }
    }

    /// At most [`ACKS_HELD`] acknowledgements kept: the oldest go (their statuses are
    /// published once more when their lease ends).
    fn bound_pending(&mut self) {
        if self.pending.len() > ACKS_HELD {
            let excess = self.pending.len() - ACKS_HELD;
            self.pending.drain(..excess);
        }
    }
}
