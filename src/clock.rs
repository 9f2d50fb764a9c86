//! One clock for every decision: Redis's.
//!
//! Replicas' wall clocks may disagree (a replica 15 s ahead must not expire devices early or
//! claim every outbox entry). The Lua scripts therefore read `TIME` on the master that owns
//! the bucket, and the process keeps, per bucket, the offset between that master's clock and
//! its own wall clock, measured by round trips (error at most half a round trip). Times in
//! the process are local wall-clock milliseconds; the store shifts them by the bucket's
//! offset on the way to Redis and back, so every time written or compared in Redis is the
//! master's.
//!
//! Owns [`Clock`] (the offsets and their measurement rule). Must not do I/O: the store reads
//! the masters' `TIME` and hands the readings in.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use crate::bucket::{Bucket, BUCKETS};
use crate::device::{now_ms, Millis};

/// A measurement whose round trip took longer than this is not trusted (its error is up to
/// half of it: a master failing over, a fork stall) unless the bucket has none yet.
const MAX_RTT_MS: Millis = 50;

/// Per-bucket offsets `master time - local time`, in ms.
#[derive(Debug)]
pub struct Clock {
    offsets: Vec<AtomicI64>,
    measured: Vec<AtomicBool>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            offsets: (0..BUCKETS).map(|_| AtomicI64::new(0)).collect(),
            measured: (0..BUCKETS).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

impl Clock {
    /// Records a measurement: `master` was read between `sent` and `received` (local).
    pub(crate) fn observe(&self, b: Bucket, sent: Millis, received: Millis, master: Millis) {
        let first = !self.measured[usize::from(b)].swap(true, Ordering::Relaxed);
        if received.saturating_sub(sent) > MAX_RTT_MS && !first {
            return;
        }
        let mid = sent.midpoint(received);
        let offset = master as i64 - mid as i64;
        self.offsets[usize::from(b)].store(offset, Ordering::Relaxed);
    }

    pub(crate) fn offset(&self, b: Bucket) -> i64 {
        self.offsets[usize::from(b)].load(Ordering::Relaxed)
    }

    /// A local time as bucket `b`'s master reads it.
    pub(crate) fn to_master(&self, b: Bucket, local: Millis) -> Millis {
        local.saturating_add_signed(self.offset(b))
    }

    /// A time of bucket `b`'s master as a local time.
    pub(crate) fn to_local(&self, b: Bucket, master: Millis) -> Millis {
        master.saturating_add_signed(-self.offset(b))
    }

    /// Now, as bucket `b`'s master reads it.
    pub(crate) fn now(&self, b: Bucket) -> Millis {
        self.to_master(b, now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_shift_both_ways() {
        let clock = Clock::default();
        // This process is 15 s ahead of the master; the round trip took 4 ms.
        clock.observe(3, 100_000, 100_004, 85_002);
        assert_eq!(clock.offset(3), -15_000);
        assert_eq!(clock.to_master(3, 100_010), 85_010);
        assert_eq!(clock.to_local(3, 85_010), 100_010);
        assert_eq!(clock.offset(4), 0);
        // A slow round trip (a stalled master) does not replace a good measurement.
        clock.observe(3, 200_000, 200_900, 1_000_000);
        assert_eq!(clock.offset(3), -15_000);
    }
}
