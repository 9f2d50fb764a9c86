//! `presenced` tells, within milliseconds, which devices of a fleet are online and which
//! went silent: MQTT heartbeats refresh per-device TTLs in Redis, expiries become retained
//! `offline` statuses over MQTT, and a Prometheus endpoint shows the fleet.
//!
//! Start with `ARCHITECTURE.md` at the repository root: the data flow, the Redis key layout,
//! and the invariants behind "no transition lost, none duplicated". The modules:
//!
//! * [`config`]: the contract's configuration keys, from file, environment and flags.
//! * [`device`]: pure domain types (ids, topics, payloads, records); no I/O.
//! * [`store`]: every Redis command and Lua script; the key layout.
//! * `expiry`: the keyspace-notification listeners (the fast path), one per Redis node.
//! * [`redis_version`]: the oldest supported Redis (6.2) and the check against it.
//! * [`cluster`]: Redis Cluster topology (`CLUSTER NODES`) and key slots, for the listeners.
//! * `presence`: where transitions are decided: heartbeats, deadlines, reconciliation,
//!   the outbox.
//! * `forget`: forgets devices offline for longer than `presence.forget_after`.
//! * `mqtt`: all MQTT I/O: heartbeat ingest and acknowledged status publishing.
//! * `rebuild`: notices a Redis that lost its data and rebuilds it from the retained
//!   statuses on the broker.
//! * `http`: `/metrics`, `/healthz`, `/readyz`, `/devices`, `/groups`, `/events` (the event
//!   stream) and `/` (the status page).
//! * [`event_log`]: the event log behind `/events`, as values (retention, places in it).
//! * `instances`: the running replicas, from their retained presence on the broker.
//! * [`metrics`], `health`, [`telemetry`]: what operators see.
//! * [`simulate`]: the fleet simulator behind `presenced simulate`.
//! * [`check`]: `presenced check-config`, the read-only checks of Redis and the broker.
//! * [`flap`], [`will`]: the flapping rule and what a will is (pure).
//! * [`bucket`], [`beat`], `held`, [`status`]: the values the tasks hand each other (the
//!   fleet's partition, heartbeats as received and as applied, statuses to publish).
//!
//! [`run`] wires them together and owns the shutdown order.

pub mod beat;
pub(crate) mod broker;
pub mod bucket;
pub mod check;
pub(crate) mod clock;
pub mod cluster;
pub mod config;
pub mod device;
pub mod event_log;
pub(crate) mod expiry;
pub mod flap;
pub(crate) mod forget;
pub mod group_status;
pub(crate) mod health;
pub(crate) mod held;
pub(crate) mod http;
pub(crate) mod instances;
pub mod metrics;
pub(crate) mod mqtt;
pub(crate) mod presence;
pub(crate) mod pulse;
pub(crate) mod rebuild;
pub mod redis_version;
pub mod shutdown;
pub mod simulate;
mod startup;
pub mod status;
pub mod store;
mod supervisor;
pub mod telemetry;
pub mod will;
mod wiring;

use std::future::Future;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::config::Config;
use crate::expiry::{NotificationsOff, Refused};
use crate::redis_version::Unsupported;
use crate::startup::{Base, StartError};
use crate::store::StoreError;
use crate::supervisor::{Stopped, Supervisor, TaskPanicked};

