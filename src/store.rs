//! Everything the monitor keeps in Redis, and the only module besides `expiry` that
//! speaks Redis.
//!
//! Key layout (prefix `P`, bucket `b` = FNV-1a of the device id mod [`BUCKETS`]; `{b}` is a
//! hash tag, so every key of a bucket lives in one Redis Cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{b}:ttl:<id>` | string, with TTL | the heartbeat TTL key; its `expired` event is the fast path |
//! | `P:{b}:rec` | hash id → record | `state\|seq\|since\|last_seen\|detected_at`: what is needed at expiry lives here, not in the TTL key |
//! | `P:{b}:deadline` | zset id → deadline ms | online devices, queryable by time (reconciliation, the deadline sweep) |
//! | `P:{b}:online`, `P:{b}:offline` | zset (lex) | the state index: counts (ZCARD) and paging (ZRANGE BYLEX) |
//! | `P:{b}:outbox` | zset member → lease ms | committed transitions not yet acknowledged by the broker |
//! | `P:{b}:offsince` | zset id → since ms | offline devices by the `since` of their offline status (forgetting) |
//! | `P:{b}:epoch` | string | present exactly when the bucket's state is in Redis (imported or started empty); gone with a loss |
//! | `P:{b}:importing` | set | tokens of the rebuilds importing into the bucket |
//!
//! Every transition is decided by one Lua script on one bucket (src/lua/*.lua), so exactly one
//! caller, whichever replica it is, commits it, with the next `seq`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, RedisFuture, ServerErrorKind, Value};

use tokio::sync::{watch, Notify};

use crate::clock::Clock;
use crate::device::{DeviceId, DeviceRecord, Millis, State, StatusEvent};

/// Number of buckets the fleet is split into. Part of the key layout: changing it needs a
/// migration. 64 keeps every bucket (and cluster slot) below ~2% of the fleet.
pub const BUCKETS: u16 = 64;

/// Most ids one `/devices` page examines (see [`Store::list`]).
pub const LIST_BUDGET: usize = 10_000;
/// Fewest ids read per round of a page, so a short remainder does not cost a round trip per
/// non-matching id.
const LIST_MIN_BATCH: usize = 100;
/// How long one page may keep reading past non-matching ids before it ends early with a
/// cursor: well inside the HTTP answer's wait for Redis (2 s), so a slow Redis or a loaded
/// machine shortens pages instead of failing them.
const LIST_TIME_BUDGET: Duration = Duration::from_millis(500);

/// Which records a listing keeps.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub state: Option<State>,
}

impl ListFilter {
    pub fn matches(&self, record: &DeviceRecord) -> bool {
        self.state.is_none_or(|s| record.state == s)
    }
}

/// One page of a listing: its records, and the id to continue after when more may follow.
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<DeviceRecord>,
    pub next: Option<String>,
}

/// How long a committed transition may wait for the broker's acknowledgement before any
/// replica may claim and publish it again.
pub const OUTBOX_LEASE: Duration = Duration::from_secs(10);

const COMMON_LUA: &str = include_str!("lua/common.lua");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// The bucket's epoch key is gone: Redis lost its data; it waits for the rebuild.
    #[error("redis lost the data of bucket {0}; waiting for the rebuild")]
    Lost(Bucket),
}

/// A bucket, i.e. a Redis Cluster slot's worth of devices.
pub type Bucket = u16;

/// The bucket of a device id (FNV-1a, stable across versions and processes).
pub fn bucket_of(id: &str) -> Bucket {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(BUCKETS)) as Bucket
}

/// Key names; the one place the layout is spelled.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, b: Bucket, name: &str) -> String {
        format!("{}:{{{b}}}:{name}", self.prefix)
    }

    pub fn ttl_prefix(&self, b: Bucket) -> String {
        self.key(b, "ttl:")
    }

    pub fn ttl(&self, id: &DeviceId) -> String {
        format!("{}{}", self.ttl_prefix(bucket_of(id.as_str())), id)
    }

    pub fn records(&self, b: Bucket) -> String {
        self.key(b, "rec")
    }

    pub fn deadlines(&self, b: Bucket) -> String {
        self.key(b, "deadline")
    }

    pub fn index(&self, b: Bucket, state: State) -> String {
        self.key(b, state.as_str())
    }

    pub fn outbox(&self, b: Bucket) -> String {
        self.key(b, "outbox")
    }

    /// Offline devices by the `since` of their offline status (see src/lua/forget.lua).
    pub fn offline_since(&self, b: Bucket) -> String {
        self.key(b, "offsince")
    }

    /// Present exactly when the bucket's state is in Redis (see src/lua/import.lua).
    pub fn epoch(&self, b: Bucket) -> String {
        self.key(b, "epoch")
    }

    /// The tokens of the imports under way into a bucket.
    pub fn importers(&self, b: Bucket) -> String {
        self.key(b, "importing")
    }

    /// The republish job of a bucket (see src/lua/republish.lua).
    pub fn republish_job(&self, b: Bucket) -> String {
        self.key(b, "republish")
    }

    /// Replica floors (see src/lua/clock.lua).
    pub fn floors(&self, b: Bucket) -> String {
        self.key(b, "floor")
    }

    /// A key for the notification probe (under the prefix, outside every bucket). In a
    /// cluster, `tag` (see [`crate::cluster::tag_in`]) puts it on the master being probed.
    pub fn probe(&self, tag: Option<&str>) -> String {
        match tag {
            Some(tag) => format!("{}:probe:{{{tag}}}:{:016x}", self.prefix, fastrand::u64(..)),
            None => format!("{}:probe:{:016x}", self.prefix, fastrand::u64(..)),
        }
    }

    /// The device of a TTL key named in an `expired` event, if the key is one of ours.
    pub fn parse_ttl_key(&self, key: &[u8]) -> Option<DeviceId> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (bucket, rest) = rest.split_once('}')?;
        let id = rest.strip_prefix(":ttl:")?;
        let id = DeviceId::parse(id).ok()?;
        (bucket.parse::<Bucket>().ok()? == bucket_of(id.as_str())).then_some(id)
    }

    fn bucket_keys(&self, b: Bucket) -> [String; 5] {
        [
            self.records(b),
            self.deadlines(b),
            self.index(b, State::Online),
            self.index(b, State::Offline),
            self.outbox(b),
        ]
    }

    /// The keys of heartbeat.lua, expire.lua and forget.lua.
    fn expire_keys(&self, b: Bucket) -> [String; 7] {
        let [a, b2, c, d, e] = self.bucket_keys(b);
        [a, b2, c, d, e, self.floors(b), self.offline_since(b)]
    }

    fn heartbeat_keys(&self, b: Bucket) -> [String; 8] {
        let [a, b2, c, d, e, f, g] = self.expire_keys(b);
        [a, b2, c, d, e, f, g, self.epoch(b)]
    }

    fn import_keys(&self, b: Bucket) -> [String; 7] {
        [
            self.records(b),
            self.deadlines(b),
            self.index(b, State::Online),
            self.index(b, State::Offline),
            self.epoch(b),
            self.importers(b),
            self.offline_since(b),
        ]
    }
}

