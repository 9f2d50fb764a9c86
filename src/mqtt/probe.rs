//! The broker probe: what the broker cannot do, found by trying it with messages of our
//! own, since a broker may accept a subscription it never serves (a `$share/...` filter
//! taken as a literal topic) or deliver retained messages only to exact topics, and say
//! nothing. A short-lived client of its own (clean session, random id), so the monitor's
//! session keeps nothing of it; run after every connection of the session and by
//! `check-config`.
//!
//! The steps: a v5 CONNACK's properties say what the broker refuses outright; a retained
//! message of ours is stored (PUBACK), then a wildcard filter over its topic is subscribed;
//! with a shared group, a message goes through a shared filter of ours; last a marker goes
//! through the plain wildcard. The broker sends a subscription's retained messages before
//! anything published after its SUBACK, and delivers what one client publishes in order, so
//! once the marker is back (and a short grace for brokers that route shared subscriptions
//! apart) what has not come is missing. No marker in time: nothing is known.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::client::{Client, Qos, Retain};
use super::connect::{client, ConnectOptions, SessionMode};
use super::error::Error;
use super::events::{Event, EventLoop, Offers};
use crate::broker::{Findings, Lack};
use crate::config::MqttConfig;

/// The longest a probe may take before it counts as unknown.
const PROBE_WAIT: Duration = Duration::from_secs(10);
/// After the marker is back, how long a shared subscription's copy may still come.
const GRACE: Duration = Duration::from_secs(1);

/// Where one probe's messages go: all under its own client id.
struct Topics {
    retained: String,
    marker: String,
    wildcard: String,
    shared: Option<(String, String)>,
}

impl Topics {
    fn new(id: &str, shared_group: Option<&str>) -> Topics {
        let base = format!("presenced/probe/{id}");
        // Outside `base`, so that only the shared filter matches it.
        let shared = shared_group.map(|g| {
            let topic = format!("presenced/probe-shared/{id}");
            let filter = format!("$share/{g}/{topic}");
            (topic, filter)
        });
        Topics {
            retained: format!("{base}/retained"),
            marker: format!("{base}/marker"),
            wildcard: format!("{base}/+"),
            shared,
        }
    }
}

/// Where the probe is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Connecting,
    /// The retained message is sent; its PUBACK is awaited.
    Storing,
    Subscribing,
    /// The messages are out; since when the marker is back, if it is.
    Awaiting(Option<Instant>),
}

/// One probe's state: what was offered, what came back.
struct Probe {
    topics: Topics,
    token: Bytes,
    step: Step,
    missing: Vec<Lack>,
    retained_seen: bool,
    shared_seen: bool,
}

impl Probe {
    fn new(topics: Topics) -> Probe {
        Probe {
            topics,
            token: Bytes::from(format!("{:016x}", fastrand::u64(..))),
            step: Step::Connecting,
            missing: Vec::new(),
            retained_seen: false,
            shared_seen: false,
        }
    }

    fn lack(&mut self, lack: Lack) {
        if !self.missing.contains(&lack) {
            self.missing.push(lack);
        }
    }

    /// The CONNACK: what the broker says it refuses is not tried (a v5 broker may drop
    /// the connection for it).
    fn connected(&mut self, offers: Offers, client: &Client) -> Result<(), Error> {
        if offers.max_qos == Some(0) {
            self.lack(Lack::Qos1);
        }
        if offers.shared_subscriptions == Some(false) && self.topics.shared.is_some() {
            self.lack(Lack::SharedSubscriptions);
            self.topics.shared = None;
        }
        if offers.retain == Some(false) {
            self.lack(Lack::Retain);
            self.lack(Lack::WildcardRetained);
            return self.subscribe(client);
        }
        let (topic, token) = (&self.topics.retained, self.token.clone());
        client.try_publish(topic, Qos::AtLeastOnce, Retain::Yes, token)?;
        self.step = Step::Storing;
        Ok(())
    }

    fn subscribe(&mut self, client: &Client) -> Result<(), Error> {
        let mut filters = vec![self.topics.wildcard.clone()];
        filters.extend(self.topics.shared.iter().map(|(_, f)| f.clone()));
        client.try_subscribe_many(&filters)?;
        self.step = Step::Subscribing;
        Ok(())
    }

    /// Subscribed: the shared copy, then the marker, through the filters.
    fn subscribed(&mut self, granted: &[bool], client: &Client) -> Result<(), Error> {
        if granted.get(1) == Some(&false) {
            self.lack(Lack::SharedSubscriptions);
            self.topics.shared = None;
        }
        if let Some((topic, _)) = &self.topics.shared {
            client.try_publish(topic, Qos::AtLeastOnce, Retain::No, self.token.clone())?;
        }
        let marker = &self.topics.marker;
        client.try_publish(marker, Qos::AtLeastOnce, Retain::No, self.token.clone())?;
        self.step = Step::Awaiting(None);
        Ok(())
    }

    fn message(&mut self, topic: &[u8], payload: &[u8], retained: bool) {
        if payload != self.token.as_ref() {
            return;
        }
        if topic == self.topics.retained.as_bytes() && retained {
            self.retained_seen = true;
        } else if topic == self.topics.marker.as_bytes() {
            if self.step == Step::Awaiting(None) {
                self.step = Step::Awaiting(Some(Instant::now()));
            }
        } else if self
            .topics
            .shared
            .as_ref()
            .is_some_and(|(t, _)| topic == t.as_bytes())
        {
            self.shared_seen = true;
        }
    }

