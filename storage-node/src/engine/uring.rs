//! The io_uring backend: one ring per disk, driven from the runtime's own threads.
//!
//! A caller puts its write in the submission queue and leaves it there for a submitter task on
//! the same runtime, which submits every one queued in the same turn of the runtime at once,
//! after the tasks that were ready with it have run: a log batch and the in-place writes queued
//! with it take one system call, with no hand-off to another thread. Reads and syncs are
//! submitted by their callers at once (reads the same way measured slower at QD32:
//! BENCHMARKS.md, session 9). The kernel signals completions on an eventfd registered with
//! the ring; a task on the runtime waits for it (tokio's reactor, beside the sockets), reaps
//! every completion and answers each through a oneshot channel — so an I/O costs one wake-up
//! of a runtime thread, not a round trip through a ring thread.
//!
//! On the current-thread scheduler (the daemons' default) the ring defers the kernel's
//! completion work to the runtime's next `io_uring_enter` (DEFER_TASKRUN, with SINGLE_ISSUER:
//! only that thread ever enters it), and its completions signal the eventfd only while someone
//! waits for one: a read, a durable write, a sync, or a request held up by a batched write
//! ([`Ring::watch`]: one waiting for its blocks, a checkpoint waiting for all of them). A small
//! write's in-place step then costs no wake-up of its own: its completion is taken at the next
//! `io_uring_enter`, which the next request makes, or at the latest after `BACKSTOP`. The
//! backstop runs whenever I/O is in flight, signals or not: a completion the kernel holds back
//! unsignalled (it runs at most a few dozen per `io_uring_enter` and may keep the rest) is
//! late by at most that, never lost. (Otherwise the kernel interrupts the thread for each
//! completion, and its eventfd signal wakes it once more.)
//!
//! A submission the kernel refuses for good (anything but an interruption or a shortage that
//! passes) fails the ring: every I/O in flight, waiting, or asked for later gets that error at
//! once, until the node restarts — a disk that fails loudly, not I/O left in a queue.
//!
//! Writes of up to [`FIXED_BUF_SIZE`] whose data is not aligned for O_DIRECT are copied into
//! buffers registered with the ring once at start (WRITE_FIXED: the kernel skips pinning their
//! pages); larger ones into an aligned buffer of their own. Aligned write data (a log batch)
//! is written from where it is: pinning its pages costs less than copying them. Reads go
//! straight into the aligned buffer handed back to the caller (READ): reading into a
//! registered buffer saves pinning a page or two, but then costs a copy of data no cache has
//! seen (measured: QD32 reads ~5% more IOPS this way, CPU per read unchanged).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify};

use super::io::{AlignedBuf, UnfilledBuf};

/// Size of each registered buffer.
pub const FIXED_BUF_SIZE: usize = 128 << 10;
/// Number of registered buffers per ring.
const FIXED_BUFS: usize = 64;
/// Submission queue entries.
const RING_DEPTH: u32 = 256;
/// The longest a batched write's completion goes untaken when no one asks for it.
const BACKSTOP: std::time::Duration = std::time::Duration::from_millis(5);

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
        /// Nobody waits for it (see [`Ring::write_batched`]): its completion needs no wake-up.
        lazy: bool,
        tx: oneshot::Sender<io::Result<()>>,
    },
    Fsync {
        tx: oneshot::Sender<io::Result<()>>,
    },
}

/// [`BACKSTOP`]; an hour for the tests that check no waiter depends on it (the
/// `uring-backstop-hour` failpoint, compiled in only with the `failpoints` feature): one that
/// does then hangs instead of passing late.
fn backstop() -> std::time::Duration {
    fail::fail_point!("uring-backstop-hour", |_| std::time::Duration::from_secs(
        3600
    ));
    BACKSTOP
}

/// A ring for one disk.
pub struct Ring {
    state: Arc<Mutex<RingState>>,
    reaper: tokio::task::JoinHandle<()>,
    /// Wakes the submitter: writes wait for it.
    kick: Arc<Notify>,
    submitter: tokio::task::JoinHandle<()>,
}

