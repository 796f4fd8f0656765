//! The one writer task of a data connection (both ends use it): frames queued by many tasks
//! go out together, so a connection with many requests in flight makes one system call for
//! a batch of frames, not one per frame.

use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::codec::FramedWrite;

use super::frame::{Frame, FrameCodec, FrameError};
use futures::SinkExt;

/// Bytes a batch may gather before it is written (FramedWrite's own default, 8 KiB, would write
/// every second 4 KiB frame on its own).
const BATCH_BYTES: usize = 256 << 10;

/// Writes the frames of `rx` until every sender is gone or the connection fails.
///
/// After the first frame of a batch the task lets the other tasks the same event made ready (a
/// group commit finishing, a burst of requests read in one go) run first and queue their
/// frames ([`after_tasks_ready_together`]); without that, every frame could cost its own
/// `writev`.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Frame>,
    mut writer: FramedWrite<W, FrameCodec>,
) -> Result<(), FrameError> {
    writer.set_backpressure_boundary(BATCH_BYTES);
    while let Some(f) = rx.recv().await {
        writer.feed(f).await?;
        after_tasks_ready_together().await;
        while let Ok(f) = rx.try_recv() {
            writer.feed(f).await?;
        }
        writer.flush().await?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    /// Counts the writes that reach the "socket".
    #[derive(Clone, Default)]
    struct Counting(Arc<Mutex<Vec<usize>>>);

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.lock().unwrap().push(b.len());
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
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
        let sink = Counting::default();
        let (tx, rx) = mpsc::channel(64);
        let writer = tokio::spawn(write_frames(rx, FramedWrite::new(sink.clone(), FrameCodec)));
        let go = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let (tx, go) = (tx.clone(), go.clone());
            let ready = go.notified_owned();
            tasks.push(tokio::spawn(async move {
                ready.await;
                let f = Frame {
                    header: Bytes::from(vec![i + 1]),
                    payload: Bytes::from(vec![i; 4096]),
                };
                tx.send(f).await.unwrap();
            }));
        }
        tokio::task::yield_now().await;
        go.notify_waiters();
        for t in tasks {
            t.await.unwrap();
        }
        drop(tx);
        writer.await.unwrap().unwrap();
        let writes = sink.0.lock().unwrap().clone();
        assert_eq!(writes.iter().sum::<usize>(), 16 * (8 + 1 + 4096));
        assert!(
            writes.len() <= 2,
            "16 frames took {} writes: {writes:?}",
            writes.len()
        );
    }
}
