//! HTTP and metrics helpers: plain GETs, JSON, scrapes, the paged device listing.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.0 GET: `(status, body)`, or `None` if the server is not there.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = get(addr, path).await.expect("HTTP server answers");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

pub async fn scrape(addr: SocketAddr) -> String {
    get(addr, "/metrics").await.expect("metrics").1
}

/// The value of one series (`name{labels}` exactly as exposed), or `None`.
pub fn metric(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Every device record the API lists, following `next_cursor` (one request per 1,000
/// devices, not one per device: the invariant check runs over fleets of 50,000).
pub async fn all_records(api: SocketAddr) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    let mut path = "/devices?limit=1000".to_owned();
    loop {
        let (code, page) = get_json(api, &path).await;
        assert_eq!(code, 200, "{path}: {page}");
        for rec in page["devices"].as_array().unwrap() {
            let id = rec["device"].as_str().unwrap().to_owned();
            assert!(out.insert(id, rec.clone()).is_none(), "listed twice: {rec}");
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/devices?limit=1000&cursor={c}"),
            None => return out,
        }
    }
}
