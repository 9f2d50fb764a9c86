//! One `/events` client: its place in the log, the catch-up from Redis when it resumes, and
//! the live events after it.
//!
//! Owns [`Session`] and [`Resume`]. A client's place is one stream id per bucket
//! ([`Position`]); every event it is sent carries the place as its `id`, so a resume at any
//! replica continues exactly after it. Bounded: a client has a queue of [`QUEUE`] chunks
//! toward its socket (a burst waits there); one that leaves it full for [`PATIENCE`] is cut
//! off (it can resume). Each client has its own task, so a slow one holds up nobody else: while
//! it waits, what it misses stays in Redis and in the feed's broadcast.
//! Must not write to Redis.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::feed::{Hub, Item, Kind, LiveEvent};
use crate::bucket::{bucket_of, Bucket, BUCKETS};
use crate::device::{DeviceId, GroupName};
use crate::event_log::{Position, StreamId};
use crate::store::{LogFrom, LogRead, Store};
use crate::telemetry::LogLimiter;

static SLOW: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// Chunks (events, comments) queued toward one client's socket at most.
pub(crate) const QUEUE: usize = 512;
/// A comment is sent after this long without anything else (the contract asks for one at
/// least every 15 s; proxies close idle connections).
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long a client may leave its queue full before it is cut off.
pub(crate) const PATIENCE: Duration = Duration::from_secs(5);
/// How long a catch-up waits for buckets whose master does not answer before it leaves them.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Entries read per bucket and round trip while catching up.
const CATCH_UP_BATCH: usize = 200;
/// How long to wait for the feed to start (it reads every bucket's end first).
const FEED_WAIT: Duration = Duration::from_secs(5);

/// Where a client asked to begin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Resume {
    /// A fresh connection: live, no replay.
    Live,
    /// Exactly after this place.
    After(Position),
    /// An id that is no place of ours: `gap`, then from the oldest event kept.
    Unknown,
}

/// What a client wants to see.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    pub(crate) device: Option<DeviceId>,
    pub(crate) group: Option<GroupName>,
}

impl Filter {
    fn passes(&self, kind: &Kind) -> bool {
        match kind {
            Kind::Unreadable => false,
            Kind::Status { device, group } => {
                self.device.as_ref().is_none_or(|d| d == device)
                    && self
                        .group
                        .as_ref()
                        .is_none_or(|g| group.as_ref() == Some(g))
            }
            Kind::Group(group) => {
                self.device.is_none() && self.group.as_ref().is_none_or(|g| g == group)
            }
        }
    }
}

/// Why a session ended.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The client went away, or the server is stopping.
    Gone,
    /// The client did not take what it was sent.
    Slow,
}

/// One client's stream.
pub(crate) struct Session {
    pub(crate) store: Store,
    pub(crate) hub: Arc<Hub>,
    pub(crate) filter: Filter,
    pub(crate) tx: mpsc::Sender<Bytes>,
    pub(crate) token: CancellationToken,
    pub(crate) peer: String,
    /// The client's place.
    pub(crate) at: Position,
    pub(crate) last_write: Instant,
}

impl Session {
    /// Streams until the client goes, falls behind or the server stops.
    pub(crate) async fn run(mut self, resume: Resume) {
        match self.stream(resume).await {
            Err(Stop::Slow) => {
                if let Some(suppressed) = SLOW.check() {
                    warn!(
                        peer = %self.peer,
                        queued = QUEUE,
                        suppressed,
                        "An /events client did not keep up and was disconnected; it can resume with Last-Event-ID."
                    );
                }
            }
            Ok(()) | Err(Stop::Gone) => debug!(peer = %self.peer, "An /events client left."),
        }
    }

