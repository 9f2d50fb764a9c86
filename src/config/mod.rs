//! Configuration: the contract's keys, read from a TOML file, then `PRESENCED_<SECTION>_<KEY>`
//! environment variables, then `--<section>-<key>` flags (later wins), and validated into
//! typed [`Config`].
//!
//! [`KEYS`] is the single list of keys: it drives the file check, the environment names,
//! the command-line flags and the example config. Every error names the key it is about.
//! This module does no network I/O.

mod keys;
mod parse;
mod sections;
mod ttl_rules;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::device::TopicTemplate;
use crate::event_log::EventLog;
use crate::flap::FlapRule;
use crate::group_status::GroupTopic;
use values::Values;

pub use keys::{example_toml, Key, Kind, KEYS};
pub use parse::{parse_duration, parse_size, BadValue};
pub use ttl_rules::TtlRules;

/// The largest MQTT packet the protocol allows (variable byte integer limit).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

// === Errors ===

/// A configuration error. Its message is one line that names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML (the parser's one-line message, without its snippet).
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    /// A value that does not parse.
    #[error("{key}: {source}")]
    Value { key: String, source: BadValue },
    /// A secret file (`*_file`) that cannot be read.
    #[error("{key}: cannot read {path}: {source}")]
    SecretFile {
        key: String,
        path: String,
        source: std::io::Error,
    },
    /// A value that parses but breaks a rule of its section (required, out of range,
    /// conflicting with another key).
    #[error("{key}: {message}")]
    Key { key: String, message: String },
    #[error("{key}: unknown key in the config file")]
    UnknownKey { key: String },
}

/// A value of `key` that does not parse.
fn bad_value(key: &Key) -> impl Fn(BadValue) -> ConfigError + '_ {
    move |source| ConfigError::Value {
        key: key.path(),
        source,
    }
}

/// A value of `key` that breaks a rule.
fn key_err(key: &Key, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.path(),
        message: message.into(),
    }
}

// === Typed configuration ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V5,
    V311,
}

/// A broker address from `mqtt.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub url: BrokerUrl,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub protocol: Protocol,
    pub heartbeat_topic: TopicTemplate,
    pub status_topic: TopicTemplate,
    pub group_topic: GroupTopic,
    /// Where devices' wills arrive; `None`: wills are not read.
    pub will_topic: Option<TopicTemplate>,
    /// The will payload, trimmed and lowercased (compared ignoring case).
    pub will_payload: String,
    pub shared_group: Option<String>,
    pub max_packet_size: usize,
}

impl MqttConfig {
    /// A persistent session (heartbeats are queued while the monitor restarts) unless
    /// replicas share a group: then a stopped replica's share must go to the living ones.
    pub fn persistent_session(&self) -> bool {
        self.shared_group.is_none()
    }

    /// The heartbeat subscription, with the `$share/<group>/` prefix when sharing.
    pub fn heartbeat_filter(&self) -> String {
        self.shared(self.heartbeat_topic.filter())
    }

    /// The will subscription (shared as heartbeats are), if wills are read.
    pub fn will_filter(&self) -> Option<String> {
        Some(self.shared(self.will_topic.as_ref()?.filter()))
    }

    fn shared(&self, filter: String) -> String {
        match &self.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// Kept as given; it may hold a password, so it is redacted in logs.
    pub url: Secret,
    /// Redis Cluster seed URLs; `Some` switches to Cluster mode (`url` is then ignored).
    pub cluster_nodes: Option<Vec<Secret>>,
    pub key_prefix: String,
    pub configure_notifications: bool,
}

#[derive(Clone, Debug)]
pub struct PresenceConfig {
    pub ttl: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Devices offline for longer than this are forgotten (`None`: kept forever).
    pub forget_after: Option<Duration>,
    /// Per-class TTLs instead of `ttl` (first match wins; a heartbeat's `ttl_s` still wins).
    pub ttl_rules: TtlRules,
    /// When a device counts as flapping (a label; it decides nothing).
    pub flap: FlapRule,
}

/// Groups: the outage rule and the metric series bound.
#[derive(Clone, Debug)]
pub struct GroupsConfig {
    /// An outage needs at least this many devices of the group going offline...
    pub outage_min_devices: u64,
    /// ...and at least this fraction of the group's devices...
    pub outage_fraction: f64,
    /// ...within this window.
    pub outage_window: Duration,
    /// An outage closes when this fraction of its affected devices is back online.
    pub recovery_fraction: f64,
    /// Most groups with their own `presenced_group_devices` series.
    pub max_series: usize,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub auth: HttpAuth,
    /// How long `/events` keeps what it can resume from (`http.events_retention`).
    pub events: EventLog,
}

/// Who may read the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpAuth {
    /// Every route answers everyone (no token configured).
    Open,
    /// Every route but the status page and the probes needs this bearer token.
    Bearer(Secret),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub redis: RedisConfig,
    pub presence: PresenceConfig,
    pub groups: GroupsConfig,
    pub http: HttpConfig,
}

