//! A group's outage status: what is published on `mqtt.group_topic` when an outage opens or
//! closes, its wire form in the outbox, and the group topic template. Pure: no I/O.
//!
//! The decision itself is src/lua/note.lua's (see `presence::groups`).

use serde::{Deserialize, Serialize};

use crate::device::{format_time, parse_time, GroupName, Millis, GROUP_PLACEHOLDER};

/// Whether a group is in an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Ok,
    Outage,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Ok => "ok",
            GroupState::Outage => "outage",
        }
    }

    fn from_flag(flag: &str) -> Option<GroupState> {
        match flag {
            "1" => Some(GroupState::Outage),
            "0" => Some(GroupState::Ok),
            _ => None,
        }
    }
}

/// One opening or closing of a group's outage, as committed in Redis.
///
/// Its outbox member is `o<length>|<group>|seq|state|since|detected_at|devices|online|offline|affected|recovered`
/// (state `1` outage, `0` ok): the leading `o` sets it apart from device statuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: GroupName,
    pub state: GroupState,
    pub seq: u64,
    /// The `since` of the device transition that opened (or closed) it.
    pub since: Millis,
    pub detected_at: Millis,
    pub devices: i64,
    pub online: i64,
    pub offline: i64,
    pub affected: i64,
    pub recovered: i64,
}

#[derive(Serialize)]
struct GroupStatusJson<'a> {
    group: &'a str,
    state: &'static str,
    since: String,
    detected_at: String,
    devices: i64,
    online: i64,
    offline: i64,
    affected: i64,
    recovered: i64,
    seq: u64,
}

impl GroupStatus {
    /// Parses an outbox member (or the current status kept for the group); `None` if it is
    /// not a group status.
    pub fn parse_member(member: &str) -> Option<GroupStatus> {
        let rest = member.strip_prefix('o')?;
        let (len, rest) = rest.split_once('|')?;
        let len: usize = len.parse().ok()?;
        let group = GroupName::parse(rest.get(..len)?).ok()?;
        let mut f = rest.get(len..)?.strip_prefix('|')?.split('|');
        let mut num = || f.next()?.parse::<i64>().ok();
        let seq = u64::try_from(num()?).ok()?;
        let state = GroupState::from_flag(&num()?.to_string())?;
        let since = u64::try_from(num()?).ok()?;
        let detected_at = u64::try_from(num()?).ok()?;
        let status = GroupStatus {
            group,
            state,
            seq,
            since,
            detected_at,
            devices: num()?,
            online: num()?,
            offline: num()?,
            affected: num()?,
            recovered: num()?,
        };
        f.next().is_none().then_some(status)
    }

    /// The outbox member (the form the group states hash keeps, too).
    pub fn member(&self) -> String {
        let flag = match self.state {
            GroupState::Outage => "1",
            GroupState::Ok => "0",
        };
        format!(
            "o{}|{}|{}|{flag}|{}|{}|{}|{}|{}|{}|{}",
            self.group.as_str().len(),
            self.group,
            self.seq,
            self.since,
            self.detected_at,
            self.devices,
            self.online,
            self.offline,
            self.affected,
            self.recovered
        )
    }

    /// Parses a retained payload (read back from the broker to rebuild a Redis that lost its
    /// data); `None` for anything that is not a group status with a valid group and seq.
    pub fn from_json(payload: &[u8]) -> Option<GroupStatus> {
        #[derive(Deserialize)]
        struct Wire {
            group: String,
            state: String,
            seq: u64,
            since: String,
            detected_at: String,
            devices: u32,
            online: u32,
            offline: u32,
            affected: u32,
            recovered: u32,
        }
        let w: Wire = serde_json::from_slice(payload).ok()?;
        Some(GroupStatus {
            group: GroupName::parse(&w.group).ok()?,
            state: match w.state.as_str() {
                "outage" => GroupState::Outage,
                "ok" => GroupState::Ok,
                _ => return None,
            },
            seq: Some(w.seq).filter(|s| *s >= 1)?,
            since: parse_time(&w.since)?,
            detected_at: parse_time(&w.detected_at)?,
            devices: w.devices.into(),
            online: w.online.into(),
            offline: w.offline.into(),
            affected: w.affected.into(),
            recovered: w.recovered.into(),
        })
    }

