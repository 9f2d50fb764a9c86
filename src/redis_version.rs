//! The oldest Redis the monitor works with, and the check of a server against it.
//!
//! The scripts and commands rely on Redis 6.2 (`ZADD GT`, `SET PXAT`, `ZRANGE ... BYLEX
//! LIMIT`). An older server accepts the connection, answers PING and loads the scripts, and
//! then fails every heartbeat at run time; so the version is checked before anything else,
//! at start and on every reconnection of a keyspace listener (the server may have been
//! replaced).
//!
//! Owns [`RedisVersion`], [`MINIMUM`] and the check's errors. Must not connect by itself: it
//! asks on the connection it is given.

use std::fmt;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError};

/// A Redis version as `INFO server` reports it in `redis_version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RedisVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// The oldest supported version.
pub const MINIMUM: RedisVersion = RedisVersion {
    major: 6,
    minor: 2,
    patch: 0,
};

impl fmt::Display for RedisVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl RedisVersion {
    /// Parses `7.0.15`; a missing patch (or minor) counts as 0, a suffix after the digits of
    /// a part (`7.2.0-rc1`) is ignored.
    pub fn parse(text: &str) -> Option<RedisVersion> {
        let mut parts = text.trim().split('.').map(leading_number);
        let major = parts.next()??;
        let minor = parts.next().unwrap_or(Some(0))?;
        let patch = parts.next().unwrap_or(Some(0))?;
        Some(RedisVersion {
            major,
            minor,
            patch,
        })
    }

    /// The version in a reply of `INFO` (or `INFO server`).
    pub fn from_info(info: &str) -> Option<RedisVersion> {
        info.lines()
            .find_map(|line| line.trim_end().strip_prefix("redis_version:"))
            .and_then(RedisVersion::parse)
    }

    pub fn is_supported(&self) -> bool {
        *self >= MINIMUM
    }
}

fn leading_number(part: &str) -> Option<u32> {
    let digits = part
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(part.len());
    part[..digits].parse().ok()
}

/// A server the monitor refuses to work with.
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    #[error("Redis {found} at {addr} is too old: presenced needs Redis {}.{} or later", MINIMUM.major, MINIMUM.minor)]
    TooOld { found: RedisVersion, addr: String },
    /// `INFO` refused (renamed away) or without a readable `redis_version`: the scripts may
    /// fail on every call, so this is not taken on trust.
    #[error("cannot tell the version of the Redis at {addr} (presenced needs Redis {}.{} or later): {reason}", MINIMUM.major, MINIMUM.minor)]
    Unknown { addr: String, reason: String },
}

/// Why the version could not be confirmed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The server answered, and the answer rules it out.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The connection failed: nothing is known yet (retry).
    #[error("reading the Redis version: {0}")]
    Redis(#[from] RedisError),
}

/// Reads `INFO server` on `conn` and accepts the server only if it is recent enough. `addr`
/// names the server in the error.
pub(crate) async fn check<C: ConnectionLike>(
    conn: &mut C,
    addr: &str,
) -> Result<RedisVersion, CheckError> {
    let info = match redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(conn)
        .await
    {
        Ok(info) => info,
        // An error reply is the server's answer (INFO renamed or denied by an ACL).
        Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => {
            return Err(Unsupported::Unknown {
                addr: addr.to_owned(),
                reason: format!("INFO server failed: {e}"),
            }
            .into())
        }
        Err(e) => return Err(e.into()),
    };
    let found = RedisVersion::from_info(&info).ok_or_else(|| Unsupported::Unknown {
        addr: addr.to_owned(),
        reason: "INFO server has no redis_version".into(),
    })?;
    if found.is_supported() {
        Ok(found)
    } else {
        Err(Unsupported::TooOld {
            found,
            addr: addr.to_owned(),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> RedisVersion {
        RedisVersion {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn versions_parse() {
        assert_eq!(RedisVersion::parse("6.0.16"), Some(v(6, 0, 16)));
        assert_eq!(RedisVersion::parse("7.0.15\r"), Some(v(7, 0, 15)));
        assert_eq!(RedisVersion::parse("7.2"), Some(v(7, 2, 0)));
        assert_eq!(RedisVersion::parse("8"), Some(v(8, 0, 0)));
        assert_eq!(RedisVersion::parse("7.2.0-rc1"), Some(v(7, 2, 0)));
        // Unstable builds report 255.255.255.
        assert_eq!(RedisVersion::parse("255.255.255"), Some(v(255, 255, 255)));
        assert_eq!(RedisVersion::parse(""), None);
        assert_eq!(RedisVersion::parse("v7.0.0"), None);
        assert_eq!(RedisVersion::parse("7..1"), None);
        assert_eq!(RedisVersion::parse("99999999999.0.0"), None);
    }

    #[test]
    fn version_comes_from_the_info_reply() {
        let info = "# Server\r\nredis_version:6.0.16\r\nredis_git_sha1:00000000\r\nredis_mode:standalone\r\n";
        assert_eq!(RedisVersion::from_info(info), Some(v(6, 0, 16)));
        // Valkey reports its Redis compatibility version as redis_version too.
        let valkey = "# Server\nredis_version:7.2.4\nserver_name:valkey\nvalkey_version:8.0.1\n";
        assert_eq!(RedisVersion::from_info(valkey), Some(v(7, 2, 4)));
        assert_eq!(
            RedisVersion::from_info("# Server\r\nredis_mode:standalone\r\n"),
            None
        );
        assert_eq!(RedisVersion::from_info("os_redis_version:9.0.0\r\n"), None);
    }

    #[test]
    fn six_two_is_the_minimum() {
        assert!(!v(6, 0, 16).is_supported());
        assert!(!v(6, 1, 240).is_supported());
        assert!(!v(5, 9, 9).is_supported());
        assert!(v(6, 2, 0).is_supported());
        assert!(v(6, 10, 0).is_supported());
        assert!(v(7, 0, 15).is_supported());
        assert!(v(10, 0, 0).is_supported());
    }

    #[test]
    fn too_old_names_the_version_and_the_server() {
        let e = Unsupported::TooOld {
            found: v(6, 0, 16),
            addr: "127.0.0.1:6379".into(),
        };
        assert_eq!(
            e.to_string(),
            "Redis 6.0.16 at 127.0.0.1:6379 is too old: presenced needs Redis 6.2 or later"
        );
    }
}
