//! `GET /events` against real servers: every transition once and per device in seq order,
//! equal to the MQTT statuses; resume exactly after an id; `gap` for an unknown or expired
//! id; filters; every replica's stream carries every replica's transitions, a killed
//! replica's included; a client that stops reading is cut off while others go on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::outage::{ids, in_payload};
use support::proxy::{FaultProxy, Mode};
use support::sse::{closed_by_server, stalled_client, SseClient, SseEvent};
use support::*;
use tokio::time::Instant;

/// `(device, seq, state)` of every status event, in arrival order.
fn triples(events: &[SseEvent]) -> Vec<(String, u64, String)> {
    events.iter().map(SseEvent::status).collect()
}

/// Each transition at most once, per device in seq order starting at 1 without a hole.
fn once_in_seq_order(events: &[SseEvent]) -> BTreeMap<String, Vec<(u64, String)>> {
    let mut per: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for (d, seq, state) in triples(events) {
        per.entry(d).or_default().push((seq, state));
    }
    for (d, h) in &per {
        for (i, (seq, _)) in h.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "{d}: not once in seq order: {h:?}");
        }
    }
    per
}

/// What the broker's subscribers saw, per device.
fn mqtt_histories(statuses: &Collector) -> BTreeMap<String, Vec<(u64, String)>> {
    by_device(&statuses.all())
        .into_iter()
        .map(|(d, msgs)| (d, history(&msgs)))
        .collect()
}

/// 100 devices online then offline (200 transitions) while clients follow: every one
/// arrives once, per device in seq order, equal to the MQTT statuses; a resume after the
/// 100th (header or `after=`) gets exactly the other 100; an unknown id gets `gap` then the
/// oldest kept; the filters pass only their device or group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_once_and_a_resume_gets_exactly_the_rest() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[]).await;
    let addr = app.http();
    let all = SseClient::connect(addr, "/events", &[]).await;
    assert_eq!(all.status(), 200, "the head is sent at once");
    assert!(
        all.headers().contains("text/event-stream"),
        "{}",
        all.headers()
    );
    let one = SseClient::connect(addr, "/events?device=ev-a-007", &[]).await;
    let group = SseClient::connect(addr, "/events?group=ev-b", &[]).await;

    let (a, b) = (ids("ev-a", 50), ids("ev-b", 50));
    for (topic, payload) in in_payload(&a, "ev-a")
        .into_iter()
        .chain(in_payload(&b, "ev-b"))
    {
        devices.publish(&topic, &payload).await;
    }
    all.wait_statuses(200).await;
    let seen = all.statuses();
    let per = once_in_seq_order(&seen);
    assert_eq!(per.len(), 100);
    statuses.wait_for("200 statuses", |s| s.len() >= 200).await;
    assert_eq!(
        per,
        mqtt_histories(&statuses),
        "the stream equals the MQTT statuses"
    );
    for e in &seen {
        assert!(!e.id.is_empty(), "every event has an id");
    }

    // Resume after the 100th, both ways: exactly the other 100.
    let cut = seen[99].id.clone();
    let expected: BTreeSet<_> = triples(&seen[100..]).into_iter().collect();
    let by_header = SseClient::connect(addr, "/events", &[("Last-Event-ID", &cut)]).await;
    let by_query = SseClient::connect(addr, &format!("/events?after={cut}"), &[]).await;
    for resumed in [&by_header, &by_query] {
        resumed.wait_statuses(100).await;
    }
    // One more transition after them: it arrives live, after everything caught up, so once
    // it is there nothing else is on its way.
    // (Its offline follows a TTL later: the 102nd, if it is already there.)
    devices.heartbeat("ev-late", b"").await;
    for resumed in [&by_header, &by_query] {
        resumed.wait_statuses(101).await;
        let got = triples(&resumed.statuses());
        assert!(got.len() <= 102, "{got:?}");
        assert_eq!(got[100], ("ev-late".into(), 1, "online".into()));
        assert!(got[101..].iter().all(|t| t.0 == "ev-late"), "{got:?}");
        assert_eq!(
            got[..100].iter().cloned().collect::<BTreeSet<_>>(),
            expected
        );
        assert!(resumed.of_kind("gap").is_empty());
    }

    // An id that is no place of ours: gap first, then from the oldest kept (all of it).
    let lost = SseClient::connect(addr, "/events", &[("Last-Event-ID", "not-an-id")]).await;
    lost.wait_statuses(201).await;
    let events = lost.events();
    assert_eq!(events[0].event, "gap", "{:?}", events[0]);
    once_in_seq_order(&lost.statuses());

    // Filters, followed live from the start.
    let mine = triples(&one.statuses());
    assert_eq!(
        mine,
        [
            ("ev-a-007".into(), 1, "online".into()),
            ("ev-a-007".into(), 2, "offline".into())
        ]
    );
    group.wait_statuses(100).await;
    assert!(group.statuses().iter().all(|e| e.json()["group"] == "ev-b"));
    assert_eq!(group.statuses().len(), 100);
    check_invariants(&mqtt, addr, &statuses).await;
}

