//! All MQTT I/O: connection options (v5 or v3.1.1, TLS, credentials, will), the one task
//! that polls the event loop, heartbeat parsing at the edge, and a publisher that knows
//! when the broker acknowledged each status.
//!
//! It knows nothing of Redis: heartbeats go into [`Held`], statuses come in on a bounded
//! channel, acknowledgements go out on another.
//!
//! **Invariant: the event loop is never blocked.** The task that polls it only ever uses
//! `try_*` calls; it reads the status channel only while it has room in flight, which is the
//! backpressure on everything upstream.
//!
//! rumqttc's `publish().await` only means "queued". Acknowledgements are matched here: the
//! event loop reports `Outgoing::Publish(pkid)` in the order requests were queued, and a
//! pkid already in flight is a retransmission. When a ConnAck says the session is gone, the
//! client dropped everything queued or in flight; it is all sent again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{Outgoing as LoopOutgoing, QoS};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::Clock;
use crate::config::{MqttConfig, PresenceConfig, Protocol, MQTT_MAX_PACKET};
use crate::device::{
    format_time, heartbeat_ttl, now_ms, DeviceId, Millis, State, TopicTemplate,
};
use crate::health::Health;
use crate::metrics::{Metrics, Rejected};
use crate::beat::Stamp;
use crate::held::Held;
use crate::status::{Delivered, Lag, StatusOut};
use crate::telemetry::{Backoff, LogLimiter};

/// Statuses in flight (queued in the client or awaiting PUBACK) at most.
const INFLIGHT: usize = 100;
/// How long a shutdown waits for statuses in flight to be acknowledged.
const DRAIN: Duration = Duration::from_secs(3);
/// How long to wait for our own sync marker before assuming the backlog was delivered.
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// How often the task checks that it was not stalled, and what counts as a stall.
const WATCHDOG: Duration = Duration::from_millis(200);
const STALL: Duration = Duration::from_millis(500);
/// Session expiry asked for with v5 (contract: at least 1 hour).
const SESSION_EXPIRY_S: u32 = 24 * 3600;

/// Something to publish, QoS 1.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    /// A device status; `lag_from` is the TTL deadline of an offline transition, for the
    /// lag histogram.
    Status { ack: Delivered, lag_from: Option<Millis> },
    /// The monitor's own presence.
    Presence,
    /// The sync marker (see [`MqttTask`]).
    Marker,
}

impl StatusOut {
    fn into_outgoing(self, template: &TopicTemplate) -> Outgoing {
        // A forgotten device's clear is an empty retained message, and no transition.
        let clear = self.event.is_clear();
        let lag_from =
            (self.lag == Lag::Observe && !clear && self.event.state == State::Offline).then_some(self.event.since);
        Outgoing {
            topic: template.render(&self.event.device),
            payload: if clear {
                Bytes::new()
            } else {
                self.event.to_json().into()
            },
            retain: true,
            kind: Kind::Status {
                ack: Delivered {
                    receipt: self.receipt,
                    device: self.event.device,
                    seq: self.event.seq,
                },
                lag_from,
            },
        }
    }
}

/// The monitor's presence topic.
pub fn instance_topic(instance: &str) -> String {
    format!("presenced/instances/{instance}")
}

fn sync_topic(instance: &str) -> String {
    format!("presenced/sync/{instance}")
}

fn presence_payload(online: bool, instance: &str, since: Millis) -> Bytes {
    let v = if online {
        serde_json::json!({"state": "online", "instance": instance, "since": format_time(since)})
    } else {
        serde_json::json!({"state": "offline", "instance": instance})
    };
    Bytes::from(v.to_string())
}

const BEACONS: &str = "presenced/peers/";
/// A retained message of ours that tells whether the broker still has its retained
/// messages: missing after a reconnect without session means it lost them.
const BROKER_TOPIC: &str = "presenced/broker";

/// Beacons are per shared group: another deployment on the same broker is not a peer.
fn beacon_topic(group: &str, instance: &str) -> String {
    format!("{BEACONS}{group}/{instance}")
}

/// How often a replica that reaches Redis says so to the others.
const BEACON_EVERY: Duration = Duration::from_millis(500);
/// A replica that cannot reach Redis leaves the shared group when another replica said it
/// reaches Redis this long after our own trouble began (so a Redis that is down for every
/// replica makes none of them leave: then every one holds what it gets).
const PEER_OK_AFTER: Duration = Duration::from_millis(1500);

