//! Groups and group outages, against real Redis and mosquitto: counts per group (API,
//! metrics and Redis agree, moves included), outages opened and closed exactly once, the
//! thresholds, the metric series bound, and a dead replica's staged outage published.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::outage::{distinct, group_statuses, ids, in_payload, one_outage_opened_and_closed};
use support::*;

const BEAT: Duration = Duration::from_millis(300);

/// A [`Fleet`] whose group statuses are collected too, with its API address and a
/// publisher the heartbeat loops share.
struct Watched {
    redis: RedisServer,
    mqtt: Mosquitto,
    app: TestApp,
    api: std::net::SocketAddr,
    statuses: Collector,
    devices: Arc<Devices>,
    outages: Collector,
}

impl Watched {
    async fn start(extra: &[(&str, &str)]) -> Watched {
        let Fleet {
            redis,
            mqtt,
            app,
            statuses,
            devices,
        } = Fleet::start(extra).await;
        let outages = Collector::start(&mqtt, "groups/+/status").await;
        Watched {
            api: app.http(),
            redis,
            mqtt,
            app,
            statuses,
            devices: Arc::new(devices),
            outages,
        }
    }
}

/// A group's counts as Redis holds them: the sum of every bucket's fields.
async fn redis_counts(redis: &RedisServer, group: &str) -> (i64, i64) {
    let mut conn = redis.conn().await;
    let (mut online, mut offline) = (0, 0);
    for b in 0..64 {
        let (on, off): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(format!("presence:{{{b}}}:groups"))
            .arg(format!("1|{group}"))
            .arg(format!("0|{group}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        online += on.unwrap_or(0);
        offline += off.unwrap_or(0);
    }
    (online, offline)
}

/// Every group record, following the cursor.
async fn all_groups(api: std::net::SocketAddr) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut path = "/groups?limit=2".to_owned();
    loop {
        let (code, page) = get_json(api, &path).await;
        assert_eq!(code, 200, "{page}");
        let groups = page["groups"].as_array().unwrap();
        assert!(groups.len() <= 2);
        for g in groups {
            let name = g["group"].as_str().unwrap().to_owned();
            assert!(
                out.insert(name, g.clone()).is_none(),
                "a group listed twice"
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/groups?limit=2&cursor={c}"),
            None => return out,
        }
    }
}

/// The counts of one group as the API, the metrics and Redis tell them, once they agree
/// with `expected` (online, offline).
async fn counts_agree(app: &TestApp, redis: &RedisServer, group: &str, expected: (i64, i64)) {
    let api = app.http();
    eventually(&format!("{group} counts {expected:?}"), || async {
        let (code, rec) = get_json(api, &format!("/groups/{group}")).await;
        let api_counts = (rec["online"].as_i64()?, rec["offline"].as_i64()?);
        let m = scrape(api).await;
        let series = |state: &str| {
            metric(
                &m,
                &format!("presenced_group_devices{{group=\"{group}\",state=\"{state}\"}}"),
            )
            .map(|v| v as i64)
        };
        let metric_counts = (series("online")?, series("offline")?);
        let redis_counts = redis_counts(redis, group).await;
        (code == 200
            && api_counts == expected
            && metric_counts == expected
            && redis_counts == expected
            && rec["devices"].as_i64()? == expected.0 + expected.1)
            .then_some(())
    })
    .await;
}

/// 3 groups × 200 devices, the group named in the payload: per-group counts agree in
/// `/groups`, the metrics and Redis; `/devices?group=` lists a group's devices; a device
/// that names another group moves in the counts; once silent they count as offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_per_group_agree_and_follow_moves() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[]).await;
    let devices = Arc::new(devices);
    let api = app.http();
    let groups = ["g1", "g2", "g3"];
    let mut beats = Vec::new();
    for g in groups {
        beats.extend(in_payload(&ids(g, 200), g));
    }
    let beating = keep_publishing(devices.clone(), beats, BEAT);
    for g in groups {
        counts_agree(&app, &redis, g, (200, 0)).await;
    }
    let listed = all_groups(api).await;
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        groups.iter().collect::<Vec<_>>()
    );
    assert_eq!(listed["g2"]["state"], "ok");
    assert_eq!(listed["g2"]["seq"], 0);
    assert_eq!(listed["g2"]["since"], Value::Null);
    let (_, page) = get_json(api, "/devices?group=g2&limit=1000").await;
    let members = page["devices"].as_array().unwrap();
    assert_eq!(members.len(), 200);
    assert!(members.iter().all(|d| d["group"] == "g2"));
    let (_, unknown) = get_json(api, "/devices?group=nope").await;
    assert_eq!(unknown["devices"].as_array().unwrap().len(), 0);
    assert_eq!(get_json(api, "/groups/nope").await.0, 404);
    // Every status carries the group.
    let (_, one) = get_json(api, "/devices/g3-007").await;
    assert_eq!(one["group"], "g3");

    // Ten devices of g1 name g2 from now on: they move, online.
    beating.cancel();
    let movers: Vec<String> = ids("g1", 10);
    let mut beats = in_payload(&movers, "g2");
    beats.extend(in_payload(&ids("g1", 200)[10..], "g1"));
    beats.extend(in_payload(&ids("g2", 200), "g2"));
    beats.extend(in_payload(&ids("g3", 200), "g3"));
    let beating = keep_publishing(devices.clone(), beats, BEAT);
    counts_agree(&app, &redis, "g1", (190, 0)).await;
    counts_agree(&app, &redis, "g2", (210, 0)).await;
    let (_, moved) = get_json(api, "/devices/g1-003").await;
    assert_eq!(moved["group"], "g2");

    // Silence: every device goes offline, in its group (all of them at once: each group
    // is in an outage).
    beating.cancel();
    counts_agree(&app, &redis, "g1", (0, 190)).await;
    counts_agree(&app, &redis, "g2", (0, 210)).await;
    counts_agree(&app, &redis, "g3", (0, 200)).await;
    eventually("three groups in outage", || async {
        let m = scrape(api).await;
        (metric(&m, "presenced_groups{state=\"ok\"}")? == 0.0
            && metric(&m, "presenced_groups{state=\"outage\"}")? == 3.0)
            .then_some(())
    })
    .await;
    check_invariants(&mqtt, api, &statuses).await;
}

