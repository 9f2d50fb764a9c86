//! The monitor's tasks, built field by field and spawned under their names: the HTTP
//! server, the Redis side (keyspace listener, command-connection watch) and, once Redis is
//! usable, the workers (clock, MQTT, applier, rebuild, expirer, forget, outbox), with the
//! channels and shared state that link them.
//!
//! It must not decide the shutdown order or wait on anything (that is `run`'s); it only
//! builds and spawns.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::device::{self, DeviceId};
use crate::expiry::{Listener, Nodes, Refused};
use crate::forget;
use crate::held::{Held, HELD_CAP};
use crate::http;
use crate::mqtt::MqttTask;
use crate::presence::{
    Applier, Backlog, CommitOrder, Committer, DueTable, Expirer, GroupNotes, Outbox, Stamper,
};
use crate::pulse::{Pulse, Synced};
use crate::rebuild;
use crate::startup::{watch_redis, Base, Common};
use crate::status::{Delivered, StatusOut};
use crate::store::{Configure, OutageRule};
use crate::supervisor::Supervisor;

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

impl Common {
    /// How long a floor stands (see [`FLOOR_LEASE`]).
    fn floor_lease(&self) -> Duration {
        FLOOR_LEASE.max(self.cfg.presence.ttl / 2)
    }
}

/// The Redis side once spawned: what the workers take over from it.
pub(crate) struct RedisSide {
    /// The keyspace listener's first check of Redis (usable, or refused).
    pub(crate) first: oneshot::Receiver<Result<(), Refused>>,
    expired_rx: mpsc::Receiver<DeviceId>,
    reconcile: Arc<Notify>,
}

/// Spawns the HTTP server first, so `/healthz` answers and `/readyz` explains while the
/// rest starts (a liveness probe must not kill a monitor that is waiting for Redis). Returns
/// what the other tasks share.
pub(crate) fn spawn_http(base: Base, web: &mut Supervisor) -> (Common, Nodes) {
    let Base {
        common,
        nodes,
        listener,
    } = base;
    let http_token = web.token().child_token();
    let api = http::Api {
        store: common.store.clone(),
        metrics: common.metrics.clone(),
        health: common.health.clone(),
        auth: common.cfg.http.auth.clone(),
        events: common.events.clone(),
        stop: http_token.clone(),
    };
    web.spawn(
        "http",
        http::serve(listener, api, http_token).instrument(tracing::info_span!("http")),
    );

    (common, nodes)
}