/// A Lua script with its SHA1, invoked with EVALSHA inside pipelines.
struct LuaScript {
    source: String,
    sha: String,
}

impl LuaScript {
    fn new(body: &str) -> LuaScript {
        let source = format!("{COMMON_LUA}\n{body}");
        let sha = redis::Script::new(&source).get_hash().to_owned();
        LuaScript { source, sha }
    }

    fn cmd(&self, keys: &[String], args: Vec<String>) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len()).arg(keys).arg(args);
        cmd
    }
}

/// A transition committed in Redis (by this caller), waiting to be published.
#[derive(Clone, Debug)]
pub struct Committed {
    pub bucket: Bucket,
    /// The outbox member: removing it records the broker's acknowledgement.
    pub member: String,
    pub event: StatusEvent,
}

/// The broker acknowledged a status.
#[derive(Clone, Debug)]
pub struct Ack {
    pub bucket: Bucket,
    pub member: String,
    pub device: DeviceId,
    pub seq: u64,
}

/// What a sweep of one bucket found.
#[derive(Debug)]
pub struct Swept {
    pub bucket: Bucket,
    pub next_deadline: Option<Millis>,
    /// The sweep hit its limit: more devices may be overdue.
    pub more: bool,
    /// The cutoff Redis used (lowered by other replicas' floors).
    pub cutoff: Millis,
    pub committed: Vec<Committed>,
}

/// What a forget call on one bucket did.
#[derive(Debug)]
pub struct Forgot {
    pub bucket: Bucket,
    /// The call hit its limit: more devices may be due.
    pub more: bool,
    /// One clear (seq 0, see [`StatusEvent::is_clear`]) per device forgotten.
    pub cleared: Vec<Committed>,
}

/// What is known of when a heartbeat reached the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// Its arrival at the monitor (a live message), or the moment the broker came back
    /// (queued while the broker was down): a late arrival ends an offline period.
    Known,
    /// Queued for the monitor while it was away (stopped, cut off, stalled) from a broker
    /// that kept running: it reached the broker in time, whatever its arrival says.
    OnTime,
}

/// The held heartbeats of one device, to apply (local wall-clock times).
#[derive(Clone, Debug)]
pub struct Beat {
    pub device: DeviceId,
    /// The earliest held heartbeat's arrival.
    pub first: Millis,
    /// The latest heartbeat's arrival and the deadline it set (the latest heartbeat wins).
    pub arrival: Millis,
    pub deadline: Millis,
    /// A silence inside the held heartbeats: the deadline that passed, and the arrival
    /// that ended it.
    pub lapse: Option<(Millis, Millis)>,
    pub timing: Timing,
}

impl Beat {
    /// One live heartbeat.
    pub fn live(device: DeviceId, arrival: Millis, ttl_ms: u64) -> Beat {
        Beat {
            device,
            first: arrival,
            arrival,
            deadline: arrival + ttl_ms,
            lapse: None,
            timing: Timing::Known,
        }
    }
}

/// The latest deadline an expiry may be decided for (a local time; Redis takes the lowest
/// of it, its own clock and the live replicas' floors).
#[derive(Clone, Copy, Debug)]
pub struct Cutoff {
    pub before: Millis,
    /// How long a replica's floor stands without being renewed.
    pub floor_lease_ms: u64,
}

/// What [`Store::sync_clock`] records of this replica.
#[derive(Clone, Copy, Debug)]
pub enum Floor<'a> {
    /// Nothing: this replica sees every heartbeat itself (no shared subscription).
    None,
    /// This replica (by name) has applied every heartbeat received before this local time.
    At(&'a str, Millis),
    /// This replica stops: its floor is removed.
    Leave(&'a str),
}

/// Tells the rebuilder that a script found a bucket's data gone, and the applier that the
/// rebuild is done (the generation counts finished rebuilds).
#[derive(Debug)]
pub struct Loss {
    lost: Notify,
    rebuilt: watch::Sender<u64>,
}

impl Default for Loss {
    fn default() -> Self {
        Loss {
            lost: Notify::new(),
            rebuilt: watch::Sender::new(0),
        }
    }
}

impl Loss {
    /// A script found a bucket without its epoch key.
    pub fn report(&self) {
        self.lost.notify_one();
    }

    /// Completes when a loss was reported (also one reported before the call).
    pub async fn reported(&self) {
        self.lost.notified().await;
    }

    /// A rebuild finished: what was held for the lost buckets can be applied now.
    pub fn rebuilt(&self) {
        self.rebuilt.send_modify(|g| *g += 1);
    }

    /// Finished rebuilds, to wait on with `changed()`.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.rebuilt.subscribe()
    }
}

/// One script call of an import: a chunk of one bucket's statuses.
#[derive(Debug)]
pub struct ImportChunk<'a> {
    pub bucket: Bucket,
    pub first: bool,
    pub last: bool,
    pub records: &'a [DeviceRecord],
}

/// What an import call did to its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// Wrote this many devices (the others had a record with the same or a higher seq).
    Written(Bucket, u64),
    /// The bucket is present (another replica finished, or it never was lost).
    Present(Bucket),
    /// The bucket lost its data again since the first chunk: import it from the start.
    Again(Bucket),
}

