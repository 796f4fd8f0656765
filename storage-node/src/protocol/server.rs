//! The data-protocol server: accepts connections, checks the handshake, and executes requests
//! concurrently (pipelined: up to [`MAX_IN_FLIGHT`] per connection), answering each by id.
//!
//! A bad request gets an error response and the connection goes on; a frame that cannot be
//! decoded at all (no request id to answer) closes that connection only. Other connections
//! and the node are never affected.
//!
//! Clients in the node's own process (frontends run inside the node) call it through
//! [`InProcess`] instead: the same validation, fencing and execution, without a connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_proto::data as pb;
use futures::{SinkExt, StreamExt};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::request::{Command, Request};
use crate::activity::Activity;
use crate::engine::{ChunkEngine, EngineError, CHUNK_SIZE};
use crate::fence::{Fence, Fenced};
use crate::resync::{mark_blocks, Dirty, Gates, Syncing};
use cairn_client::data::frame::{Frame, FrameCodec};
use cairn_client::data::inproc::{Answer, InProcessNode};
use cairn_client::data::writer::write_frames;
use cairn_client::data::{HELLO_MAGIC, PROTOCOL_VERSION};

/// Requests executing at once on one connection; more wait (TCP backpressure).
pub const MAX_IN_FLIGHT: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters of the server, for the node's stats.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub refused: AtomicU64,
    pub fenced: AtomicU64,
    pub protocol_errors: AtomicU64,
}

/// Each disk's request service time: a moving average (each request weighs 1/20), so a disk
/// that turns slow shows within a few dozen requests. A disk without a request for
/// [`LATENCY_IDLE`] has nothing to say (an isolated disk is eligible again once it is).
#[derive(Default)]
pub struct Latency {
    ewma_us: std::sync::Mutex<foldhash::HashMap<String, (f64, std::time::Instant)>>,
}

pub const LATENCY_IDLE: Duration = Duration::from_secs(30);

impl Latency {
    pub fn record(&self, disk: &str, took: Duration) {
        let us = took.as_secs_f64() * 1e6;
        let now = std::time::Instant::now();
        let mut m = self.ewma_us.lock().expect("latency lock");
        // Looked up before inserting: the disk's name is copied once, not on every request.
        match m.get_mut(disk) {
            Some(e) => {
                e.0 += (us - e.0) / 20.0;
                e.1 = now;
            }
            None => {
                m.insert(disk.to_owned(), (us, now));
            }
        }
    }

    pub fn ewma_us(&self, disk: &str) -> u64 {
        self.ewma_us
            .lock()
            .expect("latency lock")
            .get(disk)
            .filter(|(_, at)| at.elapsed() < LATENCY_IDLE)
            .map_or(0, |(e, _)| *e as u64)
    }
}

/// Serves the chunks of a node's disks.
pub struct DataServer<E> {
    /// The node's disks by uuid.
    pub disks: foldhash::HashMap<String, Arc<E>>,
    pub fence: Arc<Fence>,
    pub node_uuid: String,
    pub stats: Arc<ServerStats>,
    /// Chunks written while their group was degraded.
    pub dirty: Arc<Dirty>,
    /// Blocks of this node's own copies that the scrub found bad, per group: copied by this
    /// node's next resync. Kept apart from `dirty`, which other members' resyncs read and
    /// clear, so neither copies from a bad copy nor forgets one.
    pub suspect: Arc<Dirty>,
    /// Chunks with writes that may not have reached every member.
    pub activity: Arc<Activity>,
    pub gates: Gates,
    pub syncing: Syncing,
    /// Each disk's request service time.
    pub latency: Latency,
    /// What the background scrub checked and found, per disk.
    pub scrub: crate::scrub::Stats,
    /// The resyncs running here.
    pub progress: crate::resync::Progress,
    /// False until the node has learned the current generations and epochs from the
    /// metadata service: a node back from a crash must not take a write from a client the
    /// cluster has since fenced or moved past.
    pub ready: AtomicBool,
}

fn response(id: u64, status: pb::Status, message: String) -> pb::Response {
    pb::Response {
        request_id: id,
        status: status as i32,
        message,
        ..Default::default()
    }
}

fn frame(r: &pb::Response, payload: Bytes) -> Frame {
    Frame {
        header: Bytes::from(r.encode_to_vec()),
        payload,
    }
}

