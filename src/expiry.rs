//! The keyspace-notification listener: the fast path from Redis's `expired` events to
//! offline decisions.
//!
//! Notifications are local to a node, so there is one `NodeListener` per Redis node: one
//! for a single Redis; in a cluster, one per node (masters and replicas: a replica emits
//! nothing, but when it is promoted we are already subscribed), kept in step with the
//! topology by [`Listener::run`], which asks `CLUSTER NODES` every second.
//!
//! A node listener owns a dedicated pub/sub connection. On every (re)connection to a master
//! it checks that the server is recent enough ([`crate::redis_version`]); it then subscribes
//! to the `expired` keyevent channel, makes sure `notify-keyspace-events` has `E` and `x` (or
//! proves with a probe key that events arrive), and asks for reconciliation,
//! since events published while it was away are lost for good; so does a replica that
//! becomes master. It never decides anything itself: it maps keys to device ids and hands
//! them on. It never blocks on a full queue either: an event it drops is found by the
//! deadline sweep, which never depended on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{ConnectionInfo, ErrorKind, RedisError};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::cluster::{self, Node};
use crate::device::DeviceId;
use crate::health::Health;
use crate::redis_version::{self, CheckError, Unsupported};
use crate::store::{self, Keys, NotifyConfig};
use crate::telemetry::{Backoff, LogLimiter};

/// How long the probe waits for its key's `expired` event (contract: up to 5 s).
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// How long the version check waits for `INFO server`.
const VERSION_WAIT: Duration = Duration::from_secs(5);
/// How often a listener pings its node to notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How often the cluster topology is read (failover, resharding, nodes added or removed).
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);
/// How often the masters' first checks are looked at while the monitor starts.
const STARTUP_POLL: Duration = Duration::from_millis(50);

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

/// Where to listen.
pub enum Nodes {
    /// One Redis.
    Single(Box<ConnectionInfo>),
    /// A Redis Cluster, from its seed nodes.
    Cluster(Vec<ConnectionInfo>),
}

/// The listener of every node, with what they share.
pub struct Listener {
    pub nodes: Nodes,
    pub keys: Keys,
    pub configure: bool,
    pub health: Arc<Health>,
    /// Devices whose TTL key expired. Bounded; overflow is dropped (see module docs).
    pub expired_tx: mpsc::Sender<DeviceId>,
    /// Woken after every (re)subscription and promotion: something may have expired unseen.
    pub reconcile: Arc<Notify>,
}

type First = oneshot::Sender<Result<(), Refused>>;

/// A node's role as the listener sees it; a master carries its slots (for the probe key).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    Master(Vec<(u16, u16)>),
    Replica,
}

impl Listener {
    /// Runs until cancelled. The first notification check (of every master, in a cluster)
    /// is reported through `first`: the monitor refuses to start without notifications.
    pub async fn run(self, token: CancellationToken, first: First) {
        match &self.nodes {
            Nodes::Single(info) => {
                let listening = Arc::new(AtomicBool::new(false));
                let (_role_tx, role) = watch::channel(Role::Master(Vec::new()));
                let node = self.node((**info).clone(), role, listening, false, true);
                node.run(token, Some(first)).await;
            }
            Nodes::Cluster(seeds) => {
                let seeds = seeds.clone();
                self.supervise(&seeds, token, first).await;
            }
        }
    }

    fn node(
        &self,
        info: ConnectionInfo,
        role: watch::Receiver<Role>,
        listening: Arc<AtomicBool>,
        reconcile_at_first: bool,
        single: bool,
    ) -> NodeListener {
        NodeListener {
            info,
            keys: self.keys.clone(),
            configure: self.configure,
            role,
            listening,
            reconcile_at_first,
            health: single.then(|| self.health.clone()),
            expired_tx: self.expired_tx.clone(),
            reconcile: self.reconcile.clone(),
        }
    }

