//! Reading devices: one record, the fleet counts, and id-ordered pages (`/devices`).
//!
//! Owns [`ListFilter`], [`Page`], [`LIST_BUDGET`] and the reads of the state indexes and
//! records. Must not write anything.

use redis::Cmd;

use super::error::StoreError;
use super::handle::Store;
use super::keys::Key;
use super::reply::decode;
use crate::bucket::{bucket_of, Bucket, BUCKETS};
use crate::device::{DeviceId, DeviceRecord, GroupName, Millis, State};

/// Most ids one `/devices` page examines (see `Store::list`).
pub const LIST_BUDGET: usize = 10_000;
/// Fewest ids read per round of a page, so a short remainder does not cost a round trip per
/// non-matching id.
const LIST_MIN_BATCH: usize = 100;
/// How long one page may keep reading past non-matching ids before it ends early with a
/// cursor: well inside the HTTP answer's wait for Redis (2 s), so a slow Redis or a loaded
/// machine shortens pages instead of failing them.
const LIST_TIME_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

/// Which records a listing keeps.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListFilter {
    pub state: Option<State>,
    pub group: Option<GroupName>,
    pub flapping: Option<bool>,
}

impl ListFilter {
    /// Whether the filter keeps `record`, its flapping judged at `now` (its bucket master's).
    pub(crate) fn matches(&self, record: &DeviceRecord, now: Millis) -> bool {
        self.state.is_none_or(|s| record.state == s)
            && self
                .group
                .as_ref()
                .is_none_or(|g| record.group.as_ref() == Some(g))
            && self.flapping.is_none_or(|f| record.flapping_at(now) == f)
    }

    /// The id indexes (per bucket) that hold every id the filter may keep: the flapping
    /// index when only flapping devices are wanted (it is small), else the state indexes.
    fn indexes(&self) -> &'static [Key] {
        match (self.flapping, self.state) {
            (Some(true), _) => &[Key::FlapIndex],
            (_, Some(State::Online)) => &[Key::Index(State::Online)],
            (_, Some(State::Offline)) => &[Key::Index(State::Offline)],
            (_, None) => &[Key::Index(State::Online), Key::Index(State::Offline)],
        }
    }
}

/// The fleet-wide device counts (`presenced_devices`, `presenced_devices_flapping`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FleetCounts {
    pub online: i64,
    pub offline: i64,
    pub flapping: i64,
}

/// One page of a listing: its records, and the id to continue after when more may follow.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub records: Vec<DeviceRecord>,
    pub next: Option<String>,
}

/// `ZCARD key`.
pub(crate) fn zcard(key: String) -> Cmd {
    let mut cmd = redis::cmd("ZCARD");
    cmd.arg(key);
    cmd
}

/// `HGET` of one device's record.
fn record(store: &Store, id: &str) -> Cmd {
    let mut cmd = redis::cmd("HGET");
    cmd.arg(store.keys.of(bucket_of(id), Key::Records)).arg(id);
    cmd
}

