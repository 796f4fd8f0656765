//! The storage-node daemon: opens the server's disks, serves the data protocol, registers
//! with the metadata service and heartbeats to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_client::data::local_socket_name;
use cairn_client::MetaClient;
use cairn_proto::metadata as pb;
use foldhash::{HashMap, HashMapExt};

use crate::activity::Activity;
use crate::engine::disk::DiskEngine;
use crate::engine::{ChunkEngine, CHUNK_SIZE};
use crate::fence::Fence;
use crate::protocol::server::{DataServer, InProcess, ServerStats};
use crate::resync::{resync_loop, Dirty, Gates, Syncing};
use crate::scrub::{scrub_loop, ScrubConfig};

/// A disk of the node: a block device or a file (created sparse at `create_size` if missing).
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub create_size: Option<u64>,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    /// `PATH` or `PATH:SIZE` (SIZE like 10G: create the file if it does not exist).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.rsplit_once(':') {
            Some((p, size)) if !p.is_empty() => Ok(Self {
                path: p.into(),
                create_size: Some(cairn_proto::parse_size(size)?),
            }),
            _ if s.is_empty() => Err("empty disk path".into()),
            _ => Ok(Self {
                path: s.into(),
                create_size: None,
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Holds the node's identity, fencing marks and chunk indexes.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Address clients dial (default: `listen`).
    pub advertise: Option<String>,
    pub disks: Vec<DiskSpec>,
    /// Metadata members; empty: standalone (no registration), for tests and benchmarks.
    pub meta: Vec<String>,
    pub host: String,
    pub rack: String,
    pub site: String,
    pub heartbeat: Duration,
    /// How often to look for group memberships of this node to bring up to date.
    pub resync_every: Duration,
    /// Most bytes a second copied to bring memberships up to date (0: unlimited).
    pub resync_rate: u64,
    /// A disk whose requests take this long on average is reported slow (a warning)...
    pub slow_disk: Duration,
    /// ...and this long, unhealthy: its data moves to other disks.
    pub isolate_disk: Duration,
    /// With no answer from the metadata service for this long the node stops serving: it may
    /// be on the minority side of a partition, where the cluster has moved on without it.
    pub fence_after: Duration,
    pub scrub: ScrubConfig,
}

pub struct Node {
    pub addr: SocketAddr,
    /// The address clients dial.
    pub advertise: String,
    pub server: Arc<DataServer<DiskEngine>>,
    pub node_uuid: String,
    /// Set once clients of this process may call the node directly
    /// ([`Node::serve_in_process`]).
    in_process: Option<cairn_client::data::inproc::Registration>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn node_uuid(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("node-uuid");
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            // Written and synced before first use: the node's identity must not change.
            let tmp = dir.join("node-uuid.tmp");
            std::fs::write(&tmp, &id)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(id)
        }
        Err(e) => Err(e.into()),
    }
}

