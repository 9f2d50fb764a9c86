//! The `presenced` binary: exit codes, error messages, signals, TLS, the simulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use presenced::redis_version::RedisVersion;
use support::fake_redis::FakeRedis;
use support::*;

/// The binary with a clean environment (no PRESENCED_* from the caller).
fn presenced() -> Command {
    let mut c = Command::new(presenced_bin());
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "presenced=info");
    c
}

fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `c` to its end, failing the test if that takes longer than `within`: the exit
/// status and stderr.
fn run_within(mut c: Command, within: Duration) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Proc(
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = wait_exit(&mut child, within);
    (status, std::fs::read_to_string(&log).unwrap())
}

fn server_flags(redis: &RedisServer, mqtt_url: &str, http: u16) -> Vec<String> {
    vec![
        "--redis-url".into(),
        redis.url(),
        "--mqtt-url".into(),
        mqtt_url.into(),
        "--http-listen".into(),
        format!("127.0.0.1:{http}"),
        "--presence-ttl".into(),
        "1s".into(),
        "--presence-min-ttl".into(),
        "500ms".into(),
        "--mqtt-client-id".into(),
        format!("presenced-cli-{:08x}", fastrand::u32(..)),
    ]
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bad value exits 2 with one line naming the key, from a flag, the environment or the file;
/// an unknown key in the file too.
#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let o = run({
        let mut c = presenced();
        c.args(["run", "--presence-ttl", "soon"]);
        c
    });
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("presence.ttl") && e.contains("soon"), "{e}");

    // TTL rules: a malformed rule, a bad duration, one outside the bounds.
    for bad in ["bat-*", "bat-*=soon", "bat-*=100ms", "gw-*=90s,group:=5m"] {
        let o = run({
            let mut c = presenced();
            c.args(["check-config", "--presence-ttl-rules", bad]);
            c
        });
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("presence.ttl_rules"), "{bad}: {e}");
    }

    // Wills: a topic that overlaps the heartbeat topic, one without {device}, an empty payload.
    for (flag, bad, key) in [
        (
            "--mqtt-will-topic",
            "devices/+/heartbeat",
            "mqtt.will_topic",
        ),
        (
            "--mqtt-will-topic",
            "devices/{device}/heartbeat",
            "mqtt.will_topic",
        ),
        ("--mqtt-will-topic", "devices/will", "mqtt.will_topic"),
        ("--mqtt-will-payload", "  ", "mqtt.will_payload"),
    ] {
        let o = run({
            let mut c = presenced();
            c.args(["check-config", flag, bad]);
            c
        });
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(key), "{bad}: {e}");
    }

    let o = run({
        let mut c = presenced();
        c.env("PRESENCED_HTTP_LISTEN", "everywhere");
        c
    });
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("http.listen"), "{}", stderr(&o));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[presence]\nheartbeat_tll = \"5s\"\n").unwrap();
    let o = run({
        let mut c = presenced();
        c.args(["check-config", "--config", file.to_str().unwrap()]);
        c
    });
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("presence.heartbeat_tll"),
        "{}",
        stderr(&o)
    );

    let o = run({
        let mut c = presenced();
        c.env("PRESENCED_CONFIG", file.to_str().unwrap());
        c
    });
    assert_eq!(o.status.code(), Some(2));

    let o = run({
        let mut c = presenced();
        c.arg("--no-such-flag");
        c
    });
    assert_eq!(o.status.code(), Some(2));

    let o = run({
        let mut c = presenced();
        c.args(["simulate", "--devices", "0", "--interval", "1s"]);
        c
    });
    assert_eq!(o.status.code(), Some(2));

    // Cluster seeds: database 0 only, valid URLs; the password is never echoed.
    for (seeds, says) in [
        ("redis://:hunter2@10.0.0.1:7000/1", "database 1"),
        ("redis://10.0.0.1:7000, ,unix:///tmp/r.sock", "node 2"),
        (" , ", "at least one node"),
    ] {
        let o = run({
            let mut c = presenced();
            c.args(["check-config", "--redis-cluster-nodes", seeds]);
            c
        });
        assert_eq!(o.status.code(), Some(2), "{seeds}");
        let e = stderr(&o);
        assert!(
            e.contains("redis.cluster_nodes") && e.contains(says),
            "{seeds}: {e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }
}

/// The HTTP token: a file that cannot be read, or a token and a file both, exit 2 with one
/// line naming `http.auth_token_file`; an empty token names `http.auth_token`. No message
/// shows the token.
#[test]
fn bad_auth_token_settings_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-token");
    let token = dir.path().join("token");
    std::fs::write(&token, "hunter2\n").unwrap();
    // (environment, flags, what stderr names)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case; 4] = [
        (
            &[],
            &["--http-auth-token-file", missing.to_str().unwrap()],
            "http.auth_token_file",
        ),
        (
            &[("PRESENCED_HTTP_AUTH_TOKEN_FILE", missing.to_str().unwrap())],
            &[],
            "http.auth_token_file",
        ),
        (
            &[("PRESENCED_HTTP_AUTH_TOKEN", "hunter2")],
            &["--http-auth-token-file", token.to_str().unwrap()],
            "http.auth_token_file",
        ),
        (&[], &["--http-auth-token", ""], "http.auth_token:"),
    ];
    for (env, args, key) in cases {
        let o = run({
            let mut c = presenced();
            c.envs(env.iter().copied()).arg("check-config").args(args);
            c
        });
        assert_eq!(o.status.code(), Some(2), "{env:?} {args:?}");
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(key), "{env:?} {args:?}: {e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}

/// `--log-format json` writes one JSON object per line to stderr; stdout stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_go_to_stderr() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let http = free_port();
    let mut child = Proc(
        presenced()
            .args(["--log-format", "json"])
            .args(server_flags(&redis, &mqtt.url(), http))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_ready(format!("127.0.0.1:{http}").parse().unwrap()).await;
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(12)).code(),
        Some(0)
    );
    let mut err = String::new();
    let mut out = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 3, "{err}");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(err.contains("Starting presenced."), "{err}");
    assert!(out.is_empty(), "{out}");
}

