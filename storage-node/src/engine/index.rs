//! The chunk index of one disk, in RocksDB: which slot holds each chunk, the CRC32C of every
//! mapped block, and the write intents that make a crash recoverable.
//!
//! Keys:
//! - `f` → index format version and the disk's uuid (checked against the superblock)
//! - `s` + chunk (16 bytes) → slot (u64)
//! - `b` + chunk + block (u16) → CRC32C (u32); present = mapped
//! - `i` + sequence (u64) → an intent: chunk, slot, first block, new CRCs
//! - `t` + chunk + block → present: the block was torn by a crash (see `EngineError::Torn`)
//! - `j` + sequence (u64) → a journaled small write: chunk, slot, first block, the data itself
//!
//! All integers big-endian so keys sort by chunk and block.

use std::path::Path;

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::{ChunkId, EngineError, Result};

pub const INDEX_FORMAT: u32 = 1;

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

fn intent_key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'i'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A write that may be on its way to the disk: recorded, synced, before the data is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub seq: u64,
    pub chunk: ChunkId,
    pub slot: u64,
    pub first_block: usize,
    pub crcs: Vec<u32>,
}

impl Intent {
    fn encode(&self) -> Vec<u8> {
        let mut v = encode_head(self.chunk, self.slot, self.first_block, 4 * self.crcs.len());
        for c in &self.crcs {
            v.extend_from_slice(&c.to_be_bytes());
        }
        v
    }

    fn decode(seq: u64, v: &[u8]) -> Result<Self> {
        let (chunk, slot, first_block, body) = decode_head(v, 4)
            .ok_or_else(|| err(format!("intent {seq} is malformed ({} bytes)", v.len())))?;
        let crcs = body
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(Self {
            seq,
            chunk,
            slot,
            first_block,
            crcs,
        })
    }
}

/// The header intents and journal entries share: chunk (16 bytes), slot (8), first block (2).
const HEAD: usize = 26;

fn encode_head(chunk: ChunkId, slot: u64, first_block: usize, body: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEAD + body);
    v.extend_from_slice(&chunk_bytes(chunk));
    v.extend_from_slice(&slot.to_be_bytes());
    v.extend_from_slice(
        &u16::try_from(first_block)
            .expect("block < 1024")
            .to_be_bytes(),
    );
    v
}

/// Splits a record into its header and a non-empty body of whole `unit`s.
fn decode_head(v: &[u8], unit: usize) -> Option<(ChunkId, u64, usize, &[u8])> {
    let body = v
        .get(HEAD..)
        .filter(|b| !b.is_empty() && b.len().is_multiple_of(unit))?;
    Some((
        chunk_from(&v[..16]),
        u64::from_be_bytes(v[16..24].try_into().expect("8 bytes")),
        usize::from(u16::from_be_bytes(v[24..26].try_into().expect("2 bytes"))),
        body,
    ))
}

/// A small write journaled with its data (see the disk engine's write protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    pub seq: u64,
    pub chunk: ChunkId,
    pub slot: u64,
    pub first_block: usize,
    pub data: bytes::Bytes,
}

impl Journal {
    fn encode(&self) -> Vec<u8> {
        let mut v = encode_head(self.chunk, self.slot, self.first_block, self.data.len());
        v.extend_from_slice(&self.data);
        v
    }

    fn decode(seq: u64, v: &[u8]) -> Result<Self> {
        let (chunk, slot, first_block, body) = decode_head(v, 4096).ok_or_else(|| {
            err(format!(
                "journal entry {seq} is malformed ({} bytes)",
                v.len()
            ))
        })?;
        Ok(Self {
            seq,
            chunk,
            slot,
            first_block,
            data: bytes::Bytes::copy_from_slice(body),
        })
    }
}

fn journal_key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'j'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Everything the index holds, as loaded at open.
#[derive(Debug, Default)]
pub struct Loaded {
    pub slots: Vec<(ChunkId, u64)>,
    pub blocks: Vec<(ChunkId, usize, u32)>,
    pub intents: Vec<Intent>,
    pub torn: Vec<(ChunkId, usize)>,
    pub journal: Vec<Journal>,
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
    Intent(Intent),
    DoneIntent(u64),
    Torn(ChunkId, usize, bool),
    Journal(Journal),
    DoneJournal(u64),
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
                (Some(b'i'), 9) => {
                    let seq = u64::from_be_bytes(k[1..9].try_into().map_err(err)?);
                    l.intents.push(Intent::decode(seq, &v)?);
                }
                (Some(b'j'), 9) => {
                    let seq = u64::from_be_bytes(k[1..9].try_into().map_err(err)?);
                    l.journal.push(Journal::decode(seq, &v)?);
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
                Op::Intent(i) => b.put(intent_key(i.seq), i.encode()),
                Op::DoneIntent(seq) => b.delete(intent_key(*seq)),
                Op::Torn(c, i, true) => b.put(torn_key(*c, *i), []),
                Op::Torn(c, i, false) => b.delete(torn_key(*c, *i)),
                Op::Journal(j) => b.put(journal_key(j.seq), j.encode()),
                Op::DoneJournal(seq) => b.delete(journal_key(*seq)),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(b, &wo).map_err(err)
    }
}
