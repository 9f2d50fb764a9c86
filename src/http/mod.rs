//! The HTTP server (hyper 1): `/metrics`, `/healthz`, `/readyz`, `/devices/{id}`,
//! `/devices?state=&group=&limit=&cursor=`, the groups (`groups.rs`), the event stream
//! (`events/`), the status page (`page/`) and `/instances` (the running replicas, for the
//! page). It only reads: Redis for devices, groups, fleet counts and the event log,
//! [`Health`] for readiness and the replicas. With
//! `http.auth_token` set, every route but `/`, `/healthz` and `/readyz` needs that bearer
//! token.
//!
//! It must not write to Redis or publish anything.

mod events;
mod groups;
mod page;
mod stall;

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use subtle::ConstantTimeEq;

use crate::config::{HttpAuth, Secret};
use crate::device::{DeviceId, GroupName, State};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::{ListFilter, Store};
use events::Hub;

pub(crate) use events::{feed as event_feed, Hub as EventHub};

/// How long a request may wait on Redis before it is answered 503.
const REDIS_WAIT: Duration = Duration::from_secs(2);
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) store: Store,
    pub(crate) metrics: Metrics,
    pub(crate) health: Arc<Health>,
    pub(crate) auth: HttpAuth,
    /// The event log's feed, shared by the `/events` clients.
    pub(crate) events: Arc<Hub>,
    /// Cancelled at shutdown: ends the event streams.
    pub(crate) stop: CancellationToken,
}

/// Whether a route needs the bearer token (when one is configured).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// The status page and the probes: a kubelet or load balancer has no token, and the
    /// page asks the person for it.
    Open,
    /// Everything that shows the fleet.
    Token,
}

fn access(path: &str) -> Access {
    match path {
        "/" | "/healthz" | "/readyz" => Access::Open,
        _ => Access::Token,
    }
}

/// The bearer token a request presents: the `Authorization: Bearer` header, else the
/// `access_token` query parameter (RFC 6750), for clients that cannot set headers.
fn presented_token<'a>(headers: &'a HeaderMap, query: &'a str) -> Option<Cow<'a, str>> {
    let header = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| Cow::Borrowed(token.trim()));
    header.or_else(|| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
            .and_then(decode)
            .map(Cow::Owned)
    })
}

/// Compares in time that depends only on the lengths, so response times do not tell an
/// attacker how much of a guess was right.
fn token_matches(presented: &str, expected: &Secret) -> bool {
    presented.as_bytes().ct_eq(expected.0.as_bytes()).into()
}

fn unauthorized() -> Response<Body> {
    let mut r = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

type Body = BoxBody<Bytes, Infallible>;

/// Most connections served at once. Each costs a task, a file descriptor and a few KiB of
/// buffers, so 2,048 is far below what the process can hold, yet well above what
/// Prometheus, probes and dashboards need. When all are taken, new connections wait in the
/// kernel's accept queue until a slot frees, which [`REQUEST_HEAD_TIMEOUT`] bounds: a client
/// that holds a connection without sending a request loses it within 10 s.
pub(crate) const MAX_CONNECTIONS: usize = 2048;

/// How long a client may take to send a whole request head, on a new connection and
/// between requests on a kept-alive one. Without it a client that sends half a request
/// holds its connection (and a slot of [`MAX_CONNECTIONS`]) forever.
pub(crate) const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The send buffer of every HTTP connection (the kernel doubles it): enough for a LAN or a
/// nearby WAN at full speed, and what an `/events` client that stops reading holds at most
/// in the kernel until [`stall::WRITE_STALL`] drops it.
const SEND_BUFFER: usize = 256 * 1024;

/// Serves until cancelled, then lets requests in progress finish (up to 1 s).
pub(crate) async fn serve(listener: TcpListener, api: Api, token: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper panics on a header timeout without a timer.
    http.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first, then the connection: past the cap, clients wait in the accept queue
        // instead of costing a task each.
        let slot = tokio::select! {
            () = token.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // E.g. out of file descriptors: retry soon rather than spin.
                    warn!(error = %e, "HTTP accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A bounded socket buffer (not the kernel's autotuned several MiB): what a client
        // that stops reading can hold.
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER) {
            debug!(error = %e, "Cannot size an HTTP socket's send buffer.");
        }
        let api = api.clone();
        let service = hyper::service::service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req, peer).await) }
        });
        let conn = graceful.watch(
            http.serve_connection(TokioIo::new(stall::WriteStall::new(stream, peer)), service),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, %peer, "HTTP connection ended with an error.");
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(Duration::from_secs(1), graceful.shutdown())
        .await
        .is_err()
    {
        debug!("HTTP connections still open at shutdown.");
    }
    info!("HTTP server stopped.");
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Percent-decodes a path segment or query value (`+` is a space, as in a form);
/// `None` if malformed (a `%` not followed by two hex digits) or not UTF-8: a device id or
/// a token arrives exactly as sent, or not at all. (`form_urlencoded::parse` would pass a
/// malformed escape through and replace invalid UTF-8 with U+FFFD, hence the strict decoder.)
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let well_formed = b
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == b'%')
        .all(|(i, _)| {
            b.get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
        });
    if !well_formed {
        return None;
    }
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|d| d.into_owned())
}

