//! Expiring devices (src/lua/expire.lua): given ids, or a sweep of the earliest overdue.
//!
//! Owns [`Cutoff`], [`Swept`], the arguments of an expire call (shared with forget.lua) and
//! the reading of its reply. Must not decide a transition: the script does.

use redis::Value;

use super::batch::Partial;
use super::error::StoreError;
use super::handle::Store;
use super::keys::SWEEP_KEYS;
use super::outbox::lease_ms;
use super::reply::{Committed, Fields};
use crate::bucket::{bucket_of, Bucket};
use crate::device::{DeviceId, Millis};

/// The latest deadline an expiry may be decided for (a local time; Redis takes the lowest
/// of it, its own clock and the live replicas' floors).
#[derive(Clone, Copy, Debug)]
pub struct Cutoff {
    pub before: Millis,
    /// How long a replica's floor stands without being renewed.
    pub floor_lease_ms: u64,
}

/// What a sweep of one bucket found.
#[derive(Debug)]
pub(crate) struct Swept {
    pub bucket: Bucket,
    pub next_deadline: Option<Millis>,
    /// The sweep hit its limit: more devices may be overdue.
    pub more: bool,
    /// The cutoff Redis used (lowered by other replicas' floors).
    pub cutoff: Millis,
    pub committed: Vec<Committed>,
}

impl Swept {
    /// Reads expire.lua's reply: the next deadline (negative: none), whether more are
    /// overdue, the cutoff used, then the committed offline transitions.
    fn parse(b: Bucket, reply: &Value) -> Result<Swept, StoreError> {
        let mut fields = Fields::of(reply, "expire")?;
        let next_deadline = fields
            .text()
            .parse::<f64>()
            .ok()
            .filter(|d| *d >= 0.0)
            .map(|d| d as Millis);
        let more = fields.flag();
        let cutoff = fields.text().parse::<Millis>().unwrap_or(0);
        Ok(Swept {
            bucket: b,
            next_deadline,
            more,
            cutoff,
            committed: fields.members(b)?,
        })
    }
}

impl Store {
    /// Marks the given devices offline if their deadline is at or before `cutoff`.
    pub async fn expire_devices(&self, ids: &[DeviceId], cutoff: Cutoff) -> Partial<Committed> {
        self.per_bucket(
            ids,
            |id| bucket_of(id.as_str()),
            |b, ids| {
                let mut args = self.expire_args(b, cutoff, ids.len());
                args.push(self.events.arg());
                args.extend(ids.iter().map(|id| id.to_string()));
                self.scripts
                    .expire
                    .cmd(&self.keys.script(b, &SWEEP_KEYS), args)
            },
            |b, reply| Ok(Swept::parse(b, &reply)?.committed),
        )
        .await
    }

    /// Marks offline up to `limit` devices per bucket whose deadline is at or before
    /// `cutoff`, in the given buckets, in one round trip.
    pub(crate) async fn sweep(
        &self,
        buckets: &[Bucket],
        cutoff: Cutoff,
        limit: usize,
    ) -> Partial<Swept> {
        self.each_bucket(
            buckets,
            |b| {
                let mut args = self.expire_args(b, cutoff, limit);
                args.push(self.events.arg());
                self.scripts
                    .expire
                    .cmd(&self.keys.script(b, &SWEEP_KEYS), args)
            },
            |b, reply| {
                let mut swept = Swept::parse(b, &reply)?;
                swept.next_deadline = swept.next_deadline.map(|d| self.clock.to_local(b, d));
                swept.cutoff = self.clock.to_local(b, swept.cutoff);
                Ok(vec![swept])
            },
        )
        .await
    }

    /// The arguments expire.lua and forget.lua begin with (seven; expire.lua's eighth is the
    /// event log rule).
    pub(crate) fn expire_args(&self, b: Bucket, cutoff: Cutoff, limit: usize) -> Vec<String> {
        vec![
            self.keys.ttl_prefix(b),
            self.clock.to_master(b, cutoff.before).to_string(),
            lease_ms().to_string(),
            limit.max(1).to_string(),
            cutoff.floor_lease_ms.to_string(),
            self.replica.to_string(),
            self.flap.arg(),
        ]
    }
}
