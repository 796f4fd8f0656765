//! The one writer task of a data connection (both ends use it): frames queued by many tasks
//! go out together, so a connection with many requests in flight makes one system call for
//! a batch of frames, not one per frame. Payloads go out from where they are (a vectored
//! write of each frame's prefix and header, then its payload): a 4 KiB write is sent to three
//! members without three copies into a send buffer.
//!
//! The batching rests on letting the other ready tasks run first; the two helpers for that
//! ([`after_tasks_ready_together`] for a woken task, [`behind_ready_tasks`] for a running one)
//! live here, and the storage node's io_uring submitter and log use them too.

use std::io::IoSlice;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::frame::{encode_head, Frame, FrameError, PREFIX};

/// Bytes a batch may gather before it is written.
const BATCH_BYTES: usize = 256 << 10;
/// Frames a batch may gather: two buffers each, within the kernel's limit of 1,024 per
/// vectored write (one batch, one system call).
const BATCH_FRAMES: usize = 256;

/// Writes the frames of `rx` to `w` until every sender is gone or the connection fails.
///
/// After the first frame of a batch the task lets the other tasks the same event made ready (a
/// group commit finishing, a burst of requests read in one go) run first and queue their
/// frames ([`after_tasks_ready_together`]); without that, every frame could cost its own
/// `writev`.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Frame>,
    mut w: W,
) -> Result<(), FrameError> {
    let mut batch = Vec::new();
    let mut heads = BytesMut::new();
    while next_batch(
        &mut rx,
        &mut batch,
        BATCH_FRAMES,
        |f| f.payload.len(),
        BATCH_BYTES,
    )
    .await
    {
        write_batch(&mut w, &batch, &mut heads).await?;
        batch.clear();
    }
    Ok(())
}

/// Waits for the next item of `rx` and puts it in `batch`; then, once the tasks the same event
/// made ready have queued theirs ([`after_tasks_ready_together`]), takes what is queued while
/// the batch holds fewer than `max_items` and weighs (the sum of `weight`) less than
/// `max_weight`. Returns false, with `batch` untouched, once every sender is gone.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max_items: usize,
    weight: impl Fn(&T) -> usize,
    max_weight: usize,
) -> bool {
    let Some(first) = rx.recv().await else {
        return false;
    };
    let mut weighs = weight(&first);
    batch.push(first);
    after_tasks_ready_together().await;
    while batch.len() < max_items && weighs < max_weight {
        let Ok(t) = rx.try_recv() else { break };
        weighs += weight(&t);
        batch.push(t);
    }
    true
}

/// Writes `batch` whole: the frames' prefixes and headers gathered in `heads`, each payload
/// from its own buffer.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &[Frame],
    heads: &mut BytesMut,
) -> Result<(), FrameError> {
    heads.clear();
    for f in batch {
        encode_head(f, heads)?;
    }
    let mut slices = Vec::with_capacity(2 * batch.len());
    let mut start = 0;
    for f in batch {
        let end = start + PREFIX + f.header.len();
        slices.push(IoSlice::new(&heads[start..end]));
        if !f.payload.is_empty() {
            slices.push(IoSlice::new(&f.payload));
        }
        start = end;
    }
    write_all_vectored(w, &mut slices).await?;
    Ok(())
}

