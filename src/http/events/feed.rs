//! The feed: one reader of the event log per replica, handing what it reads to every
//! `/events` client of this replica.
//!
//! Owns [`Hub`] (the feed's place in the log and the broadcast of what comes after it) and
//! the `events` task ([`run`]). The log is in Redis, one stream per bucket, written by
//! whichever replica committed the transition; every replica reads all of it, so each
//! replica's stream carries every replica's transitions. Must not write to Redis.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bucket::{Bucket, BUCKETS};
use crate::device::{DeviceId, GroupName};
use crate::event_log::{Position, StreamId};
use crate::status::Outbound;
use crate::store::{LogEntry, LogFrom, LogRead, Store};
use crate::telemetry::LogLimiter;

/// How often the feed looks for new entries while the log is quiet: an event is on every
/// replica's stream within this (plus a round trip) of its commit. One call per bucket per
/// poll: a pipeline of 64 small reads on one Redis, 64 concurrent calls on a cluster.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(100);
/// Entries read per bucket and poll; a bucket that had more is read again at once.
pub(crate) const READ_BATCH: usize = 500;
/// Items the broadcast holds for the slowest client before it is cut off (`Lagged`).
const BROADCAST: usize = 8192;
/// Most clients following `/events` at once on one replica; one more is answered 503.
pub(crate) const MAX_CLIENTS: usize = 256;

static READ_FAILED: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// An event of the log, as every client of this replica gets it.
#[derive(Debug)]
pub(crate) struct LiveEvent {
    pub(crate) bucket: Bucket,
    pub(crate) id: StreamId,
    pub(crate) prev: StreamId,
    pub(crate) kind: Kind,
    /// The status JSON as published.
    pub(crate) data: Bytes,
}

/// What an event is about (what the filters look at).
#[derive(Debug)]
pub(crate) enum Kind {
    Status {
        device: DeviceId,
        group: Option<GroupName>,
    },
    Group(GroupName),
    /// An entry whose member could not be read: sent to nobody, but its place counts.
    Unreadable,
}

impl Kind {
    /// The SSE event name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Kind::Status { .. } => "status",
            Kind::Group(_) => "group",
            Kind::Unreadable => "",
        }
    }
}

impl LiveEvent {
    pub(crate) fn of(bucket: Bucket, entry: LogEntry) -> LiveEvent {
        let (kind, data) = match entry.event {
            None => (Kind::Unreadable, Bytes::new()),
            Some(Outbound::Device(ev)) => {
                let data = Bytes::from(ev.to_json());
                let kind = Kind::Status {
                    device: ev.device,
                    group: ev.group,
                };
                (kind, data)
            }
            Some(Outbound::Group(g)) => (Kind::Group(g.group.clone()), Bytes::from(g.to_json())),
        };
        LiveEvent {
            bucket,
            id: entry.id,
            prev: entry.prev,
            kind,
            data,
        }
    }
}

/// What the feed broadcasts.
#[derive(Clone, Debug)]
pub(crate) enum Item {
    Event(Arc<LiveEvent>),
    /// The bucket's stream ends below where the feed was (Redis lost entries: a failover to
    /// a replica that had not got them, or lost data): the feed goes on from the stream's
    /// end, and clients are told `gap`.
    Restart(Bucket, StreamId),
    /// The feed learnt a bucket's end only now (its master did not answer at start):
    /// clients that had no place in it take this one.
    Known(Bucket, StreamId),
}

/// The feed's place and the clients' way in.
pub(crate) struct Hub {
    state: Mutex<HubState>,
    /// Client slots.
    pub(crate) slots: Arc<Semaphore>,
    /// Catch-ups from Redis under way at once: they share the monitor's connection, so a
    /// crowd of clients resuming together (after a restart) reads the log a few at a time.
    pub(crate) catch_ups: Arc<Semaphore>,
}

struct HubState {
    /// Where the feed is; `None` until it has started.
    at: Option<Position>,
    tx: broadcast::Sender<Item>,
}

/// Catch-ups at once (see [`Hub::catch_ups`]).
const CATCH_UPS: usize = 4;

impl Default for Hub {
    fn default() -> Self {
        Hub {
            state: Mutex::new(HubState {
                at: None,
                tx: broadcast::channel(BROADCAST).0,
            }),
            slots: Arc::new(Semaphore::new(MAX_CLIENTS)),
            catch_ups: Arc::new(Semaphore::new(CATCH_UPS)),
        }
    }
}

