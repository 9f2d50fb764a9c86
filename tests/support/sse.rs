//! A Server-Sent Events client for `/events`: raw HTTP/1.0 over TCP (the body then ends
//! when the server closes), events parsed as they arrive and kept in order.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::wait::eventually;

/// One event as received.
#[derive(Clone, Debug, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    /// `(device, seq, state)` of a status event.
    pub fn status(&self) -> (String, u64, String) {
        let v = self.json();
        (
            v["device"].as_str().unwrap_or_default().to_owned(),
            v["seq"].as_u64().unwrap_or(0),
            v["state"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

#[derive(Default)]
struct Seen {
    status: u16,
    headers: String,
    events: Vec<SseEvent>,
    /// The latest `id` the server sent (events, and id-only frames: the client's place).
    place: String,
    comments: usize,
    ended: bool,
}

/// A client following `/events`; stops reading when dropped.
pub struct SseClient {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SseClient {
    /// Connects to `path` (e.g. `/events?device=x`) with extra request headers.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        send_request(&mut stream, path, headers).await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn(read(stream, seen.clone()));
        let client = SseClient { seen, task };
        // A stream is followed once its first place arrives (the session has joined the
        // feed, and caught up if it resumed); a refusal has no stream.
        eventually("the response head and the client's place", || async {
            let s = client.seen.lock().unwrap();
            (s.status != 0 && (s.status != 200 || !s.place.is_empty() || s.ended)).then_some(())
        })
        .await;
        client
    }

    /// The response status (0 until the head arrived).
    pub fn status(&self) -> u16 {
        self.seen.lock().unwrap().status
    }

    pub fn headers(&self) -> String {
        self.seen.lock().unwrap().headers.clone()
    }

    pub fn events(&self) -> Vec<SseEvent> {
        self.seen.lock().unwrap().events.clone()
    }

    pub fn statuses(&self) -> Vec<SseEvent> {
        self.of_kind("status")
    }

    pub fn of_kind(&self, kind: &str) -> Vec<SseEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.event == kind)
            .collect()
    }

    pub fn comments(&self) -> usize {
        self.seen.lock().unwrap().comments
    }

    /// Whether the server ended the stream.
    pub fn ended(&self) -> bool {
        self.seen.lock().unwrap().ended
    }

    /// Waits until at least `n` status events arrived.
    pub async fn wait_statuses(&self, n: usize) {
        eventually(&format!("{n} status events"), || async {
            (self.statuses().len() >= n).then_some(())
        })
        .await;
    }
}

async fn send_request(stream: &mut TcpStream, path: &str, headers: &[(&str, &str)]) {
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
}

async fn read(stream: TcpStream, seen: Arc<Mutex<Seen>>) {
    let mut lines = BufReader::new(stream).lines();
    let mut head = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.is_empty() {
            break;
        }
        head.push_str(&line);
        head.push('\n');
    }
    {
        let mut s = seen.lock().unwrap();
        s.status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        s.headers = head;
    }
    let mut event = SseEvent {
        event: String::new(),
        id: String::new(),
        data: String::new(),
    };
    while let Ok(Some(line)) = lines.next_line().await {
        let mut s = seen.lock().unwrap();
        if line.is_empty() {
            if !event.event.is_empty() || !event.data.is_empty() {
                s.events.push(std::mem::replace(
                    &mut event,
                    SseEvent {
                        event: String::new(),
                        id: String::new(),
                        data: String::new(),
                    },
                ));
            }
        } else if line.starts_with(':') {
            s.comments += 1;
        } else if let Some(v) = line.strip_prefix("event: ") {
            event.event = v.to_owned();
        } else if let Some(v) = line.strip_prefix("id: ") {
            event.id = v.to_owned();
            s.place = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            event.data = v.to_owned();
        }
    }
    seen.lock().unwrap().ended = true;
}

/// A client that asks for `/events` and then never reads: a small receive buffer, so the
/// server's side fills after a few hundred KiB. Returns the socket (keep it alive).
pub async fn stalled_client(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    send_request(&mut stream, path, &[]).await;
    stream
}

/// Whether the server closed `stream`: reads what is buffered until EOF or an error, for at
/// most the harness's patience.
pub async fn closed_by_server(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1 << 16];
    let give_up = tokio::time::Instant::now() + super::wait::patience();
    loop {
        match tokio::time::timeout_at(give_up, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}
