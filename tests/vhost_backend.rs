//! The vhost-user-blk backend driven through rust-vmm's vhost-user frontend, in process, with
//! real descriptor chains in shared guest memory, over a volume of a `cairn up` cluster:
//! config space, write, read back, GET_ID, flush, discard, write-zeroes; then malformed chains
//! (no status byte, data in the wrong direction, past the end, unaligned, unknown type), each
//! answered IOERR / UNSUPP (or handed back untouched), and the backend keeps serving.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_client::vhost::request::*;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use common::UpCluster;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QUEUE: u16 = 256;
const MEM: usize = 8 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Where request buffers live in guest memory (the queue is at 0).
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x40_0000;

/// The driver side of one split virtqueue, written by hand into guest memory (the layout comes
/// from virtio-queue's MockSplitQueue, made once: making it again would reset the rings).
struct Driver {
    mem: GuestMemoryMmap,
    frontend: Frontend,
    kick: EventFd,
    _call: EventFd,
    desc: GuestAddress,
    avail: GuestAddress,
    used_ring: GuestAddress,
    next_desc: u16,
    used: u16,
}

impl Driver {
    /// Adds one chain of (address, length, writable) buffers, kicks, and waits for it to be
    /// used. Returns the length the device reported.
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        let first = self.place(bufs);
        self.kick.write(1).unwrap();
        let (id, len) = self.wait_used();
        assert_eq!(id, u32::from(first), "the chain used is the one submitted");
        len
    }

    /// Writes a chain into the descriptor table and makes it available, without a kick.
    /// Returns its head.
    fn place(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if *w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { first + i as u16 + 1 };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            let at = self.desc.unchecked_add(16 * u64::from(first + i as u16));
            self.mem.write_slice(&d, at).unwrap();
        }
        // The chain's head into the available ring, then the ring's index past it.
        let avail_idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        let slot = self
            .avail
            .unchecked_add(4 + 2 * u64::from(avail_idx % QUEUE));
        self.mem.write_obj(first, slot).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(avail_idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
        self.next_desc = (first + bufs.len() as u16) % (QUEUE - 8);
        first
    }

    /// Waits for the next used element; returns its (id, len).
    fn wait_used(&mut self) -> (u32, u32) {
        let used_idx = self.used_ring.unchecked_add(2);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // The ring may have moved past more than one element since the last look.
            let idx: u16 = self.mem.read_obj(used_idx).unwrap();
            if idx != self.used && idx.wrapping_sub(self.used) < QUEUE {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the backend never used the chain"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let slot = u64::from(self.used % QUEUE);
        self.used = self.used.wrapping_add(1);
        let elem = self.used_ring.unchecked_add(4 + slot * 8);
        let id: u32 = self.mem.read_obj(elem).unwrap();
        (id, self.mem.read_obj(elem.unchecked_add(4)).unwrap())
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_slice(&[0xEE], GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A well-formed request: header, data (readable for OUT-like, writable for IN-like),
    /// status. Returns (status, used length).
    fn request(&mut self, kind: u32, sector: u64, data: u32, device_writes: bool) -> (u8, u32) {
        self.header(kind, sector);
        let mut bufs = vec![(HDR, 16, false)];
        if data > 0 {
            bufs.push((DATA, data, device_writes));
        }
        bufs.push((STATUS, 1, true));
        let len = self.submit(&bufs);
        (self.status(), len)
    }

    /// Places (without a kick) a write of `data` at `sector` in buffers of its own (`slot`),
    /// so that several can be outstanding. Returns its head.
    fn place_write(&mut self, slot: u64, sector: u64, data: &[u8]) -> u16 {
        let (hdr, buf, status) = (
            0x50_0000 + slot * 0x100,
            0x60_0000 + slot * 0x1_0000,
            0x70_0000 + slot,
        );
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_slice(data, GuestAddress(buf)).unwrap();
        self.mem.write_slice(&[0xEE], GuestAddress(status)).unwrap();
        self.place(&[
            (hdr, 16, false),
            (buf, data.len() as u32, false),
            (status, 1, true),
        ])
    }

    fn slot_status(&self, slot: u64) -> u8 {
        self.mem.read_obj(GuestAddress(0x70_0000 + slot)).unwrap()
    }

    fn put(&self, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
    }

    fn get(&self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        b
    }
}

/// A volume of a fresh `cairn up` cluster served by the backend in this process: the cluster,
/// the runtime the backend runs on, the volume's own client (to check what reached the
/// volume), and the backend's socket.
fn serve_volume(
    name: &str,
) -> (
    UpCluster,
    tokio::runtime::Runtime,
    Arc<VolumeClient>,
    PathBuf,
) {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", name, "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vc = rt.block_on(async {
        VolumeClient::attach(
            MetaClient::new(std::slice::from_ref(&c.meta)).unwrap(),
            name,
            AttachOptions {
                holder: "vhost-test".into(),
                force: false,
                host: "node-1".into(),
            },
        )
        .await
        .unwrap()
    });
    let socket = c.path(&format!("{name}.sock"));
    {
        let (vc, socket, handle) = (vc.clone(), socket.clone(), rt.handle().clone());
        // Serves frontends for the life of the test process.
        std::thread::spawn(move || cairn_client::vhost::serve(vc, &socket, 1, handle));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no vhost-user socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    (c, rt, vc, socket)
}

/// Guest memory: a shared file, mapped here and (through its fd) by the backend; the split
/// queue's rings are laid out once at address 0.
struct Guest {
    mem: GuestMemoryMmap,
    hva: u64,
    region: VhostUserMemoryRegionInfo,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

fn guest() -> Guest {
    let file = tempfile::tempfile().unwrap();
    file.set_len(MEM as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let hva = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region =
        VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(0)).unwrap())
            .unwrap();
    let q = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE);
    let (desc, avail, used) = (q.desc_table_addr(), q.avail_addr(), q.used_addr());
    drop(q);
    Guest {
        mem,
        hva,
        region,
        desc,
        avail,
        used,
    }
}

/// How a session treats the inflight region.
enum Inflight {
    Off,
    /// GET_INFLIGHT_FD, then SET_INFLIGHT_FD with what came back.
    New,
    /// SET_INFLIGHT_FD with a region kept from an earlier session (QEMU after a reconnect).
    Reuse(VhostUserInflight, File),
}

/// One frontend connection set up as QEMU does it: features (all but EVENT_IDX: the test
/// polls the used ring and kicks every time), protocol features, owner, memory, the inflight
/// region, then queue 0 from `base`, kick, call, enable. Returns the driver and the region.
fn session(
    socket: &Path,
    g: &Guest,
    base: u16,
    inflight: Inflight,
) -> (Driver, Option<(VhostUserInflight, File)>) {
    let mut frontend = Frontend::connect(socket, 1).unwrap();
    let features = frontend.get_features().unwrap();
    for f in [
        F_BLK_SIZE,
        F_FLUSH,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_MQ,
        F_VERSION_1,
    ] {
        assert!(features & f != 0, "feature {f:#x} offered");
    }
    frontend.set_features(features & !F_EVENT_IDX).unwrap();
    let proto = frontend.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
    assert!(proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    frontend.set_protocol_features(proto).unwrap();
    frontend.set_owner().unwrap();
    frontend
        .set_mem_table(std::slice::from_ref(&g.region))
        .unwrap();
    let region = match inflight {
        Inflight::Off => None,
        Inflight::New => {
            let ask = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: QUEUE,
            };
            Some(frontend.get_inflight_fd(&ask).unwrap())
        }
        Inflight::Reuse(info, file) => Some((info, file)),
    };
    if let Some((info, file)) = &region {
        frontend.set_inflight_fd(info, file.as_raw_fd()).unwrap();
    }
    frontend.set_vring_num(0, QUEUE).unwrap();
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE,
                queue_size: QUEUE,
                flags: 0,
                desc_table_addr: g.hva + g.desc.0,
                used_ring_addr: g.hva + g.used.0,
                avail_ring_addr: g.hva + g.avail.0,
                log_addr: None,
            },
        )
        .unwrap();
    frontend.set_vring_base(0, base).unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_enable(0, true).unwrap();
    let d = Driver {
        mem: g.mem.clone(),
        frontend,
        kick,
        _call: call,
        desc: g.desc,
        avail: g.avail,
        used_ring: g.used,
        next_desc: 0,
        used: base,
    };
    (d, region)
}

