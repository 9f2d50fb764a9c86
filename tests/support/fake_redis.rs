//! A stand-in for a Redis older than the monitor supports, which this machine does not have
//! (Debian 12 ships 7.0). It speaks just enough RESP2 to be connected to: HELLO, AUTH, PING,
//! CLIENT, SELECT and INFO (reporting the version it was given); every other command gets
//! an error reply, as a server without it would give. It records the command names it
//! received, so a test can tell how far a client went.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub struct FakeRedis {
    pub port: u16,
    commands: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRedis {
    /// On a free loopback port.
    pub fn start(version: &str) -> FakeRedis {
        Self::start_on(0, version)
    }

    /// On `port` (e.g. where a real Redis was just stopped, to replace it).
    pub fn start_on(port: u16, version: &str) -> FakeRedis {
        // Bound here, so the port is taken when this returns; its own thread and runtime
        // keep it answering while the test blocks on a child process.
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel();
        let (seen, version) = (commands.clone(), version.to_owned());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                tokio::select! {
                    _ = stopped => {}
                    () = accept(listener, seen, version) => {}
                }
            });
            // Dropping the runtime closes every connection.
        });
        FakeRedis {
            port,
            commands,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The names (upper case) of the commands received so far, in order.
    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept(listener: TcpListener, seen: Arc<Mutex<Vec<String>>>, version: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve(stream, seen.clone(), version.clone()));
    }
}

async fn serve(stream: TcpStream, seen: Arc<Mutex<Vec<String>>>, version: String) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    while let Some(args) = read_command(&mut read).await {
        let Some(name) = args.first().map(|a| a.to_ascii_uppercase()) else {
            continue;
        };
        seen.lock().unwrap().push(name.clone());
        let reply = reply(&name, &args[1..], &version);
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn reply(name: &str, args: &[String], version: &str) -> String {
    match name {
        "PING" => match args.first() {
            Some(a) => bulk(a),
            None => "+PONG\r\n".into(),
        },
        "AUTH" | "CLIENT" | "SELECT" => "+OK\r\n".into(),
        "INFO" => bulk(&format!(
            "# Server\r\nredis_version:{version}\r\nredis_git_sha1:00000000\r\n\
             redis_mode:standalone\r\nos:Linux\r\narch_bits:64\r\ntcp_port:6379\r\n"
        )),
        // Redis 6 answers HELLO 2 with a flat map; this server speaks nothing but RESP2.
        "HELLO" => {
            let fields = [
                bulk("server"),
                bulk("redis"),
                bulk("version"),
                bulk(version),
                bulk("proto"),
                ":2\r\n".into(),
                bulk("id"),
                ":1\r\n".into(),
                bulk("mode"),
                bulk("standalone"),
                bulk("role"),
                bulk("master"),
                bulk("modules"),
                "*0\r\n".into(),
            ];
            format!("*{}\r\n{}", fields.len(), fields.concat())
        }
        other => format!(
            "-ERR unknown command '{other}' (this fake Redis {version} knows only a handful)\r\n"
        ),
    }
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

/// One command as a RESP array of bulk strings; `None` when the client left or sent
/// something else.
async fn read_command<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<String>> {
    let n: usize = read_line(r).await?.strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        let len: usize = read_line(r).await?.strip_prefix('$')?.parse().ok()?;
        let mut buf = vec![0; len + 2];
        r.read_exact(&mut buf).await.ok()?;
        buf.truncate(len);
        args.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Some(args)
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_owned()),
    }
}
