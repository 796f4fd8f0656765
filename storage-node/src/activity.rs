//! The activity record (DRBD's activity log): the chunks of each volume with writes that may
//! not have reached every member of their group. A client that dies in the middle of writes
//! can leave a chunk different on its members; the next attach reconciles exactly the chunks
//! in this record, before any I/O, so no two replicas ever answer differently (DESIGN.md §5.2).
//!
//! A chunk enters the record — synced to RocksDB — before the first write to it runs; later
//! writes only raise the highest write sequence number seen in memory. The client settles
//! chunks once all its writes to them up to some sequence number completed everywhere; a
//! chunk leaves the record only if no later write arrived meanwhile. Deletions are not synced:
//! a chunk lost from the deletion only costs one extra reconciliation. The put runs off the
//! runtime's threads ([`crate::marks`]).

use std::path::Path;

use foldhash::{HashMap, HashMapExt};

use crate::marks::{self, DurableMarks, Mark};

fn key(volume: u64, chunk: u64) -> [u8; 17] {
    let mut k = [b'a'; 17];
    k[1..9].copy_from_slice(&volume.to_be_bytes());
    k[9..17].copy_from_slice(&chunk.to_be_bytes());
    k
}

pub struct Activity {
    /// (volume, chunk) → the highest write sequence number seen (0 after a restart).
    marks: DurableMarks<(u64, u64), u64>,
}

impl Activity {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let db = marks::open_db(dir)?;
        let mut loaded = HashMap::new();
        for kv in db.iterator(rocksdb::IteratorMode::Start) {
            let (k, _) = kv?;
            anyhow::ensure!(k.len() == 17 && k[0] == b'a', "malformed activity record");
            let n = |r: std::ops::Range<usize>| u64::from_be_bytes(k[r].try_into().expect("8"));
            loaded.insert((n(1..9), n(9..17)), 0);
        }
        Ok(Self {
            marks: DurableMarks::new(db, loaded),
        })
    }

    /// A write with sequence number `seq` is about to run on the chunk: returns once the chunk
    /// is in the record on media.
    pub async fn mark(&self, volume: u64, chunk: u64, seq: u64) -> anyhow::Result<()> {
        self.marks
            .mark(
                (volume, chunk),
                key(volume, chunk),
                || seq,
                |s| *s = (*s).max(seq),
            )
            .await
    }

    pub fn list(&self, volume: u64) -> Vec<u64> {
        let m = self.marks.mem.lock().expect("activity lock");
        let mut v: Vec<u64> = m
            .keys()
            .filter(|(vol, _)| *vol == volume)
            .map(|(_, c)| *c)
            .collect();
        v.sort_unstable();
        v
    }

    /// Chunks whose writes up to the given sequence numbers completed everywhere.
    pub fn settle(&self, volume: u64, chunks: &[(u64, u64)]) -> anyhow::Result<()> {
        let mut m = self.marks.mem.lock().expect("activity lock");
        let mut batch = rocksdb::WriteBatch::default();
        for &(chunk, seq) in chunks {
            // A chunk whose put is still running has a write about to run: it stays.
            if matches!(m.get(&(volume, chunk)), Some(Mark::Durable(s)) if *s <= seq) {
                m.remove(&(volume, chunk));
                batch.delete(key(volume, chunk));
            }
        }
        self.marks.db.write(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marks_survive_a_reopen_and_settle_only_up_to_their_seq() {
        let dir = tempfile::tempdir().unwrap();
        {
            let a = Activity::open(dir.path()).unwrap();
            a.mark(1, 5, 10).await.unwrap();
            a.mark(1, 5, 12).await.unwrap();
            a.mark(1, 6, 11).await.unwrap();
            a.mark(2, 5, 13).await.unwrap();
            // A write after the settle's seq keeps the chunk.
            a.settle(1, &[(5, 11), (6, 11)]).unwrap();
            assert_eq!(a.list(1), vec![5]);
        }
        let a = Activity::open(dir.path()).unwrap();
        assert_eq!(a.list(1), vec![5]);
        assert_eq!(a.list(2), vec![5]);
        a.settle(1, &[(5, u64::MAX)]).unwrap();
        assert_eq!(a.list(1), Vec::<u64>::new());
    }

    /// A settle arriving while a chunk's first mark is still being put leaves the chunk in the
    /// record (its write has not run yet); concurrent first writes to one chunk all wait for
    /// the same put.
    #[test]
    fn a_mark_in_progress_is_not_settled() {
        // One blocking thread, taken by `held` until the test lets it go: the first mark's put
        // queues behind it, so it is still running when the settle arrives. (Without the hold,
        // a put finishing before the first poll returned, on a busy machine, failed the test.)
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        rt.block_on(a_mark_in_progress_is_not_settled_on_one_blocking_thread());
    }

    async fn a_mark_in_progress_is_not_settled_on_one_blocking_thread() {
        let dir = tempfile::tempdir().unwrap();
        let a = Activity::open(dir.path()).unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let hold = tokio::task::spawn_blocking(move || held.recv());
        {
            let mut first = std::pin::pin!(a.mark(1, 9, 5));
            assert!(futures::poll!(first.as_mut()).is_pending());
            let mut second = std::pin::pin!(a.mark(1, 9, 6));
            assert!(futures::poll!(second.as_mut()).is_pending());
            a.settle(1, &[(9, u64::MAX)]).unwrap();
            assert_eq!(a.list(1), vec![9], "settled while its put was running");
            release.send(()).unwrap();
            first.await.unwrap();
            second.await.unwrap();
        }
        hold.await.unwrap().unwrap();
        assert_eq!(a.list(1), vec![9]);
        // Durable now with seq 6: a settle up to 5 keeps it, up to 6 removes it.
        a.settle(1, &[(9, 5)]).unwrap();
        assert_eq!(a.list(1), vec![9]);
        a.settle(1, &[(9, 6)]).unwrap();
        assert_eq!(a.list(1), Vec::<u64>::new());
        drop(a);
        assert_eq!(
            Activity::open(dir.path()).unwrap().list(1),
            Vec::<u64>::new()
        );
    }
}
