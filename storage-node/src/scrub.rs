//! Background scrub (DESIGN.md §5.5): every block read back and checked against its CRC32C,
//! and every replica's copy compared, so silent corruption and divergent replicas are found
//! before a read needs them, repaired from healthy members, and reported.
//!
//! Each node scrubs its own disks, and judges only its own copies: for every chunk it holds as
//! an active member of a group, it reads the mapped blocks (a block failing its checksum is
//! bad), then asks the other active members for their stored CRCs (OP_BLOCK_CRCS, no data
//! read). A block of its own is bad when it fails its checksum, when a majority of the group
//! holds one other version, or — with no majority — when it differs from the version on the
//! member with the lowest node id (so two disagreeing replicas converge on one of them).
//!
//! A difference can be a write in flight (one member has it, the other not yet), so a
//! suspect block is judged twice, `recheck` apart, and only a block bad both times with the
//! same versions is repaired. The repair never writes from here: the node records the bad
//! blocks in its own suspect record for the group (apart from the dirty record, which other
//! members' resyncs read and clear) and reports its own membership failed. The
//! member goes stale (clients stop reading it), and the resync copies those blocks from an
//! active member behind an epoch barrier, with client writes arriving meanwhile left alone
//! ([`crate::resync`]) — the same path a member back from a crash takes, so a repair cannot
//! race a client's write and lose it.
//!
//! Reads are throttled to `rate` bytes a second; a pass starts `every` after the last ended.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cairn_client::data::client::DataClient;
use cairn_client::MetaClient;
use cairn_proto::data as dpb;
use cairn_proto::metadata as pb;
use foldhash::{HashMap, HashMapExt};

use crate::engine::{ChunkEngine, ChunkId, ChunkInfo, EngineError, BLOCK_SIZE, CHUNK_SIZE};
use crate::protocol::server::DataServer;
use crate::resync::{ask, group_request};

const BLOCKS: usize = (CHUNK_SIZE / BLOCK_SIZE) as usize;

#[derive(Debug, Clone)]
pub struct ScrubConfig {
    /// Pause between the end of one pass and the start of the next; zero: no scrub.
    pub every: Duration,
    /// Most bytes a second read by the scrub (0: unlimited).
    pub rate: u64,
    /// How long a suspect block is given to stop being a write in flight.
    pub recheck: Duration,
}

/// What the scrub found, per disk, since the node started (sent with the heartbeat).
#[derive(Debug, Default)]
pub struct Stats {
    disks: Mutex<HashMap<String, DiskScrub>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskScrub {
    /// Blocks found bad and sent to repair.
    pub errors: u64,
    /// Bytes read and checked.
    pub bytes: u64,
    /// Passes finished.
    pub passes: u64,
}

impl Stats {
    pub fn get(&self, disk: &str) -> DiskScrub {
        self.disks
            .lock()
            .expect("scrub stats lock")
            .get(disk)
            .copied()
            .unwrap_or_default()
    }

    fn add(&self, disk: &str, f: impl FnOnce(&mut DiskScrub)) {
        f(self
            .disks
            .lock()
            .expect("scrub stats lock")
            .entry(disk.to_owned())
            .or_default());
    }
}

/// One replica's version of a block, as compared between members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Unmapped, or mapped with zeros (the two read the same).
    Zeros,
    Crc(u32),
    /// Failed its checksum here.
    Bad,
}

fn version(mapped: bool, crc: u32) -> Version {
    if !mapped || crc == zero_block_crc() {
        Version::Zeros
    } else {
        Version::Crc(crc)
    }
}

fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK_SIZE as usize]))
}

/// Whether this member's version of a block is the one to repair. `peers` are the other
/// active members' versions with their node ids. Pure: unit-tested below.
pub fn outvoted(mine: Version, me: u64, peers: &[(u64, Version)]) -> bool {
    if mine == Version::Bad {
        return true;
    }
    if peers.iter().all(|(_, v)| *v == mine) {
        return false;
    }
    let n = peers.len() + 1;
    let count = |v: Version| peers.iter().filter(|(_, p)| *p == v).count();
    if count(mine) + 1 > n / 2 {
        return false; // this version holds a majority
    }
    if peers
        .iter()
        .any(|(_, v)| *v != Version::Bad && count(*v) > n / 2)
    {
        return true; // another one does
    }
    // No majority: the lowest node id's version wins.
    peers
        .iter()
        .filter(|(_, v)| *v != Version::Bad)
        .min_by_key(|(id, _)| *id)
        .is_some_and(|(id, v)| *id < me && *v != mine)
}

