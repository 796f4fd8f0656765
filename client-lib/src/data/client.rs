//! A pipelined data-protocol client: many requests in flight on one connection, each answered
//! through its own channel. Used by tests now and by the client library's `VolumeClient`.
//!
//! A node registered in this very process ([`super::inproc`]) is called directly instead: each
//! request is spawned on the node's runtime and answered through the same channel, with the
//! same time limits, as if it had come back over a connection.
//!
//! A call may be given a time limit ([`DataClient::call_within`]). The limits are kept by one
//! watchdog task per connection, which counts ticks of [`WATCH_EVERY`] and fails each call
//! whose limit has passed, instead of a timer armed and cancelled for every call: that was a
//! timer-wheel entry and two clock reads per member per write, on the busiest path there is.
//! The watchdog sleeps while no call with a limit is waiting (a gateway with many volumes
//! has a connection per volume and node, most of them idle), and the next such call wakes it.

use std::borrow::BorrowMut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_proto::data as pb;
use foldhash::HashMap;
use futures::{SinkExt, StreamExt};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::frame::{Frame, FrameCodec};
use super::inproc::{self, Answer as NodeAnswer, Found};
use super::{HELLO_MAGIC, PROTOCOL_VERSION};

/// Whether the process behind a local socket runs as root or as this process's user. Abstract
/// socket names are open to every user of the host: one who took a node's name before the node
/// started would otherwise get the I/O of the node's local clients.
fn trusted(s: &UnixStream) -> bool {
    s.peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw())
}

/// How often a connection's watchdog looks for calls past their limit: a call given `limit`
/// fails after between `limit` and `limit + WATCH_EVERY` without an answer.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

type Answer = Result<(pb::Response, Bytes), ClientError>;

/// A call waiting for its answer, until the watchdog's tick `deadline` at the latest.
struct Waiting {
    tx: oneshot::Sender<Answer>,
    deadline: u64,
}

/// The calls of one connection, `None` once the connection is gone, so that a call made after
/// the reader has stopped fails at once instead of waiting for an answer that cannot come.
type Pending = Arc<Mutex<Option<Calls>>>;

#[derive(Default)]
struct Calls {
    /// Waiting calls by request id.
    waiting: HashMap<u64, Waiting>,
    /// The watchdog found no call with a limit at its last tick and waits for `Watch::wake`.
    /// Set and cleared under the lock that guards `waiting`, so a limited call inserted after
    /// the watchdog looked always sees it and wakes it.
    watchdog_asleep: bool,
}

/// What a connection shares with its watchdog.
#[derive(Default)]
struct Watch {
    /// The watchdog's ticks so far; they do not advance while it sleeps.
    ticks: AtomicU64,
    /// Wakes a sleeping watchdog: a limited call was made, or the connection is gone.
    wake: Notify,
    /// The client was dropped or the connection ended: the watchdog stops.
    closed: AtomicBool,
}

