//! A connection that gives up on a client that stops reading.
//!
//! Owns [`WriteStall`]: a socket wrapper whose writes fail once the peer has taken nothing
//! for [`WRITE_STALL`]. hyper has no write timeout; without one, a client that keeps its
//! connection open with a full receive window holds a connection slot, a task and its
//! buffers forever (an `/events` client that stopped reading, above all).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tracing::warn;

use crate::telemetry::LogLimiter;

static STALLED: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// How long a write may wait for the peer before the connection is dropped.
pub(crate) const WRITE_STALL: Duration = Duration::from_secs(5);

/// `io` whose writes fail with `TimedOut` after [`WRITE_STALL`] without progress.
pub(crate) struct WriteStall<T> {
    io: T,
    /// Armed while a write is pending.
    timer: Option<Pin<Box<Sleep>>>,
    peer: std::net::SocketAddr,
}

impl<T> WriteStall<T> {
    pub(crate) fn new(io: T, peer: std::net::SocketAddr) -> WriteStall<T> {
        WriteStall {
            io,
            timer: None,
            peer,
        }
    }

    /// After a pending write: arms the timer, or fails if it ran out.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timer = self.timer.get_or_insert_with(|| {
            Box::pin(tokio::time::sleep_until(Instant::now() + WRITE_STALL))
        });
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                if let Some(suppressed) = STALLED.check() {
                    warn!(peer = %self.peer, suppressed, "An HTTP client took nothing for 5 s; disconnected.");
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading",
                )))
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            done => {
                self.timer = None;
                done
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            done => {
                self.timer = None;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            done => {
                self.timer = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that never reads: the writer fails after the stall time, not before.
    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_takes_fails_after_the_stall_time() {
        let (a, _b) = tokio::io::duplex(16);
        let mut w = WriteStall::new(a, "127.0.0.1:1".parse().unwrap());
        let started = Instant::now();
        let e = w.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= WRITE_STALL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_keeps_the_connection() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(16);
        let mut w = WriteStall::new(a, "127.0.0.1:1".parse().unwrap());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let mut n = 0;
            while n < 256 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                n += b.read(&mut buf).await.unwrap();
            }
        });
        w.write_all(&[0u8; 256]).await.unwrap();
        reader.await.unwrap();
    }
}