/// Runs scrub passes while the node lives. `node_id` is filled in once the node has
/// registered.
pub async fn scrub_loop<E: ChunkEngine>(
    meta: MetaClient,
    server: Arc<DataServer<E>>,
    node_id: tokio::sync::watch::Receiver<Option<u64>>,
    cfg: ScrubConfig,
) {
    if cfg.every.is_zero() {
        return;
    }
    loop {
        tokio::time::sleep(cfg.every).await;
        let Some(id) = *node_id.borrow() else {
            continue;
        };
        if !server.ready.load(Ordering::Acquire) {
            continue;
        }
        let started = Instant::now();
        match scrub_pass(&meta, &server, id, &cfg).await {
            Ok((bytes, bad)) => tracing::info!(
                bytes,
                bad_blocks = bad,
                ms = started.elapsed().as_millis() as u64,
                "scrub pass finished"
            ),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "scrub pass stopped; will retry"),
        }
    }
}

/// One pass over every disk of the node. Returns the bytes checked and the bad blocks found.
async fn scrub_pass<E: ChunkEngine>(
    meta: &MetaClient,
    server: &Arc<DataServer<E>>,
    me: u64,
    cfg: &ScrubConfig,
) -> anyhow::Result<(u64, u64)> {
    let r = meta
        .call(|mut c| async move {
            c.stale_members(pb::StaleMembersRequest {
                node_id: me,
                all: true,
            })
            .await
        })
        .await
        .map_err(|e| anyhow::anyhow!("asking for this node's groups: {e}"))?;
    // (volume, segment index) → the group holding it.
    let mut owner: HashMap<(u64, u64), &pb::PlacementGroup> = HashMap::new();
    let mut per = u64::MAX;
    for s in &r.segments {
        per = s.segment_size / CHUNK_SIZE;
        if let Some(g) = r.groups.iter().find(|g| g.id == s.group) {
            for (v, i) in s.volumes.iter().zip(&s.indexes) {
                owner.insert((*v, *i), g);
            }
        }
    }
    let conns = Mutex::new(HashMap::new());
    let started = Instant::now();
    let (mut bytes, mut bad_total) = (0u64, 0u64);
    let mut disks: Vec<_> = server.disks.iter().collect();
    disks.sort_by(|a, b| a.0.cmp(b.0));
    for (uuid, engine) in disks {
        for chunk in engine.chunks() {
            let Some(g) = owner.get(&(chunk.volume, chunk.index / per.max(1))) else {
                continue; // not a chunk of a group this node serves (left behind by a move)
            };
            let active = |m: &&pb::GroupMember| m.state == pb::MemberState::Active as i32;
            if !g.members.iter().any(|m| m.disk_uuid == *uuid && active(&m)) {
                continue; // out of date here: the resync, not the scrub, deals with it
            }
            let peers: Vec<&pb::GroupMember> = g
                .members
                .iter()
                .filter(|m| m.disk_uuid != *uuid)
                .filter(active)
                .collect();
            let (checked, bad) = match scrub_chunk(engine, &conns, g, me, &peers, chunk, cfg).await
            {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(volume = chunk.volume, chunk = chunk.index, error = %format!("{e:#}"), "chunk not scrubbed");
                    continue;
                }
            };
            bytes += checked;
            server.scrub.add(uuid, |s| s.bytes += checked);
            if !bad.is_empty() {
                bad_total += bad.len() as u64;
                server.scrub.add(uuid, |s| s.errors += bad.len() as u64);
                repair(meta, server, g, uuid, chunk, &bad).await;
            }
            // Throttled: at most `rate` bytes a second on average.
            if cfg.rate > 0 {
                let due = Duration::from_secs_f64(bytes as f64 / cfg.rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        server.scrub.add(uuid, |s| s.passes += 1);
    }
    Ok((bytes, bad_total))
}

/// The stored version of every block of a chunk, from its index entry (no data read).
pub(crate) fn stored_versions(info: Option<ChunkInfo>) -> Vec<Version> {
    match info {
        None => vec![Version::Zeros; BLOCKS],
        Some(i) => (0..BLOCKS)
            .map(|b| version(i.mapped[b / 64] & (1 << (b % 64)) != 0, i.crcs[b]))
            .collect(),
    }
}

/// This member's version of every block of a chunk: each mapped block read back and checked.
async fn local_versions<E: ChunkEngine>(
    engine: &Arc<E>,
    chunk: ChunkId,
) -> anyhow::Result<(Vec<Version>, u64)> {
    let Some(info) = engine.chunk_info(chunk)? else {
        return Ok((vec![Version::Zeros; BLOCKS], 0));
    };
    let mapped = |b: usize| info.mapped[b / 64] & (1 << (b % 64)) != 0;
    let mut out = stored_versions(Some(info.clone()));
    let mut checked = 0;
    let mut b = 0;
    while b < BLOCKS {
        if !mapped(b) {
            b += 1;
            continue;
        }
        let mut end = b + 1;
        while end < BLOCKS && mapped(end) {
            end += 1;
        }
        let (off, len) = (b as u64 * BLOCK_SIZE, (end - b) as u64 * BLOCK_SIZE);
        match engine.read(chunk, off, len).await {
            Ok(_) => {
                checked += len;
                b = end;
            }
            // A block failing its check (or left torn by a crash): bad; go on after it.
            Err(EngineError::Corrupt { block, .. } | EngineError::Torn { block, .. }) => {
                let at = block.clamp(b, end - 1);
                out[at] = Version::Bad;
                checked += (at + 1 - b) as u64 * BLOCK_SIZE;
                b = at + 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((out, checked))
}

/// Another member's stored version of every block of a chunk.
pub(crate) async fn peer_versions(
    conns: &Mutex<HashMap<String, Arc<DataClient>>>,
    g: &pb::PlacementGroup,
    m: &pb::GroupMember,
    chunk: ChunkId,
) -> anyhow::Result<Vec<Version>> {
    let req = dpb::Request {
        volume: chunk.volume,
        chunk: chunk.index,
        ..group_request(dpb::Op::BlockCrcs, g, m)
    };
    let (r, data): (dpb::Response, Bytes) = ask(conns, m, req).await?;
    if r.mapped.is_empty() {
        return Ok(vec![Version::Zeros; BLOCKS]);
    }
    anyhow::ensure!(
        r.mapped.len() == BLOCKS / 64 && data.len() == BLOCKS * 4,
        "node {}: malformed block CRC list",
        m.node_id
    );
    Ok((0..BLOCKS)
        .map(|b| {
            let crc = u32::from_le_bytes(data[b * 4..b * 4 + 4].try_into().expect("4 bytes"));
            version(r.mapped[b / 64] & (1 << (b % 64)) != 0, crc)
        })
        .collect())
}

/// Every version of a chunk: this member's, then each peer's (node id, versions).
type Versions = (Vec<Version>, Vec<(u64, Vec<Version>)>);

async fn versions<E: ChunkEngine>(
    engine: &Arc<E>,
    conns: &Mutex<HashMap<String, Arc<DataClient>>>,
    g: &pb::PlacementGroup,
    peers: &[&pb::GroupMember],
    chunk: ChunkId,
) -> anyhow::Result<(Versions, u64)> {
    let (mine, checked) = local_versions(engine, chunk).await?;
    let mut theirs = Vec::new();
    for m in peers {
        let v = peer_versions(conns, g, m, chunk)
            .await
            .with_context(|| format!("asking node {} for its CRCs", m.node_id))?;
        theirs.push((m.node_id, v));
    }
    Ok(((mine, theirs), checked))
}

fn suspects(v: &Versions, me: u64) -> Vec<usize> {
    (0..BLOCKS)
        .filter(|&b| {
            let peers: Vec<(u64, Version)> = v.1.iter().map(|(id, p)| (*id, p[b])).collect();
            outvoted(v.0[b], me, &peers)
        })
        .collect()
}

/// Scrubs one chunk: returns the bytes checked and the blocks of this member's copy that are
/// bad (judged twice, `cfg.recheck` apart, with the same versions both times).
async fn scrub_chunk<E: ChunkEngine>(
    engine: &Arc<E>,
    conns: &Mutex<HashMap<String, Arc<DataClient>>>,
    g: &pb::PlacementGroup,
    me: u64,
    peers: &[&pb::GroupMember],
    chunk: ChunkId,
    cfg: &ScrubConfig,
) -> anyhow::Result<(u64, Vec<usize>)> {
    let (first, checked) = versions(engine, conns, g, peers, chunk).await?;
    let suspect = suspects(&first, me);
    if suspect.is_empty() {
        return Ok((checked, suspect));
    }
    tokio::time::sleep(cfg.recheck).await;
    let (second, _) = versions(engine, conns, g, peers, chunk).await?;
    let same = |b: usize| {
        first.0[b] == second.0[b]
            && first
                .1
                .iter()
                .zip(&second.1)
                .all(|((a, x), (b2, y))| a == b2 && x[b] == y[b])
    };
    let bad: Vec<usize> = suspects(&second, me)
        .into_iter()
        .filter(|b| suspect.contains(b) && same(*b))
        .collect();
    Ok((checked, bad))
}

/// Sends this member's bad blocks of a chunk to repair: recorded as blocks it must copy, then
/// its membership reported failed, so the resync copies them from an active member.
async fn repair<E: ChunkEngine>(
    meta: &MetaClient,
    server: &Arc<DataServer<E>>,
    g: &pb::PlacementGroup,
    disk: &str,
    chunk: ChunkId,
    bad: &[usize],
) {
    tracing::error!(
        group = g.id,
        disk = %disk,
        volume = chunk.volume,
        chunk = chunk.index,
        blocks = ?bad,
        "scrub: this replica's blocks fail their checksum or differ from the other replicas; repairing them from an active member"
    );
    for &b in bad {
        // Synced to RocksDB before the report: once the member is stale, its resync finds
        // these blocks even after a crash.
        if let Err(e) = server
            .suspect
            .mark(g.id, chunk, b as u64 * BLOCK_SIZE, BLOCK_SIZE)
            .await
        {
            tracing::error!(error = %e, "scrub: cannot record a block to repair");
            return;
        }
    }
    let req = pb::ReportMemberFailureRequest {
        group: g.id,
        epoch: g.epoch,
        disk_uuid: disk.to_owned(),
        reason: format!(
            "scrub: {} bad block(s) in chunk {} of volume {}",
            bad.len(),
            chunk.index,
            chunk.volume
        ),
    };
    let r = meta
        .call(|mut c| {
            let req = req.clone();
            async move { c.report_member_failure(req).await }
        })
        .await;
    if let Err(e) = r {
        // Below min_replicas, or the membership moved: the blocks stay recorded, and the next
        // pass finds them again if no resync copied them meanwhile.
        tracing::warn!(group = g.id, error = %e, "scrub: repair not started now");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Version::*;

    #[test]
    fn a_majority_decides() {
        assert!(!outvoted(Crc(1), 2, &[(1, Crc(1)), (3, Crc(1))]));
        assert!(outvoted(Crc(9), 2, &[(1, Crc(1)), (3, Crc(1))]));
        assert!(!outvoted(Crc(1), 1, &[(2, Crc(9)), (3, Crc(1))]));
        // Zeros count as a version like any other.
        assert!(outvoted(Zeros, 3, &[(1, Crc(5)), (2, Crc(5))]));
        assert!(outvoted(Crc(5), 3, &[(1, Zeros), (2, Zeros)]));
    }

    #[test]
    fn a_bad_block_is_always_repaired() {
        assert!(outvoted(Bad, 1, &[(2, Crc(1)), (3, Crc(1))]));
        assert!(outvoted(Bad, 1, &[]));
    }

    #[test]
    fn without_a_majority_the_lowest_node_wins() {
        // Two members disagreeing: the higher node id takes the lower one's version.
        assert!(outvoted(Crc(2), 5, &[(3, Crc(1))]));
        assert!(!outvoted(Crc(1), 3, &[(5, Crc(2))]));
        // Three versions.
        assert!(outvoted(Crc(2), 2, &[(1, Crc(1)), (3, Crc(3))]));
        assert!(!outvoted(Crc(1), 1, &[(2, Crc(2)), (3, Crc(3))]));
        // A peer that holds a bad copy of its own does not get a vote.
        assert!(!outvoted(Crc(2), 2, &[(1, Bad)]));
    }

    #[test]
    fn mapped_zeros_equal_unmapped() {
        assert_eq!(version(false, 0), Zeros);
        assert_eq!(version(true, zero_block_crc()), Zeros);
        assert_eq!(version(true, 7), Crc(7));
    }
}
