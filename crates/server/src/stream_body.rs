//! Streams between blocking code and HTTP bodies: a send stream written
//! by a blocking `Write` becomes a response body, a request body becomes
//! a blocking `Read` for receive (and the other way round in the client).
//!
//! Both sides go through a bounded channel of chunks, so memory stays at a
//! few chunks whatever the stream's size, and a side that goes away (the
//! client hung up, the operation failed) ends the other with an error
//! rather than leaving it blocked: a dropped receiver fails the writer's
//! next write, a dropped sender ends the reader, with an error unless the
//! stream was finished.

use hyper::body::{Body, Bytes, Frame};
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Bytes gathered before a chunk is sent.
const CHUNK: usize = 256 << 10;
/// Chunks in flight.
const DEPTH: usize = 8;

type Chunk = Result<Bytes, io::Error>;

/// A channel of chunks: the writing end for blocking code, the body end
/// for hyper.
pub fn channel() -> (ChannelWriter, ChannelBody) {
    let (tx, rx) = mpsc::channel(DEPTH);
    (
        ChannelWriter {
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
        },
        ChannelBody(rx),
    )
}

/// An HTTP body fed by a [`ChannelWriter`] (or by any sender of chunks).
pub struct ChannelBody(mpsc::Receiver<Chunk>);

impl ChannelBody {
    /// A body fed by `tx`.
    pub fn new() -> (mpsc::Sender<Chunk>, ChannelBody) {
        let (tx, rx) = mpsc::channel(DEPTH);
        (tx, ChannelBody(rx))
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|c| c.map(|r| r.map(Frame::data)))
    }
}

/// Blocking `Write` into a [`ChannelBody`]. Call [`ChannelWriter::finish`]
/// at the end; dropped without it (the stream failed), the body ends with
/// an error, so the other side cannot take a cut stream for a whole one.
pub struct ChannelWriter {
    tx: Option<mpsc::Sender<Chunk>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    /// Sends what is left; the body then ends cleanly.
    pub fn finish(mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.tx = None;
        Ok(())
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        tx.blocking_send(Ok(chunk)).map_err(|_| gone())
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the other side hung up")
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.blocking_send(Err(io::Error::other("the stream failed before its end")));
        }
    }
}

/// Blocking `Read` of chunks sent by an async task (a request body
/// forwarded frame by frame). The sender dropped after its last chunk
/// is the end of the stream; an error chunk fails the read.
pub struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    current: Bytes,
}

impl ChannelReader {
    pub fn new() -> (mpsc::Sender<Chunk>, ChannelReader) {
        let (tx, rx) = mpsc::channel(DEPTH);
        (
            tx,
            ChannelReader {
                rx,
                current: Bytes::new(),
            },
        )
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Forwards `body`'s data frames to `tx` until it ends (or fails: then an
/// error chunk, so the reader does not take a cut body for a whole one).
pub async fn forward<B>(mut body: B, tx: mpsc::Sender<Chunk>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        let chunk = match frame {
            Ok(f) => match f.into_data() {
                Ok(data) => Ok(data),
                Err(_) => continue,
            },
            Err(e) => Err(io::Error::other(format!("the body broke off: {e}"))),
        };
        let failed = chunk.is_err();
        if tx.send(chunk).await.is_err() || failed {
            return;
        }
    }
}
