//! The MQTT task: one session with the broker, kept across reconnections. [`MqttTask::run`]
//! is a short loop that waits for the next thing to happen and hands it to one handler of
//! [`Session`] (a ConnAck, a SUBACK, a message, a PUBACK, a lost connection, a status to
//! publish, the watchdog, the sync marker's timeout, the shutdown's steps). It must
//! not speak Redis: heartbeats go into `Held`, statuses come in on a bounded channel,
//! acknowledgements go out on another.
//!
//! **Invariant: the event loop is never blocked.** The task that polls it only ever uses
//! `try_*` calls; it reads the status channel only while it has room in flight, which is the
//! backpressure on everything upstream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::client::{Client, Qos};
use super::connect::{client, ConnectOptions, SessionMode};
use super::drain::{Outstanding, Phase, Shutdown, Step};
use super::error::Error;
use super::events::{Event, EventLoop};
use super::ingest::{Delivery, Ingest};
use super::outgoing::{offline_payload, Kind, Outgoing, StatusTopics};
use super::probe::probe;
use super::queued;
use super::share::{gone_instance, Share};
use super::sync::SyncMarker;
use super::topics::{instance_topic, BEACONS, BROKER_TOPIC, INSTANCES};
use super::tracker::Tracker;
use crate::broker::{Findings, Lack, Requirement};
use crate::clock::Clock;
use crate::config::{MqttConfig, PresenceConfig};
use crate::device::now_ms;
use crate::health::{Health, MqttLink};
use crate::held::Held;
use crate::metrics::Metrics;
use crate::pulse::{Pulse, Synced};
use crate::status::{Delivered, StatusOut};
use crate::telemetry::{Backoff, LogLimiter};

/// Statuses in flight (queued in the client or awaiting PUBACK) at most.
const INFLIGHT: usize = 100;
/// How often the task looks at the shared subscription and at the process's stalls while no
/// message comes.
const WATCHDOG: Duration = Duration::from_millis(200);
/// Short: with a shared subscription (clean sessions) heartbeats sent while no replica is
/// connected are dropped by the broker, so reconnecting fast after a broker restart matters.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// The MQTT task: polls the event loop, ingests heartbeats, publishes statuses.
///
/// After every connection it publishes a sync marker (see `sync`): only once it is back does
/// `ingest` say the backlog is in.
pub(crate) struct MqttTask {
    pub(crate) cfg: MqttConfig,
    pub(crate) presence: PresenceConfig,
    pub(crate) metrics: Metrics,
    pub(crate) health: Arc<Health>,
    pub(crate) held: Arc<Held>,
    pub(crate) clock: Arc<Clock>,
    /// Replicas whose presence says offline (see `presence::Stamper`).
    pub(crate) gone: mpsc::Sender<String>,
    /// Whether this replica reaches Redis (see `share`).
    pub(crate) redis_ok: watch::Receiver<bool>,
    pub(crate) out_rx: mpsc::Receiver<StatusOut>,
    pub(crate) ack_tx: mpsc::Sender<Delivered>,
    /// Woken when the broker lost our session: every device's status is published again.
    pub(crate) republish: Arc<Notify>,
    /// `Some(t)`: connected, and every heartbeat queued for us before `t.at` has been
    /// received.
    pub(crate) ingest: watch::Sender<Option<Synced>>,
    /// The process's stalls: after one, heartbeats may wait unread in the socket.
    pub(crate) pulse: Arc<Pulse>,
}

/// What the loop does after a handler.
enum Flow {
    Continue,
    Stop,
    /// The connection is gone: wait this long (or until cancelled) before polling again,
    /// which reconnects (rumqttc has no delay of its own).
    Pause(Duration),
}

