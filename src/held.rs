//! Heartbeats received and not yet applied to Redis: the hand-off between the MQTT task
//! (which inserts) and the applier (which takes), coalesced per device and bounded. Its
//! *watermark* (the oldest unapplied arrival) is what keeps a heartbeat that reached us
//! before a device's deadline from ever losing to that deadline. No I/O: a `std` mutex
//! that nothing holds across an await.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::beat::{Beat, Named, Stamp, Timing};
use crate::device::{now_ms, DeviceId, GroupName, Millis};
use crate::will::Will;

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
    session: Option<u64>,
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
            session: b.session.or(a.session),
        }
    }
}

impl Entry {
    fn of(beat: Beat) -> (DeviceId, Entry) {
        let entry = Entry {
            first: beat.first,
            arrival: beat.arrival,
            deadline: beat.deadline,
            lapse: beat.lapse,
            timing: beat.timing,
            group: beat.group,
            session: beat.session,
        };
        (beat.device, entry)
    }

    fn beat(self, device: DeviceId) -> Beat {
        Beat {
            device,
            first: self.first,
            arrival: self.arrival,
            deadline: self.deadline,
            lapse: self.lapse,
            timing: self.timing,
            group: self.group,
            session: self.session,
        }
    }
}

/// Beats by device, those of one device merged (a retry may hold a device twice: the failed
/// heartbeat and the recent one applied again).
fn coalesce(beats: Vec<Beat>) -> HashMap<DeviceId, Entry> {
    let mut out: HashMap<DeviceId, Entry> = HashMap::with_capacity(beats.len());
    for beat in beats {
        let (device, entry) = Entry::of(beat);
        let mut slot = out.remove(&device);
        merge_into(&mut slot, entry, Tie::Incoming);
        if let Some(merged) = slot {
            out.insert(device, merged);
        }
    }
    out
}

/// `entry` merged into `slot` (see [`Tie`] for which wins on equal arrivals).
fn merge_into(slot: &mut Option<Entry>, entry: Entry, tie: Tie) {
    *slot = Some(match (slot.take(), tie) {
        (Some(held), Tie::Incoming) => held.merge(entry),
        (Some(held), Tie::Held) => entry.merge(held),
        (None, _) => entry,
    });
}

/// A will held for a device, and the device's heartbeats held from before it: those are
/// applied first, so that per device the order of arrival is kept.
#[derive(Clone, Debug)]
struct HeldWill {
    arrival: Millis,
    session: Option<u64>,
    before: Option<Entry>,
}

/// What the applier takes in one go, to apply in this order: the heartbeats held from before
/// a will, the wills, the other heartbeats (which arrived after any will of their device).
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) before: Vec<Beat>,
    pub(crate) wills: Vec<Will>,
    pub(crate) beats: Vec<Beat>,
}

impl Taken {
    pub(crate) fn is_empty(&self) -> bool {
        self.before.is_empty() && self.wills.is_empty() && self.beats.is_empty()
    }
}

/// How a will was held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WillHeld {
    /// To apply (after the device's heartbeats held so far).
    Held,
    /// An earlier will of the device is held, with no heartbeat since: this one changes
    /// nothing (the device is going offline already).
    Redundant,
    /// Dropped: as many devices are held as the cap allows.
    Full,
}

