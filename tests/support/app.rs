//! The monitor in this process: its test config and its lifetime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use presenced::config::{Config, Sources};
use tokio_util::sync::CancellationToken;

use super::*;

/// A config for tests: the given servers, short TTLs, a free HTTP port; `extra` overrides.
pub fn config(redis: &RedisServer, mqtt: &impl Broker, extra: &[(&str, &str)]) -> Config {
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
    if let Some(protocol) = mqtt.protocol() {
        flags.push(("mqtt.protocol".into(), protocol.into()));
    }
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
pub fn cluster_config(
    cluster: &RedisCluster,
    mqtt: &impl Broker,
    extra: &[(&str, &str)],
) -> Config {
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
            presenced::telemetry::init(presenced::telemetry::LogFormat::Text);
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

/// The setup most tests start from: Redis, Mosquitto, the monitor (ready, with `extra`
/// config overrides), a collector of every device status and a heartbeat publisher.
/// Destructure it with every field bound (`redis: _redis` for one a test does not touch):
/// a field left to `..` would be dropped, and its server stopped, at once.
pub struct Fleet {
    pub devices: Devices,
    pub statuses: Collector,
    pub app: TestApp,
    pub mqtt: Mosquitto,
    pub redis: RedisServer,
}

impl Fleet {
    pub async fn start(extra: &[(&str, &str)]) -> Fleet {
        let redis = RedisServer::start();
        let mqtt = Mosquitto::start();
        let app = TestApp::spawn(config(&redis, &mqtt, extra)).await;
        let statuses = Collector::start(&mqtt, "devices/+/status").await;
        let devices = Devices::connect(&mqtt).await;
        Fleet {
            devices,
            statuses,
            app,
            mqtt,
            redis,
        }
    }
}
