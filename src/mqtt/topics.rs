//! The monitor's own topics (beside the configured heartbeat and status topics): its
//! presence, its sync marker, the peers' beacons and the broker's retained marker. Names
//! only; it must not publish or subscribe.

/// Where each replica's presence is retained (and its will published).
pub(crate) const INSTANCES: &str = "presenced/instances/";
/// Where replicas that reach Redis say so, per shared group.
pub(super) const BEACONS: &str = "presenced/peers/";
/// A retained message of ours that tells whether the broker still has its retained
/// messages: missing after a reconnect without session means it lost them.
pub(super) const BROKER_TOPIC: &str = "presenced/broker";

/// The monitor's presence topic.
pub(crate) fn instance_topic(instance: &str) -> String {
    format!("{INSTANCES}{instance}")
}

/// A topic only this replica subscribes to, for its sync marker.
pub(super) fn sync_topic(instance: &str) -> String {
    format!("presenced/sync/{instance}")
}

/// Beacons are per shared group: another deployment on the same broker is not a peer.
pub(super) fn beacon_topic(group: &str, instance: &str) -> String {
    format!("{BEACONS}{group}/{instance}")
}
