//! What the monitor knows of a heartbeat: when it reached the broker ([`Stamp`] as received,
//! [`Timing`] as applied) and the coalesced heartbeats of one device on their way to Redis
//! ([`Beat`]). Pure: no I/O.

use crate::device::{DeviceId, GroupName, Millis};

/// How a received heartbeat is stamped (see `Held::insert`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// A live message: it reached the broker as it reached us.
    Live,
    /// Queued by the broker while the broker itself was down (it refused our connections):
    /// it reached the broker when the broker came back, at this time at the earliest.
    BrokerReturned(Millis),
    /// Queued for us while we were away from a broker that kept running (stopped, cut off,
    /// stalled): it reached the broker in time.
    OnTime,
}

impl Stamp {
    /// The stamp once the process stalled: what is read now may have waited through the
    /// stall, so it counts as on time, unless it is a backlog the broker queued while it
    /// was down (that stays as late as it was).
    pub fn after_stall(self) -> Stamp {
        match self {
            Stamp::BrokerReturned(at) => Stamp::BrokerReturned(at),
            Stamp::Live | Stamp::OnTime => Stamp::OnTime,
        }
    }
}

/// What is known of when a heartbeat reached the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// Its arrival at the monitor (a live message), or the moment the broker came back
    /// (queued while the broker was down): a late arrival ends an offline period.
    Known,
    /// Queued for the monitor while it was away (stopped, cut off, stalled) from a broker
    /// that kept running: it reached the broker in time, whatever its arrival says.
    OnTime,
}

/// What a heartbeat names besides its device: its group and its session (see `will`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    pub group: Option<GroupName>,
    pub session: Option<u64>,
}

/// The held heartbeats of one device, to apply (local wall-clock times).
#[derive(Clone, Debug)]
pub struct Beat {
    pub device: DeviceId,
    /// The earliest held heartbeat's arrival.
    pub first: Millis,
    /// The latest heartbeat's arrival and the deadline it set (the latest heartbeat wins).
    pub arrival: Millis,
    pub deadline: Millis,
    /// A silence inside the held heartbeats: the deadline that passed, and the arrival
    /// that ended it.
    pub lapse: Option<(Millis, Millis)>,
    pub timing: Timing,
    /// The group named by the latest heartbeat that named one.
    pub group: Option<GroupName>,
    /// The session named by the latest heartbeat that named one.
    pub session: Option<u64>,
}

impl Beat {
    /// One live heartbeat.
    pub fn live(device: DeviceId, arrival: Millis, ttl_ms: u64) -> Beat {
        Beat {
            device,
            first: arrival,
            arrival,
            deadline: arrival + ttl_ms,
            lapse: None,
            timing: Timing::Known,
            group: None,
            session: None,
        }
    }
}
