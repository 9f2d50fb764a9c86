//! The outbox: committed transitions until the broker acknowledges them (src/lua/ack.lua),
//! claims of entries whose publisher died (src/lua/claim.lua), and republishing every
//! device's status (src/lua/republish.lua).
//!
//! Owns [`OUTBOX_LEASE`] and the arguments of those scripts. Must not publish anything: it
//! hands the statuses to publish back to the caller.

use std::time::Duration;

use redis::{Cmd, Value};

use super::batch::{all_buckets, Partial};
use super::error::StoreError;
use super::handle::Store;
use super::keys::Key;
use super::reply::{members, Committed};
use crate::bucket::Bucket;
use crate::device::Millis;
use crate::status::{Delivered, Subject};

/// How long a committed transition may wait for the broker's acknowledgement before any
/// replica may claim and publish it again.
pub const OUTBOX_LEASE: Duration = Duration::from_secs(10);

/// [`OUTBOX_LEASE`] in ms, as the scripts take it.
pub(crate) fn lease_ms() -> u64 {
    OUTBOX_LEASE.as_millis() as u64
}

/// What a call of republish.lua does.
#[derive(Clone, Copy)]
enum Republish {
    /// Begin a job in the bucket (unless one began lately).
    Start,
    /// Stage one page of the bucket's job, for its owner.
    Page,
}

impl Republish {
    fn as_str(self) -> &'static str {
        match self {
            Republish::Start => "start",
            Republish::Page => "page",
        }
    }
}

impl Store {
    /// Records acknowledgements; returns statuses that must be published again because the
    /// device moved on while an older status was in flight (see src/lua/ack.lua).
    pub async fn ack(&self, acks: &[Delivered]) -> Partial<Committed> {
        self.per_bucket(
            acks,
            |ack| ack.receipt.bucket,
            |b, acks| {
                let mut args = vec![lease_ms().to_string()];
                for ack in acks {
                    args.push(ack.receipt.member.clone());
                    // A group status names its group (ack.lua tells them apart by the member).
                    args.push(match &ack.subject {
                        Subject::Device(id) => id.to_string(),
                        Subject::Group(g) => g.to_string(),
                    });
                    args.push(ack.seq.to_string());
                }
                let keys = self
                    .keys
                    .script(b, &[Key::Records, Key::Outbox, Key::GroupStates]);
                self.scripts.ack.cmd(&keys, args)
            },
            members,
        )
        .await
    }

    /// Claims outbox entries whose lease has ended (their publisher died or is stuck), at
    /// most `limit` per bucket.
    /// `until`: also claim leases ending up to this local time (at a start: everything leased
    /// before this process could lease anything); `None`: those ended by now.
    pub async fn claim_outbox(&self, until: Option<Millis>, limit: usize) -> Partial<Committed> {
        self.each_bucket(
            &all_buckets(),
            |b| {
                let until = until.map_or(String::new(), |t| self.clock.to_master(b, t).to_string());
                let args = vec![lease_ms().to_string(), limit.to_string(), until];
                self.scripts
                    .claim
                    .cmd(&[self.keys.of(b, Key::Outbox)], args)
            },
            members,
        )
        .await
    }

    /// Begins republishing every device's status (see src/lua/republish.lua), unless a job
    /// began in the last 10 s; returns whether this call began it (in any bucket).
    pub(crate) async fn start_republish(&self) -> Result<bool, StoreError> {
        let began = self
            .each_bucket(
                &all_buckets(),
                |b| self.republish_cmd(b, Republish::Start, "", 0),
                |_, reply| Ok(vec![matches!(reply, Value::Int(1))]),
            )
            .await
            .into_result()?;
        Ok(began.into_iter().any(|b| b))
    }

    /// One page (about `count` devices) of every bucket's republish job that no other
    /// replica holds; the statuses are staged in the outbox and returned.
    pub(crate) async fn republish_page(&self, owner: &str, count: usize) -> Partial<Committed> {
        self.each_bucket(
            &all_buckets(),
            |b| self.republish_cmd(b, Republish::Page, owner, count),
            members,
        )
        .await
    }

    fn republish_cmd(&self, b: Bucket, mode: Republish, owner: &str, count: usize) -> Cmd {
        let keys = self.keys.script(
            b,
            &[
                Key::Records,
                Key::Outbox,
                Key::RepublishJob,
                Key::GroupStates,
            ],
        );
        let args = vec![
            mode.as_str().to_owned(),
            owner.to_owned(),
            count.max(1).to_string(),
            lease_ms().to_string(),
            lease_ms().to_string(),
        ];
        self.scripts.republish.cmd(&keys, args)
    }
}
