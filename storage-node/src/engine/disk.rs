//! The disk engine: chunks in fixed 4 MiB slots of a disk file or block device, a write-ahead
//! log in its own region of the same disk (`log`), and the chunk index in RocksDB beside it,
//! brought up to date from the log at checkpoints — RocksDB is off the write path.
//!
//! # Write protocol, and what a crash at each step leaves
//! Small writes (≤ [`JOURNAL_MAX`]), with one flush:
//! 1. A log record with the data itself (and, for a new chunk, its slot) is made durable,
//!    batched with every other record queued meanwhile (one RWF_DSYNC write per batch).
//!    Crash before it is durable: replay does not find it (or finds it torn and ignores it);
//!    the old data and checksums stand. After: the write is durable, and replay redoes it.
//!    The write is acknowledged.
//! 2. The data is written in place, not flushed, while the chunk stays locked (a read of it
//!    waits for this step). A crash before it reaches media is repaired by replay, which puts
//!    the logged data in place again.
//!
//! Large writes, whose bandwidth matters more than a second flush:
//! 1. A log record with the new checksum of every block (an *intent*) is made durable. Crash
//!    after: every block still holds its old data and stays as it was.
//! 2. The data is written in place, then flushed. Crash during or after: each block holds the
//!    old data, the new data, or — only on power loss on a device without atomic 4 KiB writes —
//!    a mix. Replay tells them apart by checksum: new → committed, old → kept, neither →
//!    marked torn (reads fail with `Torn`, not `Corrupt`; the write was never acknowledged).
//!    After the flush the write is acknowledged.
//!
//! Discard: a log record, made durable; then the blocks are unmapped in memory and the space is
//! punched out of the file. Crash in between: replay unmaps them again.
//!
//! # Checkpoints
//! When the log is half full (after the write that filled it, or when a write finds no room):
//! with no operation between its log record and its effect in memory, the engine notes the
//! log's end and takes the blocks changed since the last checkpoint; then, letting writes go
//! on, it flushes the disk (every in-place write of a record before that end is on media after
//! it) and writes those blocks' state and the new log
//! tail to the index in one synced batch. Crash before that batch: the old tail stands and
//! replay redoes the records, which is idempotent. After it, the log before the tail is free.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};

use super::index::{Index, Op};
use super::io::{DiskFile, IoKind};
use super::log::{self, Log, Record, Tail};
use super::rangelock::RangeLocks;
use super::replay::{Chunks, Meta};
use super::*;
use crate::format::{Superblock, SUPERBLOCK_SIZE};

/// Writes up to this size go through the log with their data (one flush); larger ones write
/// only their checksums there and flush the data in place (two flushes, no double write).
pub const JOURNAL_MAX: u64 = 64 << 10;
/// Added to the log's sequence numbers at every open, so a batch torn by the crash before can
/// never be taken for a later one written over the same place.
const SEQ_GAP: u64 = 1 << 20;

fn io_err(e: std::io::Error) -> EngineError {
    EngineError::Io(e)
}

pub struct DiskEngine {
    s: Arc<Shared>,
}

struct Shared {
    sb: Superblock,
    file: Arc<DiskFile>,
    index: Arc<Index>,
    log: Arc<Log>,
    inner: Arc<Mutex<Chunks>>,
    /// Block-range locks: a write holds its blocks, a discard its whole chunk, a read shares
    /// its blocks — so a read never sees a block between its data and its checksum, and
    /// operations on disjoint blocks of a chunk do not wait for each other.
    locks: RangeLocks,
    /// Held shared by every operation from its log record until its effect is in memory and
    /// in place; a checkpoint takes it exclusively for the moment it needs a consistent view.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// One checkpoint at a time.
    checkpointing: tokio::sync::Mutex<()>,
    corrupt_reads: AtomicU64,
    checkpoints: AtomicU64,
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

