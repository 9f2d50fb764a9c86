//! What the broker cannot do, as the probe (`mqtt::probe`) found it: the features the
//! monitor relies on that brokers differ in. Names and explanations only; it must not
//! probe, log or decide readiness (`health` does, from these).

/// A feature the monitor uses that the broker was found not to offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Lack {
    /// `$share/<group>/...` is accepted but never delivers (or is refused): a replica of a
    /// shared group gets no heartbeats. Only probed with `mqtt.shared_group`.
    SharedSubscriptions,
    /// Retained messages reach exact-topic subscriptions only: subscribers (and the
    /// rebuild) that use a wildcard see no current state.
    WildcardRetained,
    /// The broker keeps no retained messages at all (v5 CONNACK: Retain Available 0).
    Retain,
    /// The broker grants at most QoS 0 (v5 CONNACK: Maximum QoS 0).
    Qos1,
}

impl Lack {
    pub(crate) const ALL: [Lack; 4] = [
        Lack::SharedSubscriptions,
        Lack::WildcardRetained,
        Lack::Retain,
        Lack::Qos1,
    ];

    /// The `feature` label of `presenced_broker_feature_missing`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Lack::SharedSubscriptions => "shared_subscriptions",
            Lack::WildcardRetained => "wildcard_retained",
            Lack::Retain => "retain",
            Lack::Qos1 => "qos1",
        }
    }

    /// Whether the monitor cannot do its job without it: then it is not ready.
    pub(crate) fn required(self) -> Requirement {
        match self {
            Lack::WildcardRetained => Requirement::Degrades,
            Lack::SharedSubscriptions | Lack::Retain | Lack::Qos1 => Requirement::Required,
        }
    }

    /// What it means for the monitor, in one line (the log and `/readyz`).
    pub(crate) fn explain(self) -> &'static str {
        match self {
            Lack::SharedSubscriptions => "mqtt: the broker does not serve shared subscriptions ($share/...): this replica gets no heartbeats; remove mqtt.shared_group or use a broker that supports them",
            Lack::WildcardRetained => "mqtt: the broker delivers retained messages only to exact-topic subscriptions: wildcard subscribers see no current state, and a rebuild after Redis lost its data cannot read the retained statuses",
            Lack::Retain => "mqtt: the broker does not keep retained messages: statuses are not kept for later subscribers",
            Lack::Qos1 => "mqtt: the broker grants at most QoS 0: statuses can be lost",
        }
    }
}

/// Whether the monitor can run without a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Requirement {
    /// Not ready without it.
    Required,
    /// It runs, with the guarantees the README lists for such a broker.
    Degrades,
}

/// The latest probe of the broker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Findings {
    /// Not probed yet on this connection.
    #[default]
    Pending,
    /// The probe finished: these are missing (sorted, none twice).
    Known(Vec<Lack>),
    /// The probe could not finish (no answer in time, a lost connection): nothing is known.
    Unknown(String),
}

impl Findings {
    /// Whether the probe showed that `lack` is missing.
    pub(crate) fn lacks(&self, lack: Lack) -> bool {
        matches!(self, Findings::Known(missing) if missing.contains(&lack))
    }

    /// The missing features the monitor cannot run without.
    pub(crate) fn blocking(&self) -> impl Iterator<Item = Lack> + '_ {
        let missing: &[Lack] = match self {
            Findings::Known(m) => m,
            _ => &[],
        };
        missing
            .iter()
            .copied()
            .filter(|l| l.required() == Requirement::Required)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_found_missing_counts() {
        let f = Findings::Known(vec![Lack::SharedSubscriptions, Lack::WildcardRetained]);
        assert!(f.lacks(Lack::WildcardRetained));
        assert!(!f.lacks(Lack::Retain));
        assert_eq!(
            f.blocking().collect::<Vec<_>>(),
            [Lack::SharedSubscriptions]
        );
        for unknown in [Findings::Pending, Findings::Unknown("timeout".into())] {
            assert!(!unknown.lacks(Lack::SharedSubscriptions));
            assert_eq!(unknown.blocking().count(), 0);
        }
        let labels: std::collections::HashSet<_> = Lack::ALL.iter().map(|l| l.label()).collect();
        assert_eq!(labels.len(), Lack::ALL.len());
    }
}
