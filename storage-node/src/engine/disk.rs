//! The disk engine: chunks in fixed 4 MiB slots of a disk file or block device, the chunk
//! index in RocksDB beside it.
//!
//! # Write protocol, and what a crash at each step leaves
//! 1. Under the chunk's write lock, an *intent* (chunk, slot, first block, new CRCs) is written
//!    to the index, synced. Crash after: recovery finds the intent; every block still holds
//!    its old data (old CRC) and stays as it was.
//! 2. The data is written in place (O_DIRECT). Crash during or after: each block holds the old
//!    data, the new data, or — only on power loss on a device without atomic 4 KiB writes — a
//!    mix. Recovery tells them apart by CRC: new → committed, old → kept, neither → marked
//!    torn (reads fail with `Torn`, not `Corrupt`; the write was never acknowledged).
//! 3. fdatasync (group-committed across concurrent writers). After it the data is on media.
//! 4. The block CRCs replace the intent in the index (not synced: the intent already makes
//!    the outcome recoverable), and the write is acknowledged.
//!
//! That is the path of writes larger than [`JOURNAL_MAX`].
//!
//! Small writes (≤ [`JOURNAL_MAX`]) take a shorter path with one flush instead of two
//! (BlueStore's deferred writes):
//! 1. One synced index batch holds the data itself (a journal entry), the new block CRCs and,
//!    for a new chunk, its slot. After it the write is durable and acknowledged once step 2 is
//!    done. A crash before it leaves the old data and CRCs untouched.
//! 2. The data is written in place, not flushed. A crash before it reaches media is repaired
//!    at open: journal entries are replayed in sequence order wherever the index still holds
//!    their CRC, then flushed, then dropped. No block of a small write is ever torn.
//! 3. Every [`CHECKPOINT_EVERY`] writes, one fdatasync makes the in-place copies durable and
//!    the journal entries are dropped.
//!
//! Discard: the index drops the blocks (synced), then the file's range is punched, so space
//! goes back to the filesystem; a crash in between leaves unmapped blocks that read as zeros.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::index::{Index, Intent, Journal, Op};
use super::io::{DiskFile, IoKind};
use super::*;
use crate::format::{Superblock, SUPERBLOCK_SIZE};

#[derive(Clone)]
struct Meta {
    slot: u64,
    crcs: Box<[u32]>,
    mapped: Bitmap,
    torn: Bitmap,
}

impl Meta {
    fn new(slot: u64) -> Self {
        Self {
            slot,
            crcs: vec![0; BLOCKS_PER_CHUNK].into(),
            mapped: Bitmap::default(),
            torn: Bitmap::default(),
        }
    }
}

#[derive(Default)]
struct Inner {
    chunks: HashMap<ChunkId, Meta>,
    free: BTreeSet<u64>,
}

pub struct DiskEngine {
    sb: Superblock,
    file: DiskFile,
    index: Arc<Index>,
    inner: Mutex<Inner>,
    /// One lock per chunk: writes and discards exclusive, reads shared, so a read never sees a
    /// block between its data and its checksum.
    locks: Mutex<HashMap<ChunkId, Arc<tokio::sync::RwLock<()>>>>,
    next_seq: AtomicU64,
    corrupt_reads: AtomicU64,
    /// Journaled writes complete in place, not yet covered by a checkpoint's fdatasync.
    journaled: Mutex<Vec<u64>>,
}

/// Writes up to this size are journaled with their data (one flush); larger ones use the
/// intent protocol (their bandwidth matters more than a second flush).
pub const JOURNAL_MAX: u64 = 64 << 10;
/// A checkpoint (one fdatasync) retires this many journaled writes at a time.
const CHECKPOINT_EVERY: usize = 256;

fn io_err(e: std::io::Error) -> EngineError {
    EngineError::Io(e)
}

