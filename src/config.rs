//! Configuration: the contract's keys, read from a TOML file, then `PRESENCED_<SECTION>_<KEY>`
//! environment variables, then `--<section>-<key>` flags (later wins), and validated into
//! typed [`Config`].
//!
//! [`KEYS`] is the single list of keys: it drives the file check, the environment names,
//! the command-line flags and the example config. Every error names the key it is about.
//! This module does no network I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::TopicTemplate;

/// The largest MQTT packet the protocol allows (variable byte integer limit).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// The kind of value a key holds; it decides how a string from env or a flag is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Duration,
    /// A number of bytes, or a string with `B`, `KiB` or `MiB`.
    Size,
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

/// Every key of the contract, in the order of `CONTRACT.md`.
pub const KEYS: &[Key] = &[
    key!(
        "mqtt",
        "url",
        Str,
        Some("mqtt://127.0.0.1:1883"),
        "Broker URL; mqtts:// for TLS (CA from the system store or SSL_CERT_FILE)."
    ),
    key!(
        "mqtt",
        "client_id",
        Str,
        None,
        "Stable client id (default presenced-<hostname>, plus -<random> with a shared group)."
    ),
    key!("mqtt", "username", Str, None, "Broker user name."),
    key!(
        "mqtt",
        "password",
        Str,
        None,
        "Broker password (prefer mqtt.password_file or the environment)."
    ),
    key!(
        "mqtt",
        "password_file",
        Str,
        None,
        "File holding the broker password (trailing newline trimmed)."
    ),
    key!(
        "mqtt",
        "protocol",
        Str,
        Some("v5"),
        "MQTT protocol: v5 or v3.1.1."
    ),
    key!(
        "mqtt",
        "heartbeat_topic",
        Str,
        Some("devices/{device}/heartbeat"),
        "Heartbeat topic; {device} is one whole topic level."
    ),
    key!(
        "mqtt",
        "status_topic",
        Str,
        Some("devices/{device}/status"),
        "Where status is republished (retained, QoS 1)."
    ),
    key!(
        "mqtt",
        "shared_group",
        Str,
        None,
        "Share heartbeats between replicas via $share/<group>/..."
    ),
    key!(
        "mqtt",
        "max_packet_size",
        Size,
        Some("1MiB"),
        "Largest heartbeat payload accepted (bytes, or with B, KiB, MiB)."
    ),
    key!(
        "redis",
        "url",
        Str,
        Some("redis://127.0.0.1:6379/0"),
        "Redis URL; rediss:// for TLS; user/password in the URL."
    ),
    key!(
        "redis",
        "cluster_nodes",
        Str,
        None,
        "Comma-separated Redis Cluster seed URLs (any nodes; auth in the URL; db 0 only); if set, Cluster mode and redis.url is ignored."
    ),
    key!(
        "redis",
        "key_prefix",
        Str,
        Some("presence"),
        "Prefix of every Redis key the monitor writes."
    ),
    key!(
        "redis",
        "configure_notifications",
        Bool,
        Some("true"),
        "Enable E and x in notify-keyspace-events, keeping flags already set."
    ),
    key!("presence", "ttl", Duration, Some("30s"), "Heartbeat TTL."),
    key!(
        "presence",
        "min_ttl",
        Duration,
        Some("1s"),
        "Smallest TTL a heartbeat may ask for."
    ),
    key!(
        "presence",
        "max_ttl",
        Duration,
        Some("24h"),
        "Largest TTL a heartbeat may ask for."
    ),
    key!(
        "presence",
        "forget_after",
        Duration,
        None,
        "Forget devices offline for longer than this (from their offline since); unset: kept forever."
    ),
    key!(
        "http",
        "listen",
        Str,
        Some("127.0.0.1:9464"),
        "Address of the metrics, health and device API."
    ),
    key!(
        "http",
        "auth_token",
        Str,
        None,
        "Bearer token every route but /, /healthz and /readyz requires (prefer http.auth_token_file or the environment)."
    ),
    key!(
        "http",
        "auth_token_file",
        Str,
        None,
        "File holding the HTTP bearer token (trailing newline trimmed)."
    ),
];

