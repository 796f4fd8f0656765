//! The replicated state machine: what the cluster knows, and how each committed command changes
//! it.
//!
//! `apply` is deterministic: the same commands in the same order give the same state on every
//! member. Time comes from the command (the proposing leader's clock), never from the applying
//! member. Rejected commands (a duplicate name, a lease held by someone else) are committed like
//! any other and answer with the same error on every member.
//!
//! Each apply also returns the records it changed ([`Write`]s); the store persists them in the
//! same RocksDB batch as the applied index, so the state on disk is always the state at some
//! applied index.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use cairn_proto::metadata as pb;
use cairn_proto::{
    CreateVolume, FailureDomainLevel, PoolName, PoolSpec, VolumeName, VolumeSize, BLOCK_SIZE,
    SEGMENT_SIZE,
};
use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use crate::placement::{self, Candidate};

/// Each disk is placed in about this many groups of a pool.
pub const GROUPS_PER_DISK: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub uuid: String,
    pub path: String,
    pub capacity_bytes: u64,
    pub healthy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub uuid: String,
    pub host: String,
    pub rack: String,
    pub site: String,
    pub data_addr: String,
    pub disks: Vec<DiskRecord>,
}

impl NodeRecord {
    pub(crate) fn domain(&self, level: FailureDomainLevel) -> &str {
        match level {
            FailureDomainLevel::Host => &self.host,
            FailureDomainLevel::Rack => &self.rack,
            FailureDomainLevel::Site => &self.site,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub generation: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: VolumeName,
    pub size: VolumeSize,
    pub pool: PoolName,
    pub replicas: u32,
    pub created_ms: u64,
    pub request_id: String,
    /// The last generation handed out by an attach.
    pub generation: u64,
    pub lease: Option<LeaseRecord>,
    pub allocated_segments: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub id: u64,
    pub pool: PoolName,
    pub epoch: u64,
    /// Disk uuids, in group order.
    pub disks: Vec<String>,
    pub segments: u64,
    /// Members that are not active (stale or catching up), by disk uuid.
    #[serde(default)]
    pub states: BTreeMap<String, crate::membership::MemberState>,
    /// Members that replaced a lost one and need every chunk copied.
    #[serde(default)]
    pub full_copy: std::collections::BTreeSet<String>,
}

/// A command, as proposed to raft and stored in its log. Serialized as JSON: self-describing, so
/// later versions can add fields with `#[serde(default)]` and still read old logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    RegisterNode {
        uuid: String,
        host: String,
        rack: String,
        site: String,
        data_addr: String,
        disks: Vec<DiskRecord>,
    },
    UpdateDisks {
        node_id: u64,
        disks: Vec<DiskRecord>,
    },
    CreatePool(PoolSpec),
    CreateVolume(CreateVolume),
    ResizeVolume {
        name: VolumeName,
        size: VolumeSize,
    },
    DeleteVolume {
        name: VolumeName,
    },
    AllocateSegment {
        volume: VolumeName,
        index: u64,
        prefer_host: String,
    },
    Attach {
        volume: VolumeName,
        holder: String,
        force: bool,
        ttl_ms: u64,
    },
    Renew {
        volume: VolumeName,
        holder: String,
        generation: u64,
        ttl_ms: u64,
    },
    Release {
        volume: VolumeName,
        holder: String,
        generation: u64,
    },
    /// A member on a node gone for good replaced by a disk elsewhere.
    Replace {
        group: u64,
        epoch: u64,
        old: String,
        new: String,
    },
    /// A membership change of a group after a failure ([`crate::membership`]).
    Member {
        group: u64,
        epoch: u64,
        disk: String,
        change: crate::membership::Change,
    },
}

/// What the log stores for each normal entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The proposing leader's wall clock, in Unix milliseconds.
    pub now_ms: u64,
    pub cmd: Command,
}

