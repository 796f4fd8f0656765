//! The disk's write-ahead log: a ring of 4 KiB blocks in its own region of the disk, written in
//! batches with one O_DIRECT write and one flush each (group commit), never through the
//! filesystem's metadata path (the region is written with zeros once, at format, so later
//! writes to it allocate nothing).
//!
//! What goes in it, in order: small writes with their data ([`Record::Write`]), the checksums
//! of large writes before their data goes in place ([`Record::Intent`]), and discards
//! ([`Record::Discard`]). Every change to a chunk's blocks is one record, so replaying the log
//! in sequence order over the index's last checkpoint gives back exactly the state every
//! acknowledged operation left.
//!
//! # Batch format (little-endian)
//! One header block, then the payload blocks of its records, back to back:
//! ```text
//! header  0   4  magic "CLOG"          entries at 32, each 33 bytes:
//!         4   2  format (1)              0  1  kind (1 write, 2 intent, 3 discard)
//!         6   2  record count            1 16  chunk (volume, index; big-endian)
//!         8   8  first record's seq     17  8  slot
//!        16   4  payload blocks         25  2  first block
//!        20   8  reserved (0)           27  2  blocks
//!        28   4  CRC32C (see below)     29  4  CRC32C of the record's payload (0: none)
//! ```
//! The header CRC covers bytes 0..28 and the entries, seeded with the disk's uuid, so a block
//! of guest data that happens to look like a header on another disk is not taken for one.
//! Payload: a write's data; an intent's block checksums (4 bytes each, little-endian), padded
//! to a block; a discard has none.
//!
//! A batch is valid only if its header and every record's payload check out. Up to
//! [`MAX_INFLIGHT`] batches are written at once, but a record is acknowledged only when its
//! batch and every batch before it are durable; so a crash leaves, after the last batch any
//! acknowledgement depended on, at most a few batches in any state, and the first invalid
//! batch (torn, not yet written, or stale from the ring's previous lap: its sequence number is
//! not the next one) is the end of the log — nothing after it was acknowledged.
//!
//! # Positions
//! Positions are virtual byte counts that only grow; a batch sits at `position % size` in the
//! region and never wraps: one that would cross the end starts the next lap instead.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use super::io::{AlignedBuf, DiskFile};
use super::{ChunkId, BLOCKS_PER_CHUNK, BLOCK_SIZE};

pub const LOG_MAGIC: &[u8; 4] = b"CLOG";
pub const LOG_FORMAT: u16 = 1;
const BLOCK: usize = BLOCK_SIZE as usize;
const HEADER_FIXED: usize = 32;
const ENTRY: usize = 33;
/// Records per batch: as many entries as fit in the header block.
pub const MAX_ENTRIES: usize = (BLOCK - HEADER_FIXED) / ENTRY;
/// Payload bytes per batch.
pub const MAX_PAYLOAD: usize = 256 << 10;
/// Batches written at once (the device works on them in parallel; their flushes merge).
pub const MAX_INFLIGHT: usize = 4;
/// The most the batches in flight take in the region (header, payload, and the end of a lap
/// each may skip).
const MAX_BATCH_SPAN: u64 = (MAX_INFLIGHT * 2 * (BLOCK + MAX_PAYLOAD)) as u64;

/// One change to a chunk's blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A small write, with its data (whole blocks).
    Write {
        chunk: ChunkId,
        slot: u64,
        first_block: usize,
        data: Bytes,
        /// CRC32C of `data` (the record's payload checksum), as the client sent it and the node
        /// checked it on arrival: stored as is, the log checks the data end to end.
        crc: u32,
    },
    /// A large write about to go in place: the new checksum of each of its blocks.
    Intent {
        chunk: ChunkId,
        slot: u64,
        first_block: usize,
        crcs: Vec<u32>,
    },
    /// Blocks unmapped (discard, write-zeroes).
    Discard {
        chunk: ChunkId,
        first_block: usize,
        blocks: usize,
    },
}

