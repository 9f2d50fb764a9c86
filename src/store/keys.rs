//! Key names: the one place the Redis key layout (see the table in [`super`]) is spelled.
//!
//! Owns [`Keys`]. Must not send commands: it only names keys.

use crate::bucket::{bucket_of, Bucket};
use crate::device::{DeviceId, State};

/// The keys of one bucket, by what they hold (see the table in [`super`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Key {
    /// Hash id → record.
    Records,
    /// Zset of online devices by deadline.
    Deadlines,
    /// Zset (lex) of the devices in a state.
    Index(State),
    /// Zset of committed transitions not yet acknowledged, by lease end.
    Outbox,
    /// Zset of offline devices by the `since` of their offline status (src/lua/forget.lua).
    OfflineSince,
    /// Present exactly when the bucket's state is in Redis (src/lua/import.lua).
    Epoch,
    /// The tokens of the imports under way into the bucket.
    Importers,
    /// The bucket's republish job (src/lua/republish.lua).
    RepublishJob,
    /// Replica floors (src/lua/clock.lua).
    Floors,
    /// Hash `<state flag>|<group>` → the bucket's devices of that group in that state.
    GroupCounts,
    /// Hash group → its outage state (for the groups whose name falls in this bucket).
    GroupStates,
    /// Zset of flapping devices by the moment they stop flapping (the fleet-wide gauge).
    FlapUntil,
    /// Zset (lex) of the same devices, for listing them by id (`/devices?flapping=true`).
    FlapIndex,
    /// Hash id → the session its latest heartbeat named (stale wills are fenced by it).
    Sessions,
    /// The prefix of the per-group outage keys (`…:g:dev:<group>`, `off:`, `rec:`, `fence:`;
    /// note.lua).
    GroupOutages,
    /// Stream: the bucket's committed transitions (and the outages decided in it), for
    /// `/events`.
    Events,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Records => "rec",
            Key::Deadlines => "deadline",
            Key::Index(state) => state.as_str(),
            Key::Outbox => "outbox",
            Key::OfflineSince => "offsince",
            Key::Epoch => "epoch",
            Key::Importers => "importing",
            Key::RepublishJob => "republish",
            Key::Floors => "floor",
            Key::GroupCounts => "groups",
            Key::GroupStates => "gstate",
            Key::GroupOutages => "g",
            Key::FlapUntil => "flap",
            Key::FlapIndex => "flapidx",
            Key::Sessions => "session",
            Key::Events => "events",
        }
    }
}

/// A bucket's state: its records, deadlines and state indexes, the first `KEYS` of every
/// script that writes a device.
const STATE_KEYS: [Key; 4] = [
    Key::Records,
    Key::Deadlines,
    Key::Index(State::Online),
    Key::Index(State::Offline),
];

/// [`STATE_KEYS`], then a script's own, then the group counts and the flap indexes (every
/// script that changes a device's state or group keeps them in the same step).
const fn state_and(own: [Key; 3]) -> [Key; 10] {
    let [records, deadlines, online, offline] = STATE_KEYS;
    let [a, b, c] = own;
    [
        records,
        deadlines,
        online,
        offline,
        a,
        b,
        c,
        Key::GroupCounts,
        Key::FlapUntil,
        Key::FlapIndex,
    ]
}

/// The `KEYS` forget.lua begins with, and expire.lua and heartbeat.lua too.
pub(crate) const EXPIRE_KEYS: [Key; 10] = state_and([Key::Outbox, Key::Floors, Key::OfflineSince]);

/// The `KEYS` of expire.lua: [`EXPIRE_KEYS`] and the event log.
pub(crate) const SWEEP_KEYS: [Key; 11] = {
    let [a, b, c, d, e, f, g, h, i, j] = EXPIRE_KEYS;
    [a, b, c, d, e, f, g, h, i, j, Key::Events]
};

/// The `KEYS` of heartbeat.lua and will.lua: [`EXPIRE_KEYS`], the epoch key (a bucket
/// without it is lost), the sessions and the event log.
pub(crate) const APPLY_KEYS: [Key; 13] = {
    let [a, b, c, d, e, f, g, h, i, j] = EXPIRE_KEYS;
    [
        a,
        b,
        c,
        d,
        e,
        f,
        g,
        h,
        i,
        j,
        Key::Epoch,
        Key::Sessions,
        Key::Events,
    ]
};