impl Ring {
    /// Sets up the ring (fails where io_uring is unavailable: old kernels, seccomp, sysctl
    /// `kernel.io_uring_disabled`, or outside a tokio runtime), registers its buffers and an
    /// eventfd for completions, and starts the task that reaps them.
    pub fn new(file: Arc<File>) -> io::Result<Self> {
        Self::with_backstop(file, backstop())
    }

    /// [`Ring::new`] with another [`BACKSTOP`] (tests use an hour: every completion must then
    /// be taken because someone asked for it).
    fn with_backstop(file: Arc<File>, backstop: std::time::Duration) -> io::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        // Deferred completion work needs every `io_uring_enter` made by one thread: the
        // current-thread scheduler's. Kernels before 6.1 refuse the flags: a plain ring then.
        let deferred = (runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
            .then(|| {
                IoUring::builder()
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag()
                    .build(RING_DEPTH)
                    .ok()
            })
            .flatten();
        let defer = deferred.is_some();
        let ring = match deferred {
            Some(r) => r,
            None => IoUring::new(RING_DEPTH)?,
        };
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
        // SAFETY: the iovecs point into `pool`, which the ring state owns and keeps alive (and
        // never reallocates) for as long as the ring exists; the ring is dropped first.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        // SAFETY: plain eventfd creation; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let efd = {
            let _entered = runtime.enter();
            // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the same descriptor,
            // for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }
                .map_err(|e| io::Error::other(e.to_string()))?
        };
        let state = Arc::new(Mutex::new(RingState::new(ring, pool, file, defer)));
        let reaper = runtime.spawn(reap(efd, state.clone()));
        let kick = Arc::new(Notify::new());
        let submitter = runtime.spawn(submit_batches(kick.clone(), state.clone(), backstop));
        Ok(Self {
            state,
            reaper,
            kick,
            submitter,
        })
    }

    /// Whether completion work waits for the runtime's own enters (see the module's doc).
    pub fn defers_completions(&self) -> bool {
        self.state.lock().expect("ring lock").defer
    }

    /// Someone waits on a batched write (for its blocks, or for all of them): until the
    /// returned guard is dropped, every completion signals the eventfd; the ones the kernel
    /// has already are taken now.
    pub fn watch(&self) -> Watch {
        let mut s = self.state.lock().expect("ring lock");
        s.watchers += 1;
        s.submit_and_reap();
        Watch(self.state.clone())
    }

    fn send(&self, r: Req) {
        let mut s = self.state.lock().expect("ring lock");
        s.start(r);
        s.submit_and_reap();
    }

    /// Writes `data` at `offset` (not durable), for writes nobody waits on (a logged write
    /// going in place): its completion needs no wake-up (see the module's doc).
    pub async fn write_batched(&self, off: u64, data: Bytes) -> io::Result<()> {
        self.write_with(off, data, false, true).await
    }

    /// Reads `len` bytes at `off`, submitted at once (with whatever writes are queued).
    pub async fn read(&self, off: u64, len: usize) -> io::Result<AlignedBuf> {
        let (tx, rx) = oneshot::channel();
        self.send(Req::Read { off, len, tx });
        rx.await.map_err(|_| io::Error::other("io_uring stopped"))?
    }

    /// Leaves `r` for the submitter.
    fn queue(&self, r: Req) {
        self.state.lock().expect("ring lock").start(r);
        self.kick.notify_one();
    }

    /// Writes `data` at `offset`, durable once complete if `dsync`; submitted with the other
    /// I/Os queued in the same turn (a log batch with the in-place writes of the one before).
    pub async fn write(&self, off: u64, data: Bytes, dsync: bool) -> io::Result<()> {
        self.write_with(off, data, dsync, false).await
    }

    /// A write left queued for the submitter; `lazy`: nobody waits for it.
    async fn write_with(&self, off: u64, data: Bytes, dsync: bool, lazy: bool) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.queue(Req::Write {
            off,
            data,
            dsync,
            lazy,
            tx,
        });
        rx.await.map_err(|_| io::Error::other("io_uring stopped"))?
    }

    pub async fn fdatasync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Req::Fsync { tx });
        rx.await.map_err(|_| io::Error::other("io_uring stopped"))?
    }
}

/// See [`Ring::watch`].
pub struct Watch(Arc<Mutex<RingState>>);

impl Drop for Watch {
    fn drop(&mut self) {
        let mut s = self.0.lock().expect("ring lock");
        s.watchers -= 1;
        s.update_signals();
    }
}

