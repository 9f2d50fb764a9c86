//! Where an entry sits in a bucket's stream ([`StreamId`]) and where a reader is in the
//! whole log ([`Position`]): one stream id per bucket, written as the event `id`.
//!
//! The text form is `<base>` then, per bucket, `.<base − ms>` in base 36 with `_<seq>` when
//! the seq is not 0, `base` the highest ms: about 300 characters of `[0-9a-z._]`, safe in a
//! header and in a query without escaping. Must not do I/O.

use std::cmp::Ordering;
use std::fmt;

use crate::bucket::{Bucket, BUCKETS};

/// A Redis stream entry id, `<ms>-<seq>`; `0-0` is before every entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct StreamId {
    pub(crate) ms: u64,
    pub(crate) seq: u64,
}

impl Ord for StreamId {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.seq).cmp(&(other.ms, other.seq))
    }
}

impl PartialOrd for StreamId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl StreamId {
    /// Before every entry.
    pub(crate) const START: StreamId = StreamId { ms: 0, seq: 0 };

    /// `<ms>-<seq>` as Redis writes it.
    pub(crate) fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The event `id` of the place at `ms` in every bucket: a resume from it gets what was
/// written after that time (after a `gap`, since no entry sits exactly there). The status
/// page builds the same text for a device's recent events.
pub fn id_at(ms: u64) -> String {
    let mut p = Position::default();
    for b in 0..BUCKETS {
        p.set(b, StreamId { ms, seq: 0 });
    }
    p.to_string()
}

/// A reader's place in the log: the last entry it has of every bucket's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    at: Vec<StreamId>,
}

impl Default for Position {
    fn default() -> Self {
        Position {
            at: vec![StreamId::START; usize::from(BUCKETS)],
        }
    }
}

impl Position {
    pub(crate) fn get(&self, b: Bucket) -> StreamId {
        self.at[usize::from(b)]
    }

    pub(crate) fn set(&mut self, b: Bucket, id: StreamId) {
        self.at[usize::from(b)] = id;
    }

    /// The bucket of the newest entry the reader has, and its time (ms, that bucket's
    /// master's clock).
    pub(crate) fn newest(&self) -> (Bucket, u64) {
        (0..BUCKETS)
            .map(|b| (b, self.get(b).ms))
            .max_by_key(|(_, ms)| *ms)
            .unwrap_or((0, 0))
    }

    /// Reads an event `id`; `None` for anything that is not one (the caller answers `gap`).
    pub(crate) fn parse(s: &str) -> Option<Position> {
        let mut parts = s.split('.');
        let base = u64::from_str_radix(parts.next()?, 36).ok()?;
        let at = parts
            .map(|p| {
                let (back, seq) = match p.split_once('_') {
                    Some((back, seq)) => (back, u64::from_str_radix(seq, 36).ok()?),
                    None => (p, 0),
                };
                let back = u64::from_str_radix(back, 36).ok()?;
                Some(StreamId {
                    ms: base.checked_sub(back)?,
                    seq,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (at.len() == usize::from(BUCKETS)).then_some(Position { at })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = self.at.iter().map(|id| id.ms).max().unwrap_or(0);
        f.write_str(&radix36(base))?;
        for id in &self.at {
            write!(f, ".{}", radix36(base - id.ms))?;
            if id.seq != 0 {
                write!(f, "_{}", radix36(id.seq))?;
            }
        }
        Ok(())
    }
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_by_ms_then_seq() {
        let a = StreamId::parse("1700000000000-3").unwrap();
        let b = StreamId::parse("1700000000001-0").unwrap();
        assert!(StreamId::START < a && a < b);
        assert_eq!(a.to_string(), "1700000000000-3");
        assert_eq!(StreamId::parse("12"), None);
        assert_eq!(StreamId::parse("a-1"), None);
    }

    #[test]
    fn positions_round_trip_through_their_text() {
        let mut p = Position::default();
        assert_eq!(Position::parse(&p.to_string()), Some(p.clone()));
        p.set(
            0,
            StreamId {
                ms: 1_764_806_400_123,
                seq: 0,
            },
        );
        p.set(
            5,
            StreamId {
                ms: 1_764_806_399_000,
                seq: 17,
            },
        );
        p.set(
            63,
            StreamId {
                ms: 1_764_806_400_123,
                seq: 36,
            },
        );
        let text = p.to_string();
        assert!(text
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_'));
        assert_eq!(Position::parse(&text), Some(p.clone()));
        // Every bucket written within the last hour: about 5 characters each.
        for b in 0..BUCKETS {
            let ms = 1_764_806_400_123 - u64::from(b) * 50_000;
            p.set(b, StreamId { ms, seq: 0 });
        }
        let text = p.to_string();
        assert!(text.len() < 450, "{}", text.len());
        assert_eq!(Position::parse(&text), Some(p));
    }

    #[test]
    fn a_place_at_a_time_is_that_time_in_every_bucket() {
        let p = Position::parse(&id_at(1_764_806_400_123)).unwrap();
        assert_eq!(p.newest().1, 1_764_806_400_123);
        assert!((0..BUCKETS).all(|b| p.get(b).ms == 1_764_806_400_123));
        assert_eq!(id_at(36 * 36), format!("100{}", ".0".repeat(64)));
    }

    #[test]
    fn anything_else_is_no_position() {
        for bad in ["", "abc", "1.2.3", "z.zz", "1-2", "1.0_x"] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
        let short = Position::default().to_string();
        let (cut, _) = short.rsplit_once('.').unwrap();
        assert_eq!(Position::parse(cut), None);
        assert_eq!(Position::parse(&format!("{short}.0")), None);
        // A bucket more than `base` back is before the epoch: not a position either.
        let before_epoch = format!("1.2{}", ".0".repeat(63));
        assert_eq!(Position::parse(&before_epoch), None);
        assert!(Position::parse(&format!("1.1{}", ".0".repeat(63))).is_some());
    }
}
