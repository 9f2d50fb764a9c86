//! What operators meet: the Grafana dashboard and alert rules evaluated by a real Prometheus
//! scraping a real monitor, and static checks of everything in `deploy/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use support::*;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn tool(name: &str) -> String {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} not found: apt-get install -y prometheus (scripts/setup does)"
    );
    name.to_owned()
}

/// Runs `promtool <args> <file>` and requires success.
fn promtool(args: &[&str], file: &Path) {
    let out = Command::new(tool("promtool"))
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every PromQL expression of the dashboard, with Grafana's variables filled in.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("dashboards/presenced.json")).unwrap())
            .unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            out.push((p["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

fn alert_rules() -> Vec<(String, String)> {
    let y: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for g in y["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let rule = r["alert"].as_str().unwrap().to_owned();
            assert!(
                r["annotations"]["summary"].as_str().is_some(),
                "{rule} has no summary"
            );
            let runbook = r["annotations"]["runbook"].as_str().unwrap();
            let anchor = runbook.split('#').nth(1).unwrap();
            let readme = std::fs::read_to_string(repo("README.md"))
                .unwrap()
                .to_lowercase();
            assert!(
                readme.contains(&format!("### {anchor}")),
                "README has no runbook section for {rule}"
            );
            out.push((rule, r["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

async fn query(prom: u16, expr: &str) -> Value {
    let q: String = expr
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let addr = format!("127.0.0.1:{prom}").parse().unwrap();
    let (code, body) = get_json(addr, &format!("/api/v1/query?query={q}")).await;
    assert_eq!(code, 200, "query failed: {expr}\n{body}");
    assert_eq!(body["status"], "success", "{expr}: {body}");
    body
}

fn nonempty(v: &Value) -> bool {
    v["data"]["result"]
        .as_array()
        .is_some_and(|r| !r.is_empty())
}

/// A real Prometheus scrapes a real monitor driven by the simulator; every dashboard query
/// and every alert rule parses and evaluates, and every series they read has data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_evaluate_against_real_prometheus() {
    let prometheus = tool("prometheus");
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    // With a token, as deployed: Prometheus sends it from a file, like deploy/'s config.
    const TOKEN: &str = "operators-test-token";
    let wills = "devices/{device}/will";
    let app = TestApp::spawn(config(
        &redis,
        &mqtt,
        &[("http.auth_token", TOKEN), ("mqtt.will_topic", wills)],
    ))
    .await;
    presenced::metrics::register_process_collector();

    // The simulator in-process: 200 devices, a quarter of them go silent (offline by their
    // wills, lag).
    let mqtt_cfg = app.cfg.mqtt.clone();
    let sim = tokio::spawn(async move {
        let opts = presenced::simulate::SimOptions {
            devices: 200,
            interval: Duration::from_millis(300),
            offline_fraction: 0.25,
            duration: Some(Duration::from_secs(60)),
            prefix: "sim".into(),
            groups: 4,
            outages: Vec::new(),
            will_topic: Some(
                presenced::device::TopicTemplate::parse_with(
                    wills,
                    presenced::device::Levels::DeviceAndGroup,
                )
                .unwrap(),
            ),
        };
        let _ = presenced::simulate::run(&mqtt_cfg, opts, std::future::pending()).await;
    });

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: [\"{}\"]\n\
         scrape_configs:\n  - job_name: presenced\n    \
         authorization:\n      credentials_file: \"{}\"\n    \
         static_configs:\n      - targets: [\"{}\"]\n",
        repo("deploy/prometheus/alerts.yml").display(),
        token.display(),
        app.http()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    promtool(&["check", "config"], &dir.path().join("prometheus.yml"));
    let mut child = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    eventually("prometheus scraped the monitor a few times with offline devices", || async {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let (code, body) = get(addr, "/api/v1/query?query=count_over_time(presenced_devices%7Bstate%3D%22offline%22%7D%5B1m%5D)").await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
        let (_, m) = get(app.http(), &format!("/metrics?access_token={TOKEN}")).await?;
        let offline = metric(&m, r#"presenced_devices{state="offline"}"#)?;
        (code == 200 && n >= 5.0 && offline >= 50.0).then_some(())
    })
    .await;
    // A few more scrapes after the offline transitions, for rates over them.
    tokio::time::sleep(Duration::from_secs(3)).await;

    for (title, expr) in dashboard_exprs() {
        let v = query(port, &expr).await;
        assert!(
            nonempty(&v),
            "dashboard panel {title:?}: no data for {expr}"
        );
    }
    for (rule, expr) in alert_rules() {
        query(port, &expr).await;
        // The rule may rightly not fire; the series it reads must exist.
        for (i, _) in expr.match_indices("presenced_") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let v = query(port, &format!("{name}{{job=\"presenced\"}}")).await;
            assert!(nonempty(&v), "alert {rule}: no series {name}");
        }
    }
    // Prometheus loaded the rules.
    let (_, rules) = get_json(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "/api/v1/rules",
    )
    .await;
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(loaded, alert_rules().len());

    let _ = child.kill();
    let _ = child.wait();
    sim.abort();
    app.stop().await.unwrap();
}

#[test]
fn promtool_accepts_the_rules_and_config() {
    promtool(&["check", "rules"], &repo("deploy/prometheus/alerts.yml"));
    // The compose config names the rules and the token by their paths inside the
    // container; promtool requires the token file to exist.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t\n").unwrap();
    let text = std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/alerts.yml",
            repo("deploy/prometheus/alerts.yml").to_str().unwrap(),
        )
        .replace("/run/secrets/presenced-http-token", token.to_str().unwrap());
    assert!(
        text.contains("credentials_file"),
        "the scrape job sends no token"
    );
    std::fs::write(dir.path().join("p.yml"), text).unwrap();
    promtool(&["check", "config"], &dir.path().join("p.yml"));
}

/// Every YAML file in deploy/ parses (all documents), and the compose file only refers to
/// files that exist.
#[test]
fn deploy_yaml_parses_and_compose_files_exist() {
    let mut n = 0;
    for entry in walk(&repo("deploy")) {
        let ext = entry.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "yml" && ext != "yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&entry).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            if let Err(e) = serde_norway::Value::deserialize(doc) {
                panic!("{}: {e}", entry.display());
            }
            n += 1;
        }
    }
    assert!(n >= 8, "only {n} YAML documents found");

    let base = repo("deploy/compose");
    let compose: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(base.join("docker-compose.yml")).unwrap())
            .unwrap();
    let mut refs = 0;
    for (name, svc) in compose["services"].as_mapping().unwrap() {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            if host.starts_with('.') {
                assert!(base.join(host).exists(), "{name:?} mounts missing {host}");
                refs += 1;
            }
        }
    }
    let build = &compose["x-presenced"]["build"];
    let ctx = base.join(build["context"].as_str().unwrap());
    assert!(ctx.join(build["dockerfile"].as_str().unwrap()).exists());
    assert!(refs >= 6, "{refs}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The systemd unit passes `systemd-analyze verify` (with the binary path pointed at the
/// built one), where systemd-analyze exists.
#[test]
fn systemd_unit_verifies() {
    let has = Command::new("sh")
        .arg("-c")
        .arg("command -v systemd-analyze")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has {
        eprintln!("systemd-analyze not available; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo("deploy/systemd/presenced.service"))
        .unwrap()
        .replace(
            "/usr/local/bin/presenced",
            presenced_bin().to_str().unwrap(),
        );
    let path = dir.path().join("presenced.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

/// The shipped example config is accepted by `presenced check-config` with servers up.
#[test]
fn example_config_passes_check_config() {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let out = Command::new(presenced_bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args([
            "check-config",
            "--config",
            repo("deploy/presenced.example.toml").to_str().unwrap(),
        ])
        .args(["--redis-url", &redis.url(), "--mqtt-url", &mqtt.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
