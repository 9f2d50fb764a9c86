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
//! * [`expiry`]: the keyspace-notification listeners (the fast path), one per Redis node.
//! * [`redis_version`]: the oldest supported Redis (6.2) and the check against it.
//! * [`cluster`]: Redis Cluster topology (`CLUSTER NODES`) and key slots, for the listeners.
//! * [`presence`]: where transitions are decided: heartbeats, deadlines, reconciliation,
//!   the outbox.
//! * [`forget`]: forgets devices offline for longer than `presence.forget_after`.
//! * [`mqtt`]: all MQTT I/O: heartbeat ingest and acknowledged status publishing.
//! * [`rebuild`]: notices a Redis that lost its data and rebuilds it from the retained
//!   statuses on the broker.
//! * [`http`]: `/metrics`, `/healthz`, `/readyz`, `/devices`.
//! * [`metrics`], [`health`], [`telemetry`]: what operators see.
//! * [`simulate`]: the fleet simulator behind `presenced simulate`.
//!
//! [`run`] wires them together and owns the shutdown order.

pub mod beat;
pub mod bucket;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod device;
pub mod expiry;
pub mod forget;
pub mod health;
pub mod held;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod rebuild;
pub mod redis_version;
pub mod shutdown;
pub mod simulate;
pub mod status;
pub mod store;
mod supervisor;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::config::Config;
use crate::expiry::{Listener, Nodes, NotificationsOff, Refused};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::mqtt::MqttTask;
use crate::held::{Held, HELD_CAP};
use crate::presence::{Applier, CommitOrder, DueTable, Expirer, Outbox, Stamper};
use crate::redis_version::{CheckError, RedisVersion, Unsupported};
use crate::store::{Store, StoreError};
use crate::supervisor::{Stopped, Supervisor, TaskPanicked};

/// How long a shutdown may take before the remaining tasks are abandoned. Deployments keep
/// their stop timeouts (systemd `TimeoutStopSec`, Kubernetes
/// `terminationGracePeriodSeconds`) above it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a replica's floor stands without renewal before the others take it for gone
/// (at least; half the TTL when that is longer). Above the broker's keep-alive timeout for a
/// shared-subscription member (1.5 × 5 s), so that a stopped replica's share of heartbeats
/// has moved to the living ones before its floor is ignored.
const FLOOR_LEASE: Duration = Duration::from_secs(12);

/// Capacity of the channel of statuses to publish (backpressure on the deciders). Large
/// enough that a mass expiry is decided at Redis speed, not at broker speed; an entry is a
/// few hundred bytes.
const STATUS_QUEUE: usize = 65_536;
/// Capacity of the channel of broker acknowledgements (overflow: dropped, see `Outbox`).
const ACK_QUEUE: usize = 16_384;
/// Capacity of the channel of replicas seen gone (overflow: their floors lapse instead).
const GONE_QUEUE: usize = 64;
/// Capacity of the channel of expired-key events (overflow: dropped, see `expiry`).
const EXPIRED_QUEUE: usize = 16_384;