    /// Keeps one listener per cluster node, following the topology.
    async fn supervise(&self, seeds: &[ConnectionInfo], token: CancellationToken, first: First) {
        struct Running {
            role: watch::Sender<Role>,
            listening: Arc<AtomicBool>,
            token: CancellationToken,
        }
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut first = Some(first);
        let mut firsts: HashMap<String, oneshot::Receiver<Result<(), Refused>>> = HashMap::new();
        let limiter = LogLimiter::new(Duration::from_secs(30));
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let mut known: Vec<ConnectionInfo> = Vec::new();
        // The node listeners are this task's children: a panic in one is raised again here,
        // so the monitor's supervisor sees it (as the `expiry` task's) instead of a node
        // silently no longer listened to.
        let mut listeners = JoinSet::new();
        loop {
            // Ask the nodes we know first (the seeds may be gone), then the seeds.
            let candidates: Vec<ConnectionInfo> =
                known.iter().chain(seeds.iter()).cloned().collect();
            let topology = tokio::select! {
                () = token.cancelled() => break,
                t = cluster::discover(&candidates) => t,
            };
            let delay = match topology {
                Ok(nodes) => {
                    backoff.reset();
                    known = nodes
                        .iter()
                        .filter(|n| !n.failing)
                        .map(|n| cluster::node_info(&seeds[0], &n.host, n.port))
                        .collect();
                    let starting = first.is_some();
                    for node in &nodes {
                        let role = role_of(node);
                        if let Some(r) = running.get(&node.addr()) {
                            r.role.send_if_modified(|old| {
                                let changed = *old != role;
                                *old = role.clone();
                                changed
                            });
                            continue;
                        }
                        let (role_tx, role_rx) = watch::channel(role.clone());
                        let listening = Arc::new(AtomicBool::new(false));
                        let child = token.child_token();
                        let info = cluster::node_info(&seeds[0], &node.host, node.port);
                        // At start the monitor reconciles anyway; a node that appears later
                        // (or was unreachable) may have expired keys nobody heard.
                        let listener =
                            self.node(info, role_rx, listening.clone(), !starting, false);
                        let node_first = if starting && matches!(role, Role::Master(_)) {
                            let (tx, rx) = oneshot::channel();
                            firsts.insert(node.addr(), rx);
                            Some(tx)
                        } else {
                            None
                        };
                        info!(node = %node.addr(), master = node.master, "Listening to a cluster node.");
                        listeners.spawn(
                            listener
                                .run(child.clone(), node_first)
                                .instrument(tracing::info_span!("node", addr = %node.addr())),
                        );
                        running.insert(
                            node.addr(),
                            Running {
                                role: role_tx,
                                listening,
                                token: child,
                            },
                        );
                    }
                    running.retain(|addr, r| {
                        let keep = nodes.iter().any(|n| n.addr() == *addr);
                        if !keep {
                            info!(node = %addr, "A node left the cluster; no longer listening to it.");
                            r.token.cancel();
                        }
                        keep
                    });
                    // Ready when every master that serves slots is listened to.
                    let all = nodes.iter().filter(|n| n.serves_slots()).all(|n| {
                        running
                            .get(&n.addr())
                            .is_some_and(|r| r.listening.load(Ordering::Acquire))
                    });
                    self.health.set_redis_listener(all);

                    if let Some(tx) = first.take() {
                        // Every master's first check, before the monitor goes on. A master
                        // that stops serving slots meanwhile (it failed over) is not waited
                        // for: its replica's check runs when it is promoted.
                        let mut failed = None;
                        firsts.retain(|addr, rx| {
                            let serving = nodes
                                .iter()
                                .any(|n| n.addr() == *addr && n.serves_slots() && !n.failing);
                            match rx.try_recv() {
                                Err(oneshot::error::TryRecvError::Empty) => serving,
                                Ok(Err(e)) => {
                                    failed.get_or_insert(e);
                                    false
                                }
                                Ok(Ok(())) | Err(oneshot::error::TryRecvError::Closed) => false,
                            }
                        });
                        if let Some(e) = failed {
                            let _ = tx.send(Err(e));
                            break;
                        }
                        if firsts.is_empty() {
                            let _ = tx.send(Ok(()));
                        } else {
                            first = Some(tx);
                        }
                    }
                    if first.is_some() {
                        STARTUP_POLL
                    } else {
                        TOPOLOGY_EVERY
                    }
                }
                Err(e) => {
                    self.health.set_redis_listener(false);
                    if let Some(n) = limiter.check() {
                        warn!(error = %e, suppressed = n, "Cannot read the Redis Cluster topology; retrying.");
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                () = token.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
                Some(Err(e)) = listeners.join_next(), if !listeners.is_empty() => {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
        }
        for r in running.values() {
            r.token.cancel();
        }
        while let Some(joined) = listeners.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }
}

fn role_of(node: &Node) -> Role {
    if node.serves_slots() && !node.failing {
        Role::Master(node.slots.clone())
    } else {
        Role::Replica
    }
}

/// Listens to one node.
struct NodeListener {
    info: ConnectionInfo,
    keys: Keys,
    configure: bool,
    role: watch::Receiver<Role>,
    listening: Arc<AtomicBool>,
    /// Ask for reconciliation after the first subscription too (not only after gaps).
    reconcile_at_first: bool,
    /// Single Redis: the listener's state is the monitor's listener health.
    health: Option<Arc<Health>>,
    expired_tx: mpsc::Sender<DeviceId>,
    reconcile: Arc<Notify>,
}

impl NodeListener {
    /// Runs until cancelled; reconnects with backoff. `first` receives the first
    /// connection's notification check (a master's).
    async fn run(mut self, token: CancellationToken, mut first: Option<First>) {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let limiter = LogLimiter::new(Duration::from_secs(30));
        let channel = format!("__keyevent@{}__:expired", self.info.redis_settings().db());
        let Ok(client) = redis::Client::open(self.info.clone()) else {
            error!("Invalid Redis connection settings.");
            return;
        };
        let mut sessions = 0u64;
        loop {
            let result = tokio::select! {
                () = token.cancelled() => return,
                r = self.session(&client, &channel, &token, &mut first, &mut backoff, sessions) => r,
            };
            sessions += 1;
            self.set_listening(false);
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

    fn set_listening(&self, on: bool) {
        self.listening.store(on, Ordering::Release);
        if let Some(health) = &self.health {
            health.set_redis_listener(on);
        }
    }

    /// One connection's life: connect, subscribe, check notifications, forward events.
    /// Returns `Ok` only when cancelled (or when the first check failed: reported).
    async fn session(
        &mut self,
        client: &redis::Client,
        channel: &str,
        token: &CancellationToken,
        first: &mut Option<First>,
        backoff: &mut Backoff,
        sessions: u64,
    ) -> Result<(), String> {
        let (pubsub, mut conn) = timeout(Duration::from_secs(5), async {
            let pubsub = client.get_async_pubsub().await?;
            let conn = client.get_multiplexed_async_connection().await?;
            Ok::<_, redis::RedisError>((pubsub, conn))
        })
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        let role = self.role.borrow_and_update().clone();
        // Before subscribing: a server we refuse is asked nothing more.
        match self.check_version(&mut conn, &role).await {
            Ok(()) => {}
            Err(CheckError::Redis(e)) => return Err(e.to_string()),
            Err(CheckError::Unsupported(e)) => return self.refuse(first, e.into()),
        }
        let (mut sink, mut stream) = pubsub.split();
        sink.subscribe(channel).await.map_err(|e| e.to_string())?;

        // Subscribed first, so that the probe's event (if one is needed) cannot be missed.
        if let Err(e) = self.check(&mut conn, &mut stream, &role).await {
            return self.refuse(first, e.into());
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(Ok(()));
        }

        self.set_listening(true);
        backoff.reset();
        if sessions > 0 || self.reconcile_at_first {
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
                    if let Some(id) = self.keys.parse_ttl_key(msg.get_payload_bytes()) {
                        // Full queue: drop; the deadline sweep covers this device.
                        let _ = self.expired_tx.try_send(id);
                    }
                }
                changed = self.role.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let role = self.role.borrow_and_update().clone();
                    if let Role::Master(_) = role {
                        // Promoted (failover) or given slots (resharding): its keys may
                        // have expired before anyone listened, and its notification setting
                        // is its own.
                        info!("Node became a master: checking its version and notifications, and reconciling.");
                        match self.check_version(&mut conn, &role).await {
                            Ok(()) => {}
                            Err(CheckError::Redis(e)) => return Err(e.to_string()),
                            Err(CheckError::Unsupported(e)) => return self.refuse(&mut None, e.into()),
                        }
                        if let Err(e) = self.check(&mut conn, &mut stream, &role).await {
                            error!(error = %e, "Keyspace notifications are off on a new master; offline detection for its slots relies on the deadline sweep alone.");
                            return Err(e.to_string());
                        }
                        self.reconcile.notify_one();
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

    /// Ends a session on a node we cannot work with. The first session of a node the monitor
    /// waits for at start reports it (the monitor refuses to start; `Ok`: nothing to retry).
    /// Later ones (Redis restarted without our setting and CONFIG refused, or replaced by an
    /// older one) must not crash a running monitor: the node stays unready, says so loudly
    /// and is tried again; the deadline sweep keeps detecting expiries meanwhile.
    fn refuse(&self, first: &mut Option<First>, why: Refused) -> Result<(), String> {
        if let Some(tx) = first.take() {
            let _ = tx.send(Err(why));
            return Ok(());
        }
        match &why {
            Refused::NotificationsOff(_) => {
                error!(error = %why, "Keyspace notifications are off after a reconnect; offline detection relies on the deadline sweep alone.");
            }
            Refused::Unsupported(_) => {
                error!(error = %why, "This Redis cannot run the monitor's scripts; staying unready until a supported Redis answers.");
            }
        }
        Err(why.to_string())
    }

    /// A master must run a Redis recent enough for the scripts; a replica runs none of them
    /// and is checked when it is promoted (a rolling upgrade upgrades replicas first).
    async fn check_version(
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
    async fn check(
        &self,
        conn: &mut MultiplexedConnection,
        stream: &mut redis::aio::PubSubStream,
        role: &Role,
    ) -> Result<(), NotificationsOff> {
        let result = store::ensure_notifications(conn, self.configure).await;
        match result {
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
        stream: &mut redis::aio::PubSubStream,
        slots: &[(u16, u16)],
    ) -> Result<(), String> {
        // In a cluster the key must hash to one of this master's slots.
        let tag = if slots.is_empty() {
            None
        } else {
            Some(cluster::tag_in(slots).ok_or("no probe key fits the node's slots")?)
        };
        let key = self.keys.probe(tag.as_deref());
        store::write_probe(conn, &key, Duration::from_millis(100))
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
                    let _ = store::touch(conn, &key).await;
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Err("connection closed during the probe".into());
                    };
                    if msg.get_payload_bytes() == key.as_bytes() {
                        return Ok(());
                    }
                    if let Some(id) = self.keys.parse_ttl_key(msg.get_payload_bytes()) {
                        let _ = self.expired_tx.try_send(id);
                    }
                }
            }
        }
    }
}