    /// The retained payload (contract: "Groups", outages).
    pub fn to_json(&self) -> Vec<u8> {
        let json = GroupStatusJson {
            group: self.group.as_str(),
            state: self.state.as_str(),
            since: format_time(self.since),
            detected_at: format_time(self.detected_at),
            devices: self.devices,
            online: self.online,
            offline: self.offline,
            affected: self.affected,
            recovered: self.recovered,
            seq: self.seq,
        };
        serde_json::to_vec(&json).unwrap_or_default()
    }
}

/// `mqtt.group_topic`: a topic with exactly one level that is `{group}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupTopic {
    levels: Vec<String>,
    group_level: usize,
}

/// Why a group topic was refused (the message does not name the config key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadGroupTopic {
    #[error("must contain {GROUP_PLACEHOLDER} exactly once, as one whole level")]
    Group,
    #[error("wildcards (+, #) and NUL are not allowed in a topic")]
    Character,
}

impl GroupTopic {
    pub fn parse(template: &str) -> Result<GroupTopic, BadGroupTopic> {
        let levels: Vec<String> = template.split('/').map(str::to_owned).collect();
        let mut group_level = None;
        for (i, level) in levels.iter().enumerate() {
            if level == GROUP_PLACEHOLDER {
                if group_level.replace(i).is_some() {
                    return Err(BadGroupTopic::Group);
                }
            } else if level.contains(GROUP_PLACEHOLDER) {
                return Err(BadGroupTopic::Group);
            } else if level.contains(['+', '#', '\0']) {
                return Err(BadGroupTopic::Character);
            }
        }
        let group_level = group_level.ok_or(BadGroupTopic::Group)?;
        Ok(GroupTopic {
            levels,
            group_level,
        })
    }

    pub fn render(&self, group: &GroupName) -> String {
        self.render_with(group.as_str())
    }

    /// The subscription filter of every group's topic.
    pub fn filter(&self) -> String {
        self.render_with("+")
    }

    /// The raw group level of a topic that matches the template.
    pub fn extract<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let levels: Vec<&str> = topic.split('/').collect();
        if levels.len() != self.levels.len() {
            return None;
        }
        let fixed = levels
            .iter()
            .zip(&self.levels)
            .enumerate()
            .all(|(i, (got, want))| i == self.group_level || got == want);
        fixed.then(|| levels[self.group_level])
    }

    fn render_with(&self, group: &str) -> String {
        let levels: Vec<&str> = self
            .levels
            .iter()
            .enumerate()
            .map(|(i, l)| if i == self.group_level { group } else { l })
            .collect();
        levels.join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_round_trip_and_json() {
        let m = "o6|site|7|2|0|1000|1400|100|95|5|60|55";
        let s = GroupStatus::parse_member(m).unwrap();
        assert_eq!(s.group.as_str(), "site|7");
        assert_eq!(
            (s.state, s.seq, s.affected, s.recovered),
            (GroupState::Ok, 2, 60, 55)
        );
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["state"], "ok");
        assert_eq!(v["since"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["devices"], 100);
        assert_eq!(v["seq"], 2);
        assert_eq!(s.member(), m);
        assert_eq!(GroupStatus::from_json(&s.to_json()), Some(s.clone()));
        assert_eq!(GroupStatus::from_json(b"{}"), None);
        assert!(GroupStatus::parse_member("1|1|1|1|1|d").is_none());
        assert!(GroupStatus::parse_member("o6|site|7|2|0|1000|1400|100|95|5|60").is_none());
        assert!(GroupStatus::parse_member("o6|site|7|2|3|1000|1400|100|95|5|60|55").is_none());
    }

    #[test]
    fn group_topics() {
        let t = GroupTopic::parse("groups/{group}/status").unwrap();
        assert_eq!(
            t.render(&GroupName::parse("s7").unwrap()),
            "groups/s7/status"
        );
        assert_eq!(t.filter(), "groups/+/status");
        assert_eq!(t.extract("groups/s7/status"), Some("s7"));
        assert_eq!(t.extract("groups/s7/other"), None);
        assert_eq!(t.extract("groups/s7/status/x"), None);
        for bad in [
            "groups/status",
            "g/{group}/{group}",
            "g/x{group}",
            "g/+/{group}",
        ] {
            assert!(GroupTopic::parse(bad).is_err(), "{bad}");
        }
    }
}