impl DiskEngine {
    /// Creates a sparse disk file of `size` bytes (for file-backed disks and tests).
    pub fn create_file(path: &Path, size: u64) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(path)?;
        f.set_len(size)?;
        f.sync_all()
    }

    /// Opens a Cairn disk, formatting it first if it has never been one (all-zero superblock
    /// area). A disk with a damaged or foreign superblock is refused, never reformatted. Its
    /// chunk index lives in `index_root/<disk uuid>`.
    pub async fn open(disk: &Path, index_dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(disk, index_dir, IoKind::Auto).await
    }

    /// [`DiskEngine::open`] with a chosen I/O backend.
    pub async fn open_with(disk: &Path, index_dir: &Path, kind: IoKind) -> anyhow::Result<Self> {
        let file = DiskFile::open(disk, kind)
            .map_err(|e| anyhow::anyhow!("opening disk {}: {e}", disk.display()))?;
        let head = file.read_at(0, SUPERBLOCK_SIZE).await?;
        let sb = match Superblock::decode(head.as_ref()) {
            Ok(sb) => sb,
            Err(crate::format::SuperblockError::NoMagic)
                if head.as_ref().iter().all(|&b| b == 0) =>
            {
                let size = file.size()?;
                let sb = Superblock::new(size, CHUNK_SIZE).ok_or_else(|| {
                    anyhow::anyhow!(
                        "disk {} ({size} bytes) is too small for one chunk",
                        disk.display()
                    )
                })?;
                file.write_at(0, Bytes::from(sb.encode())).await?;
                // After this sync the disk is a Cairn disk; a crash before it leaves zeros,
                // and the next open formats it again.
                file.sync().await?;
                tracing::info!(disk = %disk.display(), uuid = %sb.uuid_string(), slots = sb.slots, "formatted disk");
                sb
            }
            Err(e) => anyhow::bail!("disk {}: {e}; refusing to use it", disk.display()),
        };
        let index = Index::open(&index_dir.join(sb.uuid_string()), &sb.uuid_string())?;
        let engine = Self {
            sb,
            file,
            index: Arc::new(index),
            inner: Mutex::default(),
            locks: Mutex::default(),
            next_seq: AtomicU64::new(1),
            corrupt_reads: AtomicU64::new(0),
            journaled: Mutex::default(),
        };
        engine.load_and_recover().await?;
        Ok(engine)
    }

    /// Whether a failed sync has poisoned the disk (it then serves nothing).
    pub fn poisoned(&self) -> bool {
        self.file.is_poisoned()
    }

    /// Whether I/O goes through io_uring.
    pub fn uses_uring(&self) -> bool {
        self.file.uses_uring()
    }

    /// Whether the disk is opened with O_DIRECT (false only where the filesystem refused it).
    pub fn direct_io(&self) -> bool {
        self.file.direct
    }

    pub fn uuid(&self) -> String {
        self.sb.uuid_string()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.sb.slots * self.sb.chunk_size
    }

    /// Byte offset on the disk of `offset` within `chunk`, if the chunk holds a slot (tests and
    /// operators use it to look at or damage the raw data).
    pub fn disk_offset(&self, chunk: ChunkId, offset: u64) -> Option<u64> {
        let inner = self.inner.lock().expect("lock");
        inner
            .chunks
            .get(&chunk)
            .map(|m| self.sb.slot_offset(m.slot) + offset)
    }

    async fn load_and_recover(&self) -> anyhow::Result<()> {
        let loaded = self.index.load()?;
        let mut inner = Inner::default();
        for (c, slot) in loaded.slots {
            anyhow::ensure!(
                slot < self.sb.slots,
                "index maps chunk {c} to slot {slot} past the disk's end"
            );
            inner.chunks.insert(c, Meta::new(slot));
        }
        for (c, b, crc) in loaded.blocks {
            let m = inner
                .chunks
                .get_mut(&c)
                .ok_or_else(|| anyhow::anyhow!("block of chunk {c} without a slot"))?;
            m.crcs[b] = crc;
            m.mapped.set(b, true);
        }
        for (c, b) in loaded.torn {
            if let Some(m) = inner.chunks.get_mut(&c) {
                m.torn.set(b, true);
            }
        }
        let mut ops = Vec::new();
        let mut max_seq = 0;
        // Journal replays and intent recoveries, in the order the writes were made.
        enum Pending {
            Intent(Intent),
            Journal(Journal),
        }
        let mut pending: Vec<(u64, Pending)> = loaded
            .intents
            .into_iter()
            .map(|i| (i.seq, Pending::Intent(i)))
            .chain(
                loaded
                    .journal
                    .into_iter()
                    .map(|j| (j.seq, Pending::Journal(j))),
            )
            .collect();
        pending.sort_by_key(|(seq, _)| *seq);
        let mut replayed = 0;
        for (seq, p) in pending {
            max_seq = max_seq.max(seq);
            match p {
                Pending::Intent(intent) => {
                    self.recover_intent(&mut inner, &intent, &mut ops).await?;
                    ops.push(Op::DoneIntent(seq));
                }
                Pending::Journal(j) => {
                    replayed += self.replay_journal(&inner, &j).await?;
                    ops.push(Op::DoneJournal(seq));
                }
            }
        }
        if replayed > 0 {
            // The replayed blocks reach media before their journal entries are dropped below.
            self.file.sync().await?;
            tracing::info!(blocks = replayed, "replayed journaled writes");
        }
        let used: BTreeSet<u64> = inner.chunks.values().map(|m| m.slot).collect();
        inner.free = (0..self.sb.slots).filter(|s| !used.contains(s)).collect();
        if !ops.is_empty() {
            // Synced: the recovered outcome is final before the engine serves anything.
            self.index.apply(&ops, true)?;
        }
        self.next_seq.store(max_seq + 1, Ordering::Relaxed);
        *self.inner.lock().expect("lock") = inner;
        Ok(())
    }

    /// Writes a journaled write's blocks in place again — each block only while the index
    /// still holds that write's checksum for it (a later write, discard or a reuse of the slot
    /// by another chunk supersedes it). Returns the number of blocks written.
    async fn replay_journal(&self, inner: &Inner, j: &Journal) -> anyhow::Result<usize> {
        let Some(m) = inner.chunks.get(&j.chunk).filter(|m| m.slot == j.slot) else {
            return Ok(0);
        };
        let mut n = 0;
        for (i, block) in j.data.chunks(BLOCK_SIZE as usize).enumerate() {
            let b = j.first_block + i;
            if b < BLOCKS_PER_CHUNK && m.mapped.get(b) && m.crcs[b] == crc32c::crc32c(block) {
                let off = self.sb.slot_offset(j.slot) + b as u64 * BLOCK_SIZE;
                self.file.write_at(off, j.data.slice_ref(block)).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Retires journal entries whose in-place writes are complete: one fdatasync makes them
    /// durable in place, then the entries go (not synced: replaying one again is harmless).
    async fn checkpoint(&self) -> Result<()> {
        let seqs = std::mem::take(&mut *self.journaled.lock().expect("journal lock"));
        if seqs.is_empty() {
            return Ok(());
        }
        self.file.sync().await.map_err(|_| EngineError::Poisoned)?;
        let ops: Vec<Op> = seqs.into_iter().map(Op::DoneJournal).collect();
        self.index.apply(&ops, false)
    }

    /// A small write: data and checksums in one synced index batch, then in place.
    async fn write_journaled(&self, chunk: ChunkId, offset: u64, data: Bytes) -> Result<()> {
        let lock = self.lock_for(chunk);
        let _g = lock.write().await;
        let crcs = block_crcs(&data);
        let first = (offset / BLOCK_SIZE) as usize;
        let (slot, new_slot, torn) = {
            let mut inner = self.inner.lock().expect("lock");
            match inner.chunks.get(&chunk) {
                Some(m) => {
                    let torn: Vec<usize> = (first..first + crcs.len())
                        .filter(|b| m.torn.get(*b))
                        .collect();
                    (m.slot, false, torn)
                }
                None => (
                    inner.free.pop_first().ok_or(EngineError::NoSpace)?,
                    true,
                    vec![],
                ),
            }
        };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut ops = vec![Op::Journal(Journal {
            seq,
            chunk,
            slot,
            first_block: first,
            data: data.clone(),
        })];
        ops.extend(
            crcs.iter()
                .enumerate()
                .map(|(i, c)| Op::Block(chunk, first + i, *c)),
        );
        ops.extend(torn.iter().map(|b| Op::Torn(chunk, *b, false)));
        if new_slot {
            ops.push(Op::Slot(chunk, slot));
        }
        // Step 1: data, checksums (and the slot) on media, atomically: the write is durable.
        if let Err(e) = self.index_sync(ops).await {
            if new_slot {
                self.inner.lock().expect("lock").free.insert(slot);
            }
            return Err(e);
        }
        // Step 2: in place. A crash before it lands is repaired by replay at the next open.
        if let Err(e) = self
            .file
            .write_at(self.sb.slot_offset(slot) + offset, data)
            .await
        {
            // The index already holds the new checksums, and the bytes in place are unknown:
            // serving reads now could report false corruption, so stop until a restart
            // replays the journal.
            self.file.poison();
            return Err(io_err(e));
        }
        {
            let mut inner = self.inner.lock().expect("lock");
            let m = inner.chunks.entry(chunk).or_insert_with(|| Meta::new(slot));
            for (i, c) in crcs.iter().enumerate() {
                m.crcs[first + i] = *c;
                m.mapped.set(first + i, true);
                m.torn.set(first + i, false);
            }
        }
        let due = {
            let mut j = self.journaled.lock().expect("journal lock");
            j.push(seq);
            j.len() >= CHECKPOINT_EVERY
        };
        drop(_g);
        if due {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Decides, block by block, what a write that may have been cut by a crash left behind.
    async fn recover_intent(
        &self,
        inner: &mut Inner,
        it: &Intent,
        ops: &mut Vec<Op>,
    ) -> anyhow::Result<()> {
        let n = it.crcs.len();
        let off = self.sb.slot_offset(it.slot) + it.first_block as u64 * BLOCK_SIZE;
        let data = self.file.read_at(off, n * BLOCK_SIZE as usize).await?;
        let existed = inner.chunks.contains_key(&it.chunk);
        let mut new_blocks = 0;
        let mut torn = 0;
        {
            let m = inner
                .chunks
                .entry(it.chunk)
                .or_insert_with(|| Meta::new(it.slot));
            for (i, block) in data.as_ref().chunks(BLOCK_SIZE as usize).enumerate() {
                let b = it.first_block + i;
                let crc = crc32c::crc32c(block);
                if crc == it.crcs[i] {
                    m.crcs[b] = crc;
                    m.mapped.set(b, true);
                    m.torn.set(b, false);
                    ops.push(Op::Block(it.chunk, b, crc));
                    ops.push(Op::Torn(it.chunk, b, false));
                    new_blocks += 1;
                } else if m.mapped.get(b) && crc != m.crcs[b] {
                    m.torn.set(b, true);
                    ops.push(Op::Torn(it.chunk, b, true));
                    torn += 1;
                }
                // Otherwise: the old data (mapped, matching) or an unmapped block: unchanged.
            }
        }
        if !existed {
            if new_blocks > 0 {
                ops.push(Op::Slot(it.chunk, it.slot));
            } else {
                inner.chunks.remove(&it.chunk);
            }
        }
        tracing::info!(chunk = %it.chunk, blocks = n, new_blocks, torn, "recovered an interrupted write");
        Ok(())
    }

    fn lock_for(&self, chunk: ChunkId) -> Arc<tokio::sync::RwLock<()>> {
        self.locks
            .lock()
            .expect("lock")
            .entry(chunk)
            .or_default()
            .clone()
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.file.is_poisoned() {
            return Err(EngineError::Poisoned);
        }
        Ok(())
    }

    async fn index_sync(&self, ops: Vec<Op>) -> Result<()> {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || index.apply(&ops, true))
            .await
            .map_err(|e| EngineError::Index(e.to_string()))?
    }
}

impl ChunkEngine for DiskEngine {
    async fn write(&self, chunk: ChunkId, offset: u64, data: Bytes) -> Result<()> {
        check_range(offset, data.len() as u64)?;
        self.check_poisoned()?;
        if data.len() as u64 <= JOURNAL_MAX {
            return self.write_journaled(chunk, offset, data).await;
        }
        let lock = self.lock_for(chunk);
        let _g = lock.write().await;
        let crcs = block_crcs(&data);
        let first = (offset / BLOCK_SIZE) as usize;
        let (slot, new_slot) = {
            let mut inner = self.inner.lock().expect("lock");
            match inner.chunks.get(&chunk) {
                Some(m) => (m.slot, false),
                None => (inner.free.pop_first().ok_or(EngineError::NoSpace)?, true),
            }
        };
        let give_back = |e: EngineError| {
            if new_slot {
                self.inner.lock().expect("lock").free.insert(slot);
            }
            e
        };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let intent = Intent {
            seq,
            chunk,
            slot,
            first_block: first,
            crcs: crcs.clone(),
        };
        // Step 1: the intent is on media.
        self.index_sync(vec![Op::Intent(intent.clone())])
            .await
            .map_err(give_back)?;
        // Step 2 and 3: the data is on media.
        let written = async {
            self.file
                .write_at(self.sb.slot_offset(slot) + offset, data)
                .await?;
            self.file.sync().await
        }
        .await;
        if let Err(e) = written {
            // What landed is unknown: settle it the way a restart would, so reads never
            // report a false corruption for these blocks. Only this chunk is touched (its write
            // lock is held): recover on a copy of its metadata, then put that entry back.
            let mut one = Inner::default();
            if let Some(m) = self.inner.lock().expect("lock").chunks.get(&chunk).cloned() {
                one.chunks.insert(chunk, m);
            }
            let mut ops = Vec::new();
            let r = self.recover_intent(&mut one, &intent, &mut ops).await;
            {
                let mut inner = self.inner.lock().expect("lock");
                match one.chunks.remove(&chunk) {
                    Some(m) => {
                        inner.chunks.insert(chunk, m);
                    }
                    None if new_slot => {
                        inner.free.insert(slot);
                    }
                    None => {}
                }
            }
            if r.is_ok() {
                ops.push(Op::DoneIntent(seq));
                let _ = self.index.apply(&ops, true);
            }
            return Err(if self.file.is_poisoned() {
                EngineError::Poisoned
            } else {
                io_err(e)
            });
        }
        // Step 4: the CRCs replace the intent; the write is acknowledged.
        let mut ops: Vec<Op> = crcs
            .iter()
            .enumerate()
            .map(|(i, c)| Op::Block(chunk, first + i, *c))
            .collect();
        if new_slot {
            ops.push(Op::Slot(chunk, slot));
        }
        ops.push(Op::DoneIntent(seq));
        {
            let mut inner = self.inner.lock().expect("lock");
            let m = inner.chunks.entry(chunk).or_insert_with(|| Meta::new(slot));
            for (i, c) in crcs.iter().enumerate() {
                if m.torn.get(first + i) {
                    ops.push(Op::Torn(chunk, first + i, false));
                    m.torn.set(first + i, false);
                }
                m.crcs[first + i] = *c;
                m.mapped.set(first + i, true);
            }
        }
        self.index.apply(&ops, false)
    }

    async fn read(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<Bytes> {
        check_range(offset, len)?;
        self.check_poisoned()?;
        let lock = self.lock_for(chunk);
        let _g = lock.read().await;
        let first = (offset / BLOCK_SIZE) as usize;
        let n = (len / BLOCK_SIZE) as usize;
        let snapshot = {
            let inner = self.inner.lock().expect("lock");
            inner.chunks.get(&chunk).map(|m| {
                let blocks: Vec<(bool, bool, u32)> = (first..first + n)
                    .map(|b| (m.mapped.get(b), m.torn.get(b), m.crcs[b]))
                    .collect();
                (m.slot, blocks)
            })
        };
        let Some((slot, blocks)) = snapshot.filter(|(_, b)| b.iter().any(|x| x.0)) else {
            return Ok(Bytes::from(vec![0u8; len as usize]));
        };
        let mut buf = self
            .file
            .read_at(self.sb.slot_offset(slot) + offset, len as usize)
            .await
            .map_err(io_err)?;
        for (i, block) in buf.as_mut().chunks_mut(BLOCK_SIZE as usize).enumerate() {
            let (mapped, torn, crc) = blocks[i];
            if !mapped {
                block.fill(0);
            } else if torn {
                return Err(EngineError::Torn {
                    chunk,
                    block: first + i,
                });
            } else if crc32c::crc32c(block) != crc {
                self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%chunk, block = first + i, "checksum mismatch: corrupt block");
                return Err(EngineError::Corrupt {
                    chunk,
                    block: first + i,
                });
            }
        }
        Ok(buf.into_bytes())
    }

    async fn discard(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len)?;
        self.check_poisoned()?;
        let lock = self.lock_for(chunk);
        let _g = lock.write().await;
        let first = (offset / BLOCK_SIZE) as usize;
        let n = (len / BLOCK_SIZE) as usize;
        let plan = {
            let inner = self.inner.lock().expect("lock");
            inner.chunks.get(&chunk).map(|m| {
                let mut ops = Vec::new();
                let mut after = m.mapped.clone();
                for b in first..first + n {
                    if m.mapped.get(b) {
                        ops.push(Op::Unmap(chunk, b));
                        after.set(b, false);
                    }
                    if m.torn.get(b) {
                        ops.push(Op::Torn(chunk, b, false));
                    }
                }
                let free = after.count() == 0;
                if free {
                    ops.push(Op::FreeSlot(chunk));
                }
                (m.slot, ops, free)
            })
        };
        let Some((slot, ops, free)) = plan else {
            return Ok(());
        };
        // The index forgets the blocks before their bytes go: a crash between leaves unmapped
        // blocks (zeros), never mapped blocks over a hole.
        self.index_sync(ops).await?;
        {
            let mut inner = self.inner.lock().expect("lock");
            if free {
                inner.chunks.remove(&chunk);
                inner.free.insert(slot);
            } else if let Some(m) = inner.chunks.get_mut(&chunk) {
                for b in first..first + n {
                    m.mapped.set(b, false);
                    m.torn.set(b, false);
                }
            }
        }
        let (off, l) = if free { (0, CHUNK_SIZE) } else { (offset, len) };
        self.file.punch_hole(self.sb.slot_offset(slot) + off, l);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.check_poisoned()?;
        // Acknowledged writes are durable already; this also retires the journal.
        self.checkpoint().await?;
        self.file.sync().await.map_err(|_| EngineError::Poisoned)
    }

    fn chunk_info(&self, chunk: ChunkId) -> Result<Option<ChunkInfo>> {
        let inner = self.inner.lock().expect("lock");
        Ok(inner.chunks.get(&chunk).map(|m| ChunkInfo {
            chunk,
            mapped: m.mapped.0.to_vec(),
            mapped_blocks: m.mapped.count(),
        }))
    }

    fn chunks(&self) -> Vec<ChunkId> {
        let mut v: Vec<ChunkId> = self
            .inner
            .lock()
            .expect("lock")
            .chunks
            .keys()
            .copied()
            .collect();
        v.sort();
        v
    }

    fn stats(&self) -> EngineStats {
        let inner = self.inner.lock().expect("lock");
        EngineStats {
            chunks: inner.chunks.len() as u64,
            free_slots: inner.free.len() as u64,
            corrupt_reads: self.corrupt_reads.load(Ordering::Relaxed),
            torn_blocks: inner.chunks.values().map(|m| m.torn.count() as u64).sum(),
        }
    }
}
