//! Pure domain types: device ids, topic templates, heartbeat payloads, device records and
//! the status payload published over MQTT.
//!
//! Nothing here does I/O. Inputs from the outside world (topics, payloads, Redis records)
//! are parsed here once, at the edge; the rest of the crate takes the parsed types and never
//! re-checks them.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The longest device id accepted, in bytes (contract: 1 to 128 bytes of UTF-8).
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// The placeholder for the device id in topic templates.
pub const DEVICE_PLACEHOLDER: &str = "{device}";

/// The placeholder for the device's group in a heartbeat (or will) topic template.
pub const GROUP_PLACEHOLDER: &str = "{group}";

/// The longest group name accepted, in bytes (contract: 1 to 64 bytes of UTF-8).
pub const MAX_GROUP_LEN: usize = 64;

/// Milliseconds since the Unix epoch: the one time unit used across the crate and in Redis.
pub type Millis = u64;

/// The wall clock, in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Formats a time as RFC 3339 UTC with exactly three fractional digits and `Z`.
pub fn format_time(ms: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Parses a time as [`format_time`] writes it (any RFC 3339 UTC time is accepted).
pub fn parse_time(s: &str) -> Option<Millis> {
    let t = humantime::parse_rfc3339(s).ok()?;
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as Millis)
}

// === impl DeviceId ===

/// A validated device id: 1 to 128 bytes of UTF-8 without control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

/// Why a device id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDeviceId {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {0} bytes long, more than {MAX_DEVICE_ID_LEN}")]
    TooLong(usize),
    #[error("device id contains a control character")]
    ControlCharacter,
    #[error("device id is not valid UTF-8")]
    NotUtf8,
}

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, InvalidDeviceId> {
        if s.is_empty() {
            return Err(InvalidDeviceId::Empty);
        }
        if s.len() > MAX_DEVICE_ID_LEN {
            return Err(InvalidDeviceId::TooLong(s.len()));
        }
        if s.chars().any(char::is_control) {
            return Err(InvalidDeviceId::ControlCharacter);
        }
        Ok(DeviceId(s.to_owned()))
    }

    pub fn parse_bytes(b: &[u8]) -> Result<Self, InvalidDeviceId> {
        std::str::from_utf8(b)
            .map_err(|_| InvalidDeviceId::NotUtf8)
            .and_then(Self::parse)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl GroupName ===

/// A validated group name: 1 to 64 bytes of UTF-8 without control characters, `/`, `+` or
/// `#`. Cheap to clone (held heartbeats carry one each).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(std::sync::Arc<str>);

/// Why a group name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidGroup {
    #[error("group name is empty")]
    Empty,
    #[error("group name is {0} bytes long, more than {MAX_GROUP_LEN}")]
    TooLong(usize),
    #[error("group name contains a control character")]
    ControlCharacter,
    #[error("group name contains /, + or #")]
    TopicCharacter,
}

impl GroupName {
    pub fn parse(s: &str) -> Result<Self, InvalidGroup> {
        if s.is_empty() {
            return Err(InvalidGroup::Empty);
        }
        if s.len() > MAX_GROUP_LEN {
            return Err(InvalidGroup::TooLong(s.len()));
        }
        if s.chars().any(char::is_control) {
            return Err(InvalidGroup::ControlCharacter);
        }
        if s.contains(['/', '+', '#']) {
            return Err(InvalidGroup::TopicCharacter);
        }
        Ok(GroupName(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The group a JSON object payload names in `"group"`: `None` if it names none; an error
/// if it names an invalid one (a heartbeat all the same).
pub fn payload_group(payload: &[u8]) -> Option<Result<GroupName, InvalidGroup>> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        group: Option<serde_json::Value>,
    }
    let Ok(Payload { group: Some(v) }) = serde_json::from_slice::<Payload>(payload) else {
        return None;
    };
    match v.as_str() {
        Some(s) => Some(GroupName::parse(s)),
        None => Some(Err(InvalidGroup::Empty)),
    }
}

// === impl TopicTemplate ===

/// A topic with exactly one level that is `{device}`, e.g. `devices/{device}/heartbeat`,
/// and (where [`Levels::DeviceAndGroup`] allows it) at most one other that is `{group}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    levels: Vec<String>,
    device_level: usize,
    group_level: Option<usize>,
}

/// Which placeholders a template may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Levels {
    /// `{device}` only (a topic the monitor publishes to).
    Device,
    /// `{device}` and optionally `{group}` (a topic devices publish to).
    DeviceAndGroup,
}

