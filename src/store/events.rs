//! Reading the event log (src/lua/events_read.lua): one bucket's stream after a place.
//!
//! Owns [`LogRead`], [`LogEntry`], [`LogFrom`]. The log is written by the transition scripts
//! (`log_events` in src/lua/common.lua); this only reads it. Must not decide what a hole
//! means: the event stream does.

use redis::Value;

use super::batch::Partial;
use super::error::StoreError;
use super::handle::Store;
use super::keys::Key;
use super::reply::Fields;
use crate::bucket::Bucket;
use crate::event_log::StreamId;
use crate::status::Outbound;

/// Where a read of one bucket's stream begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogFrom {
    /// The entries after this id.
    After(StreamId),
    /// Every entry kept.
    Oldest,
}

/// One entry of a bucket's stream: a committed transition or outage decision.
#[derive(Clone, Debug)]
pub(crate) struct LogEntry {
    pub(crate) id: StreamId,
    /// The stream's last id before this entry was added: a reader whose place is not this
    /// one has missed entries.
    pub(crate) prev: StreamId,
    /// `None` for a member that could not be read (never written so; skipped, but its
    /// place counts).
    pub(crate) event: Option<Outbound>,
}

/// What one read of a bucket's stream found.
#[derive(Clone, Debug)]
pub(crate) struct LogRead {
    pub(crate) bucket: Bucket,
    /// The last id ever written to the stream (`0-0`: none, or the stream is gone).
    pub(crate) last: StreamId,
    pub(crate) entries: Vec<LogEntry>,
}

impl Store {
    /// Reads up to `count` entries of each given bucket's stream, in one round trip.
    pub(crate) async fn read_events(
        &self,
        from: &[(Bucket, LogFrom)],
        count: usize,
    ) -> Partial<LogRead> {
        self.per_bucket(
            from,
            |(b, _)| *b,
            |b, from| {
                let start = match from.first().map(|(_, f)| *f) {
                    Some(LogFrom::After(id)) => id.to_string(),
                    Some(LogFrom::Oldest) | None => "-".to_owned(),
                };
                let keys = [self.keys.of(b, Key::Events)];
                self.scripts
                    .events_read
                    .cmd(&keys, vec![start, count.to_string()])
            },
            |b, reply| Ok(vec![LogRead::parse(b, &reply)?]),
        )
        .await
    }
}

impl LogRead {
    fn parse(bucket: Bucket, reply: &Value) -> Result<LogRead, StoreError> {
        let mut fields = Fields::of(reply, "events_read")?;
        let id = |s: String| {
            StreamId::parse(&s)
                .ok_or_else(|| StoreError::Protocol(format!("malformed stream id {s:?}")))
        };
        let last = id(fields.text())?;
        let mut read = LogRead {
            bucket,
            last,
            entries: Vec::new(),
        };
        while let Some(entry) = fields.next_text() {
            let at = id(entry)?;
            let prev = StreamId::parse(&fields.text()).unwrap_or_default();
            read.entries.push(LogEntry {
                id: at,
                prev,
                event: Outbound::parse_member(&fields.text()),
            });
        }
        Ok(read)
    }
}