/// Spawns the keyspace listener (one per Redis node) and the command-connection watch.
pub(crate) fn spawn_redis_side(
    common: &Common,
    nodes: Nodes,
    workers: &mut Supervisor,
) -> RedisSide {
    let Common {
        cfg, health, store, ..
    } = common;
    let reconcile = Arc::new(Notify::new());
    let (expired_tx, expired_rx) = mpsc::channel(EXPIRED_QUEUE);
    let (first_tx, first_rx) = oneshot::channel();
    let token = workers.token().clone();
    workers.spawn(
        "expiry",
        Listener {
            nodes,
            keys: store.keys().clone(),
            configure: if cfg.redis.configure_notifications {
                Configure::Enable
            } else {
                Configure::Leave
            },
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
    RedisSide {
        first: first_rx,
        expired_rx,
        reconcile,
    }
}

/// The channels and shared state between the workers.
struct Links {
    held: Arc<Held>,
    due: Arc<DueTable>,
    order: CommitOrder,
    out_tx: mpsc::Sender<StatusOut>,
    pulse: Arc<Pulse>,
    /// The MQTT task's sync marker, the held heartbeats and the pulse, as deciders see them.
    backlog: Backlog,
}

/// The ends of the links only one worker takes.
struct Ends {
    out_rx: mpsc::Receiver<StatusOut>,
    ack_tx: mpsc::Sender<Delivered>,
    ack_rx: mpsc::Receiver<Delivered>,
    ingest_tx: watch::Sender<Option<Synced>>,
    republish: Arc<Notify>,
}

fn links() -> (Links, Ends) {
    let (out_tx, out_rx) = mpsc::channel(STATUS_QUEUE);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
    let (ingest_tx, ingest_rx) = watch::channel(None);
    let held = Arc::new(Held::new(HELD_CAP));
    let pulse = Arc::new(Pulse::default());
    let links = Links {
        backlog: Backlog::new(ingest_rx, held.clone(), pulse.clone()),
        held,
        due: Arc::new(DueTable::default()),
        order: CommitOrder::default(),
        out_tx,
        pulse,
    };
    let ends = Ends {
        out_rx,
        ack_tx,
        ack_rx,
        ingest_tx,
        republish: Arc::new(Notify::new()),
    };
    (links, ends)
}

/// Spawns the workers, once Redis is known usable: the clock first (its first stamp before
/// any heartbeat is read), then MQTT, the deciders and the outbox.
pub(crate) async fn spawn_workers(common: &Common, redis: RedisSide, workers: &mut Supervisor) {
    let token = workers.token().clone();
    let (links, ends) = links();
    let Ends {
        out_rx,
        ack_tx,
        ack_rx,
        ingest_tx,
        republish,
    } = ends;
    let (gone_tx, gone_rx) = mpsc::channel(GONE_QUEUE);
    let (redis_ok_tx, redis_ok_rx) = watch::channel(true);
    workers.spawn(
        "events",
        http::event_feed(common.store.clone(), common.events.clone(), token.clone())
            .instrument(tracing::info_span!("events")),
    );
    let cfg = &common.cfg;
    let pulse = links.pulse.clone();
    let pulse_token = token.child_token();
    workers.spawn(
        "pulse",
        async move { pulse.run(pulse_token).await }.instrument(tracing::info_span!("pulse")),
    );
    let stamper = Stamper {
        store: common.store.clone(),
        floor_of: cfg
            .mqtt
            .shared_group
            .as_ref()
            .map(|_| cfg.mqtt.client_id.clone()),
        backlog: links.backlog.clone(),
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
        metrics: common.metrics.clone(),
        health: common.health.clone(),
        held: links.held.clone(),
        clock: common.store.clock().clone(),
        gone: gone_tx,
        redis_ok: redis_ok_rx,
        out_rx,
        ack_tx,
        republish: republish.clone(),
        ingest: ingest_tx,
        pulse: links.pulse.clone(),
    };
    let closer = CloseOnDrop(links.held.clone());
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
    spawn_deciders(common, &links, redis, workers);
    spawn_outbox(common, links, ack_rx, republish, workers);
}

/// The applier, the rebuild, the expirer and (when configured) the forgetter.
fn spawn_deciders(common: &Common, links: &Links, redis: RedisSide, workers: &mut Supervisor) {
    let token = workers.token().clone();
    let Common {
        cfg,
        metrics,
        health,
        store,
        events: _,
    } = common;
    let RedisSide {
        expired_rx,
        reconcile,
        ..
    } = redis;
    // What the applier and the expirer share: both commit transitions and hand them on.
    let commit = Committer {
        store: store.clone(),
        held: links.held.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        out: links.out_tx.clone(),
        order: links.order.clone(),
        due: links.due.clone(),
    };
    workers.spawn(
        "applier",
        Applier {
            commit: commit.clone(),
            recent: Default::default(),
            floor_lease: common.floor_lease(),
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
            ttl_rules: cfg.presence.ttl_rules.clone(),
            rule: OutageRule::new(&cfg.groups),
            metrics: metrics.clone(),
            reconcile: reconcile.clone(),
            broker: health.broker(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("rebuild")),
    );
    workers.spawn(
        "expirer",
        Expirer {
            commit,
            expired_rx,
            reconcile,
            backlog: links.backlog.clone(),
            floor_lease: common.floor_lease(),
            floor_wait: tokio::time::Instant::now(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("expirer")),
    );
    if let Some(after) = cfg.presence.forget_after {
        spawn_forgetter(common, links, after, token, workers);
    }
}

fn spawn_forgetter(
    common: &Common,
    links: &Links,
    after: Duration,
    token: CancellationToken,
    workers: &mut Supervisor,
) {
    workers.spawn(
        "forget",
        forget::Forgetter {
            store: common.store.clone(),
            metrics: common.metrics.clone(),
            out: links.out_tx.clone(),
            order: links.order.clone(),
            backlog: links.backlog.clone(),
            after,
            floor_lease: common.floor_lease(),
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("forget")),
    );
}

/// The outbox takes the last sender of statuses: when it and the deciders end, the MQTT
/// task sees the queue close.
fn spawn_outbox(
    common: &Common,
    links: Links,
    ack_rx: mpsc::Receiver<Delivered>,
    republish: Arc<Notify>,
    workers: &mut Supervisor,
) {
    let token = workers.token().clone();
    workers.spawn(
        "outbox",
        Outbox {
            store: common.store.clone(),
            out: links.out_tx,
            ack_rx,
            republish,
            instance: common.cfg.mqtt.client_id.clone(),
            groups: GroupNotes {
                rule: OutageRule::new(&common.cfg.groups),
                metrics: common.metrics.clone(),
            },
        }
        .run(token.child_token())
        .instrument(tracing::info_span!("outbox")),
    );
}

/// Closes [`Held`] when dropped.
struct CloseOnDrop(Arc<Held>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}