impl Record {
    /// A [`Record::Write`], its checksum computed here.
    pub fn write(chunk: ChunkId, slot: u64, first_block: usize, data: Bytes) -> Self {
        Self::Write {
            chunk,
            slot,
            first_block,
            crc: crc32c::crc32c(&data),
            data,
        }
    }

    pub fn chunk(&self) -> ChunkId {
        match self {
            Self::Write { chunk, .. }
            | Self::Intent { chunk, .. }
            | Self::Discard { chunk, .. } => *chunk,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Self::Write { .. } => 1,
            Self::Intent { .. } => 2,
            Self::Discard { .. } => 3,
        }
    }

    fn blocks(&self) -> usize {
        match self {
            Self::Write { data, .. } => data.len() / BLOCK,
            Self::Intent { crcs, .. } => crcs.len(),
            Self::Discard { blocks, .. } => *blocks,
        }
    }

    fn payload_blocks(&self) -> usize {
        match self {
            Self::Write { data, .. } => data.len() / BLOCK,
            Self::Intent { crcs, .. } => (crcs.len() * 4).div_ceil(BLOCK),
            Self::Discard { .. } => 0,
        }
    }

    /// Bytes this record takes in the log: its payload and a header block's worth (a batch of
    /// one record needs a whole header block).
    pub fn log_bytes(&self) -> u64 {
        ((1 + self.payload_blocks()) * BLOCK) as u64
    }

    /// The payload of an intent or a discard (a write's is its data, copied directly).
    fn payload(&self) -> Vec<u8> {
        match self {
            Self::Write { data, .. } => data.to_vec(),
            Self::Intent { crcs, .. } => crcs.iter().flat_map(|c| c.to_le_bytes()).collect(),
            Self::Discard { .. } => Vec::new(),
        }
    }
}

/// The salt of a disk's header checksums.
pub fn salt(uuid: &[u8; 16]) -> u32 {
    crc32c::crc32c(uuid)
}