/// The answer to an applied command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Node(u64),
    Pool(PoolSpec),
    Volume(Box<VolumeRecord>),
    Segment { index: u64, group: u64 },
    Lease(Box<VolumeRecord>),
    Group(u64),
    Done,
}

/// One record changed by an apply: `None` deletes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Everything the metadata service knows. Maps are ordered so iteration, snapshots and the
/// digest are deterministic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub next_id: u64,
    /// Metadata members: raft id to address.
    pub members: BTreeMap<u64, String>,
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub pools: BTreeMap<PoolName, PoolSpec>,
    pub volumes: BTreeMap<VolumeName, VolumeRecord>,
    pub groups: BTreeMap<u64, GroupRecord>,
    /// (volume id, segment index) to group id.
    pub segments: BTreeMap<(u64, u64), u64>,
}

// Record keys in the state machine's column family. One prefix per kind.
pub(crate) const K_NEXT_ID: &[u8] = b"next_id";
const P_MEMBER: &str = "m/";
const P_NODE: &str = "n/";
const P_POOL: &str = "p/";
const P_VOLUME: &str = "v/";
const P_GROUP: &str = "g/";
const P_SEGMENT: &str = "s/";

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize: no maps with non-string keys")
}

impl ClusterState {
    fn alloc_id(&mut self, w: &mut Vec<Write>) -> u64 {
        self.next_id += 1;
        w.push(Write {
            key: K_NEXT_ID.to_vec(),
            value: Some(json(&self.next_id)),
        });
        self.next_id
    }

    pub(crate) fn put_member(&mut self, id: u64, addr: Option<String>, w: &mut Vec<Write>) {
        let key = format!("{P_MEMBER}{id:020}").into_bytes();
        match addr {
            Some(a) => {
                w.push(Write {
                    key,
                    value: Some(json(&a)),
                });
                self.members.insert(id, a);
            }
            None => {
                w.push(Write { key, value: None });
                self.members.remove(&id);
            }
        }
    }

    fn put_node(&mut self, n: NodeRecord, w: &mut Vec<Write>) {
        w.push(Write {
            key: format!("{P_NODE}{:020}", n.id).into_bytes(),
            value: Some(json(&n)),
        });
        self.nodes.insert(n.id, n);
    }

    fn put_pool(&mut self, p: PoolSpec, w: &mut Vec<Write>) {
        w.push(Write {
            key: format!("{P_POOL}{}", p.name).into_bytes(),
            value: Some(json(&p)),
        });
        self.pools.insert(p.name.clone(), p);
    }

    fn put_volume(&mut self, v: VolumeRecord, w: &mut Vec<Write>) {
        w.push(Write {
            key: format!("{P_VOLUME}{}", v.name).into_bytes(),
            value: Some(json(&v)),
        });
        self.volumes.insert(v.name.clone(), v);
    }

    pub(crate) fn put_group_record(&mut self, g: GroupRecord, w: &mut Vec<Write>) {
        self.put_group(g, w);
    }

    fn put_group(&mut self, g: GroupRecord, w: &mut Vec<Write>) {
        w.push(Write {
            key: format!("{P_GROUP}{:020}", g.id).into_bytes(),
            value: Some(json(&g)),
        });
        self.groups.insert(g.id, g);
    }

    fn segment_key(volume: u64, index: u64) -> Vec<u8> {
        format!("{P_SEGMENT}{volume:020}/{index:020}").into_bytes()
    }

