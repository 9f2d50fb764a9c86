//! The sync marker, and how heartbeats are stamped meanwhile.
//!
//! After every connection (and when the process was stalled, see `crate::pulse`) the session publishes a marker
//! to a topic only this replica subscribes to. The broker delivers a session's queued
//! messages in order, so once the marker comes back, every heartbeat queued while the
//! monitor was away has arrived: only then does `ingest` say the backlog is in, and expiries
//! may be decided (invariant 3 in ARCHITECTURE.md). Until then heartbeats are stamped
//! [`Stamp::OnTime`], or [`Stamp::BrokerReturned`] after the broker refused our connections
//! (it was down: what it queued reached it when it came back). The wait is bounded by
//! progress: [`SYNC_WAIT`] after the marker was sent or after the last heartbeat read since,
//! so a backlog that takes long to read keeps the gate closed.
//!
//! It also carries the broker check: after a ConnAck without session, whether the broker's
//! retained marker arrives before our sync marker does. It must not publish (it hands the
//! marker to the session) nor read heartbeats.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::outgoing::Outgoing;
use super::topics::sync_topic;
use crate::beat::Stamp;
use crate::device::{now_ms, Millis};
use crate::pulse::Synced;

/// How long to wait for our own sync marker, after it was sent or after the last heartbeat
/// read, before assuming the backlog was delivered.
const SYNC_WAIT: Duration = Duration::from_secs(5);

/// After a ConnAck without session: has the broker's retained marker come back?
#[derive(Clone, Copy, PartialEq, Eq)]
enum BrokerCheck {
    Idle,
    Awaiting,
    Seen,
}

/// The outstanding sync marker, the stamp, and the gate it opens.
pub(super) struct SyncMarker {
    topic: String,
    /// `Some(t)`: connected, and every heartbeat queued for us before `t.at` has been
    /// received.
    ingest: watch::Sender<Option<Synced>>,
    /// The outstanding marker's token and when it was sent.
    outstanding: Option<(Bytes, Instant)>,
    /// The outstanding marker came back (the queued one may still be awaited).
    marker_back: bool,
    /// The token of the marker put into our offline queue before this connection (see
    /// `queued`), while it is awaited.
    queued: Option<Bytes>,
    /// The process's stall count when the latest marker was sent: the marker proves nothing
    /// about a later stall.
    stalls: u64,
    /// The last heartbeat read while a marker is outstanding.
    progress: Instant,
    stamp: Stamp,
    /// The last time the broker refused a connection while we were disconnected.
    refused_at: Option<Millis>,
    broker: BrokerCheck,
}

impl SyncMarker {
    pub(super) fn new(instance: &str, ingest: watch::Sender<Option<Synced>>) -> SyncMarker {
        SyncMarker {
            topic: sync_topic(instance),
            ingest,
            outstanding: None,
            marker_back: false,
            queued: None,
            stalls: 0,
            progress: Instant::now(),
            stamp: Stamp::OnTime,
            refused_at: None,
            broker: BrokerCheck::Idle,
        }
    }

    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// How a heartbeat received now is stamped.
    pub(super) fn stamp(&self) -> Stamp {
        self.stamp
    }

    pub(super) fn outstanding(&self) -> bool {
        self.outstanding.is_some()
    }