/// Why a topic template was refused (the message does not name the config key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTemplate {
    #[error("topic template is empty")]
    Empty,
    #[error("{DEVICE_PLACEHOLDER} appears more than once")]
    DeviceTwice,
    #[error("{DEVICE_PLACEHOLDER} must be a whole topic level")]
    DeviceInsideLevel,
    #[error("wildcards (+, #) are not allowed in a template")]
    Wildcard,
    #[error("NUL is not allowed in a topic")]
    Nul,
    #[error("must contain {DEVICE_PLACEHOLDER} as one level")]
    NoDevice,
    #[error("{GROUP_PLACEHOLDER} appears more than once")]
    GroupTwice,
    #[error("{GROUP_PLACEHOLDER} must be a whole topic level")]
    GroupInsideLevel,
    #[error("{GROUP_PLACEHOLDER} is not allowed in this topic")]
    GroupNotAllowed,
}

impl TopicTemplate {
    /// Parses a template with `{device}` only.
    pub fn parse(template: &str) -> Result<Self, BadTemplate> {
        Self::parse_with(template, Levels::Device)
    }

    /// Parses a template with the placeholders `levels` allows.
    pub fn parse_with(template: &str, allowed: Levels) -> Result<Self, BadTemplate> {
        if template.is_empty() {
            return Err(BadTemplate::Empty);
        }
        let levels: Vec<String> = template.split('/').map(str::to_owned).collect();
        let mut device_level = None;
        let mut group_level = None;
        for (i, level) in levels.iter().enumerate() {
            if level == DEVICE_PLACEHOLDER {
                if device_level.replace(i).is_some() {
                    return Err(BadTemplate::DeviceTwice);
                }
            } else if level == GROUP_PLACEHOLDER {
                if allowed == Levels::Device {
                    return Err(BadTemplate::GroupNotAllowed);
                }
                if group_level.replace(i).is_some() {
                    return Err(BadTemplate::GroupTwice);
                }
            } else if level.contains(GROUP_PLACEHOLDER) {
                return Err(BadTemplate::GroupInsideLevel);
            } else if level.contains(DEVICE_PLACEHOLDER) {
                return Err(BadTemplate::DeviceInsideLevel);
            } else if level.contains(['+', '#']) {
                return Err(BadTemplate::Wildcard);
            } else if level.contains('\0') {
                return Err(BadTemplate::Nul);
            }
        }
        match device_level {
            Some(device_level) => Ok(TopicTemplate {
                levels,
                device_level,
                group_level,
            }),
            None => Err(BadTemplate::NoDevice),
        }
    }

    /// The subscription filter: the template with `{device}` (and `{group}`) replaced by `+`.
    pub fn filter(&self) -> String {
        self.render_with("+", "+")
    }

    /// The topic for one device (a template without `{group}`).
    pub fn render(&self, device: &DeviceId) -> String {
        self.render_with(device.as_str(), GROUP_PLACEHOLDER)
    }

    /// The topic for one device of a group (a template with `{group}`; tests, simulator).
    pub fn render_in(&self, device: &DeviceId, group: &GroupName) -> String {
        self.render_with(device.as_str(), group.as_str())
    }

    /// Whether the template has a `{group}` level.
    pub fn has_group(&self) -> bool {
        self.group_level.is_some()
    }