    /// Rebuilds the state from its records, as read back from the store.
    pub fn from_records<'a>(
        records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, String> {
        let mut s = Self::default();
        for (k, v) in records {
            let key = std::str::from_utf8(k).map_err(|e| format!("bad record key: {e}"))?;
            let bad = |e: serde_json::Error| format!("record {key}: {e}");
            if k == K_NEXT_ID {
                s.next_id = serde_json::from_slice(v).map_err(bad)?;
            } else if let Some(id) = key.strip_prefix(P_MEMBER) {
                let id = id.parse().map_err(|e| format!("record {key}: {e}"))?;
                s.members
                    .insert(id, serde_json::from_slice(v).map_err(bad)?);
            } else if key.starts_with(P_NODE) {
                let n: NodeRecord = serde_json::from_slice(v).map_err(bad)?;
                s.nodes.insert(n.id, n);
            } else if key.starts_with(P_POOL) {
                let p: PoolSpec = serde_json::from_slice(v).map_err(bad)?;
                s.pools.insert(p.name.clone(), p);
            } else if key.starts_with(P_VOLUME) {
                let vol: VolumeRecord = serde_json::from_slice(v).map_err(bad)?;
                s.volumes.insert(vol.name.clone(), vol);
            } else if key.starts_with(P_GROUP) {
                let g: GroupRecord = serde_json::from_slice(v).map_err(bad)?;
                s.groups.insert(g.id, g);
            } else if let Some(rest) = key.strip_prefix(P_SEGMENT) {
                let (vol, idx) = rest
                    .split_once('/')
                    .ok_or_else(|| format!("bad key {key}"))?;
                let parse = |x: &str| x.parse::<u64>().map_err(|e| format!("record {key}: {e}"));
                s.segments.insert(
                    (parse(vol)?, parse(idx)?),
                    serde_json::from_slice(v).map_err(bad)?,
                );
            }
            // Other keys (applied index, conf state) belong to the store.
        }
        Ok(s)
    }

    /// Every record of the state, as the store would hold them: the body of a snapshot.
    pub fn all_records(&self) -> Vec<Write> {
        let mut w = Vec::new();
        let mut s = Self {
            next_id: self.next_id,
            ..Self::default()
        };
        w.push(Write {
            key: K_NEXT_ID.to_vec(),
            value: Some(json(&self.next_id)),
        });
        for (id, a) in &self.members {
            s.put_member(*id, Some(a.clone()), &mut w);
        }
        for n in self.nodes.values() {
            s.put_node(n.clone(), &mut w);
        }
        for p in self.pools.values() {
            s.put_pool(p.clone(), &mut w);
        }
        for v in self.volumes.values() {
            s.put_volume(v.clone(), &mut w);
        }
        for g in self.groups.values() {
            s.put_group(g.clone(), &mut w);
        }
        for ((vol, idx), g) in &self.segments {
            w.push(Write {
                key: Self::segment_key(*vol, *idx),
                value: Some(json(g)),
            });
        }
        w
    }

