//! The NBD server: fixed-newstyle handshake and option haggling, then the transmission phase
//! over a [`VolumeClient`] per export (export name = volume name).
//!
//! - Options: EXPORT_NAME, GO, INFO, LIST, ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT
//!   (`base:allocation`); anything else is answered NBD_REP_ERR_UNSUP. STARTTLS is refused
//!   (NBD_REP_ERR_POLICY: no TLS configured).
//! - Commands: READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE), BLOCK_STATUS, DISC.
//!   Requests are pipelined: each runs in its own task and replies go out as they finish.
//! - Block size constraints: minimum and preferred 4 KiB, maximum [`MAX_REQUEST`]. A request
//!   breaking them, past the end, with an unknown command or flag gets its errno
//!   (EINVAL / ENOSPC for writes past the end) and the connection stays up; a garbage
//!   handshake or request header closes the connection. Other connections are untouched.
//! - Multi-conn is advertised: all connections to an export in this process share one
//!   `VolumeClient`, and a write is on every replica's media when acknowledged, so a flush on
//!   any connection covers every write completed on all of them.
//! - The volume's lease is taken at the first connection to an export and given back after
//!   the last one closes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cairn_proto::metadata as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use super::proto::*;
use crate::data::writer::next_batch;
use crate::meta::MetaClient;
use crate::volume::{AttachOptions, VolumeClient, VolumeError};

/// Largest READ / WRITE / zeroing request (qemu's default maximum transfer).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Requests in flight per connection.
const MAX_IN_FLIGHT: usize = 64;
/// Read buffer of a connection in transmission.
const IO_BUFFER: usize = 256 << 10;
/// Reply buffers gathered into one vectored send (a simple reply is one, a read's two).
const REPLY_BATCH: usize = 512;

pub struct NbdServer {
    meta_addrs: Vec<String>,
    meta: MetaClient,
    holder: String,
    host: String,
    exports: tokio::sync::Mutex<HashMap<String, (Arc<VolumeClient>, usize)>>,
}

/// Why an export cannot be opened: the option reply error and its message.
type OpenError = (u32, String);

