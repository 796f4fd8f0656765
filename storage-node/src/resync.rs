//! Bringing a group member that missed writes back up to date, copying only what it missed
//! (DESIGN.md §5.4, §6; DRBD's activity log / bitmap is the model).
//!
//! Three pieces on every node:
//! - [`Dirty`]: the chunks each group had written while it was degraded (a write marked
//!   `degraded` by its client, whose view of the group had a member out). Persisted — synced
//!   to RocksDB before the first such write of a chunk runs ([`crate::marks`]), so a crash
//!   cannot lose it — and kept in memory, so later writes of the chunk cost nothing. Cleared
//!   once the group is whole again.
//! - [`Gates`]: a per-group lock every mutating request holds while it runs. A barrier
//!   (OP_BARRIER) raises the group's epoch and then takes the lock exclusively: once it
//!   answers, no write admitted under an older membership can still land.
//! - [`Syncing`]: on the member catching up, the blocks clients wrote to it since it started
//!   catching up. The copy of a chunk never overwrites them: they are at least as new as
//!   anything a source could send.
//!
//! And the driver, [`resync_loop`], on the node whose disk is out of date: ask the metadata
//! service which of its memberships are stale; for each, start catching up (epoch + 1: clients
//! now send it their writes), put a barrier on every active member, take the union of their
//! dirty records, copy those chunks from an active member, and finish (epoch + 1: it serves
//! reads again). Copying the same chunk twice is harmless, so any failure just leaves the
//! member stale or syncing and the next round starts over.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cairn_client::data::client::{ClientError, DataClient};
use cairn_client::MetaClient;
use cairn_proto::data as dpb;
use cairn_proto::metadata as pb;
use foldhash::{HashMap, HashMapExt};
use futures::StreamExt;
use rocksdb::WriteOptions;

use crate::engine::{ChunkEngine, ChunkId, BLOCK_SIZE, CHUNK_SIZE};
use crate::marks::{self, DurableMarks, Mark};
use crate::protocol::server::DataServer;

const BLOCKS: usize = (CHUNK_SIZE / BLOCK_SIZE) as usize;
/// A member that has not answered a resync request in this long is passed over (a barrier
/// waits for the writes in flight, so this is longer than a client's request timeout).
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks copied at once by one resync.
const COPY_PARALLELISM: usize = 4;
/// One OP_DIRTY_LIST entry: volume, chunk index, then the block map (u64 LE words).
pub const DIRTY_ENTRY: usize = 16 + BLOCKS / 8;

