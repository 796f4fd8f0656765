//! A pipelined data-protocol client: many requests in flight on one connection, each answered
//! through its own channel. Used by tests now and by the client library's `VolumeClient`.

use std::borrow::BorrowMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cairn_proto::data as pb;
use foldhash::{HashMap, HashMapExt};
use futures::{SinkExt, StreamExt};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::frame::{Frame, FrameCodec};
use super::{HELLO_MAGIC, PROTOCOL_VERSION};

/// Whether the process behind a local socket runs as root or as this process's user. Abstract
/// socket names are open to every user of the host: one who took a node's name before the node
/// started would otherwise get the I/O of the node's local clients.
fn trusted(s: &UnixStream) -> bool {
    s.peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw())
}

/// Waiting calls by request id; `None` once the connection is gone, so that a call made after
/// the reader has stopped fails at once instead of waiting for an answer that cannot come.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<(pb::Response, Bytes)>>>>>;

pub struct DataClient {
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    pub node_uuid: String,
    /// Connected over the node's Unix socket (same host), not TCP.
    pub local: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("connection closed")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl DataClient {
    /// Connects to the node advertising `addr`: over its Unix socket if it runs on this host
    /// (see [`super::local_socket_name`]), else over TCP.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        match UnixStream::connect(super::local_socket_name(addr)).await {
            Ok(stream) if trusted(&stream) => {
                let (r, w) = super::local::split(stream.into_std()?)?;
                Self::handshake(r, w, true).await
            }
            Ok(_) => {
                tracing::warn!(%addr, "the local socket of this storage node is held by a process of another user; using TCP");
                Self::connect_tcp(addr).await
            }
            // No such socket here (the usual "connection refused"): the node is elsewhere.
            Err(_) => Self::connect_tcp(addr).await,
        }
    }

    /// Connects over TCP, even to a node on this host.
    pub async fn connect_tcp(addr: &str) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Self::handshake(r, w, false).await
    }

    async fn handshake(
        r: impl AsyncRead + Unpin + Send + 'static,
        w: impl AsyncWrite + Unpin + Send + 'static,
        local: bool,
    ) -> Result<Self, ClientError> {
        let mut reader = FramedRead::new(r, FrameCodec);
        let mut writer = FramedWrite::new(w, FrameCodec);
        let hello = pb::Hello {
            magic: HELLO_MAGIC.into(),
            protocol_version: PROTOCOL_VERSION,
            auth: vec![],
            client: "cairn".into(),
        };
        writer
            .send(Frame {
                header: Bytes::from(hello.encode_to_vec()),
                payload: Bytes::new(),
            })
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let f = reader
            .next()
            .await
            .ok_or(ClientError::Closed)?
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let welcome =
            pb::Welcome::decode(f.header).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if !welcome.error.is_empty() {
            return Err(ClientError::Refused(welcome.error));
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (tx, rx) = mpsc::channel::<Frame>(1024);
        tokio::spawn(super::writer::write_frames(rx, writer.into_inner()));
        let p = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(f)) = reader.next().await {
                let Ok(r) = pb::Response::decode(f.header) else {
                    break;
                };
                let tx = p
                    .lock()
                    .expect("pending lock")
                    .as_mut()
                    .and_then(|m| m.remove(&r.request_id));
                if let Some(tx) = tx {
                    let _ = tx.send((r, f.payload));
                }
            }
            // Dropping the senders wakes every waiter with Closed; later calls see None.
            p.lock().expect("pending lock").take();
        });
        Ok(Self {
            tx,
            pending,
            next_id: AtomicU64::new(1),
            node_uuid: welcome.node_uuid,
            local,
        })
    }

    /// Sends one request (its id is assigned here) and waits for its response. The payload's
    /// CRC32C is computed here unless the caller set it (one payload sent to several members
    /// is checksummed once); 0 means not set (a payload whose CRC is 0 is just checksummed
    /// again).
    pub async fn call(
        &self,
        mut req: impl BorrowMut<pb::Request>,
        payload: Bytes,
    ) -> Result<(pb::Response, Bytes), ClientError> {
        // By `&mut` too: a caller that may send the request again keeps it, uncloned.
        let req = req.borrow_mut();
        req.request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !payload.is_empty() && req.payload_crc == 0 {
            req.payload_crc = crc32c::crc32c(&payload);
        }
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(m) => m.insert(req.request_id, tx),
            None => return Err(ClientError::Closed),
        };
        let f = Frame {
            header: Bytes::from(req.encode_to_vec()),
            payload,
        };
        self.tx.send(f).await.map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Sends raw frame bytes (tests of malformed input).
    pub async fn send_raw(&self, header: Bytes, payload: Bytes) -> Result<(), ClientError> {
        self.tx
            .send(Frame { header, payload })
            .await
            .map_err(|_| ClientError::Closed)
    }
}
