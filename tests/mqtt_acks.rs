//! PUBACK tracking across connection resets: the monitor's broker connection goes through a
//! [`FaultProxy`] that drops it every 1–2 s while 200 devices flap (TTL 1 s, silent ~1.5 s
//! between heartbeats). Once quiet, every device's retained status, its HTTP record and its
//! Redis record must agree on seq and state: an acknowledgement attributed to the wrong
//! status would leave a committed seq unpublished (or published but not retained).
//!
//! Four runs: MQTT 3.1.1 and 5, each with a persistent session (fixed client id) and with a
//! clean session (`mqtt.shared_group`), where the client drops whatever it held at every
//! reconnection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::proxy::{FaultProxy, Mode};
use support::*;
use tokio::time::Instant;

const DEVICES: usize = 200;
/// How long devices flap; each stops at a random moment in the last third.
const FLAP: Duration = Duration::from_secs(20);
/// Resets go on this long after the last heartbeat, so that the last transitions are
/// published while connections are still being reset.
const RESETS_AFTER: Duration = Duration::from_secs(3);
/// Every 4th device ends online (a last heartbeat with a long TTL), the others offline.
const LONG_TTL: &[u8] = br#"{"ttl_s": 600}"#;

fn rand_ms(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(fastrand::u64(lo..hi))
}

fn ends_online(i: usize) -> bool {
    i.is_multiple_of(4)
}

/// `(state, seq)` of every device's record in Redis (`presence:{b}:rec`, default prefix).
async fn redis_records(redis: &RedisServer, ids: &[String]) -> BTreeMap<String, (String, u64)> {
    let mut conn = redis.conn().await;
    let mut out = BTreeMap::new();
    for id in ids {
        let b = presenced::bucket::bucket_of(id);
        let raw: Option<String> = redis::cmd("HGET")
            .arg(format!("presence:{{{b}}}:rec"))
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
        let raw = raw.unwrap_or_else(|| panic!("{id}: no record in Redis"));
        let device = presenced::device::DeviceId::parse(id).unwrap();
        let record = presenced::device::DeviceRecord::parse(device, &raw)
            .unwrap_or_else(|| panic!("{id}: unexpected record {raw:?}"));
        out.insert(id.clone(), (record.state.as_str().to_owned(), record.seq));
    }
    out
}

/// Entries left in the outbox (committed, not acknowledged), over all 64 buckets.
async fn outbox_len(redis: &RedisServer) -> u64 {
    let mut conn = redis.conn().await;
    let mut pipe = redis::pipe();
    for b in 0..64 {
        pipe.cmd("ZCARD").arg(format!("presence:{{{b}}}:outbox"));
    }
    let counts: Vec<u64> = pipe.query_async(&mut conn).await.unwrap();
    counts.iter().sum()
}

