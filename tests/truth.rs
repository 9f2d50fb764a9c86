//! The heartbeat timing rules and the no-false-offline guarantee under real faults: the
//! latest heartbeat wins, a late heartbeat finds the device offline, retained replays are not
//! news, one clock for every replica, and a replica cut off from Redis (refused or
//! black-holed) never lets another replica expire a device whose heartbeat it holds.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use presenced::device::now_ms;
use support::proxy::{FaultProxy, Mode};
use support::*;

/// `{"ttl_s":5}` then a plain heartbeat: the device lives the default TTL from the second
/// heartbeat, not 5 s from the first (the latest heartbeat's deadline replaces the earlier
/// one, shorter or longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_heartbeat_wins_even_when_its_deadline_is_sooner() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("presence.ttl", "1s")]).await;
    devices.heartbeat("shrink", br#"{"ttl_s": 5}"#).await;
    statuses.wait_for("online", |s| s.len() == 1).await;
    devices.heartbeat("shrink", b"").await;
    let addr = app.http();
    // The record shows the second heartbeat applied: its deadline is the one that counts.
    let second = eventually("second heartbeat applied", || async move {
        let (_, rec) = get_json(addr, "/devices/shrink").await;
        (rec["last_seen"] != rec["since"]).then(|| ms(&rec["last_seen"]))
    })
    .await;
    statuses.wait_for("offline", |s| s.len() == 2).await;
    let off = statuses.device("shrink").pop().unwrap();
    assert_eq!(off["state"], "offline");
    assert_eq!(ms(&off["since"]), second + 1_000, "{off}");

    // And the other way: a long override after a short one extends it (the first is seen
    // online before the second is sent, so their arrivals differ).
    devices.heartbeat("grow", br#"{"ttl_s": 2}"#).await;
    statuses
        .wait_for("grow online", |s| {
            s.iter().any(|m| m.json["device"] == "grow")
        })
        .await;
    devices.heartbeat("grow", br#"{"ttl_s": 6}"#).await;
    let second = eventually("grow's second heartbeat applied", || async move {
        let (status, rec) = get_json(addr, "/devices/grow").await;
        (status == 200 && rec["last_seen"] != rec["since"]).then(|| ms(&rec["last_seen"]))
    })
    .await;
    statuses
        .wait_for("grow offline", |s| {
            s.iter()
                .any(|m| m.json["device"] == "grow" && m.json["state"] == "offline")
        })
        .await;
    let off = statuses.device("grow").pop().unwrap();
    assert_eq!(
        ms(&off["since"]),
        second + 6_000,
        "the 6 s override of the latest heartbeat holds: {off}"
    );
    check_invariants(&mqtt, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

/// A retained heartbeat is replayed by the broker at every (re)subscription: it must not
/// bring a long-silent device back online. One published while the monitor is subscribed is
/// news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_heartbeats_replayed_on_subscription_are_not_news() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let cfg = config(&redis, &mqtt, &[("presence.ttl", "1s")]);
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    devices
        .publish_retained("devices/ghost/heartbeat", b"")
        .await;
    let app = TestApp::spawn(cfg.clone()).await;
    // Published while the monitor is subscribed: news, even with the retain flag.
    devices
        .publish_retained("devices/live/heartbeat", b"")
        .await;
    wait_online_then_offline(&statuses, &["live".to_owned()]).await;
    app.stop().await.unwrap();

    // A restart resubscribes: the broker replays both retained heartbeats.
    let app = TestApp::spawn(cfg).await;
    // A live heartbeat after the resubscription: once its status is out, the replays (sent
    // before it, at the subscription) have been read.
    devices.heartbeat("sentinel", b"").await;
    statuses
        .wait_for("sentinel online", |s| {
            s.iter().any(|m| m.json["device"] == "sentinel")
        })
        .await;
    assert!(
        statuses.device("ghost").is_empty(),
        "{:?}",
        statuses.device("ghost")
    );
    assert_eq!(
        history(&statuses.device("live")),
        vec![(1, "online".into()), (2, "offline".into())]
    );
    let (code, _) = get_json(app.http(), "/devices/ghost").await;
    assert_eq!(code, 404);
    check_invariants(&mqtt, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

/// The broker is down for longer than the TTL: devices cannot reach it, so the deadline
/// passes. When it is back, the devices' (queued or new) heartbeats end that offline period:
/// the offline status, since the deadline, is published first, then the online one. (A
/// monitor stopped for longer than the TTL while the broker runs makes no device offline:
/// `lifecycle::heartbeats_during_a_restart_keep_devices_online`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_longer_than_the_ttl_publishes_the_offline_it_caused() {
    let redis = RedisServer::start();
    let mut mqtt = Mosquitto::start_persistent();
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.ttl", "2s")])).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    let fleet = ids("late", 20);
    let beating = keep_beating(devices.clone(), fleet.clone(), Duration::from_millis(400));
    wait_until_online(&statuses, &fleet).await;
    mqtt.saved_since(std::time::SystemTime::now()).await;
    let down_at = now_ms();
    mqtt.stop();
    tokio::time::sleep(Duration::from_secs(4)).await; // twice the TTL
    let up_at = now_ms();
    mqtt.restart();
    app.wait_ready().await;
    eventually("every device offline then online again", || async {
        fleet
            .iter()
            .all(|id| history(&statuses.device(id)).len() == 3)
            .then_some(())
    })
    .await;
    beating.cancel();
    for id in &fleet {
        assert_eq!(
            history(&statuses.device(id)),
            vec![
                (1, "online".into()),
                (2, "offline".into()),
                (3, "online".into())
            ],
            "{id}"
        );
        let off = accepted(&statuses.device(id))
            .into_iter()
            .find(|m| m["seq"] == 2)
            .unwrap();
        // Since the deadline: the last heartbeat before the outage plus the TTL.
        let since = ms(&off["since"]);
        assert!(
            since > down_at && since <= down_at + 2_000 && since < up_at,
            "{id}: offline since {since}, broker down {down_at}..{up_at}"
        );
        assert_eq!(off["reason"], "ttl_expired");
    }
    check_invariants(&mqtt, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

/// Two replicas share heartbeats; one replica's connection to Redis is cut (refused, then
/// black-holed: packets dropped, not refused; the last cut longer than a replica's floor
/// lease, so the cut-off replica must leave the shared group) while the other keeps working.
/// Devices that never stop heartbeating (every TTL/4) are never published offline; devices
/// that stop are, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_partitioned_from_redis_lets_no_device_go_falsely_offline() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let proxy = FaultProxy::start(redis_addr(&redis));
    let shared = ["--mqtt-shared-group", "truth", "--presence-ttl", "2s"];
    let (_a, a_http, _) = spawn_replica_on(
        &["--redis-url".into(), format!("redis://{}/0", proxy.addr())],
        &mqtt,
        &shared,
    );
    let (_b, b_http, _) = spawn_replica(&redis, &mqtt, &shared);
    wait_ready(a_http).await;
    wait_ready(b_http).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    let keep = ids("keep", 100);
    let beating = keep_beating(devices.clone(), keep.clone(), Duration::from_millis(500));
    wait_until_online(&statuses, &keep).await;

    let mut stopped = Vec::new();
    let started = std::time::Instant::now();
    let cuts = [
        (Mode::Refuse, 8),
        (Mode::Blackhole, 8),
        (Mode::Blackhole, 20),
    ];
    for (round, (mode, secs)) in cuts.into_iter().enumerate() {
        // Some devices go silent just as the partition starts: they must still go offline.
        let silent = ids(&format!("stop{round}"), 10);
        for id in &silent {
            devices.heartbeat(id, b"").await;
        }
        wait_until_online(&statuses, &silent).await;
        proxy.set(mode);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        proxy.set(Mode::Pass);
        wait_ready(a_http).await;
        stopped.extend(silent);
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(55));
    wait_online_then_offline(&statuses, &stopped).await;
    beating.cancel();
    for id in &keep {
        assert_eq!(
            history(&statuses.device(id)),
            vec![(1, "online".into())],
            "{id}"
        );
    }
    each_published_once(&statuses, &keep);
    check_invariants(&mqtt, b_http, &statuses).await;
}

/// A replica whose wall clock is 15 s ahead shares heartbeats with a correct one for a
/// minute: it expires nothing early, claims nothing early, and publishes no time from its
/// own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_skewed_clock_changes_no_decision_and_no_time() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let shared = ["--mqtt-shared-group", "truth", "--presence-ttl", "2s"];
    let redis_args = ["--redis-url".to_owned(), redis.url()];
    let skew = faketime::skewed_clock("+15s");
    let (_ahead, ahead_http, _) = spawn_replica_with_env(&redis_args, &mqtt, &shared, &skew);
    let (_b, b_http, _) = spawn_replica(&redis, &mqtt, &shared);
    wait_ready(ahead_http).await;
    wait_ready(b_http).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    let keep = ids("keep", 100);
    let beating = keep_beating(devices.clone(), keep.clone(), Duration::from_millis(500));
    wait_until_online(&statuses, &keep).await;
    let started = std::time::Instant::now();
    let mut stopped = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        let silent = ids(&format!("stop{}", stopped.len()), 10);
        for id in &silent {
            devices.heartbeat(id, b"").await;
        }
        stopped.extend(silent);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    wait_online_then_offline(&statuses, &stopped).await;
    beating.cancel();
    for id in &keep {
        assert_eq!(
            history(&statuses.device(id)),
            vec![(1, "online".into())],
            "{id}"
        );
    }
    each_published_once(&statuses, &keep);
    // Every published time is on one clock: an offline is since its deadline (the last
    // heartbeat plus the TTL) and detected after it, and nothing is 15 s in the future.
    for id in &stopped {
        for m in accepted(&statuses.device(id)) {
            let (since, detected) = (ms(&m["since"]), ms(&m["detected_at"]));
            assert!(detected >= since, "{m}");
            assert!(
                detected < now_ms() + 1_000,
                "a time from the skewed clock: {m}"
            );
            if m["state"] == "offline" {
                assert_eq!(since, ms(&m["last_seen"]) + 2_000, "{m}");
            }
        }
    }
    check_invariants(&mqtt, b_http, &statuses).await;
}

/// While Redis is stopped (SIGSTOP) for a minute, 20,000 devices heartbeat every second:
/// the monitor holds at most one pending heartbeat per device, so its memory stays within
/// twice its level before the outage; afterwards every device is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_redis_is_stopped() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    // Redis is stopped for longer than the TTL: only the held heartbeats (and the watermark
    // that keeps expiries below them) keep the fleet online.
    let (app, app_http, _) = spawn_replica(&redis, &mqtt, &["--presence-ttl", "30s"]);
    wait_ready(app_http).await;
    let mut sim = simulate(&mqtt, &["--devices", "20000", "--interval", "1s"]);
    eventually("20,000 online", || async move {
        let m = scrape(app_http).await;
        (metric(&m, r#"presenced_devices{state="online"}"#)? == 20_000.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss_kib(&app);
    let pid = redis.pid();
    signal(pid, "-STOP");
    let started = std::time::Instant::now();
    let mut worst = before;
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        worst = worst.max(rss_kib(&app));
    }
    signal(pid, "-CONT");
    let accepted_at_end = eventually("heartbeats applied again", || async move {
        let m = scrape(app_http).await;
        (metric(&m, "presenced_redis_up")? == 1.0)
            .then(|| metric(&m, "presenced_heartbeats_total"))
            .flatten()
    })
    .await;
    let _ = sim.0.kill();
    // The point is many heartbeats per device while Redis is away (without coalescing,
    // memory would grow with each); a loaded machine publishes fewer than 20,000 a second.
    assert!(
        accepted_at_end >= 20_000.0 * 10.0,
        "the simulator kept publishing through the outage: {accepted_at_end}"
    );
    assert!(
        worst <= before * 2,
        "RSS grew from {before} KiB to {worst} KiB while Redis was stopped"
    );
    let m = scrape(app_http).await;
    assert_eq!(
        metric(&m, r#"presenced_devices{state="offline"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, r#"presenced_devices{state="online"}"#),
        Some(20_000.0)
    );
}

/// Each of `ids` had exactly one status published (its online). A replica claiming another's
/// outbox entry before its lease ran out (a skewed clock, a partitioned replica) would
/// publish it a second time.
fn each_published_once(statuses: &Collector, ids: &[String]) {
    let mut published = std::collections::HashMap::<String, usize>::new();
    for m in statuses.all().iter().filter(|m| !m.retain) {
        *published
            .entry(m.json["device"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    for id in ids {
        assert_eq!(
            published.get(id),
            Some(&1),
            "{id}: its one status published once"
        );
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

async fn wait_until_online(statuses: &Collector, ids: &[String]) {
    eventually("devices online", || async {
        ids.iter()
            .all(|id| !statuses.device(id).is_empty())
            .then_some(())
    })
    .await;
}

fn redis_addr(redis: &RedisServer) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", redis.port).parse().unwrap()
}

fn rss_kib(p: &Proc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.0.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `presenced simulate` against the broker, killed on drop.
fn simulate(mqtt: &Mosquitto, args: &[&str]) -> Proc {
    let child = std::process::Command::new(presenced_bin())
        .arg("simulate")
        .args(["--mqtt-url", &mqtt.url()])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

/// The broker restarts without persistence (its retained statuses are gone) under two
/// replicas sharing heartbeats: every device's status is republished once in all (a job in
/// Redis, not once per replica), and when the replica working on it is killed midway the
/// other one finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_state_is_republished_once_and_resumed_after_a_crash() {
    let redis = RedisServer::start();
    let mut mqtt = Mosquitto::start();
    let shared = ["--mqtt-shared-group", "truth", "--presence-ttl", "300s"];
    let (mut a, a_http, _) = spawn_replica(&redis, &mqtt, &shared);
    let (_b, b_http, _) = spawn_replica(&redis, &mqtt, &shared);
    wait_ready(a_http).await;
    wait_ready(b_http).await;
    let devices = Devices::connect(&mqtt).await;
    let n = 20_000;
    for id in ids("r", n) {
        devices.heartbeat(&id, b"").await;
    }
    eventually("every device online", || async move {
        let m = scrape(b_http).await;
        (metric(&m, r#"presenced_devices{state="online"}"#)? == n as f64).then_some(())
    })
    .await;
    // Our own subscriber resubscribes after the restart: it sees the republished statuses.
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    statuses
        .wait_for("retained statuses", |s| s.len() >= n)
        .await;
    let before = statuses.all().len();
    mqtt.restart();
    statuses
        .wait_for("a quarter republished", |s| s.len() >= before + n / 4)
        .await;
    kill(&a.0, "-KILL");
    let _ = a.0.wait();
    let mqtt_ref = &mqtt;
    eventually("every status retained again", || async move {
        let late = Collector::start(mqtt_ref, "devices/+/status").await;
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let devices: std::collections::HashSet<String> = late
            .all()
            .iter()
            .filter(|m| m.retain)
            .filter_map(|m| m.json["device"].as_str().map(str::to_owned))
            .collect();
        (devices.len() >= n).then_some(())
    })
    .await;
    let republished = statuses.all().len() - before;
    assert!(
        republished < n * 3 / 2,
        "{republished} statuses republished for {n} devices: more than once in all"
    );
    check_invariants(&mqtt, b_http, &statuses).await;
}

/// Queued heartbeats behind the sync marker's timeout: the monitor is down longer than the
/// TTL (30 s) while 200,000 heartbeats queue for its session, then 1,000 devices each send one (in
/// time). On restart the backlog crosses a slow link (at least 16 s, several times the
/// marker's 5 s wait): the gate stays closed while it drains, so none of the 1,000 goes
/// offline, and the one device that really went silent is reported once the backlog is in.
/// The TTL leaves room for publishing the backlog (about 4 s here) on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_draining_longer_than_the_sync_wait_expires_nobody_behind_it() {
    const FILLER: u64 = 200_000;
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", mqtt.port).parse().unwrap());
    let url = format!("mqtt://{}", proxy.addr());
    let cfg = config(
        &redis,
        &mqtt,
        &[("mqtt.url", &url), ("presence.ttl", "30s")],
    );
    let app = TestApp::spawn(cfg.clone()).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let late = ids("late", 1_000);
    for id in &late {
        devices.heartbeat(id, b"").await;
    }
    devices.heartbeat("filler", b"").await;
    devices.heartbeat("silent", br#"{"ttl_s": 1}"#).await;
    statuses
        .wait_for("all online", |s| by_device(s).len() == 1_002)
        .await;
    let (_, first) = get_json(app.http(), &format!("/devices/{}", late[0])).await;
    let deadline = ms(&first["last_seen"]) + 30_000;
    app.stop().await.unwrap();

    // While the monitor is down: the backlog, then one heartbeat from each late device, in
    // time (before its deadline), but behind the backlog in the monitor's queue.
    let pub_ok = tokio::task::spawn_blocking({
        let port = mqtt.port.to_string();
        move || {
            std::process::Command::new("mosquitto_pub")
                .args(["-p", &port, "-q", "1", "-M", "1000", "-i", "filler-pub"])
                .args(["-t", "devices/filler/heartbeat", "-m", "{}"])
                .args(["--repeat", &FILLER.to_string()])
                .status()
                .unwrap()
                .success()
        }
    })
    .await
    .unwrap();
    assert!(pub_ok, "mosquitto_pub failed");
    assert!(
        now_ms() + 3_000 < deadline,
        "publishing the backlog took too long for this test to say anything"
    );
    for id in &late {
        devices.heartbeat(id, b"").await;
    }
    // Down past the deadline: in Redis the late devices are overdue when the monitor starts.
    tokio::time::sleep(Duration::from_millis(deadline + 500 - now_ms())).await;

    // About 32 bytes a heartbeat at 400 kB/s: 6.4 MB take at least 16 s to cross.
    proxy.set(Mode::Throttle(400_000));
    let restarted = tokio::time::Instant::now();
    let app = TestApp::spawn_unready(cfg).await;
    let addr = app.http();
    while_progressing("the backlog read", || async move {
        // Not listening yet at first: the HTTP server starts after the connections.
        let m = get(addr, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        let n = metric(&m, "presenced_heartbeats_total").unwrap_or(0.0) as u64;
        (n, n >= FILLER + 1_000)
    })
    .await;
    let drained = restarted.elapsed();
    assert!(
        drained > Duration::from_secs(12),
        "the backlog crossed in {drained:?}"
    );
    proxy.set(Mode::Pass);
    statuses
        .wait_for("the silent device offline", |s| {
            s.iter()
                .any(|m| m.json["device"] == "silent" && m.json["state"] == "offline")
        })
        .await;
    let falsely = statuses.count(|m| m.json["state"] == "offline" && m.json["device"] != "silent");
    assert_eq!(falsely, 0, "devices behind the backlog went offline");
    let finals = check_invariants(&mqtt, addr, &statuses).await;
    assert!(late.iter().all(|id| finals[id] == "online"));
    app.stop().await.unwrap();
}

/// A mass expiry of 50,000 at one instant: the sweep waits on the status queue for most of
/// it, which must not look like a process pause (no "stalled" in the log), and every offline
/// is found by the deadline sweep or the notifications, none counted as missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_expiry_is_neither_a_stall_nor_missed() {
    const N: usize = 50_000;
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("replica.log");
    let args = ["--presence-ttl", "600s", "--presence-max-ttl", "1h"];
    let (_replica, addr, _) = spawn_replica_logging_to(&redis, &mqtt, &args, &log);
    wait_ready(addr).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let fleet = ids("mass", N);
    for id in &fleet {
        devices.heartbeat(id, b"").await;
    }
    while_progressing("the fleet online", || async {
        let n = statuses.count(|m| m.json["state"] == "online");
        (n as u64, n >= N)
    })
    .await;
    // A second heartbeat each, asking for the TTL that ends at one instant for all: the
    // latest heartbeat's deadline replaces the 600 s one.
    let t0 = now_ms() + 10_000;
    for id in &fleet {
        let ttl_s = t0.saturating_sub(now_ms()) as f64 / 1000.0;
        devices
            .heartbeat(id, format!("{{\"ttl_s\": {ttl_s}}}").as_bytes())
            .await;
    }
    while_progressing("the fleet offline", || async {
        let n = statuses.count(|m| m.json["state"] == "offline");
        (n as u64, n >= N)
    })
    .await;
    let m = scrape(addr).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let stalls: Vec<&str> = text.lines().filter(|l| l.contains("stalled")).collect();
    assert!(stalls.is_empty(), "{stalls:?}");
    assert_eq!(metric(&m, "presenced_missed_expirations_total"), Some(0.0));
    let finals = check_invariants(&mqtt, addr, &statuses).await;
    assert!(finals.values().all(|s| s == "offline"));
}
