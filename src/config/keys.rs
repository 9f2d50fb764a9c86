//! The contract's configuration keys: one constant per key (so a misspelt key does not
//! compile), [`KEYS`] listing them all, and what each key derives from its name (the
//! environment variable, the flag, the example config).
//!
//! It must not read or check values (that is `values` and `sections`).

/// The kind of value a key holds; it decides how a string from env or a flag is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Duration,
    /// A number of bytes, or a string with `B`, `KiB` or `MiB`.
    Size,
    /// An integer ≥ 1.
    Count,
    /// A number in (0, 1].
    Fraction,
}

/// One configuration key of the contract.
pub struct Key {
    pub section: &'static str,
    pub name: &'static str,
    pub kind: Kind,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

impl Key {
    /// `section.name`, as used in messages and the file.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }

    /// `PRESENCED_SECTION_NAME`.
    pub fn env_var(&self) -> String {
        format!("PRESENCED_{}_{}", self.section, self.name).to_uppercase()
    }

    /// `section-name` with dashes (the flag without its leading `--`).
    pub fn flag(&self) -> String {
        format!("{}-{}", self.section, self.name).replace('_', "-")
    }
}

macro_rules! key {
    ($section:literal, $name:literal, $kind:ident, $default:expr, $help:literal) => {
        Key {
            section: $section,
            name: $name,
            kind: Kind::$kind,
            default: $default,
            help: $help,
        }
    };
}

pub const MQTT_URL: Key = key!(
    "mqtt",
    "url",
    Str,
    Some("mqtt://127.0.0.1:1883"),
    "Broker URL; mqtts:// for TLS (CA from the system store or SSL_CERT_FILE)."
);

pub const MQTT_CLIENT_ID: Key = key!(
    "mqtt",
    "client_id",
    Str,
    None,
    "Stable client id (default presenced-<hostname>, plus -<random> with a shared group)."
);

pub const MQTT_USERNAME: Key = key!("mqtt", "username", Str, None, "Broker user name.");

pub const MQTT_PASSWORD: Key = key!(
    "mqtt",
    "password",
    Str,
    None,
    "Broker password (prefer mqtt.password_file or the environment)."
);

pub const MQTT_PASSWORD_FILE: Key = key!(
    "mqtt",
    "password_file",
    Str,
    None,
    "File holding the broker password (trailing newline trimmed)."
);

pub const MQTT_PROTOCOL: Key = key!(
    "mqtt",
    "protocol",
    Str,
    Some("v5"),
    "MQTT protocol: v5 or v3.1.1."
);

pub const MQTT_HEARTBEAT_TOPIC: Key = key!(
    "mqtt",
    "heartbeat_topic",
    Str,
    Some("devices/{device}/heartbeat"),
    "Heartbeat topic; {device} is one whole topic level, {group} may be another (the device's group)."
);

pub const MQTT_STATUS_TOPIC: Key = key!(
    "mqtt",
    "status_topic",
    Str,
    Some("devices/{device}/status"),
    "Where status is republished (retained, QoS 1)."
);

pub const MQTT_GROUP_TOPIC: Key = key!(
    "mqtt",
    "group_topic",
    Str,
    Some("groups/{group}/status"),
    "Where group outage statuses are published ({group} = the group)."
);

pub const MQTT_SHARED_GROUP: Key = key!(
    "mqtt",
    "shared_group",
    Str,
    None,
    "Share heartbeats between replicas via $share/<group>/..."
);

pub const MQTT_WILL_TOPIC: Key = key!(
    "mqtt",
    "will_topic",
    Str,
    None,
    "Where devices' own MQTT wills arrive, e.g. devices/{device}/will or tele/{device}/LWT ({group} may be another level); unset: wills are not read."
);

pub const MQTT_WILL_PAYLOAD: Key = key!(
    "mqtt",
    "will_payload",
    Str,
    Some("offline"),
    "The will payload that means connection lost (trimmed, any case); a JSON object with \"state\":\"offline\" is one too."
);

pub const MQTT_MAX_PACKET_SIZE: Key = key!(
    "mqtt",
    "max_packet_size",
    Size,
    Some("1MiB"),
    "Largest heartbeat payload accepted (bytes, or with B, KiB, MiB)."
);

pub const REDIS_URL: Key = key!(
    "redis",
    "url",
    Str,
    Some("redis://127.0.0.1:6379/0"),
    "Redis URL; rediss:// for TLS; user/password in the URL."
);

pub const REDIS_CLUSTER_NODES: Key = key!(
    "redis",
    "cluster_nodes",
    Str,
    None,
    "Comma-separated Redis Cluster seed URLs (any nodes; auth in the URL; db 0 only); if set, Cluster mode and redis.url is ignored."
);

pub const REDIS_KEY_PREFIX: Key = key!(
    "redis",
    "key_prefix",
    Str,
    Some("presence"),
    "Prefix of every Redis key the monitor writes."
);

pub const REDIS_CONFIGURE_NOTIFICATIONS: Key = key!(
    "redis",
    "configure_notifications",
    Bool,
    Some("true"),
    "Enable E and x in notify-keyspace-events, keeping flags already set."
);

pub const PRESENCE_TTL: Key = key!("presence", "ttl", Duration, Some("30s"), "Heartbeat TTL.");

pub const PRESENCE_MIN_TTL: Key = key!(
    "presence",
    "min_ttl",
    Duration,
    Some("1s"),
    "Smallest TTL a heartbeat may ask for."
);

pub const PRESENCE_MAX_TTL: Key = key!(
    "presence",
    "max_ttl",
    Duration,
    Some("24h"),
    "Largest TTL a heartbeat may ask for."
);

pub const PRESENCE_FORGET_AFTER: Key = key!(
    "presence",
    "forget_after",
    Duration,
    None,
    "Forget devices offline for longer than this (from their offline since); unset: kept forever."
);

pub const PRESENCE_FLAP_THRESHOLD: Key = key!(
    "presence",
    "flap_threshold",
    Count,
    Some("4"),
    "A device is flapping once its penalty (1 per transition, halving every flap_half_life) reaches this."
);

pub const PRESENCE_FLAP_HALF_LIFE: Key = key!(
    "presence",
    "flap_half_life",
    Duration,
    Some("5m"),
    "How long a flap penalty takes to halve; flapping ends below half the threshold."
);

pub const PRESENCE_TTL_RULES: Key = key!(
    "presence",
    "ttl_rules",
    Str,
    None,
    "Per-class TTLs, first match wins: comma-separated PATTERN=DURATION, PATTERN a glob on the device id (* any run, ? one character) or group:GLOB on its group; e.g. bat-*=12h,gw-*=90s,group:lab-*=5m."
);

pub const GROUPS_OUTAGE_MIN_DEVICES: Key = key!(
    "groups",
    "outage_min_devices",
    Count,
    Some("10"),
    "An outage needs at least this many devices of the group going offline..."
);

pub const GROUPS_OUTAGE_FRACTION: Key = key!(
    "groups",
    "outage_fraction",
    Fraction,
    Some("0.5"),
    "...and at least this fraction of the group's devices..."
);

pub const GROUPS_OUTAGE_WINDOW: Key = key!(
    "groups",
    "outage_window",
    Duration,
    Some("60s"),
    "...within this window."
);

pub const GROUPS_RECOVERY_FRACTION: Key = key!(
    "groups",
    "recovery_fraction",
    Fraction,
    Some("0.9"),
    "An outage ends when this fraction of its affected devices is back online."
);

pub const GROUPS_MAX_SERIES: Key = key!(
    "groups",
    "max_series",
    Count,
    Some("1000"),
    "Most groups with their own metric series (the rest are summed under group=\"_other\")."
);

pub const HTTP_LISTEN: Key = key!(
    "http",
    "listen",
    Str,
    Some("127.0.0.1:9464"),
    "Address of the metrics, health and device API."
);

pub const HTTP_AUTH_TOKEN: Key = key!(
    "http",
    "auth_token",
    Str,
    None,
    "Bearer token every route but /, /healthz and /readyz requires (prefer http.auth_token_file or the environment)."
);

pub const HTTP_AUTH_TOKEN_FILE: Key = key!(
    "http",
    "auth_token_file",
    Str,
    None,
    "File holding the HTTP bearer token (trailing newline trimmed)."
);

pub const HTTP_EVENTS_RETENTION: Key = key!(
    "http",
    "events_retention",
    Duration,
    Some("1h"),
    "How far back /events can resume (at most 100,000 events)."
);

/// Every key of the contract, in the contract's order (mqtt, redis, presence, groups, http); the
/// example config and `--help` list them in this order.
pub const KEYS: &[Key] = &[
    MQTT_URL,
    MQTT_CLIENT_ID,
    MQTT_USERNAME,
    MQTT_PASSWORD,
    MQTT_PASSWORD_FILE,
    MQTT_PROTOCOL,
    MQTT_HEARTBEAT_TOPIC,
    MQTT_STATUS_TOPIC,
    MQTT_GROUP_TOPIC,
    MQTT_SHARED_GROUP,
    MQTT_WILL_TOPIC,
    MQTT_WILL_PAYLOAD,
    MQTT_MAX_PACKET_SIZE,
    REDIS_URL,
    REDIS_CLUSTER_NODES,
    REDIS_KEY_PREFIX,
    REDIS_CONFIGURE_NOTIFICATIONS,
    PRESENCE_TTL,
    PRESENCE_MIN_TTL,
    PRESENCE_MAX_TTL,
    PRESENCE_FORGET_AFTER,
    PRESENCE_TTL_RULES,
    PRESENCE_FLAP_THRESHOLD,
    PRESENCE_FLAP_HALF_LIFE,
    GROUPS_OUTAGE_MIN_DEVICES,
    GROUPS_OUTAGE_FRACTION,
    GROUPS_OUTAGE_WINDOW,
    GROUPS_RECOVERY_FRACTION,
    GROUPS_MAX_SERIES,
    HTTP_LISTEN,
    HTTP_AUTH_TOKEN,
    HTTP_AUTH_TOKEN_FILE,
    HTTP_EVENTS_RETENTION,
];

/// Environment variables that are not config keys but are known (not warned about).
pub(crate) const OTHER_ENV: &[&str] = &["PRESENCED_CONFIG", "PRESENCED_LOG_FORMAT"];

/// An example config documenting every key with its default, generated from [`KEYS`].
pub fn example_toml() -> String {
    let mut out = String::from(
        "# presenced configuration. Every key is optional; shown with its default.\n\
         # Each key also reads from PRESENCED_<SECTION>_<KEY> and --<section>-<key>.\n",
    );
    let mut section = "";
    for key in KEYS {
        if key.section != section {
            section = key.section;
            out.push_str(&format!("\n[{section}]\n"));
        }
        out.push_str(&format!("# {}\n", key.help));
        match key.default {
            Some(d) if matches!(key.kind, Kind::Bool | Kind::Count | Kind::Fraction) => {
                out.push_str(&format!("{} = {d}\n", key.name))
            }
            Some(d) => out.push_str(&format!("{} = {d:?}\n", key.name)),
            None => out.push_str(&format!("# {} = \"\"\n", key.name)),
        }
    }
    out
}