/// The group as a `{group}` level of the heartbeat topic; an invalid group level is a
/// heartbeat all the same (the name ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_can_be_a_topic_level() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("mqtt.heartbeat_topic", "sites/{group}/{device}/hb")]).await;
    let devices = Arc::new(devices);
    let mut beats = Vec::new();
    for g in ["north", "south"] {
        beats.extend(
            ids(g, 50)
                .into_iter()
                .map(|id| (format!("sites/{g}/{id}/hb"), Vec::new())),
        );
    }
    // A group name too long for the contract: the device counts, without a group.
    let long = "x".repeat(65);
    beats.push((format!("sites/{long}/stray/hb"), Vec::new()));
    let beating = keep_publishing(devices.clone(), beats, BEAT);
    counts_agree(&app, &redis, "north", (50, 0)).await;
    counts_agree(&app, &redis, "south", (50, 0)).await;
    let (code, stray) = get_json(app.http(), "/devices/stray").await;
    assert_eq!(code, 200);
    assert!(stray.get("group").is_none(), "{stray}");
    assert_eq!(all_groups(app.http()).await.len(), 2);
    beating.cancel();
    counts_agree(&app, &redis, "north", (0, 50)).await;
    check_invariants(&mqtt, app.http(), &statuses).await;
}

/// In a group of 100, 60 going silent at once open exactly one outage; 55 of them back
/// close it exactly once; the other group is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_and_closes_exactly_once() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices: _devices,
    } = Fleet::start(&[]).await;
    let _beating = one_outage_opened_and_closed(&mqtt, app.http(), &statuses).await;
    assert_eq!(
        metric(&scrape(app.http()).await, "presenced_group_outages_total"),
        Some(1.0)
    );
    check_invariants(&mqtt, app.http(), &statuses).await;
}

