//! Key names: the one place the Redis key layout (see the table in [`super`]) is spelled.
//!
//! Owns [`Keys`]. Must not send commands: it only names keys.

use crate::bucket::{bucket_of, Bucket};
use crate::device::{DeviceId, State};

/// Key names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, b: Bucket, name: &str) -> String {
        format!("{}:{{{b}}}:{name}", self.prefix)
    }

    pub fn ttl_prefix(&self, b: Bucket) -> String {
        self.key(b, "ttl:")
    }

    pub fn ttl(&self, id: &DeviceId) -> String {
        format!("{}{}", self.ttl_prefix(bucket_of(id.as_str())), id)
    }

    pub fn records(&self, b: Bucket) -> String {
        self.key(b, "rec")
    }

    pub fn deadlines(&self, b: Bucket) -> String {
        self.key(b, "deadline")
    }

    pub fn index(&self, b: Bucket, state: State) -> String {
        self.key(b, state.as_str())
    }

    pub fn outbox(&self, b: Bucket) -> String {
        self.key(b, "outbox")
    }

    /// Offline devices by the `since` of their offline status (see src/lua/forget.lua).
    pub fn offline_since(&self, b: Bucket) -> String {
        self.key(b, "offsince")
    }

    /// Present exactly when the bucket's state is in Redis (see src/lua/import.lua).
    pub fn epoch(&self, b: Bucket) -> String {
        self.key(b, "epoch")
    }

    /// The tokens of the imports under way into a bucket.
    pub fn importers(&self, b: Bucket) -> String {
        self.key(b, "importing")
    }

    /// The republish job of a bucket (see src/lua/republish.lua).
    pub fn republish_job(&self, b: Bucket) -> String {
        self.key(b, "republish")
    }

    /// Replica floors (see src/lua/clock.lua).
    pub fn floors(&self, b: Bucket) -> String {
        self.key(b, "floor")
    }

    /// A key for the notification probe (under the prefix, outside every bucket). In a
    /// cluster, `tag` (see [`crate::cluster::tag_in`]) puts it on the master being probed.
    pub fn probe(&self, tag: Option<&str>) -> String {
        match tag {
            Some(tag) => format!("{}:probe:{{{tag}}}:{:016x}", self.prefix, fastrand::u64(..)),
            None => format!("{}:probe:{:016x}", self.prefix, fastrand::u64(..)),
        }
    }

    /// The device of a TTL key named in an `expired` event, if the key is one of ours.
    pub fn parse_ttl_key(&self, key: &[u8]) -> Option<DeviceId> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (bucket, rest) = rest.split_once('}')?;
        let id = rest.strip_prefix(":ttl:")?;
        let id = DeviceId::parse(id).ok()?;
        (bucket.parse::<Bucket>().ok()? == bucket_of(id.as_str())).then_some(id)
    }

    /// The keys of expire.lua and forget.lua, in their `KEYS` order.
    pub(crate) fn expire_keys(&self, b: Bucket) -> [String; 7] {
        [
            self.records(b),
            self.deadlines(b),
            self.index(b, State::Online),
            self.index(b, State::Offline),
            self.outbox(b),
            self.floors(b),
            self.offline_since(b),
        ]
    }

    /// The keys of heartbeat.lua: expire.lua's, then the epoch key.
    pub(crate) fn heartbeat_keys(&self, b: Bucket) -> [String; 8] {
        let [rec, deadline, online, offline, outbox, floor, offsince] = self.expire_keys(b);
        [
            rec,
            deadline,
            online,
            offline,
            outbox,
            floor,
            offsince,
            self.epoch(b),
        ]
    }

    /// The keys of import.lua, in its `KEYS` order.
    pub(crate) fn import_keys(&self, b: Bucket) -> [String; 7] {
        [
            self.records(b),
            self.deadlines(b),
            self.index(b, State::Online),
            self.index(b, State::Offline),
            self.epoch(b),
            self.importers(b),
            self.offline_since(b),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::BUCKETS;

    #[test]
    fn ttl_keys_round_trip() {
        let keys = Keys::new("presence");
        let id = DeviceId::parse("a:b}{c").unwrap();
        let key = keys.ttl(&id);
        assert!(key.starts_with("presence:{"));
        assert_eq!(keys.parse_ttl_key(key.as_bytes()), Some(id));
        assert_eq!(keys.parse_ttl_key(b"presence:{1}:rec"), None);
        assert_eq!(keys.parse_ttl_key(b"other:{1}:ttl:x"), None);
        // A bucket that does not match the id is not one of our keys.
        let wrong = format!("presence:{{{}}}:ttl:x", (bucket_of("x") + 1) % BUCKETS);
        assert_eq!(keys.parse_ttl_key(wrong.as_bytes()), None);
    }

    #[test]
    fn script_keys_share_one_order() {
        let keys = Keys::new("p");
        let expire = keys.expire_keys(3);
        let heartbeat = keys.heartbeat_keys(3);
        assert_eq!(heartbeat[..7], expire[..]);
        assert_eq!(heartbeat[7], "p:{3}:epoch");
        assert_eq!(expire[0], "p:{3}:rec");
        assert_eq!(expire[6], "p:{3}:offsince");
    }
}