fn dirty_key(group: u64, volume: u64, chunk: u64) -> [u8; 25] {
    let mut k = [b'd'; 25];
    k[1..9].copy_from_slice(&group.to_be_bytes());
    k[9..17].copy_from_slice(&volume.to_be_bytes());
    k[17..25].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// Which blocks of a chunk were written while degraded; all of them when not known (the
/// record came back from disk after a restart: only chunks are persisted).
pub type BlockMap = [u64; BLOCKS / 64];

/// The chunks written while their group was degraded, per group, with the blocks written
/// (in memory only).
pub struct Dirty {
    marks: DurableMarks<(u64, u64, u64), BlockMap>,
}

impl Dirty {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let db = marks::open_db(dir)?;
        let mut loaded = HashMap::new();
        for kv in db.iterator(rocksdb::IteratorMode::Start) {
            let (k, _) = kv?;
            anyhow::ensure!(k.len() == 25 && k[0] == b'd', "malformed dirty record");
            let n = |r: std::ops::Range<usize>| u64::from_be_bytes(k[r].try_into().expect("8"));
            // Which blocks is not persisted: the whole chunk.
            loaded.insert((n(1..9), n(9..17), n(17..25)), [u64::MAX; BLOCKS / 64]);
        }
        Ok(Self {
            marks: DurableMarks::new(db, loaded),
        })
    }

    /// Records that `offset..offset + len` of `chunk` of `group` is being written while the
    /// group is degraded. Returns once the chunk's record is on media (the first time, off the
    /// runtime's threads: [`crate::marks`]; after that, at once).
    pub async fn mark(
        &self,
        group: u64,
        chunk: ChunkId,
        offset: u64,
        len: u64,
    ) -> anyhow::Result<()> {
        self.marks
            .mark(
                (group, chunk.volume, chunk.index),
                dirty_key(group, chunk.volume, chunk.index),
                || [0u64; BLOCKS / 64],
                |bits| mark_blocks(bits, offset, len),
            )
            .await
    }

    /// The group's dirty chunks, as (volume, chunk index, blocks written), including those
    /// whose record is being put (their writes have not run yet: copying them is harmless).
    pub fn list(&self, group: u64) -> Vec<(u64, u64, BlockMap)> {
        let m = self.marks.mem.lock().expect("dirty lock");
        let mut v: Vec<(u64, u64, BlockMap)> = m
            .iter()
            .filter(|((g, _, _), _)| *g == group)
            .map(|((_, v, c), b)| (*v, *c, *b.value()))
            .collect();
        v.sort_unstable_by_key(|(v, c, _)| (*v, *c));
        v
    }

    /// Forgets the group's record (it is whole again). A chunk whose record is still being put
    /// stays: its degraded write has not run yet.
    pub fn clear(&self, group: u64) -> anyhow::Result<()> {
        let mut m = self.marks.mem.lock().expect("dirty lock");
        let mut batch = rocksdb::WriteBatch::default();
        for ((g, v, c), mark) in m.iter() {
            if *g == group && matches!(mark, Mark::Durable(_)) {
                batch.delete(dirty_key(*g, *v, *c));
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.marks.db.write_opt(batch, &wo)?;
        m.retain(|(g, _, _), mark| *g != group || !matches!(mark, Mark::Durable(_)));
        Ok(())
    }
}

/// A lock per group: mutating requests share it, a barrier takes it alone.
#[derive(Default)]
pub struct Gates {
    m: Mutex<HashMap<u64, Arc<tokio::sync::RwLock<()>>>>,
}

impl Gates {
    pub fn get(&self, group: u64) -> Arc<tokio::sync::RwLock<()>> {
        self.m
            .lock()
            .expect("gates lock")
            .entry(group)
            .or_default()
            .clone()
    }
}

/// Blocks of one chunk written by clients since the resync began.
pub type Marks = Arc<tokio::sync::Mutex<[u64; BLOCKS / 64]>>;

/// One group's marks, by (volume, chunk index).
type GroupMarks = Arc<Mutex<HashMap<(u64, u64), Marks>>>;

/// The groups this node is catching up in, and the client writes they received meanwhile.
#[derive(Default)]
pub struct Syncing {
    groups: Mutex<HashMap<u64, GroupMarks>>,
}

impl Syncing {
    fn begin(&self, group: u64) {
        self.groups
            .lock()
            .expect("syncing lock")
            .insert(group, Arc::default());
    }

    fn end(&self, group: u64) {
        self.groups.lock().expect("syncing lock").remove(&group);
    }

    /// The marks of a chunk, if this node is catching up in `group`.
    pub fn marks(&self, group: u64, chunk: ChunkId) -> Option<Marks> {
        let g = self
            .groups
            .lock()
            .expect("syncing lock")
            .get(&group)
            .cloned()?;
        let mut g = g.lock().expect("syncing lock");
        Some(g.entry((chunk.volume, chunk.index)).or_default().clone())
    }
}

/// Marks the blocks of `offset..offset + len` as written by a client.
pub fn mark_blocks(bits: &mut [u64; BLOCKS / 64], offset: u64, len: u64) {
    let first = (offset / BLOCK_SIZE) as usize;
    let last = ((offset + len).div_ceil(BLOCK_SIZE) as usize).min(BLOCKS);
    for b in first..last {
        bits[b / 64] |= 1 << (b % 64);
    }
}

fn is_set(bits: &[u64], b: usize) -> bool {
    bits.get(b / 64).is_some_and(|w| w & (1 << (b % 64)) != 0)
}

/// What one resync did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResyncStats {
    pub chunks: u64,
    pub bytes: u64,
}

/// The resyncs running on this node, for the heartbeat (`cairn status` shows them).
#[derive(Debug, Default)]
pub struct Progress(Mutex<BTreeMap<(u64, String), pb::ResyncProgress>>);

impl Progress {
    pub fn snapshot(&self) -> Vec<pb::ResyncProgress> {
        self.0
            .lock()
            .expect("progress lock")
            .values()
            .cloned()
            .collect()
    }

    fn update(&self, group: u64, disk: &str, f: impl FnOnce(&mut pb::ResyncProgress)) {
        let mut m = self.0.lock().expect("progress lock");
        let e = m
            .entry((group, disk.to_owned()))
            .or_insert_with(|| pb::ResyncProgress {
                group,
                disk_uuid: disk.to_owned(),
                ..Default::default()
            });
        f(e);
    }

    fn end(&self, group: u64, disk: &str) {
        self.0
            .lock()
            .expect("progress lock")
            .remove(&(group, disk.to_owned()));
    }
}

/// Asks the metadata service every `every` which of this node's group memberships are out of
/// date, and brings each up to date. `node_id` is filled in once the node has registered.
pub async fn resync_loop<E: ChunkEngine>(
    meta: MetaClient,
    server: Arc<DataServer<E>>,
    node_id: tokio::sync::watch::Receiver<Option<u64>>,
    every: Duration,
    rate: u64,
) {
    loop {
        tokio::time::sleep(every).await;
        let Some(id) = *node_id.borrow() else {
            continue;
        };
        if !server.ready.load(Ordering::Acquire) {
            continue;
        }
        let (groups, segments) = match meta
            .call(|mut c| async move {
                c.stale_members(pb::StaleMembersRequest {
                    node_id: id,
                    all: false,
                })
                .await
            })
            .await
        {
            Ok(r) => (r.groups, r.segments),
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask for stale memberships");
                continue;
            }
        };
        for g in groups {
            let mine: Vec<String> = g
                .members
                .iter()
                .filter(|m| m.state != pb::MemberState::Active as i32)
                .filter(|m| server.disk(&m.disk_uuid).is_some())
                .map(|m| m.disk_uuid.clone())
                .collect();
            for disk in mine {
                let started = Instant::now();
                let segs = segments.iter().find(|s| s.group == g.id);
                let full = g.members.iter().any(|m| m.disk_uuid == disk && m.full_copy);
                match resync_group(&meta, &server, g.clone(), &disk, segs, rate).await {
                    Ok(s) => tracing::info!(
                        group = g.id,
                        disk = %disk,
                        full_copy = full,
                        chunks = s.chunks,
                        bytes = s.bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "resync finished: member active again"
                    ),
                    Err(e) => {
                        tracing::warn!(group = g.id, disk = %disk, error = %format!("{e:#}"), "resync failed; will retry")
                    }
                }
            }
        }
    }
}

