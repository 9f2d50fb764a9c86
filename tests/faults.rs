//! No transition lost, none duplicated: replicas, crashes and outages, against real servers.
//! Every test ends with `check_invariants` over everything a subscriber saw.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;

/// The outage scenario: `steady` devices heartbeat every `every` throughout, `quiet` ones
/// send one heartbeat (with `quiet_payload`) and fall silent.
struct SteadyAndQuiet {
    statuses: Collector,
    steady: Vec<String>,
    quiet: Vec<String>,
    beat: tokio_util::sync::CancellationToken,
    _devices: Arc<Devices>,
}

impl SteadyAndQuiet {
    async fn start(
        mqtt: &Mosquitto,
        n: (usize, usize),
        every: Duration,
        quiet_payload: &[u8],
    ) -> Self {
        let statuses = Collector::start(mqtt, "devices/+/status").await;
        let devices = Arc::new(Devices::connect(mqtt).await);
        let steady = ids("steady", n.0);
        let quiet = ids("quiet", n.1);
        let beat = keep_beating(devices.clone(), steady.clone(), every);
        for id in &quiet {
            devices.heartbeat(id, quiet_payload).await;
        }
        statuses
            .wait_for("all online", |s| s.len() >= n.0 + n.1)
            .await;
        SteadyAndQuiet {
            statuses,
            steady,
            quiet,
            beat,
            _devices: devices,
        }
    }

    /// After the outage: every quiet device offline once, then (after `settle`, still
    /// beating) not one steady device ever published offline.
    async fn check(&self, settle: Duration) {
        eventually("quiet devices offline", || async {
            self.quiet
                .iter()
                .all(|id| history(&self.statuses.device(id)).len() == 2)
                .then_some(())
        })
        .await;
        tokio::time::sleep(settle).await;
        self.beat.cancel();
        for id in &self.steady {
            assert_eq!(
                history(&self.statuses.device(id)),
                vec![(1, "online".into())],
                "{id}"
            );
        }
    }
}

const SHARED: [&str; 2] = ["--mqtt-shared-group", "presenced"];

