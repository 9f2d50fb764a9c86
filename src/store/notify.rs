//! Keyspace notifications on one node: the `notify-keyspace-events` setting, the probe key
//! and the touch that makes Redis notify an overdue key at once.
//!
//! Owns [`NotifyConfig`] and these commands (the listening is `expiry/`'s). Must not
//! subscribe or wait for events.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::error::StoreError;

/// What `notify-keyspace-events` looked like and what was done about it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotifyConfig {
    /// Already had `E` and `x`.
    AlreadyOn,
    /// We merged `E` and `x` into the flags; `from` is what was set before.
    Enabled { from: String },
    /// Not enabled (configuring is off, or CONFIG was refused): must be probed.
    Unknown { reason: String },
}

/// Whether notifications are turned on where they are off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Configure {
    /// `CONFIG SET` the union of the current flags with `Ex`.
    Enable,
    /// Leave the setting alone (a managed Redis): only read it.
    Leave,
}

/// Makes sure `notify-keyspace-events` has `E` and `x` on the node behind `conn`, merging
/// with the flags already set (CONFIG SET replaces the whole set). With
/// [`Configure::Leave`] it only reads. The setting is per node: in a cluster every master
/// is asked.
pub(crate) async fn ensure_notifications(
    conn: &mut MultiplexedConnection,
    configure: Configure,
) -> NotifyConfig {
    let current = match read_flags(conn).await {
        Ok(current) => current,
        Err(unknown) => return unknown,
    };
    if has_expired_events(&current) {
        return NotifyConfig::AlreadyOn;
    }
    if configure == Configure::Leave {
        return NotifyConfig::Unknown {
            reason: format!(
                "notify-keyspace-events is {current:?} and redis.configure_notifications is false"
            ),
        };
    }
    let set: Result<(), _> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(merge_flags(&current))
        .query_async(conn)
        .await;
    match set {
        Ok(()) => NotifyConfig::Enabled { from: current },
        Err(e) => NotifyConfig::Unknown {
            reason: format!("CONFIG SET refused: {e}"),
        },
    }
}

/// The node's `notify-keyspace-events` flags, or why they cannot be read.
async fn read_flags(conn: &mut MultiplexedConnection) -> Result<String, NotifyConfig> {
    let current: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await;
    match current {
        Ok(pair) if pair.len() == 2 => Ok(pair[1].clone()),
        Ok(other) => Err(NotifyConfig::Unknown {
            reason: format!("CONFIG GET returned {other:?}"),
        }),
        Err(e) => Err(NotifyConfig::Unknown {
            reason: format!("CONFIG GET refused: {e}"),
        }),
    }
}

/// Writes a short-lived probe key (named by [`super::Keys::probe`]) on the node behind `conn`.
pub(crate) async fn write_probe(
    conn: &mut MultiplexedConnection,
    key: &str,
    ttl: Duration,
) -> Result<(), StoreError> {
    redis::cmd("SET")
        .arg(key)
        .arg("1")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Touches a key, so that Redis deletes it (and notifies) at once if it is overdue.
pub(crate) async fn touch(conn: &mut MultiplexedConnection, key: &str) -> Result<(), StoreError> {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await?;
    Ok(())
}

/// Whether the flags make Redis publish `expired` keyevent notifications.
pub(crate) fn has_expired_events(flags: &str) -> bool {
    flags.contains('E') && (flags.contains('x') || flags.contains('A'))
}

/// The flags with `E` and `x` added, keeping every flag already set.
pub(crate) fn merge_flags(flags: &str) -> String {
    let mut out = flags.to_owned();
    if !out.contains('E') {
        out.push('E');
    }
    // `A` is an alias that includes `x`.
    if !out.contains('x') && !out.contains('A') {
        out.push('x');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_flags_merge() {
        assert!(has_expired_events("Ex"));
        assert!(has_expired_events("AKE"));
        assert!(!has_expired_events("Kx"));
        assert!(!has_expired_events(""));
        assert_eq!(merge_flags(""), "Ex");
        assert_eq!(merge_flags("Kg"), "KgEx");
        assert_eq!(merge_flags("KA"), "KAE");
        assert_eq!(merge_flags("xE"), "xE");
    }
}
