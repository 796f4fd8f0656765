//! After a client crash, no two replicas may answer differently (DESIGN.md §5.2): a write in
//! flight when the previous holder died may have reached some members of its group and not
//! others. Every member keeps an activity record of the chunks with writes that may not have
//! reached everyone; this client settles chunks once its writes to them completed on every
//! member and no write reached them for [`SETTLE_IDLE`], and on attach — after the barrier
//! that fences the previous holder — compares each chunk still in any member's record by its
//! blocks' stored CRCs and copies the blocks that differ from an active member to the others,
//! before any I/O.
//!
//! A chunk stays in the record while it is being written (DRBD keeps its hot extents in the
//! activity log the same way): entering the record costs a synced RocksDB write on every
//! member, and settling a chunk that is written again a moment later would make random
//! writes pay it again and again.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::data as dpb;
use futures::future::join_all;

use super::{Group, Result, VolumeClient, VolumeError, BLOCK_SIZE, CHUNK_SIZE};

/// How often completed writes are settled on the nodes.
pub const SETTLE_EVERY: Duration = Duration::from_secs(1);
/// A chunk is settled once no write reached it for this long.
pub const SETTLE_IDLE: Duration = Duration::from_secs(10);
/// Most chunks named by one settle request (the nodes' limit).
const MAX_SETTLE: usize = 4096;

/// (chunk, highest write sequence number) pairs to settle.
type Settled = Vec<(u64, u64)>;

/// This client's writes to one chunk not yet settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkActivity {
    inflight: u32,
    max_seq: u64,
    /// When the last write to the chunk began.
    last: Instant,
    /// A write failed: the chunk may differ between members until the next attach
    /// reconciles it, so it is never settled.
    failed: bool,
}

/// A write to a chunk, from its start to its end.
pub(crate) struct WriteTicket<'a> {
    vc: &'a VolumeClient,
    chunk: u64,
    pub seq: u64,
    ok: bool,
}

impl WriteTicket<'_> {
    pub fn succeeded(mut self) {
        self.ok = true;
    }
}

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        let mut a = self.vc.active.lock().expect("active lock");
        if let Some(c) = a.get_mut(&self.chunk) {
            c.inflight -= 1;
            c.failed |= !self.ok;
        }
    }
}