    fn render_with(&self, device: &str, group: &str) -> String {
        let mut out = String::new();
        for (i, level) in self.levels.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            out.push_str(if i == self.device_level {
                device
            } else if Some(i) == self.group_level {
                group
            } else {
                level
            });
        }
        out
    }

    /// Extracts the raw device level from a topic that matches the template, or `None` if the
    /// topic does not match it.
    pub fn extract<'a>(&self, topic: &'a str) -> Option<&'a str> {
        self.extract_levels(topic).map(|(device, _)| device)
    }

    /// The raw device level and the raw group level (if the template has one) of a topic that
    /// matches the template.
    pub fn extract_levels<'a>(&self, topic: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let (mut device, mut group) = (None, None);
        let mut n = 0;
        for (i, level) in topic.split('/').enumerate() {
            let expected = self.levels.get(i)?;
            if i == self.device_level {
                device = Some(level);
            } else if Some(i) == self.group_level {
                group = Some(level);
            } else if level != expected {
                return None;
            }
            n += 1;
        }
        if n == self.levels.len() {
            Some((device?, group))
        } else {
            None
        }
    }

    /// Whether a topic could match both templates (used to refuse a heartbeat topic that
    /// overlaps the status topic: the monitor would hear its own statuses as heartbeats).
    pub fn overlaps(&self, other: &TopicTemplate) -> bool {
        let wild = |t: &TopicTemplate, i: usize| i == t.device_level || Some(i) == t.group_level;
        self.levels.len() == other.levels.len()
            && (0..self.levels.len())
                .all(|i| wild(self, i) || wild(other, i) || self.levels[i] == other.levels[i])
    }
}

// === Heartbeat payload ===

/// The TTL a heartbeat asks for, from an optional JSON object `{"ttl_s": <number>}`.
///
/// Any payload is a valid heartbeat; only a JSON object with a positive finite numeric
/// `ttl_s` overrides the default. The result is clamped to `[min, max]`.
pub fn heartbeat_ttl(payload: &[u8], default: Duration, min: Duration, max: Duration) -> Duration {
    // Cheap pre-check: only something that looks like an object can carry ttl_s.
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return default;
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        ttl_s: Option<serde_json::Value>,
    }
    let Ok(Payload { ttl_s: Some(v) }) = serde_json::from_slice::<Payload>(payload) else {
        return default;
    };
    match v.as_f64() {
        Some(s) if s.is_finite() && s > 0.0 => {
            let requested = Duration::try_from_secs_f64(s).unwrap_or(max);
            requested.clamp(min, max)
        }
        _ => default,
    }
}

// === State, records, events ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Online,
    Offline,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Online => "online",
            State::Offline => "offline",
        }
    }

    fn from_flag(flag: &str) -> Option<State> {
        match flag {
            "1" => Some(State::Online),
            "0" => Some(State::Offline),
            _ => None,
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            State::Online => "1",
            State::Offline => "0",
        }
    }
}

/// Why a transition was made (the status's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// To online: a heartbeat.
    Heartbeat,
    /// To offline: the TTL ran out.
    TtlExpired,
    /// To offline: the device's own will arrived.
    Will,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Heartbeat => "heartbeat",
            Reason::TtlExpired => "ttl_expired",
            Reason::Will => "will",
        }
    }

    /// The reason of a transition to `state`, given whether a will made it.
    pub(crate) fn of(state: State, by_will: bool) -> Reason {
        match (state, by_will) {
            (State::Online, _) => Reason::Heartbeat,
            (State::Offline, true) => Reason::Will,
            (State::Offline, false) => Reason::TtlExpired,
        }
    }
}

/// One transition as committed in Redis: what the status payload says.
///
/// Its wire form in Redis (the outbox member) is `seq|state|since|last_seen|detected_at|id`,
/// id last because it may contain `|`, prefixed by `f<flags>|` when it has flags (`p`
/// flapping, `w` taken offline by a will), then by `l<length>|<group>|` for the group it left,
/// then by `g<length>|<group>|` for a device with a group. The same string identifies the
/// outbox entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusEvent {
    pub device: DeviceId,
    pub state: State,
    pub seq: u64,
    pub since: Millis,
    /// For an online status equal to `since`; for offline the last heartbeat before it.
    pub last_seen: Millis,
    pub detected_at: Millis,
    pub group: Option<GroupName>,
    /// The group an offline device left by coming back online in another one: noted there
    /// as back (its outage counts it recovered). Not in the payload.
    pub left: Option<GroupName>,
    pub reason: Reason,
    /// Whether the device was flapping as of this transition.
    pub flapping: bool,
}

/// The JSON of a status (MQTT payload) and of a device record (HTTP API): the same fields.
#[derive(Serialize)]
pub struct StatusJson<'a> {
    device: &'a str,
    state: &'static str,
    since: String,
    last_seen: String,
    detected_at: String,
    reason: &'static str,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    flapping: bool,
}