impl MqttTask {
    pub(crate) async fn run(mut self, token: CancellationToken) {
        let (probe_tx, mut probe_rx) = mpsc::channel(1);
        let (mut session, mut eventloop) = Session::connect(&self, probe_tx);
        let out_rx = &mut self.out_rx;
        if let Flow::Stop = session.queue_marker(&token).await {
            session.stopped();
            return;
        }
        loop {
            if let Flow::Stop = session.prepare(out_rx) {
                break;
            }
            let (tick, watch_at, sync_at) = session.timers();
            let flow = tokio::select! {
                biased;
                () = token.cancelled(), if session.shutdown.phase() == Phase::Running => session.on_cancel(),
                () = tokio::time::sleep_until(tick) => session.on_tick(),
                () = tokio::time::sleep_until(watch_at) => session.on_watchdog(),
                () = tokio::time::sleep_until(sync_at), if session.sync.outstanding() => session.on_sync_timeout(),
                ev = eventloop.poll() => session.on_event(ev),
                out = out_rx.recv(), if session.can_take() => session.on_status(out),
                Some((connection, found)) = probe_rx.recv() => session.on_probe(connection, found),
            };
            match flow {
                Flow::Continue => {}
                Flow::Stop => break,
                Flow::Pause(delay) => {
                    if let Flow::Stop = session.pause(delay, &token).await {
                        break;
                    }
                    if let Flow::Stop = session.queue_marker(&token).await {
                        break;
                    }
                }
            }
        }
        session.stopped();
    }
}

/// One session's state, across reconnections.
struct Session {
    client: Client,
    instance: String,
    /// Heartbeats first.
    filters: Vec<String>,
    /// The will subscription, second in `filters`, if wills are read.
    will_filter: Option<String>,
    status_topic: StatusTopics,
    tracker: Tracker,
    /// To be moved into the client, in order, as soon as there is room.
    resend: VecDeque<Outgoing>,
    connected: bool,
    backoff: Backoff,
    shutdown: Shutdown,
    /// The status channel is open.
    out_open: bool,
    sync: SyncMarker,
    share: Option<Share>,
    ingest: Ingest,
    watch_at: Instant,
    pulse: Arc<Pulse>,
    /// The process's stall count when we last looked.
    stalls: u64,
    health: Arc<Health>,
    metrics: Metrics,
    clock: Arc<Clock>,
    gone: mpsc::Sender<String>,
    ack_tx: mpsc::Sender<Delivered>,
    republish: Arc<Notify>,
    connection_log: LogLimiter,
    refused_log: LogLimiter,
    broker: BrokerProbe,
}

/// The broker probe of the current connection (see `probe`).
struct BrokerProbe {
    cfg: MqttConfig,
    /// Counts the connections: a probe's findings are for the one it was started on.
    connection: u64,
    /// The findings for this connection, once in.
    found: Option<Findings>,
    /// The backlog is in and the gate waits for the findings.
    gate_waits: bool,
    task: Option<tokio::task::JoinHandle<()>>,
    tx: mpsc::Sender<(u64, Findings)>,
}

impl BrokerProbe {
    /// A new connection: a probe of its own (the previous one, if still running, is moot).
    fn start(&mut self) {
        self.connection += 1;
        self.found = None;
        self.gate_waits = false;
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let (cfg, tx, connection) = (self.cfg.clone(), self.tx.clone(), self.connection);
        let id = format!("{}-probe-{:08x}", cfg.client_id, fastrand::u32(..));
        self.task = Some(tokio::spawn(async move {
            let found = probe(&cfg, id, cfg.shared_group.as_deref()).await;
            let _ = tx.send((connection, found)).await;
        }));
    }

    /// Whether expiries may be decided on what this connection delivers: without a shared
    /// group always; with one, once the probe did not find shared subscriptions missing
    /// (a probe that could not tell holds nothing up).
    fn gate_may_open(&self) -> bool {
        self.cfg.shared_group.is_none()
            || self
                .found
                .as_ref()
                .is_some_and(|f| !f.lacks(Lack::SharedSubscriptions))
    }
}

