//! The queued marker: before the session (re)connects, a short-lived client of our own puts
//! a marker on our sync topic, so that the broker queues it in our persistent session
//! behind every heartbeat it queued while we were away. Brokers deliver a session's queue
//! in order, but not all of them deliver it before what is published after the reconnect
//! (Aedes streams the queue while new messages pass it), so the marker published after the
//! CONNACK alone cannot prove the backlog is in; this one can. It only publishes: what the
//! marker's return means is `sync`'s business.

use std::time::Duration;

use bytes::Bytes;

use super::client::{Qos, Retain};
use super::connect::{client, ConnectOptions, SessionMode};
use super::events::Event;
use crate::config::MqttConfig;

/// The longest the marker may take to be stored (the reconnect waits for it).
const PUT_WAIT: Duration = Duration::from_secs(2);

/// Publishes a fresh marker to `topic` (QoS 1) and returns its token once the broker
/// acknowledged it; `None` if it could not (the broker is away: then the session's own
/// marker is all there is).
pub(super) async fn put(cfg: &MqttConfig, topic: &str) -> Option<Bytes> {
    let token = Bytes::from(format!("{:016x}", fastrand::u64(..)));
    let (client, mut eventloop) = client(ConnectOptions {
        cfg,
        client_id: format!("{}-sync-{:08x}", cfg.client_id, fastrand::u32(..)),
        session: SessionMode::Clean,
        will: None,
        inflight: 10,
        keep_alive: Duration::from_secs(5),
    });
    let stored = tokio::time::timeout(PUT_WAIT, async {
        loop {
            match eventloop.poll().await.ok()? {
                Event::ConnAck { .. } => {
                    let payload = token.clone();
                    client
                        .try_publish(topic, Qos::AtLeastOnce, Retain::No, payload)
                        .ok()?;
                }
                Event::PubAck { ok, .. } => return Some(ok),
                _ => {}
            }
        }
    })
    .await;
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Disconnected) {
                    break;
                }
            }
        })
        .await;
    }
    matches!(stored, Ok(Some(true))).then_some(token)
}
