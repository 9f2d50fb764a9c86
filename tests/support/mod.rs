//! Test harness: real `redis-server` and `mosquitto` processes on free loopback ports
//! (killed on Drop), the monitor in-process or as the built binary, an MQTT status
//! collector, a heartbeat publisher, and HTTP/metrics helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fake_redis;
pub mod faketime;
pub mod proxy;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use presenced::config::{Config, Sources};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long `eventually` waits; `PRESENCED_TEST_PATIENCE_MS` overrides it for slow machines.
pub fn patience() -> Duration {
    std::env::var("PRESENCED_TEST_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(20))
}

/// Polls `check` until it returns `Some`, or panics with `what` after [`patience`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` (how far along, and whether done) until done; panics with `what` only
/// after [`patience`] passed with no progress: for work whose length is the machine's
/// speed (a backlog, a mass expiry), not a promise of the product.
pub async fn while_progressing<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (u64, bool)>,
{
    let mut best = 0;
    let mut moved = Instant::now();
    loop {
        let (now, done) = check().await;
        if done {
            return;
        }
        if now > best {
            best = now;
            moved = Instant::now();
        } else if moved.elapsed() > patience() {
            panic!(
                "no progress for {:?} (at {best}) waiting for: {what}",
                patience()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn free_port() -> u16 {
    // Racy (another process may take it before the server binds), as redis-rs's harness
    // admits; servers below retry on a new port if the bind fails.
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary(name: &str, env: &str) -> String {
    let bin = std::env::var(env).unwrap_or_else(|_| name.to_owned());
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} not found: install it (apt-get install -y redis-server mosquitto mosquitto-clients) or set {env}"
    );
    bin
}

fn wait_port(port: u16, child: &mut Child, log: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "server on port {port} did not start; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

// === Redis ===

pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    args: Vec<String>,
    stopped: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts `redis-server` with extra arguments (e.g. `["--notify-keyspace-events", "Kg"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = free_port();
            let (child, ok) = Self::spawn(port, dir.path(), &args);
            if ok {
                return RedisServer {
                    port,
                    child,
                    dir,
                    args,
                    stopped: false,
                };
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(port: u16, dir: &Path, args: &[String]) -> (Child, bool) {
        let log = dir.join("redis.log");
        let mut child = Command::new(binary("redis-server", "REDIS_SERVER_BIN"))
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir", dir.to_str().unwrap()])
            .args(["--logfile", log.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let ok = wait_port(port, &mut child, &log);
        (child, ok)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (like a crash); [`RedisServer::restart`] brings it back on the same port.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stopped = true;
    }

    pub fn restart(&mut self) {
        self.stop();
        let (child, ok) = Self::spawn(self.port, self.dir.path(), &self.args);
        assert!(ok, "redis-server did not restart on port {}", self.port);
        self.child = child;
        self.stopped = false;
    }

    /// Not stopped by the test (it may still be starting or have crashed).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&self) -> bool {
        !self.stopped
    }

    /// A connection, or `None` if the server does not answer within a second.
    pub async fn try_conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()
    }

    /// A connection for the test's own commands. Its replies may wait as long as the
    /// harness's patience: a pipeline of thousands of writes on a loaded machine outlasts
    /// redis-rs's default response timeout (500 ms).
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(patience()));
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    }

    /// `CONFIG GET notify-keyspace-events` (on a server whose CONFIG is not renamed).
    pub async fn notify_flags(&self) -> String {
        let v: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        v[1].clone()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === Redis Cluster ===

/// A real Redis Cluster on loopback: `masters` masters with one replica each, made by
/// `redis-cli --cluster create`. Failover is quick (node timeout 1.5 s) and always allowed
/// (`cluster-replica-validity-factor 0`), as a test of failover needs.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> RedisCluster {
        Self::start_with(masters, 1).await
    }

    /// `masters` masters with `replicas` replicas each.
    pub async fn start_with(masters: usize, replicas: usize) -> RedisCluster {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1500",
            "--cluster-replica-validity-factor",
            "0",
            "--cluster-require-full-coverage",
            "no",
        ];
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_with(&args))
            .collect();
        let out = Command::new(binary("redis-cli", "REDIS_CLI_BIN"))
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy(masters).await;
        cluster
    }

    /// Waits until every live node sees the cluster ok, with `masters` masters serving slots
    /// and every replica in sync.
    pub async fn wait_healthy(&self, masters: usize) {
        eventually("a healthy Redis Cluster", || async {
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                let mut c = n.try_conn().await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                if !info.contains("cluster_state:ok") {
                    return None;
                }
                let repl: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    return None;
                }
            }
            (self.masters().await.len() == masters).then_some(())
        })
        .await;
    }

    /// Seed URLs for `redis.cluster_nodes` (two nodes: either may be the one that is down).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .take(2)
            .map(|n| n.url().replace("/0", ""))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `CLUSTER NODES` as a live node sees it.
    pub async fn topology(&self) -> Vec<presenced::cluster::Node> {
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            if let Some(mut c) = n.try_conn().await {
                if let Ok(text) = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut c)
                    .await
                {
                    return presenced::cluster::parse_nodes(&text);
                }
            }
        }
        panic!("no cluster node answers");
    }

    /// The masters serving slots (not failed), as indexes into `nodes` with their slots.
    pub async fn masters(&self) -> Vec<(usize, Vec<(u16, u16)>)> {
        self.topology()
            .await
            .into_iter()
            .filter(|n| n.serves_slots() && !n.failing)
            .filter_map(|n| {
                let i = self.nodes.iter().position(|s| s.port == n.port)?;
                Some((i, n.slots))
            })
            .collect()
    }

    /// The index of the node serving `slot`.
    pub async fn owner(&self, slot: u16) -> usize {
        self.masters()
            .await
            .into_iter()
            .find(|(_, slots)| slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|(i, _)| i)
            .expect("a master serves every slot")
    }
}

// === Mosquitto ===

pub struct Mosquitto {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Mosquitto on a loopback port, anonymous clients allowed, with queue limits raised
    /// as `deploy/` recommends for a monitor (the default of 1,000 queued messages per
    /// client drops heartbeats in a burst).
    pub fn start() -> Mosquitto {
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let config = format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n\
                 max_queued_messages 1000000\nmax_inflight_messages 100\n"
            );
            if let Some(m) = Self::try_start_with_config(dir, port, &config) {
                return m;
            }
        }
        panic!("mosquitto did not start");
    }

    /// Starts mosquitto with a config file; `config` may use `{dir}` for the temp directory.
    /// `port` is the listener `wait_port` waits for.
    pub fn start_with_config(dir: tempfile::TempDir, port: u16, config: &str) -> Mosquitto {
        Self::try_start_with_config(dir, port, config).expect("mosquitto exited at start")
    }

    fn try_start_with_config(dir: tempfile::TempDir, port: u16, config: &str) -> Option<Mosquitto> {
        let path = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        std::fs::write(&path, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        let logf = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(binary("mosquitto", "MOSQUITTO_BIN"))
            .args(["-c", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        wait_port(port, &mut child, &log).then_some(Mosquitto { port, child, dir })
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === The monitor ===

/// A config for tests: the given servers, short TTLs, a free HTTP port; `extra` overrides.
pub fn config(redis: &RedisServer, mqtt: &Mosquitto, extra: &[(&str, &str)]) -> Config {
    let http = format!("127.0.0.1:{}", free_port());
    let mut flags: Vec<(String, String)> = vec![
        ("redis.url".into(), redis.url()),
        ("mqtt.url".into(), mqtt.url()),
        ("presence.ttl".into(), "1s".into()),
        ("presence.min_ttl".into(), "500ms".into()),
        ("http.listen".into(), http),
        (
            "mqtt.client_id".into(),
            format!("presenced-test-{:08x}", fastrand::u32(..)),
        ),
    ];
    flags.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load(&Sources {
        file: None,
        env: Vec::new(),
        flags,
    })
    .unwrap()
    .config
}

/// [`config`] for a Redis Cluster.
pub fn cluster_config(cluster: &RedisCluster, mqtt: &Mosquitto, extra: &[(&str, &str)]) -> Config {
    let seeds = cluster.seeds();
    let mut all = vec![("redis.cluster_nodes", seeds.as_str())];
    all.extend_from_slice(extra);
    config(&cluster.nodes[0], mqtt, &all)
}

/// The monitor running in this process.
pub struct TestApp {
    pub cfg: Config,
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), presenced::Error>>>,
}

impl TestApp {
    /// Starts the monitor and waits until `/readyz` says ready.
    pub async fn spawn(cfg: Config) -> TestApp {
        let app = Self::spawn_unready(cfg).await;
        app.wait_ready().await;
        app
    }

    pub async fn spawn_unready(cfg: Config) -> TestApp {
        if std::env::var_os("PRESENCED_TEST_LOG").is_some() {
            presenced::telemetry::init(false);
        }
        let token = CancellationToken::new();
        let t = token.clone();
        let c = cfg.clone();
        let task = tokio::spawn(async move { presenced::run(c, t.cancelled_owned()).await });
        TestApp {
            cfg,
            token,
            task: Some(task),
        }
    }

    pub fn http(&self) -> SocketAddr {
        self.cfg.http.listen
    }

    pub fn instance(&self) -> &str {
        &self.cfg.mqtt.client_id
    }

    pub async fn wait_ready(&self) {
        wait_ready(self.http()).await;
    }

    /// Cancels the monitor (like SIGTERM) and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), presenced::Error> {
        self.token.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(presenced::SHUTDOWN_GRACE + Duration::from_secs(2), task)
            .await
            .expect("run() did not return within the shutdown grace")
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Waits until the monitor at `addr` answers `/readyz` with 200.
pub async fn wait_ready(addr: SocketAddr) {
    eventually("monitor ready", || async move {
        (get(addr, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
}

/// Path of the built `presenced` binary.
pub fn presenced_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_presenced"))
}

// === MQTT helpers ===

/// One message seen by a [`Collector`].
#[derive(Clone, Debug)]
pub struct Seen {
    pub topic: String,
    pub json: Value,
    pub retain: bool,
    pub at: Instant,
    pub at_ms: u64,
}

/// Subscribes (QoS 1) and records every message; ready once the SubAck arrived.
pub struct Collector {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(mqtt: &Mosquitto, filter: &str) -> Collector {
        let mut opts = MqttOptions::new(
            format!("collector-{:08x}", fastrand::u32(..)),
            "127.0.0.1",
            mqtt.port,
        );
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let s = seen.clone();
        let c = client.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    // Subscribe on every connection: a restarted broker forgot us.
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = c.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        // Stamped before anything else, so lock contention with readers
                        // does not show up as latency.
                        let (at, at_ms) = (Instant::now(), presenced::device::now_ms());
                        let json = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let seen = Seen {
                            topic: p.topic.clone(),
                            json,
                            retain: p.retain,
                            at,
                            at_ms,
                        };
                        s.lock().unwrap().push(seen);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("collector SubAck")
            .unwrap();
        Collector { seen, client, task }
    }

    /// How many messages seen so far satisfy `pred` (without copying them).
    pub fn count(&self, pred: impl Fn(&Seen) -> bool) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| pred(s)).count()
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Status messages of one device, in arrival order.
    pub fn device(&self, id: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|s| s.json["device"] == id)
            .map(|s| s.json)
            .collect()
    }

    /// Waits until `pred` holds over everything seen so far.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) {
        eventually(what, || async { pred(&self.all()).then_some(()) }).await;
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A device-side MQTT client that publishes heartbeats (QoS 1).
pub struct Devices {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Devices {
    pub async fn connect(mqtt: &Mosquitto) -> Devices {
        let mut opts = MqttOptions::new(
            format!("devices-{:08x}", fastrand::u32(..)),
            "127.0.0.1",
            mqtt.port,
        );
        opts.set_max_packet_size(4 << 20, 4 << 20).set_inflight(200);
        let (client, mut el) = AsyncClient::new(opts, 1000);
        let task = tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Devices { client, task }
    }

    pub async fn heartbeat(&self, id: &str, payload: &[u8]) {
        self.client
            .publish(
                format!("devices/{id}/heartbeat"),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .await
            .unwrap();
    }

    pub async fn publish_retained(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
            .await
            .unwrap();
    }

    pub async fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === HTTP helpers ===

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

/// Parses an RFC 3339 time with milliseconds into ms since the epoch.
pub fn ms(v: &Value) -> u64 {
    let t = humantime::parse_rfc3339(v.as_str().expect("a time string")).expect("RFC 3339");
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// What a subscriber that keeps the highest `seq` per device accepts from `msgs` (one
/// device's statuses in arrival order): duplicates and older seqs are dropped.
pub fn accepted(msgs: &[Value]) -> Vec<Value> {
    let mut best = 0;
    let mut out = Vec::new();
    for m in msgs {
        let seq = m["seq"].as_u64().expect("seq");
        if seq > best {
            best = seq;
            out.push(m.clone());
        }
    }
    out
}

/// The seqs and states a deduplicating subscriber saw for one device.
pub fn history(msgs: &[Value]) -> Vec<(u64, String)> {
    accepted(msgs)
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// === Fault-test helpers ===

impl Mosquitto {
    /// Kills the broker (like a crash); [`Mosquitto::restart`] brings it back.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the broker and starts it again on the same port with the same config (and
    /// persistence file, if the config keeps one).
    pub fn restart(&mut self) {
        self.stop();
        let path = self.dir.path().join("mosquitto.conf");
        let log = self.dir.path().join("mosquitto.log");
        let logf = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut child = Command::new(binary("mosquitto", "MOSQUITTO_BIN"))
            .args(["-c", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        assert!(
            wait_port(self.port, &mut child, &log),
            "mosquitto did not restart"
        );
        self.child = child;
    }

    /// A broker that keeps retained messages and sessions on disk across restarts.
    pub fn start_persistent() -> Mosquitto {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        Mosquitto::start_with_config(
            dir,
            port,
            &format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
                 max_queued_messages 1000000\nmax_inflight_messages 100\n\
                 persistence true\npersistence_location {{dir}}/\nautosave_interval 1\n"
            ),
        )
    }
}

/// Waits until every device in `ids` shows two statuses, then checks they are exactly seq 1
/// online and seq 2 offline (after dedupe).
pub async fn wait_online_then_offline(statuses: &Collector, ids: &[String]) {
    eventually("every device online then offline", || async {
        ids.iter()
            .all(|id| history(&statuses.device(id)).len() == 2)
            .then_some(())
    })
    .await;
    for id in ids {
        assert_eq!(
            history(&statuses.device(id)),
            vec![(1, "online".into()), (2, "offline".into())],
            "{id}"
        );
    }
}

/// The device statuses among `seen`, per device in the order seen (one pass, for checks
/// over many devices).
pub fn by_device(seen: &[Seen]) -> std::collections::HashMap<String, Vec<Value>> {
    let mut out: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for s in seen {
        if let Some(d) = s.json["device"].as_str() {
            out.entry(d.to_owned()).or_default().push(s.json.clone());
        }
    }
    out
}

/// Checks the contract's guarantees over everything a subscriber saw, once quiet: per
/// device (after keeping the highest seq) seq starts at 1 and grows by 1, states alternate
/// starting online; the retained status a late subscriber gets, the HTTP API and the last
/// status seen all agree. Returns the devices' final states.
pub async fn check_invariants(
    mqtt: &Mosquitto,
    api: SocketAddr,
    seen: &Collector,
) -> std::collections::BTreeMap<String, String> {
    let mut by_device: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for s in seen.all() {
        if let Some(d) = s.json["device"].as_str() {
            by_device
                .entry(d.to_owned())
                .or_default()
                .push(s.json.clone());
        }
    }
    let late = Collector::start(mqtt, "devices/+/status").await;
    let n = by_device.len();
    late.wait_for("every retained status", |s| s.len() >= n)
        .await;
    let retained: std::collections::BTreeMap<String, Value> = late
        .all()
        .into_iter()
        .map(|s| (s.json["device"].as_str().unwrap().to_owned(), s.json))
        .collect();
    let records = all_records(api).await;
    let mut finals = std::collections::BTreeMap::new();
    for (device, msgs) in &by_device {
        let h = history(msgs);
        for (i, (seq, state)) in h.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "{device}: seq gap in {h:?}");
            let expected = if i % 2 == 0 { "online" } else { "offline" };
            assert_eq!(state, expected, "{device}: states do not alternate: {h:?}");
        }
        let last = accepted(msgs).pop().unwrap();
        assert_eq!(
            retained.get(device),
            Some(&last),
            "{device}: retained differs from the last status"
        );
        let rec = records
            .get(device)
            .unwrap_or_else(|| panic!("{device}: not listed by the API"));
        assert_eq!(rec["seq"], last["seq"], "{device}: API seq");
        assert_eq!(rec["state"], last["state"], "{device}: API state");
        finals.insert(device.clone(), last["state"].as_str().unwrap().to_owned());
    }
    finals
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

/// A child process that is killed (and reaped) when dropped, so a failing test leaves no
/// monitor behind (a SIGSTOPped one is continued first).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-CONT", &self.0.id().to_string()])
                .status();
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// The built binary as a replica: `(process, http address, client id)`.
pub fn spawn_replica(
    redis: &RedisServer,
    mqtt: &Mosquitto,
    extra: &[&str],
) -> (Proc, SocketAddr, String) {
    spawn_replica_on(&["--redis-url".into(), redis.url()], mqtt, extra)
}

/// [`spawn_replica`] with the Redis arguments given (e.g. `--redis-cluster-nodes`).
pub fn spawn_replica_on(
    redis_args: &[String],
    mqtt: &Mosquitto,
    extra: &[&str],
) -> (Proc, SocketAddr, String) {
    spawn_replica_with_env(redis_args, mqtt, extra, &[])
}

/// [`spawn_replica_on`] with extra environment variables for the process, e.g.
/// [`faketime::skewed_clock`] for a replica whose wall clock is off.
pub fn spawn_replica_with_env(
    redis_args: &[String],
    mqtt: &Mosquitto,
    extra: &[&str],
    env: &[(String, String)],
) -> (Proc, SocketAddr, String) {
    let id = format!("presenced-replica-{:08x}", fastrand::u32(..));
    let log = replica_log(&id);
    spawn_replica_as(&id, redis_args, mqtt, extra, env, log)
}

/// [`spawn_replica`] with its log (stderr, `RUST_LOG=warn` unless
/// `PRESENCED_TEST_RUST_LOG` says otherwise) written to `log`, for a test that reads it.
pub fn spawn_replica_logging_to(
    redis: &RedisServer,
    mqtt: &Mosquitto,
    extra: &[&str],
    log: &Path,
) -> (Proc, SocketAddr, String) {
    let id = format!("presenced-replica-{:08x}", fastrand::u32(..));
    let file = std::fs::File::create(log).unwrap();
    let redis_args = ["--redis-url".into(), redis.url()];
    spawn_replica_as(&id, &redis_args, mqtt, extra, &[], Stdio::from(file))
}

fn spawn_replica_as(
    id: &str,
    redis_args: &[String],
    mqtt: &Mosquitto,
    extra: &[&str],
    env: &[(String, String)],
    log: Stdio,
) -> (Proc, SocketAddr, String) {
    let http = free_port();
    let child = Command::new(presenced_bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("PRESENCED_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(redis_args)
        .args(["--mqtt-url", &mqtt.url()])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args([
            "--mqtt-client-id",
            id,
            "--presence-ttl",
            "1s",
            "--presence-min-ttl",
            "500ms",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    (Proc(child), addr, id.to_owned())
}

/// Where a replica's log goes: `$PRESENCED_TEST_LOG_DIR/<client id>.log` if set (for
/// debugging a failing test), else nowhere.
fn replica_log(id: &str) -> Stdio {
    match std::env::var_os("PRESENCED_TEST_LOG_DIR") {
        Some(dir) => std::fs::File::create(Path::new(&dir).join(format!("{id}.log")))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        None => Stdio::null(),
    }
}

pub fn kill(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Keeps `ids` heartbeating every `every` until the returned token is cancelled.
pub fn keep_beating(devices: Arc<Devices>, ids: Vec<String>, every: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        loop {
            for id in &ids {
                devices.heartbeat(id, b"").await;
            }
            tokio::select! {
                () = t.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    token
}
