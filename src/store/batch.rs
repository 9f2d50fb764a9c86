//! One round trip of independent commands, and per-bucket results.
//!
//! Owns [`Store::exec`] (one pipeline on a single Redis, concurrent single commands on a
//! cluster, NOSCRIPT recovery), [`Store::per_bucket`] (one script call per bucket) and
//! [`Partial`]. Must not build or read a particular command: the operations pass theirs in.

use futures_util::future::join_all;
use redis::{Cmd, RedisError, Value};

use super::error::StoreError;
use super::handle::Store;
use super::scripts::is_noscript;
use crate::bucket::{Bucket, BUCKETS};

/// Replies to a batch of independent commands: `None` where a command failed; `error` is
/// the first failure. With one Redis the batch is one pipeline (all or nothing, in practice);
/// in a cluster each command goes to its slot's master on its own, so some may succeed
/// while others fail (a master is failing over).
pub(crate) struct Replies {
    pub(crate) values: Vec<Option<Value>>,
    pub(crate) error: Option<RedisError>,
}

impl Replies {
    /// Keeps the replies of `results`; returns the failures, with their indexes.
    fn record(
        &mut self,
        results: Vec<(usize, Result<Value, RedisError>)>,
    ) -> Vec<(usize, RedisError)> {
        let mut failed = Vec::new();
        for (i, result) in results {
            match result {
                Ok(v) => self.values[i] = Some(v),
                Err(e) => failed.push((i, e)),
            }
        }
        failed
    }

    /// Counts failures: the first one is the batch's error.
    fn fail(&mut self, errors: impl IntoIterator<Item = RedisError>) {
        for e in errors {
            self.error.get_or_insert(e);
        }
    }

    /// Every reply, or the first error (for reads, where a partial answer is useless).
    pub(crate) fn all(self) -> Result<Vec<Value>, StoreError> {
        match self.error {
            Some(e) => Err(e.into()),
            None => Ok(self.values.into_iter().flatten().collect()),
        }
    }
}

/// What a batch of per-bucket calls achieved: the results of the buckets that succeeded,
/// and the buckets that failed with the first error. Callers act on `done` either way (a
/// transition committed in Redis must be published) and retry `failed`.
#[derive(Debug)]
pub struct Partial<T> {
    pub(crate) done: Vec<T>,
    pub(crate) failed: Vec<Bucket>,
    pub(crate) error: Option<StoreError>,
}

impl<T> Partial<T> {
    fn empty() -> Partial<T> {
        Partial {
            done: Vec::new(),
            failed: Vec::new(),
            error: None,
        }
    }

    /// All results, or the error if any bucket failed.
    pub fn into_result(self) -> Result<Vec<T>, StoreError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.done),
        }
    }

    /// The results of one reply per bucket of `buckets` (in order), each read by `parse`:
    /// a bucket without a reply, or whose reply `parse` refuses, has failed.
    pub(crate) fn of_replies(
        buckets: impl IntoIterator<Item = Bucket>,
        replies: Replies,
        parse: impl Fn(Bucket, Value) -> Result<Vec<T>, StoreError>,
    ) -> Partial<T> {
        let mut out = Partial {
            error: replies.error.map(StoreError::from),
            ..Partial::empty()
        };
        for (b, reply) in buckets.into_iter().zip(replies.values) {
            match reply.map(|r| parse(b, r)) {
                Some(Ok(results)) => out.done.extend(results),
                Some(Err(e)) => {
                    out.failed.push(b);
                    out.error.get_or_insert(e);
                }
                None => out.failed.push(b),
            }
        }
        out
    }
}

/// Every bucket, in order.
pub(crate) fn all_buckets() -> Vec<Bucket> {
    (0..BUCKETS).collect()
}

/// `items` grouped by bucket, in bucket order; buckets without items are left out.
fn by_bucket<T>(items: &[T], bucket: impl Fn(&T) -> Bucket) -> Vec<(Bucket, Vec<&T>)> {
    let mut groups: Vec<Vec<&T>> = (0..BUCKETS).map(|_| Vec::new()).collect();
    for item in items {
        groups[usize::from(bucket(item))].push(item);
    }
    (0..BUCKETS)
        .zip(groups)
        .filter(|(_, group)| !group.is_empty())
        .collect()
}

