//! Group outages (src/lua/note.lua): device transitions noted in their groups, and the
//! outage states read back for `/groups` and the metrics.
//!
//! A group's outage keys live in the bucket of its *name* (`bucket_of(group)`), so one call of
//! note.lua sees and decides everything of the group atomically, on one master. Owns
//! [`Note`], [`OutageRule`], [`GroupOutage`]. Must not publish: it returns what was staged.

use std::collections::{BTreeMap, HashMap};

use super::batch::Partial;
use super::error::StoreError;
use super::groups::GroupCounts;
use super::handle::Store;
use super::keys::Key;
use super::outbox::lease_ms;
use super::reply::{decode, members, Committed};
use redis::Value;

use crate::bucket::{bucket_of, Bucket, BUCKETS};
use crate::config::GroupsConfig;
use crate::device::{DeviceId, GroupName, Millis, State};
use crate::group_status::{GroupState, GroupStatus};

/// What a device status tells its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Noted {
    Went(State),
    /// The device was forgotten (its clear).
    Forgotten,
    /// The device came back online in another group: back, as far as this one is concerned.
    Left,
}

/// Whether notes may decide openings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoteMode {
    /// Transitions as they happen: they open and close outages.
    Decide,
    /// The rebuild's notes of imported offline devices: they make up an open outage's
    /// figures and open nothing (their burst is history).
    Quiet,
}

impl NoteMode {
    fn as_str(self) -> &'static str {
        match self {
            NoteMode::Decide => "decide",
            NoteMode::Quiet => "quiet",
        }
    }
}

/// One device transition to note in its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Note {
    pub group: GroupName,
    pub device: DeviceId,
    pub seq: u64,
    pub noted: Noted,
    pub since: Millis,
}

/// The outage rule (`groups.*`), as note.lua takes it.
#[derive(Clone, Debug)]
pub(crate) struct OutageRule {
    min_devices: u64,
    fraction: f64,
    window_ms: u64,
    recovery: f64,
}

impl OutageRule {
    pub(crate) fn new(cfg: &GroupsConfig) -> OutageRule {
        OutageRule {
            min_devices: cfg.outage_min_devices,
            fraction: cfg.outage_fraction,
            window_ms: cfg.outage_window.as_millis() as u64,
            recovery: cfg.recovery_fraction,
        }
    }
}

/// A group's outage state as kept in Redis: its latest status, and while in an outage the
/// live figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupOutage {
    pub latest: GroupStatus,
    pub affected: i64,
    pub recovered: i64,
}

impl GroupOutage {
    /// `from|affected|recovered|member` (see src/lua/common.lua).
    fn parse(raw: &str) -> Option<GroupOutage> {
        let mut parts = raw.splitn(4, '|');
        let _from = parts.next()?;
        let affected = parts.next()?.parse().ok()?;
        let recovered = parts.next()?.parse().ok()?;
        let latest = GroupStatus::parse_member(parts.next()?)?;
        Some(GroupOutage {
            latest,
            affected,
            recovered,
        })
    }

    pub fn in_outage(&self) -> bool {
        self.latest.state == GroupState::Outage
    }
}