/// Membership of the shared subscription. A replica that cannot reach Redis while another
/// can leaves the group, so the broker hands its share of heartbeats to the replicas that can
/// apply them; it joins again when Redis answers. (Until it has left, its floor holds back
/// the others' expiries: see `presence::Stamper`.)
struct Share {
    me: String,
    member: bool,
    /// When our Redis trouble began.
    trouble: Option<Instant>,
    /// The last beacon of another replica.
    peer_ok: Option<Instant>,
    next_beacon: Instant,
}

impl Share {
    fn new(group: &str, me: &str) -> Share {
        Share {
            me: beacon_topic(group, me),
            member: true,
            trouble: None,
            peer_ok: None,
            next_beacon: Instant::now(),
        }
    }

    /// A (re)connection subscribes to everything.
    fn joined(&mut self) {
        self.member = true;
    }

    fn beacon(&mut self, topic: &[u8]) {
        if topic != self.me.as_bytes() {
            self.peer_ok = Some(Instant::now());
        }
    }

    fn tick(&mut self, client: &Client, heartbeats: &str, redis_ok: bool, health: &Health) {
        let now = Instant::now();
        if redis_ok {
            self.trouble = None;
            if now >= self.next_beacon {
                self.next_beacon = now + BEACON_EVERY;
                let _ = client.try_publish_qos0(&self.me, Bytes::from_static(b"redis-ok"));
            }
            if !self.member && client.try_subscribe_many(&[heartbeats.to_owned()]).is_ok() {
                self.member = true;
                info!("Redis answers again; rejoining the shared subscription.");
            }
            return;
        }
        let began = *self.trouble.get_or_insert(now);
        let peer_fine = self.peer_ok.is_some_and(|at| at > began + PEER_OK_AFTER);
        if self.member && peer_fine && client.try_unsubscribe(heartbeats).is_ok() {
            self.member = false;
            health.set_mqtt(true, false);
            warn!("Cannot reach Redis while other replicas can; leaving the shared subscription so that they get our share of heartbeats.");
        }
    }
}

/// The replica named by a presence message that says it is offline.
fn gone_instance(topic: &[u8], payload: &[u8]) -> Option<String> {
    let who = std::str::from_utf8(topic)
        .ok()?
        .strip_prefix("presenced/instances/")?;
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    (v.get("state")?.as_str()? == "offline").then(|| who.to_owned())
}

/// A sync marker with a fresh token (see [`MqttTask`]).
fn new_marker(topic: &str) -> (Outgoing, Bytes) {
    let token = Bytes::from(format!("{:016x}", fastrand::u64(..)));
    let out = Outgoing {
        topic: topic.to_owned(),
        payload: token.clone(),
        retain: false,
        kind: Kind::Marker,
    };
    (out, token)
}

// === Client adapter (v5 / v3.1.1) ===

/// The client half of either protocol.
#[derive(Clone)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

/// The event loop of either protocol.
pub enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

/// The events this crate cares about, in protocol-neutral form.
#[derive(Debug)]
pub enum Event {
    ConnAck {
        session_present: bool,
    },
    /// `retained`: sent because we (re)subscribed, not published while we were subscribed.
    Publish {
        topic: Bytes,
        payload: Bytes,
        retained: bool,
    },
    SubAck {
        granted: Vec<bool>,
    },
    PubAck {
        pkid: u16,
        ok: bool,
        reason: String,
    },
    Sent {
        pkid: u16,
    },
    Disconnected,
    Other,
}

/// Why the connection is gone.
#[derive(Debug)]
pub enum Lost {
    /// Nothing listens at the broker's address: the broker is down, so devices cannot
    /// reach it either.
    Refused(String),
    Other(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Refused(e) | Lost::Other(e) => f.write_str(e),
        }
    }
}

/// How a client connects.
pub struct ConnectOptions<'a> {
    pub cfg: &'a MqttConfig,
    pub client_id: String,
    pub persistent: bool,
    /// `(topic, payload)` of a retained QoS 1 last will.
    pub will: Option<(String, Bytes)>,
    pub inflight: u16,
    pub keep_alive: Duration,
}

