//! The gRPC `Metadata` service: validates each request into domain types, proposes commands or
//! performs linearizable reads through the raft thread, and maps errors to gRPC once, at this
//! edge.
//!
//! Only the leader serves. A follower answers UNAVAILABLE with the leader's address in the
//! `cairn-leader-addr` metadata key; `cairn_client::MetaClient` follows it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::metadata as pb;
use cairn_proto::metadata::metadata_server::Metadata;
use cairn_proto::{CreateVolume, InvalidArgument, PoolSpec, VolumeName, VolumeSize, SEGMENT_SIZE};
use raft::prelude::{ConfChange, ConfChangeType};
use raft::StateRole;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::error::MetaError;
use crate::membership::Change;
use crate::node::{role_name, Msg, RaftHandle};
use crate::state::{ClusterState, Command, DiskRecord, Reply};

/// How long a request waits for raft before answering "outcome unknown, retry".
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(8);
/// Longest holder string accepted.
const MAX_HOLDER_LEN: usize = 256;

pub struct MetaService {
    pub(crate) raft: RaftHandle,
    lease_ttl: Duration,
    node_down_after: Duration,
    /// The leader's view of storage-node liveness. Heartbeats are not replicated (they would
    /// put every node's heartbeat through an fsync); a new leader learns liveness within one
    /// heartbeat interval.
    pub(crate) liveness: Mutex<HashMap<u64, Liveness>>,
}

type Resp<T> = Result<Response<T>, Status>;

/// Members of all groups in state `st`.
fn member_count(s: &ClusterState, st: crate::membership::MemberState) -> u64 {
    s.groups
        .values()
        .map(|g| g.states.values().filter(|x| **x == st).count() as u64)
        .sum()
}

/// What the leader last heard from a storage node.
#[derive(Clone)]
pub(crate) struct Liveness {
    pub(crate) at: Instant,
    /// Per-disk usage and error counters, by disk uuid.
    disks: HashMap<String, pb::Disk>,
    /// The node's own view of the link: heartbeat round trip (moving average) and failures.
    rtt_us: u64,
    failures: u64,
    /// The resyncs running on the node.
    resyncs: Vec<pb::ResyncProgress>,
    /// Gaps between consecutive heartbeats received in the last minute (when, how long).
    gaps: std::collections::VecDeque<(Instant, Duration)>,
}

/// How far back `cairn status` looks for the longest heartbeat gap.
const GAP_WINDOW: Duration = Duration::from_secs(60);

impl Liveness {
    fn new() -> Self {
        Self {
            at: Instant::now(),
            disks: HashMap::new(),
            rtt_us: 0,
            failures: 0,
            resyncs: Vec::new(),
            gaps: Default::default(),
        }
    }

    /// A heartbeat arrived now.
    fn heard(&mut self, disks: HashMap<String, pb::Disk>, r: &pb::HeartbeatRequest) {
        let now = Instant::now();
        self.gaps.push_back((now, now - self.at));
        while self
            .gaps
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > GAP_WINDOW)
        {
            self.gaps.pop_front();
        }
        self.at = now;
        self.disks = disks;
        self.rtt_us = r.rtt_us;
        self.failures = r.failures;
        self.resyncs = r.resyncs.clone();
    }

    fn longest_gap(&self) -> Duration {
        self.gaps.iter().map(|(_, g)| *g).max().unwrap_or_default()
    }
}

fn volume_name(s: String) -> Result<VolumeName, Status> {
    VolumeName::try_from(s).map_err(|e| MetaError::from(e).into())
}

fn disks(d: Vec<pb::Disk>) -> Result<Vec<DiskRecord>, Status> {
    let mut out = Vec::with_capacity(d.len());
    for d in d {
        if d.uuid.is_empty() {
            return Err(MetaError::from(InvalidArgument::Missing { field: "disk.uuid" }).into());
        }
        out.push(DiskRecord {
            uuid: d.uuid,
            path: d.path,
            capacity_bytes: d.capacity_bytes,
            healthy: d.healthy,
        });
    }
    Ok(out)
}

