//! Membership of the shared subscription, and the peers: a replica that cannot reach Redis
//! while another can leaves the group, so the broker hands its share of heartbeats to the
//! replicas that can apply them; it joins again when Redis answers. Replicas that reach
//! Redis say so in beacons; a replica whose presence says offline is reported to the
//! stamper. It must not touch heartbeats or statuses. (Until it has left, its floor holds
//! back the others' expiries: see `presence::Stamper`.)

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::client::{Client, Qos, Retain};
use super::topics::{beacon_topic, INSTANCES};
use crate::health::{Health, MqttLink};

/// How often a replica that reaches Redis says so to the others.
const BEACON_EVERY: Duration = Duration::from_millis(500);
/// A replica that cannot reach Redis leaves the shared group when another replica said it
/// reaches Redis this long after our own trouble began (so a Redis that is down for every
/// replica makes none of them leave: then every one holds what it gets).
const PEER_OK_AFTER: Duration = Duration::from_millis(1500);

/// This replica's membership of the shared heartbeat subscription.
pub(super) struct Share {
    /// Our beacon topic.
    me: String,
    /// The shared filters: heartbeats, and wills if they are read.
    shared: Vec<String>,
    member: bool,
    /// When our Redis trouble began.
    trouble: Option<Instant>,
    /// The last beacon of another replica.
    peer_ok: Option<Instant>,
    next_beacon: Instant,
    /// Whether this replica reaches Redis.
    redis_ok: watch::Receiver<bool>,
    health: Arc<Health>,
}

impl Share {
    pub(super) fn new(
        group: &str,
        me: &str,
        shared: Vec<String>,
        redis_ok: watch::Receiver<bool>,
        health: Arc<Health>,
    ) -> Share {
        Share {
            me: beacon_topic(group, me),
            shared,
            member: true,
            trouble: None,
            peer_ok: None,
            next_beacon: Instant::now(),
            redis_ok,
            health,
        }
    }

    /// What a member subscribes to besides heartbeats and the replicas' presence (which
    /// every replica reads: a will tells at once that one is gone): their beacons (which of
    /// them reach Redis).
    pub(super) fn filters(group: &str) -> [String; 1] {
        [beacon_topic(group, "+")]
    }

    /// A (re)connection subscribes to everything.
    pub(super) fn joined(&mut self) {
        self.member = true;
    }

    pub(super) fn beacon(&mut self, topic: &[u8]) {
        if topic != self.me.as_bytes() {
            self.peer_ok = Some(Instant::now());
        }
    }

    /// Beacons while Redis answers (and rejoining); leaving when it does not but a peer's does.
    pub(super) fn tick(&mut self, client: &Client) {
        let now = Instant::now();
        if *self.redis_ok.borrow() {
            self.trouble = None;
            if now >= self.next_beacon {
                self.next_beacon = now + BEACON_EVERY;
                let beacon = Bytes::from_static(b"redis-ok");
                let _ = client.try_publish(&self.me, Qos::AtMostOnce, Retain::No, beacon);
            }
            if !self.member && client.try_subscribe_many(&self.shared).is_ok() {
                self.member = true;
                info!("Redis answers again; rejoining the shared subscription.");
            }
            return;
        }
        let began = *self.trouble.get_or_insert(now);
        let peer_fine = self.peer_ok.is_some_and(|at| at > began + PEER_OK_AFTER);
        // Left once any filter is left: rejoining subscribes to them all again.
        let leave = |shared: &[String]| {
            // Every filter is tried (no short circuit).
            let left: Vec<bool> = shared
                .iter()
                .map(|f| client.try_unsubscribe(f).is_ok())
                .collect();
            left.contains(&true)
        };
        if self.member && peer_fine && leave(&self.shared) {
            self.member = false;
            self.health.set_mqtt(MqttLink::Connected);
            warn!("Cannot reach Redis while other replicas can; leaving the shared subscription so that they get our share of heartbeats.");
        }
    }
}

/// The replica named by a presence message that says it is offline.
pub(super) fn gone_instance(topic: &[u8], payload: &[u8]) -> Option<String> {
    let who = std::str::from_utf8(topic).ok()?.strip_prefix(INSTANCES)?;
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    (v.get("state")?.as_str()? == "offline").then(|| who.to_owned())
}
