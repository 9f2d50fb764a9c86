//! Whether this process ran without a pause, and what proves the backlog after one is in.
//!
//! A stopped process (SIGSTOP, a VM pause, a suspend, a starved machine) leaves heartbeats
//! unread in its socket while the wall clock moves on: a deadline that passes meanwhile may
//! be covered by one of them. Every task that decides from time (the MQTT task stamping a
//! heartbeat, the expirer and the forgetter before a decision, the stamper before a floor)
//! asks the [`Pulse`] *after* reading the clock, so a pause anywhere before that moment is
//! seen, whichever task runs first when the process resumes. A timer of one's own cannot
//! do that: a task busy in a Redis call during the pause, or woken by its socket before its
//! timer, never sees the timer late.
//!
//! The reader of heartbeats (the MQTT task) also notes for itself: if it alone is held up
//! (starved, blocked) while the rest of the process runs, heartbeats wait unread just the
//! same, and deciders must not go on as if they were read. Pure bookkeeping: no I/O besides
//! the ticker's sleep.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::device::{now_ms, Millis};

/// How often the ticker notes that the process runs.
const EVERY: Duration = Duration::from_millis(100);
/// A gap this long between two notes is a stall (five ticks missed).
const STALL: Duration = Duration::from_millis(500);

/// Counts this process's stalls: gaps longer than [`STALL`] between two notes that it runs
/// (on the monotonic clock, or forward on the wall clock: a suspend stops the one, not the
/// other), and gaps as long between two notes of the heartbeat reader.
#[derive(Debug)]
pub(crate) struct Pulse {
    origin: Instant,
    /// One lock for every field: a note after a gap must return a count that includes it,
    /// whoever counted it.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The latest note: ms since `origin`, and the wall clock then.
    last: u64,
    last_wall: Millis,
    /// The heartbeat reader's latest note (ms since `origin`).
    reader: u64,
    stalls: u64,
    /// When the latest stall was counted (ms since `origin`).
    counted_at: u64,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse {
            origin: Instant::now(),
            state: Mutex::new(State {
                last: 0,
                last_wall: now_ms(),
                reader: 0,
                stalls: 0,
                counted_at: 0,
            }),
        }
    }
}

impl Pulse {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn elapsed(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Notes that the process runs now; returns how many stalls it has had, this one
    /// included.
    pub(crate) fn beat(&self) -> u64 {
        let (now, wall) = (self.elapsed(), now_ms());
        let mut s = self.lock();
        s.note(now, wall);
        s.stalls
    }

    /// [`Pulse::beat`], by the heartbeat reader: a gap since its own previous note counts
    /// too, unless a stall was counted since that note already (one marker covers both).
    pub(crate) fn reader_beat(&self) -> u64 {
        let (now, wall) = (self.elapsed(), now_ms());
        let mut s = self.lock();
        let reader_gap = now.saturating_sub(s.reader) > STALL.as_millis() as u64;
        let since_reader = s.counted_at > s.reader;
        if !s.note(now, wall) && reader_gap && !since_reader {
            s.stalls += 1;
            s.counted_at = now;
        }
        s.reader = s.reader.max(now);
        s.stalls
    }

    /// Whether the heartbeat reader has noted within [`STALL`]: if not, it is held up, and
    /// heartbeats may wait unread (its next note counts the stall).
    pub(crate) fn reader_fresh(&self) -> bool {
        let now = self.elapsed();
        now.saturating_sub(self.lock().reader) <= STALL.as_millis() as u64
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

impl State {
    /// Records a note; `true` if it ends a stall (and counted it).
    fn note(&mut self, now: u64, wall: Millis) -> bool {
        let stall = STALL.as_millis() as u64;
        let gap = now.saturating_sub(self.last) > stall
            || wall.saturating_sub(self.last_wall) > stall + now.saturating_sub(self.last);
        if gap {
            self.stalls += 1;
            self.counted_at = now;
        }
        self.last = self.last.max(now);
        self.last_wall = self.last_wall.max(wall);
        gap
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
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_gap_is_counted_once_and_seen_by_every_note_after_it() {
        let pulse = Pulse::default();
        assert_eq!(pulse.beat(), 0);
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(pulse.beat(), 0, "a gap shorter than a stall");
        tokio::time::advance(Duration::from_millis(501)).await;
        assert_eq!(pulse.beat(), 1, "the first note after the gap counts it");
        assert_eq!(
            pulse.beat(),
            1,
            "and the next sees it, without counting it again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticker_keeps_an_idle_process_from_looking_stalled() {
        let pulse = Arc::new(Pulse::default());
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

    #[tokio::test(start_paused = true)]
    async fn a_reader_held_up_while_the_rest_runs_is_a_stall() {
        let pulse = Arc::new(Pulse::default());
        let token = CancellationToken::new();
        let ticker = tokio::spawn({
            let (pulse, token) = (pulse.clone(), token.clone());
            async move { pulse.run(token).await }
        });
        assert_eq!(pulse.reader_beat(), 0);
        assert!(pulse.reader_fresh());
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!pulse.reader_fresh(), "the reader has not noted for 800 ms");
        assert_eq!(pulse.beat(), 0, "the ticker ran: no stall of the process");
        assert_eq!(pulse.reader_beat(), 1, "the reader's own gap counts");
        assert!(pulse.reader_fresh());
        token.cancel();
        ticker.await.unwrap();
    }

    #[test]
    fn a_forward_jump_of_the_wall_clock_is_a_stall() {
        let mut s = State {
            last: 1_000,
            last_wall: 50_000,
            reader: 0,
            stalls: 0,
            counted_at: 0,
        };
        assert!(!s.note(1_100, 50_100), "both clocks moved alike");
        assert!(
            s.note(1_200, 60_000),
            "a suspend: the wall clock moved on, the monotonic one did not"
        );
        assert!(!s.note(1_300, 55_000), "a wall clock set back is no stall");
        assert_eq!(s.stalls, 1);
    }
}