#[test]
fn frontend_drives_the_backend_with_real_descriptor_chains() {
    let (_c, rt, vc, socket) = serve_volume("vb");
    let g = guest();
    let (mut d, _) = session(&socket, &g, 0, Inflight::Off);
    let (_, cfg) = d
        .frontend
        .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (64 << 20) / 512,
        "capacity in sectors"
    );
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);

    // Write 8 KiB at sector 16 (byte 8192), read it back.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 31 + 7) as u8).collect();
    d.put(&pattern);
    assert_eq!(d.request(T_OUT, 16, 8192, false), (S_OK, 1));
    d.put(&[0u8; 8192]);
    assert_eq!(d.request(T_IN, 16, 8192, true), (S_OK, 8193));
    assert_eq!(d.get(8192), pattern);
    // The same bytes are on the volume.
    assert_eq!(rt.block_on(vc.read(8192, 8192)).unwrap().to_vec(), pattern);
    // GET_ID: the serial, in the 20 bytes offered.
    assert_eq!(d.request(T_GET_ID, 0, 20, true).0, S_OK);
    assert_eq!(&d.get(8), b"cairn-vb");
    assert_eq!(d.request(T_FLUSH, 0, 0, false), (S_OK, 1));
    // Discard the first 4 KiB, write-zeroes (unmapping) the second: both read as zeros.
    let mut segs = Vec::new();
    for (sector, flags) in [(16u64, 0u32), (24, WRITE_ZEROES_UNMAP)] {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend_from_slice(&8u32.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        segs.push(s);
    }
    d.put(&segs[0]);
    assert_eq!(d.request(T_DISCARD, 0, 16, false).0, S_OK);
    d.put(&segs[1]);
    assert_eq!(d.request(T_WRITE_ZEROES, 0, 16, false).0, S_OK);
    assert_eq!(d.request(T_IN, 16, 8192, true).0, S_OK);
    assert_eq!(d.get(8192), vec![0u8; 8192]);

    // Malformed and refused requests: each answered, none stops the backend.
    let sectors = (64u64 << 20) / 512;
    assert_eq!(
        d.request(T_IN, sectors, 4096, true).0,
        S_IOERR,
        "past the end"
    );
    assert_eq!(
        d.request(T_OUT, sectors - 4, 4096, false).0,
        S_IOERR,
        "write past the end"
    );
    assert_eq!(
        d.request(T_IN, 1, 4096, true).0,
        S_IOERR,
        "unaligned sector"
    );
    assert_eq!(
        d.request(T_IN, 16, 1000, true).0,
        S_IOERR,
        "not whole blocks"
    );
    assert_eq!(d.request(99, 0, 0, false).0, S_UNSUPP, "unknown type");
    assert_eq!(
        d.request(T_OUT, 16, 4096, true).0,
        S_IOERR,
        "write data the device may write"
    );
    assert_eq!(
        d.request(T_IN, 16, 4096, false).0,
        S_IOERR,
        "read into readable data"
    );
    d.put(&[1, 2, 3]);
    assert_eq!(
        d.request(T_DISCARD, 0, 3, false).0,
        S_IOERR,
        "a torn segment"
    );
    // No status byte at all: handed back with nothing written.
    d.header(T_IN, 16);
    assert_eq!(d.submit(&[(HDR, 16, false), (DATA, 4096, false)]), 0);
    // A header too short to hold a request.
    d.header(T_IN, 16);
    assert_eq!(d.submit(&[(HDR, 8, false), (STATUS, 1, true)]), 1);
    assert_eq!(d.status(), S_IOERR);

    // Still serving.
    d.put(&pattern[..4096]);
    assert_eq!(d.request(T_OUT, 40, 4096, false).0, S_OK);
    assert_eq!(d.request(T_IN, 40, 4096, true).0, S_OK);
    assert_eq!(d.get(4096), pattern[..4096].to_vec());
}

