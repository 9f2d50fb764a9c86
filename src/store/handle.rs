//! The [`Store`] handle: what every operation shares (the connection, the key names, the
//! scripts, the clock offsets, the loss signal, this replica's name).
//!
//! Owns making a store (one Redis or a cluster, at once or lazily) and its accessors. Must
//! not hold an operation: those live in the modules named after their concern.

use std::sync::Arc;

use super::connection::Conn;
use super::error::StoreError;
use super::keys::Keys;
use super::loss::Loss;
use super::scripts::Scripts;
use crate::bucket::bucket_of;
use crate::clock::Clock;
use crate::device::{DeviceId, Millis};
use crate::event_log::EventLog;
use crate::flap::FlapRule;

/// Handle to the Redis state. Cheap to clone: the connection is multiplexed and reconnects
/// by itself (a command that hit a broken connection still fails; callers retry).
#[derive(Clone)]
pub struct Store {
    pub(super) conn: Conn,
    pub(super) keys: Keys,
    pub(super) scripts: Arc<Scripts>,
    pub(super) clock: Arc<Clock>,
    pub(super) loss: Arc<Loss>,
    /// Our name in the replica floors ('' without a shared subscription).
    pub(super) replica: Arc<str>,
    /// The flapping rule the transition scripts apply.
    pub(super) flap: FlapRule,
    /// What the transition scripts keep in the event log.
    pub(super) events: EventLog,
}

impl Store {
    fn on(conn: Conn, prefix: &str) -> Store {
        Store {
            conn,
            keys: Keys::new(prefix),
            scripts: Arc::new(Scripts::new()),
            clock: Arc::default(),
            loss: Arc::default(),
            replica: Arc::from(""),
            flap: FlapRule::default(),
            events: EventLog::default(),
        }
    }

    /// Connects (once; errors are returned, not retried) and loads the scripts.
    pub async fn connect(client: &redis::Client, prefix: &str) -> Result<Store, StoreError> {
        Self::lazy(client, prefix)?.ready().await
    }

    /// A store whose connection is made on first use and remade after failures; nothing is
    /// sent now, so it works while Redis is down. Scripts are loaded on first need (NOSCRIPT).
    pub(crate) fn lazy(client: &redis::Client, prefix: &str) -> Result<Store, StoreError> {
        Ok(Store::on(Conn::single(client)?, prefix))
    }

    /// A store on a Redis Cluster, from seed node URLs; like [`Store::lazy`], it connects in
    /// the background (see [`Conn::cluster`] for how commands are routed and retried).
    pub(crate) fn lazy_cluster(seeds: &[String], prefix: &str) -> Result<Store, StoreError> {
        Ok(Store::on(Conn::cluster(seeds)?, prefix))
    }

    /// Connects to a cluster once and loads the scripts on every master.
    pub(crate) async fn connect_cluster(
        seeds: &[String],
        prefix: &str,
    ) -> Result<Store, StoreError> {
        Self::lazy_cluster(seeds, prefix)?.ready().await
    }

    /// The store once Redis answered and has the scripts.
    async fn ready(self) -> Result<Store, StoreError> {
        self.ping().await?;
        self.scripts.load(&self.conn).await?;
        Ok(self)
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Lost buckets found by the scripts, and finished rebuilds.
    pub(crate) fn loss(&self) -> &Arc<Loss> {
        &self.loss
    }

    /// The same store, naming this replica in the floors it writes and skips.
    pub(crate) fn for_replica(mut self, name: &str) -> Store {
        self.replica = Arc::from(name);
        self
    }

    /// The same store, applying `rule` in every transition it commits.
    pub(crate) fn with_flap(mut self, rule: FlapRule) -> Store {
        self.flap = rule;
        self
    }

    /// The same store, keeping `log` in the event log of every transition it commits.
    pub(crate) fn with_events(mut self, log: EventLog) -> Store {
        self.events = log;
        self
    }

    /// What the transition scripts keep in the event log.
    pub(crate) fn event_log(&self) -> EventLog {
        self.events
    }

    /// The offsets to every bucket's master clock (see [`Clock`]).
    pub(crate) fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Now, as the master owning `device`'s bucket reads it: the time its record's times
    /// (a flapping end, say) compare with.
    pub(crate) fn master_now(&self, device: &DeviceId) -> Millis {
        self.clock.now(bucket_of(device.as_str()))
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
