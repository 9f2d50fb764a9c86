//! Whether this process ran without a pause, and what proves the backlog after one is in.
//!
//! A stopped process (SIGSTOP, a VM pause, a starved machine) leaves heartbeats unread in
//! its socket while the wall clock moves on: a deadline that passes meanwhile may be covered
//! by one of them. Every task that decides from time (the MQTT task stamping a heartbeat,
//! the expirer and the forgetter before a decision, the stamper before a floor) asks the
//! [`Pulse`] *after* reading the clock, so a pause anywhere before that moment is seen,
//! whichever task runs first when the process resumes. A timer of one's own cannot do
//! that: a task busy in a Redis call during the pause, or woken by its socket before its
//! timer, never sees the timer late. Pure bookkeeping: no I/O besides the ticker's sleep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::device::Millis;

/// How often the ticker notes that the process runs.
const EVERY: Duration = Duration::from_millis(100);
/// A gap this long between two notes is a stall (five ticks missed).
const STALL: Duration = Duration::from_millis(500);

/// Counts this process's stalls: gaps longer than [`STALL`] between two notes that it runs.
#[derive(Debug)]
pub(crate) struct Pulse {
    origin: Instant,
    /// The latest note, in ms since `origin`.
    last: AtomicU64,
    stalls: AtomicU64,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        }
    }
}

impl Pulse {
    /// Notes that the process runs now; returns how many stalls it has had, this one
    /// included. Exactly one caller sees each gap: the first to note after it.
    pub(crate) fn beat(&self) -> u64 {
        let now = self.origin.elapsed().as_millis() as u64;
        let before = self.last.fetch_max(now, Ordering::AcqRel);
        if now.saturating_sub(before) > STALL.as_millis() as u64 {
            self.stalls.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.stalls.load(Ordering::Acquire)
        }
    }

    /// Notes every [`EVERY`] that the process runs, until cancelled: without it an idle
    /// stretch would look like a stall.
    pub(crate) async fn run(&self, token: CancellationToken) {
        loop {
            self.beat();
            tokio::select! {
                () = token.cancelled() => break,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    }
}

/// The MQTT task's sync marker came back: every heartbeat queued for us before `at` has been
/// received. It proves nothing about a stall after the marker was sent (`stalls`, the
/// [`Pulse`] count then): heartbeats may have queued behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Synced {
    pub(crate) at: Millis,
    pub(crate) stalls: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_gap_is_counted_once_by_the_first_to_note_after_it() {
        let pulse = Pulse::default();
        assert_eq!(pulse.beat(), 0);
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(pulse.beat(), 0, "a gap shorter than a stall");
        tokio::time::advance(Duration::from_millis(501)).await;
        assert_eq!(pulse.beat(), 1, "the first note after the gap counts it");
        assert_eq!(pulse.beat(), 1, "and nobody else");
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticker_keeps_an_idle_process_from_looking_stalled() {
        let pulse = std::sync::Arc::new(Pulse::default());
        let token = CancellationToken::new();
        let ticker = tokio::spawn({
            let (pulse, token) = (pulse.clone(), token.clone());
            async move { pulse.run(token).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pulse.beat(), 0);
        token.cancel();
        ticker.await.unwrap();
    }
}
