//! A Unix stream socket split into a reader and a writer, registered with the reactor for
//! reads only: the transport to a node on this host ([`super::local_socket_name`]).
//!
//! Why not tokio's `UnixStream`: it registers every socket for writability too, and a Unix
//! socket signals "writable" each time its peer *reads* (the kernel frees the sent data and
//! wakes whoever polls for room). With epoll that is one more wake-up of the writing process
//! per message it sends, for nothing: about a quarter of a gateway's and a node's wake-ups
//! at QD1 (BENCHMARKS.md, session 8). TCP signals room only to a writer that ran out of it.
//! Here the writer writes straight away and registers for writability only while a write waits
//! for room (the peer not reading), on a duplicate of the descriptor, dropped as soon as the
//! write goes through.

use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The read half.
pub struct LocalReader {
    sock: Arc<AsyncFd<UnixStream>>,
    /// Reads that found nothing to read (a `recv` that failed with EAGAIN).
    #[cfg(test)]
    empty_reads: usize,
}

/// The write half.
pub struct LocalWriter {
    sock: Arc<AsyncFd<UnixStream>>,
    /// Registered for writability while a write waits for room, `None` otherwise.
    room: Option<AsyncFd<UnixStream>>,
    /// Writes that had to wait for room.
    #[cfg(test)]
    waits: usize,
}

/// Splits a connected stream (any blocking mode; it is made non-blocking) into its halves.
/// Must run inside a tokio runtime.
pub fn split(sock: UnixStream) -> io::Result<(LocalReader, LocalWriter)> {
    sock.set_nonblocking(true)?;
    let sock = Arc::new(register(sock, Interest::READABLE)?);
    Ok((
        LocalReader {
            sock: sock.clone(),
            #[cfg(test)]
            empty_reads: 0,
        },
        LocalWriter {
            sock,
            room: None,
            #[cfg(test)]
            waits: 0,
        },
    ))
}

fn register(sock: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the stream owns its descriptor and keeps it open, the same one, until it is
    // dropped, which is when the AsyncFd holding it is.
    unsafe { AsyncFd::register_with_interest(sock, interest) }
        .map_err(|e| io::Error::other(e.to_string()))
}

impl AsyncRead for LocalReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.sock.poll_read_ready(cx))?;
            // SAFETY: only `recv` writes into these bytes, and `assume_init` below covers just
            // the ones it wrote.
            let unfilled = unsafe { buf.unfilled_mut() };
            let got = guard.try_io(|s| {
                // SAFETY: `recv` writes at most `unfilled.len()` bytes into the buffer, which
                // outlives the call, and reads nothing from it.
                let n = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                        0,
                    )
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match got {
                Ok(Ok(n)) => {
                    // A stream socket's `recv` stops short of the buffer only when it has
                    // emptied the socket's queue (Unix sockets split reads elsewhere only for
                    // messages carrying credentials or descriptors, which no one sends here).
                    // Readiness is then cleared now rather than by the EAGAIN of one more
                    // `recv`: a system call per message saved, as tokio's own sockets do.
                    // Nothing is missed: data arriving after this `recv` is a new edge, and
                    // tokio clears readiness only if no event came since it was reported.
                    if n > 0 && n < unfilled.len() {
                        guard.clear_ready();
                    }
                    // SAFETY: `recv` initialised the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Nothing to read after all: readiness is cleared, wait for the next.
                Err(_would_block) => {
                    #[cfg(test)]
                    {
                        this.empty_reads += 1;
                    }
                    continue;
                }
            }
        }
    }
}

