//! [`VolumeClient`]: one attached volume, replicated over its placement groups.
//!
//! Contract (DESIGN.md §4–§5):
//! - `attach` takes the volume's lease, which bumps its generation; every request carries that
//!   generation, and before any I/O the client raises it on every member of every allocated
//!   group, so the previous holder's writes are refused from then on. The lease is renewed in
//!   the background; a lost lease fences this client (every later call fails with `Fenced`).
//! - A write goes to every member of its group that takes writes (active and catching up) in
//!   parallel and succeeds only when all of them have it on media. A member that fails is
//!   reported and leaves the group's active set (epoch + 1) if at least `min_replicas` stay;
//!   the write is then sent again to the group as it is now, marked `degraded` so the
//!   remaining members record the chunk for the missing one's resync (`groups`). Writes are
//!   durable when acknowledged, so `flush` has nothing to wait for and FUA needs nothing
//!   extra.
//! - A read goes to an active member: one answering quickly before a slow one ([`links`]),
//!   then the one on this host, else the least loaded; a member that answers with a checksum
//!   error (corrupt or torn block), an I/O error or not at all (within [`LINK_TIMEOUT`]) is
//!   passed over for the next, and a member that had a bad copy is repaired from
//!   the good one. A member catching up serves no reads.
//! - A segment (1 GiB) gets its group on its first write; reads of a segment never written
//!   are zeros, without asking anyone (this client holds the lease: nobody else writes).
//! - Requests are 4 KiB aligned; they are split at 4 MiB chunk boundaries.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use cairn_proto::data as dpb;
use cairn_proto::metadata as pb;
use foldhash::{HashMap, HashMapExt};
use futures::future::join_all;

use crate::data::client::{ClientError, DataClient};
use crate::meta::{MetaClient, MetaClientError};

mod groups;
pub mod links;
mod reconcile;

pub use links::{LinkStats, LINK_TIMEOUT};

/// The storage nodes' chunk size: requests are split at its boundaries.
pub const CHUNK_SIZE: u64 = 4 << 20;
pub const BLOCK_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: this client's attach (generation {generation}) was taken over; it is fenced")]
    Fenced { volume: String, generation: u64 },
    #[error(transparent)]
    Meta(#[from] MetaClientError),
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not aligned to {BLOCK_SIZE} bytes")]
    Unaligned { offset: u64, len: u64 },
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("I/O error: {0}")]
    Io(String),
    /// A member answered that the group's membership changed since this client looked: the
    /// request is sent again to the group as it is now (never returned to callers).
    #[error("the placement group's membership changed")]
    StaleEpoch,
}

impl VolumeError {
    fn io(what: impl std::fmt::Display) -> Self {
        Self::Io(what.to_string())
    }
}

pub type Result<T> = std::result::Result<T, VolumeError>;

/// How to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Who holds the lease (shown in `cairn volume info`); a re-attach by the same holder is
    /// always allowed.
    pub holder: String,
    /// Take the lease from another holder that still has it (fencing it).
    pub force: bool,
    /// This machine's host name as the cluster knows it: reads prefer a member on it, and new
    /// segments prefer a group with a disk on it.
    pub host: String,
}

pub(crate) use groups::Group;

/// One piece of a request: a range within one chunk.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Offset of the piece in the request's buffer.
    rel: usize,
    chunk: u64,
    offset: u64,
    len: u64,
}

pub struct VolumeClient {
    meta: MetaClient,
    name: String,
    id: u64,
    size: u64,
    segment_size: u64,
    holder: String,
    host: String,
    generation: u64,
    segments: Mutex<HashMap<u64, Arc<Group>>>,
    conns: Mutex<HashMap<String, Arc<DataClient>>>,
    /// Per member address: requests in flight, answer times, failures.
    links: links::Links,
    fenced: AtomicBool,
    /// The lease renewer and the settler, stopped on detach.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Sequence numbers of writes (the nodes' activity record).
    seq: AtomicU64,
    /// Chunks with writes this client has sent and not yet settled on the nodes.
    active: Mutex<HashMap<u64, reconcile::ChunkActivity>>,
}

