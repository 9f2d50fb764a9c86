//! The path from heartbeat to retained status, against real Redis and mosquitto.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

/// Online → offline → online, with the contract's exact payloads, `seq` and retain flag,
/// and a late subscriber sees the last status retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_offline_online_with_exact_payloads() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[]).await;

    let sent = presenced::device::now_ms();
    devices.heartbeat("sensor-17", b"").await;
    statuses
        .wait_for("online", |s| s.iter().any(|m| m.json["seq"] == 1))
        .await;
    statuses
        .wait_for("offline", |s| s.iter().any(|m| m.json["seq"] == 2))
        .await;
    devices.heartbeat("sensor-17", b"not json at all").await;
    statuses
        .wait_for("online again", |s| s.iter().any(|m| m.json["seq"] == 3))
        .await;

    let seen = statuses.all();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for s in &seen {
        assert_eq!(s.topic, "devices/sensor-17/status");
    }
    let (on, off, on2) = (&seen[0].json, &seen[1].json, &seen[2].json);
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(on),
        [
            "detected_at",
            "device",
            "flapping",
            "last_seen",
            "reason",
            "seq",
            "since",
            "state"
        ]
    );
    assert_eq!(on["device"], "sensor-17");
    assert_eq!(on["state"], "online");
    assert_eq!(on["reason"], "heartbeat");
    assert_eq!(on["since"], on["last_seen"]);
    // Times are Redis's clock; an arrival is shifted to it within half a round trip of the
    // monitor's Redis connection (tens of ms on a loaded machine), so `since` may lie a
    // little before this process read its own clock.
    let since = ms(&on["since"]);
    assert!(
        since + 100 >= sent && since < sent + 1000,
        "since {since}, sent at {sent}"
    );
    for t in ["since", "last_seen", "detected_at"] {
        let s = on[t].as_str().unwrap();
        assert!(
            s.ends_with('Z') && s.len() == "2026-11-22T10:00:00.123Z".len(),
            "{s}"
        );
    }

    assert_eq!(off["state"], "offline");
    assert_eq!(off["reason"], "ttl_expired");
    assert_eq!(off["seq"], 2);
    // `since` of an offline status is the TTL deadline: last heartbeat + 1 s.
    assert_eq!(off["last_seen"], on["last_seen"]);
    assert_eq!(ms(&off["since"]), ms(&on["last_seen"]) + 1000);
    let detected = ms(&off["detected_at"]);
    assert!(detected >= ms(&off["since"]), "{off}");
    assert!(detected - ms(&off["since"]) < 500, "decided late: {off}");

    assert_eq!(on2["state"], "online");
    assert_eq!(on2["seq"], 3);
    // Three transitions stay below the default threshold (4).
    for s in [on, off, on2] {
        assert_eq!(s["flapping"], false, "{s}");
    }

    // A subscriber arriving now gets the current status, retained.
    let late = Collector::start(&mqtt, "devices/sensor-17/status").await;
    late.wait_for("retained status", |s| !s.is_empty()).await;
    let r = &late.all()[0];
    assert!(r.retain);
    assert_eq!(r.json, *on2);

    // The API agrees.
    let (code, rec) = get_json(app.http(), "/devices/sensor-17").await;
    assert_eq!(code, 200);
    assert_eq!(rec["state"], "online");
    assert_eq!(rec["seq"], 3);
    app.stop().await.unwrap();
}

