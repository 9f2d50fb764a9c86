//! Redis is not the only copy: the broker keeps every device's latest status, retained.
//!
//! Each bucket has an epoch key (`P:{b}:epoch`) that exists exactly when the bucket's state
//! is in Redis. A Redis that lost its data (a restart without persistence, FLUSHALL, a
//! failover to an empty replica) lost the epoch keys with it; a monitor that first meets an
//! empty Redis finds none. `heartbeat.lua` refuses to write into a bucket without one (the
//! applier holds those heartbeats, so no seq starts over), and the `Rebuilder` notices the
//! loss (that refusal, or its own check every second and at start), reads the retained
//! statuses with a client of its own and imports them (`import.lua`): each device gets back
//! its state, seq and times, online devices one TTL from the rebuild to heartbeat again.
//! The epoch key is set by the import's last chunk of each bucket.
//!
//! The groups come back with the devices: each group's retained status (`mqtt.group_topic`)
//! is imported first (import_groups.lua: its seq goes on, an open outage is open again),
//! then the devices, then the imported offline devices of a group are noted in it
//! (note.lua), which makes up an open outage's figures. note.lua refuses to decide in a
//! bucket without its epoch key, so no group's seq starts over before that.
//!
//! Several replicas may rebuild at once: the import writes a device only over a lower seq
//! (or none), a group only over a lower seq, a bucket whose epoch is back is left alone, and
//! notes are idempotent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::{Findings, Lack};
use crate::bucket::{bucket_of, Bucket, BUCKETS};
use crate::config::{MqttConfig, TtlRules};
use crate::device::{DeviceId, DeviceRecord, GroupName, State, StatusEvent, TopicTemplate};
use crate::group_status::{GroupStatus, GroupTopic};
use crate::metrics::Metrics;
use crate::mqtt::{self, Client, ConnectOptions, Event, EventLoop, Qos, Retain};
use crate::store::{ImportChunk, Imported, Note, NoteMode, Noted, OutageRule, Store, StoreError};
use crate::telemetry::{Backoff, LogLimiter};

/// How often every bucket's epoch key is checked (one pipelined EXISTS per bucket).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for that check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// After our own marker came back, how long no further status may arrive before the
/// retained statuses count as read.
const QUIET: Duration = Duration::from_millis(200);
/// A collection that receives nothing for this long is given up (and tried again).
const STALLED: Duration = Duration::from_secs(10);
/// Devices per import script call.
const CHUNK: usize = 1_000;
/// How often one import may start over because the bucket was lost again meanwhile.
const MAX_AGAIN: usize = 3;
/// Offline devices noted in their groups per round trip, and the tries of one round trip.
const NOTES: usize = 5_000;
const NOTE_TRIES: usize = 5;

/// Watches for a Redis that lost its data and rebuilds the state from the broker.
pub(crate) struct Rebuilder {
    pub(crate) store: Store,
    pub(crate) mqtt: MqttConfig,
    /// What an online device gets from the rebuild to heartbeat again.
    pub(crate) ttl: Duration,
    /// The classes' TTLs (an online device gets its own).
    pub(crate) ttl_rules: TtlRules,
    /// The outage rule (an imported open outage's window).
    pub(crate) rule: OutageRule,
    pub(crate) metrics: Metrics,
    /// Asks the expirer to sweep every bucket (it learns the new deadlines).
    pub(crate) reconcile: Arc<Notify>,
    /// What the broker cannot do (see `mqtt::probe`).
    pub(crate) broker: watch::Receiver<Findings>,
}