/// With a 1 s retention, an id whose events aged out gets `gap`, then the events kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_the_retention_gets_a_gap() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("http.events_retention", "1s"), ("presence.ttl", "60s")]).await;
    let addr = app.http();
    let live = SseClient::connect(addr, "/events", &[]).await;
    devices.heartbeat("old-1", b"").await;
    live.wait_statuses(1).await;
    let old = live.statuses()[0].id.clone();
    devices.heartbeat("old-2", b"").await;
    live.wait_statuses(2).await;
    // Age is the point here: the first two events must be older than the retention when
    // the client resumes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    devices.heartbeat("new-1", b"").await;
    live.wait_statuses(3).await;

    let resumed = SseClient::connect(addr, "/events", &[("Last-Event-ID", &old)]).await;
    resumed.wait_statuses(2).await;
    devices.heartbeat("new-2", b"").await;
    resumed.wait_statuses(3).await;
    let events = resumed.events();
    assert_eq!(events[0].event, "gap", "{events:?}");
    // Then what is kept after the place (old-2's bucket was not written since, so its
    // event is still kept), never the event the id was of.
    let got: BTreeSet<_> = triples(&resumed.statuses())
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(got, ["old-2", "new-1", "new-2"].map(String::from).into());
    check_invariants(&mqtt, addr, &statuses).await;
}

/// Two replicas sharing the heartbeats: each one's stream carries every transition, the
/// other replica's included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicas_stream_carries_all_transitions() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let shared = [("mqtt.shared_group", "ev")];
    let one = TestApp::spawn(config(&redis, &mqtt, &shared)).await;
    let two = TestApp::spawn(config(&redis, &mqtt, &shared)).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let on_one = SseClient::connect(one.http(), "/events", &[]).await;
    let on_two = SseClient::connect(two.http(), "/events", &[]).await;
    let fleet = ids("two", 60);
    for id in &fleet {
        devices.heartbeat(id, b"").await;
    }
    on_one.wait_statuses(120).await;
    on_two.wait_statuses(120).await;
    statuses.wait_for("120 statuses", |s| s.len() >= 120).await;
    let mqtt_seen = mqtt_histories(&statuses);
    assert_eq!(once_in_seq_order(&on_one.statuses()), mqtt_seen);
    assert_eq!(once_in_seq_order(&on_two.statuses()), mqtt_seen);
    // Both replicas committed some (the broker shares the heartbeats out).
    for app in [&one, &two] {
        let m = scrape(app.http()).await;
        let online = metric(&m, r#"presenced_transitions_total{to="online"}"#).unwrap_or(0.0);
        assert!(
            online > 0.0,
            "a replica committed nothing: the test shows nothing"
        );
    }
    check_invariants(&mqtt, one.http(), &statuses).await;
}

/// A replica commits offline transitions it cannot publish (its broker link black-holed)
/// and is killed: its events are in the log, and another replica's stream has them for a
/// client resuming from before them; that replica publishes them after the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_committed_events_are_on_the_stream() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", mqtt.port).parse().unwrap());
    let url = format!("mqtt://{}", proxy.addr());
    let (mut doomed, doomed_http, _) = spawn_replica_via(&redis, &url, &[]);
    wait_ready(doomed_http).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    let follower = SseClient::connect(doomed_http, "/events", &[]).await;
    let fleet = ids("doomed", 20);
    for id in &fleet {
        devices.heartbeat(id, b"").await;
    }
    statuses.wait_for("20 online", |s| s.len() >= 20).await;
    follower.wait_statuses(20).await;
    let before = follower.statuses()[19].id.clone();
    // The replica still thinks its broker is there: it decides the expiries (1 s TTL) and
    // commits them, but nothing it publishes arrives.
    proxy.set(Mode::Blackhole);
    follower.wait_statuses(40).await;
    kill(&doomed, "-KILL");
    let _ = doomed.wait();
    assert_eq!(
        statuses.count(|s| s.json["state"] == "offline"),
        0,
        "the offline statuses were not published by the killed replica"
    );

    let heir = TestApp::spawn(config(&redis, &mqtt, &[])).await;
    let resumed = SseClient::connect(heir.http(), "/events", &[("Last-Event-ID", &before)]).await;
    resumed.wait_statuses(20).await;
    let got: BTreeSet<_> = triples(&resumed.statuses()).into_iter().collect();
    let expected: BTreeSet<_> = fleet
        .iter()
        .map(|d| (d.clone(), 2, "offline".to_owned()))
        .collect();
    assert_eq!(got, expected);
    // The heir claims what the killed replica left unpublished in the outbox.
    statuses
        .wait_for("the 20 offline statuses, published by the heir", |s| {
            s.iter().filter(|m| m.json["state"] == "offline").count() >= 20
        })
        .await;
    check_invariants(&mqtt, heir.http(), &statuses).await;
}

