//! Locks over block ranges of a chunk: a write holds its blocks exclusively, a read shares
//! them, and operations on disjoint blocks of one chunk run side by side. Conflicting requests
//! are granted in arrival order (no writer starves behind a stream of readers, nor the other
//! way round).
//!
//! A guard is taken before the request waits, so dropping a waiting request (its client went
//! away) withdraws it and lets the ones behind it go.

use std::sync::{Arc, Mutex};

use foldhash::HashMap;
use tokio::sync::Notify;

use super::ChunkId;

#[derive(Default)]
pub struct RangeLocks {
    inner: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    chunks: HashMap<ChunkId, Vec<Entry>>,
    next_id: u64,
}

struct Entry {
    id: u64,
    first: usize,
    end: usize,
    write: bool,
    granted: bool,
    notify: Arc<Notify>,
}

impl Entry {
    fn conflicts(&self, first: usize, end: usize, write: bool) -> bool {
        (self.write || write) && self.first < end && first < self.end
    }
}

/// Holds blocks `first..end` of a chunk until dropped.
pub struct RangeGuard {
    inner: Arc<Mutex<Table>>,
    chunk: ChunkId,
    id: u64,
}

impl RangeLocks {
    /// Locks blocks `first..end` of `chunk`, exclusively for a write.
    pub async fn lock(&self, chunk: ChunkId, first: usize, end: usize, write: bool) -> RangeGuard {
        self.lock_with(chunk, first, end, write, || ()).await
    }

    /// [`RangeLocks::lock`], calling `on_wait` first if the blocks are held by another request
    /// (the engine uses it to have the holder's I/O reported without delay).
    pub async fn lock_with(
        &self,
        chunk: ChunkId,
        first: usize,
        end: usize,
        write: bool,
        on_wait: impl FnOnce(),
    ) -> RangeGuard {
        let notify = Arc::new(Notify::new());
        let (guard, granted) = {
            let mut t = self.inner.lock().expect("range lock table");
            t.next_id += 1;
            let id = t.next_id;
            let queue = t.chunks.entry(chunk).or_default();
            let granted = !queue.iter().any(|e| e.conflicts(first, end, write));
            queue.push(Entry {
                id,
                first,
                end,
                write,
                granted,
                notify: notify.clone(),
            });
            (
                RangeGuard {
                    inner: self.inner.clone(),
                    chunk,
                    id,
                },
                granted,
            )
        };
        if !granted {
            on_wait();
            // `notify_one` keeps a permit if the grant comes before this wait starts.
            notify.notified().await;
        }
        guard
    }

    /// Chunks with a lock held or awaited (for tests: none once everything is dropped).
    pub fn busy_chunks(&self) -> usize {
        self.inner.lock().expect("range lock table").chunks.len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut t = self.inner.lock().expect("range lock table");
        let Some(queue) = t.chunks.get_mut(&self.chunk) else {
            return;
        };
        queue.retain(|e| e.id != self.id);
        if queue.is_empty() {
            t.chunks.remove(&self.chunk);
            return;
        }
        // Grant, in order, every waiter that no earlier request conflicts with.
        for i in 0..queue.len() {
            if queue[i].granted {
                continue;
            }
            let (first, end, write) = (queue[i].first, queue[i].end, queue[i].write);
            if !queue[..i].iter().any(|e| e.conflicts(first, end, write)) {
                queue[i].granted = true;
                queue[i].notify.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const C: ChunkId = ChunkId {
        volume: 1,
        index: 0,
    };

    async fn granted_soon(f: impl std::future::Future<Output = RangeGuard>) -> Option<RangeGuard> {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .ok()
    }

    #[tokio::test]
    async fn disjoint_writes_and_shared_reads_go_together() {
        let l = RangeLocks::default();
        let _a = l.lock(C, 0, 4, true).await;
        let _b = granted_soon(l.lock(C, 4, 8, true)).await.expect("disjoint");
        let _r1 = l.lock(C, 10, 12, false).await;
        let _r2 = granted_soon(l.lock(C, 11, 13, false))
            .await
            .expect("readers share");
        assert!(granted_soon(l.lock(C, 3, 5, false)).await.is_none());
    }

    /// A reader waits behind a waiting writer it conflicts with (arrival order), and all are
    /// granted in turn as guards drop; a withdrawn waiter leaves no trace.
    #[tokio::test]
    async fn fifo_and_withdrawal() {
        let l = Arc::new(RangeLocks::default());
        let r = l.lock(C, 0, 8, false).await;
        let l2 = l.clone();
        let w = tokio::spawn(async move { l2.lock(C, 0, 1, true).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            granted_soon(l.lock(C, 0, 1, false)).await.is_none(),
            "a reader behind a waiting writer waits"
        );
        drop(r);
        let w = w.await.unwrap();
        drop(w);
        assert_eq!(l.busy_chunks(), 0);
    }
}