/// The cursor is the last id of the previous page, hex-encoded (opaque to clients).
fn encode_cursor(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(c: &str) -> Option<String> {
    let id = unhex(c)?;
    DeviceId::parse(&id).ok().map(|_| id)
}

fn unhex(c: &str) -> Option<String> {
    if c.is_empty() || !c.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..c.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(c.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A page `limit`: 1 to [`MAX_LIMIT`].
fn parse_limit(v: &str) -> Option<usize> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
}

impl Api {
    async fn handle(&self, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
        }
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        if let (HttpAuth::Bearer(expected), Access::Token) = (&self.auth, access(&path)) {
            let granted =
                presented_token(req.headers(), &query).is_some_and(|t| token_matches(&t, expected));
            if !granted {
                return unauthorized();
            }
        }
        match path.as_str() {
            "/" => page::page(),
            "/instances" => json(StatusCode::OK, &self.health.instances.to_json()),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.health.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(reasons) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reasons}\n")),
            },
            "/metrics" => self.metrics_page().await,
            "/devices" => self.list(&query).await,
            "/groups" => self.groups(&query).await,
            "/events" => events::respond(
                &self.store,
                &self.events,
                req.headers(),
                &query,
                peer.to_string(),
                &self.stop,
            ),
            p => {
                if let Some(raw) = p.strip_prefix("/devices/") {
                    self.device(raw).await
                } else if let Some(raw) = p.strip_prefix("/groups/") {
                    self.group(raw).await
                } else {
                    error(StatusCode::NOT_FOUND, "no such route")
                }
            }
        }
    }

    async fn metrics_page(&self) -> Response<Body> {
        // Fleet counts come from Redis at scrape time, so every replica reports the same
        // figure. If Redis does not answer, the last known figures stand.
        match tokio::time::timeout(REDIS_WAIT, self.store.counts()).await {
            Ok(Ok(counts)) => self.metrics.set_fleet(counts),
            Ok(Err(e)) => debug!(error = %e, "Fleet counts unavailable."),
            Err(_) => debug!("Fleet counts timed out."),
        }
        self.refresh_group_metrics().await;
        let mut r = text(StatusCode::OK, self.metrics.render());
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    async fn device(&self, raw: &str) -> Response<Body> {
        let Some(id) = decode(raw).and_then(|s| DeviceId::parse(&s).ok()) else {
            return error(StatusCode::NOT_FOUND, "unknown device");
        };
        match tokio::time::timeout(REDIS_WAIT, self.store.device(&id)).await {
            Ok(Ok(Some(record))) => {
                let now = self.store.master_now(&record.device);
                json(StatusCode::OK, &record.to_json(now))
            }
            Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "unknown device"),
            Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "redis did not answer"),
        }
    }

    async fn list(&self, query: &str) -> Response<Body> {
        let mut state = None;
        let mut group = None;
        let mut flapping = None;
        let mut limit = DEFAULT_LIMIT;
        let mut cursor = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(v) = decode(v) else {
                return error(StatusCode::BAD_REQUEST, "malformed query");
            };
            match k {
                "state" => {
                    state = match v.as_str() {
                        "online" => Some(State::Online),
                        "offline" => Some(State::Offline),
                        _ => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                "state must be online or offline",
                            )
                        }
                    }
                }
                "group" => group = Some(GroupName::parse(&v)),
                "flapping" => {
                    flapping = match v.as_str() {
                        "true" => Some(true),
                        "false" => Some(false),
                        _ => {
                            return error(StatusCode::BAD_REQUEST, "flapping must be true or false")
                        }
                    }
                }
                "limit" => match parse_limit(&v) {
                    Some(n) => limit = n,
                    None => return error(StatusCode::BAD_REQUEST, "limit must be 1 to 1000"),
                },
                "cursor" => match decode_cursor(&v) {
                    Some(c) => cursor = Some(c),
                    None => return error(StatusCode::BAD_REQUEST, "invalid cursor"),
                },
                _ => {}
            }
        }
        let group = match group.transpose() {
            Ok(group) => group,
            // No device has an invalid group: an empty listing, as for an unknown one.
            Err(_) => return empty_listing(),
        };
        let filter = ListFilter {
            state,
            group,
            flapping,
        };
        let page = self.store.list(&filter, cursor.as_deref(), limit);
        match tokio::time::timeout(REDIS_WAIT, page).await {
            Ok(Ok(page)) => {
                // The store's cursor, not the last record's id: a page may end with (or be
                // all) ids that failed the filter, and the next page starts after them.
                let next = page.next.as_deref().map(encode_cursor);
                let devices: Vec<_> = page
                    .records
                    .iter()
                    .map(|r| r.to_json(self.store.master_now(&r.device)))
                    .collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "devices": devices, "next_cursor": next }),
                )
            }
            Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "redis did not answer"),
        }
    }
}