impl<'a> StatusJson<'a> {
    /// A status's JSON; `flapping` as given (as of the transition, or as of now for a record).
    fn new(ev: &'a StatusEvent, flapping: bool) -> Self {
        StatusJson {
            group: ev.group.as_ref().map(GroupName::as_str),
            device: ev.device.as_str(),
            state: ev.state.as_str(),
            since: format_time(ev.since),
            last_seen: format_time(ev.last_seen),
            detected_at: format_time(ev.detected_at),
            reason: ev.reason.as_str(),
            seq: ev.seq,
            flapping,
        }
    }
}

impl StatusEvent {
    /// Parses an outbox member; `None` if it is malformed (never produced by our scripts).
    pub fn parse_member(member: &str) -> Option<StatusEvent> {
        let (group, member) = group_prefix(member, 'g')?;
        let (left, member) = group_prefix(member, 'l')?;
        let (flags, member) = match member.strip_prefix('f') {
            Some(rest) => rest.split_once('|')?,
            None => ("", member),
        };
        if !flags.chars().all(|c| c == 'p' || c == 'w') {
            return None;
        }
        let mut parts = member.splitn(6, '|');
        let seq = parts.next()?.parse().ok()?;
        let state = State::from_flag(parts.next()?)?;
        let since = parts.next()?.parse().ok()?;
        let last_seen = parts.next()?.parse().ok()?;
        let detected_at = parts.next()?.parse().ok()?;
        let device = DeviceId::parse(parts.next()?).ok()?;
        Some(StatusEvent {
            device,
            state,
            seq,
            since,
            last_seen,
            detected_at,
            group,
            left,
            reason: Reason::of(state, flags.contains('w')),
            flapping: flags.contains('p'),
        })
    }

    /// A forgotten device's clear (seq 0, "before the first status"), staged with the
    /// fields of the offline status it ends: published as an empty retained message.
    pub fn is_clear(&self) -> bool {
        self.seq == 0
    }

    /// Parses a status payload as published (e.g. a retained status read back from the
    /// broker); `None` for anything that is not a status with a valid id, state, seq and times.
    pub fn from_json(payload: &[u8]) -> Option<StatusEvent> {
        #[derive(serde::Deserialize)]
        struct Wire {
            device: String,
            state: String,
            seq: u64,
            since: String,
            last_seen: String,
            detected_at: String,
            group: Option<String>,
            #[serde(default)]
            reason: String,
            #[serde(default)]
            flapping: bool,
        }
        let w: Wire = serde_json::from_slice(payload).ok()?;
        let state = match w.state.as_str() {
            "online" => State::Online,
            "offline" => State::Offline,
            _ => return None,
        };
        Some(StatusEvent {
            device: DeviceId::parse(&w.device).ok()?,
            state,
            seq: Some(w.seq).filter(|s| *s >= 1)?,
            since: parse_time(&w.since)?,
            last_seen: parse_time(&w.last_seen)?,
            detected_at: parse_time(&w.detected_at)?,
            // A status with a malformed group is still a status (of a device without one).
            group: w.group.and_then(|g| GroupName::parse(&g).ok()),
            left: None,
            reason: Reason::of(state, w.reason == "will"),
            flapping: w.flapping,
        })
    }

    pub fn member(&self) -> String {
        let mut prefix: String = [('g', &self.group), ('l', &self.left)]
            .into_iter()
            .filter_map(|(tag, g)| {
                Some(format!(
                    "{tag}{}|{}|",
                    g.as_ref()?.as_str().len(),
                    g.as_ref()?
                ))
            })
            .collect();
        let flags = self.flags();
        if !flags.is_empty() {
            prefix.push('f');
            prefix.push_str(flags);
            prefix.push('|');
        }
        format!(
            "{prefix}{}|{}|{}|{}|{}|{}",
            self.seq,
            self.state.flag(),
            self.since,
            self.last_seen,
            self.detected_at,
            self.device
        )
    }

    /// The flags of its outbox member: `p` flapping, `w` taken offline by a will.
    pub fn flags(&self) -> &'static str {
        match (self.flapping, self.reason == Reason::Will) {
            (false, false) => "",
            (true, false) => "p",
            (false, true) => "w",
            (true, true) => "pw",
        }
    }

    /// The retained status payload (contract: "Status").
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and booleans cannot fail.
        serde_json::to_vec(&StatusJson::new(self, self.flapping)).unwrap_or_default()
    }
}

