//! One function per section of the file: each reads its keys through the typed accessors
//! of [`Values`] (a key is a constant of `keys`, so a misspelt one does not compile),
//! checks them against each other, and builds that section's typed config. Every error
//! names the key it is about.
//!
//! It must not do network I/O (a URL is parsed, never connected to); the only files read
//! are the secret files (`*_file` keys).

use std::time::Duration;

use super::keys::*;
use super::parse::{check_token, fmt_dur, parse_broker_url, parse_cluster_nodes};
use super::ttl_rules::TtlRules;
use super::values::Values;
use super::{
    bad_value, key_err, ConfigError, GroupsConfig, HttpAuth, HttpConfig, MqttConfig,
    PresenceConfig, Protocol, RedisConfig, Secret,
};
use crate::device::{Levels, TopicTemplate, DEVICE_PLACEHOLDER, GROUP_PLACEHOLDER};
use crate::event_log::EventLog;
use crate::flap::FlapRule;
use crate::group_status::GroupTopic;

/// The smallest TTL supported (`presence.min_ttl` may not go below it).
const SMALLEST_TTL: Duration = Duration::from_millis(100);

pub(crate) fn mqtt(values: &Values) -> Result<MqttConfig, ConfigError> {
    let url = parse_broker_url(&values.required(&MQTT_URL)?).map_err(bad_value(&MQTT_URL))?;
    let shared_group = values.text(&MQTT_SHARED_GROUP)?;
    if let Some(group) = &shared_group {
        if group.is_empty() || group.contains(['/', '+', '#']) {
            return Err(key_err(
                &MQTT_SHARED_GROUP,
                format!("{group:?} must be a non-empty name without /, + or #"),
            ));
        }
    }
    let client_id = match values.text(&MQTT_CLIENT_ID)? {
        Some(id) if id.is_empty() => {
            return Err(key_err(&MQTT_CLIENT_ID, "must not be empty"));
        }
        Some(id) => id,
        None => default_client_id(shared_group.as_deref()),
    };
    let username = values.text(&MQTT_USERNAME)?;
    let password = secret(values, &MQTT_PASSWORD, &MQTT_PASSWORD_FILE)?.map(|(secret, _)| secret);
    if password.is_some() && username.is_none() {
        return Err(key_err(
            &MQTT_USERNAME,
            "is required when a password is set",
        ));
    }
    // Checked in this order so that of several bad keys the same one is named as always.
    let protocol = protocol(values)?;
    let (heartbeat_topic, status_topic) = topics(values)?;
    let group_topic = group_topic(values, &heartbeat_topic)?;
    let will_topic = will_topic(values, &heartbeat_topic, &status_topic)?;
    let will_payload = values.required(&MQTT_WILL_PAYLOAD)?.trim().to_lowercase();
    if will_payload.is_empty() {
        return Err(key_err(&MQTT_WILL_PAYLOAD, "must not be empty"));
    }
    Ok(MqttConfig {
        url,
        client_id,
        username,
        password,
        protocol,
        heartbeat_topic,
        status_topic,
        group_topic,
        will_topic,
        will_payload,
        shared_group,
        max_packet_size: values.required_size(&MQTT_MAX_PACKET_SIZE)?,
    })
}

fn protocol(values: &Values) -> Result<Protocol, ConfigError> {
    match values.required(&MQTT_PROTOCOL)?.as_str() {
        "v5" | "5" => Ok(Protocol::V5),
        "v3.1.1" | "3.1.1" | "v311" => Ok(Protocol::V311),
        other => Err(key_err(
            &MQTT_PROTOCOL,
            format!("{other:?} is not a protocol: use v5 or v3.1.1"),
        )),
    }
}

/// The heartbeat and status topics, which must not overlap (the monitor would read its own
/// statuses as heartbeats).
fn topics(values: &Values) -> Result<(TopicTemplate, TopicTemplate), ConfigError> {
    let template = |key: &Key, levels| {
        TopicTemplate::parse_with(&values.required(key)?, levels)
            .map_err(|e| bad_value(key)(e.into()))
    };
    let heartbeat = template(&MQTT_HEARTBEAT_TOPIC, Levels::DeviceAndGroup)?;
    let status = template(&MQTT_STATUS_TOPIC, Levels::Device)?;
    if heartbeat.overlaps(&status) {
        return Err(key_err(
            &MQTT_STATUS_TOPIC,
            "must not overlap mqtt.heartbeat_topic (no topic may match both)",
        ));
    }
    Ok((heartbeat, status))
}