/// Waits for the eventfd and reaps completions, for the life of the ring.
async fn reap(efd: AsyncFd<OwnedFd>, state: Arc<Mutex<RingState>>) {
    loop {
        let mut ready = match efd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "io_uring eventfd failed; the disk stops completing I/O");
                return;
            }
        };
        // The eventfd's counter is never read back (a `read` per wake-up would be a system
        // call for nothing): tokio registers it edge-triggered, and epoll reports an eventfd
        // again on every signal, whatever its counter holds, so a completion posted after the
        // readiness is cleared wakes this task again. (Readiness is cleared only if no signal
        // came after it was seen: tokio tracks that. The counter, a u64 the kernel saturates,
        // would take millennia to fill at a million completions a second.)
        ready.clear_ready();
        state.lock().expect("ring lock").submit_and_reap();
    }
}

/// Submits the writes queued, once the tasks that were ready when it was kicked have run (and
/// queued theirs). While I/O is in flight (deferred mode), takes the completions that have come
/// every [`BACKSTOP`].
async fn submit_batches(
    kick: Arc<Notify>,
    state: Arc<Mutex<RingState>>,
    backstop: std::time::Duration,
) {
    loop {
        let in_flight = {
            let s = state.lock().expect("ring lock");
            s.defer && s.inflight > 0
        };
        if in_flight {
            tokio::select! {
                _ = kick.notified() => {}
                _ = tokio::time::sleep(backstop) => {
                    state.lock().expect("ring lock").take_held_back();
                    continue;
                }
            }
        } else {
            kick.notified().await;
        }
        cairn_client::data::writer::after_tasks_ready_together().await;
        state.lock().expect("ring lock").submit_and_reap();
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.reaper.abort();
        self.submitter.abort();
        // Every buffer an I/O in flight points into must outlive it: wait for all of them
        // (they are disk I/Os, so this is short) before the state and its buffers go.
        self.state.lock().expect("ring lock").drain();
    }
}

/// Where an in-flight I/O's bytes live.
enum Buf {
    Fixed(usize),
    Owned(AlignedBuf),
    Data(Bytes),
    /// A read's destination, handed to the caller once the read has filled all of it.
    Unfilled(UnfilledBuf),
}

enum Done {
    Read(oneshot::Sender<io::Result<AlignedBuf>>),
    Write(oneshot::Sender<io::Result<()>>),
    /// Answered already (the ring failed while it was in flight): its completion, if the
    /// kernel ever posts one, only gives its buffer back.
    Answered,
}

impl Done {
    fn fail(self, e: io::Error) {
        match self {
            Self::Read(tx) => drop(tx.send(Err(e))),
            Self::Write(tx) => drop(tx.send(Err(e))),
            Self::Answered => {}
        }
    }
}

impl Req {
    fn fail(self, e: io::Error) {
        match self {
            Self::Read { tx, .. } => drop(tx.send(Err(e))),
            Self::Write { tx, .. } | Self::Fsync { tx } => drop(tx.send(Err(e))),
        }
    }
}

/// `io_uring_enter` refusals that pass: interrupted, or out of resources for now (EAGAIN), or
/// the completion queue full (EBUSY). What is queued stays queued, and the next enter (a
/// request's, or the backstop's) submits it.
fn passes(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ENOMEM)
    )
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
    lazy: bool,
}

struct RingState {
    // Field order is drop order: the ring (which references the registered buffers) goes
    // before the pool.
    ring: IoUring,
    pool: Vec<AlignedBuf>,
    free_fixed: Vec<usize>,
    file: Arc<File>,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    backlog: VecDeque<Req>,
    inflight: usize,
    /// Completions being answered, kept to reuse its allocation.
    cqes: Vec<(u64, i32)>,
    /// Completion work is deferred to our `io_uring_enter` calls (see the module's doc).
    defer: bool,
    /// I/Os in flight that someone waits for (all but the lazy writes).
    awaited: usize,
    /// Live [`Watch`] guards: someone waits on a lazy write.
    watchers: usize,
    /// Whether completions signal the eventfd now.
    signals: bool,
    /// Why the ring fails every I/O: the kernel refused a submission for good (see
    /// [`RingState::fail`]).
    failed: Option<String>,
    /// `io_uring_enter` calls that submitted something.
    #[cfg(test)]
    submissions: usize,
    /// `io_uring_enter` calls made by `submit_and_reap`.
    #[cfg(test)]
    enters: usize,
    /// Reports the kernel's "work queued" flag as set, always: a flag left stale.
    #[cfg(test)]
    stale_taskrun: bool,
}

