//! A fault-injecting wrapper around any engine (Mayastor's fault_injection model): faults are
//! described by domain (which chunks) × operation × stage, installed and removed at run time.
//!
//! Kinds: an I/O error (EIO), a full disk (ENOSPC), a torn write (only a prefix of the blocks
//! lands, then EIO), and added latency. `Stage::Before` fails the operation without doing it;
//! `Stage::After` does it, then fails (a write that landed but whose completion was lost).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Discard,
    Flush,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Before,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Eio,
    NoSpace,
    /// Only the first half of the write's blocks (at least one) land; the write fails.
    TornWrite,
    Latency(Duration),
}

/// Which chunks a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    All,
    Volume(u64),
    Chunk(ChunkId),
}

impl Domain {
    fn covers(&self, c: ChunkId) -> bool {
        match self {
            Self::All => true,
            Self::Volume(v) => c.volume == *v,
            Self::Chunk(x) => *x == c,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub domain: Domain,
    pub op: FaultOp,
    pub stage: Stage,
    pub kind: FaultKind,
    /// How many times it fires before it removes itself; `None`: until cleared.
    pub times: Option<u64>,
}

pub struct FaultEngine<E> {
    inner: E,
    faults: Mutex<Vec<(u64, Fault)>>,
    next_id: AtomicU64,
    fired: AtomicU64,
}

fn eio() -> EngineError {
    EngineError::Io(std::io::Error::from_raw_os_error(libc::EIO))
}

impl<E: ChunkEngine> FaultEngine<E> {
    pub fn new(inner: E) -> Self {
        Self {
            inner,
            faults: Mutex::default(),
            next_id: AtomicU64::new(1),
            fired: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Installs a fault; returns its id for [`FaultEngine::remove`].
    pub fn inject(&self, f: Fault) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.faults.lock().expect("faults lock").push((id, f));
        id
    }

    pub fn remove(&self, id: u64) {
        self.faults
            .lock()
            .expect("faults lock")
            .retain(|(i, _)| *i != id);
    }

    pub fn clear(&self) {
        self.faults.lock().expect("faults lock").clear();
    }

    /// How many times a fault has fired.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    /// The fault that applies now, if any (consuming one of its `times`).
    fn take(&self, chunk: Option<ChunkId>, op: FaultOp, stage: Stage) -> Option<FaultKind> {
        let mut faults = self.faults.lock().expect("faults lock");
        let pos = faults.iter().position(|(_, f)| {
            f.stage == stage
                && (f.op == op || f.op == FaultOp::Any)
                && chunk.is_none_or(|c| f.domain.covers(c))
        })?;
        let kind = faults[pos].1.kind;
        if let Some(t) = &mut faults[pos].1.times {
            *t -= 1;
            if *t == 0 {
                faults.remove(pos);
            }
        }
        self.fired.fetch_add(1, Ordering::Relaxed);
        Some(kind)
    }

    /// Applies a fault of `stage`: sleeps for latency, or returns the error to fail with.
    async fn apply(
        &self,
        chunk: Option<ChunkId>,
        op: FaultOp,
        stage: Stage,
    ) -> Result<Option<FaultKind>> {
        match self.take(chunk, op, stage) {
            None => Ok(None),
            Some(FaultKind::Latency(d)) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
            Some(FaultKind::Eio) => Err(eio()),
            Some(FaultKind::NoSpace) => Err(EngineError::NoSpace),
            Some(k @ FaultKind::TornWrite) => Ok(Some(k)),
        }
    }
}

impl<E: ChunkEngine> ChunkEngine for FaultEngine<E> {
    async fn write(&self, chunk: ChunkId, offset: u64, data: Bytes) -> Result<()> {
        if let Some(FaultKind::TornWrite) = self
            .apply(Some(chunk), FaultOp::Write, Stage::Before)
            .await?
        {
            check_range(offset, data.len() as u64)?;
            let blocks = data.len() / BLOCK_SIZE as usize;
            let landed = blocks.div_ceil(2) * BLOCK_SIZE as usize;
            self.inner
                .write(chunk, offset, data.slice(..landed))
                .await?;
            return Err(eio());
        }
        self.inner.write(chunk, offset, data).await?;
        self.apply(Some(chunk), FaultOp::Write, Stage::After)
            .await
            .map(|_| ())
    }

    async fn read(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<Bytes> {
        self.apply(Some(chunk), FaultOp::Read, Stage::Before)
            .await?;
        let r = self.inner.read(chunk, offset, len).await?;
        self.apply(Some(chunk), FaultOp::Read, Stage::After).await?;
        Ok(r)
    }

    async fn discard(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<()> {
        self.apply(Some(chunk), FaultOp::Discard, Stage::Before)
            .await?;
        self.inner.discard(chunk, offset, len).await?;
        self.apply(Some(chunk), FaultOp::Discard, Stage::After)
            .await
            .map(|_| ())
    }

    async fn write_zeroes(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<()> {
        self.apply(Some(chunk), FaultOp::Discard, Stage::Before)
            .await?;
        self.inner.write_zeroes(chunk, offset, len).await?;
        self.apply(Some(chunk), FaultOp::Discard, Stage::After)
            .await
            .map(|_| ())
    }

    async fn flush(&self) -> Result<()> {
        self.apply(None, FaultOp::Flush, Stage::Before).await?;
        self.inner.flush().await?;
        self.apply(None, FaultOp::Flush, Stage::After)
            .await
            .map(|_| ())
    }

    fn chunk_info(&self, chunk: ChunkId) -> Result<Option<ChunkInfo>> {
        self.inner.chunk_info(chunk)
    }

    fn chunks(&self) -> Vec<ChunkId> {
        self.inner.chunks()
    }

    fn stats(&self) -> EngineStats {
        self.inner.stats()
    }
}
