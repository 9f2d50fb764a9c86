//! Every metric of the contract, registered once into a registry passed in (no global
//! registry, so tests can run several monitors in one process).
//!
//! Label values come from enums, never from a device id: cardinality is fixed by
//! construction. Every labelled series is created at start, at 0. The one label with values
//! from outside, `group`, is bounded by `groups.max_series` (the rest are summed under
//! `_other`), see `GroupSeries`.
//!
//! It must not decide what to count: the tasks call it; fleet counts are set by `http` at
//! scrape time from Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::broker::{Findings, Lack};
use crate::device::{GroupName, State};
use crate::store::{FleetCounts, GroupCounts};

/// The `group` label of the devices of every group without series of its own.
pub(crate) const OTHER_GROUP: &str = "_other";

/// Buckets for the notification lag, in seconds: dense below 1 s, up to 10 minutes.
const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Why a heartbeat was refused (the `reason` label).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rejected {
    InvalidId,
    TooLarge,
}

/// What became of a message on the will topic (the `result` label).
#[derive(Clone, Copy, Debug)]
pub(crate) enum WillResult {
    /// It took its device offline.
    Applied,
    /// Older than the device's latest heartbeat.
    Stale,
    /// Not a will, a replay, or a will of a device not online.
    Ignored,
}

impl WillResult {
    fn label(self) -> &'static str {
        match self {
            WillResult::Applied => "applied",
            WillResult::Stale => "stale",
            WillResult::Ignored => "ignored",
        }
    }
}

#[derive(Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    devices: IntGaugeVec,
    flapping: IntGauge,
    heartbeats: IntCounter,
    rejected: IntCounterVec,
    transitions: IntCounterVec,
    wills: IntCounterVec,
    lag: Histogram,
    missed: IntCounter,
    forgotten: IntCounter,
    rebuilds: IntCounter,
    blind_rebuilds: IntCounter,
    broker_missing: IntGaugeVec,
    redis_up: IntGauge,
    mqtt_up: IntGauge,
    build_info: IntGaugeVec,
    groups: IntGaugeVec,
    group_devices: IntGaugeVec,
    outages: IntCounter,
    series: Arc<Mutex<GroupSeries>>,
}

/// Which groups have their own `presenced_group_devices` series: the first `max` seen (in
/// name order within a scrape); once a group has series it keeps them, so a series never
/// changes meaning. Bounds the label's cardinality however many groups devices name.
#[derive(Debug)]
pub(crate) struct GroupSeries {
    max: usize,
    with_series: BTreeSet<GroupName>,
}

impl GroupSeries {
    fn new(max: usize) -> GroupSeries {
        GroupSeries {
            max,
            with_series: BTreeSet::new(),
        }
    }

    /// The figures to set: per group with series (0 for one without devices now), and the
    /// sum of the others.
    fn split(
        &mut self,
        all: &BTreeMap<GroupName, GroupCounts>,
    ) -> (Vec<(GroupName, GroupCounts)>, GroupCounts) {
        let mut other = GroupCounts::default();
        for (group, counts) in all {
            if self.with_series.contains(group) {
                continue;
            }
            if self.with_series.len() < self.max {
                self.with_series.insert(group.clone());
            } else {
                other.online += counts.online;
                other.offline += counts.offline;
            }
        }
        let own = self
            .with_series
            .iter()
            .map(|g| (g.clone(), all.get(g).copied().unwrap_or_default()))
            .collect();
        (own, other)
    }
}