impl RingState {
    fn new(ring: IoUring, pool: Vec<AlignedBuf>, file: Arc<File>, defer: bool) -> Self {
        Self {
            ring,
            free_fixed: (0..pool.len()).collect(),
            pool,
            file,
            slots: Vec::new(),
            free_slots: Vec::new(),
            backlog: VecDeque::new(),
            inflight: 0,
            cqes: Vec::new(),
            defer,
            awaited: 0,
            watchers: 0,
            signals: true,
            failed: None,
            #[cfg(test)]
            submissions: 0,
            #[cfg(test)]
            enters: 0,
            #[cfg(test)]
            stale_taskrun: false,
        }
    }

    /// Lazy writes are in flight and their completions signal nobody.
    #[cfg(test)]
    fn unwatched(&self) -> bool {
        self.inflight > 0 && !self.signals
    }

    /// Turns the eventfd's signals on while someone waits for a completion, off otherwise.
    /// Returns whether they were just turned on: completion work the kernel queued while they
    /// were off signalled nobody, and it signals again only once that queue has been run.
    fn update_signals(&mut self) -> bool {
        // A backlogged I/O waits for a slot, i.e. for a completion to be taken.
        let on = !self.defer || self.awaited > 0 || self.watchers > 0 || !self.backlog.is_empty();
        self.set_signals(on)
    }

    /// Turns the eventfd's signals on or off; returns whether they were just turned on.
    fn set_signals(&mut self, on: bool) -> bool {
        if on == self.signals {
            return false;
        }
        self.signals = on;
        let cq = self.ring.completion();
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
        // Orders the flag's store before the load of the kernel's "work queued" flag that
        // follows (the kernel queues, then sets its flag, then reads ours).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        on
    }