    /// The size of a disk file that holds `slots` chunks.
    pub fn file_size_for(slots: u64) -> u64 {
        Superblock::disk_size_for(slots, CHUNK_SIZE)
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
                format(&file, disk).await?
            }
            Err(e) => anyhow::bail!("disk {}: {e}; refusing to use it", disk.display()),
        };
        let file = Arc::new(file);
        let index = Index::open(&index_dir.join(sb.uuid_string()), &sb.uuid_string())?;
        let (chunks, tail) = recover(&sb, &file, &index).await?;
        let s = Arc::new(Shared {
            log: Arc::new(Log::new(
                file.clone(),
                sb.log_offset,
                sb.log_size,
                log::salt(&sb.uuid),
                tail,
            )),
            sb,
            file,
            index: Arc::new(index),
            inner: Arc::new(Mutex::new(chunks)),
            locks: RangeLocks::default(),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            checkpointing: tokio::sync::Mutex::new(()),
            corrupt_reads: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
        });
        Ok(Self { s })
    }

    /// Whether a failed write or sync has poisoned the disk (it then serves nothing).
    pub fn poisoned(&self) -> bool {
        self.s.file.is_poisoned()
    }

    /// Whether I/O goes through io_uring.
    pub fn uses_uring(&self) -> bool {
        self.s.file.uses_uring()
    }

    /// Whether its io_uring ring defers completion work to the runtime's own enters (see
    /// [`super::uring`]).
    pub fn defers_completions(&self) -> bool {
        self.s.file.defers_completions()
    }

    /// Whether the disk is opened with O_DIRECT (false only where the filesystem refused it).
    pub fn direct_io(&self) -> bool {
        self.s.file.direct
    }

    pub fn uuid(&self) -> String {
        self.s.sb.uuid_string()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.s.sb.slots * self.s.sb.chunk_size
    }

    /// What the log has written since open.
    pub fn log_stats(&self) -> log::LogStats {
        self.s.log.stats()
    }

    /// Checkpoints run since open.
    pub fn checkpoints(&self) -> u64 {
        self.s.checkpoints.load(Ordering::Relaxed)
    }

    /// Bytes of the log in use (records not yet covered by a checkpoint).
    pub fn log_used(&self) -> u64 {
        self.s.log.used()
    }

    /// Byte offset on the disk of `offset` within `chunk`, if the chunk holds a slot (tests and
    /// operators use it to look at or damage the raw data).
    pub fn disk_offset(&self, chunk: ChunkId, offset: u64) -> Option<u64> {
        let inner = self.s.inner.lock().expect("lock");
        inner
            .chunks
            .get(&chunk)
            .map(|m| self.s.sb.slot_offset(m.slot) + offset)
    }

    /// Waits until every acknowledged write is also in place (small writes finish that step
    /// after their acknowledgement). For tests and tools that look at the raw disk.
    pub async fn settle(&self) {
        let watch = self.s.file.watch();
        drop(self.s.gate.write().await);
        drop(watch);
    }

    /// Runs a checkpoint now (normally the log asks for one when it is half full).
    pub async fn checkpoint(&self) -> Result<()> {
        self.s.checkpoint().await
    }

    /// Makes `r` durable in the log and stops there, as a crash right after step 1 of an
    /// operation would; the engine must be dropped (the "crash") before anything else.
    #[cfg(any(test, feature = "conformance"))]
    pub async fn crash_after_log(&self, r: Record) -> Result<()> {
        self.s.reserve(&r).await?;
        let _gate = self.s.gate.read().await;
        self.s.log.append(r).await.map_err(io_err)?;
        Ok(())
    }
}

/// Formats a disk: the superblock, and zeros over the log region, so later log writes
/// allocate nothing (on a file) and a stale batch can never be found there.
async fn format(file: &DiskFile, disk: &Path) -> anyhow::Result<Superblock> {
    let size = file.size()?;
    let sb = Superblock::new(size, CHUNK_SIZE).ok_or_else(|| {
        anyhow::anyhow!(
            "disk {} ({size} bytes) is too small for its log and one chunk",
            disk.display()
        )
    })?;
    let zeros = io::AlignedBuf::zeroed(1 << 20).into_bytes();
    let mut at = 0;
    while at < sb.log_size {
        let n = (sb.log_size - at).min(zeros.len() as u64);
        file.write_at(sb.log_offset + at, zeros.slice(..n as usize))
            .await?;
        at += n;
    }
    // The zeroed log reaches media before the superblock is written: a crash in between
    // leaves no superblock, and the next open formats again.
    file.sync().await?;
    file.write_at(0, Bytes::from(sb.encode())).await?;
    // After this sync the disk is a Cairn disk.
    file.sync().await?;
    tracing::info!(disk = %disk.display(), uuid = %sb.uuid_string(), slots = sb.slots, log_bytes = sb.log_size, "formatted disk");
    Ok(sb)
}

