//! Heartbeats at the edge: a message on the heartbeat subscription is validated (topic,
//! device id, size), its TTL read, and it is held for Redis with the [`Stamp`] the session
//! says. Bad input is counted and skipped, never an error. It must not decide the stamp
//! (that is the sync marker's business) nor talk to Redis.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, warn};

use crate::beat::Stamp;
use crate::config::{MqttConfig, PresenceConfig};
use crate::device::{heartbeat_ttl, DeviceId, TopicTemplate};
use crate::held::Held;
use crate::metrics::{Metrics, Rejected};
use crate::telemetry::LogLimiter;

/// Takes heartbeats into [`Held`].
pub(super) struct Ingest {
    topic: TopicTemplate,
    max_packet_size: usize,
    presence: PresenceConfig,
    metrics: Metrics,
    held: Arc<Held>,
    invalid: LogLimiter,
    too_large: LogLimiter,
    held_full: LogLimiter,
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
            max_packet_size: cfg.max_packet_size,
            presence,
            metrics,
            held,
            invalid: LogLimiter::new(Duration::from_secs(10)),
            too_large: LogLimiter::new(Duration::from_secs(10)),
            held_full: LogLimiter::new(Duration::from_secs(10)),
        }
    }

    /// One message on the heartbeat subscription: validated, counted, held for Redis with
    /// the stamp `stamp` gives once its arrival time is read (see [`Held::insert`]).
    pub(super) fn heartbeat(&self, topic: &[u8], payload: &[u8], stamp: impl FnOnce() -> Stamp) {
        let Some(device) = self.device(topic) else {
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
        let ttl = heartbeat_ttl(payload, p.ttl, p.min_ttl, p.max_ttl);
        if self.held.insert(device, ttl, stamp) {
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

    /// The device a heartbeat topic names; `None` (logged) if it names none or an invalid
    /// one.
    fn device(&self, topic: &[u8]) -> Option<DeviceId> {
        let raw = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| self.topic.extract(t));
        match raw.map(DeviceId::parse) {
            Some(Ok(id)) => Some(id),
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