/// Environment variables that are not config keys but are known (not warned about).
pub const OTHER_ENV: &[&str] = &["PRESENCED_CONFIG", "PRESENCED_LOG_FORMAT"];

// === Errors ===

/// A configuration error. Its message is one line that names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Key { key: String, message: String },
    #[error("{key}: unknown key in the config file")]
    UnknownKey { key: String },
}

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_owned(),
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
        match &self.shared_group {
            Some(group) => format!("$share/{group}/{}", self.heartbeat_topic.filter()),
            None => self.heartbeat_topic.filter(),
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
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub auth: HttpAuth,
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

/// A raw value before typing: TOML gives typed values, env and flags give strings.
#[derive(Clone, Debug)]
enum Raw {
    Toml(toml::Value),
    Text(String),
}

impl Config {
    /// Loads and validates the configuration from its three sources.
    pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
        let mut raw: BTreeMap<String, Raw> = BTreeMap::new();
        let mut warnings = Vec::new();

        if let Some(path) = &sources.file {
            for (key, value) in read_file(path)? {
                raw.insert(key, Raw::Toml(value));
            }
        }
        for (name, value) in &sources.env {
            if !name.starts_with("PRESENCED_") || OTHER_ENV.contains(&name.as_str()) {
                continue;
            }
            match KEYS.iter().find(|k| k.env_var() == *name) {
                Some(key) => {
                    raw.insert(key.path(), Raw::Text(value.clone()));
                }
                None => warnings.push(format!("unknown environment variable {name} ignored")),
            }
        }
        for (key, value) in &sources.flags {
            raw.insert(key.clone(), Raw::Text(value.clone()));
        }
        let config = Self::from_raw(&raw)?;
        Ok(Loaded { config, warnings })
    }

    fn from_raw(raw: &BTreeMap<String, Raw>) -> Result<Config, ConfigError> {
        let get = |path: &str| -> Result<Option<Value>, ConfigError> {
            let key = KEYS
                .iter()
                .find(|k| k.path() == path)
                .ok_or_else(|| key_err(path, "not a configuration key"))?;
            match raw.get(path) {
                Some(v) => typed(key, v).map(Some),
                None => match key.default {
                    Some(d) => typed(key, &Raw::Text(d.to_owned())).map(Some),
                    None => Ok(None),
                },
            }
        };
        let string = |path: &str| -> Result<Option<String>, ConfigError> {
            Ok(get(path)?.map(|v| v.into_string()))
        };
        let required = |path: &str| -> Result<String, ConfigError> {
            string(path)?.ok_or_else(|| key_err(path, "is required"))
        };
        let duration = |path: &str| -> Result<Duration, ConfigError> {
            match get(path)? {
                Some(Value::Duration(d)) => Ok(d),
                _ => Err(key_err(path, "is required")),
            }
        };

        // --- mqtt ---
        let url = parse_broker_url(&required("mqtt.url")?).map_err(|m| key_err("mqtt.url", m))?;
        let shared_group = string("mqtt.shared_group")?;
        if let Some(group) = &shared_group {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(key_err(
                    "mqtt.shared_group",
                    format!("{group:?} must be a non-empty name without /, + or #"),
                ));
            }
        }
        let client_id = match string("mqtt.client_id")? {
            Some(id) if id.is_empty() => {
                return Err(key_err("mqtt.client_id", "must not be empty"));
            }
            Some(id) => id,
            None => default_client_id(shared_group.is_some()),
        };
        let username = string("mqtt.username")?;
        let password = secret(
            ("mqtt.password", string("mqtt.password")?),
            ("mqtt.password_file", string("mqtt.password_file")?),
        )?
        .map(|(secret, _)| secret);
        if password.is_some() && username.is_none() {
            return Err(key_err(
                "mqtt.username",
                "is required when a password is set",
            ));
        }
        let protocol = match required("mqtt.protocol")?.as_str() {
            "v5" | "5" => Protocol::V5,
            "v3.1.1" | "3.1.1" | "v311" => Protocol::V311,
            other => {
                return Err(key_err(
                    "mqtt.protocol",
                    format!("{other:?} is not a protocol: use v5 or v3.1.1"),
                ))
            }
        };
        let heartbeat_topic = TopicTemplate::parse(&required("mqtt.heartbeat_topic")?)
            .map_err(|m| key_err("mqtt.heartbeat_topic", m))?;
        let status_topic = TopicTemplate::parse(&required("mqtt.status_topic")?)
            .map_err(|m| key_err("mqtt.status_topic", m))?;
        if heartbeat_topic == status_topic {
            return Err(key_err(
                "mqtt.status_topic",
                "must differ from mqtt.heartbeat_topic",
            ));
        }
        let max_packet_size = match get("mqtt.max_packet_size")? {
            Some(Value::Size(n)) => n,
            _ => return Err(key_err("mqtt.max_packet_size", "is required")),
        };

        // --- redis ---
        let cluster_nodes = match string("redis.cluster_nodes")? {
            None => None,
            Some(list) => {
                Some(parse_cluster_nodes(&list).map_err(|m| key_err("redis.cluster_nodes", m))?)
            }
        };
        let redis_url = required("redis.url")?;
        if let Err(e) = redis::Client::open(redis_url.as_str()) {
            return Err(key_err("redis.url", format!("invalid URL: {e}")));
        }
        let key_prefix = required("redis.key_prefix")?;
        if key_prefix.is_empty() || key_prefix.contains(['{', '}']) {
            return Err(key_err(
                "redis.key_prefix",
                "must be non-empty and must not contain { or } (they are hash tags)",
            ));
        }
        let configure_notifications = match get("redis.configure_notifications")? {
            Some(Value::Bool(b)) => b,
            _ => true,
        };

        // --- presence ---
        let ttl = duration("presence.ttl")?;
        let min_ttl = duration("presence.min_ttl")?;
        let max_ttl = duration("presence.max_ttl")?;
        if min_ttl < Duration::from_millis(100) {
            return Err(key_err(
                "presence.min_ttl",
                format!(
                    "{} is below the smallest supported TTL, 100ms",
                    fmt_dur(min_ttl)
                ),
            ));
        }
        if min_ttl > max_ttl {
            return Err(key_err(
                "presence.min_ttl",
                format!(
                    "{} must not exceed presence.max_ttl ({})",
                    fmt_dur(min_ttl),
                    fmt_dur(max_ttl)
                ),
            ));
        }
        if ttl < min_ttl || ttl > max_ttl {
            return Err(key_err(
                "presence.ttl",
                format!(
                    "{} must lie within presence.min_ttl ({}) and presence.max_ttl ({})",
                    fmt_dur(ttl),
                    fmt_dur(min_ttl),
                    fmt_dur(max_ttl)
                ),
            ));
        }

        let forget_after = match get("presence.forget_after")? {
            Some(Value::Duration(d)) => Some(d),
            _ => None,
        };

        // --- http ---
        let listen_text = required("http.listen")?;
        let listen = listen_text.parse().map_err(|_| {
            key_err(
                "http.listen",
                format!("{listen_text:?} is not an address like 127.0.0.1:9464"),
            )
        })?;

        let auth = match secret(
            ("http.auth_token", string("http.auth_token")?),
            ("http.auth_token_file", string("http.auth_token_file")?),
        )? {
            None => HttpAuth::Open,
            Some((token, from)) => {
                check_token(&token.0).map_err(|m| key_err(from, m))?;
                HttpAuth::Bearer(token)
            }
        };

        Ok(Config {
            mqtt: MqttConfig {
                url,
                client_id,
                username,
                password,
                protocol,
                heartbeat_topic,
                status_topic,
                shared_group,
                max_packet_size,
            },
            redis: RedisConfig {
                url: Secret(redis_url),
                cluster_nodes,
                key_prefix,
                configure_notifications,
            },
            presence: PresenceConfig {
                ttl,
                min_ttl,
                max_ttl,
                forget_after,
            },
            http: HttpConfig { listen, auth },
        })
    }
}