#[test]
fn help_and_version_exit_0() {
    let o = run({
        let mut c = presenced();
        c.arg("--help");
        c
    });
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("simulate"));
    let o = run({
        let mut c = presenced();
        c.arg("--version");
        c
    });
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Redis refuses CONFIG and has no notifications: the monitor probes, then refuses to start
/// with exit 1 and one line naming notify-keyspace-events.
#[test]
fn config_refused_and_notifications_off_exits_1() {
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", "\"\""]);
    let mqtt = Mosquitto::start();
    let mut c = presenced();
    c.args(server_flags(&redis, &mqtt.url(), free_port()));
    let started = std::time::Instant::now();
    let o = run(c);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let last = stderr(&o).lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("presenced: "), "{last}");
    assert!(last.contains("notify-keyspace-events"), "{last}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// CONFIG refused but notifications enabled on the server: the probe proves them and the
/// monitor runs. SIGTERM then shuts it down with exit 0 and an offline presence; the
/// process metrics are exposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_succeeds_and_sigterm_exits_0() {
    let redis = RedisServer::start_with(&[
        "--rename-command",
        "CONFIG",
        "\"\"",
        "--notify-keyspace-events",
        "Ex",
    ]);
    let mqtt = Mosquitto::start();
    let http = free_port();
    let flags = server_flags(&redis, &mqtt.url(), http);
    let instance = flags.last().unwrap().clone();
    let presence = Collector::start(&mqtt, &format!("presenced/instances/{instance}")).await;
    let mut child = Proc(
        presenced()
            .args(&flags)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    wait_ready(addr).await;
    let m = scrape(addr).await;
    assert!(m.contains("process_resident_memory_bytes"), "{m}");
    presence
        .wait_for("online", |s| s.iter().any(|m| m.json["state"] == "online"))
        .await;

    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(12));
    assert_eq!(status.code(), Some(0));
    presence
        .wait_for("offline", |s| {
            s.iter().any(|m| m.json["state"] == "offline")
        })
        .await;
}

/// A monitor that dies without a goodbye is announced offline by the broker (its will).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_monitor_is_announced_offline_by_its_will() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let http = free_port();
    let flags = server_flags(&redis, &mqtt.url(), http);
    let instance = flags.last().unwrap().clone();
    let presence = Collector::start(&mqtt, &format!("presenced/instances/{instance}")).await;
    let mut child = Proc(
        presenced()
            .args(&flags)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    presence
        .wait_for("online", |s| s.iter().any(|m| m.json["state"] == "online"))
        .await;
    signal(&child, "-KILL");
    wait_exit(&mut child, Duration::from_secs(5));
    presence
        .wait_for("will: offline", |s| {
            s.iter().any(|m| m.json["state"] == "offline")
        })
        .await;
    let offline = presence
        .all()
        .into_iter()
        .find(|m| m.json["state"] == "offline")
        .unwrap();
    assert_eq!(offline.json["instance"], instance.as_str());
}

/// A CA and a server certificate for `localhost` / 127.0.0.1 signed by it, as PEM files
/// `ca.pem`, `server.pem` and `server.key` in `dir`.
fn make_certificates(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "presenced test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();

    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
}