/// The chunk state at open: the index's checkpoint, then the log replayed over it. Replayed
/// data is put in place and flushed, and the result checkpointed (synced) before the engine
/// serves anything; the log then starts empty. Returns the state and the log's new tail.
async fn recover(
    sb: &Superblock,
    file: &Arc<DiskFile>,
    index: &Index,
) -> anyhow::Result<(Chunks, Tail)> {
    let loaded = index.load()?;
    let mut c = Chunks::default();
    for (chunk, slot) in loaded.slots {
        anyhow::ensure!(
            slot < sb.slots,
            "index maps chunk {chunk} to slot {slot} past the disk's end"
        );
        c.chunks.insert(chunk, Meta::new(slot));
    }
    for (chunk, b, crc) in loaded.blocks {
        let m = c
            .chunks
            .get_mut(&chunk)
            .ok_or_else(|| anyhow::anyhow!("block of chunk {chunk} without a slot"))?;
        m.crcs[b] = crc;
        m.mapped.set(b, true);
    }
    for (chunk, b) in loaded.torn {
        if let Some(m) = c.chunks.get_mut(&chunk) {
            m.torn.set(b, true);
        }
    }
    let used: BTreeSet<u64> = c.chunks.values().map(|m| m.slot).collect();
    c.free = (0..sb.slots).filter(|s| !used.contains(s)).collect();

    let tail = loaded.tail.unwrap_or(Tail { pos: 0, seq: 1 });
    let salt = log::salt(&sb.uuid);
    let replay = Log::read(file, sb.log_offset, sb.log_size, salt, tail).await?;
    let records = replay.records.len();
    let mut pending = HashMap::new();
    for (_, r) in replay.records {
        c.replay(r, sb.slots, &mut pending, |slot, first, n| {
            read_blocks(file, sb, slot, first, n)
        })
        .await?;
    }
    let replayed = pending.len();
    for ((chunk, b), data) in pending {
        let Some(slot) = c.chunks.get(&chunk).map(|m| m.slot) else {
            continue;
        };
        file.write_at(sb.slot_offset(slot) + b as u64 * BLOCK_SIZE, data)
            .await?;
    }
    // The replayed data reaches media before the index moves past the records holding it.
    file.sync().await?;
    let end = Tail {
        pos: replay.end.pos,
        seq: replay.end.seq + SEQ_GAP,
    };
    let mut ops = c.take_dirty();
    ops.push(Op::Tail(end));
    // Synced: the recovered state is final before the engine serves anything.
    index.apply(&ops, true)?;
    if records > 0 {
        tracing::info!(
            records,
            blocks_put_back = replayed,
            "replayed the disk's log"
        );
    }
    Ok((c, end))
}

/// Reads `n` blocks of a slot from block `first`.
async fn read_blocks(
    file: &DiskFile,
    sb: &Superblock,
    slot: u64,
    first: usize,
    n: usize,
) -> std::io::Result<Bytes> {
    let len = n * BLOCK_SIZE as usize;
    Ok(file
        .read_at(sb.slot_offset(slot) + first as u64 * BLOCK_SIZE, len)
        .await?
        .into_bytes())
}

fn poison(file: &DiskFile, log: &Log) -> EngineError {
    file.poison();
    log.fail();
    EngineError::Poisoned
}

impl Shared {
    fn check_poisoned(&self) -> Result<()> {
        if self.file.is_poisoned() {
            return Err(EngineError::Poisoned);
        }
        Ok(())
    }

    /// The chunk's slot, taking a free one for a new chunk. The new chunk is there at once,
    /// with nothing mapped, so concurrent first writes to other blocks of it share the slot.
    /// If the write then fails it stays so (reads see zeros); a restart drops it.
    fn slot_for(&self, chunk: ChunkId) -> Result<u64> {
        let mut inner = self.inner.lock().expect("lock");
        if let Some(m) = inner.chunks.get(&chunk) {
            return Ok(m.slot);
        }
        let slot = inner.free.pop_first().ok_or(EngineError::NoSpace)?;
        inner.chunks.insert(chunk, Meta::new(slot));
        Ok(slot)
    }

