//! The chunk index of one disk, in RocksDB: which slot holds each chunk and the CRC32C of every
//! mapped block, as of the last checkpoint, and where the disk's log continues from it.
//!
//! Keys:
//! - `f` → index format version and the disk's uuid (checked against the superblock)
//! - `s` + chunk (16 bytes) → slot (u64)
//! - `b` + chunk + block (u16) → CRC32C (u32); present = mapped
//! - `t` + chunk + block → present: the block was torn by a crash (see `EngineError::Torn`)
//! - `l` → the log's tail: position (u64) and sequence number (u64) of its first live record
//!
//! All integers big-endian so keys sort by chunk and block.

use std::path::Path;

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::log::Tail;
use super::{ChunkId, EngineError, Result};

/// 2: the intents and journal moved to the disk's own log (`engine::log`).
pub const INDEX_FORMAT: u32 = 2;

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Index(e.to_string())
}

fn chunk_bytes(c: ChunkId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&c.volume.to_be_bytes());
    k[8..].copy_from_slice(&c.index.to_be_bytes());
    k
}

fn chunk_from(b: &[u8]) -> ChunkId {
    ChunkId {
        volume: u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
        index: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
    }
}

fn slot_key(c: ChunkId) -> Vec<u8> {
    let mut k = vec![b's'];
    k.extend_from_slice(&chunk_bytes(c));
    k
}

fn block_key(c: ChunkId, block: usize) -> Vec<u8> {
    let mut k = vec![b'b'];
    k.extend_from_slice(&chunk_bytes(c));
    k.extend_from_slice(&u16::try_from(block).expect("block < 1024").to_be_bytes());
    k
}

fn torn_key(c: ChunkId, block: usize) -> Vec<u8> {
    let mut k = block_key(c, block);
    k[0] = b't';
    k
}

const TAIL_KEY: &[u8] = b"l";

fn encode_tail(t: Tail) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&t.pos.to_be_bytes());
    v[8..].copy_from_slice(&t.seq.to_be_bytes());
    v
}

/// Everything the index holds, as loaded at open.
#[derive(Debug, Default)]
pub struct Loaded {
    pub slots: Vec<(ChunkId, u64)>,
    pub blocks: Vec<(ChunkId, usize, u32)>,
    pub torn: Vec<(ChunkId, usize)>,
    pub tail: Option<Tail>,
}

pub struct Index {
    db: DB,
}

/// One change to the index, applied in a batch.
pub enum Op {
    Slot(ChunkId, u64),
    FreeSlot(ChunkId),
    Block(ChunkId, usize, u32),
    Unmap(ChunkId, usize),
    Torn(ChunkId, usize, bool),
    Tail(Tail),
}

impl Index {
    /// Opens the index of the disk with `uuid`, creating it if new. An index of another disk is
    /// refused: it would describe data that is not there.
    pub fn open(dir: &Path, uuid: &str) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Writers waiting for RocksDB's group commit spin for up to 100 µs by default; with many
        // synced writers on few cores that spinning is most of the CPU per write. Block instead
        // (measured: 2.3x the QD32 write IOPS here, BENCHMARKS.md).
        opts.set_enable_write_thread_adaptive_yield(false);
        // The index is written in checkpoint batches (one key per block changed since the last
        // one) and read only at open, by a full scan. A skiplist memtable orders every key on
        // insert, which was 15% of a storage node's user CPU under random 4K writes (profile in
        // BENCHMARKS.md); a vector memtable appends and sorts once, when it is flushed. It
        // takes one writer at a time, and checkpoints are one at a time anyway.
        opts.set_memtable_factory(rocksdb::MemtableFactory::Vector);
        opts.set_allow_concurrent_memtable_write(false);
        let db = DB::open(&opts, dir).map_err(err)?;
        let mut expect = INDEX_FORMAT.to_be_bytes().to_vec();
        expect.extend_from_slice(uuid.as_bytes());
        match db.get(b"f").map_err(err)? {
            None => {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.put_opt(b"f", &expect, &wo).map_err(err)?;
            }
            Some(v) if v == expect => {}
            Some(v) => {
                return Err(err(format!(
                    "index at {} belongs to another disk or format ({:?})",
                    dir.display(),
                    String::from_utf8_lossy(&v[4.min(v.len())..])
                )))
            }
        }
        Ok(Self { db })
    }

    pub fn load(&self) -> Result<Loaded> {
        let mut l = Loaded::default();
        for kv in self.db.iterator(IteratorMode::Start) {
            let (k, v) = kv.map_err(err)?;
            match (k.first(), k.len()) {
                (Some(b's'), 17) => {
                    let slot = u64::from_be_bytes(v[..].try_into().map_err(err)?);
                    l.slots.push((chunk_from(&k[1..17]), slot));
                }
                (Some(b'b'), 19) => {
                    let block = usize::from(u16::from_be_bytes(k[17..19].try_into().map_err(err)?));
                    let crc = u32::from_be_bytes(v[..].try_into().map_err(err)?);
                    l.blocks.push((chunk_from(&k[1..17]), block, crc));
                }
                (Some(b't'), 19) => {
                    let block = usize::from(u16::from_be_bytes(k[17..19].try_into().map_err(err)?));
                    l.torn.push((chunk_from(&k[1..17]), block));
                }
                (Some(b'l'), 1) if v.len() == 16 => {
                    l.tail = Some(Tail {
                        pos: u64::from_be_bytes(v[..8].try_into().map_err(err)?),
                        seq: u64::from_be_bytes(v[8..].try_into().map_err(err)?),
                    });
                }
                (Some(b'f'), 1) => {}
                _ => return Err(err(format!("unknown index key {k:?}"))),
            }
        }
        Ok(l)
    }

    /// Applies `ops` atomically; with `sync`, they are on media when this returns.
    pub fn apply(&self, ops: &[Op], sync: bool) -> Result<()> {
        let mut b = WriteBatch::default();
        for op in ops {
            match op {
                Op::Slot(c, s) => b.put(slot_key(*c), s.to_be_bytes()),
                Op::FreeSlot(c) => b.delete(slot_key(*c)),
                Op::Block(c, i, crc) => b.put(block_key(*c, *i), crc.to_be_bytes()),
                Op::Unmap(c, i) => b.delete(block_key(*c, *i)),
                Op::Torn(c, i, true) => b.put(torn_key(*c, *i), []),
                Op::Torn(c, i, false) => b.delete(torn_key(*c, *i)),
                Op::Tail(t) => b.put(TAIL_KEY, encode_tail(*t)),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(b, &wo).map_err(err)
    }
}
