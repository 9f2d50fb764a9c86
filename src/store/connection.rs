//! The command connection: one Redis or a Redis Cluster, replaced when it wedges.
//!
//! Owns [`Conn`] and the watch that replaces a connection no command has succeeded on for
//! [`STUCK`]. Must not know scripts, keys or replies: it carries commands, nothing more
//! (redis-rs routes each command of a cluster by its key).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::device::now_ms;

/// How long a connection may fail every command before it is replaced.
const STUCK: Duration = Duration::from_secs(3);

/// The command connection: one Redis, or a Redis Cluster (routed by each command's key).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(Arc<Watched<Single>>),
    Cluster(Arc<Watched<Cluster>>),
}

impl Conn {
    /// A connection to one Redis, made on first use.
    pub(crate) fn single(client: &redis::Client) -> RedisResult<Conn> {
        let source = Single {
            client: client.clone(),
        };
        let conn = client.get_connection_manager_lazy(Single::config())?;
        Ok(Conn::Single(Arc::new(Watched::new(source, conn))))
    }

    /// A connection to a Redis Cluster from seed node URLs, made in the background.
    ///
    /// The client follows MOVED/ASK redirections and refreshes the slot map itself; a
    /// command to a master that is failing over fails after a few quick retries (bounded,
    /// so that callers keep control and retry on their own schedule).
    pub(crate) fn cluster(seeds: &[String]) -> RedisResult<Conn> {
        let client = ClusterClient::builder(seeds.iter().map(String::as_str))
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .connection_timeout(Duration::from_secs(3))
            .response_timeout(Duration::from_secs(3))
            .build()?;
        let conn = client.get_pending_async_connection_with_config(Cluster::config());
        Ok(Conn::Cluster(Arc::new(Watched::new(
            Cluster { client },
            conn,
        ))))
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(single) => Box::pin(single.command(cmd)),
            Conn::Cluster(cluster) => Box::pin(cluster.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(single) => Box::pin(single.commands(cmd, offset, count)),
            Conn::Cluster(cluster) => Box::pin(cluster.commands(cmd, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(single) => single.conn().get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// Where a fresh connection comes from when the current one is stuck.
pub(crate) trait Source: Send + Sync {
    type Conn: ConnectionLike + Clone + Send + Sync;

    /// A fresh connection (or `None` when none can be made now: the old one stays); says
    /// in the log why it is made.
    fn reconnect(&self) -> Option<Self::Conn>;
}

/// The connection to one Redis, replaced when it stops answering.
///
/// `ConnectionManager` reconnects when the connection is closed or reset, but not when it
/// times out: a black-holed connection (packets dropped, e.g. a network partition that
/// heals without a reset) would stay wedged until the kernel gives up, many minutes later.
/// So, as for a cluster, a fresh connection manager replaces it.
pub(crate) struct Single {
    client: redis::Client,
}

impl Single {
    fn config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_max_delay(Duration::from_secs(2))
    }
}

impl Source for Single {
    type Conn = ConnectionManager;

    fn reconnect(&self) -> Option<ConnectionManager> {
        tracing::warn!("No Redis command succeeded for {STUCK:?}; replacing the connection.");
        self.client
            .get_connection_manager_lazy(Self::config())
            .inspect_err(|e| tracing::warn!(error = %e, "Cannot make a new Redis connection."))
            .ok()
    }
}

/// A cluster connection, rebuilt from the seeds when it stops working.
///
/// redis-rs's cluster client repairs itself on MOVED and on broken connections, but we saw
/// it wedge during a failover (a slot refresh that never completed; every later command
/// timed out).
pub(crate) struct Cluster {
    client: ClusterClient,
}

impl Cluster {
    fn config() -> ClusterConfig {
        ClusterConfig::new()
            .set_connection_timeout(Duration::from_secs(3))
            .set_response_timeout(Duration::from_secs(3))
    }
}

impl Source for Cluster {
    type Conn = ClusterConnection;

    fn reconnect(&self) -> Option<ClusterConnection> {
        tracing::warn!(
            "No Redis Cluster command succeeded for {STUCK:?}; reconnecting from the seed nodes."
        );
        Some(
            self.client
                .get_pending_async_connection_with_config(Self::config()),
        )
    }
}

/// A connection that is replaced when no command has succeeded on it for [`STUCK`] while
/// commands keep failing at the connection level. A server's answer (even an error reply)
/// proves the connection works and never triggers it.
pub(crate) struct Watched<S: Source> {
    source: S,
    conn: Mutex<S::Conn>,
    last_ok: AtomicU64,
    last_rebuild: AtomicU64,
}

impl<S: Source> Watched<S> {
    fn new(source: S, conn: S::Conn) -> Watched<S> {
        Watched {
            source,
            conn: Mutex::new(conn),
            last_ok: AtomicU64::new(now_ms()),
            last_rebuild: AtomicU64::new(0),
        }
    }

    fn conn(&self) -> S::Conn {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let result = self.conn().req_packed_command(cmd).await;
        self.outcome(&result);
        result
    }

    async fn commands(
        &self,
        cmd: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let result = self.conn().req_packed_commands(cmd, offset, count).await;
        self.outcome(&result);
        result
    }

    /// Records a command's outcome, and replaces the connection when it is stuck.
    fn outcome<T>(&self, result: &RedisResult<T>) {
        if self.stuck(result) {
            if let Some(fresh) = self.source.reconnect() {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
            }
        }
    }

    /// Records a command's outcome; `true` when the connection should be replaced: nothing
    /// has succeeded for [`STUCK`] (nor was it replaced in that time) and this failed at
    /// the connection level.
    fn stuck<T>(&self, result: &Result<T, RedisError>) -> bool {
        let now = now_ms();
        match result {
            Ok(_) => self.last_ok.store(now, Ordering::Relaxed),
            Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => {
                self.last_ok.store(now, Ordering::Relaxed)
            }
            Err(_) => {
                let last = self
                    .last_ok
                    .load(Ordering::Relaxed)
                    .max(self.last_rebuild.load(Ordering::Relaxed));
                if now.saturating_sub(last) >= STUCK.as_millis() as u64 {
                    self.last_rebuild.store(now, Ordering::Relaxed);
                    return true;
                }
            }
        }
        false
    }
}