/// The same with two replicas sharing the heartbeats: still one opening and one closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_open_and_close_an_outage_once() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let shared = ["--mqtt-shared-group", "presenced", "--presence-ttl", "1s"];
    let (_a, api_a, _) = spawn_replica(&redis, &mqtt, &shared);
    let (_b, api_b, _) = spawn_replica(&redis, &mqtt, &shared);
    wait_ready(api_a).await;
    wait_ready(api_b).await;
    let _beating = one_outage_opened_and_closed(&mqtt, api_a, &statuses).await;
    let opened = metric(&scrape(api_a).await, "presenced_group_outages_total").unwrap()
        + metric(&scrape(api_b).await, "presenced_group_outages_total").unwrap();
    assert_eq!(opened, 1.0, "outages opened, summed over the replicas");
    check_invariants(&mqtt, api_b, &statuses).await;
}

/// Below the thresholds no outage opens: 9 of 100 offline (fewer than the minimum of 10),
/// 9 of 10 (above the fraction, below the minimum alone), or 40 of 100 (less than the
/// fraction 0.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_thresholds_no_outage_opens() {
    let Watched {
        redis: _redis,
        mqtt,
        app,
        api,
        statuses,
        devices,
        outages,
    } = Watched::start(&[("presence.ttl_rules", "tiny-009=30s")]).await;
    // (tiny's one steady device cannot lapse: 10 of 10 offline would be an outage.)
    let (few, many, tiny) = (ids("few", 100), ids("many", 100), ids("tiny", 10));
    let mut steady = in_payload(&few[9..], "few");
    steady.extend(in_payload(&many[40..], "many"));
    steady.extend(in_payload(&tiny[9..], "tiny"));
    let mut going = in_payload(&few[..9], "few");
    going.extend(in_payload(&many[..40], "many"));
    going.extend(in_payload(&tiny[..9], "tiny"));
    let beating_steady = keep_publishing(devices.clone(), steady, BEAT);
    let beating_going = keep_publishing(devices.clone(), going, BEAT);
    eventually("all online", || async {
        let (_, a) = get_json(api, "/groups/few").await;
        let (_, b) = get_json(api, "/groups/many").await;
        let (_, c) = get_json(api, "/groups/tiny").await;
        (a["online"] == 100 && b["online"] == 100 && c["online"] == 10).then_some(())
    })
    .await;
    beating_going.cancel();
    eventually("9, 40 and 9 offline", || async {
        let (_, a) = get_json(api, "/groups/few").await;
        let (_, b) = get_json(api, "/groups/many").await;
        let (_, c) = get_json(api, "/groups/tiny").await;
        (a["offline"] == 9 && b["offline"] == 40 && c["offline"] == 9).then_some(())
    })
    .await;
    // Every offline is noted once its status is acknowledged: wait for the notes of them
    // all (the outbox empty), then no outage status may have been staged or published.
    outbox_drained(&app).await;
    assert!(outages.all().is_empty(), "{:?}", outages.all());
    for g in ["few", "many", "tiny"] {
        let (_, rec) = get_json(api, &format!("/groups/{g}")).await;
        assert_eq!(rec["state"], "ok");
        assert_eq!(rec["seq"], 0);
    }
    check_invariants(&mqtt, api, &statuses).await;
    beating_steady.cancel();
}

/// Every outbox of the monitor's Redis is empty: every status published and acknowledged
/// (and so noted in its group).
async fn outbox_drained(app: &TestApp) {
    let url = app.cfg.redis.url.0.clone();
    eventually("outbox drained", || {
        let url = url.clone();
        async move {
            let client = redis::Client::open(url).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let mut n = 0;
            for b in 0..64 {
                let c: i64 = redis::cmd("ZCARD")
                    .arg(format!("presence:{{{b}}}:outbox"))
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                n += c;
            }
            (n == 0).then_some(())
        }
    })
    .await;
}

