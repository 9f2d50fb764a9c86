//! The contract's guarantees checked over everything a subscriber saw.

use std::net::SocketAddr;

use serde_json::Value;

use super::*;

/// Parses an RFC 3339 time with milliseconds into ms since the epoch.
pub fn ms(v: &Value) -> u64 {
    let t = humantime::parse_rfc3339(v.as_str().expect("a time string")).expect("RFC 3339");
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// What a subscriber that keeps the highest `seq` per device accepts from `msgs` (one
/// device's statuses in arrival order): duplicates and older seqs are dropped.
pub fn accepted(msgs: &[Value]) -> Vec<Value> {
    let mut best = 0;
    let mut out = Vec::new();
    for m in msgs {
        let seq = m["seq"].as_u64().expect("seq");
        if seq > best {
            best = seq;
            out.push(m.clone());
        }
    }
    out
}

/// The seqs and states a deduplicating subscriber saw for one device.
pub fn history(msgs: &[Value]) -> Vec<(u64, String)> {
    accepted(msgs)
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The device statuses among `seen`, per device in the order seen (one pass, for checks
/// over many devices).
pub fn by_device(seen: &[Seen]) -> std::collections::HashMap<String, Vec<Value>> {
    let mut out: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for s in seen {
        if let Some(d) = s.json["device"].as_str() {
            out.entry(d.to_owned()).or_default().push(s.json.clone());
        }
    }
    out
}

/// Checks the contract's guarantees over everything a subscriber saw, once quiet: per
/// device (after keeping the highest seq) seq starts at 1 and grows by 1, states alternate
/// starting online; the retained status a late subscriber gets, the HTTP API and the last
/// status seen all agree. Returns the devices' final states.
pub async fn check_invariants(
    mqtt: &impl Broker,
    api: SocketAddr,
    seen: &Collector,
) -> std::collections::BTreeMap<String, String> {
    let mut by_device: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for s in seen.all() {
        if let Some(d) = s.json["device"].as_str() {
            by_device
                .entry(d.to_owned())
                .or_default()
                .push(s.json.clone());
        }
    }
    let filters: Vec<String> = if mqtt.wildcard_retained() {
        vec!["devices/+/status".into()]
    } else {
        by_device
            .keys()
            .map(|d| format!("devices/{d}/status"))
            .collect()
    };
    let late = Collector::start_many(mqtt, &filters).await;
    let n = by_device.len();
    late.wait_for("every retained status", |s| s.len() >= n)
        .await;
    let retained: std::collections::BTreeMap<String, Value> = late
        .all()
        .into_iter()
        .map(|s| (s.json["device"].as_str().unwrap().to_owned(), s.json))
        .collect();
    let records = all_records(api).await;
    let mut finals = std::collections::BTreeMap::new();
    for (device, msgs) in &by_device {
        let h = history(msgs);
        for (i, (seq, state)) in h.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "{device}: seq gap in {h:?}");
            let expected = if i % 2 == 0 { "online" } else { "offline" };
            assert_eq!(state, expected, "{device}: states do not alternate: {h:?}");
        }
        let last = accepted(msgs).pop().unwrap();
        assert_eq!(
            retained.get(device),
            Some(&last),
            "{device}: retained differs from the last status"
        );
        let rec = records
            .get(device)
            .unwrap_or_else(|| panic!("{device}: not listed by the API"));
        assert_eq!(rec["seq"], last["seq"], "{device}: API seq");
        assert_eq!(rec["state"], last["state"], "{device}: API state");
        finals.insert(device.clone(), last["state"].as_str().unwrap().to_owned());
    }
    finals
}