#[derive(Default)]
struct HeldInner {
    map: HashMap<DeviceId, Entry>,
    /// Wills not yet applied, one per device (see [`Held::insert_will`]).
    wills: HashMap<DeviceId, HeldWill>,
    /// Oldest arrival among `map`.
    oldest: Option<Millis>,
    /// Oldest arrival of the batch the applier is working on.
    oldest_in_flight: Option<Millis>,
    /// Within a millisecond the order of arrival must still decide once only times are
    /// compared (Redis sees times, not order): per device, a will is at least 1 ms after the
    /// heartbeat before it, a heartbeat no earlier than the will before it. Held entries
    /// carry their arrivals; these keep those of the last batch taken that are not in the
    /// past yet (arrived in the millisecond of the take, or later): a few devices at most.
    taken_beats: HashMap<DeviceId, Millis>,
    taken_wills: HashMap<DeviceId, Millis>,
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
        self.note_oldest(entry.first);
        let mut slot = self.map.remove(&device);
        merge_into(&mut slot, entry, tie);
        if let Some(merged) = slot {
            self.map.insert(device, merged);
        }
    }

    /// Heartbeats that precede the device's held will (restored after a failed round).
    fn hold_before(&mut self, device: DeviceId, entry: Entry) {
        self.note_oldest(entry.first);
        match self.wills.get_mut(&device) {
            Some(will) => merge_into(&mut will.before, entry, Tie::Held),
            None => self.hold(device, entry, Tie::Held),
        }
    }

    /// Whether `device` may be held: it is already, or fewer than `cap` devices are (a
    /// device with both heartbeats and a will counts twice: the bound is conservative).
    fn has_room_for(&self, device: &DeviceId, cap: usize) -> bool {
        self.map.len() + self.wills.len() < cap
            || self.map.contains_key(device)
            || self.wills.contains_key(device)
    }

    fn note_oldest(&mut self, first: Millis) {
        self.oldest = Some(self.oldest.map_or(first, |o| o.min(first)));
    }

    /// A will: the device's held heartbeats go before it (and it after them). A second will
    /// with no heartbeat between changes nothing, unless it names a later session (the one
    /// held was stale): then it replaces it. A will while an earlier one is held with
    /// heartbeats after it collapses the three (bounded: one will per device): those
    /// heartbeats join the ones before, and the later will stands. Either way one of the two
    /// wills is `Redundant` (counted now), the other counted once applied.
    fn hold_will(&mut self, device: DeviceId, arrival: Millis, session: Option<u64>) -> WillHeld {
        let after = self.map.remove(&device);
        let arrival = after
            .as_ref()
            .map_or(arrival, |a| arrival.max(a.arrival + 1));
        match self.wills.get_mut(&device) {
            Some(will) if after.is_none() => {
                if session > will.session {
                    (will.arrival, will.session) = (arrival.max(will.arrival), session);
                }
                WillHeld::Redundant
            }
            Some(will) => {
                if let Some(after) = after {
                    merge_into(&mut will.before, after, Tie::Incoming);
                }
                will.arrival = arrival;
                will.session = session;
                WillHeld::Redundant
            }
            None => {
                let will = HeldWill {
                    arrival,
                    session,
                    before: after,
                };
                self.wills.insert(device, will);
                WillHeld::Held
            }
        }
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
        named: Named,
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
        if !inner.has_room_for(&device, self.cap) {
            return false;
        }
        let will = inner.wills.get(&device).map(|w| w.arrival);
        let taken = inner.taken_wills.get(&device).copied();
        let arrival = [will, taken].into_iter().flatten().fold(now, Millis::max);
        let deadline = arrival + ttl_ms;
        let entry = Entry {
            first,
            arrival,
            deadline,
            lapse: None,
            timing,
            group: named.group,
            session: named.session,
        };
        inner.hold(device, entry, Tie::Incoming);
        drop(inner);
        self.notify.notify_one();
        true
    }

    /// Holds a will that arrives now (after every heartbeat held so far).
    pub fn insert_will(&self, device: DeviceId, session: Option<u64>) -> WillHeld {
        let mut inner = self.lock();
        if !inner.has_room_for(&device, self.cap) {
            return WillHeld::Full;
        }
        let taken = inner.taken_beats.get(&device).map_or(0, |a| a + 1);
        let arrival = now_ms().max(taken);
        let held = inner.hold_will(device, arrival, session);
        drop(inner);
        self.notify.notify_one();
        held
    }

    /// Takes everything held; the heartbeats count towards the watermark until
    /// [`Held::applied`] (or [`Held::restore`]).
    pub(crate) fn take(&self) -> Taken {
        let mut inner = self.lock();
        let map = std::mem::take(&mut inner.map);
        let wills = std::mem::take(&mut inner.wills);
        // Those of earlier takes that are still current stay.
        let now = now_ms();
        inner.taken_beats.retain(|_, at| *at >= now);
        inner.taken_wills.retain(|_, at| *at >= now);
        let beats = map
            .iter()
            .chain(
                wills
                    .iter()
                    .filter_map(|(d, w)| Some((d, w.before.as_ref()?))),
            )
            .filter(|(_, e)| e.arrival >= now)
            .map(|(d, e)| (d.clone(), e.arrival));
        let current_wills = wills
            .iter()
            .filter(|(_, w)| w.arrival >= now)
            .map(|(d, w)| (d.clone(), w.arrival));
        let (beats, current_wills): (Vec<_>, Vec<_>) = (beats.collect(), current_wills.collect());
        inner.taken_beats.extend(beats);
        inner.taken_wills.extend(current_wills);
        if let Some(oldest) = inner.oldest.take() {
            inner.oldest_in_flight = Some(inner.oldest_in_flight.map_or(oldest, |o| o.min(oldest)));
        }
        let mut taken = Taken {
            beats: map.into_iter().map(|(d, e)| e.beat(d)).collect(),
            ..Taken::default()
        };
        for (device, w) in wills {
            if let Some(before) = w.before {
                taken.before.push(before.beat(device.clone()));
            }
            taken.wills.push(Will {
                device,
                arrival: w.arrival,
                session: w.session,
            });
        }
        taken
    }

    /// The batch taken last is in Redis.
    pub(crate) fn applied(&self) {
        self.lock().oldest_in_flight = None;
    }

    /// What was taken last and not applied: held again, before what arrived meanwhile,
    /// so that a device never has more than one entry and one will, in order of arrival.
    /// A restored will of a device that has a will held since collapses into it (see
    /// `hold_will`).
    pub(crate) fn restore(&self, rest: Taken) {
        let mut inner = self.lock();
        let mut before = coalesce(rest.before);
        let mut after = coalesce(rest.beats);
        for will in rest.wills {
            let device = will.device;
            let (prior, next) = (before.remove(&device), after.remove(&device));
            for e in prior.iter().chain(next.iter()) {
                inner.note_oldest(e.first);
            }
            match inner.wills.get_mut(&device) {
                Some(newer) => {
                    // prior, will, next, then newer.before, newer: the newer will stands.
                    for e in [prior, next].into_iter().flatten() {
                        merge_into(&mut newer.before, e, Tie::Held);
                    }
                }
                None => {
                    // prior, will, next, then what is held since (after the will).
                    let held = HeldWill {
                        arrival: will.arrival,
                        session: will.session,
                        before: prior,
                    };
                    inner.wills.insert(device.clone(), held);
                    if let Some(next) = next {
                        inner.hold(device, next, Tie::Held);
                    }
                }
            }
        }
        // Heartbeats without a restored will: before anything held since.
        for (device, entry) in before.into_iter().chain(after) {
            inner.hold_before(device, entry);
        }
        inner.oldest_in_flight = None;
    }

    /// How many devices are held (with heartbeats or a will).
    pub(crate) fn len(&self) -> usize {
        let inner = self.lock();
        inner.map.len() + inner.wills.len()
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
        inner.closed && inner.map.is_empty() && inner.wills.is_empty()
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
        assert!(
            held.insert(id("a"), Named::default(), Duration::from_secs(10), || {
                Stamp::Live
            })
        );
        let w = held.watermark().unwrap();
        assert!(
            held.insert(id("a"), Named::default(), Duration::from_secs(1), || {
                Stamp::Live
            })
        );
        assert!(
            held.insert(id("b"), Named::default(), Duration::from_secs(1), || {
                Stamp::Live
            })
        );
        // Capacity counts devices, not heartbeats.
        assert!(
            !held.insert(id("c"), Named::default(), Duration::from_secs(1), || {
                Stamp::Live
            })
        );
        assert!(
            held.insert(id("a"), Named::default(), Duration::from_secs(1), || {
                Stamp::Live
            })
        );
        assert_eq!(held.watermark(), Some(w));
        assert_eq!(held.cutoff(w + 100), w - 1);

        let batch = held.take().beats;
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
            session: None,
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
            assert!(
                held.insert(id("a"), Named::default(), Duration::from_secs(5), || {
                    Stamp::Live
                })
            );
        }
        let batch = held.take();
        assert!(
            held.insert(id("a"), Named::default(), Duration::from_secs(7), || {
                Stamp::Live
            })
        );
        held.restore(batch);
        assert_eq!(held.len(), 1);
        let again = held.take().beats;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].deadline, again[0].arrival + 7_000);
    }

    #[test]
    fn heartbeats_queued_while_the_broker_was_down_arrive_when_it_came_back() {
        let held = Held::new(10);
        let back = now_ms() - 5_000;
        assert!(
            held.insert(id("a"), Named::default(), Duration::from_secs(1), || {
                Stamp::BrokerReturned(back)
            })
        );
        let beat = &held.take().beats[0];
        assert_eq!((beat.first, beat.timing), (back, Timing::Known));
        assert!(
            beat.deadline >= now_ms() + 500,
            "its deadline counts from its reading, not from the broker's return: {beat:?}"
        );
        assert!(
            held.insert(id("b"), Named::default(), Duration::from_secs(1), || {
                Stamp::OnTime
            })
        );
        assert_eq!(held.take().beats[0].timing, Timing::OnTime);
    }

    fn beat(held: &Held, device: &str) {
        assert!(
            held.insert(id(device), Named::default(), Duration::from_secs(5), || {
                Stamp::Live
            })
        );
    }

    fn devices(beats: &[Beat]) -> Vec<&str> {
        let mut v: Vec<&str> = beats.iter().map(|b| b.device.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_will_keeps_the_heartbeats_before_it_apart_from_those_after() {
        let held = Held::new(10);
        beat(&held, "a");
        beat(&held, "b");
        assert_eq!(held.insert_will(id("a"), Some(3)), WillHeld::Held);
        // A second will with no heartbeat between changes nothing, unless it names a later
        // session (the first was stale).
        assert_eq!(held.insert_will(id("a"), Some(2)), WillHeld::Redundant);
        assert_eq!(held.insert_will(id("a"), Some(4)), WillHeld::Redundant);
        assert_eq!(held.insert_will(id("c"), None), WillHeld::Held);
        beat(&held, "a");
        let t = held.take();
        assert_eq!(devices(&t.before), ["a"]);
        assert_eq!(devices(&t.beats), ["a", "b"]);
        let mut wills: Vec<_> = t
            .wills
            .iter()
            .map(|w| (w.device.as_str(), w.session))
            .collect();
        wills.sort_unstable();
        assert_eq!(wills, [("a", Some(4)), ("c", None)]);
        let will = t.wills.iter().find(|w| w.device == id("a")).unwrap();
        let pre = &t.before[0];
        let post = t.beats.iter().find(|b| b.device == id("a")).unwrap();
        // Within one millisecond too: strictly after the heartbeat before it, not after the
        // one that follows it.
        assert!(pre.arrival < will.arrival, "{pre:?} {will:?}");
        assert!(post.arrival >= will.arrival, "{post:?} {will:?}");
        assert!(held.take().is_empty());
    }

    #[test]
    fn a_will_between_heartbeats_and_another_will_collapses_into_the_later_one() {
        let held = Held::new(10);
        beat(&held, "a");
        assert_eq!(held.insert_will(id("a"), Some(1)), WillHeld::Held);
        beat(&held, "a");
        // One of the two wills is dropped (and counted so by the caller).
        assert_eq!(held.insert_will(id("a"), Some(2)), WillHeld::Redundant);
        let t = held.take();
        // Both heartbeats go before the one will that stands.
        assert_eq!(devices(&t.before), ["a"]);
        assert!(t.beats.is_empty());
        assert_eq!(t.wills.len(), 1);
        assert_eq!(t.wills[0].session, Some(2));
        assert!(t.before[0].arrival < t.wills[0].arrival);
    }

    #[test]
    fn the_order_within_a_millisecond_holds_across_takes() {
        let held = Held::new(10);
        beat(&held, "a");
        let h = held.take().beats[0].arrival;
        // Another take in between forgets nothing still current.
        beat(&held, "b");
        held.take();
        assert_eq!(held.insert_will(id("a"), None), WillHeld::Held);
        let w = held.take().wills[0].arrival;
        beat(&held, "a");
        let h2 = held.take().beats[0].arrival;
        assert!(h < w && w <= h2, "{h} {w} {h2}");
    }

    #[test]
    fn wills_are_capped_per_device_like_heartbeats() {
        let held = Held::new(1);
        assert_eq!(held.insert_will(id("a"), None), WillHeld::Held);
        assert_eq!(held.insert_will(id("b"), None), WillHeld::Full);
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_restored_round_keeps_the_order_of_arrival() {
        let held = Held::new(10);
        beat(&held, "a");
        assert_eq!(held.insert_will(id("a"), None), WillHeld::Held);
        beat(&held, "a");
        beat(&held, "b");
        let t = held.take();
        // Meanwhile: b's will arrives, then a heartbeat of a.
        assert_eq!(held.insert_will(id("b"), None), WillHeld::Held);
        beat(&held, "a");
        held.restore(t);
        let again = held.take();
        // a: its heartbeat before the will, the will, then both heartbeats after it.
        // b: its restored heartbeat before its new will.
        assert_eq!(devices(&again.before), ["a", "b"]);
        let mut wills: Vec<_> = again.wills.iter().map(|w| w.device.as_str()).collect();
        wills.sort_unstable();
        assert_eq!(wills, ["a", "b"]);
        assert_eq!(devices(&again.beats), ["a"]);
        let a_after = &again.beats[0];
        let a_will = again.wills.iter().find(|w| w.device == id("a")).unwrap();
        let a_before = again.before.iter().find(|b| b.device == id("a")).unwrap();
        assert!(a_before.arrival < a_will.arrival, "{a_before:?} {a_will:?}");
        assert!(a_after.arrival >= a_will.arrival, "{a_after:?} {a_will:?}");
        assert_eq!(held.watermark(), Some(a_before.first));
    }

    #[test]
    fn a_restored_will_collapses_into_one_held_since() {
        let held = Held::new(10);
        assert_eq!(held.insert_will(id("a"), Some(1)), WillHeld::Held);
        beat(&held, "a");
        let t = held.take();
        assert_eq!(held.insert_will(id("a"), Some(2)), WillHeld::Held);
        beat(&held, "a");
        held.restore(t);
        let again = held.take();
        assert_eq!(again.wills.len(), 1);
        assert_eq!(again.wills[0].session, Some(2));
        // The restored heartbeat precedes the newer will; the latest one follows it.
        assert_eq!(devices(&again.before), ["a"]);
        assert_eq!(devices(&again.beats), ["a"]);
        assert!(again.before[0].arrival <= again.beats[0].first);
    }
}
