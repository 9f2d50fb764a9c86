//! Test harness: real `redis-server` and `mosquitto` processes on free loopback ports
//! (killed on drop), the monitor in-process or as the built binary, MQTT clients, HTTP and
//! metrics helpers, fault tools, and the invariant check every fault test ends with.
//!
//! Each integration test file is its own crate and uses a part of this: what one file
//! leaves unused is not dead, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod aedes;
pub mod app;
pub mod brokers;
pub mod browser;
pub mod fake_redis;
pub mod faketime;
pub mod http_client;
pub mod invariants;
pub mod mqtt_clients;
pub mod outage;
pub mod proxy;
pub mod rabbitmq;
pub mod redis_cluster;
pub mod replica;
pub mod servers;
pub mod sse;
pub mod wait;

// Each test crate uses some of these, and none all of them.
#[allow(unused_imports)]
pub use self::{
    app::*, http_client::*, invariants::*, mqtt_clients::*, redis_cluster::*, replica::*,
    servers::*, wait::*,
};