    /// A digest of the whole state: equal on members that applied the same log prefix.
    pub fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for w in self.all_records() {
            w.key.hash(&mut h);
            w.value.hash(&mut h);
        }
        h.finish()
    }

    fn volume(&self, name: &VolumeName) -> Result<&VolumeRecord, MetaError> {
        self.volumes
            .get(name)
            .ok_or_else(|| MetaError::VolumeNotFound {
                name: name.to_string(),
            })
    }

    fn pool_or_default(&self, name: &PoolName) -> Result<PoolSpec, MetaError> {
        match self.pools.get(name) {
            Some(p) => Ok(p.clone()),
            None if *name == PoolName::default_pool() => Ok(PoolSpec::default_pool()),
            None => Err(MetaError::PoolNotFound {
                name: name.to_string(),
            }),
        }
    }

    /// Applies one committed command. Returns the reply and the records to persist with it.
    pub fn apply(&mut self, env: Envelope) -> (Result<Reply, MetaError>, Vec<Write>) {
        let mut w = Vec::new();
        let r = self.apply_inner(env, &mut w);
        (r, w)
    }

    fn apply_inner(&mut self, env: Envelope, w: &mut Vec<Write>) -> Result<Reply, MetaError> {
        let now = env.now_ms;
        match env.cmd {
            Command::RegisterNode {
                uuid,
                host,
                rack,
                site,
                data_addr,
                disks,
            } => {
                let existing = self.nodes.values().find(|n| n.uuid == uuid).map(|n| n.id);
                let id = match existing {
                    Some(id) => id,
                    None => self.alloc_id(w),
                };
                self.put_node(
                    NodeRecord {
                        id,
                        uuid,
                        host,
                        rack,
                        site,
                        data_addr,
                        disks,
                    },
                    w,
                );
                Ok(Reply::Node(id))
            }
            Command::UpdateDisks { node_id, disks } => {
                let mut n = self
                    .nodes
                    .get(&node_id)
                    .cloned()
                    .ok_or(MetaError::NodeNotFound { id: node_id })?;
                n.disks = disks;
                self.put_node(n, w);
                Ok(Reply::Done)
            }
            Command::CreatePool(spec) => {
                if self.pools.contains_key(&spec.name) {
                    return Err(MetaError::PoolExists {
                        name: spec.name.to_string(),
                    });
                }
                self.put_pool(spec.clone(), w);
                Ok(Reply::Pool(spec))
            }
            Command::CreateVolume(c) => {
                if let Some(v) = self.volumes.get(&c.name) {
                    // A retry of a create that committed but whose reply was lost.
                    if !c.request_id.is_empty() && v.request_id == c.request_id {
                        return Ok(Reply::Volume(Box::new(v.clone())));
                    }
                    return Err(MetaError::VolumeExists {
                        name: c.name.to_string(),
                    });
                }
                let pool = self.pool_or_default(&c.pool)?;
                if !self.pools.contains_key(&pool.name) {
                    self.put_pool(pool.clone(), w);
                }
                let v = VolumeRecord {
                    id: self.alloc_id(w),
                    name: c.name,
                    size: c.size,
                    pool: pool.name.clone(),
                    replicas: c.replicas.unwrap_or(pool.replicas),
                    created_ms: now,
                    request_id: c.request_id,
                    generation: 0,
                    lease: None,
                    allocated_segments: 0,
                };
                self.put_volume(v.clone(), w);
                Ok(Reply::Volume(Box::new(v)))
            }
            Command::ResizeVolume { name, size } => {
                let mut v = self.volume(&name)?.clone();
                if size < v.size {
                    return Err(MetaError::ShrinkRefused {
                        name: name.to_string(),
                        size: v.size.bytes(),
                        new_size: size.bytes(),
                    });
                }
                v.size = size;
                self.put_volume(v.clone(), w);
                Ok(Reply::Volume(Box::new(v)))
            }
            Command::DeleteVolume { name } => {
                let v = self.volume(&name)?.clone();
                if let Some(l) = v.lease.as_ref().filter(|l| l.expires_ms > now) {
                    return Err(MetaError::VolumeAttached {
                        name: name.to_string(),
                        holder: l.holder.clone(),
                    });
                }
                let segs: Vec<((u64, u64), u64)> = self
                    .segments
                    .range((v.id, 0)..=(v.id, u64::MAX))
                    .map(|(k, g)| (*k, *g))
                    .collect();
                for ((vol, idx), gid) in segs {
                    self.segments.remove(&(vol, idx));
                    w.push(Write {
                        key: Self::segment_key(vol, idx),
                        value: None,
                    });
                    if let Some(mut g) = self.groups.get(&gid).cloned() {
                        g.segments = g.segments.saturating_sub(1);
                        self.put_group(g, w);
                    }
                }
                self.volumes.remove(&name);
                w.push(Write {
                    key: format!("{P_VOLUME}{name}").into_bytes(),
                    value: None,
                });
                Ok(Reply::Done)
            }
            Command::AllocateSegment {
                volume,
                index,
                prefer_host,
            } => {
                let v = self.volume(&volume)?.clone();
                if index >= v.size.segments() {
                    return Err(MetaError::SegmentOutOfRange {
                        name: volume.to_string(),
                        index,
                        segments: v.size.segments(),
                    });
                }
                if let Some(&g) = self.segments.get(&(v.id, index)) {
                    return Ok(Reply::Segment { index, group: g });
                }
                let pool = self.pool_or_default(&v.pool)?;
                let gid = self.choose_group_for_segment(&pool, v.replicas, &prefer_host, w)?;
                self.segments.insert((v.id, index), gid);
                w.push(Write {
                    key: Self::segment_key(v.id, index),
                    value: Some(json(&gid)),
                });
                let mut g = self.groups[&gid].clone();
                g.segments += 1;
                self.put_group(g, w);
                let mut v = v;
                v.allocated_segments += 1;
                self.put_volume(v, w);
                Ok(Reply::Segment { index, group: gid })
            }
            Command::Attach {
                volume,
                holder,
                force,
                ttl_ms,
            } => {
                let mut v = self.volume(&volume)?.clone();
                if let Some(l) = &v.lease {
                    if l.holder != holder && l.expires_ms > now && !force {
                        return Err(MetaError::LeaseHeld {
                            name: volume.to_string(),
                            holder: l.holder.clone(),
                            expires_in_ms: l.expires_ms - now,
                        });
                    }
                }
                // Every attach, even a re-attach by the same holder, fences what came before.
                v.generation += 1;
                v.lease = Some(LeaseRecord {
                    holder,
                    generation: v.generation,
                    expires_ms: now + ttl_ms,
                });
                self.put_volume(v.clone(), w);
                Ok(Reply::Lease(Box::new(v)))
            }
            Command::Renew {
                volume,
                holder,
                generation,
                ttl_ms,
            } => {
                let mut v = self.volume(&volume)?.clone();
                match &mut v.lease {
                    Some(l) if l.holder == holder && l.generation == generation => {
                        l.expires_ms = now + ttl_ms;
                    }
                    other => {
                        return Err(MetaError::LeaseLost {
                            name: volume.to_string(),
                            generation,
                            current: other.as_ref().map(|l| (l.holder.clone(), l.generation)),
                        })
                    }
                }
                self.put_volume(v.clone(), w);
                Ok(Reply::Lease(Box::new(v)))
            }
            Command::Release {
                volume,
                holder,
                generation,
            } => {
                let mut v = self.volume(&volume)?.clone();
                match &v.lease {
                    Some(l) if l.holder == holder && l.generation == generation => v.lease = None,
                    // Releasing a lease that is already gone is a no-op: retries are safe.
                    None => return Ok(Reply::Done),
                    Some(l) => {
                        return Err(MetaError::LeaseLost {
                            name: volume.to_string(),
                            generation,
                            current: Some((l.holder.clone(), l.generation)),
                        })
                    }
                }
                self.put_volume(v, w);
                Ok(Reply::Done)
            }
            Command::Member {
                group,
                epoch,
                disk,
                change,
            } => self.change_member(group, epoch, &disk, change, w),
            Command::Replace {
                group,
                epoch,
                old,
                new,
            } => self.replace_member(group, epoch, &old, &new, w),
        }
    }

    /// Picks the group for a new segment of a pool, creating groups while the pool has fewer
    /// than its target. Among the pool's groups of the right size, the one with the fewest
    /// segments wins, preferring groups with a disk on `prefer_host` (data locality).
    fn choose_group_for_segment(
        &mut self,
        pool: &PoolSpec,
        replicas: u32,
        prefer_host: &str,
        w: &mut Vec<Write>,
    ) -> Result<u64, MetaError> {
        let replicas = replicas as usize;
        let mut candidates = Vec::new();
        for n in self.nodes.values() {
            for d in n.disks.iter().filter(|d| d.healthy) {
                candidates.push(Candidate {
                    disk: d.uuid.clone(),
                    domain: n.domain(pool.failure_domain).to_owned(),
                });
            }
        }
        let existing: Vec<&GroupRecord> = self
            .groups
            .values()
            .filter(|g| g.pool == pool.name && g.disks.len() == replicas)
            .collect();
        let target = placement::target_groups(candidates.len(), replicas, GROUPS_PER_DISK);
        if existing.len() < target {
            let mut load = BTreeMap::new();
            for g in self.groups.values() {
                for d in &g.disks {
                    *load.entry(d.clone()).or_insert(0) += 1;
                }
            }
            let disks = placement::choose_group(&candidates, &load, replicas).map_err(|e| {
                MetaError::NoPlacement {
                    level: pool.failure_domain.to_string(),
                    source: e,
                }
            })?;
            let g = GroupRecord {
                id: self.alloc_id(w),
                pool: pool.name.clone(),
                epoch: 1,
                disks,
                segments: 0,
                states: BTreeMap::new(),
                full_copy: Default::default(),
            };
            let id = g.id;
            self.put_group(g, w);
            return Ok(id);
        }
        let host_of_disk = |d: &str| {
            self.nodes
                .values()
                .find(|n| n.disks.iter().any(|x| x.uuid == d))
                .map(|n| n.host.as_str())
        };
        let local = |g: &GroupRecord| g.disks.iter().any(|d| host_of_disk(d) == Some(prefer_host));
        existing
            .iter()
            .min_by_key(|g| (!(prefer_host.is_empty() || local(g)), g.segments, g.id))
            .map(|g| g.id)
            .ok_or(MetaError::NoPlacement {
                level: pool.failure_domain.to_string(),
                source: placement::NotEnoughDomains {
                    needed: replicas,
                    available: 0,
                },
            })
    }

    // ---- conversions to wire types ----

    pub fn volume_to_pb(&self, v: &VolumeRecord) -> pb::Volume {
        pb::Volume {
            id: v.id,
            name: v.name.to_string(),
            size_bytes: v.size.bytes(),
            pool: v.pool.to_string(),
            replicas: v.replicas,
            block_size: u32::try_from(BLOCK_SIZE).expect("4096 fits"),
            segment_size: SEGMENT_SIZE,
            allocated_segments: v.allocated_segments,
            lease: v.lease.as_ref().map(lease_to_pb),
            generation: v.generation,
            created_unix_ms: v.created_ms,
        }
    }

    pub fn group_to_pb(&self, id: u64) -> Option<pb::PlacementGroup> {
        let g = self.groups.get(&id)?;
        let members = g
            .disks
            .iter()
            .map(|d| {
                let node = self
                    .nodes
                    .values()
                    .find(|n| n.disks.iter().any(|x| &x.uuid == d));
                let state = match g.state_of(d) {
                    crate::membership::MemberState::Active => pb::MemberState::Active,
                    crate::membership::MemberState::Stale => pb::MemberState::Stale,
                    crate::membership::MemberState::Syncing => pb::MemberState::Syncing,
                };
                pb::GroupMember {
                    disk_uuid: d.clone(),
                    node_id: node.map_or(0, |n| n.id),
                    data_addr: node.map(|n| n.data_addr.clone()).unwrap_or_default(),
                    host: node.map(|n| n.host.clone()).unwrap_or_default(),
                    state: state as i32,
                    full_copy: g.needs_full_copy(d),
                }
            })
            .collect();
        Some(pb::PlacementGroup {
            id,
            epoch: g.epoch,
            members,
        })
    }

    pub fn segments_of(&self, volume_id: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.segments
            .range((volume_id, 0)..=(volume_id, u64::MAX))
            .map(|((_, i), g)| (*i, *g))
    }
}

pub fn lease_to_pb(l: &LeaseRecord) -> pb::Lease {
    pb::Lease {
        holder: l.holder.clone(),
        generation: l.generation,
        expires_unix_ms: l.expires_ms,
    }
}

#[cfg(test)]
mod tests;
