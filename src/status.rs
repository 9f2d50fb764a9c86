//! A status on its way to the broker, and what comes back when the broker acknowledged it.
//!
//! Shared by the tasks that commit transitions (they make a [`StatusOut`]), the MQTT task
//! (it publishes it and hands back a [`Delivered`]) and the outbox (it retires the entry the
//! [`Receipt`] names). Pure: the MQTT side carries the receipt without knowing how the
//! outbox is kept.

use crate::bucket::Bucket;
use crate::device::{DeviceId, GroupName, StatusEvent};
use crate::group_status::GroupStatus;

/// What an outbox entry publishes: a device's status, or a group's outage status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound {
    Device(StatusEvent),
    Group(GroupStatus),
}

impl Outbound {
    /// Parses an outbox member of either kind.
    pub fn parse_member(member: &str) -> Option<Outbound> {
        if member.starts_with('o') {
            GroupStatus::parse_member(member).map(Outbound::Group)
        } else {
            StatusEvent::parse_member(member).map(Outbound::Device)
        }
    }

    /// The device status, if it is one.
    pub fn device(&self) -> Option<&StatusEvent> {
        match self {
            Outbound::Device(ev) => Some(ev),
            Outbound::Group(_) => None,
        }
    }

    /// Whose status it is, and its seq.
    pub fn subject(&self) -> (Subject, u64) {
        match self {
            Outbound::Device(ev) => (Subject::Device(ev.device.clone()), ev.seq),
            Outbound::Group(g) => (Subject::Group(g.group.clone()), g.seq),
        }
    }
}

/// Whose status a publish carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Device(DeviceId),
    Group(GroupName),
}

/// Which outbox entry a status came from: retired when the broker acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub bucket: Bucket,
    /// The outbox member.
    pub member: String,
}

/// Whether the notification lag is observed when the broker acknowledges a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lag {
    /// A transition decided now: an offline one counts from its deadline.
    Observe,
    /// A status published again (acknowledged late, claimed, republished, cleared).
    Skip,
}

/// A committed transition (or a current status) to publish. Compact on purpose: the status
/// queue may hold a mass expiry's worth of them; topic and payload are built only when it
/// is sent.
#[derive(Clone, Debug)]
pub struct StatusOut {
    pub event: Outbound,
    pub receipt: Receipt,
    pub lag: Lag,
}

/// The broker acknowledged a status.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub receipt: Receipt,
    pub subject: Subject,
    pub seq: u64,
}