/// Why the monitor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    NotificationsOff(#[from] NotificationsOff),
    #[error(transparent)]
    RedisUnsupported(#[from] Unsupported),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] StoreError),
    #[error("mqtt: {0}")]
    Mqtt(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
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

/// How the wait for the keyspace listener's first check ended.
enum Start {
    /// Redis is usable: start the rest.
    Go,
    /// Redis is refused (too old, no notifications), or the listener vanished.
    Refused(Error),
    /// Asked to shut down while waiting.
    ShutDown,
    Panicked(TaskPanicked),
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
    let cfg = Arc::new(cfg);
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry)?;
    let health = Arc::new(Health::new(metrics.clone()));
    let listener = TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: cfg.http.listen,
            source,
        })?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        http = %cfg.http.listen,
        instance = %cfg.mqtt.client_id,
        "Starting presenced."
    );

    // Two groups, because the HTTP server stops last (it reports health until the end).
    let mut workers = Supervisor::new();
    let mut web = Supervisor::new();
    tokio::pin!(shutdown);

    // Lazy: nothing waits for Redis here. The listener below retries until it can subscribe.
    let (store, nodes) = open_redis(&cfg.redis)?;
    // With a shared subscription this replica keeps a floor under its name (see
    // `presence::Stamper`); the scripts skip our own floor.
    let store = match &cfg.mqtt.shared_group {
        Some(_) => store.for_replica(&cfg.mqtt.client_id),
        None => store,
    };

    // HTTP first, so /healthz answers and /readyz explains while the rest starts (a
    // liveness probe must not kill a monitor that is waiting for Redis).
    let api = http::Api {
        store: store.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        auth: cfg.http.auth.clone(),
    };
    let http_token = web.token().child_token();
    web.spawn(
        "http",
        http::serve(listener, api, http_token).instrument(tracing::info_span!("http")),
    );

    let reconcile = Arc::new(Notify::new());
    let (expired_tx, expired_rx) = mpsc::channel(EXPIRED_QUEUE);
    let (first_tx, first_rx) = oneshot::channel();
    let token = workers.token().clone();
    workers.spawn(
        "expiry",
        Listener {
            nodes,
            keys: store.keys().clone(),
            configure: cfg.redis.configure_notifications,
            health: health.clone(),
            expired_tx,
            reconcile: reconcile.clone(),
        }
        .run(token.child_token(), first_tx)
        .instrument(tracing::info_span!("expiry")),
    );
    workers.spawn(
        "redis",
        watch_redis(store.clone(), health.clone(), token.child_token())
            .instrument(tracing::info_span!("redis")),
    );
    let start = tokio::select! {
        r = first_rx => match r {
            Ok(Ok(())) => Start::Go,
            Ok(Err(refused)) => Start::Refused(refused.into()),
            // A listener that panicked drops its sender too: the panic is the better
            // explanation, and `stop` below reports it.
            Err(_) => Start::Refused(Error::ListenerGone),
        },
        () = &mut shutdown => Start::ShutDown,
        p = workers.panicked() => Start::Panicked(p),
        p = web.panicked() => Start::Panicked(p),
    };
    match start {
        Start::Go => {}
        Start::ShutDown => return stop(workers, web).await,
        Start::Refused(e) => return stop(workers, web).await.and(Err(e)),
        Start::Panicked(p) => return panicked(p, workers, web).await,
    }

    let held = Arc::new(Held::new(HELD_CAP));
    let due = Arc::new(DueTable::default());
    let order = CommitOrder::default();
    let (out_tx, out_rx) = mpsc::channel(STATUS_QUEUE);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
    let (ingest_tx, ingest_rx) = watch::channel(None);
    let republish = Arc::new(Notify::new());
    let resync = Arc::new(Notify::new());

    let (gone_tx, gone_rx) = mpsc::channel(GONE_QUEUE);
    let (redis_ok_tx, redis_ok_rx) = watch::channel(true);
    let stamper = Stamper {
        store: store.clone(),
        held: held.clone(),
        floor_of: cfg
            .mqtt
            .shared_group
            .as_ref()
            .map(|_| cfg.mqtt.client_id.clone()),
        ingest: ingest_rx.clone(),
        resync: resync.clone(),
        gone: gone_rx,
        redis_ok: redis_ok_tx,
    };
    stamper.first(device::now_ms()).await;
    workers.spawn(
        "clock",
        stamper
            .run(token.child_token())
            .instrument(tracing::info_span!("clock")),
    );
    let mqtt = MqttTask {
        cfg: cfg.mqtt.clone(),
        presence: cfg.presence.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        held: held.clone(),
        clock: store.clock().clone(),
        gone: gone_tx,
        redis_ok: redis_ok_rx,
        out_rx,
        ack_tx,
        republish: republish.clone(),
        ingest: ingest_tx,
        resync: resync.clone(),
    };
    let closer = CloseOnDrop(held.clone());
    let mqtt_token = token.child_token();
    workers.spawn(
        "mqtt",
        async move {
            // However the MQTT task ends (a panic included), no heartbeat comes any more:
            // the applier must not wait for one.
            let _closer = closer;
            mqtt.run(mqtt_token).await;
        }
        .instrument(tracing::info_span!("mqtt")),
    );
    workers.spawn(
        "applier",
        Applier {
            store: store.clone(),
            held: held.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            out: out_tx.clone(),
            order: order.clone(),
            due: due.clone(),
            recent: Default::default(),
            floor_lease: FLOOR_LEASE.max(cfg.presence.ttl / 2),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("applier")),
    );
    workers.spawn(
        "rebuild",
        rebuild::Rebuilder {
            store: store.clone(),
            mqtt: cfg.mqtt.clone(),
            ttl: cfg.presence.ttl,
            metrics: metrics.clone(),
            reconcile: reconcile.clone(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("rebuild")),
    );
    workers.spawn(
        "expirer",
        Expirer {
            store: store.clone(),
            held: held.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            out: out_tx.clone(),
            order: order.clone(),
            due,
            expired_rx,
            reconcile,
            ingest: ingest_rx.clone(),
            resync: resync.clone(),
            floor_lease: FLOOR_LEASE.max(cfg.presence.ttl / 2),
            floor_wait: tokio::time::Instant::now(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("expirer")),
    );
    if let Some(after) = cfg.presence.forget_after {
        workers.spawn(
            "forget",
            forget::Forgetter {
                store: store.clone(),
                held: held.clone(),
                metrics: metrics.clone(),
                out: out_tx.clone(),
                order: order.clone(),
                ingest: ingest_rx.clone(),
                after,
                floor_lease: FLOOR_LEASE.max(cfg.presence.ttl / 2),
            }
            .run(token.child_token())
            .instrument(tracing::info_span!("forget")),
        );
    }
    workers.spawn(
        "outbox",
        Outbox {
            store: store.clone(),
            out: out_tx,
            ack_rx,
            republish,
            instance: cfg.mqtt.client_id.clone(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("outbox")),
    );

    let panic = tokio::select! {
        () = &mut shutdown => None,
        p = workers.panicked() => Some(p),
        p = web.panicked() => Some(p),
    };
    match panic {
        None => {
            info!("Shutting down.");
            let stopped = stop(workers, web).await;
            info!("Stopped.");
            stopped
        }
        Some(p) => panicked(p, workers, web).await,
    }
}

/// Closes [`Held`] when dropped.
struct CloseOnDrop(Arc<Held>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Stops the workers, then the HTTP server, each bounded. A panic seen meanwhile makes it
/// an error.
async fn stop(workers: Supervisor, web: Supervisor) -> Result<(), Error> {
    let workers = workers.stop(SHUTDOWN_GRACE).await;
    if let Ok(Stopped::TimedOut { running }) = &workers {
        warn!(grace = ?SHUTDOWN_GRACE, ?running, "Graceful shutdown timed out; exiting anyway.");
    }
    // The server bounds its own drain (1 s); this only guards against a wedged one.
    let web = web.stop(Duration::from_secs(3)).await;
    workers?;
    web?;
    Ok(())
}

/// After a panic: stops the rest as usual (bounded) and reports the panic.
async fn panicked(p: TaskPanicked, workers: Supervisor, web: Supervisor) -> Result<(), Error> {
    error!(task = p.task, panic = %p.message, "A task panicked; stopping the monitor.");
    if let Err(Error::TaskPanicked { task, message }) = stop(workers, web).await {
        warn!(task, panic = %message, "Another task panicked while stopping.");
    }
    Err(p.into())
}

/// The command store and the nodes to listen to, for one Redis or a cluster.
fn open_redis(cfg: &config::RedisConfig) -> Result<(Store, Nodes), StoreError> {
    match &cfg.cluster_nodes {
        None => {
            let client = redis::Client::open(cfg.url.0.as_str())?;
            let store = Store::lazy(&client, &cfg.key_prefix)?;
            Ok((
                store,
                Nodes::Single(Box::new(client.get_connection_info().clone())),
            ))
        }
        Some(seeds) => {
            let urls: Vec<String> = seeds.iter().map(|s| s.0.clone()).collect();
            let store = Store::lazy_cluster(&urls, &cfg.key_prefix)?;
            Ok((store, Nodes::Cluster(seed_infos(&urls)?)))
        }
    }
}

fn seed_infos(urls: &[String]) -> Result<Vec<redis::ConnectionInfo>, StoreError> {
    urls.iter()
        .map(|u| {
            Ok(redis::Client::open(u.as_str())?
                .get_connection_info()
                .clone())
        })
        .collect()
}

/// Pings Redis every second so `presenced_redis_up` and `/readyz` follow the command
/// connection even when no heartbeat or expiry exercises it.
async fn watch_redis(store: Store, health: Arc<Health>, token: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), store.ping()).await,
                    Ok(Ok(()))
                );
                health.set_redis_commands(ok);
            }
        }
    }
}