impl Node {
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !cfg.disks.is_empty(),
            "a storage node needs at least one disk (--disk PATH[:SIZE])"
        );
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let node_uuid = node_uuid(&cfg.data_dir)?;
        let mut disks = HashMap::new();
        let mut paths = HashMap::new();
        for d in &cfg.disks {
            if let (Some(size), false) = (d.create_size, d.path.exists()) {
                DiskEngine::create_file(&d.path, size)
                    .with_context(|| format!("creating disk file {}", d.path.display()))?;
            }
            let e = DiskEngine::open(&d.path, &cfg.data_dir.join("index")).await?;
            tracing::info!(disk = %d.path.display(), uuid = %e.uuid(), uring = e.uses_uring(), direct = e.direct_io(), "disk ready");
            paths.insert(e.uuid(), d.path.display().to_string());
            anyhow::ensure!(
                disks.insert(e.uuid(), Arc::new(e)).is_none(),
                "disk {} is listed twice",
                d.path.display()
            );
        }
        let server = Arc::new(DataServer {
            disks,
            fence: Arc::new(Fence::open(&cfg.data_dir.join("fence"))?),
            node_uuid: node_uuid.clone(),
            stats: Arc::new(ServerStats::default()),
            dirty: Arc::new(Dirty::open(&cfg.data_dir.join("dirty"))?),
            suspect: Arc::new(Dirty::open(&cfg.data_dir.join("suspect"))?),
            activity: Arc::new(Activity::open(&cfg.data_dir.join("activity"))?),
            gates: Gates::default(),
            syncing: Syncing::default(),
            // Standalone, there is no one to learn from.
            ready: AtomicBool::new(cfg.meta.is_empty()),
            latency: Default::default(),
            scrub: Default::default(),
            progress: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let advertise = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
        // Clients on this host find the node here, by the address it advertises. A failure
        // (the name held by a node of another cluster advertising the same address, say)
        // leaves them TCP.
        let local = match tokio::net::UnixListener::bind(local_socket_name(&advertise)) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, %advertise, "no Unix socket for clients on this host; they use TCP");
                None
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tasks = vec![tokio::spawn(server.clone().serve(listener, local, async {
            let _ = rx.await;
        }))];
        let advertised = advertise.clone();
        if cfg.meta.is_empty() {
            tracing::warn!("no metadata service given: running standalone, unregistered");
        } else {
            let client = MetaClient::new(&cfg.meta)?;
            let (id_tx, id_rx) = tokio::sync::watch::channel(None);
            tasks.push(tokio::spawn(heartbeat_loop(
                (client, MetaClient::new(&cfg.meta)?),
                cfg.clone(),
                node_uuid.clone(),
                advertise,
                server.clone(),
                paths,
                id_tx,
            )));
            tasks.push(tokio::spawn(resync_loop(
                MetaClient::new(&cfg.meta)?,
                server.clone(),
                id_rx.clone(),
                cfg.resync_every,
                cfg.resync_rate,
            )));
            tasks.push(tokio::spawn(scrub_loop(
                MetaClient::new(&cfg.meta)?,
                server.clone(),
                id_rx,
                cfg.scrub.clone(),
            )));
        }
        tracing::info!(%addr, uuid = %node_uuid, "storage node serving");
        Ok(Self {
            addr,
            advertise: advertised,
            server,
            node_uuid,
            in_process: None,
            shutdown: Some(tx),
            tasks,
        })
    }

    /// Lets clients of this process (frontends running inside the node) call it directly
    /// instead of over a socket ([`cairn_client::data::inproc`]). Their calls run on the
    /// current runtime, which must be the one the node was started on: its disks' rings take
    /// submissions from that runtime's threads only.
    pub fn serve_in_process(&mut self) -> anyhow::Result<()> {
        let node = Arc::new(InProcess(self.server.clone()));
        self.in_process = Some(cairn_client::data::inproc::register(&self.advertise, node)?);
        Ok(())
    }

    pub async fn shutdown(mut self) {
        // In-process clients first: from here on their calls fail as on a closed connection.
        self.in_process.take();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

/// The disks as the heartbeat reports them. A disk whose requests take longer than
/// `cfg.slow_disk` on average is reported with a warning; longer than `cfg.isolate_disk`, it is
/// reported unhealthy, and the cluster moves its data elsewhere.
fn disk_report(
    server: &DataServer<DiskEngine>,
    paths: &HashMap<String, String>,
    cfg: &NodeConfig,
) -> Vec<pb::Disk> {
    let mut out: Vec<pb::Disk> = server
        .disks
        .iter()
        .map(|(uuid, e)| {
            let st = e.stats();
            let latency_us = server.latency.ewma_us(uuid);
            let slow = Duration::from_micros(latency_us);
            if slow >= cfg.isolate_disk {
                tracing::error!(disk = %uuid, latency_ms = latency_us / 1000, "disk too slow: reporting it unhealthy");
            } else if slow >= cfg.slow_disk {
                tracing::warn!(disk = %uuid, latency_ms = latency_us / 1000, "disk slow");
            }
            pb::Disk {
                uuid: uuid.clone(),
                path: paths.get(uuid).cloned().unwrap_or_default(),
                capacity_bytes: e.capacity_bytes(),
                used_bytes: st.chunks * CHUNK_SIZE,
                healthy: !e.poisoned() && slow < cfg.isolate_disk,
                corrupt_reads: st.corrupt_reads,
                torn_blocks: st.torn_blocks,
                latency_us,
                scrub_errors: server.scrub.get(uuid).errors,
                scrub_bytes: server.scrub.get(uuid).bytes,
            }
        })
        .collect();
    out.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    out
}

/// Registers (idempotent on the node's uuid), then heartbeats; registers again if the
/// metadata service no longer knows the node. `probe` asks the members directly when the
/// heartbeats go unanswered ([`fence_when_cut_off`]).
async fn heartbeat_loop(
    (client, probe): (MetaClient, MetaClient),
    cfg: NodeConfig,
    uuid: String,
    advertise: String,
    server: Arc<DataServer<DiskEngine>>,
    paths: HashMap<String, String>,
    id_tx: tokio::sync::watch::Sender<Option<u64>>,
) {
    let mut node_id = None;
    let link = Arc::new(Link::default());
    let watchdog = tokio::spawn(fence_when_cut_off(
        probe,
        link.clone(),
        server.clone(),
        cfg.fence_after,
    ));
    let _stop_watchdog = AbortOnDrop(watchdog);
    loop {
        let disks = disk_report(&server, &paths, &cfg);
        match node_id {
            None => {
                let req = pb::RegisterNodeRequest {
                    node_uuid: uuid.clone(),
                    host: cfg.host.clone(),
                    rack: cfg.rack.clone(),
                    site: cfg.site.clone(),
                    data_addr: advertise.clone(),
                    disks,
                };
                match client
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.register_node(req).await }
                    })
                    .await
                {
                    Ok(r) => {
                        tracing::info!(node_id = r.node_id, "registered with the metadata service");
                        node_id = Some(r.node_id);
                        let _ = id_tx.send(node_id);
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "registration failed; retrying"),
                }
            }
            Some(id) => {
                let sent = Instant::now();
                let (rtt_us, failures) = link.stats();
                let resyncs: Vec<pb::ResyncProgress> = server
                    .progress
                    .snapshot()
                    .into_iter()
                    .map(|p| pb::ResyncProgress { node_id: id, ..p })
                    .collect();
                let r = client
                    .call(|mut c| {
                        let (disks, resyncs) = (disks.clone(), resyncs.clone());
                        async move {
                            c.heartbeat(pb::HeartbeatRequest {
                                node_id: id,
                                disks,
                                rtt_us,
                                failures,
                                resyncs,
                            })
                            .await
                        }
                    })
                    .await;
                link.record(sent, r.is_ok());
                match r {
                    Ok(resp) => {
                        // Fence stale writers now, not only when the new holder first writes.
                        let g: Vec<(u64, u64)> = resp
                            .generations
                            .iter()
                            .map(|v| (v.volume, v.generation))
                            .collect();
                        let e: Vec<(u64, u64)> =
                            resp.epochs.iter().map(|x| (x.group, x.epoch)).collect();
                        server.fence.learn(&g, &e);
                        // Now current: serve (the watchdog first learns it was answered).
                        link.answered();
                        if !server.ready.swap(true, Ordering::AcqRel) {
                            tracing::info!("fencing marks current; serving requests");
                        }
                    }
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        node_id = None;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        }
        tokio::time::sleep(cfg.heartbeat).await;
    }
}