    /// Locks blocks of a chunk ([`RangeLocks`]). A request that has to wait may be waiting for
    /// a small write's in-place step, whose completion the disk's ring does not report at once
    /// when nothing else is in flight: it watches the ring while it waits
    /// ([`DiskFile::watch`]).
    async fn lock(
        &self,
        chunk: ChunkId,
        first: usize,
        end: usize,
        write: bool,
    ) -> super::rangelock::RangeGuard {
        let mut watch = None;
        let guard = self
            .locks
            .lock_with(chunk, first, end, write, || watch = self.file.watch())
            .await;
        drop(watch);
        guard
    }

    /// The log failed or an in-place write failed after its record was durable: memory no
    /// longer describes the disk, so nothing more is served until a restart replays the log.
    fn poison(&self) -> EngineError {
        poison(&self.file, &self.log)
    }

    /// Writes `data`; `crc`, if the caller has it, is its CRC32C (see `write_checked`).
    async fn write(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: Bytes,
        crc: Option<u32>,
    ) -> Result<()> {
        let first = (offset / BLOCK_SIZE) as usize;
        let n = data.len() / BLOCK_SIZE as usize;
        let chunk_guard = self.lock(chunk, first, first + n, true).await;
        let slot = self.slot_for(chunk)?;
        // One block (most writes): its checksum is the payload's.
        let crcs = match crc {
            Some(c) if n == 1 => vec![c],
            _ => block_crcs(&data),
        };
        let small = data.len() as u64 <= JOURNAL_MAX;
        let record = if small {
            Record::Write {
                chunk,
                slot,
                first_block: first,
                data: data.clone(),
                crc: match crc {
                    Some(c) => c,
                    None if n == 1 => crcs[0],
                    None => crc32c::crc32c(&data),
                },
            }
        } else {
            Record::Intent {
                chunk,
                slot,
                first_block: first,
                crcs: crcs.clone(),
            }
        };
        self.reserve(&record).await?;
        let gate = self.gate.clone().read_owned().await;
        // Step 1: the record is durable.
        if self.log.append(record).await.is_err() {
            return Err(self.poison());
        }
        let at = self.sb.slot_offset(slot) + offset;
        if small {
            // Step 2, after the acknowledgement: in place, not flushed; replay repairs it if it
            // never lands. Until it has landed and memory knows the new checksums, the chunk
            // stays locked (reads and writes of it wait) and the gate held (a checkpoint
            // waits); if it fails, the disk is poisoned and a restart replays the log.
            let (file, log, inner) = (self.file.clone(), self.log.clone(), self.inner.clone());
            tokio::spawn(async move {
                // Batched, its completion taken whenever convenient, unless someone waits for
                // it (they watch the ring: `lock`, checkpoints).
                if file.write_at_batched(at, data).await.is_err() {
                    tracing::error!(%chunk, "in-place write of a logged write failed");
                    poison(&file, &log);
                } else {
                    inner
                        .lock()
                        .expect("lock")
                        .set_blocks(chunk, slot, first, &crcs);
                }
                drop(gate);
                drop(chunk_guard);
            });
            return Ok(());
        }
        // Step 2: in place, then flushed.
        let written = async {
            self.file.write_at(at, data).await?;
            self.file.sync().await
        }
        .await;
        if let Err(e) = written {
            return Err(self
                .settle_failed_intent(chunk, slot, first, &crcs, e)
                .await);
        }
        self.inner
            .lock()
            .expect("lock")
            .set_blocks(chunk, slot, first, &crcs);
        drop(gate);
        drop(chunk_guard);
        Ok(())
    }

    /// A large write failed after its intent was durable: what landed is unknown. Settle it as
    /// replay would, so reads never report a false corruption for these blocks.
    async fn settle_failed_intent(
        &self,
        chunk: ChunkId,
        slot: u64,
        first: usize,
        crcs: &[u32],
        e: std::io::Error,
    ) -> EngineError {
        if self.file.is_poisoned() {
            return self.poison();
        }
        let on_disk = match read_blocks(&self.file, &self.sb, slot, first, crcs.len()).await {
            Ok(b) => b,
            Err(_) => return self.poison(),
        };
        self.inner.lock().expect("lock").settle_intent(
            chunk,
            first,
            crcs,
            &on_disk,
            &HashMap::new(),
        );
        io_err(e)
    }

