//! What can go wrong talking to the broker, for either protocol: a request the client could
//! not queue, a connection that failed or was lost. Owns the error type only; it must not
//! decide what to do about an error (the callers log, retry or give up).

/// An MQTT error, with rumqttc's own error as its source (boxed: rumqttc's errors are
/// large, a rejected request travels inside them).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's request channel is full or its event loop is gone.
    #[error(transparent)]
    Request(Box<rumqttc::ClientError>),
    #[error(transparent)]
    RequestV5(Box<rumqttc::v5::ClientError>),
    /// The connection failed or was lost; polling again reconnects.
    #[error(transparent)]
    Connection(Box<rumqttc::ConnectionError>),
    #[error(transparent)]
    ConnectionV5(Box<rumqttc::v5::ConnectionError>),
    /// No ConnAck in time (`check-config`).
    #[error("connect timed out")]
    ConnectTimeout,
}

/// `?` on a rumqttc result boxes its error into the variant.
macro_rules! from_boxed {
    ($($variant:ident: $source:ty),+ $(,)?) => {$(
        impl From<$source> for Error {
            fn from(e: $source) -> Error {
                Error::$variant(Box::new(e))
            }
        }
    )+};
}

from_boxed! {
    Request: rumqttc::ClientError,
    RequestV5: rumqttc::v5::ClientError,
    Connection: rumqttc::ConnectionError,
    ConnectionV5: rumqttc::v5::ConnectionError,
}

impl Error {
    /// Nothing listens at the broker's address: the broker is down, so devices cannot
    /// reach it either (what they send is queued only once it is back).
    pub(crate) fn is_refused(&self) -> bool {
        let io = match self {
            Error::Connection(e) => match e.as_ref() {
                rumqttc::ConnectionError::Io(io) => io,
                _ => return false,
            },
            Error::ConnectionV5(e) => match e.as_ref() {
                rumqttc::v5::ConnectionError::Io(io) => io,
                _ => return false,
            },
            _ => return false,
        };
        io.kind() == std::io::ErrorKind::ConnectionRefused
    }

    /// A v5 connection the broker closed before its CONNACK: what a broker that speaks
    /// only MQTT 3.1.1 does (RabbitMQ before 3.13, for one). The hint for the log.
    pub(crate) fn hint(&self) -> Option<&'static str> {
        use rumqttc::v5::{ConnectionError as C, StateError as S};
        match self {
            Error::ConnectionV5(e) if matches!(e.as_ref(), C::MqttState(S::ConnectionAborted)) => {
                Some("the broker closed the connection before its CONNACK: if it speaks only MQTT 3.1.1, set mqtt.protocol = \"v3.1.1\"")
            }
            _ => None,
        }
    }
}