/// TLS from the system store (or `SSL_CERT_FILE`), without panicking on a bad store.
fn tls_transport() -> rumqttc::Transport {
    let mut roots = rustls::RootCertStore::empty();
    let result = rustls_native_certs::load_native_certs();
    for e in &result.errors {
        warn!(error = %e, "Could not load some CA certificates.");
    }
    let (added, _) = roots.add_parsable_certificates(result.certs);
    debug!(added, "Loaded CA certificates for MQTT TLS.");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

/// Builds a client and its event loop; nothing connects until the loop is polled.
pub fn client(o: ConnectOptions<'_>) -> (Client, EventLoop) {
    let cap = usize::from(o.inflight) + 16;
    let url = &o.cfg.url;
    match o.cfg.protocol {
        Protocol::V5 => {
            use rumqttc::v5::{mqttbytes::v5::LastWill, MqttOptions};
            let mut opts = MqttOptions::new(o.client_id, url.host.clone(), url.port);
            opts.set_keep_alive(o.keep_alive)
                .set_clean_start(!o.persistent)
                .set_outgoing_inflight_upper_limit(o.inflight)
                // Announced on purpose, at the protocol maximum: without it rumqttc refuses
                // packets over 10 KiB; a smaller announced size makes mosquitto silently
                // drop larger messages yet keep them in flight, stalling the session
                // (NOTES.md). Oversized heartbeats are counted and skipped by us instead.
                .set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
            if o.persistent {
                opts.set_session_expiry_interval(Some(SESSION_EXPIRY_S));
            }
            if let Some(user) = &o.cfg.username {
                let pass = o
                    .cfg
                    .password
                    .as_ref()
                    .map(|p| p.0.clone())
                    .unwrap_or_default();
                opts.set_credentials(user.clone(), pass);
            }
            if let Some((topic, payload)) = o.will {
                opts.set_last_will(LastWill::new(topic, payload.to_vec(), v5qos(), true, None));
            }
            if url.tls {
                opts.set_transport(tls_transport());
            }
            let (c, l) = rumqttc::v5::AsyncClient::new(opts, cap);
            (Client::V5(c), EventLoop::V5(Box::new(l)))
        }
        Protocol::V311 => {
            use rumqttc::{LastWill, MqttOptions};
            let mut opts = MqttOptions::new(o.client_id, url.host.clone(), url.port);
            opts.set_keep_alive(o.keep_alive)
                .set_clean_session(!o.persistent)
                .set_inflight(o.inflight)
                // Above anything a broker can send (see the v5 branch).
                .set_max_packet_size(MQTT_MAX_PACKET + 16, MQTT_MAX_PACKET + 16);
            if let Some(user) = &o.cfg.username {
                let pass = o
                    .cfg
                    .password
                    .as_ref()
                    .map(|p| p.0.clone())
                    .unwrap_or_default();
                opts.set_credentials(user.clone(), pass);
            }
            if let Some((topic, payload)) = o.will {
                opts.set_last_will(LastWill::new(
                    topic,
                    payload.to_vec(),
                    QoS::AtLeastOnce,
                    true,
                ));
            }
            if url.tls {
                opts.set_transport(tls_transport());
            }
            let (c, l) = rumqttc::AsyncClient::new(opts, cap);
            (Client::V4(c), EventLoop::V4(Box::new(l)))
        }
    }
}

fn v5qos() -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
}

impl Client {
    /// Queues a QoS 1 publish without waiting; fails only if the request channel is full.
    pub fn try_publish(&self, topic: &str, retain: bool, payload: Bytes) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish(topic, v5qos(), retain, payload)
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .try_publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
                .map_err(|e| e.to_string()),
        }
    }

    /// Publishes, waiting for room in the request channel (not for the broker).
    pub async fn publish(&self, topic: String, qos1: bool, payload: Bytes) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let qos = if qos1 {
                    v5qos()
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V4(c) => {
                let qos = if qos1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload.to_vec())
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    pub fn try_subscribe_many(&self, filters: &[String]) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), v5qos())),
                )
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
        }
    }

    pub fn try_unsubscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V5(c) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Client::V4(c) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
        }
    }

    /// A QoS 0 message, not retained: for what may be lost (beacons).
    pub fn try_publish_qos0(&self, topic: &str, payload: Bytes) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    payload,
                )
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .try_publish(topic, QoS::AtMostOnce, false, payload.to_vec())
                .map_err(|e| e.to_string()),
        }
    }

    pub fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl EventLoop {
    /// Polls once. An error means the connection is gone; polling again reconnects.
    pub async fn poll(&mut self) -> Result<Event, Lost> {
        match self {
            EventLoop::V5(l) => {
                use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
                use rumqttc::v5::{ConnectionError as C, Event as E, Incoming as I};
                let polled = l.poll().await.map_err(|e| match &e {
                    C::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Lost::Refused(e.to_string())
                    }
                    _ => Lost::Other(e.to_string()),
                });
                Ok(match polled? {
                    E::Incoming(I::ConnAck(c)) => Event::ConnAck {
                        session_present: c.session_present,
                    },
                    E::Incoming(I::Publish(p)) => Event::Publish {
                        topic: p.topic,
                        payload: p.payload,
                        retained: p.retain,
                    },
                    E::Incoming(I::SubAck(s)) => Event::SubAck {
                        granted: s
                            .return_codes
                            .iter()
                            .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                            .collect(),
                    },
                    E::Incoming(I::PubAck(a)) => Event::PubAck {
                        pkid: a.pkid,
                        ok: matches!(
                            a.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ),
                        reason: format!("{:?}", a.reason),
                    },
                    E::Incoming(I::Disconnect(_)) => Event::Disconnected,
                    E::Outgoing(LoopOutgoing::Publish(pkid)) => Event::Sent { pkid },
                    E::Outgoing(LoopOutgoing::Disconnect) => Event::Disconnected,
                    _ => Event::Other,
                })
            }
            EventLoop::V4(l) => {
                use rumqttc::{
                    ConnectionError as C, Event as E, Incoming as I, SubscribeReasonCode,
                };
                let polled = l.poll().await.map_err(|e| match &e {
                    C::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Lost::Refused(e.to_string())
                    }
                    _ => Lost::Other(e.to_string()),
                });
                Ok(match polled? {
                    E::Incoming(I::ConnAck(c)) => {
                        if !c.session_present {
                            drop_stale_acks(&mut l.state.events);
                        }
                        Event::ConnAck {
                            session_present: c.session_present,
                        }
                    }
                    E::Incoming(I::Publish(p)) => Event::Publish {
                        topic: Bytes::from(p.topic.into_bytes()),
                        payload: p.payload,
                        retained: p.retain,
                    },
                    E::Incoming(I::SubAck(s)) => Event::SubAck {
                        granted: s
                            .return_codes
                            .iter()
                            .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                            .collect(),
                    },
                    E::Incoming(I::PubAck(a)) => Event::PubAck {
                        pkid: a.pkid,
                        ok: true,
                        reason: String::new(),
                    },
                    E::Incoming(I::Disconnect) => Event::Disconnected,
                    E::Outgoing(LoopOutgoing::Publish(pkid)) => Event::Sent { pkid },
                    E::Outgoing(LoopOutgoing::Disconnect) => Event::Disconnected,
                    _ => Event::Other,
                })
            }
        }
    }
}

