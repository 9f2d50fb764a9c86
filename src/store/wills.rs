//! Applying device wills (src/lua/will.lua).
//!
//! Owns [`WillsApplied`], the arguments of a will call and the reading of its reply. Must
//! not decide a transition: the script does.

use redis::Value;

use super::batch::Partial;
use super::error::StoreError;
use super::handle::Store;
use super::keys::APPLY_KEYS;
use super::outbox::lease_ms;
use super::reply::{Committed, Fields};
use crate::bucket::{bucket_of, Bucket};
use crate::will::Will;

/// What a will call on one bucket did.
#[derive(Debug, Default)]
pub struct WillsApplied {
    /// Wills that took their device offline.
    pub applied: u64,
    /// Wills older than the device's latest heartbeat (by arrival or session).
    pub stale: u64,
    /// Wills of devices that were not online.
    pub ignored: u64,
    /// The offline transitions committed.
    pub committed: Vec<Committed>,
}

impl WillsApplied {
    /// Reads will.lua's reply: the three counts, then the committed transitions; `LOST`
    /// (the bucket has no epoch key) is an error.
    fn parse(b: Bucket, reply: &Value) -> Result<WillsApplied, StoreError> {
        if matches!(reply, Value::SimpleString(s) if s == "LOST") {
            return Err(StoreError::Lost(b));
        }
        let mut fields = Fields::of(reply, "will")?;
        let mut n = || fields.text().parse::<u64>().unwrap_or(0);
        let (applied, stale, ignored) = (n(), n(), n());
        Ok(WillsApplied {
            applied,
            stale,
            ignored,
            committed: fields.members(b)?,
        })
    }
}

impl Store {
    /// Applies wills (any buckets) in one round trip: one result per bucket that answered.
    pub async fn apply_wills(&self, wills: &[Will]) -> Partial<WillsApplied> {
        self.per_bucket(
            wills,
            |w| bucket_of(w.device.as_str()),
            |b, wills| {
                let mut args = vec![
                    self.keys.ttl_prefix(b),
                    lease_ms().to_string(),
                    self.flap.arg(),
                    self.events.arg(),
                ];
                for w in wills {
                    args.extend([
                        w.device.to_string(),
                        self.clock.to_master(b, w.arrival).to_string(),
                        w.session.map_or_else(String::new, |s| s.to_string()),
                    ]);
                }
                let keys = self.keys.script(b, &APPLY_KEYS);
                self.scripts.will.cmd(&keys, args)
            },
            |b, reply| {
                let parsed = WillsApplied::parse(b, &reply);
                if matches!(parsed, Err(StoreError::Lost(_))) {
                    self.loss.report();
                }
                Ok(vec![parsed?])
            },
        )
        .await
    }
}