async fn flapping_through_resets(protocol: &str, clean_session: bool) {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let proxy = Arc::new(FaultProxy::start(
        format!("127.0.0.1:{}", mqtt.port).parse().unwrap(),
    ));
    let url = format!("mqtt://{}", proxy.addr());
    let mut extra = vec![("mqtt.url", url.as_str()), ("mqtt.protocol", protocol)];
    if clean_session {
        extra.push(("mqtt.shared_group", "acks"));
    }
    let cfg = config(&redis, &mqtt, &extra);
    assert_eq!(cfg.mqtt.persistent_session(), !clean_session);
    let app = TestApp::spawn(cfg).await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Arc::new(Devices::connect(&mqtt).await);
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("flap-{i:03}")).collect();

    // The resets: refuse (closing every connection) for a moment, then pass again.
    let stop = Arc::new(AtomicBool::new(false));
    let resets = Arc::new(AtomicUsize::new(0));
    let resetter = {
        let (proxy, stop, resets) = (proxy.clone(), stop.clone(), resets.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(rand_ms(1000, 2000));
                proxy.set(Mode::Refuse);
                std::thread::sleep(rand_ms(20, 300));
                proxy.set(Mode::Pass);
                resets.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // The devices: heartbeat, silent 1.3–1.7 s (past the 1 s TTL), heartbeat again.
    let start = Instant::now();
    let mut flappers = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (devices, id) = (devices.clone(), id.clone());
        let stop_at = start + FLAP * 2 / 3 + rand_ms(0, FLAP.as_millis() as u64 / 3);
        flappers.push(tokio::spawn(async move {
            tokio::time::sleep(rand_ms(0, 1500)).await;
            while Instant::now() < stop_at {
                devices.heartbeat(&id, b"").await;
                tokio::time::sleep(rand_ms(1300, 1700)).await;
            }
            if ends_online(i) {
                devices.heartbeat(&id, LONG_TTL).await;
            }
        }));
    }
    for f in flappers {
        f.await.unwrap();
    }
    tokio::time::sleep(RESETS_AFTER).await;
    stop.store(true, Ordering::SeqCst);
    resetter.join().unwrap();
    proxy.set(Mode::Pass);
    let resets = resets.load(Ordering::SeqCst);
    // Without a session, heartbeats sent while the monitor was away are lost: the devices
    // that end online say so once more, now that the connection stays up.
    wait_ready(app.http()).await;
    for (i, id) in ids.iter().enumerate() {
        if ends_online(i) {
            devices.heartbeat(id, LONG_TTL).await;
        }
    }

    // Quiet: every device in its final state, the outbox empty, no status for 3 s.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last_count = statuses.count(|_| true);
    let mut last_change = Instant::now();
    loop {
        assert!(
            Instant::now() < deadline,
            "not quiet after {resets} resets: outbox {}",
            outbox_len(&redis).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = statuses.count(|_| true);
        if n != last_count {
            (last_count, last_change) = (n, Instant::now());
            continue;
        }
        if last_change.elapsed() < Duration::from_secs(3) || outbox_len(&redis).await > 0 {
            continue;
        }
        let records = redis_records(&redis, &ids).await;
        let settled = ids.iter().enumerate().all(|(i, id)| {
            let want = if ends_online(i) { "online" } else { "offline" };
            records[id].0 == want
        });
        if settled {
            break;
        }
    }

    // Every retained status = the API = Redis, per device.
    let finals = check_invariants(&mqtt, app.http(), &statuses).await;
    assert_eq!(finals.len(), DEVICES, "devices with statuses");
    let records = redis_records(&redis, &ids).await;
    let late = Collector::start(&mqtt, "devices/+/status").await;
    late.wait_for("every retained status", |s| s.len() >= DEVICES)
        .await;
    let retained: BTreeMap<String, serde_json::Value> = late
        .all()
        .into_iter()
        .map(|s| (s.json["device"].as_str().unwrap().to_owned(), s.json))
        .collect();
    let mut transitions = 0;
    for (i, id) in ids.iter().enumerate() {
        let (state, seq) = &records[id];
        let (code, api) = get_json(app.http(), &format!("/devices/{id}")).await;
        assert_eq!(code, 200, "{id}");
        assert_eq!(api["seq"].as_u64(), Some(*seq), "{id}: API seq vs Redis");
        assert_eq!(
            api["state"].as_str(),
            Some(state.as_str()),
            "{id}: API state"
        );
        let r = &retained[id];
        assert_eq!(r["seq"].as_u64(), Some(*seq), "{id}: retained seq vs Redis");
        assert_eq!(
            r["state"].as_str(),
            Some(state.as_str()),
            "{id}: retained state"
        );
        let want = if ends_online(i) { "online" } else { "offline" };
        assert_eq!(state, want, "{id}");
        transitions += seq;
    }
    let published = statuses.count(|_| true);
    eprintln!(
        "{protocol} clean_session={clean_session}: {resets} resets, {transitions} transitions, \
         {published} statuses seen"
    );
    // The test means something only if connections were reset while devices flapped.
    assert!(resets >= 10, "only {resets} resets");
    assert!(
        transitions >= DEVICES as u64 * 8,
        "only {transitions} transitions"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_persistent_session_acks_survive_resets() {
    flapping_through_resets("v3.1.1", false).await;
}

// Each reconnection without session is followed by a reconciling sweep that commits a batch
// of offline statuses while the applier commits the heartbeats that arrived meanwhile: a
// device's offline seq n used to be queued after its online seq n + 1 (presence::CommitOrder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_clean_session_acks_survive_resets() {
    flapping_through_resets("v3.1.1", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_persistent_session_acks_survive_resets() {
    flapping_through_resets("v5", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_clean_session_acks_survive_resets() {
    flapping_through_resets("v5", true).await;
}
