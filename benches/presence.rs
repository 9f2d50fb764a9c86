//! The presenced benchmark: real redis-server, mosquitto and the release `presenced` binary on
//! loopback, every figure next to a reference measured in the same run.
//!
//!     cargo bench --bench presence            # full run, writes benches/RESULTS.md + lag CSVs
//!     cargo bench --bench presence -- --quick # small smoke run (CI), writes target/tmp/bench-quick.md
//!
//! 1. Ingest ceiling: heartbeats/s presenced applies to Redis, vs the raw broker delivery rate
//!    to a plain subscriber, vs a naive monitor doing one Redis round trip per heartbeat.
//! 2. Lag, steady churn and mass expiry: offline status at an MQTT subscriber minus the TTL
//!    deadline, vs Redis's own `expired` events for shadow keys with the same deadlines, vs
//!    (mass) the time the broker alone needs to carry as many retained QoS 1 messages.
//! 3. Footprint: Redis bytes per device; the monitor's peak RSS at two fleet sizes.
//! 4. Restart recovery: devices expired while no monitor ran; start → last offline status.
//! 5. Ingest on Redis Cluster: the ingest figure with 3 local masters vs 1 Redis, same run.
//! 6. Groups: ingest with every heartbeat naming one of 1,000 groups vs none; a one-group
//!    mass expiry: the outage's detection after the crossing, and the last device status at
//!    a subscriber vs the broker alone carrying as many retained QoS 1 messages.
//! 7. Wills: devices with real MQTT wills drop their connections within 1 s; from each will's
//!    arrival at a plain subscriber (the broker's publish of it, as seen by anyone) to the
//!    device's offline status at a subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use presenced::beat::Beat;
use presenced::bucket::BUCKETS;
use presenced::device::{now_ms, DeviceId};
use presenced::store::Store;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use support::*;

struct Sizes {
    ingest_msgs: usize,
    ingest_devices: usize,
    lag_devices: usize,
    spread: Duration,
    footprint: [usize; 2],
    recovery: usize,
    group_devices: usize,
    group_outage: usize,
    will_devices: usize,
}

const FULL: Sizes = Sizes {
    ingest_msgs: 400_000,
    ingest_devices: 20_000,
    lag_devices: 100_000,
    spread: Duration::from_secs(30),
    footprint: [100_000, 1_000_000],
    recovery: 100_000,
    group_devices: 100_000,
    group_outage: 10_000,
    will_devices: 10_000,
};

const QUICK: Sizes = Sizes {
    ingest_msgs: 20_000,
    ingest_devices: 2_000,
    lag_devices: 5_000,
    spread: Duration::from_secs(5),
    footprint: [5_000, 50_000],
    recovery: 5_000,
    group_devices: 5_000,
    group_outage: 2_000,
    will_devices: 300,
};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick { QUICK } else { FULL };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let report = rt.block_on(run(&sizes, quick));
    let took = started.elapsed();
    let text = render(&report, quick, took);
    println!("{text}");
    if std::env::var_os("BENCH_ONLY").is_some() {
        return; // a partial run does not replace the results
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // Quick results go to Cargo's scratch folder for benches, which exists wherever
    // `CARGO_TARGET_DIR` points.
    let out = if quick {
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-quick.md")
    } else {
        root.join("benches/RESULTS.md")
    };
    std::fs::write(&out, &text).unwrap();
    if !quick {
        for (name, samples) in &report.samples {
            let mut csv = String::from("lag_ms\n");
            for s in samples {
                let _ = writeln!(csv, "{s}");
            }
            std::fs::write(root.join(format!("benches/lag-{name}.csv")), csv).unwrap();
        }
        let plotted = Command::new("python3")
            .arg(root.join("benches/plot.py"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !plotted {
            eprintln!("plot skipped: python3 with matplotlib is needed for benches/plot.py");
        }
    }
    eprintln!("wrote {}", out.display());
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String)>,
    samples: Vec<(String, Vec<i64>)>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, what: &str, value: String, reference: String) {
        eprintln!("{what}: {value} ({reference})");
        self.rows.push((what.into(), value, reference));
    }
}

/// Percentile of sorted samples (nearest rank).
fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return -1;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(mut v: Vec<i64>, total: usize) -> (String, Vec<i64>) {
    v.sort_unstable();
    let s = format!(
        "p50 {} ms, p99 {} ms, max {} ms ({} of {} delivered)",
        pct(&v, 0.5),
        pct(&v, 0.99),
        v.last().copied().unwrap_or(-1),
        v.len(),
        total
    );
    (s, v)
}

