//! One Redis node's listener: its sessions (connect, check the node, subscribe to the
//! `expired` keyevent channel, forward events, follow its role, ping), each ended by an
//! error it reconnects from. Forwards device ids only: it must not decide anything, nor
//! block on a full queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub, PubSubSink, PubSubStream};
use redis::{ConnectionInfo, Msg, RedisError};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::check::{Refused, Role, Target};
use crate::device::DeviceId;
use crate::health::Health;
use crate::redis_version::CheckError;
use crate::store::Configure;
use crate::store::Keys;
use crate::telemetry::{Backoff, LogLimiter};

/// How often a listener pings its node to notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for a ping's answer.
const PING_WAIT: Duration = Duration::from_secs(3);
/// Longest wait for the connections of a session.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Where a node listener reports its first check (a master's, at start).
pub(crate) type First = oneshot::Sender<Result<(), Refused>>;

/// Whether a node's first subscription asks for a reconciliation too (later ones always
/// do: events published while nobody listened are gone for good).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FirstSession {
    /// At start: the monitor reconciles anyway.
    Quiet,
    /// A node that appears later (or was unreachable) may have expired keys nobody heard.
    Reconciles,
}

/// Who reports whether the node is listened to as the monitor's listener health.
pub(crate) enum Reports {
    /// The node itself (a single Redis).
    Health(Arc<Health>),
    /// The cluster's supervisor, once every master is listened to.
    Supervisor,
}

/// Why a session ended (it is retried after a backoff).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("connect timed out")]
    ConnectTimedOut,
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("connection closed")]
    Closed,
    #[error("ping failed: {0}")]
    Ping(RedisError),
    #[error("ping timed out")]
    PingTimedOut,
}

/// Whether the node is subscribed to (between a session's subscription and its end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listening {
    Yes,
    No,
}

/// Whether a node passed a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fit {
    Yes,
    /// Refused, and reported to the monitor waiting at start: the session ends, not retried.
    Reported,
}

/// What every node listener gets.
pub(crate) struct Shared {
    pub(crate) keys: Keys,
    pub(crate) configure: Configure,
    pub(crate) expired_tx: mpsc::Sender<DeviceId>,
    /// Woken after every (re)subscription and promotion: something may have expired unseen.
    pub(crate) reconcile: Arc<Notify>,
}

impl Shared {
    /// A listener of the node at `info`; `listening` tells whether it is subscribed.
    pub(crate) fn node(
        &self,
        info: ConnectionInfo,
        role: watch::Receiver<Role>,
        listening: Arc<AtomicBool>,
        first_session: FirstSession,
        reports: Reports,
    ) -> NodeListener {
        NodeListener {
            target: Target {
                info,
                keys: self.keys.clone(),
                configure: self.configure,
                expired_tx: self.expired_tx.clone(),
            },
            role,
            listening,
            first_session,
            reports,
            reconcile: self.reconcile.clone(),
        }
    }
}

/// Listens to one node.
pub(crate) struct NodeListener {
    target: Target,
    role: watch::Receiver<Role>,
    listening: Arc<AtomicBool>,
    first_session: FirstSession,
    reports: Reports,
    reconcile: Arc<Notify>,
}

/// A subscribed session's connections.
struct Live {
    sink: PubSubSink,
    stream: PubSubStream,
    conn: MultiplexedConnection,
}

impl NodeListener {
    /// Runs until cancelled; reconnects with backoff. `first` receives the first
    /// connection's notification check (a master's).
    pub(crate) async fn run(mut self, token: CancellationToken, mut first: Option<First>) {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let limiter = LogLimiter::new(Duration::from_secs(30));
        let channel = format!(
            "__keyevent@{}__:expired",
            self.target.info.redis_settings().db()
        );
        let Ok(client) = redis::Client::open(self.target.info.clone()) else {
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
            self.set_listening(Listening::No);
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

    fn set_listening(&self, state: Listening) {
        let on = state == Listening::Yes;
        self.listening.store(on, Ordering::Release);
        if let Reports::Health(health) = &self.reports {
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
    ) -> Result<(), SessionError> {
        let Some(mut live) = self.open(client, channel, first).await? else {
            return Ok(());
        };
        self.set_listening(Listening::Yes);
        backoff.reset();
        if sessions > 0 || self.first_session == FirstSession::Reconciles {
            // Events published while we were away are gone for good.
            self.reconcile.notify_one();
        }
        info!(%channel, "Listening for expired keys.");
        self.listen(&mut live, token).await
    }

    /// Connects, checks the node and subscribes; `None`: refused and reported.
    async fn open(
        &mut self,
        client: &redis::Client,
        channel: &str,
        first: &mut Option<First>,
    ) -> Result<Option<Live>, SessionError> {
        let (pubsub, mut conn) = connect(client).await?;
        let role = self.role.borrow_and_update().clone();
        // Before subscribing: a server we refuse is asked nothing more.
        if self.version(&mut conn, &role, first).await? == Fit::Reported {
            return Ok(None);
        }
        let (mut sink, mut stream) = pubsub.split();
        sink.subscribe(channel).await?;

        // Subscribed first, so that the probe's event (if one is needed) cannot be missed.
        if let Err(e) = self.target.check(&mut conn, &mut stream, &role).await {
            self.refuse(first, e.into())?;
            return Ok(None);
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(Ok(()));
        }
        Ok(Some(Live { sink, stream, conn }))
    }

    /// Forwards events, follows the node's role and pings it, until cancelled or an error.
    async fn listen(
        &mut self,
        live: &mut Live,
        token: &CancellationToken,
    ) -> Result<(), SessionError> {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                msg = live.stream.next() => self.event(msg)?,
                changed = self.role.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.role_changed(live).await?;
                }
                _ = ping.tick() => ping_node(&mut live.sink).await?,
            }
        }
    }

