//! Device wills (MQTT LWT): what a message on the will topic means, and the `session` a
//! heartbeat or a will carries to fence stale wills.
//!
//! Owns [`Will`], [`WillPayload`] and [`session_of`]. Must not do I/O: the MQTT task reads
//! wills and holds them (src/held.rs), the applier applies them (src/lua/will.lua decides).

use crate::device::{DeviceId, Millis};

/// A will as received: the device, its arrival (local wall clock) and its session, if it
/// names one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub device: DeviceId,
    pub arrival: Millis,
    pub session: Option<u64>,
}

/// What a message on the will topic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WillPayload {
    /// The device's connection is lost (its will), with the session it names.
    Will { session: Option<u64> },
    /// Anything else (Tasmota's retained `Online`, say): ignored.
    Other,
}

impl WillPayload {
    /// Reads a payload against the configured will payload (`expected`: trimmed, lowercase):
    /// a will is that payload, trimmed, in any case, or a JSON object whose `state` is
    /// `offline`.
    pub fn read(payload: &[u8], expected: &str) -> WillPayload {
        if let Ok(text) = std::str::from_utf8(payload) {
            if text.trim().eq_ignore_ascii_case(expected) {
                return WillPayload::Will { session: None };
            }
        }
        match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v) if v.get("state").and_then(|s| s.as_str()) == Some("offline") => {
                WillPayload::Will {
                    session: session_in(&v),
                }
            }
            _ => WillPayload::Other,
        }
    }
}

/// The `"session"` a JSON object payload names (a non-negative integer), if any.
pub fn session_of(payload: &[u8]) -> Option<u64> {
    // Only a JSON object can name one: skip the parse for anything else (most heartbeats
    // are small, but a non-JSON payload must cost nothing).
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    session_in(&serde_json::from_slice(payload).ok()?)
}

fn session_in(v: &serde_json::Value) -> Option<u64> {
    v.get("session")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_will_payload_matches_trimmed_in_any_case() {
        for p in ["offline", " Offline\n", "OFFLINE"] {
            assert_eq!(
                WillPayload::read(p.as_bytes(), "offline"),
                WillPayload::Will { session: None },
                "{p:?}"
            );
        }
        for p in ["Online", "", "off line", "offline!"] {
            assert_eq!(
                WillPayload::read(p.as_bytes(), "offline"),
                WillPayload::Other
            );
        }
        assert_eq!(
            WillPayload::read(b"Dead", "dead"),
            WillPayload::Will { session: None }
        );
    }

    #[test]
    fn a_json_object_saying_offline_is_a_will_with_its_session() {
        // Whatever the configured payload is.
        assert_eq!(
            WillPayload::read(br#"{"state":"offline","session":7}"#, "dead"),
            WillPayload::Will { session: Some(7) }
        );
        assert_eq!(
            WillPayload::read(br#"{"state":"offline","session":"7"}"#, "dead"),
            WillPayload::Will { session: None }
        );
        assert_eq!(
            WillPayload::read(br#"{"state":"online","session":7}"#, "offline"),
            WillPayload::Other
        );
        assert_eq!(
            WillPayload::read(br#"["offline"]"#, "x"),
            WillPayload::Other
        );
    }

    #[test]
    fn a_heartbeat_names_its_session_in_a_json_object() {
        assert_eq!(session_of(br#" {"session": 12, "ttl_s": 5}"#), Some(12));
        assert_eq!(session_of(br#"{"session": -1}"#), None);
        assert_eq!(session_of(br#"{"session": 1.5}"#), None);
        assert_eq!(session_of(b"12"), None);
        assert_eq!(session_of(b""), None);
        assert_eq!(session_of(br#"{"ttl_s": 5}"#), None);
    }
}