/// Where raw values come from, in increasing precedence after the file.
#[derive(Default, Debug)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; only `PRESENCED_*` are looked at).
    pub env: Vec<(String, String)>,
    /// `(key path, value)` from command-line flags.
    pub flags: Vec<(String, String)>,
}

/// What loading produced besides the config: warnings to log once tracing is up.
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

// === Loading ===

impl Config {
    /// Loads and validates the configuration from its three sources.
    pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
        let (values, warnings) = Values::gather(sources)?;
        let config = Config {
            mqtt: sections::mqtt(&values)?,
            redis: sections::redis(&values)?,
            presence: sections::presence(&values)?,
            groups: sections::groups(&values)?,
            http: sections::http(&values)?,
        };
        Ok(Loaded { config, warnings })
    }
}

#[cfg(test)]
mod tests {
    use super::parse::parse_broker_url;
    use super::*;

    fn load(env: &[(&str, &str)], flags: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let sources = Sources {
            file: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            flags: flags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Config::load(&sources).map(|l| l.config)
    }

    fn file(text: &str) -> Result<Loaded, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("presenced.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c.presence.ttl, Duration::from_secs(30));
        assert_eq!(c.mqtt.protocol, Protocol::V5);
        assert_eq!(c.mqtt.max_packet_size, 1024 * 1024);
        assert_eq!(c.mqtt.url.port, 1883);
        assert!(c.mqtt.client_id.starts_with("presenced-"));
        assert!(c.mqtt.persistent_session());
        assert_eq!(c.mqtt.heartbeat_filter(), "devices/+/heartbeat");
        assert_eq!(c.redis.key_prefix, "presence");
    }

    #[test]
    fn later_sources_win() {
        let c = load(
            &[
                ("PRESENCED_PRESENCE_TTL", "10s"),
                ("PRESENCED_HTTP_LISTEN", "127.0.0.1:1"),
            ],
            &[("presence.ttl", "1500ms")],
        )
        .unwrap();
        assert_eq!(c.presence.ttl, Duration::from_millis(1500));
        assert_eq!(c.http.listen.port(), 1);
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(&[("PRESENCED_PRESENCE_TTL", "soon")], &[]).unwrap_err();
        assert!(e.to_string().starts_with("presence.ttl:"), "{e}");
        let e = load(&[], &[("presence.ttl", "48h")]).unwrap_err();
        assert!(e.to_string().starts_with("presence.ttl:"), "{e}");
        let e = load(&[], &[("mqtt.url", "http://x")]).unwrap_err();
        assert!(e.to_string().starts_with("mqtt.url:"), "{e}");
        let e = load(&[], &[("mqtt.protocol", "v4")]).unwrap_err();
        assert!(e.to_string().starts_with("mqtt.protocol:"), "{e}");
        let e = load(&[], &[("mqtt.heartbeat_topic", "a/b")]).unwrap_err();
        assert!(e.to_string().starts_with("mqtt.heartbeat_topic:"), "{e}");
        let e = load(&[], &[("redis.configure_notifications", "maybe")]).unwrap_err();
        assert!(
            e.to_string().starts_with("redis.configure_notifications:"),
            "{e}"
        );
        let e = load(&[], &[("mqtt.max_packet_size", "1GiB")]).unwrap_err();
        assert!(e.to_string().starts_with("mqtt.max_packet_size:"), "{e}");
        let e = load(&[], &[("mqtt.password", "x")]).unwrap_err();
        assert!(e.to_string().starts_with("mqtt.username:"), "{e}");
    }

    #[test]
    fn forget_after_is_optional() {
        assert_eq!(load(&[], &[]).unwrap().presence.forget_after, None);
        let c = load(&[("PRESENCED_PRESENCE_FORGET_AFTER", "7d")], &[]).unwrap();
        assert_eq!(
            c.presence.forget_after,
            Some(Duration::from_secs(7 * 24 * 3600))
        );
        for bad in ["soon", "0s", ""] {
            let e = load(&[], &[("presence.forget_after", bad)]).unwrap_err();
            assert!(e.to_string().starts_with("presence.forget_after:"), "{e}");
        }
        let e = file("[presence]\nforget_after = 30\n").err().unwrap();
        assert!(e.to_string().starts_with("presence.forget_after:"), "{e}");
    }

    #[test]
    fn unknown_env_is_a_warning() {
        let loaded = Config::load(&Sources {
            env: vec![("PRESENCED_PRESENCE_TLL".into(), "1s".into())],
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].contains("PRESENCED_PRESENCE_TLL"));
    }

    #[test]
    fn file_keys_are_typed_and_checked() {
        let loaded = file(
            "[mqtt]\nmax_packet_size = 2048\nprotocol = \"v3.1.1\"\n\
             [redis]\nconfigure_notifications = false\n[presence]\nttl = \"5s\"\n",
        )
        .unwrap();
        let c = loaded.config;
        assert_eq!(c.mqtt.max_packet_size, 2048);
        assert_eq!(c.mqtt.protocol, Protocol::V311);
        assert!(!c.redis.configure_notifications);
        assert_eq!(c.presence.ttl, Duration::from_secs(5));

        let e = file("[presence]\nheartbeat_tll = \"5s\"\n").err().unwrap();
        assert_eq!(
            e.to_string(),
            "presence.heartbeat_tll: unknown key in the config file"
        );
        let e = file("[presence]\nttl = 5\n").err().unwrap();
        assert!(e.to_string().starts_with("presence.ttl: expected"), "{e}");
        let e = file("[presence\n").err().unwrap();
        assert!(e.to_string().contains("config file"), "{e}");
    }

    #[test]
    fn example_config_parses_and_lists_every_key() {
        let example = example_toml();
        for key in KEYS {
            assert!(example.contains(key.name), "{} missing", key.path());
        }
        file(&example).unwrap();
    }

    #[test]
    fn broker_urls() {
        let u = parse_broker_url("mqtts://broker.example").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "broker.example", 8883)
        );
        let u = parse_broker_url("mqtt://[::1]:1884").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1884));
        assert!(parse_broker_url("mqtt://").is_err());
        assert!(parse_broker_url("mqtt://h:x").is_err());
        assert!(parse_broker_url("mqtt://u:p@h").is_err());
        assert!(parse_broker_url("tcp://h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB").ok(), Some(1 << 20));
        assert_eq!(parse_size("64KiB").ok(), Some(64 << 10));
        assert_eq!(parse_size("10B").ok(), Some(10));
        assert_eq!(parse_size("10").ok(), Some(10));
        assert!(parse_size("ten").is_err());
    }

    #[test]
    fn auth_token_inline_or_from_a_file() {
        assert_eq!(load(&[], &[]).unwrap().http.auth, HttpAuth::Open);
        let c = load(&[("PRESENCED_HTTP_AUTH_TOKEN", "t0ken")], &[]).unwrap();
        assert_eq!(c.http.auth, HttpAuth::Bearer(Secret("t0ken".into())));
        let debug = format!("{c:?}");
        assert!(!debug.contains("t0ken"), "{debug}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\r\n").unwrap();
        let file = path.to_str().unwrap();
        let c = load(&[], &[("http.auth_token_file", file)]).unwrap();
        assert_eq!(c.http.auth, HttpAuth::Bearer(Secret("from-file".into())));

        let e = load(
            &[],
            &[("http.auth_token", "a"), ("http.auth_token_file", file)],
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .starts_with("http.auth_token_file:"));
        let e = load(&[], &[("http.auth_token", "")]).unwrap_err();
        assert!(e.to_string().starts_with("http.auth_token:"), "{e}");
        let e = load(&[], &[("http.auth_token", "has space")]).unwrap_err();
        assert!(e.to_string().starts_with("http.auth_token:"), "{e}");
        assert!(!e.to_string().contains("has space"), "{e}");
        std::fs::write(&path, "\n").unwrap();
        let e = load(&[], &[("http.auth_token_file", file)]).unwrap_err();
        assert!(e.to_string().starts_with("http.auth_token_file:"), "{e}");
        let missing = dir.path().join("missing");
        let e = load(&[], &[("http.auth_token_file", missing.to_str().unwrap())]);
        assert!(e
            .unwrap_err()
            .to_string()
            .starts_with("http.auth_token_file:"));
    }

    #[test]
    fn password_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let c = load(
            &[],
            &[
                ("mqtt.username", "u"),
                ("mqtt.password_file", path.to_str().unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(c.mqtt.password.unwrap().0, "s3cret");
    }
}
