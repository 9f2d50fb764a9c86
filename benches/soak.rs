//! Randomized fault soak: 3 `presenced` replicas (built binary, one shared subscription)
//! against one real redis-server (AOF, `appendfsync always`) and one persistent mosquitto,
//! each replica's Redis connection through its own fault proxy, and 1,500 devices
//! published by this runner, while seeded faults hit every part; then every status is
//! judged against the devices' own acknowledged heartbeats.
//!
//!     cargo bench --bench soak -- --seed 42 --duration 180s   # full run, writes benches/SOAK.md
//!     cargo bench --bench soak -- --quick --seed 42           # ~40 s, writes target/soak-quick.md
//!
//! Options: `--seed N` (default: from the clock, printed), `--duration D` (the fault phase;
//! default 180s, quick 20s), `--ttl D` (default 6s, quick 4s), `--faults N`, `--tolerance D`
//! (default 500ms), `--out PATH`. Exit status 1 if anything was found (after the report is
//! written), 2 if the setup failed.
//!
//! The devices speak MQTT 3.1.1 through a minimal client of this file (QoS 1, one packet id
//! per heartbeat), so every heartbeat has its own send time and PUBACK time: the judgement
//! uses nothing the monitor reports about itself except its statuses and its API.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use presenced::device::now_ms;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use support::proxy::{FaultProxy, Mode};
use support::{Mosquitto, Proc, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const KEEPERS: usize = 900;
const SLEEPERS: usize = 600;
const REPLICAS: usize = 3;
const PUBLISHERS: usize = 4;
/// How long a restarted replica may take to become ready before it counts as failed.
const READY_WITHIN: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === Options ===

struct Opts {
    seed: u64,
    quick: bool,
    duration: Duration,
    ttl: Duration,
    faults: usize,
    tol: u64,
    out: std::path::PathBuf,
    command: String,
}

fn opts() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let dur = |name: &str, default: Duration| -> Result<Duration, String> {
        value(name).map_or(Ok(default), |v| {
            humantime::parse_duration(&v).map_err(|e| format!("{name} {v}: {e}"))
        })
    };
    let seed = match value("--seed") {
        Some(v) => v.parse().map_err(|e| format!("--seed {v}: {e}"))?,
        None => now_ms() % 1_000_000,
    };
    let duration = dur(
        "--duration",
        Duration::from_secs(if quick { 20 } else { 180 }),
    )?;
    let ttl = dur("--ttl", Duration::from_secs(if quick { 4 } else { 6 }))?;
    let tol = dur("--tolerance", Duration::from_millis(500))?.as_millis() as u64;
    let default_faults = if quick {
        4
    } else {
        ((duration.as_secs_f64() * 14.0 / 180.0).round() as usize).max(1)
    };
    let faults = match value("--faults") {
        Some(v) => v.parse().map_err(|e| format!("--faults {v}: {e}"))?,
        None => default_faults,
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = match value("--out") {
        Some(p) => p.into(),
        None if quick => root.join("target/soak-quick.md"),
        None => root.join("benches/SOAK.md"),
    };
    let mut command = format!("cargo bench --bench soak -- --seed {seed}");
    if quick {
        command.push_str(" --quick");
    }
    if value("--duration").is_some() || !quick {
        let _ = write!(
            command,
            " --duration {}",
            humantime::format_duration(duration)
        );
    }
    for name in ["--ttl", "--faults", "--tolerance"] {
        if let Some(v) = value(name) {
            let _ = write!(command, " {name} {v}");
        }
    }
    Ok(Opts {
        seed,
        quick,
        duration,
        ttl,
        faults,
        tol,
        out,
        command,
    })
}

// === Devices: a minimal MQTT 3.1.1 QoS 1 publisher ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Keeper,
    Sleeper,
}

/// One heartbeat publish: when it was written, when the broker acknowledged it (if it did),
/// and the latest time the broker can have received it (the PUBACK, or the moment the
/// connection was given up).
#[derive(Clone, Copy, Debug)]
struct Attempt {
    sent: u64,
    acked: Option<u64>,
    upper: u64,
}

struct Dev {
    idx: usize,
    role: Role,
    awake: bool,
    phase_end: u64,
    next_due: u64,
    attempts: Vec<Attempt>,
    rng: fastrand::Rng,
}

fn device_id(idx: usize) -> String {
    if idx < KEEPERS {
        format!("soak-k-{idx:04}")
    } else {
        format!("soak-s-{:04}", idx - KEEPERS)
    }
}

fn remaining_len(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    let mut p = vec![0x10];
    remaining_len(body.len(), &mut p);
    p.extend(body);
    p
}

fn publish_packet(topic: &str, pkid: u16, out: &mut Vec<u8>) {
    out.push(0x32); // PUBLISH, QoS 1, not retained
    remaining_len(2 + topic.len() + 2, out);
    out.extend((topic.len() as u16).to_be_bytes());
    out.extend(topic.as_bytes());
    out.extend(pkid.to_be_bytes());
}

/// Splits complete packets off the front of `buf`: `(type, body)`.
fn packets(buf: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 2 {
            return out;
        }
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
        loop {
            let Some(&b) = buf.get(i) else { return out };
            len += (b & 0x7f) as usize * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if buf.len() < i + len {
            return out;
        }
        let kind = buf[0] >> 4;
        let body = buf[i..i + len].to_vec();
        buf.drain(..i + len);
        out.push((kind, body));
    }
}

struct Schedule {
    ttl: u64,
    interval: u64,
}

