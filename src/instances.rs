//! The replicas the broker says are running: their retained presence on
//! `presenced/instances/<client id>` (online when they connect, offline by their will or when
//! they leave), as the MQTT task reads it, for the status page (`/instances`).
//!
//! Owns [`Instances`]. Bounded: at most [`MAX_INSTANCES`] kept, the offline ones seen
//! longest ago give way first. Must not do I/O.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use crate::device::{format_time, now_ms, Millis};

/// Most replicas kept.
pub(crate) const MAX_INSTANCES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Presence {
    state: String,
    since: Option<String>,
    /// When this process read it.
    seen: Millis,
}

/// The latest presence of every replica seen.
#[derive(Debug, Default)]
pub(crate) struct Instances {
    seen: Mutex<BTreeMap<String, Presence>>,
}

impl Instances {
    /// A presence message of replica `who` (an empty payload: its presence was cleared).
    /// Anything that is not a presence is ignored.
    pub(crate) fn note(&self, who: &str, payload: &[u8]) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if payload.is_empty() {
            seen.remove(who);
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let Some(state) = v.get("state").and_then(|s| s.as_str()) else {
            return;
        };
        if !seen.contains_key(who) && seen.len() >= MAX_INSTANCES && !evict(&mut seen) {
            return;
        }
        let since = v.get("since").and_then(|s| s.as_str()).map(str::to_owned);
        seen.insert(
            who.to_owned(),
            Presence {
                state: state.to_owned(),
                since,
                seen: now_ms(),
            },
        );
    }

    /// `{"instances":[{"instance","state","since","seen"}...]}`, online ones first.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<_> = seen.iter().collect();
        list.sort_by_key(|(who, p)| (p.state != "online", who.as_str()));
        let instances: Vec<_> = list
            .into_iter()
            .map(|(who, p)| {
                serde_json::json!({
                    "instance": who,
                    "state": p.state,
                    "since": p.since,
                    "seen": format_time(p.seen),
                })
            })
            .collect();
        serde_json::json!({ "instances": instances })
    }
}

/// Makes room by removing the offline replica seen longest ago; false if all are online.
fn evict(seen: &mut BTreeMap<String, Presence>) -> bool {
    let oldest = seen
        .iter()
        .filter(|(_, p)| p.state != "online")
        .min_by_key(|(_, p)| p.seen)
        .map(|(who, _)| who.clone());
    oldest.is_some_and(|who| seen.remove(&who).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_presence_per_replica_online_first_and_bounded() {
        let i = Instances::default();
        i.note(
            "b",
            br#"{"state":"online","instance":"b","since":"2026-12-04T00:00:00.000Z"}"#,
        );
        i.note("a", br#"{"state":"offline","instance":"a"}"#);
        i.note("c", b"not json");
        let v = i.to_json();
        let names: Vec<_> = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["instance"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(v["instances"][0]["since"], "2026-12-04T00:00:00.000Z");
        i.note("a", b"");
        assert_eq!(i.to_json()["instances"].as_array().unwrap().len(), 1);
        for n in 0..MAX_INSTANCES + 10 {
            i.note(&format!("gone-{n}"), br#"{"state":"offline"}"#);
        }
        let all = i.to_json()["instances"].as_array().unwrap().clone();
        assert_eq!(all.len(), MAX_INSTANCES);
        assert_eq!(
            all[0]["instance"], "b",
            "an online replica is never evicted"
        );
    }
}
