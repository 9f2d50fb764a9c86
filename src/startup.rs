//! What `run` sets up before any task starts: the HTTP socket, the metrics and health every
//! task shares, and the lazy Redis handles (one Redis or a cluster).
//!
//! It must not spawn tasks (that is `wiring`) nor wait for Redis: nothing here blocks on a
//! server, so a monitor started before its Redis still answers `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Config, RedisConfig};
use crate::expiry::Nodes;
use crate::health::Health;
use crate::http::EventHub;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Why the monitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("redis: {0}")]
    Redis(#[from] StoreError),
}

/// What every task is given a clone of.
#[derive(Clone)]
pub(crate) struct Common {
    pub(crate) cfg: Arc<Config>,
    pub(crate) metrics: Metrics,
    pub(crate) health: Arc<Health>,
    /// The command store, under this replica's floor name when replicas share a group.
    pub(crate) store: Store,
    /// The event log's feed: `/events` clients follow it from the start, the `events` task
    /// runs it once Redis is usable.
    pub(crate) events: Arc<EventHub>,
}

/// What the tasks are built from.
pub(crate) struct Base {
    pub(crate) common: Common,
    /// The Redis nodes whose keyspace notifications the listener follows.
    pub(crate) nodes: Nodes,
    /// The HTTP socket, bound.
    pub(crate) listener: TcpListener,
}

impl Base {
    /// Binds the HTTP address and opens Redis lazily (nothing waits for Redis here: the
    /// keyspace listener retries until it can subscribe).
    pub(crate) async fn open(cfg: Config) -> Result<Base, StartError> {
        let cfg = Arc::new(cfg);
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry, cfg.groups.max_series)?;
        let health = Arc::new(Health::new(metrics.clone()));
        let listener =
            TcpListener::bind(cfg.http.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: cfg.http.listen,
                    source,
                })?;
        info!(
            version = env!("CARGO_PKG_VERSION"),
            http = %cfg.http.listen,
            instance = %cfg.mqtt.client_id,
            "Starting presenced."
        );
        let (store, nodes) = open_redis(&cfg.redis)?;
        // With a shared subscription this replica keeps a floor under its name (see
        // `presence::Stamper`); the scripts skip our own floor.
        let store = match &cfg.mqtt.shared_group {
            Some(_) => store.for_replica(&cfg.mqtt.client_id),
            None => store,
        }
        .with_flap(cfg.presence.flap)
        .with_events(cfg.http.events);
        let common = Common {
            cfg,
            metrics,
            health,
            store,
            events: Arc::default(),
        };
        Ok(Base {
            common,
            nodes,
            listener,
        })
    }
}

/// The command store and the nodes to listen to, for one Redis or a cluster.
fn open_redis(cfg: &RedisConfig) -> Result<(Store, Nodes), StoreError> {
    match seed_urls(cfg) {
        None => {
            let client = redis::Client::open(cfg.url.0.as_str())?;
            let store = Store::lazy(&client, &cfg.key_prefix)?;
            Ok((
                store,
                Nodes::Single(Box::new(client.get_connection_info().clone())),
            ))
        }
        Some(urls) => {
            let store = Store::lazy_cluster(&urls, &cfg.key_prefix)?;
            Ok((store, Nodes::Cluster(seed_infos(&urls)?)))
        }
    }
}

/// The cluster seed URLs as given (`None` for a single Redis).
pub(crate) fn seed_urls(cfg: &RedisConfig) -> Option<Vec<String>> {
    cfg.cluster_nodes
        .as_ref()
        .map(|seeds| seeds.iter().map(|s| s.0.clone()).collect())
}

/// The connection settings of each seed URL.
pub(crate) fn seed_infos(urls: &[String]) -> Result<Vec<redis::ConnectionInfo>, StoreError> {
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
pub(crate) async fn watch_redis(store: Store, health: Arc<Health>, token: CancellationToken) {
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
