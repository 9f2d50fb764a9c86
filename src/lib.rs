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
//! * [`cluster`]: Redis Cluster topology (`CLUSTER NODES`) and key slots, for the listeners.
//! * [`presence`]: where transitions are decided: heartbeats, deadlines, reconciliation,
//!   the outbox.
//! * [`forget`]: forgets devices offline for longer than `presence.forget_after`.
//! * [`mqtt`]: all MQTT I/O: heartbeat ingest and acknowledged status publishing.
//! * [`http`]: `/metrics`, `/healthz`, `/readyz`, `/devices`.
//! * [`metrics`], [`health`], [`telemetry`]: what operators see.
//! * [`simulate`]: the fleet simulator behind `presenced simulate`.
//!
//! [`run`] wires them together and owns the shutdown order.

pub mod clock;
pub mod cluster;
pub mod config;
pub mod device;
pub mod expiry;
pub mod forget;
pub mod health;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod shutdown;
pub mod simulate;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::config::Config;
use crate::expiry::{Listener, Nodes, NotificationsOff};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::mqtt::MqttTask;
use crate::presence::{Applier, DueTable, Expirer, Held, Outbox, Stamper, HELD_CAP};
use crate::store::{Store, StoreError};

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
}

/// Runs the monitor until `shutdown` completes, then shuts down in order: inputs stop,
/// held heartbeats are applied, statuses in flight are flushed and the monitor's own
/// `offline` presence is published, then the HTTP server stops.
///
/// Fails at start if the HTTP address cannot be bound or keyspace notifications are off and
/// cannot be enabled; every later outage is survived (reconnect and reconcile).
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

    let token = CancellationToken::new();
    let http_token = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);

    // Lazy: nothing waits for Redis here. The listener below retries until it can subscribe.
    let (store, nodes) = open_redis(&cfg.redis)?;

    // HTTP first, so /healthz answers and /readyz explains while the rest starts (a
    // liveness probe must not kill a monitor that is waiting for Redis).
    let api = http::Api {
        store: store.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
    };
    let http_task = tokio::spawn(
        http::serve(listener, api, http_token.clone()).instrument(tracing::info_span!("http")),
    );

    let reconcile = Arc::new(Notify::new());
    let (expired_tx, expired_rx) = mpsc::channel(EXPIRED_QUEUE);
    let (first_tx, first_rx) = oneshot::channel();
    tracker.spawn(
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
    tracker.spawn(
        watch_redis(store.clone(), health.clone(), token.child_token())
            .instrument(tracing::info_span!("redis")),
    );
    let first = tokio::select! {
        r = first_rx => Some(r.unwrap_or(Ok(()))),
        () = &mut shutdown => None,
    };
    match first {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            token.cancel();
            http_token.cancel();
            let _ = http_task.await;
            return Err(e.into());
        }
        None => {
            token.cancel();
            tracker.close();
            tracker.wait().await;
            http_token.cancel();
            let _ = http_task.await;
            return Ok(());
        }
    }

    let held = Arc::new(Held::new(HELD_CAP));
    let due = Arc::new(DueTable::default());
    let (out_tx, out_rx) = mpsc::channel(STATUS_QUEUE);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
    let (ingest_tx, ingest_rx) = watch::channel(None);
    let republish = Arc::new(Notify::new());
    let resync = Arc::new(Notify::new());

    let (gone_tx, gone_rx) = mpsc::channel(GONE_QUEUE);
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
    };
    stamper.first(device::now_ms()).await;
    tracker.spawn(
        stamper
            .run(token.child_token())
            .instrument(tracing::info_span!("clock")),
    );
    tracker.spawn(
        MqttTask {
            cfg: cfg.mqtt.clone(),
            presence: cfg.presence.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            held: held.clone(),
            clock: store.clock().clone(),
            gone: gone_tx,
            out_rx,
            ack_tx,
            republish: republish.clone(),
            ingest: ingest_tx,
            resync: resync.clone(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("mqtt")),
    );
    tracker.spawn(
        Applier {
            store: store.clone(),
            held: held.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            out: out_tx.clone(),
            due: due.clone(),
            recent: Default::default(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("applier")),
    );
    tracker.spawn(
        Expirer {
            store: store.clone(),
            held: held.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            out: out_tx.clone(),
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
        tracker.spawn(
            forget::Forgetter {
                store: store.clone(),
                held: held.clone(),
                metrics: metrics.clone(),
                out: out_tx.clone(),
                ingest: ingest_rx.clone(),
                after,
                floor_lease: FLOOR_LEASE.max(cfg.presence.ttl / 2),
            }
            .run(token.child_token())
            .instrument(tracing::info_span!("forget")),
        );
    }
    tracker.spawn(
        Outbox {
            store: store.clone(),
            out: out_tx,
            ack_rx,
            republish,
        }
        .run(token.child_token(), tracker.clone())
        .instrument(tracing::info_span!("outbox")),
    );

    shutdown.await;
    info!("Shutting down.");
    token.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "Graceful shutdown timed out; exiting anyway.");
    }
    http_token.cancel();
    let _ = http_task.await;
    info!("Stopped.");
    Ok(())
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
    let timed_out = || Error::Redis(StoreError::Protocol("connect timed out".into()));
    // Read-only: check-config never changes the server's configuration.
    let describe = |node: &str, found: store::NotifyConfig| match found {
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
    };
    match &cfg.redis.cluster_nodes {
        None => {
            let client = redis::Client::open(cfg.redis.url.0.as_str()).map_err(StoreError::from)?;
            let store = tokio::time::timeout(
                Duration::from_secs(5),
                Store::connect(&client, &cfg.redis.key_prefix),
            )
            .await
            .map_err(|_| timed_out())??;
            store.ping().await?;
            report.push("redis: reachable".into());
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(StoreError::from)?;
            report.push(describe(
                "",
                store::ensure_notifications(&mut conn, false).await,
            ));
        }
        Some(seeds) => {
            let urls: Vec<String> = seeds.iter().map(|s| s.0.clone()).collect();
            let store = tokio::time::timeout(
                Duration::from_secs(5),
                Store::connect_cluster(&urls, &cfg.redis.key_prefix),
            )
            .await
            .map_err(|_| timed_out())??;
            store.ping().await?;
            let infos = seed_infos(&urls)?;
            let topology = cluster::discover(&infos)
                .await
                .map_err(|e| Error::Redis(StoreError::Protocol(e)))?;
            let masters: Vec<_> = topology.iter().filter(|n| n.serves_slots()).collect();
            report.push(format!(
                "redis: cluster reachable ({} masters, {} nodes)",
                masters.len(),
                topology.len()
            ));
            for node in masters {
                let info = cluster::node_info(&infos[0], &node.host, node.port);
                let client = redis::Client::open(info).map_err(StoreError::from)?;
                let mut conn = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.get_multiplexed_async_connection(),
                )
                .await
                .map_err(|_| timed_out())?
                .map_err(StoreError::from)?;
                let found = store::ensure_notifications(&mut conn, false).await;
                report.push(describe(&format!("master {}: ", node.addr()), found));
            }
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