/// A slow decline is no outage: 25 of 40 devices going offline one every 500 ms, with a
/// window of 2 s (at most about 5 in any window, fewer than the minimum of 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_decline_is_no_outage() {
    let Watched {
        redis: _redis,
        mqtt,
        app,
        api,
        statuses,
        devices,
        outages,
    } = Watched::start(&[("groups.outage_window", "2s")]).await;
    let all = ids("slow", 40);
    let mut beating: Vec<_> = all
        .iter()
        .map(|id| {
            keep_publishing(
                devices.clone(),
                in_payload(std::slice::from_ref(id), "slow"),
                BEAT,
            )
        })
        .collect();
    eventually("all online", || async {
        let (_, g) = get_json(api, "/groups/slow").await;
        (g["online"] == 40).then_some(())
    })
    .await;
    for token in beating.drain(..25) {
        token.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eventually("25 offline", || async {
        let (_, g) = get_json(api, "/groups/slow").await;
        (g["offline"] == 25).then_some(())
    })
    .await;
    outbox_drained(&app).await;
    assert!(outages.all().is_empty(), "{:?}", outages.all());
    check_invariants(&mqtt, api, &statuses).await;
    for token in beating {
        token.cancel();
    }
}

/// With `groups.max_series = 5` and 20 groups: 5 groups have series of their own, the rest
/// are summed under `_other`, and the sums equal the fleet counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_series_are_bounded() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("groups.max_series", "5")]).await;
    let api = app.http();
    let devices = Arc::new(devices);
    let mut beats = Vec::new();
    for k in 0..20 {
        let g = format!("c{k:02}");
        beats.extend(in_payload(&ids(&g, 3), &g));
    }
    let beating = keep_publishing(devices.clone(), beats, BEAT);
    eventually("60 devices in 20 groups, 5 with series", || async {
        let m = scrape(api).await;
        let lines: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("presenced_group_devices{"))
            .collect();
        let groups: std::collections::BTreeSet<&str> = lines
            .iter()
            .filter_map(|l| l.split("group=\"").nth(1)?.split('"').next())
            .collect();
        let online: f64 = lines
            .iter()
            .filter(|l| l.contains("state=\"online\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let fleet = metric(&m, "presenced_devices{state=\"online\"}")?;
        (groups.len() == 6 && groups.contains("_other") && online == 60.0 && fleet == 60.0)
            .then_some(())
    })
    .await;
    check_invariants(&mqtt, api, &statuses).await;
    beating.cancel();
}

