//! In-flight request tracking (vhost-user VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a memfd this
//! backend creates and hands to QEMU, which keeps it across backend restarts and hands it to
//! the next backend. It records which descriptor chains were taken off each queue and not yet
//! returned, so a backend killed in the middle of guest I/O is replaced by one that runs
//! exactly those requests again — in the order they were taken — and none that already
//! completed. Without it QEMU can only rewind each queue to its used index, which replays
//! completed requests and skips unfinished ones as soon as requests complete out of order.
//!
//! The region's layout is the backend's own; Cairn uses the split-ring layout of the
//! vhost-user specification, one queue region every [`queue_region_size`] bytes:
//!
//! ```text
//! 0   features u64 (0)       8  version u16 (0: never used, 1: in use)
//! 10  desc_num u16           12 last_batch_head u16      14 used_idx u16
//! 16  desc[desc_num]: inflight u8, pad[5], next u16, counter u64   (16 bytes each)
//! ```
//!
//! The region lives in memory shared with QEMU, not on disk: a backend killed by any signal
//! leaves every store it made behind, and only the order of the stores matters. A chain's mark
//! is set, under the queue's lock, when it is taken off the available ring. Returning it:
//! `last_batch_head` names it, the used ring takes it (guest memory), its mark is cleared, and
//! `used_idx` catches up with the used ring. A crash between the used ring and `used_idx` is
//! seen on recovery as `used_idx` behind the ring, and the mark of `last_batch_head` is cleared
//! then (it completed).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

const HEADER: usize = 16;
const DESC: usize = 16;
const VERSION: u16 = 1;

/// Bytes of one queue's region for a queue of `queue_size` descriptors (64-byte aligned).
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(64)
}

/// The whole region, mapped.
pub struct Region {
    map: MmapRegion,
    queues: u16,
    queue_size: u16,
}

impl Region {
    /// A fresh, zeroed region for `queues` queues of `queue_size` descriptors, and the memfd
    /// behind it (for GET_INFLIGHT_FD).
    pub fn create(queues: u16, queue_size: u16) -> io::Result<(Arc<Self>, File)> {
        if queues == 0 || queue_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight region for no queue",
            ));
        }
        let size = usize::from(queues) * queue_region_size(queue_size);
        let fd = nix::sys::memfd::memfd_create(
            c"cairn-vhost-inflight",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )?;
        let file = File::from(fd);
        // A new memfd reads as zeros: every queue region is "never used".
        file.set_len(size as u64)?;
        let region = Self::map(file.try_clone()?, 0, size, queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps a region handed over by SET_INFLIGHT_FD; its size must be what `queues` queues of
    /// `queue_size` need.
    pub fn open(
        file: File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        let need = usize::from(queues) * queue_region_size(queue_size);
        if queues == 0 || queue_size == 0 || size != need as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "inflight region of {size} bytes for {queues} queues of {queue_size}: \
                     expected {need}"
                ),
            ));
        }
        Self::map(file, offset, need, queues, queue_size)
    }

    fn map(
        file: File,
        offset: u64,
        size: usize,
        queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size)
            .map_err(|e| io::Error::other(format!("mapping the inflight region: {e}")))?;
        Ok(Arc::new(Self {
            map,
            queues,
            queue_size,
        }))
    }

    pub fn queues(&self) -> u16 {
        self.queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `q`'s part of the region.
    pub fn queue(self: &Arc<Self>, q: u16) -> Option<QueueInflight> {
        (q < self.queues).then(|| QueueInflight {
            base: usize::from(q) * queue_region_size(self.queue_size),
            region: self.clone(),
        })
    }
}

/// One queue's tracking. Its methods are called with the queue's lock held.
#[derive(Clone)]
pub struct QueueInflight {
    region: Arc<Region>,
    base: usize,
}

