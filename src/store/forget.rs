//! Forgetting devices offline for long (src/lua/forget.lua), and the offline-since index it
//! reads (src/lua/offsince.lua).
//!
//! Owns [`Forgot`], the arguments of both scripts and the reading of their replies. Must
//! not decide which device is forgotten: forget.lua does.

use std::time::Duration;

use redis::Value;

use super::batch::Partial;
use super::error::StoreError;
use super::expire::Cutoff;
use super::handle::Store;
use super::keys::{Key, FORGET_KEYS};
use super::list::zcard;
use super::reply::{decode, Committed, Fields};
use crate::bucket::Bucket;
use crate::device::State;

/// What a forget call on one bucket did.
#[derive(Debug)]
pub(crate) struct Forgot {
    pub bucket: Bucket,
    /// The call hit its limit: more devices may be due.
    pub more: bool,
    /// One clear (seq 0, see [`crate::device::StatusEvent::is_clear`]) per device forgotten.
    pub cleared: Vec<Committed>,
}

impl Forgot {
    /// Reads forget.lua's reply: whether more are due, then the clears staged.
    fn parse(b: Bucket, reply: &Value) -> Result<Forgot, StoreError> {
        let mut fields = Fields::of(reply, "forget")?;
        Ok(Forgot {
            bucket: b,
            more: fields.flag(),
            cleared: fields.members(b)?,
        })
    }
}

impl Store {
    /// Forgets up to `limit` devices per bucket that have been offline for at least `after`
    /// by `cutoff`, in the given buckets, in one round trip; each clear is staged in the
    /// outbox (see src/lua/forget.lua).
    pub(crate) async fn forget(
        &self,
        buckets: &[Bucket],
        cutoff: Cutoff,
        after: Duration,
        limit: usize,
    ) -> Partial<Forgot> {
        let after = (after.as_millis() as u64).to_string();
        self.each_bucket(
            buckets,
            |b| {
                let mut args = self.expire_args(b, cutoff, limit);
                args.push(after.clone());
                self.scripts
                    .forget
                    .cmd(&self.keys.script(b, &FORGET_KEYS), args)
            },
            |b, reply| Ok(vec![Forgot::parse(b, &reply)?]),
        )
        .await
    }

    /// Whether bucket `b`'s offline index has more entries than its offline-since index
    /// (devices that went offline before the latter existed).
    pub(crate) async fn offsince_behind(&self, b: Bucket) -> Result<bool, StoreError> {
        let cmds = vec![
            zcard(self.keys.index(b, State::Offline)),
            zcard(self.keys.of(b, Key::OfflineSince)),
        ];
        let cards: Vec<i64> = decode(self.exec(cmds).await.all()?)?;
        Ok(cards.first() > cards.get(1))
    }

    /// Indexes by `since` the offline devices of bucket `b` after `after` (id order, at
    /// most `limit`) that the offline-since index lacks (see src/lua/offsince.lua). Returns
    /// the last id looked at, `None` at the end of the bucket.
    pub(crate) async fn index_offline(
        &self,
        b: Bucket,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<String>, StoreError> {
        let ids: Vec<String> = self
            .index_range(b, State::Offline, after, limit)
            .query_async(&mut self.conn.clone())
            .await?;
        if ids.is_empty() {
            return Ok(None);
        }
        let keys = self.keys.script(b, &[Key::Records, Key::OfflineSince]);
        let cmd = self.scripts.offsince.cmd(&keys, ids.clone());
        self.exec(vec![cmd]).await.all()?;
        Ok((ids.len() >= limit).then(|| ids.last().cloned()).flatten())
    }
}
