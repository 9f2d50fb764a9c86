//! The test harness's fault tools, proven against real servers: the TCP fault proxy in
//! each mode, and a replica with a skewed wall clock (libfaketime).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::faketime::skewed_clock;
use support::proxy::{FaultProxy, Mode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Longer than a loopback PING takes even on a loaded machine; a black-holed PING never
/// answers, so this only bounds how long the test waits to see that.
const NO_ANSWER: Duration = Duration::from_millis(500);

fn redis_addr(redis: &RedisServer) -> SocketAddr {
    format!("127.0.0.1:{}", redis.port).parse().unwrap()
}

/// An inline `PING` on a raw connection: the reply, or `None` on EOF or an error.
async fn ping(s: &mut TcpStream) -> Option<String> {
    s.write_all(b"PING\r\n").await.ok()?;
    let mut buf = [0; 64];
    match s.read(&mut buf).await {
        Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    timeout(Duration::from_secs(5), TcpStream::connect(proxy.addr()))
        .await
        .expect("connect within 5 s")
        .expect("the proxy accepts")
}

#[tokio::test]
async fn proxy_passes_a_redis_client() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis_addr(&redis));
    let url = format!("redis://{}/0", proxy.addr());
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    // A larger value than one chunk crosses intact.
    let big = "v".repeat(200_000);
    let () = redis::cmd("SET")
        .arg("k")
        .arg(&big)
        .query_async(&mut conn)
        .await
        .unwrap();
    let back: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(back, big);
}

#[tokio::test]
async fn refuse_closes_connections_and_refuses_new_ones_until_pass() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis_addr(&redis));
    let mut old = connect(&proxy).await;
    assert_eq!(ping(&mut old).await.as_deref(), Some("+PONG\r\n"));

    proxy.set(Mode::Refuse);
    let err = TcpStream::connect(proxy.addr()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let reply = timeout(Duration::from_secs(5), ping(&mut old))
        .await
        .expect("a closed connection answers at once");
    assert_eq!(reply, None, "the existing connection is closed");

    proxy.set(Mode::Pass);
    let mut new = connect(&proxy).await;
    assert_eq!(ping(&mut new).await.as_deref(), Some("+PONG\r\n"));
}

#[tokio::test]
async fn blackhole_keeps_connections_open_and_drops_every_byte() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis_addr(&redis));
    let mut old = connect(&proxy).await;
    assert_eq!(ping(&mut old).await.as_deref(), Some("+PONG\r\n"));

    proxy.set(Mode::Blackhole);
    assert!(
        timeout(NO_ANSWER, ping(&mut old)).await.is_err(),
        "an existing connection gets no answer and no close"
    );
    let mut during = connect(&proxy).await; // the connect itself succeeds
    assert!(
        timeout(NO_ANSWER, ping(&mut during)).await.is_err(),
        "a new connection is black-holed too"
    );

    // As after a real partition, the connections it broke stay broken; new ones pass.
    proxy.set(Mode::Pass);
    assert!(timeout(NO_ANSWER, ping(&mut old)).await.is_err());
    assert!(timeout(NO_ANSWER, ping(&mut during)).await.is_err());
    let mut new = connect(&proxy).await;
    assert_eq!(ping(&mut new).await.as_deref(), Some("+PONG\r\n"));
}

#[tokio::test]
async fn delay_forwards_each_chunk_late_and_in_order() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis_addr(&redis));
    let mut s = connect(&proxy).await;
    proxy.set(Mode::Delay(Duration::from_millis(200)));

    let start = Instant::now();
    assert_eq!(ping(&mut s).await.as_deref(), Some("+PONG\r\n"));
    let took = start.elapsed();
    // The request and the reply are each held 200 ms.
    assert!(took >= Duration::from_millis(400), "PING took {took:?}");

    // Requests sent in separate chunks come back in order.
    for i in 0..5 {
        s.write_all(format!("ECHO m{i}\r\n").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let want: String = (0..5).map(|i| format!("$2\r\nm{i}\r\n")).collect();
    let mut got = Vec::new();
    let mut buf = [0; 256];
    while got.len() < want.len() {
        let n = timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("echoes arrive")
            .unwrap();
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&got), want);

    proxy.set(Mode::Pass);
    let start = Instant::now();
    let mut fresh = connect(&proxy).await;
    assert_eq!(ping(&mut fresh).await.as_deref(), Some("+PONG\r\n"));
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "passing again"
    );
}

#[tokio::test]
async fn throttle_caps_the_bytes_per_second_and_keeps_them_intact() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis_addr(&redis));
    let mut s = connect(&proxy).await;
    proxy.set(Mode::Throttle(100_000));
    let big = "t".repeat(100_000);
    let set = format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{big}\r\n", big.len());
    let start = Instant::now();
    s.write_all(set.as_bytes()).await.unwrap();
    let mut buf = [0; 16];
    let n = timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the reply within 10 s")
        .unwrap();
    assert_eq!(&buf[..n], b"+OK\r\n");
    // 100 kB at 100 kB/s cannot cross in less than a second, however fast the machine.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(950), "SET took {took:?}");
    proxy.set(Mode::Pass);
    let len = "*2\r\n$6\r\nSTRLEN\r\n$1\r\nk\r\n";
    s.write_all(len.as_bytes()).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b":100000\r\n", "every byte crossed");
}

#[test]
fn faketime_skews_a_childs_wall_clock() {
    let out = std::process::Command::new("date")
        .arg("+%s")
        .envs(skewed_clock("+15s"))
        .output()
        .expect("date runs");
    assert!(out.status.success());
    let theirs: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let ours = presenced::device::now_ms() as i64 / 1000;
    // Whole seconds on both sides, so the difference is 15 or, across a second, 14 or 16.
    assert!(
        (14..=16).contains(&(theirs - ours)),
        "date said {theirs}, our clock {ours}"
    );
}

/// A replica started with the skew has libfaketime loaded and works (its timers keep real
/// time: it gets ready and publishes). Which clock stamps published times is the product's
/// business, not the harness's, so this does not look at them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_runs_under_a_skewed_clock() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let (replica, http, _) = spawn_replica_with_env(
        &["--redis-url".into(), redis.url()],
        &mqtt,
        &[],
        &skewed_clock("+15s"),
    );
    wait_ready(http).await;
    // Read once it runs: the dynamic loader maps preloaded libraries after exec.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", replica.id())).unwrap();
    assert!(maps.contains("libfaketime"), "libfaketime is not loaded");
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    // A TTL longer than the skew, the most the contract lets replicas' clocks disagree by.
    devices.heartbeat("skewed-1", br#"{"ttl_s": 60}"#).await;
    statuses
        .wait_for("online", |s| s.iter().any(|m| m.json["seq"] == 1))
        .await;
}
