//! The built binary as a replica (a child process, killed and reaped on drop).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::*;

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
    mqtt: &impl Broker,
    extra: &[&str],
) -> (Proc, SocketAddr, String) {
    spawn_replica_on(&["--redis-url".into(), redis.url()], mqtt, extra)
}

/// [`spawn_replica`] with the Redis arguments given (e.g. `--redis-cluster-nodes`).
pub fn spawn_replica_on(
    redis_args: &[String],
    mqtt: &impl Broker,
    extra: &[&str],
) -> (Proc, SocketAddr, String) {
    spawn_replica_with_env(redis_args, mqtt, extra, &[])
}

/// [`spawn_replica_on`] with extra environment variables for the process, e.g.
/// [`faketime::skewed_clock`] for a replica whose wall clock is off.
pub fn spawn_replica_with_env(
    redis_args: &[String],
    mqtt: &impl Broker,
    extra: &[&str],
    env: &[(String, String)],
) -> (Proc, SocketAddr, String) {
    let id = format!("presenced-replica-{:08x}", fastrand::u32(..));
    let log = replica_log(&id);
    spawn_replica_as(&id, redis_args, &mqtt.url(), extra, env, log)
}

/// [`spawn_replica`] with its log (stderr, `RUST_LOG=warn` unless
/// `PRESENCED_TEST_RUST_LOG` says otherwise) written to `log`, for a test that reads it.
pub fn spawn_replica_logging_to(
    redis: &RedisServer,
    mqtt: &impl Broker,
    extra: &[&str],
    log: &Path,
) -> (Proc, SocketAddr, String) {
    let id = format!("presenced-replica-{:08x}", fastrand::u32(..));
    let file = std::fs::File::create(log).unwrap();
    let redis_args = ["--redis-url".into(), redis.url()];
    spawn_replica_as(&id, &redis_args, &mqtt.url(), extra, &[], Stdio::from(file))
}

/// [`spawn_replica`] reaching the broker at `mqtt_url` (a [`FaultProxy`] in front of it).
pub fn spawn_replica_via(
    redis: &RedisServer,
    mqtt_url: &str,
    extra: &[&str],
) -> (Proc, SocketAddr, String) {
    let id = format!("presenced-replica-{:08x}", fastrand::u32(..));
    let redis_args = ["--redis-url".into(), redis.url()];
    spawn_replica_as(&id, &redis_args, mqtt_url, extra, &[], replica_log(&id))
}

fn spawn_replica_as(
    id: &str,
    redis_args: &[String],
    mqtt_url: &str,
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
        .args(["--mqtt-url", mqtt_url])
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
    signal(child.id(), sig);
}

/// Sends `sig` (`-STOP`, `-CONT`, ...) to a process.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}
