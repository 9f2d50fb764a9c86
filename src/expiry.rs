//! The keyspace-notification listener: the fast path from Redis's `expired` events to
//! offline decisions.
//!
//! It owns a dedicated pub/sub connection. On every (re)connection it subscribes to the
//! `expired` keyevent channel, makes sure `notify-keyspace-events` has `E` and `x` (or
//! proves with a probe key that events arrive), and asks for reconciliation, since events
//! published while it was away are lost for good. It never decides anything itself: it maps
//! keys to device ids and hands them on. It never blocks on a full queue either: an event it
//! drops is found by the deadline sweep, which never depended on it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::device::DeviceId;
use crate::health::Health;
use crate::store::{NotifyConfig, Store};
use crate::telemetry::{Backoff, LogLimiter};

/// How long the probe waits for its key's `expired` event (contract: up to 5 s).
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// How often the listener pings Redis to notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Keyspace notifications are off and could not be turned on.
#[derive(Debug, thiserror::Error)]
#[error("Redis keyspace notifications are off: notify-keyspace-events must contain E and x (e.g. `CONFIG SET notify-keyspace-events Ex`, or the parameter group of a managed Redis); {reason}")]
pub struct NotificationsOff {
    pub reason: String,
}

pub struct Listener {
    pub client: redis::Client,
    pub store: Store,
    pub configure: bool,
    pub health: Arc<Health>,
    /// Devices whose TTL key expired. Bounded; overflow is dropped (see module docs).
    pub expired_tx: mpsc::Sender<DeviceId>,
    /// Woken after every (re)subscription: something may have expired unseen.
    pub reconcile: Arc<Notify>,
}

impl Listener {
    /// Runs until cancelled. The first connection's notification check is reported through
    /// `first`: the monitor refuses to start without notifications.
    pub async fn run(
        self,
        token: CancellationToken,
        first: oneshot::Sender<Result<(), NotificationsOff>>,
    ) {
        let mut first = Some(first);
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let limiter = LogLimiter::new(Duration::from_secs(30));
        let channel = format!(
            "__keyevent@{}__:expired",
            self.client.get_connection_info().redis_settings().db()
        );
        loop {
            let result = tokio::select! {
                () = token.cancelled() => return,
                r = self.session(&channel, &token, &mut first, &mut backoff) => r,
            };
            self.health.set_redis_listener(false);
            match result {
                Ok(()) => return,
                Err(e) => {
                    if let Some(n) = limiter.check() {
                        warn!(error = %e, suppressed = n, "Keyspace listener disconnected; reconnecting.");
                    }
                }
            }
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One connection's life: connect, subscribe, check notifications, forward events.
    /// Returns `Ok` only when cancelled.
    async fn session(
        &self,
        channel: &str,
        token: &CancellationToken,
        first: &mut Option<oneshot::Sender<Result<(), NotificationsOff>>>,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        let pubsub = timeout(Duration::from_secs(5), self.client.get_async_pubsub())
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (mut sink, mut stream) = pubsub.split();
        sink.subscribe(channel).await.map_err(|e| e.to_string())?;

        // Subscribed first, so that the probe's event (if one is needed) cannot be missed.
        let check = match self.store.ensure_notifications(self.configure).await {
            NotifyConfig::AlreadyOn => Ok(()),
            NotifyConfig::Enabled { from } => {
                info!(previous = %from, "Enabled E and x in notify-keyspace-events.");
                Ok(())
            }
            NotifyConfig::Unknown { reason } => {
                debug!(%reason, "Probing for keyspace notifications.");
                self.probe(&mut stream).await.map_err(|e| NotificationsOff {
                    reason: format!("{reason}; {e}"),
                })
            }
        };
        let first_connection = first.is_some();
        match (first.take(), check) {
            (Some(tx), check) => {
                let failed = check.is_err();
                let _ = tx.send(check);
                if failed {
                    return Ok(());
                }
            }
            (None, Ok(())) => {}
            (None, Err(e)) => {
                // Later on (Redis restarted without our setting and CONFIG is refused) the
                // monitor keeps working on deadlines alone; it says so loudly and stays unready.
                error!(error = %e, "Keyspace notifications are off after a reconnect; offline detection relies on the deadline sweep alone.");
                return Err(e.to_string());
            }
        }

        self.health.set_redis_listener(true);
        backoff.reset();
        if !first_connection {
            // Events published while we were away are gone for good.
            self.reconcile.notify_one();
        }
        info!(%channel, "Listening for expired keys.");

        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Err("connection closed".into());
                    };
                    if let Some(id) = self.store.keys().parse_ttl_key(msg.get_payload_bytes()) {
                        // Full queue: drop; the deadline sweep covers this device.
                        let _ = self.expired_tx.try_send(id);
                    }
                }
                _ = ping.tick() => {
                    match timeout(Duration::from_secs(3), sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(format!("ping failed: {e}")),
                        Err(_) => return Err("ping timed out".into()),
                    }
                }
            }
        }
    }

    /// Writes a short-lived key and waits for its `expired` event.
    async fn probe(&self, stream: &mut redis::aio::PubSubStream) -> Result<(), String> {
        let key = self
            .store
            .write_probe(Duration::from_millis(100))
            .await
            .map_err(|e| format!("probe key could not be written: {e}"))?;
        let deadline = Instant::now() + PROBE_WAIT;
        let mut touch = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    return Err(format!("no expired event for probe key {key} within {PROBE_WAIT:?}"));
                }
                _ = touch.tick() => {
                    // Makes Redis delete the key (and notify) as soon as it is overdue.
                    let _ = self.store.touch(&key).await;
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Err("connection closed during the probe".into());
                    };
                    if msg.get_payload_bytes() == key.as_bytes() {
                        return Ok(());
                    }
                    if let Some(id) = self.store.keys().parse_ttl_key(msg.get_payload_bytes()) {
                        let _ = self.expired_tx.try_send(id);
                    }
                }
            }
        }
    }
}
