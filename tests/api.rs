//! The HTTP API, metrics, Redis notification setup and MQTT authentication, against real
//! servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;

use support::*;

/// `/devices`, `/devices/{id}`, paging and filters, and the metrics, against a real fleet:
/// 30 devices online, 12 of which went silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_and_metrics_match_the_fleet() {
    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("presence.ttl", "60s")]).await;
    for i in 0..30 {
        let ttl: &[u8] = if i < 12 { br#"{"ttl_s": 1}"# } else { b"" };
        devices.heartbeat(&format!("dev-{i:02}"), ttl).await;
    }
    statuses
        .wait_for("12 offline", |s| {
            s.iter().filter(|m| m.json["state"] == "offline").count() == 12
        })
        .await;
    let addr = app.http();
    // The lag is observed at the broker's PUBACK, which may trail the subscriber's copy.
    eventually("12 lags observed", || async move {
        let m = scrape(addr).await;
        (metric(&m, "presenced_notification_lag_seconds_count")? == 12.0).then_some(())
    })
    .await;

    // Metrics: fleet counts from Redis, every labelled series present.
    let m = scrape(addr).await;
    assert_eq!(
        metric(&m, r#"presenced_devices{state="online"}"#),
        Some(18.0)
    );
    assert_eq!(
        metric(&m, r#"presenced_devices{state="offline"}"#),
        Some(12.0)
    );
    assert_eq!(metric(&m, "presenced_heartbeats_total"), Some(30.0));
    assert_eq!(
        metric(&m, r#"presenced_transitions_total{to="online"}"#),
        Some(30.0)
    );
    assert_eq!(
        metric(&m, r#"presenced_transitions_total{to="offline"}"#),
        Some(12.0)
    );
    assert_eq!(
        metric(&m, "presenced_notification_lag_seconds_count"),
        Some(12.0)
    );
    // Zero on an idle machine; a monitor starved of CPU for over 500 ms (the suite's
    // heaviest tests run beside this one on 2 cores) rightly reconciles and counts the
    // expiries it then finds as missed. Either way each offline is counted at most once.
    let missed = metric(&m, "presenced_missed_expirations_total").unwrap();
    assert!(missed <= 12.0, "missed {missed}");
    assert_eq!(metric(&m, "presenced_redis_up"), Some(1.0));
    assert_eq!(metric(&m, "presenced_mqtt_up"), Some(1.0));
    assert_eq!(
        metric(
            &m,
            &format!(
                r#"presenced_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    for s in [
        r#"presenced_heartbeats_rejected_total{reason="invalid_id"}"#,
        r#"presenced_heartbeats_rejected_total{reason="too_large"}"#,
    ] {
        assert_eq!(metric(&m, s), Some(0.0), "{s}");
    }
    // The lag is small: every offline within 5 s of its deadline (under 1 s on an idle
    // machine; the bound leaves room for a loaded CI machine).
    let within = metric(&m, r#"presenced_notification_lag_seconds_bucket{le="5"}"#);
    assert_eq!(within, Some(12.0));

    // Every metric the shipped dashboard queries is one this monitor exposes.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/presenced.json"),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    for (i, _) in dashboard.match_indices("presenced_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        used.insert(name);
    }
    assert!(used.len() >= 6, "{used:?}");
    for name in &used {
        assert!(
            m.lines().any(|l| l.starts_with(name.as_str())),
            "the dashboard uses {name}, which /metrics does not expose"
        );
    }

    // One device.
    let (code, rec) = get_json(addr, "/devices/dev-00").await;
    assert_eq!(code, 200);
    assert_eq!(rec["device"], "dev-00");
    assert_eq!(rec["state"], "offline");
    assert_eq!(rec["reason"], "ttl_expired");
    assert_eq!(rec["seq"], 2);
    let (code, rec) = get_json(addr, "/devices/dev-29").await;
    assert_eq!(code, 200);
    assert_eq!(rec["state"], "online");
    assert_eq!(get(addr, "/devices/nope").await.unwrap().0, 404);
    assert_eq!(get(addr, "/devices/a%01b").await.unwrap().0, 404);

    // Filters.
    let (_, page) = get_json(addr, "/devices?state=offline&limit=1000").await;
    let offline: Vec<&str> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(offline.len(), 12);
    assert!(offline.iter().all(|d| d < &"dev-12"));
    assert!(page["next_cursor"].is_null());
    let (_, page) = get_json(addr, "/devices?state=online").await;
    assert_eq!(page["devices"].as_array().unwrap().len(), 18);

    // Paging lists every device exactly once, never more than `limit` per page.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/devices?limit=7&cursor={c}"),
            None => "/devices?limit=7".to_owned(),
        };
        let (code, page) = get_json(addr, &path).await;
        assert_eq!(code, 200);
        let devs = page["devices"].as_array().unwrap();
        assert!(devs.len() <= 7);
        seen.extend(
            devs.iter()
                .map(|d| d["device"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(seen.len(), 30);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 30);

    // Bad parameters.
    for bad in [
        "/devices?limit=0",
        "/devices?limit=1001",
        "/devices?limit=x",
        "/devices?cursor=zz",
        "/devices?state=sleepy",
    ] {
        assert_eq!(get(addr, bad).await.unwrap().0, 400, "{bad}");
    }
    assert_eq!(get(addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(get(addr, "/readyz").await.unwrap().0, 200);
    app.stop().await.unwrap();
}

/// The monitor adds `E` and `x` to `notify-keyspace-events`, keeping flags already set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_keyspace_events_are_enabled_and_merged() {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "Kg"]);
    let mqtt = Mosquitto::start();
    assert_eq!(redis.notify_flags().await, "gK");
    let app = TestApp::spawn(config(&redis, &mqtt, &[])).await;
    let flags = redis.notify_flags().await;
    for f in ['K', 'g', 'E', 'x'] {
        assert!(flags.contains(f), "{flags} lacks {f}");
    }
    app.stop().await.unwrap();
}

/// `/readyz` and `presenced_redis_up` follow Redis: down while it is gone, back after a
/// restart (which also reset notify-keyspace-events: the monitor sets it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_and_notifications_are_restored() {
    let mut redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let app = TestApp::spawn(config(&redis, &mqtt, &[])).await;
    let addr = app.http();
    redis.stop();
    eventually("unready while redis is down", || async move {
        let (code, body) = get(addr, "/readyz").await?;
        (code == 503 && body.contains("redis")).then_some(())
    })
    .await;
    assert_eq!(metric(&scrape(addr).await, "presenced_redis_up"), Some(0.0));
    redis.restart();
    app.wait_ready().await;
    let flags = redis.notify_flags().await;
    assert!(flags.contains('E') && flags.contains('x'), "{flags}");
    assert_eq!(metric(&scrape(addr).await, "presenced_redis_up"), Some(1.0));

    // And it still works end to end.
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    devices.heartbeat("after-restart", b"").await;
    statuses
        .wait_for("online and offline after the redis restart", |s| {
            s.len() == 2
        })
        .await;
    app.stop().await.unwrap();
}

/// Username and password: accepted credentials work; wrong ones leave the monitor unready
/// (and retrying) instead of crashing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_username_and_password() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("passwd");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c", pwfile.to_str().unwrap(), "monitor", "s3cret"])
        .status()
        .expect("mosquitto_passwd (package mosquitto) is installed");
    assert!(status.success());
    let port = free_port();
    let open_port = free_port();
    let mqtt = Mosquitto::start_with_config(
        dir,
        port,
        &format!(
            "per_listener_settings true\n\
             listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {{dir}}/passwd\n\
             listener {open_port} 127.0.0.1\nallow_anonymous true\n"
        ),
    );
    let pwd_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pwd_file.path(), "s3cret\n").unwrap();
    let good = config(
        &redis,
        &mqtt,
        &[
            ("mqtt.username", "monitor"),
            ("mqtt.password_file", pwd_file.path().to_str().unwrap()),
        ],
    );
    let app = TestApp::spawn(good).await;
    app.stop().await.unwrap();

    let bad = config(
        &redis,
        &mqtt,
        &[("mqtt.username", "monitor"), ("mqtt.password", "wrong")],
    );
    let app = TestApp::spawn_unready(bad).await;
    let addr = app.http();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (code, body) = get(addr, "/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("mqtt: not connected"), "{body}");
    assert_eq!(metric(&scrape(addr).await, "presenced_mqtt_up"), Some(0.0));
    app.stop().await.unwrap();
}

/// Started while Redis is down: `/healthz` answers at once (a liveness probe must not kill
/// it), `/readyz` explains, and the monitor starts working when Redis comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    redis.stop();
    let app = TestApp::spawn_unready(config(&redis, &mqtt, &[])).await;
    let addr = app.http();
    let (code, body) = eventually("HTTP up", || async move { get(addr, "/readyz").await }).await;
    assert_eq!(code, 503);
    assert!(body.contains("redis"), "{body}");
    assert_eq!(get(addr, "/healthz").await.unwrap().0, 200);
    redis.restart();
    app.wait_ready().await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    devices.heartbeat("late-start", b"").await;
    statuses.wait_for("online", |s| !s.is_empty()).await;
    app.stop().await.unwrap();
}

/// Follows `next_cursor` from the first page until null: every id listed, in order.
async fn list_all(addr: std::net::SocketAddr, query: &str, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let path = match &cursor {
            Some(c) => format!("/devices?{query}&limit={limit}&cursor={c}"),
            None => format!("/devices?{query}&limit={limit}"),
        };
        let (code, page) = get_json(addr, &path).await;
        assert_eq!(code, 200, "{path}: {page}");
        let devs = page["devices"].as_array().unwrap();
        assert!(devs.len() <= limit, "{path}: {} records", devs.len());
        seen.extend(
            devs.iter()
                .map(|d| d["device"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return seen,
        }
    }
    panic!("{query}: the cursor never ended");
}

/// A filtered listing keeps reading past records that do not match: many online devices,
/// then a few offline ones whose ids sort last, and every match is listed exactly once.
/// The second half makes the state index disagree with the records (index entries say
/// offline, records say online), which is what a page sees when those devices come back
/// online between its index read and its record read: a page whose first records all fail
/// the filter must not end the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_paging_lists_every_match_once() {
    let Fleet {
        redis,
        mqtt: _mqtt,
        app,
        statuses,
        devices,
    } = Fleet::start(&[("presence.ttl", "60s")]).await;
    let online: Vec<String> = (0..40).map(|i| format!("a-{i:03}")).collect();
    let offline: Vec<String> = (0..5).map(|i| format!("z-{i:03}")).collect();
    for id in &online {
        devices.heartbeat(id, b"").await;
    }
    for id in &offline {
        devices.heartbeat(id, br#"{"ttl_s": 1}"#).await;
    }
    statuses
        .wait_for("40 online, 5 offline", |s| {
            s.iter().filter(|m| m.json["state"] == "online").count() == 45
                && s.iter().filter(|m| m.json["state"] == "offline").count() == 5
        })
        .await;
    let addr = app.http();
    assert_eq!(list_all(addr, "state=offline", 2).await, offline);
    assert_eq!(list_all(addr, "state=online", 7).await, online);

    let keys = presenced::store::Keys::new("presence");
    let mut conn = redis.conn().await;
    for id in &online {
        let index = keys.index(
            presenced::bucket::bucket_of(id),
            presenced::device::State::Offline,
        );
        let _: i64 = redis::cmd("ZADD")
            .arg(index)
            .arg(0)
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for limit in [1, 3, 5, 1000] {
        assert_eq!(
            list_all(addr, "state=offline", limit).await,
            offline,
            "limit {limit}"
        );
    }

    // More non-matching ids than one page examines (here: index entries without a record,
    // as a device forgotten between the two reads would leave): the first page is cut
    // short, empty, and still carries a cursor; following it lists every match.
    let mut pipe = redis::pipe();
    for i in 0..presenced::store::LIST_BUDGET + 100 {
        let id = format!("b-{i:05}");
        let index = keys.index(
            presenced::bucket::bucket_of(&id),
            presenced::device::State::Offline,
        );
        pipe.cmd("ZADD").arg(index).arg(0).arg(id).ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    let (code, first) = get_json(addr, "/devices?state=offline&limit=1000").await;
    assert_eq!(code, 200);
    assert_eq!(first["devices"].as_array().unwrap().len(), 0, "{first}");
    assert!(first["next_cursor"].is_string(), "{first}");
    assert_eq!(list_all(addr, "state=offline", 1000).await, offline);
    app.stop().await.unwrap();
}

/// With 1,000 connections open that sent half a request line, `/healthz` and `/metrics`
/// still answer within 1 s (the promise), and the server closes every half-sent connection
/// once it has waited 10 s for the rest of the request (within 15 s here: room for a loaded
/// machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_neither_block_nor_linger() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HALF_SENT: usize = 1000;
    // Both ends of every connection live in this process (the monitor runs in it), next to
    // the servers' and the harness's own descriptors.
    let needed = 2 * HALF_SENT as u64 + 512;
    let limit = rlimit::increase_nofile_limit(needed).unwrap();
    assert!(limit >= needed, "open file limit {limit} < {needed}");

    let Fleet {
        redis: _redis,
        mqtt: _mqtt,
        app,
        statuses: _statuses,
        devices: _devices,
    } = Fleet::start(&[]).await;
    let addr = app.http();
    let mut conns = Vec::with_capacity(HALF_SENT);
    for _ in 0..HALF_SENT {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hea").await.unwrap();
        conns.push(s);
    }
    let opened = Instant::now();

    for path in ["/healthz", "/metrics"] {
        let started = Instant::now();
        let (code, _) = get(addr, path).await.expect("answers");
        let took = started.elapsed();
        assert_eq!(code, 200, "{path}");
        assert!(
            took < Duration::from_secs(1),
            "{path} took {took:?} with {HALF_SENT} half-sent connections open"
        );
    }

    // Each read ends (EOF, a reset, or whatever the server says before closing) only when
    // the server closes the connection.
    let closes = conns.into_iter().map(|mut s| async move {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
    });
    tokio::time::timeout(
        Duration::from_secs(15),
        futures_util::future::join_all(closes),
    )
    .await
    .expect("half-sent connections still open after 15 s");
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "closed after {waited:?}: sooner than the 10 s a client has for its request"
    );
    assert_eq!(get(addr, "/healthz").await.unwrap().0, 200);
    app.stop().await.unwrap();
}

/// A plain HTTP/1.0 GET with extra header lines: `(status, head, body)`.
async fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: test\r\n{headers}\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// With `http.auth_token`, the fleet's routes need the token (header or `access_token`),
/// the probes stay open, and a refusal says how to authenticate without echoing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_everything_but_the_probes() {
    const TOKEN: &str = "tok-3f9a.Z_~+/=";
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses: _statuses,
        devices: _devices,
    } = Fleet::start(&[("http.auth_token", TOKEN)]).await;
    let addr = app.http();
    let devices = Devices::connect(&mqtt).await;
    devices.heartbeat("guarded", b"").await;
    let good = format!("Authorization: Bearer {TOKEN}\r\n");
    eventually("the device is listed", || {
        let good = good.clone();
        async move { (get_with(addr, "/devices/guarded", &good).await.0 == 200).then_some(()) }
    })
    .await;

    let wrong = format!("Authorization: Bearer {TOKEN}x\r\n");
    let short = "Authorization: Bearer tok\r\n".to_owned();
    let basic = "Authorization: Basic dXNlcjpwdw==\r\n".to_owned();
    for path in [
        "/metrics",
        "/devices",
        "/devices/guarded",
        "/groups",
        "/events",
        "/instances",
        "/nope",
    ] {
        for refused in ["", &wrong, &short, &basic] {
            let (code, head, body) = get_with(addr, path, refused).await;
            assert_eq!(code, 401, "{path} with {refused:?}");
            assert!(
                head.lines()
                    .any(|l| l.eq_ignore_ascii_case("www-authenticate: bearer")),
                "{head}"
            );
            assert!(
                !body.contains(TOKEN) && !head.contains(TOKEN),
                "{head}{body}"
            );
        }
        let wrong_query = format!("{path}?access_token=nope");
        assert_eq!(
            get_with(addr, &wrong_query, "").await.0,
            401,
            "{wrong_query}"
        );
    }

    let (code, _, body) = get_with(addr, "/metrics", &good).await;
    assert_eq!(code, 200);
    assert!(body.contains("presenced_devices"), "{body}");
    let lower = format!("authorization: bearer {TOKEN}\r\n");
    assert_eq!(get_with(addr, "/devices/guarded", &lower).await.0, 200);
    // The query form, percent-encoded as a browser's URLSearchParams would send it.
    let encoded: String = TOKEN
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, _, body) = get_with(
        addr,
        &format!("/devices?state=online&access_token={encoded}"),
        "",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"guarded\""), "{body}");
    assert_eq!(
        get_with(addr, &format!("/metrics?access_token={encoded}"), "")
            .await
            .0,
        200
    );

    // Probes and the page need no token (the page holds no fleet data: it asks for it).
    assert_eq!(get(addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(get(addr, "/readyz").await.unwrap().0, 200);
    let (code, page) = get(addr, "/").await.unwrap();
    assert_eq!(code, 200);
    assert!(!page.contains("guarded"), "the page holds no fleet data");
    app.stop().await.unwrap();
}
