//! The vhost-user-blk backend on rust-vmm's `vhost-user-backend`: one worker thread per queue
//! pops descriptor chains, each request runs as a task on the tokio runtime against the
//! volume's [`VolumeClient`], and its completion goes back into the used ring (with EVENT_IDX
//! notification suppression when the driver negotiated it).
//!
//! Every malformed request — a chain without a header or a status byte, data in the wrong
//! direction, a range past the end or off the 4 KiB block, an oversized request — is
//! completed with VIRTIO_BLK_S_IOERR, an unknown type with VIRTIO_BLK_S_UNSUPP; a chain without
//! any writable byte cannot be answered at all and is returned with length 0. Nothing a guest
//! sends stops the backend.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::request::*;
use crate::volume::VolumeClient;

/// Most bytes a request may carry (its data descriptors: `seg_max` × `size_max`).
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

pub struct BlkBackend {
    vc: Arc<VolumeClient>,
    rt: tokio::runtime::Handle,
    queues: usize,
    config: Vec<u8>,
    serial: [u8; ID_BYTES],
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
}

impl BlkBackend {
    /// A backend for `vc` on `queues` queues; requests run on the runtime of `rt`.
    pub fn new(vc: Arc<VolumeClient>, queues: usize, rt: tokio::runtime::Handle) -> Self {
        let mut serial = [0u8; ID_BYTES];
        let name = format!("cairn-{}", vc.name());
        let n = name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        Self {
            config: config(vc.size(), queues as u16),
            vc,
            rt,
            queues,
            serial,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
        }
    }

    fn mem(&self) -> io::Result<Mem> {
        self.mem
            .read()
            .expect("mem lock")
            .clone()
            .ok_or_else(|| io::Error::other("no guest memory yet"))
    }

    /// Pops every available chain and starts its request.
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem()?;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.memory());
            let Some(chain) = chain else { return Ok(()) };
            let head = chain.head_index();
            let mut readable = Vec::new();
            let mut writable = Vec::new();
            let mut total: u64 = 0;
            let mut bad = false;
            for d in chain {
                total += u64::from(d.len());
                if d.is_write_only() {
                    writable.push((d.addr(), d.len() as usize));
                } else if !writable.is_empty() {
                    bad = true; // readable after writable: not a valid virtio-blk chain
                } else {
                    readable.push((d.addr(), d.len() as usize));
                }
            }
            if total > MAX_REQUEST_BYTES + 4096 {
                bad = true;
            }
            let req = Pending {
                vring: vring.clone(),
                mem: mem.clone(),
                head,
                writable,
                event_idx: self.event_idx.load(Ordering::Relaxed),
            };
            if req.status_addr().is_none() {
                // Nowhere to put a status: give the buffer back untouched.
                req.complete_raw(0);
                continue;
            }
            let data = if bad { None } else { gather(&mem, &readable) };
            let (vc, serial) = (self.vc.clone(), self.serial);
            self.rt.spawn(async move {
                let (status, reply) = match data {
                    Some(d) => execute(&vc, &d, req.data_capacity(), &serial).await,
                    None => (S_IOERR, Bytes::new()),
                };
                req.complete(status, &reply);
            });
        }
    }
}

/// Copies the readable part of a chain out of guest memory.
fn gather(mem: &Mem, readable: &[(GuestAddress, usize)]) -> Option<Vec<u8>> {
    let m = mem.memory();
    let len: usize = readable.iter().map(|r| r.1).sum();
    let mut out = vec![0u8; len];
    let mut at = 0;
    for (addr, n) in readable {
        m.read_slice(&mut out[at..at + n], *addr).ok()?;
        at += n;
    }
    Some(out)
}

/// A popped request waiting for its completion.
struct Pending {
    vring: VringRwLock,
    mem: Mem,
    head: u16,
    writable: Vec<(GuestAddress, usize)>,
    event_idx: bool,
}

impl Pending {
    /// The last writable byte: the status.
    fn status_addr(&self) -> Option<GuestAddress> {
        let (addr, len) = self.writable.last().filter(|w| w.1 > 0)?;
        addr.0.checked_add(*len as u64 - 1).map(GuestAddress)
    }

    /// Writable bytes before the status byte (where IN data and GET_ID's serial go).
    fn data_capacity(&self) -> usize {
        self.writable
            .iter()
            .map(|w| w.1)
            .sum::<usize>()
            .saturating_sub(1)
    }

    /// Writes `reply` into the writable descriptors and the status after it, then returns the
    /// chain to the driver.
    fn complete(self, status: u8, reply: &[u8]) {
        let m = self.mem.memory();
        let mut left = reply;
        let mut ok = true;
        for (addr, len) in &self.writable {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(*len);
            ok &= m.write_slice(&left[..n], *addr).is_ok();
            left = &left[n..];
        }
        let status = if ok { status } else { S_IOERR };
        if let Some(at) = self.status_addr() {
            let _ = m.write_slice(&[status], at);
        }
        drop(m);
        self.complete_raw((reply.len() + 1) as u32);
    }

    fn complete_raw(&self, len: u32) {
        if let Err(e) = self.vring.add_used(self.head, len) {
            tracing::error!(error = ?e, "cannot return a descriptor chain");
            return;
        }
        let notify = !self.event_idx || self.vring.needs_notification().unwrap_or(true);
        if notify {
            let _ = self.vring.signal_used_queue();
        }
    }
}

/// Runs one request from its readable bytes (header, then data or segments). Returns the
/// status and the bytes for the writable descriptors.
async fn execute(
    vc: &VolumeClient,
    readable: &[u8],
    capacity: usize,
    serial: &[u8; ID_BYTES],
) -> (u8, Bytes) {
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

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
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
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.config, offset, size)
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().expect("mem lock") = Some(mem);
        Ok(())
    }

    /// One worker thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::empty()).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        if !self.event_idx.load(Ordering::Relaxed) {
            return self.process_queue(vring);
        }
        // EVENT_IDX: no kicks while draining; re-arm, and drain again if the driver added
        // buffers meanwhile.
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            self.process_queue(vring)?;
            if !vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                return Ok(());
            }
        }
    }
}
