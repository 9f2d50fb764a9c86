//! `presenced simulate`: a fleet of N devices heartbeating over MQTT, a fraction of which go
//! silent after their first heartbeat, optionally in groups, some of which go silent for a
//! while (an outage); with `--will-topic` a device that goes silent publishes its will, as
//! the broker would for a dropped connection. For demos, tests and benchmarks; it needs only
//! the broker. What the fleet does is `plan`; this file publishes it.
//!
//! Schedule: heartbeat `j` (device `j mod N`, round `j / N`) is due at `j × interval / N`
//! after the start, so the first round is spread over the first interval and every device
//! keeps its phase. The devices share a few MQTT connections (QoS 1, so a broker holding a
//! persistent session for the monitor queues them while it restarts).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::MqttConfig;
use crate::mqtt::{self, Client, ConnectOptions, Event, EventLoop, Qos};

mod plan;

pub use plan::{device_name, group_name, Outage, SimError, SimOptions, WILL_PAYLOAD};

/// Devices per MQTT connection (at most [`MAX_CONNECTIONS`] connections).
const DEVICES_PER_CONNECTION: usize = 25_000;
const MAX_CONNECTIONS: usize = 8;
/// How often a progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What the simulator did.
#[derive(Debug, Clone, Copy)]
pub struct SimReport {
    pub sent: u64,
    pub elapsed: Duration,
}

/// Runs the simulator until `--duration` or `stop`; prints progress lines to stdout.
pub async fn run(
    cfg: &MqttConfig,
    opts: SimOptions,
    stop: impl Future<Output = ()>,
) -> Result<SimReport, SimError> {
    opts.validate()?;
    let token = CancellationToken::new();
    let (clients, loops) = connect(cfg, &opts, &token);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = tokio::spawn(report_progress(
        sent.clone(),
        token.clone(),
        opts.devices,
        opts.silent(),
    ));
    tokio::select! {
        () = publish(cfg, &opts, &clients, &sent, started) => {}
        () = stop => {}
    }
    token.cancel();
    for l in loops {
        let _ = l.await;
    }
    let _ = progress.await;
    let report = SimReport {
        sent: sent.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    };
    println!(
        "simulate: done sent={} in {:.1}s",
        report.sent,
        report.elapsed.as_secs_f64()
    );
    Ok(report)
}

/// The devices' connections, each with a task polling its event loop until `token`.
fn connect(
    cfg: &MqttConfig,
    opts: &SimOptions,
    token: &CancellationToken,
) -> (Vec<Client>, Vec<JoinHandle<()>>) {
    let conns = opts
        .devices
        .div_ceil(DEVICES_PER_CONNECTION)
        .clamp(1, MAX_CONNECTIONS);
    let run_id = fastrand::u32(..);
    (0..conns)
        .map(|c| {
            let (client, eventloop) = mqtt::client(ConnectOptions {
                cfg,
                client_id: format!("{}-sim-{run_id:08x}-{c}", opts.prefix),
                session: mqtt::SessionMode::Clean,
                will: None,
                inflight: 100,
                keep_alive: Duration::from_secs(30),
            });
            (client, tokio::spawn(poll(eventloop, c, token.clone())))
        })
        .unzip()
}

/// Polls one connection's event loop (reconnecting) until `token`, then lets queued
/// publishes go out before closing.
async fn poll(mut eventloop: EventLoop, connection: usize, token: CancellationToken) {
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            ev = eventloop.poll() => match ev {
                Ok(Event::ConnAck { .. }) => debug!(connection, "Simulator connected."),
                Ok(_) => {}
                Err(e) => {
                    warn!(connection, error = %e, "Simulator connection failed; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(_)) = tokio::time::timeout_at(deadline, eventloop.poll()).await {}
}

/// A progress line every [`PROGRESS_EVERY`] until `token`.
async fn report_progress(sent: Arc<AtomicU64>, token: CancellationToken, n: usize, silent: usize) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    let mut last = 0;
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = tick.tick() => {
                let now = sent.load(Ordering::Relaxed);
                let rate = (now - last) as f64 / PROGRESS_EVERY.as_secs_f64();
                println!("simulate: sent={now} rate={rate:.0}/s devices={n} silent={silent}");
                last = now;
            }
        }
    }
}

/// The schedule (see the module's doc), until `--duration` or a client is gone.
async fn publish(
    cfg: &MqttConfig,
    opts: &SimOptions,
    clients: &[Client],
    sent: &AtomicU64,
    started: Instant,
) {
    let n = opts.devices;
    let step_ns = (opts.interval.as_nanos() / n as u128).max(1);
    let due = |j: u64| started + Duration::from_nanos((j as u128 * step_ns) as u64);
    let end = opts.duration.map(|d| started + d);
    let mut j: u64 = 0;
    loop {
        // Stop at the end of the schedule, and at the wall-clock end when the broker
        // cannot keep up with the schedule.
        if end.is_some_and(|e| due(j) >= e || Instant::now() >= e) {
            break;
        }
        tokio::time::sleep_until(due(j)).await;
        // Everything due by now, in one go.
        let now = Instant::now();
        while due(j) <= now {
            let i = (j % n as u64) as usize;
            let round = j / n as u64;
            j += 1;
            let elapsed = now - started;
            // `validate` proved every generated id valid.
            let message = if opts.heartbeats(i, round, elapsed) {
                opts.heartbeat(&cfg.heartbeat_topic, i)
            } else if opts.stops(i, round, elapsed) {
                opts.will(i)
            } else {
                None
            };
            let Some((topic, payload)) = message else {
                continue;
            };
            let client = &clients[i % clients.len()];
            if client
                .publish(topic, Qos::AtLeastOnce, payload)
                .await
                .is_err()
            {
                return;
            }
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}