impl QueueInflight {
    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, v: T) {
        // Offsets are within the mapping by construction (checked sizes, heads < desc_num).
        let _ = self
            .region
            .map
            .as_volatile_slice()
            .store(v, self.base + at, Ordering::SeqCst);
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, at: usize) -> T {
        self.region
            .map
            .as_volatile_slice()
            .load(self.base + at, Ordering::SeqCst)
            .unwrap_or_default()
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    pub fn desc_num(&self) -> u16 {
        self.region.queue_size
    }

    /// Whether a backend used this queue's region before (a restart), rather than it being
    /// fresh from GET_INFLIGHT_FD.
    pub fn in_use(&self) -> bool {
        self.load::<u16>(8) != 0
    }

    /// Makes a fresh region usable: version 1, no chain in flight, the used ring at `used`.
    pub fn init(&self, used: u16) {
        for h in 0..self.desc_num() {
            self.store::<u8>(Self::desc(h), 0);
        }
        self.store::<u16>(10, self.desc_num());
        self.store::<u16>(14, used);
        self.store::<u16>(8, VERSION);
    }

    /// `head` was taken off the available ring: in flight, `counter`-th of this queue.
    pub fn taken(&self, head: u16, counter: u64) {
        if head >= self.desc_num() {
            return;
        }
        self.store::<u64>(Self::desc(head) + 8, counter);
        self.store::<u8>(Self::desc(head), 1);
    }

    /// Before `head` goes into the used ring: the batch being returned is `head` alone.
    pub fn returning(&self, head: u16) {
        if head >= self.desc_num() {
            return;
        }
        let last = self.load::<u16>(12);
        self.store::<u16>(Self::desc(head) + 6, last);
        self.store::<u16>(12, head);
    }

    /// After the used ring took `head` and its index became `used`.
    pub fn returned(&self, head: u16, used: u16) {
        if head < self.desc_num() {
            self.store::<u8>(Self::desc(head), 0);
        }
        self.store::<u16>(14, used);
    }

    /// After a restart, with the used ring's index at `used`: finishes a return the previous
    /// backend was in the middle of, and lists the chains still in flight, oldest first, with
    /// the counter to go on from.
    pub fn recover(&self, used: u16) -> (Vec<u16>, u64) {
        let recorded = self.load::<u16>(14);
        if recorded != used {
            // The used ring took the last batch but the marks were not all cleared: clear the
            // batch's (as many as the ring moved, following the batch's list).
            let mut n = used.wrapping_sub(recorded);
            let mut head = self.load::<u16>(12);
            while n > 0 && head < self.desc_num() {
                self.store::<u8>(Self::desc(head), 0);
                head = self.load::<u16>(Self::desc(head) + 6);
                n -= 1;
            }
            self.store::<u16>(14, used);
        }
        let mut live: Vec<(u64, u16)> = (0..self.desc_num())
            .filter(|h| self.load::<u8>(Self::desc(*h)) == 1)
            .map(|h| (self.load::<u64>(Self::desc(h) + 8), h))
            .collect();
        live.sort_unstable();
        let next = live.last().map_or(0, |(c, _)| c + 1);
        (live.into_iter().map(|(_, h)| h).collect(), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The region as QEMU keeps it: the memfd, mapped again by the "next backend".
    fn reopen(file: &File, queues: u16, size: u16) -> Arc<Region> {
        Region::open(
            file.try_clone().unwrap(),
            0,
            (usize::from(queues) * queue_region_size(size)) as u64,
            queues,
            size,
        )
        .unwrap()
    }

    #[test]
    fn a_restart_finds_exactly_the_unreturned_chains_in_order() {
        let (r, file) = Region::create(2, 8).unwrap();
        let q = r.queue(1).unwrap();
        assert!(!q.in_use());
        q.init(0);
        // Taken: 5, 2, 7, 0 (counters 0..4). Returned out of order: 2, then 0.
        for (c, h) in [5u16, 2, 7, 0].into_iter().enumerate() {
            q.taken(h, c as u64);
        }
        q.returning(2);
        q.returned(2, 1);
        q.returning(0);
        q.returned(0, 2);
        // The backend dies; the next one maps the same memfd.
        let r2 = reopen(&file, 2, 8);
        let q2 = r2.queue(1).unwrap();
        assert!(q2.in_use());
        assert_eq!(q2.recover(2), (vec![5, 7], 3));
        // Queue 0 was never used.
        assert!(!r2.queue(0).unwrap().in_use());
        assert!(r2.queue(2).is_none());
    }

    #[test]
    fn a_crash_between_the_used_ring_and_the_marks_is_finished() {
        let (r, file) = Region::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.init(10);
        q.taken(3, 0);
        q.taken(1, 1);
        // Returning 1: the used ring moved to 11, then the backend died before clearing.
        q.returning(1);
        let q2 = reopen(&file, 1, 4).queue(0).unwrap();
        assert_eq!(q2.recover(11), (vec![3], 1));
        // Died before the used ring moved: 1 is still in flight and runs again.
        let (r, file) = Region::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.init(10);
        q.taken(3, 0);
        q.taken(1, 1);
        q.returning(1);
        let q2 = reopen(&file, 1, 4).queue(0).unwrap();
        assert_eq!(q2.recover(10), (vec![3, 1], 2));
    }

    #[test]
    fn a_region_of_the_wrong_size_is_refused() {
        let (_, file) = Region::create(1, 4).unwrap();
        assert!(Region::open(file, 0, 4096, 1, 4).is_err());
    }
}
