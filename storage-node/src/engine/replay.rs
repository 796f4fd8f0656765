//! Rebuilding a disk's chunk state at open: the index's last checkpoint, then every record of
//! the log after it, in order. Pure over the state and the records, except that an intent's
//! blocks are read from the disk to tell which of them landed.

use std::collections::BTreeSet;

use bytes::Bytes;
use foldhash::HashMap;

use super::log::Record;
use super::{Bitmap, ChunkId, BLOCKS_PER_CHUNK, BLOCK_SIZE};

const BLOCK: usize = BLOCK_SIZE as usize;

/// What the engine knows of one chunk.
#[derive(Clone)]
pub struct Meta {
    pub slot: u64,
    pub crcs: Box<[u32]>,
    pub mapped: Bitmap,
    pub torn: Bitmap,
}

impl Meta {
    pub fn new(slot: u64) -> Self {
        Self {
            slot,
            crcs: vec![0; BLOCKS_PER_CHUNK].into(),
            mapped: Bitmap::default(),
            torn: Bitmap::default(),
        }
    }
}

/// Blocks changed since the last checkpoint: their state goes to the index at the next one.
#[derive(Default, Clone)]
pub struct Dirty {
    pub blocks: Bitmap,
    /// Blocks whose torn mark changed.
    pub torn: Bitmap,
}

impl Dirty {
    /// Block `b` changed (and its torn mark too, if `torn_changed`).
    fn mark(&mut self, b: usize, torn_changed: bool) {
        self.blocks.set(b, true);
        if torn_changed {
            self.torn.set(b, true);
        }
    }
}

/// The chunk state of a disk.
#[derive(Default)]
pub struct Chunks {
    pub chunks: HashMap<ChunkId, Meta>,
    pub free: BTreeSet<u64>,
    pub dirty: HashMap<ChunkId, Dirty>,
}

/// How each block of a large write that may have been cut short came out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub new_blocks: usize,
    pub torn: usize,
}

impl Chunks {
    /// Records that `chunk`'s block `b` changed (and whether its torn mark did).
    pub fn touch(&mut self, chunk: ChunkId, b: usize, torn_changed: bool) {
        self.dirty.entry(chunk).or_default().mark(b, torn_changed);
    }

    /// A write's blocks now hold `crcs` from `first`.
    pub fn set_blocks(&mut self, chunk: ChunkId, slot: u64, first: usize, crcs: &[u32]) {
        let m = self.chunks.entry(chunk).or_insert_with(|| Meta::new(slot));
        // One look-up of the chunk's dirty blocks per write, not per block (`touch`).
        let d = self.dirty.entry(chunk).or_default();
        for (i, c) in crcs.iter().enumerate() {
            let b = first + i;
            m.crcs[b] = *c;
            m.mapped.set(b, true);
            let torn_changed = m.torn.get(b);
            m.torn.set(b, false);
            d.mark(b, torn_changed);
        }
    }

    /// Unmaps blocks; returns the chunk's slot if the chunk is now empty (it is removed, and
    /// the caller frees the slot once its space is given back).
    pub fn unmap(&mut self, chunk: ChunkId, first: usize, n: usize) -> Option<u64> {
        let m = self.chunks.get_mut(&chunk)?;
        let mut changed = Vec::new();
        for b in first..first + n {
            let torn = m.torn.get(b);
            if m.mapped.get(b) || torn {
                changed.push((b, torn));
            }
            m.mapped.set(b, false);
            m.torn.set(b, false);
        }
        let empty = m.mapped.count() == 0 && m.torn.count() == 0;
        let slot = m.slot;
        for (b, torn) in changed {
            self.touch(chunk, b, torn);
        }
        if empty {
            self.chunks.remove(&chunk);
            // Every block that was ever persisted as mapped is dirty now: the checkpoint
            // deletes the chunk's keys through them.
            self.dirty.entry(chunk).or_default();
            return Some(slot);
        }
        None
    }

    /// Makes `chunk` live in `slot`, as a log record says it does.
    fn attach(&mut self, chunk: ChunkId, slot: u64, slots: u64) -> anyhow::Result<bool> {
        if let Some(m) = self.chunks.get(&chunk) {
            anyhow::ensure!(
                m.slot == slot,
                "log puts chunk {chunk} in slot {slot}, the index in slot {}",
                m.slot
            );
            return Ok(true);
        }
        anyhow::ensure!(
            slot < slots && self.free.remove(&slot),
            "log puts chunk {chunk} in slot {slot}, which is past the disk's end or in use"
        );
        self.chunks.insert(chunk, Meta::new(slot));
        self.dirty.entry(chunk).or_default();
        Ok(false)
    }