impl Store {
    /// The current record of one device.
    pub(crate) async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let raw: Option<String> = record(self, id.as_str())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(raw.and_then(|r| DeviceRecord::parse(id.clone(), &r)))
    }

    /// Fleet-wide counts, summed over the buckets. A device is flapping while its flapping
    /// end (in the bucket's master time) has not passed: the gauge falls without a
    /// transition, as the penalty decays.
    pub(crate) async fn counts(&self) -> Result<FleetCounts, StoreError> {
        let cmds = (0..BUCKETS)
            .flat_map(|b| {
                let [on, off] =
                    [State::Online, State::Offline].map(|s| zcard(self.keys.index(b, s)));
                let mut flapping = redis::cmd("ZCOUNT");
                flapping
                    .arg(self.keys.of(b, Key::FlapUntil))
                    .arg(self.clock.now(b))
                    .arg("+inf");
                [on, off, flapping]
            })
            .collect();
        let cards: Vec<i64> = decode(self.exec(cmds).await.all()?)?;
        let sum = |skip| cards.iter().skip(skip).step_by(3).sum();
        Ok(FleetCounts {
            online: sum(0),
            offline: sum(1),
            flapping: sum(2),
        })
    }

    /// One page of devices in id order, after `after` (exclusive), holding at most `limit`
    /// records that match `filter`.
    ///
    /// Paging by id (not by a scan cursor) lists every device of an unchanging fleet exactly
    /// once. The state index narrows the ids read, but the filter is judged on the records:
    /// a device may change state between the index read and the record read. So the page
    /// keeps reading past ids whose records do not match until it holds `limit` records or
    /// the index ends, and its cursor is the last id *examined*, not the last one kept: a
    /// stretch of non-matching ids never ends the listing early, nor is it read again. The
    /// reading stops after [`LIST_BUDGET`] ids, or after 500 ms of reading, even if the page
    /// is short (possibly empty), so a rare match costs a client more pages, never one
    /// unbounded (or timed-out) request.
    pub(crate) async fn list(
        &self,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut page = Page::default();
        let mut after = after.map(str::to_owned);
        let mut examined = 0;
        let started = std::time::Instant::now();
        loop {
            let want = (limit - page.records.len()).max(LIST_MIN_BATCH);
            let (ids, index_more) = self.index_ids(filter, after.as_deref(), want).await?;
            let records = self.records_of(&ids).await?;
            for (i, (id, record)) in ids.iter().zip(records).enumerate() {
                examined += 1;
                after = Some(id.clone());
                page.records.extend(
                    record.filter(|r| {
                        filter.matches(r, self.clock.now(bucket_of(r.device.as_str())))
                    }),
                );
                if page.records.len() == limit {
                    let more = index_more || i + 1 < ids.len();
                    page.next = after.filter(|_| more);
                    return Ok(page);
                }
            }
            if !index_more {
                return Ok(page);
            }
            if examined >= LIST_BUDGET || started.elapsed() >= LIST_TIME_BUDGET {
                page.next = after;
                return Ok(page);
            }
        }
    }

    /// `ZRANGE … BYLEX`: at most `count` ids of bucket `b`'s `state` index after `after`.
    pub(crate) fn index_range(
        &self,
        b: Bucket,
        state: State,
        after: Option<&str>,
        count: usize,
    ) -> Cmd {
        self.lex_range(self.keys.index(b, state), after, count)
    }

    /// `ZRANGE … BYLEX` of an id index (every score 0): at most `count` ids after `after`.
    fn lex_range(&self, key: String, after: Option<&str>, count: usize) -> Cmd {
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(key)
            .arg(start)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(count);
        cmd
    }

    /// The smallest `limit` ids after `after` in the indexes `filter` may keep, and
    /// whether more follow. Each bucket's index is read from `after` on, at most `limit + 1`
    /// ids each; the smallest `limit` overall are the answer.
    async fn index_ids(
        &self,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), StoreError> {
        let cmds = (0..BUCKETS)
            .flat_map(|b| {
                filter
                    .indexes()
                    .iter()
                    .map(move |&k| self.lex_range(self.keys.of(b, k), after, limit + 1))
            })
            .collect();
        let pages: Vec<Vec<String>> = decode(self.exec(cmds).await.all()?)?;
        let mut ids: Vec<String> = pages.into_iter().flatten().collect();
        // Redis orders BYLEX by bytes (memcmp); so does String's Ord.
        ids.sort_unstable();
        ids.dedup();
        let more = ids.len() > limit;
        ids.truncate(limit);
        Ok((ids, more))
    }

    /// The records of `ids`, in order; `None` for an id without a (valid) record.
    async fn records_of(&self, ids: &[String]) -> Result<Vec<Option<DeviceRecord>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = ids.iter().map(|id| record(self, id)).collect();
        let raws: Vec<Option<String>> = decode(self.exec(cmds).await.all()?)?;
        Ok(ids
            .iter()
            .zip(raws)
            .map(|(id, raw)| DeviceRecord::parse(DeviceId::parse(id).ok()?, &raw?))
            .collect())
    }
}
