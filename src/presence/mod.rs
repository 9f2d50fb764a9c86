//! Where transitions are decided and handed on to the publisher. Nothing here holds device
//! state in memory beyond the held heartbeats (`crate::held`): Redis holds it, and every
//! decision is one Lua script on one bucket (ARCHITECTURE.md, *Redis key layout*). Nothing
//! here speaks MQTT.
//!
//! Who decides what:
//! * `Applier` (`applier`): applies held heartbeats in batches (one pipelined round trip per
//!   batch, however many devices) and hands the online transitions (and the offline periods
//!   that late heartbeats end) to the publisher.
//! * `Expirer` (`expirer`, its Redis calls in `sweep`): decides offline transitions: on
//!   `expired` events (fast path), at each bucket's next deadline (`DueTable` in `due`, so a
//!   lazy Redis never delays us), by reconciliation after every gap in listening, and by a
//!   periodic safety-net pass.
//! * The forgetter (`crate::forget`) decides the clears of long-offline devices.
//!
//! What keeps those decisions right:
//! * `gate`: no expiry (nor forgetting) while heartbeats may still be on their way (the sync
//!   marker, the watermark, stalls).
//! * `Stamper` (`stamper`): the clock offsets to the Redis masters, and this replica's floor
//!   (what it holds, for the other replicas' sweeps).
//! * `CommitOrder` (`order`): one committer at a time, so that the status queue holds a
//!   device's seqs in commit order.
//!
//! After the decision: `handoff` puts committed transitions into the status queue, and the
//! `Outbox` (`outbox`) records the broker's acknowledgements, publishes the current status
//! again where an older one may have overwritten it, claims transitions whose publisher
//! died, and republishes every status after the broker lost its state.
//!
//! This file only declares the parts. They import one another (never this file), in one
//! direction: `expirer` uses `sweep`; `applier`, `sweep` and `outbox` use `handoff`;
//! `expirer`, `sweep` and `stamper` use `gate`; `expirer` and `sweep` use `stamper`'s floor
//! period. `crate::forget` uses `gate`, `handoff` and `order` too.

pub(crate) mod applier;
pub(crate) mod due;
pub(crate) mod expirer;
pub(crate) mod gate;
pub(crate) mod groups;
pub(crate) mod handoff;
pub(crate) mod order;
pub(crate) mod outbox;
pub(crate) mod stamper;
pub(crate) mod sweep;

pub(crate) use applier::Applier;
pub(crate) use due::DueTable;
pub(crate) use expirer::Expirer;
pub(crate) use gate::Backlog;
pub(crate) use groups::GroupNotes;
pub(crate) use handoff::Committer;
pub(crate) use order::CommitOrder;
pub(crate) use outbox::Outbox;
pub(crate) use stamper::Stamper;