impl Store {
    /// The fleet-wide counts of `groups`: one `HMGET` per bucket, in one round trip.
    pub(crate) async fn group_totals(
        &self,
        groups: &[GroupName],
    ) -> Result<HashMap<GroupName, GroupCounts>, StoreError> {
        let mut totals: HashMap<GroupName, GroupCounts> = HashMap::new();
        if groups.is_empty() {
            return Ok(totals);
        }
        // With each bucket's epoch key: a bucket that lost its data (or is being imported)
        // would count its devices as none, and a group would look smaller than it is.
        let cmds = (0..BUCKETS)
            .flat_map(|b| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(self.keys.of(b, Key::GroupCounts));
                for g in groups {
                    cmd.arg(format!("1|{g}")).arg(format!("0|{g}"));
                }
                let mut epoch = redis::cmd("EXISTS");
                epoch.arg(self.keys.of(b, Key::Epoch));
                [cmd, epoch]
            })
            .collect();
        let replies = self.exec(cmds).await.all()?;
        for (b, pair) in (0..BUCKETS).zip(replies.chunks(2)) {
            if pair.get(1) != Some(&Value::Int(1)) {
                self.loss.report();
                return Err(StoreError::Lost(b));
            }
            let reply: Vec<Option<i64>> = decode(pair[..1].to_vec())?.pop().unwrap_or_default();
            for (g, pair) in groups.iter().zip(reply.chunks(2)) {
                let t = totals.entry(g.clone()).or_default();
                t.online += pair.first().copied().flatten().unwrap_or(0);
                t.offline += pair.get(1).copied().flatten().unwrap_or(0);
            }
        }
        Ok(totals)
    }

    /// Notes transitions in their groups (each group's bucket in one call); returns the
    /// outage openings and closings this call staged.
    pub(crate) async fn note(
        &self,
        notes: &[Note],
        totals: &HashMap<GroupName, GroupCounts>,
        rule: &OutageRule,
        mode: NoteMode,
    ) -> Partial<Committed> {
        self.per_bucket(
            notes,
            |n| bucket_of(n.group.as_str()),
            |b, notes| {
                let mut args = vec![
                    format!("{}:", self.keys.of(b, Key::GroupOutages)),
                    lease_ms().to_string(),
                    rule.min_devices.to_string(),
                    rule.fraction.to_string(),
                    rule.window_ms.to_string(),
                    rule.recovery.to_string(),
                    mode.as_str().to_owned(),
                    self.events.arg(),
                ];
                for n in notes {
                    let t = totals.get(&n.group).copied().unwrap_or_default();
                    let state = match n.noted {
                        Noted::Went(s) => s.flag(),
                        Noted::Forgotten => "x",
                        Noted::Left => "m",
                    };
                    args.extend([
                        n.group.to_string(),
                        t.devices().to_string(),
                        t.online.to_string(),
                        t.offline.to_string(),
                        n.device.to_string(),
                        n.seq.to_string(),
                        state.to_owned(),
                        n.since.to_string(),
                    ]);
                }
                let keys = self
                    .keys
                    .script(b, &[Key::GroupStates, Key::Outbox, Key::Epoch, Key::Events]);
                self.scripts.note.cmd(&keys, args)
            },
            |b, reply| self.noted(b, reply),
        )
        .await
    }

    /// The group statuses note.lua staged in bucket `b`; `LOST` (the bucket has no epoch
    /// key: Redis lost the group states, the rebuild brings them back) is reported to the
    /// rebuilder, and the notes wait.
    fn noted(&self, b: Bucket, reply: Value) -> Result<Vec<Committed>, StoreError> {
        if matches!(&reply, Value::SimpleString(s) if s == "LOST") {
            self.loss.report();
            return Err(StoreError::Lost(b));
        }
        members(b, reply)
    }

    /// Gives the groups of the `lost` buckets their latest retained status back where Redis
    /// has none or an older one (import_groups.lua): an outage open then is open again, its
    /// window starting a window before its `since`. Returns how many were written.
    pub(crate) async fn import_groups(
        &self,
        statuses: &[GroupStatus],
        lost: &[Bucket],
        rule: &OutageRule,
    ) -> Result<u64, StoreError> {
        let mine: Vec<&GroupStatus> = statuses
            .iter()
            .filter(|s| lost.contains(&bucket_of(s.group.as_str())))
            .collect();
        let written = self
            .per_bucket(
                &mine,
                |s| bucket_of(s.group.as_str()),
                |b, statuses| {
                    let mut args = Vec::with_capacity(statuses.len() * 5);
                    for s in statuses {
                        let from = s.since.saturating_sub(rule.window_ms);
                        args.extend([
                            s.group.to_string(),
                            s.member(),
                            from.to_string(),
                            s.affected.to_string(),
                            s.recovered.to_string(),
                        ]);
                    }
                    let keys = self.keys.script(b, &[Key::GroupStates]);
                    self.scripts.import_groups.cmd(&keys, args)
                },
                |_, reply| match reply {
                    Value::Int(n) => Ok(vec![n.max(0) as u64]),
                    other => Err(StoreError::Protocol(format!(
                        "unexpected reply from the group import: {other:?}"
                    ))),
                },
            )
            .await;
        let n = written.done.iter().sum();
        written.into_result().map(|_| n)
    }

    /// Every group's outage state (groups never in an outage have none).
    pub(crate) async fn group_outages(
        &self,
    ) -> Result<BTreeMap<GroupName, GroupOutage>, StoreError> {
        let cmds = (0..BUCKETS)
            .map(|b| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(self.keys.of(b, Key::GroupStates));
                cmd
            })
            .collect();
        let hashes: Vec<Vec<(String, String)>> = decode(self.exec(cmds).await.all()?)?;
        Ok(hashes
            .into_iter()
            .flatten()
            .filter_map(|(g, raw)| Some((GroupName::parse(&g).ok()?, GroupOutage::parse(&raw)?)))
            .collect())
    }

    /// One group's outage state.
    pub(crate) async fn group_outage(
        &self,
        group: &GroupName,
    ) -> Result<Option<GroupOutage>, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.keys.of(bucket_of(group.as_str()), Key::GroupStates))
            .arg(group.as_str());
        let raw: Option<String> = cmd.query_async(&mut self.conn.clone()).await?;
        Ok(raw.as_deref().and_then(GroupOutage::parse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_state_parses() {
        let o = GroupOutage::parse("900|60|5|o2|g7|1|1|1000|1400|100|40|60|60|0").unwrap();
        assert!(o.in_outage());
        assert_eq!((o.affected, o.recovered, o.latest.seq), (60, 5, 1));
        assert!(GroupOutage::parse("900|60|o2|g7|1|1|1000|1400|100|40|60|60|0").is_none());
    }
}