impl VolumeClient {
    /// Registers a write to `chunk` about to be sent; its sequence number is in the ticket.
    pub(super) fn begin_write(&self, chunk: u64) -> WriteTicket<'_> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut a = self.active.lock().expect("active lock");
        let c = a.entry(chunk).or_insert(ChunkActivity {
            inflight: 0,
            max_seq: 0,
            last: now,
            failed: false,
        });
        c.inflight += 1;
        c.max_seq = c.max_seq.max(seq);
        c.last = now;
        WriteTicket {
            vc: self,
            chunk,
            seq,
            ok: false,
        }
    }

    /// Tells the members which chunks have all their writes completed everywhere.
    pub(super) async fn settle_now(&self) {
        let idle: Vec<(u64, u64)> = {
            let mut a = self.active.lock().expect("active lock");
            let mut out = Vec::new();
            a.retain(|chunk, c| {
                if c.inflight == 0 && !c.failed && c.last.elapsed() >= SETTLE_IDLE {
                    out.push((*chunk, c.max_seq));
                    false
                } else {
                    true
                }
            });
            out
        };
        let mut by_group: HashMap<u64, (Arc<Group>, Settled)> = HashMap::new();
        for (chunk, seq) in idle {
            if let Ok(Some(g)) = self.group(chunk, false).await {
                by_group
                    .entry(g.id)
                    .or_insert_with(|| (g.clone(), Vec::new()))
                    .1
                    .push((chunk, seq));
            }
        }
        for (g, chunks) in by_group.into_values() {
            self.settle_on(&g, &chunks).await;
        }
    }

    async fn settle_on(&self, g: &Group, chunks: &[(u64, u64)]) {
        for part in chunks.chunks(MAX_SETTLE) {
            let mut payload = Vec::with_capacity(part.len() * 16);
            for (c, s) in part {
                payload.extend_from_slice(&c.to_le_bytes());
                payload.extend_from_slice(&s.to_le_bytes());
            }
            let payload = Bytes::from(payload);
            let calls = g.writers().into_iter().map(|m| {
                let req = self.request(dpb::Op::Settle, g, 0, 0, 0);
                let payload = payload.clone();
                async move {
                    if let Err(e) = self
                        .call(m, req, payload)
                        .await
                        .and_then(|(r, _)| self.check(&r))
                    {
                        // The chunk stays in that member's record: one extra reconciliation
                        // at the next attach, nothing worse.
                        tracing::debug!(node = m.node_id, error = %e, "settle failed");
                    }
                }
            });
            join_all(calls).await;
        }
    }

    /// Makes every chunk in any member's activity record equal on all members of `g` that
    /// take writes, copying it from an active member. Runs on attach, after the barrier.
    pub(super) async fn reconcile(&self, g: &Group) -> Result<()> {
        let writers = g.writers();
        let mut chunks = BTreeSet::new();
        for m in &writers {
            let req = self.request(dpb::Op::ActivityList, g, 0, 0, 0);
            match self
                .call(m, req, Bytes::new())
                .await
                .and_then(|(r, d)| self.check(&r).map(|()| d))
            {
                Ok(list) => chunks.extend(
                    list.chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                ),
                Err(e @ (VolumeError::Fenced { .. } | VolumeError::StaleEpoch)) => return Err(e),
                Err(e) => {
                    return Err(VolumeError::io(format!(
                        "reading the activity record of node {}: {e}",
                        m.node_id
                    )))
                }
            }
        }
        // Only this volume's chunks in this group's segments.
        let mine: Vec<u64> = chunks
            .into_iter()
            .filter(|c| {
                self.segments
                    .lock()
                    .expect("segments lock")
                    .get(&self.segment_of(*c))
                    .is_some_and(|x| x.id == g.id)
            })
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        tracing::info!(volume = %self.name, group = g.id, chunks = mine.len(), "reconciling chunks the previous holder may have left half-written");
        for &chunk in &mine {
            self.reconcile_chunk(g, chunk).await?;
        }
        let all: Vec<(u64, u64)> = mine.iter().map(|c| (*c, u64::MAX)).collect();
        self.settle_on(g, &all).await;
        Ok(())
    }

    /// Makes one chunk equal on every writer of `g`: each member's stored block CRCs are
    /// compared with those of the first active member that answers, and the blocks that
    /// differ are copied from it (written, or discarded where it has none). Nothing else
    /// writes meanwhile: this client holds the lease and has not started its I/O.
    async fn reconcile_chunk(&self, g: &Group, chunk: u64) -> Result<()> {
        let writers = g.writers();
        let mut versions = Vec::new();
        for m in &writers {
            let req = self.request(dpb::Op::BlockCrcs, g, chunk, 0, 0);
            match self
                .call(m, req, Bytes::new())
                .await
                .and_then(|(r, d)| self.check(&r).map(|()| (r.mapped, d)))
            {
                Ok(v) => versions.push(Some(block_versions(&v.0, &v.1))),
                Err(e @ (VolumeError::Fenced { .. } | VolumeError::StaleEpoch)) => return Err(e),
                Err(_) => versions.push(None),
            }
        }
        let active = |m: &super::pb::GroupMember| m.state == super::pb::MemberState::Active as i32;
        let Some(src) = (0..writers.len()).find(|&i| active(writers[i]) && versions[i].is_some())
        else {
            return Err(VolumeError::io(format!(
                "chunk {chunk}: no active member could list its copy"
            )));
        };
        let theirs = versions[src].clone().expect("found above");
        let blocks = (CHUNK_SIZE / BLOCK_SIZE) as usize;
        for (i, m) in writers.iter().enumerate() {
            if i == src {
                continue;
            }
            // A member that could not list its copy gets every block.
            let differs: Vec<bool> = match &versions[i] {
                Some(v) => (0..blocks).map(|b| v[b] != theirs[b]).collect(),
                None => vec![true; blocks],
            };
            let mut b = 0;
            while b < blocks {
                if !differs[b] {
                    b += 1;
                    continue;
                }
                let present = theirs[b].is_some();
                let mut end = b + 1;
                while end < blocks && differs[end] && theirs[end].is_some() == present {
                    end += 1;
                }
                let (off, len) = (b as u64 * BLOCK_SIZE, (end - b) as u64 * BLOCK_SIZE);
                let (op, payload) = if present {
                    let req = self.request(dpb::Op::Read, g, chunk, off, len);
                    let (r, data) = self.call(writers[src], req, Bytes::new()).await?;
                    self.check(&r)?;
                    if data.len() as u64 != len || crc32c::crc32c(&data) != r.payload_crc {
                        return Err(VolumeError::io(format!(
                            "chunk {chunk}: node {} sent a damaged copy",
                            writers[src].node_id
                        )));
                    }
                    (dpb::Op::Write, data)
                } else {
                    (dpb::Op::Discard, Bytes::new())
                };
                let req = self.request(op, g, chunk, off, len);
                self.call(m, req, payload)
                    .await
                    .and_then(|(r, _)| self.check(&r))
                    .map_err(|e| match e {
                        VolumeError::Fenced { .. } | VolumeError::StaleEpoch => e,
                        e => VolumeError::io(format!(
                            "reconciling chunk {chunk} onto node {}: {e}",
                            m.node_id
                        )),
                    })?;
                b = end;
            }
        }
        Ok(())
    }
}

/// Each block's stored version from an OP_BLOCK_CRCS answer: its CRC if mapped, else none.
fn block_versions(mapped: &[u64], crcs: &[u8]) -> Vec<Option<u32>> {
    let blocks = (CHUNK_SIZE / BLOCK_SIZE) as usize;
    (0..blocks)
        .map(|b| {
            let on = mapped.get(b / 64).is_some_and(|w| w & (1 << (b % 64)) != 0);
            let crc = crcs
                .get(b * 4..b * 4 + 4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
            if on {
                Some(crc.unwrap_or(0))
            } else {
                None
            }
        })
        .collect()
}

/// Settles completed writes every `every` while the client lives.
pub(super) async fn settle_loop(vc: Weak<VolumeClient>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(vc) = vc.upgrade() else { return };
        vc.settle_now().await;
    }
}
