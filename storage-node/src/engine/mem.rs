//! An in-memory engine: the reference for the conformance suite and a fast stand-in for tests
//! of the layers above. Not durable, by design.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::*;

struct MemChunk {
    blocks: Vec<Option<(Bytes, u32)>>,
}

pub struct MemEngine {
    chunks: Mutex<BTreeMap<ChunkId, MemChunk>>,
    capacity_chunks: u64,
    corrupt_reads: AtomicU64,
}

impl MemEngine {
    /// An engine holding at most `capacity_chunks` chunks.
    pub fn new(capacity_chunks: u64) -> Self {
        Self {
            chunks: Mutex::default(),
            capacity_chunks,
            corrupt_reads: AtomicU64::new(0),
        }
    }

    /// Flips a byte of a stored block behind the checksum's back (tests only).
    pub fn corrupt(&self, chunk: ChunkId, block: usize) {
        let mut map = self.chunks.lock().expect("lock");
        // The stored checksum stays as it was: that is the corruption.
        if let Some(Some((data, _crc))) = map.get_mut(&chunk).map(|c| &mut c.blocks[block]) {
            let mut d = BytesMut::from(&data[..]);
            d[7] ^= 0xff;
            *data = d.freeze();
        }
    }
}

impl ChunkEngine for MemEngine {
    async fn write(&self, chunk: ChunkId, offset: u64, data: Bytes) -> Result<()> {
        check_range(offset, data.len() as u64)?;
        let mut map = self.chunks.lock().expect("lock");
        if !map.contains_key(&chunk) && map.len() as u64 >= self.capacity_chunks {
            return Err(EngineError::NoSpace);
        }
        let c = map.entry(chunk).or_insert_with(|| MemChunk {
            blocks: vec![None; BLOCKS_PER_CHUNK],
        });
        let first = (offset / BLOCK_SIZE) as usize;
        for (i, b) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            let block = data.slice_ref(b);
            c.blocks[first + i] = Some((block, crc32c::crc32c(b)));
        }
        Ok(())
    }

    async fn read(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<Bytes> {
        check_range(offset, len)?;
        let map = self.chunks.lock().expect("lock");
        let mut out = BytesMut::zeroed(len as usize);
        if let Some(c) = map.get(&chunk) {
            let first = (offset / BLOCK_SIZE) as usize;
            for (i, dst) in out.chunks_mut(BLOCK_SIZE as usize).enumerate() {
                if let Some((data, crc)) = &c.blocks[first + i] {
                    if crc32c::crc32c(data) != *crc {
                        self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                        return Err(EngineError::Corrupt {
                            chunk,
                            block: first + i,
                        });
                    }
                    dst.copy_from_slice(data);
                }
            }
        }
        Ok(out.freeze())
    }

    async fn discard(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len)?;
        let mut map = self.chunks.lock().expect("lock");
        if let Some(c) = map.get_mut(&chunk) {
            let first = (offset / BLOCK_SIZE) as usize;
            for b in &mut c.blocks[first..first + (len / BLOCK_SIZE) as usize] {
                *b = None;
            }
            if c.blocks.iter().all(Option::is_none) {
                map.remove(&chunk);
            }
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn chunk_info(&self, chunk: ChunkId) -> Result<Option<ChunkInfo>> {
        let map = self.chunks.lock().expect("lock");
        Ok(map.get(&chunk).map(|c| {
            let mut bm = Bitmap::default();
            for (i, b) in c.blocks.iter().enumerate() {
                bm.set(i, b.is_some());
            }
            ChunkInfo {
                chunk,
                mapped_blocks: bm.count(),
                mapped: bm.0.to_vec(),
                crcs: c
                    .blocks
                    .iter()
                    .map(|b| b.as_ref().map_or(0, |(_, crc)| *crc))
                    .collect(),
            }
        }))
    }

    fn chunks(&self) -> Vec<ChunkId> {
        self.chunks.lock().expect("lock").keys().copied().collect()
    }

    fn stats(&self) -> EngineStats {
        let n = self.chunks.lock().expect("lock").len() as u64;
        EngineStats {
            chunks: n,
            free_slots: self.capacity_chunks - n,
            corrupt_reads: self.corrupt_reads.load(Ordering::Relaxed),
            torn_blocks: 0,
        }
    }
}
