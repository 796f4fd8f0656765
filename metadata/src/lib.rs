//! Cairn's metadata service: the cluster's source of truth.
//!
//! A raft-rs replicated state machine on RocksDB, served over gRPC. It knows the metadata
//! members, storage nodes and their disks, pools, volumes, the segment → placement-group map,
//! and the attach leases with their generations.
//!
//! Modules:
//! - [`config`]: the member's configuration (TOML or flags), validated once.
//! - [`store`]: RocksDB persistence of the raft log, hard state, conf state, snapshots and the
//!   state machine's records; implements `raft::Storage`.
//! - [`state`]: the deterministic state machine — records, commands, `apply`.
//! - [`placement`]: pure choice of a placement group's disks across failure domains.
//! - [`membership`]: a group's members leaving (a failed write), catching up and rejoining,
//!   each step raising the group's epoch.
//! - [`replace`]: a storage node silent past the grace period is gone for good: the leader
//!   moves its memberships to disks on other hosts.
//! - [`node`]: the raft loop thread (proposals, ReadIndex reads, `Ready` handling).
//! - [`transport`]: member-to-member raft messages over gRPC.
//! - [`service`]: the `Metadata` gRPC API.
//! - [`error`]: errors and their gRPC mapping; [`failpoints`]: failpoint names.
//!
//! Every TCP connection a member accepts or makes has keepalive probes
//! ([`cairn_proto::keepalive`]: 30 s of silence, 3 probes 10 s apart), as on the data path: a
//! peer whose host died is dropped within a minute.
//!
//! Contract (DESIGN.md §5.6): a change is acknowledged only once it is committed (persisted on a
//! majority) and applied on the leader; reads are linearizable (ReadIndex). An acknowledged
//! change survives the loss of a minority of members and a restart of all of them.

pub mod config;
pub mod error;
pub mod failpoints;
mod logger;
pub mod membership;
pub mod node;
pub mod placement;
pub mod replace;
pub mod service;
pub mod state;
pub mod store;
pub mod transport;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use cairn_proto::metadata::metadata_server::MetadataServer;
use cairn_proto::metadata::raft_transport_server::RaftTransportServer;
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;

pub use config::{MetaConfig, MetaConfigFile};
pub use error::MetaError;

use node::{LoopConfig, Msg, RaftHandle, RaftLoop, RaftStatus};
use store::RaftStore;
use transport::{Transport, TransportService};

/// Largest API request accepted.
const MAX_API_MESSAGE: usize = 64 << 20;

/// Keepalive of the members' TCP connections (API clients, and member to member), as on the
/// data path.
fn keepalive() -> socket2::TcpKeepalive {
    use cairn_proto::keepalive::{IDLE, INTERVAL, PROBES};
    socket2::TcpKeepalive::new()
        .with_time(IDLE)
        .with_interval(INTERVAL)
        .with_retries(PROBES)
}

/// A running metadata member.
pub struct Server {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    serve: tokio::task::JoinHandle<anyhow::Result<()>>,
    raft_tx: std::sync::mpsc::Sender<Msg>,
    raft_thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    status: Arc<Mutex<RaftStatus>>,
}

