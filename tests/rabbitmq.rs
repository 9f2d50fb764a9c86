//! The monitor against a second real broker: RabbitMQ's MQTT plugin (Debian's 3.10, MQTT
//! 3.1.1 only). Its known gaps: no shared subscriptions (a `$share/...` filter is taken as
//! a literal topic), retained messages delivered to exact-topic subscriptions only. What
//! works must hold the contract (lifecycle, API, a monitor restart, an outage, device
//! wills, a broker crash, each ended by the invariant check, which reads the retained
//! statuses topic by topic here); what cannot work must be said (not ready, a refused
//! check, a rebuild that says it cannot read the statuses) instead of running half-blind.
//!
//! The node takes ~10 s to start, so one test runs the scenarios in turn against one node,
//! each with its own Redis and monitor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;

use support::brokers::*;
use support::rabbitmq::RabbitMq;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_on_rabbitmq() {
    let mut broker = RabbitMq::start();
    step("lifecycle and API", lifecycle_and_api(&broker)).await;
    step("a monitor restart", monitor_restart(&broker)).await;
    step("an outage", outage(&broker)).await;
    step("device wills", wills(&broker)).await;
    step(
        "a shared group is refused",
        shared_group_is_not_ready(&broker),
    )
    .await;
    step("a rebuild says it is blind", blind_rebuild(&broker)).await;
    step("check-config", check_config(&broker)).await;
    step("a broker crash", broker_crash(&mut broker)).await;
}

async fn step(name: &str, scenario: impl Future<Output = ()>) {
    eprintln!("--- rabbitmq: {name}");
    scenario.await;
}