/// A secret given either inline (`value`) or in a file (`file`), each `(key, value)`: at most
/// one of them, the file's content without its trailing newline. Returns the secret and the
/// key it came from, for errors about its content.
fn secret(
    value: (&'static str, Option<String>),
    file: (&'static str, Option<String>),
) -> Result<Option<(Secret, &'static str)>, ConfigError> {
    match (value, file) {
        ((value_key, Some(_)), (file_key, Some(_))) => Err(key_err(
            file_key,
            format!("set either {value_key} or {file_key}, not both"),
        )),
        ((value_key, Some(v)), _) => Ok(Some((Secret(v), value_key))),
        (_, (file_key, Some(path))) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| key_err(file_key, format!("cannot read {path}: {e}")))?;
            let trimmed = text
                .strip_suffix('\n')
                .map(|s| s.strip_suffix('\r').unwrap_or(s))
                .unwrap_or(&text);
            Ok(Some((Secret(trimmed.to_owned()), file_key)))
        }
        (_, (_, None)) => Ok(None),
    }
}

/// A bearer token must be presentable in an `Authorization` header: visible ASCII, no
/// spaces. The message never quotes the token.
fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token must not be empty".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be visible ASCII without spaces or control characters".into());
    }
    Ok(())
}

/// A value after typing.
enum Value {
    Str(String),
    Bool(bool),
    Duration(Duration),
    Size(usize),
}