    async fn stream(&mut self, resume: Resume) -> Result<(), Stop> {
        self.try_write(Bytes::from_static(b": presenced events\nretry: 2000\n\n"))?;
        let (feed_at, mut rx) = self.feed().await?;
        match resume {
            Resume::Live => self.at = feed_at,
            Resume::After(p) => {
                // Past the retention the promise ends: say so, then send what is still kept
                // after the place (a quiet bucket keeps its entries until its next write).
                let (newest_bucket, newest_ms) = p.newest();
                let expired = newest_ms.saturating_add(self.retention_ms())
                    < self.store.clock().now(newest_bucket);
                self.at = p;
                if expired {
                    self.gap("older than the retention").await?;
                }
                self.catch_up(&feed_at, false, expired).await?;
            }
            Resume::Unknown => {
                self.at = Position::default();
                self.gap("unknown id").await?;
                self.catch_up(&feed_at, true, true).await?;
            }
        }
        // The client's place from now on, even before an event passes its filter (after a
        // catch-up the queue may be full: wait for room like the catch-up did).
        let place = self.place_frame("");
        self.write(place).await?;
        loop {
            let idle = self.last_write + KEEP_ALIVE;
            tokio::select! {
                item = rx.recv() => match item {
                    Ok(Item::Event(ev)) => self.live(&ev).await?,
                    Ok(Item::Restart(b, last)) => {
                        self.at.set(b, last);
                        if self.relevant(b) {
                            self.gap("events were lost").await?;
                        }
                    }
                    Ok(Item::Known(b, last)) => {
                        if self.at.get(b) == StreamId::START {
                            self.at.set(b, last);
                        }
                    }
                    // This session fell behind the feed (it was catching up, or starved):
                    // what it missed is in Redis.
                    Err(RecvError::Lagged(_)) => {
                        let (feed_at, fresh) = self.feed().await?;
                        rx = fresh;
                        self.catch_up(&feed_at, false, false).await?;
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
                () = tokio::time::sleep_until(idle) => self.keep_alive()?,
                () = self.tx.closed() => return Err(Stop::Gone),
                () = self.token.cancelled() => return Err(Stop::Gone),
            }
        }
    }

    /// Whether the client can see events of bucket `b` (a device filter names one bucket).
    fn relevant(&self, b: Bucket) -> bool {
        self.filter
            .device
            .as_ref()
            .is_none_or(|d| bucket_of(d.as_str()) == b)
    }

    /// A comment, with the client's place (an `id` without data moves a browser's
    /// `Last-Event-ID` and dispatches nothing).
    fn keep_alive(&mut self) -> Result<(), Stop> {
        self.try_write(self.place_frame(": keep-alive\n"))
    }

    fn place_frame(&self, before: &str) -> Bytes {
        Bytes::from(format!("{before}id: {}\n\n", self.at))
    }

    /// The feed's place and its broadcast, once it has started.
    async fn feed(&self) -> Result<(Position, broadcast::Receiver<Item>), Stop> {
        let give_up = Instant::now() + FEED_WAIT;
        loop {
            if let Some(follow) = self.hub.follow() {
                return Ok(follow);
            }
            if Instant::now() >= give_up || self.token.is_cancelled() {
                return Err(Stop::Gone);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A live event: skipped if the client has it (it resumed ahead of this replica's feed),
    /// preceded by `gap` if the client's place is not the one just before it.
    async fn live(&mut self, ev: &LiveEvent) -> Result<(), Stop> {
        let mine = self.at.get(ev.bucket);
        if ev.id <= mine {
            return Ok(());
        }
        if ev.prev != mine && self.relevant(ev.bucket) {
            self.gap("events were lost").await?;
        }
        self.at.set(ev.bucket, ev.id);
        if self.filter.passes(&ev.kind) {
            let frame = self.frame(ev.kind.name(), &ev.data);
            self.write(frame).await?;
        }
        Ok(())
    }

    /// Reads the log from the client's place up to `until` (the feed's place: what comes
    /// after it arrives live), bucket by bucket in pages; a place that differs from the
    /// feed's either way is read (one ahead of it is checked, not trusted). `oldest`: read
    /// every bucket from its first entry kept; `told_gap`: the client was told `gap`
    /// already. Buckets a device filter rules out are not read (their place becomes the
    /// feed's).
    async fn catch_up(
        &mut self,
        until: &Position,
        oldest: bool,
        mut told_gap: bool,
    ) -> Result<(), Stop> {
        let mut from_oldest = vec![oldest; usize::from(BUCKETS)];
        let mut pending = Vec::new();
        for b in 0..BUCKETS {
            if !self.relevant(b) {
                self.at.set(b, until.get(b));
            } else if oldest || self.at.get(b) != until.get(b) {
                pending.push(b);
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let mut stuck_since: Option<Instant> = None;
        while !pending.is_empty() {
            let from: Vec<_> = pending
                .iter()
                .map(|&b| match from_oldest[usize::from(b)] {
                    true => (b, LogFrom::Oldest),
                    false => (b, LogFrom::After(self.at.get(b))),
                })
                .collect();
            // The turn covers the read only: writing to a slow client holds up nobody.
            let turn = self.turn().await?;
            let reads = self.store.read_events(&from, CATCH_UP_BATCH).await;
            drop(turn);
            if reads.done.is_empty() {
                // Redis does not answer for these buckets. Past GIVE_UP they are left
                // (`gap`, their place the feed's): the client follows the rest live.
                let since = *stuck_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= GIVE_UP {
                    if !told_gap {
                        self.gap("part of the log is unreachable").await?;
                    }
                    for &b in &pending {
                        self.at.set(b, until.get(b));
                    }
                    return Ok(());
                }
                if self.last_write + KEEP_ALIVE <= Instant::now() {
                    self.keep_alive()?;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    () = self.tx.closed() => return Err(Stop::Gone),
                    () = self.token.cancelled() => return Err(Stop::Gone),
                }
            }
            stuck_since = None;
            for read in reads.done {
                let b = read.bucket;
                let was_oldest = std::mem::take(&mut from_oldest[usize::from(b)]);
                let step = self
                    .page(read, until.get(b), was_oldest, &mut told_gap)
                    .await?;
                match step {
                    Step::Done => pending.retain(|&p| p != b),
                    Step::More => {}
                    Step::FromOldest => from_oldest[usize::from(b)] = true,
                }
            }
        }
        Ok(())
    }

    /// A turn to read the log (see `Hub::catch_ups`), with keep-alives while waiting.
    async fn turn(&mut self) -> Result<tokio::sync::OwnedSemaphorePermit, Stop> {
        loop {
            let idle = self.last_write + KEEP_ALIVE;
            tokio::select! {
                turn = self.hub.catch_ups.clone().acquire_owned() => {
                    return turn.map_err(|_| Stop::Gone);
                }
                () = tokio::time::sleep_until(idle) => self.keep_alive()?,
                () = self.tx.closed() => return Err(Stop::Gone),
                () = self.token.cancelled() => return Err(Stop::Gone),
            }
        }
    }

    /// Sends one page of a bucket's catch-up, after `gap` if there is a hole before it.
    async fn page(
        &mut self,
        read: LogRead,
        until: StreamId,
        from_oldest: bool,
        told_gap: &mut bool,
    ) -> Result<Step, Stop> {
        let b = read.bucket;
        let mine = self.at.get(b);
        let first = read.entries.first().map(|e| e.prev);
        let hole = match first {
            // From the oldest kept: the place is the one before it (a gap was told).
            _ if from_oldest => {
                self.at.set(b, first.unwrap_or(read.last));
                false
            }
            Some(prev) if prev != mine => {
                // Told below; from here the client is at the entry before the page.
                self.at.set(b, prev);
                true
            }
            Some(_) => false,
            // Nothing after the client's place: it is the stream's end, or no place in it.
            None if read.last == mine => false,
            // Past the stream's end, yet not in the future: Redis lost entries (a failover,
            // lost data). Go on from the end, as the feed does (no replay).
            None if read.last < mine && mine.ms <= self.store.clock().now(b) => {
                self.at.set(b, read.last);
                true
            }
            // A place from the future (a forged id): read the bucket from its oldest entry.
            None if read.last < mine => {
                if !*told_gap {
                    *told_gap = true;
                    self.gap("unknown id").await?;
                }
                self.at.set(b, StreamId::START);
                return Ok(Step::FromOldest);
            }
            None => {
                self.at.set(b, read.last);
                true
            }
        };
        if hole && !*told_gap {
            *told_gap = true;
            self.gap("older than the log").await?;
        }
        let full = read.entries.len() >= CATCH_UP_BATCH;
        for entry in read.entries {
            if entry.id > until {
                return Ok(Step::Done);
            }
            let ev = LiveEvent::of(b, entry);
            self.at.set(b, ev.id);
            if self.filter.passes(&ev.kind) {
                let frame = self.frame(ev.kind.name(), &ev.data);
                self.write(frame).await?;
            }
        }
        Ok(if full && self.at.get(b) < until {
            Step::More
        } else {
            Step::Done
        })
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.store.event_log().retention().as_millis()).unwrap_or(u64::MAX)
    }

    async fn gap(&mut self, reason: &str) -> Result<(), Stop> {
        let frame = self.gap_frame(reason);
        self.write(frame).await
    }

    fn gap_frame(&self, reason: &str) -> Bytes {
        let data = serde_json::json!({ "reason": reason }).to_string();
        self.frame("gap", data.as_bytes())
    }

    fn frame(&self, name: &str, data: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(data.len() + 400);
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\nid: ");
        out.extend_from_slice(self.at.to_string().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// Queues a chunk without waiting: a full queue means the client does not read.
    fn try_write(&mut self, chunk: Bytes) -> Result<(), Stop> {
        match self.tx.try_send(chunk) {
            Ok(()) => {
                self.last_write = Instant::now();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Stop::Slow),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Stop::Gone),
        }
    }

    /// Queues a chunk, waiting for the client up to [`PATIENCE`].
    async fn write(&mut self, chunk: Bytes) -> Result<(), Stop> {
        match tokio::time::timeout(PATIENCE, self.tx.send(chunk)).await {
            Ok(Ok(())) => {
                self.last_write = Instant::now();
                Ok(())
            }
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => Err(Stop::Slow),
        }
    }
}

/// What a page of a bucket's catch-up leaves to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Done,
    More,
    /// The place is not in the stream (an id of a log Redis lost): read it from the oldest.
    FromOldest,
}