/// The current record of a device as kept in Redis: the fields of its last status, except
/// `last_seen`, which is its latest heartbeat.
///
/// Wire form: `state|seq|since|last_seen|detected_at`, then `|group` for a device with one
/// (last: a group name may hold `|`); before it `w|` (or `w<session>|`) when a will took it offline, and before
/// that `p<penalty>,<at>,<until>|`, its flap state (see src/lua/common.lua).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device: DeviceId,
    pub state: State,
    pub seq: u64,
    pub since: Millis,
    pub last_seen: Millis,
    pub detected_at: Millis,
    pub group: Option<GroupName>,
    pub reason: Reason,
    /// When the device stops flapping, if it was flapping as of its last transition.
    pub flapping_until: Option<Millis>,
}

impl DeviceRecord {
    pub fn parse(device: DeviceId, raw: &str) -> Option<DeviceRecord> {
        let (flapping_until, raw) = match raw.strip_prefix('p') {
            Some(rest) => {
                let (flap, rest) = rest.split_once('|')?;
                let until: Millis = flap.rsplit(',').next()?.parse().ok()?;
                ((until > 0).then_some(until), rest)
            }
            None => (None, raw),
        };
        // `w|`, or `w<session>|` for a will that named its session.
        let (by_will, raw) = match raw.strip_prefix('w') {
            Some(rest) => {
                let (session, rest) = rest.split_once('|')?;
                if !session.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                (true, rest)
            }
            None => (false, raw),
        };
        let mut parts = raw.splitn(6, '|');
        let state = State::from_flag(parts.next()?)?;
        let seq = parts.next()?.parse().ok()?;
        let since = parts.next()?.parse().ok()?;
        let last_seen = parts.next()?.parse().ok()?;
        let detected_at = parts.next()?.parse().ok()?;
        let group = match parts.next() {
            Some(g) => Some(GroupName::parse(g).ok()?),
            None => None,
        };
        Some(DeviceRecord {
            device,
            state,
            seq,
            since,
            last_seen,
            detected_at,
            group,
            reason: Reason::of(state, by_will),
            flapping_until,
        })
    }

    /// Whether the device is flapping at `now` (its penalty has not decayed below half the
    /// threshold yet; a device only starts flapping at a transition).
    pub fn flapping_at(&self, now: Millis) -> bool {
        self.flapping_until.is_some_and(|until| now <= until)
    }

    /// The record for the HTTP API, as of `now`: the last status's fields, `last_seen` the
    /// latest heartbeat, `flapping` as of now.
    pub fn to_json(&self, now: Millis) -> serde_json::Value {
        let mut status = self.status();
        status.last_seen = self.last_seen;
        // Serializing a struct of strings, integers and booleans cannot fail.
        serde_json::to_value(StatusJson::new(&status, self.flapping_at(now))).unwrap_or_default()
    }

    /// The device's current status as it was published (for an online status `last_seen`
    /// is `since`; for offline, the last heartbeat before it, which the record still holds).
    pub fn status(&self) -> StatusEvent {
        StatusEvent {
            device: self.device.clone(),
            state: self.state,
            seq: self.seq,
            since: self.since,
            last_seen: match self.state {
                State::Online => self.since,
                State::Offline => self.last_seen,
            },
            detected_at: self.detected_at,
            group: self.group.clone(),
            left: None,
            reason: self.reason,
            flapping: self.flapping_until.is_some(),
        }
    }
}

