//! A TCP proxy on loopback that a test switches between passing, refusing, black-holing and
//! delaying traffic, to put a network fault between the monitor and a real server.
//!
//! It runs on its own thread with its own tokio runtime, so any test (whatever its runtime
//! flavor, or none) can use it, and a test thread that blocks does not stall the traffic.
//! Memory is bounded: each direction of a connection holds at most [`QUEUED`] chunks of at
//! most [`CHUNK`] bytes, and black-holed bytes are read and discarded, never kept.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

const CHUNK: usize = 16 * 1024;
const QUEUED: usize = 16;

/// What the proxy does with traffic, from the moment [`FaultProxy::set`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Close every connection and the listening socket: connecting fails with
    /// ECONNREFUSED until the next other mode re-binds the same port.
    Refuse,
    /// Keep connections open (and accept new ones) but drop every byte both ways, like a
    /// network partition: the peers only notice by timing out. A connection that saw a
    /// black hole stays broken after the proxy passes again, as after a real partition.
    Blackhole,
    /// Forward each chunk after this delay, in order.
    Delay(Duration),
    /// Forward in order at most this many bytes per second each way, like a slow link: a
    /// backlog takes a known least time to cross, however fast the machine is.
    Throttle(u32),
}

type Reply = std::sync::mpsc::Sender<std::io::Result<()>>;

/// A fault-injecting proxy to `upstream`; stops (closing every connection) on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    commands: Option<mpsc::UnboundedSender<(Mode, Reply)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port, in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let (commands, rx) = mpsc::unbounded_channel();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{upstream}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
                    let _ = bound_tx.send(listener.local_addr().expect("proxy address"));
                    control(listener, upstream, rx).await;
                });
            })
            .expect("proxy thread");
        let addr = bound_rx.recv().expect("proxy started");
        FaultProxy {
            addr,
            commands: Some(commands),
            thread: Some(thread),
        }
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode; when this returns it is in force (for `Refuse`: the listener and
    /// every connection are closed; leaving `Refuse`: the port is listening again).
    pub fn set(&self, mode: Mode) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands
            .as_ref()
            .expect("proxy running")
            .send((mode, tx))
            .expect("proxy thread alive");
        rx.recv()
            .expect("proxy thread alive")
            .unwrap_or_else(|e| panic!("proxy on {} could not switch to {mode:?}: {e}", self.addr));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Closing the command channel ends the control loop; dropping the runtime then drops
        // every connection task and its sockets.
        self.commands.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections and applies mode switches, one at a time.
async fn control(
    listener: TcpListener,
    upstream: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<(Mode, Reply)>,
) {
    let addr = listener.local_addr().expect("proxy address");
    let mut listener = Some(listener);
    let (mode, _) = watch::channel(Mode::Pass);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some((new, reply)) = cmd else { return };
                mode.send_replace(new);
                let result = if new == Mode::Refuse {
                    listener = None;
                    conns.shutdown().await;
                    Ok(())
                } else if listener.is_none() {
                    rebind(addr).await.map(|l| listener = Some(l))
                } else {
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Ok(client) = accept(listener.as_ref()) => {
                conns.spawn(connection(client, upstream, mode.subscribe()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Binds the port again (std and tokio set SO_REUSEADDR, so closed connections in
/// TIME_WAIT do not block it); retries briefly in case a connect attempt races the bind.
async fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tries >= 50 => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    if *mode.borrow() == Mode::Blackhole {
        // Accepted, but nothing reaches the upstream (not even a connect).
        let mut buf = vec![0; CHUNK];
        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the upstream is down: the client sees its connection closed
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let broken = Arc::new(AtomicBool::new(false));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(
        pipe(cr, sw, mode.clone(), broken.clone()),
        pipe(sr, cw, mode, broken),
    );
}

/// One direction: a reader that stamps each chunk with when it may be forwarded (or drops
/// it), and a writer that forwards the chunks in order at their time.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mode: watch::Receiver<Mode>,
    broken: Arc<AtomicBool>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED);
    // The reader owns `tx`: once it returns, the writer forwards what is queued and ends.
    let read = {
        let (mode, broken) = (mode.clone(), broken.clone());
        async move {
            // When the throttled link is free again.
            let mut free = Instant::now();
            loop {
                let mut buf = vec![0; CHUNK];
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let at = match *mode.borrow() {
                    Mode::Delay(d) => Instant::now() + d,
                    Mode::Throttle(bytes_per_s) => {
                        let cost =
                            Duration::from_secs_f64(n as f64 / f64::from(bytes_per_s.max(1)));
                        free = free.max(Instant::now()) + cost;
                        free
                    }
                    Mode::Blackhole => {
                        broken.store(true, Ordering::SeqCst);
                        continue;
                    }
                    Mode::Pass | Mode::Refuse => Instant::now(),
                };
                if broken.load(Ordering::SeqCst) {
                    continue;
                }
                buf.truncate(n);
                if tx.send((at, buf)).await.is_err() {
                    return;
                }
            }
        }
    };
    let write = async {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            // A partition that began while the chunk waited drops it too.
            if *mode.borrow() == Mode::Blackhole {
                broken.store(true, Ordering::SeqCst);
            }
            if broken.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buf).await.is_err() {
                return;
            }
        }
        // The reader saw EOF: pass the half-close on, unless a partition would hide it.
        if !broken.load(Ordering::SeqCst) {
            let _ = to.shutdown().await;
        }
    };
    tokio::join!(read, write);
}