pub(crate) fn group_request(
    op: dpb::Op,
    g: &pb::PlacementGroup,
    m: &pb::GroupMember,
) -> dpb::Request {
    dpb::Request {
        op: op as i32,
        group: g.id,
        epoch: g.epoch,
        disk: m.disk_uuid.clone(),
        ..Default::default()
    }
}

/// One request to another member; a non-OK answer is an error.
pub(crate) async fn ask(
    conns: &Mutex<HashMap<String, Arc<DataClient>>>,
    m: &pb::GroupMember,
    req: dpb::Request,
) -> anyhow::Result<(dpb::Response, Bytes)> {
    let cached = conns.lock().expect("conns lock").get(&m.data_addr).cloned();
    let c = match cached {
        Some(c) => c,
        None => {
            let c = Arc::new(
                DataClient::connect(&m.data_addr)
                    .await
                    .with_context(|| format!("connecting to {}", m.data_addr))?,
            );
            conns
                .lock()
                .expect("conns lock")
                .insert(m.data_addr.clone(), c.clone());
            c
        }
    };
    let (r, data) = match c.call_within(req, Bytes::new(), ASK_TIMEOUT).await {
        Err(ClientError::TimedOut) => {
            // Stuck (a partition, a hung node): this connection is not reused.
            conns.lock().expect("conns lock").remove(&m.data_addr);
            anyhow::bail!("node {}: no answer in {ASK_TIMEOUT:?}", m.node_id)
        }
        r => r.with_context(|| format!("node {}", m.node_id))?,
    };
    anyhow::ensure!(
        r.status == dpb::Status::Ok as i32,
        "node {}: {:?}: {}",
        m.node_id,
        dpb::Status::try_from(r.status).unwrap_or(dpb::Status::IoError),
        r.message
    );
    Ok((r, data))
}