impl Drop for BrokerProbe {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Session {
    /// The client (nothing connects until the event loop is polled) and the session.
    fn connect(task: &MqttTask, probes: mpsc::Sender<(u64, Findings)>) -> (Session, EventLoop) {
        let cfg = &task.cfg;
        let instance = cfg.client_id.clone();
        let (client, eventloop) = client(ConnectOptions {
            cfg,
            client_id: instance.clone(),
            session: if cfg.persistent_session() {
                SessionMode::Persistent
            } else {
                SessionMode::Clean
            },
            will: Some((instance_topic(&instance), offline_payload(&instance))),
            inflight: INFLIGHT as u16,
            // A shared-subscription member that stops must lose its share soon (the broker
            // drops it after 1.5 × keep-alive), well within the floor lease.
            keep_alive: if cfg.shared_group.is_some() {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(15)
            },
        });
        let sync = SyncMarker::new(&instance, task.ingest.clone());
        // Heartbeats first (the SUBACK's first code says whether we get them).
        let shared: Vec<String> = [Some(cfg.heartbeat_filter()), cfg.will_filter()]
            .into_iter()
            .flatten()
            .collect();
        let mut filters = shared.clone();
        filters.extend([sync.topic().to_owned(), BROKER_TOPIC.to_owned()]);
        // The replicas' presence, for the status page (and, sharing, for the floors).
        filters.push(instance_topic("+"));
        let share = cfg.shared_group.as_ref().map(|group| {
            filters.extend(Share::filters(group));
            let (redis_ok, health) = (task.redis_ok.clone(), task.health.clone());
            Share::new(group, &instance, shared, redis_ok, health)
        });
        let ingest = Ingest::new(
            cfg,
            task.presence.clone(),
            task.metrics.clone(),
            task.held.clone(),
        );
        let session = Session {
            client,
            instance,
            filters,
            will_filter: cfg.will_filter(),
            status_topic: StatusTopics {
                device: cfg.status_topic.clone(),
                group: cfg.group_topic.clone(),
            },
            tracker: Tracker::default(),
            resend: VecDeque::new(),
            connected: false,
            backoff: Backoff::new(BACKOFF_CAP),
            shutdown: Shutdown::new(),
            out_open: true,
            sync,
            share,
            ingest,
            watch_at: Instant::now() + WATCHDOG,
            pulse: task.pulse.clone(),
            stalls: task.pulse.reader_beat(),
            health: task.health.clone(),
            metrics: task.metrics.clone(),
            clock: task.clock.clone(),
            gone: task.gone.clone(),
            ack_tx: task.ack_tx.clone(),
            republish: task.republish.clone(),
            connection_log: LogLimiter::new(Duration::from_secs(30)),
            refused_log: LogLimiter::new(Duration::from_secs(10)),
            broker: BrokerProbe {
                cfg: cfg.clone(),
                connection: 0,
                found: None,
                gate_waits: false,
                task: None,
                tx: probes,
            },
        };
        (session, eventloop)
    }

    /// Waits `delay` before reconnecting (unless cancelled: [`Flow::Stop`]), noting for the
    /// pulse meanwhile: a reader that waits on purpose is not a reader held up.
    async fn pause(&mut self, delay: Duration, token: &CancellationToken) -> Flow {
        let until = Instant::now() + delay;
        while Instant::now() < until {
            tokio::select! {
                () = token.cancelled() => return Flow::Stop,
                () = tokio::time::sleep_until(until.min(Instant::now() + WATCHDOG)) => {}
            }
            self.look_for_a_stall();
        }
        Flow::Continue
    }

    /// Before (re)connecting a persistent session: a marker into our offline queue (see
    /// `queued`), noting for the pulse meanwhile.
    async fn queue_marker(&mut self, token: &CancellationToken) -> Flow {
        if !self.broker.cfg.persistent_session() {
            return Flow::Continue;
        }
        let cfg = self.broker.cfg.clone();
        let topic = self.sync.topic().to_owned();
        let put = queued::put(&cfg, &topic);
        tokio::pin!(put);
        loop {
            tokio::select! {
                () = token.cancelled() => return Flow::Stop,
                stored = &mut put => {
                    if let Some(marker) = stored {
                        self.sync.queued(marker);
                    }
                    return Flow::Continue;
                }
                () = tokio::time::sleep(WATCHDOG) => self.look_for_a_stall(),
            }
        }
    }

    /// Connected and not shutting down.
    fn live(&self) -> bool {
        self.connected && self.shutdown.phase() == Phase::Running
    }