impl Metrics {
    /// Registers every metric into `registry`, every labelled series at 0; at most
    /// `max_group_series` groups get series of their own.
    pub(crate) fn register(
        registry: &Registry,
        max_group_series: usize,
    ) -> prometheus::Result<Metrics> {
        let m = Metrics::new(registry, max_group_series)?;
        for collector in m.collectors() {
            registry.register(collector)?;
        }
        for state in ["online", "offline"] {
            m.devices.with_label_values(&[state]).set(0);
            m.transitions.with_label_values(&[state]).reset();
        }
        for reason in ["invalid_id", "too_large"] {
            m.rejected.with_label_values(&[reason]).reset();
        }
        for r in [WillResult::Applied, WillResult::Stale, WillResult::Ignored] {
            m.wills.with_label_values(&[r.label()]).reset();
        }
        for state in ["ok", "outage"] {
            m.groups.with_label_values(&[state]).set(0);
        }
        for state in ["online", "offline"] {
            m.group_devices
                .with_label_values(&[OTHER_GROUP, state])
                .set(0);
        }
        for lack in Lack::ALL {
            m.broker_missing.with_label_values(&[lack.label()]).set(0);
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// Every metric, for registering.
    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.devices.clone()),
            Box::new(self.flapping.clone()),
            Box::new(self.heartbeats.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.transitions.clone()),
            Box::new(self.wills.clone()),
            Box::new(self.lag.clone()),
            Box::new(self.missed.clone()),
            Box::new(self.forgotten.clone()),
            Box::new(self.rebuilds.clone()),
            Box::new(self.blind_rebuilds.clone()),
            Box::new(self.broker_missing.clone()),
            Box::new(self.redis_up.clone()),
            Box::new(self.mqtt_up.clone()),
            Box::new(self.build_info.clone()),
            Box::new(self.groups.clone()),
            Box::new(self.group_devices.clone()),
            Box::new(self.outages.clone()),
        ]
    }

    /// Every metric with its name and help, not registered yet.
    fn new(registry: &Registry, max_group_series: usize) -> prometheus::Result<Metrics> {
        let devices = IntGaugeVec::new(
            Opts::new(
                "presenced_devices",
                "Devices known to the fleet, by state; every replica reports the same figure.",
            ),
            &["state"],
        )?;
        let flapping = IntGauge::new(
            "presenced_devices_flapping",
            "Devices flapping now, fleet-wide (presence.flap_threshold, presence.flap_half_life).",
        )?;
        let heartbeats = IntCounter::new(
            "presenced_heartbeats_total",
            "Heartbeats accepted by this replica.",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "presenced_heartbeats_rejected_total",
                "Heartbeats refused by this replica, by reason.",
            ),
            &["reason"],
        )?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "presenced_transitions_total",
                "Transitions this replica committed, by target state.",
            ),
            &["to"],
        )?;
        let wills = IntCounterVec::new(
            Opts::new(
                "presenced_wills_total",
                "Messages on the will topic this replica handled, by result.",
            ),
            &["result"],
        )?;
        let lag = Histogram::with_opts(
            HistogramOpts::new(
                "presenced_notification_lag_seconds",
                "Time from a device's TTL deadline (or its will's arrival) to its offline status acknowledged by the broker.",
            )
            .buckets(LAG_BUCKETS.to_vec()),
        )?;
        let missed = IntCounter::new(
            "presenced_missed_expirations_total",
            "Offline transitions whose expiry was not seen as it happened (found at start, after a reconnect, or by a safety-net pass).",
        )?;
        let forgotten = IntCounter::new(
            "presenced_devices_forgotten_total",
            "Devices this replica forgot (offline for longer than presence.forget_after).",
        )?;
        let rebuilds = IntCounter::new(
            "presenced_state_rebuilds_total",
            "Rebuilds of the state from the retained statuses on the broker this replica ran.",
        )?;
        let blind_rebuilds = IntCounter::new(
            "presenced_state_rebuilds_blind_total",
            "Rebuilds that could not read the retained statuses (the broker does not deliver retained messages to wildcard subscriptions): the lost buckets started empty.",
        )?;
        let broker_missing = IntGaugeVec::new(
            Opts::new(
                "presenced_broker_feature_missing",
                "1 when the latest probe of the broker found this feature missing (shared subscriptions only probed with mqtt.shared_group).",
            ),
            &["feature"],
        )?;
        let redis_up = IntGauge::new(
            "presenced_redis_up",
            "1 when Redis commands and the keyspace listener are connected, else 0.",
        )?;
        let mqtt_up = IntGauge::new(
            "presenced_mqtt_up",
            "1 when connected and subscribed to the MQTT broker, else 0.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("presenced_build_info", "Build information; always 1."),
            &["version"],
        )?;
        let groups = IntGaugeVec::new(
            Opts::new(
                "presenced_groups",
                "Groups with devices, fleet-wide, by state (ok or outage).",
            ),
            &["state"],
        )?;
        let group_devices = IntGaugeVec::new(
            Opts::new(
                "presenced_group_devices",
                "Devices per group and state, for at most groups.max_series groups; the others summed under group=\"_other\".",
            ),
            &["group", "state"],
        )?;
        let outages = IntCounter::new(
            "presenced_group_outages_total",
            "Group outages this replica opened.",
        )?;

        Ok(Metrics {
            registry: registry.clone(),
            devices,
            flapping,
            heartbeats,
            rejected,
            transitions,
            wills,
            lag,
            missed,
            forgotten,
            rebuilds,
            blind_rebuilds,
            broker_missing,
            redis_up,
            mqtt_up,
            build_info,
            groups,
            group_devices,
            outages,
            series: Arc::new(Mutex::new(GroupSeries::new(max_group_series))),
        })
    }

    pub(crate) fn heartbeat_accepted(&self) {
        self.heartbeats.inc();
    }

    pub(crate) fn heartbeat_rejected(&self, reason: Rejected) {
        let label = match reason {
            Rejected::InvalidId => "invalid_id",
            Rejected::TooLarge => "too_large",
        };
        self.rejected.with_label_values(&[label]).inc();
    }

    pub(crate) fn will_handled(&self, result: WillResult, n: u64) {
        self.wills.with_label_values(&[result.label()]).inc_by(n);
    }

    pub(crate) fn transition_committed(&self, to: State) {
        self.transitions.with_label_values(&[to.as_str()]).inc();
    }

    pub(crate) fn observe_lag(&self, seconds: f64) {
        self.lag.observe(seconds.max(0.0));
    }

    pub(crate) fn missed_expiration(&self, n: u64) {
        self.missed.inc_by(n);
    }

    pub(crate) fn devices_forgotten(&self, n: u64) {
        self.forgotten.inc_by(n);
    }

    pub(crate) fn state_rebuilt(&self) {
        self.rebuilds.inc();
    }

    pub(crate) fn blind_rebuild(&self) {
        self.blind_rebuilds.inc();
    }

    /// The latest probe's findings (nothing is set while they are unknown).
    pub(crate) fn set_broker(&self, findings: &Findings) {
        if let Findings::Known(missing) = findings {
            for lack in Lack::ALL {
                let set = i64::from(missing.contains(&lack));
                self.broker_missing
                    .with_label_values(&[lack.label()])
                    .set(set);
            }
        }
    }

    pub(crate) fn set_fleet(&self, counts: FleetCounts) {
        self.devices
            .with_label_values(&["online"])
            .set(counts.online);
        self.devices
            .with_label_values(&["offline"])
            .set(counts.offline);
        self.flapping.set(counts.flapping);
    }

    /// The group gauges, from every group's counts (fleet-wide, read from Redis).
    pub(crate) fn set_groups(&self, all: &BTreeMap<GroupName, GroupCounts>, in_outage: usize) {
        let (own, other) = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .split(all);
        for (group, counts) in &own {
            self.set_group_devices(group.as_str(), *counts);
        }
        self.set_group_devices(OTHER_GROUP, other);
        let outage = in_outage as i64;
        self.groups.with_label_values(&["outage"]).set(outage);
        self.groups
            .with_label_values(&["ok"])
            .set((all.len() as i64 - outage).max(0));
    }

    fn set_group_devices(&self, group: &str, counts: GroupCounts) {
        let set = |state, n| self.group_devices.with_label_values(&[group, state]).set(n);
        set("online", counts.online);
        set("offline", counts.offline);
    }

    pub(crate) fn outage_opened(&self) {
        self.outages.inc();
    }

    pub(crate) fn set_redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    pub(crate) fn set_mqtt_up(&self, up: bool) {
        self.mqtt_up.set(i64::from(up));
    }

    /// The Prometheus text exposition of this registry plus the process metrics.
    pub(crate) fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which register() rules out.
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Registers the `process_*` collector in the default registry, once per process.
///
/// The process collector describes the whole process, so it belongs to the binary, not to
/// each monitor instance; `Metrics::render` merges the default registry in.
pub fn register_process_collector() {
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        // A second registration (e.g. two monitors in one test process) is harmless.
        let _ = prometheus::register(Box::new(pc));
    }
}
