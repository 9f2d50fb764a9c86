//! Applying heartbeats (src/lua/heartbeat.lua).
//!
//! Owns the arguments of a heartbeat call and the reading of its reply (the online
//! transitions, or a lost bucket). Must not decide a transition: the script does.

use redis::{Cmd, Value};

use super::batch::Partial;
use super::error::StoreError;
use super::handle::Store;
use super::keys::APPLY_KEYS;
use super::outbox::lease_ms;
use super::reply::{members, Committed};
use crate::beat::{Beat, Timing};
use crate::bucket::{bucket_of, Bucket};

impl Store {
    /// Applies heartbeats (any buckets) in one round trip; returns the online transitions.
    pub async fn apply_heartbeats(
        &self,
        beats: &[Beat],
        floor_lease_ms: u64,
    ) -> Partial<Committed> {
        self.per_bucket(
            beats,
            |beat| bucket_of(beat.device.as_str()),
            |b, beats| self.heartbeat_cmd(b, beats, floor_lease_ms),
            |b, reply| self.applied(b, reply),
        )
        .await
    }

    /// The call of heartbeat.lua for bucket `b`: its settings, then nine fields per beat
    /// (every time as the bucket's master reads it).
    fn heartbeat_cmd(&self, b: Bucket, beats: &[&Beat], floor_lease_ms: u64) -> Cmd {
        let mut args = vec![
            self.keys.ttl_prefix(b),
            lease_ms().to_string(),
            floor_lease_ms.to_string(),
            self.replica.to_string(),
            self.flap.arg(),
            self.events.arg(),
        ];
        let t = |local| self.clock.to_master(b, local).to_string();
        for beat in beats {
            let (from, to) = beat
                .lapse
                .map_or(("0".into(), "0".into()), |(from, to)| (t(from), t(to)));
            let on_time = if beat.timing == Timing::OnTime {
                "1"
            } else {
                "0"
            };
            args.extend([
                beat.device.to_string(),
                t(beat.first),
                t(beat.arrival),
                t(beat.deadline),
                from,
                to,
                on_time.into(),
                beat.group
                    .as_ref()
                    .map_or_else(String::new, |g| g.to_string()),
                beat.session.map_or_else(String::new, |s| s.to_string()),
            ]);
        }
        let keys = self.keys.script(b, &APPLY_KEYS);
        self.scripts.heartbeat.cmd(&keys, args)
    }

    /// The online transitions heartbeat.lua committed in bucket `b`; `LOST` (the bucket has
    /// no epoch key) is reported to the rebuilder.
    pub(super) fn applied(&self, b: Bucket, reply: Value) -> Result<Vec<Committed>, StoreError> {
        if matches!(&reply, Value::SimpleString(s) if s == "LOST") {
            self.loss.report();
            return Err(StoreError::Lost(b));
        }
        members(b, reply)
    }
}