impl NbdServer {
    /// A server attaching volumes as `holder` (unique per gateway: host and listen address),
    /// preferring replicas on `host`.
    pub fn new(meta_addrs: &[String], holder: &str, host: &str) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            meta_addrs: meta_addrs.to_vec(),
            meta: MetaClient::new(meta_addrs)?,
            holder: holder.to_owned(),
            host: host.to_owned(),
            exports: tokio::sync::Mutex::default(),
        }))
    }

    /// Serves connections from a TCP listener until the task is dropped.
    pub async fn serve_tcp(self: Arc<Self>, l: tokio::net::TcpListener) {
        loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    if let Err(e) = crate::data::tcp_session(&s) {
                        tracing::debug!(%peer, error = %e, "NBD connection closed");
                        continue;
                    }
                    tokio::spawn(self.clone().connection(s, peer.to_string()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Serves connections from a unix-socket listener until the task is dropped.
    pub async fn serve_unix(self: Arc<Self>, l: tokio::net::UnixListener) {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(self.clone().connection(s, "unix".into()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Gives back every lease this server holds (clean shutdown).
    pub async fn shutdown(&self) {
        let exports: Vec<Arc<VolumeClient>> = self
            .exports
            .lock()
            .await
            .drain()
            .map(|(_, (vc, _))| vc)
            .collect();
        for vc in exports {
            if let Err(e) = vc.detach().await {
                tracing::warn!(volume = vc.name(), error = %e, "detach at shutdown failed");
            }
        }
    }

    async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: Arc<Self>,
        stream: S,
        peer: String,
    ) {
        let (mut r, mut w) = tokio::io::split(stream);
        let opened = match self.handshake(&mut r, &mut w).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => {
                tracing::info!(%peer, error = %e, "NBD handshake ended");
                return;
            }
        };
        let name = opened.vc.name().to_owned();
        tracing::info!(%peer, export = %name, structured = opened.structured, "NBD client connected");
        // Reads buffered from here on (the handshake reads exact lengths, so nothing is left
        // behind): one recv takes a request's header and payload, and every request already
        // sent (unbuffered, each request cost two). Replies are not: the ones ready at once go
        // out in one vectored send, read data from where it is.
        let r = tokio::io::BufReader::with_capacity(IO_BUFFER, r);
        if let Err(e) = transmission(&opened, r, w).await {
            tracing::info!(%peer, export = %name, error = %e, "NBD connection ended");
        }
        self.close_export(&name).await;
    }

    async fn volume_info(&self, name: &str) -> Result<pb::Volume, OpenError> {
        let r = self
            .meta
            .call(|mut c| {
                let name = name.to_owned();
                async move { c.get_volume(pb::GetVolumeRequest { name }).await }
            })
            .await;
        match r {
            Ok(r) => r.volume.ok_or((REP_ERR_UNKNOWN, "no such volume".into())),
            Err(e) if e.code() == tonic::Code::NotFound => {
                Err((REP_ERR_UNKNOWN, format!("no volume named {name:?}")))
            }
            Err(e) => Err((REP_ERR_INVALID, e.to_string())),
        }
    }

    async fn open_export(&self, name: &str) -> Result<Arc<VolumeClient>, OpenError> {
        let mut exports = self.exports.lock().await;
        if let Some((vc, n)) = exports.get_mut(name) {
            *n += 1;
            return Ok(vc.clone());
        }
        self.volume_info(name).await?;
        let meta =
            MetaClient::new(&self.meta_addrs).map_err(|e| (REP_ERR_INVALID, e.to_string()))?;
        let opts = AttachOptions {
            holder: self.holder.clone(),
            force: false,
            host: self.host.clone(),
        };
        match VolumeClient::attach(meta, name, opts).await {
            Ok(vc) => {
                exports.insert(name.to_owned(), (vc.clone(), 1));
                Ok(vc)
            }
            Err(VolumeError::Meta(e)) if e.code() == tonic::Code::NotFound => {
                Err((REP_ERR_UNKNOWN, format!("no volume named {name:?}")))
            }
            Err(VolumeError::Meta(e)) if e.code() == tonic::Code::FailedPrecondition => {
                Err((REP_ERR_POLICY, e.to_string()))
            }
            Err(e) => Err((REP_ERR_INVALID, e.to_string())),
        }
    }

    async fn close_export(&self, name: &str) {
        let mut exports = self.exports.lock().await;
        let last = match exports.get_mut(name) {
            Some((_, n)) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        if last {
            if let Some((vc, _)) = exports.remove(name) {
                if let Err(e) = vc.detach().await {
                    tracing::warn!(volume = name, error = %e, "detach failed");
                }
            }
        }
    }

    /// Greeting and option haggling. `Ok(None)`: the client ended it cleanly (ABORT).
    async fn handshake<R, W>(&self, r: &mut R, w: &mut W) -> anyhow::Result<Option<Opened>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        w.write_all(&greeting()).await?;
        let cflags = r.read_u32().await?;
        anyhow::ensure!(
            cflags & FLAG_C_FIXED_NEWSTYLE != 0,
            "client does not speak fixed newstyle"
        );
        anyhow::ensure!(
            cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) == 0,
            "client sent unknown flags {cflags:#x}"
        );
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        let mut structured = false;
        let mut base_allocation = false;
        loop {
            let mut h = [0u8; 16];
            r.read_exact(&mut h).await?;
            let (opt, len) = parse_option_header(&h).map_err(anyhow::Error::msg)?;
            if len as usize > MAX_OPTION {
                tokio::io::copy(&mut r.take(len.into()), &mut tokio::io::sink()).await?;
                w.write_all(&option_reply(opt, REP_ERR_TOO_BIG, b"option too long"))
                    .await?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data).await?;
            let reply = |kind: u32, d: &[u8]| option_reply(opt, kind, d);
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8(data)?;
                    // No way to report an error to this option: the protocol says close.
                    let vc = match self.open_export(&name).await {
                        Ok(vc) => vc,
                        Err((_, why)) => anyhow::bail!("export {name:?}: {why}"),
                    };
                    let flags = transmission_flags(structured);
                    w.write_all(&export_name_reply(vc.size(), flags, no_zeroes))
                        .await?;
                    return Ok(Some(Opened {
                        vc,
                        structured,
                        base_allocation: base_allocation && structured,
                    }));
                }
                OPT_ABORT => {
                    w.write_all(&reply(REP_ACK, &[])).await?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        w.write_all(&reply(REP_ERR_INVALID, b"LIST takes no data"))
                            .await?;
                        continue;
                    }
                    let names = self.list().await;
                    match names {
                        Ok(names) => {
                            for n in names {
                                w.write_all(&reply(REP_SERVER, &rep_server(&n))).await?;
                            }
                            w.write_all(&reply(REP_ACK, &[])).await?;
                        }
                        Err(e) => {
                            w.write_all(&reply(REP_ERR_INVALID, e.as_bytes())).await?;
                        }
                    }
                }
                OPT_STARTTLS => {
                    w.write_all(&reply(REP_ERR_POLICY, b"TLS is not configured"))
                        .await?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        w.write_all(&reply(REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data"))
                            .await?;
                        continue;
                    }
                    structured = true;
                    w.write_all(&reply(REP_ACK, &[])).await?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let Some(req) = parse_meta_context(&data) else {
                        w.write_all(&reply(REP_ERR_INVALID, b"malformed meta context request"))
                            .await?;
                        continue;
                    };
                    if !structured {
                        w.write_all(&reply(
                            REP_ERR_INVALID,
                            b"negotiate structured replies first",
                        ))
                        .await?;
                        continue;
                    }
                    if let Err((e, why)) = self.volume_info(&req.name).await {
                        w.write_all(&reply(e, why.as_bytes())).await?;
                        continue;
                    }
                    let wanted = if req.queries.is_empty() {
                        opt == OPT_LIST_META_CONTEXT
                    } else {
                        req.queries.iter().any(|q| query_matches_base_allocation(q))
                    };
                    if opt == OPT_SET_META_CONTEXT {
                        base_allocation = wanted;
                    }
                    if wanted {
                        let d = rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION);
                        w.write_all(&reply(REP_META_CONTEXT, &d)).await?;
                    }
                    w.write_all(&reply(REP_ACK, &[])).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some(req) = parse_go(&data) else {
                        w.write_all(&reply(REP_ERR_INVALID, b"malformed INFO/GO request"))
                            .await?;
                        continue;
                    };
                    let (size, vc) = if opt == OPT_GO {
                        match self.open_export(&req.name).await {
                            Ok(vc) => (vc.size(), Some(vc)),
                            Err((e, why)) => {
                                w.write_all(&reply(e, why.as_bytes())).await?;
                                continue;
                            }
                        }
                    } else {
                        match self.volume_info(&req.name).await {
                            Ok(v) => (v.size_bytes, None),
                            Err((e, why)) => {
                                w.write_all(&reply(e, why.as_bytes())).await?;
                                continue;
                            }
                        }
                    };
                    let flags = transmission_flags(structured);
                    w.write_all(&reply(REP_INFO, &info_export(size, flags)))
                        .await?;
                    w.write_all(&reply(REP_INFO, &info_block_size(4096, 4096, MAX_REQUEST)))
                        .await?;
                    if req.infos.contains(&INFO_NAME) {
                        w.write_all(&reply(REP_INFO, &info_name(&req.name))).await?;
                    }
                    if req.infos.contains(&INFO_DESCRIPTION) {
                        let d = info_description("Cairn replicated volume");
                        w.write_all(&reply(REP_INFO, &d)).await?;
                    }
                    w.write_all(&reply(REP_ACK, &[])).await?;
                    if let Some(vc) = vc {
                        return Ok(Some(Opened {
                            vc,
                            structured,
                            base_allocation: base_allocation && structured,
                        }));
                    }
                }
                _ => {
                    w.write_all(&reply(REP_ERR_UNSUP, b"option not supported"))
                        .await?;
                }
            }
        }
    }

    async fn list(&self) -> Result<Vec<String>, String> {
        self.meta
            .call(|mut c| async move { c.list_volumes(pb::ListVolumesRequest {}).await })
            .await
            .map(|r| r.volumes.into_iter().map(|v| v.name).collect())
            .map_err(|e| e.to_string())
    }
}

