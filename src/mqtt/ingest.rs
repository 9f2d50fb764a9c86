//! Heartbeats and wills at the edge: a message on the heartbeat subscription is validated
//! (topic, device id, size), its TTL read, and it is held for Redis with the [`Stamp`] the
//! session says; a message on the will topic is read (see [`WillPayload`]) and a will is held
//! after the device's heartbeats. Bad input is counted and skipped, never an error. It must
//! not decide the stamp (that is the sync marker's business) nor talk to Redis.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, warn};

use crate::beat::{Named, Stamp};
use crate::config::{MqttConfig, PresenceConfig};
use crate::device::{
    heartbeat_ttl, payload_group, DeviceId, GroupName, InvalidGroup, TopicTemplate,
};
use crate::held::{Held, WillHeld};
use crate::metrics::{Metrics, Rejected, WillResult};
use crate::telemetry::LogLimiter;
use crate::will::{session_of, WillPayload};

/// Whether a message was published while we were subscribed (news) or replayed because we
/// (re)subscribed (a retained copy: not news).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    Live,
    Replay,
}

/// The will topic and the will payload (trimmed, lowercase).
struct WillTopic {
    topic: TopicTemplate,
    payload: String,
}

/// Takes heartbeats into [`Held`].
pub(super) struct Ingest {
    topic: TopicTemplate,
    will: Option<WillTopic>,
    max_packet_size: usize,
    presence: PresenceConfig,
    metrics: Metrics,
    held: Arc<Held>,
    invalid: LogLimiter,
    bad_group: LogLimiter,
    too_large: LogLimiter,
    held_full: LogLimiter,
    bad_will: LogLimiter,
}

impl Ingest {
    pub(super) fn new(
        cfg: &MqttConfig,
        presence: PresenceConfig,
        metrics: Metrics,
        held: Arc<Held>,
    ) -> Ingest {
        Ingest {
            topic: cfg.heartbeat_topic.clone(),
            will: cfg.will_topic.clone().map(|topic| WillTopic {
                topic,
                payload: cfg.will_payload.clone(),
            }),
            max_packet_size: cfg.max_packet_size,
            presence,
            metrics,
            held,
            invalid: LogLimiter::new(Duration::from_secs(10)),
            bad_group: LogLimiter::new(Duration::from_secs(10)),
            too_large: LogLimiter::new(Duration::from_secs(10)),
            held_full: LogLimiter::new(Duration::from_secs(10)),
            bad_will: LogLimiter::new(Duration::from_secs(10)),
        }
    }

    /// Whether `topic` is on the will topic.
    pub(super) fn is_will(&self, topic: &[u8]) -> bool {
        let Some(will) = &self.will else {
            return false;
        };
        std::str::from_utf8(topic).is_ok_and(|t| will.topic.extract_levels(t).is_some())
    }

    /// One message on the will topic: a live will is held, after the device's heartbeats
    /// (it is counted once applied); anything else is counted ignored.
    pub(super) fn will(&self, topic: &[u8], payload: &[u8], delivery: Delivery) {
        let Some(will) = &self.will else {
            return;
        };
        let device = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| will.topic.extract_levels(t))
            .map(|(d, _)| DeviceId::parse(d));
        let device = match device {
            Some(Ok(device)) => device,
            _ => {
                if let Some(n) = self.bad_will.check() {
                    warn!(
                        suppressed = n,
                        "Ignored a will whose topic names no valid device id."
                    );
                }
                self.metrics.will_handled(WillResult::Ignored, 1);
                return;
            }
        };
        if delivery == Delivery::Replay || payload.len() > self.max_packet_size {
            return self.metrics.will_handled(WillResult::Ignored, 1);
        }
        let WillPayload::Will { session } = WillPayload::read(payload, &will.payload) else {
            return self.metrics.will_handled(WillResult::Ignored, 1);
        };
        match self.held.insert_will(device, session) {
            WillHeld::Held => {}
            WillHeld::Redundant => self.metrics.will_handled(WillResult::Ignored, 1),
            WillHeld::Full => {
                self.metrics.will_handled(WillResult::Ignored, 1);
                if let Some(n) = self.held_full.check() {
                    error!(
                        suppressed = n,
                        "Wills held for Redis are at their limit; dropping new devices' wills."
                    );
                }
            }
        }
    }

    /// One message on the heartbeat subscription: validated, counted, held for Redis with
    /// the stamp `stamp` gives once its arrival time is read (see [`Held::insert`]).
    pub(super) fn heartbeat(&self, topic: &[u8], payload: &[u8], stamp: impl FnOnce() -> Stamp) {
        let Some((device, group_level)) = self.device(topic) else {
            self.metrics.heartbeat_rejected(Rejected::InvalidId);
            return;
        };
        if payload.len() > self.max_packet_size {
            self.metrics.heartbeat_rejected(Rejected::TooLarge);
            if let Some(n) = self.too_large.check() {
                warn!(%device, bytes = payload.len(), limit = self.max_packet_size, suppressed = n, "Rejected an oversized heartbeat.");
            }
            return;
        }
        let p = &self.presence;
        let group = self.group(&device, group_level, payload);
        // The device's class (the first rule that matches it, with the group this heartbeat
        // names), unless the heartbeat asks for its own TTL.
        let class_ttl = p
            .ttl_rules
            .ttl_for(device.as_str(), group.as_ref().map(GroupName::as_str))
            .unwrap_or(p.ttl);
        let ttl = heartbeat_ttl(payload, class_ttl, p.min_ttl, p.max_ttl);
        let named = Named {
            group,
            session: session_of(payload),
        };
        if self.held.insert(device, named, ttl, stamp) {
            self.metrics.heartbeat_accepted();
        } else if let Some(n) = self.held_full.check() {
            error!(
                suppressed = n,
                "Heartbeats held for Redis are at their limit; dropping new devices' heartbeats."
            );
        }
    }

    /// No more heartbeats come: the applier must not wait for one.
    pub(super) fn close(&self) {
        self.held.close();
    }

    /// The group a heartbeat names: its topic's `{group}` level if the template has one,
    /// else the payload's `"group"`. An invalid name is ignored (logged at a limited rate):
    /// the heartbeat still counts, the device keeps its group.
    fn group(&self, device: &DeviceId, level: Option<&str>, payload: &[u8]) -> Option<GroupName> {
        let named: Option<Result<GroupName, InvalidGroup>> = match level {
            Some(level) => Some(GroupName::parse(level)),
            None => payload_group(payload),
        };
        match named? {
            Ok(group) => Some(group),
            Err(e) => {
                if let Some(n) = self.bad_group.check() {
                    warn!(%device, error = %e, suppressed = n, "Ignored an invalid group name in a heartbeat.");
                }
                None
            }
        }
    }

    /// The device a heartbeat topic names and its raw group level; `None` (logged) if it
    /// names no device or an invalid one.
    fn device<'a>(&self, topic: &'a [u8]) -> Option<(DeviceId, Option<&'a str>)> {
        let levels = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| self.topic.extract_levels(t));
        let group = levels.and_then(|(_, g)| g);
        match levels.map(|(d, _)| DeviceId::parse(d)) {
            Some(Ok(id)) => Some((id, group)),
            Some(Err(e)) => {
                if let Some(n) = self.invalid.check() {
                    warn!(error = %e, suppressed = n, "Rejected a heartbeat with an invalid device id.");
                }
                None
            }
            None => {
                if let Some(n) = self.invalid.check() {
                    warn!(
                        suppressed = n,
                        "Rejected a message whose topic does not match the heartbeat topic."
                    );
                }
                None
            }
        }
    }
}
