//! All MQTT I/O: connection options (v5 or v3.1.1, TLS, credentials, will), the one task
//! that polls the event loop, heartbeat parsing at the edge, and a publisher that knows
//! when the broker acknowledged each status. It knows nothing of Redis.
//!
//! * [`client`], [`connect`], [`events`], [`error`]: the adapter over rumqttc's v5 and
//!   v3.1.1 clients (requests, connect options and TLS, protocol-neutral events, errors);
//!   used by the session, the rebuilder, `check-config` and the simulator.
//! * [`session`]: the MQTT task ([`MqttTask`]), one handler per event;
//! * [`drain`]: the shutdown sequence (flush, offline presence, disconnect);
//! * [`ingest`]: heartbeats validated and held for Redis;
//! * [`queued`]: the marker put into our own offline queue before each reconnect;
//! * [`sync`]: the sync marker, how heartbeats are stamped until it is back, the broker's
//!   retained marker check;
//! * [`tracker`]: PUBACKs matched to the publishes they acknowledge;
//! * [`outgoing`]: what is published (statuses, presence, markers), rendered;
//! * [`probe`]: what the broker cannot do (shared subscriptions, retained messages to
//!   wildcards, retain, QoS 1), tried with messages of our own;
//! * [`share`]: membership of the shared subscription, the peers' beacons and presence;
//! * [`topics`]: the monitor's own topics.
//!
//! This file only declares and re-exports; the modules import one another directly, and
//! none imports this one.

mod client;
mod connect;
mod drain;
mod error;
mod events;
mod ingest;
mod outgoing;
mod probe;
mod queued;
mod session;
mod share;
mod sync;
mod topics;
mod tracker;

pub(crate) use client::{Client, Qos, Retain};
pub(crate) use connect::{client, ConnectOptions, SessionMode};
pub use error::Error;
pub(crate) use events::{Event, EventLoop};
pub(crate) use probe::probe;
pub(crate) use session::MqttTask;
