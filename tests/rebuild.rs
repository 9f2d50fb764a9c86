//! Redis is not the only copy: when Redis loses the monitor's data (a restart without
//! persistence, FLUSHALL) or a monitor first meets an empty Redis, the state is rebuilt
//! from the retained statuses on the broker. No seq starts over, no dead device stays
//! online. Every test ends with `check_invariants` over everything a subscriber saw.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::time::Instant;

const TTL: &str = "2s";
const BEAT: Duration = Duration::from_millis(500);
/// The contract: a loss is noticed within 5 s (the rebuild itself follows at once).
const NOTICE: Duration = Duration::from_secs(5);

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

async fn rebuilds(app: &TestApp) -> f64 {
    metric(&scrape(app.http()).await, "presenced_state_rebuilds_total").unwrap_or(-1.0)
}

/// The API record of a device: `(state, seq)`.
async fn record(app: &TestApp, id: &str) -> Option<(String, u64)> {
    let (code, rec) = get_json(app.http(), &format!("/devices/{id}")).await;
    (code == 200).then(|| {
        (
            rec["state"].as_str().unwrap().to_owned(),
            rec["seq"].as_u64().unwrap(),
        )
    })
}

/// Statuses with seq 1 seen after `t`: a seq that started over.
fn restarted_seqs(statuses: &Collector, t: Instant) -> Vec<String> {
    statuses
        .all()
        .into_iter()
        .filter(|s| s.at > t && s.json["seq"] == 1)
        .map(|s| s.json["device"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[derive(Clone, Copy)]
enum Loss {
    /// Killed and started again without persistence.
    Restart,
    /// FLUSHALL on the running server.
    Flush,
}

/// 50 devices online (heartbeating at TTL/4) and 20 offline, then Redis loses everything:
/// the monitor rebuilds within 5 s; online devices stay online with their seq, offline ones
/// stay offline; then 20 of the online ones stop and go offline with seq 2, exactly once.
async fn loss_scenario(loss: Loss) {
    let mut redis = RedisServer::start_with(&["--save", "", "--appendonly", "no"]);
    let mqtt = Mosquitto::start();
    let app = TestApp::spawn(config(&redis, &mqtt, &[("presence.ttl", TTL)])).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    let stay = ids("stay", 30);
    let stop = ids("stop", 20);
    let quiet = ids("quiet", 20);
    let stay_beat = keep_beating(devices.clone(), stay.clone(), BEAT);
    let stop_beat = keep_beating(devices.clone(), stop.clone(), BEAT);
    for id in &quiet {
        devices.heartbeat(id, b"").await;
    }
    wait_online_then_offline(&statuses, &quiet).await;
    statuses
        .wait_for("70 devices seen", |s| s.len() >= 90)
        .await;
    let before = rebuilds(&app).await;

    let lost_at = Instant::now();
    match loss {
        Loss::Restart => redis.restart(),
        Loss::Flush => {
            let () = redis::cmd("FLUSHALL")
                .query_async(&mut redis.conn().await)
                .await
                .unwrap();
        }
    }
    // Every device gets its state and seq back.
    eventually(
        "every device's state and seq back after the loss",
        || async {
            for id in stay.iter().chain(&stop) {
                if record(&app, id).await != Some(("online".into(), 1)) {
                    return None;
                }
            }
            for id in &quiet {
                if record(&app, id).await != Some(("offline".into(), 2)) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let took = lost_at.elapsed();
    eprintln!("every record back {took:?} after the loss");
    assert_eq!(
        restarted_seqs(&statuses, lost_at),
        Vec::<String>::new(),
        "seq started over"
    );
    assert!(rebuilds(&app).await > before, "the rebuild is counted");
    assert!(took < NOTICE, "rebuilt only {took:?} after the loss");

    // The devices that stop now go offline once, with the next seq.
    stop_beat.cancel();
    wait_online_then_offline(&statuses, &stop).await;
    assert_eq!(
        restarted_seqs(&statuses, lost_at),
        Vec::<String>::new(),
        "seq started over"
    );
    for id in &stay {
        assert_eq!(
            history(&statuses.device(id)),
            vec![(1, "online".into())],
            "{id}"
        );
    }
    for id in &quiet {
        assert_eq!(
            history(&statuses.device(id)),
            vec![(1, "online".into()), (2, "offline".into())],
            "{id}"
        );
    }
    // Still beating: the stayers' state does not change under check_invariants.
    check_invariants(&mqtt, app.http(), &statuses).await;
    stay_beat.cancel();
    app.stop().await.unwrap();
}

/// Redis restarted without persistence (its data gone) while the fleet runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_without_persistence_is_rebuilt_from_retained_statuses() {
    loss_scenario(Loss::Restart).await;
}

/// FLUSHALL while the fleet runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_is_rebuilt_from_retained_statuses() {
    loss_scenario(Loss::Flush).await;
}

/// A heartbeat that arrives after the loss and before the rebuild does not start a seq
/// over: an offline device comes back with the next seq, an online one publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_between_loss_and_rebuild_keeps_the_seq() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices: _devices,
    } = Fleet::start(&[("presence.ttl", TTL)]).await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    let gone = ids("gone", 5);
    let live = ids("live", 5);
    for id in &gone {
        devices.heartbeat(id, b"").await;
    }
    wait_online_then_offline(&statuses, &gone).await;
    let beat = keep_beating(devices.clone(), live.clone(), BEAT);
    statuses
        .wait_for("live devices online", |s| s.len() >= 15)
        .await;

    let lost_at = Instant::now();
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    // At once: these reach the monitor before it can have noticed the loss.
    for id in &gone {
        devices.heartbeat(id, b"").await;
    }
    eventually("the offline devices back online", || async {
        gone.iter()
            .all(|id| history(&statuses.device(id)).len() == 3)
            .then_some(())
    })
    .await;
    for id in &gone {
        assert_eq!(
            history(&statuses.device(id)),
            vec![
                (1, "online".into()),
                (2, "offline".into()),
                (3, "online".into())
            ],
            "{id}"
        );
        // The first status after the loss is the next seq.
        let next = statuses
            .all()
            .into_iter()
            .find(|s| s.at > lost_at && s.json["device"] == id.as_str())
            .unwrap();
        assert_eq!(next.json["seq"], 3, "{id}: {:?}", next.json);
    }
    assert_eq!(
        restarted_seqs(&statuses, lost_at),
        Vec::<String>::new(),
        "seq started over"
    );
    for id in &live {
        assert_eq!(
            history(&statuses.device(id)),
            vec![(1, "online".into())],
            "{id}"
        );
    }
    // The returned devices stop again: offline once more, seq 4.
    eventually("the returned devices offline again", || async {
        gone.iter()
            .all(|id| history(&statuses.device(id)).len() == 4)
            .then_some(())
    })
    .await;
    check_invariants(&mqtt, app.http(), &statuses).await;
    beat.cancel();
    app.stop().await.unwrap();
}

/// A monitor stops; its Redis is flushed while it is stopped; the next monitor meets an
/// empty Redis and imports the retained statuses its predecessor left on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_on_an_empty_redis_imports_the_retained_statuses() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let cfg = config(&redis, &mqtt, &[("presence.ttl", TTL)]);
    let first = TestApp::spawn(cfg.clone()).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    let live = ids("live", 10);
    let gone = ids("gone", 10);
    for id in &gone {
        devices.heartbeat(id, b"").await;
    }
    wait_online_then_offline(&statuses, &gone).await;
    let beat = keep_beating(devices.clone(), live.clone(), BEAT);
    statuses.wait_for("all seen", |s| s.len() >= 30).await;
    first.stop().await.unwrap();

    let () = redis::cmd("FLUSHALL")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let flushed_at = Instant::now();
    let second = TestApp::spawn(cfg).await;
    eventually("the import", || async {
        (rebuilds(&second).await >= 1.0).then_some(())
    })
    .await;
    for id in &live {
        eventually("a live device's record", || async {
            (record(&second, id).await == Some(("online".into(), 1))).then_some(())
        })
        .await;
    }
    for id in &gone {
        assert_eq!(
            record(&second, id).await,
            Some(("offline".into(), 2)),
            "{id}"
        );
    }
    assert_eq!(
        restarted_seqs(&statuses, flushed_at),
        Vec::<String>::new(),
        "seq started over"
    );
    // Still beating, so nothing changes under the check; then the live ones stop.
    check_invariants(&mqtt, second.http(), &statuses).await;
    beat.cancel();
    wait_online_then_offline(&statuses, &live).await;
    check_invariants(&mqtt, second.http(), &statuses).await;
    second.stop().await.unwrap();
}

/// The rebuild gives an online device its class's TTL (`presence.ttl_rules`, with its
/// stored group), not `presence.ttl`: a battery sensor online at the loss keeps its 12 h.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rebuild_gives_online_devices_their_class_ttl() {
    let Fleet {
        redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[
        ("presence.ttl", "30s"),
        ("presence.ttl_rules", "bat-*=12h,group:lab=1h"),
    ])
    .await;
    for (id, payload) in [
        ("bat-1", &b""[..]),
        ("s-1", br#"{"group":"lab"}"#),
        ("s-2", b""),
    ] {
        devices.heartbeat(id, payload).await;
    }
    statuses.wait_for("3 online", |s| s.len() >= 3).await;
    let before = rebuilds(&app).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let flushed = presenced::device::now_ms();
    let deadline = |id: &'static str| {
        let redis = &redis;
        async move {
            let b = presenced::bucket::bucket_of(id);
            let d: Option<u64> = redis::cmd("ZSCORE")
                .arg(format!("presence:{{{b}}}:deadline"))
                .arg(id)
                .query_async(&mut redis.conn().await)
                .await
                .ok()?;
            d
        }
    };
    let after = eventually("the three devices rebuilt online", || async {
        let (a, b, c) = (
            deadline("bat-1").await?,
            deadline("s-1").await?,
            deadline("s-2").await?,
        );
        (rebuilds(&app).await > before).then_some((a, b, c))
    })
    .await;
    // One TTL from the rebuild (which follows the flush within the contract's 5 s).
    let within = |d: u64, ttl: u64| d >= flushed + ttl && d <= flushed + ttl + 10_000;
    assert!(within(after.0, 12 * 3_600_000), "bat-1: {after:?}");
    assert!(within(after.1, 3_600_000), "s-1: {after:?}");
    assert!(within(after.2, 30_000), "s-2: {after:?}");
    check_invariants(&mqtt, app.http(), &statuses).await;
}