impl LocalWriter {
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        write: impl Fn(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(room) = &self.room {
                let mut guard = ready!(room.poll_write_ready(cx))?;
                match guard.try_io(|s| write(s.get_ref())) {
                    Err(_would_block) => continue,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(done) => {
                        drop(guard);
                        // Room again: stop listening for it.
                        self.room = None;
                        return Poll::Ready(done);
                    }
                }
            }
            match write(self.sock.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Full: wait for room. A registration reports the socket's state at once,
                    // so room made since the failed write is not missed.
                    let dup = self.sock.get_ref().try_clone()?;
                    self.room = Some(register(dup, Interest::WRITABLE)?);
                    #[cfg(test)]
                    {
                        self.waits += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

impl AsyncWrite for LocalWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |mut s| s.write(data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing buffered here: a write is in the socket once it returns.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.sock.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl Drop for LocalWriter {
    /// The write half going away ends the stream for the peer, as a TCP write half does:
    /// the reader half may live on (waiting for the peer's last answers), and without this the
    /// descriptor stayed open on both ends, each waiting for the other to speak first. A
    /// gateway kept three sockets, and each node one, for every NBD client that had come and
    /// gone. The error of a peer already gone is of no use here.
    fn drop(&mut self) {
        let _ = self.sock.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A writer far ahead of its reader waits for room and loses nothing; the reader sees the
    /// end once the writer shuts down.
    #[tokio::test]
    async fn a_full_socket_waits_for_room_and_keeps_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ar, mut aw) = split(a).unwrap();
        let (mut br, _bw) = split(b).unwrap();
        // Far more than a Unix socket buffers (a few hundred KiB).
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(100_000) {
                aw.write_all(piece).await.unwrap();
            }
            assert!(aw.room.is_none(), "no longer listening for room");
            aw.shutdown().await.unwrap();
            aw.waits
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 7000];
        loop {
            let n = br.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            // A slow reader: the writer fills the socket.
            if got.len() % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert!(
            writer.await.unwrap() > 0,
            "the writer never filled the socket"
        );
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes lost or reordered");
    }

    /// A read that empties the socket leaves it waiting for the next message, without one
    /// more `recv` to learn that there is none: a reader answered message by message (a node
    /// at QD1) makes no failed `recv` at all, and still gets every message.
    #[tokio::test]
    async fn a_short_read_needs_no_failed_recv_to_wait() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ar, mut aw) = split(a).unwrap();
        let (mut br, _bw) = split(b).unwrap();
        let (ack, mut acks) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 100];
            for i in 0..200u8 {
                let n = br.read(&mut buf).await.unwrap();
                assert_eq!(&buf[..n], &[i; 10]);
                ack.send(()).unwrap();
                // At once, before the next message is sent: the socket is empty.
            }
            br.empty_reads
        });
        for i in 0..200u8 {
            aw.write_all(&[i; 10]).await.unwrap();
            acks.recv().await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), 0, "failed recvs");
    }

    /// Vectored writes go out whole and in order.
    #[tokio::test]
    async fn vectored_writes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ar, mut aw) = split(a).unwrap();
        let (mut br, _bw) = split(b).unwrap();
        let parts = [
            IoSlice::new(b"head"),
            IoSlice::new(b"er+"),
            IoSlice::new(b"payload"),
        ];
        let n = aw.write_vectored(&parts).await.unwrap();
        assert_eq!(n, 14);
        let mut got = [0u8; 14];
        br.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"header+payload");
    }

    /// Dropping the write half ends the stream for the peer even while this end's read half
    /// lives on; and the peer, ending its side in turn, ends this end's reads: both
    /// descriptors can close. (A data client drops its writer when it is dropped, and its
    /// reader task waits for the node to hang up.)
    #[tokio::test]
    async fn dropping_the_writer_ends_the_stream_both_ways() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut ar, mut aw) = split(a).unwrap();
        let (mut br, bw) = split(b).unwrap();
        aw.write_all(b"last").await.unwrap();
        drop(aw);
        let end = std::time::Duration::from_secs(10);
        let mut got = Vec::new();
        tokio::time::timeout(end, br.read_to_end(&mut got))
            .await
            .expect("the peer never saw the end of the stream")
            .unwrap();
        assert_eq!(got, b"last", "the peer sees the data, then the end");
        drop(bw);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(end, ar.read_to_end(&mut rest))
            .await
            .expect("this end never saw the peer's end")
            .unwrap();
        assert_eq!(n, 0);
    }
}
