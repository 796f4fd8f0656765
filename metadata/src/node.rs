//! The raft loop: one thread owns the `RawNode`, its store and the state machine, and handles,
//! in order, proposals, reads, peer messages and ticks, then raft's `Ready`.
//!
//! Everything that arrives between two passes is handled in one `Ready`: proposals that arrive
//! together share one synced log write (group commit).
//!
//! Replies: a proposal is answered after its entry is committed *and* applied (its records are
//! written). A read waits for raft's ReadIndex (the leader confirms it still leads) and for the
//! state machine to reach that index, so reads are linearizable.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protobuf::Message as _;
use raft::prelude::*;
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::oneshot;

use crate::error::MetaError;
use crate::failpoints::{self as fp, crash_point};
use crate::state::{ClusterState, Envelope, Reply, Write};
use crate::store::RaftStore;
use crate::transport::Transport;

pub type ReplyTx = oneshot::Sender<Result<Reply, MetaError>>;

/// What the rest of the member sends to the raft thread.
pub enum Msg {
    Propose {
        cmd: crate::state::Command,
        reply: ReplyTx,
    },
    ConfChange {
        cc: ConfChange,
        reply: ReplyTx,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<(), MetaError>>,
    },
    Raft(Vec<Message>),
    Unreachable(u64),
    SnapshotStatus(u64, SnapshotStatus),
    Shutdown,
}

/// A view of the raft member, refreshed after every pass of the loop.
#[derive(Debug, Clone)]
pub struct RaftStatus {
    pub id: u64,
    pub role: StateRole,
    pub term: u64,
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub snapshots_installed: u64,
    /// Set when the loop stopped on a storage failure; the member then serves nothing.
    pub poisoned: Option<String>,
}

pub fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

/// Tunables of the loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub tick: Duration,
    /// Compact the log once this many applied entries are in it.
    pub compact_threshold: u64,
}

#[derive(PartialEq)]
enum Kind {
    Normal,
    Conf,
}

pub struct RaftLoop {
    node: RawNode<RaftStore>,
    rx: Receiver<Msg>,
    transport: Transport,
    status: Arc<Mutex<RaftStatus>>,
    state: Arc<RwLock<ClusterState>>,
    cfg: LoopConfig,
    /// Proposals awaiting their entry's apply: index → (term, kind, reply).
    pending: HashMap<u64, (u64, Kind, ReplyTx)>,
    /// Reads sent to raft, by request context.
    reads_waiting: HashMap<Vec<u8>, oneshot::Sender<Result<(), MetaError>>>,
    /// Reads confirmed by the leader, waiting for apply to reach their index.
    reads_ready: Vec<(u64, oneshot::Sender<Result<(), MetaError>>)>,
    next_read: u64,
    role: StateRole,
}

