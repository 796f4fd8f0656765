//! The device side of vhost-user for one frontend connection: guest memory, the virtqueues,
//! and the requests on them — on rust-vmm's `vhost` (the protocol) and `virtio-queue` (the
//! rings). `vhost-user-backend` cannot hand out or take back an inflight region, which is what
//! lets QEMU's `reconnect=` survive a backend restart in the middle of guest I/O, so the
//! device side is Cairn's own.
//!
//! Each queue, once started (a kick fd after its addresses) and enabled, has a task on the
//! tokio runtime woken by its kick eventfd. It takes every available chain off the ring
//! (marking it in the inflight region, when QEMU gave one), and runs each request as a task
//! of its own; a request returns its chain to the used ring when it completes, in whatever
//! order requests complete, and clears its mark. GET_VRING_BASE stops the queue and waits for
//! its requests, so the index it answers covers exactly the chains completed. When the
//! connection ends, requests still running finish but return nothing: the next connection
//! runs them again (from the inflight region, or from QEMU's rewound ring), and the next
//! connection is accepted only once they have finished, so an old write can never land after
//! its own rerun and a later guest write.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

use super::backend::{Blk, Request};
use super::chain;
use super::inflight::{QueueInflight, Region};
use super::request::{F_EVENT_IDX, F_INDIRECT_DESC};

/// Descriptors per queue at most (QEMU's vhost-user-blk default `queue-size`).
pub const MAX_QUEUE_SIZE: u16 = 256;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

