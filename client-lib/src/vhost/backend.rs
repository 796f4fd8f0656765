//! virtio-blk requests against a volume: a chain's buffers split into what the device reads
//! and what it writes, the request run on the volume's [`VolumeClient`], and the reply and
//! status written back into guest memory. The rings around it are in [`super::device`].
//!
//! Every malformed request — a chain without a header or a status byte, data in the wrong
//! direction, a range past the end or off the 4 KiB block, an oversized request — is
//! completed with VIRTIO_BLK_S_IOERR, an unknown type with VIRTIO_BLK_S_UNSUPP; a chain without
//! any writable byte cannot be answered at all and is returned with length 0. Nothing a guest
//! sends stops the backend.

use std::sync::Arc;

use bytes::Bytes;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

use super::chain::Seg;
use super::request::*;
use crate::volume::VolumeClient;

/// Most bytes a request may carry (its data descriptors: `seg_max` × `size_max`).
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// The disk a volume is served as: its configuration space and serial.
pub struct Blk {
    pub(crate) vc: Arc<VolumeClient>,
    pub(crate) queues: u16,
    pub(crate) config: Vec<u8>,
    serial: [u8; ID_BYTES],
}

impl Blk {
    /// `vc` as a virtio-blk disk with `queues` queues.
    pub fn new(vc: Arc<VolumeClient>, queues: u16) -> Self {
        let mut serial = [0u8; ID_BYTES];
        let name = format!("cairn-{}", vc.name());
        let n = name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        Self {
            config: config(vc.size(), queues),
            vc,
            queues,
            serial,
        }
    }

    /// The virtio features offered.
    pub fn features() -> u64 {
        F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY
            | F_MQ
            | F_DISCARD
            | F_WRITE_ZEROES
            | F_INDIRECT_DESC
            | F_EVENT_IDX
            | F_VERSION_1
    }
}

/// A chain taken off a queue: the buffers the device reads (header, then OUT data or
/// segments), then those it writes (IN data or the serial, then the status byte).
pub(crate) struct Request {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    malformed: bool,
}

impl Request {
    pub(crate) fn new(segs: &[Seg]) -> Self {
        let mut r = Self {
            readable: Vec::new(),
            writable: Vec::new(),
            malformed: false,
        };
        let mut total: u64 = 0;
        for s in segs {
            total += u64::from(s.len);
            if s.write {
                r.writable.push(*s);
            } else if !r.writable.is_empty() {
                r.malformed = true; // readable after writable: not a valid virtio-blk chain
            } else {
                r.readable.push(*s);
            }
        }
        r.malformed |= total > MAX_REQUEST_BYTES + 4096;
        r
    }

    /// The last writable byte: the status. `None`: the chain cannot be answered.
    pub(crate) fn status_addr(&self) -> Option<u64> {
        let s = self.writable.last().filter(|w| w.len > 0)?;
        s.addr.checked_add(u64::from(s.len) - 1)
    }

    /// Writable bytes before the status byte (where IN data and GET_ID's serial go).
    fn data_capacity(&self) -> usize {
        self.writable
            .iter()
            .map(|w| w.len as usize)
            .sum::<usize>()
            .saturating_sub(1)
    }

    /// Copies the readable part out of guest memory; `None` if the chain is malformed or
    /// points outside guest memory.
    pub(crate) fn gather(&self, mem: &GuestMemoryMmap) -> Option<Vec<u8>> {
        if self.malformed {
            return None;
        }
        let len: usize = self.readable.iter().map(|r| r.len as usize).sum();
        let mut out = vec![0u8; len];
        let mut at = 0;
        for r in &self.readable {
            let n = r.len as usize;
            mem.read_slice(&mut out[at..at + n], GuestAddress(r.addr))
                .ok()?;
            at += n;
        }
        Some(out)
    }

    /// Runs the request (`data`: its gathered readable bytes, `None` if malformed).
    pub(crate) async fn run(&self, blk: &Blk, data: Option<Vec<u8>>) -> (u8, Bytes) {
        match data {
            Some(d) => execute(blk, &d, self.data_capacity()).await,
            None => (S_IOERR, Bytes::new()),
        }
    }

    /// Writes `reply` into the writable buffers and the status after it; returns the length
    /// for the used ring.
    pub(crate) fn finish(&self, mem: &GuestMemoryMmap, status: u8, reply: &[u8]) -> u32 {
        let mut left = reply;
        let mut ok = true;
        for w in &self.writable {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(w.len as usize);
            ok &= mem.write_slice(&left[..n], GuestAddress(w.addr)).is_ok();
            left = &left[n..];
        }
        let status = if ok { status } else { S_IOERR };
        if let Some(at) = self.status_addr() {
            let _ = mem.write_slice(&[status], GuestAddress(at));
        }
        (reply.len() + 1) as u32
    }
}

/// Runs one request from its readable bytes (header, then data or segments). Returns the
/// status and the bytes for the writable descriptors.
async fn execute(blk: &Blk, readable: &[u8], capacity: usize) -> (u8, Bytes) {
    let (vc, serial) = (&*blk.vc, &blk.serial);
    let Some(h) = parse_header(readable) else {
        return (S_IOERR, Bytes::new());
    };
    let payload = &readable[HEADER_LEN..];
    let size = vc.size();
    let ok = |r: Result<(), crate::VolumeError>| match r {
        Ok(()) => (S_OK, Bytes::new()),
        Err(e) => {
            tracing::warn!(volume = vc.name(), error = %e, "virtio-blk request failed");
            (S_IOERR, Bytes::new())
        }
    };
    match h.kind {
        T_IN => {
            if !payload.is_empty() || capacity as u64 > MAX_REQUEST_BYTES {
                return (S_IOERR, Bytes::new());
            }
            let Some((off, len)) = byte_range(h.sector, capacity as u64, size) else {
                return (S_IOERR, Bytes::new());
            };
            match vc.read(off, len).await {
                Ok(d) => (S_OK, d),
                Err(e) => {
                    tracing::warn!(volume = vc.name(), error = %e, "virtio-blk read failed");
                    (S_IOERR, Bytes::new())
                }
            }
        }
        T_OUT => {
            if capacity != 0 || payload.len() as u64 > MAX_REQUEST_BYTES {
                return (S_IOERR, Bytes::new());
            }
            let Some((off, _)) = byte_range(h.sector, payload.len() as u64, size) else {
                return (S_IOERR, Bytes::new());
            };
            ok(vc.write(off, Bytes::copy_from_slice(payload)).await)
        }
        T_FLUSH => ok(vc.flush().await),
        T_GET_ID => {
            let n = capacity.min(ID_BYTES);
            (S_OK, Bytes::copy_from_slice(&serial[..n]))
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let Some(segs) = parse_segments(payload) else {
                return (S_IOERR, Bytes::new());
            };
            for s in segs {
                let bytes = u64::from(s.sectors) * SECTOR;
                let Some((off, len)) = byte_range(s.sector, bytes, size) else {
                    return (S_IOERR, Bytes::new());
                };
                if s.sectors > MAX_DISCARD_SECTORS {
                    return (S_IOERR, Bytes::new());
                }
                let r = if h.kind == T_DISCARD {
                    if s.flags != 0 {
                        return (S_UNSUPP, Bytes::new());
                    }
                    vc.discard(off, len).await
                } else {
                    let unmap = s.flags & WRITE_ZEROES_UNMAP != 0;
                    vc.write_zeroes(off, len, unmap).await
                };
                if r.is_err() {
                    return ok(r);
                }
            }
            (S_OK, Bytes::new())
        }
        _ => (S_UNSUPP, Bytes::new()),
    }
}
