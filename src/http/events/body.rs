//! The body of an `/events` response: the chunks its session queues, until the session ends.
//!
//! Owns [`ChannelBody`]; it holds the client's slot, so the slot frees when hyper drops the
//! body (the client left) or the session ends the stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

pub(crate) struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    _slot: OwnedSemaphorePermit,
}

impl ChannelBody {
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>, slot: OwnedSemaphorePermit) -> ChannelBody {
        ChannelBody { rx, _slot: slot }
    }

    pub(crate) fn boxed(self) -> BoxBody<Bytes, Infallible> {
        BodyExt::boxed(self)
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}
