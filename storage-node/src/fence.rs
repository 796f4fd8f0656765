//! Fencing: the highest volume generation and group epoch this node has seen, persisted.
//!
//! A request carrying an older generation (a volume's previous holder, after a takeover) or an
//! older group epoch (a member removed from the group) is refused before it touches data. A
//! newer one raises the mark, durably, before the request is executed, so no restart can let
//! an older holder back in (DESIGN.md §5.3).

use std::path::Path;
use std::sync::Mutex;

use foldhash::{HashMap, HashMapExt};
use rocksdb::{Options, WriteOptions, DB};

pub struct Fence {
    db: DB,
    generations: Mutex<HashMap<u64, u64>>,
    epochs: Mutex<HashMap<u64, u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    #[error("volume {volume}: generation {got} is older than {current}: this client was fenced by a newer attach")]
    Generation { volume: u64, got: u64, current: u64 },
    #[error("group {group}: epoch {got} is older than {current}: the group's membership changed")]
    Epoch { group: u64, got: u64, current: u64 },
}

fn key(prefix: u8, id: u64) -> [u8; 9] {
    let mut k = [prefix; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

impl Fence {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir)?;
        let (mut g, mut e) = (HashMap::new(), HashMap::new());
        for kv in db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = kv?;
            anyhow::ensure!(k.len() == 9 && v.len() == 8, "malformed fence record");
            let id = u64::from_be_bytes(k[1..].try_into()?);
            let val = u64::from_be_bytes(v[..].try_into()?);
            match k[0] {
                b'g' => g.insert(id, val),
                b'e' => e.insert(id, val),
                _ => anyhow::bail!("unknown fence record"),
            };
        }
        Ok(Self {
            db,
            generations: Mutex::new(g),
            epochs: Mutex::new(e),
        })
    }

    fn raise(
        &self,
        map: &Mutex<HashMap<u64, u64>>,
        prefix: u8,
        id: u64,
        got: u64,
    ) -> Result<(), (u64, u64)> {
        if got == 0 {
            return Ok(()); // no fencing token: reads and recovery copies only (checked upstream)
        }
        let mut m = map.lock().expect("fence lock");
        let current = m.get(&id).copied().unwrap_or(0);
        if got < current {
            return Err((got, current));
        }
        if got > current {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            // Synced before the request runs: after a restart the mark is still here.
            if let Err(e) = self.db.put_opt(key(prefix, id), got.to_be_bytes(), &wo) {
                tracing::error!(error = %e, "cannot persist a fencing mark; refusing the request");
                return Err((got, u64::MAX));
            }
            m.insert(id, got);
        }
        Ok(())
    }

    /// Admits a request with this generation and epoch, raising the marks if they are newer.
    pub fn admit(
        &self,
        volume: u64,
        generation: u64,
        group: u64,
        epoch: u64,
    ) -> Result<(), Fenced> {
        self.raise(&self.generations, b'g', volume, generation)
            .map_err(|(got, current)| Fenced::Generation {
                volume,
                got,
                current,
            })?;
        self.raise(&self.epochs, b'e', group, epoch)
            .map_err(|(got, current)| Fenced::Epoch {
                group,
                got,
                current,
            })
    }

    /// Raises the marks to what the metadata service says is current (never lowers them).
    pub fn learn(&self, generations: &[(u64, u64)], epochs: &[(u64, u64)]) {
        for &(volume, g) in generations {
            let _ = self.raise(&self.generations, b'g', volume, g);
        }
        for &(group, e) in epochs {
            let _ = self.raise(&self.epochs, b'e', group, e);
        }
    }

    /// The highest generation seen for a volume.
    pub fn generation(&self, volume: u64) -> u64 {
        self.generations
            .lock()
            .expect("fence lock")
            .get(&volume)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Older generations and epochs are refused; newer ones raise the mark, across a reopen.
    #[test]
    fn fencing_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let f = Fence::open(dir.path()).unwrap();
            f.admit(1, 3, 10, 2).unwrap();
            f.admit(1, 4, 10, 2).unwrap();
            assert_eq!(
                f.admit(1, 3, 10, 2),
                Err(Fenced::Generation {
                    volume: 1,
                    got: 3,
                    current: 4
                })
            );
            assert_eq!(
                f.admit(1, 4, 10, 1),
                Err(Fenced::Epoch {
                    group: 10,
                    got: 1,
                    current: 2
                })
            );
            f.admit(2, 1, 11, 1).unwrap();
        }
        let f = Fence::open(dir.path()).unwrap();
        assert_eq!(f.generation(1), 4);
        assert!(f.admit(1, 3, 10, 2).is_err());
        f.admit(1, 0, 0, 0).unwrap();
    }
}