impl Hub {
    /// The feed's place and a receiver of everything after it (taken together, so nothing
    /// falls between them); `None` while the feed has not started.
    pub(crate) fn follow(&self) -> Option<(Position, broadcast::Receiver<Item>)> {
        let state = self.lock();
        let at = state.at.clone()?;
        Some((at, state.tx.subscribe()))
    }

    /// The feed's place.
    fn place(&self) -> Option<Position> {
        self.lock().at.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(&self, at: Position) {
        self.lock().at = Some(at);
    }

    /// A bucket's end learnt late (see [`Item::Known`]).
    fn known(&self, b: Bucket, last: StreamId) {
        let mut state = self.lock();
        let HubState { at: Some(at), tx } = &mut *state else {
            return;
        };
        at.set(b, last);
        let _ = tx.send(Item::Known(b, last));
    }

    /// Hands one read of a bucket on; returns whether the bucket may have more. The events
    /// are made outside the lock (clients take it to follow).
    fn publish(&self, read: LogRead) -> bool {
        let b = read.bucket;
        let more = read.entries.len() >= READ_BATCH;
        let events: Vec<Arc<LiveEvent>> = read
            .entries
            .into_iter()
            .map(|e| Arc::new(LiveEvent::of(b, e)))
            .collect();
        let mut state = self.lock();
        let HubState { at: Some(at), tx } = &mut *state else {
            return false;
        };
        if read.last < at.get(b) {
            warn!(bucket = b, "The event log of a bucket lost entries (Redis failed over or lost data); clients following it get a gap.");
            at.set(b, read.last);
            let _ = tx.send(Item::Restart(b, read.last));
            return true;
        }
        for ev in events {
            at.set(b, ev.id);
            // No receiver: nobody follows; the place moves on all the same.
            let _ = tx.send(Item::Event(ev));
        }
        more
    }
}

/// The `events` task: reads every bucket's end, then polls the log until cancelled. A
/// bucket whose end cannot be read at start (its master is down) is left out of the polls
/// until it can.
pub(crate) async fn run(store: Store, hub: Arc<Hub>, token: CancellationToken) {
    let mut unknown: Vec<Bucket> = (0..BUCKETS).collect();
    let mut start = Position::default();
    while unknown.len() == usize::from(BUCKETS) {
        learn_ends(&store, &mut unknown, |b, last| start.set(b, last)).await;
        if unknown.len() < usize::from(BUCKETS) {
            break;
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(POLL_EVERY * 10) => {}
        }
    }
    hub.start(start);
    info!(unknown = unknown.len(), "Following the event log.");
    loop {
        if !unknown.is_empty() {
            learn_ends(&store, &mut unknown, |b, last| hub.known(b, last)).await;
        }
        let more = poll(&store, &hub, &unknown).await;
        if !more {
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(POLL_EVERY) => {}
            }
        } else if token.is_cancelled() {
            return;
        }
    }
}

/// Reads the ends of the `unknown` buckets; those that answered leave the list.
async fn learn_ends(
    store: &Store,
    unknown: &mut Vec<Bucket>,
    mut learnt: impl FnMut(Bucket, StreamId),
) {
    let ends: Vec<_> = unknown.iter().map(|&b| (b, LogFrom::Oldest)).collect();
    let reads = store.read_events(&ends, 0).await;
    if let Some(e) = &reads.error {
        if let Some(n) = READ_FAILED.check() {
            warn!(error = %e, suppressed = n, failed = reads.failed.len(), "Cannot read the end of the event log of some buckets yet.");
        }
    }
    for r in reads.done {
        learnt(r.bucket, r.last);
        unknown.retain(|&b| b != r.bucket);
    }
}

/// One read of every known bucket after the feed's place; whether any may have more.
async fn poll(store: &Store, hub: &Hub, unknown: &[Bucket]) -> bool {
    let Some(at) = hub.place() else {
        return false;
    };
    let from: Vec<_> = (0..BUCKETS)
        .filter(|b| !unknown.contains(b))
        .map(|b| (b, LogFrom::After(at.get(b))))
        .collect();
    let reads = store.read_events(&from, READ_BATCH).await;
    if let Some(e) = &reads.error {
        if let Some(n) = READ_FAILED.check() {
            warn!(error = %e, suppressed = n, failed = reads.failed.len(), "Reading the event log failed; retrying.");
        }
    }
    let mut more = false;
    for read in reads.done {
        more |= hub.publish(read);
    }
    more
}