/// The group topic, which must not overlap the heartbeat topic either.
fn group_topic(values: &Values, heartbeat: &TopicTemplate) -> Result<GroupTopic, ConfigError> {
    let text = values.required(&MQTT_GROUP_TOPIC)?;
    let topic = GroupTopic::parse(&text).map_err(|e| bad_value(&MQTT_GROUP_TOPIC)(e.into()))?;
    // As a device template (its group level standing for any one level): does some topic
    // match both?
    let as_template = TopicTemplate::parse(&text.replace(GROUP_PLACEHOLDER, DEVICE_PLACEHOLDER));
    if as_template.is_ok_and(|t| t.overlaps(heartbeat)) {
        return Err(key_err(
            &MQTT_GROUP_TOPIC,
            "must not overlap mqtt.heartbeat_topic (no topic may match both)",
        ));
    }
    Ok(topic)
}

/// The will topic, if set: it must name the device and must not overlap the heartbeat or
/// the status topic (a message must be one thing).
fn will_topic(
    values: &Values,
    heartbeat: &TopicTemplate,
    status: &TopicTemplate,
) -> Result<Option<TopicTemplate>, ConfigError> {
    let Some(text) = values.text(&MQTT_WILL_TOPIC)? else {
        return Ok(None);
    };
    let will = TopicTemplate::parse_with(&text, Levels::DeviceAndGroup)
        .map_err(|e| bad_value(&MQTT_WILL_TOPIC)(e.into()))?;
    for (other, name) in [
        (heartbeat, "mqtt.heartbeat_topic"),
        (status, "mqtt.status_topic"),
    ] {
        if will.overlaps(other) {
            return Err(key_err(
                &MQTT_WILL_TOPIC,
                format!("must not overlap {name} (no topic may match both)"),
            ));
        }
    }
    Ok(Some(will))
}

pub(crate) fn redis(values: &Values) -> Result<RedisConfig, ConfigError> {
    let cluster_nodes = match values.text(&REDIS_CLUSTER_NODES)? {
        None => None,
        Some(list) => Some(parse_cluster_nodes(&list).map_err(bad_value(&REDIS_CLUSTER_NODES))?),
    };
    let url = values.required(&REDIS_URL)?;
    if let Err(e) = redis::Client::open(url.as_str()) {
        return Err(key_err(&REDIS_URL, format!("invalid URL: {e}")));
    }
    let key_prefix = values.required(&REDIS_KEY_PREFIX)?;
    if key_prefix.is_empty() || key_prefix.contains(['{', '}']) {
        return Err(key_err(
            &REDIS_KEY_PREFIX,
            "must be non-empty and must not contain { or } (they are hash tags)",
        ));
    }
    Ok(RedisConfig {
        url: Secret(url),
        cluster_nodes,
        key_prefix,
        configure_notifications: values.flag(&REDIS_CONFIGURE_NOTIFICATIONS)?.unwrap_or(true),
    })
}

pub(crate) fn presence(values: &Values) -> Result<PresenceConfig, ConfigError> {
    let ttl = values.required_duration(&PRESENCE_TTL)?;
    let min_ttl = values.required_duration(&PRESENCE_MIN_TTL)?;
    let max_ttl = values.required_duration(&PRESENCE_MAX_TTL)?;
    if min_ttl < SMALLEST_TTL {
        return Err(key_err(
            &PRESENCE_MIN_TTL,
            format!(
                "{} is below the smallest supported TTL, {}",
                fmt_dur(min_ttl),
                fmt_dur(SMALLEST_TTL)
            ),
        ));
    }
    if min_ttl > max_ttl {
        return Err(key_err(
            &PRESENCE_MIN_TTL,
            format!(
                "{} must not exceed presence.max_ttl ({})",
                fmt_dur(min_ttl),
                fmt_dur(max_ttl)
            ),
        ));
    }
    if ttl < min_ttl || ttl > max_ttl {
        return Err(key_err(
            &PRESENCE_TTL,
            format!(
                "{} must lie within presence.min_ttl ({}) and presence.max_ttl ({})",
                fmt_dur(ttl),
                fmt_dur(min_ttl),
                fmt_dur(max_ttl)
            ),
        ));
    }
    let ttl_rules = match values.text(&PRESENCE_TTL_RULES)? {
        Some(text) => {
            TtlRules::parse(&text, min_ttl, max_ttl).map_err(|e| key_err(&PRESENCE_TTL_RULES, e))?
        }
        None => TtlRules::default(),
    };
    Ok(PresenceConfig {
        ttl,
        min_ttl,
        max_ttl,
        forget_after: values.duration(&PRESENCE_FORGET_AFTER)?,
        ttl_rules,
        flap: flap_rule(values)?,
    })
}

