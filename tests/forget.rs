//! Forgetting devices offline for longer than `presence.forget_after`, against real Redis
//! and mosquitto.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;

const FORGET_AFTER_MS: u64 = 2_000;

/// Every `presence:{b}:<name>` key's size, summed over the buckets.
async fn total(redis: &RedisServer, name: &str, card: &str) -> i64 {
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("presence:{{*}}:{name}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut n = 0;
    for k in keys {
        let c: i64 = redis::cmd(card)
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        n += c;
    }
    n
}

/// Devices offline for longer than `forget_after` (counted from their offline `since`) are
/// forgotten: 404, gone from `/devices` and the counts, their retained status cleared (live
/// subscribers see an empty retained message, a fresh one gets nothing), counted once in
/// the metric. A device that came back online before `forget_after` is kept, and a
/// forgotten device's next heartbeat starts it again at seq 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_offline_for_longer_than_forget_after_are_forgotten() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses: _statuses,
        devices: _devices,
    } = Fleet::start(&[("presence.forget_after", "2s")]).await;
    let api = app.http();
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let kept_statuses = Collector::start(&mqtt, "devices/kept/status").await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    assert_eq!(
        metric(&scrape(api).await, "presenced_devices_forgotten_total"),
        Some(0.0)
    );

    let gone = ["gone-1", "gone-2", "gone-3"];
    for id in gone.iter().chain(&["kept"]) {
        devices.heartbeat(id, b"").await;
    }
    // Silent past the TTL: offline (seq 2). `kept` comes back at once, well within
    // forget_after, and keeps beating.
    let status = |id: &'static str, seq: u64| {
        let statuses = &statuses;
        async move {
            statuses
                .all()
                .into_iter()
                .find(|s| s.topic == format!("devices/{id}/status") && s.json["seq"] == seq)
        }
    };
    eventually("kept offline", || status("kept", 2)).await;
    let beating = keep_beating(
        devices.clone(),
        vec!["kept".into()],
        Duration::from_millis(300),
    );
    eventually("kept online again", || status("kept", 3)).await;

    // The others are forgotten once forget_after has passed since their offline `since`.
    for id in gone {
        let cleared = eventually("an empty retained status", || async {
            statuses
                .all()
                .into_iter()
                .find(|s| s.topic == format!("devices/{id}/status") && s.json.is_null())
        })
        .await;
        let offline = status(id, 2).await.expect("offline before forgotten");
        assert_eq!(offline.json["state"], "offline", "{id}");
        assert!(
            cleared.at_ms >= ms(&offline.json["since"]) + FORGET_AFTER_MS,
            "{id} forgotten too early: cleared at {}, offline since {}",
            cleared.at_ms,
            offline.json["since"]
        );
        let (code, _) = get_json(api, &format!("/devices/{id}")).await;
        assert_eq!(code, 404, "{id}");
    }
    let (code, page) = get_json(api, "/devices").await;
    assert_eq!(code, 200);
    let ids: Vec<&str> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kept"]);
    let (code, kept) = get_json(api, "/devices/kept").await;
    assert_eq!(code, 200);
    assert_eq!(
        (kept["state"].as_str(), kept["seq"].as_u64()),
        (Some("online"), Some(3))
    );
    eventually("counts without the forgotten devices", || async {
        let s = scrape(api).await;
        (metric(&s, r#"presenced_devices{state="online"}"#) == Some(1.0)
            && metric(&s, r#"presenced_devices{state="offline"}"#) == Some(0.0))
        .then_some(())
    })
    .await;
    let s = scrape(api).await;
    assert_eq!(metric(&s, "presenced_devices_forgotten_total"), Some(3.0));
    // The clears were acknowledged by the broker and recorded; no stale forget index.
    eventually("an empty outbox", || async {
        (total(&redis, "outbox", "ZCARD").await == 0).then_some(())
    })
    .await;
    assert_eq!(total(&redis, "offsince", "ZCARD").await, 0);

    // A fresh subscriber gets `kept`'s retained status and nothing for the forgotten ones. A
    // live message published after it subscribed comes after every retained one.
    let fresh = Collector::start(&mqtt, "devices/+/status").await;
    devices.publish("devices/zz-marker/status", b"{}").await;
    fresh
        .wait_for("the marker", |s| {
            s.iter().any(|m| m.topic == "devices/zz-marker/status")
        })
        .await;
    let retained: Vec<String> = fresh
        .all()
        .into_iter()
        .filter(|m| m.retain)
        .map(|m| m.topic)
        .collect();
    assert_eq!(retained, ["devices/kept/status"]);

    // A forgotten device's next heartbeat makes it a new device.
    devices.heartbeat("gone-1", b"").await;
    let back = eventually("gone-1 back", || async {
        statuses
            .all()
            .into_iter()
            .filter(|s| s.topic == "devices/gone-1/status" && !s.json.is_null())
            .nth(2)
    })
    .await;
    assert_eq!(back.json["seq"], 1, "{}", back.json);
    assert_eq!(back.json["state"], "online");
    let (code, rec) = get_json(api, "/devices/gone-1").await;
    assert_eq!((code, rec["seq"].as_u64()), (200, Some(1)));
    // Forgotten once each, on this single replica.
    let s = scrape(api).await;
    assert_eq!(metric(&s, "presenced_devices_forgotten_total"), Some(3.0));

    // `kept` was never cleared, and retained, API and statuses agree for it.
    assert!(statuses
        .all()
        .iter()
        .all(|s| s.topic != "devices/kept/status" || !s.json.is_null()));
    let finals = check_invariants(&mqtt, api, &kept_statuses).await;
    assert_eq!(finals.get("kept").map(String::as_str), Some("online"));
    beating.cancel();
}

/// Two replicas on one Redis forget each device exactly once: their counters add up to the
/// number of devices, and every forgotten device's retained status is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_forget_each_device_once() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let extra = [("presence.forget_after", "2s")];
    let a = TestApp::spawn(config(&redis, &mqtt, &extra)).await;
    let b = TestApp::spawn(config(&redis, &mqtt, &extra)).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let ids: Vec<String> = (0..60).map(|i| format!("fleet-{i:03}")).collect();
    for id in &ids {
        devices.heartbeat(id, b"").await;
    }
    eventually("every device cleared", || async {
        let seen = statuses.all();
        ids.iter()
            .all(|id| {
                seen.iter()
                    .any(|s| s.topic == format!("devices/{id}/status") && s.json.is_null())
            })
            .then_some(())
    })
    .await;
    eventually("an empty outbox", || async {
        (total(&redis, "outbox", "ZCARD").await == 0).then_some(())
    })
    .await;
    let forgotten = |s: String| metric(&s, "presenced_devices_forgotten_total").unwrap();
    let sum = forgotten(scrape(a.http()).await) + forgotten(scrape(b.http()).await);
    assert_eq!(sum, ids.len() as f64);
    assert_eq!(total(&redis, "rec", "HLEN").await, 0);
    let (_, page) = get_json(b.http(), "/devices").await;
    assert_eq!(page["devices"].as_array().map(Vec::len), Some(0));
}

/// A device that went offline before the offline-since index existed (only its record and
/// the offline index, as an older version wrote them) is indexed at start and forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_offline_before_the_index_existed_are_forgotten_too() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let now = presenced::device::now_ms();
    let b = presenced::bucket::bucket_of("old-1");
    let mut conn = redis.conn().await;
    let record = format!("0|2|{}|{}|{}", now - 10_000, now - 11_000, now - 9_990);
    let _: () = redis::cmd("HSET")
        .arg(format!("presence:{{{b}}}:rec"))
        .arg("old-1")
        .arg(record)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(format!("presence:{{{b}}}:offline"))
        .arg(0)
        .arg("old-1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.forget_after", "2s")])).await;
    eventually("old-1 forgotten", || async {
        (get_json(app.http(), "/devices/old-1").await.0 == 404).then_some(())
    })
    .await;
    assert_eq!(
        metric(
            &scrape(app.http()).await,
            "presenced_devices_forgotten_total"
        ),
        Some(1.0)
    );
    assert_eq!(total(&redis, "offsince", "ZCARD").await, 0);
    assert_eq!(total(&redis, "offline", "ZCARD").await, 0);
}