async fn resync_group<E: ChunkEngine>(
    meta: &MetaClient,
    server: &Arc<DataServer<E>>,
    g: pb::PlacementGroup,
    disk: &str,
    segs: Option<&pb::GroupSegments>,
    rate: u64,
) -> anyhow::Result<ResyncStats> {
    let engine = server
        .disk(disk)
        .cloned()
        .context("disk not on this node")?;
    // Marking starts before the metadata service lets clients write here.
    server.syncing.begin(g.id);
    let r = resync_marked(meta, server, &engine, g.clone(), disk, segs, rate).await;
    server.syncing.end(g.id);
    server.progress.end(g.id, disk);
    r
}

async fn resync_marked<E: ChunkEngine>(
    meta: &MetaClient,
    server: &Arc<DataServer<E>>,
    engine: &Arc<E>,
    g: pb::PlacementGroup,
    disk: &str,
    segs: Option<&pb::GroupSegments>,
    rate: u64,
) -> anyhow::Result<ResyncStats> {
    let change = |begin: bool, g: &pb::PlacementGroup| {
        let req = pb::ResyncRequest {
            group: g.id,
            epoch: g.epoch,
            disk_uuid: disk.to_owned(),
        };
        async move {
            meta.call(|mut c| {
                let req = req.clone();
                async move {
                    if begin {
                        c.begin_resync(req).await
                    } else {
                        c.finish_resync(req).await
                    }
                }
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .group
            .context("no group in the reply")
        }
    };
    let g = change(true, &g).await.context("starting the resync")?;
    // Clients' writes of this epoch come here too; our own fence learns it now.
    let _ = server.fence.admit(0, 0, g.id, g.epoch);
    let sources: Vec<pb::GroupMember> = g
        .members
        .iter()
        .filter(|m| m.state == pb::MemberState::Active as i32)
        .cloned()
        .collect();
    anyhow::ensure!(!sources.is_empty(), "group {} has no active member", g.id);
    let conns = Mutex::new(HashMap::new());
    // After the barriers no write of the old membership can land on a source; every later
    // write comes here as well.
    for s in &sources {
        ask(&conns, s, group_request(dpb::Op::Barrier, &g, s))
            .await
            .context("barrier")?;
    }
    // The union of every active member's record: chunks, and the blocks written in them.
    let mut dirty: BTreeMap<(u64, u64), BlockMap> = BTreeMap::new();
    for s in &sources {
        let (_, list) = ask(&conns, s, group_request(dpb::Op::DirtyList, &g, s))
            .await
            .context("dirty list")?;
        for e in list.chunks_exact(DIRTY_ENTRY) {
            let n = |r: std::ops::Range<usize>| u64::from_le_bytes(e[r].try_into().expect("8"));
            let bits = dirty.entry((n(0..8), n(8..16))).or_default();
            for (i, w) in bits.iter_mut().enumerate() {
                *w |= n(16 + i * 8..24 + i * 8);
            }
        }
    }
    // What this member itself knows it may have wrong: blocks in its own records (the scrub
    // puts the blocks it found bad in the suspect record), and the blocks that differ from an active member's in
    // the chunks of the group with writes here that never settled — a write that reached
    // only this member and was never acknowledged (the minority side of a partition, a client
    // that died) must not survive as a second version. Which blocks differ is asked of the
    // first source by stored CRCs (after the barriers: its copy only changes by writes that
    // also come here).
    for (v, c, bits) in server
        .dirty
        .list(g.id)
        .into_iter()
        .chain(server.suspect.list(g.id))
    {
        let e = dirty.entry((v, c)).or_default();
        for (w, b) in e.iter_mut().zip(bits) {
            *w |= b;
        }
    }
    if let Some(seg) = segs {
        let per = seg.segment_size / CHUNK_SIZE;
        for (v, i) in seg.volumes.iter().zip(&seg.indexes) {
            for c in server.activity.list(*v) {
                if c / per != *i {
                    continue;
                }
                let chunk = ChunkId {
                    volume: *v,
                    index: c,
                };
                let differ = differing_blocks(engine, &conns, &g, &sources, chunk)
                    .await
                    .context("comparing an unsettled chunk")?;
                let e = dirty.entry((*v, c)).or_default();
                for (w, b) in e.iter_mut().zip(differ) {
                    *w |= b;
                }
            }
        }
    }
    // A replacement member has nothing yet: every chunk of the group's segments.
    let mine = g.members.iter().find(|m| m.disk_uuid == disk);
    if let (Some(seg), true) = (segs, mine.is_some_and(|m| m.full_copy)) {
        let per = seg.segment_size / CHUNK_SIZE;
        for (v, i) in seg.volumes.iter().zip(&seg.indexes) {
            dirty.extend((i * per..(i + 1) * per).map(|c| ((*v, c), [u64::MAX; BLOCKS / 64])));
        }
    }
    let mut stats = ResyncStats::default();
    let started = Instant::now();
    let full = mine.is_some_and(|m| m.full_copy);
    let total = dirty.len() as u64;
    server.progress.update(g.id, disk, |p| {
        p.chunks_total = total;
        p.full_copy = full;
    });
    let mut copies = futures::stream::iter(dirty.into_iter().map(|((volume, index), blocks)| {
        let chunk = ChunkId { volume, index };
        copy_chunk(server, engine, &conns, &g, &sources, chunk, blocks)
    }))
    .buffer_unordered(COPY_PARALLELISM);
    while let Some(c) = copies.next().await {
        let bytes = c?;
        if bytes > 0 {
            stats.chunks += 1;
            stats.bytes += bytes;
        }
        server.progress.update(g.id, disk, |p| {
            p.chunks_done += 1;
            p.bytes_copied += bytes;
        });
        // Throttled against client I/O: at most `rate` bytes a second on average.
        if rate > 0 {
            let due = Duration::from_secs_f64(stats.bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    let done = change(false, &g).await.context("finishing the resync")?;
    // Copied: this member's own suspect blocks are good now. (Blocks the scrub marks while
    // this ran are forgotten too; its next pass finds them again if they are still bad.)
    if let Err(e) = server.suspect.clear(g.id) {
        tracing::warn!(group = g.id, error = %format!("{e:#}"), "cannot clear the suspect record");
    }
    if done
        .members
        .iter()
        .all(|m| m.state == pb::MemberState::Active as i32)
    {
        // Whole again: the record of what it missed can go, everywhere.
        for m in &done.members {
            let r = if server.disk(&m.disk_uuid).is_some() {
                server.dirty.clear(done.id)
            } else {
                ask(&conns, m, group_request(dpb::Op::ClearDirty, &done, m))
                    .await
                    .map(|_| ())
            };
            if let Err(e) = r {
                tracing::warn!(group = done.id, node = m.node_id, error = %format!("{e:#}"), "cannot clear the dirty record");
            }
        }
    }
    Ok(stats)
}

/// The blocks of a chunk whose stored version here differs from the one every source holds.
/// A block the sources disagree on is left out: copying one of their versions could spread a
/// bad copy (and outvote the good one); the scrub sorts such blocks out by majority.
async fn differing_blocks<E: ChunkEngine>(
    engine: &Arc<E>,
    conns: &Mutex<HashMap<String, Arc<DataClient>>>,
    g: &pb::PlacementGroup,
    sources: &[pb::GroupMember],
    chunk: ChunkId,
) -> anyhow::Result<BlockMap> {
    let mut theirs = Vec::new();
    for s in sources {
        theirs.push(crate::scrub::peer_versions(conns, g, s, chunk).await?);
    }
    let mine = crate::scrub::stored_versions(engine.chunk_info(chunk)?);
    let mut out = BlockMap::default();
    for b in 0..BLOCKS {
        let agreed = theirs.iter().all(|t| t[b] == theirs[0][b]);
        if !agreed {
            tracing::warn!(
                group = g.id,
                volume = chunk.volume,
                chunk = chunk.index,
                block = b,
                "active members disagree on a block; leaving it to the scrub"
            );
        } else if mine[b] != theirs[0][b] {
            out[b / 64] |= 1 << (b % 64);
        }
    }
    Ok(out)
}

/// Copies the `wanted` blocks of one chunk from the first source that can send them; blocks a
/// client wrote here since the resync began are left alone. Returns the bytes written.
async fn copy_chunk<E: ChunkEngine>(
    server: &Arc<DataServer<E>>,
    engine: &Arc<E>,
    conns: &Mutex<HashMap<String, Arc<DataClient>>>,
    g: &pb::PlacementGroup,
    sources: &[pb::GroupMember],
    chunk: ChunkId,
    wanted: BlockMap,
) -> anyhow::Result<u64> {
    let mut last = None;
    for s in sources {
        match fetch(conns, g, s, chunk, &wanted).await {
            Ok(image) => return apply(server, engine, g.id, chunk, &wanted, image).await,
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no source")))
}

/// A source's copy of some blocks of a chunk: which are mapped there, and for runs of wanted
/// mapped blocks, their data (offset in the chunk, bytes).
struct Image {
    mapped: Vec<u64>,
    runs: Vec<(u64, Bytes)>,
}

async fn fetch(
    conns: &Mutex<HashMap<String, Arc<DataClient>>>,
    g: &pb::PlacementGroup,
    s: &pb::GroupMember,
    chunk: ChunkId,
    wanted: &BlockMap,
) -> anyhow::Result<Image> {
    let req = |op, offset, length| dpb::Request {
        volume: chunk.volume,
        chunk: chunk.index,
        offset,
        length,
        ..group_request(op, g, s)
    };
    let check = |r: &dpb::Response, data: &Bytes| {
        anyhow::ensure!(
            data.is_empty() || crc32c::crc32c(data) == r.payload_crc,
            "copy from node {} damaged in transit",
            s.node_id
        );
        Ok(())
    };
    if wanted.iter().all(|w| *w == u64::MAX) {
        // The whole chunk: one request.
        let (r, data) = ask(conns, s, req(dpb::Op::ChunkCopy, 0, 0)).await?;
        check(&r, &data)?;
        let runs = if data.is_empty() {
            vec![]
        } else {
            vec![(0, data)]
        };
        return Ok(Image {
            mapped: r.mapped,
            runs,
        });
    }
    let (info, _) = ask(conns, s, req(dpb::Op::ChunkInfo, 0, 0)).await?;
    let mut runs = Vec::new();
    let mut b = 0;
    while b < BLOCKS {
        if !(is_set(wanted, b) && is_set(&info.mapped, b)) {
            b += 1;
            continue;
        }
        let mut end = b + 1;
        while end < BLOCKS && is_set(wanted, end) && is_set(&info.mapped, end) {
            end += 1;
        }
        let (off, len) = (b as u64 * BLOCK_SIZE, (end - b) as u64 * BLOCK_SIZE);
        let (r, data) = ask(conns, s, req(dpb::Op::Read, off, len)).await?;
        check(&r, &data)?;
        anyhow::ensure!(
            data.len() as u64 == len,
            "short read from node {}",
            s.node_id
        );
        runs.push((off, data));
        b = end;
    }
    Ok(Image {
        mapped: info.mapped,
        runs,
    })
}

/// Writes a source's copy of the wanted blocks of a chunk here: blocks mapped there written,
/// the others discarded — except blocks a client has written here since the resync began.
async fn apply<E: ChunkEngine>(
    server: &Arc<DataServer<E>>,
    engine: &Arc<E>,
    group: u64,
    chunk: ChunkId,
    wanted: &BlockMap,
    image: Image,
) -> anyhow::Result<u64> {
    if image.runs.is_empty() && engine.chunk_info(chunk)?.is_none() {
        return Ok(0); // nothing there, nothing here
    }
    // The data of block b, if the source has it mapped.
    let data_of = |b: usize| -> Option<Bytes> {
        let at = b as u64 * BLOCK_SIZE;
        if !is_set(&image.mapped, b) {
            return None;
        }
        image.runs.iter().find_map(|(off, d)| {
            (at >= *off && at < off + d.len() as u64).then(|| {
                let i = (at - off) as usize;
                d.slice(i..i + BLOCK_SIZE as usize)
            })
        })
    };
    let marks = server
        .syncing
        .marks(group, chunk)
        .context("not syncing this group")?;
    // Held across the writes: a client write of this chunk marks its blocks first, so it
    // either marked them before (and the copy leaves them) or lands after the copy.
    let bits = marks.lock().await;
    let mut written = 0;
    let mut b = 0;
    while b < BLOCKS {
        if !is_set(wanted, b) || is_set(&bits[..], b) {
            b += 1;
            continue;
        }
        let present = data_of(b).is_some();
        let mut end = b + 1;
        while end < BLOCKS
            && is_set(wanted, end)
            && !is_set(&bits[..], end)
            && data_of(end).is_some() == present
        {
            end += 1;
        }
        let (off, len) = (b as u64 * BLOCK_SIZE, (end - b) as u64 * BLOCK_SIZE);
        if present {
            let mut run = bytes::BytesMut::with_capacity(len as usize);
            for x in b..end {
                run.extend_from_slice(&data_of(x).expect("present"));
            }
            engine.write(chunk, off, run.freeze()).await?;
            written += len;
        } else {
            engine.discard(chunk, off, len).await?;
        }
        b = end;
    }
    drop(bits);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dirty_records_survive_a_reopen_and_clear_per_group() {
        let dir = tempfile::tempdir().unwrap();
        let c = |volume, index| ChunkId { volume, index };
        {
            let d = Dirty::open(dir.path()).unwrap();
            d.mark(7, c(1, 3), 0, 4096).await.unwrap();
            d.mark(7, c(1, 3), 8192, 4096).await.unwrap();
            d.mark(7, c(2, 0), 0, 4096).await.unwrap();
            d.mark(8, c(1, 4), 0, 4096).await.unwrap();
            // In memory: the blocks written.
            assert_eq!(d.list(7)[0].2[0], 0b101);
        }
        let d = Dirty::open(dir.path()).unwrap();
        let keys = |l: Vec<(u64, u64, BlockMap)>| {
            l.into_iter().map(|(v, c, _)| (v, c)).collect::<Vec<_>>()
        };
        // After a reopen: the chunks, every block of them.
        assert_eq!(keys(d.list(7)), vec![(1, 3), (2, 0)]);
        assert!(d.list(7)[0].2.iter().all(|w| *w == u64::MAX));
        d.clear(7).unwrap();
        assert_eq!(keys(d.list(7)), vec![]);
        let d = {
            drop(d);
            Dirty::open(dir.path()).unwrap()
        };
        assert_eq!(keys(d.list(7)), vec![]);
        assert_eq!(keys(d.list(8)), vec![(1, 4)]);
    }

    #[test]
    fn progress_is_reported_while_a_resync_runs() {
        let p = Progress::default();
        p.update(6, "disk-a", |x| x.chunks_total = 3);
        p.update(6, "disk-a", |x| {
            x.chunks_done += 1;
            x.bytes_copied += 4096
        });
        p.update(7, "disk-b", |x| x.full_copy = true);
        let s = p.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (
                s[0].group,
                s[0].chunks_total,
                s[0].chunks_done,
                s[0].bytes_copied
            ),
            (6, 3, 1, 4096)
        );
        assert!(s[1].full_copy);
        p.end(6, "disk-a");
        assert_eq!(p.snapshot().len(), 1);
    }

    #[test]
    fn block_marks() {
        let mut bits = [0u64; BLOCKS / 64];
        mark_blocks(&mut bits, 4096, 8192);
        assert!(!is_set(&bits, 0) && is_set(&bits, 1) && is_set(&bits, 2) && !is_set(&bits, 3));
        mark_blocks(&mut bits, CHUNK_SIZE - 4096, 4096);
        assert!(is_set(&bits, BLOCKS - 1));
    }
}