/// What `presenced check-config` found, one line per check.
pub async fn check(cfg: &Config) -> Result<Vec<String>, Error> {
    let mut report = vec![format!("config: ok (instance {})", cfg.mqtt.client_id)];
    match &cfg.redis.cluster_nodes {
        None => check_single(cfg, &mut report).await?,
        Some(seeds) => {
            let urls: Vec<String> = seeds.iter().map(|s| s.0.clone()).collect();
            check_cluster(cfg, &urls, &mut report).await?;
        }
    }
    let (_client, mut eventloop) = mqtt::client(mqtt::ConnectOptions {
        cfg: &cfg.mqtt,
        client_id: format!("{}-check-{:08x}", cfg.mqtt.client_id, fastrand::u32(..)),
        persistent: false,
        will: None,
        inflight: 10,
        keep_alive: Duration::from_secs(5),
    });
    let connack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(mqtt::Event::ConnAck { .. }) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .map_err(|_| Error::Mqtt("connect timed out".into()))?;
    connack.map_err(|e| Error::Mqtt(e.to_string()))?;
    report.push("mqtt: reachable".into());
    Ok(report)
}

/// How long check-config waits for each Redis step.
const CHECK_WAIT: Duration = Duration::from_secs(5);

fn timed_out() -> Error {
    Error::Redis(StoreError::Protocol("connect timed out".into()))
}

