//! The keyspace-notification listeners: the fast path from Redis's `expired` events to
//! offline decisions.
//!
//! Notifications are local to a node, so there is one node listener per Redis node: one for
//! a single Redis; in a cluster, one per node (masters and replicas: a replica emits nothing,
//! but when it is promoted we are already subscribed), kept in step with the topology, which
//! is read from `CLUSTER NODES` every second.
//!
//! A node listener owns a dedicated pub/sub connection. On every (re)connection to a master
//! it checks that the server is recent enough ([`crate::redis_version`]); it then subscribes
//! to the `expired` keyevent channel, makes sure `notify-keyspace-events` has `E` and `x` (or
//! proves with a probe key that events arrive), and asks for reconciliation, since events
//! published while it was away are lost for good; so does a replica that becomes master. It
//! never decides anything itself: it maps keys to device ids and hands them on. It never
//! blocks on a full queue either: an event it drops is found by the deadline sweep, which
//! never depended on it.
//!
//! The parts (this file only declares them; they import one another in one direction):
//! * `listener`: the task `lib.rs` starts (`Listener`): one node, or the topology.
//! * `topology`: one node listener per cluster node, following the topology.
//! * `node`: one node's listener: its sessions (connect, check, subscribe, forward).
//! * `check`: whether a node is fit to be listened to (version, notifications, the probe),
//!   and why not ([`Refused`]).

mod check;
mod listener;
mod node;
mod topology;

pub use check::{NotificationsOff, Refused};
pub(crate) use listener::{Listener, Nodes};