async fn run(s: &Sizes, quick: bool) -> Report {
    let mut r = Report::default();
    // BENCH_ONLY=ingest|steady|mass|footprint|recovery|cluster|groups|wills runs one part (for
    // investigation); BENCH_ONLY=outage only the group outage of `groups`.
    let only = std::env::var("BENCH_ONLY").ok();
    let part = |p: &str| only.as_deref().is_none_or(|o| o == p);
    if part("ingest") {
        ingest(s, &mut r).await;
    }
    if part("steady") {
        lag(s, &mut r, false).await;
    }
    if part("mass") {
        lag(s, &mut r, true).await;
    }
    if part("footprint") {
        footprint(s, &mut r).await;
    }
    if part("recovery") {
        recovery(s, &mut r).await;
    }
    if part("cluster") {
        cluster_ingest(s, &mut r).await;
    }
    if part("groups") {
        group_ingest(s, &mut r).await;
    }
    if part("groups") || only.as_deref() == Some("outage") {
        group_outage(s, &mut r).await;
    }
    if part("wills") {
        wills(s, &mut r).await;
    }
    if quick {
        r.notes
            .push("Quick mode: small sizes, a smoke test; the figures say little.".into());
    }
    r
}

// === Helpers ===

/// The release monitor as a process, with a TTL long enough not to interfere.
fn monitor(redis: &RedisServer, mqtt: &Mosquitto, extra: &[&str]) -> (Child, std::net::SocketAddr) {
    monitor_on(&["--redis-url".into(), redis.url()], mqtt, extra)
}

