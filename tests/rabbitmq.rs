//! The monitor against a second real broker: RabbitMQ's MQTT plugin (Debian's 3.10, MQTT
//! 3.1.1 only). Its known gaps: no shared subscriptions (a `$share/...` filter is taken as
//! a literal topic), retained messages delivered to exact-topic subscriptions only. What
//! works must hold the contract (lifecycle, API, a monitor restart, an outage, a broker
//! crash, each ended by the invariant check, which reads the retained statuses topic by
//! topic here); what cannot work must be said (not ready, a refused check, a rebuild that
//! says it cannot read the statuses) instead of running half-blind.
//!
//! The node takes ~10 s to start, so one test runs the scenarios in turn against one node,
//! each with its own Redis and monitor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::outage::{ids, one_outage_opened_and_closed};
use support::rabbitmq::RabbitMq;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_on_rabbitmq() {
    let mut broker = RabbitMq::start();
    step("lifecycle and API", lifecycle_and_api(&broker)).await;
    step("a monitor restart", monitor_restart(&broker)).await;
    step("an outage", outage(&broker)).await;
    step(
        "a shared group is refused",
        shared_group_is_not_ready(&broker),
    )
    .await;
    step("a rebuild says it is blind", blind_rebuild(&broker)).await;
    step("check-config", check_config(&broker)).await;
    step("a broker crash", broker_crash(&mut broker)).await;
}

async fn step(name: &str, scenario: impl Future<Output = ()>) {
    eprintln!("--- rabbitmq: {name}");
    scenario.await;
}

fn wildcard_status_collector(broker: &RabbitMq) -> impl Future<Output = Collector> + '_ {
    Collector::start(broker, "devices/+/status")
}