/// A replica that died between opening an outage in Redis and publishing it left the
/// opening staged in the outbox (as note.lua writes it, in one step with the group's
/// state): the next monitor publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_a_dead_replica_staged_is_published() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let outages = Collector::start(&mqtt, "groups/+/status").await;
    // The Redis state a replica leaves when it dies right after note.lua opened the outage
    // of "lab" (its name's bucket: FNV-1a("lab") mod 64), before its publish: the group's
    // state and the staged status, its lease long over.
    let b = presenced::bucket::bucket_of("lab");
    let member = "o3|lab|1|1|1700000000000|1700000000400|20|5|15|15|0";
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("presence:{{{b}}}:gstate"))
        .arg("lab")
        .arg(format!("1699999940000|15|0|{member}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(format!("presence:{{{b}}}:outbox"))
        .arg(1)
        .arg(member)
        .query_async(&mut conn)
        .await
        .unwrap();
    let app = TestApp::spawn(config(&redis, &mqtt, &[])).await;
    outages
        .wait_for("the staged outage published", |s| !s.is_empty())
        .await;
    let seen = group_statuses(&outages, "lab");
    assert_eq!(seen[0]["state"], "outage");
    assert_eq!(seen[0]["seq"], 1);
    assert_eq!(seen[0]["affected"], 15);
    assert_eq!(seen[0]["since"], "2023-11-14T22:13:20.000Z");
    // Acknowledged: gone from the outbox. (No device of "lab" exists here, so the API
    // does not list the group.)
    outbox_drained(&app).await;
    assert_eq!(get_json(app.http(), "/groups/lab").await.0, 404);
}

/// A Redis for note.lua itself, called as the monitor calls it (common.lua first), with keys
/// `t:gstate`, `t:outbox`, `t:epoch` (present: the bucket's state is in Redis) and `t:events`
/// (its event log), and the event log rule after the mode.
async fn note_script() -> (
    RedisServer,
    redis::aio::MultiplexedConnection,
    redis::Script,
) {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let () = redis::cmd("SET")
        .arg("t:epoch")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let script = redis::Script::new(&format!(
        "{}\n{}",
        include_str!("../src/lua/common.lua"),
        include_str!("../src/lua/note.lua")
    ));
    (redis, conn, script)
}

/// note.lua itself, on a real Redis: a burst noted out of order (the latest `since` first,
/// as two replicas and many buckets deliver it) opens one outage, and its affected figure
/// counts every device of the burst, those noted after the crossing with an earlier `since`
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_noted_out_of_order_counts_every_device() {
    let (_redis, mut conn, script) = note_script().await;
    let t0: u64 = 1_800_000_000_000;
    let note = |ids: std::ops::Range<u64>| {
        let mut inv = script.prepare_invoke();
        inv.key("t:gstate")
            .key("t:outbox")
            .key("t:epoch")
            .key("t:events");
        inv.arg("t:g:")
            .arg(30_000)
            .arg(50)
            .arg(0.5)
            .arg(60_000)
            .arg(0.9)
            .arg("decide")
            .arg("3600000|4096");
        // Reversed: the device that went offline last is noted first.
        for i in ids.rev() {
            inv.arg("site").arg(100).arg(40).arg(60);
            inv.arg(format!("d-{i:03}"))
                .arg(2)
                .arg("0")
                .arg(t0 + i * 10);
        }
        inv
    };
    // One call with the first 60 of 61 (an opening is told as of the end of its call), then
    // the earliest one alone: affected follows it too.
    let staged: Vec<String> = note(1..61).invoke_async(&mut conn).await.unwrap();
    assert_eq!(staged.len(), 1, "one opening: {staged:?}");
    let fields: Vec<&str> = staged[0].split('|').collect();
    assert_eq!(&fields[..4], ["o4", "site", "1", "1"], "{staged:?}");
    assert_eq!(fields[9], "60", "affected at opening: {staged:?}");
    let staged: Vec<String> = note(0..1).invoke_async(&mut conn).await.unwrap();
    assert!(staged.is_empty(), "no second opening: {staged:?}");
    let state: String = redis::cmd("HGET")
        .arg("t:gstate")
        .arg("site")
        .query_async(&mut conn)
        .await
        .unwrap();
    let affected = state.split('|').nth(1).unwrap();
    assert_eq!(affected, "61", "live affected figure: {state}");
}

/// Opens an outage of `group`: its 20 devices (beating with `beats`) go silent at once.
async fn open_outage(
    api: std::net::SocketAddr,
    outages: &Collector,
    group: &str,
    beats: tokio_util::sync::CancellationToken,
) {
    eventually("all online", || async {
        let (_, g) = get_json(api, &format!("/groups/{group}")).await;
        (g["online"] == 20).then_some(())
    })
    .await;
    beats.cancel();
    outages
        .wait_for("the outage opens", |s| {
            s.iter()
                .any(|m| m.json["group"] == group && m.json["state"] == "outage")
        })
        .await;
    // Every one of them noted in the outage (the live figure), before any comes back.
    eventually("all 20 affected", || async {
        let (_, g) = get_json(api, &format!("/groups/{group}")).await;
        (g["affected"] == 20).then_some(())
    })
    .await;
}

/// Waits for `group`'s outage to close; its latest status (by seq).
async fn closing(outages: &Collector, group: &str) -> Value {
    outages
        .wait_for("the outage closes", |s| {
            s.iter()
                .any(|m| m.json["group"] == group && m.json["state"] == "ok")
        })
        .await;
    distinct(group_statuses(outages, group)).pop().unwrap()
}

/// Devices that come back through another gateway (their heartbeats name another group)
/// are back as far as the outage of the group they left is concerned: it closes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_closes_when_its_devices_come_back_in_another_group() {
    let Watched {
        redis: _redis,
        mqtt,
        app: _app,
        api,
        statuses,
        devices,
        outages,
    } = Watched::start(&[]).await;
    let gw = ids("dev", 20);
    let beats = keep_publishing(devices.clone(), in_payload(&gw, "gw-a"), BEAT);
    open_outage(api, &outages, "gw-a", beats).await;
    // 19 of 20 (0.9 x 20 = 18) come back through gw-b.
    let back = keep_publishing(devices.clone(), in_payload(&gw[..19], "gw-b"), BEAT);
    let last = closing(&outages, "gw-a").await;
    assert_eq!(
        (last["seq"].as_u64(), last["affected"].as_i64()),
        (Some(2), Some(20)),
        "{last}"
    );
    assert!(last["recovered"].as_i64().unwrap() >= 18, "{last}");
    eventually("19 online in gw-b", || async {
        let (_, g) = get_json(api, "/groups/gw-b").await;
        (g["online"] == 19).then_some(())
    })
    .await;
    assert!(group_statuses(&outages, "gw-b").is_empty());
    check_invariants(&mqtt, api, &statuses).await;
    back.cancel();
}