impl From<CheckError> for Error {
    fn from(e: CheckError) -> Error {
        match e {
            CheckError::Unsupported(e) => Error::RedisUnsupported(e),
            CheckError::Redis(e) => Error::Redis(e.into()),
        }
    }
}

/// A connection to one node, and its version checked (first: an old Redis is named as such
/// rather than failing on whatever comes next).
async fn connect_checked(
    info: redis::ConnectionInfo,
) -> Result<(redis::aio::MultiplexedConnection, RedisVersion), Error> {
    let addr = info.addr().to_string();
    let client = redis::Client::open(info).map_err(StoreError::from)?;
    let mut conn = tokio::time::timeout(CHECK_WAIT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| timed_out())?
        .map_err(StoreError::from)?;
    let version = tokio::time::timeout(CHECK_WAIT, redis_version::check(&mut conn, &addr))
        .await
        .map_err(|_| timed_out())??;
    Ok((conn, version))
}

/// The report line on a node's notification setting. Read-only: check-config never changes
/// the server's configuration.
async fn describe_notifications(
    cfg: &Config,
    node: &str,
    conn: &mut redis::aio::MultiplexedConnection,
) -> String {
    match store::ensure_notifications(conn, false).await {
        store::NotifyConfig::AlreadyOn => {
            format!("redis: {node}notify-keyspace-events has E and x")
        }
        other => format!(
            "redis: {node}notify-keyspace-events not confirmed ({other:?}); `run` will {}",
            if cfg.redis.configure_notifications {
                "try to enable it"
            } else {
                "probe for it"
            }
        ),
    }
}

async fn check_single(cfg: &Config, report: &mut Vec<String>) -> Result<(), Error> {
    let client = redis::Client::open(cfg.redis.url.0.as_str()).map_err(StoreError::from)?;
    let (mut conn, version) = connect_checked(client.get_connection_info().clone()).await?;
    let store = tokio::time::timeout(CHECK_WAIT, Store::connect(&client, &cfg.redis.key_prefix))
        .await
        .map_err(|_| timed_out())??;
    store.ping().await?;
    report.push(format!("redis: reachable (Redis {version})"));
    report.push(describe_notifications(cfg, "", &mut conn).await);
    Ok(())
}

/// Every master that serves slots is checked: each runs the scripts of its slots.
async fn check_cluster(
    cfg: &Config,
    urls: &[String],
    report: &mut Vec<String>,
) -> Result<(), Error> {
    let infos = seed_infos(urls)?;
    let topology = cluster::discover(&infos).await.map_err(StoreError::from)?;
    let masters: Vec<_> = topology.iter().filter(|n| n.serves_slots()).collect();
    let mut checked = Vec::new();
    for node in &masters {
        let info = cluster::node_info(&infos[0], &node.host, node.port);
        let (conn, version) = connect_checked(info).await?;
        checked.push((node.addr(), conn, version));
    }
    let store = tokio::time::timeout(
        CHECK_WAIT,
        Store::connect_cluster(urls, &cfg.redis.key_prefix),
    )
    .await
    .map_err(|_| timed_out())??;
    store.ping().await?;
    report.push(format!(
        "redis: cluster reachable ({} masters, {} nodes)",
        masters.len(),
        topology.len()
    ));
    for (addr, mut conn, version) in checked {
        report.push(format!("redis: master {addr}: Redis {version}"));
        report.push(describe_notifications(cfg, &format!("master {addr}: "), &mut conn).await);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        let e = panicked(p, workers, web).await;
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
