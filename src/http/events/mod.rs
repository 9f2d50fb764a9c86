//! `GET /events`: the live stream of transitions and outages (Server-Sent Events), resumable
//! with `Last-Event-ID` or `?after=`, filtered with `?device=` and `?group=`.
//!
//! `feed` reads the event log (Redis) once per replica and broadcasts it; `client` serves one
//! client from that broadcast, after a catch-up from Redis when it resumes; `body` is the
//! response body fed by the client's queue. Must not write to Redis.

mod body;
mod client;
mod feed;

use std::sync::Arc;

use hyper::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{decode, error, Body};
use crate::device::{DeviceId, GroupName};
use crate::event_log::Position;
use crate::store::Store;
use body::ChannelBody;
use client::{Filter, Resume, Session, QUEUE};

pub(crate) use feed::{run as feed, Hub};

/// A `/events` request: its filters and where it resumes.
#[derive(Debug)]
struct Request {
    filter: Filter,
    resume: Resume,
}

/// Reads the query (`device`, `group`, `after`, the token is the caller's) and the
/// `Last-Event-ID` header, which wins over `after` (a browser reconnecting sends it, with
/// the URL it first opened).
fn request(headers: &HeaderMap, query: &str) -> Result<Request, &'static str> {
    let mut filter = Filter::default();
    let mut after = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v).ok_or("malformed query")?;
        match k {
            "device" => filter.device = Some(DeviceId::parse(&v).map_err(|_| "invalid device id")?),
            "group" => filter.group = Some(GroupName::parse(&v).map_err(|_| "invalid group")?),
            "after" => after = Some(v),
            _ => {}
        }
    }
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let resume = match last_id.or(after) {
        None => Resume::Live,
        Some(id) => Position::parse(&id).map_or(Resume::Unknown, Resume::After),
    };
    Ok(Request { filter, resume })
}

/// Answers a `/events` request: the headers at once, then the stream.
pub(crate) fn respond(
    store: &Store,
    hub: &Arc<Hub>,
    headers: &HeaderMap,
    query: &str,
    peer: String,
    token: &CancellationToken,
) -> Response<Body> {
    let req = match request(headers, query) {
        Ok(req) => req,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Ok(slot) = hub.slots.clone().try_acquire_owned() else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many /events clients on this replica",
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
        return r;
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    let session = Session {
        store: store.clone(),
        hub: hub.clone(),
        filter: req.filter,
        tx,
        token: token.clone(),
        peer,
        at: Position::default(),
        last_write: Instant::now(),
    };
    tokio::spawn(session.run(req.resume));
    let mut r = Response::new(ChannelBody::new(rx, slot).boxed());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies such as nginx buffer responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_wins_over_after_and_junk_is_unknown() {
        let mut headers = HeaderMap::new();
        let place = Position::default().to_string();
        let r = request(&headers, &format!("after={place}&device=d-1")).unwrap();
        assert_eq!(r.resume, Resume::After(Position::default()));
        assert_eq!(r.filter.device.unwrap().as_str(), "d-1");
        headers.insert("last-event-id", HeaderValue::from_static("nonsense"));
        let r = request(&headers, &format!("after={place}")).unwrap();
        assert_eq!(r.resume, Resume::Unknown);
        assert_eq!(
            request(&HeaderMap::new(), "group=g").unwrap().resume,
            Resume::Live
        );
        assert!(request(&HeaderMap::new(), "group=a%2Bb%2F").is_err());
        assert!(request(&HeaderMap::new(), "device=").is_err());
    }
}
