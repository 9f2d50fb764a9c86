//! Raw values and their typing: what the three sources gave (TOML values from the file,
//! strings from the environment and flags), merged in precedence order, then read one key
//! at a time through the typed accessors of [`Values`].
//!
//! It must not check a value against another (that is `sections`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::keys::{Key, Kind, KEYS, OTHER_ENV};
use super::parse::{fmt_dur, parse_duration, parse_size};
use super::{bad_value, key_err, ConfigError, Sources, MQTT_MAX_PACKET};

/// A raw value before typing: TOML gives typed values, env and flags give strings.
#[derive(Clone, Debug)]
enum Raw {
    Toml(toml::Value),
    Text(String),
}

/// The raw values of every key given, the last source winning.
pub(crate) struct Values {
    raw: BTreeMap<String, Raw>,
}

impl Values {
    /// Merges the file, then the environment, then the flags; unknown environment
    /// variables become warnings (an unknown key in the file is an error).
    pub(crate) fn gather(sources: &Sources) -> Result<(Values, Vec<String>), ConfigError> {
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
        Ok((Values { raw }, warnings))
    }

    /// The typed value of `key`: as given, else its default, else `None`.
    pub(crate) fn get(&self, key: &Key) -> Result<Option<Value>, ConfigError> {
        match self.raw.get(&key.path()) {
            Some(v) => typed(key, v).map(Some),
            None => match key.default {
                Some(d) => typed(key, &Raw::Text(d.to_owned())).map(Some),
                None => Ok(None),
            },
        }
    }

    /// A string key, if set (or defaulted).
    pub(crate) fn text(&self, key: &Key) -> Result<Option<String>, ConfigError> {
        Ok(self.get(key)?.map(Value::into_string))
    }

    /// A string key that must have a value.
    pub(crate) fn required(&self, key: &Key) -> Result<String, ConfigError> {
        self.text(key)?.ok_or_else(|| key_err(key, "is required"))
    }

    /// A duration key, if set (or defaulted).
    pub(crate) fn duration(&self, key: &Key) -> Result<Option<Duration>, ConfigError> {
        match self.get(key)? {
            Some(Value::Duration(d)) => Ok(Some(d)),
            _ => Ok(None),
        }
    }

    /// A duration key that must have a value.
    pub(crate) fn required_duration(&self, key: &Key) -> Result<Duration, ConfigError> {
        self.duration(key)?
            .ok_or_else(|| key_err(key, "is required"))
    }

    /// A size key that must have a value.
    pub(crate) fn required_size(&self, key: &Key) -> Result<usize, ConfigError> {
        match self.get(key)? {
            Some(Value::Size(n)) => Ok(n),
            _ => Err(key_err(key, "is required")),
        }
    }

    /// An integer key (≥ 1), set or defaulted.
    pub(crate) fn required_count(&self, key: &Key) -> Result<u64, ConfigError> {
        match self.get(key)? {
            Some(Value::Count(n)) => Ok(n),
            _ => Err(key_err(key, "is required")),
        }
    }

    /// A fraction key (in (0, 1]), set or defaulted.
    pub(crate) fn required_fraction(&self, key: &Key) -> Result<f64, ConfigError> {
        match self.get(key)? {
            Some(Value::Fraction(f)) => Ok(f),
            _ => Err(key_err(key, "is required")),
        }
    }

    /// A boolean key, if set (or defaulted).
    pub(crate) fn flag(&self, key: &Key) -> Result<Option<bool>, ConfigError> {
        match self.get(key)? {
            Some(Value::Bool(b)) => Ok(Some(b)),
            _ => Ok(None),
        }
    }
}

/// A value after typing.
pub(crate) enum Value {
    Str(String),
    Bool(bool),
    Duration(Duration),
    Size(usize),
    Count(u64),
    Fraction(f64),
}

impl Value {
    fn into_string(self) -> String {
        match self {
            Value::Str(s) => s,
            Value::Bool(b) => b.to_string(),
            Value::Duration(d) => fmt_dur(d),
            Value::Size(n) => n.to_string(),
            Value::Count(n) => n.to_string(),
            Value::Fraction(f) => f.to_string(),
        }
    }
}

fn typed(key: &Key, raw: &Raw) -> Result<Value, ConfigError> {
    let text = match raw {
        Raw::Text(s) => s.clone(),
        Raw::Toml(toml::Value::String(s)) => s.clone(),
        Raw::Toml(toml::Value::Boolean(b)) if key.kind == Kind::Bool => {
            return Ok(Value::Bool(*b));
        }
        Raw::Toml(toml::Value::Integer(n)) if key.kind == Kind::Size => {
            return size_value(key, *n);
        }
        Raw::Toml(toml::Value::Integer(n)) if key.kind == Kind::Count => {
            return count_value(key, &n.to_string());
        }
        Raw::Toml(toml::Value::Integer(n)) if key.kind == Kind::Fraction => {
            return fraction_value(key, &n.to_string());
        }
        Raw::Toml(toml::Value::Float(f)) if key.kind == Kind::Fraction => {
            return fraction_value(key, &f.to_string());
        }
        Raw::Toml(other) => {
            let expected = match key.kind {
                Kind::Str => "a string",
                Kind::Bool => "true or false",
                Kind::Duration => "a duration string like \"30s\"",
                Kind::Size => "a number of bytes or a string like \"1MiB\"",
                Kind::Count => "an integer",
                Kind::Fraction => "a number",
            };
            return Err(key_err(
                key,
                format!("expected {expected}, found {}", other.type_str()),
            ));
        }
    };
    match key.kind {
        Kind::Str => Ok(Value::Str(text)),
        Kind::Bool => match text.trim() {
            "true" | "1" | "yes" => Ok(Value::Bool(true)),
            "false" | "0" | "no" => Ok(Value::Bool(false)),
            other => Err(key_err(key, format!("{other:?} is not true or false"))),
        },
        Kind::Duration => parse_duration(&text)
            .map(Value::Duration)
            .map_err(bad_value(key)),
        Kind::Size => {
            let n = parse_size(&text).map_err(bad_value(key))?;
            let n = i64::try_from(n).map_err(|_| key_err(key, "too large"))?;
            size_value(key, n)
        }
        Kind::Count => count_value(key, &text),
        Kind::Fraction => fraction_value(key, &text),
    }
}

fn count_value(key: &Key, text: &str) -> Result<Value, ConfigError> {
    match text.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(Value::Count(n)),
        _ => Err(key_err(key, format!("{text:?} is not an integer ≥ 1"))),
    }
}

fn fraction_value(key: &Key, text: &str) -> Result<Value, ConfigError> {
    match text.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(Value::Fraction(f)),
        _ => Err(key_err(key, format!("{text:?} is not a number in (0, 1]"))),
    }
}

fn size_value(key: &Key, n: i64) -> Result<Value, ConfigError> {
    if n < 1 || n as u64 > MQTT_MAX_PACKET as u64 {
        return Err(key_err(
            key,
            format!("{n} bytes is outside 1 B to {MQTT_MAX_PACKET} B (the MQTT limit)"),
        ));
    }
    Ok(Value::Size(n as usize))
}

/// Reads the TOML file into `section.key → value`, refusing unknown sections and keys.
fn read_file(path: &Path) -> Result<Vec<(String, toml::Value)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::File {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
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
