//! Everything the monitor keeps in Redis, and the only module besides `expiry` that
//! speaks Redis. Must not know MQTT.
//!
//! Key layout (prefix `P`, bucket `b` = FNV-1a of the device id mod [`BUCKETS`]; `{b}` is a
//! hash tag, so every key of a bucket lives in one Redis Cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{b}:ttl:<id>` | string, with TTL | the heartbeat TTL key; its `expired` event is the fast path |
//! | `P:{b}:rec` | hash id → record | `[p<penalty>,<at>,<until>\|][w\|]state\|seq\|since\|last_seen\|detected_at[\|group]` (flap state, will mark): what is needed at expiry lives here, not in the TTL key |
//! | `P:{b}:deadline` | zset id → deadline ms | online devices, queryable by time (reconciliation, the deadline sweep) |
//! | `P:{b}:online`, `P:{b}:offline` | zset (lex) | the state index: counts (ZCARD) and paging (ZRANGE BYLEX) |
//! | `P:{b}:outbox` | zset member → lease ms | committed transitions not yet acknowledged by the broker |
//! | `P:{b}:offsince` | zset id → since ms | offline devices by the `since` of their offline status (forgetting) |
//! | `P:{b}:floor` | hash replica → floor | replica floors (clock.lua; read by expire.lua and forget.lua) |
//! | `P:{b}:epoch` | string | present exactly when the bucket's state is in Redis (imported or started empty); gone with a loss |
//! | `P:{b}:importing` | set | tokens of the rebuilds importing into the bucket |
//! | `P:{b}:groups` | hash `<state>\|<group>` → n | the bucket's devices per group and state (fleet-wide: the sum over the buckets) |
//! | `P:{b}:flap`, `P:{b}:flapidx` | zset id → until ms, zset (lex) | flapping devices by when they stop (the fleet gauge counts, no scan), and by id (listing) |
//! | `P:{b}:session` | hash id → session | the session its latest heartbeat named (heartbeat.lua), which fences stale wills (will.lua) |
//! | `P:{b}:republish` | string | the bucket's republish job `cursor\|lease end\|owner\|started` (republish.lua) |
//!
//! Every transition is decided by one Lua script on one bucket (src/lua/*.lua), so exactly one
//! caller, whichever replica it is, commits it, with the next `seq`.
//!
//! The parts: [`Store`] (`handle`) holds what every operation shares; `keys` spells the
//! layout; `connection` carries commands (and replaces a wedged connection); `scripts`
//! loads the Lua; `batch` runs one round trip and sorts its replies by bucket; `reply` reads
//! replies. The operations, one concern each: `heartbeat`, `wills`, `expire`, `forget`, `outbox`,
//! `import`, `floor` (clock sync), `list` (reads), `groups` (group counts), `notify`
//! (keyspace notification setup).
//! This file only declares them; nothing in it is imported by them.

mod batch;
mod connection;
mod error;
mod events;
mod expire;
mod floor;
mod forget;
mod groups;
mod handle;
mod heartbeat;
mod import;
mod keys;
mod list;
mod loss;
mod notes;
mod notify;
mod outbox;
mod reply;
mod scripts;
mod wills;

#[cfg(doc)]
use crate::bucket::BUCKETS;

pub use batch::Partial;
pub use error::StoreError;
pub use expire::Cutoff;
pub use groups::GroupCounts;
pub use handle::Store;
pub use keys::Keys;
pub use list::LIST_BUDGET;
pub use notes::GroupOutage;
pub use outbox::OUTBOX_LEASE;
pub use reply::Committed;
pub use wills::WillsApplied;

pub(crate) use events::{LogEntry, LogFrom, LogRead};
pub(crate) use floor::Floor;
pub(crate) use import::{ImportChunk, Imported};
pub(crate) use list::{FleetCounts, ListFilter};
pub(crate) use notes::{Note, NoteMode, Noted, OutageRule};
pub(crate) use notify::{ensure_notifications, touch, write_probe, Configure, NotifyConfig};