    /// When to stop waiting for the outstanding marker (far away when there is none).
    pub(super) fn deadline(&self) -> Instant {
        match &self.outstanding {
            Some((_, sent)) => (*sent).max(self.progress) + SYNC_WAIT,
            None => Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Connected: what the broker queued for us while it refused our connections reached it
    /// after it came back; anything else queued, in time. Without a session, the broker may
    /// have lost its retained messages too: its retained marker says. `stalls` is the
    /// process's stall count now. Returns the marker to publish.
    pub(super) fn connected(&mut self, session_present: bool, stalls: u64) -> Outgoing {
        self.stamp = self
            .refused_at
            .take()
            .map_or(Stamp::OnTime, Stamp::BrokerReturned);
        if !session_present {
            self.broker = BrokerCheck::Awaiting;
            // Queued in a session that is gone: it will not come.
            self.queued = None;
        }
        self.fresh_marker(stalls)
    }

    /// The process stalled (its count is now `stalls`): heartbeats may wait unread behind
    /// the last marker. Until a fresh one is back they count as on time (or as queued while
    /// the broker was down, if that backlog is still being read), and the gate stays closed
    /// (it sees the stall itself). Returns the marker to publish.
    pub(super) fn restart(&mut self, stalls: u64) -> Outgoing {
        self.stalled();
        self.fresh_marker(stalls)
    }

    /// The process stalled and no marker can be sent (disconnecting): what is read from now
    /// on counts as on time all the same.
    pub(super) fn stalled(&mut self) {
        self.stamp = self.stamp.after_stall();
    }

    fn fresh_marker(&mut self, stalls: u64) -> Outgoing {
        let (out, token) = Outgoing::marker(&self.topic);
        self.outstanding = Some((token, Instant::now()));
        self.marker_back = false;
        self.stalls = stalls;
        out
    }

    /// The broker refused our connection: it is down.
    pub(super) fn refused(&mut self) {
        self.refused_at = Some(now_ms());
    }

    /// A marker was put into our offline queue (before connecting): the backlog is in once
    /// it is back too.
    pub(super) fn queued(&mut self, token: Bytes) {
        self.queued = Some(token);
    }

    /// The connection is lost: no marker is outstanding, and the gate is closed.
    pub(super) fn lost(&mut self) {
        self.outstanding = None;
        self.queued = None;
        let _ = self.ingest.send(None);
    }

    /// The gate is closed for good (the task stops).
    pub(super) fn close(&self) {
        let _ = self.ingest.send(None);
    }

    /// A heartbeat was read: a backlog still draining keeps the wait going.
    pub(super) fn heartbeat_read(&mut self) {
        if self.outstanding.is_some() {
            self.progress = Instant::now();
        }
    }

    /// The broker's retained marker arrived: it kept its retained messages.
    pub(super) fn broker_marker_seen(&mut self) {
        if self.broker == BrokerCheck::Awaiting {
            self.broker = BrokerCheck::Seen;
        }
    }

    /// A message on our sync topic: `true` once both the outstanding marker and the
    /// queued one (if any) are back.
    pub(super) fn arrived(&mut self, payload: &Bytes) -> bool {
        if self.outstanding.is_none() {
            return false;
        }
        if self.queued.as_ref() == Some(payload) {
            self.queued = None;
        } else if self.outstanding.as_ref().is_some_and(|(t, _)| t == payload) {
            self.marker_back = true;
        } else {
            return false;
        }
        self.marker_back && self.queued.is_none()
    }

    /// The marker is back, or given up on: heartbeats are live again. Returns `true` when
    /// the broker check is over and the broker's retained marker did not come: the broker
    /// lost its retained messages. Then [`SyncMarker::open`].
    pub(super) fn finish(&mut self) -> bool {
        self.outstanding = None;
        self.queued = None;
        self.stamp = Stamp::Live;
        let lost = self.broker == BrokerCheck::Awaiting;
        self.broker = BrokerCheck::Idle;
        lost
    }

    /// Everything queued before now has been received: the gate opens (unless the process
    /// stalled after the marker was sent).
    pub(super) fn open(&self) {
        let _ = self.ingest.send(Some(Synced {
            at: now_ms(),
            stalls: self.stalls,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> (SyncMarker, watch::Receiver<Option<Synced>>) {
        let (tx, rx) = watch::channel(None);
        (SyncMarker::new("a", tx), rx)
    }

    #[test]
    fn heartbeats_count_as_on_time_until_the_marker_is_back() {
        let (mut s, rx) = marker();
        let out = s.connected(true, 0);
        assert_eq!(out.topic, "presenced/sync/a");
        assert_eq!(s.stamp(), Stamp::OnTime);
        assert!(s.outstanding());
        assert!(!s.arrived(&Bytes::from_static(b"someone else's")));
        assert!(s.arrived(&out.payload));
        assert!(!s.finish(), "no broker check after a ConnAck with session");
        s.open();
        assert_eq!(s.stamp(), Stamp::Live);
        assert!(!s.outstanding());
        assert_eq!(rx.borrow().map(|m| m.stalls), Some(0));
        // A stall: a fresh marker is due; the old one proves nothing any more.
        let again = s.restart(1);
        assert_ne!(again.payload, out.payload);
        assert!(!s.arrived(&out.payload));
        assert_eq!(s.stamp(), Stamp::OnTime);
        assert!(s.arrived(&again.payload));
        assert!(!s.finish());
        s.open();
        assert_eq!(
            rx.borrow().map(|m| m.stalls),
            Some(1),
            "the gate knows which stall it covers"
        );
    }

    #[test]
    fn a_queued_marker_must_come_back_too() {
        let (mut s, _rx) = marker();
        let queued = Bytes::from_static(b"queued");
        // Passed by the session's own marker (a broker that streams the queue meanwhile).
        s.queued(queued.clone());
        let out = s.connected(true, 0);
        assert!(!s.arrived(&out.payload));
        assert!(s.outstanding(), "the wait goes on");
        assert!(s.arrived(&queued));
        // In order: the queued one first.
        s.finish();
        s.queued(queued.clone());
        let out = s.connected(true, 0);
        assert!(!s.arrived(&queued));
        assert!(s.arrived(&out.payload));
        // A session the broker lost had no queue: only our own marker counts.
        s.finish();
        s.queued(queued.clone());
        let out = s.connected(false, 0);
        assert!(s.arrived(&out.payload));
    }

    #[test]
    fn refused_connections_stamp_the_backlog_with_the_brokers_return() {
        let (mut s, _rx) = marker();
        s.refused();
        let _ = s.connected(true, 0);
        assert!(matches!(s.stamp(), Stamp::BrokerReturned(_)));
        let _ = s.restart(1);
        assert!(
            matches!(s.stamp(), Stamp::BrokerReturned(_)),
            "a stall while that backlog is read keeps its stamp"
        );
        s.lost();
        assert!(!s.outstanding());
        let _ = s.connected(true, 0);
        assert_eq!(
            s.stamp(),
            Stamp::OnTime,
            "only the connection after the refusals"
        );
    }

    #[test]
    fn the_broker_lost_its_retained_messages_when_its_marker_did_not_come() {
        let (mut s, _rx) = marker();
        let _ = s.connected(false, 0);
        assert!(s.finish());
        let _ = s.connected(false, 0);
        s.broker_marker_seen();
        assert!(!s.finish());
        // Seen before the session-less ConnAck's check began: not counted.
        s.broker_marker_seen();
        let _ = s.connected(false, 0);
        assert!(s.finish());
    }

    #[test]
    fn the_wait_is_bounded_by_progress() {
        let (mut s, _rx) = marker();
        let _ = s.connected(true, 0);
        let first = s.deadline();
        std::thread::sleep(Duration::from_millis(5));
        s.heartbeat_read();
        assert!(s.deadline() > first);
    }
}
