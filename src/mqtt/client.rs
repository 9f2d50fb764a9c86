//! The client half of either protocol (v5 or v3.1.1): the requests this crate makes of the
//! broker, in protocol-neutral form. It must not wait for the broker: a `try_*` request only
//! queues, and `publish().await` waits for room in the request channel, not for a PUBACK
//! (acknowledgements are matched by the session's tracker).

use bytes::Bytes;

use super::error::Error;

/// The client of either protocol.
#[derive(Clone)]
pub(crate) enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

/// Quality of service of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Qos {
    /// For what may be lost (beacons).
    AtMostOnce,
    AtLeastOnce,
}

/// Whether the broker keeps a message for later subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retain {
    Yes,
    No,
}

impl Qos {
    pub(super) fn v4(self) -> rumqttc::QoS {
        match self {
            Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
            Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        }
    }

    pub(super) fn v5(self) -> rumqttc::v5::mqttbytes::QoS {
        match self {
            Qos::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            Qos::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        }
    }
}

impl Retain {
    fn flag(self) -> bool {
        self == Retain::Yes
    }
}

impl Client {
    /// Queues a publish without waiting; fails only if the request channel is full (or the
    /// event loop is gone).
    pub(crate) fn try_publish(
        &self,
        topic: &str,
        qos: Qos,
        retain: Retain,
        payload: Bytes,
    ) -> Result<(), Error> {
        match self {
            Client::V5(c) => c.try_publish(topic, qos.v5(), retain.flag(), payload)?,
            Client::V4(c) => c.try_publish(topic, qos.v4(), retain.flag(), payload.to_vec())?,
        }
        Ok(())
    }

    /// Publishes, not retained, waiting for room in the request channel (not for the
    /// broker).
    pub(crate) async fn publish(
        &self,
        topic: String,
        qos: Qos,
        payload: Bytes,
    ) -> Result<(), Error> {
        match self {
            Client::V5(c) => c.publish(topic, qos.v5(), false, payload).await?,
            Client::V4(c) => c.publish(topic, qos.v4(), false, payload.to_vec()).await?,
        }
        Ok(())
    }

    /// Subscribes to every filter at QoS 1, in one SUBSCRIBE (one SUBACK, in order).
    pub(crate) fn try_subscribe_many(&self, filters: &[String]) -> Result<(), Error> {
        let qos = Qos::AtLeastOnce;
        match self {
            Client::V5(c) => c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), qos.v5())),
            )?,
            Client::V4(c) => c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos.v4())),
            )?,
        }
        Ok(())
    }

    pub(crate) fn try_unsubscribe(&self, filter: &str) -> Result<(), Error> {
        match self {
            Client::V5(c) => c.try_unsubscribe(filter)?,
            Client::V4(c) => c.try_unsubscribe(filter)?,
        }
        Ok(())
    }

    pub(crate) fn try_disconnect(&self) -> Result<(), Error> {
        match self {
            Client::V5(c) => c.try_disconnect()?,
            Client::V4(c) => c.try_disconnect()?,
        }
        Ok(())
    }
}
