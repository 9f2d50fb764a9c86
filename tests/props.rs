//! Property tests of everything that parses outside input: device ids, topics, heartbeat
//! payloads, the outbox wire form and the configuration. They must never panic, and must
//! accept exactly what the contract says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use presenced::config::{parse_duration, parse_size, Config, Sources};
use presenced::device::{
    heartbeat_ttl, DeviceId, GroupName, Reason, State, StatusEvent, TopicTemplate,
};
use proptest::prelude::*;

fn valid_id() -> impl Strategy<Value = String> {
    // Any non-control characters, 1 to 128 bytes.
    proptest::collection::vec(
        any::<char>().prop_filter("no control", |c| !c.is_control()),
        1..64,
    )
    .prop_map(|cs| cs.into_iter().collect::<String>())
    .prop_filter("at most 128 bytes", |s| s.len() <= 128)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Accepted exactly when 1..=128 bytes without control characters.
    #[test]
    fn device_id_rule(s in any::<String>()) {
        let ok = !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control);
        prop_assert_eq!(DeviceId::parse(&s).is_ok(), ok);
    }

    #[test]
    fn device_id_from_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = DeviceId::parse_bytes(&b);
    }

    /// A topic rendered for a device id without `/` is matched back to that id, and nothing
    /// else of a different shape matches.
    #[test]
    fn topic_round_trip(id in valid_id().prop_filter("one level", |s| !s.contains('/')),
                        prefix in "[a-z]{1,8}", suffix in "[a-z]{1,8}") {
        let t = TopicTemplate::parse(&format!("{prefix}/{{device}}/{suffix}")).unwrap();
        let id = DeviceId::parse(&id).unwrap();
        let topic = t.render(&id);
        prop_assert_eq!(t.extract(&topic), Some(id.as_str()));
        let extra = format!("{topic}/x");
        prop_assert_eq!(t.extract(&extra), None);
    }

    #[test]
    fn topic_extract_never_panics(topic in any::<String>(), template in "[a-z{}/+#]{0,30}") {
        if let Ok(t) = TopicTemplate::parse(&template) {
            let _ = t.extract(&topic);
        }
    }

    /// Any payload is a heartbeat; the TTL is the default or lies within the bounds.
    #[test]
    fn heartbeat_ttl_is_default_or_bounded(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let (d, min, max) = (Duration::from_secs(30), Duration::from_secs(1), Duration::from_secs(3600));
        let ttl = heartbeat_ttl(&payload, d, min, max);
        prop_assert!(ttl == d || (ttl >= min && ttl <= max));
    }

    #[test]
    fn heartbeat_ttl_json_numbers(v in any::<f64>()) {
        let (d, min, max) = (Duration::from_secs(30), Duration::from_secs(1), Duration::from_secs(3600));
        let payload = format!("{{\"ttl_s\": {v}}}");
        let ttl = heartbeat_ttl(payload.as_bytes(), d, min, max);
        if v.is_finite() && v > 0.0 && serde_json::from_str::<serde_json::Value>(&payload).is_ok() {
            let expected = Duration::try_from_secs_f64(v).unwrap_or(max).clamp(min, max);
            prop_assert_eq!(ttl, expected);
        } else {
            prop_assert_eq!(ttl, d);
        }
    }

    /// The outbox wire form round-trips for every valid id and group (both may contain `|`).
    #[test]
    fn outbox_member_round_trip(id in valid_id(), seq in 1u64..u64::MAX, online: bool,
                                since in 0u64..1 << 50, last in 0u64..1 << 50, det in 0u64..1 << 50,
                                group in proptest::option::of("[^/+#\\p{Cc}]{1,20}"),
                                left in proptest::option::of("[^/+#\\p{Cc}]{1,20}"),
                                flapping: bool, will: bool) {
        let group = group.and_then(|g| GroupName::parse(&g).ok());
        let left = left.and_then(|g| GroupName::parse(&g).ok());
        let reason = match (online, will) {
            (true, _) => Reason::Heartbeat,
            (false, true) => Reason::Will,
            (false, false) => Reason::TtlExpired,
        };
        let ev = StatusEvent {
            device: DeviceId::parse(&id).unwrap(),
            state: if online { State::Online } else { State::Offline },
            seq, since, last_seen: last, detected_at: det, group, left, reason, flapping,
        };
        prop_assert_eq!(StatusEvent::parse_member(&ev.member()), Some(ev));
    }

    #[test]
    fn outbox_member_parse_never_panics(s in any::<String>()) {
        let _ = StatusEvent::parse_member(&s);
    }

    #[test]
    fn duration_and_size_parsers_never_panic(s in any::<String>()) {
        let _ = parse_duration(&s);
        let _ = parse_size(&s);
    }

    /// Any value for any key: loading never panics, and an error names a key.
    #[test]
    fn config_values_never_panic(key in 0..presenced::config::KEYS.len(), value in any::<String>()) {
        let key = &presenced::config::KEYS[key];
        let r = Config::load(&Sources {
            flags: vec![(key.path(), value)],
            ..Sources::default()
        });
        if let Err(e) = r {
            let msg = e.to_string();
            prop_assert!(presenced::config::KEYS.iter().any(|k| msg.starts_with(&k.path())), "{}", msg);
        }
    }

    /// Any TOML-ish file content: loading never panics.
    #[test]
    fn config_files_never_panic(text in "(\\[[a-z]{1,8}\\]\n)?([a-z_]{1,12} = (\"[a-z0-9:/.]{0,12}\"|[0-9]{1,6}|true)\n){0,4}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let _ = Config::load(&Sources { file: Some(path), ..Sources::default() });
    }
}