    /// Room for one more status from the channel.
    fn can_take(&self) -> bool {
        self.connected
            && self.out_open
            && matches!(self.shutdown.phase(), Phase::Running | Phase::Draining)
            && self.tracker.len() < INFLIGHT
            && self.resend.is_empty()
    }

    /// When the shutdown tick, the watchdog and the sync marker's wait are due.
    fn timers(&self) -> (Instant, Instant, Instant) {
        let tick = self.shutdown.tick_at();
        (tick, self.watch_at, self.sync.deadline())
    }

    fn try_send(&self, out: &Outgoing) -> Result<(), Error> {
        let payload = out.payload.clone();
        self.client
            .try_publish(&out.topic, Qos::AtLeastOnce, out.retain, payload)
    }

    /// Before each wait: what must be sent again goes into the client first, in order; then
    /// the shutdown moves on (once no status waits in `statuses` either).
    fn prepare(&mut self, statuses: &mpsc::Receiver<StatusOut>) -> Flow {
        while self.connected
            && self.shutdown.phase() != Phase::Disconnecting
            && self.tracker.len() < INFLIGHT
        {
            let Some(out) = self.resend.pop_front() else {
                break;
            };
            if self.try_send(&out).is_err() {
                self.resend.push_front(out);
                break;
            }
            self.tracker.queue(out);
        }
        loop {
            let outstanding = Outstanding {
                connected: self.connected,
                in_flight: self.tracker.len(),
                waiting: !self.resend.is_empty() || !statuses.is_empty(),
            };
            match self.shutdown.step(&outstanding) {
                Step::Wait => return Flow::Continue,
                Step::Stop => return Flow::Stop,
                Step::Leave => self.leave(),
                Step::Disconnect => {
                    let _ = self.client.try_disconnect();
                }
            }
        }
    }

    /// Statuses flushed (or out of time): the offline presence, since a clean disconnect
    /// does not fire the will.
    fn leave(&mut self) {
        let out = Outgoing::offline(&self.instance);
        if self.try_send(&out).is_ok() {
            self.tracker.queue(out);
        }
    }

    fn on_cancel(&mut self) -> Flow {
        self.shutdown.cancel();
        Flow::Continue
    }

    fn on_tick(&mut self) -> Flow {
        if self.shutdown.gave_up() {
            return Flow::Stop;
        }
        Flow::Continue
    }

    fn on_watchdog(&mut self) -> Flow {
        self.watch_at = Instant::now() + WATCHDOG;
        self.look_for_a_stall();
        if !self.live() {
            return Flow::Continue;
        }
        if let Some(share) = self.share.as_mut() {
            share.tick(&self.client);
        }
        Flow::Continue
    }

    /// Before a message is handled (and at every watchdog tick): if the process stalled
    /// since we last looked, heartbeats may wait unread behind our last sync marker. Those
    /// read from now on count as on time, and a fresh marker tells when they are in. Asked
    /// *before* the message is stamped, so that no task's timer has to fire first.
    fn look_for_a_stall(&mut self) {
        let stalls = self.pulse.reader_beat();
        if stalls == self.stalls {
            return;
        }
        self.stalls = stalls;
        // Disconnected: the next connection's marker carries the count. Shutting down, the
        // marker still goes out with the flush, until the DISCONNECT is queued.
        if !self.connected {
            return;
        }
        warn!("The process was stalled; heartbeats read until the sync marker is back count as on time.");
        if self.shutdown.phase() == Phase::Disconnecting {
            self.sync.stalled();
        } else {
            self.resend.push_front(self.sync.restart(stalls));
        }
    }

    fn on_sync_timeout(&mut self) -> Flow {
        warn!("Sync marker did not come back; assuming queued heartbeats were delivered.");
        self.backlog_in();
        Flow::Continue
    }

    /// Every heartbeat queued for us has been read (or we stopped waiting for it).
    fn backlog_in(&mut self) {
        if self.sync.finish() {
            // Without the broker's retained marker after a ConnAck without session, the
            // broker lost its retained messages (or never had ours): every device's status
            // is republished, once for all replicas (a job in Redis), and the marker set
            // again.
            warn!(
                "The broker has none of our retained messages; republishing every device's status."
            );
            self.republish.notify_one();
            self.resend.push_back(Outgoing::broker_marker());
        }
        self.broker.gate_waits = true;
        self.open_gate();
    }