/// MQTT over TLS: a mosquitto TLS listener with a certificate made here; the monitor
/// trusts its CA through SSL_CERT_FILE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);

    let plain = free_port();
    let tls = free_port();
    let ca = d.join("ca.pem");
    let mqtt = Mosquitto::start_with_config(
        dir,
        plain,
        &format!(
            // `user root`: when started as root, mosquitto otherwise drops to its own user,
            // which cannot read the key in this private temp directory.
            "user root\nallow_anonymous true\nlistener {plain} 127.0.0.1\n\
             listener {tls} 127.0.0.1\ncafile {{dir}}/ca.pem\ncertfile {{dir}}/server.pem\nkeyfile {{dir}}/server.key\n"
        ),
    );
    let redis = RedisServer::start();
    let http = free_port();
    let mut child = Proc(
        presenced()
            .args(server_flags(
                &redis,
                &format!("mqtts://localhost:{tls}"),
                http,
            ))
            .env("SSL_CERT_FILE", &ca)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    eventually("ready over TLS", || async move {
        (get(addr, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    let statuses = Collector::start(&mqtt, "devices/+/status").await;
    let devices = Devices::connect(&mqtt).await;
    devices.heartbeat("tls-device", b"").await;
    statuses
        .wait_for("online via TLS monitor", |s| !s.is_empty())
        .await;
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(12)).code(),
        Some(0)
    );

    // Without the CA the certificate is refused: not ready, not crashing.
    let http = free_port();
    let mut child = Proc(
        presenced()
            .args(server_flags(
                &redis,
                &format!("mqtts://localhost:{tls}"),
                http,
            ))
            .env("SSL_CERT_FILE", "/nonexistent.pem")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    let body = eventually("unready without the CA", || async move {
        let (code, body) = get(addr, "/readyz").await?;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("mqtt"), "{body}");
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(12)).code(),
        Some(0)
    );
}

/// check-config reaches both servers (exit 0) and fails clearly when one is missing (exit 1).
#[test]
fn check_config_reaches_the_servers() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let o = run({
        let mut c = presenced();
        c.arg("check-config")
            .args(server_flags(&redis, &mqtt.url(), free_port()));
        c
    });
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("redis: reachable") && out.contains("mqtt: reachable"),
        "{out}"
    );
    // The installed Redis (7.x) passes the version check, which names what it found.
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("redis: reachable (Redis "))
        .and_then(|v| v.strip_suffix(')'))
        .and_then(RedisVersion::parse)
        .unwrap_or_else(|| panic!("no version in the report: {out}"));
    assert!(version.is_supported(), "{version}");
    assert!(
        out.contains("ttl: 1s for every device (unless its heartbeat asks with ttl_s)"),
        "{out}"
    );
    // The broker probe found mosquitto complete (shared subscriptions only with a group).
    assert!(
        out.contains("mqtt: the broker serves retained messages to wildcard subscriptions, QoS 1"),
        "{out}"
    );
    let o = run({
        let mut c = presenced();
        c.arg("check-config")
            .args(server_flags(&redis, &mqtt.url(), free_port()))
            .args(["--mqtt-shared-group", "g"]);
        c
    });
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("mqtt: the broker serves shared subscriptions, retained messages to wildcard subscriptions, QoS 1"),
        "{}", String::from_utf8_lossy(&o.stdout)
    );

    // The effective TTL rules, in their order.
    let o = run({
        let mut c = presenced();
        c.arg("check-config")
            .args(server_flags(&redis, &mqtt.url(), free_port()))
            .args(["--presence-ttl-rules", "bat-*=12h,group:lab-*=5m"]);
        c
    });
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(
            "ttl rules (first match wins, else 1s; a heartbeat's ttl_s wins over both):\n  1. device id matches \"bat-*\": TTL 12h\n  2. group matches \"lab-*\": TTL 5m\n"
        ),
        "{out}"
    );

    let o = run({
        let mut c = presenced();
        c.arg("check-config").args(server_flags(
            &redis,
            &format!("mqtt://127.0.0.1:{}", free_port()),
            free_port(),
        ));
        c
    });
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("mqtt"), "{}", stderr(&o));
}

