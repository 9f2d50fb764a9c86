//! Connection health shared by the tasks: what `/readyz` answers and what the
//! `presenced_redis_up` / `presenced_mqtt_up` gauges show. Setting a flag updates its gauge,
//! so the two never disagree.
//!
//! It must not probe anything itself: the tasks that hold the connections report to it.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::broker::Findings;
use crate::instances::Instances;
use crate::metrics::Metrics;

/// Why the monitor is not ready: one reason per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub(crate) struct NotReady(Vec<&'static str>);

/// How far the MQTT side is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttLink {
    /// Not connected to the broker.
    Down,
    /// Connected, but not subscribed to heartbeats (not yet, refused, or left the shared
    /// subscription).
    Connected,
    /// Connected and subscribed to heartbeats: ready.
    Subscribed,
}

pub(crate) struct Health {
    metrics: Metrics,
    redis_commands: AtomicBool,
    redis_listener: AtomicBool,
    mqtt_connected: AtomicBool,
    mqtt_subscribed: AtomicBool,
    /// What the latest probe found the broker cannot do.
    broker: watch::Sender<Findings>,
    /// The replicas the broker says are running (for the status page).
    pub(crate) instances: Instances,
}

impl Health {
    pub(crate) fn new(metrics: Metrics) -> Health {
        metrics.set_redis_up(false);
        metrics.set_mqtt_up(false);
        Health {
            metrics,
            redis_commands: AtomicBool::new(false),
            redis_listener: AtomicBool::new(false),
            mqtt_connected: AtomicBool::new(false),
            mqtt_subscribed: AtomicBool::new(false),
            broker: watch::channel(Findings::Pending).0,
            instances: Instances::default(),
        }
    }

    pub(crate) fn set_redis_commands(&self, up: bool) {
        self.redis_commands.store(up, Ordering::Relaxed);
        self.update_redis();
    }

    pub(crate) fn set_redis_listener(&self, up: bool) {
        self.redis_listener.store(up, Ordering::Relaxed);
        self.update_redis();
    }

    fn update_redis(&self) {
        self.metrics.set_redis_up(
            self.redis_commands.load(Ordering::Relaxed)
                && self.redis_listener.load(Ordering::Relaxed),
        );
    }

    pub(crate) fn set_mqtt(&self, link: MqttLink) {
        let connected = link != MqttLink::Down;
        let subscribed = link == MqttLink::Subscribed;
        self.mqtt_connected.store(connected, Ordering::Relaxed);
        self.mqtt_subscribed.store(subscribed, Ordering::Relaxed);
        self.metrics.set_mqtt_up(connected && subscribed);
    }

    /// A probe of the broker finished (or a new connection awaits one: `Pending`, which
    /// keeps the gauges as they were).
    pub(crate) fn set_broker(&self, findings: Findings) {
        self.metrics.set_broker(&findings);
        self.broker.send_replace(findings);
    }

    /// The latest findings, and each new one.
    pub(crate) fn broker(&self) -> watch::Receiver<Findings> {
        self.broker.subscribe()
    }

    /// `Ok` when ready, else the reasons.
    pub(crate) fn readiness(&self) -> Result<(), NotReady> {
        let mut reasons = Vec::new();
        if !self.redis_commands.load(Ordering::Relaxed) {
            reasons.push("redis: not connected");
        }
        if !self.redis_listener.load(Ordering::Relaxed) {
            reasons.push("redis: keyspace listener not subscribed");
        }
        if !self.mqtt_connected.load(Ordering::Relaxed) {
            reasons.push("mqtt: not connected");
        } else if !self.mqtt_subscribed.load(Ordering::Relaxed) {
            reasons.push("mqtt: not subscribed");
        }
        reasons.extend(self.broker.borrow().blocking().map(|l| l.explain()));
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(NotReady(reasons))
        }
    }
}