    /// Opens the gate once the backlog is in and the probe does not hold it (see
    /// [`BrokerProbe::gate_may_open`]).
    fn open_gate(&mut self) {
        if self.broker.gate_waits && self.broker.gate_may_open() {
            self.broker.gate_waits = false;
            self.sync.open();
        }
    }

    /// A probe's findings: logged, in `/readyz` and the metrics, and the gate may open.
    fn on_probe(&mut self, connection: u64, found: Findings) -> Flow {
        if connection != self.broker.connection || !self.connected {
            return Flow::Continue;
        }
        match &found {
            Findings::Known(missing) => {
                for lack in missing {
                    match lack.required() {
                        Requirement::Required => error!("{}", lack.explain()),
                        Requirement::Degrades => warn!("{}", lack.explain()),
                    }
                }
                if missing.contains(&Lack::SharedSubscriptions) {
                    error!("Expiries are not decided by this replica until a connection to a broker that serves shared subscriptions.");
                }
            }
            Findings::Unknown(why) => {
                warn!(reason = %why, "Could not probe what the broker supports; going on as if it supported everything.");
            }
            Findings::Pending => {}
        }
        self.health.set_broker(found.clone());
        self.broker.found = Some(found);
        self.open_gate();
        Flow::Continue
    }

    fn on_status(&mut self, out: Option<StatusOut>) -> Flow {
        let Some(status) = out else {
            self.out_open = false;
            return Flow::Continue;
        };
        let out = Outgoing::status(status, &self.status_topic);
        match self.try_send(&out) {
            Ok(()) => self.tracker.queue(out),
            Err(_) => self.resend.push_back(out),
        }
        Flow::Continue
    }

    fn on_event(&mut self, ev: Result<Event, Error>) -> Flow {
        match ev {
            Ok(Event::ConnAck {
                session_present, ..
            }) => self.on_connack(session_present),
            Ok(Event::SubAck { granted }) => self.on_suback(&granted),
            Ok(Event::Publish {
                topic,
                payload,
                retained,
            }) => self.on_publish(&topic, &payload, retained),
            Ok(Event::Sent { pkid }) => self.tracker.sent(pkid),
            Ok(Event::PubAck { pkid, ok, reason }) => self.on_puback(pkid, ok, &reason),
            Ok(Event::Disconnected) if self.shutdown.phase() == Phase::Disconnecting => {
                return Flow::Stop
            }
            Ok(Event::Disconnected | Event::Other) => {}
            Err(e) => return self.on_error(&e),
        }
        Flow::Continue
    }

    fn on_connack(&mut self, session_present: bool) {
        self.connected = true;
        self.backoff.reset();
        info!(session_present, "Connected to the MQTT broker.");
        if !session_present {
            // The client dropped whatever it held.
            let dropped = self.tracker.take_all().into_iter();
            self.resend
                .extend(dropped.filter(|o| matches!(o.kind, Kind::Status { .. })));
        }
        self.stalls = self.pulse.reader_beat();
        let marker = self.sync.connected(session_present, self.stalls);
        self.broker.start();
        if let Some(share) = self.share.as_mut() {
            share.joined();
        }
        if let Err(e) = self.client.try_subscribe_many(&self.filters) {
            error!(error = %e, "Could not queue the subscription.");
        }
        // Our presence first, then the marker.
        self.resend.push_front(marker);
        self.resend
            .push_front(Outgoing::online(&self.instance, now_ms()));
    }

    fn on_suback(&self, granted: &[bool]) {
        if let Some(wills) = self.will_filter.as_ref() {
            if granted.get(1) == Some(&false) {
                error!(filter = %wills, "The broker refused the will subscription; wills are not read.");
            }
        }
        let heartbeats = &self.filters[0];
        if granted.first() == Some(&true) {
            self.health.set_mqtt(MqttLink::Subscribed);
            info!(filter = %heartbeats, "Subscribed to heartbeats.");
        } else {
            error!(filter = %heartbeats, "The broker refused the heartbeat subscription.");
            self.health.set_mqtt(MqttLink::Connected);
        }
    }

