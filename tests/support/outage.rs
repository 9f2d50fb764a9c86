//! The outage scenario shared by the single-Redis and the cluster tests.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;

const BEAT: Duration = Duration::from_millis(300);

/// Heartbeats naming their group in the payload (the default heartbeat topic).
pub fn in_payload(ids: &[String], group: &str) -> Vec<(String, Vec<u8>)> {
    ids.iter()
        .map(|id| {
            let payload = serde_json::json!({ "group": group }).to_string();
            (format!("devices/{id}/heartbeat"), payload.into_bytes())
        })
        .collect()
}

pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// The outage statuses seen for `group`, in arrival order.
pub fn group_statuses(seen: &Collector, group: &str) -> Vec<Value> {
    seen.all()
        .into_iter()
        .filter(|s| s.topic == format!("groups/{group}/status"))
        .map(|s| s.json)
        .collect()
}

/// One status per seq (delivery is at least once), in seq order.
pub fn distinct(statuses: Vec<Value>) -> Vec<Value> {
    let mut by_seq = std::collections::BTreeMap::new();
    for s in statuses {
        by_seq.entry(s["seq"].as_u64().unwrap()).or_insert(s);
    }
    by_seq.into_values().collect()
}

/// How many of `ids` have an offline status seen with `since` at `from` or later.
fn distinct_offline(statuses: &Collector, ids: &[String], from: u64) -> usize {
    let went: std::collections::HashSet<String> = statuses
        .all()
        .into_iter()
        .filter(|s| s.json["state"] == "offline" && ms(&s.json["since"]) >= from)
        .filter_map(|s| s.json["device"].as_str().map(str::to_owned))
        .filter(|d| ids.contains(d))
        .collect();
    went.len()
}

/// The time (ms) the n-th (1-based) offline status of `ids` was detected.
fn nth_offline_detected(statuses: &Collector, ids: &[String], n: usize) -> u64 {
    let mut detected: Vec<u64> = statuses
        .all()
        .into_iter()
        .filter(|s| {
            s.json["state"] == "offline" && ids.iter().any(|id| s.json["device"] == id.as_str())
        })
        .map(|s| ms(&s.json["detected_at"]))
        .collect();
    detected.sort_unstable();
    detected[n - 1]
}

/// Runs the outage scenario of a group of 100 against monitors already started: 60 go
/// silent at once (one outage, seq 1, within 2 s of the 50th offline), then 55 come back
/// (one ok, seq 2); a calm group next to it has no outage status at all.
///
/// The devices still beating keep beating until the returned guard is dropped: the caller's
/// invariant check must not race their expiry.
pub async fn one_outage_opened_and_closed(
    mqtt: &impl Broker,
    api: std::net::SocketAddr,
    statuses: &Collector,
) -> Beating {
    let devices = Arc::new(Devices::connect(mqtt).await);
    let outages = Collector::start(mqtt, "groups/+/status").await;
    let site = ids("site", 100);
    let (silent, steady) = site.split_at(60);
    let calm = ids("calm", 20);
    let steady_beats = {
        let mut b = in_payload(steady, "site");
        b.extend(in_payload(&calm, "calm"));
        b
    };
    let beating_silent = keep_publishing(devices.clone(), in_payload(silent, "site"), BEAT);
    let beating_steady = keep_publishing(devices.clone(), steady_beats, BEAT);
    eventually("site all online", || async {
        let (_, g) = get_json(api, "/groups/site").await;
        (g["online"] == 100).then_some(())
    })
    .await;

    beating_silent.cancel();
    outages
        .wait_for("the outage opens", |s| {
            s.iter().any(|m| m.json["state"] == "outage")
        })
        .await;
    eventually("all 60 offline", || async {
        let (_, g) = get_json(api, "/groups/site").await;
        (g["offline"].as_i64()? >= 60 && g["affected"].as_i64()? >= 60).then_some(())
    })
    .await;
    let opened = distinct(group_statuses(&outages, "site"));
    assert_eq!(opened.len(), 1, "{opened:?}");
    let o = &opened[0];
    assert_eq!(
        (o["seq"].as_u64(), o["state"].as_str()),
        (Some(1), Some("outage"))
    );
    assert_eq!(o["devices"], 100);
    // 50 to 60 (the opening is told as of its call's end), or more where a steady device of
    // a loaded machine lapsed too: never more than the site's devices seen going offline
    // within the window (60 s) before the crossing or later.
    let affected = o["affected"].as_i64().unwrap();
    assert!(affected >= 50, "{o}");
    // (The device statuses come on another connection: wait for them to catch up.)
    let window_start = ms(&o["since"]) - 60_000;
    eventually("as many offline seen as affected", || async {
        (distinct_offline(statuses, &site, window_start) >= affected as usize).then_some(())
    })
    .await;
    let fiftieth = nth_offline_detected(statuses, silent, 50);
    let detected = ms(&o["detected_at"]);
    assert!(
        detected <= fiftieth + 2_000,
        "opened at {detected}, 2 s after the 50th offline ({fiftieth})"
    );
    let (_, rec) = get_json(api, "/groups/site").await;
    assert_eq!(
        (rec["state"].as_str(), rec["seq"].as_u64()),
        (Some("outage"), Some(1))
    );

    // 55 of the 60 come back: the outage closes once (54 = 0.9 × 60 recovered).
    let back = in_payload(&silent[..55], "site");
    let beating_back = keep_publishing(devices.clone(), back, BEAT);
    outages
        .wait_for("the outage closes", |s| {
            s.iter().any(|m| m.json["state"] == "ok")
        })
        .await;
    eventually("55 back online", || async {
        let (_, g) = get_json(api, "/groups/site").await;
        (g["online"].as_i64()? >= 95).then_some(())
    })
    .await;
    let all = distinct(group_statuses(&outages, "site"));
    assert_eq!(all.len(), 2, "{all:?}");
    let c = &all[1];
    assert_eq!(
        (c["seq"].as_u64(), c["state"].as_str()),
        (Some(2), Some("ok"))
    );
    // 60, or more where a steady device of a loaded machine lapsed too.
    let (affected, recovered) = (
        c["affected"].as_i64().unwrap(),
        c["recovered"].as_i64().unwrap(),
    );
    assert!(affected >= 60, "{c}");
    assert!(recovered as f64 >= 0.9 * affected as f64, "{c}");
    assert!(group_statuses(&outages, "calm").is_empty());
    let (_, rec) = get_json(api, "/groups/site").await;
    assert_eq!(
        (rec["state"].as_str(), rec["seq"].as_u64()),
        (Some("ok"), Some(2))
    );
    assert!(rec.get("affected").is_none());
    let m = scrape(api).await;
    assert_eq!(metric(&m, "presenced_groups{state=\"outage\"}"), Some(0.0));
    Beating(vec![beating_back, beating_steady])
}

/// Heartbeat loops that stop when this is dropped.
pub struct Beating(Vec<tokio_util::sync::CancellationToken>);

impl Drop for Beating {
    fn drop(&mut self) {
        for t in &self.0 {
            t.cancel();
        }
    }
}