impl VolumeClient {
    /// Attaches `name`: takes the lease, loads the layout, raises the new generation on every
    /// member of every allocated group, and starts renewing the lease.
    pub async fn attach(meta: MetaClient, name: &str, opts: AttachOptions) -> Result<Arc<Self>> {
        let lease = meta
            .call(|mut c| {
                let (volume, holder, force) = (name.to_owned(), opts.holder.clone(), opts.force);
                async move {
                    c.attach(pb::AttachRequest {
                        volume,
                        holder,
                        force,
                    })
                    .await
                }
            })
            .await?;
        let v = lease
            .volume
            .ok_or_else(|| VolumeError::io("attach reply without a volume"))?;
        let l = lease
            .lease
            .ok_or_else(|| VolumeError::io("attach reply without a lease"))?;
        let layout = meta
            .call(|mut c| {
                let volume = name.to_owned();
                async move { c.get_layout(pb::GetLayoutRequest { volume }).await }
            })
            .await?;
        let mut segments = HashMap::new();
        for s in layout.segments {
            if let Some(g) = s.group {
                segments.insert(s.index, Arc::new(group_of(g)));
            }
        }
        let ttl = l
            .expires_unix_ms
            .saturating_sub(now_ms())
            .clamp(1_000, 3_600_000);
        let vc = Arc::new(Self {
            meta,
            name: name.to_owned(),
            id: v.id,
            size: v.size_bytes,
            segment_size: v.segment_size.max(CHUNK_SIZE),
            holder: opts.holder,
            host: opts.host,
            generation: l.generation,
            segments: Mutex::new(segments),
            conns: Mutex::default(),
            links: Default::default(),
            fenced: AtomicBool::new(false),
            tasks: Mutex::default(),
            seq: AtomicU64::new(1),
            active: Mutex::default(),
        });
        vc.fence_previous_holders().await?;
        let weak = Arc::downgrade(&vc);
        let renewer = tokio::spawn(renew(weak.clone(), Duration::from_millis(ttl / 3)));
        let settler = tokio::spawn(reconcile::settle_loop(weak, reconcile::SETTLE_EVERY));
        *vc.tasks.lock().expect("tasks lock") = vec![renewer, settler];
        tracing::info!(volume = name, generation = l.generation, "attached");
        Ok(vc)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's id (as the storage nodes know it).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Releases the lease (after which another client may attach without `force`).
    pub async fn detach(&self) -> Result<()> {
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
        // Every write has completed: the nodes can forget them (else the next attach would
        // reconcile those chunks, harmlessly).
        self.settle_now().await;
        self.fenced.store(true, Ordering::Release);
        self.meta
            .call(|mut c| {
                let (volume, holder, generation) =
                    (self.name.clone(), self.holder.clone(), self.generation);
                async move {
                    c.release(pb::ReleaseRequest {
                        volume,
                        holder,
                        generation,
                    })
                    .await
                }
            })
            .await?;
        tracing::info!(volume = %self.name, generation = self.generation, "detached");
        Ok(())
    }

    /// Sends the new generation to every member that takes writes in every allocated group
    /// (a barrier, which changes no data), so each raises its fencing mark before this
    /// client's first I/O, then reconciles the chunks the previous holder may have left
    /// different on its members. A member that cannot be reached is reported failed and
    /// leaves its group's active set: it learns the new generation from the metadata service
    /// before it serves again, and resyncs before it rejoins.
    async fn fence_previous_holders(&self) -> Result<()> {
        let groups: Vec<Arc<Group>> = {
            let segs = self.segments.lock().expect("segments lock");
            let mut by_id: HashMap<u64, Arc<Group>> = HashMap::new();
            for g in segs.values() {
                by_id.entry(g.id).or_insert_with(|| g.clone());
            }
            by_id.into_values().collect()
        };
        let fence_group = |g: Arc<Group>| async move {
            let mut g = g;
            // A membership change meanwhile (a member resyncing, a failure reported) starts
            // the group over, as it is now.
            for _ in 0..8 {
                match self.fence_group(&g).await {
                    Err(VolumeError::StaleEpoch) => g = self.refresh_group(g.id).await?,
                    r => return r,
                }
            }
            Err(VolumeError::io(format!(
                "placement group {}: membership kept changing during attach",
                g.id
            )))
        };
        for r in join_all(groups.into_iter().map(fence_group)).await {
            r?;
        }
        Ok(())
    }

    /// Fences one group's writers with a barrier, then reconciles it.
    async fn fence_group(&self, g: &Arc<Group>) -> Result<()> {
        let writers = g.writers();
        // A barrier: the new generation is raised, and every write of the previous holder
        // still running on the member has finished when it answers.
        let calls = writers
            .iter()
            .map(|m| self.call(m, self.request(dpb::Op::Barrier, g, 0, 0, 0), Bytes::new()));
        let results = join_all(calls).await;
        let mut g = g.clone();
        for (m, r) in writers.iter().zip(results) {
            match r.and_then(|(r, _)| self.check(&r)) {
                Ok(()) => {}
                Err(e @ (VolumeError::Fenced { .. } | VolumeError::StaleEpoch)) => return Err(e),
                Err(e) => {
                    let why = format!("fencing barrier to {}: {e}", m.data_addr);
                    g = self.report_failure(&g, m, &why).await.map_err(|re| {
                        VolumeError::io(format!("{why}; the member cannot be taken out: {re}"))
                    })?;
                }
            }
        }
        // What the previous holder may have left half-written, made equal everywhere.
        self.reconcile(&g).await
    }

    fn check_open(&self) -> Result<()> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    fn fenced_error(&self) -> VolumeError {
        VolumeError::Fenced {
            volume: self.name.clone(),
            generation: self.generation,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(VolumeError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(VolumeError::Unaligned { offset, len });
        }
        self.check_open()
    }

    /// Splits a range at chunk boundaries.
    fn pieces(offset: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let chunk = at / CHUNK_SIZE;
            let off = at % CHUNK_SIZE;
            let n = (CHUNK_SIZE - off).min(offset + len - at);
            out.push(Piece {
                rel: (at - offset) as usize,
                chunk,
                offset: off,
                len: n,
            });
            at += n;
        }
        out
    }

    fn segment_of(&self, chunk: u64) -> u64 {
        chunk * CHUNK_SIZE / self.segment_size
    }

    /// The group of a chunk's segment; with `allocate`, a segment never written gets one.
    async fn group(&self, chunk: u64, allocate: bool) -> Result<Option<Arc<Group>>> {
        let seg = self.segment_of(chunk);
        if let Some(g) = self.segments.lock().expect("segments lock").get(&seg) {
            return Ok(Some(g.clone()));
        }
        if !allocate {
            return Ok(None);
        }
        let r = self
            .meta
            .call(|mut c| {
                let (volume, prefer_host) = (self.name.clone(), self.host.clone());
                async move {
                    c.allocate_segment(pb::AllocateSegmentRequest {
                        volume,
                        segment_index: seg,
                        prefer_host,
                    })
                    .await
                }
            })
            .await?;
        let g = r
            .segment
            .and_then(|s| s.group)
            .ok_or_else(|| VolumeError::io("segment reply without a group"))?;
        let g = Arc::new(group_of(g));
        // The new group's members learn this client's generation from its first write.
        Ok(Some(
            self.segments
                .lock()
                .expect("segments lock")
                .entry(seg)
                .or_insert(g)
                .clone(),
        ))
    }

    fn request(&self, op: dpb::Op, g: &Group, chunk: u64, offset: u64, len: u64) -> dpb::Request {
        dpb::Request {
            op: op as i32,
            volume: self.id,
            chunk,
            offset,
            length: len,
            generation: self.generation,
            group: g.id,
            epoch: g.epoch,
            degraded: g.degraded(),
            ..Default::default()
        }
    }

    async fn conn(&self, addr: &str) -> Result<Arc<DataClient>> {
        if let Some(c) = self.conns.lock().expect("conns lock").get(addr) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            DataClient::connect(addr)
                .await
                .map_err(|e| VolumeError::io(format!("storage node {addr}: {e}")))?,
        );
        Ok(self
            .conns
            .lock()
            .expect("conns lock")
            .entry(addr.to_owned())
            .or_insert(c)
            .clone())
    }

