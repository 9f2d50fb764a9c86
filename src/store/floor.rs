//! Clock sync and replica floors (src/lua/clock.lua).
//!
//! Owns [`Floor`] and [`Store::sync_clock`]: each bucket's master time, measured into the
//! [`crate::clock::Clock`], and this replica's floor written or removed. Must not decide
//! when to sync (the stamper does) nor what a floor holds back (the scripts do).

use redis::Value;

use super::batch::{all_buckets, Partial};
use super::error::StoreError;
use super::handle::Store;
use super::keys::Key;
use super::reply::text;
use crate::bucket::Bucket;
use crate::device::{now_ms, Millis};

/// What [`Store::sync_clock`] records of this replica.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Floor<'a> {
    /// Nothing: this replica sees every heartbeat itself (no shared subscription).
    None,
    /// This replica (by name) has applied every heartbeat received before this local time.
    At(&'a str, Millis),
    /// This replica stops: its floor is removed.
    Leave(&'a str),
}

impl Store {
    /// Reads every bucket's master clock (one round trip) and, with `floor`, records this
    /// replica's floor (a local time: every heartbeat it received before it is applied) in
    /// every bucket, or removes it (`Floor::Leave`). Returns the buckets that failed.
    pub(crate) async fn sync_clock(&self, floor: Floor<'_>) -> Partial<()> {
        let buckets = all_buckets();
        let cmds = buckets
            .iter()
            .map(|&b| {
                let args = self.floor_args(b, floor);
                self.scripts
                    .clock
                    .cmd(&[self.keys.of(b, Key::Floors)], args)
            })
            .collect();
        let sent = now_ms();
        let replies = self.exec(cmds).await;
        let received = now_ms();
        Partial::of_replies(buckets, replies, |b, reply| {
            let master = master_time(&reply)?;
            self.clock.observe(b, sent, received, master);
            Ok(vec![()])
        })
    }

    /// clock.lua's arguments: who, and the floor (in the master's time), `-` to remove it.
    fn floor_args(&self, b: Bucket, floor: Floor<'_>) -> Vec<String> {
        match floor {
            Floor::None => vec![String::new(), String::new()],
            Floor::At(who, at) => vec![who.to_owned(), self.clock.to_master(b, at).to_string()],
            Floor::Leave(who) => vec![who.to_owned(), "-".to_owned()],
        }
    }
}

/// clock.lua's reply: the master's time.
fn master_time(reply: &Value) -> Result<Millis, StoreError> {
    text(reply)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| StoreError::Protocol("TIME reply not a number".to_owned()))
}
