//! The session's shutdown sequence. Once cancelled, statuses in flight are flushed (up to
//! [`DRAIN`]); then the offline presence is published, since a clean disconnect does not
//! fire the will, and its PUBACK awaited (up to [`LEAVE`]); then DISCONNECT is queued and
//! awaited (up to [`LEAVE`] more). It decides the phase and its deadline only; it must not
//! publish (the session does what each [`Step`] says).

use std::time::Duration;

use tokio::time::Instant;

/// How long a shutdown waits for statuses in flight to be acknowledged.
const DRAIN: Duration = Duration::from_secs(3);
/// How long a shutdown waits for the offline presence's PUBACK, then for the disconnect.
const LEAVE: Duration = Duration::from_secs(1);
/// How often the deadlines are checked while shutting down.
const TICK: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    /// Cancelled: flushing statuses in flight until the deadline.
    Draining,
    /// The offline presence is queued; waiting for its PUBACK.
    Leaving,
    /// DISCONNECT queued.
    Disconnecting,
}

/// What the session has outstanding, as it is before each wait.
pub(super) struct Outstanding {
    pub(super) connected: bool,
    /// Publishes queued in the client or awaiting their PUBACK.
    pub(super) in_flight: usize,
    /// Statuses not yet handed to the client (to send again, or in the channel).
    pub(super) waiting: bool,
}

/// What the session does now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing (yet): wait for the next event.
    Wait,
    /// The connection is gone while draining: nothing more can be delivered.
    Stop,
    /// Publish the offline presence.
    Leave,
    /// Queue DISCONNECT.
    Disconnect,
}

pub(super) struct Shutdown {
    phase: Phase,
    /// When the current phase gives up.
    deadline: Instant,
}

impl Shutdown {
    pub(super) fn new() -> Shutdown {
        Shutdown {
            phase: Phase::Running,
            deadline: Instant::now(),
        }
    }

    pub(super) fn phase(&self) -> Phase {
        self.phase
    }

    pub(super) fn cancel(&mut self) {
        self.phase = Phase::Draining;
        self.deadline = Instant::now() + DRAIN;
    }

    /// When the deadlines are next checked (far away while running).
    pub(super) fn tick_at(&self) -> Instant {
        match self.phase {
            Phase::Running => Instant::now() + Duration::from_secs(3600),
            _ => Instant::now() + TICK,
        }
    }

    /// The DISCONNECT was not confirmed in time: the session ends anyway.
    pub(super) fn gave_up(&self) -> bool {
        self.phase == Phase::Disconnecting && Instant::now() >= self.deadline
    }

    /// The next step, given what is outstanding; call again after doing it, until `Wait`.
    pub(super) fn step(&mut self, o: &Outstanding) -> Step {
        let now = Instant::now();
        let late = now >= self.deadline;
        match self.phase {
            Phase::Draining if !o.connected => Step::Stop,
            Phase::Draining if (o.in_flight == 0 && !o.waiting) || late => {
                self.phase = Phase::Leaving;
                self.deadline = self.deadline.max(now) + LEAVE;
                Step::Leave
            }
            Phase::Leaving if o.in_flight == 0 || late => {
                self.phase = Phase::Disconnecting;
                self.deadline = now + LEAVE;
                Step::Disconnect
            }
            _ => Step::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outstanding(in_flight: usize, waiting: bool) -> Outstanding {
        Outstanding {
            connected: true,
            in_flight,
            waiting,
        }
    }

    #[test]
    fn flushes_then_leaves_then_disconnects() {
        let mut s = Shutdown::new();
        assert_eq!(s.step(&outstanding(0, false)), Step::Wait, "running");
        s.cancel();
        assert_eq!(s.step(&outstanding(3, true)), Step::Wait);
        assert_eq!(s.step(&outstanding(1, false)), Step::Wait);
        assert_eq!(s.step(&outstanding(0, false)), Step::Leave);
        // The offline presence is in flight.
        assert_eq!(s.step(&outstanding(1, false)), Step::Wait);
        assert_eq!(s.step(&outstanding(0, false)), Step::Disconnect);
        assert_eq!(s.phase(), Phase::Disconnecting);
        assert_eq!(s.step(&outstanding(0, false)), Step::Wait);
        assert!(!s.gave_up());
    }

    #[test]
    fn a_presence_that_could_not_be_queued_disconnects_at_once() {
        let mut s = Shutdown::new();
        s.cancel();
        assert_eq!(s.step(&outstanding(0, false)), Step::Leave);
        assert_eq!(s.step(&outstanding(0, false)), Step::Disconnect);
    }

    #[test]
    fn disconnected_while_draining_stops() {
        let mut s = Shutdown::new();
        s.cancel();
        let gone = Outstanding {
            connected: false,
            ..outstanding(5, true)
        };
        assert_eq!(s.step(&gone), Step::Stop);
    }
}