fn invalid(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

/// One virtqueue's ring and the requests taken off it.
struct Vq {
    mem: Mem,
    ring: Mutex<Ring>,
    /// Requests taken off the ring and not yet completed.
    pending: Mutex<usize>,
    idle: Condvar,
    /// False once the connection ended: completions then return nothing to the ring.
    live: Arc<AtomicBool>,
}

/// What is changed together under the queue's lock: taking a chain and marking it in flight,
/// returning it and clearing the mark.
struct Ring {
    queue: Queue,
    call: Option<Arc<File>>,
    inflight: Option<QueueInflight>,
    /// Order of the chains taken, for the inflight region.
    counter: u64,
    /// Chains a previous backend left in flight, to run before new ones (newest first).
    resubmit: Vec<u16>,
    indirect: bool,
}

impl Vq {
    fn new(mem: Mem, live: Arc<AtomicBool>) -> Self {
        Self {
            mem,
            ring: Mutex::new(Ring {
                queue: Queue::new(MAX_QUEUE_SIZE).expect("a valid queue size"),
                call: None,
                inflight: None,
                counter: 0,
                resubmit: Vec::new(),
                indirect: false,
            }),
            pending: Mutex::new(0),
            idle: Condvar::new(),
            live,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().expect("ring lock")
    }

    /// Takes every available chain (and first any left in flight by a previous backend) and
    /// starts its request.
    fn poll(self: &Arc<Self>, blk: &Arc<Blk>, rt: &tokio::runtime::Handle) {
        loop {
            let m = self.mem.memory();
            let (heads, table, size, indirect, again) = {
                let mut r = self.ring();
                if !r.queue.ready() {
                    return;
                }
                let event_idx = r.queue.event_idx_enabled();
                if event_idx {
                    // No kicks while draining; re-armed below.
                    let _ = r.queue.disable_notification(&*m);
                }
                let mut heads: Vec<u16> = std::mem::take(&mut r.resubmit);
                heads.reverse();
                while let Some(c) = r.queue.pop_descriptor_chain(&*m) {
                    let (head, n) = (c.head_index(), r.counter);
                    r.counter += 1;
                    if let Some(inf) = &r.inflight {
                        inf.taken(head, n);
                    }
                    heads.push(head);
                }
                // With EVENT_IDX, re-arm and go again if the driver added chains meanwhile.
                let again = event_idx && r.queue.enable_notification(&*m).unwrap_or(false);
                let q = &r.queue;
                (heads, q.desc_table(), q.size(), r.indirect, again)
            };
            *self.pending.lock().expect("pending lock") += heads.len();
            for head in heads {
                self.start(head, table, size, indirect, &m, blk, rt);
            }
            if !again {
                return;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        self: &Arc<Self>,
        head: u16,
        table: u64,
        size: u16,
        indirect: bool,
        mem: &GuestMemoryMmap,
        blk: &Arc<Blk>,
        rt: &tokio::runtime::Handle,
    ) {
        let req = match chain::walk(mem, table, size, head, indirect) {
            Ok(segs) => Request::new(&segs),
            Err(e) => {
                tracing::warn!(head, error = %e, "malformed descriptor chain");
                return self.complete(head, 0);
            }
        };
        if req.status_addr().is_none() {
            // Nowhere to put a status: give the buffers back untouched.
            return self.complete(head, 0);
        }
        let data = req.gather(mem);
        let (vq, blk) = (self.clone(), blk.clone());
        rt.spawn(async move {
            let (status, reply) = req.run(&blk, data).await;
            let len = req.finish(&vq.mem.memory(), status, &reply);
            vq.complete(head, len);
        });
    }

    /// Returns `head` to the used ring (unless the connection ended) and notifies the driver.
    fn complete(&self, head: u16, len: u32) {
        let m = self.mem.memory();
        let call = {
            let mut r = self.ring();
            if self.live.load(Ordering::Acquire) {
                let inflight = r.inflight.clone();
                if let Some(inf) = &inflight {
                    inf.returning(head);
                }
                match r.queue.add_used(&*m, head, len) {
                    Ok(()) => {
                        // The used ring has it (guest memory): now the mark can go.
                        if let Some(inf) = &inflight {
                            inf.returned(head, r.queue.next_used());
                        }
                        let notify = !r.queue.event_idx_enabled()
                            || r.queue.needs_notification(&*m).unwrap_or(true);
                        if notify {
                            r.call.clone()
                        } else {
                            None
                        }
                    }
                    Err(e) => {
                        tracing::error!(head, error = ?e, "cannot return a descriptor chain");
                        None
                    }
                }
            } else {
                None
            }
        };
        if let Some(call) = call {
            let _ = (&*call).write(&1u64.to_ne_bytes());
        }
        let mut p = self.pending.lock().expect("pending lock");
        *p -= 1;
        if *p == 0 {
            self.idle.notify_all();
        }
    }

    /// Blocks until every request taken off this queue has completed.
    fn wait_idle(&self) {
        let mut p = self.pending.lock().expect("pending lock");
        while *p > 0 {
            p = self.idle.wait(p).expect("pending lock");
        }
    }
}

/// The task serving one queue's kicks.
struct Worker {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// One queue as the frontend configured it.
struct QueueCtl {
    vq: Arc<Vq>,
    kick: Option<Arc<File>>,
    addr_set: bool,
    /// Set by SET_VRING_KICK, cleared by GET_VRING_BASE.
    started: bool,
    enabled: bool,
    worker: Option<Worker>,
}

/// A vhost-user-blk device for one frontend connection.
pub struct Device {
    blk: Arc<Blk>,
    rt: tokio::runtime::Handle,
    mem: Mem,
    live: Arc<AtomicBool>,
    /// Frontend virtual address ranges → guest physical (for ring addresses).
    mappings: Vec<(u64, u64, u64)>,
    queues: Vec<QueueCtl>,
    owned: bool,
    acked_features: u64,
}

impl Device {
    pub fn new(blk: Arc<Blk>, rt: tokio::runtime::Handle) -> Self {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let live = Arc::new(AtomicBool::new(true));
        let queues = (0..blk.queues)
            .map(|_| QueueCtl {
                vq: Arc::new(Vq::new(mem.clone(), live.clone())),
                kick: None,
                addr_set: false,
                started: false,
                enabled: false,
                worker: None,
            })
            .collect();
        Self {
            blk,
            rt,
            mem,
            live,
            mappings: Vec::new(),
            queues,
            owned: false,
            acked_features: 0,
        }
    }

    /// The protocol features offered.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn queue(&mut self, index: u32) -> VuResult<&mut QueueCtl> {
        self.queues
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    fn gpa(&self, va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|(start, size, _)| va >= *start && va - start < *size)
            .map(|(start, _, gpa)| va - start + gpa)
            .ok_or(VuError::InvalidParam)
    }

    /// Runs or stops the queue's worker to match its state.
    fn update(&mut self, index: u32) -> VuResult<()> {
        let (blk, rt) = (self.blk.clone(), self.rt.clone());
        let q = self.queue(index)?;
        let run = q.started && q.enabled && q.addr_set && q.kick.is_some();
        if run && q.worker.is_none() {
            let (stop, mut stopped) = tokio::sync::oneshot::channel();
            let (vq, kick) = (q.vq.clone(), q.kick.clone().expect("checked above"));
            let task = rt.clone().spawn(async move {
                let kick = match kick.try_clone().and_then(|f| {
                    // SAFETY: the File moves into the AsyncFd and stays open, the same
                    // descriptor, for the AsyncFd's whole life.
                    unsafe { AsyncFd::register_with_interest(f, Interest::READABLE) }
                        .map_err(|e| std::io::Error::other(e.to_string()))
                }) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::error!(queue = index, error = %e, "cannot watch the kick fd");
                        return;
                    }
                };
                // Chains may have been added (or left in flight) before this queue started.
                vq.poll(&blk, &rt);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        r = kick.readable() => {
                            let Ok(mut g) = r else { return };
                            let mut buf = [0u8; 8];
                            // Drain the eventfd until it would block (which re-arms it).
                            while let Ok(r) = g.try_io(|f| f.get_ref().read(&mut buf)) {
                                if r.is_err() {
                                    break;
                                }
                            }
                            vq.poll(&blk, &rt);
                        }
                    }
                }
            });
            q.worker = Some(Worker { stop, task });
        } else if !run {
            if let Some(w) = q.worker.take() {
                let _ = w.stop.send(());
                let _ = futures::executor::block_on(w.task);
            }
        }
        Ok(())
    }

    /// Readies a queue that was just started: its used index from the guest's ring, and, if
    /// the inflight region was used by a previous backend, the chains it left in flight.
    fn prepare(&mut self, index: u32) -> VuResult<()> {
        let m = self.mem.memory();
        let q = self.queue(index)?;
        let mut r = q.vq.ring();
        let used = r
            .queue
            .used_idx(&*m, Ordering::Acquire)
            .map_err(|_| VuError::InvalidParam)?
            .0;
        r.queue.set_next_used(used);
        if let Some(inf) = r.inflight.clone() {
            if r.queue.size() > inf.desc_num() {
                tracing::warn!(queue = index, "queue larger than its inflight region");
                r.inflight = None;
            } else if inf.in_use() {
                let (heads, counter) = inf.recover(used);
                if !heads.is_empty() {
                    tracing::info!(
                        queue = index,
                        requests = heads.len(),
                        "running again the requests a previous backend left in flight"
                    );
                }
                // Every chain taken was either returned (counted by `used`) or is in flight.
                r.queue
                    .set_next_avail(used.wrapping_add(heads.len() as u16));
                r.resubmit = heads.into_iter().rev().collect();
                r.counter = counter;
            } else {
                inf.init(used);
                r.counter = 0;
            }
        }
        r.queue.set_ready(true);
        Ok(())
    }

    /// Stops a queue: no more chains taken, and every request taken has completed.
    fn stop(&mut self, index: u32) -> VuResult<u16> {
        let q = self.queue(index)?;
        q.started = false;
        q.kick = None;
        self.update(index)?;
        let q = self.queue(index)?;
        q.vq.ring().queue.set_ready(false);
        q.vq.wait_idle();
        let mut r = q.vq.ring();
        r.call = None;
        Ok(r.queue.next_avail())
    }

    /// The connection ended: stops every queue; requests still running finish without
    /// returning anything to the rings. Returns once they all have.
    pub fn shutdown(&mut self) {
        self.live.store(false, Ordering::Release);
        for i in 0..self.queues.len() as u32 {
            let _ = self.stop(i);
        }
    }
}