/// The `KEYS` of forget.lua: expire.lua's and the sessions.
pub(crate) const FORGET_KEYS: [Key; 11] = {
    let [a, b, c, d, e, f, g, h, i, j] = EXPIRE_KEYS;
    [a, b, c, d, e, f, g, h, i, j, Key::Sessions]
};

/// The `KEYS` of import.lua.
pub(crate) const IMPORT_KEYS: [Key; 10] =
    state_and([Key::Epoch, Key::Importers, Key::OfflineSince]);

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

    /// What a device's TTL key is named after (the scripts append the id).
    pub(crate) fn ttl_prefix(&self, b: Bucket) -> String {
        self.key(b, "ttl:")
    }

    /// A state index: the bucket's devices in `state`, by id.
    pub fn index(&self, b: Bucket, state: State) -> String {
        self.of(b, Key::Index(state))
    }

    /// A key for the notification probe (under the prefix, outside every bucket). In a
    /// cluster, `tag` (see [`crate::cluster::tag_in`]) puts it on the master being probed.
    pub(crate) fn probe(&self, tag: Option<&str>) -> String {
        match tag {
            Some(tag) => format!("{}:probe:{{{tag}}}:{:016x}", self.prefix, fastrand::u64(..)),
            None => format!("{}:probe:{:016x}", self.prefix, fastrand::u64(..)),
        }
    }

    /// The device of a TTL key named in an `expired` event, if the key is one of ours.
    pub(crate) fn parse_ttl_key(&self, key: &[u8]) -> Option<DeviceId> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (bucket, rest) = rest.split_once('}')?;
        let id = rest.strip_prefix(":ttl:")?;
        let id = DeviceId::parse(id).ok()?;
        (bucket.parse::<Bucket>().ok()? == bucket_of(id.as_str())).then_some(id)
    }

    /// One of bucket `b`'s keys.
    pub(crate) fn of(&self, b: Bucket, key: Key) -> String {
        self.key(b, key.name())
    }

    /// Bucket `b`'s `keys`, in order: a script's `KEYS`.
    pub(crate) fn script(&self, b: Bucket, keys: &[Key]) -> Vec<String> {
        keys.iter().map(|&k| self.of(b, k)).collect()
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
        let key = format!("{}{id}", keys.ttl_prefix(bucket_of(id.as_str())));
        assert!(key.starts_with("presence:{"));
        assert_eq!(keys.parse_ttl_key(key.as_bytes()), Some(id));
        assert_eq!(keys.parse_ttl_key(b"presence:{1}:rec"), None);
        assert_eq!(keys.parse_ttl_key(b"other:{1}:ttl:x"), None);
        // A bucket that does not match the id is not one of our keys.
        let wrong = format!("presence:{{{}}}:ttl:x", (bucket_of("x") + 1) % BUCKETS);
        assert_eq!(keys.parse_ttl_key(wrong.as_bytes()), None);
    }

    #[test]
    fn script_keys_are_named_as_the_layout_says() {
        let keys = Keys::new("p");
        assert_eq!(
            keys.script(3, &EXPIRE_KEYS),
            [
                "p:{3}:rec",
                "p:{3}:deadline",
                "p:{3}:online",
                "p:{3}:offline",
                "p:{3}:outbox",
                "p:{3}:floor",
                "p:{3}:offsince",
                "p:{3}:groups",
                "p:{3}:flap",
                "p:{3}:flapidx",
            ]
        );
        assert_eq!(
            keys.script(3, &IMPORT_KEYS)[4..6],
            ["p:{3}:epoch", "p:{3}:importing"]
        );
        assert_eq!(keys.of(3, Key::RepublishJob), "p:{3}:republish");
        assert_eq!(
            keys.script(3, &APPLY_KEYS)[10..],
            ["p:{3}:epoch", "p:{3}:session", "p:{3}:events"]
        );
        assert_eq!(keys.script(3, &SWEEP_KEYS)[10], "p:{3}:events");
        assert_eq!(keys.script(3, &FORGET_KEYS)[10], "p:{3}:session");
    }
}
