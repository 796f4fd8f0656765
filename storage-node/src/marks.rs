//! A set of keys persisted in RocksDB, each made durable once — before the first operation that
//! needs it runs — and then kept in memory with a value of its own, so later operations on the
//! key cost nothing. The activity record and the dirty record are two such sets.
//!
//! The synced put runs on a blocking thread, never on the runtime's: with random writes over a
//! large volume most writes reach a key not yet in the set, and an fsync on a runtime thread
//! would stall every connection it serves (one thread by default). Concurrent first operations
//! on one key wait for the one put; puts of different keys are grouped into one sync by RocksDB.

use std::hash::Hash;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use foldhash::HashMap;
use rocksdb::{Options, WriteOptions, DB};

/// Opens (creating) the RocksDB of such a set.
pub fn open_db(dir: &Path) -> anyhow::Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    // Block rather than spin while another thread's synced write is in progress (as in the
    // chunk index: spinning is most of the CPU with many synced writers on few cores).
    opts.set_enable_write_thread_adaptive_yield(false);
    DB::open(&opts, dir).with_context(|| format!("opening {}", dir.display()))
}

/// A key in memory.
pub enum Mark<V> {
    /// On media.
    Durable(V),
    /// Its put is running: nothing that needs the key may run before it is on media. The
    /// sender is dropped when the put ends, which wakes the operations waiting for it.
    Pending(V, tokio::sync::watch::Receiver<()>),
}

impl<V> Mark<V> {
    pub fn value(&self) -> &V {
        match self {
            Mark::Durable(v) | Mark::Pending(v, _) => v,
        }
    }

    fn into_value(self) -> V {
        match self {
            Mark::Durable(v) | Mark::Pending(v, _) => v,
        }
    }
}

pub struct DurableMarks<K, V> {
    pub db: Arc<DB>,
    /// Every key on media or being put, with its value. Removing a key from here and its
    /// record from `db` is the owner's business (settle, clear).
    pub mem: Mutex<HashMap<K, Mark<V>>>,
}

impl<K: Hash + Eq + Copy, V> DurableMarks<K, V> {
    /// Over `db`, with `loaded` the keys it holds (all on media).
    pub fn new(db: DB, loaded: HashMap<K, V>) -> Self {
        let mem = loaded
            .into_iter()
            .map(|(k, v)| (k, Mark::Durable(v)))
            .collect();
        Self {
            db: Arc::new(db),
            mem: Mutex::new(mem),
        }
    }

    /// Applies `update` to the key's value (a new key starts from `init`) and returns once the
    /// key is on media, as `db_key` with an empty value. Nothing is allocated when the key is
    /// already on media (every write but a chunk's first).
    pub async fn mark(
        &self,
        k: K,
        db_key: impl AsRef<[u8]> + Send + 'static,
        init: impl FnOnce() -> V,
        update: impl Fn(&mut V),
    ) -> anyhow::Result<()> {
        let mut init = Some(init);
        let done = loop {
            let mut waiting = {
                let mut m = self.mem.lock().expect("marks lock");
                match m.get_mut(&k) {
                    Some(Mark::Durable(v)) => {
                        update(v);
                        return Ok(());
                    }
                    Some(Mark::Pending(v, rx)) => {
                        update(v);
                        rx.clone()
                    }
                    None => {
                        let mut v = (init.take().expect("a key is new only once"))();
                        update(&mut v);
                        let (tx, rx) = tokio::sync::watch::channel(());
                        m.insert(k, Mark::Pending(v, rx));
                        break tx;
                    }
                }
            };
            // Ends when the put's sender is dropped; the key is then on media, or gone if the
            // put failed — and this operation puts it itself (from a fresh value: the failed
            // put's updates are gone with it, and theirs failed).
            let _ = waiting.changed().await;
        };
        let db = self.db.clone();
        let put = tokio::task::spawn_blocking(move || {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            // On media before the operation runs: a crash after it cannot lose the key.
            db.put_opt(db_key, [], &wo)
        })
        .await;
        let mut m = self.mem.lock().expect("marks lock");
        let result = match put {
            Ok(Ok(())) => {
                if let Some(mark) = m.remove(&k) {
                    m.insert(k, Mark::Durable(mark.into_value()));
                }
                Ok(())
            }
            Ok(Err(e)) => {
                m.remove(&k);
                Err(e.into())
            }
            Err(e) => {
                m.remove(&k);
                Err(anyhow::anyhow!("synced put: {e}"))
            }
        };
        drop(m);
        drop(done);
        result
    }
}
