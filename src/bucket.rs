//! The partition of the fleet into buckets: part of the Redis key layout (each bucket's keys
//! share a hash tag, so one bucket is one Redis Cluster slot) and the unit every per-bucket
//! step works on (scripts, sweeps, floors, clock offsets). Pure: no I/O.

/// Number of buckets the fleet is split into. Part of the key layout: changing it needs a
/// migration. 64 keeps every bucket (and cluster slot) below ~2% of the fleet.
pub const BUCKETS: u16 = 64;

/// A bucket, i.e. a Redis Cluster slot's worth of devices.
pub type Bucket = u16;

/// The bucket of a device id (FNV-1a, stable across versions and processes).
pub fn bucket_of(id: &str) -> Bucket {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(BUCKETS)) as Bucket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("sensor-17"), bucket_of("sensor-17"));
        let mut counts = vec![0usize; usize::from(BUCKETS)];
        for i in 0..64_000 {
            counts[usize::from(bucket_of(&format!("sim-{i:06}")))] += 1;
        }
        let max = counts.iter().max().copied().unwrap_or(0);
        let min = counts.iter().min().copied().unwrap_or(0);
        assert!(max < 1300 && min > 700, "uneven buckets: {min}..{max}");
    }
}