/// An outage whose devices are all forgotten (decommissioned, never back) closes: it would
/// otherwise stay open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_closes_when_its_devices_are_forgotten() {
    let Watched {
        redis: _redis,
        mqtt: _mqtt,
        app: _app,
        api,
        statuses,
        devices,
        outages,
    } = Watched::start(&[("presence.forget_after", "5s")]).await;
    let gone = ids("gone", 20);
    let beats = keep_publishing(devices.clone(), in_payload(&gone, "gw-c"), BEAT);
    open_outage(api, &outages, "gw-c", beats).await;
    let last = closing(&outages, "gw-c").await;
    assert_eq!(
        (last["seq"].as_u64(), last["affected"].as_i64()),
        (Some(2), Some(0)),
        "{last}"
    );
    // A group without devices is no group; each device's statuses alternate from online
    // with seq +1, ending offline, and it was forgotten (the invariant check proper needs
    // records, which forgotten devices lack).
    let (status, _) = get_json(api, "/groups/gw-c").await;
    assert_eq!(status, 404);
    let seen = by_device(&statuses.all());
    for id in &gone {
        let h = history(&seen[id.as_str()]);
        for (i, (seq, state)) in h.iter().enumerate() {
            let expected = if i % 2 == 0 { "online" } else { "offline" };
            assert_eq!(
                (*seq, state.as_str()),
                (i as u64 + 1, expected),
                "{id}: {h:?}"
            );
        }
        assert_eq!(h.len() % 2, 0, "{id} ends offline: {h:?}");
        let (status, _) = get_json(api, &format!("/devices/{id}")).await;
        assert_eq!(status, 404, "{id} forgotten");
    }
}

/// note.lua's fences: a forgotten device's note, and a device's return in another group,
/// keep late copies of its older notes (a claim that published them twice) from putting it
/// back among the group's offline devices, while a new life (after forgetting, seq from 1)
/// is noted; and a late clear of an earlier life changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_copies_of_notes_change_nothing() {
    let (_redis, mut conn, script) = note_script().await;
    let mut note = async |id: &str, seq: u64, state: &str, since: u64| {
        let mut inv = script.prepare_invoke();
        inv.key("t:gstate")
            .key("t:outbox")
            .key("t:epoch")
            .key("t:events");
        inv.arg("t:g:")
            .arg(30_000)
            .arg(50)
            .arg(0.5)
            .arg(60_000)
            .arg(0.9)
            .arg("decide")
            .arg("3600000|4096");
        inv.arg("site").arg(100).arg(99).arg(1);
        inv.arg(id).arg(seq).arg(state).arg(since);
        let staged: Vec<String> = inv.invoke_async(&mut conn).await.unwrap();
        assert!(staged.is_empty(), "{staged:?}");
        let off: Vec<String> = redis::cmd("ZRANGE")
            .arg("t:g:off:site")
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        off
    };
    assert_eq!(note("d-1", 2, "0", 1_000).await, ["d-1"]);
    assert!(note("d-1", 0, "x", 1_000).await.is_empty(), "forgotten");
    assert!(note("d-1", 2, "0", 1_000).await.is_empty(), "a late copy");
    assert!(note("d-1", 1, "1", 5_000).await.is_empty(), "a new life");
    assert!(
        note("d-1", 2, "0", 1_000).await.is_empty(),
        "a late copy from the earlier life, past the fence"
    );
    assert_eq!(note("d-1", 2, "0", 9_000).await, ["d-1"], "its offline");
    assert_eq!(note("d-1", 0, "x", 1_000).await, ["d-1"], "an old clear");
    // Back online in another group; a late copy of its offline here.
    assert_eq!(note("d-2", 4, "0", 2_000).await, ["d-2", "d-1"], "by since");
    assert_eq!(note("d-2", 5, "m", 3_000).await, ["d-1"], "moved away");
    assert_eq!(note("d-2", 4, "0", 2_000).await, ["d-1"], "a late copy");
}

