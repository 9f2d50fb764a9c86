//! MQTT clients of the tests: a status collector, a heartbeat publisher.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;

/// One message seen by a [`Collector`].
#[derive(Clone, Debug)]
pub struct Seen {
    pub topic: String,
    pub json: Value,
    pub retain: bool,
    pub at: Instant,
    pub at_ms: u64,
}

/// Subscribes (QoS 1) and records every message; ready once the SubAck arrived.
pub struct Collector {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(mqtt: &impl Broker, filter: &str) -> Collector {
        Self::start_many(mqtt, &[filter.to_owned()]).await
    }

    /// [`Collector::start`] on several filters (one SUBSCRIBE): on a broker that sends
    /// retained messages to exact topics only, a late subscriber names each topic.
    pub async fn start_many(mqtt: &impl Broker, filters: &[String]) -> Collector {
        Self::start_with(mqtt, filters, false).await
    }

    /// [`Collector::start`] with a persistent session: what is published while the broker
    /// is down (and this client reconnecting) waits for it, so it misses no status across a
    /// broker restart that keeps sessions.
    pub async fn start_durable(mqtt: &impl Broker, filter: &str) -> Collector {
        Self::start_with(mqtt, &[filter.to_owned()], true).await
    }

    async fn start_with(mqtt: &impl Broker, filters: &[String], durable: bool) -> Collector {
        let mut opts = MqttOptions::new(
            format!("collector-{:08x}", fastrand::u32(..)),
            "127.0.0.1",
            mqtt.port(),
        );
        opts.set_max_packet_size(1 << 20, 1 << 20)
            .set_clean_session(!durable);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let s = seen.clone();
        let c = client.clone();
        let filters: Vec<rumqttc::SubscribeFilter> = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    // Subscribe on every connection: a restarted broker forgot us.
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = c.try_subscribe_many(filters.clone());
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        // Stamped before anything else, so lock contention with readers
                        // does not show up as latency.
                        let (at, at_ms) = (Instant::now(), presenced::device::now_ms());
                        let json = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let seen = Seen {
                            topic: p.topic.clone(),
                            json,
                            retain: p.retain,
                            at,
                            at_ms,
                        };
                        s.lock().unwrap().push(seen);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("collector SubAck")
            .unwrap();
        Collector { seen, client, task }
    }

    /// How many messages seen so far satisfy `pred` (without copying them).
    pub fn count(&self, pred: impl Fn(&Seen) -> bool) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| pred(s)).count()
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Status messages of one device, in arrival order.
    pub fn device(&self, id: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|s| s.json["device"] == id)
            .map(|s| s.json)
            .collect()
    }

    /// Waits until `pred` holds over everything seen so far.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) {
        eventually(what, || async { pred(&self.all()).then_some(()) }).await;
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A device-side MQTT client that publishes heartbeats (QoS 1).
pub struct Devices {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Devices {
    pub async fn connect(mqtt: &impl Broker) -> Devices {
        let mut opts = MqttOptions::new(
            format!("devices-{:08x}", fastrand::u32(..)),
            "127.0.0.1",
            mqtt.port(),
        );
        opts.set_max_packet_size(4 << 20, 4 << 20).set_inflight(200);
        let (client, mut el) = AsyncClient::new(opts, 1000);
        let task = tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Devices { client, task }
    }

    pub async fn heartbeat(&self, id: &str, payload: &[u8]) {
        self.client
            .publish(
                format!("devices/{id}/heartbeat"),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .await
            .unwrap();
    }

    pub async fn publish_retained(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
            .await
            .unwrap();
    }

    pub async fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps `ids` heartbeating every `every` until the returned token is cancelled.
pub fn keep_beating(devices: Arc<Devices>, ids: Vec<String>, every: Duration) -> CancellationToken {
    let beats = ids
        .iter()
        .map(|id| (format!("devices/{id}/heartbeat"), Vec::new()))
        .collect();
    keep_publishing(devices, beats, every)
}

/// Keeps publishing `beats` (topic, payload) every `every` until the returned token is
/// cancelled.
pub fn keep_publishing(
    devices: Arc<Devices>,
    beats: Vec<(String, Vec<u8>)>,
    every: Duration,
) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        loop {
            for (topic, payload) in &beats {
                devices.publish(topic, payload).await;
            }
            tokio::select! {
                () = t.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    token
}

/// Waits until every device in `ids` shows two statuses, then checks they are exactly seq 1
/// online and seq 2 offline (after dedupe).
pub async fn wait_online_then_offline(statuses: &Collector, ids: &[String]) {
    eventually("every device online then offline", || async {
        ids.iter()
            .all(|id| history(&statuses.device(id)).len() == 2)
            .then_some(())
    })
    .await;
    for id in ids {
        assert_eq!(
            history(&statuses.device(id)),
            vec![(1, "online".into()), (2, "offline".into())],
            "{id}"
        );
    }
}

/// A device's own connection with a will on `devices/<id>/will` (payload `offline`), as a
/// real device registers it; connected. Its event loop runs in the returned task: aborting
/// it drops the socket without DISCONNECT, so the broker publishes the will.
pub async fn device_with_will(
    mqtt: &impl Broker,
    id: &str,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(format!("dev-{id}"), "127.0.0.1", mqtt.port());
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_last_will(rumqttc::LastWill::new(
        format!("devices/{id}/will"),
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut el) = AsyncClient::new(opts, 10);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("device ConnAck")
        .unwrap();
    (client, task)
}
