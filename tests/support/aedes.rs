//! A real Aedes broker (Node.js, MQTT 3.1.1, no shared subscriptions, in memory) on a free
//! loopback port, killed on drop. `scripts/setup` installs it into `tests/brokers/aedes`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::servers::{binary, free_port, wait_port, Broker};

pub struct Aedes {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

fn script() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/brokers/aedes");
    assert!(
        dir.join("node_modules/aedes").exists(),
        "aedes is not installed: run scripts/setup (npm ci --prefix tests/brokers/aedes)"
    );
    dir.join("server.mjs")
}

impl Aedes {
    pub fn start() -> Aedes {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(port, &dir) {
                return Aedes { port, child, dir };
            }
        }
        panic!("aedes did not start");
    }

    /// Kills the broker (like a crash): being in memory, it forgets everything.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(port: u16, dir: &tempfile::TempDir) -> Option<Child> {
    let log = dir.path().join("aedes.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut child = Command::new(binary("node", "NODE_BIN"))
        .arg(script())
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    wait_port(port, &mut child, &log).then_some(child)
}

impl Broker for Aedes {
    fn port(&self) -> u16 {
        self.port
    }

    fn protocol(&self) -> Option<&'static str> {
        Some("v3.1.1")
    }

    fn shared_subscriptions(&self) -> bool {
        false
    }

    fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.port, &self.dir).expect("aedes did not restart");
    }
}

impl Drop for Aedes {
    fn drop(&mut self) {
        self.stop();
    }
}