/// How long a rebuild waits for the broker probe's first findings.
const PROBE_PATIENCE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
enum RebuildError {
    #[error("reading the retained statuses: {0}")]
    Mqtt(#[from] mqtt::Error),
    #[error("reading the retained statuses: the broker refused the subscription to {0:?}")]
    Refused(Vec<String>),
    #[error("reading the retained statuses: no progress")]
    Stalled,
    #[error(transparent)]
    Redis(#[from] StoreError),
    #[error("bucket {0} kept losing its data during the import")]
    Unstable(Bucket),
    #[error("shutting down")]
    Cancelled,
}

impl Rebuilder {
    pub(crate) async fn run(self, token: CancellationToken) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let limiter = LogLimiter::new(Duration::from_secs(10));
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = tick.tick() => {}
                () = self.store.loss().reported() => {}
            }
            let lost = match tokio::time::timeout(CHECK_TIMEOUT, self.store.lost_buckets()).await {
                Ok(Ok(lost)) => lost,
                // Redis away: nothing can be told (nor written) until it is back.
                _ => continue,
            };
            if lost.is_empty() {
                continue;
            }
            match self.rebuild(&lost, &token).await {
                Ok(()) => backoff.reset(),
                Err(RebuildError::Cancelled) => break,
                Err(e) => {
                    if let Some(n) = limiter.check() {
                        warn!(error = %e, suppressed = n, "Cannot rebuild the state from the retained statuses; retrying.");
                    }
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        debug!("Rebuilder stopped.");
    }

    /// Imports the retained statuses of the devices of the `lost` buckets, and sets their
    /// epoch keys.
    async fn rebuild(
        &self,
        lost: &[Bucket],
        token: &CancellationToken,
    ) -> Result<(), RebuildError> {
        let started = Instant::now();
        info!(
            buckets = lost.len(),
            "Redis has no state for some buckets (lost, or a first start); rebuilding from the retained statuses."
        );
        let snapshot = if self.blind().await {
            self.metrics.blind_rebuild();
            warn!("The broker delivers retained messages only to exact-topic subscriptions, so the retained statuses cannot be read: the lost buckets start empty (devices start over at seq 1; a device that was online and stays silent keeps its retained online status).");
            Snapshot::default()
        } else {
            collect(&self.mqtt, token).await?
        };
        let groups: Vec<GroupStatus> = snapshot.groups.values().cloned().collect();
        let groups_written = self.store.import_groups(&groups, lost, &self.rule).await?;
        let written = self.import(&snapshot.by_bucket(lost), lost, token).await?;
        match self.note_offline(&snapshot, lost, token).await {
            Err(RebuildError::Cancelled) => return Err(RebuildError::Cancelled),
            // The devices are back: holding their heartbeats longer helps nobody.
            Err(e) => {
                warn!(error = %e, "Cannot note the offline devices in their groups: an open outage's figures may be short.")
            }
            Ok(()) => {}
        }
        self.metrics.state_rebuilt();
        self.store.loss().rebuilt();
        self.reconcile.notify_one();
        info!(
            imported = written,
            statuses = snapshot.statuses.len(),
            groups = groups_written,
            invalid = snapshot.invalid,
            cleared = snapshot.cleared,
            buckets = lost.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "Rebuilt the state from the retained statuses."
        );
        Ok(())
    }

    /// Whether the broker was found not to deliver retained messages to wildcard
    /// subscriptions (waiting a while for the first probe of the session's connection).
    async fn blind(&self) -> bool {
        let mut broker = self.broker.clone();
        let found =
            tokio::time::timeout(PROBE_PATIENCE, broker.wait_for(|f| *f != Findings::Pending))
                .await;
        matches!(found, Ok(Ok(f)) if f.lacks(Lack::WildcardRetained))
    }

    /// Imports the records of the lost buckets in chunks (one pipelined round of script
    /// calls per chunk index), each bucket until its last chunk is in or its epoch is back.
    /// Returns how many devices were written.
    async fn import(
        &self,
        by_bucket: &[Vec<DeviceRecord>],
        lost: &[Bucket],
        token: &CancellationToken,
    ) -> Result<u64, RebuildError> {
        let import = format!("{:016x}", fastrand::u64(..));
        let mut progress = Progress::new(lost);
        let mut written = 0u64;
        while !progress.next.is_empty() {
            if token.is_cancelled() {
                return Err(RebuildError::Cancelled);
            }
            let chunks = progress.chunks(by_bucket);
            let last: HashMap<Bucket, bool> = chunks.iter().map(|c| (c.bucket, c.last)).collect();
            let done = self
                .store
                .import(&chunks, &import, self.ttl, &self.ttl_rules)
                .await;
            for outcome in done.done {
                written += progress.advance(outcome, &last)?;
            }
            if let Some(e) = done.error {
                return Err(e.into());
            }
        }
        Ok(written)
    }
}

impl Rebuilder {
    /// Notes the offline devices of the groups whose state was lost (and those imported) in
    /// their groups, quietly: they make up an open outage's figures and open nothing. Tried
    /// a few times before the rebuild counts as done (an outage's figures without them would
    /// be short).
    async fn note_offline(
        &self,
        snapshot: &Snapshot,
        lost: &[Bucket],
        token: &CancellationToken,
    ) -> Result<(), RebuildError> {
        let notes: Vec<Note> = snapshot
            .statuses
            .values()
            .filter(|ev| ev.state == State::Offline)
            .filter_map(|ev| {
                let group = ev.group.clone()?;
                let touched = lost.contains(&bucket_of(group.as_str()))
                    || lost.contains(&bucket_of(ev.device.as_str()));
                touched.then(|| Note {
                    group,
                    device: ev.device.clone(),
                    seq: ev.seq,
                    noted: Noted::Went(State::Offline),
                    since: ev.since,
                })
            })
            .collect();
        for chunk in notes.chunks(NOTES) {
            let mut tries = 0;
            while let Err(e) = self.note_chunk(chunk).await {
                tries += 1;
                if tries >= NOTE_TRIES {
                    return Err(e);
                }
                tokio::select! {
                    () = token.cancelled() => return Err(RebuildError::Cancelled),
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
        Ok(())
    }

    async fn note_chunk(&self, chunk: &[Note]) -> Result<(), RebuildError> {
        let groups: Vec<GroupName> = chunk
            .iter()
            .map(|n| n.group.clone())
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .collect();
        let totals = self.store.group_totals(&groups).await?;
        self.store
            .note(chunk, &totals, &self.rule, NoteMode::Quiet)
            .await
            .into_result()?;
        Ok(())
    }
}

/// How far the import of each lost bucket is.
struct Progress {
    /// Per bucket still to import: the next chunk, and how often it started over.
    next: HashMap<Bucket, (usize, usize)>,
}

impl Progress {
    fn new(lost: &[Bucket]) -> Progress {
        Progress {
            next: lost.iter().map(|&b| (b, (0, 0))).collect(),
        }
    }

    /// The next chunk of every bucket still to import.
    fn chunks<'a>(&self, by_bucket: &'a [Vec<DeviceRecord>]) -> Vec<ImportChunk<'a>> {
        self.next
            .iter()
            .map(|(&b, &(i, _))| {
                let all = &by_bucket[usize::from(b)];
                let n = all.len().div_ceil(CHUNK).max(1);
                let start = (i * CHUNK).min(all.len());
                let end = (start + CHUNK).min(all.len());
                ImportChunk {
                    bucket: b,
                    first: i == 0,
                    last: i + 1 >= n,
                    records: &all[start..end],
                }
            })
            .collect()
    }

    /// Moves a bucket on after its chunk's outcome (`last`: whether it was the bucket's last
    /// chunk). Returns how many devices it wrote.
    fn advance(
        &mut self,
        outcome: Imported,
        last: &HashMap<Bucket, bool>,
    ) -> Result<u64, RebuildError> {
        match outcome {
            Imported::Written(b, n) => {
                if last.get(&b).copied().unwrap_or(true) {
                    self.next.remove(&b);
                } else if let Some(e) = self.next.get_mut(&b) {
                    e.0 += 1;
                }
                Ok(n)
            }
            Imported::Present(b) => {
                self.next.remove(&b);
                Ok(0)
            }
            Imported::Again(b) => {
                if let Some(e) = self.next.get_mut(&b) {
                    if e.1 >= MAX_AGAIN {
                        return Err(RebuildError::Unstable(b));
                    }
                    *e = (0, e.1 + 1);
                }
                Ok(0)
            }
        }
    }
}

/// The retained statuses read from the broker: the highest seq per device.
#[derive(Debug, Default)]
struct Snapshot {
    statuses: HashMap<DeviceId, StatusEvent>,
    /// The groups' retained outage statuses: the highest seq per group.
    groups: HashMap<GroupName, GroupStatus>,
    /// Messages on the status topic that are not a status (skipped).
    invalid: u64,
    /// Empty retained messages (a cleared status; skipped).
    cleared: u64,
}

impl Snapshot {
    /// The records of the devices of the `lost` buckets, by bucket.
    fn by_bucket(&self, lost: &[Bucket]) -> Vec<Vec<DeviceRecord>> {
        let mut by_bucket: Vec<Vec<DeviceRecord>> = (0..BUCKETS).map(|_| Vec::new()).collect();
        for ev in self.statuses.values() {
            let b = bucket_of(ev.device.as_str());
            if lost.contains(&b) {
                by_bucket[usize::from(b)].push(DeviceRecord {
                    device: ev.device.clone(),
                    state: ev.state,
                    seq: ev.seq,
                    since: ev.since,
                    last_seen: ev.last_seen,
                    detected_at: ev.detected_at,
                    group: ev.group.clone(),
                    reason: ev.reason,
                    // Imported as flapping since its last transition (import.lua): only
                    // whether it is flapping matters here.
                    flapping_until: ev.flapping.then_some(ev.detected_at),
                });
            }
        }
        by_bucket
    }

    /// Keeps a group status, if `topic` is a group's topic and `payload` its status.
    fn add_group(&mut self, template: &GroupTopic, topic: &[u8], payload: &[u8]) -> bool {
        let group = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| template.extract(t))
            .and_then(|raw| GroupName::parse(raw).ok());
        let Some(status) = GroupStatus::from_json(payload) else {
            return false;
        };
        if group.as_ref() != Some(&status.group) {
            return false;
        }
        match self.groups.get(&status.group) {
            Some(held) if held.seq >= status.seq => {}
            _ => {
                self.groups.insert(status.group.clone(), status);
            }
        }
        true
    }

    fn add(&mut self, template: &TopicTemplate, topic: &[u8], payload: &[u8]) {
        if payload.is_empty() {
            self.cleared += 1;
            return;
        }
        let device = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| template.extract(t))
            .and_then(|raw| DeviceId::parse(raw).ok());
        let status = StatusEvent::from_json(payload);
        let Some(ev) = status.filter(|ev| device.as_ref() == Some(&ev.device)) else {
            self.invalid += 1;
            return;
        };
        match self.statuses.get(&ev.device) {
            Some(held) if held.seq >= ev.seq => {}
            _ => {
                self.statuses.insert(ev.device.clone(), ev);
            }
        }
    }
}

/// Reads every retained status with a short-lived client of our own (clean session).
///
/// The broker sends a subscription's retained messages right after its SUBACK, before
/// anything it receives from us later; so once a marker we publish after the SUBACK (to a
/// topic of our own, same QoS) comes back, they have all arrived. Statuses published
/// meanwhile are taken too (the highest seq per device is kept).
async fn collect(cfg: &MqttConfig, token: &CancellationToken) -> Result<Snapshot, RebuildError> {
    let client_id = format!("{}-rebuild-{:08x}", cfg.client_id, fastrand::u32(..));
    let marker_topic = format!("presenced/rebuild/{client_id}");
    let (client, mut eventloop) = mqtt::client(ConnectOptions {
        cfg,
        client_id,
        session: mqtt::SessionMode::Clean,
        will: None,
        inflight: 100,
        keep_alive: Duration::from_secs(15),
    });
    let mut reading = Reading {
        cfg,
        filters: [
            cfg.status_topic.filter(),
            cfg.group_topic.filter(),
            marker_topic.clone(),
        ],
        marker_topic,
        marker: Bytes::from(format!("{:016x}", fastrand::u64(..))),
        client,
        snapshot: Snapshot::default(),
        marker_state: Marker::Awaited,
        last_message: Instant::now(),
    };
    let result = loop {
        let quiet = reading.last_message + QUIET;
        tokio::select! {
            () = token.cancelled() => break Err(RebuildError::Cancelled),
            () = tokio::time::sleep_until(quiet), if reading.marker_state == Marker::Back => break Ok(()),
            () = tokio::time::sleep_until(reading.last_message + STALLED) => {
                break Err(RebuildError::Stalled);
            }
            ev = eventloop.poll() => match ev {
                Ok(ev) => {
                    if let Err(e) = reading.event(ev) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e.into()),
            },
        }
    };
    leave(&reading.client, &mut eventloop).await;
    result.map(|()| reading.snapshot)
}

/// Whether our marker came back (after it, every retained status is in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Marker {
    Awaited,
    Back,
}

