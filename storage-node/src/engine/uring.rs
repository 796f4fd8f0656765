//! The io_uring backend: one ring per disk, owned by one thread, fed through a queue and an
//! eventfd.
//!
//! The thread drains every queued request into the submission queue and submits them with one
//! system call (batched submission); completions are answered through oneshot channels. I/Os of
//! up to [`FIXED_BUF_SIZE`] go through buffers registered with the ring once at start
//! (READ_FIXED / WRITE_FIXED: the kernel skips pinning pages on every I/O); larger ones use
//! plain READ / WRITE on aligned buffers.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

use super::io::AlignedBuf;

/// Size of each registered buffer.
pub const FIXED_BUF_SIZE: usize = 128 << 10;
/// Number of registered buffers per ring.
const FIXED_BUFS: usize = 64;
/// Submission queue entries.
const RING_DEPTH: u32 = 256;
const EVENTFD_TOKEN: u64 = u64::MAX;

enum Req {
    Read {
        off: u64,
        len: usize,
        tx: oneshot::Sender<io::Result<AlignedBuf>>,
    },
    Write {
        off: u64,
        data: Bytes,
        /// RWF_DSYNC: complete only once the data (and what is needed to read it back) is on
        /// media — a FUA write where the device has it, else a write and a cache flush.
        dsync: bool,
        tx: oneshot::Sender<io::Result<()>>,
    },
    Fsync {
        tx: oneshot::Sender<io::Result<()>>,
    },
}

struct Shared {
    queue: Mutex<VecDeque<Req>>,
    efd: OwnedFd,
    stop: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// A ring and its thread for one disk.
pub struct Ring {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ring {
    /// Sets up the ring (fails where io_uring is unavailable: old kernels, seccomp, sysctl
    /// `kernel.io_uring_disabled`), registers its buffers and starts its thread.
    pub fn new(file: Arc<File>) -> io::Result<Self> {
        let ring = IoUring::new(RING_DEPTH)?;
        let mut pool: Vec<AlignedBuf> = (0..FIXED_BUFS)
            .map(|_| AlignedBuf::zeroed(FIXED_BUF_SIZE))
            .collect();
        let iovecs: Vec<libc::iovec> = pool
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut().as_mut_ptr().cast(),
                iov_len: FIXED_BUF_SIZE,
            })
            .collect();
        // SAFETY: the iovecs point into `pool`, which the ring thread owns and keeps alive (and
        // never reallocates) for as long as the ring exists; the ring is dropped first.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        // SAFETY: plain eventfd creation; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            efd,
            stop: AtomicBool::new(false),
        });
        let thread = std::thread::Builder::new()
            .name("cairn-uring".into())
            .spawn({
                let shared = shared.clone();
                move || RingThread::new(ring, pool, file, shared).run()
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    fn send(&self, r: Req) {
        self.shared.queue.lock().expect("queue lock").push_back(r);
        self.shared.wake();
    }

    pub async fn read(&self, off: u64, len: usize) -> io::Result<AlignedBuf> {
        let (tx, rx) = oneshot::channel();
        self.send(Req::Read { off, len, tx });
        rx.await
            .map_err(|_| io::Error::other("io_uring thread stopped"))?
    }

    pub async fn write(&self, off: u64, data: Bytes, dsync: bool) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Req::Write {
            off,
            data,
            dsync,
            tx,
        });
        rx.await
            .map_err(|_| io::Error::other("io_uring thread stopped"))?
    }

    pub async fn fdatasync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Req::Fsync { tx });
        rx.await
            .map_err(|_| io::Error::other("io_uring thread stopped"))?
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where an in-flight I/O's bytes live.
enum Buf {
    Fixed(usize),
    Owned(AlignedBuf),
    Data(Bytes),
}

enum Done {
    Read(oneshot::Sender<io::Result<AlignedBuf>>),
    Write(oneshot::Sender<io::Result<()>>),
}

struct InFlight {
    off: u64,
    len: usize,
    /// Bytes completed so far (short reads and writes are resubmitted for the rest).
    done: usize,
    buf: Option<Buf>,
    reply: Done,
    is_write: bool,
    rw_flags: i32,
}

struct RingThread {
    // Field order is drop order: the ring (which references the registered buffers) goes
    // before the pool.
    ring: IoUring,
    pool: Vec<AlignedBuf>,
    free_fixed: Vec<usize>,
    file: Arc<File>,
    shared: Arc<Shared>,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    backlog: VecDeque<Req>,
    efd_buf: Box<u64>,
    inflight: usize,
}

