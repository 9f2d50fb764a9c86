//! Heartbeats received and not yet applied to Redis: the hand-off between the MQTT task
//! (which inserts) and the applier (which takes), coalesced per device and bounded. Its
//! *watermark* (the oldest unapplied arrival) is what keeps a heartbeat that reached us
//! before a device's deadline from ever losing to that deadline. No I/O: a `std` mutex
//! that nothing holds across an await.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::beat::{Beat, Stamp, Timing};
use crate::device::{now_ms, DeviceId, GroupName, Millis};

/// Most devices held for Redis at once (coalesced: one entry per device). Beyond it new
/// devices' heartbeats are dropped (and logged); known ones still refresh their entry.
pub const HELD_CAP: usize = 1_000_000;

/// Heartbeats received and not yet applied, shared by the MQTT task (insert) and the
/// applier (`presence::Applier`, take). A `std` mutex: nothing awaits while holding it.
pub struct Held {
    inner: Mutex<HeldInner>,
    notify: Notify,
    cap: usize,
}

/// What is held of one device: its heartbeats coalesced into one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    first: Millis,
    arrival: Millis,
    deadline: Millis,
    lapse: Option<(Millis, Millis)>,
    timing: Timing,
    group: Option<GroupName>,
}

impl Entry {
    /// Two entries of one device as one: the latest heartbeat's deadline wins, the earliest
    /// arrival is kept (for the late rule and the watermark), and a silence between them
    /// longer than the earlier one's deadline is kept as a lapse, and the later one's group
    /// wins if it names one. On equal arrivals `other` counts as the later one.
    fn merge(self, other: Entry) -> Entry {
        let (a, b) = if self.arrival <= other.arrival {
            (self, other)
        } else {
            (other, self)
        };
        let known = a.timing == Timing::Known && b.timing == Timing::Known;
        let gap = (known && b.first > a.deadline).then_some((a.deadline, b.first));
        Entry {
            first: a.first.min(b.first),
            arrival: b.arrival,
            deadline: b.deadline,
            lapse: a.lapse.or(b.lapse).or(gap),
            timing: if a.first <= b.first {
                a.timing
            } else {
                b.timing
            },
            group: b.group.or(a.group),
        }
    }
}

#[derive(Default)]
struct HeldInner {
    map: HashMap<DeviceId, Entry>,
    /// Oldest arrival among `map`.
    oldest: Option<Millis>,
    /// Oldest arrival of the batch the applier is working on.
    oldest_in_flight: Option<Millis>,
    closed: bool,
}

/// Which of two entries is the later one when their arrivals are equal.
#[derive(Clone, Copy)]
enum Tie {
    /// The one being held now (a heartbeat that just arrived).
    Incoming,
    /// The one already held (it arrived while the incoming batch was being applied).
    Held,
}

impl HeldInner {
    fn hold(&mut self, device: DeviceId, entry: Entry, tie: Tie) {
        let merged = match (self.map.get(&device), tie) {
            (Some(held), Tie::Incoming) => held.clone().merge(entry),
            (Some(held), Tie::Held) => entry.merge(held.clone()),
            (None, _) => entry,
        };
        self.oldest = Some(self.oldest.map_or(merged.first, |o| o.min(merged.first)));
        self.map.insert(device, merged);
    }
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
    /// heartbeat that is on its way in; `stamp` is asked after it, so that a stall of the
    /// process before that moment can still make the heartbeat count as on time. At most
    /// one entry per device is held, however long Redis is away.
    ///
    /// A heartbeat the broker queued while it was down reached it when it came back (that
    /// is its arrival, for lateness), but may have reached it any time since: its deadline
    /// counts from now, so that a long backlog never sets one that has passed already.
    pub fn insert(
        &self,
        device: DeviceId,
        group: Option<GroupName>,
        ttl: Duration,
        stamp: impl FnOnce() -> Stamp,
    ) -> bool {
        let mut inner = self.lock();
        let now = now_ms();
        let ttl_ms = ttl.as_millis() as u64;
        // `first` judges lateness; `arrival` orders heartbeats (the latest wins), so a
        // backlog read over many batches still moves the deadline with each.
        let (first, timing) = match stamp() {
            Stamp::Live => (now, Timing::Known),
            Stamp::BrokerReturned(at) => (at.min(now), Timing::Known),
            Stamp::OnTime => (now, Timing::OnTime),
        };
        let (arrival, deadline) = (now, now + ttl_ms);
        if inner.map.len() >= self.cap && !inner.map.contains_key(&device) {
            return false;
        }
        let entry = Entry {
            first,
            arrival,
            deadline,
            lapse: None,
            timing,
            group,
        };
        inner.hold(device, entry, Tie::Incoming);
        drop(inner);
        self.notify.notify_one();
        true
    }

    /// Takes every held heartbeat; they count towards the watermark until [`Held::applied`]
    /// (or [`Held::restore`]).
    pub(crate) fn take(&self) -> Vec<Beat> {
        let mut inner = self.lock();
        let map = std::mem::take(&mut inner.map);
        if let Some(oldest) = inner.oldest.take() {
            inner.oldest_in_flight = Some(inner.oldest_in_flight.map_or(oldest, |o| o.min(oldest)));
        }
        map.into_iter()
            .map(|(device, e)| Beat {
                device,
                first: e.first,
                arrival: e.arrival,
                deadline: e.deadline,
                lapse: e.lapse,
                timing: e.timing,
                group: e.group,
            })
            .collect()
    }

    /// The batch taken last is in Redis.
    pub(crate) fn applied(&self) {
        self.lock().oldest_in_flight = None;
    }