/// A heartbeat may ask for its own TTL (`ttl_s`), clamped to the configured bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_override_is_applied_and_clamped() {
    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[
        ("presence.min_ttl", "700ms"),
        ("presence.max_ttl", "2500ms"),
    ])
    .await;

    devices.heartbeat("asks-2s", br#"{"ttl_s": 2}"#).await;
    devices.heartbeat("asks-tiny", br#"{"ttl_s": 0.01}"#).await;
    devices.heartbeat("asks-huge", br#"{"ttl_s": 1e6}"#).await;
    devices.heartbeat("asks-bad", br#"{"ttl_s": "5"}"#).await;
    statuses
        .wait_for("all offline", |s| {
            s.iter().filter(|m| m.json["state"] == "offline").count() == 4
        })
        .await;
    let ttl_of = |id: &str| {
        let off = statuses
            .device(id)
            .into_iter()
            .find(|m| m["state"] == "offline")
            .unwrap();
        ms(&off["since"]) - ms(&off["last_seen"])
    };
    assert_eq!(ttl_of("asks-2s"), 2000);
    assert_eq!(ttl_of("asks-tiny"), 700);
    assert_eq!(ttl_of("asks-huge"), 2500);
    assert_eq!(ttl_of("asks-bad"), 1000);
    app.stop().await.unwrap();
}

/// TTL rules give each class of device its TTL: the first rule that matches the id, or the
/// group (named by the heartbeat), else `presence.ttl`; a heartbeat's `ttl_s` still wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_rules_give_each_class_its_ttl() {
    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("presence.ttl_rules", "bat-*=3s,gw-*=1500ms,group:lab=2s")]).await;
    let beats: [(&str, &[u8], u64); 6] = [
        ("bat-1", b"", 3_000),
        ("gw-1", br#"{"group":"lab"}"#, 1_500),
        ("s-1", br#"{"group":"lab"}"#, 2_000),
        ("s-2", br#"{"group":"prod"}"#, 1_000),
        ("s-3", b"", 1_000),
        ("bat-2", br#"{"ttl_s": 1.2}"#, 1_200),
    ];
    for (id, payload, _) in beats {
        devices.heartbeat(id, payload).await;
    }
    statuses
        .wait_for("each offline", |s| {
            beats.iter().all(|(id, _, _)| {
                s.iter()
                    .any(|m| m.json["device"] == *id && m.json["state"] == "offline")
            })
        })
        .await;
    for (id, _, ttl) in beats {
        let off = statuses
            .device(id)
            .into_iter()
            .find(|m| m["state"] == "offline")
            .unwrap();
        // The offline's since is the deadline: the heartbeat's arrival plus its TTL.
        let lived = ms(&off["since"]) - ms(&off["last_seen"]);
        assert_eq!(lived, ttl, "{id}: {off}");
    }
    app.stop().await.unwrap();
}

/// Invalid ids and oversized payloads are counted, never stored, and never disturb valid
/// heartbeats, even when the oversized one is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_heartbeats_are_counted_and_skipped() {
    let Fleet {
        redis,
        mqtt: _mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("mqtt.max_packet_size", "1KiB"), ("presence.ttl", "30s")]).await;

    let long = "x".repeat(129);
    devices.heartbeat(&long, b"").await;
    devices.heartbeat("big", &vec![b'a'; 2048]).await;
    devices.heartbeat("big", &vec![b'a'; 3 << 20]).await;
    devices.heartbeat("fine", &vec![b'a'; 1024]).await;

    statuses
        .wait_for("valid device online", |s| {
            s.iter().any(|m| m.json["device"] == "fine")
        })
        .await;
    let addr = app.http();
    eventually("rejections counted", || async move {
        let m = scrape(addr).await;
        let invalid = metric(
            &m,
            r#"presenced_heartbeats_rejected_total{reason="invalid_id"}"#,
        )?;
        let large = metric(
            &m,
            r#"presenced_heartbeats_rejected_total{reason="too_large"}"#,
        )?;
        (invalid == 1.0 && large == 2.0).then_some(())
    })
    .await;
    let m = scrape(addr).await;
    assert_eq!(metric(&m, "presenced_heartbeats_total"), Some(1.0));
    assert_eq!(
        metric(&m, r#"presenced_devices{state="online"}"#),
        Some(1.0)
    );
    assert_eq!(get(addr, "/devices/big").await.unwrap().0, 404);
    assert_eq!(get(addr, &format!("/devices/{long}")).await.unwrap().0, 404);

    // Nothing of the rejected ids reached Redis.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let mut all = String::new();
    for k in &keys {
        let dump: Vec<String> = match redis::cmd("TYPE")
            .arg(k)
            .query_async::<String>(&mut redis.conn().await)
            .await
            .unwrap()
            .as_str()
        {
            "hash" => redis::cmd("HKEYS")
                .arg(k)
                .query_async(&mut redis.conn().await)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .query_async(&mut redis.conn().await)
                .await
                .unwrap(),
            _ => vec![],
        };
        all.push_str(k);
        all.push_str(&dump.join(","));
    }
    assert!(!all.contains("big") && !all.contains(&long), "{all}");

    // The session still works after the oversized (and redelivered) messages.
    devices.heartbeat("later", b"").await;
    statuses
        .wait_for("later device online", |s| {
            s.iter().any(|m| m.json["device"] == "later")
        })
        .await;
    assert_eq!(statuses.all().len(), 2);
    app.stop().await.unwrap();
}

/// The monitor's own presence: retained online with the connection time, and offline after
/// a clean shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_presence_online_then_offline_on_shutdown() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses: _statuses,
        devices: _devices,
    } = Fleet::start(&[]).await;
    let instance = app.instance().to_owned();
    let topic = format!("presenced/instances/{instance}");
    let seen = Collector::start(&mqtt, &topic).await;
    seen.wait_for("online presence", |s| !s.is_empty()).await;
    let online = seen.all()[0].clone();
    assert!(online.retain);
    assert_eq!(online.json["state"], "online");
    assert_eq!(online.json["instance"], instance.as_str());
    ms(&online.json["since"]);

    app.stop().await.unwrap();
    seen.wait_for("offline presence", |s| {
        s.iter().any(|m| m.json["state"] == "offline")
    })
    .await;
    let late = Collector::start(&mqtt, &topic).await;
    late.wait_for("retained offline", |s| !s.is_empty()).await;
    assert_eq!(late.all()[0].json["state"], "offline");
    assert_eq!(late.all()[0].json["instance"], instance.as_str());
}

/// With 20,000 other devices online and not due, 100 silent devices are each reported
/// offline within 2 s of their deadline, however lazily Redis expires their keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_devices_among_many_are_reported_on_time() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses: _statuses,
        devices,
    } = Fleet::start(&[("presence.ttl", "600s"), ("presence.max_ttl", "1h")]).await;
    for i in 0..20_000 {
        devices.heartbeat(&format!("steady-{i:05}"), b"").await;
    }
    let addr = app.http();
    eventually("20,000 devices online", || async move {
        let m = scrape(addr).await;
        (metric(&m, r#"presenced_devices{state="online"}"#)? == 20_000.0).then_some(())
    })
    .await;

    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let quiet: Vec<String> = (0..100).map(|i| format!("quiet-{i:03}")).collect();
    for id in &quiet {
        devices.heartbeat(id, br#"{"ttl_s": 3}"#).await;
    }
    // Counted per device and seq, not per message: a status may be published twice (when
    // the broker acknowledges the online status after the device already went offline,
    // the offline one is published again so that it stays the retained one), which the
    // contract allows ("each seq at least once"). The 20,000 online statuses still being
    // published when the quiet devices start make that likely on a loaded machine.
    // One pass over what was seen per check: the collector also holds the 20,000 steady
    // statuses, so a lookup per device would cost more CPU than the monitor under test.
    statuses
        .wait_for("every quiet device offline", |s| {
            let offline: std::collections::HashSet<&str> = s
                .iter()
                .filter(|m| m.json["state"] == "offline")
                .filter_map(|m| m.json["device"].as_str())
                .collect();
            quiet.iter().all(|id| offline.contains(id.as_str()))
        })
        .await;
    let mut by_device: std::collections::HashMap<String, Vec<Seen>> = Default::default();
    for m in statuses.all() {
        if let Some(id) = m.json["device"]
            .as_str()
            .filter(|d| d.starts_with("quiet-"))
        {
            by_device.entry(id.to_owned()).or_default().push(m.clone());
        }
    }
    let mut worst = 0;
    for id in &quiet {
        let seen = &by_device[id];
        let msgs: Vec<_> = seen.iter().map(|m| m.json.clone()).collect();
        assert_eq!(
            history(&msgs),
            vec![(1, "online".into()), (2, "offline".into())],
            "{id}"
        );
        // The first offline status is the report; a repeat of it is not later news.
        let first = seen.iter().find(|m| m.json["state"] == "offline").unwrap();
        let deadline = ms(&first.json["since"]);
        assert_eq!(deadline - ms(&first.json["last_seen"]), 3000);
        worst = worst.max(first.at_ms.saturating_sub(deadline));
    }
    assert!(
        worst <= 2000,
        "an offline status arrived {worst} ms after its deadline"
    );
    let m = scrape(addr).await;
    assert_eq!(
        metric(&m, r#"presenced_devices{state="offline"}"#),
        Some(100.0)
    );
    assert_eq!(
        metric(&m, "presenced_notification_lag_seconds_count"),
        Some(100.0)
    );
    app.stop().await.unwrap();
}

/// Devices whose TTL ran out while no monitor ran are marked offline at start, and counted
/// as missed expirations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_marks_unobserved_expiries_offline() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let cfg = config(&redis, &mqtt, &[("presence.ttl", "1s")]);
    let app = TestApp::spawn(cfg.clone()).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    for i in 0..50 {
        devices
            .heartbeat(&format!("d{i}"), br#"{"ttl_s": 30}"#)
            .await;
    }
    statuses.wait_for("50 online", |s| s.len() == 50).await;
    app.stop().await.unwrap();
    // Make their deadlines pass while nothing listens: shorten them in Redis directly.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("presence:*:deadline")
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in keys {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(&k)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        for m in members {
            let past = presenced::device::now_ms() - 5_000;
            let _: () = redis::cmd("ZADD")
                .arg(&k)
                .arg(past)
                .arg(&m)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    let app = TestApp::spawn(cfg).await;
    eventually("50 offline", || async {
        (0..50)
            .all(|i| history(&statuses.device(&format!("d{i}"))).len() == 2)
            .then_some(())
    })
    .await;
    for i in 0..50 {
        assert_eq!(
            history(&statuses.device(&format!("d{i}"))),
            vec![(1, "online".into()), (2, "offline".into())]
        );
    }
    let m = scrape(app.http()).await;
    assert_eq!(metric(&m, "presenced_missed_expirations_total"), Some(50.0));
    assert_eq!(
        metric(&m, r#"presenced_transitions_total{to="offline"}"#),
        Some(50.0)
    );
    app.stop().await.unwrap();
}

/// Heartbeats sent while the monitor is stopped are queued by the broker on its persistent
/// session and applied when it is back: a restart shorter than the TTL publishes no offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_during_a_restart_keep_devices_online() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let cfg = config(&redis, &mqtt, &[("presence.ttl", "2s")]);
    let app = TestApp::spawn(cfg.clone()).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    devices.heartbeat("steady", b"").await;
    statuses.wait_for("online", |s| s.len() == 1).await;
    app.stop().await.unwrap();
    // Down for 3 s (past the 2 s TTL); the device keeps sending every 500 ms.
    for _ in 0..6 {
        devices.heartbeat("steady", b"").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let app = TestApp::spawn(cfg).await;
    for _ in 0..6 {
        devices.heartbeat("steady", b"").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(statuses.all().len(), 1, "{:?}", statuses.all());
    let (_, rec) = get_json(app.http(), "/devices/steady").await;
    assert_eq!(rec["state"], "online");
    app.stop().await.unwrap();
}

fn cutoff(before: u64) -> presenced::store::Cutoff {
    presenced::store::Cutoff {
        before,
        floor_lease_ms: 12_000,
    }
}

/// The same device named twice in one batch of expired events yields one transition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_expiry_events_in_one_batch_commit_once() {
    use presenced::device::now_ms;
    let (_redis, store, id, _) = online_but_overdue("twice").await;
    let now = now_ms();
    let off = store
        .expire_devices(&[id.clone(), id.clone(), id.clone()], cutoff(now))
        .await
        .into_result()
        .unwrap();
    assert_eq!(off.len(), 1);
    assert_eq!(off[0].event.device().unwrap().seq, 2);
    let again = store
        .expire_devices(std::slice::from_ref(&id), cutoff(now))
        .await
        .into_result()
        .unwrap();
    assert!(again.is_empty());
}

/// The same path over MQTT 3.1.1 (persistent session via clean session off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_v311_online_offline() {
    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("mqtt.protocol", "v3.1.1")]).await;
    devices.heartbeat("old-protocol", b"").await;
    statuses
        .wait_for("online then offline", |s| s.len() == 2)
        .await;
    assert_eq!(
        history(&statuses.device("old-protocol")),
        vec![(1, "online".into()), (2, "offline".into())]
    );
    // Oversized payloads are skipped without breaking a 3.1.1 session either.
    devices.heartbeat("big", &vec![b'x'; (1 << 20) + 1]).await;
    devices.heartbeat("after-big", b"").await;
    statuses
        .wait_for("next device online", |s| {
            s.iter().any(|m| m.json["device"] == "after-big")
        })
        .await;
    app.stop().await.unwrap();
}

/// Invariant 5 at the store: acknowledging an older seq while the device is at a newer one
/// stages and returns the current status (it may have been overwritten at the broker);
/// acknowledging the current seq returns nothing and empties the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_of_an_overtaken_status_republishes_the_current_one() {
    use presenced::device::{now_ms, State};
    use presenced::status::{Delivered, Receipt};
    let (_redis, store, id, online) = online_but_overdue("overtaken").await;
    let now = now_ms();
    let offline = store
        .expire_devices(std::slice::from_ref(&id), cutoff(now))
        .await
        .into_result()
        .unwrap()
        .remove(0);
    let ack = |c: &presenced::store::Committed| Delivered {
        receipt: Receipt {
            bucket: c.bucket,
            member: c.member.clone(),
        },
        subject: presenced::status::Subject::Device(c.event.device().unwrap().device.clone()),
        seq: c.event.device().unwrap().seq,
    };
    // seq 1 acknowledged after seq 2 was committed: seq 2 must go out (again).
    let again = store
        .ack(&[ack(&online), ack(&online)])
        .await
        .into_result()
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event.device().unwrap().seq, 2);
    assert_eq!(again[0].event.device().unwrap().state, State::Offline);
    assert_eq!(again[0].member, offline.member);
    // The current one acknowledged: nothing more, and the outbox is empty.
    assert!(store
        .ack(&[ack(&offline)])
        .await
        .into_result()
        .unwrap()
        .is_empty());
    let left = store
        .claim_outbox(Some(presenced::device::now_ms() + 3_600_000), 100)
        .await
        .into_result()
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// A Redis with one device committed online (seq 1) whose deadline has already passed:
/// the store as the expiry scripts find it. Returns the server (keep it alive), the store,
/// the device and its online transition.
async fn online_but_overdue(
    name: &str,
) -> (
    RedisServer,
    presenced::store::Store,
    presenced::device::DeviceId,
    presenced::store::Committed,
) {
    use presenced::beat::Beat;
    use presenced::device::{now_ms, DeviceId};
    use presenced::store::Store;
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let store = Store::connect(&client, "presence").await.unwrap();
    store.start_empty().await.unwrap();
    let id = DeviceId::parse(name).unwrap();
    // Online with a short TTL; then its deadline passes (nothing in this test sweeps).
    let mut on = store
        .apply_heartbeats(&[Beat::live(id.clone(), now_ms(), 200)], 12_000)
        .await
        .into_result()
        .unwrap();
    assert_eq!(on.len(), 1);
    let online = on.remove(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    (redis, store, id, online)
}
