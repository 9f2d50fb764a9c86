//! What the event log keeps (`http.events_retention`), as the transition scripts apply it.
//!
//! Owns [`EventLog`]. The log itself is one Redis stream per bucket, appended to by the
//! scripts that commit transitions (src/lua/common.lua, `log_events`).

use std::time::Duration;

use crate::bucket::BUCKETS;

/// Entries kept per bucket stream at most. The contract keeps the last 100,000 events
/// fleet-wide; spread over 64 buckets that is 1,563 each, so 4,096 per bucket holds the last
/// 100,000 unless one bucket has 2.6 times its share of them (a few devices flapping in one
/// bucket; then a resume from further back gets `gap`, never a silent hole). At most
/// 262,144 entries of about 150 bytes: some 40 MiB of Redis in the worst case, far less
/// while the retention trims first.
pub(crate) const PER_BUCKET: usize = 4096;

/// The event log's retention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLog {
    retention: Duration,
}

impl Default for EventLog {
    /// The contract's default: one hour.
    fn default() -> Self {
        EventLog {
            retention: Duration::from_secs(3600),
        }
    }
}

impl EventLog {
    /// A retention of at least 1 s (a client resuming after a gap gets at least the last
    /// second) and at most 30 days.
    pub fn new(retention: Duration) -> Result<EventLog, &'static str> {
        if retention < Duration::from_secs(1) {
            return Err("must be at least 1s");
        }
        if retention > Duration::from_secs(30 * 86_400) {
            return Err("must be at most 30 days");
        }
        Ok(EventLog { retention })
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The rule as the scripts take it: `retention ms|entries per bucket`.
    pub(crate) fn arg(&self) -> String {
        format!("{}|{PER_BUCKET}", self.retention.as_millis())
    }
}

/// At least the contract's 100,000 when the events are spread evenly.
const _: () = assert!(PER_BUCKET * (BUCKETS as usize) >= 100_000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_get_the_retention_in_ms_and_the_cap() {
        let log = EventLog::new(Duration::from_secs(90)).unwrap();
        assert_eq!(log.arg(), "90000|4096");
        assert_eq!(EventLog::default().arg(), "3600000|4096");
        assert!(EventLog::new(Duration::from_millis(999)).is_err());
        assert!(EventLog::new(Duration::from_secs(31 * 86_400)).is_err());
    }
}