/// Encodes a batch of records whose sequence numbers start at `first_seq`. Panics if the batch
/// breaks the limits ([`MAX_ENTRIES`], [`MAX_PAYLOAD`]): callers build batches within them.
pub fn encode_batch(first_seq: u64, records: &[&Record], salt: u32) -> AlignedBuf {
    assert!(!records.is_empty() && records.len() <= MAX_ENTRIES);
    let payload_blocks: usize = records.iter().map(|r| r.payload_blocks()).sum();
    assert!(payload_blocks * BLOCK <= MAX_PAYLOAD);
    // A write's data goes straight from its buffer into the batch, and only the header and
    // the padding are zeroed (this is every small write's path).
    let payloads: Vec<std::borrow::Cow<[u8]>> = records
        .iter()
        .map(|r| match r {
            Record::Write { data, .. } => std::borrow::Cow::Borrowed(&data[..]),
            _ => std::borrow::Cow::Owned(r.payload()),
        })
        .collect();
    let mut parts = Vec::with_capacity(records.len());
    let mut at = BLOCK;
    for (r, p) in records.iter().zip(&payloads) {
        if !p.is_empty() {
            parts.push((at, &p[..]));
        }
        at += r.payload_blocks() * BLOCK;
    }
    let mut buf = AlignedBuf::assemble((1 + payload_blocks) * BLOCK, &parts);
    let b = buf.as_mut();
    b[0..4].copy_from_slice(LOG_MAGIC);
    b[4..6].copy_from_slice(&LOG_FORMAT.to_le_bytes());
    b[6..8].copy_from_slice(&(records.len() as u16).to_le_bytes());
    b[8..16].copy_from_slice(&first_seq.to_le_bytes());
    b[16..20].copy_from_slice(&(payload_blocks as u32).to_le_bytes());
    for (i, (r, p)) in records.iter().zip(&payloads).enumerate() {
        let payload_crc = match r {
            Record::Write { crc, .. } => *crc,
            _ if p.is_empty() => 0,
            _ => crc32c::crc32c(p),
        };
        let e = &mut b[HEADER_FIXED + i * ENTRY..HEADER_FIXED + (i + 1) * ENTRY];
        let (chunk, slot, first) = match r {
            Record::Write {
                chunk,
                slot,
                first_block,
                ..
            }
            | Record::Intent {
                chunk,
                slot,
                first_block,
                ..
            } => (*chunk, *slot, *first_block),
            Record::Discard {
                chunk, first_block, ..
            } => (*chunk, 0, *first_block),
        };
        e[0] = r.kind();
        e[1..9].copy_from_slice(&chunk.volume.to_be_bytes());
        e[9..17].copy_from_slice(&chunk.index.to_be_bytes());
        e[17..25].copy_from_slice(&slot.to_le_bytes());
        e[25..27].copy_from_slice(&(first as u16).to_le_bytes());
        e[27..29].copy_from_slice(&(r.blocks() as u16).to_le_bytes());
        e[29..33].copy_from_slice(&payload_crc.to_le_bytes());
    }
    let crc = header_crc(b, records.len(), salt);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Rewrites the checksum of a header block as its entry count says (so a fuzzer can reach the
/// checks past it). Does nothing to a block too short or with too many entries.
pub fn seal_header(b: &mut [u8], salt: u32) {
    let n = usize::from(u16::from_le_bytes([
        b.get(6).copied().unwrap_or(0),
        b.get(7).copied().unwrap_or(0),
    ]));
    if b.len() >= BLOCK && n <= MAX_ENTRIES {
        let crc = header_crc(b, n, salt);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    }
}

fn header_crc(h: &[u8], entries: usize, salt: u32) -> u32 {
    let c = crc32c::crc32c_append(salt, &h[0..28]);
    crc32c::crc32c_append(c, &h[HEADER_FIXED..HEADER_FIXED + entries * ENTRY])
}

/// A batch header that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub first_seq: u64,
    pub payload_blocks: usize,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: u8,
    chunk: ChunkId,
    slot: u64,
    first_block: usize,
    blocks: usize,
    crc: u32,
}

impl Header {
    /// Blocks the whole batch takes in the region.
    pub fn span_blocks(&self) -> usize {
        1 + self.payload_blocks
    }

    pub fn records(&self) -> usize {
        self.entries.len()
    }
}

/// Decodes and checks a header block; `None` for anything that is not a valid header of this
/// disk. Never panics, whatever the bytes.
pub fn decode_header(b: &[u8], salt: u32) -> Option<Header> {
    if b.len() < BLOCK || &b[0..4] != LOG_MAGIC {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let n = usize::from(u16_at(6));
    if u16_at(4) != LOG_FORMAT || n == 0 || n > MAX_ENTRIES {
        return None;
    }
    if header_crc(b, n, salt) != u32_at(28) {
        return None;
    }
    let payload_blocks = u32_at(16) as usize;
    if payload_blocks * BLOCK > MAX_PAYLOAD {
        return None;
    }
    let mut entries = Vec::with_capacity(n);
    let mut sum = 0;
    for i in 0..n {
        let o = HEADER_FIXED + i * ENTRY;
        let e = Entry {
            kind: b[o],
            chunk: ChunkId {
                volume: u64::from_be_bytes(b[o + 1..o + 9].try_into().expect("8 bytes")),
                index: u64::from_be_bytes(b[o + 9..o + 17].try_into().expect("8 bytes")),
            },
            slot: u64_at(o + 17),
            first_block: usize::from(u16_at(o + 25)),
            blocks: usize::from(u16_at(o + 27)),
            crc: u32_at(o + 29),
        };
        if e.blocks == 0 || e.first_block + e.blocks > BLOCKS_PER_CHUNK {
            return None;
        }
        sum += match e.kind {
            1 => e.blocks,
            2 => (e.blocks * 4).div_ceil(BLOCK),
            3 => 0,
            _ => return None,
        };
        entries.push(e);
    }
    (sum == payload_blocks).then_some(Header {
        first_seq: u64_at(8),
        payload_blocks,
        entries,
    })
}

/// The records of a batch, given its checked header and its payload blocks; `None` if any
/// record's payload does not match its checksum (the batch was torn). Never panics.
pub fn decode_records(h: &Header, payload: &Bytes) -> Option<Vec<Record>> {
    if payload.len() != h.payload_blocks * BLOCK {
        return None;
    }
    let mut at = 0;
    let mut out = Vec::with_capacity(h.entries.len());
    for e in &h.entries {
        let r = match e.kind {
            1 => {
                let data = payload.slice(at..at + e.blocks * BLOCK);
                at += e.blocks * BLOCK;
                if crc32c::crc32c(&data) != e.crc {
                    return None;
                }
                Record::Write {
                    chunk: e.chunk,
                    slot: e.slot,
                    first_block: e.first_block,
                    data,
                    crc: e.crc,
                }
            }
            2 => {
                let raw = &payload[at..at + e.blocks * 4];
                at += (e.blocks * 4).div_ceil(BLOCK) * BLOCK;
                if crc32c::crc32c(raw) != e.crc {
                    return None;
                }
                Record::Intent {
                    chunk: e.chunk,
                    slot: e.slot,
                    first_block: e.first_block,
                    crcs: raw
                        .chunks(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect(),
                }
            }
            _ => Record::Discard {
                chunk: e.chunk,
                first_block: e.first_block,
                blocks: e.blocks,
            },
        };
        out.push(r);
    }
    Some(out)
}

/// Where the live part of the log begins: persisted in the index with each checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    pub pos: u64,
    pub seq: u64,
}

/// What [`Log::read`] found: the records from the tail, in order, and where the log ends.
pub struct Replay {
    pub records: Vec<(u64, Record)>,
    pub end: Tail,
}

/// A batch on its way to the region.
struct Batch {
    buf: AlignedBuf,
    at: u64,
    end_seq: u64,
    records: u64,
}

/// The log region of one disk and its group-committing writer.
pub struct Log {
    file: Arc<DiskFile>,
    offset: u64,
    size: u64,
    salt: u32,
    state: Mutex<State>,
    /// Woken when a batch is durable, when a leader steps down, or on failure.
    progress: Notify,
}

struct State {
    queue: VecDeque<(u64, Record)>,
    next_seq: u64,
    /// Every record below this sequence number is durable.
    durable: u64,
    /// Batches being written, in log order: (end seq, written).
    in_flight: VecDeque<(u64, bool)>,
    failed: bool,
    head: u64,
    tail: Tail,
    /// Bytes promised to records not yet in a written batch.
    reserved: u64,
    stats: LogStats,
}

/// What the log has done since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
}

impl Log {
    /// A log over `size` bytes at `offset` of `file`, continuing after `end` (from
    /// [`Log::read`], or a fresh tail).
    pub fn new(file: Arc<DiskFile>, offset: u64, size: u64, salt: u32, end: Tail) -> Self {
        Self {
            file,
            offset,
            size,
            salt,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                next_seq: end.seq,
                durable: end.seq,
                in_flight: VecDeque::new(),
                failed: false,
                head: end.pos,
                tail: end,
                reserved: 0,
                stats: LogStats::default(),
            }),
            progress: Notify::new(),
        }
    }

    /// Reads the log from `tail` to its end. Stops at the first batch that is torn, stale or
    /// not this disk's; a failed read is an error (the log cannot be trusted past it).
    pub async fn read(
        file: &DiskFile,
        offset: u64,
        size: u64,
        salt: u32,
        tail: Tail,
    ) -> std::io::Result<Replay> {
        let mut records = Vec::new();
        let mut pos = tail.pos;
        let mut seq = tail.seq;
        let lap_start = |p: u64| p + size - p % size;
        loop {
            if pos - tail.pos >= size {
                break;
            }
            // The next batch is at the head, or at the start of the next lap if it did not fit.
            let mut found = None;
            let candidates = [
                Some(pos),
                (!pos.is_multiple_of(size)).then(|| lap_start(pos)),
            ];
            for at in candidates.into_iter().flatten() {
                let head = file.read_at(offset + at % size, BLOCK).await?;
                if let Some(h) = decode_header(head.as_ref(), salt).filter(|h| h.first_seq == seq) {
                    found = Some((at, h));
                    break;
                }
            }
            let Some((at, h)) = found else { break };
            let span = (h.span_blocks() * BLOCK) as u64;
            if at % size + span > size {
                break;
            }
            let payload = if h.payload_blocks == 0 {
                Bytes::new()
            } else {
                file.read_at(offset + at % size + BLOCK as u64, h.payload_blocks * BLOCK)
                    .await?
                    .into_bytes()
            };
            let Some(recs) = decode_records(&h, &payload) else {
                break;
            };
            for (i, r) in recs.into_iter().enumerate() {
                records.push((seq + i as u64, r));
            }
            seq += h.records() as u64;
            pos = at + span;
        }
        Ok(Replay {
            records,
            end: Tail { pos, seq },
        })
    }

    /// Reserves room in the log for a record; `false` while the log is too full (a checkpoint
    /// frees it). The caller must then [`Log::append`] the record. Reserve before taking
    /// anything a checkpoint waits for.
    pub fn try_reserve(&self, r: &Record) -> std::io::Result<bool> {
        let need = r.log_bytes();
        if need + MAX_BATCH_SPAN > self.size {
            return Err(std::io::Error::other(format!(
                "a {need}-byte record can never fit the {}-byte log",
                self.size
            )));
        }
        let mut s = self.state.lock().expect("log lock");
        if s.failed {
            return Err(failed());
        }
        if s.head - s.tail.pos + s.reserved + need + MAX_BATCH_SPAN > self.size {
            return Ok(false);
        }
        s.reserved += need;
        Ok(true)
    }

    /// Whether the log is more than half full: time for a checkpoint.
    pub fn wants_checkpoint(&self) -> bool {
        let s = self.state.lock().expect("log lock");
        s.head - s.tail.pos > self.size / 2
    }

    /// Appends a record (room reserved) and returns its sequence number once it is durable.
    /// Concurrent appends share batches: a caller whose record is still queued, finding fewer
    /// than [`MAX_INFLIGHT`] batches in flight, writes one with everything queued. It first
    /// lets the tasks already ready run, so that the appends made in one turn of the runtime
    /// (the requests of one `recv`) share one batch, one write and one flush, rather than
    /// taking a batch each until [`MAX_INFLIGHT`] are in flight.
    pub async fn append(&self, r: Record) -> std::io::Result<u64> {
        let seq = {
            let mut s = self.state.lock().expect("log lock");
            let seq = s.next_seq;
            s.next_seq += 1;
            s.queue.push_back((seq, r));
            seq
        };
        cairn_client::data::writer::behind_ready_tasks().await;
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            let batch = {
                let mut s = self.state.lock().expect("log lock");
                if s.durable > seq {
                    return Ok(seq);
                }
                if s.failed {
                    return Err(failed());
                }
                let queued = s.queue.front().is_some_and(|(first, _)| *first <= seq);
                if queued && s.in_flight.len() < MAX_INFLIGHT {
                    self.take_batch(&mut s)
                } else {
                    None
                }
            };
            match batch {
                Some(b) => self.write_batch(b).await?,
                None => progress.await,
            }
        }
    }

    /// Takes the queue's next batch and its place in the region.
    fn take_batch(&self, s: &mut State) -> Option<Batch> {
        let mut n = 0;
        let mut payload = 0;
        for (_, r) in &s.queue {
            let p = r.payload_blocks() * BLOCK;
            if n == MAX_ENTRIES || payload + p > MAX_PAYLOAD {
                break;
            }
            n += 1;
            payload += p;
        }
        if n == 0 {
            return None;
        }
        let batch: Vec<(u64, Record)> = s.queue.drain(..n).collect();
        let first_seq = batch[0].0;
        let refs: Vec<&Record> = batch.iter().map(|(_, r)| r).collect();
        let buf = encode_batch(first_seq, &refs, self.salt);
        let span = buf.as_ref().len() as u64;
        let mut at = s.head;
        if at % self.size + span > self.size {
            at += self.size - at % self.size;
        }
        let promised: u64 = batch.iter().map(|(_, r)| r.log_bytes()).sum();
        s.reserved -= promised;
        s.head = at + span;
        let end_seq = first_seq + n as u64;
        s.in_flight.push_back((end_seq, false));
        Some(Batch {
            buf,
            at,
            end_seq,
            records: n as u64,
        })
    }

    /// Writes a batch in one durable write at its place (O_DIRECT + RWF_DSYNC). Crash before
    /// it completes: the batch may be on media or not, whole or torn — no record in it was
    /// acknowledged, and replay takes it only if every checksum holds. After it: every record
    /// in it is durable, acknowledged once the batches before it are too. The in-place writes
    /// of earlier records are not flushed by it (checkpoints flush those).
    async fn write_batch(&self, b: Batch) -> std::io::Result<()> {
        let span = b.buf.as_ref().len() as u64;
        let written = self
            .file
            .write_durable(self.offset + b.at % self.size, b.buf.into_bytes())
            .await;
        let mut s = self.state.lock().expect("log lock");
        if let Err(e) = written {
            // The batch may be anywhere between absent and whole: nothing after it may be
            // acknowledged (replay would stop at the hole), so the log takes no more.
            s.failed = true;
            drop(s);
            self.file.poison();
            self.progress.notify_waiters();
            return Err(e);
        }
        if let Some(entry) = s.in_flight.iter_mut().find(|(end, _)| *end == b.end_seq) {
            entry.1 = true;
        }
        while let Some(&(end, true)) = s.in_flight.front() {
            s.durable = end;
            s.in_flight.pop_front();
        }
        s.stats.batches += 1;
        s.stats.records += b.records;
        s.stats.bytes += span;
        drop(s);
        self.progress.notify_waiters();
        Ok(())
    }

    /// The log's end as it stands: everything below it is written (callers make sure no append
    /// is in flight, see the engine's checkpoint).
    pub fn end(&self) -> Tail {
        let s = self.state.lock().expect("log lock");
        Tail {
            pos: s.head,
            seq: s.next_seq,
        }
    }

    /// Frees the log before `tail` (a checkpoint made it redundant).
    pub fn retire(&self, tail: Tail) {
        self.state.lock().expect("log lock").tail = tail;
    }

    pub fn stats(&self) -> LogStats {
        self.state.lock().expect("log lock").stats
    }

    /// Bytes of log in use.
    pub fn used(&self) -> u64 {
        let s = self.state.lock().expect("log lock");
        s.head - s.tail.pos
    }

    /// Marks the log failed (its disk is poisoned): appends and reservations fail from now on.
    pub fn fail(&self) {
        self.state.lock().expect("log lock").failed = true;
        self.progress.notify_waiters();
    }
}