/// How long a shutdown may take before the remaining tasks are abandoned. Deployments keep
/// their stop timeouts (systemd `TimeoutStopSec`, Kubernetes
/// `terminationGracePeriodSeconds`) above it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the monitor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    NotificationsOff(#[from] NotificationsOff),
    #[error(transparent)]
    RedisUnsupported(#[from] Unsupported),
    /// The HTTP address, the metrics or the Redis handles could not be set up.
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("redis: {0}")]
    Redis(#[from] StoreError),
    #[error("mqtt: {0}")]
    Mqtt(#[from] mqtt::Error),
    #[error("mqtt: {0} ({1})")]
    MqttHint(mqtt::Error, &'static str),
    /// The broker lacks a feature the configuration needs (`check-config`).
    #[error("{0}")]
    BrokerUnsupported(&'static str),
    /// A task panicked: the monitor stopped rather than run without it.
    #[error("task '{task}' panicked: {message}")]
    TaskPanicked { task: &'static str, message: String },
    /// The keyspace listener ended before it could tell whether Redis is usable.
    #[error("the keyspace listener stopped before its first check of Redis")]
    ListenerGone,
}

impl From<Refused> for Error {
    fn from(r: Refused) -> Error {
        match r {
            Refused::NotificationsOff(e) => Error::NotificationsOff(e),
            Refused::Unsupported(e) => Error::RedisUnsupported(e),
        }
    }
}

impl From<TaskPanicked> for Error {
    fn from(p: TaskPanicked) -> Error {
        Error::TaskPanicked {
            task: p.task,
            message: p.message,
        }
    }
}

/// Why the monitor is ending: what [`teardown`] reports after stopping everything.
enum End {
    /// Asked to shut down (the future given to [`run`] completed).
    ShutDown,
    /// Redis is refused (too old, no notifications), or the listener vanished.
    Refused(Error),
    Panicked(TaskPanicked),
}

/// The two groups of tasks. Two, because the HTTP server stops last (it reports health
/// until the end).
struct Groups {
    workers: Supervisor,
    web: Supervisor,
}

impl Groups {
    /// Whichever comes first: the shutdown, or a panic in either group.
    async fn until_end(&mut self, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> End {
        tokio::select! {
            () = shutdown => End::ShutDown,
            p = self.workers.panicked() => End::Panicked(p),
            p = self.web.panicked() => End::Panicked(p),
        }
    }

    /// Like [`Groups::until_end`], but first waits for the keyspace listener's first check
    /// of Redis: `None` when Redis is usable.
    async fn until_redis_usable(
        &mut self,
        first: &mut tokio::sync::oneshot::Receiver<Result<(), Refused>>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Option<End> {
        tokio::select! {
            r = first => match r {
                Ok(Ok(())) => None,
                Ok(Err(refused)) => Some(End::Refused(refused.into())),
                // A listener that panicked drops its sender too: the panic is the better
                // explanation, and the teardown reports it.
                Err(_) => Some(End::Refused(Error::ListenerGone)),
            },
            end = self.until_end(shutdown) => Some(end),
        }
    }
}

/// Runs the monitor until `shutdown` completes, then shuts down in order: inputs stop,
/// held heartbeats are applied, statuses in flight are flushed and the monitor's own
/// `offline` presence is published, then the HTTP server stops.
///
/// Fails at start if the HTTP address cannot be bound, Redis is older than 6.2, or keyspace
/// notifications are off and cannot be enabled; every later outage is survived (reconnect
/// and reconcile). A task that panics stops the monitor the same orderly way, as far as the
/// others can go without it, and `run` returns [`Error::TaskPanicked`].
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let base = Base::open(cfg).await?;
    let mut groups = Groups {
        workers: Supervisor::new(),
        web: Supervisor::new(),
    };
    tokio::pin!(shutdown);
    let (common, nodes) = wiring::spawn_http(base, &mut groups.web);
    let mut redis = wiring::spawn_redis_side(&common, nodes, &mut groups.workers);
    let end = match groups
        .until_redis_usable(&mut redis.first, &mut shutdown)
        .await
    {
        Some(end) => end,
        None => {
            wiring::spawn_workers(&common, redis, &mut groups.workers).await;
            groups.until_end(&mut shutdown).await
        }
    };
    teardown(end, groups).await
}

/// The one way out of [`run`]: stops every task (bounded), then reports why it ended. A
/// panic seen while stopping turns a clean end into an error; after a panic, another one
/// is only logged.
async fn teardown(end: End, groups: Groups) -> Result<(), Error> {
    match end {
        End::ShutDown => {
            info!("Shutting down.");
            let stopped = stop(groups).await;
            info!("Stopped.");
            stopped
        }
        End::Refused(e) => stop(groups).await.and(Err(e)),
        End::Panicked(p) => {
            error!(task = p.task, panic = %p.message, "A task panicked; stopping the monitor.");
            if let Err(Error::TaskPanicked { task, message }) = stop(groups).await {
                warn!(task, panic = %message, "Another task panicked while stopping.");
            }
            Err(p.into())
        }
    }
}

/// Stops the workers, then the HTTP server, each bounded. A panic seen meanwhile makes it
/// an error.
async fn stop(groups: Groups) -> Result<(), Error> {
    let workers = groups.workers.stop(SHUTDOWN_GRACE).await;
    if let Ok(Stopped::TimedOut { running }) = &workers {
        warn!(grace = ?SHUTDOWN_GRACE, ?running, "Graceful shutdown timed out; exiting anyway.");
    }
    // The server bounds its own drain (1 s); this only guards against a wedged one.
    let web = groups.web.stop(Duration::from_secs(3)).await;
    workers?;
    web?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Notify;

    use super::*;

    /// After a panic the other tasks, the HTTP server included, are stopped, and `run`'s
    /// error names the task.
    #[tokio::test]
    async fn a_panic_stops_everything_and_names_the_task() {
        let mut workers = Supervisor::new();
        let mut web = Supervisor::new();
        let (mqtt_stopped, http_stopped) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        for (sup, name, stopped) in [
            (&mut workers, "mqtt", mqtt_stopped.clone()),
            (&mut web, "http", http_stopped.clone()),
        ] {
            let token = sup.token().child_token();
            sup.spawn(name, async move {
                token.cancelled().await;
                stopped.notify_one();
            });
        }
        workers.spawn("applier", async { panic!("boom") });
        let p = workers.panicked().await;
        let e = teardown(End::Panicked(p), Groups { workers, web }).await;
        assert!(
            matches!(&e, Err(Error::TaskPanicked { task: "applier", message }) if message == "boom"),
            "{e:?}"
        );
        assert_eq!(
            e.map_err(|e| e.to_string()),
            Err("task 'applier' panicked: boom".to_owned())
        );
        // Both were cancelled and ran to their end (their notification is stored).
        mqtt_stopped.notified().await;
        http_stopped.notified().await;
    }
}