impl Server {
    /// Opens the store, starts the raft thread and serves the API on `cfg.listen`. Returns once
    /// the listener is bound.
    pub async fn start(cfg: MetaConfig) -> anyhow::Result<Self> {
        let mut store = RaftStore::open(&cfg.data_dir.join("raft"))?;
        if store.is_fresh() && !cfg.join {
            let voters: Vec<(u64, String)> =
                cfg.peers.iter().map(|(k, v)| (*k, v.clone())).collect();
            store
                .bootstrap(&voters)
                .context("bootstrapping the metadata store")?;
            tracing::info!(members = ?voters, "bootstrapped a new metadata cluster");
        }
        let single = store.conf_state().voters == [cfg.id];
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: store.applied(),
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate().context("raft configuration")?;
        let state = store.state();
        let mut node = RawNode::new(&raft_cfg, store, &logger::raft_logger(cfg.id))?;
        if single {
            // A one-member cluster need not wait an election timeout.
            node.campaign()?;
        }
        let status = Arc::new(Mutex::new(RaftStatus {
            id: cfg.id,
            role: StateRole::Follower,
            term: 0,
            leader_id: 0,
            commit: 0,
            applied: node.store().applied(),
            first_index: node.store().first_index(),
            snapshots_installed: node.store().snapshots_installed(),
            poisoned: None,
        }));
        let (raft_tx, raft_rx) = std::sync::mpsc::channel();
        let transport = Transport::new(
            cfg.id,
            tokio::runtime::Handle::current(),
            state.clone(),
            cfg.peers.clone(),
            raft_tx.clone(),
        );
        let lp = RaftLoop::new(
            node,
            raft_rx,
            transport,
            status.clone(),
            LoopConfig {
                tick: cfg.tick,
                compact_threshold: cfg.compact_threshold,
            },
        );
        let raft_thread = std::thread::Builder::new()
            .name(format!("raft-{}", cfg.id))
            .spawn({
                let status = status.clone();
                move || {
                    // A panic in raft-rs (a broken invariant) poisons the member like a storage
                    // failure does, so the process exits instead of serving stale answers.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lp.run()));
                    r.unwrap_or_else(|_| {
                        let e = anyhow::anyhow!("raft loop panicked");
                        status.lock().expect("status lock").poisoned = Some(e.to_string());
                        Err(e)
                    })
                }
            })?;

        let handle = RaftHandle {
            tx: raft_tx.clone(),
            status: status.clone(),
            state,
        };
        let api = Arc::new(service::MetaService::new(
            handle,
            cfg.lease_ttl,
            cfg.node_down_after,
        ));
        // Ends with the raft loop (a poisoned or stopped member).
        tokio::spawn(replace::replace_loop(api.clone(), cfg.replace_after));
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(MetadataServer::from_arc(api).max_decoding_message_size(MAX_API_MESSAGE))
            .add_service(
                RaftTransportServer::new(TransportService {
                    raft: raft_tx.clone(),
                })
                .max_decoding_message_size(transport::MAX_RAFT_RPC),
            );
        let serve = tokio::spawn(async move {
            // Without TCP_NODELAY, replies written in pieces wait on the peer's delayed ACK
            // (~40 ms) whenever several requests are in flight on one connection. Keepalive:
            // a client whose host lost power sends no FIN, and its connection would stay open
            // here for good.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |s| {
                    if let Ok(s) = &s {
                        let _ = s.set_nodelay(true);
                        let _ = socket2::SockRef::from(s).set_tcp_keepalive(&keepalive());
                    }
                    s
                },
            );
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                })
                .await
                .context("gRPC server")
        });
        tracing::info!(id = cfg.id, %addr, "metadata member serving");
        Ok(Self {
            addr,
            shutdown: Some(shutdown),
            serve,
            raft_tx,
            raft_thread: Some(raft_thread),
            status,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The member's raft status as of the last loop pass.
    pub fn status(&self) -> RaftStatus {
        self.status.lock().expect("status lock").clone()
    }

    /// Serves until `signal` completes or the raft loop stops on a storage failure, then shuts
    /// down cleanly.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let status = self.status.clone();
        let poisoned = async move {
            loop {
                if let Some(e) = status.lock().expect("status lock").poisoned.clone() {
                    return e;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let r = tokio::select! {
            _ = signal => Ok(()),
            e = poisoned => Err(anyhow::anyhow!("metadata store failed: {e}")),
        };
        self.shutdown().await?;
        r
    }

    /// Stops serving, stops the raft thread, and waits for both.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        let _ = self.raft_tx.send(Msg::Shutdown);
        if let Some(t) = self.raft_thread.take() {
            let joined = tokio::task::spawn_blocking(move || t.join()).await?;
            match joined {
                Ok(r) => r?,
                Err(_) => anyhow::bail!("raft thread panicked"),
            }
        }
        (&mut self.serve).await??;
        Ok(())
    }
}
