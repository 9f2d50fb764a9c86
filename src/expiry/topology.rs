//! One node listener per Redis Cluster node, kept in step with the topology (`CLUSTER
//! NODES` every second): new nodes get a listener, nodes that left lose theirs, every
//! listener is told its node's role; the monitor's listener health is whether every master
//! that serves slots is listened to. It must not listen itself (the node listeners do), and
//! a node listener's panic is raised again here, never swallowed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::ConnectionInfo;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::check::{Refused, Role};
use super::node::{First, FirstSession, Reports, Shared};
use crate::cluster::{self, Node};
use crate::health::Health;
use crate::telemetry::{Backoff, LogLimiter};

/// How often the cluster topology is read (failover, resharding, nodes added or removed).
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);
/// How often the masters' first checks are looked at while the monitor starts.
const STARTUP_POLL: Duration = Duration::from_millis(50);

/// A node listener that runs, with what steers it.
struct Running {
    role: watch::Sender<Role>,
    listening: Arc<AtomicBool>,
    token: CancellationToken,
}

/// Whether the supervision goes on.
enum Flow {
    Go,
    Stop,
}

/// The node listeners of a cluster, and what is known of the topology.
pub(crate) struct Topology {
    shared: Shared,
    health: Arc<Health>,
    seeds: Vec<ConnectionInfo>,
    token: CancellationToken,
    /// By node address.
    running: HashMap<String, Running>,
    /// Until every master's first check is in: where the monitor waits for them.
    first: Option<First>,
    /// The masters' first checks still awaited, by node address.
    firsts: HashMap<String, oneshot::Receiver<Result<(), Refused>>>,
    limiter: LogLimiter,
    backoff: Backoff,
    /// The nodes of the last topology read (asked before the seeds, which may be gone).
    known: Vec<ConnectionInfo>,
    /// The node listeners are this task's children: a panic in one is raised again here, so
    /// the monitor's supervisor sees it (as the `expiry` task's) instead of a node silently
    /// no longer listened to.
    listeners: JoinSet<()>,
}

impl Topology {
    pub(crate) fn new(
        shared: Shared,
        health: Arc<Health>,
        seeds: Vec<ConnectionInfo>,
        token: CancellationToken,
        first: First,
    ) -> Topology {
        Topology {
            shared,
            health,
            seeds,
            token,
            running: HashMap::new(),
            first: Some(first),
            firsts: HashMap::new(),
            limiter: LogLimiter::new(Duration::from_secs(30)),
            backoff: Backoff::new(Duration::from_secs(5)),
            known: Vec::new(),
            listeners: JoinSet::new(),
        }
    }

    /// Runs until cancelled (or a master refused at start: reported through `first`).
    pub(crate) async fn run(mut self) {
        loop {
            // Ask the nodes we know first (the seeds may be gone), then the seeds.
            let candidates: Vec<ConnectionInfo> = self
                .known
                .iter()
                .chain(self.seeds.iter())
                .cloned()
                .collect();
            let topology = tokio::select! {
                () = self.token.cancelled() => break,
                t = cluster::discover(&candidates) => t,
            };
            let delay = match topology {
                Ok(nodes) => match self.follow(&nodes) {
                    Some(delay) => delay,
                    None => break,
                },
                Err(e) => self.unreadable(&e),
            };
            if let Flow::Stop = self.wait(delay).await {
                break;
            }
        }
        self.stop().await;
    }

    /// Follows a topology read; `None` when a master refused at start. Returns when to read
    /// it again.
    fn follow(&mut self, nodes: &[Node]) -> Option<Duration> {
        self.backoff.reset();
        self.known = nodes
            .iter()
            .filter(|n| !n.failing)
            .map(|n| cluster::node_info(&self.seeds[0], &n.host, n.port))
            .collect();
        let starting = self.first.is_some();
        for node in nodes {
            self.keep(node, starting);
        }
        self.running.retain(|addr, r| {
            let keep = nodes.iter().any(|n| n.addr() == *addr);
            if !keep {
                info!(node = %addr, "A node left the cluster; no longer listening to it.");
                r.token.cancel();
            }
            keep
        });
        // Ready when every master that serves slots is listened to.
        let all = nodes.iter().filter(|n| n.serves_slots()).all(|n| {
            self.running
                .get(&n.addr())
                .is_some_and(|r| r.listening.load(Ordering::Acquire))
        });
        self.health.set_redis_listener(all);
        if let Flow::Stop = self.first_checks(nodes) {
            return None;
        }
        Some(if self.first.is_some() {
            STARTUP_POLL
        } else {
            TOPOLOGY_EVERY
        })
    }

    /// Tells a running node listener its node's role, or starts one for a new node.
    fn keep(&mut self, node: &Node, starting: bool) {
        let role = Role::of(node);
        if let Some(r) = self.running.get(&node.addr()) {
            r.role.send_if_modified(|old| {
                let changed = *old != role;
                *old = role.clone();
                changed
            });
            return;
        }
        let (role_tx, role_rx) = watch::channel(role.clone());
        let listening = Arc::new(AtomicBool::new(false));
        let child = self.token.child_token();
        let info = cluster::node_info(&self.seeds[0], &node.host, node.port);
        let first_session = if starting {
            FirstSession::Quiet
        } else {
            FirstSession::Reconciles
        };
        let listener = self.shared.node(
            info,
            role_rx,
            listening.clone(),
            first_session,
            Reports::Supervisor,
        );
        let node_first = if starting && matches!(role, Role::Master(_)) {
            let (tx, rx) = oneshot::channel();
            self.firsts.insert(node.addr(), rx);
            Some(tx)
        } else {
            None
        };
        info!(node = %node.addr(), master = node.master, "Listening to a cluster node.");
        self.listeners.spawn(
            listener
                .run(child.clone(), node_first)
                .instrument(tracing::info_span!("node", addr = %node.addr())),
        );
        self.running.insert(
            node.addr(),
            Running {
                role: role_tx,
                listening,
                token: child,
            },
        );
    }

    /// While the monitor starts: every master's first check, before it goes on. A master
    /// that stops serving slots meanwhile (it failed over) is not waited for: its replica's
    /// check runs when it is promoted. `Stop` when one refused (reported).
    fn first_checks(&mut self, nodes: &[Node]) -> Flow {
        let Some(tx) = self.first.take() else {
            return Flow::Go;
        };
        let mut failed = None;
        self.firsts.retain(|addr, rx| {
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
            return Flow::Stop;
        }
        if self.firsts.is_empty() {
            let _ = tx.send(Ok(()));
        } else {
            self.first = Some(tx);
        }
        Flow::Go
    }

    /// The topology could not be read: unready, and read again after a backoff.
    fn unreadable(&mut self, e: &cluster::DiscoverError) -> Duration {
        self.health.set_redis_listener(false);
        if let Some(n) = self.limiter.check() {
            warn!(error = %e, suppressed = n, "Cannot read the Redis Cluster topology; retrying.");
        }
        self.backoff.next_delay()
    }

    /// Waits until the next read, raising a node listener's panic.
    async fn wait(&mut self, delay: Duration) -> Flow {
        tokio::select! {
            () = self.token.cancelled() => Flow::Stop,
            () = tokio::time::sleep(delay) => Flow::Go,
            Some(Err(e)) = self.listeners.join_next(), if !self.listeners.is_empty() => {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
                Flow::Go
            }
        }
    }

    /// Stops every node listener and waits for them.
    async fn stop(mut self) {
        for r in self.running.values() {
            r.token.cancel();
        }
        while let Some(joined) = self.listeners.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }
}
