//! The `expiry` task: listens to a single Redis, or to every node of a cluster (through
//! `topology`). Only wiring: it must not talk to Redis itself.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use redis::ConnectionInfo;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::check::Role;
use super::node::{First, FirstSession, Reports, Shared};
use super::topology::Topology;
use crate::device::DeviceId;
use crate::health::Health;
use crate::store::Configure;
use crate::store::Keys;

/// Where to listen.
pub(crate) enum Nodes {
    /// One Redis.
    Single(Box<ConnectionInfo>),
    /// A Redis Cluster, from its seed nodes.
    Cluster(Vec<ConnectionInfo>),
}

/// The listener of every node, with what they share.
pub(crate) struct Listener {
    pub(crate) nodes: Nodes,
    pub(crate) keys: Keys,
    /// Whether notifications are turned on where they are off (`CONFIG SET`).
    pub(crate) configure: Configure,
    pub(crate) health: Arc<Health>,
    /// Devices whose TTL key expired. Bounded; overflow is dropped (see the module docs).
    pub(crate) expired_tx: mpsc::Sender<DeviceId>,
    /// Woken after every (re)subscription and promotion: something may have expired unseen.
    pub(crate) reconcile: Arc<Notify>,
}

impl Listener {
    /// Runs until cancelled. The first notification check (of every master, in a cluster)
    /// is reported through `first`: the monitor refuses to start without notifications.
    pub(crate) async fn run(self, token: CancellationToken, first: First) {
        let shared = Shared {
            keys: self.keys,
            configure: self.configure,
            expired_tx: self.expired_tx,
            reconcile: self.reconcile,
        };
        match self.nodes {
            Nodes::Single(info) => {
                let listening = Arc::new(AtomicBool::new(false));
                let (_role_tx, role) = watch::channel(Role::Master(Vec::new()));
                let node = shared.node(
                    *info,
                    role,
                    listening,
                    FirstSession::Quiet,
                    Reports::Health(self.health),
                );
                node.run(token, Some(first)).await;
            }
            Nodes::Cluster(seeds) => {
                Topology::new(shared, self.health, seeds, token, first)
                    .run()
                    .await;
            }
        }
    }
}
