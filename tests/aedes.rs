//! The monitor against a third real broker: Aedes (Node.js, from npm), MQTT 3.1.1 only, no
//! shared subscriptions, retained messages to wildcards, everything in memory (a crash
//! loses its sessions and retained messages). The same scenarios as RabbitMQ's, one test
//! each (Aedes starts in well under a second).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::aedes::Aedes;
use support::brokers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_api() {
    brokers::lifecycle_and_api(&Aedes::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_restart_makes_no_device_offline() {
    brokers::monitor_restart(&Aedes::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_and_closes_once() {
    brokers::outage(&Aedes::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_wills_take_devices_offline() {
    brokers::wills(&Aedes::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_is_not_ready_and_decides_nothing() {
    brokers::shared_group_is_not_ready(&Aedes::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_what_the_broker_lacks() {
    brokers::check_config(&Aedes::start()).await;
}

/// In memory: the crash loses the monitor's session and every retained status; the
/// monitor republishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_crash_that_loses_everything() {
    brokers::broker_crash(&mut Aedes::start()).await;
}
