//! The event log behind `/events`, as values: what it keeps ([`EventLog`]), where an entry
//! sits in it (`StreamId`) and where a reader is in the whole log (`Position`, the
//! events' `id`). Pure: the log is written by the transition scripts (`store`) and read by
//! the HTTP event stream.
//!
//! The log is one Redis stream per bucket (a device's transitions are committed in its
//! bucket's scripts, so its events are in its bucket's stream in seq order). There is no
//! fleet-wide order to keep: a reader's place is one `StreamId` per bucket, and an event's
//! `id` is that whole place, so a client can resume at any replica.

mod position;
mod retention;

pub use position::id_at;
pub(crate) use position::{Position, StreamId};
pub use retention::EventLog;