/// [`monitor`] with the Redis arguments given (e.g. `--redis-cluster-nodes`).
fn monitor_on(
    redis_args: &[String],
    mqtt: &Mosquitto,
    extra: &[&str],
) -> (Child, std::net::SocketAddr) {
    let http = free_port();
    let child = Command::new(presenced_bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "error")
        .args(redis_args)
        .args(["--mqtt-url", &mqtt.url()])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--presence-ttl", "600s", "--presence-max-ttl", "1h"])
        .args([
            "--mqtt-client-id",
            &format!("bench-{:08x}", fastrand::u32(..)),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, format!("127.0.0.1:{http}").parse().unwrap())
}

fn stop(mut child: Child) {
    kill(&child, "-TERM");
    let _ = child.wait();
}

fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Publishes `n` heartbeats (devices cycling over `devices`) from two connections as fast
/// as the broker takes them. `payload(i)` gives heartbeat `i`'s payload.
async fn blast(
    mqtt: &Mosquitto,
    n: usize,
    devices: usize,
    payload: impl Fn(usize) -> Vec<u8> + Sync,
) {
    let a = Devices::connect(mqtt).await;
    let b = Devices::connect(mqtt).await;
    async fn half(
        pubr: &Devices,
        parity: usize,
        n: usize,
        devices: usize,
        payload: &(impl Fn(usize) -> Vec<u8> + Sync),
    ) {
        for i in (parity..n).step_by(2) {
            pubr.heartbeat(&format!("dev-{:07}", i % devices), &payload(i))
                .await;
        }
    }
    tokio::join!(
        half(&a, 0, n, devices, &payload),
        half(&b, 1, n, devices, &payload)
    );
    // Let the clients flush what they queued.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// A plain MQTT subscriber counting messages; returns a handle to (count, last arrival).
async fn counter(mqtt: &Mosquitto, filter: &str) -> Arc<Mutex<(usize, Instant)>> {
    let mut opts = MqttOptions::new(
        format!("count-{:08x}", fastrand::u32(..)),
        "127.0.0.1",
        mqtt.port,
    );
    opts.set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(1000);
    let (client, mut el) = AsyncClient::new(opts, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let state = Arc::new(Mutex::new((0usize, Instant::now())));
    let s = state.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let mut tx = Some(tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(_))) => {
                    let mut g = s.lock().unwrap();
                    g.0 += 1;
                    g.1 = Instant::now();
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    rx.await.unwrap();
    state
}

// === 1. Ingest ===

async fn ingest(s: &Sizes, r: &mut Report) {
    let n = s.ingest_msgs;
    let d = s.ingest_devices;

    // Raw broker delivery to a plain subscriber.
    let raw = {
        let mqtt = Mosquitto::start();
        let c = counter(&mqtt, "devices/+/heartbeat").await;
        let t0 = Instant::now();
        blast(&mqtt, n, d, |_| Vec::new()).await;
        let c2 = c.clone();
        eventually("raw subscriber got everything", || {
            let done = c2.lock().unwrap().0 >= n;
            async move { done.then_some(()) }
        })
        .await;
        let last = c.lock().unwrap().1;
        n as f64 / (last - t0).as_secs_f64()
    };

    // presenced: devices already online, heartbeats refresh them; the end is a sentinel
    // device applied after them.
    let ours = {
        let redis = RedisServer::start();
        let (rate, accepted) = ingest_rate(&["--redis-url".into(), redis.url()], n, d).await;
        if accepted < n + d {
            r.notes.push(format!(
                "ingest: presenced accepted {accepted} of {} heartbeats",
                n + d + 1
            ));
        }
        rate
    };

    // The naive reference: one Redis round trip per heartbeat, awaited, as in the
    // public write-ups of this pattern (SET key PX ttl in the message callback).
    let naive = {
        let redis = RedisServer::start();
        let mqtt = Mosquitto::start();
        let mut opts = MqttOptions::new("naive", "127.0.0.1", mqtt.port);
        opts.set_inflight(1000);
        let (client, mut el) = AsyncClient::new(opts, 100);
        client
            .subscribe("devices/+/heartbeat", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Ok(Event::Incoming(Incoming::SubAck(_))) = el.poll().await {
                break;
            }
        }
        let mut conn = redis.conn().await;
        let done = Arc::new(Mutex::new(0usize));
        let d2 = done.clone();
        let worker = tokio::spawn(async move {
            let _client = client;
            let mut processed = 0;
            while processed < n {
                if let Ok(Event::Incoming(Incoming::Publish(p))) = el.poll().await {
                    let key = format!("naive:{}", p.topic);
                    let _: () = redis::cmd("SET")
                        .arg(key)
                        .arg(1)
                        .arg("PX")
                        .arg(30_000)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    processed += 1;
                    *d2.lock().unwrap() = processed;
                }
            }
            Instant::now()
        });
        let t0 = Instant::now();
        blast(&mqtt, n, d, |_| Vec::new()).await;
        let end = tokio::time::timeout(Duration::from_secs(600), worker)
            .await
            .unwrap()
            .unwrap();
        n as f64 / (end - t0).as_secs_f64()
    };

    r.row(
        "Ingest: heartbeats/s applied by presenced",
        format!("{ours:.0}/s"),
        format!(
            "{:.2} × raw broker delivery ({raw:.0}/s), {:.1} × naive round trip per heartbeat ({naive:.0}/s)",
            ours / raw,
            ours / naive
        ),
    );
}

// === 5. Ingest on Redis Cluster ===

/// The ingest figure of part 1 (fleet online, then `n` refreshing heartbeats; the end is a
/// sentinel device applied after them), once on a single Redis and once on a cluster of 3
/// masters (no replicas), back to back. Everything shares this machine's cores, so this
/// shows what the cluster path costs, not how a cluster scales.
async fn cluster_ingest(s: &Sizes, r: &mut Report) {
    let n = s.ingest_msgs / 2;
    let d = s.ingest_devices;
    let single_redis = RedisServer::start();
    let (single, _) = ingest_rate(&["--redis-url".into(), single_redis.url()], n, d).await;
    drop(single_redis);
    let cluster = RedisCluster::start_with(3, 0).await;
    let (clustered, _) =
        ingest_rate(&["--redis-cluster-nodes".into(), cluster.seeds()], n, d).await;
    r.row(
        "Ingest on Redis Cluster (3 local masters): heartbeats/s applied",
        format!("{clustered:.0}/s"),
        format!(
            "{:.2} × one Redis ({single:.0}/s), same run, same sizes ({n} heartbeats over {d} devices)",
            clustered / single
        ),
    );
}

/// Heartbeats/s the monitor applies with the given Redis arguments, and how many heartbeats
/// it accepted in all; the end is when the API shows the sentinel device (its heartbeat is
/// sent after all the others, so it is applied in the last batch).
async fn ingest_rate(redis_args: &[String], n: usize, d: usize) -> (f64, usize) {
    ingest_rate_of(redis_args, n, d, &|_| Vec::new(), &[]).await
}

/// [`ingest_rate`] with heartbeat `i`'s payload given (the same for the fleet's first
/// heartbeats and the measured ones).
async fn ingest_rate_of(
    redis_args: &[String],
    n: usize,
    d: usize,
    payload: &(impl Fn(usize) -> Vec<u8> + Sync),
    extra: &[&str],
) -> (f64, usize) {
    let mqtt = Mosquitto::start();
    let (child, addr) = monitor_on(redis_args, &mqtt, extra);
    wait_ready(addr).await;
    blast(&mqtt, d, d, payload).await;
    eventually("fleet online", || async move {
        let m = scrape(addr).await;
        (metric(&m, r#"presenced_devices{state="online"}"#)? >= d as f64).then_some(())
    })
    .await;
    let t0 = Instant::now();
    blast(&mqtt, n, d, payload).await;
    let sentinel = Devices::connect(&mqtt).await;
    sentinel.heartbeat("sentinel", b"").await;
    loop {
        if let Some((200, _)) = get(addr, "/devices/sentinel").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = t0.elapsed();
    let m = scrape(addr).await;
    let accepted = metric(&m, "presenced_heartbeats_total").unwrap_or(0.0) as usize;
    stop(child);
    (n as f64 / took.as_secs_f64(), accepted)
}

// === 2. Lag ===

async fn lag(s: &Sizes, r: &mut Report, mass: bool) {
    let n = s.lag_devices;
    let name = if mass { "mass" } else { "steady" };
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();

    // For mass expiry: what the broker alone needs to carry n retained QoS 1 statuses.
    let broker_only = if mass {
        Some(broker_carries(&mqtt, n).await)
    } else {
        None
    };

    let (child, addr) = monitor(&redis, &mqtt, &[]);
    wait_ready(addr).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;

    // Redis's own events for shadow keys with the same deadlines.
    let native: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut ps = client.get_async_pubsub().await.unwrap();
        ps.subscribe("__keyevent@0__:expired").await.unwrap();
        let native = native.clone();
        tokio::spawn(async move {
            let mut stream = ps.into_on_message();
            while let Some(m) = stream.next().await {
                let key = String::from_utf8_lossy(m.get_payload_bytes()).into_owned();
                if let Some(id) = key.strip_prefix("native:") {
                    native.lock().unwrap().insert(id.to_owned(), now_ms());
                }
            }
        });
    }

    // Deadlines: T0 + i × spread / n (steady), or all at T0 (mass), T0 after the seeding.
    // Long enough that the online statuses of the seeding are all published before the first
    // deadline: the measurement is of expiries, not of the seeding's tail.
    let seed_budget = Duration::from_secs(if n > 20_000 { 20 } else { 4 });
    let t0 = now_ms() + seed_budget.as_millis() as u64;
    let spread = if mass { 0 } else { s.spread.as_millis() as u64 };
    let deadline = move |i: usize| t0 + spread * i as u64 / n as u64;
    blast(&mqtt, n, n, |i| {
        let ttl_ms = deadline(i).saturating_sub(now_ms()).max(100);
        format!("{{\"ttl_s\": {}}}", ttl_ms as f64 / 1000.0).into_bytes()
    })
    .await;
    let mut conn = redis.conn().await;
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("SET")
                .arg(format!("native:dev-{i:07}"))
                .arg(1)
                .arg("PXAT")
                .arg(deadline(i))
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    let seeded = now_ms();
    if seeded > t0 {
        r.notes.push(format!(
            "lag {name}: seeding overran the first deadline by {} ms",
            seeded - t0
        ));
    }

    // Wait for every offline status (and give Redis's own events as long again, capped).
    let wait_until = Instant::now()
        + Duration::from_millis(t0.saturating_sub(now_ms()) + spread)
        + Duration::from_secs(60);
    loop {
        let offline = statuses.count(|m| m.json["state"] == "offline");
        if offline >= n || Instant::now() > wait_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ours_done = Instant::now();
    let native_wait = ours_done + Duration::from_secs(if mass { 30 } else { 60 });
    while native.lock().unwrap().len() < n && Instant::now() < native_wait {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut sub_lag = Vec::new();
    let mut detect = Vec::new();
    let mut last_arrival = 0;
    // BENCH_DUMP=prefix writes `since,detected_at,arrival` per offline status, for analysis.
    let mut dump = String::new();
    for m in statuses
        .all()
        .iter()
        .filter(|m| m.json["state"] == "offline")
    {
        let since = ms(&m.json["since"]);
        let _ = writeln!(dump, "{since},{},{}", ms(&m.json["detected_at"]), m.at_ms);
        sub_lag.push(m.at_ms as i64 - since as i64);
        detect.push(ms(&m.json["detected_at"]) as i64 - since as i64);
        last_arrival = last_arrival.max(m.at_ms);
    }
    if let Some(prefix) = std::env::var_os("BENCH_DUMP") {
        std::fs::write(format!("{}-{name}.csv", prefix.to_string_lossy()), dump).unwrap();
    }
    let native_lag: Vec<i64> = {
        let nat = native.lock().unwrap();
        (0..n)
            .filter_map(|i| {
                nat.get(&format!("dev-{i:07}"))
                    .map(|t| *t as i64 - deadline(i) as i64)
            })
            .collect()
    };
    let m = scrape(addr).await;
    let hist_p99 = histogram_quantile(&m, 0.99);
    let rss = hwm_kib(child.id());
    stop(child);

    let (ours_s, ours_sorted) = summary(sub_lag, n);
    let (nat_s, nat_sorted) = summary(native_lag, n);
    let (det_s, _) = summary(detect, n);
    let what = if mass {
        format!("Lag, mass expiry of {n} at one instant (status at subscriber − deadline)")
    } else {
        format!(
            "Lag, steady churn of {n} over {} s (status at subscriber − deadline)",
            s.spread.as_secs()
        )
    };
    let ratio = pct(&nat_sorted, 0.99) as f64 / pct(&ours_sorted, 0.99).max(1) as f64;
    r.row(
        &what,
        ours_s,
        format!("Redis's own expired events: {nat_s}; p99 ratio (Redis / presenced) {ratio:.2}"),
    );
    r.row(
        &format!("Lag {name}: Redis-side detection (detected_at − deadline)"),
        det_s,
        format!("presenced_notification_lag_seconds p99 ≤ {hist_p99} s (histogram bucket)"),
    );
    if let Some(b) = broker_only {
        let ours_last = last_arrival.saturating_sub(t0);
        r.row(
            &format!("Mass expiry: deadline → last offline status of {n}"),
            format!("{ours_last} ms"),
            format!(
                "broker alone carries {n} retained QoS 1 in {} ms; ratio {:.2}",
                b.as_millis(),
                ours_last as f64 / b.as_millis().max(1) as f64
            ),
        );
    }
    r.row(
        &format!("Monitor peak RSS, lag {name} ({n} devices)"),
        format!("{} MiB", rss / 1024),
        String::new(),
    );
    r.samples.push((format!("{name}-presenced"), ours_sorted));
    r.samples.push((format!("{name}-redis"), nat_sorted));
}

/// How long the broker alone takes to carry `n` retained QoS 1 statuses from one publisher
/// to one subscriber (the reference of a mass expiry).
async fn broker_carries(mqtt: &Mosquitto, n: usize) -> Duration {
    let c = counter(mqtt, "bench/retained/+").await;
    let p = Devices::connect(mqtt).await;
    let t0 = Instant::now();
    for i in 0..n {
        p.publish_retained(
            &format!("bench/retained/{i}"),
            br#"{"state":"offline","seq":2}"#,
        )
        .await;
    }
    let c2 = c.clone();
    eventually("broker carried every retained message", || {
        let done = c2.lock().unwrap().0 >= n;
        async move { done.then_some(()) }
    })
    .await;
    let last = c.lock().unwrap().1;
    last - t0
}

/// The upper bound of the histogram bucket holding quantile `q` of the lag.
fn histogram_quantile(scrape: &str, q: f64) -> String {
    let count = metric(scrape, "presenced_notification_lag_seconds_count").unwrap_or(0.0);
    for line in scrape
        .lines()
        .filter(|l| l.starts_with("presenced_notification_lag_seconds_bucket"))
    {
        let le = line
            .split("le=\"")
            .nth(1)
            .and_then(|x| x.split('"').next())
            .unwrap_or("");
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if count > 0.0 && v >= q * count {
            return le.to_owned();
        }
    }
    "n/a".into()
}

// === 6. Groups ===

/// Ingest with every heartbeat naming one of 1,000 groups in its payload, vs the same JSON
/// payload without a group (a key the monitor ignores, as long: the cost of the groups
/// alone), vs an empty payload, and the grouped payload with 10 TTL rules (nine id globs with
/// a leading `*` that match no device, each scanning the whole id, then a group glob: the
/// longest path of every heartbeat); same sizes, in
/// rounds of all four back to back (this machine's noise moves single runs by ±20%): the
/// median of the rounds' ratios, and their range.
async fn group_ingest(s: &Sizes, r: &mut Report) {
    const ROUNDS: usize = 5;
    let (n, d) = (s.ingest_msgs, s.group_devices);
    let payload = move |key: &'static str| {
        move |i: usize| format!(r#"{{"{key}":"g-{:04}"}}"#, i % d % 1000).into_bytes()
    };
    let (grouped, ungrouped) = (payload("group"), payload("other"));
    let plain = |_: usize| Vec::new();
    let rules: String = (0..9)
        .map(|i| format!("*-class{i}=10m,"))
        .chain(["group:g-00*=10m".to_owned()])
        .collect();
    let with_rules = ["--presence-ttl-rules", rules.as_str()];
    let mut rounds: Vec<[f64; 4]> = Vec::new();
    for _ in 0..ROUNDS {
        let mut round = [0f64; 4];
        for (k, rate) in round.iter_mut().enumerate() {
            let redis = RedisServer::start();
            let args = ["--redis-url".into(), redis.url()];
            *rate = match k {
                0 => ingest_rate_of(&args, n, d, &grouped, &[]).await,
                1 => ingest_rate_of(&args, n, d, &ungrouped, &[]).await,
                2 => ingest_rate_of(&args, n, d, &plain, &[]).await,
                _ => ingest_rate_of(&args, n, d, &grouped, &with_rules).await,
            }
            .0;
        }
        rounds.push(round);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (on, _, _) = median(rounds.iter().map(|r| r[0]).collect());
    let (off, _, _) = median(rounds.iter().map(|r| r[1]).collect());
    let (empty, _, _) = median(rounds.iter().map(|r| r[2]).collect());
    let (vs_off, lo, hi) = median(rounds.iter().map(|r| r[0] / r[1]).collect());
    let (vs_empty, lo_e, hi_e) = median(rounds.iter().map(|r| r[0] / r[2]).collect());
    r.row(
        &format!("Ingest with groups ({d} devices in 1000 groups): heartbeats/s applied"),
        format!("{on:.0}/s (median of {ROUNDS} rounds)"),
        format!(
            "{vs_off:.2} × the same JSON without a group ({off:.0}/s; rounds {lo:.2}–{hi:.2}), \
             {vs_empty:.2} × empty payloads ({empty:.0}/s; rounds {lo_e:.2}–{hi_e:.2}); \
             same run, {n} heartbeats per measurement"
        ),
    );
    let (ruled, _, _) = median(rounds.iter().map(|r| r[3]).collect());
    let (vs_rules, lo_r, hi_r) = median(rounds.iter().map(|r| r[3] / r[0]).collect());
    r.row(
        "Ingest with 10 TTL rules (grouped payloads as above): heartbeats/s applied",
        format!("{ruled:.0}/s (median of {ROUNDS} rounds)"),
        format!("{vs_rules:.2} × without rules ({on:.0}/s; rounds {lo_r:.2}–{hi_r:.2}), same run"),
    );
}

/// A mass expiry of one group of `group_outage` devices (every deadline at one instant):
/// when its outage is decided after the crossing, and the deadline → last device status at a
/// subscriber, against the broker alone carrying as many retained QoS 1 and against the same
/// expiry of devices without a group (no notes, no outage), in the same run.
async fn group_outage(s: &Sizes, r: &mut Report) {
    let n = s.group_outage;
    let broker_only = {
        let mqtt = Mosquitto::start();
        broker_carries(&mqtt, n).await
    };
    let (plain_last, _) = one_instant_expiry(n, None, r).await;
    let (ours, opening) = one_instant_expiry(n, Some("big"), r).await;
    let (decided, affected) = opening.unwrap();
    let k = n.div_ceil(2).max(10);
    r.row(
        &format!("Group outage, {n} devices of one group at one instant: crossing → outage decided"),
        format!("{decided} ms"),
        format!("detected_at of the opening − detected_at of the {k}th offline (the threshold of the default rule); affected {affected} at opening"),
    );
    r.row(
        &format!("Group outage: deadline → last device status of {n} at a subscriber"),
        format!("{ours} ms"),
        format!(
            "broker alone carries {n} retained QoS 1 in {} ms (ratio {:.2}); the same expiry without groups {plain_last} ms (ratio {:.2})",
            broker_only.as_millis(),
            ours as f64 / broker_only.as_millis().max(1) as f64,
            ours as f64 / plain_last.max(1) as f64,
        ),
    );
}

/// `n` devices (of `group`, if any) expiring at one instant, on fresh servers: the deadline
/// → last offline status at a subscriber (ms) and, with a group, its outage's opening: ms
/// from the crossing (the `detected_at` of the offline that made the default rule's
/// threshold) to the opening's `detected_at`, and its `affected`.
async fn one_instant_expiry(
    n: usize,
    group: Option<&str>,
    r: &mut Report,
) -> (u64, Option<(i64, u64)>) {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let (child, addr) = monitor(&redis, &mqtt, &[]);
    wait_ready(addr).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let outages = Collector::start(&mqtt, "groups/+/status").await;
    let t0 = now_ms() + 4_000;
    let named = group
        .map(|g| format!(r#", "group": "{g}""#))
        .unwrap_or_default();
    blast(&mqtt, n, n, |_| {
        let ttl_ms = t0.saturating_sub(now_ms()).max(100);
        format!(r#"{{"ttl_s": {}{named}}}"#, ttl_ms as f64 / 1000.0).into_bytes()
    })
    .await;
    if now_ms() > t0 {
        r.notes.push(format!(
            "one-instant expiry: seeding overran the deadline by {} ms",
            now_ms() - t0
        ));
    }
    let want_opening = usize::from(group.is_some());
    while_progressing("every offline (and the outage)", || async {
        let offline = statuses.count(|m| m.json["state"] == "offline");
        let opened = outages.count(|m| m.json["state"] == "outage");
        (offline as u64, offline >= n && opened >= want_opening)
    })
    .await;
    stop(child);
    let offline: Vec<Seen> = statuses
        .all()
        .into_iter()
        .filter(|m| m.json["state"] == "offline")
        .collect();
    let last = offline.iter().map(|m| m.at_ms).max().unwrap_or(0);
    let mut detected: Vec<u64> = offline.iter().map(|m| ms(&m.json["detected_at"])).collect();
    detected.sort_unstable();
    let opening = outages
        .all()
        .into_iter()
        .find(|m| m.json["state"] == "outage")
        .map(|o| {
            let crossing = detected[n.div_ceil(2).max(10) - 1];
            (
                ms(&o.json["detected_at"]) as i64 - crossing as i64,
                o.json["affected"].as_u64().unwrap_or(0),
            )
        });
    (last.saturating_sub(t0), opening)
}

// === 3. Footprint ===

async fn seed(redis: &RedisServer, n: usize, ttl_ms: u64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let store = Store::connect(&client, "presence").await.unwrap();
    store.start_empty().await.unwrap();
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(5_000) {
        let now = now_ms();
        let beats: Vec<Beat> = chunk
            .iter()
            .map(|i| {
                Beat::live(
                    DeviceId::parse(&format!("dev-{i:07}")).unwrap(),
                    now,
                    ttl_ms,
                )
            })
            .collect();
        store
            .apply_heartbeats(&beats, 12_000)
            .await
            .into_result()
            .unwrap();
    }
    // Seeding committed online transitions nobody published: drop them from the outbox, it
    // is empty in a steady state.
    let mut conn = redis.conn().await;
    for b in 0..BUCKETS {
        let _: () = redis::cmd("DEL")
            .arg(format!("presence:{{{b}}}:outbox"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

async fn used_memory(redis: &RedisServer) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

async fn footprint(s: &Sizes, r: &mut Report) {
    let mut rss = Vec::new();
    for &n in &s.footprint {
        let redis = RedisServer::start();
        let mqtt = Mosquitto::start();
        let before = used_memory(&redis).await;
        seed(&redis, n, 3_600_000).await;
        let after = used_memory(&redis).await;
        if n == s.footprint[1] {
            r.row(
                &format!("Redis memory per tracked device ({n} devices)"),
                format!("{} bytes", (after - before) / n as i64),
                "used_memory difference / devices (TTL key, record, deadline, state index)".into(),
            );
        }
        // The monitor with this fleet: every device heartbeats once through MQTT.
        let (child, addr) = monitor(&redis, &mqtt, &[]);
        wait_ready(addr).await;
        blast(&mqtt, n, n, |_| Vec::new()).await;
        eventually("every heartbeat accepted", || async move {
            let m = scrape(addr).await;
            (metric(&m, "presenced_heartbeats_total")? >= n as f64).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push((n, hwm_kib(child.id())));
        stop(child);
    }
    r.row(
        "Monitor peak RSS by fleet size (all heartbeating)",
        rss.iter()
            .map(|(n, k)| format!("{n}: {} MiB", k / 1024))
            .collect::<Vec<_>>()
            .join(", "),
        format!("growth {:.2} ×", rss[1].1 as f64 / rss[0].1.max(1) as f64),
    );
}

// === 4. Restart recovery ===

async fn recovery(s: &Sizes, r: &mut Report) {
    let n = s.recovery;
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    seed(&redis, n, 1_000).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // every deadline passes unobserved
    let statuses = counter(&mqtt, "devices/+/status").await;
    let t0 = Instant::now();
    let (child, addr) = monitor(&redis, &mqtt, &[]);
    let s2 = statuses.clone();
    eventually("every offline published", || {
        let done = s2.lock().unwrap().0 >= n;
        async move { done.then_some(()) }
    })
    .await;
    let last = statuses.lock().unwrap().1;
    let m = scrape(addr).await;
    let missed = metric(&m, "presenced_missed_expirations_total").unwrap_or(0.0);
    stop(child);
    r.row(
        &format!("Restart recovery: {n} expired unobserved, start → last offline status"),
        format!("{} ms", (last - t0).as_millis()),
        format!("{missed} counted as missed expirations"),
    );
}

// === Report ===

fn cmd_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|_| "?".into())
}

fn render(r: &Report, quick: bool, took: Duration) -> String {
    let mut t = String::from("# presenced benchmark results\n\n");
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
        })
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let _ = writeln!(
        t,
        "Command: `cargo bench --bench presence{}` (took {:.0} s)\n",
        if quick { " -- --quick" } else { "" },
        took.as_secs_f64()
    );
    let _ =
        writeln!(
        t,
        "Machine: {} cores ({cpu}), {} MiB memory; {}; {}; mosquitto 2.0 (Debian); presenced {}\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        mem.parse::<u64>().unwrap_or(0) / 1024,
        cmd_version("redis-server", "--version"),
        cmd_version("rustc", "--version"),
        env!("CARGO_PKG_VERSION"),
    );
    t.push_str("Everything runs on loopback on this one machine: Redis, Mosquitto, the monitor, the publishers and subscribers share its cores. Ratios compare figures measured in this same run.\n\n");
    t.push_str("| measurement | result | reference (same run) |\n|---|---|---|\n");
    for (a, b, c) in &r.rows {
        let _ = writeln!(t, "| {a} | {b} | {c} |");
    }
    if !r.notes.is_empty() {
        t.push_str("\nNotes:\n");
        for n in &r.notes {
            let _ = writeln!(t, "- {n}");
        }
    }
    if !quick {
        t.push_str("\n![lag distributions](lag.png)\n");
    }
    t
}

// === 7. Wills ===

async fn wills(s: &Sizes, r: &mut Report) {
    let n = s.will_devices;
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let (child, addr) = monitor(
        &redis,
        &mqtt,
        &["--mqtt-will-topic", "devices/{device}/will"],
    );
    wait_ready(addr).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let seen_wills = Collector::start(&mqtt, "devices/+/will").await;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("will-{i:06}");
        let (client, task) = device_with_will(&mqtt, &id).await;
        client
            .publish(
                format!("devices/{id}/heartbeat"),
                QoS::AtLeastOnce,
                false,
                Vec::new(),
            )
            .await
            .unwrap();
        tasks.push(task);
    }
    while_progressing("every device online", || async {
        let online = statuses.count(|m| m.json["state"] == "online");
        (online as u64, online >= n)
    })
    .await;
    // Every connection dropped, spread over one second.
    let t0 = Instant::now();
    for (i, task) in tasks.iter().enumerate() {
        tokio::time::sleep_until((t0 + Duration::from_secs(1) * i as u32 / n as u32).into()).await;
        task.abort();
    }
    while_progressing("every offline by its will", || async {
        let offline = statuses.count(|m| m.json["state"] == "offline");
        (offline as u64, offline >= n)
    })
    .await;
    let scrape_text = scrape(addr).await;
    stop(child);
    let arrived: HashMap<String, u64> = seen_wills
        .all()
        .into_iter()
        .map(|m| {
            (
                m.topic
                    .trim_end_matches("/will")
                    .trim_start_matches("devices/")
                    .to_owned(),
                m.at_ms,
            )
        })
        .collect();
    let (mut lag, mut since_off, mut by_will) = (Vec::new(), Vec::new(), 0);
    for m in statuses
        .all()
        .into_iter()
        .filter(|m| m.json["state"] == "offline")
    {
        let Some(&at) = m.json["device"].as_str().and_then(|d| arrived.get(d)) else {
            continue;
        };
        by_will += usize::from(m.json["reason"] == "will");
        lag.push(m.at_ms as i64 - at as i64);
        since_off.push((ms(&m.json["since"]) as i64 - at as i64).abs());
    }
    let (text, _) = summary(lag, n);
    let (since_text, _) = summary(since_off, n);
    r.row(
        &format!("Wills: {n} devices drop their connections within 1 s; will at a subscriber → offline status at a subscriber"),
        text,
        format!(
            "{by_will} of {n} with reason will; since vs the will at the subscriber, absolute difference: {since_text}; presenced_notification_lag_seconds p99 ≤ {} s (histogram bucket)",
            histogram_quantile(&scrape_text, 0.99)
        ),
    );
}
