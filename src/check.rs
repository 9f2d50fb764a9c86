//! `presenced check-config`: validates what loading the configuration cannot (Redis
//! reachable, recent enough and its notification setting; every master of a cluster; the
//! broker reachable) and reports one line per check.
//!
//! It must not change the monitor's state: no key written, no `CONFIG SET`, no
//! subscription, and its MQTT client uses a clean session under its own random id. (Its
//! Redis connection loads the monitor's scripts into the script cache, as every start does.)

use std::time::Duration;

use crate::broker::Findings;
use crate::config::Config;
use crate::redis_version::{self, CheckError, RedisVersion};
use crate::startup::{seed_infos, seed_urls};
use crate::store::{self, Store, StoreError};
use crate::{cluster, mqtt, Error};

/// What `presenced check-config` found, one line per check.
pub async fn report(cfg: &Config) -> Result<Vec<String>, Error> {
    let mut report = vec![format!("config: ok (instance {})", cfg.mqtt.client_id)];
    let p = &cfg.presence;
    if p.ttl_rules.is_empty() {
        report.push(format!(
            "ttl: {} for every device (unless its heartbeat asks with ttl_s)",
            humantime::format_duration(p.ttl)
        ));
    } else {
        report.push(format!(
            "ttl rules (first match wins, else {}; a heartbeat's ttl_s wins over both):",
            humantime::format_duration(p.ttl)
        ));
        report.extend(p.ttl_rules.to_string().lines().map(|l| format!("  {l}")));
    }
    match seed_urls(&cfg.redis) {
        None => check_single(cfg, &mut report).await?,
        Some(urls) => check_cluster(cfg, &urls, &mut report).await?,
    }
    let (_client, mut eventloop) = mqtt::client(mqtt::ConnectOptions {
        cfg: &cfg.mqtt,
        client_id: format!("{}-check-{:08x}", cfg.mqtt.client_id, fastrand::u32(..)),
        session: mqtt::SessionMode::Clean,
        will: None,
        inflight: 10,
        keep_alive: Duration::from_secs(5),
    });
    let connack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(mqtt::Event::ConnAck { .. }) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .map_err(|_| mqtt::Error::ConnectTimeout)?;
    if let Err(e) = connack {
        return Err(match e.hint() {
            Some(hint) => Error::MqttHint(e, hint),
            None => Error::Mqtt(e),
        });
    }
    report.push("mqtt: reachable".into());
    check_broker(cfg, &mut report).await?;
    Ok(report)
}

/// What the broker cannot do (see `mqtt::probe`): a feature the configuration needs is an
/// error, one it can do without a report line.
async fn check_broker(cfg: &Config, report: &mut Vec<String>) -> Result<(), Error> {
    let id = format!("{}-check-{:08x}", cfg.mqtt.client_id, fastrand::u32(..));
    let findings = mqtt::probe(&cfg.mqtt, id, cfg.mqtt.shared_group.as_deref()).await;
    if let Some(lack) = findings.blocking().next() {
        return Err(Error::BrokerUnsupported(lack.explain()));
    }
    match &findings {
        Findings::Known(missing) if missing.is_empty() => {
            let shared = if cfg.mqtt.shared_group.is_some() {
                "shared subscriptions, "
            } else {
                ""
            };
            report.push(format!(
                "mqtt: the broker serves {shared}retained messages to wildcard subscriptions, QoS 1"
            ));
        }
        Findings::Known(missing) => {
            report.extend(missing.iter().map(|l| l.explain().to_owned()));
        }
        Findings::Unknown(why) => {
            report.push(format!(
                "mqtt: could not probe the broker's features: {why}"
            ));
        }
        Findings::Pending => {}
    }
    Ok(())
}

/// How long check-config waits for each Redis step.
const CHECK_WAIT: Duration = Duration::from_secs(5);

fn timed_out() -> Error {
    Error::Redis(StoreError::Protocol("connect timed out".into()))
}

impl From<CheckError> for Error {
    fn from(e: CheckError) -> Error {
        match e {
            CheckError::Unsupported(e) => Error::RedisUnsupported(e),
            CheckError::Redis(e) => Error::Redis(e.into()),
        }
    }
}

/// A connection to one node, and its version checked (first: an old Redis is named as such
/// rather than failing on whatever comes next).
async fn connect_checked(
    info: redis::ConnectionInfo,
) -> Result<(redis::aio::MultiplexedConnection, RedisVersion), Error> {
    let addr = info.addr().to_string();
    let client = redis::Client::open(info).map_err(StoreError::from)?;
    let mut conn = tokio::time::timeout(CHECK_WAIT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| timed_out())?
        .map_err(StoreError::from)?;
    let version = tokio::time::timeout(CHECK_WAIT, redis_version::check(&mut conn, &addr))
        .await
        .map_err(|_| timed_out())??;
    Ok((conn, version))
}

/// The report line on a node's notification setting. Read-only: check-config never changes
/// the server's configuration.
async fn describe_notifications(
    cfg: &Config,
    node: &str,
    conn: &mut redis::aio::MultiplexedConnection,
) -> String {
    match store::ensure_notifications(conn, store::Configure::Leave).await {
        store::NotifyConfig::AlreadyOn => {
            format!("redis: {node}notify-keyspace-events has E and x")
        }
        other => format!(
            "redis: {node}notify-keyspace-events not confirmed ({other:?}); `run` will {}",
            if cfg.redis.configure_notifications {
                "try to enable it"
            } else {
                "probe for it"
            }
        ),
    }
}

async fn check_single(cfg: &Config, report: &mut Vec<String>) -> Result<(), Error> {
    let client = redis::Client::open(cfg.redis.url.0.as_str()).map_err(StoreError::from)?;
    let (mut conn, version) = connect_checked(client.get_connection_info().clone()).await?;
    let store = tokio::time::timeout(CHECK_WAIT, Store::connect(&client, &cfg.redis.key_prefix))
        .await
        .map_err(|_| timed_out())??;
    store.ping().await?;
    report.push(format!("redis: reachable (Redis {version})"));
    report.push(describe_notifications(cfg, "", &mut conn).await);
    Ok(())
}

/// Every master that serves slots is checked: each runs the scripts of its slots.
async fn check_cluster(
    cfg: &Config,
    urls: &[String],
    report: &mut Vec<String>,
) -> Result<(), Error> {
    let infos = seed_infos(urls)?;
    let topology = cluster::discover(&infos).await.map_err(StoreError::from)?;
    let masters: Vec<_> = topology.iter().filter(|n| n.serves_slots()).collect();
    let mut checked = Vec::new();
    for node in &masters {
        let info = cluster::node_info(&infos[0], &node.host, node.port);
        let (conn, version) = connect_checked(info).await?;
        checked.push((node.addr(), conn, version));
    }
    let store = tokio::time::timeout(
        CHECK_WAIT,
        Store::connect_cluster(urls, &cfg.redis.key_prefix),
    )
    .await
    .map_err(|_| timed_out())??;
    store.ping().await?;
    report.push(format!(
        "redis: cluster reachable ({} masters, {} nodes)",
        masters.len(),
        topology.len()
    ));
    for (addr, mut conn, version) in checked {
        report.push(format!("redis: master {addr}: Redis {version}"));
        report.push(describe_notifications(cfg, &format!("master {addr}: "), &mut conn).await);
    }
    Ok(())
}
