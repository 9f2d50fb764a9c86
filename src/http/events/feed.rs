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
    /// The bucket's stream starts over below where the feed was (a Redis that lost its data
    /// and whose clock is behind): clients forget their place in it.
    Restart(Bucket),
}

/// The feed's place and the clients' way in.
pub(crate) struct Hub {
    state: Mutex<HubState>,
    /// Client slots.
    pub(crate) slots: Arc<Semaphore>,
}

struct HubState {
    /// Where the feed is; `None` until it read every bucket's end once.
    at: Option<Position>,
    tx: broadcast::Sender<Item>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            state: Mutex::new(HubState {
                at: None,
                tx: broadcast::channel(BROADCAST).0,
            }),
            slots: Arc::new(Semaphore::new(MAX_CLIENTS)),
        }
    }
}

impl Hub {
    /// The feed's place and a receiver of everything after it (taken together, so nothing
    /// falls between them); `None` while the feed has not started.
    pub(crate) fn follow(&self) -> Option<(Position, broadcast::Receiver<Item>)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let at = state.at.clone()?;
        Some((at, state.tx.subscribe()))
    }

    fn start(&self, at: Position) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).at = Some(at);
    }

    /// Hands one read of a bucket on; returns whether the bucket may have more.
    fn publish(&self, read: LogRead) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let HubState { at: Some(at), tx } = &mut *state else {
            return false;
        };
        let b = read.bucket;
        if read.last < at.get(b) {
            warn!(bucket = b, "The event log of a bucket starts over (Redis lost it); clients following it get a gap.");
            at.set(b, StreamId::START);
            let _ = tx.send(Item::Restart(b));
            return true;
        }
        let more = read.entries.len() >= READ_BATCH;
        for entry in read.entries {
            at.set(b, entry.id);
            // No receiver: nobody follows; the place moves on all the same.
            let _ = tx.send(Item::Event(Arc::new(LiveEvent::of(b, entry))));
        }
        more
    }
}

/// The `events` task: reads every bucket's end, then polls the log until cancelled.
pub(crate) async fn run(store: Store, hub: Arc<Hub>, token: CancellationToken) {
    let all: Vec<Bucket> = (0..BUCKETS).collect();
    let start = loop {
        let ends = all
            .iter()
            .map(|&b| (b, LogFrom::Oldest))
            .collect::<Vec<_>>();
        match store.read_events(&ends, 0).await.into_result() {
            Ok(reads) => {
                let mut at = Position::default();
                for r in reads {
                    at.set(r.bucket, r.last);
                }
                break at;
            }
            Err(e) => {
                if let Some(n) = READ_FAILED.check() {
                    warn!(error = %e, suppressed = n, "Cannot read the event log yet; /events waits.");
                }
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(POLL_EVERY * 10) => {}
        }
    };
    hub.start(start);
    info!("Following the event log.");
    loop {
        let more = poll(&store, &hub, &all).await;
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

/// One read of every bucket after the feed's place; whether any bucket may have more.
async fn poll(store: &Store, hub: &Hub, all: &[Bucket]) -> bool {
    let Some((at, _)) = hub.follow() else {
        return false;
    };
    let from: Vec<_> = all
        .iter()
        .map(|&b| (b, LogFrom::After(at.get(b))))
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
