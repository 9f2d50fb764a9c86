//! What the simulated fleet does, as pure functions of the options: device and group
//! names, who is silent when (`--offline-fraction`, `--outage`), and each heartbeat's
//! topic and payload. No I/O.

use std::time::Duration;

use bytes::Bytes;

use crate::config::parse_duration;
use crate::device::{DeviceId, GroupName, InvalidDeviceId, InvalidGroup, TopicTemplate};

#[derive(Clone, Debug)]
pub struct SimOptions {
    pub devices: usize,
    pub interval: Duration,
    pub offline_fraction: f64,
    pub duration: Option<Duration>,
    pub prefix: String,
    /// Spread the devices over this many groups (`<prefix>-g001` …); 0: no groups.
    pub groups: usize,
    /// Groups silenced for a while (`--outage GROUP@DELAY+LENGTH`).
    pub outages: Vec<Outage>,
    /// Where a device publishes its will when it goes silent (`--will-topic`), as the
    /// broker would for a device whose connection dropped.
    pub will_topic: Option<TopicTemplate>,
}

/// The payload of a simulated will (the default `mqtt.will_payload`).
pub const WILL_PAYLOAD: &[u8] = b"offline";

/// One `--outage`: every device of `group` is silent from `delay` after the start, for
/// `length`; then they heartbeat again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outage {
    pub group: GroupName,
    pub delay: Duration,
    pub length: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("--devices must be at least 1")]
    NoDevices,
    #[error("--offline-fraction must lie within 0 and 1, got {0}")]
    Fraction(f64),
    #[error("--prefix {0:?} does not make valid device ids: {1}")]
    Prefix(String, InvalidDeviceId),
    #[error("--prefix {0:?} does not make valid group names: {1}")]
    GroupPrefix(String, InvalidGroup),
    #[error("--outage {0:?}: expected GROUP@DELAY+LENGTH, e.g. sim-g003@60s+30s")]
    OutageSyntax(String),
    #[error("--outage {0:?}: {1}")]
    OutageGroup(String, InvalidGroup),
    #[error("--outage names group {0:?}, which the simulated fleet does not have (see --groups)")]
    OutageUnknownGroup(String),
}

/// The id of device `i` (0-based): `sim-000001` for `i = 0`.
pub fn device_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{:06}", i + 1)
}

/// The name of group `k` (0-based): `sim-g001` for `k = 0`.
pub fn group_name(prefix: &str, k: usize) -> String {
    format!("{prefix}-g{:03}", k + 1)
}

impl Outage {
    /// Parses `GROUP@DELAY+LENGTH`, e.g. `sim-g003@60s+30s`.
    pub fn parse(s: &str) -> Result<Outage, SimError> {
        let syntax = || SimError::OutageSyntax(s.to_owned());
        let (group, times) = s.rsplit_once('@').ok_or_else(syntax)?;
        let (delay, length) = times.split_once('+').ok_or_else(syntax)?;
        Ok(Outage {
            group: GroupName::parse(group).map_err(|e| SimError::OutageGroup(s.to_owned(), e))?,
            delay: parse_duration(delay).map_err(|_| syntax())?,
            length: parse_duration(length).map_err(|_| syntax())?,
        })
    }

    fn covers(&self, elapsed: Duration) -> bool {
        elapsed >= self.delay && elapsed < self.delay + self.length
    }
}

impl SimOptions {
    pub fn validate(&self) -> Result<(), SimError> {
        if self.devices == 0 {
            return Err(SimError::NoDevices);
        }
        if !(0.0..=1.0).contains(&self.offline_fraction) {
            return Err(SimError::Fraction(self.offline_fraction));
        }
        DeviceId::parse(&device_name(&self.prefix, self.devices - 1))
            .map_err(|e| SimError::Prefix(self.prefix.clone(), e))?;
        if self.groups > 0 {
            GroupName::parse(&group_name(&self.prefix, self.groups - 1))
                .map_err(|e| SimError::GroupPrefix(self.prefix.clone(), e))?;
        }
        for o in &self.outages {
            if self.group_index(&o.group).is_none() {
                return Err(SimError::OutageUnknownGroup(o.group.to_string()));
            }
        }
        Ok(())
    }

    /// How many devices (the last ones) stop after their first heartbeat.
    pub fn silent(&self) -> usize {
        ((self.devices as f64) * self.offline_fraction).round() as usize
    }

    /// The group of device `i`: devices are dealt round-robin over the groups.
    pub fn group_of(&self, i: usize) -> Option<GroupName> {
        (self.groups > 0)
            .then(|| GroupName::parse(&group_name(&self.prefix, i % self.groups)).ok())
            .flatten()
    }

    fn group_index(&self, group: &GroupName) -> Option<usize> {
        (0..self.groups).find(|&k| group_name(&self.prefix, k) == group.as_str())
    }

    /// Whether device `i` heartbeats in round `round`, `elapsed` after the start.
    pub fn heartbeats(&self, i: usize, round: u64, elapsed: Duration) -> bool {
        if i >= self.devices - self.silent() && round > 0 {
            return false;
        }
        if self.outages.is_empty() {
            return true;
        }
        let Some(group) = self.group_of(i) else {
            return true;
        };
        !self
            .outages
            .iter()
            .any(|o| o.group == group && o.covers(elapsed))
    }

    /// Whether device `i` goes silent at heartbeat `round` (it sent the one before): the
    /// moment its will is published.
    pub fn stops(&self, i: usize, round: u64, elapsed: Duration) -> bool {
        let Some(before) = round.checked_sub(1) else {
            return false;
        };
        !self.heartbeats(i, round, elapsed)
            && self.heartbeats(i, before, elapsed.saturating_sub(self.interval))
    }