pub fn now_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RaftLoop {
    pub fn new(
        node: RawNode<RaftStore>,
        rx: Receiver<Msg>,
        transport: Transport,
        status: Arc<Mutex<RaftStatus>>,
        cfg: LoopConfig,
    ) -> Self {
        let state = node.store().state();
        Self {
            node,
            rx,
            transport,
            status,
            state,
            cfg,
            pending: HashMap::new(),
            reads_waiting: HashMap::new(),
            reads_ready: Vec::new(),
            next_read: 0,
            role: StateRole::Follower,
        }
    }

    /// Runs until shutdown or a storage failure. On a storage failure the loop stops for good
    /// (the on-disk state after a failed sync is unknown): the error is returned and recorded in
    /// the status so the member refuses service and its process exits.
    pub fn run(mut self) -> anyhow::Result<()> {
        let r = self.run_inner();
        if let Err(e) = &r {
            tracing::error!(error = %e, "raft loop stopped on a storage failure; member poisoned");
            self.status.lock().expect("status lock").poisoned = Some(e.to_string());
        }
        self.fail_all(|| MetaError::ShuttingDown);
        r
    }

    fn run_inner(&mut self) -> anyhow::Result<()> {
        let mut last_tick = Instant::now();
        loop {
            let timeout = self.cfg.tick.saturating_sub(last_tick.elapsed());
            match self.rx.recv_timeout(timeout) {
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
                Ok(m) => self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Everything that queued up meanwhile joins the same Ready.
            while let Ok(m) = self.rx.try_recv() {
                if matches!(m, Msg::Shutdown) {
                    return Ok(());
                }
                self.handle(m);
            }
            if last_tick.elapsed() >= self.cfg.tick {
                self.node.tick();
                last_tick = Instant::now();
            }
            self.on_ready()?;
            self.publish_status();
        }
    }

    fn leader_hint(&self) -> MetaError {
        let id = self.node.raft.leader_id;
        let addr = self
            .state
            .read()
            .expect("state lock")
            .members
            .get(&id)
            .cloned();
        MetaError::NotLeader {
            leader: addr.map(|a| (id, a)),
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Propose { cmd, reply } => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.leader_hint()));
                    return;
                }
                let env = Envelope {
                    now_ms: now_ms(),
                    cmd,
                };
                let data = serde_json::to_vec(&env).expect("commands serialize");
                self.propose(Kind::Normal, reply, |n| n.propose(vec![], data));
            }
            Msg::ConfChange { cc, reply } => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.leader_hint()));
                    return;
                }
                self.propose(Kind::Conf, reply, |n| n.propose_conf_change(vec![], cc));
            }
            Msg::ReadIndex { reply } => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.leader_hint()));
                    return;
                }
                self.next_read += 1;
                let ctx = self.next_read.to_be_bytes().to_vec();
                self.node.read_index(ctx.clone());
                self.reads_waiting.insert(ctx, reply);
            }
            Msg::Raft(msgs) => {
                for mut msg in msgs {
                    let last = self.node.raft.raft_log.last_index();
                    if msg.get_msg_type() == MessageType::MsgHeartbeat && msg.commit > last {
                        // The leader believes we hold entries we do not have: this member's
                        // data was lost while it stayed in the configuration. raft-rs would
                        // panic; refuse to pretend instead, and say how to recover.
                        tracing::error!(
                            leader_commit = msg.commit,
                            last_index = last,
                            "this member has lost log entries the cluster believes it holds; \
                             recover with `cairn meta remove-member --id {id}` then \
                             `cairn meta add-member --id {id} --addr ADDR`, and restart it \
                             with --join",
                            id = self.node.raft.id
                        );
                        msg.commit = last;
                    }
                    if let Err(e) = self.node.step(msg) {
                        tracing::debug!(error = %e, "dropping raft message");
                    }
                }
            }
            Msg::Unreachable(id) => self.node.report_unreachable(id),
            Msg::SnapshotStatus(id, s) => self.node.report_snapshot(id, s),
            Msg::Shutdown => unreachable!("handled by the loop"),
        }
    }

    fn propose(
        &mut self,
        kind: Kind,
        reply: ReplyTx,
        f: impl FnOnce(&mut RawNode<RaftStore>) -> raft::Result<()>,
    ) {
        let before = self.node.raft.raft_log.last_index();
        match f(&mut self.node) {
            Ok(()) => {
                let index = self.node.raft.raft_log.last_index();
                if index == before {
                    let _ = reply.send(Err(MetaError::Dropped));
                } else {
                    self.pending
                        .insert(index, (self.node.raft.term, kind, reply));
                }
            }
            Err(raft::Error::ProposalDropped) => {
                let _ = reply.send(Err(self.leader_hint()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "proposal refused by raft");
                let _ = reply.send(Err(MetaError::Dropped));
            }
        }
    }

    fn on_ready(&mut self) -> anyhow::Result<()> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        if let Some(ss) = rd.ss() {
            self.on_role(ss.raft_state);
        }
        // A leader may send appends before persisting its own copy (raft thesis §10.2.1).
        if !rd.messages().is_empty() {
            self.transport.send(rd.take_messages());
        }
        if !rd.snapshot().is_empty() {
            crash_point!(fp::BEFORE_SNAPSHOT_INSTALL);
            let snap = rd.snapshot().clone();
            self.node.mut_store().install_snapshot(&snap)?;
            tracing::info!(
                index = snap.get_metadata().index,
                "installed snapshot from the leader"
            );
            // Proposals at or below the snapshot were applied inside it, unseen: their outcome
            // is unknown here.
            let idx = snap.get_metadata().index;
            self.pending.retain(|&i, _| i > idx);
        }
        self.apply(rd.take_committed_entries())?;
        if !rd.entries().is_empty() || rd.hs().is_some() {
            crash_point!(fp::BEFORE_PERSIST);
            self.node.mut_store().persist(rd.entries(), rd.hs())?;
            crash_point!(fp::AFTER_PERSIST);
        }
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
        }
        for rs in rd.take_read_states() {
            if let Some(tx) = self.reads_waiting.remove(&rs.request_ctx) {
                self.reads_ready.push((rs.index, tx));
            }
        }
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        self.release_reads();
        self.maybe_compact()
    }

    fn on_role(&mut self, role: StateRole) {
        if self.role == StateRole::Leader && role != StateRole::Leader {
            tracing::info!("lost leadership; failing in-flight requests so clients retry");
            self.fail_all(|| MetaError::Dropped);
        }
        if role == StateRole::Leader && self.role != StateRole::Leader {
            tracing::info!(term = self.node.raft.term, "became leader");
        }
        self.role = role;
    }

    fn fail_all(&mut self, err: impl Fn() -> MetaError) {
        for (_, (_, _, tx)) in self.pending.drain() {
            let _ = tx.send(Err(err()));
        }
        for (_, tx) in self.reads_waiting.drain() {
            let _ = tx.send(Err(err()));
        }
        for (_, tx) in self.reads_ready.drain(..) {
            let _ = tx.send(Err(err()));
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let (last_index, last_term) = (last.index, last.term);
        crash_point!(fp::BEFORE_APPLY);
        let mut writes: Vec<Write> = Vec::new();
        let mut replies = Vec::new();
        let mut conf_changed = false;
        for e in entries {
            let (kind, result) = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => (Kind::Normal, Ok(Reply::Done)),
                EntryType::EntryNormal => {
                    let env: Envelope = serde_json::from_slice(&e.data).map_err(|err| {
                        anyhow::anyhow!(
                            "log entry {} cannot be read by this version ({err}); refusing to \
                             skip it",
                            e.index
                        )
                    })?;
                    let (r, w) = self.state.write().expect("state lock").apply(env);
                    writes.extend(w);
                    (Kind::Normal, r)
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.node.mut_store().set_conf_state(cs);
                    let addr = match cc.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            Some(String::from_utf8_lossy(&cc.context).into_owned())
                        }
                        ConfChangeType::RemoveNode => None,
                    };
                    tracing::info!(member = cc.node_id, ?addr, "membership changed");
                    self.state.write().expect("state lock").put_member(
                        cc.node_id,
                        addr,
                        &mut writes,
                    );
                    conf_changed = true;
                    (Kind::Conf, Ok(Reply::Done))
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.node.mut_store().set_conf_state(cs);
                    conf_changed = true;
                    (Kind::Conf, Ok(Reply::Done))
                }
            };
            if let Some((term, want, tx)) = self.pending.remove(&e.index) {
                // Same index and term means the same entry (log matching); otherwise ours was
                // overwritten, or raft replaced a refused conf change by an empty entry.
                let r = if term == e.term && want == kind {
                    result
                } else {
                    Err(MetaError::Dropped)
                };
                replies.push((tx, r));
            }
        }
        self.node
            .mut_store()
            .apply_writes(&writes, last_index, last_term, conf_changed, false)?;
        crash_point!(fp::AFTER_APPLY);
        for (tx, r) in replies {
            let _ = tx.send(r);
        }
        Ok(())
    }

    fn release_reads(&mut self) {
        let applied = self.node.store().applied();
        let (done, wait): (Vec<_>, Vec<_>) = self
            .reads_ready
            .drain(..)
            .partition(|(idx, _)| *idx <= applied);
        self.reads_ready = wait;
        for (_, tx) in done {
            let _ = tx.send(Ok(()));
        }
    }

    fn maybe_compact(&mut self) -> anyhow::Result<()> {
        let store = self.node.store();
        let (applied, first) = (store.applied(), store.first_index());
        if applied >= first && applied - first + 1 >= self.cfg.compact_threshold {
            // Keep half the threshold so slightly lagging followers catch up from the log.
            let upto = applied + 1 - self.cfg.compact_threshold / 2;
            crash_point!(fp::BEFORE_COMPACT);
            self.node.mut_store().compact(upto)?;
        }
        Ok(())
    }

    fn publish_status(&self) {
        let r = &self.node.raft;
        let store = self.node.store();
        let mut s = self.status.lock().expect("status lock");
        s.role = r.state;
        s.term = r.term;
        s.leader_id = r.leader_id;
        s.commit = r.raft_log.committed;
        s.applied = store.applied();
        s.first_index = store.first_index();
        s.snapshots_installed = store.snapshots_installed();
    }
}

/// The sending side of the raft thread, shared by the gRPC services.
#[derive(Clone)]
pub struct RaftHandle {
    pub tx: Sender<Msg>,
    pub status: Arc<Mutex<RaftStatus>>,
    pub state: Arc<RwLock<ClusterState>>,
}