struct Opened {
    vc: Arc<VolumeClient>,
    structured: bool,
    base_allocation: bool,
}

fn transmission_flags(structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// The transmission phase: read requests, run each in its own task, write replies in the
/// order they finish. Ends at DISC, at the client's EOF, or at a malformed request header
/// (after the requests already read have been answered).
async fn transmission<R, W>(o: &Opened, mut r: R, mut w: W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut batch: Vec<Vec<Bytes>> = Vec::new();
        // The replies the other requests the same event finished queue go with it: one send
        // for the batch (at most 512 buffers and a reply's: within IOV_MAX).
        while next_batch(&mut rx, &mut batch, usize::MAX, Vec::len, REPLY_BATCH).await {
            let mut slices: Vec<_> = batch
                .iter()
                .flatten()
                .filter(|p| !p.is_empty())
                .map(|p| std::io::IoSlice::new(p))
                .collect();
            crate::data::writer::write_all_vectored(&mut w, &mut slices).await?;
            batch.clear();
        }
        anyhow::Ok(())
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let end = loop {
        let mut h = [0u8; REQUEST_LEN];
        match r.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match parse_request(&h) {
            Ok(q) => q,
            Err(e) => break Err(anyhow::anyhow!(e)),
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        let payload = if req.kind == CMD_WRITE {
            if req.length > MAX_REQUEST {
                // The payload follows regardless: skip it, keep the stream in step.
                tokio::io::copy(
                    &mut (&mut r).take(req.length.into()),
                    &mut tokio::io::sink(),
                )
                .await?;
                let _ = tx.send(vec![simple_reply(req.cookie, EINVAL)]).await;
                continue;
            }
            // Read into spare capacity: no zeroing of a buffer about to be overwritten.
            let len = req.length as usize;
            let mut b = BytesMut::with_capacity(len);
            while b.len() < len {
                if (&mut r)
                    .take((len - b.len()) as u64)
                    .read_buf(&mut b)
                    .await?
                    == 0
                {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            }
            b.freeze()
        } else {
            Bytes::new()
        };
        let permit = slots.clone().acquire_owned().await?;
        let (vc, tx) = (o.vc.clone(), tx.clone());
        let (structured, base_allocation) = (o.structured, o.base_allocation);
        tokio::spawn(async move {
            let reply = execute(&vc, req, payload, structured, base_allocation).await;
            let _ = tx.send(reply).await;
            drop(permit);
        });
    };
    // Every request read gets its answer before the connection closes.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    let _ = writer.await;
    end
}

/// Runs one request; returns its whole reply.
async fn execute(
    vc: &VolumeClient,
    req: Request,
    payload: Bytes,
    structured: bool,
    base_allocation: bool,
) -> Vec<Bytes> {
    let fail = |errno: u32, msg: &str| {
        if structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            vec![structured_error(req.cookie, errno, msg)]
        } else {
            vec![simple_reply(req.cookie, errno)]
        }
    };
    let allowed = match req.kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_FLUSH => 0,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return fail(EINVAL, "unknown command"),
    };
    if req.flags & !allowed != 0 {
        return fail(EINVAL, "flag not valid for this command");
    }
    let (off, len) = (req.offset, u64::from(req.length));
    if req.kind != CMD_FLUSH {
        if off.checked_add(len).is_none_or(|end| end > vc.size()) {
            let errno = if matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return fail(errno, "request past the end of the export");
        }
        if !off.is_multiple_of(4096) || !len.is_multiple_of(4096) {
            return fail(EINVAL, "request not aligned to the 4096-byte block size");
        }
        // The maximum applies to requests that carry or produce data; trims, zeroing that may
        // punch, and status queries may be larger (clients send them for whole holes).
        let carries_data = match req.kind {
            CMD_READ | CMD_WRITE => true,
            CMD_WRITE_ZEROES => req.flags & CMD_FLAG_NO_HOLE != 0,
            _ => false,
        };
        if carries_data && len > u64::from(MAX_REQUEST) {
            return fail(EINVAL, "request over the maximum size");
        }
    }
    let done = |r: Result<(), VolumeError>| match r {
        Ok(()) => vec![simple_reply(req.cookie, 0)],
        Err(e) => fail(errno_of(&e), &e.to_string()),
    };
    match req.kind {
        CMD_READ if len == 0 => {
            // Nothing to send: a data chunk may not be empty.
            if structured {
                vec![structured_none(req.cookie)]
            } else {
                vec![simple_reply(req.cookie, 0)]
            }
        }
        CMD_READ => match vc.read(off, len).await {
            Ok(data) if structured => {
                vec![offset_data_header(req.cookie, off, data.len(), true), data]
            }
            Ok(data) => vec![simple_reply(req.cookie, 0), data],
            Err(e) => fail(errno_of(&e), &e.to_string()),
        },
        CMD_WRITE => done(vc.write(off, payload).await),
        CMD_FLUSH => done(vc.flush().await),
        CMD_TRIM => done(vc.discard(off, len).await),
        CMD_WRITE_ZEROES => {
            let punch = req.flags & CMD_FLAG_NO_HOLE == 0;
            done(vc.write_zeroes(off, len, punch).await)
        }
        _ => {
            if !base_allocation {
                return fail(EINVAL, "base:allocation was not negotiated");
            }
            if len == 0 {
                return fail(EINVAL, "zero-length block status");
            }
            match vc.block_status(off, len).await {
                Ok(runs) => {
                    let mut extents: Vec<(u32, u32)> = runs
                        .into_iter()
                        .map(|(n, allocated)| {
                            let flags = if allocated {
                                0
                            } else {
                                STATE_HOLE | STATE_ZERO
                            };
                            (u32::try_from(n).unwrap_or(!4095), flags)
                        })
                        .collect();
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        extents.truncate(1);
                    }
                    vec![block_status_reply(req.cookie, BASE_ALLOCATION_ID, &extents)]
                }
                Err(e) => fail(errno_of(&e), &e.to_string()),
            }
        }
    }
}

fn errno_of(e: &VolumeError) -> u32 {
    match e {
        VolumeError::OutOfRange { .. } | VolumeError::Unaligned { .. } => EINVAL,
        VolumeError::NoSpace(_) => ENOSPC,
        VolumeError::Fenced { .. } => ESHUTDOWN,
        VolumeError::Meta(_) | VolumeError::Io(_) | VolumeError::StaleEpoch => EIO,
    }
}