fn empty_listing() -> Response<Body> {
    json(
        StatusCode::OK,
        &serde_json::json!({ "devices": [], "next_cursor": null }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects_garbage() {
        let c = encode_cursor("sim-000001|é");
        assert_eq!(decode_cursor(&c).as_deref(), Some("sim-000001|é"));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor("abc"), None);
        assert_eq!(decode_cursor(""), None);
        assert_eq!(decode_cursor("00"), None); // a control character is no device id
    }

    #[test]
    fn token_from_the_header_or_the_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_token(&headers, "limit=5"), None);
        assert_eq!(
            presented_token(&headers, "limit=5&access_token=a%2Bb").as_deref(),
            Some("a+b")
        );
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(presented_token(&headers, ""), None);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  s3cret"));
        assert_eq!(
            presented_token(&headers, "access_token=other").as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn tokens_compare_whole() {
        let expected = Secret("s3cret".into());
        assert!(token_matches("s3cret", &expected));
        assert!(!token_matches("s3cre", &expected));
        assert!(!token_matches("s3cret!", &expected));
        assert!(!token_matches("S3cret", &expected));
        assert!(!token_matches("", &expected));
    }

    #[test]
    fn only_the_page_and_the_probes_are_open() {
        for open in ["/", "/healthz", "/readyz"] {
            assert_eq!(access(open), Access::Open, "{open}");
        }
        for closed in ["/metrics", "/devices", "/devices/x", "/nope", "/healthz/x"] {
            assert_eq!(access(closed), Access::Token, "{closed}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(decode("a%zz"), None);
        assert_eq!(decode("%ff"), None);
        assert_eq!(decode("a+b%2B%26").as_deref(), Some("a b+&"));
        assert_eq!(decode("%"), None);
        assert_eq!(decode("a%2"), None);
    }
}