impl RingThread {
    fn new(ring: IoUring, pool: Vec<AlignedBuf>, file: Arc<File>, shared: Arc<Shared>) -> Self {
        Self {
            ring,
            free_fixed: (0..pool.len()).collect(),
            pool,
            file,
            shared,
            slots: Vec::new(),
            free_slots: Vec::new(),
            backlog: VecDeque::new(),
            efd_buf: Box::new(0),
            inflight: 0,
        }
    }

    /// Queues an SQE, submitting what is queued first if the submission queue is full.
    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        for _ in 0..2 {
            // SAFETY: every buffer an SQE points to is owned by `self` (pool, slot entry or
            // efd_buf) and outlives the I/O: it is released only when its completion arrives.
            if unsafe { self.ring.submission().push(&sqe).is_ok() } {
                return;
            }
            let _ = self.ring.submit();
        }
        panic!("io_uring submission queue still full after a submit");
    }

    fn arm_eventfd(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.shared.efd.as_raw_fd()),
            (&mut *self.efd_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        self.push(sqe);
    }

    fn sqe_for(&mut self, slot: usize) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let f = self.slots[slot].as_mut().expect("slot in use");
        let off = f.off + f.done as u64;
        let rest = u32::try_from(f.len - f.done).expect("I/O under 4 GiB");
        let flags = f.rw_flags;
        let sqe = match (f.buf.as_mut().expect("buffer in flight"), f.is_write) {
            (Buf::Fixed(i), false) => {
                let p = self.pool[*i].as_mut().as_mut_ptr();
                // SAFETY: `done` < len <= FIXED_BUF_SIZE, inside the registered buffer.
                opcode::ReadFixed::new(
                    fd,
                    unsafe { p.add(f.done) },
                    rest,
                    u16::try_from(*i).expect("< 64"),
                )
                .offset(off)
                .build()
            }
            (Buf::Fixed(i), true) => {
                let p = self.pool[*i].as_ref().as_ptr();
                // SAFETY: as above.
                opcode::WriteFixed::new(
                    fd,
                    unsafe { p.add(f.done) },
                    rest,
                    u16::try_from(*i).expect("< 64"),
                )
                .offset(off)
                .rw_flags(flags)
                .build()
            }
            (Buf::Owned(b), false) => {
                // SAFETY: `done` < len = the buffer's length.
                opcode::Read::new(fd, unsafe { b.as_mut().as_mut_ptr().add(f.done) }, rest)
                    .offset(off)
                    .build()
            }
            (Buf::Owned(b), true) => {
                // SAFETY: as above.
                opcode::Write::new(fd, unsafe { b.as_ref().as_ptr().add(f.done) }, rest)
                    .offset(off)
                    .rw_flags(flags)
                    .build()
            }
            (Buf::Data(d), _) => {
                // SAFETY: as above; `Bytes` keeps its storage alive while held here.
                opcode::Write::new(fd, unsafe { d.as_ptr().add(f.done) }, rest)
                    .offset(off)
                    .rw_flags(flags)
                    .build()
            }
        };
        sqe.user_data(slot as u64)
    }

    fn start(&mut self, r: Req) -> bool {
        if self.free_slots.is_empty() && self.slots.len() >= RING_DEPTH as usize {
            self.backlog.push_back(r);
            return false;
        }
        let (inflight, fsync) = match r {
            Req::Fsync { tx } => (
                InFlight {
                    off: 0,
                    len: 0,
                    done: 0,
                    buf: None,
                    reply: Done::Write(tx),
                    is_write: false,
                    rw_flags: 0,
                },
                true,
            ),
            Req::Read { off, len, tx } => {
                let buf = match self.free_fixed.pop() {
                    Some(i) if len <= FIXED_BUF_SIZE => Buf::Fixed(i),
                    other => {
                        if let Some(i) = other {
                            self.free_fixed.push(i);
                        }
                        Buf::Owned(AlignedBuf::zeroed(len))
                    }
                };
                (
                    InFlight {
                        off,
                        len,
                        done: 0,
                        buf: Some(buf),
                        reply: Done::Read(tx),
                        is_write: false,
                        rw_flags: 0,
                    },
                    false,
                )
            }
            Req::Write {
                off,
                data,
                dsync,
                tx,
            } => {
                let len = data.len();
                let buf = match self.free_fixed.pop() {
                    Some(i) if len <= FIXED_BUF_SIZE => {
                        self.pool[i].as_mut()[..len].copy_from_slice(&data);
                        Buf::Fixed(i)
                    }
                    other => {
                        if let Some(i) = other {
                            self.free_fixed.push(i);
                        }
                        if (data.as_ptr() as usize).is_multiple_of(super::io::IO_ALIGN) {
                            Buf::Data(data)
                        } else {
                            Buf::Owned(AlignedBuf::copy_from(&data))
                        }
                    }
                };
                (
                    InFlight {
                        off,
                        len,
                        done: 0,
                        buf: Some(buf),
                        reply: Done::Write(tx),
                        is_write: true,
                        rw_flags: if dsync { libc::RWF_DSYNC } else { 0 },
                    },
                    false,
                )
            }
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(inflight);
                s
            }
            None => {
                self.slots.push(Some(inflight));
                self.slots.len() - 1
            }
        };
        let sqe = if fsync {
            opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(slot as u64)
        } else {
            self.sqe_for(slot)
        };
        self.push(sqe);
        self.inflight += 1;
        true
    }

    fn complete(&mut self, slot: usize, res: i32) {
        let f = self.slots[slot]
            .as_mut()
            .expect("completion for a slot in use");
        if res > 0 && f.len > 0 && f.done + (res as usize) < f.len {
            // A short read or write: go on with the rest.
            f.done += res as usize;
            let sqe = self.sqe_for(slot);
            self.push(sqe);
            return;
        }
        let f = self.slots[slot].take().expect("slot in use");
        self.free_slots.push(slot);
        self.inflight -= 1;
        let result = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else if res == 0 && f.len > 0 {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "I/O past the end of the disk",
            ))
        } else {
            Ok(())
        };
        match (f.reply, f.buf) {
            (Done::Read(tx), Some(buf)) => {
                let out = match (result, buf) {
                    (Ok(()), Buf::Fixed(i)) => {
                        let b = AlignedBuf::copy_from(&self.pool[i].as_ref()[..f.len]);
                        self.free_fixed.push(i);
                        Ok(b)
                    }
                    (Err(e), Buf::Fixed(i)) => {
                        self.free_fixed.push(i);
                        Err(e)
                    }
                    (Ok(()), Buf::Owned(b)) => Ok(b),
                    (Ok(()), Buf::Data(_)) => unreachable!("reads never use caller data"),
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(out);
            }
            (Done::Write(tx), buf) => {
                if let Some(Buf::Fixed(i)) = buf {
                    self.free_fixed.push(i);
                }
                let _ = tx.send(result);
            }
            (Done::Read(tx), None) => {
                let _ = tx.send(Err(io::Error::other("read without a buffer")));
            }
        }
    }

    /// The eventfd read is always in flight, into `efd_buf`. Before that buffer is freed, the
    /// read is cancelled and both completions (the read's and the cancel's) are reaped, so the
    /// kernel never writes into freed memory.
    fn cancel_eventfd_read(&mut self) {
        const CANCEL_TOKEN: u64 = EVENTFD_TOKEN - 1;
        self.push(
            opcode::AsyncCancel::new(EVENTFD_TOKEN)
                .build()
                .user_data(CANCEL_TOKEN),
        );
        let mut seen = (false, false);
        while !(seen.0 && seen.1) {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // Without the completions the buffer cannot be proven idle: keep it alive.
                std::mem::forget(std::mem::take(&mut self.efd_buf));
                return;
            }
            for c in self.ring.completion() {
                match c.user_data() {
                    EVENTFD_TOKEN => seen.0 = true,
                    CANCEL_TOKEN => seen.1 = true,
                    _ => {}
                }
            }
        }
    }

    fn run(mut self) {
        self.arm_eventfd();
        loop {
            let stopping = self.shared.stop.load(Ordering::Acquire);
            if stopping
                && self.inflight == 0
                && self.backlog.is_empty()
                && self.shared.queue.lock().expect("queue").is_empty()
            {
                self.cancel_eventfd_read();
                return;
            }
            let reqs: Vec<Req> = {
                let mut q = self.shared.queue.lock().expect("queue lock");
                q.drain(..).collect()
            };
            while let Some(r) = self.backlog.pop_front() {
                if !self.start(r) {
                    break;
                }
            }
            for r in reqs {
                self.start(r);
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
                continue;
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (token, res) in cqes {
                if token == EVENTFD_TOKEN {
                    self.arm_eventfd();
                } else {
                    self.complete(usize::try_from(token).expect("slot index"), res);
                }
            }
        }
    }
}