impl Store {
    /// Groups `items` by bucket, makes one script call per bucket that has any, runs them
    /// all in one round trip, and parses each reply with its bucket.
    pub(crate) async fn per_bucket<T, R>(
        &self,
        items: &[T],
        bucket: impl Fn(&T) -> Bucket,
        call: impl Fn(Bucket, &[&T]) -> Cmd,
        parse: impl Fn(Bucket, Value) -> Result<Vec<R>, StoreError>,
    ) -> Partial<R> {
        let groups = by_bucket(items, bucket);
        if groups.is_empty() {
            return Partial::empty();
        }
        let cmds = groups.iter().map(|(b, group)| call(*b, group)).collect();
        let replies = self.exec(cmds).await;
        Partial::of_replies(groups.into_iter().map(|(b, _)| b), replies, parse)
    }

    /// One call for each of `buckets` (at most one per bucket), in one round trip.
    pub(crate) async fn each_bucket<R>(
        &self,
        buckets: &[Bucket],
        call: impl Fn(Bucket) -> Cmd,
        parse: impl Fn(Bucket, Value) -> Result<Vec<R>, StoreError>,
    ) -> Partial<R> {
        self.per_bucket(buckets, |b| *b, |b, _| call(b), parse)
            .await
    }

    /// Runs independent commands (script calls and reads, each on one slot) in one round
    /// trip: one pipeline on a single Redis, concurrent single commands on a cluster. After a
    /// restart or failover Redis has forgotten the scripts (NOSCRIPT): load them and run
    /// what failed once more (a call that failed with NOSCRIPT did nothing).
    pub(crate) async fn exec(&self, cmds: Vec<Cmd>) -> Replies {
        if self.conn.is_cluster() {
            self.exec_each(&cmds).await
        } else {
            self.exec_pipelined(cmds).await
        }
    }

    /// [`Store::exec`] on one Redis: one pipeline, all or nothing.
    async fn exec_pipelined(&self, cmds: Vec<Cmd>) -> Replies {
        let n = cmds.len();
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        let mut result = pipe.query_async::<Vec<Value>>(&mut self.conn.clone()).await;
        if matches!(&result, Err(e) if is_noscript(e)) {
            result = match self.scripts.load(&self.conn).await {
                Ok(()) => pipe.query_async(&mut self.conn.clone()).await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(values) => Replies {
                values: values.into_iter().map(Some).collect(),
                error: None,
            },
            Err(e) => Replies {
                values: vec![None; n],
                error: Some(e),
            },
        }
    }

    /// [`Store::exec`] on a cluster: every command on its own, concurrently; those that
    /// found no script run again once the scripts are loaded.
    async fn exec_each(&self, cmds: &[Cmd]) -> Replies {
        let mut replies = Replies {
            values: vec![None; cmds.len()],
            error: None,
        };
        let (noscript, failed): (Vec<_>, Vec<_>) = replies
            .record(self.run_each(cmds, 0..cmds.len()).await)
            .into_iter()
            .partition(|(_, e)| is_noscript(e));
        replies.fail(failed.into_iter().map(|(_, e)| e));
        if noscript.is_empty() {
            return replies;
        }
        match self.scripts.load(&self.conn).await {
            Ok(()) => {
                let again = self.run_each(cmds, noscript.into_iter().map(|(i, _)| i));
                let failed = replies.record(again.await);
                replies.fail(failed.into_iter().map(|(_, e)| e));
            }
            Err(e) => replies.fail([e]),
        }
        replies
    }

    /// Runs the commands of `cmds` at `indexes` concurrently; each result with its index.
    async fn run_each(
        &self,
        cmds: &[Cmd],
        indexes: impl IntoIterator<Item = usize>,
    ) -> Vec<(usize, Result<Value, RedisError>)> {
        join_all(indexes.into_iter().map(|i| {
            let mut conn = self.conn.clone();
            let cmd = &cmds[i];
            async move { (i, cmd.query_async::<Value>(&mut conn).await) }
        }))
        .await
    }
}