impl VhostUserBackendReqHandlerMut for Device {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(invalid("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.owned = false;
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for i in 0..self.queues.len() as u32 {
            self.stop(i)?;
            self.queue(i)?.enabled = false;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(Blk::features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.get_features()? != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES rings are enabled as soon as they start.
        let enable_all = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for i in 0..self.queues.len() as u32 {
            let q = self.queue(i)?;
            {
                let mut r = q.vq.ring();
                r.queue.set_event_idx(features & F_EVENT_IDX != 0);
                r.indirect = features & F_INDIRECT_DESC != 0;
            }
            if enable_all {
                q.enabled = true;
                self.update(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(VuError::InvalidParam)?;
            regions.push(r);
            mappings.push((region.user_addr, region.memory_size, region.guest_phys_addr));
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| VuError::ReqHandlerError(std::io::Error::other(e)))?;
        self.mem.lock().expect("memory lock").replace(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let q = self.queue(index)?;
        let num = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        q.vq.ring()
            .queue
            .try_set_size(num)
            .map_err(|_| VuError::InvalidParam)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (desc, avail, used) = (self.gpa(descriptor)?, self.gpa(available)?, self.gpa(used)?);
        let q = self.queue(index)?;
        {
            let mut r = q.vq.ring();
            let bad = |_| VuError::InvalidParam;
            r.queue
                .try_set_desc_table_address(GuestAddress(desc))
                .map_err(bad)?;
            r.queue
                .try_set_avail_ring_address(GuestAddress(avail))
                .map_err(bad)?;
            r.queue
                .try_set_used_ring_address(GuestAddress(used))
                .map_err(bad)?;
        }
        q.addr_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        self.queue(index)?.vq.ring().queue.set_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let next = self.stop(index)?;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let index = u32::from(index);
        let fd = fd.ok_or(invalid(
            "polling a queue without a kick fd is not supported",
        ))?;
        // The kick fd is shared with the frontend, which makes its eventfds non-blocking too.
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| VuError::ReqHandlerError(e.into()))?;
        // A queue that is running gets a new kick fd; one that was stopped (or never ran)
        // starts now.
        let q = self.queue(index)?;
        let fresh = !q.vq.ring().queue.ready();
        q.started = false;
        self.update(index)?;
        if fresh {
            self.prepare(index)?;
        }
        let q = self.queue(index)?;
        q.kick = Some(Arc::new(fd));
        q.started = true;
        self.update(index)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.queue(u32::from(index))?.vq.ring().call = fd.map(Arc::new);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        // Errors are answered per request (VIRTIO_BLK_S_IOERR); the err fd is not used.
        self.queue(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(Self::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !Self::protocol_features().bits() != 0 {
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.queue(index)?.enabled = enable;
        self.update(index)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        Ok(super::request::config_slice(&self.blk.config, offset, size))
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(invalid("the configuration space is read-only"))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let (region, file) = Region::create(inflight.num_queues, inflight.queue_size)
            .map_err(VuError::ReqHandlerError)?;
        let reply = VhostUserInflight {
            mmap_size: (usize::from(region.queues())
                * super::inflight::queue_region_size(region.queue_size()))
                as u64,
            mmap_offset: 0,
            num_queues: region.queues(),
            queue_size: region.queue_size(),
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = Region::open(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(VuError::ReqHandlerError)?;
        for (i, q) in self.queues.iter().enumerate() {
            q.vq.ring().inflight = region.queue(i as u16);
        }
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(invalid("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(invalid("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(invalid("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("DEVICE_STATE is not offered"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("DEVICE_STATE is not offered"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(invalid("LOG_SHMFD is not offered"))
    }
}