/// Writes every byte of `slices`, in as few vectored writes as the socket takes (each of at
/// most IOV_MAX, 1,024, buffers), then flushes.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut rest = slices;
    while !rest.is_empty() {
        let n = w.write_vectored(&rest[..rest.len().min(IOV_MAX)]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await
}

/// Returns once the tasks made ready by the event that woke this one have run, so that work
/// they queue for this task (frames to write, I/Os to submit) is taken in one batch.
///
/// On the multi-thread scheduler (daemons with `--threads` > 1) that takes a yield: a task woken
/// by another goes into the waker's LIFO slot and runs straight after it, before the others.
/// The current-thread scheduler (the default) runs its tasks in the order they were woken, so
/// they have run already; a yield there would only cost a turn of the runtime (an `epoll_wait`
/// system call) and, since its yielded tasks resume last-in first-out, could put a submission
/// of in-place writes ahead of the replies waiting to go out.
pub async fn after_tasks_ready_together() {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() != RuntimeFlavor::CurrentThread {
        tokio::task::yield_now().await;
    }
}

/// Returns once the tasks that were ready when it was called have run: for a task that has just
/// queued work of its own (a log record) and would take it in one batch with what they queue.
/// Unlike [`after_tasks_ready_together`], which is for a task *woken* by the event and is free
/// on the current-thread scheduler, this always reschedules: the task wakes itself once, which
/// puts it at the back of the run queue, with no system call. (`tokio::task::yield_now`
/// instead waits for the next poll of the reactor: an `epoll_wait`.) Alone, it runs again at
/// once.
pub async fn behind_ready_tasks() {
    let mut woke = false;
    std::future::poll_fn(|cx| {
        if woke {
            return std::task::Poll::Ready(());
        }
        woke = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::frame::FrameCodec;
    use bytes::Bytes;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use tokio_util::codec::Encoder;

    /// A "socket" that records every write, taking at most `cap` bytes of each.
    #[derive(Clone)]
    struct Recording {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        cap: usize,
    }

    impl Recording {
        fn new(cap: usize) -> Self {
            Self {
                writes: Arc::default(),
                cap,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            self.writes.lock().unwrap().concat()
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(b)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut took = Vec::new();
            for b in bufs {
                let n = b.len().min(self.cap - took.len());
                took.extend_from_slice(&b[..n]);
            }
            let n = took.len();
            self.writes.lock().unwrap().push(took);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn frame(i: u8) -> Frame {
        Frame {
            header: Bytes::from(vec![i.wrapping_add(1); 1 + usize::from(i) % 3]),
            // Every third frame without a payload, like most answers to writes.
            payload: Bytes::from(vec![i; if i.is_multiple_of(3) { 0 } else { 4096 }]),
        }
    }

    fn encoded(frames: impl Iterator<Item = Frame>) -> Vec<u8> {
        let mut b = BytesMut::new();
        for f in frames {
            FrameCodec.encode(f, &mut b).unwrap();
        }
        b.to_vec()
    }

    /// Frames that tasks woken by one event send at once go out in one write, on the
    /// multi-thread scheduler (whose LIFO slot would otherwise run the writer after the first
    /// of them) ...
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn frames_ready_together_go_out_together() {
        sixteen_senders_at_once().await;
    }

    /// ... and on the current-thread one the daemons run by default.
    #[tokio::test(flavor = "current_thread")]
    async fn frames_ready_together_go_out_together_on_one_thread() {
        sixteen_senders_at_once().await;
    }

    async fn sixteen_senders_at_once() {
        let sink = Recording::new(usize::MAX);
        let (tx, rx) = mpsc::channel(64);
        let writer = tokio::spawn(write_frames(rx, sink.clone()));
        let go = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let (tx, go) = (tx.clone(), go.clone());
            let ready = go.notified_owned();
            tasks.push(tokio::spawn(async move {
                ready.await;
                tx.send(frame(i)).await.unwrap();
            }));
        }
        tokio::task::yield_now().await;
        go.notify_waiters();
        for t in tasks {
            t.await.unwrap();
        }
        drop(tx);
        writer.await.unwrap().unwrap();
        let writes = sink.writes.lock().unwrap().len();
        assert!(writes <= 2, "16 frames took {writes} writes");
        // In whatever order the tasks ran, each frame whole.
        let mut sent = BytesMut::from(&sink.bytes()[..]);
        let mut got = Vec::new();
        while let Some(f) = tokio_util::codec::Decoder::decode(&mut FrameCodec, &mut sent).unwrap()
        {
            got.push(f);
        }
        got.sort_by_key(|f| f.header[0]);
        assert_eq!(got, (0..16).map(frame).collect::<Vec<_>>());
    }

    /// A socket taking a few bytes at a time still gets every frame whole and in order; a
    /// batch stops at its size limits and the rest follows.
    /// A batch takes what is queued until it holds `max_items`, or weighs `max_weight` or more;
    /// the rest waits for the next; a closed, empty channel ends it.
    #[tokio::test]
    async fn a_batch_stops_at_its_limits() {
        let (tx, mut rx) = mpsc::channel::<usize>(16);
        for w in [3, 3, 3, 3, 3] {
            tx.send(w).await.unwrap();
        }
        let mut batch = Vec::new();
        assert!(next_batch(&mut rx, &mut batch, 10, |w| *w, 7).await);
        assert_eq!(batch, [3, 3, 3], "stops once it weighs 7 or more");
        batch.clear();
        assert!(next_batch(&mut rx, &mut batch, 1, |w| *w, 100).await);
        assert_eq!(batch, [3], "stops at its item limit");
        batch.clear();
        drop(tx);
        assert!(next_batch(&mut rx, &mut batch, 10, |w| *w, 100).await);
        assert_eq!(batch, [3], "what was queued before the close");
        batch.clear();
        assert!(!next_batch(&mut rx, &mut batch, 10, |w| *w, 100).await);
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn short_writes_and_large_batches() {
        let n = 3 * BATCH_FRAMES as u32;
        for cap in [1000, 4095, 4096 + 8 + 3, usize::MAX] {
            let sink = Recording::new(cap);
            let (tx, rx) = mpsc::channel(n as usize);
            for i in 0..n {
                tx.send(frame(i as u8)).await.unwrap();
            }
            drop(tx);
            write_frames(rx, sink.clone()).await.unwrap();
            assert!(
                sink.bytes() == encoded((0..n).map(|i| frame(i as u8))),
                "bytes differ with writes of at most {cap}"
            );
        }
    }

    /// A frame the protocol cannot carry fails the writer (its connection) rather than go out.
    #[tokio::test]
    async fn an_oversized_frame_fails_the_connection() {
        let sink = Recording::new(usize::MAX);
        let (tx, rx) = mpsc::channel(2);
        tx.send(Frame {
            header: Bytes::from_static(b"h"),
            payload: Bytes::from(vec![0u8; crate::data::frame::MAX_PAYLOAD + 1]),
        })
        .await
        .unwrap();
        drop(tx);
        assert!(matches!(
            write_frames(rx, sink.clone()).await,
            Err(FrameError::PayloadTooLarge(_))
        ));
        assert!(sink.bytes().is_empty());
    }
}
