//! Real `redis-server` and `mosquitto` processes on free loopback ports, killed on drop.

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait::{eventually, patience};

pub fn free_port() -> u16 {
    // Racy (another process may take it before the server binds), as redis-rs's harness
    // admits; servers below retry on a new port if the bind fails.
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn binary(name: &str, env: &str) -> String {
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

pub fn wait_port(port: u16, child: &mut Child, log: &Path) -> bool {
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

/// An MQTT broker the tests run against: Mosquitto, or RabbitMQ (`rabbitmq`).
pub trait Broker {
    fn port(&self) -> u16;

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }

    /// The `mqtt.protocol` the monitor must use, if not its default.
    fn protocol(&self) -> Option<&'static str> {
        None
    }

    /// Whether retained messages reach wildcard subscriptions.
    fn wildcard_retained(&self) -> bool {
        true
    }

    /// Whether `$share/<group>/...` subscriptions are served.
    fn shared_subscriptions(&self) -> bool {
        true
    }

    /// Kills the broker and starts it again on the same port (keeping what its
    /// configuration persists).
    fn restart(&mut self);
}

impl Broker for Mosquitto {
    fn port(&self) -> u16 {
        self.port
    }

    fn restart(&mut self) {
        Mosquitto::restart(self);
    }
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

impl Mosquitto {
    /// Waits until a broker with persistence has saved its state after `after` (its
    /// autosave), so that a crash from now on keeps what it held then.
    pub async fn saved_since(&self, after: std::time::SystemTime) {
        let db = self.dir.path().join("mosquitto.db");
        eventually("the broker saved its state", || {
            let db = db.clone();
            async move {
                let modified = std::fs::metadata(&db).and_then(|m| m.modified()).ok()?;
                (modified > after).then_some(())
            }
        })
        .await;
    }

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
