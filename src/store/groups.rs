//! Reading the per-group device counts (`P:{b}:groups`, kept by the scripts that change a
//! device's state or group, in the same step).
//!
//! Owns [`GroupCounts`] and the reads behind `/groups`, `/groups/{group}` and the group
//! metrics. Must not write anything.

use std::collections::BTreeMap;

use super::error::StoreError;
use super::handle::Store;
use super::keys::Key;
use super::reply::decode;
use crate::bucket::BUCKETS;
use crate::device::{GroupName, State};

/// A group's devices, fleet-wide: the sum over the buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCounts {
    pub online: i64,
    pub offline: i64,
}

impl GroupCounts {
    pub fn devices(&self) -> i64 {
        self.online + self.offline
    }

    fn add(&mut self, state: State, n: i64) {
        match state {
            State::Online => self.online += n,
            State::Offline => self.offline += n,
        }
    }
}

/// A field of a bucket's group counts: `<state flag>|<group>`.
fn parse_field(field: &str) -> Option<(State, GroupName)> {
    let (flag, group) = field.split_once('|')?;
    let state = match flag {
        "1" => State::Online,
        "0" => State::Offline,
        _ => return None,
    };
    Some((state, GroupName::parse(group).ok()?))
}

impl Store {
    /// Every group with devices and its counts, in group-name (byte) order. One `HGETALL`
    /// per bucket in one round trip: the counts of all groups together are at most two
    /// fields per group and bucket that has devices of it.
    pub(crate) async fn groups(&self) -> Result<BTreeMap<GroupName, GroupCounts>, StoreError> {
        let cmds = (0..BUCKETS)
            .map(|b| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(self.keys.of(b, Key::GroupCounts));
                cmd
            })
            .collect();
        let hashes: Vec<Vec<(String, i64)>> = decode(self.exec(cmds).await.all()?)?;
        let mut out: BTreeMap<GroupName, GroupCounts> = BTreeMap::new();
        for (field, n) in hashes.into_iter().flatten() {
            if let Some((state, group)) = parse_field(&field) {
                out.entry(group).or_default().add(state, n);
            }
        }
        out.retain(|_, c| c.devices() > 0);
        Ok(out)
    }

    /// One group's counts (zero for a group without devices).
    pub(crate) async fn group(&self, group: &GroupName) -> Result<GroupCounts, StoreError> {
        let cmds = (0..BUCKETS)
            .map(|b| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(self.keys.of(b, Key::GroupCounts))
                    .arg(format!("1|{group}"))
                    .arg(format!("0|{group}"));
                cmd
            })
            .collect();
        let pairs: Vec<Vec<Option<i64>>> = decode(self.exec(cmds).await.all()?)?;
        let mut counts = GroupCounts::default();
        for pair in pairs {
            counts.add(State::Online, pair.first().copied().flatten().unwrap_or(0));
            counts.add(State::Offline, pair.get(1).copied().flatten().unwrap_or(0));
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_a_state_and_a_group() {
        let (state, group) = parse_field("1|site|7").unwrap();
        assert_eq!((state, group.as_str()), (State::Online, "site|7"));
        assert_eq!(parse_field("0|a").unwrap().0, State::Offline);
        assert!(parse_field("2|a").is_none());
        assert!(parse_field("1|").is_none());
        assert!(parse_field("1").is_none());
    }
}
