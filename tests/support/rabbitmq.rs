//! A real RabbitMQ node with its MQTT plugin (MQTT 3.1.1), on free loopback ports, its
//! node name, config, mnesia and log folders in a temp dir of its own; killed on drop
//! (its whole process group, and its own epmd).
//!
//! It starts in ~10 s, so a test file starts one and runs its scenarios against it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::servers::{free_port, Broker};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

pub struct RabbitMq {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl RabbitMq {
    pub fn start() -> RabbitMq {
        let bin = std::env::var("RABBITMQ_SERVER_BIN").unwrap_or_else(|_| SERVER.to_owned());
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} not found: install it (apt-get install -y rabbitmq-server) or set RABBITMQ_SERVER_BIN"
        );
        let dir = tempfile::tempdir().unwrap();
        let (port, amqp, dist, epmd) = (free_port(), free_port(), free_port(), free_port());
        let d = dir.path().to_str().unwrap().to_owned();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp}\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{port}\n\
                 mqtt.allow_anonymous = true\n\
                 loopback_users = none\n\
                 log.console = false\n\
                 log.file.level = info\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
        let env: Vec<(String, String)> = [
            ("HOME", d.clone()),
            (
                "RABBITMQ_NODENAME",
                format!("presenced-test-{port}@localhost"),
            ),
            ("RABBITMQ_CONFIG_FILE", format!("{d}/rabbitmq.conf")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                format!("{d}/enabled_plugins"),
            ),
            ("RABBITMQ_MNESIA_BASE", format!("{d}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{d}/log")),
            ("RABBITMQ_PID_FILE", format!("{d}/pid")),
            ("RABBITMQ_DIST_PORT", dist.to_string()),
            ("ERL_EPMD_PORT", epmd.to_string()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let child = spawn(&bin, &env, &dir.path().join("server.log"));
        let mut broker = RabbitMq {
            port,
            child,
            dir,
            env,
        };
        broker.wait_up();
        broker
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The MQTT listener opens last in the boot: once it accepts, the node serves MQTT.
    fn wait_up(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "rabbitmq-server exited ({status}); log:\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "rabbitmq did not open its MQTT port {} in 120 s; log:\n{}",
            self.port,
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// Kills the node (like a crash): its durable queues and retained store stay on disk.
    pub fn stop(&mut self) {
        // The process group: the script, the Erlang VM and its helpers.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }

    /// Kills the node and starts it again with the same folders and ports.
    pub fn restart(&mut self) {
        self.stop();
        let bin = std::env::var("RABBITMQ_SERVER_BIN").unwrap_or_else(|_| SERVER.to_owned());
        self.child = spawn(&bin, &self.env, &self.log());
        self.wait_up();
    }
}

fn spawn(bin: &str, env: &[(String, String)], log: &std::path::Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

impl Broker for RabbitMq {
    fn port(&self) -> u16 {
        self.port
    }

    fn protocol(&self) -> Option<&'static str> {
        Some("v3.1.1")
    }

    fn wildcard_retained(&self) -> bool {
        false
    }

    fn shared_subscriptions(&self) -> bool {
        false
    }

    fn restart(&mut self) {
        RabbitMq::restart(self);
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
        // Its own epmd, daemonized outside the group: it refuses to stop while it still
        // lists the node, which it drops once it sees the VM's connection close.
        for _ in 0..50 {
            let Ok(out) = Command::new("epmd")
                .arg("-kill")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .output()
            else {
                return;
            };
            let said = String::from_utf8_lossy(&out.stdout);
            if !said.contains("living nodes") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