impl<E: ChunkEngine> DataServer<E> {
    /// The engine of a disk, by uuid.
    pub fn disk(&self, uuid: &str) -> Option<&Arc<E>> {
        self.disks.get(uuid)
    }

    /// Serves `listener`, and `local` (this node's Unix socket for clients on its host, see
    /// [`cairn_client::data::local_socket_name`]) if given, until `shutdown` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        local: Option<UnixListener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let local_accept = async |l: &Option<UnixListener>| match l {
            Some(l) => l.accept().await,
            None => std::future::pending().await,
        };
        loop {
            let failed = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = cairn_client::data::tcp_session(&stream) {
                            tracing::debug!(%peer, error = %e, "data connection closed");
                            continue;
                        }
                        let (r, w) = stream.into_split();
                        self.clone().spawn_connection(r, w, peer.to_string());
                        continue;
                    }
                    Err(e) => e,
                },
                accepted = local_accept(&local) => match accepted {
                    Ok((stream, _)) => {
                        match stream.into_std().and_then(cairn_client::data::local::split) {
                            Ok((r, w)) => {
                                self.clone().spawn_connection(r, w, "this host".to_owned())
                            }
                            Err(e) => tracing::debug!(error = %e, "local data connection closed"),
                        }
                        continue;
                    }
                    Err(e) => e,
                },
            };
            // Out of file descriptors and the like: wait, do not spin.
            tracing::warn!(error = %failed, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn spawn_connection(
        self: Arc<Self>,
        r: impl AsyncRead + Unpin + Send + 'static,
        w: impl AsyncWrite + Unpin + Send + 'static,
        peer: String,
    ) {
        tokio::spawn(async move {
            if let Err(e) = self.connection(r, w).await {
                tracing::debug!(%peer, error = %e, "data connection closed");
            }
        });
    }

    async fn connection(
        self: Arc<Self>,
        r: impl AsyncRead + Unpin + Send + 'static,
        w: impl AsyncWrite + Unpin + Send + 'static,
    ) -> anyhow::Result<()> {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let mut reader = FramedRead::new(r, FrameCodec);
        let mut writer = FramedWrite::new(w, FrameCodec);

        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await;
        let hello = match first {
            Ok(Some(Ok(f))) => pb::Hello::decode(f.header).ok(),
            _ => None,
        };
        let refusal = match &hello {
            None => Some("expected a Hello frame".to_owned()),
            Some(h) if h.magic != HELLO_MAGIC => Some(format!("bad magic {:?}", h.magic)),
            Some(h) if h.protocol_version != PROTOCOL_VERSION => Some(format!(
                "protocol version {} unsupported (this node speaks {PROTOCOL_VERSION})",
                h.protocol_version
            )),
            Some(_) => None,
        };
        let welcome = pb::Welcome {
            protocol_version: PROTOCOL_VERSION,
            node_uuid: self.node_uuid.clone(),
            error: refusal.clone().unwrap_or_default(),
        };
        writer
            .send(Frame {
                header: Bytes::from(welcome.encode_to_vec()),
                payload: Bytes::new(),
            })
            .await?;
        if let Some(why) = refusal {
            self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            anyhow::bail!("handshake refused: {why}");
        }

        let (tx, rx) = mpsc::channel::<Frame>(MAX_IN_FLIGHT);
        let write_task = tokio::spawn(write_frames(rx, writer.into_inner()));
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let result = loop {
            let f = match reader.next().await {
                None => break Ok(()),
                Some(Err(e)) => {
                    self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    break Err(anyhow::anyhow!("bad frame: {e}"));
                }
                Some(Ok(f)) => f,
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let req = match Request::parse(&f.header, f.payload) {
                Ok(r) => r,
                Err(refusal) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    match refusal.id {
                        Some(id) => {
                            let r = response(id, refusal.status, refusal.message);
                            if tx.send(frame(&r, Bytes::new())).await.is_err() {
                                break Ok(());
                            }
                            continue;
                        }
                        None => {
                            self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                            break Err(anyhow::anyhow!("{}", refusal.message));
                        }
                    }
                }
            };
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let (s, tx) = (self.clone(), tx.clone());
            tokio::spawn(async move {
                let (r, payload) = s.execute(req).await;
                let _ = tx.send(frame(&r, payload)).await;
                drop(permit);
            });
        };
        drop(tx);
        let _ = write_task.await;
        result
    }

    /// Answers a request of a client in this process: validated as one off a connection would
    /// be (its id is always known, so a refusal is always answered).
    async fn answer(&self, h: pb::Request, payload: Bytes) -> Answer {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let id = h.request_id;
        match Request::validate(h, payload) {
            Ok(req) => self.execute(req).await,
            Err(refusal) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let r = response(refusal.id.unwrap_or(id), refusal.status, refusal.message);
                (r, Bytes::new())
            }
        }
    }

    async fn execute(&self, req: Request) -> (pb::Response, Bytes) {
        let id = req.id;
        let fail = |status, msg: String| (response(id, status, msg), Bytes::new());
        if !self.ready.load(Ordering::Acquire) {
            return fail(
                pb::Status::Unavailable,
                "this node has no current word from the metadata service (starting, or cut off)"
                    .into(),
            );
        }
        // Mutating requests hold their group's gate while they run (a barrier waits for them);
        // taken before the fencing check, so a request admitted under an old epoch is one the
        // barrier waits for.
        let gate =
            (req.cmd.mutates() || req.cmd == Command::Barrier).then(|| self.gates.get(req.group));
        let _running = match (&gate, &req.cmd) {
            (Some(g), c) if c.mutates() => Some(g.clone().read_owned().await),
            _ => None,
        };
        if let Err(f) = self
            .fence
            .admit(req.chunk.volume, req.generation, req.group, req.epoch)
        {
            if req.cmd.mutates() || req.generation != 0 || req.epoch != 0 {
                self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                let status = match f {
                    Fenced::Generation { .. } => pb::Status::Fenced,
                    Fenced::Epoch { .. } => pb::Status::StaleEpoch,
                };
                return fail(status, f.to_string());
            }
        }
        if req.cmd.mutates() {
            if let Err(e) = self
                .activity
                .mark(req.chunk.volume, req.chunk.index, req.seq)
                .await
            {
                tracing::error!(error = %e, "cannot record a write's activity; refusing it");
                return fail(pb::Status::Unavailable, format!("activity record: {e}"));
            }
            let (offset, len) = match &req.cmd {
                Command::Write { offset, data, .. } => (*offset, data.len() as u64),
                Command::Discard { offset, len } | Command::WriteZeroes { offset, len } => {
                    (*offset, *len)
                }
                _ => (0, 0),
            };
            if req.degraded {
                if let Err(e) = self.dirty.mark(req.group, req.chunk, offset, len).await {
                    tracing::error!(error = %e, "cannot record a degraded write; refusing it");
                    return fail(pb::Status::Unavailable, format!("dirty record: {e}"));
                }
            }
            if let Some(marks) = self.syncing.marks(req.group, req.chunk) {
                mark_blocks(&mut *marks.lock().await, offset, len);
            }
        }
        let (uuid, e) = match (req.disk.as_str(), self.disks.len()) {
            ("", 1) => self.disks.iter().next().expect("one disk"),
            (d, _) => match self.disks.get_key_value(d) {
                Some(x) => x,
                None => {
                    let msg = format!("disk {d:?} is not on this node");
                    return fail(pb::Status::Invalid, msg);
                }
            },
        };
        match req.cmd {
            Command::Barrier => {
                // Every request admitted under an older epoch holds the gate; wait them out.
                drop(gate.expect("barrier has a gate").write_owned().await);
                return (response(id, pb::Status::Ok, String::new()), Bytes::new());
            }
            Command::DirtyList => {
                let mut out = Vec::new();
                for (v, c, blocks) in self.dirty.list(req.group) {
                    out.extend_from_slice(&v.to_le_bytes());
                    out.extend_from_slice(&c.to_le_bytes());
                    for w in blocks {
                        out.extend_from_slice(&w.to_le_bytes());
                    }
                }
                let out = Bytes::from(out);
                let mut r = response(id, pb::Status::Ok, String::new());
                r.payload_crc = crc32c::crc32c(&out);
                return (r, out);
            }
            Command::ActivityList => {
                let mut out = Vec::new();
                for c in self.activity.list(req.chunk.volume) {
                    out.extend_from_slice(&c.to_le_bytes());
                }
                let out = Bytes::from(out);
                let mut r = response(id, pb::Status::Ok, String::new());
                r.payload_crc = crc32c::crc32c(&out);
                return (r, out);
            }
            Command::Settle(chunks) => {
                return match self.activity.settle(req.chunk.volume, &chunks) {
                    Ok(()) => (response(id, pb::Status::Ok, String::new()), Bytes::new()),
                    Err(e) => fail(pb::Status::IoError, format!("{e}")),
                };
            }
            Command::ClearDirty => {
                return match self.dirty.clear(req.group) {
                    Ok(()) => (response(id, pb::Status::Ok, String::new()), Bytes::new()),
                    Err(e) => fail(pb::Status::IoError, format!("{e}")),
                };
            }
            _ => {}
        }
        let started = std::time::Instant::now();
        let data_op = matches!(
            req.cmd,
            Command::Read { .. }
                | Command::Write { .. }
                | Command::Discard { .. }
                | Command::WriteZeroes { .. }
        );
        // The answer's payload checksum, where the engine gave it (else computed below).
        let mut known_crc = None;
        let result = match req.cmd {
            // The payload's checksum comes with it: for a lone block, the one it was just
            // checked against.
            Command::Read { offset, len } => {
                e.read_checked(req.chunk, offset, len)
                    .await
                    .map(|(d, crc)| {
                        known_crc = Some(crc);
                        (None, d)
                    })
            }
            Command::Write { offset, data, crc } => e
                .write_checked(req.chunk, offset, data, crc)
                .await
                .map(|()| (None, Bytes::new())),
            Command::Flush => e.flush().await.map(|()| (None, Bytes::new())),
            Command::Discard { offset, len } => e
                .discard(req.chunk, offset, len)
                .await
                .map(|()| (None, Bytes::new())),
            Command::WriteZeroes { offset, len } => e
                .write_zeroes(req.chunk, offset, len)
                .await
                .map(|()| (None, Bytes::new())),
            Command::ChunkInfo => e
                .chunk_info(req.chunk)
                .map(|i| (Some(i.map(|i| i.mapped).unwrap_or_default()), Bytes::new())),
            Command::BlockCrcs => e.chunk_info(req.chunk).map(|i| match i {
                None => (Some(vec![]), Bytes::new()),
                Some(i) => {
                    let crcs: Vec<u8> = i.crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
                    (Some(i.mapped), Bytes::from(crcs))
                }
            }),
            Command::ChunkCopy => match e.chunk_info(req.chunk) {
                Ok(None) => Ok((Some(vec![]), Bytes::new())),
                Ok(Some(info)) => e
                    .read(req.chunk, 0, CHUNK_SIZE)
                    .await
                    .map(|d| (Some(info.mapped), d)),
                Err(err) => Err(err),
            },
            Command::Barrier
            | Command::DirtyList
            | Command::ClearDirty
            | Command::ActivityList
            | Command::Settle(_) => unreachable!("answered above"),
        };
        if data_op {
            self.latency.record(uuid, started.elapsed());
        }
        match result {
            Ok((mapped, payload)) => {
                let r = pb::Response {
                    request_id: id,
                    status: pb::Status::Ok as i32,
                    payload_crc: match known_crc {
                        _ if payload.is_empty() => 0,
                        Some(c) => c,
                        None => crc32c::crc32c(&payload),
                    },
                    mapped: mapped.unwrap_or_default(),
                    ..Default::default()
                };
                (r, payload)
            }
            Err(err) => {
                let (status, block) = match &err {
                    EngineError::InvalidRequest(_) => (pb::Status::Invalid, 0),
                    EngineError::Corrupt { block, .. } => (pb::Status::Corrupt, *block as u64),
                    EngineError::Torn { block, .. } => (pb::Status::Torn, *block as u64),
                    EngineError::NoSpace => (pb::Status::NoSpace, 0),
                    EngineError::Io(_) => (pb::Status::IoError, 0),
                    EngineError::Index(_) | EngineError::Poisoned => (pb::Status::Unavailable, 0),
                };
                let mut r = response(id, status, format!("{err}"));
                r.block = block;
                (r, Bytes::new())
            }
        }
    }
}

/// A node's server as clients of its own process reach it (registered with
/// [`cairn_client::data::inproc::register`] under the address the node advertises).
pub struct InProcess<E>(pub Arc<DataServer<E>>);

impl<E: ChunkEngine> InProcessNode for InProcess<E> {
    fn call(
        &self,
        req: pb::Request,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send>> {
        let server = self.0.clone();
        Box::pin(async move { server.answer(req, payload).await })
    }

    fn node_uuid(&self) -> &str {
        &self.0.node_uuid
    }
}
