//! Whether a node is fit to be listened to: a master must run a Redis recent enough for the
//! scripts ([`crate::redis_version`]) and publish `expired` events (`notify-keyspace-events`
//! set, or proven by a probe key). Only checks and reports: it must not decide what a node
//! listener does about a refusal.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubStream};
use redis::{ConnectionInfo, ErrorKind, RedisError};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tracing::{debug, info};

use crate::cluster;
use crate::device::DeviceId;
use crate::redis_version::{self, CheckError, Unsupported};
use crate::store::{self, Configure, Keys, NotifyConfig, StoreError};

/// How long the probe waits for its key's `expired` event (up to 5 s, ARCHITECTURE.md,
/// *Notifications setup*).
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// How long the version check waits for `INFO server`.
const VERSION_WAIT: Duration = Duration::from_secs(5);
/// How long the probe key lives.
const PROBE_TTL: Duration = Duration::from_millis(100);
/// How often the probe key is read while its event is awaited.
const PROBE_TOUCH: Duration = Duration::from_millis(250);

/// Keyspace notifications are off and could not be turned on.
#[derive(Debug, thiserror::Error)]
#[error("Redis keyspace notifications are off: notify-keyspace-events must contain E and x (e.g. `CONFIG SET notify-keyspace-events Ex`, or the parameter group of a managed Redis); {reason}")]
pub struct NotificationsOff {
    pub reason: String,
}

/// Why a node is not fit to be listened to: at start the monitor refuses to run; later the
/// node's listener logs it, stays unready and tries again.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    NotificationsOff(#[from] NotificationsOff),
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
}

/// Why the probe proved nothing.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("no probe key fits the node's slots")]
    NoKey,
    #[error("probe key could not be written: {0}")]
    Write(#[from] StoreError),
    #[error("no expired event for probe key {key} within {wait:?}", wait = PROBE_WAIT)]
    NoEvent { key: String },
    #[error("connection closed during the probe")]
    Closed,
}

/// A node's role as the listener sees it; a master carries its slots (for the probe key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Master(Vec<(u16, u16)>),
    Replica,
}

impl Role {
    /// The role a cluster node plays for us: a master only while it serves slots and is not
    /// failing.
    pub(crate) fn of(node: &cluster::Node) -> Role {
        if node.serves_slots() && !node.failing {
            Role::Master(node.slots.clone())
        } else {
            Role::Replica
        }
    }
}

/// A node, with what its checks need; it also forwards the `expired` events it sees.
pub(crate) struct Target {
    pub(crate) info: ConnectionInfo,
    pub(crate) keys: Keys,
    pub(crate) configure: Configure,
    /// Devices whose TTL key expired. Bounded; overflow is dropped (see the module docs).
    pub(crate) expired_tx: mpsc::Sender<DeviceId>,
}

impl Target {
    /// Hands on the device of an `expired` event (if it is one of our TTL keys). A full
    /// queue drops it: the deadline sweep covers this device.
    pub(crate) fn forward(&self, key: &[u8]) {
        if let Some(id) = self.keys.parse_ttl_key(key) {
            let _ = self.expired_tx.try_send(id);
        }
    }

    /// A master must run a Redis recent enough for the scripts; a replica runs none of them
    /// and is checked when it is promoted (a rolling upgrade upgrades replicas first).
    pub(crate) async fn check_version(
        &self,
        conn: &mut MultiplexedConnection,
        role: &Role,
    ) -> Result<(), CheckError> {
        if let Role::Replica = role {
            return Ok(());
        }
        let addr = self.info.addr().to_string();
        let version = timeout(VERSION_WAIT, redis_version::check(conn, &addr))
            .await
            .map_err(|_| RedisError::from((ErrorKind::Io, "INFO server timed out")))??;
        debug!(%version, "Redis version supported.");
        Ok(())
    }

    /// Makes sure the node publishes `expired` events. A master must (or the check fails);
    /// a replica is configured if possible, so that it notifies from its first moment as a
    /// master, but it publishes nothing now, so nothing is proven.
    pub(crate) async fn check(
        &self,
        conn: &mut MultiplexedConnection,
        stream: &mut PubSubStream,
        role: &Role,
    ) -> Result<(), NotificationsOff> {
        match store::ensure_notifications(conn, self.configure).await {
            NotifyConfig::AlreadyOn => Ok(()),
            NotifyConfig::Enabled { from } => {
                info!(previous = %from, "Enabled E and x in notify-keyspace-events.");
                Ok(())
            }
            NotifyConfig::Unknown { reason } => match role {
                Role::Replica => {
                    debug!(%reason, "Notifications not confirmed on a replica; checked again if it is promoted.");
                    Ok(())
                }
                Role::Master(slots) => {
                    debug!(%reason, "Probing for keyspace notifications.");
                    self.probe(conn, stream, slots)
                        .await
                        .map_err(|e| NotificationsOff {
                            reason: format!("{reason}; {e}"),
                        })
                }
            },
        }
    }

    /// Writes a short-lived key on this node and waits for its `expired` event.
    async fn probe(
        &self,
        conn: &mut MultiplexedConnection,
        stream: &mut PubSubStream,
        slots: &[(u16, u16)],
    ) -> Result<(), ProbeError> {
        // In a cluster the key must hash to one of this master's slots.
        let tag = if slots.is_empty() {
            None
        } else {
            Some(cluster::tag_in(slots).ok_or(ProbeError::NoKey)?)
        };
        let key = self.keys.probe(tag.as_deref());
        store::write_probe(conn, &key, PROBE_TTL).await?;
        let deadline = Instant::now() + PROBE_WAIT;
        let mut touch = tokio::time::interval(PROBE_TOUCH);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return Err(ProbeError::NoEvent { key }),
                _ = touch.tick() => {
                    // Makes Redis delete the key (and notify) as soon as it is overdue.
                    let _ = store::touch(conn, &key).await;
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Err(ProbeError::Closed);
                    };
                    if msg.get_payload_bytes() == key.as_bytes() {
                        return Ok(());
                    }
                    self.forward(msg.get_payload_bytes());
                }
            }
        }
    }
}
