//! How a client connects: options for v5 or v3.1.1 (session, credentials, will, packet
//! sizes), TLS from the system's CA store. Builds a client and its event loop; it must not
//! poll or connect (nothing happens until the event loop is polled).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};

use super::client::{Client, Qos};
use super::events::EventLoop;
use crate::config::{MqttConfig, Protocol, MQTT_MAX_PACKET};

/// Session expiry asked for with v5 (the interface promises at least 1 hour).
const SESSION_EXPIRY_S: u32 = 24 * 3600;

/// Whether the broker keeps the session (subscriptions, queued messages) across
/// connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionMode {
    /// Kept (v5: with a session expiry of [`SESSION_EXPIRY_S`]): what is queued while we
    /// are away is delivered when we are back.
    Persistent,
    /// A new session on every connection.
    Clean,
}

/// How a client connects.
pub(crate) struct ConnectOptions<'a> {
    pub(crate) cfg: &'a MqttConfig,
    pub(crate) client_id: String,
    pub(crate) session: SessionMode,
    /// `(topic, payload)` of a retained QoS 1 last will.
    pub(crate) will: Option<(String, Bytes)>,
    pub(crate) inflight: u16,
    pub(crate) keep_alive: Duration,
}

impl ConnectOptions<'_> {
    /// `(username, password)` when a username is configured (the password may be empty).
    fn credentials(&self) -> Option<(String, String)> {
        let user = self.cfg.username.clone()?;
        let pass = self.cfg.password.as_ref().map(|p| p.0.clone());
        Some((user, pass.unwrap_or_default()))
    }
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
pub(crate) fn client(o: ConnectOptions<'_>) -> (Client, EventLoop) {
    match o.cfg.protocol {
        Protocol::V5 => v5(o),
        Protocol::V311 => v4(o),
    }
}

/// Room in the request channel: the publishes in flight and a few requests more.
fn capacity(o: &ConnectOptions<'_>) -> usize {
    usize::from(o.inflight) + 16
}

/// rumqttc's packet-id space: twice our window of publishes in flight. rumqttc hands out
/// ids round-robin within its inflight limit, SUBSCRIBEs included, and with the space equal
/// to the window a new publish can get the id of one still unacknowledged: rumqttc then parks
/// it (a "collision") outside its replay state, so a connection reset can lose it or send a
/// later request first, and PUBACKs pair with the wrong publishes. With twice the room, the
/// id handed out next is always free (at most one window is outstanding).
fn id_space(o: &ConnectOptions<'_>) -> u16 {
    o.inflight.saturating_mul(2)
}

/// Either protocol's `MqttOptions` (two types without a common trait) with what both set
/// the same way: client id, address, keep-alive, credentials, TLS.
macro_rules! options {
    ($options:ty, $o:ident) => {{
        let url = &$o.cfg.url;
        let mut opts = <$options>::new($o.client_id.clone(), url.host.clone(), url.port);
        opts.set_keep_alive($o.keep_alive);
        if let Some((user, pass)) = $o.credentials() {
            opts.set_credentials(user, pass);
        }
        if url.tls {
            opts.set_transport(tls_transport());
        }
        opts
    }};
}

fn v5(mut o: ConnectOptions<'_>) -> (Client, EventLoop) {
    use rumqttc::v5::{mqttbytes::v5::LastWill, MqttOptions};
    let mut opts = options!(MqttOptions, o);
    let persistent = o.session == SessionMode::Persistent;
    opts.set_clean_start(!persistent)
        .set_outgoing_inflight_upper_limit(id_space(&o))
        // Announced on purpose, at the protocol maximum: without it rumqttc refuses packets
        // over 10 KiB; a smaller announced size makes mosquitto silently drop larger
        // messages yet keep them in flight, which stalls the session. Oversized heartbeats
        // are counted and skipped by us instead.
        .set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
    if persistent {
        opts.set_session_expiry_interval(Some(SESSION_EXPIRY_S));
    }
    if let Some((topic, payload)) = o.will.take() {
        let qos = Qos::AtLeastOnce.v5();
        opts.set_last_will(LastWill::new(topic, payload.to_vec(), qos, true, None));
    }
    let (c, l) = rumqttc::v5::AsyncClient::new(opts, capacity(&o));
    (Client::V5(c), EventLoop::V5(Box::new(l)))
}

fn v4(mut o: ConnectOptions<'_>) -> (Client, EventLoop) {
    use rumqttc::{LastWill, MqttOptions};
    let mut opts = options!(MqttOptions, o);
    opts.set_clean_session(o.session == SessionMode::Clean)
        .set_inflight(id_space(&o))
        // Above anything a broker can send (see `v5`).
        .set_max_packet_size(MQTT_MAX_PACKET + 16, MQTT_MAX_PACKET + 16);
    if let Some((topic, payload)) = o.will.take() {
        let qos = Qos::AtLeastOnce.v4();
        opts.set_last_will(LastWill::new(topic, payload.to_vec(), qos, true));
    }
    let (c, l) = rumqttc::AsyncClient::new(opts, capacity(&o));
    (Client::V4(c), EventLoop::V4(Box::new(l)))
}