impl Value {
    fn into_string(self) -> String {
        match self {
            Value::Str(s) => s,
            Value::Bool(b) => b.to_string(),
            Value::Duration(d) => fmt_dur(d),
            Value::Size(n) => n.to_string(),
        }
    }
}

fn typed(key: &Key, raw: &Raw) -> Result<Value, ConfigError> {
    let path = key.path();
    let text = match raw {
        Raw::Text(s) => s.clone(),
        Raw::Toml(toml::Value::String(s)) => s.clone(),
        Raw::Toml(toml::Value::Boolean(b)) if key.kind == Kind::Bool => {
            return Ok(Value::Bool(*b));
        }
        Raw::Toml(toml::Value::Integer(n)) if key.kind == Kind::Size => {
            return size_value(&path, *n);
        }
        Raw::Toml(other) => {
            let expected = match key.kind {
                Kind::Str => "a string",
                Kind::Bool => "true or false",
                Kind::Duration => "a duration string like \"30s\"",
                Kind::Size => "a number of bytes or a string like \"1MiB\"",
            };
            return Err(key_err(
                &path,
                format!("expected {expected}, found {}", other.type_str()),
            ));
        }
    };
    match key.kind {
        Kind::Str => Ok(Value::Str(text)),
        Kind::Bool => match text.trim() {
            "true" | "1" | "yes" => Ok(Value::Bool(true)),
            "false" | "0" | "no" => Ok(Value::Bool(false)),
            other => Err(key_err(&path, format!("{other:?} is not true or false"))),
        },
        Kind::Duration => parse_duration(&text)
            .map(Value::Duration)
            .map_err(|m| key_err(&path, m)),
        Kind::Size => parse_size(&text)
            .and_then(|n| i64::try_from(n).map_err(|_| "too large".to_owned()))
            .map_err(|m| key_err(&path, m))
            .and_then(|n| size_value(&path, n)),
    }
}

fn size_value(path: &str, n: i64) -> Result<Value, ConfigError> {
    if n < 1 || n as u64 > MQTT_MAX_PACKET as u64 {
        return Err(key_err(
            path,
            format!("{n} bytes is outside 1 B to {MQTT_MAX_PACKET} B (the MQTT limit)"),
        ));
    }
    Ok(Value::Size(n as usize))
}

