//! Runtime glue for connections: a bounded read buffer over any async stream, deadlines, and a
//! single-core read/write split. Protocol logic stays in `http`; this is only bytes and time.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why an I/O step failed.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("timed out")]
    Timeout,
    #[error("connection closed by peer")]
    Eof,
    #[error("buffer limit reached")]
    Full,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Runs `fut` with a deadline.
pub async fn deadline<T>(
    dur: Duration,
    fut: impl std::future::Future<Output = Result<T, IoError>>,
) -> Result<T, IoError> {
    futures_lite::future::or(fut, async {
        glommio::timer::sleep(dur).await;
        Err(IoError::Timeout)
    })
    .await
}

/// A stream with a read buffer that grows on demand up to a caller-given bound.
pub struct BufConn<S> {
    pub io: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> BufConn<S> {
    pub fn new(io: S, initial: usize) -> Self {
        BufConn {
            io,
            buf: vec![0; initial],
            start: 0,
            end: 0,
        }
    }

    /// Bytes read but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes, letting the unconsumed part grow up to `max` bytes. Returns the count
    /// read; `Err(Eof)` when the peer closed, `Err(Full)` when `max` is reached.
    pub async fn fill(&mut self, max: usize) -> Result<usize, IoError> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < max {
                let grown = (self.buf.len() * 2).clamp(1024, max);
                self.buf.resize(grown, 0);
            } else {
                return Err(IoError::Full);
            }
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(IoError::Eof);
        }
        self.end += n;
        Ok(n)
    }

    /// Writes and flushes (a TLS stream holds records until flushed).
    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        Ok(())
    }
}

/// One half of a stream shared by two tasks on the same core. Each poll borrows the stream only
/// for the duration of that poll, so the read task and the write task never overlap. glommio
/// keeps separate read and write sources, so interleaved polls wake the right task.
pub struct Half<S>(pub Rc<RefCell<S>>);

impl<S> Clone for Half<S> {
    fn clone(&self) -> Self {
        Half(self.0.clone())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Half<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }

    /// Half-close: shuts down the write side only.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}