    /// Each storage node link's statistics, as this client sees them.
    pub fn links(&self) -> Vec<LinkStats> {
        self.links.stats()
    }

    /// One request to one member; a broken connection is replaced and the request sent once
    /// more (every request is idempotent).
    async fn call(
        &self,
        m: &pb::GroupMember,
        mut req: dpb::Request,
        payload: Bytes,
    ) -> Result<(dpb::Response, Bytes)> {
        req.disk = m.disk_uuid.clone();
        let link = self.links.get(&m.data_addr);
        link.start();
        let started = std::time::Instant::now();
        let mut outcome = links::Outcome::Failed;
        let mut result = Err(VolumeError::io("no attempt"));
        for _ in 0..2 {
            let c = match self.conn(&m.data_addr).await {
                Ok(c) => c,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            // The limit is kept by the connection's watchdog (no timer per call).
            match c.call_within(&mut req, payload.clone(), LINK_TIMEOUT).await {
                Err(ClientError::TimedOut) => {
                    // Stuck (a hung node, a partition): this connection is not reused.
                    self.conns.lock().expect("conns lock").remove(&m.data_addr);
                    outcome = links::Outcome::TimedOut;
                    result = Err(VolumeError::io(format!(
                        "storage node {}: no answer in {} s",
                        m.data_addr,
                        LINK_TIMEOUT.as_secs()
                    )));
                    break;
                }
                Ok(r) => {
                    outcome = links::Outcome::Answered(started.elapsed());
                    result = Ok(r);
                    break;
                }
                Err(e @ (ClientError::Closed | ClientError::Io(_))) => {
                    self.conns.lock().expect("conns lock").remove(&m.data_addr);
                    result = Err(VolumeError::io(format!(
                        "storage node {}: {e}",
                        m.data_addr
                    )));
                }
                Err(e) => {
                    result = Err(VolumeError::io(format!(
                        "storage node {}: {e}",
                        m.data_addr
                    )));
                    break;
                }
            }
        }
        if link.finish(outcome) {
            tracing::warn!(volume = %self.name, node = m.node_id, addr = %m.data_addr, "storage node answering slowly; reading from other members first");
        }
        result
    }

    /// Turns a member's non-OK answer into an error (a fencing answer fences this client).
    fn check(&self, r: &dpb::Response) -> Result<()> {
        match dpb::Status::try_from(r.status).unwrap_or(dpb::Status::IoError) {
            dpb::Status::Ok => Ok(()),
            dpb::Status::Fenced => {
                self.fenced.store(true, Ordering::Release);
                Err(self.fenced_error())
            }
            dpb::Status::NoSpace => Err(VolumeError::NoSpace(r.message.clone())),
            dpb::Status::StaleEpoch => Err(VolumeError::StaleEpoch),
            s => Err(VolumeError::io(format!(
                "{}: {}",
                s.as_str_name(),
                r.message
            ))),
        }
    }

    /// Active members in the order reads try them: quick ones before slow ones, this host's
    /// first, then the least loaded.
    fn read_order<'g>(&self, g: &'g Group) -> Vec<&'g pb::GroupMember> {
        let mut ms = g.readers();
        ms.sort_by_cached_key(|m| {
            let l = self.links.get(&m.data_addr);
            (l.slow(), m.host != self.host, l.inflight())
        });
        ms
    }

    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        let pieces = Self::pieces(offset, len);
        if pieces.len() == 1 {
            return self.read_piece(pieces[0]).await;
        }
        let parts = join_all(pieces.iter().map(|p| self.read_piece(*p))).await;
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out.freeze())
    }

    async fn read_piece(&self, p: Piece) -> Result<Bytes> {
        let Some(mut g) = self.group(p.chunk, false).await? else {
            return Ok(Bytes::from(vec![0u8; p.len as usize]));
        };
        for _ in 0..3 {
            match self.read_from(&g, p).await {
                Err(VolumeError::StaleEpoch) => g = self.refresh_group(g.id).await?,
                r => return r,
            }
        }
        Err(VolumeError::io(format!(
            "placement group {}: membership kept changing; read not completed",
            g.id
        )))
    }

    /// Reads a piece from the first active member of `g` that has a good copy.
    async fn read_from(&self, g: &Group, p: Piece) -> Result<Bytes> {
        let mut bad = Vec::new();
        let mut last = None;
        for m in self.read_order(g) {
            let req = self.request(dpb::Op::Read, g, p.chunk, p.offset, p.len);
            let (r, data) = match self.call(m, req, Bytes::new()).await {
                Ok(x) => x,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let status = dpb::Status::try_from(r.status).unwrap_or(dpb::Status::IoError);
            if status == dpb::Status::Ok
                && data.len() as u64 == p.len
                && crc32c::crc32c(&data) == r.payload_crc
            {
                for b in bad {
                    self.repair(g, &b, p, data.clone()).await;
                }
                return Ok(data);
            }
            match status {
                dpb::Status::Corrupt | dpb::Status::Torn => {
                    tracing::warn!(volume = %self.name, chunk = p.chunk, node = m.node_id, block = r.block, status = status.as_str_name(), "bad copy; reading another member");
                    bad.push(m.clone());
                    last = Some(VolumeError::io(format!(
                        "{}: {}",
                        status.as_str_name(),
                        r.message
                    )));
                }
                dpb::Status::Ok => {
                    last = Some(VolumeError::io(format!(
                        "node {} sent {} bytes with a bad checksum",
                        m.node_id,
                        data.len()
                    )));
                }
                _ => {
                    if let Err(e) = self.check(&r) {
                        if matches!(e, VolumeError::Fenced { .. } | VolumeError::StaleEpoch) {
                            return Err(e);
                        }
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| VolumeError::io("the group has no members")))
    }

    /// Rewrites a member's bad copy of a piece with a good one.
    async fn repair(&self, g: &Group, m: &pb::GroupMember, p: Piece, data: Bytes) {
        let req = self.request(dpb::Op::Write, g, p.chunk, p.offset, p.len);
        match self.call(m, req, data).await.map(|(r, _)| self.check(&r)) {
            Ok(Ok(())) => {
                tracing::warn!(volume = %self.name, chunk = p.chunk, node = m.node_id, "repaired a bad copy from a good member")
            }
            Ok(Err(e)) | Err(e) => {
                tracing::error!(volume = %self.name, chunk = p.chunk, node = m.node_id, error = %e, "could not repair a bad copy")
            }
        }
    }

    /// Writes `data` at `offset`; returns once every member of every group involved has it on
    /// media.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let pieces = Self::pieces(offset, data.len() as u64);
        let results = join_all(pieces.iter().map(|p| {
            let d = data.slice(p.rel..p.rel + p.len as usize);
            self.to_all(*p, dpb::Op::Write, d, true)
        }))
        .await;
        results.into_iter().collect()
    }

    /// Makes a range read as zeros. With `punch` the space is given back (the blocks are
    /// unmapped); without, zeros are written (NBD's NO_HOLE).
    pub async fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        self.check_range(offset, len)?;
        let pieces = Self::pieces(offset, len);
        let results = join_all(pieces.iter().map(|p| async move {
            if punch {
                self.to_all(*p, dpb::Op::WriteZeroes, Bytes::new(), false)
                    .await
            } else {
                let zeros = Bytes::from(vec![0u8; p.len as usize]);
                self.to_all(*p, dpb::Op::Write, zeros, true).await
            }
        }))
        .await;
        results.into_iter().collect()
    }

    /// Gives a range's space back; it reads as zeros afterwards.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let pieces = Self::pieces(offset, len);
        let results = join_all(
            pieces
                .iter()
                .map(|p| self.to_all(*p, dpb::Op::Discard, Bytes::new(), false)),
        )
        .await;
        results.into_iter().collect()
    }

    /// Every acknowledged write is on media on every member already; nothing to wait for.
    pub async fn flush(&self) -> Result<()> {
        self.check_open()
    }

    /// Which parts of a range hold data: runs of (length, allocated), from `offset`, covering
    /// a prefix of the range (at most 64 chunks' worth per call).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.check_range(offset, len)?;
        let mut pieces = Self::pieces(offset, len);
        pieces.truncate(64);
        let maps = join_all(pieces.iter().map(|p| self.mapped(*p))).await;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        for (p, map) in pieces.iter().zip(maps) {
            let map = map?;
            for b in 0..p.len / BLOCK_SIZE {
                let block = ((p.offset / BLOCK_SIZE) + b) as usize;
                let allocated = map.as_ref().is_some_and(|m| {
                    m.get(block / 64)
                        .is_some_and(|w| w & (1 << (block % 64)) != 0)
                });
                match runs.last_mut() {
                    Some((n, a)) if *a == allocated => *n += BLOCK_SIZE,
                    _ => runs.push((BLOCK_SIZE, allocated)),
                }
            }
        }
        Ok(runs)
    }

    /// A chunk's mapped-block bitmap from one member (`None`: nothing there).
    async fn mapped(&self, p: Piece) -> Result<Option<Vec<u64>>> {
        let Some(g) = self.group(p.chunk, false).await? else {
            return Ok(None);
        };
        let mut last = None;
        for m in self.read_order(&g) {
            let req = self.request(dpb::Op::ChunkInfo, &g, p.chunk, 0, 0);
            match self.call(m, req, Bytes::new()).await {
                Ok((r, _)) => match self.check(&r) {
                    Ok(()) => return Ok(Some(r.mapped)),
                    Err(e @ VolumeError::Fenced { .. }) => return Err(e),
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| VolumeError::io("the group has no members")))
    }

    /// Reads a range from one member's copy only (`node`), without falling back or checking
    /// against the others: for operators and tests comparing replicas. Never-written segments
    /// read as zeros.
    pub async fn read_replica(&self, offset: u64, len: u64, node: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        for p in Self::pieces(offset, len) {
            let Some(g) = self.group(p.chunk, false).await? else {
                out.extend_from_slice(&vec![0u8; p.len as usize]);
                continue;
            };
            let m = g
                .members
                .iter()
                .find(|m| m.node_id == node)
                .ok_or_else(|| {
                    VolumeError::io(format!(
                        "node {node} holds no copy of chunk {} (group {} has nodes {:?})",
                        p.chunk,
                        g.id,
                        g.members.iter().map(|m| m.node_id).collect::<Vec<_>>()
                    ))
                })?;
            let req = self.request(dpb::Op::Read, &g, p.chunk, p.offset, p.len);
            let (r, data) = self.call(m, req, Bytes::new()).await?;
            self.check(&r)?;
            out.extend_from_slice(&data);
        }
        Ok(out.freeze())
    }

    /// Every node holding a copy of some allocated segment.
    pub fn replica_nodes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .segments
            .lock()
            .expect("segments lock")
            .values()
            .flat_map(|g| g.members.iter().map(|m| m.node_id))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl Drop for VolumeClient {
    fn drop(&mut self) {
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

fn group_of(g: pb::PlacementGroup) -> Group {
    Group {
        id: g.id,
        epoch: g.epoch,
        members: g.members,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Renews the lease every `every` while the client lives. A lost lease (another client took
/// over) fences this one; other failures are retried at the next tick.
async fn renew(vc: Weak<VolumeClient>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(vc) = vc.upgrade() else { return };
        let r = vc
            .meta
            .call(|mut c| {
                let (volume, holder, generation) =
                    (vc.name.clone(), vc.holder.clone(), vc.generation);
                async move {
                    c.renew_lease(pb::RenewLeaseRequest {
                        volume,
                        holder,
                        generation,
                    })
                    .await
                }
            })
            .await;
        match r {
            Ok(_) => {}
            Err(e)
                if e.code() == tonic::Code::FailedPrecondition
                    || e.code() == tonic::Code::NotFound =>
            {
                tracing::error!(volume = %vc.name, error = %e, "lease lost; this client is fenced");
                vc.fenced.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                tracing::warn!(volume = %vc.name, error = %e, "lease renewal failed; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let p = VolumeClient::pieces(CHUNK_SIZE - 8192, 3 * CHUNK_SIZE);
        let lens: Vec<u64> = p.iter().map(|p| p.len).collect();
        assert_eq!(lens, vec![8192, CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE - 8192]);
        assert_eq!(p[1].offset, 0);
        assert_eq!(p[1].chunk, 1);
        assert_eq!(p[3].rel as u64, 8192 + 2 * CHUNK_SIZE);
        assert_eq!(p.iter().map(|p| p.len).sum::<u64>(), 3 * CHUNK_SIZE);
    }
}
