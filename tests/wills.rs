//! Device wills: a will takes an online device offline at once (reason `will`, since = its
//! arrival) and nothing else does; payloads, replays and stale sessions change nothing and
//! are counted; per device the order of arrival is kept between heartbeats and wills; real
//! MQTT wills of dropped connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use rumqttc::QoS;
use serde_json::Value;
use support::*;

const WILLS: &str = "devices/{device}/will";

fn local_now() -> u64 {
    presenced::device::now_ms()
}

fn statuses_of(statuses: &Collector, id: &str) -> Vec<Value> {
    invariants::accepted(&statuses.device(id))
}

async fn wills_total(api: SocketAddr, result: &str) -> f64 {
    let series = format!("presenced_wills_total{{result=\"{result}\"}}");
    metric(&scrape(api).await, &series).unwrap_or(0.0)
}

/// Waits until `id` has `n` statuses; returns them.
async fn wait_statuses(statuses: &Collector, id: &str, n: usize) -> Vec<Value> {
    statuses
        .wait_for(&format!("{id}: {n} statuses"), |_| {
            statuses_of(statuses, id).len() >= n
        })
        .await;
    statuses_of(statuses, id)
}

/// Holds every write to Redis for `ms` (CLIENT PAUSE WRITE; scripts too): what arrives
/// meanwhile is applied in one round.
async fn pause_writes(redis: &RedisServer, ms: u64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query_async(&mut c)
        .await
        .unwrap();
}

/// Waits until the counter of `result` reaches `n`.
async fn wait_wills(api: SocketAddr, result: &str, n: f64) {
    eventually(&format!("{n} wills {result}"), || async move {
        (wills_total(api, result).await >= n).then_some(())
    })
    .await;
}

