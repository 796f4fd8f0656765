//! The activity record (DRBD's activity log): the chunks of each volume with writes that may
//! not have reached every member of their group. A client that dies in the middle of writes
//! can leave a chunk different on its members; the next attach reconciles exactly the chunks
//! in this record, before any I/O, so no two replicas ever answer differently (DESIGN.md §5.2).
//!
//! A chunk enters the record — synced to RocksDB — before the first write to it runs; later
//! writes only raise the highest write sequence number seen in memory. The client settles
//! chunks once all its writes to them up to some sequence number completed everywhere; a
//! chunk leaves the record only if no later write arrived meanwhile. Deletions are not synced:
//! a chunk lost from the deletion only costs one extra reconciliation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rocksdb::{Options, WriteOptions, DB};

fn key(volume: u64, chunk: u64) -> [u8; 17] {
    let mut k = [b'a'; 17];
    k[1..9].copy_from_slice(&volume.to_be_bytes());
    k[9..17].copy_from_slice(&chunk.to_be_bytes());
    k
}

pub struct Activity {
    db: DB,
    /// (volume, chunk) → the highest write sequence number seen (0 after a restart).
    mem: Mutex<HashMap<(u64, u64), u64>>,
}

impl Activity {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir).with_context(|| format!("opening {}", dir.display()))?;
        let mut mem = HashMap::new();
        for kv in db.iterator(rocksdb::IteratorMode::Start) {
            let (k, _) = kv?;
            anyhow::ensure!(k.len() == 17 && k[0] == b'a', "malformed activity record");
            let n = |r: std::ops::Range<usize>| u64::from_be_bytes(k[r].try_into().expect("8"));
            mem.insert((n(1..9), n(9..17)), 0);
        }
        Ok(Self {
            db,
            mem: Mutex::new(mem),
        })
    }

    /// A write with sequence number `seq` is about to run on the chunk.
    pub fn mark(&self, volume: u64, chunk: u64, seq: u64) -> anyhow::Result<()> {
        let mut m = self.mem.lock().expect("activity lock");
        if let Some(s) = m.get_mut(&(volume, chunk)) {
            *s = (*s).max(seq);
            return Ok(());
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        // On media before the write runs: a crash after it cannot hide the chunk.
        self.db.put_opt(key(volume, chunk), [], &wo)?;
        m.insert((volume, chunk), seq);
        Ok(())
    }

    pub fn list(&self, volume: u64) -> Vec<u64> {
        let m = self.mem.lock().expect("activity lock");
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
        let mut m = self.mem.lock().expect("activity lock");
        let mut batch = rocksdb::WriteBatch::default();
        for &(chunk, seq) in chunks {
            if m.get(&(volume, chunk)).is_some_and(|s| *s <= seq) {
                m.remove(&(volume, chunk));
                batch.delete(key(volume, chunk));
            }
        }
        self.db.write(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_reopen_and_settle_only_up_to_their_seq() {
        let dir = tempfile::tempdir().unwrap();
        {
            let a = Activity::open(dir.path()).unwrap();
            a.mark(1, 5, 10).unwrap();
            a.mark(1, 5, 12).unwrap();
            a.mark(1, 6, 11).unwrap();
            a.mark(2, 5, 13).unwrap();
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
}