    /// One event; an error ends the probe with nothing known.
    fn event(&mut self, ev: Event, client: &Client) -> Result<(), String> {
        let queued = |r: Result<(), Error>| r.map_err(|e| e.to_string());
        match ev {
            Event::ConnAck { offers, .. } if self.step == Step::Connecting => {
                queued(self.connected(offers, client))?;
            }
            Event::PubAck {
                ok: false, reason, ..
            } if self.step == Step::Storing => {
                return Err(format!(
                    "the broker refused the probe's retained message ({reason})"
                ));
            }
            Event::PubAck { .. } if self.step == Step::Storing => queued(self.subscribe(client))?,
            Event::SubAck { granted } if self.step == Step::Subscribing => {
                if granted.first() != Some(&true) {
                    return Err("the broker refused the probe's own subscription".into());
                }
                queued(self.subscribed(&granted, client))?;
            }
            Event::Publish {
                topic,
                payload,
                retained,
            } => self.message(&topic, &payload, retained),
            _ => {}
        }
        Ok(())
    }

    /// Done once everything asked came back, or the marker did a grace ago.
    fn done_at(&self) -> Option<Instant> {
        let Step::Awaiting(Some(back)) = self.step else {
            return None;
        };
        let retained = self.retained_seen || self.missing.contains(&Lack::Retain);
        let shared = self.shared_seen || self.topics.shared.is_none();
        Some(if retained && shared {
            back
        } else {
            back + GRACE
        })
    }

    fn findings(mut self) -> Findings {
        if !self.retained_seen && !self.missing.contains(&Lack::Retain) {
            self.lack(Lack::WildcardRetained);
        }
        if !self.shared_seen && self.topics.shared.is_some() {
            self.lack(Lack::SharedSubscriptions);
        }
        self.missing.sort();
        Findings::Known(self.missing)
    }
}

/// Probes the broker of `cfg` with a client of its own (`id`), shared subscriptions only if
/// `shared_group` is given. Never fails: what could not be found out is
/// [`Findings::Unknown`].
pub(crate) async fn probe(cfg: &MqttConfig, id: String, shared_group: Option<&str>) -> Findings {
    let mut probe = Probe::new(Topics::new(&id, shared_group));
    let (client, mut eventloop) = client(ConnectOptions {
        cfg,
        client_id: id,
        session: SessionMode::Clean,
        will: None,
        inflight: 10,
        keep_alive: Duration::from_secs(5),
    });
    let deadline = Instant::now() + PROBE_WAIT;
    let outcome = loop {
        let done = probe.done_at().unwrap_or(deadline);
        tokio::select! {
            () = tokio::time::sleep_until(done.min(deadline)) => break Ok(()),
            ev = eventloop.poll() => {
                let handled = ev.map_err(|e| e.to_string()).and_then(|ev| probe.event(ev, &client));
                if let Err(e) = handled {
                    break Err(e);
                }
            }
        }
    };
    let stored = probe.step != Step::Connecting && !probe.missing.contains(&Lack::Retain);
    let retained = probe.topics.retained.clone();
    let findings = match outcome {
        Ok(()) if probe.done_at().is_some() => probe.findings(),
        Ok(()) if probe.step == Step::Connecting => Findings::Unknown("no CONNACK in time".into()),
        Ok(()) => Findings::Unknown("the probe's marker did not come back in time".into()),
        Err(e) => Findings::Unknown(e),
    };
    clean_up(&client, &mut eventloop, stored.then_some(&retained)).await;
    findings
}

/// Clears our retained message (an empty retained message deletes it) and leaves, bounded.
async fn clean_up(client: &Client, eventloop: &mut EventLoop, retained: Option<&String>) {
    if let Some(topic) = retained {
        let _ = client.try_publish(topic, Qos::AtLeastOnce, Retain::Yes, Bytes::new());
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Disconnected) {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(shared: bool) -> Probe {
        Probe::new(Topics::new("p", shared.then_some("g")))
    }

    fn back(p: &mut Probe) {
        let token = p.token.clone();
        p.step = Step::Awaiting(None);
        p.message(b"presenced/probe/p/marker", &token, false);
    }

    #[test]
    fn what_came_back_is_there_and_what_did_not_is_missing() {
        let mut p = probe(true);
        let token = p.token.clone();
        back(&mut p);
        assert!(
            p.done_at().unwrap() > Instant::now(),
            "a grace for the rest"
        );
        // A live copy of the retained message is not a retained delivery.
        p.message(b"presenced/probe/p/retained", &token, false);
        p.message(b"presenced/probe/p/retained", &token, true);
        p.message(b"presenced/probe-shared/p", b"someone else's", false);
        assert_eq!(
            p.findings(),
            Findings::Known(vec![Lack::SharedSubscriptions])
        );

        let mut p = probe(true);
        let token = p.token.clone();
        p.message(b"presenced/probe-shared/p", &token, false);
        p.message(b"presenced/probe/p/retained", &token, true);
        assert_eq!(p.done_at(), None, "not before the marker");
        back(&mut p);
        assert!(p.done_at().unwrap() <= Instant::now(), "no grace needed");
        assert_eq!(p.findings(), Findings::Known(vec![]));
    }

    #[test]
    fn shared_subscriptions_are_only_judged_when_asked() {
        let mut p = probe(false);
        back(&mut p);
        assert_eq!(p.findings(), Findings::Known(vec![Lack::WildcardRetained]));
    }
}
