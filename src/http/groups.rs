//! `/groups` and `/groups/{group}`: the group records (counts fleet-wide from Redis), and
//! the group metrics refreshed at scrape time.

use hyper::{Response, StatusCode};
use serde::Serialize;
use tracing::debug;

use super::{decode, error, json, parse_limit, unhex, Api, Body, DEFAULT_LIMIT, REDIS_WAIT};
use crate::device::GroupName;
use crate::store::GroupCounts;

/// A group record (contract: "HTTP", group record).
#[derive(Serialize)]
struct GroupJson<'a> {
    group: &'a str,
    devices: i64,
    online: i64,
    offline: i64,
    state: &'static str,
    since: Option<String>,
    seq: u64,
}

impl<'a> GroupJson<'a> {
    fn new(group: &'a GroupName, counts: GroupCounts) -> Self {
        GroupJson {
            group: group.as_str(),
            devices: counts.devices(),
            online: counts.online,
            offline: counts.offline,
            state: "ok",
            since: None,
            seq: 0,
        }
    }
}

/// The cursor of `/groups` is the last group name of the previous page, hex-encoded.
fn encode_cursor(group: &GroupName) -> String {
    group.as_str().bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(c: &str) -> Option<GroupName> {
    GroupName::parse(&unhex(c)?).ok()
}

impl Api {
    pub(super) async fn groups(&self, query: &str) -> Response<Body> {
        let mut limit = DEFAULT_LIMIT;
        let mut after = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(v) = decode(v) else {
                return error(StatusCode::BAD_REQUEST, "malformed query");
            };
            match k {
                "limit" => match parse_limit(&v) {
                    Some(n) => limit = n,
                    None => return error(StatusCode::BAD_REQUEST, "limit must be 1 to 1000"),
                },
                "cursor" => match decode_cursor(&v) {
                    Some(c) => after = Some(c),
                    None => return error(StatusCode::BAD_REQUEST, "invalid cursor"),
                },
                _ => {}
            }
        }
        let all = match tokio::time::timeout(REDIS_WAIT, self.store.groups()).await {
            Ok(Ok(all)) => all,
            Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "redis did not answer"),
        };
        let rest = match &after {
            Some(a) => all
                .range::<GroupName, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => all.range::<GroupName, _>(..),
        };
        let mut page: Vec<_> = rest.take(limit + 1).collect();
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            encode_cursor(page[limit - 1].0)
        });
        let groups: Vec<_> = page.iter().map(|(g, c)| GroupJson::new(g, **c)).collect();
        json(
            StatusCode::OK,
            &serde_json::json!({ "groups": groups, "next_cursor": next }),
        )
    }

    pub(super) async fn group(&self, raw: &str) -> Response<Body> {
        let Some(group) = decode(raw).and_then(|s| GroupName::parse(&s).ok()) else {
            return error(StatusCode::NOT_FOUND, "unknown group");
        };
        match tokio::time::timeout(REDIS_WAIT, self.store.group(&group)).await {
            Ok(Ok(counts)) if counts.devices() > 0 => {
                json(StatusCode::OK, &GroupJson::new(&group, counts))
            }
            Ok(Ok(_)) => error(StatusCode::NOT_FOUND, "unknown group"),
            Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "redis did not answer"),
        }
    }

    /// The group gauges from Redis; if Redis does not answer, the last figures stand.
    pub(super) async fn refresh_group_metrics(&self) {
        match tokio::time::timeout(REDIS_WAIT, self.store.groups()).await {
            Ok(Ok(all)) => self.metrics.set_groups(&all),
            Ok(Err(e)) => debug!(error = %e, "Group counts unavailable."),
            Err(_) => debug!("Group counts timed out."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        let g = GroupName::parse("site|7 ü").unwrap();
        assert_eq!(decode_cursor(&encode_cursor(&g)), Some(g));
        assert_eq!(decode_cursor("2f"), None); // "/" is not a group name
        assert_eq!(decode_cursor("zz"), None);
    }
}