/// A Redis older than 6.2 (a stand-in speaking its protocol) is refused by `check-config` and
/// by `run`: exit 1, one line naming the version found, and nothing asked of it beyond the
/// connection and INFO (no script loaded, no subscription, no CONFIG).
#[test]
fn redis_older_than_6_2_is_refused_at_start() {
    let old = FakeRedis::start("6.0.16");
    let flags = |http: u16| {
        vec![
            "--redis-url".to_owned(),
            old.url(),
            // Never reached: Redis is checked first.
            "--mqtt-url".to_owned(),
            format!("mqtt://127.0.0.1:{}", free_port()),
            "--http-listen".to_owned(),
            format!("127.0.0.1:{http}"),
        ]
    };
    for command in ["check-config", "run"] {
        let mut c = presenced();
        c.arg(command).args(flags(free_port()));
        // Bounded: a monitor that does not refuse would wait for this Redis forever.
        let (status, e) = run_within(c, Duration::from_secs(15));
        assert_eq!(status.code(), Some(1), "{command}: {e}");
        let naming: Vec<&str> = e.lines().filter(|l| l.contains("6.0.16")).collect();
        assert_eq!(
            naming,
            vec![format!(
                "presenced: Redis 6.0.16 at 127.0.0.1:{} is too old: presenced needs Redis 6.2 or later",
                old.port
            )],
            "{command}: {e}"
        );
    }
    let asked = old.commands();
    assert!(asked.contains(&"INFO".to_owned()), "{asked:?}");
    for never in ["SCRIPT", "EVALSHA", "SUBSCRIBE", "CONFIG", "SET"] {
        assert!(!asked.iter().any(|c| c == never), "{never} in {asked:?}");
    }
}

/// A running monitor whose Redis is replaced by an older one does not crash: its keyspace
/// listener logs the refusal naming the version and the monitor stays unready; when a
/// supported Redis is back, it is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replaced_by_an_older_one_leaves_the_monitor_unready() {
    let mut redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let http = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("presenced.log");
    let mut child = Proc(
        presenced()
            .args(server_flags(&redis, &mqtt.url(), http))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    wait_ready(addr).await;

    redis.stop();
    let old = FakeRedis::start_on(redis.port, "6.0.16");
    let body = eventually("unready on the old Redis", || async move {
        let (code, body) = get(addr, "/readyz").await?;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("redis"), "{body}");
    let log_ref = &log;
    let refusal = eventually("the refusal logged", || async move {
        std::fs::read_to_string(log_ref)
            .ok()?
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("Redis 6.0.16") && l.contains("too old"))
            .map(str::to_owned)
    })
    .await;
    assert!(refusal.contains("6.2 or later"), "{refusal}");
    assert!(child.try_wait().unwrap().is_none(), "the monitor exited");
    // Still unready: the listener tries again and refuses again.
    assert_eq!(get(addr, "/readyz").await.map(|r| r.0), Some(503));
    assert!(old.commands().contains(&"INFO".to_owned()));

    drop(old);
    redis.restart();
    wait_ready(addr).await;
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(12)).code(),
        Some(0)
    );
}

/// On a cluster every master's version is checked and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_every_masters_version() {
    let cluster = RedisCluster::start_with(3, 0).await;
    let mqtt = Mosquitto::start();
    let o = run({
        let mut c = presenced();
        c.args(["check-config", "--redis-cluster-nodes", &cluster.seeds()])
            .args(["--mqtt-url", &mqtt.url()]);
        c
    });
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let versions: Vec<RedisVersion> = out
        .lines()
        .filter(|l| l.starts_with("redis: master "))
        .filter_map(|l| l.split_once(": Redis ").map(|(_, v)| v))
        .map(|v| RedisVersion::parse(v).unwrap())
        .collect();
    assert_eq!(versions.len(), 3, "{out}");
    assert!(versions.iter().all(RedisVersion::is_supported), "{out}");
}

/// The simulator: N devices, the last F×N fall silent after one heartbeat; the monitor sees
/// exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_drives_the_monitor() {
    let Fleet {
        redis: _redis,
        mqtt,
        app,
        statuses: _statuses,
        devices: _devices,
    } = Fleet::start(&[]).await;
    let mut sim = Proc(
        presenced()
            .args(["simulate", "--devices", "40", "--interval", "300ms"])
            .args(["--offline-fraction", "0.25", "--duration", "6s"])
            .args(["--mqtt-url", &mqtt.url()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = app.http();
    eventually("30 online and 10 offline", || async move {
        let m = scrape(addr).await;
        let on = metric(&m, r#"presenced_devices{state="online"}"#)?;
        let off = metric(&m, r#"presenced_devices{state="offline"}"#)?;
        (on == 30.0 && off == 10.0).then_some(())
    })
    .await;
    let (_, rec) = get_json(addr, "/devices/sim-000040").await;
    assert_eq!(rec["state"], "offline");
    let (_, rec) = get_json(addr, "/devices/sim-000001").await;
    assert_eq!(rec["state"], "online");
    let status = wait_exit(&mut sim, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    let mut out = String::new();
    std::io::Read::read_to_string(sim.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("simulate: sent="), "{out}");
    app.stop().await.unwrap();
}