/// What `notify-keyspace-events` looked like and what was done about it.
#[derive(Debug, PartialEq, Eq)]
pub enum NotifyConfig {
    /// Already had `E` and `x`.
    AlreadyOn,
    /// We merged `E` and `x` into the flags; `from` is what was set before.
    Enabled { from: String },
    /// Not enabled (configuring is off, or CONFIG was refused): must be probed.
    Unknown { reason: String },
}

/// The command connection: one Redis, or a Redis Cluster (routed by each command's key).
#[derive(Clone)]
enum Conn {
    Single(Arc<Single>),
    Cluster(Arc<Cluster>),
}

/// The connection to one Redis, replaced when it stops answering.
///
/// `ConnectionManager` reconnects when the connection is closed or reset, but not when it
/// times out: a black-holed connection (packets dropped, e.g. a network partition that
/// heals without a reset) would stay wedged until the kernel gives up, many minutes later.
/// So, as for a cluster: when no command has succeeded for [`CLUSTER_STUCK`] while commands
/// keep failing at the connection level, a fresh connection manager replaces it.
struct Single {
    client: redis::Client,
    conn: Mutex<ConnectionManager>,
    last_ok: AtomicU64,
    last_rebuild: AtomicU64,
}

impl Single {
    fn config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_max_delay(Duration::from_secs(2))
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn outcome<T>(&self, result: &Result<T, RedisError>) {
        if stuck(result, &self.last_ok, &self.last_rebuild) {
            tracing::warn!(
                "No Redis command succeeded for {CLUSTER_STUCK:?}; replacing the connection."
            );
            match self.client.get_connection_manager_lazy(Self::config()) {
                Ok(fresh) => *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = fresh,
                Err(e) => tracing::warn!(error = %e, "Cannot make a new Redis connection."),
            }
        }
    }
}

/// Records a command's outcome; `true` when the connection should be replaced: nothing has
/// succeeded for [`CLUSTER_STUCK`] (nor was it replaced in that time) and this failed at the
/// connection level. A server's answer (even an error reply) proves the connection works.
fn stuck<T>(result: &Result<T, RedisError>, last_ok: &AtomicU64, last_rebuild: &AtomicU64) -> bool {
    let now = crate::device::now_ms();
    match result {
        Ok(_) => last_ok.store(now, Ordering::Relaxed),
        Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => last_ok.store(now, Ordering::Relaxed),
        Err(_) => {
            let last = last_ok
                .load(Ordering::Relaxed)
                .max(last_rebuild.load(Ordering::Relaxed));
            if now.saturating_sub(last) >= CLUSTER_STUCK.as_millis() as u64 {
                last_rebuild.store(now, Ordering::Relaxed);
                return true;
            }
        }
    }
    false
}

/// A cluster connection that is replaced when it stops working.
///
/// redis-rs's cluster client repairs itself on MOVED and on broken connections, but we saw
/// it wedge during a failover (a slot refresh that never completed; every later command
/// timed out). So: when no command has succeeded for [`CLUSTER_STUCK`] while commands keep
/// failing with connection-level errors, the connection is rebuilt from the seeds. A
/// server's answer (even an error reply) proves the connection works and never triggers it.
struct Cluster {
    client: redis::cluster::ClusterClient,
    conn: Mutex<ClusterConnection>,
    last_ok: AtomicU64,
    last_rebuild: AtomicU64,
}

/// How long a cluster connection may fail every command before it is rebuilt.
const CLUSTER_STUCK: Duration = Duration::from_secs(3);

impl Cluster {
    fn config() -> redis::cluster::ClusterConfig {
        redis::cluster::ClusterConfig::new()
            .set_connection_timeout(Duration::from_secs(3))
            .set_response_timeout(Duration::from_secs(3))
    }