/// The node's link to the metadata service, as its heartbeats see it.
#[derive(Default)]
struct Link {
    inner: std::sync::Mutex<LinkInner>,
}

#[derive(Default)]
struct LinkInner {
    rtt_us: u64,
    failures: u64,
    /// When the metadata service last answered with current fencing marks.
    answered: Option<Instant>,
}

impl Link {
    fn stats(&self) -> (u64, u64) {
        let l = self.inner.lock().expect("link lock");
        (l.rtt_us, l.failures)
    }

    fn record(&self, sent: Instant, ok: bool) {
        let mut l = self.inner.lock().expect("link lock");
        if ok {
            let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            // A moving average over about the last 8 heartbeats.
            l.rtt_us = if l.rtt_us == 0 {
                us
            } else {
                (l.rtt_us * 7 + us) / 8
            };
        } else {
            l.failures += 1;
        }
    }

    fn answered(&self) {
        self.inner.lock().expect("link lock").answered = Some(Instant::now());
    }

    fn silent_for(&self) -> Option<Duration> {
        self.inner
            .lock()
            .expect("link lock")
            .answered
            .map(|t| t.elapsed())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stops serving when, for `after`, no heartbeat was answered and no metadata member that
/// knows a leader could be reached (DESIGN.md §6, partition: the minority side stops
/// accepting writes). Cut off, the node cannot learn that clients moved its groups on
/// without it or that a volume was taken over; a write it took then could only ever reach it
/// and would have to be undone. A leader election alone does not stop it: the other members
/// still answer. The next answered heartbeat brings the marks up to date and the node serves
/// again.
async fn fence_when_cut_off(
    meta: MetaClient,
    link: Arc<Link>,
    server: Arc<DataServer<DiskEngine>>,
    after: Duration,
) {
    if after.is_zero() {
        return;
    }
    let mut reached = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(silent) = link.silent_for() else {
            continue; // not registered yet: not serving anyway
        };
        if silent < Duration::from_secs(2).min(after / 2) {
            reached = Instant::now();
            continue;
        }
        if meta.reachable(Duration::from_secs(1)).await {
            reached = Instant::now();
        }
        let cut_off = silent.min(reached.elapsed());
        if cut_off >= after && server.ready.swap(false, Ordering::AcqRel) {
            tracing::error!(
                silent_ms = silent.as_millis() as u64,
                "no answer from the metadata service: this node may be cut off from the cluster; refusing requests until it answers"
            );
        }
    }
}
