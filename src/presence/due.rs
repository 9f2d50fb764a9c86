//! Each bucket's next known deadline: written by the applier (lowered as heartbeats land)
//! and the expirer (replaced by each sweep), read by the expirer to plan its next sweep.
//! Lock-free and in memory only: it is a hint, and must never be taken for the truth
//! (Redis's deadline index is; the safety net covers a wrong hint).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::bucket::{Bucket, BUCKETS};
use crate::device::Millis;

/// The next known deadline of each bucket (`u64::MAX`: none known). Lowered by the applier
/// as heartbeats land, replaced by the expirer after each sweep.
pub(crate) struct DueTable {
    due: Vec<AtomicU64>,
    /// Woken when a deadline earlier than a bucket's known one became known.
    pub(crate) wake: Notify,
}

impl Default for DueTable {
    fn default() -> Self {
        DueTable {
            due: (0..BUCKETS).map(|_| AtomicU64::new(u64::MAX)).collect(),
            wake: Notify::new(),
        }
    }
}

impl DueTable {
    pub(crate) fn lower(&self, b: Bucket, deadline: Millis) {
        let prev = self.due[usize::from(b)].fetch_min(deadline, Ordering::AcqRel);
        if deadline < prev {
            self.wake.notify_one();
        }
    }

    /// Replaces a bucket's deadline with what a sweep found, unless the applier lowered it
    /// since `seen` was read (then the lower of the two stands).
    pub(crate) fn replace(&self, b: Bucket, seen: Millis, next: Option<Millis>) {
        let next = next.unwrap_or(u64::MAX);
        let slot = &self.due[usize::from(b)];
        if slot
            .compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            slot.fetch_min(next, Ordering::AcqRel);
        }
    }

    pub(crate) fn get(&self, b: Bucket) -> Millis {
        self.due[usize::from(b)].load(Ordering::Acquire)
    }

    pub(crate) fn earliest(&self) -> Millis {
        (0..BUCKETS).map(|b| self.get(b)).min().unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_table_keeps_the_lower_deadline_on_a_race() {
        let due = DueTable::default();
        due.lower(3, 500);
        assert_eq!(due.earliest(), 500);
        let seen = due.get(3);
        due.lower(3, 200); // the applier, between the sweep's read and its write
        due.replace(3, seen, Some(900));
        assert_eq!(due.get(3), 200);
        let seen = due.get(3);
        due.replace(3, seen, None);
        assert_eq!(due.get(3), u64::MAX);
    }
}