    /// Settles a large write's blocks from what `on_disk` holds: a block with the new
    /// checksum is new; one that still matches the old checksum — or whose old data is waiting
    /// in `pending` to be put back in place — keeps the old; an unmapped block stays unmapped;
    /// anything else was torn (marked, so reads say `Torn` rather than `Corrupt`).
    pub fn settle_intent(
        &mut self,
        chunk: ChunkId,
        first: usize,
        crcs: &[u32],
        on_disk: &[u8],
        pending: &HashMap<(ChunkId, usize), Bytes>,
    ) -> Outcome {
        let mut out = Outcome::default();
        let Some(m) = self.chunks.get_mut(&chunk) else {
            return out;
        };
        let mut touched = Vec::new();
        for (i, block) in on_disk.chunks(BLOCK).enumerate().take(crcs.len()) {
            let b = first + i;
            let crc = crc32c::crc32c(block);
            if crc == crcs[i] {
                m.crcs[b] = crc;
                m.mapped.set(b, true);
                touched.push((b, m.torn.get(b)));
                m.torn.set(b, false);
                out.new_blocks += 1;
            } else if pending.contains_key(&(chunk, b))
                || !m.mapped.get(b)
                || m.crcs[b] == crc
                || m.torn.get(b)
            {
                // The old state stands.
            } else {
                m.torn.set(b, true);
                touched.push((b, true));
                out.torn += 1;
            }
        }
        for (b, torn_changed) in touched {
            self.touch(chunk, b, torn_changed);
        }
        out
    }

    /// Applies one record of the log at open. Journaled data lands in `pending` (the caller
    /// puts it in place); intents read their blocks through `read(slot, first, n)`.
    pub async fn replay<F, Fut>(
        &mut self,
        r: Record,
        slots: u64,
        pending: &mut HashMap<(ChunkId, usize), Bytes>,
        read: F,
    ) -> anyhow::Result<()>
    where
        F: FnOnce(u64, usize, usize) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<Bytes>>,
    {
        match r {
            Record::Write {
                chunk,
                slot,
                first_block,
                data,
                ..
            } => {
                self.attach(chunk, slot, slots)?;
                let crcs = super::block_crcs(&data);
                self.set_blocks(chunk, slot, first_block, &crcs);
                for i in 0..crcs.len() {
                    pending.insert(
                        (chunk, first_block + i),
                        data.slice(i * BLOCK..(i + 1) * BLOCK),
                    );
                }
            }
            Record::Intent {
                chunk,
                slot,
                first_block,
                crcs,
            } => {
                let existed = self.attach(chunk, slot, slots)?;
                let on_disk = read(slot, first_block, crcs.len()).await?;
                let out = self.settle_intent(chunk, first_block, &crcs, &on_disk, pending);
                for (i, c) in crcs.iter().enumerate() {
                    // A block that took the new data no longer needs older journaled data.
                    if on_disk
                        .get(i * BLOCK..(i + 1) * BLOCK)
                        .is_some_and(|b| crc32c::crc32c(b) == *c)
                    {
                        pending.remove(&(chunk, first_block + i));
                    }
                }
                if !existed && out.new_blocks == 0 {
                    self.chunks.remove(&chunk);
                    self.free.insert(slot);
                }
                tracing::info!(%chunk, blocks = crcs.len(), new_blocks = out.new_blocks, torn = out.torn, "recovered an interrupted write");
            }
            Record::Discard {
                chunk,
                first_block,
                blocks,
            } => {
                for b in first_block..first_block + blocks {
                    pending.remove(&(chunk, b));
                }
                if let Some(slot) = self.unmap(chunk, first_block, blocks) {
                    self.free.insert(slot);
                }
            }
        }
        Ok(())
    }

    /// The index changes that persist every dirty block, and forget the dirty set.
    pub fn take_dirty(&mut self) -> Vec<super::index::Op> {
        use super::index::Op;
        let mut ops = Vec::new();
        for (chunk, d) in std::mem::take(&mut self.dirty) {
            let m = self.chunks.get(&chunk);
            match m {
                Some(m) => ops.push(Op::Slot(chunk, m.slot)),
                None => ops.push(Op::FreeSlot(chunk)),
            }
            // Only the changed blocks: a random write changes one block of a chunk's 1,024.
            for b in d.blocks.ones() {
                match m.filter(|m| m.mapped.get(b)) {
                    Some(m) => ops.push(Op::Block(chunk, b, m.crcs[b])),
                    None => ops.push(Op::Unmap(chunk, b)),
                }
            }
            for b in d.torn.ones() {
                ops.push(Op::Torn(chunk, b, m.is_some_and(|m| m.torn.get(b))));
            }
        }
        ops
    }
}
