//! Importing retained statuses into buckets that lost their data (src/lua/import.lua), and
//! finding those buckets.
//!
//! Owns [`ImportChunk`], [`Imported`] and the arguments and replies of import.lua. Must not
//! read the broker: `rebuild.rs` does and hands the statuses in.

use std::time::Duration;

use redis::{Cmd, Value};

use super::batch::Partial;
use super::error::StoreError;
use super::handle::Store;
use super::keys::{Key, IMPORT_KEYS};
use super::reply::decode;
use crate::bucket::{Bucket, BUCKETS};
use crate::config::TtlRules;
use crate::device::{DeviceRecord, GroupName};

/// One script call of an import: a chunk of one bucket's statuses.
#[derive(Debug)]
pub(crate) struct ImportChunk<'a> {
    pub bucket: Bucket,
    pub first: bool,
    pub last: bool,
    pub records: &'a [DeviceRecord],
}

/// What an import call did to its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Imported {
    /// Wrote this many devices (the others had a record with the same or a higher seq).
    Written(Bucket, u64),
    /// The bucket is present (another replica finished, or it never was lost).
    Present(Bucket),
    /// The bucket lost its data again since the first chunk: import it from the start.
    Again(Bucket),
}

impl Imported {
    /// Reads import.lua's reply for bucket `b`.
    fn parse(b: Bucket, reply: Value) -> Result<Imported, StoreError> {
        match reply {
            Value::Int(n) => Ok(Imported::Written(b, n.max(0) as u64)),
            Value::SimpleString(s) if s == "DONE" => Ok(Imported::Present(b)),
            Value::SimpleString(s) if s == "AGAIN" => Ok(Imported::Again(b)),
            other => Err(StoreError::Protocol(format!(
                "unexpected reply from the import script: {other:?}"
            ))),
        }
    }
}

/// A flag as import.lua takes it.
fn flag(set: bool) -> String {
    if set { "1" } else { "0" }.to_owned()
}

impl Store {
    /// Marks every bucket without its epoch key as present and empty: what a rebuild that
    /// found no retained status does (for tools and tests that start from a known-empty Redis).
    pub async fn start_empty(&self) -> Result<(), StoreError> {
        let token = format!("{:016x}", fastrand::u64(..));
        let chunks: Vec<ImportChunk<'_>> = (0..BUCKETS)
            .map(|bucket| ImportChunk {
                bucket,
                first: true,
                last: true,
                records: &[],
            })
            .collect();
        self.import(
            &chunks,
            &token,
            Duration::from_secs(1),
            &TtlRules::default(),
        )
        .await
        .into_result()
        .map(|_| ())
    }

    /// The buckets whose epoch key is missing: Redis lost their data, or never had it.
    pub(crate) async fn lost_buckets(&self) -> Result<Vec<Bucket>, StoreError> {
        let cmds = (0..BUCKETS)
            .map(|b| {
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(self.keys.of(b, Key::Epoch));
                cmd
            })
            .collect();
        let present: Vec<i64> = decode(self.exec(cmds).await.all()?)?;
        Ok((0..BUCKETS)
            .zip(present)
            .filter(|(_, n)| *n == 0)
            .map(|(b, _)| b)
            .collect())
    }

    /// Imports chunks of statuses (at most one per bucket) in one round trip; an online
    /// device gets its TTL from now: its class's (`rules`, with its group), else `ttl` (see
    /// src/lua/import.lua). `token` names this import.
    pub(crate) async fn import(
        &self,
        chunks: &[ImportChunk<'_>],
        token: &str,
        ttl: Duration,
        rules: &TtlRules,
    ) -> Partial<Imported> {
        self.per_bucket(
            chunks,
            |c| c.bucket,
            |b, group| self.import_cmd(b, group.first().copied(), token, ttl, rules),
            |b, reply| Ok(vec![Imported::parse(b, reply)?]),
        )
        .await
    }

    /// The call of import.lua for bucket `b`: its settings, then nine fields per device.
    fn import_cmd(
        &self,
        b: Bucket,
        chunk: Option<&ImportChunk<'_>>,
        token: &str,
        ttl: Duration,
        rules: &TtlRules,
    ) -> Cmd {
        let mut args = vec![
            self.keys.ttl_prefix(b),
            token.to_owned(),
            flag(chunk.is_some_and(|c| c.first)),
            flag(chunk.is_some_and(|c| c.last)),
            self.flap.arg(),
        ];
        for r in chunk.map_or(&[][..], |c| c.records) {
            args.extend([
                r.device.to_string(),
                r.state.flag().to_owned(),
                r.seq.to_string(),
                r.since.to_string(),
                r.last_seen.to_string(),
                r.detected_at.to_string(),
                r.group.as_ref().map_or_else(String::new, |g| g.to_string()),
                (rules
                    .ttl_for(r.device.as_str(), r.group.as_ref().map(GroupName::as_str))
                    .unwrap_or(ttl)
                    .as_millis() as u64)
                    .to_string(),
                r.status().flags().to_owned(),
            ]);
        }
        self.scripts
            .import
            .cmd(&self.keys.script(b, &IMPORT_KEYS), args)
    }
}