/// Events of the lost connection that name publishes of the lost session.
///
/// rumqttc 0.25's v3.1.1 event loop keeps the events buffered when a connection failed
/// (an `Outgoing::Publish` whose write failed, the PUBACKs read before the error) and
/// yields them *after* the next ConnAck (v5 yields them before it). When that ConnAck says
/// the session is gone, the client dropped those publishes and the [`Tracker`] queues them
/// all again: a stale `Outgoing::Publish(pkid)` would then give the first re-queued
/// publish that pkid, and every following one its predecessor's, so PUBACKs would be
/// credited to the wrong statuses (and a status never acknowledged recorded as such).
fn drop_stale_acks(events: &mut VecDeque<rumqttc::Event>) {
    use rumqttc::{Event as E, Incoming as I};
    events.retain(|e| {
        !matches!(
            e,
            E::Outgoing(LoopOutgoing::Publish(_)) | E::Incoming(I::PubAck(_))
        )
    });
}

// === Tracker ===

/// Matches queued publishes to packet ids and packet ids to PUBACKs.
#[derive(Default)]
struct Tracker {
    next_order: u64,
    /// Queued in the client, not yet given a packet id, in queue order.
    queued: VecDeque<(u64, Outgoing)>,
    /// Sent, awaiting PUBACK.
    in_flight: HashMap<u16, (u64, Outgoing)>,
}

impl Tracker {
    fn len(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }

    fn queue(&mut self, out: Outgoing) {
        self.queued.push_back((self.next_order, out));
        self.next_order += 1;
    }

    fn sent(&mut self, pkid: u16) {
        // Pkid 0: a QoS 0 publish (a beacon), never queued here. A pkid already in flight is
        // the client retransmitting it after a reconnect.
        if pkid == 0 || self.in_flight.contains_key(&pkid) {
            return;
        }
        if let Some(entry) = self.queued.pop_front() {
            self.in_flight.insert(pkid, entry);
        }
    }

    fn acked(&mut self, pkid: u16) -> Option<Outgoing> {
        self.in_flight.remove(&pkid).map(|(_, out)| out)
    }

    /// Everything the client dropped when the broker lost the session, in original order.
    fn take_all(&mut self) -> Vec<Outgoing> {
        let mut all: Vec<(u64, Outgoing)> = self.in_flight.drain().map(|(_, e)| e).collect();
        all.extend(self.queued.drain(..));
        all.sort_by_key(|(order, _)| *order);
        all.into_iter().map(|(_, out)| out).collect()
    }
}

// === The task ===

