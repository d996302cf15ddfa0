//! A gRPC connection's writes, gathered so that the answers ready at about the same time leave in one
//! socket write.
//!
//! tonic runs each HTTP/2 stream on a task of its own, and its connection task writes and flushes whatever
//! frames are queued each time a stream wakes it: under load, nearly one `writev` per answer, and the
//! kernel's loopback send was a fifth of a Check's CPU. [`Batched`] holds written bytes in memory and, the
//! first time the connection asks to flush them, yields once to the runtime: the stream tasks already
//! queued on this worker run first and add their answers, and the next flush writes them all.
//! A yield is one trip through the worker's run queue; with nothing else queued it costs microseconds.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes held before a write goes to the socket without waiting for a flush.
const HOLD: usize = 64 * 1024;

/// A connection whose writes are gathered in memory and sent at the second flush request.
pub struct Batched<IO> {
    io: IO,
    held: Vec<u8>,
    /// How much of `held` the socket has taken.
    sent: usize,
    /// Whether this flush has already yielded once.
    yielded: bool,
}

impl<IO> Batched<IO> {
    /// Wraps an accepted connection.
    pub fn new(io: IO) -> Self {
        Batched {
            io,
            held: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<IO: AsyncWrite + Unpin> Batched<IO> {
    /// Writes what is held to the socket; `Ready(Ok)` once all of it is taken.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<IO: Connected> Connected for Batched<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Batched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Batched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() >= HOLD {
            std::task::ready!(this.poll_send(cx))?;
        }
        let mut taken = 0;
        for buf in bufs {
            this.held.extend_from_slice(buf);
            taken += buf.len();
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(this.poll_send(cx))?;
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn writes_wait_for_the_second_flush_request_and_then_leave_together() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut conn = Batched::new(near);
        conn.write_all(b"first ").await.unwrap();
        conn.write_all(b"second").await.unwrap();
        let mut buf = [0u8; 32];
        let nothing =
            tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut buf));
        assert!(nothing.await.is_err(), "bytes left before a flush");

        // The first flush request yields (waking itself), the second sends.
        let first = poll_fn(|cx| Poll::Ready(Pin::new(&mut conn).poll_flush(cx))).await;
        assert!(first.is_pending());
        conn.flush().await.unwrap();
        let n = far.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"first second");
    }

    #[tokio::test]
    async fn a_full_hold_is_sent_without_a_flush_and_shutdown_sends_the_rest() {
        let (near, mut far) = tokio::io::duplex(4 * HOLD);
        let mut conn = Batched::new(near);
        let chunk = vec![7u8; HOLD];
        conn.write_all(&chunk).await.unwrap();
        conn.write_all(b"tail").await.unwrap();
        let mut got = vec![0u8; HOLD];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, chunk);

        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tail");
    }
}