/// Parses `"30s"`, `"1500ms"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"30s\" or \"1500ms\" ({e})"))?;
    if d.is_zero() {
        return Err(format!("{text:?} must be greater than zero"));
    }
    Ok(d)
}

/// Parses `"1048576"`, `"512B"`, `"64KiB"`, `"1MiB"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("MiB") {
        (n, 1024 * 1024)
    } else if let Some(n) = t.strip_suffix("KiB") {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix('B') {
        (n, 1)
    } else {
        (t, 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{text:?} is not a size like 1048576, \"512KiB\" or \"1MiB\""))
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Reads the TOML file into `section.key → value`, refusing unknown sections and keys.
fn read_file(path: &Path) -> Result<Vec<(String, toml::Value)>, ConfigError> {
    let file_err = |message: String| ConfigError::File {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_err(e.message().to_owned()))?;
    let mut out = Vec::new();
    for (section, value) in table {
        let toml::Value::Table(keys) = value else {
            return Err(ConfigError::UnknownKey { key: section });
        };
        for (name, value) in keys {
            let path = format!("{section}.{name}");
            if !KEYS.iter().any(|k| k.path() == path) {
                return Err(ConfigError::UnknownKey { key: path });
            }
            out.push((path, value));
        }
    }
    Ok(out)
}

fn parse_broker_url(text: &str) -> Result<BrokerUrl, String> {
    let bad = || format!("{text:?} is not a broker URL like mqtt://host:1883 or mqtts://host:8883");
    let (tls, rest) = if let Some(r) = text.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = text.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(bad());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '@', '?', '#']) {
        return Err(bad());
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default_port,
            None => return Err(bad()),
        };
        (host.to_owned(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad())?),
            None => (rest.to_owned(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok(BrokerUrl { tls, host, port })
}

fn default_client_id(shared: bool) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    if shared {
        format!("presenced-{host}-{:08x}", fastrand::u32(..))
    } else {
        format!("presenced-{host}")
    }
}

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
            Some(d) if key.kind == Kind::Bool => out.push_str(&format!("{} = {d}\n", key.name)),
            Some(d) => out.push_str(&format!("{} = {d:?}\n", key.name)),
            None => out.push_str(&format!("# {} = \"\"\n", key.name)),
        }
    }
    out
}

/// The seed list of `redis.cluster_nodes`: comma-separated `redis://` or `rediss://` URLs of
/// any cluster nodes, database 0 (Redis Cluster has no other).
fn parse_cluster_nodes(list: &str) -> Result<Vec<Secret>, String> {
    let urls: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("needs at least one node URL (e.g. redis://10.0.0.1:6379)".into());
    }
    for url in &urls {
        // The URL may hold a password: name it by position, never echo it.
        let client = redis::Client::open(*url).map_err(|e| {
            format!(
                "node {} is not a valid Redis URL: {e}",
                position(&urls, url)
            )
        })?;
        let info = client.get_connection_info();
        if !matches!(
            info.addr(),
            redis::ConnectionAddr::Tcp(..) | redis::ConnectionAddr::TcpTls { .. }
        ) {
            return Err(format!(
                "node {} must be a redis:// or rediss:// URL",
                position(&urls, url)
            ));
        }
        if info.redis_settings().db() != 0 {
            return Err(format!(
                "node {} selects database {}; Redis Cluster has database 0 only",
                position(&urls, url),
                info.redis_settings().db()
            ));
        }
    }
    redis::cluster::ClusterClient::new(urls.clone())
        .map_err(|e| format!("the seed list is not usable: {e}"))?;
    Ok(urls.into_iter().map(|u| Secret(u.to_owned())).collect())
}

fn position(urls: &[&str], url: &str) -> usize {
    urls.iter().position(|u| *u == url).map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
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
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("10B"), Ok(10));
        assert_eq!(parse_size("10"), Ok(10));
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