    fn conn(&self) -> ClusterConnection {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn outcome<T>(&self, result: &Result<T, RedisError>) {
        if stuck(result, &self.last_ok, &self.last_rebuild) {
            tracing::warn!(
                "No Redis Cluster command succeeded for {CLUSTER_STUCK:?}; reconnecting from the seed nodes."
            );
            let fresh = self
                .client
                .get_pending_async_connection_with_config(Self::config());
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(single) => Box::pin(async move {
                let result = single.conn().req_packed_command(cmd).await;
                single.outcome(&result);
                result
            }),
            Conn::Cluster(cluster) => Box::pin(async move {
                let result = cluster.conn().req_packed_command(cmd).await;
                cluster.outcome(&result);
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(single) => Box::pin(async move {
                let result = single.conn().req_packed_commands(cmd, offset, count).await;
                single.outcome(&result);
                result
            }),
            Conn::Cluster(cluster) => Box::pin(async move {
                let result = cluster.conn().req_packed_commands(cmd, offset, count).await;
                cluster.outcome(&result);
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(single) => single.conn().get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// Replies to a batch of independent commands: `None` where a command failed; `error` is
/// the first failure. With one Redis the batch is one pipeline (all or nothing, in practice);
/// in a cluster each command goes to its slot's master on its own, so some may succeed
/// while others fail (a master is failing over).
struct Replies {
    values: Vec<Option<Value>>,
    error: Option<RedisError>,
}

impl Replies {
    /// Every reply, or the first error (for reads, where a partial answer is useless).
    fn all(self) -> Result<Vec<Value>, StoreError> {
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
    pub done: Vec<T>,
    pub failed: Vec<Bucket>,
    pub error: Option<StoreError>,
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
}

/// Handle to the Redis state. Cheap to clone: the connection is multiplexed and reconnects
/// by itself (a command that hit a broken connection still fails; callers retry).
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    keys: Keys,
    scripts: std::sync::Arc<Scripts>,
    clock: Arc<Clock>,
    loss: Arc<Loss>,
    /// Our name in the replica floors ('' without a shared subscription).
    replica: Arc<str>,
}

struct Scripts {
    heartbeat: LuaScript,
    expire: LuaScript,
    ack: LuaScript,
    claim: LuaScript,
    clock: LuaScript,
    forget: LuaScript,
    offsince: LuaScript,
    import: LuaScript,
    republish: LuaScript,
}

impl Scripts {
    fn new() -> std::sync::Arc<Scripts> {
        std::sync::Arc::new(Scripts {
            heartbeat: LuaScript::new(include_str!("lua/heartbeat.lua")),
            expire: LuaScript::new(include_str!("lua/expire.lua")),
            ack: LuaScript::new(include_str!("lua/ack.lua")),
            claim: LuaScript::new(include_str!("lua/claim.lua")),
            clock: LuaScript::new(include_str!("lua/clock.lua")),
            forget: LuaScript::new(include_str!("lua/forget.lua")),
            offsince: LuaScript::new(include_str!("lua/offsince.lua")),
            import: LuaScript::new(include_str!("lua/import.lua")),
            republish: LuaScript::new(include_str!("lua/republish.lua")),
        })
    }

    fn all(&self) -> [&LuaScript; 9] {
        [
            &self.heartbeat,
            &self.expire,
            &self.ack,
            &self.claim,
            &self.clock,
            &self.forget,
            &self.offsince,
            &self.import,
            &self.republish,
        ]
    }
}

impl Store {
    /// Connects (once; errors are returned, not retried) and loads the scripts.
    pub async fn connect(client: &redis::Client, prefix: &str) -> Result<Store, StoreError> {
        let store = Self::lazy(client, prefix)?;
        store.ping().await?;
        store.load_scripts().await?;
        Ok(store)
    }

    /// A store whose connection is made on first use and remade after failures; nothing is
    /// sent now, so it works while Redis is down. Scripts are loaded on first need (NOSCRIPT).
    pub fn lazy(client: &redis::Client, prefix: &str) -> Result<Store, StoreError> {
        let conn = client.get_connection_manager_lazy(Single::config())?;
        Ok(Store {
            conn: Conn::Single(Arc::new(Single {
                client: client.clone(),
                conn: Mutex::new(conn),
                last_ok: AtomicU64::new(crate::device::now_ms()),
                last_rebuild: AtomicU64::new(0),
            })),
            keys: Keys::new(prefix),
            scripts: Scripts::new(),
            clock: Arc::default(),
            loss: Arc::default(),
            replica: Arc::from(""),
        })
    }

    /// A store on a Redis Cluster, from seed node URLs; like [`Store::lazy`], it connects in
    /// the background. The client follows MOVED/ASK redirections and refreshes the slot map
    /// itself; a command to a master that is failing over fails after a few quick retries
    /// (bounded, so that callers keep control and retry on their own schedule).
    pub fn lazy_cluster(seeds: &[String], prefix: &str) -> Result<Store, StoreError> {
        let client = redis::cluster::ClusterClient::builder(seeds.iter().map(String::as_str))
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .connection_timeout(Duration::from_secs(3))
            .response_timeout(Duration::from_secs(3))
            .build()?;
        let conn = client.get_pending_async_connection_with_config(Cluster::config());
        Ok(Store {
            conn: Conn::Cluster(Arc::new(Cluster {
                client,
                conn: Mutex::new(conn),
                last_ok: AtomicU64::new(crate::device::now_ms()),
                last_rebuild: AtomicU64::new(0),
            })),
            keys: Keys::new(prefix),
            scripts: Scripts::new(),
            clock: Arc::default(),
            loss: Arc::default(),
            replica: Arc::from(""),
        })
    }

    /// Connects to a cluster once and loads the scripts on every master.
    pub async fn connect_cluster(seeds: &[String], prefix: &str) -> Result<Store, StoreError> {
        let store = Self::lazy_cluster(seeds, prefix)?;
        store.ping().await?;
        store.load_scripts().await?;
        Ok(store)
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Lost buckets found by the scripts, and finished rebuilds.
    pub fn loss(&self) -> &Arc<Loss> {
        &self.loss
    }

    /// The same store, naming this replica in the floors it writes and skips.
    pub fn for_replica(mut self, name: &str) -> Store {
        self.replica = Arc::from(name);
        self
    }

    /// The offsets to every bucket's master clock (see [`Clock`]).
    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Reads every bucket's master clock (one round trip) and, with `floor`, records this
    /// replica's floor (a local time: every heartbeat it received before it is applied) in
    /// every bucket, or removes it (`Floor::Leave`). Returns the buckets that failed.
    pub async fn sync_clock(&self, floor: Floor<'_>) -> Partial<()> {
        let buckets: Vec<Bucket> = (0..BUCKETS).collect();
        let sent = crate::device::now_ms();
        let replies = self
            .exec(
                buckets
                    .iter()
                    .map(|&b| {
                        let args = match floor {
                            Floor::None => vec![String::new(), String::new()],
                            Floor::At(who, at) => {
                                vec![who.to_owned(), self.clock.to_master(b, at).to_string()]
                            }
                            Floor::Leave(who) => vec![who.to_owned(), "-".to_owned()],
                        };
                        self.scripts.clock.cmd(&[self.keys.floors(b)], args)
                    })
                    .collect(),
            )
            .await;
        let received = crate::device::now_ms();
        let mut out = Partial {
            error: replies.error.map(StoreError::from),
            ..Partial::empty()
        };
        for (b, reply) in buckets.into_iter().zip(replies.values) {
            match reply
                .as_ref()
                .and_then(bulk_string)
                .and_then(|t| t.parse().ok())
            {
                Some(master) => {
                    self.clock.observe(b, sent, received, master);
                    out.done.push(());
                }
                None => out.failed.push(b),
            }
        }
        if out.error.is_none() && !out.failed.is_empty() {
            out.error = Some(StoreError::Protocol("TIME reply not a number".to_owned()));
        }
        out
    }

    /// Loads every script; in a cluster SCRIPT LOAD goes to every master (a promoted replica
    /// starts with an empty script cache: NOSCRIPT brings us back here).
    async fn load_scripts(&self) -> Result<(), StoreError> {
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                for s in self.scripts.all() {
                    pipe.cmd("SCRIPT").arg("LOAD").arg(&s.source).ignore();
                }
                pipe.query_async::<()>(&mut self.conn.clone()).await?;
            }
            Conn::Cluster(_) => {
                // One command each: a pipeline is routed to a single node.
                for s in self.scripts.all() {
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(&s.source)
                        .query_async::<Value>(&mut self.conn.clone())
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Runs independent commands (script calls and reads, each on one slot) in one round
    /// trip: one pipeline on a single Redis, concurrent single commands on a cluster. After a
    /// restart or failover Redis has forgotten the scripts (NOSCRIPT): load them and run
    /// what failed once more (a call that failed with NOSCRIPT did nothing).
    async fn exec(&self, cmds: Vec<Cmd>) -> Replies {
        match &self.conn {
            Conn::Single(_) => {
                let n = cmds.len();
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                let mut result = pipe.query_async::<Vec<Value>>(&mut self.conn.clone()).await;
                if matches!(&result, Err(e) if is_noscript(e)) {
                    result = match self.load_scripts().await {
                        Ok(()) => pipe.query_async(&mut self.conn.clone()).await,
                        Err(StoreError::Redis(e)) => Err(e),
                        Err(e) => Err(RedisError::from((
                            ErrorKind::Io,
                            "loading scripts",
                            e.to_string(),
                        ))),
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
            Conn::Cluster(_) => {
                let run = |idx: Vec<usize>| {
                    futures_util::future::join_all(idx.into_iter().map(|i| {
                        let mut conn = self.conn.clone();
                        let cmd = &cmds[i];
                        async move { (i, cmd.query_async::<Value>(&mut conn).await) }
                    }))
                };
                let mut values = vec![None; cmds.len()];
                let mut failed = Vec::new();
                let mut noscript = Vec::new();
                for (i, r) in run((0..cmds.len()).collect()).await {
                    match r {
                        Ok(v) => values[i] = Some(v),
                        Err(e) if is_noscript(&e) => noscript.push(i),
                        Err(e) => failed.push(e),
                    }
                }
                if !noscript.is_empty() {
                    match self.load_scripts().await {
                        Ok(()) => {
                            for (i, r) in run(noscript).await {
                                match r {
                                    Ok(v) => values[i] = Some(v),
                                    Err(e) => failed.push(e),
                                }
                            }
                        }
                        Err(StoreError::Redis(e)) => failed.push(e),
                        Err(e) => failed.push(RedisError::from((
                            ErrorKind::Io,
                            "loading scripts",
                            e.to_string(),
                        ))),
                    }
                }
                Replies {
                    values,
                    error: failed.into_iter().next(),
                }
            }
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Applies heartbeats (any buckets) in one round trip; returns the online transitions.
    pub async fn apply_heartbeats(
        &self,
        beats: &[Beat],
        floor_lease_ms: u64,
    ) -> Partial<Committed> {
        self.per_bucket(
            beats,
            |beat| bucket_of(beat.device.as_str()),
            |b, beats| {
                let mut args = vec![
                    self.keys.ttl_prefix(b),
                    lease_ms().to_string(),
                    floor_lease_ms.to_string(),
                    self.replica.to_string(),
                ];
                let t = |local: Millis| self.clock.to_master(b, local).to_string();
                for beat in beats {
                    let (from, to) = beat
                        .lapse
                        .map_or(("0".into(), "0".into()), |(f, t2)| (t(f), t(t2)));
                    args.push(beat.device.to_string());
                    args.push(t(beat.first));
                    args.push(t(beat.arrival));
                    args.push(t(beat.deadline));
                    args.push(from);
                    args.push(to);
                    args.push(
                        if beat.timing == Timing::OnTime {
                            "1"
                        } else {
                            "0"
                        }
                        .into(),
                    );
                }
                self.scripts
                    .heartbeat
                    .cmd(&self.keys.heartbeat_keys(b), args)
            },
            |b, reply| {
                if matches!(&reply, Value::SimpleString(s) if s == "LOST") {
                    self.loss.report();
                    return Err(StoreError::Lost(b));
                }
                members(b, reply)
            },
        )
        .await
    }

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
        self.import(&chunks, &token, Duration::from_secs(1))
            .await
            .into_result()
            .map(|_| ())
    }

    /// Begins republishing every device's status (see src/lua/republish.lua), unless a job
    /// began in the last 10 s; returns whether this call began it (in any bucket).
    pub async fn start_republish(&self) -> Result<bool, StoreError> {
        let buckets: Vec<Bucket> = (0..BUCKETS).collect();
        let began = self
            .per_bucket(
                &buckets,
                |b| *b,
                |b, _| self.republish_cmd(b, "start", "", 0),
                |_, reply| Ok(vec![matches!(reply, Value::Int(1))]),
            )
            .await
            .into_result()?;
        Ok(began.into_iter().any(|b| b))
    }

    /// One page (about `count` devices) of every bucket's republish job that no other
    /// replica holds; the statuses are staged in the outbox and returned.
    pub async fn republish_page(&self, owner: &str, count: usize) -> Partial<Committed> {
        let buckets: Vec<Bucket> = (0..BUCKETS).collect();
        self.per_bucket(
            &buckets,
            |b| *b,
            |b, _| self.republish_cmd(b, "page", owner, count),
            members,
        )
        .await
    }

    fn republish_cmd(&self, b: Bucket, mode: &str, owner: &str, count: usize) -> Cmd {
        let keys = [
            self.keys.records(b),
            self.keys.outbox(b),
            self.keys.republish_job(b),
        ];
        let args = vec![
            mode.to_owned(),
            owner.to_owned(),
            count.max(1).to_string(),
            lease_ms().to_string(),
            lease_ms().to_string(),
        ];
        self.scripts.republish.cmd(&keys, args)
    }

    /// The buckets whose epoch key is missing: Redis lost their data, or never had it.
    pub async fn lost_buckets(&self) -> Result<Vec<Bucket>, StoreError> {
        let cmds = (0..BUCKETS)
            .map(|b| {
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(self.keys.epoch(b));
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
    /// device gets `ttl` from now (see src/lua/import.lua). `token` names this import.
    pub async fn import(
        &self,
        chunks: &[ImportChunk<'_>],
        token: &str,
        ttl: Duration,
    ) -> Partial<Imported> {
        let flag = |b: bool| if b { "1" } else { "0" }.to_owned();
        self.per_bucket(
            chunks,
            |c| c.bucket,
            |b, group| {
                let mut args = vec![
                    self.keys.ttl_prefix(b),
                    (ttl.as_millis() as u64).to_string(),
                    token.to_owned(),
                ];
                let chunk = group.first();
                args.push(flag(chunk.is_some_and(|c| c.first)));
                args.push(flag(chunk.is_some_and(|c| c.last)));
                for r in chunk.map_or(&[][..], |c| c.records) {
                    args.push(r.device.to_string());
                    args.push(r.state.flag().to_owned());
                    args.push(r.seq.to_string());
                    args.push(r.since.to_string());
                    args.push(r.last_seen.to_string());
                    args.push(r.detected_at.to_string());
                }
                self.scripts.import.cmd(&self.keys.import_keys(b), args)
            },
            |b, reply| match reply {
                Value::Int(n) => Ok(vec![Imported::Written(b, n.max(0) as u64)]),
                Value::SimpleString(s) if s == "DONE" => Ok(vec![Imported::Present(b)]),
                Value::SimpleString(s) if s == "AGAIN" => Ok(vec![Imported::Again(b)]),
                other => Err(StoreError::Protocol(format!(
                    "unexpected reply from the import script: {other:?}"
                ))),
            },
        )
        .await
    }

    /// Marks the given devices offline if their deadline is at or before `cutoff`.
    pub async fn expire_devices(&self, ids: &[DeviceId], cutoff: Cutoff) -> Partial<Committed> {
        self.per_bucket(
            ids,
            |id| bucket_of(id.as_str()),
            |b, ids| {
                let mut args = self.expire_args(b, cutoff, ids.len());
                args.extend(ids.iter().map(|id| id.to_string()));
                self.scripts.expire.cmd(&self.keys.expire_keys(b), args)
            },
            |b, reply| Ok(parse_swept(b, reply)?.committed),
        )
        .await
    }

    /// Marks offline up to `limit` devices per bucket whose deadline is at or before
    /// `cutoff`, in the given buckets, in one round trip.
    pub async fn sweep(&self, buckets: &[Bucket], cutoff: Cutoff, limit: usize) -> Partial<Swept> {
        self.per_bucket(
            buckets,
            |b| *b,
            |b, _| {
                let args = self.expire_args(b, cutoff, limit);
                self.scripts.expire.cmd(&self.keys.expire_keys(b), args)
            },
            |b, reply| {
                let mut swept = parse_swept(b, reply)?;
                swept.next_deadline = swept.next_deadline.map(|d| self.clock.to_local(b, d));
                swept.cutoff = self.clock.to_local(b, swept.cutoff);
                Ok(vec![swept])
            },
        )
        .await
    }

    /// Forgets up to `limit` devices per bucket that have been offline for at least `after`
    /// by `cutoff`, in the given buckets, in one round trip; each clear is staged in the
    /// outbox (see src/lua/forget.lua).
    pub async fn forget(
        &self,
        buckets: &[Bucket],
        cutoff: Cutoff,
        after: Duration,
        limit: usize,
    ) -> Partial<Forgot> {
        let after = (after.as_millis() as u64).to_string();
        self.per_bucket(
            buckets,
            |b| *b,
            |b, _| {
                let mut args = self.expire_args(b, cutoff, limit);
                args.push(after.clone());
                self.scripts.forget.cmd(&self.keys.expire_keys(b), args)
            },
            |b, reply| Ok(vec![parse_forgot(b, reply)?]),
        )
        .await
    }

    /// Whether bucket `b`'s offline index has more entries than its offline-since index
    /// (devices that went offline before the latter existed).
    pub async fn offsince_behind(&self, b: Bucket) -> Result<bool, StoreError> {
        let mut cmds = Vec::new();
        for key in [
            self.keys.index(b, State::Offline),
            self.keys.offline_since(b),
        ] {
            let mut cmd = redis::cmd("ZCARD");
            cmd.arg(key);
            cmds.push(cmd);
        }
        let cards: Vec<i64> = decode(self.exec(cmds).await.all()?)?;
        Ok(cards.first() > cards.get(1))
    }

    /// Indexes by `since` the offline devices of bucket `b` after `after` (id order, at
    /// most `limit`) that the offline-since index lacks (see src/lua/offsince.lua). Returns
    /// the last id looked at, `None` at the end of the bucket.
    pub async fn index_offline(
        &self,
        b: Bucket,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<String>, StoreError> {
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.index(b, State::Offline))
            .arg(start)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn.clone())
            .await?;
        if ids.is_empty() {
            return Ok(None);
        }
        let keys = [self.keys.records(b), self.keys.offline_since(b)];
        let cmd = self.scripts.offsince.cmd(&keys, ids.clone());
        self.exec(vec![cmd]).await.all()?;
        Ok((ids.len() >= limit).then(|| ids.last().cloned()).flatten())
    }

    fn expire_args(&self, b: Bucket, cutoff: Cutoff, limit: usize) -> Vec<String> {
        vec![
            self.keys.ttl_prefix(b),
            self.clock.to_master(b, cutoff.before).to_string(),
            lease_ms().to_string(),
            limit.max(1).to_string(),
            cutoff.floor_lease_ms.to_string(),
            self.replica.to_string(),
        ]
    }

    /// Records acknowledgements; returns statuses that must be published again because the
    /// device moved on while an older status was in flight (see src/lua/ack.lua).
    pub async fn ack(&self, acks: &[Ack]) -> Partial<Committed> {
        self.per_bucket(
            acks,
            |ack| ack.bucket,
            |b, acks| {
                let mut args = vec![lease_ms().to_string()];
                for ack in acks {
                    args.push(ack.member.clone());
                    args.push(ack.device.to_string());
                    args.push(ack.seq.to_string());
                }
                let keys = [self.keys.records(b), self.keys.outbox(b)];
                self.scripts.ack.cmd(&keys, args)
            },
            members,
        )
        .await
    }

    /// Groups `items` by bucket, makes one script call per bucket that has any, runs them
    /// all in one round trip, and parses each reply with its bucket.
    async fn per_bucket<T, R>(
        &self,
        items: &[T],
        bucket: impl Fn(&T) -> Bucket,
        call: impl Fn(Bucket, &[&T]) -> Cmd,
        parse: impl Fn(Bucket, Value) -> Result<Vec<R>, StoreError>,
    ) -> Partial<R> {
        let mut by_bucket: Vec<Vec<&T>> = (0..BUCKETS).map(|_| Vec::new()).collect();
        for item in items {
            by_bucket[usize::from(bucket(item))].push(item);
        }
        let mut cmds = Vec::new();
        let mut order = Vec::new();
        for (b, group) in (0..BUCKETS).zip(&by_bucket) {
            if !group.is_empty() {
                cmds.push(call(b, group));
                order.push(b);
            }
        }
        if order.is_empty() {
            return Partial::empty();
        }
        let replies = self.exec(cmds).await;
        let mut out = Partial {
            error: replies.error.map(StoreError::from),
            ..Partial::empty()
        };
        for (b, reply) in order.into_iter().zip(replies.values) {
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

    /// Claims outbox entries whose lease ends at or before `until` (normally `now`: their
    /// publisher died or is stuck), at most `limit` per bucket.
    /// `until`: also claim leases ending up to this local time (at a start: everything leased
    /// before this process could lease anything); `None`: those ended by now.
    pub async fn claim_outbox(&self, until: Option<Millis>, limit: usize) -> Partial<Committed> {
        let buckets: Vec<Bucket> = (0..BUCKETS).collect();
        self.per_bucket(
            &buckets,
            |b| *b,
            |b, _| {
                let until = until.map_or(String::new(), |t| self.clock.to_master(b, t).to_string());
                let args = vec![lease_ms().to_string(), limit.to_string(), until];
                self.scripts.claim.cmd(&[self.keys.outbox(b)], args)
            },
            members,
        )
        .await
    }

    /// The current record of one device.
    pub async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let b = bucket_of(id.as_str());
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.keys.records(b))
            .arg(id.as_str())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(raw.and_then(|r| DeviceRecord::parse(id.clone(), &r)))
    }

    /// Fleet-wide counts `(online, offline)`, summed over the buckets.
    pub async fn counts(&self) -> Result<(i64, i64), StoreError> {
        let mut cmds = Vec::new();
        for b in 0..BUCKETS {
            for state in [State::Online, State::Offline] {
                let mut cmd = redis::cmd("ZCARD");
                cmd.arg(self.keys.index(b, state));
                cmds.push(cmd);
            }
        }
        let cards: Vec<i64> = decode(self.exec(cmds).await.all()?)?;
        let online = cards.iter().step_by(2).sum();
        let offline = cards.iter().skip(1).step_by(2).sum();
        Ok((online, offline))
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
    pub async fn list(
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
            let (ids, index_more) = self.index_ids(filter.state, after.as_deref(), want).await?;
            let records = self.records_of(&ids).await?;
            for (i, (id, record)) in ids.iter().zip(records).enumerate() {
                examined += 1;
                after = Some(id.clone());
                page.records.extend(record.filter(|r| filter.matches(r)));
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

    /// The smallest `limit` ids after `after` in the state indexes (both without a state),
    /// and whether more follow. Each bucket's index is read from `after` on, at most
    /// `limit + 1` ids each; the smallest `limit` overall are the answer.
    async fn index_ids(
        &self,
        state: Option<State>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), StoreError> {
        let states: &[State] = match state {
            Some(State::Online) => &[State::Online],
            Some(State::Offline) => &[State::Offline],
            None => &[State::Online, State::Offline],
        };
        let start = match after {
            Some(a) => format!("({a}"),
            None => "-".to_owned(),
        };
        let mut cmds = Vec::new();
        for b in 0..BUCKETS {
            for &s in states {
                let mut cmd = redis::cmd("ZRANGE");
                cmd.arg(self.keys.index(b, s))
                    .arg(&start)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1);
                cmds.push(cmd);
            }
        }
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
        let cmds = ids
            .iter()
            .map(|id| {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(self.keys.records(bucket_of(id))).arg(id);
                cmd
            })
            .collect();
        let raws: Vec<Option<String>> = decode(self.exec(cmds).await.all()?)?;
        Ok(ids
            .iter()
            .zip(raws)
            .map(|(id, raw)| DeviceRecord::parse(DeviceId::parse(id).ok()?, &raw?))
            .collect())
    }

    /// One HSCAN step over a bucket's records: every device's current status, for
    /// republishing after the broker lost its retained messages.
    pub async fn scan_records(
        &self,
        b: Bucket,
        cursor: u64,
    ) -> Result<(u64, Vec<Committed>), StoreError> {
        let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(self.keys.records(b))
            .arg(cursor)
            .arg("COUNT")
            .arg(500)
            .query_async(&mut self.conn.clone())
            .await?;
        let mut out = Vec::new();
        for pair in flat.chunks_exact(2) {
            let Ok(id) = DeviceId::parse(&pair[0]) else {
                continue;
            };
            let Some(r) = DeviceRecord::parse(id, &pair[1]) else {
                continue;
            };
            let event = r.status();
            out.push(Committed {
                bucket: b,
                member: event.member(),
                event,
            });
        }
        Ok((next, out))
    }
}

/// Makes sure `notify-keyspace-events` has `E` and `x` on the node behind `conn`, merging
/// with the flags already set (CONFIG SET replaces the whole set). With `configure = false`
/// it only reads. The setting is per node: in a cluster every master is asked.
pub async fn ensure_notifications(
    conn: &mut MultiplexedConnection,
    configure: bool,
) -> NotifyConfig {
    let current: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await;
    let current = match current {
        Ok(pair) if pair.len() == 2 => pair[1].clone(),
        Ok(other) => {
            return NotifyConfig::Unknown {
                reason: format!("CONFIG GET returned {other:?}"),
            }
        }
        Err(e) => {
            return NotifyConfig::Unknown {
                reason: format!("CONFIG GET refused: {e}"),
            }
        }
    };
    if has_expired_events(&current) {
        return NotifyConfig::AlreadyOn;
    }
    if !configure {
        return NotifyConfig::Unknown {
            reason: format!(
                "notify-keyspace-events is {current:?} and redis.configure_notifications is false"
            ),
        };
    }
    let merged = merge_flags(&current);
    let set: Result<(), _> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(&merged)
        .query_async(conn)
        .await;
    match set {
        Ok(()) => NotifyConfig::Enabled { from: current },
        Err(e) => NotifyConfig::Unknown {
            reason: format!("CONFIG SET refused: {e}"),
        },
    }
}

/// Writes a short-lived probe key (named by [`Keys::probe`]) on the node behind `conn`.
pub async fn write_probe(
    conn: &mut MultiplexedConnection,
    key: &str,
    ttl: Duration,
) -> Result<(), StoreError> {
    redis::cmd("SET")
        .arg(key)
        .arg("1")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Touches a key, so that Redis deletes it (and notifies) at once if it is overdue.
pub async fn touch(conn: &mut MultiplexedConnection, key: &str) -> Result<(), StoreError> {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await?;
    Ok(())
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Converts replies to a typed list.
fn decode<T: redis::FromRedisValue>(values: Vec<Value>) -> Result<Vec<T>, StoreError> {
    values
        .into_iter()
        .map(|v| redis::from_redis_value(v).map_err(|e| StoreError::Protocol(e.to_string())))
        .collect()
}

pub fn lease_ms() -> u64 {
    OUTBOX_LEASE.as_millis() as u64
}

/// Whether the flags make Redis publish `expired` keyevent notifications.
pub fn has_expired_events(flags: &str) -> bool {
    flags.contains('E') && (flags.contains('x') || flags.contains('A'))
}

/// The flags with `E` and `x` added, keeping every flag already set.
pub fn merge_flags(flags: &str) -> String {
    let mut out = flags.to_owned();
    if !out.contains('E') {
        out.push('E');
    }
    // `A` is an alias that includes `x`.
    if !out.contains('x') && !out.contains('A') {
        out.push('x');
    }
    out
}

fn bulk_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn committed(b: Bucket, member: String) -> Result<Committed, StoreError> {
    let event = StatusEvent::parse_member(&member)
        .ok_or_else(|| StoreError::Protocol(format!("malformed outbox member {member:?}")))?;
    Ok(Committed {
        bucket: b,
        member,
        event,
    })
}

fn members(b: Bucket, reply: Value) -> Result<Vec<Committed>, StoreError> {
    match reply {
        Value::Array(items) => items
            .iter()
            .map(|v| {
                bulk_string(v)
                    .ok_or_else(|| StoreError::Protocol(format!("expected a string, got {v:?}")))
                    .and_then(|m| committed(b, m))
            })
            .collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::Protocol(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

fn parse_forgot(b: Bucket, reply: Value) -> Result<Forgot, StoreError> {
    let Value::Array(items) = reply else {
        return Err(StoreError::Protocol(format!(
            "expected an array from the forget script, got {reply:?}"
        )));
    };
    let mut it = items.iter();
    let more = it.next().and_then(bulk_string).unwrap_or_default() == "1";
    let cleared = it
        .map(|v| {
            bulk_string(v)
                .ok_or_else(|| StoreError::Protocol(format!("expected a string, got {v:?}")))
                .and_then(|m| committed(b, m))
        })
        .collect::<Result<_, _>>()?;
    Ok(Forgot {
        bucket: b,
        more,
        cleared,
    })
}

fn parse_swept(b: Bucket, reply: Value) -> Result<Swept, StoreError> {
    let Value::Array(items) = reply else {
        return Err(StoreError::Protocol(format!(
            "expected an array from the expire script, got {reply:?}"
        )));
    };
    let mut it = items.iter();
    let next = it.next().and_then(bulk_string).unwrap_or_default();
    let more = it.next().and_then(bulk_string).unwrap_or_default() == "1";
    let used = it
        .next()
        .and_then(bulk_string)
        .and_then(|c| c.parse::<Millis>().ok());
    let next_deadline = next
        .parse::<f64>()
        .ok()
        .filter(|d| *d >= 0.0)
        .map(|d| d as Millis);
    let committed = it
        .map(|v| {
            bulk_string(v)
                .ok_or_else(|| StoreError::Protocol(format!("expected a string, got {v:?}")))
                .and_then(|m| committed(b, m))
        })
        .collect::<Result<_, _>>()?;
    Ok(Swept {
        bucket: b,
        next_deadline,
        more,
        cutoff: used.unwrap_or(0),
        committed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("sensor-17"), bucket_of("sensor-17"));
        let mut counts = vec![0usize; usize::from(BUCKETS)];
        for i in 0..64_000 {
            counts[usize::from(bucket_of(&format!("sim-{i:06}")))] += 1;
        }
        let max = counts.iter().max().copied().unwrap_or(0);
        let min = counts.iter().min().copied().unwrap_or(0);
        assert!(max < 1300 && min > 700, "uneven buckets: {min}..{max}");
    }

    #[test]
    fn ttl_keys_round_trip() {
        let keys = Keys::new("presence");
        let id = DeviceId::parse("a:b}{c").unwrap();
        let key = keys.ttl(&id);
        assert!(key.starts_with("presence:{"));
        assert_eq!(keys.parse_ttl_key(key.as_bytes()), Some(id));
        assert_eq!(keys.parse_ttl_key(b"presence:{1}:rec"), None);
        assert_eq!(keys.parse_ttl_key(b"other:{1}:ttl:x"), None);
        // A bucket that does not match the id is not one of our keys.
        let wrong = format!("presence:{{{}}}:ttl:x", (bucket_of("x") + 1) % BUCKETS);
        assert_eq!(keys.parse_ttl_key(wrong.as_bytes()), None);
    }

    #[test]
    fn notify_flags_merge() {
        assert!(has_expired_events("Ex"));
        assert!(has_expired_events("AKE"));
        assert!(!has_expired_events("Kx"));
        assert!(!has_expired_events(""));
        assert_eq!(merge_flags(""), "Ex");
        assert_eq!(merge_flags("Kg"), "KgEx");
        assert_eq!(merge_flags("KA"), "KAE");
        assert_eq!(merge_flags("xE"), "xE");
    }
}