fn flap_rule(values: &Values) -> Result<FlapRule, ConfigError> {
    let threshold = values.required_count(&PRESENCE_FLAP_THRESHOLD)?;
    let threshold =
        u32::try_from(threshold).map_err(|_| key_err(&PRESENCE_FLAP_THRESHOLD, "too large"))?;
    let half_life = values.required_duration(&PRESENCE_FLAP_HALF_LIFE)?;
    if half_life < Duration::from_millis(1) {
        return Err(key_err(&PRESENCE_FLAP_HALF_LIFE, "must be at least 1ms"));
    }
    Ok(FlapRule {
        threshold,
        half_life,
    })
}

pub(crate) fn groups(values: &Values) -> Result<GroupsConfig, ConfigError> {
    let window = values.required_duration(&GROUPS_OUTAGE_WINDOW)?;
    if window.is_zero() {
        return Err(key_err(&GROUPS_OUTAGE_WINDOW, "must be longer than 0s"));
    }
    let max_series = values.required_count(&GROUPS_MAX_SERIES)?;
    Ok(GroupsConfig {
        outage_min_devices: values.required_count(&GROUPS_OUTAGE_MIN_DEVICES)?,
        outage_fraction: values.required_fraction(&GROUPS_OUTAGE_FRACTION)?,
        outage_window: window,
        recovery_fraction: values.required_fraction(&GROUPS_RECOVERY_FRACTION)?,
        max_series: usize::try_from(max_series)
            .map_err(|_| key_err(&GROUPS_MAX_SERIES, "too large"))?,
    })
}

pub(crate) fn http(values: &Values) -> Result<HttpConfig, ConfigError> {
    let listen_text = values.required(&HTTP_LISTEN)?;
    let listen = listen_text.parse().map_err(|_| {
        key_err(
            &HTTP_LISTEN,
            format!("{listen_text:?} is not an address like 127.0.0.1:9464"),
        )
    })?;
    let auth = match secret(values, &HTTP_AUTH_TOKEN, &HTTP_AUTH_TOKEN_FILE)? {
        None => HttpAuth::Open,
        Some((token, from)) => {
            check_token(&token.0).map_err(bad_value(from))?;
            HttpAuth::Bearer(token)
        }
    };
    let retention = values.required_duration(&HTTP_EVENTS_RETENTION)?;
    let events = EventLog::new(retention).map_err(|e| key_err(&HTTP_EVENTS_RETENTION, e))?;
    Ok(HttpConfig {
        listen,
        auth,
        events,
    })
}

/// A secret given either inline (`inline`) or in a file (`file`): at most one of them, the
/// file's content without its trailing newline. Returns the secret and the key it came
/// from, for errors about its content.
fn secret<'k>(
    values: &Values,
    inline: &'k Key,
    file: &'k Key,
) -> Result<Option<(Secret, &'k Key)>, ConfigError> {
    match (values.text(inline)?, values.text(file)?) {
        (Some(_), Some(_)) => Err(key_err(
            file,
            format!("set either {} or {}, not both", inline.path(), file.path()),
        )),
        (Some(v), None) => Ok(Some((Secret(v), inline))),
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(&path).map_err(|source| ConfigError::SecretFile {
                    key: file.path(),
                    path: path.clone(),
                    source,
                })?;
            let trimmed = text
                .strip_suffix('\n')
                .map(|s| s.strip_suffix('\r').unwrap_or(s))
                .unwrap_or(&text);
            Ok(Some((Secret(trimmed.to_owned()), file)))
        }
        (None, None) => Ok(None),
    }
}

/// `presenced-<hostname>`; with a shared group a random suffix too, so that replicas
/// started from one config do not take each other's session.
fn default_client_id(shared_group: Option<&str>) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    match shared_group {
        Some(_) => format!("presenced-{host}-{:08x}", fastrand::u32(..)),
        None => format!("presenced-{host}"),
    }
}
