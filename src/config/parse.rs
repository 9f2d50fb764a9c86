//! Parsers of single values: durations, sizes, broker URLs, cluster seed lists, tokens.
//!
//! Each takes text and returns the value or a [`BadValue`]; none knows which key the text
//! came from (the caller names it) nor does any I/O.

use std::time::Duration;

use super::{BrokerUrl, Secret};

/// Why a value was refused. No message quotes a secret (a token, a seed URL that may hold a
/// password): those are named by position or not at all.
#[derive(Debug, thiserror::Error)]
pub enum BadValue {
    #[error("{text:?} is not a duration like \"30s\" or \"1500ms\" ({source})")]
    NotADuration {
        text: String,
        source: humantime::DurationError,
    },
    #[error("{text:?} must be greater than zero")]
    Zero { text: String },
    #[error("{text:?} is not a size like 1048576, \"512KiB\" or \"1MiB\"")]
    NotASize { text: String },
    #[error("{text:?} is not a broker URL like mqtt://host:1883 or mqtts://host:8883")]
    NotABrokerUrl { text: String },
    #[error("needs at least one node URL (e.g. redis://10.0.0.1:6379)")]
    NoClusterNode,
    #[error("node {node} is not a valid Redis URL: {source}")]
    NodeNotAUrl {
        node: usize,
        source: redis::RedisError,
    },
    #[error("node {node} must be a redis:// or rediss:// URL")]
    NodeNotTcp { node: usize },
    #[error("node {node} selects database {db}; Redis Cluster has database 0 only")]
    NodeDatabase { node: usize, db: i64 },
    #[error("the seed list is not usable: {0}")]
    SeedList(#[source] redis::RedisError),
    #[error(transparent)]
    Template(#[from] crate::device::BadTemplate),
    #[error(transparent)]
    GroupTopic(#[from] crate::group_status::BadGroupTopic),
    #[error("the token must not be empty")]
    EmptyToken,
    #[error("the token must be visible ASCII without spaces or control characters")]
    TokenCharacters,
}

/// Parses `"30s"`, `"1500ms"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, BadValue> {
    let d = humantime::parse_duration(text.trim()).map_err(|source| BadValue::NotADuration {
        text: text.to_owned(),
        source,
    })?;
    if d.is_zero() {
        return Err(BadValue::Zero {
            text: text.to_owned(),
        });
    }
    Ok(d)
}

/// Parses `"1048576"`, `"512B"`, `"64KiB"`, `"1MiB"`.
pub fn parse_size(text: &str) -> Result<u64, BadValue> {
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
        .ok_or_else(|| BadValue::NotASize {
            text: text.to_owned(),
        })
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub(crate) fn parse_broker_url(text: &str) -> Result<BrokerUrl, BadValue> {
    let bad = || BadValue::NotABrokerUrl {
        text: text.to_owned(),
    };
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

/// The seed list of `redis.cluster_nodes`: comma-separated `redis://` or `rediss://` URLs of
/// any cluster nodes, database 0 (Redis Cluster has no other).
pub(crate) fn parse_cluster_nodes(list: &str) -> Result<Vec<Secret>, BadValue> {
    let urls: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(BadValue::NoClusterNode);
    }
    for (i, url) in urls.iter().enumerate() {
        // The URL may hold a password: name it by position, never echo it. (The position of
        // its first occurrence: a repeated URL is named where it first appears.)
        let node = urls[..i].iter().position(|u| u == url).unwrap_or(i) + 1;
        let client =
            redis::Client::open(*url).map_err(|source| BadValue::NodeNotAUrl { node, source })?;
        let info = client.get_connection_info();
        if !matches!(
            info.addr(),
            redis::ConnectionAddr::Tcp(..) | redis::ConnectionAddr::TcpTls { .. }
        ) {
            return Err(BadValue::NodeNotTcp { node });
        }
        if info.redis_settings().db() != 0 {
            return Err(BadValue::NodeDatabase {
                node,
                db: info.redis_settings().db(),
            });
        }
    }
    redis::cluster::ClusterClient::new(urls.clone()).map_err(BadValue::SeedList)?;
    Ok(urls.into_iter().map(|u| Secret(u.to_owned())).collect())
}

/// A bearer token must be presentable in an `Authorization` header: visible ASCII, no
/// spaces. The message never quotes the token.
pub(crate) fn check_token(token: &str) -> Result<(), BadValue> {
    if token.is_empty() {
        return Err(BadValue::EmptyToken);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BadValue::TokenCharacters);
    }
    Ok(())
}
