//! Member-to-member raft traffic over gRPC: one sender task per peer, batching whatever queued
//! up, and the receiving service that hands messages to the raft thread.
//!
//! Raft tolerates lost messages, so the transport never blocks the raft thread: a full queue or
//! a failed send drops the messages and reports the peer unreachable (raft then probes it
//! gently instead of streaming appends into the void).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cairn_proto::metadata::raft_transport_client::RaftTransportClient;
use cairn_proto::metadata::raft_transport_server::RaftTransport;
use cairn_proto::metadata::{RaftAck, RaftBatch};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::node::Msg;
use crate::state::ClusterState;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Largest number of messages in one RPC.
const MAX_BATCH: usize = 256;
/// Largest raft RPC accepted (snapshots of a large cluster's metadata).
pub const MAX_RAFT_RPC: usize = 512 << 20;

#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    rt: tokio::runtime::Handle,
    state: Arc<RwLock<ClusterState>>,
    /// Addresses from the configuration, used until the state machine knows the member.
    initial: BTreeMap<u64, String>,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    back: Sender<Msg>,
}

impl Transport {
    pub fn new(
        id: u64,
        rt: tokio::runtime::Handle,
        state: Arc<RwLock<ClusterState>>,
        initial: BTreeMap<u64, String>,
        back: Sender<Msg>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                rt,
                state,
                initial,
                peers: Mutex::default(),
                back,
            }),
        }
    }

    /// Queues messages to their peers; never blocks.
    pub fn send(&self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let mut peers = self.inner.peers.lock().expect("peers lock");
        for m in msgs {
            let to = m.to;
            let tx = peers.entry(to).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                self.inner.rt.spawn(peer_loop(self.inner.clone(), to, rx));
                tx
            });
            if tx.try_send(m).is_err() {
                let _ = self.inner.back.send(Msg::Unreachable(to));
            }
        }
    }
}

impl Inner {
    fn addr_of(&self, id: u64) -> Option<String> {
        let st = self.state.read().expect("state lock");
        st.members
            .get(&id)
            .or_else(|| self.initial.get(&id))
            .cloned()
    }
}

async fn peer_loop(inner: Arc<Inner>, to: u64, mut rx: mpsc::Receiver<Message>) {
    let mut client: Option<(String, RaftTransportClient<Channel>)> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshots = batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .count();
        let ok = match inner.addr_of(to) {
            None => false,
            Some(addr) => {
                if client.as_ref().is_none_or(|(a, _)| *a != addr) {
                    client = Endpoint::from_shared(format!("http://{addr}"))
                        .ok()
                        .map(|e| {
                            e.connect_timeout(Duration::from_millis(500))
                                .tcp_nodelay(true)
                                .tcp_keepalive(Some(cairn_proto::keepalive::IDLE))
                                .tcp_keepalive_interval(Some(cairn_proto::keepalive::INTERVAL))
                                .tcp_keepalive_retries(Some(cairn_proto::keepalive::PROBES))
                                .connect_lazy()
                        })
                        .map(|ch| {
                            (
                                addr.clone(),
                                RaftTransportClient::new(ch)
                                    .max_encoding_message_size(MAX_RAFT_RPC),
                            )
                        });
                }
                match client.as_mut() {
                    None => false,
                    Some((_, c)) => {
                        let req = RaftBatch {
                            from: inner.id,
                            messages: batch
                                .iter()
                                .filter_map(|m| m.write_to_bytes().ok())
                                .collect(),
                        };
                        let timeout = if snapshots > 0 { 30 } else { 3 };
                        matches!(
                            tokio::time::timeout(Duration::from_secs(timeout), c.send(req)).await,
                            Ok(Ok(_))
                        )
                    }
                }
            }
        };
        for _ in 0..snapshots {
            let s = if ok {
                SnapshotStatus::Finish
            } else {
                SnapshotStatus::Failure
            };
            let _ = inner.back.send(Msg::SnapshotStatus(to, s));
        }
        if !ok {
            // A fresh channel next time: a peer that was killed and restarted on the same
            // address must not wait on a connection the old process left behind.
            client = None;
            let _ = inner.back.send(Msg::Unreachable(to));
            // Drop what queued up behind the failure; raft resends what matters.
            while rx.try_recv().is_ok() {}
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The receiving side: decodes messages and hands them to the raft thread.
pub struct TransportService {
    pub raft: Sender<Msg>,
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn send(
        &self,
        req: tonic::Request<RaftBatch>,
    ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        let batch = req.into_inner();
        let mut msgs = Vec::with_capacity(batch.messages.len());
        for b in batch.messages {
            msgs.push(Message::parse_from_bytes(&b).map_err(|e| {
                tonic::Status::invalid_argument(format!("undecodable raft message: {e}"))
            })?);
        }
        self.raft
            .send(Msg::Raft(msgs))
            .map_err(|_| tonic::Status::unavailable("member is shutting down"))?;
        Ok(tonic::Response::new(RaftAck {}))
    }
}