/// A will takes the device offline at once with reason `will` and since = its arrival; its
/// TTL no longer runs (no second offline once its deadline passes); its next heartbeat
/// brings it back online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_takes_an_online_device_offline_at_once_until_its_next_heartbeat() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("mqtt.will_topic", WILLS)]).await;
    let api = app.http();
    devices.heartbeat("d1", br#"{"ttl_s":2}"#).await;
    let online = wait_statuses(&statuses, "d1", 1).await;
    let deadline = ms(&online[0]["since"]) + 2_000;

    let sent = local_now();
    devices.publish("devices/d1/will", b" Offline\n").await;
    let seen = wait_statuses(&statuses, "d1", 2).await;
    let off = &seen[1];
    assert_eq!(off["state"], "offline", "{off}");
    assert_eq!(off["reason"], "will", "{off}");
    assert_eq!(off["seq"], 2);
    let since = ms(&off["since"]);
    assert!(
        since + 100 >= sent && since <= ms(&off["detected_at"]),
        "since {since} is not the will's arrival (sent at {sent}): {off}"
    );
    assert!(since < deadline, "{off}");
    let (_, rec) = get_json(api, "/devices/d1").await;
    assert_eq!(
        (rec["state"].as_str(), rec["reason"].as_str()),
        (Some("offline"), Some("will"))
    );
    assert_eq!(wills_total(api, "applied").await, 1.0);

    // Past the deadline the heartbeat had set: no ttl_expired follows the will.
    eventually("the old deadline to pass", || async move {
        (local_now() > deadline + 500).then_some(())
    })
    .await;
    devices.heartbeat("d1", br#"{"ttl_s":60}"#).await;
    let seen = wait_statuses(&statuses, "d1", 3).await;
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert_eq!(
        (seen[2]["state"].as_str(), seen[2]["reason"].as_str()),
        (Some("online"), Some("heartbeat"))
    );
    check_invariants(&mqtt, api, &statuses).await;
    app.stop().await.unwrap();
}

/// Only the will payload (any case, trimmed) or a JSON object saying offline is a will; a
/// will of an offline or unknown device changes nothing; every message is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_wills_take_devices_offline_and_every_message_is_counted() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[
        ("mqtt.will_topic", "tele/{device}/LWT"),
        ("mqtt.will_payload", "Dead"),
    ])
    .await;
    let api = app.http();
    for id in ["a", "b", "c"] {
        devices.heartbeat(id, br#"{"ttl_s":60}"#).await;
        wait_statuses(&statuses, id, 1).await;
    }
    // Not wills: Tasmota's Online, the default payload (not configured here), a JSON
    // object that says online, and a will of a device never seen.
    for (topic, payload) in [
        ("tele/a/LWT", &b"Online"[..]),
        ("tele/a/LWT", b"offline"),
        ("tele/a/LWT", br#"{"state":"online"}"#),
        ("tele/nobody/LWT", b"dead"),
    ] {
        devices.publish(topic, payload).await;
    }
    wait_wills(api, "ignored", 4.0).await;
    // Wills: the configured payload in another case, and a JSON object saying offline.
    devices.publish("tele/a/LWT", b"  DEAD ").await;
    devices
        .publish("tele/b/LWT", br#"{"state":"offline"}"#)
        .await;
    wait_wills(api, "applied", 2.0).await;
    for id in ["a", "b"] {
        let seen = wait_statuses(&statuses, id, 2).await;
        assert_eq!(seen[1]["reason"], "will", "{id}: {seen:?}");
    }
    // A will of a device already offline.
    devices.publish("tele/a/LWT", b"dead").await;
    wait_wills(api, "ignored", 5.0).await;
    assert_eq!(statuses_of(&statuses, "a").len(), 2);
    assert_eq!(statuses_of(&statuses, "c").len(), 1);
    assert!(statuses.device("nobody").is_empty());
    let (code, _) = get_json(api, "/devices/nobody").await;
    assert_eq!(code, 404);
    assert_eq!(wills_total(api, "applied").await, 2.0);
    assert_eq!(wills_total(api, "stale").await, 0.0);
    check_invariants(&mqtt, api, &statuses).await;
    app.stop().await.unwrap();
}

/// Tasmota style: retained `Online` / `Offline` on `tele/<id>/LWT`. A live `Offline` applies;
/// the retained copy a monitor gets when it subscribes is a replay and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_will_delivered_at_subscription_is_not_news() {
    let extra = [("mqtt.will_topic", "tele/{device}/LWT")];
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&extra).await;
    devices.heartbeat("t1", br#"{"ttl_s":60}"#).await;
    wait_statuses(&statuses, "t1", 1).await;
    devices.publish_retained("tele/t1/LWT", b"Online").await;
    devices.publish_retained("tele/t1/LWT", b"Offline").await;
    let seen = wait_statuses(&statuses, "t1", 2).await;
    assert_eq!(seen[1]["reason"], "will", "{seen:?}");
    devices.heartbeat("t1", br#"{"ttl_s":60}"#).await;
    wait_statuses(&statuses, "t1", 3).await;
    app.stop().await.unwrap();

    // A new monitor (a clean session): the broker replays the retained Offline.
    let app = TestApp::spawn(config(&redis, &mqtt, &extra)).await;
    let api = app.http();
    wait_wills(api, "ignored", 1.0).await;
    assert_eq!(wills_total(api, "applied").await, 0.0);
    let (_, rec) = get_json(api, "/devices/t1").await;
    assert_eq!(
        (rec["state"].as_str(), rec["seq"].as_u64()),
        (Some("online"), Some(3))
    );
    assert_eq!(statuses_of(&statuses, "t1").len(), 3);
    check_invariants(&mqtt, api, &statuses).await;
    app.stop().await.unwrap();
}

/// A will that names a session lower than the device's latest heartbeat's is stale: counted,
/// and the device stays online; the current session's will applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_of_an_earlier_session_is_stale() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("mqtt.will_topic", WILLS)]).await;
    let api = app.http();
    devices
        .heartbeat("s1", br#"{"ttl_s":60,"session":4}"#)
        .await;
    devices
        .heartbeat("s1", br#"{"ttl_s":60,"session":5}"#)
        .await;
    // The will follows both heartbeats (one client: the broker keeps the order; the monitor
    // applies a device's heartbeats before its later will).
    wait_statuses(&statuses, "s1", 1).await;
    devices
        .publish("devices/s1/will", br#"{"state":"offline","session":4}"#)
        .await;
    wait_wills(api, "stale", 1.0).await;
    let (_, rec) = get_json(api, "/devices/s1").await;
    assert_eq!(rec["state"], "online", "{rec}");
    devices
        .publish("devices/s1/will", br#"{"state":"offline","session":5}"#)
        .await;
    let seen = wait_statuses(&statuses, "s1", 2).await;
    assert_eq!(seen[1]["reason"], "will");
    assert_eq!(wills_total(api, "applied").await, 1.0);
    assert_eq!(wills_total(api, "stale").await, 1.0);
    check_invariants(&mqtt, api, &statuses).await;
    app.stop().await.unwrap();
}

/// Per device the order of arrival is kept, even when a heartbeat and a will are applied in
/// one round: a will then the reconnect heartbeat is offline then online; a heartbeat of an
/// offline device then its will is online then offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_wills_apply_in_their_order_of_arrival() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("mqtt.will_topic", WILLS), ("presence.min_ttl", "100ms")]).await;
    let api = app.http();
    let ids = outage::ids("r", 20);
    for id in &ids {
        devices.heartbeat(id, br#"{"ttl_s":60}"#).await;
    }
    for id in &ids {
        wait_statuses(&statuses, id, 1).await;
    }
    // Will, then at once the reconnect heartbeat (one client: the broker keeps the order),
    // while Redis holds writes: both reach the monitor before either is applied.
    pause_writes(&redis, 300).await;
    for id in &ids {
        devices
            .publish(&format!("devices/{id}/will"), b"offline")
            .await;
        devices.heartbeat(id, br#"{"ttl_s":0.5}"#).await;
    }
    for id in &ids {
        let seen = wait_statuses(&statuses, id, 3).await;
        let got: Vec<_> = seen
            .iter()
            .map(|s| (s["state"].as_str().unwrap(), s["reason"].as_str().unwrap()))
            .collect();
        assert_eq!(
            got[1..],
            [("offline", "will"), ("online", "heartbeat")],
            "{id}"
        );
        assert!(ms(&seen[2]["since"]) >= ms(&seen[1]["since"]), "{seen:?}");
    }
    // Their short TTL runs out; then a heartbeat, at once followed by the will (again held
    // together).
    for id in &ids {
        wait_statuses(&statuses, id, 4).await;
    }
    pause_writes(&redis, 300).await;
    for id in &ids {
        devices.heartbeat(id, br#"{"ttl_s":60}"#).await;
        devices
            .publish(&format!("devices/{id}/will"), b"offline")
            .await;
    }
    for id in &ids {
        let seen = wait_statuses(&statuses, id, 6).await;
        let got: Vec<_> = seen
            .iter()
            .map(|s| (s["state"].as_str().unwrap(), s["reason"].as_str().unwrap()))
            .collect();
        assert_eq!(
            got[3..],
            [
                ("offline", "ttl_expired"),
                ("online", "heartbeat"),
                ("offline", "will")
            ],
            "{id}"
        );
    }
    assert_eq!(wills_total(api, "applied").await, 40.0);
    check_invariants(&mqtt, api, &statuses).await;
    app.stop().await.unwrap();
}

/// 100 devices with real wills, TTL 60 s: their connections dropped without DISCONNECT (the
/// event loop and its socket gone), the broker publishes their wills: every device is offline
/// with reason `will` within 2 s of its will, since within 100 ms of the will's arrival at
/// another subscriber, and no TTL runs any more (no key, no deadline), so no `ttl_expired`
/// can follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_offline_by_their_wills() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices: _devices,
    } = Fleet::start(&[("mqtt.will_topic", WILLS)]).await;
    let api = app.http();
    let wills = Collector::start(&mqtt, "devices/+/will").await;
    let ids = outage::ids("lwt", 100);
    let mut clients = Vec::new();
    for id in &ids {
        let (client, task) = device_with_will(&mqtt, id).await;
        client
            .publish(
                format!("devices/{id}/heartbeat"),
                QoS::AtLeastOnce,
                false,
                &br#"{"ttl_s":60}"#[..],
            )
            .await
            .unwrap();
        clients.push((client, task));
    }
    for id in &ids {
        wait_statuses(&statuses, id, 1).await;
    }
    // Drop every connection: aborting the event loop closes its socket, no DISCONNECT.
    for (_, task) in &clients {
        task.abort();
    }
    let n = ids.len();
    wills.wait_for("every will", |s| s.len() >= n).await;
    for id in &ids {
        let seen = wait_statuses(&statuses, id, 2).await;
        let off = &seen[1];
        assert_eq!(
            (off["state"].as_str(), off["reason"].as_str()),
            (Some("offline"), Some("will")),
            "{off}"
        );
        let will = wills
            .all()
            .into_iter()
            .find(|s| s.topic == format!("devices/{id}/will"))
            .unwrap();
        let since = ms(&off["since"]);
        assert!(
            since.abs_diff(will.at_ms) <= 100,
            "{id}: since {since}, will seen at {}",
            will.at_ms
        );
        let status_at = statuses
            .all()
            .into_iter()
            .find(|s| s.json["device"] == id.as_str() && s.json["seq"] == 2)
            .unwrap()
            .at_ms;
        assert!(
            status_at <= will.at_ms + 2_000,
            "{id}: offline {} ms after its will",
            status_at - will.at_ms
        );
    }
    // No TTL runs any more (no ttl_expired can follow): no TTL key, no deadline left.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let ttl_keys: Vec<String> = redis::cmd("KEYS")
        .arg("presence:*:ttl:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ttl_keys, Vec::<String>::new());
    let deadlines: Vec<String> = redis::cmd("KEYS")
        .arg("presence:*:deadline")
        .query_async(&mut c)
        .await
        .unwrap();
    for key in deadlines {
        let n: u64 = redis::cmd("ZCARD")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 0, "{key}");
    }
    for id in &ids {
        assert_eq!(
            statuses_of(&statuses, id).len(),
            2,
            "{id}: a status after the will"
        );
    }
    assert_eq!(wills_total(api, "applied").await, 100.0);
    check_invariants(&mqtt, api, &statuses).await;
    app.stop().await.unwrap();
}

/// The race rules across replicas, at the store: a heartbeat and a will of one device that
/// two replicas apply, in either order, end in the state of the later arrival (on equal
/// arrivals the heartbeat's); the will first and the later heartbeat second is offline then
/// online; every seq +1 and states alternating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_replicas_the_later_arrival_wins_in_either_order() {
    use presenced::beat::Beat;
    use presenced::device::{now_ms, DeviceId, State};
    use presenced::store::Store;
    use presenced::will::Will;

    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let a = Store::connect(&client, "presence").await.unwrap();
    let b = Store::connect(&client, "presence").await.unwrap();
    a.start_empty().await.unwrap();
    // (will's arrival − heartbeat's, will applied first, the state it ends in)
    let cases = [
        (0, true, State::Online),
        (0, false, State::Online),
        (1, true, State::Offline),
        (1, false, State::Offline),
        (-1, true, State::Online),
        (-1, false, State::Online),
    ];
    for (k, (offset, will_first, expected)) in cases.into_iter().enumerate() {
        let id = DeviceId::parse(&format!("race-{k}")).unwrap();
        let mut seen = a
            .apply_heartbeats(&[Beat::live(id.clone(), now_ms() - 50, 60_000)], 12_000)
            .await
            .into_result()
            .unwrap();
        let t = now_ms() - 20;
        let beat = Beat::live(id.clone(), t, 60_000);
        let will = Will {
            device: id.clone(),
            arrival: t.saturating_add_signed(offset),
            session: None,
        };
        for step in if will_first {
            [true, false]
        } else {
            [false, true]
        } {
            if step {
                let done = b
                    .apply_wills(std::slice::from_ref(&will))
                    .await
                    .into_result()
                    .unwrap();
                seen.extend(done.into_iter().flat_map(|w| w.committed));
            } else {
                seen.extend(
                    a.apply_heartbeats(std::slice::from_ref(&beat), 12_000)
                        .await
                        .into_result()
                        .unwrap(),
                );
            }
        }
        let events: Vec<_> = seen
            .iter()
            .filter_map(|c| c.event.device().cloned())
            .collect();
        let case = format!("case {k}: will {offset:+} ms, will first {will_first}: {events:?}");
        for (i, ev) in events.iter().enumerate() {
            assert_eq!(ev.seq, i as u64 + 1, "{case}");
            let want = if i % 2 == 0 {
                State::Online
            } else {
                State::Offline
            };
            assert_eq!(ev.state, want, "{case}");
        }
        assert_eq!(events.last().unwrap().state, expected, "{case}");
        if offset < 0 && will_first {
            assert_eq!(events.len(), 3, "offline by the will, then online: {case}");
        }
    }
}

/// A stale will that reaches Redis before the fresher heartbeat another replica holds (a
/// device reconnected with session 5 before the broker noticed its old connection died and
/// sent the will of session 4): that heartbeat still ends the offline, though it arrived
/// before the will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_of_a_later_session_ends_a_stale_wills_offline() {
    use presenced::beat::Beat;
    use presenced::device::{now_ms, DeviceId, State};
    use presenced::store::Store;
    use presenced::will::Will;

    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let a = Store::connect(&client, "presence").await.unwrap();
    let b = Store::connect(&client, "presence").await.unwrap();
    a.start_empty().await.unwrap();
    let id = DeviceId::parse("reconnected").unwrap();
    let t = now_ms() - 100;
    let session = |s, at| Beat {
        session: Some(s),
        ..Beat::live(id.clone(), at, 60_000)
    };
    let mut seen = a
        .apply_heartbeats(&[session(4, t)], 12_000)
        .await
        .into_result()
        .unwrap();
    let will = Will {
        device: id.clone(),
        arrival: t + 50,
        session: Some(4),
    };
    let done = a.apply_wills(&[will]).await.into_result().unwrap();
    seen.extend(done.into_iter().flat_map(|w| w.committed));
    // Held at b since t + 20, applied only now.
    seen.extend(
        b.apply_heartbeats(&[session(5, t + 20)], 12_000)
            .await
            .into_result()
            .unwrap(),
    );
    let states: Vec<_> = seen
        .iter()
        .filter_map(|c| c.event.device().map(|e| (e.seq, e.state)))
        .collect();
    assert_eq!(
        states,
        [(1, State::Online), (2, State::Offline), (3, State::Online)]
    );
    // A heartbeat of the will's own session, held as long, does not.
    let other = DeviceId::parse("gone").unwrap();
    let beat = |s, at| Beat {
        session: Some(s),
        ..Beat::live(other.clone(), at, 60_000)
    };
    a.apply_heartbeats(&[beat(4, t)], 12_000)
        .await
        .into_result()
        .unwrap();
    let will = Will {
        device: other.clone(),
        arrival: t + 50,
        session: Some(4),
    };
    a.apply_wills(&[will]).await.into_result().unwrap();
    let late = b
        .apply_heartbeats(&[beat(4, t + 20)], 12_000)
        .await
        .into_result()
        .unwrap();
    assert!(late.is_empty(), "{late:?}");
}