impl Dev {
    fn new(idx: usize, seed: u64, s: &Schedule, now: u64) -> Dev {
        let mut rng =
            fastrand::Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ idx as u64);
        let role = if idx < KEEPERS {
            Role::Keeper
        } else {
            Role::Sleeper
        };
        let first_awake = (s.ttl as f64 * (0.3 + 2.7 * rng.f64())) as u64;
        Dev {
            idx,
            role,
            awake: true,
            phase_end: now + s.ttl + first_awake,
            next_due: now + rng.u64(0..s.interval),
            attempts: Vec::new(),
            rng,
        }
    }

    /// Advances a sleeper's phase; once `frozen`, a device keeps the phase it is in.
    fn step(&mut self, now: u64, s: &Schedule, frozen: bool) {
        if self.role != Role::Sleeper || frozen || now < self.phase_end {
            return;
        }
        if self.awake {
            self.awake = false;
            // Asleep for more than 2 TTL.
            self.phase_end = now + (s.ttl as f64 * (2.2 + 0.8 * self.rng.f64())) as u64;
        } else {
            self.awake = true;
            self.next_due = now;
            self.phase_end = now + (s.ttl as f64 * (1.0 + 2.0 * self.rng.f64())) as u64;
        }
    }
}

/// One publisher connection for `devs`; reconnects until `stop`; returns every attempt.
async fn publisher(
    conn: usize,
    port: u16,
    mut devs: Vec<Dev>,
    s: Schedule,
    frozen: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Vec<Dev> {
    let topics: Vec<String> = devs
        .iter()
        .map(|d| format!("devices/{}/heartbeat", device_id(d.idx)))
        .collect();
    let client_id = format!("soak-devices-{conn}");
    while !stop.is_cancelled() {
        let session = async {
            let mut sock = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            .ok()?
            .ok()?;
            let _ = sock.set_nodelay(true);
            tokio::time::timeout(
                Duration::from_secs(2),
                sock.write_all(&connect_packet(&client_id)),
            )
            .await
            .ok()?
            .ok()?;
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            // CONNACK
            let connack = tokio::time::timeout(Duration::from_secs(3), async {
                loop {
                    let n = sock.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some((kind, body)) = packets(&mut buf).into_iter().next() {
                        return (kind == 2 && body.get(1) == Some(&0)).then_some(());
                    }
                }
            })
            .await
            .ok()?;
            connack?;
            let mut inflight: HashMap<u16, (usize, usize)> = HashMap::new();
            let mut pkid: u16 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut last_ping = now_ms();
            let (mut rd, mut wr) = sock.into_split();
            let result = loop {
                tokio::select! {
                    () = stop.cancelled() => break Some(()),
                    r = rd.read(&mut chunk) => {
                        let n = match r { Ok(0) | Err(_) => break None, Ok(n) => n };
                        buf.extend_from_slice(&chunk[..n]);
                        let now = now_ms();
                        for (kind, body) in packets(&mut buf) {
                            if kind == 4 && body.len() >= 2 {
                                let id = u16::from_be_bytes([body[0], body[1]]);
                                if let Some((d, a)) = inflight.remove(&id) {
                                    let at = &mut devs[d].attempts[a];
                                    at.acked = Some(now);
                                    at.upper = now;
                                }
                            }
                        }
                    }
                    _ = tick.tick() => {
                        let now = now_ms();
                        let is_frozen = frozen.load(Ordering::Relaxed);
                        let mut out = Vec::new();
                        for (d, dev) in devs.iter_mut().enumerate() {
                            dev.step(now, &s, is_frozen);
                            if !dev.awake || now < dev.next_due || inflight.len() >= 2000 {
                                continue;
                            }
                            loop {
                                pkid = pkid.wrapping_add(1).max(1);
                                if !inflight.contains_key(&pkid) {
                                    break;
                                }
                            }
                            publish_packet(&topics[d], pkid, &mut out);
                            dev.attempts.push(Attempt { sent: now, acked: None, upper: u64::MAX });
                            inflight.insert(pkid, (d, dev.attempts.len() - 1));
                            dev.next_due = now + s.interval;
                        }
                        if now - last_ping > 10_000 {
                            out.extend([0xC0, 0]);
                            last_ping = now;
                        }
                        if !out.is_empty() {
                            match tokio::time::timeout(Duration::from_secs(2), wr.write_all(&out)).await {
                                Ok(Ok(())) => {}
                                _ => break None,
                            }
                        }
                    }
                }
            };
            // What the broker did not acknowledge may or may not have reached it.
            let now = now_ms();
            for (_, (d, a)) in inflight.drain() {
                devs[d].attempts[a].upper = now;
            }
            result
        };
        if session.await.is_none() && !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let now = now_ms();
    for d in &mut devs {
        for a in &mut d.attempts {
            if a.upper == u64::MAX {
                a.upper = now;
            }
        }
    }
    devs
}

// === Statuses ===

#[derive(Clone, Debug)]
struct Status {
    dev: usize,
    seq: u64,
    online: bool,
    since: u64,
    /// When the recorder received it.
    at: u64,
}

struct Recorder {
    seen: Arc<Mutex<Vec<Status>>>,
    malformed: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    _client: AsyncClient,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse_ms(v: &serde_json::Value) -> Option<u64> {
    let t = humantime::parse_rfc3339(v.as_str()?).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

fn parse_status(payload: &[u8], index: &HashMap<String, usize>, at: u64) -> Result<Status, String> {
    let bad = || String::from_utf8_lossy(payload).into_owned();
    let v: serde_json::Value = serde_json::from_slice(payload).map_err(|_| bad())?;
    let dev = *v["device"]
        .as_str()
        .and_then(|d| index.get(d))
        .ok_or_else(bad)?;
    let online = match v["state"].as_str() {
        Some("online") => true,
        Some("offline") => false,
        _ => return Err(bad()),
    };
    Ok(Status {
        dev,
        seq: v["seq"].as_u64().ok_or_else(bad)?,
        online,
        since: parse_ms(&v["since"]).ok_or_else(bad)?,
        at,
    })
}

/// Subscribes to every status (QoS 1) and records them; `persistent` keeps the session
/// (and the messages queued for it) across reconnections. `None` if no SubAck came.
async fn recorder(
    port: u16,
    client_id: &str,
    persistent: bool,
    index: Arc<HashMap<String, usize>>,
) -> Option<Recorder> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(!persistent)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 1000);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let malformed = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (s, m, c) = (seen.clone(), malformed.clone(), client.clone());
    let task = tokio::spawn(async move {
        let mut ready = Some(tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = c.try_subscribe("devices/+/status", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    match parse_status(&p.payload, &index, now_ms()) {
                        Ok(st) => lock(&s).push(st),
                        Err(text) => lock(&m).push(text),
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .ok()?
        .ok()?;
    Some(Recorder {
        seen,
        malformed,
        task,
        _client: client,
    })
}

// === Servers and faults (run on a plain thread: every step there blocks) ===

struct Replica {
    proc: Option<Proc>,
    http: SocketAddr,
    id: String,
}

struct World {
    redis: RedisServer,
    mqtt: Mosquitto,
    proxies: Vec<FaultProxy>,
    replicas: Vec<Replica>,
    ttl: Duration,
}

impl World {
    fn spawn_replica(&self, i: usize) -> Result<Replica, String> {
        let url = format!("redis://{}/0", self.proxies[i].addr());
        let ttl = format!("{}ms", self.ttl.as_millis());
        let extra = [
            "--mqtt-shared-group",
            "presenced",
            "--presence-ttl",
            ttl.as_str(),
        ];
        let spawned = std::panic::catch_unwind(AssertUnwindSafe(|| {
            support::spawn_replica_on(&["--redis-url".into(), url], &self.mqtt, &extra)
        }));
        match spawned {
            Ok((proc, http, id)) => Ok(Replica {
                proc: Some(proc),
                http,
                id,
            }),
            Err(_) => Err(format!("replica {i} could not be spawned")),
        }
    }
}

/// `GET /readyz` with every step bounded.
fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: soak\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

fn wait_ready(addr: SocketAddr, within: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if ready(addr) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn signal(p: &Proc, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([sig, &p.id().to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ReplicaKill,
    ReplicaStop,
    RedisKill,
    ProxyRefuse,
    ProxyBlackhole,
    ProxyDelay,
    BrokerRestart,
}

const KINDS: [Kind; 7] = [
    Kind::ReplicaKill,
    Kind::ReplicaStop,
    Kind::RedisKill,
    Kind::ProxyRefuse,
    Kind::ProxyBlackhole,
    Kind::ProxyDelay,
    Kind::BrokerRestart,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::ReplicaKill => "replica SIGKILL + restart",
            Kind::ReplicaStop => "replica SIGSTOP / SIGCONT",
            Kind::RedisKill => "Redis SIGKILL + restart (AOF)",
            Kind::ProxyRefuse => "Redis proxy Refuse",
            Kind::ProxyBlackhole => "Redis proxy Blackhole",
            Kind::ProxyDelay => "Redis proxy Delay(50ms)",
            Kind::BrokerRestart => "mosquitto SIGKILL + restart (persistence)",
        }
    }
    fn per_replica(self) -> bool {
        !matches!(self, Kind::RedisKill | Kind::BrokerRestart)
    }
}

struct Planned {
    at: Duration,
    len: Duration,
    kind: Kind,
    target: usize,
}

/// Faults one after another: the fault phase is cut into equal slots, one fault in each at
/// a random offset; kinds are dealt from shuffled decks of all seven.
fn plan(o: &Opts) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let slot = o.duration.as_secs_f64() / o.faults.max(1) as f64;
    let (lo, hi) = if o.quick { (1.0, 2.5) } else { (1.5, 4.0) };
    let mut deck = Vec::new();
    (0..o.faults)
        .map(|i| {
            if deck.is_empty() {
                deck = KINDS.to_vec();
                rng.shuffle(&mut deck);
            }
            let kind = deck.pop().unwrap_or(Kind::ReplicaStop);
            let mut len = lo + (hi - lo) * rng.f64();
            if kind == Kind::BrokerRestart {
                // The devices' publishers are cut off too: keep their silence under the TTL.
                len = len.min(o.ttl.as_secs_f64() / 2.0);
            }
            let room = (slot - len - 1.0).max(0.0);
            Planned {
                at: Duration::from_secs_f64(i as f64 * slot + room * rng.f64()),
                len: Duration::from_secs_f64(len),
                kind,
                target: rng.usize(0..REPLICAS),
            }
        })
        .collect()
}

#[derive(Clone, Debug)]
struct FaultLog {
    kind: Kind,
    target: Option<usize>,
    start: u64,
    end: u64,
    note: String,
    failed: bool,
}

fn run_faults(world: &mut World, planned: &[Planned], t0: std::time::Instant) -> Vec<FaultLog> {
    let mut log = Vec::new();
    for p in planned {
        if let Some(wait) = p.at.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        let start = now_ms();
        let (note, failed) = apply(world, p);
        let end_at = if p.kind == Kind::ReplicaKill {
            start + p.len.as_millis() as u64
        } else {
            now_ms()
        };
        let entry = FaultLog {
            kind: p.kind,
            target: p.kind.per_replica().then_some(p.target),
            start,
            end: end_at.max(start),
            note,
            failed,
        };
        eprintln!(
            "fault {}: {}{} for {:.1}s {}",
            log.len() + 1,
            p.kind.name(),
            entry
                .target
                .map(|t| format!(" (replica {t})"))
                .unwrap_or_default(),
            (entry.end - entry.start) as f64 / 1000.0,
            entry.note
        );
        log.push(entry);
    }
    log
}

/// Applies one fault for its length and ends it: `(note, failed)`.
fn apply(world: &mut World, p: &Planned) -> (String, bool) {
    let t = p.target;
    match p.kind {
        Kind::ReplicaKill => {
            if let Some(mut proc) = world.replicas[t].proc.take() {
                signal(&proc, "-KILL");
                let _ = proc.wait();
            }
            std::thread::sleep(p.len);
            match world.spawn_replica(t) {
                Ok(r) => {
                    let http = r.http;
                    world.replicas[t] = r;
                    match wait_ready(http, READY_WITHIN) {
                        Some(d) => (
                            format!("ready {:.1}s after restart", d.as_secs_f64()),
                            false,
                        ),
                        None => (
                            format!("NOT ready {}s after restart", READY_WITHIN.as_secs()),
                            true,
                        ),
                    }
                }
                Err(e) => (e, true),
            }
        }
        Kind::ReplicaStop => {
            let Some(proc) = world.replicas[t].proc.as_ref() else {
                return ("replica not running".into(), true);
            };
            let stopped = signal(proc, "-STOP");
            std::thread::sleep(p.len);
            let resumed = signal(proc, "-CONT");
            if stopped && resumed {
                (String::new(), false)
            } else {
                (
                    format!("kill -STOP ok: {stopped}, -CONT ok: {resumed}"),
                    true,
                )
            }
        }
        Kind::RedisKill => {
            world.redis.stop();
            std::thread::sleep(p.len);
            for attempt in 1..=3 {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| world.redis.restart()));
                if r.is_ok() {
                    return (
                        if attempt > 1 {
                            format!("restarted at attempt {attempt}")
                        } else {
                            String::new()
                        },
                        false,
                    );
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            ("redis-server did NOT restart".into(), true)
        }
        Kind::ProxyRefuse | Kind::ProxyBlackhole | Kind::ProxyDelay => {
            let mode = match p.kind {
                Kind::ProxyRefuse => Mode::Refuse,
                Kind::ProxyBlackhole => Mode::Blackhole,
                _ => Mode::Delay(Duration::from_millis(50)),
            };
            let proxy = &world.proxies[t];
            let on = std::panic::catch_unwind(AssertUnwindSafe(|| proxy.set(mode)));
            std::thread::sleep(p.len);
            let off = std::panic::catch_unwind(AssertUnwindSafe(|| proxy.set(Mode::Pass)));
            match (on.is_ok(), off.is_ok()) {
                (true, true) => (String::new(), false),
                (a, b) => (
                    format!("proxy switch to fault ok: {a}, back to Pass ok: {b}"),
                    true,
                ),
            }
        }
        Kind::BrokerRestart => {
            world.mqtt.stop();
            std::thread::sleep(p.len);
            for attempt in 1..=3 {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| world.mqtt.restart()));
                if r.is_ok() {
                    return (
                        if attempt > 1 {
                            format!("restarted at attempt {attempt}")
                        } else {
                            String::new()
                        },
                        false,
                    );
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            ("mosquitto did NOT restart".into(), true)
        }
    }
}

// === Judgement ===

#[derive(Default)]
struct Findings {
    premature: Vec<(usize, u64, u64)>,  // (device, seq, since)
    stale: Vec<(usize, u64, u64, u64)>, // (device, seq, since, heartbeat acked inside)
    keeper: Vec<(usize, u64, u64)>,
    false_offlines: Vec<(usize, u64, u64)>, // (device, seq, attribution time)
    lost: Vec<(usize, u64, u64)>,           // (device, silence from, silence to)
    seq: Vec<(usize, String)>,
    finals: Vec<(usize, String)>,
    ambiguous_final: usize,
    out_of_order: usize,
    excused_keepers: usize,
    unchecked_api: usize,
    malformed: Vec<String>,
    infra: Vec<String>,
}

impl Findings {
    fn violations(&self) -> usize {
        self.false_offlines.len()
            + self.lost.len()
            + self.seq.len()
            + self.finals.len()
            + self.malformed.len()
            + self.infra.len()
    }
}

struct Final {
    retained: HashMap<usize, (u64, bool)>,
    api: HashMap<usize, Result<(u64, bool), String>>,
    at: u64,
}

fn judge(devs: &[Dev], seen: &[Status], fin: &Final, ttl: u64, tol: u64, f: &mut Findings) {
    let mut by_dev: Vec<Vec<&Status>> = vec![Vec::new(); devs.len()];
    for s in seen {
        by_dev[s.dev].push(s);
    }
    for d in devs {
        let id = device_id(d.idx);
        // Distinct seqs; one seq seen with two contents is a violation.
        let mut seqs: BTreeMap<u64, (bool, u64)> = BTreeMap::new();
        let mut best = 0;
        for s in &by_dev[d.idx] {
            if s.seq < best {
                f.out_of_order += 1;
            }
            best = best.max(s.seq);
            match seqs.get(&s.seq) {
                Some(&(on, since)) if (on, since) != (s.online, s.since) => f.seq.push((
                    d.idx,
                    format!(
                        "{id}: seq {} seen as {} since {since} and as {} since {}",
                        s.seq,
                        state(on),
                        state(s.online),
                        s.since
                    ),
                )),
                Some(_) => {}
                None => {
                    seqs.insert(s.seq, (s.online, s.since));
                }
            }
        }
        let list: Vec<(u64, bool, u64)> = seqs.iter().map(|(&q, &(o, s))| (q, o, s)).collect();
        for (i, &(q, on, _)) in list.iter().enumerate() {
            if q != i as u64 + 1 {
                f.seq.push((
                    d.idx,
                    format!(
                        "{id}: seqs seen {:?}",
                        list.iter().map(|x| x.0).collect::<Vec<_>>()
                    ),
                ));
                break;
            }
            if on != (q % 2 == 1) {
                f.seq.push((
                    d.idx,
                    format!(
                        "{id}: seq {q} is {} (states must alternate from online)",
                        state(on)
                    ),
                ));
                break;
            }
        }
        let acked: Vec<(u64, u64)> = d
            .attempts
            .iter()
            .filter_map(|a| Some((a.sent, a.acked?)))
            .collect();
        // Silences: between the latest possible arrival of one attempt and the next send.
        let mut silences: Vec<(u64, u64, u64)> = Vec::new(); // (prev sent, prev upper, next sent)
        for w in d.attempts.windows(2) {
            silences.push((w[0].sent, w[0].upper, w[1].sent));
        }
        if let Some(last) = d.attempts.last() {
            silences.push((last.sent, last.upper, fin.at));
        }
        // False offlines.
        for (i, &(q, on, since)) in list.iter().enumerate() {
            if on {
                continue;
            }
            let next_online = list
                .get(i + 1)
                .filter(|x| x.0 == q + 1 && x.1)
                .map_or(u64::MAX, |x| x.2);
            let premature = acked
                .iter()
                .any(|&(sent, _)| sent < since && sent + ttl > since + tol);
            let stale = acked
                .iter()
                .find(|&&(sent, ack)| sent >= since && ack.saturating_add(tol) < next_online)
                .map(|&(_, ack)| ack);
            let keeper = d.role == Role::Keeper && {
                let excused = silences.iter().any(|&(ps, pu, ns)| {
                    ns.saturating_sub(pu) > ttl.saturating_sub(tol)
                        && since + tol >= ps
                        && since <= ns + tol
                });
                if excused {
                    f.excused_keepers += 1;
                }
                !excused
            };
            if premature {
                f.premature.push((d.idx, q, since));
            }
            if let Some(ack) = stale {
                f.stale.push((d.idx, q, since, ack));
            }
            if keeper {
                f.keeper.push((d.idx, q, since));
            }
            if premature || stale.is_some() || keeper {
                let when = if premature || keeper {
                    since
                } else {
                    stale.unwrap_or(since)
                };
                f.false_offlines.push((d.idx, q, when));
            }
        }
        // Lost offlines: a provable silence longer than TTL + tolerance with no offline
        // inside it (the final one also needs time to have been published).
        let offlines: Vec<u64> = list.iter().filter(|x| !x.1).map(|x| x.2).collect();
        let retained_offline = fin.retained.get(&d.idx).filter(|r| !r.1).is_some();
        for &(ps, pu, ns) in &silences {
            let is_final = ns == fin.at;
            let need = ttl + tol + if is_final { 2000 } else { 0 };
            if ns.saturating_sub(pu) <= need {
                continue;
            }
            let covered =
                offlines.iter().any(|&s| s > ps && s <= ns + tol) || (is_final && retained_offline);
            if !covered {
                f.lost.push((d.idx, pu, ns));
            }
        }
        // Final agreement: retained vs API vs expected.
        let last_upper = d.attempts.iter().map(|a| a.upper).max().unwrap_or(0);
        let last_sent = d.attempts.iter().map(|a| a.sent).max().unwrap_or(0);
        let expected = if last_upper + ttl > fin.at + tol {
            Some(true)
        } else if last_sent + ttl + tol + 2000 < fin.at {
            Some(false)
        } else {
            f.ambiguous_final += 1;
            None
        };
        let retained = fin.retained.get(&d.idx).copied();
        let api = fin.api.get(&d.idx).cloned();
        let mut problems = Vec::new();
        match (&retained, &api) {
            (None, _) => problems.push("no retained status".to_owned()),
            (Some(r), Some(Ok(a))) if r != a => problems.push(format!(
                "retained seq {} {} vs API seq {} {}",
                r.0,
                state(r.1),
                a.0,
                state(a.1)
            )),
            _ => {}
        }
        match &api {
            Some(Err(e)) => problems.push(format!("API: {e}")),
            None => f.unchecked_api += 1,
            _ => {}
        }
        if let (Some(r), Some(e)) = (retained, expected) {
            if r.1 != e {
                problems.push(format!("retained {} but expected {}", state(r.1), state(e)));
            }
        }
        // Only what had arrived before the fresh subscriber asked: later transitions are
        // not in its snapshot.
        let before = by_dev[d.idx]
            .iter()
            .filter(|s| s.at + 500 < fin.at)
            .map(|s| s.seq)
            .max();
        if let (Some(r), Some(q)) = (retained, before) {
            if r.0 < q {
                problems.push(format!("retained seq {} older than seq {q} seen", r.0));
            }
        }
        if !problems.is_empty() {
            f.finals
                .push((d.idx, format!("{id}: {}", problems.join("; "))));
        }
    }
}

fn state(online: bool) -> &'static str {
    if online {
        "online"
    } else {
        "offline"
    }
}

// === Main ===

fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let logs = std::env::temp_dir().join(format!("presenced-soak-{}", o.seed));
    if std::env::var_os("PRESENCED_TEST_LOG_DIR").is_none()
        && std::fs::create_dir_all(&logs).is_ok()
    {
        std::env::set_var("PRESENCED_TEST_LOG_DIR", &logs);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(run(&o));
    std::process::exit(code);
}

async fn run(o: &Opts) -> i32 {
    let started = std::time::Instant::now();
    let t0 = now_ms();
    eprintln!("soak: {}", o.command);
    let ttl = o.ttl.as_millis() as u64;
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mqtt = Mosquitto::start_persistent();
    let redis_addr: SocketAddr = match format!("127.0.0.1:{}", redis.port).parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return 2;
        }
    };
    let proxies = (0..REPLICAS)
        .map(|_| FaultProxy::start(redis_addr))
        .collect();
    let mut world = World {
        redis,
        mqtt,
        proxies,
        replicas: Vec::new(),
        ttl: o.ttl,
    };
    for i in 0..REPLICAS {
        match world.spawn_replica(i) {
            Ok(r) => world.replicas.push(r),
            Err(e) => {
                eprintln!("soak: setup: {e}");
                return 2;
            }
        }
    }
    for (i, r) in world.replicas.iter().enumerate() {
        let addr = r.http;
        let ok = tokio::task::spawn_blocking(move || wait_ready(addr, READY_WITHIN)).await;
        if !matches!(ok, Ok(Some(_))) {
            eprintln!("soak: setup: replica {i} ({}) not ready", r.id);
            return 2;
        }
    }
    let port = world.mqtt.port;
    let index: Arc<HashMap<String, usize>> =
        Arc::new((0..KEEPERS + SLEEPERS).map(|i| (device_id(i), i)).collect());
    let Some(rec) = recorder(
        port,
        &format!("soak-recorder-{}", o.seed),
        true,
        index.clone(),
    )
    .await
    else {
        eprintln!("soak: setup: the status recorder got no SubAck");
        return 2;
    };

    // Devices.
    let frozen = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let now = now_ms();
    let sched = || Schedule {
        ttl,
        interval: ttl / 4,
    };
    let mut groups: Vec<Vec<Dev>> = (0..PUBLISHERS).map(|_| Vec::new()).collect();
    for i in 0..KEEPERS + SLEEPERS {
        groups[i % PUBLISHERS].push(Dev::new(i, o.seed, &sched(), now));
    }
    let pubs: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(c, g)| tokio::spawn(publisher(c, port, g, sched(), frozen.clone(), stop.clone())))
        .collect();
    let warm = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut warm_ok = false;
    while tokio::time::Instant::now() < warm {
        let n = {
            let seen = lock(&rec.seen);
            let mut on = vec![false; KEEPERS + SLEEPERS];
            for s in seen.iter() {
                on[s.dev] = true;
            }
            on.iter().filter(|x| **x).count()
        };
        if n == KEEPERS + SLEEPERS {
            warm_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let warmup = now_ms() - t0;
    eprintln!(
        "soak: warm-up done after {:.1}s (every device seen: {warm_ok})",
        warmup as f64 / 1000.0
    );

    // Faults.
    let planned = plan(o);
    let fault_start = std::time::Instant::now();
    let faults_at = now_ms();
    let driver = std::thread::spawn(move || {
        let log = run_faults(&mut world, &planned, fault_start);
        (world, log)
    });
    let fault_phase = o.duration;
    tokio::time::sleep(fault_phase).await;
    let joined = tokio::task::spawn_blocking(move || driver.join()).await;
    let (world, faults) = match joined {
        Ok(Ok(x)) => x,
        _ => {
            eprintln!("soak: the fault driver panicked; no judgement possible");
            stop.cancel();
            return 2;
        }
    };
    let faults_end = now_ms();
    // Quiet: no more faults, sleepers keep the phase they are in.
    frozen.store(true, Ordering::Relaxed);
    let quiet = o.ttl * 2 + Duration::from_secs(if o.quick { 3 } else { 5 });
    eprintln!("soak: faults over; quiet for {:.0}s", quiet.as_secs_f64());
    tokio::time::sleep(quiet).await;

    let mut f = Findings::default();
    for (i, r) in world.replicas.iter().enumerate() {
        let alive = r.proc.is_some();
        let addr = r.http;
        let ok = alive
            && tokio::task::spawn_blocking(move || ready(addr))
                .await
                .unwrap_or(false);
        if !ok {
            f.infra.push(format!(
                "replica {i} ({}) not ready after the quiet period",
                r.id
            ));
        }
    }
    for fl in faults.iter().filter(|fl| fl.failed) {
        f.infra.push(format!("{}: {}", fl.kind.name(), fl.note));
    }
    if !warm_ok {
        f.infra
            .push("not every device came online within 30 s of the start".into());
    }

    // Final: retained snapshot and API, while the devices keep their phase.
    let fin_at = now_ms();
    let mut fin = Final {
        retained: HashMap::new(),
        api: HashMap::new(),
        at: fin_at,
    };
    match recorder(port, &format!("soak-late-{}", o.seed), false, index.clone()).await {
        Some(late) => {
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let n = lock(&late.seen).len();
                if n >= KEEPERS + SLEEPERS || tokio::time::Instant::now() > until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            for s in lock(&late.seen).iter() {
                let e = fin.retained.entry(s.dev).or_insert((s.seq, s.online));
                if s.seq > e.0 {
                    *e = (s.seq, s.online);
                }
            }
        }
        None => f.infra.push("the late subscriber got no SubAck".into()),
    }
    let mut api_addr = None;
    for a in world.replicas.iter().map(|r| r.http) {
        if tokio::task::spawn_blocking(move || ready(a))
            .await
            .unwrap_or(false)
        {
            api_addr = Some(a);
            break;
        }
    }
    match api_addr {
        Some(addr) => {
            let budget = tokio::time::Instant::now() + Duration::from_secs(90);
            for i in 0..KEEPERS + SLEEPERS {
                if tokio::time::Instant::now() > budget {
                    break;
                }
                let got = tokio::time::timeout(
                    Duration::from_secs(3),
                    support::get(addr, &format!("/devices/{}", device_id(i))),
                )
                .await;
                let r = match got {
                    Ok(Some((200, body))) => {
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                        match (v["seq"].as_u64(), v["state"].as_str()) {
                            (Some(q), Some(s)) => Ok((q, s == "online")),
                            _ => Err(format!("unreadable record {body}")),
                        }
                    }
                    Ok(Some((code, body))) => Err(format!("HTTP {code} {}", body.trim())),
                    Ok(None) => Err("no answer".into()),
                    Err(_) => Err("timed out".into()),
                };
                fin.api.insert(i, r);
            }
        }
        None => f.infra.push("no replica ready for the API check".into()),
    }

    stop.cancel();
    let mut devs: Vec<Dev> = Vec::new();
    for p in pubs {
        match tokio::time::timeout(Duration::from_secs(10), p).await {
            Ok(Ok(g)) => devs.extend(g),
            _ => f.infra.push("a publisher did not stop".into()),
        }
    }
    devs.sort_by_key(|d| d.idx);
    let seen: Vec<Status> = lock(&rec.seen).clone();
    f.malformed = lock(&rec.malformed).clone();
    drop(rec);
    let complete = devs.len() == KEEPERS + SLEEPERS;
    if complete {
        judge(&devs, &seen, &fin, ttl, o.tol, &mut f);
    } else {
        f.infra
            .push("device records incomplete: no judgement".into());
    }
    drop(world);

    let ctx = Ctx {
        o,
        t0,
        warmup,
        faults_at,
        faults_end,
        fin_at,
        wall: started.elapsed(),
        quiet,
    };
    let text = report(&ctx, &faults, &devs, &seen, &f);
    println!("{text}");
    if let Some(dir) = o.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&o.out, &text) {
        Ok(()) => eprintln!("wrote {}", o.out.display()),
        Err(e) => eprintln!("soak: could not write {}: {e}", o.out.display()),
    }
    i32::from(f.violations() > 0)
}

// === Report ===

struct Ctx<'a> {
    o: &'a Opts,
    t0: u64,
    warmup: u64,
    faults_at: u64,
    faults_end: u64,
    fin_at: u64,
    wall: Duration,
    quiet: Duration,
}

fn machine() -> (String, String) {
    let nproc = std::process::Command::new("nproc")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    (nproc, cpu)
}

fn tool(cmd: &str) -> String {
    std::process::Command::new(cmd)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let t = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&t)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn report(c: &Ctx<'_>, faults: &[FaultLog], devs: &[Dev], seen: &[Status], f: &Findings) -> String {
    let o = c.o;
    let rel = |t: u64| (t as f64 - c.t0 as f64) / 1000.0;
    let ttl = o.ttl.as_millis() as u64;
    let (nproc, cpu) = machine();
    let mut s = String::new();
    let v = f.violations();
    let _ = writeln!(s, "# Fault soak{}\n", if o.quick { " (quick)" } else { "" });
    let _ = writeln!(
        s,
        "**{}**: {v} finding(s).\n",
        if v == 0 { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| command | `{}` |", o.command);
    let _ = writeln!(s, "| seed | {} |", o.seed);
    let _ = writeln!(
        s,
        "| fault phase | {:.0} s, {} faults; then quiet {:.0} s (2 × TTL + margin) |",
        o.duration.as_secs_f64(),
        faults.len(),
        c.quiet.as_secs_f64()
    );
    let _ = writeln!(s, "| wall time | {:.0} s |", c.wall.as_secs_f64());
    let _ = writeln!(
        s,
        "| fleet | {KEEPERS} keepers (heartbeat every TTL/4 throughout), {SLEEPERS} sleepers (every TTL/4 while awake; asleep 2.2–3 × TTL at random times), {PUBLISHERS} QoS 1 publisher connections |"
    );
    let _ = writeln!(s, "| TTL | {} ms; tolerance {} ms |", ttl, o.tol);
    let _ = writeln!(
        s,
        "| servers | {REPLICAS} × `presenced` (release build, shared subscription), each via its own Redis fault proxy; {} with AOF `appendfsync always`; {} with persistence (autosave 1 s) |",
        tool("redis-server"),
        tool("mosquitto").replace("mosquitto version", "mosquitto")
    );
    let _ = writeln!(s, "| machine | nproc {nproc}, {cpu} |");
    let _ = writeln!(
        s,
        "| date | {} |",
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(c.t0))
    );
    let _ = writeln!(
        s,
        "| timeline | warm-up to {:.1} s, faults {:.1}–{:.1} s, final check at {:.1} s |\n",
        rel(c.t0 + c.warmup),
        rel(c.faults_at),
        rel(c.faults_end),
        rel(c.fin_at)
    );

    let _ = writeln!(s, "## Findings\n\n| category | count |\n|---|---|");
    let _ = writeln!(
        s,
        "| false offlines | {} (premature {}, heartbeat inside {}, keeper {}; one offline may be in several) |",
        f.false_offlines.len(),
        f.premature.len(),
        f.stale.len(),
        f.keeper.len()
    );
    let _ = writeln!(s, "| lost offlines | {} |", f.lost.len());
    let _ = writeln!(s, "| seq violations | {} |", f.seq.len());
    let _ = writeln!(
        s,
        "| final disagreements | {} (of {} devices; {} with no expected state, {} not checked by API) |",
        f.finals.len(),
        devs.len(),
        f.ambiguous_final,
        f.unchecked_api
    );
    let _ = writeln!(s, "| malformed statuses | {} |", f.malformed.len());
    let _ = writeln!(s, "| infrastructure failures | {} |\n", f.infra.len());
    for e in &f.infra {
        let _ = writeln!(s, "* infrastructure: {e}");
    }
    if !f.infra.is_empty() {
        s.push('\n');
    }

    // Attribution by time window.
    let window = |fl: &FaultLog| (fl.start, fl.end + ttl + 1000);
    let _ = writeln!(
        s,
        "## False offlines by fault type\n\nA false offline is attributed to every fault whose window (start → end + TTL + 1 s) holds its time (`since`; for a heartbeat inside the offline, that heartbeat's PUBACK).\n\n| fault type | faults | false offlines in its windows |\n|---|---|---|"
    );
    let mut kinds: Vec<Kind> = faults.iter().map(|fl| fl.kind).collect();
    kinds.sort();
    kinds.dedup();
    for k in &kinds {
        let n = f
            .false_offlines
            .iter()
            .filter(|x| {
                faults.iter().filter(|fl| fl.kind == *k).any(|fl| {
                    let (a, b) = window(fl);
                    (a..=b).contains(&x.2)
                })
            })
            .count();
        let _ = writeln!(
            s,
            "| {} | {} | {n} |",
            k.name(),
            faults.iter().filter(|fl| fl.kind == *k).count()
        );
    }
    let outside = f
        .false_offlines
        .iter()
        .filter(|x| {
            !faults.iter().any(|fl| {
                let (a, b) = window(fl);
                (a..=b).contains(&x.2)
            })
        })
        .count();
    let _ = writeln!(s, "| (no fault window) | – | {outside} |\n");

    let _ = writeln!(s, "## Faults\n\n| # | fault | replica | start (s) | end (s) | note |\n|---|---|---|---|---|---|");
    for (i, fl) in faults.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.1} | {} |",
            i + 1,
            fl.kind.name(),
            fl.target
                .map(|t| t.to_string())
                .unwrap_or_else(|| "–".into()),
            rel(fl.start),
            rel(fl.end),
            fl.note
        );
    }
    s.push('\n');

    let attempts: usize = devs.iter().map(|d| d.attempts.len()).sum();
    let acked: usize = devs
        .iter()
        .map(|d| d.attempts.iter().filter(|a| a.acked.is_some()).count())
        .sum();
    let offline_seen = seen.iter().filter(|x| !x.online).count();
    let _ = writeln!(s, "## Traffic\n");
    let _ = writeln!(
        s,
        "* heartbeats published: {attempts}, acknowledged (PUBACK): {acked}"
    );
    let _ = writeln!(
        s,
        "* statuses received by the recorder (persistent session): {} ({} offline), {} delivered out of seq order",
        seen.len(),
        offline_seen,
        f.out_of_order
    );
    let _ = writeln!(
        s,
        "* keeper offlines excused by the keeper's own silence over a TTL (publisher cut off by a broker restart): {}\n",
        f.excused_keepers
    );

    let _ = writeln!(
        s,
        "## Examples (up to 10 per category; times in s from the start)\n"
    );
    let ex = |s: &mut String, title: &str, lines: Vec<String>| {
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(s, "**{title}**\n");
        for l in lines.iter().take(10) {
            let _ = writeln!(s, "* {l}");
        }
        s.push('\n');
    };
    let hb = |d: usize, around: u64| -> String {
        let Some(dev) = devs.get(d) else {
            return String::new();
        };
        let near: Vec<String> = dev
            .attempts
            .iter()
            .filter(|a| a.sent + 2 * ttl >= around && a.sent <= around + 2 * ttl)
            .map(|a| match a.acked {
                Some(k) => format!("{:.2}", rel(k)),
                None => format!("{:.2}(no ack)", rel(a.sent)),
            })
            .collect();
        format!("heartbeats acked near it: [{}]", near.join(", "))
    };
    ex(
        &mut s,
        "premature offlines (an acknowledged heartbeat sent less than TTL before `since`)",
        f.premature
            .iter()
            .map(|&(d, q, since)| {
                format!(
                    "{} seq {q} offline since {:.2}; {}",
                    device_id(d),
                    rel(since),
                    hb(d, since)
                )
            })
            .collect(),
    );
    ex(
        &mut s,
        "offlines with an acknowledged heartbeat inside (before the next online, minus the tolerance)",
        f.stale
            .iter()
            .map(|&(d, q, since, ack)| {
                format!("{} seq {q} offline since {:.2}, heartbeat acked at {:.2}; {}", device_id(d), rel(since), rel(ack), hb(d, since))
            })
            .collect(),
    );
    ex(
        &mut s,
        "keeper offlines",
        f.keeper
            .iter()
            .map(|&(d, q, since)| {
                format!("{} seq {q} offline since {:.2}", device_id(d), rel(since))
            })
            .collect(),
    );
    ex(
        &mut s,
        "lost offlines (silence with no offline inside)",
        f.lost
            .iter()
            .map(|&(d, a, b)| {
                format!(
                    "{} silent {:.2} → {:.2} ({:.1} s)",
                    device_id(d),
                    rel(a),
                    rel(b),
                    (b - a) as f64 / 1000.0
                )
            })
            .collect(),
    );
    ex(
        &mut s,
        "seq violations",
        f.seq.iter().map(|x| x.1.clone()).collect(),
    );
    ex(
        &mut s,
        "final disagreements",
        f.finals.iter().map(|x| x.1.clone()).collect(),
    );
    ex(&mut s, "malformed statuses", f.malformed.clone());

    let _ = writeln!(
        s,
        "## How it judges\n\n\
Every heartbeat has a send time and, if the broker acknowledged it, a PUBACK time; only acknowledged heartbeats count as evidence of presence, and any attempt (acknowledged or not) counts as possible presence. Statuses are every `devices/+/status` message a persistent-session subscriber received, plus the retained ones a fresh subscriber gets at the end.\n\n\
* **False offline**: an offline status (per device and seq) that is *premature* (an acknowledged heartbeat sent before its `since` and less than TTL − tolerance before it: the deadline was later), or has an acknowledged heartbeat *inside* it (sent at or after `since`, PUBACK more than the tolerance before the next online's `since`, or no next online), or belongs to a *keeper* (unless the keeper's own publisher was silent for over TTL − tolerance around it, e.g. cut off by a broker restart: counted as excused above).\n\
* **Lost offline**: a provable silence (from the latest possible arrival of one heartbeat to the next send, or to the final check) longer than TTL + tolerance (+ 2 s for the final one) with no offline whose `since` falls inside it.\n\
* **Seq violation**: per device the distinct seqs seen must be 1, 2, 3, … with no gap, odd seqs online, even offline, and one seq never seen with two contents.\n\
* **Final disagreement**: after the quiet period, per device: the retained status (fresh subscriber), the HTTP API `/devices/{{id}}` of a ready replica, and the state expected from the device's own heartbeats (online if one may have arrived within TTL − tolerance, offline if none was sent for TTL + tolerance + 2 s) must agree, and the retained seq must not be older than one seen.\n\
* **Infrastructure failure**: a replica or server that did not come back, a proxy that did not switch, a replica not ready at the end.\n\n\
Replica logs (at `PRESENCED_TEST_RUST_LOG`, default `warn`) are in `$TMPDIR/presenced-soak-<seed>/` unless `PRESENCED_TEST_LOG_DIR` says otherwise."
    );
    s
}