/// `n` replica processes sharing heartbeats, each ready.
async fn shared_replicas(
    redis: &RedisServer,
    mqtt: &Mosquitto,
    n: usize,
) -> Vec<(Proc, std::net::SocketAddr, String)> {
    let replicas: Vec<_> = (0..n)
        .map(|_| spawn_replica(redis, mqtt, &SHARED))
        .collect();
    for (_, addr, _) in &replicas {
        wait_ready(*addr).await;
    }
    replicas
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// Three replicas sharing heartbeats: 1,000 devices go online, then silent. After dedupe by
/// seq each device shows exactly seq 1 online, seq 2 offline, and the replicas' transition
/// counters add up to exactly the number of transitions (none committed twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_commit_each_transition_once() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let mut apps = Vec::new();
    for _ in 0..3 {
        let cfg = config(&redis, &mqtt, &[("mqtt.shared_group", "presenced")]);
        apps.push(TestApp::spawn(cfg).await);
    }
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let all = ids("r", 1000);
    for id in &all {
        devices.heartbeat(id, b"").await;
    }
    wait_online_then_offline(&statuses, &all).await;
    let mut online = 0.0;
    let mut offline = 0.0;
    for app in &apps {
        let m = scrape(app.http()).await;
        online += metric(&m, r#"presenced_transitions_total{to="online"}"#).unwrap();
        offline += metric(&m, r#"presenced_transitions_total{to="offline"}"#).unwrap();
        assert_eq!(
            metric(&m, r#"presenced_devices{state="offline"}"#),
            Some(1000.0)
        );
        // The broker probe found mosquitto serving shared subscriptions.
        for feature in ["shared_subscriptions", "wildcard_retained"] {
            let series = format!("presenced_broker_feature_missing{{feature=\"{feature}\"}}");
            assert_eq!(metric(&m, &series), Some(0.0), "{series}");
        }
    }
    assert_eq!((online, offline), (1000.0, 1000.0));
    let finals = check_invariants(&mqtt, apps[0].http(), &statuses).await;
    assert!(finals.values().all(|s| s == "offline"));
    for app in apps {
        app.stop().await.unwrap();
    }
}

/// A replica killed (SIGKILL) in the middle of a mass expiry of 1,000 devices: every
/// offline is still published, by the survivors (outbox leases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_during_mass_expiry_loses_nothing() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let mut replicas = shared_replicas(&redis, &mqtt, 3).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let all = ids("k", 1000);
    for id in &all {
        devices.heartbeat(id, br#"{"ttl_s": 2}"#).await;
    }
    statuses.wait_for("all online", |s| s.len() >= 1000).await;
    // Kill one replica as the deadlines come.
    statuses
        .wait_for("mass expiry under way", |s| {
            s.iter().any(|m| m.json["state"] == "offline")
        })
        .await;
    let (mut victim, _, _) = replicas.remove(0);
    kill(&victim, "-KILL");
    let _ = victim.wait();

    eventually("every device offline", || async {
        all.iter()
            .all(|id| history(&statuses.device(id)).len() == 2)
            .then_some(())
    })
    .await;
    let finals = check_invariants(&mqtt, replicas[0].1, &statuses).await;
    assert_eq!(finals.len(), 1000);
    assert!(finals.values().all(|s| s == "offline"));
    for (mut child, _, _) in replicas {
        kill(&child, "-TERM");
        let _ = child.wait();
    }
}

/// Every replica killed; devices expire while none runs; a restart marks every one offline
/// and counts them as missed expirations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_replicas_killed_then_restarted() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let replicas = shared_replicas(&redis, &mqtt, 2).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let all = ids("a", 200);
    for id in &all {
        devices.heartbeat(id, br#"{"ttl_s": 3}"#).await;
    }
    statuses.wait_for("all online", |s| s.len() >= 200).await;
    for (mut child, _, _) in replicas {
        kill(&child, "-KILL");
        let _ = child.wait();
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(statuses.all().iter().all(|m| m.json["state"] == "online"));

    let (mut child, addr, _) = spawn_replica(&redis, &mqtt, &SHARED);
    eventually("every device offline", || async {
        all.iter()
            .all(|id| history(&statuses.device(id)).len() == 2)
            .then_some(())
    })
    .await;
    let m = scrape(addr).await;
    assert_eq!(
        metric(&m, "presenced_missed_expirations_total"),
        Some(200.0)
    );
    check_invariants(&mqtt, addr, &statuses).await;
    kill(&child, "-TERM");
    let _ = child.wait();
}

/// Redis crashes (SIGKILL) and restarts from its AOF while devices keep heartbeating and a
/// few go silent: no false offline for the steady devices, exactly one offline for the
/// silent ones, and the monitor sets notifications up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_and_restart_with_aof() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mqtt = Mosquitto::start();
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.ttl", "2s")])).await;
    let fleet = SteadyAndQuiet::start(&mqtt, (50, 10), Duration::from_millis(300), b"").await;

    redis.stop();
    tokio::time::sleep(Duration::from_secs(3)).await; // past the quiet devices' deadline
    redis.restart();
    app.wait_ready().await;
    fleet.check(Duration::from_secs(3)).await;
    let flags = redis.notify_flags().await;
    assert!(flags.contains('E') && flags.contains('x'), "{flags}");
    let finals = check_invariants(&mqtt, app.http(), &fleet.statuses).await;
    assert_eq!(finals.values().filter(|s| *s == "offline").count(), 10);
    app.stop().await.unwrap();
}

/// The broker restarts (with persistence) while devices keep heartbeating and a few go
/// silent: the monitor reconnects, resubscribes, and the final state is the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_with_persistence() {
    let redis = RedisServer::start();
    let mut mqtt = Mosquitto::start_persistent();
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.ttl", "3s")])).await;
    let fleet = SteadyAndQuiet::start(&mqtt, (50, 10), Duration::from_millis(300), b"").await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // let autosave persist
    mqtt.stop();
    let addr = app.http();
    eventually("unready while the broker is down", || async move {
        let (code, body) = get(addr, "/readyz").await?;
        let m = scrape(addr).await;
        (code == 503 && body.contains("mqtt") && metric(&m, "presenced_mqtt_up")? == 0.0)
            .then_some(())
    })
    .await;
    mqtt.restart();
    app.wait_ready().await;
    fleet.check(Duration::from_secs(2)).await;
    let m = scrape(app.http()).await;
    assert_eq!(metric(&m, "presenced_mqtt_up"), Some(1.0));
    check_invariants(&mqtt, app.http(), &fleet.statuses).await;
    app.stop().await.unwrap();
}

/// The broker restarts *without* persistence: retained statuses are gone and the session is
/// lost. The monitor notices (ConnAck without session), resubscribes, and republishes every
/// device's current status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_that_lost_its_state_gets_every_status_again() {
    let redis = RedisServer::start();
    let mut mqtt = Mosquitto::start();
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.ttl", "60s")])).await;
    let devices = Devices::connect(&mqtt).await;
    let all = ids("s", 300);
    for id in &all {
        devices.heartbeat(id, b"").await;
    }
    let addr = app.http();
    eventually("300 online", || async move {
        let m = scrape(addr).await;
        (metric(&m, r#"presenced_devices{state="online"}"#)? == 300.0).then_some(())
    })
    .await;
    mqtt.restart();
    // A subscriber arriving after the republish gets every status, retained.
    let mqtt_ref = &mqtt;
    eventually("every status retained again", || async move {
        let late = Collector::start(mqtt_ref, "devices/+/status").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        (late.all().iter().filter(|m| m.retain).count() >= 300).then_some(())
    })
    .await;
    let late = Collector::start(&mqtt, "devices/+/status").await;
    // And heartbeats flow again (resubscribed).
    let devices = Devices::connect(&mqtt).await;
    devices.heartbeat("newcomer", b"").await;
    late.wait_for("newcomer online", |s| {
        s.iter().any(|m| m.json["device"] == "newcomer")
    })
    .await;
    app.stop().await.unwrap();
}

/// The monitor is frozen (SIGSTOP) for longer than the TTL while devices keep sending, then
/// resumed: the heartbeats that waited meanwhile are applied before any expiry is decided,
/// so the steady devices are never published offline; the silent ones are, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_monitor_publishes_no_false_offline() {
    frozen_monitor(Freeze::Idle).await;
}

/// The same freeze, caught in the middle of Redis calls: Redis is stopped first, so the
/// monitor's calls hang (within a second the safety net's is among them) and heartbeats pile
/// up unapplied; then the monitor is frozen, Redis resumed (it expires the TTL key of every
/// steady device meanwhile), and the monitor resumed last. Tasks inside a call through the
/// freeze never see a timer fire late, yet the expired events they find must wait for the
/// heartbeats queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_frozen_inside_a_redis_call_publishes_no_false_offline() {
    frozen_monitor(Freeze::InsideRedisCalls).await;
}

/// How the monitor is frozen.
enum Freeze {
    Idle,
    InsideRedisCalls,
}

async fn frozen_monitor(freeze: Freeze) {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let (mut child, addr, _) = spawn_replica(&redis, &mqtt, &[]);
    wait_ready(addr).await;
    let fleet = SteadyAndQuiet::start(
        &mqtt,
        (30, 5),
        Duration::from_millis(250),
        br#"{"ttl_s": 2}"#,
    )
    .await;
    match freeze {
        Freeze::Idle => kill(&child, "-STOP"),
        Freeze::InsideRedisCalls => {
            signal(redis.pid(), "-STOP");
            tokio::time::sleep(Duration::from_millis(1200)).await;
            kill(&child, "-STOP");
            signal(redis.pid(), "-CONT");
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // every steady device's TTL passes
    kill(&child, "-CONT");
    fleet.check(Duration::from_secs(2)).await;
    check_invariants(&mqtt, addr, &fleet.statuses).await;
    kill(&child, "-TERM");
    let _ = child.wait();
}

/// A replica that committed transitions in Redis and died before publishing them (here: the
/// store used directly, no publisher at all): a running replica publishes them once their
/// lease runs out, and a replica that starts publishes what was left at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transitions_of_a_dead_replica_are_published() {
    use presenced::beat::Beat;
    use presenced::device::{now_ms, DeviceId};
    use presenced::store::Store;

    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    // A fresh broker has no retained broker marker, so the monitor's first connection would
    // republish every device's status; done after the orphans are committed (a loaded machine
    // starts slowly), it would publish them before their lease ran out. The marker of an
    // earlier run says the broker kept its retained messages.
    let seed = Devices::connect(&mqtt).await;
    seed.publish_retained("presenced/broker", b"earlier").await;
    Collector::start(&mqtt, "presenced/broker")
        .await
        // Seen at all (live, if we subscribed first) means stored: the broker retains a
        // message before it forwards it.
        .wait_for("the broker marker retained", |s| !s.is_empty())
        .await;
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.ttl", "60s")])).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;

    let client = redis::Client::open(redis.url()).unwrap();
    let dead = Store::connect(&client, "presence").await.unwrap();
    dead.start_empty().await.unwrap();
    let beats = |prefix: &str| -> Vec<Beat> {
        (0..20)
            .map(|i| {
                Beat::live(
                    DeviceId::parse(&format!("{prefix}-{i}")).unwrap(),
                    now_ms(),
                    60_000,
                )
            })
            .collect()
    };
    let committed = dead
        .apply_heartbeats(&beats("orphan"), 12_000)
        .await
        .into_result()
        .unwrap();
    assert_eq!(committed.len(), 20);
    let started = std::time::Instant::now();
    eventually(
        "orphaned transitions published by the live replica",
        || async {
            (0..20)
                .all(|i| {
                    history(&statuses.device(&format!("orphan-{i}"))) == vec![(1, "online".into())]
                })
                .then_some(())
        },
    )
    .await;
    // Not before the lease ran out: the live replica must not steal a healthy publisher's work.
    assert!(started.elapsed() >= presenced::store::OUTBOX_LEASE - Duration::from_secs(1));

    // Left behind at a stop: a replica that starts takes it over at once.
    app.stop().await.unwrap();
    dead.apply_heartbeats(&beats("left"), 12_000)
        .await
        .into_result()
        .unwrap();
    let started = std::time::Instant::now();
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.ttl", "60s")])).await;
    eventually("left-behind transitions published at start", || async {
        (0..20)
            .all(|i| history(&statuses.device(&format!("left-{i}"))).len() == 1)
            .then_some(())
    })
    .await;
    assert!(started.elapsed() < presenced::store::OUTBOX_LEASE / 2);
    check_invariants(&mqtt, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A flood of malformed heartbeats (invalid ids, 1 MB payloads) is counted and skipped; a
/// valid heartbeat sent in the middle of it still comes online promptly, and the monitor's
/// memory does not grow with the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flood_does_not_slow_valid_heartbeats() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let (mut child, addr, _) = spawn_replica(&redis, &mqtt, &["--presence-ttl", "60s"]);
    wait_ready(addr).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let flood = Devices::connect(&mqtt).await;
    let valid = Devices::connect(&mqtt).await;
    let before = rss_kib(child.id());

    let long = "y".repeat(200);
    let big = vec![b'z'; (1 << 20) + 100_000]; // over the default 1 MiB limit
    let flooding = async {
        for round in 0..40 {
            for _ in 0..250 {
                flood.heartbeat(&long, b"").await;
            }
            flood.heartbeat(&format!("huge-{round}"), &big).await;
        }
    };
    let probing = async {
        let mut worst = Duration::ZERO;
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let id = format!("valid-{i}");
            let sent = std::time::Instant::now();
            valid.heartbeat(&id, b"").await;
            let sid = id.clone();
            eventually("valid heartbeat online", || {
                let s = statuses.device(&sid);
                async move { (!s.is_empty()).then_some(()) }
            })
            .await;
            worst = worst.max(sent.elapsed());
        }
        worst
    };
    let ((), worst) = tokio::join!(flooding, probing);
    eventually("flood counted", || async move {
        let m = scrape(addr).await;
        let invalid = metric(
            &m,
            r#"presenced_heartbeats_rejected_total{reason="invalid_id"}"#,
        )?;
        let large = metric(
            &m,
            r#"presenced_heartbeats_rejected_total{reason="too_large"}"#,
        )?;
        (invalid == 10_000.0 && large == 40.0).then_some(())
    })
    .await;
    let after = rss_kib(child.id());
    assert!(
        worst < Duration::from_secs(1),
        "a valid heartbeat took {worst:?} during the flood"
    );
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB during the flood"
    );
    assert_eq!(statuses.all().len(), 10);
    kill(&child, "-TERM");
    let _ = child.wait();
}
