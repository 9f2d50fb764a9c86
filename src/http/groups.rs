//! `/groups` and `/groups/{group}`: the group records (counts fleet-wide from Redis), and
//! the group metrics refreshed at scrape time.

use hyper::{Response, StatusCode};
use serde::Serialize;
use tracing::debug;

use super::{decode, error, json, parse_limit, unhex, Api, Body, DEFAULT_LIMIT, REDIS_WAIT};
use crate::device::{format_time, GroupName};
use crate::store::{GroupCounts, GroupOutage};

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
    #[serde(skip_serializing_if = "Option::is_none")]
    affected: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<i64>,
}

impl<'a> GroupJson<'a> {
    fn new(group: &'a GroupName, counts: GroupCounts, outage: Option<&GroupOutage>) -> Self {
        let open = outage.filter(|o| o.in_outage());
        GroupJson {
            group: group.as_str(),
            devices: counts.devices(),
            online: counts.online,
            offline: counts.offline,
            state: outage.map_or("ok", |o| o.latest.state.as_str()),
            since: outage.map(|o| format_time(o.latest.since)),
            seq: outage.map_or(0, |o| o.latest.seq),
            affected: open.map(|o| o.affected),
            recovered: open.map(|o| o.recovered),
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
        let read = async {
            let all = self.store.groups().await?;
            let outages = self.store.group_outages().await?;
            Ok::<_, crate::store::StoreError>((all, outages))
        };
        let (all, outages) = match tokio::time::timeout(REDIS_WAIT, read).await {
            Ok(Ok(read)) => read,
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
        let groups: Vec<_> = page
            .iter()
            .map(|(g, c)| GroupJson::new(g, **c, outages.get(*g)))
            .collect();
        json(
            StatusCode::OK,
            &serde_json::json!({ "groups": groups, "next_cursor": next }),
        )
    }

    pub(super) async fn group(&self, raw: &str) -> Response<Body> {
        let Some(group) = decode(raw).and_then(|s| GroupName::parse(&s).ok()) else {
            return error(StatusCode::NOT_FOUND, "unknown group");
        };
        let read = async {
            let counts = self.store.group(&group).await?;
            let outage = self.store.group_outage(&group).await?;
            Ok::<_, crate::store::StoreError>((counts, outage))
        };
        match tokio::time::timeout(REDIS_WAIT, read).await {
            // A group is known while it has devices (as `/groups` lists it).
            Ok(Ok((counts, outage))) if counts.devices() > 0 => json(
                StatusCode::OK,
                &GroupJson::new(&group, counts, outage.as_ref()),
            ),
            Ok(Ok(_)) => error(StatusCode::NOT_FOUND, "unknown group"),
            Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "redis did not answer"),
        }
    }

    /// The group gauges from Redis; if Redis does not answer, the last figures stand.
    pub(super) async fn refresh_group_metrics(&self) {
        let read = async {
            let all = self.store.groups().await?;
            let outages = self.store.group_outages().await?;
            Ok::<_, crate::store::StoreError>((all, outages))
        };
        match tokio::time::timeout(REDIS_WAIT, read).await {
            Ok(Ok((all, outages))) => {
                // Of the groups with devices (those `presenced_groups` counts).
                let open = outages
                    .iter()
                    .filter(|(g, o)| o.in_outage() && all.contains_key(*g))
                    .count();
                self.metrics.set_groups(&all, open);
            }
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