    fn event(&self, msg: Option<Msg>) -> Result<(), SessionError> {
        let msg = msg.ok_or(SessionError::Closed)?;
        self.target.forward(msg.get_payload_bytes());
        Ok(())
    }

    /// Promoted (failover) or given slots (resharding): its keys may have expired before
    /// anyone listened, and its notification setting is its own.
    async fn role_changed(&mut self, live: &mut Live) -> Result<(), SessionError> {
        let role = self.role.borrow_and_update().clone();
        let Role::Master(_) = role else {
            return Ok(());
        };
        info!("Node became a master: checking its version and notifications, and reconciling.");
        self.version(&mut live.conn, &role, &mut None).await?;
        if let Err(e) = self
            .target
            .check(&mut live.conn, &mut live.stream, &role)
            .await
        {
            error!(error = %e, "Keyspace notifications are off on a new master; offline detection for its slots relies on the deadline sweep alone.");
            return Err(Refused::from(e).into());
        }
        self.reconcile.notify_one();
        Ok(())
    }

    /// The version check of a session; a refusal goes through [`NodeListener::refuse`].
    async fn version(
        &self,
        conn: &mut MultiplexedConnection,
        role: &Role,
        first: &mut Option<First>,
    ) -> Result<Fit, SessionError> {
        match self.target.check_version(conn, role).await {
            Ok(()) => Ok(Fit::Yes),
            Err(CheckError::Redis(e)) => Err(e.into()),
            Err(CheckError::Unsupported(e)) => self.refuse(first, e.into()),
        }
    }

    /// Ends a session on a node we cannot work with. The first session of a node the monitor
    /// waits for at start reports it (the monitor refuses to start; nothing to retry).
    /// Later ones (Redis restarted without our setting and CONFIG refused, or replaced by an
    /// older one) must not crash a running monitor: the node stays unready, says so loudly
    /// and is tried again; the deadline sweep keeps detecting expiries meanwhile.
    fn refuse(&self, first: &mut Option<First>, why: Refused) -> Result<Fit, SessionError> {
        if let Some(tx) = first.take() {
            let _ = tx.send(Err(why));
            return Ok(Fit::Reported);
        }
        match &why {
            Refused::NotificationsOff(_) => {
                error!(error = %why, "Keyspace notifications are off after a reconnect; offline detection relies on the deadline sweep alone.");
            }
            Refused::Unsupported(_) => {
                error!(error = %why, "This Redis cannot run the monitor's scripts; staying unready until a supported Redis answers.");
            }
        }
        Err(why.into())
    }
}

/// A session's two connections: pub/sub, and one for the checks.
async fn connect(client: &redis::Client) -> Result<(PubSub, MultiplexedConnection), SessionError> {
    let connected = timeout(CONNECT_WAIT, async {
        let pubsub = client.get_async_pubsub().await?;
        let conn = client.get_multiplexed_async_connection().await?;
        Ok::<_, RedisError>((pubsub, conn))
    })
    .await;
    let connected = connected.map_err(|_| SessionError::ConnectTimedOut)?;
    Ok(connected?)
}

async fn ping_node(sink: &mut PubSubSink) -> Result<(), SessionError> {
    match timeout(PING_WAIT, sink.ping::<redis::Value>()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(SessionError::Ping(e)),
        Err(_) => Err(SessionError::PingTimedOut),
    }
}
