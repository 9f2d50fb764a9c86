//! Flapping: every status's `flapping` as the contract's penalty model says, the record's as
//! of now, the gauge and the `/devices?flapping=` filter, and the label ending without a
//! transition once the penalty decays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::Value;
use support::*;

const THRESHOLD: f64 = 4.0;
const HALF_LIFE_MS: f64 = 5_000.0;
/// Penalties and ends this close to the boundary are not judged: the scripts keep the penalty
/// to 4 decimals and decide at Redis's clock with sub-ms precision.
const PENALTY_SLACK: f64 = 0.01;
const TIME_SLACK_MS: f64 = 5.0;

/// The contract's model over a device's transitions (their `detected_at`, when each was
/// decided): per transition its penalty and whether it is flapping, and when flapping ends.
#[derive(Default)]
struct Model {
    penalty: f64,
    at: f64,
    /// When flapping ends, if flapping as of the latest transition.
    until: Option<f64>,
}

impl Model {
    fn transition(&mut self, t: f64) -> (f64, bool) {
        let decayed = self.penalty * 0.5f64.powf((t - self.at).max(0.0) / HALF_LIFE_MS);
        self.penalty = decayed + 1.0;
        self.at = t;
        let still = self.until.is_some_and(|u| t <= u);
        let flapping = self.penalty >= THRESHOLD || still;
        self.until =
            flapping.then(|| t + HALF_LIFE_MS * (2.0 * self.penalty / THRESHOLD).log2().max(0.0));
        (self.penalty, flapping)
    }
}

/// The device's statuses, one per seq, in seq order.
fn statuses_of(statuses: &Collector, id: &str) -> Vec<Value> {
    invariants::accepted(&statuses.device(id))
}

/// Checks every status's `flapping` against the model; returns the model after them.
fn judge(seen: &[Value]) -> Model {
    let mut model = Model::default();
    for s in seen {
        let (penalty, flapping) = model.transition(ms(&s["detected_at"]) as f64);
        if (penalty - THRESHOLD).abs() < PENALTY_SLACK {
            continue;
        }
        assert_eq!(
            s["flapping"], flapping,
            "penalty {penalty:.3} as of {s}: flapping should be {flapping}"
        );
    }
    model
}

fn local_now() -> f64 {
    presenced::device::now_ms() as f64
}

/// A device toggled online and offline (short TTLs) is labelled flapping exactly when its
/// penalty says so; `/devices?flapping=true`, its record and the gauge agree while it is;
/// a steady device never is; the label ends by itself, with no transition, when the
/// penalty decays below half the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_keeps_changing_is_labelled_flapping_until_its_penalty_decays() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[
        ("presence.min_ttl", "100ms"),
        ("presence.flap_threshold", "4"),
        ("presence.flap_half_life", "5s"),
    ])
    .await;
    let api = app.http();
    devices.heartbeat("steady", br#"{"ttl_s":120}"#).await;

    // Toggle until a status is labelled flapping (from the 5th transition at this pace: the
    // 4th would need four transitions at the same instant), at most 16 transitions.
    let mut seq = 0;
    while !statuses_of(&statuses, "flappy")
        .iter()
        .any(|s| s["flapping"] == true)
    {
        assert!(
            seq < 16,
            "never flapping: {:?}",
            statuses_of(&statuses, "flappy")
        );
        devices.heartbeat("flappy", br#"{"ttl_s":0.3}"#).await;
        seq += 2;
        statuses
            .wait_for("flappy offline again", |_| {
                statuses_of(&statuses, "flappy").len() >= seq
            })
            .await;
    }
    // Back online for good.
    devices.heartbeat("flappy", br#"{"ttl_s":120}"#).await;
    seq += 1;
    statuses
        .wait_for("flappy online", |_| {
            statuses_of(&statuses, "flappy").len() >= seq
        })
        .await;
    let seen = statuses_of(&statuses, "flappy");
    let model = judge(&seen);
    assert!(
        seen.len() >= 5,
        "flapping before its 5th transition: {seen:?}"
    );
    assert_eq!(seen.last().unwrap()["flapping"], true, "{seen:?}");
    let until = model.until.expect("flapping as of the last transition");
    let steady = statuses_of(&statuses, "steady");
    assert_eq!(steady.len(), 1);
    assert_eq!(steady[0]["flapping"], false);

    // While it flaps: the record, the filter and the gauge say so (judged only if the answer
    // came well before the end the model gives).
    let (_, record) = get_json(api, "/devices/flappy").await;
    let (_, listed) = get_json(api, "/devices?flapping=true").await;
    let gauge = metric(&scrape(api).await, "presenced_devices_flapping");
    if local_now() < until - 500.0 {
        assert_eq!(record["flapping"], true, "{record}");
        let ids: Vec<&str> = listed["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["flappy"], "{listed}");
        assert_eq!(gauge, Some(1.0));
    }
    let (code, _) = get_json(api, "/devices?flapping=maybe").await;
    assert_eq!(code, 400);

    // The label ends by itself: not before the model's end, and with no new status.
    let ended = eventually("flapping to end", || async move {
        let (_, r) = get_json(api, "/devices/flappy").await;
        (r["flapping"] == false).then(local_now)
    })
    .await;
    assert!(
        ended >= until - TIME_SLACK_MS,
        "ended at {ended}, {:.0} ms before the penalty fell below half the threshold",
        until - ended
    );
    let (_, listed) = get_json(api, "/devices?flapping=true").await;
    assert_eq!(listed["devices"], Value::Array(vec![]), "{listed}");
    let (_, unlabelled) = get_json(api, "/devices?flapping=false").await;
    assert_eq!(unlabelled["devices"].as_array().unwrap().len(), 2);
    eventually("the gauge at 0", || async move {
        (metric(&scrape(api).await, "presenced_devices_flapping") == Some(0.0)).then_some(())
    })
    .await;
    let after = statuses_of(&statuses, "flappy");
    assert_eq!(after.len(), seq, "a status for the end: {after:#?}");
    check_invariants(&mqtt, api, &statuses).await;
    app.stop().await.unwrap();
}
