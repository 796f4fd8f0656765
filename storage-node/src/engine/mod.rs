//! The `ChunkEngine` seam: chunks of 4 MiB, addressed in 4 KiB blocks, each block carrying a
//! CRC32C checked on every read.
//!
//! Contract, for every implementation (enforced by the shared `conformance` suite):
//! - Chunks are thin: a never-written block reads as zeros; space is taken on first write.
//! - `write` returns only when the data is on media (a crash afterwards keeps it).
//! - A read returns the last completed write of each block, or data of a write still in flight
//!   — never older data, never a mix within a block, never unchecked bytes.
//! - A block whose bytes do not match its checksum is reported as
//!   [`EngineError::Corrupt`] naming chunk and block, never returned as data.
//! - `discard` and `write_zeroes` unmap blocks (they read as zeros); a chunk with no mapped
//!   block gives its space back.
//! - Requests must be 4 KiB aligned and inside the chunk; anything else is
//!   [`EngineError::InvalidRequest`] and changes nothing.

pub mod disk;
pub mod fault;
pub mod index;
pub mod io;
pub mod log;
pub mod mem;
pub mod rangelock;
pub mod replay;
pub mod uring;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

use std::future::Future;

use bytes::Bytes;

/// Size of a chunk: the storage and resync unit on a node.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// Size of a block: the unit of checksums and I/O alignment.
pub const BLOCK_SIZE: u64 = 4096;
pub const BLOCKS_PER_CHUNK: usize = (CHUNK_SIZE / BLOCK_SIZE) as usize;

/// A chunk's identity: which volume, which 4 MiB of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId {
    pub volume: u64,
    pub index: u64,
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.volume, self.index)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("chunk {chunk} block {block} is corrupt (checksum mismatch)")]
    Corrupt { chunk: ChunkId, block: usize },
    /// A block whose write was cut by a power loss on a device without atomic 4 KiB writes: it
    /// holds neither the old nor the new data. Never acknowledged, so not corruption; a replica
    /// has a good copy.
    #[error("chunk {chunk} block {block} was torn by a crash during an unacknowledged write")]
    Torn { chunk: ChunkId, block: usize },
    #[error("disk is full: no free chunk slot")]
    NoSpace,
    #[error("disk I/O failed")]
    Io(#[source] std::io::Error),
    #[error("chunk index failed: {0}")]
    Index(String),
    /// A previous sync failed: the state of the page cache and the disk is unknown, so the
    /// engine refuses all further I/O (Fjall's rule) until restarted and recovered.
    #[error("engine is poisoned after a failed sync; restart the node")]
    Poisoned,
}

impl EngineError {
    /// Whether the same request may succeed on this engine if retried.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io(_))
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// What a chunk holds, for resync and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    pub chunk: ChunkId,
    /// One bit per block: mapped (written, not since discarded).
    pub mapped: Vec<u64>,
    pub mapped_blocks: usize,
    /// The stored CRC32C of each block (0 for an unmapped one): what scrub compares between
    /// replicas without reading data.
    pub crcs: Vec<u32>,
}

/// Counters an engine keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub chunks: u64,
    pub free_slots: u64,
    pub corrupt_reads: u64,
    pub torn_blocks: u64,
}

/// Checks that `[offset, offset+len)` is a non-empty, block-aligned range inside a chunk.
pub fn check_range(offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Err(EngineError::InvalidRequest("zero length".into()));
    }
    if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(EngineError::InvalidRequest(format!(
            "offset {offset} and length {len} must be multiples of {BLOCK_SIZE}"
        )));
    }
    if offset.checked_add(len).is_none_or(|end| end > CHUNK_SIZE) {
        return Err(EngineError::InvalidRequest(format!(
            "range {offset}+{len} is past the end of the {CHUNK_SIZE}-byte chunk"
        )));
    }
    Ok(())
}

/// The storage seam. Buffers are owned (`Bytes`): callers hand data over and get data back, so
/// an io_uring engine can keep them for the duration of the I/O without copies or lifetimes.
pub trait ChunkEngine: Send + Sync + 'static {
    /// Writes whole blocks at `offset` of `chunk`; returns once they are on media.
    fn write(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = Result<()>> + Send;
    /// [`ChunkEngine::write`] of data whose CRC32C the caller has computed and checked already
    /// (the data protocol carries one with every payload): `crc` must be exactly that. An
    /// engine may keep it as the data's checksum instead of computing it again.
    fn write_checked(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: Bytes,
        crc: u32,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = crc;
        self.write(chunk, offset, data)
    }
    /// Reads `len` bytes at `offset`; unmapped blocks read as zeros; every mapped block is
    /// checked against its CRC32C.
    fn read(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Bytes>> + Send;
    /// [`ChunkEngine::read`], with the CRC32C of all the bytes it returns (the data protocol
    /// sends one with every payload). An engine that has just checked a lone block against
    /// its checksum returns that checksum instead of reading the data through again.
    fn read_checked(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(Bytes, u32)>> + Send {
        async move {
            let data = self.read(chunk, offset, len).await?;
            let crc = crc32c::crc32c(&data);
            Ok((data, crc))
        }
    }
    /// Unmaps blocks: they read as zeros afterwards, and a fully unmapped chunk frees its slot.
    fn discard(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Makes blocks read as zeros (by unmapping them: no zeros are written).
    fn write_zeroes(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        self.discard(chunk, offset, len)
    }
    /// Every acknowledged write is already durable; this waits for writes in flight.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Which blocks of a chunk are mapped; `None` if the chunk holds nothing.
    fn chunk_info(&self, chunk: ChunkId) -> Result<Option<ChunkInfo>>;
    /// Every chunk holding data.
    fn chunks(&self) -> Vec<ChunkId>;
    fn stats(&self) -> EngineStats;
}

/// CRC32C of each 4 KiB block of `data` (whose length is a multiple of 4 KiB).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// A per-chunk bitmap of mapped blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap(pub [u64; BLOCKS_PER_CHUNK / 64]);

impl Default for Bitmap {
    fn default() -> Self {
        Self([0; BLOCKS_PER_CHUNK / 64])
    }
}

impl Bitmap {
    pub fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    pub fn set(&mut self, i: usize, v: bool) {
        if v {
            self.0[i / 64] |= 1 << (i % 64);
        } else {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }
    pub fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// The set bits, in order.
    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros() as usize;
                    w &= w - 1;
                    i * 64 + b
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `ones` yields exactly the set bits, in order.
        #[test]
        fn bitmap_ones_are_the_set_bits(bits in proptest::collection::btree_set(0..BLOCKS_PER_CHUNK, 0..64)) {
            let mut m = Bitmap::default();
            for &b in &bits {
                m.set(b, true);
            }
            prop_assert_eq!(m.ones().collect::<Vec<_>>(), bits.into_iter().collect::<Vec<_>>());
        }
    }
}