    /// The batch taken last could not be applied (in part): hold it again, merged with
    /// what arrived meanwhile, so a device never has more than one entry.
    pub(crate) fn restore(&self, beats: Vec<Beat>) {
        let mut inner = self.lock();
        for beat in beats {
            let entry = Entry {
                first: beat.first,
                arrival: beat.arrival,
                deadline: beat.deadline,
                lapse: beat.lapse,
                timing: beat.timing,
                group: beat.group,
            };
            inner.hold(beat.device, entry, Tie::Held);
        }
        inner.oldest_in_flight = None;
    }

    /// How many devices are held.
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
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

    /// Waits until a heartbeat is inserted (or the MQTT task closed this).
    pub(crate) async fn arrived(&self) {
        self.notify.notified().await;
    }

    /// The MQTT task stopped: no more heartbeats will come.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// No more heartbeats will come (the MQTT task stopped).
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// Closed, and everything it held is in Redis (none taken and still being applied).
    pub(crate) fn is_drained(&self) -> bool {
        self.lock().closed && self.watermark().is_none()
    }

    pub(crate) fn is_closed_and_empty(&self) -> bool {
        let inner = self.lock();
        inner.closed && inner.map.is_empty()
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
        assert!(held.insert(id("a"), None, Duration::from_secs(10), || Stamp::Live));
        let w = held.watermark().unwrap();
        assert!(held.insert(id("a"), None, Duration::from_secs(1), || Stamp::Live));
        assert!(held.insert(id("b"), None, Duration::from_secs(1), || Stamp::Live));
        // Capacity counts devices, not heartbeats.
        assert!(!held.insert(id("c"), None, Duration::from_secs(1), || Stamp::Live));
        assert!(held.insert(id("a"), None, Duration::from_secs(1), || Stamp::Live));
        assert_eq!(held.watermark(), Some(w));
        assert_eq!(held.cutoff(w + 100), w - 1);

        let batch = held.take();
        assert_eq!(batch.len(), 2);
        let a = batch.iter().find(|b| b.device == id("a")).unwrap();
        // The latest heartbeat's deadline wins, even when it is the sooner one.
        assert_eq!(a.deadline, a.arrival + 1_000, "{a:?}");
        assert_eq!(a.first, w);
        // Taken but not applied: still holds the watermark back.
        assert_eq!(held.watermark(), Some(w));
        held.applied();
        assert_eq!(held.watermark(), None);
    }

    fn entry(first: Millis, arrival: Millis, ttl: Millis, timing: Timing) -> Entry {
        Entry {
            first,
            arrival,
            deadline: arrival + ttl,
            lapse: None,
            timing,
            group: None,
        }
    }

    #[test]
    fn merging_keeps_the_latest_deadline_and_any_silence() {
        let a = entry(100, 100, 30, Timing::Known);
        let b = entry(120, 120, 5, Timing::Known);
        // In either order: the later arrival's (shorter) deadline wins, the first stays.
        for m in [a.clone().merge(b.clone()), b.clone().merge(a.clone())] {
            assert_eq!(
                (m.first, m.arrival, m.deadline, m.lapse),
                (100, 120, 125, None)
            );
        }
        // A heartbeat after the earlier one's deadline: the silence between them is kept.
        let late = entry(200, 200, 30, Timing::Known);
        let m = a.clone().merge(late);
        assert_eq!(m.lapse, Some((130, 200)));
        assert_eq!((m.first, m.deadline), (100, 230));
        // Queued heartbeats (on time whatever their arrival) never make a silence.
        let queued = entry(200, 200, 30, Timing::OnTime);
        assert_eq!(
            entry(100, 100, 30, Timing::OnTime).merge(queued).lapse,
            None
        );
    }

    #[test]
    fn the_latest_heartbeat_that_names_a_group_wins() {
        let named = |at, g: &str| Entry {
            group: Some(GroupName::parse(g).unwrap()),
            ..entry(at, at, 30, Timing::Known)
        };
        let plain = entry(300, 300, 30, Timing::Known);
        let (first, second) = (named(100, "a"), named(200, "b"));
        for m in [
            first.clone().merge(second.clone()),
            second.clone().merge(first),
        ] {
            assert_eq!(m.group.as_ref().map(GroupName::as_str), Some("b"));
        }
        // A later heartbeat that names none leaves the group as named before.
        let m = second.merge(plain);
        assert_eq!(m.group.as_ref().map(GroupName::as_str), Some("b"));
    }

    #[test]
    fn a_failed_batch_is_held_again_as_one_entry_per_device() {
        let held = Held::new(10);
        for _ in 0..3 {
            assert!(held.insert(id("a"), None, Duration::from_secs(5), || Stamp::Live));
        }
        let batch = held.take();
        assert!(held.insert(id("a"), None, Duration::from_secs(7), || Stamp::Live));
        held.restore(batch);
        assert_eq!(held.len(), 1);
        let again = held.take();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].deadline, again[0].arrival + 7_000);
    }

    #[test]
    fn heartbeats_queued_while_the_broker_was_down_arrive_when_it_came_back() {
        let held = Held::new(10);
        let back = now_ms() - 5_000;
        assert!(held.insert(id("a"), None, Duration::from_secs(1), || {
            Stamp::BrokerReturned(back)
        }));
        let beat = &held.take()[0];
        assert_eq!((beat.first, beat.timing), (back, Timing::Known));
        assert!(
            beat.deadline >= now_ms() + 500,
            "its deadline counts from its reading, not from the broker's return: {beat:?}"
        );
        assert!(held.insert(id("b"), None, Duration::from_secs(1), || Stamp::OnTime));
        assert_eq!(held.take()[0].timing, Timing::OnTime);
    }
}