/// Devices online then offline on time (seq 1 and 2), the API and the metrics agree, the
/// probe's findings are in the metrics and the monitor is ready without them.
async fn lifecycle_and_api(broker: &RabbitMq) {
    let redis = RedisServer::start();
    let app = TestApp::spawn(config(&redis, broker, &[])).await;
    let statuses = wildcard_status_collector(broker).await;
    let devices = Devices::connect(broker).await;
    let fleet = ids("rmq", 20);
    for id in &fleet {
        devices.heartbeat(id, b"").await;
    }
    wait_online_then_offline(&statuses, &fleet).await;
    let (code, rec) = get_json(app.http(), "/devices/rmq-007").await;
    assert_eq!(code, 200);
    assert_eq!(
        (rec["state"].as_str(), rec["seq"].as_u64()),
        (Some("offline"), Some(2))
    );
    let (_, page) = get_json(app.http(), "/devices?state=offline&limit=1000").await;
    assert_eq!(page["devices"].as_array().unwrap().len(), 20, "{page}");
    let m = scrape(app.http()).await;
    assert_eq!(
        metric(&m, "presenced_devices{state=\"offline\"}"),
        Some(20.0)
    );
    assert_eq!(metric(&m, "presenced_heartbeats_total"), Some(20.0));
    let missing = |f: &str| {
        metric(
            &m,
            &format!("presenced_broker_feature_missing{{feature=\"{f}\"}}"),
        )
    };
    assert_eq!(missing("wildcard_retained"), Some(1.0));
    assert_eq!(
        missing("shared_subscriptions"),
        Some(0.0),
        "not asked without a group"
    );
    assert_eq!(get(app.http(), "/readyz").await.unwrap().0, 200);
    check_invariants(broker, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

/// A monitor stopped for longer than the TTL while devices keep beating (its persistent
/// session queues their heartbeats): none of them goes offline; one that stopped meanwhile
/// does, once the monitor is back.
async fn monitor_restart(broker: &RabbitMq) {
    let redis = RedisServer::start();
    let cfg = config(&redis, broker, &[("presence.ttl", "2s")]);
    let app = TestApp::spawn(cfg.clone()).await;
    let statuses = wildcard_status_collector(broker).await;
    let devices = Arc::new(Devices::connect(broker).await);
    let steady = ids("steady", 5);
    let beating = keep_beating(devices.clone(), steady.clone(), Duration::from_millis(300));
    let quitting = keep_beating(
        devices.clone(),
        vec!["quits".into()],
        Duration::from_millis(300),
    );
    statuses.wait_for("all online", |s| s.len() >= 6).await;
    app.stop().await.unwrap();
    quitting.cancel();
    // Down past the TTL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let app = TestApp::spawn(cfg).await;
    statuses
        .wait_for("the quitter offline", |s| {
            s.iter()
                .any(|m| m.json["device"] == "quits" && m.json["state"] == "offline")
        })
        .await;
    // Two TTLs more of steady beating after the restart: still nobody else offline.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let offline: Vec<_> = statuses
        .all()
        .into_iter()
        .filter(|m| m.json["state"] == "offline" && m.json["device"] != "quits")
        .collect();
    assert!(
        offline.is_empty(),
        "false offline across a restart: {offline:?}"
    );
    beating.cancel();
    wait_all_offline(&statuses, &steady).await;
    check_invariants(broker, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

async fn wait_all_offline(statuses: &Collector, ids: &[String]) {
    eventually("every device offline", || async {
        ids.iter()
            .all(|id| {
                history(&statuses.device(id))
                    .last()
                    .is_some_and(|(_, s)| s == "offline")
            })
            .then_some(())
    })
    .await;
}

/// The group outage scenario: one opening, one closing.
async fn outage(broker: &RabbitMq) {
    let redis = RedisServer::start();
    let app = TestApp::spawn(config(&redis, broker, &[])).await;
    let statuses = wildcard_status_collector(broker).await;
    let beating = one_outage_opened_and_closed(broker, app.http(), &statuses).await;
    drop(beating);
    eventually("every device offline", || async {
        let (_, page) = get_json(app.http(), "/devices?state=online").await;
        page["devices"].as_array()?.is_empty().then_some(())
    })
    .await;
    check_invariants(broker, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

/// With `mqtt.shared_group` the broker accepts `$share/...` and never delivers: the replica
/// says so in `/readyz` (503) and the metrics, and decides no expiry on the heartbeats it
/// cannot see (a device that keeps beating is not reported offline).
async fn shared_group_is_not_ready(broker: &RabbitMq) {
    let redis = RedisServer::start();
    // A device known online, from a monitor without a group.
    let plain = TestApp::spawn(config(&redis, broker, &[("presence.ttl", "2s")])).await;
    let statuses = wildcard_status_collector(broker).await;
    let devices = Arc::new(Devices::connect(broker).await);
    let beating = keep_beating(
        devices.clone(),
        vec!["shared-1".into()],
        Duration::from_millis(300),
    );
    statuses.wait_for("online", |s| !s.is_empty()).await;
    plain.stop().await.unwrap();

    let cfg = config(
        &redis,
        broker,
        &[("presence.ttl", "2s"), ("mqtt.shared_group", "g")],
    );
    let app = TestApp::spawn_unready(cfg).await;
    let reason = eventually("not ready, saying why", || async {
        let (code, body) = get(app.http(), "/readyz").await?;
        (code == 503 && body.contains("shared subscriptions")).then_some(body)
    })
    .await;
    assert!(reason.contains("mqtt.shared_group"), "{reason}");
    let m = scrape(app.http()).await;
    assert_eq!(
        metric(
            &m,
            "presenced_broker_feature_missing{feature=\"shared_subscriptions\"}"
        ),
        Some(1.0)
    );
    // Three TTLs in which the device beats and this replica sees none of it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        metric(&scrape(app.http()).await, "presenced_heartbeats_total"),
        Some(0.0)
    );
    let seen = statuses.all();
    assert!(
        seen.iter().all(|m| m.json["state"] == "online"),
        "a blind replica reported an offline: {seen:?}"
    );
    beating.cancel();
    app.stop().await.unwrap();
}

/// Redis loses its data: the rebuild cannot read the retained statuses through a wildcard
/// and says so (log and counter), and the monitor goes on with the lost buckets empty.
async fn blind_rebuild(broker: &RabbitMq) {
    let redis = RedisServer::start();
    let app = TestApp::spawn(config(&redis, broker, &[("presence.ttl", "2s")])).await;
    let statuses = wildcard_status_collector(broker).await;
    let devices = Devices::connect(broker).await;
    devices.heartbeat("blind-1", b"").await;
    statuses.wait_for("online", |s| !s.is_empty()).await;
    let first = metric(
        &scrape(app.http()).await,
        "presenced_state_rebuilds_blind_total",
    )
    .unwrap();
    assert!(first >= 1.0, "the first start met an empty Redis");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    eventually("the loss noticed, and the rebuild blind", || async {
        let m = scrape(app.http()).await;
        (metric(&m, "presenced_state_rebuilds_blind_total")? > first).then_some(())
    })
    .await;
    // Going on: a heartbeat is applied again (its seq starts over: the documented cost).
    devices.heartbeat("blind-2", b"").await;
    eventually("a new device online", || async {
        let (code, rec) = get_json(app.http(), "/devices/blind-2").await;
        (code == 200 && rec["state"] == "online").then_some(())
    })
    .await;
    app.stop().await.unwrap();
}

/// `check-config`: v3.1.1 passes and names the missing wildcard delivery; with a shared
/// group it fails naming it; in v5 (the default) it fails with the protocol hint.
async fn check_config(broker: &RabbitMq) {
    let redis = RedisServer::start();
    let run = |extra: &[&str]| {
        let out = Command::new(presenced_bin())
            .args([
                "check-config",
                "--redis-url",
                &redis.url(),
                "--mqtt-url",
                &broker.url(),
            ])
            .args(extra)
            .env_remove("PRESENCED_CONFIG")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&["--mqtt-protocol", "v3.1.1"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("only to exact-topic subscriptions"), "{text}");
    let (code, text) = run(&["--mqtt-protocol", "v3.1.1", "--mqtt-shared-group", "g"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("does not serve shared subscriptions"),
        "{text}"
    );
    let (code, text) = run(&[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("mqtt.protocol = \"v3.1.1\""), "{text}");
}

/// The broker is killed and started again (its durable queues and retained store on
/// disk): the monitor reconnects, devices that kept beating stay online, one that stopped
/// goes offline, and everything agrees.
async fn broker_crash(broker: &mut RabbitMq) {
    let redis = RedisServer::start();
    let app = TestApp::spawn(config(&redis, &*broker, &[("presence.ttl", "3s")])).await;
    let statuses = Collector::start_durable(&*broker, "devices/+/status").await;
    let devices = Arc::new(Devices::connect(&*broker).await);
    let fleet = ids("crash", 5);
    let beating = keep_beating(devices.clone(), fleet.clone(), Duration::from_millis(300));
    statuses.wait_for("all online", |s| s.len() >= 5).await;
    broker.restart();
    eventually("ready again", || async {
        (get(app.http(), "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    beating.cancel();
    wait_all_offline(&statuses, &fleet).await;
    check_invariants(&*broker, app.http(), &statuses).await;
    app.stop().await.unwrap();
}