    /// The topic and payload of device `i`'s will, with `--will-topic`.
    pub fn will(&self, i: usize) -> Option<(String, Bytes)> {
        let template = self.will_topic.as_ref()?;
        let id = DeviceId::parse(&device_name(&self.prefix, i)).ok()?;
        let topic = match self.group_of(i) {
            Some(g) if template.has_group() => template.render_in(&id, &g),
            _ => template.render(&id),
        };
        Some((topic, Bytes::from_static(WILL_PAYLOAD)))
    }

    /// The topic and payload of device `i`'s heartbeat: the group as the topic's `{group}`
    /// level if the template has one, else in a JSON payload (none without groups).
    pub fn heartbeat(&self, template: &TopicTemplate, i: usize) -> Option<(String, Bytes)> {
        let id = DeviceId::parse(&device_name(&self.prefix, i)).ok()?;
        match self.group_of(i) {
            None => Some((template.render(&id), Bytes::new())),
            Some(g) if template.has_group() => Some((template.render_in(&id, &g), Bytes::new())),
            Some(g) => {
                let payload = serde_json::json!({ "group": g.as_str() }).to_string();
                Some((template.render(&id), Bytes::from(payload)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Levels;

    fn opts() -> SimOptions {
        SimOptions {
            devices: 10,
            interval: Duration::from_secs(1),
            offline_fraction: 0.25,
            duration: None,
            prefix: "sim".into(),
            groups: 0,
            outages: Vec::new(),
            will_topic: None,
        }
    }

    #[test]
    fn silent_devices_publish_their_will_once_when_they_stop() {
        let o = SimOptions {
            groups: 3,
            outages: vec![Outage::parse("sim-g002@60s+30s").unwrap()],
            will_topic: Some(
                TopicTemplate::parse_with("tele/{group}/{device}/LWT", Levels::DeviceAndGroup)
                    .unwrap(),
            ),
            ..opts()
        };
        let at = Duration::from_secs;
        // Device 9 is silent after its first heartbeat (the last quarter of ten).
        assert!(!o.stops(9, 0, at(0)));
        assert!(o.stops(9, 1, at(1)));
        assert!(!o.stops(9, 2, at(2)));
        // Device 1 (sim-g002): at the first heartbeat its outage silences, once.
        assert!(!o.stops(1, 59, at(59)));
        assert!(o.stops(1, 60, at(60)));
        assert!(!o.stops(1, 61, at(61)));
        assert!(!o.stops(0, 60, at(60)));
        let (topic, payload) = o.will(1).unwrap();
        assert_eq!(topic, "tele/sim-g002/sim-000002/LWT");
        assert_eq!(&payload[..], WILL_PAYLOAD);
        assert!(opts().will(1).is_none());
    }

    #[test]
    fn names_and_fractions() {
        assert_eq!(device_name("sim", 0), "sim-000001");
        assert_eq!(group_name("sim", 2), "sim-g003");
        let o = opts();
        assert_eq!(o.silent(), 3);
        assert!(o.validate().is_ok());
        let bad = [
            SimOptions {
                offline_fraction: 1.5,
                ..opts()
            },
            SimOptions {
                devices: 0,
                ..opts()
            },
            SimOptions {
                prefix: "a\nb".into(),
                ..opts()
            },
            SimOptions {
                prefix: "a/b".into(),
                groups: 2,
                ..opts()
            },
        ];
        for o in bad {
            assert!(o.validate().is_err(), "{o:?}");
        }
    }

    #[test]
    fn outages_silence_one_group_for_a_while() {
        let outage = Outage::parse("sim-g002@60s+30s").unwrap();
        assert_eq!(outage.delay, Duration::from_secs(60));
        assert_eq!(outage.length, Duration::from_secs(30));
        for bad in ["sim-g002", "sim-g002@60s", "sim-g002@x+1s", "a/b@1s+1s"] {
            assert!(Outage::parse(bad).is_err(), "{bad}");
        }
        let o = SimOptions {
            offline_fraction: 0.0,
            groups: 3,
            outages: vec![outage],
            ..opts()
        };
        assert!(o.validate().is_ok());
        // Device 1 is in sim-g002 (round-robin), device 0 in sim-g001.
        let at = Duration::from_secs;
        assert!(o.heartbeats(1, 5, at(59)));
        assert!(!o.heartbeats(1, 5, at(60)));
        assert!(!o.heartbeats(1, 5, at(89)));
        assert!(o.heartbeats(1, 5, at(90)));
        assert!(o.heartbeats(0, 5, at(70)));
        let unknown = SimOptions {
            outages: vec![Outage::parse("sim-g009@1s+1s").unwrap()],
            ..o
        };
        assert!(unknown.validate().is_err());
    }

    #[test]
    fn the_group_goes_in_the_topic_or_the_payload() {
        let o = SimOptions {
            groups: 2,
            ..opts()
        };
        let plain = TopicTemplate::parse("devices/{device}/heartbeat").unwrap();
        let (topic, payload) = o.heartbeat(&plain, 1).unwrap();
        assert_eq!(topic, "devices/sim-000002/heartbeat");
        assert_eq!(&payload[..], br#"{"group":"sim-g002"}"#);
        let levels =
            TopicTemplate::parse_with("sites/{group}/{device}", Levels::DeviceAndGroup).unwrap();
        let (topic, payload) = o.heartbeat(&levels, 1).unwrap();
        assert_eq!(topic, "sites/sim-g002/sim-000002");
        assert!(payload.is_empty());
        let (_, payload) = opts().heartbeat(&plain, 1).unwrap();
        assert!(payload.is_empty());
    }
}