/// A client that never reads is cut off; a client that reads gets every event, the last
/// within 1 s of its status at the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_cut_off_and_the_others_go_on() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[]).await;
    let addr = app.http();
    let fast = SseClient::connect(addr, "/events", &[]).await;
    let mut slow = stalled_client(addr, "/events").await;
    // 3,000 events of about 450 bytes: well past the slow client's queue and socket buffers.
    let fleet = ids("burst", 1500);
    for id in &fleet {
        devices.heartbeat(id, b"").await;
    }
    fast.wait_statuses(3000).await;
    // The cut-off is by time: a connection that took nothing for 5 s is dropped. Reading
    // before then would rescue the slow client, so the test lets that time pass first.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        closed_by_server(&mut slow).await,
        "the slow client was not cut off"
    );
    devices.heartbeat("after-burst", b"").await;
    statuses
        .wait_for("the last online", |s| {
            s.iter().any(|m| m.json["device"] == "after-burst")
        })
        .await;
    let at_broker = Instant::now();
    eventually("the last event on the fast client", || async {
        fast.statuses()
            .iter()
            .any(|e| e.status().0 == "after-burst")
            .then_some(())
    })
    .await;
    assert!(
        at_broker.elapsed() < Duration::from_secs(1),
        "the fast client got the event {:?} after the broker",
        at_broker.elapsed()
    );
    once_in_seq_order(&fast.statuses());
    check_invariants(&mqtt, addr, &statuses).await;
}

/// With a token, `/events` needs it (header or `access_token`, as a browser's EventSource
/// sends it); the page and the probes stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_needs_the_token_and_the_page_does_not() {
    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses: _statuses,
        devices,
    } = Fleet::start(&[("http.auth_token", "s3cret")]).await;
    let addr = app.http();
    let refused = SseClient::connect(addr, "/events", &[]).await;
    assert_eq!(refused.status(), 401);
    assert!(refused
        .headers()
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    let by_header =
        SseClient::connect(addr, "/events", &[("Authorization", "Bearer s3cret")]).await;
    let by_query = SseClient::connect(addr, "/events?access_token=s3cret", &[]).await;
    devices.heartbeat("guarded", b"").await;
    for c in [&by_header, &by_query] {
        assert_eq!(c.status(), 200);
        c.wait_statuses(1).await;
    }
    for open in ["/", "/healthz"] {
        assert_eq!(get(addr, open).await.unwrap().0, 200, "{open}");
    }
}

/// A place ahead of every stream (a forged id, or one of a log Redis lost) is checked, not
/// trusted: `gap`, then the events kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_from_the_future_gets_a_gap_and_the_events_kept() {
    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses: _statuses,
        devices,
    } = Fleet::start(&[("presence.ttl", "60s")]).await;
    let addr = app.http();
    for id in ["fut-1", "fut-2"] {
        devices.heartbeat(id, b"").await;
    }
    eventually("both online", || async {
        (all_records(addr).await.len() == 2).then_some(())
    })
    .await;
    // Every bucket a day ahead of now.
    let day_ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 86_400_000;
    let future = presenced::event_log::id_at(day_ahead);
    let resumed = SseClient::connect(addr, "/events", &[("Last-Event-ID", &future)]).await;
    resumed.wait_statuses(2).await;
    assert_eq!(resumed.events()[0].event, "gap", "{:?}", resumed.events());
    let got: BTreeSet<_> = triples(&resumed.statuses())
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(got, ["fut-1", "fut-2"].map(String::from).into());
}

/// A bucket's log that loses its entries (here deleted; in life a failover to a replica
/// that had not got them) is told as `gap` to the clients following it, then they go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_entries_is_told_as_a_gap() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("presence.ttl", "60s")]).await;
    let addr = app.http();
    let live = SseClient::connect(addr, "/events", &[]).await;
    // Two devices of one bucket (see presenced::bucket::bucket_of).
    let bucket = presenced::bucket::bucket_of("lost-a");
    let twin = (0..)
        .map(|i| format!("lost-b{i}"))
        .find(|id| presenced::bucket::bucket_of(id) == bucket)
        .unwrap();
    devices.heartbeat("lost-a", b"").await;
    live.wait_statuses(1).await;
    let mut conn = redis.conn().await;
    let () = redis::cmd("DEL")
        .arg(format!("presence:{{{bucket}}}:events"))
        .query_async(&mut conn)
        .await
        .unwrap();
    devices.heartbeat(&twin, b"").await;
    live.wait_statuses(2).await;
    let kinds: Vec<_> = live.events().into_iter().map(|e| e.event).collect();
    assert_eq!(kinds, ["status", "gap", "status"], "{:?}", live.events());
    check_invariants(&mqtt, addr, &statuses).await;
}
