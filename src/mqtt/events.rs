//! The event loop of either protocol and the events this crate cares about, in
//! protocol-neutral form. It translates only: what an event means to the monitor is the
//! session's business.

use std::collections::VecDeque;

use bytes::Bytes;
use rumqttc::Outgoing as LoopOutgoing;

use super::error::Error;

/// The event loop of either protocol.
pub(crate) enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

/// The events this crate cares about, in protocol-neutral form.
#[derive(Debug)]
pub(crate) enum Event {
    ConnAck {
        session_present: bool,
        /// What a v5 broker says it offers (nothing is said in v3.1.1).
        offers: Offers,
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

/// What a v5 broker's CONNACK says it does not do (absent: it does, or did not say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Offers {
    pub(crate) shared_subscriptions: Option<bool>,
    pub(crate) retain: Option<bool>,
    pub(crate) max_qos: Option<u8>,
}

impl Event {
    fn publish(topic: Bytes, payload: Bytes, retained: bool) -> Event {
        Event::Publish {
            topic,
            payload,
            retained,
        }
    }

    /// One granted-or-not per filter, in the SUBSCRIBE's order.
    fn suback(granted: impl Iterator<Item = bool>) -> Event {
        Event::SubAck {
            granted: granted.collect(),
        }
    }
}

impl EventLoop {
    /// Polls once. An error means the connection is gone; polling again reconnects.
    pub(crate) async fn poll(&mut self) -> Result<Event, Error> {
        Ok(match self {
            EventLoop::V5(l) => from_v5(l.poll().await?),
            EventLoop::V4(l) => {
                let event = from_v4(l.poll().await?);
                if matches!(
                    event,
                    Event::ConnAck {
                        session_present: false,
                        ..
                    }
                ) {
                    drop_stale_acks(&mut l.state.events);
                }
                event
            }
        })
    }
}

fn from_v5(event: rumqttc::v5::Event) -> Event {
    use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
    use rumqttc::v5::{Event as E, Incoming as I};
    let success = |c: &SubscribeReasonCode| matches!(c, SubscribeReasonCode::Success(_));
    match event {
        E::Incoming(I::ConnAck(c)) => {
            let offers = c.properties.map_or_else(Offers::default, |p| Offers {
                shared_subscriptions: p.shared_subscription_available.map(|v| v != 0),
                retain: p.retain_available.map(|v| v != 0),
                max_qos: p.max_qos,
            });
            Event::ConnAck {
                session_present: c.session_present,
                offers,
            }
        }
        E::Incoming(I::Publish(p)) => Event::publish(p.topic, p.payload, p.retain),
        E::Incoming(I::SubAck(s)) => Event::suback(s.return_codes.iter().map(success)),
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
        E::Outgoing(LoopOutgoing::AwaitAck(pkid)) => collided(pkid),
        _ => Event::Other,
    }
}

fn from_v4(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Incoming as I, SubscribeReasonCode};
    let success = |c: &SubscribeReasonCode| matches!(c, SubscribeReasonCode::Success(_));
    match event {
        E::Incoming(I::ConnAck(c)) => Event::ConnAck {
            session_present: c.session_present,
            offers: Offers::default(),
        },
        E::Incoming(I::Publish(p)) => {
            Event::publish(Bytes::from(p.topic.into_bytes()), p.payload, p.retain)
        }
        E::Incoming(I::SubAck(s)) => Event::suback(s.return_codes.iter().map(success)),
        // v3.1.1 has no reason codes: a PUBACK is a success.
        E::Incoming(I::PubAck(a)) => Event::PubAck {
            pkid: a.pkid,
            ok: true,
            reason: String::new(),
        },
        E::Incoming(I::Disconnect) => Event::Disconnected,
        E::Outgoing(LoopOutgoing::Publish(pkid)) => Event::Sent { pkid },
        E::Outgoing(LoopOutgoing::Disconnect) => Event::Disconnected,
        E::Outgoing(LoopOutgoing::AwaitAck(pkid)) => collided(pkid),
        _ => Event::Other,
    }
}

/// rumqttc parked a publish whose packet id was still in flight: `connect::id_space` rules
/// it out, so it is a defect worth a loud line (the outbox lease still republishes).
fn collided(pkid: u16) -> Event {
    tracing::error!(
        pkid,
        "MQTT packet id collision: a status publish waits for an earlier one."
    );
    Event::Other
}

/// Events of the lost connection that name publishes of the lost session.
///
/// rumqttc 0.25's v3.1.1 event loop keeps the events buffered when a connection failed
/// (an `Outgoing::Publish` whose write failed, the PUBACKs read before the error) and
/// yields them *after* the next ConnAck (v5 yields them before it). When that ConnAck says
/// the session is gone, the client dropped those publishes and the tracker queues them
/// all again: a stale `Outgoing::Publish(pkid)` would then give the first re-queued
/// publish that pkid, and every following one its predecessor's, so PUBACKs would be
/// credited to the wrong statuses (and a status never acknowledged recorded as such).
pub(super) fn drop_stale_acks(events: &mut VecDeque<rumqttc::Event>) {
    use rumqttc::{Event as E, Incoming as I};
    events.retain(|e| {
        !matches!(
            e,
            E::Outgoing(LoopOutgoing::Publish(_)) | E::Incoming(I::PubAck(_))
        )
    });
}

/// What a v3.1.1 event loop may still hold from a lost connection: a publish written (pkid
/// 2), a PUBACK read (pkid 1), and a heartbeat.
#[cfg(test)]
pub(super) fn leftover_events() -> [rumqttc::Event; 3] {
    use rumqttc::{Event as E, Incoming as I, PubAck, Publish, QoS};
    let heartbeat = Publish::new("devices/x/heartbeat", QoS::AtLeastOnce, "");
    [
        E::Outgoing(LoopOutgoing::Publish(2)),
        E::Incoming(I::PubAck(PubAck::new(1))),
        E::Incoming(I::Publish(heartbeat)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The adapter applies it: after a ConnAck without session the v3.1.1 loop's buffered
    /// `Outgoing::Publish`/PUBACK events are gone (a heartbeat stays); with a session they
    /// still name publishes in flight and are kept.
    #[tokio::test]
    async fn v311_connack_without_session_drops_buffered_publish_events() {
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
            l.state.events.extend(leftover_events());
            let mut l = EventLoop::V4(Box::new(l));
            let ev = l.poll().await.unwrap();
            assert!(
                matches!(ev, Event::ConnAck { session_present: p, .. } if p == session_present)
            );
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
