//! PUBACK tracking: matches queued publishes to packet ids and packet ids to PUBACKs, so a
//! status counts as delivered only when the broker acknowledged *it*. Pure bookkeeping: it
//! must not publish or decide what a PUBACK means.
//!
//! rumqttc's `publish().await` only means "queued". The event loop reports
//! `Outgoing::Publish(pkid)` in the order requests were queued, and a pkid already in flight
//! is a retransmission. When a ConnAck says the session is gone, the client dropped
//! everything queued or in flight; [`Tracker::take_all`] hands it back to be sent again.

use std::collections::{HashMap, VecDeque};

use super::outgoing::Outgoing;

/// Publishes queued in the client or awaiting their PUBACK.
#[derive(Default)]
pub(super) struct Tracker {
    next_order: u64,
    /// Queued in the client, not yet given a packet id, in queue order.
    queued: VecDeque<(u64, Outgoing)>,
    /// Sent, awaiting PUBACK.
    in_flight: HashMap<u16, (u64, Outgoing)>,
}

impl Tracker {
    pub(super) fn len(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }

    pub(super) fn queue(&mut self, out: Outgoing) {
        self.queued.push_back((self.next_order, out));
        self.next_order += 1;
    }

    pub(super) fn sent(&mut self, pkid: u16) {
        // Pkid 0: a QoS 0 publish (a beacon), never queued here. A pkid already in flight is
        // the client retransmitting it after a reconnect.
        if pkid == 0 || self.in_flight.contains_key(&pkid) {
            return;
        }
        if let Some(entry) = self.queued.pop_front() {
            self.in_flight.insert(pkid, entry);
        }
    }

    pub(super) fn acked(&mut self, pkid: u16) -> Option<Outgoing> {
        self.in_flight.remove(&pkid).map(|(_, out)| out)
    }

    /// Everything the client dropped when the broker lost the session, in original order.
    pub(super) fn take_all(&mut self) -> Vec<Outgoing> {
        let mut all: Vec<(u64, Outgoing)> = self.in_flight.drain().map(|(_, e)| e).collect();
        all.extend(self.queued.drain(..));
        all.sort_by_key(|(order, _)| *order);
        all.into_iter().map(|(_, out)| out).collect()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::client::Retain;
    use super::super::events::{drop_stale_acks, leftover_events};
    use super::super::outgoing::Kind;
    use super::*;

    fn out(n: u8) -> Outgoing {
        Outgoing {
            topic: format!("t{n}"),
            payload: Bytes::new(),
            retain: Retain::No,
            kind: Kind::Presence,
        }
    }

    /// `t1` and `t2` queued, in that order.
    fn two_queued() -> Tracker {
        let mut t = Tracker::default();
        t.queue(out(1));
        t.queue(out(2));
        t
    }

    #[test]
    fn tracker_matches_in_order_and_ignores_retransmissions() {
        let mut t = two_queued();
        t.sent(7);
        t.sent(7); // retransmission
        t.sent(3);
        assert_eq!(t.len(), 2);
        assert_eq!(t.acked(3).map(|o| o.topic), Some("t2".into()));
        assert_eq!(t.acked(3).map(|o| o.topic), None);
        t.queue(out(3));
        let all: Vec<String> = t.take_all().into_iter().map(|o| o.topic).collect();
        assert_eq!(all, vec!["t1", "t3"]);
        assert_eq!(t.len(), 0);
    }

    /// rumqttc reports a QoS 0 publish (a beacon) as `Outgoing::Publish(0)`, in request
    /// order. With the in-flight window full, a beacon waits in the request channel while
    /// statuses are queued behind it; taken as a status's pkid, it would credit every later
    /// PUBACK to the status queued after the one acknowledged.
    #[test]
    fn tracker_ignores_qos0_publishes() {
        let mut t = Tracker::default();
        t.queue(out(1));
        t.sent(0); // the beacon, requested before `t1`
        t.sent(4);
        t.queue(out(2));
        t.sent(0);
        t.sent(5);
        assert_eq!(t.acked(4).map(|o| o.topic), Some("t1".into()));
        assert_eq!(t.acked(5).map(|o| o.topic), Some("t2".into()));
        assert_eq!(t.acked(0).map(|o| o.topic), None);
        assert_eq!(t.len(), 0);
    }

    /// A v3.1.1 connection lost while `b` was being written, then a ConnAck without
    /// session: rumqttc still holds `b`'s `Outgoing::Publish` (and a PUBACK read before
    /// the error) and yields them after the ConnAck. Dropped, every re-queued publish gets
    /// its own PUBACK; kept, `a` would be credited with pkid 2's PUBACK and `b` with `a`'s.
    #[test]
    fn tracker_after_a_lost_session_ignores_the_old_connections_events() {
        use rumqttc::{Event as E, Incoming as I};
        let mut t = two_queued();
        t.sent(1);
        let mut buffered: VecDeque<E> = VecDeque::from(leftover_events());
        // ConnAck, no session: everything is queued again (fresh presence first).
        let again = t.take_all();
        t.queue(out(0));
        for o in again {
            t.queue(o);
        }
        drop_stale_acks(&mut buffered);
        assert!(
            matches!(buffered.as_slices().0, [E::Incoming(I::Publish(_))]),
            "{buffered:?}"
        );
        t.sent(5);
        t.sent(6);
        t.sent(7);
        assert_eq!(t.acked(6).map(|o| o.topic), Some("t1".into()));
        assert_eq!(t.acked(7).map(|o| o.topic), Some("t2".into()));
        assert_eq!(t.acked(5).map(|o| o.topic), Some("t0".into()));
        assert_eq!(t.len(), 0);
    }
}