/// Reading the retained statuses: the subscription, our marker, what came.
struct Reading<'a> {
    cfg: &'a MqttConfig,
    filters: [String; 3],
    marker_topic: String,
    marker: Bytes,
    client: Client,
    snapshot: Snapshot,
    marker_state: Marker,
    last_message: Instant,
}

impl Reading<'_> {
    /// Subscribes once connected, publishes the marker once subscribed, keeps statuses.
    fn event(&mut self, ev: Event) -> Result<(), RebuildError> {
        match ev {
            Event::ConnAck { .. } => {
                self.last_message = Instant::now();
                self.client.try_subscribe_many(&self.filters)?;
            }
            Event::SubAck { granted } => {
                self.last_message = Instant::now();
                // The device statuses and our marker are needed; the group statuses only
                // keep the groups' seq going (a broker may refuse them to us).
                let [statuses, groups, marker] = granted[..] else {
                    return Err(RebuildError::Refused(self.filters.to_vec()));
                };
                if !(statuses && marker) {
                    return Err(RebuildError::Refused(self.filters.to_vec()));
                }
                if !groups {
                    warn!(filter = %self.filters[1], "The broker refused the group statuses: groups that had outages start their seq over.");
                }
                self.client.try_publish(
                    &self.marker_topic,
                    Qos::AtLeastOnce,
                    Retain::No,
                    self.marker.clone(),
                )?;
            }
            Event::Publish { topic, payload, .. } => {
                self.last_message = Instant::now();
                if topic.as_ref() == self.marker_topic.as_bytes() {
                    if payload == self.marker {
                        self.marker_state = Marker::Back;
                    }
                } else if !self
                    .snapshot
                    .add_group(&self.cfg.group_topic, &topic, &payload)
                {
                    self.snapshot.add(&self.cfg.status_topic, &topic, &payload);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Leaves cleanly (bounded): a clean session leaves nothing behind on the broker.
async fn leave(client: &Client, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Disconnected) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::State;

    #[test]
    fn snapshot_keeps_the_highest_seq_and_skips_what_is_not_a_status() {
        let t = TopicTemplate::parse("devices/{device}/status").unwrap();
        let ev = |seq: u64, state: State| StatusEvent {
            device: DeviceId::parse("d1").unwrap(),
            state,
            seq,
            since: 1_000 * seq,
            last_seen: 900,
            detected_at: 1_000 * seq + 5,
            group: None,
            left: None,
            reason: crate::device::Reason::of(state, false),
            flapping: false,
        };
        let mut s = Snapshot::default();
        s.add(&t, b"devices/d1/status", &ev(3, State::Online).to_json());
        s.add(&t, b"devices/d1/status", &ev(2, State::Offline).to_json());
        s.add(&t, b"devices/d1/status", b"");
        s.add(&t, b"devices/d1/status", b"not json");
        // A status whose device is not its topic's.
        s.add(&t, b"devices/d2/status", &ev(9, State::Online).to_json());
        s.add(&t, b"elsewhere/d1", &ev(9, State::Online).to_json());
        assert_eq!((s.invalid, s.cleared), (3, 1));
        assert_eq!(s.statuses.len(), 1);
        let kept = s.statuses.values().next().unwrap();
        assert_eq!((kept.seq, kept.state), (3, State::Online));
    }
}
