//! Scenarios run against any broker (`Broker`): the brokers beside Mosquitto run these,
//! each ending with the invariant check, plus the refusals where a broker lacks a feature.

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::outage::{ids, one_outage_opened_and_closed};
use super::*;

fn wildcard_status_collector(broker: &impl Broker) -> impl Future<Output = Collector> + '_ {
    Collector::start(broker, "devices/+/status")
}

/// Devices online then offline on time (seq 1 and 2), the API and the metrics agree, the
/// probe's findings are in the metrics and the monitor is ready without them.
pub async fn lifecycle_and_api(broker: &impl Broker) {
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
    let lacks = |has: bool| Some(if has { 0.0 } else { 1.0 });
    assert_eq!(
        missing("wildcard_retained"),
        lacks(broker.wildcard_retained())
    );
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
pub async fn monitor_restart(broker: &impl Broker) {
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

/// Devices' own wills (MQTT 3.1.1 LWT, no delay): a dropped connection is an offline with
/// reason `will` long before the TTL (60 s here) runs out.
pub async fn wills(broker: &impl Broker) {
    let redis = RedisServer::start();
    let cfg = config(
        &redis,
        broker,
        &[("mqtt.will_topic", "devices/{device}/will")],
    );
    let app = TestApp::spawn(cfg).await;
    let statuses = wildcard_status_collector(broker).await;
    let fleet = ids("lwt", 10);
    let mut tasks = Vec::new();
    for id in &fleet {
        let (client, task) = device_with_will(broker, id).await;
        let beat = br#"{"ttl_s":60}"#;
        client
            .publish(
                format!("devices/{id}/heartbeat"),
                rumqttc::QoS::AtLeastOnce,
                false,
                &beat[..],
            )
            .await
            .unwrap();
        tasks.push((client, task));
    }
    statuses
        .wait_for("all online", |s| s.len() >= fleet.len())
        .await;
    // Aborting the event loop closes the socket without DISCONNECT: the broker sends the will.
    for (_, task) in &tasks {
        task.abort();
    }
    wait_all_offline(&statuses, &fleet).await;
    for id in &fleet {
        let off = statuses.device(id).pop().unwrap();
        assert_eq!(off["reason"], "will", "{off}");
    }
    check_invariants(broker, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

/// The group outage scenario: one opening, one closing.
pub async fn outage(broker: &impl Broker) {
    let redis = RedisServer::start();
    let app = TestApp::spawn(config(&redis, broker, &[])).await;
    let statuses = wildcard_status_collector(broker).await;
    let beating = one_outage_opened_and_closed(broker, app.http(), &statuses).await;
    drop(beating);
    // Every device's last status seen offline (the API commits before the broker delivers).
    let mut all = ids("site", 100);
    all.extend(ids("calm", 20));
    wait_all_offline(&statuses, &all).await;
    check_invariants(broker, app.http(), &statuses).await;
    app.stop().await.unwrap();
}

/// With `mqtt.shared_group` the broker accepts `$share/...` and never delivers: the replica
/// says so in `/readyz` (503) and the metrics, and decides no expiry on the heartbeats it
/// cannot see (a device that keeps beating is not reported offline).
pub async fn shared_group_is_not_ready(broker: &impl Broker) {
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
pub async fn blind_rebuild(broker: &impl Broker) {
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
pub async fn check_config(broker: &impl Broker) {
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
    let protocol = broker.protocol().unwrap_or("v5");
    let (code, text) = run(&["--mqtt-protocol", protocol]);
    assert_eq!(code, Some(0), "{text}");
    let said = if broker.wildcard_retained() {
        "mqtt: the broker serves retained messages to wildcard subscriptions, QoS 1"
    } else {
        "only to exact-topic subscriptions"
    };
    assert!(text.contains(said), "{text}");
    if !broker.shared_subscriptions() {
        let (code, text) = run(&["--mqtt-protocol", protocol, "--mqtt-shared-group", "g"]);
        assert_eq!(code, Some(1), "{text}");
        assert!(
            text.contains("does not serve shared subscriptions"),
            "{text}"
        );
    }
    if broker.protocol() == Some("v3.1.1") {
        // v5, the default, on a broker that speaks only 3.1.1.
        let (code, text) = run(&[]);
        assert_eq!(code, Some(1), "{text}");
        assert!(text.contains("mqtt.protocol = \"v3.1.1\""), "{text}");
    }
}

/// The broker is killed and started again (keeping its sessions and retained messages or
/// not, as it is configured): the monitor reconnects (and republishes every status if the
/// broker lost them), and once the devices stop everything agrees.
pub async fn broker_crash(broker: &mut impl Broker) {
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