    /// Runs whatever completion work the kernel holds for us, flagged or not, and answers it
    /// (the backstop's call: the kernel may keep part of a large batch without setting its
    /// "work queued" flag again).
    fn take_held_back(&mut self) {
        if self.defer && self.failed.is_none() {
            /// IORING_ENTER_GETEVENTS (include/uapi/linux/io_uring.h).
            const GETEVENTS: u32 = 1;
            // SAFETY: an enter that submits nothing and passes no argument: the kernel touches
            // no memory of ours but the rings, which it owns with us.
            let _ = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 0, GETEVENTS, None)
            };
        }
        self.submit_and_reap();
    }

    /// The kernel's "completion work queued" flag (IORING_SQ_TASKRUN): an enter with
    /// GETEVENTS runs that work. Only a hint: a completion queued while an enter of ours is
    /// running the queue may set it just after that enter emptied the queue, and then nothing
    /// clears it until more completion work comes and is run — on an idle disk, never.
    fn taskrun(&mut self) -> bool {
        #[cfg(test)]
        if self.stale_taskrun {
            return true;
        }
        self.ring.submission().taskrun()
    }

    /// Submits what is queued (without waiting) and answers every completion there is.
    fn submit_and_reap(&mut self) {
        // Set for a pass that follows one which reaped nothing: it leaves the signals on, and
        // if it reaps nothing either, the call ends whatever the "work queued" flag says. The
        // flag can be stale (see `taskrun`), and passes that turned the signals off and on
        // again for it never ended: a node's one I/O thread spun in here at full CPU with
        // nothing in flight, while the request whose `Watch` kept the signals on waited for
        // that thread, and the node stopped answering until it was fenced.
        let mut recheck = false;
        loop {
            // Deferred mode: no signals while we enter the kernel ourselves. The completions
            // it posts during the call are taken right after it; a signal for them would
            // only wake the reaper once more, for nothing.
            if self.defer && !recheck {
                self.set_signals(false);
            }
            // io_uring_enter only with something to submit, or (deferred mode) with
            // completion work the kernel queued for us: the crate's submit() enters the
            // kernel even for an empty queue, and that was two system calls per I/O for
            // nothing (completions are seen in the shared ring without one). With work
            // queued, submit() asks for it to be run (IORING_ENTER_GETEVENTS).
            let queued_work = self.defer && self.taskrun();
            if !self.ring.submission().is_empty() || queued_work {
                #[cfg(test)]
                {
                    self.submissions += usize::from(!self.ring.submission().is_empty());
                    self.enters += 1;
                }
                self.submit();
            }
            let reaped = self.reap_once();
            self.update_signals();
            // Again if reaping started backlogged I/O; or if someone waits (signals on) and
            // the kernel has work queued: queued while the signals were off, it signalled
            // nobody, and the kernel signals again only once its queue has been run (it flags
            // again what it kept back of a large batch). A pass with the signals on that
            // reaps nothing is the last: any work queued during it was signalled.
            let again = (reaped && !self.ring.submission().is_empty())
                || (self.defer && self.signals && self.taskrun() && (reaped || !recheck));
            if !again {
                return;
            }
            recheck = !reaped;
        }
    }

    /// Enters the kernel to submit what is queued (and, deferred, to run its completion work).
    /// A refusal that passes is left for the next enter; any other fails the ring.
    fn submit(&mut self) {
        if self.failed.is_some() {
            return;
        }
        match self.ring.submit() {
            Ok(_) => {}
            Err(e) if passes(&e) => {}
            Err(e) => self.fail(&e),
        }
    }

    /// The kernel refused a submission for good (EEXIST: an enter from a thread other than
    /// the ring's one issuer — a bug of ours; EBADF, EFAULT, EINVAL, ENXIO: a ring that cannot
    /// go on). Every I/O in flight or waiting for a slot is answered with the error now, and
    /// every later one at once, until the node restarts: the disk fails as a dead one would,
    /// loudly, instead of its I/O waiting in a queue nobody submits. An I/O the kernel had
    /// already taken may still land: like one that failed with EIO, it was never acknowledged,
    /// and its buffer is kept until its completion comes (or for good: see `drain`).
    fn fail(&mut self, e: &io::Error) {
        let why = format!(
            "the disk's io_uring refused a submission ({e}); every I/O on this disk fails \
             until the node restarts"
        );
        tracing::error!("{why}");
        for f in self.slots.iter_mut().flatten() {
            if !f.lazy {
                f.lazy = true;
                self.awaited -= 1;
            }
            std::mem::replace(&mut f.reply, Done::Answered).fail(io::Error::other(why.clone()));
        }
        for r in std::mem::take(&mut self.backlog) {
            r.fail(io::Error::other(why.clone()));
        }
        self.failed = Some(why);
        self.update_signals();
    }

    /// Answers the completions in the queue, then starts what waited for a free slot.
    /// Returns whether there were any (a completion may have queued a follow-up).
    fn reap_once(&mut self) -> bool {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(token, res) in &cqes {
            self.complete(usize::try_from(token).expect("slot index"), res);
        }
        let reaped = !cqes.is_empty();
        cqes.clear();
        self.cqes = cqes;
        while let Some(r) = self.backlog.pop_front() {
            if !self.start(r) {
                break;
            }
        }
        reaped
    }

    /// Waits for every I/O in flight to complete (at drop).
    fn drain(&mut self) {
        if self.failed.is_some() && self.inflight > 0 {
            // Some of them never reached the kernel, and the ring cannot be trusted to say
            // which: keep every buffer alive for good.
            std::mem::forget(std::mem::take(&mut self.pool));
            std::mem::forget(std::mem::take(&mut self.slots));
            return;
        }
        while self.inflight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // Without the completions the buffers cannot be proven idle: keep them
                    // alive for good rather than let the kernel write into freed memory.
                    tracing::error!(error = %e, "io_uring drain failed; leaking its buffers");
                    std::mem::forget(std::mem::take(&mut self.pool));
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            self.reap_once();
        }
    }

    /// Queues an SQE, submitting what is queued first if the submission queue is full. On a
    /// ring that fails (or fails in that submit) the SQE is dropped: its slot has been answered
    /// with the failure, and stays taken.
    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        for _ in 0..2 {
            if self.failed.is_some() {
                return;
            }
            // SAFETY: every buffer an SQE points to is owned by `self` (pool or slot entry) and
            // outlives the I/O: it is released only when its completion arrives (or at drop,
            // after `drain`).
            if unsafe { self.ring.submission().push(&sqe).is_ok() } {
                return;
            }
            self.submit();
        }
        panic!("io_uring submission queue still full after a submit");
    }

    fn sqe_for(&mut self, slot: usize) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let f = self.slots[slot].as_mut().expect("slot in use");
        let off = f.off + f.done as u64;
        let rest = u32::try_from(f.len - f.done).expect("I/O under 4 GiB");
        let flags = f.rw_flags;
        // Registered buffers and caller data are only ever written from; reads go to owned
        // buffers.
        let sqe = match (f.buf.as_mut().expect("buffer in flight"), f.is_write) {
            (Buf::Fixed(i), _) => {
                let p = self.pool[*i].as_ref().as_ptr();
                // SAFETY: `done` < len <= FIXED_BUF_SIZE, inside the registered buffer.
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
            (Buf::Unfilled(b), _) => {
                // SAFETY: `done` < len = the buffer's length.
                opcode::Read::new(fd, unsafe { b.as_mut_ptr().add(f.done) }, rest)
                    .offset(off)
                    .build()
            }
            (Buf::Owned(b), _) => {
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
        if let Some(why) = &self.failed {
            r.fail(io::Error::other(why.clone()));
            return true;
        }
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
                    lazy: false,
                },
                true,
            ),
            Req::Read { off, len, tx } => {
                // Into the buffer the caller gets: a registered one would save the kernel
                // pinning a page or two, but its data would then be copied out, cold.
                let buf = Buf::Unfilled(UnfilledBuf::new(len));
                (
                    InFlight {
                        off,
                        len,
                        done: 0,
                        buf: Some(buf),
                        reply: Done::Read(tx),
                        is_write: false,
                        rw_flags: 0,
                        lazy: false,
                    },
                    false,
                )
            }
            Req::Write {
                off,
                data,
                dsync,
                lazy,
                tx,
            } => {
                let len = data.len();
                // Data already aligned (a log batch) is written from where it is: pinning its
                // pages costs the kernel less than copying them into a registered buffer.
                let buf = if (data.as_ptr() as usize).is_multiple_of(super::io::IO_ALIGN) {
                    Buf::Data(data)
                } else {
                    match self.free_fixed.pop() {
                        Some(i) if len <= FIXED_BUF_SIZE => {
                            self.pool[i].as_mut()[..len].copy_from_slice(&data);
                            Buf::Fixed(i)
                        }
                        other => {
                            if let Some(i) = other {
                                self.free_fixed.push(i);
                            }
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
                        lazy,
                    },
                    false,
                )
            }
        };
        let inflight_lazy = inflight.lazy;
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
        if !inflight_lazy {
            self.awaited += 1;
        }
        self.inflight += 1;
        self.push(sqe);
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
        if !f.lazy {
            self.awaited -= 1;
        }
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
        // A registered buffer (writes only) goes back to the pool, whatever the answer.
        if let Some(Buf::Fixed(i)) = f.buf {
            self.free_fixed.push(i);
        }
        match (f.reply, f.buf) {
            (Done::Read(tx), Some(buf)) => {
                let out = match (result, buf) {
                    // SAFETY: a read ends `Ok` only once its completions add up to its whole
                    // length (a short one is resubmitted for the rest, one of 0 bytes is an
                    // error): the kernel has written every byte.
                    (Ok(()), Buf::Unfilled(b)) => Ok(unsafe { b.assume_filled() }),
                    (Ok(()), Buf::Fixed(_) | Buf::Data(_) | Buf::Owned(_)) => {
                        unreachable!("reads go to unfilled buffers")
                    }
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(out);
            }
            (Done::Write(tx), _) => {
                let _ = tx.send(result);
            }
            (Done::Read(tx), None) => {
                let _ = tx.send(Err(io::Error::other("read without a buffer")));
            }
            (Done::Answered, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A ring on a fresh 1 MiB file, O_DIRECT on a disk-backed filesystem (as the engine
    /// tests: `CAIRN_TEST_DIR`, else /var/tmp), so that writes complete later, from the device.
    fn ring(backstop: Duration) -> (tempfile::TempDir, Ring) {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir_in(
            std::env::var("CAIRN_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()),
        )
        .unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let ring = Ring::with_backstop(Arc::new(file), backstop).unwrap();
        assert!(
            ring.state.lock().unwrap().defer,
            "the current-thread scheduler gets a ring with deferred completion work"
        );
        (dir, ring)
    }

    fn block(byte: u8) -> Bytes {
        AlignedBuf::copy_from(&[byte; 4096]).into_bytes()
    }

    /// Bounds a wait that must end (a liveness check, not a timing one: the bound is far
    /// beyond any disk write, and far below the hour-long backstop).
    async fn soon<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("completion never taken")
    }

    /// A batched write, queued (polled once: the submitter submits it on its next turn), then
    /// left 50 ms to the device with nobody asking for its completion.
    async fn left_alone(
        r: &Ring,
        off: u64,
        byte: u8,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + '_>> {
        let mut lazy = Box::pin(r.write_batched(off, block(byte)));
        assert!(futures::poll!(lazy.as_mut()).is_pending());
        tokio::time::sleep(Duration::from_millis(50)).await;
        lazy
    }

    /// With nothing else in flight and nobody asking, a batched write's completion is still
    /// taken (by the backstop).
    #[tokio::test]
    async fn lone_batched_write_completes() {
        let (_d, r) = ring(BACKSTOP);
        soon(r.write_batched(0, block(1))).await.unwrap();
        assert_eq!(soon(r.read(0, 4096)).await.unwrap().as_ref(), &[1u8; 4096]);
    }

    /// A batched write's completion, queued by the kernel while nobody listened, is taken by
    /// the next I/O someone waits for; and that I/O's own completion is not lost behind it.
    #[tokio::test]
    async fn next_awaited_io_takes_a_batched_completion() {
        let (_d, r) = ring(HOUR);
        let lazy = left_alone(&r, 8192, 2).await;
        assert!(r.state.lock().unwrap().unwatched());
        soon(r.write(0, block(3), true)).await.unwrap();
        soon(lazy).await.unwrap();
        assert_eq!(
            soon(r.read(8192, 4096)).await.unwrap().as_ref(),
            &[2u8; 4096]
        );
    }

    /// A write lands whatever its buffer: aligned (written from where it is), unaligned and
    /// small (copied into a registered buffer), or unaligned and larger than one (copied into
    /// an aligned one of its own).
    #[tokio::test]
    async fn writes_land_from_aligned_and_unaligned_buffers() {
        let (_d, r) = ring(HOUR);
        let unaligned = |byte: u8, len: usize| {
            let mut v = vec![0u8; len + 1];
            v[1..].fill(byte);
            let b = Bytes::from(v).slice(1..);
            assert!(!(b.as_ptr() as usize).is_multiple_of(super::super::io::IO_ALIGN));
            b
        };
        let big = FIXED_BUF_SIZE + 4096;
        soon(r.write(0, block(7), false)).await.unwrap();
        soon(r.write(4096, unaligned(8, 4096), false))
            .await
            .unwrap();
        soon(r.write(8192, unaligned(9, big), true)).await.unwrap();
        let got = soon(r.read(0, 8192 + big)).await.unwrap().into_bytes();
        assert_eq!(&got[..4096], &[7u8; 4096]);
        assert_eq!(&got[4096..8192], &[8u8; 4096]);
        assert!(got[8192..].iter().all(|&b| b == 9));
    }

    /// Writes queued in one turn of the runtime (a log batch, the in-place writes of the one
    /// before) go to the kernel in one submission, and each lands where it was sent.
    #[tokio::test]
    async fn writes_of_one_turn_are_submitted_together() {
        let (_d, r) = ring(HOUR);
        let before = r.state.lock().unwrap().submissions;
        let writes = (0..8u8).map(|i| r.write(u64::from(i) * 4096, block(i), i == 0));
        for w in soon(futures::future::join_all(writes)).await {
            w.unwrap();
        }
        assert_eq!(r.state.lock().unwrap().submissions - before, 1);
        let got = soon(r.read(0, 8 * 4096)).await.unwrap();
        for (i, b) in got.as_ref().chunks(4096).enumerate() {
            assert_eq!(b, &[i as u8; 4096]);
        }
    }

    /// Someone waiting on a batched write (`watch`) gets its completion, whether it came
    /// before the call or comes after it, or the write is only queued at the call; once the
    /// watch is dropped, completions signal nobody again.
    #[tokio::test]
    async fn watch_takes_batched_completions() {
        let (_d, r) = ring(HOUR);
        // Completed before the call: taken by it.
        let lazy = left_alone(&r, 0, 4).await;
        let w = r.watch();
        soon(lazy).await.unwrap();
        drop(w);
        // Still in flight at the call: its completion signals.
        let lazy = r.write_batched(4096, block(5));
        tokio::pin!(lazy);
        assert!(futures::poll!(lazy.as_mut()).is_pending());
        tokio::task::yield_now().await; // the submitter submits it
        let w = r.watch();
        soon(lazy).await.unwrap();
        drop(w);
        // Queued after the call (its holder had not got that far): signals too.
        let w = r.watch();
        soon(r.write_batched(0, block(6))).await.unwrap();
        drop(w);
        let lazy = left_alone(&r, 8192, 7).await;
        assert!(
            !r.state.lock().unwrap().signals,
            "no signals once the watch is gone"
        );
        drop(soon(r.read(0, 4096)).await.unwrap());
        soon(lazy).await.unwrap();
        assert_eq!(
            soon(r.read(0, 8192)).await.unwrap().as_ref()[4096..],
            [5u8; 4096]
        );
    }

    /// A submission the kernel refuses for good — here EEXIST, an enter from a thread that is
    /// not the ring's one issuer — fails the I/O it carried, the I/O queued with it, and every
    /// later one at once, each with an error that says why. (It used to be logged and left in
    /// the queue: the I/O then waited for another enter, or, on an idle disk with an hour's
    /// backstop, for good.)
    #[tokio::test]
    async fn a_refused_submission_fails_the_ring() {
        let (_d, r) = ring(HOUR);
        let r = Arc::new(r);
        soon(r.write(0, block(1), true)).await.unwrap();
        // Queued for this runtime's submitter, which has not run yet.
        let queued = r.write_batched(4096, block(2));
        tokio::pin!(queued);
        assert!(futures::poll!(queued.as_mut()).is_pending());
        let (tx, rx) = std::sync::mpsc::channel();
        let other = r.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _ = tx.send(rt.block_on(other.read(0, 4096)).map(drop));
        });
        let read = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a read submitted from another thread was never answered");
        let refused = |res: io::Result<()>, what: &str| {
            let e = res.expect_err(what).to_string();
            assert!(e.contains("io_uring refused a submission"), "{what}: {e}");
        };
        refused(read, "the refused read");
        refused(soon(queued).await, "the write queued with it");
        refused(soon(r.write(8192, block(3), true)).await, "a later write");
        refused(soon(r.read(0, 4096)).await.map(drop), "a later read");
        refused(soon(r.fdatasync()).await, "a later sync");
    }

    /// The kernel's "work queued" flag can be left set with nothing queued, and stay so on an
    /// idle disk. With it stuck, a watch taken with nothing in flight returns after at most
    /// two enters (it used to loop for good, holding the runtime's only thread), and I/O
    /// still completes, each completion taken on its signal (the backstop is an hour). Runs
    /// on a thread of its own, so that a ring stuck in a loop fails the test instead of
    /// hanging it.
    #[test]
    fn a_stale_work_flag_does_not_spin() {
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (_d, r) = ring(HOUR);
                r.state.lock().unwrap().stale_taskrun = true;
                let before = r.state.lock().unwrap().enters;
                let w = r.watch();
                let enters = r.state.lock().unwrap().enters - before;
                assert!(enters <= 2, "{enters} enters for nothing");
                soon(r.write(0, block(7), true)).await.unwrap();
                soon(r.write_batched(4096, block(8))).await.unwrap();
                let back = soon(r.read(0, 8192)).await.unwrap();
                assert_eq!(back.as_ref()[..4096], [7u8; 4096]);
                assert_eq!(back.as_ref()[4096..], [8u8; 4096]);
                drop(w);
            });
            done.send(()).unwrap();
        });
        wait.recv_timeout(Duration::from_secs(120))
            .expect("the ring's thread is stuck (or its test failed: see its panic above)");
    }
}