    /// Reads and checks blocks; with the payload's CRC32C when it is a lone mapped block's
    /// (just checked against it), else `None`.
    async fn read(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<(Bytes, Option<u32>)> {
        let first = (offset / BLOCK_SIZE) as usize;
        let n = (len / BLOCK_SIZE) as usize;
        let _g = self.lock(chunk, first, first + n, false).await;
        let snapshot = {
            let inner = self.inner.lock().expect("lock");
            inner.chunks.get(&chunk).map(|m| {
                let blocks: Vec<(bool, bool, u32)> = (first..first + n)
                    .map(|b| (m.mapped.get(b), m.torn.get(b), m.crcs[b]))
                    .collect();
                (m.slot, blocks)
            })
        };
        let Some((slot, blocks)) = snapshot.filter(|(_, b)| b.iter().any(|x| x.0 || x.1)) else {
            return Ok((Bytes::from(vec![0u8; len as usize]), None));
        };
        let mut buf = self
            .file
            .read_at(self.sb.slot_offset(slot) + offset, len as usize)
            .await
            .map_err(io_err)?;
        for (i, block) in buf.as_mut().chunks_mut(BLOCK_SIZE as usize).enumerate() {
            let (mapped, torn, crc) = blocks[i];
            if torn {
                return Err(EngineError::Torn {
                    chunk,
                    block: first + i,
                });
            } else if !mapped {
                block.fill(0);
            } else if crc32c::crc32c(block) != crc {
                self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%chunk, block = first + i, "checksum mismatch: corrupt block");
                return Err(EngineError::Corrupt {
                    chunk,
                    block: first + i,
                });
            }
        }
        let crc = match blocks[..] {
            [(true, false, crc)] => Some(crc),
            _ => None,
        };
        Ok((buf.into_bytes(), crc))
    }