/// The MQTT task: polls the event loop, ingests heartbeats, publishes statuses.
///
/// After every connection it publishes a marker to a topic only it subscribes to. The
/// broker delivers a session's queued messages in order, so once the marker comes back,
/// every heartbeat queued while the monitor was away has arrived: only then does `ingest`
/// say the backlog is in, and expiries may be decided.
pub struct MqttTask {
    pub cfg: MqttConfig,
    pub presence: PresenceConfig,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub held: Arc<Held>,
    pub clock: Arc<Clock>,
    /// Replicas whose presence says offline (see `presence::Stamper`).
    pub gone: mpsc::Sender<String>,
    /// Whether this replica reaches Redis (see `Share`).
    pub redis_ok: watch::Receiver<bool>,
    pub out_rx: mpsc::Receiver<StatusOut>,
    pub ack_tx: mpsc::Sender<Delivered>,
    /// Woken when the broker lost our session: every device's status is published again.
    pub republish: Arc<Notify>,
    /// `Some(t)`: connected, and every heartbeat queued for us before `t` has been received.
    pub ingest: watch::Sender<Option<Millis>>,
    /// Asks for a fresh sync marker (the expirer noticed the process was stalled, so
    /// heartbeats may wait unread in the socket).
    pub resync: Arc<Notify>,
}

#[derive(PartialEq, Eq)]
enum Phase {
    Running,
    /// Cancelled: flushing statuses in flight until the deadline.
    Draining,
    /// The offline presence is queued; waiting for its PUBACK.
    Leaving,
    /// DISCONNECT queued.
    Disconnecting,
}

struct Limiters {
    invalid: LogLimiter,
    too_large: LogLimiter,
    held_full: LogLimiter,
    connection: LogLimiter,
    refused: LogLimiter,
}