/// An optional `<tag><length>|<group>|` prefix of an outbox member: the group and the rest;
/// `None` if the prefix is malformed.
fn group_prefix(member: &str, tag: char) -> Option<(Option<GroupName>, &str)> {
    let Some(rest) = member.strip_prefix(tag) else {
        return Some((None, member));
    };
    let (len, rest) = rest.split_once('|')?;
    let len: usize = len.parse().ok()?;
    let group = GroupName::parse(rest.get(..len)?).ok()?;
    Some((Some(group), rest.get(len..)?.strip_prefix('|')?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_bounds() {
        assert!(DeviceId::parse("sensor-17").is_ok());
        assert!(DeviceId::parse("ü-ß|:+").is_ok());
        assert_eq!(DeviceId::parse(""), Err(InvalidDeviceId::Empty));
        assert!(DeviceId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(
            DeviceId::parse(&"a".repeat(129)),
            Err(InvalidDeviceId::TooLong(129))
        );
        // 64 two-byte characters are 128 bytes; one more is too long.
        assert!(DeviceId::parse(&"é".repeat(64)).is_ok());
        assert!(DeviceId::parse(&"é".repeat(65)).is_err());
        assert_eq!(
            DeviceId::parse("a\tb"),
            Err(InvalidDeviceId::ControlCharacter)
        );
        assert_eq!(
            DeviceId::parse("a\u{7f}"),
            Err(InvalidDeviceId::ControlCharacter)
        );
        assert_eq!(
            DeviceId::parse_bytes(b"\xff\xfe"),
            Err(InvalidDeviceId::NotUtf8)
        );
    }

    #[test]
    fn topic_template_round_trip() {
        let t = TopicTemplate::parse("devices/{device}/heartbeat").unwrap();
        assert_eq!(t.filter(), "devices/+/heartbeat");
        let id = DeviceId::parse("s1").unwrap();
        assert_eq!(t.render(&id), "devices/s1/heartbeat");
        assert_eq!(t.extract("devices/s1/heartbeat"), Some("s1"));
        assert_eq!(t.extract("devices//heartbeat"), Some(""));
        assert_eq!(t.extract("devices/s1/status"), None);
        assert_eq!(t.extract("devices/s1/heartbeat/x"), None);
        assert_eq!(t.extract("devices/s1"), None);
        assert_eq!(t.extract("other/s1/heartbeat"), None);
        let first = TopicTemplate::parse("{device}").unwrap();
        assert_eq!(first.extract("abc"), Some("abc"));
        assert_eq!(first.extract("a/b"), None);
    }

    #[test]
    fn topic_template_rejects_bad_templates() {
        assert!(TopicTemplate::parse("devices/heartbeat").is_err());
        assert!(TopicTemplate::parse("devices/{device}/{device}").is_err());
        assert!(TopicTemplate::parse("devices/x{device}/hb").is_err());
        assert!(TopicTemplate::parse("devices/+/{device}").is_err());
        assert!(TopicTemplate::parse("").is_err());
    }

    #[test]
    fn ttl_override_and_clamp() {
        let (d, min, max) = (
            Duration::from_secs(30),
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        let ttl = |p: &str| heartbeat_ttl(p.as_bytes(), d, min, max);
        assert_eq!(ttl(""), d);
        assert_eq!(ttl("not json"), d);
        assert_eq!(ttl("[1,2]"), d);
        assert_eq!(ttl(r#"{"ttl_s": 5}"#), Duration::from_secs(5));
        assert_eq!(
            ttl(r#" {"ttl_s": 2.5, "x": 1}"#),
            Duration::from_millis(2500)
        );
        assert_eq!(ttl(r#"{"ttl_s": 0.1}"#), min);
        assert_eq!(ttl(r#"{"ttl_s": 1e9}"#), max);
        assert_eq!(ttl(r#"{"ttl_s": 0}"#), d);
        assert_eq!(ttl(r#"{"ttl_s": -3}"#), d);
        assert_eq!(ttl(r#"{"ttl_s": "5"}"#), d);
        assert_eq!(ttl(r#"{"ttl_s": null}"#), d);
        assert_eq!(ttl(r#"{"other": 1}"#), d);
        assert_eq!(ttl(r#"{"ttl_s": 5"#), d);
    }

    #[test]
    fn time_format_has_three_fraction_digits() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn status_member_round_trip_and_json() {
        let ev = StatusEvent {
            device: DeviceId::parse("a|b").unwrap(),
            state: State::Offline,
            seq: 42,
            since: 1_000,
            last_seen: 500,
            detected_at: 1_008,
            group: None,
            left: None,
            reason: Reason::TtlExpired,
            flapping: false,
        };
        let m = ev.member();
        assert_eq!(m, "42|0|1000|500|1008|a|b");
        assert_eq!(StatusEvent::parse_member(&m), Some(ev.clone()));
        let v: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
        assert_eq!(v["device"], "a|b");
        assert_eq!(v["state"], "offline");
        assert_eq!(v["reason"], "ttl_expired");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["since"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["last_seen"], "1970-01-01T00:00:00.500Z");
        assert_eq!(v["detected_at"], "1970-01-01T00:00:01.008Z");
        assert_eq!(StatusEvent::from_json(&ev.to_json()), Some(ev.clone()));
        assert_eq!(StatusEvent::from_json(b""), None);
        assert_eq!(
            StatusEvent::from_json(br#"{"device":"d","state":"on"}"#),
            None
        );
        let zero = String::from_utf8(ev.to_json()).unwrap().replace("42", "0");
        assert_eq!(StatusEvent::from_json(zero.as_bytes()), None);
        assert_eq!(StatusEvent::parse_member("x|0|1|2|3|d"), None);
        assert_eq!(StatusEvent::parse_member("1|2|1|2|3|d"), None);
        assert_eq!(v["flapping"], false);
    }

    #[test]
    fn flags_travel_in_the_member_and_the_payload() {
        let ev = StatusEvent {
            device: DeviceId::parse("f|w").unwrap(),
            state: State::Offline,
            seq: 7,
            since: 100,
            last_seen: 90,
            detected_at: 101,
            group: Some(GroupName::parse("s").unwrap()),
            left: None,
            reason: Reason::Will,
            flapping: true,
        };
        let m = ev.member();
        assert_eq!(m, "g1|s|fpw|7|0|100|90|101|f|w");
        assert_eq!(StatusEvent::parse_member(&m), Some(ev.clone()));
        let v: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
        assert_eq!(
            (v["reason"].as_str(), v["flapping"].as_bool()),
            (Some("will"), Some(true))
        );
        assert_eq!(StatusEvent::from_json(&ev.to_json()), Some(ev.clone()));
        let timed_out = StatusEvent {
            reason: Reason::TtlExpired,
            ..ev.clone()
        };
        assert_eq!(timed_out.member(), "g1|s|fp|7|0|100|90|101|f|w");
        assert_eq!(StatusEvent::parse_member("fx|7|0|100|90|101|d"), None);
        assert_eq!(StatusEvent::parse_member("fp7|0|100|90|101|d"), None);
    }

    #[test]
    fn a_status_with_a_group_carries_it_in_its_member_and_json() {
        let ev = StatusEvent {
            device: DeviceId::parse("d|1").unwrap(),
            state: State::Online,
            seq: 3,
            since: 10,
            last_seen: 10,
            detected_at: 11,
            group: Some(GroupName::parse("site|7").unwrap()),
            left: None,
            reason: Reason::Heartbeat,
            flapping: false,
        };
        let m = ev.member();
        assert_eq!(m, "g6|site|7|3|1|10|10|11|d|1");
        assert_eq!(StatusEvent::parse_member(&m), Some(ev.clone()));
        // Back online in another group: the one left follows the group, outside the payload.
        let moved = StatusEvent {
            left: Some(GroupName::parse("gw-2").unwrap()),
            ..ev.clone()
        };
        let m = moved.member();
        assert_eq!(m, "g6|site|7|l4|gw-2|3|1|10|10|11|d|1");
        assert_eq!(StatusEvent::parse_member(&m), Some(moved.clone()));
        assert_eq!(moved.to_json(), ev.to_json());
        assert_eq!(StatusEvent::parse_member("l9|ab|1|1|1|1|1|d"), None);
        let v: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
        assert_eq!(v["group"], "site|7");
        assert_eq!(StatusEvent::from_json(&ev.to_json()), Some(ev.clone()));
        // Without a group there is no "group" field at all.
        let plain = StatusEvent { group: None, ..ev };
        let v: serde_json::Value = serde_json::from_slice(&plain.to_json()).unwrap();
        assert!(v.get("group").is_none());
        assert_eq!(StatusEvent::parse_member("g9|ab|1|1|1|1|1|d"), None);
        assert_eq!(StatusEvent::parse_member("gx|a|1|1|1|1|1|d"), None);
    }

    #[test]
    fn group_names_are_validated() {
        assert!(GroupName::parse("site-7").is_ok());
        assert!(GroupName::parse(&"g".repeat(64)).is_ok());
        assert_eq!(GroupName::parse(""), Err(InvalidGroup::Empty));
        assert_eq!(
            GroupName::parse(&"g".repeat(65)),
            Err(InvalidGroup::TooLong(65))
        );
        assert_eq!(
            GroupName::parse("a\nb"),
            Err(InvalidGroup::ControlCharacter)
        );
        for bad in ["a/b", "a+", "#"] {
            assert_eq!(GroupName::parse(bad), Err(InvalidGroup::TopicCharacter));
        }
        let named = |p: &str| payload_group(p.as_bytes()).map(|r| r.map(|g| g.to_string()));
        assert_eq!(named(r#"{"group":"lab"}"#), Some(Ok("lab".into())));
        assert_eq!(
            named(r#"{"group":"a/b"}"#),
            Some(Err(InvalidGroup::TopicCharacter))
        );
        assert_eq!(named(r#"{"group":7}"#), Some(Err(InvalidGroup::Empty)));
        assert_eq!(named(r#"{"ttl_s":5}"#), None);
        assert_eq!(named("lab"), None);
    }

    #[test]
    fn a_template_may_name_the_group_as_one_level() {
        let t =
            TopicTemplate::parse_with("sites/{group}/{device}/hb", Levels::DeviceAndGroup).unwrap();
        assert!(t.has_group());
        assert_eq!(t.filter(), "sites/+/+/hb");
        assert_eq!(t.extract_levels("sites/s7/d1/hb"), Some(("d1", Some("s7"))));
        assert_eq!(t.extract("sites/s7/d1/hb"), Some("d1"));
        assert_eq!(t.extract_levels("sites/s7/d1"), None);
        let id = DeviceId::parse("d1").unwrap();
        let g = GroupName::parse("s7").unwrap();
        assert_eq!(t.render_in(&id, &g), "sites/s7/d1/hb");
        assert_eq!(
            TopicTemplate::parse("sites/{group}/{device}"),
            Err(BadTemplate::GroupNotAllowed)
        );
        assert_eq!(
            TopicTemplate::parse_with("{group}/{group}/{device}", Levels::DeviceAndGroup),
            Err(BadTemplate::GroupTwice)
        );
        assert_eq!(
            TopicTemplate::parse_with("g{group}/{device}", Levels::DeviceAndGroup),
            Err(BadTemplate::GroupInsideLevel)
        );
        // Overlap: some topic matches both templates.
        let status = TopicTemplate::parse("sites/x/{device}/hb").unwrap();
        assert!(t.overlaps(&status));
        let status = TopicTemplate::parse("devices/{device}/status").unwrap();
        assert!(!t.overlaps(&status));
    }

    #[test]
    fn record_parse() {
        let id = DeviceId::parse("d").unwrap();
        let r = DeviceRecord::parse(id.clone(), "1|3|10|20|11").unwrap();
        assert_eq!(r.state, State::Online);
        assert_eq!(
            (r.seq, r.since, r.last_seen, r.detected_at),
            (3, 10, 20, 11)
        );
        assert!(DeviceRecord::parse(id.clone(), "1|3|10|20").is_none());
        let r = DeviceRecord::parse(id.clone(), "0|3|10|20|11|site|7").unwrap();
        assert_eq!(r.group.as_ref().map(GroupName::as_str), Some("site|7"));
        assert!(DeviceRecord::parse(id.clone(), "1|3|10|20|11|a/b").is_none());
        assert_eq!((r.reason, r.flapping_until), (Reason::TtlExpired, None));
        // Flapping until 5000 (as of its last transition), taken offline by its will.
        let r = DeviceRecord::parse(id.clone(), "p4.2500,3000,5000|w|0|3|10|20|11").unwrap();
        assert_eq!((r.reason, r.flapping_until), (Reason::Will, Some(5000)));
        assert!(r.flapping_at(5000) && !r.flapping_at(5001));
        assert!(r.status().flapping);
        assert_eq!(r.to_json(5001)["flapping"], false);
        assert_eq!(r.to_json(4000)["flapping"], true);
        // A penalty below the threshold: not flapping.
        let r = DeviceRecord::parse(id.clone(), "p1.0000,3000,0|1|3|10|20|11").unwrap();
        assert!(!r.flapping_at(3000) && !r.status().flapping);
        assert!(DeviceRecord::parse(id.clone(), "p1.0,x|1|3|10|20|11").is_none());
        // A will that named its session.
        let r = DeviceRecord::parse(id.clone(), "w17|0|3|10|20|11").unwrap();
        assert_eq!((r.reason, r.seq), (Reason::Will, 3));
        assert!(DeviceRecord::parse(id, "wx|0|3|10|20|11").is_none());
    }
}