fn failed() -> std::io::Error {
    std::io::Error::other("the disk's log failed earlier; the disk is poisoned")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Appends made in one turn of the runtime go to the disk in one batch, and each is
    /// acknowledged with its own sequence number once it is durable.
    #[tokio::test]
    async fn appends_of_one_turn_share_a_batch() {
        let dir = tempfile::tempdir_in(
            std::env::var("CAIRN_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()),
        )
        .unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        let file = Arc::new(DiskFile::open(&path, super::super::io::IoKind::Uring).unwrap());
        let log = Arc::new(Log::new(file, 0, 4 << 20, 1, Tail { pos: 0, seq: 5 }));
        // One task per append, as the node runs one per request.
        let appends: Vec<_> = (0..8u8)
            .map(|i| {
                let r = Record::write(C, 1, usize::from(i), Bytes::from(vec![i; BLOCK]));
                assert!(log.try_reserve(&r).unwrap());
                let log = log.clone();
                tokio::spawn(async move { log.append(r).await.unwrap() })
            })
            .collect();
        let mut seqs = Vec::new();
        for a in appends {
            seqs.push(a.await.unwrap());
        }
        assert_eq!(seqs, (5..13).collect::<Vec<u64>>());
        assert_eq!(log.stats().batches, 1);
        assert_eq!(log.stats().records, 8);
    }

    const C: ChunkId = ChunkId {
        volume: 7,
        index: 3,
    };

    fn sample() -> Vec<Record> {
        vec![
            Record::write(C, 9, 2, Bytes::from(vec![0xabu8; 2 * BLOCK])),
            Record::Intent {
                chunk: C,
                slot: 9,
                first_block: 0,
                crcs: (0..1024).collect(),
            },
            Record::Discard {
                chunk: C,
                first_block: 1000,
                blocks: 24,
            },
        ]
    }

    #[test]
    fn round_trip() {
        let recs = sample();
        let refs: Vec<&Record> = recs.iter().collect();
        let b = encode_batch(41, &refs, 5).into_bytes();
        let h = decode_header(&b[..BLOCK], 5).unwrap();
        assert_eq!(h.first_seq, 41);
        assert_eq!(h.span_blocks(), b.len() / BLOCK);
        assert_eq!(decode_records(&h, &b.slice(BLOCK..)).unwrap(), recs);
        assert!(
            decode_header(&b[..BLOCK], 6).is_none(),
            "another disk's salt"
        );
    }

    /// The bytes of a batch that no record fills (the header past its entries, a payload's
    /// padding) are zeros, whatever the memory held before: a batch never carries stale heap
    /// contents to the disk.
    #[test]
    fn unused_bytes_are_zero() {
        let recs = [Record::Intent {
            chunk: C,
            slot: 9,
            first_block: 0,
            crcs: vec![1, 2, 3],
        }];
        let refs: Vec<&Record> = recs.iter().collect();
        for _ in 0..4 {
            // Freed memory of the batch's size, full of ones, for the allocator to hand back.
            drop(std::hint::black_box(AlignedBuf::copy_from(
                &[0xff; 2 * BLOCK],
            )));
            let b = encode_batch(1, &refs, 0);
            let b = b.as_ref();
            assert_eq!(b.len(), 2 * BLOCK);
            assert!(
                b[HEADER_FIXED + ENTRY..BLOCK].iter().all(|&x| x == 0),
                "header tail"
            );
            assert_eq!(&b[BLOCK..BLOCK + 12], &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
            assert!(b[BLOCK + 12..].iter().all(|&x| x == 0), "payload padding");
        }
    }

    /// A flipped byte anywhere in the header's used part, or in any payload, is caught.
    #[test]
    fn bit_flips_caught() {
        let recs = sample();
        let refs: Vec<&Record> = recs.iter().collect();
        let b = encode_batch(1, &refs, 0).into_bytes().to_vec();
        for i in (0..HEADER_FIXED + 3 * ENTRY).chain([BLOCK, BLOCK + 5000, 3 * BLOCK + 17]) {
            let mut c = b.clone();
            c[i] ^= 1;
            let c = Bytes::from(c);
            let ok = decode_header(&c[..BLOCK], 0)
                .and_then(|h| decode_records(&h, &c.slice(BLOCK..)))
                .is_some();
            assert!(!ok, "flip at {i} accepted");
        }
    }

    proptest! {
        /// Whatever the bytes, decoding answers without panicking.
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let b = Bytes::from(b);
            if let Some(h) = decode_header(&b, 0) {
                let _ = decode_records(&h, &b.slice(BLOCK.min(b.len())..));
            }
        }
    }
}