impl Watch {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// How requests reach the node.
enum Via {
    /// Frames to a connection's writer task; the reader task answers them.
    Socket(mpsc::Sender<Frame>),
    /// A node of this process: each request runs as a task on its runtime.
    InProcess(Found),
}

pub struct DataClient {
    via: Via,
    pending: Pending,
    watch: Arc<Watch>,
    next_id: AtomicU64,
    pub node_uuid: String,
    /// Connected over the node's Unix socket (same host), not TCP.
    pub local: bool,
    /// The node runs in this process and is called directly ([`super::inproc`]).
    pub in_process: bool,
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
    #[error("no answer within the call's time limit")]
    TimedOut,
}

impl DataClient {
    /// Connects to the node advertising `addr`: directly if it runs in this process (see
    /// [`super::inproc`]), over its Unix socket if it runs on this host (see
    /// [`super::local_socket_name`]), else over TCP.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        if let Some(found) = inproc::find(addr) {
            return Self::in_process(found);
        }
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
        super::tcp_session(&stream)?;
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
        let pending: Pending = Arc::new(Mutex::new(Some(Calls::default())));
        let watch = Arc::new(Watch::default());
        let (tx, rx) = mpsc::channel::<Frame>(1024);
        tokio::spawn(super::writer::write_frames(rx, writer.into_inner()));
        let (p, w) = (pending.clone(), watch.clone());
        tokio::spawn(async move {
            while let Some(Ok(f)) = reader.next().await {
                let Ok(r) = pb::Response::decode(f.header) else {
                    break;
                };
                let tx = p
                    .lock()
                    .expect("pending lock")
                    .as_mut()
                    .and_then(|c| c.waiting.remove(&r.request_id));
                if let Some(w) = tx {
                    let _ = w.tx.send(Ok((r, f.payload)));
                }
            }
            // Dropping the senders wakes every waiter with Closed; later calls see None.
            p.lock().expect("pending lock").take();
            w.close();
        });
        tokio::spawn(watchdog(pending.clone(), watch.clone()));
        Ok(Self {
            via: Via::Socket(tx),
            pending,
            watch,
            next_id: AtomicU64::new(1),
            node_uuid: welcome.node_uuid,
            local,
            in_process: false,
        })
    }

    /// A client of a node of this process: no connection, no handshake (the node speaks this
    /// build's protocol by construction).
    fn in_process(found: Found) -> Result<Self, ClientError> {
        let node_uuid = found
            .node
            .upgrade()
            .ok_or(ClientError::Closed)?
            .node_uuid()
            .to_owned();
        let pending: Pending = Arc::new(Mutex::new(Some(Calls::default())));
        let watch = Arc::new(Watch::default());
        tokio::spawn(watchdog(pending.clone(), watch.clone()));
        Ok(Self {
            via: Via::InProcess(found),
            pending,
            watch,
            next_id: AtomicU64::new(1),
            node_uuid,
            local: false,
            in_process: true,
        })
    }

    /// Sends one request (its id is assigned here) and waits for its response. The payload's
    /// CRC32C is computed here unless the caller set it (one payload sent to several members
    /// is checksummed once); 0 means not set (a payload whose CRC is 0 is just checksummed
    /// again).
    pub async fn call(
        &self,
        req: impl BorrowMut<pb::Request>,
        payload: Bytes,
    ) -> Result<(pb::Response, Bytes), ClientError> {
        self.send(req, payload, u64::MAX).await
    }

    /// [`DataClient::call`], failing with [`ClientError::TimedOut`] if no answer has come
    /// within `limit` (up to [`WATCH_EVERY`] later). The connection stays usable: a late
    /// answer is dropped.
    pub async fn call_within(
        &self,
        req: impl BorrowMut<pb::Request>,
        payload: Bytes,
        limit: Duration,
    ) -> Result<(pb::Response, Bytes), ClientError> {
        // The tick count goes up at most WATCH_EVERY from now, then every WATCH_EVERY: a call
        // is failed at the first tick at least `limit` after it was made.
        let wait =
            u64::try_from(limit.as_nanos().div_ceil(WATCH_EVERY.as_nanos())).unwrap_or(u64::MAX);
        let deadline = self
            .watch
            .ticks
            .load(Ordering::Relaxed)
            .saturating_add(wait)
            .saturating_add(1);
        self.send(req, payload, deadline).await
    }

    async fn send(
        &self,
        mut req: impl BorrowMut<pb::Request>,
        payload: Bytes,
        deadline: u64,
    ) -> Result<(pb::Response, Bytes), ClientError> {
        // By `&mut` too: a caller that may send the request again keeps it, uncloned.
        let req = req.borrow_mut();
        req.request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !payload.is_empty() && req.payload_crc == 0 {
            req.payload_crc = crc32c::crc32c(&payload);
        }
        let (tx, rx) = oneshot::channel();
        let wake = match self.pending.lock().expect("pending lock").as_mut() {
            Some(c) => {
                c.waiting.insert(req.request_id, Waiting { tx, deadline });
                deadline != u64::MAX && std::mem::take(&mut c.watchdog_asleep)
            }
            None => return Err(ClientError::Closed),
        };
        if wake {
            self.watch.wake.notify_one();
        }
        match &self.via {
            Via::Socket(tx) => {
                let f = Frame {
                    header: Bytes::from(req.encode_to_vec()),
                    payload,
                };
                tx.send(f).await.map_err(|_| ClientError::Closed)?;
            }
            Via::InProcess(found) => {
                let reply = Reply {
                    pending: self.pending.clone(),
                    id: req.request_id,
                };
                // Unregistered (the node is stopping): the reply's drop fails the call.
                let node = found.node.upgrade().ok_or(ClientError::Closed)?;
                // Its own task, as a request off a connection is: the call may be given up
                // (its limit passed, its caller dropped) while the write it started goes on,
                // never cut off half-way.
                let work = node.call(req.clone(), payload);
                found.runtime.spawn(async move { reply.send(work.await) });
            }
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Sends raw frame bytes (tests of malformed input).
    pub async fn send_raw(&self, header: Bytes, payload: Bytes) -> Result<(), ClientError> {
        match &self.via {
            Via::Socket(tx) => tx
                .send(Frame { header, payload })
                .await
                .map_err(|_| ClientError::Closed),
            Via::InProcess(_) => Err(ClientError::Protocol(
                "an in-process node takes no raw frames".into(),
            )),
        }
    }
}

/// Answers one in-process call. Dropped unanswered (its task dropped with the runtime that was
/// to run it), it drops the call's sender, so the caller sees `Closed` instead of waiting.
struct Reply {
    pending: Pending,
    id: u64,
}

impl Reply {
    fn take(&self) -> Option<Waiting> {
        self.pending
            .lock()
            .expect("pending lock")
            .as_mut()
            .and_then(|c| c.waiting.remove(&self.id))
    }

    fn send(self, answer: NodeAnswer) {
        // Gone if the watchdog failed it first: the answer is dropped, as a late one off a
        // connection is.
        if let Some(w) = self.take() {
            let _ = w.tx.send(Ok(answer));
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.take();
    }
}

impl Drop for DataClient {
    fn drop(&mut self) {
        self.watch.close();
    }
}

/// Fails the calls of one connection that are past their deadline, every [`WATCH_EVERY`]
/// while any call with a limit waits, until the connection is gone (its reader stopped) or
/// its client dropped (either closes `watch`).
async fn watchdog(pending: Pending, watch: Arc<Watch>) {
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        if watch.closed.load(Ordering::Acquire) {
            return;
        }
        let now = watch.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let asleep = {
            let mut g = pending.lock().expect("pending lock");
            let Some(c) = g.as_mut() else {
                return;
            };
            for (_, w) in c.waiting.extract_if(|_, w| w.deadline <= now) {
                let _ = w.tx.send(Err(ClientError::TimedOut));
            }
            c.watchdog_asleep = c.waiting.values().all(|w| w.deadline == u64::MAX);
            c.watchdog_asleep
        };
        if asleep {
            // A wake sent between the lock's release and this wait is kept by `Notify`.
            watch.wake.notified().await;
            if watch.closed.load(Ordering::Acquire) {
                return;
            }
            // The next tick comes a whole `WATCH_EVERY` after the call that woke us, so that
            // call still fails no earlier than its limit.
            every.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::net::TcpListener;

    use super::*;

    /// A node that takes the handshake, then answers every request but the first.
    async fn node_ignoring_the_first_request() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (r, w) = s.into_split();
            let (mut r, mut w) = (
                FramedRead::new(r, FrameCodec),
                FramedWrite::new(w, FrameCodec),
            );
            r.next().await.expect("hello").expect("hello frame");
            let welcome = pb::Welcome {
                node_uuid: "n".into(),
                ..Default::default()
            };
            let frame = |header: Vec<u8>| Frame {
                header: header.into(),
                payload: Bytes::new(),
            };
            w.send(frame(welcome.encode_to_vec()))
                .await
                .expect("welcome");
            let mut first = true;
            while let Some(Ok(f)) = r.next().await {
                let req = pb::Request::decode(f.header).expect("request");
                if std::mem::take(&mut first) {
                    continue;
                }
                let answer = pb::Response {
                    request_id: req.request_id,
                    ..Default::default()
                };
                w.send(frame(answer.encode_to_vec())).await.expect("answer");
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_call_past_its_limit_fails_and_the_connection_goes_on() {
        let c = DataClient::connect_tcp(&node_ignoring_the_first_request().await)
            .await
            .expect("connect");
        let limit = Duration::from_millis(300);
        let started = Instant::now();
        let unanswered = c.call_within(pb::Request::default(), Bytes::new(), limit);
        let answered = async {
            // Sent after the first, while it waits: answered at once.
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.call_within(pb::Request::default(), Bytes::new(), limit)
                .await
        };
        let (unanswered, answered) = tokio::join!(unanswered, answered);
        assert!(
            matches!(unanswered, Err(ClientError::TimedOut)),
            "{unanswered:?}"
        );
        assert!(started.elapsed() >= limit, "failed before its limit");
        assert!(answered.is_ok(), "{answered:?}");
        // A call with no limit on the same connection is answered too, as is one whose limit
        // is too far off to count in ticks.
        assert!(c.call(pb::Request::default(), Bytes::new()).await.is_ok());
        let far = c.call_within(pb::Request::default(), Bytes::new(), Duration::MAX);
        assert!(far.await.is_ok());
    }

    /// A connection with no call under a limit costs no wake-ups: its watchdog sleeps, the
    /// next limited call wakes it (and still fails no earlier than its limit), it sleeps again
    /// once that call is over, and it ends with the client.
    #[tokio::test]
    async fn the_watchdog_sleeps_while_no_limited_call_waits() {
        let c = DataClient::connect_tcp(&node_ignoring_the_first_request().await)
            .await
            .expect("connect");
        let ticks = || c.watch.ticks.load(Ordering::Relaxed);
        tokio::time::sleep(4 * WATCH_EVERY).await;
        assert!(ticks() <= 1, "an idle watchdog ticked {} times", ticks());
        let limit = Duration::from_millis(300);
        let started = Instant::now();
        let r = c
            .call_within(pb::Request::default(), Bytes::new(), limit)
            .await;
        assert!(matches!(r, Err(ClientError::TimedOut)), "{r:?}");
        assert!(started.elapsed() >= limit, "failed before its limit");
        // A call without a limit does not wake it.
        assert!(c.call(pb::Request::default(), Bytes::new()).await.is_ok());
        let after = ticks();
        tokio::time::sleep(4 * WATCH_EVERY).await;
        assert!(
            ticks() <= after + 1,
            "ticked on after the call: {after} -> {}",
            ticks()
        );
        let watch = Arc::downgrade(&c.watch);
        drop(c);
        for _ in 0..100 {
            if watch.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the watchdog outlived its client");
    }
}