/// Redis loses its data (FLUSHALL) during an outage: the rebuild brings the group back from
/// its retained status (still in outage, seq 1, its devices affected), and the outage closes
/// once with seq 2: no group's seq starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_survives_redis_losing_its_data() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[]).await;
    let api = app.http();
    let devices = Arc::new(devices);
    let outages = Collector::start(&mqtt, "groups/+/status").await;
    let site = ids("lost", 20);
    let beats = keep_publishing(devices.clone(), in_payload(&site, "gw-r"), BEAT);
    open_outage(api, &outages, "gw-r", beats).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    eventually("the outage rebuilt with its devices", || async {
        let (_, g) = get_json(api, "/groups/gw-r").await;
        (g["state"] == "outage" && g["seq"] == 1 && g["offline"] == 20 && g["affected"] == 20)
            .then_some(())
    })
    .await;
    let back = keep_publishing(devices.clone(), in_payload(&site[..19], "gw-r"), BEAT);
    outages
        .wait_for("the outage closes", |s| {
            s.iter().any(|m| m.json["state"] == "ok")
        })
        .await;
    // Delivery is at least once: a status may come twice, but as the same decision (its
    // detected_at); the rebuild decides nothing again (whatever it staged is published by
    // the time the outbox is empty).
    outbox_drained(&app).await;
    let seen: std::collections::BTreeSet<(u64, String, String)> = group_statuses(&outages, "gw-r")
        .iter()
        .map(|s| {
            let f = |k: &str| s[k].as_str().unwrap().to_owned();
            (s["seq"].as_u64().unwrap(), f("state"), f("detected_at"))
        })
        .collect();
    let decisions: Vec<(u64, &str)> = seen.iter().map(|(q, s, _)| (*q, s.as_str())).collect();
    assert_eq!(decisions, [(1, "outage"), (2, "ok")], "{seen:?}");
    check_invariants(&mqtt, api, &statuses).await;
    back.cancel();
}

/// The broker restarts without persistence during an outage: its retained group status is
/// gone, and the monitor's republish job publishes it again (as it does every device's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_state_gets_the_group_statuses_again() {
    let Watched {
        redis: _redis,
        mut mqtt,
        app: _app,
        api,
        statuses: _statuses,
        devices,
        outages,
    } = Watched::start(&[]).await;
    let site = ids("amnesia", 20);
    let beats = keep_publishing(devices.clone(), in_payload(&site, "gw-m"), BEAT);
    open_outage(api, &outages, "gw-m", beats).await;
    mqtt.restart();
    let mqtt = &mqtt;
    let retained = eventually("the outage retained again", || async move {
        let late = Collector::start(mqtt, "groups/+/status").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        late.all().into_iter().find(|m| m.retain)
    })
    .await;
    assert_eq!(
        (
            retained.json["group"].as_str(),
            retained.json["state"].as_str(),
            retained.json["seq"].as_u64()
        ),
        (Some("gw-m"), Some("outage"), Some(1)),
        "{}",
        retained.json
    );
}