impl MetaService {
    pub fn new(raft: RaftHandle, lease_ttl: Duration, node_down_after: Duration) -> Self {
        Self {
            raft,
            lease_ttl,
            node_down_after,
            liveness: Mutex::default(),
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    fn check_serving(&self) -> Result<(), MetaError> {
        let st = self.raft.status.lock().expect("status lock");
        if st.poisoned.is_some() {
            return Err(MetaError::ShuttingDown);
        }
        if st.role != StateRole::Leader {
            let addr = self
                .raft
                .state
                .read()
                .expect("state lock")
                .members
                .get(&st.leader_id)
                .cloned();
            return Err(MetaError::NotLeader {
                leader: addr.map(|a| (st.leader_id, a)),
            });
        }
        Ok(())
    }

    async fn wait<T>(rx: oneshot::Receiver<Result<T, MetaError>>) -> Result<T, MetaError> {
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(MetaError::ShuttingDown),
            Err(_) => Err(MetaError::Dropped),
        }
    }

    /// Proposes a command and waits until it is committed and applied.
    pub async fn propose(&self, cmd: Command) -> Result<Reply, MetaError> {
        self.check_serving()?;
        let (tx, rx) = oneshot::channel();
        self.raft
            .tx
            .send(Msg::Propose { cmd, reply: tx })
            .map_err(|_| MetaError::ShuttingDown)?;
        Self::wait(rx).await
    }

    async fn conf_change(&self, cc: ConfChange) -> Result<Reply, MetaError> {
        self.check_serving()?;
        let (tx, rx) = oneshot::channel();
        self.raft
            .tx
            .send(Msg::ConfChange { cc, reply: tx })
            .map_err(|_| MetaError::ShuttingDown)?;
        Self::wait(rx).await
    }

    /// Runs `f` on state that reflects every change acknowledged before this call (ReadIndex).
    pub async fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> Result<T, MetaError> {
        self.check_serving()?;
        let (tx, rx) = oneshot::channel();
        self.raft
            .tx
            .send(Msg::ReadIndex { reply: tx })
            .map_err(|_| MetaError::ShuttingDown)?;
        Self::wait(rx).await?;
        Ok(f(&self.raft.state.read().expect("state lock")))
    }

    fn volume_reply(&self, r: Reply) -> Result<pb::Volume, MetaError> {
        match r {
            Reply::Volume(v) | Reply::Lease(v) => {
                Ok(self.raft.state.read().expect("state lock").volume_to_pb(&v))
            }
            other => Err(MetaError::Storage(format!("unexpected reply {other:?}"))),
        }
    }

    /// Proposes a membership change and answers with the group as it is after it.
    async fn member(
        &self,
        group: u64,
        epoch: u64,
        disk: String,
        change: Change,
    ) -> Resp<pb::GroupResponse> {
        if disk.is_empty() || disk.len() > 64 {
            return Err(Status::invalid_argument(
                "a member is named by its disk uuid",
            ));
        }
        let cmd = Command::Member {
            group,
            epoch,
            disk,
            change,
        };
        match self.propose(cmd).await? {
            Reply::Group(id) => {
                let group = self.raft.state.read().expect("state lock").group_to_pb(id);
                Ok(Response::new(pb::GroupResponse { group }))
            }
            other => Err(MetaError::Storage(format!("unexpected reply {other:?}")).into()),
        }
    }

    fn members(&self) -> Vec<pb::Member> {
        let st = self.raft.state.read().expect("state lock");
        st.members
            .iter()
            .map(|(id, addr)| pb::Member {
                id: *id,
                addr: addr.clone(),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Metadata for MetaService {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Resp<pb::RegisterNodeResponse> {
        let r = req.into_inner();
        for (field, v) in [
            ("node_uuid", &r.node_uuid),
            ("host", &r.host),
            ("data_addr", &r.data_addr),
        ] {
            if v.is_empty() {
                return Err(MetaError::from(InvalidArgument::Missing { field }).into());
            }
        }
        let cmd = Command::RegisterNode {
            uuid: r.node_uuid,
            rack: if r.rack.is_empty() {
                r.host.clone()
            } else {
                r.rack
            },
            site: if r.site.is_empty() {
                "default".into()
            } else {
                r.site
            },
            host: r.host,
            data_addr: r.data_addr,
            disks: disks(r.disks)?,
        };
        match self.propose(cmd).await? {
            Reply::Node(id) => {
                self.liveness
                    .lock()
                    .expect("liveness lock")
                    .insert(id, Liveness::new());
                Ok(Response::new(pb::RegisterNodeResponse { node_id: id }))
            }
            other => Err(MetaError::Storage(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Resp<pb::HeartbeatResponse> {
        let r = req.into_inner();
        let counters: HashMap<String, pb::Disk> = r
            .disks
            .iter()
            .map(|d| (d.uuid.clone(), d.clone()))
            .collect();
        let reported = disks(r.disks.clone())?;
        let known = self
            .read(|s| {
                s.nodes
                    .get(&r.node_id)
                    .map(|n| (n.disks.clone(), fencing_marks(s, n)))
            })
            .await?;
        let Some((known, (generations, epochs))) = known else {
            return Err(MetaError::NodeNotFound { id: r.node_id }.into());
        };
        self.liveness
            .lock()
            .expect("liveness lock")
            .entry(r.node_id)
            .or_insert_with(Liveness::new)
            .heard(counters, &r);
        // Only a change of the disk set or of health goes through raft.
        let changed = known.len() != reported.len()
            || known
                .iter()
                .zip(&reported)
                .any(|(a, b)| a.uuid != b.uuid || a.healthy != b.healthy);
        if changed {
            self.propose(Command::UpdateDisks {
                node_id: r.node_id,
                disks: reported,
            })
            .await?;
        }
        let term = self.raft.status.lock().expect("status lock").term;
        Ok(Response::new(pb::HeartbeatResponse {
            leader_term: term,
            generations,
            epochs,
        }))
    }

    async fn create_pool(&self, req: Request<pb::CreatePoolRequest>) -> Resp<pb::PoolResponse> {
        let pool = req
            .into_inner()
            .pool
            .ok_or_else(|| MetaError::from(InvalidArgument::Missing { field: "pool" }))?;
        let spec = PoolSpec::try_from(pool).map_err(MetaError::from)?;
        match self.propose(Command::CreatePool(spec)).await? {
            Reply::Pool(p) => Ok(Response::new(pb::PoolResponse {
                pool: Some(p.to_pb()),
            })),
            other => Err(MetaError::Storage(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn list_pools(&self, _req: Request<pb::ListPoolsRequest>) -> Resp<pb::ListPoolsResponse> {
        let pools = self
            .read(|s| s.pools.values().map(|p| p.to_pb()).collect())
            .await?;
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Resp<pb::VolumeResponse> {
        let c = CreateVolume::try_from(req.into_inner()).map_err(MetaError::from)?;
        let v = self.volume_reply(self.propose(Command::CreateVolume(c)).await?)?;
        Ok(Response::new(pb::VolumeResponse { volume: Some(v) }))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Resp<pb::VolumeResponse> {
        let name = volume_name(req.into_inner().name)?;
        let v = self
            .read(|s| s.volumes.get(&name).map(|v| s.volume_to_pb(v)))
            .await?
            .ok_or_else(|| MetaError::VolumeNotFound {
                name: name.to_string(),
            })?;
        Ok(Response::new(pb::VolumeResponse { volume: Some(v) }))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Resp<pb::ListVolumesResponse> {
        let volumes = self
            .read(|s| s.volumes.values().map(|v| s.volume_to_pb(v)).collect())
            .await?;
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Resp<pb::VolumeResponse> {
        let r = req.into_inner();
        let name = volume_name(r.name)?;
        let size = VolumeSize::try_from(r.new_size_bytes).map_err(MetaError::from)?;
        let v = self.volume_reply(self.propose(Command::ResizeVolume { name, size }).await?)?;
        Ok(Response::new(pb::VolumeResponse { volume: Some(v) }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Resp<pb::DeleteVolumeResponse> {
        let name = volume_name(req.into_inner().name)?;
        self.propose(Command::DeleteVolume { name }).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn allocate_segment(
        &self,
        req: Request<pb::AllocateSegmentRequest>,
    ) -> Resp<pb::SegmentResponse> {
        let r = req.into_inner();
        let volume = volume_name(r.volume)?;
        let cmd = Command::AllocateSegment {
            volume,
            index: r.segment_index,
            prefer_host: r.prefer_host,
        };
        match self.propose(cmd).await? {
            Reply::Segment { index, group } => {
                let group = self
                    .raft
                    .state
                    .read()
                    .expect("state lock")
                    .group_to_pb(group);
                Ok(Response::new(pb::SegmentResponse {
                    segment: Some(pb::Segment { index, group }),
                }))
            }
            other => Err(MetaError::Storage(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn get_layout(&self, req: Request<pb::GetLayoutRequest>) -> Resp<pb::LayoutResponse> {
        let name = volume_name(req.into_inner().volume)?;
        let r = self
            .read(|s| {
                let v = s.volumes.get(&name)?;
                let segments = s
                    .segments_of(v.id)
                    .map(|(index, g)| pb::Segment {
                        index,
                        group: s.group_to_pb(g),
                    })
                    .collect();
                Some(pb::LayoutResponse {
                    volume: Some(s.volume_to_pb(v)),
                    segments,
                })
            })
            .await?
            .ok_or_else(|| MetaError::VolumeNotFound {
                name: name.to_string(),
            })?;
        Ok(Response::new(r))
    }

    async fn get_group(&self, req: Request<pb::GetGroupRequest>) -> Resp<pb::GroupResponse> {
        let id = req.into_inner().group;
        let group = self
            .read(move |s| s.group_to_pb(id))
            .await?
            .ok_or(MetaError::GroupNotFound { id })?;
        Ok(Response::new(pb::GroupResponse { group: Some(group) }))
    }

    async fn report_member_failure(
        &self,
        req: Request<pb::ReportMemberFailureRequest>,
    ) -> Resp<pb::GroupResponse> {
        let r = req.into_inner();
        tracing::warn!(group = r.group, epoch = r.epoch, disk = %r.disk_uuid, reason = %r.reason, "member failure reported");
        self.member(r.group, r.epoch, r.disk_uuid, Change::Failed)
            .await
    }

    async fn begin_resync(&self, req: Request<pb::ResyncRequest>) -> Resp<pb::GroupResponse> {
        let r = req.into_inner();
        self.member(r.group, r.epoch, r.disk_uuid, Change::BeginResync)
            .await
    }

    async fn finish_resync(&self, req: Request<pb::ResyncRequest>) -> Resp<pb::GroupResponse> {
        let r = req.into_inner();
        self.member(r.group, r.epoch, r.disk_uuid, Change::FinishResync)
            .await
    }

    async fn stale_members(
        &self,
        req: Request<pb::StaleMembersRequest>,
    ) -> Resp<pb::StaleMembersResponse> {
        let r = req.into_inner();
        let resp = self
            .read(move |s| {
                let ids = s.groups_of(r.node_id, r.all);
                let segments = ids
                    .iter()
                    .map(|&g| {
                        let (volumes, indexes) = s
                            .segments
                            .iter()
                            .filter(|(_, grp)| **grp == g)
                            .map(|((v, i), _)| (*v, *i))
                            .unzip();
                        pb::GroupSegments {
                            group: g,
                            segment_size: SEGMENT_SIZE,
                            volumes,
                            indexes,
                        }
                    })
                    .collect();
                pb::StaleMembersResponse {
                    groups: ids.into_iter().filter_map(|g| s.group_to_pb(g)).collect(),
                    segments,
                }
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn attach(&self, req: Request<pb::AttachRequest>) -> Resp<pb::LeaseResponse> {
        let r = req.into_inner();
        let volume = volume_name(r.volume)?;
        check_holder(&r.holder)?;
        let cmd = Command::Attach {
            volume,
            holder: r.holder,
            force: r.force,
            ttl_ms: self.ttl_ms(),
        };
        let v = self.volume_reply(self.propose(cmd).await?)?;
        Ok(Response::new(pb::LeaseResponse {
            lease: v.lease.clone(),
            volume: Some(v),
        }))
    }

    async fn renew_lease(&self, req: Request<pb::RenewLeaseRequest>) -> Resp<pb::LeaseResponse> {
        let r = req.into_inner();
        let volume = volume_name(r.volume)?;
        check_holder(&r.holder)?;
        let cmd = Command::Renew {
            volume,
            holder: r.holder,
            generation: r.generation,
            ttl_ms: self.ttl_ms(),
        };
        let v = self.volume_reply(self.propose(cmd).await?)?;
        Ok(Response::new(pb::LeaseResponse {
            lease: v.lease.clone(),
            volume: Some(v),
        }))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Resp<pb::ReleaseResponse> {
        let r = req.into_inner();
        let volume = volume_name(r.volume)?;
        check_holder(&r.holder)?;
        self.propose(Command::Release {
            volume,
            holder: r.holder,
            generation: r.generation,
        })
        .await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Resp<pb::ClusterStatusResponse> {
        let liveness = self.liveness.lock().expect("liveness lock").clone();
        let down_after = self.node_down_after;
        let (leader_id, term, commit_index) = {
            let st = self.raft.status.lock().expect("status lock");
            (st.leader_id, st.term, st.commit)
        };
        let mut resp = self
            .read(|s| {
                let nodes = s
                    .nodes
                    .values()
                    .map(|n| {
                        let heard = liveness.get(&n.id);
                        let ago = heard.map(|l| l.at.elapsed());
                        pb::NodeStatus {
                            id: n.id,
                            host: n.host.clone(),
                            rack: n.rack.clone(),
                            site: n.site.clone(),
                            data_addr: n.data_addr.clone(),
                            up: ago.is_some_and(|a| a < down_after),
                            last_heartbeat_ms_ago: ago.map_or(u64::MAX, |a| {
                                u64::try_from(a.as_millis()).unwrap_or(u64::MAX)
                            }),
                            disks: n
                                .disks
                                .iter()
                                .map(|d| {
                                    let c = heard.and_then(|l| l.disks.get(&d.uuid));
                                    pb::Disk {
                                        uuid: d.uuid.clone(),
                                        path: d.path.clone(),
                                        capacity_bytes: d.capacity_bytes,
                                        used_bytes: c.map_or(0, |c| c.used_bytes),
                                        healthy: d.healthy,
                                        corrupt_reads: c.map_or(0, |c| c.corrupt_reads),
                                        torn_blocks: c.map_or(0, |c| c.torn_blocks),
                                        latency_us: c.map_or(0, |c| c.latency_us),
                                        scrub_errors: c.map_or(0, |c| c.scrub_errors),
                                        scrub_bytes: c.map_or(0, |c| c.scrub_bytes),
                                    }
                                })
                                .collect(),
                            heartbeat_rtt_us: heard.map_or(0, |l| l.rtt_us),
                            heartbeat_failures: heard.map_or(0, |l| l.failures),
                            heartbeat_gap_ms: heard
                                .map_or(0, |l| l.longest_gap().as_millis() as u64),
                        }
                    })
                    .collect();
                pb::ClusterStatusResponse {
                    leader_id,
                    term,
                    commit_index,
                    members: vec![],
                    nodes,
                    volumes: s.volumes.len() as u64,
                    volume_bytes: s.volumes.values().map(|v| v.size.bytes()).sum(),
                    allocated_bytes: s.segments.len() as u64 * SEGMENT_SIZE,
                    groups: s.groups.len() as u64,
                    degraded_groups: s.groups.values().filter(|g| !g.whole()).count() as u64,
                    stale_members: member_count(s, crate::membership::MemberState::Stale),
                    syncing_members: member_count(s, crate::membership::MemberState::Syncing),
                    resyncs: vec![],
                }
            })
            .await?;
        resp.members = self.members();
        resp.resyncs = liveness
            .values()
            .filter(|l| l.at.elapsed() < down_after)
            .flat_map(|l| l.resyncs.iter().cloned())
            .collect();
        resp.resyncs.sort_by_key(|r| (r.group, r.node_id));
        Ok(Response::new(resp))
    }

    async fn add_member(&self, req: Request<pb::AddMemberRequest>) -> Resp<pb::MembersResponse> {
        let r = req.into_inner();
        let (id, addr) =
            crate::config::parse_peer(&format!("{}={}", r.id, r.addr)).map_err(|why| {
                MetaError::from(InvalidArgument::Other {
                    field: "member",
                    why,
                })
            })?;
        if self.read(|s| s.members.contains_key(&id)).await? {
            return Err(MetaError::MemberExists { id }.into());
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        cc.context = addr.into_bytes().into();
        self.conf_change(cc).await?;
        Ok(Response::new(pb::MembersResponse {
            members: self.members(),
        }))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Resp<pb::MembersResponse> {
        let id = req.into_inner().id;
        if !self.read(|s| s.members.contains_key(&id)).await? {
            return Err(MetaError::MemberNotFound { id }.into());
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = id;
        self.conf_change(cc).await?;
        Ok(Response::new(pb::MembersResponse {
            members: self.members(),
        }))
    }

    async fn member_status(
        &self,
        _req: Request<pb::MemberStatusRequest>,
    ) -> Resp<pb::MemberStatusResponse> {
        let st = self.raft.status.lock().expect("status lock").clone();
        let (volumes, digest) = {
            let s = self.raft.state.read().expect("state lock");
            (s.volumes.len() as u64, s.digest())
        };
        Ok(Response::new(pb::MemberStatusResponse {
            id: st.id,
            role: role_name(st.role).into(),
            term: st.term,
            leader_id: st.leader_id,
            commit_index: st.commit,
            applied_index: st.applied,
            first_log_index: st.first_index,
            snapshots_installed: st.snapshots_installed,
            volumes,
            state_digest: digest,
            members: self.members(),
        }))
    }

    async fn set_failpoint(
        &self,
        req: Request<pb::SetFailpointRequest>,
    ) -> Resp<pb::SetFailpointResponse> {
        let r = req.into_inner();
        if !crate::failpoints::ALL.contains(&r.name.as_str()) {
            return Err(Status::invalid_argument(format!(
                "unknown failpoint {:?}",
                r.name
            )));
        }
        set_failpoint(&r.name, &r.actions)?;
        Ok(Response::new(pb::SetFailpointResponse {}))
    }
}

/// The fencing marks a node needs: every volume's current generation (volumes with none yet
/// handed out are left out), and the epoch of every group with a disk on the node.
fn fencing_marks(
    s: &ClusterState,
    node: &crate::state::NodeRecord,
) -> (Vec<pb::VolumeGeneration>, Vec<pb::GroupEpoch>) {
    let generations = s
        .volumes
        .values()
        .filter(|v| v.generation > 0)
        .map(|v| pb::VolumeGeneration {
            volume: v.id,
            generation: v.generation,
        })
        .collect();
    let epochs = s
        .groups
        .values()
        .filter(|g| {
            g.disks
                .iter()
                .any(|d| node.disks.iter().any(|x| &x.uuid == d))
        })
        .map(|g| pb::GroupEpoch {
            group: g.id,
            epoch: g.epoch,
        })
        .collect();
    (generations, epochs)
}

fn check_holder(holder: &str) -> Result<(), Status> {
    if holder.is_empty() || holder.len() > MAX_HOLDER_LEN {
        return Err(MetaError::from(InvalidArgument::Other {
            field: "holder",
            why: format!("must be 1 to {MAX_HOLDER_LEN} bytes"),
        })
        .into());
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
fn set_failpoint(name: &str, actions: &str) -> Result<(), Status> {
    tracing::warn!(name, actions, "failpoint configured");
    fail::cfg(name, actions).map_err(Status::invalid_argument)
}

#[cfg(not(feature = "failpoints"))]
fn set_failpoint(_name: &str, _actions: &str) -> Result<(), Status> {
    Err(Status::unimplemented(
        "this build has no failpoints (feature `failpoints`)",
    ))
}
