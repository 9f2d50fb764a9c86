//! What the session publishes at QoS 1, rendered: a device status (from a [`StatusOut`]:
//! topic and payload are built only when it is sent), the monitor's presence, the sync
//! marker and the broker's retained marker. Pure: it must not publish.

use bytes::Bytes;

use super::client::Retain;
use super::topics::{instance_topic, BROKER_TOPIC};
use crate::device::{format_time, Millis, State, TopicTemplate};
use crate::group_status::GroupTopic;
use crate::status::{Delivered, Lag, Outbound, StatusOut};

/// Where statuses go: `mqtt.status_topic` and `mqtt.group_topic`.
#[derive(Clone, Debug)]
pub(super) struct StatusTopics {
    pub(super) device: TopicTemplate,
    pub(super) group: GroupTopic,
}

/// Something to publish, QoS 1.
#[derive(Clone, Debug)]
pub(super) struct Outgoing {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) retain: Retain,
    pub(super) kind: Kind,
}

#[derive(Clone, Debug)]
pub(super) enum Kind {
    /// A device status; `lag_from` is the TTL deadline of an offline transition, for the
    /// lag histogram.
    Status {
        ack: Delivered,
        lag_from: Option<Millis>,
    },
    /// The monitor's own presence (and the broker's retained marker).
    Presence,
    /// The sync marker (see `sync::SyncMarker`).
    Marker,
}

impl Outgoing {
    /// A device's status (or a group's outage status), retained. A forgotten device's clear
    /// is an empty retained message, and no transition: no lag is observed for it.
    pub(super) fn status(status: StatusOut, topics: &StatusTopics) -> Outgoing {
        let (subject, seq) = status.event.subject();
        let (topic, payload, lag_from) = match &status.event {
            Outbound::Device(event) => {
                let clear = event.is_clear();
                let offline = status.lag == Lag::Observe && event.state == State::Offline;
                let payload = if clear {
                    Bytes::new()
                } else {
                    event.to_json().into()
                };
                let lag_from = (offline && !clear).then_some(event.since);
                (topics.device.render(&event.device), payload, lag_from)
            }
            Outbound::Group(g) => (topics.group.render(&g.group), g.to_json().into(), None),
        };
        Outgoing {
            topic,
            payload,
            retain: Retain::Yes,
            kind: Kind::Status {
                ack: Delivered {
                    receipt: status.receipt,
                    subject,
                    seq,
                },
                lag_from,
            },
        }
    }

    /// This replica is online since `since`, retained.
    pub(super) fn online(instance: &str, since: Millis) -> Outgoing {
        let v = serde_json::json!({"state": "online", "instance": instance, "since": format_time(since)});
        Outgoing::presence(instance_topic(instance), Bytes::from(v.to_string()))
    }

    /// This replica is going away, retained (a clean disconnect does not fire the will).
    pub(super) fn offline(instance: &str) -> Outgoing {
        Outgoing::presence(instance_topic(instance), offline_payload(instance))
    }

    /// A fresh broker marker, retained (see [`BROKER_TOPIC`]).
    pub(super) fn broker_marker() -> Outgoing {
        Outgoing::presence(BROKER_TOPIC.to_owned(), token())
    }

    /// A sync marker with a fresh token, not retained; the token is what comes back.
    pub(super) fn marker(topic: &str) -> (Outgoing, Bytes) {
        let token = token();
        let out = Outgoing {
            topic: topic.to_owned(),
            payload: token.clone(),
            retain: Retain::No,
            kind: Kind::Marker,
        };
        (out, token)
    }

    fn presence(topic: String, payload: Bytes) -> Outgoing {
        Outgoing {
            topic,
            payload,
            retain: Retain::Yes,
            kind: Kind::Presence,
        }
    }
}

/// The presence that says a replica is offline: its will, and what it publishes leaving.
pub(super) fn offline_payload(instance: &str) -> Bytes {
    let v = serde_json::json!({"state": "offline", "instance": instance});
    Bytes::from(v.to_string())
}

fn token() -> Bytes {
    Bytes::from(format!("{:016x}", fastrand::u64(..)))
}