/// A backend that dies with requests in flight is replaced by one that, given the inflight
/// region QEMU kept, runs exactly those requests again — in the order they were taken, and
/// not one that completed out of order before the death — and goes on from the right place
/// in the available ring.
#[test]
fn a_restarted_backend_reruns_exactly_the_requests_left_in_flight() {
    let (_c, rt, vc, socket) = serve_volume("vi");
    let g = guest();
    let (mut d, region) = session(&socket, &g, 0, Inflight::New);
    let (info, file) = region.expect("an inflight region");
    let block = |b: u8| vec![b; 4096];
    d.put(&block(0xD0));
    assert_eq!(d.request(T_OUT, 64, 4096, false), (S_OK, 1));
    // Three more chains made available, no kick: A at sector 128, C at 64, B at 192.
    let h1 = d.place_write(1, 128, &block(0xA1));
    let h0 = d.place_write(2, 64, &block(0xC0));
    let h2 = d.place_write(3, 192, &block(0xB2));
    let next_desc = d.next_desc;
    drop(d); // the connection ends

    // What a backend killed in the middle of them leaves behind: it took all three, and the
    // write of C completed (out of order: into used ring position 1) before the kill. The
    // guest then overwrote sector 64 with E, and that completed too.
    let r = cairn_client::vhost::inflight::Region::open(
        file.try_clone().unwrap(),
        info.mmap_offset,
        info.mmap_size,
        1,
        QUEUE,
    )
    .unwrap();
    let q = r.queue(0).unwrap();
    for (n, h) in [h1, h0, h2].into_iter().enumerate() {
        q.taken(h, 10 + n as u64);
    }
    q.returning(h0);
    g.mem
        .write_obj(u32::from(h0), g.used.unchecked_add(4 + 8))
        .unwrap();
    g.mem
        .write_obj(1u32, g.used.unchecked_add(4 + 8 + 4))
        .unwrap();
    g.mem.write_obj(2u16, g.used.unchecked_add(2)).unwrap();
    q.returned(h0, 2);
    g.mem.write_slice(&[S_OK], GuestAddress(0x70_0002)).unwrap();
    rt.block_on(vc.write(64 * 512, bytes::Bytes::from(block(0xE0))))
        .unwrap();

    // QEMU reconnects: the same region, the ring rewound to its used index (2).
    let (mut d, _) = session(&socket, &g, 2, Inflight::Reuse(info, file));
    d.next_desc = next_desc;
    let mut ids = [d.wait_used().0, d.wait_used().0];
    ids.sort_unstable();
    let mut want = [u32::from(h1), u32::from(h2)];
    want.sort_unstable();
    assert_eq!(
        ids, want,
        "the two chains left in flight, and only they, ran again"
    );
    assert_eq!((d.slot_status(1), d.slot_status(3)), (S_OK, S_OK));
    let read = |sector: u64| rt.block_on(vc.read(sector * 512, 4096)).unwrap().to_vec();
    assert_eq!(read(128), block(0xA1));
    assert_eq!(read(192), block(0xB2));
    // The next request is the next one the guest made available, not C again.
    d.put(&block(0x77));
    assert_eq!(d.request(T_OUT, 256, 4096, false), (S_OK, 1));
    assert_eq!(read(256), block(0x77));
    assert_eq!(
        read(64),
        block(0xE0),
        "the completed write of C did not run again"
    );
    // Nothing is left marked in flight.
    assert_eq!(q.recover(5).0, Vec::<u16>::new());
}