    fn on_publish(&mut self, topic: &Bytes, payload: &Bytes, retained: bool) {
        self.look_for_a_stall();
        if topic.as_ref() == BROKER_TOPIC.as_bytes() {
            self.sync.broker_marker_seen();
        } else if topic.starts_with(BEACONS.as_bytes()) {
            if let Some(share) = self.share.as_mut() {
                share.beacon(topic);
            }
        } else if topic.starts_with(INSTANCES.as_bytes()) {
            if let Ok(who) = std::str::from_utf8(&topic[INSTANCES.len()..]) {
                self.health.instances.note(who, payload);
            }
            if let Some(who) = gone_instance(topic, payload) {
                // Full: the floor's lease ends it anyway.
                let _ = self.gone.try_send(who);
            }
        } else if self.ingest.is_will(topic) {
            let delivery = if retained {
                Delivery::Replay
            } else {
                Delivery::Live
            };
            self.ingest.will(topic, payload, delivery);
        } else if retained {
            // A replay of a retained message because we (re)subscribed: not news.
        } else if topic.as_ref() == self.sync.topic().as_bytes() {
            if self.sync.arrived(payload) {
                self.backlog_in();
                debug!("Queued heartbeats delivered.");
            }
        } else {
            self.sync.heartbeat_read();
            self.heartbeat(topic, payload);
        }
    }

    /// Holds a heartbeat. Its stamp is chosen after its arrival time is read (see
    /// `Held::insert`), with a last look at the pulse: a stall between the look before this
    /// message and that reading makes it count as on time too.
    fn heartbeat(&mut self, topic: &Bytes, payload: &Bytes) {
        let (pulse, seen, stamp) = (&self.pulse, self.stalls, self.sync.stamp());
        let mut stalled = false;
        self.ingest.heartbeat(topic, payload, || {
            if pulse.reader_beat() == seen {
                stamp
            } else {
                stalled = true;
                stamp.after_stall()
            }
        });
        if stalled {
            self.look_for_a_stall();
        }
    }

    fn on_puback(&mut self, pkid: u16, ok: bool, reason: &str) {
        let Some(out) = self.tracker.acked(pkid) else {
            return;
        };
        if !ok {
            // Not stored by the broker; the outbox lease publishes it again.
            if let Some(n) = self.refused_log.check() {
                error!(topic = %out.topic, %reason, suppressed = n, "The broker refused a status.");
            }
            return;
        }
        let Kind::Status { ack, lag_from } = out.kind else {
            return;
        };
        if let Some(deadline) = lag_from {
            // Both on the bucket master's clock.
            let acked_at = self.clock.now(ack.receipt.bucket);
            self.metrics
                .observe_lag(acked_at.saturating_sub(deadline) as f64 / 1000.0);
        }
        // Full: dropped; the outbox lease publishes it once more.
        let _ = self.ack_tx.try_send(ack);
    }

    fn on_error(&mut self, e: &Error) -> Flow {
        if self.shutdown.phase() != Phase::Running {
            return Flow::Stop;
        }
        if self.connected {
            warn!(error = %e, "Lost the MQTT connection; reconnecting.");
        } else {
            if e.is_refused() {
                self.sync.refused();
            }
            if let Some(n) = self.connection_log.check() {
                let hint = e.hint().unwrap_or_default();
                warn!(error = %e, hint, suppressed = n, "Cannot connect to the MQTT broker; retrying.");
            }
        }
        self.connected = false;
        self.health.set_mqtt(MqttLink::Down);
        self.sync.lost();
        self.broker.gate_waits = false;
        Flow::Pause(self.backoff.next_delay())
    }

    /// However the loop ended: not connected, no backlog gate, no more heartbeats.
    fn stopped(&self) {
        self.health.set_mqtt(MqttLink::Down);
        self.sync.close();
        self.ingest.close();
        info!("MQTT task stopped.");
    }
}