impl MqttTask {
    pub async fn run(mut self, token: CancellationToken) {
        let instance = self.cfg.client_id.clone();
        let (client, mut eventloop) = client(ConnectOptions {
            cfg: &self.cfg,
            client_id: instance.clone(),
            persistent: self.cfg.persistent_session(),
            will: Some((
                instance_topic(&instance),
                presence_payload(false, &instance, 0),
            )),
            inflight: INFLIGHT as u16,
            // A shared-subscription member that stops must lose its share soon (the broker
            // drops it after 1.5 × keep-alive), well within the floor lease.
            keep_alive: if self.cfg.shared_group.is_some() {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(15)
            },
        });
        let sync = sync_topic(&instance);
        let mut filters = vec![
            self.cfg.heartbeat_filter(),
            sync.clone(),
            BROKER_TOPIC.to_owned(),
        ];
        // After a ConnAck without session: `Some(seen)` until the sync marker is back, `seen`
        // once the broker's retained marker arrived (it kept its retained messages).
        let mut broker_check: Option<bool> = None;
        let mut share = self
            .cfg
            .shared_group
            .as_ref()
            .map(|group| Share::new(group, &instance));
        if share.is_some() {
            // The other replicas' presence (a will tells at once that one is gone), and
            // their beacons (which of them reach Redis).
            filters.push(instance_topic("+"));
            filters.push(beacon_topic(
                self.cfg.shared_group.as_deref().unwrap_or_default(),
                "+",
            ));
        }
        let limiters = Limiters {
            invalid: LogLimiter::new(Duration::from_secs(10)),
            too_large: LogLimiter::new(Duration::from_secs(10)),
            held_full: LogLimiter::new(Duration::from_secs(10)),
            connection: LogLimiter::new(Duration::from_secs(30)),
            refused: LogLimiter::new(Duration::from_secs(10)),
        };

        let mut tracker = Tracker::default();
        let mut resend: VecDeque<Outgoing> = VecDeque::new();
        let mut connected = false;
        let mut marker: Option<(Bytes, Instant)> = None;
        // Short: with a shared subscription (clean sessions) heartbeats sent while no replica is
        // connected are dropped by the broker, so reconnecting fast after a broker restart matters.
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let mut phase = Phase::Running;
        let mut drain_deadline = Instant::now();
        let mut out_open = true;
        // How heartbeats received now are stamped (see `Stamp`): live, unless a backlog
        // queued while we were away is being delivered (until the sync marker is back).
        let mut stamp = Stamp::OnTime;
        // The last time the broker refused a connection while we were disconnected.
        let mut refused_at: Option<Millis> = None;
        // The last heartbeat received while a marker is outstanding: a backlog still
        // draining keeps the gate closed, however long it takes.
        let mut progress = Instant::now();
        // Our own stall detector: a timer firing far too late means the process was stopped
        // and heartbeats may wait unread in the socket.
        let mut watch_at = Instant::now() + WATCHDOG;

        loop {
            // Move what must be sent again into the client first, in order.
            while connected && phase != Phase::Disconnecting && tracker.len() < INFLIGHT {
                let Some(out) = resend.pop_front() else { break };
                if client
                    .try_publish(&out.topic, out.retain, out.payload.clone())
                    .is_err()
                {
                    resend.push_front(out);
                    break;
                }
                tracker.queue(out);
            }

            // Shutdown progress.
            if phase == Phase::Draining {
                let flushed = tracker.len() == 0 && resend.is_empty() && self.out_rx.is_empty();
                if !connected || flushed || Instant::now() >= drain_deadline {
                    if connected {
                        let out = Outgoing {
                            topic: instance_topic(&instance),
                            payload: presence_payload(false, &instance, 0),
                            retain: true,
                            kind: Kind::Presence,
                        };
                        if client
                            .try_publish(&out.topic, true, out.payload.clone())
                            .is_ok()
                        {
                            tracker.queue(out);
                        }
                        phase = Phase::Leaving;
                        drain_deadline =
                            drain_deadline.max(Instant::now()) + Duration::from_secs(1);
                    } else {
                        break;
                    }
                }
            }
            if phase == Phase::Leaving && (tracker.len() == 0 || Instant::now() >= drain_deadline) {
                let _ = client.try_disconnect();
                phase = Phase::Disconnecting;
                drain_deadline = Instant::now() + Duration::from_secs(1);
            }

            let can_take = connected
                && out_open
                && matches!(phase, Phase::Running | Phase::Draining)
                && tracker.len() < INFLIGHT
                && resend.is_empty();
            let sync_timeout = marker
                .as_ref()
                .map(|(_, sent)| (*sent).max(progress) + SYNC_WAIT)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let tick = if phase == Phase::Running {
                Instant::now() + Duration::from_secs(3600)
            } else {
                Instant::now() + Duration::from_millis(50)
            };

            tokio::select! {
                biased;
                () = token.cancelled(), if phase == Phase::Running => {
                    phase = Phase::Draining;
                    drain_deadline = Instant::now() + DRAIN;
                }
                () = tokio::time::sleep_until(tick) => {
                    if phase == Phase::Disconnecting && Instant::now() >= drain_deadline {
                        break;
                    }
                }
                () = tokio::time::sleep_until(watch_at) => {
                    let late = Instant::now().saturating_duration_since(watch_at);
                    watch_at = Instant::now() + WATCHDOG;
                    if let (Some(share), true) = (share.as_mut(), connected && phase == Phase::Running) {
                        share.tick(&client, &filters[0], *self.redis_ok.borrow(), &self.health);
                    }
                    if late > STALL && connected && phase == Phase::Running && marker.is_none() {
                        warn!(late_ms = late.as_millis() as u64, "The process was stalled; heartbeats read until the sync marker is back count as on time.");
                        stamp = Stamp::OnTime;
                        let _ = self.ingest.send(None);
                        let (mark, token_bytes) = new_marker(&sync);
                        resend.push_front(mark);
                        marker = Some((token_bytes, Instant::now()));
                    }
                }
                () = self.resync.notified(), if connected && phase == Phase::Running => {
                    stamp = Stamp::OnTime;
                    let _ = self.ingest.send(None);
                    let (mark, token_bytes) = new_marker(&sync);
                    resend.push_front(mark);
                    marker = Some((token_bytes, Instant::now()));
                }
                () = tokio::time::sleep_until(sync_timeout), if marker.is_some() => {
                    warn!("Sync marker did not come back; assuming queued heartbeats were delivered.");
                    marker = None;
                    stamp = Stamp::Live;
                    self.broker_checked(broker_check.take(), &mut resend);
                    let _ = self.ingest.send(Some(now_ms()));
                }
                ev = eventloop.poll() => match ev {
                    Ok(Event::ConnAck { session_present }) => {
                        connected = true;
                        backoff.reset();
                        // What the broker queued for us while it refused our connections
                        // reached it after it came back; anything else queued, in time.
                        stamp = refused_at.take().map_or(Stamp::OnTime, Stamp::BrokerReturned);
                        info!(session_present, "Connected to the MQTT broker.");
                        if !session_present {
                            // The client dropped whatever it held; the broker may have lost
                            // retained statuses too.
                            resend.extend(
                                tracker
                                    .take_all()
                                    .into_iter()
                                    .filter(|o| matches!(o.kind, Kind::Status { .. })),
                            );
                            // Did it lose its retained statuses too? Its retained marker says.
                            broker_check = Some(false);
                        }
                        if let Some(share) = share.as_mut() {
                            share.joined();
                        }
                        if let Err(e) = client.try_subscribe_many(&filters) {
                            error!(error = %e, "Could not queue the subscription.");
                        }
                        let presence = Outgoing {
                            topic: instance_topic(&instance),
                            payload: presence_payload(true, &instance, now_ms()),
                            retain: true,
                            kind: Kind::Presence,
                        };
                        let (mark, token_bytes) = new_marker(&sync);
                        resend.push_front(mark);
                        resend.push_front(presence);
                        marker = Some((token_bytes, Instant::now()));
                    }
                    Ok(Event::SubAck { granted }) => {
                        if granted.first() == Some(&true) {
                            self.health.set_mqtt(true, true);
                            info!(filter = %filters[0], "Subscribed to heartbeats.");
                        } else {
                            error!(filter = %filters[0], "The broker refused the heartbeat subscription.");
                            self.health.set_mqtt(true, false);
                        }
                    }
                    Ok(Event::Publish { topic, .. }) if topic.as_ref() == BROKER_TOPIC.as_bytes() => {
                        if let Some(seen) = broker_check.as_mut() {
                            *seen = true;
                        }
                    }
                    Ok(Event::Publish { topic, .. }) if topic.starts_with(BEACONS.as_bytes()) => {
                        if let Some(share) = share.as_mut() {
                            share.beacon(&topic);
                        }
                    }
                    Ok(Event::Publish { topic, payload, .. }) if topic.starts_with(b"presenced/instances/") => {
                        if let Some(who) = gone_instance(&topic, &payload) {
                            // Full: the floor's lease ends it anyway.
                            let _ = self.gone.try_send(who);
                        }
                    }
                    Ok(Event::Publish { retained: true, .. }) => {
                        // A replay of a retained message because we (re)subscribed: not news.
                    }
                    Ok(Event::Publish { topic, payload, retained: false }) => {
                        if topic.as_ref() == sync.as_bytes() {
                            if marker.as_ref().is_some_and(|(t, _)| *t == payload) {
                                marker = None;
                                stamp = Stamp::Live;
                                self.broker_checked(broker_check.take(), &mut resend);
                                let _ = self.ingest.send(Some(now_ms()));
                                debug!("Queued heartbeats delivered.");
                            }
                        } else {
                            if marker.is_some() {
                                progress = Instant::now();
                            }
                            self.heartbeat(&topic, &payload, stamp, &limiters);
                        }
                    }
                    Ok(Event::Sent { pkid }) => tracker.sent(pkid),
                    Ok(Event::PubAck { pkid, ok, reason }) => {
                        let Some(out) = tracker.acked(pkid) else { continue };
                        if !ok {
                            // Not stored by the broker; the outbox lease publishes it again.
                            if let Some(n) = limiters.refused.check() {
                                error!(topic = %out.topic, %reason, suppressed = n, "The broker refused a status.");
                            }
                            continue;
                        }
                        if let Kind::Status { ack, lag_from } = out.kind {
                            if let Some(deadline) = lag_from {
                                // Both on the bucket master's clock.
                                let acked_at = self.clock.now(ack.receipt.bucket);
                                self.metrics
                                    .observe_lag(acked_at.saturating_sub(deadline) as f64 / 1000.0);
                            }
                            // Full: dropped; the outbox lease publishes it once more.
                            let _ = self.ack_tx.try_send(ack);
                        }
                    }
                    Ok(Event::Disconnected) => {
                        if phase == Phase::Disconnecting {
                            break;
                        }
                    }
                    Ok(Event::Other) => {}
                    Err(e) => {
                        if phase != Phase::Running {
                            break;
                        }
                        if matches!(e, Lost::Refused(_)) && !connected {
                            refused_at = Some(now_ms());
                        }
                        if connected {
                            warn!(error = %e, "Lost the MQTT connection; reconnecting.");
                        } else if let Some(n) = limiters.connection.check() {
                            warn!(error = %e, suppressed = n, "Cannot connect to the MQTT broker; retrying.");
                        }
                        connected = false;
                        marker = None;
                        self.health.set_mqtt(false, false);
                        let _ = self.ingest.send(None);
                        // rumqttc reconnects on the next poll, with no delay of its own.
                        tokio::select! {
                            () = token.cancelled() => break,
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    }
                },
                out = self.out_rx.recv(), if can_take => match out.map(|o| o.into_outgoing(&self.cfg.status_topic)) {
                    Some(out) => match client.try_publish(&out.topic, out.retain, out.payload.clone()) {
                        Ok(()) => tracker.queue(out),
                        Err(_) => resend.push_back(out),
                    },
                    None => out_open = false,
                },
            }
        }
        self.health.set_mqtt(false, false);
        let _ = self.ingest.send(None);
        self.held.close();
        info!("MQTT task stopped.");
    }

    /// The check after a ConnAck without session is over: without the broker's retained
    /// marker, the broker lost its retained messages (or never had ours): every device's status
    /// is republished, once for all replicas (a job in Redis), and the marker set again.
    fn broker_checked(&self, check: Option<bool>, resend: &mut VecDeque<Outgoing>) {
        if check != Some(false) {
            return;
        }
        warn!("The broker has none of our retained messages; republishing every device's status.");
        self.republish.notify_one();
        resend.push_back(Outgoing {
            topic: BROKER_TOPIC.to_owned(),
            payload: Bytes::from(format!("{:016x}", fastrand::u64(..))),
            retain: true,
            kind: Kind::Presence,
        });
    }

    /// One message on the heartbeat subscription: validated, counted, held for Redis.
    fn heartbeat(&self, topic: &[u8], payload: &[u8], stamp: Stamp, limiters: &Limiters) {
        let raw = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| self.cfg.heartbeat_topic.extract(t));
        let device = match raw.map(DeviceId::parse) {
            Some(Ok(id)) => id,
            Some(Err(e)) => {
                self.metrics.heartbeat_rejected(Rejected::InvalidId);
                if let Some(n) = limiters.invalid.check() {
                    warn!(error = %e, suppressed = n, "Rejected a heartbeat with an invalid device id.");
                }
                return;
            }
            None => {
                self.metrics.heartbeat_rejected(Rejected::InvalidId);
                if let Some(n) = limiters.invalid.check() {
                    warn!(
                        suppressed = n,
                        "Rejected a message whose topic does not match the heartbeat topic."
                    );
                }
                return;
            }
        };
        if payload.len() > self.cfg.max_packet_size {
            self.metrics.heartbeat_rejected(Rejected::TooLarge);
            if let Some(n) = limiters.too_large.check() {
                warn!(%device, bytes = payload.len(), limit = self.cfg.max_packet_size, suppressed = n, "Rejected an oversized heartbeat.");
            }
            return;
        }
        let ttl = heartbeat_ttl(
            payload,
            self.presence.ttl,
            self.presence.min_ttl,
            self.presence.max_ttl,
        );
        if self.held.insert(device, ttl, stamp) {
            self.metrics.heartbeat_accepted();
        } else if let Some(n) = limiters.held_full.check() {
            error!(
                suppressed = n,
                "Heartbeats held for Redis are at their limit; dropping new devices' heartbeats."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(n: u8) -> Outgoing {
        Outgoing {
            topic: format!("t{n}"),
            payload: Bytes::new(),
            retain: false,
            kind: Kind::Presence,
        }
    }

    #[test]
    fn tracker_matches_in_order_and_ignores_retransmissions() {
        let mut t = Tracker::default();
        t.queue(out(1));
        t.queue(out(2));
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
        use rumqttc::{Event as E, Incoming as I, PubAck, Publish};
        let mut t = Tracker::default();
        t.queue(out(1));
        t.queue(out(2));
        t.sent(1);
        let mut buffered: VecDeque<E> = VecDeque::from([
            E::Outgoing(LoopOutgoing::Publish(2)),
            E::Incoming(I::PubAck(PubAck::new(1))),
            E::Incoming(I::Publish(Publish::new(
                "devices/x/heartbeat",
                QoS::AtLeastOnce,
                "",
            ))),
        ]);
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

    /// The adapter applies it: after a ConnAck without session the v3.1.1 loop's buffered
    /// `Outgoing::Publish`/PUBACK events are gone (a heartbeat stays); with a session they
    /// still name publishes in flight and are kept.
    #[tokio::test]
    async fn v311_connack_without_session_drops_buffered_publish_events() {
        use rumqttc::{Event as E, Incoming as I, PubAck, Publish};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for session_present in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let broker = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await.unwrap(); // CONNECT
                s.write_all(&[0x20, 0x02, u8::from(session_present), 0x00])
                    .await
                    .unwrap();
                s
            });
            let opts = rumqttc::MqttOptions::new("t", "127.0.0.1", port);
            let mut l = rumqttc::EventLoop::new(opts, 10);
            l.state.events.extend([
                E::Outgoing(LoopOutgoing::Publish(2)),
                E::Incoming(I::PubAck(PubAck::new(1))),
                E::Incoming(I::Publish(Publish::new(
                    "devices/x/heartbeat",
                    QoS::AtLeastOnce,
                    "",
                ))),
            ]);
            let mut l = EventLoop::V4(Box::new(l));
            let ev = l.poll().await.unwrap();
            assert!(matches!(ev, Event::ConnAck { session_present: p } if p == session_present));
            let next = l.poll().await.unwrap();
            if session_present {
                assert!(matches!(next, Event::Sent { pkid: 2 }), "{next:?}");
            } else {
                assert!(matches!(next, Event::Publish { .. }), "{next:?}");
            }
            drop(broker.await.unwrap());
        }
    }
}