    async fn discard(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<()> {
        // The whole chunk: a discard may empty it and give its slot back.
        let _g = self.lock(chunk, 0, BLOCKS_PER_CHUNK, true).await;
        let first = (offset / BLOCK_SIZE) as usize;
        let n = (len / BLOCK_SIZE) as usize;
        let anything = {
            let inner = self.inner.lock().expect("lock");
            inner
                .chunks
                .get(&chunk)
                .is_some_and(|m| (first..first + n).any(|b| m.mapped.get(b) || m.torn.get(b)))
        };
        if !anything {
            return Ok(());
        }
        let record = Record::Discard {
            chunk,
            first_block: first,
            blocks: n,
        };
        self.reserve(&record).await?;
        let freed = {
            let _gate = self.gate.read().await;
            // The record is durable before any block is forgotten: a crash after it replays
            // the discard; before it, nothing changed.
            if self.log.append(record).await.is_err() {
                return Err(self.poison());
            }
            self.inner.lock().expect("lock").unmap(chunk, first, n)
        };
        // The space goes back after the blocks are unmapped (they read as zeros whatever the
        // file holds), and a freed slot is reused only after its hole is punched — never
        // punching a hole in another chunk's new data.
        match freed {
            Some(slot) => {
                self.file.punch_hole(self.sb.slot_offset(slot), CHUNK_SIZE);
                self.inner.lock().expect("lock").free.insert(slot);
            }
            None => self
                .file
                .punch_hole(self.sb.slot_offset(self.slot_of(chunk)?) + offset, len),
        }
        Ok(())
    }

    /// Room in the log for `r`, checkpointing while there is none. Called before the gate is
    /// taken (a checkpoint waits for the gate's holders).
    async fn reserve(&self, r: &Record) -> Result<()> {
        let refused = |e| {
            if self.file.is_poisoned() {
                EngineError::Poisoned
            } else {
                EngineError::Io(e)
            }
        };
        while !self.log.try_reserve(r).map_err(refused)? {
            self.checkpoint().await?;
            // What is left is reserved by records on their way into a batch; let them land.
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// A checkpoint if the log is over half full and none is running; the caller waits for it
    /// (a write that finds the log half full pays for the checkpoint, once per half a log).
    /// The operation itself is durable already: a failed checkpoint poisons the disk for what
    /// comes next, it does not fail this one.
    async fn maybe_checkpoint(&self) {
        if !self.log.wants_checkpoint() {
            return;
        }
        let Ok(one) = self.checkpointing.try_lock() else {
            return;
        };
        if let Err(e) = self.checkpoint_locked(one).await {
            tracing::error!(error = %e, "checkpoint failed; the disk is poisoned");
        }
    }

    fn slot_of(&self, chunk: ChunkId) -> Result<u64> {
        self.inner
            .lock()
            .expect("lock")
            .chunks
            .get(&chunk)
            .map(|m| m.slot)
            .ok_or_else(|| EngineError::Index(format!("chunk {chunk} vanished under its lock")))
    }

    /// Moves the index up to the log's end and frees the log before it. See the module
    /// comment for what a crash at each step leaves.
    async fn checkpoint(&self) -> Result<()> {
        let one = self.checkpointing.lock().await;
        self.checkpoint_locked(one).await
    }

    async fn checkpoint_locked(&self, _one: tokio::sync::MutexGuard<'_, ()>) -> Result<()> {
        self.check_poisoned()?;
        let (end, mut ops) = {
            // Exclusive for a moment: every record before `end` has its effect in memory (and
            // its in-place write complete), and no record after it does.
            let watch = self.file.watch();
            let _all = self.gate.write().await;
            drop(watch);
            let end = self.log.end();
            let ops = self.inner.lock().expect("lock").take_dirty();
            (end, ops)
        };
        if ops.is_empty() && self.log.used() == 0 {
            return Ok(());
        }
        // Step 1: the in-place data of every record before `end` is on media.
        if self.file.sync().await.is_err() {
            return Err(self.poison());
        }
        // Step 2: the index holds the state as of `end`, and the new tail.
        ops.push(Op::Tail(end));
        let index = self.index.clone();
        let applied = tokio::task::spawn_blocking(move || index.apply(&ops, true))
            .await
            .map_err(|e| EngineError::Index(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = applied {
            // The dirty set is gone from memory and not in the index: only a replay of the
            // log from the old tail can rebuild it.
            tracing::error!(error = %e, "checkpoint could not write the index");
            return Err(self.poison());
        }
        self.log.retire(end);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl ChunkEngine for DiskEngine {
    async fn write(&self, chunk: ChunkId, offset: u64, data: Bytes) -> Result<()> {
        check_range(offset, data.len() as u64)?;
        self.s.check_poisoned()?;
        self.s.write(chunk, offset, data, None).await?;
        self.s.maybe_checkpoint().await;
        Ok(())
    }

    async fn write_checked(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: Bytes,
        crc: u32,
    ) -> Result<()> {
        check_range(offset, data.len() as u64)?;
        self.s.check_poisoned()?;
        debug_assert_eq!(
            crc,
            crc32c::crc32c(&data),
            "write_checked with a wrong checksum"
        );
        self.s.write(chunk, offset, data, Some(crc)).await?;
        self.s.maybe_checkpoint().await;
        Ok(())
    }

    async fn read(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<Bytes> {
        check_range(offset, len)?;
        self.s.check_poisoned()?;
        Ok(self.s.read(chunk, offset, len).await?.0)
    }

    async fn read_checked(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<(Bytes, u32)> {
        check_range(offset, len)?;
        self.s.check_poisoned()?;
        let (data, crc) = self.s.read(chunk, offset, len).await?;
        let crc = crc.unwrap_or_else(|| crc32c::crc32c(&data));
        Ok((data, crc))
    }

    async fn discard(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len)?;
        self.s.check_poisoned()?;
        self.s.discard(chunk, offset, len).await?;
        self.s.maybe_checkpoint().await;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        // Every acknowledged write is durable already (in the log or flushed in place).
        self.s.check_poisoned()
    }

    fn chunk_info(&self, chunk: ChunkId) -> Result<Option<ChunkInfo>> {
        let inner = self.s.inner.lock().expect("lock");
        Ok(inner.chunks.get(&chunk).map(|m| ChunkInfo {
            chunk,
            mapped: m.mapped.0.to_vec(),
            mapped_blocks: m.mapped.count(),
            // A torn block holds neither version: its CRC is reported as 0, so a comparison
            // with a healthy replica finds it different and copies it.
            crcs: (0..m.crcs.len())
                .map(|b| {
                    if m.mapped.get(b) && !m.torn.get(b) {
                        m.crcs[b]
                    } else {
                        0
                    }
                })
                .collect(),
        }))
    }

    fn chunks(&self) -> Vec<ChunkId> {
        let mut v: Vec<ChunkId> = self
            .s
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
        let inner = self.s.inner.lock().expect("lock");
        EngineStats {
            chunks: inner.chunks.len() as u64,
            free_slots: inner.free.len() as u64,
            corrupt_reads: self.s.corrupt_reads.load(Ordering::Relaxed),
            torn_blocks: inner.chunks.values().map(|m| m.torn.count() as u64).sum(),
        }
    }
}
